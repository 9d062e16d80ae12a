"""Scaling runs on one host: each GPU count and configuration in turn, each alone on the host,
one JSON line per run, then a table with the scaling efficiency (issue 20).

    python benchmarks/run_scaling.py --out scaling.jsonl                       # every count up to the GPUs here
    python benchmarks/run_scaling.py --out scaling.jsonl --counts 4 --budget 540   # one count, one device call
    python benchmarks/run_scaling.py --summary a.jsonl b.jsonl                 # the table of earlier runs
    python benchmarks/run_scaling.py --smoke --counts 2,1 --configs llm-strong --out /tmp/s.jsonl  # CPU, gloo

Configurations (--configs, run in the order given at each count):

    bert        benchmarks/scaling.py: random-init bert-base, NF4 with the dequantized cache,
                whole-model torch.compile, global batch 4096 in micro-batches of 1024 rows per GPU,
                2 timed epochs after a warm-up epoch (strong scaling: the global batch is fixed)
    llm-weak    benchmarks/scaling_llm.py: the 8B decoder in NF4, 8 blocks of 2,048 tokens per GPU
                per step in one micro-batch, checkpointing, each decoder layer compiled, 11 steps
                of which 3 warm up (weak scaling: 16,384 tokens per GPU per step)
    llm-strong  the same at 64 blocks per step over all GPUs, 7 steps of which 3 warm up (strong
                scaling: 131,072 tokens per step; 1 GPU runs 8 micro-batches a step, ~12 s each)

Each run is `python -m torch.distributed.run --standalone --nproc_per_node N <script> ...`, with
its output in the --out file's .log; the script appends its JSON line to --out. A run that fails,
runs out of time or is skipped here (no such GPU count, budget spent) gets a line from this
driver instead (`error` or `skipped`), so --out says what became of every run. --budget bounds
the whole: a run starts only with --min-run-s left, is stopped when the budget is spent, and the
decoder's steps stop early (with a JSON line) before that.

Counts run largest first unless --counts gives an order: torch keys a compiled graph by the GPU
index of its inputs, so after the largest count every GPU index has its graphs in the compile
cache and the smaller counts start warm.

Efficiency = rate(N) / (N x rate(1)), rate being tokens/s (decoder) or samples/s (bert-base),
from the latest run of the same series (what stays fixed across counts) at 1 GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from common import ROOT, append_jsonl

CONFIGS: dict[str, list[str]] = {
    "bert": ["benchmarks/scaling.py", "--model", "bert-base", "--global-batch", "4096", "--micro-batch", "1024",
             "--epochs", "2", "--repeat", "16", "--compile"],
    "llm-weak": ["benchmarks/scaling_llm.py", "--variant", "8x1+ckpt+compile", "--steps", "11", "--warmup-steps", "3"],
    "llm-strong": ["benchmarks/scaling_llm.py", "--variant", "8x1+ckpt+compile", "--global-blocks", "64",
                   "--steps", "7", "--warmup-steps", "3"],
}
# --smoke: the decoder on the CPU (configs/tiny-llama; scaling_llm.py's --smoke sizes), over gloo
SMOKE: dict[str, list[str]] = {
    "llm-weak": ["benchmarks/scaling_llm.py", "--smoke"],
    "llm-strong": ["benchmarks/scaling_llm.py", "--smoke", "--global-blocks", "4"],
}
DECODER = ("llm-weak", "llm-strong")  # take --time-budget: their steps stop in time, with a JSON line
STOP_MARGIN_S = 60  # a decoder run's steps stop this long before the budget ends (its JSON, NCCL teardown)
KILL_GRACE_S = 20  # after SIGTERM, before SIGKILL


def say(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def read_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def rate_of(record: dict[str, Any]) -> tuple[float | None, str]:
    """The run's steady-state rate and its unit: tokens/s for the decoder, samples/s otherwise."""
    if "tokens_per_s" in record:
        return record["tokens_per_s"], "tokens/s"
    return record.get("samples_per_s"), "samples/s"


def efficiency_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per series and GPU count (the latest run of each), with its efficiency against
    the latest 1-GPU run of the series; failed and skipped runs as rows without a rate."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    runs: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.get("series") or f"config {record.get('config', '?')}", int(record.get("processes", 0)))
        latest[key] = record
        runs[key] = runs.get(key, 0) + 1
    rows = []
    for (series, count), record in sorted(latest.items()):
        rate, unit = rate_of(record)
        base = latest.get((series, 1))
        base_rate = rate_of(base)[0] if base else None
        efficiency = rate / (count * base_rate) if rate and base_rate else None
        rows.append({"series": series, "gpus": count, "record": record, "rate": rate, "unit": unit,
                     "efficiency": efficiency, "runs": runs[(series, count)]})
    return rows


def _number(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _cache(record: dict[str, Any]) -> str:
    """`cold`/`warm` as the run found the cache, and the FX graph cache's hits and misses over
    all workers."""
    cache, counters = record.get("compile_cache"), record.get("compile_counters_per_gpu")
    if not cache:
        return ""
    text = cache["state"]
    if counters:
        hits, misses = (sum(c[f"fxgraph_{k}"] for c in counters) for k in ("hit", "miss"))
        text += f" ({hits} hit, {misses} miss)"
    return text


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the runs, one row per series and GPU count."""
    columns = [("series", "---"), ("GPUs", "---:"), ("per GPU per step", "---"), ("global per step", "---"),
               ("rate", "---:"), ("per GPU", "---:"), ("efficiency", "---:"), ("load s", "---:"),
               ("warm-up s", "---:"), ("compile s", "---:"), ("compile cache", "---"),
               ("peak GiB per GPU", "---:"), ("note", "---")]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "| " + " | ".join(align for _, align in columns) + " |"]
    for row in efficiency_rows(records):
        r, count = row["record"], row["gpus"]
        note = []
        if r.get("error"):
            note.append(f"failed: {r['error'].splitlines()[0][:120]}")
        if r.get("skipped"):
            note.append(f"skipped: {r['skipped']}")
        if row["runs"] > 1:
            note.append(f"latest of {row['runs']} runs")
        rate = row["rate"]
        per_gpu = f"{r['accumulation']} x {r['micro_batch']} {r['unit']}" if "micro_batch" in r else ""
        overall = f"{r['global_per_step']:,} {r['unit']}" if "global_per_step" in r else ""
        if "global_tokens_per_step" in r:
            overall += f" ({r['global_tokens_per_step']:,} tokens)"
        peaks = [p for p in r.get("peak_gib_per_gpu") or [] if p is not None]
        cells = [row["series"], str(count), per_gpu, overall,
                 f"{_number(rate)} {row['unit']}" if rate else "", _number(rate / count) if rate else "",
                 f"{row['efficiency']:.1%}" if row["efficiency"] is not None else "",
                 _number(r.get("load_s")), _number(r.get("warmup_s")), _number(r.get("compile_s")), _cache(r),
                 _number(max(peaks), 2) if peaks else "", "; ".join(note)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def default_counts(gpus: int) -> list[int]:
    """1, 2, 4, 8, ... up to the GPUs of this host, largest first (see the module docstring)."""
    counts = [1]
    while counts[-1] * 2 <= gpus:
        counts.append(counts[-1] * 2)
    return counts[::-1]


def run_one(config: str, argv: list[str], count: int, out: Path, log: Path, timeout_s: float) -> dict[str, Any] | None:
    """Launch one run; None when its script wrote its own line, else the line to write here."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count),
               *argv, "--out", str(out)]
    lines_before = len(read_records([out])) if out.exists() else 0
    started = time.monotonic()
    with open(log, "a", encoding="utf-8") as sink:
        sink.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {config} on {count}: {' '.join(command)}\n")
        sink.flush()
        # its own session: on a timeout the launcher and its workers are stopped together
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            rc = None
    seconds = round(time.monotonic() - started, 1)
    wrote = out.exists() and len(read_records([out])) > lines_before
    if rc == 0 and wrote:
        return None
    why = f"stopped after {seconds} s (time budget)" if rc is None else f"exit status {rc} after {seconds} s"
    if wrote:  # the script recorded its own error
        say(f"  {config} on {count}: {why}; its line holds the error")
        return None
    return {"config": config, "processes": count, "argv": command, "error": f"{why}; see {log.name}",
            "wall_s": seconds}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON lines file the runs append to (and the table reads)")
    p.add_argument("--configs", default="bert,llm-weak", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--counts", default="",
                   help="comma list of GPU counts, run in this order (default: 1, 2, 4, ... up to the GPUs "
                        "here, largest first)")
    p.add_argument("--budget", type=float, default=0.0, help="seconds for all the runs (0: no limit)")
    p.add_argument("--min-run-s", type=float, default=90.0, help="a run starts only with this much budget left")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one run may take at most")
    p.add_argument("--smoke", action="store_true", help="the decoder configs on the CPU (tiny-llama, gloo)")
    p.add_argument("--summary", nargs="+", type=Path, metavar="JSONL",
                   help="print the table of these files' runs and run nothing")
    args = p.parse_args(argv)
    if not args.summary and not args.out:
        p.error("--out is required (or --summary FILES)")
    args.config_list = [c for c in args.configs.split(",") if c]
    known = SMOKE if args.smoke else CONFIGS
    unknown = [c for c in args.config_list if c not in known]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)} (expected {', '.join(known)})")
    try:
        args.count_list = [int(c) for c in args.counts.split(",") if c]
    except ValueError:
        p.error(f"--counts: expected a comma list of whole numbers, got {args.counts!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary:
        print(format_table(read_records(args.summary)))
        return 0
    gpus = gpu_count()
    if not gpus and not args.smoke:
        print("error: no GPU here; --smoke runs the decoder configs on the CPU", file=sys.stderr)
        return 1
    counts = args.count_list or default_counts(gpus if gpus else 2)
    log = args.out.with_suffix(".log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    runs = [(count, config) for count in counts for config in args.config_list]
    say(f"{len(runs)} runs ({', '.join(args.config_list)} at {', '.join(map(str, counts))} "
        f"{'processes' if args.smoke else 'GPUs'}); lines to {args.out}, output to {log}")
    failed = 0
    for i, (count, config) in enumerate(runs, 1):
        left = args.budget - (time.monotonic() - start) if args.budget else args.run_timeout
        line = None
        if gpus and count > gpus:
            line = {"config": config, "processes": count, "skipped": f"{gpus} GPUs on this host"}
        elif left < args.min_run_s:
            line = {"config": config, "processes": count, "skipped": f"budget spent ({left:.0f} s left)"}
        else:
            argv = list((SMOKE if args.smoke else CONFIGS)[config])
            if config in DECODER and args.budget:
                argv += ["--time-budget", str(round(max(left - STOP_MARGIN_S, 30.0)))]
            say(f"[{i}/{len(runs)}] {config} on {count}: up to {left:.0f} s")
            t0 = time.monotonic()
            line = run_one(config, argv, count, args.out, log, min(left, args.run_timeout))
            say(f"[{i}/{len(runs)}] {config} on {count}: {'ok' if line is None else line['error']} "
                f"({time.monotonic() - t0:.0f} s)")
        if line is not None:
            failed += "error" in line
            if "skipped" in line:
                say(f"[{i}/{len(runs)}] {config} on {count}: skipped, {line['skipped']}")
            append_jsonl(args.out, line)
    say(f"done in {time.monotonic() - start:.0f} s; efficiency = rate(N) / (N x rate(1)) within each series")
    print(format_table(read_records([args.out])), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
