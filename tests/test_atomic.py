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
import time
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


# --- concurrent writers and permissions (atomic_file / atomic_dir) --------------------------

SLOW_WRITER = """
import sys, time
from pathlib import Path
from stages.lib.io import atomic_file
target, ready, go = map(Path, sys.argv[1:4])
with atomic_file(target) as f:
    f.write("first writer\\n")
    ready.touch()
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
"""


def test_concurrent_writers_keep_each_others_temporaries(tmp_path: Path) -> None:
    """Two predict runs to one --output outside DVC: the second must not delete the first's
    temporary (the first then died with FileNotFoundError after all its work)."""
    from stages.lib.io import atomic_file

    target, ready, go = tmp_path / "out.csv", tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target), str(ready), str(go)],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.02)
        with atomic_file(target) as f:  # the second writer, start to finish meanwhile
            f.write("second writer\n")
        assert target.read_text() == "second writer\n"
        go.touch()
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert target.read_text() == "first writer\n"  # the last to finish wins, whole
    assert leftovers(tmp_path) == []


def test_dead_writers_temporaries_are_removed(tmp_path: Path) -> None:
    from stages.lib.io import atomic_dir, atomic_file

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".out.csv.tmp-{dead.pid}-x1y2").write_text("half")
    (tmp_path / f".model.tmp-{dead.pid}-old").mkdir()
    (tmp_path / ".model.tmp-abc123").mkdir()  # no pid: from before pids were in names
    with atomic_file(tmp_path / "out.csv") as f:
        f.write("x")
    with atomic_dir(tmp_path / "model") as d:
        (d / "a.txt").write_text("a")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """mkstemp/mkdtemp make 600/700; outputs must get what open()/mkdir() would give."""
    from stages.lib.io import atomic_dir, atomic_file, write_json

    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "out.csv") as f:
            f.write("x")
        with atomic_dir(tmp_path / "model") as d:
            write_json(d / "pipeline.json", {"a": 1})  # itself written through mkstemp
            (d / "sub").mkdir()
            with atomic_dir(d / "sub" / "inner") as inner:
                (inner / "w.bin").write_bytes(b"w")
    finally:
        os.umask(old)
    files = [tmp_path / "out.csv", tmp_path / "model" / "pipeline.json", tmp_path / "model" / "sub" / "inner" / "w.bin"]
    dirs = [tmp_path / "model", tmp_path / "model" / "sub", tmp_path / "model" / "sub" / "inner"]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))
    for path in dirs:
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, (path, oct(path.stat().st_mode))
