"""Cost of a KD step with a live teacher against a plain training step of the student (and with a cached teacher).

    python benchmarks/kd_step_cost.py --out runs/bench

Same student, batch, data; measured side by side in one process, median over --steps steps after warm-up.
Writes benchmarks/results/kd_step_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import statistics
import time
from pathlib import Path

import torch
from common import add_common_args, bench_recipes, ensure_data, git_rev, machine, write

from mmdistill import api
from mmdistill.losses.composite import build_contrastive_loss
from mmdistill.models import contrastive as cm
from mmdistill.data.loaders import load_pairs
from mmdistill.recipes.contrastive import ContrastiveStep, build_student, precompute_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()

    ensure_data(args.out, args.n)
    recipes = bench_recipes(args.out, args.teacher_steps, args.student_steps)
    kd = recipes["student-kd"]
    records, images, _ = load_pairs(kd.data.train, "fail", 2048)
    texts = [r.text for r in records]
    teacher_dir = Path(kd.teacher.model)
    trained = api.is_finished(recipes["teacher"])
    if not trained:
        # step time does not depend on the weights: the teacher's architecture, randomly initialised, will do
        teacher_dir = args.out / "teacher-architecture"
        cm.build_tiny_clip(teacher_dir, texts, preset=recipes["teacher"].student.preset, seed=0)
    teacher, t_proc = cm.load_model(str(teacher_dir))
    teacher.eval().requires_grad_(False)
    terms = {n: {"weight": t.weight, **t.options} for n, t in kd.loss.terms.items()}

    def make(mode: str):
        torch.manual_seed(0)
        student, s_proc = build_student(kd, teacher, t_proc, texts)
        s_data = cm.preprocess_pairs(s_proc, images, texts)
        if mode == "plain":
            loss = build_contrastive_loss({"clip": {"weight": 1.0}}, cm.embed_dim(student), None)
            return ContrastiveStep(student, loss, s_data)
        loss = build_contrastive_loss(terms, cm.embed_dim(student), cm.embed_dim(teacher))
        t_data = cm.preprocess_pairs(t_proc, images, texts)
        step = ContrastiveStep(student, loss, s_data, teacher=teacher, t_data=t_data)
        if mode == "cached":
            step.t_cache = precompute_teacher(teacher, t_data, step.needs_features)
        return step

    modes = ["plain", "live", "cached"]
    steps = {m: make(m) for m in modes}
    opts = {m: torch.optim.AdamW(s.parameters(), lr=1e-4) for m, s in steps.items()}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.steps + 3):  # interleave the modes so drift on the machine hits all alike
        idx = list(range((i * args.batch) % (len(texts) - args.batch), (i * args.batch) % (len(texts) - args.batch) + args.batch))
        for m in modes:
            t = time.perf_counter()
            out = steps[m](idx, 0.5)
            out["loss"].backward()
            opts[m].step()
            opts[m].zero_grad()
            if i >= 3:
                times[m].append(1000 * (time.perf_counter() - t))
    med = {m: statistics.median(v) for m, v in times.items()}
    md = [
        f"### Cost of a KD step (contrastive, batch {args.batch}, student {sum(p.numel() for p in steps['plain'].student.parameters()) / 1e6:.2f}M, teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M params)",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()} — teacher weights: {'trained' if trained else 'random (same architecture; timing only)'}",
        "",
        "| step | median ms | × plain step |",
        "| --- | --- | --- |",
        f"| student alone (CLIP loss) | {med['plain']:.1f} | 1.00 |",
        f"| KD, live teacher forward each step | {med['live']:.1f} | {med['live'] / med['plain']:.2f} |",
        f"| KD, teacher signals cached once (`teacher.cache: true`) | {med['cached']:.1f} | {med['cached'] / med['plain']:.2f} |",
        "",
    ]
    write(args.results, "kd_step_cost", {"median_ms": med, "all_ms": times, "machine": machine(), "commit": git_rev()}, "\n".join(md))


if __name__ == "__main__":
    main()
