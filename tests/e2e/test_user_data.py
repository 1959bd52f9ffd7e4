"""A user's own data folder end to end: a digits-style set (10 captions repeated over many images) through
`data check`, `init`, `demo --data` and the report, with retrieval over distinct captions."""

import json
from pathlib import Path

import pytest
import yaml

from helpers import mmd
from mmdistill import api
from mmdistill.config import RecipeError, load_recipe
from mmdistill.data.synth import generate_digits

def digits_folder(root: Path, n_train: int = 160, n_val: int = 60, leak: int = 0) -> Path:
    return generate_digits(root, n_train, n_val, leak=leak)


def test_data_check_warns_about_repeated_captions_and_leakage(tmp_path):
    root = digits_folder(tmp_path / "digits", leak=5)
    p = mmd("data", "check", root / "val.jsonl", "--train", root / "train.jsonl")
    assert "distinct_texts: 10" in p.stdout and "records: 60" in p.stdout
    assert "warning: 10 distinct captions over 60 pairs" in p.stdout and "text→image R@k" in p.stdout
    assert "5 of 60 records also appear in" in p.stdout and "leakage" in p.stdout
    assert "labels: {" in p.stdout


def test_data_folder_errors_are_one_line(tmp_path):
    with pytest.raises(RecipeError, match="data folder not found"):
        api.data_files("contrastive", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"no train file for the contrastive family \(looked for pairs_train.jsonl, train.jsonl\)"):
        api.data_files("contrastive", tmp_path / "empty")
    chat = tmp_path / "chat"
    chat.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (chat / name).write_text(json.dumps({"image": "a.png", "prompt": "Colour?", "response": "red"}) + "\n")
    with pytest.raises(RecipeError, match="holds chat records; the contrastive family trains on pair records"):
        api.data_files("contrastive", chat)
    p = mmd("demo", "--data", tmp_path / "empty", "--quick", "--out", tmp_path / "d", check=False)
    assert p.returncode == 2 and "no train file" in p.stderr and "Traceback" not in p.stderr


def test_init_writes_recipes_whose_paths_agree(tmp_path):
    root = digits_folder(tmp_path / "digits", n_train=20, n_val=10)
    paths = api.init("contrastive", root, tmp_path / "rec", runs=tmp_path / "runs")
    assert [p.name for p in paths] == ["1-teacher.yaml", "2-student-base.yaml", "3-student-kd.yaml"]
    teacher, base, kd = (load_recipe(p) for p in paths)
    assert str(teacher.output_dir) == str(tmp_path / "runs/teacher")
    # the teacher's model folder is named once, by its run folder: the baseline shrinks it, the KD student learns from it
    assert base.student.model == kd.teacher.model == str(tmp_path / "runs/teacher/model")
    assert {str(r.data.train) for r in (teacher, base, kd)} == {str(root / "train.jsonl")}
    assert {str(r.data.val) for r in (teacher, base, kd)} == {str(root / "val.jsonl")}
    with pytest.raises(FileExistsError, match="--overwrite"):
        api.init("contrastive", root, tmp_path / "rec", runs=tmp_path / "runs")
    # a KD recipe whose two teacher paths disagree is refused in one line
    d = yaml.safe_load(paths[2].read_text())
    d["eval"] = {"reference": "runs/shapesworld/teacher/model"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(d))
    p = mmd("distill", bad, check=False)
    assert p.returncode == 2 and "name two different teachers" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_demo_on_a_digits_folder(tmp_path):
    root = digits_folder(tmp_path / "digits", n_train=160, n_val=60, leak=3)
    out = tmp_path / "demo"
    p = mmd("demo", "--data", root, "--quick", "--out", out)
    assert "3 of 60 records also appear in" in p.stdout  # the leakage warning, before any training
    ev = json.loads((out / "student-kd/eval.json").read_text())
    assert ev["distinct"] == {"images": 60, "captions": 10}
    assert ev["headline"]["metric"] == "i2t_R@1" and "10 distinct over 60 images" in ev["headline"]["why"]
    assert set(ev["metrics"]) >= {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@10", "mean_R@1"}
    assert ev["metrics"]["i2t_R@10"] == 100.0  # 10 distinct captions: the right one is always in the top 10
    rep = json.loads((out / "report/report.json").read_text())
    assert rep["headline"] == "i2t_R@1" and rep["retention_plot"] == "retention.png"
    assert (out / "report/retention.png").stat().st_size > 0
    md = (out / "report/report.md").read_text()
    assert "Headline metric: i2t_R@1, because captions repeat (10 distinct over 60 images)" in md
    assert "keeps" in md and "of the teacher's i2t_R@1" in md
    assert "train time" in md and "peak RSS" in md and "Columns:" in md
    summary = json.loads((out / "student-kd/train_summary.json").read_text())
    assert summary["samples_per_s"] > 0 and summary["peak_rss_bytes"] > 50 * 2**20
