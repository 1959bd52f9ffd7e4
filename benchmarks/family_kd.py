"""Target check for the reranker and generative families: teacher, student alone, student distilled, N seeds.

    python benchmarks/family_kd.py --family reranker --out runs/bench-rerank --seeds 0 1 2
    python benchmarks/family_kd.py --family generative --out runs/bench-vlm --seeds 0 1 2

One teacher (seed 0) from the shipped ShapesWorld teacher recipe of the family; for each seed the shipped
baseline and KD student recipes (same steps, data and architecture) with that seed. Writes
benchmarks/results/<family>_kd.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml
from common import ensure_data, eval_of, git_rev, machine, mean_std, run_or_reuse, variant, write

from mmdistill import api

HEADLINE = {"reranker": "ndcg@10", "generative": "vqa_accuracy"}
AGREEMENT = {"reranker": ["top3_overlap", "kendall_tau"], "generative": ["agreement"]}
TARGETS = {"reranker": (95.0, 0.0), "generative": (90.0, 5.0)}  # retention %, gap over the baseline (points)


def parse_sets(items: list[str]) -> dict[str, dict[str, object]]:
    """``STAGE:dotted.key=value`` (value read as YAML) -> {stage: {key: value}}; STAGE "students" means both students."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        stage, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq or not key:
            raise SystemExit(f"--set {item!r}: expected STAGE:dotted.key=value, e.g. teacher:train.lr=0.001")
        for s in ("student-base", "student-kd") if stage == "students" else (stage,):
            out.setdefault(s, {})[key] = yaml.safe_load(value)
    return out


STUDENTS = {  # --students: which shipped student recipes
    "shipped": {},
    "pruned": {"student-base": "reranker/shapesworld-student-pruned-alone.yaml", "student-kd": "reranker/shapesworld-student-pruned-kd.yaml"},
}


def family_recipes(out: Path, family: str, teacher_steps: int | None, student_steps: int | None, eval_items: int | None, sets: list[str] = (),
                    teacher_dir: str = "teacher", students: str = "shipped"):
    """The shipped recipes with the benchmark's budgets; the teacher trains in `out/teacher_dir` and the students use it."""
    rs = api.demo_recipes(out, family=family, stages=STUDENTS[students])
    default_teacher = str(Path(rs["teacher"].output_dir) / "model")
    changes = {"train.save_every": 500}
    if eval_items:
        changes["eval.max_items"] = eval_items
    rs["teacher"] = variant(rs["teacher"], teacher_dir, **changes, **({"train.max_steps": teacher_steps} if teacher_steps else {}))
    t_model = str(Path(rs["teacher"].output_dir) / "model")
    for k in ("student-base", "student-kd"):
        rs[k] = variant(rs[k], k, **changes, **({"train.max_steps": student_steps} if student_steps else {}),
                        **({"teacher.model": t_model} if rs[k].teacher is not None else {}), **({"eval.reference": t_model} if rs[k].eval.reference else {}),
                        **({"student.model": t_model} if rs[k].student.model == default_teacher else {}))  # a student pruned from the teacher
    for stage, kv in parse_sets(list(sets)).items():
        if stage not in rs:
            raise SystemExit(f"--set: unknown stage {stage!r}; choose one of {sorted(rs)} or 'students'")
        rs[stage] = variant(rs[stage], Path(rs[stage].output_dir).name, **kv)  # keeps the folder (e.g. --teacher-dir)
    return rs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["reranker", "generative"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=10000, help="ShapesWorld images")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher-steps", type=int, default=None, help="default: the shipped recipe's")
    ap.add_argument("--student-steps", type=int, default=None, help="default: the shipped recipes'")
    ap.add_argument("--eval-items", type=int, default=None, help="default: the shipped recipes'")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help="change one stage's recipe, e.g. vlm-teacher:train.max_steps=3000 or students:train.lr=0.001 (repeatable)")
    ap.add_argument("--teacher-dir", default="teacher", help="the teacher's run folder under --out (another name keeps a teacher of another budget beside the first)")
    ap.add_argument("--students", choices=sorted(STUDENTS), default="shipped",
                    help="reranker: 'pruned' runs the students pruned from the teacher (shapesworld-student-pruned-{alone,kd}.yaml)")
    ap.add_argument("--tag", default="", help="results file suffix: <family>_kd<-tag>.{md,json} (keeps the shipped-recipe results beside a variant's)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    family = args.family
    suffix = f"-{args.tag}" if args.tag else ""  # a tagged variant keeps its own run folders and results files
    module = api._recipe_module(family)
    ensure_data(args.out, args.n)
    if args.students != "shipped" and family != "reranker":
        raise SystemExit(f"--students {args.students}: only for --family reranker")
    recipes = family_recipes(args.out, family, args.teacher_steps, args.student_steps, args.eval_items, args.sets, args.teacher_dir, args.students)
    t0 = time.time()
    api.train_stages(recipes)
    t_eval = eval_of(module, recipes["teacher"])  # re-evaluated when --eval-items differs from its recorded eval
    rows = []
    for seed in args.seeds:
        res = {}
        for role in ("student-base", "student-kd"):
            r = variant(recipes[role], f"{role}-s{seed}{suffix}", seed=seed)
            res[role] = run_or_reuse(module, r, args.out)  # a finished identical run (e.g. under another tag) is reused
        rows.append({"seed": seed, "baseline": res["student-base"], "kd": res["student-kd"]})

    key = HEADLINE[family]
    t_val = t_eval["metrics"][key]
    base = [r["baseline"]["metrics"][key] for r in rows]
    kd = [r["kd"]["metrics"][key] for r in rows]
    retention = [100 * k / t_val if t_val else float("nan") for k in kd]
    gap = [k - b for k, b in zip(kd, base)]
    ratio = rows[0]["kd"]["params"] / t_eval["params"]
    metrics = [m for m in rows[0]["kd"]["metrics"] if m not in ("recall@10",)]
    md = [
        f"### {family.capitalize()} KD on ShapesWorld (seeds {args.seeds})",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()} — {time.time() - t0:.0f} s",
        "",
        "| model | params | " + " | ".join(metrics) + " | latency ms |",
        "| --- | --- | " + " | ".join("---" for _ in metrics) + " | --- |",
        f"| teacher (seed 0) | {t_eval['params'] / 1e6:.2f}M | " + " | ".join(f"{t_eval['metrics'].get(m, float('nan')):.2f}" for m in metrics) + " | "
        + " / ".join(f"{v:.1f}" for v in t_eval["latency_ms"].values()) + " |",
    ]
    if t_eval.get("chance"):
        md.append("| chance (random scores) | — | " + " | ".join(f"{t_eval['chance'].get(m, float('nan')):.2f}" if m in t_eval["chance"] else "—" for m in metrics) + " | — |")
    for label, k in (("student alone (no KD)", "baseline"), ("student distilled", "kd")):
        ms = [r[k]["metrics"] for r in rows]
        md.append(
            f"| {label} | {rows[0][k]['params'] / 1e6:.2f}M ({100 * rows[0][k]['params'] / t_eval['params']:.0f}%) | "
            + " | ".join(mean_std([x.get(m, float("nan")) for x in ms]) for m in metrics) + " | "
            + " / ".join(f"{v:.1f}" for v in rows[0][k]["latency_ms"].values()) + " |"
        )
    want_ret, want_gap = TARGETS[family]
    md += [
        "",
        f"- Retention of the teacher's {key}: **{mean_std(retention)}%** (target ≥ {want_ret:.0f}%).",
        f"- KD student − no-KD student, {key}: **{mean_std(gap)} points** (target {'> 0' if want_gap == 0 else f'≥ {want_gap:.0f}'}).",
    ]
    for m in AGREEMENT[family]:
        md.append(f"- Agreement with the teacher, {m}: KD {mean_std([r['kd']['metrics'].get(m, float('nan')) for r in rows])}, "
                  f"no-KD {mean_std([r['baseline']['metrics'].get(m, float('nan')) for r in rows])}.")
    md += [f"- Student size: {100 * ratio:.1f}% of the teacher's parameters (target ≤ 25%).", ""]
    payload = {"family": family, "teacher": t_eval, "rows": rows, "retention": retention, "gap": gap, "param_ratio": ratio, "machine": machine(), "commit": git_rev()}
    write(args.results, f"{family}_kd{suffix}", payload, "\n".join(md))


if __name__ == "__main__":
    main()
