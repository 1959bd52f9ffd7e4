"""Each family's records with their images decoded, ready for a recipe or an evaluator.

``load_pairs`` (contrastive), ``load_rerank`` (reranker) and ``load_chat`` (generative) read a JSONL
file through ``read_records``, decode every image once, and either stop at the first bad record
(``on_error="fail"``) or skip bad ones and log how many and why. They live here, not in ``recipes/``,
because training (``recipes/``) and evaluation (``evaluate/``) both read data and neither should
import the other.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .audio import DEFAULT_SAMPLING_RATE, AudioError
from .images import ImageError
from .records import ChatRecord, RecordError, RerankRecord, read_records


class ImageCache:
    """Decoded images by (base folder, reference), least recently used dropped past `max_items`;
    ShapesWorld-sized sets fit in memory. Chat records' audio clips are kept here too, by (base
    folder, reference, sampling rate): :meth:`audio`."""

    def __init__(self, max_items: int = 50_000, source: str | None = None):
        self.max_items = max_items
        self.source = source  # the JSONL file: a bad image met while streaming is an error naming its line
        self._items: OrderedDict = OrderedDict()

    def get(self, record, ref: str):
        key = (str(record.base_dir), ref)
        img = self._items.get(key)
        if img is None:
            try:
                img = record.open_image(ref)
            except ImageError as e:
                if self.source is None:
                    raise
                field = next((f for f, r in record.image_refs() if r == ref), "image")
                raise RecordError(self.source, record.line, field, f"{e} (run `mmdistill data check` to find every bad record)") from None
            self._remember(key, img)
        else:
            self._items.move_to_end(key)
        return img

    def _remember(self, key, value) -> None:
        """Keep `value` as the most recently used item, dropping the least recently used past `max_items`."""
        self._items[key] = value
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def all(self, record) -> list:
        """Every image of a record, in order."""
        return [self.get(record, ref) for _, ref in record.image_refs()]

    def audio(self, record, sampling_rate: int = DEFAULT_SAMPLING_RATE) -> list:
        """The record's audio clips (0 or 1) as float32 arrays at `sampling_rate` (a bad clip: AudioError, or a
        RecordError naming the line when the cache knows its source file)."""
        out = []
        for field, ref in record.audio_refs():
            key = ("audio", str(record.base_dir), ref, int(sampling_rate))
            clip = self._items.get(key)
            if clip is None:
                try:
                    from .audio import load_audio

                    clip = load_audio(ref, record.base_dir, sampling_rate=sampling_rate)
                except AudioError as e:
                    if self.source is None:
                        raise
                    raise RecordError(self.source, record.line, field, f"{e} (run `mmdistill data check` to find every bad record)") from None
                self._remember(key, clip)
            else:
                self._items.move_to_end(key)
            out.append(clip)
        return out


def decode_pairs(records, source: str, workers: int = 2) -> list:
    """The images of pair records, decoded in a pool of threads; a bad one is an error naming its line."""
    from concurrent.futures import ThreadPoolExecutor

    def one(rec):
        try:
            return rec.load_image()
        except ImageError as e:
            raise RecordError(source, rec.line, "image", f"{e} (run `mmdistill data check` to find every bad record)") from None

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, records))


def _report(path: Path, kept: list, errors: list[RecordError], log) -> None:
    """Log the skipped records by field (the part before the first dot); no usable record is an error."""
    if errors:
        reasons: dict[str, int] = {}
        for e in errors:
            field = e.field.split(".")[0]
            reasons[field] = reasons.get(field, 0) + 1
        log(f"{path}: skipped {len(errors)} bad records ({', '.join(f'{k}: {v}' for k, v in reasons.items())}); first: {errors[0]}")
    if not kept:
        raise RecordError(str(path), 0, "file", "no usable records")


def _image_field(rec, e: ImageError) -> str:
    """The field of the record's image that failed (e.g. documents.3.image), else "image"."""
    return next((field for field, ref in rec.image_refs() if ref in str(e)), "image")


def load_pairs(path: Path, on_error: str, max_records: int | None = None, log=print, *, decode: bool = True):
    """Pair records and their decoded images: ``(records, images, errors)``; with ``decode=False`` images is None (the
    files were only checked to exist: a streaming run decodes them per batch)."""
    records, errors = read_records(path, "pair", on_error=on_error, lazy=not decode)
    if not decode:  # a RecordFile: line offsets in memory, each record parsed again when a batch needs it
        kept = records[:max_records] if max_records is not None else records
        _report(path, kept, errors, log)
        return kept, None, errors
    images, kept = [], []
    for rec in records:
        if max_records is not None and len(kept) >= max_records:
            break
        try:
            images.append(rec.load_image())
            kept.append(rec)
        except ImageError as e:
            err = RecordError(str(path), rec.line, "image", str(e))
            if on_error == "fail":
                raise err from None
            errors.append(err)
    _report(path, kept, errors, log)
    return kept, images, errors


def load_rerank(path: Path, on_error: str, max_records: int | None, cache: ImageCache, log=print, *, decode: bool = True) -> tuple[list[RerankRecord], list[RecordError]]:
    """Rerank records with every image decoded into `cache` (``decode=False``: only checked to exist): ``(records, errors)``."""
    records, errors = read_records(path, "rerank", on_error=on_error, lazy=not decode)
    kept: list[RerankRecord] = []
    if not decode:  # streaming: every record's images were checked to exist; keep the lazy RecordFile
        kept = records[:max_records] if max_records is not None else records
        _report(path, kept, errors, log)
        return kept, errors
    for rec in records:
        if max_records is not None and len(kept) >= max_records:
            break
        try:
            cache.all(rec)
            kept.append(rec)
        except ImageError as e:
            err = RecordError(str(path), rec.line, _image_field(rec, e), str(e))
            if on_error == "fail":
                raise err from None
            errors.append(err)
    _report(path, kept, errors, log)
    return kept, errors


def load_chat(path: Path, response_field: str | None, on_error: str, max_records: int | None, images: ImageCache, log=print, *, decode: bool = True) -> tuple[list[ChatRecord], list[RecordError]]:
    """Chat records with their images (and audio clips, at 16 kHz) decoded into `images` (``decode=False``: only checked
    to exist); a record without the target text (`response_field`) or with a bad image or clip fails or is skipped:
    ``(records, errors)``."""
    records, errors = read_records(path, "chat", on_error=on_error, lazy=not decode)
    kept: list[ChatRecord] = []
    good: list[int] = []  # streaming: the indices of the kept records in the lazy RecordFile
    for i, rec in enumerate(records):
        if max_records is not None and len(good) >= max_records:
            break
        err = None
        if response_field is not None and not getattr(rec, response_field):
            hint = " (run `mmdistill teacher generate` first for black-box KD)" if response_field == "teacher_response" else ""
            err = RecordError(str(path), rec.line, response_field, f"missing: training needs the target text{hint}")
        else:
            try:
                if decode:
                    images.all(rec)
                    images.audio(rec)
            except ImageError as e:
                err = RecordError(str(path), rec.line, rec.image_refs()[0][0] if rec.image_refs() else "image", str(e))
            except AudioError as e:
                err = RecordError(str(path), rec.line, "audio", str(e))
        if err is not None:
            if on_error == "fail":
                raise err
            errors.append(err)
            continue
        good.append(i)
        if decode:
            kept.append(rec)
    if not decode:
        kept = records.take(good)
    _report(path, kept, errors, log)
    return kept, errors
