"""`mmdistill` command line: one thin command per verb; the work happens in mmdistill.api."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distill, evaluate and report multimodal models.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in data and record checks.")
app.add_typer(data_app, name="data")
teacher_app = typer.Typer(no_args_is_help=True, help="Teacher outputs: generated answers for black-box KD, and the signal store (cache, verify, inspect).")
app.add_typer(teacher_app, name="teacher")


def _fail(msg: str, code: int = 2):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Run an API call; expected failures become one clear line and exit 2, never a traceback."""
    from .config import RecipeError
    from .data.images import ImageError
    from .data.records import RecordError
    from .engine.loop import TrainingError
    from .export.onnx import ExportError
    from .serve.backends import ServeError
    from .serve.monitor import MonitorError
    from .models.contrastive import PairingError
    from .models.reranker import RerankerError
    from .recipes.common import RunDirError
    from .teachers.generate import TeacherError
    from .teachers.store import StoreError
    from .compress.prune import PruneError  # also compress.experts.ExpertPruneError
    from .compress.quantize import QuantizeError
    from .ui.runs import UIError

    try:
        return fn(*args, **kwargs)
    except (RecipeError, RecordError, ImageError, TrainingError, PairingError, RerankerError, TeacherError, StoreError, RunDirError, ExportError, ServeError, MonitorError, PruneError, QuantizeError, UIError, FileNotFoundError, FileExistsError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; run the same command with --resume to continue from the last checkpoint", 130)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Output folder."),
    n: int = typer.Option(2000, "--n", help="Number of images (split train/val/test 80/10/10)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the output is a pure function of it)."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    audio: bool = typer.Option(False, "--audio", help="Also the spoken ShapesWorld (needs espeak-ng): transcription and spoken-question records in speech_*.jsonl, with the chat records in omni_*.jsonl."),
):
    """Generate the ShapesWorld data set: pair, chat and rerank records plus zero-shot tasks (--audio: spoken too)."""
    from . import api

    summary = _guard(api.synth, out, n=n, seed=seed, size=size, audio=audio, log=lambda m: typer.echo(f"warning: {m}", err=True))
    typer.echo(f"wrote ShapesWorld to {out}: " + ", ".join(f"{k}={v}" for k, v in summary.get("counts", summary).items() if not isinstance(v, dict)))


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(..., help="JSONL file of records."),
    kind: Optional[str] = typer.Option(None, help="pair | rerank | chat (default: detect from the fields)."),
    decode_images: bool = typer.Option(True, help="Decode every image to catch corrupt ones."),
    stats: bool = typer.Option(True, help="Print counts, distinct texts and images, lengths, sizes, labels, and warnings."),
    train: Optional[Path] = typer.Option(None, "--train", help="The training file: warn about records this file shares with it (leakage)."),
):
    """Report every bad line as file:line: field: problem (exit 1 when there is any), then statistics and warnings."""
    from . import api

    errors = _guard(api.check_data, file, kind, decode_images=decode_images)
    for e in errors:
        typer.echo(str(e))
    if stats and (not errors or errors[-1].line != 0):  # line 0: the file has no valid record to count
        info = _guard(api.data_stats, file, kind, train=train)
        for key, value in info["stats"].items():
            typer.echo(f"  {key}: {value}")
        for w in info["warnings"]:
            typer.echo(f"warning: {w}")
    if errors:
        typer.echo(f"{file}: {len(errors)} bad record(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{file}: ok")


@data_app.command("import")
def data_import(
    src: Path = typer.Argument(..., help="LLaVA conversation JSON / JSONL, a .parquet or .arrow file, or a Hugging Face datasets folder."),
    out: Path = typer.Argument(..., help="Output folder: <name>.jsonl, images/, and <name>.rejected.jsonl for rows that could not be converted."),
    fmt: Optional[str] = typer.Option(None, "--format", help="llava | parquet | arrow | hf (default: from the file name)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="pair | chat (default: chat for LLaVA or when prompt/response are mapped, else pair)."),
    maps: List[str] = typer.Option([], "--map", help="FIELD=COLUMN, e.g. --map text=caption --map image=jpg (repeatable)."),
    split: Optional[str] = typer.Option(None, "--split", help="The split of a datasets folder that holds several."),
    name: str = typer.Option("train", "--name", help="Output file name (train, val, test...)."),
    fail: bool = typer.Option(False, "--fail", help="Stop at the first row that cannot be converted (default: write it to <name>.rejected.jsonl and go on)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Convert at most N records."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that relative image paths are taken from (default: the source's folder)."),
):
    """Convert data you already have into mmdistill records (images copied beside them, named by content hash)."""
    from . import api

    fields = {}
    for m in maps:
        if "=" not in m:
            _fail(f"--map {m!r}: expected FIELD=COLUMN")
        k, v = m.split("=", 1)
        fields[k.strip()] = v.strip()
    res = _guard(api.import_data, src, out, fmt=fmt, kind=kind, fields=fields, split=split, name=name, on_error="fail" if fail else "skip", limit=limit, image_root=image_root)
    typer.echo(f"wrote {res['written']} {res['kind']} records to {res['out']}" + (f"; {res['rejected']} rejected (see {Path(res['out']).with_suffix('')}.rejected.jsonl)" if res["rejected"] else "")
               + (f"; {res['later_turns_dropped']} later conversation turns not kept (one record per conversation's first exchange)" if res["later_turns_dropped"] else ""))


def _train(recipe: Path, overrides: List[str], resume: bool, overwrite: bool, require_teacher: bool):
    from . import api

    if resume and overwrite:
        _fail("--resume and --overwrite exclude each other")
    summary = _guard(api.train, recipe, overrides, resume=resume, overwrite=overwrite, require_teacher=require_teacher)
    ev = summary.get("eval")
    if ev:
        m = ev["metrics"]
        typer.echo("eval: " + " ".join(f"{k}={v:.2f}" for k, v in m.items()))
    _close_processes()


def _close_processes() -> None:
    """Several processes: leave the process group together before the interpreter tears down (a live gloo group at exit
    aborted a DeepSpeed ZeRO-3 run now and then, after its files were written)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (no teacher section)."),
    overrides: List[str] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=100"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever output_dir holds."),
):
    """Plain training (teachers, no-KD baselines)."""
    _train(recipe, overrides or [], resume, overwrite, require_teacher=False)


@app.command()
def distill(
    recipe: Path = typer.Argument(..., help="Recipe YAML with a teacher section."),
    overrides: List[str] = typer.Argument(None, help="key=value overrides, e.g. loss.terms.fd.weight=10"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever output_dir holds."),
):
    """Distill the teacher into the student."""
    _train(recipe, overrides or [], resume, overwrite, require_teacher=True)


@app.command()
def finetune(
    recipe: Path = typer.Argument(..., help="Generative recipe YAML without a teacher; add a `lora:` section for LoRA."),
    overrides: List[str] = typer.Argument(None, help="key=value overrides, e.g. lora.r=16 train.max_steps=100"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever output_dir holds."),
):
    """Supervised fine-tuning of a VLM on image-text records, full or LoRA (saves the adapter and the merged model)."""
    from . import api

    if resume and overwrite:
        _fail("--resume and --overwrite exclude each other")
    summary = _guard(api.finetune, recipe, overrides or [], resume=resume, overwrite=overwrite)
    ev = summary.get("eval")
    if ev:
        typer.echo("eval: " + " ".join(f"{k}={v:.2f}" for k, v in ev["metrics"].items()))
    _close_processes()


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged model (loads with plain transformers)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model folder or id (default: the adapter's base_model_name_or_path)."),
):
    """Merge a LoRA adapter into its base model and write a full model folder."""
    from . import api

    path = _guard(api.merge, adapter, out, base=base)
    typer.echo(f"merged model written to {path}")


@teacher_app.command("generate")
def teacher_generate(
    data: Path = typer.Option(..., "--data", help="Chat JSONL: image(s) + prompt per line."),
    out: Path = typer.Option(..., "--out", help="Output JSONL (records + teacher_response); rejects and failures go beside it."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Local model folder or hub id of the teacher."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL instead, e.g. http://localhost:8000/v1."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name to send to the endpoint."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Bearer token for the endpoint."),
    max_new_tokens: int = typer.Option(64, help="Longest answer."),
    batch_size: int = typer.Option(8, help="Records per generate call (local) / concurrent requests (endpoint)."),
    min_logprob: Optional[float] = typer.Option(None, "--min-logprob", help="Reject answers whose mean token log-prob is below this (written to OUT.rejected.jsonl)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N records."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over instead of continuing a previous run."),
    timeout: float = typer.Option(60.0, help="Endpoint: seconds per request before a retry."),
    retries: int = typer.Option(4, help="Endpoint: tries per request (exponential backoff)."),
):
    """The teacher answers every (image, prompt); interrupted runs continue where they stopped."""
    from . import api

    summary = _guard(
        api.teacher_generate, data, out, teacher=teacher, endpoint=endpoint, model=model, api_key=api_key,
        max_new_tokens=max_new_tokens, batch_size=batch_size, min_logprob=min_logprob, limit=limit,
        overwrite=overwrite, timeout=timeout, retries=retries,
    )
    typer.echo(", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)))


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="Model folder (or a run folder holding model/)."),
    data: Path = typer.Option(..., "--data", help="JSONL to evaluate on; its records pick the family: pair (retrieval), rerank (ranking), chat (VQA / captions)."),
    zeroshot: Optional[Path] = typer.Option(
        None, "--zero-shot", "--zeroshot",
        help="Contrastive: zero-shot accuracy. A labels file (one class name per line; each record's class in meta.label): top-1 / top-5 "
        "accuracy, a confusion matrix, and top-1 as the headline; or a zeroshot_<split>.json of tasks.",
    ),
    template: Optional[List[str]] = typer.Option(None, "--template", help="With a labels file: prompt template(s) with {label}; several are averaged (default 'a photo of a {label}.')."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reranker / generative: a teacher folder to measure agreement with."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result JSON here (default: RUN/eval.json for a run folder)."),
    max_items: int = typer.Option(1000, "--max-items", help="Records evaluated (contrastive: the gallery size)."),
    role: str = typer.Option("student", help="teacher | student | baseline (for reports)."),
):
    """Evaluate a model folder: retrieval R@k, ranking NDCG/MRR/MAP, or VQA/CIDEr/BLEU/ROUGE, plus size and latency."""
    from . import api

    model_dir = model / "model" if (model / "model").is_dir() else model
    if out is None and model_dir != model:
        out = model / "eval.json"
    name = model.name if model_dir != model else None
    extra = {"templates": template} if template else {}
    res = _guard(api.evaluate, model_dir, data, zeroshot=zeroshot, out=out, name=name, role=role, max_items=max_items, reference=reference, **extra)
    typer.echo(" ".join(f"{k}={v:.2f}" for k, v in res["metrics"].items()))


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="Run folders that hold eval.json (the teacher first or marked role=teacher)."),
    out: Path = typer.Option(Path("report"), "--out", help="Output folder for report.md, report.json, loss_curves.png."),
    baseline: Optional[str] = typer.Option(None, help="Name of the no-KD baseline run."),
    title: str = typer.Option("mmdistill report", help="Report title."),
):
    """Compare runs: Markdown + JSON report and loss curves."""
    from . import api

    res = _guard(api.report, runs, out, title=title, baseline=baseline)
    _print_report(res, out)


@teacher_app.command("cache")
def teacher_cache(
    recipe: Path = typer.Argument(..., help="A recipe with a live teacher (`teacher: {model: ...}`): its teacher runs over its training records."),
    overrides: List[str] = typer.Argument(None, help="key=value overrides, e.g. data.max_records=1000"),
    out: Path = typer.Option(..., "--out", help="The store folder (created, or continued when it holds this teacher's signals)."),
    top_k: int = typer.Option(16, "--top-k", help="Generative: teacher ids kept per response token (with their log-probs and the tail mass)."),
    sample: Optional[int] = typer.Option(None, "--sample", help="Generative: instead of the top-k, draw N tokens per position from the teacher and keep them with importance weights (random-sampling KD: forward KL, unbiased at any KD temperature in the recipe's range)."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16 | fp32 for stored log-probs and features."),
    shard_records: int = typer.Option(256, "--shard-records", help="Records per shard file (a shard is the unit that a killed run recomputes)."),
):
    """Run the recipe's teacher once over its training data and store its signals (resumable; split by rank under accelerate)."""
    from . import api

    res = _guard(api.teacher_cache, recipe, overrides or [], out, top_k=top_k, sample=sample, dtype=dtype, shard_records=shard_records)
    typer.echo(f"{out}: {res['stored']} records stored ({res['computed']} computed now)")
    _close_processes()


@teacher_app.command("verify")
def teacher_verify(store: Path = typer.Argument(..., help="A store folder.")):
    """Check every shard of a store (present, size, sha256, readable, record counts, no record twice); exit 1 on a problem."""
    from . import api

    problems = _guard(api.teacher_verify, store)
    for p in problems:
        typer.echo(p)
    if problems:
        typer.echo(f"{store}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{store}: ok")


@teacher_app.command("inspect")
def teacher_inspect(store: Path = typer.Argument(..., help="A store folder.")):
    """What a store holds: records, bytes per record / token, its teacher and the settings that shaped it."""
    import json as _json

    from . import api

    typer.echo(_json.dumps(_guard(api.teacher_inspect, store), indent=2))


def _print_report(res, out: Path) -> None:
    md = Path(out) / "report.md"
    if md.is_file():
        typer.echo(md.read_text())
    typer.echo(f"report written to {out}")


@app.command()
def demo(
    family: str = typer.Option("contrastive", help="Model family: contrastive | reranker | generative | omni (Qwen3-Omni thinker: images and speech; needs espeak-ng); or pipeline (the reranker teacher pruned, healed, quantized and evaluated)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the data, the runs and the report."),
    n: Optional[int] = typer.Option(None, "--n", help="ShapesWorld images to generate (default 10000; omni 1000)."),
    quick: bool = typer.Option(False, help="A few steps only (smoke test)."),
    seed: int = typer.Option(0, help="Seed for data and training."),
    data: Optional[Path] = typer.Option(None, "--data", help="Your own data folder instead of ShapesWorld (pairs_train.jsonl / train.jsonl, pairs_val.jsonl / pairs_test.jsonl / val.jsonl, optional zeroshot_*.json; rerank_* / chat_* for the other families)."),
):
    """ShapesWorld (or your --data folder) end to end: teacher, student without and with distillation, one report."""
    from . import api

    res = _guard(api.demo, out, family=family, n=n, quick=quick, seed=seed, data=data)
    _print_report(res, out / ("pipeline/report" if family == "pipeline" else "report"))


@app.command()
def init(
    family: str = typer.Argument(..., help="contrastive | reranker | generative"),
    data: Path = typer.Option(..., "--data", help="Your data folder (the file names `mmdistill demo --data` looks for)."),
    out: Path = typer.Option(Path("recipes"), "--out", help="Folder for the recipe files."),
    runs: Optional[Path] = typer.Option(None, "--runs", help="Folder for the runs the recipes write (default runs/<data folder name>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace recipe files already in --out."),
):
    """Write the family's teacher / student-alone / student-distilled recipes for your data folder, every path derived from one place."""
    from . import api

    if family not in api.DEMO_RECIPES:
        _fail(f"unknown family {family!r}; choose one of {', '.join(api.DEMO_RECIPES)}")
    for path in _guard(api.init, family, data, out, runs=runs, overwrite=overwrite):
        typer.echo(f"wrote {path}")


@app.command()
def export(
    model: Path = typer.Argument(..., help="Model folder (or a run folder holding model/)."),
    out: Path = typer.Option(..., "--out", help="Output folder: the .onnx graphs, tokenizer/processor files, manifest.json."),
    format: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    task: str = typer.Option("auto", "--task", help="auto | clip | seq_cls | yesno | generate (yesno: a VLM / causal LM read as a yes/no reranker, text path; generate: its chat path, vision encoder + decoder with KV cache; auto picks generate for a VLM / causal LM not marked as a reranker)."),
    int8: bool = typer.Option(False, "--int8", help="Also write ORT dynamic int8 graphs (*.int8.onnx) and check their parity."),
    data: Optional[Path] = typer.Option(None, "--data", help="Held-out records (pair, rerank or chat JSONL) for the parity check; default: generated inputs."),
    max_items: int = typer.Option(200, "--max-items", help="Records used from --data."),
    steps: int = typer.Option(8, "--steps", help="generate: greedy tokens per record compared with eager generate (and timed)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
):
    """Export to ONNX (CLIP encoders, reranker scores, the generative chat path) and check parity against eager PyTorch in onnxruntime."""
    from . import api
    from .export.onnx import graph_files, parity_lines

    manifest = _guard(api.export, model, out, format=format, task=task, int8=int8, data=data, max_items=max_items, overwrite=overwrite, gen_steps=steps)
    typer.echo(f"wrote {', '.join(graph_files(manifest))} + manifest.json to {out} (opset {manifest['opset']})")
    for line in parity_lines(manifest):
        typer.echo(line)


@app.command()
def serve(
    model: Path = typer.Argument(..., help="Model folder (torch) or ONNX export folder (onnx); a run folder holding model/ works too."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
    backend: str = typer.Option("auto", "--backend", help="torch | onnx (auto: onnx for an export folder, else torch)."),
    task: str = typer.Option("auto", "--task", help="auto | clip | seq_cls | yesno | chat."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name clients send (default: the folder name)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MMDISTILL_API_KEY", help="Require Authorization: Bearer KEY on /v1/*."),
    int8: bool = typer.Option(False, "--int8", help="ONNX backend: run the int8 graphs."),
    max_batch: int = typer.Option(32, "--max-batch", help="Items per model call (micro-batching)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long a batch waits for more requests."),
    no_batching: bool = typer.Option(False, "--no-batching", help="One request per model call."),
    cache_size: int = typer.Option(4096, "--cache-size", help="LRU result cache entries (0: off)."),
    max_body_mb: float = typer.Option(8.0, "--max-body-mb", help="Largest request body (413 above)."),
    max_image_pixels: int = typer.Option(4096 * 4096, "--max-image-pixels", help="Largest image (width x height) accepted."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Chat: most tokens one request may generate."),
    max_audio_seconds: float = typer.Option(600.0, "--max-audio-seconds", help="Chat (Omni thinker): the longest audio clip accepted."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Accept image paths, read under this folder only (default: paths refused)."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Download http(s) image URLs (default: refused); for trusted hosts."),
    fetch_timeout: float = typer.Option(5.0, "--fetch-timeout", help="Seconds a remote image download may take."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads of torch / onnxruntime (default: theirs)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Rerankers: scores.jsonl (or eval.json) written by `mmdistill eval`; live scores are compared with it (PSI, KS) at /v1/monitor."),
    webhook: Optional[str] = typer.Option(None, "--webhook", help="URL that receives a JSON POST when score drift is flagged or cleared."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="A teacher folder served beside the model (same family); requests pick one by `model`."),
    teacher_name: Optional[str] = typer.Option(None, "--teacher-name", help="Model name of the teacher (default: its folder name)."),
):
    """Serve a model over HTTP: /v1/embeddings, /v1/rerank, /v1/chat/completions, /v1/models, /health, /metrics."""
    from . import api
    from .serve.app import ServeConfig

    cfg = ServeConfig(name=name or model.name, api_key=api_key, max_batch=max_batch, max_wait_ms=max_wait_ms, batching=not no_batching,
                      cache_size=cache_size, max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels, max_tokens=max_tokens,
                      max_audio_seconds=max_audio_seconds, image_root=str(image_root) if image_root else None,
                      allow_remote_images=allow_remote_images, fetch_timeout_s=fetch_timeout)
    if image_root is not None and not image_root.is_dir():
        typer.echo(f"error: --image-root {image_root}: not a folder", err=True)
        raise typer.Exit(2)
    _guard(api.serve, model, host=host, port=port, backend=backend, task=task, int8=int8, threads=threads, config=cfg, reference=reference, webhook=webhook, teacher=teacher, teacher_name=teacher_name)


@app.command()
def ui(
    student: Optional[Path] = typer.Argument(None, help="Student model folder (or ONNX export folder) to compare; omit to only browse and start runs."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher model folder, shown beside the student."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder whose run and report folders the UI lists, and under which it starts runs."),
    port: int = typer.Option(7860, "--port", help="TCP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
    backend: str = typer.Option("auto", "--backend", help="torch | onnx (auto: onnx for an export folder, else torch)."),
    task: str = typer.Option("auto", "--task", help="auto | clip | seq_cls | yesno | chat."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads of torch / onnxruntime (default: theirs)."),
):
    """Web UI (Gradio): teacher and student side by side, run reports with their plots, start and watch runs."""
    from . import api

    _guard(api.ui, student, teacher, runs=runs, host=host, port=port, backend=backend, task=task, threads=threads, log=typer.echo)


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Model folder (Qwen3-MoE, Qwen3-VL(-MoE), Qwen3-Omni thinker, Qwen3)."),
    out: Path = typer.Option(..., "--out", help="Folder for the pruned model (loads with plain transformers)."),
    experts: Optional[float] = typer.Option(None, "--experts", help="Fraction of every MoE layer's experts to prune, e.g. 0.5."),
    method: str = typer.Option("reap", "--method", help="Expert saliency: reap | frequency | reconstruction."),
    drop_layers: Optional[str] = typer.Option(None, "--drop-layers", help="auto:4 | auto:text:4;vision:1 (by block importance) | text:3,5;vision:1 (these blocks)."),
    width: Optional[str] = typer.Option(None, "--width", help="Width pruning, e.g. text_config.hidden_size=64,text_config.intermediate_size=160."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Chat JSONL or plain text (one sample per line)."),
    max_samples: int = typer.Option(64, "--max-samples", help="Calibration samples used (one forward pass each)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever --out holds."),
):
    """Prune MoE experts, whole blocks and/or widths of a model on calibration data."""
    from . import api

    res = _guard(api.prune, model, out, experts=experts, method=method, drop_layers=drop_layers, width=width, calibration=calibration, max_samples=max_samples, overwrite=overwrite, log=typer.echo)
    before, after = res["parameters"]
    typer.echo(f"pruned model written to {out}: {before:,} -> {after:,} parameters")


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Model folder."),
    out: Path = typer.Option(..., "--out", help="Folder for the quantized model (plain from_pretrained loads it; needs torchao, or bitsandbytes for bnb-*)."),
    method: str = typer.Option(..., "--method", help="int8-dynamic | int8-weight | int4-weight (torchao) | bnb-int8 | bnb-nf4 (bitsandbytes) | gptq-int4 | awq-int4 (GPTQModel, calibrated)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="gptq-int4 / awq-int4: a chat or rerank JSONL, or a text file with a sample a line."),
    max_samples: int = typer.Option(128, "--max-samples", help="Calibration samples read (gptq-int4 / awq-int4)."),
    store_dtype: str = typer.Option("float32", "--store-dtype", help="torchao methods: float32 | bfloat16, the dtype on disk of the matrices left unquantized "
                                    "(embeddings, patch convolution); bfloat16 halves them, and they load back as fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever --out holds."),
):
    """Quantize a model folder with torchao (CPU serving), bitsandbytes (the formats BitsAndBytesConfig loads) or GPTQ / AWQ."""
    from . import api

    res = _guard(api.quantize, model, out, method=method, overwrite=overwrite, calibration=calibration, max_samples=max_samples, store_dtype=store_dtype)
    typer.echo(f"{method} model written to {out}: {res['size_bytes']:,} -> {res['quantized_size_bytes']:,} bytes of weights")


@app.command()
def pipeline(
    config: Path = typer.Argument(..., help="Pipeline YAML (configs/pipeline/<family>-prune-distill-quantize.yaml)."),
    overrides: List[str] = typer.Argument(None, help="key=value overrides, e.g. output_dir=runs/p eval.max_items=50."),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage (a later run resumes from the next one)."),
):
    """Prune -> distill (heal against the original) -> quantize -> evaluate, as the YAML declares; resumes at the first unfinished stage."""
    from . import api

    res = _guard(api.pipeline, config, overrides or None, until=until, log=typer.echo)
    if "rows" in res:
        from .config import load_pipeline

        out = Path(load_pipeline(config, overrides or None).output_dir) / "report"
        _print_report(res, out)


def main() -> None:
    import logging

    # torchao 0.18 (the `quantize` extra) registers Enums with torch's pytree at import, and torch 2.14 logs a
    # deprecation warning for each; transformers imports torchao in every from_pretrained when it is installed.
    # Harmless, but two lines of noise on stderr before every error message: silence that one logger.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars from every from_pretrained: noise in a run's log
    app()


if __name__ == "__main__":
    main()
