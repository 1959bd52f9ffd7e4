"""The same recipe in 2 processes (torchrun, gloo on the CPU) ends at the weights of 1 process with the same global batch."""

import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from helpers import ENV, free_port, mmd, write_recipe, write_yaml


def test_two_processes_match_one(tmp_path):
    mmd("data", "synth", tmp_path / "data", "--n", "200", "--size", "32", timeout=None)
    teacher = {
        "output_dir": str(tmp_path / "teacher"),
        "data": {"train": str(tmp_path / "data/pairs_train.jsonl")},
        "student": {"init": "tiny", "preset": "clip-nano"},
        "train": {"max_steps": 2, "batch_size": 16, "warmup_steps": 0},
    }
    mmd("train", write_yaml(tmp_path / "teacher.yaml", teacher), timeout=None)

    def recipe(name):
        d = {
            "output_dir": str(tmp_path / name),
            "data": {"train": str(tmp_path / "data/pairs_train.jsonl")},
            "teacher": {"model": str(tmp_path / "teacher/model")},
            "student": {"init": "scratch", "overrides": {"vision_config.num_hidden_layers": 1}},
            "loss": {"terms": {"clip": {"weight": 1.0}, "sim_kd": {"weight": 1.0}, "fd": {"weight": 10.0}, "icl": {"weight": 0.5}}},
            "train": {"max_steps": 5, "batch_size": 16, "grad_accum": 2, "warmup_steps": 1, "lr": 0.003},
        }
        return write_recipe(tmp_path, name, d)

    one = mmd("distill", recipe("one"), check=False, timeout=None)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "mmdistill.cli", "distill", recipe("two")],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "two/checkpoints/step-000005/state.json").read_text())["world_size"] == 2
    a = load_file(str(tmp_path / "one/checkpoints/step-000005/trainable.safetensors"))
    b = load_file(str(tmp_path / "two/checkpoints/step-000005/trainable.safetensors"))
    assert a.keys() == b.keys()
    # k_proj.bias gets an exactly-zero true gradient (softmax ignores a shift shared by all keys), so what
    # it receives is rounding noise, which Adam's normalisation turns into lr-sized steps: not comparable.
    compared = [k for k in a if not k.endswith("k_proj.bias")]
    worst = max(float((a[k] - b[k]).abs().max()) for k in compared)
    assert worst < 2e-5, worst
    # and the runs did train: the weights moved from the student's initialisation by far more than the tolerance
    import shutil

    shutil.rmtree(tmp_path / "one")
    p = recipe("one")
    short = yaml.safe_load(p.read_text())
    short["train"]["max_steps"] = 1
    short["train"]["lr"] = 1e-12
    p.write_text(yaml.safe_dump(short))
    mmd("distill", p, timeout=None)
    init = load_file(str(tmp_path / "one/checkpoints/step-000001/trainable.safetensors"))
    moved = max(float((a[k] - init[k]).abs().max()) for k in compared)
    assert moved > 100 * worst and moved > 1e-3


def test_teacher_cache_in_two_processes_matches_one(tmp_path):
    """`teacher cache` under torchrun splits the records by rank (a journal and shards per process); the store holds
    every record once, with the same signals as a one-process store."""
    import json

    import torch

    from mmdistill.teachers.store import TeacherStore, verify

    mmd("data", "synth", tmp_path / "data", "--n", "120", "--size", "32", timeout=None)
    teacher = {"output_dir": str(tmp_path / "teacher"), "data": {"train": str(tmp_path / "data/pairs_train.jsonl")},
               "student": {"init": "tiny", "preset": "clip-nano"}, "train": {"max_steps": 2, "batch_size": 16, "warmup_steps": 0}}
    mmd("train", write_yaml(tmp_path / "teacher.yaml", teacher), timeout=None)
    kd = {**teacher, "output_dir": str(tmp_path / "kd"), "teacher": {"model": str(tmp_path / "teacher/model")}, "student": {"init": "scratch"},
          "loss": {"terms": {"clip": {"weight": 1.0}, "sim_kd": {"weight": 1.0}}}}
    cache = ["teacher", "cache", str(write_yaml(tmp_path / "kd.yaml", kd)), "--dtype", "fp32", "--shard-records", "16", "--out"]
    one = mmd(*cache, tmp_path / "one", check=False, timeout=None)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "mmdistill.cli", *cache, str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert verify(tmp_path / "two") == []
    assert {p.name for p in (tmp_path / "two").glob("shards-r*.json")} == {"shards-r0.json", "shards-r1.json"}
    a, b = TeacherStore(tmp_path / "one"), TeacherStore(tmp_path / "two")
    assert len(a) == len(b) == 96 and set(a.index) == set(b.index)
    for key in a.index:
        for name, t in a.get(key).items():
            assert torch.allclose(t, b.get(key)[name], atol=1e-6), (key, name)
    # training from the store: 2 processes end at the weights of 1 process with the same global batch
    runs = {}
    for n in (1, 2):
        r = {**kd, "output_dir": str(tmp_path / f"from-store-{n}"), "teacher": {"kind": "store", "path": str(tmp_path / "one")},
             "train": {"max_steps": 3, "batch_size": 16, "warmup_steps": 0, "lr": 0.003, "save_every": 3}}
        write_yaml(tmp_path / f"fs{n}.yaml", r)
        cfg = Path(__file__).parents[2] / "configs/accelerate/ddp.yaml"  # the shipped config, through accelerate's own launcher
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port", str(free_port())] if n == 2 else [sys.executable]
        p = subprocess.run([*launch, "-m", "mmdistill.cli", "distill", str(tmp_path / f"fs{n}.yaml")], env=ENV, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[n] = load_file(str(tmp_path / f"from-store-{n}/checkpoints/step-000003/trainable.safetensors"))
    assert json.loads((tmp_path / "from-store-2/checkpoints/step-000003/state.json").read_text())["world_size"] == 2
    compared = [k for k in runs[1] if not k.endswith("k_proj.bias")]  # see test_two_processes_match_one
    assert max(float((runs[1][k] - runs[2][k]).abs().max()) for k in compared) < 2e-5


def _torchrun(*args, timeout=600):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "mmdistill.cli", *map(str, args)],
                       env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _worst(a, b, skip=("k_proj.bias",)):  # see test_two_processes_match_one for k_proj.bias
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a if not k.endswith(skip))


def test_fsdp_shards_matches_one_process_and_resumes_either_way(tmp_path):
    """train.sharding: fsdp in 2 processes (FSDP2 over gloo): half the parameters per process, the weights of 1 process,
    the same checkpoint files; a killed sharded run resumes exactly, sharded or in one plain process."""
    import json
    import re
    import shutil

    mmd("data", "synth", tmp_path / "data", "--n", "200", "--size", "32", timeout=None)
    teacher = {"output_dir": str(tmp_path / "teacher"), "data": {"train": str(tmp_path / "data/pairs_train.jsonl")},
               "student": {"init": "tiny", "preset": "clip-nano"}, "train": {"max_steps": 2, "batch_size": 16, "warmup_steps": 0}}
    mmd("train", write_yaml(tmp_path / "teacher.yaml", teacher), timeout=None)

    def recipe(name):
        return write_recipe(tmp_path, name, {
            "output_dir": str(tmp_path / name), "data": {"train": str(tmp_path / "data/pairs_train.jsonl")},
            "teacher": {"model": str(tmp_path / "teacher/model")}, "student": {"init": "scratch"},
            "loss": {"terms": {"clip": {"weight": 1.0}, "sim_kd": {"weight": 1.0}, "fd": {"weight": 10.0}, "icl": {"weight": 0.5}}},
            "train": {"max_steps": 5, "batch_size": 16, "grad_accum": 2, "warmup_steps": 1, "lr": 0.003, "save_every": 3, "sharding": "fsdp"}})

    mmd("distill", recipe("one"), timeout=None)  # one process: nothing to shard over, trains plainly
    cfg = Path(__file__).parents[2] / "configs/accelerate/fsdp.yaml"  # the shipped config, through accelerate's launcher
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port", str(free_port()),
                          "-m", "mmdistill.cli", "distill", str(recipe("two"))], env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    m = re.search(r"fsdp: (\d+) blocks and the rest sharded over 2 processes; this process holds ([\d,]+) of ([\d,]+) parameter elements", two.stdout)
    assert m, two.stdout[-2000:]
    held, whole = (int(g.replace(",", "")) for g in m.groups()[1:])
    assert int(m.group(1)) >= 4 and 0.45 * whole <= held <= 0.55 * whole  # every block and the rest: half each
    state = json.loads((tmp_path / "two/checkpoints/step-000005/state.json").read_text())
    assert (state["world_size"], state["sharding"]) == (2, "fsdp")
    ck = "checkpoints/step-000005/trainable.safetensors"
    a, b = load_file(str(tmp_path / "one" / ck)), load_file(str(tmp_path / "two" / ck))
    assert _worst(a, b) < 2e-5
    assert _worst(load_file(str(tmp_path / "one/model/model.safetensors")), load_file(str(tmp_path / "two/model/model.safetensors"))) < 2e-5

    for name, launch in (("resumed-sharded", _torchrun), ("resumed-plain", lambda *a: mmd(*a, timeout=None))):
        shutil.copytree(tmp_path / "two", tmp_path / name)  # as if killed after the step-3 checkpoint
        shutil.rmtree(tmp_path / name / "checkpoints/step-000005")
        shutil.rmtree(tmp_path / name / "model")
        r = yaml.safe_load(recipe("two").read_text())
        r["output_dir"] = str(tmp_path / name)
        launch("distill", write_yaml(tmp_path / f"{name}.yaml", r), "--resume")
        c = load_file(str(tmp_path / name / ck))
        assert _worst(b, c) < (1e-6 if name == "resumed-sharded" else 2e-5), name


def test_fsdp_and_zero3_generative_match_ddp_with_tied_weights_written_once(tmp_path):
    """A Qwen3-VL student (tied embeddings and LM head) sharded by FSDP2 or DeepSpeed ZeRO-3 ends where data-parallel
    training ends, and its checkpoint holds the same tensors: the tied weight once."""
    mmd("data", "synth", tmp_path / "data", "--n", "80", "--size", "32", timeout=None)
    runs = {}
    for sharding in ("none", "fsdp", "zero3"):
        d = {"family": "generative", "output_dir": str(tmp_path / sharding),
             "data": {"train": str(tmp_path / "data/chat_train.jsonl"), "max_records": 48, "max_length": 256},
             "student": {"init": "tiny", "preset": "vlm-nano", "image_size": 32}, "loss": {"terms": {"sft": {"weight": 1.0}}},
             "train": {"max_steps": 3, "batch_size": 8, "warmup_steps": 0, "lr": 0.003, "save_every": 3, "sharding": sharding}}
        _torchrun("train", write_yaml(tmp_path / f"{sharding}.yaml", d))
        runs[sharding] = load_file(str(tmp_path / sharding / "checkpoints/step-000003/trainable.safetensors"))
    assert _worst(runs["none"], runs["fsdp"], skip=()) < 1e-6
    assert _worst(runs["none"], runs["zero3"], skip=()) < 2e-5  # DeepSpeed reduces in its own flat buckets
    import json

    held = {s: json.loads((tmp_path / s / "train_summary.json").read_text())["state_bytes_per_process"] for s in runs}
    for rank in (0, 1):  # weights + AdamW state each process holds: half, sharded
        assert 0.45 < held["fsdp"][rank] / held["none"][rank] < 0.55, held
        assert 0.6 < held["zero3"][rank] / held["none"][rank] < 0.72, held  # + DeepSpeed's fp32 master partition
    for sharding in ("fsdp", "zero3"):
        assert not any(k.endswith("lm_head.weight") for k in runs[sharding])  # tied to the embeddings: written once (aliased)


def test_deepspeed_zero_matches_one_process_and_resumes_under_the_same_stage(tmp_path):
    """train.sharding: zero2 (torchrun) and ZeRO-3 through the shipped accelerate config end at the weights of one plain
    process, CLIP's 0-d logit_scale included and 0-d again in the files; ZeRO-3 holds less per process than ZeRO-2; a
    killed ZeRO-2 run resumes exactly from DeepSpeed's partitioned state, and a plain resume of it is refused in one line."""
    import json
    import shutil

    mmd("data", "synth", tmp_path / "data", "--n", "200", "--size", "32", timeout=None)
    teacher = {"output_dir": str(tmp_path / "teacher"), "data": {"train": str(tmp_path / "data/pairs_train.jsonl")},
               "student": {"init": "tiny", "preset": "clip-nano"}, "train": {"max_steps": 2, "batch_size": 16, "warmup_steps": 0}}
    mmd("train", write_yaml(tmp_path / "teacher.yaml", teacher), timeout=None)

    def recipe(name, sharding="none"):
        return write_recipe(tmp_path, name, {
            "output_dir": str(tmp_path / name), "data": {"train": str(tmp_path / "data/pairs_train.jsonl")},
            "teacher": {"model": str(tmp_path / "teacher/model")}, "student": {"init": "scratch"},
            "loss": {"terms": {"clip": {"weight": 1.0}, "sim_kd": {"weight": 1.0}, "fd": {"weight": 10.0}, "icl": {"weight": 0.5}}},
            "train": {"max_steps": 5, "batch_size": 16, "grad_accum": 2, "warmup_steps": 1, "lr": 0.003, "save_every": 3, "sharding": sharding}})

    mmd("distill", recipe("one"), timeout=None)
    z2 = _torchrun("distill", recipe("zero2", "zero2"))
    assert "deepspeed: ZeRO-2 over 2 processes" in z2.stdout
    cfg = Path(__file__).parents[2] / "configs/accelerate/deepspeed-zero3.yaml"  # the recipe says none: the launch decides
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port", str(free_port()),
                        "-m", "mmdistill.cli", "distill", str(recipe("zero3"))], env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "deepspeed: ZeRO-3 over 2 processes" in p.stdout, p.stderr[-3000:]

    ck = "checkpoints/step-000005/trainable.safetensors"
    one = load_file(str(tmp_path / "one" / ck))
    for name in ("zero2", "zero3"):
        state = json.loads((tmp_path / name / "checkpoints/step-000005/state.json").read_text())
        assert (state["world_size"], state["sharding"]) == (2, name)
        assert any((tmp_path / name / "checkpoints/step-000005/deepspeed/state").glob("*optim_states.pt"))
        got = load_file(str(tmp_path / name / ck))
        assert got["student.logit_scale"].shape == ()  # handed to DeepSpeed as 1 element, written 0-d
        assert _worst(one, got) < 2e-5, name
        final = load_file(str(tmp_path / name / "model/model.safetensors"))
        assert _worst(load_file(str(tmp_path / "one/model/model.safetensors")), final) < 2e-5, name
    held = {s: json.loads((tmp_path / s / "train_summary.json").read_text())["state_bytes_per_process"] for s in ("zero2", "zero3")}
    for rank in (0, 1):  # fp32: ZeRO-2 holds weights + fp32 master half + AdamW half (2.5 W), ZeRO-3 half the weights too (2 W)
        assert 0.75 < held["zero3"][rank] / held["zero2"][rank] < 0.85, held

    shutil.copytree(tmp_path / "zero2", tmp_path / "resumed")  # as if killed after the step-3 checkpoint
    shutil.rmtree(tmp_path / "resumed/checkpoints/step-000005")
    shutil.rmtree(tmp_path / "resumed/model")
    r = yaml.safe_load(recipe("zero2", "zero2").read_text())
    r["output_dir"] = str(tmp_path / "resumed")
    _torchrun("distill", write_yaml(tmp_path / "resumed.yaml", r), "--resume")
    assert _worst(load_file(str(tmp_path / "zero2" / ck)), load_file(str(tmp_path / "resumed" / ck)), skip=()) < 1e-6
    r["output_dir"] = str(tmp_path / "zero2")  # one plain process cannot take DeepSpeed's partitioned optimizer state
    refused = mmd("distill", write_yaml(tmp_path / "plain.yaml", r), "--resume", timeout=None, check=False)
    assert refused.returncode != 0 and "resumes only under the same ZeRO stage and process count" in refused.stdout + refused.stderr
