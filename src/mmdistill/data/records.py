"""JSONL records and line-numbered validation.

Three record kinds, one JSON object per line (blank lines are skipped):

* ``pair``   — ``{"image": str, "text": str}``: image-caption pairs (contrastive models).
* ``rerank`` — ``{"instruction"?: str, "query": item, "documents": [item, ...],
  "labels"?: [number, ...]}`` where an item is ``{"text"?: str, "image"?: str}`` with
  at least one of the two (rerankers).
* ``chat``   — ``{"image"?: str | "images"?: [str], "audio"?: str, "prompt": str, "response"?: str,
  "teacher_response"?: str, "difficulty"?: str | int, "skills"?: [str]}`` (VLMs; ``audio`` for
  models with an audio tower such as the Qwen3-Omni thinker; a record with neither image nor audio
  is a text-only chat for causal LMs).

Every kind also accepts ``"id"`` (string or integer) and ``"meta"`` (an object);
any other field is an error. Images are paths relative to the JSONL file's folder
or ``data:image/...;base64,...`` URIs (see :mod:`mmdistill.data.images`); audio clips likewise
(PCM WAV files or ``data:audio/wav;base64,...``; see :mod:`mmdistill.data.audio`).

Every problem is a :class:`RecordError` whose ``str()`` is one line,
``"{path}:{line}: {field}: {message}"``, e.g.
``train.jsonl:12: documents.2.text: expected a string, got number``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mmdistill.data.audio import DEFAULT_SAMPLING_RATE, AudioError, load_audio, resolve_audio_path
from mmdistill.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image, resolve_image_path, short_ref

__all__ = [
    "RecordError",
    "PairRecord",
    "RerankItem",
    "RerankRecord",
    "ChatRecord",
    "Record",
    "KINDS",
    "DEFAULT_INSTRUCTION",
    "detect_kind",
    "parse_record",
    "read_records",
    "check_file",
]

DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."


class RecordError(ValueError):
    """A bad record: ``str()`` is exactly ``f"{path}:{line}: {field}: {message}"``.

    ``line`` is 1-based; 0 means the file as a whole (missing, empty, ...).
    ``field`` is a dotted path into the record (``documents.2.text``), or ``json``
    for a line that is not valid JSON, or ``file`` for file-level problems.
    """

    def __init__(self, path: str | Path, line: int, field: str, message: str):
        super().__init__(path, line, field, message)  # args kept so the error pickles
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = " ".join(str(message).split())

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


# ---------------------------------------------------------------------------- schemas


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "must not be empty")
    return value


def _str_or_int(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PydanticCustomError("str_or_int", "expected a string or an integer, got {t}", {"t": _json_type(value)})
    return value


Text = Annotated[str, AfterValidator(_not_blank)]
StrOrInt = Annotated[str | int, BeforeValidator(_str_or_int)]
Label = Annotated[float, Field(allow_inf_nan=False)]


class _Record(BaseModel):
    """Fields and helpers shared by all kinds. ``line`` and ``base_dir`` are not part
    of the JSON; :func:`read_records` sets them so images can be loaded later."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: StrOrInt | None = None
    meta: dict[str, Any] | None = None

    _line: int = PrivateAttr(default=0)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def line(self) -> int:
        """1-based line number in the JSONL file (0 if built in memory)."""
        return self._line

    @property
    def base_dir(self) -> Path:
        """Folder that relative image paths are resolved against."""
        return self._base_dir

    def image_refs(self) -> list[tuple[str, str]]:
        """Every image reference as ``(field, ref)``, e.g. ``("documents.3.image", "a.png")``."""
        raise NotImplementedError

    def audio_refs(self) -> list[tuple[str, str]]:
        """Every audio reference as ``(field, ref)`` (only chat records carry audio)."""
        return []

    def open_image(self, ref: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Load one image reference of this record as RGB (raises ImageError)."""
        return load_image(ref, self._base_dir, max_pixels=max_pixels)


class PairRecord(_Record):
    """An image and its caption."""

    kind: ClassVar[str] = "pair"
    image: Text
    text: Text

    def image_refs(self) -> list[tuple[str, str]]:
        return [("image", self.image)]

    def load_image(self, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        return self.open_image(self.image, max_pixels=max_pixels)


class RerankItem(BaseModel):
    """A query or a document: text, an image, or both."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    text: Text | None = None
    image: Text | None = None

    @model_validator(mode="after")
    def _text_or_image(self) -> RerankItem:
        if self.text is None and self.image is None:
            raise PydanticCustomError("empty_item", 'needs "text" or "image" (or both)')
        return self


class RerankRecord(_Record):
    """One query with candidate documents and (optionally) graded relevance labels."""

    kind: ClassVar[str] = "rerank"
    instruction: Text = DEFAULT_INSTRUCTION
    query: RerankItem
    documents: list[RerankItem] = Field(min_length=1)
    labels: list[Label] | None = None

    @field_validator("labels")
    @classmethod
    def _labels_match_documents(cls, labels: list[float] | None, info: ValidationInfo) -> list[float] | None:
        documents = info.data.get("documents")  # absent when documents failed validation
        if labels is not None and documents is not None and len(labels) != len(documents):
            raise PydanticCustomError(
                "labels_length",
                "has {n} labels for {m} documents; give one label per document",
                {"n": len(labels), "m": len(documents)},
            )
        return labels

    def image_refs(self) -> list[tuple[str, str]]:
        refs = [("query.image", self.query.image)] if self.query.image is not None else []
        refs += [(f"documents.{i}.image", d.image) for i, d in enumerate(self.documents) if d.image is not None]
        return refs

    def load_query_image(self, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | None:
        """The query image, or None for a text-only query."""
        return None if self.query.image is None else self.open_image(self.query.image, max_pixels=max_pixels)

    def load_document_images(self, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image | None]:
        """One entry per document: its image, or None for a text-only document."""
        return [None if d.image is None else self.open_image(d.image, max_pixels=max_pixels) for d in self.documents]


class ChatRecord(_Record):
    """Image(s) and/or an audio clip (or neither, for text-only models) + prompt, with an optional reference and/or cached teacher response."""

    kind: ClassVar[str] = "chat"
    image: Text | None = None
    images: list[Text] | None = Field(default=None, min_length=1)
    audio: Text | None = None
    prompt: Text
    response: Text | None = None
    teacher_response: Text | None = None
    difficulty: StrOrInt | None = None
    skills: list[str] | None = None

    @model_validator(mode="after")
    def _one_image_field(self) -> ChatRecord:
        if self.image is not None and self.images is not None:  # neither: a text-only record (causal LMs)
            raise PydanticCustomError("image_fields", 'give exactly one of "image" (a string) or "images" (a list)')
        return self

    @property
    def image_list(self) -> list[str]:
        """The image references, in order, whichever field held them."""
        return [self.image] if self.image is not None else list(self.images or [])

    def image_refs(self) -> list[tuple[str, str]]:
        if self.image is not None:
            return [("image", self.image)]
        return [(f"images.{i}", ref) for i, ref in enumerate(self.images or [])]

    def load_images(self, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
        return [self.open_image(ref, max_pixels=max_pixels) for ref in self.image_list]

    def audio_refs(self) -> list[tuple[str, str]]:
        return [("audio", self.audio)] if self.audio is not None else []

    def load_audio(self, *, sampling_rate: int = DEFAULT_SAMPLING_RATE) -> list:
        """The record's audio clips (0 or 1) as mono float32 arrays at `sampling_rate` (raises AudioError)."""
        return [load_audio(ref, self._base_dir, sampling_rate=sampling_rate) for _, ref in self.audio_refs()]


Record = PairRecord | RerankRecord | ChatRecord
KINDS: dict[str, type[_Record]] = {"pair": PairRecord, "rerank": RerankRecord, "chat": ChatRecord}

# Fields that identify a kind, checked in this order (a chat record also has "image").
_KIND_FIELDS = [
    ("rerank", {"query", "documents", "labels", "instruction"}),
    ("chat", {"prompt", "response", "teacher_response", "images", "audio", "skills", "difficulty"}),
    ("pair", {"image", "text"}),
]


def detect_kind(obj: dict) -> str:
    """``"pair"``, ``"rerank"`` or ``"chat"`` from the fields present; ValueError if none fits."""
    keys = set(obj)
    for kind, fields in _KIND_FIELDS:
        if keys & fields:
            return kind
    raise ValueError(
        "cannot tell the record kind: expected pair {image, text}, rerank {query, documents} "
        "or chat {image|images|audio, prompt}"
    )


# ------------------------------------------------------------------------- validation


_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


# Field to report for record-level checks that are about one field.
_WHOLE_RECORD_FIELD = {"image_fields": "image"}


def _message(err: dict, kind: str) -> str:
    """Turn one pydantic error into a short message in JSON terms."""
    etype = err["type"]
    if etype == "missing":
        return "missing required field"
    if etype == "extra_forbidden":
        if len(err["loc"]) > 1:  # inside a rerank query / document
            return "unknown field (a query or document has only: text, image)"
        return f"unknown field (allowed for {kind} records: {', '.join(KINDS[kind].model_fields)})"
    if etype in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[etype]}, got {_json_type(err.get('input'))}"
    if etype == "too_short":
        return "must not be empty"
    if etype == "finite_number":
        return "must be a finite number"
    if etype == "literal_error":
        return err["msg"]
    return err["msg"].removeprefix("Value error, ")


def _validate(obj: Any, kind: str | None, path: str, line: int) -> tuple[_Record | None, list[RecordError]]:
    """Validate one parsed JSON value; return (record, []) or (None, errors)."""
    if not isinstance(obj, dict):
        return None, [RecordError(path, line, "json", f"expected a JSON object, got {_json_type(obj)}")]
    try:
        detected = detect_kind(obj)
    except ValueError as e:
        return None, [RecordError(path, line, "record", str(e))]
    if kind is not None and detected != kind:
        msg = f"looks like a {detected} record, but {kind} records are expected here"
        return None, [RecordError(path, line, "record", msg)]
    try:
        return KINDS[detected].model_validate(obj), []
    except ValidationError as e:
        errors = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or _WHOLE_RECORD_FIELD.get(err["type"], "record")
            errors.append(RecordError(path, line, field, _message(err, detected)))
        return None, errors


def _check_images(record: _Record, path: str, line: int, base_dir: Path, cache: dict) -> list[RecordError]:
    """Every image and audio clip exists and stays inside the data folder (no decoding)."""
    errors = []
    media = [(f, r, resolve_image_path) for f, r in record.image_refs()] + [(f, r, resolve_audio_path) for f, r in record.audio_refs()]
    for field, ref, resolve in media:
        key = (field == "audio", ref)
        if key not in cache:
            try:
                resolve(ref, base_dir)
                cache[key] = None
            except (ImageError, AudioError) as e:
                cache[key] = e.reason
        if cache[key] is not None:
            errors.append(RecordError(path, line, field, f"{short_ref(ref)!r}: {cache[key]}"))
    return errors


def parse_record(
    obj: Any, kind: str | None = None, *, path: str | Path = "<record>", line: int = 0, base_dir: str | Path = "."
) -> Record:
    """Validate one already-parsed record (e.g. from an HTTP request); raise the first RecordError."""
    record, errors = _validate(obj, kind, str(path), line)
    if errors:
        raise errors[0]
    record._line = line
    record._base_dir = Path(base_dir)
    return record


def read_records(
    path: str | Path,
    kind: str | None = None,
    *,
    on_error: str = "fail",
    check_images: bool = True,
    max_errors: int | None = None,
    lazy: bool = False,
) -> tuple[list[Record] | "RecordFile", list[RecordError]]:
    """Read and validate a JSONL file.

    ``kind``: "pair" | "rerank" | "chat", or None to detect it from the first
    record (every later record must then be of the same kind).
    ``on_error="fail"`` raises the first RecordError; ``"skip"`` drops bad lines and
    returns every error found (possibly several per line), raising only when more
    than ``max_errors`` errors were found or no good record is left.
    ``check_images`` checks that referenced image files exist inside the JSONL's
    folder without decoding them (corrupt images surface when loaded, or with
    :func:`check_file` ``decode_images=True``).

    Returns ``(records, errors)``; each record knows its ``line`` and ``base_dir``. ``lazy=True``: the same
    validation, but ``records`` is a :class:`RecordFile` that keeps only each good line's byte span and parses a
    record again when it is indexed (a set larger than memory).
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    name = str(path)
    records: list[Record] = []
    errors: list[RecordError] = []
    spans: list[tuple[int, int]] | None = [] if lazy else None
    good: list[tuple[int, int, int]] = []  # lazy: (offset, length, line) of each good record
    for record, errs in _scan(path, kind, check_images, spans):
        if record is not None:
            if lazy:
                good.append((*spans[-1], record.line))
                kind = record.kind
                if len(records) == 0:
                    records.append(record)  # one record kept: the "no records" check below
                spans.clear()
            else:
                records.append(record)
            continue
        if spans is not None:
            spans.clear()
        if on_error == "fail":
            raise errs[0]
        errors.extend(errs)
        if max_errors is not None and len(errors) > max_errors:
            raise RecordError(name, errs[0].line, "file", f"more than {max_errors} errors; first: {errors[0]}")
    if not records:
        if errors:
            raise RecordError(name, 0, "file", f"no valid records ({len(errors)} errors; first: {errors[0]})")
        raise RecordError(name, 0, "file", "no records (the file is empty)")
    if lazy:
        return RecordFile(path, kind, np.asarray(good, dtype=np.int64).reshape(-1, 3)), errors
    return records, errors


class RecordFile(Sequence):
    """The good records of a validated JSONL file, read on demand: in memory only an array of (byte offset, byte
    length, line number) per record (24 bytes); ``records[i]`` reads and parses line i again (``os.pread``: safe from
    several threads). A slice is another RecordFile. Made by ``read_records(..., lazy=True)``."""

    def __init__(self, path: str | Path, kind: str, spans: "np.ndarray"):
        self.path, self.kind, self.spans = Path(path), kind, spans
        self.base_dir = self.path.resolve().parent
        self._fd: int | None = None

    def __len__(self) -> int:
        return int(self.spans.shape[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RecordFile(self.path, self.kind, self.spans[i])
        offset, length, line = (int(v) for v in self.spans[i])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, length, offset)
        name = str(self.path)
        record, errs = _parse_line(raw, offset == 0, self.kind, name, line) or (None, [RecordError(name, line, "json", "a blank line")])
        if errs:
            raise RecordError(name, line, errs[0].field, f"changed since it was read: {errs[0].message}")
        record._line = line
        record._base_dir = self.base_dir
        return record

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def take(self, indices) -> "RecordFile":
        """The records at `indices` (in that order), still lazy."""
        return RecordFile(self.path, self.kind, self.spans[np.asarray(indices, dtype=np.int64)].reshape(-1, 3))

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __getstate__(self):  # picklable (worker processes reopen the file)
        return {**self.__dict__, "_fd": None}


def check_file(path: str | Path, kind: str | None = None, *, decode_images: bool = False) -> list[RecordError]:
    """Every problem in a JSONL file, in line order (for ``mmdistill data check FILE``).

    With ``decode_images=True`` every image and audio clip of every valid record is also fully
    decoded, to catch corrupt, truncated or oversized images and corrupt, empty or absurdly long
    clips. An empty list means the file is good.
    """
    records: list[Record] = []
    errors: list[RecordError] = []
    try:
        for record, errs in _scan(path, kind, check_images=True):
            if record is not None:
                records.append(record)
            errors.extend(errs)
    except RecordError as e:  # missing file, not a file
        return [e]
    if decode_images:
        decoded: dict[tuple, str | None] = {}  # (is audio, ref) -> reason it is bad, or None if fine
        for record in records:
            media = [(f, r, load_image) for f, r in record.image_refs()] + [(f, r, load_audio) for f, r in record.audio_refs()]
            for field, ref, load in media:
                key = (field == "audio", ref)
                if key not in decoded:
                    try:
                        load(ref, record.base_dir)
                        decoded[key] = None
                    except (ImageError, AudioError) as e:
                        decoded[key] = e.reason
                if decoded[key] is not None:
                    errors.append(RecordError(str(path), record.line, field, f"{short_ref(ref)!r}: {decoded[key]}"))
    errors.sort(key=lambda e: e.line)
    if not records:  # the summary goes after the per-line errors
        summary = "no valid records" if errors else "no records (the file is empty)"
        errors.append(RecordError(str(path), 0, "file", summary))
    return errors


def _parse_line(raw: bytes, first: bool, kind: str | None, name: str, line_no: int) -> tuple[Record | None, list[RecordError]] | None:
    """One JSONL line decoded, parsed and validated: ``(record, [])`` or ``(None, errors)``; None for a blank line."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return None, [RecordError(name, line_no, "json", f"not valid UTF-8 ({e.reason} at byte {e.start})")]
    if not text.strip():
        return None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        return None, [RecordError(name, line_no, "json", f"invalid JSON: {e.msg} (column {e.colno})")]
    except ValueError as e:  # NaN / Infinity
        return None, [RecordError(name, line_no, "json", str(e))]
    return _validate(obj, kind, name, line_no)


def _scan(path: str | Path, kind: str | None, check_images: bool, spans: list | None = None) -> Iterator[tuple[Record | None, list[RecordError]]]:
    """Validate a JSONL file line by line; yield ``(record, [])`` or ``(None, errors)``
    per non-blank line. Raises RecordError (line 0) if the file cannot be opened. ``spans``, when given, gets the
    (byte offset, byte length) of every line read so far (the last one is the yielded record's)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)} or None, got {kind!r}")
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise RecordError(name, 0, "file", "file not found")
    if not path.is_file():
        raise RecordError(name, 0, "file", "not a regular file")
    base_dir = path.resolve().parent
    image_cache: dict[tuple, str | None] = {}  # (is audio, ref) -> reason it is bad, or None if fine

    offset = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if spans is not None:
                spans.append((start, len(raw)))
            parsed = _parse_line(raw, line_no == 1, kind, name, line_no)
            if parsed is None:  # a blank line
                continue
            record, errs = parsed
            if record is not None and check_images:
                errs = _check_images(record, name, line_no, base_dir, image_cache)
            if errs:
                yield None, errs
                continue
            if kind is None:
                kind = record.kind  # the first good record fixes the file's kind
            record._line = line_no
            record._base_dir = base_dir
            yield record, []


def _reject_constant(token: str) -> Any:
    raise ValueError(f"invalid JSON: {token} is not allowed (use a finite number or null)")
