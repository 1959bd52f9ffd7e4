"""The Python API that the CLI and the web UI call."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .config import RECORD_KIND, Recipe, RecipeError, load_recipe, recipe_from_dict

CONFIG_DIR = Path(str(resources.files("mmdistill") / "configs"))  # configs/ at the repo root links here


def shipped_config(rel: str) -> Path:
    """Path of a recipe shipped with the package (configs/<family>/<name>.yaml)."""
    p = CONFIG_DIR / rel
    if not p.is_file():
        raise RecipeError(f"shipped recipe {rel!r} not found in {CONFIG_DIR}")
    return p


# ---------------------------------------------------------------------------------------------
# data


def synth(out: str | Path, n: int = 2000, seed: int = 0, size: int = 64, *, audio: bool = False, log: Callable = print) -> dict[str, Any]:
    from .data.synth import generate

    return generate(out, n=n, seed=seed, size=size, audio=audio, log=log)


def check_data(path: str | Path, kind: str | None = None, decode_images: bool = True):
    from .data.records import check_file

    return check_file(path, kind, decode_images=decode_images)


def import_data(src: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """LLaVA conversation JSON, Parquet / Arrow files or a datasets folder -> mmdistill records (see data/convert.py)."""
    from .data.convert import import_data as convert

    return convert(src, out, **options)


def data_stats(path: str | Path, kind: str | None = None, *, train: str | Path | None = None) -> dict[str, Any]:
    """Statistics of a file's valid records and the warnings they raise; with `train`, the records this
    (evaluation) file shares with that training file (leakage)."""
    from .data.records import read_records
    from .data.stats import file_stats, shared_records, stats_warnings

    records, _ = read_records(path, kind, on_error="skip")
    stats = file_stats(records)
    warnings = stats_warnings(stats)
    if train is not None:
        shared = shared_records(read_records(train, records[0].kind, on_error="skip")[0], records)
        stats["shared_with_train"] = len(shared)
        if shared:
            warnings.append(f"{len(shared)} of {len(records)} records also appear in {train} (first: {path}:{shared[0].line}): evaluation on them measures memory, not generalisation (leakage).")
    return {"stats": stats, "warnings": warnings}


# ---------------------------------------------------------------------------------------------
# training


def train(recipe: Recipe | str | Path, overrides: list[str] | None = None, *, resume: bool = False, overwrite: bool = False, require_teacher: bool | None = None, log: Callable = print) -> dict[str, Any]:
    """Run a recipe. `require_teacher`: True for `distill`, False for `train`, None for either."""
    from .engine.zero import take_launch_env

    take_launch_env()  # an accelerate FSDP / DeepSpeed launch is read before any model loads (engine/zero.py)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to recipe files; edit the Recipe object instead")
    if require_teacher is True and recipe.teacher is None:
        raise RecipeError("distill needs a `teacher:` section in the recipe (use `mmdistill train` for plain training)")
    if require_teacher is False and recipe.teacher is not None:
        raise RecipeError("train is plain training; this recipe has a `teacher:` section, use `mmdistill distill`")
    for w in source_warnings(recipe):
        log(f"warning: {w}")
    return _recipe_module(recipe.family).run(recipe, resume=resume, overwrite=overwrite, log=log)


def source_warnings(recipe: Recipe) -> list[str]:
    """Model paths of the recipe that are mmdistill runs trained on other data than this recipe's: the sign of a
    recipe copied for new data where one path still names the old teacher (e.g. a baseline's `student.model`)."""
    out = []
    for field, path in (("teacher.model", recipe.teacher.model if recipe.teacher else None), ("student.model", recipe.student.model)):
        run_json = Path(path).parent / "run.json" if path else None
        if run_json is None or not run_json.is_file():
            continue
        try:
            trained_on = json.loads(run_json.read_text())["recipe"]["data"]["train"]
        except (ValueError, KeyError, TypeError):
            continue
        if Path(trained_on).resolve() != Path(recipe.data.train).resolve():
            out.append(f"{field} {path} was trained on {trained_on}; this recipe trains on {recipe.data.train}: is it the teacher of this data? (`mmdistill init` writes recipes whose paths agree)")
    return out


def finetune(recipe: Recipe | str | Path, overrides: list[str] | None = None, *, resume: bool = False, overwrite: bool = False, log: Callable = print) -> dict[str, Any]:
    """Supervised fine-tuning (full or LoRA) of a generative model: a generative recipe without a teacher."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    if recipe.family != "generative":
        raise RecipeError(f"finetune is for generative recipes; this one is family={recipe.family} (use `mmdistill train`)")
    return train(recipe, resume=resume, overwrite=overwrite, require_teacher=False, log=log)


def merge(adapter: str | Path, out: str | Path, *, base: str | None = None) -> Path:
    """Merge a PEFT LoRA adapter into its base model; write a full folder plain transformers loads."""
    from .compress.lora import merge_adapter

    return merge_adapter(adapter, out, base_model=base)


def teacher_generate(data: str | Path, out: str | Path, *, teacher: str | None = None, endpoint: str | None = None, model: str | None = None, api_key: str | None = None, max_new_tokens: int = 64, batch_size: int = 8, min_logprob: float | None = None, limit: int | None = None, overwrite: bool = False, timeout: float = 60.0, retries: int = 4, log: Callable = print) -> dict[str, Any]:
    """Teacher answers for every chat record (local model or OpenAI-compatible endpoint), resumable."""
    from .teachers.generate import LocalGenerator, ServedGenerator, generate_file

    if (teacher is None) == (endpoint is None):
        raise RecipeError("give exactly one of --teacher (a local model) or --endpoint (an OpenAI-compatible server)")
    if endpoint is not None:
        if not model:
            raise RecipeError("--endpoint needs --model (the model name the server serves)")
        gen = ServedGenerator(endpoint, model, api_key=api_key, max_new_tokens=max_new_tokens, timeout=timeout, retries=retries, concurrency=batch_size)
    else:
        gen = LocalGenerator(teacher, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return generate_file(gen, data, out, min_logprob=min_logprob, overwrite=overwrite, limit=limit, log=log)


def teacher_cache(recipe: Recipe | str | Path, overrides: list[str] | None, out: str | Path, *, top_k: int = 16, sample: int | None = None, dtype: str = "fp16", shard_records: int = 256, log: Callable = print) -> dict[str, Any]:
    """Run a recipe's live teacher over its training records once into the store `out` (resumable)."""
    from .teachers.cache import cache_teacher

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return cache_teacher(recipe, out, top_k=top_k, sample=sample, dtype=dtype, shard_records=shard_records, log=log)


def teacher_verify(store: str | Path) -> list[str]:
    from .teachers.store import verify

    return verify(store)


def teacher_inspect(store: str | Path) -> dict[str, Any]:
    from .teachers.store import inspect

    return inspect(store)


def _recipe_module(family: str):
    if family == "reranker":
        from .recipes import reranker

        return reranker
    if family == "generative":
        from .recipes import generative

        return generative
    from .recipes import contrastive

    return contrastive


HEADLINES = {"contrastive": "mean_R@1", "reranker": "ndcg@10", "generative": "vqa_accuracy"}


def detect_family(data: str | Path) -> str:
    """The family a data file is for, from its first record's kind (pair / rerank / chat)."""
    from .data.records import RecordError, detect_kind

    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise RecordError(str(path), lineno, "line", "not valid JSON") from None
                kind = detect_kind(obj) if isinstance(obj, dict) else None
                return next((fam for fam, k in RECORD_KIND.items() if k == kind), "contrastive")
    raise RecordError(str(path), 0, "file", "no records (the file is empty)")


def evaluate(model_dir: str | Path, data: str | Path, *, zeroshot: str | Path | None = None, out: str | Path | None = None, name: str | None = None, role: str = "student", max_items: int | None = 1000, latency: bool = True, reference: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate a model folder on a data file; the family follows from the file's records.

    Contrastive `zeroshot`: a zeroshot_<split>.json of tasks, or any other file = the user's class names, one per
    line, with each record's class in ``meta.label`` (``options["templates"]``: prompt templates with {label})."""
    if zeroshot is not None and Path(zeroshot).suffix.lower() != ".json":
        options = {**options, "labels": zeroshot}
        zeroshot = None
    family = detect_family(data)
    if family != "contrastive" and "labels" in options:
        raise RecipeError(f"a labels file for zero-shot accuracy is for pair records (contrastive); {data} holds {family} records")
    if family == "reranker":
        from .evaluate.reranker import evaluate_folder as rerank_eval

        return rerank_eval(model_dir, data, out_path=out, name=name, role=role, max_items=max_items, latency=latency, reference=reference, **options)
    if family == "generative":
        from .evaluate.generative import evaluate_folder as gen_eval

        return gen_eval(model_dir, data, out_path=out, name=name, role=role, max_items=max_items, latency=latency, reference=reference, **options)
    from .evaluate.contrastive import evaluate_folder

    return evaluate_folder(model_dir, data, zeroshot=zeroshot, out_path=out, name=name, role=role, max_items=max_items, latency=latency, **options)


def report(run_dirs: list[str | Path], out: str | Path, *, title: str = "mmdistill report", baseline: str | None = None, headline: str | None = None) -> dict[str, Any]:
    from .evaluate.report import load_run_summary, write_report

    runs, families = [], set()
    for d in run_dirs:
        summary = load_run_summary(d)
        summary.setdefault("run_dir", str(d))
        runs.append(summary)
        families.add(json.loads((Path(d) / "eval.json").read_text()).get("family", "contrastive"))
    if headline is None and not any(r.get("headline") for r in runs):  # else: the reference's eval.json chose it
        headline = HEADLINES[families.pop()] if len(families) == 1 else "mean_R@1"
    if baseline is None:
        baseline = next((r["name"] for r in runs if r.get("role") == "baseline"), None)
    return write_report(runs, out, title=title, baseline=baseline, headline=headline)


# ---------------------------------------------------------------------------------------------
# demo


DEMO_RECIPES = {  # family -> stages in run order; the last three are the report's teacher / student-base / student-kd
    "contrastive": {
        "teacher": "contrastive/shapesworld-teacher.yaml",
        "student-base": "contrastive/shapesworld-student-baseline.yaml",
        "student-kd": "contrastive/shapesworld-student-kd.yaml",
    },
    # A yes/no reranker starts from a VLM (as Qwen3-VL-Reranker starts from Qwen3-VL): the teacher from the
    # ShapesWorld VLM teacher, both students from the small VLM trained alone on the same captions.
    "reranker": {
        "vlm-teacher": "generative/shapesworld-teacher.yaml",
        "vlm-student": "generative/shapesworld-student-baseline.yaml",
        "teacher": "reranker/shapesworld-teacher.yaml",
        "student-base": "reranker/shapesworld-student-baseline.yaml",
        "student-kd": "reranker/shapesworld-student-kd.yaml",
    },
    "generative": {
        "teacher": "generative/shapesworld-teacher.yaml",
        "student-base": "generative/shapesworld-student-baseline.yaml",
        "student-kd": "generative/shapesworld-student-kd.yaml",
    },
    # Qwen3-Omni thinker (generative recipes): image chat records and the spoken ShapesWorld (synth --audio)
    "omni": {
        "teacher": "omni/shapesworld-teacher.yaml",
        "student-base": "omni/shapesworld-student-baseline.yaml",
        "student-kd": "omni/shapesworld-student-kd.yaml",
    },
}
DEMO_N = {"omni": 1000}  # images the demo generates when not told (every omni image is also two spoken clips); else 10000
REPORTED = ("teacher", "student-base", "student-kd")
STUDENTS = REPORTED[1:]
DEMO_FILES = {  # family -> (train file, evaluation file) of a ShapesWorld folder
    "contrastive": ("pairs_train.jsonl", "pairs_test.jsonl"),
    "reranker": ("rerank_train.jsonl", "rerank_test.jsonl"),
    "generative": ("chat_train.jsonl", "chat_test.jsonl"),
    "omni": ("omni_train.jsonl", "omni_test.jsonl"),  # by demo family: the omni stages are generative recipes
}
DEMO_TITLES = {
    "contrastive": "mmdistill demo: ShapesWorld CLIP distillation",
    "reranker": "mmdistill demo: ShapesWorld reranker distillation",
    "generative": "mmdistill demo: ShapesWorld VLM distillation",
    "omni": "mmdistill demo: ShapesWorld Qwen3-Omni thinker distillation (images and speech)",
}


def _reroot(path: str | None, roots: dict[str, Path]) -> str | None:
    """`path` moved from a shipped run folder to the demo's (e.g. runs/shapesworld-vlm/teacher/model -> OUT/vlm-teacher/model)."""
    if path is None:
        return None
    for old, new in roots.items():
        if path == old or path.startswith(old + "/"):
            return str(new / path[len(old) :].lstrip("/"))
    return path


DATA_NAMES = {  # family -> (train names, evaluation names, zero-shot names) a data folder is searched for, in order
    "contrastive": (("pairs_train.jsonl", "train.jsonl"), ("pairs_val.jsonl", "pairs_test.jsonl", "val.jsonl", "test.jsonl"), ("zeroshot_val.json", "zeroshot_test.json", "zeroshot.json")),
    "reranker": (("rerank_train.jsonl", "train.jsonl"), ("rerank_val.jsonl", "rerank_test.jsonl", "val.jsonl", "test.jsonl"), ()),
    "generative": (("chat_train.jsonl", "train.jsonl"), ("chat_val.jsonl", "chat_test.jsonl", "val.jsonl", "test.jsonl"), ()),
}


def data_files(family: str, folder: str | Path) -> dict[str, Path]:
    """The train / val (/ zeroshot) files of `family` in a data folder, by the names in DATA_NAMES; one clear line when
    the folder or a needed file is missing. A file named `train.jsonl` must hold records of the family's kind."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecipeError(f"{folder}: data folder not found")
    found: dict[str, Path] = {}
    for key, names in zip(("train", "val", "zeroshot"), DATA_NAMES[family]):
        hit = next((folder / n for n in names if (folder / n).is_file()), None)
        if hit is None and key != "zeroshot":
            raise RecipeError(f"{folder}: no {key} file for the {family} family (looked for {', '.join(names)})")
        if hit is not None:
            found[key] = hit
    for key in ("train", "val"):
        held = detect_family(found[key])
        if held != family:
            raise RecipeError(f"{found[key]}: holds {RECORD_KIND[held]} records; the {family} family trains on {RECORD_KIND[family]} records")
    return found


def leakage_warnings(files: dict[str, Path]) -> list[str]:
    """A warning when the evaluation file shares records with the training file."""
    info = data_stats(files["val"], train=files["train"])
    return [w for w in info["warnings"] if "leakage" in w]


def demo_recipes(out: Path, *, family: str = "contrastive", quick: bool = False, seed: int = 0, stages: dict[str, str] | None = None, data: str | Path | None = None, runs: Path | None = None) -> dict[str, Recipe]:
    """The shipped ShapesWorld recipes of `family` (in run order), pointed at `out` (quick: a few steps, for tests).

    Every model path of a recipe that names another stage's shipped run folder is moved to that
    stage's folder under `out`, so the stages chain exactly as the shipped recipes do. `stages`
    swaps a stage's shipped recipe for another (e.g. the pruned reranker students). `data`: a folder of the
    user's own records (``data_files`` finds each stage's files in it) instead of ShapesWorld in ``out/data``.
    `runs`: where the stages' run folders go (default `out`).
    """
    if family not in DEMO_RECIPES:
        raise RecipeError(f"unknown family {family!r}; choose one of {', '.join(DEMO_RECIPES)}")
    unknown = set(stages or {}) - set(DEMO_RECIPES[family])
    if unknown:
        raise RecipeError(f"unknown {family} stage(s) {sorted(unknown)}; choose from {list(DEMO_RECIPES[family])}")
    rels = {**DEMO_RECIPES[family], **(stages or {})}
    runs = runs or out
    dicts = {name: load_recipe(shipped_config(rel)).model_dump(mode="json") for name, rel in rels.items()}
    roots = {d["output_dir"]: runs / name for name, d in dicts.items()}
    recipes = {}
    for name, d in dicts.items():
        stage = d["family"]
        d["output_dir"] = str(runs / name)
        d["seed"] = seed
        if data is None:
            train_file, eval_file = DEMO_FILES["omni" if family == "omni" else stage]
            files = {"train": out / "data" / train_file, "val": out / "data" / eval_file}
            if stage == "contrastive":
                files["zeroshot"] = out / "data" / "zeroshot_test.json"
        else:
            files = data_files(stage, data)
        d["data"].update(train=str(files["train"]), val=str(files["val"]))
        if stage == "contrastive":
            d["data"]["zeroshot"] = str(files["zeroshot"]) if "zeroshot" in files else None
        if d.get("teacher"):
            d["teacher"]["model"] = _reroot(d["teacher"]["model"], roots)
        d["student"]["model"] = _reroot(d["student"].get("model"), roots)
        if name in REPORTED and name != "teacher" and stage != "contrastive":
            d["eval"]["reference"] = str(runs / "teacher" / "model")  # agreement with the teacher, for the baseline too
        if quick:
            d["train"].update(max_steps=6, batch_size=16 if stage == "contrastive" else 4, warmup_steps=1, save_every=3, log_every=2)
            d["data"]["max_records"] = 128 if stage == "contrastive" else 32
            d["eval"].update(max_items=64 if stage == "contrastive" else 16)
            if family == "omni":
                d["eval"]["max_new_tokens"] = 12  # generation dominates a quick omni run
        recipes[name] = recipe_from_dict(d, source=rels[name])
    return recipes


def is_finished(recipe: Recipe) -> bool:
    """True when the recipe's output folder holds this very run, trained and evaluated."""
    out = Path(recipe.output_dir)
    meta = out / "run.json"
    return (out / "eval.json").is_file() and meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == recipe.fingerprint()


def train_stages(recipes: dict[str, Recipe], *, log: Callable = print) -> None:
    """Train every stage before the students, in order (the teacher; for rerankers first the VLMs they start from); a finished one is reused."""
    for name, recipe in recipes.items():
        if name in STUDENTS:
            continue
        if is_finished(recipe):
            log(f"{name}: reusing the trained {name} in {recipe.output_dir}")
            continue
        log(f"== {name}: {recipe.output_dir}")
        _recipe_module(recipe.family).run(recipe, log=log, **resume_or_restart(recipe))


def resume_or_restart(recipe: Recipe) -> dict[str, bool]:
    """`run` keywords for a stage a demo or pipeline owns: continue this very run from its last checkpoint when its
    folder holds one (a stopped demo picks up where it was), else start over in the folder."""
    meta = Path(recipe.output_dir) / "run.json"
    try:
        same = meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == recipe.fingerprint()
    except ValueError:
        same = False
    return {"resume": True, "overwrite": False} if same else {"resume": False, "overwrite": True}


def demo(out: str | Path = "runs/demo", *, family: str = "contrastive", n: int | None = None, quick: bool = False, seed: int = 0, data: str | Path | None = None, log: Callable = print) -> dict[str, Any]:
    """ShapesWorld (or the user's `data` folder) end to end: teacher, student without and with KD, one report.
    `n`: ShapesWorld images (default 10000; 1000 for omni, whose images are also spoken by espeak-ng)."""
    out = Path(out)
    n = n if n is not None else DEMO_N.get(family, 10000)
    if family == "pipeline":
        if data is not None:
            raise RecipeError("demo --family pipeline runs on ShapesWorld; for your data, edit a copy of configs/" + PIPELINE_DEMO + " and run `mmdistill pipeline`")
        return demo_pipeline(out, n=n, quick=quick, seed=seed, log=log)
    recipes = demo_recipes(out, family=family, quick=quick, seed=seed, data=data)
    audio = family == "omni"
    have = out / "data" / "summary.json"
    if data is None and (not have.is_file() or (audio and not (out / "data" / "omni_train.jsonl").is_file())):
        log(f"generating ShapesWorld ({n} images{', spoken by espeak-ng' if audio else ''}) in {out / 'data'}")
        summary = synth(out / "data", n=n, seed=seed, audio=audio, log=log)
        if audio and "skipped" in summary.get("audio", {}):
            raise RecipeError(f"the omni demo needs the spoken ShapesWorld: {summary['audio']['skipped']}")
    if data is not None:
        for fam in dict.fromkeys(r.family for r in recipes.values()):
            for w in leakage_warnings(data_files(fam, data)):
                log(f"warning: {w}")
    train_stages(recipes, log=log)
    for name in STUDENTS:
        log(f"== {name}: {recipes[name].output_dir}")
        _recipe_module(recipes[name].family).run(recipes[name], overwrite=True, log=log)
    title = DEMO_TITLES[family] if data is None else f"mmdistill: {family} distillation on {Path(data).name}"
    return report([recipes[k].output_dir for k in REPORTED], out / "report", title=title)


def init(family: str, data: str | Path, out: str | Path, *, runs: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """Write the family's shipped recipes (teacher, student alone, student distilled; for rerankers also the VLMs they
    start from) for a data folder: every data path comes from `data`, every run folder sits under `runs`
    (default runs/<data folder name>), and every path to another stage's model is derived from that stage's run
    folder, so the teacher is named in one place. Returns the files written."""
    out = Path(out)
    runs = Path(runs) if runs is not None else Path("runs") / Path(data).resolve().name
    recipes = demo_recipes(out, family=family, data=data, runs=runs)
    paths = [out / f"{i}-{name}.yaml" for i, name in enumerate(recipes, start=1)]
    clash = [p for p in paths if p.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{clash[0]}: exists (pass --overwrite to replace the recipes in {out})")
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    for (name, recipe), path in zip(recipes.items(), paths):
        full = recipe.model_dump(mode="json", exclude_none=True)
        # the family, where it runs, and the knobs one tunes (loss, train) in full; the rest where it differs from the default
        d = {"family": full["family"], "output_dir": full["output_dir"], **recipe.model_dump(mode="json", exclude_defaults=True)}
        d.update(loss=full["loss"], train=full["train"])
        verb = "distill" if recipe.teacher is not None else "train"
        head = f"# {name}: `mmdistill {verb} {path}` (written by `mmdistill init {family} --data {data}`; run the files in their number order)\n"
        path.write_text(head + yaml.safe_dump(d, sort_keys=False))
    return paths


# ---------------------------------------------------------------------------------------------
# export and serving


def export(model_dir: str | Path, out: str | Path, *, format: str = "onnx", task: str = "auto", int8: bool = False, data: str | Path | None = None, max_items: int = 200, overwrite: bool = False, gen_steps: int = 8, log: Callable = print) -> dict[str, Any]:
    """Export a model folder (ONNX: CLIP encoders, reranker scores, the generative chat path) with a parity check in onnxruntime."""
    from .export.onnx import ExportError, export_onnx

    if format != "onnx":
        raise ExportError(f"--format {format!r}: only onnx is supported")
    if gen_steps < 1:
        raise ExportError(f"--steps {gen_steps}: must be >= 1")
    return export_onnx(model_dir, out, task=task, int8=int8, data=data, max_items=max_items, overwrite=overwrite, gen_steps=gen_steps, log=log)


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, backend: str = "auto", task: str = "auto", int8: bool = False, threads: int | None = None, config: Any = None, reference: str | Path | None = None, webhook: str | None = None,
          teacher: str | Path | None = None, teacher_name: str | None = None, log: Callable = print) -> None:
    """Serve a model folder (or an ONNX export) over HTTP until interrupted; `reference` turns on drift monitoring;
    `teacher` serves a second folder beside it (requests pick one by `model`)."""
    from .serve.app import serve as run_server

    run_server(model_dir, host=host, port=port, backend=backend, task=task, int8=int8, threads=threads, config=config, reference=reference, webhook=webhook, teacher=teacher, teacher_name=teacher_name, log=log)


def ui(student: str | Path | None = None, teacher: str | Path | None = None, *, runs: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860, backend: str = "auto", task: str = "auto", threads: int | None = None, log: Callable = print) -> None:
    """The web UI (Gradio) until interrupted: `student` beside `teacher`, the run folders under `runs`, runs started from it."""
    from .ui.app import launch

    launch(student, teacher, runs=runs, host=host, port=port, task=task, backend=backend, threads=threads, log=log)


# ---------------------------------------------------------------------------------------------
# compress: prune (experts, depth, width) and quantize model folders


def prune(model_dir: str | Path, out: str | Path, *, experts: float | None = None, method: str = "reap", drop_layers: str | None = None, width: str | None = None, calibration: str | Path | None = None, max_samples: int = 64, overwrite: bool = False, log: Callable = print) -> dict[str, Any]:
    """Prune MoE experts / blocks / widths of a model folder on calibration data; see compress/apply.py."""
    from .compress.apply import prune_folder

    return prune_folder(model_dir, out, experts=experts, method=method, drop_layers=drop_layers, width=width, calibration=calibration, max_samples=max_samples, overwrite=overwrite, log=log)


def pipeline(config: str | Path, overrides: list[str] | None = None, *, until: str | None = None, log: Callable = print) -> dict[str, Any]:
    """Run (or resume) a prune -> distill -> quantize -> evaluate pipeline YAML; see pipeline.py."""
    from .pipeline import run_pipeline

    return run_pipeline(config, overrides, until=until, log=log)


PIPELINE_DEMO = "pipeline/reranker-prune-distill-quantize.yaml"


def demo_pipeline(out: Path, *, n: int = 10000, quick: bool = False, seed: int = 0, log: Callable = print) -> dict[str, Any]:
    """ShapesWorld, the reranker teacher (and the VLM it starts from) as the reranker demo trains them, then the shipped
    reranker pipeline on it: prune -> heal -> int8 -> evaluate, one report (out/pipeline/report)."""
    from .config import load_pipeline
    from .pipeline import run_pipeline

    recipes = demo_recipes(out, family="reranker", quick=quick, seed=seed)
    teachers = {k: recipes[k] for k in ("vlm-teacher", "teacher")}
    if not (out / "data" / "summary.json").is_file():
        log(f"generating ShapesWorld ({n} images) in {out / 'data'}")
        synth(out / "data", n=n, seed=seed)
    train_stages(teachers, log=log)
    sets = [f"output_dir={out / 'pipeline'}", f"seed={seed}", f"original.model={teachers['teacher'].output_dir / 'model'}", "original.train=[]",
            f"data.train={out / 'data' / 'rerank_train.jsonl'}", f"data.val={out / 'data' / 'rerank_test.jsonl'}"]
    cfg = load_pipeline(shipped_config(PIPELINE_DEMO), sets)
    if quick:
        for s in cfg.stages:
            if s.distill is not None:
                s.distill.overrides = {**s.distill.overrides, "train.max_steps": 6, "train.batch_size": 4, "train.warmup_steps": 1, "train.save_every": 3, "train.log_every": 2, "data.max_records": 32}
            if s.prune is not None:
                s.prune.calibration = 8
        cfg.eval.max_items, cfg.eval.repeats, cfg.eval.batch = 16, 2, 4
    return run_pipeline(cfg, log=log)


def quantize(model_dir: str | Path, out: str | Path, *, method: str, overwrite: bool = False, calibration: str | Path | None = None, max_samples: int = 128,
             store_dtype: str = "float32") -> dict[str, Any]:
    """Quantize a model folder with torchao (int8-dynamic | int8-weight | int4-weight), bitsandbytes (bnb-int8 | bnb-nf4) or
    GPTQModel (gptq-int4 | awq-int4, calibrated on `calibration`); see compress/quantize.py."""
    from .compress.quantize import quantize_folder

    return quantize_folder(model_dir, out, method, overwrite=overwrite, calibration=calibration, max_samples=max_samples, store_dtype=store_dtype)
