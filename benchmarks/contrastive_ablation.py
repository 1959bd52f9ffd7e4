"""Loss ablation in the style of CLIP-KD's table: each KD term alone (plus the CLIP task loss), and combinations,
on the same budget (steps, batch, data, student, teacher, seed).

    python benchmarks/contrastive_ablation.py --out runs/bench

Uses the teacher that benchmarks/contrastive_kd.py trains in the same --out folder (trains it if missing).
Writes benchmarks/results/contrastive_ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import add_common_args, bench_recipes, ensure_data, git_rev, machine, variant, write

from mmdistill import api
from mmdistill.recipes import contrastive

CLIP = {"clip": {"weight": 1.0}}
VARIANTS: dict[str, dict] = {
    "no KD (CLIP loss only)": {},
    "+ similarity KD (open_clip)": {"sim_kd": {"weight": 1.0}},
    "+ affinity mimicking (TinyCLIP)": {"affinity": {"weight": 1.0, "options": {"temperature": 2.0}}},
    "+ CRD (CLIP-KD)": {"crd": {"weight": 1.0}},
    "+ FD (CLIP-KD)": {"fd": {"weight": 100.0}},
    "+ ICL (CLIP-KD)": {"icl": {"weight": 1.0}},
    "+ CRD + ICL + FD (CLIP-KD recipe)": {"crd": {"weight": 1.0}, "icl": {"weight": 1.0}, "fd": {"weight": 100.0}},
    "+ similarity KD + FD (shipped recipe)": {"sim_kd": {"weight": 1.0}, "fd": {"weight": 100.0}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run only the variants whose label contains one of these strings")
    args = ap.parse_args()

    ensure_data(args.out, args.n)
    recipes = bench_recipes(args.out, args.teacher_steps, args.student_steps, seed=args.seed)
    if not api.is_finished(recipes["teacher"]):
        contrastive.run(recipes["teacher"], overwrite=True)
    teacher = api.report([recipes["teacher"].output_dir], args.out / "report-teacher")["runs"][0]
    kd = recipes["student-kd"]
    t0 = time.time()
    rows = []
    for i, (label, terms) in enumerate(VARIANTS.items()):
        if args.only and not any(s in label for s in args.only):
            continue
        r = variant(kd, f"ablation-{i}", **{"loss.terms": {**CLIP, **terms}})
        ev = contrastive.run(r, overwrite=True)["eval"]
        rows.append({"variant": label, "terms": {**CLIP, **terms}, "metrics": ev["metrics"]})
        print(label, ev["metrics"]["mean_R@1"], flush=True)

    t_val = teacher["metrics"]["mean_R@1"]
    md = [
        f"### Contrastive KD loss ablation (ShapesWorld, gallery {ev['gallery']}, seed {args.seed}, {kd.train.max_steps} steps × batch {kd.train.batch_size})",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()} — {time.time() - t0:.0f} s",
        "",
        f"Teacher mean R@1: {t_val:.2f}. Every row trains the same student from the same initialisation with the CLIP loss plus the listed term(s).",
        "",
        "| loss | i2t R@1 | t2i R@1 | mean R@1 | retention | zero-shot mean |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        m = row["metrics"]
        md.append(f"| {row['variant']} | {m['i2t_R@1']:.2f} | {m['t2i_R@1']:.2f} | {m['mean_R@1']:.2f} | {100 * m['mean_R@1'] / t_val:.1f}% | {m.get('zeroshot_mean', float('nan')):.2f} |")
    md.append("")
    write(args.results, "contrastive_ablation", {"teacher": teacher, "rows": rows, "machine": machine(), "commit": git_rev()}, "\n".join(md))


if __name__ == "__main__":
    main()
