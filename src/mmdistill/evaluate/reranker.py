"""Evaluate a saved reranker: NDCG@10 / MRR@10 / MAP / Recall@k against labels, agreement with a
reference model (top-3 overlap, Kendall tau), per-instruction and per-direction breakdowns, size,
latency per query with K candidates and throughput in pairs/s -> eval.json.

Metrics are percentages (×100) except ``kendall_tau`` and ``spearman`` (in [-1, 1]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..models import reranker as rm
from .bench import beside, count_parameters, measure_latency, size_on_disk


def query_latency(reranker: rm.Reranker, record, candidates: int = 20) -> dict[str, float]:
    """Median ms to score one query against `candidates` documents in one batch (inputs pre-tokenised), and pairs/s."""
    docs = [record.documents[i % len(record.documents)] for i in range(candidates)]
    padded = record.model_copy(update={"documents": docs, "labels": None})
    padded._line, padded._base_dir = record.line, record.base_dir
    batch, _ = reranker.encode([padded])

    def fn():
        with torch.inference_mode():
            reranker.forward(batch)

    ms = measure_latency(fn, warmup=2, repeats=10)["median_ms"]
    return {f"query_k{candidates}": ms, "pairs_per_s": candidates / ms * 1000.0}


def chance_metrics(labels: list[list[float]], ks: Sequence[int] = (1, 5, 10), draws: int = 20, seed: int = 0) -> dict[str, float]:
    """The same metrics for random scores (mean of `draws` seeded draws): the floor a reranker must beat.

    With few graded candidates per query this floor is high (NDCG@10 of about 70 on ShapesWorld's
    10-candidate lists), so a score means little without it.
    """
    from .ranking import ranking_metrics

    gen = torch.Generator().manual_seed(seed)
    total: dict[str, float] = {}
    for _ in range(draws):
        scores = [torch.rand(len(row), generator=gen).tolist() for row in labels]
        for k, v in _reported(ranking_metrics(scores, labels, ks=tuple(ks)), ks).items():
            total[k] = total.get(k, 0.0) + v / draws
    return total


def _reported(res: dict[str, Any], ks: Sequence[int]) -> dict[str, float]:
    """The metrics eval.json reports, as percentages, from `ranking_metrics` fractions."""
    return {key: 100.0 * res[key] for key in ["ndcg@10", "mrr@10", "map", *[f"recall@{k}" for k in ks]] if key in res}


def evaluate_folder(
    model_dir: str | Path,
    data_path: str | Path,
    *,
    out_path: str | Path | None = None,
    name: str | None = None,
    role: str = "student",
    max_items: int | None = 1000,
    ks: Sequence[int] = (1, 5, 10),
    latency: bool = True,
    candidates: int = 20,
    reference: str | Path | None = None,
    max_length: int = 512,
    on_error: str = "fail",
) -> dict[str, Any]:
    """Score every query of a rerank file (the first `max_items`) and write eval.json."""
    from ..data.loaders import load_rerank
    from .ranking import breakdown, ranking_metrics, teacher_agreement

    cache = rm.ImageCache()
    records, _ = load_rerank(Path(data_path), on_error, max_items, cache, log=lambda *_: None)
    if any(r.labels is None for r in records):
        raise ValueError(f"{data_path}: evaluation needs labels on every record")
    reranker = rm.load_reranker(str(model_dir), max_length=max_length)
    reranker.model.eval()
    reranker.images = cache
    scores = reranker.score_records(records, path=str(data_path))
    labels = [list(r.labels) for r in records]
    ks = sorted(set(ks) | {10})
    res = ranking_metrics(scores, labels, ks=tuple(ks), per_query=True)
    per_query = res.pop("per_query")
    metrics = _reported(res, ks)
    result: dict[str, Any] = {"name": name or Path(model_dir).parent.name, "role": role, "family": "reranker", "model_dir": str(model_dir), "queries": len(records)}
    result["chance"] = chance_metrics(labels, ks=tuple(ks))

    ref_scores = None
    agree_per_query: dict[str, list[float]] = {}
    if reference is not None and Path(str(reference)).resolve() != Path(str(model_dir)).resolve():
        ref = rm.load_reranker(str(reference), max_length=max_length)
        ref.model.eval()
        ref.images = cache
        ref_scores = ref.score_records(records, path=str(data_path))
        agree = teacher_agreement(scores, ref_scores, k=3, per_query=True)
        agree_per_query = {m: agree["per_query"][m] for m in ("top3_overlap", "kendall_tau")}
        metrics["top3_overlap"] = 100.0 * agree["top3_overlap"]
        metrics["kendall_tau"] = agree["kendall_tau"]
        result["reference"] = str(reference)
    result["metrics"] = metrics

    def breakdown_by(keys: list[str]) -> dict[str, Any]:
        wanted = {m: per_query[m] for m in ("ndcg@10", "mrr@10") if m in per_query} | agree_per_query
        table = breakdown(wanted, keys)
        return {k: {m: v if m in ("n", "kendall_tau") else 100.0 * v for m, v in d.items()} for k, d in table.items()}

    result["per_instruction"] = breakdown_by([r.instruction for r in records])
    directions = [str((r.meta or {}).get("direction", "all")) for r in records]
    if len(set(directions)) > 1:
        result["per_direction"] = breakdown_by(directions)
    result["params"] = count_parameters(reranker.model)
    result["size_bytes"] = size_on_disk(model_dir)
    result["latency_ms"] = {}
    if latency:
        lat = query_latency(reranker, records[0], candidates)
        result["latency_ms"] = {f"query_k{candidates}": lat[f"query_k{candidates}"]}
        result["throughput"] = {"pairs_per_s": lat["pairs_per_s"]}
    if out_path is not None:
        Path(out_path).write_text(json.dumps(result, indent=2))
        scores_path = beside(out_path, "scores.jsonl")
        with scores_path.open("w") as f:
            for i, (r, s) in enumerate(zip(records, scores)):
                f.write(json.dumps({"id": r.id if r.id is not None else i, "scores": s, **({"reference": ref_scores[i]} if ref_scores else {})}) + "\n")
    return result
