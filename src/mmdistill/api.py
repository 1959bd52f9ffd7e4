"""The Python API that the CLI (and later the web UI) call."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .config import Recipe, RecipeError, load_recipe, recipe_from_dict

CONFIG_DIR = Path(str(resources.files("mmdistill") / "configs"))  # configs/ at the repo root links here


def shipped_config(rel: str) -> Path:
    """Path of a recipe shipped with the package (configs/<family>/<name>.yaml)."""
    p = CONFIG_DIR / rel
    if not p.is_file():
        raise RecipeError(f"shipped recipe {rel!r} not found in {CONFIG_DIR}")
    return p


# ---------------------------------------------------------------------------------------------
# data


def synth(out: str | Path, n: int = 2000, seed: int = 0, size: int = 64) -> dict[str, Any]:
    from .data.synth import generate

    return generate(out, n=n, seed=seed, size=size)


def check_data(path: str | Path, kind: str | None = None, decode_images: bool = True):
    from .data.records import check_file

    return check_file(path, kind, decode_images=decode_images)


# ---------------------------------------------------------------------------------------------
# training


def train(recipe: Recipe | str | Path, overrides: list[str] | None = None, *, resume: bool = False, overwrite: bool = False, require_teacher: bool | None = None, log: Callable = print) -> dict[str, Any]:
    """Run a recipe. `require_teacher`: True for `distill`, False for `train`, None for either."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to recipe files; edit the Recipe object instead")
    if require_teacher is True and recipe.teacher is None:
        raise RecipeError("distill needs a `teacher:` section in the recipe (use `mmdistill train` for plain training)")
    if require_teacher is False and recipe.teacher is not None:
        raise RecipeError("train is plain training; this recipe has a `teacher:` section, use `mmdistill distill`")
    from .recipes import contrastive

    return contrastive.run(recipe, resume=resume, overwrite=overwrite, log=log)


def evaluate(model_dir: str | Path, data: str | Path, *, zeroshot: str | Path | None = None, out: str | Path | None = None, name: str | None = None, role: str = "student", max_items: int | None = 1000, latency: bool = True) -> dict[str, Any]:
    from .evaluate.contrastive import evaluate_folder

    return evaluate_folder(model_dir, data, zeroshot=zeroshot, out_path=out, name=name, role=role, max_items=max_items, latency=latency)


def report(run_dirs: list[str | Path], out: str | Path, *, title: str = "mmdistill report", baseline: str | None = None) -> dict[str, Any]:
    from .evaluate.report import load_run_summary, write_report

    runs = []
    for d in run_dirs:
        summary = load_run_summary(d)
        summary.setdefault("run_dir", str(d))
        runs.append(summary)
    if baseline is None:
        baseline = next((r["name"] for r in runs if r.get("role") == "baseline"), None)
    return write_report(runs, out, title=title, baseline=baseline)


# ---------------------------------------------------------------------------------------------
# demo


DEMO_RECIPES = {
    "teacher": "contrastive/shapesworld-teacher.yaml",
    "student-base": "contrastive/shapesworld-student-baseline.yaml",
    "student-kd": "contrastive/shapesworld-student-kd.yaml",
}


def demo_recipes(out: Path, *, quick: bool = False, seed: int = 0) -> dict[str, Recipe]:
    """The three shipped ShapesWorld recipes, pointed at `out` (quick: a few steps, for tests)."""
    data = out / "data"
    recipes = {}
    for name, rel in DEMO_RECIPES.items():
        d = load_recipe(shipped_config(rel)).model_dump(mode="json")
        d["output_dir"] = str(out / name)
        d["seed"] = seed
        d["data"].update(train=str(data / "pairs_train.jsonl"), val=str(data / "pairs_test.jsonl"), zeroshot=str(data / "zeroshot_test.json"))
        if d.get("teacher"):
            d["teacher"]["model"] = str(out / "teacher" / "model")
        if d["student"].get("model") and name != "teacher":
            d["student"]["model"] = str(out / "teacher" / "model")
        if quick:
            d["train"].update(max_steps=6, batch_size=16, warmup_steps=1, save_every=3, log_every=2)
            d["data"]["max_records"] = 128
            d["eval"].update(max_items=64)
        recipes[name] = recipe_from_dict(d, source=rel)
    return recipes


def is_finished(recipe: Recipe) -> bool:
    """True when the recipe's output folder holds this very run, trained and evaluated."""
    out = Path(recipe.output_dir)
    meta = out / "run.json"
    return (out / "eval.json").is_file() and meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == recipe.fingerprint()


def demo(out: str | Path = "runs/demo", *, n: int = 10000, quick: bool = False, seed: int = 0, log: Callable = print) -> dict[str, Any]:
    """ShapesWorld end to end: data, teacher, student without and with KD, one report."""
    out = Path(out)
    data = out / "data"
    if not (data / "summary.json").is_file():
        log(f"generating ShapesWorld ({n} images) in {data}")
        synth(data, n=n, seed=seed)
    recipes = demo_recipes(out, quick=quick, seed=seed)
    for name, recipe in recipes.items():
        if name == "teacher" and is_finished(recipe):
            log(f"teacher: reusing the trained teacher in {recipe.output_dir}")
            continue
        log(f"== {name}: {recipe.output_dir}")
        from .recipes import contrastive

        contrastive.run(recipe, overwrite=True, log=log)
    return report([recipes[k].output_dir for k in recipes], out / "report", title="mmdistill demo: ShapesWorld CLIP distillation")
