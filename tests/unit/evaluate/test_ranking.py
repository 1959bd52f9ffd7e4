"""Ranking metrics (via trec_eval) against a brute-force numpy reference and ranx; ties; agreement;
breakdowns; errors."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from mmdistill.evaluate.ranking import breakdown, group_by, ranking_metrics, teacher_agreement

# ---------------------------------------------------------------------------------------------
# brute-force reference (ranking: score descending, ties by candidate index, earlier first)


def _order(scores):
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def _dcg(gains):
    return sum(g / math.log2(r + 2) for r, g in enumerate(gains))


def ref_ndcg(scores, labels, k):
    ranked = [labels[j] for j in _order(scores)][:k]
    ideal = sorted(labels, reverse=True)[:k]
    idcg = _dcg(ideal)
    return _dcg(ranked) / idcg if idcg > 0 else 0.0


def ref_mrr(scores, labels, k=10):
    for r, j in enumerate(_order(scores)[:k]):
        if labels[j] > 0:
            return 1.0 / (r + 1)
    return 0.0


def ref_ap(scores, labels):
    n_rel = sum(y > 0 for y in labels)
    if n_rel == 0:
        return 0.0
    hits, total = 0, 0.0
    for r, j in enumerate(_order(scores)):
        if labels[j] > 0:
            hits += 1
            total += hits / (r + 1)
    return total / n_rel


def ref_recall(scores, labels, k):
    n_rel = sum(y > 0 for y in labels)
    if n_rel == 0:
        return 0.0
    return sum(labels[j] > 0 for j in _order(scores)[:k]) / n_rel


def _random_data(seed, n_queries=40, ties=False, float_labels=False):
    rng = np.random.default_rng(seed)
    scores, labels = [], []
    for _ in range(n_queries):
        n = int(rng.integers(1, 25))
        s = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
        if float_labels:
            y = np.where(rng.random(n) < 0.3, rng.random(n) * 2.5, 0.0)
        else:
            y = np.where(rng.random(n) < 0.3, rng.integers(1, 4, n), 0).astype(float)
        scores.append(s.tolist())
        labels.append(y.tolist())
    return scores, labels


def _reference(scores, labels, ks):
    per = {
        "ndcg@10": [ref_ndcg(s, y, 10) for s, y in zip(scores, labels)],
        "mrr@10": [ref_mrr(s, y) for s, y in zip(scores, labels)],
        "map": [ref_ap(s, y) for s, y in zip(scores, labels)],
    }
    for k in ks:
        per[f"recall@{k}"] = [ref_recall(s, y, k) for s, y in zip(scores, labels)]
        per[f"ndcg@{k}"] = [ref_ndcg(s, y, k) for s, y in zip(scores, labels)]
    return per


# ---------------------------------------------------------------------------------------------
# ranking_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_brute_force(seed, ties):
    scores, labels = _random_data(seed, ties=ties)
    ks = (1, 3, 5, 10)
    res = ranking_metrics(scores, labels, ks=ks, per_query=True)
    ref = _reference(scores, labels, ks)
    assert set(ref) <= set(res["per_query"])
    for metric, values in ref.items():
        np.testing.assert_allclose(res["per_query"][metric], values, atol=1e-9, err_msg=metric)
        assert res[metric] == pytest.approx(np.mean(values), abs=1e-9)
        assert 0.0 <= res[metric] <= 1.0
    assert res["n_queries"] == len(scores)
    assert res["n_queries_without_relevant"] == sum(not any(y > 0 for y in q) for q in labels)


def test_float_labels_are_quantised_closely():
    scores, labels = _random_data(5, float_labels=True)
    res = ranking_metrics(scores, labels, per_query=True)
    ref = _reference(scores, labels, (1, 3, 5, 10))
    for metric, values in ref.items():
        tol = 1e-5 if metric.startswith("ndcg") else 1e-12  # NDCG gains quantised to 1e-6 of the max
        np.testing.assert_allclose(res["per_query"][metric], values, atol=tol, err_msg=metric)


def test_metrics_match_ranx():
    import ranx  # a dev dependency: the reference the metrics are checked against
    scores, labels = _random_data(7, n_queries=60)
    # ranx (like trec_eval) needs every query in the qrels; give each at least one relevant doc so
    # both tools agree on the denominators, and add one query without any.
    for y in labels:
        if not any(v > 0 for v in y):
            y[0] = 2.0
    labels[-1] = [0.0] * len(labels[-1])
    res = ranking_metrics(scores, labels, ks=(5, 10))
    qrels = ranx.Qrels(
        {f"q{i}": {f"d{j}": int(v) for j, v in enumerate(y)} for i, y in enumerate(labels)}
    )
    run = ranx.Run({f"q{i}": {f"d{j}": float(v) for j, v in enumerate(s)} for i, s in enumerate(scores)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ranx.evaluate(qrels, run, ["ndcg@10", "mrr@10", "map", "recall@5"])
    for metric in ["ndcg@10", "mrr@10", "map", "recall@5"]:
        assert res[metric] == pytest.approx(theirs[metric], abs=1e-6), metric
    assert res["n_queries_without_relevant"] == 1


def test_ties_break_by_candidate_index():
    # all scores equal: the ranking is the candidate order
    res = ranking_metrics([[1.0, 1.0, 1.0, 1.0]], [[0, 0, 1, 0]], ks=(1, 3), per_query=True)
    assert res["mrr@10"] == pytest.approx(1 / 3)
    assert res["recall@1"] == 0.0 and res["recall@3"] == 1.0
    # a relevant first candidate tied with later ones ranks first
    res = ranking_metrics([[0.5, 0.5, 0.2]], [[1, 0, 0]])
    assert res["mrr@10"] == 1.0 and res["ndcg@10"] == pytest.approx(1.0)
    # more than 10 candidates (docids of different widths must still sort by index)
    n = 12
    for rel in range(n):
        y = [0] * n
        y[rel] = 1
        res = ranking_metrics([[0.0] * n], [y])
        assert res["mrr@10"] == pytest.approx(1 / (rel + 1) if rel < 10 else 0.0), rel
        assert res["map"] == pytest.approx(1 / (rel + 1)), rel


def test_mrr_cut_at_10_but_map_and_recall_use_the_full_ranking():
    scores = [list(range(20, 0, -1))]  # candidate 0 first
    labels = [[0] * 11 + [1] + [0] * 8]  # first relevant at rank 12
    res = ranking_metrics(scores, labels, ks=(10, 20))
    assert res["mrr@10"] == 0.0
    assert res["map"] == pytest.approx(1 / 12)
    assert res["recall@10"] == 0.0 and res["recall@20"] == 1.0


def test_queries_without_relevant_count_as_zero():
    res = ranking_metrics([[0.3, 0.1], [0.9, 0.2]], [[0, 0], [1, 0]], per_query=True)
    assert res["n_queries_without_relevant"] == 1
    assert res["per_query"]["ndcg@10"] == [0.0, 1.0]
    assert res["ndcg@10"] == 0.5 and res["mrr@10"] == 0.5 and res["map"] == 0.5


def test_graded_gain_is_linear():
    # labels 2, 1 ranked reversed: DCG = 1 + 2/log2(3); IDCG = 2 + 1/log2(3)
    res = ranking_metrics([[0.1, 0.9]], [[2, 1]])
    assert res["ndcg@10"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_ranking_errors_name_the_query():
    with pytest.raises(ValueError, match="query 1 has no candidates"):
        ranking_metrics([[0.1], []], [[1], []])
    with pytest.raises(ValueError, match="query 1: scores has 2 candidates but labels has 3"):
        ranking_metrics([[0.1], [0.1, 0.2]], [[1], [1, 0, 0]])
    with pytest.raises(ValueError, match="2 queries but labels has 1"):
        ranking_metrics([[0.1], [0.2]], [[1]])
    with pytest.raises(ValueError, match="no queries"):
        ranking_metrics([], [])
    with pytest.raises(ValueError, match="query 0: labels must be >= 0"):
        ranking_metrics([[0.1, 0.2]], [[-1, 1]])
    with pytest.raises(ValueError, match="query 0: scores contain a non-finite"):
        ranking_metrics([[float("nan"), 0.2]], [[0, 1]])
    with pytest.raises(ValueError, match="positive integers"):
        ranking_metrics([[0.1]], [[1]], ks=(0,))


# ---------------------------------------------------------------------------------------------
# teacher_agreement


def test_agreement_identical_and_reversed():
    rng = np.random.default_rng(0)
    a = [rng.normal(size=n).tolist() for n in (5, 8, 3, 12)]
    same = teacher_agreement(a, a, k=3)
    assert same["top3_overlap"] == 1.0 and same["top3_exact"] == 1.0
    assert same["kendall_tau"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["kendall_tau_skipped"] == 0
    rev = teacher_agreement(a, [[-v for v in q] for q in a], k=3)
    assert rev["kendall_tau"] == pytest.approx(-1.0) and rev["spearman"] == pytest.approx(-1.0)


def test_agreement_hand_made():
    student = [[0.9, 0.8, 0.1, 0.0], [1.0, 2.0]]
    teacher = [[0.9, 0.1, 0.8, 0.0], [5.0, 5.0]]
    res = teacher_agreement(student, teacher, k=3, per_query=True)
    # query 0: top3 {0,1,2} vs {0,2,1} -> overlap 1, exact; tau: one discordant pair out of 6
    # query 1: n=2 -> top-3 overlap is over min(3, 2) = 2 -> 1; teacher constant -> tau skipped
    assert res["per_query"]["top3_overlap"] == [1.0, 1.0]
    assert res["per_query"]["top3_exact"] == [1.0, 1.0]
    assert res["per_query"]["kendall_tau"][0] == pytest.approx((5 - 1) / 6)
    assert math.isnan(res["per_query"]["kendall_tau"][1])
    assert res["kendall_tau"] == pytest.approx(4 / 6) and res["kendall_tau_skipped"] == 1
    assert res["spearman_skipped"] == 1
    assert res["spearman"] == pytest.approx(stats.spearmanr(student[0], teacher[0]).statistic)

    res = teacher_agreement([[4, 3, 2, 1, 0]], [[0, 3, 2, 1, 4]], k=2)
    assert res["top2_overlap"] == 0.5 and res["top2_exact"] == 0.0  # {0,1} vs {4,1}


def test_agreement_top_k_ties_by_index():
    # constant student: its top-2 is candidates {0, 1}
    res = teacher_agreement([[1.0, 1.0, 1.0]], [[0.0, 2.0, 3.0]], k=2)
    assert res["top2_overlap"] == 0.5
    assert math.isnan(res["kendall_tau"]) and res["kendall_tau_skipped"] == 1


def test_agreement_errors():
    with pytest.raises(ValueError, match="query 0 has no candidates"):
        teacher_agreement([[]], [[]])
    with pytest.raises(ValueError, match="query 1: student_scores has 1 candidates but teacher_scores has 2"):
        teacher_agreement([[1.0], [1.0]], [[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="k must be"):
        teacher_agreement([[1.0]], [[1.0]], k=0)


# ---------------------------------------------------------------------------------------------
# breakdowns


def test_group_by_and_breakdown():
    assert group_by(["b", "a", "b"]) == {"b": [0, 2], "a": [1]}
    per_query = {"ndcg@10": [1.0, 0.0, 0.5, 0.25], "kendall_tau": [0.5, float("nan"), float("nan"), 1.0]}
    table = breakdown(per_query, ["x", "y", "x", "y"])
    assert list(table) == ["x", "y"]
    assert table["x"] == {"ndcg@10": 0.75, "kendall_tau": 0.5, "n": 2}
    assert table["y"]["ndcg@10"] == 0.125 and table["y"]["kendall_tau"] == 1.0 and table["y"]["n"] == 2
    with pytest.raises(ValueError, match="'ndcg@10' has 4 per-query values but there are 3 keys"):
        breakdown(per_query, ["x", "y", "x"])


def test_breakdown_of_ranking_metrics_per_instruction():
    scores, labels = _random_data(3, n_queries=10)
    res = ranking_metrics(scores, labels, per_query=True)
    keys = ["find" if i % 2 else "match" for i in range(10)]
    table = breakdown(res["per_query"], keys)
    ref = _reference(scores, labels, (1, 3, 5, 10))
    for key in ("find", "match"):
        idx = [i for i in range(10) if keys[i] == key]
        assert table[key]["n"] == 5
        assert table[key]["ndcg@10"] == pytest.approx(np.mean([ref["ndcg@10"][i] for i in idx]))


def test_chance_metrics_match_the_expected_value_of_random_order():
    import math

    from mmdistill.evaluate.reranker import chance_metrics

    # one relevant of two candidates: in random order it is first half the time
    expected_ndcg = 100 * (0.5 * 1 + 0.5 / math.log2(3))
    got = chance_metrics([[1, 0]] * 50, draws=40)
    assert abs(got["ndcg@10"] - expected_ndcg) < 3
    assert abs(got["mrr@10"] - 75.0) < 3
    assert chance_metrics([[2, 2, 2]])["ndcg@10"] == 100.0  # every order is ideal
    assert chance_metrics([[1, 0, 0]], seed=3) == chance_metrics([[1, 0, 0]], seed=3)


def test_report_shows_the_chance_line(tmp_path):
    from mmdistill.evaluate.report import build_report, render_markdown

    runs = [
        {"name": "teacher", "role": "teacher", "metrics": {"ndcg@10": 90.0}, "chance": {"ndcg@10": 70.0, "map": 50.0}},
        {"name": "student", "role": "student", "metrics": {"ndcg@10": 85.0}},
    ]
    md = render_markdown(build_report(runs, title="t", headline="ndcg@10"))
    assert "Chance (random scores on the same queries): ndcg@10 70.00." in md
