"""Structured width pruning (Minitron-style) of Qwen3-VL models and Qwen3 text models.

A pruned model is a plain model of the same class with narrower widths, whose weights are the
teacher's, sliced to its most important channels, attention heads and MLP neurons. Importance is
activation-based, from calibration forward passes (Minitron, Muralidharan et al. 2024, sec. 2.2):

- a residual (hidden) channel: mean |output| of every RMSNorm / LayerNorm on the residual stream;
- an attention head: mean L2 norm of its slice of the input to the output projection;
  with grouped-query attention, a key/value group keeps the summed importance of its query heads,
  the best groups are kept, then the best query heads inside each kept group;
- an MLP neuron: mean |input| of the down projection (after the gate);
- a vision merger neuron: mean |input| of the merger's second linear layer.

Means run over every position of the calibration batches (padding included). Depth is pruned
separately, by `models.generative.inherit_student` (keep chosen layers); `prune_widths` keeps every layer.

Width keys (HF config names; Qwen3-VL nests them under ``text_config.`` / ``vision_config.``):
``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads`` (text),
``hidden_size``, ``intermediate_size``, ``num_heads`` (vision). ``head_dim`` stays the teacher's.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import nn

TEXT_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
VISION_KEYS = ("hidden_size", "intermediate_size", "num_heads")


def split_widths(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(width keys, the other overrides) of a student's dotted config overrides; `prune_widths` refuses the widths it can't prune."""
    from ..models.generative import WIDTH_KEYS

    widths = {k: v for k, v in overrides.items() if k.rsplit(".", 1)[-1] in WIDTH_KEYS}
    return widths, {k: v for k, v in overrides.items() if k not in widths}


class PruneError(ValueError):
    """A width request this model cannot take (unknown key, wider than the model, head counts that don't divide)."""


def _layout(model: nn.Module) -> dict[str, Any]:
    """Module prefixes and configs of a supported model."""
    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    if mt == "qwen3_vl":
        return {"text": "model.language_model", "vision": "model.visual", "tc": cfg.text_config, "vc": cfg.vision_config, "nested": True}
    if mt == "qwen3":
        return {"text": "model", "vision": None, "tc": cfg, "vc": None, "nested": False}
    raise PruneError(f"width pruning supports qwen3_vl and qwen3 models, not {mt!r} ({type(model).__name__})")


def parse_widths(model: nn.Module, widths: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Split ``{"text_config.hidden_size": 64, ...}`` into (text, vision) width dicts, checked against the model."""
    lay = _layout(model)
    text: dict[str, int] = {}
    vision: dict[str, int] = {}
    for key, value in widths.items():
        parts = key.split(".")
        if lay["nested"] and len(parts) == 2 and parts[0] == "text_config" and parts[1] in TEXT_KEYS:
            text[parts[1]] = value
        elif lay["nested"] and len(parts) == 2 and parts[0] == "vision_config" and parts[1] in VISION_KEYS:
            vision[parts[1]] = value
        elif not lay["nested"] and len(parts) == 1 and parts[0] in TEXT_KEYS:
            text[parts[0]] = value
        else:
            allowed = [f"text_config.{k}" for k in TEXT_KEYS] + [f"vision_config.{k}" for k in VISION_KEYS] if lay["nested"] else list(TEXT_KEYS)
            raise PruneError(f"width key {key!r} cannot be pruned; use one of {allowed}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PruneError(f"width {key}={value!r} must be a positive integer")
    tc, vc = lay["tc"], lay["vc"]
    for k, v in text.items():
        if v > getattr(tc, k):
            raise PruneError(f"width {k}={v} is wider than the model's {getattr(tc, k)}")
    h = text.get("num_attention_heads", tc.num_attention_heads)
    kv = text.get("num_key_value_heads", tc.num_key_value_heads)
    if h % kv or h // kv > tc.num_attention_heads // tc.num_key_value_heads:
        raise PruneError(
            f"{h} query heads over {kv} key/value heads: need a whole number of query heads per group, "
            f"at most the model's {tc.num_attention_heads // tc.num_key_value_heads}"
        )
    if vc is not None:
        for k, v in vision.items():
            if v > getattr(vc, k):
                raise PruneError(f"width vision_config.{k}={v} is wider than the model's {getattr(vc, k)}")
        head_dim = vc.hidden_size // vc.num_heads
        vh, vn = vision.get("hidden_size", vc.hidden_size), vision.get("num_heads", vc.num_heads)
        if vh != vn * head_dim:
            raise PruneError(
                f"vision hidden_size {vh} must be num_heads x the vision head size ({vn} x {head_dim} = {vn * head_dim}): "
                f"Qwen3-VL's vision attention is as wide as its residual stream"
            )
    return text, vision


@torch.no_grad()
def collect_importance(model: nn.Module, calibrate: Callable[[nn.Module], Any]) -> dict[str, torch.Tensor]:
    """Activation importance of every prunable unit, from the forward passes ``calibrate(model)`` runs."""
    lay = _layout(model)
    tc, vc = lay["tc"], lay["vc"]
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    handles = []

    def add(key: str, value: torch.Tensor, n: int) -> None:
        value = value.detach().float().cpu()
        sums[key] = sums[key] + value if key in sums else value
        counts[key] += n

    def on_output(key: str):
        def hook(_m, _inp, out):
            x = out.reshape(-1, out.shape[-1])
            add(key, x.abs().sum(0), x.shape[0])

        return hook

    def on_input(key: str, heads: int | None = None):
        def hook(_m, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            if heads is not None:
                add(key, x.view(x.shape[0], heads, -1).norm(dim=-1).sum(0), x.shape[0])
            else:
                add(key, x.abs().sum(0), x.shape[0])

        return hook

    # per tower: (blocks, count, residual-stream norms, attention output projection, MLP down projection, heads)
    towers = [("text", f"{lay['text']}.layers", tc.num_hidden_layers, ("input_layernorm", "post_attention_layernorm"), "self_attn.o_proj", "mlp.down_proj", tc.num_attention_heads)]
    finals = [("text", f"{lay['text']}.norm")]
    if vc is not None:
        towers.append(("vision", f"{lay['vision']}.blocks", vc.depth, ("norm1", "norm2"), "attn.proj", "mlp.linear_fc2", vc.num_heads))
        finals.append(("vision", f"{lay['vision']}.merger.norm"))
    for tower, blocks, count, norms, attn_out, mlp_out, heads in towers:
        for i in range(count):
            block = f"{blocks}.{i}"
            for norm in norms:
                handles.append(modules[f"{block}.{norm}"].register_forward_hook(on_output(f"{tower}.hidden")))
            handles.append(modules[f"{block}.{attn_out}"].register_forward_pre_hook(on_input(f"{tower}.{i}.heads", heads)))
            handles.append(modules[f"{block}.{mlp_out}"].register_forward_pre_hook(on_input(f"{tower}.{i}.mlp")))
    for tower, norm in finals:
        handles.append(modules[norm].register_forward_hook(on_output(f"{tower}.hidden")))
    if vc is not None:
        for name in _mergers(model, lay):
            handles.append(modules[f"{name}.linear_fc2"].register_forward_pre_hook(on_input(f"{name}.mlp")))
    run_calibration(model, handles, calibrate)
    if not sums:
        raise PruneError("calibration ran no forward pass through the model")
    missing = [k for k in ("text.hidden",) if k not in sums]
    if vc is not None and "vision.hidden" not in sums:
        missing.append("vision.hidden (the calibration data has no images)")
    if missing:
        raise PruneError(f"calibration did not reach {', '.join(missing)}")
    return {k: v / counts[k] for k, v in sums.items()}


def run_calibration(model: nn.Module, handles: list, calibrate: Callable[[nn.Module], Any]) -> None:
    """Run ``calibrate(model)`` in eval mode with the hooks `handles` registered; remove them and restore the mode after.

    The one calibration loop of compress/: width importance here, expert saliency and block importance
    (compress/experts.py, compress/depth.py) all register their hooks and come through here.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            calibrate(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _mergers(model: nn.Module, lay: dict[str, Any]) -> list[str]:
    vp = lay["vision"]
    return [f"{vp}.merger"] + [f"{vp}.deepstack_merger_list.{k}" for k in range(len(lay["vc"].deepstack_visual_indexes))]


def _top(score: torch.Tensor | None, k: int) -> torch.Tensor:
    """Indices of the k best units (ascending order); the first k when a unit never ran (no score)."""
    if score is None:
        return torch.arange(k)
    return torch.sort(torch.topk(score, k).indices).values


def _span(units: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of each unit's block of `size` rows (heads -> their head_dim rows)."""
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def _heads(score: torch.Tensor | None, heads: int, kv: int, new_heads: int, new_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, kv heads) to keep under grouped-query attention."""
    per, new_per = heads // kv, new_heads // new_kv
    score = torch.zeros(heads) if score is None else score
    groups = _top(score.view(kv, per).sum(1), new_kv)
    q = [g * per + _top(score.view(kv, per)[g], new_per) for g in groups.tolist()]
    return torch.cat(q), groups


def prune_widths(model: nn.Module, widths: dict[str, int], importance: dict[str, torch.Tensor]) -> nn.Module:
    """A narrower copy of `model` (same class, same layers) keeping its most important units."""
    lay = _layout(model)
    text, vision = parse_widths(model, widths)
    tc, vc = lay["tc"], lay["vc"]
    imp = importance.get
    keep: dict[str, torch.Tensor] = {}  # name of a tensor axis -> kept indices

    H = text.get("hidden_size", tc.hidden_size)
    keep["H"] = _top(imp("text.hidden"), H)
    hd = tc.head_dim if getattr(tc, "head_dim", None) else tc.hidden_size // tc.num_attention_heads
    nh, nkv = text.get("num_attention_heads", tc.num_attention_heads), text.get("num_key_value_heads", tc.num_key_value_heads)
    I = text.get("intermediate_size", tc.intermediate_size)
    for i in range(tc.num_hidden_layers):
        q, kvh = _heads(imp(f"text.{i}.heads"), tc.num_attention_heads, tc.num_key_value_heads, nh, nkv)
        keep[f"q{i}"], keep[f"kv{i}"] = _span(q, hd), _span(kvh, hd)
        keep[f"m{i}"] = _top(imp(f"text.{i}.mlp"), I)

    cfg = copy.deepcopy(model.config)
    ntc = cfg.text_config if lay["nested"] else cfg
    ntc.hidden_size, ntc.num_attention_heads, ntc.num_key_value_heads, ntc.intermediate_size = H, nh, nkv, I
    ntc.head_dim = hd
    if vc is not None:
        vhd = vc.hidden_size // vc.num_heads
        V, vn = vision.get("hidden_size", vc.hidden_size), vision.get("num_heads", vc.num_heads)
        VI = vision.get("intermediate_size", vc.intermediate_size)
        keep["V"] = _top(imp("vision.hidden"), V)
        merge = vc.spatial_merge_size**2
        keep["V4"] = _span(torch.arange(merge), vc.hidden_size).view(merge, -1)[:, keep["V"]].reshape(-1)
        for j in range(vc.depth):
            heads = _top(imp(f"vision.{j}.heads"), vn)
            keep[f"vq{j}"] = _span(heads, vhd)
            keep[f"vqkv{j}"] = torch.cat([p * vc.hidden_size + keep[f"vq{j}"] for p in range(3)])
            keep[f"vm{j}"] = _top(imp(f"vision.{j}.mlp"), VI)
        for name in _mergers(model, lay):
            keep[name] = _top(imp(f"{name}.mlp"), V * merge)
        cfg.vision_config.hidden_size, cfg.vision_config.num_heads, cfg.vision_config.intermediate_size = V, vn, VI
        cfg.vision_config.out_hidden_size = H

    rules = _rules(lay, model)
    cls = type(model)
    pruned = cls._from_config(cfg) if hasattr(cls, "_from_config") else cls(cfg)
    state = model.state_dict()
    new_state = {}
    for name, param in pruned.state_dict().items():
        t = state[name]
        for pattern, axes in rules:
            m = pattern.fullmatch(name)
            if m:
                for dim, axis in enumerate(axes):
                    if axis is not None:
                        t = t.index_select(dim, keep[axis.format(*m.groups())])
                break
        if t.shape != param.shape:
            raise PruneError(f"prune_widths: {name} sliced to {tuple(t.shape)}, expected {tuple(param.shape)}")
        new_state[name] = t.detach().clone()
    return load_sliced(pruned, new_state, model)


def load_sliced(pruned: nn.Module, new_state: dict[str, torch.Tensor], model: nn.Module) -> nn.Module:
    """Load the sliced tensors into the smaller model; keep the original's dtype and generation config."""
    pruned.load_state_dict(new_state)
    pruned.to(next(model.parameters()).dtype)
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned


def _rules(lay: dict[str, Any], model: nn.Module) -> list[tuple[Any, tuple[str | None, ...]]]:
    """(name pattern, axis name per tensor dim) — the first match slices a tensor; unmatched ones are copied."""
    import re

    tp = re.escape(lay["text"])
    L = rf"{tp}\.layers\.(\d+)"
    rules: list[tuple[str, tuple[str | None, ...]]] = [
        (rf"{tp}\.embed_tokens\.weight", (None, "H")),
        (rf"{tp}\.norm\.weight", ("H",)),
        (rf"{L}\.(?:input_layernorm|post_attention_layernorm)\.weight", ("H",)),
        (rf"{L}\.self_attn\.q_proj\.weight", ("q{0}", "H")),
        (rf"{L}\.self_attn\.q_proj\.bias", ("q{0}",)),
        (rf"{L}\.self_attn\.[kv]_proj\.weight", ("kv{0}", "H")),
        (rf"{L}\.self_attn\.[kv]_proj\.bias", ("kv{0}",)),
        (rf"{L}\.self_attn\.o_proj\.weight", ("H", "q{0}")),
        (rf"{L}\.mlp\.(?:gate_proj|up_proj)\.weight", ("m{0}", "H")),
        (rf"{L}\.mlp\.down_proj\.weight", ("H", "m{0}")),
        (r"lm_head\.weight", (None, "H")),
        (r"score\.weight", (None, "H")),
    ]
    if lay["vision"] is not None:
        vp = re.escape(lay["vision"])
        B = rf"{vp}\.blocks\.(\d+)"
        rules += [
            (rf"{vp}\.patch_embed\.proj\.(?:weight|bias)", ("V",)),
            (rf"{vp}\.pos_embed\.weight", (None, "V")),
            (rf"{B}\.norm[12]\.(?:weight|bias)", ("V",)),
            (rf"{B}\.attn\.qkv\.weight", ("vqkv{0}", "V")),
            (rf"{B}\.attn\.qkv\.bias", ("vqkv{0}",)),
            (rf"{B}\.attn\.proj\.weight", ("V", "vq{0}")),
            (rf"{B}\.attn\.proj\.bias", ("V",)),
            (rf"{B}\.mlp\.linear_fc1\.weight", ("vm{0}", "V")),
            (rf"{B}\.mlp\.linear_fc1\.bias", ("vm{0}",)),
            (rf"{B}\.mlp\.linear_fc2\.weight", ("V", "vm{0}")),
            (rf"{B}\.mlp\.linear_fc2\.bias", ("V",)),
            (rf"{vp}\.merger\.norm\.(?:weight|bias)", ("V",)),
            (rf"{vp}\.deepstack_merger_list\.\d+\.norm\.(?:weight|bias)", ("V4",)),
        ]
        for name in _mergers(model, lay):
            n = re.escape(name)
            rules += [
                (rf"{n}\.linear_fc1\.weight", (name, "V4")),
                (rf"{n}\.linear_fc1\.bias", (name,)),
                (rf"{n}\.linear_fc2\.weight", ("H", name)),
                (rf"{n}\.linear_fc2\.bias", ("H",)),
            ]
    return [(re.compile(p), axes) for p, axes in rules]
