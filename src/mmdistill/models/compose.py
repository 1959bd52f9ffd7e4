"""A generative VLM student composed from parts: a vision tower + a causal LM + an MLP projector.

The parts are what a user downloads separately: a SigLIP or CLIP vision tower (a
``SiglipVisionModel`` / ``CLIPVisionModel``, or the vision half of a ``SiglipModel`` /
``CLIPModel``) with its image processor, and a causal language model (Qwen3 or any
``AutoModelForCausalLM``) with its tokenizer. ``compose_vlm`` wires them into a real
``LlavaForConditionalGeneration`` (``vision_config`` = the tower's config, ``text_config`` =
the LM's config), copies both parts' weights, randomly initialises the two-layer projector,
and builds a ``LlavaProcessor``. The saved folder therefore loads with plain
``AutoModelForImageTextToText.from_pretrained`` + ``AutoProcessor.from_pretrained``.

Image tokens: ``LlavaProcessor`` expands every ``image_token`` (``"<image>"`` unless the
tokenizer names its own ``image_token``) in the text to one token per vision feature. The
token is added to the tokenizer as a special token when missing (the LM's embedding matrix
grows by one row, initialised as the mean embedding) and ``config.image_token_id`` is its id.

Feature selection: SigLIP has no CLS token, so all patch states are used
(``vision_feature_select_strategy="full"``); CLIP's CLS state is dropped (``"default"``).
Either way a ``S x S`` image with patch ``P`` gives ``(S // P) ** 2`` image tokens.

Training stages (``freeze_for_stage``): ``"align"`` trains only the projector, ``"joint"``
the projector and the whole LM (embeddings and head included) with the vision tower frozen,
``"all"`` everything.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

DEFAULT_IMAGE_TOKEN = "<image>"

STAGES = {
    "align": "only the multi-modal projector trains; the vision tower and the LM are frozen",
    "joint": "the projector and the whole LM (embeddings, layers, head) train; the vision tower is frozen",
    "all": "every parameter trains",
}

# Qwen-style turns (used when the tokenizer has <|im_start|>/<|im_end|>); each image part becomes
# one image token that LlavaProcessor expands to the vision tower's number of patch features.
_QWEN_STYLE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '@IMAGE@\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# LLaVA-1.5-style turns for tokenizers without chat markers: "USER: <image>\n... ASSISTANT: ...<eos>".
_PLAIN_STYLE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] if message['content'] is string else '' -}}{{- '\n' -}}"
    "{%- else -%}"
    "{{- message['role'].upper() + ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '@IMAGE@\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '@EOS@' -}}{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def chat_template_for(tokenizer, image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
    """The chat template set on the composed processor: Qwen-style when the tokenizer has
    ``<|im_start|>``, LLaVA-1.5 style (``USER: ... ASSISTANT:``) otherwise. An image part of a
    message becomes ``image_token + '\\n'``."""
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return _QWEN_STYLE.replace("@IMAGE@", image_token)
    eos = tokenizer.eos_token or ""
    return _PLAIN_STYLE.replace("@IMAGE@", image_token).replace("@EOS@", eos)


# ---------------------------------------------------------------------------------------------
# Loading the parts


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _load_config(name_or_path: str, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot load the {what} {name_or_path!r}: {_first_line(e)}") from None


def _is_vision_tower_config(cfg) -> bool:
    return str(getattr(cfg, "model_type", "")).endswith("_vision_model")


def _vision_tower(vision) -> nn.Module:
    """A standalone vision tower (e.g. SiglipVisionModel / CLIPVisionModel) from a folder, hub id or model."""
    from transformers import AutoModel, PreTrainedModel

    if isinstance(vision, (str, Path)):
        name = str(vision)
        cfg = _load_config(name, "vision tower")
        sub = getattr(cfg, "vision_config", None)
        if not (_is_vision_tower_config(cfg) or (sub is not None and _is_vision_tower_config(sub))):
            raise ValueError(
                f"vision {name!r} holds a {type(cfg).__name__} ({cfg.model_type!r}), not a vision tower; "
                "expected a SiglipVisionModel / CLIPVisionModel or a SiglipModel / CLIPModel"
            )
        try:
            model = AutoModel.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot load the vision tower {name!r}: {_first_line(e)}") from None
    else:
        model, name = vision, type(vision).__name__
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"vision must be a folder, hub id or transformers model, got {type(model).__name__}")
    cfg = model.config
    if _is_vision_tower_config(cfg):
        return model
    sub = getattr(cfg, "vision_config", None)
    inner = getattr(model, "vision_model", None)
    if sub is not None and _is_vision_tower_config(sub) and isinstance(inner, nn.Module):
        # a dual encoder (SiglipModel / CLIPModel): rebuild its vision half as the standalone tower class
        # (transformers 5: `vision_model` already is the standalone class; 4.x: a wrapped transformer)
        tower = AutoModel.from_config(copy.deepcopy(sub))
        wrapped = getattr(tower, "vision_model", None)
        if isinstance(inner, type(tower)):
            target = tower
        elif isinstance(wrapped, nn.Module) and isinstance(inner, type(wrapped)):
            target = wrapped
        else:
            raise ValueError(f"vision {name!r}: cannot map {type(model).__name__}.vision_model onto {type(tower).__name__}")
        _copy_checked(target, inner.state_dict(), f"vision {name!r}")
        tower.to(next(model.parameters()).dtype)
        return tower
    raise ValueError(
        f"vision {name!r} is a {type(model).__name__}, not a vision tower; "
        "expected a SiglipVisionModel / CLIPVisionModel or a SiglipModel / CLIPModel"
    )


def _causal_lm(language) -> nn.Module:
    from transformers import AutoModelForCausalLM, PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(language, (str, Path)):
        name = str(language)
        cfg = _load_config(name, "language model")
        if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"language {name!r} holds a {type(cfg).__name__} ({cfg.model_type!r}), not a causal language model "
                "(expected a folder/id that AutoModelForCausalLM loads, e.g. Qwen3ForCausalLM)"
            )
        try:
            return AutoModelForCausalLM.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot load the language model {name!r}: {_first_line(e)}") from None
    model = language
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not isinstance(model, PreTrainedModel) or type(model).__name__ not in causal_classes or model.get_output_embeddings() is None:
        raise ValueError(f"language must be a causal LM (e.g. Qwen3ForCausalLM), got {type(model).__name__}")
    return model


def _source_of(model, what: str):
    """The folder a part came from (for its tokenizer / image processor) or raise."""
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if path:
        return path
    raise ValueError(f"pass {what}= when the part is a model object that was not loaded from a folder")


# ---------------------------------------------------------------------------------------------
# Composing


def _copy_checked(dst: nn.Module, src_state: dict[str, torch.Tensor], where: str) -> None:
    dst_state = dst.state_dict()
    missing = sorted(set(dst_state) - set(src_state))
    extra = sorted(set(src_state) - set(dst_state))
    if missing or extra:
        raise ValueError(f"{where}: parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in src_state.items():
        if dst_state[k].shape != v.shape:
            raise ValueError(f"{where}: {k} has shape {tuple(dst_state[k].shape)}, the part {tuple(v.shape)}")
    dst.load_state_dict(src_state)
    after = dst.state_dict()
    for k, v in src_state.items():
        if not torch.equal(after[k], v.to(after[k].dtype)):
            raise RuntimeError(f"{where}: {k} was not copied")


def _grow_rows(weight: torch.Tensor, rows: int, new_ids: list[int], old_len: int) -> torch.Tensor:
    """`weight` with `rows` rows; the rows of newly added tokens are the mean of the first `old_len` rows."""
    out = weight.detach().clone()
    if rows > out.shape[0]:
        out = torch.cat([out, out.new_zeros(rows - out.shape[0], out.shape[1])])
    mean = weight.detach()[:old_len].mean(0)
    for i in new_ids:
        out[i] = mean
    return out


def compose_vlm(
    vision,
    language,
    *,
    tokenizer=None,
    image_processor=None,
    projector_hidden_act: str = "gelu",
    vision_feature_layer: int = -1,
    seed: int = 0,
    image_token: str | None = None,
):
    """Compose a ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` from a vision tower and a causal LM.

    vision: a folder / hub id of a SiglipVisionModel, SiglipModel, CLIPVisionModel or CLIPModel (the
    vision tower is taken), or such a model object. language: a folder / hub id of an
    AutoModelForCausalLM (Qwen3 etc.) or such a model object. `tokenizer` / `image_processor`
    default to the ones saved beside the parts. The parts' weights are copied (and checked), the
    projector is initialised from `seed`, and `image_token` (default: the tokenizer's
    ``image_token`` or ``"<image>"``) is added as a special token when missing, its embedding row
    set to the mean embedding. The inputs are not modified. Returns (model, processor).
    """
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tower = _vision_tower(vision)
    lm = _causal_lm(language)
    if tokenizer is None:
        src = language if isinstance(language, (str, Path)) else _source_of(lm, "tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(src))
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"no tokenizer beside the language model {str(src)!r}: {_first_line(e)}") from None
    if image_processor is None:
        src = vision if isinstance(vision, (str, Path)) else _source_of(vision, "image_processor")
        try:
            image_processor = AutoImageProcessor.from_pretrained(str(src))
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"no image processor beside the vision tower {str(src)!r}: {_first_line(e)}") from None

    tokenizer = copy.deepcopy(tokenizer)
    image_token = image_token or getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
    old_len = len(tokenizer)
    if image_token not in tokenizer.all_special_tokens:
        # missing: a new id; an ordinary vocabulary entry: made special (atomic, never split or merged)
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if tokenizer.encode(image_token, add_special_tokens=False) != [image_token_id]:
        raise RuntimeError(f"the tokenizer does not encode {image_token!r} as one token")
    new_ids = [i for i in range(old_len, len(tokenizer))]

    vcfg = copy.deepcopy(tower.config)
    tcfg = copy.deepcopy(lm.config)
    old_vocab = int(tcfg.vocab_size)
    tcfg.vocab_size = max(old_vocab, len(tokenizer))
    is_clip_like = "clip" in vcfg.model_type  # a CLS state leads the patch states
    strategy = "default" if is_clip_like else "full"
    image_size, patch = int(vcfg.image_size), int(vcfg.patch_size)
    n_image_tokens = (image_size // patch) ** 2
    config = LlavaConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_index=image_token_id,
        image_seq_length=n_image_tokens,
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=bool(getattr(tcfg, "tie_word_embeddings", False)),
    )

    dtype = next(lm.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.to(dtype)

    # vision tower: identical class, identical names
    _copy_checked(model.model.vision_tower, tower.state_dict(), "vision tower")
    # language model: the causal LM's base model + its head, the token rows grown for the image token
    emb_name = None
    base_state = dict(lm.base_model.state_dict())
    in_emb = lm.get_input_embeddings()
    for k, v in lm.base_model.named_parameters():
        if v is in_emb.weight:
            emb_name = k
    if emb_name is None:
        raise ValueError(f"{type(lm).__name__}: cannot find the input embedding in its base model")
    base_state[emb_name] = _grow_rows(base_state[emb_name], tcfg.vocab_size, new_ids, old_len)
    _copy_checked(model.model.language_model, base_state, "language model")
    head = lm.get_output_embeddings()
    head_state = {k: v for k, v in head.state_dict().items()}
    head_state["weight"] = _grow_rows(head_state["weight"], tcfg.vocab_size, new_ids, old_len)
    if "bias" in head_state and head_state["bias"].shape[0] < tcfg.vocab_size:
        head_state["bias"] = torch.cat([head_state["bias"], head_state["bias"].new_zeros(tcfg.vocab_size - old_vocab)])
    _copy_checked(model.lm_head, head_state, "lm head")
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.language_model.get_input_embeddings().weight:
        model.tie_weights()

    gen = model.generation_config
    lm_gen = getattr(lm, "generation_config", None)
    gen.eos_token_id = getattr(lm_gen, "eos_token_id", None) or tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(lm_gen, "pad_token_id", None)
    gen.bos_token_id = getattr(lm_gen, "bos_token_id", None)

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        chat_template=chat_template_for(tokenizer, image_token),
        image_token=image_token,
        num_additional_image_tokens=1 if is_clip_like else 0,
    )
    if processor.image_token != image_token or processor.image_token_id != image_token_id:
        raise RuntimeError(f"LlavaProcessor uses image token {processor.image_token!r}, the model {image_token!r}")
    return model, processor


# ---------------------------------------------------------------------------------------------
# Tiny parts (offline)


def build_tiny_parts(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    vision: str = "siglip",
    lm_hidden: int = 64,
    lm_layers: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    image_size: int = 64,
    patch_size: int = 8,
    seed: int = 0,
    tokenizer=None,
) -> dict[str, Path]:
    """Save a tiny vision tower (+ image processor) and a tiny Qwen3ForCausalLM (+ tokenizer) as two folders.

    vision: "siglip" (SiglipVisionModel + SiglipImageProcessor) or "clip" (CLIPVisionModel +
    CLIPImageProcessor). The tokenizer is trained on `texts` unless given. Returns
    {"vision": out_dir/"vision", "language": out_dir/"language"}.
    """
    from transformers import Qwen3ForCausalLM

    from .tiny import qwen3_text_config, train_qwen_tokenizer

    if vision not in ("siglip", "clip"):
        raise ValueError(f"unknown vision tower {vision!r}; choose 'siglip' or 'clip'")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    out_dir = Path(out_dir)
    v_heads = max(1, vision_hidden // 16)
    tower = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers, num_attention_heads=v_heads, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    if vision == "siglip":
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        vmodel = SiglipVisionModel(SiglipVisionConfig(**tower))
        vproc = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    else:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        vmodel = CLIPVisionModel(CLIPVisionConfig(**tower, projection_dim=vision_hidden))
        vproc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, do_center_crop=True)

    if tokenizer is None:
        tokenizer = train_qwen_tokenizer(texts)
    heads = max(1, lm_hidden // 16)
    widths = dict(hidden=lm_hidden, layers=lm_layers, heads=heads, kv_heads=max(1, heads // 2), head_dim=16, mlp=int(2.5 * lm_hidden))
    lm = Qwen3ForCausalLM(qwen3_text_config(tokenizer, widths, bos_token_id=tokenizer.bos_token_id))
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.generation_config.pad_token_id = tokenizer.pad_token_id

    paths = {"vision": out_dir / "vision", "language": out_dir / "language"}
    vmodel.save_pretrained(paths["vision"])
    vproc.save_pretrained(paths["vision"])
    lm.save_pretrained(paths["language"])
    tokenizer.save_pretrained(paths["language"])
    return paths


# ---------------------------------------------------------------------------------------------
# Training stages


def _parts(model) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(vision tower, projector, language model incl. head) of a LLaVA-style model."""
    inner = getattr(model, "model", model)
    try:
        return inner.vision_tower, inner.multi_modal_projector, inner.language_model
    except AttributeError:
        raise ValueError(f"{type(model).__name__} is not a LLaVA-style model (no vision_tower / multi_modal_projector / language_model)") from None


def projector_parameters(model) -> list[nn.Parameter]:
    """The multi-modal projector's parameters (e.g. for an optimizer group with its own learning rate)."""
    return list(_parts(model)[1].parameters())


def freeze_for_stage(model, stage: str) -> int:
    """Set requires_grad for a training stage; return the number of trainable parameters (elements).

    "align": only the multi-modal projector trains (vision tower and LM frozen) — LLaVA's stage 1.
    "joint": everything except the vision tower trains: the projector and the whole LM, including
             its embeddings and LM head — LLaVA's stage 2 (visual instruction tuning).
    "all":   every parameter trains, the vision tower included.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)} (" + "; ".join(f"{k}: {v}" for k, v in STAGES.items()) + ")")
    vision, projector, _ = _parts(model)
    if stage == "all":
        model.requires_grad_(True)
    elif stage == "joint":
        model.requires_grad_(True)
        vision.requires_grad_(False)
    else:
        model.requires_grad_(False)
        projector.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
