"""CLIP-style (dual encoder) losses: the contrastive task loss and the distillation terms.

Inputs: image / text embeddings ``[B, D]`` (row i of each is a matching pair; not necessarily
normalised: every function L2-normalises inside) and ``logit_scale`` = the model's own *exp'ed*
similarity scale (a float or a 0-dim tensor, e.g. ``CLIPModel.logit_scale.exp()``). All math in
float32. Similarity logits: ``logits_i2t = scale · norm(img) @ norm(txt)ᵀ`` ``[B, B]`` and
``logits_t2i = logits_i2tᵀ``.

These functions use whatever batch they are given; to contrast against the global batch in
multi-process training, gather the embeddings in the caller first.

Terms (s = student, t = teacher):

- ``clip_loss``: symmetric InfoNCE, ``(CE(logits_i2t, arange) + CE(logits_t2i, arange)) / 2``.
- ``siglip_loss`` (SigLIP, Zhai et al. 2023): pairwise sigmoid loss
  ``−(1/B) Σ_i Σ_j log σ(z_ij · (t · norm(img_i) · norm(txt_j) + b))`` with ``z_ij = +1`` on the
  diagonal and −1 elsewhere, ``t`` the exp'ed scale and ``b`` a learned bias. The ``1/B`` (sum over
  the B² pairs, divided by the batch size, not by B²) is the paper's Algorithm 1 and the reference
  implementations' (big_vision; transformers' ``SiglipModel(return_loss=True)``, checked in a test).
- ``similarity_kd`` (open_clip's ``DistillClipLoss`` distillation term): soft cross-entropy
  ``−Σ_j softmax(t_logits)_ij · log_softmax(s_logits)_ij``, mean over rows, i2t and t2i averaged;
  each model uses its own logit scale. It is a cross-entropy, so its minimum is the teacher's
  entropy, not 0.
- ``affinity_mimic`` (TinyCLIP): the same formula as ``similarity_kd`` (TinyCLIP's ``ClipSoftLoss``
  is soft CE of student affinities against softmax teacher affinities, i2t and t2i averaged, each
  with its own scale); kept as a documented alias so recipes can say what they mean.
- ``crd_loss`` (CLIP-KD "CRD"): ``KL(softmax(t_logits / T) ‖ softmax(s_logits / T)) · T²``, mean
  over rows, i2t and t2i averaged; CLIP-KD uses the models' own logit scales and T = 1. It equals
  ``similarity_kd`` minus the teacher entropy (same gradients at T = 1) and is 0 when the student
  matches the teacher.
- ``fd_loss`` (CLIP-KD "FD"): ``mse(norm(P_img s_img), norm(t_img)) + mse(norm(P_txt s_txt), norm(t_txt))``
  with ``F.mse_loss`` (mean over B × D elements, hence CLIP-KD's large weight, 2000) and learnable
  linear projectors ``P`` when the widths differ.
- ``icl_loss`` (CLIP-KD "ICL"): InfoNCE of student image anchors against teacher text embeddings and
  student text anchors against teacher image embeddings, ``(CE(scale · s_img @ t_txtᵀ) + CE(scale ·
  s_txt @ t_imgᵀ)) / 2`` (student projected to the teacher's width when they differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_pair(img: Tensor, txt: Tensor, who: str) -> None:
    if img.dim() != 2 or txt.dim() != 2 or img.shape != txt.shape:
        raise ValueError(
            f"{who}: image and text embeddings must both be [B, D] with the same shape, "
            f"got {tuple(img.shape)} and {tuple(txt.shape)}"
        )


def _norm(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def _scale(logit_scale: Tensor | float) -> Tensor | float:
    return logit_scale.float() if isinstance(logit_scale, Tensor) else float(logit_scale)


def similarity_logits(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> Tensor:
    """``logit_scale · norm(img) @ norm(txt)ᵀ``: [B, D], [B', D] -> [B, B'] (image rows, text columns)."""
    return _scale(logit_scale) * _norm(image_embeds) @ _norm(text_embeds).T


def _soft_ce(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """mean_i −Σ_j softmax(teacher)_ij log_softmax(student)_ij. [B, B] x2 -> []"""
    return -(teacher_logits.softmax(-1) * student_logits.log_softmax(-1)).sum(-1).mean()


def _kl_rows(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """mean_i KL(softmax(teacher)_i ‖ softmax(student)_i). [B, B] x2 -> []"""
    lt = teacher_logits.log_softmax(-1)
    return (lt.exp() * (lt - student_logits.log_softmax(-1))).sum(-1).mean()


def _labels(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)


def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric CLIP InfoNCE loss. image_embeds, text_embeds: [B, D]; logit_scale: [] (exp'ed). -> []"""
    _check_pair(image_embeds, text_embeds, "clip_loss")
    logits = similarity_logits(image_embeds, text_embeds, logit_scale)  # [B, B]
    labels = _labels(logits.shape[0], logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float) -> Tensor:
    """SigLIP's pairwise sigmoid loss. image_embeds, text_embeds: [B, D]; logit_scale (exp'ed), logit_bias: []. -> []

    ``−(1/B) Σ_ij log σ(z_ij · (scale · norm(img_i)·norm(txt_j) + bias))``, z = +1 on the diagonal, −1 off it.
    """
    _check_pair(image_embeds, text_embeds, "siglip_loss")
    bias = logit_bias.float() if isinstance(logit_bias, Tensor) else float(logit_bias)
    logits = similarity_logits(image_embeds, text_embeds, logit_scale) + bias  # [B, B]
    n = logits.shape[0]
    z = 2 * torch.eye(n, device=logits.device) - 1  # [B, B]: +1 matching pairs, −1 the rest
    return -F.logsigmoid(z * logits).sum() / n


def similarity_kd(
    s_img: Tensor,
    s_txt: Tensor,
    s_scale: Tensor | float,
    t_img: Tensor,
    t_txt: Tensor,
    t_scale: Tensor | float,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """open_clip's distillation term: soft CE of teacher similarity softmax vs student log-softmax.

    ``(softCE(s_i2t / T, t_i2t / T) + softCE(s_t2i / T, t_t2i / T)) / 2`` where each model's logits use
    its own logit scale and ``softCE(s, t) = mean_i −Σ_j softmax(t)_ij log_softmax(s)_ij``.
    open_clip uses T = 1 (the default). Student [B, D_s] x2, teacher [B, D_t] x2 (widths may differ:
    only the [B, B] similarity matrices are compared). -> []
    """
    _check_pair(s_img, s_txt, "similarity_kd (student)")
    _check_pair(t_img, t_txt, "similarity_kd (teacher)")
    if s_img.shape[0] != t_img.shape[0]:
        raise ValueError(f"similarity_kd: student batch {s_img.shape[0]} != teacher batch {t_img.shape[0]}")
    s_logits = similarity_logits(s_img, s_txt, s_scale) / temperature  # [B, B]
    t_logits = similarity_logits(t_img, t_txt, t_scale) / temperature  # [B, B]
    return (_soft_ce(s_logits, t_logits) + _soft_ce(s_logits.T, t_logits.T)) / 2


def affinity_mimic(
    s_img: Tensor,
    s_txt: Tensor,
    s_scale: Tensor | float,
    t_img: Tensor,
    t_txt: Tensor,
    t_scale: Tensor | float,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """TinyCLIP affinity mimicking. The same formula as ``similarity_kd`` (an alias, kept for naming).

    TinyCLIP's image-to-text and text-to-image affinity losses are soft cross-entropies of the
    student's affinities (student logit scale) against the teacher's softmax affinities (teacher
    logit scale), averaged: exactly open_clip's distillation term. ``temperature`` divides both
    affinity matrices (TinyCLIP: 1).
    """
    return similarity_kd(s_img, s_txt, s_scale, t_img, t_txt, t_scale, temperature=temperature)


def crd_loss(
    s_img: Tensor,
    s_txt: Tensor,
    s_scale: Tensor | float,
    t_img: Tensor,
    t_txt: Tensor,
    t_scale: Tensor | float,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """CLIP-KD's CRD: KL between teacher and student in-batch similarity softmax, both ways.

    ``(KL(t_i2t ‖ s_i2t) + KL(t_t2i ‖ s_t2i)) / 2 · T²`` with logits = own logit scale × cosine
    similarity / T, KL per row and mean over rows (``batchmean``). CLIP-KD uses the models' own
    logit scales and T = 1. Student [B, D_s] x2, teacher [B, D_t] x2. -> []
    """
    _check_pair(s_img, s_txt, "crd_loss (student)")
    _check_pair(t_img, t_txt, "crd_loss (teacher)")
    if s_img.shape[0] != t_img.shape[0]:
        raise ValueError(f"crd_loss: student batch {s_img.shape[0]} != teacher batch {t_img.shape[0]}")
    s_logits = similarity_logits(s_img, s_txt, s_scale) / temperature  # [B, B]
    t_logits = similarity_logits(t_img, t_txt, t_scale) / temperature  # [B, B]
    return (_kl_rows(s_logits, t_logits) + _kl_rows(s_logits.T, t_logits.T)) / 2 * temperature**2


def _project(x: Tensor, projector: nn.Module | None, target_dim: int, who: str) -> Tensor:
    if projector is not None:
        x = projector(x)
    if x.shape[-1] != target_dim:
        raise ValueError(
            f"{who}: student width {x.shape[-1]} != teacher width {target_dim}; pass a projector "
            "(FeatureProjector(student_dim, teacher_dim))"
        )
    return x


def fd_loss(
    s_img: Tensor,
    s_txt: Tensor,
    t_img: Tensor,
    t_txt: Tensor,
    *,
    image_projector: nn.Module | None = None,
    text_projector: nn.Module | None = None,
) -> Tensor:
    """CLIP-KD's feature distillation: MSE between L2-normalised embeddings, image and text summed.

    ``mse(norm(P_img s_img), norm(t_img)) + mse(norm(P_txt s_txt), norm(t_txt))`` where ``mse`` is
    ``F.mse_loss`` (mean over B × D_t elements, as in CLIP-KD, whose recipe weights this term 2000)
    and the projectors map D_s -> D_t (needed when the widths differ; CLIP-KD uses two linear
    layers with bias). Student [B, D_s] x2, teacher [B, D_t] x2. -> []
    """
    _check_pair(s_img, s_txt, "fd_loss (student)")
    _check_pair(t_img, t_txt, "fd_loss (teacher)")
    s_img = _norm(_project(s_img, image_projector, t_img.shape[-1], "fd_loss"))
    s_txt = _norm(_project(s_txt, text_projector, t_txt.shape[-1], "fd_loss"))
    return F.mse_loss(s_img, _norm(t_img)) + F.mse_loss(s_txt, _norm(t_txt))


def icl_loss(
    s_img: Tensor,
    s_txt: Tensor,
    t_img: Tensor,
    t_txt: Tensor,
    logit_scale: Tensor | float,
    *,
    image_projector: nn.Module | None = None,
    text_projector: nn.Module | None = None,
) -> Tensor:
    """CLIP-KD's interactive contrastive learning: student anchors contrasted with teacher embeddings.

    ``(CE(scale · norm(P_img s_img) @ norm(t_txt)ᵀ, arange)
    + CE(scale · norm(P_txt s_txt) @ norm(t_img)ᵀ, arange)) / 2``.
    ``logit_scale`` is exp'ed (CLIP-KD learns a separate cross-model scale for this term).
    Student [B, D_s] x2, teacher [B, D_t] x2. -> []
    """
    _check_pair(s_img, s_txt, "icl_loss (student)")
    _check_pair(t_img, t_txt, "icl_loss (teacher)")
    s_img = _project(s_img, image_projector, t_img.shape[-1], "icl_loss")
    s_txt = _project(s_txt, text_projector, t_txt.shape[-1], "icl_loss")
    i2t = similarity_logits(s_img, t_txt, logit_scale)  # [B, B] student images vs teacher texts
    t2i = similarity_logits(s_txt, t_img, logit_scale)  # [B, B] student texts vs teacher images
    labels = _labels(i2t.shape[0], i2t.device)
    return (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2
