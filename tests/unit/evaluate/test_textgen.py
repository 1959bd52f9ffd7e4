"""Text-generation metrics: VQA normalisation/accuracy by hand, CIDEr-D / BLEU-4 / ROUGE-L against the
underlying libraries, and score_generations on small hand-made item lists."""

import math

import pytest
import sacrebleu
from pycocoevalcap.cider.cider import Cider
from rouge_score import rouge_scorer

from mmdistill.evaluate.textgen import (
    bleu4,
    cider,
    exact_match,
    normalize_answer,
    rouge_l,
    score_generations,
    simple_tokenize,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------------
# normalize_answer


@pytest.mark.parametrize(
    "raw, expected",
    [
        # number words -> digits
        ("two", "2"),
        ("Two", "2"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("two dogs", "2 dogs"),
        # articles
        ("the cat", "cat"),
        ("A dog", "dog"),
        ("an apple", "apple"),
        ("the", ""),
        # punctuation
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("what?", "what"),
        ("black-and-white", "black and white"),  # no space next to it -> replaced by a space
        ("left - right", "left right"),  # space next to it -> deleted
        ("red, blue", "red blue"),
        ("1,000", "1000"),  # digit comma digit -> punctuation deleted
        ("(cyan)", "cyan"),
        # periods
        ("2.5", "2.5"),
        ("0.75", "0.75"),
        ("3.", "3"),
        ("mr. smith", "mr smith"),
        # contractions
        ("dont", "don't"),
        ("don't", "don't"),
        ("isnt", "isn't"),
        ("Cant", "can't"),
        # whitespace
        ("  cyan\tstar \n", "cyan star"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_keeps_ordinary_words():
    # words that look like apostrophe-less contractions but are ordinary words stay as they are
    assert normalize_answer("ill") == "ill"
    assert normalize_answer("shed") == "shed"
    assert normalize_answer(None) == ""


# ---------------------------------------------------------------------------------------------
# vqa_accuracy


def test_vqa_accuracy_single_reference():
    assert vqa_accuracy("cyan", ["cyan"]) == 1.0
    assert vqa_accuracy("cyan", "cyan") == 1.0
    assert vqa_accuracy("Cyan.", ["cyan"]) == 1.0
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("the star", ["star"]) == 1.0
    assert vqa_accuracy("red", ["cyan"]) == 0.0
    assert vqa_accuracy("", ["cyan"]) == 0.0
    assert vqa_accuracy("cyan", []) == 0.0


def _loo(k, n=10):
    """Leave-one-out VQA accuracy by hand: k of n annotators gave the predicted answer."""
    accs = [min(1.0, (k - 1) / 3) for _ in range(k)] + [min(1.0, k / 3) for _ in range(n - k)]
    return sum(accs) / n


def test_vqa_accuracy_ten_annotators():
    # 2 of 10 agree: the 2 matching annotators see 1 other match (1/3), the 8 others see 2 (2/3)
    answers = ["red", "red"] + ["blue"] * 8
    assert vqa_accuracy("red", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("red", answers) == pytest.approx(0.6)
    # 1 of 10: 9 subsets contain that one match -> 9 * 1/3 / 10 = 0.3
    assert vqa_accuracy("green", ["green"] + ["blue"] * 9) == pytest.approx(0.3)
    # 3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9 ; 4 or more -> 1
    assert vqa_accuracy("blue", ["blue"] * 3 + ["red"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("blue", ["blue"] * 4 + ["red"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("yellow", ["blue"] * 4 + ["red"] * 6) == 0.0
    for k in range(11):
        assert vqa_accuracy("x", ["x"] * k + ["y"] * (10 - k)) == pytest.approx(_loo(k))


def test_vqa_accuracy_normalises_annotators():
    answers = ["Two", "2", "two.", "3", "three", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)


def test_exact_match():
    assert exact_match("The Star", ["star"]) == 1.0
    assert exact_match("circle", ["star", "circle"]) == 1.0
    assert exact_match("square", ["star", "circle"]) == 0.0


# ---------------------------------------------------------------------------------------------
# CIDEr-D

PREDS = [
    "a small cyan star at the top, a large red circle on the left",
    "a red square in the middle",
    "two blue triangles",
    "a green circle at the bottom",
]
REFS = [
    ["a small cyan star at the top, a large red circle on the left"],
    ["a red square in the centre", "a small red square in the middle"],
    ["a large yellow star on the right"],
    ["a green circle at the bottom", "a green circle below"],
]


def test_simple_tokenize():
    assert simple_tokenize("A small Cyan star, at the top!") == "a small cyan star at the top"
    assert simple_tokenize("") == ""


def test_cider_equals_pycocoevalcap():
    out = cider(PREDS, REFS)
    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(REFS)}
    res = {i: [simple_tokenize(p)] for i, p in enumerate(PREDS)}
    score, scores = Cider().compute_score(gts, res)
    assert out["cider"] == pytest.approx(float(score))
    assert out["per_item"] == pytest.approx([float(s) for s in scores])
    assert len(out["per_item"]) == len(PREDS)


def test_cider_identical_beats_wrong():
    out = cider(PREDS, REFS)
    # item 0 is identical to its reference, item 2 is wrong
    assert out["per_item"][0] > out["per_item"][2]
    good = cider(["a red circle", "a blue star", "a green square"], [["a red circle"], ["a blue star"], ["a green square"]])
    bad = cider(["a red circle", "a blue star", "a cyan triangle on top"], [["a red circle"], ["a blue star"], ["a green square"]])
    assert good["cider"] > bad["cider"]


def test_cider_empty_predictions_do_not_crash():
    out = cider(["", "a red circle", ""], [["a blue star"], ["a red circle"], ["a cyan square"]])
    assert out["per_item"][0] == 0.0 and out["per_item"][2] == 0.0
    assert out["per_item"][1] > 0
    assert math.isfinite(out["cider"])
    # all empty, empty references, nothing at all
    assert cider(["", ""], [["a"], ["b c"]])["cider"] == 0.0
    assert cider(["x"], [[""]]) == {"cider": 0.0, "per_item": [0.0]}
    assert cider(["x", "y"], [[], ["y"]])["per_item"][0] == 0.0
    assert cider([], []) == {"cider": 0.0, "per_item": []}


def test_cider_length_mismatch():
    with pytest.raises(ValueError):
        cider(["a"], [["a"], ["b"]])


# ---------------------------------------------------------------------------------------------
# BLEU-4


def test_bleu4_equals_sacrebleu():
    # varying number of references: sacrebleu's streams padded with None
    streams = [[r[0] for r in REFS], [r[1] if len(r) > 1 else None for r in REFS]]
    expected = sacrebleu.corpus_bleu(PREDS, streams).score
    assert bleu4(PREDS, REFS) == pytest.approx(expected)
    # single string references
    single = [r[0] for r in REFS]
    assert bleu4(PREDS, single) == pytest.approx(sacrebleu.corpus_bleu(PREDS, [single]).score)
    # options pass through
    assert bleu4(PREDS, single, lowercase=True) == pytest.approx(sacrebleu.corpus_bleu(PREDS, [single], lowercase=True).score)


def test_bleu4_perfect_match():
    refs = ["a small cyan star at the top of the image", "a large red circle on the left side"]
    assert bleu4(refs, [[r] for r in refs]) == pytest.approx(100.0)


def test_bleu4_empty_predictions():
    preds = ["", "a large red circle on the left side", ""]
    refs = [["a small cyan star at the top"], ["a large red circle on the left side"], ["x"]]
    value = bleu4(preds, refs)
    assert 0.0 <= value < 100.0
    assert value == pytest.approx(sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score)
    assert bleu4(["", ""], [["a b c d"], ["e f g h"]]) == 0.0
    assert bleu4([], []) == 0.0


# ---------------------------------------------------------------------------------------------
# ROUGE-L


def test_rouge_l_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    per = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(PREDS, REFS)]
    assert rouge_l(PREDS, REFS) == pytest.approx(sum(per) / len(per))
    assert 0.0 <= rouge_l(PREDS, REFS) <= 1.0
    assert rouge_l(["a red circle"], ["a red circle"]) == pytest.approx(1.0)
    assert rouge_l(["", "a red circle"], [["a blue star"], ["a red circle"]]) == pytest.approx(0.5)
    assert rouge_l([], []) == 0.0


# ---------------------------------------------------------------------------------------------
# score_generations


def _items():
    return [
        # colour: 3 of 4 right (one only after normalisation)
        {"prediction": "cyan", "reference": "cyan", "skills": ["colour"], "teacher": "cyan"},
        {"prediction": "Red.", "reference": "red", "skills": ["colour"], "teacher": "red"},
        {"prediction": "blue", "reference": "blue", "skills": ["colour"], "teacher": "green"},
        {"prediction": "green", "reference": "yellow", "skills": ["colour"], "teacher": "yellow"},
        # count: 1 of 2 right ("two" == "2")
        {"prediction": "two", "reference": "2", "skills": ["count"], "teacher": "2"},
        {"prediction": "3", "reference": "4", "skills": ["count"], "teacher": "3"},
        # shape: empty prediction
        {"prediction": "", "reference": "star", "skills": ["shape"], "teacher": "star"},
        # captions
        {
            "prediction": "a small cyan star at the top, a large red circle on the left",
            "reference": ["a small cyan star at the top, a large red circle on the left"],
            "skills": ["caption"],
            "teacher": "a small cyan star at the top, a large red circle on the left",
        },
        {
            "prediction": "a red square in the middle",
            "reference": ["a red square in the centre", "a small red square in the middle"],
            "skills": ["caption"],
            "teacher": "a blue square",
        },
        {"prediction": "", "reference": "a large yellow star on the right", "skills": ["caption"], "teacher": ""},
    ]


def test_score_generations_overall_and_per_skill():
    items = _items()
    out = score_generations(items)
    assert out["n_items"] == 10
    assert out["empty_predictions"] == 2
    assert out["caption_items"] == 3
    assert out["text_metrics_over"] == "caption"
    assert out["vqa_items"] == 7
    # non-caption items: colour 3/4, count 1/2, shape 0/1 -> 4/7
    assert out["vqa_accuracy"] == pytest.approx(100 * 4 / 7)
    assert out["exact_match"] == pytest.approx(100 * 4 / 7)

    ps = out["per_skill"]
    assert set(ps) == {"colour", "count", "shape", "caption"}
    assert ps["colour"] == {"n": 4, "vqa_accuracy": pytest.approx(75.0), "exact_match": pytest.approx(75.0)}
    assert ps["count"]["n"] == 2 and ps["count"]["vqa_accuracy"] == pytest.approx(50.0)
    assert ps["shape"]["n"] == 1 and ps["shape"]["vqa_accuracy"] == 0.0

    caps = [it for it in items if "caption" in it["skills"]]
    preds = [it["prediction"] for it in caps]
    refs = [it["reference"] for it in caps]
    assert out["cider"] == pytest.approx(cider(preds, refs)["cider"])
    assert out["bleu4"] == pytest.approx(bleu4(preds, refs))
    assert out["rouge_l"] == pytest.approx(100 * rouge_l(preds, refs))
    assert ps["caption"]["n"] == 3
    assert ps["caption"]["cider"] == pytest.approx(out["cider"])
    assert ps["caption"]["bleu4"] == pytest.approx(out["bleu4"])
    assert ps["caption"]["rouge_l"] == pytest.approx(out["rouge_l"])
    assert "vqa_accuracy" not in ps["caption"]


def test_score_generations_agreement():
    out = score_generations(_items())
    # agree: cyan, red, two/2, star? no (empty vs star), caption 1 yes, caption 2 no, caption 3 ""=="" yes
    # colour: cyan, Red./red agree; blue/green, green/yellow don't -> 2/4
    # count: two/2 agrees, 3/3 agrees -> 2/2 ; shape: ""/star no -> 0/1 ; caption: 2/3
    assert out["teacher_items"] == 10
    assert out["agreement"] == pytest.approx(100 * (2 + 2 + 0 + 2) / 10)
    aps = out["agreement_per_skill"]
    assert aps["colour"] == {"n": 4, "agreement": pytest.approx(50.0)}
    assert aps["count"] == {"n": 2, "agreement": pytest.approx(100.0)}
    assert aps["shape"] == {"n": 1, "agreement": 0.0}
    assert aps["caption"]["agreement"] == pytest.approx(100 * 2 / 3)


def test_score_generations_no_teacher_no_captions():
    items = [
        {"prediction": "cyan", "reference": "cyan", "skills": ["colour"]},
        {"prediction": "red", "reference": "cyan", "skills": ["colour"]},
        {"prediction": "3", "reference": ["3"], "skills": None},
    ]
    out = score_generations(items)
    assert "agreement" not in out and "agreement_per_skill" not in out
    assert out["caption_items"] == 0
    assert out["text_metrics_over"] == "all"
    preds = [it["prediction"] for it in items]
    refs = [it["reference"] for it in items]
    assert out["cider"] == pytest.approx(cider(preds, refs)["cider"])
    assert out["bleu4"] == pytest.approx(bleu4(preds, refs))
    assert out["rouge_l"] == pytest.approx(100 * rouge_l(preds, refs))
    assert out["vqa_accuracy"] == pytest.approx(100 * 2 / 3)
    assert out["per_skill"]["colour"]["vqa_accuracy"] == pytest.approx(50.0)
    assert out["per_skill"]["none"]["n"] == 1  # items without skills


def test_score_generations_robust_to_empty():
    out = score_generations([{"prediction": "", "reference": "", "skills": ["caption"]}, {"prediction": None, "reference": "a", "skills": ["caption"]}])
    assert out["empty_predictions"] == 2
    assert out["vqa_accuracy"] is None and out["exact_match"] is None
    assert out["cider"] == 0.0 and out["bleu4"] == 0.0 and out["rouge_l"] == 0.0
    empty = score_generations([])
    assert empty["n_items"] == 0 and empty["vqa_accuracy"] is None and empty["cider"] is None
    assert empty["per_skill"] == {}
