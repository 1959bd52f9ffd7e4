"""Model adapters per family (contrastive, dual, reranker, generative) and the helpers their loaders share."""
from __future__ import annotations

from typing import Any


def load_dtype(config: Any) -> Any:
    """The `dtype` to pass to ``from_pretrained`` for a folder with this config: ``torch.float32`` when the config
    says float32, else ``"auto"``.

    Why not always "auto": transformers 5 builds the model in the config's dtype but keeps a tensor stored in another
    dtype as stored. A quantized folder whose leftover fp32 weights were stored in bf16 to save disk
    (``mmdistill quantize --store-dtype bfloat16``) would then run those layers in bf16; asked for float32 by name,
    transformers upcasts them as it loads.
    """
    import torch

    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return torch.float32 if d == torch.float32 else "auto"
