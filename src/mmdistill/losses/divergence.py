"""Token-level divergences between a student's and a teacher's next-token distributions.

Shapes: ``V`` = vocabulary, leading dims ``L`` = ``[N]`` or ``[B, T]`` (any leading shape works).

- dense:  ``student_logits [*L, V]``, ``teacher_logits [*L, V]``, ``mask [*L]`` (bool, True = counts)
- sparse: ``student_logits [*L, V]``, ``topk_ids [*L, k]`` (distinct ids), ``topk_logprobs [*L, k]``
  (teacher log-probs at temperature 1), ``tail_logmass [*L]`` (log of the teacher mass outside
  ``topk_ids``; ``-inf`` when ``k = V``), ``mask [*L]``

Conventions (every function here):

- ``p_t`` = teacher distribution, ``p_s`` = student distribution, both ``softmax(logits / temperature)``
  computed in float32 whatever the input dtype (fp16 / bf16 inputs are upcast; gradients flow back
  in the input dtype).
- Log-probabilities are floored at ``LOG_FLOOR = -1e4`` (probability ``exp(-1e4) = 0`` in float32).
  This only matters where a probability is exactly zero: ``0 * log 0`` terms then give 0 with finite
  gradients, and ``KL(p ‖ q)`` where ``q = 0 < p`` is large (about ``1e4 * p``) instead of ``inf``.
- Reduction over positions: ``"mean"`` (default) = sum over counted positions / count, where
  count = number of positions with ``mask`` True (all positions when ``mask`` is None), at least 1,
  so an all-masked batch gives 0, never NaN. Pass ``num_items`` = the *global* number of counted
  positions (across micro-batches and processes) to divide by it instead: summing the losses of the
  micro-batches then equals the loss of the one big batch. ``"sum"`` = plain sum;
  ``"none"`` = per-position values ``[*L]`` with 0 at masked positions.
- ``temperature`` divides both student and teacher logits; ``scale_t2=True`` multiplies the result
  by ``temperature ** 2`` (Hinton et al.: keeps gradient size comparable across temperatures).
  TRL's GKD adds no T² factor; the default here is the same.
- ``chunk_size``: masked positions are selected first (``[n, V]``, input dtype), then processed
  ``chunk_size`` positions at a time; each chunk is recomputed in backward (activation
  checkpointing), so the float32 working set is ``chunk_size × V`` in forward and backward instead
  of ``n × V``. Results equal the unchunked computation.

Divergences (per position, summed over the vocabulary / buckets):

- forward KL      ``KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s)``             (mode covering)
- reverse KL      ``KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t)``             (mode seeking)
- generalized JSD (TRL / GKD convention) with ``m = β p_t + (1 − β) p_s``:
  ``JSD_β = β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)``; β = 0 is *defined* as forward KL and β = 1 as
  reverse KL (special-cased: the mixture formula itself tends to 0 at both ends). β = 0.5 is the
  ordinary Jensen–Shannon divergence (≤ log 2).
- skew KL (DistiLLM)          ``KL(p_t ‖ α p_t + (1 − α) p_s)``, α = 0 is forward KL
- skew reverse KL (DistiLLM)  ``KL(p_s ‖ α p_s + (1 − α) p_t)``, α = 0 is reverse KL
- TVD             ``½ Σ |p_t − p_s|``

Sparse teacher (DistillKit-style tail bucket): both distributions are collapsed to ``k + 1`` buckets,
the ``k`` kept ids plus one tail bucket for everything else. The student side is exact:
``log p_s[ids]`` from the full log-softmax and ``log p_s[tail] = logsumexp(z[not ids]) − logsumexp(z)``
(a masked logsumexp, stable even when the tail is tiny). With ``k = V`` (tail mass 0) the sparse forms
equal the dense ones. Temperature on the teacher side: the tempered teacher's buckets are
``[lp_kept / T, log Σ_tail p_j^(1/T)]`` renormalised, where ``lp`` are the stored temperature-1
log-probs. The tail term needs the tail's individual probabilities, which a store no longer has, so a
store keeps it precomputed on a grid of ``β = 1/T`` (``tempered_tail_grid``) and the loss interpolates it
(``tail_tempered``; ``interpolate_tail``); exact at the grid points, and a slight overestimate between
them (the tail's log-partition ``log Σ p_j^β`` is convex in β). Without it (``tail_tempered=None``)
the tail is tempered as if it were one token (``tail_logmass / T``): exact at ``T = 1``, but at ``T > 1``
it gives the tail less mass than the true tempered distribution (the true tail is many small tokens,
each raised by tempering). The teacher log-probs are always renormalised over the buckets, which also
repairs small rounding from quantised storage.

Sampled teacher (random-sampling KD, ``sampled_forward_kl``): ``N`` ids drawn from the teacher at ``T = 1``,
kept as the distinct drawn ids ``v`` with their frequencies ``f_v = count_v / N`` and the teacher's own
log-probs ``log p(v)``. With ``β = 1/T``, ``p_T(v) = p(v)^β / Z_β`` and ``Z_β = Σ_v p(v)^β`` (the whole
vocabulary), the importance weight ``w_v = f_v · p_T(v) / p(v)`` has expectation exactly ``p_T(v)``, so
``Σ_v w_v (log p_T(v) − log q_T(v))`` is an unbiased estimate of ``KL(p_T ‖ q_T)`` and its gradient an unbiased
estimate of the dense gradient, at any temperature (given the exact ``log Z_β``; a store keeps it on the same β
grid as the tail, see ``log_partition_grid``: exact at the grid points, between them the chord of a convex
function overestimates it, so the weights come out slightly low). Tempering the frequencies themselves
(``f^β`` renormalised) is biased at ``T ≠ 1``. Only forward KL has this form: reverse KL, JSD, skew KL and TVD
weigh every id by the student's probability (or compare the two everywhere), which needs the teacher's
probability at ids the draws did not reach.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LOG_FLOOR = -1e4
_FILL = -1e30  # stands in for -inf inside logsumexp (keeps gradients finite)
_REDUCTIONS = ("mean", "sum", "none")

PerPosition = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# per-position divergences on float32 log-probabilities ls (student), lt (teacher): [n, C] -> [n]


def _kl(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(p ‖ q) per row from log-probabilities [n, C] -> [n]."""
    return (lp.exp() * (lp - lq)).sum(-1)


def _log_mix(la: Tensor, lb: Tensor, w: float) -> Tensor:
    """log(w·a + (1 − w)·b) from log a, log b, computed stably (logaddexp)."""
    if w == 1.0:
        return la
    if w == 0.0:
        return lb
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def _forward_kl(ls: Tensor, lt: Tensor) -> Tensor:
    return _kl(lt, ls)


def _reverse_kl(ls: Tensor, lt: Tensor) -> Tensor:
    return _kl(ls, lt)


def _jsd(ls: Tensor, lt: Tensor, beta: float) -> Tensor:
    if beta == 0.0:
        return _kl(lt, ls)
    if beta == 1.0:
        return _kl(ls, lt)
    lm = _log_mix(lt, ls, beta)  # m = β p_t + (1 − β) p_s
    return beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)


def _skew_kl(ls: Tensor, lt: Tensor, alpha: float) -> Tensor:
    return _kl(lt, _log_mix(lt, ls, alpha))


def _skew_reverse_kl(ls: Tensor, lt: Tensor, alpha: float) -> Tensor:
    return _kl(ls, _log_mix(ls, lt, alpha))


def _tvd(ls: Tensor, lt: Tensor) -> Tensor:
    return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)


# ---------------------------------------------------------------------------------------------
# shared machinery: validation, row selection, chunking, reduction


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """float32 log-softmax of logits / temperature, floored at LOG_FLOOR. [n, V] -> [n, V]"""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return z.log_softmax(-1).clamp_min(LOG_FLOOR)


def _check_options(temperature: float, chunk_size: int | None, reduction: str) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _select_rows(mask: Tensor | None, lead: torch.Size, device: torch.device) -> Tensor | None:
    """Flat indices [n] of the counted positions, or None when every position counts."""
    if mask is None:
        return None
    if mask.shape != lead:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(lead)} (the logits' leading dims)")
    return mask.reshape(-1).to(device=device, dtype=torch.bool).nonzero().squeeze(1)


def _flat(x: Tensor, lead: torch.Size, rows: Tensor | None) -> Tensor:
    """[*L, ...] -> [n, ...]: flatten the leading dims, keep only the counted positions."""
    x = x.reshape(-1, *x.shape[len(lead) :])
    return x if rows is None else x.index_select(0, rows)


def _chunked(fn: Callable[..., Tensor], chunk_size: int | None, *rows: Tensor) -> Tensor:
    """fn over row chunks of the [n, ...] inputs, concatenated -> [n].

    Each chunk is checkpointed when autograd is recording, so backward recomputes the float32
    intermediates of one chunk at a time instead of keeping all of them.
    """
    n = rows[0].shape[0]
    if chunk_size is None or n <= chunk_size:
        return fn(*rows)
    grad = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    outs = []
    for pieces in zip(*(r.split(chunk_size) for r in rows)):
        outs.append(checkpoint(fn, *pieces, use_reentrant=False) if grad else fn(*pieces))
    return torch.cat(outs)


def _reduce(
    values: Tensor,
    rows: Tensor | None,
    lead: torch.Size,
    factor: float,
    num_items: int | Tensor | None,
    reduction: str,
) -> Tensor:
    """values [n] over counted positions -> scalar (mean / sum) or [*L] (none)."""
    if factor != 1.0:
        values = values * factor
    if reduction == "none":
        if rows is None:
            return values.reshape(lead)
        out = values.new_zeros(math.prod(lead))
        return out.index_copy(0, rows, values).reshape(lead)
    total = values.sum()
    if reduction == "sum":
        return total
    if num_items is None:
        return total / max(values.shape[0], 1)
    if isinstance(num_items, Tensor):
        return total / num_items.to(device=total.device, dtype=total.dtype).clamp_min(1.0)
    return total / max(float(num_items), 1.0)


def _dense(
    per_position: PerPosition,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    temperature: float,
    scale_t2: bool,
    chunk_size: int | None,
    num_items: int | Tensor | None,
    reduction: str,
) -> Tensor:
    _check_options(temperature, chunk_size, reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape [*L, V] (same vocabulary: map or slice the vocabularies first)"
        )
    lead = student_logits.shape[:-1]
    rows = _select_rows(mask, lead, student_logits.device)
    s = _flat(student_logits, lead, rows)  # [n, V]
    t = _flat(teacher_logits, lead, rows)  # [n, V]

    def fn(s_chunk: Tensor, t_chunk: Tensor) -> Tensor:
        return per_position(_log_softmax(s_chunk, temperature), _log_softmax(t_chunk, temperature))

    values = _chunked(fn, chunk_size, s, t)  # [n]
    return _reduce(values, rows, lead, temperature**2 if scale_t2 else 1.0, num_items, reduction)


def _sparse_student_logprobs(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """Student log-probs collapsed to the kept ids + one tail bucket. [n, V], [n, k] -> [n, k + 1]"""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = z.logsumexp(-1, keepdim=True)  # [n, 1]
    kept = z.gather(-1, ids) - lse  # [n, k]
    tail = z.scatter(-1, ids, _FILL).logsumexp(-1, keepdim=True) - lse  # [n, 1]
    return torch.cat([kept, tail], dim=-1).clamp_min(LOG_FLOOR)


def _sparse_teacher_logprobs(topk_logprobs: Tensor, tail: Tensor, temperature: float) -> Tensor:
    """Teacher log-probs over kept ids + tail bucket at ``temperature`` (renormalised). -> [n, k + 1]
    ``tail`` [n] = log Σ_tail p_j^(1/T) of the stored temperature-1 probabilities (at T = 1: the tail mass)."""
    kept = topk_logprobs.float().clamp_min(LOG_FLOOR)
    if temperature != 1.0:
        kept = kept / temperature
    lt = torch.cat([kept, tail.float().clamp_min(LOG_FLOOR).unsqueeze(-1)], dim=-1)
    return lt.log_softmax(-1).clamp_min(LOG_FLOOR)


def tempered_tail_grid(logprobs: Tensor, topk_ids: Tensor, betas: Sequence[float]) -> Tensor:
    """``log Σ_{j not in topk_ids} p_j^β`` for each β of ``betas`` (β = 1/T), from the full temperature-1
    log-probs: what a store keeps so that the loss can temper the tail bucket exactly.
    logprobs [*L, V], topk_ids [*L, k] -> [*L, G]"""
    tail = logprobs.float().scatter(-1, topk_ids.long(), float("-inf"))  # [*L, V], kept ids removed
    return torch.stack([(tail * float(b)).logsumexp(-1) for b in betas], dim=-1)


def interpolate_tail(grid: Tensor, betas: Tensor | Sequence[float], temperature: float) -> Tensor:
    """``log Σ_tail p_j^(1/T)`` at ``temperature`` by linear interpolation in β = 1/T between the grid's
    points (``tempered_tail_grid``). grid [*L, G], betas [G] increasing -> [*L]. A temperature outside the
    grid's range is an error (the store was made for other temperatures)."""
    b = torch.as_tensor(betas, dtype=torch.float32).flatten()
    beta = 1.0 / float(temperature)
    lo, hi = float(b[0]), float(b[-1])
    if not lo - 1e-6 <= beta <= hi + 1e-6:
        raise ValueError(f"temperature {temperature:g} is outside the stored tail grid (T from {1 / hi:g} to {1 / lo:g})")
    if b.numel() == 1:
        return grid[..., 0]
    j = int(torch.searchsorted(b, torch.tensor(beta)).clamp(1, b.numel() - 1))
    w = (beta - float(b[j - 1])) / max(float(b[j] - b[j - 1]), 1e-12)
    a, c = grid[..., j - 1].float(), grid[..., j].float()
    both_empty = torch.isneginf(a) & torch.isneginf(c)  # no tail at all (k = V): stays -inf
    out = torch.lerp(a.clamp_min(LOG_FLOOR), c.clamp_min(LOG_FLOOR), min(max(w, 0.0), 1.0))
    return out.masked_fill(both_empty, float("-inf"))


def log_partition_grid(logprobs: Tensor, betas: Sequence[float]) -> Tensor:
    """``log Z_β = log Σ_v p_v^β`` over the whole vocabulary for each β of ``betas`` (β = 1/T), from the full
    temperature-1 log-probs: what a sampled store keeps so that the loss can weigh its draws at temperature T.
    logprobs [*L, V] -> [*L, G]"""
    lp = logprobs.float()
    return torch.stack([(lp * float(b)).logsumexp(-1) for b in betas], dim=-1)


def tail_logmass_from_topk(topk_logprobs: Tensor) -> Tensor:
    """log(1 − Σ exp(topk_logprobs)) — the tail mass when a store kept only the top-k. [*L, k] -> [*L]"""
    kept = topk_logprobs.float().logsumexp(-1).clamp(max=0.0)
    return torch.log(-torch.expm1(kept))  # log(1 - exp(kept)), -inf when the kept ids hold all the mass


def _sparse(
    per_position: PerPosition,
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    scale_t2: bool,
    chunk_size: int | None,
    num_items: int | Tensor | None,
    reduction: str,
    tail_tempered: Tensor | None = None,
) -> Tensor:
    _check_options(temperature, chunk_size, reduction)
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    if topk_ids.shape[:-1] != lead or topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"sparse teacher: topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
            f"must both be [*L, k] with L = {tuple(lead)} (the student logits' leading dims)"
        )
    if topk_ids.shape[-1] > vocab:
        raise ValueError(f"sparse teacher keeps k={topk_ids.shape[-1]} ids but the vocabulary has only {vocab}")
    if tail_logmass is None:
        tail_logmass = tail_logmass_from_topk(topk_logprobs)
    elif tail_logmass.shape != lead:
        raise ValueError(f"tail_logmass has shape {tuple(tail_logmass.shape)}; expected {tuple(lead)}")
    if tail_tempered is not None and tail_tempered.shape != lead:
        raise ValueError(f"tail_tempered has shape {tuple(tail_tempered.shape)}; expected {tuple(lead)}")
    if temperature == 1.0:
        tail = tail_logmass
    elif tail_tempered is not None:
        tail = tail_tempered
    else:  # no tempered tail given: the tail tempered as if it were one token (see the module docstring)
        tail = tail_logmass.float().clamp_min(LOG_FLOOR) / temperature
    rows = _select_rows(mask, lead, student_logits.device)
    s = _flat(student_logits, lead, rows)  # [n, V]
    ids = _flat(topk_ids.long(), lead, rows)  # [n, k]
    lp = _flat(topk_logprobs, lead, rows)  # [n, k]
    tail = _flat(tail, lead, rows)  # [n]

    def fn(s_chunk: Tensor, ids_chunk: Tensor, lp_chunk: Tensor, tail_chunk: Tensor) -> Tensor:
        ls = _sparse_student_logprobs(s_chunk, ids_chunk, temperature)  # [c, k + 1]
        lt = _sparse_teacher_logprobs(lp_chunk, tail_chunk, temperature)  # [c, k + 1]
        return per_position(ls, lt)

    values = _chunked(fn, chunk_size, s, ids, lp, tail)  # [n]
    return _reduce(values, rows, lead, temperature**2 if scale_t2 else 1.0, num_items, reduction)


def sampled_forward_kl(
    student_logits: Tensor,
    sample_ids: Tensor,
    teacher_logprobs: Tensor,
    sample_logweights: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    logz: Tensor | None = None,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Importance-weighted forward KL ``KL(p_T ‖ q_T)`` from ids drawn from the teacher at T = 1 (random-sampling
    KD; see the module docstring): per position ``Σ_v w_v (log p_T(v) − log q_T(v))`` with
    ``log p_T(v) = β log p(v) − log Z_β`` and ``w_v = f_v · p_T(v) / p(v)``, β = 1/T. An unbiased estimate of the
    dense ``forward_kl`` at the same temperature (its value and its gradient), not a divergence to the draws.

    student_logits [*L, V]; sample_ids [*L, w] distinct ids; teacher_logprobs [*L, w] the teacher's temperature-1
    log-probs of those ids; sample_logweights [*L, w] log of each id's share of the draws (log(count / N); -inf for
    padding ids, which then count 0); mask [*L]; logz [*L] = ``log Σ_v p(v)^(1/T)`` over the whole vocabulary
    (``log_partition_grid`` / ``interpolate_tail``), required at T ≠ 1 (at T = 1 it is 0).
    """
    _check_options(temperature, chunk_size, reduction)
    lead = student_logits.shape[:-1]
    if sample_ids.shape[:-1] != lead or teacher_logprobs.shape != sample_ids.shape or sample_logweights.shape != sample_ids.shape:
        raise ValueError(
            f"sampled teacher: sample_ids {tuple(sample_ids.shape)}, teacher_logprobs {tuple(teacher_logprobs.shape)} and "
            f"sample_logweights {tuple(sample_logweights.shape)} must all be [*L, w] with L = {tuple(lead)} (the student logits' leading dims)"
        )
    if logz is None:
        if temperature != 1.0:
            raise ValueError(f"a sampled teacher at temperature {temperature:g} needs logz = log Σ_v p^(1/T) (the store's logz_grid)")
        logz = torch.zeros(lead, device=student_logits.device)
    elif logz.shape != lead:
        raise ValueError(f"logz has shape {tuple(logz.shape)}; expected {tuple(lead)}")
    beta = 1.0 / temperature
    rows = _select_rows(mask, lead, student_logits.device)
    s = _flat(student_logits, lead, rows)  # [n, V]
    ids = _flat(sample_ids.long(), lead, rows)  # [n, w]
    lp = _flat(teacher_logprobs, lead, rows)  # [n, w]
    lw = _flat(sample_logweights, lead, rows)  # [n, w]
    lz = _flat(logz, lead, rows)  # [n]

    def fn(s_chunk: Tensor, ids_chunk: Tensor, lp_chunk: Tensor, lw_chunk: Tensor, lz_chunk: Tensor) -> Tensor:
        ls = _log_softmax(s_chunk, temperature).gather(-1, ids_chunk)  # log q_T at the drawn ids [c, w]
        lt1 = lp_chunk.float().clamp_min(LOG_FLOOR)
        lt = beta * lt1 - lz_chunk.float().unsqueeze(-1)  # log p_T [c, w]
        w = (lw_chunk.float() + lt - lt1).exp()  # importance weights; 0 for padding ids (log weight -inf)
        return (w * (lt - ls)).sum(-1)

    values = _chunked(fn, chunk_size, s, ids, lp, lw, lz)  # [n]
    return _reduce(values, rows, lead, temperature**2 if scale_t2 else 1.0, num_items, reduction)


# ---------------------------------------------------------------------------------------------
# dense public API


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Forward KL ``KL(p_t ‖ p_s) = Σ_v p_t (log p_t − log p_s)`` per position, reduced over positions.

    student_logits, teacher_logits: [*L, V]; mask: [*L] or None. Returns [] (mean / sum) or [*L] (none).
    See the module docstring for temperature, scale_t2, chunk_size, num_items and reduction.
    """
    return _dense(
        _forward_kl, student_logits, teacher_logits, mask, temperature, scale_t2, chunk_size, num_items, reduction
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Reverse KL ``KL(p_s ‖ p_t) = Σ_v p_s (log p_s − log p_t)`` (mode seeking, MiniLLM).

    Shapes and options as ``forward_kl``.
    """
    return _dense(
        _reverse_kl, student_logits, teacher_logits, mask, temperature, scale_t2, chunk_size, num_items, reduction
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Generalized Jensen–Shannon divergence, TRL / GKD convention.

    ``m = β p_t + (1 − β) p_s`` and ``JSD_β = β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)`` for 0 < β < 1;
    β = 0 returns forward ``KL(p_t ‖ p_s)`` and β = 1 reverse ``KL(p_s ‖ p_t)`` exactly (the mixture
    formula itself tends to 0 at both ends, so the endpoints are special-cased as in TRL).
    GKD's default is β = 0.5. Shapes and other options as ``forward_kl``.
    """
    _check_unit("beta", beta)
    fn = partial(_jsd, beta=float(beta))
    return _dense(fn, student_logits, teacher_logits, mask, temperature, scale_t2, chunk_size, num_items, reduction)


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Skew KL (DistiLLM): ``KL(p_t ‖ α p_t + (1 − α) p_s)``; α = 0 is forward KL. Default α = 0.1.

    Shapes and other options as ``forward_kl``.
    """
    _check_unit("alpha", alpha)
    fn = partial(_skew_kl, alpha=float(alpha))
    return _dense(fn, student_logits, teacher_logits, mask, temperature, scale_t2, chunk_size, num_items, reduction)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Skew reverse KL (DistiLLM): ``KL(p_s ‖ α p_s + (1 − α) p_t)``; α = 0 is reverse KL.

    Shapes and other options as ``forward_kl``.
    """
    _check_unit("alpha", alpha)
    fn = partial(_skew_reverse_kl, alpha=float(alpha))
    return _dense(fn, student_logits, teacher_logits, mask, temperature, scale_t2, chunk_size, num_items, reduction)


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Total variation distance ``½ Σ_v |p_t − p_s|`` (in [0, 1]). Shapes and options as ``forward_kl``."""
    return _dense(
        _tvd, student_logits, teacher_logits, mask, temperature, scale_t2, chunk_size, num_items, reduction
    )


# ---------------------------------------------------------------------------------------------
# sparse-teacher public API (teacher = top-k ids + log-probs + tail bucket)


def sparse_forward_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor | None,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
    tail_tempered: Tensor | None = None,
) -> Tensor:
    """Forward KL against a sparse teacher, over the k kept ids + one tail bucket.

    student_logits [*L, V]; topk_ids, topk_logprobs [*L, k]; tail_logmass [*L] (None: derived as
    ``log(1 − Σ exp(topk_logprobs))``); mask [*L]; tail_tempered [*L] = log Σ_tail p_t^(1/T) at this
    temperature (``interpolate_tail``; None: the tail tempered as one token). Equals ``forward_kl`` when k = V.
    See the module docstring for the tail bucket and temperature.
    """
    return _sparse(
        _forward_kl, student_logits, topk_ids, topk_logprobs, tail_logmass, mask,
        temperature, scale_t2, chunk_size, num_items, reduction, tail_tempered,
    )


def sparse_reverse_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor | None,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
    tail_tempered: Tensor | None = None,
) -> Tensor:
    """Reverse KL ``KL(p_s ‖ p_t)`` over the kept ids + tail bucket. Shapes as ``sparse_forward_kl``."""
    return _sparse(
        _reverse_kl, student_logits, topk_ids, topk_logprobs, tail_logmass, mask,
        temperature, scale_t2, chunk_size, num_items, reduction, tail_tempered,
    )


def sparse_generalized_jsd(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor | None,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
    tail_tempered: Tensor | None = None,
) -> Tensor:
    """Generalized JSD(β) (TRL convention, see ``generalized_jsd``) over the kept ids + tail bucket."""
    _check_unit("beta", beta)
    return _sparse(
        partial(_jsd, beta=float(beta)), student_logits, topk_ids, topk_logprobs, tail_logmass, mask,
        temperature, scale_t2, chunk_size, num_items, reduction, tail_tempered,
    )


def sparse_skew_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor | None,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
    tail_tempered: Tensor | None = None,
) -> Tensor:
    """Skew KL ``KL(p_t ‖ α p_t + (1 − α) p_s)`` over the kept ids + tail bucket."""
    _check_unit("alpha", alpha)
    return _sparse(
        partial(_skew_kl, alpha=float(alpha)), student_logits, topk_ids, topk_logprobs, tail_logmass, mask,
        temperature, scale_t2, chunk_size, num_items, reduction, tail_tempered,
    )


def sparse_skew_reverse_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor | None,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
    tail_tempered: Tensor | None = None,
) -> Tensor:
    """Skew reverse KL ``KL(p_s ‖ α p_s + (1 − α) p_t)`` over the kept ids + tail bucket."""
    _check_unit("alpha", alpha)
    return _sparse(
        partial(_skew_reverse_kl, alpha=float(alpha)), student_logits, topk_ids, topk_logprobs, tail_logmass,
        mask, temperature, scale_t2, chunk_size, num_items, reduction, tail_tempered,
    )


def sparse_tvd(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor | None,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_t2: bool = False,
    chunk_size: int | None = None,
    num_items: int | Tensor | None = None,
    reduction: str = "mean",
    tail_tempered: Tensor | None = None,
) -> Tensor:
    """TVD ``½ Σ |p_t − p_s|`` over the kept ids + tail bucket (a lower bound of the full TVD)."""
    return _sparse(
        _tvd, student_logits, topk_ids, topk_logprobs, tail_logmass, mask,
        temperature, scale_t2, chunk_size, num_items, reduction, tail_tempered,
    )


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}

SPARSE_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": sparse_forward_kl,
    "reverse_kl": sparse_reverse_kl,
    "jsd": sparse_generalized_jsd,
    "skew_kl": sparse_skew_kl,
    "skew_reverse_kl": sparse_skew_reverse_kl,
    "tvd": sparse_tvd,
}
