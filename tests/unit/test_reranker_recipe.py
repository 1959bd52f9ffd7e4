"""Per-step document groups of the reranker recipe (data.group_size)."""

import json
import random

import pytest

from mmdistill.data.records import read_records
from mmdistill.recipes.reranker import sample_group, subset


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [
        {"query": {"text": "a red star"}, "documents": [{"text": f"doc {i}"} for i in range(10)], "labels": [0, 2, 0, 3, 2, 0, 0, 1, 0, 0]},
        {"query": {"text": "a blue square"}, "documents": [{"text": f"doc {i}"} for i in range(10)]},
        {"query": {"text": "a green circle"}, "documents": [{"text": "one"}, {"text": "two"}], "labels": [1, 0]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs, errors = read_records(path, "rerank")
    assert not errors
    return recs


def test_a_group_keeps_the_best_labelled_document_and_draws_the_rest(records):
    rec = records[0]
    seen = set()
    for seed in range(40):
        docs = sample_group(rec, 4, random.Random(seed))
        assert len(docs) == 4 and docs == sorted(docs) and len(set(docs)) == 4
        assert 3 in docs  # label 3: the best one, always kept
        seen.update(docs)
    assert seen == set(range(10))  # the others are drawn, not fixed


def test_unlabelled_and_short_groups(records):
    assert len(sample_group(records[1], 3, random.Random(0))) == 3
    assert sample_group(records[2], 4, random.Random(0)) == [0, 1]  # fewer documents than the group: all
    assert sample_group(records[0], None, random.Random(0)) == list(range(10))


def test_subset_keeps_labels_line_and_folder(records):
    rec = records[0]
    sub = subset(rec, [1, 3, 8])
    assert [d.text for d in sub.documents] == ["doc 1", "doc 3", "doc 8"]
    assert sub.labels == [2, 3, 0]
    assert sub.line == rec.line == 1 and sub.base_dir == rec.base_dir
    assert subset(rec, list(range(10))) is rec


def test_graded_sampling_draws_hard_negatives_more_often(records):
    rec = records[0]  # labels [0, 2, 0, 3, 2, 0, 0, 1, 0, 0]: doc 3 is the best, docs 1 and 4 the near-misses
    counts = {"uniform": [0] * 10, "graded": [0] * 10}
    for sampling, c in counts.items():
        for seed in range(2000):
            docs = sample_group(rec, 4, random.Random(seed), sampling)
            assert len(docs) == 4 and docs == sorted(docs) and len(set(docs)) == 4 and 3 in docs
            for d in docs:
                c[d] += 1
    uni, gra = counts["uniform"], counts["graded"]
    assert min(uni[i] for i in (0, 1, 2, 4)) > 0.8 * max(uni[i] for i in (0, 1, 2, 4))  # uniform: alike
    assert gra[1] > 1.5 * gra[0] and gra[4] > 1.5 * gra[2]  # weight 3 (label 2) against weight 1 (label 0)
    assert gra[0] < uni[0] and gra[1] > uni[1]
    assert all(gra[i] > 0 for i in range(10))  # every document can still be drawn


def test_graded_sampling_of_unlabelled_queries_and_bad_names(records):
    assert len(sample_group(records[1], 3, random.Random(0), "graded")) == 3  # no labels: uniform
    assert sample_group(records[0], None, random.Random(0), "graded") == list(range(10))
    with pytest.raises(ValueError, match="'uniform' or 'graded'"):
        sample_group(records[0], 4, random.Random(0), "hard")
