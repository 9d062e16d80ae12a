"""train: quantize-load the base model, attach LoRA, train, keep the best checkpoint.

Reads  data/tokenized, models/base, params task.*, quant.*, lora.*, train.*.
Writes <adapter-out>/ (PEFT adapter in safetensors with the fully trained modules_to_save,
       tokenizer, pipeline.json with the weights' sha256) and <metrics-out>/ (DVCLive:
       metrics.json summary, per-step loss and lr, per-evaluation validation scores;
       timing.json).
The best checkpoint is the one with the best validation task.metric (accuracy, F1, loss or
perplexity; see lib.tasks), evaluated every epoch (and every train.eval_every_steps steps when
that is > 0). Every train.checkpoint_every_steps steps the loop's state goes to
<checkpoint-dir>; a rerun after a kill resumes from it.
"""

from __future__ import annotations

import argparse
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
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from stages.lib.checkpoint import Checkpoint, fingerprint, rng_states, set_rng_states
from stages.lib.distributed import WORKER_ENV, Nodes, Processes, launch
from stages.lib.data import length_grouped_batches, load_tokenized
from stages.lib.io import (TIMING_FILE, atomic_dir, read_json, require_dir, run_main,
                           sha256_file, write_json)
from stages.lib.model import (ADAPTER_WEIGHTS, PIPELINE_FILE, SOURCE_FILE, attach_lora, autocast,
                              compute_setup, load_base, load_tokenizer, memory_hint,
                              prepare_for_training, write_adapter_config)
from stages.lib.tasks import Objective, describe
from stages.lib.params import UserError, load_params

PARAMS = ("task.type", "task.metric", "task.mlm_probability",
          "quant.type", "quant.double_quant", "quant.compute_dtype", "quant.cache_dequantized",
          "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.modules_to_save",
          "train.seed", "train.epochs", "train.lr", "train.batch_size", "train.weight_decay",
          "train.warmup_ratio", "train.max_grad_norm", "train.max_steps", "train.eval_every_steps",
          "train.log_every_steps", "train.checkpoint_every_steps", "train.group_by_length",
          "train.gradient_checkpointing", "train.base_dropout", "train.compile", "train.processes",
          "train.gradient_accumulation_steps")
log = logging.getLogger("qlora")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class NullLive:
    """Stands in for dvclive.Live where nothing is logged (other workers, benchmarks)."""
    step = 0

    def log_metric(self, name: str, value: float) -> None:
        pass


def train(model, data: dict, pad_id: int, min_width: int, cfg: dict[str, Any], live: Any,
          device: torch.device, dtype: torch.dtype, checkpoint: Checkpoint | None = None,
          processes: Processes | None = None, objective: Objective | None = None) -> dict[str, Any]:
    """The training loop; returns summary metrics. The best weights are loaded into `model`.

    `live` is a dvclive.Live, or anything with a `step` attribute and `log_metric(name, value)`.
    With `checkpoint`, the loop's whole state is saved every cfg["checkpoint_every_steps"] steps,
    and a run that finds a checkpoint of its own carries on from it: same batches, same dropout
    masks, same optimizer moments, so it ends where an uninterrupted run would have.
    With several `processes`, every worker draws the same global batches and trains on its
    shard of each; DDP averages the gradients, so the update is that of the global batch. With
    cfg["gradient_accumulation_steps"] > 1 a shard runs in that many micro-batches, their
    gradients summed before the one optimizer step: again the update of the global batch.
    `objective` (default: classification, best by accuracy) builds the batches and scores.
    """
    processes = processes or Processes()
    objective = objective or Objective({"type": "classification", "metric": "accuracy"})
    (train_x, train_y), (val_x, val_y) = data["train"], data["validation"]
    # a last batch smaller than the number of workers would leave one with nothing: dropped
    full, last = divmod(len(train_x), cfg["batch_size"])
    steps_per_epoch = full + (last >= processes.count)
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"]:
        total_steps = min(total_steps, cfg["max_steps"])
    accumulation = cfg.get("gradient_accumulation_steps", 1)
    log.info("train: %d examples, batch %d (%d micro-batches per process), %d steps/epoch, "
             "%d steps in all, %d warm-up", len(train_x), cfg["batch_size"], accumulation,
             steps_per_epoch, total_steps, int(cfg["warmup_ratio"] * total_steps))

    # torch.compile fuses the many small element-wise kernels around each matmul (GPU). The whole
    # model is one graph: compiled layer by layer (accelerate's compile_regions) it compiles in
    # seconds, but each region's call costs host time, and on an H100 the host then set the pace
    # (9,253 against 12,234 samples/s at batch 512). DDP goes around the compiled model: every
    # worker compiles the graph one process does, with no DDP hooks inside it.
    forward = processes.wrap(torch.compile(model) if cfg["compile"] else model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                  fused=device.type == "cuda")
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg["warmup_ratio"] * total_steps),
                                                total_steps)
    generator = torch.Generator().manual_seed(cfg["seed"])
    train_tokens = objective.examples(train_x, train_y, pad_id, device, min_width)
    val_tokens = objective.examples(val_x, val_y, pad_id, device, min_width, scoring=True)
    # no backward pass: bigger batches fit, except where logits span a vocabulary
    eval_batch = cfg["batch_size"] * (4 if objective.type == "classification" else 1)
    # Everything below `progress` and `best_state` is what a checkpoint must restore.
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "seen": 0, "window": [], "epoch_losses": [],
                                "history": [], "best": {}, "train_time_s": 0.0}
    best_state: dict[str, torch.Tensor] = {}
    resumed = checkpoint.load(device) if checkpoint else None
    if resumed:
        tensors, states, progress = resumed
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(tensors[name])
        best_state = {n[len("best."):]: t for n, t in tensors.items() if n.startswith("best.")}
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        set_rng_states(states["rng"][processes.rank])
        generator.set_state(states["epoch_start"])
        for step, name, value in progress["history"]:  # DVCLive's curves start over in a new dir
            live.step = step
            live.log_metric(name, value)
        log.info("resuming from checkpoint %s at step %d of %d (epoch %d)", checkpoint.directory,
                 progress["step"], total_steps, progress["epoch"] + 1)
    window = [torch.tensor(v, device=device) for v in progress["window"]]
    paused = 0.0  # seconds spent validating and checkpointing: not training time
    start = time.perf_counter()

    def log_metric(name: str, value: float) -> None:
        live.step = progress["step"]
        live.log_metric(name, value)
        progress["history"].append([progress["step"], name, value])

    def evaluate_now() -> None:
        nonlocal paused
        if device.type == "cuda":
            torch.cuda.synchronize()  # queued training steps belong to training time
        begin = time.perf_counter()
        model.eval()
        scores = objective.scores(model, val_tokens, val_y, eval_batch, device, dtype, desc="validate")
        model.train()
        paused += time.perf_counter() - begin  # scoring syncs: it ends with a copy to the host
        for name, value in scores.items():
            log_metric(f"val/{name}", value)
        log.info("step %d: validation %s", progress["step"], describe(scores))
        if objective.better(scores, progress["best"]):
            progress["best"] = {**scores, "step": progress["step"]}
            best_state.update({n: p.detach().clone() for n, p in trainable.items()})

    def save_checkpoint(epoch_start: torch.Tensor) -> None:
        nonlocal start, paused
        begin = time.perf_counter()
        progress.update(window=[w.item() for w in window],
                        train_time_s=progress["train_time_s"] + begin - start - paused)
        start, paused = begin, 0.0  # the training time so far is in progress now
        rng = processes.gather(rng_states())  # every worker's own dropout stream
        if processes.is_main:
            checkpoint.save({**trainable, **{f"best.{n}": t for n, t in best_state.items()}},
                            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "rng": rng, "epoch_start": epoch_start}, progress)
        paused += time.perf_counter() - begin

    model.train()
    for epoch in range(progress["epoch"], cfg["epochs"]):
        epoch_start = generator.get_state()  # a resumed run rebuilds this epoch's batches from it
        batches = [b for b in length_grouped_batches(train_tokens.lengths, cfg["batch_size"],
                                                     generator, cfg["group_by_length"])
                   if len(b) >= processes.count]
        done = progress["step"] - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
        if done == 0:
            progress["epoch_losses"] = []
        progress["epoch"] = epoch
        todo = batches[done:][:total_steps - progress["step"]]
        bar = tqdm(todo, desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="step",
                   disable=None if processes.is_main else True,
                   initial=done, total=done + len(todo))
        for batch in bar:
            # this worker's share in micro-batches, strided like the shards (each one spans the
            # batch's lengths); DDP averages the gradients once, after the last micro-batch
            shard = processes.shard(batch)
            micro_batches = [m for m in (shard[i::accumulation] for i in range(accumulation)) if m]
            loss = torch.zeros((), device=device)
            for i, rows in enumerate(micro_batches):
                with processes.no_sync(forward, i < len(micro_batches) - 1):
                    with autocast(device, dtype):
                        micro_loss = forward(**train_tokens.batch(rows)).loss / len(micro_batches)
                    micro_loss.backward()
                loss += micro_loss.detach()
            if cfg["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(trainable.values(), cfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(loss.detach())
            progress["step"] += 1
            progress["seen"] += len(batch)
            step = progress["step"]
            if step % cfg["log_every_steps"] == 0 or step == total_steps:
                # the mean over workers, then .item(): a sync point, so only every few steps
                mean_loss = processes.mean(torch.stack(window).float().mean()).item()
                progress["epoch_losses"].append(mean_loss)
                window = []
                log_metric("train/loss", mean_loss)
                log_metric("train/lr", scheduler.get_last_lr()[0])
                bar.set_description(f"epoch {epoch + 1}/{cfg['epochs']} loss {mean_loss:.3f}")
            if (cfg["eval_every_steps"] and step % cfg["eval_every_steps"] == 0
                    and step % steps_per_epoch and step < total_steps):  # else the epoch's end does
                evaluate_now()
            if checkpoint and cfg["checkpoint_every_steps"] and step % cfg["checkpoint_every_steps"] == 0:
                save_checkpoint(epoch_start)
        losses = progress["epoch_losses"]
        log.info("epoch %d/%d: %d steps, mean train loss %.4f", epoch + 1, cfg["epochs"],
                 progress["step"], float(np.mean(losses)) if losses else float("nan"))
        evaluate_now()
        if progress["step"] >= total_steps:
            break
    train_time = progress["train_time_s"] + time.perf_counter() - start - paused

    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(best_state[name])
    best, losses = progress["best"], progress["epoch_losses"]
    return {"train_loss": losses[-1] if losses else float("nan"),
            **{f"best_val_{name}": value for name, value in best.items() if name != "step"},
            "best_step": best["step"], "steps": progress["step"], "train_samples": progress["seen"],
            "train_time_s": round(train_time, 2),
            "samples_per_s": round(progress["seen"] / train_time, 2) if train_time else 0.0}


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

    def work() -> int:
        p = load_params(args.params, PARAMS)
        quant, lora, cfg = p.section("quant"), p.section("lora"), p.section("train")
        if cfg["batch_size"] % cfg["processes"]:
            raise UserError(f"{args.params}: train.batch_size {cfg['batch_size']} is not a multiple of "
                            f"train.processes {cfg['processes']} (each process takes an equal share "
                            "of every batch)")
        share = cfg["batch_size"] // cfg["processes"]
        if share % cfg["gradient_accumulation_steps"]:
            raise UserError(f"{args.params}: each process's share of a batch, train.batch_size / "
                            f"train.processes = {share}, is not a multiple of "
                            f"train.gradient_accumulation_steps {cfg['gradient_accumulation_steps']} "
                            "(it runs in that many equal micro-batches)")
        task = p.section("task")
        base_dir = require_dir(args.base, "base model")
        data, meta = load_tokenized(Path(args.data))
        if meta.get("task", "classification") != task["type"]:
            raise UserError(f"{args.data}: tokenized for task {meta.get('task', 'classification')}, but "
                            f"task.type is {task['type']} (run the pipeline with dvc repro)")
        nodes = Nodes.from_env()  # PET_NNODES, PET_NODE_RANK, PET_RDZV_ENDPOINT: docs/multi-node.md
        nodes.check_split(args.params, cfg["batch_size"], cfg["processes"], cfg["gradient_accumulation_steps"])
        if cfg["processes"] * nodes.count > 1 and WORKER_ENV not in os.environ:
            return launch("stages.train", sys.argv[1:] if argv is None else argv, cfg["processes"], nodes)
        processes = Processes()
        if processes.count != cfg["processes"] * nodes.count:
            raise UserError(f"{args.params}: train.processes is {cfg['processes']}"
                            + (f" on each of {nodes.count} nodes" if nodes.count > 1 else "")
                            + f" but this run has {processes.count} (start it with `python -m "
                            "stages.train`, which launches the processes itself)")
        if not processes.is_main:
            log.setLevel(logging.WARNING)  # one log, the main process's
        origin = read_json(base_dir / SOURCE_FILE)
        set_seed(cfg["seed"])
        device, dtype = compute_setup(quant["compute_dtype"])
        model = load_base(base_dir, meta["labels"], quant, lora["modules_to_save"], device, dtype,
                          task=task["type"])
        model = prepare_for_training(model, cfg["gradient_checkpointing"], quant["cache_dequantized"],
                                     cfg["base_dropout"])
        model = attach_lora(model, lora, task["type"])
        if processes.count > 1:  # weights start alike (same seed); dropout masks differ per worker
            torch.manual_seed(cfg["seed"] + processes.rank)
        n_trainable, n_all = model.get_nb_trainable_parameters()
        log.info("model %s, quant %s, device %s, compute %s: %d trainable of %d parameters (%.3f%%)",
                 origin["name_or_path"], quant["type"], device, dtype, n_trainable, n_all,
                 100 * n_trainable / n_all)
        tokenizer = load_tokenizer(base_dir)
        objective = Objective(task, tokenizer)
        min_width = meta["max_length"] if meta["padding"] == "max_length" else 0
        # Resume only a run of these params, data, base model and code.
        code = Path(__file__).parent
        checkpoint = processes.share(Checkpoint(args.checkpoint_dir, fingerprint(
            dict(p), [Path(args.data), base_dir, code / "train.py", *(code / "lib").glob("*.py")])))

        def fit(live: Any) -> dict[str, Any]:
            with memory_hint("train.batch_size", cfg["batch_size"], " (dvc exp run -S "
                             "train.batch_size=N), or set train.gradient_checkpointing: true"):
                return train(model, data, tokenizer.pad_token_id, min_width, cfg, live, device,
                             dtype, checkpoint, processes, objective)

        if not processes.is_main:  # trains its shards; the main process writes every output
            fit(NullLive())
            processes.wait()
            return 0
        from dvclive import Live  # here, so the loop above imports where DVCLive is absent (GPU benchmark)

        with atomic_dir(args.metrics_out) as metrics_tmp:
            live = Live(str(metrics_tmp), dvcyaml=False, save_dvc_exp=False)
            summary = fit(live)
            timing = {k: summary.pop(k) for k in ("train_time_s", "samples_per_s")}
            timing["peak_memory_mb"] = round(peak_memory_mb(device), 1)  # per process
            summary.update({"task": task["type"], "model": origin["name_or_path"], "quant_type": quant["type"],
                            "lora_r": lora["r"], "lora_alpha": lora["alpha"],
                            "trainable_params": n_trainable, "all_params": n_all,
                            "trainable_percent": round(100 * n_trainable / n_all, 4),
                            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                            "processes": processes.count})
            live.summary = summary
            live.end()
            # Speed differs run to run: kept out of metrics.json, so an unchanged adapter gives
            # unchanged metrics and export (which reads metrics.json) does not rerun.
            write_json(metrics_tmp / TIMING_FILE, timing)
            with atomic_dir(args.adapter_out) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                write_adapter_config(tmp)
                tokenizer.save_pretrained(tmp)
                write_json(tmp / PIPELINE_FILE, {**meta, "task": task, "quant": quant, "lora": lora, "train": cfg,
                                                 "modules_to_save": lora["modules_to_save"],
                                                 "base": origin,
                                                 "sha256": {ADAPTER_WEIGHTS: sha256_file(tmp / ADAPTER_WEIGHTS)}})
        checkpoint.remove()
        processes.wait()
        log.info("train: best validation %s %.4f at step %d, %.1f samples/s -> %s", task["metric"],
                 summary[f"best_val_{task['metric']}"], summary["best_step"], timing["samples_per_s"],
                 args.adapter_out)
        return 0

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
