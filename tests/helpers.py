"""What the test files share: running the `mmdistill` CLI in a child process, tiny recipe dicts and their YAML files,
a free loopback port and waiting for a served URL, and a ShapesWorld chat set with a tokenizer trained on it.

Importable as `helpers` because pyproject.toml's [tool.pytest.ini_options] puts tests/ on `pythonpath`. Heavy imports
(mmdistill, httpx) happen inside the functions that need them, so importing this module costs nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

# One thread per child and no tokenizer pool: the machines that run the tests have few cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
_INHERIT = object()


def mmd(*args, check: bool = True, cwd=None, env=_INHERIT, timeout: float | None = 900) -> subprocess.CompletedProcess:
    """`python -m mmdistill.cli ARGS` with its output captured as text. `env` defaults to ENV (None: this process's
    environment unchanged); `timeout` None waits for ever. With `check`, a non-zero exit raises with both streams."""
    p = subprocess.run([sys.executable, "-m", "mmdistill.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env=ENV if env is _INHERIT else env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"mmdistill {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def merged(d: dict, extra: dict) -> dict:
    """`d` with the keys of `extra` set: a dict given for a key that `d` already has is merged into it one level deep
    (so `train={"max_steps": 2}` keeps the other train settings), anything else replaces the value."""
    out = dict(d)
    for k, v in extra.items():
        out[k] = v if not isinstance(v, dict) or k not in out else {**out[k], **v}
    return out


def write_yaml(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def write_recipe(root: Path, name: str, d: dict) -> Path:
    """`d` written to ROOT/NAME.yaml."""
    return write_yaml(root / f"{name}.yaml", d)


def contrastive_recipe(root: Path, name: str, **extra) -> dict:
    """A tiny CLIP recipe on the ShapesWorld pairs under ROOT/data, writing to ROOT/NAME; `extra` as in `merged`."""
    d = {
        "family": "contrastive",
        "output_dir": str(root / name),
        "seed": 0,
        "data": {"train": str(root / "data/pairs_train.jsonl"), "val": str(root / "data/pairs_test.jsonl"), "zeroshot": str(root / "data/zeroshot_test.json")},
        "student": {"init": "tiny", "preset": "clip-nano"},
        "train": {"max_steps": 8, "batch_size": 16, "warmup_steps": 2, "save_every": 4, "log_every": 2, "lr": 0.002},
        "eval": {"max_items": 30, "latency": False},
    }
    return merged(d, extra)


def generative_recipe(root: Path, name: str, **extra) -> dict:
    """A tiny VLM recipe (SFT only) on the ShapesWorld chat records under ROOT/data, writing to ROOT/NAME. The data
    limits and the eval settings differ between the test files, so each gives its own through `extra` (as in `merged`)."""
    d = {
        "family": "generative",
        "output_dir": str(root / name),
        "seed": 0,
        "data": {"train": str(root / "data/chat_train.jsonl"), "val": str(root / "data/chat_test.jsonl")},
        "student": {"init": "tiny", "preset": "vlm-nano"},
        "loss": {"terms": {"sft": {"weight": 1.0}}},
        "train": {"max_steps": 3, "batch_size": 8, "warmup_steps": 1, "save_every": 3, "log_every": 1, "lr": 0.003},
    }
    return merged(d, extra)


def reranker_recipe(root: Path, name: str, **extra) -> dict:
    """A tiny Qwen3-VL reranker recipe (CE + BCE) on the ShapesWorld rerank records under ROOT/data, writing to ROOT/NAME."""
    d = {
        "family": "reranker",
        "output_dir": str(root / name),
        "seed": 0,
        "data": {"train": str(root / "data/rerank_train.jsonl"), "val": str(root / "data/rerank_test.jsonl"), "max_records": 24, "max_length": 192},
        "student": {"init": "tiny", "preset": "vlm-nano"},
        "loss": {"terms": {"ce": {"weight": 1.0}, "bce": {"weight": 1.0, "options": {"max_label": 3}}}},
        "train": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "save_every": 2, "log_every": 1, "lr": 0.002},
        "eval": {"max_items": 12, "latency": True, "candidates": 12},
    }
    return merged(d, extra)


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(proc: subprocess.Popen, url: str, log_path: Path, *, within: float, request_timeout: float,
                      message: str, log_in_message: bool = False) -> None:
    """Poll `url` until it answers 200. Fails with the child's log if the child exits first, and with `message`
    (followed by the log when `log_in_message`) once `within` seconds have passed."""
    import httpx

    deadline = time.time() + within
    while True:
        assert proc.poll() is None, Path(log_path).read_text()
        try:
            if httpx.get(url, timeout=request_timeout).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, message + Path(log_path).read_text() if log_in_message else message
        time.sleep(0.5)


def chat_tokenizer(out: Path, limit: int | None = None):
    """The ShapesWorld chat records in OUT/chat_train.jsonl (the first `limit`, or all when None) as dicts, and a Qwen
    tokenizer trained on their prompts and responses. Returns (rows, tokenizer)."""
    from mmdistill.models.tiny import train_qwen_tokenizer

    rows = [json.loads(line) for line in (out / "chat_train.jsonl").read_text().splitlines()[:limit]]
    return rows, train_qwen_tokenizer([r["prompt"] for r in rows] + [r["response"] for r in rows])


def shapes_chat(out: Path, n: int, seed: int, limit: int | None = None):
    """ShapesWorld generated at `out` with one worker, then `chat_tokenizer(out, limit)`: (rows, tokenizer)."""
    from mmdistill.data.synth import generate

    generate(out, n=n, seed=seed, workers=1)
    return chat_tokenizer(out, limit)
