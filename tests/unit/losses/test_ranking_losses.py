"""Ranking losses against brute-force Python-loop references on ragged masks; masking, gradients,
empty groups; the ranking terms and build_ranking_loss (options, errors, the score/feature hybrid)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmdistill.losses.composite import CompositeLoss
from mmdistill.losses.ranking import (
    RANKING_TERMS,
    LabelBCETerm,
    ListwiseKLTerm,
    MarginMSETerm,
    RankFeatureTerm,
    build_ranking_loss,
    label_bce,
    label_listwise_ce,
    listwise_kl,
    margin_mse,
    pointwise_mse,
)
from mmdistill.signals import Signals


def _data(seed, b=5, k=7, empty_group=False):
    """student, teacher, labels [B, K] (float64 for the references), ragged mask; padding is garbage."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=g) * 2
    t = torch.randn(b, k, generator=g) * 2
    y = torch.randint(0, 4, (b, k), generator=g).float() * (torch.rand(b, k, generator=g) < 0.5)
    sizes = torch.randint(1, k + 1, (b,), generator=g)
    sizes[0] = k
    if empty_group:
        sizes[-1] = 0
    mask = torch.arange(k).unsqueeze(0) < sizes.unsqueeze(1)
    y[0, 0], y[0, 1] = 3.0, 0.0  # at least one group with a positive and a pair
    return s, t, y, mask


def _valid(row, mask_row):
    return [float(v) for v, m in zip(row, mask_row) if m]


# ---------------------------------------------------------------------------------------------
# brute-force references


def ref_pointwise(s, t, mask):
    sq = [(a - b) ** 2 for sr, tr, mr in zip(s, t, mask) for a, b in zip(_valid(sr, mr), _valid(tr, mr))]
    return sum(sq) / len(sq) if sq else 0.0


def ref_margin(s, t, mask, labels=None):
    total, n = 0.0, 0
    for b in range(len(s)):
        sv, tv = _valid(s[b], mask[b]), _valid(t[b], mask[b])
        ov = _valid(labels[b], mask[b]) if labels is not None else tv
        for i in range(len(sv)):
            for j in range(len(sv)):
                if ov[i] > ov[j]:
                    total += ((sv[i] - sv[j]) - (tv[i] - tv[j])) ** 2
                    n += 1
    return total / n if n else 0.0


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def ref_kl(s, t, mask, temperature, scale_t2=True):
    kls = []
    for b in range(len(s)):
        sv, tv = _valid(s[b], mask[b]), _valid(t[b], mask[b])
        if not sv:
            continue
        p = _softmax([x / temperature for x in tv])
        q = _softmax([x / temperature for x in sv])
        kls.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))
    loss = sum(kls) / len(kls) if kls else 0.0
    return loss * temperature**2 if scale_t2 else loss


def ref_bce(s, labels, mask, max_label):
    terms = []
    for b in range(len(s)):
        for x, y in zip(_valid(s[b], mask[b]), _valid(labels[b], mask[b])):
            target = min(max(y / max_label, 0.0), 1.0)
            p = 1 / (1 + math.exp(-x))
            terms.append(-(target * math.log(p) + (1 - target) * math.log(1 - p)))
    return sum(terms) / len(terms) if terms else 0.0


def ref_ce(s, labels, mask, temperature):
    ces = []
    for b in range(len(s)):
        sv, yv = _valid(s[b], mask[b]), _valid(labels[b], mask[b])
        if sum(yv) <= 0:
            continue
        q = _softmax([x / temperature for x in sv])
        ces.append(-sum(y / sum(yv) * math.log(qi) for y, qi in zip(yv, q)))
    return sum(ces) / len(ces) if ces else 0.0


# ---------------------------------------------------------------------------------------------
# losses vs references


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("empty_group", [False, True])
def test_losses_match_references(seed, empty_group):
    s, t, y, mask = _data(seed, empty_group=empty_group)
    S, T, Y, M = s.tolist(), t.tolist(), y.tolist(), mask.tolist()
    assert pointwise_mse(s, t, mask).item() == pytest.approx(ref_pointwise(S, T, M), rel=1e-5)
    assert margin_mse(s, t, mask).item() == pytest.approx(ref_margin(S, T, M), rel=1e-5)
    assert margin_mse(s, t, mask, y).item() == pytest.approx(ref_margin(S, T, M, Y), rel=1e-5)
    for temp in (0.5, 1.0, 3.0):
        for scale in (True, False):
            got = listwise_kl(s, t, mask, temperature=temp, scale_t2=scale).item()
            assert got == pytest.approx(ref_kl(S, T, M, temp, scale), rel=1e-4, abs=1e-6)
    assert label_bce(s, y, mask, max_label=3.0).item() == pytest.approx(ref_bce(S, Y, M, 3.0), rel=1e-5)
    assert label_bce(s, y, mask).item() == pytest.approx(ref_bce(S, Y, M, 3.0), rel=1e-5)  # batch max is 3
    binary = (y > 0).float()
    assert label_bce(s, binary, mask).item() == pytest.approx(ref_bce(S, binary.tolist(), M, 1.0), rel=1e-5)
    for temp in (0.5, 1.0):
        got = label_listwise_ce(s, y, mask, temperature=temp).item()
        assert got == pytest.approx(ref_ce(S, Y, M, temp), rel=1e-5)


def test_listwise_kl_matches_torch_kl_div():
    s, t, _, _ = _data(3)
    temp = 2.0
    expected = F.kl_div(
        F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True, reduction="batchmean"
    ) * temp**2
    assert listwise_kl(s, t, None, temperature=temp).item() == pytest.approx(expected.item(), rel=1e-5)
    # per ragged group: kl_div on the valid slice of each group
    s, t, _, mask = _data(4)
    per = [
        F.kl_div(F.log_softmax(s[b][mask[b]], -1), F.log_softmax(t[b][mask[b]], -1), log_target=True, reduction="sum")
        for b in range(len(s))
    ]
    assert listwise_kl(s, t, mask).item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-5)


def test_identical_scores_give_zero_distillation_loss():
    s, _, _, mask = _data(5)
    assert pointwise_mse(s, s, mask).item() == 0.0
    assert margin_mse(s, s, mask).item() == 0.0
    assert listwise_kl(s, s, mask).item() == pytest.approx(0.0, abs=1e-6)
    # a constant shift keeps margins and the softmax
    assert margin_mse(s + 3.0, s, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert listwise_kl(s + 3.0, s, mask).item() == pytest.approx(0.0, abs=1e-5)


def _all_losses(s, t, y, mask):
    return {
        "pointwise": pointwise_mse(s, t, mask),
        "margin_teacher": margin_mse(s, t, mask),
        "margin_labels": margin_mse(s, t, mask, y),
        "kl": listwise_kl(s, t, mask, temperature=2.0),
        "bce": label_bce(s, y, mask, max_label=3.0),
        "ce": label_listwise_ce(s, y, mask),
    }


def test_masked_candidates_have_no_effect_and_zero_gradient():
    s, t, y, mask = _data(6, empty_group=True)
    base = {k: v.item() for k, v in _all_losses(s, t, y, mask).items()}
    s2, t2, y2 = s.clone(), t.clone(), y.clone()
    s2[~mask], t2[~mask], y2[~mask] = float("nan"), float("inf"), 1e6  # garbage in padding
    s2.requires_grad_(True)
    for name, value in _all_losses(s2, t2, y2, mask).items():
        assert value.item() == pytest.approx(base[name], rel=1e-6, abs=1e-7), name
        (grad,) = torch.autograd.grad(value, s2)
        assert torch.isfinite(grad).all(), name
        assert (grad[~mask] == 0).all(), name
        assert grad[mask].abs().sum() > 0, name


def test_all_masked_gives_zero_not_nan():
    s, t, y, _ = _data(7)
    s.requires_grad_(True)
    mask = torch.zeros_like(s, dtype=torch.bool)
    for name, value in _all_losses(s, t, y, mask).items():
        assert value.item() == 0.0, name
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(grad).all() and (grad == 0).all(), name


def test_gradients_finite_with_extreme_scores_and_half_inputs():
    s, t, y, mask = _data(8)
    s = (s * 1e3).half().requires_grad_(True)
    t = (t * 1e3).half()
    for name, value in _all_losses(s, t, y, mask).items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(grad.float()).all(), name


def test_ce_skips_groups_without_positive():
    s = torch.tensor([[1.0, 2.0], [0.5, 0.1]])
    y = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    expected = -F.log_softmax(s[1], -1)[0]
    assert label_listwise_ce(s, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert label_listwise_ce(s, torch.zeros_like(y)).item() == 0.0


def test_loss_argument_errors():
    s, t, y, mask = _data(9)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        listwise_kl(s, t, mask, temperature=0.0)
    with pytest.raises(ValueError, match="mask has shape"):
        pointwise_mse(s, t, mask[:, :3])
    with pytest.raises(ValueError, match="shapes differ"):
        margin_mse(s, t[:, :3], None)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        pointwise_mse(s[0], t[0])
    with pytest.raises(ValueError, match="max_label must be > 0"):
        label_bce(s, y, mask, max_label=0.0)


# ---------------------------------------------------------------------------------------------
# terms and build_ranking_loss


def _signals(seed, b=3, k=4, d=8, grad=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, k, generator=g).requires_grad_(grad)
    feats = torch.randn(b, k, d, generator=g).requires_grad_(grad)
    return Signals(scores=scores, features={"last_token": feats})


def _batch(b=3, k=4):
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[1, 2:] = False
    labels = torch.zeros(b, k)
    labels[:, 0] = 2.0
    labels[0, 1] = 1.0
    return {"mask": mask, "labels": labels * mask}


def test_terms_compute_the_pure_losses():
    student, teacher, batch = _signals(0), _signals(1), _batch()
    s, t, m, y = student.scores, teacher.scores, batch["mask"], batch["labels"]
    loss = build_ranking_loss(
        {
            "pointwise": {},
            "margin_mse": {"weight": 0.1},
            "listwise_kl": {"temperature": 2.0},
            "bce": {"max_label": 2},
            "ce": {},
        },
        8,
        8,
    )
    out = loss(student, teacher, batch, progress=0.5)
    assert out["pointwise"].item() == pytest.approx(pointwise_mse(s, t, m).item())
    assert out["margin_mse"].item() == pytest.approx(margin_mse(s, t, m, y).item())  # pairs="auto" uses labels
    assert out["listwise_kl"].item() == pytest.approx(listwise_kl(s, t, m, temperature=2.0).item())
    assert out["bce"].item() == pytest.approx(label_bce(s, y, m, max_label=2.0).item())
    assert out["ce"].item() == pytest.approx(label_listwise_ce(s, y, m).item())
    parts = out["pointwise"] + 0.1 * out["margin_mse"] + out["listwise_kl"] + out["bce"] + out["ce"]
    assert out["loss"].item() == pytest.approx(parts.item())

    no_labels = {"mask": batch["mask"]}
    term = MarginMSETerm(8, 8)
    assert term(student, teacher, no_labels, 0.0).item() == pytest.approx(margin_mse(s, t, m).item())
    with pytest.raises(ValueError, match="needs labels"):
        MarginMSETerm(8, 8, pairs="labels")(student, teacher, no_labels, 0.0)
    with pytest.raises(ValueError, match="needs labels"):
        LabelBCETerm(8, None)(student, None, no_labels, 0.0)
    with pytest.raises(ValueError, match="needs teacher Signals"):
        ListwiseKLTerm(8, 8)(student, None, batch, 0.0)


def test_listwise_kl_temperature_schedule():
    term = ListwiseKLTerm(8, 8, temperature={"kind": "linear", "start": 4.0, "end": 1.0})
    student, teacher, batch = _signals(0), _signals(1), _batch()
    s, t, m = student.scores, teacher.scores, batch["mask"]
    assert term(student, teacher, batch, 0.0).item() == pytest.approx(listwise_kl(s, t, m, temperature=4.0).item())
    assert term(student, teacher, batch, 1.0).item() == pytest.approx(listwise_kl(s, t, m, temperature=1.0).item())


def test_feature_term_masks_candidates_and_projects():
    student, teacher, batch = _signals(0, d=8, grad=True), _signals(1, d=16), _batch()
    term = RankFeatureTerm(8, 16)  # cosine through a learned projector
    assert term.needs_features
    value = term(student, teacher, batch, 0.0)
    proj = term.loss.projector(student.features["last_token"])
    cos = F.cosine_similarity(proj, teacher.features["last_token"], dim=-1)
    m = batch["mask"]
    assert value.item() == pytest.approx((1 - cos)[m].mean().item(), rel=1e-5)
    # padded candidates: garbage there changes nothing and gets no gradient
    feats = student.features["last_token"].detach().clone()
    feats[~m] = float("nan")
    feats.requires_grad_(True)
    value2 = term(Signals(scores=student.scores, features={"last_token": feats}), teacher, batch, 0.0)
    assert value2.item() == pytest.approx(value.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(value2, feats)
    assert torch.isfinite(grad).all() and (grad[~m] == 0).all()
    assert any(p.requires_grad for p in term.parameters())
    with pytest.raises(ValueError, match="needs feature 'pooled'"):
        RankFeatureTerm(8, 16, feature="pooled")(student, teacher, batch, 0.0)


def test_hybrid_response_feature_schedule_weights():
    recipe = {
        "listwise_kl": {"weight": 1.0, "schedule": {"kind": "linear", "start": 0.7, "end": 0.4}},
        "feature": {"weight": 1.0, "schedule": {"kind": "linear", "start": 0.3, "end": 0.6}},
    }
    loss = build_ranking_loss(recipe, 8, 16)
    assert isinstance(loss, CompositeLoss)
    assert loss.weights(0.0) == pytest.approx({"listwise_kl": 0.7, "feature": 0.3})
    assert loss.weights(1.0) == pytest.approx({"listwise_kl": 0.4, "feature": 0.6})
    assert loss.weights(0.5) == pytest.approx({"listwise_kl": 0.55, "feature": 0.45})
    # the projector is registered (optimizer sees it) and the total is the weighted sum
    assert len(list(loss.parameters())) > 0
    out = loss(_signals(0, d=8), _signals(1, d=16), _batch(), progress=1.0)
    assert out["loss"].item() == pytest.approx(0.4 * out["listwise_kl"].item() + 0.6 * out["feature"].item())


def test_build_ranking_loss_errors():
    with pytest.raises(ValueError, match="unknown ranking loss term 'listnet'; valid terms: pointwise, margin_mse"):
        build_ranking_loss({"listnet": {}}, 8, 8)
    with pytest.raises(ValueError, match="no loss terms"):
        build_ranking_loss({}, 8, 8)
    with pytest.raises(
        ValueError, match="'listwise_kl': unknown option.*'temp'.*valid options: weight, schedule, temperature, scale_t2"
    ):
        build_ranking_loss({"listwise_kl": {"temp": 2.0}}, 8, 8)
    with pytest.raises(ValueError, match="'pointwise': unknown option.*valid options: weight, schedule$"):
        build_ranking_loss({"pointwise": {"temperature": 2.0}}, 8, 8)
    for name in ("pointwise", "margin_mse", "listwise_kl", "feature"):
        with pytest.raises(ValueError, match=f"'{name}' needs a teacher.*without a teacher use: bce, ce"):
            build_ranking_loss({name: {}}, 8, None)
    plain = build_ranking_loss({"bce": {}, "ce": {"weight": 0.5}}, 8, None)  # plain training
    assert plain.weights(0.0) == {"bce": 1.0, "ce": 0.5}
    with pytest.raises(ValueError, match="weight must be a number"):
        build_ranking_loss({"ce": {"weight": "1"}}, 8, None)
    with pytest.raises(ValueError, match="'ce': bad schedule"):
        build_ranking_loss({"ce": {"schedule": {"kind": "step"}}}, 8, None)
    with pytest.raises(ValueError, match="temperature must stay > 0"):
        build_ranking_loss({"listwise_kl": {"temperature": {"kind": "linear", "start": 1.0, "end": 0.0}}}, 8, 8)
    with pytest.raises(ValueError, match="'feature': kind 'l1' is not one of mse, cosine"):
        build_ranking_loss({"feature": {"kind": "l1"}}, 8, 8)
    with pytest.raises(ValueError, match="pairs 'random' is not one of"):
        build_ranking_loss({"margin_mse": {"pairs": "random"}}, 8, 8)
    with pytest.raises(ValueError, match="max_label must be a number > 0"):
        build_ranking_loss({"bce": {"max_label": -1}}, 8, None)
    assert set(RANKING_TERMS) == {"pointwise", "margin_mse", "listwise_kl", "bce", "ce", "feature"}
