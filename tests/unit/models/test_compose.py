"""A LLaVA student composed from a tiny SigLIP/CLIP vision tower + a tiny Qwen3 causal LM."""

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from mmdistill.models import compose as cp

TEXTS = [f"a {s} {c} {k} at the {p}" for s in ("small", "large") for c in ("red", "blue", "green") for k in ("circle", "square") for p in ("top left", "center")]
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
]


@pytest.fixture(scope="module", params=["siglip", "clip"])
def composed(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"parts-{request.param}")
    parts = cp.build_tiny_parts(d, TEXTS, vision=request.param)
    model, proc = cp.compose_vlm(parts["vision"], parts["language"], seed=0)
    return request.param, parts, model, proc


def _inputs(proc, messages=MESSAGES, add_generation_prompt=False):
    text = proc.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    return proc(images=[image], text=[text], return_tensors="pt")


def test_parts_weights_are_copied(composed):
    kind, parts, model, proc = composed
    tower = AutoModel.from_pretrained(parts["vision"])
    assert type(tower).__name__ == ("SiglipVisionModel" if kind == "siglip" else "CLIPVisionModel")
    v_sd, t_sd = model.model.vision_tower.state_dict(), tower.state_dict()
    assert set(v_sd) == set(t_sd)
    assert all(torch.equal(v_sd[k], t_sd[k]) for k in t_sd)

    lm = AutoModelForCausalLM.from_pretrained(parts["language"])
    old = lm.config.vocab_size
    l_sd, src = model.model.language_model.state_dict(), lm.model.state_dict()
    assert set(l_sd) == set(src)
    for k, v in src.items():
        if k == "embed_tokens.weight":
            continue
        assert torch.equal(l_sd[k], v), k
    emb = l_sd["embed_tokens.weight"]
    assert emb.shape[0] == old + 1 == len(proc.tokenizer)
    assert torch.equal(emb[:old], src["embed_tokens.weight"])
    # the added image token's row is the mean embedding; the tied head follows
    assert torch.allclose(emb[model.config.image_token_id], src["embed_tokens.weight"].mean(0))
    assert torch.equal(model.lm_head.weight, emb)


def test_config_and_processor_wiring(composed):
    kind, _, model, proc = composed
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.vision_config.model_type == ("siglip_vision_model" if kind == "siglip" else "clip_vision_model")
    assert cfg.text_config.model_type == "qwen3"
    assert cfg.vision_feature_select_strategy == ("full" if kind == "siglip" else "default")
    assert type(proc).__name__ == "LlavaProcessor"
    assert proc.image_token == "<image>" and "<image>" in proc.tokenizer.all_special_tokens
    assert proc.image_token_id == cfg.image_token_id == proc.tokenizer.convert_tokens_to_ids("<image>")
    assert cfg.text_config.vocab_size == len(proc.tokenizer)
    text = proc.apply_chat_template(MESSAGES[:1], add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\nwhat shape is it?<|im_end|>\n<|im_start|>assistant\n"


def test_processor_expands_image_token(composed):
    _, _, model, proc = composed
    enc = _inputs(proc)
    assert enc["pixel_values"].shape == (1, 3, 64, 64)
    # 64x64 image, 8x8 patches -> 64 patch features (CLIP's CLS is dropped by the "default" strategy)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 64
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
    assert feats[0].shape == (64, model.config.text_config.hidden_size)


def test_forward_loss_and_generate(composed):
    _, _, model, proc = composed
    enc = _inputs(proc)
    labels = enc["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    out = model(**enc, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in cp.projector_parameters(model))
    model.zero_grad(set_to_none=True)
    gen_in = _inputs(proc, MESSAGES[:1], add_generation_prompt=True)
    with torch.no_grad():
        ids = model.generate(**gen_in, max_new_tokens=3, do_sample=False)
    assert ids.shape[1] <= gen_in["input_ids"].shape[1] + 3
    assert ids.shape[1] > gen_in["input_ids"].shape[1]


def test_save_reload_through_auto_classes(composed, tmp_path):
    _, _, model, proc = composed
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    lproc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration" and type(lproc).__name__ == "LlavaProcessor"
    assert lproc.image_token == proc.image_token and lproc.image_token_id == proc.image_token_id
    a, b = _inputs(proc), _inputs(lproc)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**a).logits, loaded(**b).logits)


def _sgd_steps(model, proc, n=3):
    enc = _inputs(proc)
    labels = enc["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(n):
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()


def _changed(before, model):
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture()
def fresh(tmp_path):
    parts = cp.build_tiny_parts(tmp_path, TEXTS, vision="siglip")
    return cp.compose_vlm(parts["vision"], parts["language"], seed=1)


def test_align_trains_only_the_projector(fresh):
    model, proc = fresh
    n = cp.freeze_for_stage(model, "align")
    assert n == sum(p.numel() for p in cp.projector_parameters(model)) > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _sgd_steps(model, proc)
    changed = _changed(before, model)
    projector = {k for k in before if k.startswith("model.multi_modal_projector.")}
    assert changed == projector


def test_joint_trains_lm_not_vision(fresh):
    model, proc = fresh
    n_joint = cp.freeze_for_stage(model, "joint")
    n_vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert n_joint == total - n_vision
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _sgd_steps(model, proc)
    changed = _changed(before, model)
    assert not any(k.startswith("model.vision_tower.") for k in changed)
    assert any(k.startswith("model.language_model.layers.") for k in changed)
    assert "model.language_model.embed_tokens.weight" in changed
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert cp.freeze_for_stage(model, "all") == total


def test_unknown_stage(fresh):
    with pytest.raises(ValueError, match="align"):
        cp.freeze_for_stage(fresh[0], "stage3")


def test_model_objects_and_dual_encoder_tower(tmp_path):
    """Parts passed as model objects; a full SiglipModel gives its vision half."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    parts = cp.build_tiny_parts(tmp_path, TEXTS, vision="siglip")
    tower_cfg = AutoModel.from_pretrained(parts["vision"]).config
    text_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    full = SiglipModel(SiglipConfig(text_config=text_cfg, vision_config=tower_cfg.to_dict()))
    lm = AutoModelForCausalLM.from_pretrained(parts["language"])
    tok = AutoProcessor.from_pretrained(parts["language"])
    model, proc = cp.compose_vlm(full, lm, tokenizer=tok, image_processor=SiglipImageProcessor(size={"height": 64, "width": 64}))
    v_sd, f_sd = model.model.vision_tower.state_dict(), full.vision_model.state_dict()
    assert set(v_sd) == set(f_sd) and all(torch.equal(v, v_sd[k]) for k, v in f_sd.items())
    assert lm.config.vocab_size == len(tok)  # the caller's LM and tokenizer are left alone
    out = model(**_inputs(proc))
    assert torch.isfinite(out.logits).all()


def test_clear_errors(tmp_path):
    parts = cp.build_tiny_parts(tmp_path, TEXTS, vision="siglip")
    with pytest.raises((ValueError, FileNotFoundError), match="not a causal language model"):
        cp.compose_vlm(parts["vision"], parts["vision"])
    with pytest.raises(ValueError, match="not a vision tower"):
        cp.compose_vlm(parts["language"], parts["language"])
    with pytest.raises(FileNotFoundError, match="cannot load"):
        cp.compose_vlm(tmp_path / "nope", parts["language"])
    with pytest.raises(ValueError, match="causal LM"):
        cp.compose_vlm(parts["vision"], AutoModel.from_pretrained(parts["vision"]))
    with pytest.raises(ValueError, match="siglip"):
        cp.build_tiny_parts(tmp_path / "x", TEXTS, vision="vit")
