"""The teacher store side by side with the live teacher, one run: generative KD on ShapesWorld.

    python benchmarks/teacher_store.py --out runs/bench-store [--n 2000] [--teacher-steps 300] [--student-steps 60]

Trains the shipped ShapesWorld VLM teacher (a short budget: this measures cost and fidelity, not quality), writes
stores of its signals for the shipped KD student's recipe (top-k for several k, and sampled sets), then

- per store: time to cache, bytes per response token (the logit signal alone, and with the features the recipe's
  loss reads), and the KD loss on the same first batch against the dense live teacher at T = 1 and at T = 2 (the
  shipped schedule's start);
- per student run (the same steps, interleaved repeats, the median): training samples/s of SFT alone, KD from the
  live teacher and KD from the store (logit KD alone, and the shipped recipe with its feature terms);
- the student step's achieved FLOP/s (FLOPs of one step counted by torch's FlopCounterMode × steps/s) as a share of
  this CPU's fp32 matmul peak, measured in the same run.

Writes benchmarks/results/teacher_store.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ensure_data, git_rev, machine, variant, write

from mmdistill import api
from mmdistill.recipes import generative as gr
from mmdistill.teachers.cache import cache_teacher
from mmdistill.teachers.store import TeacherStore, inspect

QUIET = dict(overwrite=True, log=lambda *_: None)


def logit_bytes(folder: Path) -> float:
    """Bytes per response token of the logit signal alone (ids, log-probs, tail, tail grid or sample counts and log-partition grid, response ids)."""
    st = TeacherStore(folder)
    size = tokens = 0
    for key in st.index:
        row = st.get(key)
        tokens += int(row["response_ids"].shape[0])
        size += sum(t.numel() * t.element_size() for name, t in row.items() if not name.startswith("features."))
    return size / tokens


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    """fp32 FLOP/s of a square matmul on this CPU with torch's threads (best of `reps`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(recipe) -> float:
    """FLOPs of one optimizer step of `recipe` (forward, backward; torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = variant(recipe, Path(recipe.output_dir).name + "-flops", **{"train.max_steps": 1, "train.warmup_steps": 0, "train.save_every": 1})
    with FlopCounterMode(display=False) as fc:
        gr.run(one, evaluate_after=False, **QUIET)
    return float(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-store"))
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each timed run (the median is reported)")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--samples", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--default-k", type=int, default=16, help="the top-k of the timed store runs (the CLI's default)")
    ap.add_argument("--full-recipe-timing", action="store_true", help="also time the shipped recipe (with its vision and text feature terms)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    ensure_data(args.out, args.n)
    rs = api.demo_recipes(args.out, family="generative")
    teacher = variant(rs["teacher"], "teacher", **{"train.max_steps": args.teacher_steps, "eval.max_items": 100})
    if not api.is_finished(teacher):
        gr.run(teacher, overwrite=True, log=lambda *_: None)
    kd = variant(rs["student-kd"], "student-kd", **{"teacher.model": str(Path(teacher.output_dir) / "model"), "train.max_steps": args.student_steps,
                                                   "train.warmup_steps": 5, "eval.max_items": 100, "eval.latency": False})
    t_range = kd.loss.terms["kd"].options["temperature"]
    stores = {f"top-{k}": {"top_k": k} for k in args.ks} | {f"sampled {n}": {"sample": n} for n in args.samples}
    rows: dict[str, dict] = {}
    for name, opts in stores.items():
        folder = args.out / ("store-" + name.replace(" ", "-"))
        timing = folder / "bench_cache_seconds.json"  # the time of the run that wrote the store (a rerun reuses the store)
        if not timing.is_file():
            t = time.perf_counter()
            cache_teacher(kd, folder, log=lambda *_: None, **opts)
            timing.write_text(json.dumps(time.perf_counter() - t))
        info = inspect(folder)
        rows[name] = {"cache_seconds": json.loads(timing.read_text()), "records": info["records"], "bytes_per_token": info["bytes_per_token"],
                      "logit_bytes_per_token": logit_bytes(folder), "folder": str(folder)}
        print(name, rows[name], flush=True)

    # the KD loss on the same first batch (lr ~ 0, one step, sft + kd only): each store against the dense live teacher
    probe = {"train.max_steps": 1, "train.warmup_steps": 0, "train.lr": 1e-9, "train.save_every": 1,
             "loss.terms": {"sft": {"weight": 1.0}, "kd": {"weight": 1.0, "options": {"divergence": "forward_kl", "temperature": 1.0}}}}
    first: dict[str, dict[float, float]] = {}
    for temp in (1.0, 2.0):
        for name in ["live", *stores]:
            over = {**probe, "loss.terms": {**probe["loss.terms"], "kd": {"weight": 1.0, "options": {"divergence": "forward_kl", "temperature": temp}}}}
            if name != "live":
                over |= {"teacher.kind": "store", "teacher.path": rows[name]["folder"]}
            r = variant(kd, f"probe-T{temp:g}-" + name.replace(" ", "-"), **over)
            first.setdefault(name, {})[temp] = gr.run(r, evaluate_after=False, **QUIET)["last"]["kd"]
    for name in stores:
        rows[name]["kd_first"] = {str(t): v for t, v in first[name].items()}
        rows[name]["kd_error"] = {str(t): first[name][t] / first["live"][t] - 1 for t in (1.0, 2.0)}

    # step cost: the same student, the same steps; interleaved repeats so that the machine's load hits every run alike
    default = rows[f"top-{args.default_k}"]["folder"]
    logit_only = {"loss.terms": {"sft": {"weight": 1.0}, "kd": kd.loss.terms["kd"].model_dump()}}
    sft = variant(kd, "sft-alone", **{"loss.terms": {"sft": {"weight": 1.0}}})
    sft = variant(sft.model_copy(update={"teacher": None}), "sft-alone")
    runs = {
        "SFT alone (no teacher)": sft,
        "live teacher, logit KD": variant(kd, "live-logit", **logit_only),
        f"store top-{args.default_k}, logit KD": variant(kd, "store-logit", **logit_only, **{"teacher.kind": "store", "teacher.path": default}),
    }
    if args.full_recipe_timing:
        runs["live teacher, shipped recipe (+ vision, text terms)"] = kd
        runs[f"store top-{args.default_k}, shipped recipe"] = variant(kd, "store-full", **{"teacher.kind": "store", "teacher.path": default})
    speed: dict[str, list[float]] = {name: [] for name in runs}
    last: dict[str, float | None] = {}
    for rep in range(args.repeats):
        for name, r in runs.items():
            out = gr.run(r, evaluate_after=False, **QUIET)
            summary = json.loads((Path(r.output_dir) / "train_summary.json").read_text())
            speed[name].append(summary["samples_per_s"])
            last[name] = out["last"].get("kd")
            print(rep, name, round(summary["samples_per_s"], 1), flush=True)
    sps = {name: statistics.median(v) for name, v in speed.items()}
    plain = sps["SFT alone (no teacher)"]

    peak = matmul_peak()
    flops = {"SFT alone (no teacher)": step_flops(sft), f"store top-{args.default_k}, logit KD": step_flops(runs[f"store top-{args.default_k}, logit KD"])}
    batch = kd.train.batch_size
    share = {name: f * sps[name] / batch / peak for name, f in flops.items()}

    lines = [
        "### Teacher store vs live teacher (generative KD, ShapesWorld)",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()}",
        "",
        f"Teacher: the shipped ShapesWorld VLM teacher recipe at {args.teacher_steps} steps; student: the shipped KD recipe at "
        f"{args.student_steps} steps (sft + forward KL with temperature {json.dumps(t_range)} + vision + text terms), "
        f"{rows[next(iter(rows))]['records']} training records; every store is fp16 (ids int32).",
        "",
        "| store | cache time (s) | bytes / token, logits | bytes / token, with features | KD loss vs dense, T = 1 | KD loss vs dense, T = 2 |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| (live teacher, dense) | — | — | — | {first['live'][1.0]:.4f} | {first['live'][2.0]:.4f} |",
        *[f"| {k} | {v['cache_seconds']:.1f} | {v['logit_bytes_per_token']:.0f} | {v['bytes_per_token']:.0f} | {v['kd_error']['1.0'] * 100:+.2f}% | {v['kd_error']['2.0'] * 100:+.2f}% |" for k, v in rows.items()],
        "",
        "Loss columns: the first batch's KD term (sft + forward KL only, lr ≈ 0) from each store, relative to the same batch "
        "with the dense live teacher. A top-k store's loss is the divergence over the kept ids plus one tail bucket, tempered "
        "exactly at T = 2 (the store keeps the tail's tempered mass over the recipe's temperature range): never above the "
        "dense loss, and as close as the teacher's tail is small. A sampled store's loss is the importance-weighted forward "
        "KL over its draws (the draws' counts, the teacher's log-probs of the drawn ids, and log Σ p^(1/T) of the whole "
        "vocabulary kept on the same temperature grid): an unbiased estimate of the dense KL, value and gradient, at T = 1 "
        "and T = 2 alike, so its error here is the noise of one draw set per token, of either sign. \"Logits\" bytes are "
        "the ids, log-probs, tail and tail grid (sampled: counts and log-partition grid) and response ids; \"with features\" "
        "adds what the recipe's feature terms read (the penultimate hidden state of every response token is most of it).",
        "",
        f"| student trained from | samples/s (median of {args.repeats}) | step cost ÷ SFT step | KD loss (last step) |",
        "| --- | --- | --- | --- |",
        *[f"| {k} | {v:.1f} | {plain / v:.2f}× | {'—' if last[k] is None else format(last[k], '.4f')} |" for k, v in sps.items()],
        "",
        f"Achieved FLOP/s of the student's training step (FLOPs of one step counted by torch's FlopCounterMode, × steps/s) "
        f"against this CPU's fp32 matmul peak measured in the same run ({peak / 1e9:.1f} GFLOP/s, 1024² matmul, "
        f"{torch.get_num_threads()} threads):",
        "",
        "| run | GFLOP / step | achieved GFLOP/s | share of matmul peak |",
        "| --- | --- | --- | --- |",
        *[f"| {k} | {flops[k] / 1e9:.2f} | {flops[k] * sps[k] / batch / 1e9:.2f} | {share[k] * 100:.1f}% |" for k in flops],
        "",
    ]
    write(args.results, "teacher_store", {"stores": rows, "first_batch_live": {str(t): v for t, v in first["live"].items()}, "samples_per_s": speed,
                                          "flops_per_step": flops, "matmul_peak": peak, "flop_share": share, "machine": machine(), "commit": git_rev(),
                                          "args": vars(args) | {"out": str(args.out), "results": str(args.results)}}, "\n".join(lines))


if __name__ == "__main__":
    main()
