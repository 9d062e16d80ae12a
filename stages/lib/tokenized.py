"""The tokenize stage's output, data/tokenized: a `datasets` DatasetDict of token ids and
tokenized.json, the typed record of what those ids are (task, labels, max_length, padding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from stages.lib.io import read_json, require_dir, write_json
from stages.lib.params import PADDINGS, TASK_TYPES, UserError

TOKENIZED_FILE = "tokenized.json"
DATASET_DIR = "dataset"
# {split: (token id lists, class ids)}; language-model blocks have no labels: (blocks, None)
Splits = dict[str, tuple[list[list[int]], list[int] | None]]


def min_width(max_length: int, padding: str) -> int:
    """The narrowest a batch is padded to: max_length under `padding: max_length` (every batch
    as wide as the reference recipe's), else 0 (each batch as wide as its longest text)."""
    return max_length if padding == "max_length" else 0


@dataclass(frozen=True)
class TokenizedMeta:
    """What the token ids in data/tokenized are: for which task, with which label names (class
    id = index), cut at max_length and to be padded as `padding` says."""

    task: str
    labels: list[str]
    max_length: int
    padding: str

    @property
    def min_width(self) -> int:
        return min_width(self.max_length, self.padding)

    @classmethod
    def load(cls, path: str | Path) -> TokenizedMeta:
        raw = read_json(path)
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, dict) or sorted(raw) != sorted(names):
            found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise UserError(f"{path}: expected keys {', '.join(names)}, found {found} "
                            "(rerun the tokenize stage: dvc repro)")
        meta = cls(**raw)
        if (meta.task not in TASK_TYPES or meta.padding not in PADDINGS or type(meta.max_length) is not int
                or not isinstance(meta.labels, list) or not all(isinstance(x, str) for x in meta.labels)):
            raise UserError(f"{path}: expected task one of {', '.join(TASK_TYPES)}, labels a list of "
                            f"names, max_length an int, padding one of {', '.join(PADDINGS)}; got {raw}")
        return meta

    def save(self, path: str | Path) -> None:
        write_json(path, dataclasses.asdict(self))


def load_tokenized(directory: str | Path) -> tuple[Splits, TokenizedMeta]:
    """The tokenize stage's output: {split: (token id lists, label ids or None)} and its metadata."""
    import datasets

    directory = require_dir(directory, "tokenized dataset")
    meta = TokenizedMeta.load(directory / TOKENIZED_FILE)
    dataset = datasets.load_from_disk(str(directory / DATASET_DIR))
    return {name: (part["input_ids"], part["label"] if "label" in part.column_names else None)
            for name, part in dataset.items()}, meta
