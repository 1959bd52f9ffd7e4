"""ONNX export of the generative family's chat path: vision encoder + decoder with a KV cache, and a greedy runner.

What exports (``task="generate"``):

- **Qwen3-VL** (``Qwen3VLForConditionalGeneration``): two graphs.

  ``vision_encoder.onnx``: pixel_values [N, C·2·p·p] (the processor's flattened patches of every image, packed) +
  the grid-dependent tensors that transformers' ``vision_utils`` computes from ``image_grid_thw`` with Python loops
  and ``.tolist()`` — interp_indices / interp_weights [N, 4] (the learned position table resampled to each grid),
  rotary_pos_ids [N, 2] (h, w of each patch), cu_seqlens [images + 1] (where each image's patches start) — ->
  image_embeds [N / merge², D] and deepstack_embeds [deepstack layers, N / merge², D]. The tower's own forward takes
  these precomputed tensors (its ``kwargs`` hook); the attention over packed images, which eager runs per image by
  splitting on ``cu_seqlens.tolist()``, runs in the graph as one attention with a block-diagonal mask built from
  ``cu_seqlens`` by tensor ops (an attention function registered with transformers' ``AttentionInterface`` for the
  export only).

  ``decoder.onnx``: input_ids [B, T], vision_embeds [B, T, D] and vision_mask [B, T] (the image features already
  placed at the image-token positions; the graph takes ``where(mask, vision_embeds, embed(input_ids))``, what eager's
  ``masked_scatter`` gives), deepstack_embeds [layers, B, T, D] (zeros off the image positions: added to the first
  decoder layers' outputs, what eager's ``_deepstack_process`` adds at the image positions), position_ids [4, B, T]
  (row 0 the text positions, rows 1-3 the multimodal rope t/h/w positions that the model's own ``get_rope_index``
  computes in Python from the grids), attention_mask [B, past + T], past_key_i / past_value_i [B, kv heads, past,
  head dim] for each layer (past may be 0: one graph serves the prefill and every cached step) -> logits [B, V] (the
  last position's: what greedy decoding reads) and present_key_i / present_value_i [B, kv heads, past + T, head dim].

- **Qwen2.5-VL** (``Qwen2_5_VLForConditionalGeneration``): the same two graphs. Its vision tower attends within
  windows in most blocks and over each whole image in ``fullatt_block_indexes``, after reordering the merged tokens
  into window order; the order (window_index) and the window boundaries (cu_window_seqlens), which transformers'
  ``get_vision_window_index`` computes with Python loops, are inputs beside rotary_pos_ids and cu_seqlens, and both
  kinds of block run through the same block-diagonal attention. No deepstack: its decoder takes no deepstack_embeds.

- **Text-only causal LMs** of the family (``Qwen3ForCausalLM`` and other decoders whose transformers cache is one
  full-attention ``DynamicLayer`` per layer): ``decoder.onnx`` with input_ids, position_ids [B, T], attention_mask
  and the past key/values -> logits [B, V] and the present key/values.

- **MoE decoders** (Qwen3-VL-MoE, Qwen3-MoE causal LMs): the same graphs as their dense kin; transformers' default
  experts implementation (``grouped_mm``, a custom op with no ONNX lowering) is switched to its ``batched_mm`` one
  for the export (each token through its top-k experts by gathered weights: static shapes).

- **The Qwen3-Omni thinker** (``Qwen3OmniMoeThinkerForConditionalGeneration``): three graphs. ``vision_encoder.onnx``
  and ``decoder.onnx`` as Qwen3-VL's (its vision tower and MoE text model have the same shape: deepstack, four
  position rows, experts through ``batched_mm``); ``decoder.onnx``'s vision_embeds / vision_mask carry the audio
  features at the audio-token positions too. ``audio_encoder.onnx``: padded_feature [chunks, mel bins, frames] (each
  clip's log-mel frames cut in chunks of 2·n_window, right-padded), valid_indices [audio tokens] and cu_seqlens
  [windows + 1] -> audio_embeds [audio tokens, D]. The three index inputs are what transformers' own
  ``chunk_and_pad_features`` / ``get_valid_indices`` / ``get_audio_cu_seqlens`` compute with ``.tolist()`` and Python
  loops; the windowed attention runs as the vision tower's, one attention with a block-diagonal mask, and the
  convolutions over all chunks in one pass. Positions come from the thinker's own ``get_rope_index`` (text, images
  and audio), run without the weights.

Not exported (``ExportError`` naming the architecture, before anything is written): a full Qwen3-Omni model (thinker
+ talker: save and export its thinker), Qwen2-VL (not tried), decoders with sliding-window or other non-full cache
layers; video inputs (the runner takes images, and audio for the Omni thinker).

The weights live once, in the decoder (the embedding matrix is read by the graph's Gather and, tied, by the lm_head).
"""

from __future__ import annotations

import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TASK = "generate"
ATTN_NAME = "flash_packed_onnx_export"  # "flash" in the name: the tower then hands cu_seqlens to the attention function


class GenerativeExportError(ValueError):
    """A model the generative export does not cover (one line, with the reason)."""


# ---------------------------------------------------------------------------------------------
# What a folder holds


def generative_kind(config) -> str:
    """qwen3_vl | qwen2_5_vl | qwen3_omni | causal_lm for the architectures the export covers; GenerativeExportError otherwise."""
    mt = str(getattr(config, "model_type", ""))
    arch = (getattr(config, "architectures", None) or [mt])[0]
    if mt in ("qwen3_vl", "qwen2_5_vl"):
        return mt
    if mt == "qwen3_vl_moe":
        return "qwen3_vl"  # the same graphs; the experts export through transformers' batched_mm implementation
    if mt == "qwen2_vl":
        raise GenerativeExportError(f"{arch}: the generative ONNX export covers Qwen3-VL (+ MoE), Qwen2.5-VL, the Qwen3-Omni thinker and text-only causal LMs; Qwen2-VL is not exported (not tried)")
    if mt == "qwen3_omni_moe_thinker":
        return "qwen3_omni"
    if mt == "qwen3_omni_moe":
        raise GenerativeExportError(f"{arch}: a full Qwen3-Omni model (thinker + talker) is not exported; save its thinker alone (model.thinker.save_pretrained(DIR) with the processor) and export that: the chat path is the thinker's")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and hasattr(config, "num_hidden_layers"):
        from transformers.cache_utils import get_layer_types_and_kwargs

        types_, _ = get_layer_types_and_kwargs(config)
        odd = sorted(set(types_) - {"full_attention"})
        if odd:
            raise GenerativeExportError(f"{arch}: {', '.join(odd)} cache layers are not exported (the decoder graph carries a full-attention KV cache per layer)")
        return "causal_lm"
    raise GenerativeExportError(f"{arch}: not a Qwen3-VL / Qwen2.5-VL / Qwen3-Omni thinker model or a text-only causal LM; the generative ONNX export does not cover it")


# ---------------------------------------------------------------------------------------------
# The modules that become graphs


def _flat_cache(cache) -> list[Tensor]:
    out: list[Tensor] = []
    for layer in cache.layers:
        out += [layer.keys, layer.values]
    return out


def _cache_from(config, past: Sequence[Tensor]):
    """A transformers DynamicCache holding the flat past key/values (k0, v0, k1, v1, ...)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i in range(len(past) // 2):
        cache.layers[i].update(past[2 * i], past[2 * i + 1])
    return cache


class CausalLMDecoder(nn.Module):
    """input_ids [B, T], position_ids [B, T], attention_mask [B, P + T], past k/v [B, kv, P, d] per layer ->
    logits [B, V] (last position), present k/v [B, kv, P + T, d] per layer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, *past: Tensor):
        cache = _cache_from(self.model.config, past)
        out = self.model.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        logits = self.model.lm_head(out.last_hidden_state[:, -1])
        return (logits, *_flat_cache(out.cache))


class QwenVLDecoder(nn.Module):
    """input_ids, vision_embeds, vision_mask, [deepstack_embeds (Qwen3-VL)], position_ids [4, B, T], attention_mask,
    past k/v -> logits [B, V] (last position), present k/v."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.lm = model.model.language_model

    def forward(self, input_ids: Tensor, vision_embeds: Tensor, vision_mask: Tensor, position_ids: Tensor, attention_mask: Tensor, *past: Tensor):
        embeds = torch.where(vision_mask[..., None], vision_embeds, self.lm.embed_tokens(input_ids))  # [B, T, D]
        cache = _cache_from(self.model.config, past)
        out = self.lm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        logits = self.model.lm_head(out.last_hidden_state[:, -1])
        return (logits, *_flat_cache(out.cache))


class Qwen3VLDecoder(QwenVLDecoder):
    def forward(self, input_ids: Tensor, vision_embeds: Tensor, vision_mask: Tensor, deepstack_embeds: Tensor, position_ids: Tensor, attention_mask: Tensor, *past: Tensor):
        embeds = torch.where(vision_mask[..., None], vision_embeds, self.lm.embed_tokens(input_ids))  # [B, T, D]
        cache = _cache_from(self.model.config, past)
        # deepstack: eager adds each vision layer's features at the image positions of the first decoder layers'
        # outputs; here they come dense [B, T, D] with zeros elsewhere, so the same add is a plain sum
        self.lm._deepstack_process = lambda hidden, _mask, embeds_: hidden + embeds_
        try:
            out = self.lm(
                inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, cache=cache, use_cache=True,
                visual_pos_masks=vision_mask, deepstack_visual_embeds=list(deepstack_embeds.unbind(0)),
            )
        finally:
            del self.lm._deepstack_process
        logits = self.model.lm_head(out.last_hidden_state[:, -1])
        return (logits, *_flat_cache(out.cache))


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None, **kwargs):
    """Attention over the patches of several images packed in one sequence, each image attending to itself only.

    query / key / value [1, heads, N, d]; cu_seq_lens_q [images + 1] the boundaries. Eager (sdpa) splits the sequence
    on ``cu_seqlens.tolist()`` and attends per image; a block-diagonal mask gives the same result with tensor ops
    only, so the graph takes any number of images of any grids. Returns [1, N, heads, d]."""
    n = query.shape[2]
    image_of = (torch.arange(n, device=query.device)[:, None] >= cu_seq_lens_q[None, 1:].to(torch.long)).sum(-1)  # [N]
    mask = image_of[:, None] == image_of[None, :]  # [N, N]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


class Qwen3VLVision(nn.Module):
    """pixel_values [N, C·t·p·p], interp_indices / interp_weights [N, 4], rotary_pos_ids [N, 2], cu_seqlens [images + 1]
    -> image_embeds [N / merge², D], deepstack_embeds [deepstack layers, N / merge², D]."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: Tensor, interp_indices: Tensor, interp_weights: Tensor, rotary_pos_ids: Tensor, cu_seqlens: Tensor):
        out = self.visual(
            pixel_values, grid_thw=None, interp_indices=interp_indices, interp_weights=interp_weights,
            position_ids=rotary_pos_ids, cu_seqlens=cu_seqlens, max_seqlen=0, return_dict=True,
        )
        return out.pooler_output, torch.stack(list(out.deepstack_features))


class Qwen25VLVision(nn.Module):
    """pixel_values [N, C·t·p·p], rotary_pos_ids [N, 2], cu_seqlens [images + 1], window_index [N / merge²] (the
    window order of the merged tokens), cu_window_seqlens [windows + 1] -> image_embeds [N / merge², D]."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: Tensor, rotary_pos_ids: Tensor, cu_seqlens: Tensor, window_index: Tensor, cu_window_seqlens: Tensor):
        out = self.visual(
            pixel_values, grid_thw=None, position_ids=rotary_pos_ids, cu_seqlens=cu_seqlens, max_seqlen=0,
            window_index=window_index, cu_window_seqlens=cu_window_seqlens, max_window_seqlen=0, return_dict=True,
        )
        return out.pooler_output


class OmniAudio(nn.Module):
    """padded_feature [chunks, mel bins, chunk frames] (each clip's log-mel frames cut in chunks of 2·n_window and
    right-padded), valid_indices [audio tokens] (the unpadded positions of the flattened [chunks · frames after the
    convolutions] grid), cu_seqlens [windows + 1] (the attention windows over those tokens) -> audio_embeds
    [audio tokens, D]: the Qwen3-Omni audio tower, whose forward takes these precomputed tensors (its ``kwargs``)."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, padded_feature: Tensor, valid_indices: Tensor, cu_seqlens: Tensor):
        # chunk_lengths is only read to compute the other three when they are not given; any tensor stands in for it
        out = self.tower(
            None, None, padded_feature=padded_feature, chunk_lengths=cu_seqlens, valid_indices=valid_indices,
            cu_seqlens=cu_seqlens, max_seqlen=0, return_dict=True,
        )
        return out.last_hidden_state


class _one_conv_pass:
    """Within the block: the audio tower runs its three convolutions over all chunks at once. Eager splits them in
    groups of ``conv_chunksize`` chunks to bound memory; a split by a data-dependent count has no static graph."""

    def __init__(self, tower):
        self.tower = tower

    def __enter__(self):
        self.old = self.tower.conv_chunksize
        self.tower.conv_chunksize = 2**30

    def __exit__(self, *exc):
        self.tower.conv_chunksize = self.old


def audio_inputs(config, input_features: Tensor, feature_attention_mask: Tensor) -> dict[str, Tensor]:
    """The audio graph's inputs for a batch of clips as the processor gives them (input_features [B, mel, frames],
    feature_attention_mask [B, frames]), computed in Python by transformers' own Qwen3-Omni helpers (what the tower
    computes from the features and their lengths when it is not given them)."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as om

    ac = config.audio_config
    lens = feature_attention_mask.sum(-1)
    feats = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)  # [mel, all frames]
    padded, chunk_lengths = om.chunk_and_pad_features(feats, lens, int(ac.n_window))
    return {
        "padded_feature": padded.float(),
        "valid_indices": om.get_valid_indices(chunk_lengths, int(ac.n_window)),
        "cu_seqlens": om.get_audio_cu_seqlens(chunk_lengths, lens, int(ac.n_window_infer), int(ac.n_window)),
    }


class _packed_attention_on:
    """Within the block: the vision tower's attention is `packed_attention` (registered under ATTN_NAME)."""

    def __init__(self, visual):
        self.config = visual.config

    def __enter__(self):
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, packed_attention)
        self.old = self.config._attn_implementation
        self.config._attn_implementation = ATTN_NAME

    def __exit__(self, *exc):
        self.config._attn_implementation = self.old


def vision_inputs(config, image_grid_thw: Tensor) -> dict[str, Tensor]:
    """The grid-dependent inputs of the vision graph, computed in Python by transformers' own vision_utils
    (what the tower computes from image_grid_thw when it is not given them)."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights, get_vision_position_ids, get_vision_window_index

    vc = config.vision_config
    merge = int(vc.spatial_merge_size)
    if config.model_type == "qwen2_5_vl":
        window_index, cu_window = get_vision_window_index(image_grid_thw, spatial_merge_size=merge, window_size=int(vc.window_size), patch_size=int(vc.patch_size))
        return {
            "rotary_pos_ids": get_vision_position_ids(image_grid_thw, merge),
            "cu_seqlens": get_vision_cu_seqlens(image_grid_thw),
            "window_index": window_index,
            "cu_window_seqlens": cu_window,
        }
    idx, w = get_vision_interpolation_indices_and_weights(
        image_grid_thw, num_grid_per_side=int(vc.num_position_embeddings**0.5), mode="bilinear", align_corners=True, spatial_merge_size=merge,
    )
    return {
        "interp_indices": idx,
        "interp_weights": w.float(),
        "rotary_pos_ids": get_vision_position_ids(image_grid_thw, merge),
        "cu_seqlens": get_vision_cu_seqlens(image_grid_thw),
    }


def rope_index(config, input_ids: Tensor, mm_token_type_ids: Tensor, image_grid_thw: Tensor | None, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(position_ids [3, B, T], rope_deltas [B, 1]): the model's own ``get_rope_index`` (Qwen3-VL / Qwen2.5-VL), run without the model's weights
    (it reads only the config and the grids)."""
    if config.model_type == "qwen3_omni_moe_thinker":
        raise ValueError("the Qwen3-Omni thinker's positions come from omni_rope_index")
    if config.model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as cls
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel as cls

    holder = types.SimpleNamespace(config=config)
    holder.get_vision_position_ids = lambda *a, **k: cls.get_vision_position_ids(holder, *a, **k)
    return cls.get_rope_index(holder, input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask)


def omni_rope_index(config, input_ids: Tensor, image_grid_thw: Tensor | None, attention_mask: Tensor, audio_seqlens: Tensor | None) -> Tensor:
    """position_ids [3, B, T] of a Qwen3-Omni thinker prompt (text, images and audio): the thinker's own
    ``get_rope_index``, run without the model's weights (it reads the config, the grids and the clips' frame counts)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoePreTrainedModelForConditionalGeneration as cls

    holder = types.SimpleNamespace(config=config, spatial_merge_size=int(config.vision_config.spatial_merge_size))
    holder.get_llm_pos_ids_for_vision = lambda *a, **k: cls.get_llm_pos_ids_for_vision(holder, *a, **k)
    holder.get_chunked_index = lambda *a, **k: cls.get_chunked_index(holder, *a, **k)
    pos, _ = cls.get_rope_index(holder, input_ids, image_grid_thw, None, attention_mask, False, audio_seqlens, None)
    return pos


def _thinker_config(config):
    """The thinker's config of a full Qwen3-Omni model's config; any other config as it is."""
    return getattr(config, "thinker_config", None) or config


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dims: list) -> None:
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5e9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=True, input_names=inputs, output_names=outputs, dynamic_shapes=dims,
            opset_version=18, external_data=big, verbose=False,
        )


def _kv_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _text_config(config):
    return getattr(config, "text_config", config)


def _has_experts(model) -> bool:
    return any(type(m).__name__.endswith("Experts") for m in model.modules())


def export_generative(model, kind: str, out: Path, log: Callable = print) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write decoder.onnx (and vision_encoder.onnx for the VLMs) to `out`; returns ({graph: path}, manifest fields).

    MoE decoders: transformers' default experts implementation (grouped_mm) is a custom op with no ONNX lowering; for
    the export the model switches to its ``batched_mm`` implementation (each token's top-k experts by gathered
    weights, static shapes), then back."""
    if not _has_experts(model):
        return _export_generative(model, kind, out, log)
    before = model.config._experts_implementation
    model.set_experts_implementation("batched_mm")
    try:
        paths, fields = _export_generative(model, kind, out, log)
    finally:
        model.set_experts_implementation(before)
    fields["experts"] = f"batched_mm in the graph (eager runs {before})"
    return paths, fields


def _export_generative(model, kind: str, out: Path, log: Callable = print) -> tuple[dict[str, Path], dict[str, Any]]:
    Dim = torch.export.Dim
    tc = _text_config(model.config)
    n_layers, kv, hd, hidden = int(tc.num_hidden_layers), int(tc.num_key_value_heads), int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads), int(tc.hidden_size)
    B, T, P = 2, 5, 3  # example sizes; every one of them is a dynamic dimension of the graphs
    batch, seq, past_len, total = Dim("batch"), Dim("sequence"), Dim("past"), Dim("total")
    gen = torch.Generator().manual_seed(0)
    past = tuple(torch.randn(B, kv, P, hd, generator=gen) for _ in range(2 * n_layers))
    ids = torch.randint(0, int(tc.vocab_size), (B, T), generator=gen)
    mask = torch.ones(B, P + T, dtype=torch.long)
    kv_dims = tuple({0: batch, 2: past_len} for _ in range(2 * n_layers))
    paths: dict[str, Path] = {}
    fields: dict[str, Any] = {"kind": kind, "num_layers": n_layers, "num_key_value_heads": kv, "head_dim": hd, "hidden_size": hidden, "vocab_size": int(tc.vocab_size)}
    if kind == "causal_lm":
        pos = torch.arange(P, P + T).expand(B, T).contiguous()
        names = ["input_ids", "position_ids", "attention_mask"] + _kv_names(n_layers, "past")
        dims = [{0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: total}, kv_dims]
        log(f"exporting decoder.onnx ({type(model).__name__}, {n_layers} layers, KV cache)")
        _export(CausalLMDecoder(model), (ids, pos, mask, *past), out / "decoder.onnx", names, ["logits"] + _kv_names(n_layers, "present"), dims)
        paths["decoder"] = out / "decoder.onnx"
        fields["position_ids"] = "[B, T]: attention_mask.cumsum(-1) - 1 (0 at padding)"
        return paths, fields

    # Qwen3-VL / Qwen2.5-VL / the Qwen3-Omni thinker
    cfg = model.config
    vc = cfg.vision_config
    n_ds = len(vc.deepstack_visual_indexes) if kind in ("qwen3_vl", "qwen3_omni") else 0
    unit = int(vc.spatial_merge_size)
    if kind == "qwen2_5_vl":  # grids big enough for several attention windows, and one image alone
        w = int(vc.window_size) // int(vc.patch_size)  # a window's side in patches
        grid = torch.tensor([[1, 2 * w, 2 * w], [1, unit, w + unit]])
    else:
        grid = torch.tensor([[1, 2 * unit, 2 * unit], [1, unit, 2 * unit]])  # two images of different grids, packed
    n_patches = int(grid.prod(-1).sum())
    pv = torch.randn(n_patches, int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2, generator=gen)
    vis_in = vision_inputs(cfg, grid)
    v_names = ["pixel_values", *vis_in]
    patches, merged, bounds, windows = Dim("patches"), Dim("merged_tokens"), Dim("images_plus_1"), Dim("windows_plus_1")
    axis = {"interp_indices": {0: patches}, "interp_weights": {0: patches}, "rotary_pos_ids": {0: patches}, "cu_seqlens": {0: bounds}, "window_index": {0: merged}, "cu_window_seqlens": {0: windows}}
    wrapper, v_outs = (Qwen3VLVision(model.model.visual), ["image_embeds", "deepstack_embeds"]) if n_ds else (Qwen25VLVision(model.model.visual), ["image_embeds"])
    log(f"exporting vision_encoder.onnx ({type(model.model.visual).__name__}, {vc.depth} blocks, packed images)")
    with _packed_attention_on(model.model.visual):
        _export(wrapper, (pv, *vis_in.values()), out / "vision_encoder.onnx", v_names, v_outs, [{0: patches}] + [axis[k] for k in vis_in])
    paths["vision_encoder"] = out / "vision_encoder.onnx"
    if kind == "qwen3_omni":
        paths["audio_encoder"] = _export_audio(model, out, gen, log)
        fields.update(
            audio_token_id=int(cfg.audio_token_id), audio_start_token_id=int(cfg.audio_start_token_id),
            audio_inputs="transformers.models.qwen3_omni_moe on the processor's input_features and feature_attention_mask: chunk_and_pad_features, get_valid_indices, get_audio_cu_seqlens",
            multimodal_embeds="vision_embeds / vision_mask carry the audio features at the audio-token positions too (deepstack_embeds: image positions only)",
        )

    vmask = torch.zeros(B, T, dtype=torch.bool)
    vmask[:, 1:3] = True
    pos = torch.arange(P, P + T).view(1, 1, T).expand(4, B, T).contiguous()
    vis_args, vis_names, vis_dims = [torch.randn(B, T, hidden, generator=gen), vmask], ["vision_embeds", "vision_mask"], [{0: batch, 1: seq}, {0: batch, 1: seq}]
    if n_ds:
        vis_args.append(torch.randn(n_ds, B, T, hidden, generator=gen))
        vis_names.append("deepstack_embeds")
        vis_dims.append({1: batch, 2: seq})
    names = ["input_ids", *vis_names, "position_ids", "attention_mask"] + _kv_names(n_layers, "past")
    dims = [{0: batch, 1: seq}, *vis_dims, {1: batch, 2: seq}, {0: batch, 1: total}, kv_dims]
    log(f"exporting decoder.onnx ({type(model.model.language_model).__name__}, {n_layers} layers, deepstack {n_ds}, KV cache)")
    _export(Qwen3VLDecoder(model) if n_ds else QwenVLDecoder(model), (ids, *vis_args, pos, mask, *past), out / "decoder.onnx", names, ["logits"] + _kv_names(n_layers, "present"), dims)
    paths["decoder"] = out / "decoder.onnx"
    fields.update(
        deepstack_layers=n_ds, image_token_id=int(cfg.image_token_id), video_token_id=int(cfg.video_token_id),
        spatial_merge_size=int(vc.spatial_merge_size),
        position_ids=f"[4, B, T]: row 0 attention_mask.cumsum(-1) - 1 (0 at padding), rows 1-3 {type(model.model).__name__}.get_rope_index (t, h, w); each cached step: the last column + 1",
        vision_inputs="transformers.vision_utils on image_grid_thw: " + ("get_vision_interpolation_indices_and_weights (bilinear, align_corners), get_vision_position_ids, get_vision_cu_seqlens" if n_ds else "get_vision_position_ids, get_vision_cu_seqlens, get_vision_window_index"),
    )
    return paths, fields


def _export_audio(model, out: Path, gen: torch.Generator, log: Callable) -> Path:
    """audio_encoder.onnx of a Qwen3-Omni thinker: two clips of different lengths as the example (several chunks,
    a short last chunk, several attention windows); chunks, frames, tokens and windows are dynamic dimensions."""
    Dim = torch.export.Dim
    tower = model.model.audio_tower
    ac = tower.config
    n2 = 2 * int(ac.n_window)  # frames per chunk
    lens = torch.tensor([2 * n2 + n2 // 3, n2 // 2])
    feats = torch.randn(2, int(ac.num_mel_bins), int(lens.max()), generator=gen)
    fmask = (torch.arange(int(lens.max()))[None] < lens[:, None]).long()
    example = audio_inputs(model.config, feats, fmask)
    # the bounds are what export's guards ask: the three stride-2 convolutions need >= 9 frames to give more than one
    # step, a chunk has at most 2·n_window frames; 1 chunk and 1 window run too (checked in the tests)
    dims = [{0: Dim("chunks", min=2, max=2**30), 2: Dim("chunk_frames", min=9, max=n2)}, {0: Dim("audio_tokens")}, {0: Dim("windows_plus_1", min=3)}]
    log(f"exporting audio_encoder.onnx ({type(tower).__name__}, {ac.encoder_layers} layers, packed clips)")
    with _packed_attention_on(tower), _one_conv_pass(tower):
        _export(OmniAudio(tower), tuple(example.values()), out / "audio_encoder.onnx", list(example), ["audio_embeds"], dims)
    return out / "audio_encoder.onnx"


# ---------------------------------------------------------------------------------------------
# Running the graphs: greedy generation with the KV cache


class OnnxChatModel:
    """The exported chat graphs in onnxruntime: prefill, then one token per step with the KV cache (greedy)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], sessions: dict[str, Any], processor):
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.manifest = manifest
        self.kind = manifest["kind"]
        self.sessions = sessions
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = _thinker_config(AutoConfig.from_pretrained(str(folder)))
        self.n_layers = int(manifest["num_layers"])
        self.eos_ids = list(manifest.get("eos_token_ids", []))

    # inputs as the eager ChatModel builds them
    def encode(self, messages: list[dict], images: list, audios: list | None = None) -> dict[str, Tensor]:
        """The processor's tensors for one chat prompt; `audios`: clips (float arrays at the feature extractor's
        sampling rate), for the Omni thinker."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self.kind == "causal_lm":
            enc = self.processor(text=[text], return_tensors="pt")
        elif audios:
            if self.kind != "qwen3_omni":
                raise ValueError(f"{self.folder}: audio given to a {self.kind} export, which has no audio graph")
            rate = int(self.processor.feature_extractor.sampling_rate)
            enc = self.processor(text=[text], images=images or None, audio=list(audios), sampling_rate=rate, return_tensors="pt")
        else:
            enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        return {k: v for k, v in enc.items() if isinstance(v, Tensor)}

    def audio_features(self, input_features: Tensor, feature_attention_mask: Tensor) -> np.ndarray:
        """audio_embeds [audio tokens, D] of the batch's clips, in order."""
        feeds = {k: v.numpy() for k, v in audio_inputs(self.config, input_features, feature_attention_mask).items()}
        return self.sessions["audio_encoder"].run(None, feeds)[0]

    def image_features(self, pixel_values: Tensor, image_grid_thw: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(image_embeds [N / merge², D], deepstack_embeds [layers, N / merge², D] or None) of the packed images."""
        feeds = {"pixel_values": pixel_values.float().numpy()} | {k: v.numpy() for k, v in vision_inputs(self.config, image_grid_thw).items()}
        out = self.sessions["vision_encoder"].run(None, feeds)
        return out[0], (out[1] if len(out) > 1 else None)

    def _prefill_feeds(self, inputs: dict[str, Tensor]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ids = inputs["input_ids"].long()
        am = inputs.get("attention_mask", torch.ones_like(ids)).long()
        B, T = ids.shape
        text_pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)  # [B, T]
        kv, hd = int(self.manifest["num_key_value_heads"]), int(self.manifest["head_dim"])
        past = {n: np.zeros((B, kv, 0, hd), np.float32) for n in _kv_names(self.n_layers, "past")}
        if self.kind == "causal_lm":
            return {"input_ids": ids.numpy(), "position_ids": text_pos.numpy(), "attention_mask": am.numpy()} | past, text_pos[:, -1].numpy()
        D = int(self.manifest["hidden_size"])
        vision = np.zeros((B, T, D), np.float32)
        n_ds = int(self.manifest.get("deepstack_layers", 0))
        deep = np.zeros((n_ds, B, T, D), np.float32)
        vmask = np.zeros((B, T), bool)
        grid = inputs.get("image_grid_thw")
        images = grid is not None and "pixel_values" in inputs
        if images:
            emb, ds = self.image_features(inputs["pixel_values"], grid)
            vmask = (ids == int(self.manifest["image_token_id"])).numpy()
            if int(vmask.sum()) != emb.shape[0]:
                raise ValueError(f"{int(vmask.sum())} image tokens in the prompt but the vision graph gave {emb.shape[0]} features")
            vision[vmask] = emb  # row-major over (batch, position): the order of eager's masked_scatter
            if n_ds:
                deep[:, vmask] = ds
        fam = inputs.get("feature_attention_mask")
        if "input_features" in inputs and fam is not None:
            if "audio_encoder" not in self.sessions:
                raise ValueError(f"{self.folder}: audio inputs but the export has no audio graph")
            aemb = self.audio_features(inputs["input_features"], fam)
            amask = (ids == int(self.manifest["audio_token_id"])).numpy()
            if int(amask.sum()) != aemb.shape[0]:
                raise ValueError(f"{int(amask.sum())} audio tokens in the prompt but the audio graph gave {aemb.shape[0]} features")
            vision[amask] = aemb
            vmask = vmask | amask
        if self.kind == "qwen3_omni":  # its own rope index over text, images and audio
            rope = omni_rope_index(self.config, ids, grid if images else None, am, fam.sum(-1) if "input_features" in inputs and fam is not None else None)
        elif images:
            mm = inputs.get("mm_token_type_ids")
            if mm is None:
                raise ValueError("Qwen3-VL inputs with images need mm_token_type_ids (the processor makes it)")
            rope, _ = rope_index(self.config, ids, mm, grid, am)  # [3, B, T]
        else:
            rope = text_pos[None].expand(3, B, T)
        pos = torch.cat([text_pos[None], rope.to(text_pos.dtype)], 0)  # [4, B, T]
        feeds = {"input_ids": ids.numpy(), "vision_embeds": vision, "vision_mask": vmask, "position_ids": pos.numpy(), "attention_mask": am.numpy()}
        if n_ds:
            feeds["deepstack_embeds"] = deep
        return feeds | past, pos[:, :, -1].numpy()

    def decode(self, inputs: dict[str, Tensor], max_new_tokens: int, *, eos_ids: Sequence[int] | None = None, temperature: float = 0.0, seed: int | None = None):
        """Yield (next token ids [B], logits [B, V]) one step at a time: the prefill, then one cached decoder call per
        token; greedy at temperature 0, else sampled from softmax(logits / temperature). Rows that produced a stop
        token get the pad id from then on; it stops when every row has."""
        eos = set(self.eos_ids if eos_ids is None else eos_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rng = np.random.default_rng(seed)
        feeds, last_pos = self._prefill_feeds(inputs)
        dec = self.sessions["decoder"]
        out_names = ["logits"] + _kv_names(self.n_layers, "present")
        B = feeds["input_ids"].shape[0]
        am = feeds["attention_mask"]
        done = np.zeros(B, bool)
        for _ in range(max_new_tokens):
            res = dec.run(out_names, feeds)
            logits = res[0]
            if temperature > 0:
                z = logits.astype(np.float64) / temperature
                p = np.exp(z - z.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                nxt = np.array([rng.choice(p.shape[-1], p=row) for row in p])
            else:
                nxt = logits.argmax(-1)
            nxt = np.where(done, pad, nxt)
            yield nxt, logits
            done |= np.isin(nxt, list(eos))
            if done.all():
                return
            am = np.concatenate([am, np.ones((B, 1), am.dtype)], 1)
            last_pos = last_pos + 1
            feeds = {"input_ids": nxt[:, None].astype(np.int64), "attention_mask": am}
            feeds |= {n.replace("present", "past"): t for n, t in zip(out_names[1:], res[1:])}
            if self.kind == "causal_lm":
                feeds["position_ids"] = last_pos[:, None].astype(np.int64)
            else:
                D = int(self.manifest["hidden_size"])
                feeds |= {"vision_embeds": np.zeros((B, 1, D), np.float32), "vision_mask": np.zeros((B, 1), bool), "position_ids": last_pos[:, :, None].astype(np.int64)}
                if self.manifest.get("deepstack_layers"):
                    feeds["deepstack_embeds"] = np.zeros((int(self.manifest["deepstack_layers"]), B, 1, D), np.float32)

    def generate(self, inputs: dict[str, Tensor], max_new_tokens: int, *, eos_ids: Sequence[int] | None = None, return_logits: bool = False):
        """Greedy: new token ids [B, n] (rows finished early padded with the pad id); with return_logits also the
        per-step logits [B, V]."""
        tokens, logits_seen = [], []
        for nxt, logits in self.decode(inputs, max_new_tokens, eos_ids=eos_ids):
            tokens.append(nxt)
            if return_logits:
                logits_seen.append(logits)
        B = inputs["input_ids"].shape[0]
        ids = np.stack(tokens, 1) if tokens else np.zeros((B, 0), np.int64)
        return (ids, logits_seen) if return_logits else ids


def eager_generate(model, inputs: dict[str, Tensor], max_new_tokens: int, eos_ids: Sequence[int], pad_id: int):
    """model.generate greedy: (new token ids [B, n], per-step raw logits [B, V] list). eos_ids may be empty: no stop,
    exactly max_new_tokens tokens."""
    import copy

    gc = copy.deepcopy(model.generation_config)
    gc.do_sample, gc.num_beams, gc.max_new_tokens, gc.min_new_tokens = False, 1, max_new_tokens, None
    # no stop: generate fills a None eos from the model's own config, so name an id the lm_head never produces
    gc.eos_token_id = list(eos_ids) or [int(model.lm_head.out_features)]
    gc.pad_token_id = pad_id
    gc.temperature = gc.top_p = gc.top_k = None
    gc.output_logits = gc.return_dict_in_generate = True
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gc)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return new, [lg.float() for lg in out.logits]


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    for t in ("<|im_end|>", "<|endoftext|>"):
        if t in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(t))
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# Held-out chat records, parity and latency


def generated_chat(n: int, seed: int, image_size: int) -> tuple[list[dict], list[list]]:
    """n held-out ShapesWorld chat items (question about a freshly rendered scene, its reference answer)."""
    import random

    from ..data import synth

    items, images = [], []
    for i in range(n):
        scene = synth.scene_for_index(seed + 7919, 100_000 + i)
        qs = synth.questions(scene)
        q = qs[random.Random(seed * 1000 + i).randrange(len(qs))]
        items.append({"prompt": q["prompt"], "response": q["response"], "skills": [q["skill"]]})
        images.append([synth.render(scene, size=image_size)])
    return items, images


def generated_omni_chat(n: int, seed: int, image_size: int, sampling_rate: int) -> tuple[list[dict], list[list], list[list]]:
    """n held-out items for a Qwen3-Omni thinker: ShapesWorld questions about fresh scenes, in turn with the image and
    a clip, with a clip only, and with the image only. The clips are tone mixtures with a little noise, 0.3 to 3.3 s
    (one to four of the audio tower's chunks): what the parity check needs is the audio path exercised at several
    lengths, not words (a spoken ShapesWorld JSONL given as --data has those)."""
    items, images = generated_chat(n, seed, image_size)
    rng = np.random.default_rng(seed + 17)
    audios: list[list] = []
    for i in range(n):
        t = np.arange(int(sampling_rate * rng.uniform(0.3, 3.3))) / sampling_rate
        clip = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(150, 2500, size=3)) / 3 * 0.3 + rng.normal(0, 0.01, t.shape)
        mode = i % 3  # 0: image + clip, 1: clip only, 2: image only
        audios.append([clip.astype(np.float32)] if mode < 2 else [])
        if mode == 1:
            images[i] = []
    return items, images, audios


def _messages(prompt: str, n_images: int, n_audio: int = 0) -> list[dict]:
    from ..models.generative import _messages as chat_messages

    return chat_messages(prompt, n_images, None, n_audio)


def chat_parity(model, runners: dict[str, OnnxChatModel], items: list[dict], images: list[list], *, steps: int, source: str, log: Callable = print,
                audios: list[list] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per variant: tokens identical to eager generate over `steps` greedy steps (no stop token), logits max abs diff at
    the prefill and at the cached steps (while both decode the same prefix), and the family metric (VQA accuracy / exact match on the answers, eos on);
    then latency per generated token, ORT vs eager, on the same prompts. Returns (parity, latency)."""
    from ..evaluate.textgen import score_generations

    first = next(iter(runners.values()))
    tok = first.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = first.eos_ids
    text_only = first.kind == "causal_lm"
    audios = audios or [[] for _ in items]
    encoded = [first.encode(_messages(it["prompt"], 0 if text_only else len(im), len(au)), [] if text_only else im, au) for it, im, au in zip(items, images, audios)]
    # eager: fixed-length greedy (no stop) for the token / logit check, then answers with the stop tokens
    ref = [eager_generate(model, enc, steps, [], pad) for enc in encoded]
    ref_answers = [eager_generate(model, enc, 32, eos, pad)[0] for enc in encoded]
    parity: dict[str, Any] = {"inputs": source, "steps": steps}
    answers: dict[str, list[str]] = {"eager": [tok.decode(a[0], skip_special_tokens=True) for a in ref_answers]}
    for name, run in runners.items():
        same, prefill, cached = 0, 0.0, 0.0
        first_diff: list[int] = []
        for enc, (want_ids, want_logits) in zip(encoded, ref):
            got_ids, got_logits = run.generate(enc, steps, eos_ids=[], return_logits=True)
            ok = got_ids.shape == tuple(want_ids.shape) and np.array_equal(got_ids, want_ids.numpy())
            same += int(ok)
            if not ok:
                k = next((j for j in range(min(got_ids.shape[1], want_ids.shape[1])) if got_ids[0, j] != int(want_ids[0, j])), None)
                first_diff.append(k)
            # logits compared while both decoded the same prefix: up to and including the first differing token
            upto = len(got_logits) if ok else (first_diff[-1] + 1 if first_diff[-1] is not None else min(len(got_logits), len(want_logits)))
            diffs = [float(np.abs(g - w.numpy()).max()) for g, w in zip(got_logits[:upto], want_logits[:upto])]
            prefill = max(prefill, diffs[0])
            if len(diffs) > 1:
                cached = max(cached, max(diffs[1:]))
        preds = [tok.decode(run.generate(enc, 32)[0], skip_special_tokens=True) for enc in encoded]
        answers[name] = preds
        res: dict[str, Any] = {
            "tokens_identical": f"{same}/{len(encoded)}", "tokens_identical_all": same == len(encoded),
            "prefill_logits_max_abs_diff": prefill, "step_logits_max_abs_diff": cached,
        }
        if first_diff:
            res["first_differing_step"] = first_diff
        metric = score_generations([{"prediction": p, "reference": it["response"], "skills": it.get("skills")} for p, it in zip(preds, items)])
        eager_metric = score_generations([{"prediction": p, "reference": it["response"], "skills": it.get("skills")} for p, it in zip(answers["eager"], items)])
        key = "vqa_accuracy" if metric.get("vqa_accuracy") is not None else "rouge_l"
        res["metric"] = {"name": key, "eager": eager_metric[key], "onnx": metric[key]}
        res["answers_identical"] = f"{sum(a == b for a, b in zip(preds, answers['eager']))}/{len(preds)}"
        parity[name] = res
        log(f"{name}: tokens identical {res['tokens_identical']} over {steps} steps, logits max abs diff prefill {prefill:.2g}, cached steps {cached:.2g}")
    latency = chat_latency(model, runners, encoded, steps, pad)
    return parity, latency


def chat_latency(model, runners: dict[str, OnnxChatModel], encoded: list[dict[str, Tensor]], steps: int, pad: int, rounds: int = 3) -> dict[str, Any]:
    """ms per generated token (prefill included, `steps` tokens, batch 1), eager generate vs ORT, in interleaved rounds
    (median); the same prompts for both."""
    times: dict[str, list[float]] = {"eager": []} | {k: [] for k in runners}
    for _ in range(rounds):
        for name in times:
            t0 = time.perf_counter()
            for enc in encoded:
                if name == "eager":
                    eager_generate(model, enc, steps, [], pad)
                else:
                    runners[name].generate(enc, steps, eos_ids=[])
            times[name].append(1000 * (time.perf_counter() - t0) / (len(encoded) * steps))
    out: dict[str, Any] = {"tokens_per_prompt": steps, "prompts": len(encoded), "threads": torch.get_num_threads()}
    out |= {f"{k}_ms_per_token": float(np.median(v)) for k, v in times.items()}
    return out


def read_items(path: Path, max_items: int, log: Callable = print, sampling_rate: int | None = None) -> tuple[list[dict], list[list], list[list], str]:
    """Chat records of a JSONL file (prompt, response, images, audio) for the parity check: (items, images, audio
    clips at `sampling_rate`, source). Records with audio need a `sampling_rate` (a model that takes audio)."""
    from ..data.loaders import ImageCache, RecordError, load_chat

    cache = ImageCache()
    records, _ = load_chat(Path(path), "response", "fail", max_items, cache, log=lambda *_: None)
    items = [{"prompt": r.prompt, "response": r.response, "skills": list(getattr(r, "skills", None) or []) or None} for r in records]
    audios = []
    for r in records:
        refs = r.audio_refs() if hasattr(r, "audio_refs") else []
        if refs and sampling_rate is None:
            raise RecordError(str(path), getattr(r, "line", 0), "audio", "the record carries audio but the exported model takes none (no audio graph)")
        audios.append(r.load_audio(sampling_rate=sampling_rate) if refs else [])
    return items, [cache.all(r) for r in records], audios, f"{path} ({len(records)} records)"
