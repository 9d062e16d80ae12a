"""Training on several processes (one per GPU), on one host or several, through accelerate's DDP.

`launch` starts the worker processes with torch's elastic launcher (what `torchrun` runs), so
`python -m stages.train` stays the one command for the CPU, one GPU, N GPUs and N hosts:
train.processes decides the processes per host. Inside each worker, `Processes` wraps an
accelerate `Accelerator`; with one process every collective below is a no-op and the code path is
the same.

How many hosts there are, which one this is and where they meet are facts of the cluster, not
hyperparameters, so they come from the environment, under torchrun's own names (`--nnodes`,
`--node-rank` and `--rdzv-endpoint` read PET_NNODES, PET_NODE_RANK and PET_RDZV_ENDPOINT): see
`Nodes` and docs/multi-node.md.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from stages.lib.params import UserError

if TYPE_CHECKING:
    from stages.lib.checkpoint import Checkpoint

log = logging.getLogger("qlora")

WORKER_ENV = "LOCAL_RANK"  # set by the launcher in every worker it starts
# torchrun's names for these facts (torch.distributed.run reads --nnodes from PET_NNODES, etc.)
NODES_ENV, NODE_RANK_ENV, ENDPOINT_ENV, RUN_ID_ENV = ("PET_NNODES", "PET_NODE_RANK",
                                                      "PET_RDZV_ENDPOINT", "PET_RDZV_ID")
RENDEZVOUS_TIMEOUT_S = 900  # how long node 0 waits for the others (and they for it) at the start


@dataclass(frozen=True)
class Nodes:
    """The hosts of one training run: how many, which one this is, where they meet.

    `endpoint` is host:port of node 0, which serves the rendezvous; node 0's worker 0 is global
    rank 0, the one that writes every output. One host needs none of it.
    """
    count: int
    rank: int
    endpoint: str
    run_id: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Nodes:
        """From PET_NNODES (default 1), PET_NODE_RANK (default 0), PET_RDZV_ENDPOINT (required
        with several nodes) and PET_RDZV_ID (default "qlora"); a bad value is a UserError."""
        env = os.environ if env is None else env
        count = _whole_number(env, NODES_ENV, "1", "a whole number of nodes >= 1 (an elastic "
                              "range such as 1:4 is not supported)")
        if count < 1:
            raise UserError(f"environment: {NODES_ENV}: expected a whole number of nodes >= 1, "
                            f"got {count}")
        rank = _whole_number(env, NODE_RANK_ENV, "0", f"this node's rank, 0 to {count - 1}")
        if not 0 <= rank < count:
            raise UserError(f"environment: {NODE_RANK_ENV}: expected this node's rank, 0 to "
                            f"{count - 1} ({NODES_ENV} is {count}), got {rank}")
        endpoint = env.get(ENDPOINT_ENV, "").strip()
        if count > 1:
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UserError(f"environment: {ENDPOINT_ENV}: expected host:port of node 0, where "
                                f"the {count} nodes ({NODES_ENV}) meet, got {endpoint or 'nothing'!r}")
        return cls(count, rank, endpoint, env.get(RUN_ID_ENV, "").strip() or "qlora")

    def check_split(self, params_file: str, batch_size: int, processes: int, accumulation: int) -> None:
        """Every worker of every node takes an equal share of each batch (train.batch_size is
        the global batch), and runs it in `accumulation` equal micro-batches."""
        workers = processes * self.count
        if self.count == 1:
            named, divisor = f"train.processes {processes}", "train.processes"
        else:
            named = f"train.processes {processes} x {self.count} nodes ({NODES_ENV}) = {workers}"
            divisor = f"(train.processes x {NODES_ENV})"
        if batch_size % workers:
            raise UserError(f"{params_file}: train.batch_size {batch_size} is not a multiple of {named} "
                            "(each process takes an equal share of every batch)")
        if (batch_size // workers) % accumulation:
            raise UserError(f"{params_file}: each process's share of a batch, train.batch_size / {divisor} "
                            f"= {batch_size // workers}, is not a multiple of "
                            f"train.gradient_accumulation_steps {accumulation} (it runs in that many "
                            "equal micro-batches)")


def _whole_number(env: Mapping[str, str], name: str, default: str, expected: str) -> int:
    value = env.get(name, "").strip() or default
    if not value.isdigit():
        raise UserError(f"environment: {name}: expected {expected}, got {value!r}")
    return int(value)


def launch(module: str, argv: Sequence[str], processes: int, nodes: Nodes | None = None) -> int:
    """Run `python -m <module> <argv>` in `processes` workers on this host, as node `nodes.rank`
    of `nodes.count`; their exit status.

    A worker prints its own `error:` line (or traceback) before it exits, so a failure adds
    nothing here but the status.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nodes = nodes or Nodes(1, 0, "", "")
    if nodes.count == 1:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # a free port
                              max_restarts=0, monitor_interval=0.5)
        log.info("launching %d worker processes", processes)
    else:
        # The static rendezvous ranks the nodes by PET_NODE_RANK (c10d's would rank them by
        # arrival), so global rank 0, the writer, is on the node the user chose: the one that
        # runs `dvc repro`. Node 0 serves the store at the endpoint; the workers reuse it.
        config = LaunchConfig(min_nodes=nodes.count, max_nodes=nodes.count, nproc_per_node=processes,
                              run_id=nodes.run_id, rdzv_backend="static", rdzv_endpoint=nodes.endpoint,
                              rdzv_configs={"rank": nodes.rank, "timeout": RENDEZVOUS_TIMEOUT_S},
                              max_restarts=0, monitor_interval=0.5)
        log.info("launching %d worker processes on node %d of %d (rendezvous at %s)", processes,
                 nodes.rank, nodes.count, nodes.endpoint)
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
        weights (LoRA, head) are averaged across them after each backward pass.

        The frozen base is left out of DDP: every worker loads the same base itself, so DDP need
        not broadcast it from the main worker when it starts (an 8B base in 4 bits is 5.7 GB,
        and its 4-bit weights are bitsandbytes tensors with their quantization state beside them).
        The trainable weights are still broadcast, so all workers start from the main one's."""
        if self.count == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
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

    def close(self) -> None:
        """The last call of a worker that succeeded: wait for every worker, then end the process
        group. A worker that exits with the group still open can abort on its way out (gloo's
        threads call std::terminate), and the launcher then counts it failed and the other nodes
        wait at torch's exit barrier for one that never comes."""
        self.wait()
        if self.count > 1:
            self.accelerator.end_training()

    def share(self, checkpoint: Checkpoint) -> Checkpoint | SharedCheckpoint:
        """`checkpoint` as every worker must see it: the main worker's copy. Only the main
        worker writes checkpoints, so on another host there is none (or an old one).

        A collective. Its stamp (params, data, base model, code) must be the same on every
        worker: a host with another params.yaml would train another model, or hang."""
        if self.count == 1:
            return checkpoint
        stamps = self.gather(checkpoint.stamp)
        differ = [str(rank) for rank, stamp in enumerate(stamps) if stamp != stamps[0]]
        if differ:
            raise UserError(f"train: worker(s) {', '.join(differ)} of {self.count} have other params, "
                            "data, base model or code than worker 0 (every node needs the same "
                            "params.yaml, --data, --base and stages/)")
        return SharedCheckpoint(checkpoint, self)


class SharedCheckpoint:
    """A Checkpoint that the main worker alone reads and writes; `load` hands every worker the
    main worker's result, so all resume from the same step (or all start over)."""

    def __init__(self, checkpoint: Checkpoint, processes: Processes) -> None:
        self.checkpoint, self.processes = checkpoint, processes
        self.directory = checkpoint.directory

    def load(self, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] | None:
        """A collective: every worker must call it."""
        from accelerate.utils import broadcast_object_list

        # read to the CPU: pickled CUDA tensors would land on the sender's device number
        found = [self.checkpoint.load(torch.device("cpu")) if self.processes.is_main else None]
        found = broadcast_object_list(found, from_process=0)[0]
        if found is None:
            return None
        tensors, states, progress = found
        return {n: t.to(device) for n, t in tensors.items()}, states, progress

    def save(self, tensors: Mapping[str, torch.Tensor], states: Mapping[str, Any],
             progress: Mapping[str, Any]) -> None:
        self.checkpoint.save(tensors, states, progress)

    def remove(self) -> None:
        self.checkpoint.remove()
