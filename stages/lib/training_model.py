"""The model a training run trains: the base loaded in 4 bits with its task's head, prepared
for training, gradient checkpointing as train.gradient_checkpointing asks, LoRA attached.

Its own module so that the stages that only load a trained adapter (evaluate, export) do not
depend on the training-only parts (offloaded checkpointing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from stages.lib.offload import enable_offloaded_checkpointing
from stages.lib.params import OFFLOAD, Lora, Quant, Train, UserError
from stages.lib.quantized import attach_lora, checkpoint_every, load_base, prepare_for_training

log = logging.getLogger("qlora")


def build_model(base_dir: Path, labels: list[str], quant: Quant, lora: Lora, cfg: Train, task: str,
                device: torch.device, dtype: torch.dtype,
                prepare: Callable[[torch.nn.Module], None] | None = None, attn_implementation: str = "sdpa"):
    """The base, quantized and prepared for training (`prepare`: the task's own setup of the
    loaded base, Objective.prepare), with LoRA attached."""
    model = load_base(base_dir, labels, quant, lora.modules_to_save, device, dtype,
                      attn_implementation=attn_implementation, task=task)
    if prepare is not None:
        prepare(model)
    model = prepare_for_training(model, cfg.gradient_checkpointing, quant.cache_dequantized, cfg.base_dropout)
    if cfg.gradient_checkpointing == OFFLOAD:
        try:
            enable_offloaded_checkpointing(model)
        except ValueError:
            raise UserError(f"train.gradient_checkpointing: {OFFLOAD} needs transformers' checkpointing "
                            f"layers, which {type(model).__name__} lacks (use true)") from None
    if cfg.gradient_checkpointing and cfg.checkpoint_every_n_layers > 1:
        kept = checkpoint_every(model, cfg.checkpoint_every_n_layers)
        log.info("train.checkpoint_every_n_layers %d: %d decoder layers checkpointed, the others keep "
                 "their activations", cfg.checkpoint_every_n_layers, kept)
    return attach_lora(model, lora, task)
