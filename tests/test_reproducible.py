"""CPU training gives the same bits whichever x86-64 CPU runs it (stages/lib/reproducible.py).

Another CPU is emulated by the choices it would make: a CPU without AVX-512 runs ATen's AVX2
kernels, oneDNN's AVX2 code and MKL's AVX2 code, and a one-core machine one thread. Training in
a fresh `python -m stages.train` on this machine must give the adapter that machine would give.
(On a one-core CPU without AVX-512 the emulated machine is this one; then the test cannot tell.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, Pipeline
from stages.lib import reproducible

# What a single-core CPU with AVX2 but without AVX-512 would run, whatever our settings are.
AVX2_SINGLE_CORE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not reproducible.x86_64_with_avx2(),
                                reason="the settings apply to x86-64 Linux CPUs with AVX2")


def fresh_env(**extra: str) -> dict[str, str]:
    """This process's environment without the settings that importing stages put there, so the
    child process chooses them itself."""
    env = {k: v for k, v in os.environ.items() if k not in reproducible.SETTINGS}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_settings_reach_a_fresh_process_and_yield_to_the_user() -> None:
    probe = "import stages, torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
    ours = subprocess.run([sys.executable, "-c", probe], env=fresh_env(), capture_output=True,
                          text=True, timeout=120, check=True)
    assert ours.stdout.split() == ["AVX2", "1"]
    theirs = subprocess.run([sys.executable, "-c", probe], env=fresh_env(OMP_NUM_THREADS="2"),
                            capture_output=True, text=True, timeout=120, check=True)
    assert theirs.stdout.split()[1] == "2"  # a variable set by the user wins


def test_training_here_matches_an_avx2_single_core_cpu(pipeline: Pipeline, tmp_path: Path,
                                                      write_params) -> None:
    runs = {"here": fresh_env(), "avx2-1-core": fresh_env(**AVX2_SINGLE_CORE)}
    children = {}
    for name, env in runs.items():
        run = Pipeline(tmp_path / name)
        run.root.mkdir()
        write_params(run.params)
        argv = run.argv("train")
        argv[argv.index("--data") + 1], argv[argv.index("--base") + 1] = str(pipeline.tokenized), str(pipeline.base)
        children[name] = (run, subprocess.Popen([sys.executable, "-m", "stages.train", *argv], cwd=run.root,
                                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                text=True))
    for name, (run, child) in children.items():
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, f"{name}: {err[-3000:]}"
    (here, _), (other, _) = children.values()
    weights = "adapter_model.safetensors"
    assert (here.adapter / weights).read_bytes() == (other.adapter / weights).read_bytes()
    summary = here.metrics / "train" / "metrics.json"
    assert summary.read_bytes() == (other.metrics / "train" / "metrics.json").read_bytes()
