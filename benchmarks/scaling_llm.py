"""Multi-GPU scaling of QLoRA on the 8B decoder: DDP over the LoRA weights, each worker holding
its own 4-bit base on its own GPU (issue 20).

    torchrun --standalone --nproc_per_node N benchmarks/scaling_llm.py --out runs.jsonl             # weak
    torchrun --standalone --nproc_per_node N benchmarks/scaling_llm.py --out runs.jsonl --global-blocks 64  # strong
    torchrun --standalone --nproc_per_node 2 benchmarks/scaling_llm.py --smoke --out /tmp/s.jsonl   # CPU, gloo

Model and loop are benchmarks/llm.py's "ours": configs/llama-3.1-8b with seeded random weights,
built by every worker directly on its GPU in NF4 (double quant, bf16 compute; llm.py's
`load_ours(build_config=...)`: the same numbers on every GPU, no disk, no waiting on another
worker), LoRA r32 alpha32 on q/k/v/o/gate/up/down, optional gradient checkpointing and per-layer
torch.compile (`--variant`), the chunked cross-entropy of stages/lib/losses.py, paged_adamw_8bit,
lr 2e-4, clipping at 1.0; tiny-Shakespeare blocks of 2,048 tokens. DDP (stages.lib.distributed:
accelerate, NCCL on GPUs, gloo on a CPU) averages the LoRA gradients once per optimizer step; the
frozen 4-bit base stays out of it.

Weak scaling (default): each GPU runs `--variant` per step (micro-batch x accumulation blocks),
so the tokens per step per GPU stay the same at every GPU count and the global tokens per step
grow with it. Strong scaling (`--global-blocks G`): G blocks per optimizer step at every count,
each GPU running G / N of them in micro-batches of the variant's size. Worker r takes blocks
r, r + N, ... of each step's global blocks, so one process and N processes see the same blocks
per step and, with strong scaling, compute the same loss (same global batch).

The main worker appends one JSON line to --out: steady-state tokens/s over the steps after
--warmup-steps (global, and per GPU), MFU per GPU, the warm-up apart (load_s: building the model;
warmup_s: the warm-up steps; compile_s: those steps less as many steady steps), the compile
cache as found and its hits and misses per worker, peak GiB per GPU, the per-GPU micro-batch,
the per-GPU and global tokens per step, each step's seconds and loss (the workers' mean), every
worker's device, the versions and the exact argv. A failure is recorded in the line (`error`)
when the main worker sees it; the script then exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from common import append_jsonl, compile_cache_state, compile_counters, one_off_seconds, run_header
from llm import (ROOT, SEED, blocks, corpus_tokens, flops_per_token, load_ours, lora_settings, parse_variant,
                 say, summarise, sync, train_ours)

from stages.lib.compiling import use_compile_cache
from stages.lib.distributed import Processes
from stages.lib.quantized import compute_setup
from stages.lib.random_init import _config, meta_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON lines file; the run's line is appended")
    p.add_argument("--config", type=Path, default=ROOT / "configs/llama-3.1-8b")
    p.add_argument("--variant", default="8x1+ckpt+compile",
                   help="per GPU and step: <micro-batch>x<accumulation>[+ckpt][+compile|+offload][+fused], "
                        "as benchmarks/llm.py's --ours-variants; with --global-blocks only the micro-batch "
                        "and the flags count")
    p.add_argument("--global-blocks", type=int, default=0,
                   help="strong scaling: blocks per optimizer step over all GPUs (0: weak scaling)")
    p.add_argument("--block", type=int, default=2048, help="tokens per block")
    p.add_argument("--steps", type=int, default=11, help="optimizer steps, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="steps left out of tokens/s (compilation, CUDA set-up, DDP's first buckets)")
    p.add_argument("--optimizer", default="paged_adamw_8bit")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ce-chunk", type=int, default=2048, help="tokens per chunk of the chunked cross-entropy")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds from the start; when spent, every worker stops after the same step (0: none)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU run on configs/tiny-llama with tiny sizes (tests the script)")
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
    if "--smoke" in given:  # tiny sizes; flags given explicitly still win
        # lr 1e-2: each step moves the losses enough that a wrong gradient average shows (1e-3 relative)
        p.set_defaults(config=ROOT / "configs/tiny-llama", variant="2x1+ckpt", block=64, steps=3,
                       warmup_steps=1, ce_chunk=48, lr=1e-2)
    args = p.parse_args(argv)
    args.variant_spec = args.variant
    args.variant = parse_variant(args.variant)
    if args.steps <= args.warmup_steps:
        p.error(f"--steps {args.steps} must exceed --warmup-steps {args.warmup_steps} (no steady steps to time)")
    return args


def split_steps(args: argparse.Namespace, workers: int) -> tuple[int, int]:
    """(micro-batches per GPU per step, blocks per step over all GPUs) for `workers` GPUs."""
    micro = args.variant["batch"]
    if not args.global_blocks:
        return args.variant["accumulation"], micro * args.variant["accumulation"] * workers
    if args.global_blocks % (workers * micro):
        raise SystemExit(f"error: --global-blocks {args.global_blocks} must split into {workers} GPUs x "
                         f"micro-batches of {micro} blocks (a multiple of {workers * micro})")
    return args.global_blocks // (workers * micro), args.global_blocks


def series(args: argparse.Namespace) -> str:
    """What stays fixed across the GPU counts of one scaling curve (the summary groups by it)."""
    flags = "+".join(args.variant_spec.split("+")[1:])
    flags = f", {flags}" if flags else ""
    if args.global_blocks:
        return (f"{args.config.name} strong: {args.global_blocks} blocks of {args.block} per step, "
                f"micro-batch {args.variant['batch']}{flags}")
    return (f"{args.config.name} weak: {args.variant['batch']}x{args.variant['accumulation']} blocks of "
            f"{args.block} per GPU per step{flags}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget > 0 else float("inf")
    variant = dict(args.variant)
    # before any worker compiles (the workers first meet in Processes' set-up)
    cache = compile_cache_state() if variant["compile"] else None
    processes = Processes()
    if variant["compile"]:
        use_compile_cache()
    if args.smoke or not torch.cuda.is_available():
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = compute_setup("bf16")
    accumulation, global_blocks = split_steps(args, processes.count)
    variant["accumulation"] = accumulation
    per_gpu_blocks = variant["batch"] * accumulation
    config = _config(args.config)
    record: dict[str, Any] = {
        **run_header("benchmarks/scaling_llm.py", processes, device), "series": series(args),
        "model": {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
                  "parameters": sum(p.numel() for p in meta_model(config).parameters()),
                  "weights": f"seeded random (seed {SEED}), built in NF4 on each worker's device"},
        "scaling": "strong" if args.global_blocks else "weak", "block": args.block,
        "micro_batch": variant["batch"], "accumulation": accumulation, "unit": "blocks",
        "per_gpu_per_step": per_gpu_blocks, "global_per_step": global_blocks,
        "tokens_per_step_per_gpu": per_gpu_blocks * args.block, "global_tokens_per_step": global_blocks * args.block,
        "settings": {**variant, "optimizer": args.optimizer, "lr": args.lr, "ce_chunk_tokens": args.ce_chunk,
                     "dtype": str(dtype), "lora": dataclasses.asdict(lora_settings()),
                     "quant": "nf4, double quant, base in 4 bits"},
        "compile": variant["compile"], "compile_cache": cache}
    if processes.is_main:
        say(f"{record['series']}: {processes.count} workers, {per_gpu_blocks} blocks per GPU per step in "
            f"{accumulation} micro-batches, {record['global_tokens_per_step']:,} tokens per step")
    # each step's global blocks, worker r taking r, r + N, ...: the same blocks per step at any count
    everything = blocks(corpus_tokens(args.config), args.block, global_blocks * args.steps)
    mine = [b for step in range(args.steps)
            for b in processes.shard(everything[step * global_blocks:(step + 1) * global_blocks])]
    try:
        t0 = time.perf_counter()
        model = load_ours(None, device, dtype, variant, build_config=args.config)
        sync(device)
        record["load_s"] = round(time.perf_counter() - t0, 2)
        processes.wait()
        seconds, losses = train_ours(model, mine, variant, args.steps, args, device, dtype, "scaling", deadline,
                                     processes=processes)
    except Exception as e:  # recorded, then raised: the launcher ends the other workers
        if processes.is_main:
            record.update(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-6000:],
                          wall_s=round(time.monotonic() - start, 1))
            append_jsonl(args.out, record)
        raise
    warmup = min(args.warmup_steps, len(seconds))
    flops = flops_per_token(config, args.block, variant["checkpointing"])
    # per GPU: each worker does per_gpu_blocks x block tokens a step, all in the same time
    timed = summarise(seconds, losses, per_gpu_blocks * args.block, warmup, flops, device)
    per_gpu = timed.get("tokens_per_s")
    steady = seconds[warmup:]
    record.update(
        steps=len(seconds), warmup_steps=warmup, step_seconds=timed["step_seconds"], losses=timed["losses"],
        tokens_per_s=round(per_gpu * processes.count, 1) if per_gpu else None, tokens_per_s_per_gpu=per_gpu,
        mfu_per_gpu=timed.get("mfu"), model_tflops_per_s_per_gpu=timed.get("model_tflops_per_s"),
        warmup_s=timed["warmup_seconds"],
        compile_s=one_off_seconds(sum(seconds[:warmup]), warmup, sum(steady) / len(steady) if steady else None),
        peak_gib_per_gpu=processes.gather(timed["peak_gib"]),
        peak_reserved_gib_per_gpu=processes.gather(timed["peak_reserved_gib"]),
        flops=flops, wall_s=round(time.monotonic() - start, 1))
    if variant["compile"]:
        record["compile_counters_per_gpu"] = processes.gather(compile_counters())
    if processes.is_main:
        append_jsonl(args.out, record)
        say(f"{processes.count} workers: {record['tokens_per_s']} tokens/s ({per_gpu} per GPU), load "
            f"{record['load_s']} s, warm-up {record['warmup_s']} s (compile ~{record['compile_s']} s), "
            f"peak {record['peak_gib_per_gpu']} GiB; line appended to {args.out}")
    processes.close()
    return 0 if all(math.isfinite(x) for x in losses) else 1


if __name__ == "__main__":
    sys.exit(main())
