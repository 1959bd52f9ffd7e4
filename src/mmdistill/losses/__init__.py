"""Loss library: token divergences (dense / sparse), feature losses, CLIP-style terms, composite loss.

All losses are pure functions (or small modules holding learnable projections) over explicit
student / teacher tensors; ``composite`` adapts them to ``Signals`` and sums named, weighted terms.
"""

from mmdistill.losses.composite import (
    CONTRASTIVE_TERMS,
    CompositeLoss,
    FeatureDistillTerm,
    LogitDistillTerm,
    LossTerm,
    build_contrastive_loss,
)
from mmdistill.losses.contrastive import (
    affinity_mimic,
    clip_loss,
    crd_loss,
    fd_loss,
    icl_loss,
    similarity_kd,
    similarity_logits,
)
from mmdistill.losses.divergence import (
    DIVERGENCES,
    SPARSE_DIVERGENCES,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    log_partition_grid,
    sampled_forward_kl,
    sparse_forward_kl,
    sparse_generalized_jsd,
    sparse_reverse_kl,
    sparse_skew_kl,
    sparse_skew_reverse_kl,
    sparse_tvd,
    tail_logmass_from_topk,
    tempered_tail_grid,
    interpolate_tail,
    tvd,
)
from mmdistill.losses.features import FeatureLoss, FeatureProjector, feature_cosine, feature_mse

__all__ = [
    "CONTRASTIVE_TERMS",
    "DIVERGENCES",
    "SPARSE_DIVERGENCES",
    "CompositeLoss",
    "FeatureDistillTerm",
    "FeatureLoss",
    "FeatureProjector",
    "LogitDistillTerm",
    "LossTerm",
    "affinity_mimic",
    "build_contrastive_loss",
    "clip_loss",
    "crd_loss",
    "fd_loss",
    "feature_cosine",
    "feature_mse",
    "forward_kl",
    "generalized_jsd",
    "icl_loss",
    "reverse_kl",
    "similarity_kd",
    "similarity_logits",
    "skew_kl",
    "skew_reverse_kl",
    "log_partition_grid",
    "sampled_forward_kl",
    "sparse_forward_kl",
    "sparse_generalized_jsd",
    "sparse_reverse_kl",
    "sparse_skew_kl",
    "sparse_skew_reverse_kl",
    "sparse_tvd",
    "tail_logmass_from_topk",
    "tempered_tail_grid",
    "interpolate_tail",
    "tvd",
]
