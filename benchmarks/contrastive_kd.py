"""Target check: a student with <= 1/4 of the teacher's parameters, distilled vs trained alone, 3 seeds.

    python benchmarks/contrastive_kd.py --out runs/bench --seeds 0 1 2

One teacher (seed 0) from the shipped teacher recipe; for each seed the shipped baseline and KD
student recipes (same steps, same data, same architecture) with that seed. Gallery: the first
1,000 ShapesWorld test pairs. Writes benchmarks/results/contrastive_kd.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import add_common_args, bench_recipes, ensure_data, git_rev, machine, mean_std, variant, write

from mmdistill import api
from mmdistill.recipes import contrastive


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    ensure_data(args.out, args.n)
    recipes = bench_recipes(args.out, args.teacher_steps, args.student_steps)
    t0 = time.time()
    teacher = recipes["teacher"]
    if not api.is_finished(teacher):
        contrastive.run(teacher, overwrite=True)
    t_eval = api.report([teacher.output_dir], args.out / "report-teacher")["runs"][0]
    rows = []
    for seed in args.seeds:
        res = {}
        for role in ("student-base", "student-kd"):
            r = variant(recipes[role], f"{role}-s{seed}", seed=seed)
            res[role] = contrastive.run(r, overwrite=True)["eval"]
        rows.append({"seed": seed, "baseline": res["student-base"], "kd": res["student-kd"]})

    key = "mean_R@1"
    t_val = t_eval["metrics"][key]
    base = [r["baseline"]["metrics"][key] for r in rows]
    kd = [r["kd"]["metrics"][key] for r in rows]
    retention = [100 * k / t_val for k in kd]
    gap = [k - b for k, b in zip(kd, base)]
    ratio = rows[0]["kd"]["params"] / t_eval["params"]
    md = [
        f"### Contrastive KD on ShapesWorld (gallery {rows[0]['kd']['gallery']} test pairs, seeds {args.seeds})",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()} — {time.time() - t0:.0f} s",
        "",
        "| model | params | i2t R@1 | t2i R@1 | mean R@1 | mean R@5 | zero-shot mean |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| teacher (seed 0) | {t_eval['params'] / 1e6:.2f}M | {t_eval['metrics']['i2t_R@1']:.2f} | {t_eval['metrics']['t2i_R@1']:.2f} | {t_val:.2f} | "
        f"{(t_eval['metrics']['i2t_R@5'] + t_eval['metrics']['t2i_R@5']) / 2:.2f} | {t_eval['metrics'].get('zeroshot_mean', float('nan')):.2f} |",
    ]
    for label, k in (("student alone (no KD)", "baseline"), ("student distilled", "kd")):
        m = [r[k]["metrics"] for r in rows]
        md.append(
            f"| {label} | {rows[0][k]['params'] / 1e6:.2f}M ({100 * rows[0][k]['params'] / t_eval['params']:.0f}%) | "
            f"{mean_std([x['i2t_R@1'] for x in m])} | {mean_std([x['t2i_R@1'] for x in m])} | {mean_std([x[key] for x in m])} | "
            f"{mean_std([(x['i2t_R@5'] + x['t2i_R@5']) / 2 for x in m])} | {mean_std([x.get('zeroshot_mean', float('nan')) for x in m])} |"
        )
    md += [
        "",
        f"- Retention of the teacher's mean R@1: **{mean_std(retention)}%** (target ≥ 95%).",
        f"- KD student − no-KD student, mean R@1: **{mean_std(gap)} points** (target ≥ 5).",
        f"- Student size: {100 * ratio:.1f}% of the teacher's parameters (target ≤ 25%).",
        f"- Latency (ms, bs1 / bs32): teacher {t_eval['latency_ms'].get('bs1', 0):.2f} / {t_eval['latency_ms'].get('bs32', 0):.2f}, "
        f"student {rows[0]['kd']['latency_ms'].get('bs1', 0):.2f} / {rows[0]['kd']['latency_ms'].get('bs32', 0):.2f}.",
        "",
    ]
    payload = {"teacher": t_eval, "rows": rows, "retention": retention, "gap": gap, "param_ratio": ratio, "machine": machine(), "commit": git_rev()}
    write(args.results, "contrastive_kd", payload, "\n".join(md))


if __name__ == "__main__":
    main()
