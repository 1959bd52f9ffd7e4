"""Safe audio loading for chat records (the ``audio`` field).

An audio reference is a path relative to the JSONL file's folder, or a
``data:audio/wav;base64,<payload>`` URI, exactly like an image reference (the same path checks:
no ``..`` / absolute paths / symlinks out of the data folder, no URLs). The file must be a PCM WAV
(8, 16, 24 or 32 bit, any number of channels, averaged to mono): Python's ``wave`` module reads
it, so no system library is needed. Convert other formats first, e.g.
``ffmpeg -i clip.mp3 -ar 16000 -ac 1 clip.wav``.

Loading refuses, with a one-line :class:`AudioError`: files that are not WAV or are corrupt or
truncated, clips with no samples or shorter than ``min_seconds``, clips longer than
``max_seconds`` (checked from the header before any sample is read, so a 10-hour file costs
nothing), and implausible sampling rates. A clip recorded at another rate than the feature
extractor's (Whisper's 16 kHz) is resampled with a polyphase filter (``scipy.signal.resample_poly``).
"""

from __future__ import annotations

import io
import re
import struct
import wave
from math import gcd
from pathlib import Path

import numpy as np

from .images import _one_line, data_uri_bytes, resolve_media_path, short_ref

__all__ = ["AudioError", "load_audio", "resolve_audio_path", "DEFAULT_MAX_SECONDS", "DEFAULT_MIN_SECONDS", "DEFAULT_SAMPLING_RATE"]

DEFAULT_SAMPLING_RATE = 16_000  # Whisper's feature extractor (Qwen3-Omni's audio tower)
DEFAULT_MAX_SECONDS = 600.0  # 10 minutes: far longer than any training clip, far shorter than an absurd one
DEFAULT_MIN_SECONDS = 0.05  # under 50 ms the feature extractor makes fewer than 5 frames
_RATE_RANGE = (1_000, 384_000)

_DATA_URI = re.compile(r"^data:(audio/[\w.+-]+)((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.IGNORECASE)


class AudioError(ValueError):
    """An audio reference that cannot be used. ``str()`` is one line: ``audio 'x.wav': file not found``."""

    def __init__(self, ref: str, reason: str):
        super().__init__(ref, reason)  # args kept so the error pickles across workers
        self.ref = ref
        self.reason = _one_line(reason)

    def __str__(self) -> str:
        return f"audio {short_ref(self.ref)!r}: {self.reason}"


def resolve_audio_path(ref: str, base_dir: str | Path) -> Path | None:
    """Resolve ``ref`` to a file inside ``base_dir`` without reading it (None for a data URI); raises AudioError."""
    return resolve_media_path(ref, base_dir, AudioError, _DATA_URI, "audio")


def load_audio(
    ref: str,
    base_dir: str | Path,
    *,
    sampling_rate: int = DEFAULT_SAMPLING_RATE,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    min_seconds: float = DEFAULT_MIN_SECONDS,
) -> np.ndarray:
    """Load ``ref`` as mono float32 samples in [-1, 1] at ``sampling_rate`` Hz ([N]); raises AudioError (one line)."""
    path = resolve_audio_path(ref, base_dir)
    if path is None:
        return _decode(io.BytesIO(data_uri_bytes(ref, _DATA_URI, AudioError)), ref, sampling_rate, max_seconds, min_seconds)
    try:
        with path.open("rb") as f:
            return _decode(f, ref, sampling_rate, max_seconds, min_seconds)
    except OSError as e:  # permission denied, I/O error
        raise AudioError(ref, f"cannot read file ({e.strerror or e})") from None


def _decode(fp, ref: str, sampling_rate: int, max_seconds: float, min_seconds: float) -> np.ndarray:
    try:
        with wave.open(fp, "rb") as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            if not _RATE_RANGE[0] <= rate <= _RATE_RANGE[1]:
                raise AudioError(ref, f"implausible sampling rate {rate} Hz (expected {_RATE_RANGE[0]}-{_RATE_RANGE[1]})")
            if channels < 1 or width not in (1, 2, 3, 4):
                raise AudioError(ref, f"unsupported WAV layout ({channels} channels, {8 * width}-bit samples)")
            seconds = frames / rate
            if frames == 0:
                raise AudioError(ref, "empty clip (0 samples)")
            if seconds > max_seconds:
                raise AudioError(ref, f"too long: {seconds:.1f} s > max {max_seconds:g} s (split the clip)")
            if seconds < min_seconds:
                raise AudioError(ref, f"too short: {seconds:.3f} s < min {min_seconds:g} s")
            raw = w.readframes(frames)
    except AudioError:
        raise
    except (wave.Error, EOFError) as e:
        raise AudioError(ref, f"corrupt or not a PCM WAV file ({e or type(e).__name__}); convert it, e.g. ffmpeg -i IN -ar 16000 -ac 1 OUT.wav") from None
    except struct.error as e:  # a malformed header chunk
        raise AudioError(ref, f"corrupt WAV header ({e})") from None
    got = len(raw) // (width * channels)
    if got < frames:
        raise AudioError(ref, f"truncated: the header says {frames} samples, the file holds {got}")
    samples = _pcm_to_float(raw[: frames * width * channels], width).reshape(frames, channels).mean(axis=1)
    if not np.isfinite(samples).all():  # cannot happen for PCM; kept as the contract
        raise AudioError(ref, "non-finite samples")
    if rate != sampling_rate:
        from scipy.signal import resample_poly

        g = gcd(rate, sampling_rate)
        samples = resample_poly(samples, sampling_rate // g, rate // g)
    return samples.astype(np.float32)


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    """Interleaved little-endian PCM bytes -> float64 in [-1, 1] (8-bit WAV is unsigned, the rest signed)."""
    if width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float64) / float(1 << 23)
    dtype = {2: "<i2", 4: "<i4"}[width]
    return np.frombuffer(raw, dtype=dtype).astype(np.float64) / float(1 << (8 * width - 1))
