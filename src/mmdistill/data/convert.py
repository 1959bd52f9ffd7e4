"""Data users already have, turned into mmdistill records (``mmdistill data import``).

Sources:
- ``llava``: LLaVA-style conversation JSON (a list, or JSONL) of ``{"image": path | [paths], "conversations":
  [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}`` -> chat records,
  one per human/gpt exchange of the first turn (later turns are counted and reported, not silently kept or lost);
- ``parquet`` / ``arrow`` files and Hugging Face ``datasets`` folders (``save_to_disk``), read with the ``datasets``
  library -> pair records (``image``, ``text``) or chat records (``image``, ``prompt``, ``response``), with a column
  mapping (``--map text=caption``). Image columns may hold a path, encoded bytes, a ``{"bytes", "path"}`` dict
  (the datasets Image feature) or a decoded image.

Images are copied (or written from their bytes) into ``OUT/images/`` under a name made of their content hash, so
the output folder is self-contained and identical images are stored once. A row that cannot be converted is
written to ``OUT/<name>.rejected.jsonl`` with the reason (nothing is lost), and with ``on_error="fail"`` the first
one stops the import with a line naming the source, the row and the field.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from .records import RecordError

FORMATS = ("llava", "parquet", "arrow", "hf")
KIND_FIELDS = {"pair": ("image", "text"), "chat": ("image", "prompt", "response")}
IMAGE_TOKEN = "<image>"


def detect_format(src: Path) -> str:
    if src.is_dir():
        if (src / "dataset_info.json").is_file() or (src / "dataset_dict.json").is_file() or (src / "state.json").is_file():
            return "hf"
        raise RecordError(str(src), 0, "source", "a folder that is not a Hugging Face datasets folder (no dataset_info.json / dataset_dict.json)")
    suffix = src.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    if suffix in (".json", ".jsonl"):
        return "llava"
    raise RecordError(str(src), 0, "source", f"unknown format {suffix!r}; give --format ({', '.join(FORMATS)})")


class _Images:
    """Writes each distinct image once into OUT/images/, named by its content hash; returns the record's reference."""

    def __init__(self, out: Path):
        self.dir = out / "images"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = out

    def _write(self, data: bytes) -> str:
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "PNG").lower()
                im.verify()
        except Exception as e:
            raise ValueError(f"not a readable image ({type(e).__name__})") from None
        name = f"{hashlib.sha256(data).hexdigest()[:20]}.{'jpg' if fmt == 'jpeg' else fmt}"
        path = self.dir / name
        if not path.exists():
            tmp = path.with_name(name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return f"images/{name}"

    def add(self, value: Any, base: Path) -> str:
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            value = value["bytes"] or value["path"]
        if isinstance(value, (bytes, bytearray)):
            return self._write(bytes(value))
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.convert("RGB").save(buf, format="PNG")
            return self._write(buf.getvalue())
        if isinstance(value, str) and value:
            path = (base / value).expanduser()
            if not path.is_file():
                raise ValueError(f"{value!r}: image file not found (relative paths are taken from {base})")
            return self._write(path.read_bytes())
        raise ValueError(f"expected an image path, bytes or image, got {type(value).__name__}")


def _llava_rows(src: Path) -> Iterator[tuple[int, Any]]:
    text = src.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(str(src), e.lineno, "json", f"invalid JSON: {e.msg} (column {e.colno})") from None
        yield from enumerate(items, start=1)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, RecordError(str(src), lineno, "json", f"invalid JSON: {e.msg} (column {e.colno})")


def _llava_record(item: Any, images: _Images, base: Path, stats: dict) -> dict:
    if not isinstance(item, dict):
        raise KeyError("item: expected an object")
    conv = item.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise KeyError("conversations: expected a list of at least a human and a gpt turn")
    roles = [c.get("from") if isinstance(c, dict) else None for c in conv]
    if roles[0] != "human" or roles[1] != "gpt":
        raise KeyError(f"conversations: expected a human turn then a gpt turn, got {roles[:2]}")
    if len(conv) > 2:
        stats["later_turns_dropped"] += (len(conv) - 2) // 2
    refs = item.get("image")
    refs = [] if refs is None else ([refs] if isinstance(refs, str) else list(refs))
    prompt, response = str(conv[0].get("value", "")), str(conv[1].get("value", ""))
    n_tokens = prompt.count(IMAGE_TOKEN)
    if refs and n_tokens not in (0, len(refs)):
        raise KeyError(f"conversations.0.value: {n_tokens} {IMAGE_TOKEN} placeholders for {len(refs)} images")
    if not refs:
        raise KeyError("image: missing (mmdistill chat records have at least one image)")
    prompt = prompt.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "").strip()
    if not prompt or not response.strip():
        raise KeyError("conversations: an empty prompt or response")
    try:
        stored = [images.add(r, base) for r in refs]
    except ValueError as e:
        raise KeyError(f"image: {e}") from None
    rec: dict[str, Any] = {"prompt": prompt, "response": response.strip()}
    if len(stored) == 1:
        rec["image"] = stored[0]
    else:
        rec["images"] = stored
    if "id" in item and isinstance(item["id"], (str, int)):
        rec["id"] = item["id"]
    return rec


def _table_rows(src: Path, fmt: str, split: str | None) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise RecordError(str(src), 0, "format", f"reading {fmt} needs the datasets library: pip install 'mmdistill[data]'") from None

    if fmt == "hf":
        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                if len(ds) != 1:
                    raise RecordError(str(src), 0, "split", f"the folder holds splits {sorted(ds)}; choose one with --split")
                split = next(iter(ds))
            if split not in ds:
                raise RecordError(str(src), 0, "split", f"no split {split!r}; the folder holds {sorted(ds)}")
            ds = ds[split]
    else:
        ds = datasets.Dataset.from_parquet(str(src)) if fmt == "parquet" else datasets.Dataset.from_file(str(src))
    yield 0, ds  # the dataset itself first, for the column check
    for i, row in enumerate(ds, start=1):
        yield i, row


def import_data(src: str | Path, out: str | Path, *, fmt: str | None = None, kind: str | None = None, fields: dict[str, str] | None = None,
                split: str | None = None, name: str = "train", on_error: str = "skip", limit: int | None = None, image_root: str | Path | None = None) -> dict[str, Any]:
    """Convert `src` into OUT/<name>.jsonl (+ OUT/images/); returns counts. See the module docstring."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise RecordError(str(src), 0, "source", "not found")
    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise RecordError(str(src), 0, "format", f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    kind = kind or ("chat" if fmt == "llava" or {"prompt", "response"} & set(fields or {}) else "pair")
    if kind not in KIND_FIELDS:
        raise RecordError(str(src), 0, "kind", f"unknown kind {kind!r}; data import writes pair or chat records")
    if fmt == "llava" and kind != "chat":
        raise RecordError(str(src), 0, "kind", "LLaVA conversations become chat records")
    mapping = {f: f for f in KIND_FIELDS[kind]} | (fields or {})
    unknown = set(mapping) - set(KIND_FIELDS[kind])
    if unknown:
        raise RecordError(str(src), 0, "map", f"unknown record field(s) {sorted(unknown)} for {kind} records; map {', '.join(KIND_FIELDS[kind])}")
    out.mkdir(parents=True, exist_ok=True)
    target, rejected_path = out / f"{name}.jsonl", out / f"{name}.rejected.jsonl"
    if target.exists():
        raise FileExistsError(f"{target}: exists; import into another folder or --name")
    base = Path(image_root) if image_root else (src if src.is_dir() else src.parent)
    images = _Images(out)
    stats = {"read": 0, "written": 0, "rejected": 0, "later_turns_dropped": 0}
    rows = _llava_rows(src) if fmt == "llava" else _table_rows(src, fmt, split)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f, open(rejected_path, "w", encoding="utf-8") as rej:
        for index, item in rows:
            if index == 0:  # a table: check the mapped columns once
                missing = [f"{field}={col}" for field, col in mapping.items() if col not in item.column_names]
                if missing:
                    raise RecordError(str(src), 0, "map", f"column(s) not found: {', '.join(missing)} (columns: {', '.join(item.column_names)}); map them with --map FIELD=COLUMN")
                continue
            if limit is not None and stats["written"] >= limit:
                break
            stats["read"] += 1
            try:
                if isinstance(item, RecordError):
                    raise item
                if fmt == "llava":
                    rec = _llava_record(item, images, base, stats)
                else:
                    rec = {}
                    for field, col in mapping.items():
                        value = item[col]
                        if field == "image":
                            try:
                                rec["image"] = images.add(value, base)
                            except ValueError as e:
                                raise KeyError(f"{col}: {e}") from None
                        elif not isinstance(value, str) or not value.strip():
                            raise KeyError(f"{col}: expected a non-empty string, got {value!r}"[:200])
                        else:
                            rec[field] = value.strip()
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                stats["written"] += 1
            except (KeyError, RecordError) as e:
                if isinstance(e, RecordError):
                    err = e
                else:
                    field, _, msg = str(e.args[0]).partition(": ")
                    err = RecordError(str(src), index, field, msg)
                if on_error == "fail":
                    raise err from None
                rej.write(json.dumps({"line": index, "field": err.field, "error": str(err)}, ensure_ascii=False) + "\n")
                stats["rejected"] += 1
    if stats["written"] == 0:
        tmp.unlink()
        raise RecordError(str(src), 0, "source", f"no record could be converted ({stats['rejected']} rejected; see {rejected_path})")
    tmp.replace(target)
    if not stats["rejected"]:
        rejected_path.unlink()
    return {"out": str(target), "format": fmt, "kind": kind, **stats}

