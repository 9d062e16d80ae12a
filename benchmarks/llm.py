"""QLoRA on a billion-parameter decoder, one GPU: the standard recipe against ours (issue 21).

    python benchmarks/llm.py --work /tmp/llm                      # 8B: standard + ours
    python benchmarks/llm.py --sections ours --ours-variants 8x1+ckpt+compile
    python benchmarks/llm.py --sections context --context-sizes 32768,65536,131072,262144
    python benchmarks/llm.py --sections llama70b                  # 70B-class, built in 4 bits on the GPU
    python benchmarks/llm.py --smoke                              # the whole script on a CPU, tiny-llama

Model: configs/llama-3.1-8b with seeded random weights (stages/lib/random_init.py), written once
as bf16 shards under --work (reused when present) and loaded in NF4 by both recipes. Data: the
tiny-Shakespeare text (data/tiny_shakespeare) tokenized with the config's tokenizer, cut into
--block-token blocks, the same blocks in the same order for every recipe (no shuffling).

STANDARD: Hugging Face Trainer + peft + bitsandbytes NF4 double quant, bf16, SDPA, gradient
checkpointing (use_reentrant False), paged_adamw_8bit, LoRA r32 alpha32 on q/k/v/o/gate/up/down,
dropout 0, lr 2e-4 constant, max_grad_norm 1.0 (Trainer's default), batch 2 x accumulation 4.
STANDARD-KBIT (section `standard-kbit`): the same plus peft's prepare_model_for_kbit_training, which
upcasts the unquantized weights (embeddings, norms, head) to fp32, as many published recipes do
(the issue's 4,894 tokens/s figure is this variant). Both standard sections can run in one
process beside ours; ours is compared with each that ran.

OURS: the pipeline's loading (4-bit base, no 16-bit copy: quant.cache_dequantized false), LoRA and
gradient-checkpointing set-up, a written-out loop with the chunked cross-entropy of
stages/lib/losses.py, and the same optimizer, lr, clipping and LoRA init (same seed). Variants
(--ours-variants, comma separated): `<batch>x<accumulation>` plus `+ckpt` (gradient checkpointing
per decoder layer; `+ckpt4`: every 4th layer only, quantized.checkpoint_every), `+compile`
(torch.compile of each decoder layer), `+offload` (checkpointing whose saved layer inputs wait in
pinned host memory, stages/lib/offload.py; `+offload4` likewise every 4th layer), `+fused` (base matmul and LoRA as one autograd function, stages/lib/fused_lora.py). Every variant sees the same blocks per optimizer step
(batch x accumulation must equal the standard recipe's), so its losses compare step by step.
benchmarks/scaling_llm.py runs the same loading and loop on several GPUs under DDP (issue 20).

Figures per recipe: steady-state tokens/s (steps after --warmup-steps; load and warm-up time are
reported separately), peak GiB (torch.cuda.max_memory_allocated, reset between recipes; paged
optimizer states live in CUDA managed memory, outside that count), MFU (FLOPs counted as stated
in the JSON's `flops`), and the losses. --profile adds the last step's kernel table, --memory what
was allocated at the last step's peak by allocation site (both steps left out of the rate). Each
section is fail-soft: an error is recorded in the
JSON and the script goes on; the JSON is rewritten after every section.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import machine  # noqa: E402
from stages.lib.distributed import Processes  # noqa: E402
from stages.lib.losses import ChunkedCausalLM  # noqa: E402
from stages.lib.params import Lora, Quant  # noqa: E402
from stages.lib.quantized import (attach_lora, checkpoint_every, compute_setup, load_base,  # noqa: E402
                                  prepare_for_training)
from stages.lib.fused_lora import fuse_lora_4bit  # noqa: E402
from stages.lib.offload import enable_offloaded_checkpointing  # noqa: E402
from stages.lib.optimizers import build_optimizer  # noqa: E402
from stages.lib.random_init import build_quantized_random, meta_model, write_random_init, _config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0
# dense bf16 tensor-core peak per GPU, from the vendor's datasheet (no sparsity)
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
LOSS_STEPS = 20
# Losses of the two recipes may differ by bf16 rounding: the same sums in another order (chunked
# head, fused kernels) change each bf16 matmul output by up to 2^-8 relative, and the LoRA updates
# then drift apart a little per step. 1% relative on a loss near ln(vocab) is far above that
# rounding and far below what a real difference (wrong labels, masking, scaling) would make.
LOSS_RTOL = 0.01


def say(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# --- machine, memory, timing -------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None


def reserved_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_reserved() / 2**30, 3) if device.type == "cuda" else None


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_properties(device).name
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(config, block: int, recompute: float) -> dict[str, Any]:
    """Model FLOPs of one trained token of a QLoRA step (frozen base, LoRA trained).

    Decoder-layer matmuls: forward 2N, backward input gradients 2N (the frozen base needs no
    weight gradients), recomputation with checkpointing another 2N for the share `recompute` of
    the layers that are checkpointed (0 to 1). Output layer: forward and
    input gradient, 4·N_head (never recomputed). Causal attention scores and values: 2·2·d·S/2
    per layer forward (S the block length, half the pairs under the causal mask), backward twice
    that, plus the recomputation. LoRA's own matmuls (about 1% at r32) are not counted.
    """
    model = meta_model(config)
    layer_params = sum(m.weight.numel() for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".layers." in n)
    head_params = model.get_output_embeddings().weight.numel()
    d, layers = config.hidden_size, config.num_hidden_layers
    attention = 2 * d * block * layers  # forward, causal
    total = 2 * layer_params * (2 + recompute) + 4 * head_params + attention * (3 + recompute)
    return {"per_token": total, "decoder_linear_params": layer_params, "head_params": head_params,
            "formula": "2*N_layers*(2+recompute) + 4*N_head + 2*d*S*L*(3+recompute); LoRA matmuls not counted",
            "recompute": round(recompute, 4)}


# --- data --------------------------------------------------------------------------------------

def corpus_tokens(config_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config_dir)
    text = (ROOT / "data/tiny_shakespeare/train.txt").read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def blocks(corpus: torch.Tensor, block: int, count: int, offset: int = 0) -> list[torch.Tensor]:
    """`count` consecutive `block`-token windows of the corpus, repeated end to end as needed."""
    need = offset + block * count
    tiled = corpus.repeat(math.ceil(need / len(corpus)))
    return [tiled[offset + i * block: offset + (i + 1) * block].clone() for i in range(count)]


def predicted_tokens(batch_blocks: list[torch.Tensor]) -> int:
    """Tokens with a next-token label: every position but the last of each block."""
    return sum(len(b) - 1 for b in batch_blocks)


# --- recipes -----------------------------------------------------------------------------------

def lora_settings() -> Lora:
    return Lora(r=32, alpha=32, dropout=0.0, target_modules=TARGETS, modules_to_save=[])


def nf4(dtype: torch.dtype) -> Quant:
    """The params schema's quant section for NF4 double quant in `dtype` (base kept in 4 bits)."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return Quant(type="nf4", double_quant=True, compute_dtype=name, cache_dequantized=False)


def summarise(step_seconds: list[float], losses: list[float], tokens_per_step: int, warmup: int,
              flops: dict[str, Any], device: torch.device) -> dict[str, Any]:
    steady = step_seconds[warmup:]
    out: dict[str, Any] = {"steps": len(step_seconds), "tokens_per_step": tokens_per_step,
                           "step_seconds": [round(s, 4) for s in step_seconds],
                           "warmup_seconds": round(sum(step_seconds[:warmup]), 3),
                           "losses": [round(x, 6) for x in losses]}
    if steady:
        tps = tokens_per_step * len(steady) / sum(steady)
        out["tokens_per_s"] = round(tps, 1)
        peak = peak_flops(device)
        out["model_tflops_per_s"] = round(tps * flops["per_token"] / 1e12, 1)
        out["mfu"] = round(tps * flops["per_token"] / peak, 4) if peak else None
        out["mfu_peak_tflops"] = peak / 1e12 if peak else None
    out["peak_gib"] = peak_gib(device)
    out["peak_reserved_gib"] = reserved_gib(device)
    return out


def run_standard(model_dir: Path, data: list[torch.Tensor], args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype, batch: int, accumulation: int, steps: int, config,
                 kbit_prep: bool = False) -> dict[str, Any]:
    """Hugging Face Trainer + peft + bitsandbytes NF4, as the published QLoRA recipes run it;
    `kbit_prep` adds peft's prepare_model_for_kbit_training (fp32 upcast of unquantized weights)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback,
                              TrainingArguments)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa", use_safetensors=True,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
        device_map={"": torch.cuda.current_device()} if device.type == "cuda" else None)
    model.config.use_cache = False
    if kbit_prep:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(SEED)  # the LoRA A init; ours seeds the same way
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    model.enable_input_require_grads()
    sync(device)
    load_s = time.perf_counter() - t0

    class Blocks(torch.utils.data.IterableDataset):  # iterable: Trainer keeps its order
        def __iter__(self):
            for b in data:
                yield {"input_ids": b, "labels": b}

    record: dict[str, list] = {"micro": [], "losses": [], "seconds": [], "num_items": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            sync(device)
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            now = time.perf_counter()
            record["seconds"].append(now - self.last)
            self.last = now
            record["losses"].append(float(sum(x.float() for x in record["micro"])))
            record["micro"].clear()
            say(f"  standard step {len(record['seconds'])}/{steps} loss {record['losses'][-1]:.4f} "
                f"{record['seconds'][-1]:.2f}s")

    class RecordingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            record["micro"].append((out[0] if return_outputs else out).detach())
            if len(record["micro"]) == 1:
                record["num_items"].append(int(num_items_in_batch) if num_items_in_batch is not None else None)
            return out

    training_args = TrainingArguments(
        output_dir=str(args.work / "trainer"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim=args.optimizer, bf16=dtype == torch.bfloat16, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        remove_unused_columns=False, seed=SEED)
    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=Blocks(), callbacks=[Timer()])
    try:
        trainer.train()
    finally:
        trainer.accelerator.free_memory()
        del trainer
    out = summarise(record["seconds"], record["losses"], batch * accumulation * len(data[0]), args.warmup_steps,
                    flops_per_token(config, len(data[0]), 1.0), device)
    out.update(load_s=round(load_s, 2), trainer_num_items=record["num_items"][:3],
               settings={"batch": batch, "accumulation": accumulation, "block": len(data[0]),
                         "optimizer": args.optimizer, "lr": args.lr, "kbit_prep": kbit_prep,
                         "dtype": str(dtype)})
    del model
    return out


def parse_variant(spec: str) -> dict[str, Any]:
    head, *flags = spec.split("+")
    batch, _, accumulation = head.partition("x")
    # ckptN / offloadN: checkpoint every N-th decoder layer only (quantized.checkpoint_every)
    every = 1
    for i, flag in enumerate(flags):
        for word in ("ckpt", "offload"):
            if flag.startswith(word) and flag[len(word):].isdigit() and int(flag[len(word):]) >= 1:
                every, flags[i] = int(flag[len(word):]), word
    unknown = set(flags) - {"ckpt", "compile", "offload", "fused"}
    if unknown or not batch.isdigit() or not accumulation.isdigit():
        raise SystemExit(f"error: variant {spec!r}: expected "
                         "<batch>x<accumulation>[+ckpt[N]|+offload[N]][+compile][+fused]")
    # +offload is checkpointing whose saved layer inputs wait in host memory
    checkpointing = "ckpt" in flags or "offload" in flags
    return {"name": spec, "batch": int(batch), "accumulation": int(accumulation),
            "checkpointing": checkpointing, "checkpoint_every": every if checkpointing else None,
            "compile": "compile" in flags, "offload": "offload" in flags, "fused": "fused" in flags}


def recomputed_share(variant: dict[str, Any], config) -> float:
    """The share of decoder layers the backward pass recomputes (load_ours counts them)."""
    return variant.get("checkpointed_layers", 0) / config.num_hidden_layers


def load_ours(model_dir: Path | None, device: torch.device, dtype: torch.dtype, variant: dict[str, Any],
              build_config: Path | None = None):
    """The pipeline's 4-bit base (no 16-bit copy), LoRA attached with the same seed as Trainer's
    run; or, with `build_config`, the architecture built in 4 bits on the device (no disk)."""
    if build_config is not None:
        model = build_quantized_random(build_config, SEED, device, compute_dtype=dtype)
    else:
        model = load_base(model_dir, [], nf4(dtype), [], device, dtype, attn_implementation="sdpa", task="causal-lm")
    model.config.use_cache = False
    model = prepare_for_training(model, gradient_checkpointing=variant["checkpointing"],
                                 cache_dequantized=False, base_dropout=False)
    torch.manual_seed(SEED)
    model = attach_lora(model, lora_settings(), task="causal-lm")
    model.train()
    if variant["offload"]:
        enable_offloaded_checkpointing(model)
    if variant["checkpointing"]:
        variant["checkpointed_layers"] = checkpoint_every(model, variant["checkpoint_every"])
    if variant["fused"]:
        fuse_lora_4bit(model)
    if variant["compile"]:
        layers = model.get_base_model().model.layers
        for layer in layers:
            layer.compile()
    return model


def kernel_profile(prof, rows: int = 25) -> dict[str, Any]:
    """The profiled step's GPU time by operator (self time, largest first), as table lines."""
    events = prof.key_averages()
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    total = sum(getattr(e, attr) for e in events)
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:rows]
    return {"gpu_ms": round(total / 1e3, 2),
            "by_operator": [f"{getattr(e, attr) / 1e3:9.2f} ms {100 * getattr(e, attr) / max(total, 1):5.1f}% "
                            f"x{e.count:<6d} {e.key[:110]}" for e in top]}


def allocation_site(frames: list[dict[str, Any]]) -> str:
    """Where an allocation came from: the two innermost Python frames outside torch's own package
    (our code, transformers, peft, bitsandbytes, or a compiled graph's generated module)."""
    outside = [f for f in frames if "site-packages/torch/" not in f.get("filename", "")][:2]
    return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in outside) or "torch internals"


def memory_at_peak(trace: list[dict[str, Any]], before: int, rows: int = 20) -> dict[str, Any]:
    """Replay one step's CUDA allocator trace (torch.cuda.memory._snapshot()'s device_traces):
    what was allocated at the step's peak, summed by allocation site. `before` is what was
    allocated when the trace began (weights, LoRA, optimizer states): it is not in the trace."""
    live: dict[int, tuple[int, str]] = {}
    current = peak = before
    at_peak: dict[int, tuple[int, str]] = {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], allocation_site(event.get("frames", [])))
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    sites: dict[str, list[int]] = {}
    for size, site in at_peak.values():
        total = sites.setdefault(site, [0, 0])
        total[0] += size
        total[1] += 1
    top = sorted(sites.items(), key=lambda kv: -kv[1][0])[:rows]
    return {"before_step_gib": round(before / 2**30, 3), "peak_gib": round(peak / 2**30, 3),
            "step_peak_over_before_gib": round((peak - before) / 2**30, 3),
            "at_peak_by_site": [f"{total / 2**30:7.3f} GiB x{count:<5d} {site}" for site, (total, count) in top]}


def train_ours(model, data: list[torch.Tensor], variant: dict[str, Any], steps: int, args: argparse.Namespace,
               device: torch.device, dtype: torch.dtype, label: str, deadline: float,
               profile: dict[str, Any] | None = None,
               processes: Processes | None = None,
               memory: dict[str, Any] | None = None) -> tuple[list[float], list[float]]:
    """The written-out loop: micro-batches, chunked loss over the step's predicted tokens,
    clipping, optimizer step. Returns per-step seconds and losses. With `profile` (a dict to
    fill), the last step runs under torch.profiler and its kernel table goes there; with `memory`
    (a dict), the allocator's trace of the last step is replayed into what was live at its peak.

    With `processes` (DDP workers, benchmarks/scaling_llm.py), `data` holds this worker's own
    blocks, `variant` its share of each step. DDP averages the LoRA gradients once per step,
    after the last micro-batch (the others run under no_sync), so the update is that of all the
    workers' blocks; the losses are the workers' mean, and all stop at the same step when one
    reaches the deadline (a worker left alone in a collective would wait forever)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optimizer, trainable, lr=args.lr, weight_decay=0.0)
    forward = ChunkedCausalLM(model, args.ce_chunk)
    if processes is not None:
        forward = processes.wrap(forward)
    per_step = variant["batch"] * variant["accumulation"]
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 \
        else contextlib.nullcontext()
    talk = processes is None or processes.is_main
    seconds, losses = [], []
    sync(device)
    last = time.perf_counter()
    for step in range(steps):
        profiler = None
        if profile is not None and step == steps - 1 and device.type == "cuda":
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            profiler.__enter__()
        recording = memory is not None and step == steps - 1 and device.type == "cuda"
        if recording:
            before = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        step_blocks = data[step * per_step:(step + 1) * per_step]
        num_items = predicted_tokens(step_blocks)
        total = torch.zeros((), device=device)
        for micro in range(variant["accumulation"]):
            ids = torch.stack(step_blocks[micro * variant["batch"]:(micro + 1) * variant["batch"]]).to(device, non_blocking=True)
            keep_local = micro < variant["accumulation"] - 1  # DDP's all-reduce after the last one only
            with processes.no_sync(forward, keep_local) if processes is not None else contextlib.nullcontext():
                with autocast:
                    loss = forward(input_ids=ids, labels=ids, num_items=num_items).loss
                loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            profile.update(kernel_profile(profiler), step=step + 1)
        if recording:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            memory.update(memory_at_peak(snapshot["device_traces"][torch.cuda.current_device()], before),
                          step=step + 1)
        now = time.perf_counter()
        seconds.append(now - last)
        last = now
        stop = time.monotonic() > deadline
        if processes is not None:  # one collective for both: the mean loss, and whether any must stop
            total, late = processes.mean(torch.stack([total, torch.tensor(float(stop), device=device)])).unbind()
            stop = late.item() > 0
        losses.append(total.item())
        if talk:
            say(f"  {label} step {step + 1}/{steps} loss {losses[-1]:.4f} {seconds[-1]:.2f}s")
        if stop:
            if talk:
                say(f"  {label}: time budget reached, stopping after {step + 1} steps")
            break
    del optimizer
    return seconds, losses


def run_ours(model_dir: Path, data: list[torch.Tensor], variant: dict[str, Any], args: argparse.Namespace,
             device: torch.device, dtype: torch.dtype, steps: int, config, deadline: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = load_ours(model_dir, device, dtype, variant)
    sync(device)
    load_s = time.perf_counter() - t0
    after_load_gib = round(torch.cuda.memory_allocated() / 2**30, 3) if device.type == "cuda" else None
    profile: dict[str, Any] | None = {} if args.profile else None
    # torch 2.11: recording allocations while a checkpointed compiled layer recomputes fails
    # with "SystemError: ... returned NULL without setting an exception" (pytorch#179536)
    untraceable = variant["checkpointing"] and not variant["offload"] and variant["compile"]
    memory: dict[str, Any] | None = {} if args.memory and not untraceable else None
    seconds, losses = train_ours(model, data, variant, steps, args, device, dtype, f"ours[{variant['name']}]",
                                 deadline, profile, memory=memory)
    block = len(data[0])
    # a profiled or memory-traced last step runs slower (their own cost): out of the steady-state figure
    timed = seconds[:-1] if profile or memory else seconds
    out = summarise(timed, losses, variant["batch"] * variant["accumulation"] * block, args.warmup_steps,
                    flops_per_token(config, block, recomputed_share(variant, config)), device)
    out.update(load_s=round(load_s, 2), settings={**variant, "block": block, "optimizer": args.optimizer,
                                                  "lr": args.lr, "ce_chunk_tokens": args.ce_chunk,
                                                  "dtype": str(dtype), "cache_dequantized": False})
    if profile:
        out["profile_last_step"] = {**profile, "step_seconds_with_profiler": round(seconds[-1], 4)}
    if memory:
        out["memory_last_step"] = {"allocated_after_load_gib": after_load_gib, **memory}
    elif args.memory:
        out["memory_last_step"] = {"skipped": "checkpointing with compile: pytorch#179536"}
    del model
    return out


def compare_losses(standard: list[float], ours: list[float]) -> dict[str, Any]:
    n = min(len(standard), len(ours), LOSS_STEPS)
    if n == 0:
        return {"steps": 0}
    abs_diff = [abs(a - b) for a, b in zip(standard[:n], ours[:n])]
    rel_diff = [d / abs(a) for d, a in zip(abs_diff, standard[:n])]
    return {"steps": n, "max_abs_diff": round(max(abs_diff), 6), "max_rel_diff": round(max(rel_diff), 6),
            "tolerance_rel": LOSS_RTOL, "within_tolerance": max(rel_diff) <= LOSS_RTOL,
            "standard": [round(x, 6) for x in standard[:n]], "ours": [round(x, 6) for x in ours[:n]]}


# --- context probes ----------------------------------------------------------------------------

def probe_context(recipe: str, sizes: list[int], corpus: torch.Tensor, model_dir: Path, args: argparse.Namespace,
                  device: torch.device, dtype: torch.dtype, config) -> list[dict[str, Any]]:
    """One optimizer step at batch 1 for each size in order; after a failure or a probe over
    --probe-seconds, larger sizes are skipped."""
    results: list[dict[str, Any]] = []
    failed_at: int | None = None
    for size in sizes:
        if failed_at is not None and size >= failed_at:
            results.append({"tokens": size, "skipped": f"a probe at {failed_at} tokens failed or ran too long"})
            continue
        free_memory(device)
        say(f"context probe {recipe}: {size} tokens")
        data = blocks(corpus, size, 1)
        entry: dict[str, Any] = {"tokens": size}
        t0 = time.perf_counter()
        try:
            if recipe == "standard":
                r = run_standard(model_dir, data, args, device, dtype, 1, 1, 1, config)
                entry.update(trained=True, loss=r["losses"][0], step_seconds=r["step_seconds"][0])
            else:
                variant = parse_variant(args.context_ours)
                variant.update(batch=1, accumulation=1)
                model = load_ours(model_dir, device, dtype, variant)
                seconds, losses = train_ours(model, data, variant, 1, args, device, dtype, f"ours-context {size}",
                                             time.monotonic() + 1e9)
                del model
                entry.update(trained=True, loss=losses[0], step_seconds=round(seconds[0], 3), variant=args.context_ours)
            entry["tokens_per_s"] = round(size / entry["step_seconds"], 1)
        except torch.OutOfMemoryError as e:
            entry.update(trained=False, error=f"OutOfMemoryError: {str(e).splitlines()[0][:300]}")
        except Exception as e:  # noqa: BLE001 (fail-soft per probe)
            entry.update(trained=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        elapsed = time.perf_counter() - t0
        entry.update(peak_gib=peak_gib(device), wall_s=round(elapsed, 2))
        say(f"  {recipe} {size}: {'trained' if entry.get('trained') else 'failed'} peak {entry['peak_gib']} GiB "
            f"{elapsed:.1f}s {entry.get('error', '')}")
        if not entry.get("trained") or elapsed > args.probe_seconds:
            failed_at = size
        results.append(entry)
        del data
        free_memory(device)
    return results


# --- driver ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/qlora-llm"), help="weights and Trainer scratch")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/h200-llm.json")
    p.add_argument("--config", type=Path, default=ROOT / "configs/llama-3.1-8b")
    p.add_argument("--sections", default="standard,ours",
                   help="comma list of: standard, standard-kbit, ours, context, llama70b "
                        "(--context-sizes and --llama70b add theirs)")
    p.add_argument("--steps", type=int, default=25, help="optimizer steps per recipe")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps left out of tokens/s (compile, allocator)")
    p.add_argument("--block", type=int, default=2048, help="tokens per block")
    p.add_argument("--batch", type=int, default=2, help="standard recipe: blocks per micro-batch")
    p.add_argument("--accumulation", type=int, default=4, help="standard recipe: micro-batches per step")
    p.add_argument("--ours-variants", default="2x4+ckpt,8x1+ckpt+compile",
                   help="comma list of <batch>x<accumulation>[+ckpt[N]|+offload[N]][+compile][+fused]; "
                        "N: checkpoint every N-th decoder layer only")
    p.add_argument("--optimizer", default="paged_adamw_8bit")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ce-chunk", type=int, default=2048, help="tokens per chunk of the chunked cross-entropy")
    p.add_argument("--context-sizes", default="", help="comma list of batch-1 block lengths to probe, in order")
    p.add_argument("--context-recipes", default="standard,ours")
    p.add_argument("--context-ours", default="1x1+ckpt+offload", help="the ours variant the context probes use")
    p.add_argument("--probe-seconds", type=float, default=120.0,
                   help="a context probe slower than this stops the larger ones")
    p.add_argument("--llama70b", action="store_true", help="add the 70B-class section")
    p.add_argument("--llama70b-config", type=Path, default=ROOT / "configs/llama-3.3-70b")
    p.add_argument("--llama70b-block", type=int, default=8192)
    p.add_argument("--llama70b-steps", type=int, default=3)
    p.add_argument("--llama70b-variant", default="1x1+ckpt")
    p.add_argument("--profile", action="store_true",
                   help="profile each ours variant's last step (GPU): kernel time by operator into the JSON")
    p.add_argument("--memory", action="store_true",
                   help="replay the allocator trace of each ours variant's last step: what is live at its peak, by "
                        "site (not for +ckpt with +compile: pytorch#179536)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; when spent, training loops stop early and later sections are skipped (0: none)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU run of every section on configs/tiny-llama with tiny sizes (tests the script)")
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
    if "--smoke" in given:
        # tiny sizes on the CPU; flags given explicitly still win
        p.set_defaults(config=ROOT / "configs/tiny-llama", llama70b_config=ROOT / "configs/tiny-llama",
                       steps=2, warmup_steps=1, block=64, batch=2, accumulation=2,
                       ours_variants="2x2+ckpt,4x1+offload+fused", ce_chunk=48, context_sizes="128",
                       sections="standard,standard-kbit,ours,context,llama70b", llama70b_block=96, llama70b_steps=2)
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if "--context-sizes" in given and "context" not in sections:
        sections.append("context")
    if args.llama70b and "llama70b" not in sections:
        sections.append("llama70b")
    unknown = set(sections) - {"standard", "standard-kbit", "ours", "context", "llama70b"}
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}")
    args.section_list = sections
    args.variants = [parse_variant(v) for v in args.ours_variants.split(",") if v]
    for v in args.variants:
        if v["batch"] * v["accumulation"] != args.batch * args.accumulation:
            p.error(f"--ours-variants {v['name']}: batch x accumulation must be {args.batch * args.accumulation} "
                    "(the standard recipe's blocks per step) for the loss comparison")
    parse_variant(args.context_ours)
    parse_variant(args.llama70b_variant)
    args.sizes = [int(s) for s in args.context_sizes.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from stages.lib.io import write_json

    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget > 0 else float("inf")
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = compute_setup("bf16")
    args.work.mkdir(parents=True, exist_ok=True)
    config = _config(args.config)
    results: dict[str, Any] = {
        "benchmark": "benchmarks/llm.py", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:] if argv is None else argv, "machine": machine(device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("variants", "section_list", "sizes")},
        "model": {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
                  "parameters": sum(p.numel() for p in meta_model(config).parameters()),
                  "weights": "seeded random (stages/lib/random_init.py), not a pretrained model"},
        "loss_tolerance_note": f"relative {LOSS_RTOL} (see LOSS_RTOL in benchmarks/llm.py for why)",
        "sections": {}}

    def save() -> None:
        write_json(args.out, results)

    def section(name: str, work: Callable[[], Any]) -> Any:
        if time.monotonic() > deadline:
            results["sections"][name] = {"skipped": "time budget spent"}
            say(f"== {name}: skipped (time budget spent)")
            save()
            return None
        say(f"== {name}")
        free_memory(device)
        t0 = time.perf_counter()
        try:
            value = work()
            results["sections"][name] = value
        except Exception as e:  # noqa: BLE001 (fail-soft: record and go on)
            value = None
            results["sections"][name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                                         "traceback": traceback.format_exc()[-6000:]}
            say(f"== {name}: FAILED {type(e).__name__}: {str(e)[:500]}")
        if isinstance(results["sections"][name], dict):
            results["sections"][name]["section_wall_s"] = round(time.perf_counter() - t0, 2)
        free_memory(device)
        save()
        return value

    needs_weights = {"standard", "standard-kbit", "ours", "context"} & set(args.section_list)
    model_dir = args.work / f"{args.config.name}-seed{SEED}"
    if needs_weights:
        def build() -> dict[str, Any]:
            t0 = time.perf_counter()
            reused = (model_dir / "random-init.json").is_file()
            write_random_init(args.config, model_dir, SEED, device=device, layers_per_shard=4)
            sync(device)
            return {"dir": str(model_dir), "reused": reused, "seconds": round(time.perf_counter() - t0, 2),
                    "bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))}
        if section("weights", build) is None:
            say("no weights: the sections that need them will fail")

    corpus = corpus_tokens(args.config)
    per_step = args.batch * args.accumulation
    data = blocks(corpus, args.block, per_step * args.steps)
    say(f"data: {len(corpus)} corpus tokens, {len(data)} blocks of {args.block}, {per_step * args.block} tokens per step")
    standards: dict[str, dict[str, Any]] = {}  # section name -> its results, for the comparisons
    for name, kbit_prep in (("standard", False), ("standard-kbit", True)):
        if name in args.section_list:
            value = section(name, lambda k=kbit_prep: run_standard(model_dir, data, args, device, dtype, args.batch,
                                                                   args.accumulation, args.steps, config, k))
            if value:
                standards[name] = value
    if "ours" in args.section_list:
        for variant in args.variants:
            ours = section(f"ours[{variant['name']}]",
                           lambda v=variant: run_ours(model_dir, data, v, args, device, dtype, args.steps, config, deadline))
            for name, standard in standards.items():
                if not ours:
                    break
                suffix = name.replace("-", "_")  # vs_standard, vs_standard_kbit
                entry = results["sections"][f"ours[{variant['name']}]"]
                entry[f"loss_vs_{suffix}"] = compare_losses(standard["losses"], ours["losses"])
                if standard.get("tokens_per_s") and ours.get("tokens_per_s"):
                    entry[f"speedup_vs_{suffix}"] = round(ours["tokens_per_s"] / standard["tokens_per_s"], 3)
                    if standard.get("peak_gib") and ours.get("peak_gib"):
                        entry[f"memory_vs_{suffix}"] = round(ours["peak_gib"] / standard["peak_gib"], 3)
            save()
    if "context" in args.section_list and not args.sizes:
        results["sections"]["context"] = {"skipped": "no --context-sizes"}
    elif "context" in args.section_list:
        for recipe in [r for r in args.context_recipes.split(",") if r]:
            section(f"context[{recipe}]", lambda r=recipe: {"probes": probe_context(r, args.sizes, corpus, model_dir,
                                                                                   args, device, dtype, config)})

    if "llama70b" in args.section_list:
        def llama70b() -> dict[str, Any]:
            variant = parse_variant(args.llama70b_variant)
            big = _config(args.llama70b_config)
            t0 = time.perf_counter()
            model = load_ours(None, device, dtype, variant, build_config=args.llama70b_config)
            sync(device)
            build_s = time.perf_counter() - t0
            built_gib = peak_gib(device)
            per = variant["batch"] * variant["accumulation"]
            data70 = blocks(corpus, args.llama70b_block, per * args.llama70b_steps)
            seconds, losses = train_ours(model, data70, variant, args.llama70b_steps, args, device, dtype,
                                         "llama70b", deadline)
            del model
            out = summarise(seconds, losses, per * args.llama70b_block, min(1, len(seconds) - 1),
                            flops_per_token(big, args.llama70b_block, recomputed_share(variant, big)), device)
            out.update(config=str(args.llama70b_config.name), build_s=round(build_s, 2),
                       peak_gib_after_build=built_gib, settings={**variant, "block": args.llama70b_block},
                       parameters=sum(p.numel() for p in meta_model(big).parameters()),
                       note="built in NF4 layer by layer on the device from seeded random bf16 weights; no disk")
            return out
        section("llama70b", llama70b)

    results["wall_s"] = round(time.monotonic() - start, 1)
    save()
    say(f"done in {results['wall_s']} s; results in {args.out}")
    for name, value in results["sections"].items():
        if isinstance(value, dict):
            brief = {k: value[k] for k in ("tokens_per_s", "peak_gib", "mfu", "speedup_vs_standard",
                                           "speedup_vs_standard_kbit", "error") if k in value}
            if "loss_vs_standard" in value:
                brief["loss_max_rel_diff"] = value["loss_vs_standard"].get("max_rel_diff")
            say(f"  {name}: {json.dumps(brief)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
