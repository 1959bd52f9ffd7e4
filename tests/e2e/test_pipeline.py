"""`mmdistill pipeline` on a tiny ShapesWorld reranker: prune -> heal -> int8 -> evaluate, resume, bad input."""

import json
import subprocess
import sys

import pytest
import yaml

from helpers import ENV, mmd, shapes_chat
from helpers import write_yaml as write

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    mmd("data", "synth", root / "data", "--n", 100, "--seed", 3)
    data = {"train": str(root / "data/rerank_train.jsonl"), "val": str(root / "data/rerank_test.jsonl"), "max_records": 24, "max_length": 192}
    train = {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "save_every": 2, "log_every": 1, "lr": 0.002}
    teacher = {"family": "reranker", "output_dir": str(root / "teacher"), "data": data, "train": train,
               "student": {"init": "tiny", "preset": "vlm-nano", "overrides": {"text_config.num_hidden_layers": 2}},
               "loss": {"terms": {"ce": {}, "bce": {"options": {"max_label": 3}}}}, "eval": {"max_items": 8}}
    write(root / "teacher.yaml", teacher)
    heal = {**teacher, "output_dir": str(root / "unused"), "teacher": {"model": "set-by-the-pipeline"}, "loss": {"terms": {"margin_mse": {}, "ce": {}}}}
    write(root / "heal.yaml", heal)
    pipe = {
        "family": "reranker",
        "output_dir": str(root / "pipe"),
        "original": {"model": str(root / "teacher/model"), "train": [str(root / "teacher.yaml")]},  # trained by the first run
        "data": {"train": data["train"], "val": data["val"], "max_length": 192},
        "stages": [
            {"name": "prune", "prune": {"layers": {"text": [1]}, "widths": {"text_config.intermediate_size": 32, "vision_config.intermediate_size": 16}, "calibration": 8}},
            {"name": "heal", "distill": {"recipe": str(root / "heal.yaml"), "overrides": {"train.max_steps": 4}}},
            {"name": "int8", "quantize": {"method": "int8-weight"}},
        ],
        "eval": {"max_items": 8, "batch": 4, "repeats": 2},
    }
    write(root / "pipe.yaml", pipe)
    return root


def test_stop_after_a_stage_then_resume_reuses_it(world):
    from transformers import AutoModelForImageTextToText

    p = mmd("pipeline", world / "pipe.yaml", "--until", "prune")
    assert "stopped after stage 'prune'" in p.stdout
    assert (world / "teacher/model/config.json").is_file()  # original.train made the original model first
    assert (world / "pipe/prune/model/config.json").is_file() and not (world / "pipe/heal").exists()
    prune_meta = (world / "pipe/prune/stage.json").read_text()
    mtime = (world / "pipe/prune/model/model.safetensors").stat().st_mtime_ns

    p = mmd("pipeline", world / "pipe.yaml")
    assert "prune: done already" in p.stdout and "== heal" in p.stdout and "== int8" in p.stdout
    assert (world / "pipe/prune/stage.json").read_text() == prune_meta  # not redone
    assert (world / "pipe/prune/model/model.safetensors").stat().st_mtime_ns == mtime

    # every stage's output is a plain folder transformers loads
    t = AutoModelForImageTextToText.from_pretrained(world / "teacher/model")
    pr = AutoModelForImageTextToText.from_pretrained(world / "pipe/prune/model")
    healed = AutoModelForImageTextToText.from_pretrained(world / "pipe/heal/model")
    q = AutoModelForImageTextToText.from_pretrained(world / "pipe/int8/model")
    assert pr.config.text_config.num_hidden_layers == 1 and pr.config.text_config.intermediate_size == 32
    assert sum(x.numel() for x in pr.parameters()) < sum(x.numel() for x in t.parameters())
    a, b = pr.state_dict(), healed.state_dict()
    assert any(not (a[k] == b[k]).all() for k in a)  # healing trained the pruned weights
    assert "quantization_config" in json.loads((world / "pipe/int8/model/config.json").read_text())
    del q

    rep = json.loads((world / "pipe/report/report.json").read_text())
    rows = {r["stage"]: r for r in rep["rows"]}
    assert list(rows) == ["original", "prune", "heal", "int8"]
    assert rows["original"]["retention"] == pytest.approx(100.0) and rows["original"]["size_ratio"] == pytest.approx(100.0)
    for r in rows.values():
        assert r["bs1_ms"] > 0 and r["batch_ms"] > 0 and r["peak_added_bytes"] > 0 and 0 <= r["metrics"]["ndcg@10"] <= 100
        assert r["retention"] == pytest.approx(100 * r["metrics"]["ndcg@10"] / rows["original"]["metrics"]["ndcg@10"])
    assert "top3_overlap" in rows["heal"]["metrics"]  # agreement with the original
    assert rows["int8"]["size_bytes"] < rows["heal"]["size_bytes"] < rows["original"]["size_bytes"]
    assert rows["prune"]["params"] == rows["heal"]["params"] < rows["original"]["params"]
    md = (world / "pipe/report/report.md").read_text()
    assert "| int8 (quantize) |" in md and "tradeoff.png" in md
    assert (world / "pipe/report/tradeoff.png").stat().st_size > 1000

    # a finished pipeline re-run redoes nothing, not even the evaluation
    p = mmd("pipeline", world / "pipe.yaml")
    assert "== " not in p.stdout and "int8: evaluated already" in p.stdout

    # a changed healing redoes heal (and what follows), not prune; --until heal stops before the rest
    stages = yaml.safe_load((world / "pipe.yaml").read_text())["stages"]
    stages[1]["distill"]["overrides"]["train.max_steps"] = 5
    p = mmd("pipeline", world / "pipe.yaml", "stages=" + json.dumps(stages), "--until", "heal")
    assert "prune: done already" in p.stdout and "== heal" in p.stdout and "== int8" not in p.stdout
    assert json.loads((world / "pipe/heal/stage.json").read_text())["details"]["steps"] == 5
    assert (world / "pipe/prune/stage.json").read_text() == prune_meta


def test_bad_pipelines_are_one_clear_line(world, tmp_path):
    base = yaml.safe_load((world / "pipe.yaml").read_text())
    base["output_dir"] = str(tmp_path / "out")
    cases = [
        ({**base, "stages": [{**base["stages"][0], "input": str(tmp_path / "nowhere")}]}, "input " + str(tmp_path / "nowhere") + " is neither an earlier stage nor a model folder"),
        ({**base, "original": {"model": str(tmp_path / "missing")}}, f"original.model {tmp_path / 'missing'}: no model folder there"),
        ({**base, "stages": [{"name": "q", "quantize": {"method": "int3"}}]}, "stages.0.quantize.method"),
        ({**base, "stages": [{"name": "x", "prune": {"experts": 0.5}}]}, "experts prunes generative models"),
        ({**base, "stages": [{"name": "x"}]}, "give exactly one of prune / distill / quantize"),
        ({**base, "stagez": []}, "stagez: unknown key"),
    ]
    for i, (d, message) in enumerate(cases):
        p = mmd("pipeline", write(tmp_path / f"bad{i}.yaml", d), check=False)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and message in err[0], (message, p.stderr)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("model.safetensors"))


def test_killed_mid_healing_resumes_from_its_checkpoint(world, tmp_path):
    """SIGKILL during the distillation stage; the re-run reuses prune and continues heal from its last checkpoint."""
    import signal
    import time

    d = yaml.safe_load((world / "pipe.yaml").read_text())
    d["output_dir"] = str(tmp_path / "pipe")
    d["stages"][1]["distill"]["overrides"] = {"train.max_steps": 150, "train.save_every": 2, "train.keep_last": 1}
    cfg = write(tmp_path / "kill.yaml", d)
    proc = subprocess.Popen([sys.executable, "-m", "mmdistill.cli", "pipeline", str(cfg), "--until", "heal"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    ckpts = tmp_path / "pipe/heal/checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name.startswith("step-") and not p.name.endswith(".tmp") for p in (ckpts.iterdir() if ckpts.is_dir() else [])):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "pipe/prune/stage.json").is_file() and not (tmp_path / "pipe/heal/stage.json").exists()
    saved = max(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp"))
    assert 0 < saved < 150

    p = mmd("pipeline", cfg, "--until", "heal")  # the same stage: resumed, not restarted
    assert "prune: done already" in p.stdout and "heal: resuming the distillation" in p.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "pipe/heal/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # each step logged once, to the end
    assert json.loads((tmp_path / "pipe/heal/train_summary.json").read_text())["resumed_from"] == saved
    assert json.loads((tmp_path / "pipe/heal/stage.json").read_text())["kind"] == "distill"


def test_generative_moe_pipeline_prunes_experts_heals_and_quantizes(tmp_path):
    """The generative family: a tiny Qwen3-VL-MoE, half its experts pruned by REAP, healed by KD against it, int8."""
    from transformers import AutoModelForImageTextToText

    from mmdistill.models.tiny import build_tiny_vlm

    _, tok = shapes_chat(tmp_path / "data", n=40, seed=4)
    build_tiny_vlm(tmp_path / "moe", [], kind="qwen3_vl_moe", preset="vlm-nano", tokenizer=tok, seed=1, overrides={"text_config.num_experts": 8})
    data = {"train": str(tmp_path / "data/chat_train.jsonl"), "val": str(tmp_path / "data/chat_test.jsonl"), "max_length": 160}
    heal = {"family": "generative", "output_dir": "unused", "data": {**data, "max_records": 16}, "teacher": {"model": "set-by-the-pipeline"},
            "loss": {"terms": {"sft": {}, "kd": {"options": {"chunk_size": 64}}}},
            "train": {"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "save_every": 3, "log_every": 1}, "eval": {"max_items": 4}}
    pipe = {
        "family": "generative", "output_dir": str(tmp_path / "pipe"), "original": {"model": str(tmp_path / "moe")}, "data": data,
        "stages": [
            {"name": "experts50", "prune": {"experts": 0.5, "method": "reap", "calibration": 8}},
            {"name": "heal", "distill": {"recipe": str(write(tmp_path / "heal.yaml", heal))}},
            {"name": "int8", "quantize": {"method": "int8-weight"}},
        ],
        "eval": {"max_items": 4, "batch": 2, "repeats": 1, "max_new_tokens": 4},
    }
    p = mmd("pipeline", write(tmp_path / "pipe.yaml", pipe))
    assert "experts: kept 4 of 8 per layer by reap" in p.stdout
    pruned = AutoModelForImageTextToText.from_pretrained(tmp_path / "pipe/experts50/model")
    assert pruned.config.text_config.num_experts == 4
    AutoModelForImageTextToText.from_pretrained(tmp_path / "pipe/int8/model")
    rep = json.loads((tmp_path / "pipe/report/report.json").read_text())
    assert [r["stage"] for r in rep["rows"]] == ["original", "experts50", "heal", "int8"] and rep["rows"][0]["headline"] == "vqa_accuracy"
    assert rep["rows"][1]["params"] < rep["rows"][0]["params"] and rep["rows"][3]["size_bytes"] < rep["rows"][2]["size_bytes"]
    assert all(r["bs1_ms"] > 0 and "agreement" in r["metrics"] for r in rep["rows"][1:])


def test_quantization_aware_distillation_trains_fake_quantized_and_saves_plain(world, tmp_path):
    """student.fake_quant: the student trains with fake-quantized Linear layers against its fp teacher and saves plain ones."""
    from transformers import AutoModelForImageTextToText

    if not (world / "teacher/model/config.json").is_file():  # made by the first test's pipeline (original.train)
        mmd("train", world / "teacher.yaml")
    d = yaml.safe_load((world / "heal.yaml").read_text())
    d.update(output_dir=str(tmp_path / "qad"), teacher={"model": str(world / "teacher/model")},
             student={"init": "pretrained", "model": str(world / "teacher/model"), "fake_quant": "int4-weight"})
    d["train"]["max_steps"] = 3
    p = mmd("distill", write(tmp_path / "qad.yaml", d))
    assert "Linear layers fake-quantized as int4-weight" in p.stdout
    cfg = json.loads((tmp_path / "qad/model/config.json").read_text())
    assert "quantization_config" not in cfg  # full-precision weights, for `mmdistill quantize` afterwards
    s = AutoModelForImageTextToText.from_pretrained(tmp_path / "qad/model").state_dict()
    t = AutoModelForImageTextToText.from_pretrained(world / "teacher/model").state_dict()
    assert set(s) == set(t) and any(not (s[k] == t[k]).all() for k in s)
    d["lora"] = {"r": 4}
    d["family"] = "reranker"
    p = mmd("distill", write(tmp_path / "bad.yaml", d), check=False)
    assert p.returncode == 2 and "fake_quant" in p.stderr.strip().splitlines()[-1]


def test_demo_pipeline_quick(tmp_path):
    """`mmdistill demo --family pipeline --quick`: ShapesWorld, the teacher chain, the shipped reranker pipeline, one report."""
    p = mmd("demo", "--family", "pipeline", "--quick", "--n", 80, "--out", tmp_path / "demo")
    rep = json.loads((tmp_path / "demo/pipeline/report/report.json").read_text())
    assert [r["stage"] for r in rep["rows"]] == ["original", "prune", "heal", "int8"]
    assert rep["original"] == str(tmp_path / "demo/teacher/model")
    assert "| int8 (quantize) |" in p.stdout and "report written to" in p.stdout
    p = mmd("demo", "--family", "pipeline", "--data", tmp_path / "demo/data", "--out", tmp_path / "other", check=False)
    assert p.returncode == 2 and "mmdistill pipeline" in p.stderr
