"""Load test of `mmdistill serve` on loopback: N concurrent requests, with and without micro-batching.

    python benchmarks/serve_load.py --out runs/bench-serve --requests 1000 --concurrency 200

For /v1/rerank (tiny Qwen3 seq-cls reranker `vlm-student`, one query + --docs documents per request) and
/v1/embeddings (tiny CLIPModel `clip-student`, one text per request), starts the real server
(`python -m mmdistill.cli serve`, its own process, cache off so every request reaches the model), fires
--requests requests at once (at most --concurrency in flight: 200 concurrent requests, held for long enough that
the first and last batches, which are small, weigh little), and records errors, p50/p95/p99
latency and throughput; once with micro-batching (--max-batch items, --max-wait-ms) and once with
--no-batching. Writes benchmarks/results/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import free_port, git_rev, machine, write

from mmdistill.models import contrastive as cm
from mmdistill.models import reranker as rm

WORDS = "a the small large red blue green yellow circle square triangle at top left right bottom of image shape".split()


def start_server(model_dir: Path, port: int, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mmdistill.cli", "serve", str(model_dir), "--port", str(port), "--cache-size", "0", *extra]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a long run must never block on a full pipe
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start within 180 s")


async def fire(url: str, bodies: list[dict], concurrency: int, timeout: float) -> tuple[list[float], int, float, list[str]]:
    """(latencies s, errors, wall s, first error messages) of all bodies sent at once (bounded in flight)."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(body):
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                        return
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*[one(b) for b in bodies])
        wall = time.perf_counter() - t0
    return lat, len(errors), wall, errors[:3]


async def fire_raw(url: str, bodies: list[dict], concurrency: int, timeout: float) -> tuple[list[float], int, float, list[str]]:
    """As `fire`, through a minimal HTTP/1.1 client on asyncio streams (one connection per request, bodies
    serialised before the clock starts): a few times less CPU per request than httpx, so that on a machine
    the server shares with its load generator the generator is not what limits the throughput."""
    import json
    from urllib.parse import urlsplit

    u = urlsplit(url)
    payloads = [json.dumps(b).encode() for b in bodies]
    head = f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Type: application/json\r\nConnection: close\r\n"
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    errors: list[str] = []

    async def one(data: bytes):
        async with sem:
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(u.hostname, u.port), timeout)
                writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
                raw = await asyncio.wait_for(reader.read(-1), timeout)  # the server closes after the answer
                writer.close()
            except (OSError, asyncio.TimeoutError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0
            if status != 200:
                errors.append(f"{status} {raw[-200:]!r}")
                return
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[one(d) for d in payloads])
    return lat, len(errors), time.perf_counter() - t0, errors[:3]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sentence(rng, lo=3, hi=10) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def model_timing(rr_dir: Path, docs: int, rng, requests: int = 16, rounds: int = 5) -> dict:
    """The reranker's model thread alone, in this process (1 thread): ms per request of `requests` requests scored one
    at a time and as one batch, with the shared-prefix forward off and on (best of `rounds`; new queries every round,
    so a request's query is never in the prefix cache, as under load)."""
    import torch

    from mmdistill.serve.backends import PairIn, load_backend

    torch.set_num_threads(1)
    scorer = load_backend(rr_dir, threads=1)
    inst = "Given a query, retrieve relevant documents."
    out = {}
    for share in (False, True):
        scorer.reranker.share_prefix = share
        for mode in ("one request at a time", "one batch"):
            best = float("inf")
            for _ in range(rounds + 1):  # the first round warms up
                reqs = [[PairIn(inst, f"{rng.integers(1 << 30)} " + sentence(rng), None, sentence(rng), None) for _ in range(docs)] for _ in range(requests)]
                calls = reqs if mode == "one request at a time" else [[p for r in reqs for p in r]]
                t0 = time.perf_counter()
                for c in calls:
                    scorer.score_counted(c)
                best = min(best, time.perf_counter() - t0)
            out[f"{'shared prefix' if share else 'whole prompts'}, {mode}"] = best * 1000 / requests
    return {"requests": requests, "docs": docs, "ms_per_request": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-serve"))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=200, help="requests in flight at most")
    ap.add_argument("--docs", type=int, default=4, help="documents per rerank request")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="server intra-op threads (see the note in the table)")
    ap.add_argument("--repeats", type=int, default=2, help="load phases per mode, alternating between the modes")
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw", help="load generator: a minimal asyncio HTTP client (raw) or httpx")
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

    payload_model = model_timing(rr_dir, args.docs, rng)

    workloads = {
        "/v1/rerank": (rr_dir, lambda i: {"query": f"{i} " + sentence(rng), "documents": [sentence(rng) for _ in range(args.docs)]}),
        "/v1/embeddings": (clip_dir, lambda i: {"input": f"{i} " + sentence(rng)}),
    }
    common = ["--threads", str(args.threads)]
    modes = {"micro-batching": [*common, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)], "one request at a time": [*common, "--no-batching"]}
    payload: dict = {"model_timing": payload_model, "client": args.client, "machine": machine(), "commit": git_rev(), "threads": args.threads, "load_average_start": round(os.getloadavg()[0], 2), "requests": args.requests, "concurrency": args.concurrency, "docs": args.docs, "runs": []}
    for endpoint, (model_dir, make) in workloads.items():
        # both servers up at once; the load alternates between them (A B A B ...) so that the machine's other
        # load hits both modes alike
        servers = {}
        try:
            for mode, extra in modes.items():
                port = free_port()
                servers[mode] = (port, start_server(model_dir, port, extra))
                asyncio.run(fire(f"http://127.0.0.1:{port}{endpoint}", [make(-1 - i) for i in range(8)], 8, args.timeout))  # warm-up
            for rep in range(args.repeats):
                for mode, (port, server) in servers.items():
                    bodies = [make(i + rep * args.requests) for i in range(args.requests)]
                    server_cpu0, client_cpu0 = cpu_s(server.pid), time.process_time()
                    send = fire_raw if args.client == "raw" else fire
                    lat, errors, wall, first = asyncio.run(send(f"http://127.0.0.1:{port}{endpoint}", bodies, args.concurrency, args.timeout))
                    server_cpu, client_cpu = cpu_s(server.pid) - server_cpu0, time.process_time() - client_cpu0
                    ms = np.array(lat) * 1000
                    run = {
                        "endpoint": endpoint, "mode": mode, "repeat": rep, "errors": errors, "first_errors": first, "ok": len(lat), "wall_s": wall,
                        "throughput_rps": len(lat) / wall if wall else 0.0,
                        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None, "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
                        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
                        # CPU time per request: the server process (all threads) and this load generator
                        "server_cpu_ms_per_request": server_cpu * 1000 / args.requests, "client_cpu_ms_per_request": client_cpu * 1000 / args.requests,
                    }
                    payload["runs"].append(run)
                    print(run, flush=True)
            for mode, (port, _) in servers.items():
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                calls = sum(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("mmdistill_batch_size_count"))
                items = sum(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("mmdistill_batch_size_sum"))
                for run in payload["runs"]:
                    if run["endpoint"] == endpoint and run["mode"] == mode:
                        run["mean_batch_items"] = items / calls if calls else None  # over all repeats (and the warm-up)
        finally:
            for _, server in servers.values():
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    server.kill()
    payload["seconds"] = round(time.time() - t_start)
    payload["load_average_end"] = round(os.getloadavg()[0], 2)
    md = [
        f"### Serving under load: {args.concurrency} concurrent requests on loopback ({args.requests} in all), with and without micro-batching",
        "",
        f"Command: `python benchmarks/serve_load.py --out runs/bench-serve --requests {args.requests} --concurrency {args.concurrency} --threads {args.threads} --repeats {args.repeats} --client {args.client}` — machine: {payload['machine']} "
        f"(server and load generator share it; the server runs {args.threads} intra-op thread(s)) — commit {payload['commit']} — {payload['seconds']} s — 1-min load average {payload['load_average_start']} at the start, {payload['load_average_end']} at the end",
        "",
        "Threads: 1 by default: on 2 cores, a second torch intra-op thread competes with the server's event loop and the load "
        "generator (and, when other jobs load the machine, spin-waits for a preempted core).",
        "",
        f"Tiny models (seq-cls reranker `vlm-student`, CLIP `clip-student`), result cache off. Rerank: 1 query + {args.docs} documents per request; "
        f"embeddings: 1 text per request. Micro-batching: up to {args.max_batch} items per model call, {args.max_wait_ms:g} ms wait. "
        "The reranker server runs a model call's common prompt prefix once (the system prompt and instruction, and the query "
        "when one request's documents are alone in the call) in both modes (`Reranker.share_prefix`). "
        f"All {args.requests} requests are sent at once (at most {args.concurrency} in flight); latency is per request, send to answer.",
        "",
        "Server CPU ms per request: CPU time (user + system, all threads) the server process spent during the phase, divided by the "
        f"requests; client CPU: the same for this load generator ({'a minimal HTTP/1.1 client on asyncio streams, one connection per request' if args.client == 'raw' else 'httpx'}), which runs on the same 2 cores. Throughput is capped by whichever "
        "of the two runs out of CPU first; the server CPU per request is what micro-batching changes.",
        "",
        "| endpoint | mode | repeat | errors | p50 ms | p95 ms | p99 ms | throughput req/s | items per model call | throughput vs one at a time (same repeat) | server CPU ms / request | server CPU vs one at a time | client CPU ms / request |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["endpoint"], r["mode"], r["repeat"]): r for r in payload["runs"]}
    fmt = lambda x: "—" if x is None else f"{x:.1f}"
    for r in payload["runs"]:
        one = by[(r["endpoint"], "one request at a time", r["repeat"])]
        md.append(f"| {r['endpoint']} | {r['mode']} | {r['repeat'] + 1} | {r['errors']} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {r['throughput_rps']:.1f} | {fmt(r.get('mean_batch_items'))} | {r['throughput_rps'] / one['throughput_rps']:.2f}× "
                  f"| {r['server_cpu_ms_per_request']:.2f} | {r['server_cpu_ms_per_request'] / one['server_cpu_ms_per_request']:.2f}× | {r['client_cpu_ms_per_request']:.2f} |")
    mt = payload["model_timing"]
    md += ["", f"The reranker's model calls alone (`score_counted` in one process, 1 thread, {mt['requests']} requests of 1 query + {mt['docs']} documents, new queries each round, best of 5; ms per request):", "",
           "| prompt | one request at a time | one batch of all | batch vs one at a time |", "| --- | --- | --- | --- |"]
    for kind in ("whole prompts", "shared prefix"):
        one, batch = mt["ms_per_request"][f"{kind}, one request at a time"], mt["ms_per_request"][f"{kind}, one batch"]
        md.append(f"| {kind} | {one:.2f} | {batch:.2f} | {one / batch:.2f}× |")
    md.append("")
    for endpoint in workloads:
        ratios = sorted(r["throughput_rps"] / by[(endpoint, "one request at a time", r["repeat"])]["throughput_rps"] for r in payload["runs"] if r["endpoint"] == endpoint and r["mode"] == "micro-batching")
        if ratios:
            payload.setdefault("median_speedup", {})[endpoint] = float(np.median(ratios))
            md.append(f"{endpoint}: micro-batching gives **{np.median(ratios):.2f}×** the throughput of one request at a time (median of {len(ratios)} repeats; range {ratios[0]:.2f}-{ratios[-1]:.2f}×).")
    write(args.results, "serve_load", payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
