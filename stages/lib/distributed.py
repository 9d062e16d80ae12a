"""Training on several processes (one per GPU) through accelerate's DDP.

`launch` starts the worker processes with torch's elastic launcher (what `torchrun --standalone`
runs), so `python -m stages.train` stays the one command for the CPU, one GPU and N GPUs:
train.processes decides. Inside each worker, `Processes` wraps an accelerate `Accelerator`; with
one process every collective below is a no-op and the code path is the same.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

log = logging.getLogger("qlora")

WORKER_ENV = "LOCAL_RANK"  # set by the launcher in every worker it starts


def launch(module: str, argv: Sequence[str], processes: int) -> int:
    """Run `python -m <module> <argv>` in `processes` workers on this host; their exit status.

    A worker prints its own `error:` line (or traceback) before it exits, so a failure adds
    nothing here but the status.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # a free port
                          max_restarts=0, monitor_interval=0.5)
    log.info("launching %d worker processes", processes)
    try:
        elastic_launch(config, sys.executable)("-m", module, *argv)
    except ChildFailedError:
        return 1
    return 0


class Processes:
    """This process's place among the workers (rank, count) and the few collectives the training
    loop needs. Its GPU is the current CUDA device, which accelerate sets."""

    def __init__(self) -> None:
        from accelerate import Accelerator

        # cpu=True on a machine without GPUs: several CPU workers then talk over gloo
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank, self.count = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around the model when there are several workers: gradients of the trainable
        weights (LoRA, head) are averaged across them after each backward pass."""
        if self.count == 1:
            return model
        return self.accelerator.prepare_model(model, device_placement=False)

    def shard(self, batch: Sequence[int]) -> list[int]:
        """This worker's part of a global batch. Strided, so each worker gets texts of every
        length in a length-sorted batch."""
        return list(batch[self.rank::self.count])

    def no_sync(self, module: torch.nn.Module, skip: bool) -> AbstractContextManager:
        """With `skip`, a backward pass inside this context keeps its gradients on this worker
        (accumulated for a later one) instead of averaging them across workers."""
        if self.count == 1 or not skip:
            return nullcontext()
        return self.accelerator.no_sync(module)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.count == 1 else self.accelerator.reduce(value, "mean")

    def gather(self, obj: Any) -> list[Any]:
        """`obj` from every worker, by rank (a collective: every worker must call it)."""
        if self.count == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def wait(self) -> None:
        if self.count > 1:
            self.accelerator.wait_for_everyone()
