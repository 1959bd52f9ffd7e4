"""Real `mmdistill prune` / `mmdistill quantize` commands on tiny Qwen3-VL-MoE, Qwen3-MoE and Qwen3-VL folders."""

import functools
import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import helpers
from helpers import shapes_chat
from mmdistill.models.tiny import build_tiny_moe_lm, build_tiny_vlm

mmd = functools.partial(helpers.mmd, timeout=600)


def digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    rows, tok = shapes_chat(root / "data", n=20, seed=1)
    build_tiny_vlm(root / "vlmoe", [], kind="qwen3_vl_moe", preset="vlm-teacher", tokenizer=tok, seed=1, overrides={"text_config.num_experts": 8})
    build_tiny_vlm(root / "vl", [], kind="qwen3_vl", preset="vlm-teacher", tokenizer=tok, seed=2)
    build_tiny_moe_lm(root / "lm", [], tokenizer=tok, num_experts=8, seed=3)
    (root / "text.txt").write_text("\n".join(r["prompt"] + " " + r["response"] for r in rows[:12]) + "\n")
    (root / "two.txt").write_text("one line\nanother line\n")
    return root


def test_prune_experts_then_quantize_a_vlm_moe(root):
    src, data = root / "vlmoe", root / "data" / "chat_train.jsonl"
    before = digest(src)
    p = mmd("prune", src, "--experts", "0.5", "--method", "reap", "--calibration", data, "--max-samples", "6", "--out", root / "p")
    assert "kept 4 of 8 per layer by reap" in p.stdout
    assert digest(src) == before
    report = json.loads((root / "p" / "prune.json").read_text())
    assert report["samples"] == 6 and report["parameters"][1] < report["parameters"][0]
    assert all(len(v) == 4 for v in report["experts"]["kept"].values())
    model = AutoModelForImageTextToText.from_pretrained(root / "p")
    assert model.config.text_config.num_experts == 4
    q = mmd("quantize", root / "p", "--method", "int8-dynamic", "--out", root / "q")
    assert "int8-dynamic model written" in q.stdout
    quant = AutoModelForImageTextToText.from_pretrained(root / "q")
    assert "Int8" in type(quant.model.language_model.layers[0].self_attn.q_proj.weight).__name__
    assert (root / "q" / "preprocessor_config.json").is_file() or (root / "q" / "processor_config.json").is_file()


def test_prune_depth_both_towers_and_width(root):
    data = root / "data" / "chat_train.jsonl"
    mmd("prune", root / "vlmoe", "--drop-layers", "auto:text:1;vision:1", "--calibration", data, "--max-samples", "4", "--out", root / "d")
    cfg = AutoModelForImageTextToText.from_pretrained(root / "d").config
    assert cfg.text_config.num_hidden_layers == 3 and cfg.vision_config.depth == 1
    assert set(json.loads((root / "d" / "prune.json").read_text())["depth"]["importance"]) == {"text", "vision"}
    mmd("prune", root / "vl", "--drop-layers", "text:0", "--out", root / "e")  # explicit: no calibration needed
    assert AutoModelForImageTextToText.from_pretrained(root / "e").config.text_config.num_hidden_layers == 3
    mmd("prune", root / "vl", "--width", "text_config.intermediate_size=128", "--calibration", data, "--max-samples", "4", "--out", root / "w")
    assert AutoModelForImageTextToText.from_pretrained(root / "w").config.text_config.intermediate_size == 128


def test_prune_a_text_moe_on_plain_text(root):
    mmd("prune", root / "lm", "--experts", "0.25", "--method", "frequency", "--calibration", root / "text.txt", "--out", root / "t")
    model = AutoModelForCausalLM.from_pretrained(root / "t")
    assert model.config.num_experts == 6
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize("args, message", [
    (["prune", "{vlmoe}", "--experts", "1.0", "--calibration", "{text}", "--out", "{tmp}"], "strictly between 0 and 1"),
    (["prune", "{vl}", "--experts", "0.5", "--calibration", "{text}", "--out", "{tmp}"], "no MoE layers"),
    (["prune", "{vlmoe}", "--experts", "0.5", "--calibration", "{two}", "--out", "{tmp}"], "at least 4 are needed"),
    (["prune", "{vlmoe}", "--experts", "0.5", "--out", "{tmp}"], "needs calibration data"),
    (["prune", "{vlmoe}", "--experts", "0.5", "--method", "magnitude", "--calibration", "{text}", "--out", "{tmp}"], "unknown"),
    (["prune", "{vl}", "--drop-layers", "text:0,1,2,3", "--out", "{tmp}"], "would remove every block"),
    (["prune", "{lm}", "--drop-layers", "auto:vision:1", "--calibration", "{text}", "--out", "{tmp}"], "no vision tower"),
    (["prune", "{vl}", "--out", "{tmp}"], "nothing to prune"),
    (["quantize", "{lm}", "--method", "int3", "--out", "{tmp}"], "unknown"),
    (["quantize", "{root}/missing", "--method", "int8-weight", "--out", "{tmp}"], "no config.json"),
])
def test_bad_input_is_one_clear_line(root, args, message, tmp_path):
    names = {"vlmoe": root / "vlmoe", "vl": root / "vl", "lm": root / "lm", "text": root / "text.txt", "two": root / "two.txt", "tmp": tmp_path / "out", "root": root}
    p = mmd(*[a.format(**names) for a in args], check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert not (tmp_path / "out").exists()
