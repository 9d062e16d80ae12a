"""train.processes: 2 on the CPU (two workers over gloo, launched by train itself) does the
arithmetic of one process with the same global batch, and only the main worker writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, Pipeline, error_message, leftovers, run_stage
from stages.lib.io import sha256_file

# No dropout anywhere (LoRA, base, head): each worker draws its own masks, so with dropout the
# two runs would differ by design. Without it they differ only in the order of float sums.
NO_DROPOUT = {"lora.dropout": 0.0, "train.base_dropout": False}


@pytest.fixture(scope="module")
def base_without_dropout(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline's base model with its head's dropout (hidden_dropout_prob) at 0 too."""
    base = tmp_path_factory.mktemp("base") / "base"
    shutil.copytree(pipeline.base, base)
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (base / "config.json").write_text(json.dumps(config))
    source = json.loads((base / "SOURCE.json").read_text())
    source["sha256"]["config.json"] = sha256_file(base / "config.json")
    (base / "SOURCE.json").write_text(json.dumps(source))
    return base


def train_run(run: Pipeline, pipeline: Pipeline, base: Path) -> list[str]:
    argv = run.argv("train")
    argv[argv.index("--data") + 1], argv[argv.index("--base") + 1] = str(pipeline.tokenized), str(base)
    return argv


def test_two_processes_match_one(pipeline: Pipeline, base_without_dropout: Path, tmp_path: Path,
                                 write_params, monkeypatch) -> None:
    from safetensors.torch import load_file

    one, two = Pipeline(tmp_path / "one"), Pipeline(tmp_path / "two")
    for run, processes in ((one, 1), (two, 2)):
        run.root.mkdir()
        write_params(run.params, {**NO_DROPOUT, "train.processes": processes})
    monkeypatch.chdir(one.root)
    assert run_stage("train", train_run(one, pipeline, base_without_dropout)) == 0

    done = subprocess.run([sys.executable, "-m", "stages.train", *train_run(two, pipeline, base_without_dropout)],
                          cwd=two.root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching 2 worker processes" in done.stderr
    # one log: the second worker's INFO lines are silenced
    assert done.stderr.count("train: best validation accuracy") == 1

    a, b = (json.loads((r.metrics / "train" / "metrics.json").read_text()) for r in (one, two))
    assert (a.pop("processes"), b.pop("processes")) == (1, 2)
    for key in ("steps", "train_samples", "best_step", "best_val_accuracy", "trainable_params"):
        assert a[key] == b[key], key
    for key in ("train_loss", "best_val_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    ta, tb = (load_file(str(r.adapter / "adapter_model.safetensors")) for r in (one, two))
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-3, atol=1e-4, msg=key)
    assert not two.checkpoints.exists() and leftovers(two.root / "models") == []


def test_batch_must_split_evenly(pipeline: Pipeline, tmp_path: Path, write_params, capsys) -> None:
    run = Pipeline(tmp_path)
    write_params(run.params, {"train.processes": 3})  # batch_size 8
    assert run_stage("train", train_run(run, pipeline, pipeline.base)) == 1
    assert error_message(capsys.readouterr().err) == (
        f"{run.params}: train.batch_size 8 is not a multiple of train.processes 3 (each process "
        "takes an equal share of every batch)")
    assert not run.adapter.exists()
