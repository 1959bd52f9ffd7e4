"""Sharded training with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`), ``train.sharding: fsdp``.

Each process keeps 1/P of the student's parameters, gradients and AdamW state. The step module is sharded
block by block: every instance of a class that a Hugging Face model lists in ``_no_split_modules`` (decoder
layers, vision blocks, CLIP encoder layers) becomes its own FSDP unit, then the whole step module (student
embeddings, heads, the loss's projectors) is the root unit. The frozen teacher sits outside the module tree
and is never sharded.

Why our own FSDP2 call rather than accelerate's FSDP plugin: accelerate runs FSDP only on accelerators (on the
CPU it falls back to DDP), while FSDP2 runs on the CPU over gloo as on GPUs over NCCL, so the same code is
tested here in 2 CPU processes. Checkpoints and the final folder are gathered (``get_model_state_dict`` /
``get_optimizer_state_dict`` with full state dicts), so a sharded run writes the very files an unsharded
run writes, the optimizer state keyed by parameter index: either can resume the other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks sharded one by one: instances of the classes the module's Hugging Face models name in
    ``_no_split_modules``."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in module.modules() if type(m).__name__ in names and m is not module]


def shard(module: nn.Module) -> int:
    """FSDP2-shard `module` in place (after making every process start from rank 0's weights); returns how many
    blocks became units of their own."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)
    units = shard_units(module)
    for unit in units:
        fully_shard(unit)
    # FSDP2 shards no 0-d parameter (CLIP's logit_scale, SigLIP's bias): those stay whole on every process, their
    # gradients averaged by `sync_replicated_grads`
    fully_shard(module, ignored_params=set(replicated(module)))
    return len(units)


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of `t`: its shard for a sharded (DTensor) tensor, else `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_share(module: nn.Module) -> tuple[int, int]:
    """(parameter elements this process holds, elements of the whole model)."""
    return sum(_local(p).numel() for p in module.parameters()), sum(p.numel() for p in module.parameters())


def held_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of weights and optimizer state this process holds (sharded or not)."""
    tensors = [*module.parameters(), *(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))]
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def replicated(module: nn.Module) -> list[nn.Parameter]:
    """The parameters kept whole on every process (0-d ones)."""
    return [p for p in module.parameters() if p.ndim == 0]


def sync_replicated_grads(module: nn.Module) -> None:
    """Average the gradients of the whole (unsharded) parameters over the processes, as DDP would."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in replicated(module):
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients of sharded (DTensor) and whole parameters together by their global L2 norm; returns the norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sq = []
    for g in grads:
        n = g.detach().float().norm(2)
        sq.append((n.full_tensor() if hasattr(n, "full_tensor") else n) ** 2)
    total = torch.stack(sq).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU of rank 0 (empty elsewhere). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options())
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights (embeddings and LM head): one tensor,
        canonical = first.setdefault(id(p), name)  # so the checkpoint writes it once, as unsharded training does
        if canonical != name and canonical in full and name in full:
            full[name] = full[canonical]
    return full


def _param_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order an unsharded optimizer numbers them (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state on rank 0 (every process must call it), keyed by parameter index in group order, as
    ``optimizer.state_dict()`` of an unsharded run is."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_options())
    if not osd.get("param_groups"):
        return osd
    index = {name: i for i, name in enumerate(_param_order(model, optimizer))}
    return {
        "state": {index[name]: s for name, s in osd["state"].items()},
        "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in osd["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, indexed: dict[str, Any]) -> None:
    """Load an index-keyed optimizer state (an unsharded run's, or `full_optimizer_state`'s) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    order = _param_order(model, optimizer)
    by_name = {
        "state": {order[int(i)]: s for i, s in indexed["state"].items()},
        "param_groups": [dict(g, params=[order[int(i)] for i in g["params"]]) for g in indexed["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name, options=StateDictOptions(full_state_dict=True))


def unshard_into(module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Replace the sharded parameters of `module` by plain ones holding `full` (rank 0, after training: the final
    folder is saved from them). Tied parameters stay tied. The module is for saving only afterwards."""
    new: dict[int, nn.Parameter] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if id(p) not in new:
            new[id(p)] = nn.Parameter(full[name].detach().clone(), requires_grad=p.requires_grad)
        owner._parameters[attr] = new[id(p)]
