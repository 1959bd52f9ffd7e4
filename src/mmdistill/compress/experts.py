"""MoE expert pruning for Qwen3-MoE, Qwen3-VL-MoE and the Qwen3-Omni thinker's text model.

Every sparse layer keeps its ``r`` most salient experts; the others are removed with their router
rows, so the result is a plain model of the same class with ``num_experts = r`` that
``AutoModelForCausalLM`` / ``AutoModelForImageTextToText`` load without mmdistill.

How transformers 5 stores these layers (``models/qwen3_moe``, ``qwen3_vl_moe``, ``qwen3_omni_moe``):
a sparse block ``layers.i.mlp`` holds a router ``gate.weight [E, H]`` and fused expert tensors
``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]``. The router takes the softmax
over all E logits, keeps the top k, and (``norm_topk_prob``; always for Qwen3-VL-MoE) divides the k
weights by their sum. Pruning slices axis 0 of all three tensors with the same kept indices.

Consequence for outputs: with ``norm_topk_prob`` on, a token whose top k experts are all kept gets
exactly the same weights and output after pruning (the softmax's denominator cancels). With it off
(the Qwen3-MoE config default; real Qwen3-MoE checkpoints turn it on), every token's weights grow by
1 / (probability mass of the kept experts), so outputs move a little even where no pruned expert
was routed; the reconstruction saliency below includes that effect.

Saliency of expert e in a layer, from the calibration forward passes (every position counts, so
calibrate on unpadded batches or accept that padding votes too):

- ``frequency``: the fraction of tokens that route to e (e among their top k);
- ``reap``: REAP (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning"): the mean,
  over the tokens routed to e, of router weight x ||expert output||; 0 for an expert nothing routes to;
- ``reconstruction``: the mean squared error of the layer's output when e alone is removed (the
  token re-routes to the best remaining experts, weights renormalised as the model would), over all
  tokens. It is the single-expert-removal error; removing several experts is scored one at a time.

Higher saliency = more important; each layer keeps its r highest. Plain transformers configs have one
``num_experts`` for every layer, so every sparse layer keeps the same number of experts (a per-layer
budget with different counts would not load; `prune_experts` refuses it).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .prune import PruneError, load_sliced, run_calibration

METHODS = ("frequency", "reap", "reconstruction")


class ExpertPruneError(PruneError):
    """An expert-pruning request this model cannot take (no MoE layers, a bad fraction, uneven budgets)."""


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> sparse MoE block (``mlp`` with a ``gate`` router and fused ``experts``)."""
    from ..models.generative import _TEXT_LAYERS, _find_prefix

    prefix = _find_prefix(model, _TEXT_LAYERS)
    blocks: dict[int, nn.Module] = {}
    if prefix is not None:
        for i, layer in enumerate(model.get_submodule(prefix)):
            mlp = getattr(layer, "mlp", None)
            experts, gate = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
            if experts is not None and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj") and hasattr(gate, "weight"):
                if getattr(experts, "is_transposed", False):
                    raise ExpertPruneError(f"{type(model).__name__}: transposed expert weights are not supported")
                blocks[i] = mlp
    if not blocks:
        raise ExpertPruneError(
            f"{type(model).__name__} has no MoE layers (no mlp.gate router with fused mlp.experts); expert pruning needs a "
            f"Qwen3-MoE, Qwen3-VL-MoE or Qwen3-Omni thinker model"
        )
    return blocks


def _moe_config(model: nn.Module):
    """The (text) config that holds num_experts / num_experts_per_tok."""
    cfg = model.config
    tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if not getattr(tc, "num_experts", None):
        raise ExpertPruneError(f"{type(model).__name__}: its config has no num_experts")
    return tc


def _expert_out(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on tokens x [n, H] -> [n, H], in fp32 (the same maths as the model's experts forward)."""
    gate, up = F.linear(x, experts.gate_up_proj[e].float()).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e].float())


@torch.no_grad()
def _layer_stats(block: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-expert sums for one batch of tokens x [N, H] through one sparse block."""
    gate, experts = block.gate, block.experts
    E, k = gate.weight.shape[0], int(gate.top_k)
    norm = bool(getattr(gate, "norm_topk_prob", True))  # Qwen3-VL-MoE's router always normalises
    N = x.shape[0]
    probs = torch.softmax(F.linear(x, gate.weight.float()), dim=-1)  # [N, E]
    kk = min(k + 1, E)  # one spare expert per token: where it re-routes when one of its k is removed
    top_p, top_i = probs.topk(kk, dim=-1)  # [N, kk]
    outs = x.new_zeros(N, kk, x.shape[1])  # [N, kk, H] outputs of each token's kk best experts
    for e in top_i.unique().tolist():
        t, slot = (top_i == e).nonzero(as_tuple=True)
        outs[t, slot] = _expert_out(experts, e, x[t])
    w = top_p[:, :k] / top_p[:, :k].sum(-1, keepdim=True) if norm else top_p[:, :k]  # [N, k] the model's weights
    routed = top_i[:, :k].reshape(-1)
    count = torch.zeros(E).index_add_(0, routed, torch.ones_like(routed, dtype=torch.float))
    reap = torch.zeros(E).index_add_(0, routed, (w * outs[:, :k].norm(dim=-1)).reshape(-1))
    y = (w[..., None] * outs[:, :k]).sum(1)  # [N, H] the block's output
    recon = torch.zeros(E)
    for e in range(E):
        others = top_i != e  # [N, kk]
        slots = others & (others.cumsum(-1) <= k)  # the k best experts other than e
        p = top_p * slots
        w_e = p / p.sum(-1, keepdim=True) if norm else p / (1 - probs[:, e : e + 1])  # softmax over the E-1 others
        recon[e] = ((y - (w_e[..., None] * outs).sum(1)) ** 2).sum()
    return {"count": count, "reap": reap, "recon": recon, "tokens": torch.tensor(float(N))}


def expert_saliency(model: nn.Module, calibrate: Callable[[nn.Module], Any]) -> dict[str, dict[int, torch.Tensor]]:
    """``{method: {layer: saliency [E]}}`` for every method in METHODS, from the passes ``calibrate(model)`` runs."""
    blocks = moe_blocks(model)
    sums: dict[int, dict[str, torch.Tensor]] = {}

    def hook(i: int):
        def pre(block, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            stats = _layer_stats(block, x)
            sums[i] = {k: sums[i][k] + v for k, v in stats.items()} if i in sums else stats

        return pre

    handles = [block.register_forward_pre_hook(hook(i)) for i, block in blocks.items()]
    run_calibration(model, handles, calibrate)
    if not sums:
        raise ExpertPruneError("calibration ran no forward pass through the MoE layers (empty calibration data?)")
    out: dict[str, dict[int, torch.Tensor]] = {m: {} for m in METHODS}
    for i, s in sums.items():
        n = s["tokens"].clamp_min(1)
        out["frequency"][i] = s["count"] / n
        out["reap"][i] = s["reap"] / s["count"].clamp_min(1)
        out["reconstruction"][i] = s["recon"] / n
    return out


def experts_to_keep(model: nn.Module, fraction: float) -> int:
    """How many experts each sparse layer keeps when `fraction` of them is pruned (0 < fraction < 1)."""
    moe_blocks(model)  # a clear error for a model without MoE layers
    E = int(_moe_config(model).num_experts)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ExpertPruneError(f"experts: {fraction!r} must be the fraction of experts to prune, strictly between 0 and 1")
    keep = E - round(fraction * E)
    if keep < 1:
        raise ExpertPruneError(f"experts: pruning {fraction:g} of {E} experts would remove all of them")
    if keep == E:
        raise ExpertPruneError(f"experts: pruning {fraction:g} of {E} experts removes none (rounds to 0)")
    return keep


def select_experts(saliency: dict[int, torch.Tensor], keep: int) -> dict[int, list[int]]:
    """Per layer, the `keep` most salient experts in ascending index order (ties go to the lower index)."""
    chosen = {}
    for i, s in saliency.items():
        order = sorted(range(len(s)), key=lambda e: (-float(s[e]), e))
        chosen[i] = sorted(order[:keep])
    return chosen


def prune_experts(model: nn.Module, keep: dict[int, list[int]]) -> nn.Module:
    """A copy of `model` whose sparse layer i keeps only experts ``keep[i]`` (and their router rows).

    Every sparse layer must be listed with the same number of experts. ``num_experts`` becomes that
    number and ``num_experts_per_tok`` is lowered to it when it was larger. The input model is untouched.
    """
    blocks = moe_blocks(model)
    tc = _moe_config(model)
    E = int(tc.num_experts)
    if set(keep) != set(blocks):
        raise ExpertPruneError(f"experts to keep are given for layers {sorted(keep)}; the sparse layers are {sorted(blocks)}")
    sizes = {len(v) for v in keep.values()}
    if len(sizes) != 1:
        raise ExpertPruneError(
            f"every sparse layer must keep the same number of experts (got {sorted(sizes)}): transformers' config has one num_experts for all layers"
        )
    r = sizes.pop()
    for i, kept in keep.items():
        if not kept or len(set(kept)) != len(kept) or any(not 0 <= e < E for e in kept):
            raise ExpertPruneError(f"layer {i}: experts to keep {kept} must be distinct indices below {E}")
    cfg = copy.deepcopy(model.config)
    ntc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    ntc.num_experts = r
    ntc.num_experts_per_tok = min(int(tc.num_experts_per_tok), r)

    from ..models.generative import _TEXT_LAYERS, _find_prefix

    prefix = _find_prefix(model, _TEXT_LAYERS)
    index = {}  # tensor name -> kept rows along axis 0
    for i, kept in keep.items():
        rows = torch.tensor(sorted(kept))
        for name in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            index[f"{prefix}.{i}.{name}"] = rows
    cls = type(model)
    pruned = cls._from_config(cfg) if hasattr(cls, "_from_config") else cls(cfg)
    state = model.state_dict()
    new_state = {}
    for name, param in pruned.state_dict().items():
        t = state[name]
        if name in index:
            t = t.index_select(0, index[name])
        if t.shape != param.shape:
            raise ExpertPruneError(f"prune_experts: {name} sliced to {tuple(t.shape)}, expected {tuple(param.shape)}")
        new_state[name] = t.detach().clone()
    return load_sliced(pruned, new_state, model).train(model.training)


def prune_moe(model: nn.Module, calibrate: Callable[[nn.Module], Any], *, fraction: float, method: str = "reap") -> tuple[nn.Module, dict[str, Any]]:
    """Prune `fraction` of every sparse layer's experts by `method` saliency; returns (model, what was kept and why)."""
    if method not in METHODS:
        raise ExpertPruneError(f"expert saliency method {method!r} is unknown; use one of {list(METHODS)}")
    keep = experts_to_keep(model, fraction)  # checks before the (slow) calibration
    saliency = expert_saliency(model, calibrate)
    chosen = select_experts(saliency[method], keep)
    tc = _moe_config(model)
    info = {
        "method": method,
        "num_experts": [int(tc.num_experts), keep],
        "num_experts_per_tok": [int(tc.num_experts_per_tok), min(int(tc.num_experts_per_tok), keep)],
        "kept": {str(i): v for i, v in chosen.items()},
        "saliency": {m: {str(i): [round(float(v), 6) for v in s] for i, s in per.items()} for m, per in saliency.items()},
    }
    return prune_experts(model, chosen), info
