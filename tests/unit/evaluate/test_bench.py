"""Latency, size and memory helpers: behaviour only, never wall-clock thresholds."""

from pathlib import Path

import pytest
import torch
from torch import nn

from mmdistill.evaluate.bench import count_parameters, human_bytes, measure_latency, peak_memory, size_on_disk


def test_measure_latency_counts_calls_and_returns_positive_times():
    calls = []
    out = measure_latency(lambda: calls.append(sum(range(1000))), warmup=2, repeats=5)
    assert out["n"] == 5
    assert len(calls) == 7  # warmup calls are not timed
    assert set(out) == {"median_ms", "mean_ms", "p90_ms", "min_ms", "n"}
    assert 0 < out["min_ms"] <= out["median_ms"] <= out["p90_ms"]
    assert out["mean_ms"] > 0


def test_measure_latency_min_time_adds_repeats():
    out = measure_latency(lambda: torch.ones(10).sum(), warmup=0, repeats=1, min_time_s=0.005)
    assert out["n"] >= 1
    assert out["mean_ms"] * out["n"] >= 5.0  # kept going until 5 ms had been timed


def test_measure_latency_rejects_bad_arguments():
    with pytest.raises(ValueError):
        measure_latency(lambda: None, repeats=0)


def test_count_parameters():
    assert count_parameters(nn.Linear(3, 4)) == 3 * 4 + 4
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 16 + 8
    assert count_parameters(model, trainable_only=True) == 8


def test_count_parameters_counts_tied_weights_once():
    a, b = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    b.weight = a.weight
    assert count_parameters(nn.ModuleList([a, b])) == 40


def test_size_on_disk(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert size_on_disk(tmp_path) == 123
    assert size_on_disk(tmp_path / "a.bin") == 100
    with pytest.raises(FileNotFoundError, match="nope"):
        size_on_disk(tmp_path / "nope")


@pytest.mark.parametrize(
    "n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 2**20, "5.0 MiB"), (3 * 2**30, "3.0 GiB")]
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_peak_memory_is_positive():
    assert peak_memory("cpu") > 1024 * 1024  # a Python process with torch holds more than 1 MiB
    assert peak_memory() > 0


def test_files_written_beside_a_result_keep_apart():
    from mmdistill.evaluate.bench import beside

    assert beside("run/eval.json", "scores.jsonl") == Path("run/scores.jsonl")  # what reports and rank_agreement read
    assert beside("run/eval-1a2b3c4d.json", "scores.jsonl") == Path("run/eval-1a2b3c4d.scores.jsonl")
    assert beside(Path("run/eval-full.json"), "answers.jsonl") == Path("run/eval-full.answers.jsonl")
