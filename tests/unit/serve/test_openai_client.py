"""The official openai client against a real uvicorn server on loopback (embeddings, chat, streaming),
and httpx against the same kind of server for rerank with an API key."""

import socket
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from mmdistill.serve.app import ServeConfig, create_app
from mmdistill.serve.backends import load_backend

from .conftest import data_url


class LoopbackServer:
    """uvicorn in a thread on 127.0.0.1 and a free port."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_openai_client_embeddings(folders):
    import openai
    app = create_app(load_backend(folders / "clip"), ServeConfig(name="tiny-clip", api_key="k"))
    with LoopbackServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        img = data_url(Image.new("RGB", (32, 32), (10, 20, 200)))
        res = client.embeddings.create(model="tiny-clip", input=["a red circle", img])  # the client asks for base64 and decodes it
        assert [d.index for d in res.data] == [0, 1]
        direct = httpx.post(url + "/v1/embeddings", json={"model": "tiny-clip", "input": ["a red circle", img]}, headers={"Authorization": "Bearer k"}).json()
        for d, want in zip(res.data, direct["data"]):
            assert torch.allclose(torch.tensor(d.embedding), torch.tensor(want["embedding"]), atol=1e-6)
        assert [m.id for m in client.models.list()] == ["tiny-clip"]
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="text-embedding-3-small", input="a")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).embeddings.create(model="tiny-clip", input="a")


def test_openai_client_chat_and_stream(folders):
    import openai
    app = create_app(load_backend(folders / "chat"), ServeConfig(name="tiny-vlm", max_tokens=32))
    with LoopbackServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": [{"type": "text", "text": "what shape is it?"}, {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (64, 64), (0, 200, 0)))}}]}]
        whole = client.chat.completions.create(model="tiny-vlm", messages=msgs, max_tokens=6)
        assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens >= 1
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(model="tiny-vlm", messages=msgs, max_tokens=6, stream=True)]
        assert "".join(pieces) == whole.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-vlm", messages=msgs, max_tokens=33)
        assert "max_tokens" in str(e.value)
        # still serving after the error
        assert client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices[0].message.role == "assistant"


def test_httpx_rerank_on_a_real_server(folders):
    app = create_app(load_backend(folders / "seq_cls"), ServeConfig(name="rr"))
    with LoopbackServer(app) as url:
        r = httpx.post(url + "/v1/rerank", json={"model": "rr", "query": "a red circle", "documents": ["a", "a red circle", "b"], "top_n": 2})
        assert r.status_code == 200 and [set(x) for x in r.json()["results"]] == [{"index", "relevance_score"}] * 2
        bad = httpx.post(url + "/v1/rerank", content=b"{oops", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["family"] == "reranker"
        assert "mmdistill_batch_size_bucket" in httpx.get(url + "/metrics").text


def test_openai_client_sends_input_audio_to_an_omni_thinker(tmp_path, qwen_tok):
    """The openai client's own input_audio content part (base64 WAV) reaches a Qwen3-Omni thinker on a real server;
    the same request to a model without an audio tower is the client's BadRequestError."""
    import base64
    import io
    import wave

    import numpy as np
    import openai

    from mmdistill.models.tiny import build_tiny_vlm

    build_tiny_vlm(tmp_path / "omni", [], kind="qwen3_omni_thinker", preset="vlm-nano", tokenizer=qwen_tok, seed=5)
    t = np.arange(16000) / 16000
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16).tobytes())
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}
    app = create_app(load_backend(tmp_path / "omni"), ServeConfig(name="omni", max_tokens=8))
    with LoopbackServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        res = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": [audio, {"type": "text", "text": "Transcribe the audio."}]}], max_tokens=4)
        text_only = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "Transcribe the audio."}], max_tokens=1)
        assert res.usage.prompt_tokens > text_only.usage.prompt_tokens + 10  # one second of audio: 13 audio tokens
        assert res.choices[0].message.role == "assistant" and 1 <= res.usage.completion_tokens <= 4
        with pytest.raises(openai.BadRequestError, match="input_audio.format"):
            client.chat.completions.create(model="omni", messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio["input_audio"]["data"], "format": "mp3"}}]}], max_tokens=2)
