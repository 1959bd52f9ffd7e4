"""How much do two rerankers trained by the same recipe agree with each other? A ceiling for "copy the teacher".

    python benchmarks/rank_agreement.py --name reranker_seed_agreement \
        --group "students alone (3000 steps)" runs/bench-rr2/student-base-s{0,1,2}-long-students \
        --group "students distilled (3000 steps)" runs/bench-rr2/student-kd-s{0,1,2}-long-students \
        --group "teachers (1500 vs 3000 steps)" runs/bench-rr2/teacher runs/bench-rr2/teacher-3k

Reads each evaluated run folder's `scores.jsonl` (the scores `mmdistill eval` wrote for every test query) and
reports, for every pair of runs within a group, the top-3 overlap and Kendall τ of one run's ranking against
the other's (`mmdistill.evaluate.ranking.teacher_agreement`, the metric the reranker targets use), then the
mean over the group's pairs. No model is run. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path

from common import git_rev, machine, mean_std, write

from mmdistill.evaluate.ranking import teacher_agreement


def load_scores(run: Path) -> dict[str, list[float]]:
    path = run / "scores.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no scores; evaluate the run first (mmdistill eval)")
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            out[row["id"]] = row["scores"]
        except (json.JSONDecodeError, KeyError) as e:
            raise SystemExit(f"{path}:{i}: not a scores row ({e})") from None
    return out


def pair_agreement(a: dict[str, list[float]], b: dict[str, list[float]], k: int) -> dict:
    ids = [q for q in a if q in b]
    if not ids:
        raise SystemExit("the two runs share no evaluated query")
    return teacher_agreement([a[q] for q in ids], [b[q] for q in ids], k=k) | {"n_queries": len(ids)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "RUN"),
                    help="a label then two or more evaluated run folders (repeatable)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--name", default="rank_agreement", help="results file name")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    k = args.k
    groups = []
    for label, *runs in args.group:
        if len(runs) < 2:
            raise SystemExit(f"--group {label!r}: give two or more run folders")
        scores = {r: load_scores(Path(r)) for r in runs}
        pairs = [{"a": a, "b": b, **pair_agreement(scores[a], scores[b], k)} for a, b in itertools.combinations(runs, 2)]
        groups.append({"label": label, "runs": runs, "pairs": pairs})

    md = [
        f"### Reranker agreement between runs of one recipe (top-{k} overlap, Kendall τ)",
        "",
        f"Command: `python {shlex.join(sys.argv)}` — machine: {machine()} — commit {git_rev()}",
        "",
        f"| runs compared | pairs | top-{k} overlap % | Kendall τ |",
        "| --- | --- | --- | --- |",
    ]
    for g in groups:
        ov = [100 * p[f"top{k}_overlap"] for p in g["pairs"]]
        tau = [p["kendall_tau"] for p in g["pairs"]]
        md.append(f"| {g['label']} | {len(g['pairs'])} | {mean_std(ov)} | {mean_std(tau)} |")
    md.append("")
    write(args.results, args.name, {"k": k, "groups": groups, "machine": machine(), "commit": git_rev()}, "\n".join(md))


if __name__ == "__main__":
    main()
