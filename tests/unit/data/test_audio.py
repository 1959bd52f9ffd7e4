"""Safe audio loading (data/audio.py) and audio in chat records: path checks, corrupt / empty / absurd clips,
PCM decoding, resampling, and the file:line errors of read_records / check_file / load_chat."""

import base64
import json
import struct
import wave
from math import gcd

import numpy as np
import pytest
from scipy.signal import resample_poly

from mmdistill.data.audio import AudioError, load_audio
from mmdistill.data.loaders import ImageCache, load_chat
from mmdistill.data.records import RecordError, check_file, read_records


def write_wav(path, samples, rate=16000, width=2, channels=1):
    """samples: float in [-1, 1], shape [N] or [N, channels]."""
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    x = np.repeat(x, channels, axis=1) if x.shape[1] == 1 and channels > 1 else x
    if width == 1:
        raw = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        v = np.round(x * (2**23 - 1)).astype(np.int32).reshape(-1)
        raw = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], axis=1).astype(np.uint8).tobytes()
    else:
        raw = np.round(x * (2 ** (8 * width - 1) - 1)).astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def wav_header(rate: int, frames: int, payload: bytes = b"") -> bytes:
    """A 16-bit mono WAV header that claims `frames` samples, followed by `payload` (possibly much shorter)."""
    data = frames * 2
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data) + payload


def tone(seconds, rate, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * freq * t)


def test_pcm_decoding_and_mono(tmp_path):
    x = tone(0.2, 16000)
    for width in (1, 2, 3, 4):
        write_wav(tmp_path / f"w{width}.wav", x, width=width)
        got = load_audio(f"w{width}.wav", tmp_path)
        assert got.dtype == np.float32 and got.shape == x.shape
        assert np.abs(got - x).max() < 2.0 / 2 ** (8 * width - 1) + 1e-6, width
    stereo = np.stack([x, -x * 0.5], axis=1)
    write_wav(tmp_path / "st.wav", stereo, channels=2)
    assert np.allclose(load_audio("st.wav", tmp_path), (x - 0.5 * x) / 2, atol=1e-4)


def test_resampled_to_the_feature_extractor_rate(tmp_path):
    x = tone(0.5, 22050)
    write_wav(tmp_path / "a.wav", x, rate=22050)
    got = load_audio("a.wav", tmp_path, sampling_rate=16000)
    assert got.shape == (8000,)
    q = np.round(x * 32767) / 32768  # what the 16-bit file holds
    g = gcd(22050, 16000)
    assert np.allclose(got, resample_poly(q, 16000 // g, 22050 // g), atol=1e-5)
    # at its own rate it is untouched
    assert load_audio("a.wav", tmp_path, sampling_rate=22050).shape == (11025,)


@pytest.mark.parametrize(
    "setup, ref, message",
    [
        (lambda d: None, "../outside.wav", "escapes the data folder"),
        (lambda d: None, "/etc/passwd", "escapes the data folder"),
        (lambda d: None, "missing.wav", "file not found"),
        (lambda d: None, "https://example.com/a.wav", "URLs are not supported"),
        (lambda d: (d / "t.wav").write_text("this is not audio"), "t.wav", "corrupt or not a PCM WAV"),
        (lambda d: (d / "p.wav").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)), "p.wav", "corrupt or not a PCM WAV"),
        (lambda d: (d / "zero.wav").write_bytes(wav_header(16000, 0)), "zero.wav", "empty clip (0 samples)"),
        # 10 hours claimed by the header: refused before a single sample is read (the file is 44 bytes)
        (lambda d: (d / "long.wav").write_bytes(wav_header(16000, 16000 * 36000)), "long.wav", "too long: 36000.0 s"),
        (lambda d: (d / "short.wav").write_bytes(wav_header(16000, 100, bytes(200))), "short.wav", "too short"),
        (lambda d: (d / "cut.wav").write_bytes(wav_header(16000, 16000, bytes(1000))), "cut.wav", "truncated: the header says 16000 samples, the file holds 500"),
        (lambda d: (d / "slow.wav").write_bytes(wav_header(50, 100, bytes(200))), "slow.wav", "implausible sampling rate 50 Hz"),
    ],
)
def test_bad_audio_is_one_clear_line(tmp_path, setup, ref, message):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "outside.wav").write_bytes(b"x")
    setup(data)
    with pytest.raises(AudioError) as e:
        load_audio(ref, data)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("audio ")


def test_data_uri(tmp_path):
    write_wav(tmp_path / "a.wav", tone(0.1, 16000))
    uri = "data:audio/wav;base64," + base64.b64encode((tmp_path / "a.wav").read_bytes()).decode()
    assert np.allclose(load_audio(uri, tmp_path), load_audio("a.wav", tmp_path))
    with pytest.raises(AudioError, match="bad base64"):
        load_audio("data:audio/wav;base64,!!!", tmp_path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_records_with_audio(tmp_path):
    write_wav(tmp_path / "ok.wav", tone(0.3, 16000))
    (tmp_path / "bad.wav").write_text("not audio")
    (tmp_path / "img.png").write_bytes(b"")  # only checked to exist here
    f = _jsonl(tmp_path / "c.jsonl", [
        {"audio": "ok.wav", "prompt": "Transcribe the audio.", "response": "a red circle"},
        {"audio": "bad.wav", "prompt": "Transcribe the audio.", "response": "x"},
        {"audio": "../ok.wav", "prompt": "Transcribe the audio.", "response": "x"},
        {"prompt": "Nothing to see or hear.", "response": "x"},
        {"audio": 3, "prompt": "p", "response": "x"},
    ])
    records, errors = read_records(f, on_error="skip")
    assert [r.line for r in records] == [1, 2, 4]  # bad.wav exists: only decoding finds it; line 4 is a text-only chat
    assert records[0].audio_refs() == [("audio", "ok.wav")] and records[0].image_list == []
    by_line = {e.line: e for e in errors}
    assert by_line[3].field == "audio" and "escapes the data folder" in str(by_line[3])
    assert 4 not in by_line and records[2].audio_refs() == [] and records[2].image_list == []
    assert by_line[5].field == "audio" and "expected a string" in by_line[5].message
    # check_file decodes: the corrupt clip is named with its file, line and field
    found = [str(e) for e in check_file(f, decode_images=True)]
    assert any(s.startswith(f"{f}:2: audio: 'bad.wav': corrupt or not a PCM WAV") for s in found), found
    # load_chat decodes the clips too: fail names the line, skip keeps the good one and counts the bad
    two = _jsonl(tmp_path / "two.jsonl", [json.loads(line) for line in f.read_text().splitlines()[:2]])
    with pytest.raises(RecordError, match=r"two.jsonl:2: audio: audio 'bad.wav': corrupt"):
        load_chat(two, "response", "fail", None, ImageCache(), log=lambda *_: None)
    cache = ImageCache()
    kept, errs = load_chat(f, "response", "skip", None, cache, log=lambda *_: None)
    assert [r.line for r in kept] == [1, 4] and any(e.line == 2 and e.field == "audio" for e in errs)
    clip = cache.audio(kept[0])[0]
    assert clip.shape == (4800,) and cache.audio(kept[0])[0] is clip  # cached
