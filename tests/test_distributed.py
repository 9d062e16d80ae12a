"""train.processes: 2 on the CPU (two workers over gloo, launched by train itself) does the
arithmetic of one process with the same global batch, and only the main worker writes."""

from __future__ import annotations

import dataclasses
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


def tiny_classifier() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=3, problem_type="single_label_classification")
    return BertForSequenceClassification(config)


def test_micro_batches_give_the_update_of_the_whole_batch() -> None:
    """gradient_accumulation_steps 2: each batch of 8 runs forward as two micro-batches of 4,
    and the optimizer steps once per batch, so the weights end as with whole batches (up to
    the order of float sums)."""
    from stages.lib.distributed import Processes
    from stages.lib.loop import NullLive, TrainingLoop
    from stages.lib.params import Task, Train
    from stages.lib.tasks import Objective

    generator = torch.Generator().manual_seed(1)
    texts = [torch.randint(1, 40, (int(n),), generator=generator).tolist()
             for n in torch.randint(3, 12, (40,), generator=generator)]
    labels = [i % 3 for i in range(40)]
    data = {"train": (texts[:32], labels[:32]), "validation": (texts[32:], labels[32:])}
    cfg = Train(seed=0, epochs=2, lr=1e-2, batch_size=8, weight_decay=0.01, warmup_ratio=0.0, max_grad_norm=1.0,
                max_steps=0, eval_every_steps=0, log_every_steps=2, checkpoint_every_steps=0,
                group_by_length=True, gradient_checkpointing=False, checkpoint_every_n_layers=1, base_dropout=True, compile=False,
                processes=1, device="auto", gradient_accumulation_steps=1, optimizer="adamw")
    objective = Objective(Task(type="classification", metric="accuracy", mlm_probability=0.15))
    weights, rows, losses = {}, {}, {}
    for steps in (1, 2):
        model = tiny_classifier()
        seen = rows[steps] = []
        model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(len(kwargs["input_ids"])) if module.training else None,
            with_kwargs=True)
        summary = TrainingLoop(model, data, 0, 0, dataclasses.replace(cfg, gradient_accumulation_steps=steps),
                               objective, NullLive(), torch.device("cpu"), torch.float32, None, Processes()).run()
        assert summary["steps"] == 8 and summary["train_samples"] == 64
        losses[steps] = summary["train_loss"]
        weights[steps] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert rows[1] == [8] * 8 and rows[2] == [4] * 16
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)  # the batch's mean loss, not a sum
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[2][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_share_must_split_into_micro_batches(pipeline: Pipeline, tmp_path: Path, write_params,
                                             capsys) -> None:
    run = Pipeline(tmp_path)
    write_params(run.params, {"train.processes": 2, "train.gradient_accumulation_steps": 3})  # batch 8
    assert run_stage("train", train_run(run, pipeline, pipeline.base)) == 1
    assert error_message(capsys.readouterr().err) == (
        f"{run.params}: each process's share of a batch, train.batch_size / train.processes = 4, "
        "is not a multiple of train.gradient_accumulation_steps 3 (it runs in that many equal "
        "micro-batches)")
    assert not run.adapter.exists()
