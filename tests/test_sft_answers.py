"""Exact-match scoring of generated answers, and greedy generation through the chat template."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from sft_helpers import ROOT, stand_in_decoder, stand_in_tokenizer, tiny_llama

from stages.lib.answers import generate_answer_ids, generate_answers, normalise, score_answers
from stages.lib.chat import Conversation

TESTS = [[{"role": "user", "content": "Topic? Stocks fell."}, {"role": "assistant", "content": "Business"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Intent? Card lost."},
          {"role": "assistant", "content": "lost_or_stolen_card"}],
         [{"role": "user", "content": "Topic? Goal!"}, {"role": "assistant", "content": "Sports"}]]


def test_normalise_strips_and_case_folds() -> None:
    assert normalise("  Sci/Tech\n") == "sci/tech" and normalise("STRASSE") == normalise("straße")
    assert normalise("Sports.") != normalise("Sports")


def test_exact_match_with_a_fixed_generator() -> None:
    seen: list[Sequence[Conversation]] = []

    def answer(prompts: Sequence[Conversation]) -> list[str]:
        seen.append(prompts)
        return [" business\n", "lost card", "SPORTS"]

    score, records = score_answers(TESTS, answer)
    assert score == pytest.approx(2 / 3)
    assert [r["exact_match"] for r in records] == [True, False, True]
    assert records[1] == {"prompt": "Intent? Card lost.", "reference": "lost_or_stolen_card",
                          "prediction": "lost card", "exact_match": False}
    assert seen[0][1] == TESTS[1][:4]  # the prompt: everything before the last assistant turn


@pytest.fixture(scope="module")
def tokenizer():
    return stand_in_tokenizer()


@pytest.mark.parametrize("family", ["llama", "tiny-gpt2"])
def test_batched_greedy_answers_equal_one_at_a_time(tokenizer, family: str) -> None:
    """Left padding in a batch must not change a greedy answer; answers stop at max_new_tokens."""
    model = tiny_llama(len(tokenizer), seed=1) if family == "llama" else stand_in_decoder(family, seed=1)
    prompts = [prompt for prompt in (c[:-1] for c in TESTS)]
    batched = generate_answer_ids(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_answer_ids(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(ids) <= 6 and tokenizer.eos_token_id not in ids for ids in batched)
    assert any(batched)  # a random model says something
    texts = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert texts == [tokenizer.decode(ids) for ids in batched]


def test_generation_stops_at_eos(tokenizer) -> None:
    """All-zero logits make argmax pick token 0, which is eos in the stand-in tokenizer: the
    answer stops at once and eos is not part of it."""
    assert tokenizer.eos_token_id == 0
    model = tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    score, records = score_answers(TESTS[:1], lambda p: generate_answers(model, tokenizer, p, 4, 1))
    assert records[0]["prediction"] == "" and score == 0.0


def test_generation_never_picks_ids_the_tokenizer_has_no_text_for() -> None:
    """A stand-in tokenizer smaller than the architecture's vocabulary (configs/llama-3.1-8b's) or
    a vocabulary padded to a round size: the ids past len(tokenizer) decode to nothing, so
    generation suppresses them, even where the output layer favours them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from stages.lib.answers import ids_without_text

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configs/tiny-llama")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = AutoConfig.from_pretrained(ROOT / "configs/tiny-llama")
    config.vocab_size = len(tokenizer) + 50
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # textless rows ±w, ids 7 and 8 ±w/2, the rest 0: a textless id is every argmax
        w = torch.randn(config.hidden_size)
        head = model.get_output_embeddings().weight
        head.zero_()
        head[len(tokenizer):] = torch.stack([w, -w]).repeat(25, 1)
        head[7], head[8] = w / 2, -w / 2
    assert ids_without_text(model, tokenizer) == list(range(len(tokenizer), len(tokenizer) + 50))
    prompt = tokenizer("hello", return_tensors="pt")
    plain = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert plain[0, prompt["input_ids"].shape[1]:].min() >= len(tokenizer)  # unsuppressed: textless
    (ids,) = generate_answer_ids(model, tokenizer, [[{"role": "user", "content": "hello"}]], 4, batch_size=1)
    assert len(ids) == 4 and set(ids) <= {7, 8}
