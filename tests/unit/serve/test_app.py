"""The HTTP server on tiny models: response formats checked against the eager models, micro-batching,
the LRU cache, metrics, the API key, and every kind of bad input answered with the right 4xx."""

import asyncio
import base64
import io
import json
import math

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mmdistill.data.records import parse_record
from mmdistill.models import contrastive as cm
from mmdistill.models import reranker as rm
from mmdistill.serve.app import ServeConfig, create_app
from mmdistill.serve.backends import ServeError, load_backend

from .conftest import data_url

INSTR = "Given a query, retrieve relevant documents."


def client(folders, name, **cfg):
    backend = load_backend(folders / name, task="yesno" if name == "yesno" else "auto")
    return TestClient(create_app(backend, ServeConfig(name=name, **cfg)))


@pytest.fixture(scope="module")
def clip(folders):
    return client(folders, "clip")


@pytest.fixture(scope="module")
def seq(folders):
    return client(folders, "seq_cls", max_wait_ms=50)


@pytest.fixture(scope="module")
def yesno(folders):
    return client(folders, "yesno", max_image_pixels=100_000)


def _eager_scores(folders, name, query, docs, kind="auto"):
    r = rm.load_reranker(str(folders / name), kind=kind)
    r.model.eval()
    rec = parse_record({"instruction": INSTR, "query": query, "documents": docs}, "rerank")
    with torch.no_grad():
        return r.score_records([rec])[0]


def _err(resp, status, param=None, words=""):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    if param is not None:
        assert err["param"] == param, err
        assert param.split(".")[0] in err["message"], err  # the message names the field
    assert words.lower() in err["message"].lower(), err
    return err


# ------------------------------------------------------------------ embeddings


def test_embeddings_match_the_eager_dual_encoder(clip, folders):
    model, proc = cm.load_model(str(folders / "clip"))
    model.eval()
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    texts = ["a red circle", "a large blue square at the top"]
    r = clip.post("/v1/embeddings", json={"model": "clip", "input": [texts[0], data_url(img), {"text": texts[1]}, {"image": data_url(img, "JPEG")}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "clip" and [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    got = torch.tensor([d["embedding"] for d in body["data"]])
    t = cm.preprocess_texts(proc, texts)
    with torch.no_grad():
        want_t = torch.nn.functional.normalize(cm.encode_texts(model, t["input_ids"], t["attention_mask"]), dim=-1)
        want_i = torch.nn.functional.normalize(cm.encode_images(model, cm.preprocess_images(proc, [img])), dim=-1)[0]
    assert torch.allclose(got[0], want_t[0], atol=1e-5) and torch.allclose(got[2], want_t[1], atol=1e-5)
    assert torch.allclose(got[1], want_i, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(got[3], got[1], atol=1e-4)  # the JPEG round trip changes pixels, so its vector
    assert body["usage"]["prompt_tokens"] == sum(len(proc.tokenizer(x)["input_ids"]) for x in texts)
    # base64: little-endian float32 bytes of the same vector
    r64 = clip.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r64.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, got[0].numpy(), atol=1e-6)


def test_embeddings_bad_input(clip):
    big = Image.new("RGB", (2, 2))
    _err(clip.post("/v1/embeddings", json={"input": []}), 400, "input", "empty")
    _err(clip.post("/v1/embeddings", json={"input": [[1, 2, 3]]}), 400, "input.0", "token arrays")
    _err(clip.post("/v1/embeddings", json={"input": ["a", "  "]}), 400, "input.1", "empty")
    _err(clip.post("/v1/embeddings", json={"input": " ".join(["red"] * 200)}), 400, "input", "over the model's limit")
    _err(clip.post("/v1/embeddings", json={"input": [{"image": "https://example.com/x.png"}]}), 400, "input.0.image", "remote URLs")
    _err(clip.post("/v1/embeddings", json={"input": [{"image": "/etc/passwd"}]}), 400, "input.0.image", "local paths")
    _err(clip.post("/v1/embeddings", json={"input": ["data:image/png;base64,@@@@"]}), 400, "input.0", "base64")
    _err(clip.post("/v1/embeddings", json={"input": ["data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()]}), 400, "input.0", "not an image")
    _err(clip.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"}), 400, "encoding_format")
    _err(clip.post("/v1/embeddings", json={"input": "x", "model": "gpt-4"}), 404, "model", "unknown model")
    _err(clip.post("/v1/rerank", json={"query": "a", "documents": ["b"]}), 400, "model", "serves /v1/embeddings")
    assert clip.post("/v1/embeddings", json={"input": data_url(big)}).status_code == 200


# ------------------------------------------------------------------ rerank


def test_rerank_matches_the_eager_reranker_sorted_and_cut(seq, folders):
    docs = ["a red circle at the top", "a blue square", "a small green circle at the left", "large"]
    r = seq.post("/v1/rerank", json={"model": "seq_cls", "query": "a red circle", "documents": docs, "top_n": 3, "return_documents": True})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    want = _eager_scores(folders, "seq_cls", {"text": "a red circle"}, [{"text": d} for d in docs])
    prob = [1 / (1 + math.exp(-s)) for s in want]
    order = sorted(range(4), key=lambda i: -prob[i])[:3]
    assert [x["index"] for x in res] == order
    for x in res:
        assert x["relevance_score"] == pytest.approx(prob[x["index"]], abs=1e-5)
        assert x["document"] == {"text": docs[x["index"]]}
    assert len({round(p, 6) for p in prob}) > 1


def test_rerank_yesno_with_image_documents(yesno, folders):
    img = Image.new("RGB", (64, 64), (30, 200, 30))
    docs = [{"image": data_url(img)}, {"text": "a green square"}, {"text": "red", "image": data_url(img)}]
    r = yesno.post("/v1/rerank", json={"query": "a green square", "documents": docs})
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    want = _eager_scores(folders, "yesno", {"text": "a green square"}, docs, kind="yesno")
    for i, s in enumerate(want):
        assert got[i] == pytest.approx(1 / (1 + math.exp(-s)), abs=1e-5)


def test_onnx_backend_gives_the_torch_scores(folders, seq):
    onnx_client = client(folders, "seq_cls_onnx")
    assert onnx_client.get("/health").json()["backend"] == "onnx"
    body = {"query": "a blue square", "documents": ["a blue square at the top", "green", "a small red circle at the left"]}
    a = {x["index"]: x["relevance_score"] for x in seq.post("/v1/rerank", json=body).json()["results"]}
    b = {x["index"]: x["relevance_score"] for x in onnx_client.post("/v1/rerank", json={**body, "model": "seq_cls_onnx"}).json()["results"]}
    assert a.keys() == b.keys() and all(abs(a[i] - b[i]) <= 1e-5 for i in a)
    _err(onnx_client.post("/v1/rerank", json={"query": "a", "documents": [{"image": data_url(Image.new("RGB", (8, 8)))}]}), 400, "documents.0.image", "text only")


def test_rerank_bad_input_and_the_server_keeps_serving(yesno):
    ok = {"query": "a red circle", "documents": ["a red circle", "a blue square"]}
    png = io.BytesIO()
    Image.new("1", (2000, 2000)).save(png, format="PNG")  # a few KB that decode to 4 M pixels: over this server's 100 k
    bomb = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    assert len(bomb) < 10_000
    cases = [
        (dict(content=b'{"query": "a", "documents": [', headers={"content-type": "application/json"}), 400, "body", "malformed JSON"),
        (dict(content=b"[1, 2]", headers={"content-type": "application/json"}), 400, "body", "JSON object"),
        (dict(json={**ok, "model": "nope"}), 404, "model", "unknown model"),
        (dict(json={"query": "a", "documents": []}), 400, "documents", "empty"),
        (dict(json={"query": "a"}), 400, "documents", "required"),
        (dict(json={**ok, "top_n": 3}), 400, "top_n", "outside 1..2"),
        (dict(json={**ok, "top_n": 0}), 400, "top_n", ""),
        (dict(json={**ok, "top_n": "2"}), 400, "top_n", "expected int"),
        (dict(json={"query": "a", "documents": [{"image": "data:image/png;base64,not*base64"}]}), 400, "documents.0.image", "base64"),
        (dict(json={"query": "a", "documents": [{"image": "data:image/png;base64," + base64.b64encode(b"GIF89a? no").decode()}]}), 400, "documents.0.image", "not an image"),
        (dict(json={"query": "a", "documents": [{"image": bomb}]}), 400, "documents.0.image", "too large"),
        (dict(json={"query": {"image": "http://10.0.0.1/x.png"}, "documents": ["a"]}), 400, "query.image", "remote URLs"),
        (dict(json={"query": "a", "documents": [{"image": "../../secret.png"}]}), 400, "documents.0.image", "local paths"),
        (dict(json={"query": "a", "documents": [{"video": "x"}]}), 400, "documents.0", ""),
        (dict(json={"query": "a", "documents": ["a " * 2000]}), 400, "documents.0", "max_length"),
    ]
    for kwargs, status, param, words in cases:
        _err(yesno.post("/v1/rerank", **kwargs), status, param, words)
    big = b'{"query": "a", "documents": ["' + b"x" * (9 * 1024 * 1024) + b'"]}'
    _err(yesno.post("/v1/rerank", content=big, headers={"content-type": "application/json"}), 413, "body", "over the limit")
    assert yesno.post("/v1/chat/completions", json={"model": "yesno", "messages": [{"role": "user", "content": "hi"}]}).status_code == 400
    r = yesno.post("/v1/rerank", json=ok)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert yesno.get("/health").json()["status"] == "ok"
    text = yesno.get("/metrics").text
    assert 'mmdistill_requests_total{endpoint="/v1/rerank",status="400"}' in text
    assert 'mmdistill_requests_total{endpoint="/v1/rerank",status="413"}' in text


def test_api_key(folders):
    c = client(folders, "seq_cls", api_key="s3cret")
    body = {"query": "a", "documents": ["b"]}
    _err(c.post("/v1/rerank", json=body), 401, "authorization", "API key")
    _err(c.post("/v1/rerank", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert c.post("/v1/rerank", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]["id"] == "seq_cls"
    _err(c.get("/v1/models"), 401)
    assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


# ------------------------------------------------------------------ batching, cache, metrics


def _metric(app, name, **labels):
    v = app.state.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


async def _concurrent(app, bodies):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await asyncio.gather(*[c.post("/v1/rerank", json=b) for b in bodies])


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_are_micro_batched_without_changing_scores(folders, batching):
    backend = load_backend(folders / "seq_cls")
    app = create_app(backend, ServeConfig(name="m", batching=batching, max_wait_ms=100, max_batch=64, cache_size=0))
    bodies = [{"query": f"query {i} a red circle", "documents": [f"doc {i} {j} " + "blue square " * j for j in range(3)]} for i in range(12)]
    resps = asyncio.run(_concurrent(app, bodies))
    assert all(r.status_code == 200 for r in resps)
    calls, items = _metric(app, "mmdistill_batch_size_count", queue="rerank"), _metric(app, "mmdistill_batch_size_sum", queue="rerank")
    assert items == 36
    if batching:
        assert calls < 12  # several requests shared a model call
    else:
        assert calls == 12  # one model call per request
    # every request got its own scores: the same as asking alone (left padding in a bigger batch changes nothing)
    for body, r in zip(bodies[:3], resps[:3]):
        want = _eager_scores(folders, "seq_cls", {"text": body["query"]}, [{"text": d} for d in body["documents"]])
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert all(abs(got[i] - 1 / (1 + math.exp(-s))) <= 1e-5 for i, s in enumerate(want))


def test_lru_cache_answers_repeats_without_the_model(folders):
    app = create_app(load_backend(folders / "seq_cls"), ServeConfig(name="m", cache_size=8))
    c = TestClient(app)
    body = {"query": "a red circle", "documents": ["a", "b", "c"]}
    first = c.post("/v1/rerank", json=body).json()["results"]
    assert _metric(app, "mmdistill_cache_total", queue="rerank", result="miss") == 3
    second = c.post("/v1/rerank", json={**body, "documents": ["c", "a", "b", "d"]}).json()["results"]
    assert _metric(app, "mmdistill_cache_total", queue="rerank", result="hit") == 3
    assert _metric(app, "mmdistill_batch_size_sum", queue="rerank") == 4  # only "d" went to the model
    by_doc = {body["documents"][x["index"]]: x["relevance_score"] for x in first}
    for x in second:
        d = ["c", "a", "b", "d"][x["index"]]
        if d in by_doc:
            assert x["relevance_score"] == by_doc[d]
    text = c.get("/metrics").text
    assert "mmdistill_relevance_score_bucket" in text and "mmdistill_request_seconds_bucket" in text


def test_lru_cache_and_batcher_units():
    from concurrent.futures import ThreadPoolExecutor

    from mmdistill.serve.batching import LRUCache, MicroBatcher

    lru = LRUCache(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1
    lru.put("c", 3)  # evicts b, the least recently used
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3 and len(lru) == 2

    calls = []

    def fn(items):
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("model failed")
        return [x.upper() for x in items]

    async def main():
        b = MicroBatcher(fn, ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.05)
        got = await asyncio.gather(b.submit(["a", "b"]), b.submit(["c"]), b.submit(["d"]))
        assert got == [["A", "B"], ["C"], ["D"]]
        with pytest.raises(RuntimeError, match="model failed"):
            await b.submit(["boom"])
        assert await b.submit(["e"]) == ["E"]  # the worker survived the failure
        await b.close()

    asyncio.run(main())
    assert calls[0] == ["a", "b", "c", "d"]


# ------------------------------------------------------------------ chat


@pytest.fixture(scope="module")
def chat(folders):
    return client(folders, "chat", max_tokens=64)


def test_chat_completion_is_the_greedy_generation(chat, folders):
    from mmdistill.models.generative import load_vlm

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": "what shape is it?"}]}]
    r = chat.post("/v1/chat/completions", json={"model": "chat", "messages": msgs, "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    # reference: plain transformers generate on the processor's own inputs
    model, proc = load_vlm(str(folders / "chat"))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is it?"}]}], add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[img], return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**enc, max_new_tokens=8, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos in new.tolist():
        new = new[: new.tolist().index(eos) + 1]
    assert body["choices"][0]["message"]["content"] == proc.tokenizer.decode(new, skip_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == enc["input_ids"].shape[1] and body["usage"]["completion_tokens"] == len(new)
    # the same request streamed: SSE chunks that add up to the same text, then [DONE]
    with chat.stream("POST", "/v1/chat/completions", json={"model": "chat", "messages": msgs, "max_tokens": 8, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in s.iter_lines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == body["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


def _wav_b64(seconds: float, rate: int = 16000, freq: float = 440.0) -> str:
    import base64
    import wave

    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16).tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def test_chat_hears_input_audio_parts_on_an_omni_thinker(tmp_path, qwen_tok, chat):
    """OpenAI `input_audio` parts (base64 WAV) reach the Omni thinker's audio tower; the answer is plain transformers'
    greedy generation on the processor's own inputs; bad clips and audio to a model without an audio tower are 400s."""
    from mmdistill.data.audio import load_audio
    from mmdistill.models.generative import _messages, load_vlm
    from mmdistill.models.tiny import build_tiny_vlm

    build_tiny_vlm(tmp_path / "omni", [], kind="qwen3_omni_thinker", preset="vlm-nano", tokenizer=qwen_tok, seed=4,
                   overrides={"text_config.initializer_range": 0.2, "audio_config.initializer_range": 0.2})
    backend = load_backend(tmp_path / "omni")
    assert backend.audio_rate == 16000
    c = TestClient(create_app(backend, ServeConfig(name="omni", max_tokens=16, max_audio_seconds=4)))
    b64 = _wav_b64(1.3)
    part = {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
    msgs = [{"role": "user", "content": [part, {"type": "text", "text": "what shape is it?"}]}]
    r = c.post("/v1/chat/completions", json={"model": "omni", "messages": msgs, "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    model, proc = load_vlm(str(tmp_path / "omni"))
    clip = load_audio("data:audio/wav;base64," + b64, ".", sampling_rate=16000)
    text = proc.apply_chat_template(_messages("what shape is it?", 0, None, 1), add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], audio=[clip], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**enc, max_new_tokens=6, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    new = new[: new.index(eos) + 1] if eos in new else new
    assert body["choices"][0]["message"]["content"] == proc.tokenizer.decode(new, skip_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == enc["input_ids"].shape[1]
    text_only = c.post("/v1/chat/completions", json={"model": "omni", "messages": [{"role": "user", "content": "what shape is it?"}], "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"] + 10  # the clip's audio tokens
    # another clip, another prompt length: the audio is really read
    r2 = c.post("/v1/chat/completions", json={"model": "omni", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": _wav_b64(3.0, freq=880.0), "format": "wav"}}]}], "max_tokens": 1})
    assert r2.status_code == 200 and r2.json()["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]

    def bad(p, field, words):
        m = [{"role": "user", "content": [p, {"type": "text", "text": "x"}]}]
        _err(c.post("/v1/chat/completions", json={"model": "omni", "messages": m, "max_tokens": 2}), 400, field, words)

    f = "messages.0.content.0.input_audio"
    bad({"type": "input_audio", "input_audio": {"data": b64, "format": "mp3"}}, f + ".format", "only wav")
    bad({"type": "input_audio", "input_audio": {"data": "%%%not base64", "format": "wav"}}, f + ".data", "base64")
    bad({"type": "input_audio", "input_audio": {"data": _wav_b64(5.0), "format": "wav"}}, f + ".data", "too long")
    bad({"type": "input_audio", "input_audio": {"data": data_url(Image.new("RGB", (8, 8))).split(",", 1)[1], "format": "wav"}}, f + ".data", "not a PCM WAV")
    bad({"type": "input_audio", "input_audio": "x"}, f + ".data", "base64 WAV")
    _err(chat.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": [part]}], "max_tokens": 2}), 400, "messages.0.content.0", "takes no audio")
    assert c.post("/v1/chat/completions", json={"model": "omni", "messages": msgs, "max_tokens": 2}).status_code == 200  # still serving


def test_chat_bad_input(chat):
    m = [{"role": "user", "content": "hi"}]
    _err(chat.post("/v1/chat/completions", json={"messages": m}), 400, "model", "required")
    _err(chat.post("/v1/chat/completions", json={"model": "other", "messages": m}), 404, "model")
    _err(chat.post("/v1/chat/completions", json={"model": "chat", "messages": m, "max_tokens": 65}), 400, "max_tokens", "outside 1..64")
    _err(chat.post("/v1/chat/completions", json={"model": "chat", "messages": []}), 400, "messages", "empty")
    _err(chat.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "robot", "content": "x"}]}), 400, "messages.0.role")
    _err(chat.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}), 400, "messages.0.content.0.image_url.url", "remote URLs")
    _err(chat.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "a red circle " * 400}], "max_tokens": 8}), 400, "messages", "context")
    assert chat.post("/v1/chat/completions", json={"model": "chat", "messages": m, "max_tokens": 2}).status_code == 200


def test_load_backend_errors(folders, tmp_path):
    with pytest.raises(ServeError, match="no such folder"):
        load_backend(tmp_path / "missing")
    with pytest.raises(ServeError, match="export it first"):
        load_backend(folders / "clip", backend="onnx")
    with pytest.raises(ServeError, match="--backend onnx"):
        load_backend(folders / "seq_cls_onnx", backend="torch")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match="no config.json"):
        load_backend(tmp_path / "empty")


def test_handlers_count_tokens_with_their_own_tokenizer(folders):
    """A fast tokenizer's padding settings are shared state: counting tokens on the event loop while the model
    thread pads a batch made some batched calls fail (found by the soak test). The handlers use a copy."""
    import threading

    emb = load_backend(folders / "clip")
    assert emb._count_tok is not emb.processor.tokenizer
    rr = load_backend(folders / "seq_cls")
    assert rr._count_tok is not rr.reranker.tokenizer
    errors, stop = [], threading.Event()

    def model_thread():
        while not stop.is_set():
            try:
                emb.embed_texts(["a", "a red circle at the top left", "b c d"])
            except Exception as e:  # the failure this test guards against
                errors.append(e)

    t = threading.Thread(target=model_thread)
    t.start()
    try:
        for i in range(1500):
            assert emb.count_tokens(f"{i} a green circle at the left") > 0
    finally:
        stop.set()
        t.join()
    assert not errors


def test_a_model_call_over_the_timeout_is_a_504_and_the_server_goes_on():
    """A stand-in reranker backend whose first call is slow (a real model cannot be made slow on demand)."""
    import threading
    import time as _time

    class SlowScorer:
        family, backend, takes_images = "reranker", "torch", False

        class reranker:  # noqa: N801
            max_length = 512

        def __init__(self):
            self.calls = 0
            self.lock = threading.Lock()

        def prompt_tokens(self, p):
            return 10

        def score(self, pairs):
            with self.lock:
                self.calls += 1
                first = self.calls == 1
            if first:
                _time.sleep(1.0)
            return [float(len(p.doc_text)) for p in pairs]

        def score_counted(self, pairs):
            return [(s, self.prompt_tokens(p)) for s, p in zip(self.score(pairs), pairs)]

    c = TestClient(create_app(SlowScorer(), ServeConfig(name="m", timeout_s=0.3, cache_size=0)))
    _err(c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}), 504, None, "did not answer within 0.3 s")
    _time.sleep(1.0)  # the slow call finishes in the background
    r = c.post("/v1/rerank", json={"query": "q", "documents": ["a", "bbb"]})
    assert r.status_code == 200 and [x["index"] for x in r.json()["results"]] == [1, 0]


# ------------------------------------------------------------------ a teacher served beside the student


def test_teacher_beside_the_student_picked_by_model(folders):
    """The seq_cls folder as the student and the yes/no folder (another model) as its teacher: each request is
    answered by the model it names, with that model's own scores; no `model` means the student."""
    student = load_backend(folders / "seq_cls")
    teacher = load_backend(folders / "yesno", task="yesno")
    c = TestClient(create_app(student, ServeConfig(name="student", max_wait_ms=20), teacher=teacher, teacher_name="big"))
    ids = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert set(ids) == {"student", "big"} and ids["big"]["role"] == "teacher" and ids["student"]["role"] == "student"
    assert c.get("/health").json()["teacher"] == "big"
    docs = ["a red circle at the top", "a blue square", "a small green circle at the left"]
    body = {"query": "a red circle", "documents": docs}
    want = {"student": _eager_scores(folders, "seq_cls", {"text": "a red circle"}, [{"text": d} for d in docs]),
            "big": _eager_scores(folders, "yesno", {"text": "a red circle"}, [{"text": d} for d in docs], kind="yesno")}

    async def both():  # concurrent requests to both models: each batcher keeps to its own model
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=c.app), base_url="http://t") as ac:
            return await asyncio.gather(*[ac.post("/v1/rerank", json={**body, "model": m}) for m in ["student", "big"] * 3])

    for r in asyncio.run(both()):
        assert r.status_code == 200, r.text
        name = r.json()["model"]
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        for i, s in enumerate(want[name]):
            assert got[i] == pytest.approx(1 / (1 + math.exp(-s)), abs=1e-5)
    assert _metric(c.app, "mmdistill_batch_size_sum", queue="big/rerank") == 9 and _metric(c.app, "mmdistill_batch_size_sum", queue="rerank") == 9
    assert not np.allclose(want["student"], want["big"])
    r = c.post("/v1/rerank", json=body)  # no model: the student
    assert r.json()["model"] == "student"
    _err(c.post("/v1/rerank", json={**body, "model": "nope"}), 404, "model", "'student', 'big'")
    # the teacher reads images (a Qwen3-VL yes/no reranker), the seq-cls student does not
    img_doc = {"query": "a", "documents": [{"image": data_url(Image.new("RGB", (64, 64), (0, 200, 0)))}]}
    r = c.post("/v1/rerank", json={**img_doc, "model": "big"})
    assert r.status_code == 200, r.text
    _err(c.post("/v1/rerank", json={**img_doc, "model": "student"}), 400, "documents.0.image", "text only")
    with pytest.raises(ValueError, match="different names"):
        create_app(student, ServeConfig(name="x"), teacher=teacher, teacher_name="x")


# ------------------------------------------------------------------ images by URL or path (opt-in)


@pytest.fixture(scope="module")
def image_host(tmp_path_factory):
    """A loopback HTTP server: /img.png (an image), /text.txt (not an image), /big (over 1 MB), /slow (2 s), 404 else;
    and the same image on disk under a folder."""
    import http.server
    import threading
    import time as _time

    root = tmp_path_factory.mktemp("images")
    img = Image.new("RGB", (64, 64), (30, 60, 220))
    img.save(root / "img.png")
    png = (root / "img.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, status = {"/img.png": (png, 200), "/text.txt": (b"hello", 200), "/big": (b"\0" * (1_500_000), 200)}.get(self.path, (b"no", 404))
            if self.path == "/slow":
                _time.sleep(2)
                body, status = png, 200
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the server under test stopped reading (over its limit)
                pass

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", root, img
    srv.shutdown()


def test_images_by_url_or_path_only_when_enabled_and_as_the_data_url_would(folders, image_host, chat, clip, yesno):
    base, root, img = image_host
    opts = dict(allow_remote_images=True, fetch_timeout_s=0.5, max_body_bytes=1024 * 1024, image_root=str(root))

    def ask(c, url):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what shape is it?"}]}]
        return c.post("/v1/chat/completions", json={"model": "chat", "messages": msgs, "max_tokens": 6})

    want = ask(chat, data_url(img)).json()["choices"][0]["message"]["content"]
    # refused by default, with the switch to turn on named
    _err(ask(chat, f"{base}/img.png"), 400, "messages.0.content.0.image_url.url", "--allow-remote-images")
    _err(ask(chat, "img.png"), 400, "messages.0.content.0.image_url.url", "--image-root")
    open_chat = client(folders, "chat", max_tokens=64, **opts)
    for url in (f"{base}/img.png", "img.png", str(root / "img.png")):
        r = ask(open_chat, url)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
    f = "messages.0.content.0.image_url.url"
    for url, words in ((f"{base}/missing.png", "HTTP 404"), (f"{base}/text.txt", "not an image"), (f"{base}/big", "over the limit"), (f"{base}/slow", "timed out"),
                       ("../outside.png", "escapes"), ("/etc/hostname", "escapes"), ("nothere.png", "not found"), ("file:///etc/hostname", "only data:image")):
        _err(ask(open_chat, url), 400, f, words)
    assert ask(open_chat, data_url(img)).status_code == 200  # still serving
    # embeddings and rerank read them too, as their data URLs
    open_clip = client(folders, "clip", **opts)
    a = clip.post("/v1/embeddings", json={"input": [{"image": data_url(img)}]}).json()["data"][0]["embedding"]
    b = open_clip.post("/v1/embeddings", json={"input": [{"image": f"{base}/img.png"}, {"image": "img.png"}]}).json()["data"]
    assert np.allclose(a, b[0]["embedding"], atol=1e-6) and np.allclose(a, b[1]["embedding"], atol=1e-6)
    _err(clip.post("/v1/embeddings", json={"input": [{"image": f"{base}/img.png"}]}), 400, "input.0.image", "--allow-remote-images")
    # the result cache keys a path (or URL) on the pixels read, not on the string: a changed file is embedded afresh
    seen = []
    for colour in ((250, 10, 10), (10, 250, 10)):
        Image.new("RGB", (64, 64), colour).save(root / "changing.png")
        seen.append(open_clip.post("/v1/embeddings", json={"input": [{"image": "changing.png"}]}).json()["data"][0]["embedding"])
        direct = clip.post("/v1/embeddings", json={"input": [{"image": data_url(Image.new("RGB", (64, 64), colour))}]}).json()["data"][0]["embedding"]
        assert np.allclose(seen[-1], direct, atol=1e-6)
    assert not np.allclose(seen[0], seen[1], atol=1e-3)
    open_yesno = client(folders, "yesno", **opts)
    s = yesno.post("/v1/rerank", json={"query": "a blue square", "documents": [{"image": data_url(img)}]}).json()["results"][0]["relevance_score"]
    t = open_yesno.post("/v1/rerank", json={"query": "a blue square", "documents": [{"image": f"{base}/img.png"}, {"image": "img.png"}]}).json()["results"]
    assert all(abs(x["relevance_score"] - s) <= 1e-5 for x in t)
    _err(open_yesno.post("/v1/rerank", json={"query": {"image": f"{base}/missing.png"}, "documents": ["a"]}), 400, "query.image", "HTTP 404")
