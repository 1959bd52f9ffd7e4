"""Qwen3-Omni thinker on ShapesWorld with speech: teacher, student alone, student distilled, per task, N seeds.

    python benchmarks/omni_kd.py --out runs/bench-omni --n 1000 --seeds 0 1 2

The shipped `configs/omni/` recipes (a tiny Qwen3-Omni-MoE thinker teacher; a student with ~17% of its parameters;
the KD student adds forward KL on response tokens, the pooled visual tokens, the pooled audio-tower tokens and the
penultimate hidden states), on ShapesWorld images + the spoken ShapesWorld (espeak-ng). One teacher (seed 0); for each
seed both students. Per task: text-question VQA accuracy, spoken-question VQA accuracy, captioning CIDEr-D, speech
recognition WER / CER (jiwer; lower is better, retention = teacher WER / student WER). Writes
benchmarks/results/omni_kd<-tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common import ensure_data, eval_of, git_rev, machine, mean_std, variant, write
from family_kd import family_recipes, parse_sets

from mmdistill import api
from mmdistill.evaluate.report import LOWER_IS_BETTER

TASKS = [  # metric, task, target retention % (None: reported only)
    ("text_vqa_accuracy", "VQA, text questions (accuracy %)", 90.0),
    ("spoken_vqa_accuracy", "VQA, spoken questions (accuracy %)", 90.0),
    ("cider", "captioning (CIDEr-D)", 90.0),
    ("wer", "speech recognition (WER %, lower is better)", 80.0),
    ("cer", "speech recognition (CER %, lower is better)", None),
]


def fmt(xs: list[float], unit: str = "") -> str:
    """mean ± std, or — when undefined (a retention whose teacher scores 0)."""
    xs = [x for x in xs if x == x]
    return mean_std(xs) + unit if xs else "—"


def retention(metric: str, student: float, teacher: float) -> float:
    if metric in LOWER_IS_BETTER:
        return 100.0 * teacher / student if student > 0 else float("nan")
    return 100.0 * student / teacher if teacher > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1000, help="ShapesWorld images (each also spoken twice)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher-steps", type=int, default=None, help="default: the shipped recipe's")
    ap.add_argument("--student-steps", type=int, default=None, help="default: the shipped recipes'")
    ap.add_argument("--eval-items", type=int, default=None, help="default: the shipped recipes'")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE:KEY=VALUE", help="as in family_kd.py")
    ap.add_argument("--tag", default="")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    suffix = f"-{args.tag}" if args.tag else ""
    module = api._recipe_module("generative")
    t0, load0 = time.time(), os.getloadavg()[0]
    ensure_data(args.out, args.n, audio=True)
    t_data = time.time() - t0
    recipes = family_recipes(args.out, "omni", args.teacher_steps, args.student_steps, args.eval_items, args.sets)
    api.train_stages(recipes)
    teacher = eval_of(module, recipes["teacher"])
    rows = []
    # the student alone does not depend on a --set aimed at the KD student: runs of one --out share it
    base_suffix = suffix if "student-base" in parse_sets(args.sets) else ""
    for seed in args.seeds:
        res = {}
        for role in ("student-base", "student-kd"):
            r = variant(recipes[role], f"{role}-s{seed}{suffix if role == 'student-kd' else base_suffix}", seed=seed)
            res[role] = module.run(r, overwrite=True)["eval"] if not api.is_finished(r) else eval_of(module, r)
        rows.append({"seed": seed, "baseline": res["student-base"], "kd": res["student-kd"]})

    tm = teacher["metrics"]
    md = [
        f"### Qwen3-Omni thinker KD on ShapesWorld with speech (seeds {args.seeds})",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — 1-min load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end — commit {git_rev()} — {time.time() - t0:.0f} s in all, {t_data:.0f} s of it generating the data",
        "",
        f"Teacher: {teacher['params'] / 1e6:.2f}M parameters, {recipes['teacher'].train.max_steps} steps × {recipes['teacher'].train.batch_size}; "
        f"students: {rows[0]['kd']['params'] / 1e6:.2f}M ({100 * rows[0]['kd']['params'] / teacher['params']:.1f}% of the teacher), "
        f"{recipes['student-kd'].train.max_steps} steps × {recipes['student-kd'].train.batch_size} each; "
        f"evaluated on the first {teacher['items']} records of omni_test.jsonl.",
        "",
        "| task | teacher | student alone | student distilled | retention alone | retention distilled | KD ahead? |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = {}
    for metric, task, target in TASKS:
        if metric not in tm:
            continue
        base = [r["baseline"]["metrics"][metric] for r in rows]
        kd = [r["kd"]["metrics"][metric] for r in rows]
        ret_b = [retention(metric, b, tm[metric]) for b in base]
        ret_k = [retention(metric, k, tm[metric]) for k in kd]
        ahead = [(k < b) if metric in LOWER_IS_BETTER else (k > b) for k, b in zip(kd, base)]
        summary[metric] = {"teacher": tm[metric], "baseline": base, "kd": kd, "retention_baseline": ret_b, "retention_kd": ret_k, "kd_ahead": ahead, "target": target}
        md.append(f"| {task} | {tm[metric]:.2f} | {fmt(base)} | {fmt(kd)} | {fmt(ret_b, '%')} | {fmt(ret_k, '%')}"
                  f"{f' (target ≥ {target:.0f}%)' if target else ''} | {sum(ahead)}/{len(ahead)} seeds |")
    md += ["", "Retention = student ÷ teacher (— when the teacher scores 0); for WER / CER teacher ÷ student. \"KD ahead?\": seeds on "
           "which the distilled student beats the student alone (a tie is not ahead). Per skill (eval.json `per_skill`) is in the JSON file.", ""]
    write(args.results, f"omni_kd{suffix}", {"teacher": teacher, "rows": rows, "tasks": summary, "machine": machine(), "commit": git_rev()}, "\n".join(md))


if __name__ == "__main__":
    main()
