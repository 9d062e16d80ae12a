"""Varlen attention: packed rows attend within their examples with no mask at all.

`register()` adds the attention implementation "varlen" (packing.VARLEN) to transformers through
its public registries (`AttentionInterface.register`, `AttentionMaskInterface.register`; both in
5.17 and 5.24). A model loaded with `attn_implementation="varlen"`:
- builds no mask: its mask function returns None, where SDPA would build a dense
  (rows, 1, width, width) block-diagonal mask from the restarting position_ids;
- runs each attention layer as PyTorch's flash-attention kernel over cumulative sequence lengths
  (`torch.nn.attention.varlen.varlen_attn`: CUDA, torch 2.10 or later), causal within each
  segment of `cu_seq_lens_q/k`, on the batch flattened to (rows x width, heads, dim).
The caller passes `packing.varlen_kwargs(rows)` (cu_seq_lens_q/k, max_length_q/k) with the model
inputs; transformers hands a model call's extra kwargs down to the attention functions (checked for
Llama and GPT-2 in 5.17 and 5.24, and through a PEFT model). `packing.prepare_for_packing` then
probes the loaded model with them, so a model that drops them, or that runs its own attention,
is refused in one line rather than trained across examples.

What it does not do, each refused in one line where asked for (VarlenUnsupported, a UserError):
attention dropout (the kernel has none), a KV cache (generation keeps SDPA), an attention mask,
sliding windows. The kernel's signature differs between torch versions (2.11: `window_size`
for causality, no `enable_gqa`; 2.13: `window_size` and `enable_gqa`; older: `is_causal`):
`Kernel.wrap` reads it once, and grouped-query attention repeats the key/value heads where the
kernel has no `enable_gqa`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from stages.lib.packing import VARLEN
from stages.lib.params import UserError

log = logging.getLogger("qlora")


class VarlenUnsupported(UserError):
    """A call the varlen path cannot serve (one line, as every UserError)."""


@dataclass(frozen=True)
class Kernel:
    """varlen_attn (or a stand-in with its signature) and how to ask it for causality and GQA."""

    fn: Callable[..., torch.Tensor]
    causal_by: str  # "window_size" (torch 2.11+) or "is_causal" (older)
    gqa: bool  # takes enable_gqa (torch 2.13): fewer key/value heads than query heads

    @classmethod
    def wrap(cls, fn: Callable[..., torch.Tensor]) -> Kernel:
        params = inspect.signature(fn).parameters
        causal_by = next((name for name in ("window_size", "is_causal") if name in params), None)
        if causal_by is None:
            raise ValueError(f"{fn}: neither window_size nor is_causal in its signature")
        return cls(fn, causal_by, "enable_gqa" in params)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                 cu_seq_k: torch.Tensor, max_q: int, max_k: int, scale: float | None, causal: bool) -> torch.Tensor:
        """Attention of (tokens, heads, dim) query/key/value within the segments of cu_seq_q/k."""
        options: dict[str, Any] = {"scale": scale}
        if self.causal_by == "window_size":
            options["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            options["is_causal"] = causal
        groups = query.shape[1] // key.shape[1]
        if groups > 1 and self.gqa:
            options["enable_gqa"] = True
        elif groups > 1:  # query head h reads key/value head h // groups, as transformers' repeat_kv
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return self.fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **options)


def installed_kernel() -> Kernel | None:
    """This torch's varlen_attn, or None where it has none (before 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return Kernel.wrap(varlen_attn)


_kernel: Kernel | None = None  # set by register(); tests put a reference implementation here


def no_kernel() -> str:
    return (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn; varlen attention "
            "needs torch 2.10 or later")


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why varlen attention cannot run here (one phrase), or None when it can."""
    if device.type != "cuda":
        return f"varlen attention needs a CUDA GPU; this run is on the {device.type}"
    if _kernel is None and installed_kernel() is None:
        return no_kernel()
    if dtype not in (torch.bfloat16, torch.float16):
        return f"varlen attention runs in bf16 or fp16, not {str(dtype).removeprefix('torch.')}"
    return None


def register() -> None:
    """Make "varlen" an attention implementation transformers can load a model with (idempotent)."""
    global _kernel
    from transformers import AttentionInterface, AttentionMaskInterface

    if _kernel is None:
        _kernel = installed_kernel()
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, no_mask)


def require(device: torch.device, dtype: torch.dtype) -> None:
    """Register varlen attention, or refuse in one line where it cannot run."""
    reason = unavailable(device, dtype)
    if reason:
        raise UserError(reason)
    register()


def packed_attention(device: torch.device, dtype: torch.dtype) -> str:
    """The attention implementation to load a model with for packed rows: varlen (no mask) where
    it runs, else SDPA with transformers' block mask (dense, fine at CPU sizes); logged."""
    reason = unavailable(device, dtype)
    if reason:
        log.info("packed rows: sdpa attention with a block mask (%s)", reason)
        return "sdpa"
    register()
    log.info("packed rows: varlen attention (no mask)")
    return VARLEN


def no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function of varlen attention: none; the segments come as cu_seq_lens."""
    return None


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                             max_length_q: int | None = None, max_length_k: int | None = None,
                             sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query (batch, heads, width, dim), key and value
    (batch, kv heads, width, dim) in; (batch, width, heads, dim) and no weights out."""
    name = type(module).__name__
    if cu_seq_lens_q is None or cu_seq_lens_k is None or max_length_q is None or max_length_k is None:
        raise VarlenUnsupported(f"varlen attention: {name} was called without cu_seq_lens_q/k and max_length_q/k "
                                "(the packed rows' example boundaries: the caller did not pass them, or the "
                                "model does not hand them to its attention layers); set sft.packing: false")
    if attention_mask is not None:
        raise VarlenUnsupported(f"varlen attention: {name} was given an attention mask; packed rows carry "
                                "cu_seq_lens instead (pass no attention_mask)")
    if key.shape[2] != query.shape[2]:
        raise VarlenUnsupported(f"varlen attention: {name} has {key.shape[2]} keys for {query.shape[2]} queries "
                                "(a KV cache: use SDPA to generate)")
    if sliding_window is not None:
        raise VarlenUnsupported(f"varlen attention: {name} uses a sliding window, which this path does not "
                                "apply; set sft.packing: false")
    if dropout > 0:
        raise VarlenUnsupported(f"varlen attention: {name} asks for attention dropout {dropout:g} while training, "
                                "which the varlen kernel does not have; set train.base_dropout: false "
                                "(GPT-2's attention dropout) or sft.packing: false")
    if _kernel is None:
        raise VarlenUnsupported(no_kernel())
    batch, heads, width, dim = query.shape
    dtype = query.dtype
    if dtype not in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(query.device.type):
        # a custom op, unlike SDPA, is not cast by autocast: the kernel takes 16-bit inputs only
        dtype = torch.get_autocast_dtype(query.device.type)

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (batch, heads, width, dim) -> (batch x width, heads, dim)
        return x.transpose(1, 2).reshape(batch * width, x.shape[1], x.shape[3]).to(dtype)

    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    out = _kernel(tokens(query), tokens(key), tokens(value), cu_seq_lens_q, cu_seq_lens_k, max_length_q,
                  max_length_k, scaling, causal)
    return out.view(batch, width, heads, out.shape[-1]), None
