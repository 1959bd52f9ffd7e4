"""Rerankers (cross-encoders): generative yes/no rerankers and sequence-classification heads.

Two kinds, one interface (``Reranker``):

- **yes/no** (Qwen3-Reranker, Qwen3-VL-Reranker, any causal LM / image-text-to-text model read as
  a binary judge). The pair is written in their prompt format: a system prompt, the user turn
  ``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}``, then the assistant prefix
  (with an empty think block for the text model, plain for the VL model). Left padding; the
  score is ``logit("yes") − logit("no")`` at the last position, so ``P(yes) = sigmoid(score)``
  (the 2-way softmax of the two logits). Images go where they appear (query and/or document).
- **seq_cls** (``AutoModelForSequenceClassification``): score = the single logit (or logit[1] −
  logit[0] for two labels). Text only.

``Reranker.signals(pairs grouped by query)`` returns ``Signals(scores [B, K], mask [B, K],
features={"last_token": [B, K, D]})`` — the currency the ranking losses read.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..data.loaders import ImageCache  # noqa: F401  (rm.ImageCache: where the recipes found it before)
from ..data.records import RecordError, RerankItem, RerankRecord
from ..signals import Signals

SYSTEM_PROMPT = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
TEXT_ASSISTANT_PREFIX = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3-Reranker (text)
VL_ASSISTANT_PREFIX = "<|im_start|>assistant\n"  # Qwen3-VL-Reranker


# decoder-only text architectures whose base model takes a KV cache and whose heads read the final hidden state as
# is (no logit soft-capping or scaling): a batch's shared prompt prefix can be run once for them (Reranker.share_prefix)
PREFIX_SHARING_MODELS = frozenset({"qwen2", "qwen3", "qwen3_moe", "llama"})
MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix is not worth the cache copy: the plain batched forward runs


class RerankerError(ValueError):
    """A reranker that cannot be used as asked (one line, naming the model and what is wrong)."""


def single_token_id(tokenizer, word: str, where: str) -> int:
    """The id of `word` as ONE token, or a clear error (a yes/no reranker reads exactly these logits)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise RerankerError(f"{where}: tokenizer: {word!r} is not a single token (it splits into {pieces}); a yes/no reranker needs one token each for 'yes' and 'no'")
    return ids[0]


@dataclass
class Pair:
    instruction: str
    query: RerankItem
    document: RerankItem


class Reranker:
    """A loaded reranker (model + processor/tokenizer) that scores (instruction, query, document) pairs."""

    def __init__(self, model, processor, *, kind: str, name: str = "<model>", max_length: int = 512):
        self.model = model
        self.processor = processor
        self.kind = kind
        self.name = name
        self.max_length = max_length
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        self.has_vision = hasattr(processor, "image_processor")
        self.images = ImageCache()
        self._prefixes: OrderedDict = OrderedDict()  # prefix ids -> its KV cache (batch 1), a few recent ones
        self._prefix_lock = threading.Lock()
        self.share_prefix = False  # see forward(); the server turns it on
        vocab = self.tokenizer.get_vocab()
        self.chat_format = "<|im_start|>" in vocab
        if kind == "yesno":
            self.yes_id = single_token_id(self.tokenizer, "yes", name)
            self.no_id = single_token_id(self.tokenizer, "no", name)
        if self.has_vision:
            image_token = getattr(processor, "image_token", "<|image_pad|>")
            framed = "<|vision_start|>" in vocab and "<|vision_end|>" in vocab
            self.image_span = f"<|vision_start|>{image_token}<|vision_end|>" if framed else image_token

    @property
    def share_prefix(self) -> bool:
        return self._share_prefix

    @share_prefix.setter
    def share_prefix(self, on: bool) -> None:
        """Turn the shared-prefix forward on or off; either way the kept prefix caches are dropped (they hold the
        weights' keys and values of the moment: set it again after the weights change)."""
        with self._prefix_lock:
            self._share_prefix = bool(on)
            self._prefixes.clear()

    # ------------------------------------------------------------------ formatting
    def _item_text(self, item: RerankItem, record: RerankRecord, images: list, field: str, path: str) -> str:
        parts = []
        if item.image is not None:
            if not self.has_vision:
                raise RecordError(path, record.line, f"{field}.image", f"model {self.name} reads text only (no image processor); this record has an image")
            images.append(self.images.get(record, item.image))
            parts.append(self.image_span)
        if item.text is not None:
            parts.append(item.text)
        return "".join(parts)

    def format_pair(self, record: RerankRecord, doc_index: int, images: list, path: str = "<data>") -> str:
        """The full prompt of one (instruction, query, document) pair; appends its images to `images`."""
        query = self._item_text(record.query, record, images, "query", path)
        doc = self._item_text(record.documents[doc_index], record, images, f"documents.{doc_index}", path)
        body = f"<Instruct>: {record.instruction}\n<Query>: {query}\n<Document>: {doc}"
        if not self.chat_format:  # e.g. a BERT-style cross-encoder: plain text
            return body
        prefix = VL_ASSISTANT_PREFIX if self.has_vision else TEXT_ASSISTANT_PREFIX
        return f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n{prefix}"

    def encode(self, records: Sequence[RerankRecord], path: str = "<data>") -> tuple[dict[str, Tensor], Tensor]:
        """Tokenised pairs of every (record, document), flattened query-major, plus mask [B, K]."""
        texts, images = [], []
        k_max = max(len(r.documents) for r in records)
        mask = torch.zeros(len(records), k_max, dtype=torch.bool)
        for b, rec in enumerate(records):
            for k in range(k_max):
                d = min(k, len(rec.documents) - 1)  # pad a short group by repeating its last document (masked out)
                texts.append(self.format_pair(rec, d, images, path))
                mask[b, k] = k < len(rec.documents)
        kwargs = dict(padding=True, return_tensors="pt")
        if self.has_vision:
            batch = self.processor(text=texts, images=images or None, **kwargs)
        else:
            batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, **kwargs)
        lengths = batch["attention_mask"].sum(1)
        if int(lengths.max()) > self.max_length:
            row = int((lengths > self.max_length).nonzero()[0])
            b, k = divmod(row, k_max)
            raise RecordError(path, records[b].line, f"documents.{min(k, len(records[b].documents) - 1)}", f"the pair is {int(lengths[row])} tokens, over max_length {self.max_length} (raise data.max_length)")
        return dict(batch), mask

    # ------------------------------------------------------------------ scoring
    def can_share_prefix(self) -> bool:
        """Whether forward() can run a batch's common prompt prefix once (a text-only decoder of a known family)."""
        cfg = getattr(self.model, "config", None)
        return cfg is not None and not self.has_vision and self.chat_format and getattr(cfg, "model_type", None) in PREFIX_SHARING_MODELS

    def forward(self, batch: dict[str, Tensor], *, features: bool = False) -> tuple[Tensor, Tensor | None]:
        """Scores [N] (and last-token hidden states [N, D] when asked) for a flattened batch of pairs.

        With ``share_prefix`` on (and no gradient, text only, a decoder of PREFIX_SHARING_MODELS), the tokens every pair
        of the batch starts with (the system prompt and instruction) run once, batch 1, then what each run of
        consecutive pairs shares after that (one query's documents: the query), then each pair's own tokens, each
        step on a copy of the KV cache before it: the same causal attention over the same positions as the plain
        forward, at a fraction of the tokens (see _forward_shared_prefix)."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        if self.share_prefix and not torch.is_grad_enabled() and "pixel_values" not in batch and self.can_share_prefix():
            shared = self._forward_shared_prefix(batch, features=features)
            if shared is not None:
                return shared
        if self.kind == "seq_cls":
            out = self.model(**batch, output_hidden_states=features)
            logits = out.logits.float()
            score = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
            hidden = None
            if features:  # the head reads the last non-pad token; with left padding that is the last position
                hidden = out.hidden_states[-1][:, -1]
            return score, hidden
        out = self.model(**batch, logits_to_keep=1, output_hidden_states=features)
        last = out.logits[:, -1].float()  # [N, V]
        score = last[:, self.yes_id] - last[:, self.no_id]
        hidden = out.hidden_states[-1][:, -1] if features else None
        return score, hidden

    def _prefix_cache(self, prefix: list[int], run) -> object:
        """The KV cache (batch 1) of the token ids `prefix`: a kept one, or the longest kept one that `prefix` extends
        (the system prompt and instruction, when a new query follows them) with the rest run on a copy of it. The
        last 8 used are kept; a kept cache is never written to (callers copy it)."""
        with self._prefix_lock:  # callers in several threads (a UI) share the kept caches
            return self._prefix_cache_locked(prefix, run)

    def _prefix_cache_locked(self, prefix: list[int], run) -> object:
        key = tuple(prefix)
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return self._prefixes[key]
        done = max((k for k in self._prefixes if len(k) < len(key) and key[: len(k)] == k), key=len, default=())
        if done:
            self._prefixes.move_to_end(done)
            cache = copy.deepcopy(self._prefixes[done])
        else:
            cache = self._new_cache()
        dev = next(self.model.parameters()).device
        tokens = torch.tensor([prefix[len(done) :]], dtype=torch.long, device=dev)
        run(tokens, torch.ones(1, len(prefix), dtype=torch.long, device=dev), torch.tensor([len(done)], device=dev), cache)
        self._prefixes[key] = cache
        while len(self._prefixes) > 8:
            self._prefixes.popitem(last=False)
        return cache

    def _cache_arg(self) -> str:
        """The base model's KV-cache keyword (transformers renamed `past_key_values` to `cache` in 5.x), read once."""
        if getattr(self, "_cache_kw", None) is None:
            self._cache_kw = "cache" if "cache" in inspect.signature(self.model.base_model.forward).parameters else "past_key_values"
        return self._cache_kw

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward_shared_prefix(self, batch: dict[str, Tensor], *, features: bool) -> tuple[Tensor, Tensor | None] | None:
        """forward() by shared prefixes: the batch's common prefix (cached across calls), then, in one batched call, the
        tokens each run of consecutive pairs shares after it (one query's documents: the query), then each pair's own
        tokens. Positions are the full prompt's; padding sits only where the attention mask hides it. None: no prefix
        worth sharing (or not left padded), the caller runs the plain forward."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        n, width = ids.shape
        lengths = mask.sum(1)
        if not bool((mask.flip(1).cumprod(1).sum(1) == lengths).all()):  # not left padded
            return None
        rows = [ids[i, width - int(lengths[i]) :].tolist() for i in range(n)]

        def common(a: list[int], b: list[int]) -> int:
            k = 0
            for x, y in zip(a, b):
                if x != y:
                    break
                k += 1
            return k

        p = min(len(r) for r in rows) - 1  # every pair keeps at least one token of its own to read the score at
        for r in rows[1:]:
            p = min(p, common(rows[0], r))
        if p < MIN_SHARED_PREFIX:
            return None
        groups: list[tuple[int, int, int]] = []  # (first row, end row, tokens the run shares after the batch prefix)
        i = 0
        while i < n:
            j, g = i + 1, len(rows[i]) - p - 1
            while j < n:
                k = min(g, common(rows[i][p:], rows[j][p:]), len(rows[j]) - p - 1)
                if k < MIN_SHARED_PREFIX // 2:
                    break
                g, j = k, j + 1
            groups.append((i, j, g if j - i > 1 else 0))
            i = j
        dev, long = ids.device, torch.long
        base = self.model.base_model
        cache_arg = self._cache_arg()

        def run(tokens: Tensor, attn: Tensor, offsets: Tensor, cache) -> Tensor:
            pos = offsets[:, None] + torch.arange(tokens.shape[1], device=dev)[None]
            return base(input_ids=tokens, attention_mask=attn, position_ids=pos, use_cache=True, **{cache_arg: cache}).last_hidden_state

        def right_padded(parts: list[list[int]]) -> tuple[Tensor, Tensor]:
            w = max(len(x) for x in parts)
            out, keep = torch.zeros(len(parts), w, dtype=long), torch.zeros(len(parts), w, dtype=long)
            for r, x in enumerate(parts):
                out[r, : len(x)] = torch.tensor(x, dtype=long)
                keep[r, : len(x)] = 1
            return out.to(dev), keep.to(dev)

        group_of = torch.tensor([gi for gi, (a, b, _) in enumerate(groups) for _ in range(a, b)], device=dev)
        mid = torch.tensor([g for _, _, g in groups], device=dev)[group_of]  # [N] tokens of each row's run prefix
        cache = copy.deepcopy(self._prefix_cache(rows[0][:p], run))
        if any(g for _, _, g in groups):
            tokens, keep = right_padded([rows[a][p : p + g] for a, _, g in groups])
            cache.batch_repeat_interleave(len(groups))
            run(tokens, torch.cat([torch.ones(len(groups), p, dtype=long, device=dev), keep], 1), torch.full((len(groups),), p, device=dev), cache)
            cache.batch_select_indices(group_of)
            mid_mask = keep[group_of]
        else:
            cache.batch_repeat_interleave(n)
            mid_mask = torch.zeros(n, 0, dtype=long, device=dev)
        tokens, keep = right_padded([rows[r][p + int(mid[r]) :] for r in range(n)])
        hidden = run(tokens, torch.cat([torch.ones(n, p, dtype=long, device=dev), mid_mask, keep], 1), p + mid, cache)
        last = hidden[torch.arange(n, device=dev), keep.sum(1) - 1]  # [N, D]: each pair's last token
        if self.kind == "seq_cls":
            logits = self.model.score(last).float()
            score = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
        else:
            logits = self.model.get_output_embeddings()(last).float()
            score = logits[:, self.yes_id] - logits[:, self.no_id]
        return score, (last if features else None)

    def signals(self, records: Sequence[RerankRecord], *, features: bool = False, path: str = "<data>") -> Signals:
        return self.signals_of(*self.encode(records, path), features=features)

    def signals_of(self, batch: dict[str, Tensor], mask: Tensor, *, features: bool = False) -> Signals:
        """Signals of pairs `encode` made: scores [B, K] with mask [B, K] (and last-token features [B, K, D])."""
        score, hidden = self.forward(batch, features=features)
        b, k = mask.shape
        sig = Signals(scores=score.view(b, k), mask=mask.to(score.device))
        if hidden is not None:
            sig.features["last_token"] = hidden.view(b, k, -1)
        return sig

    @torch.no_grad()
    def score_records(self, records: Sequence[RerankRecord], *, batch_pairs: int = 128, path: str = "<data>") -> list[list[float]]:
        """Scores of every document of every record (lists of per-query lengths), in batches of ~batch_pairs pairs."""
        out: list[list[float]] = []
        i = 0
        while i < len(records):
            group, n = [], 0
            while i < len(records) and (not group or n + len(records[i].documents) <= batch_pairs):
                group.append(records[i])
                n += len(records[i].documents)
                i += 1
            sig = self.signals(group, path=path)
            for b, rec in enumerate(group):
                out.append(sig.scores[b, : len(rec.documents)].tolist())
        return out

    def hidden_size(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", cfg)
        return int(cfg.hidden_size)

    def save(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)


def detect_kind(config) -> str:
    archs = getattr(config, "architectures", None) or []
    return "seq_cls" if any("SequenceClassification" in a for a in archs) else "yesno"


def load_reranker(name_or_path: str, *, kind: str = "auto", trust_remote_code: bool = False, max_length: int = 512) -> Reranker:
    """Load a reranker by hub id or folder through the real `from_pretrained` path."""
    from . import load_dtype
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification, AutoProcessor, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if kind == "auto":
            kind = detect_kind(config)
        if kind == "seq_cls":
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=load_dtype(config), trust_remote_code=trust_remote_code)
            processor = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        elif hasattr(config, "vision_config"):
            model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=load_dtype(config), trust_remote_code=trust_remote_code)
            processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=load_dtype(config), trust_remote_code=trust_remote_code)
            processor = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"cannot load reranker {name_or_path!r}: {first}") from None
    if kind not in ("yesno", "seq_cls"):
        raise RerankerError(f"{name_or_path}: unknown reranker kind {kind!r}; choose auto, yesno or seq_cls")
    return Reranker(model, processor, kind=kind, name=str(name_or_path), max_length=max_length)


def build_tiny_reranker(out_dir: str | Path | None, texts, *, kind: str = "yesno", preset: str = "vlm-student", seed: int = 0, tokenizer=None, image_size: int = 64) -> Reranker:
    """A tiny Qwen3-VL read as a yes/no reranker, or a tiny Qwen3 sequence classifier (`kind="seq_cls"`)."""
    from .tiny import build_tiny_seq_cls, build_tiny_vlm

    if kind == "seq_cls":
        model, proc = build_tiny_seq_cls(out_dir, texts, preset=preset, seed=seed, tokenizer=tokenizer)
    elif kind == "yesno":
        model, proc = build_tiny_vlm(out_dir, texts, kind="qwen3_vl", preset=preset, seed=seed, tokenizer=tokenizer, image_size=image_size)
    else:
        raise RerankerError(f"unknown tiny reranker kind {kind!r}; choose yesno or seq_cls")
    return Reranker(model, proc, kind=kind, name=str(out_dir or f"tiny-{kind}"))


def record_texts(records: Sequence[RerankRecord]) -> list[str]:
    """All text of rerank records (instructions, queries, documents) for training a tokenizer."""
    out = []
    for r in records:
        out.append(r.instruction)
        for item in [r.query, *r.documents]:
            if item.text:
                out.append(item.text)
    return out
