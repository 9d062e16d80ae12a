"""Steady-state speed: a stage's warm-up (loading, compiling, the first steps) kept apart from
the rate of the steps after it.

A stage that compiles spends its first minute or two compiling; counted as training time, that
makes a fast run look slow (docs/operations.md#speed-figures). `Throughput` counts units of work
(train's optimizer steps, evaluate's batches) and, after the first `warmup` of them, notes the
time once (the device synchronized there, and only there): `warmup_s` is the wall time from the
stage's start to then, and `samples_per_s` (`tokens_per_s`) covers what ran after it, less any
paused time (train's validation and checkpoints).

`first_step_s` is how long the stage process took to finish its first unit of work, counted from
its start (stages.STARTED, before the heavy imports): what a user waits before training starts.

A run that ends within its warm-up has no steady-state figure: `samples_per_s` is None (null
in timing.json), never a rate that mixes in the compile.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

# train: the first optimizer step compiles (or, eager, sets up CUDA kernels and the allocator),
# the second sees a new padded width and recompiles with dynamic shapes; from the third on, a
# step is what the rest of the run costs.
TRAIN_WARMUP_STEPS = 3
# evaluate: the first batch compiles each layer, the second (a new width) recompiles it once.
EVAL_WARMUP_BATCHES = 2


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`, so a clock read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Warm-up time and steady-state rate of one stage run.

    `started` is the perf_counter() value at the stage's start. `earlier` carries the totals of
    an earlier, interrupted run of the same work (train's checkpoint): a resumed run warms up
    again, and both warm-ups and both steady stretches count.
    """

    def __init__(self, device: torch.device, warmup: int, started: float,
                 earlier: Mapping[str, Any] | None = None):
        self.device, self.warmup, self.started = device, warmup, started
        earlier = earlier or {}
        self.earlier_warmup_s = float(earlier.get("warmup_s", 0.0))
        self.earlier_steady_s = float(earlier.get("steady_s", 0.0))
        self.units = 0  # done in this run
        self.steady_units = int(earlier.get("steady_units", 0))
        self.samples = int(earlier.get("samples", 0))  # after warm-up
        self.tokens = int(earlier.get("tokens", 0))
        self.warm_at: float | None = None
        self.first_at: float | None = None  # the first unit's end (device synchronized)
        self.paused_s = 0.0  # since warm_at

    @property
    def warm(self) -> bool:
        return self.warm_at is not None

    def done(self, samples: int, tokens: int = 0) -> None:
        """One unit of work queued: its samples and tokens count if it came after warm-up."""
        self.units += 1
        if self.units == 1:
            synchronize(self.device)
            self.first_at = time.perf_counter()
        if self.warm:
            self.steady_units += 1
            self.samples += samples
            self.tokens += tokens
        elif self.units >= self.warmup:
            synchronize(self.device)
            self.warm_at = time.perf_counter()

    def first_unit_s(self, process_started: float) -> float | None:
        """Seconds from the process's start to the end of this run's first unit of work."""
        return None if self.first_at is None else round(self.first_at - process_started, 2)

    def pause(self, seconds: float) -> None:
        """Time spent on something else (validation, a checkpoint): not steady-state time."""
        if self.warm:
            self.paused_s += seconds

    def totals(self, now: float | None = None) -> dict[str, Any]:
        """Everything so far, as plain numbers (what train's checkpoint keeps). The caller
        synchronizes the device before reading `now` if queued work must count."""
        now = time.perf_counter() if now is None else now
        if self.warm:
            warmup_s = self.warm_at - self.started
            steady_s = now - self.warm_at - self.paused_s
        else:  # all of this run so far was warm-up
            warmup_s, steady_s = now - self.started, 0.0
        return {"warmup_s": self.earlier_warmup_s + warmup_s, "steady_s": self.earlier_steady_s + steady_s,
                "steady_units": self.steady_units, "samples": self.samples, "tokens": self.tokens}

    def report(self, with_tokens: bool, now: float | None = None) -> dict[str, Any]:
        """The timing.json fields: warmup_s, samples_per_s (and tokens_per_s), steady_steps or
        None rates when nothing ran after warm-up."""
        t = self.totals(now)
        steady = t["steady_s"] > 0 and t["samples"] > 0
        out: dict[str, Any] = {"warmup_s": round(t["warmup_s"], 2),
                               "samples_per_s": round(t["samples"] / t["steady_s"], 2) if steady else None}
        if with_tokens:
            out["tokens_per_s"] = round(t["tokens"] / t["steady_s"], 1) if steady else None
        return out


def describe(report: Mapping[str, Any]) -> str:
    """For a log line: `warm-up 12.3 s, then 4,401.2 samples/s` (and tokens/s), and when
    the first step (batch) ended, counted from the process's start."""
    first = next((report[k] for k in ("first_step_s", "first_batch_s") if report.get(k) is not None), None)
    started = f"first {'step' if 'first_step_s' in report else 'batch'} done {first:.1f} s after the process started; " \
        if first is not None else ""
    if report["samples_per_s"] is None:
        return f"{started}warm-up {report['warmup_s']:.1f} s, no steps after it for a steady-state rate"
    rate = f"{report['samples_per_s']:,.1f} samples/s"
    if report.get("tokens_per_s") is not None:
        rate += f", {report['tokens_per_s']:,.0f} tokens/s"
    return f"{started}warm-up {report['warmup_s']:.1f} s, then {rate}"
