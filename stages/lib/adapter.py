"""The adapter's pipeline.json: one typed schema, validated whole before anything uses it.

An adapter directory (models/adapter, models/export) is data: PEFT's safetensors weights, its
adapter_config.json, tokenizer files, and this file, which says what the adapter was trained
under (task, labels, max_length, padding, quantization, LoRA and train settings), where its base
model came from, and the sha256 of every file a load reads. `AdapterMeta.load` rejects any
field of the wrong type, out of range or outside its choices, and any file name that is not a
plain name inside the directory, with one line naming the file and key.

The tokenize stage's output has a pipeline.json of its own, of another shape (not this schema).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from stages.lib.io import read_json, write_json
from stages.lib.params import PADDINGS, Lora, Quant, Task, UserError, _check_value

ADAPTER_META_FILE = "pipeline.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_KINDS = ("package", "local", "hub", "random-init")
# Origin keys each kind of base records besides kind, name_or_path and sha256.
BASE_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "package": ("package", "version"), "local": ("path",),
    "hub": ("repo_id", "revision", "commit"), "random-init": ("config", "seed", "note")}
PACKAGE_PREFIX = "package:"
# A file named in a sha256 record: one plain name inside its directory (no separators, no `..`).
PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# A package base: a top-level import name, looked up in installed distributions (never imported).
IMPORT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
JSON_SCALARS = (str, int, float, bool, type(None))


def _fail(path: Path, key: str, message: str) -> UserError:
    return UserError(f"{path}: {key}: {message}")


def _check_hashes(path: Path, key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise _fail(path, key, f"expected a non-empty mapping of file name to sha256, got {value!r}"[:300])
    for name, digest in value.items():
        if not isinstance(name, str) or not PLAIN_FILE_NAME.fullmatch(name):
            raise _fail(path, f"{key}.{name}", "expected a plain file name inside the directory "
                        "(letters, digits, . _ + -; no / or ..)")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise _fail(path, f"{key}.{name}", f"expected 64 lowercase hex digits, got {digest!r}"[:300])
    return dict(value)


def _section(path: Path, key: str, value: Any, cls: type) -> Any:
    """A params section (lora, quant, task) as its params.py dataclass, every field checked."""
    if not isinstance(value, dict):
        raise _fail(path, key, f"expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in value:
        if name not in names:
            raise _fail(path, f"{key}.{name}", f"unknown key (expected one of {', '.join(names)})")
    for f in dataclasses.fields(cls):
        if f.name not in value:
            raise _fail(path, f"{key}.{f.name}", "missing")
        problem = _check_value(f"{key}.{f.name}", value[f.name], hints[f.name], f.metadata)
        if problem:
            raise UserError(f"{path}: {problem}")
    return cls(**value)


def _plain_path(path: Path, key: str, value: Any, absolute: bool) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, key, f"expected a non-empty path, got {value!r}")
    parts = PurePosixPath(value).parts
    if ".." in parts or (absolute and not value.startswith("/")):
        raise _fail(path, key, f"expected {'an absolute' if absolute else 'a'} path without `..`, got {value!r}")
    return value


@dataclass(frozen=True)
class BaseOrigin:
    """Where the base model came from (SOURCE.json of models/base), and its files' sha256."""

    kind: str
    name_or_path: str
    sha256: dict[str, str]
    extra: dict[str, Any]  # the kind's own keys (BASE_KIND_KEYS)

    @property
    def package_name(self) -> str:
        """The import name of a package base (`package:<name>`); checked at load."""
        return self.name_or_path[len(PACKAGE_PREFIX):]

    @classmethod
    def from_json(cls, path: Path, value: Any) -> BaseOrigin:
        if not isinstance(value, dict):
            raise _fail(path, "base", f"expected a mapping, got {type(value).__name__}")
        kind = value.get("kind")
        if kind not in BASE_KINDS:
            raise _fail(path, "base.kind", f"expected one of {', '.join(BASE_KINDS)}, got {kind!r}")
        allowed = ("kind", "name_or_path", "sha256", *BASE_KIND_KEYS[kind])
        for key in value:
            if key not in allowed:
                raise _fail(path, f"base.{key}", f"unknown key for a {kind} base (expected {', '.join(allowed)})")
        for key in allowed:
            if key not in value:
                raise _fail(path, f"base.{key}", "missing")
        name = value["name_or_path"]
        if not isinstance(name, str) or not name:
            raise _fail(path, "base.name_or_path", f"expected a non-empty string, got {name!r}")
        extra = {k: value[k] for k in BASE_KIND_KEYS[kind]}
        for key, v in extra.items():
            expected = int if key == "seed" else str
            if not isinstance(v, expected) or isinstance(v, bool) or (expected is str and not v):
                raise _fail(path, f"base.{key}", f"expected a non-empty {expected.__name__}, got {v!r}")
        if kind == "package" and not (name.startswith(PACKAGE_PREFIX)
                                      and IMPORT_NAME.fullmatch(name[len(PACKAGE_PREFIX):])):
            raise _fail(path, "base.name_or_path", "expected package:<top-level import name> "
                        f"(letters, digits, _), got {name!r}")
        if kind != "package" and name.startswith(PACKAGE_PREFIX):
            raise _fail(path, "base.name_or_path", f"a {kind} base named like a package ({name!r})")
        if kind == "local":
            _plain_path(path, "base.path", extra["path"], absolute=True)
        if kind == "random-init":
            _plain_path(path, "base.config", extra["config"], absolute=False)
        return cls(kind, name, _check_hashes(path, "base.sha256", value["sha256"]), extra)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name_or_path": self.name_or_path, "sha256": self.sha256, **self.extra}


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
                raise _fail(path, key, f"unknown key (expected one of {', '.join(names)})")
        for key in names:
            if key not in raw:
                raise _fail(path, key, "missing" + (" (no sha256 record: refusing an adapter whose "
                                                    "files cannot be checked)" if key == "sha256" else ""))
        task = _section(path, "task", raw["task"], Task)
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
        sha256 = _check_hashes(path, "sha256", raw["sha256"])
        if ADAPTER_WEIGHTS not in sha256:
            raise _fail(path, "sha256", f"no entry for {ADAPTER_WEIGHTS}")
        return cls(task, list(labels), max_length, raw["padding"], _section(path, "quant", raw["quant"], Quant),
                   _section(path, "lora", raw["lora"], Lora), dict(train), list(modules),
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

    def quant_dict(self) -> dict[str, Any]:
        """The quant section as the model-loading functions take it."""
        return dataclasses.asdict(self.quant)

    def with_hashes(self, sha256: Mapping[str, str]) -> AdapterMeta:
        return dataclasses.replace(self, sha256=dict(sha256))
