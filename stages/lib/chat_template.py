"""Conversations to token ids through the tokenizer's chat template, with the mask of assistant
tokens that the loss is computed on, and truncation to max_length.

The template is the tokenizer's own `chat_template`, rendered by transformers'
`apply_chat_template`. A tokenizer without one (the offline stand-ins) gets DEFAULT_CHAT_TEMPLATE:
ChatML's role headers (`<|im_start|>role` and a newline), each message ended by the tokenizer's
eos token (standing in for ChatML's `<|im_end|>`, so a model learns to stop where generation
stops), nothing between messages. Its assistant contents and their eos sit inside
`{% generation %}` markers.

The assistant mask: where the template has generation markers, transformers' own
`return_assistant_tokens_mask`. Where it has none (most hub templates), it is derived by
rendering prefixes: the conversation up to an assistant turn with the generation prompt, and up
to the end of that turn; the characters between the two are that turn's, and the tokens covering
them (offsets of the full rendering) are assistant tokens. This needs each prefix's rendering to
be a prefix of the full one; a template that rewrites earlier turns (some drop a model's
reasoning from past turns) fails with one clear error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from stages.lib.chat import Conversation
from stages.lib.params import UserError

log = logging.getLogger("qlora")

IGNORE_INDEX = -100  # label of a token the loss skips (transformers' and PyTorch's convention)

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template DEFAULT_CHAT_TEMPLATE; True when it did. It is
    set on the tokenizer, so a tokenizer saved with the adapter carries it."""
    if getattr(tokenizer, "chat_template", None):
        return False
    if tokenizer.eos_token is None:
        raise UserError("tokenizer: no chat_template and no eos token (the default template ends "
                        "every message with eos)")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    log.info("chat template: the tokenizer has none; using the default (ChatML headers, eos ends a message)")
    return True


def has_generation_markers(template: str) -> bool:
    return bool(GENERATION_MARKER.search(template))


def render(tokenizer, messages: Conversation, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, conversation: Conversation, text: str, where: str) -> list[tuple[int, int]]:
    """The character spans of the assistant turns in `text` (the full rendering), found by
    rendering the conversation up to before and after each assistant turn."""
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, conversation[:index], add_generation_prompt=True)
        after = render(tokenizer, conversation[:index + 1])
        if not (text.startswith(before) and text.startswith(after) and len(after) > len(before)):
            raise UserError(f"{where}: the chat template does not render messages[:{index}] as a prefix of the "
                            f"whole conversation, so the assistant tokens of turn {index} cannot be found "
                            "(use a template with {% generation %} markers)")
        spans.append((len(before), len(after)))
    return spans


def encode_conversation(tokenizer, conversation: Conversation, where: str) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and its assistant mask (1 = an assistant token)."""
    template = tokenizer.chat_template or ""
    if has_generation_markers(template):
        out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    text = render(tokenizer, conversation)
    spans = assistant_spans(tokenizer, conversation, text, where)
    # apply_chat_template tokenizes without special tokens (the template writes its own)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start < span_end and end > span_start for span_start, span_end in spans))
            for start, end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def labels_from_mask(input_ids: Sequence[int], assistant_mask: Sequence[int], train_on_prompt: bool) -> list[int]:
    """Labels for a causal LM (the model shifts them): the token where it is trained, else
    IGNORE_INDEX. train_on_prompt trains on every token."""
    if train_on_prompt:
        return list(input_ids)
    return [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, assistant_mask)]


@dataclass
class EncodedChats:
    """A split's conversations as token ids and assistant masks, after truncation."""

    input_ids: list[list[int]] = field(default_factory=list)
    assistant_masks: list[list[int]] = field(default_factory=list)
    truncated: int = 0  # examples cut at max_length


def encode_conversations(tokenizer, conversations: Sequence[Conversation], max_length: int, source: str,
                         where: Sequence[str] | None = None) -> EncodedChats:
    """Encode every conversation and cut it at max_length tokens (the end goes, as the response
    is what a prompt leads to). An example left with no assistant token is an error naming its
    source and row; the truncated ones are counted and logged."""
    where = [f"row {i}" for i in range(1, len(conversations) + 1)] if where is None else where
    out = EncodedChats()
    for conversation, place in zip(conversations, where):
        at = f"{source} {place}"
        ids, mask = encode_conversation(tokenizer, conversation, at)
        if len(ids) > max_length:
            out.truncated += 1
            if not any(mask[:max_length]):
                first = mask.index(1) if any(mask) else len(ids)
                raise UserError(f"{at}: {len(ids)} tokens; cutting at tokenize.max_length {max_length} leaves no "
                                f"assistant token to train on (the first is token {first + 1}); raise "
                                "tokenize.max_length or shorten the prompt")
            ids, mask = ids[:max_length], mask[:max_length]
        elif not any(mask):
            raise UserError(f"{at}: the chat template left no assistant token (expected the assistant "
                            "turns' text in the rendering)")
        out.input_ids.append(ids)
        out.assistant_masks.append(mask)
    if out.truncated:
        log.info("%s: %d of %d examples cut at tokenize.max_length %d", source, out.truncated,
                 len(conversations), max_length)
    return out
