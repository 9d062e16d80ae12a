"""Which device a stage runs on (train.device, evaluate.device), and the GPU claims that put
parallel queued experiments (`dvc queue start -j N`) on separate GPUs.

`auto` on a host with CUDA GPUs claims free ones: one lock file per GPU in a directory every
experiment of the host shares (DVC's queue runs each in a temporary copy of the repository, so
not in the repository: $QLORA_GPU_LOCK_DIR, else qlora-pipeline/gpu-locks/<host> in the user's
cache directory). A claim is an exclusive `flock` on the open file, kept for the process's life:
the kernel drops it when the process exits or is killed (SIGKILL too), so a dead holder's GPU is
free again with no stale-lock cleanup. The claimed physical indices go into CUDA_VISIBLE_DEVICES,
so everything after it (accelerate, bitsandbytes, the DDP workers train.processes starts, which
inherit the environment) sees those GPUs only, as cuda:0, cuda:1, ...

CUDA reads CUDA_VISIBLE_DEVICES once, when the driver initialises, so the claim must come first:
devices are counted through NVML (no driver initialisation), and a stage claims before it loads
anything that touches CUDA (importing bitsandbytes does; tests/test_devices.py checks that
importing train and evaluate does not).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from stages.lib.io import user_cache_dir
from stages.lib.params import DEVICE_CHOICES, DEVICE_PATTERN, UserError

log = logging.getLogger("qlora")

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
LOCK_DIR_ENV = "QLORA_GPU_LOCK_DIR"
POLL_S = 2.0  # how often a waiting claimant tries again
REMIND_S = 60.0  # how often it says again that it is waiting, and for whom
CUDA_ERROR_NOT_INITIALIZED = 3
_HELD: list[GpuLock] = []  # open lock files: closing one (or its garbage collection) frees its GPU


def lock_dir(env: MutableMapping[str, str] | None = None) -> Path:
    """$QLORA_GPU_LOCK_DIR as given (containers that share GPUs can share one), else
    qlora-pipeline/gpu-locks/<hostname> under $XDG_CACHE_HOME or ~/.cache: per host, so hosts
    whose home directory is one network share do not wait for each other's GPU 0."""
    env = os.environ if env is None else env
    if env.get(LOCK_DIR_ENV):
        return Path(env[LOCK_DIR_ENV])
    return user_cache_dir(env) / "gpu-locks" / socket.gethostname()


def cuda_device_count() -> int:
    """This host's CUDA GPUs, counted without initialising CUDA here. torch.cuda.device_count()
    counts through NVML only until CUDA is initialised, and falls back to cudaGetDeviceCount
    (which initialises it) when NVML fails: then a child process counts instead."""
    import torch

    if not torch.backends.cuda.is_built():
        return 0
    nvml = getattr(torch.cuda, "_device_count_nvml", None)  # -1 when NVML fails
    count = nvml() if nvml is not None else -1
    if count >= 0:
        return count
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=False)
    return int(child.stdout.strip() or 0)


def cuda_initialised() -> bool:
    """Whether the CUDA driver is initialised in this process, asked without initialising it:
    before cuInit every driver call fails with CUDA_ERROR_NOT_INITIALIZED."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False  # no driver, nothing to initialise
    count = ctypes.c_int()
    return driver.cuDeviceGetCount(ctypes.byref(count)) != CUDA_ERROR_NOT_INITIALIZED


@dataclass
class GpuLock:
    """One claimed GPU: its physical index and the open, flock-ed lock file."""
    index: int
    path: Path
    file: IO[str]

    def release(self) -> None:
        self.file.close()  # closing the last descriptor drops the flock


def try_lock(path: Path, index: int, who: str) -> GpuLock | None:
    """The lock on `path` if no live process holds it, with `who` written into the file for
    other claimants' messages; else None. Never waits."""
    # Opened without truncating: a holder's record stays readable until the lock is taken. A
    # file another user created may be read-only to us; flock needs no write access.
    try:
        fd, mode = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+"
    except PermissionError:
        fd, mode = os.open(path, os.O_RDONLY), "r"
    f = os.fdopen(fd, mode, encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    if f.writable():
        f.truncate(0)
        f.write(json.dumps({"stage": who, "pid": os.getpid(), "host": socket.gethostname(),
                            "cwd": os.getcwd(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
    return GpuLock(index, path, f)


def try_claim(directory: Path, count: int, total: int, who: str) -> tuple[list[GpuLock], list[int]]:
    """`count` free GPUs of `total` (the lowest free indices) and [], or nothing held and the
    indices found taken. All or nothing, and never waiting while holding, so claimants that
    each hold part of what the other needs cannot deadlock."""
    held: list[GpuLock] = []
    taken: list[int] = []
    try:
        for index in range(total):
            lock = try_lock(directory / f"gpu{index}.lock", index, who)
            if lock is None:
                taken.append(index)
                continue
            held.append(lock)
            if len(held) == count:
                return held, []
    except BaseException:
        for lock in held:
            lock.release()
        raise
    for lock in held:
        lock.release()
    return [], taken


def holders(directory: Path, taken: list[int]) -> str:
    """Who holds the taken GPUs, as their lock files say: 'GPU 0: train, pid 41 on box in /tmp/x'."""
    found = []
    for index in taken:
        try:
            who = json.loads((directory / f"gpu{index}.lock").read_text(encoding="utf-8"))
            found.append(f"GPU {index}: {who['stage']}, pid {who['pid']} on {who['host']} in {who['cwd']}")
        except (OSError, ValueError, KeyError, TypeError):  # being rewritten by a new holder
            found.append(f"GPU {index}: holder unknown")
    return "; ".join(found)


def claim_gpus(directory: Path, count: int, total: int, who: str, poll_s: float = POLL_S,
               remind_s: float = REMIND_S) -> list[GpuLock]:
    """Wait until `count` of the `total` GPUs are free together, and claim them. While waiting,
    say so, naming the holders, at once and every `remind_s` seconds."""
    started = reminder = time.monotonic()
    wanted = "a free GPU" if count == 1 else f"{count} free GPUs at once"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            held, taken = try_claim(directory, count, total, who)
            if held:
                return held
            if time.monotonic() >= reminder:
                waited = time.monotonic() - started
                log.info("%s: waiting for %s of %d%s, taken: %s; checking every %g s", who, wanted, total,
                         f" for {waited / 60:.0f} min" if waited >= 60 else "", holders(directory, taken), poll_s)
                reminder += remind_s
            time.sleep(poll_s)
    except OSError as e:
        raise UserError(f"{directory}: cannot create or lock the GPU lock files ({e.strerror}); "
                        f"set {LOCK_DIR_ENV} to a writable directory shared by this host's runs") from None


@dataclass(frozen=True)
class Selection:
    """What select_device decided: `cpu` or `cuda`, and the GPUs this process claimed (none when
    the user chose the GPU or the CPU)."""
    device: str
    claimed: tuple[int, ...] = ()


def select_device(key: str, spec: str, processes: int = 1, *, env: MutableMapping[str, str] | None = None,
                  count_devices: Callable[[], int] | None = None, directory: Path | None = None,
                  poll_s: float = POLL_S, remind_s: float = REMIND_S) -> Selection:
    """Decide `key`'s device from `spec` (auto, cpu, cuda or cuda:N, checked by the params
    schema) for `processes` worker processes, and set CUDA_VISIBLE_DEVICES in `env` (default:
    this process's environment) to match. `auto` and `cuda` claim free GPUs, waiting while all
    are taken; cuda:N and a CUDA_VISIBLE_DEVICES already set are the user's choice: no claim.
    `count_devices` (default cuda_device_count) and `directory` (default lock_dir()) are for tests."""
    env = os.environ if env is None else env
    stage = key.split(".")[0]
    match = re.fullmatch(DEVICE_PATTERN, spec)
    if match is None:  # the schema has checked it; a caller outside the pipeline may not have
        raise UserError(f"{key}: expected {DEVICE_CHOICES}, got {spec!r}")
    index = int(match.group(1)) if match.group(1) is not None else None
    if spec == "cpu":
        _set_visible(env, "")  # hides every GPU from torch, accelerate and bitsandbytes
        log.info("%s: on the CPU, as %s says (GPUs hidden)", stage, key)
        return Selection("cpu")
    if index is not None and processes > 1:
        raise UserError(f"{key}: cuda:{index} is one GPU, but train.processes is {processes} "
                        "(use auto or cuda to claim that many, or set CUDA_VISIBLE_DEVICES)")
    if VISIBLE_ENV in env:
        return _use_preset(key, spec, index, env)
    total = (count_devices or cuda_device_count)()
    if index is not None:
        if index >= total:
            raise UserError(f"{key}: cuda:{index}, but this host has "
                            + (f"{total} GPU(s), 0 to {total - 1}" if total else "no CUDA GPU"))
        _set_visible(env, str(index))
        log.info("%s: on GPU %d of %d, as %s says (not claimed: runs on auto may use it too)",
                 stage, index, total, key)
        return Selection("cuda")
    if total == 0:
        if spec == "cuda":
            raise UserError(f"{key}: cuda, but this host has no CUDA GPU (use auto or cpu)")
        log.info("%s: no CUDA GPU on this host: on the CPU", stage)
        return Selection("cpu")
    if processes > total:
        raise UserError(f"train.processes is {processes}, but this host has {total} GPU(s)")
    _check_cuda_untouched()  # before waiting for GPUs this process could not use
    directory = lock_dir(env) if directory is None else directory
    locks = claim_gpus(directory, processes, total, stage, poll_s, remind_s)
    _HELD.extend(locks)
    claimed = tuple(lock.index for lock in locks)
    _set_visible(env, ",".join(map(str, claimed)))
    if len(locks) == 1:
        log.info("%s: claimed GPU %d of %d (lock %s)", stage, claimed[0], total, locks[0].path)
    else:
        log.info("%s: claimed GPUs %s of %d (locks in %s)", stage, ", ".join(map(str, claimed)), total, directory)
    return Selection("cuda", claimed)


def _use_preset(key: str, spec: str, index: int | None, env: MutableMapping[str, str]) -> Selection:
    """CUDA_VISIBLE_DEVICES set before the stage (by the user or a scheduler): used as it is;
    cuda:N then means the N-th device it lists, as it would to torch."""
    preset = env[VISIBLE_ENV]
    visible = [d.strip() for d in preset.split(",") if d.strip()]
    if index is not None:
        if index >= len(visible):
            raise UserError(f"{key}: cuda:{index}, but {VISIBLE_ENV}={preset!r} shows {len(visible)} GPU(s)")
        _set_visible(env, visible[index])
    elif spec == "cuda" and not visible:
        raise UserError(f"{key}: cuda, but {VISIBLE_ENV}={preset!r} hides every GPU")
    log.info("%s: %s=%r set in the environment: using it, no GPU claimed", key.split(".")[0], VISIBLE_ENV,
             env[VISIBLE_ENV])
    return Selection("cuda" if env[VISIBLE_ENV] else "cpu")


def release_claims() -> None:
    """Free every GPU this process claimed (exit does it too; for tests and long-lived callers)."""
    while _HELD:
        _HELD.pop().release()


def _check_cuda_untouched() -> None:
    if cuda_initialised():  # a bug: something before the choice (an import) initialised CUDA
        raise RuntimeError(f"CUDA was initialised in this process before its device was chosen, so "
                           f"{VISIBLE_ENV} would not take effect here (was bitsandbytes imported first?)")


def _set_visible(env: MutableMapping[str, str], value: str) -> None:
    """CUDA_VISIBLE_DEVICES, which CUDA reads once, when it starts."""
    _check_cuda_untouched()
    env[VISIBLE_ENV] = value
