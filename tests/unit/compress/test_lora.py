"""LoRA on tiny real Qwen-VL models: targets, training, adapter folders, merging."""

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmdistill.compress.lora import (
    LoraSettings,
    apply_lora,
    merge_adapter,
    resolve_targets,
    save_adapter,
    trainable_summary,
)
from mmdistill.models.tiny import build_tiny_vlm, train_qwen_tokenizer

torch.set_num_threads(2)

TEXTS = [
    f"{q} {a}"
    for q in ("What shape is at the top?", "Which colour is the circle?", "How many stars are there?", "Is the square left of the star?", "Describe the image.")
    for a in ("a red star", "the blue circle is small", "two green squares", "yes it is on the left", "a yellow triangle at the bottom", "three shapes on a white background", "no", "star", "circle", "square")
]


@pytest.fixture(scope="module")
def tok():
    return train_qwen_tokenizer(TEXTS)


def _image():
    img = Image.new("RGB", (64, 64), "white")
    for x in range(16, 48):
        for y in range(20, 44):
            img.putpixel((x, y), (200, 30, 30))
    return img


def _batch(proc):
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
        {"role": "assistant", "content": "star"},
    ]
    text = proc.apply_chat_template(msgs, tokenize=False)
    return proc(text=[text], images=[_image()], return_tensors="pt")


def _lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _base_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _train(peft_model, batch, steps=3, lr=0.5):
    peft_model.train()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = peft_model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()


# ---------------------------------------------------------------------------------------------
# apply_lora / resolve_targets


def test_apply_lora_only_lora_trainable_and_language_only(tok):
    model, _ = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-nano", tokenizer=tok)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # adapters on every requested LM module, none in the vision tower
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert all(".language_model." in n for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "v_proj", "down_proj"}
    assert not any("visual" in n for n, _ in peft_model.named_modules() if "lora_" in n)
    for n, m in peft_model.named_modules():
        if ".visual." in n:
            assert not hasattr(m, "lora_A"), n
    s = trainable_summary(peft_model)
    assert s["trainable"] == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert 0 < s["trainable"] < s["total"]
    assert s["percent"] == pytest.approx(100 * s["trainable"] / s["total"])


def test_language_only_off_adapts_vision_names_too(tok):
    """Qwen2.5-VL's vision MLP reuses gate/up/down_proj: language_only keeps them out."""
    model, _ = build_tiny_vlm(None, [], kind="qwen2_5_vl", preset="vlm-nano", tokenizer=tok)
    only = LoraSettings(target_modules=["down_proj"])
    both = LoraSettings(target_modules=["down_proj"], language_only=False)
    assert isinstance(resolve_targets(model, only), str)
    assert resolve_targets(model, both) == ["down_proj"]
    peft_model = apply_lora(model, both)
    adapted = {n.split(".lora_")[0] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".visual." in n for n in adapted) and any(".language_model." in n for n in adapted)


def test_missing_target_module_is_a_clear_error(tok):
    model, _ = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-nano", tokenizer=tok)
    with pytest.raises(ValueError) as ei:
        apply_lora(model, LoraSettings(target_modules=["q_proj", "foo_proj"]))
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("LoRA target module 'foo_proj' not found in Qwen3VLForConditionalGeneration; linear modules available: ")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg
    # a vision-only name is not in scope with language_only
    with pytest.raises(ValueError, match="'qkv' not found"):
        resolve_targets(model, LoraSettings(target_modules=["qkv"]))
    assert resolve_targets(model, LoraSettings(target_modules=["qkv"], language_only=False)) == ["qkv"]
    # nothing was wrapped by the failed call
    assert not any("lora_" in n for n, _ in model.named_modules())


# ---------------------------------------------------------------------------------------------
# training, saving, merging


def test_sgd_steps_change_lora_weights_only(tok):
    model, proc = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-nano", tokenizer=tok)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    batch = _batch(proc)
    lora0, base0 = _lora_params(peft_model), _base_params(peft_model)
    assert lora0 and base0
    _train(peft_model, batch)
    lora1, base1 = _lora_params(peft_model), _base_params(peft_model)
    assert lora1.keys() == lora0.keys()
    for n in lora0:  # B starts at zero (its grad is nonzero), A moves once B is nonzero
        assert not torch.equal(lora0[n], lora1[n]), n
    for n in base0:
        assert torch.equal(base0[n], base1[n]), n


@pytest.mark.parametrize("kind", ["qwen3_vl", "qwen2_5_vl"])
def test_save_adapter_and_merge_match_peft_logits(tok, tmp_path, kind):
    base_dir = tmp_path / "base"
    build_tiny_vlm(base_dir, [], kind=kind, preset="vlm-nano", tokenizer=tok)
    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    proc = AutoProcessor.from_pretrained(base_dir)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    batch = _batch(proc)
    _train(peft_model, batch)

    adapter = save_adapter(peft_model, tmp_path / "adapter", processor=proc)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir.resolve())
    assert (adapter / "tokenizer_config.json").is_file()
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys) and not any("visual" in k for k in keys)

    with torch.no_grad():
        expected = peft_model(**batch).logits
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    assert merged_dir == tmp_path / "merged"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    merged_proc = AutoProcessor.from_pretrained(merged_dir)
    assert type(merged).__name__ == type(model).__name__
    for f in merged_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            assert not any("lora_" in k for k in sf.keys())
    with torch.no_grad():
        got = merged(**_batch(merged_proc)).logits
    assert torch.allclose(got, expected, atol=1e-5)
    # the LoRA update is really in there: the plain base gives other logits
    with torch.no_grad():
        plain = AutoModelForImageTextToText.from_pretrained(base_dir).eval()(**batch).logits
    assert not torch.allclose(plain, expected, atol=1e-5)


def test_merge_with_explicit_base_and_overwrite(tok, tmp_path):
    """A model built from a config has no path: save_adapter records none, merge takes base_model."""
    base_dir = tmp_path / "base"
    model, proc = build_tiny_vlm(base_dir, [], kind="qwen3_vl", preset="vlm-nano", tokenizer=tok)
    peft_model = apply_lora(model, LoraSettings(r=2, alpha=4))
    adapter = save_adapter(peft_model, tmp_path / "adapter")  # no processor: merged takes the base's
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None
    with pytest.raises(FileNotFoundError, match="records no base_model_name_or_path"):
        merge_adapter(adapter, tmp_path / "merged")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merge_adapter(adapter, out, base_model=base_dir)
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    AutoModelForImageTextToText.from_pretrained(out)


def test_merge_error_cases(tok, tmp_path):
    not_adapter = tmp_path / "plain"
    not_adapter.mkdir()
    (not_adapter / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder.*adapter_config.json"):
        merge_adapter(not_adapter, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        merge_adapter(tmp_path / "missing", tmp_path / "out")
    # an adapter whose recorded base is gone
    model, _ = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-nano", tokenizer=tok)
    adapter = save_adapter(apply_lora(model, LoraSettings(r=2)), tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="base model .*gone.* not found"):
        merge_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
