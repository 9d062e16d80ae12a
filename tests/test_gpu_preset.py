"""conf/preset/gpu.yaml: `dvc exp run -S preset=gpu` composes (DVC's Hydra composition, as
helpers.compose runs it) to valid params that differ from the recipe's only in the preset's keys,
plus, for the default recipe only, conf/preset_recipe/gpu_classification.yaml's."""

from __future__ import annotations

from helpers import ROOT, compose
from stages.lib.params import validate

PRESET = {"train.compile": "auto", "quant.cache_dequantized": True, "evaluate.merged": False,
          "evaluate.compile": "auto", "evaluate.batch_size": 512}
DEFAULT_RECIPE_ONLY = {"train.epochs": 3}


def test_gpu_preset_sets_exactly_its_keys_on_the_default_recipe() -> None:
    assert (ROOT / "conf" / "preset" / "gpu.yaml").read_text().startswith("# @package _global_\n")
    default, gpu = compose([]), compose(["preset=gpu"])
    assert validate(gpu) == {**validate(default), **PRESET, **DEFAULT_RECIPE_ONLY}
    assert compose(["task=classification", "preset=gpu"]) == gpu
    # what it changes from the shipped defaults (compile is auto in both)
    assert {k for k, v in {**PRESET, **DEFAULT_RECIPE_ONLY}.items() if validate(default)[k] != v} == {
        "quant.cache_dequantized", "evaluate.batch_size", "train.epochs"}


def test_gpu_preset_keeps_a_recipes_own_batch_and_lr() -> None:
    for recipe in ("causal-lm", "masked-lm", "intent-classification"):
        plain, gpu = compose([f"task={recipe}"]), compose([f"task={recipe}", "preset=gpu"])
        assert validate(gpu) == {**validate(plain), **PRESET}, recipe


def test_keys_given_after_the_preset_win() -> None:
    params = compose(["preset=gpu", "evaluate.batch_size=2048", "quant.cache_dequantized=false",
                      "train.epochs=1"])
    assert params["evaluate"]["batch_size"] == 2048 and params["quant"]["cache_dequantized"] is False
    assert params["evaluate"]["merged"] is False and params["train"]["epochs"] == 1


def test_no_preset_composes_the_recipe_alone() -> None:
    """The defaults list names `preset: null`: without -S preset=... nothing of conf/preset/ or
    conf/preset_recipe/ is composed in."""
    assert compose([])["train"]["epochs"] == 2 and compose([])["quant"]["cache_dequantized"] is False
