"""Answers to test prompts, generated through the chat template, and their exact-match score.

A test conversation's prompt is every message before its last assistant turn, and that turn is
the reference answer (chat.prompt_and_answer). The model answers greedily from the prompt
rendered with `add_generation_prompt=True`, up to max_new_tokens and stopping at eos; an answer
matches when it equals the reference after normalising both (surrounding white space stripped,
case-folded). Each test row becomes one record for metrics/evaluate/samples.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from stages.lib.chat import Conversation, prompt_and_answer

Answerer = Callable[[Sequence[Conversation]], list[str]]


def ids_without_text(model: torch.nn.Module, tokenizer) -> list[int]:
    """The output ids past the tokenizer's vocabulary: rows a model's output layer has beyond
    len(tokenizer) (vocabularies padded to a round size, or a stand-in tokenizer smaller than the
    architecture's vocabulary). They decode to no text and no data trains them, so generation
    never picks them (generate's suppress_tokens)."""
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    return list(range(len(tokenizer), vocab))


def normalise(text: str) -> str:
    return text.strip().casefold()


@torch.inference_mode()
def generate_answer_ids(model: torch.nn.Module, tokenizer, prompts: Sequence[Conversation], max_new_tokens: int,
                        batch_size: int) -> list[list[int]]:
    """The token ids of greedy answers to `prompts`, in order, up to their eos (not included).
    Prompts run longest first in left-padded batches (a decoder continues from the last
    position); the caller sets autocast."""
    device = next(model.parameters()).device
    encoded = [tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
               for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[list[int]] = [[] for _ in encoded]
    textless = ids_without_text(model, tokenizer) or None
    training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=None, leave=False):
            batch = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=pad_id, use_cache=True, temperature=None, top_k=None, top_p=None,
                                 suppress_tokens=textless)
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()
                answers[i] = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    finally:
        model.train(training)
    return answers


def generate_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[Conversation], max_new_tokens: int,
                     batch_size: int) -> list[str]:
    """Greedy answers to `prompts` as text (see generate_answer_ids)."""
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate_answer_ids(model, tokenizer, prompts, max_new_tokens, batch_size)]


def score_answers(conversations: Sequence[Conversation], answer: Answerer) -> tuple[float, list[dict[str, Any]]]:
    """Exact match of `answer`'s replies to the conversations' reference answers, and one record
    per conversation: prompt (its last user message), reference, prediction, exact_match."""
    pairs = [prompt_and_answer(c) for c in conversations]
    predictions = answer([prompt for prompt, _ in pairs])
    records = []
    for (prompt, reference), prediction in zip(pairs, predictions):
        question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
        records.append({"prompt": question, "reference": reference, "prediction": prediction,
                        "exact_match": normalise(prediction) == normalise(reference)})
    score = sum(r["exact_match"] for r in records) / len(records) if records else 0.0
    return score, records
