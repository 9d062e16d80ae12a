"""The tokenize stage's output, data/tokenized: a `datasets` DatasetDict of token ids and
tokenized.json, the typed record of what those ids are (task, labels, max_length, padding, and
for sft whether rows are packed and the chat template that rendered them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from stages.lib.io import read_json, require_dir, write_json
from stages.lib.params import PADDINGS, TASK_TYPES, UserError

TOKENIZED_FILE = "tokenized.json"
DATASET_DIR = "dataset"


@dataclass(frozen=True)
class ChatTargets:
    """An sft split's per-row targets beside its input_ids: labels (IGNORE_INDEX outside the
    trained tokens), position_ids restarting per example in packed rows (None: one example per
    row), and each example's conversation as JSON (test only: the prompts evaluate answers)."""

    labels: list[list[int]]
    position_ids: list[list[int]] | None
    conversations: list[str] | None


# {split: (token id lists, class ids)}; language-model blocks have no labels: (blocks, None);
# sft: (input_ids, ChatTargets)
Splits = dict[str, tuple[list[list[int]], list[int] | ChatTargets | None]]


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
    packed: bool  # sft: several examples per row (position_ids restart); else false
    chat_template: str  # sft: the template the examples were rendered with; else ""

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
                or not isinstance(meta.labels, list) or not all(isinstance(x, str) for x in meta.labels)
                or not isinstance(meta.packed, bool) or not isinstance(meta.chat_template, str)):
            raise UserError(f"{path}: expected task one of {', '.join(TASK_TYPES)}, labels a list of "
                            f"names, max_length an int, padding one of {', '.join(PADDINGS)}, packed a "
                            f"boolean, chat_template a string; got {raw}")
        return meta

    def save(self, path: str | Path) -> None:
        write_json(path, dataclasses.asdict(self))


def load_tokenized(directory: str | Path) -> tuple[Splits, TokenizedMeta]:
    """The tokenize stage's output: {split: (token id lists, label ids or None)} and its metadata."""
    import datasets

    directory = require_dir(directory, "tokenized dataset")
    meta = TokenizedMeta.load(directory / TOKENIZED_FILE)
    dataset = datasets.load_from_disk(str(directory / DATASET_DIR))
    return {name: (part["input_ids"], _targets(part)) for name, part in dataset.items()}, meta


def _targets(part) -> list[int] | ChatTargets | None:
    columns = part.column_names
    if "labels" in columns:  # sft
        return ChatTargets(part["labels"], part["position_ids"] if "position_ids" in columns else None,
                           part["conversation"] if "conversation" in columns else None)
    return part["label"] if "label" in columns else None
