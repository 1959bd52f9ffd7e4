"""The HTTP server: OpenAI-style embeddings and chat completions, Cohere/Jina-style rerank, health, metrics.

Endpoints (``create_app(backend, ServeConfig)``):

- ``POST /v1/embeddings`` (dual encoders): ``input`` is a string or a list of strings / ``{"text": ...}`` /
  ``{"image": "data:image/...;base64,..."}`` (a string that is such a data URL is an image too);
  L2-normalised vectors, ``encoding_format`` float or base64 (the openai client asks for base64).
- ``POST /v1/rerank`` (rerankers): ``query``, ``documents`` (strings or ``{"text", "image"}`` objects),
  ``top_n``, ``instruction``, ``return_documents`` -> ``results`` of ``{index, relevance_score}`` sorted
  by score; ``relevance_score`` = sigmoid(raw score), i.e. P(yes) for a yes/no reranker.
- ``POST /v1/chat/completions`` (generative VLMs): OpenAI messages, images as ``image_url`` data URLs,
  ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``stream: true`` as server-sent events.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Bad input is answered with the right 4xx and an OpenAI-style ``{"error": {"message", "type", "param",
"code"}}`` whose message names the field; the server keeps serving. Only data URLs are accepted as
images: remote URLs and local paths are refused (the server reads nothing from disk or network) unless the server is
started with ``--allow-remote-images`` (http(s) URLs downloaded off the event loop, at most --max-body-mb each, within
--fetch-timeout) or ``--image-root DIR`` (paths read under DIR only, with the data loaders' checks).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' string annotations here

from .backends import PairIn
from .batching import LRUCache, MicroBatcher


@dataclass
class ServeConfig:
    """Limits and batching of a server (the CLI's options)."""

    name: str = "model"
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_inputs: int = 256  # texts/images per embeddings request, documents per rerank request
    max_tokens: int = 512  # chat: the most tokens one request may ask to generate
    max_batch: int = 32  # items per model call
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    batching: bool = True
    cache_size: int = 4096  # LRU entries (embeddings / pair scores); 0 turns the cache off
    timeout_s: float = 60.0
    max_audio_seconds: float = 600.0  # chat: the longest clip accepted (Omni thinker)
    image_root: str | None = None  # local image paths are read under this folder only; None: refused
    allow_remote_images: bool = False  # http(s) image URLs are downloaded (at most max_body_bytes, fetch_timeout_s)
    fetch_timeout_s: float = 5.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics in a registry of their own (several apps in one process do not collide)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mmdistill_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("mmdistill_request_seconds", "Request latency by endpoint.", ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("mmdistill_batch_size", "Items per model call.", ["queue"], registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.scores = Histogram("mmdistill_relevance_score", "Rerank relevance scores (sigmoid of the raw score).", registry=self.registry,
                                buckets=tuple(i / 10 for i in range(1, 11)))
        self.cache = Counter("mmdistill_cache", "LRU cache lookups by queue and result.", ["queue", "result"], registry=self.registry)
        self.tokens = Counter("mmdistill_generated_tokens", "Tokens generated by chat completions.", registry=self.registry)
        self.psi = Gauge("mmdistill_score_psi", "PSI of live rerank scores against the reference.", registry=self.registry)
        self.ks = Gauge("mmdistill_score_ks", "KS statistic of live rerank scores against the reference.", registry=self.registry)
        self.drift = Gauge("mmdistill_score_drift", "1 while score drift is flagged.", registry=self.registry)


ENDPOINTS = {"/v1/embeddings", "/v1/rerank", "/v1/chat/completions", "/v1/models", "/v1/monitor", "/health", "/metrics"}


# ---------------------------------------------------------------------------------------------
# Request parsing helpers


async def _read_json(request, cfg: ServeConfig) -> dict[str, Any]:
    """The body as a JSON object: 413 over the size limit, 400 when it is not JSON / not an object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
        raise ApiError(413, f"request body is {int(length)} bytes, over the limit of {cfg.max_body_bytes}", "body")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cfg.max_body_bytes:
            raise ApiError(413, f"request body is over the limit of {cfg.max_body_bytes} bytes", "body")
        chunks.append(chunk)
    try:
        obj = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body ({e})", "body") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(obj).__name__}", "body")
    return obj


def _field(obj: dict, name: str, types: tuple, *, required: bool = False, default: Any = None, path: str | None = None) -> Any:
    path = path or name
    if name not in obj or obj[name] is None:
        if required:
            raise ApiError(400, f"{path}: required", path)
        return default
    value = obj[name]
    if isinstance(value, bool) and bool not in types:  # JSON true is not a number here
        raise ApiError(400, f"{path}: expected {' or '.join(t.__name__ for t in types)}, got bool", path)
    if not isinstance(value, types):
        raise ApiError(400, f"{path}: expected {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}", path)
    return value


_REMOTE = re.compile(r"^https?://", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def _image(ref: Any, field: str, cfg: ServeConfig, fetched: dict[str, bytes | str] | None = None):
    """An image reference, fully decoded and checked (pixels, bombs, corrupt data) -> PIL image.

    A data:image/...;base64 URL always; an http(s) URL when the server allows remote images (its bytes downloaded
    beforehand by `_fetch_all` into `fetched`: bytes, or the reason it failed); a path under ``cfg.image_root`` when
    one is set (the data loaders' checks: no escape from the folder, no symlink out). Anything else is a 400."""
    from ..data.images import ImageError, decode_image_bytes, load_image

    if not isinstance(ref, str) or not ref:
        raise ApiError(400, f"{field}: expected a data:image/...;base64 URL string", field)
    try:
        if ref[:5].lower() == "data:":
            return load_image(ref, ".", max_pixels=cfg.max_image_pixels)
        if _REMOTE.match(ref):
            if not cfg.allow_remote_images:
                raise ApiError(400, f"{field}: remote URLs are refused (start the server with --allow-remote-images to fetch them); send a data:image/<type>;base64 URL", field)
            got = (fetched or {}).get(ref)
            if not isinstance(got, bytes):
                raise ApiError(400, f"{field}: cannot fetch the image: {got or 'not fetched'}", field)
            return decode_image_bytes(got, ref, max_pixels=cfg.max_image_pixels)
        if _SCHEME.match(ref) and not re.match(r"^[a-z]:[\\/]", ref, re.IGNORECASE):
            raise ApiError(400, f"{field}: only data:image/<type>;base64 URLs, http(s) URLs (--allow-remote-images) and paths under --image-root are accepted", field)
        if cfg.image_root is None:
            raise ApiError(400, f"{field}: local paths are refused (start the server with --image-root DIR to read images under DIR)", field)
        return load_image(ref, cfg.image_root, max_pixels=cfg.max_image_pixels)
    except ImageError as e:
        raise ApiError(400, f"{field}: {e.reason}", field) from None


def _fetch(url: str, cfg: ServeConfig) -> bytes | str:
    """The bytes at `url` (status 200, at most max_body_bytes, within fetch_timeout_s, up to 3 redirects), or why not."""
    import httpx

    try:
        with httpx.Client(timeout=cfg.fetch_timeout_s, follow_redirects=True, max_redirects=3) as client, client.stream("GET", url) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            size = r.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
                return f"{int(size):,} bytes, over the limit of {cfg.max_body_bytes:,}"
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > cfg.max_body_bytes:
                    return f"over the limit of {cfg.max_body_bytes:,} bytes"
            return bytes(data)
    except httpx.TimeoutException:
        return f"timed out after {cfg.fetch_timeout_s:g} s"
    except (httpx.HTTPError, ValueError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


async def _fetch_all(refs: list[Any], cfg: ServeConfig) -> dict[str, bytes | str]:
    """Download the http(s) image URLs among `refs` concurrently, off the event loop (only when remote images are on)."""
    urls = sorted({r for r in refs if isinstance(r, str) and _REMOTE.match(r)}) if cfg.allow_remote_images else []
    if not urls:
        return {}
    loop = asyncio.get_running_loop()
    got = await asyncio.gather(*(loop.run_in_executor(None, _fetch, u, cfg) for u in urls))
    return dict(zip(urls, got))


def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _check_model(obj: dict, models: dict[str, Any], *, required: bool) -> tuple[str, Any]:
    """(name, backend) of the model a request names; the first (the student) when it names none."""
    model = _field(obj, "model", (str,), required=required)
    if model is None:
        return next(iter(models.items()))
    if model not in models:
        raise ApiError(404, f"model: unknown model {model!r}; this server serves {', '.join(repr(m) for m in models)}", "model", "model_not_found")
    return model, models[model]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ---------------------------------------------------------------------------------------------
# The app


def create_app(backend, cfg: ServeConfig | None = None, monitor=None, *, teacher=None, teacher_name: str = "teacher"):
    """The FastAPI app serving `backend` under `cfg`; `monitor` (a DriftMonitor) watches its rerank scores.

    `teacher`: a second backend served beside it as `teacher_name` (requests pick one by `model`; without
    `model` they go to `backend`). Each model has its own micro-batchers and cache entries; model calls of
    both share the one model thread."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServeConfig()
    served = {cfg.name: backend}
    if teacher is not None:
        if teacher_name == cfg.name:
            raise ValueError(f"the teacher's name {teacher_name!r} is the student's; give them different names")
        served[teacher_name] = teacher
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")  # one model call at a time
    cache = LRUCache(cfg.cache_size)
    max_batch = cfg.max_batch if cfg.batching else 1
    max_wait = cfg.max_wait_ms / 1000 if cfg.batching else 0.0
    batchers: dict[str, MicroBatcher] = {}

    def chunked(fn):
        """fn over items in chunks of max_batch (a job bigger than a batch is still one model call per chunk)."""
        def run(items):
            out = []
            for i in range(0, len(items), cfg.max_batch):
                out.extend(fn(items[i : i + cfg.max_batch]))
            return out
        return run

    def batcher(queue: str, fn) -> MicroBatcher:
        if queue not in batchers:
            batchers[queue] = MicroBatcher(chunked(fn), executor, max_batch=max_batch, max_wait_s=max_wait,
                                           on_batch=lambda n, q=queue: metrics.batch.labels(q).observe(n))
        return batchers[queue]

    def qname(model: str, queue: str) -> str:
        """The batcher / cache / metrics queue of a model: the student's keep their plain names."""
        return queue if model == cfg.name else f"{model}/{queue}"

    async def cached(queue: str, fn, items: list, keys: list[str]) -> list:
        """Results for `items`: cache hits directly, the misses through the queue's micro-batcher."""
        results: list[Any] = [cache.get((queue, k)) for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        metrics.cache.labels(queue, "hit").inc(len(items) - len(todo))
        metrics.cache.labels(queue, "miss").inc(len(todo))
        if todo:
            try:
                got = await asyncio.wait_for(batcher(queue, fn).submit([items[i] for i in todo]), cfg.timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, f"the model did not answer within {cfg.timeout_s:g} s") from None
            for i, r in zip(todo, got):
                results[i] = r
                cache.put((queue, keys[i]), r)
        return results

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for b in batchers.values():
            await b.close()
        executor.shutdown(wait=False)

    app = FastAPI(title="mmdistill", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.metrics, app.state.config, app.state.backend = metrics, cfg, backend

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(_error_body(e.status, e.message, e.param, e.code), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return JSONResponse(_error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):  # a bug or a model failure: 500 with one line, the server goes on
        return JSONResponse(_error_body(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"), status_code=500)

    class Observe:
        """Pure ASGI middleware: the API key, then request counts and latency by endpoint and status.

        (Not Starlette's BaseHTTPMiddleware / @app.middleware("http"): that one runs every request through an
        extra task group and memory streams, which cost as much CPU per request as the tiny models' batched
        forward in a profile of the load test.) An exception no handler answered becomes a one-line 500 here and
        the server goes on."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            t0 = time.perf_counter()
            status = [0]

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                if cfg.api_key and path.startswith("/v1/"):
                    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                    given = headers.get("authorization", "")
                    token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
                    if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                        raise ApiError(401, "authorization: missing or wrong API key (send Authorization: Bearer <key>)", "authorization", "invalid_api_key")
                await self.inner(scope, receive, send_status)
            except Exception as e:
                if status[0]:  # the response has started (a stream): nothing more can be sent
                    raise
                if isinstance(e, ApiError):
                    response = JSONResponse(_error_body(e.status, e.message, e.param, e.code), status_code=e.status)
                else:  # a bug or a model failure: 500 with one line, the server goes on
                    response = await _crash(None, e)
                await response(scope, receive, send_status)
            finally:
                metrics.requests.labels(path, str(status[0] or 500)).inc()
                metrics.latency.labels(path).observe(time.perf_counter() - t0)

    app.add_middleware(Observe)

    def need(name: str, backend, family: str, endpoint: str):
        if backend.family != family:
            serves = {"contrastive": "/v1/embeddings", "reranker": "/v1/rerank", "generative": "/v1/chat/completions"}[backend.family]
            raise ApiError(400, f"model: {name!r} is a {backend.family} model; it serves {serves}, not {endpoint}", "model", "wrong_endpoint")

    # ------------------------------------------------------------------ info
    @app.get("/health")
    async def health():
        out = {"status": "ok", "model": cfg.name, "family": backend.family, "backend": backend.backend}
        if teacher is not None:
            out["teacher"] = teacher_name
        return out

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mmdistill", "family": b.family, "backend": b.backend,
                                            "role": "student" if b is backend else "teacher"} for name, b in served.items()]}

    @app.get("/v1/monitor")
    async def monitor_summary():
        if monitor is None:
            raise ApiError(404, "monitor: no drift monitor on this server (start it with --reference RUN/scores.jsonl)", "monitor")
        s = await asyncio.get_running_loop().run_in_executor(None, monitor.summary)
        metrics.drift.set(1.0 if s["drift"] else 0.0)
        if s["psi"] is not None:
            metrics.psi.set(s["psi"])
            metrics.ks.set(s["ks_statistic"])
        return s

    # ------------------------------------------------------------------ embeddings
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        obj = await _read_json(request, cfg)
        name, backend = _check_model(obj, served, required=False)
        need(name, backend, "contrastive", "/v1/embeddings")
        raw = _field(obj, "input", (str, list), required=True)
        fmt = _field(obj, "encoding_format", (str,), default="float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"encoding_format: expected 'float' or 'base64', got {fmt!r}", "encoding_format")
        if _field(obj, "dimensions", (int,)) is not None:
            raise ApiError(400, "dimensions: not supported (the model's embedding size is fixed)", "dimensions")
        inputs = [raw] if isinstance(raw, str) else raw
        if not inputs:
            raise ApiError(400, "input: empty list", "input")
        if len(inputs) > cfg.max_inputs:
            raise ApiError(400, f"input: {len(inputs)} items, over the limit of {cfg.max_inputs}", "input")
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, Any, str]] = []
        tokens = 0
        fetched = await _fetch_all([x.get("image") for x in inputs if isinstance(x, dict)], cfg)
        for i, x in enumerate(inputs):
            field = "input" if isinstance(raw, str) else f"input.{i}"
            if isinstance(x, dict):
                if set(x) - {"text", "image"} or len(x) != 1:
                    raise ApiError(400, f"{field}: expected {{\"text\": ...}} or {{\"image\": ...}}", field)
                kind, x = next(iter(x.items()))
                field = f"{field}.{kind}"
                if kind == "image":
                    im = _image(x, field, cfg, fetched)
                    # a data URL carries its content; a URL or a path may change behind the same string: key on the pixels
                    key = str(x) if isinstance(x, str) and x[:5].lower() == "data:" else f"{im.mode}{im.size}".encode() + im.tobytes()
                    images.append((i, im, hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()))
                    continue
            elif isinstance(x, str) and x[:11].lower() == "data:image/":
                images.append((i, _image(x, field, cfg), hashlib.sha256(x.encode()).hexdigest()))
                continue
            if not isinstance(x, str):
                raise ApiError(400, f"{field}: expected a string (token arrays are not supported), got {type(x).__name__}", field)
            if not x.strip():
                raise ApiError(400, f"{field}: empty string", field)
            n = backend.count_tokens(x)
            if n > backend.max_tokens:
                raise ApiError(400, f"{field}: {n} tokens, over the model's limit of {backend.max_tokens}", field)
            tokens += n
            texts.append((i, x))
        vectors: list[Any] = [None] * len(inputs)
        if texts:
            for (i, _), v in zip(texts, await cached(qname(name, "text"), backend.embed_texts, [t for _, t in texts], [t for _, t in texts])):
                vectors[i] = v
        if images:
            for (i, _, _), v in zip(images, await cached(qname(name, "image"), backend.embed_images, [im for _, im, _ in images], [h for _, _, h in images])):
                vectors[i] = v

        def encode(v):
            return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if fmt == "base64" else v

        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        # a JSONResponse directly: FastAPI's jsonable_encoder would walk every float of every vector
        return JSONResponse({"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ------------------------------------------------------------------ rerank
    def rerank_item(backend, x: Any, field: str, fetched: dict[str, bytes | str]) -> tuple[str | None, str | None]:
        if isinstance(x, str):
            if not x.strip():
                raise ApiError(400, f"{field}: empty string", field)
            return x, None
        if isinstance(x, dict) and x and not set(x) - {"text", "image"}:
            text, image = x.get("text"), x.get("image")
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise ApiError(400, f"{field}.text: expected a non-empty string", f"{field}.text")
            if image is not None:
                if not backend.takes_images:
                    raise ApiError(400, f"{field}.image: this reranker ({backend.backend} backend) reads text only", f"{field}.image")
                decoded = _image(image, f"{field}.image", cfg, fetched)
                if isinstance(image, str) and image[:5].lower() != "data:":  # a URL or a path: the reranker reads data URLs
                    image = _png_data_url(decoded)
            if text is None and image is None:
                raise ApiError(400, f"{field}: needs text or image", field)
            return text, image
        raise ApiError(400, f"{field}: expected a string or {{\"text\", \"image\"}}", field)

    @app.post("/v1/rerank")
    async def rerank(request: Request):
        obj = await _read_json(request, cfg)
        name, backend = _check_model(obj, served, required=False)
        need(name, backend, "reranker", "/v1/rerank")
        query = _field(obj, "query", (str, dict), required=True)
        docs = _field(obj, "documents", (list,), required=True)
        fetched = await _fetch_all([x.get("image") for x in [query, *docs] if isinstance(x, dict)], cfg)
        q_text, q_image = rerank_item(backend, query, "query", fetched)
        if not docs:
            raise ApiError(400, "documents: empty list; give at least one document", "documents")
        if len(docs) > cfg.max_inputs:
            raise ApiError(400, f"documents: {len(docs)} documents, over the limit of {cfg.max_inputs}", "documents")
        top_n = _field(obj, "top_n", (int,), default=len(docs))
        if top_n < 1 or top_n > len(docs):
            raise ApiError(400, f"top_n: {top_n} is outside 1..{len(docs)} (the number of documents)", "top_n")
        instruction = _field(obj, "instruction", (str,), default="Given a query, retrieve relevant documents.")
        return_docs = _field(obj, "return_documents", (bool,), default=False)
        pairs = []
        for i, d in enumerate(docs):
            d_text, d_image = rerank_item(backend, d, f"documents.{i}", fetched)
            pairs.append(PairIn(instruction, q_text, q_image, d_text, d_image))
        # the model thread counts each pair's tokens while it tokenises the batch: a pair over max_length comes back
        # without a score (and the other requests of its batch are not held up by it)
        got = await cached(qname(name, "rerank"), backend.score_counted, pairs, [_key(p.instruction, p.query_text, p.query_image, p.doc_text, p.doc_image) for p in pairs])
        for i, (s, n) in enumerate(got):
            if s is None:
                raise ApiError(400, f"documents.{i}: the pair is {n} tokens, over the model's max_length {backend.reranker.max_length}", f"documents.{i}")
        raw = [s for s, _ in got]
        tokens = sum(n for _, n in got)
        scores = [_sigmoid(s) for s in raw]
        for s in scores:
            metrics.scores.observe(s)
        if monitor is not None and name == cfg.name:  # the reference scores are the served student's
            await asyncio.get_running_loop().run_in_executor(None, monitor.add, raw)
        order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))[:top_n]
        results = []
        for i in order:
            r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if return_docs:
                r["document"] = {"text": pairs[i].doc_text} if pairs[i].doc_image is None else {"text": pairs[i].doc_text, "image": "<image>"}
            results.append(r)
        return JSONResponse({"id": f"rerank-{uuid.uuid4().hex[:16]}", "model": name, "results": results, "usage": {"total_tokens": tokens}})

    # ------------------------------------------------------------------ chat
    def _audio(part: Any, field: str, rate: int | None):
        """An OpenAI ``input_audio`` part ({"data": base64 WAV, "format": "wav"}) -> mono float32 samples at `rate`."""
        from ..data.audio import AudioError, load_audio

        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str) or not spec["data"]:
            raise ApiError(400, f"{field}.input_audio.data: expected base64 WAV bytes ({{\"data\": ..., \"format\": \"wav\"}})", f"{field}.input_audio.data")
        fmt = spec.get("format", "wav")
        if fmt != "wav":
            raise ApiError(400, f"{field}.input_audio.format: only wav is taken (got {fmt!r}); convert it, e.g. ffmpeg -i IN -ar 16000 -ac 1 OUT.wav", f"{field}.input_audio.format")
        if rate is None:
            raise ApiError(400, f"{field}: this model takes no audio (no audio tower); send audio to a Qwen3-Omni thinker", field)
        try:
            return load_audio("data:audio/wav;base64," + spec["data"], ".", sampling_rate=rate, max_seconds=cfg.max_audio_seconds)
        except AudioError as e:
            raise ApiError(400, f"{field}.input_audio.data: {e.reason}", f"{field}.input_audio.data") from None

    def image_urls(raw: list) -> list:
        """The image_url.url values of OpenAI messages (whatever their shape; checked later)."""
        urls = []
        for m in raw:
            for part in (m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), list) else []):
                url = part.get("image_url") if isinstance(part, dict) else None
                urls.append(url.get("url") if isinstance(url, dict) else url)
        return urls

    def chat_messages(raw: list, audio_rate: int | None = None, fetched: dict[str, bytes | str] | None = None) -> tuple[list[dict], list, list]:
        """OpenAI messages -> the processor's messages (text / image / audio parts), the decoded images and audio clips
        in order."""
        out, images, audios = [], [], []
        for i, m in enumerate(raw):
            f = f"messages.{i}"
            if not isinstance(m, dict):
                raise ApiError(400, f"{f}: expected an object with role and content", f)
            role = m.get("role")
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"{f}.role: expected system, user or assistant, got {role!r}", f"{f}.role")
            content = m.get("content")
            if isinstance(content, str):
                out.append({"role": role, "content": [{"type": "text", "text": content}]})
                continue
            if not isinstance(content, list) or not content:
                raise ApiError(400, f"{f}.content: expected a string or a non-empty list of parts", f"{f}.content")
            parts = []
            for j, part in enumerate(content):
                pf = f"{f}.content.{j}"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    images.append(_image(url, f"{pf}.image_url.url", cfg, fetched))
                    parts.append({"type": "image"})
                elif kind == "input_audio":
                    audios.append(_audio(part, pf, audio_rate))
                    parts.append({"type": "audio"})
                else:
                    raise ApiError(400, f"{pf}: expected {{\"type\": \"text\", \"text\"}}, {{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:...\"}}}} or {{\"type\": \"input_audio\", \"input_audio\": {{\"data\", \"format\": \"wav\"}}}}", pf)
            out.append({"role": role, "content": parts})
        return out, images, audios

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        obj = await _read_json(request, cfg)
        name, backend = _check_model(obj, served, required=True)
        need(name, backend, "generative", "/v1/chat/completions")
        raw = _field(obj, "messages", (list,), required=True)
        if not raw:
            raise ApiError(400, "messages: empty list", "messages")
        name = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(obj, name, (int,), default=min(cfg.max_tokens, 256))
        if not 1 <= max_tokens <= cfg.max_tokens:
            raise ApiError(400, f"{name}: {max_tokens} is outside 1..{cfg.max_tokens}", name)
        temperature = float(_field(obj, "temperature", (int, float), default=0.0))
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature: {temperature} is outside 0..2", "temperature")
        if _field(obj, "n", (int,), default=1) != 1:
            raise ApiError(400, "n: only 1 is supported", "n")
        stream = _field(obj, "stream", (bool,), default=False)
        messages, images, audios = chat_messages(raw, getattr(backend, "audio_rate", None), await _fetch_all(image_urls(raw), cfg))
        loop = asyncio.get_running_loop()
        try:
            inputs = await loop.run_in_executor(None, *((backend.encode, messages, images, audios) if audios else (backend.encode, messages, images)))
        except ValueError as e:
            raise ApiError(400, f"messages: {str(e).splitlines()[0]}", "messages") from None
        prompt = int(inputs["input_ids"].shape[1])
        if prompt + max_tokens > backend.context:
            raise ApiError(400, f"messages: the prompt is {prompt} tokens; with {name}={max_tokens} it exceeds the model's context of {backend.context}", "messages", "context_length_exceeded")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if not stream:
            text, n, finish = await loop.run_in_executor(executor, backend.generate, inputs, max_tokens, temperature)
            metrics.tokens.inc(n)
            return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}}

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n"

        def events():  # a sync generator: Starlette iterates it in a worker thread
            yield chunk({"role": "assistant", "content": ""})
            try:
                for piece in backend.stream(inputs, max_tokens, temperature):
                    if isinstance(piece, tuple):
                        n, finish = piece
                        metrics.tokens.inc(n)
                        yield chunk({}, finish)
                    else:
                        yield chunk({"content": piece})
            except Exception as e:  # headers are sent: report in the stream
                yield f"data: {json.dumps(_error_body(500, f'internal error: {type(e).__name__}: {e}'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(model_dir, *, host: str = "127.0.0.1", port: int = 8000, backend: str = "auto", task: str = "auto", int8: bool = False, threads: int | None = None, config: ServeConfig | None = None, reference=None, webhook: str | None = None,
          teacher=None, teacher_name: str | None = None, log=print) -> None:
    """Load a folder and serve it with uvicorn until interrupted."""
    import uvicorn

    from .backends import load_backend

    b = load_backend(model_dir, backend=backend, task=task, int8=int8, threads=threads)
    cfg = config or ServeConfig()
    monitor = None
    if reference is not None:
        import logging

        from .monitor import DriftMonitor, MonitorError, read_reference

        if b.family != "reranker":
            raise MonitorError(f"--reference: drift monitoring watches rerank scores; {model_dir} is a {b.family} model")
        monitor = DriftMonitor(read_reference(reference), source=str(reference), webhook=webhook)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t = None
    if teacher is not None:
        from pathlib import Path

        from .backends import ServeError

        # the teacher is loaded as its own folder says (a model folder: torch; an export: onnx), with the same task
        t = load_backend(teacher, task=task, int8=int8, threads=threads)
        teacher_name = teacher_name or Path(teacher).name
        if teacher_name == cfg.name:
            teacher_name = f"{teacher_name}-teacher"
        if t.family != b.family:
            raise ServeError(f"--teacher: {teacher} is a {t.family} model and {model_dir} a {b.family} model; serve a teacher of the student's family")
    log(f"serving {model_dir} as {cfg.name!r} ({b.family}, {b.backend} backend) on http://{host}:{port}")
    if t is not None:
        log(f"serving the teacher {teacher} beside it as {teacher_name!r} ({t.family}, {t.backend} backend); requests pick one by `model`")
    uvicorn.run(create_app(b, cfg, monitor, teacher=t, teacher_name=teacher_name or "teacher"), host=host, port=port, log_level="warning")
