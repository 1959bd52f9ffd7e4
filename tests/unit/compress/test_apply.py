"""Calibration inputs and option parsing of `mmdistill prune` (compress.apply)."""

import json

import pytest
import torch

from helpers import shapes_chat
from mmdistill.compress.apply import MIN_CALIBRATION, calibration_inputs, calibrator, parse_width
from mmdistill.compress.prune import PruneError
from mmdistill.models.tiny import build_tiny_moe_lm, build_tiny_vlm, make_processor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    rows, tok = shapes_chat(root / "world", n=12, seed=2)
    bare = [{k: v for k, v in r.items() if k != "response"} for r in rows[:5]]
    (root / "world" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bare))
    return root / "world", tok


def test_vlm_chat_records_with_and_without_responses(data):
    world, tok = data
    model, _ = build_tiny_vlm(None, [], kind="qwen3_vl_moe", tokenizer=tok)
    proc = make_processor("qwen3_vl_moe", tok)
    full = calibration_inputs(model, proc, world / "chat_train.jsonl", is_vlm=True, max_samples=5)
    bare = calibration_inputs(model, proc, world / "prompts.jsonl", is_vlm=True, max_samples=5)
    assert len(full) == len(bare) == 5
    for f, b in zip(full, bare):
        assert {"input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(b)
        assert b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] < f["input_ids"].shape[1]  # prompt only
        assert torch.equal(f["pixel_values"], b["pixel_values"])
    seen = []
    h = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape), with_kwargs=True)
    calibrator(bare)(model)
    h.remove()
    assert len(seen) == 5


def test_text_model_on_chat_records_uses_the_chat_template(data):
    world, tok = data
    model, _ = build_tiny_moe_lm(None, [], tokenizer=tok, num_experts=4)
    samples = calibration_inputs(model, tok, world / "chat_train.jsonl", is_vlm=False, max_samples=4)
    first = json.loads((world / "chat_train.jsonl").read_text().splitlines()[0])
    text = tok.decode(samples[0]["input_ids"][0])
    assert text.startswith("<|im_start|>user\n") and first["response"] in text and set(samples[0]) == {"input_ids", "attention_mask"}


def test_too_little_data_and_bad_widths(data, tmp_path):
    world, tok = data
    model, _ = build_tiny_moe_lm(None, [], tokenizer=tok, num_experts=4)
    (tmp_path / "few.txt").write_text("\n".join(["a b c"] * (MIN_CALIBRATION - 1)) + "\n\n")
    with pytest.raises(PruneError, match=f"3 sample\\(s\\); at least {MIN_CALIBRATION}"):
        calibration_inputs(model, tok, tmp_path / "few.txt", is_vlm=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        calibration_inputs(model, tok, tmp_path / "none.txt", is_vlm=False)
    assert parse_width("text_config.hidden_size=64, text_config.intermediate_size=160") == {"text_config.hidden_size": 64, "text_config.intermediate_size": 160}
    for bad in ("hidden_size", "hidden_size=big", ","):
        with pytest.raises(PruneError):
            parse_width(bad)
