"""Evaluate a dual encoder folder: retrieval R@k both ways, zero-shot accuracy, size, latency -> eval.json."""

from __future__ import annotations

import difflib
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


DEFAULT_TEMPLATE = "a photo of a {label}."


def read_labels(path: str | Path) -> list[str]:
    """Class names, one per line, in file order. An empty line, a repeated name or an empty file is a
    RecordError naming the file and line."""
    from ..data.records import RecordError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():  # a trailing newline (or several) at the end of the file is fine
        lines.pop()
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        label = raw.strip()
        if not label:
            raise RecordError(str(path), lineno, "label", "empty line: one class name per line, no blank lines")
        if label in seen:
            raise RecordError(str(path), lineno, "label", f"{label!r} repeats line {seen[label]}: each class name once")
        seen[label] = lineno
    if not seen:
        raise RecordError(str(path), 0, "file", "no labels (the file is empty)")
    return list(seen)


def record_labels(records, labels: list[str], path: str | Path) -> list[int]:
    """The class index of each record from its ``meta.label``; a missing label or one not in `labels` is a
    RecordError naming the record's line."""
    from ..data.records import RecordError

    index = {label: i for i, label in enumerate(labels)}
    out = []
    for rec in records:
        label = (rec.meta or {}).get("label")
        if label is None:
            raise RecordError(str(path), rec.line, "meta.label", "missing: zero-shot evaluation needs each record's class name in meta.label")
        if str(label) not in index:
            close = difflib.get_close_matches(str(label), labels, n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise RecordError(str(path), rec.line, "meta.label", f"{label!r} is not in the labels file{hint}")
        out.append(index[str(label)])
    return out


@torch.no_grad()
def zero_shot_labels(model, processor, images: list, targets: list[int], labels: list[str], templates: list[str], batch_size: int = 256) -> tuple[dict[str, float], list[list[int]]]:
    """Top-1 / top-5 zero-shot accuracy (percent) of the images over the class names, and the confusion
    matrix [true][predicted]. Each class is the mean of its normalised prompt embeddings (one per template)."""
    prompts = [tpl.format(label=c) for c in labels for tpl in templates]
    embs = []
    for i in range(0, len(prompts), batch_size):
        enc = cm.preprocess_texts(processor, prompts[i : i + batch_size])
        embs.append(cm.encode_texts(model, enc["input_ids"], enc["attention_mask"]))
    emb = torch.nn.functional.normalize(torch.cat(embs), dim=-1)
    class_emb = emb.view(len(labels), len(templates), -1).mean(1)  # [C, D]
    img_emb = torch.cat([cm.encode_images(model, cm.preprocess_images(processor, images[i : i + batch_size])) for i in range(0, len(images), batch_size)])
    y = torch.tensor(targets)
    sims = torch.nn.functional.normalize(img_emb.float(), dim=-1) @ torch.nn.functional.normalize(class_emb.float(), dim=-1).T  # [N, C]
    top = sims.topk(min(5, len(labels)), dim=-1).indices  # [N, k]
    confusion = torch.zeros(len(labels), len(labels), dtype=torch.long)
    confusion.index_put_((y, top[:, 0]), torch.ones_like(y), accumulate=True)
    metrics = {
        "zeroshot_top1": float(zero_shot_accuracy(img_emb, class_emb, y)),
        "zeroshot_top5": float((top == y[:, None]).any(-1).float().mean() * 100.0),
    }
    return metrics, confusion.tolist()


def plot_confusion(confusion: list[list[int]], labels: list[str], out: Path, title: str) -> Path:
    """A PNG of the confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
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
    labels: str | Path | None = None,
    templates: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a saved dual encoder on a pair file (the first `max_items` pairs are the gallery).

    `labels`: a file of class names (one per line); every record carries its class in ``meta.label``;
    adds zero-shot top-1 / top-5 accuracy over those names with the prompt `templates` (default
    "a photo of a {label}.", several are averaged), a confusion matrix, and makes top-1 the headline."""
    from ..data.loaders import load_pairs

    class_names = read_labels(labels) if labels is not None else None
    templates = list(templates or [DEFAULT_TEMPLATE])
    bad = [t for t in templates if "{label}" not in t]
    if bad:
        from ..config import RecipeError

        raise RecipeError(f"zero-shot template {bad[0]!r} has no {{label}} placeholder")
    model, processor = cm.load_model(str(model_dir))
    model.eval()
    records, images, _ = load_pairs(Path(val_path), on_error, max_items, log=lambda *_: None)
    targets = record_labels(records, class_names, val_path) if class_names is not None else None
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
    confusion = None
    if class_names is not None:
        zs, confusion = zero_shot_labels(model, processor, images, targets, class_names, templates)
        metrics.update(zs)
    result: dict[str, Any] = {
        "name": name or Path(model_dir).parent.name,
        "role": role,
        "family": "contrastive",
        "model_dir": str(model_dir),
        "gallery": len(texts),
        "distinct": {"images": len(set(image_ids)), "captions": len(set(text_ids))},
        "metrics": metrics,
        "headline": headline_metric(len(set(image_ids)), len(set(text_ids)), metrics)
        if class_names is None
        else {"metric": "zeroshot_top1", "why": f"zero-shot top-1 accuracy over the {len(class_names)} class names of {labels} (records' meta.label)"},
        "params": count_parameters(model),
        "size_bytes": size_on_disk(model_dir),
        "latency_ms": latency_ms(model, processor, images, texts) if latency else {},
    }
    if confusion is not None:
        result["zeroshot_labels"] = {"file": str(labels), "labels": class_names, "templates": templates, "confusion": confusion}
    if out_path is not None:
        Path(out_path).write_text(json.dumps(result, indent=2))
        if confusion is not None:
            png = plot_confusion(confusion, class_names, Path(out_path).with_name(Path(out_path).stem + "-confusion.png"), f"{result['name']}: zero-shot top-1 {metrics['zeroshot_top1']:.1f}%")
            result["zeroshot_labels"]["plot"] = str(png)
            Path(out_path).write_text(json.dumps(result, indent=2))
    return result
