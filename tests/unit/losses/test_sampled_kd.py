"""Random-sampling KD: the importance-weighted forward KL over ids drawn from the teacher is an unbiased estimate of
the dense tempered KL (value and gradient) at T ≠ 1, where tempering the draws' frequencies is not."""

import pytest
import torch

from mmdistill.losses.composite import LogitDistillTerm
from mmdistill.losses.divergence import forward_kl, log_partition_grid, sampled_forward_kl, sparse_forward_kl
from mmdistill.signals import Signals
from mmdistill.teachers.cache import _sampled

V, N, M = 12, 8, 2000  # vocabulary, draws per set, independent draw sets


def _setup(temperature: float):
    g = torch.Generator().manual_seed(0)
    t0, s0 = torch.randn(V, generator=g), torch.randn(V, generator=g)
    lp = t0.log_softmax(-1).expand(M, V)
    ids, counts = _sampled(lp, N, torch.Generator().manual_seed(1))  # M independent sets of N draws
    lw = (counts.float() / N).log()
    logz = log_partition_grid(lp, [1.0 / temperature])[..., 0]  # [M]
    return t0, s0, lp, ids, lw, logz


def _z(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|mean − target| in standard errors of the mean, over dim 0."""
    return (values.mean(0) - target).abs() / (values.std(0) / values.shape[0] ** 0.5)


@pytest.mark.parametrize("temperature", [2.0, 0.7, 1.0])
def test_importance_weighted_value_is_unbiased_and_frequency_tempering_is_not(temperature):
    t0, s0, lp, ids, lw, logz = _setup(temperature)
    s = s0.expand(M, V)
    dense = forward_kl(s0[None], t0[None], temperature=temperature)
    new = sampled_forward_kl(s, ids, lp.gather(-1, ids), lw, temperature=temperature, logz=logz, reduction="none")  # [M]
    assert _z(new, dense) < 4.0, (new.mean(), dense)
    if temperature != 1.0:  # the old estimate: the frequencies tempered as a distribution (f^(1/T), renormalised)
        old = sparse_forward_kl(s, ids, lw, torch.full((M,), float("-inf")), temperature=temperature, reduction="none")
        assert _z(old, dense) > 10.0, (old.mean(), dense)


@pytest.mark.parametrize("temperature", [2.0, 0.7])
def test_importance_weighted_gradient_is_unbiased(temperature):
    t0, s0, lp, ids, lw, logz = _setup(temperature)
    dense_s = s0[None].clone().requires_grad_()
    forward_kl(dense_s, t0[None], temperature=temperature).backward()
    grads = {}
    for name in ("new", "old"):
        s = s0.expand(M, V).clone().requires_grad_()  # one row per draw set: per-row gradients
        if name == "new":
            loss = sampled_forward_kl(s, ids, lp.gather(-1, ids), lw, temperature=temperature, logz=logz, reduction="sum")
        else:
            loss = sparse_forward_kl(s, ids, lw, torch.full((M,), float("-inf")), temperature=temperature, reduction="sum")
        loss.backward()
        grads[name] = s.grad  # [M, V]
    assert _z(grads["new"], dense_s.grad[0]).max() < 5.0
    assert _z(grads["old"], dense_s.grad[0]).max() > 10.0


def test_kd_term_reads_the_weights_and_the_logz_grid():
    t0, s0, lp, ids, lw, _ = _setup(2.0)
    lp, ids, lw, s = lp[:6].view(2, 3, V), ids[:6].view(2, 3, -1), lw[:6].view(2, 3, -1), s0.expand(2, 3, V)
    betas = torch.linspace(0.5, 1.0, 5)
    teacher = Signals(topk_ids=ids, topk_logprobs=lp.gather(-1, ids), sample_logweights=lw, logz_grid=log_partition_grid(lp, betas.tolist()), tail_betas=betas)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    got = LogitDistillTerm("forward_kl", temperature=2.0, scale_t2=True)(Signals(logits=s, mask=mask), teacher, {}, 0.0)
    logz = log_partition_grid(lp, [0.5])[..., 0]  # β = 0.5 is a grid point: exact
    want = sampled_forward_kl(s, ids, lp.gather(-1, ids), lw, mask, temperature=2.0, logz=logz, scale_t2=True)
    assert torch.allclose(got, want, atol=1e-6)
    chunked = sampled_forward_kl(s, ids, lp.gather(-1, ids), lw, mask, temperature=2.0, logz=logz, scale_t2=True, chunk_size=2)
    assert torch.allclose(chunked, want, atol=1e-6)
    with pytest.raises(ValueError, match="unbiased form only for forward_kl"):
        LogitDistillTerm("reverse_kl")(Signals(logits=s), teacher, {}, 0.0)
    with pytest.raises(ValueError, match="needs Signals.logz_grid"):
        LogitDistillTerm("forward_kl", temperature=2.0)(Signals(logits=s), Signals(topk_ids=ids, topk_logprobs=lp.gather(-1, ids), sample_logweights=lw), {}, 0.0)
