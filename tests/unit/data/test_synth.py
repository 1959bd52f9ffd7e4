"""ShapesWorld: deterministic, valid, and its captions / answers / labels are true."""

import json
import random
from pathlib import Path

import pytest

from mmdistill.data import synth
from mmdistill.data.records import check_file, read_records
from mmdistill.data.synth import (
    CELL_PHRASES,
    Obj,
    Scene,
    caption,
    generate,
    make_scene,
    make_twin,
    questions,
    relevance,
    render,
)

N = 80


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "world"
    generate(out, n=N, seed=3, workers=1)
    return out


# -------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_for_any_number_of_workers(world, tmp_path):
    summary = generate(tmp_path / "w2", n=N, seed=3, workers=2)  # 5 jobs: runs the process pool
    assert tree(tmp_path / "w2") == tree(world)
    assert summary == json.loads((world / "summary.json").read_text())


def test_different_seed_different_data(world, tmp_path):
    generate(tmp_path / "other", n=N, seed=4, workers=1)
    assert (tmp_path / "other" / "pairs_train.jsonl").read_bytes() != (world / "pairs_train.jsonl").read_bytes()


def test_render_is_pure():
    scene = make_scene(random.Random(0))
    a, b = render(scene, 48), render(scene, 48)
    assert a.size == (48, 48) and a.mode == "RGB" and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------- files


def test_files_and_summary(world):
    summary = json.loads((world / "summary.json").read_text())
    assert (summary["generator"], summary["version"], summary["seed"], summary["n"]) == (
        "ShapesWorld",
        synth.VERSION,
        3,
        N,
    )
    assert sum(s["images"] for s in summary["splits"].values()) == N
    for split, info in summary["splits"].items():
        assert len(list((world / "images" / split).glob("*.png"))) == info["images"]
        for kind in ("pairs", "chat", "rerank"):
            assert len(read_jsonl(world / info["files"][kind])) == info[kind]


@pytest.mark.parametrize("kind", ["pairs", "chat", "rerank"])
def test_every_file_validates(world, kind):
    for split in ("train", "val", "test"):
        path = world / f"{kind}_{split}.jsonl"
        records, errors = read_records(path, {"pairs": "pair"}.get(kind, kind))
        assert errors == [] and len(records) > 0
    assert check_file(world / f"{kind}_val.jsonl", decode_images=True) == []


def test_captions_mention_every_object(world):
    for row in read_jsonl(world / "pairs_train.jsonl"):
        for o in row["meta"]["objects"]:
            assert f"a {o['size']} {o['colour']} {o['shape']} {CELL_PHRASES[o['cell']]}" in row["text"]
        if row["meta"]["text"]:
            assert f'the text "{row["meta"]["text"]}"' in row["text"]


def test_chat_answers_match_the_scene(world):
    pairs = {row["image"]: row for row in read_jsonl(world / "pairs_train.jsonl")}
    for row in read_jsonl(world / "chat_train.jsonl"):
        meta = pairs[row["image"]]["meta"]
        assert row["difficulty"] == meta["difficulty"]
        if row["skills"] == ["count"]:
            assert row["response"] == str(len(meta["objects"]))
        if row["skills"] == ["caption"]:
            assert row["response"] == pairs[row["image"]]["text"]


def test_rerank_labels(world):
    for split in ("train", "test"):
        for row in read_jsonl(world / f"rerank_{split}.jsonl"):
            assert (
                len(row["labels"])
                == len(row["documents"])
                == min(synth.RERANK_DOCS, len(list((world / "images" / split).iterdir())))
            )
            index = row["id"].split("-")[0]
            if row["meta"]["direction"] == "text_to_image":
                true = [d["image"] for d in row["documents"]].index(f"images/{split}/{index}.png")
            else:
                true = [d["text"] for d in row["documents"]].index(caption_of(world, split, index))
            assert row["labels"][true] == 3 == max(row["labels"])
            assert set(row["labels"]) <= {0, 1, 2, 3}


def caption_of(world, split, index):
    return next(r["text"] for r in read_jsonl(world / f"pairs_{split}.jsonl") if r["id"] == index)


def test_zeroshot_tasks(world):
    tasks = json.loads((world / "zeroshot_train.json").read_text())["tasks"]
    pairs = {row["image"]: row["meta"]["objects"] for row in read_jsonl(world / "pairs_train.jsonl")}
    single = [image for image, objects in pairs.items() if len(objects) == 1]
    assert set(tasks) == {"shape", "colour", "size"} and single
    for name, task in tasks.items():
        assert "{label}" in task["template"] and all("{label}" in t for t in task["templates"])
        assert [item["image"] for item in task["items"]] == single
        for item in task["items"]:
            assert item["label"] in task["classes"] and item["label"] == pairs[item["image"]][0][name]
    # the ensemble templates read like captions: "a large red {label}" -> "a large red circle ..."
    assert "a large red {label}" in tasks["shape"]["templates"]


def test_rerun_replaces_but_foreign_folders_are_refused(tmp_path):
    generate(tmp_path / "w", n=12, seed=0, workers=1)
    generate(tmp_path / "w", n=10, seed=0, workers=1)
    assert len(list((tmp_path / "w" / "images").rglob("*.png"))) == 10
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate(tmp_path / "mine", n=10)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="splits"):
        generate(tmp_path / "x", n=10, splits=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path / "x", n=10, size=8)


# ---------------------------------------------------------------- scene logic


def test_hand_built_scene_questions():
    scene = Scene(
        objects=(
            Obj("square", "blue", "small", "center"),
            Obj("circle", "red", "large", "top left"),
            Obj("circle", "green", "small", "bottom right"),
        ),
        text="AB",
        text_cell="top right",
    )
    assert caption(scene) == (
        "a large red circle at the top left, a small blue square in the center, "
        'a small green circle at the bottom right and the text "AB"'
    )
    answers = {q["prompt"]: (q["response"], q["skill"]) for q in questions(scene)}
    assert answers["How many coloured shapes are there?"] == ("3", "count")
    assert answers["What shape is at the top left?"] == ("circle", "shape")
    assert answers["What shape is in the center?"] == ("square", "shape")
    assert answers["What colour is the square?"] == ("blue", "colour")
    assert "What colour is the circle?" not in answers  # two circles: ambiguous
    assert answers["What colour is the shape at the bottom right?"] == ("green", "colour")
    assert answers["Where is the red circle?"] == ("top left", "position")
    assert answers["Is the red circle small or large?"] == ("large", "size")
    assert answers["Is the red circle left of the blue square?"] == ("yes", "relation")
    assert answers["Is the blue square left of the red circle?"] == ("no", "relation")
    assert answers["Is the red circle above the green circle?"] == ("yes", "relation")
    assert answers["Is the green circle above the blue square?"] == ("no", "relation")
    assert answers["What does the text say?"] == ("AB", "text")
    assert answers["Describe the image."] == (caption(scene), "caption")


def test_objects_with_same_colour_and_shape_are_not_named():
    scene = Scene(objects=(Obj("star", "red", "small", "left"), Obj("star", "red", "large", "right")))
    prompts = [q["prompt"] for q in questions(scene)]
    assert not any("the red star" in p for p in prompts)
    assert caption(scene) == "a small red star on the left and a large red star on the right"


def test_scene_rejects_bad_specs():
    with pytest.raises(ValueError):
        Obj("hexagon", "red", "small", "left")
    with pytest.raises(ValueError):
        Scene(objects=(Obj("star", "red", "small", "left"), Obj("circle", "red", "small", "left")))
    with pytest.raises(ValueError):
        Scene(objects=(Obj("star", "red", "small", "left"),), text="AB", text_cell="left")


def test_difficulty():
    one = (Obj("star", "red", "small", "left"),)
    four = tuple(Obj("star", "red", "small", c) for c in ("left", "right", "top", "bottom"))
    assert Scene(objects=one).difficulty == "easy"
    assert Scene(objects=one, clutter=1).difficulty == "medium"
    assert Scene(objects=four, clutter=1).difficulty == "hard"


def test_twins_differ_in_exactly_one_attribute_and_are_hard_negatives():
    rng = random.Random(0)
    for _ in range(300):
        scene = make_scene(rng)
        twin = make_twin(scene, rng)
        before = [tuple(o.__dict__.values()) for o in scene.objects] + [scene.text]
        after = [tuple(o.__dict__.values()) for o in twin.objects] + [twin.text]
        if {o.cell for o in scene.objects} == {o.cell for o in twin.objects}:
            changed = sum(a != b for x, y in zip(before, after, strict=True) for a, b in zip_values(x, y))
            assert changed == 1
        else:  # one object moved (which can reorder the objects): same objects, one new cell
            assert {x[:3] for x in before[:-1]} == {x[:3] for x in after[:-1]} and before[-1] == after[-1]
            assert len({o.cell for o in twin.objects} - {o.cell for o in scene.objects}) == 1
        assert twin.render_seed == scene.render_seed and twin.description != scene.description
        assert relevance(scene, twin) == 2 and relevance(scene, scene) == 3


def zip_values(x, y):
    """Pair up attribute tuples (or the text strings)."""
    return zip(x, y, strict=True) if isinstance(x, tuple) else [(x, y)]


def test_scene_mix():
    rng = random.Random(1)
    scenes = [make_scene(rng) for _ in range(2000)]
    single = sum(len(s.objects) == 1 for s in scenes) / len(scenes)
    with_text = sum(s.text is not None for s in scenes) / len(scenes)
    assert 0.25 <= single <= 0.35 and 0.25 <= with_text <= 0.35
    assert {s.difficulty for s in scenes} == {"easy", "medium", "hard"}
    twins = sum(synth.scene_for_index(0, i).twin_of is not None for i in range(500))
    assert 50 <= twins <= 150
