"""Pieces every recipe shares: the run folder contract and freezing a teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


class RunDirError(ValueError):
    """The output folder holds another run (refuse unless --resume or --overwrite)."""


def check_run_dir(out: Path, fingerprint: str, *, resume: bool, overwrite: bool) -> bool:
    """Refuse to mix runs (read-only, safe on every process). Returns True when `out` must be cleared first.

    A folder that holds another run needs --overwrite; the same run needs --resume or --overwrite;
    a folder with other files is never touched. A run that failed before its first checkpoint
    (run.json and no checkpoint) counts as empty, so fixing the recipe and re-running just works.
    """
    from ..engine.checkpoint import list_checkpoints

    if not out.exists() or not any(out.iterdir()):
        return False
    meta = out / "run.json"
    if not meta.is_file():
        raise RunDirError(f"{out}: folder is not empty and holds no mmdistill run; choose another output_dir")
    started = bool(list_checkpoints(out / "checkpoints")) or (out / "model").is_dir()
    if overwrite or not started:
        return True
    try:
        old = json.loads(meta.read_text()).get("fingerprint")
    except ValueError:
        old = None
    if old != fingerprint:
        raise RunDirError(f"{out}: holds a different run (recipe {old} != {fingerprint}); pass --overwrite to replace it")
    if not resume:
        raise RunDirError(f"{out}: holds this run already; pass --resume to continue it or --overwrite to start over")
    return False


def write_run_dir(out: Path, fingerprint: str, recipe_json: dict, clear: bool) -> None:
    """Main process only: clear a previous run (only a folder that holds run.json) and record this one."""
    if clear and (out / "run.json").is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"fingerprint": fingerprint, "recipe": recipe_json}, indent=2))



def freeze(model) -> None:
    """Eval mode, no gradients: the frozen-teacher contract."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def gradient_checkpointing(model, recipe) -> None:
    """``train.gradient_checkpointing``: recompute the model's block activations in backward (non-reentrant)."""
    if not recipe.train.gradient_checkpointing:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        from ..config import RecipeError

        raise RecipeError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    model.activation_checkpointing_enable({"use_reentrant": False})


def make_accelerator(precision: str):
    """The Accelerator every recipe trains under: AMP on GPU, fp32 on CPU; DDP tolerates parameters a loss never reads."""
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from ..engine.loop import _mixed_precision
    from ..engine.zero import take_launch_env

    take_launch_env()  # a DeepSpeed / FSDP launch: the loop shards itself (engine/zero.py, engine/sharding.py)
    return Accelerator(
        mixed_precision=_mixed_precision(precision),
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def save_loss_modules(loss, out: Path) -> None:
    """Projectors and learned scales of the loss (not part of the exported student), if any."""
    state = loss.state_dict()
    if len(state):
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "loss_modules.safetensors"))


def train_summary(result, errors: list, out: Path, write: bool) -> dict:
    """What train_summary.json holds; the main process (`write`) writes it."""
    import resource

    summary = {
        "steps": result.step, "resumed_from": result.resumed_from, "train_seconds": result.seconds,
        "samples_per_s": result.samples / result.seconds if result.seconds > 0 else None,
        # the process's peak resident memory so far (Linux reports KiB): model building and data included
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "last": result.last, "skipped_records": len(errors),
    }
    if result.peak_rss_per_process:
        summary["peak_rss_bytes_per_process"] = result.peak_rss_per_process
        summary["state_bytes_per_process"] = result.state_bytes_per_process  # weights + optimizer state each process holds
    if write:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def teacher_model(recipe) -> str | None:
    """The recipe's teacher model: `teacher.model`, else (kind=store) the model the store was made by."""
    t = recipe.teacher
    if t is None:
        return None
    if t.model:
        return t.model
    manifest = Path(t.path) / "manifest.json"
    return json.loads(manifest.read_text())["teacher"]["model"] if manifest.is_file() else None


def build_recipe(recipe, store):
    """The recipe the student is built from: with a store, a student shaped after the teacher (scratch / inherit
    without `student.model`) is built from the store's teacher folder (its weights are read only for this)."""
    if store is None or recipe.student.model or recipe.student.init not in ("scratch", "inherit"):
        return recipe
    return recipe.model_copy(update={"student": recipe.student.model_copy(update={"model": store.model})})


def evaluate_with(evaluate_folder, recipe, out_path: Path | None = None, *, reference: bool = True, **options) -> dict:
    """Evaluate a run's saved model on `data.val` with the recipe's eval settings and a family's `evaluate_folder`;
    writes `out_path` (default: the run's eval.json). `options`: the family's own settings. A student is compared
    with `eval.reference`, else its teacher, when `reference`."""
    out = Path(recipe.output_dir)
    role = recipe.role or ("student" if recipe.teacher is not None else "teacher")
    if reference:
        options["reference"] = recipe.eval.reference or teacher_model(recipe)
    return evaluate_folder(
        out / "model", recipe.data.val, out_path=out_path or out / "eval.json", name=recipe.name or out.name, role=role,
        max_items=recipe.eval.max_items, latency=recipe.eval.latency, **options,
    )
