"""Host memory while the pipeline loads a sharded bf16 base in 4 bits (lib/quantized.load_base).

    python benchmarks/load_memory.py --work /tmp/load-memory --compute bf16 --out benchmarks/results/cpu-load-memory.json

Writes a Llama-shaped random-init model (hidden 2,048, intermediate 8,192, 8 layers, vocabulary
4,096: 0.94 GB in bf16, one layer per shard; reused when present), then, in a fresh process,
loads it with load_base (NF4, double quant) on this machine's device, sampling /proc/self/status
every 20 ms: the peak growth of anonymous memory (what the load allocates) and of file-backed
resident pages (the memory-mapped shards: page cache the kernel can drop). A load that holds the
whole model in 16 bits on the host would grow anonymous memory by at least the bf16 size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import common  # noqa: F401  (the repository on sys.path)
from stages.lib.io import write_json

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def status() -> dict[str, float]:
    """RssAnon and RssFile of this process, GiB."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                values[key] = int(value.split()[0]) / 2**20
    return values


def write_model(work: Path) -> Path:
    from transformers import LlamaConfig

    from stages.lib.random_init import write_random_init

    config_dir = work / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=4096, architectures=["LlamaForCausalLM"]).save_pretrained(config_dir)
    return write_random_init(config_dir, work / "model", seed=0, device="cpu", layers_per_shard=1)


def measure_load(model_dir: Path, compute: str) -> dict[str, float]:
    """Run in the measuring process: load and sample memory."""
    import torch
    import transformers  # noqa: F401  (imports are not the load's memory)
    import bitsandbytes  # noqa: F401

    from stages.lib.params import Quant
    from stages.lib.quantized import compute_setup, load_base

    device, dtype = compute_setup(compute)
    dtype = getattr(torch, DTYPES[compute]) if device.type == "cpu" else dtype  # CPU: as asked, to measure it
    base = status()
    peak = {"anon": 0.0, "file": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = status()
            peak["anon"] = max(peak["anon"], now["RssAnon"] - base["RssAnon"])
            peak["file"] = max(peak["file"], now["RssFile"] - base["RssFile"])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    model = load_base(model_dir, [], Quant(type="nf4", double_quant=True, compute_dtype=compute, cache_dequantized=False),
                      [], device, dtype, task="causal-lm")
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = status()
    del model
    return {"compute_dtype": str(dtype), "device": str(device), "load_s": round(seconds, 1),
            "peak_anon_growth_gib": round(peak["anon"], 3), "peak_file_growth_gib": round(peak["file"], 3),
            "anon_after_load_gib": round(after["RssAnon"] - base["RssAnon"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--compute", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_load(args.measure, args.compute)))
        return 0
    model_dir = write_model(args.work)
    done = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--compute", args.compute,
                           "--out", str(args.out), "--measure", str(model_dir)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["bf16_weights_gib"] = round(sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**30, 3)
    result["shards"] = len(list(model_dir.glob("*.safetensors")))
    result["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(args.out, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
