"""Recipes: every shipped YAML validates, unknown keys and bad values are one-line errors naming the key."""

from pathlib import Path

import pytest

from mmdistill import api
from mmdistill.config import RecipeError, load_recipe, parse_overrides
from mmdistill.losses.composite import build_contrastive_loss

SHIPPED = sorted(p for p in api.CONFIG_DIR.rglob("*.yaml") if p.parent.name not in ("pipeline", "accelerate"))  # accelerate launch configs: tests/unit/engine
PIPELINES = sorted((api.CONFIG_DIR / "pipeline").glob("*.yaml"))


def build_loss(family, terms, teacher):
    if family == "reranker":
        from mmdistill.losses.ranking import build_ranking_loss

        return build_ranking_loss(terms, 32, 64 if teacher else None)
    if family == "generative":
        from mmdistill.recipes.generative import build_generative_loss

        return build_generative_loss(terms, student_dims={"hidden": 32, "vision": 32, "audio": 32}, teacher_dims={"hidden": 64, "vision": 64, "audio": 64} if teacher else None)
    return build_contrastive_loss(terms, 32, 64 if teacher else None)


def test_configs_are_shipped():
    assert len(SHIPPED) >= 3
    assert (Path(__file__).resolve().parents[2] / "configs").resolve() == api.CONFIG_DIR.resolve()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    terms = {n: {"weight": t.weight, **({"schedule": t.schedule} if t.schedule else {}), **t.options} for n, t in r.loss.terms.items()}
    build_loss(r.family, terms, r.teacher)  # the loss terms build, options and schedules included
    assert r.fingerprint() == load_recipe(path).fingerprint()


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("output_dir: x\ndata: {train: a.jsonl}\ntrain: {max_step: 3}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: train\.max_step: unknown key"):
        load_recipe(p)


def test_bad_value_and_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("output_dir: x\ndata: {train: a.jsonl, on_error: ignore}\n")
    with pytest.raises(RecipeError, match="data.on_error"):
        load_recipe(p)
    p.write_text("output_dir: x\n  data: [\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(p)


def test_overrides_are_typed_and_validated(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("output_dir: x\ndata: {train: a.jsonl}\nstudent: {init: tiny}\n")
    r = load_recipe(p, ["train.max_steps=7", "train.betas=[0.9, 0.95]", "loss.terms.clip.weight=0.5"])
    assert r.train.max_steps == 7 and r.train.betas == (0.9, 0.95) and r.loss.terms["clip"].weight == 0.5
    with pytest.raises(RecipeError, match="train.max_steps"):
        load_recipe(p, ["train.max_steps=-1"])
    with pytest.raises(RecipeError, match="expected key=value"):
        parse_overrides(["oops"])


def test_fingerprint_ignores_where_but_not_what(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("output_dir: x\ndata: {train: a.jsonl}\nstudent: {init: tiny}\n")
    a = load_recipe(p)
    assert a.fingerprint() == load_recipe(p, ["output_dir=y", "name=z"]).fingerprint()
    assert a.fingerprint() != load_recipe(p, ["seed=1"]).fingerprint()


def test_a_field_added_later_keeps_older_runs_fingerprint(tmp_path):
    """A run recorded before `student.calibration` existed (no such key in its recipe) keeps its hash at the default."""
    import hashlib
    import json

    from mmdistill.config import ADDED_FIELDS

    p = tmp_path / "r.yaml"
    for text in ("output_dir: x\ndata: {train: a.jsonl}\nstudent: {init: tiny}\n", "output_dir: x\ndata: {train: a.jsonl}\nteacher: {model: t}\n"):
        p.write_text(text)
        a = load_recipe(p)
        old = a.model_dump(mode="json")
        for key in ADDED_FIELDS:
            section, _, leaf = key.partition(".")
            if old[section] is not None:  # a recipe without a teacher section has none of its fields
                del old[section][leaf]
        for key in ("output_dir", "name", "role", "eval"):
            old.pop(key)
        for key in ("save_every", "keep_last", "log_every", "threads", "prefetch", "sharding"):
            old["train"].pop(key)
        assert a.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
        assert a.fingerprint() == load_recipe(p, ["train.prefetch=2"]).fingerprint()  # how fast, not what: a run resumes under another prefetch
        assert a.fingerprint() == load_recipe(p, ["train.sharding=fsdp"]).fingerprint()  # and sharded or not (same checkpoint files)
        assert a.fingerprint() != load_recipe(p, ["student.calibration=8"]).fingerprint()


def test_inherit_needs_a_teacher(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("output_dir: x\ndata: {train: a.jsonl}\nstudent: {init: inherit, layers: {vision: [0]}}\n")
    with pytest.raises(RecipeError, match="inherit needs a teacher"):
        load_recipe(p)


def test_group_size_is_for_rerankers_only(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("family: generative\noutput_dir: x\nstudent: {init: tiny}\ndata: {train: a.jsonl, group_size: 4}\n")
    with pytest.raises(RecipeError, match="group_size.*generative recipe"):
        load_recipe(p)
    p.write_text("family: reranker\noutput_dir: x\nstudent: {init: tiny}\ndata: {train: a.jsonl, group_size: 1}\n")
    with pytest.raises(RecipeError, match="group_size"):
        load_recipe(p)
    p.write_text("family: reranker\noutput_dir: x\nstudent: {init: tiny}\ndata: {train: a.jsonl, group_size: 4}\n")
    assert load_recipe(p).data.group_size == 4
    p.write_text("family: reranker\noutput_dir: x\nstudent: {init: tiny}\ndata: {train: a.jsonl, group_sampling: graded}\n")
    with pytest.raises(RecipeError, match="group_sampling=graded.*group_size"):
        load_recipe(p)


def test_model_config_overrides_stay_dotted(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("output_dir: x\ndata: {train: a.jsonl}\nstudent: {init: tiny}\n")
    r = load_recipe(p, ["student.overrides.vision_config.hidden_size=32", "student.layers.vision=[0, 2]"])
    assert r.student.overrides == {"vision_config.hidden_size": 32}
    assert r.student.layers == {"vision": [0, 2]}
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p, ["train.lr=["])


def test_reranker_demo_chains_its_stages(tmp_path):
    """The reranker demo trains the two ShapesWorld VLMs first and starts each reranker from the right one."""
    rs = api.demo_recipes(tmp_path, family="reranker")
    assert list(rs) == ["vlm-teacher", "vlm-student", "teacher", "student-base", "student-kd"]
    assert rs["vlm-teacher"].family == rs["vlm-student"].family == "generative"
    assert rs["vlm-teacher"].data.train == tmp_path / "data" / "chat_train.jsonl"
    assert rs["teacher"].data.train == tmp_path / "data" / "rerank_train.jsonl"
    assert rs["teacher"].student.model == str(tmp_path / "vlm-teacher" / "model")
    for name in ("student-base", "student-kd"):
        assert rs[name].student.model == str(tmp_path / "vlm-student" / "model")
        assert rs[name].eval.reference == str(tmp_path / "teacher" / "model")
    assert rs["student-kd"].teacher.model == str(tmp_path / "teacher" / "model")
    assert api.demo_recipes(tmp_path, family="generative")["student-kd"].teacher.model == str(tmp_path / "teacher" / "model")


def test_demo_stages_can_be_swapped_for_the_pruned_students(tmp_path):
    stages = {"student-base": "reranker/shapesworld-student-pruned-alone.yaml", "student-kd": "reranker/shapesworld-student-pruned-kd.yaml"}
    rs = api.demo_recipes(tmp_path, family="reranker", stages=stages)
    for name in ("student-base", "student-kd"):  # pruned from the demo's teacher, not the shipped path
        assert rs[name].student.init == "inherit" and rs[name].student.model == str(tmp_path / "teacher" / "model")
        assert rs[name].output_dir == tmp_path / name and rs[name].eval.reference == str(tmp_path / "teacher" / "model")
    assert rs["student-base"].teacher is None and rs["student-kd"].teacher.model == str(tmp_path / "teacher" / "model")
    assert rs["student-base"].student.overrides == rs["student-kd"].student.overrides  # the same student, with and without KD
    with pytest.raises(RecipeError, match=r"unknown reranker stage\(s\) \['student'\]"):
        api.demo_recipes(tmp_path, family="reranker", stages={"student": "reranker/shapesworld-student-pruned-kd.yaml"})


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(path, tmp_path):
    """A shipped pipeline validates, its teacher recipes and distillation recipes resolve, and each distillation
    stage gives a valid recipe of the pipeline's family with the original as teacher and the input as student."""
    from mmdistill.config import load_pipeline
    from mmdistill.pipeline import distill_recipe, resolve_recipe, stage_inputs

    cfg = load_pipeline(path)
    for name in cfg.original.train:
        assert load_recipe(resolve_recipe(name)).output_dir
    kinds = [s.kind for s in cfg.stages]
    assert kinds == ["prune", "distill", "quantize"]
    inputs = stage_inputs(cfg)
    for s in cfg.stages:
        if s.distill is not None:
            r = distill_recipe(cfg, s, tmp_path / inputs[s.name], tmp_path / s.name)
            assert r.family == cfg.family and r.teacher.model == str(cfg.original.model)
            assert r.student.init == "pretrained" and r.student.model == str(tmp_path / inputs[s.name])
            assert r.output_dir == tmp_path / s.name and r.data.val == cfg.data.val
    # the original model's last recipe writes the folder the pipeline starts from
    last = load_recipe(resolve_recipe(cfg.original.train[-1]))
    assert Path(cfg.original.model) == last.output_dir / "model"


def test_pipeline_errors_name_file_and_key(tmp_path):
    from mmdistill.config import load_pipeline

    p = tmp_path / "p.yaml"
    p.write_text("family: reranker\noutput_dir: x\noriginal: {model: m}\ndata: {train: a, val: b}\nstages:\n  - {name: a, quantize: {method: int8-weight}}\n  - {name: a, quantize: {method: int8-weight}}\n")
    with pytest.raises(RecipeError, match=r"p.yaml: .*stage name 'a' is used twice"):
        load_pipeline(p)
    with pytest.raises(RecipeError, match=r"p.yaml: eval.batch: Input should be greater than or equal to 2"):
        load_pipeline(p, ["stages=[{name: a, quantize: {method: int8-weight}}]", "eval.batch=1"])
