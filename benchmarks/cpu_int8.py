"""CPU int8 against fp32, by backend: is any maintained int8 path >= 2x faster than fp32 on this CPU (issue 14)?

    python benchmarks/cpu_int8.py --out runs/bench-int8 [--reranker runs/pipeline-bench/pipeline/heal/model]

Backends, each on the same inputs, timed in interleaved rounds (fp32, int8 a, int8 b, ..., fp32, ...) so that load
from other jobs on this shared machine hits every variant alike; 1 intra-op thread for torch and onnxruntime:

- torch fp32 eager (the reference);
- torchao 0.18 ``Int8DynamicActivationInt8WeightConfig`` and ``Int8WeightOnlyConfig`` (what `mmdistill quantize` uses);
- ``torch.ao.quantization.quantize_dynamic`` (fbgemm / x86 int8 kernels with VNNI; deprecated in favour of torchao
  but still in torch 2.14): Linear layers only, applied in memory at load time (its packed weights do not save to
  safetensors);
- onnxruntime fp32 and dynamic int8 (``mmdistill export --int8``), for the reranker's text path (the only graph of
  these models that exports; images and generation stay in torch).

Models: (1) a matmul-bound block, two Linear 1024x1024 over 128 tokens: where int8 kernels can win; (2) the yes/no
reranker student (tiny Qwen3-VL, text path, one query with 20 documents, and 1 document) -- the pipeline's healed
student when --reranker is given, else the `vlm-student` preset with random weights; (3) the generative student
(tiny Qwen3-VL `vlm-student`, random weights), one prefill forward over 1 and 8 prompts with an image each.
Accuracy: max abs difference of the output (scores / logits) against fp32.
Writes benchmarks/results/cpu_int8.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import git_rev, machine, write
from torch import nn

from mmdistill.evaluate.bench import measure_latency

warnings.filterwarnings("ignore")


def compare(fns: dict, rounds: int = 5, repeats: int = 5) -> dict[str, float]:
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(measure_latency(fn, warmup=1, repeats=repeats)["median_ms"])
    return {k: float(np.median(v)) for k, v in out.items()}


def torchao_variants(model: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    out = {}
    for name, cfg in (("torchao int8-dynamic", Int8DynamicActivationInt8WeightConfig()), ("torchao int8-weight", Int8WeightOnlyConfig())):
        m = copy.deepcopy(model)
        emb = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
        quantize_(m, cfg, filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and (emb is None or mod.weight is not emb.weight))
        out[name] = m
    return out


def ao_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "x86"
    m = copy.deepcopy(model)
    emb = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
    if emb is not None:  # a head tied to the embeddings stays fp32 (as torchao's configs leave it)
        head = m.get_output_embeddings()
        skip = {n for n, mod in m.named_modules() if mod is head}
        spec = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n not in skip}
        return quantize_dynamic(m, spec, dtype=torch.qint8)
    return quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-int8"))
    ap.add_argument("--reranker", type=Path, default=None, help="a trained yes/no reranker folder (default: vlm-student, random weights)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0, t0 = os.getloadavg()[0], time.time()
    rows: list[dict] = []

    def record(model_name: str, batch: str, fns: dict, outputs: dict | None = None) -> None:
        ms = compare(fns)
        ref = ms["torch fp32"]
        for k, v in ms.items():
            rows.append({"model": model_name, "batch": batch, "backend": k, "ms": v, "speedup": ref / v, "max_abs_diff": (outputs or {}).get(k)})
        print(model_name, batch, {k: round(v, 2) for k, v in ms.items()}, flush=True)

    # (1) matmul-bound block
    block = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024)).eval()
    x = torch.randn(128, 1024)
    variants = {"torch fp32": block, **torchao_variants(block), "torch.ao dynamic int8 (x86)": ao_dynamic(block)}
    with torch.inference_mode():
        ref = block(x)
        diffs = {k: float((m(x) - ref).abs().max()) for k, m in variants.items()}
    record("2 x Linear 1024 (matmul-bound)", "128 tokens", {k: (lambda m=m: torch.inference_mode()(m)(x)) for k, m in variants.items()}, diffs)

    # (1b) a causal LM at Qwen3-Reranker-0.6B's width (hidden 1024, MLP 3072, 16 heads), 2 of its 28 layers, random
    # weights: 20 query-document pairs of 64 tokens, the work of one reranker query at a real model's width
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=1000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    wide = Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 1000, (20, 64))
    wide_variants = {"torch fp32": wide, **torchao_variants(wide), "torch.ao dynamic int8 (x86)": ao_dynamic(wide)}
    with torch.inference_mode():
        ref = wide(input_ids=ids).logits[:, -1]
        diffs = {k: float((m(input_ids=ids).logits[:, -1] - ref).abs().max()) for k, m in wide_variants.items()}
    record("Qwen3 causal LM at 0.6B width (2 layers, random)", "20 pairs x 64 tokens", {k: (lambda m=m: torch.inference_mode()(m)(input_ids=ids)) for k, m in wide_variants.items()}, diffs)
    del wide, wide_variants

    # (2) the reranker student, text path (+ ONNX)
    from mmdistill.data.records import parse_record
    from mmdistill.export import onnx as ox
    from mmdistill.models import reranker as rm
    from mmdistill.models.tiny import train_qwen_tokenizer

    rng = np.random.default_rng(0)
    words = "a the small large red blue green yellow circle square triangle at top left right bottom of image shape".split()

    def sentences(n):
        return [" ".join(rng.choice(words, size=int(rng.integers(4, 14)))) for _ in range(n)]

    rr_dir = args.reranker
    if rr_dir is None:
        rr_dir = args.out / "reranker-yesno"
        if not (rr_dir / "config.json").is_file():
            tok = train_qwen_tokenizer(sentences(400) + [rm.SYSTEM_PROMPT, "<Instruct>: <Query>: <Document>: yes no"], vocab_size=1000)
            rm.build_tiny_reranker(rr_dir, [], kind="yesno", preset="vlm-student", tokenizer=tok)
    onnx_dir = args.out / "reranker-onnx"
    ox.export_onnx(rr_dir, onnx_dir, task="yesno", int8=True, overwrite=True, log=lambda *_: None)
    ort = {"onnxruntime fp32": ox.load_onnx(onnx_dir, threads=args.threads)[0], "onnxruntime dynamic int8": ox.load_onnx(onnx_dir, int8=True, threads=args.threads)[0]}
    rr = rm.load_reranker(str(rr_dir), kind="yesno")
    rr.model.eval()
    rr_variants = {"torch fp32": rr.model, **torchao_variants(rr.model), "torch.ao dynamic int8 (x86)": ao_dynamic(rr.model)}
    for n in (1, 20):
        rec = parse_record({"query": {"text": sentences(1)[0]}, "documents": [{"text": s} for s in sentences(n)]}, "rerank")
        batch, _ = rr.encode([rec])
        batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
        fns, outs = {}, {}
        for k, m in rr_variants.items():
            r = rm.Reranker(m, rr.processor, kind=rr.kind, max_length=rr.max_length)
            fns[k] = lambda r=r: torch.inference_mode()(r.forward)(batch)
            with torch.inference_mode():
                outs[k] = r.forward(batch)[0]
        for k, r in ort.items():
            fns[k] = lambda r=r: r.forward(batch)
            outs[k] = r.forward(batch)[0]
        diffs = {k: float((v - outs["torch fp32"]).abs().max()) for k, v in outs.items()}
        record(f"yes/no reranker student ({'trained' if args.reranker else 'random'}, text path)", f"1 query x {n} docs", fns, diffs)

    # (3) the generative student, prefill
    from PIL import Image

    from mmdistill.models import generative as gm
    from mmdistill.models.tiny import build_tiny_vlm

    gen_dir = args.out / "vlm-student"
    if not (gen_dir / "config.json").is_file():
        build_tiny_vlm(gen_dir, sentences(400), kind="qwen3_vl", preset="vlm-student")
    model, proc = gm.load_vlm(str(gen_dir))
    model.eval()
    gen_variants = {"torch fp32": model, **torchao_variants(model), "torch.ao dynamic int8 (x86)": ao_dynamic(model)}
    for n in (1, 8):
        imgs = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
        texts = [proc.apply_chat_template(gm._messages(s, 1, None), tokenize=False, add_generation_prompt=True) for s in sentences(n)]
        inputs = gm.model_inputs(model, dict(proc(text=texts, images=imgs, padding=True, return_tensors="pt")))
        fns, outs = {}, {}
        for k, m in gen_variants.items():
            fns[k] = lambda m=m: torch.inference_mode()(m)(**inputs)
            with torch.inference_mode():
                outs[k] = m(**inputs).logits
        diffs = {k: float((v - outs["torch fp32"]).abs().max()) for k, v in outs.items()}
        record("generative student (Qwen3-VL vlm-student, prefill)", f"{n} prompt(s) + image", fns, diffs)

    seconds = round(time.time() - t0)
    load1 = os.getloadavg()[0]
    md = [
        "### CPU int8 against fp32, by backend (issue 14: int8 ≥ 2× faster than fp32)",
        "",
        f"Command: `python benchmarks/cpu_int8.py --out {args.out}" + (f" --reranker {args.reranker}" if args.reranker else "") + f"` — machine: {machine()} "
        f"(AVX-512 VNNI), {args.threads} intra-op thread(s) for torch and onnxruntime — commit {git_rev()} — {seconds} s — 1-min load average "
        f"{load0:.1f} at the start, {load1:.1f} at the end (shared machine: variants timed in interleaved rounds, median of 5 rounds' medians)",
        "",
        "| model | batch | backend | ms | speed-up vs torch fp32 | max abs diff vs fp32 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        diff = f"{r['max_abs_diff']:.1e}" if r["max_abs_diff"] is not None else "—"
        md.append(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['ms']:.2f} | {r['speedup']:.2f}× | {diff} |")
    write(args.results, "cpu_int8", {"rows": rows, "machine": machine(), "commit": git_rev(), "seconds": seconds, "load": [load0, load1]}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
