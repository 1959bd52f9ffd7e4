"""Evaluate a saved vision-language model on chat records: generate answers (greedy), score them
(VQA accuracy with VQA answer normalisation, CIDEr-D, BLEU-4, ROUGE-L, and WER / CER through jiwer on
speech-transcription records, per skill), agreement with a
reference model's answers, generation latency (ms per sample, tokens/s) and peak memory -> eval.json.

Metrics are percentages except CIDEr (CIDEr-D's ×10 scale) and BLEU-4 (sacrebleu's 0–100).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .bench import beside, count_parameters, size_on_disk


def _peak_rss_bytes() -> int | None:
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:  # pragma: no cover - platforms without resource
        return None


def generate_answers(model_dir: str | Path, records, images, *, max_new_tokens: int = 48, batch_size: int = 16) -> tuple[list[str], dict[str, float]]:
    """Greedy answers for every record, plus timing (ms per sample, generated tokens per second) and the model's parameter count."""
    import torch

    from ..teachers.generate import LocalGenerator

    gen = LocalGenerator(str(model_dir), max_new_tokens=max_new_tokens, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    answers: list[str] = []
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(records), batch_size):
        outs = gen(records[i : i + batch_size], images[i : i + batch_size])
        answers += [o.text for o in outs]
        tokens += sum(o.n_tokens for o in outs)
    seconds = time.perf_counter() - t0
    timing = {
        "ms_per_sample": 1000.0 * seconds / max(len(records), 1),
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "batch_size": batch_size,
        "params": count_parameters(gen.model),
    }
    if torch.cuda.is_available():
        timing["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return answers, timing


def evaluate_folder(
    model_dir: str | Path,
    data_path: str | Path,
    *,
    out_path: str | Path | None = None,
    name: str | None = None,
    role: str = "student",
    max_items: int | None = 1000,
    latency: bool = True,
    reference: str | Path | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    on_error: str = "fail",
) -> dict[str, Any]:
    """Answer the first `max_items` chat records of `data_path` with the model and score the answers."""
    from ..data.loaders import ImageCache, load_chat
    from .textgen import score_generations

    images = ImageCache()
    records, _ = load_chat(Path(data_path), "response", on_error, max_items, images, log=lambda *_: None)
    imgs = [images.all(r) for r in records]
    answers, timing = generate_answers(model_dir, records, imgs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ref_answers = None
    if reference is not None and Path(str(reference)).resolve() != Path(str(model_dir)).resolve():
        ref_answers, _ = generate_answers(reference, records, imgs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    items = [
        {"prediction": a, "reference": r.response, "skills": r.skills, **({"teacher": ref_answers[i]} if ref_answers else {})}
        for i, (a, r) in enumerate(zip(answers, records))
    ]
    scores = score_generations(items)
    metrics: dict[str, float] = {}
    for key in ("vqa_accuracy", "text_vqa_accuracy", "spoken_vqa_accuracy", "exact_match", "cider", "bleu4", "rouge_l", "wer", "cer", "agreement"):
        if scores.get(key) is not None:
            metrics[key] = float(scores[key])
    result: dict[str, Any] = {
        "name": name or Path(model_dir).parent.name,
        "role": role,
        "family": "generative",
        "model_dir": str(model_dir),
        "items": len(records),
        "metrics": metrics,
        "per_skill": scores.get("per_skill", {}),
        "params": timing["params"],
        "size_bytes": size_on_disk(model_dir),
        "latency_ms": {"per_sample": timing["ms_per_sample"]} if latency else {},
        "throughput": {"tokens_per_s": timing["tokens_per_s"]},
        "peak_memory_bytes": timing.get("peak_gpu_bytes", _peak_rss_bytes()),
    }
    if reference is not None and ref_answers is not None:
        result["reference"] = str(reference)
        result["agreement_per_skill"] = scores.get("agreement_per_skill", {})
    if out_path is not None:
        Path(out_path).write_text(json.dumps(result, indent=2))
        with beside(out_path, "answers.jsonl").open("w") as f:
            for it, r in zip(items, records):
                f.write(json.dumps({"id": r.id, "prompt": r.prompt, **it}) + "\n")
    return result
