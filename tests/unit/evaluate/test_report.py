"""Reports: retention/speed-up in report.json, the Markdown table, loss curves, loading runs."""

import json

import pytest
from rich.console import Console
from rich.table import Table

from mmdistill.evaluate.report import build_report, load_run_summary, render_table, write_report


def make_runs():
    return [
        {
            "name": "teacher",
            "role": "teacher",
            "run_dir": None,
            "metrics": {"i2t_R@1": 60.0, "t2i_R@1": 40.0, "mean_R@1": 50.0, "zero_shot": 0.0},
            "params": 1000,
            "size_bytes": 4000,
            "latency_ms": {"bs1": 10.0, "bs32": 80.0},
        },
        {
            "name": "student-kd",
            "role": "student",
            "run_dir": None,
            "metrics": {"i2t_R@1": 54.0, "t2i_R@1": 36.0, "mean_R@1": 45.0, "zero_shot": 3.0},
            "params": 250,
            "size_bytes": 1000,
            "latency_ms": {"bs1": 2.5, "bs32": 20.0},
        },
        {
            "name": "student-nokd",
            "role": "baseline",
            "run_dir": None,
            "metrics": {"i2t_R@1": 42.0, "t2i_R@1": 38.0, "mean_R@1": 40.0},
            "params": 250,
            "size_bytes": 1000,
            "latency_ms": {"bs1": 2.5},
        },
    ]


def test_report_json_retention_speedup_size(tmp_path):
    report = write_report(make_runs(), tmp_path, title="CLIP distillation")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["reference"] == "teacher" and data["baseline"] == "student-nokd"
    assert data["metric_names"] == ["i2t_R@1", "t2i_R@1", "mean_R@1", "zero_shot"]
    teacher, kd, base = data["runs"]
    assert "retention" not in teacher and "speedup" not in teacher
    assert kd["retention"] == pytest.approx({"i2t_R@1": 0.9, "t2i_R@1": 0.9, "mean_R@1": 0.9})  # zero_shot: teacher 0
    assert kd["speedup"] == pytest.approx({"bs1": 4.0, "bs32": 4.0})
    assert kd["size_ratio"] == pytest.approx(0.25)
    assert base["retention"]["mean_R@1"] == pytest.approx(0.8)
    assert base["speedup"] == pytest.approx({"bs1": 4.0})
    assert data["summary"][0].startswith(
        "student-kd keeps 90.0% of the teacher's mean_R@1 and beats the baseline by 5.00 points."
    )


def test_report_markdown_has_every_run_and_the_headline(tmp_path):
    write_report(make_runs(), tmp_path, title="CLIP distillation", headline="i2t_R@1")
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# CLIP distillation")
    for name in ("teacher", "student-kd", "student-nokd"):
        assert f"| {name} |" in md
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    for column in ("params", "size on disk", "i2t_R@1", "t2i_R@1", "mean_R@1", "zero_shot", "bs1 / bs32"):
        assert column in header
    assert "retention (i2t_R@1)" in header
    assert "student-kd keeps 90.0% of the teacher's i2t_R@1 and beats the baseline by 12.00 points." in md
    assert "4.00× / 4.00×" in md
    assert "loss_curves.png" not in md  # no logs, no plot
    assert not (tmp_path / "loss_curves.png").exists()


def test_baseline_that_trails_is_reported_honestly(tmp_path):
    runs = make_runs()
    runs[2]["metrics"]["mean_R@1"] = 47.0
    report = write_report(runs, tmp_path, title="t")
    assert "trails the baseline by 2.00 points" in report["summary"][0]


def test_loss_curves_written_when_logs_exist(tmp_path):
    runs = make_runs()
    run_dir = tmp_path / "student-kd"
    run_dir.mkdir()
    lines = [
        {"step": s, "loss": 2.0 / (s + 1), "kd": 1.0 / (s + 1), "contrastive": 1.0 / (s + 1), "lr": 1e-4}
        for s in range(10)
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 10, "lo')
    runs[1]["run_dir"] = run_dir
    out = tmp_path / "report"
    with pytest.warns(UserWarning, match="metrics.jsonl:11"):  # the truncated last line
        report = write_report(runs, out, title="t")
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert report["loss_curves"] == "loss_curves.png"
    assert "![loss curves](loss_curves.png)" in (out / "report.md").read_text()


def test_render_table_is_a_rich_table():
    table = render_table(make_runs(), title="CLIP")
    assert isinstance(table, Table)
    assert table.row_count == 3
    console = Console(width=250, record=True)
    console.print(table)
    text = console.export_text()
    assert "student-kd" in text and "90.0%" in text


def test_reference_can_be_named_or_found_by_role():
    runs = make_runs()
    runs[0]["name"] = "clip-large"
    assert build_report(runs, title="t")["reference"] == "clip-large"  # the one run with role "teacher"
    with pytest.raises(ValueError, match="'nobody': no run has this name or role"):
        build_report(runs, title="t", reference="nobody")


def test_bad_runs_get_clear_errors():
    runs = make_runs()
    runs[1]["metrics"]["mean_R@1"] = "high"
    with pytest.raises(ValueError, match="run 'student-kd': metric 'mean_R@1'"):
        build_report(runs, title="t")
    with pytest.raises(ValueError, match="unique"):
        build_report([make_runs()[0], make_runs()[0]], title="t")


def test_load_run_summary(tmp_path):
    run_dir = tmp_path / "kd-run"
    run_dir.mkdir()
    (run_dir / "eval.json").write_text(
        json.dumps({"metrics": {"mean_R@1": 45.0}, "params": 250, "size_bytes": 1000, "latency_ms": {"bs1": 2.5}})
    )
    run = load_run_summary(run_dir)
    assert run["name"] == "kd-run" and run["role"] == "student"
    assert run["run_dir"] == str(run_dir)
    assert run["metrics"] == {"mean_R@1": 45.0} and run["params"] == 250


def test_load_run_summary_missing_eval_json(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_run_summary(tmp_path / "empty-run")
    message = str(info.value)
    assert "empty-run" in message and "eval.json" in message and "\n" not in message


def test_load_run_summary_invalid_json(tmp_path):
    (tmp_path / "eval.json").write_text('{"metrics": {')
    with pytest.raises(ValueError, match="eval.json: invalid JSON at line 1"):
        load_run_summary(tmp_path)


def test_reranker_reports_tabulate_each_instruction(tmp_path):
    """eval.json's per-instruction / per-direction sections become one table each, a row per key, a column per run."""
    runs = []
    for name, role, ndcg, per in (
        ("teacher", "teacher", 90.0, {"find the image": (88.0, None, 6), "find the caption": (92.0, None, 4)}),
        ("student-kd", "student", 86.0, {"find the image": (81.0, 70.0, 6), "find the caption": (93.5, 90.0, 4)}),
    ):
        d = tmp_path / name
        d.mkdir()
        sections = {k: {"ndcg@10": v[0], "n": v[2], **({"top3_overlap": v[1]} if v[1] is not None else {})} for k, v in per.items()}
        (d / "eval.json").write_text(json.dumps({"name": name, "role": role, "metrics": {"ndcg@10": ndcg}, "per_instruction": sections}))
        runs.append(load_run_summary(d))
    write_report(runs, tmp_path / "report", title="Reranker", headline="ndcg@10")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Per instruction:" in md and "Per direction:" not in md  # no run has directions
    table = md[md.index("Per instruction:"):].splitlines()
    assert table[2] == "| instruction | queries | teacher ndcg@10 | student-kd ndcg@10 | student-kd top3_overlap |"  # the teacher has no agreement column
    assert "| find the image | 6 | 88.00 | 81.00 | 70.00 |" in table
    assert "| find the caption | 4 | 92.00 | 93.50 | 90.00 |" in table
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["runs"][1]["per_instruction"]["find the image"]["top3_overlap"] == 70.0


def test_headline_and_training_figures_come_from_the_run_folders(tmp_path):
    runs = make_runs()
    why = "captions repeat (10 distinct over 60 images), so text→image R@k says little"
    for run in runs:
        d = tmp_path / run["name"]
        d.mkdir()
        (d / "eval.json").write_text(json.dumps({**run, "headline": {"metric": "i2t_R@1", "why": why}}))
        (d / "train_summary.json").write_text(json.dumps({"train_seconds": 150.0, "steps": 600, "samples_per_s": 512.0, "peak_rss_bytes": 3 * 2**30}))
    loaded = [load_run_summary(tmp_path / run["name"]) for run in runs]
    report = write_report(loaded, tmp_path / "report", title="t")
    assert report["headline"] == "i2t_R@1" and report["headline_why"] == why
    md = (tmp_path / "report/report.md").read_text()
    assert f"Headline metric: i2t_R@1, because {why}." in md
    assert "| train time | steps | samples/s | peak RSS |" in md and "| 2.5 min | 600 | 512.0 | 3.0 GiB |" in md
    assert report["retention_plot"] == "retention.png" and (tmp_path / "report/retention.png").stat().st_size > 0
    # a headline given by the caller wins, without the evaluator's reason
    assert build_report(loaded, title="t", headline="mean_R@1")["headline_why"] is None


def test_zero_shot_on_labels_is_compared_side_by_side(tmp_path):
    """Runs evaluated with --zero-shot labels.txt: the report has a per-class top-1 table computed from each run's
    confusion matrix and one figure with every run's matrix."""
    labels = ["zero", "one", "two"]
    confusions = {"teacher": [[4, 0, 0], [1, 3, 0], [0, 0, 4]], "student-nokd": [[2, 2, 0], [0, 4, 0], [1, 1, 2]], "student-kd": [[3, 1, 0], [0, 4, 0], [0, 0, 4]]}
    for run in make_runs():
        d = tmp_path / run["name"]
        d.mkdir()
        zs = {"file": "labels.txt", "labels": labels, "templates": ["{label}"], "confusion": confusions[run["name"]], "plot": "x.png"}
        (d / "eval.json").write_text(json.dumps({**run, "zeroshot_labels": zs}))
    report = write_report([load_run_summary(tmp_path / n) for n in confusions], tmp_path / "report", title="t")
    md = (tmp_path / "report/report.md").read_text()
    assert "| class | teacher | student-nokd | student-kd |" in md
    assert "| one | 75.00 | 100.00 | 100.00 |" in md and "| two | 100.00 | 50.00 | 100.00 |" in md
    assert report["zeroshot_plot"] == "zeroshot_confusion.png" and (tmp_path / "report/zeroshot_confusion.png").stat().st_size > 0
    assert "![zero-shot confusion matrices](zeroshot_confusion.png)" in md
    # a malformed matrix is left out rather than breaking the report
    bad = load_run_summary(tmp_path / "teacher")
    bad["zeroshot_labels"]["confusion"] = [[1, 2]]
    assert "zeroshot_labels" not in build_report([bad, load_run_summary(tmp_path / "student-kd")], title="t", reference="teacher")["runs"][0]
