"""Image-text-to-text models (Qwen3-VL, Qwen2.5-VL, Qwen3-VL-MoE, Qwen3-Omni thinker, LLaVA-style).

The adapter loads a real Hugging Face VLM + processor by hub id or folder, turns chat records
into training batches (the model's own inputs plus the response span), runs the model into
``Signals`` (response-token logits only: ``lm_head`` is applied at the response positions, so
the full ``[B, T, V]`` logits are never built), and builds students: a smaller config from
scratch, or a shrunk copy of the teacher (a subset of its text decoder layers / vision blocks).

Alignment between a teacher and a student: each encodes the same records with its own
processor. Image-token counts may differ (different image sizes or merge factors), so the
sequences differ in length, but with the same tokenizer the response tokens are identical:
``response_ids [B, R]`` and ``response_mask [B, R]`` match exactly, and ``response_positions``
(each model's own) say where each model's logits for those tokens are.
"""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..data.audio import DEFAULT_SAMPLING_RATE, AudioError
from ..data.records import RecordError
from ..signals import Signals
from .contrastive import PairingError, apply_overrides

IGNORE_INDEX = -100

__all__ = [
    "load_vlm",
    "encode_chat",
    "model_inputs",
    "forward_signals",
    "response_ce",
    "check_pairing",
    "hidden_size",
    "vision_feature_size",
    "audio_feature_size",
    "has_audio_tower",
    "check_audio",
    "num_text_layers",
    "scratch_student",
    "inherit_student",
]


# ---------------------------------------------------------------------------------------------
# Loading


def _model_class(config):
    """The image-text-to-text class for `config`; falls back to config.architectures, then to the causal-LM
    class of a text-only model (Qwen3ForCausalLM, ...: the text-only chat path of this family)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    raise ValueError(f"model type {config.model_type!r} is neither an image-text-to-text model nor a causal LM transformers knows")


def load_vlm(name_or_path: str, *, trust_remote_code: bool = False):
    """Load an image-text-to-text model and its processor through the real `from_pretrained` path.

    Uses AutoModelForImageTextToText (which maps Qwen3-VL, Qwen2.5-VL, Qwen3-VL-MoE and the
    Qwen3-Omni thinker); otherwise the class named in config.architectures (a text-only causal LM
    such as Qwen3ForCausalLM, whose "processor" is then its tokenizer: AutoProcessor falls back to
    it). A full Qwen3-Omni model (thinker + talker) gives its thinker. Returns (model, processor).
    """
    from transformers import AutoConfig, AutoProcessor

    from . import load_dtype

    name = str(name_or_path)
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"cannot load model {name!r}: no such folder")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        cls = _model_class(config)
        model = cls.from_pretrained(name, dtype=load_dtype(config), trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing folder / hub id, unmappable config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"cannot load model {name!r}: {first}") from None
    if hasattr(model, "thinker") and isinstance(getattr(model, "thinker"), nn.Module):
        model = model.thinker  # Qwen3-Omni: the full model has no forward(); the thinker is the VLM
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise FileNotFoundError(f"cannot load model {name!r}: {type(model).__name__} has no backbone + lm_head")
    return model, processor


# ---------------------------------------------------------------------------------------------
# Batches


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _end_of_turn_id(tok) -> int:
    """The id that closes an assistant turn: <|im_end|> for Qwen chat templates, else eos."""
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if t in tok.get_vocab():
            return tok.convert_tokens_to_ids(t)
    if tok.eos_token_id is None:
        raise ValueError(f"{type(tok).__name__} has no end-of-turn token (no <|im_end|> and no eos)")
    return int(tok.eos_token_id)


def _image_token(processor) -> str | None:
    for attr in ("image_token",):
        t = getattr(processor, attr, None)
        if isinstance(t, str):
            return t
    tok = _tokenizer(processor)
    t = getattr(tok, "image_token", None)
    return t if isinstance(t, str) else None


def _audio_token(processor) -> str | None:
    t = getattr(processor, "audio_token", None)
    return t if isinstance(t, str) else None


def audio_sampling_rate(processor) -> int | None:
    """The sampling rate the processor's audio feature extractor takes, or None when it takes no audio."""
    fe = getattr(processor, "feature_extractor", None)
    if fe is None or _audio_token(processor) is None:
        return None
    return int(getattr(fe, "sampling_rate", None) or DEFAULT_SAMPLING_RATE)


def _messages(prompt: str, n_images: int, response: str | None, n_audio: int = 0) -> list[dict]:
    """Chat messages; without images or audio the content is a plain string (what text-only chat templates read)."""
    user = [{"type": "image"} for _ in range(n_images)] + [{"type": "audio"} for _ in range(n_audio)] + [{"type": "text", "text": prompt}]
    parts = len(user) > 1  # any media part
    msgs = [{"role": "user", "content": user if parts else prompt}]
    if response is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": response}] if parts else response})
    return msgs


def _ids(tok, text: str) -> list[int]:
    bos = tok.bos_token
    add = not (bos is not None and text.startswith(bos))  # templates that write the BOS themselves
    return tok(text, add_special_tokens=add)["input_ids"]


def _image_field(record) -> str:
    return "image" if getattr(record, "image", None) is not None or getattr(record, "images", None) is None else "images"


def encode_chat(
    processor,
    records: Sequence,
    images: Sequence[Sequence],
    *,
    audios: Sequence[Sequence] | None = None,
    response_field: str = "response",
    max_length: int | None = None,
    path: str = "<data>",
) -> dict[str, Tensor]:
    """A right-padded training batch for chat records and their loaded images (one list per record; an empty list
    for a text-only record, and `processor` may then be a plain tokenizer: a text-only causal LM).

    ``audios``: one list of clips (float arrays at the processor's sampling rate) per record, for records
    with ``audio``; None loads them from the records. A record with audio given to a processor that takes
    none (no feature extractor / audio token) is a RecordError on its ``audio`` field.

    Returns the model's own inputs (``input_ids``, ``attention_mask``, ``pixel_values``,
    ``image_grid_thw``, ``mm_token_type_ids`` when the processor makes it, ``input_features`` and
    ``feature_attention_mask`` for audio, ...) plus:

    - ``labels [B, T]``: -100 except at the response tokens and the closing end-of-turn token
    - ``response_ids [B, R]`` long: those target ids, left-aligned, padded with 0
    - ``response_positions [B, R]`` long: index of the logits that predict each (its index - 1), padded with 0
    - ``response_mask [B, R]`` bool
    - ``has_image [B]``, ``has_audio [B]`` bool: which samples carry an image / a clip (feature terms count only those)

    R is the longest response (+ end-of-turn) in the batch. Raises RecordError (one line, naming
    the record's line and field) for a missing/empty response, a wrong number of images, a chat
    template whose prompt is not a prefix of the conversation, or a response `max_length` would cut.
    """
    if len(records) != len(images):
        raise ValueError(f"encode_chat: {len(records)} records but {len(images)} image lists")
    if not records:
        raise ValueError("encode_chat: no records")
    tok = _tokenizer(processor)
    eot = _end_of_turn_id(tok)
    img_tok = _image_token(processor)
    aud_tok = _audio_token(processor)
    rate = audio_sampling_rate(processor)
    if audios is not None and len(audios) != len(records):
        raise ValueError(f"encode_chat: {len(records)} records but {len(audios)} audio lists")
    texts: list[str] = []
    flat_images: list = []
    flat_audio: list = []
    has_image: list[bool] = []
    has_audio: list[bool] = []
    tails: list[list[int]] = []  # per record: the token ids after the prompt (response + end of turn + template tail)
    spans: list[int] = []  # per record: how many of those are labelled (response + end of turn)
    for k, (rec, imgs) in enumerate(zip(records, images)):
        line = getattr(rec, "line", 0)
        imgs = list(imgs or [])
        field = _image_field(rec)
        refs = rec.audio_refs() if hasattr(rec, "audio_refs") else []
        if refs and rate is None:
            raise RecordError(
                path, line, "audio",
                f"the record carries audio but {type(processor).__name__} takes none (no audio feature extractor); "
                "give audio records to a model with an audio tower (e.g. a Qwen3-Omni thinker)",
            )
        if audios is not None:
            clips = list(audios[k] or [])
        else:
            try:
                clips = rec.load_audio(sampling_rate=rate) if refs else []
            except AudioError as e:
                raise RecordError(path, line, "audio", str(e)) from None
        if len(clips) != len(refs):
            raise RecordError(path, line, "audio", f"the record names {len(refs)} audio clip(s) but {len(clips)} were loaded")
        expected = len(rec.image_list) if hasattr(rec, "image_list") else len(imgs)
        if len(imgs) != expected:  # no image at all: a text-only (or audio-only) record
            raise RecordError(path, line, field, f"the record names {expected} image(s) but {len(imgs)} were loaded")
        response = getattr(rec, response_field, None)
        if response is None or not str(response).strip():
            what = "is missing" if response is None else "is empty"
            hint = " (generate teacher responses first)" if response_field == "teacher_response" and response is None else ""
            raise RecordError(path, line, response_field, f"{what}; the chat record needs a response to train on{hint}")
        full = processor.apply_chat_template(_messages(rec.prompt, len(imgs), str(response), len(clips)), tokenize=False)
        prompt = processor.apply_chat_template(_messages(rec.prompt, len(imgs), None, len(clips)), tokenize=False, add_generation_prompt=True)
        if clips and aud_tok is not None and full.count(aud_tok) != len(clips):
            raise RecordError(
                path, line, "audio",
                f"{len(clips)} audio clip(s) but the chat template places {full.count(aud_tok)} audio placeholder(s)",
            )
        if img_tok is not None:
            placed = full.count(img_tok)
            if placed != len(imgs):
                raise RecordError(
                    path, line, field,
                    f"{len(imgs)} image(s) but the chat template places {placed} image placeholder(s) "
                    f"(does the prompt contain {img_tok!r}?)",
                )
        full_ids, prompt_ids = _ids(tok, full), _ids(tok, prompt)
        if len(full_ids) <= len(prompt_ids) or full_ids[: len(prompt_ids)] != prompt_ids:
            raise RecordError(
                path, line, response_field,
                "the chat template's prompt (with generation prompt) is not a token prefix of the full conversation; "
                "cannot locate the response",
            )
        tail = full_ids[len(prompt_ids):]
        if eot not in tail:
            raise RecordError(path, line, response_field, f"the assistant turn has no closing {tok.convert_ids_to_tokens(eot)!r} token")
        n = tail.index(eot) + 1
        if n < 2:
            raise RecordError(path, line, response_field, "the response tokenises to nothing")
        texts.append(full)
        flat_images.extend(imgs)
        flat_audio.extend(clips)
        has_image.append(bool(imgs))
        has_audio.append(bool(clips))
        tails.append(tail)
        spans.append(n)

    bos = tok.bos_token
    add = not (bos is not None and texts[0].startswith(bos))
    # padding_side explicitly: the Omni processor defaults to left padding whatever the tokenizer says
    kwargs = dict(padding=True, padding_side="right", return_tensors="pt", add_special_tokens=add)
    if flat_audio:
        kwargs["sampling_rate"] = rate
    try:
        enc = processor(text=texts, **({"images": flat_images} if flat_images else {}), **({"audio": flat_audio} if flat_audio else {}), **kwargs)  # a tokenizer takes no images
    except ValueError as e:  # e.g. placeholder / image count mismatch inside the processor: find the record
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        culprit = records[0]
        for j, (rec, text, imgs) in enumerate(zip(records, texts, images)):
            clips = [flat_audio[sum(has_audio[:j])]] if has_audio[j] else []
            try:
                processor(text=[text], **({"images": list(imgs)} if imgs else {}), **({"audio": clips} if clips else {}), **kwargs)
            except ValueError:
                culprit = rec
                break
        raise RecordError(path, getattr(culprit, "line", 0), _image_field(culprit), f"the processor cannot place the images: {first}") from None
    batch = {k: v for k, v in enc.items() if isinstance(v, Tensor)}
    input_ids, attn = batch["input_ids"], batch["attention_mask"]
    B, T = input_ids.shape
    R = max(spans)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, R), dtype=torch.long)
    resp_ids = torch.zeros((B, R), dtype=torch.long)
    resp_mask = torch.zeros((B, R), dtype=torch.bool)
    for i, (rec, tail, n) in enumerate(zip(records, tails, spans)):
        length = int(attn[i].sum())
        start = length - len(tail)
        if start < 1 or input_ids[i, start:length].tolist() != tail:
            raise RecordError(
                path, getattr(rec, "line", 0), response_field,
                "the processor's tokens do not end with the tokenised response; cannot locate the response",
            )
        if max_length is not None and start + n > max_length:
            raise RecordError(
                path, getattr(rec, "line", 0), response_field,
                f"the conversation is {length} tokens and max_length={max_length} would cut the response "
                f"(prompt with images: {start} tokens); raise max_length or shorten the record",
            )
        ids = input_ids[i, start:start + n]
        labels[i, start:start + n] = ids
        positions[i, :n] = torch.arange(start - 1, start + n - 1)
        resp_ids[i, :n] = ids
        resp_mask[i, :n] = True
    if max_length is not None and T > max_length:
        # only the template tail (after the closing token) and padding can lie beyond max_length
        keep = max_length
        for k in list(batch):
            if batch[k].dim() == 2 and batch[k].shape[1] == T and k not in _AUDIO_INPUTS:
                batch[k] = batch[k][:, :keep]
        labels = labels[:, :keep]
    batch.update(labels=labels, response_ids=resp_ids, response_positions=positions, response_mask=resp_mask)
    batch.update(has_image=torch.tensor(has_image), has_audio=torch.tensor(has_audio))
    return batch


_NOT_INPUTS = {"labels", "response_ids", "response_positions", "response_mask", "has_image", "has_audio"}
_AUDIO_INPUTS = {"input_features", "feature_attention_mask"}  # per clip, not per token: never cut at max_length


def _accepted(fn) -> tuple[set[str], bool]:
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


def model_inputs(model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keys of `batch` that `model.forward` takes by name (the Omni thinker has no
    ``mm_token_type_ids`` parameter, Qwen-VL needs it); labels and response fields are dropped."""
    named, _ = _accepted(model.forward)
    return {k: v for k, v in batch.items() if k in named and k not in _NOT_INPUTS}


# ---------------------------------------------------------------------------------------------
# Forward


def _backbone(model) -> nn.Module:
    base = getattr(model, "model", None)
    if base is None or not hasattr(model, "lm_head"):
        raise ValueError(f"{type(model).__name__}: expected a `model` backbone and an `lm_head`")
    return base


def _cat_image_tokens(out) -> Tensor:
    """Merged visual tokens [N, D] from whatever get_image_features returns."""
    feats = out
    if not isinstance(feats, (Tensor, list, tuple)):
        feats = getattr(out, "pooler_output", None)
        if feats is None:
            feats = out.last_hidden_state
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1])


def _image_token_id(model) -> int | None:
    cfg = model.config
    for c in (cfg, getattr(cfg, "text_config", None)):
        for key in ("image_token_id", "image_token_index"):
            v = getattr(c, key, None) if c is not None else None
            if v is not None:
                return int(v)
    return None


def _audio_token_id(model) -> int | None:
    for c in (model.config, getattr(model.config, "text_config", None)):
        v = getattr(c, "audio_token_id", None) if c is not None else None
        if v is not None:
            return int(v)
    return None


def _pooled_placeholders(model, batch: dict[str, Tensor], tokens: Tensor, *, token_id: int | None = None, what: str = "visual") -> Tensor:
    """Per-sample mean of the visual (or audio) tokens fed to the LM: tokens [N, D] in placeholder order -> [B, D]
    (zeros for a sample without any)."""
    ids = batch["input_ids"]
    img_id = _image_token_id(model) if token_id is None else token_id
    if img_id is None:
        raise ValueError(f"{type(model).__name__}: no {'image' if what == 'visual' else what}_token_id in the config; cannot pool the {what} tokens")
    placeholder = ids == img_id
    counts = placeholder.sum(1).tolist()
    if sum(counts) != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} {what} tokens for {sum(counts)} placeholders")
    out = tokens.new_zeros(ids.shape[0], tokens.shape[-1])
    for i, part in enumerate(torch.split(tokens, counts)):
        if part.shape[0]:
            out[i] = part.mean(0)
    return out


def forward_signals(
    model, batch: dict[str, Tensor], *, features: Sequence[str] = (), text_layer: int | Sequence[int] = -2
) -> Signals:
    """Run the backbone and the LM head at the response positions only.

    Signals.logits [B, R, V] (logits that predict ``batch["response_ids"]``), Signals.mask =
    ``response_mask`` [B, R]. features (only those asked): ``"text_hidden"`` = hidden_states[text_layer]
    at the response positions [B, R, D] (hidden_states[0] = embeddings, [-1] = the final normed
    state; a list of layers gives a dict {layer: [B, R, D]}); ``"vision_pooled"`` = per-sample mean
    of the merged visual tokens fed to the LM [B, D_lm] (all images of a sample averaged together);
    ``"audio_pooled"`` = per-sample mean of the audio tower's output tokens fed to the LM [B, D_audio]
    (Qwen3-Omni). A sample without an image (clip) gets zeros there: ``batch["has_image"]`` /
    ``batch["has_audio"]`` say which samples count.
    """
    features = tuple(features)
    unknown = set(features) - {"text_hidden", "vision_pooled", "audio_pooled"}
    if unknown:
        raise ValueError(f"unknown generative features {sorted(unknown)}; choose from 'text_hidden', 'vision_pooled', 'audio_pooled'")
    base = _backbone(model)
    named, var_kw = _accepted(base.forward)
    # only what the backbone takes by name: the Omni thinker has no mm_token_type_ids parameter
    inputs = {k: v for k, v in batch.items() if k in named and k not in _NOT_INPUTS}
    visual = None
    if "vision_pooled" in features and batch.get("pixel_values") is not None:
        if "image_grid_thw" in batch:  # Qwen-VL family
            enc = base.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        else:
            enc = base.get_image_features(batch["pixel_values"])
        visual = _cat_image_tokens(enc)
        if "mm_encoder_outputs" in named and not isinstance(enc, (Tensor, list, tuple)):
            inputs.pop("pixel_values", None)  # reuse the vision forward instead of running it twice
            inputs["mm_encoder_outputs"] = {"image": enc}
    if "use_cache" in named or var_kw:
        inputs["use_cache"] = False
    want_hidden = "text_hidden" in features
    heard: list[Tensor] = []  # the audio tower's output tokens [N, D], caught on their way into the LM
    hook = None
    if "audio_pooled" in features:
        tower = getattr(base, "audio_tower", None)
        if tower is None:
            raise ValueError(f"{type(model).__name__} has no audio tower; feature 'audio_pooled' needs one")
        if batch.get("input_features") is not None:
            hook = tower.register_forward_hook(lambda m, i, o: heard.append(o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]))
    try:
        out = base(**inputs, output_hidden_states=want_hidden, return_dict=True)
    finally:
        if hook is not None:
            hook.remove()
    pos = batch["response_positions"]
    last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    idx = pos.unsqueeze(-1).expand(-1, -1, last.shape[-1]).to(last.device)
    picked = torch.gather(last, 1, idx)  # [B, R, D]
    sig = Signals(logits=model.lm_head(picked), mask=batch["response_mask"].to(last.device))
    if want_hidden:
        hs = out.hidden_states
        if hs is None:
            raise ValueError(f"{type(model).__name__} returned no hidden_states")
        many = not isinstance(text_layer, int)
        picked_hidden = {}
        for layer in (list(text_layer) if many else [text_layer]):
            if not -len(hs) <= layer < len(hs):
                raise ValueError(f"text_layer={layer} is out of range for {len(hs)} hidden states (embeddings + {len(hs) - 1} layers)")
            h = hs[layer]
            picked_hidden[layer] = torch.gather(h, 1, idx.to(h.device))
        sig.features["text_hidden"] = picked_hidden if many else picked_hidden[text_layer]
    B = pos.shape[0]
    if visual is not None:
        sig.features["vision_pooled"] = _pooled_placeholders(model, batch, visual.to(last.device))
    elif "vision_pooled" in features:  # no image in this batch
        sig.features["vision_pooled"] = last.new_zeros(B, vision_feature_size(model))
    if heard:
        tokens = heard[-1].reshape(-1, heard[-1].shape[-1]).to(last.device)
        sig.features["audio_pooled"] = _pooled_placeholders(model, batch, tokens, token_id=_audio_token_id(model), what="audio")
    elif "audio_pooled" in features:  # no clip in this batch
        sig.features["audio_pooled"] = last.new_zeros(B, audio_feature_size(model))
    return sig


def response_ce(signals: Signals, batch: dict[str, Tensor], num_items: int | Tensor | None = None) -> Tensor:
    """Token-mean cross-entropy of signals.logits [B, R, V] vs batch["response_ids"] on signals.mask.

    fp32 log-softmax; divides by `num_items` (e.g. the global token count across micro-batches)
    when given, else by the number of masked-in tokens; never by 0.
    """
    signals.require("logits", "mask", who="response_ce")
    logits, mask = signals.logits, signals.mask.bool()
    target = batch["response_ids"].to(logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, R]
    total = (nll * mask).sum()
    if num_items is None:
        return total / mask.sum().clamp_min(1)
    if isinstance(num_items, Tensor):
        return total / num_items.to(device=total.device, dtype=total.dtype).clamp_min(1.0)
    return total / max(float(num_items), 1.0)


# ---------------------------------------------------------------------------------------------
# Sizes and pairing


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else getattr(config, "text_config", config)


def hidden_size(model) -> int:
    """The language model's width (of logits' hidden states and text_hidden)."""
    return int(_text_config(model.config).hidden_size)


def vision_feature_size(model) -> int:
    """The width of ``vision_pooled``: the merged visual tokens (the LM width for Qwen-VL and LLaVA)."""
    vc = getattr(model.config, "vision_config", None)
    out = getattr(vc, "out_hidden_size", None) if vc is not None else None
    return int(out) if out else hidden_size(model)


def has_audio_tower(model) -> bool:
    """True when the model hears audio (an ``audio_config`` and an ``audio_tower``, e.g. the Qwen3-Omni thinker)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    base = getattr(model, "model", model)
    return getattr(model.config, "audio_config", None) is not None and getattr(base, "audio_tower", None) is not None


def audio_feature_size(model) -> int:
    """The width of ``audio_pooled``: the audio tower's output (the LM width for the Qwen3-Omni thinker)."""
    ac = getattr(model.config, "audio_config", None)
    out = getattr(ac, "output_dim", None) if ac is not None else None
    return int(out) if out else hidden_size(model)


def check_audio(model, name: str, records: Sequence, path: str) -> None:
    """A RecordError naming the first record with audio and the model when `model` has no audio tower."""
    first = next((r for r in records if getattr(r, "audio", None) is not None), None)
    if first is not None and not has_audio_tower(model):
        raise RecordError(
            path, first.line, "audio",
            f"the data carries audio but the model {name!r} ({type(model).__name__}) has no audio tower; "
            "use a model that hears audio (e.g. a Qwen3-Omni thinker) or drop the audio records",
        )


def num_text_layers(model) -> int:
    return int(_text_config(model.config).num_hidden_layers)


def _out_vocab(model) -> int:
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    return int(_text_config(model.config).vocab_size)


def check_pairing(teacher, teacher_processor, student, student_processor, *, need_logits: bool = True) -> None:
    """Logit KD needs one vocabulary: same tokenizer vocab and the same LM-head width. Raises PairingError."""
    if not need_logits:
        return
    hint = (
        "logit KD needs one vocabulary; use black-box (sequence-level) KD on teacher_response records instead "
        "(loss.terms: {sft: 1.0} with data.response_field: teacher_response)"
    )
    tv, sv = _tokenizer(teacher_processor).get_vocab(), _tokenizer(student_processor).get_vocab()
    if tv != sv:
        differ = len(set(tv.items()) ^ set(sv.items()))
        raise PairingError(
            f"teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens, {differ} token-id entries differ); {hint}"
        )
    t_out, s_out = _out_vocab(teacher), _out_vocab(student)
    if t_out != s_out:
        raise PairingError(f"teacher and student output vocab sizes differ ({t_out} vs {s_out}); {hint}")


# ---------------------------------------------------------------------------------------------
# Students


def _rescale_sections(sections: list[int], half: int) -> list[int]:
    """mrope sections scaled to sum to `half` (the last one absorbs rounding)."""
    total = sum(sections)
    new = [max(1, round(s * half / total)) for s in sections[:-1]]
    last = half - sum(new)
    if last < 1:
        raise ValueError(f"cannot split head_dim/2 = {half} into {len(sections)} mrope sections")
    return new + [last]


def _head_dim(tc) -> int:
    hd = getattr(tc, "head_dim", None)
    return int(hd) if hd else int(tc.hidden_size // tc.num_attention_heads)


def _fix_config(config, overrides: dict[str, Any]):
    """Keep dependent fields consistent after overrides (in place); raise ValueError where it cannot."""
    tc = _text_config(config)
    vc = getattr(config, "vision_config", None)
    if tc.num_attention_heads % max(1, getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads):
        raise ValueError(
            f"text num_attention_heads={tc.num_attention_heads} must be a multiple of num_key_value_heads={tc.num_key_value_heads}"
        )
    if getattr(tc, "head_dim", None) is None and tc.hidden_size % tc.num_attention_heads:
        raise ValueError(f"text hidden_size={tc.hidden_size} must be divisible by num_attention_heads={tc.num_attention_heads}")
    # layer_types: one entry per decoder layer
    types = getattr(tc, "layer_types", None)
    if types is not None and len(types) != tc.num_hidden_layers:
        if len(set(types)) > 1:
            raise ValueError(f"text layer_types has {len(types)} entries for {tc.num_hidden_layers} layers; override layer_types too")
        tc.layer_types = [types[0] if types else "full_attention"] * tc.num_hidden_layers
    only = getattr(tc, "mlp_only_layers", None)
    if only:
        tc.mlp_only_layers = [i for i in only if i < tc.num_hidden_layers]
    # multimodal rope: sections sum to head_dim / 2
    rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("mrope_section"):
        half = _head_dim(tc) // 2
        if sum(rope["mrope_section"]) != half:
            if any("rope" in k for k in overrides):  # the user set the rope: say so rather than change it
                raise ValueError(f"rope mrope_section {rope['mrope_section']} must sum to head_dim/2 = {half}")
            rope = dict(rope, mrope_section=_rescale_sections(list(rope["mrope_section"]), half))
            if getattr(tc, "rope_parameters", None) is not None:
                tc.rope_parameters = rope  # (`rope_scaling` is its deprecated alias in transformers 5)
            else:
                tc.rope_scaling = rope
    if vc is not None:
        if hasattr(vc, "out_hidden_size") and vc.out_hidden_size != tc.hidden_size:
            if any(k.endswith("vision_config.out_hidden_size") for k in overrides):
                raise ValueError(
                    f"vision_config.out_hidden_size={vc.out_hidden_size} must equal text_config.hidden_size={tc.hidden_size}"
                )
            vc.out_hidden_size = tc.hidden_size
        depth = getattr(vc, "depth", None) or getattr(vc, "num_hidden_layers", None)
        heads = getattr(vc, "num_heads", None) or getattr(vc, "num_attention_heads", None)
        if heads and vc.hidden_size % heads:
            raise ValueError(f"vision hidden_size={vc.hidden_size} must be divisible by its {heads} heads")
        if getattr(vc, "deepstack_visual_indexes", None) is not None:
            vc.deepstack_visual_indexes = [i for i in vc.deepstack_visual_indexes if i < depth]
        if getattr(vc, "fullatt_block_indexes", None) is not None:
            kept = [i for i in vc.fullatt_block_indexes if i < depth]
            vc.fullatt_block_indexes = kept or [depth - 1]
        n = getattr(vc, "num_position_embeddings", None)
        if n is not None and int(round(n**0.5)) ** 2 != n:
            raise ValueError(f"vision num_position_embeddings={n} must be a perfect square")
    return config


def scratch_student(config, overrides: dict[str, Any] | None = None, seed: int = 0):
    """A randomly initialised model of the config's class, with dotted `overrides`
    (``{"text_config.num_hidden_layers": 2, "text_config.hidden_size": 64, ...}``).

    Dependent fields are fixed up: the vision ``out_hidden_size`` follows the text width, rope
    ``mrope_section`` is rescaled to head_dim/2, ``deepstack_visual_indexes`` /
    ``fullatt_block_indexes`` / ``mlp_only_layers`` / ``layer_types`` follow the new depths.
    """
    if isinstance(config, nn.Module):
        config = config.config
    overrides = dict(overrides or {})
    cfg = apply_overrides(config, overrides) if overrides else copy.deepcopy(config)
    cfg = _fix_config(cfg, overrides)
    torch.manual_seed(seed)
    cls = _model_class(cfg)
    return cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)


_TEXT_LAYERS = ("model.language_model.layers", "language_model.model.layers", "model.layers")
_VISION_BLOCKS = ("model.visual.blocks", "visual.blocks")
_DEEPSTACK = ("model.visual.deepstack_merger_list", "model.visual.merger_list", "visual.deepstack_merger_list")  # Omni: merger_list
WIDTH_KEYS = {
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_heads",
    "moe_intermediate_size", "num_experts", "num_experts_per_tok", "out_hidden_size", "vocab_size",
    "patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels", "num_position_embeddings",
}


def _find_prefix(model, candidates: tuple[str, ...]) -> str | None:
    modules = dict(model.named_modules())
    for c in candidates:
        if isinstance(modules.get(c), nn.ModuleList):
            return c
    return None


def _check_keep(tower: str, keep: list[int], n: int) -> list[int]:
    keep = list(keep)
    if not keep or len(set(keep)) != len(keep) or any(not isinstance(i, int) or not 0 <= i < n for i in keep):
        raise PairingError(f"student.layers.{tower}: {keep} must be distinct indices of the teacher's {n} {tower} layers")
    return keep


def inherit_student(teacher: nn.Module, layers: dict[str, list[int]], overrides: dict[str, Any] | None = None):
    """Shrink the teacher by keeping the listed text decoder layers and/or vision blocks
    (``{"text": [0, 3], "vision": [0]}``), copying their weights and everything else
    (embeddings, norms, lm_head, merger, audio tower).

    The result is a plain model of the teacher's class with the right ``num_hidden_layers`` /
    vision ``depth``; Qwen3-VL's ``deepstack_visual_indexes`` (and their mergers) and Qwen2.5-VL's
    ``fullatt_block_indexes`` are remapped to the kept vision blocks (dropped when their block is
    removed); MoE ``mlp_only_layers`` / ``decoder_sparse_step`` keep each kept layer's MLP kind.
    Width changes are not made here (ValueError): `compress.prune.prune_widths` narrows a model first.
    """
    overrides = dict(overrides or {})
    for key in overrides:
        last = key.rsplit(".", 1)[-1]
        if last in WIDTH_KEYS:
            raise ValueError(
                f"inherit_student: width override {key!r} is not supported (only whole layers are dropped); "
                f"prune the widths first (compress.prune.prune_widths; a recipe's `init: inherit` does it), or use scratch_student"
            )
        if last in ("num_hidden_layers", "depth"):
            raise ValueError(f"inherit_student: set depths through `layers`, not the override {key!r}")
    for tower in layers:
        if tower not in ("text", "vision"):
            raise PairingError(f"student.layers: unknown tower {tower!r}; use 'text' and/or 'vision'")
    cfg = copy.deepcopy(teacher.config)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    tc = _text_config(cfg)
    vc = getattr(cfg, "vision_config", None)
    rename: dict[str, str] = {}  # student prefix -> teacher prefix (module lists)

    keep_t = layers.get("text")
    if keep_t is not None:
        prefix = _find_prefix(teacher, _TEXT_LAYERS)
        if prefix is None:
            raise ValueError(f"inherit_student: cannot find the text decoder layers of {type(teacher).__name__}")
        keep_t = _check_keep("text", keep_t, tc.num_hidden_layers)
        sparse_step = getattr(tc, "decoder_sparse_step", None)
        only = getattr(tc, "mlp_only_layers", None)
        if sparse_step is not None and only is not None and getattr(tc, "num_experts", 0):
            sparse = [(i not in only) and (i + 1) % sparse_step == 0 for i in range(tc.num_hidden_layers)]
            tc.decoder_sparse_step = 1
            tc.mlp_only_layers = [j for j, i in enumerate(keep_t) if not sparse[i]]
        if getattr(tc, "layer_types", None) is not None:
            tc.layer_types = [tc.layer_types[i] for i in keep_t]
        tc.num_hidden_layers = len(keep_t)
        for j, i in enumerate(keep_t):
            rename[f"{prefix}.{j}."] = f"{prefix}.{i}."

    keep_v = layers.get("vision")
    if keep_v is not None:
        prefix = _find_prefix(teacher, _VISION_BLOCKS)
        if prefix is None or vc is None or not hasattr(vc, "depth"):
            raise ValueError(f"inherit_student: cannot find the vision blocks of {type(teacher).__name__}")
        keep_v = _check_keep("vision", keep_v, vc.depth)
        if getattr(vc, "deepstack_visual_indexes", None) is not None:
            ds_prefix = _find_prefix(teacher, _DEEPSTACK)
            if ds_prefix is None and vc.deepstack_visual_indexes:
                raise ValueError(f"inherit_student: cannot find the deepstack mergers of {type(teacher).__name__}")
            new_ds = []
            for k, old in enumerate(vc.deepstack_visual_indexes):
                if old in keep_v:
                    rename[f"{ds_prefix}.{len(new_ds)}."] = f"{ds_prefix}.{k}."
                    new_ds.append(keep_v.index(old))
            vc.deepstack_visual_indexes = new_ds
        if getattr(vc, "fullatt_block_indexes", None) is not None:
            vc.fullatt_block_indexes = [keep_v.index(i) for i in vc.fullatt_block_indexes if i in keep_v]
        vc.depth = len(keep_v)
        for j, i in enumerate(keep_v):
            rename[f"{prefix}.{j}."] = f"{prefix}.{i}."

    cls = type(teacher)  # the teacher's own class: also text-only rerankers (Qwen3ForSequenceClassification)
    student = cls._from_config(cfg) if hasattr(cls, "_from_config") else cls(cfg)
    t_state = teacher.state_dict()
    pattern = re.compile("|".join(re.escape(k) for k in sorted(rename, key=len, reverse=True))) if rename else None
    new_state = {}
    for name, s_param in student.state_dict().items():
        src = name
        if pattern is not None:
            m = pattern.match(name)
            if m:
                src = rename[m.group(0)] + name[m.end():]
        if src not in t_state:
            raise ValueError(f"inherit_student: the teacher has no {src!r} for the student's {name!r}")
        t_param = t_state[src]
        if t_param.shape != s_param.shape:
            raise ValueError(f"inherit_student: {name} has shape {tuple(s_param.shape)}, teacher {src} {tuple(t_param.shape)}")
        new_state[name] = t_param.detach().clone()
    student.load_state_dict(new_state)
    dtype = next(teacher.parameters()).dtype
    student.to(dtype)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student
