"""Contrastive dual encoders (CLIP, SigLIP, anything with get_image_features / get_text_features).

The adapter loads a real Hugging Face model + processor by hub id or folder, turns a
batch into ``Signals`` (image/text embeddings, logit scale, pooled tower features), and
builds students: a tiny model of the real architecture, a smaller config from scratch,
or a shrunk copy of the teacher (weight inheritance: a subset of layers and optionally
narrower widths, copying the leading slice of every teacher tensor).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..signals import Signals

# Tiny presets: CLIPModel configs small enough for a CPU, big enough to learn ShapesWorld.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "clip-teacher": dict(hidden=128, layers=3, heads=4, mlp=512, proj=128),
    "clip-student": dict(hidden=64, layers=2, heads=4, mlp=256, proj=64),
    "clip-nano": dict(hidden=32, layers=1, heads=2, mlp=64, proj=32),
    # SiglipModel of the same sizes (its embedding width is the tower width: SigLIP's vision tower has no projection)
    "siglip-teacher": dict(hidden=128, layers=3, heads=4, mlp=512, proj=128, arch="siglip"),
    "siglip-student": dict(hidden=64, layers=2, heads=4, mlp=256, proj=64, arch="siglip"),
    "siglip-nano": dict(hidden=32, layers=1, heads=2, mlp=64, proj=32, arch="siglip"),
}

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]


class PairingError(ValueError):
    """A teacher and student that cannot be paired as asked."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, max_length: int = 64):
    """A small lower-cased BPE tokenizer trained locally (no hub), CLIP-style BOS/EOS framing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_tiny_clip(
    out_dir: str | Path | None,
    texts: Iterable[str],
    *,
    preset: str = "clip-student",
    image_size: int = 64,
    patch_size: int = 8,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    vocab_size: int = 1000,
):
    """Build a tiny, randomly initialised CLIPModel + CLIPProcessor (a SiglipModel + SiglipProcessor for the
    siglip-* presets); save them to `out_dir` when given.

    Returns (model, processor). The tokenizer is trained on `texts` here, so nothing is downloaded.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {sorted(TINY_PRESETS)}")
    p = TINY_PRESETS[preset]
    if p.get("arch") == "siglip":
        return _build_tiny_siglip(out_dir, texts, p, image_size=image_size, patch_size=patch_size, seed=seed, overrides=overrides, vocab_size=vocab_size)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tower, text_cfg = _tiny_towers(p, tokenizer)
    text_cfg["projection_dim"] = p["proj"]
    vision_cfg = dict(tower, image_size=image_size, patch_size=patch_size, projection_dim=p["proj"])
    config = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=p["proj"])
    if overrides:
        config = apply_overrides(config, overrides)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


def _tiny_towers(p: dict[str, Any], tokenizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tiny preset's tower sizes, and the text tower's config for a locally trained tokenizer (ids and lengths)."""
    tower = dict(hidden_size=p["hidden"], num_hidden_layers=p["layers"], num_attention_heads=p["heads"], intermediate_size=p["mlp"])
    text_cfg = dict(
        tower,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tower, text_cfg


def _build_tiny_siglip(out_dir, texts, p: dict[str, Any], *, image_size: int, patch_size: int, seed: int, overrides, vocab_size: int):
    """A tiny SiglipModel + SiglipProcessor (the same locally trained tokenizer as the CLIP presets)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tower, text_cfg = _tiny_towers(p, tokenizer)
    text_cfg["projection_size"] = p["hidden"]  # = the vision width: both embeddings live in one space
    config = SiglipConfig(text_config=text_cfg, vision_config=dict(tower, image_size=image_size, patch_size=patch_size))
    if overrides:
        config = apply_overrides(config, overrides)
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():  # SigLIP's initialisation of its sigmoid loss: t = exp(t') = 10, b = −10
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    processor = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tokenizer)
    if out_dir is not None:
        model.save_pretrained(Path(out_dir))
        processor.save_pretrained(Path(out_dir))
    return model, processor


def apply_overrides(config, overrides: dict[str, Any]):
    """Return a copy of an HF config with dotted-key overrides applied; unknown keys are errors."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        obj = config
        parts = key.split(".")
        for part in parts[:-1]:
            if not hasattr(obj, part):
                raise ValueError(f"config override {key!r}: {type(obj).__name__} has no {part!r}")
            obj = getattr(obj, part)
        if not hasattr(obj, parts[-1]):
            raise ValueError(f"config override {key!r}: {type(obj).__name__} has no {parts[-1]!r}")
        setattr(obj, parts[-1], value)
    # CLIP keeps the projection width in three places: keep them consistent.
    if "projection_dim" in overrides and hasattr(config, "text_config"):
        config.text_config.projection_dim = config.vision_config.projection_dim = overrides["projection_dim"]
    return config


def load_model(name_or_path: str, *, trust_remote_code: bool = False):
    """Load a dual encoder and its processor through the real `from_pretrained` path."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from . import load_dtype

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModel.from_pretrained(name_or_path, dtype=load_dtype(config), trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # missing folder / hub id, or a config transformers can't map
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: {first}") from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise PairingError(
            f"{name_or_path}: {type(model).__name__} is not a dual encoder (no get_image_features / get_text_features)"
        )
    return model, processor


def _pooled(out) -> Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is the projection (5)."""
    if isinstance(out, Tensor):
        return out
    return out.pooler_output


def embed_dim(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)


def logit_scale(model) -> Tensor:
    """The exp'ed similarity scale as a 0-d tensor (CLIP stores it as [], SigLIP as [1])."""
    return model.logit_scale.exp().reshape(())


def encode(model, batch: dict[str, Tensor], *, features: bool = False) -> Signals:
    """One forward of a dual encoder on a collated batch -> Signals.

    batch: pixel_values [B, 3, H, W], input_ids [B, L], attention_mask [B, L].
    Signals: image_embeds [B, D], text_embeds [B, D] (unnormalised), logit_scale [], logit_bias [] (SigLIP),
    features {"vision_pooled": [B, Hv] (CLS), "text_pooled": [B, Ht] (masked mean)} when asked.
    """
    img = model.get_image_features(pixel_values=batch["pixel_values"])
    txt = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    sig = Signals(image_embeds=_pooled(img), text_embeds=_pooled(txt), logit_scale=logit_scale(model))
    if getattr(model, "logit_bias", None) is not None:  # SigLIP: the learned bias of its sigmoid loss
        sig.logit_bias = model.logit_bias.reshape(())
    if features and not isinstance(img, Tensor):
        # tower features before the projection: the vision CLS state (a CNN tower's feature map [B, C, h, w]:
        # its spatial mean), the masked mean of text states
        v = img.last_hidden_state
        sig.features["vision_pooled"] = v.mean((2, 3)) if v.dim() == 4 else v[:, 0]
        m = batch["attention_mask"].unsqueeze(-1).to(txt.last_hidden_state.dtype)  # [B, L, 1]
        sig.features["text_pooled"] = (txt.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1.0)
    return sig


def encode_images(model, pixel_values: Tensor) -> Tensor:
    return _pooled(model.get_image_features(pixel_values=pixel_values))


def encode_texts(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    return _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


# ---------------------------------------------------------------------------------------------
# Students


_LAYER_RE = re.compile(r"^(?P<prefix>(?:text_model|vision_model)\.encoder\.layers)\.(?P<idx>\d+)\.(?P<rest>.*)$")


def _tower_of(prefix: str) -> str:
    return "text" if prefix.startswith("text") else "vision"


def scratch_student(teacher_config, overrides: dict[str, Any], *, seed: int = 0):
    """A randomly initialised model of the teacher's class with a smaller config."""
    from transformers import AutoModel

    config = apply_overrides(teacher_config, overrides)
    torch.manual_seed(seed)
    return AutoModel.from_config(config)


def inherit_student(teacher: nn.Module, layers: dict[str, list[int]], overrides: dict[str, Any] | None = None):
    """Shrink the teacher: keep `layers` per tower ({"vision": [...], "text": [...]}) and optionally
    narrower widths (`overrides`), copying the leading slice of every teacher tensor.

    Slicing keeps whole attention heads when the head width is unchanged (hidden = heads × head_dim).
    Raises PairingError when the student would be wider or deeper than the teacher anywhere.
    """
    from transformers import AutoModel

    overrides = dict(overrides or {})
    cfg = teacher.config
    for tower in layers:
        if tower not in ("vision", "text"):
            raise PairingError(f"student.layers: unknown tower {tower!r}; use 'vision' and/or 'text'")
    for tower, keep in layers.items():
        n_teacher = getattr(cfg, f"{tower}_config").num_hidden_layers
        bad = [i for i in keep if not 0 <= i < n_teacher]
        if bad or not keep or len(set(keep)) != len(keep):
            raise PairingError(
                f"student.layers.{tower}: {keep} must be distinct indices of the teacher's {n_teacher} layers"
            )
        overrides[f"{tower}_config.num_hidden_layers"] = len(keep)
    s_cfg = apply_overrides(cfg, overrides)
    for tower in ("vision", "text"):
        tc, sc = getattr(cfg, f"{tower}_config"), getattr(s_cfg, f"{tower}_config")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(sc, key) > getattr(tc, key):
                raise PairingError(
                    f"inherit: student {tower}_config.{key}={getattr(sc, key)} is larger than the teacher's "
                    f"{getattr(tc, key)}; weight inheritance can only shrink (use init=scratch for a wider student)"
                )
        if sc.hidden_size // sc.num_attention_heads != tc.hidden_size // tc.num_attention_heads:
            raise PairingError(
                f"inherit: {tower} head width changes ({tc.hidden_size}/{tc.num_attention_heads} -> "
                f"{sc.hidden_size}/{sc.num_attention_heads}); keep hidden_size / num_attention_heads equal to the teacher's"
            )
    student = AutoModel.from_config(s_cfg)
    t_state = teacher.state_dict()
    new_state = {}
    for name, s_param in student.state_dict().items():
        src = name
        m = _LAYER_RE.match(name)
        if m:
            tower = _tower_of(m["prefix"])
            idx = int(m["idx"])
            if tower in layers:
                src = f"{m['prefix']}.{layers[tower][idx]}.{m['rest']}"
        t_param = t_state[src]
        if t_param.dim() != s_param.dim() or any(s > t for s, t in zip(s_param.shape, t_param.shape)):
            raise PairingError(f"inherit: {name} has shape {tuple(s_param.shape)}, teacher {tuple(t_param.shape)}")
        new_state[name] = t_param[tuple(slice(0, s) for s in s_param.shape)].clone()
    student.load_state_dict(new_state)
    return student


# ---------------------------------------------------------------------------------------------
# Preprocessing


@dataclass
class Encoded:
    """Pre-processed pairs for one processor: pixel_values [N, 3, H, W], input_ids / attention_mask [N, L]."""

    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor

    def batch(self, idx: Tensor | list[int]) -> dict[str, Tensor]:
        """Rows `idx`, text trimmed to the longest in this batch (causal text towers ignore the padding)."""
        mask = self.attention_mask[idx]
        n = int(mask.sum(1).max())
        return {"pixel_values": self.pixel_values[idx], "input_ids": self.input_ids[idx][:, :n], "attention_mask": mask[:, :n]}

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class LazyEncoded:
    """Pairs run through a model's processor a batch at a time (``data.stream``): the same ``batch(idx)`` and ``len()``
    as ``Encoded`` and the same tensors, but only the batch's images are decoded (in a pool of threads)."""

    def __init__(self, processor, records, source: str):
        self.processor, self.records, self.source = processor, records, source

    def batch(self, idx: Tensor | list[int]) -> dict[str, Tensor]:
        from ..data.loaders import decode_pairs

        recs = [self.records[int(i)] for i in idx]
        enc = preprocess_pairs(self.processor, decode_pairs(recs, self.source), [r.text for r in recs])
        return enc.batch(list(range(len(recs))))

    def __len__(self) -> int:
        return len(self.records)


def preprocess_images(processor, images: list, chunk: int = 512) -> Tensor:
    out = []
    for i in range(0, len(images), chunk):
        out.append(processor.image_processor(images=images[i : i + chunk], return_tensors="pt")["pixel_values"])
    return torch.cat(out)


def preprocess_texts(processor, texts: list[str]) -> dict[str, Tensor]:
    tok = processor.tokenizer
    max_len = min(int(tok.model_max_length), 77) if tok.model_max_length < 10_000 else 77
    # SigLIP was trained on max-length padding; causal CLIP text towers are indifferent, so pad to the longest
    padding = "max_length" if "siglip" in type(tok).__name__.lower() else "longest"
    enc = tok(texts, padding=padding, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def preprocess_pairs(processor, images: list, texts: list[str]) -> Encoded:
    """Run a model's own processor over all pairs once (images are small; this keeps training I/O-free)."""
    pv = preprocess_images(processor, images)
    t = preprocess_texts(processor, texts)
    return Encoded(pv, t["input_ids"], t["attention_mask"])
