"""An adapter directory's metadata: pipeline.json as a typed schema (AdapterMeta, validated whole
on load and before every save), the sha256 record of the directory's files, and writing an
adapter directory (save_adapter).

An adapter directory (models/adapter, models/export) holds PEFT's safetensors output, the
tokenizer and pipeline.json: what the adapter was trained with and on, and every file's sha256,
so that evaluate, export, predict and serve rebuild exactly the model train trained
(lib.adapter loads it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.lib.io import check_sha256_record, read_json, sha256_file, verify_sha256, write_json
from stages.lib.params import PADDINGS, Lora, Quant, Task, UserError, parse_section
from stages.lib.sources import BaseOrigin
from stages.lib.tokenized import min_width

ADAPTER_META_FILE = "pipeline.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Files of an adapter directory its sha256 record leaves out: the record itself and the model card.
UNHASHED_FILES = (ADAPTER_META_FILE, "README.md")
JSON_SCALARS = (str, int, float, bool, type(None))


# --- the metadata -----------------------------------------------------------------------------

def _fail(path: Path, key: str, message: str) -> UserError:
    return UserError(f"{path}: {key}: {message}")


@dataclass(frozen=True)
class AdapterMeta:
    """An adapter directory's pipeline.json."""

    task: Task
    labels: list[str]
    max_length: int
    padding: str
    quant: Quant
    lora: Lora
    train: dict[str, Any]  # the train section it was trained with (model card, provenance)
    modules_to_save: list[str]
    base: BaseOrigin
    sha256: dict[str, str]  # every file a load reads, by plain name

    @classmethod
    def from_json(cls, path: Path, raw: Any) -> AdapterMeta:
        path = Path(path)
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                raise UserError(f"{path}: {key}: unknown key (expected one of {', '.join(names)})")
        for key in names:
            if key not in raw:
                raise _fail(path, key, "missing" + (" (no sha256 record: refusing an adapter whose "
                                                    "files cannot be checked)" if key == "sha256" else ""))
        task = parse_section(path, "task", raw["task"], Task)
        labels = raw["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            raise _fail(path, "labels", f"expected a list of non-empty strings, got {labels!r}"[:300])
        if task.type == "classification" and not labels:
            raise _fail(path, "labels", "expected at least one label for a classification adapter")
        max_length = raw["max_length"]
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise _fail(path, "max_length", f"expected int >= 1, got {max_length!r}")
        if raw["padding"] not in PADDINGS:
            raise _fail(path, "padding", f"expected one of {', '.join(PADDINGS)}, got {raw['padding']!r}")
        train = raw["train"]
        if not isinstance(train, dict) or not all(isinstance(v, JSON_SCALARS) for v in train.values()):
            raise _fail(path, "train", "expected a mapping of keys to plain values")
        modules = raw["modules_to_save"]
        if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
            raise _fail(path, "modules_to_save", f"expected a list of non-empty strings, got {modules!r}"[:300])
        sha256 = check_sha256_record(path, "sha256", raw["sha256"])
        if ADAPTER_WEIGHTS not in sha256:
            raise _fail(path, "sha256", f"no entry for {ADAPTER_WEIGHTS}")
        return cls(task, list(labels), max_length, raw["padding"], parse_section(path, "quant", raw["quant"], Quant),
                   parse_section(path, "lora", raw["lora"], Lora), dict(train), list(modules),
                   BaseOrigin.from_json(path, raw["base"]), sha256)

    @classmethod
    def load(cls, path: str | Path) -> AdapterMeta:
        """Read and validate pipeline.json (the file itself, not its directory)."""
        return cls.from_json(Path(path), read_json(path))

    def to_json(self) -> dict[str, Any]:
        return {"task": dataclasses.asdict(self.task), "labels": self.labels, "max_length": self.max_length,
                "padding": self.padding, "quant": dataclasses.asdict(self.quant),
                "lora": dataclasses.asdict(self.lora), "train": self.train,
                "modules_to_save": self.modules_to_save, "base": self.base.to_json(), "sha256": self.sha256}

    def save(self, path: str | Path) -> None:
        """Write pipeline.json atomically; what is written is validated as a load would."""
        data = self.to_json()
        AdapterMeta.from_json(Path(path), data)
        write_json(path, data)

    @property
    def task_type(self) -> str:
        return self.task.type

    @property
    def min_width(self) -> int:
        return min_width(self.max_length, self.padding)

    def with_hashes(self, sha256: Mapping[str, str]) -> AdapterMeta:
        return dataclasses.replace(self, sha256=dict(sha256))


def read_adapter_meta(adapter_dir: Path, where: str | None = None) -> AdapterMeta:
    """An adapter directory's pipeline.json, once its weights are known to be safetensors and
    to match the sha256 recorded there. Errors start with `where` (default: the directory)."""
    where = where or str(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"{where}: adapter directory not found")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        raise UserError(f"{where}: " + ("adapter_model.bin is a pickle file; refusing to "
                        "load it (safetensors only)" if pickled else f"no {ADAPTER_WEIGHTS}"))
    meta = AdapterMeta.load(adapter_dir / ADAPTER_META_FILE)
    verify_sha256(adapter_dir, meta.sha256, adapter_dir / ADAPTER_META_FILE)
    return meta


def hash_adapter_files(adapter_dir: Path) -> dict[str, str]:
    """sha256 of every file a load of this adapter directory reads (weights, adapter_config.json,
    tokenizer files), by name: all its top-level files but pipeline.json and the model card."""
    return {f.name: sha256_file(f) for f in sorted(Path(adapter_dir).iterdir())
            if f.is_file() and f.name not in UNHASHED_FILES}


def write_adapter_config(adapter_dir: Path, **overrides: Any) -> None:
    """Rewrite adapter_config.json byte-stably: PEFT stores target_modules as a set, whose order
    changes with Python's hash seed, and an output DVC hashes must not change between runs."""
    path = adapter_dir / ADAPTER_CONFIG
    config = read_json(path)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config.update(overrides)
    write_json(path, config)


def save_adapter(model: torch.nn.Module, tokenizer: Any, meta: AdapterMeta, directory: Path) -> None:
    """Write an adapter directory into `directory` (the caller's temporary one): PEFT's weights
    (safetensors) and config, the tokenizer, and pipeline.json with every file's sha256."""
    model.save_pretrained(directory, safe_serialization=True)
    write_adapter_config(directory)
    tokenizer.save_pretrained(directory)
    meta.with_hashes(hash_adapter_files(directory)).save(directory / ADAPTER_META_FILE)
