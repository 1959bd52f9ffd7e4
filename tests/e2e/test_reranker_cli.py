"""Real commands on tiny rerankers: train a teacher, distil a student, eval, report, demo, bad input."""

import json
from pathlib import Path

import pytest

from helpers import mmd, reranker_recipe, write_recipe

def recipe(root: Path, name: str, **extra) -> Path:
    return write_recipe(root, name, reranker_recipe(root, name, **extra))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank")
    mmd("data", "synth", root / "data", "--n", 120, "--seed", 2)
    mmd("train", recipe(root, "teacher", student={"init": "tiny", "preset": "vlm-nano", "overrides": {"text_config.num_hidden_layers": 2}}))
    return root


def test_teacher_run_writes_a_plain_folder_and_ranking_metrics(world):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ev = json.loads((world / "teacher/eval.json").read_text())
    assert ev["family"] == "reranker" and ev["queries"] == 12
    for key in ("ndcg@10", "mrr@10", "map", "recall@1", "recall@5"):
        assert 0.0 <= ev["metrics"][key] <= 100.0
    assert len(ev["per_instruction"]) >= 2  # ShapesWorld mixes instructions; each gets its own line
    assert set(ev["per_direction"]) == {"text_to_image", "image_to_text"}
    assert ev["latency_ms"]["query_k12"] > 0 and ev["throughput"]["pairs_per_s"] > 0
    AutoModelForImageTextToText.from_pretrained(world / "teacher/model")
    AutoProcessor.from_pretrained(world / "teacher/model")
    assert sum(1 for _ in open(world / "teacher/scores.jsonl")) == 12


@pytest.mark.parametrize("terms", [
    {"listwise_kl": {"options": {"temperature": 2.0}}, "feature": {"weight": 0.5, "schedule": {"kind": "linear", "start": 0.3, "end": 0.6}}},
    {"pointwise": {}, "margin_mse": {"weight": 0.5}},
])
def test_distill_against_the_teacher_reports_agreement(world, terms):
    name = "kd-" + "-".join(sorted(terms))
    r = recipe(world, name, teacher={"model": str(world / "teacher/model"), "cache": True}, loss={"terms": terms})
    p = mmd("distill", r)
    assert "top3_overlap=" in p.stdout and "kendall_tau=" in p.stdout
    log = [json.loads(line) for line in open(world / name / "metrics.jsonl")]
    assert all(t in log[-1] for t in terms)
    ev = json.loads((world / name / "eval.json").read_text())
    assert 0.0 <= ev["metrics"]["top3_overlap"] <= 100.0 and -1.0 <= ev["metrics"]["kendall_tau"] <= 1.0
    for part in ("per_instruction", "per_direction"):  # the agreement per instruction / direction, which pools back to the total
        rows = ev[part].values()
        assert sum(r["n"] for r in rows) == ev["queries"]
        assert sum(r["n"] * r["top3_overlap"] for r in rows) / ev["queries"] == pytest.approx(ev["metrics"]["top3_overlap"])
        assert all(-1.0 <= r["kendall_tau"] <= 1.0 for r in rows if r["kendall_tau"] == r["kendall_tau"])
    out = world / f"report-{name}"
    mmd("report", world / "teacher", world / name, "--out", out)
    rep = json.loads((out / "report.json").read_text())
    assert rep["headline"] == "ndcg@10" and rep["runs"][1]["size_ratio"] < 1.0


@pytest.mark.parametrize("group_size", [None, 3])
def test_live_teacher_gives_the_same_first_loss_as_the_cache(world, group_size):
    """The cached teacher's scores, gathered for the step's documents, equal the live teacher's on the same draw."""
    terms = {"listwise_kl": {}, "feature": {}}
    runs = []
    for cache in (True, False):
        name = f"{'cache' if cache else 'live'}-g{group_size}"
        runs.append(name)
        r = recipe(world, name, teacher={"model": str(world / "teacher/model"), "cache": cache}, loss={"terms": terms},
                   data={"group_size": group_size}, train={"max_steps": 1, "batch_size": 4, "warmup_steps": 0, "log_every": 1}, eval={"max_items": 4, "latency": False})
        mmd("distill", r)
    la = json.loads(open(world / runs[0] / "metrics.jsonl").readline())
    lb = json.loads(open(world / runs[1] / "metrics.jsonl").readline())
    assert la["listwise_kl"] == pytest.approx(lb["listwise_kl"], rel=1e-4, abs=1e-6)
    assert la["feature"] == pytest.approx(lb["feature"], rel=1e-4)


@pytest.mark.parametrize("obj,field", [
    ({"query": {"text": "a red star"}, "documents": []}, "documents"),
    ({"query": {"text": "a red star"}, "documents": [{"text": "x"}, {"text": "y"}], "labels": [1]}, "labels"),
    ({"query": {"text": "a red star"}, "documents": [{}]}, "documents.0"),
])
def test_bad_rerank_records_name_file_line_and_field(world, tmp_path, obj, field):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"query": {"text": "a red star"}, "documents": [{"text": "a red star"}], "labels": [1]})
    data.write_text(good + "\n" + json.dumps(obj) + "\n")
    p = mmd("train", recipe(tmp_path, "bad", data={"train": str(data), "val": None, "max_length": 192}), check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: {data}:2: {field}"), err


def test_pruned_teacher_student_distills(world):
    """init=inherit with narrower widths: the teacher's most active units and chosen layers, then KD."""
    from transformers import AutoModelForImageTextToText

    widths = {"text_config.hidden_size": 16, "text_config.intermediate_size": 32, "vision_config.intermediate_size": 16}
    student = {"init": "inherit", "layers": {"text": [1]}, "overrides": widths, "calibration": 8}
    r = recipe(world, "kd-pruned", teacher={"model": str(world / "teacher/model")}, student=student, loss={"terms": {"margin_mse": {}, "ce": {}}})
    p = mmd("distill", r)
    assert "top3_overlap=" in p.stdout
    s = AutoModelForImageTextToText.from_pretrained(world / "kd-pruned/model")
    t = AutoModelForImageTextToText.from_pretrained(world / "teacher/model")
    tc = s.config.text_config
    assert (tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, s.config.vision_config.intermediate_size) == (16, 32, 1, 16)
    assert sum(x.numel() for x in s.parameters()) < 0.7 * sum(x.numel() for x in t.parameters())  # the patch embedding keeps its width
    # a width this architecture can't be pruned to is one line naming the run and the key
    bad = recipe(world, "bad-width", teacher={"model": str(world / "teacher/model")},
                 student={"init": "inherit", "overrides": {"text_config.head_dim": 8}}, loss={"terms": {"margin_mse": {}}})
    p = mmd("distill", bad, check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and str(world / "bad-width") in err and "'text_config.head_dim' cannot be pruned" in err, p.stderr


def test_teacher_terms_without_a_teacher_are_refused(world, tmp_path):
    p = mmd("train", recipe(world, "noteacher", loss={"terms": {"listwise_kl": {}}}), check=False)
    assert p.returncode == 2 and "need a teacher" in p.stderr


def test_demo_quick(tmp_path):
    p = mmd("demo", "--family", "reranker", "--quick", "--n", 80, "--out", tmp_path / "demo")
    rep = json.loads((tmp_path / "demo/report/report.json").read_text())
    assert [r["name"] for r in rep["runs"]] == ["teacher", "student-base", "student-kd"]
    # the rerankers start from the two ShapesWorld VLMs the demo trains first
    assert (tmp_path / "demo/vlm-teacher/model/config.json").is_file() and (tmp_path / "demo/vlm-student/model/config.json").is_file()
    assert "top3_overlap" in rep["runs"][1]["metrics"]  # the baseline is compared with the teacher too
    assert "keeps" in p.stdout
