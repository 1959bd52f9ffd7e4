"""Structured width pruning of tiny real Qwen3-VL and Qwen3 models (compress.prune)."""

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText

from helpers import shapes_chat
from mmdistill.compress.prune import PruneError, collect_importance, parse_widths, prune_widths
from mmdistill.data.records import read_records
from mmdistill.models import generative as gm
from mmdistill.models.tiny import build_tiny_seq_cls, build_tiny_vlm, make_processor, param_count

torch.set_num_threads(2)

SMALL = {
    "text_config.hidden_size": 64,
    "text_config.num_attention_heads": 2,
    "text_config.num_key_value_heads": 1,
    "text_config.intermediate_size": 160,
    "vision_config.hidden_size": 32,
    "vision_config.num_heads": 2,
    "vision_config.intermediate_size": 64,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "world"
    rows, tok = shapes_chat(out, n=40, seed=3, limit=200)
    records, _ = read_records(out / "chat_train.jsonl", "chat")
    recs = records[:6]
    proc = make_processor("qwen3_vl", tok, image_size=128)
    batch = gm.encode_chat(proc, recs, [r.load_images() for r in recs])
    model, _ = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-teacher", tokenizer=tok, seed=4)
    return tok, model.eval(), batch


def _logits(model, batch):
    with torch.no_grad():
        return gm.forward_signals(model.eval(), batch).logits


def _importance(model, batch):
    return collect_importance(model, lambda m: gm.forward_signals(m, batch))


def test_no_width_change_is_the_same_model(setup):
    _, model, batch = setup
    same = prune_widths(model, {}, _importance(model, batch))
    assert torch.equal(_logits(model, batch), _logits(same, batch))


def test_pruned_model_has_the_widths_and_saves(setup, tmp_path):
    _, model, batch = setup
    imp = _importance(model, batch)
    assert imp["text.hidden"].shape == (128,) and imp["text.0.heads"].shape == (4,) and imp["text.3.mlp"].shape == (384,)
    assert imp["vision.hidden"].shape == (64,) and imp["vision.1.heads"].shape == (4,) and imp["model.visual.merger.mlp"].shape == (256,)
    small = prune_widths(model, SMALL, imp)
    tc, vc = small.config.text_config, small.config.vision_config
    assert (tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.intermediate_size, tc.head_dim) == (64, 2, 1, 160, 32)
    assert (vc.hidden_size, vc.num_heads, vc.intermediate_size, vc.out_hidden_size) == (32, 2, 64, 64)
    assert model.config.text_config.hidden_size == 128  # the teacher is untouched
    assert param_count(small) < 0.3 * param_count(model)
    logits = _logits(small, batch)
    assert logits.shape == _logits(model, batch).shape and torch.isfinite(logits).all()
    # the kept embedding columns are the teacher's most active residual channels
    keep = torch.sort(torch.topk(imp["text.hidden"], 64).indices).values
    assert torch.equal(small.get_input_embeddings().weight, model.get_input_embeddings().weight[:, keep])
    small.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert torch.allclose(_logits(again, batch), logits, atol=1e-6)
    # depth after width: keep two text layers and one vision block of the pruned model
    shallow = gm.inherit_student(small, {"text": [0, 3], "vision": [0]})
    assert shallow.config.text_config.num_hidden_layers == 2 and _logits(shallow, batch).shape == logits.shape


def test_dead_units_are_the_ones_pruned(setup):
    """Neurons, heads and vision neurons that never fire carry no signal: pruning exactly them changes nothing."""
    _, model, batch = setup
    m = copy.deepcopy(model)
    with torch.no_grad():
        text = m.model.language_model
        for i, layer in enumerate(text.layers):
            dead = torch.arange(i % 3, 384, 3)  # 128 dead neurons per layer
            layer.mlp.up_proj.weight[dead] = 0
            layer.self_attn.v_proj.weight[32 * (i % 2) : 32 * (i % 2 + 1)] = 0  # one dead kv group (2 query heads)
        for j, block in enumerate(m.model.visual.blocks):
            block.mlp.linear_fc1.weight[: 64] = 0
            block.mlp.linear_fc1.bias[: 64] = -30.0  # gelu(-30) == 0: dead
            # one dead head: its value rows are zero
            block.attn.qkv.weight[2 * 64 + 16 * j : 2 * 64 + 16 * (j + 1)] = 0
            block.attn.qkv.bias[2 * 64 + 16 * j : 2 * 64 + 16 * (j + 1)] = 0
    imp = _importance(m, batch)
    assert imp["vision.0.heads"][0] == 0 and imp["vision.1.heads"][1] == 0 and (imp["vision.0.heads"][1:] > 0).all()
    widths = {"text_config.intermediate_size": 256, "text_config.num_attention_heads": 2, "text_config.num_key_value_heads": 1,
              "vision_config.intermediate_size": 64}
    pruned = prune_widths(m, widths, imp)
    assert torch.allclose(_logits(pruned, batch), _logits(m, batch), atol=1e-5)
    # a pruned layer kept the other kv group: layer 0 lost group 0, layer 1 group 1
    assert torch.equal(pruned.model.language_model.layers[0].self_attn.v_proj.weight, m.model.language_model.layers[0].self_attn.v_proj.weight[32:])
    assert torch.equal(pruned.model.language_model.layers[1].self_attn.v_proj.weight, m.model.language_model.layers[1].self_attn.v_proj.weight[:32])


def test_text_only_sequence_classifier(setup):
    tok, _, _ = setup
    model, tok = build_tiny_seq_cls(None, [], preset="vlm-teacher", tokenizer=tok, seed=2)
    enc = tok(["a red circle", "two blue squares at the top"], return_tensors="pt", padding=True)
    imp = collect_importance(model, lambda m: m(**enc))
    assert "vision.hidden" not in imp
    same = prune_widths(model, {}, imp)
    with torch.no_grad():
        assert torch.equal(same(**enc).logits, model.eval()(**enc).logits)
    small = prune_widths(model, {"hidden_size": 64, "intermediate_size": 96}, imp)
    assert small.config.hidden_size == 64 and small.score.weight.shape == (1, 64)
    with torch.no_grad():
        assert small(**enc).logits.shape == (2, 1)


def test_bad_widths_are_named(setup):
    _, model, batch = setup
    with pytest.raises(PruneError, match="'text_config.hiden_size' cannot be pruned"):
        parse_widths(model, {"text_config.hiden_size": 64})
    with pytest.raises(PruneError, match="'text_config.head_dim' cannot be pruned"):
        parse_widths(model, {"text_config.head_dim": 16})
    with pytest.raises(PruneError, match="hidden_size=256 is wider than the model's 128"):
        parse_widths(model, {"text_config.hidden_size": 256})
    with pytest.raises(PruneError, match="3 query heads over 2 key/value heads"):
        parse_widths(model, {"text_config.num_attention_heads": 3})
    with pytest.raises(PruneError, match="must be a positive integer"):
        parse_widths(model, {"text_config.intermediate_size": 0})
    with pytest.raises(PruneError, match=r"vision hidden_size 32 must be num_heads x the vision head size \(4 x 16 = 64\)"):
        parse_widths(model, {"vision_config.hidden_size": 32})
    with pytest.raises(PruneError, match="supports qwen3_vl and qwen3 models, not 'qwen2_5_vl'"):
        other, _ = build_tiny_vlm(None, [], kind="qwen2_5_vl", preset="vlm-nano", tokenizer=setup[0])
        parse_widths(other, {})
    with pytest.raises(PruneError, match="calibration ran no forward pass"):
        collect_importance(model, lambda m: None)
    with pytest.raises(PruneError, match="no images"):
        collect_importance(model, lambda m: m(input_ids=batch["input_ids"][:, :5]))
