"""Training speed of the sft recipe's batches: packed rows against one example per padded row.

    python benchmarks/sft_packing.py --size tiny --steps 20 --json OUT.json
    python benchmarks/sft_packing.py --size 1b --device cuda --attn sdpa flex_attention --json OUT.json

Data: data/instructions/train.jsonl through the stand-in tokenizer (configs/tiny-gpt2) and the
default chat template, cut at --max-length. Model: a random-init Llama of --size (tiny: 2 layers,
hidden 64; small: 8 layers, hidden 512; 1b: Llama-3.2-1B's shape with the stand-in's vocabulary),
every parameter trained by AdamW (bf16 autocast on GPUs): the batch layout is what is measured,
not LoRA or 4-bit loading. Layouts, each for --steps optimizer steps after --warmup:
  packed    rows of up to --max-length tokens (lib/packing.py), --rows rows per step;
  grouped   one example per row, padded to the batch's longest, batches of similar lengths and
            the same number of tokens per step on average as packed;
  shuffled  the same, batches in random order.
Reported per attention implementation and layout: trained-on tokens (input tokens that are not
padding) per second, the share of padding, peak memory (GPU) and the mean loss.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.lib.chat import read_conversations  # noqa: E402
from stages.lib.chat_template import encode_conversations, ensure_chat_template, labels_from_mask  # noqa: E402
from stages.lib.packing import collate_packed, collate_padded, pack_examples, prepare_for_packing  # noqa: E402

SIZES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2),
         "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4),
         "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8)}


def batches(layout: str, input_ids, labels, rows: int, max_length: int, pad_id: int, seed: int):
    """(model inputs, trained-on tokens, padded width x rows) per step, endlessly."""
    rng = random.Random(seed)
    if layout == "packed":
        packed = pack_examples(input_ids, labels, max_length)
        steps = [packed[i:i + rows] for i in range(0, len(packed), rows)]
        while True:
            rng.shuffle(steps)
            for group in steps:
                batch = collate_packed(group, pad_id)
                yield batch, sum(len(r.input_ids) for r in group), batch["input_ids"].numel()
    per_step = max(1, round(rows * max_length * 0.95 / (sum(map(len, input_ids)) / len(input_ids))))
    while True:
        order = list(range(len(input_ids)))
        rng.shuffle(order)
        if layout == "grouped":
            chunk = per_step * 64
            order = [i for s in range(0, len(order), chunk) for i in sorted(order[s:s + chunk], key=lambda j: len(input_ids[j]))]
        steps = [order[s:s + per_step] for s in range(0, len(order), per_step)]
        rng.shuffle(steps)
        for group in steps:
            batch = collate_padded([input_ids[i] for i in group], [labels[i] for i in group], pad_id)
            yield batch, int(batch["attention_mask"].sum()), batch["input_ids"].numel()


def run(layout: str, attn: str, args, input_ids, labels, pad_id: int, vocab: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(args.max_length, 512), **SIZES[args.size])
    model = LlamaForCausalLM(config).to(device)
    model.config._attn_implementation = attn
    model.config.use_cache = False
    if layout == "packed":
        prepare_for_packing(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stream = batches(layout, input_ids, labels, args.rows, args.max_length, pad_id, seed=0)
    tokens = cells = 0
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, tokens, cells, losses = time.perf_counter(), 0, 0, []
        batch, trained, width = next(stream)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens, cells = tokens + trained, cells + width
        losses.append(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"layout": layout, "attn": attn, "tokens_per_s": round(tokens / elapsed, 1),
            "padding_share": round(1 - tokens / cells, 4), "loss": round(float(torch.stack(losses).mean()), 4),
            "seconds": round(elapsed, 2), "steps": args.steps,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", nargs="+", default=["sdpa"], help="sdpa, eager, flex_attention, flash_attention_2")
    parser.add_argument("--layouts", nargs="+", default=["packed", "grouped", "shuffled"])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rows", type=int, default=8, help="packed rows per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configs" / "tiny-gpt2")
    ensure_chat_template(tokenizer)
    _, conversations = read_conversations(ROOT / "data" / "instructions" / "train.jsonl")
    encoded = encode_conversations(tokenizer, conversations, args.max_length, "train")
    labels = [labels_from_mask(i, m, False) for i, m in zip(encoded.input_ids, encoded.assistant_masks)]
    results = []
    for attn in args.attn:
        for layout in args.layouts:
            result = run(layout, attn, args, encoded.input_ids, labels, tokenizer.eos_token_id, len(tokenizer))
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "device": args.device, "max_length": args.max_length,
                                         "rows": args.rows, "torch": torch.__version__, "results": results},
                                        indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
