"""The training loop: one loop for every family, on Accelerate (1 CPU process ... many GPUs).

The caller hands over a trainable ``nn.Module`` whose ``forward(batch_indices, progress)``
returns a dict of named loss parts plus ``loss`` (the module holds the student, the loss
projectors and a reference to the frozen teacher). The loop owns everything else:
AdamW, warm-up + cosine, gradient accumulation, clipping, AMP on GPU / fp32 on CPU,
seeding, a deterministic data order, atomic checkpoints and exact resume,
``metrics.jsonl`` + TensorBoard logs, a progress bar, and a stop on NaN/inf.

Data order: each epoch is a permutation of the dataset drawn from (seed, epoch); global
micro-batch ``i`` is a fixed slice of it, and process ``r`` of ``P`` takes the r-th
contiguous part. So the data a step sees depends only on the step, not on the process
count or on whether the run was resumed.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .prefetch import Prefetcher
from .schedules import warmup_cosine


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad batch size, ...); the message is one line."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_indices(n_items: int, global_batch: int, micro_step: int, seed: int) -> list[int]:
    """Indices of global micro-batch `micro_step` (drop-last epochs, a fresh permutation per epoch)."""
    per_epoch = n_items // global_batch
    if per_epoch == 0:
        raise TrainingError(f"dataset has {n_items} records, fewer than one batch of {global_batch}")
    epoch, pos = divmod(micro_step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_items, generator=g)
    return perm[pos * global_batch : (pos + 1) * global_batch].tolist()


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for biases, norms, embeddings' scales and 1-d parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "logit_scale" in name or "logit_bias" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class LoopResult:
    step: int
    last: dict[str, float]
    resumed_from: int | None
    seconds: float
    samples: int = 0  # training samples this process's session went through (global batch × accumulation × steps run)
    peak_rss_per_process: list[int] | None = None  # several processes: each one's peak resident memory (bytes), rank order
    state_bytes_per_process: list[int] | None = None  # several processes: bytes of weights + optimizer state each one holds


def _mixed_precision(precision: str) -> str:
    if precision == "fp32" or (precision == "auto" and not torch.cuda.is_available()):
        return "no"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if not torch.cuda.is_available():
        raise TrainingError(f"train.precision={precision} needs a GPU; on the CPU train in fp32 (precision: fp32 or auto)")
    return precision


class _Logger:
    """metrics.jsonl + TensorBoard on the main process."""

    def __init__(self, out_dir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # drop lines logged after the checkpoint we resume from, so the log has each step once
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except ValueError:  # a line cut short when the run was killed
                    continue
            self.path.write_text("".join(l + "\n" for l in keep))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint we resume from, as for metrics.jsonl
            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
        except Exception:  # tensorboard missing: jsonl still works
            self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def _check_distributed(accelerator) -> None:
    """The loop takes accelerate's process set-up (one or many processes, CPU or GPU) and does data parallel itself, or
    shards with FSDP2 or DeepSpeed ZeRO (``train.sharding``; an accelerate launch config for them is read by
    engine/zero.py and kept from accelerate). An Accelerator handed in with accelerate's own FSDP / DeepSpeed plugin
    would wrap the model its way, which the loop's checkpoints do not follow: refused with one line."""
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind in SHARDED:
        raise TrainingError(f"accelerate is set up for {kind}: pass an Accelerator without accelerate's FSDP / DeepSpeed plugins and set "
                            "train.sharding (fsdp, zero2, zero3), or launch with configs/accelerate/fsdp.yaml or deepspeed-zero2/3.yaml")


def train_loop(
    module: nn.Module,
    *,
    n_items: int,
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    fingerprint: str,
    resume: bool = False,
    accelerator=None,
    on_end: Callable[[nn.Module], None] | None = None,
    quiet: bool = False,
) -> LoopResult:
    """Train `module` (forward(indices, progress) -> {"loss": ..., parts...}) for cfg.max_steps steps. A module with
    ``prepare(indices, progress)`` is called as forward(prepared, progress) instead, its batches prepared
    `cfg.prefetch` micro-batches ahead in a background thread (engine/prefetch.py)."""
    from accelerate import Accelerator

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from . import zero

    mode = zero.resolve(cfg.sharding, zero.take_launch_env())
    if accelerator is None:
        accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.precision), cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise TrainingError(f"train.batch_size={cfg.batch_size} does not divide by {world} processes")
    local = cfg.batch_size // world
    seed_everything(seed)
    if world == 1:  # one process: nothing to shard over
        mode = "none"
    fsdp, ds = mode == "fsdp", mode in zero.STAGES
    if ds:
        zero.require(mode)
    if (fsdp or ds) and accelerator.scaler is not None:
        raise TrainingError(f"train.sharding={mode} trains in fp32 or bf16 (precision: bf16 or auto on GPUs with bf16); fp16's loss scaler is not sharded")

    def new_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(param_groups(m, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        for g in opt.param_groups:
            g["initial_lr"] = cfg.lr
        return opt

    optimizer = None if (fsdp or ds) else new_optimizer(module)  # sharded: built over the sharded parameters, below
    ckpt_dir = out_dir / "checkpoints"
    start_step, resumed_from, opt_state = 0, None, None
    if resume:
        ckpts = list_checkpoints(ckpt_dir)
        if ckpts:
            saved = json.loads((ckpts[-1] / "state.json").read_text())
            if saved.get("fingerprint") != fingerprint:
                raise TrainingError(f"{ckpts[-1]}: checkpoint belongs to a different recipe; use --overwrite to start over")
            zero.check_resume(ckpts[-1], saved, mode, world)
            state = load_checkpoint(ckpts[-1], module, optimizer)
            start_step = resumed_from = int(state["step"])
            opt_state = state.get("optimizer_state")
            if state.get("scaler") and accelerator.scaler is not None:  # fp16 loss scale, for an exact resume
                accelerator.scaler.load_state_dict(state["scaler"])
    _check_distributed(accelerator)
    if fsdp:
        from . import sharding

        units = sharding.shard(module)
        model = module
        if accelerator.is_main_process and not quiet:
            held, whole = sharding.local_share(model)
            print(f"fsdp: {units} blocks and the rest sharded over {world} processes; this process holds "
                  f"{held:,} of {whole:,} parameter elements", flush=True)
        optimizer = new_optimizer(model)
        if opt_state is not None:
            sharding.load_optimizer_state(model, optimizer, opt_state)
    elif ds:
        held = zero.hold_scalars(module)  # 0-d parameters as 1-element ones, which DeepSpeed can take
        optimizer = new_optimizer(module)
        model = zero.initialize(module, optimizer, cfg, local, zero.STAGES[mode])
        if resumed_from is not None:
            zero.load(model, ckpts[-1])
        if accelerator.is_main_process and not quiet:
            held_n, whole = zero.local_share(module)
            print(f"deepspeed: ZeRO-{zero.STAGES[mode]} over {world} processes; this process holds {held_n:,} of {whole:,} parameter elements", flush=True)
    else:
        model, optimizer = accelerator.prepare(module, optimizer)

    logger = _Logger(out_dir, resumed_from, accelerator.is_main_process)
    is_tty = sys.stdout.isatty() and not quiet
    progress_bar = None
    if accelerator.is_main_process and is_tty:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress_bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")
        )
        task = progress_bar.add_task("train", total=cfg.max_steps, completed=start_step, info="")
        progress_bar.start()

    def micro_batches():  # (this process's indices, progress) of every micro-batch from the first step on, in order
        for step in range(start_step, cfg.max_steps):
            progress = step / max(1, cfg.max_steps - 1)
            for micro in range(cfg.grad_accum):
                idx = batch_indices(n_items, cfg.batch_size, step * cfg.grad_accum + micro, seed)
                yield idx[rank * local : (rank + 1) * local], progress

    # a module with `prepare` gets its micro-batches prepared ahead in a thread (engine/prefetch.py); else forward(indices)
    prepare = getattr(module, "prepare", None)
    prefetcher = Prefetcher(prepare, micro_batches(), cfg.prefetch) if prepare is not None and cfg.prefetch > 0 and start_step < cfg.max_steps else None
    inputs = prefetcher if prefetcher is not None else (mine for mine, _ in micro_batches())

    t0 = time.perf_counter()
    last: dict[str, float] = {}
    window_t, window_samples = time.perf_counter(), 0
    model.train()
    try:
        for step in range(start_step, cfg.max_steps):
            lr_mult = warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lr_mult
            progress = step / max(1, cfg.max_steps - 1)
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = next(inputs)
                sync = micro == cfg.grad_accum - 1
                # gradients are all-reduced (sharded: reduce-scattered) only on the last micro-batch of a step
                if fsdp:
                    model.set_requires_gradient_sync(sync)
                with accelerator.no_sync(model) if (not sync and world > 1 and mode == "none") else _null():
                    with accelerator.autocast():
                        parts = model(batch, progress)
                    for name, value in parts.items():
                        v = float(value.detach())
                        if not math.isfinite(v):
                            raise TrainingError(f"step {step}: loss part {name!r} is {v}; lower train.lr or check the data")
                        sums[name] = sums.get(name, 0.0) + v / cfg.grad_accum
                    if ds:  # DeepSpeed divides by the accumulation steps itself and steps at the last micro-batch
                        model.backward(parts["loss"])
                        model.step()
                    else:
                        accelerator.backward(parts["loss"] / cfg.grad_accum)
            if ds:
                if cfg.max_grad_norm is not None:  # DeepSpeed's norm over every partition (it clipped by it)
                    sums["grad_norm"] = float(model.get_global_grad_norm() or 0.0)
            elif fsdp:
                sharding.sync_replicated_grads(model)
            if cfg.max_grad_norm is not None and not ds:
                if fsdp:  # the norm over every shard and the whole parameters, clipped in place
                    gnorm = sharding.clip_grad_norm(list(model.parameters()), cfg.max_grad_norm)
                else:
                    gnorm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                sums["grad_norm"] = float(gnorm)
            if not ds:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_samples += cfg.batch_size * cfg.grad_accum
            last = sums
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                now = time.perf_counter()
                sps = window_samples / max(now - window_t, 1e-9)
                window_t, window_samples = now, 0
                logger.log(done, {**sums, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": sps})
                info = " ".join(f"{k}={v:.4g}" for k, v in sums.items() if k != "grad_norm") + f" {sps:.0f} samples/s"
                if progress_bar is None and accelerator.is_main_process and not quiet:
                    print(f"step {done}/{cfg.max_steps} {info}", flush=True)
                elif progress_bar is not None:
                    progress_bar.update(task, info=info)
            if progress_bar is not None:
                progress_bar.update(task, completed=done)
            if done % cfg.save_every == 0 or done == cfg.max_steps:
                accelerator.wait_for_everyone()
                gathered = {}
                if fsdp:  # every process takes part in gathering; the main one writes the same files as unsharded training
                    gathered = {"model_state": sharding.full_model_state(model), "optimizer_state": sharding.full_optimizer_state(model, optimizer)}
                elif ds:  # DeepSpeed's partitioned state from every process, moved into the checkpoint by the main one
                    staging = ckpt_dir / f".deepspeed-{done:06d}"
                    if accelerator.is_main_process:  # what a killed run may have left there
                        zero.discard(staging)
                    accelerator.wait_for_everyone()
                    zero.save(model, staging)
                    # (optimizer.safetensors: empty, the optimizer state is DeepSpeed's)
                    gathered = {"model_state": zero.full_state(model, module, held), "optimizer_state": {"state": {}, "param_groups": []},
                                "move_in": {"deepspeed": staging}}
                    accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(
                        ckpt_dir,
                        done,
                        module if (fsdp or ds) else accelerator.unwrap_model(model),
                        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                        {
                            "fingerprint": fingerprint,
                            "world_size": world,
                            "sharding": mode,
                            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                        },
                        keep_last=cfg.keep_last,
                        **gathered,
                    )
                accelerator.wait_for_everyone()
    finally:
        if prefetcher is not None:
            prefetcher.close()
        if progress_bar is not None:
            progress_bar.stop()
        logger.close()
    peaks = states = None
    if world > 1:  # what each process holds and needed (sharded: the main process also gathers the checkpoints)
        import resource

        import torch.distributed as dist

        from .sharding import held_bytes

        peaks, states = [0] * world, [0] * world
        dist.all_gather_object(states, zero.held_bytes(model, module) if ds else held_bytes(model, optimizer))
    model.eval()
    if fsdp:  # the final folder is saved from whole parameters
        full = sharding.full_model_state(model)
        if accelerator.is_main_process:
            sharding.unshard_into(module, full)
        unwrapped = module
    elif ds:  # gathered, DeepSpeed's hooks and the 0-d views removed: a plain model to save
        full = zero.full_state(model, module, held)
        model.destroy()
        zero.restore_scalars(held)
        if accelerator.is_main_process:
            from .sharding import unshard_into

            unshard_into(module, full)
        unwrapped = module
    else:
        unwrapped = accelerator.unwrap_model(model)
    if on_end is not None and accelerator.is_main_process:
        on_end(unwrapped)
    accelerator.wait_for_everyone()
    if world > 1:
        dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return LoopResult(step=cfg.max_steps, last=last, resumed_from=resumed_from, seconds=time.perf_counter() - t0,
                      samples=(cfg.max_steps - (resumed_from or 0)) * cfg.batch_size * cfg.grad_accum, peak_rss_per_process=peaks,
                      state_bytes_per_process=states)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
