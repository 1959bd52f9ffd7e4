"""Soak test of `mmdistill serve`: mixed traffic with a share of bad requests for a fixed time; server RSS over time.

    python benchmarks/serve_soak.py --out runs/bench-serve --minutes 4

Two real servers on loopback (tiny seq-cls reranker and tiny CLIP, API key on, cache on), --workers clients
sending rerank and embeddings requests back to back; --bad of them are bad (malformed JSON, unknown model,
empty documents, top_n too large, a document over max_length, bad base64, a non-image, a decompression bomb, an
oversized body, no API key),
each with the status it must get. Records every answer whose status is not the expected one, and the servers'
resident memory (VmRSS) every few seconds. Writes benchmarks/results/serve_soak.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import time
from pathlib import Path

import httpx
import numpy as np
from common import free_port, git_rev, machine, write
from serve_load import sentence, start_server

from mmdistill.models import contrastive as cm
from mmdistill.models import reranker as rm

KEY = "soak-key"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bomb_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")  # ~40 KB that decode to 36 M pixels (> the server's 16.7 M)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-serve"))
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--bad", type=float, default=0.05, help="share of bad requests")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    t_start = time.time()
    rng = np.random.default_rng(0)
    corpus = [sentence(rng) for _ in range(400)] + [rm.SYSTEM_PROMPT]
    rr_dir, clip_dir = args.out / "reranker-seq_cls", args.out / "clip-student"
    if not (rr_dir / "config.json").is_file():
        rm.build_tiny_reranker(rr_dir, corpus, kind="seq_cls", preset="vlm-student")
    if not (clip_dir / "config.json").is_file():
        cm.build_tiny_clip(clip_dir, corpus, preset="clip-student", image_size=64, patch_size=8)
    extra = ["--threads", str(args.threads), "--api-key", KEY, "--max-body-mb", "1"]
    ports = {"rerank": free_port(), "embeddings": free_port()}
    servers = {"rerank": start_server(rr_dir, ports["rerank"], extra), "embeddings": start_server(clip_dir, ports["embeddings"], extra)}
    url = {k: f"http://127.0.0.1:{p}/v1/{k}" for k, p in ports.items()}
    auth = {"Authorization": f"Bearer {KEY}"}
    bomb = bomb_url()
    not_image = "data:image/png;base64," + base64.b64encode(b"this is text, not a picture").decode()
    # (endpoint, kwargs for httpx.post, expected status)
    bad_cases = [
        ("rerank", dict(content=b'{"query": "a", "documents": [', headers={**auth, "content-type": "application/json"}), 400),
        ("rerank", dict(json={"model": "gpt-4", "query": "a", "documents": ["b"]}, headers=auth), 404),
        ("rerank", dict(json={"query": "a", "documents": []}, headers=auth), 400),
        ("rerank", dict(json={"query": "a", "documents": ["b", "c"], "top_n": 5}, headers=auth), 400),
        ("rerank", dict(json={"query": "a", "documents": ["b"]}), 401),
        ("rerank", dict(json={"query": "a", "documents": ["b", "word " * 2000]}, headers=auth), 400),  # a pair over max_length
        ("embeddings", dict(json={"input": ["data:image/png;base64,@@not-base64@@"]}, headers=auth), 400),
        ("embeddings", dict(json={"input": [not_image]}, headers=auth), 400),
        ("embeddings", dict(json={"input": [bomb]}, headers=auth), 400),
        ("embeddings", dict(content=b'{"input": "' + b"x" * (2 * 1024 * 1024) + b'"}', headers={**auth, "content-type": "application/json"}), 413),
        ("embeddings", dict(json={"input": [{"image": "https://example.com/a.png"}]}, headers=auth), 400),
    ]
    stats = {"good": 0, "bad": 0, "good_failed": 0, "bad_wrong_status": 0, "by_case": {}}
    wrong: list[str] = []
    rss: dict[str, list[tuple[float, float]]] = {k: [] for k in servers}
    deadline = time.time() + args.minutes * 60

    async def worker(wid: int):
        r = random.Random(wid)
        async with httpx.AsyncClient(timeout=60) as client:
            while time.time() < deadline:
                if r.random() < args.bad:
                    i = r.randrange(len(bad_cases))
                    ep, kwargs, want = bad_cases[i]
                    resp = await client.post(url[ep], **kwargs)
                    stats["bad"] += 1
                    stats["by_case"][i] = stats["by_case"].get(i, 0) + 1
                    if resp.status_code != want or "error" not in resp.json():
                        stats["bad_wrong_status"] += 1
                        wrong.append(f"case {i}: got {resp.status_code}, want {want}")
                    continue
                n = r.randrange(1 << 30)
                if r.random() < 0.5:
                    body = {"query": f"{n % 5000} a red circle", "documents": [f"{(n >> k) % 3000} blue square" for k in range(4)]}
                    resp = await client.post(url["rerank"], json=body, headers=auth)
                else:
                    resp = await client.post(url["embeddings"], json={"input": f"{n % 20000} a green triangle"}, headers=auth)
                stats["good"] += 1
                if resp.status_code != 200:
                    stats["good_failed"] += 1
                    wrong.append(f"good request: {resp.status_code} {resp.text[:120]}")

    async def sampler():
        while time.time() < deadline:
            for k, s in servers.items():
                rss[k].append((time.time() - t_load, rss_mb(s.pid)))
            await asyncio.sleep(5)

    async def run():
        await asyncio.gather(sampler(), *[worker(w) for w in range(args.workers)])

    try:
        t_load = time.time()
        asyncio.run(run())
        load_s = time.time() - t_load
        alive = {k: s.poll() is None for k, s in servers.items()}
        health = {k: httpx.get(f"http://127.0.0.1:{ports[k]}/health").status_code for k in servers}
    finally:
        for s in servers.values():
            s.terminate()
            try:
                s.wait(timeout=20)
            except Exception:
                s.kill()
    summary = {}
    for k, samples in rss.items():
        t, m = np.array([x for x, _ in samples]), np.array([y for _, y in samples])
        half = len(m) // 2
        summary[k] = {"first_mb": float(m[0]), "max_mb": float(m.max()), "last_mb": float(m[-1]),
                      "slope_mb_per_min_second_half": float(np.polyfit(t[half:] / 60, m[half:], 1)[0]) if len(m) - half >= 3 else None}
    payload = {"machine": machine(), "commit": git_rev(), "minutes": args.minutes, "workers": args.workers, "bad_share": args.bad,
               "load_s": load_s, "stats": stats, "wrong": wrong[:20], "rss": summary, "rss_samples": rss, "alive": alive, "health": health,
               "seconds": round(time.time() - t_start)}
    total = stats["good"] + stats["bad"]
    md = [
        f"### Serving soak: {args.minutes:g} minutes of mixed traffic with {100 * args.bad:g}% bad requests",
        "",
        f"Command: `python benchmarks/serve_soak.py --out runs/bench-serve --minutes {args.minutes:g}` — machine: {payload['machine']} "
        f"(servers and clients share it; servers run {args.threads} intra-op thread(s)) — commit {payload['commit']} — {payload['seconds']} s",
        "",
        f"{args.workers} clients send rerank (1 query + 4 documents) and embeddings (1 text) requests back to back to two servers "
        f"(tiny seq-cls reranker and CLIP, API key on, result cache on); {len(bad_cases)} kinds of bad request (malformed JSON, unknown model, "
        "empty documents, top_n too large, no API key, a document over max_length, bad base64, a non-image, a decompression bomb, a 2 MB body over a 1 MB limit, a remote URL).",
        "",
        f"- Requests: {total} ({total / load_s:.1f}/s), {stats['bad']} bad; good requests that failed: **{stats['good_failed']}**; "
        f"bad requests answered with another status than expected: **{stats['bad_wrong_status']}**; both servers alive and healthy at the end: "
        f"{all(alive.values()) and all(v == 200 for v in health.values())}.",
        "",
        "| server | RSS first sample MB | max MB | last MB | slope over the second half, MB/min |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, s in summary.items():
        slope = "—" if s["slope_mb_per_min_second_half"] is None else f"{s['slope_mb_per_min_second_half']:+.2f}"
        md.append(f"| {k} | {s['first_mb']:.1f} | {s['max_mb']:.1f} | {s['last_mb']:.1f} | {slope} |")
    write(args.results, "serve_soak", payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
