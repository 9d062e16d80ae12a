"""Packing: rows, positions and boundaries; a packed batch scores like the same examples padded."""

from __future__ import annotations

import pytest
import torch
from sft_helpers import stand_in_decoder, stand_in_tokenizer, tiny_llama

from stages.lib.chat_template import IGNORE_INDEX, encode_conversations, labels_from_mask
from stages.lib.packing import (attends_across_examples, collate_packed, collate_padded, pack_bins,
                                pack_examples, prepare_for_packing, varlen_kwargs)
from stages.lib.params import UserError

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def tokenizer():
    return stand_in_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """input_ids, assistant-only labels and all-token labels of chats of assorted lengths, one
    with two assistant turns."""
    chats = [[{"role": "user", "content": "what is " + "very " * k + "odd?"},
              {"role": "assistant", "content": f"answer number {k}"}] for k in (0, 9, 21, 4, 14, 30)]
    chats.append([{"role": "system", "content": "Short answers."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Goodbye"}])
    encoded = encode_conversations(tokenizer, chats, MAX_LENGTH, "test")
    pairs = list(zip(encoded.input_ids, encoded.assistant_masks))
    return (encoded.input_ids, [labels_from_mask(i, m, False) for i, m in pairs],
            [labels_from_mask(i, m, True) for i, m in pairs])


def test_best_fit_decreasing_is_deterministic_and_fits() -> None:
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    bins = pack_bins(lengths, 10)
    assert bins == pack_bins(lengths, 10)
    assert bins == [[1, 6], [5, 4], [3, 2], [0, 7]]  # 9+1, 8+2, 7+3, 5+4
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert pack_bins([10, 10], 10) == [[0], [1]]
    with pytest.raises(ValueError):
        pack_bins([11], 10)


def test_rows_restart_positions_and_mark_boundaries(examples) -> None:
    input_ids, labels, _ = examples
    rows = pack_examples(input_ids, labels, MAX_LENGTH)
    assert len(rows) < len(input_ids)
    seen = []
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) == row.cu_seqlens[-1] <= MAX_LENGTH
        for start, end in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:]):
            assert row.position_ids[start:end] == list(range(end - start))
            assert row.labels[start] == IGNORE_INDEX
            seen.append(row.input_ids[start:end])
    assert sorted(seen) == sorted(input_ids)


def test_collated_padding_is_an_example_of_its_own(examples, tokenizer) -> None:
    input_ids, labels, _ = examples
    rows = pack_examples(input_ids, labels, MAX_LENGTH)
    batch = collate_packed(rows, tokenizer.eos_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: it would undo packing
    width = batch["input_ids"].shape[1]
    short = min(range(len(rows)), key=lambda k: len(rows[k].input_ids))
    n = len(rows[short].input_ids)
    assert batch["position_ids"][short, n:].tolist() == list(range(width - n))
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    kwargs = varlen_kwargs(rows)
    lengths = kwargs["cu_seq_lens_q"].diff().tolist()
    assert kwargs["cu_seq_lens_q"][-1] == len(rows) * width and kwargs["max_length_q"] == max(lengths)
    # every example, and every row's padding, is one segment in the flattened batch
    assert len(lengths) == sum(len(r.cu_seqlens) - 1 for r in rows) + sum(len(r.input_ids) < width for r in rows)


def packed_and_padded_loss(model, input_ids, labels, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        packed = model(**collate_packed(pack_examples(input_ids, labels, MAX_LENGTH), pad_id), use_cache=False).loss
        padded = model(**collate_padded(input_ids, labels, pad_id), use_cache=False).loss
    return packed, padded


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_loss_equals_padded_loss_llama(examples, tokenizer, attn: str, train_on_prompt: bool) -> None:
    input_ids, assistant_labels, all_labels = examples
    model = tiny_llama(len(tokenizer), attn)
    labels = all_labels if train_on_prompt else assistant_labels
    packed, padded = packed_and_padded_loss(model, input_ids, labels, tokenizer.eos_token_id)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    prepare_for_packing(model)
    assert not attends_across_examples(model)


def test_packed_gradients_equal_padded_gradients_llama(examples, tokenizer) -> None:
    input_ids, labels, _ = examples
    grads = []
    for batch in (collate_packed(pack_examples(input_ids, labels, MAX_LENGTH), tokenizer.eos_token_id),
                  collate_padded(input_ids, labels, tokenizer.eos_token_id)):
        model = tiny_llama(len(tokenizer))
        model(**batch, use_cache=False).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_packed_loss_equals_padded_loss_gpt2(examples, tokenizer) -> None:
    input_ids, labels, _ = examples
    model = stand_in_decoder("tiny-gpt2")
    packed, padded = packed_and_padded_loss(model, input_ids, labels, tokenizer.eos_token_id)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    prepare_for_packing(model)


def test_opt_leaks_across_examples_and_packing_is_refused(examples, tokenizer) -> None:
    """OPT does not hand position_ids to transformers' mask builder: packed, its examples see each
    other, so the loss differs and packing is refused in one line."""
    input_ids, labels, _ = examples
    model = stand_in_decoder("tiny-opt")
    packed, padded = packed_and_padded_loss(model, input_ids, labels, tokenizer.eos_token_id)
    assert not torch.allclose(packed, padded, rtol=1e-5, atol=1e-5)
    model.config.use_cache = False
    assert attends_across_examples(model)
    with pytest.raises(UserError, match=r"^sft\.packing: opt with sdpa attention lets packed examples attend "
                                        r"to each other .*; set sft\.packing: false$"):
        prepare_for_packing(model)


def test_a_cache_would_switch_packing_off(examples, tokenizer) -> None:
    """Llama's config asks for a cache by default, and with one transformers skips the packed
    mask: prepare_for_packing turns it off, so a plain forward call packs correctly."""
    input_ids, labels, _ = examples
    model = tiny_llama(len(tokenizer))
    assert model.config.use_cache and attends_across_examples(model)
    batch = collate_packed(pack_examples(input_ids, labels, MAX_LENGTH), tokenizer.eos_token_id)
    with torch.no_grad():
        cached = model(**batch).loss
        prepare_for_packing(model)
        assert model.config.use_cache is False
        plain = model(**batch).loss
        _, padded = packed_and_padded_loss(model, input_ids, labels, tokenizer.eos_token_id)
    assert not torch.allclose(cached, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, padded, rtol=1e-5, atol=1e-5)


def test_packing_through_a_peft_lora_model(examples, tokenizer) -> None:
    """The LoRA-wrapped model the recipe trains passes position_ids through unchanged."""
    from peft import LoraConfig, get_peft_model

    input_ids, labels, _ = examples
    model = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False))  # random B too: the adapters change the output
    prepare_for_packing(model)
    model.eval()
    with torch.no_grad():
        packed = model(**collate_packed(pack_examples(input_ids, labels, MAX_LENGTH), tokenizer.eos_token_id)).loss
        padded = model(**collate_padded(input_ids, labels, tokenizer.eos_token_id)).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
