"""MoE expert pruning of tiny real Qwen3-MoE, Qwen3-VL-MoE and Qwen3-Omni thinker models (compress.experts)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from helpers import shapes_chat
from mmdistill.compress.experts import (
    ExpertPruneError,
    expert_saliency,
    experts_to_keep,
    moe_blocks,
    prune_experts,
    prune_moe,
    select_experts,
)
from mmdistill.data.records import read_records
from mmdistill.models import generative as gm
from mmdistill.models.tiny import build_tiny_moe_lm, build_tiny_vlm, make_processor, param_count

torch.set_num_threads(2)

KEPT = [1, 3, 4, 6]  # the experts the forced routers below use (of 8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "world"
    rows, tok = shapes_chat(out, n=24, seed=5, limit=120)
    records, _ = read_records(out / "chat_train.jsonl", "chat")
    texts = [r["prompt"] + " " + r["response"] for r in rows[:6]]
    ids = tok(texts, padding=True, return_tensors="pt")["input_ids"]  # [6, T]
    return tok, records[:4], ids


def force_routes(model, kept=KEPT):
    """Make every router pick its top-k among `kept` only, whatever the token (top-k = 2):
    rows v, -v, u, -u for the kept experts (two of them are positive for any input), 0 for the others."""
    torch.manual_seed(11)
    for block in moe_blocks(model).values():
        W = block.gate.weight
        H = W.shape[1]
        v, u = torch.randn(H), torch.randn(H)
        rows = torch.zeros_like(W)
        for e, r in zip(kept, (v, -v, u, -u)):
            rows[e] = 20 * r / r.norm()
        with torch.no_grad():
            W.copy_(rows)
    return model


def lm_logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def vlm_logits(model, batch):
    with torch.no_grad():
        return model.eval()(**gm.model_inputs(model, batch)).logits


@pytest.mark.parametrize("method", ["frequency", "reap", "reconstruction"])
def test_qwen3_moe_unrouted_experts_pruned_logits_match_and_reload(data, method, tmp_path):
    tok, _, ids = data
    model, _ = build_tiny_moe_lm(None, [], tokenizer=tok, num_experts=8, top_k=2, seed=1)
    force_routes(model.eval())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, info = prune_moe(model, lambda m: m(input_ids=ids), fraction=0.5, method=method)
    # every method finds the four experts the routers never use to be the least salient
    assert all(v == KEPT for v in info["kept"].values())
    assert pruned.config.num_experts == 4 and pruned.config.num_experts_per_tok == 2
    assert model.config.num_experts == 8 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert param_count(pruned) < param_count(model)
    block = moe_blocks(pruned)[0]
    assert block.gate.weight.shape == (4, 64) and block.experts.gate_up_proj.shape[0] == 4
    assert torch.equal(block.experts.down_proj, moe_blocks(model)[0].experts.down_proj[KEPT])
    ref = lm_logits(model, ids)
    assert torch.allclose(lm_logits(pruned, ids), ref, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("num_experts", saved.get("num_local_experts")) == 4 and saved["num_experts_per_tok"] == 2
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again).__name__ == "Qwen3MoeForCausalLM"
    assert torch.allclose(lm_logits(again, ids), ref, atol=1e-5)


def test_pruning_routed_experts_changes_the_output(data):
    """The match above is not vacuous: dropping experts that are routed moves the logits."""
    tok, _, ids = data
    model = force_routes(build_tiny_moe_lm(None, [], tokenizer=tok, num_experts=8, top_k=2, seed=1)[0].eval())
    wrong = prune_experts(model, {i: [0, 1, 2, 3] for i in moe_blocks(model)})
    assert not torch.allclose(lm_logits(wrong, ids), lm_logits(model, ids), atol=1e-3)


def _captured_input(model, ids, layer=0):
    block = moe_blocks(model)[layer]
    seen = []
    h = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
    lm_logits(model, ids)
    h.remove()
    return block, seen[0]


@pytest.mark.parametrize("norm", [True, False])
def test_saliency_matches_the_models_own_routing_and_experts(data, norm):
    tok, _, ids = data
    model = build_tiny_moe_lm(None, [], tokenizer=tok, num_experts=8, top_k=2, norm_topk_prob=norm, seed=2)[0].eval()
    with torch.no_grad():  # a trained-looking router (the random init is near-uniform)
        for block in moe_blocks(model).values():
            block.gate.weight.normal_(0, 0.5)
    sal = expert_saliency(model, lambda m: m(input_ids=ids))
    block, x = _captured_input(model, ids)
    N = x.shape[0]
    with torch.no_grad():
        _, weights, idx = block.gate(x)  # the model's own router: [N, k]
        freq = torch.bincount(idx.reshape(-1), minlength=8).float() / N
        reap = torch.zeros(8)
        for e in range(8):
            t, slot = (idx == e).nonzero(as_tuple=True)
            if len(t):
                # the model's experts module, one expert at weight 1, gives expert e's output
                y = block.experts(x[t], torch.full((len(t), 1), e), torch.ones(len(t), 1))
                reap[e] = (weights[t, slot] * y.norm(dim=-1)).mean()
        full = block(x[None])[0]
        recon = torch.zeros(8)
        for e in range(8):  # the real pruned block without expert e
            alone = moe_blocks(prune_experts(model, {i: [j for j in range(8) if j != e] for i in moe_blocks(model)}))[0]
            recon[e] = ((full - alone(x[None])[0]) ** 2).sum() / N
    assert torch.allclose(sal["frequency"][0], freq)
    assert torch.allclose(sal["reap"][0], reap, atol=1e-5)
    assert torch.allclose(sal["reconstruction"][0], recon, rtol=1e-4, atol=1e-7)
    assert (freq > 0).sum() >= 4 and recon.max() > 0
    if not norm:  # without renormalisation removing even an unrouted expert rescales every token (docstring)
        unrouted = (freq == 0).nonzero().flatten()
        assert len(unrouted) == 0 or (recon[unrouted] > 0).all()


def test_top_k_is_lowered_to_the_kept_experts(data, tmp_path):
    tok, _, ids = data
    model = build_tiny_moe_lm(None, [], tokenizer=tok, num_experts=8, top_k=2, seed=3)[0].eval()
    assert experts_to_keep(model, 0.875) == 1
    one, info = prune_moe(model, lambda m: m(input_ids=ids), fraction=0.875, method="frequency")
    assert one.config.num_experts == 1 and one.config.num_experts_per_tok == 1 and info["num_experts_per_tok"] == [2, 1]
    assert torch.isfinite(lm_logits(one, ids)).all()
    one.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.num_experts_per_tok == 1


def test_bad_requests_are_clear_errors(data):
    tok, _, ids = data
    model = build_tiny_moe_lm(None, [], tokenizer=tok, num_experts=8, top_k=2, seed=3)[0].eval()
    for bad, match in [(0, "strictly between"), (1, "strictly between"), (1.5, "strictly between"), (-0.2, "strictly between"),
                       ("half", "strictly between"), (0.01, "removes none")]:
        with pytest.raises(ExpertPruneError, match=match):
            prune_moe(model, lambda m: m(input_ids=ids), fraction=bad)
    with pytest.raises(ExpertPruneError, match="unknown"):
        prune_moe(model, lambda m: m(input_ids=ids), fraction=0.5, method="magnitude")
    with pytest.raises(ExpertPruneError, match="no forward pass"):
        prune_moe(model, lambda m: None, fraction=0.5)
    with pytest.raises(ExpertPruneError, match="same number"):
        prune_experts(model, {0: [0, 1, 2], 1: [0, 1]})
    with pytest.raises(ExpertPruneError, match="distinct"):
        prune_experts(model, {0: [0, 0], 1: [0, 1]})
    dense, _ = build_tiny_vlm(None, [], kind="qwen3_vl", tokenizer=tok)
    with pytest.raises(ExpertPruneError, match="no MoE layers"):
        prune_moe(dense, lambda m: None, fraction=0.5)
    assert select_experts({0: torch.tensor([0.1, 0.5, 0.5, 0.0])}, 2) == {0: [1, 2]}


@pytest.mark.parametrize("kind", ["qwen3_vl_moe", "qwen3_omni_thinker"])
def test_vlm_moe_pruned_matches_on_images_and_reloads(data, kind, tmp_path):
    tok, records, _ = data
    model, _ = build_tiny_vlm(None, [], kind=kind, tokenizer=tok, seed=4, overrides={"text_config.num_experts": 8})
    force_routes(model.eval())
    proc = make_processor(kind, tok, image_size=64)
    batch = gm.encode_chat(proc, records, [r.load_images() for r in records])
    pruned, info = prune_moe(model, lambda m: gm.forward_signals(m, batch), fraction=0.5, method="reap")
    assert all(v == KEPT for v in info["kept"].values())
    tc = pruned.config.get_text_config()
    assert tc.num_experts == 4 and tc.num_experts_per_tok == 2
    ref = vlm_logits(model, batch)
    assert torch.allclose(vlm_logits(pruned, batch), ref, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(again) is type(model)
    assert torch.allclose(vlm_logits(again, batch), ref, atol=1e-5)
