"""Kill train with SIGKILL mid-epoch, rerun it: it resumes from its checkpoint and ends exactly
where an uninterrupted run ends (on the CPU: identical metrics, curves and adapter tensors)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import ROOT, Pipeline, leftovers, run_stage

# 48 training rows at batch 8: 6 steps an epoch, 24 in all; a checkpoint every 2 steps.
RESUMABLE = {"train.epochs": 4, "train.max_steps": 0, "train.eval_every_steps": 4,
             "train.checkpoint_every_steps": 2, "train.log_every_steps": 1}
# Slows each optimizer step, so the parent sees the run mid-epoch before it ends.
SLOW_TRAIN = """
import runpy, sys, time, torch
step = torch.optim.AdamW.step
def slow_step(self, *args, **kwargs):
    time.sleep(0.1)
    return step(self, *args, **kwargs)
torch.optim.AdamW.step = slow_step
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("stages.train", run_name="__main__")
"""


def train_argv(run: Pipeline, pipeline: Pipeline) -> list[str]:
    """train's argv for `run`, reading the session pipeline's tokenized data and base model."""
    argv = run.argv("train")
    argv[argv.index("--data") + 1] = str(pipeline.tokenized)
    argv[argv.index("--base") + 1] = str(pipeline.base)
    return argv


def checkpoint_step(run: Pipeline) -> int:
    try:
        return json.loads((run.checkpoints / "progress.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def kill_mid_run(run: Pipeline, pipeline: Pipeline, after_step: int) -> int:
    """Start train in a subprocess, SIGKILL it once a checkpoint at >= after_step exists; return
    the checkpoint's step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *train_argv(run, pipeline)],
                             cwd=run.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while checkpoint_step(run) < after_step:
        if child.poll() is not None:
            pytest.fail(f"train ended before it could be killed:\n{child.stderr.read().decode()}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("no checkpoint within 120 s")
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return checkpoint_step(run)


def trained(run: Pipeline) -> dict:
    """What a finished train run produced that must not depend on a kill in between."""
    from safetensors.torch import load_file

    plots = run.metrics / "train" / "plots" / "metrics"
    curves = {str(f.relative_to(plots)): pd.read_csv(f, sep="\t").to_dict("list")
              for f in sorted(plots.rglob("*.tsv"))}
    return {"metrics": json.loads((run.metrics / "train" / "metrics.json").read_text()),
            "curves": curves,
            "tensors": load_file(str(run.adapter / "adapter_model.safetensors"))}


def assert_same(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    assert a["curves"] == b["curves"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        assert torch.equal(a["tensors"][key], b["tensors"][key]), key


@pytest.fixture(scope="module")
def uninterrupted(pipeline: Pipeline, tmp_path_factory, write_params) -> dict:
    run = Pipeline(tmp_path_factory.mktemp("uninterrupted"))
    write_params(run.params, RESUMABLE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.root)
        assert run_stage("train", train_argv(run, pipeline)) == 0
    assert not run.checkpoints.exists(), "a finished run keeps no checkpoint"
    return trained(run)


@pytest.fixture(scope="module")
def killed(pipeline: Pipeline, tmp_path_factory, write_params) -> tuple[Path, int]:
    """A copy of the checkpoint that a train run killed mid-epoch left, and its step."""
    run = Pipeline(tmp_path_factory.mktemp("killed"))
    write_params(run.params, RESUMABLE)
    step = kill_mid_run(run, pipeline, after_step=8)
    assert 8 <= step < 24 and step % 6 != 0, f"checkpoint at step {step} is not mid-epoch"
    # killed mid-run: no adapter or metrics, half-written or otherwise
    assert not run.adapter.exists() and not (run.metrics / "train").exists()
    copy = run.root / "checkpoint-copy"
    shutil.copytree(run.checkpoints, copy)
    return copy, step


def rerun(run: Pipeline, pipeline: Pipeline, checkpoint: Path, write_params, overrides: dict,
          capsys) -> str:
    """Run train in `run` with `checkpoint` in place, in-process; return its log."""
    write_params(run.params, {**RESUMABLE, **overrides})
    shutil.copytree(checkpoint, run.checkpoints)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.root)
        assert run_stage("train", train_argv(run, pipeline)) == 0
    assert not run.checkpoints.exists(), "a finished run removes its checkpoint"
    assert leftovers(run.root / "models") == leftovers(run.metrics) == []
    return capsys.readouterr().err


def copy_and_run_dir(checkpoint: Path, tmp_path: Path) -> tuple[Path, Pipeline]:
    """A copy of `checkpoint` to tamper with, and an empty run directory."""
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    run = Pipeline(tmp_path / "run")
    run.root.mkdir()
    return copy, run


def test_killed_train_resumes_and_matches_an_uninterrupted_run(
        pipeline: Pipeline, uninterrupted: dict, killed: tuple[Path, int], tmp_path: Path,
        write_params, capsys) -> None:
    checkpoint, step = killed
    run = Pipeline(tmp_path)
    log = rerun(run, pipeline, checkpoint, write_params, {}, capsys)
    assert f"resuming from checkpoint {run.checkpoints} at step {step} of 24" in log
    assert "starting over" not in log
    assert_same(trained(run), uninterrupted)


def test_checkpoint_of_other_params_is_not_reused(pipeline: Pipeline, killed: tuple[Path, int],
                                                  tmp_path: Path, write_params, capsys) -> None:
    """Resumed under another lr, the run starts over, and ends as a fresh run of that lr does."""
    fresh = Pipeline(tmp_path / "fresh")
    fresh.root.mkdir()
    write_params(fresh.params, {**RESUMABLE, "train.lr": 0.05})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(fresh.root)
        assert run_stage("train", train_argv(fresh, pipeline)) == 0
    capsys.readouterr()
    run = Pipeline(tmp_path / "resumed")
    run.root.mkdir()
    log = rerun(run, pipeline, killed[0], write_params, {"train.lr": 0.05}, capsys)
    assert "was made with other params, data or base model: starting over" in log
    assert "resuming" not in log
    assert_same(trained(run), trained(fresh))


@pytest.mark.parametrize("damaged", ["weights.safetensors", "states.pt", "progress.json"])
def test_damaged_checkpoint_means_starting_over(pipeline: Pipeline, uninterrupted: dict,
                                                killed: tuple[Path, int], tmp_path: Path,
                                                write_params, capsys, damaged: str) -> None:
    checkpoint, run = copy_and_run_dir(killed[0], tmp_path)
    path = checkpoint / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    log = rerun(run, pipeline, checkpoint, write_params, {}, capsys)
    assert f"checkpoint {run.checkpoints} is unreadable" in log
    assert "resuming" not in log
    assert_same(trained(run), uninterrupted)


def test_pickle_payload_in_checkpoint_is_not_executed(pipeline: Pipeline, killed: tuple[Path, int],
                                                      tmp_path: Path, write_params, capsys) -> None:
    """states.pt is loaded with weights_only=True: a pickle that would run code is refused."""
    checkpoint, run = copy_and_run_dir(killed[0], tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (shutil.copyfile, (str(checkpoint / "progress.json"), str(marker)))

    torch.save({"optimizer": Payload()}, checkpoint / "states.pt")
    log = rerun(run, pipeline, checkpoint, write_params, {}, capsys)
    assert not marker.exists()
    assert f"checkpoint {run.checkpoints} is unreadable" in log
