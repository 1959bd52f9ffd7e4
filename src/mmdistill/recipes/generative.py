"""The generative recipe: supervised fine-tuning (full or LoRA) and distillation of vision-language models.

Reads top to bottom: load chat records (every image decoded once; bad records fail or are
skipped) -> build teacher and student (tiny / scratch / inherit / pretrained / composed from
parts), check that logit KD can pair them -> the step module (each model encodes the same records
with its own processor; logits only at response tokens; the composite loss of the named terms
below) -> the engine loop -> save the student (and the LoRA adapter) as plain folders -> evaluate.

Loss terms (``loss.terms``):
- ``sft``: cross-entropy on the response tokens (of ``data.response_field``: ``response`` for
  plain fine-tuning, ``teacher_response`` for black-box / sequence-level KD).
- ``kd``: white-box token-level divergence on response tokens (options: ``divergence`` one of
  forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd; ``temperature`` number or schedule;
  ``scale_t2``; ``chunk_size`` positions per chunk; ``beta`` / ``alpha``).
- ``vision``: MSE between the pooled merged visual tokens of student and teacher (learned
  projection when widths differ); only samples with an image count. Options ``kind`` (mse | cosine),
  ``normalize``, ``center`` (subtract each side's mean over the batch's counted samples first).
- ``audio``: the same for the audio tower's output tokens (Qwen3-Omni thinker; the same options);
  only samples with an audio clip count.
- ``text``: cosine between hidden states at response tokens, for each pair of a layer map
  (``layers: [[student_layer, teacher_layer], ...]``, default ``[[-2, -2]]``, the penultimate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..config import Recipe, RecipeError
from ..data.loaders import ImageCache, load_chat
from ..data.records import ChatRecord, RecordError
from ..engine.loop import seed_everything, train_loop
from ..engine.schedules import make_schedule
from ..losses.composite import CompositeLoss, FeatureDistillTerm, LogitDistillTerm, LossTerm
from ..losses.features import FeatureLoss
from ..signals import Signals
from .common import build_recipe, check_run_dir, evaluate_with, freeze, gradient_checkpointing, make_accelerator, save_loss_modules, train_summary, write_run_dir

TEACHER_TERMS = ("kd", "vision", "audio", "text")
GENERATIVE_TERMS = ("sft", "kd", "vision", "audio", "text")
_POOLED = {"vision": ("vision_pooled", "has_image"), "audio": ("audio_pooled", "has_audio")}  # term -> (feature, sample mask)


# ---------------------------------------------------------------------------------------------
# data


class Curriculum:
    """Difficulty curriculum: a record with tag `d` is eligible once progress >= start[d].

    ``pick(indices, progress)`` maps the engine's indices (a function of the step only) onto the
    eligible records, deterministically, so resume and multi-process runs stay exact.
    """

    def __init__(self, records: Sequence[ChatRecord], start: dict[str, float] | None):
        self.start = {str(k): float(v) for k, v in (start or {}).items()}
        self.tags = [str(r.difficulty) if r.difficulty is not None else None for r in records]
        unknown = sorted({t for t in self.tags if t is not None} - set(self.start)) if self.start else []
        if unknown:
            raise RecipeError(f"data.curriculum has no start for difficulty tag(s) {unknown}; give each tag a start in [0, 1]")
        self._cache: dict[tuple, list[int]] = {}

    def eligible(self, progress: float) -> list[int]:
        key = tuple(sorted(t for t, s in self.start.items() if s <= progress))
        if key not in self._cache:
            self._cache[key] = [i for i, t in enumerate(self.tags) if t is None or t in key]
        return self._cache[key]

    def pick(self, indices: list[int], progress: float) -> list[int]:
        if not self.start:
            return indices
        pool = self.eligible(progress)
        if not pool:
            raise RecipeError(f"data.curriculum: no record is eligible at progress {progress:.2f}; give some tag start 0")
        return [pool[i % len(pool)] for i in indices]


# ---------------------------------------------------------------------------------------------
# loss


class LayerMapTextTerm(nn.Module):
    """Cosine (or MSE) between student and teacher hidden states at response tokens, per layer pair.

    ``layers``: ``[[student_layer, teacher_layer], ...]`` (negative = from the end). Each pair has
    its own projector when widths differ. Reads ``features["text@<layer>"] [B, R, D]``. -> []
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, layers: Sequence[Sequence[int]] = ((-2, -2),), kind: str = "cosine"):
        super().__init__()
        try:
            self.layers = [(int(s), int(t)) for s, t in layers]
        except (TypeError, ValueError):
            raise ValueError(f"layers must be a list of [student_layer, teacher_layer] pairs, got {layers!r}") from None
        if not self.layers:
            raise ValueError("layers must name at least one [student_layer, teacher_layer] pair")
        self.losses = nn.ModuleList([FeatureLoss(kind, student_dim=student_dim, teacher_dim=teacher_dim) for _ in self.layers])

    def student_layers(self) -> list[int]:
        return [s for s, _ in self.layers]

    def teacher_layers(self) -> list[int]:
        return [t for _, t in self.layers]

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        if teacher is None:
            raise ValueError("text feature distillation needs teacher Signals")
        total = 0.0
        for (s, t), loss in zip(self.layers, self.losses):
            total = total + loss(student.features[f"text@{s}"], teacher.features[f"text@{t}"], student.mask)
        return total / len(self.layers)


class SFTTerm(nn.Module):
    """Cross-entropy of the student on the response tokens (plain SFT or black-box KD). -> []"""

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        from ..models.generative import response_ce

        return response_ce(student, batch, num_items=batch.get("num_items"))


def build_generative_loss(terms: dict[str, dict[str, Any]], *, student_dims: dict[str, int], teacher_dims: dict[str, int] | None) -> CompositeLoss:
    """A CompositeLoss of generative terms (see the module docstring) from a recipe's `loss.terms`."""
    if not terms:
        raise ValueError(f"no loss terms given; choose from: {', '.join(GENERATIVE_TERMS)}")
    built: dict[str, LossTerm] = {}
    for name, spec in terms.items():
        if name not in GENERATIVE_TERMS:
            raise ValueError(f"unknown generative loss term {name!r}; valid terms: {', '.join(GENERATIVE_TERMS)}")
        if name in TEACHER_TERMS and teacher_dims is None:
            raise ValueError(f"loss term {name!r} needs a teacher; add `teacher:` to the recipe")
        spec = dict(spec or {})
        weight = float(spec.pop("weight", 1.0))
        schedule = spec.pop("schedule", None)
        try:
            schedule = make_schedule(schedule) if schedule is not None else None
            if name == "sft":
                if spec:
                    raise ValueError(f"unknown option(s) {sorted(spec)}; sft takes none")
                fn: nn.Module = SFTTerm()
            elif name == "kd":
                divergence = spec.pop("divergence", "forward_kl")
                fn = LogitDistillTerm(divergence, **spec)
            elif name in _POOLED:
                unknown = sorted(set(spec) - {"kind", "normalize", "center"})
                if unknown:
                    raise ValueError(f"unknown option(s) {unknown}; valid: kind, normalize, center")
                feature, present = _POOLED[name]
                if name not in student_dims or name not in teacher_dims:
                    raise ValueError(f"the {'student' if name not in student_dims else 'teacher'} has no {name} tower")
                fn = FeatureDistillTerm(feature, student_dims[name], teacher_dims[name], kind=spec.get("kind", "mse"), normalize=spec.get("normalize", False), sample_mask=present, center=bool(spec.get("center", False)))
            else:
                unknown = sorted(set(spec) - {"layers", "kind"})
                if unknown:
                    raise ValueError(f"unknown option(s) {unknown}; valid: layers, kind")
                fn = LayerMapTextTerm(student_dims["hidden"], teacher_dims["hidden"], **spec)
        except (TypeError, ValueError) as e:
            raise ValueError(f"loss term {name!r}: {e}") from None
        built[name] = LossTerm(fn, weight, schedule)
    return CompositeLoss(built)


def wanted_features(loss: CompositeLoss) -> tuple[dict[str, Any], dict[str, Any]]:
    """Which features the student and the teacher must produce for this loss."""
    s: dict[str, Any] = {}
    t: dict[str, Any] = {}
    for fn in loss.term_modules.values():
        if isinstance(fn, FeatureDistillTerm):
            s[fn.feature] = t[fn.feature] = True
        if isinstance(fn, LayerMapTextTerm):
            s.setdefault("text_layers", []).extend(fn.student_layers())
            t.setdefault("text_layers", []).extend(fn.teacher_layers())
    return s, t


# ---------------------------------------------------------------------------------------------
# the step module


class GenerativeStep(nn.Module):
    """forward(indices, progress) -> {"loss", parts...} for a VLM student.

    Student and teacher each encode the same records with their own processor (they may see a
    different number of image tokens); logits are taken only at response tokens, so both give
    ``[B, R, V]`` aligned on the response. The teacher sits outside the module tree.
    """

    def __init__(self, student, s_proc, loss: CompositeLoss, records, images: ImageCache, *, path: str, response_field: str, max_length: int, curriculum: Curriculum, teacher=None, t_proc=None, store=None):
        super().__init__()
        self.student = student
        self.loss = loss
        self.records = records
        self.images = images
        self.path = path
        self.response_field = response_field
        self.max_length = max_length
        self.curriculum = curriculum
        self.s_feats, self.t_feats = wanted_features(loss)
        object.__setattr__(self, "_s_proc", s_proc)
        object.__setattr__(self, "_teacher", teacher)
        object.__setattr__(self, "_t_proc", t_proc)
        object.__setattr__(self, "_store", store)  # a teachers.cache.StoreTeacher: stored sparse signals instead of a live teacher

    def _encode(self, proc, recs, imgs) -> dict:
        from ..models import generative as gm

        rate = gm.audio_sampling_rate(proc)  # each model hears the clips at its own processor's rate
        auds = [self.images.audio(r, rate) if rate is not None else [] for r in recs]
        return gm.encode_chat(proc, recs, imgs, audios=auds, response_field=self.response_field, max_length=self.max_length, path=self.path)

    @staticmethod
    def _signals(model, batch: dict, feats, device) -> tuple[Signals, dict]:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        if hasattr(model, "get_base_model"):  # a PEFT model: its LoRA layers live inside the base model
            model = model.get_base_model()
        return signals_with_features(model, batch, feats), batch

    def prepare(self, indices: list[int], progress: float) -> dict[str, Any]:
        """The CPU side of a micro-batch (engine/prefetch.py): the curriculum's records, their images and clips, each
        model's encoding of them with its own processor, and the stored teacher signals."""
        picked = self.curriculum.pick(indices, progress)
        recs = [self.records[i] for i in picked]
        imgs = [self.images.all(r) for r in recs]
        out: dict[str, Any] = {"recs": recs, "batch": self._encode(self._s_proc, recs, imgs)}
        if self._store is not None:
            out["t_sig"] = self._store.generative(picked, out["batch"], self.path, [r.line for r in recs])
        elif self._teacher is not None:
            out["t_batch"] = self._encode(self._t_proc, recs, imgs)
        return out

    def forward(self, prepared: dict[str, Any] | list[int], progress: float) -> dict[str, Tensor]:
        if isinstance(prepared, list):  # indices: prepared here (no prefetching)
            prepared = self.prepare(prepared, progress)
        device = next(self.student.parameters()).device
        s, batch = self._signals(self.student, prepared["batch"], self.s_feats, device)
        t = None
        if "t_sig" in prepared:
            t = prepared["t_sig"].to(device)
        elif "t_batch" in prepared:
            with torch.no_grad():
                t, t_batch = self._signals(self._teacher, prepared["t_batch"], self.t_feats, device)
            t = t.detach()
            if not torch.equal(t_batch["response_ids"], batch["response_ids"]):
                recs = prepared["recs"]
                raise RecordError(self.path, recs[0].line, self.response_field, "teacher and student tokenise the response differently; logit KD needs the same tokenizer")
        return self.loss(s, t, batch, progress)


def signals_with_features(model, batch: dict, feats: dict[str, Any]) -> Signals:
    """forward_signals plus the text features of every layer a layer map names (``text@<layer>``)."""
    from ..models import generative as gm

    layers = sorted(set(feats.get("text_layers", [])))
    names = [f for f in ("vision_pooled", "audio_pooled") if feats.get(f)] + (["text_hidden"] if layers else [])
    sig = gm.forward_signals(model, batch, features=tuple(names), text_layer=layers)  # a list: {layer: [B, R, D]}
    for layer, hidden in (sig.features.pop("text_hidden") if layers else {}).items():
        sig.features[f"text@{layer}"] = hidden
    return sig


# ---------------------------------------------------------------------------------------------
# building models


def record_texts(records: Sequence[ChatRecord]) -> list[str]:
    out = []
    for r in records:
        out.append(r.prompt)
        for text in (r.response, r.teacher_response):
            if text:
                out.append(text)
    return out


def build_student(recipe: Recipe, teacher, t_proc, records):
    from ..models import generative as gm

    s = recipe.student
    if s.init == "tiny":
        from ..models.tiny import build_tiny_lm, build_tiny_vlm

        tok = getattr(t_proc, "tokenizer", t_proc) if t_proc is not None else None  # a text-only teacher's processor is its tokenizer
        if s.arch == "qwen3":  # text-only: a Qwen3ForCausalLM whose processor is the tokenizer
            return build_tiny_lm(None, record_texts(records), preset=s.preset or "vlm-student", seed=recipe.seed, overrides=s.overrides or None, tokenizer=tok)
        return build_tiny_vlm(None, record_texts(records), kind=s.arch, preset=s.preset or "vlm-student", seed=recipe.seed, overrides=s.overrides or None, tokenizer=tok, image_size=s.image_size or 64)
    if s.init == "pretrained":
        return gm.load_vlm(s.model)
    if s.init == "compose":
        from ..models.compose import compose_vlm

        if not {"vision", "language"} <= set(s.parts):
            raise RecipeError("student.init=compose needs student.parts.vision and student.parts.language (model folders)")
        return compose_vlm(s.parts["vision"], s.parts["language"], seed=recipe.seed)
    if s.model:
        base, proc = gm.load_vlm(s.model)
    else:
        base, proc = teacher, t_proc
    if s.init == "scratch":
        return gm.scratch_student(base.config, s.overrides, seed=recipe.seed), proc
    # inherit: prune the teacher's widths (compress.prune), then keep its chosen layers
    from ..compress.prune import collect_importance, prune_widths, split_widths

    widths, rest = split_widths(s.overrides)
    model = base
    if widths:
        sample = list(records[: s.calibration])
        if not sample:
            raise RecipeError(f"{recipe.output_dir}: pruning the teacher's widths needs training records to calibrate on")

        def calibrate(m) -> None:
            device = next(m.parameters()).device
            for i in range(0, len(sample), 8):
                group = sample[i : i + 8]
                batch = gm.encode_chat(proc, group, [r.load_images() for r in group])
                gm.forward_signals(m, {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})

        model = prune_widths(base, widths, collect_importance(base, calibrate))
    if s.layers or rest:
        model = gm.inherit_student(model, s.layers, rest or None)
    return model, proc


def set_trainable(model, which: str) -> None:
    """all | projector (align stage of a composed student) | no_vision."""
    if which == "all":
        return
    from ..models.compose import freeze_for_stage

    freeze_for_stage(model, {"projector": "align", "no_vision": "joint"}[which])


def dims(model) -> dict[str, int]:
    from ..models import generative as gm

    out = {"hidden": gm.hidden_size(model), "vision": gm.vision_feature_size(model)}
    if gm.has_audio_tower(model):
        out["audio"] = gm.audio_feature_size(model)
    return out


# ---------------------------------------------------------------------------------------------
# the run


def evaluate_run(recipe: Recipe, out_path: Path | None = None) -> dict[str, Any]:
    """Evaluate the run's saved model on `data.val` with the recipe's eval settings; writes `out_path` (default:
    the run's eval.json). Also what a benchmark calls to re-evaluate a finished run with other eval settings."""
    from ..evaluate.generative import evaluate_folder

    return evaluate_with(evaluate_folder, recipe, out_path, max_new_tokens=recipe.eval.max_new_tokens)


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, log=print, evaluate_after: bool = True) -> dict[str, Any]:
    from ..models import generative as gm
    from ..models.contrastive import PairingError

    out = Path(recipe.output_dir)
    accelerator = make_accelerator(recipe.train.precision)
    fp = recipe.fingerprint()
    clear = check_run_dir(out, fp, resume=resume, overwrite=overwrite)
    seed_everything(recipe.seed)

    images = ImageCache(max_items=4096, source=str(recipe.data.train)) if recipe.data.stream else ImageCache()
    path = str(recipe.data.train)
    records, errors = load_chat(recipe.data.train, recipe.data.response_field, recipe.data.on_error, recipe.data.max_records, images, log=log, decode=not recipe.data.stream)
    log(f"train: {len(records)} chat records from {path}" + (f" ({len(errors)} skipped)" if errors else ""))
    curriculum = Curriculum(records, recipe.data.curriculum)

    terms = {name: {"weight": t.weight, **({"schedule": t.schedule} if t.schedule else {}), **t.options} for name, t in recipe.loss.terms.items()}
    if recipe.teacher is None and set(terms) & set(TEACHER_TERMS):
        raise RecipeError(f"loss terms {sorted(set(terms) & set(TEACHER_TERMS))} need a teacher; add `teacher:` to the recipe")
    teacher = t_proc = store = None
    if recipe.teacher is not None and recipe.teacher.kind == "store":
        from transformers import AutoProcessor

        from ..teachers.cache import StoreTeacher

        store = StoreTeacher(recipe, records, log=log)  # no teacher weights: its stored signals, checked against the recipe
        try:
            t_proc = AutoProcessor.from_pretrained(store.model)  # the tokenizer a tiny student shares (the store must be used with it)
        except (OSError, ValueError):
            t_proc = None
    elif recipe.teacher is not None:
        if recipe.teacher.cache:
            raise RecipeError("teacher.cache keeps signals in memory for contrastive and reranker runs; for a generative teacher write a store (`mmdistill teacher cache`) and use teacher: {kind: store, path: ...}")
        teacher, t_proc = gm.load_vlm(recipe.teacher.model, trust_remote_code=recipe.teacher.trust_remote_code)
        freeze(teacher)
        teacher.to(accelerator.device)
    try:
        student, s_proc = build_student(build_recipe(recipe, store), teacher, t_proc, records)
        if teacher is not None:
            gm.check_audio(teacher, recipe.teacher.model, records, path)
            gm.check_pairing(teacher, t_proc, student, s_proc, need_logits="kd" in terms)
        gm.check_audio(student, recipe.student.model or f"{recipe.student.init} {recipe.student.arch or ''}".strip(), records, path)
        if store is not None and "kd" in terms:
            vocab = store.constants.get("vocab")
            if vocab is not None and vocab != gm._out_vocab(student):
                raise PairingError(f"{recipe.teacher.path}: the store's teacher has {vocab} output tokens, the student {gm._out_vocab(student)}; logit KD needs one vocabulary")
        if "vision" in terms and getattr(student.config, "vision_config", None) is None:
            raise ValueError(f"loss term 'vision' reads pooled visual tokens, but {type(student).__name__} has no vision tower (a text-only model): remove the term")
        t_dims = dims(teacher) if teacher is not None else (store.constants["dims"] if store is not None else None)
        loss = build_generative_loss(terms, student_dims=dims(student), teacher_dims=t_dims)
        set_trainable(student, recipe.student.trainable)
        if recipe.student.fake_quant:  # quantization-aware distillation (compress/qat.py)
            from ..compress.qat import prepare

            log(f"student: {prepare(student, recipe.student.fake_quant)} Linear layers fake-quantized as {recipe.student.fake_quant}")
        gradient_checkpointing(student, recipe)
        peft_model = None
        if recipe.lora is not None:
            from ..compress.lora import LoraSettings, apply_lora

            peft_model = apply_lora(student, LoraSettings(**recipe.lora.model_dump()))
    except (PairingError, FileNotFoundError, RecordError):
        raise
    except ValueError as e:
        raise RecipeError(f"{recipe.output_dir}: {e}") from None
    trained = peft_model if peft_model is not None else student
    trained.train()
    step = GenerativeStep(
        trained, s_proc, loss, records, images,
        path=path, response_field=recipe.data.response_field, max_length=recipe.data.max_length, curriculum=curriculum,
        teacher=teacher, t_proc=t_proc, store=store,
    )

    if accelerator.is_main_process:
        write_run_dir(out, fp, recipe.model_dump(mode="json"), clear)
    accelerator.wait_for_everyone()

    def save_final(unwrapped: GenerativeStep) -> None:
        model = unwrapped.student
        if recipe.lora is not None:
            from ..compress.lora import save_adapter

            save_adapter(model, out / "adapter", processor=s_proc)
            model = model.merge_and_unload()
        if recipe.student.fake_quant:  # save plain Linear layers with the trained full-precision weights
            from ..compress.qat import strip

            strip(model)
        model.save_pretrained(out / "model")
        s_proc.save_pretrained(out / "model")
        save_loss_modules(unwrapped.loss, out)

    result = train_loop(step, n_items=len(records), cfg=recipe.train, out_dir=out, seed=recipe.seed, fingerprint=fp, resume=resume, accelerator=accelerator, on_end=save_final)
    summary: dict[str, Any] = train_summary(result, errors, out, write=accelerator.is_main_process)
    if accelerator.is_main_process:
        if evaluate_after and recipe.data.val is not None:
            summary["eval"] = evaluate_run(recipe)
    return summary
