"""The other recipe families, each end to end on tiny data: masked-LM, GPT-2 sequence
classification, causal-LM with generation.

Params come from the shipped Hydra recipes (conf/task/<recipe>.yaml, composed as `dvc exp run -S
task=<recipe>` composes them) plus overrides that make a run take seconds: a few hundred lines of
the shipped corpora, a 2-layer model, blocks of 32 tokens, 4 optimizer steps.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers import (INTENTS, ROOT, STAGES, Pipeline, compose, error_message, read_yaml, run_recipe,
                     run_stage, tiny_overrides)

RECIPES = ("classification", "intent-classification", "masked-lm", "causal-lm", "sft")


@pytest.fixture(scope="module", params=("masked-lm", "causal-lm", "intent-classification"))
def recipe_run(request, tmp_path_factory, corpora, decoder_configs, tiny_model_dir) -> tuple[str, Pipeline]:
    recipe = request.param
    root = tmp_path_factory.mktemp(recipe)
    return recipe, run_recipe(root, tiny_overrides(recipe, corpora, decoder_configs, tiny_model_dir))


# --- the recipes themselves -----------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_to_valid_params(recipe: str) -> None:
    from stages.lib.params import validate

    flat = validate(compose([f"task={recipe}"]))
    assert flat["task.type"] == {"intent-classification": "classification"}.get(recipe, recipe)


def test_shipped_params_yaml_is_the_default_composition() -> None:
    """params.yaml is what `dvc exp run` would write from conf/ with no overrides: no drift."""
    assert read_yaml(ROOT / "params.yaml") == compose([])


def test_recipes_carry_the_issue_settings() -> None:
    mlm, clm, intent = (compose([f"task={r}"]) for r in ("masked-lm", "causal-lm", "intent-classification"))
    assert (mlm["lora"]["r"], mlm["lora"]["alpha"], mlm["train"]["epochs"]) == (8, 16, 3)
    assert mlm["lora"]["target_modules"] == ["query", "value"] and mlm["task"]["mlm_probability"] == 0.15
    assert intent["lora"] | {"modules_to_save": None} == {"r": 16, "alpha": 32, "dropout": 0.1,
                                                          "target_modules": ["c_attn", "c_proj"],
                                                          "modules_to_save": None}
    assert intent["train"]["gradient_checkpointing"] and intent["task"]["metric"] == "f1_macro"
    assert clm["lora"]["r"] == 8 and clm["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_llama_preset_composes_over_the_causal_lm_recipe() -> None:
    """`dvc exp run -S task=causal-lm -S preset=llama-3.1-8b`: DVC groups the -S overrides as its
    CLI does and composes them with Hydra; the preset also selects the causal-LM recipe itself."""
    from dvc.utils.cli_parse import to_path_overrides

    from stages.lib.params import validate

    (overrides,) = to_path_overrides(["task=causal-lm", "preset=llama-3.1-8b"]).values()
    params = compose(overrides)
    assert params == compose(["preset=llama-3.1-8b"])
    flat = validate(params)
    assert flat["task.type"] == "causal-lm" and flat["data.source"] == "data/tiny_shakespeare"
    assert flat["model.name_or_path"] == "random-init:configs/llama-3.1-8b"
    assert (flat["lora.r"], flat["lora.alpha"], flat["lora.target_modules"]) == (32, 32, "all-linear")
    assert (flat["train.optimizer"], flat["quant.compute_dtype"], flat["tokenize.max_length"]) == \
        ("paged_adamw_8bit", "bf16", 2048)
    assert flat["train.batch_size"] == 8 and flat["train.compile"] and flat["train.gradient_checkpointing"] is True
    assert (flat["train.gradient_accumulation_steps"], flat["train.checkpoint_every_n_layers"]) == (4, 3)
    assert flat["quant.cache_dequantized"] is False  # the base stays in 4 bits
    assert compose(["task=causal-lm", "preset=llama-3.1-8b", "train.gradient_checkpointing=offload",
                    "train.checkpoint_every_n_layers=1"])["train"]["gradient_checkpointing"] == "offload"


def test_unknown_recipe_lists_the_recipes() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        compose(["task=sentiment"])
    for recipe in RECIPES:
        assert recipe in str(e.value)


# --- tiny end-to-end runs ---------------------------------------------------------------------

def test_metrics_are_present_and_finite(recipe_run) -> None:
    recipe, run = recipe_run
    train = json.loads((run.metrics / "train" / "metrics.json").read_text())
    test = json.loads((run.metrics / "evaluate" / "metrics.json").read_text())
    names = ({"accuracy", "f1_macro", "f1_weighted"} if recipe == "intent-classification"
             else {"loss", "perplexity"})
    for name in names:
        assert math.isfinite(test[name]), name
        assert math.isfinite(train[f"best_val_{name}"]), name
    if recipe != "intent-classification":
        assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
        assert test["perplexity"] > 1
    else:
        assert set(test["per_class"]) == set(INTENTS)  # label_names: [] = the train file's labels
    assert train["task"] == ("classification" if recipe == "intent-classification" else recipe)
    card = (run.export / "README.md").read_text()
    assert {"masked-lm": "fill-mask", "causal-lm": "text-generation",
            "intent-classification": "text-classification"}[recipe] in card


def expected_trainable(recipe: str, base: Path) -> int:
    """LoRA's A and B per targeted layer plus the modules trained in full, counted by hand."""
    config = json.loads((base / "config.json").read_text())
    if recipe == "masked-lm":  # r 8 on query and value (h x h), plus the MLM transform: dense + LayerNorm
        h = config["hidden_size"]
        return config["num_hidden_layers"] * 2 * 8 * (h + h) + (h * h + h) + 2 * h
    if recipe == "causal-lm":  # r 8 on q_proj and v_proj (h x h)
        h = config["hidden_size"]
        return config["num_hidden_layers"] * 2 * 8 * (h + h)
    h = config["n_embd"]  # r 16 on c_attn (h -> 3h), attn.c_proj (h -> h), mlp.c_proj (4h -> h); score head
    per_layer = 16 * (h + 3 * h) + 16 * (h + h) + 16 * (4 * h + h)
    return config["n_layer"] * per_layer + h * len(INTENTS)


def test_trainable_parameter_count_matches_peft_and_the_model(recipe_run) -> None:
    recipe, run = recipe_run
    train = json.loads((run.metrics / "train" / "metrics.json").read_text())
    assert train["trainable_params"] == expected_trainable(recipe, run.base)


def test_export_reloads_to_the_same_outputs(recipe_run) -> None:
    """The exported bundle, loaded on its own, scores the test split as evaluate did."""
    from stages.lib.adapter import load_adapter, load_language_model
    from stages.lib.tokenized import load_tokenized
    from stages.lib.tasks import Objective

    recipe, run = recipe_run
    data, _ = load_tokenized(run.tokenized)
    test = json.loads((run.metrics / "evaluate" / "metrics.json").read_text())
    if recipe == "intent-classification":
        classifier = load_adapter(run.export, base_dir=run.base)
        predicted = classifier.logits(data["test"][0], 16).argmax(-1)
        assert float((predicted == data["test"][1]).mean()) == pytest.approx(test["accuracy"])
        return
    lm = load_language_model(run.export, base_dir=run.base)
    objective = Objective(lm.meta.task, lm.tokenizer)
    scores = objective.scores(lm.model, objective.examples(data["test"][0], None, 0, lm.device, scoring=True),
                              None, 16, lm.device, lm.dtype)
    assert scores["loss"] == pytest.approx(test["loss"], rel=1e-5)


def test_generation_has_the_requested_length(recipe_run, capsys) -> None:
    recipe, run = recipe_run
    if recipe != "causal-lm":
        pytest.skip("generation is the causal-lm recipe's")
    samples = json.loads((run.metrics / "evaluate" / "samples.json").read_text())
    prompts = read_yaml(run.params)["generate"]["prompts"]
    assert [s["prompt"] for s in samples["samples"]] == prompts
    from stages.lib.adapter import load_language_model

    lm = load_language_model(run.export, base_dir=run.base)
    assert all(s["text"] for s in samples["samples"])
    ids = lm.generate_ids(["ROMEO:", "First"], 11, do_sample=True, temperature=0.8, top_k=50, seed=3)
    assert [len(i) for i in ids] == [11, 11]
    assert lm.generate_ids(["ROMEO:"], 5, do_sample=False) == lm.generate_ids(["ROMEO:"], 5, do_sample=False)
    # the CLI: the same seed prints the same text, the text generate_ids gives
    from stages.cli import generate

    argv = ["--model", str(run.export), "--max-new-tokens", "11", "--seed", "3", "ROMEO:"]
    assert generate.main(argv) == 0
    first = capsys.readouterr().out
    assert generate.main(argv) == 0
    assert capsys.readouterr().out == first
    assert first == f"--- ROMEO:\nROMEO:{lm.tokenizer.decode(ids[0])}\n"


# --- errors --------------------------------------------------------------------------------

def test_generate_refuses_a_classifier(pipeline: Pipeline, capsys) -> None:
    from stages.cli import generate

    assert generate.main(["--model", str(pipeline.export), "hello"]) == 1
    assert "a classification adapter, not a language model" in error_message(capsys.readouterr().err)


def test_predict_refuses_a_language_model(recipe_run, capsys) -> None:
    recipe, run = recipe_run
    if recipe == "intent-classification":
        pytest.skip("a classifier")
    from stages.cli import predict

    assert predict.main(["--model", str(run.export), "hello"]) == 1
    assert f"a {recipe} adapter, not a classifier" in error_message(capsys.readouterr().err)


def test_serve_refuses_a_language_model(recipe_run) -> None:
    recipe, run = recipe_run
    if recipe == "intent-classification":
        pytest.skip("a classifier")
    from stages.lib.params import UserError
    from stages.lib.adapter import load_adapters

    with pytest.raises(UserError, match=f"a {recipe} adapter, not a classifier"):
        load_adapters({"lm": run.export}, run.base)


def test_target_module_the_model_lacks_lists_its_layers(tmp_path, corpora, decoder_configs,
                                                        tiny_model_dir, capsys) -> None:
    overrides = tiny_overrides("causal-lm", corpora, decoder_configs, tiny_model_dir)
    run = Pipeline(tmp_path)
    run.params.write_text(json.dumps(compose(overrides + ["lora.target_modules=[query,value]"])))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        for stage in STAGES[:3]:
            assert run_stage(stage, run.argv(stage)) == 0
        capsys.readouterr()
        assert run_stage("train", run.argv("train")) == 1
    message = error_message(capsys.readouterr().err)
    assert message.startswith("lora.target_modules: query, value not in this model")
    for layer in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
        assert layer in message


def test_metric_of_another_task_is_refused(tmp_path) -> None:
    from stages.lib.params import UserError, validate

    params = compose(["task=causal-lm", "task.metric=accuracy"])
    with pytest.raises(UserError, match="task.metric: expected one of perplexity, loss for task.type causal-lm"):
        validate(params)


def test_corpus_without_train_file_is_one_clear_error(tmp_path) -> None:
    from stages.lib.tables import find_corpus
    from stages.lib.params import UserError

    (tmp_path / "test.txt").write_text("some text\n")
    with pytest.raises(UserError, match="no train.txt or train.txt.gz"):
        find_corpus(tmp_path)


def test_single_file_corpus_is_cut_contiguously() -> None:
    from stages.lib.tables import split_corpus

    lines = [f"{i}\n" for i in range(100)]
    parts = split_corpus({"train": lines}, 0.1)
    assert parts["train"] == lines[:80] and parts["validation"] == lines[80:90] and parts["test"] == lines[90:]
    assert split_corpus({"train": lines, "test": ["t\n"]}, 0.1)["validation"] == lines[90:]


def test_token_blocks_are_cut_from_the_concatenated_lines(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from stages.tokenize import token_blocks

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lines = ["the cat sat\n", " \n", "on the mat today\n"]
    stream = [i for line in ("the cat sat", "on the mat today") for i in tokenizer(line)["input_ids"]]
    blocks = token_blocks(tokenizer, lines, 4, add_special_tokens=True)
    assert blocks == [stream[i:i + 4] for i in range(0, len(stream) - len(stream) % 4, 4)]


def test_masks_for_scoring_are_the_same_every_time(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from stages.lib.params import Task
    from stages.lib.tasks import SCORE_SEED, Objective

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    objective = Objective(Task(type="masked-lm", metric="perplexity", mlm_probability=0.15), tokenizer)
    blocks = torch.randint(1000, 2000, (40, 32)).tolist()
    examples = objective.examples(blocks, None, 0, torch.device("cpu"), scoring=True)
    first = examples.batch(range(40))
    examples.mask.generator.manual_seed(SCORE_SEED)
    again = examples.batch(range(40))
    assert torch.equal(first["labels"], again["labels"])
    masked = (first["labels"] != -100).float().mean().item()
    assert 0.10 < masked < 0.20


def test_a_hub_id_loads_through_the_hub_cache(tmp_path, decoder_configs, monkeypatch) -> None:
    """`model.name_or_path: gpt2` takes the real hub path (snapshot_download, offline here from
    a cache laid out as the hub writes it) and gets a GPT-2 classifier told to pad with eos."""
    import huggingface_hub.constants

    from stages.lib.params import Quant
    from stages.lib.quantized import load_base
    from stages.lib.sources import load_tokenizer, random_init_model, resolve_model_source

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--gpt2"
    shutil.copytree(random_init_model(decoder_configs["tiny-gpt2"]), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    directory, origin = resolve_model_source("gpt2", "main")
    assert origin == {"kind": "hub", "repo_id": "gpt2", "revision": "main", "commit": commit,
                      "name_or_path": "gpt2"}
    quant = Quant(type="nf4", double_quant=True, compute_dtype="fp32", cache_dequantized=False)
    model = load_base(directory, list(INTENTS), quant, ["score"], torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(directory)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.pad_token_id == model.config.eos_token_id == tokenizer.pad_token_id
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    assert type(model.score).__name__ == "Linear"  # the head stays unquantized
