"""Token-level divergences: reference formulas, masking, chunking, sparse teachers, accumulation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from mmdistill.losses.divergence import (
    DIVERGENCES,
    SPARSE_DIVERGENCES,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    interpolate_tail,
    sparse_forward_kl,
    tail_logmass_from_topk,
    tempered_tail_grid,
    tvd,
)

B, T, V = 3, 5, 17
NAMES = list(DIVERGENCES)


def _logits(seed=0, scale=2.0, shape=(B, T, V)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _mask(seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    m = torch.rand(B, T, generator=g) > 0.4
    m[0, 0] = True
    return m


def _reference(name, s, t, temperature=1.0, **opt):
    """float64 per-position brute force: [*, V] -> [*]."""
    ps = (s.double() / temperature).softmax(-1)
    pt = (t.double() / temperature).softmax(-1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if name == "forward_kl":
        return kl(pt, ps)
    if name == "reverse_kl":
        return kl(ps, pt)
    if name == "jsd":
        beta = opt.get("beta", 0.5)
        m = beta * pt + (1 - beta) * ps
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    if name == "skew_kl":
        a = opt.get("alpha", 0.1)
        return kl(pt, a * pt + (1 - a) * ps)
    if name == "skew_reverse_kl":
        a = opt.get("alpha", 0.1)
        return kl(ps, a * ps + (1 - a) * pt)
    if name == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    raise KeyError(name)


def _sorted_sparse(teacher_logits, k=None, temperature=1.0):
    """Teacher as top-k ids + log-probs (temperature 1) + tail log-mass; k=None keeps all V."""
    lp = teacher_logits.float().log_softmax(-1)
    vals, ids = lp.sort(-1, descending=True)
    k = k or lp.shape[-1]
    vals, ids = vals[..., :k], ids[..., :k]
    tail = tail_logmass_from_topk(vals) if k < lp.shape[-1] else torch.full(lp.shape[:-1], float("-inf"))
    return ids, vals, tail


@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference_with_mask(name):
    s, t, m = _logits(0), _logits(1), _mask()
    got = DIVERGENCES[name](s, t, m)
    want = _reference(name, s, t)[m].mean()
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)


def test_forward_and_reverse_kl_match_torch_references():
    s, t = _logits(0), _logits(1)
    ref_fwd = kl_divergence(Categorical(logits=t), Categorical(logits=s)).mean()
    ref_rev = kl_divergence(Categorical(logits=s), Categorical(logits=t)).mean()
    kl_div = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="none", log_target=True).sum(-1).mean()
    assert torch.allclose(forward_kl(s, t), ref_fwd, atol=1e-5)
    assert torch.allclose(forward_kl(s, t), kl_div, atol=1e-5)
    assert torch.allclose(reverse_kl(s, t), ref_rev, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_student_equals_teacher(name):
    s = _logits(3)
    assert DIVERGENCES[name](s, s.clone()).abs().item() < 1e-6
    ids, lp, tail = _sorted_sparse(s, k=5)
    assert SPARSE_DIVERGENCES[name](s, ids, lp, tail).abs().item() < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_non_negative_on_random_inputs(name):
    for seed in range(5):
        per_pos = DIVERGENCES[name](_logits(seed, 3.0), _logits(seed + 50, 3.0), reduction="none")
        assert (per_pos >= -1e-6).all()


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t, m = _logits(0), _logits(1), _mask()
    assert torch.equal(generalized_jsd(s, t, m, beta=0.0), forward_kl(s, t, m))
    assert torch.equal(generalized_jsd(s, t, m, beta=1.0), reverse_kl(s, t, m))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_between_endpoints_is_bounded(beta):
    s, t = _logits(0, 3.0), _logits(1, 3.0)
    jsd = generalized_jsd(s, t, beta=beta, reduction="none")
    fwd = forward_kl(s, t, reduction="none")
    rev = reverse_kl(s, t, reduction="none")
    binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert (jsd <= binary_entropy + 1e-5).all()  # KL(p‖m) ≤ log(1/β) because m ≥ β p
    assert (jsd <= beta * (1 - beta) * (fwd + rev) + 1e-5).all()  # convexity of KL in its 2nd argument
    assert (jsd <= torch.maximum(fwd, rev) + 1e-6).all()


def test_skew_kl_endpoint_and_bounds():
    s, t = _logits(0, 3.0), _logits(1, 3.0)
    assert torch.allclose(skew_kl(s, t, alpha=0.0), forward_kl(s, t))
    assert torch.allclose(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))
    alpha = 0.1
    fwd = forward_kl(s, t, reduction="none")
    sk = skew_kl(s, t, alpha=alpha, reduction="none")
    assert (sk <= (1 - alpha) * fwd + 1e-5).all()
    assert (sk <= math.log(1 / alpha) + 1e-5).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_with_all_ids_equals_dense(name, temperature):
    s, t, m = _logits(0), _logits(1), _mask()
    ids, lp, tail = _sorted_sparse(t)
    dense = DIVERGENCES[name](s, t, m, temperature=temperature)
    sparse = SPARSE_DIVERGENCES[name](s, ids, lp, tail, m, temperature=temperature)
    sparse_chunked = SPARSE_DIVERGENCES[name](s, ids, lp, tail, m, temperature=temperature, chunk_size=2)
    assert torch.allclose(sparse, dense, atol=1e-5), (sparse, dense)
    assert torch.allclose(sparse_chunked, dense, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_topk_matches_bucketed_reference(name):
    s, t = _logits(0), _logits(1)
    k = 4
    ids, lp, tail = _sorted_sparse(t, k=k)
    got = SPARSE_DIVERGENCES[name](s, ids, lp, tail, reduction="none")
    # brute force: collapse both distributions to the k ids + the rest, position by position
    ps, pt = s.double().softmax(-1), t.double().softmax(-1)
    want = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            keep = ids[b, i]
            rest = torch.ones(V, dtype=torch.bool)
            rest[keep] = False
            qs = torch.cat([ps[b, i, keep], ps[b, i, rest].sum().view(1)])
            qt = torch.cat([pt[b, i, keep], pt[b, i, rest].sum().view(1)])
            want[b, i] = _reference(name, qs.log(), qt.log())
    assert torch.allclose(got.double(), want, atol=1e-5)
    # the collapsed divergence never exceeds the full one (data processing inequality)
    assert (got <= DIVERGENCES[name](s, t, reduction="none") + 1e-5).all()


def _bucketed_tempered(s, t, ids, temperature):
    """float64 brute force: both distributions tempered first, then collapsed to the kept ids + the rest."""
    ps, pt = (s.double() / temperature).softmax(-1), (t.double() / temperature).softmax(-1)
    rest = torch.ones_like(ps, dtype=torch.bool).scatter(-1, ids, False)
    qs = torch.cat([ps.gather(-1, ids), (ps * rest).sum(-1, keepdim=True)], -1)
    qt = torch.cat([pt.gather(-1, ids), (pt * rest).sum(-1, keepdim=True)], -1)
    return qs.log(), qt.log()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0.7, 2.0, 4.0])
def test_sparse_exact_tail_tempering_matches_tempered_buckets(name, temperature):
    s, t = _logits(0), _logits(1)
    ids, lp, tail = _sorted_sparse(t, k=4)
    grid = tempered_tail_grid(t.log_softmax(-1), ids, [1.0 / temperature])  # [B, T, 1]
    got = SPARSE_DIVERGENCES[name](s, ids, lp, tail, temperature=temperature, tail_tempered=grid[..., 0], reduction="none")
    qs, qt = _bucketed_tempered(s, t, ids, temperature)
    want = _reference(name, qs, qt)
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)
    # the one-token approximation is a different (wrong) number at T != 1
    approx = SPARSE_DIVERGENCES[name](s, ids, lp, tail, temperature=temperature, reduction="none")
    assert not torch.allclose(approx.double(), want, atol=1e-3)


def test_tail_grid_interpolation_is_exact_at_points_and_bounded_between():
    t = _logits(1)
    ids, lp, tail = _sorted_sparse(t, k=4)
    betas = torch.linspace(0.5, 1.0, 5).tolist()
    grid = tempered_tail_grid(t.log_softmax(-1), ids, betas)
    assert torch.allclose(grid[..., -1], tail, atol=1e-5)  # β = 1: the tail's own mass
    for b in betas:
        exact = tempered_tail_grid(t.log_softmax(-1), ids, [b])[..., 0]
        assert torch.allclose(interpolate_tail(grid, betas, 1.0 / b), exact, atol=1e-5)
    for temp in (1.1, 1.5, 1.9):  # between points: the chord of a convex function, above it but close
        exact = tempered_tail_grid(t.log_softmax(-1), ids, [1.0 / temp])[..., 0]
        got = interpolate_tail(grid, betas, temp)
        assert (got >= exact - 1e-5).all() and (got - exact).abs().max() < 0.05
    with pytest.raises(ValueError, match="outside the stored tail grid"):
        interpolate_tail(grid, betas, 3.0)


def test_kd_term_tempers_the_tail_from_the_signals_grid():
    from mmdistill.losses.composite import LogitDistillTerm
    from mmdistill.signals import Signals

    s, t = _logits(0), _logits(1)
    ids, lp, tail = _sorted_sparse(t, k=4)
    betas = torch.linspace(0.5, 1.0, 5)
    grid = tempered_tail_grid(t.log_softmax(-1), ids, betas.tolist())
    term = LogitDistillTerm("forward_kl", temperature=2.0)
    teacher = Signals(topk_ids=ids, topk_logprobs=lp, tail_logmass=tail, tail_grid=grid, tail_betas=betas)
    got = term(Signals(logits=s), teacher, {}, 0.0)
    qs, qt = _bucketed_tempered(s, t, ids, 2.0)
    assert torch.allclose(got.double(), _reference("forward_kl", qs, qt).mean(), atol=1e-5)


def test_sparse_tail_defaults_to_the_missing_mass():
    s, t = _logits(0), _logits(1)
    ids, lp, tail = _sorted_sparse(t, k=6)
    assert torch.allclose(sparse_forward_kl(s, ids, lp, None), sparse_forward_kl(s, ids, lp, tail))


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked_values_and_grads(name):
    t, m = _logits(1), _mask()
    s1 = _logits(0).requires_grad_()
    s2 = _logits(0).requires_grad_()
    a = DIVERGENCES[name](s1, t, m)
    b = DIVERGENCES[name](s2, t, m, chunk_size=3)
    assert torch.allclose(a, b, atol=1e-6)
    a.backward()
    b.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_num_items_makes_accumulation_equal_one_big_batch(sparse):
    t, m = _logits(1), _mask()
    m[2] = False  # micro-batches with different counts
    m[2, 0] = True
    s_big = _logits(0).requires_grad_()
    s_acc = _logits(0).requires_grad_()
    ids, lp, tail = _sorted_sparse(t, k=5)

    def loss(s, sl, **kw):
        if sparse:
            return sparse_forward_kl(s[sl], ids[sl], lp[sl], tail[sl], m[sl], **kw)
        return forward_kl(s[sl], t[sl], m[sl], **kw)

    big = loss(s_big, slice(None))
    big.backward()
    n = int(m.sum())
    acc = loss(s_acc, slice(0, 2), num_items=n) + loss(s_acc, slice(2, 3), num_items=torch.tensor(n))
    acc.backward()
    assert torch.allclose(big, acc, atol=1e-6)
    assert torch.allclose(s_big.grad, s_acc.grad, atol=1e-7)
    # without num_items, the per-micro-batch means do not add up to the big-batch mean
    naive = loss(s_acc, slice(0, 2)) + loss(s_acc, slice(2, 3))
    assert not torch.allclose(big, naive / 2, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_are_ignored(name):
    s, t, m = _logits(0), _logits(1), _mask()
    s2 = s.clone()
    s2[~m] = 1e3 * torch.randn_like(s2[~m])  # garbage at masked positions
    assert torch.equal(DIVERGENCES[name](s, t, m), DIVERGENCES[name](s2, t, m))
    per_pos = DIVERGENCES[name](s2, t, m, reduction="none")
    assert per_pos.shape == (B, T)
    assert (per_pos[~m] == 0).all()
    assert torch.allclose(per_pos.sum(), DIVERGENCES[name](s, t, m, reduction="sum"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sparse", [False, True])
def test_all_masked_gives_zero_not_nan(name, sparse):
    s = _logits(0).requires_grad_()
    t = _logits(1)
    m = torch.zeros(B, T, dtype=torch.bool)
    if sparse:
        ids, lp, tail = _sorted_sparse(t, k=3)
        loss = SPARSE_DIVERGENCES[name](s, ids, lp, tail, m, chunk_size=2)
    else:
        loss = DIVERGENCES[name](s, t, m, chunk_size=2)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_upcast_with_finite_grads(name, dtype):
    s = (_logits(0, 8.0)).to(dtype).requires_grad_()
    t = (_logits(1, 8.0)).to(dtype)
    loss = DIVERGENCES[name](s, t, _mask(), chunk_size=4)
    assert loss.dtype == torch.float32
    want = DIVERGENCES[name](s.detach().float(), t.float(), _mask())
    assert torch.allclose(loss, want, atol=1e-6)
    loss.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()
    ids, lp, tail = _sorted_sparse(t.float(), k=5)
    s.grad = None
    sparse = SPARSE_DIVERGENCES[name](s, ids.long(), lp.to(dtype), tail.to(dtype), _mask())
    sparse.backward()
    assert torch.isfinite(sparse) and torch.isfinite(s.grad.float()).all()


def test_finite_grads_with_minus_inf_logits():
    """A vocabulary-padding column at -inf must not make NaNs anywhere."""
    s = _logits(0).requires_grad_()
    t = _logits(1)
    pad = torch.zeros(V, dtype=torch.bool)
    pad[-2:] = True
    for name in NAMES:
        s.grad = None
        loss = DIVERGENCES[name](s.masked_fill(pad, float("-inf")), t.masked_fill(pad, float("-inf")))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), name


@pytest.mark.parametrize("name", NAMES)
def test_temperature_divides_logits_and_t2_scales(name):
    s, t, m = _logits(0), _logits(1), _mask()
    temp = 3.0
    plain = DIVERGENCES[name](s, t, m, temperature=temp)
    assert torch.allclose(plain, DIVERGENCES[name](s / temp, t / temp, m), atol=1e-6)
    assert torch.allclose(DIVERGENCES[name](s, t, m, temperature=temp, scale_t2=True), plain * temp**2, atol=1e-6)
    want = _reference(name, s, t, temperature=temp)[m].mean()
    assert torch.allclose(plain.double(), want, atol=1e-5)


def test_flat_inputs_and_errors():
    s, t = _logits(0, shape=(7, V)), _logits(1, shape=(7, V))
    m = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert torch.allclose(tvd(s, t, m), _reference("tvd", s, t)[m].mean().float(), atol=1e-6)
    with pytest.raises(ValueError, match="mask has shape"):
        forward_kl(s, t, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(s, t[:, :5])
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(s, t, reduction="batchmean")
    with pytest.raises(ValueError, match="topk_ids"):
        sparse_forward_kl(s, torch.zeros(7, 2, 3, dtype=torch.long), torch.zeros(7, 2, 3), None)
