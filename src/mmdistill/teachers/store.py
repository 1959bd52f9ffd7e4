"""The offline teacher signal store: a teacher's signals computed once, read by any number of student runs.

Layout of a store folder::

    manifest.json                 what made the signals: format, family, the teacher (id, config and tokenizer
                                  hashes), the recipe fields that shaped them, constants (logit scale, widths)
    shards-r<rank>.json           the journal of one writing process: its committed shards, each with its file
                                  name, sha256, byte size, record count (and response-token count)
    shard-r<rank>-<seq>.safetensors   the signals of up to N records: tensors named "<record key>/<signal>"

Why safetensors shards and JSON: the signals are tensors of a few shapes per record, read by key at
random during training; a safetensors file is memory-mapped and a tensor is read without touching the
rest, nothing is unpickled, and every framework reads it. Parquet would add a dependency and a
row/column conversion for the same access pattern.

Records are found by a hash of their content (``record_key``: the kind, the texts and the bytes of
every image), never by position or step, so a store outlives a reordered, filtered or extended data
file. A shard is written to a temporary name, fsynced and renamed, and only then entered in the
journal (itself replaced atomically); a shard file the journal does not name (a run killed between the
two) is deleted when the writer reopens the store, so a killed run rerun loses no record and stores
none twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "mmdistill-teacher-store"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json",
)


class StoreError(ValueError):
    """A store that cannot be used as asked (one line, naming the store and what is wrong)."""


# ----------------------------------------------------------------------------- identities


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class RecordKeys:
    """``key(record)``: sha256 of a record's kind, texts and media bytes (image and audio files hashed once each).
    Fields a record leaves empty are not part of it, so a new optional field does not change the keys of records
    that do not use it."""

    def __init__(self):
        self._images: dict[Path, str] = {}

    def _image(self, record, ref: str) -> str:
        path = (record.base_dir / ref).resolve()
        if path not in self._images:
            self._images[path] = _sha256_file(path)
        return self._images[path]

    def key(self, record) -> str:
        content = record.model_dump(mode="json", exclude={"id", "meta", "difficulty", "skills"}, exclude_none=True)
        refs = record.image_refs() + (record.audio_refs() if hasattr(record, "audio_refs") else [])
        for field, ref in refs:  # an image or a clip counts by its bytes, not by its file name
            *parents, leaf = field.split(".")
            node = content
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            node[int(leaf) if isinstance(node, list) else leaf] = self._image(record, ref)
        blob = json.dumps({"kind": record.kind, "content": content}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def model_identity(name_or_path: str) -> dict[str, Any]:
    """What identifies a teacher: its id or folder, the hash of its config.json and of its tokenizer / processor
    files (a local folder), the hub revision when the config names one."""
    out: dict[str, Any] = {"model": str(name_or_path), "config_sha256": None, "tokenizer_sha256": None}
    folder = Path(name_or_path)
    if folder.is_dir():
        cfg = folder / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            data.pop("transformers_version", None)  # the library that wrote it, not the model
            out["config_sha256"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
        h = hashlib.sha256()
        found = False
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                found = True
                h.update(name.encode() + b"\0" + (folder / name).read_bytes())
        out["tokenizer_sha256"] = h.hexdigest()[:16] if found else None
    return out


def identity_differences(made_by: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """What differs between the store's teacher and another (hashes compared where both are known, else the id)."""
    diffs = []
    for key, what in (("config_sha256", "config"), ("tokenizer_sha256", "tokenizer / processor")):
        a, b = made_by.get(key), given.get(key)
        if a and b and a != b:
            diffs.append(f"{what} (store {a}, {given['model']} {b})")
    if not diffs and not (made_by.get("config_sha256") and given.get("config_sha256")) and made_by.get("model") != given.get("model"):
        diffs.append(f"model (store {made_by.get('model')}, recipe {given.get('model')})")
    return diffs


# ----------------------------------------------------------------------------- files


def _write_json(path: Path, data: Any) -> None:
    """Write-then-rename with fsync: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: missing ({what})") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON at line {e.lineno} ({what})") from None


def _journals(folder: Path) -> list[Path]:
    return sorted(folder.glob("shards-r*.json"))


def _shards(folder: Path) -> list[dict[str, Any]]:
    out = []
    for journal in _journals(folder):
        out += _read_json(journal, "a writer's journal of committed shards")["shards"]
    return out


def _keys_of(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {name.split("/", 1)[0] for name in f.keys()}


# ----------------------------------------------------------------------------- writing


class StoreWriter:
    """Appends records to a store, a shard at a time; reopening an existing store continues it.

    ``header`` = {"family", "teacher", "settings", "constants"}: written to manifest.json on creation,
    and on reopening compared with the manifest (a store holds one teacher's signals under one set of
    settings; a difference is an error naming it). ``rank``: the writing process (each has its own
    journal and shard names, so processes never write the same file).
    """

    def __init__(self, folder: str | Path, header: dict[str, Any], *, shard_records: int = 256, rank: int = 0):
        self.folder = Path(folder)
        self.shard_records = shard_records
        self.rank = rank
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / MANIFEST
        header = {"format": FORMAT, "version": VERSION, **header}
        if manifest.is_file():
            old = _read_json(manifest, "the store's manifest")
            diffs = [k for k in ("format", "family", "teacher", "settings") if old.get(k) != header.get(k)]
            if diffs:
                detail = "; ".join(f"{k}: store {old.get(k)} vs now {header.get(k)}" for k in diffs)
                raise StoreError(f"{self.folder}: holds signals made otherwise ({detail}); write to a new folder")
        elif rank == 0:
            _write_json(manifest, header)
        self.journal = self.folder / f"shards-r{rank}.json"
        self.shards = _read_json(self.journal, "journal")["shards"] if self.journal.is_file() else []
        named = {s["file"] for s in _shards(self.folder)}
        for stray in self.folder.glob(f"shard-r{rank}-*"):  # written but never committed: a killed run
            if stray.name not in named:
                stray.unlink()
        self.done: set[str] = set()
        for s in _shards(self.folder):
            if (self.folder / s["file"]).is_file():
                self.done |= _keys_of(self.folder / s["file"])
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Queue one record's signals (a record already stored or queued is ignored); a full shard is written."""
        if key in self.done or key in self.pending:
            return
        self.pending[key] = tensors
        if len(self.pending) >= self.shard_records:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        seq = len(self.shards)
        name = f"shard-r{self.rank}-{seq:06d}.safetensors"
        flat = {f"{key}/{sig}": t.detach().cpu().contiguous() for key, sigs in self.pending.items() for sig, t in sigs.items()}
        tmp = self.folder / (name + ".tmp")
        save_file(flat, str(tmp), metadata={"format": FORMAT})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        tokens = sum(int(s["topk_ids"].shape[0]) for s in self.pending.values() if "topk_ids" in s)
        entry = {"file": name, "sha256": _sha256_file(self.folder / name), "bytes": (self.folder / name).stat().st_size, "records": len(self.pending), "tokens": tokens}
        self.shards.append(entry)
        _write_json(self.journal, {"shards": self.shards})
        self.done |= set(self.pending)
        self.pending = {}

    def close(self) -> None:
        self.flush()


# ----------------------------------------------------------------------------- reading


class TeacherStore:
    """A store opened for reading: ``key in store``, ``store.get(key) -> {signal: Tensor}`` (memory-mapped)."""

    def __init__(self, folder: str | Path, *, max_open: int = 64):
        self.folder = Path(folder)
        if not (self.folder / MANIFEST).is_file():
            raise StoreError(f"{self.folder}: not a teacher store (no {MANIFEST}); make one with `mmdistill teacher cache`")
        self.manifest = _read_json(self.folder / MANIFEST, "the store's manifest")
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{self.folder}/{MANIFEST}: not a {FORMAT} manifest")
        self.family = self.manifest["family"]
        self.shards = _shards(self.folder)
        self.index: dict[str, str] = {}
        for s in self.shards:
            path = self.folder / s["file"]
            if not path.is_file():
                raise StoreError(f"{path}: shard missing (run `mmdistill teacher verify {self.folder}`)")
            try:
                for key in _keys_of(path):
                    self.index[key] = s["file"]
            except Exception as e:  # a truncated or corrupt header
                raise StoreError(f"{path}: unreadable shard ({type(e).__name__}); run `mmdistill teacher verify {self.folder}`") from None
        self._open: OrderedDict = OrderedDict()
        self.max_open = max_open

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self, file: str):
        """An open shard and its names grouped by record key (listed once per opening, not once per record)."""
        entry = self._open.get(file)
        if entry is None:
            f = safe_open(str(self.folder / file), framework="pt")
            names: dict[str, list[str]] = {}
            for name in f.keys():
                key, _, signal = name.partition("/")
                names.setdefault(key, []).append(signal)
            entry = self._open[file] = (f, names)
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(file)
        return entry

    def get(self, key: str) -> dict[str, torch.Tensor]:
        f, names = self._handle(self.index[key])
        return {signal: f.get_tensor(f"{key}/{signal}") for signal in names[key]}


def verify(folder: str | Path) -> list[str]:
    """Every problem of a store, one line each: a missing, truncated or corrupt shard (size, sha256, header), a record
    count that disagrees, a record stored twice, a shard file no journal names. Empty: the store is good."""
    folder = Path(folder)
    problems: list[str] = []
    if not (folder / MANIFEST).is_file():
        return [f"{folder}: not a teacher store (no {MANIFEST})"]
    try:
        _read_json(folder / MANIFEST, "manifest")
        shards = _shards(folder)
    except StoreError as e:
        return [str(e)]
    seen: dict[str, str] = {}
    for s in shards:
        path = folder / s["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != s["bytes"]:
            problems.append(f"{path}: {size} bytes, the journal says {s['bytes']} (truncated or replaced)")
            continue
        if _sha256_file(path) != s["sha256"]:
            problems.append(f"{path}: sha256 differs from the journal's (corrupt)")
            continue
        try:
            keys = _keys_of(path)
        except Exception as e:
            problems.append(f"{path}: unreadable ({type(e).__name__})")
            continue
        if len(keys) != s["records"]:
            problems.append(f"{path}: {len(keys)} records, the journal says {s['records']}")
        for key in keys:
            if key in seen:
                problems.append(f"{path}: record {key} is also in {seen[key]}")
            seen[key] = s["file"]
    named = {s["file"] for s in shards}
    for stray in sorted(folder.glob("shard-*.safetensors")):
        if stray.name not in named:
            problems.append(f"{stray}: not in any journal (an interrupted write; rerun `mmdistill teacher cache` to finish the store)")
    return problems


def inspect(folder: str | Path) -> dict[str, Any]:
    """What a store holds: records, shards, bytes (per record, per response token), its teacher and settings."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise StoreError(f"{folder}: not a teacher store (no {MANIFEST})")
    manifest = _read_json(folder / MANIFEST, "manifest")
    shards = _shards(folder)
    records = sum(s["records"] for s in shards)
    size = sum(s["bytes"] for s in shards)
    tokens = sum(s.get("tokens", 0) for s in shards)
    out = {
        "folder": str(folder), "family": manifest["family"], "records": records, "shards": len(shards), "bytes": size,
        "bytes_per_record": size / records if records else None, "teacher": manifest["teacher"], "settings": manifest["settings"],
    }
    if tokens:
        out["response_tokens"] = tokens
        out["bytes_per_token"] = size / tokens
    return out


def stack_rows(rows: Iterable[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """One signal of several records stacked [N, ...] (records of one family have equal shapes for it)."""
    return torch.stack([r[name] for r in rows])
