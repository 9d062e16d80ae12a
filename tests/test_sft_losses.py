"""sft through the chunked cross-entropy (lib/losses.py): for LoRA on a tiny Llama, packed rows
(position_ids restarting per example: SDPA's block mask on the CPU, or varlen attention's
cu_seq_lens through the reference kernel of test_sft_varlen.py) and padded rows give exactly the
loss and LoRA gradients of the model's own `model(**batch).loss`, training and scoring, and the
output layer never produces the full logits."""

from __future__ import annotations

import pytest
import torch
from sft_helpers import ROOT
from test_sft_varlen import CALLS, examples, packed_inputs, reference, tokenizer  # noqa: F401 (fixtures)

from stages.lib.losses import ChunkedCausalLM
from stages.lib.packing import VARLEN, collate_packed, collate_padded, pack_examples, prepare_for_packing
from stages.lib.params import Task
from stages.lib.tasks import Objective, response_scores
from stages.lib.tokenized import ChatTargets

MAX_LENGTH = 96
CPU = torch.device("cpu")
SFT = Task(type="sft", metric="loss", mlm_probability=0.15)
CHUNK = 7  # tokens per chunk of logits: several chunks per row, and chunks across rows


def lora_llama(attn: str = "sdpa"):
    """configs/tiny-llama, random-init in fp32, with LoRA on every linear layer (random B too,
    so every LoRA weight gets a gradient), set up for packed rows as train sets it up."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "configs" / "tiny-llama"),
                                             dtype=torch.float32, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    prepare_for_packing(model)  # use_cache off, and the probe: examples stay apart
    return model


class NoFullLogits:
    """Fails a test if the output layer runs as a module (what full logits take)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self.count)

    def count(self, *args) -> None:
        self.calls += 1


def loss_and_lora_grads(forward, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = forward(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


def assert_same(ours: tuple, theirs: tuple) -> None:
    (loss, grads), (reference_loss, reference_grads) = ours, theirs
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_sft_trains_through_the_chunked_loss() -> None:
    model = lora_llama()
    module = Objective(SFT).loss_module(model)
    assert isinstance(module, ChunkedCausalLM) and module.model is model


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_chunked_loss_and_lora_gradients_equal_the_models_own(examples, tokenizer, layout: str) -> None:  # noqa: F811
    """Packed: input_ids, labels and position_ids restarting per example, no attention_mask (SDPA
    builds the block mask from the positions); padded: one example per row and attention_mask."""
    input_ids, labels = examples
    pad_id = tokenizer.eos_token_id
    rows = pack_examples(input_ids, labels, MAX_LENGTH)
    batch = collate_packed(rows, pad_id) if layout == "packed" else collate_padded(input_ids, labels, pad_id)
    if layout == "packed":  # several examples per row, so the positions must keep them apart
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        assert any(len(r.cu_seqlens) > 2 for r in rows)
    model = lora_llama()
    reference_signal = loss_and_lora_grads(model, model, batch)
    guard = NoFullLogits(model)
    chunked = loss_and_lora_grads(ChunkedCausalLM(model, chunk_tokens=CHUNK), model, batch)
    assert guard.calls == 0
    assert_same(chunked, reference_signal)


def test_packed_and_padded_chunked_losses_are_the_same_examples(examples, tokenizer) -> None:  # noqa: F811
    """The chunked loss of packed rows equals that of the same examples padded: the positions
    reach the decoder (dropped, the examples would see each other and the loss would move)."""
    input_ids, labels = examples
    pad_id = tokenizer.eos_token_id
    model = lora_llama()
    module = ChunkedCausalLM(model, chunk_tokens=CHUNK)
    packed = loss_and_lora_grads(module, model, collate_packed(pack_examples(input_ids, labels, MAX_LENGTH), pad_id))
    padded = loss_and_lora_grads(module, model, collate_padded(input_ids, labels, pad_id))
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-6)
    for name in packed[1]:
        torch.testing.assert_close(packed[1][name], padded[1][name], rtol=1e-4, atol=1e-6)


def test_varlen_rows_through_the_chunked_loss(reference, examples, tokenizer) -> None:  # noqa: F811
    """Varlen attention (the reference kernel): cu_seq_lens_q/k and max_length_q/k reach every
    attention layer through the chunked module (without them the varlen layer refuses the call),
    with the loss and LoRA gradients of the model's own forward."""
    input_ids, labels = examples
    model = lora_llama(VARLEN)
    inputs = packed_inputs(input_ids, labels, tokenizer.eos_token_id)
    CALLS.clear()
    reference_signal = loss_and_lora_grads(model, model, inputs)
    layers = model.config.num_hidden_layers
    assert len(CALLS) == layers
    chunked = loss_and_lora_grads(Objective(SFT).loss_module(model), model, inputs)
    assert len(CALLS) == 2 * layers
    assert_same(chunked, reference_signal)


@pytest.mark.parametrize("packed", [True, False])
def test_response_scores_are_the_models_own_loss(examples, tokenizer, packed: bool) -> None:  # noqa: F811
    """Scoring (validation in train, the test split in evaluate) in batches through the chunked
    loss: the mean over all response tokens, as one call of the model's own loss over them all."""
    input_ids, labels = examples
    pad_id = tokenizer.eos_token_id
    model = lora_llama().eval()
    rows = pack_examples(input_ids, labels, MAX_LENGTH)
    split = (([r.input_ids for r in rows], ChatTargets([r.labels for r in rows], [r.position_ids for r in rows], None))
             if packed else (input_ids, ChatTargets(labels, None, None)))
    chats = Objective(SFT).examples(*split, pad_id, CPU, scoring=True)
    assert chats.packed == packed
    with torch.no_grad():
        expected = model(**collate_padded(input_ids, labels, pad_id)).loss.item()
    guard = NoFullLogits(model)
    scores = response_scores(model, chats, 2, CPU, torch.float32)
    assert guard.calls == 0
    assert scores["loss"] == pytest.approx(expected, rel=1e-5)
