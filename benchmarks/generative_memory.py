"""Peak memory of one training step: plain SFT of the student vs white-box KD with the teacher live.

    python benchmarks/generative_memory.py --vocab 151936 --batch 16

Tiny Qwen3-VL teacher (vlm-teacher) and student (vlm-student) with the real Qwen3 vocabulary size (151,936
rows), ShapesWorld chat records. Each configuration runs in a fresh process (2 warm-up steps, then 3
measured); the figure is that process's peak resident memory (CPU) or peak allocated CUDA memory (GPU),
minus the same process's memory after models and data are loaded. Configurations: SFT; KD with the loss
chunked over response positions (chunk 64); KD unchunked; KD computed on logits of the whole sequence
(what a naive implementation does: [B, T, V] for both models). Writes benchmarks/results/generative_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ensure_data, git_rev, machine, write


def peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, data: Path, vocab: int, batch: int) -> dict:
    import torch

    from mmdistill.data.records import read_records
    from mmdistill.losses.divergence import forward_kl
    from mmdistill.models import generative as gm
    from mmdistill.models.tiny import build_tiny_vlm, train_qwen_tokenizer

    torch.set_num_threads(2)
    records, _ = read_records(data / "chat_train.jsonl", "chat")
    records = records[: batch * 5]
    texts = [r.prompt + " " + r.response for r in records]
    tok = train_qwen_tokenizer(texts)
    over = {"text_config.vocab_size": vocab}
    teacher, t_proc = build_tiny_vlm(None, texts, preset="vlm-teacher", tokenizer=tok, overrides=over, image_size=128)
    student, s_proc = build_tiny_vlm(None, texts, preset="vlm-student", tokenizer=tok, overrides=over, seed=1)
    teacher.eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    images = [r.load_images() for r in records]
    batches = []
    for i in range(0, len(records), batch):
        s = gm.encode_chat(s_proc, records[i : i + batch], images[i : i + batch])
        t = gm.encode_chat(t_proc, records[i : i + batch], images[i : i + batch])
        batches.append((s, t))
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    base = peak_bytes()

    def step(s, t):
        if mode == "full-logits-kd":  # [B, T, V] from both models, masked to the response afterwards
            out = student(**gm.model_inputs(student, s))
            with torch.no_grad():
                tout = teacher(**gm.model_inputs(teacher, t))
            ls = torch.gather(out.logits, 1, s["response_positions"].unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))
            lt = torch.gather(tout.logits, 1, t["response_positions"].unsqueeze(-1).expand(-1, -1, tout.logits.shape[-1]))
            loss = forward_kl(ls, lt, s["response_mask"])
        else:
            sig = gm.forward_signals(student, s)
            loss = gm.response_ce(sig, s)
            if mode != "sft":
                with torch.no_grad():
                    tsig = gm.forward_signals(teacher, t)
                loss = loss + forward_kl(sig.logits, tsig.logits, sig.mask, chunk_size=64 if mode == "kd-chunked" else None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for s, t in batches[:2]:
        step(s, t)
    t0 = time.perf_counter()
    for s, t in batches[2:5]:
        step(s, t)
    return {"mode": mode, "peak_bytes": peak_bytes(), "loaded_bytes": base, "step_ms": 1000 * (time.perf_counter() - t0) / 3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-mem"))
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--child", default=None)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    data = ensure_data(args.out, 200)
    if args.child:
        print(json.dumps(child(args.child, data, args.vocab, args.batch)))
        return
    rows = []
    for mode in ("sft", "kd-chunked", "kd-unchunked", "full-logits-kd"):
        p = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--vocab", str(args.vocab), "--batch", str(args.batch), "--child", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    sft = rows[0]["peak_bytes"] - rows[0]["loaded_bytes"]
    md = [
        f"### Peak memory of a generative training step (vocab {args.vocab:,}, batch {args.batch})",
        "",
        f"Command: `python {' '.join(sys.argv)}` — machine: {machine()} — commit {git_rev()}",
        "",
        "| step | peak − loaded (MiB) | × SFT | ms / step |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        extra = r["peak_bytes"] - r["loaded_bytes"]
        md.append(f"| {r['mode']} | {extra / 2**20:.0f} | {extra / sft:.2f} | {r['step_ms']:.0f} |")
    md.append("")
    write(args.results, "generative_memory", {"rows": rows, "vocab": args.vocab, "batch": args.batch, "machine": machine(), "commit": git_rev()}, "\n".join(md))


if __name__ == "__main__":
    main()
