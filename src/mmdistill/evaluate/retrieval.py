"""Retrieval and zero-shot metrics for contrastive (CLIP-style) dual encoders.

Recall@k follows open_clip: for every query, the rank of its true match is the number of
candidates ranked above it; R@k is the mean over queries of ``[rank < k]``, in percent.
Both directions are reported: image→text (``i2t``, images are the queries) and
text→image (``t2i``).

Ties: a candidate counts as ranked above the true match only when its score is *strictly
greater*. Candidates that tie with the true match do not push it down, so ties are
resolved in the query's favour (the optimistic convention; an arbitrary sort, as in
torchmetrics, breaks ties by position instead). With real float embeddings ties are rare;
with identical embeddings every query scores 100.

Similarities are computed in blocks of query rows, so memory stays at
``block_size × N`` floats (plus the embeddings); no ``N × N × D`` tensor is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["distinct_retrieval_metrics", "retrieval_metrics", "zero_shot_accuracy", "zero_shot_eval"]


def _check_embeds(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor [N, D], got {shape}")


def _as_ids(name: str, ids: Sequence[Any] | Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """Map arbitrary hashable ids (ints, strings, ...) to a LongTensor [n] of group numbers."""
    if ids is None:
        return None
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if len(ids) != n:
        raise ValueError(f"{name} has {len(ids)} entries, expected one per row ({n})")
    groups: dict[Any, int] = {}
    return torch.tensor([groups.setdefault(i, len(groups)) for i in ids], dtype=torch.long, device=device)


def _ranks(
    queries: Tensor,
    candidates: Tensor,
    image_ids: Tensor | None,
    text_ids: Tensor | None,
    block_size: int,
) -> Tensor:
    """Rank of the best true match for every query.

    queries, candidates: [N, D], L2-normalised; row i of one is the true match of row i of
    the other. Returns a LongTensor [N]: the number of candidates whose score is strictly
    greater than the best-scoring true match.
    """
    n = queries.shape[0]
    ranks = torch.empty(n, dtype=torch.long, device=queries.device)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        sims = queries[start:stop] @ candidates.T  # [b, N]
        rows = torch.arange(start, stop, device=queries.device)
        if image_ids is None and text_ids is None:
            best_true = sims[rows - start, rows]  # [b]
        else:
            # [b, N]: candidate j is a true match of query i when pair j shares pair i's image or caption
            positive = torch.zeros_like(sims, dtype=torch.bool)
            if image_ids is not None:
                positive |= image_ids[start:stop, None] == image_ids[None, :]
            if text_ids is not None:
                positive |= text_ids[start:stop, None] == text_ids[None, :]
            best_true = sims.masked_fill(~positive, float("-inf")).amax(dim=1)  # [b]
        ranks[start:stop] = (sims > best_true[:, None]).sum(dim=1)
    return ranks


def retrieval_metrics(
    image_embeds: Tensor,
    text_embeds: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    image_ids: Sequence[Any] | Tensor | None = None,
    text_ids: Sequence[Any] | Tensor | None = None,
    block_size: int = 1024,
) -> dict[str, float]:
    """Image↔text Recall@k in percent (0–100), open_clip style.

    Args:
        image_embeds: [N, D] image embeddings (any scale; L2-normalised here).
        text_embeds: [N, D] text embeddings; row i is the caption of image row i.
        ks: the cut-offs k.
        image_ids: optional, one id per row naming the image of that pair. Rows with the
            same id are the same image (e.g. COCO's five captions per image, each stored
            as its own pair).
        text_ids: optional, one id per row naming the caption; rows with the same id are
            identical caption strings.
        block_size: query rows per similarity block (memory is ``block_size × N`` floats).

    By default pair i is the only true match of pair i. With ids, pair j also counts as a
    true match of pair i when ``image_ids[j] == image_ids[i]`` or ``text_ids[j] ==
    text_ids[i]``, and a query is correct at k when *any* true match ranks below k (a hit
    rate, as in open_clip's multi-caption evaluation). Every row stays its own query.

    Ties are resolved in the query's favour: only strictly greater scores rank above the
    true match (see the module docstring).

    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ... for k in ks, "mean_R@1": mean of i2t and t2i
        R@1 (always computed, even when 1 is not in ks), "mean_recall": mean of all the
        i2t_R@k and t2i_R@k values}``.
    """
    _check_embeds("image_embeds", image_embeds)
    _check_embeds("text_embeds", text_embeds)
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} "
            "must have the same shape [N, D] (row i of each is a matching pair)"
        )
    n = image_embeds.shape[0]
    if n == 0:
        raise ValueError("retrieval_metrics needs at least one image-text pair")
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    images = F.normalize(image_embeds.detach().float(), dim=-1)
    texts = F.normalize(text_embeds.detach().float(), dim=-1)
    img_ids = _as_ids("image_ids", image_ids, n, images.device)
    txt_ids = _as_ids("text_ids", text_ids, n, images.device)

    ranks = {
        "i2t": _ranks(images, texts, img_ids, txt_ids, block_size),
        "t2i": _ranks(texts, images, img_ids, txt_ids, block_size),
    }

    def recall(direction: str, k: int) -> float:
        return (ranks[direction] < k).float().mean().item() * 100.0

    out: dict[str, float] = {}
    for direction in ("i2t", "t2i"):
        for k in ks:
            out[f"{direction}_R@{k}"] = recall(direction, k)
    out["mean_R@1"] = (recall("i2t", 1) + recall("t2i", 1)) / 2
    recalls = [v for key, v in out.items() if key[:4] in ("i2t_", "t2i_")]
    out["mean_recall"] = sum(recalls) / len(recalls)
    return out


def _unique_rows(ids: Sequence[Any]) -> tuple[list[int], list[int]]:
    """(first row of each distinct id in order of appearance, group number of every row)."""
    groups: dict[Any, int] = {}
    first: list[int] = []
    of_row = []
    for row, key in enumerate(ids):
        if key not in groups:
            groups[key] = len(first)
            first.append(row)
        of_row.append(groups[key])
    return first, of_row


def _hit_ranks(queries: Tensor, candidates: Tensor, relevant: Tensor, block_size: int) -> Tensor:
    """Rank of the best relevant candidate for every query: the number of candidates scoring strictly higher.

    queries [Q, D], candidates [C, D] (L2-normalised), relevant [Q, C] bool (every row has a True)."""
    ranks = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for start in range(0, queries.shape[0], block_size):
        sims = queries[start : start + block_size] @ candidates.T  # [b, C]
        best = sims.masked_fill(~relevant[start : start + block_size], float("-inf")).amax(dim=1)  # [b]
        ranks[start : start + block_size] = (sims > best[:, None]).sum(dim=1)
    return ranks


def distinct_retrieval_metrics(
    image_embeds: Tensor,
    text_embeds: Tensor,
    image_ids: Sequence[Any],
    text_ids: Sequence[Any],
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_size: int = 1024,
) -> dict[str, float]:
    """Image↔text Recall@k (percent) over *distinct* images and *distinct* captions.

    Pair row i says that image ``image_ids[i]`` has caption ``text_ids[i]``. Images and captions
    are deduplicated (the first row of each id gives its embedding), so a caption shared by many
    pairs is one candidate and one query, not many copies:

    - image→text: each distinct image is queried once against the distinct captions; its relevant
      set is every caption it is paired with; correct at k when any of them ranks below k.
    - text→image: each distinct caption is queried once against the distinct images; its relevant
      set is every image paired with it (all images captioned "a handwritten digit seven").

    With no repeated image or caption this equals ``retrieval_metrics`` without ids. Ties resolve
    in the query's favour, as there. Returns the ``retrieval_metrics`` keys.
    """
    _check_embeds("image_embeds", image_embeds)
    _check_embeds("text_embeds", text_embeds)
    n = image_embeds.shape[0]
    if text_embeds.shape != image_embeds.shape:
        raise ValueError(f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must have the same shape [N, D]")
    for name, ids in (("image_ids", image_ids), ("text_ids", text_ids)):
        if len(ids) != n:
            raise ValueError(f"{name} has {len(ids)} entries, expected one per row ({n})")
    if n == 0:
        raise ValueError("distinct_retrieval_metrics needs at least one image-text pair")
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    ids_i = image_ids.tolist() if isinstance(image_ids, Tensor) else list(image_ids)
    ids_t = text_ids.tolist() if isinstance(text_ids, Tensor) else list(text_ids)
    first_i, img_of = _unique_rows(ids_i)
    first_t, txt_of = _unique_rows(ids_t)
    images = F.normalize(image_embeds.detach().float()[first_i], dim=-1)  # [I, D]
    texts = F.normalize(text_embeds.detach().float()[first_t], dim=-1)  # [T, D]
    relevant = torch.zeros(len(first_i), len(first_t), dtype=torch.bool, device=images.device)  # [I, T]
    relevant[torch.tensor(img_of), torch.tensor(txt_of)] = True
    ranks = {
        "i2t": _hit_ranks(images, texts, relevant, block_size),
        "t2i": _hit_ranks(texts, images, relevant.T.contiguous(), block_size),
    }
    out: dict[str, float] = {}
    for direction in ("i2t", "t2i"):
        for k in ks:
            out[f"{direction}_R@{k}"] = (ranks[direction] < k).float().mean().item() * 100.0
    r1 = {d: (ranks[d] < 1).float().mean().item() * 100.0 for d in ranks}
    out["mean_R@1"] = (r1["i2t"] + r1["t2i"]) / 2
    recalls = [v for key, v in out.items() if key[:4] in ("i2t_", "t2i_")]
    out["mean_recall"] = sum(recalls) / len(recalls)
    return out


def zero_shot_accuracy(image_embeds: Tensor, class_text_embeds: Tensor, labels: Tensor) -> float:
    """Top-1 zero-shot classification accuracy in percent.

    Args:
        image_embeds: [N, D] image embeddings.
        class_text_embeds: [C, D] one text embedding per class (e.g. of "a photo of a {label}").
        labels: LongTensor [N], the true class index of each image.

    Each image is assigned the class with the highest cosine similarity (on an exact tie,
    the lowest class index, as ``argmax`` does).
    """
    return _zero_shot_predictions(image_embeds, class_text_embeds, labels).float().mean().item() * 100.0


def _zero_shot_predictions(image_embeds: Tensor, class_text_embeds: Tensor, labels: Tensor) -> Tensor:
    """BoolTensor [N]: whether each image's predicted class equals its label."""
    _check_embeds("image_embeds", image_embeds)
    _check_embeds("class_text_embeds", class_text_embeds)
    n, c = image_embeds.shape[0], class_text_embeds.shape[0]
    if image_embeds.shape[1] != class_text_embeds.shape[1]:
        raise ValueError(
            f"image_embeds width {image_embeds.shape[1]} != class_text_embeds width {class_text_embeds.shape[1]}"
        )
    if n == 0 or c == 0:
        raise ValueError(f"zero-shot accuracy needs at least one image and one class, got {n} images, {c} classes")
    labels = torch.as_tensor(labels, device=image_embeds.device).long()
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must be class indices in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    images = F.normalize(image_embeds.detach().float(), dim=-1)
    classes = F.normalize(class_text_embeds.detach().float().to(images.device), dim=-1)
    predictions = (images @ classes.T).argmax(dim=1)  # [N]
    return predictions == labels


def zero_shot_eval(
    task: dict[str, Any],
    encode_images: Callable[[list[Any]], Tensor],
    encode_texts: Callable[[list[str]], Tensor],
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Run a zero-shot classification task end to end.

    Args:
        task: ``{"classes": [name, ...], "template": "a photo of a {label}.", "items":
            [item, ...]}``. ``template`` may also be a list of templates; their
            normalised text embeddings are averaged per class (CLIP's prompt ensembling).
            Each item is a dict with a ``"label"`` (a class name from ``classes`` or its
            index) plus whatever ``encode_images`` needs (e.g. ``"image"``).
        encode_images: maps a list of items (at most ``batch_size``) to a Tensor [n, D].
        encode_texts: maps a list of strings (at most ``batch_size``) to a Tensor [n, D].
        batch_size: items or prompts per encoder call.

    Returns:
        ``{"accuracy": percent, "per_class": {class name: percent}, "n": item count}``;
        ``per_class`` lists only classes that have at least one item.
    """
    for key in ("classes", "template", "items"):
        if key not in task:
            raise ValueError(f"zero-shot task is missing {key!r} (expected keys: classes, template, items)")
    classes = [str(c) for c in task["classes"]]
    templates = [task["template"]] if isinstance(task["template"], str) else list(task["template"])
    items = list(task["items"])
    if not classes or not templates or not items:
        raise ValueError("zero-shot task needs at least one class, one template and one item")
    if len(set(classes)) != len(classes):
        raise ValueError("zero-shot task has duplicate class names")
    for t in templates:
        if "{label}" not in t:
            raise ValueError(f"zero-shot template {t!r} has no '{{label}}' placeholder")

    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for position, item in enumerate(items):
        label = item.get("label") if isinstance(item, dict) else None
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(classes):
            labels.append(label)
        elif isinstance(label, str) and label in index:
            labels.append(index[label])
        else:
            raise ValueError(f"zero-shot item {position}: label {label!r} is not one of the task's classes or indices")

    prompts = [t.format(label=name) for name in classes for t in templates]
    text_embeds = torch.cat(
        [encode_texts(prompts[i : i + batch_size]).float() for i in range(0, len(prompts), batch_size)]
    )  # [C * T, D]
    # [C, D]: per class, the mean of its normalised template embeddings
    class_embeds = F.normalize(text_embeds, dim=-1).view(len(classes), len(templates), -1).mean(dim=1)
    image_embeds = torch.cat(
        [encode_images(items[i : i + batch_size]).float() for i in range(0, len(items), batch_size)]
    )  # [N, D]
    labels_t = torch.tensor(labels, dtype=torch.long, device=image_embeds.device)
    correct = _zero_shot_predictions(image_embeds, class_embeds.to(image_embeds.device), labels_t)

    per_class = {
        name: correct[labels_t == c].float().mean().item() * 100.0
        for c, name in enumerate(classes)
        if (labels_t == c).any()
    }
    return {"accuracy": correct.float().mean().item() * 100.0, "per_class": per_class, "n": len(items)}
