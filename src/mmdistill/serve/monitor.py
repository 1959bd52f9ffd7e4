"""Drift monitoring: the live rerank score distribution against a reference written by `mmdistill eval`.

The reference is the ``scores.jsonl`` that ``mmdistill eval`` writes beside a reranker's eval.json (one
line per query: ``{"id", "scores": [raw score per document]}``), or the eval.json itself (its
scores.jsonl is read). Live raw scores are kept in a bounded window. Two statistics compare them:

- **PSI** (population stability index) over ``bins`` reference-quantile bins:
  ``sum_i (p_live_i - p_ref_i) * ln(p_live_i / p_ref_i)``, proportions floored at ``eps``
  (0.1 = moderate shift, 0.25 = large, the usual reading);
- **KS**: the two-sample Kolmogorov-Smirnov statistic and p-value (``scipy.stats.ks_2samp``).

Drift is flagged when at least ``min_samples`` live scores exist and PSI > ``psi_threshold`` or the KS
p-value < ``ks_alpha``; a change of state is logged (and POSTed to ``webhook`` when given).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mmdistill.serve")


class MonitorError(ValueError):
    """A reference file that cannot be used (one line, naming the file and the problem)."""


def read_reference(path: str | Path) -> np.ndarray:
    """All raw scores of a scores.jsonl (or of the scores.jsonl beside an eval.json)."""
    from ..evaluate.bench import beside

    p = Path(path)
    if p.suffix == ".json":  # an eval result file: its scores file beside it
        p = beside(p, "scores.jsonl")
    if not p.is_file():
        raise MonitorError(f"{p}: reference scores not found (mmdistill eval writes scores.jsonl beside eval.json for a reranker)")
    scores: list[float] = []
    for i, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            values = row["scores"]
            scores.extend(float(x) for x in values)
        except (ValueError, KeyError, TypeError):
            raise MonitorError(f"{p}:{i}: expected {{\"scores\": [numbers]}}") from None
    arr = np.asarray(scores, dtype=np.float64)
    if arr.size < 10 or not np.isfinite(arr).all():
        raise MonitorError(f"{p}: needs at least 10 finite scores, found {arr.size}")
    return arr


def psi(reference: np.ndarray, live: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `live` against `reference` over reference-quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_counts = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    live_counts = np.bincount(np.searchsorted(edges, live, side="right"), minlength=len(edges) + 1)
    p = np.maximum(ref_counts / ref_counts.sum(), eps)
    q = np.maximum(live_counts / live_counts.sum(), eps)
    return float(np.sum((q - p) * np.log(q / p)))


class DriftMonitor:
    def __init__(self, reference: np.ndarray, *, source: str = "", window: int = 5000, min_samples: int = 200, bins: int = 10,
                 psi_threshold: float = 0.25, ks_alpha: float = 0.01, webhook: str | None = None):
        self.reference = np.asarray(reference, dtype=np.float64)
        self.source = source
        self.live: deque[float] = deque(maxlen=window)
        self.min_samples, self.bins = min_samples, bins
        self.psi_threshold, self.ks_alpha = psi_threshold, ks_alpha
        self.webhook = webhook
        self.drift = False
        self._lock = threading.Lock()

    def add(self, scores: list[float]) -> None:
        with self._lock:
            self.live.extend(float(s) for s in scores)
        self.check()

    def summary(self) -> dict[str, Any]:
        from scipy.stats import ks_2samp

        with self._lock:
            live = np.asarray(self.live, dtype=np.float64)
        out: dict[str, Any] = {
            "reference": {"source": self.source, "n": int(self.reference.size), "mean": float(self.reference.mean()), "std": float(self.reference.std())},
            "live": {"n": int(live.size), "window": self.live.maxlen},
            "thresholds": {"psi": self.psi_threshold, "ks_alpha": self.ks_alpha, "min_samples": self.min_samples},
            "psi": None, "ks_statistic": None, "ks_pvalue": None, "drift": False,
        }
        if live.size:
            out["live"].update(mean=float(live.mean()), std=float(live.std()))
            ks = ks_2samp(self.reference, live)
            out.update(psi=psi(self.reference, live, self.bins), ks_statistic=float(ks.statistic), ks_pvalue=float(ks.pvalue))
            if live.size >= self.min_samples:
                out["drift"] = bool(out["psi"] > self.psi_threshold or out["ks_pvalue"] < self.ks_alpha)
        return out

    def check(self) -> dict[str, Any]:
        s = self.summary()
        if s["drift"] != self.drift:
            self.drift = s["drift"]
            msg = (f"score drift {'DETECTED' if self.drift else 'cleared'}: PSI={s['psi']:.3f} KS={s['ks_statistic']:.3f} "
                   f"(p={s['ks_pvalue']:.2g}) over {s['live']['n']} live scores vs {s['reference']['n']} reference scores")
            (log.warning if self.drift else log.info)(msg)
            if self.webhook:
                threading.Thread(target=self._post, args=({"event": "drift" if self.drift else "drift_cleared", "message": msg, **s},), daemon=True).start()
        return s

    def _post(self, body: dict) -> None:
        import httpx

        try:
            httpx.post(self.webhook, json=body, timeout=10)
        except httpx.HTTPError as e:
            log.warning(f"drift webhook {self.webhook} failed: {e}")
