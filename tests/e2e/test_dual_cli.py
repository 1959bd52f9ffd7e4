"""Real commands: a timm + BERT dual student trained alone and distilled from a tiny CLIP teacher, SigLIP as the
task loss, then `mmdistill eval --zero-shot labels.txt` on a digits-style set with meta.label, and its bad inputs."""

import functools
import json
import re
from pathlib import Path

import pytest
from transformers import AutoModel

import helpers
from mmdistill.data.synth import DIGIT_WORDS, generate_digits
DUAL = {
    "init": "dual",
    "dual": {
        "image_tower": {"timm": "resnet10t", "model_args": {"channels": [8, 16, 16, 32], "stem_width": 8}, "image_size": 32},
        "text_tower": {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32},
        "projection_dim": 24,
    },
}


mmd = functools.partial(helpers.mmd, timeout=600)


def write_recipe(root: Path, name: str, data: Path, **extra) -> Path:
    d = {
        "family": "contrastive",
        "output_dir": str(root / name),
        "data": {"train": str(data / "train.jsonl"), "val": str(data / "val.jsonl")},
        "student": DUAL,
        "train": {"max_steps": 6, "batch_size": 16, "warmup_steps": 1, "save_every": 6, "log_every": 2, "lr": 0.003},
        "eval": {"max_items": 40, "latency": False},
        **extra,
    }
    return helpers.write_recipe(root, name, d)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("dual")
    data = generate_digits(root / "digits", n_train=160, n_val=40, size=32)
    (root / "labels.txt").write_text("\n".join(DIGIT_WORDS) + "\n")
    return root, data


@pytest.fixture(scope="module")
def runs(digits):
    root, data = digits
    mmd("train", write_recipe(root, "teacher", data, student={"init": "tiny", "preset": "clip-nano"}))
    mmd("train", write_recipe(root, "dual-base", data, loss={"terms": {"siglip": {"weight": 1.0}}}))
    kd = write_recipe(root, "dual-kd", data, teacher={"model": str(root / "teacher/model")}, loss={"terms": {"clip": {}, "sim_kd": {}, "fd": {"weight": 10.0}}})
    mmd("distill", kd)
    return root, data


def test_dual_students_train_and_save_plain_transformers_folders(runs):
    root, _ = runs
    for name in ("dual-base", "dual-kd"):
        model = AutoModel.from_pretrained(root / name / "model")
        assert type(model).__name__ == "VisionTextDualEncoderModel" and model.config.vision_config.architecture == "resnet10t"
        ev = json.loads((root / name / "eval.json").read_text())
        assert ev["params"] == sum(p.numel() for p in model.parameters())
    # the siglip term learned its own scale and bias beside the student (saved with the loss modules)
    metrics = [json.loads(line) for line in (root / "dual-base/metrics.jsonl").read_text().splitlines()]
    assert any("siglip" in m for m in metrics)


def test_zero_shot_on_the_users_labels_is_the_headline(runs):
    root, data = runs
    out = root / "zs.json"
    p = mmd("eval", root / "dual-kd", "--data", data / "val.jsonl", "--zero-shot", root / "labels.txt", "--template", "a handwritten digit {label}", "--out", out)
    ev = json.loads(out.read_text())
    assert "zeroshot_top1=" in p.stdout and 0 <= ev["metrics"]["zeroshot_top1"] <= ev["metrics"]["zeroshot_top5"] <= 100
    assert ev["headline"]["metric"] == "zeroshot_top1"
    conf = ev["zeroshot_labels"]["confusion"]
    assert len(conf) == 10 and sum(map(sum, conf)) == 40  # every val image counted once, under its true class
    assert sum(conf[i][i] for i in range(10)) / 40 * 100 == pytest.approx(ev["metrics"]["zeroshot_top1"])
    assert Path(ev["zeroshot_labels"]["plot"]).is_file()


@pytest.mark.parametrize(
    "labels,expect",
    [
        ("zero\none\n\ntwo\n", r"labels.txt:3: label: empty line"),
        ("zero\none\nzero\n", r"labels.txt:3: label: 'zero' repeats line 1"),
        ("zero\none\ntwo\n", r"val.jsonl:\d+: meta.label: 'three' is not in the labels file"),
    ],
)
def test_bad_labels_are_one_line_errors(runs, tmp_path, labels, expect):
    root, data = runs
    (tmp_path / "labels.txt").write_text(labels)
    p = mmd("eval", root / "dual-base", "--data", data / "val.jsonl", "--zero-shot", tmp_path / "labels.txt", "--out", tmp_path / "e.json", check=False)
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.splitlines() if line.startswith("error: ")]  # (torch may log import warnings too)
    assert len(err) == 1 and re.search(expect, err[0]) and "Traceback" not in p.stderr, p.stderr


def test_an_unknown_timm_name_is_one_line_with_close_matches(digits, tmp_path):
    _, data = digits
    bad = {**DUAL, "dual": {**DUAL["dual"], "image_tower": {"timm": "mobilenetv3_smal_050"}}}
    p = mmd("train", write_recipe(tmp_path, "bad", data, student=bad), check=False)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "'mobilenetv3_smal_050' is not a timm model; close matches: mobilenetv3_small_050" in err[0], p.stderr
    assert "Traceback" not in p.stderr
