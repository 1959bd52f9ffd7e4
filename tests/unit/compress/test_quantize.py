"""Post-training quantization through torchao (compress.quantize): close outputs, plain reload, smaller files."""

import builtins
import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from mmdistill.compress.quantize import QuantizeError, folder_size, quantize_folder
from mmdistill.models.tiny import build_tiny_moe_lm, build_tiny_vlm, train_qwen_tokenizer

torch.set_num_threads(2)

# relative L2 error of the logits vs fp32 allowed per method (measured ~0.03 int8, ~0.2 int4 on these random models)
BOUND = {"int8-dynamic": 0.1, "int8-weight": 0.1, "int4-weight": 0.5}


@pytest.fixture(scope="module")
def tok():
    return train_qwen_tokenizer(["a red circle on the left of a blue square", "what color is the triangle? green"] * 60, vocab_size=400)


@pytest.fixture(scope="module")
def moe_lm(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_lm")
    model, _ = build_tiny_moe_lm(d, [], tokenizer=tok, preset="vlm-teacher", num_experts=8, seed=1)
    ids = torch.randint(0, len(tok) - 20, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.eval()(input_ids=ids).logits
    return d, ids, ref


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


def _uninstalled(monkeypatch, package: str) -> None:
    """Imports of `package` fail from now on in this test, as if it were not installed."""
    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith(package):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight", "int4-weight"])
def test_moe_lm_quantized_is_close_reloads_and_shrinks(moe_lm, method, tmp_path):
    src, ids, ref = moe_lm
    before = _digest(src)
    summary = quantize_folder(src, tmp_path / "q", method)
    assert _digest(src) == before  # the input folder is untouched
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()  # plain transformers (+ torchao installed)
    experts = again.model.layers[0].mlp.experts
    assert type(experts.gate_up_proj).__name__ != "Parameter" or type(experts.gate_up_proj.data).__name__ != "Tensor"
    assert "Int" in type(again.model.layers[0].self_attn.q_proj.weight).__name__
    with torch.no_grad():
        out = again(input_ids=ids).logits
    err = _rel(out, ref)
    assert 0 < err < BOUND[method], err
    assert summary["quantized_size_bytes"] == folder_size(tmp_path / "q") < 0.4 * folder_size(src)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()


def test_int4_is_coarser_than_int8(moe_lm, tmp_path):
    src, ids, ref = moe_lm
    errs = {}
    for method in ("int8-weight", "int4-weight"):
        quantize_folder(src, tmp_path / method, method)
        with torch.no_grad():
            errs[method] = _rel(AutoModelForCausalLM.from_pretrained(tmp_path / method).eval()(input_ids=ids).logits, ref)
    assert errs["int4-weight"] > 2 * errs["int8-weight"]


@pytest.mark.parametrize("kind", ["qwen3_vl", "qwen3_vl_moe"])
def test_vlm_quantized_reloads_with_auto_image_text_to_text(tok, kind, tmp_path):
    model, _ = build_tiny_vlm(tmp_path / "fp32", [], kind=kind, preset="vlm-teacher", tokenizer=tok, seed=2)
    ids = torch.randint(0, len(tok) - 20, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        ref = model.eval()(**kw).logits
    quantize_folder(tmp_path / "fp32", tmp_path / "q", "int8-dynamic")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "q").eval()
    assert "Int8" in type(again.model.visual.blocks[0].attn.qkv.weight).__name__
    with torch.no_grad():
        assert 0 < _rel(again(**kw).logits, ref) < BOUND["int8-dynamic"]
    assert (tmp_path / "q" / "preprocessor_config.json").is_file() or (tmp_path / "q" / "processor_config.json").is_file()


def test_store_dtype_bf16_halves_the_unquantized_matrices_and_loads_back_fp32(tok, tmp_path):
    from safetensors import safe_open

    from mmdistill.models.generative import load_vlm

    model, _ = build_tiny_vlm(tmp_path / "fp32", [], kind="qwen3_vl", preset="vlm-teacher", tokenizer=tok, seed=3)
    ids = torch.randint(0, len(tok) - 20, (2, 12), generator=torch.Generator().manual_seed(2))
    kw = {"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids)}
    full = quantize_folder(tmp_path / "fp32", tmp_path / "q32", "int8-weight")
    half = quantize_folder(tmp_path / "fp32", tmp_path / "q16", "int8-weight", store_dtype="bfloat16")
    assert full["store_dtype"] == "float32" and "stored_bf16" not in full
    assert "model.language_model.embed_tokens.weight" in half["stored_bf16"] and "model.visual.patch_embed.proj.weight" in half["stored_bf16"]
    with safe_open(str(tmp_path / "q16" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored["model.language_model.embed_tokens.weight"] == "BF16" and stored["model.visual.patch_embed.proj.weight"] == "BF16"
    assert stored["model.language_model.norm.weight"] == "F32"  # 1-D weights stay fp32
    emb = model.model.language_model.embed_tokens.weight
    saved = emb.numel() * 2 + model.model.visual.patch_embed.proj.weight.numel() * 2
    assert half["quantized_size_bytes"] <= full["quantized_size_bytes"] - 0.9 * saved

    again, _ = load_vlm(str(tmp_path / "q16"))  # mmdistill's loader: the config's float32, by name
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "q16", dtype=torch.float32)
    ref32 = AutoModelForImageTextToText.from_pretrained(tmp_path / "q32").eval()
    for m in (again, plain):
        assert {p.dtype for p in m.parameters()} == {torch.float32}, (m is again, {n for n, p in m.named_parameters() if p.dtype != torch.float32})
        assert m.lm_head.weight is m.model.language_model.embed_tokens.weight  # still tied
        assert "Int8" in type(m.model.language_model.layers[0].self_attn.q_proj.weight).__name__
    with torch.no_grad():
        a, b = again.eval()(**kw).logits, ref32(**kw).logits
    assert a.dtype == torch.float32
    assert 0 < _rel(a, b) < 0.02  # bf16 rounding of the embeddings only
    with pytest.raises(QuantizeError, match="torchao methods"):
        quantize_folder(tmp_path / "fp32", tmp_path / "qb", "bnb-int8", store_dtype="bfloat16")
    with pytest.raises(QuantizeError, match="store dtype"):
        quantize_folder(tmp_path / "fp32", tmp_path / "qb", "int8-weight", store_dtype="fp8")


def test_bad_quantize_requests(moe_lm, tmp_path, monkeypatch):
    src, _, _ = moe_lm
    with pytest.raises(QuantizeError, match="unknown"):
        quantize_folder(src, tmp_path / "q", "int3")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        quantize_folder(tmp_path / "missing", tmp_path / "q", "int8-weight")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        quantize_folder(src, tmp_path / "full", "int8-weight")
    with pytest.raises(QuantizeError, match="input folder"):
        quantize_folder(src, src, "int8-weight")
    _uninstalled(monkeypatch, "torchao")
    with pytest.raises(QuantizeError, match=r"mmdistill\[quantize\]"):
        quantize_folder(src, tmp_path / "q", "int8-weight")


def test_int4_on_a_vlm_moe_with_biased_linears(tok, tmp_path):
    """The vision tower's Linear layers have biases: int4 must quantize their weights and leave the biases alone."""
    model, _ = build_tiny_vlm(tmp_path / "fp32", [], kind="qwen3_vl_moe", preset="vlm-student", tokenizer=tok, seed=3)
    ids = torch.randint(0, len(tok) - 20, (2, 12), generator=torch.Generator().manual_seed(2))
    kw = {"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        ref = model.eval()(**kw).logits
    quantize_folder(tmp_path / "fp32", tmp_path / "q", "int4-weight")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "q").eval()
    qkv = again.model.visual.blocks[0].attn.qkv
    assert "Intx" in type(qkv.weight).__name__ and type(qkv.bias).__name__ == "Parameter"
    assert "Int8" in type(again.model.language_model.layers[0].mlp.experts.down_proj).__name__
    with torch.no_grad():
        assert 0 < _rel(again(**kw).logits, ref) < BOUND["int4-weight"]


# bitsandbytes (the `bnb` extra): measured ~0.01 (LLM.int8) and ~0.1 (nf4) on these random models
BNB_BOUND = {"bnb-int8": 0.1, "bnb-nf4": 0.5}


@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_vlm_is_close_reloads_plainly_and_matches_bnb(tok, method, tmp_path):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    model, _ = build_tiny_vlm(tmp_path / "fp32", [], kind="qwen3_vl", preset="vlm-teacher", tokenizer=tok, seed=2)
    ids = torch.randint(0, len(tok) - 20, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        ref = model.eval()(**kw).logits
    w = model.model.language_model.layers[0].mlp.down_proj.weight.detach().clone()
    summary = quantize_folder(tmp_path / "fp32", tmp_path / "q", method)
    assert summary["backend"] == "bitsandbytes" and summary["quantized_modules"] > 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_8bit" if method == "bnb-int8" else "load_in_4bit"]
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "q").eval()  # plain transformers (+ bitsandbytes installed)
    layer = again.model.language_model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if method == "bnb-int8" else bnb.nn.Linear4bit)
    # before any forward (bitsandbytes' CPU path repacks 4-bit weights for its kernel on the first call)
    if method == "bnb-nf4":
        # the stored weight is bitsandbytes' own NF4 of the fp32 weight (blocks of 64), packed two values per byte
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state), F.dequantize_4bit(q, state))
        assert layer.weight.data.numel() == w.numel() // 2
    else:
        assert torch.equal(layer.weight.data, F.int8_vectorwise_quant(w.half())[0])  # LLM.int8's row-wise absmax int8 weights
    with torch.no_grad():
        err = _rel(again(**kw).logits, ref)
    assert 0 < err < BNB_BOUND[method], err
    from mmdistill.evaluate.bench import count_parameters

    assert count_parameters(again) == count_parameters(model)  # logical elements, not the packed bytes
    if method == "bnb-nf4":
        torchao_int8 = quantize_folder(tmp_path / "fp32", tmp_path / "int8", "int8-weight")
        assert summary["quantized_size_bytes"] < torchao_int8["quantized_size_bytes"]  # 4 bits a weight on disk, unlike int4-weight


def test_bitsandbytes_on_a_moe_leaves_experts_and_says_so(moe_lm, tmp_path):
    src, ids, ref = moe_lm
    summary = quantize_folder(src, tmp_path / "q", "bnb-int8")
    assert summary["moe_experts_quantized"] is False and "experts" in summary["note"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert type(again.model.layers[0].mlp.experts.down_proj.data).__name__ == "Tensor"
    assert type(again.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    with torch.no_grad():
        assert 0 < _rel(again(input_ids=ids).logits, ref) < BNB_BOUND["bnb-int8"]


def test_bitsandbytes_missing_is_one_line(moe_lm, tmp_path, monkeypatch):
    src, _, _ = moe_lm
    _uninstalled(monkeypatch, "bitsandbytes")
    with pytest.raises(QuantizeError, match=r"mmdistill\[bnb\]"):
        quantize_folder(src, tmp_path / "q", "bnb-nf4")


def test_calibration_texts_from_chat_rerank_and_text_files(tmp_path):
    from mmdistill.compress.quantize import calibration_texts

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"image": "x.png", "prompt": f"What is {i}?", "response": f"it is {i}"}) + "\n" for i in range(10)))
    assert calibration_texts(chat, 3) == ["What is 0?\nit is 0", "What is 1?\nit is 1", "What is 2?\nit is 2"]
    rerank = tmp_path / "rerank.jsonl"
    rerank.write_text("".join(json.dumps({"instruction": "Find it.", "query": {"text": f"q{i}"}, "documents": [{"text": "d1"}, {"image": "a.png"}, "d2"]}) + "\n" for i in range(9)))
    assert calibration_texts(rerank, 100)[0] == "Find it.\nq0\nd1\nd2"
    lines = tmp_path / "cal.txt"
    lines.write_text("\n".join(f"line {i}" for i in range(12)) + "\n\n")
    assert len(calibration_texts(lines, 100)) == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat.read_text() + "{not json\n")
    with pytest.raises(QuantizeError, match=r"bad.jsonl:11: not JSON"):
        calibration_texts(bad, 100)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(chat.read_text().splitlines(keepends=True)[:5]))
    with pytest.raises(QuantizeError, match="5 text sample.*at least 8"):
        calibration_texts(few, 100)


def test_gptq_requests_without_calibration_or_library_are_one_line(moe_lm, tmp_path, monkeypatch):
    src, _, _ = moe_lm
    with pytest.raises(QuantizeError, match="pass --calibration"):
        quantize_folder(src, tmp_path / "q", "gptq-int4")
    (tmp_path / "cal.txt").write_text("\n".join(f"a red circle {i}" for i in range(10)))
    _uninstalled(monkeypatch, "gptqmodel")
    with pytest.raises(QuantizeError, match=r"mmdistill\[gptq\]"):
        quantize_folder(src, tmp_path / "q", "awq-int4", calibration=tmp_path / "cal.txt")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("method,kind", [("gptq-int4", "qwen3_vl"), ("gptq-int4", "lm"), ("awq-int4", "lm")])
def test_gptq_and_awq_reload_plainly_and_stay_close(tok, method, kind, tmp_path):
    """GPTQ / AWQ through GPTQModel (the `gptq` extra; skipped where it is not installed, as in CI's dev install): a tiny
    Qwen3-VL or Qwen3 LM calibrated on text, its decoder Linear layers packed to 4 bits, reloaded by plain from_pretrained;
    AWQ refuses the VLM in one line."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from mmdistill.models.tiny import build_tiny_lm

    if kind == "lm":
        model, _ = build_tiny_lm(tmp_path / "fp32", [], preset="vlm-teacher", tokenizer=tok, seed=2)
        cls, layers = AutoModelForCausalLM, lambda m: m.model.layers
    else:
        model, _ = build_tiny_vlm(tmp_path / "fp32", [], kind="qwen3_vl", preset="vlm-teacher", tokenizer=tok, seed=2)
        cls, layers = AutoModelForImageTextToText, lambda m: m.model.language_model.layers
        if method == "awq-int4":
            with pytest.raises(QuantizeError, match="awq-int4 takes text-only causal LMs"):
                quantize_folder(tmp_path / "fp32", tmp_path / "q", method, calibration=tmp_path)
            return
    cal = tmp_path / "cal.txt"
    sentences = ["a red circle on the left of a blue square", "what color is the triangle? green"]
    cal.write_text("\n".join(f"{sentences[i % 2]} {i} {sentences[(i + 1) % 2]}" for i in range(32)))
    summary = quantize_folder(tmp_path / "fp32", tmp_path / "q", method, calibration=cal)
    assert summary["backend"] == "gptqmodel" and summary["calibration_samples"] == 32 and summary["group_size"] in (32, 64, 128)
    assert summary["quantized_modules"] == 7 * model.config.get_text_config().num_hidden_layers  # q, k, v, o, gate, up, down
    assert summary["quantized_size_bytes"] < 0.6 * summary["size_bytes"]
    ids = tok(["what color is the triangle? green 7 a red circle on the left of a blue square"], return_tensors="pt")["input_ids"]
    q = cls.from_pretrained(str(tmp_path / "q"), device_map="cpu").eval()
    assert "qweight" in dict(layers(q)[0].mlp.down_proj.named_buffers())
    with torch.no_grad():
        ref, got = model.eval()(input_ids=ids).logits, q(input_ids=ids).logits
    assert _rel(got, ref) < BOUND["int4-weight"]  # the bound torchao's round-to-nearest int4 meets above
    assert json.loads((tmp_path / "q" / "quantize.json").read_text())["method"] == method
