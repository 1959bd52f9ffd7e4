"""What the web UI shows of run folders, and the training jobs it starts.

- ``find_runs(root)``: run folders (``run.json``) and report folders (``report.md``) under a root;
- ``describe(folder)``: the folder's report (or a summary of its run.json / train_summary.json / eval.json)
  as Markdown, and its PNG plots;
- ``progress(folder)`` / ``loss_figure(folder)``: where the newest training log under a folder stands,
  and every log's loss curve, read from the ``metrics.jsonl`` files the training loop appends to;
- ``Job``: one ``mmdistill demo`` or ``mmdistill distill`` command in a child process (its own
  process group, so Stop ends it and its workers), output to a log file beside it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ..evaluate.report import LOG_FILE, NOT_LOSS_PARTS, _read_log

SKIP_DIRS = {"checkpoints", "model", "tensorboard", "data", "images", "adapter", "__pycache__"}


class UIError(ValueError):
    """Bad input in the UI: one line that names the field."""


def find_runs(root: str | Path, max_depth: int = 4) -> list[Path]:
    """Folders under `root` (itself included) that hold a run (run.json) or a report (report.md), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []

    def walk(d: Path, depth: int) -> None:
        if (d / "run.json").is_file() or (d / "report.md").is_file():
            found.append(d)
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP_DIRS and not p.name.startswith("."))
        except OSError:
            return
        for c in children:
            walk(c, depth + 1)

    walk(root, 0)
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _recipe(folder: Path) -> dict[str, Any]:
    meta = _read_json(folder / "run.json")
    if not isinstance(meta, dict):
        return {}
    recipe = meta.get("recipe")
    if isinstance(recipe, str):
        recipe = json.loads(recipe) if recipe.strip().startswith("{") else {}
    return recipe if isinstance(recipe, dict) else {}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe(folder: str | Path) -> tuple[str, list[tuple[Path, str]]]:
    """(Markdown, [(png path, caption)]) for a run or report folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UIError(f"run folder: {folder} does not exist")
    pngs = [(p, p.name) for p in sorted(folder.glob("*.png"))]
    report = folder / "report.md"
    if report.is_file():
        # the report's own image links are relative file names a browser cannot follow here: the plots are shown below it
        text = re.sub(r"(?m)^!\[[^\]]*\]\((?!https?:)[^)]*\)\s*$", "", report.read_text(encoding="utf-8"))
        return text, pngs
    lines = [f"## {folder.name}", ""]
    recipe = _recipe(folder)
    if recipe:
        teacher = (recipe.get("teacher") or {}).get("model")
        lines += [f"- family: {recipe.get('family', '?')}", f"- student: {(recipe.get('student') or {}).get('init', '?')}"
                  + (f" from {recipe['student']['model']}" if (recipe.get('student') or {}).get('model') else ""),
                  f"- teacher: {teacher or 'none (trained alone)'}",
                  f"- loss terms: {', '.join((recipe.get('loss') or {}).get('terms', {}) or ['?'])}",
                  f"- max steps: {(recipe.get('train') or {}).get('max_steps', '?')}"]
    summary = _read_json(folder / "train_summary.json")
    if isinstance(summary, dict):
        lines += ["", "### Training", "", "| field | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if not isinstance(v, (dict, list))]
    ev = _read_json(folder / "eval.json")
    if isinstance(ev, dict):
        metrics = ev.get("metrics", ev)
        lines += ["", "### Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    p = progress(folder)
    if p is not None and not isinstance(summary, dict):
        lines += ["", f"Training in progress or stopped: {progress_text(p)}"]
    if len(lines) == 2:
        lines.append("(nothing to show yet)")
    return "\n".join(lines), pngs


def training_logs(folder: str | Path) -> list[Path]:
    """metrics.jsonl files under `folder` (itself included), oldest first (by modification time)."""
    folder = Path(folder)
    logs = [folder / LOG_FILE] if (folder / LOG_FILE).is_file() else []
    logs += [p for p in folder.rglob(LOG_FILE) if p.parent != folder and not (set(p.relative_to(folder).parts[:-1]) & SKIP_DIRS)]
    return sorted(logs, key=lambda p: p.stat().st_mtime)


def _records(log: Path) -> list[dict[str, Any]]:
    """The training lines of a log; a live run's last line may be half written: skipped without a warning. Read once
    per version of the file (its size and mtime): the Train tab's every poll asks for each log twice (the progress and
    the loss curve), and a finished stage's log never changes."""
    st = log.stat()
    return _parsed(str(log), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _parsed(log: str, size: int, mtime_ns: int) -> list[dict[str, Any]]:  # size, mtime: the cache key, not read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_log(Path(log))


def progress(folder: str | Path) -> dict[str, Any] | None:
    """Where the newest training log under `folder` stands: run, step, max_steps, loss (None: no log yet), and
    `stages`: every run logged so far, oldest first, with its last step; a job's stage that ran between two polls
    still shows there."""
    logs = training_logs(folder)
    if not logs:
        return None
    stages = []
    for log in logs:
        records = _records(log)
        max_steps = (_recipe(log.parent).get("train") or {}).get("max_steps")
        last = records[-1] if records else {}
        stages.append({"run": log.parent.name, "log": str(log), "step": last.get("step", 0), "max_steps": max_steps,
                       "loss": last.get("loss")})
    return {**stages[-1], "runs_logged": len(logs), "stages": [(s["run"], s["step"]) for s in stages]}


def progress_text(p: dict[str, Any] | None) -> str:
    """The progress line, and under it (from the second stage on) the stages logged so far."""
    if p is None:
        return "no training log yet"
    of = f" of {p['max_steps']}" if p.get("max_steps") else ""
    loss = f", loss {p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else ""
    text = f"{p['run']}: step {p['step']}{of}{loss}"
    stages = p.get("stages") or []
    if len(stages) > 1:
        text += "\n\nstages so far: " + " → ".join(f"{run} (step {step})" for run, step in stages)
    return text


def loss_figure(folder: str | Path):
    """A matplotlib Figure of loss (solid) and loss parts (dashed) vs step for every log under `folder`; None without logs."""
    from matplotlib.figure import Figure

    logs = [(log.parent.name, _records(log)) for log in training_logs(folder)]
    logs = [(name, recs) for name, recs in logs if recs]
    if not logs:
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, recs) in enumerate(logs):
        color = f"C{i % 10}"
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], color=color, marker="o", markersize=3, label=f"{name}: loss")
        parts = [k for k in recs[-1] if k not in NOT_LOSS_PARTS and not k.endswith("_s") and isinstance(recs[-1][k], (int, float))]
        for part in parts:
            pts = [(r["step"], r[part]) for r in recs if isinstance(r.get(part), (int, float))]
            ax.plot([s for s, _ in pts], [v for _, v in pts], color=color, linestyle="--", linewidth=0.8, alpha=0.7, label=f"{name}: {part}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return fig


# ----------------------------------------------------------------------------- jobs


class Job:
    """One mmdistill command in a child process; `folder` is where its runs write (watched for progress)."""

    def __init__(self, argv: list[str], folder: Path, log_path: Path):
        self.argv, self.folder, self.log_path = argv, Path(folder), Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.started = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mmdistill.cli", *argv], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    @property
    def command(self) -> str:
        return "mmdistill " + " ".join(self.argv)

    def returncode(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and not self._log.closed:
            self._log.close()
        return rc

    def status(self) -> str:
        rc = self.returncode()
        took = f"{time.time() - self.started:.0f} s"
        if rc is None:
            return f"running ({took}): {self.command}"
        return f"finished ({took}): {self.command}" if rc == 0 else f"failed (exit code {rc}, {took}): {self.command}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        # progress bars rewrite their line with \r: keep the last state of each line
        return "\n".join(l.rsplit("\r", 1)[-1] for l in text.splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)  # the CLI answers Ctrl-C with a clean stop
                self.proc.wait(grace_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.returncode()


FAMILIES = ("contrastive", "reranker", "generative")


def demo_argv(out: str, family: str, n: int, quick: bool) -> list[str]:
    if family not in FAMILIES:
        raise UIError(f"family: choose one of {', '.join(FAMILIES)}, got {family!r}")
    if not str(out).strip():
        raise UIError("output folder: required")
    if not 50 <= int(n) <= 100_000:
        raise UIError(f"images: {n} is outside 50..100000")
    return ["demo", "--family", family, "--out", str(out), "--n", str(int(n))] + (["--quick"] if quick else [])


def distill_argv(recipe: str, overrides: str) -> tuple[list[str], Path]:
    """argv of `mmdistill distill RECIPE OVERRIDES... --overwrite` and the run folder it writes (validated here first)."""
    from ..config import RecipeError, load_recipe

    if not str(recipe).strip():
        raise UIError("recipe: required (a recipe YAML with a teacher section)")
    ov = overrides.split()
    try:
        r = load_recipe(recipe, ov)
    except (RecipeError, FileNotFoundError) as e:
        raise UIError(f"recipe: {e}") from None
    if r.teacher is None:
        raise UIError(f"recipe: {recipe} has no teacher section; distill needs one (train it with `mmdistill train`)")
    return ["distill", str(recipe), *ov, "--overwrite"], Path(r.output_dir)
