"""What the benchmark scripts share: the repository on sys.path, AG News tokenized for a model,
the model directories (real MiniLM or a random-init bert-base), the pipeline's quantized LoRA
model, its training loop and adapter directory, GPU timing and profiling helpers, and what a
result record says about its run (machine and versions, argv, the compile cache).

A script imports this module first (`import common`: the script's own directory is on sys.path),
then the library (`stages.lib.*`); configs are built through the params schema (train_config).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/<script>.py`: the library sits beside
    sys.path.insert(0, str(ROOT))

from stages.lib.adapter import load_adapter  # noqa: E402
from stages.lib.adapter_meta import AdapterMeta, save_adapter  # noqa: E402
from stages.lib.compiling import compile_cache_dir  # noqa: E402
from stages.lib.distributed import Processes  # noqa: E402
from stages.lib.io import sha256_file  # noqa: E402
from stages.lib.loop import NullLive, TrainingLoop  # noqa: E402
from stages.lib.params import Lora, Quant, Task, Train  # noqa: E402
from stages.lib.quantized import attach_lora, compute_setup, load_base, prepare_for_training  # noqa: E402
from stages.lib.sources import BaseOrigin, load_tokenizer, resolve_model_source  # noqa: E402
from stages.lib.tasks import Objective  # noqa: E402

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
LORA = Lora(r=16, alpha=32, dropout=0.05, target_modules=["query", "value"], modules_to_save=["classifier"])
CLASSIFICATION = Task(type="classification", metric="accuracy", mlm_probability=0.15)


# The loop settings every benchmark shares (the loop reads base_dropout and processes elsewhere:
# the model is prepared and the workers started by the script).
TRAIN = dict(seed=42, epochs=1, lr=1e-3, batch_size=32, weight_decay=0.01, warmup_ratio=0.06, max_grad_norm=1.0,
             max_steps=0, eval_every_steps=0, log_every_steps=50, checkpoint_every_steps=0, group_by_length=True,
             gradient_checkpointing=False, checkpoint_every_n_layers=1, base_dropout=True, compile=False, processes=1, device="auto",
             gradient_accumulation_steps=1, optimizer="adamw")


def train_config(**overrides: Any) -> Train:
    """A train section (the params schema's Train) of TRAIN with `overrides`."""
    return Train(**{**TRAIN, **overrides})


def nf4(compute_dtype: str, cache_dequantized: bool = False) -> Quant:
    return Quant(type="nf4", double_quant=True, compute_dtype=compute_dtype, cache_dequantized=cache_dequantized)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def machine(device: torch.device) -> dict[str, Any]:
    """Python, platform and the versions of the packages a result depends on; the GPU's name,
    memory and CUDA version when `device` is one."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "device": str(device)}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, gpu_count=torch.cuda.device_count())
    return info


def run_header(script: str, processes: Processes, device: torch.device) -> dict[str, Any]:
    """The first fields of a result record: which script, when, the exact command line (this
    worker's argv, and the torchrun command that starts it and its peers), the machine and
    versions, and every worker's device by rank (a collective: all workers call it)."""
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})"
    launched = "TORCHELASTIC_RUN_ID" in os.environ
    command = (["torchrun", "--standalone", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", "?")]
               if launched else ["python"])
    return {"benchmark": script, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": [sys.executable, *sys.argv], "command": shlex.join([*command, *sys.argv]),
            "processes": processes.count,
            "launcher": {k: os.environ[k] for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
                         if k in os.environ},
            "machine": machine(device), "devices": processes.gather(name)}


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append `record` to `path` as one JSON line, in one write (a killed run leaves whole lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def compile_cache_state() -> dict[str, Any]:
    """The compile cache (stages.lib.compiling) as this run finds it: `warm` when earlier runs
    left compiled graphs in it (FX graph entries), else `cold`. Read it before anything
    compiles, on every worker before they first meet (else one may read another's new files)."""
    directory = compile_cache_dir()
    graphs = directory / "fxgraph"
    entries = sum(1 for p in graphs.rglob("*") if p.is_file()) if graphs.is_dir() else 0
    return {"dir": str(directory), "state": "warm" if entries else "cold", "fxgraph_files_before": entries}


def compile_counters() -> dict[str, int]:
    """What torch.compile did in this process so far: graphs compiled (dynamo), and the FX graph
    and AOTAutograd cache lookups that found a compiled graph (hit), compiled it (miss) or could
    not use the cache (bypass)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"],
            **{f"fxgraph_{k}": counters["inductor"][f"fxgraph_cache_{k}"] for k in ("hit", "miss", "bypass")},
            **{f"aot_autograd_{k}": counters["aot_autograd"][f"autograd_cache_{k}"] for k in ("hit", "miss", "bypass")}}


def one_off_seconds(warmup_s: float, warmup_steps: int, steady_step_s: float | None) -> float | None:
    """The warm-up's time beyond what its steps cost at the steady rate: compilation, plus
    one-off set-up (CUDA kernels chosen, allocator pools, DDP buckets; about a second eager)."""
    if steady_step_s is None:
        return None
    return round(max(0.0, warmup_s - warmup_steps * steady_step_s), 2)


# bert-base-uncased's architecture and uncased vocabulary, no weights (configs/README.md)
BERT_BASE = ROOT / "configs/bert-base-uncased"


def build_model_dir(kind: str, out: Path, minilm: str) -> Path:
    """A model directory for load_base: MiniLM (real weights), or a random-init bert-base (which
    needs no MiniLM: its config and tokenizer are configs/bert-base-uncased)."""
    if kind == "minilm":
        return resolve_model_source(minilm, "main")[0]
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig.from_pretrained(BERT_BASE))  # as its checkpoint: no head
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(BERT_BASE).save_pretrained(out)
    return out


def load_data(model_dir: Path, max_length: int = 128):
    """AG News train and test as (token id lists, labels), and the pad id."""
    tok = load_tokenizer(model_dir)
    train = pd.read_csv(ROOT / "data/ag_news/train.csv")
    test = pd.read_csv(ROOT / "data/ag_news/test.csv")

    def encode(df: pd.DataFrame) -> list[list[int]]:
        return tok(df["text"].tolist(), truncation=True, max_length=max_length)["input_ids"]

    return (encode(train), train["label"].tolist()), (encode(test), test["label"].tolist()), tok.pad_token_id


def quantized_lora_model(model_dir: Path, compute: str, reference: bool, cache_dequantized: bool = False,
                         attn: str = "sdpa", base_dropout: bool = True):
    """NF4 base + LoRA: prepared as the reference recipe does (peft's k-bit preparation, fp32
    compute, gradient checkpointing), or as the pipeline does."""
    from peft import prepare_model_for_kbit_training

    device, dtype = compute_setup(compute)
    model = load_base(model_dir, LABELS, nf4(compute), ["classifier"], device, dtype, attn_implementation=attn)
    if reference:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = prepare_for_training(model, False, cache_dequantized, base_dropout)
    return attach_lora(model, LORA), device, dtype


def train(model, data, pad_id: int, cfg: Train, device: torch.device, dtype: torch.dtype,
          processes: Processes | None = None) -> dict[str, Any]:
    """The pipeline's training loop (classification, best by accuracy), nothing logged."""
    return TrainingLoop(model, data, pad_id, 0, cfg, Objective(CLASSIFICATION), NullLive(), device, dtype,
                        None, processes or Processes()).run()


def write_adapter(model, adapter_dir: Path, model_dir: Path, compute: str) -> None:
    """The adapter directory train writes, for a model built by quantized_lora_model."""
    base = BaseOrigin(kind="local", name_or_path=str(model_dir.resolve()),
                      sha256={f.name: sha256_file(f) for f in sorted(model_dir.glob("*.safetensors"))},
                      extra={"path": str(model_dir.resolve())})
    meta = AdapterMeta(CLASSIFICATION, LABELS, 128, "longest", nf4(compute), LORA,
                       dataclasses.asdict(train_config()), list(LORA.modules_to_save), base, {})
    save_adapter(model, load_tokenizer(model_dir), meta, adapter_dir)


def build_classifier(model_dir: Path, adapter_dir: Path, compile_eval: bool):
    """A merged classifier of a trained-looking adapter (B != 0, so the merge changes weights)."""
    device, dtype = compute_setup("bf16")
    torch.manual_seed(42)
    model = load_base(model_dir, LABELS, nf4("bf16"), ["classifier"], device, dtype)
    model = attach_lora(model, LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    write_adapter(model, adapter_dir, model_dir, "bf16")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return load_adapter(adapter_dir, model_dir, merged=True, compile=compile_eval)


def agreement(base: np.ndarray, other: np.ndarray) -> dict:
    pb, po = base.argmax(-1), other.argmax(-1)
    return {"agree": float((pb == po).mean()), "max_abs_logit_diff": float(np.abs(base - other).max()),
            "n_disagree": int((pb != po).sum())}


def kernel_summary(prof, wall_s: float, top: int = 15) -> dict:
    """GPU kernel time by category and the top kernels, from a torch.profiler run."""
    rows = []
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        rows.append((evt.key, evt.count, t / 1e6))
    if not rows:  # older/newer profilers: kernels as CPU-side events with device time
        for evt in prof.key_averages():
            t = getattr(evt, "self_device_time_total", 0) or 0
            if t > 0:
                rows.append((evt.key, evt.count, t / 1e6))
    rows.sort(key=lambda r: -r[2])

    def category(name: str) -> str:
        n = name.lower()
        if any(k in n for k in ("fmha", "flash", "attention", "efficient", "attn")):
            return "attention"
        if "memcpy" in n or "memset" in n:
            return "memcpy/memset"
        if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "matmul")):
            return "gemm"
        if "triton" in n:
            return "triton (fused pointwise/norm)"
        return "other"
    by_category: dict[str, float] = {}
    for name, _, t in rows:
        by_category[category(name)] = by_category.get(category(name), 0.0) + t
    busy = sum(t for _, _, t in rows)
    return {"wall_s": wall_s, "gpu_kernel_s": busy, "gpu_idle_s": wall_s - busy,
            "by_category_s": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:120], "count": c, "s": t} for n, c, t in rows[:top]]}
