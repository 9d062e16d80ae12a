"""Training speed of the sft recipe's batches: packed rows against one example per padded row.

    python benchmarks/sft_packing.py --smoke --json OUT.json          # CPU, seconds: the wiring
    python benchmarks/sft_packing.py --size tiny --steps 20 --json OUT.json
    python benchmarks/sft_packing.py --size 1b --device cuda --attn varlen sdpa --steps 30 --warmup 5 --json OUT.json

Data: data/instructions/train.jsonl through the stand-in tokenizer (configs/tiny-gpt2) and the
default chat template, cut at --max-length. Model: a random-init Llama of --size (tiny: 2 layers,
hidden 64; small: 8 layers, hidden 512; 1b: Llama-3.2-1B's shape with the stand-in's vocabulary),
built on --device with seed 0, every parameter trained by AdamW (bf16 autocast on GPUs): the
batch layout and the attention are what is measured, not LoRA or 4-bit loading. Layouts, each
for --steps optimizer steps after --warmup:
  packed    rows of up to --max-length tokens (lib/packing.py), --rows rows per step;
  grouped   one example per row, padded to the batch's longest, batches of similar lengths and
            the same number of tokens per step on average as packed;
  shuffled  the same, batches in random order.
Attention (--attn): sdpa, eager, flex_attention, flash_attention_2 as transformers has them (packed
rows: transformers' mask from the restarting position_ids; for sdpa and eager a dense
rows x width x width mask), and varlen (lib/varlen_attention.py: torch's varlen_attn over the rows'
cu_seq_lens, no mask; packed rows only, CUDA; with --smoke on a CPU a per-segment SDPA stand-in
runs in its place, to check the wiring; its speed means nothing).

Reported per attention and layout: trained-on tokens (input tokens that are not padding) per
second, the share of padding, peak GPU memory and the mean loss of the measured steps. Before
that, `agreement`: one fixed set of examples (those of the first --rows packed rows), from the
same initial weights, scored padded one per row with SDPA (the reference) and packed with each
--attn: the loss, its difference from the reference, and the gradient's norm and cosine
similarity to the reference's (equal up to bf16 rounding on a GPU, fp32 rounding on a CPU).
Everything, with the settings, versions and device, goes to --json.
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

from stages.lib import varlen_attention  # noqa: E402
from stages.lib.chat import read_conversations  # noqa: E402
from stages.lib.chat_template import encode_conversations, ensure_chat_template, labels_from_mask  # noqa: E402
from stages.lib.packing import (VARLEN, collate_packed, collate_padded, pack_bins, pack_examples,  # noqa: E402
                                prepare_for_packing, varlen_kwargs)
from stages.lib.params import UserError  # noqa: E402

SIZES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2),
         "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4),
         "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8)}
PACKED_ONLY = {VARLEN}  # attention that needs packed rows' boundaries: no padded layouts
SMOKE = dict(size="tiny", rows=2, steps=2, warmup=1, examples=48)


def segment_sdpa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                 enable_gqa=False):
    """A CPU stand-in for torch's varlen_attn (its signature, its result): SDPA within each
    segment. --smoke on a CPU runs the varlen path through it."""
    bounds = cu_seq_q.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1),
        is_causal=tuple(window_size) == (-1, 0), scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])])


def set_up_varlen(device: torch.device, dtype: torch.dtype, smoke: bool) -> str:
    """Register varlen attention (or say in one line why it cannot run); which kernel runs."""
    if smoke and device.type == "cpu":
        varlen_attention.register()
        varlen_attention._kernel = varlen_attention.Kernel.wrap(segment_sdpa)
        return "cpu stand-in (per-segment SDPA; --smoke)"
    varlen_attention.require(device, dtype)
    kernel = varlen_attention._kernel
    return f"torch.nn.attention.varlen.varlen_attn (causal by {kernel.causal_by}, enable_gqa {kernel.gqa})"


def build_model(args, attn: str, vocab: int):
    """The random-init Llama of args.size on args.device (seed 0: every run starts alike)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(args.max_length, 512),
                         attn_implementation=attn, use_cache=False, **SIZES[args.size])
    with torch.device(args.device):  # initialised where it runs: a 1B model in seconds, not minutes
        return LlamaForCausalLM(config)


def batches(layout: str, input_ids, labels, rows: int, max_length: int, pad_id: int, seed: int, varlen: bool):
    """(model inputs, trained-on tokens, padded width x rows) per step, endlessly."""
    rng = random.Random(seed)
    if layout == "packed":
        packed = pack_examples(input_ids, labels, max_length)
        steps = [packed[i:i + rows] for i in range(0, len(packed), rows)]
        while True:
            rng.shuffle(steps)
            for group in steps:
                batch = {**collate_packed(group, pad_id), **(varlen_kwargs(group) if varlen else {})}
                yield batch, sum(len(r.input_ids) for r in group), batch["input_ids"].numel()
    per_step = max(1, round(rows * max_length * 0.95 / (sum(map(len, input_ids)) / len(input_ids))))
    while True:
        order = list(range(len(input_ids)))
        rng.shuffle(order)
        if layout == "grouped":
            chunk = per_step * 64
            order = [i for s in range(0, len(order), chunk)
                     for i in sorted(order[s:s + chunk], key=lambda j: len(input_ids[j]))]
        steps = [order[s:s + per_step] for s in range(0, len(order), per_step)]
        rng.shuffle(steps)
        for group in steps:
            batch = collate_padded([input_ids[i] for i in group], [labels[i] for i in group], pad_id)
            yield batch, int(batch["attention_mask"].sum()), batch["input_ids"].numel()


def on_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run(layout: str, attn: str, args, input_ids, labels, pad_id: int, vocab: int) -> dict:
    """Train --warmup then --steps steps of one layout under one attention; its figures."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, attn, vocab)
    if layout == "packed":
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prepare_for_packing(model)  # the probe: examples kept apart, or one line
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stream = batches(layout, input_ids, labels, args.rows, args.max_length, pad_id, seed=0, varlen=attn == VARLEN)
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
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**on_device(batch, device)).loss
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
            "tokens": tokens, "seconds": round(elapsed, 3), "steps": args.steps,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def loss_and_gradient(model, batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[float, list]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**on_device(batch, device)).loss
    loss.backward()
    return loss.item(), [p.grad.detach().float().clone() for p in model.parameters()]


def agreement(args, attns: list[str], input_ids, labels, pad_id: int, vocab: int) -> dict:
    """One fixed set of examples (the first --rows packed rows'), the same initial weights: the
    loss and gradient padded under SDPA, and packed under each attention, compared."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    members = [i for row in pack_bins([len(x) for x in input_ids], args.max_length)[:args.rows] for i in row]
    ids, targets = [input_ids[i] for i in members], [labels[i] for i in members]
    rows = pack_examples(ids, targets, args.max_length)
    model = build_model(args, "sdpa", vocab).train()
    for module in model.modules():  # no dropout: the same function under every attention
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    reference, reference_grad = loss_and_gradient(model, collate_padded(ids, targets, pad_id), device, dtype)
    reference_norm = torch.sqrt(sum((g * g).sum() for g in reference_grad))
    out = {"examples": len(members), "rows": len(rows), "tokens": sum(map(len, ids)),
           "padded_sdpa": {"loss": round(reference, 6), "grad_norm": round(float(reference_norm), 6)}}
    for attn in attns:
        model.set_attn_implementation(attn)
        batch = {**collate_packed(rows, pad_id), **(varlen_kwargs(rows) if attn == VARLEN else {})}
        loss, grad = loss_and_gradient(model, batch, device, dtype)
        norm = torch.sqrt(sum((g * g).sum() for g in grad))
        cosine = sum((g * r).sum() for g, r in zip(grad, reference_grad)) / (norm * reference_norm)
        out[f"packed_{attn}"] = {"loss": round(loss, 6), "loss_diff": loss - reference,
                                 "grad_norm": round(float(norm), 6), "grad_cosine": float(cosine)}
    del model
    return out


def machine(device: torch.device) -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cuda": torch.version.cuda}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", nargs="+", default=["sdpa"],
                        help=f"sdpa, eager, flex_attention, flash_attention_2, {VARLEN} (packed rows only)")
    parser.add_argument("--layouts", nargs="+", default=["packed", "grouped", "shuffled"])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rows", type=int, default=8, help="packed rows per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--examples", type=int, default=0, help="use the first N training examples (0: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds on a CPU: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items())
                        + f"; {VARLEN} through a CPU stand-in")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)

    from transformers import AutoTokenizer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        kernel = set_up_varlen(device, dtype, args.smoke) if VARLEN in args.attn else None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configs" / "tiny-gpt2")
    ensure_chat_template(tokenizer)
    _, conversations = read_conversations(ROOT / "data" / "instructions" / "train.jsonl")
    encoded = encode_conversations(tokenizer, conversations[:args.examples or None], args.max_length, "train")
    labels = [labels_from_mask(i, m, False) for i, m in zip(encoded.input_ids, encoded.assistant_masks)]
    pad_id, vocab = tokenizer.eos_token_id, len(tokenizer)
    packed_attns = args.attn if "packed" in args.layouts else []
    agree = agreement(args, packed_attns, encoded.input_ids, labels, pad_id, vocab) if packed_attns else None
    print(json.dumps({"agreement": agree}), flush=True)
    results, skipped = [], []
    for attn in args.attn:
        for layout in args.layouts:
            if attn in PACKED_ONLY and layout != "packed":
                skipped.append({"layout": layout, "attn": attn, "why": f"{attn} attention takes packed rows only"})
                continue
            result = run(layout, attn, args, encoded.input_ids, labels, pad_id, vocab)
            print(json.dumps(result), flush=True)
            results.append(result)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({
            "command": " ".join(sys.argv), "settings": settings, "machine": machine(device),
            "compute_dtype": str(dtype).removeprefix("torch."), "varlen_kernel": kernel,
            "data": {"examples": len(encoded.input_ids), "tokens": sum(map(len, encoded.input_ids)),
                     "packed_rows": len(pack_bins([len(x) for x in encoded.input_ids], args.max_length))},
            "agreement": agree, "results": results, "skipped": skipped}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
