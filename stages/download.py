"""download: materialize the raw dataset into data/raw/ and the base model into models/base/.

Reads  data.source (a directory with train/test files, or a `datasets` hub id), task.type,
       model.name_or_path, model.revision.
Writes <data-out>/{train,test}.<csv|jsonl|parquet> (classification), {train,test}.<jsonl|json|parquet>
       (sft: chat or instruction rows; a hub dataset's splits as parquet) or the corpus files
       train[/valid/test].txt[.gz] (language models), and <model-out>/ (config, safetensors
       weights, tokenizer), each with a SOURCE.json saying where it came from (id, revision,
       sha256).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from stages.lib.chat import CHAT_LAYOUT, SUFFIXES as CHAT_SUFFIXES
from stages.lib.io import atomic_dir, run_main, sha256_file, write_json
from stages.lib.sources import SOURCE_FILE, copy_model_files, resolve_model_source
from stages.lib.tables import CORPUS_NAMES, find_corpus, find_table
from stages.lib.params import UserError, load_params

PARAMS = ("task.type", "data.source", "model.name_or_path", "model.revision")
SPLITS = ("train", "test")
log = logging.getLogger("qlora")


def fetch_dataset(source: str, out_dir: Path, task: str = "classification") -> dict[str, Any]:
    """Copy the data files from a local directory (tables, or a text corpus for language
    models), or save a hub dataset's splits."""
    path = Path(source)
    if path.is_dir():
        if task == "classification":
            sources = [find_table(path, split) for split in SPLITS]
        elif task == "sft":  # chat or instruction rows: validated by split
            sources = [find_table(path, split, CHAT_SUFFIXES, CHAT_LAYOUT) for split in SPLITS]
        else:
            sources = list(find_corpus(path).values())
        files = {}
        for src in sources:
            shutil.copyfile(src, out_dir / src.name)
            files[src.name] = sha256_file(out_dir / src.name)
        return {"kind": "local", "path": source, "sha256": files}
    if path.exists():
        raise UserError(f"data.source: {source} is a file; expected a directory holding "
                        + {"classification": "train and test files (.csv, .jsonl or .parquet)",
                           "sft": "train and test files (.jsonl, .json or .parquet; chat or instruction rows)"}
                        .get(task, "train.txt (and optionally valid.txt, test.txt)"))
    if task not in ("classification", "sft"):  # sft: a hub dataset's train/test splits, as tables
        return _fetch_hub_corpus(source, out_dir)
    return _fetch_hub_dataset(source, out_dir)


def _load_hub_dataset(dataset_id: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id)
    except (ConnectionError, FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"data.source: {dataset_id!r} is not a local directory and could not be "
                        f"loaded from the Hugging Face hub ({str(e).splitlines()[0][:160]})") from None


def _fetch_hub_corpus(dataset_id: str, out_dir: Path) -> dict[str, Any]:
    """A hub dataset's `text` column, one split per .txt file."""
    dataset = _load_hub_dataset(dataset_id)
    if "train" not in dataset or "text" not in dataset["train"].column_names:
        raise UserError(f"data.source: {dataset_id!r} needs a train split with a text column "
                        f"(it has splits {', '.join(dataset)})")
    files = {}
    for split in dataset:
        if any(split in names for names in CORPUS_NAMES.values()):
            text = "".join(line if line.endswith("\n") else line + "\n" for line in dataset[split]["text"])
            (out_dir / f"{split}.txt").write_text(text, encoding="utf-8")
            files[f"{split}.txt"] = sha256_file(out_dir / f"{split}.txt")
    return {"kind": "hub", "dataset_id": dataset_id, "fingerprint": dataset["train"]._fingerprint,
            "sha256": files}


def _fetch_hub_dataset(dataset_id: str, out_dir: Path) -> dict[str, Any]:
    dataset = _load_hub_dataset(dataset_id)
    missing = [s for s in SPLITS if s not in dataset]
    if missing:
        raise UserError(f"data.source: {dataset_id!r} has no {', '.join(missing)} split "
                        f"(it has {', '.join(dataset)})")
    files = {}
    for split in SPLITS:
        dataset[split].to_parquet(str(out_dir / f"{split}.parquet"))
        files[f"{split}.parquet"] = sha256_file(out_dir / f"{split}.parquet")
    return {"kind": "hub", "dataset_id": dataset_id, "fingerprint": dataset["train"]._fingerprint,
            "sha256": files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params.yaml")
    parser.add_argument("--data-out", required=True, help="raw dataset directory")
    parser.add_argument("--model-out", required=True, help="base model directory")
    args = parser.parse_args(argv)

    def work() -> None:
        params = load_params(args.params, PARAMS)
        model_dir, model_origin = resolve_model_source(params["model.name_or_path"],
                                                       params["model.revision"])
        with atomic_dir(args.data_out) as tmp:
            origin = fetch_dataset(params["data.source"], tmp, params["task.type"])
            write_json(tmp / SOURCE_FILE, origin)
        log.info("dataset %s -> %s (%s)", params["data.source"], args.data_out, ", ".join(origin["sha256"]))
        with atomic_dir(args.model_out) as tmp:
            model_origin["sha256"] = copy_model_files(model_dir, tmp)
            write_json(tmp / SOURCE_FILE, model_origin)
        log.info("base model %s -> %s (%d files)", params["model.name_or_path"], args.model_out,
                 len(model_origin["sha256"]))

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
