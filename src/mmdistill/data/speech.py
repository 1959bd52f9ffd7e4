"""Spoken ShapesWorld: each image's caption and one of its questions read aloud by espeak-ng.

``mmdistill data synth DIR --audio`` (:func:`mmdistill.data.synth.generate` with ``audio=True``)
adds, per split, ``audio/{split}/{index:06d}-caption.wav`` and ``-question.wav`` and two kinds of
chat records:

* transcription: ``{"audio": ".../000123-caption.wav", "prompt": "Transcribe the audio.",
  "response": <the caption>, "skills": ["asr"]}``
* spoken-question VQA: ``{"image": ..., "audio": ".../000123-question.wav", "prompt": "Answer the
  spoken question about the image.", "response": <the answer>, "skills": ["spoken_<skill>"]}``

written to ``speech_{split}.jsonl``; ``omni_{split}.jsonl`` holds the image chat records of
``chat_{split}.jsonl`` and these together, image by image (what the Omni demo trains and evaluates on).

Each clip picks a voice (several English accents, male and female variants), a speed (words per
minute) and a pitch from ``(seed, index)``, then gets a little white noise (SNR 20-35 dB, numpy) and
is resampled to 16 kHz mono 16-bit PCM (Whisper's rate). espeak-ng is a Debian / Ubuntu package
(``apt-get install espeak-ng``; macOS: ``brew install espeak-ng``); without it :class:`SpeechUnavailable`
says so, and ``generate`` writes the rest of ShapesWorld and reports the spoken part as skipped.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

__all__ = ["SpeechUnavailable", "espeak_path", "speak", "VOICES", "TRANSCRIBE_PROMPT", "SPOKEN_QUESTION_PROMPT", "ASR_SKILL", "SPOKEN_PREFIX", "spoken_rows"]

VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb+f2", "en-gb-scotland+m3", "en-029+f4", "en-gb-x-rp+m1")
SPEEDS = (150, 170, 190, 210)  # words per minute (espeak-ng -s; espeak's default is 175)
PITCHES = (35, 50, 65)  # espeak-ng -p (0-99)
SNR_DB = (20.0, 35.0)
SAMPLING_RATE = 16_000
TRANSCRIBE_PROMPT = "Transcribe the audio."
SPOKEN_QUESTION_PROMPT = "Answer the spoken question about the image."
ASR_SKILL = "asr"
SPOKEN_PREFIX = "spoken_"
INSTALL_HINT = "install it with `apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"


class SpeechUnavailable(RuntimeError):
    """espeak-ng is missing or failed; one line, with how to install it."""


def espeak_path() -> str:
    """The espeak-ng executable (``$MMDISTILL_ESPEAK`` or ``espeak-ng`` on PATH); SpeechUnavailable if none."""
    exe = os.environ.get("MMDISTILL_ESPEAK") or shutil.which("espeak-ng")
    if not exe:
        raise SpeechUnavailable(f"espeak-ng is not installed (no espeak-ng on PATH); {INSTALL_HINT}")
    return exe


def speak(text: str, *, voice: str = "en-us", speed: int = 160, pitch: int = 50, exe: str | None = None) -> tuple[np.ndarray, int]:
    """``text`` read by espeak-ng: (mono float32 samples in [-1, 1], sampling rate)."""
    exe = exe or espeak_path()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "clip.wav"
        try:
            res = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), "--", text], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SpeechUnavailable(f"espeak-ng failed to run ({e}); {INSTALL_HINT}") from None
        if res.returncode != 0 or not out.is_file():
            msg = res.stderr.decode(errors="replace").strip().splitlines()
            raise SpeechUnavailable(f"espeak-ng failed (exit {res.returncode}: {msg[0] if msg else 'no output'}) for voice {voice!r}")
        with wave.open(str(out), "rb") as w:
            rate, width = w.getframerate(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
    if width != 2:
        raise SpeechUnavailable(f"espeak-ng wrote {8 * width}-bit samples; expected 16-bit")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0, rate


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _clip_rng(seed: int, index: int, kind: str) -> random.Random:
    return random.Random(f"shapesworld-speech/{seed}/{index}/{kind}")


def render_clip(text: str, path: Path, seed: int, index: int, kind: str, exe: str) -> dict:
    """Speak `text` with a voice / speed / pitch / noise drawn from (seed, index, kind) and write 16 kHz PCM to `path`."""
    from math import gcd

    from scipy.signal import resample_poly

    rng = _clip_rng(seed, index, kind)
    voice, speed, pitch = rng.choice(VOICES), rng.choice(SPEEDS), rng.choice(PITCHES)
    snr = rng.uniform(*SNR_DB)
    samples, rate = speak(text, voice=voice, speed=speed, pitch=pitch, exe=exe)
    power = float(np.mean(samples**2)) if samples.size else 0.0
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(samples.size).astype(np.float32)
    samples = samples + noise * np.sqrt(power / 10 ** (snr / 10))
    if rate != SAMPLING_RATE:
        g = gcd(rate, SAMPLING_RATE)
        samples = resample_poly(samples, SAMPLING_RATE // g, rate // g)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > 0.99:
        samples = samples * (0.99 / peak)
    _write_wav(path, samples, SAMPLING_RATE)
    return {"voice": voice, "speed": speed, "pitch": pitch, "snr_db": round(snr, 1), "seconds": round(samples.size / SAMPLING_RATE, 2)}


def _render_chunk(job: tuple[str, str, list[tuple[str, str, int, str]], int]) -> list[dict]:
    out_dir, exe, items, seed = job
    return [render_clip(text, Path(out_dir) / rel, seed, index, kind, exe) for rel, text, index, kind in items]


def spoken_rows(seed: int, index: int, image: str, split: str, scene) -> tuple[list[dict], list[tuple[str, str, int, str]]]:
    """The transcription and spoken-question records of one image, and the clips they need: (rel path, text, index, kind)."""
    from .synth import caption, questions

    rng = _clip_rng(seed, index, "question-choice")
    spoken_q = rng.choice([q for q in questions(scene) if q["skill"] != "caption"])
    cap = caption(scene)
    cap_path, q_path = f"audio/{split}/{index:06d}-caption.wav", f"audio/{split}/{index:06d}-question.wav"
    rows = [
        {"audio": cap_path, "prompt": TRANSCRIBE_PROMPT, "response": cap, "difficulty": scene.difficulty, "skills": [ASR_SKILL], "id": f"{index:06d}-asr"},
        {
            "image": image, "audio": q_path, "prompt": SPOKEN_QUESTION_PROMPT, "response": spoken_q["response"], "difficulty": scene.difficulty,
            "skills": [SPOKEN_PREFIX + spoken_q["skill"]], "id": f"{index:06d}-spoken", "meta": {"question": spoken_q["prompt"]},
        },
    ]
    return rows, [(cap_path, cap, index, "caption"), (q_path, spoken_q["prompt"], index, "question")]


def render_all(out: Path, clips: list[tuple[str, str, int, str]], seed: int, workers: int) -> list[dict]:
    """Speak every clip (in `workers` processes); returns each clip's voice / speed / pitch / noise / length, in order."""
    exe = espeak_path()
    for sub in {Path(rel).parent for rel, *_ in clips}:
        (out / sub).mkdir(parents=True, exist_ok=True)
    chunk = max(8, -(-len(clips) // (max(1, workers) * 8)))
    jobs = [(str(out), exe, clips[k : k + chunk], seed) for k in range(0, len(clips), chunk)]
    if workers <= 1 or len(jobs) <= 1:
        return [info for job in jobs for info in _render_chunk(job)]
    method = "fork" if sys.platform == "linux" else "spawn"
    with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
        return [info for part in pool.map(_render_chunk, jobs) for info in part]
