"""Issue 14's compression targets on a ShapesWorld-trained tiny Qwen3-VL-MoE: half of every sparse layer's experts pruned
by each saliency method (routing frequency, REAP, reconstruction error), and 25% of the language model's blocks dropped
by block importance; each pruned model evaluated as pruned and after healing by distillation from the unpruned model,
over N healing seeds. VQA accuracy (the headline) and CIDEr on the test split, against the unpruned teacher.

    python benchmarks/moe_prune_heal.py --out runs/bench-moe --seeds 0 1 2

The teacher is the shipped configs/generative/shapesworld-teacher-moe.yaml (trained once, or reused when finished).
Pruning and healing are the shipped pipeline's stages (configs/pipeline/generative-moe-prune-distill-quantize.yaml:
calibration on the first 64 training records, heal = the generative KD recipe against the unpruned model, its step
budget and lr) run up to the heal stage (`pipeline.run_stages`, which resumes a stopped run); only the prune method /
fraction and the seed change between rows. The pruning is deterministic, so a method's seeds share one pruned model
and differ in the healing run. Writes benchmarks/results/moe_prune_heal.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml
from common import ensure_data, git_rev, machine, mean_std, write

from mmdistill import api
from mmdistill.config import PipelineConfig, load_recipe, recipe_from_dict
from mmdistill.evaluate.generative import evaluate_folder
from mmdistill.pipeline import resolve_recipe, run_stages
from mmdistill.recipes import generative

PIPELINE = "pipeline/generative-moe-prune-distill-quantize.yaml"
VARIANTS = {
    "experts 50% (frequency)": {"experts": 0.5, "method": "frequency"},
    "experts 50% (reap)": {"experts": 0.5, "method": "reap"},
    "experts 50% (reconstruction)": {"experts": 0.5, "method": "reconstruction"},
    "depth 25% (text blocks, by importance)": {"drop_layers": "auto:1"},
    "control: no pruning, the same healing run": None,  # what the heal's extra training alone gives the unpruned teacher
}
METRICS = ("vqa_accuracy", "cider")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def train_teacher(out: Path, data: Path, steps: int | None, eval_items: int) -> Path:
    d = load_recipe(resolve_recipe("generative/shapesworld-teacher-moe.yaml")).model_dump(mode="json")
    d["output_dir"] = str(out / "teacher")
    d["data"].update(train=str(data / "chat_train.jsonl"), val=str(data / "chat_test.jsonl"))
    d["eval"]["max_items"] = eval_items
    if steps:
        d["train"]["max_steps"] = steps
    recipe = recipe_from_dict(d, source="moe teacher")
    if api.is_finished(recipe):
        print(f"teacher: reusing the finished run in {recipe.output_dir}")
    else:
        generative.run(recipe, overwrite=True)
    return Path(recipe.output_dir) / "model"


def pipeline_cfg(out: Path, data: Path, teacher: Path, prune: dict, seed: int, heal_steps: int | None) -> PipelineConfig:
    d = yaml.safe_load(resolve_recipe(PIPELINE).read_text())
    d.update(output_dir=str(out), seed=seed, original={"model": str(teacher), "train": []})
    d["data"].update(train=str(data / "chat_train.jsonl"), val=str(data / "chat_test.jsonl"))
    stages = {s["name"]: s for s in d["stages"]}
    if heal_steps:
        stages["heal"]["distill"]["overrides"]["train.max_steps"] = heal_steps
    if prune is None:  # the control: the heal stage alone, on the unpruned teacher
        d["stages"] = [stages["heal"]]
    else:
        stages["prune"]["prune"] = {"calibration": stages["prune"]["prune"]["calibration"], **prune}
        d["stages"] = [stages["prune"], stages["heal"]]
    return PipelineConfig.model_validate(d)


def evaluate(model: Path, data: Path, out_path: Path, teacher: Path | None, items: int) -> dict:
    if out_path.is_file():
        return json.loads(out_path.read_text())
    return evaluate_folder(model, data / "chat_test.jsonl", out_path=out_path, name=out_path.stem, role="student" if teacher else "teacher",
                           max_items=items, latency=False, reference=str(teacher) if teacher else None, max_new_tokens=40)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-moe"))
    ap.add_argument("--n", type=int, default=2000, help="ShapesWorld images (the demo's size)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="healing seeds")
    ap.add_argument("--teacher-steps", type=int, default=None, help="default: the shipped teacher recipe's")
    ap.add_argument("--heal-steps", type=int, default=None, help="default: the shipped pipeline's heal budget")
    ap.add_argument("--eval-items", type=int, default=200)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    t_start = time.time()
    data = ensure_data(args.out, args.n)
    teacher = train_teacher(args.out, data, args.teacher_steps, args.eval_items)
    ref = evaluate(teacher, data, args.out / "teacher-eval.json", None, args.eval_items)
    rows, payload = [], {"teacher": ref["metrics"], "params": {"teacher": ref["params"]}, "variants": {}}
    heal_steps = None
    for name in args.variants:
        runs = []
        for seed in args.seeds:
            folder = args.out / slug(name) / f"seed{seed}"
            cfg = pipeline_cfg(folder, data, teacher, VARIANTS[name], seed, args.heal_steps)
            heal_steps = heal_steps or next(s for s in cfg.stages if s.name == "heal").distill.overrides["train.max_steps"]
            run_stages(cfg)
            if not runs:  # pruning is deterministic: the first seed's pruned model stands for all (the control: the teacher)
                pruned = ref if VARIANTS[name] is None else evaluate(folder / "prune" / "model", data, args.out / slug(name) / "pruned-eval.json", teacher, args.eval_items)
            runs.append(evaluate(folder / "heal" / "model", data, folder / "heal-eval.json", teacher, args.eval_items))
        healed = {m: [r["metrics"][m] for r in runs] for m in (*METRICS, "agreement")}
        payload["variants"][name] = {"pruned": pruned["metrics"], "params": pruned["params"], "healed": healed, "seeds": args.seeds}
        rows.append((name, pruned, healed))

    heal_secs = [json.loads(f.read_text())["seconds"] for f in args.out.glob("*/seed*/heal/stage.json")]
    heal_minutes = statistics.median(heal_secs) / 60 if heal_secs else float("nan")
    head = "vqa_accuracy"
    t_acc = ref["metrics"][head]
    lines = [
        "### Expert and depth pruning healed by distillation: tiny Qwen3-VL-MoE on ShapesWorld",
        "",
        f"Command: `python benchmarks/moe_prune_heal.py --out {args.out} --seeds {' '.join(map(str, args.seeds))}"
        + (f" --teacher-steps {args.teacher_steps}" if args.teacher_steps else "") + (f" --heal-steps {args.heal_steps}" if args.heal_steps else "")
        + f"` — machine: {machine()} — commit {git_rev()} — this call {time.time() - t_start:.0f} s (finished runs in --out are reused; "
        f"a healing run took {heal_minutes:.1f} min on one thread)",
        "",
        f"Teacher: configs/generative/shapesworld-teacher-moe.yaml (Qwen3-VL-MoE, 8 experts per layer, top 2), {ref['params'] / 1e6:.2f}M parameters, "
        f"ShapesWorld n={args.n}. Pruning: the shipped MoE pipeline's prune stage (64 calibration records); healing: its heal stage "
        f"(generative KD recipe against the unpruned teacher, {heal_steps} steps), seeds {args.seeds}. "
        f"Test split, first {args.eval_items} records, greedy answers of at most 40 tokens; agreement = exact answer match with the teacher.",
        "",
        f"| model | params | {head} pruned | {head} healed | retention healed | CIDEr pruned | CIDEr healed | agreement healed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| teacher (unpruned) | {ref['params'] / 1e6:.2f}M | {t_acc:.2f} | | 100% | {ref['metrics']['cider']:.2f} | | |",
    ]
    for name, pruned, healed in rows:
        ret = [100 * a / t_acc for a in healed[head]] if t_acc else [float("nan")]
        lines.append(f"| {name} | {pruned['params'] / 1e6:.2f}M ({100 * pruned['params'] / ref['params']:.0f}%) | {pruned['metrics'][head]:.2f} | "
                     f"{mean_std(healed[head])} | {mean_std(ret)}% | {pruned['metrics']['cider']:.2f} | {mean_std(healed['cider'])} | {mean_std(healed['agreement'])} |")
        payload["variants"][name]["retention"] = ret
    lines.append("")
    control = next((payload["variants"][n]["retention"] for n in payload["variants"] if VARIANTS[n] is None), None)
    for name, _, healed in rows:
        ret = payload["variants"][name]["retention"]
        if VARIANTS[name] is None:
            lines.append(f"- {name}: {statistics.mean(ret):.1f}% of the teacher's {head} — the teacher itself gains from the heal's "
                         "extra training on the same data, so a healed model above 100% is partly that, not only recovery.")
            continue
        ok = min(ret) >= 95
        vs = f"; against the control {statistics.mean(ret) - statistics.mean(control):+.1f} points of retention" if control else ""
        lines.append(f"- {name}: healed {head} retention {statistics.mean(ret):.1f}% (min over seeds {min(ret):.1f}%; target ≥ 95%: {'met' if ok else 'missed'}{vs}).")
    write(args.results, "moe_prune_heal", payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
