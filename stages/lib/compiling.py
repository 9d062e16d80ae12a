"""torch.compile: whether it pays for this run (`train.compile` / `evaluate.compile`: auto), and
where its compiled graphs are kept so that the next run and experiment reuse them.

Compiling costs a fixed time up front and saves a share of every step after it, so it pays only
when a run has enough work. The rule (constants and their measurements: docs/performance.md#when-compiling-pays):

    compile  when  tokens to process x base parameters (billions) x SAVED_S  >  COMPILE_S

on a GPU; on a CPU `auto` never compiles (the CPU default run stays as it was). Tokens are the
run's whole work (train: steps x batch x mean length; evaluate: the test split's tokens). The
saving is taken as proportional to tokens x parameters, fitted where it was measured (bert-base);
for a 6-layer model the host's per-step work makes the real saving larger, and the rule errs
towards not compiling. `true` and `false` are kept as given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.lib.io import user_cache_dir

log = logging.getLogger("qlora")

# Training: torch.compile of the whole model, one GPU (docs/performance.md#when-compiling-pays).
TRAIN_COMPILE_S = 90.0
TRAIN_SAVED_S = 7.8e-6  # seconds saved per token per billion base parameters
# Inference (evaluate): compiled layer by layer, with one recompile for dynamic widths.
EVAL_COMPILE_S = 20.0
EVAL_SAVED_S = 6.9e-6

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's FX graph, AOTAutograd and Triton kernel caches
CACHE_SWITCHES = ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")
# Triton's compiled kernels. Inside inductor's cache dir torch keeps one folder per GPU index
# (triton/0, triton/1, ...), so the DDP worker on GPU 1 would build again every kernel the one
# on GPU 0 built; Triton's own key holds the GPU architecture, not the index, so one folder
# serves every worker of a host.
TRITON_CACHE_ENV = "TRITON_CACHE_DIR"


@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    reason: str  # one sentence for the log: the setting and, for auto, the numbers behind it


def decide_compile(key: str, setting: bool | str, device: torch.device, tokens: int, parameters: int,
                   compile_s: float, saved_s: float) -> CompileDecision:
    """Whether to compile, given the params value of `key` (true, false or "auto")."""
    if setting is True or setting is False:
        return CompileDecision(setting, f"{key}: {str(setting).lower()}")
    if device.type != "cuda":
        return CompileDecision(False, f"{key}: auto: not compiling on the {device.type} "
                                      "(torch.compile pays on GPUs only)")
    saving = tokens * parameters / 1e9 * saved_s
    pays = saving > compile_s
    return CompileDecision(pays, f"{key}: auto: {'compiling' if pays else 'not compiling'}: "
                                 f"{tokens:,} tokens x {parameters / 1e6:,.1f}M parameters would save "
                                 f"about {saving:,.1f} s, {'more' if pays else 'less'} than the about "
                                 f"{compile_s:.0f} s compiling takes (docs/performance.md#when-compiling-pays)")


def parameter_total(model: torch.nn.Module) -> int:
    """A model's parameters, 4-bit ones counted as the weights they stand for (PEFT's count,
    where the model is a PEFT model)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()[1]
    return sum(p.numel() for p in model.parameters())


def torch_default_cache_dir() -> str:
    """Inductor's own default cache directory (/tmp/torchinductor_<user>)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # an older torch: the same rule
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return default_cache_dir()


def compile_cache_dir() -> Path:
    """Where compiled graphs are kept: TORCHINDUCTOR_CACHE_DIR when the user set it, else
    qlora-pipeline/torch-compile under the user's cache directory ($XDG_CACHE_HOME or
    ~/.cache): outside the repository and outside /tmp (torch's default), so it survives reboots
    and is shared by every run, experiment and queued experiment's temporary copy of the repo.

    Inductor writes its own default into TORCHINDUCTOR_CACHE_DIR the first time anything asks
    it for its cache, and importing bitsandbytes does (0.50 wraps kernels in torch.compile at
    import), so a variable holding that default was not set by the user and is overridden."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen and os.path.abspath(chosen) != os.path.abspath(torch_default_cache_dir()):
        return Path(chosen)
    return user_cache_dir() / "torch-compile"


def use_compile_cache() -> Path:
    """Point inductor's caches at compile_cache_dir() and switch the graph caches on; Triton's
    kernels go to its `triton` folder, one for all GPUs (unless TRITON_CACHE_DIR is set). Call
    it before anything compiles: torch reads these variables when it first compiles. Every DDP
    worker calls it (the training loop's setup runs in each), so all share one cache.

    torch (up to 2.13 at least, pytorch#108971) puts the GPU index of a graph's inputs in the
    FX graph and AOTAutograd cache keys, so a graph compiled by the worker on GPU 0 is found
    again by a later worker on GPU 0 only; the Triton kernels are shared across GPUs."""
    directory = compile_cache_dir()
    os.environ[CACHE_ENV] = str(directory)
    for switch in CACHE_SWITCHES:
        os.environ.setdefault(switch, "1")
    os.environ.setdefault(TRITON_CACHE_ENV, str(directory / "triton"))
    return directory
