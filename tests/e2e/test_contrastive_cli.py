"""Real commands on tiny models: synth -> check -> train -> distill (interrupt + resume) -> eval -> report."""

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import helpers
from helpers import contrastive_recipe, write_recipe

mmd = functools.partial(helpers.mmd, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    mmd("data", "synth", root / "data", "--n", 300, "--seed", 1, "--size", 32)
    return root


def recipe(root: Path, name: str, **extra) -> Path:
    return write_recipe(root, name, contrastive_recipe(root, name, **extra))


def test_data_check_reports_bad_lines(world, tmp_path):
    ok = mmd("data", "check", world / "data/pairs_train.jsonl")
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.jsonl"
    lines = (world / "data/pairs_train.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join([lines[0], "{not json", json.dumps({"image": "nope.png", "text": "x"})]) + "\n")
    shutil.copytree(world / "data/images", tmp_path / "images")  # a symlink would (rightly) count as escaping
    p = mmd("data", "check", bad, check=False)
    assert p.returncode == 1
    out = p.stdout.splitlines()
    assert any(l.startswith(f"{bad}:2: json:") for l in out), out
    assert any(l.startswith(f"{bad}:3: image:") for l in out), out
    assert not any(l.startswith(f"{bad}:1:") for l in out), out
    assert "Traceback" not in p.stderr


def test_train_distill_resume_eval_report(world):
    teacher = mmd("train", recipe(world, "teacher", student={"init": "tiny", "preset": "clip-nano", "overrides": {"vision_config.num_hidden_layers": 2}}))
    assert "eval:" in teacher.stdout
    tdir = world / "teacher"
    for f in ("run.json", "metrics.jsonl", "eval.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (tdir / f).exists(), f
    # the trained teacher loads with plain transformers and its weights moved away from the initialisation
    from transformers import AutoModel

    from mmdistill.models.contrastive import build_tiny_clip

    texts = [json.loads(l)["text"] for l in (world / "data/pairs_train.jsonl").read_text().splitlines()]
    init, _ = build_tiny_clip(None, texts, preset="clip-nano", overrides={"vision_config.num_hidden_layers": 2})
    trained = AutoModel.from_pretrained(tdir / "model")
    changed = [n for n, p in trained.state_dict().items() if not torch.allclose(p, init.state_dict()[n])]
    assert len(changed) > 0.9 * len(init.state_dict())

    kd = recipe(world, "kd", teacher={"model": str(tdir / "model")}, student={"init": "inherit", "layers": {"vision": [1], "text": [0]}},
                loss={"terms": {"clip": {"weight": 1.0}, "sim_kd": {"weight": 1.0}, "fd": {"weight": 10.0}}})
    # a distill recipe is refused by `train`, and an unknown key is a one-line error naming it
    p = mmd("train", kd, check=False)
    assert p.returncode == 2 and "distill" in p.stderr
    p = mmd("distill", kd, "train.max_stepz=3", check=False)
    assert p.returncode == 2 and "train.max_stepz: unknown key" in p.stderr and "Traceback" not in p.stderr

    mmd("distill", kd)
    w_full = load_file(str(world / "kd/checkpoints/step-000008/trainable.safetensors"))
    # the same run again is refused without --resume / --overwrite
    p = mmd("distill", kd, check=False)
    assert p.returncode == 2 and "--resume" in p.stderr
    # a different recipe into the same folder is refused too
    p = mmd("distill", kd, "seed=5", "--resume", check=False)
    assert p.returncode == 2 and "different run" in p.stderr
    # interrupted run: delete the last checkpoint, resume from step 4, same final weights
    shutil.rmtree(world / "kd/checkpoints/step-000008")
    mmd("distill", kd, "--resume")
    w_res = load_file(str(world / "kd/checkpoints/step-000008/trainable.safetensors"))
    for k in w_full:
        assert torch.allclose(w_full[k], w_res[k], atol=1e-6), k
    logs = [json.loads(l) for l in (world / "kd/metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logs] == [2, 4, 6, 8]
    assert {"loss", "clip", "sim_kd", "fd"} <= logs[-1].keys()

    base = recipe(world, "base", student={"init": "scratch", "model": str(tdir / "model"), "overrides": {"vision_config.num_hidden_layers": 1, "text_config.num_hidden_layers": 1}}, role="baseline")
    mmd("train", base)
    mmd("eval", world / "kd", "--data", world / "data/pairs_test.jsonl", "--max-items", 30, "--zeroshot", world / "data/zeroshot_test.json")
    ev = json.loads((world / "kd/eval.json").read_text())
    assert {"i2t_R@1", "t2i_R@1", "i2t_R@10", "mean_R@1"} <= ev["metrics"].keys()
    assert any(k.startswith("zeroshot_") for k in ev["metrics"])
    assert ev["params"] > 0 and ev["size_bytes"] > 0 and ev["latency_ms"]["bs1"] > 0

    mmd("report", tdir, world / "base", world / "kd", "--out", world / "report")
    js = json.loads((world / "report/report.json").read_text())
    assert {r["name"] for r in js["runs"]} == {"teacher", "base", "kd"}
    assert (world / "report/report.md").read_text().count("|") > 10
    assert (world / "report/loss_curves.png").stat().st_size > 1000


def test_bad_inputs_are_one_line_errors(world, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = recipe(tmp_path, "x", data={"train": str(empty)})
    p = mmd("train", r, check=False)
    assert p.returncode == 2 and str(empty) in p.stderr and "Traceback" not in p.stderr
    p = mmd("train", tmp_path / "missing.yaml", check=False)
    assert p.returncode == 2 and "recipe file not found" in p.stderr
    # a student wider than its teacher where inheritance is asked
    data = {"train": str(world / "data/pairs_train.jsonl"), "val": None, "zeroshot": None}
    tiny = recipe(tmp_path, "t", data=data, train={"max_steps": 1, "batch_size": 8, "warmup_steps": 0})
    mmd("train", tiny)
    wide = recipe(tmp_path, "w", data=data, teacher={"model": str(tmp_path / "t/model")}, student={"init": "inherit", "layers": {"vision": [0]}, "overrides": {"vision_config.hidden_size": 4096}})
    p = mmd("distill", wide, check=False)
    assert p.returncode == 2 and "larger than the teacher" in p.stderr
    # a bad loss term or model override is a one-line recipe error, and the failed start does not lock the folder
    narrow = "student.overrides.vision_config.hidden_size=32"
    p = mmd("distill", wide, "student.init=scratch", narrow, "loss.terms.simkd.weight=1", check=False)
    assert p.returncode == 2 and "simkd" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = mmd("distill", wide, "student.init=scratch", "student.overrides.vision_config.hiden_size=8", check=False)
    assert p.returncode == 2 and "hiden_size" in p.stderr and "Traceback" not in p.stderr, p.stderr
    mmd("distill", wide, "student.init=scratch", narrow, "student.overrides.vision_config.num_hidden_layers=1", "train.max_steps=1")
    # a non-empty folder that is not a run
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied/notes.txt").write_text("mine")
    occ = recipe(tmp_path, "occupied", data=data)
    for extra in ([], ["--overwrite"]):  # never cleared, not even with --overwrite
        p = mmd("train", occ, *extra, check=False)
        assert p.returncode == 2 and "holds no mmdistill run" in p.stderr
    assert (tmp_path / "occupied/notes.txt").read_text() == "mine"


def test_skip_mode_trains_on_good_records_and_reports_the_rest(world, tmp_path):
    lines = (world / "data/pairs_train.jsonl").read_text().splitlines()
    shutil.copytree(world / "data/images", tmp_path / "images")  # a symlink would (rightly) count as escaping
    bad = tmp_path / "mixed.jsonl"
    bad.write_text("\n".join(lines[:40] + ["{oops", '{"image": "images/none.png", "text": "x"}', '{"text": "no image"}']) + "\n")
    r = recipe(tmp_path, "skip", data={"train": str(bad), "val": None, "zeroshot": None, "on_error": "skip"}, train={"max_steps": 2, "batch_size": 8, "warmup_steps": 0})
    p = mmd("train", r)
    assert "skipped 3 bad records" in p.stdout, p.stdout
    assert json.loads((tmp_path / "skip/train_summary.json").read_text())["skipped_records"] == 3
    r = recipe(tmp_path, "fail", data={"train": str(bad), "val": None, "zeroshot": None}, train={"max_steps": 2, "batch_size": 8, "warmup_steps": 0})
    p = mmd("train", r, check=False)
    assert p.returncode == 2 and f"{bad}:41: json:" in p.stderr and "Traceback" not in p.stderr


def test_demo_quick(tmp_path):
    p = mmd("demo", "--out", tmp_path / "demo", "--n", 200, "--quick")
    assert "student-kd" in p.stdout and "retention" in p.stdout.lower()
    js = json.loads((tmp_path / "demo/report/report.json").read_text())
    assert [r["name"] for r in js["runs"]] == ["teacher", "student-base", "student-kd"]
    # a second run reuses the trained teacher
    p = mmd("demo", "--out", tmp_path / "demo", "--n", 200, "--quick")
    assert "reusing the trained teacher" in p.stdout
