"""train: quantize-load the base model, attach LoRA, train, keep the best checkpoint.

Reads  data/tokenized, models/base, params quant.*, lora.*, train.*.
Writes <adapter-out>/ (PEFT adapter in safetensors with the fully trained head, tokenizer,
       pipeline.json) and <metrics-out>/ (DVCLive: metrics.json summary, per-step loss and lr,
       per-evaluation validation accuracy and loss).
The best checkpoint is the one with the highest validation accuracy, evaluated every epoch
(and every train.eval_every_steps steps when that is > 0).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from stages.lib.data import PackedTokens, length_grouped_batches, load_tokenized
from stages.lib.io import atomic_dir, read_json, require_dir, run_main, write_json
from stages.lib.model import (PIPELINE_FILE, attach_lora, autocast, compute_setup, load_base,
                              pad_multiple, predict_logits, prepare_for_training,
                              write_adapter_config)
from stages.lib.params import load_params

PARAMS = ("quant.type", "quant.double_quant", "quant.compute_dtype", "quant.cache_dequantized",
          "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.modules_to_save",
          "train.seed", "train.epochs", "train.lr", "train.batch_size", "train.weight_decay",
          "train.warmup_ratio", "train.max_grad_norm", "train.max_steps", "train.eval_every_steps",
          "train.log_every_steps", "train.group_by_length", "train.gradient_checkpointing",
          "train.compile")
log = logging.getLogger("qlora")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def validate(model, tokens: PackedTokens, labels: list[int], batch_size: int,
             device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Validation loss and accuracy; leaves the model in train mode."""
    model.eval()
    logits = torch.from_numpy(predict_logits(model, tokens, 0, batch_size, 0, device, dtype,
                                             desc="validate"))
    model.train()
    target = torch.tensor(labels)
    return {"loss": torch.nn.functional.cross_entropy(logits, target).item(),
            "accuracy": (logits.argmax(-1) == target).float().mean().item()}


def train(model, data: dict, pad_id: int, min_width: int, cfg: dict[str, Any], live: Any,
          device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The training loop; returns summary metrics. The best weights are loaded into `model`.

    `live` is a dvclive.Live, or anything with a `step` attribute and `log_metric(name, value)`.
    """
    (train_x, train_y), (val_x, val_y) = data["train"], data["validation"]
    steps_per_epoch = math.ceil(len(train_x) / cfg["batch_size"])
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"]:
        total_steps = min(total_steps, cfg["max_steps"])
    log.info("train: %d examples, batch %d, %d steps/epoch, %d steps in all, %d warm-up",
             len(train_x), cfg["batch_size"], steps_per_epoch, total_steps,
             int(cfg["warmup_ratio"] * total_steps))

    # torch.compile fuses the many small element-wise kernels around each matmul (GPU).
    forward = torch.compile(model) if cfg["compile"] else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                  fused=device.type == "cuda")
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg["warmup_ratio"] * total_steps),
                                                total_steps)
    generator = torch.Generator().manual_seed(cfg["seed"])
    train_tokens = PackedTokens(train_x, pad_id, device, min_width, pad_multiple(device), train_y)
    val_tokens = PackedTokens(val_x, pad_id, device, min_width, pad_multiple(device))
    eval_batch = cfg["batch_size"] * 4
    best: dict[str, Any] = {"accuracy": -1.0}
    step, seen, window, eval_time = 0, 0, [], 0.0

    def evaluate_now() -> None:
        nonlocal eval_time
        if device.type == "cuda":
            torch.cuda.synchronize()  # queued training steps belong to training time
        start = time.perf_counter()
        scores = validate(model, val_tokens, val_y, eval_batch, device, dtype)
        eval_time += time.perf_counter() - start  # validate() syncs: it ends with a copy to the host
        live.step = step
        for name, value in scores.items():
            live.log_metric(f"val/{name}", value)
        log.info("step %d: validation accuracy %.4f, loss %.4f", step, scores["accuracy"], scores["loss"])
        if scores["accuracy"] > best["accuracy"]:
            best.update(scores, step=step,
                        state={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    model.train()
    start = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        batches = length_grouped_batches(train_tokens.lengths, cfg["batch_size"], generator,
                                         cfg["group_by_length"])
        bar = tqdm(batches[:total_steps - step], desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                   unit="step", disable=None)
        epoch_losses = []
        for batch in bar:
            with autocast(device, dtype):
                loss = forward(**train_tokens.batch(batch)).loss
            loss.backward()
            if cfg["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(loss.detach())
            step += 1
            seen += len(batch)
            if step % cfg["log_every_steps"] == 0 or step == total_steps:
                mean_loss = torch.stack(window).float().mean().item()  # .item() syncs the GPU
                epoch_losses.append(mean_loss)
                window = []
                live.step = step
                live.log_metric("train/loss", mean_loss)
                live.log_metric("train/lr", scheduler.get_last_lr()[0])
                bar.set_description(f"epoch {epoch + 1}/{cfg['epochs']} loss {mean_loss:.3f}")
            if cfg["eval_every_steps"] and step % cfg["eval_every_steps"] == 0 and step < total_steps:
                evaluate_now()
        log.info("epoch %d/%d: %d steps, mean train loss %.4f", epoch + 1, cfg["epochs"], step,
                 float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
        evaluate_now()
        if step >= total_steps:
            break
    train_time = time.perf_counter() - start - eval_time

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in best["state"]:
                param.copy_(best["state"][name])
    return {"train_loss": epoch_losses[-1] if epoch_losses else float("nan"),
            "best_val_accuracy": best["accuracy"], "best_val_loss": best["loss"],
            "best_step": best["step"], "steps": step, "train_samples": seen,
            "train_time_s": round(train_time, 2),
            "samples_per_s": round(seen / train_time, 2) if train_time else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--data", required=True, help="tokenized dataset directory")
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--adapter-out", required=True)
    parser.add_argument("--metrics-out", required=True)
    args = parser.parse_args(argv)

    def work() -> None:
        p = load_params(args.params, PARAMS)
        quant, lora, cfg = p.section("quant"), p.section("lora"), p.section("train")
        base_dir = require_dir(args.base, "base model")
        data, meta = load_tokenized(Path(args.data))
        origin = read_json(base_dir / "SOURCE.json")
        set_seed(cfg["seed"])
        device, dtype = compute_setup(quant["compute_dtype"])
        model = load_base(base_dir, meta["labels"], quant, lora["modules_to_save"], device, dtype)
        model = prepare_for_training(model, cfg["gradient_checkpointing"], quant["cache_dequantized"])
        model = attach_lora(model, lora)
        n_trainable, n_all = model.get_nb_trainable_parameters()
        log.info("model %s, quant %s, device %s, compute %s: %d trainable of %d parameters (%.3f%%)",
                 origin["name_or_path"], quant["type"], device, dtype, n_trainable, n_all,
                 100 * n_trainable / n_all)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        min_width = meta["max_length"] if meta["padding"] == "max_length" else 0
        from dvclive import Live  # here, so the loop above imports where DVCLive is absent (GPU benchmark)

        with atomic_dir(args.metrics_out) as metrics_tmp:
            live = Live(str(metrics_tmp), dvcyaml=False, save_dvc_exp=False)
            summary = train(model, data, tokenizer.pad_token_id, min_width, cfg, live, device, dtype)
            summary.update({"model": origin["name_or_path"], "quant_type": quant["type"],
                            "lora_r": lora["r"], "lora_alpha": lora["alpha"],
                            "trainable_params": n_trainable, "all_params": n_all,
                            "trainable_percent": round(100 * n_trainable / n_all, 4),
                            "peak_memory_mb": round(peak_memory_mb(device), 1),
                            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
            live.summary = summary
            live.end()
            with atomic_dir(args.adapter_out) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                write_adapter_config(tmp)
                tokenizer.save_pretrained(tmp)
                write_json(tmp / PIPELINE_FILE, {**meta, "quant": quant, "lora": lora, "train": cfg,
                                                 "modules_to_save": lora["modules_to_save"],
                                                 "base": origin})
        log.info("train: best validation accuracy %.4f at step %d, %.1f samples/s -> %s",
                 summary["best_val_accuracy"], summary["best_step"], summary["samples_per_s"],
                 args.adapter_out)

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
