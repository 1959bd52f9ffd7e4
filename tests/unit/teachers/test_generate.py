"""Teacher generation: a tiny real Qwen3-VL, a fake OpenAI server, resumable generate_file."""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from mmdistill.data.records import read_records
from mmdistill.teachers import generate as tg
from mmdistill.teachers.generate import Generation, LocalGenerator, ServedGenerator, TeacherError, generate_file

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
PROMPTS = [
    "Describe the image.",
    "What colour is the square?",
    "How many coloured shapes are there in this picture?",
    "Is there a circle?",
    "What shape is at the top left of the image?",
    "Describe the image in detail.",
]
TEXTS = PROMPTS + [f"a {c} {s}" for c in COLOURS for s in ("circle", "square")]


def _write_data(folder, n=6, *, ids=True, difficulty=None, extra=None):
    """n chat records in folder/data.jsonl, images in folder/images/; returns the path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for c in names:
        Image.new("RGB", (64, 64), COLOURS[c]).save(folder / "images" / f"{c}.png")
    lines = []
    for i in range(n):
        rec = {"image": f"images/{names[i % len(names)]}.png", "prompt": PROMPTS[i % len(PROMPTS)]}
        if ids:
            rec["id"] = f"r{i}"
        if difficulty and i in difficulty:
            rec["difficulty"] = difficulty[i]
        lines.append(json.dumps(rec))
    for line in extra or []:
        lines.append(line if isinstance(line, str) else json.dumps(line))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


# ------------------------------------------------------------------------------ LocalGenerator


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from mmdistill.models.tiny import build_tiny_vlm

    d = tmp_path_factory.mktemp("tiny-qwen3-vl")
    model, proc = build_tiny_vlm(None, TEXTS, kind="qwen3_vl", preset="vlm-nano")
    # a freshly initialised nano model repeats one token whatever the prompt; larger random
    # weights make the answer depend on the image and the prompt (and sometimes stop early)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    path = _write_data(tmp_path_factory.mktemp("data"), n=6)
    records, _ = read_records(path, "chat")
    return records, [r.load_images() for r in records]


def test_local_generator_answers_each_record(tiny_teacher, local_data):
    records, images = local_data
    gen = LocalGenerator(tiny_teacher, max_new_tokens=8, batch_size=4)
    outs = gen(records, images)
    assert len(outs) == len(records) and all(isinstance(o, Generation) for o in outs)
    for o in outs:
        assert 1 <= o.n_tokens <= 8
        assert o.mean_logprob is not None and o.mean_logprob <= 0
        assert o.finish_reason in ("stop", "length")
        assert len(o.token_ids) == o.n_tokens
        assert (o.finish_reason == "stop") == (o.token_ids[-1] in gen._eos_ids)
    assert len({o.text for o in outs}) > 1  # answers depend on the input
    # timing / throughput for evaluation
    assert gen.total_samples == len(records)
    assert gen.total_tokens == sum(o.n_tokens for o in outs)
    assert gen.last_batch_seconds > 0 and gen.total_seconds >= gen.last_batch_seconds


def test_local_mean_logprob_matches_teacher_forced_forward(tiny_teacher, local_data):
    records, images = local_data
    gen = LocalGenerator(tiny_teacher, max_new_tokens=8, batch_size=4)
    for rec, imgs in list(zip(records, images))[:3]:
        (out,) = gen([rec], [imgs])
        enc = gen.encode([rec], [imgs])
        L, n = enc["input_ids"].shape[1], out.n_tokens
        new = torch.tensor([out.token_ids])
        inputs = dict(enc)
        inputs["input_ids"] = torch.cat([enc["input_ids"], new], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(new)], 1)
        with torch.no_grad():
            logits = gen.model(**inputs).logits[0, L - 1 : L + n - 1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, new[0, :, None]).squeeze(-1)
        assert torch.equal(logits.argmax(-1), new[0])  # greedy
        assert torch.allclose(logp.mean(), torch.tensor(out.mean_logprob), atol=1e-4)


def test_local_left_padded_batch_matches_one_by_one(tiny_teacher, local_data):
    records, images = local_data
    records, images = records[:3], images[:3]
    gen = LocalGenerator(tiny_teacher, max_new_tokens=8, batch_size=3)
    enc = gen.encode(records, images)
    mask = enc["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # prompts differ in length: left padding
    batched = gen(records, images)
    single = [gen([r], [im])[0] for r, im in zip(records, images)]
    assert [o.text for o in batched] == [o.text for o in single]
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    for a, b in zip(batched, single):
        assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-4)


def test_local_generator_missing_model(tmp_path):
    with pytest.raises(TeacherError, match="cannot load model"):
        LocalGenerator(tmp_path / "nope")


def test_generate_file_with_local_teacher(tiny_teacher, tmp_path):
    data = _write_data(tmp_path / "data", n=4, difficulty={0: "hard"})
    out = tmp_path / "teacher.jsonl"
    gen = LocalGenerator(tiny_teacher, max_new_tokens=6, batch_size=3)
    summary = generate_file(gen, data, out, log=lambda m: None)
    assert summary["written"] == 4 and summary["failed"] == 0
    records, _ = read_records(out, "chat")  # valid chat records, images resolve from out's folder
    assert [r.id for r in records] == ["r0", "r1", "r2", "r3"]
    assert records[0].image == "data/images/red.png" and records[0].load_images()[0].size == (64, 64)
    assert records[0].difficulty == "hard"
    for r in records:
        t = r.meta["teacher"]
        assert t["model"] == str(tiny_teacher) and t["n_tokens"] <= 6 and t["mean_logprob"] <= 0
        assert t["finish_reason"] in ("stop", "length")
        assert r.teacher_response is not None or t["n_tokens"] >= 1


# ------------------------------------------------------------------------- fake OpenAI server


class _FakeOpenAI:
    """chat/completions on 127.0.0.1: a canned answer with log-probs. ``fail_first`` calls get
    HTTP 503, ``hang_first`` calls hang (until the client times out); a prompt containing
    BAD gets a permanent 400."""

    ANSWER = "a red circle"
    LOGPROBS = [-0.1, -0.2, -0.3]

    def __init__(self):
        self.calls = 0
        self.fail_first = 0
        self.hang_first = 0
        self.logprobs = True
        self.bodies = []
        self.images_ok = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.calls += 1
                    n = fake.calls
                    fake.bodies.append(body)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if n <= fake.hang_first:
                    fake.release.wait(5)
                    return
                if n <= fake.hang_first + fake.fail_first:
                    return self._send(503, {"error": {"message": "server overloaded"}})
                content = body["messages"][0]["content"]
                prompt = next(p["text"] for p in content if p["type"] == "text")
                if "BAD" in prompt:
                    return self._send(400, {"error": {"message": "prompt rejected by policy"}})
                fake.images_ok.append(all(_is_png_data_url(p["image_url"]["url"]) for p in content if p["type"] == "image_url")
                                      and any(p["type"] == "image_url" for p in content))
                choice = {"index": 0, "message": {"role": "assistant", "content": " " + fake.ANSWER + " "}, "finish_reason": "stop"}
                if fake.logprobs and body.get("logprobs"):
                    choice["logprobs"] = {"content": [{"token": t, "logprob": lp} for t, lp in zip(("a", " red", " circle"), fake.LOGPROBS)]}
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice],
                                 "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _is_png_data_url(url):
    prefix = "data:image/png;base64,"
    if not url.startswith(prefix):
        return False
    Image.open(io.BytesIO(base64.b64decode(url[len(prefix):]))).load()
    return True


@pytest.fixture
def fake_server():
    s = _FakeOpenAI()
    yield s
    s.close()


def _rec_and_images(tmp_path, prompts=("Describe the image.",)):
    path = _write_data(tmp_path, n=len(prompts))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for obj, p in zip(lines, prompts):
        obj["prompt"] = p
    path.write_text("".join(json.dumps(o) + "\n" for o in lines))
    records, _ = read_records(path, "chat")
    return path, records, [r.load_images() for r in records]


def test_served_generator_answers_with_logprobs(fake_server, tmp_path):
    _, records, images = _rec_and_images(tmp_path, ("Describe the image.", "What colour?"))
    with ServedGenerator(fake_server.url, "teacher-x", max_new_tokens=16, backoff=0.01, concurrency=2) as gen:
        outs = gen(records, images)
    assert [o.text for o in outs] == ["a red circle"] * 2
    assert outs[0].mean_logprob == pytest.approx(-0.2) and outs[0].n_tokens == 3 and outs[0].finish_reason == "stop"
    assert fake_server.images_ok == [True, True]
    body = fake_server.bodies[0]
    assert body["model"] == "teacher-x" and body["max_tokens"] == 16 and body["logprobs"] is True and body["temperature"] == 0.0


def test_served_generator_without_logprobs(fake_server, tmp_path):
    fake_server.logprobs = False
    _, records, images = _rec_and_images(tmp_path)
    with ServedGenerator(fake_server.url, "m", backoff=0.01) as gen:
        (out,) = gen(records, images)
    assert out.mean_logprob is None and out.n_tokens == 3  # from usage


def test_served_generator_retries_503_then_succeeds(fake_server, tmp_path):
    fake_server.fail_first = 2
    _, records, images = _rec_and_images(tmp_path)
    with ServedGenerator(fake_server.url, "m", retries=4, backoff=0.01) as gen:
        (out,) = gen(records, images)
    assert out.text == "a red circle" and fake_server.calls == 3


def test_served_generator_gives_up_after_retries(fake_server, tmp_path):
    fake_server.fail_first = 10
    _, records, images = _rec_and_images(tmp_path)
    with ServedGenerator(fake_server.url, "m", retries=3, backoff=0.01) as gen:
        with pytest.raises(TeacherError) as e:
            gen(records, images)
    msg = str(e.value)
    assert msg == f"POST {fake_server.url}/chat/completions: HTTP 503 after 3 tries: server overloaded"
    assert fake_server.calls == 3


def test_served_generator_retries_a_hang(fake_server, tmp_path):
    fake_server.hang_first = 1
    _, records, images = _rec_and_images(tmp_path)
    with ServedGenerator(fake_server.url, "m", timeout=0.5, retries=3, backoff=0.01) as gen:
        (out,) = gen(records, images)
    assert out.text == "a red circle" and fake_server.calls == 2


def test_served_generator_does_not_retry_400(fake_server, tmp_path):
    _, records, images = _rec_and_images(tmp_path, ("BAD prompt",))
    with ServedGenerator(fake_server.url, "m", retries=4, backoff=0.01) as gen:
        with pytest.raises(TeacherError, match=r"HTTP 400: prompt rejected by policy$"):
            gen(records, images)
    assert fake_server.calls == 1


def test_served_generator_connection_refused(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    _, records, images = _rec_and_images(tmp_path)
    with ServedGenerator(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.01) as gen:
        with pytest.raises(TeacherError, match=r"connection error .* after 2 tries"):
            gen(records, images)


def test_generate_file_served_failure_goes_to_failed_file(fake_server, tmp_path):
    data, _, _ = _rec_and_images(tmp_path / "d", ("Describe the image.", "BAD prompt", "What colour?"))
    out = tmp_path / "d" / "teacher.jsonl"
    with ServedGenerator(fake_server.url, "teacher-x", retries=3, backoff=0.01, concurrency=2) as gen:
        summary = generate_file(gen, data, out, log=lambda m: None)
        assert summary["written"] == 2 and summary["failed"] == 1
        failed = _lines(out.with_name("teacher.failed.jsonl"))
        assert len(failed) == 1 and failed[0]["line"] == 2 and failed[0]["id"] == "r1"
        assert failed[0]["error"].startswith(f"{data}:2: teacher: POST ")
        assert "HTTP 400: prompt rejected by policy" in failed[0]["error"]
        assert fake_server.calls == 3  # the 400 was asked once
        written = _lines(out)
        assert [o["id"] for o in written] == ["r0", "r2"]
        assert written[0]["image"] == "images/red.png"  # same folder: paths unchanged
        assert written[0]["meta"]["teacher"]["model"] == "teacher-x"
        assert written[0]["meta"]["teacher"]["mean_logprob"] == pytest.approx(-0.2)
        # a rerun retries only the failed record, and it is listed once
        summary = generate_file(gen, data, out, log=lambda m: None)
    assert summary == {**summary, "written": 0, "skipped_existing": 2, "failed": 1}
    assert fake_server.calls == 4
    assert len(_lines(out.with_name("teacher.failed.jsonl"))) == 1


# ------------------------------------------------------------------------------ generate_file


class _FakeTeacher:
    """Answers "answer to <prompt>" with a per-prompt log-prob; raises KeyboardInterrupt (a kill)
    once it has answered `kill_after` records; fails records whose prompt contains FAIL."""

    name = "fake-teacher"

    def __init__(self, logprobs=None, kill_after=None, batch_size=3):
        self.logprobs = logprobs or {}
        self.kill_after = kill_after
        self.batch_size = batch_size
        self.answered = 0
        self.seen = []

    def __call__(self, records, images):
        assert all(len(im) >= 1 and im[0].size == (64, 64) for im in images)
        if any("FAIL" in r.prompt for r in records):
            raise RuntimeError("CUDA out of memory (fake)")
        out = []
        for r in records:
            if self.kill_after is not None and self.answered >= self.kill_after:
                raise KeyboardInterrupt
            self.answered += 1
            self.seen.append(r.prompt)
            out.append(Generation(f"answer to {r.prompt}", self.logprobs.get(r.prompt, -0.05), 5, "stop"))
        return out


def _all_keys(out):
    rejected, _ = tg.side_paths(out)
    return [o["meta"]["teacher"]["key"] for o in _lines(out) + _lines(rejected)]


def test_generate_file_resume_after_kill(tmp_path):
    prompts = [f"question number {i}?" for i in range(10)]
    data = tmp_path / "data.jsonl"
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "images" / "a.png")
    # half the records have no id (keyed by line + hash)
    data.write_text("".join(json.dumps({"image": "images/a.png", "prompt": p, **({"id": i} if i % 2 else {})}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "teacher.jsonl"
    lows = {prompts[1]: -2.0, prompts[6]: -1.5}
    logs = []

    with pytest.raises(KeyboardInterrupt):
        generate_file(_FakeTeacher(lows, kill_after=4), data, out, min_logprob=-1.0, log=logs.append)
    assert len(_all_keys(out)) == 3  # the first batch of 3 is on disk; the batch in flight is lost
    assert any("interrupted" in m for m in logs)

    # a second kill, after a torn write
    with pytest.raises(KeyboardInterrupt):
        generate_file(_FakeTeacher(lows, kill_after=3), data, out, min_logprob=-1.0, log=logs.append)
    assert len(_all_keys(out)) == 6
    with out.open("ab") as f:
        f.write(b'{"image": "images/a.png", "prompt": "question num')  # killed mid-line

    logs.clear()
    teacher = _FakeTeacher(lows)
    summary = generate_file(teacher, data, out, min_logprob=-1.0, log=logs.append)
    assert any("torn last line" in m for m in logs)
    assert summary["skipped_existing"] == 6 and summary["written"] + summary["rejected"] == 4
    assert sorted(teacher.seen) == sorted(prompts[6:])  # only the rest was asked

    keys = _all_keys(out)
    assert len(keys) == len(set(keys)) == 10
    records, _ = read_records(data, "chat")
    assert set(keys) == {tg.record_key(r) for r in records}
    assert out.read_bytes().endswith(b"\n")
    rejected = _lines(tg.side_paths(out)[0])
    assert sorted(o["prompt"] for o in rejected) == sorted([prompts[1], prompts[6]])
    assert all("mean_logprob" in o["meta"]["teacher"]["reject_reason"] for o in rejected)
    # nothing left: a fourth run does nothing
    summary = generate_file(_FakeTeacher(lows), data, out, min_logprob=-1.0, log=lambda m: None)
    assert summary["written"] == summary["rejected"] == summary["failed"] == 0 and summary["skipped_existing"] == 10


def test_generate_file_difficulty_derived_or_kept(tmp_path):
    data = _write_data(tmp_path, n=4, difficulty={3: "expert"})
    lp = {PROMPTS[0]: -0.05, PROMPTS[1]: -0.3, PROMPTS[2]: -0.9, PROMPTS[3]: -3.0}
    out = tmp_path / "t.jsonl"
    generate_file(_FakeTeacher(lp), data, out, log=lambda m: None)
    got = {o["id"]: o for o in _lines(out)}
    assert [got[f"r{i}"]["difficulty"] for i in range(4)] == ["easy", "medium", "hard", "expert"]
    o = got["r0"]
    assert o["teacher_response"] == f"answer to {PROMPTS[0]}"
    assert o["meta"]["teacher"] == {"mean_logprob": -0.05, "n_tokens": 5, "model": "fake-teacher", "finish_reason": "stop", "key": 'id:"r0"'}
    # thresholds are parameters
    generate_file(_FakeTeacher(lp), data, out, overwrite=True, difficulty_thresholds=(-0.01, -1.0), log=lambda m: None)
    got = {o["id"]: o for o in _lines(out)}
    assert [got[f"r{i}"]["difficulty"] for i in range(4)] == ["medium", "medium", "medium", "expert"]


def test_generate_file_overwrite_starts_over(tmp_path):
    data = _write_data(tmp_path, n=5)
    out = tmp_path / "t.jsonl"
    generate_file(_FakeTeacher(), data, out, log=lambda m: None)
    again = generate_file(_FakeTeacher(), data, out, log=lambda m: None)
    assert again["written"] == 0 and again["skipped_existing"] == 5
    teacher = _FakeTeacher()
    fresh = generate_file(teacher, data, out, overwrite=True, log=lambda m: None)
    assert fresh["written"] == 5 and fresh["skipped_existing"] == 0 and len(teacher.seen) == 5
    assert len(_lines(out)) == 5


def test_generate_file_failures_are_recorded_not_dropped(tmp_path):
    data = _write_data(tmp_path, n=3, extra=[
        {"id": "corrupt", "image": "images/broken.png", "prompt": "Describe the image."},
        {"id": "oom", "image": "images/red.png", "prompt": "FAIL here"},
        '{"id": "bad", "image": 3, "prompt": "an image field that is not a string"}',
    ])
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "t.jsonl"
    with pytest.raises(Exception, match=r"data.jsonl:6: image"):
        generate_file(_FakeTeacher(), data, out, log=lambda m: None)  # on_error="fail": invalid line stops first
    summary = generate_file(_FakeTeacher(batch_size=4), data, out, on_error="skip", log=lambda m: None)
    assert summary["written"] == 3 and summary["failed"] == 3 and summary["invalid"] == 1
    failed = {f["line"]: f for f in _lines(tg.side_paths(out)[1])}
    assert failed[4]["error"].startswith(f"{data}:4: image: 'images/broken.png': corrupt")
    assert failed[4]["id"] == "corrupt"
    assert failed[5]["error"] == f"{data}:5: teacher: CUDA out of memory (fake)"
    assert failed[6]["error"].startswith(f"{data}:6: image")
    assert sorted(o["id"] for o in _lines(out)) == ["r0", "r1", "r2"]  # the batch neighbours of the failure survive


def test_generate_file_image_paths(tmp_path):
    data = _write_data(tmp_path / "a" / "data")
    # output in a parent folder: paths rewritten, and they resolve
    out = tmp_path / "a" / "t.jsonl"
    generate_file(_FakeTeacher(), data, out, limit=2, log=lambda m: None)
    records, _ = read_records(out, "chat")
    assert [r.image for r in records] == ["data/images/red.png", "data/images/green.png"]
    assert records[1].load_images()[0].getpixel((0, 0)) == COLOURS["green"]
    # output beside the data folder: the images would lie outside it -> refused before any work
    with pytest.raises(TeacherError, match="outside the output's folder"):
        generate_file(_FakeTeacher(), data, tmp_path / "b" / "t.jsonl", log=lambda m: None)
    with pytest.raises(TeacherError, match="is the input file"):
        generate_file(_FakeTeacher(), data, data, log=lambda m: None)


def test_generate_file_repeated_ids_are_not_lost(tmp_path):
    data = _write_data(tmp_path, n=3)
    text = data.read_text().replace('"r1"', '"r0"')
    data.write_text(text)
    out = tmp_path / "t.jsonl"
    s = generate_file(_FakeTeacher(), data, out, log=lambda m: None)
    assert s["written"] == 3
    assert sorted(o["meta"]["teacher"]["key"] for o in _lines(out)) == ['id:"r0"', 'id:"r0"#2', 'id:"r2"']
    assert generate_file(_FakeTeacher(), data, out, log=lambda m: None)["skipped_existing"] == 3


def test_generate_file_stops_when_everything_fails(tmp_path):
    fails = [{"id": f"f{i}", "image": "images/red.png", "prompt": "FAIL always"} for i in range(5)]
    data = _write_data(tmp_path, n=3, extra=fails)
    out = tmp_path / "t.jsonl"
    with pytest.raises(TeacherError, match=r"stopped: the last 3 records failed \(CUDA out of memory \(fake\)\)"):
        generate_file(_FakeTeacher(batch_size=2), data, out, max_consecutive_failures=3, log=lambda m: None)
    # the records answered before the streak are kept; the failures are listed for a rerun
    assert [o["id"] for o in _lines(out)] == ["r0", "r1", "r2"]
    assert [f["id"] for f in _lines(tg.side_paths(out)[1])] == ["f0", "f1", "f2"]
