"""Same params, same seeds, same inputs: same metrics and the same adapter tensors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from helpers import Pipeline, run_stage

def test_two_train_runs_are_identical(pipeline: Pipeline, tmp_path: Path, write_params,
                                      monkeypatch) -> None:
    from safetensors.torch import load_file

    run = Pipeline(tmp_path / "again")
    run.root.mkdir()
    write_params(run.params)
    assert run.params.read_bytes() == pipeline.params.read_bytes()
    monkeypatch.chdir(run.root)
    argv = run.argv("train")
    argv[argv.index("--data") + 1], argv[argv.index("--base") + 1] = str(pipeline.tokenized), str(pipeline.base)
    assert run_stage("train", argv) == 0

    # byte for byte: speed figures are in timing.json, not metrics.json
    summary = Path("train") / "metrics.json"
    assert (pipeline.metrics / summary).read_bytes() == (run.metrics / summary).read_bytes()

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
    for name in ("metrics.json", "plots/sklearn/confusion_matrix.json", "plots/custom/per_class_f1.json"):
        assert (pipeline.metrics / "evaluate" / name).read_bytes() == \
            (run.metrics / "evaluate" / name).read_bytes(), name
