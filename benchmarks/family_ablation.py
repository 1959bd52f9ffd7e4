"""Loss ablations for the reranker and generative families, on one budget, against one teacher.

    python benchmarks/family_ablation.py --family reranker --out runs/bench-rerank
    python benchmarks/family_ablation.py --family generative --out runs/bench-vlm

reranker: pointwise MSE vs Margin-MSE (label-ordered pairs, shipped; or teacher-ordered pairs) vs listwise KL vs the hybrid (listwise KL + last-token feature term,
weights 0.7/0.3 shifting to 0.4/0.6), each added to the label terms (CE + BCE) as in the shipped KD recipe.
generative: forward KL vs reverse KL vs JSD(0.5) vs skew KL(0.1), each with and without the feature terms;
white-box (forward KL) vs black-box (SFT on the teacher's greedy answers, written by `teacher generate`).
The teacher comes from benchmarks/family_kd.py (same --out) or is trained here. Writes
benchmarks/results/<family>_ablation.{json,md}. `--variants` runs some of them only, `--tag` keeps their results
(and run folders) apart, e.g. the reranker at the long student budget:

    python benchmarks/family_ablation.py --family reranker --out runs/bench-rr2 --set vlm-teacher:train.max_steps=3000 \
        --teacher-steps 1500 --student-steps 3000 --variants margin_mse --tag long-students
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import ensure_data, git_rev, machine, run_or_reuse, variant, write
from family_kd import HEADLINE, family_recipes

from mmdistill import api

LABELS = {"ce": {"weight": 1.0}, "bce": {"weight": 1.0}}  # the student's own label terms, kept in every variant (as in the shipped KD recipe)
RERANK = {
    "pointwise": {"pointwise": {"weight": 1.0}, **LABELS},
    "margin_mse (shipped)": {"margin_mse": {"weight": 1.0}, **LABELS},
    "margin_mse, teacher-ordered pairs": {"margin_mse": {"weight": 1.0, "options": {"pairs": "teacher"}}, **LABELS},
    "listwise_kl": {"listwise_kl": {"weight": 1.0}, **LABELS},
    "hybrid (listwise KL + feature, scheduled)": {
        "listwise_kl": {"weight": 1.0, "schedule": {"kind": "linear", "start": 0.7, "end": 0.4}},
        "feature": {"weight": 1.0, "schedule": {"kind": "linear", "start": 0.3, "end": 0.6}},
        **LABELS,
    },
}
DIVERGENCES = {"forward KL": {"divergence": "forward_kl"}, "reverse KL": {"divergence": "reverse_kl"}, "JSD(0.5)": {"divergence": "jsd", "beta": 0.5}, "skew KL(0.1)": {"divergence": "skew_kl", "alpha": 0.1}}


def generative_variants() -> dict[str, dict]:
    out = {}
    for name, opts in DIVERGENCES.items():
        kd = {"weight": 1.0, "options": {**opts, "temperature": 1.0, "chunk_size": 256}}
        out[f"{name}"] = {"sft": {"weight": 1.0}, "kd": kd}
        out[f"{name} + features"] = {"sft": {"weight": 1.0}, "kd": kd, "vision": {"weight": 1.0}, "text": {"weight": 1.0}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["reranker", "generative"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--student-steps", type=int, default=None)
    ap.add_argument("--eval-items", type=int, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE:KEY=VALUE", help="as in family_kd.py")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help="run only the variants whose name starts with one of these (default: all)")
    ap.add_argument("--tag", default="", help="results file suffix: <family>_ablation<-tag>.{md,json}")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    family = args.family
    suffix = f"-{args.tag}" if args.tag else ""  # a tagged run keeps its own run folders and results file
    module = api._recipe_module(family)
    variants = RERANK if family == "reranker" else generative_variants()
    names = list(variants) + (["black-box"] if family == "generative" else [])
    wanted = lambda name: not args.variants or any(name.startswith(v) for v in args.variants)  # noqa: E731
    if args.variants:
        unknown = [v for v in args.variants if not any(n.startswith(v) for n in names)]
        if unknown:
            raise SystemExit(f"--variants: no variant starts with {unknown}; the variants: {names}")
    data = ensure_data(args.out, args.n)
    recipes = family_recipes(args.out, family, args.teacher_steps, args.student_steps, args.eval_items, args.sets)
    t0 = time.time()
    api.train_stages(recipes)
    kd = recipes["student-kd"]
    rows = []
    for i, (name, terms) in enumerate(variants.items()):
        if not wanted(name):
            continue
        terms = {k: {"weight": v.get("weight", 1.0), "schedule": v.get("schedule"), "options": v.get("options", {})} for k, v in terms.items()}
        r = variant(kd, f"ablation{suffix}-{i}", **{"loss.terms": terms})
        rows.append({"variant": name, "eval": run_or_reuse(module, r, args.out)})
    if family == "generative" and wanted("black-box"):  # black-box: the teacher's own greedy answers as targets
        answers = data / "teacher_answers.jsonl"
        train = Path(kd.data.train)
        n = (kd.train.max_steps * kd.train.batch_size)
        api.teacher_generate(train, answers, teacher=str(Path(recipes["teacher"].output_dir) / "model"), max_new_tokens=48, batch_size=32, limit=n, log=lambda *_: None)
        r = variant(kd, f"ablation{suffix}-blackbox", **{"loss.terms": {"sft": {"weight": 1.0}}, "data.train": str(answers), "data.response_field": "teacher_response", "data.on_error": "skip", "teacher": None, "role": "student"})
        rows.append({"variant": "black-box (SFT on teacher answers)", "eval": module.run(r, overwrite=True)["eval"]})
    key = HEADLINE[family]
    metrics = list(rows[0]["eval"]["metrics"])
    md = [
        f"### {family.capitalize()} loss ablation on ShapesWorld (same student, steps and data; seed 0)",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()} — {time.time() - t0:.0f} s",
        "",
        "| variant | " + " | ".join(metrics) + " |",
        "| --- | " + " | ".join("---" for _ in metrics) + " |",
    ]
    for row in rows:
        md.append(f"| {row['variant']} | " + " | ".join(f"{row['eval']['metrics'].get(m, float('nan')):.2f}" for m in metrics) + " |")
    best = max(rows, key=lambda r: r["eval"]["metrics"][key])
    md += ["", f"Best {key}: {best['variant']} ({best['eval']['metrics'][key]:.2f}).", ""]
    write(args.results, f"{family}_ablation{suffix}", {"family": family, "rows": rows, "machine": machine(), "commit": git_rev()}, "\n".join(md))


if __name__ == "__main__":
    main()
