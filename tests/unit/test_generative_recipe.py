"""Pieces of the generative recipe: the difficulty curriculum, the loss builder, the layer-map text term."""

import pytest
import torch

from mmdistill.config import RecipeError
from mmdistill.data.records import parse_record
from mmdistill.recipes.generative import Curriculum, LayerMapTextTerm, build_generative_loss
from mmdistill.signals import Signals


def _recs(tags):
    return [parse_record({"image": "a.png", "prompt": "q", "response": "a", **({"difficulty": t} if t else {})}, "chat") for t in tags]


def test_curriculum_adds_harder_records_as_training_progresses():
    cur = Curriculum(_recs(["easy", "hard", "medium", None, "easy"]), {"easy": 0.0, "medium": 0.3, "hard": 0.6})
    assert cur.eligible(0.0) == [0, 3, 4]
    assert cur.eligible(0.3) == [0, 2, 3, 4]
    assert cur.eligible(0.9) == [0, 1, 2, 3, 4]
    picked = cur.pick([0, 1, 2, 3, 4, 5], 0.0)
    assert set(picked) <= {0, 3, 4} and picked == cur.pick([0, 1, 2, 3, 4, 5], 0.0)  # deterministic
    assert Curriculum(_recs(["easy", "hard"]), None).pick([1, 0], 0.0) == [1, 0]  # no curriculum: unchanged


def test_curriculum_needs_every_tag_and_a_start():
    with pytest.raises(RecipeError, match="no start for difficulty tag"):
        Curriculum(_recs(["easy", "hard"]), {"easy": 0.0})
    cur = Curriculum(_recs(["hard"]), {"hard": 0.5})
    with pytest.raises(RecipeError, match="no record is eligible"):
        cur.pick([0], 0.1)


def test_build_generative_loss_validates_terms_and_options():
    dims = {"hidden": 8, "vision": 8}
    loss = build_generative_loss({"sft": {}, "kd": {"divergence": "jsd", "beta": 0.5, "temperature": {"kind": "linear", "start": 8, "end": 2}}}, student_dims=dims, teacher_dims={"hidden": 16, "vision": 16})
    assert set(loss.terms) == {"sft", "kd"}
    with pytest.raises(ValueError, match="unknown generative loss term 'nope'"):
        build_generative_loss({"nope": {}}, student_dims=dims, teacher_dims=dims)
    with pytest.raises(ValueError, match="'kd' needs a teacher"):
        build_generative_loss({"kd": {}}, student_dims=dims, teacher_dims=None)
    with pytest.raises(ValueError, match="loss term 'kd'"):
        build_generative_loss({"kd": {"divergence": "nope"}}, student_dims=dims, teacher_dims=dims)
    with pytest.raises(ValueError, match="loss term 'text'.*unknown option"):
        build_generative_loss({"text": {"layer": 3}}, student_dims=dims, teacher_dims=dims)


def test_layer_map_term_projects_each_pair_and_averages():
    term = LayerMapTextTerm(4, 6, layers=[[-2, -2], [0, 3]])
    s = Signals(mask=torch.tensor([[True, True, False]]), features={"text@-2": torch.randn(1, 3, 4), "text@0": torch.randn(1, 3, 4)})
    t = Signals(features={"text@-2": torch.randn(1, 3, 6), "text@3": torch.randn(1, 3, 6)})
    value = term(s, t, {}, 0.0)
    want = sum(loss(s.features[f"text@{a}"], t.features[f"text@{b}"], s.mask) for (a, b), loss in zip(term.layers, term.losses)) / 2
    assert torch.allclose(value, want)
    value.backward()
    assert all(p.grad is not None for p in term.parameters())  # the projectors train
    with pytest.raises(ValueError, match="pairs"):
        LayerMapTextTerm(4, 6, layers=[3])
