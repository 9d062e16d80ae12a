"""The optimizer named by `train.optimizer`.

    adamw              torch.optim.AdamW (fused kernel when every parameter is on a GPU)
    adamw_8bit         bitsandbytes AdamW with 8-bit blockwise states: 2 bytes of state per
                       trained parameter instead of 8
    paged_adamw_8bit   the same, states in CUDA unified memory that pages to the host when the
                       GPU runs short (part of the QLoRA recipe: it rides out memory spikes)
    paged_adamw_32bit  paged, fp32 states

The bitsandbytes ones are built exactly as transformers' Trainer builds them for `optim=`
(`bnb.optim.AdamW(..., optim_bits=8|32, is_paged=...)`), so a run of ours and a Trainer run
with the same settings take the same steps.

On a CPU (bitsandbytes 0.50): the 8-bit AdamW runs (bitsandbytes has CPU kernels for it); the
paged ones run too, unpaged, because paging is a CUDA unified-memory feature; bitsandbytes then
warns on the first step, and this module logs the fallback once instead. The maths is the same,
so a CPU test of a paged run tests its numbers. Their state_dict round trip (resume) works on
both devices.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch

from stages.lib.params import OPTIMIZERS, UserError

log = logging.getLogger("qlora")

# bitsandbytes' own words when it runs a paged optimizer unpaged on a CPU (logged here instead)
_CPU_PAGED_WARNING = "Paged optimizers are not supported on CPU"


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over the parameters that require grad."""
    if name not in OPTIMIZERS:
        raise UserError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters to optimize")
    on_gpu = all(p.device.type == "cuda" for p in params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=True if on_gpu else None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"train.optimizer: {name} needs bitsandbytes (pip install bitsandbytes); "
                        "adamw works without it") from None
    paged = name.startswith("paged_")
    if paged and not on_gpu:
        log.info("train.optimizer %s: paging needs a GPU; on this CPU bitsandbytes runs it unpaged "
                 "(same updates)", name)
        warnings.filterwarnings("ignore", message=_CPU_PAGED_WARNING)
    return bnb.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           optim_bits=8 if name.endswith("_8bit") else 32, is_paged=paged)
