"""conf/preset/gpu.yaml: `dvc exp run -S +preset=gpu` composes (DVC's Hydra composition, as
helpers.compose runs it) to valid params that differ from the recipe's only in the preset's keys."""

from __future__ import annotations

from helpers import ROOT, compose
from stages.lib.params import validate

PRESET = {"train.compile": "auto", "quant.cache_dequantized": True, "evaluate.merged": False,
          "evaluate.compile": "auto", "evaluate.batch_size": 512}


def test_gpu_preset_sets_exactly_its_keys_on_the_default_recipe() -> None:
    assert (ROOT / "conf" / "preset" / "gpu.yaml").read_text().startswith("# @package _global_\n")
    default, gpu = compose([]), compose(["+preset=gpu"])
    assert validate(gpu) == {**validate(default), **PRESET}
    # what it changes from the shipped defaults (compile is auto in both)
    assert {k for k, v in PRESET.items() if validate(default)[k] != v} == {
        "quant.cache_dequantized", "evaluate.batch_size"}


def test_gpu_preset_keeps_a_recipes_own_batch_and_lr() -> None:
    for recipe in ("causal-lm", "masked-lm", "intent-classification"):
        plain, gpu = compose([f"task={recipe}"]), compose([f"task={recipe}", "+preset=gpu"])
        assert validate(gpu) == {**validate(plain), **PRESET}, recipe


def test_keys_given_after_the_preset_win() -> None:
    params = compose(["+preset=gpu", "evaluate.batch_size=2048", "quant.cache_dequantized=false"])
    assert params["evaluate"]["batch_size"] == 2048 and params["quant"]["cache_dequantized"] is False
    assert params["evaluate"]["merged"] is False
