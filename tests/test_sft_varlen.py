"""Varlen attention for packed rows (lib/varlen_attention.py), on the CPU: the CUDA kernel is
replaced by a reference with its signature (causal SDPA per segment of cu_seqlens, which checks
its arguments and counts its calls), so every test here fails if the plumbing around the kernel
is wrong: the name registered with transformers, no mask built, the boundaries passed from the
batch through the model (and PEFT, and the training loop) to each attention layer, the flattened
layout, GQA, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from sft_helpers import stand_in_decoder, stand_in_tokenizer, tiny_llama

from stages.lib import varlen_attention
from stages.lib.chat_template import encode_conversations, labels_from_mask
from stages.lib.distributed import Processes
from stages.lib.loop import NullLive, TrainingLoop
from stages.lib.packing import (VARLEN, ChatTokens, attends_across_examples, collate_packed, collate_padded,
                                pack_examples, prepare_for_packing, varlen_kwargs)
from stages.lib.params import Lora, Task, Train, UserError
from stages.lib.quantized import attach_lora
from stages.lib.tasks import Objective
from stages.lib.tokenized import ChatTargets
from stages.lib.varlen_attention import Kernel, VarlenUnsupported

MAX_LENGTH = 96
CPU = torch.device("cpu")
SFT = Task(type="sft", metric="loss", mlm_probability=0.15)


def segment_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, causal, enable_gqa):
    """What varlen_attn computes: SDPA within each segment, on (tokens, heads, dim) inputs; with
    the checks a wrong caller would fail."""
    assert causal, "varlen attention of a decoder must be causal"
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    assert int(cu_seq_q[0]) == 0 and int(cu_seq_q[-1]) == query.shape[0] == key.shape[0]
    assert max_q == max_k == int(cu_seq_q.diff().max())
    assert enable_gqa or key.shape[1] == query.shape[1], "GQA heads must be repeated for a kernel without enable_gqa"
    bounds = cu_seq_q.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1), is_causal=True,
        scale=scale, enable_gqa=enable_gqa).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])])


CALLS: list[torch.dtype] = []  # the query dtype of each kernel call


def torch_2_13_style(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    CALLS.append(query.dtype)
    return segment_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale,
                             tuple(window_size) == (-1, 0), enable_gqa)


def torch_2_11_style(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    CALLS.append(query.dtype)
    return segment_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale,
                             tuple(window_size) == (-1, 0), False)


def is_causal_style(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
    CALLS.append(query.dtype)
    return segment_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, is_causal, False)


STYLES = {"torch-2.13": torch_2_13_style, "torch-2.11": torch_2_11_style, "is_causal": is_causal_style}


@pytest.fixture(params=sorted(STYLES))
def kernel(request, monkeypatch) -> str:
    """varlen attention registered, its kernel the reference in one torch version's signature."""
    varlen_attention.register()
    monkeypatch.setattr(varlen_attention, "_kernel", Kernel.wrap(STYLES[request.param]))
    CALLS.clear()
    return request.param


@pytest.fixture
def reference(monkeypatch) -> None:
    """The same, in torch 2.13's signature only."""
    varlen_attention.register()
    monkeypatch.setattr(varlen_attention, "_kernel", Kernel.wrap(torch_2_13_style))
    CALLS.clear()


@pytest.fixture(scope="module")
def tokenizer():
    return stand_in_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """input_ids and assistant-only labels of chats of assorted lengths."""
    chats = [[{"role": "user", "content": "what is " + "very " * k + "odd?"},
              {"role": "assistant", "content": f"answer number {k}"}] for k in (0, 9, 21, 4, 14, 30, 2)]
    encoded = encode_conversations(tokenizer, chats, MAX_LENGTH, "test")
    return encoded.input_ids, [labels_from_mask(i, m, False) for i, m in zip(encoded.input_ids,
                                                                             encoded.assistant_masks)]


def packed_inputs(input_ids, labels, pad_id: int) -> dict:
    rows = pack_examples(input_ids, labels, MAX_LENGTH)
    assert len(rows) > 1 and len({len(r.input_ids) for r in rows}) > 1  # several rows, one padded
    return {**collate_packed(rows, pad_id), **varlen_kwargs(rows)}


def named(name: str):
    """assert_close's message with the parameter's name in front."""
    return lambda message: f"{name}: {message}"


def loss_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(model, input_ids, labels, pad_id: int, recomputed: bool = False) -> None:
    """Packed rows under varlen attention give the loss and every gradient of the same examples
    padded one per row under SDPA."""
    model.config.use_cache = False
    model.set_attn_implementation(VARLEN)
    packed, packed_grads = loss_and_grads(model, packed_inputs(input_ids, labels, pad_id))
    calls = len(CALLS)
    # one kernel call per attention layer, and one more per layer recomputed for the backward pass
    assert calls == model.config.num_hidden_layers * (2 if recomputed else 1)
    model.set_attn_implementation("sdpa")
    padded, padded_grads = loss_and_grads(model, collate_padded(input_ids, labels, pad_id))
    assert len(CALLS) == calls  # SDPA does not go through the kernel
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) == len(list(model.parameters()))
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=named(name))


def test_llama_packed_varlen_trains_like_padded_sdpa(kernel, examples, tokenizer) -> None:
    """Grouped-query attention (4 heads, 2 kv heads): enable_gqa on 2.13's kernel, repeated heads else."""
    input_ids, labels = examples
    assert_same_training_signal(tiny_llama(len(tokenizer)), input_ids, labels, tokenizer.eos_token_id)


def test_gradient_checkpointing_passes_the_boundaries_on(reference, examples, tokenizer) -> None:
    """Recomputed layers (the GPU presets checkpoint) get cu_seq_lens again in the backward pass."""
    input_ids, labels = examples
    model = tiny_llama(len(tokenizer))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert_same_training_signal(model, input_ids, labels, tokenizer.eos_token_id, recomputed=True)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-opt"])
def test_gpt2_and_opt_packed_varlen_train_like_padded_sdpa(reference, examples, tokenizer, name: str) -> None:
    """OPT too: with SDPA its packed examples see each other (it builds no mask from
    position_ids, test_sft_packing.py), but its attention layers take cu_seq_lens."""
    input_ids, labels = examples
    model = stand_in_decoder(name)
    assert_same_training_signal(model, input_ids, labels, tokenizer.eos_token_id)
    model.set_attn_implementation(VARLEN)
    prepare_for_packing(model)


def test_varlen_builds_no_mask(reference, examples, tokenizer, monkeypatch) -> None:
    """Its mask function returns nothing, and the attention layers receive no mask: the packed
    rows' boundaries come only as cu_seq_lens."""
    from transformers import AttentionInterface, AttentionMaskInterface

    assert AttentionMaskInterface._global_mapping[VARLEN](batch_size=2, q_length=8, kv_length=8) is None
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs["cu_seq_lens_q"]))
        return varlen_attention.varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN, spy)
    input_ids, labels = examples
    model = tiny_llama(len(tokenizer), VARLEN)
    prepare_for_packing(model)
    seen.clear()
    inputs = packed_inputs(input_ids, labels, tokenizer.eos_token_id)
    with torch.no_grad():
        model(**inputs)
    assert len(seen) == 2 and all(mask is None and cu is inputs["cu_seq_lens_q"] for mask, cu in seen)


def test_the_probe_runs_varlen_with_its_boundaries(reference, tokenizer) -> None:
    """prepare_for_packing probes a varlen model with cu_seq_lens, through the kernel."""
    model = tiny_llama(len(tokenizer), VARLEN)
    prepare_for_packing(model)
    assert CALLS and not attends_across_examples(model)


def test_varlen_that_attends_across_examples_is_refused(tokenizer, monkeypatch) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    varlen_attention.register()
    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN, sdpa_attention_forward)
    model = tiny_llama(len(tokenizer), VARLEN)
    with pytest.raises(UserError, match=r"^sft\.packing: llama with varlen attention lets packed examples attend "
                                        r"to each other \(transformers \S+ does not run its attention layers "
                                        r"through the registered varlen function\); set sft\.packing: false$"):
        prepare_for_packing(model)


class DropsBoundaries(torch.nn.Module):
    """A causal LM whose forward does not hand extra keyword arguments on to its layers."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, attention_mask=None, **kwargs):
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)


def test_a_model_that_drops_the_boundaries_is_refused_in_one_line(reference, tokenizer) -> None:
    with pytest.raises(UserError, match=r"^varlen attention: LlamaAttention was called without cu_seq_lens_q/k "
                                        r"and max_length_q/k \(.*\); set sft\.packing: false$") as error:
        prepare_for_packing(DropsBoundaries(tiny_llama(len(tokenizer), VARLEN)))
    assert "\n" not in str(error.value)


def test_attention_dropout_is_refused_in_one_line(reference, examples, tokenizer) -> None:
    """The kernel has no dropout: GPT-2 training with attn_pdrop 0.1 stops instead of silently
    training without it."""
    input_ids, labels = examples
    model = stand_in_decoder("tiny-gpt2", VARLEN).train()
    with pytest.raises(VarlenUnsupported, match=r"^varlen attention: GPT2Attention asks for attention dropout 0\.1 "
                                                r"while training, .*; set train\.base_dropout: false .*$"):
        model(**packed_inputs(input_ids, labels, tokenizer.eos_token_id))


def test_a_padding_mask_or_a_cache_is_refused(reference, examples, tokenizer) -> None:
    model = tiny_llama(len(tokenizer), VARLEN)
    input_ids, labels = examples
    inputs = packed_inputs(input_ids, labels, tokenizer.eos_token_id)
    with pytest.raises(VarlenUnsupported, match=r"^varlen attention: LlamaAttention was given an attention mask"):
        model(**inputs, attention_mask=torch.ones_like(inputs["input_ids"])[:, None, None, :].bool())
    four = varlen_kwargs(pack_examples([input_ids[0][:4]], [labels[0][:4]], MAX_LENGTH))
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([input_ids[0][:4]]), use_cache=True, **four).past_key_values
        with pytest.raises(VarlenUnsupported, match=r": LlamaAttention has 8 keys for 4 queries \(a KV cache: use "
                                                    r"SDPA to generate\)$"):
            model(input_ids=torch.tensor([input_ids[0][4:8]]), past_key_values=cache, use_cache=True, **four)


def test_selection_falls_back_to_sdpa_where_varlen_cannot_run(monkeypatch, caplog) -> None:
    caplog.set_level("INFO", logger="qlora")
    assert varlen_attention.packed_attention(CPU, torch.float32) == "sdpa"
    assert "packed rows: sdpa attention with a block mask (varlen attention needs a CUDA GPU; this run is on " \
           "the cpu)" in caplog.text
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    monkeypatch.setattr(varlen_attention, "_kernel", Kernel.wrap(torch_2_13_style))
    assert varlen_attention.packed_attention(cuda, torch.bfloat16) == VARLEN
    assert "packed rows: varlen attention (no mask)" in caplog.text
    assert varlen_attention.unavailable(cuda, torch.float32) == "varlen attention runs in bf16 or fp16, not float32"
    monkeypatch.setattr(varlen_attention, "_kernel", None)
    monkeypatch.setattr(varlen_attention, "installed_kernel", lambda: None)
    assert varlen_attention.packed_attention(cuda, torch.bfloat16) == "sdpa"
    with pytest.raises(UserError, match=rf"^torch {re.escape(torch.__version__)} has no "
                                        r"torch\.nn\.attention\.varlen\.varlen_attn; varlen attention needs "
                                        r"torch 2\.10 or later$"):
        varlen_attention.require(cuda, torch.bfloat16)
    with pytest.raises(UserError, match=r"^varlen attention needs a CUDA GPU; this run is on the cpu$"):
        varlen_attention.require(CPU, torch.bfloat16)


def test_installed_kernel_signature_is_understood() -> None:
    """This torch's own varlen_attn (2.13 here; 2.11 on the GPU image) wraps: causality by
    window_size, GQA by enable_gqa where it has it."""
    installed = varlen_attention.installed_kernel()
    assert installed is not None and installed.causal_by == "window_size"
    assert Kernel.wrap(torch_2_11_style) == Kernel(torch_2_11_style, "window_size", False)
    assert Kernel.wrap(is_causal_style) == Kernel(is_causal_style, "is_causal", False)


def test_autocast_feeds_the_kernel_16_bit_inputs(reference) -> None:
    """varlen_attn is a custom op autocast does not cast (SDPA is): fp32 queries, as rotary
    embeddings leave them in an fp32 model under bf16 autocast, go in as bf16."""
    module = torch.nn.Module()
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = varlen_attention.varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu,
                                                                 cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    assert CALLS == [torch.bfloat16] and weights is None and out.shape == (2, 6, 4, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_chat_tokens_carry_the_boundaries_only_for_varlen(examples, tokenizer) -> None:
    input_ids, labels = examples
    rows = pack_examples(input_ids, labels, MAX_LENGTH)
    columns = ([r.input_ids for r in rows], [r.labels for r in rows], [r.position_ids for r in rows])
    batch = ChatTokens(*columns, tokenizer.eos_token_id, CPU, varlen=True).batch(range(len(rows)))
    assert batch["cu_seq_lens_q"].tolist() == varlen_kwargs(rows)["cu_seq_lens_q"].tolist()
    assert isinstance(batch["max_length_q"], int) and "attention_mask" not in batch
    assert "cu_seq_lens_q" not in ChatTokens(*columns, tokenizer.eos_token_id, CPU).batch(range(len(rows)))
    unpacked = ChatTokens(input_ids, labels, None, tokenizer.eos_token_id, CPU, varlen=True)
    assert "cu_seq_lens_q" not in unpacked.batch([0, 1]) and not unpacked.varlen


CFG = Train(seed=0, epochs=1, lr=1e-2, batch_size=2, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0,
            max_steps=3, eval_every_steps=0, log_every_steps=1, checkpoint_every_steps=0, group_by_length=False,
            gradient_checkpointing=False, checkpoint_every_n_layers=1, base_dropout=False, compile=False, processes=1, device="auto",
            gradient_accumulation_steps=1, optimizer="adamw")
LORA = Lora(r=4, alpha=8, dropout=0.0, target_modules="all-linear", modules_to_save=[])


def train_packed(attn: str, input_ids, labels, pad_id: int, vocab: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The training loop on packed rows of LoRA on a tiny Llama, through Objective.prepare (the
    probe) as train.py builds it; the trained weights and the summary."""
    rows = pack_examples(input_ids, labels, 80)
    targets = ChatTargets([r.labels for r in rows], [r.position_ids for r in rows], None)
    data = {"train": ([r.input_ids for r in rows], targets), "validation": ([r.input_ids for r in rows], targets)}
    objective = Objective(SFT)
    model = tiny_llama(vocab, attn)
    objective.prepare(model, packed=True)
    assert objective.varlen == (attn == VARLEN)
    torch.manual_seed(0)
    model = attach_lora(model, LORA, "sft")
    summary = TrainingLoop(model, data, pad_id, 0, CFG, objective, NullLive(), CPU, torch.float32, None,
                           Processes()).run()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, summary


def test_training_loop_on_packed_rows_with_varlen_ends_where_sdpa_ends(reference, examples, tokenizer) -> None:
    """Through peft and the loop (batches from ChatTokens, validation scores): the same weights
    and validation loss as SDPA's block mask."""
    input_ids, labels = examples
    varlen, varlen_summary = train_packed(VARLEN, input_ids, labels, tokenizer.eos_token_id, len(tokenizer))
    assert len(CALLS) > 3 * 2
    sdpa, sdpa_summary = train_packed("sdpa", input_ids, labels, tokenizer.eos_token_id, len(tokenizer))
    assert varlen.keys() == sdpa.keys()
    for name in varlen:  # AdamW's first steps magnify float rounding of near-zero gradients: 1e-5
        torch.testing.assert_close(varlen[name], sdpa[name], rtol=1e-3, atol=1e-5, msg=named(name))
    assert varlen_summary["best_val_loss"] == pytest.approx(sdpa_summary["best_val_loss"], rel=1e-5)


def test_kernel_wrap_rejects_a_function_without_causality() -> None:
    with pytest.raises(ValueError, match="neither window_size nor is_causal"):
        Kernel.wrap(lambda q, k, v, cu_q, cu_k, max_q, max_k: q)
    assert dataclasses.is_dataclass(Kernel)
