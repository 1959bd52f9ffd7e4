"""ShapesWorld: the built-in, deterministic synthetic data set.

Each image is a ``size x size`` PNG split into a 3x3 grid of cells. It holds 1-4
coloured shapes in distinct cells (shape, colour, size and cell each drawn
uniformly), sometimes two capital letters of text in a free cell, and clutter that
is never described: background noise, faint lines, small grey blobs and colour
jitter, all stronger in harder images. About 20% of the images are *twins*: an
earlier image of the same split with exactly one attribute changed (same
background and noise), so near-duplicates are guaranteed hard negatives.

Everything is a pure function of ``(seed, index)``: :func:`scene_for_index` builds
a :class:`Scene` (the spec), :func:`render` draws it, :func:`caption` and
:func:`questions` describe it. The number of worker processes changes nothing.

Files written by :func:`generate` (``{split}`` is train / val / test)::

    images/{split}/{index:06d}.png
    pairs_{split}.jsonl     one caption per image                       (pair records)
    chat_{split}.jsonl      "Describe the image." + up to 3 short questions (chat records)
    rerank_{split}.jsonl    per image: caption -> ~10 images, image -> ~10 captions
                            with graded labels 0-3                    (rerank records)
    zeroshot_{split}.json   zero-shot classification tasks
    summary.json            counts, file names, generator version and seed

With ``audio=True`` (``mmdistill data synth DIR --audio``) also the spoken ShapesWorld of
:mod:`mmdistill.data.speech`: ``audio/{split}/*.wav`` (espeak-ng), ``speech_{split}.jsonl``
(transcription and spoken-question records) and ``omni_{split}.jsonl`` (chat + speech records).

Zero-shot tasks (``shape``, ``colour``, ``size``) use only single-object images,
where the label is unambiguous. Captions never say "shape" or "object"; a
single-object caption reads "a large red circle at the top left". So each task
gives ``templates``: every caption-style phrase with the other two attributes
filled in ("a large red {label}" for the shape task), to be used as a CLIP-style
prompt ensemble (average the normalised text embeddings per class). ``template``
is one short prompt ("a {label}") for evaluators that take a single template.
Positions are left out of the templates because they are not what is classified.

Rerank labels grade how well a candidate image matches the query scene:
3 = same description (the image itself, or an exact duplicate), 2 = near
duplicate (Jaccard similarity of attribute-pair tokens >= 0.3, e.g. a twin),
1 = some overlap (>= 0.1), 0 = unrelated. See :func:`relevance`.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import multiprocessing
import os
import random
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmdistill.data.records import DEFAULT_INSTRUCTION

__all__ = [
    "VERSION",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "CELLS",
    "Obj",
    "Scene",
    "make_scene",
    "make_twin",
    "scene_for_index",
    "render",
    "caption",
    "questions",
    "relevance",
    "generate",
    "generate_text_chat",
]

VERSION = 1

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 84, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
    "cyan": (20, 190, 200),
}
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL_PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
SPLITS = ("train", "val", "test")

N_OBJECTS_WEIGHTS = {1: 0.3, 2: 0.3, 3: 0.25, 4: 0.15}  # ~30% single-object images
CLUTTER_WEIGHTS = (0.4, 0.35, 0.25)  # low, medium, high
TEXT_P = 0.3
TWIN_P = 0.2
TWIN_WINDOW = 50  # a twin copies one of the previous 50 images of its split
CAPTION_PREFIXES = ("", "an image of ", "a picture of ", "a drawing of ")

INSTRUCTION_T2I = ("Given a caption, find the matching image.", DEFAULT_INSTRUCTION)
INSTRUCTION_I2T = ("Given an image, find the caption that describes it.", DEFAULT_INSTRUCTION)
RERANK_DOCS = 10
RERANK_HARD = 4


# ------------------------------------------------------------------------------ scene


@dataclass(frozen=True)
class Obj:
    """One described object."""

    shape: str
    colour: str
    size: str
    cell: str

    def __post_init__(self):
        for name, value, allowed in [
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, SIZES),
            ("cell", self.cell, CELLS),
        ]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def name(self) -> str:
        """'large red circle'."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to render and describe one image.

    ``objects`` are kept sorted by cell (reading order), so scenes that differ in
    one attribute get captions that differ in one word. ``render_seed`` drives the
    undescribed details (background, noise, lines, blobs, jitter).
    """

    objects: tuple[Obj, ...]
    text: str | None = None
    text_cell: str | None = None
    clutter: int = 0  # 0 low, 1 medium, 2 high
    style: int = 0  # caption prefix variant
    render_seed: int = 0
    twin_of: int | None = None  # index of the image this one copies, if a twin

    def __post_init__(self):
        objects = tuple(sorted(self.objects, key=lambda o: CELLS.index(o.cell)))
        object.__setattr__(self, "objects", objects)
        cells = [o.cell for o in objects]
        if not objects or len(set(cells)) != len(cells):
            raise ValueError("a scene needs at least one object, each in its own cell")
        if (self.text is None) != (self.text_cell is None):
            raise ValueError("text and text_cell go together")
        if self.text_cell is not None and (self.text_cell not in CELLS or self.text_cell in cells):
            raise ValueError(f"text_cell must be a free cell, got {self.text_cell!r}")
        if self.clutter not in (0, 1, 2) or not 0 <= self.style < len(CAPTION_PREFIXES):
            raise ValueError("clutter must be 0, 1 or 2 and style an index into CAPTION_PREFIXES")

    @property
    def difficulty(self) -> str:
        """easy / medium / hard from the number of objects and the clutter level."""
        score = (len(self.objects) - 1) + 1.5 * self.clutter
        return "easy" if score <= 1 else "hard" if score >= 3.5 else "medium"

    @property
    def description(self) -> tuple:
        """What the caption says; equal descriptions mean equal captions (up to style)."""
        return (self.objects, self.text)

    def free_cells(self) -> list[str]:
        used = {o.cell for o in self.objects} | {self.text_cell}
        return [c for c in CELLS if c not in used]


def _rng(seed: int, index: int, stream: str) -> random.Random:
    """Independent, reproducible RNG per (seed, image, purpose); str seeds hash with sha512."""
    return random.Random(f"shapesworld/{VERSION}/{seed}/{index}/{stream}")


def make_scene(rng: random.Random) -> Scene:
    """Draw a random scene spec (no rendering)."""
    n = rng.choices(list(N_OBJECTS_WEIGHTS), weights=list(N_OBJECTS_WEIGHTS.values()))[0]
    cells = rng.sample(CELLS, n)
    objects = tuple(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), c) for c in cells)
    text = text_cell = None
    if rng.random() < TEXT_P:
        text = "".join(rng.choice(string.ascii_uppercase) for _ in range(2))
        text_cell = rng.choice([c for c in CELLS if c not in cells])
    return Scene(
        objects=objects,
        text=text,
        text_cell=text_cell,
        clutter=rng.choices((0, 1, 2), weights=CLUTTER_WEIGHTS)[0],
        style=rng.randrange(len(CAPTION_PREFIXES)),
        render_seed=rng.getrandbits(63),
    )


def make_twin(scene: Scene, rng: random.Random, twin_of: int | None = None) -> Scene:
    """A copy of ``scene`` with exactly one described attribute changed: one object's
    shape, colour, size or cell, or the text. Rendering details stay the same."""
    options = [(i, attr) for i in range(len(scene.objects)) for attr in ("shape", "colour", "size", "cell")]
    if scene.text is not None:
        options.append((None, "text"))
    i, attr = rng.choice(options)
    objects, text = list(scene.objects), scene.text
    if attr == "text":
        while text == scene.text:
            text = "".join(rng.choice(string.ascii_uppercase) for _ in range(2))
    else:
        o = objects[i]
        allowed = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "cell": scene.free_cells()}[attr]
        new = rng.choice([v for v in allowed if v != getattr(o, attr)])
        objects[i] = Obj(**{**o.__dict__, attr: new})
    return Scene(
        objects=tuple(objects),
        text=text,
        text_cell=scene.text_cell,
        clutter=scene.clutter,
        style=scene.style,
        render_seed=scene.render_seed,
        twin_of=twin_of,
    )


def _is_twin(seed: int, index: int, split_start: int) -> bool:
    return index > split_start and _rng(seed, index, "twin").random() < TWIN_P


def scene_for_index(seed: int, index: int, split_start: int = 0) -> Scene:
    """The scene of image ``index``. A twin copies a non-twin among the previous
    TWIN_WINDOW images of its split (which starts at ``split_start``)."""
    if _is_twin(seed, index, split_start):
        rng = _rng(seed, index, "twin")
        rng.random()  # the draw _is_twin used
        for _ in range(3):
            j = rng.randrange(max(split_start, index - TWIN_WINDOW), index)
            if not _is_twin(seed, j, split_start):
                return make_twin(make_scene(_rng(seed, j, "scene")), rng, twin_of=j)
    return make_scene(_rng(seed, index, "scene"))


# ----------------------------------------------------------------------------- render


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def _polygon(cx: float, cy: float, radii: list[float], start_deg: float) -> list[tuple[float, float]]:
    """Points at the given radii, evenly spaced in angle, starting at start_deg."""
    step = 2 * np.pi / len(radii)
    start = np.deg2rad(start_deg)
    return [(cx + r * np.cos(start + k * step), cy + r * np.sin(start + k * step)) for k, r in enumerate(radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r), fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.15] * 4, 45 + rot), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, [r * 1.1, r * 0.8] * 2, -90 + rot), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [r * 1.15] * 3, -90 + rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.15, r * 0.5] * 5, -90 + rot), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene as a ``size x size`` RGB image (pure: same scene, same pixels).

    Drawn at 2x and downsampled for anti-aliasing; pixel noise is added last.
    """
    rng = np.random.default_rng(scene.render_seed)
    ss = 2
    S = size * ss
    cell = S / 3
    clutter = scene.clutter

    bg = np.clip(rng.integers(185, 236) + rng.integers(-12, 13, 3), 0, 255)
    img = Image.new("RGB", (S, S), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)

    # Faint lines and grey blobs: clutter that captions never mention.
    for _ in range(rng.integers(*[(0, 2), (1, 4), (3, 7)][clutter])):
        x0, y0, x1, y1 = rng.uniform(0, S, 4)
        shade = tuple(int(v) for v in np.clip(bg - rng.integers(15, 50), 0, 255))
        draw.line((x0, y0, x1, y1), fill=shade, width=ss)
    for _ in range(rng.integers(*[(0, 2), (1, 4), (3, 7)][clutter])):
        x, y = rng.uniform(0, S, 2)
        rx, ry = cell * rng.uniform(0.05, 0.13, 2)
        grey = int(rng.integers(90, 170))
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=(grey, grey, grey))

    jitter = (12, 20, 28)[clutter]
    for o in scene.objects:
        row, col = divmod(CELLS.index(o.cell), 3)
        cx, cy = (np.array([col, row]) + 0.5 + rng.uniform(-0.12, 0.12, 2)) * cell
        r = cell * (0.36 if o.size == "large" else 0.2) * rng.uniform(0.92, 1.08)
        fill = tuple(
            int(v) for v in np.clip(np.array(COLOURS[o.colour]) + rng.integers(-jitter, jitter + 1, 3), 0, 255)
        )
        _draw_shape(draw, o.shape, cx, cy, r, rng.uniform(-8, 8), fill)

    if scene.text is not None:
        row, col = divmod(CELLS.index(scene.text_cell), 3)
        cx, cy = (np.array([col, row]) + 0.5 + rng.uniform(-0.08, 0.08, 2)) * cell
        dark = int(rng.integers(0, 60))
        draw.text((cx, cy), scene.text, fill=(dark, dark, dark), font=_font(max(8, int(cell * 0.55))), anchor="mm")

    img = img.resize((size, size), Image.Resampling.BOX)
    noise = rng.normal(0.0, (3.0, 9.0, 18.0)[clutter], (size, size, 3))  # (H, W, 3)
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


# --------------------------------------------------------------------- text and labels


def caption(scene: Scene) -> str:
    """'a large red circle at the top left, a small blue square in the center and the text "AB"'."""
    items = [f"a {o.name} {CELL_PHRASES[o.cell]}" for o in scene.objects]
    if scene.text is not None:
        items.append(f'the text "{scene.text}"')
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return CAPTION_PREFIXES[scene.style] + body


def questions(scene: Scene) -> list[dict[str, str]]:
    """Every question this scene answers unambiguously: ``{"prompt", "response", "skill"}``.

    Skills: caption, count, shape, colour, size, position, relation, text. An object
    is named by colour and shape ("the red circle") only when no other object has
    both; colour questions by shape alone only when the shape is unique.
    """
    objs = scene.objects
    qs = [
        {"prompt": "Describe the image.", "response": caption(scene), "skill": "caption"},
        {"prompt": "How many coloured shapes are there?", "response": str(len(objs)), "skill": "count"},
    ]
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    named = [o for o in objs if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objs) == 1]
    for o in objs:
        where = CELL_PHRASES[o.cell]
        qs.append({"prompt": f"What shape is {where}?", "response": o.shape, "skill": "shape"})
        qs.append({"prompt": f"What colour is the shape {where}?", "response": o.colour, "skill": "colour"})
        if shape_counts[o.shape] == 1:
            qs.append({"prompt": f"What colour is the {o.shape}?", "response": o.colour, "skill": "colour"})
    for o in named:
        qs.append({"prompt": f"Is the {o.colour} {o.shape} small or large?", "response": o.size, "skill": "size"})
        qs.append({"prompt": f"Where is the {o.colour} {o.shape}?", "response": o.cell, "skill": "position"})
    for a, b in itertools.permutations(named, 2):
        (ra, ca), (rb, cb) = divmod(CELLS.index(a.cell), 3), divmod(CELLS.index(b.cell), 3)
        pair = f"the {a.colour} {a.shape}", f"the {b.colour} {b.shape}"
        if ca != cb:
            qs.append(
                {
                    "prompt": f"Is {pair[0]} left of {pair[1]}?",
                    "response": "yes" if ca < cb else "no",
                    "skill": "relation",
                }
            )
        if ra != rb:
            qs.append(
                {
                    "prompt": f"Is {pair[0]} above {pair[1]}?",
                    "response": "yes" if ra < rb else "no",
                    "skill": "relation",
                }
            )
    if scene.text is not None:
        qs.append({"prompt": "What does the text say?", "response": scene.text, "skill": "text"})
    return qs


def _tokens(scene: Scene) -> frozenset:
    """Attribute-pair tokens: for each object, each pair of its four attributes
    (shape+colour, colour+cell, ...), plus the text. Scenes one attribute apart
    share most tokens; unrelated scenes share few."""
    toks = set()
    for o in scene.objects:
        attrs = (("shape", o.shape), ("colour", o.colour), ("size", o.size), ("cell", o.cell))
        toks.update(itertools.combinations(attrs, 2))
    if scene.text is not None:
        toks.add(("text", scene.text))
    return frozenset(toks)


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b)


def relevance(query: Scene, candidate: Scene) -> int:
    """Graded relevance 0-3 of a candidate image for a query scene (see module doc)."""
    if query.description == candidate.description:
        return 3
    sim = _jaccard(_tokens(query), _tokens(candidate))
    return 2 if sim >= 0.3 else 1 if sim >= 0.1 else 0


# --------------------------------------------------------------------------- generate


def _render_chunk(job: tuple[str, int, list[tuple[str, Scene]]]) -> int:
    """Worker: render scenes and write PNGs. Returns the number written."""
    out_dir, size, items = job
    for rel_path, scene in items:
        render(scene, size).save(Path(out_dir) / rel_path, format="PNG")
    return len(items)


def _split_sizes(n: int, splits: tuple[float, float, float]) -> dict[str, int]:
    if len(splits) != 3 or any(f < 0 for f in splits) or abs(sum(splits) - 1) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test) summing to 1, got {splits}")
    n_train, n_val = round(n * splits[0]), round(n * splits[1])
    n_val = min(n_val, n - n_train)
    return {"train": n_train, "val": n_val, "test": n - n_train - n_val}


def _prepare_out_dir(out: Path) -> None:
    """Create ``out``; clear a previous ShapesWorld output; refuse any other non-empty folder."""
    if out.exists() and any(out.iterdir()):
        if not (out / "summary.json").is_file():
            raise FileExistsError(f"{out} is not empty and holds no ShapesWorld summary.json; refusing to write there")
        shutil.rmtree(out / "images", ignore_errors=True)
        shutil.rmtree(out / "audio", ignore_errors=True)
        for pattern in ("pairs_*.jsonl", "chat_*.jsonl", "rerank_*.jsonl", "zeroshot_*.json", "speech_*.jsonl", "omni_*.jsonl", "summary.json"):
            for p in out.glob(pattern):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _chat_rows(seed: int, index: int, image: str, scene: Scene) -> list[dict]:
    """The caption question plus one question each for up to 3 other random skills."""
    rng = _rng(seed, index, "chat")
    by_skill: dict[str, list[dict]] = {}
    for q in questions(scene):
        by_skill.setdefault(q["skill"], []).append(q)
    skills = [s for s in by_skill if s != "caption"]
    chosen = by_skill["caption"] + [rng.choice(by_skill[s]) for s in rng.sample(skills, min(3, len(skills)))]
    return [
        {
            "image": image,
            "prompt": q["prompt"],
            "response": q["response"],
            "difficulty": scene.difficulty,
            "skills": [q["skill"]],
            "id": f"{index:06d}-{k}",
        }
        for k, q in enumerate(chosen)
    ]


def _rerank_rows(
    seed: int, indices: list[int], scenes: dict[int, Scene], paths: dict[int, str], captions: dict[int, str]
) -> list[dict]:
    """Two lists per image of one split: caption -> images and image -> captions.

    Candidates: the true image, up to RERANK_HARD hard negatives (twins first, then
    the most similar images among neighbours in attribute buckets), random fill.
    """
    tokens = {i: _tokens(scenes[i]) for i in indices}
    # Bucket images by each object with one attribute wildcarded: images one
    # attribute apart share a bucket. Buckets are sorted by index.
    buckets: dict[tuple, list[int]] = {}
    keys: dict[int, list[tuple]] = {}
    for i in indices:
        keys[i] = []
        for o in scenes[i].objects:
            attrs = (o.shape, o.colour, o.size, o.cell)
            for w in range(4):
                key = (w, *attrs[:w], *attrs[w + 1 :])
                keys[i].append(key)
                buckets.setdefault(key, []).append(i)
    twins: dict[int, set[int]] = {i: set() for i in indices}
    for i in indices:
        j = scenes[i].twin_of
        if j is not None and j in twins:
            twins[i].add(j)
            twins[j].add(i)

    rows = []
    for i in indices:
        rng = _rng(seed, i, "rerank")
        near = set(twins[i])
        for key in keys[i]:
            bucket = buckets[key]
            k = bisect.bisect_left(bucket, i)
            near.update(bucket[max(0, k - 8) : k + 9])
        near.discard(i)
        ranked = sorted(near, key=lambda c: (c not in twins[i], -_jaccard(tokens[i], tokens[c]), c))
        docs = [i] + [c for c in ranked if tokens[i] & tokens[c]][:RERANK_HARD]
        n_docs = min(RERANK_DOCS, len(indices))
        while len(docs) < n_docs:
            c = rng.choice(indices)
            if c not in docs:
                docs.append(c)
        labels = [relevance(scenes[i], scenes[c]) for c in docs]
        meta = {"difficulty": scenes[i].difficulty}
        for direction in ("text_to_image", "image_to_text"):
            order = rng.sample(range(len(docs)), len(docs))
            if direction == "text_to_image":
                query, documents = {"text": captions[i]}, [{"image": paths[docs[k]]} for k in order]
                instruction = rng.choice(INSTRUCTION_T2I)
            else:
                query, documents = {"image": paths[i]}, [{"text": captions[docs[k]]} for k in order]
                instruction = rng.choice(INSTRUCTION_I2T)
            rows.append(
                {
                    "instruction": instruction,
                    "query": query,
                    "documents": documents,
                    "labels": [labels[k] for k in order],
                    "id": f"{i:06d}-{'t2i' if direction == 'text_to_image' else 'i2t'}",
                    "meta": {**meta, "direction": direction},
                }
            )
    return rows


def _zeroshot(indices: list[int], scenes: dict[int, Scene], paths: dict[int, str]) -> dict:
    """Shape / colour / size classification over single-object images (see module doc)."""
    single = [i for i in indices if len(scenes[i].objects) == 1]
    colours = list(COLOURS)
    tasks = {
        "shape": {
            "classes": list(SHAPES),
            "template": "a {label}",
            "templates": [f"a {s} {c} {{label}}" for s in SIZES for c in colours],
        },
        "colour": {
            "classes": colours,
            "template": "a {label} shape",
            "templates": [f"a {s} {{label}} {sh}" for s in SIZES for sh in SHAPES],
        },
        "size": {
            "classes": list(SIZES),
            "template": "a {label} shape",
            "templates": [f"a {{label}} {c} {sh}" for c in colours for sh in SHAPES],
        },
    }
    for task, spec in tasks.items():
        spec["items"] = [{"image": paths[i], "label": getattr(scenes[i].objects[0], task)} for i in single]
    return {"tasks": tasks}


def _write_split(
    out: Path, split: str, indices: list[int], scenes: dict[int, Scene], paths: dict[int, str], seed: int
) -> dict:
    """Write the pairs / chat / rerank / zero-shot files of one split; return its summary."""
    captions = {i: caption(scenes[i]) for i in indices}
    pairs = [
        {
            "image": paths[i],
            "text": captions[i],
            "id": f"{i:06d}",
            "meta": {
                "difficulty": scenes[i].difficulty,
                "objects": [o.__dict__.copy() for o in scenes[i].objects],
                "text": scenes[i].text,
                "twin_of": None if scenes[i].twin_of is None else f"{scenes[i].twin_of:06d}",
            },
        }
        for i in indices
    ]
    chat = [row for i in indices for row in _chat_rows(seed, i, paths[i], scenes[i])]
    rerank = _rerank_rows(seed, indices, scenes, paths, captions)
    zeroshot = _zeroshot(indices, scenes, paths)

    files = {
        "pairs": f"pairs_{split}.jsonl",
        "chat": f"chat_{split}.jsonl",
        "rerank": f"rerank_{split}.jsonl",
        "zeroshot": f"zeroshot_{split}.json",
    }
    _write_jsonl(out / files["pairs"], pairs)
    _write_jsonl(out / files["chat"], chat)
    _write_jsonl(out / files["rerank"], rerank)
    (out / files["zeroshot"]).write_text(json.dumps(zeroshot, indent=1) + "\n", encoding="utf-8")
    return {
        "images": len(indices),
        "pairs": len(pairs),
        "chat": len(chat),
        "rerank": len(rerank),
        "zeroshot": {task: len(spec["items"]) for task, spec in zeroshot["tasks"].items()},
        "difficulty": {d: sum(scenes[i].difficulty == d for i in indices) for d in ("easy", "medium", "hard")},
        "twins": sum(scenes[i].twin_of is not None for i in indices),
        "files": files,
    }


def generate(
    out_dir: str | Path,
    n: int = 2000,
    seed: int = 0,
    size: int = 64,
    *,
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
    workers: int | None = None,
    audio: bool = False,
    log=print,
) -> dict:
    """Write ShapesWorld into ``out_dir`` and return the summary (also in summary.json).

    Deterministic in ``(n, seed, size, splits)``; ``workers`` (default: all CPUs)
    only changes the speed. Re-running over a previous ShapesWorld folder replaces
    it; any other non-empty folder is refused. ``audio=True`` adds the spoken ShapesWorld
    (:mod:`mmdistill.data.speech`, needs espeak-ng); without espeak-ng everything else is
    written, `log` says why the spoken part was skipped and ``summary["audio"]["skipped"]`` holds the reason.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 24:
        raise ValueError(f"size must be >= 24 pixels, got {size}")
    sizes = _split_sizes(n, splits)
    out = Path(out_dir)
    _prepare_out_dir(out)

    # Scenes are cheap (no pixels): build them all here, render in workers.
    scenes: dict[int, Scene] = {}
    paths: dict[int, str] = {}
    split_indices: dict[str, list[int]] = {}
    start = 0
    for split in SPLITS:
        split_indices[split] = list(range(start, start + sizes[split]))
        if sizes[split]:
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in split_indices[split]:
            scenes[i] = scene_for_index(seed, i, split_start=start)
            paths[i] = f"images/{split}/{i:06d}.png"
        start += sizes[split]

    items = [(paths[i], scenes[i]) for i in range(n)]
    workers = max(1, min(workers or os.cpu_count() or 1, 64))
    chunk = max(16, -(-n // (workers * 8)))
    jobs = [(str(out), size, items[k : k + chunk]) for k in range(0, n, chunk)]

    def write_text_files() -> dict:
        return {s: _write_split(out, s, idx, scenes, paths, seed) for s, idx in split_indices.items() if idx}

    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            _render_chunk(job)
        split_summaries = write_text_files()
    else:
        # fork on Linux (like torch's DataLoader): workers only touch PIL and numpy, and
        # fork works from notebooks and stdin scripts, where spawn cannot re-import __main__.
        method = "fork" if sys.platform == "linux" else "spawn"
        with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
            rendering = pool.map_async(_render_chunk, jobs)
            split_summaries = write_text_files()  # while the workers render
            rendering.get()
    summary = {
        "generator": "ShapesWorld",
        "version": VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        # totals, flat, for one-line reports (`mmdistill data synth` prints these)
        "counts": {k: sum(v[k] for v in split_summaries.values()) for k in ("images", "pairs", "chat", "rerank")},
        "splits": split_summaries,
    }
    if audio:
        summary["audio"] = _write_speech(out, split_indices, scenes, paths, seed, workers, log)
        if "skipped" not in summary["audio"]:
            summary["counts"]["speech"] = summary["audio"]["records"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def _write_speech(out: Path, split_indices: dict[str, list[int]], scenes: dict[int, Scene], paths: dict[int, str], seed: int, workers: int, log) -> dict:
    """The spoken ShapesWorld (speech_{split}.jsonl, omni_{split}.jsonl, audio/); {"skipped": reason} without espeak-ng."""
    from . import speech

    try:
        speech.espeak_path()
    except speech.SpeechUnavailable as e:
        log(f"skipped the spoken ShapesWorld (--audio): {e}; the rest of ShapesWorld was written")
        return {"skipped": str(e)}
    rows: dict[str, list[dict]] = {}
    clips: list = []
    for split, indices in split_indices.items():
        rows[split] = []
        for i in indices:
            r, c = speech.spoken_rows(seed, i, paths[i], split, scenes[i])
            rows[split] += r
            clips += c
    try:
        infos = speech.render_all(out, clips, seed, workers)
    except speech.SpeechUnavailable as e:
        shutil.rmtree(out / "audio", ignore_errors=True)
        log(f"skipped the spoken ShapesWorld (--audio): {e}; the rest of ShapesWorld was written")
        return {"skipped": str(e)}
    files = {}
    for split, split_rows in rows.items():
        if not split_rows:
            continue
        _write_jsonl(out / f"speech_{split}.jsonl", split_rows)
        # omni: each image's chat records, then its two speech records (so any prefix holds every task)
        by_image: dict[str, list[str]] = {}
        for line in (out / f"chat_{split}.jsonl").read_text(encoding="utf-8").splitlines():
            by_image.setdefault(json.loads(line)["id"].split("-")[0], []).append(line)
        for r in split_rows:
            by_image.setdefault(r["id"].split("-")[0], []).append(json.dumps(r, ensure_ascii=False))
        (out / f"omni_{split}.jsonl").write_text("".join(line + "\n" for lines in by_image.values() for line in lines), encoding="utf-8")
        files[split] = {"speech": f"speech_{split}.jsonl", "omni": f"omni_{split}.jsonl", "records": len(split_rows)}
    seconds = [c["seconds"] for c in infos]
    return {
        "clips": len(infos),
        "records": sum(len(r) for r in rows.values()),
        "seconds": {"total": round(sum(seconds), 1), "min": min(seconds), "max": max(seconds)},
        "voices": sorted({c["voice"] for c in infos}),
        "sampling_rate": speech.SAMPLING_RATE,
        "files": files,
    }


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def generate_digits(out: str | Path, n_train: int = 1400, n_val: int = 400, *, leak: int = 0, size: int = 32, seed: int = 0) -> Path:
    """A many-to-one pair set shaped like a scanned-digits folder: each image shows a numeral at a random spot and
    shade, captioned "a handwritten digit <word>" (10 captions over all the pairs; ``meta.label`` the word). Writes
    ``train.jsonl`` and ``val.jsonl`` (the first `leak` val records copied from train, to test leakage warnings)."""
    out = Path(out)
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_val):
        d = i % 10
        img = Image.new("RGB", (size, size), (rng.randint(0, 40),) * 3)
        ImageDraw.Draw(img).text((rng.randint(2, size - 14), rng.randint(2, size - 16)), str(d), fill=(255, 255 - 20 * d, 20 * d))
        img.save(out / "images" / f"{i:05d}.png")
        rows.append({"image": f"images/{i:05d}.png", "text": f"a handwritten digit {DIGIT_WORDS[d]}", "meta": {"label": DIGIT_WORDS[d]}})
    train, val = rows[:n_train], rows[n_train:]
    val = train[:leak] + val[leak:]
    for name, part in (("train.jsonl", train), ("val.jsonl", val)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return out


def generate_text_chat(out: str | Path, n: int = 2000, seed: int = 0, *, splits: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict:
    """ShapesWorld's chat questions as a text-only task, for causal LMs: the scene's caption stands in for the
    image (``"Scene: <caption>.\\nQuestion: <question>"``) and the response is the same short answer the image
    question has (colour, shape, count, size, cell, yes/no, text). The caption question itself is left out (its
    answer would be the prompt). Writes ``chat_{train,val,test}.jsonl`` (chat records without images, up to 3
    questions per scene, as :func:`generate` picks them) and ``summary.json``; deterministic in ``(n, seed, splits)``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    start = 0
    for split, size in _split_sizes(n, splits).items():
        rows = []
        for i in range(start, start + size):
            scene = scene_for_index(seed, i, split_start=start)
            context = caption(scene)
            for row in _chat_rows(seed, i, "", scene):
                if row["skills"] == ["caption"]:
                    continue
                row.pop("image")
                rows.append({**row, "prompt": f"Scene: {context}.\nQuestion: {row['prompt']}"})
        _write_jsonl(out / f"chat_{split}.jsonl", rows)
        counts[split] = len(rows)
        start += size
    summary = {"generator": "ShapesWorld-text", "version": VERSION, "seed": seed, "n": n, "chat": counts}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary
