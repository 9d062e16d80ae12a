"""Speed the pipeline reports (warm-up apart from the steady-state rate), the per-epoch mean
train loss, and torch.compile: the `auto` rule and the compiled-graph cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import ROOT, Pipeline, run_stage
from stages.lib import throughput
from stages.lib.compiling import (CACHE_ENV, CACHE_SWITCHES, EVAL_COMPILE_S, EVAL_SAVED_S, TRAIN_COMPILE_S,
                                  TRAIN_SAVED_S, TRITON_CACHE_ENV, decide_compile, torch_default_cache_dir,
                                  use_compile_cache)
from stages.lib.io import read_json
from stages.lib.throughput import Throughput, describe

EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): (\d+) steps, mean train loss (\S+)")


def train_on(pipeline: Pipeline, run: Pipeline) -> int:
    argv = run.argv("train")
    argv[argv.index("--data") + 1], argv[argv.index("--base") + 1] = str(pipeline.tokenized), str(pipeline.base)
    return run_stage("train", argv)


# --- the loss of each epoch ------------------------------------------------------------------

def test_each_epoch_reports_the_mean_of_its_own_steps(pipeline: Pipeline, tmp_path: Path, write_params,
                                                      capsys) -> None:
    """6 steps per epoch (48 rows, batch 8), 2 epochs, a loss logged every 10 steps: the first
    epoch ends before anything is logged (it used to report nan) and the second's window holds
    the first's steps (it used to average them in). Each epoch's figure must be the mean of its
    own six step losses, read from a run that logs every step (the same training otherwise)."""
    settings = {"train.epochs": 2, "train.max_steps": 0, "train.eval_every_steps": 0}
    every_step, every_ten = Pipeline(tmp_path / "every-step"), Pipeline(tmp_path / "every-ten")
    for run, log_every in ((every_step, 1), (every_ten, 10)):
        run.root.mkdir()
        write_params(run.params, {**settings, "train.log_every_steps": log_every})
        assert train_on(pipeline, run) == 0
    reported = [(int(m[1]), int(m[3]), float(m[4])) for m in EPOCH_LINE.finditer(capsys.readouterr().err)]
    losses = pd.read_csv(every_step.metrics / "train" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    assert losses["step"].tolist() == list(range(1, 13))
    expected = [losses["loss"][:6].mean(), losses["loss"][6:].mean()]
    assert [r[:2] for r in reported] == [(1, 6), (2, 12), (1, 6), (2, 12)]  # both runs, both epochs
    for (_, _, loss), want in zip(reported, expected * 2):
        assert loss == pytest.approx(want, abs=1e-4)

    timing = read_json(every_ten.metrics / "train" / "timing.json")
    assert set(timing) == {"train_time_s", "warmup_s", "samples_per_s", "first_step_s", "peak_memory_mb"}  # no tokens: classifier
    assert timing["first_step_s"] > 0  # from the process start: in a test, pytest's
    assert timing["warmup_s"] > 0 and timing["samples_per_s"] > 0


# --- warm-up apart from the steady state -------------------------------------------------------

class Clock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_throughput_counts_only_the_steps_after_warm_up(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    speed = Throughput(torch.device("cpu"), warmup=3, started=0.0)
    clock.now = 50.0  # loading and compiling: the first three steps end at 50 s
    speed.done(8, 100)
    speed.done(8, 100)
    speed.pause(2.0)  # a validation while warming up belongs to the warm-up
    speed.done(8, 100)
    assert speed.report(with_tokens=True, now=50.0) == {"warmup_s": 50.0, "samples_per_s": None,
                                                         "tokens_per_s": None}
    for _ in range(10):
        speed.done(8, 100)
    speed.pause(1.0)  # a validation: not steady time
    report = speed.report(with_tokens=True, now=55.0)
    assert report == {"warmup_s": 50.0, "samples_per_s": round(80 / 4.0, 2), "tokens_per_s": 250.0}
    assert describe(report) == "warm-up 50.0 s, then 20.0 samples/s, 250 tokens/s"
    # the first step ended at 50 s; a process that started 4 s before the stage's clock began
    assert speed.first_unit_s(process_started=-4.0) == 54.0
    assert describe({**report, "first_step_s": 54.0}) == (
        "first step done 54.0 s after the process started; warm-up 50.0 s, then 20.0 samples/s, 250 tokens/s")

    # resumed after a kill: the new process warms up again; both stretches count
    clock.now = 100.0
    resumed = Throughput(torch.device("cpu"), warmup=3, started=90.0, earlier=speed.totals(55.0))
    for _ in range(3 + 4):
        resumed.done(8, 100)
    assert resumed.report(with_tokens=False, now=104.0) == {"warmup_s": 60.0,
                                                            "samples_per_s": round(112 / 8.0, 2)}


def test_a_run_within_its_warm_up_has_no_rate() -> None:
    speed = Throughput(torch.device("cpu"), warmup=3, started=0.0)
    assert speed.first_unit_s(process_started=0.0) is None  # nothing done yet
    speed.done(8)
    report = speed.report(with_tokens=False, now=5.0)
    assert report == {"warmup_s": 5.0, "samples_per_s": None}
    assert describe(report) == "warm-up 5.0 s, no steps after it for a steady-state rate"


# --- compile: auto -----------------------------------------------------------------------------

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing runs on them


def test_auto_never_compiles_on_the_cpu() -> None:
    decision = decide_compile("train.compile", "auto", CPU, 10**12, 10**10, TRAIN_COMPILE_S, TRAIN_SAVED_S)
    assert not decision.compile
    assert decision.reason == "train.compile: auto: not compiling on the cpu (torch.compile pays on GPUs only)"


def test_true_and_false_are_kept_as_given() -> None:
    for setting in (True, False):
        for device in (CPU, CUDA):
            decision = decide_compile("evaluate.compile", setting, device, 1, 1, EVAL_COMPILE_S, EVAL_SAVED_S)
            assert decision.compile is setting
            assert decision.reason == f"evaluate.compile: {str(setting).lower()}"


def test_auto_compiles_where_the_saving_beats_the_compile_time() -> None:
    # The shipped sample with the default recipe: 250 steps of 32 texts, MiniLM (22.7M
    # parameters), 52.9 tokens a text on average: compiling cannot pay.
    sample = decide_compile("train.compile", "auto", CUDA, 250 * 32 * 53, 22_713_728,
                            TRAIN_COMPILE_S, TRAIN_SAVED_S)
    assert not sample.compile
    assert sample.reason.startswith("train.compile: auto: not compiling: 424,000 tokens x 22.7M parameters "
                                    "would save about 0.1 s, less than the about 90 s compiling takes")
    # bert-base on 2 million texts of 53 tokens: it does.
    big = decide_compile("train.compile", "auto", CUDA, 2_000_000 * 53, 109_500_000, TRAIN_COMPILE_S, TRAIN_SAVED_S)
    assert big.compile and big.reason.startswith("train.compile: auto: compiling: ")
    # the boundary: saving = tokens x billions of parameters x SAVED_S against COMPILE_S
    tokens_at_break_even = TRAIN_COMPILE_S / (TRAIN_SAVED_S * 1.0)  # at one billion parameters
    for tokens, pays in ((int(tokens_at_break_even * 0.99), False), (int(tokens_at_break_even * 1.01), True)):
        assert decide_compile("train.compile", "auto", CUDA, tokens, 10**9, TRAIN_COMPILE_S,
                              TRAIN_SAVED_S).compile is pays


@pytest.mark.parametrize("value, accepted", [(True, True), (False, True), ("auto", True), ("yes", False),
                                             (1, False)])
def test_compile_params_take_true_false_or_auto(tmp_path: Path, write_params, value, accepted) -> None:
    from stages.lib.params import UserError, load_params

    path = write_params(tmp_path / "params.yaml", {"train.compile": value, "evaluate.compile": value})
    if accepted:
        p = load_params(path, ("train.compile", "evaluate.compile"))
        assert p["train.compile"] == value and type(p["train.compile"]) is type(value)
        return
    with pytest.raises(UserError) as e:
        load_params(path, ("train.compile",))
    expected = ("expected one of true, false, auto" if isinstance(value, str) else "expected bool or str")
    assert str(e.value).splitlines() == [f"{path}: {key}: {expected}, got {value!r}"
                                         for key in ("train.compile", "evaluate.compile")]


def test_shipped_default_is_auto(shipped_params) -> None:
    assert shipped_params["train"]["compile"] == "auto" and shipped_params["evaluate"]["compile"] == "auto"


# --- the compiled-graph cache ------------------------------------------------------------------

def test_compile_cache_goes_to_the_user_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    for switch in CACHE_SWITCHES:
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv(TRITON_CACHE_ENV, "")  # then removed: monkeypatch restores it as it was
    monkeypatch.delenv(TRITON_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    directory = use_compile_cache()
    assert directory == tmp_path / "cache" / "qlora-pipeline" / "torch-compile"
    assert os.environ[CACHE_ENV] == str(directory)
    assert all(os.environ[switch] == "1" for switch in CACHE_SWITCHES)
    # one Triton folder for every GPU index (torch's default has one per GPU under triton/)
    assert os.environ[TRITON_CACHE_ENV] == str(directory / "triton")
    assert ROOT not in directory.parents  # never inside the repository

    # importing bitsandbytes makes inductor write its default (/tmp/torchinductor_<user>) into
    # the variable: not the user's choice, so the pipeline's directory still wins
    monkeypatch.setenv(CACHE_ENV, torch_default_cache_dir())
    assert use_compile_cache() == directory and os.environ[CACHE_ENV] == str(directory)

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))  # a user's own choice stands
    monkeypatch.setenv(CACHE_SWITCHES[0], "0")
    monkeypatch.setenv(TRITON_CACHE_ENV, str(tmp_path / "triton"))
    assert use_compile_cache() == tmp_path / "mine"
    assert os.environ[CACHE_SWITCHES[0]] == "0"
    assert os.environ[TRITON_CACHE_ENV] == str(tmp_path / "triton")


def test_train_sets_the_cache_before_it_compiles(pipeline: Pipeline, tmp_path: Path, write_params,
                                                 monkeypatch) -> None:
    """train.compile: true on the CPU: when torch.compile is called, inductor's cache already
    points at the known directory (stand-in compile: the model as it is)."""
    for name in (CACHE_ENV, *CACHE_SWITCHES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    seen = []

    def record_compile(model, *args, **kwargs):
        seen.append(os.environ.get(CACHE_ENV))
        return model

    monkeypatch.setattr(torch, "compile", record_compile)
    run = Pipeline(tmp_path / "run")
    run.root.mkdir()
    write_params(run.params, {"train.compile": True, "train.max_steps": 1, "train.eval_every_steps": 0})
    assert train_on(pipeline, run) == 0
    assert seen == [str(tmp_path / "cache" / "qlora-pipeline" / "torch-compile")]


def test_evaluate_reports_warm_up_and_does_not_compile_with_auto_on_the_cpu(
        pipeline: Pipeline, tmp_path: Path, write_params, capsys) -> None:
    run = Pipeline(tmp_path / "run")
    run.root.mkdir()
    write_params(run.params, {"evaluate.compile": "auto", "evaluate.batch_size": 4})  # 6 batches of the 24 rows
    argv = run.argv("evaluate")
    for flag, path in (("--data", pipeline.tokenized), ("--base", pipeline.base), ("--adapter", pipeline.adapter)):
        argv[argv.index(flag) + 1] = str(path)
    assert run_stage("evaluate", argv) == 0
    err = capsys.readouterr().err
    assert "evaluate.compile: auto: not compiling on the cpu (torch.compile pays on GPUs only)" in err
    timing = read_json(run.metrics / "evaluate" / "timing.json")
    assert set(timing) == {"eval_time_s", "warmup_s", "samples_per_s", "first_batch_s"}
    assert timing["first_batch_s"] > 0  # from the process start: in a test, pytest's
    assert timing["warmup_s"] > 0 and timing["samples_per_s"] > 0
    assert re.search(r"evaluate: 24 test rows, .*; warm-up \d+\.\d s, then [\d,.]+ samples/s", err)
