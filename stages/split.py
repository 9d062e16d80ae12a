"""split: validate the raw data and split train into train/validation, stratified by label.

Reads  data/raw/{train,test}.*, params data.text_column, data.label_column, data.label_names,
       split.val_fraction, split.seed.
Writes <out>/{train,validation,test}.csv (columns text, label as class id) and labels.json.
       The test split is kept as given.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd
from sklearn.model_selection import train_test_split

from stages.lib.data import find_table, load_labelled
from stages.lib.io import atomic_dir, require_dir, run_main, write_json
from stages.lib.params import UserError, load_params

PARAMS = ("data.text_column", "data.label_column", "data.label_names",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--raw", required=True, help="raw dataset directory")
    parser.add_argument("--out", required=True, help="split dataset directory")
    args = parser.parse_args(argv)

    def work() -> None:
        p = load_params(args.params, PARAMS)
        raw = require_dir(args.raw, "raw dataset")
        labels = p["data.label_names"]
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
