"""Depth pruning: drop whole language-model layers and/or vision-tower blocks.

Which blocks go is either an explicit list or chosen by block importance on calibration data
(ShortGPT's "block influence", Men et al. 2024): 1 - cos(block input, block output), averaged over
every position of the calibration passes. A block that barely turns its residual stream scores
near 0 and is dropped first. Scores are measured once on the full model (not re-measured after
each removal).

The surgery itself is `models.generative.inherit_student` (keep the listed blocks): it writes
``num_hidden_layers`` / vision ``depth``, keeps ``layer_types`` and the MoE ``mlp_only_layers``
per kept layer, and remaps Qwen3-VL's ``deepstack_visual_indexes`` (a deepstack merger whose vision
block is dropped goes with it). The result is a plain model of the same class.

Drop specs (the CLI's ``--drop-layers``): ``auto:4`` (4 text layers by importance), ``auto:text:4;vision:1``,
or explicit indices of blocks to drop, ``text:3,5;vision:1``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .prune import PruneError, run_calibration

TOWERS = ("text", "vision")


def _towers(model: nn.Module) -> dict[str, nn.ModuleList]:
    """tower -> its module list of blocks (text decoder layers, vision blocks) found in `model`."""
    from ..models.generative import _TEXT_LAYERS, _VISION_BLOCKS, _find_prefix

    found = {}
    for tower, candidates in (("text", _TEXT_LAYERS), ("vision", _VISION_BLOCKS)):
        prefix = _find_prefix(model, candidates)
        if prefix is not None:
            found[tower] = model.get_submodule(prefix)
    return found


def block_importance(model: nn.Module, calibrate: Callable[[nn.Module], Any]) -> dict[str, torch.Tensor]:
    """``{tower: importance [n_blocks]}``: mean 1 - cos(input, output) of every block over the calibration positions."""
    towers = _towers(model)
    sums: dict[str, torch.Tensor] = {t: torch.zeros(len(blocks)) for t, blocks in towers.items()}
    counts: dict[str, torch.Tensor] = {t: torch.zeros(len(blocks)) for t, blocks in towers.items()}

    def hook(tower: str, i: int):
        def on_output(_m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()  # [N, D]
            sums[tower][i] += (1 - torch.cosine_similarity(x, y, dim=-1)).sum().cpu()
            counts[tower][i] += x.shape[0]

        return on_output

    handles = [
        block.register_forward_hook(hook(tower, i), with_kwargs=True)
        for tower, blocks in towers.items()
        for i, block in enumerate(blocks)
    ]
    run_calibration(model, handles, calibrate)
    if not any(c.sum() for c in counts.values()):
        raise PruneError("calibration ran no forward pass through the model (empty calibration data?)")
    return {t: sums[t] / counts[t] for t in towers if counts[t].sum() > 0}


def parse_drop_layers(spec: str) -> tuple[bool, dict[str, Any]]:
    """``"auto:4"`` -> (True, {"text": 4}); ``"auto:text:4;vision:1"`` -> (True, {...}); ``"text:3,5;vision:1"`` -> (False, {"text": [3, 5], ...})."""
    text = spec.strip()
    auto = text.startswith("auto:")
    body = text[5:] if auto else text
    if auto and body.strip().isdigit():
        return True, {"text": int(body)}
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in body.split(";"))):
        tower, _, values = part.partition(":")
        tower = tower.strip()
        if tower not in TOWERS or not values.strip() or tower in out:
            raise PruneError(f"--drop-layers {spec!r}: expected auto:N, auto:text:N;vision:M or text:I,J;vision:K (towers: text, vision)")
        try:
            nums = [int(v) for v in values.split(",")]
        except ValueError:
            raise PruneError(f"--drop-layers {spec!r}: {values!r} is not a list of integers") from None
        if auto and len(nums) != 1:
            raise PruneError(f"--drop-layers {spec!r}: auto takes one count per tower, e.g. auto:text:4")
        out[tower] = nums[0] if auto else nums
    if not out:
        raise PruneError(f"--drop-layers {spec!r}: nothing to drop")
    return auto, out


def layers_to_keep(model: nn.Module, drop: dict[str, list[int]]) -> dict[str, list[int]]:
    """The blocks each tower keeps when the listed ones are dropped; refuses emptying a tower."""
    towers = _towers(model)
    keep = {}
    for tower, idx in drop.items():
        if tower not in towers:
            raise PruneError(f"cannot drop {tower} blocks: {type(model).__name__} has no {tower} tower")
        n = len(towers[tower])
        bad = [i for i in idx if not 0 <= i < n]
        if bad or len(set(idx)) != len(idx):
            raise PruneError(f"{tower} blocks to drop {idx} must be distinct indices below {n}")
        if len(idx) >= n:
            raise PruneError(f"dropping {len(idx)} of {n} {tower} blocks would remove every block")
        keep[tower] = [i for i in range(n) if i not in idx]
    return keep


def least_important(importance: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, list[int]]:
    """The `counts[tower]` blocks of lowest importance per tower (ties: the later block goes first)."""
    drop = {}
    for tower, n in counts.items():
        if tower not in importance:
            raise PruneError(f"calibration did not reach the {tower} tower (no images in the calibration data?)")
        score = importance[tower]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PruneError(f"the number of {tower} blocks to drop must be a positive integer, got {n!r}")
        if n >= len(score):
            raise PruneError(f"dropping {n} of {len(score)} {tower} blocks would remove every block")
        order = sorted(range(len(score)), key=lambda i: (float(score[i]), -i))
        drop[tower] = sorted(order[:n])
    return drop


def prune_depth(model: nn.Module, drop: dict[str, list[int]]) -> nn.Module:
    """A copy of `model` without the listed blocks (``{"text": [3, 5], "vision": [1]}``)."""
    from ..models.generative import inherit_student

    return inherit_student(model, layers_to_keep(model, drop)).train(model.training)


def drop_blocks(model: nn.Module, spec: str, calibrate: Callable[[nn.Module], Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Apply a ``--drop-layers`` spec; `calibrate` is needed for ``auto:``. Returns (model, what was dropped and why)."""
    auto, parsed = parse_drop_layers(spec)
    towers = _towers(model)
    for tower in parsed:
        if tower not in towers:
            raise PruneError(f"cannot drop {tower} blocks: {type(model).__name__} has no {tower} tower")
    info: dict[str, Any] = {"spec": spec}
    if auto:
        for tower, n in parsed.items():  # check the budget before the calibration passes
            if isinstance(n, int) and n >= len(towers[tower]):
                raise PruneError(f"dropping {n} of {len(towers[tower])} {tower} blocks would remove every block")
        if calibrate is None:
            raise PruneError("auto depth pruning needs calibration data")
        importance = block_importance(model, calibrate)
        drop = least_important(importance, parsed)
        info["importance"] = {t: [round(float(v), 6) for v in s] for t, s in importance.items()}
    else:
        drop = parsed
    info["dropped"] = drop
    return prune_depth(model, drop), info
