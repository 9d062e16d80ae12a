"""CPU settings under which training gives the same bits on every x86-64 CPU with AVX2.

Without them, torch and the libraries under it pick kernels by the CPU they run on, and those
kernels round differently: ATen's vectorised kernels (attention, LayerNorm, reductions) by SIMD
width, oneDNN's (GELU) by the instruction set it JIT-compiles for, MKL's matrix products by CPU
vendor and model, and every reduction split over threads by the thread count. Each setting below
pins one of those choices to a value every such CPU can run; docs/reproducibility.md says what
each one was measured to change, and what it costs.

The libraries read these variables when they initialise (OpenMP when torch is imported, the
others at their first call), so `apply` must run before torch is imported: stages/__init__.py
calls it, which covers `python -m stages.<name>`, the installed CLIs and the DDP worker
processes (they run `python -m stages.train` and inherit the environment). A variable that is
already set is left alone: the way to trade the guarantee for speed (OMP_NUM_THREADS=8).
"""

from __future__ import annotations

import os
import platform
import sys

# Each is read by the library it names; see the module docstring.
SETTINGS: dict[str, str] = {
    # ATen's CPU kernels: AVX2 (8 floats wide) even where AVX-512 (16) is available
    "ATEN_CPU_CAPABILITY": "avx2",
    # oneDNN (torch's GELU, forward and backward): JIT code for AVX2, not AVX-512
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # MKL's conditional numerical reproducibility: the SSE2 code branch without the approximate
    # rcpps/rsqrtps instructions, the only branch MKL honours on non-Intel CPUs as well
    "MKL_CBWR": "COMPATIBLE",
    # one thread: thread-split reductions (MKL's GEMMs in the backward pass, ATen's sums) then
    # add in one order on every machine, whatever its core count
    # (torch passes its thread count on to MKL; an MKL_NUM_THREADS set here would also
    # override a user's OMP_NUM_THREADS)
    "OMP_NUM_THREADS": "1",
}


def x86_64_with_avx2() -> bool:
    """Whether this is an x86-64 Linux CPU with AVX2 and FMA, which ATEN_CPU_CAPABILITY=avx2
    needs: ATen trusts the variable, and an older CPU would fail on an illegal instruction."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def apply() -> dict[str, str]:
    """Set every variable in SETTINGS that is not set yet; return those set here.

    Only on x86-64 Linux CPUs with AVX2: elsewhere (ARM, older x86) the values do not apply, and
    nothing is set, so training there is reproducible on the same CPU model only.
    """
    if not x86_64_with_avx2():
        return {}
    applied = {}
    for name, value in SETTINGS.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    if "torch" in sys.modules and "OMP_NUM_THREADS" in applied:
        # imported before stages (a test session, a notebook): OpenMP has read its variable already
        sys.modules["torch"].set_num_threads(int(applied["OMP_NUM_THREADS"]))
    return applied
