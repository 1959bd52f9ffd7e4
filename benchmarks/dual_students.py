"""Heterogeneous dual students side by side: the ShapesWorld CLIP teacher, the timm + BERT dual student alone and
distilled (configs/contrastive/shapesworld-dual-{baseline,kd}.yaml), and the ViT-CLIP student distilled
(shapesworld-student-kd.yaml), in one run: mean R@1 on the test gallery, parameters, and CPU latency per image of
the image tower at batch 1 and batch 32 (and of image + text pairs), measured round-robin over the models (the fastest
of 5 rounds' medians).

    python benchmarks/dual_students.py --out runs/bench-dual-small --n 4000 --teacher-steps 250 --student-steps 200 --batch-size 32

The defaults are the shipped recipes' budgets (about an hour on 2 shared cores); the command above is the ~10-minute
budget BENCHMARKS.md reports. Every student gets the same steps and batch; a finished run with the same recipe is reused (so a second call only
measures). Writes benchmarks/results/dual_students.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import ensure_data, git_rev, machine, run_or_reuse, variant, write

from mmdistill import api
from mmdistill.evaluate.bench import measure_latency
from mmdistill.models import contrastive as cm
from mmdistill.recipes import contrastive

STAGES = {"student-base": "contrastive/shapesworld-dual-baseline.yaml", "student-kd": "contrastive/shapesworld-dual-kd.yaml"}


def latency_fns(model_dir: Path, images: list) -> dict:
    """Callables that embed images (preprocessed; model time only), and image + caption pairs, at batch 1 and 32."""
    model, proc = cm.load_model(str(model_dir))
    model.eval()
    fns = {}
    for bs in (1, 32):
        pv = cm.preprocess_images(proc, images[:bs])
        t = cm.preprocess_texts(proc, ["a picture of a large red circle at the top left and a small blue star in the centre"] * bs)

        def img(pv=pv):
            with torch.inference_mode():
                cm.encode_images(model, pv)

        def pair(pv=pv, t=t):
            with torch.inference_mode():
                cm.encode_images(model, pv)
                cm.encode_texts(model, t["input_ids"], t["attention_mask"])

        fns[f"image_bs{bs}"], fns[f"pair_bs{bs}"] = (img, bs), (pair, bs)
    return fns


def latencies(dirs: dict[str, Path], images: list, rounds: int = 5) -> dict[str, dict[str, float]]:
    """ms per item for every model, measured round-robin (each round times every model once, 10 repeats after 2
    warm-ups) and the fastest round's median kept: on a shared CPU a burst of other work then hits one round, not one
    model."""
    fns = {name: latency_fns(d, images) for name, d in dirs.items()}
    best: dict[str, dict[str, float]] = {name: {} for name in dirs}
    for _ in range(rounds):
        for name, table in fns.items():
            for key, (fn, bs) in table.items():
                ms = measure_latency(fn, warmup=2, repeats=10)["median_ms"] / bs
                best[name][key] = min(best[name].get(key, float("inf")), ms)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-dual"))
    ap.add_argument("--n", type=int, default=10000, help="ShapesWorld images (test split = 10%%)")
    ap.add_argument("--teacher-steps", type=int, default=550, help="teacher budget (the shipped teacher recipe: 550)")
    ap.add_argument("--student-steps", type=int, default=600, help="budget of every student (dual alone, dual KD, ViT KD alike)")
    ap.add_argument("--batch-size", type=int, default=128, help="batch of every run, the teacher's too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="STAGE:KEY=VALUE", help="extra recipe changes, e.g. dual-kd:loss.terms.fd.weight=200")
    ap.add_argument("--tag", default="", help="suffix of the results files")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    t0 = time.time()
    ensure_data(args.out, args.n)
    vit = api.demo_recipes(args.out, seed=args.seed)
    duals = api.demo_recipes(args.out, seed=args.seed, stages=STAGES)
    common = {"train.batch_size": args.batch_size, "eval.latency": False, "train.save_every": 500}
    student = {"train.max_steps": args.student_steps, "train.warmup_steps": min(50, args.student_steps // 10)}
    recipes = {
        "teacher": variant(vit["teacher"], "teacher", **common, **{"train.max_steps": args.teacher_steps, "train.warmup_steps": min(50, args.teacher_steps // 10)}),
        "dual-base": variant(duals["student-base"], "dual-base", **common, **student),
        "dual-kd": variant(duals["student-kd"], "dual-kd", **common, **student),
        "vit-kd": variant(vit["student-kd"], "vit-kd", **common, **student),
    }
    for item in args.set:
        stage, _, kv = item.partition(":")
        key, _, raw = kv.partition("=")
        import yaml

        recipes[stage] = variant(recipes[stage], Path(recipes[stage].output_dir).name, **{key: yaml.safe_load(raw)})
    evals, wall = {}, {}
    for name, recipe in recipes.items():
        s = time.time()
        evals[name] = run_or_reuse(contrastive, recipe, args.out)
        summary = Path(recipe.output_dir) / "train_summary.json"  # training time of the run, also when it was reused
        wall[name] = json.loads(summary.read_text())["train_seconds"] if summary.is_file() else time.time() - s
        print(f"{name}: mean R@1 {evals[name]['metrics']['mean_R@1']:.2f} ({wall[name]:.0f} s)", flush=True)

    # latency, one model after the other in this process
    from mmdistill.data.loaders import load_pairs

    _, images, _ = load_pairs(Path(recipes["teacher"].data.val), "fail", 32, log=lambda *_: None)
    lat = latencies({name: Path(r.output_dir) / "model" for name, r in recipes.items()}, images)

    t = evals["teacher"]
    t_r1 = t["metrics"]["mean_R@1"]
    rows = [
        ("teacher (ViT-CLIP 3+3 layers, width 128)", "teacher"),
        ("dual student alone (timm resnet10t + BERT, own WordPiece)", "dual-base"),
        ("dual student distilled (clip + sim_kd + fd × 100)", "dual-kd"),
        ("ViT-CLIP student distilled (shapesworld-student-kd.yaml)", "vit-kd"),
    ]
    md = [
        f"### Dual students on ShapesWorld{(' (' + args.tag + ')') if args.tag else ''}: timm CNN + BERT, distilled from the CLIP teacher",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()} — this call {time.time() - t0:.0f} s, training {sum(wall.values()):.0f} s"
        f" (teacher {args.teacher_steps} steps, students {args.student_steps} steps × batch {args.batch_size}, gallery {t['gallery']} test pairs, seed {args.seed})",
        "",
        "| model | params | % of teacher | i2t R@1 | t2i R@1 | mean R@1 | retention | zero-shot mean | ms / image bs1 | ms / image bs32 | ms / pair bs1 | ms / pair bs32 | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, key in rows:
        e, m, la = evals[key], evals[key]["metrics"], lat[key]
        md.append(
            f"| {label} | {e['params'] / 1e6:.3f}M | {100 * e['params'] / t['params']:.1f}% | {m['i2t_R@1']:.2f} | {m['t2i_R@1']:.2f} | {m['mean_R@1']:.2f} | "
            f"{100 * m['mean_R@1'] / t_r1:.1f}% | {m.get('zeroshot_mean', float('nan')):.2f} | {la['image_bs1']:.2f} | {la['image_bs32']:.3f} | "
            f"{la['pair_bs1']:.2f} | {la['pair_bs32']:.3f} | {wall[key]:.0f} |"
        )
    base, kd = evals["dual-base"]["metrics"]["mean_R@1"], evals["dual-kd"]["metrics"]["mean_R@1"]
    retention, gain = 100 * kd / t_r1, kd - base
    md += [
        "",
        f"- Dual student distilled keeps **{retention:.1f}%** of the teacher's mean R@1 (target ≥ 90%: {'met' if retention >= 90 else f'missed by {90 - retention:.1f} points'}).",
        f"- Over the same student alone: **{gain:+.2f}** points (target ≥ +5: {'met' if gain >= 5 else f'missed by {5 - gain:.2f}'}).",
        f"- Size: {100 * evals['dual-kd']['params'] / t['params']:.1f}% of the teacher's parameters (target ≤ 15%).",
        "",
    ]
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "commit": git_rev(), "evals": evals, "latency_ms_per_item": lat, "train_wall_s": wall}
    write(args.results, "dual_students" + (f"-{args.tag}" if args.tag else ""), payload, "\n".join(md))


if __name__ == "__main__":
    main()
