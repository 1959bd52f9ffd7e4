"""The spoken ShapesWorld (synth --audio): real espeak-ng clips (CI installs the Debian package; this test fails
loudly without it rather than skipping), records that validate and decode, determinism, and the clear message
plus the rest of ShapesWorld when espeak-ng is absent."""

import hashlib
import json
import shutil

import pytest

from mmdistill.data import speech
from mmdistill.data.audio import load_audio
from mmdistill.data.records import check_file, read_records
from mmdistill.data.synth import caption, generate, scene_for_index


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "audio").rglob("*.wav"))}


def test_spoken_shapesworld(tmp_path):
    assert shutil.which("espeak-ng"), "espeak-ng is not installed: `apt-get install espeak-ng` (.ci/run installs it)"
    out = tmp_path / "sw"
    summary = generate(out, n=10, seed=3, workers=2, audio=True)
    audio = summary["audio"]
    assert "skipped" not in audio and audio["clips"] == 20 and audio["records"] == 20 and summary["counts"]["speech"] == 20
    assert len(audio["voices"]) >= 3  # several voices over 20 clips
    recs, _ = read_records(out / "speech_train.jsonl")
    asr = [r for r in recs if r.skills == ["asr"]]
    spoken = [r for r in recs if r.skills[0].startswith("spoken_")]
    assert len(asr) == len(spoken) == 8
    first = int(asr[0].id.split("-")[0])
    assert asr[0].response == caption(scene_for_index(3, first)) and asr[0].image is None
    assert all(r.image is not None and r.audio.endswith("-question.wav") for r in spoken)
    for r in recs:
        clip = load_audio(r.audio, r.base_dir)
        words = len((r.response if r in asr else r.meta["question"]).split())
        assert 0.15 * words < clip.size / 16000 < 1.0 * words + 1.5  # speech of about the right length
        assert 0.01 < float((clip**2).mean()) ** 0.5 < 0.9  # not silent, not clipped noise
    for split in ("train", "val", "test"):
        assert check_file(out / f"omni_{split}.jsonl", decode_images=True) == []
    chat_lines = (out / "chat_train.jsonl").read_text().splitlines()
    omni_lines = (out / "omni_train.jsonl").read_text().splitlines()
    speech_lines = (out / "speech_train.jsonl").read_text().splitlines()
    assert sorted(omni_lines) == sorted(chat_lines + speech_lines)
    ids = [json.loads(line)["id"].split("-")[0] for line in omni_lines]
    assert ids == sorted(ids)  # image by image: each image's chat records, then its speech records
    from mmdistill.api import data_stats

    info = data_stats(out / "omni_val.jsonl", train=out / "omni_train.jsonl")  # each clip is its own content: no false leakage
    assert info["stats"]["with_audio"] == 2 and info["stats"]["shared_with_train"] == 0
    # deterministic: the same seed speaks the same clips with the same noise
    again = generate(tmp_path / "again", n=10, seed=3, workers=1, audio=True)
    assert again["audio"]["voices"] == audio["voices"] and _digest(out) == _digest(tmp_path / "again")


def test_without_espeak_the_rest_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("MMDISTILL_ESPEAK", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    logged = []
    summary = generate(tmp_path / "sw", n=10, seed=0, workers=1, audio=True, log=logged.append)
    assert "espeak-ng is not installed" in summary["audio"]["skipped"] and "apt-get install espeak-ng" in summary["audio"]["skipped"]
    assert len(logged) == 1 and "skipped the spoken ShapesWorld" in logged[0] and "the rest of ShapesWorld was written" in logged[0]
    assert (tmp_path / "sw" / "chat_train.jsonl").is_file() and (tmp_path / "sw" / "pairs_test.jsonl").is_file()
    assert not list((tmp_path / "sw").glob("speech_*.jsonl")) and not (tmp_path / "sw" / "audio").exists()
    assert json.loads((tmp_path / "sw" / "summary.json").read_text())["audio"]["skipped"]
    with pytest.raises(speech.SpeechUnavailable, match="apt-get install espeak-ng"):
        speech.speak("hello")
