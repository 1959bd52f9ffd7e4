"""Real commands on tiny Qwen3-Omni-MoE thinkers: spoken ShapesWorld (espeak-ng) -> teacher -> student distilled with
the logit, vision, audio and text terms -> eval with WER / CER and spoken VQA -> report with a row per task; audio records
given to a model without an audio tower fail with one line naming the model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def mmd(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "mmdistill.cli", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"mmdistill {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def recipe(root: Path, name: str, **extra) -> Path:
    d = {
        "family": "generative",
        "output_dir": str(root / name),
        "seed": 0,
        "role": "student",
        "data": {"train": str(root / "data/omni_train.jsonl"), "val": str(root / "data/omni_test.jsonl"), "max_records": 36, "max_length": 256},
        "student": {"init": "tiny", "arch": "qwen3_omni_thinker", "preset": "vlm-nano"},
        "loss": {"terms": {"sft": {"weight": 1.0}}},
        "train": {"max_steps": 3, "batch_size": 6, "warmup_steps": 1, "save_every": 3, "log_every": 1, "lr": 0.003},
        "eval": {"max_items": 12, "max_new_tokens": 6},
    }
    for k, v in extra.items():
        d[k] = v if not isinstance(v, dict) or k not in d else {**d[k], **v}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


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
