"""Schedules over training progress.

Two kinds of schedule live here:

- ``make_schedule(spec)``: a value (a loss weight multiplier, a temperature) as a function of
  training progress ``p`` in [0, 1]. ``spec`` is a number (constant) or a dict::

      {"kind": "constant", "value": v}
      {"kind": "linear", "start": a, "end": b}    v(p) = a + (b - a) * p
      {"kind": "cosine", "start": a, "end": b}    v(p) = b + (a - b) * (1 + cos(pi * p)) / 2

  Progress outside [0, 1] is clamped.
- ``warmup_cosine(step, warmup, total, min_ratio)``: the training loop's learning-rate multiplier
  for ``torch.optim.lr_scheduler.LambdaLR`` (linear warm-up from 0, then cosine to ``min_ratio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCHEDULE_KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """A value that moves from ``start`` to ``end`` as progress goes from 0 to 1."""

    kind: str
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind {self.kind!r} is not one of {', '.join(SCHEDULE_KINDS)}")

    def __call__(self, progress: float) -> float:
        p = min(max(float(progress), 0.0), 1.0)
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * p
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))


def _number(spec: dict, key: str) -> float:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"schedule field {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"schedule field {key!r} must be finite, got {value!r}")
    return float(value)


def make_schedule(spec: float | int | dict[str, Any] | Schedule) -> Schedule:
    """Turn a number or a ``{"kind", ...}`` dict into a ``Schedule`` (a callable of progress).

    >>> make_schedule(2.0)(0.5)
    2.0
    >>> make_schedule({"kind": "linear", "start": 8, "end": 2})(0.5)
    5.0

    Raises ``ValueError`` naming the problem for an unknown kind, missing or extra fields,
    or a non-numeric value.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = float(spec)
        if not math.isfinite(value):
            raise ValueError(f"schedule value must be finite, got {spec!r}")
        return Schedule("constant", value, value)
    if not isinstance(spec, dict):
        raise ValueError(
            f"a schedule is a number or a dict like {{'kind': 'linear', 'start': 1.0, 'end': 0.0}}, "
            f"got {spec!r}"
        )
    kind = spec.get("kind")
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind {kind!r} is not one of {', '.join(SCHEDULE_KINDS)} (spec: {spec!r})")
    needed = {"kind", "value"} if kind == "constant" else {"kind", "start", "end"}
    missing = needed - spec.keys()
    extra = spec.keys() - needed
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(sorted(missing))}")
        if extra:
            problems.append(f"unknown {', '.join(sorted(map(str, extra)))}")
        raise ValueError(
            f"{kind} schedule takes exactly {', '.join(sorted(needed))}: {'; '.join(problems)} (spec: {spec!r})"
        )
    if kind == "constant":
        value = _number(spec, "value")
        return Schedule("constant", value, value)
    return Schedule(kind, _number(spec, "start"), _number(spec, "end"))


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warm-up to 1 over `warmup`
    steps — ``(step + 1) / warmup``, so the first step already moves — then cosine decay to
    `min_ratio` at `total`; steps past `total` stay at `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    q = (step - warmup) / max(1, total - warmup)
    q = min(max(q, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))
