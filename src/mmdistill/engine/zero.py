"""Sharded training with DeepSpeed ZeRO, ``train.sharding: zero2 | zero3`` (or an ``accelerate launch`` with
configs/accelerate/deepspeed-zero2.yaml / deepspeed-zero3.yaml, which sets the same).

ZeRO-2 partitions the AdamW state and the gradients over the processes (each keeps the whole weights); ZeRO-3 also
partitions the weights, gathering each block's as it runs. The loop hands DeepSpeed the step module (student, its
loss projectors) and a torch AdamW over the same parameter groups an unsharded run uses; DeepSpeed scales the loss
for gradient accumulation, reduces, clips (``gradient_clipping`` = train.max_grad_norm) and steps. The frozen
teacher sits outside the module tree, so DeepSpeed never sees it.

Two things are ours rather than DeepSpeed's:
- 0-d parameters (CLIP's ``logit_scale``): DeepSpeed 0.19 views every parameter as bytes to broadcast or partition it
  (``p.data.view(torch.uint8)``), which a 0-d tensor refuses. DeepSpeed gets a 1-element parameter instead and the
  model reads a 0-d view of it (``hold_scalars``); checkpoints and the final folder have the 0-d shape.
- Checkpoints: the checkpoint folder holds the gathered full weights (``trainable.safetensors``, as every run writes:
  a checkpoint can be evaluated or exported as it is) and, in ``deepspeed/``, DeepSpeed's own partitioned optimizer
  state (its format, one file per process), written into the same ``.tmp`` folder and published by the same atomic
  rename. Resuming it needs the same ZeRO stage and process count; another set-up is refused in one line.
Why DeepSpeed's own engine rather than accelerate's plugin: accelerate runs DeepSpeed only on accelerators (on the
CPU it falls back to DDP), while DeepSpeed itself runs ZeRO over gloo on the CPU, so the same code is tested here in
2 CPU processes; the launch's DeepSpeed settings are read from accelerate's environment (``launched_sharding``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

STAGES = {"zero2": 2, "zero3": 3}
# what `accelerate launch --config_file ...` sets for a DeepSpeed or FSDP launch
_LAUNCH_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


def launched_sharding() -> str | None:
    """The sharding an ``accelerate launch`` asked for ("zero2", "zero3", "fsdp"), or None for a plain launch."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("2", "3"):
            from .loop import TrainingError

            raise TrainingError(f"accelerate's DeepSpeed config asks for ZeRO stage {stage}; mmdistill trains with stage 2 or 3 "
                                "(configs/accelerate/deepspeed-zero2.yaml, deepspeed-zero3.yaml)")
        return f"zero{stage}"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return None


_taken: list[str | None] = []


def take_launch_env() -> str | None:
    """`launched_sharding()`, read once; then the launch's DeepSpeed / FSDP switches leave the environment, so that
    accelerate sets the processes up plainly (DDP-style, any device) and the loop shards itself, and so that
    transformers does not load models on the meta device on all but rank 0 (its reading of an FSDP launch with
    FSDP_CPU_RAM_EFFICIENT_LOADING)."""
    if not _taken:
        _taken.append(launched_sharding())
        for key in (*_LAUNCH_ENV, "FSDP_CPU_RAM_EFFICIENT_LOADING"):
            os.environ.pop(key, None)
    return _taken[0]


def resolve(recipe_sharding: str, launched: str | None) -> str:
    """The sharding to train with: the recipe's, or the launch's when the recipe leaves it at "none"; the two disagreeing
    is an error naming both."""
    if launched is None or launched == recipe_sharding:
        return recipe_sharding
    if recipe_sharding == "none":
        return launched
    from .loop import TrainingError

    raise TrainingError(f"train.sharding: {recipe_sharding} but the accelerate launch config asks for {launched}; "
                        "set one of them (configs/accelerate/ddp.yaml leaves sharding to the recipe)")


def require(mode: str) -> None:
    """DeepSpeed is an extra: a clear line when it is not installed."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        from .loop import TrainingError

        raise TrainingError(f"train.sharding: {mode} needs DeepSpeed, which is not installed: pip install 'mmdistill[deepspeed]'")


def hold_scalars(module: nn.Module):
    """Give DeepSpeed a 1-element parameter for each 0-d one of `module` (it cannot take 0-d ones): the model still
    reads a 0-d tensor, a view made afresh at every forward (a pre-hook on `module`), so the loss, the gradients, the
    clipping norm and AdamW are those of the 0-d parameter. Returns what `restore_scalars` needs."""
    held, made = [], {}
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if p.ndim != 0:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if id(p) not in made:
            made[id(p)] = nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad)
        owner._parameters[attr] = made[id(p)]
        held.append((name, owner, attr))

    def views(*_):
        for _, owner, attr in held:
            q = owner._parameters[attr]
            if q.numel() == 0 and hasattr(q, "all_gather"):  # ZeRO-3 starts it partitioned; once gathered, 1 element
                q.all_gather()  # stays (below DeepSpeed's persistence threshold); every process runs the same forward
            owner.__dict__[attr] = q.view(())  # found before _parameters by attribute lookup

    return held, (module.register_forward_pre_hook(views) if held else None)


def restore_scalars(held) -> None:
    """Drop the 0-d views and their hook (the module's parameters are replaced by gathered ones afterwards)."""
    names, hook = held
    for _, owner, attr in names:
        owner.__dict__.pop(attr, None)
    if hook is not None:
        hook.remove()


def config(cfg, local_batch: int, stage: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: the recipe's micro-batch, accumulation and clipping; fp32 weights and optimizer
    (bf16 compute comes from the loop's autocast, as in unsharded training)."""
    return {
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": float(cfg.max_grad_norm) if cfg.max_grad_norm is not None else 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, the same optimizer every other run uses
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def initialize(module: nn.Module, optimizer: torch.optim.Optimizer, cfg, local_batch: int, stage: int):
    """A DeepSpeed engine over `module` stepping `optimizer` (torch AdamW over its parameter groups)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config(cfg, local_batch, stage),
                                           dist_init_required=False)
    return engine


def full_state(engine, module: nn.Module, held) -> dict[str, torch.Tensor]:
    """The step module's whole state dict on the CPU of rank 0 (empty elsewhere), 0-d parameters 0-d again. Every
    process must call it: ZeRO-3 gathers the weights block by block."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict() or {}  # (fp32 here: it keeps the weights' dtype)
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else {}
    for name, _, _ in held[0]:
        if name in state:
            state[name] = state[name].reshape(())
    return state


def local_share(module: nn.Module) -> tuple[int, int]:
    """(parameter elements this process holds, elements of the whole model): ZeRO-3 holds its partitions."""
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() for p in module.parameters())
    return held, sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def held_bytes(engine, module: nn.Module) -> int:
    """Bytes this process holds of weights (ZeRO-3: its partitions), fp32 master partitions and AdamW state, each
    storage once (ZeRO-2's weights are views of one flat buffer)."""
    zopt = engine.optimizer
    masters = getattr(zopt, "single_partition_of_fp32_groups", None) or getattr(zopt, "fp32_partitioned_groups_flat", None) or []
    state = [v for st in zopt.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim]
    weights = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in module.parameters()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*weights, *masters, *state] if t.numel()}
    return sum(storages.values())


def save(engine, staging: Path) -> None:
    """DeepSpeed's partitioned state into `staging` (every process writes its part)."""
    engine.save_checkpoint(str(staging), tag="state", save_latest=False)


def load(engine, ckpt: Path) -> None:
    """Restore DeepSpeed's partitioned weights and optimizer state from a checkpoint folder's ``deepspeed/``."""
    from .loop import TrainingError

    path = ckpt / "deepspeed"
    if not (path / "state").is_dir():
        raise TrainingError(f"{ckpt}: no DeepSpeed state in this checkpoint (deepspeed/state/ is missing)")
    loaded, _ = engine.load_checkpoint(str(path), tag="state", load_module_strict=False, load_lr_scheduler_states=False)
    if loaded is None:
        raise TrainingError(f"{path}: DeepSpeed could not load this checkpoint")


def check_resume(ckpt: Path, saved: dict[str, Any], mode: str, world: int) -> None:
    """A DeepSpeed checkpoint resumes only under the same stage and process count, and a DeepSpeed run only from one."""
    from .loop import TrainingError

    was = saved.get("sharding", "none")
    if (was in STAGES or mode in STAGES) and (was != mode or int(saved.get("world_size", 1)) != world):
        raise TrainingError(f"{ckpt}: written by a {was} run on {saved.get('world_size', 1)} processes, resumed as {mode} on {world}; "
                            "DeepSpeed's partitioned state resumes only under the same ZeRO stage and process count (or use --overwrite)")


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
