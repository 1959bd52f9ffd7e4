"""`mmdistill pipeline FILE`: prune -> distill (heal) -> quantize -> evaluate, declared in YAML (config.PipelineConfig).

Every stage writes a loadable model folder, ``OUTPUT_DIR/<stage>/model``, and on success a ``stage.json``
that records a fingerprint of what made it (the stage's settings, chained with its input's fingerprint).
A re-run reuses every stage whose fingerprint still matches and starts at the first one that does not;
a distillation stage that was stopped mid-training resumes from its last checkpoint (the recipe engine's
own resume). Prune and quantize stages write to ``model.tmp`` and rename, so a killed stage leaves no
half-written folder that would pass for finished.

Stages reuse the library, never a copy of it:

- prune: a reranker keeps layers and narrows widths as the recipes' ``init: inherit`` does
  (recipes.reranker.build_student -> compress/prune.py, calibrated on the training queries); a generative
  model goes through ``mmdistill prune`` (compress/apply.py: MoE experts, blocks, widths on chat records);
- distill: a shipped (or the user's) distillation recipe, with its teacher set to the original model and
  its student to the stage's input (init=pretrained), run by the family's recipe engine;
- quantize: ``mmdistill quantize`` (compress/quantize.py, torchao).

Evaluation (the last step, also cached per stage): the family's metrics on ``data.val`` with agreement
against the original, parameters, bytes of weights on disk, and -- in a fresh process per model, so one
model's allocations do not inflate another's -- latency at batch 1 and batched, and the peak resident
memory that loading and running the model adds. The report (report/report.md, .json, .png) has a row
per stage with retention against the original.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .config import PipelineConfig, PipelineStage, RecipeError, _merge, load_pipeline, load_recipe, parse_overrides, recipe_from_dict

HEADLINES = {"reranker": "ndcg@10", "generative": "vqa_accuracy"}


class PipelineError(RecipeError):
    """A pipeline that cannot run as declared (a missing input, a recipe of another family); one line."""


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_recipe(name: str) -> Path:
    """A recipe path as given, else a shipped recipe (configs/<family>/<name>.yaml)."""
    from .api import shipped_config

    p = Path(name)
    return p if p.is_file() else shipped_config(name)


def _folder_fingerprint(path: Path) -> str:
    """What identifies a model folder's content cheaply: its config and its weight files' names and sizes."""
    cfg = path / "config.json"
    files = sorted((f.name, f.stat().st_size) for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))
    return _hash({"config": cfg.read_text() if cfg.is_file() else None, "files": files})


def model_dir(cfg: PipelineConfig, name: str) -> Path:
    return Path(cfg.original.model) if name == "original" else Path(cfg.output_dir) / name / "model"


def stage_inputs(cfg: PipelineConfig) -> dict[str, str]:
    """Stage name -> the stage name (or folder) it starts from."""
    out, prev = {}, "original"
    for s in cfg.stages:
        out[s.name] = s.input or prev
        prev = s.name
    return out


def check_inputs(cfg: PipelineConfig) -> None:
    """Each stage's `input` names an earlier stage or an existing model folder: one line otherwise."""
    earlier = {"original"}
    for s in cfg.stages:
        src = s.input
        if src is not None and src not in earlier:
            if src in {t.name for t in cfg.stages}:
                raise PipelineError(f"stage {s.name!r}: input {src!r} is a later stage; a stage starts from an earlier one")
            if not (Path(src) / "config.json").is_file():
                raise PipelineError(f"stage {s.name!r}: input {src} is neither an earlier stage nor a model folder (no config.json there)")
        earlier.add(s.name)


def _input_dir(cfg: PipelineConfig, src: str) -> Path:
    return model_dir(cfg, src) if src == "original" or src in {s.name for s in cfg.stages} else Path(src)


def _done(stage_dir: Path, fp: str) -> bool:
    meta = stage_dir / "stage.json"
    if not meta.is_file() or not (stage_dir / "model" / "config.json").is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("fingerprint") == fp
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# the original model


def ensure_original(cfg: PipelineConfig, *, log: Callable = print) -> None:
    """Train the recipes of `original.train` that are not finished; then the original model folder must exist."""
    from .api import _recipe_module, is_finished, resume_or_restart

    for name in cfg.original.train:
        recipe = load_recipe(resolve_recipe(name))
        if is_finished(recipe):
            continue
        log(f"== original: training {name} -> {recipe.output_dir}")
        _recipe_module(recipe.family).run(recipe, log=log, **resume_or_restart(recipe))
    if not (Path(cfg.original.model) / "config.json").is_file():
        hint = " (its `original.train` recipes did not write it: check their output_dir)" if cfg.original.train else " (or list the recipes that make it in `original.train`)"
        raise PipelineError(f"original.model {cfg.original.model}: no model folder there{hint}")


# ---------------------------------------------------------------------------------------------
# stages


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def run_prune(cfg: PipelineConfig, stage: PipelineStage, src: Path, stage_dir: Path, log: Callable, resumable: bool) -> dict[str, Any]:
    p = stage.prune
    tmp = stage_dir / "model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if cfg.family == "reranker":
        from .data.loaders import load_rerank
        from .models import reranker as rm
        from .recipes.reranker import build_student

        recipe = recipe_from_dict(
            {
                "family": "reranker",
                "output_dir": str(stage_dir),
                "data": {"train": str(cfg.data.train), "max_length": cfg.data.max_length},
                "teacher": {"model": str(src)},
                "student": {"init": "inherit", "model": str(src), "layers": p.layers, "overrides": p.widths, "calibration": p.calibration},
            },
            source=f"stage {stage.name}",
        )
        records, _ = load_rerank(cfg.data.train, "fail", p.calibration, rm.ImageCache(), log=lambda *_: None)
        n_before = sum(x.numel() for x in rm.load_reranker(str(src), max_length=cfg.data.max_length).model.parameters())
        student = build_student(recipe, None, [], records)
        student.save(tmp)
        report = {"layers": p.layers, "widths": p.widths, "calibration": len(records), "parameters": [n_before, sum(x.numel() for x in student.model.parameters())]}
    else:
        from .compress.apply import prune_folder

        width = ",".join(f"{k}={v}" for k, v in p.widths.items()) or None
        report = prune_folder(src, tmp, experts=p.experts, method=p.method, drop_layers=p.drop_layers, width=width, calibration=cfg.data.train, max_samples=p.calibration, overwrite=True, log=log)
    _replace(tmp, stage_dir / "model")
    before, after = report["parameters"]
    log(f"{stage.name}: {before:,} -> {after:,} parameters")
    return report


def distill_recipe(cfg: PipelineConfig, stage: PipelineStage, src: Path, stage_dir: Path):
    """The stage's distillation recipe: its loss and training settings, this pipeline's teacher, student, data and folder."""
    path = resolve_recipe(stage.distill.recipe)
    d = load_recipe(path).model_dump(mode="json")
    if stage.distill.overrides:
        d = _merge(d, parse_overrides([f"{k}={json.dumps(v)}" for k, v in stage.distill.overrides.items()]))
    if d["family"] != cfg.family:
        raise PipelineError(f"stage {stage.name!r}: recipe {path} is a {d['family']} recipe; this pipeline is {cfg.family}")
    if not d.get("teacher"):
        raise PipelineError(f"stage {stage.name!r}: recipe {path} has no teacher section; healing needs a distillation recipe")
    d.update(output_dir=str(stage_dir), seed=cfg.seed, name=stage.name, role="student")
    d["data"].update(train=str(cfg.data.train), val=str(cfg.data.val), max_length=cfg.data.max_length)
    d["teacher"] = {"kind": "live", "model": str(Path(cfg.original.model)), "cache": d["teacher"].get("cache", False)}
    d["student"] = {"init": "pretrained", "model": str(src), "fake_quant": stage.distill.fake_quant}
    d["eval"]["reference"] = None
    return recipe_from_dict(d, source=f"{path} (stage {stage.name})")


def run_distill(cfg: PipelineConfig, stage: PipelineStage, src: Path, stage_dir: Path, log: Callable, resumable: bool) -> dict[str, Any]:
    """`resumable`: the stage folder was started by this very stage (same settings, same input), so a run found there
    with this recipe's fingerprint is continued from its last checkpoint; else it is replaced."""
    from .api import _recipe_module

    recipe = distill_recipe(cfg, stage, src, stage_dir)
    fp = recipe.fingerprint()
    meta = stage_dir / "run.json"
    same = resumable and meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp
    if same:
        log(f"{stage.name}: resuming the distillation in {stage_dir}")
    summary = _recipe_module(cfg.family).run(recipe, resume=same, overwrite=not same, log=log, evaluate_after=False)
    return {"recipe": stage.distill.recipe, "fingerprint": fp, "steps": recipe.train.max_steps, "final": {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}}


def run_quantize(cfg: PipelineConfig, stage: PipelineStage, src: Path, stage_dir: Path, log: Callable, resumable: bool) -> dict[str, Any]:
    from .compress.quantize import quantize_folder

    tmp = stage_dir / "model.tmp"
    summary = quantize_folder(src, tmp, stage.quantize.method, overwrite=True, calibration=stage.quantize.calibration or cfg.data.train,
                              store_dtype=stage.quantize.store_dtype)
    _replace(tmp, stage_dir / "model")
    log(f"{stage.name}: {stage.quantize.method}, {summary['size_bytes']:,} -> {summary['quantized_size_bytes']:,} bytes of weights")
    return summary


RUNNERS = {"prune": run_prune, "distill": run_distill, "quantize": run_quantize}


def stage_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Stage name (and "original") -> fingerprint: the stage's settings, the data, chained with its input's fingerprint."""
    fps = {"original": _folder_fingerprint(Path(cfg.original.model)) if Path(cfg.original.model).is_dir() else "missing"}
    inputs = stage_inputs(cfg)
    for s in cfg.stages:
        src = inputs[s.name]
        src_fp = fps.get(src) or _folder_fingerprint(Path(src))
        fps[s.name] = _hash({"stage": s.model_dump(mode="json", exclude={"name"}), "input": src_fp, "data": cfg.data.model_dump(mode="json"), "seed": cfg.seed, "teacher": fps["original"]})
    return fps


def run_stages(cfg: PipelineConfig, *, until: str | None = None, log: Callable = print) -> dict[str, str]:
    """Run every unfinished stage in order (up to and including `until`); returns the fingerprints."""
    check_inputs(cfg)
    ensure_original(cfg, log=log)
    fps = stage_fingerprints(cfg)
    inputs = stage_inputs(cfg)
    for s in cfg.stages:
        stage_dir = Path(cfg.output_dir) / s.name
        if _done(stage_dir, fps[s.name]):
            log(f"{s.name}: done already ({stage_dir / 'model'}), reused")
        else:
            src = _input_dir(cfg, inputs[s.name])
            if not (src / "config.json").is_file():
                raise PipelineError(f"stage {s.name!r}: its input {src} holds no model (stage {inputs[s.name]!r} has not written it)")
            log(f"== {s.name} ({s.kind}): {src} -> {stage_dir / 'model'}")
            stage_dir.mkdir(parents=True, exist_ok=True)
            (stage_dir / "stage.json").unlink(missing_ok=True)
            started = Path(cfg.output_dir) / f".{s.name}.started"  # which stage fingerprint the folder's partial work belongs to (beside it: a run folder holds only the run)
            resumable = started.is_file() and started.read_text().strip() == fps[s.name]
            started.write_text(fps[s.name] + "\n")
            t0 = time.time()
            details = RUNNERS[s.kind](cfg, s, src, stage_dir, log, resumable)
            meta = {"fingerprint": fps[s.name], "kind": s.kind, "input": str(src), "seconds": round(time.time() - t0, 1), "details": details}
            tmp = stage_dir / "stage.json.tmp"
            tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
            tmp.replace(stage_dir / "stage.json")
        if until is not None and s.name == until:
            break
    return fps


# ---------------------------------------------------------------------------------------------
# evaluation


def _status_bytes(key: str) -> int:
    """A byte figure of /proc/self/status: VmRSS (resident now) or VmHWM (the peak of this address space; unlike
    ru_maxrss, which Linux carries over from the parent through fork and exec, it starts afresh in a spawned process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure_model(family: str, model_path: str, val: str, batch: int, repeats: int, threads: int | None, max_length: int) -> dict[str, float]:
    """Latency at batch 1 and at `batch`, and the peak resident memory loading and running the model adds.

    Meant to run in a fresh process (see `measure_isolated`): the peak is the process's, so it must hold nothing but
    this model. Reranker: one query with 1 / `batch` documents; generative: one forward
    (prefill) over 1 / `batch` prompts with their images."""
    import torch

    from .evaluate.bench import measure_latency

    if threads:
        torch.set_num_threads(threads)
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)  # import the model's code (and torchao) before the baseline: count the model, not the libraries
    for arch in config.architectures or []:
        getattr(transformers, arch, None)
    if getattr(config, "quantization_config", None) is not None:
        import torchao  # noqa: F401
    base = _status_bytes("VmRSS")
    if family == "reranker":
        from .data.loaders import load_rerank
        from .evaluate.reranker import query_latency
        from .models import reranker as rm

        cache = rm.ImageCache()
        records, _ = load_rerank(Path(val), "fail", 1, cache, log=lambda *_: None)
        reranker = rm.load_reranker(model_path, max_length=max_length)
        reranker.model.eval()
        reranker.images = cache
        bs1 = query_latency(reranker, records[0], 1)["query_k1"]
        batched = query_latency(reranker, records[0], batch)[f"query_k{batch}"]
    else:
        from .data.loaders import ImageCache, load_chat
        from .models import generative as gm

        images = ImageCache()
        records, _ = load_chat(Path(val), "response", "fail", batch, images, log=lambda *_: None)
        model, processor = gm.load_vlm(model_path)
        model.eval()

        def inputs(recs):
            imgs = [images.all(r) for r in recs]
            texts = [processor.apply_chat_template(gm._messages(r.prompt, len(i), None), tokenize=False, add_generation_prompt=True) for r, i in zip(recs, imgs)]
            flat = [im for i in imgs for im in i]
            enc = dict(processor(text=texts, images=flat or None, padding=True, return_tensors="pt"))
            return gm.model_inputs(model, enc)

        one, many = inputs(records[:1]), inputs((records * batch)[:batch])

        def timed(x):
            def fn():
                with torch.no_grad():  # not inference_mode: torchao's quantized MoE expert tensors cannot be indexed under it
                    model(**x)

            return measure_latency(fn, warmup=2, repeats=repeats)["median_ms"]

        bs1, batched = timed(one), timed(many)
    peak = _status_bytes("VmHWM")
    return {"bs1_ms": bs1, "batch_ms": batched, "batch": batch, "peak_rss_bytes": peak, "peak_added_bytes": max(peak - base, 0)}


def _child(queue, args) -> None:
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        queue.put(("ok", measure_model(*args)))
    except Exception as e:  # reported in the parent as one line
        queue.put(("error", f"{type(e).__name__}: {e}"))


def measure_isolated(*args) -> dict[str, float]:
    """`measure_model` in a fresh (spawned) process."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, args))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise PipelineError(f"measuring {args[1]}: {value}")
    return value


def evaluate_model(cfg: PipelineConfig, name: str, path: Path, out_path: Path, *, log: Callable) -> dict[str, Any]:
    """The family's metrics (with agreement against the original), parameters, size, latency and memory of one model."""
    from .evaluate.bench import size_on_disk

    reference = None if name == "original" else str(Path(cfg.original.model))
    e = cfg.eval
    if cfg.family == "reranker":
        from .evaluate.reranker import evaluate_folder

        res = evaluate_folder(path, cfg.data.val, out_path=out_path, name=name, role="teacher" if name == "original" else "student", max_items=e.max_items, latency=False, reference=reference, max_length=cfg.data.max_length)
    else:
        from .evaluate.generative import evaluate_folder

        res = evaluate_folder(path, cfg.data.val, out_path=out_path, name=name, role="teacher" if name == "original" else "student", max_items=e.max_items, latency=False, reference=reference, max_new_tokens=e.max_new_tokens)
    res["size_bytes"] = size_on_disk(path)
    res["speed"] = measure_isolated(cfg.family, str(path), str(cfg.data.val), e.batch, e.repeats, e.threads, cfg.data.max_length)
    log(f"{name}: {HEADLINES[cfg.family]}={res['metrics'].get(HEADLINES[cfg.family], float('nan')):.2f} params={res['params']:,} "
        f"size={res['size_bytes']:,} B bs1={res['speed']['bs1_ms']:.1f} ms batch{e.batch}={res['speed']['batch_ms']:.1f} ms")
    return res


def evaluate_all(cfg: PipelineConfig, fps: dict[str, str], *, log: Callable = print) -> list[dict[str, Any]]:
    """Evaluate the original and every stage (a result whose fingerprint still matches is reused)."""
    rep = Path(cfg.output_dir) / "report"
    rep.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ["original", *(s.name for s in cfg.stages)]:
        out = rep / f"{name}.eval.json"
        fp = _hash({"model": fps[name], "eval": cfg.eval.model_dump(mode="json"), "val": str(cfg.data.val)})
        res = None
        if out.is_file():
            old = json.loads(out.read_text())
            res = old if old.get("pipeline_fingerprint") == fp else None
        if res is None:
            path = model_dir(cfg, name)
            if not (path / "config.json").is_file():
                raise PipelineError(f"evaluate: {name} has no model at {path}; run the stages first")
            res = evaluate_model(cfg, name, path, out, log=log)
            res["pipeline_fingerprint"] = fp
            out.write_text(json.dumps(res, indent=2))
        else:
            log(f"{name}: evaluated already ({out}), reused")
        res["stage"] = name
        res["kind"] = "original" if name == "original" else next(s.kind for s in cfg.stages if s.name == name)
        rows.append(res)
    return rows


# ---------------------------------------------------------------------------------------------
# the report


def report_rows(cfg: PipelineConfig, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    head = HEADLINES[cfg.family]
    orig = results[0]
    rows = []
    for r in results:
        q = r["metrics"].get(head)
        row = {
            "stage": r["stage"],
            "kind": r["kind"],
            "params": r["params"],
            "size_bytes": r["size_bytes"],
            "bs1_ms": r["speed"]["bs1_ms"],
            "batch_ms": r["speed"]["batch_ms"],
            "peak_added_bytes": r["speed"]["peak_added_bytes"],
            "metrics": r["metrics"],
            "headline": head,
            "retention": 100.0 * q / orig["metrics"][head] if q is not None and orig["metrics"].get(head) else None,
            "size_ratio": 100.0 * r["size_bytes"] / orig["size_bytes"],
            "bs1_ratio": 100.0 * r["speed"]["bs1_ms"] / orig["speed"]["bs1_ms"],
            "batch_ratio": 100.0 * r["speed"]["batch_ms"] / orig["speed"]["batch_ms"],
        }
        rows.append(row)
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def render_markdown(cfg: PipelineConfig, rows: list[dict[str, Any]], *, plot: str | None) -> str:
    head = rows[0]["headline"]
    metric_keys = [k for k in rows[0]["metrics"] if k not in ("top3_overlap", "kendall_tau", "agreement")][:4]
    agree = [k for k in ("top3_overlap", "kendall_tau", "agreement") if any(k in r["metrics"] for r in rows)]
    batch = cfg.eval.batch
    cols = ["stage", "params", "weights on disk", "size vs original", "bs1 ms", f"batch {batch} ms", "batched latency vs original", "peak memory added", *metric_keys, *agree, f"{head} retention"]
    lines = [f"# mmdistill pipeline: {cfg.family}", ""]
    lines.append(f"Original model: `{cfg.original.model}`; evaluated on `{cfg.data.val}` (first {cfg.eval.max_items} records); "
                 f"latency = median of {cfg.eval.repeats} calls ({'one query with 1 / ' + str(batch) + ' documents' if cfg.family == 'reranker' else 'one forward over 1 / ' + str(batch) + ' prompts'}), "
                 "each model timed in its own fresh process; peak memory = the rise of that process's peak RSS from loading and running the model.")
    lines += ["", "| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        cells = [
            f"{r['stage']} ({r['kind']})",
            f"{r['params'] / 1e6:.3f}M",
            _mib(r["size_bytes"]),
            f"{r['size_ratio']:.1f}%",
            f"{r['bs1_ms']:.1f}",
            f"{r['batch_ms']:.1f}",
            f"{r['batch_ratio']:.1f}%",
            _mib(r["peak_added_bytes"]),
            *[f"{r['metrics'][k]:.2f}" if k in r["metrics"] else "—" for k in metric_keys],
            *[f"{r['metrics'][k]:.2f}" if k in r["metrics"] else "—" for k in agree],
            f"{r['retention']:.1f}%" if r["retention"] is not None else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    final = rows[-1]
    lines += ["", f"Final stage ({final['stage']}): {final['size_ratio']:.1f}% of the original's bytes on disk, {final['bs1_ratio']:.1f}% of its "
              f"batch-1 latency and {final['batch_ratio']:.1f}% of its batched latency, {final['retention']:.1f}% of its {head}."
              if final["retention"] is not None else ""]
    if plot:
        lines += ["", f"![{head} against size and latency]({plot})"]
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> bool:
    """Quality against size on disk and against batched latency, one point per stage."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    head = rows[0]["headline"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "size_bytes", "weights on disk (MiB)"), (axes[1], "batch_ms", "batched latency (ms)")):
        xs = [r[key] / 2**20 if key == "size_bytes" else r[key] for r in rows]
        ys = [r["metrics"].get(head, float("nan")) for r in rows]
        ax.plot(xs, ys, "-o", color="tab:blue", alpha=0.6)
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(r["stage"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(head)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{head} against size and latency, per pipeline stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(cfg: PipelineConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    rep = Path(cfg.output_dir) / "report"
    rows = report_rows(cfg, results)
    has_plot = plot_tradeoff(rows, rep / "tradeoff.png")
    (rep / "report.md").write_text(render_markdown(cfg, rows, plot="tradeoff.png" if has_plot else None))
    out = {"family": cfg.family, "original": cfg.original.model, "rows": rows}
    (rep / "report.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def run_pipeline(cfg: PipelineConfig | str | Path, overrides: list[str] | None = None, *, until: str | None = None, log: Callable = print) -> dict[str, Any]:
    """Run (or resume) a pipeline: its stages, then the evaluation of every stage and the report."""
    if not isinstance(cfg, PipelineConfig):
        cfg = load_pipeline(cfg, overrides)
    if until is not None and until not in {s.name for s in cfg.stages}:
        raise PipelineError(f"--until {until!r}: no such stage (stages: {', '.join(s.name for s in cfg.stages)})")
    fps = run_stages(cfg, until=until, log=log)
    if until is not None and until != cfg.stages[-1].name:
        log(f"stopped after stage {until!r}; run again without --until to continue")
        return {"stopped_after": until}
    return write_report(cfg, evaluate_all(cfg, fps, log=log))
