"""Speed, size and memory measurements for evaluation reports.

These helpers measure; they do not decide what to run. Wrapping the timed call in
``torch.inference_mode()``, moving inputs to the device and choosing batch sizes are the
caller's business.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "count_parameters",
    "human_bytes",
    "measure_latency",
    "peak_memory",
    "reset_peak_memory",
    "size_on_disk",
]

# Stop adding repeats past this count even when ``min_time_s`` has not been reached,
# so a near-instant ``fn`` cannot grow the sample list without bound.
MAX_REPEATS = 100_000


def _synchronize() -> None:
    """Wait for queued CUDA work, so a timer measures the work and not its launch.

    Only when CUDA is already initialised: timing a CPU model must not start a CUDA context.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float | None = None,
) -> dict[str, float | int]:
    """Time ``fn()`` with ``time.perf_counter``.

    Calls ``fn`` ``warmup`` times untimed, then times at least ``repeats`` calls, one by
    one; with ``min_time_s`` it keeps timing calls until their total reaches
    ``min_time_s`` seconds (capped at ``MAX_REPEATS`` calls). CUDA is synchronised before
    and after every timed call when it is in use.

    Returns:
        ``{"median_ms", "mean_ms", "p90_ms", "min_ms": float, "n": number of timed calls}``.
        ``p90_ms`` uses linear interpolation between samples.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        fn()
    _synchronize()

    samples: list[float] = []  # seconds
    total = 0.0
    while len(samples) < repeats or (min_time_s is not None and total < min_time_s and len(samples) < MAX_REPEATS):
        start = time.perf_counter()
        fn()
        _synchronize()
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        total += elapsed

    ms = sorted(s * 1000.0 for s in samples)
    # linear-interpolated 90th percentile (numpy's default method)
    pos = 0.9 * (len(ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ms) - 1)
    p90 = ms[lo] + (ms[hi] - ms[lo]) * (pos - lo)
    return {
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "p90_ms": p90,
        "min_ms": ms[0],
        "n": len(ms),
    }


def beside(out_path: str | os.PathLike[str], name: str) -> Path:
    """The file an evaluation writes next to its result: ``name`` beside ``eval.json``, ``<stem>.<name>`` beside any
    other result file (``eval-full.json`` -> ``eval-full.scores.jsonl``), so a re-evaluation keeps the first one's."""
    out_path = Path(out_path)
    return out_path.with_name(name if out_path.name == "eval.json" else f"{out_path.stem}.{name}")


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``model``; shared (tied) parameters count once.

    With ``trainable_only``, only parameters with ``requires_grad`` (e.g. LoRA adapters).
    Quantised weights count their logical elements: bitsandbytes' 4-bit weights, packed two a byte, by the shape
    their quant state records (torchao's tensor subclasses report the logical shape themselves).
    """
    def numel(p) -> int:
        state = getattr(p, "quant_state", None)
        shape = getattr(state, "shape", None)
        return int(torch.Size(shape).numel()) if shape is not None else p.numel()

    return sum(numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def size_on_disk(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a file, or the sum of all files under a folder (recursively).

    Symlinked files (e.g. a Hugging Face cache snapshot) count the size of their target.
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_bytes(n: int | float) -> str:
    """Format a byte count with binary units: ``512 B``, ``1.5 KiB``, ``2.0 GiB``."""
    if n < 0:
        return "-" + human_bytes(-n)
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024.0
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _is_cuda(device: torch.device | str | None) -> bool:
    if device is None:
        return torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.device(device).type == "cuda"


def peak_memory(device: torch.device | str | None = None) -> int:
    """Peak memory in bytes.

    On CUDA (``device`` a CUDA device, or ``None`` while CUDA is in use): the peak of
    tensor memory allocated by torch on that device, ``torch.cuda.max_memory_allocated``,
    since the start or the last ``reset_peak_memory``.

    On CPU: the process's maximum resident set size (``resource.getrusage``). This is
    process-wide (the Python interpreter, imported libraries, data loading and every model
    the process ever held) and can only grow: it cannot be reset, so measure one model per
    process when comparing CPU memory.
    """
    if _is_cuda(device):
        return int(torch.cuda.max_memory_allocated(device))
    import resource  # Unix only, so imported where needed

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return int(max_rss) if sys.platform == "darwin" else int(max_rss) * 1024


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Reset the CUDA peak counter before a measurement; a no-op on CPU (see ``peak_memory``)."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
