"""What a data file holds, and what in it makes a metric mean less than it seems (``mmdistill data check``).

``file_stats(records)`` counts records, distinct images and texts, duplicate images, text lengths,
image sizes (read from the file headers, no decoding) and label balance where records carry labels;
``stats_warnings(stats)`` turns what would mislead an evaluation into sentences that say which
metrics it affects; ``shared_records(train, val)`` finds evaluation records that also sit in the
training file (leakage).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .records import ChatRecord, PairRecord, Record, RerankRecord

REPEATED_TEXTS = 0.5  # fewer distinct captions than this share of the pairs: retrieval metrics mislead
IMBALANCE = 10.0  # most common label over the least common (this ratio or more): accuracy says more about the majority


def _fold(text: str) -> str:
    """A text as retrieval compares it: case and runs of spaces folded."""
    return " ".join(text.lower().split())


def _lengths(texts: Sequence[str]) -> dict[str, float]:
    words = [len(t.split()) for t in texts]
    return {"min": min(words), "mean": round(sum(words) / len(words), 2), "max": max(words)} if words else {}


def _image_sizes(records: Sequence[Record], limit: int = 2000) -> dict[str, int]:
    """The most common image sizes ("WxH" -> count) of the first `limit` distinct images, from the headers."""
    sizes: Counter = Counter()
    seen: set[Path] = set()
    for rec in records:
        for _, ref in rec.image_refs():
            path = (rec.base_dir / ref).resolve()
            if path in seen or len(seen) >= limit:
                continue
            seen.add(path)
            try:
                with Image.open(path) as im:  # reads the header only
                    sizes[f"{im.width}x{im.height}"] += 1
            except Exception:  # a bad image is the record checks' business, not the statistics'
                continue
    return dict(sizes.most_common(5))


def _image_key(rec: Record, ref: str) -> str:
    return str((rec.base_dir / ref).resolve())


def _labels(records: Sequence[Record]) -> dict[str, int]:
    """Label -> count, for pair / chat records whose ``meta`` carries a ``label``."""
    counts: Counter = Counter()
    for rec in records:
        label = (rec.meta or {}).get("label")
        if isinstance(label, (str, int)) and not isinstance(label, bool):
            counts[str(label)] += 1
    return dict(counts.most_common())


def file_stats(records: Sequence[Record]) -> dict[str, Any]:
    """Counts and distributions of a file's valid records (all of one kind)."""
    if not records:
        return {"records": 0}
    kind = records[0].kind
    out: dict[str, Any] = {"kind": kind, "records": len(records)}
    if kind == "pair":
        pairs: Sequence[PairRecord] = records  # type: ignore[assignment]
        image_uses = Counter(_image_key(r, r.image) for r in pairs)
        out.update(
            distinct_images=len(image_uses),
            duplicate_images=sum(1 for n in image_uses.values() if n > 1),
            distinct_texts=len({_fold(r.text) for r in pairs}),
            text_words=_lengths([r.text for r in pairs]),
        )
    elif kind == "rerank":
        ranks: Sequence[RerankRecord] = records  # type: ignore[assignment]
        docs = [len(r.documents) for r in ranks]
        out.update(
            distinct_queries=len({(_fold(r.query.text or ""), r.query.image) for r in ranks}),
            documents_per_query={"min": min(docs), "mean": round(sum(docs) / len(docs), 2), "max": max(docs)},
            instructions=dict(Counter(r.instruction for r in ranks).most_common(10)),
            labelled_queries=sum(1 for r in ranks if r.labels is not None),
            label_values=dict(sorted(Counter(f"{v:g}" for r in ranks for v in (r.labels or [])).items())),
            query_words=_lengths([r.query.text for r in ranks if r.query.text]),
        )
    else:
        chats: Sequence[ChatRecord] = records  # type: ignore[assignment]
        out.update(
            distinct_prompts=len({_fold(r.prompt) for r in chats}),
            distinct_images=len({_image_key(r, ref) for r in chats for _, ref in r.image_refs()}),
            **({"with_audio": n_audio} if (n_audio := sum(1 for r in chats if r.audio is not None)) else {}),
            with_response=sum(1 for r in chats if r.response),
            with_teacher_response=sum(1 for r in chats if r.teacher_response),
            response_words=_lengths([r.response for r in chats if r.response]),
            skills=dict(Counter(s for r in chats for s in (r.skills or [])).most_common(10)),
        )
    out["image_sizes"] = _image_sizes(records)
    labels = _labels(records)
    if labels:
        out["labels"] = labels
    return out


def stats_warnings(stats: dict[str, Any]) -> list[str]:
    """Sentences about what in the data would make a metric mislead, each naming the metrics it affects."""
    warnings: list[str] = []
    n = stats.get("records", 0)
    if stats.get("kind") == "pair" and n:
        texts, images = stats["distinct_texts"], stats["distinct_images"]
        if texts < REPEATED_TEXTS * n:
            warnings.append(
                f"{texts} distinct captions over {n} pairs: captions repeat, so text→image R@k counts any image with the "
                f"caption (near 100 for any model) and the top image→text candidates are copies of one caption. "
                f"`mmdistill eval` ranks distinct captions and makes zero-shot accuracy (with --zeroshot) or image→text R@1 "
                f"(a {texts}-way classification) the headline; the mean of both R@1 would mislead."
            )
        if images < n:
            warnings.append(
                f"{n - images} pairs reuse an image ({images} distinct images, {stats['duplicate_images']} of them in several pairs): "
                f"image→text R@k counts any of an image's captions as right."
            )
    labels = stats.get("labels") or {}
    if len(labels) > 1:
        counts = sorted(labels.values())
        if counts[-1] >= IMBALANCE * counts[0]:
            warnings.append(f"labels are imbalanced ({counts[-1]} vs {counts[0]} records): accuracy mostly reflects the common labels.")
    return warnings


def shared_records(train: Sequence[Record], val: Sequence[Record]) -> list[Record]:
    """Evaluation records whose content (images and texts) also appears in the training records."""

    def key(rec: Record) -> tuple:
        images = tuple(_image_key(rec, ref) for _, ref in rec.image_refs() + rec.audio_refs())  # a clip is content too
        if isinstance(rec, PairRecord):
            return (images, _fold(rec.text))
        if isinstance(rec, RerankRecord):
            return (images, _fold(rec.query.text or ""), tuple(_fold(d.text or "") for d in rec.documents))
        return (images, _fold(rec.prompt))

    seen = {key(r) for r in train}
    return [r for r in val if key(r) in seen]
