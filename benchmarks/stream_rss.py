"""Peak memory of training against the size of the training set, with and without `data.stream`, one run.

    python benchmarks/stream_rss.py --out runs/bench-stream [--sizes 10000 200000] [--steps 40]

Generates pair sets of each size from a ShapesWorld base (the records cycle over the base's images, each with its own
caption, so every record is distinct), then trains the same small CLIP student for the same steps on each, each run in
its own process, and reads the run's peak RSS from its train_summary.json. Without streaming every image is decoded
and preprocessed up front, so memory grows with the set (those runs stop at --eager-max records); with `data.stream:
true` records are an index of line offsets into the JSONL and images are decoded per batch. Writes
benchmarks/results/stream_rss.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import ensure_data, git_rev, machine, write


def make_set(data: Path, n: int) -> Path:
    out = data / f"pairs_{n}.jsonl"
    if out.is_file():
        return out
    base = [json.loads(line) for line in (data / "pairs_train.jsonl").read_text().splitlines() if line.strip()]
    with open(out.with_suffix(".tmp"), "w") as f:
        for i in range(n):
            r = dict(base[i % len(base)])
            r["text"] = f"{r['text']} (record {i})"
            f.write(json.dumps(r) + "\n")
    out.with_suffix(".tmp").rename(out)
    return out


def train(root: Path, train_file: Path, stream: bool, steps: int, batch: int) -> dict:
    name = f"{'stream' if stream else 'eager'}-{train_file.stem}"
    recipe = {
        "family": "contrastive", "output_dir": str(root / name), "seed": 0,
        "data": {"train": str(train_file), "stream": stream},
        "student": {"init": "tiny", "preset": "clip-student"},
        "loss": {"terms": {"clip": {"weight": 1.0}}},
        "train": {"max_steps": steps, "batch_size": batch, "warmup_steps": 2, "save_every": steps, "log_every": steps},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmdistill.cli", "train", str(path), "--overwrite"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    summary = json.loads((root / name / "train_summary.json").read_text())
    return {"peak_rss_mb": summary["peak_rss_bytes"] / 2**20, "wall_s": wall, "train_s": summary["train_seconds"], "samples_per_s": summary["samples_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-stream"))
    ap.add_argument("--base", type=int, default=2000, help="ShapesWorld images the sets cycle over")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 200000])
    ap.add_argument("--eager-max", type=int, default=50000, help="largest set trained without streaming")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    data = ensure_data(args.out, args.base)
    rows = []
    for n in args.sizes:
        f = make_set(data, n)
        for stream in (False, True):
            if not stream and n > args.eager_max:
                continue
            r = {"records": n, "stream": stream, **train(args.out, f, stream, args.steps, args.batch)}
            print(r, flush=True)
            rows.append(r)
    lines = [
        "### Peak memory against the training set's size (`data.stream`)",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()}",
        "",
        f"The shipped tiny CLIP student (`clip-student`), the CLIP loss, {args.steps} steps of {args.batch} pairs, each run "
        f"in its own process; the sets cycle over {args.base} ShapesWorld images with a distinct caption per record.",
        "",
        "| records | data.stream | peak RSS (MiB) | wall time incl. start-up (s) | training samples/s |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {r['records']:,} | {'yes' if r['stream'] else 'no'} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} | {r['samples_per_s']:.1f} |" for r in rows],
        "",
    ]
    write(args.results, "stream_rss", {"rows": rows, "machine": machine(), "commit": git_rev(), "args": vars(args) | {"out": str(args.out), "results": str(args.results)}}, "\n".join(lines))


if __name__ == "__main__":
    main()
