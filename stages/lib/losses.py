"""Causal-LM cross-entropy without the full `tokens × vocab` fp32 logits.

A Llama-3 vocabulary has 128,256 entries: the fp32 logits of 2 × 2,048 tokens alone are 2 GiB,
and at 64k tokens of context 31 GiB, more than the rest of a QLoRA step. Here the output layer
and the loss run together over chunks of tokens: each chunk's logits exist (in the compute dtype,
then fp32) only while that chunk's loss and gradients are computed, in the forward pass. The
backward pass then only scales the stored gradients (the input-sized gradient of the hidden
states and, when the head trains, the head-sized one), so nothing is recomputed. This is the
fused linear cross-entropy of Liger-Kernel and unsloth, written with plain torch ops.

The numbers are Hugging Face's: logits = hidden · Wᵀ in the compute dtype, upcast to fp32, the
loss summed over predicted tokens (label −100 ignored) and divided by their count, or by
`num_items` (transformers' `num_items_in_batch`: the predicted tokens of a whole accumulated
optimizer step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of CE(hidden · weightᵀ, labels) / denominator, gradients computed in
    the forward pass chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                denominator: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        compute = hidden.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            scale = 1.0 / denominator.to(torch.float32)
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start:start + chunk_tokens]
                y = labels[start:start + chunk_tokens]
                valid = y != IGNORE_INDEX
                target = torch.where(valid, y, 0)
                logits = (h @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                total += torch.where(valid, lse - picked, 0.0).sum()
                if need_hidden or need_weight:
                    # d(sum of losses)/d logits = softmax − one-hot, zero on ignored rows
                    grad_logits = logits.sub_(lse[:, None]).exp_()
                    grad_logits[torch.arange(len(y), device=y.device), target] -= 1.0
                    grad_logits.mul_((valid.to(torch.float32) * scale)[:, None])
                    grad_logits = grad_logits.to(compute)
                    if need_hidden:
                        grad_hidden[start:start + chunk_tokens] = grad_logits @ w
                    if need_weight:
                        grad_weight += (grad_logits.T @ h).float()
                del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items: int | torch.Tensor | None = None, chunk_tokens: int = 1024) -> torch.Tensor:
    """Cross-entropy of `hidden` (tokens × hidden) through an output layer `weight` (vocab ×
    hidden, no bias) against `labels` (tokens; −100 ignored): the mean over labelled tokens, or
    the sum divided by `num_items`. At most `chunk_tokens` rows of logits exist at a time."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (tokens, hidden) and labels (tokens,), got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the head's matmul runs where autocast would run it
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    if num_items is None:
        denominator = (labels != IGNORE_INDEX).sum()
    else:
        denominator = torch.as_tensor(num_items, device=hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, labels, denominator, chunk_tokens)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   num_items: int | torch.Tensor | None = None, chunk_tokens: int = 1024) -> torch.Tensor:
    """Next-token loss of decoder hidden states (batch, length, hidden) against `labels`
    (batch, length), shifted as transformers' ForCausalLMLoss shifts them: position t predicts
    label t+1, and the last position predicts nothing."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shifted.reshape(-1).to(hidden.device),
                                num_items, chunk_tokens)


def output_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The decoder body (hidden states out) and plain output Linear of a causal LM, or of a peft
    model wrapping one. Models whose logits are more than hidden · Wᵀ (a bias, soft-capping,
    a logit scale) are refused: the chunked loss would compute something else."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    config = base.config
    extra = [k for k in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
             if getattr(config, k, None) not in (None, 1.0)]
    if body is None or type(head) is not torch.nn.Linear or head.bias is not None or extra:
        raise ValueError(f"chunked loss: {type(base).__name__} has no plain bias-free Linear output layer "
                         f"over its decoder ({type(head).__name__}; {', '.join(extra) or 'no logit transforms'})")
    return body, head


# Tokens per chunk of logits in the pipeline's loop and scoring: 1,024 × a 128k vocabulary is
# 0.5 GiB of fp32 logits at a time, and the matmuls stay large enough to run at full speed.
CHUNK_TOKENS = 1024


class ChunkedCausalLM(torch.nn.Module):
    """A causal LM (or peft model of one) whose forward returns only the chunked loss: what the
    training loop calls for causal-lm and sft (DDP wraps this module, so its gradients are
    averaged as the model's). It takes the batches the model itself would: token blocks, padded
    rows (attention_mask) and packed rows (position_ids restarting per example, and with varlen
    attention cu_seq_lens_q/k and max_length_q/k)."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = CHUNK_TOKENS):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                num_items: int | torch.Tensor | None = None, **attention_kwargs: Any) -> Any:
        """`num_items`: divide the summed loss by it (a whole optimizer step's predicted tokens)
        instead of taking the mean over this batch's. `attention_kwargs` go to the decoder as
        they would through the model's own forward (varlen's example boundaries)."""
        from transformers.modeling_outputs import CausalLMOutput

        loss = chunked_causal_lm_loss(self.model, input_ids, labels, attention_mask, position_ids=position_ids,
                                      num_items=num_items, chunk_tokens=self.chunk_tokens, **attention_kwargs)
        return CausalLMOutput(loss=loss)


def chunked_causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                           attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                           num_items: int | torch.Tensor | None = None, chunk_tokens: int = 1024,
                           **attention_kwargs: Any) -> torch.Tensor:
    """`model(input_ids, labels=labels, attention_mask=..., position_ids=..., **attention_kwargs).loss`
    for a causal LM (or a peft model of one), without the model ever producing full logits.
    position_ids and attention_kwargs reach the decoder unchanged, so packed rows attend within
    their examples exactly as under the model's own forward (SDPA's block mask built from the
    restarting position_ids, or varlen attention's cu_seq_lens)."""
    body, head = output_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  **attention_kwargs).last_hidden_state
    return causal_lm_loss(hidden, head.weight, labels, num_items, chunk_tokens)
