"""ONNX Runtime against eager PyTorch: latency at batch 1 and 32 and parity, for the exported CLIP and rerankers;
latency per generated token and greedy parity for the exported generative students (Qwen3-VL, Qwen3 causal LM).

    python benchmarks/onnx_vs_eager.py --out runs/bench-onnx

Builds the tiny student architectures (CLIPModel `clip-student`: 2+2 layers, width 64; Qwen3 seq-cls and
Qwen3-VL yes/no rerankers `vlm-student`: 2 layers, width 64) with random weights (latency and parity do not
depend on training), exports each with `mmdistill export --int8`, then times eager PyTorch, ORT fp32 and ORT
int8 on the same preprocessed inputs, side by side in one process with the same thread count. The generative
students (Qwen3-VL, Qwen3-VL-MoE and Qwen2.5-VL `vlm-student`: 2 decoder layers, width 64, 1 vision block; the text-only
Qwen3ForCausalLM of the same widths) are built with a wider random init (std 0.2) so that their greedy tokens follow the prompt, and are
timed on held-out ShapesWorld questions (64 px images): prefill (vision + first decoder call) and each cached step,
eager `generate` against the ORT runner.
Writes benchmarks/results/onnx_vs_eager.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import git_rev, machine, write

from mmdistill.data import synth
from mmdistill.evaluate.bench import measure_latency
from mmdistill.export import onnx as ox
from mmdistill.models import contrastive as cm
from mmdistill.models import reranker as rm
from mmdistill.models.tiny import train_qwen_tokenizer

WORDS = "a the small large red blue green yellow circle square triangle at top left right bottom of image shape".split()


def sentences(n: int, rng, lo=4, hi=14) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def compare(fns: dict, bs: int, rounds: int = 5) -> dict[str, float]:
    """Median ms of each fn, timed in interleaved rounds (eager, fp32, int8, eager, ...) so that load from
    other processes on a shared machine hits every variant alike; the median over the rounds' medians."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(measure_latency(fn, warmup=2, repeats=10 if bs == 1 else 3)["median_ms"])
    return {f"{k}_ms": float(np.median(v)) for k, v in out.items()}


def load_average() -> float:
    import os

    return round(os.getloadavg()[0], 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-onnx"))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and onnxruntime alike")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    rng = np.random.default_rng(0)
    corpus = sentences(400, rng) + [rm.SYSTEM_PROMPT, "<Instruct>: <Query>: <Document>: yes no"]
    rows, payload = [], {"machine": machine(), "commit": git_rev(), "threads": args.threads, "models": {}, "load_average_start": load_average()}

    # ------------------------------------------------------------------ CLIP
    clip_dir = args.out / "clip-student"
    if not (clip_dir / "config.json").is_file():
        cm.build_tiny_clip(clip_dir, corpus, preset="clip-student", image_size=64, patch_size=8)
    ox.export_onnx(clip_dir, args.out / "clip-student-onnx", int8=True, overwrite=True, log=lambda *_: None)
    model, proc = cm.load_model(str(clip_dir))
    model.eval()
    runners = {"fp32": ox.load_onnx(args.out / "clip-student-onnx", threads=args.threads)[0], "int8": ox.load_onnx(args.out / "clip-student-onnx", int8=True, threads=args.threads)[0]}
    from PIL import Image

    for bs in (1, 32):
        images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(bs)]
        pv = cm.preprocess_images(proc, images)
        t = cm.preprocess_texts(proc, sentences(bs, rng))
        with torch.inference_mode():
            ref = (cm.encode_images(model, pv), cm.encode_texts(model, t["input_ids"], t["attention_mask"]))

        def eager():
            with torch.inference_mode():
                cm.encode_images(model, pv)
                cm.encode_texts(model, t["input_ids"], t["attention_mask"])

        fns = {"eager": eager} | {v: (lambda r=r: (r.encode_images(pv), r.encode_texts(t["input_ids"], t["attention_mask"]))) for v, r in runners.items()}
        entry = compare(fns, bs)
        for v, r in runners.items():
            got = (r.encode_images(pv), r.encode_texts(t["input_ids"], t["attention_mask"]))
            entry[f"{v}_max_abs_diff"] = max(float((g - w).abs().max()) for g, w in zip(got, ref))
        payload["models"][f"clip bs{bs}"] = entry
        rows.append(("CLIP student (image + text encoder)", bs, entry))

    # ------------------------------------------------------------------ rerankers
    tok = train_qwen_tokenizer(corpus, vocab_size=1000)
    for kind in ("seq_cls", "yesno"):
        d = args.out / f"reranker-{kind}"
        if not (d / "config.json").is_file():
            rm.build_tiny_reranker(d, corpus, kind=kind, preset="vlm-student", tokenizer=tok)
        ox.export_onnx(d, args.out / f"reranker-{kind}-onnx", task=kind, int8=True, overwrite=True, log=lambda *_: None)
        eager_rr = rm.load_reranker(str(d), kind=kind)
        eager_rr.model.eval()
        onnx_rr = {"fp32": ox.load_onnx(args.out / f"reranker-{kind}-onnx", threads=args.threads)[0], "int8": ox.load_onnx(args.out / f"reranker-{kind}-onnx", int8=True, threads=args.threads)[0]}
        from mmdistill.data.records import parse_record

        for bs in (1, 32):
            rec = parse_record({"query": {"text": sentences(1, rng)[0]}, "documents": [{"text": s} for s in sentences(bs, rng)]}, "rerank")
            batch, _ = eager_rr.encode([rec])  # [bs, L] left padded: the pairs of one query
            batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                ref = eager_rr.forward(batch)[0]

            def eager():
                with torch.inference_mode():
                    eager_rr.forward(batch)

            entry = compare({"eager": eager} | {v: (lambda r=r: r.forward(batch)) for v, r in onnx_rr.items()}, bs)
            entry["seq_len"] = int(batch["input_ids"].shape[1])
            for v, r in onnx_rr.items():
                entry[f"{v}_max_abs_diff"] = float((r.forward(batch)[0] - ref).abs().max())
            payload["models"][f"{kind} bs{bs}"] = entry
            name = "seq-cls reranker (Qwen3)" if kind == "seq_cls" else "yes/no reranker (Qwen3-VL, text path)"
            rows.append((name, bs, entry))

    # ------------------------------------------------------------------ generative students (chat path)
    gen_rows = generative(args, corpus, payload)

    payload["seconds"] = round(time.time() - t_start)
    payload["load_average_end"] = load_average()
    md = [
        "### ONNX Runtime vs eager PyTorch (tiny student architectures, random weights)",
        "",
        f"Command: `python benchmarks/onnx_vs_eager.py --out runs/bench-onnx --threads {args.threads}` — machine: {payload['machine']}, onnxruntime CPU, "
        f"{args.threads} threads for both — commit {payload['commit']} — {payload['seconds']} s — 1-min load average "
        f"{payload['load_average_start']} at the start, {payload['load_average_end']} at the end (the machine is shared; variants are timed in interleaved rounds)",
        "",
        "Threads: 1 by default because this 2-core machine is shared (other jobs keep its load average near 6): there, torch with 2 intra-op "
        "threads spin-waits for a preempted core, and in probes ran many times slower than with 1 thread.",
        "",
        "Median latency of one forward over a preprocessed batch (reranker: one query's pairs, left padded; "
        "the yes/no reranker's prompt carries the system prompt, so its pairs are longer). "
        "Max abs diff against eager on the same batch (CLIP: embeddings; rerankers: scores).",
        "",
        "| model | batch | eager ms | ORT fp32 ms | speed-up | ORT int8 ms | speed-up | fp32 max abs diff | int8 max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, bs, e in rows:
        md.append(f"| {name} | {bs} | {e['eager_ms']:.2f} | {e['fp32_ms']:.2f} | {e['eager_ms'] / e['fp32_ms']:.2f}× | {e['int8_ms']:.2f} | {e['eager_ms'] / e['int8_ms']:.2f}× | {e['fp32_max_abs_diff']:.1e} | {e['int8_max_abs_diff']:.1e} |")
    md += [
        "",
        f"Generative students (chat path: ORT greedy runner with the KV cache against eager `generate`, batch 1, {GEN_PROMPTS} held-out ShapesWorld "
        f"questions, {GEN_STEPS} new tokens each, no stop token). Prefill: the vision graph (VL) and the first decoder call over the prompt "
        f"({', '.join(str(n) for n in gen_rows[0][1]['prompt_tokens'])} tokens for the Qwen3-VL student with its 4 image tokens); step: one cached decoder call (eager: (generate of "
        f"{GEN_STEPS} tokens − generate of 1) / {GEN_STEPS - 1}). Parity from the export's own check (`mmdistill export` on 8 other generated ShapesWorld questions, {GEN_STEPS} greedy steps each; the Omni thinker's on 9, in turn with the image and a tone clip, the clip only, the image only): tokens identical = prompts whose {GEN_STEPS} tokens all equal eager's; logits diff = max over the prefill and the cached steps while both sides decode the same prefix (up to the first differing token). "
        "The int8 graphs (ORT dynamic quantization of every MatMul) often leave eager's greedy path within the 16 tokens on these random-weight students (init std 0.2; see the int8 tokens-identical column): timed here, not recommended for them.",
        "",
        "| model | eager prefill ms | ORT fp32 prefill ms | eager ms / step | ORT fp32 ms / step | speed-up / step | ORT int8 ms / step | fp32 tokens identical | fp32 logits max abs diff | int8 tokens identical | int8 logits max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in gen_rows:
        md.append(
            f"| {name} | {e['eager_prefill_ms']:.2f} | {e['fp32_prefill_ms']:.2f} | {e['eager_step_ms']:.2f} | {e['fp32_step_ms']:.2f} | {e['eager_step_ms'] / e['fp32_step_ms']:.2f}× | "
            f"{e['int8_step_ms']:.2f} | {e['fp32_tokens_identical']} | {e['fp32_logits_max_abs_diff']:.1e} | {e['int8_tokens_identical']} | {e['int8_logits_max_abs_diff']:.1e} |"
        )
    write(args.results, "onnx_vs_eager", payload, "\n".join(md) + "\n")


GEN_STEPS = 16
GEN_PROMPTS = 4


def generative(args, corpus: list[str], payload: dict) -> list:
    """Export the Qwen3-VL and Qwen3 causal-LM students, check greedy parity, time prefill and cached steps."""
    from mmdistill.export import onnx_generative as og
    from mmdistill.models.generative import load_vlm
    from mmdistill.models.tiny import build_tiny_lm, build_tiny_vlm

    items, images = og.generated_chat(GEN_PROMPTS, 11, 64)
    rows = []
    kinds = (
        ("qwen3_vl", "Qwen3-VL student (vision + decoder, KV cache)"),
        ("qwen3_vl_moe", "Qwen3-VL-MoE student (4 experts, top 2; batched_mm in the graph)"),
        ("qwen2_5_vl", "Qwen2.5-VL student (vision + decoder, KV cache)"),
        ("causal_lm", "Qwen3 causal LM student (decoder, KV cache)"),
        ("qwen3_omni_thinker", "Qwen3-Omni thinker student (vision + audio + MoE decoder, KV cache; image + 2 s clip per prompt)"),
    )
    rate = 16000
    t = np.arange(2 * rate) / rate
    clip = (0.1 * (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 1320 * t))).astype(np.float32)  # 2 s: two audio chunks
    for kind, label in kinds:
        d = args.out / f"gen-{kind}"
        if not (d / "config.json").is_file():
            qa = [f"{q['prompt']} {q['response']}" for i in range(200) for q in synth.questions(synth.scene_for_index(0, i))]
            tok = train_qwen_tokenizer(corpus + qa, vocab_size=1000)
            if kind != "causal_lm":
                wide = {"text_config.initializer_range": 0.2} | ({"audio_config.initializer_range": 0.2} if kind == "qwen3_omni_thinker" else {})
                build_tiny_vlm(d, corpus, kind=kind, preset="vlm-student", tokenizer=tok, overrides=wide)
            else:
                build_tiny_lm(d, corpus, preset="vlm-student", tokenizer=tok, overrides={"initializer_range": 0.2})
        manifest = ox.export_onnx(d, args.out / f"gen-{kind}-onnx", int8=True, overwrite=True, gen_steps=GEN_STEPS, log=lambda *_: None)
        model, _ = load_vlm(str(d))
        model.eval()
        runners = {v: ox.load_onnx(args.out / f"gen-{kind}-onnx", int8=(v == "int8"), threads=args.threads)[0] for v in ("fp32", "int8")}
        first = runners["fp32"]
        pad = first.tokenizer.pad_token_id
        clips = [clip] if kind == "qwen3_omni_thinker" else []
        encoded = [first.encode(og._messages(it["prompt"], 0 if kind == "causal_lm" else 1, len(clips)), [] if kind == "causal_lm" else im, clips) for it, im in zip(items, images)]

        def eager(n):
            return lambda: [og.eager_generate(model, enc, n, [], pad) for enc in encoded]

        def ort(r, n):
            return lambda: [r.generate(enc, n, eos_ids=[]) for enc in encoded]

        fns = {"eager_1": eager(1), "eager_n": eager(GEN_STEPS)} | {f"{v}_{k}": ort(r, n) for v, r in runners.items() for k, n in (("1", 1), ("n", GEN_STEPS))}
        t = compare(fns, 1, rounds=3)
        entry: dict = {}
        for v in ("eager", "fp32", "int8"):
            entry[f"{v}_prefill_ms"] = t[f"{v}_1_ms"] / GEN_PROMPTS
            entry[f"{v}_step_ms"] = (t[f"{v}_n_ms"] - t[f"{v}_1_ms"]) / (GEN_PROMPTS * (GEN_STEPS - 1))
        for v in ("fp32", "int8"):
            par = manifest["parity"][v]
            entry[f"{v}_tokens_identical"] = par["tokens_identical"]
            entry[f"{v}_logits_max_abs_diff"] = max(par["prefill_logits_max_abs_diff"], par["step_logits_max_abs_diff"])
        entry["export_parity"] = manifest["parity"]
        entry["export_latency"] = manifest["latency"]
        entry["prompt_tokens"] = [int(e["input_ids"].shape[1]) for e in encoded]
        payload["models"][f"generate {kind}"] = entry
        rows.append((label, entry))
    return rows


if __name__ == "__main__":
    main()
