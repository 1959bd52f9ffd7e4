"""Schedules over progress and the warm-up + cosine learning-rate multiplier."""

import math

import pytest

from mmdistill.engine.schedules import Schedule, make_schedule, warmup_cosine


def test_constant_linear_cosine_values():
    assert make_schedule(3)(0.7) == 3.0
    assert make_schedule({"kind": "constant", "value": 2.5})(0.1) == 2.5
    lin = make_schedule({"kind": "linear", "start": 8, "end": 2})
    assert [lin(p) for p in (0.0, 0.5, 1.0)] == [8.0, 5.0, 2.0]
    cos = make_schedule({"kind": "cosine", "start": 1.0, "end": 0.0})
    assert cos(0.0) == pytest.approx(1.0) and cos(0.5) == pytest.approx(0.5) and cos(1.0) == pytest.approx(0.0)
    assert cos(0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    # progress is clamped to [0, 1]
    assert lin(-1.0) == 8.0 and lin(2.0) == 2.0
    assert make_schedule(lin) is lin and isinstance(lin, Schedule)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "exp", "start": 1, "end": 0}, "kind"),
        ({"start": 1, "end": 0}, "kind"),
        ({"kind": "linear", "start": 1}, "missing end"),
        ({"kind": "linear", "start": 1, "end": 0, "steps": 3}, "unknown steps"),
        ({"kind": "constant", "start": 1}, "value"),
        ({"kind": "linear", "start": "a", "end": 0}, "number"),
        ("fast", "number or a dict"),
        (True, "number or a dict"),
        (float("nan"), "finite"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(spec)


def test_warmup_cosine():
    f = lambda step: warmup_cosine(step, 10, 110, 0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5)  # (step + 1) / warmup: step 0 already moves
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up
    assert warmup_cosine(0, 0, 10) == pytest.approx(1.0)
