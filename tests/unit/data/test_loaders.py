"""The family loaders: eager (images decoded into the cache) and streaming (a lazy RecordFile) keep the same records."""

import json

import pytest
from PIL import Image

from mmdistill.data.loaders import ImageCache, load_chat, load_pairs, load_rerank
from mmdistill.data.records import RecordError, RecordFile


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    return tmp_path


def write(folder, name, rows):
    p = folder / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_streaming_chat_keeps_the_same_records_lazily(folder):
    rows = [{"image": "a.png", "prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    rows[2] = {"image": "a.png", "prompt": "q2"}  # no response: skipped (or fatal) in both modes
    p = write(folder, "chat.jsonl", rows)
    eager, e_err = load_chat(p, "response", "skip", None, ImageCache(), log=lambda *_: None)
    lazy, l_err = load_chat(p, "response", "skip", None, ImageCache(), log=lambda *_: None, decode=False)
    assert isinstance(lazy, RecordFile) and [str(e) for e in l_err] == [str(e) for e in e_err]
    assert [(r.line, r.prompt) for r in lazy] == [(r.line, r.prompt) for r in eager] == [(1, "q0"), (2, "q1"), (4, "q3"), (5, "q4")]
    few, _ = load_chat(p, "response", "skip", 2, ImageCache(), log=lambda *_: None, decode=False)
    assert [r.line for r in few] == [1, 2]
    with pytest.raises(RecordError, match="chat.jsonl:3: response: missing"):
        load_chat(p, "response", "fail", None, ImageCache(), log=lambda *_: None, decode=False)


def test_streaming_pairs_and_rerank_are_lazy_and_decode_later(folder):
    p = write(folder, "pairs.jsonl", [{"image": "a.png", "text": "red"}, {"image": "bad.png", "text": "broken"}])
    records, images, errors = load_pairs(p, "fail", log=lambda *_: None, decode=False)
    assert isinstance(records, RecordFile) and images is None and len(records) == 2  # the corrupt image is found per batch
    with pytest.raises(RecordError, match="pairs.jsonl:2"):
        load_pairs(p, "fail", log=lambda *_: None)  # eager decoding finds it up front
    r = write(folder, "rr.jsonl", [{"query": {"text": "red"}, "documents": [{"image": "a.png"}, {"text": "blue"}], "labels": [1, 0]}] * 3)
    lazy, _ = load_rerank(r, "fail", 2, ImageCache(), log=lambda *_: None, decode=False)
    assert isinstance(lazy, RecordFile) and [x.line for x in lazy] == [1, 2]
