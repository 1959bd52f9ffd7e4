"""The engine loop: exact resume, NaN stop, checkpoint pruning, data order, accumulation."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmdistill.config import TrainConfig
from mmdistill.engine.checkpoint import list_checkpoints
from mmdistill.engine.loop import TrainingError, batch_indices, train_loop
from mmdistill.engine.schedules import warmup_cosine


class Toy(nn.Module):
    """A 2-layer regression on fixed data; forward(indices, progress) -> loss parts."""

    def __init__(self, crash_at: int | None = None, nan_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 8, generator=g)
        self.y = self.x.sum(1, keepdim=True).sin()
        self.calls = 0
        self.crash_at, self.nan_at = crash_at, nan_at

    def forward(self, idx, progress):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt
        pred = self.net(self.x[idx])
        mse = ((pred - self.y[idx]) ** 2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            mse = mse * float("nan")
        return {"loss": mse + 0.0 * progress, "mse": mse}


def cfg(**kw):
    base = dict(max_steps=10, batch_size=8, lr=1e-2, warmup_steps=2, save_every=4, keep_last=2, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def run(tmp, module, resume=False, **kw):
    return train_loop(module, n_items=64, cfg=cfg(**kw), out_dir=tmp, seed=3, fingerprint="abc", resume=resume, quiet=True)


def test_resume_is_exact(tmp_path):
    a = Toy()
    run(tmp_path / "a", a, grad_accum=2)
    b = Toy(crash_at=13)  # dies during step 7 (2 micro-batches a step), after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", b, grad_accum=2)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-000004"]
    res = run(tmp_path / "b", Toy(), resume=True, grad_accum=2)
    assert res.resumed_from == 4
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "step-000010" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "step-000010" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the log holds each step once after the resume
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    # and so do the TensorBoard events (steps 5-7 were logged twice: before the crash and after the resume)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "b" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/mse")] == list(range(1, 11))


def test_training_reduces_loss_and_keeps_last_n(tmp_path):
    m = Toy()
    run(tmp_path, m, max_steps=40, save_every=5, keep_last=2)
    logs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["mse"] < logs[0]["mse"]
    assert {"loss", "mse", "lr", "samples_per_s", "grad_norm"} <= logs[0].keys()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000035", "step-000040"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_nan_stops_with_step_and_part(tmp_path):
    with pytest.raises(TrainingError, match=r"step 2: loss part 'loss' is nan"):
        run(tmp_path, Toy(nan_at=3))


def test_resume_refuses_other_recipe(tmp_path):
    run(tmp_path, Toy(), max_steps=4)
    with pytest.raises(TrainingError, match="different recipe"):
        train_loop(Toy(), n_items=64, cfg=cfg(max_steps=8), out_dir=tmp_path, seed=3, fingerprint="other", resume=True, quiet=True)


def test_batch_order_is_a_function_of_step():
    a = batch_indices(50, 8, 3, seed=1)
    assert a == batch_indices(50, 8, 3, seed=1)
    assert len(a) == 8
    epoch = [i for s in range(6) for i in batch_indices(50, 8, s, seed=1)]
    assert len(set(epoch)) == 48  # one epoch covers distinct items (drop-last)
    assert batch_indices(50, 8, 6, seed=1) != batch_indices(50, 8, 0, seed=1)  # new permutation next epoch
    with pytest.raises(TrainingError, match="fewer than one batch"):
        batch_indices(5, 8, 0, seed=1)


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] >= 0.1 - 1e-9


def test_sharded_accelerate_setups_are_refused_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mmdistill.engine.loop import TrainingError, _check_distributed

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(TrainingError, match=f"set up for {kind.name}: pass an Accelerator without .* train.sharding \\(fsdp, zero2, zero3\\)"):
            _check_distributed(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        _check_distributed(SimpleNamespace(distributed_type=kind))


def test_shipped_accelerate_configs_load_with_accelerate():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).parents[3] / "configs/accelerate"
    kinds = {p.name: load_config_from_file(str(p)).distributed_type for p in sorted(root.glob("*.yaml"))}
    assert {k: getattr(v, "name", str(v)) for k, v in kinds.items()} == {
        "ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed-zero2.yaml": "DEEPSPEED", "deepspeed-zero3.yaml": "DEEPSPEED"}
    for stage in (2, 3):  # the stage mmdistill reads from the launch (engine/zero.py)
        assert load_config_from_file(str(root / f"deepspeed-zero{stage}.yaml")).deepspeed_config["zero_stage"] == stage


class ToyPrepared(Toy):
    """Toy with the prepare / forward split: prepare runs (in the prefetch thread) what forward(indices) did on the CPU."""

    def __init__(self, bad_batch: int | None = None, **kw):
        super().__init__(**kw)
        self.prepared: list[tuple[list[int], float]] = []
        self.threads: set[str] = set()
        self.bad_batch = bad_batch

    def prepare(self, idx, progress):
        import threading

        self.threads.add(threading.current_thread().name)
        self.prepared.append((list(idx), progress))
        if self.bad_batch is not None and len(self.prepared) == self.bad_batch:
            raise ValueError(f"data.jsonl:{self.bad_batch}: field 'image': not an image")
        return {"x": self.x[idx], "y": self.y[idx]}

    def forward(self, prepared, progress):
        if isinstance(prepared, list):
            prepared = self.prepare(prepared, progress)
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt
        mse = ((self.net(prepared["x"]) - prepared["y"]) ** 2).mean()
        return {"loss": mse + 0.0 * progress, "mse": mse}


def _weights(folder):
    return load_file(str(folder / "checkpoints" / "step-000010" / "trainable.safetensors"))


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetching_changes_neither_batches_nor_weights(tmp_path, depth):
    plain, pre = ToyPrepared(), ToyPrepared()
    run(tmp_path / "plain", plain, grad_accum=2, prefetch=0)
    run(tmp_path / "pre", pre, grad_accum=2, prefetch=depth)
    assert pre.prepared == plain.prepared and len(pre.prepared) == 20  # the same micro-batches, in order, each once
    assert pre.threads == {"mmdistill-prefetch"} and plain.threads == {"MainThread"}
    wa, wb = _weights(tmp_path / "plain"), _weights(tmp_path / "pre")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_prefetching_resumes_exactly(tmp_path):
    run(tmp_path / "a", ToyPrepared(), prefetch=2)
    b = ToyPrepared(crash_at=7)  # killed in step 7, after the step-4 checkpoint, with batches prepared ahead
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", b, prefetch=2)
    resumed = ToyPrepared()
    assert run(tmp_path / "b", resumed, resume=True, prefetch=2).resumed_from == 4
    assert [p for p, _ in resumed.prepared] == [batch_indices(64, 8, s, 3) for s in range(4, 10)]  # from step 5 on, not from the start
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_an_error_in_a_prefetched_batch_surfaces_at_its_step(tmp_path):
    m = ToyPrepared(bad_batch=5)
    with pytest.raises(ValueError, match=r"data.jsonl:5: field 'image'"):
        run(tmp_path, m, prefetch=3)
    assert m.calls == 4  # the four good batches trained; the fifth raised in the main thread, where the loop reads it
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_prefetcher_keeps_order_bounds_lookahead_and_stops():
    import threading
    import time

    from mmdistill.engine.prefetch import Prefetcher

    started, lock = [], threading.Lock()

    def fn(i):
        with lock:
            started.append(i)
        return i * i

    p = Prefetcher(fn, ((i,) for i in range(100)), depth=3)
    assert next(p) == 0
    time.sleep(0.3)
    assert len(started) <= 1 + 3 + 1  # the one taken, `depth` waiting, one being put
    assert [next(p) for _ in range(4)] == [1, 4, 9, 16]
    p.close()
    assert not p._thread.is_alive() and len(started) < 100  # closing stops the thread before it ran through the items
    assert list(Prefetcher(fn, ((i,) for i in range(5)), depth=2)) == [0, 1, 4, 9, 16]  # then StopIteration
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(fn, [], depth=0)
