"""Ranking losses for reranker distillation / training, and their composite-loss terms.

Shapes: a batch holds ``B`` query groups of up to ``K`` candidates, padded. ``student``, ``teacher``
are scores ``[B, K]``; ``mask [B, K]`` (bool, True = real candidate) marks the valid candidates;
``labels [B, K]`` are graded relevance labels (floats >= 0, 0 = irrelevant). Every loss returns a
scalar ``[]``, is computed in float32, ignores masked candidates entirely (their values, even NaN,
have no effect and receive zero gradient) and never divides by zero: with nothing to average over
(e.g. every candidate masked) the loss is 0.

- ``pointwise_mse``:     mean over valid candidates of ``(s − t)²``.
- ``margin_mse``:        Margin-MSE (Hofstätter et al. 2020), mean over ordered pairs ``(i, j)`` of a group
  of ``((s_i − s_j) − (t_i − t_j))²``; pairs are those with ``labels_i > labels_j`` (with labels) or
  ``t_i > t_j`` (without).
- ``listwise_kl``:       ``KL(softmax(t/T) ‖ softmax(s/T))`` per group, mean over groups, × T².
- ``label_bce``:         BCE-with-logits of ``s`` against ``labels / max_label``.
- ``label_listwise_ce``: cross-entropy of ``softmax(s/T)`` against ``labels / Σ labels`` per group.

The term modules (``RANKING_TERMS``) adapt these to ``Signals`` (``scores [B, K]``,
``features[name] [B, K, D]``) and the batch dict (``batch["mask"]``, optional ``batch["labels"]``);
``build_ranking_loss`` assembles them from a recipe into a ``CompositeLoss``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdistill.engine.schedules import Schedule
from mmdistill.losses.composite import CompositeLoss, _positive_schedule, build_terms
from mmdistill.losses.features import FEATURE_KINDS, FeatureLoss
from mmdistill.signals import Signals

# ---------------------------------------------------------------------------------------------
# helpers


def _prepare(*tensors: Tensor | None, mask: Tensor | None, who: str) -> tuple[list[Tensor | None], Tensor]:
    """Check shapes, cast to float32 and zero the masked entries (so NaN/inf padding cannot leak)."""
    ref = next(t for t in tensors if t is not None)
    if ref.dim() != 2:
        raise ValueError(f"{who}: scores must have shape [B, K], got {tuple(ref.shape)}")
    for t in tensors:
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{who}: shapes differ: {tuple(t.shape)} vs {tuple(ref.shape)}")
    if mask is None:
        mask = torch.ones(ref.shape, dtype=torch.bool, device=ref.device)
    elif mask.shape != ref.shape:
        raise ValueError(f"{who}: mask has shape {tuple(mask.shape)}; expected {tuple(ref.shape)}")
    mask = mask.to(device=ref.device, dtype=torch.bool)
    out = [None if t is None else torch.where(mask, t.float(), torch.zeros((), device=ref.device)) for t in tensors]
    return out, mask


def _check_temperature(temperature: float, who: str) -> float:
    if not temperature > 0:
        raise ValueError(f"{who}: temperature must be > 0, got {temperature!r}")
    return float(temperature)


def _masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """log_softmax over the valid entries of each row [B, K]; masked entries -> 0 (never -inf/NaN)."""
    filled = x.masked_fill(~mask, torch.finfo(x.dtype).min)
    return torch.where(mask, filled.log_softmax(dim=-1), torch.zeros((), device=x.device))


# ---------------------------------------------------------------------------------------------
# pure losses


def pointwise_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over valid candidates of ``(s − t)²`` (sentence-transformers' MSELoss on teacher scores).

    student, teacher: [B, K]; mask: [B, K] bool or None (all valid). Returns []; 0 when nothing is valid.
    """
    (s, t), mask = _prepare(student, teacher, mask=mask, who="pointwise_mse")
    sq = (s - t).pow(2)
    return sq.sum() / mask.sum().clamp_min(1)


def margin_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
    """Margin-MSE: mean over pairs of ``((s_i − s_j) − (t_i − t_j))²``.

    Pairs ``(i, j)`` are two valid candidates of the same group with ``labels[i] > labels[j]`` when
    ``labels`` is given, else with ``teacher[i] > teacher[j]`` (teacher ties form no pair). The mean
    is over all pairs of the batch (0 when there are none).

    student, teacher, labels: [B, K]; mask: [B, K] bool or None. Returns []. Memory O(B·K²).
    """
    (s, t, y), mask = _prepare(student, teacher, labels, mask=mask, who="margin_mse")
    order = y if y is not None else t
    pairs = (order.unsqueeze(2) > order.unsqueeze(1)) & mask.unsqueeze(2) & mask.unsqueeze(1)  # [B, K, K]
    s_margin = s.unsqueeze(2) - s.unsqueeze(1)
    t_margin = t.unsqueeze(2) - t.unsqueeze(1)
    sq = torch.where(pairs, (s_margin - t_margin).pow(2), torch.zeros((), device=s.device))
    return sq.sum() / pairs.sum().clamp_min(1)


def listwise_kl(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    scale_t2: bool = True,
) -> Tensor:
    """``KL(softmax(t/T) ‖ softmax(s/T))`` over each group's valid candidates, mean over groups.

    ``Σ_i p_i (log p_i − log q_i)`` with ``p = softmax(t/T)``, ``q = softmax(s/T)`` — the listwise
    soft cross-entropy of ListNet / FlagEmbedding's distillation minus the teacher entropy (same
    gradient). × T² when ``scale_t2`` (keeps gradient magnitudes comparable across temperatures).
    Groups with no valid candidate are left out of the mean (0 when none is valid).

    student, teacher: [B, K]; mask: [B, K] bool or None. Returns [].
    """
    temperature = _check_temperature(temperature, "listwise_kl")
    (s, t), mask = _prepare(student, teacher, mask=mask, who="listwise_kl")
    log_p = _masked_log_softmax(t / temperature, mask)
    log_q = _masked_log_softmax(s / temperature, mask)
    per_group = torch.where(mask, log_p.exp() * (log_p - log_q), torch.zeros((), device=s.device)).sum(-1)  # [B]
    groups = mask.any(-1)
    loss = per_group.sum() / groups.sum().clamp_min(1)
    return loss * temperature**2 if scale_t2 else loss


def label_bce(student: Tensor, labels: Tensor, mask: Tensor | None = None, max_label: float | None = None) -> Tensor:
    """Mean over valid candidates of BCE-with-logits of ``s`` against ``y = labels / max_label``.

    ``max_label=None``: labels <= 1 are used as they are (binary / already in [0, 1]); if a valid label
    exceeds 1, they are divided by the largest valid label of the batch (pass ``max_label`` for a
    fixed scale). Targets are clamped to [0, 1].

    student, labels: [B, K]; mask: [B, K] bool or None. Returns []; 0 when nothing is valid.
    """
    if max_label is not None and not max_label > 0:
        raise ValueError(f"label_bce: max_label must be > 0, got {max_label!r}")
    (s, y), mask = _prepare(student, labels, mask=mask, who="label_bce")
    if max_label is None:
        scale = y.max().clamp_min(1.0) if y.numel() else torch.ones((), device=y.device)
    else:
        scale = torch.tensor(float(max_label), device=y.device)
    target = (y / scale).clamp(0.0, 1.0)
    bce = F.binary_cross_entropy_with_logits(s, target, reduction="none")
    return torch.where(mask, bce, torch.zeros((), device=s.device)).sum() / mask.sum().clamp_min(1)


def label_listwise_ce(student: Tensor, labels: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Listwise cross-entropy against the label distribution: per group
    ``−Σ_i (y_i / Σ_j y_j) · log softmax(s/T)_i`` over the valid candidates.

    The target is the labels normalised to sum 1 (no softmax on the labels). Groups whose valid labels
    sum to 0 (no positive) are skipped; the mean is over the remaining groups (0 when none).

    student, labels: [B, K]; mask: [B, K] bool or None. Returns [].
    """
    temperature = _check_temperature(temperature, "label_listwise_ce")
    (s, y), mask = _prepare(student, labels, mask=mask, who="label_listwise_ce")
    y = y.clamp_min(0.0)
    total = y.sum(-1, keepdim=True)  # [B, 1]
    groups = total.squeeze(-1) > 0
    target = y / total.clamp_min(torch.finfo(torch.float32).tiny)
    log_q = _masked_log_softmax(s / temperature, mask)
    per_group = -(target * log_q).sum(-1)  # masked entries: target 0, log_q 0
    per_group = torch.where(groups, per_group, torch.zeros((), device=s.device))
    return per_group.sum() / groups.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# composite-loss terms reading Signals


class _RankingTerm(nn.Module):
    """Common constructor: every term takes (student_dim, teacher_dim, **options)."""

    name = ""
    needs_teacher = True
    needs_labels = False
    needs_features = False

    def __init__(self, student_dim: int, teacher_dim: int | None = None) -> None:
        super().__init__()
        if self.needs_teacher and teacher_dim is None:
            plain = ", ".join(n for n, c in RANKING_TERMS.items() if not c.needs_teacher)
            raise ValueError(
                f"ranking term {self.name!r} needs a teacher (teacher_dim is None); without a teacher use: {plain}"
            )
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim

    def _scores(self, student: Signals, teacher: Signals | None, batch: dict) -> tuple[Tensor, Tensor | None, Tensor]:
        who = f"ranking term {self.name!r}"
        student.require("scores", who=who + " (student)")
        s = student.scores
        assert s is not None
        t = None
        if self.needs_teacher:
            if teacher is None:
                raise ValueError(f"{who} needs teacher Signals, got None (no teacher configured?)")
            teacher.require("scores", who=who + " (teacher)")
            assert teacher.scores is not None
            t = teacher.scores.detach().to(s.device)
        mask = batch.get("mask")
        if mask is None:
            mask = student.mask
        if mask is None:
            mask = torch.ones(s.shape, dtype=torch.bool, device=s.device)
        return s, t, mask.to(s.device)

    def _labels(self, batch: dict, like: Tensor) -> Tensor:
        labels = batch.get("labels")
        if labels is None:
            raise ValueError(f"ranking term {self.name!r} needs labels (batch['labels']); the training data has none")
        return labels.to(like.device)


class PointwiseTerm(_RankingTerm):
    """``pointwise_mse`` of the student's scores against the teacher's."""

    name = "pointwise"

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        s, t, mask = self._scores(student, teacher, batch)
        return pointwise_mse(s, t, mask)


class MarginMSETerm(_RankingTerm):
    """``margin_mse``. ``pairs``: "auto" (label-ordered pairs when the batch has labels, else
    teacher-ordered), "labels" (labels required) or "teacher"."""

    name = "margin_mse"
    PAIRS = ("auto", "labels", "teacher")

    def __init__(self, student_dim: int, teacher_dim: int | None = None, *, pairs: str = "auto") -> None:
        super().__init__(student_dim, teacher_dim)
        if pairs not in self.PAIRS:
            raise ValueError(f"ranking term 'margin_mse': pairs {pairs!r} is not one of {', '.join(self.PAIRS)}")
        self.pairs = pairs

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        s, t, mask = self._scores(student, teacher, batch)
        labels = None
        if self.pairs == "labels" or (self.pairs == "auto" and batch.get("labels") is not None):
            labels = self._labels(batch, s)
        assert t is not None
        return margin_mse(s, t, mask, labels)


class ListwiseKLTerm(_RankingTerm):
    """``listwise_kl``; ``temperature`` is a number or a schedule spec (both ends > 0)."""

    name = "listwise_kl"

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int | None = None,
        *,
        temperature: float | dict = 1.0,
        scale_t2: bool = True,
    ) -> None:
        super().__init__(student_dim, teacher_dim)
        self.temperature: Schedule = _positive_schedule(temperature, f"ranking term {self.name!r}")
        if not isinstance(scale_t2, bool):
            raise ValueError(f"ranking term {self.name!r}: scale_t2 must be true or false, got {scale_t2!r}")
        self.scale_t2 = scale_t2

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        s, t, mask = self._scores(student, teacher, batch)
        assert t is not None
        return listwise_kl(s, t, mask, temperature=self.temperature(progress), scale_t2=self.scale_t2)


class LabelBCETerm(_RankingTerm):
    """``label_bce`` of the student's scores against the labels (no teacher)."""

    name = "bce"
    needs_teacher = False
    needs_labels = True

    def __init__(self, student_dim: int, teacher_dim: int | None = None, *, max_label: float | None = None) -> None:
        super().__init__(student_dim, teacher_dim)
        if max_label is not None and (
            isinstance(max_label, bool) or not isinstance(max_label, (int, float)) or not max_label > 0
        ):
            raise ValueError(f"ranking term 'bce': max_label must be a number > 0, got {max_label!r}")
        self.max_label = None if max_label is None else float(max_label)

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        s, _, mask = self._scores(student, None, batch)
        return label_bce(s, self._labels(batch, s), mask, max_label=self.max_label)


class LabelCETerm(_RankingTerm):
    """``label_listwise_ce`` of the student's scores against the labels (no teacher); ``temperature``
    is a number or a schedule spec."""

    name = "ce"
    needs_teacher = False
    needs_labels = True

    def __init__(self, student_dim: int, teacher_dim: int | None = None, *, temperature: float | dict = 1.0) -> None:
        super().__init__(student_dim, teacher_dim)
        self.temperature: Schedule = _positive_schedule(temperature, f"ranking term {self.name!r}")

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        s, _, mask = self._scores(student, None, batch)
        return label_listwise_ce(s, self._labels(batch, s), mask, temperature=self.temperature(progress))


class RankFeatureTerm(_RankingTerm):
    """Feature distillation on per-candidate features ``Signals.features[feature]`` ``[B, K, D]``
    (e.g. the last-token hidden state), masked by the candidate mask; a ``FeatureLoss`` of ``kind``
    ("cosine" | "mse") with a learned projector when the widths differ."""

    name = "feature"
    needs_features = True

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int | None = None,
        *,
        feature: str = "last_token",
        kind: str = "cosine",
        normalize: bool = False,
    ) -> None:
        super().__init__(student_dim, teacher_dim)
        if not isinstance(feature, str) or not feature:
            raise ValueError(f"ranking term 'feature': feature must be a non-empty name, got {feature!r}")
        if kind not in FEATURE_KINDS:
            raise ValueError(f"ranking term 'feature': kind {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
        self.feature = feature
        self.loss = FeatureLoss(kind, student_dim=student_dim, teacher_dim=teacher_dim, normalize=normalize)

    def forward(self, student: Signals, teacher: Signals | None, batch: dict, progress: float) -> Tensor:
        who = f"ranking term 'feature' ({self.feature})"
        if teacher is None:
            raise ValueError(f"{who} needs teacher Signals, got None (no teacher configured?)")
        student.require(f"features.{self.feature}", who=who + " (student)")
        teacher.require(f"features.{self.feature}", who=who + " (teacher)")
        s = student.features[self.feature]
        t = teacher.features[self.feature].detach().to(s.device)
        if s.dim() != 3 or t.dim() != 3 or s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"{who}: expected student and teacher features [B, K, D] with the same B, K; "
                f"got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        mask = batch.get("mask")
        if mask is None:
            mask = student.mask
        if mask is not None:
            mask = mask.to(s.device)
            # zero padded candidates so NaN/inf there cannot reach the loss or the gradient
            s = torch.where(mask.unsqueeze(-1), s, torch.zeros((), dtype=s.dtype, device=s.device))
            t = torch.where(mask.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))
        return self.loss(s, t, mask)


RANKING_TERMS: dict[str, type[_RankingTerm]] = {
    "pointwise": PointwiseTerm,
    "margin_mse": MarginMSETerm,
    "listwise_kl": ListwiseKLTerm,
    "bce": LabelBCETerm,
    "ce": LabelCETerm,
    "feature": RankFeatureTerm,
}


def build_ranking_loss(terms: dict[str, dict[str, Any]], student_dim: int, teacher_dim: int | None) -> CompositeLoss:
    """Build a ``CompositeLoss`` of ranking terms from a recipe.

    ``terms``: term name (one of ``RANKING_TERMS``) -> ``{"weight": float (default 1.0), "schedule":
    weight-multiplier schedule spec (optional), **term options}``. Options: listwise_kl takes
    ``temperature`` (number or schedule spec) and ``scale_t2``; ce takes ``temperature``; bce takes
    ``max_label``; margin_mse takes ``pairs``; feature takes ``feature``, ``kind``, ``normalize``;
    pointwise takes none. ``teacher_dim=None`` (plain training) allows only the label terms bce / ce.

    The score/feature hybrid with shifting weights::

        build_ranking_loss({
            "listwise_kl": {"weight": 1.0, "schedule": {"kind": "linear", "start": 0.7, "end": 0.4}},
            "feature": {"weight": 1.0, "schedule": {"kind": "linear", "start": 0.3, "end": 0.6}},
        }, student_dim, teacher_dim)
    """
    return build_terms(terms, RANKING_TERMS, "ranking", student_dim, teacher_dim)
