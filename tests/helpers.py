"""Helpers shared by the tests: paths, params editing, stage argv, stderr parsing."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
STAGES = ("download", "split", "tokenize", "train", "evaluate", "export")
INTENTS = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked")

# Overrides that make every stage take seconds, plus the values the tests rely on (pinned, so a
# new shipped default does not break them). The schema of the shipped params.yaml is kept: every
# other key keeps its shipped value. The fixtures set data.source and model.name_or_path to the
# tiny data and model.
TINY_OVERRIDES: dict[str, Any] = {
    "data.label_names": LABELS,
    "split.val_fraction": 0.2,
    "split.seed": 42,
    "tokenize.max_length": 16,
    "tokenize.padding": "longest",
    "quant.type": "nf4",
    "quant.double_quant": True,
    "quant.compute_dtype": "fp32",
    "lora.r": 16,
    "lora.alpha": 32,
    "lora.target_modules": ["query", "value"],
    "lora.modules_to_save": ["classifier"],
    "train.seed": 42,
    "train.batch_size": 8,
    "train.epochs": 1,
    "train.max_steps": 4,
    "train.eval_every_steps": 2,  # also exercises best-checkpoint selection mid-epoch
    "train.log_every_steps": 1,
    "train.gradient_checkpointing": False,
    "train.checkpoint_every_n_layers": 1,
    "evaluate.batch_size": 16,
    "export.merged": False,
}


def set_key(params: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (`lora.r`) in a nested params mapping."""
    section, name = key.split(".", 1)
    params[section][name] = value


def read_yaml(path: Path) -> Any:
    with Path(path).open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def write_yaml(path: Path, data: Any) -> Path:
    with Path(path).open("w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return Path(path)


@dataclass(frozen=True)
class Pipeline:
    """The paths of one run of the stage chain, laid out as dvc.yaml lays them out."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def split(self) -> Path:
        return self.root / "data" / "split"

    @property
    def tokenized(self) -> Path:
        return self.root / "data" / "tokenized"

    @property
    def base(self) -> Path:
        return self.root / "models" / "base"

    @property
    def adapter(self) -> Path:
        return self.root / "models" / "adapter"

    @property
    def export(self) -> Path:
        return self.root / "models" / "export"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints" / "train"

    def argv(self, stage: str) -> list[str]:
        """The stage's argv as dvc.yaml's cmd gives it, with this run's paths."""
        p = ["--params", str(self.params)]
        return {
            "download": p + ["--data-out", str(self.raw), "--model-out", str(self.base)],
            "split": p + ["--raw", str(self.raw), "--out", str(self.split)],
            "tokenize": p + ["--split", str(self.split), "--base", str(self.base),
                             "--out", str(self.tokenized)],
            "train": p + ["--data", str(self.tokenized), "--base", str(self.base),
                          "--adapter-out", str(self.adapter),
                          "--metrics-out", str(self.metrics / "train"),
                          "--checkpoint-dir", str(self.checkpoints)],
            "evaluate": p + ["--data", str(self.tokenized), "--base", str(self.base),
                             "--adapter", str(self.adapter),
                             "--metrics-out", str(self.metrics / "evaluate")],
            "export": p + ["--adapter", str(self.adapter), "--base", str(self.base),
                           "--metrics", str(self.metrics), "--out", str(self.export)],
        }[stage]


def run_stage(name: str, argv: list[str]) -> int:
    """stages.<name>.main(argv)."""
    return importlib.import_module(f"stages.{name}").main(argv)


def error_message(err: str) -> str:
    """The message after `error: ` in captured stderr; exactly one such line must be there.

    Logging lines come before it; everything after the marker is the message, so a message
    that spans lines comes back with its newlines.
    """
    lines = err.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(hits) == 1, f"expected exactly one `error:` line in stderr, got:\n{err}"
    return "\n".join(lines[hits[0]:])[len("error: "):].rstrip("\n")


def leftovers(directory: Path) -> list[str]:
    """Atomic-write temporaries (`.x.tmp-*`, `.x.old-*`) left in a directory."""
    if not Path(directory).is_dir():
        return []
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def compose(overrides: list[str]) -> dict[str, Any]:
    """params.yaml as `dvc exp run -S ...` composes it from conf/ (DVC's Hydra composition)."""
    import tempfile

    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(ROOT / "conf"), None, "config", str(ROOT), overrides)
        return read_yaml(out)


def run_recipe(root: Path, overrides: list[str]) -> Pipeline:
    """Every stage in-process, on params composed from the recipe plus `overrides`."""
    run = Pipeline(root)
    run.params.write_text(json.dumps(compose(overrides)), encoding="utf-8")  # JSON is YAML
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # DVCLive looks for a git/DVC repo from the working directory
        for stage in STAGES:
            assert run_stage(stage, run.argv(stage)) == 0, stage
    return run


def tiny_overrides(recipe: str, corpora: dict[str, Path], decoder_configs: dict[str, Path],
                   tiny_model_dir: Path) -> list[str]:
    model = {"masked-lm": str(tiny_model_dir),
             "causal-lm": f"random-init:{decoder_configs['tiny-opt']}",
             "intent-classification": f"random-init:{decoder_configs['tiny-gpt2']}"}[recipe]
    return [f"task={recipe}", f"data.source={corpora[recipe]}", f"model.name_or_path={model}",
            "tokenize.max_length=32", "quant.compute_dtype=fp32", "train.batch_size=8", "train.epochs=1",
            "train.max_steps=4", "train.eval_every_steps=2", "train.log_every_steps=1",
            "evaluate.batch_size=16", "generate.max_new_tokens=7"]
