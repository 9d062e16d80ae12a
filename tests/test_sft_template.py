"""Chat template: token ids and assistant masks token by token, labels, truncation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sft_helpers import stand_in_tokenizer

from stages.lib.chat_template import (DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, encode_conversation,
                                      encode_conversations, ensure_chat_template, has_generation_markers,
                                      labels_from_mask)
from stages.lib.params import UserError

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
EOS = "<|endoftext|>"
# The conversation as the default template lays it out, cut where the mask changes: (text, trained).
SEGMENTS = [("<|im_start|>system\nBe brief.", 0), (EOS, 0), ("<|im_start|>user\nHi there", 0), (EOS, 0),
            ("<|im_start|>assistant\n", 0), ("Hello!", 1), (EOS, 1), ("<|im_start|>user\n2+2?", 0), (EOS, 0),
            ("<|im_start|>assistant\n", 0), ("4", 1), (EOS, 1)]
# Hub-style templates without {% generation %} markers: the mask comes from rendering prefixes.
WITHOUT_MARKERS = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
ZEPHYR_LIKE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return stand_in_tokenizer()


def expected_tokens(tokenizer, segments: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def test_default_template_is_set_only_where_none(tokenizer) -> None:
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE and has_generation_markers(DEFAULT_CHAT_TEMPLATE)
    assert not has_generation_markers(WITHOUT_MARKERS)
    assert ensure_chat_template(tokenizer) is False  # already has one: kept


def test_default_template_token_by_token(tokenizer) -> None:
    ids, mask = encode_conversation(tokenizer, CONVERSATION, "test row 1")
    want_ids, want_mask = expected_tokens(tokenizer, SEGMENTS)
    assert ids == want_ids
    assert mask == want_mask
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == f"Hello!{EOS}4{EOS}"
    labels = labels_from_mask(ids, mask, train_on_prompt=False)
    for token, trained, label in zip(ids, mask, labels):
        assert label == (token if trained else IGNORE_INDEX)
    assert labels_from_mask(ids, mask, train_on_prompt=True) == ids


@pytest.mark.parametrize("template", [WITHOUT_MARKERS, ZEPHYR_LIKE])
def test_template_without_markers_masks_by_prefixes(tokenizer, template: str) -> None:
    tok = stand_in_tokenizer()
    tok.chat_template = template
    ids, mask = encode_conversation(tok, CONVERSATION, "test row 1")
    if template == WITHOUT_MARKERS:  # the same template, with markers: the same tokens, the same mask
        assert (ids, mask) == tuple(encode_conversation(tokenizer, CONVERSATION, "test row 1"))
    else:
        segments = [("<|system|>\nBe brief.", 0), (EOS, 0), ("<|user|>\nHi there", 0), (EOS, 0),
                    ("<|assistant|>\n", 0), ("Hello!", 1), (EOS, 1), ("<|user|>\n2+2?", 0), (EOS, 0),
                    ("<|assistant|>\n", 0), ("4", 1), (EOS, 1)]
        assert (ids, mask) == expected_tokens(tok, segments)


def test_template_that_rewrites_earlier_turns_is_one_clear_error() -> None:
    tok = stand_in_tokenizer()
    tok.chat_template = "{{ messages | length }}" + WITHOUT_MARKERS  # the count changes with each prefix
    with pytest.raises(UserError, match=r"^data row 3: the chat template does not render messages\[:2\] as a prefix"):
        encode_conversation(tok, CONVERSATION, "data row 3")


def test_generation_prompt_matches_the_trained_layout(tokenizer) -> None:
    prompt = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert full == prompt + "4" + EOS


def test_template_travels_with_the_saved_tokenizer(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == DEFAULT_CHAT_TEMPLATE


def long_chat(prompt_words: int, answer_words: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(["card"] * prompt_words)},
            {"role": "assistant", "content": " ".join(["lost"] * answer_words)}]


def test_truncation_keeps_the_start_and_counts(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    chats = [long_chat(3, 2), long_chat(3, 200), long_chat(5, 1)]
    with caplog.at_level(logging.INFO, logger="qlora"):
        encoded = encode_conversations(tokenizer, chats, 48, "data/train.jsonl")
    assert encoded.truncated == 1
    assert [len(ids) for ids in encoded.input_ids][1] == 48 and sum(encoded.assistant_masks[1]) > 0
    full_ids, _ = encode_conversation(tokenizer, chats[1], "x")
    assert encoded.input_ids[1] == full_ids[:48]
    assert "data/train.jsonl: 1 of 3 examples cut at tokenize.max_length 48" in caplog.text


def test_truncation_that_leaves_nothing_to_train_on_names_file_and_row(tokenizer) -> None:
    chats = [long_chat(3, 2), long_chat(100, 2)]
    with pytest.raises(UserError) as caught:
        encode_conversations(tokenizer, chats, 48, "data/train.jsonl", where=["line 1", "line 7"])
    message = str(caught.value)
    assert message.startswith("data/train.jsonl line 7: ") and "\n" not in message
    assert "leaves no assistant token to train on" in message and "tokenize.max_length 48" in message
