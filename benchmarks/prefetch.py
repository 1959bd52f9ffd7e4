"""Batches prepared ahead in a background thread (`train.prefetch`, engine/prefetch.py) against each step preparing its
own (`train.prefetch: 0`), side by side: training samples/s of the shipped ShapesWorld demo recipes, interleaved rounds,
with torch on 1 thread (a core left for the prefetch thread) and on every core. The losses of the two are the same bit
for bit (tests/e2e/test_streaming.py); this measures only the time.

    python benchmarks/prefetch.py --out runs/bench-prefetch --steps 40 --rounds 3

Cases: the contrastive student streaming its pairs (`data.stream`: images decoded per batch), the generative student
distilled from a live teacher (both processors encode every batch), and the reranker student streaming its records.
Writes benchmarks/results/prefetch.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from common import ensure_data, git_rev, machine, variant, write

from mmdistill import api
from mmdistill.recipes import contrastive, generative, reranker

MODULES = {"contrastive": contrastive, "generative": generative, "reranker": reranker}
CASES = {
    "contrastive student, streaming pairs": ("contrastive", "student-base", {"data.stream": True}),
    "generative student, KD from the live teacher": ("generative", "student-kd", {}),
    "reranker student, streaming records": ("reranker", "student-base", {"data.stream": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-prefetch"))
    ap.add_argument("--n", type=int, default=2000, help="ShapesWorld images")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 2])
    ap.add_argument("--depth", type=int, default=2, help="train.prefetch of the prefetching runs (the default is 0: off)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    t_start = time.time()
    ensure_data(args.out, args.n)
    rows, payload = [], {"cases": {}}
    for case, (family, stage, changes) in CASES.items():
        rs = api.demo_recipes(args.out, family=family, runs=args.out / family)
        for name, earlier in rs.items():  # the stages the student is built or distilled from, 2 steps each: their speed matters here, not their quality
            if name == stage:
                break
            earlier = variant(earlier, name, **{"train.max_steps": 2, "train.save_every": 2})
            if not api.is_finished(earlier):
                MODULES[earlier.family].run(earlier, overwrite=True, log=lambda *_: None, evaluate_after=False)
        for threads in args.threads:
            sps: dict[int, list[float]] = {0: [], args.depth: []}
            for r in range(args.rounds):
                for depth in sps if r % 2 == 0 else reversed(list(sps)):  # interleaved, the order alternating per round
                    rec = variant(rs[stage], f"{family}-{stage}-t{threads}-p{depth}",
                                  **{**changes, "train.max_steps": args.steps, "train.save_every": 10**6, "train.threads": threads, "train.prefetch": depth,
                                     "train.warmup_steps": 0})
                    summary = MODULES[family].run(rec, overwrite=True, log=lambda *_: None, evaluate_after=False)
                    sps[depth].append(summary["samples_per_s"])
                    print(f"{case}, {threads} thread(s), prefetch {depth}: {sps[depth][-1]:.1f} samples/s", flush=True)
            med = {d: statistics.median(v) for d, v in sps.items()}
            rows.append((case, threads, med[0], med[args.depth]))
            payload["cases"][f"{case} | threads {threads}"] = {"samples_per_s": {str(d): v for d, v in sps.items()}, "batch_size": rs[stage].train.batch_size}
    torch.set_num_threads(os.cpu_count() or 2)

    lines = [
        "### Batches prefetched in a thread vs prepared in the step",
        "",
        f"Command: `python benchmarks/prefetch.py --out {args.out} --steps {args.steps} --rounds {args.rounds}` — machine: {machine()} — commit {git_rev()} — "
        f"{time.time() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f} at the end",
        "",
        f"The shipped demo recipes (ShapesWorld n={args.n}), {args.steps} steps each; samples/s over the training loop, median of {args.rounds} "
        f"interleaved rounds. `train.prefetch: {args.depth}` against `train.prefetch: 0` (the default); the same batches and losses either way.",
        "",
        f"| case | torch threads | prefetch 0 samples/s | prefetch {args.depth} samples/s | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case, threads, a, b in rows:
        lines.append(f"| {case} | {threads} | {a:.1f} | {b:.1f} | {b / a:.2f}× |")
    write(args.results, "prefetch", payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
