"""Comparer (the UI's Compare tab without a browser): dual encoders and rerankers through the serve backends."""

import numpy as np
import pytest
from PIL import Image

from mmdistill.models import contrastive as cm
from mmdistill.models import reranker as rm
from mmdistill.serve.backends import load_backend
from mmdistill.ui.compare import Comparer
from mmdistill.ui.runs import UIError

TEXTS = [f"a {c} {k} at the {p}" for c in ("red", "blue") for k in ("circle", "square") for p in ("top", "left")] + [rm.SYSTEM_PROMPT]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    cm.build_tiny_clip(d / "clip-t", TEXTS, preset="clip-nano", image_size=32, patch_size=8, seed=1)
    cm.build_tiny_clip(d / "clip-s", TEXTS, preset="clip-nano", image_size=32, patch_size=8, seed=2)
    rm.build_tiny_reranker(d / "rr", TEXTS, kind="seq_cls", preset="vlm-nano")
    return d


def test_dual_encoder_similarities_are_the_backends_cosines(folders):
    c = Comparer(folders / "clip-s", folders / "clip-t", threads=1)
    assert c.family == "contrastive" and [label for label, _ in c.sides] == ["teacher (clip-t)", "student (clip-s)"]
    img = Image.new("RGB", (40, 40), (200, 20, 20))
    texts = ["a red circle at the top", "a blue square at the left"]
    res = c.similarities(texts + ["  "], img)  # blank lines are dropped
    for r, folder in zip(res, ["clip-t", "clip-s"]):
        b = load_backend(folders / folder)
        want = np.asarray(b.embed_texts(texts)) @ np.asarray(b.embed_images([img])[0])
        assert r["texts"] == texts and np.allclose(r["similarities"], want, atol=1e-5) and r["ms"] > 0
    assert not np.allclose(res[0]["similarities"], res[1]["similarities"])
    no_image = c.similarities(["a red circle", "a red circle", "a blue square"])  # the first text against the others
    assert no_image[0]["texts"] == ["a red circle", "a blue square"] and no_image[0]["similarities"][0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UIError, match="at least two texts"):
        c.similarities(["one"])


def test_bad_input_and_mixed_families(folders):
    with pytest.raises(UIError, match="--teacher: .* is a contrastive model and .* a reranker model"):
        Comparer(folders / "rr", folders / "clip-t")
    c = Comparer(folders / "rr")
    c.warmup()
    with pytest.raises(UIError, match="documents: give at least one"):
        c.rerank("a red circle", ["", "  "])
    with pytest.raises(UIError, match="query"):
        c.rerank(" ", ["a"])
    with pytest.raises(UIError, match="image: .* reads text only"):  # a seq-cls reranker has no vision tower
        c.rerank("a", ["b"], Image.new("RGB", (32, 32)))
    with pytest.raises(UIError, match="documents line 1: the pair is .* tokens"):
        c.rerank("a", ["red " * 2000])
    r = c.rerank("a red circle", ["a red circle at the top", "a blue square"])[0]
    assert sorted(r["ranks"]) == [1, 2] and r["ranks"][int(np.argmax(r["scores"]))] == 1
