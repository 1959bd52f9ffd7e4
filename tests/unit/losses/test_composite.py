"""Composite loss: weights, schedules, registered parameters, Signals-reading terms, errors."""

import math

import pytest
import torch

from mmdistill.engine.schedules import make_schedule
from mmdistill.losses.composite import (
    CONTRASTIVE_TERMS,
    CompositeLoss,
    FeatureDistillTerm,
    LogitDistillTerm,
    LossTerm,
    build_contrastive_loss,
)
from mmdistill.losses.contrastive import clip_loss, crd_loss, fd_loss, similarity_kd
from mmdistill.losses.divergence import forward_kl, generalized_jsd, sparse_forward_kl
from mmdistill.signals import Signals


def _clip_signals(seed, dim, n=6, scale=20.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, dim, generator=g).requires_grad_(grad)
    txt = torch.randn(n, dim, generator=g).requires_grad_(grad)
    return Signals(image_embeds=img, text_embeds=txt, logit_scale=torch.tensor(scale))


def test_weights_and_schedules_are_applied():
    student = Signals(scores=torch.tensor([[2.0]]))
    loss = CompositeLoss(
        {
            "a": LossTerm(lambda s, t, b, p: s.scores.sum(), 0.5),
            "b": (lambda s, t, b, p: torch.tensor(3.0), 2.0, {"kind": "linear", "start": 0.0, "end": 1.0}),
        }
    )
    out = loss(student, None, {}, progress=0.0)
    assert set(out) == {"loss", "a", "b"}
    assert out["a"].item() == 2.0 and out["b"].item() == 3.0  # unweighted parts
    assert out["loss"].item() == pytest.approx(0.5 * 2.0)
    out = loss(student, None, {}, progress=0.25)
    assert out["loss"].item() == pytest.approx(0.5 * 2.0 + 2.0 * 0.25 * 3.0)
    assert loss.weights(1.0) == {"a": 0.5, "b": 2.0}


def test_bad_term_names():
    with pytest.raises(ValueError, match="loss"):
        CompositeLoss({"loss": LossTerm(lambda *a: torch.tensor(0.0))})
    with pytest.raises(ValueError, match="at least one"):
        CompositeLoss({})


def test_contrastive_terms_match_functions_and_register_projectors():
    student = _clip_signals(0, 8, grad=True)
    teacher = _clip_signals(1, 16, scale=50.0)
    loss = build_contrastive_loss(
        {
            "clip": {"weight": 1.0},
            "sim_kd": {"weight": 0.5},
            "crd": {"weight": 1.0},
            "fd": {"weight": 2000.0},
            "icl": {"weight": 1.0},
            "affinity": {"weight": 0.1, "temperature": 2.0},
        },
        student_dim=8,
        teacher_dim=16,
    )
    out = loss(student, teacher, {}, 0.5)
    args = (student.image_embeds, student.text_embeds, student.logit_scale)
    targs = (teacher.image_embeds, teacher.text_embeds, teacher.logit_scale)
    assert torch.allclose(out["clip"], clip_loss(*args))
    assert torch.allclose(out["sim_kd"], similarity_kd(*args, *targs))
    assert torch.allclose(out["crd"], crd_loss(*args, *targs))
    assert torch.allclose(out["affinity"], similarity_kd(*args, *targs, temperature=2.0))
    fd = loss.term_modules["fd"]
    assert torch.allclose(
        out["fd"],
        fd_loss(*args[:2], *targs[:2], image_projector=fd.image_projector, text_projector=fd.text_projector),
    )
    weights = {"clip": 1.0, "sim_kd": 0.5, "crd": 1.0, "fd": 2000.0, "icl": 1.0, "affinity": 0.1}
    assert torch.allclose(out["loss"], sum(w * out[n] for n, w in weights.items()))

    # projectors (fd, icl) and icl's learned scale are visible to the optimizer and receive gradients
    params = dict(loss.named_parameters())
    assert any(n.startswith("term_modules.fd.image_projector") for n in params)
    assert "term_modules.icl.log_scale" in params
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    out["loss"].backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in loss.named_parameters())
    assert student.image_embeds.grad is not None


def test_equal_widths_need_no_projector_and_clip_needs_no_teacher():
    loss = build_contrastive_loss({"fd": {"weight": 1.0}}, 8, 8)
    assert not list(loss.parameters())
    clip_only = build_contrastive_loss({"clip": {}}, 8, None)
    out = clip_only(_clip_signals(0, 8), None, {}, 0.0)
    assert out["loss"].item() == pytest.approx(out["clip"].item())


def test_temperature_schedule_is_evaluated_with_progress():
    student, teacher = _clip_signals(0, 8), _clip_signals(1, 8)
    temperature = {"kind": "linear", "start": 8, "end": 2}
    loss = build_contrastive_loss({"sim_kd": {"weight": 1.0, "temperature": temperature}}, 8, 8)
    args = (student.image_embeds, student.text_embeds, student.logit_scale)
    targs = (teacher.image_embeds, teacher.text_embeds, teacher.logit_scale)
    for progress, temp in [(0.0, 8.0), (0.5, 5.0), (1.0, 2.0)]:
        got = loss(student, teacher, {}, progress)["sim_kd"]
        assert torch.allclose(got, similarity_kd(*args, *targs, temperature=temp))


def test_weight_schedule_from_recipe():
    student, teacher = _clip_signals(0, 8), _clip_signals(1, 8)
    schedule = {"kind": "cosine", "start": 1.0, "end": 0.0}
    loss = build_contrastive_loss({"crd": {"weight": 4.0, "schedule": schedule}}, 8, 8)
    out = loss(student, teacher, {}, 0.5)
    assert out["loss"].item() == pytest.approx(4.0 * 0.5 * out["crd"].item(), rel=1e-6)
    assert loss(student, teacher, {}, 1.0)["loss"].item() == pytest.approx(0.0, abs=1e-9)


def test_recipe_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown contrastive loss term 'kd'.*clip, sim_kd, crd, fd, icl, affinity"):
        build_contrastive_loss({"kd": {"weight": 1.0}}, 8, 8)
    with pytest.raises(ValueError, match=r"'crd'.*'tau'.*temperature"):
        build_contrastive_loss({"crd": {"weight": 1.0, "tau": 2.0}}, 8, 8)
    with pytest.raises(ValueError, match=r"'fd'.*needs a teacher"):
        build_contrastive_loss({"fd": {"weight": 1.0}}, 8, None)
    with pytest.raises(ValueError, match=r"'clip'.*schedule"):
        build_contrastive_loss({"clip": {"weight": 1.0, "schedule": {"kind": "exp"}}}, 8, None)
    with pytest.raises(ValueError, match=r"'icl'.*scale"):
        build_contrastive_loss({"icl": {"scale": "fixed"}}, 8, 8)
    with pytest.raises(ValueError, match=r"'crd'.*temperature must stay > 0"):
        build_contrastive_loss({"crd": {"temperature": {"kind": "linear", "start": 2, "end": 0}}}, 8, 8)
    assert set(CONTRASTIVE_TERMS) == {"clip", "sim_kd", "crd", "fd", "icl", "affinity", "siglip"}


def test_missing_signals_give_clear_errors():
    loss = build_contrastive_loss({"crd": {}}, 8, 8)
    teacher = _clip_signals(1, 8)
    with pytest.raises(ValueError, match="logit_scale"):
        loss(Signals(image_embeds=torch.randn(6, 8), text_embeds=torch.randn(6, 8)), teacher, {}, 0.0)
    with pytest.raises(ValueError, match="teacher"):
        loss(_clip_signals(0, 8), None, {}, 0.0)


def test_logit_term_dense_sparse_and_num_items():
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(2, 4, 11, generator=g)
    t_logits = torch.randn(2, 4, 11, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    student = Signals(logits=s_logits, mask=mask)
    term = LogitDistillTerm("jsd", beta=0.3, temperature=2.0)
    got = term(student, Signals(logits=t_logits), {}, 0.0)
    assert torch.allclose(got, generalized_jsd(s_logits, t_logits, mask, beta=0.3, temperature=2.0))

    lp = t_logits.log_softmax(-1)
    vals, ids = lp.topk(3, dim=-1)
    sparse_teacher = Signals(topk_ids=ids, topk_logprobs=vals, tail_logmass=None)
    got = LogitDistillTerm("forward_kl")(student, sparse_teacher, {"num_items": 10}, 0.0)
    assert torch.allclose(got, sparse_forward_kl(s_logits, ids, vals, None, mask, num_items=10))
    dense = LogitDistillTerm("forward_kl")(student, Signals(logits=t_logits), {}, 0.0)
    assert torch.allclose(dense, forward_kl(s_logits, t_logits, mask))

    with pytest.raises(ValueError, match="unknown divergence"):
        LogitDistillTerm("kl")
    with pytest.raises(ValueError, match="alpha"):
        LogitDistillTerm("forward_kl", alpha=0.1)
    with pytest.raises(ValueError, match="logits"):
        LogitDistillTerm()(Signals(), Signals(logits=t_logits), {}, 0.0)


def test_feature_term_projects_and_masks():
    g = torch.Generator().manual_seed(0)
    s = Signals(features={"text": torch.randn(2, 3, 4, generator=g)}, mask=torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
    t = Signals(features={"text": torch.randn(2, 3, 6, generator=g)})
    term = FeatureDistillTerm("text", 4, 6, kind="cosine")
    loss = CompositeLoss({"feat": LossTerm(term, 1.0)})
    out = loss(s, t, {}, 0.0)
    assert math.isfinite(out["loss"].item()) and list(loss.parameters())
    with pytest.raises(ValueError, match="vision"):
        FeatureDistillTerm("vision", 4, 6)(s, t, {}, 0.0)


def test_make_schedule_objects_are_accepted_as_term_schedules():
    ramp_down = make_schedule({"kind": "linear", "start": 1, "end": 0})
    loss = CompositeLoss({"x": LossTerm(lambda *a: torch.tensor(1.0), 3.0, ramp_down)})
    assert loss(Signals(), None, {}, 1.0)["loss"].item() == 0.0
