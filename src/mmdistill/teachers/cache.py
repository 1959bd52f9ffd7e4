"""A recipe's teacher run once over its training records into a store (``mmdistill teacher cache``), and the
store read back as the teacher ``Signals`` of a training batch (``teacher: {kind: store, path: ...}``).

What is stored per record, by family:
- generative: per response token the teacher's top-k ids and log-probs and the tail mass (``top_k``), or an
  unbiased sampled set (``sample`` draws from the teacher's distribution at T = 1: the distinct drawn ids, their
  counts and the teacher's log-probs of them, which make importance weights: training on it is not biased toward
  the head, at any KD temperature in the stored range), the response token ids (to check the student tokenises
  alike), and the features the recipe's loss reads (pooled visual tokens, hidden states of the mapped layers at
  the response tokens). At a KD temperature ≠ 1 a top-k store also keeps its tail tempered, and a sampled store
  the log-partition ``log Σ_v p^β`` of the whole vocabulary, on a grid of β = 1/T over the recipe's range;
- reranker: a score per document and, when the loss reads them, the last-token features;
- contrastive: the image and text embeddings and, when FD/CRD-style terms read them, the pooled features.
Floating signals are kept in ``dtype`` (fp16 by default; ids int32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..config import RECORD_KIND, Recipe, RecipeError
from ..signals import Signals
from .store import RecordKeys, StoreError, StoreWriter, TeacherStore, identity_differences, model_identity

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- what shapes the signals


def _features(recipe: Recipe) -> dict[str, Any]:
    """The teacher features the recipe's loss reads (these, and only these, are stored)."""
    names = set(recipe.loss.terms)
    if recipe.family == "generative":
        layers = sorted({int(pair[1]) for pair in recipe.loss.terms["text"].options.get("layers", [[-2, -2]])}) if "text" in names else []
        return {"vision_pooled": "vision" in names, "text_layers": layers, **({"audio_pooled": True} if "audio" in names else {})}
    if recipe.family == "reranker":
        from ..losses.ranking import RANKING_TERMS

        return {"last_token": any(getattr(RANKING_TERMS.get(n), "needs_features", False) for n in names)}
    from ..losses.composite import CONTRASTIVE_TERMS

    return {"pooled": any(getattr(CONTRASTIVE_TERMS.get(n), "needs_features", False) for n in names)}


TAIL_GRID = 5  # β points the tempered tail (top-k) or log-partition (sampled) is stored at, over the recipe's KD temperature range


def kd_temperatures(recipe: Recipe) -> list[float] | None:
    """[lowest, highest] temperature of the recipe's logit-KD term (its schedule's two ends), or None at T = 1."""
    from ..engine.schedules import make_schedule

    term = recipe.loss.terms.get("kd")
    if term is None:
        return None
    sch = make_schedule(term.options.get("temperature", 1.0))
    lo, hi = sorted((float(sch.start), float(sch.end)))
    return None if lo == hi == 1.0 else [lo, hi]


def tail_betas(temperatures: list[float]) -> list[float]:
    """The β = 1/T grid (increasing) the tempered tail / log-partition is stored at, for a [lowest, highest] temperature range."""
    lo, hi = 1.0 / temperatures[1], 1.0 / temperatures[0]
    return [lo] if lo == hi else torch.linspace(lo, hi, TAIL_GRID).tolist()


def settings_of(recipe: Recipe, *, top_k: int, sample: int | None, dtype: str) -> dict[str, Any]:
    """The recipe fields (and cache options) that shape the stored signals: a store made under other settings is refused."""
    out: dict[str, Any] = {"features": _features(recipe), "dtype": dtype, "max_length": recipe.data.max_length}
    if recipe.family == "generative":
        # "sample_weights": the sampled rows hold counts and the teacher's log-probs (importance weights); stores
        # written before that held the draws' log-frequencies only and are refused (``StoreTeacher``)
        out.update(response_field=recipe.data.response_field, **({"sample": sample, "sample_weights": "importance"} if sample else {"top_k": top_k}))
        temps = kd_temperatures(recipe)
        if temps:  # top-k: the tempered tail; sampled: log Z_β (same key: the temperature range the β grid covers)
            out["tail_temperatures"] = temps
    return out


def _records(recipe: Recipe):
    from ..data.records import read_records

    records, errors = read_records(recipe.data.train, RECORD_KIND[recipe.family], on_error=recipe.data.on_error)
    if recipe.data.max_records:
        records = records[: recipe.data.max_records]
    return records, errors


# ----------------------------------------------------------------------------- computing signals, per family


def _generative_fn(recipe: Recipe, teacher_path: str, device, *, top_k: int, sample: int | None, dtype: torch.dtype, seed: int, tail_temperatures: list[float] | None = None):
    from ..losses.divergence import log_partition_grid, tail_logmass_from_topk, tempered_tail_grid
    from ..models import generative as gm
    from ..recipes.generative import signals_with_features

    teacher, proc = gm.load_vlm(teacher_path, trust_remote_code=recipe.teacher.trust_remote_code)
    teacher.eval().to(device)
    feats = _features(recipe)
    gen = torch.Generator().manual_seed(seed)
    from ..recipes.generative import dims

    constants = {"vocab": int(teacher.lm_head.out_features), "dims": dims(teacher)}
    betas = tail_betas(tail_temperatures) if tail_temperatures else None  # settings_of: stores of a tempered KD term
    if betas:
        constants["tail_betas"] = betas

    @torch.no_grad()
    def fn(recs) -> list[dict[str, Tensor]]:
        imgs = [r.load_images() for r in recs]
        batch = gm.encode_chat(proc, recs, imgs, response_field=recipe.data.response_field, max_length=recipe.data.max_length, path=str(recipe.data.train))
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        sig = signals_with_features(teacher, batch, feats)
        lp = torch.log_softmax(sig.logits.float(), dim=-1).cpu()  # [B, R, V]
        if sample:
            ids, counts = _sampled(lp, sample, gen)  # [B, R, w]
            lps = lp.gather(-1, ids)  # the teacher's own log-probs of the drawn ids (importance weights)
            tail = None  # no tail: the draws stand for the whole distribution
        elif top_k >= lp.shape[-1]:  # every id kept: no tail (its float remainder would be noise, not mass)
            lps, ids = lp.topk(lp.shape[-1], dim=-1)
            tail = torch.full(ids.shape[:-1], float("-inf"))
        else:
            lps, ids = lp.topk(top_k, dim=-1)  # [B, R, k]
            tail = tail_logmass_from_topk(lps)  # [B, R]
        grid = (log_partition_grid(lp, betas) if sample else tempered_tail_grid(lp, ids, betas)) if betas else None  # [B, R, G]
        rows = []
        for i in range(len(recs)):
            m = sig.mask[i].bool().cpu()
            row = {"topk_ids": ids[i][m].int(), "topk_logprobs": lps[i][m].to(dtype), "response_ids": batch["response_ids"][i].cpu()[m].int()}
            if sample:
                row["sample_counts"] = counts[i][m]
            else:
                row["tail_logmass"] = tail[i][m].float()
            if grid is not None:
                row["logz_grid" if sample else "tail_grid"] = grid[i][m].float()
            for name, value in sig.features.items():
                row[f"features.{name}"] = (value[i] if name in ("vision_pooled", "audio_pooled") else value[i][m.to(value.device)]).to(dtype).cpu()
            rows.append(row)
        return rows

    return fn, constants, 8


def _sampled(lp: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """`n` draws per position from exp(lp) [*, V]; the distinct drawn ids with their counts, padded to w = min(n, V)
    ids with distinct undrawn ids at count 0. -> ids [*, w] (long), counts [*, w] (uint8 when n < 256, else int32;
    each row sums to n)"""
    vocab = lp.shape[-1]
    width = min(n, vocab)
    flat = lp.reshape(-1, vocab)
    draws = torch.multinomial(flat.exp(), n, replacement=True, generator=gen)  # [P, n]
    counts = torch.zeros(flat.shape[0], vocab, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))  # [P, V]
    top, ids = counts.topk(width, dim=-1)  # every drawn id (at most n of them) first, then undrawn ones (count 0)
    top = top.to(torch.uint8 if n < 256 else torch.int32)
    return ids.view(*lp.shape[:-1], width), top.view(*lp.shape[:-1], width)


def _reranker_fn(recipe: Recipe, teacher_path: str, device, *, dtype: torch.dtype, **_):
    from ..data.loaders import ImageCache
    from ..models import reranker as rm

    teacher = rm.load_reranker(teacher_path, trust_remote_code=recipe.teacher.trust_remote_code, max_length=recipe.data.max_length)
    teacher.model.eval().to(device)
    teacher.images = ImageCache(max_items=4096)
    features = _features(recipe)["last_token"]
    constants = {"dims": {"hidden": teacher.hidden_size()}}

    @torch.no_grad()
    def fn(recs) -> list[dict[str, Tensor]]:
        sig = teacher.signals(recs, features=features, path=str(recipe.data.train))
        rows = []
        for i, r in enumerate(recs):
            k = len(r.documents)
            row = {"scores": sig.scores[i, :k].float().cpu()}
            if features:
                row["features.last_token"] = sig.features["last_token"][i, :k].to(dtype).cpu()
            rows.append(row)
        return rows

    return fn, constants, 16


def _contrastive_fn(recipe: Recipe, teacher_path: str, device, *, dtype: torch.dtype, **_):
    from ..models import contrastive as cm

    teacher, proc = cm.load_model(teacher_path, trust_remote_code=recipe.teacher.trust_remote_code)
    teacher.eval().to(device)
    pooled = _features(recipe)["pooled"]
    constants = {"logit_scale": float(cm.logit_scale(teacher)), "dims": {"embed": cm.embed_dim(teacher)}}

    @torch.no_grad()
    def fn(recs) -> list[dict[str, Tensor]]:
        enc = cm.preprocess_pairs(proc, [r.load_image() for r in recs], [r.text for r in recs])
        batch = {k: v.to(device) for k, v in enc.batch(list(range(len(recs)))).items()}
        sig = cm.encode(teacher, batch, features=pooled)
        rows = []
        for i in range(len(recs)):
            row = {"image_embeds": sig.image_embeds[i].to(dtype).cpu(), "text_embeds": sig.text_embeds[i].to(dtype).cpu()}
            for name, value in sig.features.items():
                row[f"features.{name}"] = value[i].to(dtype).cpu()
            rows.append(row)
        return rows

    return fn, constants, 64


FAMILY_FNS: dict[str, Callable] = {"generative": _generative_fn, "reranker": _reranker_fn, "contrastive": _contrastive_fn}


def signal_fn(recipe: Recipe, teacher_path: str, device, settings: dict[str, Any]):
    """The family's per-batch signal function for the store `settings` (``settings_of``): (fn, constants, batch size)."""
    return FAMILY_FNS[recipe.family](recipe, teacher_path, device, top_k=settings.get("top_k", 0), sample=settings.get("sample"),
                                     dtype=DTYPES[settings["dtype"]], seed=recipe.seed, tail_temperatures=settings.get("tail_temperatures"))


def compute_rows(recipe: Recipe, teacher_path: str, records: Sequence, device="cpu", *, settings: dict[str, Any]) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """The live teacher's per-record signals for `records` (what a store would hold), and the store constants."""
    fn, constants, batch = signal_fn(recipe, teacher_path, device, settings)
    rows: list[dict[str, Tensor]] = []
    for i in range(0, len(records), batch):
        rows += fn(list(records[i : i + batch]))
    return rows, constants


# ----------------------------------------------------------------------------- `mmdistill teacher cache`


class CacheProgress:
    """Records/s (and response tokens/s for a generative teacher) with an ETA: a rich progress bar on a terminal,
    a plain log line every ~10 s (and at the end) otherwise."""

    def __init__(self, total: int, log: Callable, *, show: bool = True, every_s: float = 10.0):
        import sys
        import time

        self.total, self.log, self.show, self.every_s = total, log, show, every_s
        self.done = self.tokens = 0
        self.t0 = self.last = time.perf_counter()
        self._clock = time.perf_counter
        self.bar = None
        if show and sys.stdout.isatty() and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]teacher cache"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("cache", total=total, info="")
            self.bar.start()

    def line(self) -> str:
        dt = max(self._clock() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        tok = f", {self.tokens / dt:.0f} tokens/s" if self.tokens else ""
        return f"{self.done}/{self.total} records, {rate:.1f} records/s{tok}, ETA {eta:.0f} s"

    def advance(self, records: int, tokens: int = 0) -> None:
        self.done += records
        self.tokens += tokens
        if not self.show:
            return
        if self.bar is not None:
            dt = max(self._clock() - self.t0, 1e-9)
            self.bar.update(self.task, advance=records, info=f"{self.done / dt:.1f} rec/s" + (f" {self.tokens / dt:.0f} tok/s" if self.tokens else ""))
        elif self._clock() - self.last >= self.every_s or self.done >= self.total:
            self.last = self._clock()
            self.log(f"teacher cache: {self.line()}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None



def cache_teacher(recipe: Recipe, out: str | Path, *, top_k: int = 16, sample: int | None = None, dtype: str = "fp16", shard_records: int = 256, log: Callable = print) -> dict[str, Any]:
    """Run the recipe's teacher over its training records once and write their signals to the store `out`.
    Resumable: a rerun skips every record already stored. Several processes (accelerate / torchrun) split the
    records by rank and write their own shards. Returns a summary."""
    from accelerate import PartialState

    if recipe.teacher is None or not recipe.teacher.model:
        raise RecipeError("teacher cache runs the recipe's live teacher: the recipe needs `teacher: {model: ...}`")
    if dtype not in DTYPES:
        raise RecipeError(f"dtype {dtype!r}: choose fp16 or fp32")
    if sample is not None and sample < 1 or top_k < 1:
        raise RecipeError("--top-k and --sample must be positive")
    from ..engine.zero import take_launch_env

    take_launch_env()  # launched with a DeepSpeed / FSDP config: caching splits the records as under DDP
    state = PartialState(cpu=not torch.cuda.is_available())
    records, errors = _records(recipe)
    settings = settings_of(recipe, top_k=top_k, sample=sample, dtype=dtype)
    fn, constants, batch = signal_fn(recipe, recipe.teacher.model, state.device, settings)
    header = {"family": recipe.family, "teacher": model_identity(recipe.teacher.model), "settings": settings, "constants": constants, "data": str(recipe.data.train)}
    if state.is_main_process:
        writer = StoreWriter(out, header, shard_records=shard_records, rank=0)
    state.wait_for_everyone()
    if not state.is_main_process:
        writer = StoreWriter(out, header, shard_records=shard_records, rank=state.process_index)
    keys = RecordKeys()
    todo, seen = [], set()
    for r in records:
        k = keys.key(r)
        if k not in writer.done and k not in seen:
            seen.add(k)
            todo.append((k, r))
    mine = todo[state.process_index :: state.num_processes]
    log(f"teacher cache: {len(records)} records, {len(records) - len(todo)} already stored, {len(mine)} to compute here" + (f" ({len(errors)} bad records skipped)" if errors else ""))
    bar = CacheProgress(len(mine), log, show=state.is_main_process)
    try:
        for i in range(0, len(mine), batch):
            part = mine[i : i + batch]
            rows = fn([r for _, r in part])
            for (k, _), row in zip(part, rows):
                writer.add(k, row)
            bar.advance(len(part), sum(int(r["topk_ids"].shape[0]) for r in rows if "topk_ids" in r))
    finally:
        bar.close()
    writer.close()
    state.wait_for_everyone()
    return {"records": len(records), "computed": len(mine), "stored": len(TeacherStore(out)), "skipped_records": len(errors)}


# ----------------------------------------------------------------------------- reading a store for training


class StoreTeacher:
    """The teacher of a recipe with ``teacher: {kind: store}``: per-batch teacher Signals from the store, checked
    against the recipe; records the store lacks fail with their line, or (``on_missing: live``) are computed once by
    the live teacher at start-up and kept in memory."""

    def __init__(self, recipe: Recipe, records: Sequence, log: Callable = print):
        cfg = recipe.teacher
        self.store = TeacherStore(cfg.path)
        self.recipe = recipe
        m = self.store.manifest
        where = f"{cfg.path}"
        if m["family"] != recipe.family:
            raise StoreError(f"{where}: holds {m['family']} signals; this recipe is {recipe.family}")
        if cfg.model:
            diffs = identity_differences(m["teacher"], model_identity(cfg.model))
            if diffs:
                raise StoreError(f"{where}: made by another teacher than teacher.model: {'; '.join(diffs)}")
        want = settings_of(recipe, top_k=0, sample=None, dtype=m["settings"]["dtype"])
        have = m["settings"]
        problems = [f"{k} (store {have.get(k)!r}, recipe {want[k]!r})" for k in ("max_length", "response_field") if k in want and have.get(k) != want[k]]
        if "sample" in have:
            if have.get("sample_weights") != "importance":
                raise StoreError(f"{where}: a sampled store from an older mmdistill: its rows lack sample_counts (the draws' counts beside the "
                                 "teacher's log-probs, which make the importance weights); cache it again with `mmdistill teacher cache --sample N`")
            kd = recipe.loss.terms.get("kd")
            divergence = kd.options.get("divergence", "forward_kl") if kd is not None else "forward_kl"
            if divergence != "forward_kl":
                raise StoreError(f"{where}: a sampled store gives an unbiased loss only for forward_kl; the kd term's divergence is "
                                 f"{divergence} (use a top-k store: `mmdistill teacher cache --top-k K`)")
        need_t = want.get("tail_temperatures")  # the recipe's KD temperature range (generative, T != 1)
        if need_t and ("top_k" in have or "sample" in have):
            got = have.get("tail_temperatures")
            if not got or need_t[0] < got[0] - 1e-6 or need_t[1] > got[1] + 1e-6:
                what = "log-partition" if "sample" in have else "tail"
                problems.append(f"tail_temperatures (the KD temperature runs over {need_t}; the store tempers its {what} for {got})")
        for name, needed in want["features"].items():
            stored = have["features"].get(name)
            if needed and (not stored or (isinstance(needed, list) and not set(needed) <= set(stored))):
                problems.append(f"features.{name} (the loss reads {needed!r}, the store holds {stored!r})")
        if problems:
            raise StoreError(f"{where}: made under other settings: {'; '.join(problems)}; cache again with this recipe")
        self.constants = m.get("constants", {})
        feats = want["features"]  # the feature signals this recipe's loss reads, by their stored names
        self.features = [k for k, v in feats.items() if k != "text_layers" and v is True] + [f"text@{layer}" for layer in feats.get("text_layers", [])]
        keys = RecordKeys()
        self.keys = [keys.key(r) for r in records]
        self.extra: dict[str, dict[str, Tensor]] = {}
        missing = [(i, k) for i, k in enumerate(self.keys) if k not in self.store]
        if missing:
            i, k = missing[0]
            if cfg.on_missing != "live":
                raise StoreError(f"{recipe.data.train}:{records[i].line}: not in the store {where} ({len(missing)} of {len(records)} records missing; "
                                 "run `mmdistill teacher cache` again, or set teacher.on_missing: live)")
            model = cfg.model or m["teacher"]["model"]
            log(f"teacher: {len(missing)} of {len(records)} records are not in {where}; computing them with the live teacher {model}")
            rows, _ = compute_rows(recipe, model, [records[i] for i, _ in missing], settings=have)
            self.extra = {k: row for (_, k), row in zip(missing, rows)}

    @property
    def model(self) -> str:
        """The teacher's id or folder (agreement metrics, processors)."""
        return self.recipe.teacher.model or self.store.manifest["teacher"]["model"]

    def row(self, index: int) -> dict[str, Tensor]:
        key = self.keys[index]
        return self.extra[key] if key in self.extra else self.store.get(key)

    def contrastive(self, indices: list[int]) -> Signals:
        rows = [self.row(i) for i in indices]
        feats = {name[len("features."):]: torch.stack([r[name] for r in rows]).float() for name in rows[0] if name.startswith("features.")}
        return Signals(
            image_embeds=torch.stack([r["image_embeds"] for r in rows]).float(),
            text_embeds=torch.stack([r["text_embeds"] for r in rows]).float(),
            logit_scale=torch.tensor(self.constants["logit_scale"]),
            features=feats,
        )

    def reranker(self, indices: list[int], docs: list[list[int]], k_max: int) -> Signals:
        """Scores [B, k_max] (and last-token features [B, k_max, D]) of each query's chosen documents."""
        rows = [self.row(i) for i in indices]
        scores = torch.zeros(len(rows), k_max)
        mask = torch.zeros(len(rows), k_max, dtype=torch.bool)
        feats = None
        for b, (row, d) in enumerate(zip(rows, docs)):
            idx = torch.tensor(d, dtype=torch.long)
            scores[b, : len(d)] = row["scores"][idx].float()
            mask[b, : len(d)] = True
            if "features.last_token" in row:
                h = row["features.last_token"][idx].float()
                if feats is None:
                    feats = torch.zeros(len(rows), k_max, h.shape[-1])
                feats[b, : len(d)] = h
        sig = Signals(scores=scores, mask=mask)
        if feats is not None:
            sig.features["last_token"] = feats
        return sig

    def generative(self, indices: list[int], batch: dict[str, Tensor], path: str, lines: list[int]) -> Signals:
        """Sparse teacher Signals aligned with the student's batch: topk_ids / topk_logprobs [B, R, k], and tail_logmass
        [B, R] (top-k store) or sample_logweights [B, R, k] (sampled store: log of each drawn id's share of the draws),
        their β grids, features; the stored response tokens must be the student's (same tokenizer)."""
        from ..data.records import RecordError

        response_ids, rmask = batch["response_ids"].cpu(), batch["response_mask"].cpu().bool()
        rows = [self.row(i) for i in indices]
        B, R = rmask.shape
        k = rows[0]["topk_ids"].shape[-1]
        ids = torch.arange(k, dtype=torch.long).expand(B, R, k).clone()  # distinct ids at the uncounted positions
        lps = torch.full((B, R, k), -float(torch.log(torch.tensor(float(k)))))
        sampled = "sample_counts" in rows[0]
        tail = None if sampled else torch.full((B, R), float("-inf"))
        logw = torch.full((B, R, k), float("-inf")) if sampled else None  # weight 0 at the uncounted positions
        betas = self.constants.get("tail_betas")
        grid = torch.full((B, R, len(betas)), float("-inf")) if betas else None
        grid_name = "logz_grid" if sampled else "tail_grid"
        feats: dict[str, Tensor] = {}
        for b, row in enumerate(rows):
            m = rmask[b]
            if not torch.equal(row["response_ids"].long(), response_ids[b][m].long()):
                raise RecordError(path, lines[b], self.recipe.data.response_field, "the store's teacher and the student tokenise the response differently; logit KD needs the same tokenizer")
            ids[b][m] = row["topk_ids"].long()
            lps[b][m] = row["topk_logprobs"].float()
            if sampled:
                counts = row["sample_counts"].float()
                logw[b][m] = (counts / counts.sum(-1, keepdim=True)).log()  # each row's counts sum to the number of draws
            else:
                tail[b][m] = row["tail_logmass"].float()
            if grid is not None:
                grid[b][m] = row[grid_name].float()
            for key in self.features:  # only what the loss reads; pooled [D] or per response token [R_b, D]
                value = row[f"features.{key}"]
                if key not in feats:
                    feats[key] = torch.zeros(B, value.shape[-1]) if value.dim() == 1 else torch.zeros(B, R, value.shape[-1])
                if value.dim() == 1:
                    feats[key][b] = value.float()
                else:
                    feats[key][b][m] = value.float()
        return Signals(topk_ids=ids, topk_logprobs=lps, tail_logmass=tail, mask=rmask, features=feats, sample_logweights=logw,
                       tail_grid=None if sampled else grid, logz_grid=grid if sampled else None, tail_betas=torch.tensor(betas) if betas else None)
