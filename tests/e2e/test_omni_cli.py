"""Real commands on tiny Qwen3-Omni-MoE thinkers: spoken ShapesWorld (espeak-ng) -> teacher -> student distilled with
the logit, vision, audio and text terms -> eval with WER / CER and spoken VQA -> report with a row per task; audio records
given to a model without an audio tower fail with one line naming the model."""

import json
from pathlib import Path

import pytest

from helpers import generative_recipe, merged, mmd, write_recipe

def recipe(root: Path, name: str, **extra) -> Path:
    d = generative_recipe(root, name, role="student",
                          data={"train": str(root / "data/omni_train.jsonl"), "val": str(root / "data/omni_test.jsonl"), "max_records": 36, "max_length": 256},
                          student={"arch": "qwen3_omni_thinker"}, train={"batch_size": 6}, eval={"max_items": 12, "max_new_tokens": 6})
    return write_recipe(root, name, merged(d, extra))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    p = mmd("data", "synth", root / "data", "--n", 20, "--seed", 5, "--audio")
    assert "speech=40" in p.stdout, p.stdout + p.stderr  # fails loudly without espeak-ng (apt-get install espeak-ng)
    mmd("train", recipe(root, "teacher", role="teacher", student={"init": "tiny", "arch": "qwen3_omni_thinker", "preset": "vlm-nano", "overrides": {"text_config.num_hidden_layers": 2}}))
    return root


def test_distill_with_the_audio_term_and_speech_metrics(world):
    terms = {
        "sft": {"weight": 1.0},
        "kd": {"options": {"divergence": "forward_kl", "temperature": 2.0, "scale_t2": True}},
        "vision": {"weight": 0.5},
        "audio": {"weight": 0.5},
        "text": {"weight": 0.5},
    }
    mmd("distill", recipe(world, "kd", teacher={"model": str(world / "teacher/model")}, loss={"terms": terms}))
    log = [json.loads(line) for line in open(world / "kd/metrics.jsonl")]
    assert all(set(terms) <= set(line) for line in log)
    assert all(line["audio"] > 0 for line in log)  # every batch of 6 omni records holds clips (records go image by image)
    for run in ("teacher", "kd"):
        ev = json.loads((world / run / "eval.json").read_text())
        for key in ("wer", "cer", "spoken_vqa_accuracy", "text_vqa_accuracy", "cider"):
            assert key in ev["metrics"], (run, key)
        assert ev["per_skill"]["asr"]["n"] >= 1 and ev["per_skill"]["asr"]["wer"] == ev["metrics"]["wer"]
    answers = [json.loads(line) for line in open(world / "kd/answers.jsonl")]
    assert any(a["skills"] == ["asr"] for a in answers) and any(a["skills"][0].startswith("spoken_") for a in answers)
    p = mmd("report", world / "teacher", world / "kd", "--out", world / "report")
    md = (world / "report/report.md").read_text()
    assert "| speech recognition (WER %, lower is better) |" in md and "| VQA, spoken questions (accuracy %) |" in md


def test_audio_records_for_a_model_without_an_audio_tower(world):
    p = mmd("train", recipe(world, "vl", student={"init": "tiny", "arch": "qwen3_vl", "preset": "vlm-nano"}), check=False)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert "omni_train.jsonl:" in last and ": audio: the data carries audio but the model" in last and "Qwen3VLForConditionalGeneration) has no audio tower" in last
