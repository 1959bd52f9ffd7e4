"""Evaluate a dual encoder folder: retrieval R@k both ways, zero-shot accuracy, size, latency -> eval.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..models import contrastive as cm
from .bench import count_parameters, measure_latency, size_on_disk
from .retrieval import distinct_retrieval_metrics, zero_shot_accuracy


@torch.no_grad()
def embed_pairs(model, processor, images: list, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings [N, D] in batches."""
    img, txt = [], []
    for i in range(0, len(texts), batch_size):
        pv = cm.preprocess_images(processor, images[i : i + batch_size])
        img.append(cm.encode_images(model, pv))
        t = cm.preprocess_texts(processor, texts[i : i + batch_size])
        txt.append(cm.encode_texts(model, t["input_ids"], t["attention_mask"]))
    return torch.cat(img), torch.cat(txt)


@torch.no_grad()
def zero_shot(model, processor, zeroshot_path: Path, max_items: int | None = None) -> dict[str, float]:
    """Accuracy (percent) for each task of a zeroshot_<split>.json, plus their mean."""
    from ..data.images import load_image

    spec = json.loads(Path(zeroshot_path).read_text())
    base = Path(zeroshot_path).parent
    out: dict[str, float] = {}
    for task, t in spec["tasks"].items():
        items = t["items"][:max_items] if max_items else t["items"]
        if not items:
            continue
        classes = t["classes"]
        # prompt ensemble when the task lists several templates: mean of the normalised prompt embeddings
        templates = t.get("templates") or [t["template"]]
        prompts = [tpl.format(label=c) for c in classes for tpl in templates]
        enc = cm.preprocess_texts(processor, prompts)
        emb = torch.nn.functional.normalize(cm.encode_texts(model, enc["input_ids"], enc["attention_mask"]), dim=-1)
        class_emb = emb.view(len(classes), len(templates), -1).mean(1)  # [C, D]
        images = [load_image(it["image"], base) for it in items]
        img_emb = torch.cat([cm.encode_images(model, cm.preprocess_images(processor, images[i : i + 256])) for i in range(0, len(images), 256)])
        labels = torch.tensor([classes.index(it["label"]) for it in items])
        out[f"zeroshot_{task}"] = float(zero_shot_accuracy(img_emb, class_emb, labels))
    if out:
        out["zeroshot_mean"] = sum(out.values()) / len(out)
    return out


def latency_ms(model, processor, images: list, texts: list[str], batch_sizes=(1, 32)) -> dict[str, float]:
    """Median ms to embed a batch of image + text pairs (preprocessed tensors; model time only)."""
    out = {}
    for bs in batch_sizes:
        n = min(bs, len(texts))
        pv = cm.preprocess_images(processor, images[:n])
        t = cm.preprocess_texts(processor, texts[:n])

        def fn():
            with torch.inference_mode():
                cm.encode_images(model, pv)
                cm.encode_texts(model, t["input_ids"], t["attention_mask"])

        out[f"bs{bs}"] = measure_latency(fn, warmup=3, repeats=15 if bs > 1 else 30)["median_ms"]
    return out


REPEATED = 0.5  # fewer distinct captions than this share of distinct images: the captions are class names


def headline_metric(n_images: int, n_captions: int, metrics: dict[str, float]) -> dict[str, str]:
    """The metric a dual encoder is judged by on this gallery, and why: {"metric": key, "why": sentence}.

    Distinct captions (nearly) one per image: mean R@1 of both directions. Captions repeated over many
    images (class-name captions such as "a handwritten digit seven"): text→image ranks a handful of
    captions that each have many right images, so its R@1 is near 100 for any model; the headline is
    zero-shot accuracy when a zero-shot task was evaluated, else image→text R@1 (an n-way
    classification of each image among the distinct captions)."""
    if n_captions >= REPEATED * n_images:
        return {"metric": "mean_R@1", "why": f"mean of image→text and text→image R@1 over {n_images} distinct images and {n_captions} distinct captions"}
    repeated = f"captions repeat ({n_captions} distinct over {n_images} images), so text→image R@k says little"
    if "zeroshot_mean" in metrics:
        return {"metric": "zeroshot_mean", "why": f"{repeated}; zero-shot accuracy over the labels is the measure"}
    return {"metric": "i2t_R@1", "why": f"{repeated}; image→text R@1 is a {n_captions}-way classification of each image among the distinct captions"}


def evaluate_folder(
    model_dir: str | Path,
    val_path: str | Path,
    *,
    zeroshot: str | Path | None = None,
    out_path: str | Path | None = None,
    name: str | None = None,
    role: str = "student",
    max_items: int | None = 1000,
    ks=(1, 5, 10),
    latency: bool = True,
    on_error: str = "fail",
) -> dict[str, Any]:
    """Evaluate a saved dual encoder on a pair file (the first `max_items` pairs are the gallery)."""
    from ..data.loaders import load_pairs

    model, processor = cm.load_model(str(model_dir))
    model.eval()
    records, images, _ = load_pairs(Path(val_path), on_error, max_items, log=lambda *_: None)
    texts = [r.text for r in records]
    img_emb, txt_emb = embed_pairs(model, processor, images, texts)
    # identical captions (after case and space folding) are one caption, one image file is one image:
    # R@k runs over distinct images and distinct captions (COCO lists one image with five captions; a
    # digits set has 10 captions over 1,400 images)
    image_ids = [r.image for r in records]
    text_ids = [" ".join(t.lower().split()) for t in texts]
    metrics = distinct_retrieval_metrics(img_emb, txt_emb, image_ids, text_ids, ks=tuple(ks))
    if zeroshot:
        metrics.update(zero_shot(model, processor, Path(zeroshot)))
    result: dict[str, Any] = {
        "name": name or Path(model_dir).parent.name,
        "role": role,
        "family": "contrastive",
        "model_dir": str(model_dir),
        "gallery": len(texts),
        "distinct": {"images": len(set(image_ids)), "captions": len(set(text_ids))},
        "metrics": metrics,
        "headline": headline_metric(len(set(image_ids)), len(set(text_ids)), metrics),
        "params": count_parameters(model),
        "size_bytes": size_on_disk(model_dir),
        "latency_ms": latency_ms(model, processor, images, texts) if latency else {},
    }
    if out_path is not None:
        Path(out_path).write_text(json.dumps(result, indent=2))
    return result
