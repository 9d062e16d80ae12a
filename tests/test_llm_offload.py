"""stages/lib/offload.py: offloaded checkpointing gives the gradients of plain training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.lib.offload import enable_offloaded_checkpointing

ROOT = Path(__file__).resolve().parent.parent


def _grads(offload: bool, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "configs/tiny-llama"),
                                             dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    model.train()
    if offload:
        model.enable_input_require_grads()
        assert enable_offloaded_checkpointing(model) == 2
    ids = torch.randint(0, 4096, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    if offload:
        assert _graph_nodes(loss).count("_OffloadedCheckpointBackward") == 2  # both layers went through it
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _graph_nodes(loss: torch.Tensor) -> list[str]:
    seen, names, todo = set(), [], [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("autocast", [False, True])
def test_same_loss_and_gradients(autocast: bool) -> None:
    loss, grads = _grads(False, autocast)
    loss_offloaded, grads_offloaded = _grads(True, autocast)
    torch.testing.assert_close(loss_offloaded, loss)
    assert len(grads) == len(grads_offloaded) == 2 * 7 * 2
    for a, b in zip(grads_offloaded, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_refuses_a_model_without_checkpointing_layers() -> None:
    with pytest.raises(ValueError, match="no transformers GradientCheckpointingLayer"):
        enable_offloaded_checkpointing(torch.nn.Linear(2, 2))
