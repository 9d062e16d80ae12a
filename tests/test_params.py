"""The params.yaml schema: the shipped file validates; each kind of mistake is one exact line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT, error_message, write_yaml
from stages import train
from stages.lib.params import ALL_KEYS, SCHEMA, Params, UserError, load_params


def flat_keys(params: dict[str, Any]) -> set[str]:
    return {f"{section}.{key}" for section, values in params.items() for key in values}


def test_shipped_params_validate(shipped_params: dict[str, Any]) -> None:
    params = load_params(ROOT / "params.yaml", ALL_KEYS)
    assert set(params) == set(ALL_KEYS) == flat_keys(shipped_params)
    assert params["lora.r"] == shipped_params["lora"]["r"]
    assert params.section("quant") == shipped_params["quant"]


def test_tiny_params_validate(tmp_path: Path, write_params) -> None:
    """The suite's own params keep the real schema (every other test relies on it)."""
    load_params(write_params(tmp_path / "params.yaml"), ALL_KEYS)


@pytest.fixture
def load_edited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shipped_params: dict[str, Any]):
    """load_edited(edit) -> the UserError message for the shipped params after `edit(params)`.

    The file is read as `params.yaml` from the working directory, as the stages read it, so
    messages start with `params.yaml: `.
    """
    monkeypatch.chdir(tmp_path)

    def load(edit) -> str:
        params = copy.deepcopy(shipped_params)
        edit(params)
        write_yaml(tmp_path / "params.yaml", params)
        with pytest.raises(UserError) as info:
            load_params("params.yaml", ALL_KEYS)
        return str(info.value)

    return load


def _set(section: str, key: str, value: Any):
    return lambda p: p[section].__setitem__(key, value)


def _rename(section: str, old: str, new: str):
    return lambda p: p[section].__setitem__(new, p[section].pop(old))


def _delete(section: str, key: str):
    return lambda p: p[section].pop(key)


ONE_PROBLEM = [
    ("typo", _rename("lora", "r", "rank"),
     ["params.yaml: lora.rank: unknown key (expected one of r, alpha, dropout, target_modules, "
      "modules_to_save)",
      "params.yaml: lora.r: missing (expected int)"]),
    ("missing", _delete("lora", "alpha"), ["params.yaml: lora.alpha: missing (expected float)"]),
    ("wrong-type", _set("lora", "r", "eight"), ["params.yaml: lora.r: expected int, got 'eight'"]),
    ("bool-is-not-int", _set("lora", "r", True), ["params.yaml: lora.r: expected int, got True"]),
    ("str-is-not-float", _set("train", "lr", "1e-3"),
     ["params.yaml: train.lr: expected float, got '1e-3'"]),
    ("below-min", _set("lora", "r", 0), ["params.yaml: lora.r: expected int >= 1, got 0"]),
    ("at-exclusive-max", _set("lora", "dropout", 1.0),
     ["params.yaml: lora.dropout: expected float < 1, got 1.0"]),
    ("below-exclusive-min", _set("split", "val_fraction", 0),
     ["params.yaml: split.val_fraction: expected float > 0, got 0"]),
    ("above-max", _set("tokenize", "max_length", 10_000),
     ["params.yaml: tokenize.max_length: expected int <= 8192, got 10000"]),
    ("unknown-choice", _set("quant", "type", "nf5"),
     ["params.yaml: quant.type: expected one of nf4, fp4, int8, none, got 'nf5'"]),
    ("empty-list", _set("lora", "target_modules", []),
     ["params.yaml: lora.target_modules: expected a non-empty list of str, got []"]),
    ("list-item-type", _set("data", "label_names", ["World", 1]),
     ["params.yaml: data.label_names: expected list of str, got ['World', 1]"]),
    ("target-modules-word", _set("lora", "target_modules", "all-layers"),
     ["params.yaml: lora.target_modules: expected list of str or 'all-linear', got 'all-layers'"]),
    ("checkpointing-word", _set("train", "gradient_checkpointing", "on"),
     ["params.yaml: train.gradient_checkpointing: expected bool or 'offload', got 'on'"]),
    ("checkpointing-int", _set("train", "gradient_checkpointing", 1),
     ["params.yaml: train.gradient_checkpointing: expected bool or 'offload', got 1"]),
    ("unknown-optimizer", _set("train", "optimizer", "sgd"),
     ["params.yaml: train.optimizer: expected one of adamw, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, "
      "got 'sgd'"]),
    ("unknown-section", lambda p: p.__setitem__("optim", {"lr": 1}),
     ["params.yaml: optim: unknown section (expected one of " + ", ".join(SCHEMA) + ")"]),
    ("missing-section", lambda p: p.pop("export"),
     ["params.yaml: export: missing section (expected keys merged)"]),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in ONE_PROBLEM],
                         ids=[c[0] for c in ONE_PROBLEM])
def test_mistake_is_reported_as_exact_lines(load_edited, edit, expected: list[str]) -> None:
    assert load_edited(edit).splitlines() == expected


def test_int_is_accepted_for_float(tmp_path: Path, shipped_params: dict[str, Any]) -> None:
    params = copy.deepcopy(shipped_params)
    params["lora"]["alpha"], params["train"]["max_grad_norm"] = 32, 1
    loaded = load_params(write_yaml(tmp_path / "params.yaml", params), ALL_KEYS)
    assert loaded["lora.alpha"] == 32 and loaded["train.max_grad_norm"] == 1


def test_every_problem_is_reported_at_once(load_edited) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["lora"]["r"] = 0
        p["quant"]["type"] = "nf5"
        p["train"]["epochs"] = "two"
        p["train"].pop("seed")

    assert sorted(load_edited(edit).splitlines()) == sorted([
        "params.yaml: lora.r: expected int >= 1, got 0",
        "params.yaml: quant.type: expected one of nf4, fp4, int8, none, got 'nf5'",
        "params.yaml: train.epochs: expected int, got 'two'",
        "params.yaml: train.seed: missing (expected int)",
    ])


@pytest.mark.parametrize(("content", "expected"), [
    ("- a\n- b\n", "params.yaml: expected a mapping of sections, got list"),
    ("lora: [unclosed\n", "params.yaml: not valid YAML ("),
])
def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str,
                         expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_params("params.yaml", ALL_KEYS)
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^.*nope\.yaml: params file not found$"):
        load_params(tmp_path / "nope.yaml", ALL_KEYS)


def test_params_returns_only_declared_keys(tmp_path: Path, write_params, tiny_params) -> None:
    params = load_params(write_params(tmp_path / "params.yaml"), ("lora.r", "lora.alpha"))
    r, alpha = tiny_params["lora"]["r"], tiny_params["lora"]["alpha"]
    assert dict(params) == {"lora.r": r, "lora.alpha": alpha}
    assert params.section("lora") == {"r": r, "alpha": alpha}
    with pytest.raises(KeyError, match="lora.dropout"):
        params["lora.dropout"]  # in params.yaml, but not declared


def test_params_mapping_rejects_undeclared_key() -> None:
    params = Params({"a.x": 1, "a.y": 2}, declared=("a.x",))
    assert params["a.x"] == 1 and list(params) == ["a.x"] and len(params) == 1
    with pytest.raises(KeyError):
        params["a.y"]


def test_declaring_a_key_outside_the_schema_is_a_bug(tmp_path: Path, write_params) -> None:
    with pytest.raises(KeyError, match="lora.rank"):
        load_params(write_params(tmp_path / "params.yaml"), ("lora.r", "lora.rank"))


def test_stage_with_bad_params_exits_1_before_writing(tmp_path: Path, write_params, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", {"lora.r": 0, "train.lr": "fast"})
    status = train.main(["--params", "params.yaml", "--data", "data/tokenized",
                         "--base", "models/base", "--adapter-out", "models/adapter",
                         "--metrics-out", "metrics/train", "--checkpoint-dir", "checkpoints/train"])
    assert status == 1
    message = error_message(capsys.readouterr().err)
    assert message.splitlines() == ["params.yaml: lora.r: expected int >= 1, got 0",
                                    "params.yaml: train.lr: expected float, got 'fast'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(("section", "key", "value"), [("lora", "target_modules", "all-linear"),
                                                       ("train", "gradient_checkpointing", "offload"),
                                                       ("train", "gradient_checkpointing", True),
                                                       ("train", "optimizer", "paged_adamw_8bit")])
def test_llm_settings_are_accepted(tmp_path: Path, shipped_params: dict[str, Any], section: str, key: str,
                                   value: Any) -> None:
    params = copy.deepcopy(shipped_params)
    params[section][key] = value
    write_yaml(tmp_path / "params.yaml", params)
    assert load_params(tmp_path / "params.yaml", ALL_KEYS)[f"{section}.{key}"] == value
