"""SigLIP's pairwise sigmoid loss against the paper's formula and transformers' SiglipModel(return_loss=True)."""

import math

import pytest
import torch

from mmdistill.losses.composite import build_contrastive_loss
from mmdistill.losses.contrastive import siglip_loss
from mmdistill.models import contrastive as cm
from mmdistill.signals import Signals


def _emb(seed, n=5, d=8):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _reference(img, txt, t, b):
    """The paper's Algorithm 1 written out pair by pair: −(1/n) Σ_ij log σ(z_ij (t x_i·y_j + b))."""
    x = img / img.norm(dim=-1, keepdim=True)
    y = txt / txt.norm(dim=-1, keepdim=True)
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = t * float(x[i] @ y[j]) + b
            total += math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return -total / n


@pytest.mark.parametrize("t,b", [(10.0, -10.0), (1.0, 0.0), (3.5, 2.0)])
def test_siglip_loss_matches_the_papers_formula(t, b):
    img, txt = _emb(0), _emb(1)
    got = siglip_loss(img, txt, torch.tensor(t), torch.tensor(b))
    assert got.item() == pytest.approx(_reference(img, txt, t, b), rel=1e-5)


def test_siglip_loss_matches_transformers_siglip_model():
    """SiglipModel's own loss (big_vision port) on a tiny random model equals siglip_loss on its embeddings."""
    texts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
    model, proc = cm.build_tiny_clip(None, texts, preset="siglip-nano", image_size=32, patch_size=8)
    model.eval()
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)  # away from the init so the bias's sign and place are checked
        pv = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        t = cm.preprocess_texts(proc, texts)
        out = model(pixel_values=pv, input_ids=t["input_ids"], attention_mask=t["attention_mask"], return_loss=True)
        sig = cm.encode(model, {"pixel_values": pv, **t})
    assert sig.logit_bias is not None and sig.logit_bias.item() == pytest.approx(-1.5)
    ours = siglip_loss(sig.image_embeds, sig.text_embeds, sig.logit_scale, sig.logit_bias)
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_siglip_term_learns_scale_and_bias_for_a_clip_style_student():
    loss = build_contrastive_loss({"siglip": {"weight": 1.0}}, 8, None)
    term = loss.term_modules["siglip"]
    names = {n for n, _ in loss.named_parameters()}
    assert names == {"term_modules.siglip.log_scale", "term_modules.siglip.bias"}
    img, txt = _emb(2).requires_grad_(), _emb(3)
    s = Signals(image_embeds=img, text_embeds=txt, logit_scale=torch.tensor(100.0))  # a CLIP scale: not used
    out = loss(s, None, {}, 0.0)
    assert out["siglip"].item() == pytest.approx(_reference(img.detach(), txt, 10.0, -10.0), rel=1e-5)
    out["loss"].backward()
    assert term.bias.grad is not None and term.log_scale.grad is not None and img.grad is not None
    # a SigLIP student brings its own scale and bias
    s2 = Signals(image_embeds=img.detach(), text_embeds=txt, logit_scale=torch.tensor(2.0), logit_bias=torch.tensor(0.5))
    assert loss(s2, None, {}, 0.0)["siglip"].item() == pytest.approx(_reference(img.detach(), txt, 2.0, 0.5), rel=1e-5)


def test_siglip_term_options_are_checked():
    with pytest.raises(ValueError, match="own 'mine' is not one of auto, model, learned"):
        build_contrastive_loss({"siglip": {"own": "mine"}}, 8, None)
    loss = build_contrastive_loss({"siglip": {"own": "model"}}, 8, None)
    s = Signals(image_embeds=_emb(0), text_embeds=_emb(1), logit_scale=torch.tensor(2.0))
    with pytest.raises(ValueError, match="logit_bias"):
        loss(s, None, {}, 0.0)
