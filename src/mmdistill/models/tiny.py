"""Tiny, randomly initialised models of the real Qwen-VL architectures, built offline.

Everything here is built locally: a byte-level BPE tokenizer trained on the caller's text
(ShapesWorld captions and questions) with the Qwen special tokens and a Qwen-style chat
template, the real processor classes (``Qwen3VLProcessor`` / ``Qwen2_5_VLProcessor`` /
``Qwen3OmniMoeProcessor``), and the real model classes from configs. The saved folders load
with plain ``AutoModelForImageTextToText`` / ``AutoModelForSequenceClassification`` and
``AutoProcessor``, so a user's real model takes the same path as these.

Facts the configs must respect (see ../shared/notes/tiny-models.md): the multimodal rope
sections sum to head_dim / 2; Qwen3-VL's vision ``num_position_embeddings`` is a perfect
square; ``deepstack_visual_indexes`` name existing vision layers; special-token ids in the
config are the tokenizer's; ``vocab_size`` is the tokenizer's length.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import torch

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<think>",
    "</think>",
]

# A Qwen-style chat template (the wheel ships none): content is a string or a list of
# {"type": "image"} / {"type": "audio"} / {"type": "text", "text": ...} parts; images become the vision
# span that the processor expands to the right number of <|image_pad|> tokens, audio clips the audio
# span (<|audio_pad|>, expanded by the Omni processor from the clip's length).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'audio' or 'audio' in part -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Text / vision widths of the tiny presets. head_dim 32 -> mrope [8, 4, 4]; 16 -> [4, 2, 2].
VLM_PRESETS: dict[str, dict[str, Any]] = {
    "vlm-teacher": dict(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, mlp=384, v_hidden=64, v_depth=2, v_heads=4, v_mlp=128, a_hidden=64, a_layers=2, a_heads=4, a_mlp=128),
    "vlm-student": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=160, v_hidden=32, v_depth=1, v_heads=2, v_mlp=64, a_hidden=32, a_layers=1, a_heads=2, a_mlp=64),
    "vlm-nano": dict(hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, mlp=64, v_hidden=16, v_depth=1, v_heads=1, v_mlp=32, a_hidden=16, a_layers=1, a_heads=2, a_mlp=32),
}
# a_*: the Qwen3-Omni thinker's audio tower (Whisper-style encoder over 128 mel bins; output_dim = the LM width)

VLM_KINDS = ("qwen3_vl", "qwen2_5_vl", "qwen3_vl_moe", "qwen3_omni_thinker")


def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2
    return [half // 2, half // 4, half - half // 2 - half // 4]


def train_qwen_tokenizer(texts: Iterable[str], vocab_size: int = 1000, max_length: int = 512):
    """A byte-level BPE trained on `texts`, with Qwen's special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(texts)
    # yes/no rerankers read the logits of "yes" and "no": make both single tokens whatever the corpus
    texts += ["yes no yes no"] * max(200, len(texts) // 5)
    # the chat and reranker frames repeat in every prompt: a real Qwen tokenizer spends few tokens on them,
    # so weight them here too (otherwise the reranker system prompt alone is ~100 byte-level tokens)
    from .reranker import SYSTEM_PROMPT

    texts += [f"system\n{SYSTEM_PROMPT}\nuser\n<Instruct>: \n<Query>: \n<Document>: \nassistant\n"] * max(200, len(texts) // 10)
    tok.train_from_iterator(texts, trainer)
    state = tok.to_str()
    import json

    model = json.loads(state)["model"]
    # specials are re-added after the BPE vocabulary, so renumber the rest contiguously from 0
    # (otherwise the added special tokens would reuse ids of ordinary tokens)
    kept = sorted((v, k) for k, v in model["vocab"].items() if k not in QWEN_SPECIAL_TOKENS)
    vocab = {k: i for i, (_, k) in enumerate(kept)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


SHAPESWORLD_MEAN = (0.8, 0.8, 0.8)
SHAPESWORLD_STD = (0.15, 0.15, 0.15)


def make_processor(kind: str, tokenizer, image_size: int = 64, patch_size: int = 16, merge: int = 2, image_mean=SHAPESWORLD_MEAN, image_std=SHAPESWORLD_STD):
    """The real processor of `kind`; images are resized to exactly `image_size` square (multiple of patch * merge)."""
    from transformers import Qwen2VLImageProcessor

    unit = patch_size * merge
    if image_size % unit:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size * merge = {unit}")
    pixels = image_size * image_size
    # ShapesWorld images are light (background ~0.8) with small shapes: normalising with the data's own
    # statistics instead of CLIP's gives a tiny, randomly initialised vision tower a usable signal
    # (with CLIP's constants the shapes barely move its features and it never learns to look).
    common = dict(
        patch_size=patch_size, merge_size=merge, temporal_patch_size=2, size={"shortest_edge": pixels, "longest_edge": pixels},
        image_mean=list(image_mean), image_std=list(image_std),
    )
    image_processor = Qwen2VLImageProcessor(**common)
    if kind in ("qwen3_vl", "qwen3_vl_moe"):
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(**common)
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE)
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(**common)
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE)
    if kind == "qwen3_omni_thinker":
        from transformers import Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor, WhisperFeatureExtractor

        video = Qwen2VLVideoProcessor(**common)
        tokenizer = copy.deepcopy(tokenizer)  # the Omni processor reads named special tokens off the tokenizer
        tokenizer._set_model_specific_special_tokens(
            special_tokens={
                "image_token": "<|image_pad|>",
                "video_token": "<|video_pad|>",
                "audio_token": "<|audio_pad|>",
                "vision_bos_token": "<|vision_start|>",
                "vision_eos_token": "<|vision_end|>",
                "audio_bos_token": "<|audio_start|>",
                "audio_eos_token": "<|audio_end|>",
            }
        )
        return Qwen3OmniMoeProcessor(
            image_processor=image_processor,
            video_processor=video,
            feature_extractor=WhisperFeatureExtractor(feature_size=128),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
        )
    raise ValueError(f"unknown tiny VLM kind {kind!r}; choose one of {VLM_KINDS}")


def _qwen3_vision(p: dict, patch_size: int, merge: int) -> dict:
    """Qwen3-VL / Omni vision tower of a preset (64 position embeddings: a perfect square; deepstack at block 0)."""
    return dict(
        depth=p["v_depth"],
        hidden_size=p["v_hidden"],
        intermediate_size=p["v_mlp"],
        num_heads=p["v_heads"],
        out_hidden_size=p["hidden"],
        patch_size=patch_size,
        spatial_merge_size=merge,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )


def vlm_config(kind: str, tokenizer, preset: str = "vlm-student", patch_size: int = 16, merge: int = 2):
    """The config of a tiny `kind` model sized by `preset`, wired to `tokenizer`'s ids."""
    if preset not in VLM_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {sorted(VLM_PRESETS)}")
    p = VLM_PRESETS[preset]
    ids = _special_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=p["hidden"],
        intermediate_size=p["mlp"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=ids["pad_token_id"],
        eos_token_id=ids["eos_token_id"],
        bos_token_id=None,
    )
    tokens = {k: v for k, v in ids.items() if k not in ("eos_token_id", "pad_token_id")}
    if kind in ("qwen3_vl", "qwen3_vl_moe"):
        from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(p["head_dim"]), "mrope_interleaved": True}
        vision = _qwen3_vision(p, patch_size, merge)
        if kind == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=p["mlp"] // 2, decoder_sparse_step=1, mlp_only_layers=[])
            return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(p["head_dim"])}
        text.pop("head_dim")  # Qwen2.5-VL derives it from hidden / heads
        vision = dict(
            depth=p["v_depth"],
            hidden_size=p["v_hidden"],
            intermediate_size=p["v_mlp"],
            num_heads=p["v_heads"],
            out_hidden_size=p["hidden"],
            patch_size=patch_size,
            spatial_merge_size=merge,
            temporal_patch_size=2,
            window_size=patch_size * merge * 2,
            fullatt_block_indexes=[p["v_depth"] - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    if kind == "qwen3_omni_thinker":
        from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=p["mlp"] // 2, decoder_sparse_step=1, mlp_only_layers=[])
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(p["head_dim"]), "mrope_interleaved": True}
        vision = _qwen3_vision(p, patch_size, merge)
        audio = dict(
            num_mel_bins=128,
            encoder_layers=p["a_layers"],
            encoder_attention_heads=p["a_heads"],
            encoder_ffn_dim=p["a_mlp"],
            d_model=p["a_hidden"],
            output_dim=p["hidden"],
            n_window=50,
            n_window_infer=100,
            conv_chunksize=50,
            downsample_hidden_size=p["a_hidden"],
            max_source_positions=1500,
        )
        ids_omni = dict(
            image_token_id=ids["image_token_id"],
            video_token_id=ids["video_token_id"],
            vision_start_token_id=ids["vision_start_token_id"],
            audio_token_id=tokenizer.convert_tokens_to_ids("<|audio_pad|>"),
            audio_start_token_id=tokenizer.convert_tokens_to_ids("<|audio_start|>"),
        )
        return Qwen3OmniMoeThinkerConfig(text_config=text, vision_config=vision, audio_config=audio, **ids_omni)
    raise ValueError(f"unknown tiny VLM kind {kind!r}; choose one of {VLM_KINDS}")


def build_tiny_vlm(
    out_dir: str | Path | None,
    texts: Iterable[str],
    *,
    kind: str = "qwen3_vl",
    preset: str = "vlm-student",
    image_size: int = 64,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    tokenizer=None,
    vocab_size: int = 1000,
):
    """Build (model, processor) of a tiny `kind` VLM; save both to `out_dir` when given.

    Pass `tokenizer` to share one vocabulary between a teacher and its students (logit KD needs it).
    """
    from transformers import AutoModelForImageTextToText

    from .contrastive import apply_overrides

    if tokenizer is None:
        tokenizer = train_qwen_tokenizer(texts, vocab_size=vocab_size)
    processor = make_processor(kind, tokenizer, image_size=image_size)
    config = vlm_config(kind, tokenizer, preset)
    if overrides:
        config = apply_overrides(config, overrides)
    torch.manual_seed(seed)
    if kind == "qwen3_omni_thinker":
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

        model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    else:
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


def qwen3_text_config(tokenizer, p: dict[str, Any], **extra):
    """A Qwen3Config of the text widths `p` (a VLM_PRESETS entry: hidden, layers, heads, kv_heads, head_dim, mlp),
    the tokenizer's vocabulary, pad and eos ids, tied embeddings."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=p["hidden"],
        intermediate_size=p["mlp"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"],
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **extra,
    )


def build_tiny_lm(out_dir: str | Path | None, texts: Iterable[str], *, preset: str = "vlm-student", seed: int = 0, overrides: dict[str, Any] | None = None, tokenizer=None, vocab_size: int = 1000):
    """A tiny text-only Qwen3ForCausalLM (the text widths of a VLM preset) + its tokenizer: the generative family's
    text-only chat models (its "processor" is the tokenizer). Saved to `out_dir` when given."""
    from transformers import Qwen3ForCausalLM

    from .contrastive import apply_overrides

    if tokenizer is None:
        tokenizer = train_qwen_tokenizer(texts, vocab_size=vocab_size)
    config = qwen3_text_config(tokenizer, VLM_PRESETS[preset])
    config.architectures = ["Qwen3ForCausalLM"]
    if overrides:
        from .generative import _fix_config

        config = _fix_config(apply_overrides(config, overrides), overrides)  # layer_types follow num_hidden_layers
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def build_tiny_seq_cls(out_dir: str | Path | None, texts: Iterable[str], *, preset: str = "vlm-student", seed: int = 0, tokenizer=None, vocab_size: int = 1000):
    """A tiny Qwen3ForSequenceClassification (one relevance logit) + its tokenizer."""
    from transformers import Qwen3ForSequenceClassification

    if tokenizer is None:
        tokenizer = train_qwen_tokenizer(texts, vocab_size=vocab_size)
    config = qwen3_text_config(tokenizer, VLM_PRESETS[preset], num_labels=1)
    torch.manual_seed(seed)
    model = Qwen3ForSequenceClassification(config)
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def build_tiny_moe_lm(
    out_dir: str | Path | None,
    texts: Iterable[str],
    *,
    preset: str = "vlm-student",
    num_experts: int = 8,
    top_k: int = 2,
    norm_topk_prob: bool = True,
    seed: int = 0,
    tokenizer=None,
    vocab_size: int = 1000,
):
    """A tiny Qwen3MoeForCausalLM (every layer sparse, expert width mlp / 2) + its tokenizer.

    ``norm_topk_prob`` defaults to True as in the released Qwen3-MoE checkpoints (the config class defaults to False).
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    if tokenizer is None:
        tokenizer = train_qwen_tokenizer(texts, vocab_size=vocab_size)
    p = VLM_PRESETS[preset]
    ids = _special_ids(tokenizer)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=p["hidden"],
        intermediate_size=p["mlp"],
        moe_intermediate_size=p["mlp"] // 2,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"],
        max_position_embeddings=1024,
        pad_token_id=ids["pad_token_id"],
        eos_token_id=ids["eos_token_id"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def copy_tokenizer(tokenizer):
    return copy.deepcopy(tokenizer)
