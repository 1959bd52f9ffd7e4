"""Drift monitoring: PSI against its formula, KS against scipy, the reference file written by eval,
and /v1/monitor on a served reranker."""

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy.stats import ks_2samp

from mmdistill.serve.app import ServeConfig, create_app
from mmdistill.serve.backends import load_backend
from mmdistill.serve.monitor import DriftMonitor, MonitorError, psi, read_reference


def test_psi_formula_and_zero_for_the_same_distribution():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    live = rng.normal(loc=1.0, size=5000)
    # by hand: deciles of the reference, proportions of each sample per bin
    edges = np.quantile(ref, np.linspace(0, 1, 11)[1:-1])
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=10) / ref.size
    q = np.bincount(np.searchsorted(edges, live, side="right"), minlength=10) / live.size
    assert psi(ref, live) == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-9)
    assert psi(ref, live) > 0.25 > psi(ref, rng.normal(size=5000))


def test_monitor_flags_a_shift_and_clears(caplog):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=2000)
    mon = DriftMonitor(ref, window=400, min_samples=200)
    mon.add(rng.normal(size=150).tolist())
    s = mon.summary()
    assert not s["drift"] and s["live"]["n"] == 150  # too few live scores to call it
    live = rng.normal(size=400)
    mon.add(live.tolist())
    s = mon.summary()
    assert s["ks_statistic"] == pytest.approx(ks_2samp(ref, live).statistic) and not s["drift"]
    with caplog.at_level("WARNING", logger="mmdistill.serve"):
        mon.add((rng.normal(size=400) + 2.0).tolist())  # the window now holds only shifted scores
    assert mon.drift and mon.summary()["psi"] > 0.25 and "drift DETECTED" in caplog.text
    mon.add(rng.normal(size=400).tolist())
    assert not mon.drift


def test_reference_from_eval_files(tmp_path):
    (tmp_path / "scores.jsonl").write_text("\n".join(json.dumps({"id": i, "scores": [i, i + 0.5, -i]}) for i in range(5)) + "\n")
    (tmp_path / "eval.json").write_text("{}")
    assert read_reference(tmp_path / "eval.json").size == 15
    assert read_reference(tmp_path / "scores.jsonl").tolist()[:3] == [0.0, 0.5, 0.0]
    (tmp_path / "bad.jsonl").write_text('{"scores": [1, 2]}\n{"nope": 1}\n')
    with pytest.raises(MonitorError, match="bad.jsonl:2"):
        read_reference(tmp_path / "bad.jsonl")
    with pytest.raises(MonitorError, match="not found"):
        read_reference(tmp_path / "missing.jsonl")


def test_v1_monitor_on_a_served_reranker(folders):
    backend = load_backend(folders / "seq_cls")
    # the reference: the model's own scores on some pairs -> live traffic like it shows no drift
    from mmdistill.serve.backends import PairIn

    docs = [f"a red circle {i} at the top" for i in range(60)]
    ref = backend.score([PairIn("Given a query, retrieve relevant documents.", "a red circle", None, d, None) for d in docs])
    mon = DriftMonitor(np.array(ref), min_samples=10)
    c = TestClient(create_app(backend, ServeConfig(name="m", cache_size=0), mon))
    assert c.get("/v1/monitor").json()["live"]["n"] == 0
    r = c.post("/v1/rerank", json={"query": "a red circle", "documents": docs[:30]})
    assert r.status_code == 200
    s = c.get("/v1/monitor").json()
    assert s["live"]["n"] == 30 and s["psi"] is not None and s["drift"] is False
    assert "mmdistill_score_psi" in c.get("/metrics").text
    plain = TestClient(create_app(backend, ServeConfig(name="m")))
    assert plain.get("/v1/monitor").status_code == 404
