"""The demo as a newcomer runs it: wall time of `mmdistill demo` (target < 10 minutes on 2 cores) and its table.

    python benchmarks/demo.py --out runs/demo-bench

Starts from an empty folder (data generation and the teacher included). Writes benchmarks/results/demo.{json,md}.
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
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmdistill.cli", "demo", "--out", str(args.out)], check=True, capture_output=True)
    seconds = time.perf_counter() - t
    rep = json.loads((args.out / "report" / "report.json").read_text())
    runs = {r["name"]: r for r in rep["runs"]}
    kd, base, teacher = runs["student-kd"], runs["student-base"], runs["teacher"]
    md = "\n".join([
        "### `mmdistill demo` (from an empty folder)",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()}",
        "",
        f"- Wall time: {seconds / 60:.1f} min (target < 10 min), data generation and the teacher included.",
        f"- Mean R@1: teacher {teacher['metrics']['mean_R@1']:.2f}, student alone {base['metrics']['mean_R@1']:.2f}, "
        f"student distilled {kd['metrics']['mean_R@1']:.2f} = {100 * kd['retention']['mean_R@1']:.1f}% of the teacher, "
        f"{kd['metrics']['mean_R@1'] - base['metrics']['mean_R@1']:+.2f} points over the student alone "
        f"(gallery {json.loads((args.out / 'teacher' / 'eval.json').read_text())['gallery']} test pairs; shorter budgets than the benchmark above).",
        "",
    ])
    write(args.results, "demo", {"seconds": seconds, "report": rep, "machine": machine(), "commit": git_rev()}, md)


if __name__ == "__main__":
    main()
