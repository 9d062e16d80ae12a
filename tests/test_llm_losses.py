"""stages/lib/losses.py: the chunked loss equals the plain one, values and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.lib.losses import causal_lm_loss, chunked_causal_lm_loss, linear_cross_entropy, output_head

ROOT = Path(__file__).resolve().parent.parent


def _plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items=None) -> torch.Tensor:
    """Hugging Face's way: full logits in the compute dtype, upcast, cross-entropy."""
    logits = (hidden @ weight.to(hidden.dtype).T).float()
    if num_items is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items


def _inputs(dtype: torch.dtype, weight_grad: bool, tokens: int = 37, hidden: int = 16, vocab: int = 50):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(vocab, hidden, generator=g)).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::5] = -100
    return h, w, labels


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [t for t in tensors if t.requires_grad]))


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("num_items", [None, 50])
def test_equals_plain_loss_fp32(chunk: int, weight_grad: bool, num_items) -> None:
    h, w, labels = _inputs(torch.float32, weight_grad)
    plain = _plain(h, w, labels, num_items)
    chunked = linear_cross_entropy(h, w, labels, num_items=num_items, chunk_tokens=chunk)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(chunked * 3.0, h, w), _grads(plain * 3.0, h, w), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_equals_plain_loss_bf16_with_fp32_head() -> None:
    """bf16 activations and an fp32 trainable head (as upcast_trainable leaves it): the head's
    matmul runs in bf16 in both, gradients agree to bf16 rounding."""
    h, w, labels = _inputs(torch.bfloat16, False)
    w = w.detach().float().requires_grad_()
    plain, chunked = _plain(h, w, labels), linear_cross_entropy(h, w, labels, chunk_tokens=8)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(chunked, h, w), _grads(plain, h, w), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_no_gradient_work_without_grad() -> None:
    h, w, labels = _inputs(torch.float32, False)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, chunk_tokens=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _plain(h, w, labels).detach())


def test_all_ignored_is_nan_like_plain() -> None:
    h, w, labels = _inputs(torch.float32, False)
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, labels)) and torch.isnan(_plain(h, w, labels))


def test_causal_lm_matches_transformers_on_tiny_llama() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "configs/tiny-llama"),
                                             dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    ids = torch.randint(0, 4096, (2, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, :3] = -100
    reference = model(input_ids=ids, labels=labels).loss
    ref_grads = torch.autograd.grad(reference, [p for p in model.parameters() if p.requires_grad])
    ours = chunked_causal_lm_loss(model, ids, labels, chunk_tokens=5)
    grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # num_items: the sum over the step's predicted tokens divided by a given count
    body, head = output_head(model)
    hidden = body(input_ids=ids).last_hidden_state
    torch.testing.assert_close(causal_lm_loss(hidden, head.weight, labels, num_items=40),
                               model(input_ids=ids, labels=labels, num_items_in_batch=40).loss, rtol=1e-5, atol=1e-6)


def test_refuses_a_head_it_cannot_fuse() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "configs/tiny-llama"))
    model.lm_head = torch.nn.Linear(64, 4096, bias=True)
    with pytest.raises(ValueError, match="no plain bias-free Linear"):
        output_head(model)


def test_autocast_runs_the_head_in_the_autocast_dtype() -> None:
    h, w, labels = _inputs(torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = linear_cross_entropy(h, w, labels, chunk_tokens=8)
        plain = F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100)  # autocast: bf16 matmul
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(chunked, h, w), _grads(plain, h, w), strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)

def test_a_short_batch_filled_up_has_the_loss_and_gradients_of_its_own_blocks() -> None:
    """TokenBlocks.batch(indices, rows): the training loop fills a short last batch up to the usual
    micro-batch when the model is compiled (one shape, no recompilation); the added rows carry
    no labels, so the loss and the LoRA gradients are those of the real blocks alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.lib.batches import TokenBlocks

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "configs/tiny-llama"),
                                             dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    blocks = TokenBlocks(torch.randint(0, 4096, (5, 9), generator=torch.Generator().manual_seed(2)).tolist(),
                         torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    alone, filled = blocks.batch([3]), blocks.batch([3], rows=4)
    assert filled["input_ids"].shape == (4, 9) and (filled["labels"][1:] == -100).all()
    assert torch.equal(filled["labels"][0], alone["labels"][0])
    losses, grads = [], []
    for batch in (alone, filled):
        loss = chunked_causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, trainable))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert blocks.batch([0, 1], rows=2)["input_ids"].shape == (2, 9)  # a full batch is left as it is
