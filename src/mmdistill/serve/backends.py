"""What a served folder computes: embeddings (dual encoders), rerank scores, chat answers.

Each backend loads a folder once and offers plain, synchronous batch functions that the server's
micro-batchers call in a worker thread:

- ``Embedder``: texts -> L2-normalised vectors, images -> vectors (PyTorch model or the ONNX graphs);
- ``RerankScorer``: (instruction, query, document) pairs -> raw scores, through ``Reranker`` (PyTorch)
  or ``OnnxReranker`` (the exported graph), so the prompt format and padding are the eager ones;
- ``ChatModel``: OpenAI-style messages + images -> generated text (PyTorch only), streamed or whole.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..export import onnx as ox
from ..models import contrastive as cm
from ..models import reranker as rm

FAMILY_OF_TASK = {"clip": "contrastive", "seq_cls": "reranker", "yesno": "reranker", "chat": "generative"}


class ServeError(ValueError):
    """A folder that cannot be served as asked (one line)."""


def serve_task(model_dir: Path, task: str = "auto") -> str:
    """clip | seq_cls | yesno | chat for a model folder or an ONNX export folder."""
    if task != "auto":
        if task not in FAMILY_OF_TASK:
            raise ServeError(f"--task {task!r}: choose auto, {', '.join(FAMILY_OF_TASK)}")
        return task
    if (model_dir / ox.MANIFEST).is_file():
        t = ox.read_manifest(model_dir)["task"]
        return "chat" if t == "generate" else t
    try:
        t = ox.detect_task(model_dir)
        return "chat" if t == "generate" else t
    except ox.ExportError as e:
        if "--task yesno" not in str(e):  # missing folder / config: a real error
            raise ServeError(str(e)) from None
        return "chat"  # an image-text-to-text (or causal LM) folder not marked as a reranker


# ---------------------------------------------------------------------------------------------
# Embeddings


class Embedder:
    """Dual-encoder embeddings. `encoder` has encode_images(pixel_values) / encode_texts(ids, mask)."""

    family = "contrastive"

    def __init__(self, encoder, processor, *, backend: str):
        self.encoder = encoder
        self.processor = processor
        self.backend = backend
        tok = processor.tokenizer
        self.max_tokens = min(int(tok.model_max_length), 77) if tok.model_max_length < 10_000 else 77
        # the request handlers count tokens on the event loop while the model thread tokenises batches; a fast
        # tokenizer's padding / truncation settings are shared state, so the handlers get a copy of their own
        self._count_tok = copy.deepcopy(tok)

    def count_tokens(self, text: str) -> int:
        return len(self._count_tok(text)["input_ids"])

    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        t = cm.preprocess_texts(self.processor, texts)
        with torch.inference_mode():
            emb = self.encoder.encode_texts(t["input_ids"], t["attention_mask"])  # [N, D]
        return torch.nn.functional.normalize(emb.float(), dim=-1).tolist()

    def embed_images(self, images: list) -> list[list[float]]:
        pv = cm.preprocess_images(self.processor, images)  # [N, 3, H, W]
        with torch.inference_mode():
            emb = self.encoder.encode_images(pv)  # [N, D]
        return torch.nn.functional.normalize(emb.float(), dim=-1).tolist()


class _TorchDual:
    def __init__(self, model):
        self.model = model.eval()

    def encode_images(self, pixel_values):
        return cm.encode_images(self.model, pixel_values)

    def encode_texts(self, input_ids, attention_mask):
        return cm.encode_texts(self.model, input_ids, attention_mask)


# ---------------------------------------------------------------------------------------------
# Rerank


@dataclass(frozen=True)
class PairIn:
    """One (instruction, query, document) pair; text and/or a data-URL image on each side."""

    instruction: str
    query_text: str | None
    query_image: str | None
    doc_text: str | None
    doc_image: str | None


class RerankScorer:
    family = "reranker"

    def __init__(self, reranker: rm.Reranker, *, backend: str):
        self.reranker = reranker
        self.reranker.images = rm.ImageCache(max_items=256)  # served images are data URLs: keep few
        self.backend = backend
        self.takes_images = reranker.has_vision and backend == "torch"
        self.reranker.share_prefix = True  # text pairs: the batch's common prompt prefix runs once (Reranker.forward)
        self._count_tok = copy.deepcopy(reranker.tokenizer)  # for the handlers (see Embedder)

    def _record(self, p: PairIn):
        from ..data.records import parse_record

        def item(text, image):
            return {k: v for k, v in (("text", text), ("image", image)) if v is not None}

        obj = {"instruction": p.instruction, "query": item(p.query_text, p.query_image), "documents": [item(p.doc_text, p.doc_image)]}
        return parse_record(obj, "rerank", path="<request>", line=0)

    def prompt_tokens(self, p: PairIn) -> int:
        """Tokens of the pair's prompt, an image counted as its placeholder span (the processor expands it later)."""
        span = getattr(self.reranker, "image_span", "")

        def text(t, image):
            return "".join(x for x in (span if image else None, t) if x)

        text_only = PairIn(p.instruction, text(p.query_text, p.query_image), None, text(p.doc_text, p.doc_image), None)
        text = self.reranker.format_pair(self._record(text_only), 0, [], "<request>")
        return len(self._count_tok(text)["input_ids"])

    def score(self, pairs: list[PairIn]) -> list[float]:
        """Raw scores (logit(yes) - logit(no), or the seq-cls logit) of one-document records in one batch."""
        out = self.score_counted(pairs)
        for i, (s, n) in enumerate(out):
            if s is None:
                raise ServeError(f"pair {i}: {n} tokens, over the model's max_length {self.reranker.max_length}")
        return [s for s, _ in out]

    def score_counted(self, pairs: list[PairIn]) -> list[tuple[float | None, int]]:
        """(raw score, prompt tokens) of each pair, the pairs in one model call; a pair over max_length is not run
        and gets (None, its tokens). Text pairs are tokenised once, here, for the count and the model (the server
        calls this in its model thread: nothing is tokenised on the event loop)."""
        r = self.reranker
        if any(p.query_image is not None or p.doc_image is not None for p in pairs):
            counts = [self.prompt_tokens(p) for p in pairs]  # an image as its placeholder span, as the handlers did
            ok = [i for i, n in enumerate(counts) if n <= r.max_length]
            scores = self._run(lambda: r.signals([self._record(pairs[i]) for i in ok], path="<request>")) if ok else []
        else:
            texts = [r.format_pair(self._record(p), 0, [], "<request>") for p in pairs]
            ids = r.tokenizer(texts)["input_ids"]
            counts = [len(x) for x in ids]
            ok = [i for i, n in enumerate(counts) if n <= r.max_length]
            scores = []
            if ok:  # the tokenizer pads on the left, as in Reranker.encode
                batch = dict(r.tokenizer.pad({"input_ids": [ids[i] for i in ok]}, return_tensors="pt"))
                scores = self._run(lambda: r.signals_of(batch, torch.ones(len(ok), 1, dtype=torch.bool)))
        out: list[tuple[float | None, int]] = [(None, n) for n in counts]
        for i, s in zip(ok, scores):
            out[i] = (s, counts[i])
        return out

    @staticmethod
    def _run(signals) -> list[float]:
        with torch.inference_mode():
            return signals().scores[:, 0].float().tolist()


# ---------------------------------------------------------------------------------------------
# Chat


def _audio_rate(processor) -> int | None:
    """The sampling rate the processor's audio feature extractor takes; None for a model that takes no audio."""
    from ..models.generative import audio_sampling_rate

    return audio_sampling_rate(processor)


class ChatModel:
    """A generative VLM answering OpenAI-style messages (greedy at temperature 0)."""

    family = "generative"

    def __init__(self, model, processor, *, backend: str = "torch"):
        self.model = model.eval()
        self.processor = processor
        self.backend = backend
        self.tokenizer = getattr(processor, "tokenizer", processor)
        cfg = getattr(model.config, "text_config", model.config)
        self.context = int(getattr(cfg, "max_position_embeddings", 4096))
        self.lock = threading.Lock()  # generate() calls never overlap
        self._encode_lock = threading.Lock()  # nor do processor calls (the tokenizer's settings are shared state)
        self._eos = self._eos_ids()
        self.audio_rate = _audio_rate(processor)

    def _eos_ids(self) -> list[int]:
        ids = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
        for t in ("<|im_end|>", "<|endoftext|>"):
            if t in self.tokenizer.get_vocab():
                ids.add(self.tokenizer.convert_tokens_to_ids(t))
        return sorted(ids)

    def encode(self, messages: list[dict], images: list, audios: list | None = None) -> dict[str, torch.Tensor]:
        """messages: [{"role", "content": str | [{"type": "text", "text"} | {"type": "image"} | {"type": "audio"}]}];
        audios: clips (float arrays at ``audio_rate``), for a model with an audio tower (the Omni thinker)."""
        if audios and self.audio_rate is None:
            raise ValueError("this model takes no audio (no audio tower)")
        with self._encode_lock:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            extra = {"audio": list(audios), "sampling_rate": self.audio_rate} if audios else {}
            enc = self.processor(text=[text], images=images or None, return_tensors="pt", **extra)
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def _gen_kwargs(self, max_tokens: int, temperature: float) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=max_tokens, eos_token_id=self._eos, pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_k=0)
        else:
            kw.update(do_sample=False)
        return kw

    def generate(self, inputs: dict[str, torch.Tensor], max_tokens: int, temperature: float = 0.0) -> tuple[str, int, str]:
        """(text, completion tokens, finish_reason)."""
        with self.lock, torch.inference_mode():
            out = self.model.generate(**inputs, **self._gen_kwargs(max_tokens, temperature))
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        finish = "stop" if any(t in self._eos for t in new) else "length"
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new), finish

    def stream(self, inputs: dict[str, torch.Tensor], max_tokens: int, temperature: float = 0.0) -> Iterator[str | tuple[int, str]]:
        """Text pieces as they are generated, then (completion tokens, finish_reason)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        result: dict[str, Any] = {}

        def run():
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(**inputs, streamer=streamer, **self._gen_kwargs(max_tokens, temperature))
            except Exception as e:  # surface it to the stream instead of hanging
                result["error"] = e
                streamer.on_finalized_text("", stream_end=True)

        with self.lock:
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            for piece in streamer:
                if piece:
                    yield piece
            thread.join()
        if "error" in result:
            raise result["error"]
        new = result["out"][0, inputs["input_ids"].shape[1] :].tolist()
        yield len(new), ("stop" if any(t in self._eos for t in new) else "length")


class OnnxChat(ChatModel):
    """A ChatModel whose generation runs the exported chat graphs in onnxruntime (KV cache; greedy at temperature 0,
    else sampled from softmax(logits / temperature), like the torch backend's top_k=0 sampling)."""

    def __init__(self, runner, processor):
        self.runner = runner
        self.processor = processor
        self.backend = "onnx"
        self.tokenizer = getattr(processor, "tokenizer", processor)
        cfg = getattr(runner.config, "text_config", runner.config)
        self.context = int(getattr(cfg, "max_position_embeddings", 4096))
        self.lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._eos = list(runner.eos_ids)
        self.audio_rate = _audio_rate(processor) if "audio_encoder" in runner.sessions else None

    def encode(self, messages: list[dict], images: list, audios: list | None = None) -> dict[str, torch.Tensor]:
        with self._encode_lock:
            return self.runner.encode(messages, images, audios)

    def generate(self, inputs: dict[str, torch.Tensor], max_tokens: int, temperature: float = 0.0) -> tuple[str, int, str]:
        with self.lock:
            new = [int(t[0]) for t, _ in self.runner.decode(inputs, max_tokens, eos_ids=self._eos, temperature=temperature)]
        finish = "stop" if any(t in self._eos for t in new) else "length"
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new), finish

    def stream(self, inputs: dict[str, torch.Tensor], max_tokens: int, temperature: float = 0.0) -> Iterator[str | tuple[int, str]]:
        new: list[int] = []
        text = ""
        with self.lock:
            for t, _ in self.runner.decode(inputs, max_tokens, eos_ids=self._eos, temperature=temperature):
                new.append(int(t[0]))
                full = self.tokenizer.decode(new, skip_special_tokens=True)
                if len(full) > len(text) and not full.endswith("\ufffd"):  # a whole character more (byte-level BPE)
                    yield full[len(text):]
                    text = full
        full = self.tokenizer.decode(new, skip_special_tokens=True)
        if len(full) > len(text):
            yield full[len(text):]
        yield len(new), ("stop" if any(t in self._eos for t in new) else "length")


# ---------------------------------------------------------------------------------------------
# Loading


def load_backend(model_dir: str | Path, *, backend: str = "auto", task: str = "auto", int8: bool = False, max_length: int = 512, threads: int | None = None):
    """An Embedder, RerankScorer or ChatModel for a model folder (torch) or an ONNX export folder (onnx).

    `threads`: intra-op threads of torch / onnxruntime (default: theirs)."""
    d = ox.model_folder(model_dir)
    if threads:
        torch.set_num_threads(threads)
    if not d.is_dir():
        raise ServeError(f"{d}: no such folder")
    is_onnx = (d / ox.MANIFEST).is_file()
    if backend == "auto":
        backend = "onnx" if is_onnx else "torch"
    if backend not in ("torch", "onnx"):
        raise ServeError(f"--backend {backend!r}: choose torch or onnx")
    if backend == "onnx" and not is_onnx:
        raise ServeError(f"{d}: no {ox.MANIFEST}; --backend onnx serves a folder written by `mmdistill export --format onnx` (export it first)")
    if backend == "torch" and is_onnx:
        raise ServeError(f"{d} is an ONNX export; serve it with --backend onnx (or serve the source model folder with torch)")
    task = serve_task(d, task)
    if backend == "onnx":
        runner, processor, _ = ox.load_onnx(d, int8=int8, max_length=max_length, threads=threads)
        if task == "clip":
            return Embedder(runner, processor, backend="onnx")
        if task == "chat":
            return OnnxChat(runner, processor)
        return RerankScorer(runner, backend="onnx")
    if task == "clip":
        model, processor = cm.load_model(str(d))
        return Embedder(_TorchDual(model), processor, backend="torch")
    if task in ("seq_cls", "yesno"):
        r = rm.load_reranker(str(d), kind=task, max_length=max_length)
        r.model.eval()
        return RerankScorer(r, backend="torch")
    from ..models.generative import load_vlm

    model, processor = load_vlm(str(d))
    if getattr(processor, "chat_template", None) is None and getattr(getattr(processor, "tokenizer", None), "chat_template", None) is None:
        raise ServeError(f"{d}: the processor has no chat template; /v1/chat/completions needs one")
    return ChatModel(model, processor)

