"""engine/zero.py without processes: which sharding a launch asks for, the 0-d parameter stand-ins, the resume rule."""

import pytest
import torch
from torch import nn

from mmdistill.engine import zero
from mmdistill.engine.loop import TrainingError


def test_launch_env_decides_when_the_recipe_leaves_sharding_alone(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero.launched_sharding() == "zero3"
    assert zero.resolve("none", "zero3") == "zero3"
    assert zero.resolve("zero3", "zero3") == "zero3"
    with pytest.raises(TrainingError, match="train.sharding: fsdp but the accelerate launch config asks for zero3"):
        zero.resolve("fsdp", "zero3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(TrainingError, match="ZeRO stage 1"):
        zero.launched_sharding()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert zero.launched_sharding() == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert zero.launched_sharding() is None and zero.resolve("zero2", None) == "zero2"


def test_zero_d_parameters_become_one_element_and_the_model_still_reads_zero_d():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            assert self.scale.ndim == 0
            return (self.lin(x) * self.scale.exp()).sum()

    m = M()
    want = torch.autograd.grad(m(torch.ones(1, 3)), m.scale)[0]
    held = zero.hold_scalars(m)
    p = dict(m.named_parameters())["scale"]
    assert p.shape == (1,)
    out = m(torch.ones(1, 3))
    out.backward()
    assert torch.allclose(p.grad, want.reshape(1))  # the gradient of the 0-d parameter, on its stand-in
    zero.restore_scalars(held)
    assert "scale" not in m.__dict__


def test_deepspeed_checkpoints_resume_only_under_the_same_stage_and_process_count(tmp_path):
    zero.check_resume(tmp_path, {"sharding": "zero2", "world_size": 2}, "zero2", 2)
    zero.check_resume(tmp_path, {"sharding": "fsdp", "world_size": 2}, "none", 1)
    for saved, mode, world in ((("zero2", 2), "zero3", 2), (("zero2", 2), "zero2", 4), (("none", 1), "zero2", 2), (("zero3", 2), "none", 1)):
        with pytest.raises(TrainingError, match="resumes only under the same ZeRO stage"):
            zero.check_resume(tmp_path, {"sharding": saved[0], "world_size": saved[1]}, mode, world)


def test_config_rejects_unknown_sharding():
    from mmdistill.config import TrainConfig

    assert TrainConfig(sharding="zero3").sharding == "zero3"
    with pytest.raises(Exception, match="sharding"):
        TrainConfig(sharding="zero1")
