"""Load test for qlora-serve (`stages.cli.serve`): requests/s, texts/s and latency percentiles per concurrency.

    python benchmarks/load_test.py --serve news=models/export --concurrency 1,8,32
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --adapter news --concurrency 16

--serve starts `python -m stages.cli.serve` on a free loopback port (and stops it at the end); --url
uses a server that is already running. Each concurrency level runs that many users, each sending
one request after another on its own connection, until --requests requests or --duration-s
seconds, whichever comes first; the users are spread over --processes client processes. The texts
cycle through a CSV's `text` column (AG News test rows by default). Texts per forward pass come
from the server's /metrics, counted over the level. Runs on CPU and GPU servers alike.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, log_file) -> tuple[subprocess.Popen, str]:
    """`python -m stages.cli.serve` on loopback; returns once /healthz answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "stages.cli.serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms)]
    cmd += [a for spec in args.serve for a in ("--adapter", spec)]
    cmd += ["--base", args.base] if args.base else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_file.seek(0)
            sys.exit(f"server exited with status {proc.returncode}:\n{log_file.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    sys.exit(f"server did not answer /healthz within {args.startup_timeout_s} s")


def counters(client: httpx.Client, adapter: str) -> tuple[float, float]:
    """(texts, forward passes) the server has run for `adapter` so far."""
    text = client.get("/metrics").text

    def value(name: str) -> float:
        m = re.search(rf'^{name}{{adapter="{re.escape(adapter)}"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("qlora_serve_texts_total"), value("qlora_serve_batches_total")


async def users(url: str, adapter: str, texts: list[str], per_request: int, concurrency: int,
                max_requests: int, start_at: float, duration_s: float,
                offset: int) -> tuple[list[float], int]:
    """`concurrency` users, each sending one request after another from `start_at` (wall clock)
    on; returns the latencies in seconds and the error count."""
    starts = itertools.cycle(range(0, len(texts) - per_request + 1, per_request))
    for _ in range(offset):
        next(starts)
    latencies: list[float] = []
    errors = sent = 0

    async def user() -> None:
        nonlocal errors, sent
        # One client (one connection) per user: one httpx pool shared by many concurrent
        # requests slows down until it, not the server, is what gets measured.
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            await client.get("/healthz")  # connect before the clock starts: a burst of new
            await asyncio.sleep(max(0.0, start_at - time.time()))  # connections is not the load
            while sent < max_requests and time.time() < start_at + duration_s:
                sent += 1  # claimed before awaiting, so the users never overshoot max_requests
                start = next(starts)
                t0 = time.perf_counter()
                r = await client.post("/v1/classify", json={"adapter": adapter,
                                                            "texts": texts[start:start + per_request]})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return latencies, errors


def client_process(url: str, adapter: str, texts: list[str], per_request: int, concurrency: int,
                   max_requests: int, start_at: float, duration_s: float,
                   offset: int) -> tuple[list[float], int, float]:
    """One load-generating process: latencies, error count and when it finished."""
    latencies, errors = asyncio.run(users(url, adapter, texts, per_request, concurrency,
                                          max_requests, start_at, duration_s, offset))
    return latencies, errors, time.time()


def run_level(pool: ProcessPoolExecutor, processes: int, url: str, adapter: str, texts: list[str],
              per_request: int, concurrency: int, max_requests: int, duration_s: float) -> dict[str, float]:
    """Spread the users and the request budget over the client processes: one Python process
    tops out at a few hundred requests/s, below what a GPU server answers."""
    n = min(processes, concurrency)
    shares = [(concurrency // n + (i < concurrency % n), max_requests // n + (i < max_requests % n))
              for i in range(n)]
    start_at = time.time() + 1.0  # time for every user to connect
    futures = [pool.submit(client_process, url, adapter, texts, per_request, users_, budget,
                           start_at, duration_s, 997 * i) for i, (users_, budget) in enumerate(shares)]
    results = [f.result() for f in futures]
    elapsed = max(end for _, _, end in results) - start_at
    ms = np.array([x for lat, _, _ in results for x in lat]) * 1000
    return {"requests": len(ms), "errors": sum(e for _, e, _ in results),
            "requests_per_s": len(ms) / elapsed, "texts_per_s": len(ms) * per_request / elapsed,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--serve", action="append", metavar="NAME=DIR",
                        help="start qlora-serve with this adapter (repeat for more)")
    parser.add_argument("--base", help="with --serve: base model directory")
    parser.add_argument("--max-batch-size", type=int, default=64, help="with --serve")
    parser.add_argument("--batch-wait-ms", type=float, default=5, help="with --serve")
    parser.add_argument("--startup-timeout-s", type=float, default=600)
    parser.add_argument("--adapter", help="adapter to call (default: the first the server lists)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=300, help="requests per level, at most")
    parser.add_argument("--duration-s", type=float, default=30, help="seconds per level, at most")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--texts", type=Path, default=ROOT / "data" / "ag_news" / "test.csv",
                        help="CSV with a text column")
    parser.add_argument("--warmup", type=int, default=10, help="requests sent before measuring")
    parser.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1),
                        help="client processes the users are spread over")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = pd.read_csv(args.texts, dtype={"text": str}, keep_default_na=False)["text"].tolist()

    with tempfile.TemporaryFile() as log_file, ProcessPoolExecutor(args.processes) as pool:
        proc, url = start_server(args, log_file) if args.serve else (None, args.url.rstrip("/"))
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                health = client.get("/healthz").json()
                adapter = args.adapter or next(iter(health["adapters"]))
                run_level(pool, args.processes, url, adapter, texts, args.texts_per_request,
                          args.processes, max(args.warmup, args.processes), 60)  # starts the processes
                print(f"server: {url}, device {health['device']}, adapter {adapter}; client: "
                      f"{args.processes} processes, {os.cpu_count()} CPU cores; "
                      f"{args.texts_per_request} text(s) per request, at most {args.requests} "
                      f"requests or {args.duration_s:g} s per level\n")
                print("| concurrency | requests | errors | requests/s | texts/s | p50 ms | p99 ms | texts per forward pass |")
                print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
                for concurrency in levels:
                    texts0, passes0 = counters(client, adapter)
                    r = run_level(pool, args.processes, url, adapter, texts, args.texts_per_request,
                                  concurrency, args.requests, args.duration_s)
                    texts1, passes1 = counters(client, adapter)
                    per_pass = (texts1 - texts0) / max(passes1 - passes0, 1)
                    print(f"| {concurrency} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.1f} | "
                          f"{r['texts_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {per_pass:.1f} |",
                          flush=True)
        finally:
            if proc is not None:
                proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
