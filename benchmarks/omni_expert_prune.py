"""An Omni student made by expert pruning: the trained Qwen3-Omni thinker teacher with half of every MoE layer's experts
pruned (issue 14's `mmdistill prune --experts`), evaluated as pruned and after healing by distillation from the unpruned
teacher (the shipped Omni KD recipe, the pruned folder as its student), per task, N healing seeds.

    python benchmarks/omni_kd.py --out runs/bench-omni --n 1000 --teacher-steps 4000 --student-steps 1600 --tag long
    python benchmarks/omni_expert_prune.py --out runs/bench-omni --steps 1600 --seeds 0 1 2

It reuses omni_kd.py's finished teacher and data in --out (run that first). Pruning calibrates on the first 64 omni
training records (image chat, transcription and spoken questions: the audio tower runs in calibration too). Writes
benchmarks/results/omni_expert_prune.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import eval_of, git_rev, machine, mean_std, variant, write
from family_kd import family_recipes
from omni_kd import TASKS, fmt, retention

from mmdistill import api


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True, help="omni_kd.py's --out (its teacher and data are reused)")
    ap.add_argument("--method", default="reap", choices=["reap", "frequency", "reconstruction"])
    ap.add_argument("--fraction", type=float, default=0.5, help="fraction of every MoE layer's experts pruned")
    ap.add_argument("--steps", type=int, default=1600, help="healing steps (the students' budget of the omni_kd run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-items", type=int, default=None)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()[0]
    module = api._recipe_module("generative")
    recipes = family_recipes(args.out, "omni", None, args.steps, args.eval_items)
    teacher_dir = Path(recipes["teacher"].output_dir)
    if not (teacher_dir / "model" / "config.json").is_file():
        raise SystemExit(f"{teacher_dir}: no trained teacher; run benchmarks/omni_kd.py --out {args.out} first")
    teacher = json.loads((teacher_dir / "eval.json").read_text())
    data = args.out / "data"
    tag = f"{args.method}-{int(100 * args.fraction)}"
    pruned = args.out / f"teacher-experts-{tag}"
    if not (pruned / "config.json").is_file():
        api.prune(teacher_dir / "model", pruned, experts=args.fraction, method=args.method, calibration=data / "omni_train.jsonl", max_samples=64, overwrite=True)
    kd = recipes["student-kd"]
    unhealed = args.out / f"pruned-{tag}-unhealed-eval.json"
    if unhealed.is_file():
        as_pruned = json.loads(unhealed.read_text())
    else:
        as_pruned = api.evaluate(pruned, kd.data.val, out=unhealed, max_items=kd.eval.max_items, latency=False, max_new_tokens=kd.eval.max_new_tokens)
    rows = []
    for seed in args.seeds:
        r = variant(kd, f"pruned-{tag}-healed-s{seed}", seed=seed, **{"student.init": "pretrained", "student.model": str(pruned), "student.preset": None})
        rows.append(module.run(r, overwrite=True)["eval"] if not api.is_finished(r) else eval_of(module, r))
    params = {"teacher": teacher.get("params"), "pruned": as_pruned.get("params")}

    tm = teacher["metrics"]
    md = [
        f"### An Omni student by expert pruning: the teacher with {int(100 * args.fraction)}% of its experts pruned ({args.method}), healed by KD (seeds {args.seeds})",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()} — {time.time() - t0:.0f} s — "
        f"1-min load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        "",
        f"Teacher: omni_kd.py's teacher in `{teacher_dir}` ({(params['teacher'] or 0) / 1e6:.2f}M parameters); pruned: "
        f"{(params['pruned'] or 0) / 1e6:.2f}M parameters, calibrated on 64 omni training records; healed: the shipped Omni KD "
        f"recipe (forward KL, vision, audio, hidden-state and answer terms) with the pruned folder as its student, {args.steps} steps × "
        f"{kd.train.batch_size}. Evaluated on the first {kd.eval.max_items} records of omni_test.jsonl.",
        "",
        "| task | teacher | pruned, not healed | pruned + healed | retention not healed | retention healed (target) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for metric, task, target in TASKS:
        if metric not in tm:
            continue
        healed = [r["metrics"][metric] for r in rows]
        md.append(f"| {task} | {tm[metric]:.2f} | {as_pruned['metrics'][metric]:.2f} | {mean_std(healed)} | "
                  f"{fmt([retention(metric, as_pruned['metrics'][metric], tm[metric])], '%')} | "
                  f"{fmt([retention(metric, h, tm[metric]) for h in healed], '%')}{f' (≥ {target:.0f}%)' if target else ''} |")
    md += ["", "Retention = student ÷ teacher; for WER / CER teacher ÷ student. The pruning is deterministic: the seeds differ in the healing run only."]
    payload = {"teacher": teacher, "pruned": as_pruned, "healed": rows, "params": params, "method": args.method, "fraction": args.fraction,
               "steps": args.steps, "seeds": args.seeds, "machine": machine(), "commit": git_rev(), "seconds": time.time() - t0}
    write(args.results, "omni_expert_prune", payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
