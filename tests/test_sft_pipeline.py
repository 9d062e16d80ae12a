"""The sft recipe through the stages: a small cut of the shipped instruction set, the tiny Llama
stand-in, packed rows; the test metrics and samples, the export reloading to the same scores,
`qlora-generate --chat`, the merged 16-bit export, and bad input stopping a stage with one line
and no output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import ROOT, Pipeline, compose, error_message, leftovers, run_recipe, run_stage

TINY = ["task=sft", f"model.name_or_path=random-init:{ROOT / 'configs' / 'tiny-llama'}",
        "tokenize.max_length=256", "quant.compute_dtype=fp32", "train.batch_size=4", "train.epochs=1",
        "train.max_steps=4", "train.eval_every_steps=2", "train.log_every_steps=1", "evaluate.batch_size=8",
        "generate.max_new_tokens=5"]


@pytest.fixture(scope="module")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 train and 12 test rows of data/instructions (both sources: the file interleaves them)."""
    out = tmp_path_factory.mktemp("instructions")
    for name, rows in (("train", 60), ("test", 12)):
        lines = (ROOT / "data" / "instructions" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines(True)
        (out / f"{name}.jsonl").write_text("".join(lines[:rows]), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, instructions: Path) -> Pipeline:
    return run_recipe(tmp_path_factory.mktemp("sft"), [*TINY, f"data.source={instructions}", "export.merged=true"])


def test_metrics_hold_loss_perplexity_and_exact_match(sft_run: Pipeline) -> None:
    test = json.loads((sft_run.metrics / "evaluate" / "metrics.json").read_text())
    assert math.isfinite(test["loss"]) and test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    assert 0 <= test["exact_match"] <= 1 and test["test_examples"] == 12
    samples = json.loads((sft_run.metrics / "evaluate" / "samples.json").read_text())
    assert len(samples["samples"]) == 12 and samples["settings"]["max_new_tokens"] == 5
    first = samples["samples"][0]
    assert set(first) == {"prompt", "reference", "prediction", "exact_match"}
    assert first["prompt"].startswith("Which banking intent") or first["prompt"].startswith("What is the topic")
    assert test["exact_match"] == sum(s["exact_match"] for s in samples["samples"]) / 12
    train = json.loads((sft_run.metrics / "train" / "metrics.json").read_text())
    assert train["task"] == "sft" and math.isfinite(train["best_val_loss"])


def test_tokenized_rows_are_packed_with_labels_on_assistant_tokens_only(sft_run: Pipeline) -> None:
    from stages.lib.chat_template import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX
    from stages.lib.tokenized import load_tokenized

    data, meta = load_tokenized(sft_run.tokenized)
    assert meta.task == "sft" and meta.packed and meta.chat_template == DEFAULT_CHAT_TEMPLATE
    ids, targets = data["train"]
    assert len(ids) < 54  # 54 train examples, several to a row
    for row, labels, positions in zip(ids, targets.labels, targets.position_ids):
        assert len(row) == len(labels) == len(positions) <= 256
        assert positions[0] == 0 and positions.count(0) >= 1
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, row))
    test_ids, test_targets = data["test"]
    assert test_targets.position_ids is None and len(test_ids) == len(test_targets.conversations) == 12
    # the tokens trained on are exactly the answers and their eos: the reference of each test row
    from stages.lib.sources import load_tokenizer

    tokenizer = load_tokenizer(sft_run.adapter)
    for labels, conversation in zip(test_targets.labels, test_targets.conversations):
        answer = json.loads(conversation)[-1]["content"]
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert tokenizer.decode(trained) == answer + tokenizer.eos_token


def test_export_reloads_to_the_same_response_loss(sft_run: Pipeline) -> None:
    from stages.lib.adapter import load_language_model
    from stages.lib.tasks import Objective
    from stages.lib.tokenized import load_tokenized

    data, _ = load_tokenized(sft_run.tokenized)
    test = json.loads((sft_run.metrics / "evaluate" / "metrics.json").read_text())
    lm = load_language_model(sft_run.export, base_dir=sft_run.base)
    objective = Objective(lm.meta.task, lm.tokenizer)
    examples = objective.examples(*data["test"], lm.tokenizer.pad_token_id, lm.device, scoring=True)
    scores = objective.scores(lm.model, examples, None, 8, lm.device, lm.dtype)
    assert scores["loss"] == pytest.approx(test["loss"], rel=1e-5)
    card = (sft_run.export / "README.md").read_text()
    assert "text-generation" in card and "exact match" in card


def test_generate_chat_answers_through_the_template(sft_run: Pipeline, capsys, monkeypatch) -> None:
    """--chat renders the message with the adapter's template and prints the greedy answer that
    evaluate's sampler gives for the same prompt."""
    from stages.cli import generate
    from stages.lib.adapter import load_language_model
    from stages.lib.answers import generate_answers

    samples = json.loads((sft_run.metrics / "evaluate" / "samples.json").read_text())["samples"]
    message = samples[0]["prompt"]
    assert generate.main(["--model", str(sft_run.export), "--max-new-tokens", "5", "--chat", message]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"--- {message}\n")
    lm = load_language_model(sft_run.export)
    expected = generate_answers(lm.model, lm.tokenizer, [[{"role": "user", "content": message}]], 5, 1)[0]
    assert out == f"--- {message}\n{expected}\n" and expected == samples[0]["prediction"]


def test_merged_export_loads_without_peft_and_gives_the_adapter_logits(sft_run: Pipeline) -> None:
    """export.merged: the dequantized 4-bit base plus LoRA, a plain causal LM (safetensors,
    config, tokenizer with its chat template): the logits of the adapter on that base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.adapter_meta import AdapterMeta
    from stages.lib.quantized import load_base

    merged_dir = sft_run.export / "merged"
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template
    meta = AdapterMeta.load(sft_run.adapter / "pipeline.json")
    base = load_base(sft_run.base, [], meta.quant, [], torch.device("cpu"), torch.float32, task="sft").dequantize()
    adapter = PeftModel.from_pretrained(base, sft_run.adapter).eval()
    ids = torch.randint(merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


# --- bad input: one line, no output ------------------------------------------------------------

def write_raw(root: Path, train_rows: list, test_rows: list | None = None) -> tuple[Path, Path]:
    """data/raw holding train/test.jsonl, and params for the sft recipe."""
    raw = root / "raw"
    raw.mkdir()
    good = {"instruction": "Say yes.", "output": "yes"}
    for name, rows in (("train", train_rows), ("test", test_rows or [good])):
        (raw / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    params = root / "params.yaml"
    params.write_text(json.dumps(compose([*TINY, "split.val_fraction=0.5"])), encoding="utf-8")
    return raw, params


GOOD = {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]}
BAD_ROWS = [
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yes"}]},
     "line 2 messages[0]: no `content` (expected a non-empty string)"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
     "line 2 messages[0]: role 'robot' (expected one of system, user, assistant)"),
    ({"messages": [{"role": "user", "content": "hi"}]},
     "line 2: no assistant turn (expected at least one message with role assistant to train on)"),
]


@pytest.mark.parametrize(("row", "expected"), BAD_ROWS, ids=["no-content", "unknown-role", "no-assistant"])
def test_split_rejects_a_bad_row_in_one_line(tmp_path: Path, capsys, row: dict, expected: str) -> None:
    raw, params = write_raw(tmp_path, [GOOD, row, GOOD])
    out = tmp_path / "split"
    assert run_stage("split", ["--params", str(params), "--raw", str(raw), "--out", str(out)]) == 1
    assert error_message(capsys.readouterr().err) == f"{raw / 'train.jsonl'} {expected}"
    assert not out.exists() and leftovers(tmp_path) == []


def test_tokenize_rejects_an_example_with_nothing_left_to_train_on(tmp_path: Path, capsys,
                                                                   instructions: Path) -> None:
    """A prompt longer than tokenize.max_length: cutting the end leaves no assistant token."""
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "yes"}]}
    raw, params = write_raw(tmp_path, [GOOD, GOOD, GOOD, long_prompt])
    split, base, tokenized = tmp_path / "split", tmp_path / "base", tmp_path / "tokenized"
    assert run_stage("split", ["--params", str(params), "--raw", str(raw), "--out", str(split)]) == 0
    assert run_stage("download", ["--params", str(params), "--data-out", str(tmp_path / "downloaded"),
                                  "--model-out", str(base)]) == 0  # the base model (data.source: the shipped set)
    argv = ["--params", str(params), "--split", str(split), "--base", str(base), "--out", str(tokenized)]
    assert run_stage("tokenize", argv) == 1
    message = error_message(capsys.readouterr().err)
    assert message.startswith(str(split / "train.jsonl") + " line ") or message.startswith(
        str(split / "validation.jsonl") + " line ")
    assert "cutting at tokenize.max_length 256 leaves no assistant token to train on" in message
    assert not tokenized.exists() and leftovers(tmp_path) == []


def test_packing_is_refused_in_one_line_for_a_model_that_would_leak(tmp_path: Path) -> None:
    """OPT does not build its mask from position_ids: Objective.prepare refuses packed rows."""
    from sft_helpers import stand_in_decoder
    from stages.lib.params import Task, UserError
    from stages.lib.tasks import Objective

    objective = Objective(Task("sft", "loss", 0.15))
    with pytest.raises(UserError, match="^sft.packing: opt with .* attention lets packed examples attend"):
        objective.prepare(stand_in_decoder("tiny-opt"), packed=True)
    objective.prepare(stand_in_decoder("tiny-opt"), packed=False)  # one example per row: fine
