"""A 4-bit base layer and its LoRA adapter as one autograd function, for training.

peft's LoRA on a bitsandbytes Linear4bit runs the base matmul (bitsandbytes dequantizes the NF4
weight, multiplies, and keeps what its backward needs), clones the result, then runs the two
adapter matmuls as separate autograd nodes, each saving its own input. Here one function computes
    y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (+ bias)
with W dequantized into the compute dtype for the call and dropped right after; it saves x and
the rank-wide x·Aᵀ (never W), and dequantizes W again in the backward pass for the input
gradient. Gradients flow to x, A and B; the base stays frozen. Only plain LoRA is fused: no
dropout (p = 0), one active adapter, not merged, no DoRA or other variants; other layers keep
peft's forward.
"""

from __future__ import annotations

from typing import Any

import torch


def _dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W in `dtype`, dequantized straight into it (as bitsandbytes' own matmul does), not via
    the dtype the weight was quantized from."""
    import copy

    import bitsandbytes.functional as F

    state = copy.copy(weight.quant_state)  # shallow: shares absmax and code
    state.dtype = dtype
    return F.dequantize_4bit(weight.data, state)


class _Lora4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        xc = x.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        xa = xc @ a.T
        out = xc @ _dequantized(weight, dtype).T
        out.add_(xa @ b.T, alpha=scaling)
        if bias is not None:
            out.add_(bias.to(dtype))
        ctx.save_for_backward(xc, xa, lora_a, lora_b)
        ctx.weight, ctx.scaling, ctx.dtype, ctx.x_dtype = weight, scaling, dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        xc, xa, lora_a, lora_b = ctx.saved_tensors
        dtype, scaling = ctx.dtype, ctx.scaling
        g = grad_out.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        flat_g, flat_x, flat_xa = g.reshape(-1, g.shape[-1]), xc.reshape(-1, xc.shape[-1]), xa.reshape(-1, xa.shape[-1])
        grad_b = (flat_g.T @ flat_xa).mul_(scaling) if lora_b.requires_grad else None
        g_xa = (g @ b).mul_(scaling)
        grad_a = g_xa.reshape(-1, g_xa.shape[-1]).T @ flat_x if lora_a.requires_grad else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _dequantized(ctx.weight, dtype)).add_(g_xa @ a).to(ctx.x_dtype)
        return (grad_x, None, None, None if grad_a is None else grad_a.to(lora_a.dtype),
                None if grad_b is None else grad_b.to(lora_b.dtype), None, None)


def lora_4bit_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """x·Wᵀ + scaling·(x·Aᵀ)·Bᵀ + bias in `dtype`, W a bitsandbytes Params4bit (kept 4-bit)."""
    return _Lora4bit.apply(x, weight, bias, lora_a, lora_b, scaling, dtype)


def _fused_forward(layer: torch.nn.Module):
    peft_forward = layer.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None or len(adapters) != 1 \
                or adapters[0] in getattr(layer, "lora_variant", {}) \
                or getattr(layer.lora_dropout[adapters[0]], "p", 0.0) != 0.0:
            return peft_forward(x, *args, **kwargs)
        name = adapters[0]
        base = layer.base_layer
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) \
            else base.compute_dtype or x.dtype
        out = lora_4bit_linear(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                               layer.scaling[name], dtype)
        return out.to(x.dtype)  # bitsandbytes' Linear4bit returns its input's dtype, autocast or not

    return forward


def fuse_lora_4bit(model: torch.nn.Module) -> int:
    """Give every peft LoRA layer over a bitsandbytes Linear4bit the fused forward (falling back
    to peft's where the layer is not plain LoRA); returns how many layers."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit):
            module.forward = _fused_forward(module)
            count += 1
    return count
