"""Compression side by side: a tiny Qwen3-VL-MoE and its expert-pruned, depth-pruned and quantized versions.

    python benchmarks/compress_bench.py --out runs/compress_bench

One run builds the model (randomly initialised; see below), makes every variant through the same
library calls the CLI uses, saves each as a folder, reloads it with plain transformers and measures
parameters, weight bytes on disk, CPU latency (batch 1 and batch 8, full forward) and agreement of
the response-token predictions with the original on held-out ShapesWorld chat records (top-1
agreement and mean KL(original || variant) per token).

The model is not trained (a ShapesWorld-trained MoE teacher and healing by distillation are later
work). Its router weights are drawn with std 0.1 instead of the init's 0.02 so that routing is
peaked and uneven across experts, as in a trained router; the agreement figures say how much of the
original's function each step keeps, not task accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_rev, machine, write  # noqa: E402

from mmdistill import api  # noqa: E402
from mmdistill.compress.apply import calibration_inputs, calibrator  # noqa: E402
from mmdistill.compress.depth import drop_blocks  # noqa: E402
from mmdistill.compress.experts import METHODS, moe_blocks, prune_moe  # noqa: E402
from mmdistill.compress.quantize import folder_size, quantize_folder  # noqa: E402
from mmdistill.data.records import read_records  # noqa: E402
from mmdistill.evaluate.bench import count_parameters, measure_latency  # noqa: E402
from mmdistill.models import generative as gm  # noqa: E402
from mmdistill.models.tiny import build_tiny_vlm, train_qwen_tokenizer  # noqa: E402

SIZE = {  # text 4 layers x 16 experts (top-4) of width 256 on a 256-wide residual stream; the teacher preset's vision tower
    "text_config.hidden_size": 256,
    "text_config.num_experts": 16,
    "text_config.num_experts_per_tok": 4,
    "text_config.moe_intermediate_size": 256,
    "text_config.intermediate_size": 512,
    "vision_config.out_hidden_size": 256,
}


def build(out: Path, data: Path) -> Path:
    rows = [json.loads(line) for line in (data / "chat_train.jsonl").read_text().splitlines()]
    tok = train_qwen_tokenizer([r["prompt"] for r in rows] + [r["response"] for r in rows])
    model, proc = build_tiny_vlm(None, [], kind="qwen3_vl_moe", preset="vlm-teacher", tokenizer=tok, seed=0, overrides=SIZE)
    torch.manual_seed(1)
    with torch.no_grad():
        for block in moe_blocks(model).values():
            block.gate.weight.normal_(0, 0.1)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def load(path: Path, **kw):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, **kw).eval()


@torch.no_grad()
def agreement(model, reference: list[torch.Tensor], batches: list[dict]) -> dict[str, float]:
    """Top-1 agreement (%) and mean KL(original || model) over the held-out response tokens."""
    agree = kl = n = 0.0
    for ref, batch in zip(reference, batches):
        sig = gm.forward_signals(model, batch)
        mask = sig.mask.bool()
        lo, lv = torch.log_softmax(ref.float(), -1), torch.log_softmax(sig.logits.float(), -1)  # [B, R, V]
        agree += (lo.argmax(-1) == lv.argmax(-1))[mask].sum().item()
        kl += (lo.exp() * (lo - lv)).sum(-1)[mask].sum().item()
        n += mask.sum().item()
    return {"top1_agreement": 100 * agree / n, "kl": kl / n, "tokens": int(n)}


def latency(model, batch: dict) -> float:
    inputs = gm.model_inputs(model, batch)
    with torch.no_grad():
        return measure_latency(lambda: model(**inputs), warmup=1, repeats=3)["min_ms"]  # best of 3: the least disturbed by other load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/compress_bench"))
    ap.add_argument("--n", type=int, default=300, help="ShapesWorld images to generate")
    ap.add_argument("--calibration", type=int, default=32, help="calibration records (train split), one forward pass each")
    ap.add_argument("--heldout", type=int, default=24, help="held-out records (test split) for agreement")
    ap.add_argument("--gptq-samples", type=int, default=128, help="train chat records GPTQ calibrates on (when gptqmodel is installed)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    load_before = os.getloadavg()[0]
    out = args.out
    data = out / "data"
    if not (data / "summary.json").is_file():
        api.synth(data, n=args.n, seed=0)
    original = build(out / "original", data)
    model = load(original)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(original)

    test, _ = read_records(data / "chat_test.jsonl", "chat")
    test = test[: args.heldout]
    batches = [gm.encode_chat(proc, test[i : i + 4], [r.load_images() for r in test[i : i + 4]]) for i in range(0, len(test), 4)]
    one = gm.encode_chat(proc, test[:1], [test[0].load_images()])
    with torch.no_grad():
        reference = [gm.forward_signals(model, b).logits for b in batches]
    samples = calibration_inputs(model, proc, data / "chat_train.jsonl", is_vlm=True, max_samples=args.calibration)
    calibrate = calibrator(samples)

    variants: list[tuple[str, Path, dict]] = [("original (fp32, grouped_mm experts)", original, {}), ("original (fp32, eager experts)", original, {"experts_implementation": "eager"})]
    notes: dict[str, dict] = {}
    print(f"built and calibrated in {time.time() - t0:.0f} s", flush=True)
    for method in METHODS:
        pruned, info = prune_moe(model, calibrate, fraction=0.5, method=method)
        path = out / f"experts-{method}"
        pruned.save_pretrained(path)
        variants.append((f"experts 50% ({method})", path, {}))
        notes[method] = {i: list(v) for i, v in info["kept"].items()}
    shallow, info = drop_blocks(model, "auto:text:1", calibrate)
    shallow.save_pretrained(out / "depth")
    variants.append((f"depth -25% (text layer {info['dropped']['text'][0]} dropped)", out / "depth", {}))
    notes["depth"] = info
    for method in ("int8-dynamic", "int8-weight", "int4-weight"):
        quantize_folder(original, out / method, method, overwrite=True)
        variants.append((method, out / method, {}))

    # the same text widths without experts (a dense Qwen3-VL, as the reranker / generative students): does int8 pay off there?
    dense, dproc = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-teacher", tokenizer=proc.tokenizer, seed=0,
                                  overrides={k: v for k, v in SIZE.items() if "experts" not in k and "moe" not in k} | {"text_config.intermediate_size": 1024})
    dense.save_pretrained(out / "dense")
    dproc.save_pretrained(out / "dense")
    variants.append(("dense Qwen3-VL (fp32)", out / "dense", {}))
    for method in ("int8-dynamic", "int8-weight", "int4-weight", "bnb-int8", "bnb-nf4"):  # bnb-*: bitsandbytes (Linear layers only, so not the MoE's experts)
        quantize_folder(out / "dense", out / f"dense-{method}", method, overwrite=True)
        variants.append((f"dense Qwen3-VL {method}", out / f"dense-{method}", {}))
    try:  # GPTQ (GPTQModel, the `gptq` extra): the same 4 bits as int4-weight's round-to-nearest, placed by calibration
        import gptqmodel  # noqa: F401

        quantize_folder(out / "dense", out / "dense-gptq-int4", "gptq-int4", overwrite=True, calibration=data / "chat_train.jsonl", max_samples=args.gptq_samples)
        variants.append(("dense Qwen3-VL gptq-int4", out / "dense-gptq-int4", {"device_map": "cpu"}))
    except ImportError:
        print("gptqmodel is not installed (pip install -e '.[gptq]'): no gptq-int4 row", flush=True)
    print(f"variants made in {time.time() - t0:.0f} s", flush=True)
    gptq_info = json.loads((out / "dense-gptq-int4" / "quantize.json").read_text()) if any(n == "dense Qwen3-VL gptq-int4" for n, _, _ in variants) else {}
    rows = []
    for name, path, kw in variants:
        m = load(path, **kw)
        if name.startswith("dense Qwen3-VL ("):
            with torch.no_grad():  # the dense model's own reference
                reference = [gm.forward_signals(m, b).logits for b in batches]
        row = {
            "variant": name,
            # GPTQ's packed weights are buffers (int32 qweight, 8 four-bit values each): count the weights they hold
            "params": count_parameters(m) + sum(8 * b.numel() for n, b in m.named_buffers() if n.endswith(".qweight")),
            "bytes": folder_size(path),
            "bs1_ms": latency(m, one),
            "bs4_ms": latency(m, batches[0]),
            **agreement(m, reference, batches),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base, eager = rows[0], rows[1]
    for r in rows:
        r["kl"] = max(r["kl"], 0.0)  # -1e-9 from rounding when the two are the same model
    elapsed = time.time() - t0
    load_note = f"1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    cmd = "python benchmarks/compress_bench.py --out runs/compress_bench"
    md = [
        "### Compression side by side: tiny Qwen3-VL-MoE (experts, depth, int8/int4, bitsandbytes, GPTQ)",
        "",
        f"Command: `{cmd}` — machine: {machine()} — commit {git_rev()} — {elapsed:.0f} s ({load_note})",
        "",
        f"Model: Qwen3VLMoeForConditionalGeneration, text 4 layers × 16 experts (top-4, width 256, hidden 256), vision 2 blocks; "
        f"random init with router std 0.1 (peaked routing, no training). Calibration: {len(samples)} ShapesWorld train chat records, "
        f"one forward each. Agreement: response tokens of {len(test)} held-out test records ({rows[0]['tokens']} tokens) against "
        f"the original (the dense rows: against the dense fp32 model). Latency: best of 3 full forwards (ms), batch 1 "
        f"({one['input_ids'].shape[1]} tokens with 1 image) and batch 4. "
        "Quantized models run transformers' eager experts loop (torchao's tensors do not go through grouped_mm), so their speed "
        "compares with the eager row.",
        "",
        "| variant | params | weights on disk | size vs fp32 | bs1 ms | bs4 ms | top-1 agreement % | KL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    q = {r["variant"]: r for r in rows}
    for r in rows:
        fp32 = q["dense Qwen3-VL (fp32)"] if r["variant"].startswith("dense") else base
        md.append(
            f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['bytes'] / 2**20:.1f} MiB | {100 * r['bytes'] / fp32['bytes']:.0f}% | "
            f"{r['bs1_ms']:.1f} | {r['bs4_ms']:.1f} | {r['top1_agreement']:.1f} | {r['kl']:.4f} |"
        )
    md += [
        "",
        f"- int8-dynamic vs fp32, MoE (eager experts): {eager['bs1_ms'] / q['int8-dynamic']['bs1_ms']:.2f}× at bs1, "
        f"{eager['bs4_ms'] / q['int8-dynamic']['bs4_ms']:.2f}× at bs4; dense: "
        f"{q['dense Qwen3-VL (fp32)']['bs1_ms'] / q['dense Qwen3-VL int8-dynamic']['bs1_ms']:.2f}× at bs1, "
        f"{q['dense Qwen3-VL (fp32)']['bs4_ms'] / q['dense Qwen3-VL int8-dynamic']['bs4_ms']:.2f}× at bs4 (target ≥ 2×; above 1 = faster).",
        f"- int4-weight size: {100 * q['int4-weight']['bytes'] / base['bytes']:.0f}% of fp32 (target ≤ 30%; on CPU torchao 0.18 stores "
        "int4 values one per byte, so it is the int8 size).",
        "- Kept experts shared between methods (of 8 × 4 layers): "
        + ", ".join(f"{a} & {b} {sum(len(set(notes[a][i]) & set(notes[b][i])) for i in notes[a])}" for a, b in (("frequency", "reap"), ("frequency", "reconstruction"), ("reap", "reconstruction")))
        + ".",
        f"- bnb-nf4 (bitsandbytes, 4 bits packed two a byte) on the dense model: {100 * q['dense Qwen3-VL bnb-nf4']['bytes'] / q['dense Qwen3-VL (fp32)']['bytes']:.0f}% "
        f"of fp32 on disk (torchao int8-weight {100 * q['dense Qwen3-VL int8-weight']['bytes'] / q['dense Qwen3-VL (fp32)']['bytes']:.0f}%); "
        "the embeddings and the vision patch convolution stay fp32 under every method.",
        *([f"- gptq-int4 (GPTQModel, group size {gptq_info.get('group_size')}, "
           f"calibrated on {gptq_info.get('calibration_samples')} train chat records) "
           f"against torchao's round-to-nearest int4-weight on the dense model: top-1 agreement {q['dense Qwen3-VL gptq-int4']['top1_agreement']:.1f}% vs "
           f"{q['dense Qwen3-VL int4-weight']['top1_agreement']:.1f}%, KL {q['dense Qwen3-VL gptq-int4']['kl']:.4f} vs {q['dense Qwen3-VL int4-weight']['kl']:.4f}; "
           f"{100 * q['dense Qwen3-VL gptq-int4']['bytes'] / q['dense Qwen3-VL (fp32)']['bytes']:.0f}% vs "
           f"{100 * q['dense Qwen3-VL int4-weight']['bytes'] / q['dense Qwen3-VL (fp32)']['bytes']:.0f}% of fp32 on disk. GPTQModel "
           "packs 8 four-bit values an int32 and saves the rest of the model (embeddings, norms, vision tower) in bfloat16, which it also "
           "computes in, with its int4 CPU kernel (TorchCpuAvx512Linear on this machine): its size, speed and agreement are of that "
           "bf16 + int4 model, not of int4 alone."] if "dense Qwen3-VL gptq-int4" in q else
          ["- gptq-int4: not measured in this run (gptqmodel not installed)."]),
        "- Expert pruning and depth pruning are not healed here (an untrained model); healed on a trained ShapesWorld MoE: "
        "benchmarks/moe_prune_heal.py.",
    ]
    payload = {"command": cmd, "machine": machine(), "load": load_note, "commit": git_rev(), "seconds": elapsed, "rows": rows, "kept": notes}
    write(args.results, "compress", payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
