"""Feature (hidden-state) distillation: MSE and cosine distance, with a learned projection.

Shapes: ``student`` and ``teacher`` are ``[B, D]`` (pooled features) or ``[B, T, D]`` (per position)
with ``mask [B, T]`` (bool, True = counts). Computed in float32.

Per position the loss is reduced over the width ``D`` first, then a masked mean is taken over
positions (count clamped to at least 1: an all-masked batch gives 0, not NaN):

- ``feature_mse``:    mean_d (s_d − t_d)²          (``[B, D]`` without mask == ``F.mse_loss``)
- ``feature_cosine``: 1 − cos(s, t)                 (in [0, 2])

``center_features`` subtracts, from student and teacher each, their mean over the counted rows of the batch
first: what is left is how each sample differs from the others. Pooled features of a tower are often almost
parallel for every input (a large shared component), so a plain cosine between them is ~0 from the first steps
and carries no signal; the centred cosine asks the student to reproduce the teacher's differences between inputs.
With fewer than two counted rows there is nothing to compare and the centred loss is 0.

Widths must match; put a ``FeatureProjector`` (or use ``FeatureLoss``) in front of the student when
they differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_KINDS = ("mse", "cosine")


def _check(student: Tensor, teacher: Tensor, mask: Tensor | None) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} must have the "
            "same shape (project the student to the teacher's width first, e.g. with FeatureProjector)"
        )
    if mask is not None and mask.shape != student.shape[:-1]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(student.shape[:-1])}")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """values [*L] -> []: mean over positions where mask is True (0 when none)."""
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    mask = mask.to(device=values.device, dtype=torch.bool)
    return values[mask].sum() / mask.sum().clamp_min(1)


def feature_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over counted positions of ``mean_d (s_d − t_d)²``.

    student, teacher: [B, D] or [B, T, D]; mask: [B] / [B, T] or None. Returns [].
    """
    _check(student, teacher, mask)
    per_position = (student.float() - teacher.float()).pow(2).mean(-1)  # [*L]
    return _masked_mean(per_position, mask)


def feature_cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over counted positions of ``1 − cos(s, t)``.

    student, teacher: [B, D] or [B, T, D]; mask: [B] / [B, T] or None. Returns [].
    """
    _check(student, teacher, mask)
    per_position = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)  # [*L]
    return _masked_mean(per_position, mask)


def center_features(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Subtract from each its mean over the counted rows ([B, D]: samples; [B, T, D]: positions).

    Returns (student, teacher, mask) with ``mask`` all False when fewer than two rows count (the losses then
    give 0). Computed in float32.
    """
    _check(student, teacher, mask)
    s, t = student.float(), teacher.float()
    counted = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device) if mask is None else mask.to(device=s.device, dtype=torch.bool)
    n = int(counted.sum())
    if n < 2:
        return s, t, torch.zeros_like(counted)
    w, rows = counted.unsqueeze(-1).to(s.dtype), tuple(range(s.dim() - 1))

    def centred(x: Tensor) -> Tensor:
        return x - (x * w).sum(dim=rows, keepdim=True) / n

    return centred(s), centred(t), counted


class FeatureProjector(nn.Module):
    """Linear map from the student's width to the teacher's: [..., D_s] -> [..., D_t].

    Identity (no parameters) when the widths are equal, unless ``force=True``. With a bias, as in
    CLIP-KD's ``visual_proj`` / ``text_proj``. Trained with the student; save it with the loss
    (it is not part of the exported student).
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, force: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.proj: nn.Module = (
            nn.Linear(student_dim, teacher_dim, bias=bias)
            if force or student_dim != teacher_dim
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.student_dim:
            raise ValueError(f"projector expects width {self.student_dim}, got features of shape {tuple(x.shape)}")
        if isinstance(self.proj, nn.Linear):
            x = x.to(self.proj.weight.dtype)
        return self.proj(x)


class FeatureLoss(nn.Module):
    """Feature distillation loss with an optional learned projection of the student.

    ``kind``: "mse" | "cosine". ``normalize=True`` L2-normalises both (after projection) before
    the MSE (CLIP-KD's FD style; cosine is scale-free anyway). ``center=True`` subtracts each side's
    mean over the batch's counted rows first (after projection; see ``center_features``). A ``FeatureProjector`` is created when
    ``student_dim != teacher_dim`` (or ``force_projector=True``); register this module with the
    optimizer so the projector trains.

    forward(student_feat [B, D_s] | [B, T, D_s], teacher_feat [B, D_t] | [B, T, D_t], mask [B, T] | None) -> []
    """

    def __init__(
        self,
        kind: str = "mse",
        *,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        normalize: bool = False,
        force_projector: bool = False,
        center: bool = False,
    ) -> None:
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise ValueError(f"feature loss kind {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
        self.kind = kind
        self.normalize = normalize
        self.center = center
        self.projector: FeatureProjector | None = None
        if student_dim is not None and teacher_dim is not None:
            self.projector = FeatureProjector(student_dim, teacher_dim, force=force_projector)
        elif force_projector:
            raise ValueError("force_projector needs student_dim and teacher_dim")

    def forward(self, student_feat: Tensor, teacher_feat: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.projector is not None:
            student_feat = self.projector(student_feat)
        if self.center:
            student_feat, teacher_feat, mask = center_features(student_feat, teacher_feat, mask)
        if self.normalize:
            student_feat = F.normalize(student_feat.float(), dim=-1)
            teacher_feat = F.normalize(teacher_feat.float(), dim=-1)
        if self.kind == "mse":
            return feature_mse(student_feat, teacher_feat, mask)
        return feature_cosine(student_feat, teacher_feat, mask)
