"""Atomic checkpoints without pickle.

A checkpoint is a folder ``step-000123/`` holding
- ``trainable.safetensors``  the trainable module's state (student + loss projectors)
- ``optimizer.safetensors``  every tensor of the optimizer state, keys ``state.<param>.<name>``
- ``state.json``             step, data position, optimizer param groups, RNG states, recipe fingerprint

It is written into ``step-000123.tmp`` and renamed into place, so a crash mid-write never
leaves a checkpoint that looks complete; only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_PREFIX = "step-"


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this process's device only
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _optimizer_to_flat(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict (``state`` keyed by parameter index) as flat tensors + JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def _dedup_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write (tied weights, e.g. embeddings and lm_head, once) and {alias: written key}."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        ident = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        out[key] = value.detach().cpu().contiguous()
    return out, aliases


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX) and not p.name.endswith(".tmp")]
    return sorted(done, key=lambda p: int(p.name[len(_STEP_PREFIX):]))


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int = 2,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    move_in: dict[str, Path] | None = None,
) -> Path:
    """Write a checkpoint atomically and prune old ones. Call on the main process only.

    `model_state` / `optimizer_state` (sharded training: gathered from every process, the optimizer's keyed by
    parameter index as a plain optimizer's are) replace ``module.state_dict()`` / ``optimizer.state_dict()``, so a
    sharded run writes the same files as an unsharded one. `move_in` ({name: folder}, DeepSpeed's partitioned state)
    is moved into the checkpoint before it is published."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{_STEP_PREFIX}{step:06d}"
    tmp = ckpt_dir / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights, aliases = _dedup_shared(module.state_dict() if model_state is None else model_state)
    save_file(weights, str(tmp / "trainable.safetensors"), metadata={"aliases": json.dumps(aliases)})
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer.state_dict() if optimizer_state is None else optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    payload = dict(state, step=step, optimizer=opt_meta, rng=_rng_state())
    (tmp / "state.json").write_text(json.dumps(payload))
    for name, folder in (move_in or {}).items():
        os.replace(folder, tmp / name)
    for f in tmp.rglob("*"):  # make the bytes durable before the rename publishes them
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore module, optimizer and RNG state; return the saved state dict (step, data position, ...). Without an
    `optimizer` (sharded training builds it after sharding), its state dict is returned as ``state["optimizer_state"]``."""
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    from safetensors import safe_open

    with safe_open(str(path / "trainable.safetensors"), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, canonical in aliases.items():  # tied weights were written once
        weights[alias] = weights[canonical]
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    opt_state = _optimizer_from_flat(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    if optimizer is None:
        state["optimizer_state"] = opt_state
    else:
        optimizer.load_state_dict(opt_state)
    _set_rng_state(state["rng"])
    return state
