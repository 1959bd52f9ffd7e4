"""Quantization-aware distillation: the student trains with its Linear layers fake-quantized (torchao QAT), against
its full-precision teacher with the family's KD terms, so that the post-training quantization applied afterwards
(`mmdistill quantize`, the pipeline's quantize stage) costs less.

`prepare(model, method)` swaps every Linear layer (not a head tied to the embeddings, as compress/quantize.py leaves
it) for torchao's ``FakeQuantizedLinear`` with the numerics of `method`:

- ``int4-weight``: weights symmetric int4 in groups of 32 along the input (quantize.py's ``IntxWeightOnlyConfig``);
- ``int8-weight``: weights symmetric int8 per output channel;
- ``int8-dynamic``: the same weights, plus activations int8 per token, asymmetric, as ``Int8DynamicActivationInt8Weight``.

Gradients pass the rounding straight through. `strip(model)` swaps the layers back to plain ``nn.Linear`` holding
the trained full-precision weights; the run saves that, an ordinary folder, ready to be quantized by `method`.
MoE experts (fused 3-D tensors, not Linear layers) train unquantized.
"""
from __future__ import annotations

import torch
from torch import nn

from .quantize import INT4_GROUP, METHODS, QuantizeError


def _configs(method: str):
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
        from torchao.quantization.granularity import PerAxis
    except ImportError:
        raise QuantizeError("quantization-aware training needs torchao, which is not installed: pip install 'mmdistill[quantize]'") from None
    if method not in METHODS:
        raise QuantizeError(f"fake_quant {method!r} is unknown; use one of {list(METHODS)}")
    if method == "int4-weight":
        weight = IntxFakeQuantizeConfig(torch.int4, group_size=INT4_GROUP, is_symmetric=True)
    else:
        weight = IntxFakeQuantizeConfig(torch.int8, granularity=PerAxis(0), is_symmetric=True)
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if method == "int8-dynamic" else None
    return QATConfig, weight, act


def prepare(model: nn.Module, method: str) -> int:
    """Fake-quantize `model`'s Linear layers in place for `method`; returns how many were swapped."""
    from torchao.quantization import quantize_

    QATConfig, weight, act = _configs(method)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(out_emb)} if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight else set()
    picked = [n for n, m in model.named_modules() if type(m) is nn.Linear and id(m) not in tied and m.in_features % (INT4_GROUP if method == "int4-weight" else 1) == 0]
    if not picked:
        raise QuantizeError("fake_quant: the model has no Linear layer to quantize")
    names = set(picked)
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"), filter_fn=lambda m, fqn: fqn in names)
    return len(picked)


def strip(model: nn.Module) -> nn.Module:
    """Swap torchao's FakeQuantizedLinear layers back to nn.Linear (same weights) in place; returns `model`."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"))
    return model


def count_fake_quantized(model: nn.Module) -> int:
    from torchao.quantization.qat import FakeQuantizedLinear

    return sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())
