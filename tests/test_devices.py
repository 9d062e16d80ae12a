"""train.device / evaluate.device and the GPU claims (stages/lib/devices.py), on the CPU.

The claimants are real processes on a fake count of GPUs and a temporary lock directory: what
is tested is the locking between processes (exclusive, waiting, freed on exit and on SIGKILL,
all or nothing), which needs no GPU. What CUDA itself does with CUDA_VISIBLE_DEVICES is not.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from helpers import ROOT, write_yaml
from stages.lib import devices
from stages.lib.devices import VISIBLE_ENV, lock_dir, release_claims, select_device, try_lock
from stages.lib.params import ALL_KEYS, UserError, load_params

POLL_S = 0.05  # the claimants' polling interval: short, so the tests are
WAIT_S = 1.0  # how long a claimant that should wait is watched still waiting
CLAIMANT = """
import json, logging, sys
from pathlib import Path
from stages.lib.devices import select_device
logging.basicConfig(level=logging.INFO, format="%(message)s")
directory, processes, total, poll_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
env = {}  # not this process's: a CUDA_VISIBLE_DEVICES around the test run must not count
chosen = select_device("train.device", "auto", processes, env=env, count_devices=lambda: total,
                       directory=directory, poll_s=poll_s, remind_s=0.5)
print(json.dumps({"claimed": list(chosen.claimed), "visible": env["CUDA_VISIBLE_DEVICES"]}), flush=True)
sys.stdin.read()  # holds the claim until the test closes stdin (or kills it)
"""


class Claimant:
    """A process claiming `processes` of `total` fake GPUs; it holds them until `exit()`."""

    def __init__(self, directory: Path, total: int, processes: int = 1) -> None:
        self.stderr = directory.parent / f"claimant-{time.monotonic_ns()}.err"
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CLAIMANT, str(directory), str(processes), str(total), str(POLL_S)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.pid = self.proc.pid

    def claimed(self, timeout: float = 30.0) -> list[int] | None:
        """The GPUs it claimed, once it has (checking CUDA_VISIBLE_DEVICES names them), or
        None if it has claimed none within `timeout` seconds."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        assert line, f"claimant exited: {self.log()}"
        found = json.loads(line)
        assert found["visible"] == ",".join(map(str, found["claimed"]))
        return found["claimed"]

    def log(self) -> str:
        return self.stderr.read_text()

    def exit(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def locks(tmp_path: Path) -> Path:
    return tmp_path / "gpu-locks"


@pytest.fixture
def claimants(locks: Path) -> Iterator[list[Claimant]]:
    """Start claimants with `claimants.append(Claimant(locks, total))`; all end after the test."""
    started: list[Claimant] = []
    yield started
    for claimant in started:
        if claimant.proc.poll() is None:
            claimant.proc.kill()
            claimant.proc.wait(timeout=30)


def start(claimants: list[Claimant], locks: Path, total: int, processes: int = 1) -> Claimant:
    claimant = Claimant(locks, total, processes)
    claimants.append(claimant)
    return claimant


@pytest.fixture
def held() -> Iterator[list[Any]]:
    """GPUs this test process locks by hand (try_lock); released after the test."""
    taken: list[Any] = []
    yield taken
    for lock in taken:
        lock.release()
    release_claims()


def hold(held: list[Any], locks: Path, index: int) -> None:
    locks.mkdir(parents=True, exist_ok=True)
    lock = try_lock(locks / f"gpu{index}.lock", index, "test")
    assert lock is not None, f"GPU {index} was not free"
    held.append(lock)


# --- claims between processes ----------------------------------------------------------------

def test_four_claimants_get_four_different_gpus_and_a_fifth_waits_for_one(locks: Path, claimants) -> None:
    first = [start(claimants, locks, total=4) for _ in range(4)]  # all started before any is read
    got = [c.claimed() for c in first]
    assert sorted(got) == [[0], [1], [2], [3]]

    fifth = start(claimants, locks, total=4)
    assert fifth.claimed(timeout=WAIT_S) is None, "a fifth claimant got a GPU while all four were held"
    waiting = fifth.log()
    assert "train: waiting for a free GPU of 4, taken: GPU 0: train, pid" in waiting
    for holder in first:  # the message names every holder
        assert f"pid {holder.pid} on " in waiting
    deadline = time.monotonic() + 10
    while fifth.log().count("waiting for a free GPU") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fifth.log().count("waiting for a free GPU") >= 2, "no reminder after remind_s (0.5 s)"
    assert fifth.claimed(timeout=0) is None

    first[2].exit()
    assert fifth.claimed() == got[2]


def test_a_gpu_whose_holder_is_killed_goes_to_the_next_claimant(locks: Path, claimants) -> None:
    holder = start(claimants, locks, total=1)
    assert holder.claimed() == [0]
    waiter = start(claimants, locks, total=1)
    assert waiter.claimed(timeout=WAIT_S) is None
    holder.kill()  # SIGKILL: no handler runs, the kernel drops the flock
    assert waiter.claimed() == [0]
    record = json.loads((locks / "gpu0.lock").read_text())
    assert (record["pid"], record["stage"]) == (waiter.pid, "train")  # the new holder's, for messages


def test_a_claim_of_two_gets_two_distinct_gpus(locks: Path, claimants) -> None:
    pair = start(claimants, locks, total=4, processes=2)
    assert pair.claimed() == [0, 1]
    assert start(claimants, locks, total=4, processes=2).claimed() == [2, 3]


def test_a_claim_of_two_holds_nothing_while_it_waits(locks: Path, claimants, held) -> None:
    """All or nothing: with GPU 1 of 2 taken, the pair claimant waits without keeping GPU 0
    (one that did would deadlock against a claimant holding the other half)."""
    hold(held, locks, 1)
    pair = start(claimants, locks, total=2, processes=2)
    assert pair.claimed(timeout=WAIT_S) is None
    assert "waiting for 2 free GPUs at once of 2, taken: GPU 1: test" in pair.log()
    single = start(claimants, locks, total=2)
    assert single.claimed(timeout=10) == [0]  # GPU 0 was free all along
    held.pop().release()
    assert pair.claimed(timeout=WAIT_S) is None  # GPU 1 is free, GPU 0 is not
    single.exit()
    assert pair.claimed() == [0, 1]


def test_two_claimants_each_needing_three_of_four_run_one_after_the_other(locks: Path, claimants) -> None:
    both = [start(claimants, locks, total=4, processes=3) for _ in range(2)]
    # started together, either may win: wait for whichever claims first
    ready, _, _ = select.select([c.proc.stdout for c in both], [], [], 30.0)
    assert ready, "neither claimant claimed its GPUs"
    winner = next(c for c in both if c.proc.stdout in ready)
    loser = both[1 - both.index(winner)]
    first = winner.claimed()
    assert first is not None and len(set(first)) == 3
    assert loser.claimed(timeout=WAIT_S) is None
    winner.exit()
    assert loser.claimed() == [0, 1, 2]


# --- choices that claim nothing ----------------------------------------------------------------

def no_count() -> int:
    raise AssertionError("counted the GPUs, which only a claim needs")


def test_explicit_gpu_is_used_without_a_claim(locks: Path, held, caplog) -> None:
    env: dict[str, str] = {}
    with caplog.at_level(logging.INFO, logger="qlora"):
        chosen = select_device("train.device", "cuda:1", env=env, count_devices=lambda: 4, directory=locks)
    assert (chosen.device, chosen.claimed, env) == ("cuda", (), {VISIBLE_ENV: "1"})
    assert not locks.exists(), "cuda:1 went through the lock directory"
    assert "train: on GPU 1 of 4, as train.device says (not claimed: runs on auto may use it too)" in caplog.text


def test_explicit_gpu_is_used_even_while_its_lock_is_held(locks: Path, held) -> None:
    for index in range(4):
        hold(held, locks, index)
    env: dict[str, str] = {}
    select_device("evaluate.device", "cuda:3", env=env, count_devices=lambda: 4, directory=locks)
    assert env == {VISIBLE_ENV: "3"}


@pytest.mark.parametrize("spec, preset, visible", [("auto", "2,3", "2,3"), ("cuda", "GPU-5e1f", "GPU-5e1f"),
                                                   ("cuda:1", "2,3", "3"), ("auto", "", "")])
def test_cuda_visible_devices_set_beforehand_wins(locks: Path, caplog, spec: str, preset: str,
                                                  visible: str) -> None:
    env = {VISIBLE_ENV: preset}
    with caplog.at_level(logging.INFO, logger="qlora"):
        chosen = select_device("train.device", spec, env=env, count_devices=no_count, directory=locks)
    assert (chosen.device, chosen.claimed, env) == ("cuda" if visible else "cpu", (), {VISIBLE_ENV: visible})
    assert not locks.exists()
    assert f"train: CUDA_VISIBLE_DEVICES={visible!r} set in the environment: using it, no GPU claimed" in caplog.text


def test_cpu_hides_the_gpus_and_claims_none(locks: Path) -> None:
    env = {VISIBLE_ENV: "0,1"}
    chosen = select_device("train.device", "cpu", 2, env=env, count_devices=no_count, directory=locks)
    assert (chosen.device, env) == ("cpu", {VISIBLE_ENV: ""}) and not locks.exists()


def test_auto_without_a_gpu_is_the_cpu(locks: Path, caplog) -> None:
    env: dict[str, str] = {}
    with caplog.at_level(logging.INFO, logger="qlora"):
        chosen = select_device("train.device", "auto", 2, env=env, count_devices=lambda: 0, directory=locks)
    assert (chosen.device, env) == ("cpu", {}) and not locks.exists()
    assert "train: no CUDA GPU on this host: on the CPU" in caplog.text


def test_in_process_claims_are_kept_until_released(locks: Path, held, caplog) -> None:
    env: dict[str, str] = {}
    with caplog.at_level(logging.INFO, logger="qlora"):
        chosen = select_device("train.device", "cuda", 2, env=env, count_devices=lambda: 3, directory=locks)
    assert (chosen.claimed, env) == ((0, 1), {VISIBLE_ENV: "0,1"})
    assert f"train: claimed GPUs 0, 1 of 3 (locks in {locks})" in caplog.text
    assert try_lock(locks / "gpu0.lock", 0, "test") is None  # still held: kept past the call
    release_claims()
    hold(held, locks, 0)


@pytest.mark.parametrize("spec, processes, total, message", [
    ("cuda", 1, 0, "train.device: cuda, but this host has no CUDA GPU (use auto or cpu)"),
    ("cuda:4", 1, 4, "train.device: cuda:4, but this host has 4 GPU(s), 0 to 3"),
    ("cuda:0", 1, 0, "train.device: cuda:0, but this host has no CUDA GPU"),
    ("cuda:1", 2, 4, "train.device: cuda:1 is one GPU, but train.processes is 2 (use auto or cuda to "
                     "claim that many, or set CUDA_VISIBLE_DEVICES)"),
    ("auto", 5, 4, "train.processes is 5, but this host has 4 GPU(s)"),
    ("gpu", 1, 4, "train.device: expected auto, cpu, cuda or cuda:N (N: a GPU index, 0 or more), got 'gpu'"),
])
def test_impossible_choice_is_one_line(locks: Path, spec: str, processes: int, total: int, message: str) -> None:
    with pytest.raises(UserError) as info:
        select_device("train.device", spec, processes, env={}, count_devices=lambda: total, directory=locks)
    assert str(info.value) == message and not locks.exists()


def test_unwritable_lock_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^.*file/locks: cannot create or lock the GPU lock files "
                                        r"\(.*\); set QLORA_GPU_LOCK_DIR to a writable directory"):
        select_device("train.device", "auto", env={}, count_devices=lambda: 1, directory=tmp_path / "file" / "locks")


def test_choosing_after_cuda_started_is_a_bug(locks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cuda_initialised", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA was initialised in this process before"):
        select_device("train.device", "auto", env={}, count_devices=lambda: 2, directory=locks)
    assert not locks.exists()  # refused before waiting for, or taking, any GPU


def test_the_real_count_agrees_with_torch() -> None:
    import torch

    assert devices.cuda_device_count() == torch.cuda.device_count()  # 0 on a CPU build of torch


def test_lock_directory_is_per_host_unless_set(tmp_path: Path) -> None:
    assert lock_dir({"QLORA_GPU_LOCK_DIR": str(tmp_path)}) == tmp_path
    assert lock_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/qlora-pipeline/gpu-locks") / os.uname().nodename


# --- the params keys -------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["train.device", "evaluate.device"])
@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:-1", "cuda:", "CUDA", " cuda", 1])
def test_bad_device_is_one_line_naming_the_key(tmp_path: Path, shipped_params: dict[str, Any],
                                               key: str, value: Any) -> None:
    params = copy.deepcopy(shipped_params)
    section, name = key.split(".")
    params[section][name] = value
    with pytest.raises(UserError) as info:
        load_params(write_yaml(tmp_path / "params.yaml", params), ALL_KEYS)
    assert str(info.value) == (f"{tmp_path / 'params.yaml'}: {key}: expected auto, cpu, cuda or cuda:N "
                               f"(N: a GPU index, 0 or more), got {value!r}")


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_device_is_accepted(tmp_path: Path, shipped_params: dict[str, Any], value: str) -> None:
    params = copy.deepcopy(shipped_params)
    params["train"]["device"] = params["evaluate"]["device"] = value
    loaded = load_params(write_yaml(tmp_path / "params.yaml", params), ALL_KEYS)
    assert loaded["train.device"] == loaded["evaluate.device"] == value


# --- the stages choose before anything starts CUDA ---------------------------------------------

def test_importing_train_and_evaluate_leaves_cuda_alone() -> None:
    """CUDA reads CUDA_VISIBLE_DEVICES once, when it starts: a stage module whose import starts
    it (bitsandbytes' import asks torch.cuda.is_available()) would run on GPU 0 whatever it
    claimed. Regression: lib/loop.py imported transformers at the top, which imports bitsandbytes."""
    probe = """
import sys, torch
calls = []
for name in ("is_available", "device_count", "init", "_lazy_init"):
    setattr(torch.cuda, name, lambda *a, name=name, **k: calls.append(name))
import stages.train, stages.evaluate
print(calls, sorted(m for m in ("bitsandbytes", "accelerate", "peft") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[] []", out.stderr


def test_train_claims_its_gpus_before_it_launches_the_workers(tmp_path: Path, write_params,
                                                                monkeypatch: pytest.MonkeyPatch, held) -> None:
    """train.processes 2 on a fake 3-GPU host: the launcher holds GPUs 0 and 1 and its workers
    inherit CUDA_VISIBLE_DEVICES=0,1. Stops at the launch (the launcher's part), so nothing trains."""
    from stages import train

    locks = tmp_path / "locks"
    monkeypatch.setenv("QLORA_GPU_LOCK_DIR", str(locks))
    monkeypatch.delenv(VISIBLE_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 3)
    seen = {}

    def launch(module, argv, processes, nodes):
        free = [try_lock(locks / f"gpu{i}.lock", i, "test") for i in range(3)]
        seen.update(visible=os.environ[VISIBLE_ENV], processes=processes,
                    free=[i for i, lock in enumerate(free) if lock is not None])
        held.extend(lock for lock in free if lock is not None)
        return 0

    monkeypatch.setattr(train, "launch", launch)
    # the tokenized data is read (and its task checked) before the claim; nothing else of it is
    monkeypatch.setattr(train, "load_tokenized", lambda path: ({}, SimpleNamespace(task="classification")))
    params = write_params(tmp_path / "params.yaml", {"train.processes": 2})
    status = train.main(["--params", str(params), "--data", str(tmp_path), "--base", str(tmp_path),
                         "--adapter-out", str(tmp_path / "a"), "--metrics-out", str(tmp_path / "m"),
                         "--checkpoint-dir", str(tmp_path / "c")])
    assert status == 0
    assert seen == {"visible": "0,1", "processes": 2, "free": [2]}


def test_evaluate_claims_its_gpu_before_it_loads_the_model(tmp_path: Path, write_params,
                                                           monkeypatch: pytest.MonkeyPatch, held) -> None:
    """On a fake 2-GPU host with GPU 0 taken, evaluate runs on GPU 1, claimed before the adapter
    is read (stopped there: nothing is loaded)."""
    from stages import evaluate

    locks = tmp_path / "locks"
    hold(held, locks, 0)
    monkeypatch.setenv("QLORA_GPU_LOCK_DIR", str(locks))
    monkeypatch.delenv(VISIBLE_ENV, raising=False)
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(evaluate, "load_tokenized", lambda path: ({}, None))
    seen = {}

    def read_adapter_meta(path):
        seen.update(visible=os.environ[VISIBLE_ENV], gpu1_free=try_lock(locks / "gpu1.lock", 1, "test") is not None)
        raise UserError("stopped after the claim")

    monkeypatch.setattr(evaluate, "read_adapter_meta", read_adapter_meta)
    status = evaluate.main(["--params", str(write_params(tmp_path / "params.yaml")), "--data", str(tmp_path),
                            "--base", str(tmp_path), "--adapter", str(tmp_path), "--metrics-out", str(tmp_path / "m")])
    assert status == 1
    assert seen == {"visible": "1", "gpu1_free": False}
