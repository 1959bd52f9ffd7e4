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
