"""ONNX export: tiny CLIP and tiny rerankers exported with torch.onnx (dynamo), run in onnxruntime and
compared with eager PyTorch on inputs the export never saw (other batch sizes and lengths); int8 graphs;
and the errors a user can hit."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmdistill.data.records import parse_record
from mmdistill.export import onnx as ox
from mmdistill.models import contrastive as cm
from mmdistill.models import reranker as rm
from mmdistill.models.tiny import train_qwen_tokenizer

TEXTS = [f"a {s} {c} {k} at the {p}" for s in ("small", "large") for c in ("red", "blue", "green") for k in ("circle", "square") for p in ("top", "left")]
TEXTS += [rm.SYSTEM_PROMPT, "<Instruct>: <Query>: <Document>: yes no", "Given a caption, find the matching image."]


def _rerank_file(d, n=6):
    """Held-out rerank records of different lengths, with graded labels."""
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        docs = [" ".join(rng.choice(TEXTS[:24], size=int(rng.integers(1, 3)))) for _ in range(int(rng.integers(2, 5)))]
        lines.append(json.dumps({"query": {"text": TEXTS[i]}, "documents": [{"text": t} for t in docs], "labels": [int(x) for x in rng.integers(0, 3, len(docs))]}))
    path = d / "rerank.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return train_qwen_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    model, proc = cm.build_tiny_clip(d / "model", TEXTS, preset="clip-nano", image_size=32, patch_size=8)
    # held-out pair records: images on disk + captions
    lines = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30), (90, 90, 90)]):
        Image.new("RGB", (40, 40), colour).save(d / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": TEXTS[i]}))
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    manifest = ox.export_onnx(d / "model", d / "onnx", int8=True, data=d / "pairs.jsonl", log=lambda *_: None)
    return d, model.eval(), proc, manifest


def test_clip_folder_is_self_contained_and_described(clip):
    d, _, _, manifest = clip
    out = d / "onnx"
    assert manifest["task"] == "clip" and manifest["opset"] == ox.OPSET
    assert set(manifest["graphs"]) == {"image_encoder", "text_encoder"}
    img = manifest["graphs"]["image_encoder"]
    assert [i["name"] for i in img["inputs"]] == ["pixel_values"] and img["inputs"][0]["shape"][0] == "batch"
    txt = manifest["graphs"]["text_encoder"]
    assert [i["name"] for i in txt["inputs"]] == ["input_ids", "attention_mask"]
    assert txt["inputs"][0]["shape"] == ["batch", "sequence"] and txt["outputs"][0]["name"] == "text_embeds"
    assert json.loads((out / "manifest.json").read_text())["graphs"] == manifest["graphs"]
    assert not list(out.glob("*.safetensors"))
    # the processor loads from the export folder alone
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(out))
    assert proc.tokenizer("a red circle")["input_ids"] == clip[2].tokenizer("a red circle")["input_ids"]


def test_clip_onnx_matches_eager_on_new_batch_sizes_and_lengths(clip):
    d, model, proc, manifest = clip
    runner, _, _ = ox.load_onnx(d / "onnx")
    rng = np.random.default_rng(5)
    for n in (1, 3, 7):
        images = [Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)) for _ in range(n)]
        texts = [" ".join(TEXTS[: int(rng.integers(1, 4))]) for _ in range(n)]
        pv = cm.preprocess_images(proc, images)
        t = cm.preprocess_texts(proc, texts)
        with torch.no_grad():
            want_img = cm.encode_images(model, pv)
            want_txt = cm.encode_texts(model, t["input_ids"], t["attention_mask"])
        got_img = runner.encode_images(pv)
        got_txt = runner.encode_texts(t["input_ids"], t["attention_mask"])
        assert got_img.shape == want_img.shape and got_txt.shape == want_txt.shape
        assert (got_img - want_img).abs().max() <= 1e-4
        assert (got_txt - want_txt).abs().max() <= 1e-4
    par = manifest["parity"]
    assert "pairs.jsonl" in par["inputs"]
    assert par["fp32"]["image_embeds_max_abs_diff"] <= 1e-4 and par["fp32"]["text_embeds_max_abs_diff"] <= 1e-4
    assert par["fp32"]["metric"]["name"] == "mean_R@1" and par["fp32"]["metric"]["onnx"] == pytest.approx(par["fp32"]["metric"]["eager"])


def test_clip_int8_runs_and_stays_close(clip):
    d, model, proc, manifest = clip
    runner, _, _ = ox.load_onnx(d / "onnx", int8=True)
    assert (d / "onnx" / manifest["graphs"]["text_encoder"]["file_int8"]).stat().st_size < (d / "onnx" / "text_encoder.onnx").stat().st_size
    t = cm.preprocess_texts(proc, TEXTS[:5])
    with torch.no_grad():
        want = cm.encode_texts(model, t["input_ids"], t["attention_mask"])
    got = runner.encode_texts(t["input_ids"], t["attention_mask"])
    assert not torch.equal(got, want)  # really a different (quantized) graph
    assert torch.cosine_similarity(got, want).min() > 0.98
    assert manifest["parity"]["int8"]["cosine_min"] > 0.98


@pytest.fixture(scope="module", params=["seq_cls", "yesno"])
def reranker(request, tmp_path_factory, tok):
    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    rm.build_tiny_reranker(d / "model", TEXTS, kind=kind, preset="vlm-nano", tokenizer=tok, seed=3)
    data = _rerank_file(d)
    manifest = ox.export_onnx(d / "model", d / "onnx", task=kind if kind == "yesno" else "auto", int8=True, data=data, log=lambda *_: None)
    eager = rm.load_reranker(str(d / "model"))
    eager.model.eval()
    return kind, d, eager, manifest


def test_reranker_onnx_scores_match_the_eager_reranker(reranker):
    kind, d, eager, manifest = reranker
    assert manifest["task"] == kind and list(manifest["graphs"]) == ["reranker"]
    assert manifest["graphs"]["reranker"]["outputs"][0] == {"name": "score", "dtype": "float32", "shape": ["batch"]}
    if kind == "yesno":
        assert (manifest["yes_token_id"], manifest["no_token_id"]) == (eager.yes_id, eager.no_id)
    onnx_rr, _, _ = ox.load_onnx(d / "onnx")
    # queries the export never saw, one alone (batch 1) and ragged groups (left padding of different lengths)
    recs = [parse_record({"query": {"text": q}, "documents": [{"text": t} for t in docs]}, "rerank") for q, docs in [
        ("a red circle", ["a blue square at the top"]),
        ("large green", ["a small red circle at the left", "green", "a large blue square at the top a small red circle"]),
    ]]
    for group in ([recs[0]], recs):
        want = eager.score_records(group)
        got = onnx_rr.score_records(group)
        for w, g in zip(want, got):
            assert len(w) == len(g)
            assert np.abs(np.array(w) - np.array(g)).max() <= 1e-4
    # the scores are not all the same number (a graph that ignored its input would pass the check above only by luck)
    assert np.ptp(np.array(eager.score_records([recs[1]])[0])) > 0
    par = manifest["parity"]["fp32"]
    assert par["score_max_abs_diff"] <= 1e-4 and par["metric"]["name"] == "ndcg@10"
    assert par["metric"]["onnx"] == pytest.approx(par["metric"]["eager"], abs=1e-6)


def test_reranker_int8_runs_and_stays_close(reranker):
    kind, d, eager, manifest = reranker
    onnx_rr, _, _ = ox.load_onnx(d / "onnx", int8=True)
    recs = [parse_record(json.loads(line), "rerank") for line in (d / "rerank.jsonl").read_text().splitlines()]
    want = np.concatenate([np.array(s) for s in eager.score_records(recs)])
    got = np.concatenate([np.array(s) for s in onnx_rr.score_records(recs)])
    assert np.isfinite(got).all() and not np.array_equal(got, want)
    spread = np.ptp(want)
    assert np.abs(got - want).max() < 0.25 * spread + 1e-3
    assert manifest["parity"]["int8"]["score_max_abs_diff"] == pytest.approx(float(np.abs(got - want).max()), rel=1e-3, abs=1e-6)


def test_onnx_reranker_refuses_images(reranker, tmp_path):
    """The VL yes/no graph is the text path only; a seq_cls reranker reads text only anyway."""
    from mmdistill.data.records import RecordError

    kind, d, _, _ = reranker
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "x.png")
    onnx_rr, _, _ = ox.load_onnx(d / "onnx")
    rec = parse_record({"query": {"text": "a"}, "documents": [{"image": "x.png"}]}, "rerank", base_dir=tmp_path)
    with pytest.raises((rm.RerankerError, RecordError), match="text only"):
        onnx_rr.score_records([rec])


def test_bad_folders_give_one_line_errors(tmp_path, tok):
    with pytest.raises(ox.ExportError, match="no such folder"):
        ox.export_onnx(tmp_path / "missing", tmp_path / "o1", log=lambda *_: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ox.ExportError, match="no config.json"):
        ox.export_onnx(tmp_path / "empty", tmp_path / "o2", log=lambda *_: None)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ox.ExportError, match="not valid JSON"):
        ox.export_onnx(tmp_path / "broken", tmp_path / "o3", log=lambda *_: None)
    # a model of no family the export knows: the message says what to do
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    with pytest.raises(ox.ExportError, match="ViTModel is not a dual encoder.*--task yesno"):
        ox.export_onnx(tmp_path / "vit", tmp_path / "o4", log=lambda *_: None)
    # a VLM folder with nothing saying it is a reranker exports its chat path (tests/unit/export/test_onnx_generative.py)
    from mmdistill.models.tiny import build_tiny_vlm

    build_tiny_vlm(tmp_path / "run" / "model", TEXTS, preset="vlm-nano", tokenizer=tok)
    assert ox.detect_task(ox.model_folder(tmp_path / "run")) == "generate"
    # ... unless the run that trained it was a reranker run (its run.json says so)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"fingerprint": "x", "recipe": {"family": "reranker"}}))
    assert ox.model_folder(tmp_path / "run") == tmp_path / "run" / "model"
    assert ox.detect_task(ox.model_folder(tmp_path / "run")) == "yesno"
    with pytest.raises(ox.ExportError, match="no manifest.json"):
        ox.load_onnx(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        ox.export_onnx(tmp_path / "run", tmp_path / "full", task="yesno", log=lambda *_: None)
    # the CLI turns them into `error: ...` and exit 2
    p = subprocess.run([sys.executable, "-m", "mmdistill.cli", "export", str(tmp_path / "empty"), "--out", str(tmp_path / "o5")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "no config.json" in p.stderr and "Traceback" not in p.stderr


def test_missing_graph_file_is_reported(clip, tmp_path):
    import shutil

    d = clip[0]
    shutil.copytree(d / "onnx", tmp_path / "copy")
    (tmp_path / "copy" / "text_encoder.onnx").unlink()
    with pytest.raises(ox.ExportError, match="text_encoder.onnx is missing"):
        ox.load_onnx(tmp_path / "copy")
