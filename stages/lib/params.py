"""The params.yaml schema, kept in one place, and its loader.

Every section is a frozen dataclass with typed fields and no defaults: defaults live in
params.yaml, where DVC sees them. `load_params` reports every problem at once (unknown keys,
missing keys, wrong types, values out of range or outside their choices), one line each, and
returns only the keys a stage declared, so a stage that reads an undeclared key fails loudly.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """A mistake in the user's input: printed as one line, no traceback."""


def rule(**checks: Any) -> Any:
    """Attach range/choice checks to a schema field: ge, gt, le, lt, choices, nonempty, words
    (for a field typed `X | str`: the strings it accepts besides an X), and pattern (a regular
    expression the whole string must match) with `means`, which the error message quotes."""
    return field(metadata=checks)


TASK_TYPES = ("classification", "masked-lm", "causal-lm", "sft")
# The validation metric that picks the best checkpoint, per task type; loss-like ones are minimised.
TASK_METRICS = {"classification": ("accuracy", "f1_macro", "f1_weighted", "loss"),
                "masked-lm": ("perplexity", "loss"), "causal-lm": ("perplexity", "loss"),
                # sft validates on response tokens only; exact_match is scored by evaluate, not per epoch
                "sft": ("loss", "perplexity")}
QUANT_TYPES = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
PADDINGS = ("longest", "max_length")
# Seeds feed numpy/sklearn/torch, which take 0..2**32-1 (numpy's legacy RandomState is the narrowest).
SEED_RANGE = dict(ge=0, le=2**32 - 1)
# train.optimizer: torch's AdamW, or bitsandbytes' 8-bit / paged ones (stages/lib/optimizers.py)
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
ALL_LINEAR = "all-linear"  # lora.target_modules: peft's every linear layer but the output layer
OFFLOAD = "offload"  # train.gradient_checkpointing: checkpoints in pinned host memory
# train.compile / evaluate.compile: always, never, or where the expected run makes it pay
# (stages/lib/compiling.py; on a CPU, auto means never)
COMPILE_CHOICES = (True, False, "auto")
# train.device / evaluate.device: auto = claim a free GPU, else the CPU (stages/lib/devices.py);
# cpu; cuda = claim a free GPU, failing on a host without one; cuda:N = GPU N, unclaimed
DEVICE_PATTERN = r"auto|cpu|cuda(?::([0-9]+))?"
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N (N: a GPU index, 0 or more)"


@dataclass(frozen=True)
class Task:
    type: str = rule(choices=TASK_TYPES)
    metric: str = rule(nonempty=True)  # one of TASK_METRICS[type]: checked in validate()
    mlm_probability: float = rule(gt=0, lt=1)


@dataclass(frozen=True)
class Data:
    source: str = rule(nonempty=True)  # directory with train/test files, or a datasets hub id
    text_column: str = rule(nonempty=True)
    label_column: str = rule(nonempty=True)
    label_names: list[str] = rule()  # [] = the distinct labels of the train file, sorted


@dataclass(frozen=True)
class Split:
    val_fraction: float = rule(gt=0, lt=1)
    seed: int = rule(**SEED_RANGE)


@dataclass(frozen=True)
class Model:
    name_or_path: str = rule(nonempty=True)
    revision: str = rule(nonempty=True)


@dataclass(frozen=True)
class Tokenize:
    max_length: int = rule(ge=8, le=8192)
    padding: str = rule(choices=PADDINGS)


@dataclass(frozen=True)
class Sft:
    train_on_prompt: bool = rule()
    packing: bool = rule()


@dataclass(frozen=True)
class Quant:
    type: str = rule(choices=QUANT_TYPES)
    double_quant: bool = rule()
    compute_dtype: str = rule(choices=COMPUTE_DTYPES)
    cache_dequantized: bool = rule()


@dataclass(frozen=True)
class Lora:
    r: int = rule(ge=1)
    alpha: float = rule(gt=0)
    dropout: float = rule(ge=0, lt=1)
    target_modules: list[str] | str = rule(nonempty=True, words=(ALL_LINEAR,))
    modules_to_save: list[str] = rule()


@dataclass(frozen=True)
class Train:
    seed: int = rule(**SEED_RANGE)
    epochs: int = rule(ge=1)
    lr: float = rule(gt=0, lt=1)
    batch_size: int = rule(ge=1)
    weight_decay: float = rule(ge=0)
    warmup_ratio: float = rule(ge=0, lt=1)
    max_grad_norm: float = rule(ge=0)
    max_steps: int = rule(ge=0)
    eval_every_steps: int = rule(ge=0)
    log_every_steps: int = rule(ge=1)
    checkpoint_every_steps: int = rule(ge=0)
    group_by_length: bool = rule()
    gradient_checkpointing: bool | str = rule(words=(OFFLOAD,))
    checkpoint_every_n_layers: int = rule(ge=1)
    base_dropout: bool = rule()
    compile: bool | str = rule(choices=COMPILE_CHOICES)
    processes: int = rule(ge=1)
    device: str = rule(pattern=DEVICE_PATTERN, means=DEVICE_CHOICES)
    gradient_accumulation_steps: int = rule(ge=1)
    optimizer: str = rule(choices=OPTIMIZERS)


@dataclass(frozen=True)
class Evaluate:
    batch_size: int = rule(ge=1)
    merged: bool = rule()
    compile: bool | str = rule(choices=COMPILE_CHOICES)
    device: str = rule(pattern=DEVICE_PATTERN, means=DEVICE_CHOICES)


@dataclass(frozen=True)
class Export:
    merged: bool = rule()


@dataclass(frozen=True)
class Generate:
    prompts: list[str] = rule(nonempty=True)
    max_new_tokens: int = rule(ge=1, le=4096)
    do_sample: bool = rule()
    temperature: float = rule(gt=0)
    top_k: int = rule(ge=0)
    seed: int = rule(**SEED_RANGE)


SCHEMA: dict[str, type] = {
    "task": Task,
    "data": Data,
    "split": Split,
    "model": Model,
    "tokenize": Tokenize,
    "sft": Sft,
    "quant": Quant,
    "lora": Lora,
    "train": Train,
    "evaluate": Evaluate,
    "export": Export,
    "generate": Generate,
}

ALL_KEYS: tuple[str, ...] = tuple(
    f"{section}.{f.name}" for section, cls in SCHEMA.items() for f in dataclasses.fields(cls)
)


def _alternatives(tp: Any) -> tuple[Any, ...]:
    """The member types of `a | b` (a union), else ()."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()


def _show(value: Any) -> str:
    """A value as it is written in YAML (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _type_name(tp: Any) -> str:
    if _alternatives(tp):
        return " or ".join(_type_name(t) for t in _alternatives(tp))
    if typing.get_origin(tp) is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def _check_type(value: Any, tp: Any) -> bool:
    if _alternatives(tp):
        return any(_check_type(value, t) for t in _alternatives(tp))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a valid float (lr: 1 is fine, lr: "1e-3" is not)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


_BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"),
           ("le", operator.le, "<="), ("lt", operator.lt, "<"))


def _check_value(key: str, value: Any, tp: Any, checks: Mapping[str, Any]) -> str | None:
    """Return a problem description for one key, or None when it is valid."""
    if "pattern" in checks:  # one message for any wrong value, naming what is accepted
        if isinstance(value, str) and re.fullmatch(checks["pattern"], value):
            return None
        return f"{key}: expected {checks['means']}, got {value!r}"
    if "words" in checks:  # `X | str`: an X, or one of the words
        other = next(t for t in typing.get_args(tp) if t is not str)
        words = " or ".join(repr(w) for w in checks["words"])
        if isinstance(value, str) and value not in checks["words"] or not _check_type(value, tp):
            return f"{key}: expected {_type_name(other)} or {words}, got {value!r}"
        if isinstance(value, str):
            return None
        tp = other
    elif not _check_type(value, tp):
        return f"{key}: expected {_type_name(tp)}, got {value!r}"
    if tp is float and not math.isfinite(value):  # YAML's .inf and .nan parse as floats
        return f"{key}: expected a finite float, got {value!r}"
    if checks.get("nonempty") and len(value) == 0:
        return f"{key}: expected a non-empty {_type_name(tp)}, got {value!r}"
    if "choices" in checks and not any(value == c and type(value) is type(c) for c in checks["choices"]):
        return f"{key}: expected one of {', '.join(map(_show, checks['choices']))}, got {value!r}"
    for name, holds, symbol in _BOUNDS:
        if name in checks and not holds(value, checks[name]):
            return f"{key}: expected {_type_name(tp)} {symbol} {checks[name]}, got {value!r}"
    return None


def validate(raw: Any, source: str = "params.yaml") -> dict[str, Any]:
    """Validate a parsed params mapping against SCHEMA; return {"section.key": value}."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    problems: list[str] = []
    flat: dict[str, Any] = {}
    for section in raw:
        if section not in SCHEMA:
            problems.append(f"{section}: unknown section (expected one of {', '.join(SCHEMA)})")
    for section, cls in SCHEMA.items():
        values = raw.get(section)
        if not isinstance(values, dict):
            problems.append(f"{section}: missing section (expected keys "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))})")
            continue
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                problems.append(f"{section}.{key}: unknown key (expected one of {', '.join(names)})")
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if f.name not in values:
                problems.append(f"{key}: missing (expected {_type_name(hints[f.name])})")
                continue
            problem = _check_value(key, values[f.name], hints[f.name], f.metadata)
            if problem:
                problems.append(problem)
            else:
                flat[key] = values[f.name]
    task_type, metric = flat.get("task.type"), flat.get("task.metric")
    if task_type in TASK_METRICS and metric is not None and metric not in TASK_METRICS[task_type]:
        problems.append(f"task.metric: expected one of {', '.join(TASK_METRICS[task_type])} for "
                        f"task.type {task_type}, got {metric!r}")
    if problems:
        raise UserError("\n".join(f"{source}: {p}" for p in problems))
    return flat


class Params(Mapping[str, Any]):
    """The validated keys one stage declared, read as params["lora.r"]."""

    def __init__(self, values: Mapping[str, Any], declared: Iterable[str]):
        self._declared = tuple(declared)
        self._values = {k: values[k] for k in self._declared}

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            raise KeyError(f"params key {key!r} is not in this stage's PARAMS {self._declared}")
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def section(self, name: str) -> dict[str, Any]:
        """The declared keys of one section, without the section prefix."""
        return {k.split(".", 1)[1]: v for k, v in self._values.items() if k.startswith(name + ".")}

    def typed(self, name: str) -> Any:
        """A section as its frozen schema dataclass (Train, Quant, ...); the stage must have
        declared every key of it."""
        cls = SCHEMA[name]
        missing = [f"{name}.{f.name}" for f in dataclasses.fields(cls) if f"{name}.{f.name}" not in self._values]
        if missing:  # a bug in the stage, not a user mistake
            raise KeyError(f"params keys {missing} are not in this stage's PARAMS {self._declared}")
        return cls(**self.section(name))


def parse_section(source: str | Path, key: str, value: Any, cls: type) -> Any:
    """A params section recorded elsewhere (an adapter's pipeline.json) as its schema
    dataclass, every field checked; the first problem is one UserError line."""
    if not isinstance(value, dict):
        raise UserError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in value:
        if name not in names:
            raise UserError(f"{source}: {key}.{name}: unknown key (expected one of {', '.join(names)})")
    for f in dataclasses.fields(cls):
        if f.name not in value:
            raise UserError(f"{source}: {key}.{f.name}: missing")
        problem = _check_value(f"{key}.{f.name}", value[f.name], hints[f.name], f.metadata)
        if problem:
            raise UserError(f"{source}: {problem}")
    return cls(**value)


def load_params(path: str | Path, declared: Iterable[str]) -> Params:
    """Read and validate the whole params file; return only the declared keys."""
    path = Path(path)
    declared = tuple(declared)
    unknown = [k for k in declared if k not in ALL_KEYS]
    if unknown:  # a bug in a stage, not a user mistake
        raise KeyError(f"stage declares keys outside the schema: {unknown}")
    try:
        with path.open(encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a params file") from None
    return Params(validate(raw, str(path)), declared)
