"""`mmdistill prune`: load a model folder, prune experts / blocks / widths on calibration data, save a plain folder.

Stages run in this order, each calibrated on the model the previous one left: MoE experts
(compress/experts.py), whole blocks (compress/depth.py), widths (compress/prune.py).

Calibration data is a chat JSONL file (data/records.py; images are used by VLMs, and the response
when a record has one) or a plain text file (one sample per non-empty line). Each sample runs as
its own forward pass, so padding never counts in a saliency or importance.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .prune import PruneError

MIN_CALIBRATION = 4  # fewer samples than this is refused: saliencies from one or two prompts are noise


def load_model(model_dir: str | Path):
    """(model, processor or tokenizer, is_vlm) of a local model folder, through the real from_pretrained path."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from ..models.generative import load_vlm

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "vision_config", None) is not None or hasattr(config, "thinker_config"):
        model, processor = load_vlm(str(path))
        return model.eval(), processor, True
    cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)), None)
    if cls is None:
        raise FileNotFoundError(f"{path}: config.json names no model class transformers knows ({config.architectures})")
    return cls.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path)), False


def calibration_inputs(model: nn.Module, processor, path: str | Path, *, is_vlm: bool, max_samples: int = 64) -> list[dict[str, torch.Tensor]]:
    """One model-input dict per calibration sample (the first `max_samples` of the file)."""
    from ..data.records import read_records
    from ..models import generative as gm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {path}: no such file")
    tok = getattr(processor, "tokenizer", processor)
    samples: list[dict[str, torch.Tensor]] = []
    if path.suffix == ".jsonl":
        records, _ = read_records(path, "chat")
        for rec in records[:max_samples]:
            response = rec.response or rec.teacher_response
            if is_vlm and response:
                batch = gm.encode_chat(processor, [rec], [rec.load_images()], path=str(path))
            elif is_vlm:
                imgs = rec.load_images()
                text = processor.apply_chat_template(gm._messages(rec.prompt, len(imgs), None), tokenize=False, add_generation_prompt=True)
                batch = dict(processor(text=[text], images=imgs, return_tensors="pt"))
            else:
                msgs = [{"role": "user", "content": rec.prompt}] + ([{"role": "assistant", "content": response}] if response else [])
                text = tok.apply_chat_template(msgs, tokenize=False) if tok.chat_template else "\n".join(m["content"] for m in msgs)
                batch = dict(tok([text], return_tensors="pt"))
            samples.append(gm.model_inputs(model, batch))
    else:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for line in lines[:max_samples]:
            batch = dict((processor if is_vlm else tok)(text=[line], return_tensors="pt"))
            if is_vlm and "mm_token_type_ids" not in batch:
                batch["mm_token_type_ids"] = torch.zeros_like(batch["input_ids"])
            samples.append(gm.model_inputs(model, batch))
    if len(samples) < MIN_CALIBRATION:
        raise PruneError(f"calibration data {path}: {len(samples)} sample(s); at least {MIN_CALIBRATION} are needed")
    return samples


def calibrator(samples: list[dict[str, torch.Tensor]]) -> Callable[[nn.Module], None]:
    """A ``calibrate(model)`` that runs every sample through the model (the compress/ hooks' convention)."""

    def calibrate(m: nn.Module) -> None:
        device = next(m.parameters()).device
        for s in samples:
            m(**{k: v.to(device) for k, v in s.items()})

    return calibrate


def parse_width(spec: str) -> dict[str, int]:
    """``"text_config.hidden_size=64,text_config.intermediate_size=160"`` -> {key: int}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise PruneError(f"--width {spec!r}: expected KEY=INT[,KEY=INT...], e.g. text_config.hidden_size=64")
        out[key.strip()] = int(value)
    if not out:
        raise PruneError(f"--width {spec!r}: no width given")
    return out


def prune_folder(
    model_dir: str | Path,
    out: str | Path,
    *,
    experts: float | None = None,
    method: str = "reap",
    drop_layers: str | None = None,
    width: str | None = None,
    calibration: str | Path | None = None,
    max_samples: int = 64,
    overwrite: bool = False,
    log: Callable = print,
) -> dict[str, Any]:
    """Prune the model in `model_dir` and save it (with its processor / tokenizer and a prune.json) to `out`."""
    from . import depth as dp
    from . import experts as ex
    from .prune import collect_importance, prune_widths

    src, dst = Path(model_dir), Path(out)
    if experts is None and drop_layers is None and width is None:
        raise PruneError("nothing to prune: give --experts, --drop-layers and/or --width")
    if experts is not None and method not in ex.METHODS:
        raise PruneError(f"--method {method!r} is unknown; use one of {list(ex.METHODS)}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise PruneError(f"--out {dst} is the input folder; write the pruned model elsewhere")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite to replace it)")
    widths = parse_width(width) if width is not None else None
    needs_data = experts is not None or widths is not None or (drop_layers is not None and drop_layers.strip().startswith("auto:"))
    if needs_data and calibration is None:
        raise PruneError("this pruning needs calibration data: pass --calibration FILE (chat JSONL or plain text)")
    model, processor, is_vlm = load_model(src)
    # cheap checks before the calibration passes
    if experts is not None:
        ex.experts_to_keep(model, experts)
    if drop_layers is not None:
        dp.parse_drop_layers(drop_layers)
    if widths is not None:
        from .prune import parse_widths

        parse_widths(model, widths)
    samples = calibration_inputs(model, processor, calibration, is_vlm=is_vlm, max_samples=max_samples) if needs_data else []
    calibrate = calibrator(samples)
    n_before = sum(p.numel() for p in model.parameters())
    report: dict[str, Any] = {"source": str(src), "calibration": str(calibration) if calibration else None, "samples": len(samples)}
    if experts is not None:
        model, report["experts"] = ex.prune_moe(model, calibrate, fraction=experts, method=method)
        log(f"experts: kept {report['experts']['num_experts'][1]} of {report['experts']['num_experts'][0]} per layer by {method}")
    if drop_layers is not None:
        model, report["depth"] = dp.drop_blocks(model, drop_layers, calibrate if samples else None)
        log(f"depth: dropped {report['depth']['dropped']}")
    if widths is not None:
        model = prune_widths(model, widths, collect_importance(model, calibrate))
        report["width"] = widths
        log(f"width: {widths}")
    report["parameters"] = [n_before, sum(p.numel() for p in model.parameters())]
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    (dst / "prune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
