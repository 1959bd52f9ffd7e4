"""The teacher store side by side with the live teacher, one run: generative KD on ShapesWorld.

    python benchmarks/teacher_store.py --out runs/bench-store [--n 2000] [--teacher-steps 300] [--student-steps 60] [--seeds 200]

Trains the shipped ShapesWorld VLM teacher (a short budget: this measures cost and fidelity, not quality), writes
stores of its signals for the shipped KD student's recipe (top-k for several k, and sampled sets), then

- per store: time to cache, bytes per response token (the logit signal alone, and with the features the recipe's
  loss reads), and the KD loss on the same first batch against the dense live teacher at T = 1 and at T = 2 (the
  shipped schedule's start);
- for the sampled stores, the spread of that first-batch loss over many independent draw sets (the batch's logits
  captured from the live probe), importance-weighted against the old tempered-frequency form;
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
from mmdistill.losses.composite import DIVERGENCES
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


def draw_spread(captured: dict[float, tuple], samples: list[int], seeds: int) -> dict[str, dict[str, dict[str, float]]]:
    """How far one sampled store's first-batch KD loss can land from the dense one: the first batch's student and teacher
    logits (captured from the live probe) drawn `seeds` times over at each N of `samples` (the teacher's log-probs rounded
    to fp16, as the stores keep them), each draw set's loss relative to the dense loss: the importance-weighted form and
    the draws' frequencies tempered as a distribution (the form sampled stores had before). -> {T: {form N: {mean, std}}}"""
    from mmdistill.losses.divergence import forward_kl, log_partition_grid, sampled_forward_kl, sparse_forward_kl
    from mmdistill.teachers.cache import _sampled

    out: dict[str, dict[str, dict[str, float]]] = {}
    for temp, (s, t, mask) in captured.items():
        s, lp = s[mask].float(), t[mask].float().log_softmax(-1)  # [n, V]
        dense = float(forward_kl(s, t[mask].float(), temperature=temp))
        logz = log_partition_grid(lp, [1.0 / temp])[..., 0]
        for n in samples:
            errs: dict[str, list[float]] = {"weighted": [], "tempered frequencies": []}
            for seed in range(seeds):
                ids, counts = _sampled(lp, n, torch.Generator().manual_seed(seed))
                lw = (counts.float() / n).log()
                new = sampled_forward_kl(s, ids, lp.gather(-1, ids).half().float(), lw, temperature=temp, logz=logz)
                old = sparse_forward_kl(s, ids, lw, torch.full(lw.shape[:-1], float("-inf")), temperature=temp)
                errs["weighted"].append(float(new) / dense - 1)
                errs["tempered frequencies"].append(float(old) / dense - 1)
            for form, e in errs.items():
                out.setdefault(str(temp), {})[f"{form} {n}"] = {"mean": statistics.mean(e), "std": statistics.stdev(e), "dense": dense}
    return out


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
    ap.add_argument("--seeds", type=int, default=200, help="draw sets per N for the spread of one sampled store's first-batch loss")
    ap.add_argument("--default-k", type=int, default=16, help="the top-k of the timed store runs (the CLI's default)")
    ap.add_argument("--full-recipe-timing", action="store_true", help="also time the shipped recipe (with its vision and text feature terms)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.default_k not in args.ks:
        ap.error(f"--default-k {args.default_k} must be one of --ks {args.ks} (the timed runs train from that store)")
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
    captured: dict[float, tuple] = {}  # the live probe's first-batch (student logits, teacher logits, mask), per T
    dense_kl = DIVERGENCES["forward_kl"]
    for temp in (1.0, 2.0):
        for name in ["live", *stores]:
            over = {**probe, "loss.terms": {**probe["loss.terms"], "kd": {"weight": 1.0, "options": {"divergence": "forward_kl", "temperature": temp}}}}
            if name != "live":
                over |= {"teacher.kind": "store", "teacher.path": rows[name]["folder"]}
            else:
                def capture(s, t, m, _T=temp, **kw):
                    captured.setdefault(_T, (s.detach(), t.detach(), m.bool()))
                    return dense_kl(s, t, m, **kw)

                DIVERGENCES["forward_kl"] = capture
            r = variant(kd, f"probe-T{temp:g}-" + name.replace(" ", "-"), **over)
            try:
                first.setdefault(name, {})[temp] = gr.run(r, evaluate_after=False, **QUIET)["last"]["kd"]
            finally:
                DIVERGENCES["forward_kl"] = dense_kl
    spread = draw_spread(captured, args.samples, args.seeds)
    for temp, by in spread.items():  # the captured batch is the probe's: the same dense loss
        assert abs(next(iter(by.values()))["dense"] / first["live"][float(temp)] - 1) < 1e-4, (temp, by, first["live"])
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
        f"How far one sampled store can land: the same first batch's student and teacher logits (captured from the live "
        f"probe), {args.seeds} independent draw sets per N (the teacher's log-probs rounded to fp16 as in the stores), each "
        f"set's KD loss relative to the dense loss, mean ± standard deviation over the sets — the importance-weighted form "
        f"the stores now use, and the draws' frequencies tempered as a distribution (the form sampled stores had before; at "
        f"T = 1 its gradient was unbiased but its value was the divergence to the frequencies, not the dense KL):",
        "",
        "| draws per token | T | weighted: mean error | weighted: std of one set | tempered frequencies: mean error | tempered frequencies: std |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {n} | {float(t):g} | {by[f'weighted {n}']['mean'] * 100:+.2f}% | {by[f'weighted {n}']['std'] * 100:.2f}% | "
          f"{by[f'tempered frequencies {n}']['mean'] * 100:+.2f}% | {by[f'tempered frequencies {n}']['std'] * 100:.2f}% |"
          for n in args.samples for t, by in spread.items()],
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
    write(args.results, "teacher_store", {"stores": rows, "first_batch_live": {str(t): v for t, v in first["live"].items()}, "draw_spread": spread, "samples_per_s": speed,
                                          "flops_per_step": flops, "matmul_peak": peak, "flop_share": share, "machine": machine(), "commit": git_rev(),
                                          "args": vars(args) | {"out": str(args.out), "results": str(args.results)}}, "\n".join(lines))


if __name__ == "__main__":
    main()
