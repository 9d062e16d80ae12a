"""A stage killed (SIGKILL) at any point of its writing leaves each output either as it was
before or complete, never half-written; one whose disk fills up says so in one line and leaves
nothing behind.

Each stage runs in a subprocess whose file-system writes (open for writing, os.replace,
shutil.copyfile) are counted; the process kills itself at the Nth one, N spread over the run.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, STAGES, Pipeline, error_message, leftovers, run_stage

KILL_AT_NTH_WRITE = """
import builtins, os, runpy, shutil, signal, sys
kill_at, count_file, stage = int(sys.argv[1]), sys.argv[2], sys.argv[3]
writes = 0

def write_event():
    global writes
    writes += 1
    with real_open(count_file, "w") as f:  # not counted
        f.write(str(writes))
    if writes == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def counted(real, is_write=lambda *a, **k: True):
    def wrapper(*args, **kwargs):
        if is_write(*args, **kwargs):
            write_event()
        return real(*args, **kwargs)
    return wrapper

def writes_file(file, mode="r", *args, **kwargs):
    return any(c in mode for c in "wax+")

real_open = builtins.open
builtins.open = counted(real_open, writes_file)
os.replace = counted(os.replace)
shutil.copyfile = counted(shutil.copyfile)
sys.argv = [stage, *sys.argv[4:]]
runpy.run_module(f"stages.{stage}", run_name="__main__")
"""

OUTPUTS = {"download": ("raw", "base"), "split": ("split",), "tokenize": ("tokenized",),
           "train": ("adapter", "metrics/train"), "evaluate": ("metrics/evaluate",),
           "export": ("export",)}
RUN_TO_RUN = {"timing.json"}  # speed figures: the only files allowed to differ between runs


def output_dirs(run: Pipeline, stage: str) -> list[Path]:
    return [run.metrics / name.split("/")[1] if name.startswith("metrics/") else getattr(run, name)
            for name in OUTPUTS[stage]]


def snapshot(directory: Path) -> dict[str, bytes] | None:
    """Every file under `directory` by relative path (None if it does not exist)."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): b"" if p.name in RUN_TO_RUN else p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def relative_argv(run: Pipeline, stage: str) -> list[str]:
    """The stage's argv with paths relative to the run's root, as dvc.yaml gives them: the
    adapter records its base's path, and a copied tree must give the same bytes."""
    return [arg.replace(f"{run.root}/", "") for arg in run.argv(stage)]


def run_killed(run: Pipeline, stage: str, kill_at: int, **popen) -> tuple[int, int, str]:
    """(exit status, writes counted, stderr) of `stage` run with a kill at write `kill_at`
    (0: never)."""
    count = run.root / "writes.count"
    count.write_text("0")
    done = subprocess.run([sys.executable, "-c", KILL_AT_NTH_WRITE, str(kill_at), str(count), stage,
                           *relative_argv(run, stage)], cwd=run.root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, **popen)
    return done.returncode, int(count.read_text()), done.stderr


@pytest.fixture
def copied(pipeline: Pipeline, tmp_path: Path) -> Pipeline:
    """A copy of the session pipeline's whole tree: every stage's inputs and old outputs."""
    shutil.copytree(pipeline.root, tmp_path / "run")
    run = Pipeline(tmp_path / "run")
    return run


@pytest.mark.parametrize("stage", STAGES)
def test_killed_stage_leaves_old_or_complete_outputs(copied: Pipeline, stage: str) -> None:
    run = copied
    status, total, err = run_killed(run, stage, kill_at=0)
    assert status == 0, err
    assert total >= 3, f"{stage}: only {total} writes counted"
    before = {d: snapshot(d) for d in output_dirs(run, stage)}

    # the first write, two in the middle, the last (usually the final rename)
    for kill_at in sorted({1, total // 3, 2 * total // 3, total} - {0}):
        status, _, err = run_killed(run, stage, kill_at)
        assert status == -signal.SIGKILL, f"{stage} not killed at write {kill_at}: {err}"
        for directory, old in before.items():
            assert snapshot(directory) in (old, None), \
                f"{stage} killed at write {kill_at}/{total}: {directory} is neither old nor absent"

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.root)
        assert run_stage(stage, relative_argv(run, stage)) == 0
    for directory, old in before.items():
        assert snapshot(directory) == old
        assert leftovers(directory.parent) == [], "a rerun clears what the killed runs left"


def limit_file_size(max_bytes: int):
    """preexec_fn: files may not grow past max_bytes; writes past it fail with EFBIG, the way
    they fail with ENOSPC on a full disk (SIGXFSZ ignored, so the write returns the error)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


@pytest.mark.parametrize("stage", ["train", "export"])
def test_full_disk_is_one_clear_error_and_no_output(copied: Pipeline, stage: str) -> None:
    run = copied
    dirs = output_dirs(run, stage)
    for directory in dirs:  # as `dvc repro` leaves them: it removes a stage's outs first
        shutil.rmtree(directory)
    status, _, err = run_killed(run, stage, kill_at=0, preexec_fn=limit_file_size(4096))
    assert status == 1, err
    message = error_message(err)
    assert "cannot write (File too large); nothing was written" in message, message
    assert "Traceback" not in err
    for directory in dirs:
        assert not directory.exists()
        assert leftovers(directory.parent) == []
