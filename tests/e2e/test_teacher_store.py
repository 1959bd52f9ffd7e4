"""The offline teacher store end to end on tiny models: `teacher cache` (killed and rerun), `verify`, `inspect`,
distillation from a store for all three families (the same loss as from the live teacher), refusals."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ENV, generative_recipe, merged, mmd, write_recipe

def gen_recipe(root: Path, name: str, **extra) -> dict:
    d = generative_recipe(root, name, data={"max_records": 40, "max_length": 160}, eval={"max_items": 4, "max_new_tokens": 4, "latency": False})
    return merged(d, extra)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    mmd("data", "synth", root / "data", "--n", 60, "--seed", 5)
    mmd("train", write_recipe(root, "teacher", gen_recipe(root, "teacher", student={"init": "tiny", "preset": "vlm-nano"})))
    kd = gen_recipe(root, "kd", teacher={"model": str(root / "teacher/model")},
                    loss={"terms": {"sft": {"weight": 1.0}, "kd": {"weight": 1.0}, "vision": {"weight": 1.0}, "text": {"weight": 1.0, "options": {"layers": [[-2, -2]]}}}})
    return root, write_recipe(root, "kd", kd), kd


def test_cache_killed_at_random_points_completes_with_every_record_once(world):
    from mmdistill.data.records import read_records
    from mmdistill.teachers.store import RecordKeys, TeacherStore, verify

    root, kd_path, _ = world
    store = root / "store-killed"
    n = 192  # all of the training chat: 48 shards of 4. A run on the tiny teacher writes a shard every few ms, so
    # a kill lands some shards in, and a run the poller sees too late may finish the store: the loop then stops.
    cmd = [sys.executable, "-m", "mmdistill.cli", "teacher", "cache", str(kd_path), f"data.max_records={n}", "--out", str(store), "--shard-records", "4"]
    rng = random.Random(0)
    kills = 0
    for _ in range(10):  # until three runs were SIGKILLed a little after their first new shard appeared
        before = len(list(store.glob("shard-*.safetensors"))) if store.exists() else 0
        p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and len(list(store.glob("shard-*.safetensors"))) <= before:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.03))  # somewhere in the next shard's compute / write / rename / journal
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if kills >= 3 or p.returncode == 0:
            break
    assert kills >= 3, f"{kills} runs were killed before one finished the store"
    mmd("teacher", "cache", kd_path, f"data.max_records={n}", "--out", store, "--shard-records", "4")
    assert verify(store) == []
    records, _ = read_records(root / "data/chat_train.jsonl")
    keys = RecordKeys()
    wanted = {keys.key(r) for r in records[:n]}
    st = TeacherStore(store)
    assert set(st.index) == wanted  # none missing, none extra
    journals = [json.loads(j.read_text()) for j in store.glob("shards-r*.json")]
    assert sum(s["records"] for j in journals for s in j["shards"]) == len(wanted)  # none stored twice


def test_verify_finds_corrupt_truncated_and_missing_shards(world, tmp_path):
    import shutil

    root, kd_path, _ = world
    store = tmp_path / "s"
    mmd("teacher", "cache", kd_path, "--out", store, "--shard-records", "16")
    assert mmd("teacher", "verify", store).stdout.strip().endswith("ok")
    info = json.loads(mmd("teacher", "inspect", store).stdout)
    assert info["records"] == 40 and info["family"] == "generative" and info["bytes_per_token"] > 0
    assert info["settings"]["top_k"] == 16 and info["settings"]["features"] == {"vision_pooled": True, "text_layers": [-2]}
    shards = sorted(store.glob("shard-*.safetensors"))
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    data = bytearray((bad / shards[0].name).read_bytes())
    data[-3] ^= 0xFF
    (bad / shards[0].name).write_bytes(bytes(data))
    (bad / shards[1].name).write_bytes((bad / shards[1].name).read_bytes()[:100])
    (bad / shards[2].name).unlink()
    p = mmd("teacher", "verify", bad, check=False)
    assert p.returncode == 1
    assert f"{shards[0].name}: sha256 differs" in p.stdout
    assert f"{shards[1].name}: 100 bytes" in p.stdout and "truncated" in p.stdout
    assert f"{shards[2].name}: missing" in p.stdout


def test_distill_from_store_matches_live_teacher_loss(world):
    """The first step's losses from a store equal those from the live teacher: exactly (fp32) when the store keeps
    every id (k = V); with k < V the tail bucket merges the rest, so the sparse KL is at most the dense one (the
    data-processing inequality). The store runs never load the teacher's weights."""
    from mmdistill.config import recipe_from_dict
    from mmdistill.recipes import generative as gr

    root, kd_path, kd = world
    vocab = json.loads((root / "teacher/model/config.json").read_text())["text_config"]["vocab_size"]
    one = {"max_steps": 1, "batch_size": 8, "warmup_steps": 0, "save_every": 1, "log_every": 1, "lr": 1e-9}
    live = recipe_from_dict({**kd, "output_dir": str(root / "kd-live"), "train": one})
    a = gr.run(live, overwrite=True, log=lambda *_: None, evaluate_after=False)["last"]
    for k in (vocab, 16):
        store = root / f"store-fp32-k{k}"
        mmd("teacher", "cache", kd_path, "--out", store, "--dtype", "fp32", "--top-k", k)
        stored = recipe_from_dict({**kd, "output_dir": str(root / f"kd-store-{k}"), "train": one, "teacher": {"kind": "store", "path": str(store)}})
        b = gr.run(stored, overwrite=True, log=lambda *_: None, evaluate_after=False)["last"]
        for part in ("vision", "text", "sft"):
            assert b[part] == pytest.approx(a[part], rel=1e-5), part
        if k == vocab:
            assert b["kd"] == pytest.approx(a["kd"], rel=1e-4)
        else:
            assert 0 < b["kd"] < a["kd"]
    # a sampled store (random-sampling KD): trains, and its KD term is an importance-weighted estimate of the dense one
    mmd("teacher", "cache", kd_path, "--out", root / "store-sampled", "--sample", 8)
    sampled = recipe_from_dict({**kd, "output_dir": str(root / "kd-sampled"), "train": one, "teacher": {"kind": "store", "path": str(root / "store-sampled")}})
    c = gr.run(sampled, overwrite=True, log=lambda *_: None, evaluate_after=False)["last"]
    # the tiny teacher and student are both near uniform (dense KL ~ 5e-3 nats): one draw set's estimate lands within
    # a few 1e-3 of it; the divergence to the draws' frequencies (the old form) was nats away
    assert c["kd"] == pytest.approx(a["kd"], abs=0.01) and c["sft"] == pytest.approx(a["sft"], rel=1e-5)


def test_sampled_store_weighs_its_draws_at_the_recipes_temperature(world, tmp_path, monkeypatch):
    """A sampled store for a KD term at T = 2 -> 1: its rows hold the drawn ids, their counts, the teacher's log-probs
    of them and log Z_β on the β grid; training reads them through the importance-weighted forward KL, whose value
    estimates the dense loss (tempering the draws' frequencies was +155% off in BENCHMARKS.md); a sampled store of an
    older mmdistill and a divergence other than forward KL are refused in one line."""
    import shutil

    import mmdistill.losses.composite as composite
    from mmdistill.config import recipe_from_dict
    from mmdistill.recipes import generative as gr
    from mmdistill.teachers.cache import StoreTeacher
    from mmdistill.teachers.store import StoreError, TeacherStore

    root, _, kd = world
    terms = {"sft": {"weight": 1.0}, "kd": {"weight": 1.0, "options": {"temperature": {"kind": "linear", "start": 2.0, "end": 1.0}}}}
    kd2 = {**kd, "loss": {"terms": terms}}
    store = tmp_path / "sampled"
    mmd("teacher", "cache", write_recipe(tmp_path, "kd2", kd2), "--out", store, "--sample", 16, "--dtype", "fp32")
    st = TeacherStore(store)
    settings = st.manifest["settings"]
    assert settings["sample"] == 16 and settings["sample_weights"] == "importance" and settings["tail_temperatures"] == [1.0, 2.0]
    row = st.get(next(iter(st.index)))
    assert set(row) == {"topk_ids", "topk_logprobs", "sample_counts", "logz_grid", "response_ids"}
    assert (row["sample_counts"].long().sum(-1) == 16).all() and (row["topk_logprobs"] <= 0).all()
    assert torch.allclose(row["logz_grid"][:, -1], torch.zeros(1), atol=1e-4)  # β = 1: Σ p = 1
    assert (row["logz_grid"][:, 0] > 0).all()  # β = 1/2 raises every p < 1
    calls = []
    real = composite.sampled_forward_kl
    monkeypatch.setattr(composite, "sampled_forward_kl", lambda *a, **k: calls.append(k) or real(*a, **k))
    one = {"max_steps": 1, "batch_size": 8, "warmup_steps": 0, "save_every": 1, "log_every": 1, "lr": 1e-9}
    a = gr.run(recipe_from_dict({**kd2, "output_dir": str(tmp_path / "live"), "train": one}), overwrite=True, log=lambda *_: None, evaluate_after=False)["last"]
    assert not calls  # the live teacher: the dense loss
    stored = {**kd2, "output_dir": str(tmp_path / "st"), "train": one, "teacher": {"kind": "store", "path": str(store)}}
    b = gr.run(recipe_from_dict(stored), overwrite=True, log=lambda *_: None, evaluate_after=False)["last"]
    assert calls and calls[0]["temperature"] == 2.0 and calls[0]["logz"] is not None
    # dense KL ~ 1e-3 nats on these near-uniform tiny models; the estimate is within a few 1e-3 of it (the unbiasedness
    # itself: tests/unit/losses/test_sampled_kd.py); the tempered frequencies of the same draws give ~3.4 nats here
    assert b["kd"] == pytest.approx(a["kd"], abs=0.01)
    records = [None] * 40  # refused before any record is looked at
    reverse = {**stored, "loss": {"terms": {**terms, "kd": {"weight": 1.0, "options": {"divergence": "reverse_kl"}}}}}
    with pytest.raises(StoreError, match="unbiased loss only for forward_kl; the kd term's divergence is reverse_kl"):
        StoreTeacher(recipe_from_dict(reverse), records)
    old = tmp_path / "old"
    shutil.copytree(store, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["settings"]["sample_weights"]  # what a sampled store written before importance weights says
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="its rows lack sample_counts .* cache it again"):
        StoreTeacher(recipe_from_dict({**stored, "teacher": {"kind": "store", "path": str(old)}}), records)


def test_store_tempers_the_tail_for_the_recipes_temperature_range(world, tmp_path):
    """A KD term at T > 1 (the shipped schedule 2 -> 1): the store keeps the tail's tempered mass on a grid of
    1/T over that range, training reads it (the tempered buckets: at most the dense loss), and a recipe whose
    temperature leaves the stored range is refused, naming the setting."""
    from mmdistill.config import recipe_from_dict
    from mmdistill.recipes import generative as gr
    from mmdistill.teachers.store import TeacherStore

    root, _, kd = world
    terms = {**kd["loss"]["terms"], "kd": {"weight": 1.0, "options": {"temperature": {"kind": "linear", "start": 2.0, "end": 1.0}, "scale_t2": True}}}
    kd2 = {**kd, "loss": {"terms": terms}}
    path = write_recipe(tmp_path, "kd2", kd2)
    store = tmp_path / "store-t2"
    mmd("teacher", "cache", path, "--out", store, "--dtype", "fp32", "--top-k", 16)
    st = TeacherStore(store)
    assert st.manifest["settings"]["tail_temperatures"] == [1.0, 2.0]
    betas = st.manifest["constants"]["tail_betas"]
    assert betas[0] == pytest.approx(0.5) and betas[-1] == pytest.approx(1.0) and len(betas) == 5
    row = st.get(next(iter(st.index)))
    assert row["tail_grid"].shape == (row["tail_logmass"].shape[0], 5)
    assert torch.allclose(row["tail_grid"][:, -1], row["tail_logmass"], atol=1e-4)  # β = 1 is the tail mass itself
    assert (row["tail_grid"][:, 0] > row["tail_grid"][:, -1]).all()  # tempering raises the tail (β < 1)
    one = {"max_steps": 1, "batch_size": 8, "warmup_steps": 0, "save_every": 1, "log_every": 1, "lr": 1e-9}
    a = gr.run(recipe_from_dict({**kd2, "output_dir": str(tmp_path / "live"), "train": one}), overwrite=True, log=lambda *_: None, evaluate_after=False)["last"]
    b = gr.run(recipe_from_dict({**kd2, "output_dir": str(tmp_path / "st"), "train": one, "teacher": {"kind": "store", "path": str(store)}}),
               overwrite=True, log=lambda *_: None, evaluate_after=False)["last"]
    assert 0 < b["kd"] <= a["kd"] * (1 + 1e-5)
    hot = {**kd2, "output_dir": str(tmp_path / "hot"), "teacher": {"kind": "store", "path": str(store)},
           "loss": {"terms": {**terms, "kd": {"weight": 1.0, "options": {"temperature": 4.0}}}}}
    p = mmd("distill", write_recipe(tmp_path, "hot", hot), check=False)
    assert p.returncode == 2 and "tail_temperatures (the KD temperature runs over [4.0, 4.0]" in p.stderr and "Traceback" not in p.stderr


def test_store_refusals_are_one_line(world, tmp_path):
    root, kd_path, kd = world
    store = tmp_path / "st"
    mmd("teacher", "cache", kd_path, "--out", store)
    # another teacher (a different config) named beside the store
    other = gen_recipe(root, "other-teacher", student={"init": "tiny", "preset": "vlm-student"})
    other["output_dir"] = str(tmp_path / "other-teacher")
    mmd("train", write_recipe(tmp_path, "other-teacher", other))
    r = {**kd, "output_dir": str(tmp_path / "x"), "teacher": {"kind": "store", "path": str(store), "model": str(tmp_path / "other-teacher/model")}}
    p = mmd("distill", write_recipe(tmp_path, "x", r), check=False)
    assert p.returncode == 2 and "made by another teacher than teacher.model: config" in p.stderr and "Traceback" not in p.stderr
    # settings that shaped the signals: another max_length
    r = {**kd, "output_dir": str(tmp_path / "y"), "data": {**kd["data"], "max_length": 200}, "teacher": {"kind": "store", "path": str(store)}}
    p = mmd("distill", write_recipe(tmp_path, "y", r), check=False)
    assert p.returncode == 2 and "made under other settings: max_length (store 160, recipe 200)" in p.stderr
    # a feature the store does not hold
    r = {**kd, "output_dir": str(tmp_path / "z"), "teacher": {"kind": "store", "path": str(store)},
         "loss": {"terms": {"kd": {"weight": 1.0}, "text": {"weight": 1.0, "options": {"layers": [[-1, -1]]}}}}}
    p = mmd("distill", write_recipe(tmp_path, "z", r), check=False)
    assert p.returncode == 2 and "features.text_layers (the loss reads [-1], the store holds [-2])" in p.stderr
    # a training record the store lacks: named by file and line; on_missing: live fills it in
    r = {**kd, "output_dir": str(tmp_path / "w"), "data": {**kd["data"], "max_records": 44}, "teacher": {"kind": "store", "path": str(store)}}
    p = mmd("distill", write_recipe(tmp_path, "w", r), check=False)
    assert p.returncode == 2 and "chat_train.jsonl:41: not in the store" in p.stderr and "4 of 44 records missing" in p.stderr
    r["teacher"]["on_missing"] = "live"
    p = mmd("distill", write_recipe(tmp_path, "w", r), "--overwrite")
    assert "4 of 44 records are not in" in p.stdout
    # caching into a store of another teacher
    other_kd = {**kd, "teacher": {"model": str(tmp_path / "other-teacher/model")}}
    p = mmd("teacher", "cache", write_recipe(tmp_path, "o", other_kd), "--out", store, check=False)
    assert p.returncode == 2 and "holds signals made otherwise (teacher" in p.stderr


@pytest.mark.parametrize("family", ["contrastive", "reranker"])
def test_other_families_distill_from_a_store(tmp_path, family):
    """Contrastive embeddings and reranker scores from a store give the same first-step loss as the live teacher."""
    from mmdistill.config import recipe_from_dict
    from mmdistill.recipes import contrastive as cr
    from mmdistill.recipes import reranker as rr

    mmd("data", "synth", tmp_path / "data", "--n", 60, "--seed", 2, "--size", 32)
    if family == "contrastive":
        base = {"family": "contrastive", "seed": 0, "data": {"train": str(tmp_path / "data/pairs_train.jsonl"), "max_records": 32},
                "student": {"init": "tiny", "preset": "clip-nano"}, "eval": {"latency": False}}
        terms = {"clip": {"weight": 1.0}, "sim_kd": {"weight": 1.0}, "fd": {"weight": 10.0}}
        module = cr
    else:
        base = {"family": "reranker", "seed": 0, "data": {"train": str(tmp_path / "data/rerank_train.jsonl"), "max_records": 12, "max_length": 256},
                "student": {"init": "tiny", "preset": "vlm-nano", "image_size": 32}, "eval": {"latency": False}, "loss": {"terms": {"ce": {"weight": 1.0}}}}
        terms = {"ce": {"weight": 1.0}, "margin_mse": {"weight": 1.0}, "listwise_kl": {"weight": 1.0}}
        module = rr
    one = {"max_steps": 1, "batch_size": 8 if family == "contrastive" else 4, "warmup_steps": 0, "save_every": 1, "log_every": 1, "lr": 1e-9}
    mmd("train", write_recipe(tmp_path, "t", {**base, "output_dir": str(tmp_path / "t"), "train": {**one, "max_steps": 2, "lr": 1e-3}}))
    kd = {**base, "output_dir": str(tmp_path / "kd"), "teacher": {"model": str(tmp_path / "t/model")}, "loss": {"terms": terms}, "train": one}
    mmd("teacher", "cache", write_recipe(tmp_path, "kd", kd), "--out", tmp_path / "store", "--dtype", "fp32")
    assert mmd("teacher", "verify", tmp_path / "store").returncode == 0
    a = module.run(recipe_from_dict(kd), overwrite=True, log=lambda *_: None, evaluate_after=False)["last"]
    b = module.run(recipe_from_dict({**kd, "output_dir": str(tmp_path / "kd2"), "teacher": {"kind": "store", "path": str(tmp_path / "store")}}), overwrite=True, log=lambda *_: None, evaluate_after=False)["last"]
    assert set(a) == set(b)
    for part in a:
        assert b[part] == pytest.approx(a[part], rel=1e-4, abs=1e-6), part


def test_gradient_checkpointing_recomputes_blocks_and_changes_nothing_else(world, tmp_path, monkeypatch):
    """train.gradient_checkpointing: each student decoder block runs again in backward, and the step's losses are
    the same as without it (no dropout: the recomputation is exact)."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as mq

    from mmdistill.config import recipe_from_dict
    from mmdistill.recipes import generative as gr

    root, _, kd = world
    calls = {"n": 0}
    forward = mq.Qwen3VLTextMLP.forward  # inside each decoder block (the block's own forward carries the checkpointing)

    def counted(self, *a, **k):
        if torch.is_grad_enabled() and self.training:
            calls["n"] += 1
        return forward(self, *a, **k)

    monkeypatch.setattr(mq.Qwen3VLTextMLP, "forward", counted)
    two = {"max_steps": 2, "batch_size": 8, "warmup_steps": 0, "save_every": 2, "log_every": 1, "lr": 0.003}
    out = {}
    for ckpt in (False, True):
        calls["n"] = 0
        r = recipe_from_dict({**kd, "output_dir": str(tmp_path / f"ckpt-{ckpt}"), "train": {**two, "gradient_checkpointing": ckpt}})
        out[ckpt] = (gr.run(r, overwrite=True, log=lambda *_: None, evaluate_after=False)["last"], calls["n"])
    (plain, n_plain), (ckpt, n_ckpt) = out[False], out[True]
    assert n_plain > 0 and n_ckpt == 2 * n_plain, (n_plain, n_ckpt)
    for part in ("loss", "sft", "kd", "vision", "text"):
        assert ckpt[part] == pytest.approx(plain[part], rel=1e-5), part
