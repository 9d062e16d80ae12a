"""Same params, same seeds, same inputs: same metrics and the same adapter tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from helpers import Pipeline, run_stage

TIMING_KEYS = {"train_time_s", "samples_per_s", "peak_memory_mb"}


def without(d: dict, keys: set[str]) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_two_train_runs_are_identical(pipeline: Pipeline, tmp_path: Path, write_params,
                                      monkeypatch) -> None:
    from safetensors.torch import load_file

    run = Pipeline(tmp_path / "again")
    run.root.mkdir()
    write_params(run.params)
    assert run.params.read_bytes() == pipeline.params.read_bytes()
    monkeypatch.chdir(run.root)
    argv = ["--params", str(run.params), "--data", str(pipeline.tokenized), "--base", str(pipeline.base),
            "--adapter-out", str(run.adapter), "--metrics-out", str(run.metrics / "train")]
    assert run_stage("train", argv) == 0

    first = json.loads((pipeline.metrics / "train" / "metrics.json").read_text())
    second = json.loads((run.metrics / "train" / "metrics.json").read_text())
    assert TIMING_KEYS <= set(first)
    assert without(first, TIMING_KEYS) == without(second, TIMING_KEYS)

    for curve in ("train/loss.tsv", "train/lr.tsv", "val/accuracy.tsv", "val/loss.tsv"):
        a, b = (pd.read_csv(m / "train" / "plots" / "metrics" / curve, sep="\t")
                for m in (pipeline.metrics, run.metrics))
        value = curve.rsplit("/", 1)[-1][:-4]
        assert a["step"].tolist() == b["step"].tolist(), curve
        assert a[value].tolist() == b[value].tolist(), curve

    tensors_a = load_file(str(pipeline.adapter / "adapter_model.safetensors"))
    tensors_b = load_file(str(run.adapter / "adapter_model.safetensors"))
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key
    # ...and the seed matters: the comparison above is not vacuous
    assert any(t.abs().sum() > 0 for k, t in tensors_a.items() if "lora_B" in k), "LoRA B never trained"


def test_two_evaluate_runs_are_identical(pipeline: Pipeline, tmp_path: Path, write_params,
                                         monkeypatch) -> None:
    run = Pipeline(tmp_path)
    write_params(run.params)
    monkeypatch.chdir(run.root)
    argv = ["--params", str(run.params), "--data", str(pipeline.tokenized), "--base", str(pipeline.base),
            "--adapter", str(pipeline.adapter), "--metrics-out", str(run.metrics / "evaluate")]
    assert run_stage("evaluate", argv) == 0
    first = json.loads((pipeline.metrics / "evaluate" / "metrics.json").read_text())
    second = json.loads((run.metrics / "evaluate" / "metrics.json").read_text())
    assert without(first, {"samples_per_s"}) == without(second, {"samples_per_s"})
    matrix = Path("plots") / "sklearn" / "confusion_matrix.json"
    assert (pipeline.metrics / "evaluate" / matrix).read_bytes() == (run.metrics / "evaluate" / matrix).read_bytes()
