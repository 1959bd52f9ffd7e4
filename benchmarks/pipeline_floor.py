"""Where the reranker pipeline's batch-1 latency goes: each model's forward against the same model with its decoder layers
and vision blocks taken out (embeddings, patch embedding, merger, rope index, masks, head: the per-forward floor).

Reads a folder `benchmarks/pipeline_bench.py --out DIR` wrote (the teacher and the pipeline's final stage) and times one
query with 1 document (inputs pre-tokenised, `evaluate.reranker.query_latency`), in interleaved rounds, 1 thread.

    python benchmarks/pipeline_floor.py --out runs/pipeline-bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from common import git_rev, machine, write
from torch import nn

from mmdistill.data.loaders import load_rerank
from mmdistill.evaluate.reranker import query_latency
from mmdistill.models import reranker as rm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the folder benchmarks/pipeline_bench.py wrote")
    ap.add_argument("--final", default="int8", help="the pipeline stage to compare with the teacher")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    cache = rm.ImageCache()
    records, _ = load_rerank(args.out / "data" / "rerank_test.jsonl", "fail", 1, cache, log=lambda *_: None)
    models = {}
    for name, path in (("teacher", args.out / "teacher" / "model"), ("final", args.out / "pipeline" / args.final / "model")):
        r = rm.load_reranker(str(path), max_length=320)
        r.model.eval()
        r.images = cache
        models[name] = r
    times: dict[str, list[float]] = {f"{m} {v}": [] for m in models for v in ("full", "floor")}
    blocks = {}
    for _ in range(args.rounds):
        for name, r in models.items():
            lm, vis = r.model.model.language_model, r.model.model.visual
            layers, vblocks = lm.layers, vis.blocks
            blocks[name] = (len(layers), len(vblocks))
            times[f"{name} full"].append(query_latency(r, records[0], 1)["query_k1"])
            lm.layers, vis.blocks = nn.ModuleList(), nn.ModuleList()
            try:
                times[f"{name} floor"].append(query_latency(r, records[0], 1)["query_k1"])
            finally:
                lm.layers, vis.blocks = layers, vblocks
    med = {k: statistics.median(v) for k, v in times.items()}
    t_full, f_full, t_floor, f_floor = med["teacher full"], med["final full"], med["teacher floor"], med["final floor"]
    above_t, above_f = t_full - t_floor, f_full - f_floor
    payload = {
        "machine": machine(), "commit": git_rev(), "load_start": load0, "load_end": os.getloadavg()[0], "rounds": args.rounds,
        "median_ms": med, "blocks": blocks, "ratio_full": f_full / t_full, "ratio_above_floor": above_f / above_t,
        "per_block_ms": {n: (med[f"{n} full"] - med[f"{n} floor"]) / sum(blocks[n]) for n in models},
    }
    md = [
        "### Where the pipeline's batch-1 latency goes: the per-forward floor",
        "",
        f"Command: `python benchmarks/pipeline_floor.py --out {args.out}` — machine: {machine()} — commit {git_rev()} — 1-min load average "
        f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        "",
        f"One query with 1 document, inputs pre-tokenised, median of {args.rounds} interleaved rounds (each a median of 10 calls), 1 thread. "
        "Floor: the same model with its decoder layers and vision blocks taken out (embeddings, patch embedding, merger, rope index, "
        "masks, head and the model's Python around them).",
        "",
        "| model | decoder layers + vision blocks | full ms | floor ms | above the floor ms | per block ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n in models:
        md.append(f"| {n} | {blocks[n][0]} + {blocks[n][1]} | {med[f'{n} full']:.2f} | {med[f'{n} floor']:.2f} | "
                  f"{med[f'{n} full'] - med[f'{n} floor']:.2f} | {payload['per_block_ms'][n]:.2f} |")
    md += [
        "",
        f"- Final vs teacher at batch 1: **{100 * f_full / t_full:.1f}%** in all; **{100 * above_f / above_t:.1f}%** of the time above the floor "
        f"(the floor alone: {100 * f_floor / t_floor:.0f}%).",
        f"- The final model has {sum(blocks['final'])} blocks to the teacher's {sum(blocks['teacher'])}; each costs "
        f"{payload['per_block_ms']['final']:.2f} ms against the teacher's {payload['per_block_ms']['teacher']:.2f} ms although it has half the width (a quarter "
        "of the matmul work): at these sizes a block's time is its kernel launches and Python, not its arithmetic.",
    ]
    write(args.results, "pipeline_floor", payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    t0 = time.time()
    main()
