"""Text-generation metrics for generated answers: VQA accuracy (with the VQA answer normalisation),
exact match, CIDEr-D, BLEU-4, ROUGE-L, per-skill breakdowns and agreement with a teacher's answers.

Conventions
-----------
* ``normalize_answer`` follows the official VQA evaluation script (``vqaEval.py``); see its docstring
  for what was kept and where this implementation deliberately differs.
* ``vqa_accuracy`` is the official formula: ``min(#matching annotators / 3, 1)`` averaged over the
  leave-one-out subsets of the annotators. With a single reference it is normalised exact match.
* ``cider`` wraps ``pycocoevalcap.cider.cider.Cider`` (which implements CIDEr-D: clipped n-gram
  counts, Gaussian length penalty, ×10 scale). The document frequencies are computed on the
  evaluated set, so a score depends on which other items are scored alongside it (with a single
  item the IDF is log(1) = 0 and every score is 0). pycocoevalcap's PTB tokenizer needs Java, so
  captions are tokenised in Python by :func:`simple_tokenize` instead.
* ``bleu4`` is ``sacrebleu.corpus_bleu`` (0–100, sacrebleu's default 13a tokenisation).
* ``rouge_l`` is ``rouge_score``'s ROUGE-L F-measure (0–1), max over references, mean over items.
* ``wer`` / ``cer`` wrap ``jiwer`` (corpus-level: all word / character edits over all reference
  words / characters) on transcripts normalised by :func:`normalize_transcript` (lower case,
  punctuation dropped, whitespace collapsed), for the items of skill ``asr`` (speech transcription).
  Lower is better; they are percentages and can exceed 100.
* ``score_generations`` reports everything as percentages (0–100) except CIDEr (CIDEr-D's ×10
  scale) and BLEU-4 (already 0–100), matching :mod:`mmdistill.evaluate.generative`.
"""

from __future__ import annotations

import re
import string
from typing import Any, Iterable, Sequence

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "exact_match",
    "simple_tokenize",
    "cider",
    "bleu4",
    "rouge_l",
    "score_generations",
    "normalize_transcript",
    "wer",
    "cer",
    "CAPTION_SKILL",
    "ASR_SKILL",
    "SPOKEN_PREFIX",
]

CAPTION_SKILL = "caption"
ASR_SKILL = "asr"  # speech transcription items: scored by WER / CER, not VQA accuracy
SPOKEN_PREFIX = "spoken_"  # spoken-question items (skill spoken_<skill>): VQA accuracy, also reported apart
NO_SKILL = "none"

# ---------------------------------------------------------------------------------------------
# VQA answer normalisation

# Punctuation handled by the VQA script (apostrophe, period and colon are *not* in this list:
# apostrophes survive for contractions, periods are handled separately, colons are kept as-is).
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# a period that is not followed by a digit is removed ("2.5" and ".5" keep theirs, "yes." loses
# it) — this is what the official regex ``(?!<=\d)(\.)(?!\d)`` effectively does.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# a comma between digits ("1,000"): when present, the official script deletes punctuation instead
# of replacing it by a space.
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")

# number words -> digits (the official "manualMap")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# A subset of the official contractions map: apostrophe-less spellings -> the spelling with
# apostrophe (so "dont" and "don't" compare equal). Left out on purpose: spellings that are also
# ordinary words ("ill", "id", "shed", "wed", "lets") and the official "Im"/"Ive"/... entries,
# whose capitalised keys never match the lower-cased words in the official script either.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "shant": "shan't",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "thatd": "that'd",
    "thats": "that's",
    "thered": "there'd",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _process_punctuation(text: str) -> str:
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        # decided on the *original* text, as in the official script
        if (p + " " in text) or (" " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(s: str) -> str:
    """Normalise an answer the way the official VQA evaluation script does.

    Steps (in the script's order):

    1. newlines/tabs -> spaces, strip;
    2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: a mark is deleted when it is
       adjacent to a space somewhere in the string (or the string has a comma between digits,
       e.g. "1,000"), otherwise it is replaced by a space ("black-and-white" -> "black and white",
       "1,000" -> "1000");
    3. a period not followed by a digit is removed ("2.5" keeps its period, "yes." -> "yes");
    4. lower-case, split on whitespace; number words "none"/"zero"…"ten" -> digits; articles
       "a", "an", "the" dropped; apostrophe-less contractions restored ("dont" -> "don't",
       a subset of the official map); words re-joined with single spaces.

    Differences from the official script: it is applied unconditionally (the script only
    processes punctuation/articles when the 10 annotators disagree), the contractions map is a
    subset, and the script's ``re.sub(..., count=re.UNICODE)`` accident (at most 32 periods
    removed) is not reproduced. Apostrophes and colons are left untouched, as in the script.
    """
    if s is None:
        return ""
    text = str(s).replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    return _process_digits_articles(text)


def _as_list(reference: str | Sequence[str] | None) -> list[str]:
    if reference is None:
        return []
    if isinstance(reference, str):
        return [reference]
    return [r if isinstance(r, str) else ("" if r is None else str(r)) for r in reference]


def vqa_accuracy(prediction: str, answers: Sequence[str] | str) -> float:
    """VQA accuracy of one prediction against the annotators' answers, in [0, 1].

    Official formula: for every annotator ``i`` take the other annotators' answers, count how
    many equal the (normalised) prediction and score ``min(count / 3, 1)``; the accuracy is the
    mean over the ``n`` leave-one-out subsets. With the standard 10 annotators, a prediction given
    by ``k`` of them scores ``mean over i of min(#{j != i matching} / 3, 1)``, e.g. k = 2 ->
    (2·1/3 + 8·2/3) / 10 = 0.6, and k >= 4 -> 1.

    With a single reference the leave-one-out average is undefined (no other annotator), so it
    reduces to normalised exact match (1.0 or 0.0). Note that with 2 or 3 references the formula
    cannot reach 1 (max 1/3 and 2/3). No references -> 0.0. Both sides are normalised with
    :func:`normalize_answer`.
    """
    refs = _as_list(answers)
    if not refs:
        return 0.0
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in refs]
    if len(gts) == 1:
        return 1.0 if pred == gts[0] else 0.0
    matches = [g == pred for g in gts]
    total = sum(matches)
    accs = [min(1.0, (total - int(m)) / 3.0) for m in matches]
    return sum(accs) / len(accs)


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return 1.0 if any(pred == normalize_answer(a) for a in _as_list(answers)) else 0.0


# ---------------------------------------------------------------------------------------------
# caption metrics

_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


def simple_tokenize(text: str) -> str:
    """Stand-in for pycocoevalcap's (Java) PTB tokenizer: lower-case, every ASCII punctuation
    character -> space, split on whitespace, re-join with single spaces ("Don't!" -> "don t")."""
    if text is None:
        return ""
    return " ".join(str(text).lower().translate(_PUNCT_TO_SPACE).split())


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference entries")


def cider(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, Any]:
    """CIDEr-D via ``pycocoevalcap.cider.cider.Cider`` after :func:`simple_tokenize`.

    Returns ``{"cider": corpus score (mean of per-item scores), "per_item": [float, ...]}`` on
    CIDEr-D's ×10 scale. The inputs handed to ``Cider().compute_score`` are
    ``gts = {i: [tokenised refs]}`` and ``res = {i: [tokenised prediction]}`` with ``i`` the item
    index. IDF comes from the evaluated references, so scores depend on the set (one item -> 0).
    Empty predictions score 0; an item without references gets a single empty reference; when no
    reference has any token every score is 0 (pycocoevalcap would crash on that).
    """
    _check_lengths(predictions, references)
    if not predictions:
        return {"cider": 0.0, "per_item": []}
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        res[i] = [simple_tokenize(pred)]
        gts[i] = [simple_tokenize(r) for r in _as_list(refs)] or [""]
    if not any(r for refs in gts.values() for r in refs):
        return {"cider": 0.0, "per_item": [0.0] * len(predictions)}
    from pycocoevalcap.cider.cider import Cider

    score, scores = Cider().compute_score(gts, res)
    return {"cider": float(score), "per_item": [float(x) for x in scores]}


def _reference_streams(references: Sequence[Sequence[str] | str]) -> list[list[str | None]]:
    """Per-item reference lists -> sacrebleu's reference streams (one stream per reference slot,
    padded with ``None`` where an item has fewer references)."""
    per_item = [_as_list(r) for r in references]
    width = max((len(r) for r in per_item), default=0)
    width = max(width, 1)
    streams: list[list[str | None]] = [[None] * len(per_item) for _ in range(width)]
    for i, refs in enumerate(per_item):
        if not refs:
            refs = [""]  # an item without references: one empty reference (scores 0)
        for k, r in enumerate(refs):
            streams[k][i] = r
    return streams


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str] | str], **kwargs: Any) -> float:
    """Corpus BLEU-4 with ``sacrebleu.corpus_bleu`` (0–100), default sacrebleu settings unless
    overridden by ``kwargs`` (e.g. ``lowercase=True``). Items may have different numbers of
    references: the reference streams are padded with ``None`` as sacrebleu allows. Empty
    predictions are fine (they contribute length but no matches); no items -> 0.0."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    import sacrebleu

    hyps = ["" if p is None else str(p) for p in predictions]
    return float(sacrebleu.corpus_bleu(hyps, _reference_streams(references), **kwargs).score)


_ROUGE_SCORER = None


def _rouge_scorer():
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"])
    return _ROUGE_SCORER


def rouge_l_per_item(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> list[float]:
    """ROUGE-L F-measure of each prediction, max over its references (0 when it has none)."""
    _check_lengths(predictions, references)
    scorer = _rouge_scorer()
    out = []
    for pred, refs in zip(predictions, references):
        pred = "" if pred is None else str(pred)
        out.append(max((scorer.score(r, pred)["rougeL"].fmeasure for r in _as_list(refs)), default=0.0))
    return [float(x) for x in out]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
    """Mean over items of the ROUGE-L F-measure (``rouge_score``, default tokenizer, no stemming),
    taking the best reference per item; scale 0–1; no items -> 0.0."""
    scores = rouge_l_per_item(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


# ---------------------------------------------------------------------------------------------
# speech transcription


_TRANSCRIPT_DROP = re.compile(r"[^\w\s']")


def normalize_transcript(text: str) -> str:
    """Lower case, punctuation dropped (apostrophes kept), whitespace collapsed: 'The text "AB".' -> 'the text ab'."""
    return " ".join(_TRANSCRIPT_DROP.sub(" ", str(text).lower()).split())


def _edit_rate(measure, predictions: Sequence[str], references: Sequence[str]) -> float:
    _check_lengths(predictions, references)
    pairs = [(normalize_transcript(r), normalize_transcript(p)) for p, r in zip(predictions, references)]
    pairs = [(r, p) for r, p in pairs if r]  # jiwer refuses empty references; such an item has no words to get wrong
    if not pairs:
        raise ValueError("no reference transcript with a word in it")
    return 100.0 * float(measure([r for r, _ in pairs], [p for _, p in pairs]))


def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate in percent (jiwer.wer over normalised transcripts)."""
    import jiwer

    return _edit_rate(jiwer.wer, predictions, references)


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus character error rate in percent (jiwer.cer over normalised transcripts)."""
    import jiwer

    return _edit_rate(jiwer.cer, predictions, references)


# ---------------------------------------------------------------------------------------------
# everything together


def _skills(item: dict) -> list[str]:
    skills = item.get("skills")
    if isinstance(skills, str):
        skills = [skills]
    skills = [str(s) for s in (skills or []) if s is not None]
    return skills or [NO_SKILL]


def _mean_pct(values: Iterable[float]) -> float | None:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else None


def _text_metrics(preds: list[str], refs: list[list[str]]) -> dict[str, float | None]:
    if not preds:
        return {"cider": None, "bleu4": None, "rouge_l": None}
    return {"cider": cider(preds, refs)["cider"], "bleu4": bleu4(preds, refs), "rouge_l": 100.0 * rouge_l(preds, refs)}


def score_generations(items: Sequence[dict]) -> dict[str, Any]:
    """Score generated answers.

    Each item: ``prediction`` (str; empty/None allowed, scores 0), ``reference`` (str or list of
    str), ``skills`` (list of str or None) and optionally ``teacher`` (the teacher's answer).

    Returns (percentages 0–100 except CIDEr-D ×10 scale and BLEU-4 0–100; a metric with no item to
    compute it on is None):

    * ``n_items``, ``empty_predictions`` (predictions that are empty after stripping);
    * ``vqa_accuracy``, ``exact_match``: means over the question items: neither caption nor ``asr``
      (``vqa_items`` of them); with spoken questions (skills ``spoken_<skill>``) also
      ``spoken_vqa_accuracy`` over those and ``text_vqa_accuracy`` over the others;
    * ``wer``, ``cer`` (lower is better): over the ``asr`` items (``asr_items``), when any;
    * ``cider``, ``bleu4``, ``rouge_l``: over the caption items (skill "caption") when any exist,
      else over all items; ``caption_items`` is the number of caption items and
      ``text_metrics_over`` says which set was used ("caption" or "all");
    * ``per_skill``: ``{skill: {"n", "vqa_accuracy", "exact_match"}}`` over the non-caption items
      with that skill, for "caption" ``{"n", "cider", "bleu4", "rouge_l"}``, for "asr" ``{"n", "wer", "cer"}``. Items without
      skills are grouped under "none"; an item with several skills counts in each;
    * when any item has a (non-None) ``teacher``: ``agreement`` = % of those items whose normalised
      prediction equals the normalised teacher answer, ``teacher_items`` (their number) and
      ``agreement_per_skill = {skill: {"n", "agreement"}}``.
    """
    preds: list[str] = []
    refs: list[list[str]] = []
    skills: list[list[str]] = []
    for it in items:
        p = it.get("prediction")
        preds.append("" if p is None else str(p))
        refs.append(_as_list(it.get("reference")))
        skills.append(_skills(it))
    n = len(preds)
    is_caption = [CAPTION_SKILL in s for s in skills]
    is_asr = [ASR_SKILL in s for s in skills]

    vqa = [vqa_accuracy(p, r) for p, r in zip(preds, refs)]
    em = [exact_match(p, r) for p, r in zip(preds, refs)]
    qa_idx = [i for i in range(n) if not is_caption[i] and not is_asr[i]]
    asr_idx = [i for i in range(n) if is_asr[i] and not is_caption[i]]
    spoken_idx = [i for i in qa_idx if any(s.startswith(SPOKEN_PREFIX) for s in skills[i])]
    cap_idx = [i for i in range(n) if is_caption[i]]
    text_idx = cap_idx if cap_idx else list(range(n))

    out: dict[str, Any] = {
        "n_items": n,
        "empty_predictions": sum(1 for p in preds if not p.strip()),
        "vqa_items": len(qa_idx),
        "vqa_accuracy": _mean_pct(vqa[i] for i in qa_idx),
        "exact_match": _mean_pct(em[i] for i in qa_idx),
        "caption_items": len(cap_idx),
        "text_metrics_over": "caption" if cap_idx else "all",
    }
    out.update(_text_metrics([preds[i] for i in text_idx], [refs[i] for i in text_idx]))
    if spoken_idx:
        spoken = set(spoken_idx)
        out["spoken_vqa_items"] = len(spoken_idx)
        out["spoken_vqa_accuracy"] = _mean_pct(vqa[i] for i in spoken_idx)
        out["text_vqa_accuracy"] = _mean_pct(vqa[i] for i in qa_idx if i not in spoken)
    if asr_idx:
        out["asr_items"] = len(asr_idx)
        out["wer"] = wer([preds[i] for i in asr_idx], [refs[i][0] for i in asr_idx])
        out["cer"] = cer([preds[i] for i in asr_idx], [refs[i][0] for i in asr_idx])

    skill_names = sorted({s for ss in skills for s in ss})
    per_skill: dict[str, dict[str, Any]] = {}
    for skill in skill_names:
        if skill == CAPTION_SKILL:
            idx = cap_idx
            per_skill[skill] = {"n": len(idx), **_text_metrics([preds[i] for i in idx], [refs[i] for i in idx])}
        elif skill == ASR_SKILL:
            if asr_idx:
                per_skill[skill] = {"n": len(asr_idx), "wer": out["wer"], "cer": out["cer"]}
        else:
            idx = [i for i in qa_idx if skill in skills[i]]
            if not idx:
                continue
            per_skill[skill] = {
                "n": len(idx),
                "vqa_accuracy": _mean_pct(vqa[i] for i in idx),
                "exact_match": _mean_pct(em[i] for i in idx),
            }
    out["per_skill"] = per_skill

    t_idx = [i for i, it in enumerate(items) if it.get("teacher") is not None]
    if t_idx:
        agree = {i: float(normalize_answer(preds[i]) == normalize_answer(str(items[i]["teacher"]))) for i in t_idx}
        out["teacher_items"] = len(t_idx)
        out["agreement"] = _mean_pct(agree.values())
        per: dict[str, dict[str, Any]] = {}
        for skill in skill_names:
            idx = [i for i in t_idx if skill in skills[i]]
            if idx:
                per[skill] = {"n": len(idx), "agreement": _mean_pct(agree[i] for i in idx)}
        out["agreement_per_skill"] = per
    return out
