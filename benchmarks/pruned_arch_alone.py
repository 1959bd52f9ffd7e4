"""The pruned reranker student's architecture, trained without the teacher at all: the strict "same student, no KD".

    python benchmarks/pruned_arch_alone.py --out runs/bench-rr2 --seeds 0 1 2 --student-steps 3000 --teacher-dir teacher-3k

`family_kd.py --students pruned` compares the pruned-then-distilled student with the same pruned student trained on
the labels, which still starts from the teacher's weights. This script builds a tiny Qwen3-VL of exactly the pruned
student's shape, read from the distilled student's config.json (3 text layers of width 64, one key/value group of 2 query heads, MLP 160; one vision block of width
32, 2 heads, MLP 64; 128 px images), trains it alone on the ShapesWorld captions as the shipped small VLM is
(`generative/shapesworld-student-baseline.yaml`), then, per seed, trains a yes/no reranker from it on the labels
only (`reranker/shapesworld-student-baseline.yaml`, the same budget as the pruned students). It compares each seed
with the distilled pruned student of `--kd-results` (same seed). Writes benchmarks/results/reranker_pruned_arch_alone.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import ensure_data, git_rev, machine, mean_std, run_or_reuse, variant, write
from family_kd import family_recipes

from mmdistill import api

ARCH_KEYS = {  # what fixes the shape of a tiny Qwen3-VL built from a preset (head_dim follows hidden / heads)
    "text_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size"),
    "vision_config": ("hidden_size", "num_heads", "intermediate_size", "depth", "deepstack_visual_indexes", "out_hidden_size"),
}


def arch_of(model_dir: str | Path) -> dict:
    """The shape overrides of a saved Qwen3-VL (here the distilled pruned student), so the model built from scratch
    is that architecture by construction, not by a copy of its numbers."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = {f"{part}.{key}": config[part][key] for part, keys in ARCH_KEYS.items() for key in keys}
    if config["text_config"].get("head_dim", arch["text_config.hidden_size"] // arch["text_config.num_attention_heads"]) * arch[
        "text_config.num_attention_heads"
    ] != arch["text_config.hidden_size"]:
        raise SystemExit(f"{model_dir}: head_dim x heads != hidden size; a preset-built model would not have this shape")
    return arch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--student-steps", type=int, default=3000)
    ap.add_argument("--teacher-dir", default="teacher-3k", help="the trained teacher the agreement is measured against")
    ap.add_argument("--kd-results", type=Path, default=Path(__file__).parent / "results" / "reranker_kd-pruned.json")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tag", default="", help="results file suffix and run-folder suffix, e.g. 6k for --student-steps 6000 --kd-results .../reranker_kd-pruned-6k.json")
    args = ap.parse_args()

    suffix = f"-{args.tag}" if args.tag else ""
    kd = {r["seed"]: r["kd"] for r in json.loads(args.kd_results.read_text())["rows"]}
    missing = [s for s in args.seeds if s not in kd]
    if missing:
        raise SystemExit(f"{args.kd_results} has no distilled student for seed(s) {missing}")
    t0 = time.time()
    ensure_data(args.out, args.n)
    rs = family_recipes(args.out, "reranker", None, args.student_steps, None, teacher_dir=args.teacher_dir)
    if not (Path(rs["teacher"].output_dir) / "model").is_dir():
        raise SystemExit(f"no trained teacher in {rs['teacher'].output_dir}: run family_kd.py with --teacher-dir {args.teacher_dir} first")
    archs = {json.dumps(arch_of(kd[s]["model_dir"]), sort_keys=True) for s in args.seeds}
    if len(archs) != 1:
        raise SystemExit(f"the distilled students of {args.kd_results} differ in shape: {sorted(archs)}")
    arch = json.loads(archs.pop())
    vlm = variant(rs["vlm-student"], "vlm-pruned-arch", **{"student.preset": "vlm-teacher", "student.image_size": 128, "student.overrides": arch})
    run_or_reuse(api._recipe_module("generative"), vlm, args.out)
    rows = []
    for seed in args.seeds:
        r = variant(rs["student-base"], f"student-base-s{seed}-pruned-arch{suffix}", seed=seed, **{"student.model": str(Path(vlm.output_dir) / "model")})
        rows.append({"seed": seed, "alone": run_or_reuse(api._recipe_module("reranker"), r, args.out), "kd": kd[seed]})

    key = "ndcg@10"
    gap = [r["kd"]["metrics"][key] - r["alone"]["metrics"][key] for r in rows]
    md = [
        f"### The pruned reranker student's architecture trained without the teacher (strict no-KD baseline; reranker stage {args.student_steps} steps)",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()} — {time.time() - t0:.0f} s",
        "",
        "| seed | params, from scratch / pruned | NDCG@10 from scratch, no teacher | NDCG@10 pruned + distilled | gap | top-3 overlap with the teacher, scratch / distilled |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r, g in zip(rows, gap):
        a, k = r["alone"], r["kd"]
        md.append(f"| {r['seed']} | {a['params'] / 1e6:.3f}M / {k['params'] / 1e6:.3f}M | {a['metrics'][key]:.2f} | {k['metrics'][key]:.2f} | {g:+.2f} | "
                  f"{a['metrics'].get('top3_overlap', float('nan')):.1f} / {k['metrics'].get('top3_overlap', float('nan')):.1f} |")
    md += ["", f"- Pruned + distilled − same architecture trained alone from scratch, {key}: **{mean_std(gap)} points** (target > 0).", ""]
    payload = {"rows": rows, "gap": gap, "vlm": str(vlm.output_dir), "machine": machine(), "commit": git_rev()}
    write(args.results, f"reranker_pruned_arch_alone{suffix}", payload, "\n".join(md))


if __name__ == "__main__":
    main()
