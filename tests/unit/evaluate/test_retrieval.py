"""Retrieval R@k and zero-shot accuracy, checked against torchmetrics and hand-built cases."""

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.retrieval import RetrievalHitRate, RetrievalRecall

from mmdistill.evaluate.retrieval import retrieval_metrics, zero_shot_accuracy, zero_shot_eval


def reference_recall(queries, candidates, k, positive=None, metric=RetrievalRecall):
    """torchmetrics recall: one retrieval query per row, target = is-true-match."""
    n = queries.shape[0]
    sims = F.normalize(queries, dim=-1) @ F.normalize(candidates, dim=-1).T  # [N, N]
    target = torch.eye(n, dtype=torch.bool) if positive is None else positive
    indexes = torch.arange(n).repeat_interleave(n)
    m = metric(top_k=k)
    return m(sims.flatten(), target.flatten(), indexes=indexes).item() * 100


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torchmetrics_on_random_embeddings(seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(64, 16, generator=g)
    texts = images + 1.5 * torch.randn(64, 16, generator=g)  # correlated, so recalls are not all 0 or 100
    ks = (1, 2, 5, 10)
    out = retrieval_metrics(images, texts, ks)
    for k in ks:
        assert out[f"i2t_R@{k}"] == pytest.approx(reference_recall(images, texts, k), abs=1e-4)
        assert out[f"t2i_R@{k}"] == pytest.approx(reference_recall(texts, images, k), abs=1e-4)
    assert 0 < out["i2t_R@1"] < 100
    assert out["mean_R@1"] == pytest.approx((out["i2t_R@1"] + out["t2i_R@1"]) / 2)
    six = [out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]
    assert out["mean_recall"] == pytest.approx(sum(six) / len(six))


def test_ids_match_torchmetrics_hit_rate():
    g = torch.Generator().manual_seed(3)
    image_ids = torch.arange(40) // 4  # 10 images, 4 captions each, stored as 40 pairs
    base = torch.randn(10, 8, generator=g)
    images = base[image_ids]
    texts = images + 1.0 * torch.randn(40, 8, generator=g)
    positive = image_ids[:, None] == image_ids[None, :]
    out = retrieval_metrics(images, texts, (1, 5), image_ids=image_ids)
    for k in (1, 5):
        assert out[f"i2t_R@{k}"] == pytest.approx(
            reference_recall(images, texts, k, positive, RetrievalHitRate), abs=1e-4
        )
        assert out[f"t2i_R@{k}"] == pytest.approx(
            reference_recall(texts, images, k, positive, RetrievalHitRate), abs=1e-4
        )


def test_blocks_do_not_change_the_result():
    g = torch.Generator().manual_seed(5)
    images, texts = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    assert retrieval_metrics(images, texts, block_size=7) == retrieval_metrics(images, texts)


def test_perfect_match_is_100():
    x = torch.randn(20, 8)
    out = retrieval_metrics(x, 3 * x)  # scale does not matter: cosine similarity
    assert all(v == pytest.approx(100.0) for v in out.values())


def test_true_match_ranked_last():
    n = 4
    images = torch.eye(n)
    texts = torch.ones(n, n) - torch.eye(n)  # text i is similar to every image but image i
    out = retrieval_metrics(images, texts, (1, 3, 4))
    assert out["i2t_R@1"] == out["t2i_R@1"] == 0.0
    assert out["i2t_R@3"] == out["t2i_R@3"] == 0.0
    assert out["i2t_R@4"] == out["t2i_R@4"] == 100.0
    assert out["mean_recall"] == pytest.approx(100 / 3)


def test_shifted_by_one():
    images = torch.eye(5)
    texts = images.roll(-1, dims=0)  # text i looks like image i+1: every true match ranks second
    out = retrieval_metrics(images, texts, (1, 2))
    assert out["i2t_R@1"] == out["t2i_R@1"] == out["mean_R@1"] == 0.0
    assert out["i2t_R@2"] == out["t2i_R@2"] == 100.0


def test_ties_resolve_in_favour_of_the_query():
    out = retrieval_metrics(torch.ones(6, 4), torch.ones(6, 4), (1,))
    assert out["i2t_R@1"] == out["t2i_R@1"] == 100.0


def test_duplicate_images_count_with_image_ids():
    # rows 0-1 are image A, rows 2-3 image B; caption 1 fits A better than caption 0 does
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    images = torch.stack([a, a, b, b])
    texts = torch.stack([a + torch.tensor([0, 0, 1.0]), a, b, b + torch.tensor([0, 0, 1.0])])
    plain = retrieval_metrics(images, texts, (1,))
    assert plain["i2t_R@1"] == 50.0  # row 0 retrieves caption 1, row 3 caption 2: counted wrong
    grouped = retrieval_metrics(images, texts, (1,), image_ids=["A", "A", "B", "B"])
    assert grouped["i2t_R@1"] == 100.0
    assert grouped["t2i_R@1"] == 100.0


def test_duplicate_captions_count_with_text_ids():
    # two different dog pictures both captioned "a dog"; the caption fits image 1 better
    images = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert retrieval_metrics(images, texts, (1,))["t2i_R@1"] == pytest.approx(200 / 3)
    assert retrieval_metrics(images, texts, (1,), text_ids=["a dog", "a dog", "a cat"])["t2i_R@1"] == 100.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="image_ids has 2 entries"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), image_ids=[0, 1])
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), (0,))


def test_zero_shot_accuracy():
    classes = torch.eye(3)
    images = torch.tensor([[2.0, 0.1, 0], [0, 1, 0.2], [0.1, 0, 3], [1, 0, 0]])
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 1, 2, 0])) == 100.0
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 1, 2, 1])) == 75.0
    with pytest.raises(ValueError, match="class indices"):
        zero_shot_accuracy(images, classes, torch.tensor([0, 1, 2, 3]))


def test_zero_shot_eval_task():
    vectors = {"cat": torch.tensor([1.0, 0.0]), "dog": torch.tensor([0.0, 1.0])}
    task = {
        "classes": ["cat", "dog"],
        "template": "a photo of a {label}.",
        "items": [
            {"image": vectors["cat"], "label": "cat"},
            {"image": vectors["dog"], "label": "dog"},
            {"image": vectors["dog"], "label": "cat"},  # wrong
            {"image": vectors["cat"] + 0.1, "label": 0},  # label by index
        ],
    }
    prompts_seen = []

    def encode_texts(prompts):
        prompts_seen.extend(prompts)
        return torch.stack([vectors[p.split()[-1].rstrip(".")] for p in prompts])

    def encode_images(items):
        assert len(items) <= 3
        return torch.stack([item["image"] for item in items])

    out = zero_shot_eval(task, encode_images, encode_texts, batch_size=3)
    assert prompts_seen == ["a photo of a cat.", "a photo of a dog."]
    assert out["accuracy"] == 75.0
    assert out["per_class"] == {"cat": pytest.approx(200 / 3), "dog": 100.0}
    assert out["n"] == 4


def test_zero_shot_eval_bad_label():
    task = {"classes": ["cat"], "template": "{label}", "items": [{"label": "cow"}]}
    with pytest.raises(ValueError, match="item 0: label 'cow'"):
        zero_shot_eval(task, lambda items: torch.ones(len(items), 2), lambda texts: torch.ones(len(texts), 2))


# ----------------------------------------------------------------------------- distinct images / captions

from mmdistill.evaluate.retrieval import distinct_retrieval_metrics  # noqa: E402


def test_distinct_many_to_one_gallery_by_hand():
    # four digit scans, two captions: i0, i1 are "seven"; i2, i3 are "one". i1 looks like a one.
    e1, e2, e3 = torch.eye(3)
    images = torch.stack([e1, e2, e2 + 0.2 * e3, e2 + 0.3 * e3])
    texts = torch.stack([e1, e1, e2, e2])  # row i: the caption of image i ("seven", "seven", "one", "one")
    out = distinct_retrieval_metrics(images, texts, ["i0", "i1", "i2", "i3"], ["seven", "seven", "one", "one"], ks=(1, 2))
    # image→text over the 2 distinct captions: i0 -> seven (right), i1 -> one (wrong), i2, i3 -> one (right)
    assert out["i2t_R@1"] == pytest.approx(75.0)
    assert out["i2t_R@2"] == pytest.approx(100.0)
    # text→image, each caption once: "seven" ranks i0 first (right); "one" ranks i1 (a seven) first, i2 second
    assert out["t2i_R@1"] == pytest.approx(50.0)
    assert out["t2i_R@2"] == pytest.approx(100.0)
    assert out["mean_R@1"] == pytest.approx(62.5)
    # the pair-level reading ranks every copy of a caption: both copies of "one" sit above "seven" for i1
    assert retrieval_metrics(images, texts, (2,), text_ids=["seven", "seven", "one", "one"])["i2t_R@2"] == pytest.approx(75.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_distinct_matches_torchmetrics_hit_rate(seed):
    g = torch.Generator().manual_seed(seed)
    n_images, n_captions = 30, 6
    caption_of = torch.randint(0, n_captions, (n_images,), generator=g)
    caption_of[:n_captions] = torch.arange(n_captions)  # every caption used
    cap_emb = torch.randn(n_captions, 8, generator=g)
    img_emb = cap_emb[caption_of] + 1.2 * torch.randn(n_images, 8, generator=g)
    # pairs: every image with its caption, and image 0 listed twice (the same file in two rows)
    rows_img = torch.cat([torch.arange(n_images), torch.tensor([0])])
    rows_cap = caption_of[rows_img]
    out = distinct_retrieval_metrics(img_emb[rows_img], cap_emb[rows_cap], rows_img.tolist(), [f"c{c}" for c in rows_cap.tolist()], ks=(1, 3))
    relevant = caption_of[:, None] == torch.arange(n_captions)[None, :]  # [I, T]
    for k in (1, 3):
        for q, c, rel in ((img_emb, cap_emb, relevant), (cap_emb, img_emb, relevant.T)):
            sims = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T
            indexes = torch.arange(q.shape[0]).repeat_interleave(c.shape[0])
            ref = RetrievalHitRate(top_k=k)(sims.flatten(), rel.flatten(), indexes=indexes).item() * 100
            key = ("i2t" if q is img_emb else "t2i") + f"_R@{k}"
            assert out[key] == pytest.approx(ref, abs=1e-4)


def test_distinct_without_repeats_equals_pair_level():
    g = torch.Generator().manual_seed(7)
    images = torch.randn(40, 8, generator=g)
    texts = images + torch.randn(40, 8, generator=g)
    out = distinct_retrieval_metrics(images, texts, list(range(40)), [f"t{i}" for i in range(40)])
    assert out == pytest.approx(retrieval_metrics(images, texts))


def test_distinct_bad_ids():
    with pytest.raises(ValueError, match="text_ids has 2 entries"):
        distinct_retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), [0, 1, 2], ["a", "b"])


def test_headline_follows_the_gallery():
    from mmdistill.evaluate.contrastive import headline_metric

    assert headline_metric(1000, 990, {"mean_R@1": 50.0})["metric"] == "mean_R@1"
    digits = headline_metric(1400, 10, {"i2t_R@1": 80.0})
    assert digits["metric"] == "i2t_R@1" and "10 distinct over 1400" in digits["why"]
    assert headline_metric(1400, 10, {"i2t_R@1": 80.0, "zeroshot_mean": 70.0})["metric"] == "zeroshot_mean"
