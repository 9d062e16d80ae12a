"""split: validate the raw data and split train into train/validation.

Reads  data/raw/, params task.type, data.text_column, data.label_column, data.label_names,
       split.val_fraction, split.seed.
Writes classification: <out>/{train,validation,test}.csv (columns text, label as class id) and
       labels.json; validation is stratified by label, test is kept as given.
       language models: <out>/{train,validation,test}.txt; a split the corpus lacks is cut from
       the end of train (see lib.tables.split_corpus).
       sft: <out>/{train,validation,test}.jsonl, chat rows ({"messages": [...]}) after every row
       of train and test was validated (lib.chat); validation is a seeded random share of train.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from stages.lib.chat import CHAT_LAYOUT, SUFFIXES as CHAT_SUFFIXES, conversation_lines, read_conversations
from stages.lib.io import atomic_dir, require_dir, run_main, write_json
from stages.lib.params import UserError, load_params
from stages.lib.tables import find_corpus, find_table, load_labelled, read_lines, read_table, split_corpus

PARAMS = ("task.type", "data.text_column", "data.label_column", "data.label_names",
          "split.val_fraction", "split.seed")
log = logging.getLogger("qlora")


def stratified_split(df: pd.DataFrame, val_fraction: float,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train/validation frames with each label's share kept in both."""
    counts = df["label"].value_counts()
    if (counts < 2).any() or round(len(df) * val_fraction) < counts.size:
        raise UserError(f"split.val_fraction: {val_fraction} of {len(df)} rows cannot hold every "
                        f"one of {counts.size} labels in both splits (label counts: "
                        f"{counts.sort_index().to_dict()})")
    train, val = train_test_split(df, test_size=val_fraction, random_state=seed,
                                  stratify=df["label"])
    return train.reset_index(drop=True), val.reset_index(drop=True)


def distinct_labels(path, label_column: str) -> list[str]:
    """data.label_names: [] takes the train file's distinct labels, sorted."""
    df = read_table(path)
    if label_column not in df.columns:
        raise UserError(f"{path}: missing column {label_column} (data.label_column)")
    return sorted({v.strip() for v in df[label_column]} - {""})


def split_text(raw, val_fraction: float, out: str) -> None:
    """A text corpus's train/validation/test lines, written as .txt files."""
    parts = split_corpus({name: read_lines(path) for name, path in find_corpus(raw).items()}, val_fraction)
    with atomic_dir(out) as tmp:
        for name, lines in parts.items():
            (tmp / f"{name}.txt").write_text("".join(lines), encoding="utf-8")
    log.info("split: %s lines -> %s", ", ".join(f"{len(v)} {k}" for k, v in parts.items()), out)


def split_chats(raw, val_fraction: float, seed: int, out: str) -> None:
    """Validated conversations of train (cut into train/validation, seeded) and test, as chat JSON Lines."""
    train_all = read_conversations(find_table(raw, "train", CHAT_SUFFIXES, CHAT_LAYOUT))[1]
    test = read_conversations(find_table(raw, "test", CHAT_SUFFIXES, CHAT_LAYOUT))[1]
    n_val = round(len(train_all) * val_fraction)
    if n_val < 1 or n_val >= len(train_all):
        raise UserError(f"split.val_fraction: {val_fraction} of {len(train_all)} train rows leaves an empty "
                        "train or validation split")
    order = np.random.default_rng(seed).permutation(len(train_all))
    parts = {"train": [train_all[i] for i in sorted(order[n_val:])],
             "validation": [train_all[i] for i in sorted(order[:n_val])], "test": test}
    with atomic_dir(out) as tmp:
        for name, conversations in parts.items():
            (tmp / f"{name}.jsonl").write_text(conversation_lines(conversations), encoding="utf-8")
    log.info("split: %s conversations -> %s", ", ".join(f"{len(v)} {k}" for k, v in parts.items()), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--raw", required=True, help="raw dataset directory")
    parser.add_argument("--out", required=True, help="split dataset directory")
    args = parser.parse_args(argv)

    def work() -> None:
        p = load_params(args.params, PARAMS)
        raw = require_dir(args.raw, "raw dataset")
        if p["task.type"] == "sft":
            split_chats(raw, p["split.val_fraction"], p["split.seed"], args.out)
            return
        if p["task.type"] != "classification":
            split_text(raw, p["split.val_fraction"], args.out)
            return
        labels = p["data.label_names"] or distinct_labels(find_table(raw, "train"), p["data.label_column"])
        if len(set(labels)) != len(labels):
            raise UserError(f"data.label_names: duplicate names in {labels}")
        columns = (p["data.text_column"], p["data.label_column"], labels)
        train_all = load_labelled(find_table(raw, "train"), *columns)
        test = load_labelled(find_table(raw, "test"), *columns)
        train, val = stratified_split(train_all, p["split.val_fraction"], p["split.seed"])
        with atomic_dir(args.out) as tmp:
            for name, df in (("train", train), ("validation", val), ("test", test)):
                # CRLF line ends: the csv writer then quotes a text holding a bare \r, which would
                # otherwise split its row when read back
                df.to_csv(tmp / f"{name}.csv", index=False, lineterminator="\r\n")
            write_json(tmp / "labels.json", labels)
        log.info("split: %d train, %d validation, %d test rows -> %s",
                 len(train), len(val), len(test), args.out)

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
