"""The demo as a newcomer runs it: wall time of `mmdistill demo` (target < 10 minutes on 2 cores) and its table.

    python benchmarks/demo.py --out runs/demo-bench
    python benchmarks/demo.py --family generative --out runs/demo-gen-bench     (target < 15 minutes)
    python benchmarks/demo.py --family omni --out runs/demo-omni-bench          (target < 15 minutes; needs espeak-ng)

Starts from an empty folder (data generation and the teacher included). Writes benchmarks/results/demo.{json,md} (demo_<family> for the other families).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import git_rev, machine, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/demo-bench"))
    ap.add_argument("--family", default="contrastive", choices=["contrastive", "reranker", "generative", "omni"])
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmdistill.cli", "demo", "--family", args.family, "--out", str(args.out)], check=True, capture_output=True)
    seconds = time.perf_counter() - t
    rep = json.loads((args.out / "report" / "report.json").read_text())
    runs = {r["name"]: r for r in rep["runs"]}
    kd, base, teacher = runs["student-kd"], runs["student-base"], runs["teacher"]
    key = rep["headline"]
    target = {"contrastive": 10, "reranker": 10, "generative": 15, "omni": 15}[args.family]
    md = "\n".join([
        f"### `mmdistill demo --family {args.family}` (from an empty folder)",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()}",
        "",
        f"- Wall time: {seconds / 60:.1f} min (target < {target} min), data generation and the teacher included.",
        f"- {key}: teacher {teacher['metrics'][key]:.2f}, student alone {base['metrics'][key]:.2f}, "
        f"student distilled {kd['metrics'][key]:.2f} = {100 * kd['retention'][key]:.1f}% of the teacher, "
        f"{kd['metrics'][key] - base['metrics'][key]:+.2f} points over the student alone (the shipped demo recipes; the contrastive demo uses shorter budgets than its benchmark).",
        "",
    ])
    if args.family == "omni":  # one row per task kind, as the demo's report
        from mmdistill.evaluate.report import TASK_ROWS

        rows = ["| task | teacher | student alone | student distilled |", "| --- | --- | --- | --- |"]
        for metric, task in TASK_ROWS:
            if metric in teacher["metrics"]:
                rows.append(f"| {task} | " + " | ".join(f"{r['metrics'].get(metric, float('nan')):.2f}" for r in (teacher, base, kd)) + " |")
        md += "\n" + "\n".join(rows) + "\n\nA demo-budget run (the shipped recipes, one seed); benchmarks/omni_kd.py measures the Omni family at other budgets.\n"
    name = "demo" if args.family == "contrastive" else f"demo_{args.family}"
    write(args.results, name, {"seconds": seconds, "report": rep, "machine": machine(), "commit": git_rev()}, md)


if __name__ == "__main__":
    main()
