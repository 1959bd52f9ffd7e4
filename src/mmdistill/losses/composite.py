"""Composite loss: named terms × weights × schedules -> {"loss": total, "<name>": term value, ...}.

A *term* is any callable ``term(student: Signals, teacher: Signals | None, batch: dict, progress: float)
-> Tensor []``. ``progress`` is training progress in [0, 1] (for temperature schedules); ``batch`` is
the collated batch (terms may read e.g. ``batch["num_items"]``). Terms that are ``nn.Module``s
(projectors, learned scales) are registered in an ``nn.ModuleDict`` so ``CompositeLoss.parameters()``
hands them to the optimizer.

The effective weight of a term at ``progress`` is ``weight × schedule(progress)`` (``schedule`` is a
multiplier; none = 1). The returned dict holds the weighted sum under ``"loss"`` and each term's
*unweighted* value under its name.

The CLIP-style term modules (``CONTRASTIVE_TERMS``) read ``image_embeds``, ``text_embeds`` and
``logit_scale`` from the Signals; ``build_contrastive_loss`` assembles them from a recipe dict.
``LogitDistillTerm`` and ``FeatureDistillTerm`` read dense / sparse logits and named features.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mmdistill.engine.schedules import Schedule, make_schedule
from mmdistill.losses.contrastive import affinity_mimic, clip_loss, crd_loss, fd_loss, icl_loss, siglip_loss, similarity_kd
from mmdistill.losses.divergence import DIVERGENCES, SPARSE_DIVERGENCES, interpolate_tail, sampled_forward_kl
from mmdistill.losses.features import FEATURE_KINDS, FeatureLoss, FeatureProjector
from mmdistill.signals import Signals

TermFn = Callable[[Signals, "Signals | None", dict, float], Tensor]


@dataclass
class LossTerm:
    """One named part of a composite loss: ``weight × schedule(progress) × fn(...)``."""

    fn: TermFn
    weight: float = 1.0
    schedule: Callable[[float], float] | None = None

    def weight_at(self, progress: float) -> float:
        return self.weight * (self.schedule(progress) if self.schedule is not None else 1.0)


class CompositeLoss(nn.Module):
    """Weighted sum of named terms.

    ``terms``: name -> ``LossTerm`` or a tuple ``(fn, weight)`` / ``(fn, weight, schedule)`` where
    ``schedule`` is a callable of progress or a ``make_schedule`` spec.

    forward(student, teacher, batch, progress) -> {"loss": Σ w_i(progress) · term_i, name_i: term_i, ...}
    """

    def __init__(self, terms: dict[str, LossTerm | tuple]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a composite loss needs at least one term")
        self.terms: dict[str, LossTerm] = {}
        for name, term in terms.items():
            if name == "loss" or not name or "." in name:
                raise ValueError(f"invalid term name {name!r}: must be non-empty, without '.', and not 'loss'")
            term = LossTerm(*term) if isinstance(term, tuple) else replace(term)
            if term.schedule is not None and not callable(term.schedule):
                term.schedule = make_schedule(term.schedule)  # a number or a spec dict
            if not callable(term.fn):
                raise ValueError(f"term {name!r}: fn must be callable, got {type(term.fn).__name__}")
            self.terms[name] = term
        # registered so .parameters() / .to() / state_dict() see the terms' projectors and scales
        self.term_modules = nn.ModuleDict({n: t.fn for n, t in self.terms.items() if isinstance(t.fn, nn.Module)})

    def weights(self, progress: float) -> dict[str, float]:
        """Effective weight of each term at ``progress`` (for logging)."""
        return {name: term.weight_at(progress) for name, term in self.terms.items()}

    def forward(
        self,
        student: Signals,
        teacher: Signals | None = None,
        batch: dict | None = None,
        progress: float = 0.0,
    ) -> dict[str, Tensor]:
        batch = batch if batch is not None else {}
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, term in self.terms.items():
            value = term.fn(student, teacher, batch, progress)
            out[name] = value
            weighted = term.weight_at(progress) * value
            total = weighted if total is None else total + weighted
        assert total is not None
        return {"loss": total, **out}


# ---------------------------------------------------------------------------------------------
# CLIP-style terms reading Signals


def _embeds(signals: Signals | None, role: str, term: str) -> tuple[Tensor, Tensor, Tensor]:
    if signals is None:
        raise ValueError(f"contrastive term {term!r} needs {role} Signals, got None (no teacher configured?)")
    signals.require("image_embeds", "text_embeds", "logit_scale", who=f"contrastive term {term!r} ({role})")
    return signals.image_embeds, signals.text_embeds, signals.logit_scale  # type: ignore[return-value]


def _positive_schedule(spec: float | dict | Schedule, who: str) -> Schedule:
    """A temperature schedule; both ends must be > 0."""
    schedule = make_schedule(spec)
    if min(schedule.start, schedule.end) <= 0:
        raise ValueError(f"{who}: temperature must stay > 0, got {spec!r}")
    return schedule


class _ContrastiveTerm(nn.Module):
    """Common constructor: every term takes (student_dim, teacher_dim, **options)."""

    name = ""
    needs_teacher = True

    def __init__(self, student_dim: int, teacher_dim: int | None = None) -> None:
        super().__init__()
        if self.needs_teacher and teacher_dim is None:
            raise ValueError(f"contrastive term {self.name!r} needs a teacher (teacher_dim is None)")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim


class ClipTerm(_ContrastiveTerm):
    """The student's own CLIP InfoNCE loss (the task loss; no teacher)."""

    name = "clip"
    needs_teacher = False

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        return clip_loss(*_embeds(student, "student", self.name))


class SiglipTerm(_ContrastiveTerm):
    """SigLIP's pairwise sigmoid loss as the student's task loss (``siglip_loss``; no teacher).

    Scale and bias: a student that has its own (a ``SiglipModel``: ``Signals.logit_bias`` is set) uses its
    ``logit_scale`` and ``logit_bias``; any other student (CLIP, a dual encoder) gets both learned here, as
    SigLIP initialises them: ``t = exp(t')`` with ``t' = log(init_scale)`` (10) and ``b = init_bias`` (−10).
    ``own``: "auto" (the above), "model" (require the student's), "learned" (always the term's).
    """

    name = "siglip"
    needs_teacher = False
    OWN = ("auto", "model", "learned")

    def __init__(self, student_dim: int, teacher_dim: int | None = None, *, own: str = "auto", init_scale: float = 10.0, init_bias: float = -10.0) -> None:
        super().__init__(student_dim, teacher_dim)
        if own not in self.OWN:
            raise ValueError(f"contrastive term 'siglip': own {own!r} is not one of {', '.join(self.OWN)}")
        if init_scale <= 0:
            raise ValueError(f"contrastive term 'siglip': init_scale must be > 0, got {init_scale}")
        self.own = own
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale))) if own != "model" else None
        self.bias = nn.Parameter(torch.tensor(float(init_bias))) if own != "model" else None

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        img, txt, scale = _embeds(student, "student", self.name)
        if self.own == "model" or (self.own == "auto" and student.logit_bias is not None):
            student.require("logit_bias", who="contrastive term 'siglip' (own=model: the student's SigLIP bias)")
            return siglip_loss(img, txt, scale, student.logit_bias)
        return siglip_loss(img, txt, self.log_scale.exp().clamp(max=100.0), self.bias)


class _TemperatureTerm(_ContrastiveTerm):
    """A teacher-vs-student similarity term with a (possibly scheduled) temperature."""

    loss_fn: Callable[..., Tensor]  # set by subclasses (a staticmethod)

    def __init__(
        self, student_dim: int, teacher_dim: int | None = None, *, temperature: float | dict = 1.0
    ) -> None:
        super().__init__(student_dim, teacher_dim)
        self.temperature: Schedule = _positive_schedule(temperature, f"contrastive term {self.name!r}")

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        s_img, s_txt, s_scale = _embeds(student, "student", self.name)
        t_img, t_txt, t_scale = _embeds(teacher, "teacher", self.name)
        temperature = self.temperature(progress)
        return self.loss_fn(s_img, s_txt, s_scale, t_img, t_txt, t_scale, temperature=temperature)


class SimilarityKDTerm(_TemperatureTerm):
    """open_clip similarity KD (``similarity_kd``)."""

    name = "sim_kd"
    loss_fn = staticmethod(similarity_kd)


class CRDTerm(_TemperatureTerm):
    """CLIP-KD CRD (``crd_loss``), × T²."""

    name = "crd"
    loss_fn = staticmethod(crd_loss)


class AffinityTerm(_TemperatureTerm):
    """TinyCLIP affinity mimicking (``affinity_mimic``; same formula as sim_kd)."""

    name = "affinity"
    loss_fn = staticmethod(affinity_mimic)


class _ProjectedTerm(_ContrastiveTerm):
    """Holds two learnable projectors (image, text) student width -> teacher width when they differ."""

    def __init__(self, student_dim: int, teacher_dim: int | None = None) -> None:
        super().__init__(student_dim, teacher_dim)
        assert teacher_dim is not None
        self.image_projector = FeatureProjector(student_dim, teacher_dim)
        self.text_projector = FeatureProjector(student_dim, teacher_dim)


class FDTerm(_ProjectedTerm):
    """CLIP-KD feature distillation (``fd_loss``); projectors are trained with the student."""

    name = "fd"

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        s_img, s_txt, _ = _embeds(student, "student", self.name)
        t_img, t_txt, _ = _embeds(teacher, "teacher", self.name)
        return fd_loss(
            s_img, s_txt, t_img, t_txt, image_projector=self.image_projector, text_projector=self.text_projector
        )


class ICLTerm(_ProjectedTerm):
    """CLIP-KD interactive contrastive learning (``icl_loss``).

    ``scale``: "learned" (default; CLIP-KD learns a separate cross-model scale — stored here as a log,
    initialised at log(1/0.07) and exp'ed, clamped at 100 as in CLIP), "student" or "teacher" (use that
    model's logit scale).
    """

    name = "icl"
    SCALES = ("learned", "student", "teacher")

    def __init__(self, student_dim: int, teacher_dim: int | None = None, *, scale: str = "learned") -> None:
        super().__init__(student_dim, teacher_dim)
        if scale not in self.SCALES:
            raise ValueError(f"contrastive term 'icl': scale {scale!r} is not one of {', '.join(self.SCALES)}")
        self.scale = scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if scale == "learned" else None

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        s_img, s_txt, s_scale = _embeds(student, "student", self.name)
        t_img, t_txt, t_scale = _embeds(teacher, "teacher", self.name)
        if self.log_scale is not None:
            scale = self.log_scale.exp().clamp(max=100.0)
        else:
            scale = s_scale if self.scale == "student" else t_scale
        return icl_loss(
            s_img, s_txt, t_img, t_txt, scale, image_projector=self.image_projector, text_projector=self.text_projector
        )


CONTRASTIVE_TERMS: dict[str, type[_ContrastiveTerm]] = {
    "clip": ClipTerm,
    "sim_kd": SimilarityKDTerm,
    "crd": CRDTerm,
    "fd": FDTerm,
    "icl": ICLTerm,
    "affinity": AffinityTerm,
    "siglip": SiglipTerm,
}


def _options_of(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_contrastive_loss(
    terms: dict[str, dict[str, Any]], student_dim: int, teacher_dim: int | None
) -> CompositeLoss:
    """Build a ``CompositeLoss`` of CLIP-style terms from a recipe.

    ``terms``: term name (one of ``CONTRASTIVE_TERMS``) -> ``{"weight": float (default 1.0),
    "schedule": weight-multiplier schedule spec (optional), **term options}``. Options:
    sim_kd / crd / affinity take ``temperature`` (number or schedule spec); icl takes ``scale``;
    siglip takes ``own``, ``init_scale``, ``init_bias``; clip and fd take none.

    >>> build_contrastive_loss({"clip": {"weight": 1.0}, "fd": {"weight": 2000.0}}, 64, 128)  # doctest: +SKIP
    """
    return build_terms(terms, CONTRASTIVE_TERMS, "contrastive", student_dim, teacher_dim)


def build_terms(terms: dict[str, dict[str, Any]], registry: dict[str, type], family: str, student_dim: int, teacher_dim: int | None) -> CompositeLoss:
    """A ``CompositeLoss`` from a recipe's terms: each name picks a class of ``registry`` built as
    ``cls(student_dim, teacher_dim, **options)``; ``weight`` and ``schedule`` are taken out first.
    Every problem is a one-line ValueError naming the term and what is valid."""
    if not terms:
        raise ValueError(f"no loss terms given; choose from: {', '.join(registry)}")
    built: dict[str, LossTerm] = {}
    for name, spec in terms.items():
        if name not in registry:
            raise ValueError(f"unknown {family} loss term {name!r}; valid terms: {', '.join(registry)}")
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"loss term {name!r}: expected a dict of weight, schedule and options, got {spec!r}")
        spec = dict(spec or {})
        weight = spec.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"loss term {name!r}: weight must be a number, got {weight!r}")
        schedule_spec = spec.pop("schedule", None)
        try:
            schedule = make_schedule(schedule_spec) if schedule_spec is not None else None
        except ValueError as err:
            raise ValueError(f"loss term {name!r}: bad schedule: {err}") from None
        cls = registry[name]
        valid = _options_of(cls)
        unknown = sorted(set(spec) - set(valid))
        if unknown:
            raise ValueError(
                f"loss term {name!r}: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: weight, schedule{''.join(', ' + o for o in valid)}"
            )
        try:
            fn = cls(student_dim, teacher_dim, **spec)
        except ValueError as err:
            msg = str(err)
            raise ValueError(msg if msg.startswith((f"{family} term", "ranking term", "loss term")) else f"loss term {name!r}: {msg}") from None
        built[name] = LossTerm(fn, float(weight), schedule)
    return CompositeLoss(built)


# ---------------------------------------------------------------------------------------------
# generative / feature terms reading Signals


class LogitDistillTerm(nn.Module):
    """Token-level divergence between student logits and the teacher's dense or sparse logits.

    Reads ``student.logits [B, T, V]`` and either ``teacher.logits [B, T, V]`` or the sparse form
    (``topk_ids``, ``topk_logprobs``, ``tail_logmass``, and ``tail_grid`` / ``tail_betas`` for exact tail
    tempering at T ≠ 1), or the sampled form (``sample_logweights`` beside the drawn ids and their teacher
    log-probs, and ``logz_grid`` / ``tail_betas`` at T ≠ 1: the importance-weighted ``sampled_forward_kl``, forward
    KL only); the mask is ``student.mask`` (else
    ``teacher.mask``, else all positions). ``batch["num_items"]`` (the global count of counted
    positions), when present, is the denominator (gradient accumulation). ``divergence`` is a key of
    ``DIVERGENCES``; ``beta`` (jsd) / ``alpha`` (skew) via ``options``; ``temperature`` may be a schedule.
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        *,
        temperature: float | dict = 1.0,
        scale_t2: bool = False,
        chunk_size: int | None = None,
        **options: float,
    ) -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
        allowed = {"jsd": {"beta"}, "skew_kl": {"alpha"}, "skew_reverse_kl": {"alpha"}}.get(divergence, set())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(
                f"divergence {divergence!r}: unknown option(s) {', '.join(unknown)}; "
                f"valid: temperature, scale_t2, chunk_size{''.join(', ' + o for o in sorted(allowed))}"
            )
        self.divergence = divergence
        self.temperature = _positive_schedule(temperature, f"divergence {divergence!r}")
        self.scale_t2 = scale_t2
        self.chunk_size = chunk_size
        self.options = options

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        who = f"logit distillation ({self.divergence})"
        if teacher is None:
            raise ValueError(f"{who} needs teacher Signals, got None")
        student.require("logits", who=who + ", student")
        mask = student.mask if student.mask is not None else teacher.mask
        kwargs = dict(
            temperature=self.temperature(progress),
            scale_t2=self.scale_t2,
            chunk_size=self.chunk_size,
            num_items=batch.get("num_items"),
            **self.options,
        )
        if teacher.is_sampled:
            if self.divergence != "forward_kl":
                raise ValueError(f"{who}: a sampled teacher (random-sampling KD) has an unbiased form only for forward_kl; "
                                 "use divergence: forward_kl, or a top-k teacher store")
            teacher.require("topk_ids", "topk_logprobs", who=who + ", sampled teacher")
            temperature = kwargs.pop("temperature")
            logz = None
            if temperature != 1.0:
                teacher.require("logz_grid", "tail_betas", who=who + f", sampled teacher at temperature {temperature:g}")
                logz = interpolate_tail(teacher.logz_grid, teacher.tail_betas, temperature)
            return sampled_forward_kl(student.logits, teacher.topk_ids, teacher.topk_logprobs, teacher.sample_logweights, mask,
                                      temperature=temperature, logz=logz, **kwargs)
        if teacher.is_sparse:
            teacher.require("topk_logprobs", who=who + ", sparse teacher")
            fn = SPARSE_DIVERGENCES[self.divergence]
            if teacher.tail_grid is not None and kwargs["temperature"] != 1.0:
                kwargs["tail_tempered"] = interpolate_tail(teacher.tail_grid, teacher.tail_betas, kwargs["temperature"])
            return fn(student.logits, teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logmass, mask, **kwargs)
        teacher.require("logits", who=who + ", teacher")
        return DIVERGENCES[self.divergence](student.logits, teacher.logits, mask, **kwargs)


class FeatureDistillTerm(nn.Module):
    """MSE / cosine between a named feature of student and teacher (``Signals.features[feature]``).

    Holds a ``FeatureProjector`` when the widths differ. Per-position features use ``student.mask``
    when its shape matches; per-sample features [B, D] use ``batch[sample_mask]`` [B] bool when
    ``sample_mask`` is given and the batch has it (e.g. ``has_audio``: only the samples with a clip count). -> []
    """

    def __init__(
        self,
        feature: str,
        student_dim: int,
        teacher_dim: int,
        *,
        kind: str = "mse",
        normalize: bool = False,
        sample_mask: str | None = None,
        center: bool = False,
    ) -> None:
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise ValueError(f"feature term {feature!r}: kind {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
        self.feature = feature
        self.sample_mask = sample_mask
        self.loss = FeatureLoss(kind, student_dim=student_dim, teacher_dim=teacher_dim, normalize=normalize, center=center)

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        who = f"feature distillation ({self.feature})"
        if teacher is None:
            raise ValueError(f"{who} needs teacher Signals, got None")
        student.require(f"features.{self.feature}", who=who + ", student")
        teacher.require(f"features.{self.feature}", who=who + ", teacher")
        s, t = student.features[self.feature], teacher.features[self.feature]
        mask = student.mask if s.dim() == 3 and student.mask is not None and student.mask.shape == s.shape[:2] else None
        if s.dim() == 2 and self.sample_mask is not None and batch.get(self.sample_mask) is not None:
            mask = batch[self.sample_mask].to(s.device)
        return self.loss(s, t, mask)
