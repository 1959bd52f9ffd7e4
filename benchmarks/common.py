"""Shared helpers for the benchmark scripts: the machine, the demo recipes, mean ± std."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
from pathlib import Path

import torch

from mmdistill import api
from mmdistill.config import Recipe, recipe_from_dict, set_dotted


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def free_port() -> int:
    """A free TCP port on loopback (servers, torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def ensure_data(out: Path, n: int, seed: int = 0, audio: bool = False) -> Path:
    """ShapesWorld in out/data (audio: also the spoken ShapesWorld, which needs espeak-ng)."""
    data = out / "data"
    if not (data / "summary.json").is_file() or (audio and not (data / "omni_train.jsonl").is_file()):
        summary = api.synth(data, n=n, seed=seed, audio=audio)
        if audio and "skipped" in summary.get("audio", {}):
            raise SystemExit(summary["audio"]["skipped"])
    return data


def eval_of(module, recipe: Recipe, run_dir: Path | None = None, log=print) -> dict:
    """The eval of the finished run in `run_dir` (default: the recipe's folder) under the recipe's eval settings: its
    eval.json when it was evaluated so, else the model re-evaluated into eval-<settings hash>.json (kept, reused)."""
    run_dir = Path(run_dir or recipe.output_dir)
    ev = recipe.model_dump(mode="json")["eval"]
    if json.loads((run_dir / "run.json").read_text())["recipe"]["eval"] == ev:
        return json.loads((run_dir / "eval.json").read_text())
    path = run_dir / f"eval-{hashlib.sha256(json.dumps(ev, sort_keys=True).encode()).hexdigest()[:8]}.json"
    if not path.is_file():
        log(f"{run_dir}: evaluating its model again with other eval settings -> {path.name}")
        module.evaluate_run(recipe.model_copy(update={"output_dir": run_dir}), out_path=path)
    return json.loads(path.read_text())


def run_or_reuse(module, recipe: Recipe, root: Path, log=print) -> dict:
    """Run `recipe`, or reuse a finished run under `root` that is the same run (`api.is_finished`: same code, data,
    seed and recipe, e.g. an ablation variant identical to a seed of family_kd.py): its eval when it was evaluated with
    the same settings, else its model evaluated again with these (`eval_of`); training is never repeated."""
    ev = recipe.model_dump(mode="json")["eval"]
    same = [meta.parent for meta in sorted(root.glob("*/run.json")) if api.is_finished(recipe.model_copy(update={"output_dir": meta.parent}))]
    if same:
        exact = [d for d in same if json.loads((d / "run.json").read_text())["recipe"]["eval"] == ev]
        log(f"{recipe.output_dir}: same run as {(exact or same)[0]}; reusing it")
        return eval_of(module, recipe, (exact or same)[0], log=log)
    return module.run(recipe, overwrite=True)["eval"]


def add_common_args(ap) -> None:
    """The options every contrastive benchmark shares: where, how much data, which budgets, where results go."""
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--n", type=int, default=10000, help="ShapesWorld images (test split = 10%%)")
    ap.add_argument("--teacher-steps", type=int, default=2000, help="teacher budget (the demo uses fewer)")
    ap.add_argument("--student-steps", type=int, default=1200, help="budget of every student (baseline and KD alike)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")


def bench_recipes(out: Path, teacher_steps: int, student_steps: int, seed: int = 0) -> dict[str, Recipe]:
    """The shipped demo recipes with the benchmark's training budgets (same for baseline and KD student)."""
    rs = api.demo_recipes(out, seed=seed)
    rs["teacher"] = variant(rs["teacher"], "teacher", **{"train.max_steps": teacher_steps, "train.save_every": 500})
    for k in ("student-base", "student-kd"):
        rs[k] = variant(rs[k], k, **{"train.max_steps": student_steps, "train.save_every": 400})
    return rs


def variant(recipe: Recipe, name: str, **changes) -> Recipe:
    """A copy of a recipe with another output folder and dotted-key changes (validated)."""
    d = recipe.model_dump(mode="json")
    d["output_dir"] = str(Path(recipe.output_dir).parent / name)
    d["name"] = name
    for key, value in changes.items():
        set_dotted(d, key, value)
    return recipe_from_dict(d, source=name)


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def write(out: Path, name: str, payload: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
