"""tokenize: turn the split text into token ids with the base model's tokenizer.

Reads  data/split/ (classification: {train,validation,test}.csv and labels.json; language models:
       {train,validation,test}.txt), models/base (tokenizer), params task.type,
       tokenize.max_length, tokenize.padding.
Writes <out>/: a `datasets` DatasetDict (read back with datasets.load_from_disk) and
       tokenized.json (task, labels, max_length, padding; lib.tokenized). Classification: input_ids and label per
       text, stored unpadded; `padding: max_length` makes every batch max_length wide, as the
       reference recipe does, `longest` pads each batch to its longest sequence. Language models:
       input_ids blocks of exactly max_length tokens cut from the concatenated text (masked-lm
       keeps each line's [CLS]/[SEP]).
       sft ({train,validation,test}.jsonl; params sft.train_on_prompt, sft.packing): each
       conversation rendered with the chat template (lib.chat_template), cut at max_length
       (counted and logged), labels -100 outside the assistant's tokens unless train_on_prompt;
       train and validation packed several to a row when sft.packing (position_ids restart per
       example, lib.packing); test one example per row, with its conversation for generation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
from collections.abc import Sequence

import datasets
import numpy as np
import pandas as pd

from stages.lib.chat import conversations_from_rows, read_rows
from stages.lib.chat_template import IGNORE_INDEX, encode_conversations, ensure_chat_template, labels_from_mask
from stages.lib.io import atomic_dir, read_json, require_dir, run_main
from stages.lib.params import UserError, load_params
from stages.lib.sources import load_tokenizer
from stages.lib.packing import chat_columns
from stages.lib.tokenized import DATASET_DIR, TOKENIZED_FILE, TokenizedMeta

PARAMS = ("task.type", "tokenize.max_length", "tokenize.padding", "sft.train_on_prompt", "sft.packing")
SPLITS = ("train", "validation", "test")
log = logging.getLogger("qlora")


def tokenize_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def token_blocks(tokenizer, lines: Sequence[str], block: int, add_special_tokens: bool) -> list[list[int]]:
    """Tokenize the non-blank lines, concatenate them and cut the stream into blocks of `block`
    tokens (the rest, shorter than a block, is dropped), as transformers' run_mlm/run_clm do."""
    from transformers.utils import logging as hf_logging

    texts = [line for line in lines if line.strip()]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "longer than the maximum sequence length": blocks are cut below
    if not add_special_tokens:  # a causal LM learns the line breaks too, where its tokenizer has them
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer([t.strip() for t in texts], add_special_tokens=True)["input_ids"]
    hf_logging.set_verbosity(verbosity)
    stream = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
    n = len(stream) // block
    return stream[:n * block].reshape(n, block).tolist()


def tokenize_chats(tokenizer, split_dir, max_length: int, train_on_prompt: bool,
                   packing: bool) -> dict[str, datasets.Dataset]:
    """Every split's conversations as token ids and labels; train and validation packed when
    `packing`. An example with nothing left to train on is an error, before anything is written."""
    parts = {}
    for name in SPLITS:
        path = split_dir / f"{name}.jsonl"
        rows, where = read_rows(path)
        conversations = conversations_from_rows(rows, str(path), where)[1]
        encoded = encode_conversations(tokenizer, conversations, max_length, str(path), where)
        labels = [labels_from_mask(ids, mask, train_on_prompt)
                  for ids, mask in zip(encoded.input_ids, encoded.assistant_masks)]
        columns = chat_columns(encoded.input_ids, labels, packing and name != "test", max_length)
        if name == "test":
            columns["conversation"] = [json.dumps(c, ensure_ascii=False) for c in conversations]
        parts[name] = datasets.Dataset.from_dict(columns)
        trained = sum(sum(t != IGNORE_INDEX for t in row) for row in labels)
        log.info("tokenize %s: %d examples, %d tokens (%d trained), %d cut at %d, %d rows%s", name,
                 len(conversations), sum(map(len, encoded.input_ids)), trained, encoded.truncated, max_length,
                 len(columns["input_ids"]), " (packed)" if "position_ids" in columns else "")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--split", required=True, help="split dataset directory")
    parser.add_argument("--base", required=True, help="base model directory (its tokenizer)")
    parser.add_argument("--out", required=True, help="tokenized dataset directory")
    args = parser.parse_args(argv)

    def work() -> None:
        p = load_params(args.params, PARAMS)
        split_dir = require_dir(args.split, "split dataset")
        tokenizer = load_tokenizer(require_dir(args.base, "base model"))
        task, block = p["task.type"], p["tokenize.max_length"]
        parts = {}
        chat_template = ""
        if task == "sft":
            ensure_chat_template(tokenizer)
            chat_template = tokenizer.chat_template
            parts = tokenize_chats(tokenizer, split_dir, block, p["sft.train_on_prompt"], p["sft.packing"])
        for name in SPLITS if task == "classification" else ():
            df = pd.read_csv(split_dir / f"{name}.csv", dtype={"text": str, "label": int},
                             keep_default_na=False)
            ids = tokenize_texts(tokenizer, df["text"].tolist(), p["tokenize.max_length"])
            parts[name] = datasets.Dataset.from_dict({"input_ids": ids, "label": df["label"].tolist()})
            lengths = [len(x) for x in ids]
            log.info("tokenize %s: %d rows, %d tokens, mean %.1f, max %d, %d truncated at %d",
                     name, len(ids), sum(lengths), statistics.fmean(lengths), max(lengths),
                     sum(n == p["tokenize.max_length"] for n in lengths), p["tokenize.max_length"])
        for name in SPLITS if task in ("masked-lm", "causal-lm") else ():
            with (split_dir / f"{name}.txt").open(encoding="utf-8", newline="") as f:
                blocks = token_blocks(tokenizer, f.readlines(), block, add_special_tokens=task == "masked-lm")
            if not blocks:
                raise UserError(f"{split_dir / name}.txt: fewer than tokenize.max_length {block} tokens "
                                "(no whole block to train or score on)")
            parts[name] = datasets.Dataset.from_dict({"input_ids": blocks})
            log.info("tokenize %s: %d blocks of %d tokens", name, len(blocks), block)
        datasets.disable_progress_bars()
        labels = read_json(split_dir / "labels.json") if task == "classification" else []
        with atomic_dir(args.out) as tmp:
            datasets.DatasetDict(parts).save_to_disk(str(tmp / DATASET_DIR))
            packed = task == "sft" and p["sft.packing"]
            TokenizedMeta(task, labels, block, p["tokenize.padding"], packed, chat_template).save(tmp / TOKENIZED_FILE)

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
