"""Side by side against TRL on the same work: off-policy logit distillation of a tiny Qwen3 text student.

    pip install -e '.[bench]'      # TRL, for this benchmark only
    python benchmarks/trl_compare.py --out runs/bench-trl [--n 1500] [--teacher-steps 600] [--steps 150] [--batch 16] [--rounds 2]

The task: ShapesWorld's questions as text (`data.synth.generate_text_chat`: the scene's caption stands in for the image,
the answer is the short VQA answer). A tiny Qwen3ForCausalLM teacher (the vlm-teacher text widths) is trained on it with
mmdistill (SFT), then one student initialisation (the vlm-student widths, saved once) is distilled three ways with the
same records, batch, steps, optimizer and learning-rate schedule, objective and threads:

  (a) mmdistill from the teacher store (`teacher cache`, top-k ids + tail, fp16; no teacher weights loaded),
  (b) mmdistill with the live teacher,
  (c) TRL's GKDTrainer (trl.experimental.gkd; TRL 1.13's stable DistillationTrainer is on-policy only) with λ = 0
      (no student generation), β = 0 (forward KL(teacher ‖ student)), seq_kd off, its live teacher.

The objective is the same: forward KL per response token at temperature 1 (GKD's loss takes no temperature), averaged
over the response tokens (the answer and its closing <|im_end|>). TRL's ChatML collator labels everything after the
prompt, so its tokenizer gets a chat template that writes nothing after the last turn's <|im_end|>; the benchmark checks
that TRL's labelled tokens and mmdistill's response tokens are identical on every training record. TRL gets the same
AdamW parameter groups, betas and warm-up + cosine schedule through `optimizers=`, gradient clipping 1.0, fp32, no
gradient checkpointing (TRL's default is on; mmdistill has it off), no checkpoints during the run. Only the data order
differs (each library shuffles with its own sampler).

Throughput is the steady-state samples/s of the training steps (steps after the first 5; forward, backward, optimizer,
per-step logging), timed the same way for all three; runs are interleaved (a, c, b per round) so that the shared
machine's load hits them alike. Quality: the final training KD loss as each run logged it, and on held-out records,
computed by one function for all three students: the dense forward KL to the live teacher, teacher-forced token
accuracy, and exact match of greedy answers. Writes benchmarks/results/trl_compare.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from common import git_rev, machine, write

from mmdistill import api
from mmdistill.config import recipe_from_dict
from mmdistill.data.records import read_records
from mmdistill.data.synth import generate_text_chat
from mmdistill.models.tiny import CHAT_TEMPLATE, build_tiny_lm

WARM = 5  # steps left out of the steady-state throughput

# The tiny models' chat template, except that the last turn ends at its <|im_end|>: TRL's ChatML collator labels every
# token after the prompt, so this makes its labelled span the answer + <|im_end|>, exactly mmdistill's response tokens.
# (Tokens after the last labelled one cannot change any logit before it, so the loss is the same function.)
TRL_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{- '<|im_end|>\n' -}}", "{{- '<|im_end|>' -}}{%- if not loop.last or add_generation_prompt -%}{{- '\n' -}}{%- endif -%}"
)


def recipe(args, name: str, **parts) -> dict:
    d = {
        "family": "generative",
        "output_dir": str(args.out / name),
        "seed": 0,
        "data": {"train": str(args.out / "data/chat_train.jsonl"), "val": str(args.out / "data/chat_test.jsonl"), "max_length": args.max_length},
        "student": {"init": "pretrained", "model": str(args.out / "student-init")},
        "loss": {"terms": {"kd": {"weight": 1.0, "options": {"divergence": "forward_kl", "temperature": 1.0}}}},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup_steps": args.warmup, "log_every": 1,
                  "save_every": args.steps, "keep_last": 1, "threads": args.threads},
        "eval": {"max_items": args.eval_items, "max_new_tokens": 8, "latency": False},
    }
    d.update(parts)
    return d


def steady(step_seconds: list[float], batch: int) -> float:
    tail = step_seconds[WARM:] or step_seconds
    return batch * len(tail) / sum(tail)


# ----------------------------------------------------------------------------- the three runs


def run_mmdistill(args, name: str, teacher: dict) -> dict:
    from mmdistill.recipes import generative as gr

    r = recipe_from_dict(recipe(args, name, teacher=teacher))
    t = time.perf_counter()
    gr.run(r, overwrite=True, log=lambda *_: None, evaluate_after=False)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (Path(r.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [args.batch / row["samples_per_s"] for row in rows]
    return {"model": str(Path(r.output_dir) / "model"), "loss": [row["kd"] for row in rows], "step_seconds": steps,
            "samples_per_s": steady(steps, args.batch), "wall_seconds": wall}


def trl_examples(records) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.response}]} for r in records]


def check_same_tokens(args, records) -> int:
    """TRL's labelled tokens (its ChatML collator, TRL_TEMPLATE) == mmdistill's response tokens, record by record."""
    from transformers import AutoTokenizer
    from trl.experimental.utils import DataCollatorForChatML

    from mmdistill.models import generative as gm

    tok = AutoTokenizer.from_pretrained(args.out / "teacher/model")
    trl_tok = AutoTokenizer.from_pretrained(args.out / "teacher/model")
    trl_tok.chat_template = TRL_TEMPLATE
    collate = DataCollatorForChatML(tokenizer=trl_tok, max_length=args.max_length)
    for i in range(0, len(records), 64):
        part = records[i : i + 64]
        ours = gm.encode_chat(tok, part, [[] for _ in part], max_length=args.max_length)
        theirs = collate(trl_examples(part))
        for b, rec in enumerate(part):
            mine = ours["response_ids"][b][ours["response_mask"][b]].tolist()
            lab = theirs["labels"][b]
            got = lab[lab != -100].tolist()
            if mine != got:
                raise SystemExit(f"chat_train.jsonl:{rec.line}: TRL labels {tok.decode(got)!r}, mmdistill {tok.decode(mine)!r}: not the same objective")
    return len(records)


def run_trl(args, name: str, records) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from mmdistill.engine.loop import param_groups
    from mmdistill.engine.schedules import warmup_cosine

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    out = args.out / name
    student = AutoModelForCausalLM.from_pretrained(args.out / "student-init")
    teacher = AutoModelForCausalLM.from_pretrained(args.out / "teacher/model")
    tok = AutoTokenizer.from_pretrained(args.out / "teacher/model")
    tok.chat_template = TRL_TEMPLATE
    cfg = GKDConfig(
        output_dir=str(out), lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, max_length=args.max_length,
        max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    opt = torch.optim.AdamW(param_groups(student, 0.05), lr=args.lr, betas=(0.9, 0.98))  # mmdistill's defaults
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, args.warmup, args.steps))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.last, self.seconds = None, []

        def on_step_begin(self, a, state, control, **kw):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    timer = StepTimer()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=Dataset.from_list(trl_examples(records)),
                         processing_class=tok, optimizers=(opt, sched), callbacks=[timer])
    trainer.train()
    wall = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    student.save_pretrained(out / "model")
    AutoTokenizer.from_pretrained(args.out / "teacher/model").save_pretrained(out / "model")  # the ordinary template
    return {"model": str(out / "model"), "loss": losses, "step_seconds": timer.seconds,
            "samples_per_s": steady(timer.seconds, args.batch), "wall_seconds": wall}


# ----------------------------------------------------------------------------- one evaluation for every student


@torch.no_grad()
def heldout(args, model_dir: str, records, teacher) -> dict:
    """Dense forward KL to the teacher and teacher-forced token accuracy on held-out records, then exact match of
    greedy answers (evaluate_folder); the same code for every student."""
    from mmdistill.evaluate.generative import evaluate_folder
    from mmdistill.losses.divergence import forward_kl
    from mmdistill.models import generative as gm

    model, proc = gm.load_vlm(model_dir)
    model.eval()
    kl_sum = correct = count = 0.0
    for i in range(0, len(records), 32):
        part = records[i : i + 32]
        batch = gm.encode_chat(proc, part, [[] for _ in part], max_length=args.max_length)
        s, t = gm.forward_signals(model, batch), gm.forward_signals(teacher, batch)
        n = float(s.mask.sum())
        kl_sum += float(forward_kl(s.logits, t.logits, s.mask)) * n
        correct += float(((s.logits.argmax(-1) == batch["response_ids"]) & s.mask).sum())
        count += n
    ev = evaluate_folder(model_dir, args.out / "data/chat_test.jsonl", max_items=args.eval_items, latency=False, max_new_tokens=8)
    return {"heldout_kd": kl_sum / count, "token_accuracy": 100 * correct / count, "exact_match": ev["metrics"]["exact_match"], "items": ev["items"]}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-trl"))
    ap.add_argument("--n", type=int, default=1500, help="ShapesWorld scenes (train 80%%, up to 3 questions each)")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=150, help="student steps, every run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=64, help="the store's kept ids per token")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (a, c, b) for the timing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every run (1: on a shared CPU, multi-threaded ops stall on the other jobs)")
    ap.add_argument("--eval-items", type=int, default=200)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    import trl

    from mmdistill.models import generative as gm
    from mmdistill.recipes import generative as gr
    from mmdistill.teachers.cache import cache_teacher
    from mmdistill.teachers.store import inspect

    if not (args.out / "data/summary.json").is_file():
        generate_text_chat(args.out / "data", n=args.n, seed=0)
    records, _ = read_records(args.out / "data/chat_train.jsonl", "chat")
    test, _ = read_records(args.out / "data/chat_test.jsonl", "chat")
    test = test[: args.eval_items]

    # the teacher: a tiny Qwen3 text model trained with mmdistill (SFT), reused when already trained
    t_recipe = recipe_from_dict(recipe(args, "teacher", student={"init": "tiny", "arch": "qwen3", "preset": "vlm-teacher"},
                                       loss={"terms": {"sft": {"weight": 1.0}}},
                                       train={"max_steps": args.teacher_steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": 30, "save_every": args.teacher_steps, "threads": args.threads}))
    if not api.is_finished(t_recipe):
        gr.run(t_recipe, overwrite=True, log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(args.out / "teacher/model")
    if not (args.out / "student-init/config.json").is_file():
        build_tiny_lm(args.out / "student-init", [], preset="vlm-student", tokenizer=tok, seed=1)
    teacher, _ = gm.load_vlm(str(args.out / "teacher/model"))
    teacher.eval()
    n_params = {"teacher": sum(p.numel() for p in teacher.parameters())}
    init, _ = gm.load_vlm(str(args.out / "student-init"))
    n_params["student"] = sum(p.numel() for p in init.parameters())
    del init
    checked = check_same_tokens(args, records)
    print(f"TRL's labelled tokens == mmdistill's response tokens on all {checked} training records", flush=True)

    # the store: written once (its cost is reported, not part of the training throughput)
    store = args.out / f"store-top{args.top_k}"
    t = time.perf_counter()
    cache_teacher(recipe_from_dict(recipe(args, "cache", teacher={"model": str(args.out / "teacher/model")})), store, top_k=args.top_k, dtype="fp16", log=lambda *_: None)
    cache_seconds = time.perf_counter() - t
    info = inspect(store)

    runs: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    for r in range(args.rounds):
        runs["a"].append(run_mmdistill(args, f"mmdistill-store-r{r}", {"kind": "store", "path": str(store)}))
        print(f"round {r} (a) mmdistill from the store: {runs['a'][-1]['samples_per_s']:.1f} samples/s", flush=True)
        runs["c"].append(run_trl(args, f"trl-gkd-r{r}", records))
        print(f"round {r} (c) TRL GKD, live teacher: {runs['c'][-1]['samples_per_s']:.1f} samples/s", flush=True)
        runs["b"].append(run_mmdistill(args, f"mmdistill-live-r{r}", {"model": str(args.out / "teacher/model")}))
        print(f"round {r} (b) mmdistill, live teacher: {runs['b'][-1]['samples_per_s']:.1f} samples/s", flush=True)
    ratios = [a["samples_per_s"] / c["samples_per_s"] for a, c in zip(runs["a"], runs["c"])]

    evals = {"teacher": heldout(args, str(args.out / "teacher/model"), test, teacher), "student init": heldout(args, str(args.out / "student-init"), test, teacher)}
    for key in "abc":
        evals[key] = heldout(args, runs[key][0]["model"], test, teacher)
        print(key, evals[key], flush=True)

    names = {"a": "(a) mmdistill, from the store", "b": "(b) mmdistill, live teacher", "c": "(c) TRL GKDTrainer (λ=0, β=0), live teacher"}
    rows = {}
    for key in "abc":
        sps = [x["samples_per_s"] for x in runs[key]]
        loss = runs[key][0]["loss"]
        rows[key] = {"name": names[key], "samples_per_s": sps, "median_samples_per_s": statistics.median(sps),
                     "wall_seconds": [x["wall_seconds"] for x in runs[key]], "final_kd": statistics.mean(loss[-10:]), **evals[key]}

    # one plot: the training KD loss of each run (round 0), per step
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in zip("abc", ("-", "--", ":")):
        loss = runs[key][0]["loss"]
        ax.plot(range(1, len(loss) + 1), loss, style, label=names[key], linewidth=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training KD loss (forward KL per response token)")
    ax.set_title(f"Distilling a tiny Qwen3 text student, batch {args.batch}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.results.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.results / "trl_compare.png", dpi=120)

    med = statistics.median(ratios)
    verdict = "met" if med >= 1.5 else f"missed by {1.5 - med:.2f}"
    lines = [
        "### Against TRL on the same work (a tiny Qwen3 text student, off-policy logit KD)",
        "",
        f"Command: `pip install -e '.[bench]' && python {' '.join(sys.argv)}` — machine: {machine()}, shared with other jobs "
        f"(timings are noisy; the runs were interleaved a, c, b in each of {args.rounds} rounds) — TRL {trl.__version__} — commit {git_rev()}",
        "",
        f"Task: ShapesWorld's questions as text (`generate_text_chat`, {args.n} scenes: {len(records)} training records, "
        f"{len(test)} held-out records scored). Teacher: Qwen3ForCausalLM {n_params['teacher'] / 1e6:.2f}M parameters, "
        f"{args.teacher_steps} SFT steps with mmdistill. Student: Qwen3ForCausalLM {n_params['student'] / 1e6:.2f}M parameters, one "
        f"initialisation for every run. Every run: {args.steps} steps × batch {args.batch}, AdamW lr {args.lr} (warm-up {args.warmup}, cosine), "
        f"forward KL per response token at T = 1, fp32, torch threads: {args.threads}. The store: top-{args.top_k} ids + tail, fp16, "
        f"{info['bytes_per_token']:.0f} bytes per response token, written in {cache_seconds:.1f} s (once, not in the throughput). "
        f"TRL's labelled tokens were checked identical to mmdistill's response tokens on all {checked} training records.",
        "",
        "| run | samples/s (each round) | median | final KD loss (training, last 10 steps) | held-out KD (dense, vs teacher) | token accuracy | exact match |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {v['name']} | {', '.join(f'{x:.1f}' for x in v['samples_per_s'])} | {v['median_samples_per_s']:.1f} | {v['final_kd']:.4f} | "
          f"{v['heldout_kd']:.4f} | {v['token_accuracy']:.1f}% | {v['exact_match']:.1f}% |" for v in rows.values()],
        *[f"| {name} | — | — | — | {evals[name]['heldout_kd']:.4f} | {evals[name]['token_accuracy']:.1f}% | {evals[name]['exact_match']:.1f}% |" for name in ("teacher", "student init")],
        "",
        f"**Throughput ratio (a) ÷ (c), mmdistill from the store ÷ TRL with its live teacher: {med:.2f}×** (median of the rounds: "
        f"{', '.join(f'{x:.2f}' for x in ratios)}; target ≥ 1.5: {verdict}). mmdistill with the live teacher ÷ TRL: "
        f"{statistics.median(rows['b']['samples_per_s']) / statistics.median(rows['c']['samples_per_s']):.2f}×.",
        "",
        f"(b) and (c) start from one initialisation, draw the same batches (both samplers are `torch.randperm` seeded with 0) "
        f"and take the same optimizer steps, so they follow one trajectory: their held-out KD differs by "
        f"{abs(rows['b']['heldout_kd'] - rows['c']['heldout_kd']):.1e} and their training losses by at most "
        f"{max(abs(x - y) for x, y in zip(runs['b'][0]['loss'], runs['c'][0]['loss'])):.1e} per step (float32 rounding): "
        "the same work, done at different speeds. (a) departs from them only through the store's sparse top-k form.",
        "",
        "Samples/s: steady state (steps after the first 5), forward + backward + optimizer + per-step logging, timed alike. "
        "The training KD loss of (a) is the store's sparse form (kept ids + one tail bucket; at most the dense loss at T = 1); "
        "the held-out KD is the dense forward KL to the live teacher computed by one function for all students. Exact match: "
        "greedy answers (8 new tokens) against the reference answer, `mmdistill eval`'s scorer. "
        "Loss curves (round 0): `benchmarks/results/trl_compare.png`.",
        "",
        "![loss curves](benchmarks/results/trl_compare.png)",
        "",
    ]
    payload = {"rows": rows, "ratios": ratios, "median_ratio": med, "teacher": evals["teacher"], "student_init": evals["student init"],
               "losses": {k: runs[k][0]["loss"] for k in "abc"}, "store": {"folder": str(store), "cache_seconds": cache_seconds, **{k: info[k] for k in ("records", "bytes_per_record", "bytes_per_token")}},
               "params": n_params, "checked_records": checked, "machine": machine(), "commit": git_rev(), "trl": trl.__version__,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    write(args.results, "trl_compare", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
