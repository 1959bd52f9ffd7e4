"""Teacher and student side by side on one input, through the server's backends (serve/backends.py).

``Comparer(student, teacher)`` loads each folder with ``load_backend`` (a model folder: torch; an ONNX
export folder: onnxruntime) and answers, for each model, with its output and the wall time of its call:

- rerankers: a query (text, and an image where the model reads images) and documents -> relevance scores
  (sigmoid of the raw score, as /v1/rerank returns them) and the rank of each document;
- dual encoders: an image and candidate texts -> cosine similarity of the image to each text (and, with
  no image, of the first text to the others);
- generative VLMs: an image and a prompt -> the answer (greedy), its token count.

Models are called one after the other on the same inputs; a model call never overlaps another (the same
lock guards all of them, as the server's single model thread does).
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from pathlib import Path
from typing import Any

from ..serve.backends import PairIn, load_backend
from .runs import UIError

DEFAULT_INSTRUCTION = "Given a query, retrieve relevant documents."


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class Comparer:
    """A student and (optionally) its teacher, loaded once; `sides` is [(label, backend)], teacher first."""

    def __init__(self, student: str | Path, teacher: str | Path | None = None, *, task: str = "auto", backend: str = "auto", threads: int | None = None):
        self.sides: list[tuple[str, Any]] = []
        if teacher is not None:
            self.sides.append((f"teacher ({Path(teacher).name})", load_backend(teacher, backend=backend, task=task, threads=threads)))
        self.sides.append((f"student ({Path(student).name})", load_backend(student, backend=backend, task=task, threads=threads)))
        families = {b.family for _, b in self.sides}
        if len(families) > 1:
            raise UIError(f"--teacher: {teacher} is a {self.sides[0][1].family} model and {student} a {self.sides[1][1].family} model; compare models of one family")
        self.family = families.pop()
        self.lock = threading.Lock()

    def warmup(self) -> None:
        """One small call per model, so the first timed comparison does not pay for lazy initialisation."""
        for _, b in self.sides:
            if self.family == "reranker":
                b.score([PairIn(DEFAULT_INSTRUCTION, "warm up", None, "warm up", None)])
            elif self.family == "contrastive":
                b.embed_texts(["warm up"])
            else:
                b.generate(b.encode([{"role": "user", "content": [{"type": "text", "text": "warm up"}]}], []), 1, 0.0)

    def _timed(self, fn, *args):
        with self.lock:
            t0 = time.perf_counter()
            out = fn(*args)
            return out, (time.perf_counter() - t0) * 1000

    # ------------------------------------------------------------------ rerankers
    def rerank(self, query: str, documents: list[str], image=None, instruction: str = "") -> list[dict[str, Any]]:
        """Per model: {"model", "scores" (relevance, one per document), "ranks" (1 = best), "ms"}."""
        query = (query or "").strip()
        docs = [d.strip() for d in documents if d and d.strip()]
        if not query and image is None:
            raise UIError("query: give a query text (or an image, for a reranker that reads images)")
        if not docs:
            raise UIError("documents: give at least one document, one per line")
        q_image = _data_url(image) if image is not None else None
        out = []
        for label, b in self.sides:
            if q_image is not None and not b.takes_images:
                raise UIError(f"image: the {label} reranker ({b.backend} backend) reads text only; remove the image")
            pairs = [PairIn(instruction.strip() or DEFAULT_INSTRUCTION, query or None, q_image, d, None) for d in docs]
            for i, p in enumerate(pairs):
                n = b.prompt_tokens(p)
                if n > b.reranker.max_length:
                    raise UIError(f"documents line {i + 1}: the pair is {n} tokens, over the {label}'s max_length {b.reranker.max_length}")
            raw, ms = self._timed(b.score, pairs)
            scores = [_sigmoid(s) for s in raw]
            order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))
            ranks = [0] * len(docs)
            for r, i in enumerate(order, start=1):
                ranks[i] = r
            out.append({"model": label, "scores": scores, "ranks": ranks, "ms": ms})
        return out

    # ------------------------------------------------------------------ dual encoders
    def similarities(self, texts: list[str], image=None) -> list[dict[str, Any]]:
        """Per model: {"model", "similarities" (cosine of the image, or of texts[0], to each text), "ms"}."""
        import numpy as np

        texts = [t.strip() for t in texts if t and t.strip()]
        if image is None and len(texts) < 2:
            raise UIError("texts: give an image and candidate texts, or at least two texts (the first is compared with the others)")
        if not texts:
            raise UIError("texts: give at least one candidate text, one per line")
        out = []
        for label, b in self.sides:
            for i, t in enumerate(texts):
                n = b.count_tokens(t)
                if n > b.max_tokens:
                    raise UIError(f"texts line {i + 1}: {n} tokens, over the {label}'s limit of {b.max_tokens}")
            if image is not None:
                (anchor,), ms_a = self._timed(b.embed_images, [image.convert("RGB")])
                cands, ms_t = self._timed(b.embed_texts, texts)
                shown = texts
            else:
                vecs, ms_t = self._timed(b.embed_texts, texts)
                anchor, cands, ms_a, shown = vecs[0], vecs[1:], 0.0, texts[1:]
            sims = (np.asarray(cands) @ np.asarray(anchor)).tolist()  # the backends return L2-normalised vectors
            out.append({"model": label, "texts": shown, "similarities": sims, "ms": ms_a + ms_t})
        return out

    # ------------------------------------------------------------------ generative VLMs
    def chat(self, prompt: str, image=None, max_tokens: int = 32) -> list[dict[str, Any]]:
        """Per model: {"model", "answer", "tokens", "finish", "ms"} (greedy decoding)."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise UIError("prompt: required")
        if not 1 <= int(max_tokens) <= 1024:
            raise UIError(f"max tokens: {max_tokens} is outside 1..1024")
        content: list[dict[str, Any]] = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        images = [image.convert("RGB")] if image is not None else []
        out = []
        for label, b in self.sides:
            inputs = b.encode(messages, images)
            n_prompt = int(inputs["input_ids"].shape[1])
            if n_prompt + int(max_tokens) > b.context:
                raise UIError(f"prompt: {n_prompt} tokens; with max tokens {max_tokens} it exceeds the {label}'s context of {b.context}")
            (text, n, finish), ms = self._timed(b.generate, inputs, int(max_tokens), 0.0)
            out.append({"model": label, "answer": text, "tokens": n, "finish": finish, "ms": ms})
        return out
