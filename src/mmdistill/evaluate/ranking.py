"""Ranking metrics for rerankers (through trec_eval), agreement with a reference ranking, and
per-key (e.g. per-instruction) breakdowns.

Input: one list of candidate scores per query and, for the metrics, one list of graded relevance
labels per query (floats >= 0, 0 = irrelevant), of the same length.

Ranking: candidates are sorted by score, highest first; **ties are broken by candidate index,
earlier first** (deterministic). trec_eval breaks ties by docid *descending*, so candidate ``j`` of a
query with ``n`` candidates gets the zero-padded docid ``str(n - 1 - j)``: earlier candidates have
larger docids and come first among equal scores.

Definitions (per query, ``rank`` 1-based, ``rel(d) = label(d) > 0``, ``R`` = number of relevant
candidates), as computed by trec_eval (``pytrec_eval``):

- ``ndcg@k``:   DCG@k / IDCG@k with linear gains and log2 discount,
  ``DCG@k = Σ_{rank ≤ k} label / log2(rank + 1)``; IDCG@k is the DCG@k of the candidates sorted by
  label (the ideal ordering of *all* labels of the query). trec_eval's ``ndcg_cut.k``.
- ``mrr@10``:   1 / rank of the first relevant candidate if it is within the top 10, else 0
  (trec_eval's ``recip_rank`` on the run cut to its top 10).
- ``map``:      average precision, ``(1/R) Σ_{relevant d} precision@rank(d)`` over the full ranking.
- ``recall@k``: (relevant candidates in the top k) / R.

Queries without any relevant candidate (all labels 0) get 0 for every metric, are counted in the
means (the denominators are all queries) and are counted in ``n_queries_without_relevant``.
(trec_eval alone would also give them 0 when they appear in the qrels; we make this explicit.)

trec_eval takes integer relevance levels. Integer-valued labels are passed as they are (exact).
A query with a non-integer label is quantised: ``level = max(1, round(label / max_label × 10⁶))``
for ``label > 0`` and 0 otherwise. Linear-gain NDCG is invariant to scaling the gains of a query, so
this changes NDCG by at most ~10⁻⁶ relative; relevance (``label > 0``) and so MRR / MAP / recall are
exact.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

_QUANT = 1_000_000


# ---------------------------------------------------------------------------------------------
# validation


def _as_floats(values: Any, what: str, i: int) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"query {i}: {what} must be a list of numbers ({err})") from None
    if arr.ndim != 1:
        raise ValueError(f"query {i}: {what} must be a flat list of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"query {i} has no candidates")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"query {i}: {what} contain a non-finite value (NaN or inf)")
    return arr


def _check_pairs(a: Sequence, b: Sequence, name_a: str, name_b: str) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} queries but {name_b} has {len(b)}")
    if len(a) == 0:
        raise ValueError("no queries to evaluate")
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        xa, ya = _as_floats(x, name_a, i), _as_floats(y, name_b, i)
        if xa.size != ya.size:
            raise ValueError(f"query {i}: {name_a} has {xa.size} candidates but {name_b} has {ya.size}")
        out.append((xa, ya))
    return out


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"cut-offs ks must be positive integers, got {k!r}")
        out.append(int(k))
    return sorted(set(out))


def _rank_order(scores: np.ndarray) -> np.ndarray:
    """Candidate indices, highest score first, ties by index (earlier first)."""
    return np.argsort(-scores, kind="stable")


# ---------------------------------------------------------------------------------------------
# ranking metrics


def _docids(n: int) -> list[str]:
    width = len(str(n - 1))
    return [str(n - 1 - j).zfill(width) for j in range(n)]


def _levels(labels: np.ndarray, i: int) -> list[int]:
    if np.any(labels < 0):
        raise ValueError(f"query {i}: labels must be >= 0, got {labels.min()}")
    if np.all(labels == np.round(labels)):
        return [int(v) for v in labels]
    top = labels.max()
    return [max(1, int(round(v / top * _QUANT))) if v > 0 else 0 for v in labels]


def ranking_metrics(
    scores: Sequence[Sequence[float]],
    labels: Sequence[Sequence[float]],
    *,
    ks: Sequence[int] = (1, 3, 5, 10),
    per_query: bool = False,
) -> dict[str, Any]:
    """NDCG@10, MRR@10, MAP, Recall@k and NDCG@k of scored candidate lists, via trec_eval.

    ``scores[i]`` and ``labels[i]`` are the scores and graded labels (>= 0) of query ``i``'s
    candidates (same length, at least one). See the module docstring for the exact definitions,
    tie-breaking (by candidate index) and the handling of queries without relevant candidates (0).

    Returns a dict of means over all queries, as fractions in [0, 1]::

        {"ndcg@10", "mrr@10", "map", "recall@k" (each k in ks), "ndcg@k" (each k in ks),
         "n_queries": int, "n_queries_without_relevant": int,
         "per_query": {metric: [value of query 0, 1, ...]}   # only with per_query=True}

    Raises ``ValueError`` (naming the query index) for a query without candidates, scores and labels
    of different lengths, non-finite values or negative labels; also for no queries or bad ``ks``.
    """
    import pytrec_eval

    pairs = _check_pairs(scores, labels, "scores", "labels")
    cuts = _check_ks(ks)
    ndcg_cuts = sorted(set(cuts) | {10})

    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    run_top10: dict[str, dict[str, float]] = {}
    has_relevant: list[bool] = []
    qids = [f"q{i}" for i in range(len(pairs))]
    for i, (qid, (s, y)) in enumerate(zip(qids, pairs)):
        docs = _docids(s.size)
        qrels[qid] = dict(zip(docs, _levels(y, i)))
        run[qid] = {d: float(v) for d, v in zip(docs, s)}
        top = _rank_order(s)[:10]
        run_top10[qid] = {docs[j]: float(s[j]) for j in top}
        has_relevant.append(bool(np.any(y > 0)))

    measures = {"map", f"ndcg_cut.{','.join(map(str, ndcg_cuts))}", f"recall.{','.join(map(str, cuts))}"}
    full = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    top10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run_top10)

    names = {"ndcg@10": "ndcg_cut_10", "mrr@10": "recip_rank", "map": "map"}
    names.update({f"recall@{k}": f"recall_{k}" for k in cuts})
    names.update({f"ndcg@{k}": f"ndcg_cut_{k}" for k in cuts})
    table: dict[str, list[float]] = {m: [] for m in names}
    for qid, relevant in zip(qids, has_relevant):
        for metric, key in names.items():
            source = top10 if metric == "mrr@10" else full
            value = float(source.get(qid, {}).get(key, 0.0)) if relevant else 0.0
            table[metric].append(value)

    out: dict[str, Any] = {m: float(np.mean(v)) for m, v in table.items()}
    out["n_queries"] = len(pairs)
    out["n_queries_without_relevant"] = sum(not r for r in has_relevant)
    if per_query:
        out["per_query"] = table
    return out


# ---------------------------------------------------------------------------------------------
# agreement with a reference (teacher) ranking


def teacher_agreement(
    student_scores: Sequence[Sequence[float]],
    teacher_scores: Sequence[Sequence[float]],
    *,
    k: int = 3,
    per_query: bool = False,
) -> dict[str, Any]:
    """How closely the student's ranking of each query's candidates follows the teacher's.

    Per query with ``n`` candidates (top-k taken after sorting by score, ties by candidate index):

    - ``top{k}_overlap``: ``|topk(student) ∩ topk(teacher)| / min(k, n)``, in [0, 1].
    - ``top{k}_exact``:   1 if the two top-k *sets* are equal, else 0.
    - ``kendall_tau``:    ``scipy.stats.kendalltau`` (tau-b, ties accounted for) of the two score lists.
    - ``spearman``:       ``scipy.stats.spearmanr`` correlation of the two score lists.

    Returned values are means over queries. Kendall tau / Spearman are undefined (NaN) when either
    list is constant or ``n == 1``; such queries are skipped in that mean and counted in
    ``kendall_tau_skipped`` / ``spearman_skipped`` (the mean is NaN when every query is skipped).
    With ``per_query=True`` also ``"per_query": {metric: [values]}`` (NaN for skipped queries).

    Raises ``ValueError`` (naming the query index) for a query without candidates, lists of different
    lengths or non-finite scores, and for ``k < 1``.
    """
    from scipy import stats

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    pairs = _check_pairs(student_scores, teacher_scores, "student_scores", "teacher_scores")
    overlap, exact, taus, rhos = [], [], [], []
    for s, t in pairs:
        top_s = set(_rank_order(s)[:k].tolist())
        top_t = set(_rank_order(t)[:k].tolist())
        overlap.append(len(top_s & top_t) / min(k, s.size))
        exact.append(float(top_s == top_t))
        if s.size < 2 or np.all(s == s[0]) or np.all(t == t[0]):
            taus.append(math.nan)
            rhos.append(math.nan)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            taus.append(float(stats.kendalltau(s, t).statistic))
            rhos.append(float(stats.spearmanr(s, t).statistic))

    def nanmean(values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return float(np.mean(kept)) if kept else math.nan

    out: dict[str, Any] = {
        f"top{k}_overlap": float(np.mean(overlap)),
        f"top{k}_exact": float(np.mean(exact)),
        "kendall_tau": nanmean(taus),
        "kendall_tau_skipped": sum(math.isnan(v) for v in taus),
        "spearman": nanmean(rhos),
        "spearman_skipped": sum(math.isnan(v) for v in rhos),
        "n_queries": len(pairs),
    }
    if per_query:
        out["per_query"] = {
            f"top{k}_overlap": overlap,
            f"top{k}_exact": exact,
            "kendall_tau": taus,
            "spearman": rhos,
        }
    return out


# ---------------------------------------------------------------------------------------------
# per-key breakdowns (per instruction, per direction, ...)


def group_by(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Query indices of each key, keys in order of first appearance.

    >>> group_by(["a", "b", "a"])
    {'a': [0, 2], 'b': [1]}
    """
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def breakdown(per_query: dict[str, Sequence[float]], keys: Sequence[Any]) -> dict[Any, dict[str, float]]:
    """Mean of each per-query metric within each key (e.g. each query's instruction).

    ``per_query``: metric -> one value per query (as ``ranking_metrics(..., per_query=True)["per_query"]``);
    ``keys``: the key of each query. Returns ``{key: {metric: mean, ..., "n": number of queries}}``,
    keys in order of first appearance. NaN values (e.g. skipped Kendall tau) are left out of a mean
    (NaN when all are). Raises ``ValueError`` when a metric's list length differs from ``len(keys)``.

    >>> breakdown({"ndcg@10": [1.0, 0.0, 0.5]}, ["a", "b", "a"])
    {'a': {'ndcg@10': 0.75, 'n': 2}, 'b': {'ndcg@10': 0.0, 'n': 1}}
    """
    for metric, values in per_query.items():
        if len(values) != len(keys):
            raise ValueError(f"metric {metric!r} has {len(values)} per-query values but there are {len(keys)} keys")
    out: dict[Any, dict[str, float]] = {}
    for key, idx in group_by(keys).items():
        row: dict[str, float] = {}
        for metric, values in per_query.items():
            kept = [float(values[i]) for i in idx if not math.isnan(float(values[i]))]
            row[metric] = float(np.mean(kept)) if kept else math.nan
        row["n"] = len(idx)
        out[key] = row
    return out
