"""train: quantize-load the base model, attach LoRA, train, keep the best checkpoint.

Reads  data/tokenized, models/base, params task.*, quant.*, lora.*, train.*.
Writes <adapter-out>/ (PEFT adapter in safetensors with the fully trained modules_to_save,
       tokenizer, pipeline.json with the weights' sha256: lib.adapter.AdapterMeta) and
       <metrics-out>/ (DVCLive: metrics.json summary, per-step loss and lr, per-evaluation
       validation scores; timing.json: warm-up seconds, then steady-state samples/s, and
       tokens/s for language models: lib.throughput).
The best checkpoint is the one with the best validation task.metric (accuracy, F1, loss or
perplexity; see lib.tasks), evaluated every epoch (and every train.eval_every_steps steps when
that is > 0). Every train.checkpoint_every_steps steps the loop's state goes to
<checkpoint-dir>; a rerun after a kill resumes from it. The loop itself is lib.loop. Before
anything touches CUDA, train.device picks the device: `auto` claims train.processes free GPUs
(lib.devices), so parallel queued experiments each get their own.
Packed sft rows train with varlen attention on a CUDA GPU (no mask: lib.varlen_attention), with
SDPA and transformers' block mask elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.lib.adapter_meta import AdapterMeta, save_adapter
from stages.lib.checkpoint import Checkpoint, fingerprint
from stages.lib.devices import select_device
from stages.lib.distributed import WORKER_ENV, Nodes, Processes, launch
from stages.lib.io import TIMING_FILE, atomic_dir, read_json, require_dir, run_main, write_json
from stages.lib.loop import NullLive, TrainingLoop
from stages.lib.params import UserError, load_params
from stages.lib.quantized import compute_setup, memory_hint
from stages.lib.sources import SOURCE_FILE, BaseOrigin, load_tokenizer
from stages.lib.tasks import Objective
from stages.lib.throughput import describe
from stages.lib.tokenized import load_tokenized
from stages.lib.training_model import build_model
from stages.lib.varlen_attention import packed_attention

PARAMS = ("task.type", "task.metric", "task.mlm_probability",
          "quant.type", "quant.double_quant", "quant.compute_dtype", "quant.cache_dequantized",
          "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.modules_to_save",
          "train.seed", "train.epochs", "train.lr", "train.batch_size", "train.weight_decay",
          "train.warmup_ratio", "train.max_grad_norm", "train.max_steps", "train.eval_every_steps",
          "train.log_every_steps", "train.checkpoint_every_steps", "train.group_by_length",
          "train.gradient_checkpointing", "train.checkpoint_every_n_layers", "train.base_dropout", "train.compile", "train.processes",
          "train.device", "train.gradient_accumulation_steps", "train.optimizer")
# the loop's speed figures: timing.json, not metrics.json (lib.throughput)
TIMING_KEYS = ("train_time_s", "warmup_s", "samples_per_s", "tokens_per_s", "first_step_s")
log = logging.getLogger("qlora")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    started = time.perf_counter()  # warm-up counts from here: loading the base, compiling, first steps
    p = load_params(args.params, PARAMS)
    task, quant, lora, cfg = p.typed("task"), p.typed("quant"), p.typed("lora"), p.typed("train")
    nodes = Nodes.from_env()  # PET_NNODES, PET_NODE_RANK, PET_RDZV_ENDPOINT: docs/multi-node.md
    nodes.check_split(args.params, cfg.batch_size, cfg.processes, cfg.gradient_accumulation_steps)
    base_dir = require_dir(args.base, "base model")
    data, tokenized = load_tokenized(Path(args.data))
    if tokenized.task != task.type:
        raise UserError(f"{args.data}: tokenized for task {tokenized.task}, but task.type is {task.type} "
                        "(run the pipeline with dvc repro)")
    if WORKER_ENV not in os.environ:  # before CUDA starts; the workers inherit CUDA_VISIBLE_DEVICES
        select_device("train.device", cfg.device, cfg.processes)
    if cfg.processes * nodes.count > 1 and WORKER_ENV not in os.environ:
        return launch("stages.train", sys.argv[1:] if argv is None else argv, cfg.processes, nodes)
    processes = Processes()
    if processes.count != cfg.processes * nodes.count:
        raise UserError(f"{args.params}: train.processes is {cfg.processes}"
                        + (f" on each of {nodes.count} nodes" if nodes.count > 1 else "")
                        + f" but this run has {processes.count} (start it with `python -m "
                        "stages.train`, which launches the processes itself)")
    if not processes.is_main:
        log.setLevel(logging.WARNING)  # one log, the main process's
    origin = read_json(base_dir / SOURCE_FILE)
    set_seed(cfg.seed)
    device, dtype = compute_setup(quant.compute_dtype)
    tokenizer = load_tokenizer(base_dir)
    if tokenized.chat_template:  # saved with the adapter: generation renders prompts as training did
        tokenizer.chat_template = tokenized.chat_template
    objective = Objective(task, tokenizer)
    # packed rows (sft): varlen attention on a GPU, no mask; else SDPA with the block mask (logged)
    attn = packed_attention(device, dtype) if tokenized.packed else "sdpa"
    model = build_model(base_dir, tokenized.labels, quant, lora, cfg, task.type, device, dtype,
                        functools.partial(objective.prepare, packed=tokenized.packed), attn)
    if processes.count > 1:  # weights start alike (same seed); dropout masks differ per worker
        torch.manual_seed(cfg.seed + processes.rank)
    n_trainable, n_all = model.get_nb_trainable_parameters()
    log.info("model %s, quant %s, device %s, compute %s: %d trainable of %d parameters (%.3f%%)",
             origin["name_or_path"], quant.type, device, dtype, n_trainable, n_all, 100 * n_trainable / n_all)
    # Resume only a run of these params, data, base model and code. The base counts through its
    # SOURCE.json, whose sha256 record load_base has just checked every base file against:
    # hashing the weights again would read an 8B base's 16 GB a second time.
    code = Path(__file__).parent
    checkpoint = processes.share(Checkpoint(args.checkpoint_dir, fingerprint(
        dict(p), [Path(args.data), base_dir / SOURCE_FILE, code / "train.py", *(code / "lib").glob("*.py")])))
    loop = functools.partial(TrainingLoop, model, data, tokenizer.pad_token_id, tokenized.min_width, cfg,
                             objective, device=device, dtype=dtype, checkpoint=checkpoint,
                             processes=processes, started=started)
    hint = " (dvc exp run -S train.batch_size=N), or set train.gradient_checkpointing: true"
    if not processes.is_main:  # trains its shards; the main process writes every output
        with memory_hint("train.batch_size", cfg.batch_size, hint):
            loop(live=NullLive()).run()
        processes.close()
        return 0
    from dvclive import Live  # here, so the loop imports where DVCLive is absent (GPU benchmark)

    with atomic_dir(args.metrics_out) as metrics_tmp:
        live = Live(str(metrics_tmp), dvcyaml=False, save_dvc_exp=False)
        with memory_hint("train.batch_size", cfg.batch_size, hint):
            summary = loop(live=live).run()
        timing: dict[str, Any] = {k: summary.pop(k) for k in TIMING_KEYS if k in summary}
        timing["peak_memory_mb"] = round(peak_memory_mb(device), 1)  # per process
        summary.update({"task": task.type, "model": origin["name_or_path"], "quant_type": quant.type,
                        "lora_r": lora.r, "lora_alpha": lora.alpha,
                        "trainable_params": n_trainable, "all_params": n_all,
                        "trainable_percent": round(100 * n_trainable / n_all, 4),
                        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                        "processes": processes.count})
        live.summary = summary
        live.end()
        # Speed differs run to run: kept out of metrics.json, so an unchanged adapter gives
        # unchanged metrics and export (which reads metrics.json) does not rerun.
        write_json(metrics_tmp / TIMING_FILE, timing)
        meta = AdapterMeta(task, tokenized.labels, tokenized.max_length, tokenized.padding, quant, lora,
                           dataclasses.asdict(cfg), lora.modules_to_save,
                           BaseOrigin.from_json(base_dir / SOURCE_FILE, origin), {})
        with atomic_dir(args.adapter_out) as tmp:
            save_adapter(model, tokenizer, meta, tmp)
    checkpoint.remove()
    processes.close()
    log.info("train: best validation %s %.4f at step %d; %s -> %s", task.metric,
             summary[f"best_val_{task.metric}"], summary["best_step"], describe(timing), args.adapter_out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--data", required=True, help="tokenized dataset directory")
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--adapter-out", required=True)
    parser.add_argument("--metrics-out", required=True)
    parser.add_argument("--checkpoint-dir", required=True,
                        help="resumable checkpoint (not versioned; removed when training ends)")
    args = parser.parse_args(argv)
    return run_main(functools.partial(run, args, argv))


if __name__ == "__main__":
    sys.exit(main())
