"""`mmdistill export` and `mmdistill serve` as a user runs them: export a tiny reranker with int8 and held-out
records, serve the export on loopback with an API key, call it, stop it."""

import functools
import json
import signal
import subprocess
import sys

import httpx

import helpers
from helpers import ENV, free_port, wait_until_served
from mmdistill.models import reranker as rm

TEXTS = [f"a {c} {s} at the {p}" for c in ("red", "blue", "green") for s in ("circle", "square") for p in ("top", "left")] + [rm.SYSTEM_PROMPT]


mmd = functools.partial(helpers.mmd, check=False)  # each test reads the exit status itself


def test_export_then_serve_the_export(tmp_path):
    rm.build_tiny_reranker(tmp_path / "model", TEXTS, kind="seq_cls", preset="vlm-nano")
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps({"query": {"text": TEXTS[i]}, "documents": [{"text": TEXTS[i + 1]}, {"text": TEXTS[i + 2]}], "labels": [1, 0]}) for i in range(4)) + "\n")
    p = mmd("export", tmp_path / "model", "--format", "onnx", "--out", tmp_path / "onnx", "--int8", "--data", data)
    assert p.returncode == 0, p.stderr
    assert "reranker.onnx, reranker.int8.onnx + manifest.json" in p.stdout
    assert "fp32: score_max_abs_diff=" in p.stdout and "ndcg@10: eager=" in p.stdout and "int8:" in p.stdout
    # the same folder again is refused without --overwrite
    again = mmd("export", tmp_path / "model", "--out", tmp_path / "onnx")
    assert again.returncode == 2 and "--overwrite" in again.stderr

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mmdistill.cli", "serve", str(tmp_path / "onnx"), "--port", str(port), "--api-key", "k", "--name", "rr", "--threads", "1"],
                              env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_served(server, url + "/health", tmp_path / "server.log", within=180, request_timeout=1, message="server did not start")
        assert httpx.get(url + "/health").json() == {"status": "ok", "model": "rr", "family": "reranker", "backend": "onnx"}
        body = {"model": "rr", "query": "a red circle", "documents": ["a red circle at the top", "a blue square"], "top_n": 1}
        assert httpx.post(url + "/v1/rerank", json=body).status_code == 401
        r = httpx.post(url + "/v1/rerank", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and len(r.json()["results"]) == 1
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        log.close()
    assert "serving" in (tmp_path / "server.log").read_text()


def test_serve_with_the_teacher_beside_it(tmp_path):
    """`mmdistill serve STUDENT --teacher TEACHER`: both in /v1/models, each request answered by the model it names."""
    rm.build_tiny_reranker(tmp_path / "student" / "model", TEXTS, kind="seq_cls", preset="vlm-nano", seed=1)
    rm.build_tiny_reranker(tmp_path / "teacher" / "model", TEXTS, kind="seq_cls", preset="vlm-nano", seed=2)
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    # both folders are called "model": the teacher gets a name of its own
    server = subprocess.Popen([sys.executable, "-m", "mmdistill.cli", "serve", str(tmp_path / "student" / "model"), "--teacher", str(tmp_path / "teacher" / "model"),
                               "--port", str(port), "--threads", "1"], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_served(server, url + "/health", tmp_path / "server.log", within=180, request_timeout=1, message="server did not start")
        models = {m["id"]: m["role"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert models == {"model": "student", "model-teacher": "teacher"}
        body = {"query": "a red circle", "documents": ["a red circle at the top", "a blue square", "a green circle at the left"]}
        scores = {}
        for name in models:
            r = httpx.post(url + "/v1/rerank", json={**body, "model": name})
            assert r.status_code == 200 and r.json()["model"] == name, r.text
            scores[name] = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert scores["model"] != scores["model-teacher"]  # two different models answered
        assert httpx.post(url + "/v1/rerank", json=body).json()["model"] == "model"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        log.close()
    assert "beside it as 'model-teacher'" in (tmp_path / "server.log").read_text()
