"""CLIP-style losses against hand-written references (open_clip, CLIP-KD, TinyCLIP formulas)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmdistill.losses.contrastive import (
    affinity_mimic,
    clip_loss,
    crd_loss,
    fd_loss,
    icl_loss,
    similarity_kd,
)
from mmdistill.losses.features import FeatureProjector

N = 6


def _emb(seed, d=8, n=N):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _pairs(d_s=8, d_t=8):
    return _emb(0, d_s), _emb(1, d_s), torch.tensor(10.0), _emb(2, d_t), _emb(3, d_t), torch.tensor(50.0)


def test_clip_loss_matches_loop_reference():
    img, txt = _emb(0), _emb(1)
    scale = 20.0
    sim = scale * _unit(img) @ _unit(txt).T
    i2t = -sum(sim[i].log_softmax(0)[i] for i in range(N)) / N
    t2i = -sum(sim[:, j].log_softmax(0)[j] for j in range(N)) / N
    assert torch.allclose(clip_loss(img, txt, scale), (i2t + t2i) / 2, atol=1e-5)
    # normalised inside: scaling embeddings changes nothing
    assert torch.allclose(clip_loss(3 * img, 0.5 * txt, torch.tensor(scale)), (i2t + t2i) / 2, atol=1e-5)


def test_similarity_kd_matches_hand_written_reference():
    s_img, s_txt, s_scale, t_img, t_txt, t_scale = _pairs(8, 12)
    s_logits = s_scale * _unit(s_img) @ _unit(s_txt).T
    t_logits = t_scale * _unit(t_img) @ _unit(t_txt).T
    total_i2t = total_t2i = 0.0
    for i in range(N):
        p_t = t_logits[i].softmax(0)
        total_i2t += -(p_t * s_logits[i].log_softmax(0)).sum()
        p_t = t_logits[:, i].softmax(0)
        total_t2i += -(p_t * s_logits[:, i].log_softmax(0)).sum()
    want = (total_i2t / N + total_t2i / N) / 2
    got = similarity_kd(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
    assert torch.allclose(got, want, atol=1e-5)
    # TinyCLIP's affinity mimicking is the same formula
    assert torch.equal(affinity_mimic(s_img, s_txt, s_scale, t_img, t_txt, t_scale), got)


def test_crd_is_kl_zero_at_match_and_sim_kd_minus_teacher_entropy():
    s_img, s_txt, s_scale, t_img, t_txt, t_scale = _pairs()
    assert abs(crd_loss(t_img, t_txt, t_scale, t_img, t_txt, t_scale).item()) < 1e-6
    crd = crd_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
    s_logits = s_scale * _unit(s_img) @ _unit(s_txt).T
    t_logits = t_scale * _unit(t_img) @ _unit(t_txt).T
    # CLIP-KD's DistillKL(T=1): F.kl_div(log_softmax(s), softmax(t), reduction="batchmean")
    want = (
        F.kl_div(s_logits.log_softmax(1), t_logits.softmax(1), reduction="batchmean")
        + F.kl_div(s_logits.T.log_softmax(1), t_logits.T.softmax(1), reduction="batchmean")
    ) / 2
    assert torch.allclose(crd, want, atol=1e-5)
    entropy = lambda z: -(z.softmax(1) * z.log_softmax(1)).sum(1).mean()  # noqa: E731
    sim = similarity_kd(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
    assert torch.allclose(sim - (entropy(t_logits) + entropy(t_logits.T)) / 2, crd, atol=1e-5)


def test_crd_temperature_and_t2():
    s_img, s_txt, s_scale, t_img, t_txt, t_scale = _pairs()
    temp = 4.0
    got = crd_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale, temperature=temp)
    base = crd_loss(s_img, s_txt, s_scale / temp, t_img, t_txt, t_scale / temp)
    assert torch.allclose(got, base * temp**2, atol=1e-5)


def test_fd_loss_reference_and_projectors():
    s_img, s_txt, _, t_img, t_txt, _ = _pairs(8, 8)
    want = F.mse_loss(_unit(s_img), _unit(t_img)) + F.mse_loss(_unit(s_txt), _unit(t_txt))
    assert torch.allclose(fd_loss(s_img, s_txt, t_img, t_txt), want, atol=1e-6)
    assert fd_loss(t_img, t_txt, 2 * t_img, t_txt).item() < 1e-10

    s_img, s_txt, _, t_img, t_txt, _ = _pairs(8, 16)
    with pytest.raises(ValueError, match="projector"):
        fd_loss(s_img, s_txt, t_img, t_txt)
    p_img, p_txt = FeatureProjector(8, 16), FeatureProjector(8, 16)
    params = list(p_img.parameters()) + list(p_txt.parameters())
    assert params and all(p.requires_grad for p in params)
    loss = fd_loss(s_img, s_txt, t_img, t_txt, image_projector=p_img, text_projector=p_txt)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    want = F.mse_loss(_unit(p_img(s_img)), _unit(t_img)) + F.mse_loss(_unit(p_txt(s_txt)), _unit(t_txt))
    assert torch.allclose(loss, want, atol=1e-6)


def test_icl_loss_matches_reference():
    s_img, s_txt, _, t_img, t_txt, _ = _pairs(8, 16)
    p_img, p_txt = FeatureProjector(8, 16), FeatureProjector(8, 16)
    scale = 1 / 0.07
    i2t = scale * _unit(p_img(s_img)) @ _unit(t_txt).T
    t2i = scale * _unit(p_txt(s_txt)) @ _unit(t_img).T
    labels = torch.arange(N)
    want = (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2
    got = icl_loss(s_img, s_txt, t_img, t_txt, scale, image_projector=p_img, text_projector=p_txt)
    assert torch.allclose(got, want, atol=1e-5)


def test_grads_finite_for_bf16_and_shape_errors():
    s_img, s_txt, s_scale, t_img, t_txt, t_scale = _pairs()
    s_img = s_img.bfloat16().requires_grad_()
    loss = similarity_kd(s_img, s_txt, s_scale, t_img.bfloat16(), t_txt, t_scale) + clip_loss(s_img, s_txt, s_scale)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    assert torch.isfinite(s_img.grad.float()).all()
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(_emb(0), _emb(1, n=N - 1), 1.0)
    with pytest.raises(ValueError, match="batch"):
        similarity_kd(_emb(0), _emb(1), 1.0, _emb(2, n=4), _emb(3, n=4), 1.0)
