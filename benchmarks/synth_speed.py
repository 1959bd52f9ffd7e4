"""How long ShapesWorld takes to generate (target: 20k images at 64 px in under a minute on 2 cores).

    python benchmarks/synth_speed.py --n 20000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import git_rev, machine, write

from mmdistill.data.synth import generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp()) / "sw"
    t = time.perf_counter()
    summary = generate(out, n=args.n, size=args.size)
    dt = time.perf_counter() - t
    shutil.rmtree(out.parent)
    counts = summary.get("counts", {})
    md = "\n".join([
        f"### ShapesWorld generation ({args.n} images, {args.size} px)",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()}",
        "",
        f"- {dt:.1f} s for {args.n} images and all record files ({', '.join(f'{k}: {v}' for k, v in counts.items())}); target < 60 s.",
        "",
    ])
    write(args.results, "synth_speed", {"seconds": dt, "n": args.n, "size": args.size, "summary": summary, "machine": machine(), "commit": git_rev()}, md)


if __name__ == "__main__":
    main()
