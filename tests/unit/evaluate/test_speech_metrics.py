"""WER / CER of speech-transcription items (checked against jiwer), spoken-VQA accuracy beside text VQA, and the
report's per-task rows with retention (teacher WER / student WER for the error rates)."""

import jiwer
import pytest

from mmdistill.evaluate.report import build_report, render_markdown
from mmdistill.evaluate.textgen import cer, normalize_transcript, score_generations, wer


def test_wer_cer_against_jiwer():
    refs = ["a large red circle at the top left", 'the text "AB" and a small blue square', "a star"]
    preds = ["a large red square at the top", 'The text AB, and a small blue square.', ""]
    norm_r = [normalize_transcript(r) for r in refs]
    norm_p = [normalize_transcript(p) for p in preds]
    assert norm_p[1] == norm_r[1] == "the text ab and a small blue square"
    assert wer(preds, refs) == pytest.approx(100 * jiwer.wer(norm_r, norm_p))
    assert cer(preds, refs) == pytest.approx(100 * jiwer.cer(norm_r, norm_p))
    # corpus-level: (1 substitution + 1 deletion) + 0 + 2 deletions over 8 + 8 + 2 words (not the mean of per-item rates)
    assert wer(preds, refs) == pytest.approx(100 * (2 + 0 + 2) / 18)
    assert wer(["x"], ["a b"]) == 100.0 and wer(["a b c d"], ["a"]) == 300.0  # 3 insertions over 1 word: above 100%
    with pytest.raises(ValueError, match="no reference transcript"):
        wer(["a"], ["..."])


def test_score_generations_with_speech_items():
    items = [
        {"prediction": "a red circle", "reference": "a red circle at the top", "skills": ["asr"]},
        {"prediction": "a blue star", "reference": "a blue star", "skills": ["asr"]},
        {"prediction": "red", "reference": "red", "skills": ["spoken_colour"]},
        {"prediction": "2", "reference": "3", "skills": ["spoken_count"]},
        {"prediction": "circle", "reference": "circle", "skills": ["shape"]},
        {"prediction": "a red circle", "reference": "a red circle", "skills": ["caption"]},
        {"prediction": "a blue square", "reference": "a green square", "skills": ["caption"]},
    ]
    s = score_generations(items)
    assert s["asr_items"] == 2 and s["wer"] == pytest.approx(100 * jiwer.wer(["a red circle at the top", "a blue star"], ["a red circle", "a blue star"]))
    assert s["cer"] == pytest.approx(100 * jiwer.cer(["a red circle at the top", "a blue star"], ["a red circle", "a blue star"]))
    assert s["vqa_items"] == 3 and s["vqa_accuracy"] == pytest.approx(200 / 3)  # asr items are not questions
    assert s["spoken_vqa_accuracy"] == 50.0 and s["text_vqa_accuracy"] == 100.0
    assert s["per_skill"]["asr"] == {"n": 2, "wer": s["wer"], "cer": s["cer"]}
    assert s["per_skill"]["spoken_colour"]["vqa_accuracy"] == 100.0 and s["caption_items"] == 2
    plain = score_generations([it for it in items if it["skills"] == ["shape"]])
    assert "wer" not in plain and "spoken_vqa_accuracy" not in plain


def test_report_rows_per_task():
    runs = [
        {"name": "teacher", "role": "teacher", "metrics": {"vqa_accuracy": 80.0, "text_vqa_accuracy": 90.0, "spoken_vqa_accuracy": 60.0, "cider": 2.0, "wer": 20.0, "cer": 10.0}, "params": 100},
        {"name": "student-base", "role": "baseline", "metrics": {"vqa_accuracy": 40.0, "text_vqa_accuracy": 45.0, "spoken_vqa_accuracy": 30.0, "cider": 1.0, "wer": 80.0, "cer": 50.0}, "params": 20},
        {"name": "student-kd", "role": "student", "metrics": {"vqa_accuracy": 72.0, "text_vqa_accuracy": 81.0, "spoken_vqa_accuracy": 54.0, "cider": 1.9, "wer": 25.0, "cer": 0.0}, "params": 20},
    ]
    report = build_report(runs, title="omni", headline="vqa_accuracy")
    kd = next(r for r in report["runs"] if r["name"] == "student-kd")
    assert kd["retention"]["wer"] == pytest.approx(0.8)  # teacher WER / student WER
    assert kd["retention"]["cider"] == pytest.approx(0.95)
    assert "cer" not in kd["retention"]  # a perfect student CER: the ratio is unbounded, left out
    md = render_markdown(report)
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ") and " | " in line}
    assert "80.0%" in rows["speech recognition (WER %, lower is better)"] and "25.0%" in rows["speech recognition (WER %, lower is better)"]
    assert "90.0%" in rows["VQA, spoken questions (accuracy %)"] and "95.0%" in rows["captioning (CIDEr-D)"]
