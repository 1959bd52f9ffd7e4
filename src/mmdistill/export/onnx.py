"""ONNX export of dual encoders, rerankers and the generative chat path, with a parity check in onnxruntime.

What exports (``export_onnx``):

- **clip** (``CLIPModel`` and other dual encoders with get_image_features / get_text_features):
  two graphs, ``image_encoder.onnx`` (pixel_values [B, 3, H, W] -> image_embeds [B, D]) and
  ``text_encoder.onnx`` (input_ids, attention_mask [B, L] -> text_embeds [B, D]); the embeddings
  are the projected, unnormalised ones ``get_*_features`` returns.
- **seq_cls** (``*ForSequenceClassification``) and **yesno** (the text path of a causal LM /
  Qwen3-VL read as a yes/no judge): one graph ``reranker.onnx`` (input_ids, attention_mask
  [B, L], left padded as ``Reranker`` pads) -> score [B], computed by ``Reranker.forward`` itself,
  so the score is exactly the eager one: the single logit (seq_cls) or logit(yes) − logit(no) at
  the last position (yesno).
- **generate** (the chat path of a Qwen3-VL (+ MoE) / Qwen2.5-VL model, a Qwen3-Omni thinker or a text-only causal LM;
  see ``onnx_generative``):
  ``vision_encoder.onnx`` (VL: packed patches of any number of images + the grid-dependent
  position / interpolation / window / boundary tensors, computed in Python by transformers' own helpers ->
  image features and deepstack features) and ``decoder.onnx`` (input ids, the image features placed
  at the image tokens, position ids — Qwen3-VL's multimodal rope rows from the model's own
  ``get_rope_index`` —, attention mask and the past key/values of every layer -> last-position
  logits and the present key/values: one graph for the prefill and each cached step).
  ``OnnxChatModel`` decodes greedily with the KV cache; the parity check compares its tokens and
  logits with eager ``generate``, and the manifest records ms per generated token both ways.
  The Omni thinker adds ``audio_encoder.onnx`` (its clips' log-mel chunks -> audio features, placed at the
  audio tokens as image features are at the image tokens; its own rope index over audio). A full Omni model
  (thinker + talker), Qwen2-VL and sliding-window decoders give an ExportError.

Not exported: the yes/no reranker's image inputs, video inputs of the chat path.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). Checked with torch 2.14.1:
both it and the legacy TorchScript exporter export these models, but the TorchScript tracer freezes
the Python branches of transformers' attention-mask code for the example shape (its warnings say so),
while torch.export keeps the batch and sequence dimensions symbolic. The folder written holds the
graphs, every non-weight file of the source folder (tokenizer, processor, configs) and
``manifest.json`` (graphs, inputs, outputs, opset, parity figures).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..models import contrastive as cm
from ..models import reranker as rm

MANIFEST = "manifest.json"
FORMAT = "mmdistill-onnx/1"
OPSET = 18
TASKS = ("clip", "seq_cls", "yesno", "generate")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".onnx.data", ".msgpack", ".h5")


class ExportError(ValueError):
    """A folder that cannot be exported / loaded as asked (one line, naming the folder and the problem)."""


# ---------------------------------------------------------------------------------------------
# What a folder holds


def model_folder(path: str | Path) -> Path:
    """A model folder, or a run folder holding model/."""
    p = Path(path)
    if (p / "model" / "config.json").is_file() and not (p / "config.json").is_file():
        return p / "model"
    return p


def detect_task(model_dir: str | Path) -> str:
    """clip | seq_cls | yesno, from config.json (and for a VLM, the run.json of the run that trained it)."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not d.is_dir():
        raise ExportError(f"{d}: no such folder")
    if not cfg_path.is_file():
        raise ExportError(f"{d}: no config.json; expected a Hugging Face model folder (written by save_pretrained)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ExportError(f"{cfg_path}: not valid JSON ({e})") from None
    archs = cfg.get("architectures") or []
    model_type = str(cfg.get("model_type", ""))
    if model_type in ("clip", "siglip", "siglip2") or any(a.endswith(("CLIPModel", "SiglipModel")) for a in archs):
        return "clip"
    if any("SequenceClassification" in a for a in archs):
        return "seq_cls"
    run = d.parent / "run.json"
    if run.is_file():
        try:
            family = json.loads(run.read_text()).get("recipe", {}).get("family")
        except ValueError:
            family = None
        if family == "reranker":
            return "yesno"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or any(a.endswith(("ForConditionalGeneration", "ForCausalLM")) for a in archs):
        return "generate"  # the chat path (pass --task yesno for a yes/no reranker)
    raise ExportError(
        f"{d}: {archs[0] if archs else model_type or 'this model'} is not a dual encoder, a sequence classifier or a "
        "generative model, and no run.json marks it as a reranker; pass --task yesno to export it as a yes/no reranker (text path)"
    )


# ---------------------------------------------------------------------------------------------
# The modules that become graphs


class ImageEncoder(nn.Module):
    """pixel_values [B, 3, H, W] -> image_embeds [B, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return cm.encode_images(self.model, pixel_values)


class TextEncoder(nn.Module):
    """input_ids, attention_mask [B, L] -> text_embeds [B, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return cm.encode_texts(self.model, input_ids, attention_mask)


class RerankScore(nn.Module):
    """input_ids, attention_mask [N, L] (left padded) -> score [N], through Reranker.forward itself."""

    def __init__(self, reranker: rm.Reranker):
        super().__init__()
        self.reranker = reranker
        self.model = reranker.model  # registered, so the weights are the graph's

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        score, _ = self.reranker.forward({"input_ids": input_ids, "attention_mask": attention_mask})
        return score


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str], dims: dict[str, dict[int, str]]) -> None:
    """torch.onnx.export (dynamo) with named dynamic dimensions; weights beside the graph only for > 1.5 GB."""
    shapes = {name: {axis: torch.export.Dim(dim_name) for axis, dim_name in dims[name].items()} for name in inputs}
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5e9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=True, input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
            opset_version=OPSET, external_data=big, verbose=False,
        )


def _graph_entry(path: Path) -> dict[str, Any]:
    """Inputs / outputs of an ONNX file as written (name, element type, shape with symbolic dims)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def describe(vi) -> dict[str, Any]:
        t = vi.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return {"file": path.name, "inputs": [describe(v) for v in m.graph.input], "outputs": [describe(v) for v in m.graph.output], "opset": opset}


def _copy_side_files(src: Path, out: Path) -> list[str]:
    """Every non-weight file of the model folder (tokenizer, processor, config, chat template)."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != MANIFEST:
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


# ---------------------------------------------------------------------------------------------
# Running the graphs (onnxruntime)


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxDualEncoder:
    """The two CLIP graphs in onnxruntime, with the encode_images / encode_texts interface of models.contrastive."""

    def __init__(self, folder: Path, graphs: dict[str, Any], *, int8: bool = False, threads: int | None = None):
        key = "file_int8" if int8 else "file"
        self.image = _session(folder / graphs["image_encoder"][key], threads)
        self.text = _session(folder / graphs["text_encoder"][key], threads)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        out = self.image.run(None, {"pixel_values": pixel_values.float().numpy()})[0]
        return torch.from_numpy(out)

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.text.run(None, {"input_ids": input_ids.long().numpy(), "attention_mask": attention_mask.long().numpy()})[0]
        return torch.from_numpy(out)


class OnnxReranker(rm.Reranker):
    """A Reranker whose forward runs the exported graph: same prompt format, padding and batching as eager."""

    def __init__(self, session, processor, *, kind: str, name: str, max_length: int = 512):
        super().__init__(None, processor, kind=kind, name=name, max_length=max_length)
        self.session = session

    def forward(self, batch: dict[str, Tensor], *, features: bool = False) -> tuple[Tensor, Tensor | None]:
        if features:
            raise rm.RerankerError(f"{self.name}: the ONNX graph gives scores only, not hidden features")
        if "pixel_values" in batch:
            raise rm.RerankerError(f"{self.name}: the ONNX reranker graph takes text only; this batch has images")
        feeds = {"input_ids": batch["input_ids"].long().numpy(), "attention_mask": batch["attention_mask"].long().numpy()}
        return torch.from_numpy(self.session.run(None, feeds)[0]).float(), None

    def hidden_size(self) -> int:
        raise rm.RerankerError(f"{self.name}: an ONNX reranker has no hidden size to read")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    d = Path(folder)
    path = d / MANIFEST
    if not path.is_file():
        raise ExportError(f"{d}: no {MANIFEST}; expected a folder written by `mmdistill export --format onnx`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, g in manifest.get("graphs", {}).items():
        if not (d / g["file"]).is_file():
            raise ExportError(f"{d}: graph {name!r} file {g['file']} is missing")
    return manifest


def load_onnx(folder: str | Path, *, int8: bool = False, threads: int | None = None, max_length: int = 512):
    """(runner, processor, manifest) of an exported folder: OnnxDualEncoder or OnnxReranker."""
    from transformers import AutoProcessor, AutoTokenizer

    d = Path(folder)
    manifest = read_manifest(d)
    graphs = manifest["graphs"]
    if int8 and not all("file_int8" in g for g in graphs.values()):
        raise ExportError(f"{d}: no int8 graphs (export with --int8)")
    task = manifest["task"]
    if task == "clip":
        processor = AutoProcessor.from_pretrained(str(d))
        return OnnxDualEncoder(d, graphs, int8=int8, threads=threads), processor, manifest
    if task == "generate":
        from .onnx_generative import OnnxChatModel

        key = "file_int8" if int8 else "file"
        processor = AutoProcessor.from_pretrained(str(d))  # a tokenizer for a text-only causal LM
        sessions = {name: _session(d / g[key], threads) for name, g in graphs.items()}
        return OnnxChatModel(d, manifest, sessions, processor), processor, manifest
    key = "file_int8" if int8 else "file"
    processor = AutoTokenizer.from_pretrained(str(d)) if task == "seq_cls" or not manifest.get("vision") else AutoProcessor.from_pretrained(str(d))
    session = _session(d / graphs["reranker"][key], threads)
    return OnnxReranker(session, processor, kind=task, name=str(d), max_length=max_length), processor, manifest


# ---------------------------------------------------------------------------------------------
# Held-out inputs and parity


def _words(tokenizer, n: int, rng: np.random.Generator) -> list[str]:
    """Random sentences of words from the tokenizer's own vocabulary (generated held-out text)."""
    vocab = [t.lstrip("Ġ▁") for t in tokenizer.get_vocab() if t.lstrip("Ġ▁").isalpha() and len(t.lstrip("Ġ▁")) > 1]
    vocab = sorted(set(vocab)) or ["a", "b"]
    return [" ".join(rng.choice(vocab, size=int(rng.integers(2, 14)))) for _ in range(n)]


def _images(n: int, size: int, rng: np.random.Generator) -> list:
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _clip_parity(model, processor, runners: dict[str, OnnxDualEncoder], data: Path | None, max_items: int, seed: int) -> dict[str, Any]:
    from ..evaluate.retrieval import retrieval_metrics

    rng = np.random.default_rng(seed)
    if data is not None:
        from ..recipes.contrastive import load_pairs

        records, images, _ = load_pairs(Path(data), "fail", max_items, log=lambda *_: None)
        texts = [r.text for r in records]
        source = f"{data} ({len(records)} records)"
    else:
        texts = _words(processor.tokenizer, 16, rng)
        side = int(processor.image_processor.crop_size["height"]) if getattr(processor.image_processor, "crop_size", None) else 64
        images = _images(16, side, rng)
        records = None
        source = "generated (16 random images, 16 random sentences)"
    pv = cm.preprocess_images(processor, images)
    t = cm.preprocess_texts(processor, texts)
    with torch.no_grad():
        ref_img = torch.cat([cm.encode_images(model, pv[i : i + 32]) for i in range(0, len(pv), 32)])
        ref_txt = torch.cat([cm.encode_texts(model, t["input_ids"][i : i + 32], t["attention_mask"][i : i + 32]) for i in range(0, len(pv), 32)])
    out: dict[str, Any] = {"inputs": source}
    for name, run in runners.items():
        img = torch.cat([run.encode_images(pv[i : i + 32]) for i in range(0, len(pv), 32)])
        txt = torch.cat([run.encode_texts(t["input_ids"][i : i + 32], t["attention_mask"][i : i + 32]) for i in range(0, len(pv), 32)])
        res = {"image_embeds_max_abs_diff": _max_abs(img, ref_img), "text_embeds_max_abs_diff": _max_abs(txt, ref_txt)}
        res["cosine_min"] = float(min(torch.cosine_similarity(img, ref_img).min(), torch.cosine_similarity(txt, ref_txt).min()))
        if records is not None:
            ids = [r.image for r in records]
            tids = [x.strip().lower() for x in texts]
            eager_m = retrieval_metrics(ref_img, ref_txt, image_ids=ids, text_ids=tids)
            onnx_m = retrieval_metrics(img, txt, image_ids=ids, text_ids=tids)
            res["metric"] = {"name": "mean_R@1", "eager": eager_m["mean_R@1"], "onnx": onnx_m["mean_R@1"]}
        out[name] = res
    return out


def _generated_rerank_records(reranker: rm.Reranker, n: int, rng: np.random.Generator) -> list:
    from ..data.records import parse_record

    words = _words(reranker.tokenizer, n * 5, rng)
    recs = []
    for i in range(n):
        k = int(rng.integers(2, 5))
        obj = {"instruction": "Given a query, find the matching document.", "query": {"text": words[5 * i]}, "documents": [{"text": w} for w in words[5 * i + 1 : 5 * i + 1 + k]]}
        recs.append(parse_record(obj, "rerank", path="<generated>", line=i + 1))
    return recs


def _rerank_parity(reranker: rm.Reranker, runners: dict[str, OnnxReranker], data: Path | None, max_items: int, seed: int) -> dict[str, Any]:
    from ..evaluate.ranking import ranking_metrics

    rng = np.random.default_rng(seed)
    skipped = 0
    if data is not None:
        from ..recipes.reranker import load_rerank

        records, _ = load_rerank(Path(data), "fail", max_items, rm.ImageCache(), log=lambda *_: None)
        text_only = [r for r in records if not list(r.image_refs())]
        skipped = len(records) - len(text_only)
        if not text_only:
            raise ExportError(f"{data}: every record has an image; the exported reranker graph takes text only (give text records for the parity check)")
        records = text_only
        source = f"{data} ({len(records)} text records" + (f"; {skipped} with images skipped" if skipped else "") + ")"
    else:
        records = _generated_rerank_records(reranker, 12, rng)
        source = f"generated ({len(records)} queries of random words, 2-4 documents each)"
    ref = reranker.score_records(records, batch_pairs=32)
    flat_ref = torch.tensor([s for q in ref for s in q])
    out: dict[str, Any] = {"inputs": source}
    for name, run in runners.items():
        got = run.score_records(records, batch_pairs=32)
        flat = torch.tensor([s for q in got for s in q])
        res: dict[str, Any] = {"score_max_abs_diff": _max_abs(flat, flat_ref)}
        if all(r.labels is not None for r in records):
            labels = [list(r.labels) for r in records]
            res["metric"] = {"name": "ndcg@10", "eager": 100 * ranking_metrics(ref, labels)["ndcg@10"], "onnx": 100 * ranking_metrics(got, labels)["ndcg@10"]}
        out[name] = res
    return out


# ---------------------------------------------------------------------------------------------
# The export


def _quantize(src: Path, dst: Path) -> None:
    """ORT dynamic int8: weights of MatMul / Gemm stored as int8, activations quantized per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def export_onnx(
    model_dir: str | Path,
    out: str | Path,
    *,
    task: str = "auto",
    int8: bool = False,
    data: str | Path | None = None,
    max_items: int = 200,
    overwrite: bool = False,
    seed: int = 0,
    gen_steps: int = 8,
    log: Callable = print,
) -> dict[str, Any]:
    """Export a model folder to ONNX in `out`, check parity in onnxruntime, write manifest.json; returns the manifest."""
    src = model_folder(model_dir)
    if task == "auto":
        task = detect_task(src)
    elif task not in TASKS:
        raise ExportError(f"--task {task!r}: choose auto, {', '.join(TASKS)}")
    elif not (src / "config.json").is_file():
        raise ExportError(f"{src}: no config.json; expected a Hugging Face model folder (written by save_pretrained)")
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"--data {data}: file not found")
    if task == "generate":  # before anything is written: is this an architecture the export covers?
        from transformers import AutoConfig

        from . import onnx_generative as og

        try:
            kind = og.generative_kind(AutoConfig.from_pretrained(str(src)))
        except og.GenerativeExportError as e:
            raise ExportError(f"{src}: {e}") from None
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    graphs: dict[str, dict[str, Any]] = {}
    manifest: dict[str, Any] = {"format": FORMAT, "task": task, "source": str(src), "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}"}
    if task == "clip":
        model, processor = cm.load_model(str(src))
        model.eval()
        side = int(model.config.vision_config.image_size)
        pv = torch.randn(2, 3, side, side)  # [B, 3, H, W]
        enc = processor.tokenizer(["a b c", "a"], padding=True, return_tensors="pt")  # two rows of different lengths
        log(f"exporting {src} (clip): image_encoder.onnx, text_encoder.onnx")
        _export(ImageEncoder(model), (pv,), out / "image_encoder.onnx", ["pixel_values"], ["image_embeds"], {"pixel_values": {0: "batch"}})
        _export(TextEncoder(model), (enc["input_ids"], enc["attention_mask"]), out / "text_encoder.onnx", ["input_ids", "attention_mask"], ["text_embeds"], {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}})
        graphs["image_encoder"] = _graph_entry(out / "image_encoder.onnx")
        graphs["text_encoder"] = _graph_entry(out / "text_encoder.onnx")
        manifest.update(family="contrastive", image_size=side, embed_dim=cm.embed_dim(model))
    elif task == "generate":
        from ..models.generative import load_vlm

        model, processor = load_vlm(str(src))
        model.eval()
        log(f"exporting {src} ({kind}, chat path): " + ("vision_encoder.onnx, " if kind != "causal_lm" else "") + ("audio_encoder.onnx, " if kind == "qwen3_omni" else "") + "decoder.onnx")
        paths, fields = og.export_generative(model, kind, out, log=log)
        for name, path in paths.items():
            graphs[name] = _graph_entry(path)
        tok = getattr(processor, "tokenizer", processor)
        manifest.update(family="generative", **fields, eos_token_ids=og.eos_token_ids(model, tok), pad_token_id=tok.pad_token_id)
    else:
        reranker = rm.load_reranker(str(src), kind=task)
        reranker.model.eval()
        recs = _generated_rerank_records(reranker, 1, np.random.default_rng(seed))
        batch, _ = reranker.encode(recs)  # >= 2 left-padded rows of different lengths
        log(f"exporting {src} ({task} reranker): reranker.onnx")
        dims = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        _export(RerankScore(reranker), (batch["input_ids"], batch["attention_mask"]), out / "reranker.onnx", ["input_ids", "attention_mask"], ["score"], dims)
        graphs["reranker"] = _graph_entry(out / "reranker.onnx")
        manifest.update(family="reranker", vision=reranker.has_vision, padding_side="left", max_length=reranker.max_length)
        if task == "yesno":
            manifest.update(yes_token_id=reranker.yes_id, no_token_id=reranker.no_id, score="logit(yes) - logit(no) at the last position")
        else:
            manifest["score"] = "the relevance logit (logit[1] - logit[0] for two labels)"
    if int8:
        for g in graphs.values():
            dst = out / g["file"].replace(".onnx", ".int8.onnx")
            _quantize(out / g["file"], dst)
            g["file_int8"] = dst.name
    manifest["opset"] = min(g["opset"] for g in graphs.values())
    manifest["graphs"] = graphs
    manifest["files"] = _copy_side_files(src, out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))

    # parity in onnxruntime against the eager model, on the same inputs
    log("parity check in onnxruntime" + (f" on {data}" if data else " on generated inputs"))
    variants = ["fp32"] + (["int8"] if int8 else [])
    data_path = Path(data) if data is not None else None
    if task == "clip":
        runners = {v: load_onnx(out, int8=(v == "int8"))[0] for v in variants}
        manifest["parity"] = _clip_parity(model, processor, runners, data_path, max_items, seed)
    elif task == "generate":
        runners = {v: load_onnx(out, int8=(v == "int8"))[0] for v in variants}
        fe = getattr(processor, "feature_extractor", None) if kind == "qwen3_omni" else None
        rate = int(fe.sampling_rate) if fe is not None else None
        if data_path is not None:
            items, images, audios, source = og.read_items(data_path, max_items, sampling_rate=rate)
        else:
            side = 64
            ip = getattr(processor, "image_processor", None)
            if ip is not None:
                side = int(round((ip.size.get("longest_edge") or 4096) ** 0.5))
            if rate is not None:
                items, images, audios = og.generated_omni_chat(9, seed, side, rate)
                source = f"generated ({len(items)} ShapesWorld questions about freshly rendered scenes, with the image and a tone clip, the clip only, the image only)"
            else:
                items, images = og.generated_chat(8, seed, side)
                audios = None
                source = f"generated ({len(items)} ShapesWorld questions about freshly rendered scenes)"
        manifest["parity"], manifest["latency"] = og.chat_parity(model, runners, items, images, steps=gen_steps, source=source, log=log, audios=audios)
    else:
        runners = {v: load_onnx(out, int8=(v == "int8"), max_length=reranker.max_length)[0] for v in variants}
        manifest["parity"] = _rerank_parity(reranker, runners, data_path, max_items, seed)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def parity_lines(manifest: dict[str, Any]) -> list[str]:
    """One line per variant for the CLI: max abs diff (and the family metric when records were given)."""
    lines = []
    par = manifest.get("parity", {})
    for variant in ("fp32", "int8"):
        res = par.get(variant)
        if not res:
            continue
        diffs = " ".join(f"{k}={v:.3g}" for k, v in res.items() if k.endswith("max_abs_diff"))
        if "tokens_identical" in res:
            diffs = f"greedy tokens identical {res['tokens_identical']} over {par['steps']} steps " + diffs
        metric = res.get("metric")
        extra = f" {metric['name']}: eager={metric['eager']:.2f} onnx={metric['onnx']:.2f}" if metric else ""
        lines.append(f"{variant}: {diffs}{extra}")
    lat = manifest.get("latency")
    if lat:
        lines.append("latency per generated token (batch 1, prefill included): eager " + f"{lat['eager_ms_per_token']:.2f} ms" + "".join(f", ORT {v} {lat[f'{v}_ms_per_token']:.2f} ms" for v in ("fp32", "int8") if f"{v}_ms_per_token" in lat))
    return lines


def graph_files(manifest: dict[str, Any]) -> Sequence[str]:
    return [g[k] for g in manifest["graphs"].values() for k in ("file", "file_int8") if k in g]
