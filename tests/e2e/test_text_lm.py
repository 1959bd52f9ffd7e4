"""Text-only causal LMs in the generative family, end to end on tiny Qwen3ForCausalLM models: a text teacher trained
on ShapesWorld's questions as text -> `teacher cache` -> a student distilled from the store (no teacher weights) ->
eval; the store's first-step KD loss equals the live teacher's when it keeps every id."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import generative_recipe, merged, mmd, write_recipe


def text_recipe(root: Path, name: str, **extra) -> dict:
    d = generative_recipe(root, name, data={"max_records": 32, "max_length": 128}, student={"arch": "qwen3"},
                          eval={"max_items": 4, "max_new_tokens": 4, "latency": False})
    return merged(d, extra)


@pytest.mark.slow
def test_text_teacher_to_store_to_student(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

    from mmdistill.config import recipe_from_dict
    from mmdistill.data.records import read_records
    from mmdistill.data.synth import generate_text_chat
    from mmdistill.models.tiny import build_tiny_lm
    from mmdistill.recipes import generative as gr

    root = tmp_path
    generate_text_chat(root / "data", n=30, seed=5)
    first = json.loads((root / "data/chat_train.jsonl").read_text().splitlines()[0])
    assert "image" not in first and "images" not in first and first["prompt"].startswith("Scene: ")

    # a text teacher (SFT), saved as a plain causal-LM folder with its tokenizer
    gr.run(recipe_from_dict(text_recipe(root, "teacher", student={"init": "tiny", "arch": "qwen3", "preset": "vlm-nano", "overrides": {"num_hidden_layers": 2}})), log=lambda *_: None)
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher/model")
    assert isinstance(teacher, Qwen3ForCausalLM) and teacher.config.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(root / "teacher/model")

    # the teacher's signals into a store (every id kept, fp32), read back by a recipe that never loads the teacher
    kd = text_recipe(root, "kd", teacher={"model": str(root / "teacher/model")}, loss={"terms": {"kd": {"weight": 1.0}, "sft": {"weight": 0.5}}})
    store = root / "store"
    mmd("teacher", "cache", write_recipe(root, "kd", kd), "--out", store, "--dtype", "fp32", "--top-k", len(tok))
    info = json.loads(mmd("teacher", "inspect", store).stdout)
    assert info["records"] == 32 and info["family"] == "generative" and info["bytes_per_token"] > 0
    from_store = text_recipe(root, "kd-store", teacher={"kind": "store", "path": str(store)}, loss=kd["loss"])
    summary = gr.run(recipe_from_dict(from_store), log=lambda *_: None)
    last = summary["last"]
    assert math.isfinite(last["loss"]) and last["kd"] > 0 and math.isfinite(last["kd"])
    ev = summary["eval"]
    assert ev["items"] == 4 and "exact_match" in ev["metrics"]

    # the student's weights moved away from its initialisation (the same tiny build, same seed, same tokenizer)
    records, _ = read_records(root / "data/chat_train.jsonl")
    init, _ = build_tiny_lm(None, gr.record_texts(records[:32]), preset="vlm-nano", seed=0, tokenizer=tok)
    trained = AutoModelForCausalLM.from_pretrained(root / "kd-store/model")
    moved = [n for n, p in trained.state_dict().items() if not torch.equal(p, init.state_dict()[n])]
    assert len(moved) == len(init.state_dict())

    # the same first step from the live teacher: the same losses (the store keeps every id in fp32)
    one = {"max_steps": 1, "batch_size": 8, "warmup_steps": 0, "save_every": 1, "log_every": 1, "lr": 1e-9}
    a = gr.run(recipe_from_dict({**kd, "output_dir": str(root / "kd-live-1"), "train": one}), log=lambda *_: None, evaluate_after=False)["last"]
    b = gr.run(recipe_from_dict({**from_store, "output_dir": str(root / "kd-store-1"), "train": one}), log=lambda *_: None, evaluate_after=False)["last"]
    assert b["kd"] == pytest.approx(a["kd"], rel=1e-4) and b["sft"] == pytest.approx(a["sft"], rel=1e-5)
