"""Two "nodes" on one machine: two launchers (`python -m stages.train` with PET_NNODES=2 and
their own PET_NODE_RANK), each with its own working directory and one worker, meeting over
gloo on the loopback. They do the arithmetic of one process with the same global batch, and only
node 0's worker (global rank 0) writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, Pipeline, error_message, leftovers, run_stage
from stages.lib.distributed import Nodes
from stages.lib.params import UserError
from test_distributed import NO_DROPOUT, base_without_dropout, train_run  # noqa: F401 (a fixture)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(nodes: list[Pipeline], pipeline: Pipeline, base: Path) -> tuple[str, tuple[list[int], list[str]]]:
    """Train as len(nodes) nodes of one run, node i in nodes[i].root; (endpoint, (exit status, stderr) by node)."""
    endpoint = f"127.0.0.1:{free_loopback_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PET_NNODES": str(len(nodes)), "PET_RDZV_ENDPOINT": endpoint}
    launchers = [subprocess.Popen([sys.executable, "-m", "stages.train", *train_run(run, pipeline, base)],
                                  cwd=run.root, env={**env, "PET_NODE_RANK": str(rank)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for rank, run in enumerate(nodes)]
    errs = []
    try:
        for launcher in launchers:
            errs.append(launcher.communicate(timeout=600)[1])
    finally:
        for launcher in launchers:
            launcher.kill()
    return endpoint, ([launcher.returncode for launcher in launchers], errs)


def test_two_nodes_match_one_process(pipeline: Pipeline, base_without_dropout: Path, tmp_path: Path,
                                     write_params, monkeypatch) -> None:
    from safetensors.torch import load_file

    one = Pipeline(tmp_path / "one")
    nodes = [Pipeline(tmp_path / f"node{rank}") for rank in (0, 1)]
    for run in (one, *nodes):
        run.root.mkdir()
        write_params(run.params, {**NO_DROPOUT, "train.processes": 1})
    monkeypatch.chdir(one.root)
    assert run_stage("train", train_run(one, pipeline, base_without_dropout)) == 0

    endpoint, (status, errs) = run_nodes(nodes, pipeline, base_without_dropout)
    assert status == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert f"launching 1 worker processes on node 0 of 2 (rendezvous at {endpoint})" in errs[0]
    assert "train: best validation accuracy" in errs[0]
    assert "train: best validation accuracy" not in errs[1]  # its worker's INFO lines are silenced

    a, b = (json.loads((r.metrics / "train" / "metrics.json").read_text()) for r in (one, nodes[0]))
    assert (a.pop("processes"), b.pop("processes")) == (1, 2)
    for key in ("steps", "train_samples", "best_step", "best_val_accuracy", "trainable_params"):
        assert a[key] == b[key], key
    for key in ("train_loss", "best_val_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    ta, tb = (load_file(str(r.adapter / "adapter_model.safetensors")) for r in (one, nodes[0]))
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-3, atol=1e-4, msg=key)
    # node 1 wrote nothing: no adapter, no metrics, no checkpoint, no temporaries
    assert sorted(p.name for p in nodes[1].root.iterdir()) == ["params.yaml"]
    assert not nodes[0].checkpoints.exists() and leftovers(nodes[0].root / "models") == []


def test_nodes_with_other_params_stop_before_training(pipeline: Pipeline, tmp_path: Path,
                                                      write_params) -> None:
    """Node 1 has another train.lr: it would train another model (or, with another batch
    size, wait forever for the others); both stop with one line and write nothing."""
    nodes = [Pipeline(tmp_path / f"node{rank}") for rank in (0, 1)]
    for run, lr in zip(nodes, (1e-3, 2e-3)):
        run.root.mkdir()
        write_params(run.params, {"train.processes": 1, "train.lr": lr})
    _, (status, errs) = run_nodes(nodes, pipeline, pipeline.base)
    assert status == [1, 1], errs
    for err in errs:  # the worker's one line; the launcher's log of the exit status follows it
        assert [line for line in err.splitlines() if line.startswith("error: ")] == [
            "error: train: worker(s) 1 of 2 have other params, data, base model or code than "
            "worker 0 (every node needs the same params.yaml, --data, --base and stages/)"]
    for run in nodes:
        assert sorted(p.name for p in run.root.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("env, message", [
    ({"PET_NNODES": "1:4"}, "environment: PET_NNODES: expected a whole number of nodes >= 1 (an "
                            "elastic range such as 1:4 is not supported), got '1:4'"),
    ({"PET_NNODES": "0"}, "environment: PET_NNODES: expected a whole number of nodes >= 1, got 0"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_RDZV_ENDPOINT": "127.0.0.1:29500"},
     "environment: PET_NODE_RANK: expected this node's rank, 0 to 1 (PET_NNODES is 2), got 2"),
    ({"PET_NODE_RANK": "1"},
     "environment: PET_NODE_RANK: expected this node's rank, 0 to 0 (PET_NNODES is 1), got 1"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "-1"},
     "environment: PET_NODE_RANK: expected this node's rank, 0 to 1, got '-1'"),
    ({"PET_NNODES": "2"}, "environment: PET_RDZV_ENDPOINT: expected host:port of node 0, where the 2 "
                          "nodes (PET_NNODES) meet, got 'nothing'"),
    ({"PET_NNODES": "2", "PET_RDZV_ENDPOINT": "node0"}, "environment: PET_RDZV_ENDPOINT: expected "
     "host:port of node 0, where the 2 nodes (PET_NNODES) meet, got 'node0'"),
])
def test_bad_node_environment_is_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(UserError) as raised:
        Nodes.from_env(env)
    assert str(raised.value) == message


def test_node_environment() -> None:
    assert Nodes.from_env({}) == Nodes(1, 0, "", "qlora")
    assert Nodes.from_env({"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_RDZV_ENDPOINT": "n0:29500",
                           "PET_RDZV_ID": "job7"}) == Nodes(3, 2, "n0:29500", "job7")


def test_global_batch_must_split_over_every_node(pipeline: Pipeline, tmp_path: Path, write_params,
                                                 capsys, monkeypatch) -> None:
    run = Pipeline(tmp_path)
    write_params(run.params, {"train.processes": 1})  # batch_size 8
    monkeypatch.setenv("PET_NNODES", "3")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "127.0.0.1:29500")
    assert run_stage("train", train_run(run, pipeline, pipeline.base)) == 1
    assert error_message(capsys.readouterr().err) == (
        f"{run.params}: train.batch_size 8 is not a multiple of train.processes 1 x 3 nodes "
        "(PET_NNODES) = 3 (each process takes an equal share of every batch)")
    assert not run.adapter.exists()


# Run as a module by each node's launcher: every worker loads the checkpoint through
# Processes.share and prints what it got.
SHARED_LOAD = """
import json, os, sys
import torch
from stages.lib.checkpoint import Checkpoint
from stages.lib.distributed import WORKER_ENV, Nodes, Processes, launch

if WORKER_ENV not in os.environ:
    sys.exit(launch("shared_load", sys.argv[1:], 1, Nodes.from_env()))
processes = Processes()
found = processes.share(Checkpoint(sys.argv[1], "stamp")).load(torch.device("cpu"))
processes.close()
print(json.dumps({"rank": processes.rank, "weights": None if found is None else found[0]["w"].tolist(),
                  "step": None if found is None else found[2]["step"],
                  "group_ended": not torch.distributed.is_initialized()}))
"""


def test_every_node_resumes_from_node_0s_checkpoint(tmp_path: Path) -> None:
    """Only global rank 0 writes checkpoints, so node 1 has none (here: an old one of its own);
    resuming, both take node 0's, or they would train from different steps and weights."""
    from stages.lib.checkpoint import Checkpoint

    (tmp_path / "shared_load.py").write_text(SHARED_LOAD)
    dirs = [tmp_path / f"node{rank}" / "checkpoint" for rank in (0, 1)]
    Checkpoint(dirs[0], "stamp").save({"w": torch.tensor([1.0, 2.0])}, {"rng": []}, {"step": 6})
    Checkpoint(dirs[1], "stamp").save({"w": torch.tensor([9.0, 9.0])}, {"rng": []}, {"step": 2})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PET_NNODES": "2",
           "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_loopback_port()}"}
    launchers = [subprocess.Popen([sys.executable, "-m", "shared_load", str(directory)], cwd=tmp_path,
                                  env={**env, "PET_NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for rank, directory in enumerate(dirs)]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=300))
    finally:
        for launcher in launchers:
            launcher.kill()
    for launcher, (_, err) in zip(launchers, outputs):
        assert launcher.returncode == 0, err[-3000:]
    seen = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    # group_ended: Processes.close ended the process group, so no worker aborts in gloo's teardown
    # at exit, which made its launcher report a failure and the other wait at the exit barrier
    assert seen == [{"rank": 0, "weights": [1.0, 2.0], "step": 6, "group_ended": True},
                    {"rank": 1, "weights": [1.0, 2.0], "step": 6, "group_ended": True}]
