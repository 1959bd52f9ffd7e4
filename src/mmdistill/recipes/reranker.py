"""The reranker recipe: plain training (teachers, baselines) and distillation of cross-encoder rerankers.

Reads top to bottom: load rerank records (every image decoded once, bad records fail or are
skipped) -> build teacher and student rerankers -> the step module (student scores and last-token
features for B queries x K documents, the frozen teacher's from a cache or live, the composite
ranking loss) -> the engine loop -> save the student as a plain Hugging Face folder -> evaluate.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import Recipe, RecipeError
from ..data.loaders import load_rerank
from ..data.records import RerankRecord
from ..engine.loop import seed_everything, train_loop
from ..models import reranker as rm
from ..signals import Signals
from .common import build_recipe, check_run_dir, evaluate_with, freeze, gradient_checkpointing, make_accelerator, save_loss_modules, train_summary, write_run_dir

TEACHER_TERMS = ("pointwise", "margin_mse", "listwise_kl", "feature")


def sample_group(record: RerankRecord, size: int | None, rng: random.Random, sampling: str = "uniform") -> list[int]:
    """Indices of the documents a training step uses: all of them, or `size` of them — the best-labelled
    one (the first on a tie; any one when unlabelled) and a draw of the others, in their original order.

    sampling="uniform" draws the others alike; "graded" draws them without replacement with weight 1 + label
    (Efraimidis–Spirakis keys u^(1/w)), so hard negatives join the best document more often."""
    n = len(record.documents)
    if size is None or n <= size:
        return list(range(n))
    if record.labels is not None:
        keep = max(range(n), key=lambda i: (record.labels[i], -i))
    else:
        keep = rng.randrange(n)
    others = [i for i in range(n) if i != keep]
    if sampling == "graded" and record.labels is not None:
        keys = {i: rng.random() ** (1.0 / (1.0 + max(record.labels[i], 0))) for i in others}
        rest = sorted(others, key=lambda i: keys[i], reverse=True)[: size - 1]
    elif sampling in ("uniform", "graded"):
        rest = rng.sample(others, size - 1)
    else:
        raise ValueError(f"group sampling must be 'uniform' or 'graded', got {sampling!r}")
    return sorted([keep, *rest])


def subset(record: RerankRecord, docs: list[int]) -> RerankRecord:
    """The record with only `docs` (and their labels); keeps its line and folder for errors and images."""
    if len(docs) == len(record.documents):
        return record
    labels = None if record.labels is None else [record.labels[i] for i in docs]
    return record.model_copy(update={"documents": [record.documents[i] for i in docs], "labels": labels})


def labels_tensor(records: Sequence[RerankRecord], k_max: int) -> torch.Tensor | None:
    """Graded labels [B, K] (0 where padded), or None when any record has none."""
    if any(r.labels is None for r in records):
        return None
    out = torch.zeros(len(records), k_max)
    for b, r in enumerate(records):
        out[b, : len(r.labels)] = torch.tensor(r.labels, dtype=torch.float32)
    return out


class RerankStep(nn.Module):
    """forward(indices, progress) -> {"loss", parts...} for a reranker student.

    The student's model is a submodule (trained, wrapped by DDP); the teacher is held outside
    the module tree (never trained, saved or wrapped). Teacher signals come from a cache
    computed once before training (no augmentation, so it is the same) or live each step.
    """

    def __init__(
        self,
        student: rm.Reranker,
        loss,
        records,
        path: str,
        teacher: rm.Reranker | None = None,
        t_cache: Signals | None = None,
        store=None,
        features: bool = False,
        group_size: int | None = None,
        group_sampling: str = "uniform",
        seed: int = 0,
    ):
        super().__init__()
        self.group_size = group_size
        self.group_sampling = group_sampling
        self.seed = seed
        self.model = student.model
        self.loss = loss
        self.records = records
        self.path = path
        self.features = features
        self.t_cache = t_cache
        object.__setattr__(self, "_store", store)  # a teachers.cache.StoreTeacher
        object.__setattr__(self, "_student", student)
        object.__setattr__(self, "_teacher", teacher)

    def groups(self, indices: list[int], progress: float) -> list[list[int]]:
        """The documents of each query this step (a fresh draw per step when group_size is set; seeded, so a resumed run draws the same)."""
        rng = random.Random(f"{self.seed}:{progress!r}:{indices}")
        return [sample_group(self.records[i], self.group_size, rng, self.group_sampling) for i in indices]

    def prepare(self, indices: list[int], progress: float) -> dict[str, Any]:
        """The CPU side of a micro-batch (engine/prefetch.py): this step's documents per query, the student's pairs
        tokenised (with their images), and the teacher's pairs, cached rows or stored signals."""
        docs = self.groups(indices, progress)
        recs = [subset(self.records[i], d) for i, d in zip(indices, docs)]
        batch, mask = self._student.encode(recs, self.path)
        k_max = mask.shape[1]
        out: dict[str, Any] = {"batch": batch, "mask": mask, "labels": labels_tensor(recs, k_max)}
        if self._store is not None:
            out["t_sig"] = self._store.reranker(indices, docs, k_max)
        elif self.t_cache is not None:
            idx = torch.zeros(len(indices), k_max, dtype=torch.long)
            valid = torch.zeros(len(indices), k_max, dtype=torch.bool)
            for b, d in enumerate(docs):
                idx[b, : len(d)] = torch.tensor(d)
                valid[b, : len(d)] = True
            rows = torch.tensor(indices)[:, None]
            sig = Signals(scores=self.t_cache.scores[rows, idx], mask=self.t_cache.mask[rows, idx] & valid)
            if "last_token" in self.t_cache.features:
                sig.features["last_token"] = self.t_cache.features["last_token"][rows, idx]
            out["t_sig"] = sig
        elif self._teacher is not None:
            out["t_pairs"] = self._teacher.encode(recs, self.path)
        return out

    def forward(self, prepared: dict[str, Any] | list[int], progress: float) -> dict[str, torch.Tensor]:
        if isinstance(prepared, list):  # indices: prepared here (no prefetching)
            prepared = self.prepare(prepared, progress)
        s = self._student.signals_of(prepared["batch"], prepared["mask"], features=self.features)
        device = s.scores.device
        t = None
        if "t_sig" in prepared:
            t = prepared["t_sig"].to(device)
        elif "t_pairs" in prepared:
            with torch.no_grad():
                t = self._teacher.signals_of(*prepared["t_pairs"], features=self.features).detach()
        batch: dict[str, Any] = {"mask": s.mask}
        if prepared["labels"] is not None:
            batch["labels"] = prepared["labels"].to(device)
        return self.loss(s, t, batch, progress)


@torch.no_grad()
def precompute_teacher(teacher: rm.Reranker, records, features: bool, path: str, queries_per_batch: int = 16, log=print) -> Signals:
    """Teacher scores [N, K] (and last-token features [N, K, D]) for every record, once, on the CPU."""
    k_max = max(len(r.documents) for r in records)
    scores = torch.zeros(len(records), k_max)
    mask = torch.zeros(len(records), k_max, dtype=torch.bool)
    feats = None
    for i in range(0, len(records), queries_per_batch):
        group = records[i : i + queries_per_batch]
        sig = teacher.signals(group, features=features, path=path)
        k = sig.scores.shape[1]
        scores[i : i + len(group), :k] = sig.scores.float().cpu()
        mask[i : i + len(group), :k] = sig.mask.cpu()
        if features:
            h = sig.features["last_token"].float().cpu()
            if feats is None:
                feats = torch.zeros(len(records), k_max, h.shape[-1])
            feats[i : i + len(group), :k] = h
    out = Signals(scores=scores, mask=mask)
    if feats is not None:
        out.features["last_token"] = feats
    return out


def build_student(recipe: Recipe, teacher: rm.Reranker | None, texts: list[str], records: Sequence[RerankRecord] = ()) -> rm.Reranker:
    s = recipe.student
    if s.init == "tiny":
        tok = teacher.tokenizer if teacher is not None and teacher.chat_format and teacher.has_vision == (s.head == "yesno") else None
        rr = rm.build_tiny_reranker(None, texts, kind=s.head, preset=s.preset or "vlm-student", seed=recipe.seed, tokenizer=tok, image_size=s.image_size or 64)
        if s.overrides:
            from ..models.contrastive import apply_overrides

            rr = _from_config(apply_overrides(rr.model.config, s.overrides), rr, recipe.seed)
        return rr
    if s.init == "pretrained":
        return rm.load_reranker(s.model, max_length=recipe.data.max_length)
    base = rm.load_reranker(s.model, max_length=recipe.data.max_length) if s.model else teacher
    if s.init == "scratch":
        from ..models.contrastive import apply_overrides

        return _from_config(apply_overrides(base.model.config, s.overrides), base, recipe.seed)
    # inherit: prune the teacher's widths (compress.prune), then keep its chosen layers (the generative adapter's surgery)
    from ..compress.prune import collect_importance, prune_widths, split_widths
    from ..models.generative import inherit_student

    model = base.model
    widths, rest = split_widths(s.overrides)
    if widths:
        if not records:
            raise RecipeError(f"{recipe.output_dir}: pruning the teacher's widths needs training queries to calibrate on")
        probe = rm.Reranker(model, base.processor, kind=base.kind, name="calibration", max_length=recipe.data.max_length)
        probe.images = base.images
        sample = list(records[: s.calibration])

        def calibrate(m) -> None:
            probe.model = m
            for i in range(0, len(sample), 8):
                probe.signals(sample[i : i + 8])

        model = prune_widths(model, widths, collect_importance(model, calibrate))
    if s.layers or rest:
        model = inherit_student(model, s.layers, rest or None)
    return rm.Reranker(model, base.processor, kind=base.kind, name="student", max_length=recipe.data.max_length)


def _from_config(config, like: rm.Reranker, seed: int) -> rm.Reranker:
    """A randomly initialised model of `like`'s class from `config` (scratch students)."""
    torch.manual_seed(seed)
    model = type(like.model)(config)
    return rm.Reranker(model, like.processor, kind=like.kind, name="student", max_length=like.max_length)


def evaluate_run(recipe: Recipe, out_path: Path | None = None) -> dict[str, Any]:
    """Evaluate the run's saved model on `data.val` with the recipe's eval settings; writes `out_path` (default:
    the run's eval.json). Also what a benchmark calls to re-evaluate a finished run with other eval settings."""
    from ..evaluate.reranker import evaluate_folder

    return evaluate_with(evaluate_folder, recipe, out_path, ks=recipe.eval.ks, candidates=recipe.eval.candidates, max_length=recipe.data.max_length)


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, log=print, evaluate_after: bool = True) -> dict[str, Any]:
    from ..losses.ranking import build_ranking_loss

    out = Path(recipe.output_dir)
    accelerator = make_accelerator(recipe.train.precision)
    fp = recipe.fingerprint()
    clear = check_run_dir(out, fp, resume=resume, overwrite=overwrite)
    seed_everything(recipe.seed)

    cache = rm.ImageCache(max_items=4096, source=str(recipe.data.train)) if recipe.data.stream else rm.ImageCache()
    records, errors = load_rerank(recipe.data.train, recipe.data.on_error, recipe.data.max_records, cache, log=log, decode=not recipe.data.stream)
    path = str(recipe.data.train)
    log(f"train: {len(records)} queries from {path}" + (f" ({len(errors)} skipped)" if errors else ""))

    terms = {name: {"weight": t.weight, **({"schedule": t.schedule} if t.schedule else {}), **t.options} for name, t in recipe.loss.terms.items()}
    if recipe.teacher is None and set(terms) & set(TEACHER_TERMS):
        raise RecipeError(f"loss terms {sorted(set(terms) & set(TEACHER_TERMS))} need a teacher; add `teacher:` to the recipe")
    teacher = store = None
    if recipe.teacher is not None and recipe.teacher.kind == "store":
        from ..teachers.cache import StoreTeacher

        store = StoreTeacher(recipe, records, log=log)  # scores (and features) from the store; no teacher weights
    elif recipe.teacher is not None:
        teacher = rm.load_reranker(recipe.teacher.model, trust_remote_code=recipe.teacher.trust_remote_code, max_length=recipe.data.max_length)
        freeze(teacher.model)
        teacher.model.to(accelerator.device)
        teacher.images = cache
    try:
        texts = rm.record_texts(records)  # a tiny student's tokenizer is trained on them (plus the prompt frame)
        student = build_student(build_recipe(recipe, store), teacher, texts, records)
        if recipe.student.fake_quant:  # quantization-aware distillation (compress/qat.py)
            from ..compress.qat import prepare

            log(f"student: {prepare(student.model, recipe.student.fake_quant)} Linear layers fake-quantized as {recipe.student.fake_quant}")
        student.max_length = recipe.data.max_length
        student.images = cache
        t_hidden = teacher.hidden_size() if teacher is not None else (store.constants["dims"]["hidden"] if store is not None else None)
        loss = build_ranking_loss(terms, student.hidden_size(), t_hidden)
    except (rm.RerankerError, FileNotFoundError):
        raise
    except ValueError as e:
        raise RecipeError(f"{recipe.output_dir}: {e}") from None
    gradient_checkpointing(student.model, recipe)
    student.model.train()
    features = any(getattr(t, "needs_features", False) for t in loss.term_modules.values())  # RankFeatureTerm sets it

    t_cache = None
    if teacher is not None and recipe.teacher.cache:
        log(f"teacher: scoring {len(records)} training queries once (cache)")
        t_cache = precompute_teacher(teacher, records, features, path)
        teacher = None
    step = RerankStep(student, loss, records, path, teacher=teacher, t_cache=t_cache, store=store, features=features, group_size=recipe.data.group_size, group_sampling=recipe.data.group_sampling, seed=recipe.seed)

    if accelerator.is_main_process:
        write_run_dir(out, fp, recipe.model_dump(mode="json"), clear)
    accelerator.wait_for_everyone()

    def save_final(unwrapped: RerankStep) -> None:
        student.model = unwrapped.model
        if recipe.student.fake_quant:  # save plain Linear layers with the trained full-precision weights
            from ..compress.qat import strip

            strip(student.model)
        student.save(out / "model")
        save_loss_modules(unwrapped.loss, out)

    result = train_loop(step, n_items=len(records), cfg=recipe.train, out_dir=out, seed=recipe.seed, fingerprint=fp, resume=resume, accelerator=accelerator, on_end=save_final)
    summary: dict[str, Any] = train_summary(result, errors, out, write=accelerator.is_main_process)
    if accelerator.is_main_process:
        if evaluate_after and recipe.data.val is not None:
            summary["eval"] = evaluate_run(recipe)
    return summary
