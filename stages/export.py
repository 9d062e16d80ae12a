"""export: a self-contained bundle that labels new text.

Reads  models/adapter, models/base, metrics/{train,evaluate}/metrics.json, params export.merged.
Writes <out>/: adapter_model.safetensors (LoRA + the fully trained head), adapter_config.json
       (base_model_name_or_path = the hub id or path of the base), tokenizer files,
       pipeline.json (labels, max_length, quantization, base provenance),
       quantization_config.json (the BitsAndBytesConfig to load the base with) and README.md
       (model card: params, metrics, how to load). With export.merged, also merged/: the base
       loaded in fp32 (never 4-bit: merging into 4-bit rounds the update away) with LoRA merged in;
       sft: the base dequantized from its 4 bits plus LoRA, in the 16-bit compute dtype, with the
       tokenizer and its chat template (loads with AutoModelForCausalLM, no peft).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from stages.lib.adapter_meta import (ADAPTER_META_FILE, AdapterMeta, hash_adapter_files, read_adapter_meta,
                                     write_adapter_config)
from stages.lib.io import atomic_dir, read_json, require_dir, run_main, write_json
from stages.lib.params import load_params
from stages.lib.quantized import DTYPES, load_base, quantization_config
from stages.lib.sources import load_tokenizer, portable_base_id

PARAMS = ("export.merged",)
log = logging.getLogger("qlora")


PIPELINE_TAGS = {"classification": "text-classification", "masked-lm": "fill-mask",
                 "causal-lm": "text-generation", "sft": "text-generation"}
PEFT_CLASSES = {"classification": "AutoPeftModelForSequenceClassification",
                "masked-lm": "AutoPeftModel", "causal-lm": "AutoPeftModelForCausalLM",
                "sft": "AutoPeftModelForCausalLM"}


def model_card(meta: AdapterMeta, base_id: str, train: dict[str, Any], test: dict[str, Any]) -> str:
    """A Hugging Face model card: front matter, how to load, params, metrics."""
    task = meta.task_type
    sections = meta.to_json()  # each section's keys in the order pipeline.json has them: sorted
    params = {**{name: dict(sorted(sections[name].items())) for name in ("task", "quant", "lora", "train")},
              "tokenize": {"max_length": meta.max_length, "padding": meta.padding}}
    param_rows = "\n".join(f"| {section}.{k} | {v} |" for section, values in params.items()
                           for k, v in values.items())
    saved = ", ".join(meta.modules_to_save) or "none"
    if task == "classification":
        labels = ", ".join(f"{i} = {n}" for i, n in enumerate(meta.labels))
        what, head_args = f"text classifier. Labels: {labels}.", (
            f"num_labels={len(meta.labels)}, id2label=dict(enumerate(labels)), ")
        use = 'python -m stages.cli.predict --model <this directory> "Stocks rally as oil prices fall"'
        per_class = "\n".join(f"| {n} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
                              for n, m in test["per_class"].items())
        results = f"""## Test metrics ({test['test_samples']} rows)
accuracy **{test['accuracy']:.4f}**, macro-F1 **{test['f1_macro']:.4f}**, weighted F1 **{test.get('f1_weighted', float('nan')):.4f}**

| class | precision | recall | F1 | support |
| --- | --- | --- | --- | --- |
{per_class}"""
    elif task == "sft":
        what, head_args = "instruction-tuned (sft) adapter; its tokenizer carries the chat template.", ""
        use = 'python -m stages.cli.generate --model <this directory> --chat "What is the capital of France?"'
        results = f"""## Test metrics ({test['test_examples']} conversations)
response-token loss **{test['loss']:.4f}**, perplexity **{test['perplexity']:.2f}**, exact match of
greedy answers **{test['exact_match']:.4f}**"""
    else:
        what, head_args = f"{task} adapter.", ""
        use = ('python -m stages.cli.generate --model <this directory> "ROMEO:"' if task == "causal-lm"
               else "(masked-LM adapters are scored by the pipeline; load them with peft as below)")
        results = f"""## Test metrics ({test['test_blocks']} blocks of {test['block_tokens']} tokens)
loss **{test['loss']:.4f}**, perplexity **{test['perplexity']:.2f}** (per predicted token)"""
    best = meta.task.metric
    return f"""---
library_name: peft
base_model: {base_id}
pipeline_tag: {PIPELINE_TAGS[task]}
tags: [qlora, lora, bitsandbytes, {meta.quant.type}, qlora-pipeline]
---
# {base_id} + QLoRA {what.split('.')[0]}

A LoRA adapter (r={meta.lora.r}, alpha={meta.lora.alpha}, on
{', '.join(meta.lora.target_modules)}), with these modules trained in full: {saved}; for
`{base_id}` loaded in {meta.quant.type} (double quant: {meta.quant.double_quant}). A {what}
Base model provenance: `{json.dumps({k: v for k, v in meta.base.to_json().items() if k != 'sha256'}, sort_keys=True)}`.

## Use
```bash
{use}
```
or, with the hub reachable:
```python
import json
import peft
from transformers import AutoTokenizer, BitsAndBytesConfig
labels = json.load(open("pipeline.json"))["labels"]
model = peft.{PEFT_CLASSES[task]}.from_pretrained(
    ".", {head_args}quantization_config=BitsAndBytesConfig.from_dict(json.load(open("quantization_config.json"))))
tokenizer = AutoTokenizer.from_pretrained(".")
```

{results}

## Training
best validation {best} {train[f'best_val_{best}']:.4f} at step {train['best_step']} of
{train['steps']}; {train['trainable_params']:,} trainable parameters
({train['trainable_percent']}% of {train['all_params']:,}), trained on {train['device']}.

| param | value |
| --- | --- |
{param_rows}
"""


def write_merged(adapter_dir: Path, base_dir: Path, meta: AdapterMeta, out: Path) -> None:
    """Merge LoRA into a copy of the base and save it as a plain model. A classifier merges
    into the full-precision base, in fp32. An sft model merges into the base dequantized from
    the 4 bits it was trained on (the weights the adapter learnt against), saved in the 16-bit
    compute dtype (bf16/fp16; fp32 if so configured): what vLLM or llama.cpp converters read."""
    from peft import PeftModel
    if meta.task_type == "sft":
        base = load_base(base_dir, meta.labels, meta.quant, meta.modules_to_save, torch.device("cpu"),
                         torch.float32, task=meta.task_type)
        if meta.quant.type != "none":
            base = base.dequantize()
        dtype = DTYPES[meta.quant.compute_dtype]
    else:
        base = load_base(base_dir, meta.labels, dataclasses.replace(meta.quant, type="none"), meta.modules_to_save,
                         torch.device("cpu"), torch.float32, task=meta.task_type)
        dtype = torch.float32
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(dtype)
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(adapter_dir).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--adapter", required=True, help="trained adapter directory")
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--metrics", required=True, help="metrics directory (train/, evaluate/)")
    parser.add_argument("--out", required=True, help="export bundle directory")
    args = parser.parse_args(argv)

    def work() -> None:
        p = load_params(args.params, PARAMS)
        adapter_dir = require_dir(args.adapter, "trained adapter")
        base_dir = require_dir(args.base, "base model")
        meta = read_adapter_meta(adapter_dir)
        train = read_json(Path(args.metrics) / "train" / "metrics.json")
        test = read_json(Path(args.metrics) / "evaluate" / "metrics.json")
        base_id = portable_base_id(meta.base)
        with atomic_dir(args.out) as tmp:
            for f in adapter_dir.iterdir():
                if f.is_file() and f.name not in ("README.md", ADAPTER_META_FILE):
                    shutil.copyfile(f, tmp / f.name)
            write_adapter_config(tmp, base_model_name_or_path=base_id)
            bnb = quantization_config(meta.quant, DTYPES[meta.quant.compute_dtype], meta.modules_to_save,
                                      meta.task_type)
            if bnb is not None:
                write_json(tmp / "quantization_config.json", bnb.to_dict())
            # adapter_config.json now names the portable base: record the bundle's own hashes
            meta.with_hashes(hash_adapter_files(tmp)).save(tmp / ADAPTER_META_FILE)
            (tmp / "README.md").write_text(model_card(meta, base_id, train, test), encoding="utf-8")
            if p["export.merged"]:
                write_merged(adapter_dir, base_dir, meta, tmp / "merged")
        log.info("export: %s (base %s) -> %s", adapter_dir, base_id, args.out)

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
