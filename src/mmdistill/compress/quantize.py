"""Post-training quantization of a model folder through torchao and transformers' ``TorchAoConfig``.

Why torchao: it is PyTorch's maintained quantization library, it installs from PyPI as a wheel
(torchao 0.18.0 beside torch 2.14.1, checked on this CPU), and transformers integrates it both
ways: ``from_pretrained(..., quantization_config=TorchAoConfig(...))`` quantizes while loading, and
the quantized model saves to safetensors that a plain ``from_pretrained(folder)`` reloads (the
``quantization_config`` is written into config.json; torchao must be installed to load it).
optimum-quanto was the fallback; it was not needed.

bitsandbytes (the ``bnb`` extra) adds the formats most Hugging Face users already load with
``BitsAndBytesConfig``, through the same transformers integration, on CPU and on CUDA:

- ``bnb-int8``: LLM.int8() weights (``Linear8bitLt``; outlier activations above 6 kept in 16 bits);
- ``bnb-nf4``: 4-bit NormalFloat weights in blocks of 64 (``Linear4bit``), packed two per byte on disk
  (the smallest files of every method here), compute in fp32 on CPU, bf16 on CUDA.

Both quantize ``nn.Linear`` layers only (MoE experts stay full precision: bitsandbytes has no 3-D expert
format), save with ``save_pretrained``, and reload with a plain ``from_pretrained(folder)`` where
bitsandbytes is installed.

GPTQ and AWQ (the ``gptq`` extra: GPTQModel + optimum) calibrate 4-bit weights on data:

- ``gptq-int4``: GPTQ (second-order error compensation, layer by layer, on calibration activations);
- ``awq-int4``: AWQ (activation-aware per-channel scales before rounding), text-only causal LMs (Qwen3): GPTQModel
  7.7's AWQ failed on a tiny Qwen3-VL here (its scale search divides the per-head q/k norm weights by full-width
  scales), so a vision-language model is refused in one line, pointing to gptq-int4.

Both through GPTQModel, which runs its calibration and its packed int4 kernels on the CPU as on CUDA (checked here
on this 2-core CPU: GPTQModel 7.7 beside torch 2.14.1 and transformers 5.25), save the GPTQ / AWQ checkpoint
formats, and a plain ``from_pretrained(folder)`` reloads them where GPTQModel and optimum are installed. They
quantize the decoder's Linear layers (attention and MLP), in groups of 128 input features (64 or 32 where a width is
not a multiple); the vision tower, embeddings and head stay full precision. Calibration is text: the prompts and
responses of a chat JSONL, the instruction / query / document texts of a rerank JSONL, or the lines of a text file.
Why GPTQModel: it is the maintained successor of AutoGPTQ that transformers' GPTQ integration calls, and it covers
AWQ too (AutoAWQ is archived); llm-compressor 0.14 would have pinned torch 2.14.0 and transformers 5.17.

Methods (CPU):

- ``int8-dynamic``: int8 weights (per output channel) and int8 activations quantized per token at
  run time (``Int8DynamicActivationInt8WeightConfig``);
- ``int8-weight``: int8 weights, activations stay fp32 (``Int8WeightOnlyConfig``);
- ``int4-weight``: 4-bit weights in groups of 32 along the input (``IntxWeightOnlyConfig(int4)``).
  torchao 0.18's ``Int4WeightOnlyConfig`` has no CPU format (its packings need CUDA or the mslk
  kernels), so on CPU the int4 values are kept one per int8 byte: the accuracy of int4, the file
  size of int8. That is what this method gives today; it says so in its summary.

What is quantized: every ``nn.Linear`` (attention, dense MLPs, the vision tower and merger) except
the LM head / embeddings (``TorchAoConfig`` leaves input/output embeddings alone, so tied heads stay
tied). MoE experts (transformers stores them as fused 3-D tensors, not Linear layers) are quantized
too, by parameter name, with int8 weights for every method (int8-dynamic: int8 dynamic; torchao's
int4/intx configs take only 2-D weights, so under ``int4-weight`` experts are int8 weight-only).
torchao's quantized 3-D tensors run only through transformers' ``eager`` experts loop (not the
default ``grouped_mm``), so the saved config.json carries ``"experts_implementation": "eager"``,
which plain ``from_pretrained`` reads. For a MoE model the config lists every tensor to quantize by
name (torchao's ``FqnToConfig``); its ``_default`` key would also quantize Linear biases.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

TORCHAO_METHODS = ("int8-dynamic", "int8-weight", "int4-weight")
BNB_METHODS = ("bnb-int8", "bnb-nf4")
GPTQ_METHODS = ("gptq-int4", "awq-int4")
METHODS = TORCHAO_METHODS + BNB_METHODS + GPTQ_METHODS
MIN_CALIBRATION = 8
MIN_TOKENS = 10  # GPTQModel's calibration_data_min_length
INT4_GROUP = 32
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class QuantizeError(ValueError):
    """A quantization request that cannot run (unknown method, backend not installed, bad folder)."""


def _torchao():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import FqnToConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise QuantizeError("quantization needs torchao, which is not installed: pip install 'mmdistill[quantize]' (or pip install torchao)") from None
    return FqnToConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup


def torchao_config(method: str, *, linear_weights: list[str] | None = None):
    """transformers' TorchAoConfig for `method`.

    With `linear_weights` (a MoE model: the parameter names of its Linear weights), the config names
    every tensor to quantize: those weights plus the fused expert tensors. (FqnToConfig's ``_default``
    would also send the Linear layers' biases to the quantizer in transformers 5, which int4 rejects.)
    """
    from transformers import TorchAoConfig

    if method not in TORCHAO_METHODS:
        raise QuantizeError(f"torchao quantization method {method!r} is unknown; use one of {list(TORCHAO_METHODS)}")
    FqnToConfig, Int8Dynamic, Int8Weight, IntxWeight, PerGroup = _torchao()
    if method == "int8-dynamic":
        linear = experts = Int8Dynamic()
    elif method == "int8-weight":
        linear = experts = Int8Weight()
    else:
        linear, experts = IntxWeight(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP)), Int8Weight()
    if linear_weights is None:
        return TorchAoConfig(quant_type=linear)
    names: dict[str, Any] = {name: linear for name in linear_weights}
    names.update({r"re:.*experts\.gate_up_proj": experts, r"re:.*experts\.down_proj": experts})
    return TorchAoConfig(quant_type=FqnToConfig(names))


def _linear_weights(cls, config) -> list[str]:
    """Parameter names of the model's Linear weights (not a head tied to the embeddings), from a meta-device copy."""
    from torch import nn

    with torch.device("meta"):
        model = cls._from_config(config)
    embed = model.get_input_embeddings().weight
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is not embed]


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise QuantizeError(f"config.json names no model class transformers knows (architectures={getattr(config, 'architectures', None)})")


def _has_fused_experts(config) -> bool:
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(tc, "num_experts", 0))


def folder_size(path: str | Path) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.name.endswith(_WEIGHT_FILES))


def _bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizeError("bnb-int8 / bnb-nf4 need bitsandbytes, which is not installed: pip install 'mmdistill[bnb]' (or pip install bitsandbytes)") from None


def _gptqmodel():
    # GPTQModel's loader pool asks for 2 CPU workers, more than its default share of a 2-core machine (it then refuses
    # to load); an explicit count is its own documented switch
    if not os.environ.get("GPTQMODEL_CPU_WORKERS", "").strip().isdigit():
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, (os.cpu_count() or 2) // 2))
    try:
        import gptqmodel  # noqa: F401
        import optimum  # noqa: F401  (transformers' GPTQ loader asks for it)
    except ImportError:
        raise QuantizeError("gptq-int4 / awq-int4 need GPTQModel and optimum, which are not installed: pip install 'mmdistill[gptq]'") from None


def calibration_texts(path: str | Path, max_samples: int) -> list[str]:
    """Calibration texts from a chat / rerank JSONL (its text fields joined) or a text file (a sample a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {path}: no such file")
    texts: list[str] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if len(texts) >= max_samples:
            break
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            texts.append(line.strip())
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantizeError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise QuantizeError(f"{path}:{i}: a record must be a JSON object")
        parts = [rec.get(k) for k in ("instruction", "prompt", "text", "response")]
        query = rec.get("query")
        parts.append(query.get("text") if isinstance(query, dict) else query)
        parts += [d.get("text") if isinstance(d, dict) else d for d in rec.get("documents") or []]
        text = "\n".join(p for p in parts if isinstance(p, str) and p.strip())
        if text:
            texts.append(text)
    if len(texts) < min(MIN_CALIBRATION, max_samples):
        raise QuantizeError(f"calibration data {path}: {len(texts)} text sample(s); GPTQ / AWQ need at least {MIN_CALIBRATION}")
    return texts


def _group_size(config) -> int:
    """The largest of 128 / 64 / 32 that divides the decoder's widths (GPTQModel groups input features)."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    widths = [getattr(tc, k, None) for k in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    heads = getattr(tc, "num_attention_heads", None), getattr(tc, "head_dim", None)
    if all(heads):
        widths.append(heads[0] * heads[1])
    for g in (128, 64, 32):
        if all(w % g == 0 for w in widths if w):
            return g
    raise QuantizeError(f"the decoder's widths {[w for w in widths if w]} are not multiples of 32: GPTQ / AWQ group sizes cannot fit")


def quantize_gptq(src: Path, dst: Path, method: str, calibration: str | Path, max_samples: int = 128) -> dict[str, Any]:
    """GPTQ / AWQ 4-bit weights through GPTQModel, calibrated on text; the folder `dst` (written whole, by GPTQModel)."""
    from transformers import AutoConfig, AutoTokenizer

    _gptqmodel()
    from gptqmodel import AWQConfig, GPTQModel, QuantizeConfig

    config = AutoConfig.from_pretrained(str(src))
    if method == "awq-int4" and hasattr(config, "vision_config"):
        raise QuantizeError(f"{src}: awq-int4 takes text-only causal LMs; GPTQModel 7.7's AWQ fails on Qwen3-VL here (its scale search "
                            "mis-sizes the per-head q/k norms): use gptq-int4 for vision-language models")
    texts = calibration_texts(calibration, max_samples)
    group = _group_size(config)
    tok = AutoTokenizer.from_pretrained(str(src))
    samples = []
    for t in texts:
        ids = tok(t, truncation=True, max_length=512)["input_ids"]
        if len(ids) >= MIN_TOKENS:  # GPTQModel drops shorter samples
            samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    if len(samples) < min(MIN_CALIBRATION, len(texts)):
        raise QuantizeError(f"calibration data {calibration}: {len(samples)} of {len(texts)} samples have at least {MIN_TOKENS} tokens; "
                            f"GPTQ / AWQ need {min(MIN_CALIBRATION, len(texts))} (longer texts, or more of them)")
    qcfg = QuantizeConfig(bits=4, group_size=group) if method == "gptq-int4" else AWQConfig(bits=4, group_size=group)
    src, dst = src.resolve(), dst.resolve()
    # GPTQModel writes its per-layer quantization log to ./logs of the working directory: run it in a scratch folder
    # and keep that log with the model instead (dst/quantize_logs/)
    import tempfile

    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="mmdistill-gptq-") as scratch:
        os.chdir(scratch)
        try:
            model = GPTQModel.load(str(src), qcfg, device="cuda:0" if torch.cuda.is_available() else "cpu")
            model.quantize(samples, batch_size=8)
            model.save(str(dst))
        finally:
            os.chdir(cwd)
        if (Path(scratch) / "logs").is_dir():
            shutil.copytree(Path(scratch) / "logs", dst / "quantize_logs")
    from safetensors import safe_open

    quantized = set()
    for f in dst.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            quantized |= {k.rsplit(".", 1)[0] for k in fh.keys() if k.endswith(".qweight")}
    return {"quantized": sorted(quantized), "group_size": group, "calibration_samples": len(samples)}


def bnb_config(method: str):
    """transformers' BitsAndBytesConfig for `method` (bnb-int8 | bnb-nf4)."""
    from transformers import BitsAndBytesConfig

    _bitsandbytes()
    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "bnb-nf4":
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    raise QuantizeError(f"bitsandbytes quantization method {method!r} is unknown; use one of {list(BNB_METHODS)}")


def load_quantized(model_dir: str | Path, method: str, *, trust_remote_code: bool = False):
    """The model in `model_dir`, quantized by `method` as it loads (fp32 compute; bnb-int8: 16-bit matmuls). Returns the model."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    cls = _model_class(config)
    if method in BNB_METHODS:
        device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
        return cls.from_pretrained(str(model_dir), quantization_config=bnb_config(method), dtype=torch.float32, device_map=device_map, trust_remote_code=trust_remote_code)
    moe = _has_fused_experts(config)
    kwargs: dict[str, Any] = {"experts_implementation": "eager"} if moe else {}
    q = torchao_config(method, linear_weights=_linear_weights(cls, config) if moe else None)
    return cls.from_pretrained(str(model_dir), quantization_config=q, dtype=torch.float32, trust_remote_code=trust_remote_code, **kwargs)


def store_rest_as_bf16(model) -> list[str]:
    """Cast the weights a torchao method left in fp32 and that are matrices or kernels (token embeddings and a head
    tied to them, the vision patch convolution, position embeddings) to bf16, in place, so they take half the bytes on
    disk. Norm weights and biases (1-D) stay fp32. Returns the cast parameters' names."""
    from torchao.utils import TorchAOBaseTensor

    cast = []
    for name, p in model.named_parameters():  # a tied head shares its Parameter with the embeddings: cast once
        if isinstance(p.data, TorchAOBaseTensor) or isinstance(p, TorchAOBaseTensor) or p.dtype != torch.float32 or p.dim() < 2:
            continue
        p.data = p.data.to(torch.bfloat16)
        cast.append(name)
    return cast


def quantize_folder(model_dir: str | Path, out: str | Path, method: str, *, overwrite: bool = False, calibration: str | Path | None = None,
                    max_samples: int = 128, store_dtype: str = "float32") -> dict[str, Any]:
    """Quantize the model folder `model_dir` by `method` into the folder `out` (safetensors + the processor files).
    GPTQ / AWQ calibrate on `calibration` (its first `max_samples` texts). With `store_dtype="bfloat16"` (torchao
    methods), the fp32 matrices the method leaves unquantized are stored in bf16 (`store_rest_as_bf16`); the
    folder's config stays float32, and mmdistill's loaders (or ``from_pretrained(folder, dtype=torch.float32)``)
    upcast them as they load, so compute stays fp32.

    The input folder is never written. Returns a summary: method, sizes, what was quantized.
    """
    src, dst = Path(model_dir), Path(out)
    if method not in METHODS:
        raise QuantizeError(f"quantization method {method!r} is unknown; use one of {list(METHODS)}")
    gptq = method in GPTQ_METHODS
    if store_dtype not in ("float32", "bfloat16"):
        raise QuantizeError(f"store dtype {store_dtype!r} is unknown; use float32 or bfloat16")
    if store_dtype == "bfloat16" and method not in TORCHAO_METHODS:
        raise QuantizeError(f"--store-dtype bfloat16 is for the torchao methods {list(TORCHAO_METHODS)}; {method} keeps its backend's own storage")
    if gptq and calibration is None:
        raise QuantizeError(f"{method} calibrates on data: pass --calibration DATA (a chat or rerank JSONL, or a text file with a sample a line)")
    _gptqmodel() if gptq else _bitsandbytes() if method in BNB_METHODS else _torchao()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a model folder (no config.json)")
    if dst.resolve() == src.resolve():
        raise QuantizeError(f"--out {dst} is the input folder; write the quantized model elsewhere")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite to replace it)")
    if gptq:
        if dst.exists():
            shutil.rmtree(dst)
        done = quantize_gptq(src, dst, method, calibration, max_samples)
        return _finish(src, dst, {
            "method": method, "backend": "gptqmodel", "source": str(src), "size_bytes": folder_size(src),
            "quantized_modules": len(done["quantized"]), "group_size": done["group_size"], "calibration_samples": done["calibration_samples"],
            "note": "the decoder's Linear layers are 4-bit (packed 8 a 32-bit word); vision tower, embeddings and head stay full precision"})
    model = load_quantized(src, method)
    bnb = method in BNB_METHODS
    if bnb:
        import bitsandbytes as bnb_lib

        quantized = sorted(n for n, m in model.named_modules() if isinstance(m, (bnb_lib.nn.Linear8bitLt, bnb_lib.nn.Linear4bit)))
    else:
        from torchao.utils import TorchAOBaseTensor

        quantized = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if isinstance(p.data, TorchAOBaseTensor) or isinstance(p, TorchAOBaseTensor)})
    if not quantized:
        raise QuantizeError(f"{src}: no Linear layer or MoE expert was quantized")
    stored_bf16 = store_rest_as_bf16(model) if store_dtype == "bfloat16" else []
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    model.save_pretrained(dst)
    moe = _has_fused_experts(model.config)
    if (moe and not bnb) or stored_bf16:
        cfg = json.loads((dst / "config.json").read_text())
        if moe and not bnb:  # torchao's 3-D expert tensors run only through the eager experts loop; plain from_pretrained reads this key
            cfg["experts_implementation"] = "eager"
        if stored_bf16:  # save_pretrained wrote the first weight's dtype (bf16 embeddings); the model computes in fp32
            cfg["dtype"] = "float32"
        (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    summary = {
        "method": method,
        "backend": "bitsandbytes" if bnb else "torchao",
        "source": str(src),
        "size_bytes": folder_size(src),
        "quantized_modules": len(quantized),
        "moe_experts_quantized": moe and not bnb,
        "store_dtype": store_dtype,
    }
    if stored_bf16:
        summary["stored_bf16"] = stored_bf16
    if bnb and moe:
        summary["note"] = "bitsandbytes quantizes Linear layers only: the MoE experts' fused tensors stay full precision"
    if method == "int4-weight":
        summary["note"] = "int4 values are stored one per int8 byte on CPU (torchao 0.18 has no packed CPU int4 format)"
    return _finish(src, dst, summary)


def _finish(src: Path, dst: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Copy the tokenizer / processor / chat template files the quantizer did not write; measure the quantized weights;
    write quantize.json."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_FILES) and f.name not in _MODEL_FILES and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
    summary["quantized_size_bytes"] = folder_size(dst)
    (dst / "quantize.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
