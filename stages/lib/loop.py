"""The training loop, written out: batches, micro-batches, clipping, optimizer and scheduler
steps, validation, the best weights, and checkpoints that a killed run resumes from.

`TrainingLoop(...).run()` calls the named steps in order: `setup` (step counts, optimizer,
scheduler, batches), `resume` (a checkpoint of this run, if any), then per epoch `step` for each
batch, `validate` at the epoch's end (and every train.eval_every_steps steps), `save_checkpoint`
every train.checkpoint_every_steps steps. It returns the summary metrics, with the best weights
loaded into the model.

A resumed run carries on with the same batches, dropout masks and optimizer moments, so it ends
where an uninterrupted run would have. With several processes, every worker draws the same
global batches and trains on its shard of each; DDP averages the gradients, so the update is that
of the global batch. With train.gradient_accumulation_steps > 1 a shard runs in that many
micro-batches whose gradients add up before the one optimizer step: again the global batch's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from stages import STARTED
from stages.lib.batches import TokenBlocks, length_grouped_batches
from stages.lib.checkpoint import Checkpoint, rng_states, set_rng_states
from stages.lib.compiling import (TRAIN_COMPILE_S, TRAIN_SAVED_S, decide_compile,
                                  parameter_total, use_compile_cache)
from stages.lib.distributed import Processes, SharedCheckpoint
from stages.lib.optimizers import build_optimizer
from stages.lib.params import Train
from stages.lib.quantized import autocast, compile_for_training
from stages.lib.tasks import Objective, format_scores
from stages.lib.throughput import TRAIN_WARMUP_STEPS, Throughput, synchronize
from stages.lib.tokenized import Splits

log = logging.getLogger("qlora")

# What a checkpoint holds besides Progress: the trainable weights by name, the best weights so
# far under BEST_PREFIX, and these states.
BEST_PREFIX = "best."
OPTIMIZER_STATE = "optimizer"
SCHEDULER_STATE = "scheduler"
RNG_STATES = "rng"  # one per worker, by rank: each draws its own dropout masks
EPOCH_START = "epoch_start"  # the batch generator's state when the epoch began


class Live(Protocol):
    """What the loop needs of a dvclive.Live."""

    step: int

    def log_metric(self, name: str, value: float) -> None: ...


class NullLive:
    """Stands in for dvclive.Live where nothing is logged (other workers, benchmarks)."""

    step = 0

    def log_metric(self, name: str, value: float) -> None:
        pass


@dataclass
class Progress:
    """The loop's counters: saved as JSON in every checkpoint, restored on resume."""

    epoch: int = 0
    step: int = 0
    seen: int = 0  # training examples so far
    window: list[float] = field(default_factory=list)  # losses since the last logged one
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's logged losses
    epoch_loss_sum: float = 0.0  # this epoch's step losses, summed (mean over workers)
    epoch_steps: int = 0  # and how many steps they are
    history: list[list[Any]] = field(default_factory=list)  # [step, name, value] of every metric
    best: dict[str, float] = field(default_factory=dict)  # best validation scores and their step
    train_time_s: float = 0.0  # up to the last checkpoint
    throughput: dict[str, Any] = field(default_factory=dict)  # Throughput.totals at the last checkpoint

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Progress:
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


class TrainingLoop:
    """Train `model` (LoRA-wrapped, its trainable weights those with requires_grad) on
    data["train"], validating on data["validation"] with `objective`'s scores."""

    def __init__(self, model: torch.nn.Module, data: Splits, pad_id: int, min_width: int, cfg: Train,
                 objective: Objective, live: Live, device: torch.device, dtype: torch.dtype,
                 checkpoint: Checkpoint | SharedCheckpoint | None, processes: Processes,
                 started: float | None = None):
        self.model, self.data, self.pad_id, self.min_width = model, data, pad_id, min_width
        self.cfg, self.objective, self.live = cfg, objective, live
        self.device, self.dtype = device, dtype
        self.checkpoint, self.processes = checkpoint, processes
        self.progress = Progress()
        self.best_state: dict[str, torch.Tensor] = {}
        self.window: list[torch.Tensor] = []
        self.paused = 0.0  # seconds validating and checkpointing since `start`: not training time
        self.start = 0.0
        # the stage's start (train.py passes it: loading the base counts as warm-up)
        self.started = time.perf_counter() if started is None else started
        self.epoch_loss = torch.zeros((), device=device)  # this epoch's step losses, summed on the device

    def setup(self) -> None:
        """Step counts, the compiled and DDP-wrapped forward, optimizer, scheduler, batch
        generator and the splits as token stores on the device."""
        cfg, processes, device = self.cfg, self.processes, self.device
        (train_x, train_y), (val_x, self.val_y) = self.data["train"], self.data["validation"]
        # a last batch smaller than the number of workers would leave one with nothing: dropped
        full, last = divmod(len(train_x), cfg.batch_size)
        self.steps_per_epoch = full + (last >= processes.count)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        log.info("train: %d examples, batch %d (%d micro-batches per process), %d steps/epoch, "
                 "%d steps in all, %d warm-up", len(train_x), cfg.batch_size, cfg.gradient_accumulation_steps,
                 self.steps_per_epoch, self.total_steps, warmup)
        self.train_tokens = self.objective.examples(train_x, train_y, self.pad_id, device, self.min_width)
        tokens = round(self.total_steps * cfg.batch_size * float(np.mean(self.train_tokens.lengths)))
        decision = decide_compile("train.compile", cfg.compile, device, tokens, parameter_total(self.model),
                                  TRAIN_COMPILE_S, TRAIN_SAVED_S)
        log.info(decision.reason)
        if decision.compile:
            use_compile_cache()  # before the first compile: graphs from earlier runs are reused
        # torch.compile fuses the many small element-wise kernels around each matmul (GPU): an
        # encoder as one graph (per-layer regions cost host time per call, docs/performance.md),
        # a decoder per layer (lib/quantized.compile_for_training). DDP goes around the compiled
        # model, so no DDP hooks are inside it. A causal LM's loss is the chunked one.
        model = compile_for_training(self.model, self.objective.type) if decision.compile else self.model
        # token blocks all have one width: a short last batch is filled up to the usual micro-batch
        # (rows without labels) rather than recompiling every compiled layer for its shape
        micro_rows = cfg.batch_size // processes.count // cfg.gradient_accumulation_steps
        fill = decision.compile and isinstance(self.train_tokens, TokenBlocks)
        self.micro_batch = functools.partial(self.train_tokens.batch, rows=micro_rows) if fill else self.train_tokens.batch
        self.forward = processes.wrap(self.objective.loss_module(model))
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = build_optimizer(cfg.optimizer, self.trainable.values(), lr=cfg.lr,
                                         weight_decay=cfg.weight_decay)
        # imported here, not at the top: transformers' import brings in bitsandbytes, which
        # initialises CUDA, and train must claim its GPU first (lib.devices)
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.val_tokens = self.objective.examples(val_x, self.val_y, self.pad_id, device, self.min_width,
                                                  scoring=True)
        # no backward pass: bigger batches fit, except where logits span a vocabulary
        self.eval_batch = cfg.batch_size * (4 if self.objective.type == "classification" else 1)

    def resume(self) -> bool:
        """Restore the state of a checkpoint of this run, if there is one."""
        resumed = self.checkpoint.load(self.device) if self.checkpoint else None
        if resumed:
            tensors, states, progress = resumed
            self.progress = Progress.from_json(progress)
            with torch.no_grad():
                for name, param in self.trainable.items():
                    param.copy_(tensors[name])
            self.best_state = {n[len(BEST_PREFIX):]: t for n, t in tensors.items() if n.startswith(BEST_PREFIX)}
            self.optimizer.load_state_dict(states[OPTIMIZER_STATE])
            self.scheduler.load_state_dict(states[SCHEDULER_STATE])
            set_rng_states(states[RNG_STATES][self.processes.rank])
            self.generator.set_state(states[EPOCH_START])
            for step, name, value in self.progress.history:  # DVCLive's curves start over in a new dir
                self.live.step = step
                self.live.log_metric(name, value)
            log.info("resuming from checkpoint %s at step %d of %d (epoch %d)", self.checkpoint.directory,
                     self.progress.step, self.total_steps, self.progress.epoch + 1)
        self.window = [torch.tensor(v, device=self.device) for v in self.progress.window]
        self.epoch_loss = torch.tensor(self.progress.epoch_loss_sum, device=self.device)
        return bool(resumed)

    def log_metric(self, name: str, value: float) -> None:
        self.live.step = self.progress.step
        self.live.log_metric(name, value)
        self.progress.history.append([self.progress.step, name, value])

    def step(self, batch: list[int]) -> None:
        """One optimizer step on a global batch: this worker's share in micro-batches, strided
        like the shards (each spans the batch's lengths); DDP averages the gradients once, after
        the last micro-batch."""
        accumulation = self.cfg.gradient_accumulation_steps
        shard = self.processes.shard(batch)
        micro_batches = [m for m in (shard[i::accumulation] for i in range(accumulation)) if m]
        loss = torch.zeros((), device=self.device)
        for i, rows in enumerate(micro_batches):
            with self.processes.no_sync(self.forward, i < len(micro_batches) - 1):
                with autocast(self.device, self.dtype):
                    micro_loss = self.forward(**self.micro_batch(rows)).loss / len(micro_batches)
                micro_loss.backward()
            loss += micro_loss.detach()
        self.epoch_loss += loss
        self.progress.epoch_steps += 1
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable.values(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window.append(loss.detach())
        self.progress.step += 1
        self.progress.seen += len(batch)

    def log_loss(self) -> float:
        """The mean loss since the last call, over workers, logged. The .item() is a sync point,
        so this runs only every few steps."""
        mean_loss = self.processes.mean(torch.stack(self.window).float().mean()).item()
        self.progress.epoch_losses.append(mean_loss)
        self.window = []
        self.log_metric("train/loss", mean_loss)
        self.log_metric("train/lr", self.scheduler.get_last_lr()[0])
        return mean_loss

    def validate(self) -> None:
        """Score the validation split; keep a copy of the weights when they are the best yet."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # queued training steps belong to training time
        begin = time.perf_counter()
        self.model.eval()
        scores = self.objective.scores(self.model, self.val_tokens, self.val_y, self.eval_batch,
                                       self.device, self.dtype, desc="validate")
        self.model.train()
        self.pause(time.perf_counter() - begin)  # scoring syncs: it ends with a copy to the host
        for name, value in scores.items():
            self.log_metric(f"val/{name}", value)
        log.info("step %d: validation %s", self.progress.step, format_scores(scores))
        if self.objective.better(scores, self.progress.best):
            self.progress.best = {**scores, "step": self.progress.step}
            self.best_state.update({n: p.detach().clone() for n, p in self.trainable.items()})

    def pause(self, seconds: float) -> None:
        """Seconds spent validating or checkpointing: neither training time nor steady-state."""
        self.paused += seconds
        self.throughput.pause(seconds)

    def save_checkpoint(self) -> None:
        """Save the whole state (every worker's RNG; the main process writes)."""
        synchronize(self.device)  # queued training steps belong to training time
        begin = time.perf_counter()
        self.progress.window = [w.item() for w in self.window]
        # the workers' mean: each resumes from it, and the epoch's mean over workers stays exact
        self.progress.epoch_loss_sum = self.processes.mean(self.epoch_loss).item()
        self.progress.train_time_s = self.progress.train_time_s + begin - self.start - self.paused
        self.progress.throughput = self.throughput.totals(begin)
        self.start, self.paused = begin, 0.0  # the training time so far is in progress now
        rng = self.processes.gather(rng_states())
        if self.processes.is_main:
            tensors = {**self.trainable, **{f"{BEST_PREFIX}{n}": t for n, t in self.best_state.items()}}
            states = {OPTIMIZER_STATE: self.optimizer.state_dict(), SCHEDULER_STATE: self.scheduler.state_dict(),
                      RNG_STATES: rng, EPOCH_START: self.epoch_start}
            self.checkpoint.save(tensors, states, dataclasses.asdict(self.progress))
        self.pause(time.perf_counter() - begin)

    def run_epoch(self, epoch: int) -> None:
        cfg, progress = self.cfg, self.progress
        self.epoch_start = self.generator.get_state()  # a resumed run rebuilds this epoch's batches from it
        batches = [b for b in length_grouped_batches(self.train_tokens.lengths, cfg.batch_size,
                                                     self.generator, cfg.group_by_length)
                   if len(b) >= self.processes.count]
        done = progress.step - epoch * self.steps_per_epoch  # > 0 only when resuming mid-epoch
        if done == 0:
            progress.epoch_losses, progress.epoch_steps = [], 0
            self.epoch_loss = torch.zeros((), device=self.device)
        progress.epoch = epoch
        todo = batches[done:][:self.total_steps - progress.step]
        bar = tqdm(todo, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=None if self.processes.is_main else True, initial=done, total=done + len(todo))
        for batch in bar:
            self.step(batch)
            self.throughput.done(len(batch), sum(self.train_tokens.lengths[i] for i in batch))
            step = progress.step
            if step % cfg.log_every_steps == 0 or step == self.total_steps:
                bar.set_description(f"epoch {epoch + 1}/{cfg.epochs} loss {self.log_loss():.3f}")
            if (cfg.eval_every_steps and step % cfg.eval_every_steps == 0
                    and step % self.steps_per_epoch and step < self.total_steps):  # else the epoch's end does
                self.validate()
            if self.checkpoint and cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                self.save_checkpoint()
        # the mean over this epoch's own steps, whatever train.log_every_steps is (a collective)
        mean_loss = self.processes.mean(self.epoch_loss / max(progress.epoch_steps, 1)).item()
        log.info("epoch %d/%d: %d steps, mean train loss %.4f", epoch + 1, cfg.epochs,
                 progress.step, mean_loss)
        self.validate()

    def run(self) -> dict[str, Any]:
        """Train to the end; the summary metrics. The best weights end up in the model."""
        self.setup()
        self.resume()
        self.throughput = Throughput(self.device, TRAIN_WARMUP_STEPS, self.started, self.progress.throughput)
        self.start = time.perf_counter()
        self.model.train()
        for epoch in range(self.progress.epoch, self.cfg.epochs):
            self.run_epoch(epoch)
            if self.progress.step >= self.total_steps:
                break
        now = time.perf_counter()  # the last validation synchronized the device
        train_time = self.progress.train_time_s + now - self.start - self.paused
        speed = self.throughput.report(with_tokens=self.objective.type != "classification", now=now)
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(self.best_state[name])
        progress, best = self.progress, self.progress.best
        return {"train_loss": progress.epoch_losses[-1] if progress.epoch_losses else float("nan"),
                **{f"best_val_{name}": value for name, value in best.items() if name != "step"},
                "best_step": best["step"], "steps": progress.step, "train_samples": progress.seen,
                "train_time_s": round(train_time, 2), **speed,
                "first_step_s": self.throughput.first_unit_s(STARTED)}
