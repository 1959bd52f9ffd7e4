"""data.stream: images decoded per batch give the same training as decoding everything first, with or without the
batches prepared ahead in a thread (train.prefetch); a bad image met while streaming stops the run with its file and line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import mmd
from mmdistill.config import recipe_from_dict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    mmd("data", "synth", root / "data", "--n", "80", "--seed", "4", "--size", "32", env=None, timeout=None)  # env=None: the test process's own
    return root


def run(module, d):
    return module.run(recipe_from_dict(d), overwrite=True, log=lambda *_: None, evaluate_after=False)


@pytest.mark.parametrize("family", ["contrastive", "generative", "reranker"])
def test_streaming_trains_like_decoding_first(data, family):
    from mmdistill.recipes import contrastive, generative, reranker

    module = {"contrastive": contrastive, "generative": generative, "reranker": reranker}[family]
    file = {"contrastive": "pairs_train.jsonl", "generative": "chat_train.jsonl", "reranker": "rerank_train.jsonl"}[family]
    d = {"family": family, "seed": 0, "data": {"train": str(data / "data" / file), "max_records": 24, "max_length": 256},
         "student": {"init": "tiny", "preset": "clip-nano" if family == "contrastive" else "vlm-nano", **({} if family == "contrastive" else {"image_size": 32})},
         "train": {"max_steps": 3, "batch_size": 8, "warmup_steps": 0, "save_every": 3, "lr": 3e-3}}
    if family != "contrastive":
        d["loss"] = {"terms": {"sft": {"weight": 1.0}} if family == "generative" else {"ce": {"weight": 1.0}}}
    run(module, {**d, "output_dir": str(data / f"{family}-eager"), "train": {**d["train"], "prefetch": 0}})
    run(module, {**d, "output_dir": str(data / f"{family}-stream"), "data": {**d["data"], "stream": True}, "train": {**d["train"], "prefetch": 2}})  # prefetched
    run(module, {**d, "output_dir": str(data / f"{family}-stream-inline"), "data": {**d["data"], "stream": True}, "train": {**d["train"], "prefetch": 0}})
    a = load_file(str(data / f"{family}-eager/checkpoints/step-000003/trainable.safetensors"))
    b = load_file(str(data / f"{family}-stream/checkpoints/step-000003/trainable.safetensors"))
    c = load_file(str(data / f"{family}-stream-inline/checkpoints/step-000003/trainable.safetensors"))
    assert a.keys() == b.keys() == c.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert all(torch.equal(b[k], c[k]) for k in b)  # prefetching in a thread changes nothing, bit for bit


def test_a_bad_image_met_while_streaming_names_its_line(data, tmp_path):
    from mmdistill.data.records import RecordError
    from mmdistill.recipes import contrastive

    lines = (data / "data/pairs_train.jsonl").read_text().splitlines()[:20]
    (tmp_path / "img").mkdir()
    (tmp_path / "img/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [json.loads(x) for x in lines]
    bad = dict(rows[5], image="img/bad.png")
    shutil.copytree(data / "data/images", tmp_path / "images")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5] + [bad] + rows[6:]))
    d = {"family": "contrastive", "output_dir": str(tmp_path / "run"), "data": {"train": str(tmp_path / "p.jsonl"), "stream": True},
         "student": {"init": "tiny", "preset": "clip-nano"}, "train": {"max_steps": 4, "batch_size": 20, "warmup_steps": 0}}
    with pytest.raises(RecordError, match=r"p.jsonl:6: image: .*run `mmdistill data check`"):
        run(contrastive, d)
