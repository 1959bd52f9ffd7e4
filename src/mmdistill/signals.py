"""Signals: the one currency between models, the teacher store and the losses.

A family adapter turns a model's raw outputs into ``Signals``; a loss reads two ``Signals``
(student, teacher); the teacher store writes and reads them. Every field is optional: a
model fills what it produces, a loss asserts what it needs.

Shapes (B = batch, T = positions, V = vocabulary, k = kept ids, D = width, K = candidates):

- ``logits``        [B, T, V]  dense response-token logits
- ``topk_ids``      [B, T, k]  sparse form: kept token ids
- ``topk_logprobs`` [B, T, k]  sparse form: their log-probabilities (at temperature 1)
- ``tail_logmass``  [B, T]     sparse form: log of the probability mass not in ``topk_ids``
- ``tail_grid``     [B, T, G]  sparse form: log Σ_tail p^β on a grid of β = 1/T (exact tail tempering)
- ``tail_betas``    [G]        the grid's β values, increasing
- ``sample_logweights`` [B, T, k] sampled form (random-sampling KD): log of each id's share of N draws from the
                               teacher (-inf for padding ids); ``topk_ids`` are then the drawn ids and
                               ``topk_logprobs`` the teacher's temperature-1 log-probs of them (importance weights)
- ``logz_grid``     [B, T, G]  sampled form: log Σ_v p^β over the whole vocabulary on the ``tail_betas`` grid
- ``mask``          [B, T]     bool, which positions count (response tokens)
- ``features``      name -> [B, D] or [B, T, D] (e.g. "vision_pooled", "text_pooled")
- ``image_embeds``  [B, D]     projected image embeddings (not normalised)
- ``text_embeds``   [B, D]     projected text embeddings (not normalised)
- ``logit_scale``   []         the model's own (exp'ed) similarity scale
- ``logit_bias``    []         the model's own sigmoid-loss bias (SigLIP; None for CLIP-style models)
- ``scores``        [B, K]     relevance scores per query group
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class Signals:
    logits: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    tail_logmass: Tensor | None = None
    tail_grid: Tensor | None = None
    tail_betas: Tensor | None = None
    sample_logweights: Tensor | None = None
    logz_grid: Tensor | None = None
    mask: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    image_embeds: Tensor | None = None
    text_embeds: Tensor | None = None
    logit_scale: Tensor | None = None
    scores: Tensor | None = None
    logit_bias: Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        return self.topk_ids is not None

    @property
    def is_sampled(self) -> bool:
        """A sparse form whose ids were drawn from the teacher (weighted by ``sample_logweights``), not its top-k."""
        return self.sample_logweights is not None

    def require(self, *names: str, who: str = "loss") -> None:
        """Raise a clear error when a loss needs a field this Signals lacks."""
        for name in names:
            if name.startswith("features."):
                key = name.split(".", 1)[1]
                if key not in self.features:
                    have = ", ".join(sorted(self.features)) or "none"
                    raise ValueError(f"{who} needs feature {key!r}; this model gives: {have}")
            elif getattr(self, name) is None:
                raise ValueError(f"{who} needs Signals.{name}, which this model did not produce")

    def detach(self) -> "Signals":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.detach()
            elif isinstance(v, dict):
                v = {k: t.detach() for k, t in v.items()}
            out[f.name] = v
        return Signals(**out)

    def to(self, device: torch.device | str) -> "Signals":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device)
            elif isinstance(v, dict):
                v = {k: t.to(device) for k, t in v.items()}
            out[f.name] = v
        return Signals(**out)
