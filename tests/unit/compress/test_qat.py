"""Quantization-aware training (compress.qat): fake-quant numerics equal the post-training quantization the quantize
stage applies, gradients flow, and stripping gives back a plain model with the trained weights."""

import pytest
import torch
from torch import nn

from mmdistill.compress import qat
from mmdistill.compress.quantize import INT4_GROUP, QuantizeError
from mmdistill.models.tiny import build_tiny_vlm, train_qwen_tokenizer

torch.set_num_threads(2)


@pytest.mark.parametrize("method", ["int4-weight", "int8-weight"])
def test_fake_quant_forward_matches_torchao_ptq(method):
    """A fake-quantized Linear computes what the torchao-quantized Linear of compress/quantize.py computes."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 48))
    x = torch.randn(5, 64)
    fq = nn.Sequential(nn.Linear(64, 48))
    fq.load_state_dict(lin.state_dict())
    ptq = nn.Sequential(nn.Linear(64, 48))
    ptq.load_state_dict(lin.state_dict())
    assert qat.prepare(fq, method) == 1
    cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP)) if method == "int4-weight" else Int8WeightOnlyConfig()
    quantize_(ptq, cfg)
    with torch.no_grad():
        a, b, ref = fq(x), ptq(x), lin(x)
    assert (a - ref).abs().max() > 1e-4  # the rounding is simulated ...
    torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)  # ... as the real quantization does it


def test_prepare_train_strip_on_a_tiny_vlm(tmp_path):
    from transformers import AutoModelForImageTextToText

    tok = train_qwen_tokenizer(["a red circle on the left of a blue square", "what color is the triangle? green"] * 40, vocab_size=300)
    model, _ = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-student", tokenizer=tok, seed=0)
    keys = set(model.state_dict())
    ids = torch.randint(0, len(tok) - 20, (2, 12), generator=torch.Generator().manual_seed(0))
    mm = torch.zeros_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, mm_token_type_ids=mm).logits
    n = qat.prepare(model, "int4-weight")
    assert n == qat.count_fake_quantized(model) > 4
    assert type(model.get_output_embeddings()) is nn.Linear  # the head tied to the embeddings stays as it is
    out = model(input_ids=ids, mm_token_type_ids=mm).logits
    assert not torch.allclose(out, ref, atol=1e-5)
    out.logsumexp(-1).mean().backward()
    from torchao.quantization.qat import FakeQuantizedLinear

    fq = next(m for n, m in model.named_modules() if "language_model" in n and isinstance(m, FakeQuantizedLinear))  # text only: no image here
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0  # straight-through gradients reach the weights
    qat.strip(model)
    assert qat.count_fake_quantized(model) == 0 and set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, mm_token_type_ids=mm).logits, ref)  # plain fp32 again, same weights
    model.save_pretrained(tmp_path / "m")
    AutoModelForImageTextToText.from_pretrained(tmp_path / "m")


def test_unknown_method_is_one_line():
    with pytest.raises(QuantizeError, match="fake_quant 'int3' is unknown"):
        qat.prepare(nn.Sequential(nn.Linear(64, 8)), "int3")
