"""Schedules over training progress.

Two kinds of schedule live here:

- ``make_schedule(spec)``: a value (a loss weight multiplier, a temperature) as a function of
  training progress ``p`` in [0, 1]. ``spec`` is a number (constant) or a dict::

      {"kind": "constant", "value": v}
      {"kind": "linear", "start": a, "end": b}    v(p) = a + (b - a) * p
      {"kind": "cosine", "start": a, "end": b}    v(p) = b + (a - b) * (1 + cos(pi * p)) / 2

  Progress outside [0, 1] is clamped.
- ``warmup_cosine_lambda(warmup_steps, total_steps, min_ratio)``: a learning-rate multiplier
  for ``torch.optim.lr_scheduler.LambdaLR`` (linear warm-up from 0, then cosine to ``min_ratio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

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


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Learning-rate multiplier for ``LambdaLR``: linear warm-up from 0, then cosine decay.

    ``f(step) = step / warmup_steps`` for ``step < warmup_steps`` (as in transformers'
    ``get_cosine_schedule_with_warmup``), then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * q)) / 2`` with
    ``q = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1],
    so steps past ``total_steps`` stay at ``min_ratio``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        q = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        q = min(max(q, 0.0), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))

    return lr_lambda
