"""The UI's run-folder readers and job launcher, without a browser."""

import json
import time

import pytest

from mmdistill.ui import runs as ur


def _run(folder, steps, max_steps=10, loss0=3.0):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"fingerprint": "x", "recipe": {"family": "contrastive", "train": {"max_steps": max_steps},
                                                                                 "teacher": {"model": "t"}, "loss": {"terms": {"clip": {}, "fd": {}}}}}))
    with open(folder / "metrics.jsonl", "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": loss0 / s, "clip": 1.0 / s, "lr": 0.1, "samples_per_s": 3.0}) + "\n")
        f.write('{"step": 99, "loss"')  # a line cut short by a kill: skipped
    return folder


def test_find_describe_and_progress(tmp_path):
    a = _run(tmp_path / "exp" / "teacher", [2, 4])
    time.sleep(0.01)
    b = _run(tmp_path / "exp" / "student", [2, 4, 6])
    (b / "checkpoints" / "step-000002").mkdir(parents=True)
    (b / "checkpoints" / "step-000002" / "run.json").write_text("{}")  # inside a checkpoint: not a run
    (b / "eval.json").write_text(json.dumps({"metrics": {"mean_R@1": 42.5, "note": "x"}}))
    rep = tmp_path / "exp" / "report"
    rep.mkdir()
    (rep / "report.md").write_text("# my report\n\n| a |\n\n![loss](loss_curves.png)\n")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(rep / "loss_curves.png")
    assert ur.find_runs(tmp_path) == [rep, b, a]
    text, pngs = ur.describe(rep)
    assert text.startswith("# my report") and "![loss]" not in text and [c for _, c in pngs] == ["loss_curves.png"]
    text, pngs = ur.describe(b)
    assert "teacher: t" in text and "clip, fd" in text and "| mean_R@1 | 42.5 |" in text and "note" not in text and pngs == []
    with pytest.raises(ur.UIError, match="does not exist"):
        ur.describe(tmp_path / "nope")
    p = ur.progress(tmp_path / "exp")  # the newest log under the folder
    assert (p["run"], p["step"], p["max_steps"], p["runs_logged"]) == ("student", 6, 10, 2)
    assert p["stages"] == [("teacher", 4), ("student", 6)]
    assert ur.progress_text(p) == "student: step 6 of 10, loss 0.5000\n\nstages so far: teacher (step 4) → student (step 6)"
    only = ur.progress(tmp_path / "exp" / "teacher")
    assert ur.progress_text(only) == "teacher: step 4 of 10, loss 0.7500"  # one stage: no stages line
    assert ur.progress(tmp_path / "exp" / "report") is None
    fig = ur.loss_figure(tmp_path / "exp")
    labels = [l.get_label() for l in fig.axes[0].get_lines()]
    assert labels == ["teacher: loss", "teacher: clip", "student: loss", "student: clip"]  # lr and *_s are not loss parts
    assert list(fig.axes[0].get_lines()[2].get_ydata()) == [1.5, 0.75, 0.5]


def test_bad_job_inputs_name_the_field(tmp_path):
    with pytest.raises(ur.UIError, match="family"):
        ur.demo_argv(str(tmp_path), "bogus", 200, True)
    with pytest.raises(ur.UIError, match="images"):
        ur.demo_argv(str(tmp_path), "contrastive", 3, True)
    assert ur.demo_argv("o", "reranker", 300, False) == ["demo", "--family", "reranker", "--out", "o", "--n", "300"]
    with pytest.raises(ur.UIError, match="recipe: required"):
        ur.distill_argv(" ", "")
    with pytest.raises(ur.UIError, match="recipe: .*nope.yaml"):
        ur.distill_argv(str(tmp_path / "nope.yaml"), "")
    with pytest.raises(ur.UIError, match="no teacher section"):
        ur.distill_argv("configs/contrastive/shapesworld-teacher.yaml", "")
    argv, out = ur.distill_argv("configs/contrastive/shapesworld-student-kd.yaml", f"train.max_steps=3 output_dir={tmp_path / 'kd'}")
    assert argv[-1] == "--overwrite" and "train.max_steps=3" in argv and out == tmp_path / "kd"


def test_job_runs_reports_and_stops(tmp_path):
    job = ur.Job(["--help"], tmp_path, tmp_path / "logs" / "a.log")
    job.proc.wait(120)
    assert job.returncode() == 0 and job.status().startswith("finished") and "distill" in job.log_tail()
    bad = ur.Job(["no-such-verb"], tmp_path, tmp_path / "logs" / "b.log")
    bad.proc.wait(120)
    assert bad.status().startswith("failed (exit code 2")
    # stop: a long command in its own process group ends on Stop (a plain `sleep` stands in for a training run)
    import subprocess

    slow = ur.Job.__new__(ur.Job)
    slow.argv, slow.folder, slow.log_path = ["sleep"], tmp_path, tmp_path / "c.log"
    slow._log = open(slow.log_path, "w")
    slow.started = time.time()
    slow.proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    slow.stop(grace_s=5)
    assert slow.returncode() is not None and slow.status().startswith("failed")
