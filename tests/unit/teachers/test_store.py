"""The store's pieces without models: content keys, atomic shards and journals, resume, verify, sampled sets."""

import json

import pytest
import torch
from PIL import Image

from mmdistill.data.records import read_records
from mmdistill.teachers.cache import _sampled
from mmdistill.teachers.store import RecordKeys, StoreError, StoreWriter, TeacherStore, identity_differences, verify

HEADER = {"family": "contrastive", "teacher": {"model": "t", "config_sha256": "a", "tokenizer_sha256": "b"}, "settings": {"dtype": "fp32"}, "constants": {}}


def test_keys_follow_content_not_file_names_or_position(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "copy.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    rows = [{"image": "a.png", "text": "red", "id": 1}, {"image": "copy.png", "text": "red", "id": 2, "meta": {"x": 1}}, {"image": "b.png", "text": "red"}, {"image": "a.png", "text": "Red"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, _ = read_records(tmp_path / "p.jsonl")
    k = [RecordKeys().key(r) for r in recs]
    assert k[0] == k[1]  # same bytes and text: same record, whatever its file name, id or position
    assert len({k[0], k[2], k[3]}) == 3  # other image bytes, other text


def test_writer_commits_shards_atomically_and_resumes(tmp_path):
    w = StoreWriter(tmp_path, HEADER, shard_records=2)
    for i in range(5):
        w.add(f"k{i}", {"x": torch.full((3,), float(i))})
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 2 and "k4" in w.pending  # the 5th waits for a full shard
    # a killed run: a shard renamed but never entered in the journal, and a half-written temporary
    (tmp_path / "shard-r0-000009.safetensors").write_bytes(b"junk")
    (tmp_path / "shard-r0-000010.safetensors.tmp").write_bytes(b"junk")
    assert any("not in any journal" in p for p in verify(tmp_path))
    w2 = StoreWriter(tmp_path, HEADER, shard_records=2)
    assert w2.done == {"k0", "k1", "k2", "k3"} and not (tmp_path / "shard-r0-000009.safetensors").exists()
    w2.add("k3", {"x": torch.zeros(3)})  # already stored: ignored
    w2.add("k4", {"x": torch.full((3,), 4.0)})
    w2.close()
    assert verify(tmp_path) == []
    st = TeacherStore(tmp_path)
    assert len(st) == 5 and torch.equal(st.get("k4")["x"], torch.full((3,), 4.0)) and torch.equal(st.get("k1")["x"], torch.ones(3))
    with pytest.raises(StoreError, match="holds signals made otherwise .*teacher"):
        StoreWriter(tmp_path, {**HEADER, "teacher": {"model": "u"}})


def test_identity_differences_name_what_differs():
    a = {"model": "x", "config_sha256": "c1", "tokenizer_sha256": "t1"}
    assert identity_differences(a, {"model": "y", "config_sha256": "c1", "tokenizer_sha256": "t1"}) == []  # same files, another path
    assert identity_differences(a, {"model": "y", "config_sha256": "c2", "tokenizer_sha256": "t2"}) == ["config (store c1, y c2)", "tokenizer / processor (store t1, y t2)"]
    assert identity_differences({"model": "Qwen/A"}, {"model": "Qwen/B"}) == ["model (store Qwen/A, recipe Qwen/B)"]


def test_sampled_set_is_distinct_ids_with_counts():
    lp = torch.log_softmax(torch.randn(2, 3, 50) * 3, dim=-1)
    ids, counts = _sampled(lp, 16, torch.Generator().manual_seed(0))
    assert ids.shape == counts.shape == (2, 3, 16) and counts.dtype == torch.uint8
    for row_ids, row_c in zip(ids.view(-1, 16), counts.view(-1, 16)):
        assert len(set(row_ids.tolist())) == 16  # distinct ids (the padding ids carry count 0)
        assert int(row_c.sum()) == 16
    # over many draws the frequencies approach the teacher's probabilities
    lp1 = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), dim=-1).expand(4000, 4)
    ids, counts = _sampled(lp1, 8, torch.Generator().manual_seed(1))  # 8 draws over 4 ids: width 4
    freq = torch.zeros(4).index_add_(0, ids.flatten(), counts.flatten().float() / 8) / 4000
    assert torch.allclose(freq, lp1[0].exp(), atol=0.01)
    assert _sampled(lp1[:2], 300, torch.Generator().manual_seed(1))[1].dtype == torch.int32  # counts past uint8


def test_a_disk_that_fills_mid_write_leaves_the_store_valid(tmp_path, monkeypatch):
    import errno

    import mmdistill.teachers.store as store_mod

    w = StoreWriter(tmp_path, HEADER, shard_records=2)
    for i in range(2):
        w.add(f"k{i}", {"x": torch.full((3,), float(i))})
    real = store_mod.save_file

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")  # the write got this far before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "save_file", full_disk)
    w.add("k2", {"x": torch.zeros(3)})
    with pytest.raises(OSError, match="No space left"):
        w.add("k3", {"x": torch.zeros(3)})
    assert verify(tmp_path) == [] and len(TeacherStore(tmp_path)) == 2  # valid up to the last complete shard
    monkeypatch.setattr(store_mod, "save_file", real)
    w2 = StoreWriter(tmp_path, HEADER, shard_records=2)  # the next run clears the partial file and goes on
    assert not list(tmp_path.glob("*.tmp")) and w2.done == {"k0", "k1"}
    w2.add("k2", {"x": torch.zeros(3)})
    w2.add("k3", {"x": torch.zeros(3)})
    assert verify(tmp_path) == [] and len(TeacherStore(tmp_path)) == 4


def test_not_a_store_and_a_lying_manifest(tmp_path):
    with pytest.raises(StoreError, match="not a teacher store"):
        TeacherStore(tmp_path)
    w = StoreWriter(tmp_path / "s", HEADER, shard_records=1)
    w.add("k0", {"x": torch.zeros(2)})
    journal = tmp_path / "s/shards-r0.json"
    data = json.loads(journal.read_text())
    data["shards"][0]["sha256"] = "0" * 64
    journal.write_text(json.dumps(data))
    assert any("sha256 differs" in p for p in verify(tmp_path / "s"))


def test_cache_progress_logs_rate_and_eta_when_not_a_terminal():
    from mmdistill.teachers.cache import CacheProgress

    lines, now = [], [0.0]
    bar = CacheProgress(100, lines.append, every_s=10.0)
    bar._clock = lambda: now[0]
    bar.t0 = bar.last = 0.0
    now[0] = 5.0
    bar.advance(20, tokens=400)  # 5 s: under the interval, nothing printed
    assert lines == []
    now[0] = 10.0
    bar.advance(20, tokens=400)  # 40 records in 10 s
    assert lines == ["teacher cache: 40/100 records, 4.0 records/s, 80 tokens/s, ETA 15 s"]
    now[0] = 12.0
    bar.advance(60)  # the end is always logged
    assert lines[-1].startswith("teacher cache: 100/100 records") and "ETA 0 s" in lines[-1]
    quiet = CacheProgress(10, lines.append, show=False)
    quiet.advance(10)
    assert len(lines) == 2


def test_keys_hash_audio_bytes_and_ignore_empty_fields(tmp_path):
    import wave

    for name, level in (("a.wav", 1000), ("copy.wav", 1000), ("b.wav", 2000)):
        with wave.open(str(tmp_path / name), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes((torch.full((1600,), level, dtype=torch.int16)).numpy().tobytes())
    rows = [{"audio": "a.wav", "prompt": "Transcribe.", "response": "x"}, {"audio": "copy.wav", "prompt": "Transcribe.", "response": "x"},
            {"audio": "b.wav", "prompt": "Transcribe.", "response": "x"}, {"prompt": "Transcribe.", "response": "x", "teacher_response": None}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, _ = read_records(tmp_path / "c.jsonl")
    keys = RecordKeys()
    k = [keys.key(r) for r in recs]
    assert k[0] == k[1] and len({k[0], k[2], k[3]}) == 3  # a clip counts by its bytes
    # a field the record leaves empty is not part of it: the same as the record without the field
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "Transcribe.", "response": "x"}) + "\n")
    assert keys.key(read_records(tmp_path / "d.jsonl")[0][0]) == k[3]
