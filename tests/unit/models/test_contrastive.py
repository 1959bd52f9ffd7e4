"""Tiny CLIP builders, loading through the real from_pretrained path, students by scratch and inheritance."""

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from mmdistill.models import contrastive as cm

TEXTS = [f"a {s} {c} {k} at the {p}" for s in ("small", "large") for c in ("red", "blue", "green") for k in ("circle", "square") for p in ("top left", "center")]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    model, proc = cm.build_tiny_clip(d, TEXTS, preset="clip-nano", image_size=32, patch_size=8, overrides={"vision_config.num_hidden_layers": 3, "text_config.num_hidden_layers": 3})
    return d, model, proc


def _batch(proc, n=3):
    from PIL import Image

    imgs = [Image.new("RGB", (32, 32), (40 * i, 100, 200)) for i in range(n)]
    pv = cm.preprocess_images(proc, imgs)
    t = cm.preprocess_texts(proc, TEXTS[:n])
    return {"pixel_values": pv, **t}


def test_tiny_clip_roundtrips_through_auto_classes(teacher):
    d, model, _ = teacher
    loaded = AutoModel.from_pretrained(d)
    proc = AutoProcessor.from_pretrained(d)
    assert type(loaded).__name__ == "CLIPModel"
    b = _batch(proc)
    model.eval(), loaded.eval()
    with torch.no_grad():
        s1, s2 = cm.encode(model, b, features=True), cm.encode(loaded, b, features=True)
    assert torch.allclose(s1.image_embeds, s2.image_embeds, atol=1e-6)
    assert s1.text_embeds.shape == (3, cm.embed_dim(model))
    assert set(s1.features) == {"vision_pooled", "text_pooled"}
    # the tokenizer frames text with BOS/EOS and the model pools at EOS (not the legacy id 2 path)
    assert loaded.config.text_config.eos_token_id == proc.tokenizer.eos_token_id != 2
    assert (b["input_ids"] == proc.tokenizer.eos_token_id).sum(1).eq(1).all()


def test_inherit_all_layers_reproduces_teacher(teacher):
    _, model, proc = teacher
    full = cm.inherit_student(model, {"vision": [0, 1, 2], "text": [0, 1, 2]})
    b = _batch(proc)
    model.eval(), full.eval()
    with torch.no_grad():
        a, c = cm.encode(model, b), cm.encode(full, b)
    assert torch.allclose(a.image_embeds, c.image_embeds, atol=1e-5)
    assert torch.allclose(a.text_embeds, c.text_embeds, atol=1e-5)


def test_inherit_layer_subset_copies_chosen_layers(teacher):
    _, model, _ = teacher
    s = cm.inherit_student(model, {"vision": [0, 2], "text": [1]})
    assert s.config.vision_config.num_hidden_layers == 2 and s.config.text_config.num_hidden_layers == 1
    t_sd, s_sd = model.state_dict(), s.state_dict()
    k = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    assert torch.equal(s_sd[k], t_sd["vision_model.encoder.layers.2.self_attn.q_proj.weight"])
    k = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(s_sd[k], t_sd["text_model.encoder.layers.1.mlp.fc1.weight"])


def test_inherit_narrower_slices_and_wider_refused(teacher):
    _, model, _ = teacher
    s = cm.inherit_student(model, {"vision": [0]}, {"vision_config.intermediate_size": 16})
    w = s.state_dict()["vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert w.shape[0] == 16
    assert torch.equal(w, model.state_dict()["vision_model.encoder.layers.0.mlp.fc1.weight"][:16])
    with pytest.raises(cm.PairingError, match="larger than the teacher"):
        cm.inherit_student(model, {"vision": [0]}, {"vision_config.intermediate_size": 4096})
    with pytest.raises(cm.PairingError, match="distinct indices"):
        cm.inherit_student(model, {"vision": [0, 7]})


def test_scratch_student_is_smaller_and_overrides_are_checked(teacher):
    _, model, _ = teacher
    s = cm.scratch_student(model.config, {"vision_config.num_hidden_layers": 1, "text_config.num_hidden_layers": 1})
    assert sum(p.numel() for p in s.parameters()) < sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="has no 'hiden_size'"):
        cm.scratch_student(model.config, {"vision_config.hiden_size": 8})


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        cm.load_model(str(tmp_path / "nope"))


def test_siglip_goes_through_the_same_adapter():
    """Any dual encoder with get_image_features / get_text_features: a tiny random SiglipModel."""
    from transformers import SiglipConfig, SiglipModel

    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    cfg = SiglipConfig(text_config=dict(tower, vocab_size=100, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0), vision_config=dict(tower, image_size=32, patch_size=8))
    torch.manual_seed(0)
    model = SiglipModel(cfg).eval()
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    with torch.no_grad():
        sig = cm.encode(model, batch, features=True)
    assert sig.image_embeds.shape == (2, 32) and sig.text_embeds.shape == (2, 32)
    assert sig.logit_scale.ndim == 0 and float(sig.logit_scale) > 0
    assert cm.embed_dim(model) == 32
    small = cm.inherit_student(model, {"vision": [1], "text": [0]})
    assert small.config.vision_config.num_hidden_layers == 1
    assert torch.equal(small.state_dict()["vision_model.encoder.layers.0.mlp.fc1.weight"], model.state_dict()["vision_model.encoder.layers.1.mlp.fc1.weight"])
