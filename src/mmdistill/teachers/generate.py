"""Teacher generation: answer chat records with a big VLM, resumably, into a new JSONL file.

Two generators share one interface, ``generator(records, images) -> list[Generation]``:

* :class:`LocalGenerator` runs a Hugging Face image-text-to-text model (Qwen3-VL, Qwen2.5-VL,
  Qwen3-VL-MoE, the Qwen3-Omni thinker, ...) in this process: left-padded batches, greedy or
  sampled ``generate()``, mean log-prob of the generated tokens. The evaluation code reuses it
  (``last_batch_seconds``, ``total_tokens``, ``total_samples``, ``total_seconds`` give latency and
  throughput).
* :class:`ServedGenerator` asks an OpenAI-compatible server (vLLM, SGLang, TGI, ...) at
  ``{base_url}/chat/completions``, images sent inline as base64 PNG data URLs, with retries
  and a thread pool.

:func:`generate_file` reads chat records, asks the generator in batches and appends each
finished record (the input record, image paths rewritten for the output's folder, plus
``teacher_response``, ``difficulty`` and ``meta.teacher``) to the output, low-confidence ones to
``<out>.rejected.jsonl`` and failures to ``<out>.failed.jsonl``. Every line is flushed and the
files fsynced after each batch, so a killed run loses at most the batch in flight; running it
again skips every record already written (each carries its key in ``meta.teacher.key``) and
retries the failed ones. A torn last line (a kill in the middle of a write) is cut away on restart.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.images import ImageError, short_ref
from ..data.records import ChatRecord, RecordError, read_records

__all__ = [
    "Generation",
    "TeacherError",
    "LocalGenerator",
    "ServedGenerator",
    "generate_file",
    "record_key",
    "derive_difficulty",
    "side_paths",
    "DEFAULT_DIFFICULTY_THRESHOLDS",
]

DEFAULT_DIFFICULTY_THRESHOLDS = (-0.1, -0.5)


class TeacherError(RuntimeError):
    """A teacher failure with a one-line message (HTTP error after retries, generation error, ...)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class Generation:
    """One teacher answer.

    ``mean_logprob``: mean natural-log probability of the generated tokens under the model
    (None when the server returns no log-probs). ``n_tokens``: generated tokens, the closing
    end-of-sequence token included when there was one. ``finish_reason``: ``"stop"`` (the model
    ended its answer) or ``"length"`` (cut at ``max_new_tokens``), or what the server said.
    ``token_ids``: the generated ids (those ``n_tokens``) when generated locally, else None.
    """

    text: str
    mean_logprob: float | None
    n_tokens: int
    finish_reason: str | None = None
    token_ids: list[int] | None = field(default=None, repr=False)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


# =============================================================================== local model


class LocalGenerator:
    """Generate with a local image-text-to-text model (hub id or folder).

    ``gen(records, images)`` answers chat records (anything with ``.prompt``) given their loaded
    images (one list of PIL images per record), ``batch_size`` records per ``generate()`` call,
    and returns one :class:`Generation` per record, in order.

    Greedy when ``temperature == 0``. ``mean_logprob`` is computed from the model's raw logits
    (log-softmax at temperature 1, before any sampling warper), over the generated tokens up to
    and including the first end-of-sequence token.

    Timing, for evaluation: ``last_batch_seconds`` (wall time of the last ``generate()`` batch),
    ``last_call_seconds`` (of the last ``__call__``), and running totals ``total_seconds``,
    ``total_samples``, ``total_tokens`` (generated tokens) -> ms/sample and tokens/s.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        temperature: float = 0.0,
        device: str | None = None,
        trust_remote_code: bool = False,
    ):
        import torch

        from ..models.generative import load_vlm

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.name = str(model_path)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.temperature = float(temperature)
        try:
            model, processor = load_vlm(self.name, trust_remote_code=trust_remote_code)
        except FileNotFoundError as e:
            raise TeacherError(str(e)) from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:  # left padding needs a pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Qwen-VL's generate() needs mm_token_type_ids; the Omni thinker's rejects it.
        self._accepted = set(inspect.signature(self.model.forward).parameters)
        self._eos_ids = self._find_eos_ids()
        self._image_token = getattr(processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        self.last_batch_seconds = 0.0
        self.last_call_seconds = 0.0
        self.total_seconds = 0.0
        self.total_samples = 0
        self.total_tokens = 0

    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
            if t in self.tokenizer.get_vocab():
                ids.add(self.tokenizer.convert_tokens_to_ids(t))
        return ids

    def prompt_text(self, prompt: str, n_images: int, n_audio: int = 0) -> str:
        """The chat-template text for one user turn (images, then audio clips, first) with the generation prompt."""
        from ..models.generative import _messages

        return self.processor.apply_chat_template(_messages(prompt, n_images, None, n_audio), add_generation_prompt=True, tokenize=False)

    def encode(self, records: Sequence, images: Sequence[Sequence]) -> dict:
        """The left-padded model inputs for `records` (tensors on the model's device); a record's audio clip is read
        from its file at the processor's sampling rate (a model without an audio tower: TeacherError naming it)."""
        import torch

        from ..data.audio import AudioError
        from ..models.generative import audio_sampling_rate, has_audio_tower

        if len(records) != len(images):
            raise ValueError(f"{len(records)} records but {len(images)} image lists")
        texts, flat, clips = [], [], []
        rate = audio_sampling_rate(self.processor)
        for rec, imgs in zip(records, images):
            imgs = list(imgs or [])
            auds: list = []
            if getattr(rec, "audio", None) is not None:
                if rate is None or not has_audio_tower(self.model):
                    raise TeacherError(f"the record carries audio but the model {self.name!r} ({type(self.model).__name__}) has no audio tower")
                try:
                    auds = rec.load_audio(sampling_rate=rate)
                except AudioError as e:
                    raise TeacherError(str(e)) from None
            clips.extend(auds)
            text = self.prompt_text(rec.prompt, len(imgs), len(auds))
            if self._image_token and text.count(self._image_token) != len(imgs):
                raise TeacherError(
                    f"{len(imgs)} image(s) but the chat template places {text.count(self._image_token)} "
                    f"image placeholder(s) (does the prompt contain {self._image_token!r}?)"
                )
            texts.append(text)
            flat.extend(imgs)
        bos = self.tokenizer.bos_token
        add = not (bos is not None and texts[0].startswith(bos))  # templates that write the BOS themselves
        audio = {"audio": clips, "sampling_rate": rate} if clips else {}
        enc = self.processor(  # a text-only model's processor is its tokenizer: no images argument
            text=texts, **({"images": flat} if flat else {}), padding=True, padding_side="left", return_tensors="pt", add_special_tokens=add, **audio
        )
        return {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def __call__(self, records: Sequence, images: Sequence[Sequence]) -> list[Generation]:
        """One Generation per record; raises TeacherError if a batch cannot be generated."""
        if len(records) != len(images):
            raise ValueError(f"{len(records)} records but {len(images)} image lists")
        t0 = time.perf_counter()
        out: list[Generation] = []
        for i in range(0, len(records), self.batch_size):
            out += self._batch(records[i : i + self.batch_size], images[i : i + self.batch_size])
        self.last_call_seconds = time.perf_counter() - t0
        return out

    def _batch(self, records: Sequence, images: Sequence[Sequence]) -> list[Generation]:
        import torch

        try:
            enc = self.encode(records, images)
        except TeacherError:
            raise
        except (ValueError, TypeError, IndexError, RuntimeError) as e:  # processor placeholder/image mismatch
            raise TeacherError(f"cannot encode the prompt: {_first_line(e)}") from None
        inputs = {k: v for k, v in enc.items() if k in self._accepted}
        sample = self.temperature > 0
        kwargs: dict[str, Any] = dict(
            do_sample=sample,
            max_new_tokens=self.max_new_tokens,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if sample:
            kwargs["temperature"] = self.temperature
        else:  # silence "temperature is set but do_sample=False" for models with sampling defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():  # not inference_mode: torchao's quantized MoE expert tensors cannot be indexed under it
                res = self.model.generate(**inputs, **kwargs)
        except (ValueError, TypeError, IndexError, RuntimeError) as e:
            raise TeacherError(f"generation failed: {_first_line(e)}") from None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        prompt_len = enc["input_ids"].shape[1]
        new = res.sequences[:, prompt_len:]
        steps = getattr(res, "logits", None) or res.scores  # raw logits when the model returns them
        logits = torch.stack(list(steps), dim=1).float()  # [B, N, V]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, new[:, : logits.shape[1], None]).squeeze(-1)
        gens = []
        for b in range(new.shape[0]):
            ids = new[b].tolist()
            n = len(ids)
            finish = "length"
            for j, t in enumerate(ids):
                if t in self._eos_ids:
                    n, finish = j + 1, "stop"
                    break
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            mean = float(logp[b, :n].mean()) if n else None
            gens.append(Generation(text=text, mean_logprob=mean, n_tokens=n, finish_reason=finish, token_ids=ids[:n]))
        self.last_batch_seconds = seconds
        self.total_seconds += seconds
        self.total_samples += len(gens)
        self.total_tokens += sum(g.n_tokens for g in gens)
        return gens


# ============================================================================== served model


def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short_body(resp) -> str:
    """The server's error message (OpenAI-style error.message when present), one line, short."""
    text = resp.text or ""
    try:
        data = json.loads(text)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
        elif isinstance(data, dict) and data.get("detail"):
            text = str(data["detail"])
    except ValueError:
        pass
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


class ServedGenerator:
    """Generate with an OpenAI-compatible server (``POST {base_url}/chat/completions``).

    Images go inline as ``data:image/png;base64,...`` ``image_url`` parts; ``logprobs: true`` is
    asked for and ``mean_logprob`` is their mean (None when the server returns none).
    Timeouts, connection errors, HTTP 429 and 5xx are retried with exponential backoff
    (``backoff * 2**k`` seconds, or the server's Retry-After when shorter than 30 s); other 4xx
    are not. ``retries`` is the number of tries in all. Up to ``concurrency`` requests run at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        timeout: float = 60,
        retries: int = 4,
        backoff: float = 0.5,
        concurrency: int = 4,
    ):
        import httpx

        self.base_url = str(base_url).rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.name = model
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.retries = max(1, int(retries))
        self.backoff = float(backoff)
        self.concurrency = max(1, int(concurrency))
        self.batch_size = 2 * self.concurrency  # records per generate_file batch
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers)
        self.last_call_seconds = 0.0
        self.total_samples = 0
        self.total_tokens = 0

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServedGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def payload(self, prompt: str, images: Sequence) -> dict:
        """The chat/completions request body for one record."""
        content = [{"type": "image_url", "image_url": {"url": _png_data_url(im)}} for im in images]
        content.append({"type": "text", "text": prompt})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "logprobs": True,
        }

    def _post(self, body: dict) -> dict:
        import httpx

        last = ""
        for attempt in range(1, self.retries + 1):
            wait = self.backoff * 2 ** (attempt - 1)
            try:
                resp = self._client.post(self.url, json=body)
            except httpx.TimeoutException as e:
                last = f"timed out ({type(e).__name__})"
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__}: {_first_line(e)})"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        raise TeacherError(f"POST {self.url}: the answer is not JSON: {_short_body(resp)}") from None
                if resp.status_code != 429 and resp.status_code < 500:
                    raise TeacherError(f"POST {self.url}: HTTP {resp.status_code}: {_short_body(resp)}")
                last = f"HTTP {resp.status_code}"
                body_text = _short_body(resp)
                if body_text:
                    last += f" ... {body_text}"
                retry_after = resp.headers.get("retry-after")
                try:
                    if retry_after is not None and 0 <= float(retry_after) < 30:
                        wait = max(wait, float(retry_after))
                except ValueError:
                    pass
            if attempt < self.retries:
                time.sleep(wait)
        status, _, detail = last.partition(" ... ")
        msg = f"POST {self.url}: {status} after {self.retries} tries"
        raise TeacherError(msg + (f": {detail}" if detail else ""))

    def generate_one(self, prompt: str, images: Sequence) -> Generation:
        data = self._post(self.payload(prompt, images))
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
            content = message.get("content")
            if isinstance(content, list):  # some servers answer with parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if content is None:
                content = ""
            lp = ((choice.get("logprobs") or {}).get("content")) or []
            values = [float(t["logprob"]) for t in lp if isinstance(t, dict) and t.get("logprob") is not None]
            values = [v for v in values if math.isfinite(v)]
            mean = sum(values) / len(values) if values else None
            n = len(lp) if lp else int(((data.get("usage") or {}).get("completion_tokens")) or 0)
            return Generation(text=str(content).strip(), mean_logprob=mean, n_tokens=n, finish_reason=choice.get("finish_reason"))
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise TeacherError(f"POST {self.url}: unexpected answer ({type(e).__name__}: {_first_line(e)})") from None

    def __call__(self, records: Sequence, images: Sequence[Sequence], *, return_exceptions: bool = False) -> list:
        """One Generation per record (requests in parallel). With ``return_exceptions=True`` a
        record that failed gets its TeacherError in the list instead of raising."""
        if len(records) != len(images):
            raise ValueError(f"{len(records)} records but {len(images)} image lists")
        t0 = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(records))))
        try:
            futures = [pool.submit(self.generate_one, r.prompt, list(im or [])) for r, im in zip(records, images)]
            out: list = []
            for f in futures:
                try:
                    out.append(f.result())
                except TeacherError as e:
                    if not return_exceptions:
                        raise
                    out.append(e)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C must not wait for in-flight requests
        self.last_call_seconds = time.perf_counter() - t0
        done = [g for g in out if isinstance(g, Generation)]
        self.total_samples += len(done)
        self.total_tokens += sum(g.n_tokens for g in done)
        return out


# ============================================================================ generate_file


def side_paths(out_path: str | Path) -> tuple[Path, Path]:
    """``(<out>.rejected.jsonl, <out>.failed.jsonl)`` next to the output (``teacher.jsonl`` ->
    ``teacher.rejected.jsonl``)."""
    out = Path(out_path)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".rejected.jsonl"), out.with_name(stem + ".failed.jsonl")


def record_key(record: ChatRecord) -> str:
    """The resume key of an input record: ``id:<id as JSON>`` (so 5 and "5" differ), or
    ``line:<n>:<hash of the record>`` for records without an id."""
    if record.id is not None:
        return "id:" + json.dumps(record.id)
    body = json.dumps(record.model_dump(exclude_unset=True), sort_keys=True, ensure_ascii=False)
    return f"line:{record.line}:{hashlib.sha1(body.encode()).hexdigest()[:12]}"


def derive_difficulty(mean_logprob: float | None, thresholds: tuple[float, float] = DEFAULT_DIFFICULTY_THRESHOLDS) -> str | None:
    """``easy`` if mean_logprob >= thresholds[0], ``medium`` if >= thresholds[1], else ``hard``
    (None without a log-prob)."""
    if mean_logprob is None:
        return None
    easy, medium = thresholds
    return "easy" if mean_logprob >= easy else "medium" if mean_logprob >= medium else "hard"


def _read_done(path: Path, log: Callable[[str], Any]) -> list[dict]:
    """The JSON objects of an output-side file; a torn or unreadable LAST line is cut away
    (a kill in the middle of a write); a bad line elsewhere is an error."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    keep_bytes = len(data)
    if lines and lines[-1] != b"":  # no final newline: the last write was torn
        keep_bytes = len(data) - len(lines[-1])
        log(f"{path}: cut a torn last line ({len(lines[-1])} bytes) left by an interrupted run")
        lines = lines[:-1]
    else:
        lines = lines[:-1]
    objs: list[dict] = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines):  # a complete but garbled last line: treat as torn too
                keep_bytes = len(b"\n".join(lines[:-1])) + (1 if len(lines) > 1 else 0)
                log(f"{path}: cut an unreadable last line ({_first_line(e)}) left by an interrupted run")
                break
            raise TeacherError(f"{path}:{i}: not a line this tool wrote ({_first_line(e)}); fix it or start over with --overwrite") from None
        objs.append(obj)
    if keep_bytes != len(data):
        with path.open("r+b") as f:
            f.truncate(keep_bytes)
            f.flush()
            os.fsync(f.fileno())
    return objs


def _done_key(obj: dict) -> str | None:
    teacher = (obj.get("meta") or {}).get("teacher") if isinstance(obj.get("meta"), dict) else None
    if isinstance(teacher, dict) and isinstance(teacher.get("key"), str):
        return teacher["key"]
    if isinstance(obj.get("key"), str):  # failed-file lines
        return obj["key"]
    if "id" in obj and obj["id"] is not None:
        return "id:" + json.dumps(obj["id"])
    return None


def _rewrite_ref(ref: str, base_dir: Path, out_dir: Path) -> str:
    if ref[:5].lower() == "data:" or base_dir == out_dir:
        return ref
    return Path(os.path.relpath(base_dir / ref, out_dir)).as_posix()


def _out_record(record: ChatRecord, gen: Generation, *, key: str, model: str, out_dir: Path, thresholds) -> dict:
    obj = record.model_dump(exclude_unset=True)
    base = record.base_dir
    if record.image is not None:
        obj["image"] = _rewrite_ref(record.image, base, out_dir)
    elif record.images is not None:
        obj["images"] = [_rewrite_ref(r, base, out_dir) for r in record.images]
    if record.audio is not None:
        obj["audio"] = _rewrite_ref(record.audio, base, out_dir)
    obj["teacher_response"] = gen.text
    if record.difficulty is None:
        derived = derive_difficulty(gen.mean_logprob, thresholds)
        if derived is not None:
            obj["difficulty"] = derived
    meta = dict(record.meta or {})
    meta["teacher"] = {
        "mean_logprob": gen.mean_logprob,
        "n_tokens": gen.n_tokens,
        "model": model,
        "finish_reason": gen.finish_reason,
        "key": key,
    }
    obj["meta"] = meta
    return obj


class _Appender:
    """Append JSON lines; ``sync()`` flushes and fsyncs (after each batch)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = None

    def write(self, obj: dict) -> None:
        if self._f is None:
            self._f = self.path.open("ab")
        self._f.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")

    def sync(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self.sync()
            self._f.close()
            self._f = None


def _accepts_return_exceptions(generator) -> bool:
    try:
        return "return_exceptions" in inspect.signature(generator).parameters
    except (TypeError, ValueError):
        return False


def _run_batch(generator, records: list, images: list) -> list:
    """Generations (or exceptions) per record; a batch that fails as a whole is retried one by
    one so that one bad record does not fail its neighbours. KeyboardInterrupt propagates."""
    try:
        if _accepts_return_exceptions(generator):
            outs = list(generator(records, images, return_exceptions=True))
        else:
            outs = list(generator(records, images))
        if len(outs) != len(records):
            raise TeacherError(f"the generator returned {len(outs)} answers for {len(records)} records")
        return outs
    except Exception as e:  # noqa: BLE001 - any generator failure is recorded per record
        if len(records) == 1:
            return [e]
        return [_run_batch(generator, [r], [im])[0] for r, im in zip(records, images)]


def generate_file(
    generator: Callable,
    data_path: str | Path,
    out_path: str | Path,
    *,
    min_logprob: float | None = None,
    difficulty_thresholds: tuple[float, float] = DEFAULT_DIFFICULTY_THRESHOLDS,
    on_error: str = "fail",
    overwrite: bool = False,
    limit: int | None = None,
    batch_size: int | None = None,
    max_consecutive_failures: int | None = 200,
    log: Callable[[str], Any] = print,
    log_every: float = 10.0,
) -> dict:
    """Answer every chat record of `data_path` with `generator`; append the results to `out_path`.

    Resumable: records whose key (:func:`record_key`) is already in the output or the rejects
    file are skipped; failed ones are retried. ``overwrite=True`` deletes the three files first.
    ``min_logprob``: records whose mean token log-prob is below it go to ``<out>.rejected.jsonl``
    (with ``meta.teacher.reject_reason``) instead of the output. ``difficulty_thresholds``: see
    :func:`derive_difficulty` (used only for records without a ``difficulty``).
    ``on_error``: "fail" stops on the first invalid input line (before generating anything);
    "skip" writes invalid lines to the failed file and goes on. Images that cannot be loaded and
    generation failures always go to ``<out>.failed.jsonl`` (``error`` = one line, ``line`` =
    input line). ``limit``: only the first `limit` input records. ``batch_size``: records per
    generator call (default: the generator's ``batch_size``, else 8).
    ``max_consecutive_failures``: stop with TeacherError after that many records failed in a row
    (a server that is down; the finished records are kept and a rerun resumes), None = never.
    ``log_every``: seconds between progress lines.

    Returns ``{"written", "skipped_existing", "rejected", "failed", "seconds", ...}``.
    KeyboardInterrupt propagates after the finished batches are safely on disk.
    """
    t0 = time.perf_counter()
    data_path, out_path = Path(data_path), Path(out_path)
    rejected_path, failed_path = side_paths(out_path)
    if out_path.resolve() == data_path.resolve():
        raise TeacherError(f"--out {out_path} is the input file; write the teacher answers to a new file")
    if min_logprob is not None and not math.isfinite(min_logprob):
        raise ValueError(f"min_logprob must be a finite number or None, got {min_logprob}")
    easy, medium = difficulty_thresholds
    if not easy >= medium:
        raise ValueError(f"difficulty_thresholds must be (easy, medium) with easy >= medium, got {difficulty_thresholds}")
    batch_size = int(batch_size or getattr(generator, "batch_size", None) or 8)
    model_name = str(getattr(generator, "name", None) or type(generator).__name__)

    records, bad = read_records(data_path, "chat", on_error=on_error)
    if limit is not None:
        records = records[: max(0, int(limit))]
        if records:
            bad = [e for e in bad if e.line <= records[-1].line]

    out_dir = out_path.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    # an image path rewritten for the output's folder must stay inside it, or read_records refuses it
    for rec in records:
        for fld, ref in rec.image_refs():
            new = _rewrite_ref(ref, rec.base_dir, out_dir)
            if new.startswith("../") or new == "..":
                raise TeacherError(
                    f"{data_path}:{rec.line}: {fld}: {short_ref(ref)!r} lies outside the output's folder {str(out_dir)!r} "
                    "(records may only name images inside their own folder); write --out in the data folder or one of its parents"
                )

    if overwrite:
        for p in (out_path, rejected_path, failed_path):
            if p.exists():
                p.unlink()
                log(f"removed {p} (--overwrite)")

    # keys, in input order; a repeated id gets #2, #3, ... so no record shadows another
    keys: list[str] = []
    seen: dict[str, int] = {}
    for rec in records:
        k = record_key(rec)
        seen[k] = seen.get(k, 0) + 1
        keys.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
    dupes = sum(1 for v in seen.values() if v > 1)
    if dupes:
        log(f"{data_path}: {dupes} id(s) repeat; repeats are keyed by occurrence (keep the file's order to resume)")

    done = {_done_key(o) for o in _read_done(out_path, log)} | {_done_key(o) for o in _read_done(rejected_path, log)}
    done.discard(None)
    old_failed = _read_done(failed_path, log)
    bad_keys = {f"line:{e.line}" for e in bad}
    todo = [(rec, k) for rec, k in zip(records, keys) if k not in done]
    work = {k for _, k in todo} | bad_keys
    # failed entries of records retried now are dropped (they come back if they fail again)
    kept_failed = [o for o in old_failed if _done_key(o) not in work and _done_key(o) not in done]
    if old_failed or failed_path.exists():
        tmp = failed_path.with_name(failed_path.name + ".tmp")
        with tmp.open("wb") as f:
            for o in kept_failed:
                f.write(json.dumps(o, ensure_ascii=False).encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, failed_path)
        if len(kept_failed) != len(old_failed):
            log(f"retrying {len(old_failed) - len(kept_failed)} record(s) that failed before")
    skipped = len(records) - len(todo)
    if skipped:
        log(f"{out_path}: {skipped} of {len(records)} record(s) already done; resuming")

    out_w, rej_w, fail_w = _Appender(out_path), _Appender(rejected_path), _Appender(failed_path)
    stats = {"written": 0, "skipped_existing": skipped, "rejected": 0, "failed": 0, "invalid": 0}
    warned_no_logprob = False
    streak = [0, ""]  # records failed in a row, last error
    last_log = time.perf_counter()

    def fail(rec_line: int, key: str | None, rec_id, error: str) -> None:
        obj = {"key": key, "line": rec_line, "error": error}
        if rec_id is not None:
            obj["id"] = rec_id
        fail_w.write(obj)
        stats["failed"] += 1

    try:
        for e in bad:  # invalid input lines (on_error="skip")
            fail(e.line, f"line:{e.line}", None, str(e))
            stats["invalid"] += 1
        fail_w.sync()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            ready: list[tuple[ChatRecord, str, list]] = []
            for rec, key in chunk:
                try:
                    ready.append((rec, key, rec.load_images()))
                except ImageError as e:
                    fld = next((f for f, r in rec.image_refs() if r == e.ref), "image")
                    fail(rec.line, key, rec.id, str(RecordError(data_path, rec.line, fld, f"{short_ref(e.ref)!r}: {e.reason}")))
            if ready:
                outs = _run_batch(generator, [r for r, _, _ in ready], [im for _, _, im in ready])
                for (rec, key, _), gen in zip(ready, outs):
                    if not isinstance(gen, Generation):
                        err = _first_line(gen) if isinstance(gen, BaseException) else f"the generator returned {type(gen).__name__}"
                        fail(rec.line, key, rec.id, f"{data_path}:{rec.line}: teacher: {err}")
                        streak[0] += 1
                        streak[1] = err
                        continue
                    streak[0] = 0
                    obj = _out_record(rec, gen, key=key, model=model_name, out_dir=out_dir, thresholds=difficulty_thresholds)
                    if min_logprob is not None and gen.mean_logprob is None and not warned_no_logprob:
                        log("the teacher returns no log-probs: min_logprob cannot reject anything")
                        warned_no_logprob = True
                    if min_logprob is not None and gen.mean_logprob is not None and gen.mean_logprob < min_logprob:
                        obj["meta"]["teacher"]["reject_reason"] = f"mean_logprob {gen.mean_logprob:.4f} < min_logprob {min_logprob}"
                        rej_w.write(obj)
                        stats["rejected"] += 1
                    else:
                        out_w.write(obj)
                        stats["written"] += 1
            for w in (out_w, rej_w, fail_w):
                w.sync()
            n_done = start + len(chunk)
            if max_consecutive_failures is not None and streak[0] >= max_consecutive_failures:
                raise TeacherError(
                    f"stopped: the last {streak[0]} records failed ({streak[1]}); {stats['written']} written so far "
                    f"are kept in {out_path}; fix the teacher and run again to resume"
                )
            now = time.perf_counter()
            if n_done == len(todo) or now - last_log >= log_every:
                last_log = now
                log(f"{n_done}/{len(todo)} records: {stats['written']} written, {stats['rejected']} rejected, {stats['failed']} failed")
    except KeyboardInterrupt:
        log(f"interrupted: finished records are saved in {out_path}; run the same command again to resume")
        raise
    finally:
        for w in (out_w, rej_w, fail_w):
            w.close()
        if failed_path.exists() and failed_path.stat().st_size == 0:
            failed_path.unlink()
    stats["seconds"] = time.perf_counter() - t0
    stats["out"] = str(out_path)
    if stats["rejected"]:
        stats["rejected_path"] = str(rejected_path)
    if stats["failed"]:
        stats["failed_path"] = str(failed_path)
        log(f"{stats['failed']} record(s) failed; see {failed_path} (a rerun retries them)")
    return stats
