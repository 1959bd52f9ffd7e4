"""The contrastive recipe: plain training (teachers, baselines) and distillation of dual encoders.

Reads top to bottom: load records -> build teacher and student -> each model's own
processor encodes every record once -> the step module (student forward, frozen teacher
forward, gather across processes, composite loss) -> the engine loop -> save the student
as a plain Hugging Face folder -> evaluate -> eval.json.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import Recipe, RecipeError
from ..data.loaders import load_pairs
from ..engine.loop import seed_everything, train_loop
from ..losses.composite import CONTRASTIVE_TERMS, build_contrastive_loss
from ..models import contrastive as cm
from ..signals import Signals
from .common import build_recipe, check_run_dir, evaluate_with, freeze as _freeze, gradient_checkpointing, make_accelerator, save_loss_modules, train_summary, write_run_dir


# ---------------------------------------------------------------------------------------------
# data


# ---------------------------------------------------------------------------------------------
# the step module


def _gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate a per-process batch across processes (rank order), keeping autograd when asked."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), 0)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def _gather_signals(sig: Signals, with_grad: bool) -> Signals:
    sig.image_embeds = _gather(sig.image_embeds, with_grad)
    sig.text_embeds = _gather(sig.text_embeds, with_grad)
    sig.features = {k: _gather(v, with_grad) for k, v in sig.features.items()}
    return sig


def needs_features(loss) -> bool:
    """Whether any term of the composite loss reads tower features (not only embeddings)."""
    return any(getattr(t, "needs_features", False) for t in loss.term_modules.values())


class ContrastiveStep(nn.Module):
    """forward(indices, progress) -> {"loss", parts...} for a dual-encoder student.

    The teacher is held outside the module tree: it is not trained, not saved in
    checkpoints, not wrapped by DDP, and `.train()` on this module never reaches it.
    Each process encodes its slice of the global batch; embeddings are gathered (with
    gradients for the student) so in-batch negatives span the whole global batch and
    P processes compute the same loss as one process with the same global batch.
    """

    def __init__(self, student, loss, s_data: cm.Encoded, teacher=None, t_data: cm.Encoded | None = None, t_cache: Signals | None = None, store=None):
        super().__init__()
        self.student = student
        self.loss = loss
        self.s_data = s_data
        self.t_data = t_data
        self.t_cache = t_cache
        object.__setattr__(self, "_teacher", teacher)
        object.__setattr__(self, "_store", store)  # a teachers.cache.StoreTeacher
        self.needs_features = needs_features(loss)

    def prepare(self, indices: list[int], progress: float) -> dict[str, Any]:
        """The CPU side of a micro-batch (engine/prefetch.py): the student's batch (decoded now when the data streams), and
        the teacher's batch, cached rows or stored signals."""
        out: dict[str, Any] = {"batch": self.s_data.batch(indices)}
        if self._store is not None:
            out["t_sig"] = self._store.contrastive(indices)
        elif self.t_cache is not None:
            idx = torch.tensor(indices)
            out["t_sig"] = Signals(
                image_embeds=self.t_cache.image_embeds[idx],
                text_embeds=self.t_cache.text_embeds[idx],
                logit_scale=self.t_cache.logit_scale,
                features={k: v[idx] for k, v in self.t_cache.features.items()},
            )
        elif self._teacher is not None:
            out["t_batch"] = self.t_data.batch(indices)
        return out

    def teacher_signals(self, prepared: dict[str, Any], device) -> Signals | None:
        if "t_sig" in prepared:
            sig = prepared["t_sig"].to(device)
        elif "t_batch" in prepared:
            batch = {k: v.to(device) for k, v in prepared["t_batch"].items()}
            with torch.no_grad():
                sig = cm.encode(self._teacher, batch, features=self.needs_features).detach()
        else:
            return None
        return _gather_signals(sig, with_grad=False)

    def forward(self, prepared: dict[str, Any] | list[int], progress: float) -> dict[str, torch.Tensor]:
        if isinstance(prepared, list):  # indices: prepared here (no prefetching)
            prepared = self.prepare(prepared, progress)
        device = next(self.student.parameters()).device
        batch = {k: v.to(device) for k, v in prepared["batch"].items()}
        s = _gather_signals(cm.encode(self.student, batch, features=self.needs_features), with_grad=True)
        t = self.teacher_signals(prepared, device)
        return self.loss(s, t, batch, progress)


@torch.no_grad()
def precompute_teacher(teacher, t_data: cm.Encoded, features: bool, batch_size: int = 256) -> Signals:
    """Teacher signals for every record, once (valid because training applies no augmentation)."""
    device = next(teacher.parameters()).device
    parts: list[Signals] = []
    for i in range(0, len(t_data), batch_size):
        batch = {k: v.to(device) for k, v in t_data.batch(list(range(i, min(i + batch_size, len(t_data))))).items()}
        parts.append(cm.encode(teacher, batch, features=features).to("cpu"))  # the cache lives on the CPU
    feats = {k: torch.cat([p.features[k] for p in parts]) for k in parts[0].features}
    return Signals(
        image_embeds=torch.cat([p.image_embeds for p in parts]),
        text_embeds=torch.cat([p.text_embeds for p in parts]),
        logit_scale=parts[0].logit_scale,
        features=feats,
    )


# ---------------------------------------------------------------------------------------------
# building models


def build_dual(recipe: Recipe, teacher_proc, texts: list[str]):
    """init=dual: a timm image tower + a tiny text tower (models/dual.py), with the tokenizer the recipe names."""
    from transformers import AutoTokenizer

    from ..models.dual import build_dual_student

    d = recipe.student.dual
    it, tt = d.image_tower, d.text_tower
    tokenizer = None
    if tt.tokenizer == "teacher":
        if teacher_proc is None:
            raise RecipeError(f"{recipe.output_dir}: student.dual.text_tower.tokenizer=teacher needs a `teacher:` section")
        tokenizer = teacher_proc.tokenizer
    elif tt.tokenizer != "wordpiece":
        try:
            tokenizer = AutoTokenizer.from_pretrained(tt.tokenizer)
        except (OSError, ValueError) as e:
            raise RecipeError(f"student.dual.text_tower.tokenizer: cannot load {tt.tokenizer!r}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return build_dual_student(
        texts, timm_name=it.timm, model_args=it.model_args, image_weights=it.weights, text_weights=tt.weights, image_size=it.image_size, projection_dim=d.projection_dim,
        text_arch=tt.arch, hidden_size=tt.hidden_size, num_hidden_layers=tt.num_hidden_layers, num_attention_heads=tt.num_attention_heads,
        intermediate_size=tt.intermediate_size, vocab_size=tt.vocab_size, max_length=tt.max_length, tokenizer=tokenizer, seed=recipe.seed,
    )


class _Texts(Sequence):
    """The captions of lazily read records (``data.stream``), read when used rather than held."""

    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i].text


def build_student(recipe: Recipe, teacher, teacher_proc, texts: list[str]):
    s = recipe.student
    if s.init == "dual":
        return build_dual(recipe, teacher_proc, texts)
    if s.init == "tiny":
        return cm.build_tiny_clip(None, texts, preset=s.preset or "clip-student", seed=recipe.seed, overrides=s.overrides or None)
    if s.init == "pretrained":
        return cm.load_model(s.model)
    if s.model:
        base, proc = cm.load_model(s.model)
    else:
        base, proc = teacher, teacher_proc
    if s.init == "scratch":
        return cm.scratch_student(base.config, s.overrides, seed=recipe.seed), proc
    return cm.inherit_student(base, s.layers, s.overrides), proc


# ---------------------------------------------------------------------------------------------
# the run


def evaluate_run(recipe: Recipe, out_path: Path | None = None) -> dict[str, Any]:
    """Evaluate the run's saved model on `data.val` with the recipe's eval settings; writes `out_path` (default:
    the run's eval.json). Also what a benchmark calls to re-evaluate a finished run with other eval settings."""
    from ..evaluate.contrastive import evaluate_folder

    return evaluate_with(evaluate_folder, recipe, out_path, reference=False, zeroshot=recipe.data.zeroshot, ks=recipe.eval.ks)


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, log=print, evaluate_after: bool = True) -> dict[str, Any]:
    out = Path(recipe.output_dir)
    # find_unused_parameters: a student parameter the chosen loss never reads (SigLIP's logit_bias, the
    # logit scale under fd alone) must not stall DDP's gradient reduction
    accelerator = make_accelerator(recipe.train.precision)
    fp = recipe.fingerprint()
    clear = check_run_dir(out, fp, resume=resume, overwrite=overwrite)  # every process raises the same error
    seed_everything(recipe.seed)

    records, images, errors = load_pairs(recipe.data.train, recipe.data.on_error, recipe.data.max_records, log=log, decode=not recipe.data.stream)
    texts = _Texts(records) if recipe.data.stream else [r.text for r in records]
    log(f"train: {len(records)} pairs from {recipe.data.train}" + (f" ({len(errors)} skipped)" if errors else ""))

    teacher = teacher_proc = store = None
    if recipe.teacher is not None and recipe.teacher.kind == "store":
        from ..teachers.cache import StoreTeacher

        store = StoreTeacher(recipe, records, log=log)  # embeddings (and features) from the store; no teacher weights
    elif recipe.teacher is not None:
        teacher, teacher_proc = cm.load_model(recipe.teacher.model, trust_remote_code=recipe.teacher.trust_remote_code)
        _freeze(teacher)
        teacher.to(accelerator.device)
    terms = {name: {"weight": t.weight, **({"schedule": t.schedule} if t.schedule else {}), **t.options} for name, t in recipe.loss.terms.items()}
    task_terms = {name for name, cls in CONTRASTIVE_TERMS.items() if not cls.needs_teacher}  # clip, siglip
    if teacher is None and store is None and set(terms) - task_terms:
        raise RecipeError(f"loss terms {sorted(set(terms) - task_terms)} need a teacher; add `teacher:` to the recipe")
    try:  # student overrides, presets and loss terms are checked here: a bad one is a recipe error
        student, s_proc = build_student(build_recipe(recipe, store), teacher, teacher_proc, texts)
        t_dim = cm.embed_dim(teacher) if teacher is not None else (store.constants["dims"]["embed"] if store is not None else None)
        loss = build_contrastive_loss(terms, cm.embed_dim(student), t_dim)
    except cm.PairingError:
        raise
    except ValueError as e:
        raise RecipeError(f"{recipe.output_dir}: {e}") from None
    gradient_checkpointing(student, recipe)
    student.train()

    if recipe.data.stream:  # each batch's images decoded and processed when the step needs them
        s_data = cm.LazyEncoded(s_proc, records, str(recipe.data.train))
        t_data = cm.LazyEncoded(teacher_proc, records, str(recipe.data.train)) if teacher is not None else None
    else:
        s_data = cm.preprocess_pairs(s_proc, images, texts)
        t_data = cm.preprocess_pairs(teacher_proc, images, texts) if teacher is not None else None
    if teacher is not None and recipe.teacher.cache:
        # the cache replaces the live teacher: neither it nor its inputs are kept for training
        t_cache = precompute_teacher(teacher, t_data, needs_features(loss))
        teacher = t_data = None
        step = ContrastiveStep(student, loss, s_data, t_cache=t_cache)
    else:
        step = ContrastiveStep(student, loss, s_data, teacher=teacher, t_data=t_data, store=store)

    # everything is built and checked: only now does the run folder change
    if accelerator.is_main_process:
        write_run_dir(out, fp, recipe.model_dump(mode="json"), clear)
    accelerator.wait_for_everyone()

    def save_final(unwrapped: ContrastiveStep) -> None:
        final = out / "model"
        unwrapped.student.save_pretrained(final)
        s_proc.save_pretrained(final)
        save_loss_modules(unwrapped.loss, out)

    result = train_loop(step, n_items=len(s_data), cfg=recipe.train, out_dir=out, seed=recipe.seed, fingerprint=fp, resume=resume, accelerator=accelerator, on_end=save_final)
    summary: dict[str, Any] = train_summary(result, errors, out, write=accelerator.is_main_process)
    if accelerator.is_main_process:
        if evaluate_after and recipe.data.val is not None:
            summary["eval"] = evaluate_run(recipe)
    return summary
