"""The tokenize stage's output, data/tokenized: a `datasets` DatasetDict of token ids and
tokenized.json, the typed record of what those ids are (task, labels, max_length, padding, and
for sft whether rows are packed and the chat template that rendered them).

Train and evaluate read the DatasetDict's Arrow files with pyarrow: importing `datasets` would
delay every training run's first step for nothing it adds here.
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
    directory = require_dir(directory, "tokenized dataset")
    meta = TokenizedMeta.load(directory / TOKENIZED_FILE)
    return {name: (columns["input_ids"], _targets(columns))
            for name, columns in read_dataset_dict(directory / DATASET_DIR).items()}, meta


def read_dataset_dict(directory: Path) -> dict[str, dict[str, list]]:
    """{split: {column: values}} of a DatasetDict that `save_to_disk` wrote: the Arrow stream
    files its dataset_dict.json and each split's state.json name, which `datasets.load_from_disk`
    memory-maps too."""
    import pyarrow as pa

    splits = _json_key(directory / "dataset_dict.json", "splits")
    if not isinstance(splits, list) or not splits:
        raise UserError(f"{directory / 'dataset_dict.json'}: expected a list of splits "
                        "(rerun the tokenize stage: dvc repro)")
    columns = {}
    for split in splits:
        state_file = directory / split / "state.json"
        files = _json_key(state_file, "_data_files")
        if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
            raise UserError(f"{state_file}: expected _data_files, a list of {{filename: ...}} "
                            "(rerun the tokenize stage: dvc repro)")
        tables = []
        for f in files:
            path = directory / split / f["filename"]
            try:
                with pa.memory_map(str(path)) as source:
                    tables.append(pa.ipc.open_stream(source).read_all())
            except (OSError, pa.ArrowInvalid) as e:
                raise UserError(f"{path}: expected an Arrow stream file written by the tokenize "
                                f"stage ({e}; rerun it: dvc repro)") from None
        table = pa.concat_tables(tables)
        columns[split] = {name: table.column(name).to_pylist() for name in table.column_names}
    return columns


def _json_key(path: Path, key: str) -> object:
    raw = read_json(path)
    return raw.get(key) if isinstance(raw, dict) else None


def _targets(columns: dict[str, list]) -> list[int] | ChatTargets | None:
    if "labels" in columns:  # sft
        return ChatTargets(columns["labels"], columns.get("position_ids"), columns.get("conversation"))
    return columns.get("label")
