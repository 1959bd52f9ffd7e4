"""The web UI (Gradio): compare teacher and student, browse run folders, start and watch training runs.

``build_ui(comparer, runs_root)`` returns a ``gr.Blocks`` with three tabs:

- **Compare** (when models are given): the input the models' family takes (rerankers: query, optional
  image, documents; dual encoders: image and texts; VLMs: image and prompt), and for each model its
  answer or scores and the time of its call, side by side (``ui/compare.py``, which calls the server's backends);
- **Runs**: the run and report folders under ``runs_root``; a folder's report.md (or a summary of its
  run.json / train_summary.json / eval.json) and its PNG plots;
- **Train**: start ``mmdistill demo`` or ``mmdistill distill RECIPE`` in a child process and watch
  its status, the newest log's step and loss, the loss curves of every run it writes, and its output, live.

Every element the browser tests look for has an ``elem_id``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .compare import Comparer
from .runs import Job, UIError, demo_argv, describe, distill_argv, find_runs, loss_figure, progress, progress_text

POLL_S = 1.0


def _table(headers: list[str], rows: list[list[Any]]):
    import pandas as pd

    return pd.DataFrame(rows, columns=headers)


def _compare_tab(gr, comparer: Comparer) -> None:
    fam = comparer.family
    names = [label for label, _ in comparer.sides]
    gr.Markdown(f"**{fam}** models: " + " · ".join(names) + ". Each model is called once on the same input; times are wall time of that call on this machine.")

    def fail(e: Exception):
        raise gr.Error(str(e))

    if fam == "reranker":
        with gr.Row():
            with gr.Column():
                query = gr.Textbox(label="Query", elem_id="query")
                image = gr.Image(label="Query image (rerankers that read images)", type="pil", elem_id="image", height=200)
                instruction = gr.Textbox(label="Instruction", value="", placeholder="Given a query, retrieve relevant documents.")
                docs = gr.Textbox(label="Documents (one per line)", lines=6, elem_id="documents")
                go = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Column():
                table = gr.Dataframe(label="Relevance scores (rank)", elem_id="scores", interactive=False, wrap=True)
                times = gr.Markdown(elem_id="latency")

        def run(q, img, instr, d):
            try:
                res = comparer.rerank(q, (d or "").splitlines(), img, instr or "")
            except (UIError, ValueError) as e:
                fail(e)
            doc_list = [x.strip() for x in d.splitlines() if x.strip()]
            rows = [[text] + [f"{r['scores'][i]:.4f} (#{r['ranks'][i]})" for r in res] for i, text in enumerate(doc_list)]
            lat = " · ".join(f"{r['model']}: {r['ms']:.1f} ms" for r in res)
            return _table(["document"] + [r["model"] for r in res], rows), f"**Latency** (one call, all documents): {lat}"

        go.click(run, [query, image, instruction, docs], [table, times], concurrency_limit=1)

    elif fam == "contrastive":
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="pil", elem_id="image", height=200)
                texts = gr.Textbox(label="Texts (one per line; without an image the first is compared with the others)", lines=6, elem_id="texts")
                go = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Column():
                table = gr.Dataframe(label="Cosine similarity", elem_id="scores", interactive=False, wrap=True)
                times = gr.Markdown(elem_id="latency")

        def run(img, t):
            try:
                res = comparer.similarities((t or "").splitlines(), img)
            except (UIError, ValueError) as e:
                fail(e)
            rows = [[text] + [f"{r['similarities'][i]:.4f}" for r in res] for i, text in enumerate(res[0]["texts"])]
            lat = " · ".join(f"{r['model']}: {r['ms']:.1f} ms" for r in res)
            return _table(["text"] + [r["model"] for r in res], rows), f"**Latency** (one call per input kind): {lat}"

        go.click(run, [image, texts], [table, times], concurrency_limit=1)

    else:  # generative
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="pil", elem_id="image", height=200)
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                max_tokens = gr.Slider(1, 256, value=24, step=1, label="Max tokens")
                go = gr.Button("Compare", variant="primary", elem_id="compare")
        answers = []
        with gr.Row():
            for i, label in enumerate(names):
                with gr.Column():
                    answers.append(gr.Textbox(label=label, lines=4, elem_id=f"answer-{i}", interactive=False))
        times = gr.Markdown(elem_id="latency")

        def run(img, p, m):
            try:
                res = comparer.chat(p, img, int(m))
            except (UIError, ValueError) as e:
                fail(e)
            lat = " · ".join(f"{r['model']}: {r['ms']:.1f} ms, {r['tokens']} tokens ({r['finish']})" for r in res)
            return (*[r["answer"] for r in res], f"**Latency** (greedy generation): {lat}")

        go.click(run, [image, prompt, max_tokens], [*answers, times], concurrency_limit=1)


def _runs_tab(gr, root: Path) -> None:
    def choices():
        return [str(p) for p in find_runs(root)]

    with gr.Row():
        folder = gr.Dropdown(choices=choices(), label=f"Run or report folder (under {root})", elem_id="run-folder", allow_custom_value=True, scale=4)
        refresh = gr.Button("Refresh", elem_id="refresh-runs", scale=1)
    report = gr.Markdown(elem_id="report")
    plots = gr.Gallery(label="Plots", elem_id="plots", columns=2, height="auto", object_fit="contain")

    def show(f):
        if not f:
            return "", []
        try:
            text, pngs = describe(f)
        except UIError as e:
            raise gr.Error(str(e))
        from PIL import Image

        images = []
        for p, caption in pngs:
            with Image.open(p) as im:
                images.append((im.convert("RGB"), caption))
        return text, images

    folder.change(show, folder, [report, plots])
    refresh.click(lambda: gr.Dropdown(choices=choices()), None, folder)


def _train_tab(gr, root: Path, state: dict[str, Job | None]) -> None:
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Demo**: ShapesWorld data, a teacher, the student alone and distilled, one report.")
            family = gr.Dropdown(["contrastive", "reranker", "generative"], value="contrastive", label="Family", elem_id="demo-family")
            out = gr.Textbox(value=str(root / "ui-demo"), label="Output folder", elem_id="demo-out")
            n = gr.Number(value=200, precision=0, label="Images", elem_id="demo-n")
            quick = gr.Checkbox(value=True, label="Quick (a few steps per stage: a smoke run)", elem_id="demo-quick")
            start_demo = gr.Button("Start demo", variant="primary", elem_id="start-demo")
        with gr.Column():
            gr.Markdown("**Distill**: a recipe with a teacher section; `key=value` overrides.")
            recipe = gr.Textbox(label="Recipe YAML", elem_id="recipe")
            overrides = gr.Textbox(label="Overrides", placeholder="train.max_steps=100 loss.terms.fd.weight=10", elem_id="overrides")
            start_distill = gr.Button("Start distill", variant="primary", elem_id="start-distill")
    with gr.Row():
        status = gr.Markdown("No job started.", elem_id="job-status")
        stop = gr.Button("Stop", variant="stop", elem_id="stop-job", scale=0)
    step = gr.Markdown(elem_id="job-progress")
    curve = gr.Plot(label="Loss", elem_id="loss-curve")
    log = gr.Textbox(label="Output", lines=12, max_lines=12, elem_id="job-log", interactive=False, autoscroll=True)
    timer = gr.Timer(POLL_S, active=False)

    def start(argv: list[str], folder: Path):
        job = state.get("job")
        if job is not None and job.returncode() is None:
            raise gr.Error("a job is running; stop it first")
        name = time.strftime("%Y%m%d-%H%M%S")
        state["job"] = Job(argv, folder, root / ".ui-jobs" / f"{name}.log")
        return poll() + (gr.Timer(active=True),)

    def on_demo(fam, o, count, q):
        try:
            argv = demo_argv(o, fam, int(count or 0), bool(q))
        except UIError as e:
            raise gr.Error(str(e))
        return start(argv, Path(o))

    def on_distill(r, ov):
        try:
            argv, folder = distill_argv(r, ov or "")
        except UIError as e:
            raise gr.Error(str(e))
        return start(argv, folder)

    def poll():
        job = state.get("job")
        if job is None:
            return "No job started.", "", None, ""
        p = progress(job.folder)
        return f"**Job** {job.status()}", progress_text(p), loss_figure(job.folder), job.log_tail()

    def tick():
        job = state.get("job")
        done = job is None or job.returncode() is not None
        return poll() + (gr.Timer(active=not done),)

    def on_stop():
        job = state.get("job")
        if job is not None:
            job.stop()
        return poll() + (gr.Timer(active=False),)

    outs = [status, step, curve, log, timer]
    start_demo.click(on_demo, [family, out, n, quick], outs, concurrency_limit=1)
    start_distill.click(on_distill, [recipe, overrides], outs, concurrency_limit=1)
    stop.click(on_stop, None, outs, concurrency_limit=1)
    timer.tick(tick, None, outs, concurrency_limit=1, show_progress="hidden")


def build_ui(comparer: Comparer | None, runs_root: str | Path = "runs"):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    import gradio as gr

    root = Path(runs_root)
    state: dict[str, Job | None] = {"job": None}
    with gr.Blocks(title="mmdistill") as ui:
        gr.Markdown("# mmdistill: teacher and student side by side")
        with gr.Tab("Compare", elem_id="tab-compare"):
            if comparer is None:
                gr.Markdown("No models loaded: start the UI with `mmdistill ui STUDENT_DIR --teacher TEACHER_DIR`.")
            else:
                _compare_tab(gr, comparer)
        with gr.Tab("Runs", elem_id="tab-runs"):
            _runs_tab(gr, root)
        with gr.Tab("Train", elem_id="tab-train"):
            _train_tab(gr, root, state)
    ui.mmdistill_state = state  # the running job, for shutdown
    return ui


def launch(student: str | Path | None = None, teacher: str | Path | None = None, *, runs: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860,
           task: str = "auto", backend: str = "auto", threads: int | None = None, log=print) -> None:
    """Load the models, then serve the UI until interrupted (a job it started is stopped on the way out)."""
    if student is None and teacher is not None:
        raise UIError("--teacher: give the student folder too (mmdistill ui STUDENT_DIR --teacher TEACHER_DIR)")
    comparer = Comparer(student, teacher, task=task, backend=backend, threads=threads) if student is not None else None
    if comparer is not None:
        comparer.warmup()
    ui = build_ui(comparer, runs)
    log(f"mmdistill UI on http://{host}:{port} (runs under {runs})")
    try:
        ui.queue().launch(server_name=host, server_port=port, share=False, show_error=True, quiet=True, prevent_thread_lock=False)
    finally:
        job = ui.mmdistill_state.get("job")
        if job is not None:
            job.stop()
