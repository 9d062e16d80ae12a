"""Gradient checkpointing whose saved layer inputs wait in host memory.

With gradient checkpointing a decoder keeps one tensor per layer for the backward pass: the
layer's input (tokens × hidden in bf16; at 256k tokens of an 8B model 2 GiB per layer, 64 GiB
for 32 layers). Here each layer's input is copied to pinned host memory as the forward pass
leaves the layer, and copied back when the backward pass reaches it, then the layer is
recomputed with gradients (unsloth's "offloaded gradient checkpointing"). The copies are
asynchronous on the compute stream, so their cost is the PCIe time of the hidden states, small
beside a layer's matmuls. GPU memory then holds only the layer being recomputed.

It plugs into transformers' own checkpointing hook (`GradientCheckpointingLayer`, whose
`_gradient_checkpointing_func(function, *args)` is called with the layer's bound forward and
its positional inputs, hidden states first), so the model code is unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, function: Callable, hidden: torch.Tensor, *rest: Any) -> Any:
        ctx.function, ctx.rest, ctx.device = function, rest, hidden.device
        ctx.autocast = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
                        for t in ("cuda", "cpu")]
        saved = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=hidden.is_cuda)
        saved.copy_(hidden, non_blocking=True)
        ctx.saved = saved
        with torch.no_grad():
            return function(hidden, *rest)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        hidden = ctx.saved.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.saved = None
        with torch.enable_grad(), _autocast(ctx.autocast):
            outputs = ctx.function(hidden, *ctx.rest)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, hidden.grad, *(None for _ in ctx.rest))


class _autocast:
    """Re-enter the forward pass's autocast state for the recomputation."""

    def __init__(self, states: list[tuple[str, bool, torch.dtype]]) -> None:
        self.contexts = [torch.autocast(t, dtype=d, enabled=e) for t, e, d in states]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def offloaded_checkpoint(function: Callable, *args: Any) -> Any:
    """Run `function(*args)` without keeping its activations; keep `args[0]` in host memory and
    recompute in the backward pass."""
    return _OffloadedCheckpoint.apply(function, *args)


def enable_offloaded_checkpointing(model: torch.nn.Module) -> int:
    """Switch every transformers checkpointing layer of `model` (a peft model too) to offloaded
    checkpointing; returns how many. The model's input embeddings must produce tensors that
    require grad (prepare_for_training with gradient checkpointing sets that up)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformers GradientCheckpointingLayer to offload")
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = offloaded_checkpoint
    return len(layers)
