"""LoRA adapters (PEFT) for the generative models: apply, save, merge.

``apply_lora`` wraps a model with ``peft.get_peft_model`` after checking that every requested
target module exists (a typo is an error here, not a silent no-op or PEFT's long message), and by
default restricts the adapters to the language model: Qwen-VL vision towers reuse names such as
``gate_proj``/``up_proj``/``down_proj`` (Qwen2.5-VL) that would otherwise get adapters too.

``save_adapter`` writes a standard PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) with the processor beside it and the base model's path recorded in
``base_model_name_or_path``; ``merge_adapter`` turns such a folder back into a full model folder
that plain ``transformers`` loads.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Files whose presence means a folder holds a (saved) processor or tokenizer.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


@dataclass
class LoraSettings:
    """What gets adapters and how big they are (mirrors the recipe's ``lora:`` section)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: list[str] | None = None
    language_only: bool = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                self.target_modules = [self.target_modules]
        else:
            self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)


# ---------------------------------------------------------------------------------------------
# Module resolution


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the module's full name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def _non_language_prefixes(model: torch.nn.Module) -> list[str]:
    """Full names of the multimodal encoders/projectors beside the language model.

    The siblings of the (first) submodule called ``language_model`` — e.g. ``model.visual`` in
    Qwen-VL, ``model.visual`` and ``model.audio_tower`` in the Omni thinker. Empty for a model
    without a separate language model (a text-only LM).
    """
    modules = dict(model.named_modules())
    for name in modules:
        if name.split(".")[-1] == "language_model":
            parent_name = name.rpartition(".")[0]
            parent = modules[parent_name] if parent_name else model
            prefixes = []
            for child_name, child in parent.named_children():
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if full != name and any(True for _ in child.parameters()):
                    prefixes.append(full)
            return prefixes
    return []


# Submodules PEFT adds inside an adapted layer; a model that already has adapters still resolves
# against its original module names.
_PEFT_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "modules_to_save", "original_module"}


def _plain_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not _PEFT_PARTS.intersection(n.split("."))]


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or isinstance(getattr(module, "base_layer", None), torch.nn.Linear)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _output_layer_names(model: torch.nn.Module) -> set[str]:
    """Names of the output projection (PEFT's ``all-linear`` leaves it out too)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return {"lm_head"}
    return {n for n, m in model.named_modules() if m is out} | {"lm_head"}


def resolve_targets(model: torch.nn.Module, settings: LoraSettings) -> list[str] | str:
    """The ``target_modules`` value to hand PEFT, after checking every requested module exists.

    Without ``language_only`` (or for a model without a separate language model) this is the list
    of requested names; with it, a regex (PEFT full-matches it against module names) that picks
    the requested names outside the vision/audio encoders. ``"all-linear"`` expands to every
    Linear leaf name in scope except the output layer.
    """
    cls = type(model).__name__
    excluded = _non_language_prefixes(model) if settings.language_only else []
    scope = [(n, m) for n, m in _plain_modules(model) if not _under(n, excluded)]
    note = " (language_only: the vision/audio encoders are left out)" if excluded else ""

    linear_leaves: list[str] = []
    for n, m in scope:
        leaf = n.split(".")[-1]
        if _is_linear(m) and leaf not in linear_leaves:
            linear_leaves.append(leaf)

    if settings.target_modules == "all-linear":
        if not excluded:
            return "all-linear"  # PEFT's own expansion (Linear layers only, output layer left out)
        skip = _output_layer_names(model)
        targets = [leaf for leaf in linear_leaves if _count_linear(scope, leaf, skip)]
        if not targets:
            raise ValueError(f"LoRA target 'all-linear' found no Linear modules in {cls}{note}")
    else:
        targets = list(settings.target_modules)
        for t in targets:
            if not any(_matches(n, t) for n, _ in scope):
                raise ValueError(
                    f"LoRA target module '{t}' not found in {cls}; "
                    f"linear modules available: {', '.join(linear_leaves) or '(none)'}{note}"
                )
    for t in settings.modules_to_save or []:
        if not any(_matches(n, t) for n, _ in _plain_modules(model)):
            raise ValueError(f"LoRA modules_to_save entry '{t}' not found in {cls}")

    if not excluded:
        return targets
    alternatives = "|".join(re.escape(t) for t in targets)
    exclusions = "|".join(re.escape(p) for p in excluded)
    return rf"(?!(?:{exclusions})(?:\.|$))(?:.*\.)?(?:{alternatives})"


def _count_linear(scope: list[tuple[str, torch.nn.Module]], leaf: str, skip: set[str]) -> bool:
    """Whether some Linear named `leaf` in scope is not the output layer."""
    return any(_is_linear(m) and n.split(".")[-1] == leaf and n not in skip for n, m in scope)


# ---------------------------------------------------------------------------------------------
# Apply / summarise


def apply_lora(model: torch.nn.Module, settings: LoraSettings | None = None):
    """Wrap `model` with LoRA adapters; only the adapters (and ``modules_to_save``) stay trainable.

    The adapters are injected into `model` in place; the returned ``PeftModel`` is what to train.
    """
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    targets = resolve_targets(model, settings)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=settings.modules_to_save,
        bias="none",
        task_type=None,  # plain PeftModel: forwards every kwarg (pixel_values, image_grid_thw, ...) as is
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def trainable_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable / total parameter counts (shared tensors counted once) and the trainable percent."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}


# ---------------------------------------------------------------------------------------------
# Save / merge


def _base_path_of(peft_model) -> str | None:
    config = getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", "default"))
    candidates = [getattr(config, "base_model_name_or_path", None)]
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    candidates += [getattr(base, "name_or_path", None), getattr(getattr(base, "config", None), "_name_or_path", None)]
    for c in candidates:
        if c:
            p = Path(c)
            return str(p.resolve()) if p.exists() else str(c)
    return None


def _sibling_tmp(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"


def _commit(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` folder to `out_dir`, replacing what was there."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(peft_model, out_dir: str | Path, processor=None, *, base_model_name_or_path: str | None = None) -> Path:
    """Write a standard PEFT adapter folder (+ the processor, when given) to `out_dir`, atomically.

    ``adapter_config.json`` records the base model's path (absolute when it is a local folder) so
    that ``merge_adapter`` finds it; pass `base_model_name_or_path` when the model was not loaded
    from a folder (e.g. built from a config).
    """
    out_dir = Path(out_dir)
    if not hasattr(peft_model, "peft_config"):
        raise TypeError(f"save_adapter expects a PEFT model (from apply_lora), got {type(peft_model).__name__}")
    base = str(base_model_name_or_path) if base_model_name_or_path else _base_path_of(peft_model)
    if base_model_name_or_path and Path(base_model_name_or_path).exists():
        base = str(Path(base_model_name_or_path).resolve())
    tmp = _sibling_tmp(out_dir)
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        cfg_path = tmp / ADAPTER_CONFIG
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if processor is not None:
            processor.save_pretrained(str(tmp))
        _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _model_class(config):
    """The auto class for `config`: image-text-to-text first, else by the config's architectures."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return AutoModelForSequenceClassification
    if any(a.endswith("ForCausalLM") for a in archs):
        return AutoModelForCausalLM
    if type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    for a in archs:  # e.g. a thinker class that no auto mapping names
        cls = getattr(transformers, a, None)
        if cls is not None:
            return cls
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


def _load_processor(*folders: str | Path):
    from transformers import AutoProcessor, AutoTokenizer

    for folder in folders:
        p = Path(folder)
        if p.is_dir() and not any((p / f).exists() for f in _PROCESSOR_FILES):
            continue
        for loader in (AutoProcessor, AutoTokenizer):
            try:
                return loader.from_pretrained(str(folder))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return None


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base_model: str | Path | None = None) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into its base model; write a full folder to `out_dir`.

    The base is `base_model` when given, else the adapter's ``base_model_name_or_path``. The
    folder (safetensors + config + processor) is written beside `out_dir` and renamed into place.
    """
    from peft import PeftModel
    from transformers import AutoConfig

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter_dir}")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder: no {ADAPTER_CONFIG}")
    if not any((adapter_dir / w).is_file() for w in ADAPTER_WEIGHTS):
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder: no {ADAPTER_WEIGHTS[0]}")
    try:
        adapter_cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} is not valid JSON: {e}") from None

    base = str(base_model) if base_model is not None else adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{adapter_dir / ADAPTER_CONFIG} records no base_model_name_or_path; pass the base model explicitly")
    base_path = Path(base).expanduser()
    if base_path.exists():
        if not (base_path / "config.json").is_file():
            raise FileNotFoundError(f"base model folder {base} has no config.json")
        base = str(base_path)
    elif base_path.is_absolute() or base.startswith((".", "~")) or base.count("/") > 1:
        raise FileNotFoundError(f"base model '{base}' not found: no such folder (pass the base model explicitly)")
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"base model '{base}' not found (not a local folder and not loadable: {first})") from None

    model = _model_class(config).from_pretrained(base, config=config, dtype="auto")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    merged = model.merge_and_unload()
    merged.eval()

    processor = _load_processor(adapter_dir, base)
    tmp = _sibling_tmp(out_dir)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(str(tmp))
        _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
