"""Depth pruning (compress.depth): block importance, drop specs, surgery on tiny real models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from helpers import shapes_chat
from mmdistill.compress.depth import block_importance, drop_blocks, least_important, parse_drop_layers, prune_depth
from mmdistill.compress.prune import PruneError
from mmdistill.data.records import read_records
from mmdistill.models import generative as gm
from mmdistill.models.tiny import build_tiny_moe_lm, build_tiny_vlm, make_processor

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "world"
    rows, tok = shapes_chat(out, n=24, seed=6, limit=120)
    records, _ = read_records(out / "chat_train.jsonl", "chat")
    ids = tok([r["prompt"] + " " + r["response"] for r in rows[:6]], padding=True, return_tensors="pt")["input_ids"]
    return tok, records[:4], ids


def test_importance_is_one_minus_cosine_of_consecutive_hidden_states(data):
    tok, _, ids = data
    model = build_tiny_moe_lm(None, [], tokenizer=tok, preset="vlm-teacher", num_experts=4, seed=1)[0].eval()
    imp = block_importance(model, lambda m: m(input_ids=ids))
    assert set(imp) == {"text"} and imp["text"].shape == (4,)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings + 4 layers (the last after the norm)
    for i in range(3):
        a, b = hs[i].reshape(-1, 128), hs[i + 1].reshape(-1, 128)
        assert torch.allclose(imp["text"][i], (1 - torch.cosine_similarity(a, b, dim=-1)).mean(), atol=1e-5)
    assert least_important({"text": torch.tensor([0.3, 0.1, 0.2, 0.1])}, {"text": 2}) == {"text": [1, 3]}
    assert least_important({"text": torch.tensor([0.1, 0.1, 0.1, 0.5])}, {"text": 2}) == {"text": [1, 2]}  # ties: later first


def test_auto_drop_on_a_moe_lm_saves_and_reloads(data, tmp_path):
    tok, _, ids = data
    config = build_tiny_moe_lm(None, [], tokenizer=tok, preset="vlm-teacher", num_experts=4, seed=1)[0].config
    config.mlp_only_layers = [2]  # layer 2 dense: kept layers must keep their MLP kind
    torch.manual_seed(1)
    model = type(build_tiny_moe_lm(None, [], tokenizer=tok, num_experts=4)[0])(config).eval()
    small, info = drop_blocks(model, "auto:1", lambda m: m(input_ids=ids))
    (dropped,) = info["dropped"]["text"]
    assert dropped == min(range(4), key=lambda i: (info["importance"]["text"][i], -i))
    keep = [i for i in range(4) if i != dropped]
    assert small.config.num_hidden_layers == 3 and len(small.model.layers) == 3
    assert small.config.mlp_only_layers == [keep.index(2)] if 2 in keep else small.config.mlp_only_layers == []
    a, b = small.model.layers[0].state_dict(), model.model.layers[keep[0]].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, small.eval()(input_ids=ids).logits, atol=1e-5)


def test_explicit_text_and_vision_drops_keep_deepstack_consistent(data, tmp_path):
    tok, records, _ = data
    model, _ = build_tiny_vlm(None, [], kind="qwen3_vl_moe", preset="vlm-teacher", tokenizer=tok, seed=2,
                              overrides={"vision_config.deepstack_visual_indexes": [0, 1]})
    model.eval()
    proc = make_processor("qwen3_vl_moe", tok, image_size=64)
    batch = gm.encode_chat(proc, records, [r.load_images() for r in records])
    small, info = drop_blocks(model, "text:1,3;vision:0")
    tc, vc = small.config.text_config, small.config.vision_config
    assert tc.num_hidden_layers == 2 and vc.depth == 1 and vc.deepstack_visual_indexes == [0]
    assert len(small.model.visual.deepstack_merger_list) == 1
    # the kept deepstack merger is the one that read vision block 1
    assert torch.equal(small.model.visual.deepstack_merger_list[0].linear_fc1.weight, model.model.visual.deepstack_merger_list[1].linear_fc1.weight)
    with torch.no_grad():
        logits = small(**gm.model_inputs(small, batch)).logits
    small.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(**gm.model_inputs(again, batch)).logits, logits, atol=1e-5)
    # auto on both towers with images in the calibration data
    imp = block_importance(model, lambda m: gm.forward_signals(m, batch))
    assert imp["text"].shape == (4,) and imp["vision"].shape == (2,) and (imp["vision"] > 0).all()
    auto, _ = drop_blocks(model, "auto:text:2;vision:1", lambda m: gm.forward_signals(m, batch))
    assert auto.config.text_config.num_hidden_layers == 2 and auto.config.vision_config.depth == 1


def test_bad_depth_requests(data):
    tok, _, ids = data
    model = build_tiny_moe_lm(None, [], tokenizer=tok, num_experts=4, seed=1)[0].eval()  # 2 layers
    assert parse_drop_layers("auto:4") == (True, {"text": 4})
    assert parse_drop_layers("text:3,5;vision:1") == (False, {"text": [3, 5], "vision": [1]})
    for spec, match in [("auto:2", "every block"), ("text:0,1", "every block"), ("text:5", "below 2"), ("vision:0", "no vision tower"),
                        ("layers:1", "expected"), ("text:a", "not a list"), ("auto:text:1,2", "one count"), ("", "nothing to drop")]:
        with pytest.raises(PruneError, match=match):
            drop_blocks(model, spec, lambda m: m(input_ids=ids))
    with pytest.raises(PruneError, match="needs calibration"):
        drop_blocks(model, "auto:1")
    with pytest.raises(PruneError, match="no forward pass"):
        drop_blocks(model, "auto:1", lambda m: None)
    vlm, _ = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-teacher", tokenizer=tok)
    with pytest.raises(PruneError, match="did not reach the vision"):
        drop_blocks(vlm, "auto:vision:1", lambda m: m(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids)))
    assert prune_depth(model, {"text": [1]}).config.num_hidden_layers == 1
