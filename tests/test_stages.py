"""Each stage's outputs from one in-process run of the chain (the `pipeline` fixture), the
export round trip, and the predict CLI.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import LABELS, Pipeline, error_message, leftovers, run_stage
from stages.cli import predict
from stages.lib.adapter import load_adapter
from stages.lib.adapter_meta import AdapterMeta
from stages.lib.batches import PackedTokens, predict_logits
from stages.lib.io import sha256_file
from stages.lib.quantized import load_base
from stages.lib.tokenized import load_tokenized

BATCH = 16


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def safetensors_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --- download -------------------------------------------------------------------------------

def test_download_copies_data_and_model_with_provenance(pipeline: Pipeline, tiny_data_dir: Path,
                                                        tiny_model_dir: Path) -> None:
    source = read_json(pipeline.raw / "SOURCE.json")
    assert source["kind"] == "local" and source["path"] == str(tiny_data_dir)
    assert set(source["sha256"]) == {"train.csv", "test.csv"}
    for name, digest in source["sha256"].items():
        assert (pipeline.raw / name).read_bytes() == (tiny_data_dir / name).read_bytes()
        assert digest == sha256_file(pipeline.raw / name)

    base = read_json(pipeline.base / "SOURCE.json")
    assert base["kind"] == "local" and base["name_or_path"] == str(tiny_model_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(base["sha256"])
    for name, digest in base["sha256"].items():
        assert digest == sha256_file(pipeline.base / name) == sha256_file(tiny_model_dir / name)
    assert not list(pipeline.base.glob("*.bin")) and not list(pipeline.base.glob("*.pt"))
    assert leftovers(pipeline.raw.parent) == [] and leftovers(pipeline.base.parent) == []


# --- split ----------------------------------------------------------------------------------

def test_split_is_stratified_and_complete(pipeline: Pipeline, tiny_params) -> None:
    raw = pd.read_csv(pipeline.raw / "train.csv", keep_default_na=False)
    raw_test = pd.read_csv(pipeline.raw / "test.csv", keep_default_na=False)
    parts = {name: pd.read_csv(pipeline.split / f"{name}.csv", keep_default_na=False)
             for name in ("train", "validation", "test")}
    for name, df in parts.items():
        assert list(df.columns) == ["text", "label"], name
        assert df["label"].between(0, len(LABELS) - 1).all(), name
    train, val = parts["train"], parts["validation"]
    assert len(train) + len(val) == len(raw)
    assert len(val) == math.ceil(len(raw) * tiny_params["split"]["val_fraction"])
    assert sorted(train["text"].tolist() + val["text"].tolist()) == sorted(raw["text"].tolist())
    assert not set(train["text"]) & set(val["text"])
    assert set(val["label"]) == set(train["label"]) == set(range(len(LABELS)))
    assert parts["test"].equals(raw_test[["text", "label"]])
    assert read_json(pipeline.split / "labels.json") == LABELS


def test_split_depends_on_its_seed_only(pipeline: Pipeline, tmp_path: Path, write_params) -> None:
    again, reseeded = Pipeline(tmp_path / "again"), Pipeline(tmp_path / "reseeded")
    for run, overrides in ((again, {}), (reseeded, {"split.seed": 7})):
        run.root.mkdir()
        write_params(run.params, overrides)
        assert run_stage("split", ["--params", str(run.params), "--raw", str(pipeline.raw),
                                   "--out", str(run.split)]) == 0
    for name in ("train.csv", "validation.csv", "test.csv"):
        assert (again.split / name).read_bytes() == (pipeline.split / name).read_bytes()
    assert (reseeded.split / "validation.csv").read_bytes() != \
        (pipeline.split / "validation.csv").read_bytes()


def test_split_keeps_texts_with_line_breaks_whole(pipeline: Pipeline, tmp_path: Path,
                                                  write_params) -> None:
    """A text holding a bare CR, a LF, or quotes comes out of split exactly as it went in."""
    run = Pipeline(tmp_path)
    write_params(run.params)
    shutil.copytree(pipeline.raw, run.raw)
    train = pd.read_csv(run.raw / "train.csv", keep_default_na=False)
    odd = ["carriage\rreturn", "line\nfeed", 'a "quoted"\r\nword']
    train.loc[:2, "text"] = odd
    train.to_csv(run.raw / "train.csv", index=False, quoting=csv.QUOTE_ALL)
    assert run_stage("split", run.argv("split")) == 0
    texts = pd.concat(pd.read_csv(run.split / f"{name}.csv", keep_default_na=False)
                      for name in ("train", "validation"))["text"].tolist()
    assert len(texts) == len(train) and set(odd) <= set(texts)


# --- tokenize -------------------------------------------------------------------------------

def test_tokenize_writes_a_dataset_with_truncated_ids(pipeline: Pipeline) -> None:
    import datasets
    from transformers import AutoTokenizer

    dataset = datasets.load_from_disk(str(pipeline.tokenized / "dataset"))
    assert set(dataset) == {"train", "validation", "test"}
    tokenizer = AutoTokenizer.from_pretrained(pipeline.base)
    for name, part in dataset.items():
        split = pd.read_csv(pipeline.split / f"{name}.csv", keep_default_na=False)
        assert set(part.column_names) == {"input_ids", "label"}
        assert part["label"] == split["label"].tolist()
        assert all(2 <= len(ids) <= 16 for ids in part["input_ids"])
        assert part["input_ids"][0] == tokenizer(split["text"][0], truncation=True, max_length=16)["input_ids"]
    assert read_json(pipeline.tokenized / "tokenized.json") == {
        "task": "classification", "labels": LABELS, "max_length": 16, "padding": "longest",
        "packed": False, "chat_template": ""}


# --- train ----------------------------------------------------------------------------------

def test_train_saves_a_peft_adapter_with_the_head(pipeline: Pipeline, tiny_params) -> None:
    adapter = pipeline.adapter
    for name in ("adapter_model.safetensors", "adapter_config.json", "pipeline.json", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    assert not list(adapter.glob("*.bin"))
    config = read_json(adapter / "adapter_config.json")
    lora = tiny_params["lora"]
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == lora["r"] and config["lora_alpha"] == lora["alpha"]
    assert set(config["target_modules"]) == set(lora["target_modules"])
    assert set(lora["modules_to_save"]) <= set(config["modules_to_save"])

    tensors = safetensors_dict(adapter / "adapter_model.safetensors")
    for layer in range(2):
        for module in lora["target_modules"]:
            for part in ("lora_A", "lora_B"):
                assert any(f"layer.{layer}." in k and f"{module}.{part}" in k for k in tensors)
    head = {k: v.shape for k, v in tensors.items() if ".classifier." in k}
    assert sorted(head.values()) == sorted([torch.Size([4]), torch.Size([4, 64])]), head

    meta = read_json(adapter / "pipeline.json")
    assert meta["labels"] == LABELS and meta["max_length"] == 16
    assert meta["quant"] == tiny_params["quant"]
    assert meta["modules_to_save"] == lora["modules_to_save"]
    assert meta["base"]["name_or_path"] == tiny_params["model"]["name_or_path"]


def test_train_metrics_and_curves(pipeline: Pipeline, tiny_params) -> None:
    metrics = read_json(pipeline.metrics / "train" / "metrics.json")
    cfg = tiny_params["train"]
    assert metrics["steps"] == cfg["max_steps"] == 4
    assert metrics["train_samples"] == cfg["max_steps"] * cfg["batch_size"]
    assert metrics["best_step"] in (2, 4)  # eval_every_steps 2, and at the end
    assert 0.0 <= metrics["best_val_accuracy"] <= 1.0
    timing = read_json(pipeline.metrics / "train" / "timing.json")
    for key, value in {**metrics, **timing}.items():
        if key in ("train_loss", "best_val_loss", *timing):
            assert finite(value) and value > 0, key
    assert metrics["trainable_params"] < metrics["all_params"]
    assert metrics["quant_type"] == "nf4" and metrics["lora_r"] == tiny_params["lora"]["r"]

    plots = pipeline.metrics / "train" / "plots" / "metrics"
    loss = pd.read_csv(plots / "train" / "loss.tsv", sep="\t")
    assert loss["step"].tolist() == [1, 2, 3, 4]  # log_every_steps 1
    assert np.isfinite(loss["loss"]).all()
    assert pd.read_csv(plots / "train" / "lr.tsv", sep="\t")["step"].tolist() == [1, 2, 3, 4]
    val = pd.read_csv(plots / "val" / "accuracy.tsv", sep="\t")
    assert val["step"].tolist() == [2, 4]
    assert metrics["best_val_accuracy"] == pytest.approx(val["accuracy"].max())


def test_saved_adapter_reproduces_the_best_validation_score(pipeline: Pipeline, tiny_params) -> None:
    """The saved adapter is the best checkpoint: rebuilt from disk it scores what train logged.

    Regression (see stages.lib.quantized.keep_cpu_layout): on AVX512-bf16 CPUs bitsandbytes repacked the 4-bit weights for inference during
    validation (absmax rounded to bf16; re-quantized with double_quant) and the inverse did not
    restore them, so every step after the first validation trained and validated a slightly
    different base than the one the adapter is later loaded onto. Sensitive only when the best
    step comes after an earlier validation (tiny params: eval_every_steps 2, max_steps 4).
    """
    metrics = read_json(pipeline.metrics / "train" / "metrics.json")
    data, _ = load_tokenized(pipeline.tokenized)
    sequences, labels = data["validation"]
    classifier = load_adapter(pipeline.adapter, base_dir=pipeline.base)
    eval_batch = tiny_params["train"]["batch_size"] * 4  # as train.validate batches
    logits = torch.from_numpy(classifier.logits(sequences, eval_batch))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item()
    accuracy = (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert (accuracy, loss) == pytest.approx(
        (metrics["best_val_accuracy"], metrics["best_val_loss"]), rel=1e-4), \
        f"best step {metrics['best_step']} of {metrics['steps']}"


# --- evaluate -------------------------------------------------------------------------------

def test_evaluate_metrics_and_plots(pipeline: Pipeline) -> None:
    metrics = read_json(pipeline.metrics / "evaluate" / "metrics.json")
    test = pd.read_csv(pipeline.split / "test.csv", keep_default_na=False)
    assert metrics["test_samples"] == len(test)
    assert finite(metrics["accuracy"]) and 0.0 <= metrics["accuracy"] <= 1.0
    assert finite(metrics["f1_macro"]) and 0.0 <= metrics["f1_macro"] <= 1.0
    assert list(metrics["per_class"]) == LABELS
    for name, scores in metrics["per_class"].items():
        assert all(finite(scores[k]) for k in ("precision", "recall", "f1")), name
        assert scores["support"] == (test["label"] == LABELS.index(name)).sum()
    assert metrics["f1_macro"] == pytest.approx(np.mean([s["f1"] for s in metrics["per_class"].values()]))

    matrix = read_json(pipeline.metrics / "evaluate" / "plots" / "sklearn" / "confusion_matrix.json")
    assert sorted(r["actual"] for r in matrix) == sorted(LABELS[i] for i in test["label"])
    assert {r["predicted"] for r in matrix} <= set(LABELS)
    assert metrics["accuracy"] == pytest.approx(np.mean([r["actual"] == r["predicted"] for r in matrix]))
    per_class = read_json(pipeline.metrics / "evaluate" / "plots" / "custom" / "per_class_f1.json")
    assert [r["class"] for r in per_class] == LABELS


# --- export and round trip ------------------------------------------------------------------

def test_export_bundle(pipeline: Pipeline, tiny_model_dir: Path) -> None:
    export = pipeline.export
    for name in ("adapter_model.safetensors", "adapter_config.json", "pipeline.json",
                 "tokenizer.json", "quantization_config.json", "README.md"):
        assert (export / name).is_file(), name
    assert not (export / "merged").exists()  # export.merged is false
    assert (export / "adapter_model.safetensors").read_bytes() == \
        (pipeline.adapter / "adapter_model.safetensors").read_bytes()
    exported, trained = read_json(export / "pipeline.json"), read_json(pipeline.adapter / "pipeline.json")
    # the same record, but for adapter_config.json (its base renamed) and quantization_config.json
    assert {k: v for k, v in exported.items() if k != "sha256"} == {k: v for k, v in trained.items() if k != "sha256"}
    assert set(exported["sha256"]) == set(trained["sha256"]) | {"quantization_config.json"}
    for name, digest in exported["sha256"].items():
        assert sha256_file(export / name) == digest, name
    assert read_json(export / "adapter_config.json")["base_model_name_or_path"] == str(tiny_model_dir)
    bnb = read_json(export / "quantization_config.json")
    assert bnb["load_in_4bit"] is True and bnb["bnb_4bit_quant_type"] == "nf4"
    assert "classifier" in bnb["llm_int8_skip_modules"]

    card = (export / "README.md").read_text(encoding="utf-8")
    test = read_json(pipeline.metrics / "evaluate" / "metrics.json")
    assert card.startswith("---\nlibrary_name: peft\n")
    assert f"base_model: {tiny_model_dir}" in card
    assert f"accuracy **{test['accuracy']:.4f}**" in card
    assert "0 = World, 1 = Sports, 2 = Business, 3 = Sci/Tech" in card


def test_merged_export_is_the_full_precision_base_plus_lora(pipeline: Pipeline, tmp_path: Path,
                                                            write_params, monkeypatch) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = Pipeline(tmp_path)
    write_params(run.params, {"export.merged": True})
    monkeypatch.chdir(tmp_path)
    assert run_stage("export", ["--params", str(run.params), "--adapter", str(pipeline.adapter),
                                "--base", str(pipeline.base), "--metrics", str(pipeline.metrics),
                                "--out", str(run.export)]) == 0
    merged_dir = run.export / "merged"
    assert (merged_dir / "model.safetensors").is_file() and not list(merged_dir.glob("*.bin"))
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert list(merged.config.id2label.values()) == LABELS
    assert AutoTokenizer.from_pretrained(merged_dir)("hello")["input_ids"]

    data, _ = load_tokenized(pipeline.tokenized)
    sequences = data["test"][0]
    meta = AdapterMeta.load(pipeline.adapter / "pipeline.json")
    cpu = torch.device("cpu")
    base = load_base(pipeline.base, LABELS, dataclasses.replace(meta.quant, type="none"), meta.modules_to_save,
                     cpu, torch.float32)
    unmerged = PeftModel.from_pretrained(base, pipeline.adapter).eval()
    tokens = PackedTokens(sequences, 0, cpu)
    expected = predict_logits(unmerged, tokens, BATCH, cpu, torch.float32)
    got = predict_logits(merged, tokens, BATCH, cpu, torch.float32)
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def test_split(pipeline: Pipeline):
    data, _ = load_tokenized(pipeline.tokenized)
    return data["test"]


@pytest.fixture(scope="module")
def trained_logits(pipeline: Pipeline, test_split) -> np.ndarray:
    """Test-split logits of the trained adapter on the pipeline's models/base."""
    return load_adapter(pipeline.adapter, base_dir=pipeline.base).logits(test_split[0], BATCH)


def test_exported_bundle_predicts_like_the_trained_adapter(pipeline: Pipeline, test_split,
                                                           trained_logits: np.ndarray) -> None:
    exported = load_adapter(pipeline.export)  # base found through pipeline.json alone
    logits = exported.logits(test_split[0], BATCH)
    assert logits.shape == (len(test_split[0]), len(LABELS))
    assert np.allclose(logits, trained_logits, rtol=1e-5, atol=1e-6)
    assert exported.labels == LABELS
    # the evaluate stage scored these same predictions
    accuracy = float(np.mean(trained_logits.argmax(-1) == np.array(test_split[1])))
    assert accuracy == pytest.approx(read_json(pipeline.metrics / "evaluate" / "metrics.json")["accuracy"])


def test_exported_bundle_loads_with_plain_peft(pipeline: Pipeline, test_split,
                                               trained_logits: np.ndarray) -> None:
    from peft import PeftModel

    meta = AdapterMeta.load(pipeline.export / "pipeline.json")
    torch.manual_seed(1234)  # any head init: the saved one must replace it
    base = load_base(pipeline.base, meta.labels, meta.quant, meta.modules_to_save,
                     torch.device("cpu"), torch.float32)
    model = PeftModel.from_pretrained(base, pipeline.export, is_trainable=False).eval()
    cpu = torch.device("cpu")
    logits = predict_logits(model, PackedTokens(test_split[0], 0, cpu), BATCH, cpu, torch.float32)
    assert np.allclose(logits, trained_logits, rtol=1e-5, atol=1e-6)


def test_trained_head_is_saved_not_reinitialized(pipeline: Pipeline, test_split,
                                                 trained_logits: np.ndarray) -> None:
    meta = AdapterMeta.load(pipeline.adapter / "pipeline.json")
    saved = {k: v for k, v in safetensors_dict(pipeline.adapter / "adapter_model.safetensors").items()
             if ".classifier." in k}
    torch.manual_seed(99)
    classifier = load_adapter(pipeline.adapter, base_dir=pipeline.base)
    active = {n: p for n, p in classifier.model.named_parameters()
              if ".classifier." in n and ".original_module." not in n}
    for key, tensor in saved.items():
        suffix = key.rsplit(".", 1)[-1]  # weight | bias
        match = [p for n, p in active.items() if n.endswith(f"classifier.modules_to_save.default.{suffix}")]
        assert len(match) == 1, (key, list(active))
        assert torch.equal(match[0].detach().cpu(), tensor), key
    # a fresh random head (what a missing modules_to_save would leave) predicts differently
    torch.manual_seed(99)
    fresh = load_base(pipeline.base, meta.labels, meta.quant, meta.modules_to_save,
                      torch.device("cpu"), torch.float32).eval()
    cpu = torch.device("cpu")
    fresh_logits = predict_logits(fresh, PackedTokens(test_split[0], 0, cpu), BATCH, cpu, torch.float32)
    assert np.abs(fresh_logits - trained_logits).max() > 1e-2
    assert np.allclose(classifier.logits(test_split[0], BATCH), trained_logits, rtol=1e-5, atol=1e-6)


# --- predict CLI ----------------------------------------------------------------------------

def test_predict_csv_keeps_columns_and_adds_labels(pipeline: Pipeline, tmp_path: Path, test_split,
                                                   trained_logits: np.ndarray, capsys) -> None:
    test = pd.read_csv(pipeline.split / "test.csv", keep_default_na=False)
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": [f"row{i}" for i in range(len(test))], "text": test["text"],
                  "source": "ag"}).to_csv(src, index=False)
    out = tmp_path / "out.csv"
    assert predict.main(["--model", str(pipeline.export), "--input", str(src), "--output", str(out)]) == 0
    assert f"labelled {len(test)} rows -> {out}" in capsys.readouterr().err
    result = pd.read_csv(out, keep_default_na=False)
    assert list(result.columns) == ["id", "text", "source", "label_id", "label", "score"]
    assert result["id"].tolist() == [f"row{i}" for i in range(len(test))]
    assert result["text"].tolist() == test["text"].tolist()
    assert result["label_id"].tolist() == trained_logits.argmax(-1).tolist()
    assert result["label"].tolist() == [LABELS[i] for i in result["label_id"]]
    probs = torch.from_numpy(trained_logits).softmax(-1).max(-1).values.numpy()
    assert np.allclose(result["score"], probs, atol=1e-5)
    assert leftovers(tmp_path) == []


def test_predict_merged_labels_like_the_quantized_model(pipeline: Pipeline, tmp_path: Path,
                                                       trained_logits: np.ndarray) -> None:
    """--merged (LoRA merged into the dequantized base; the last layer for [CLS] only) labels the
    test split as the 4-bit model does, with the same scores to float rounding."""
    test = pd.read_csv(pipeline.split / "test.csv", keep_default_na=False)
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    test[["text"]].to_csv(src, index=False)
    assert predict.main(["--model", str(pipeline.export), "--merged", "--input", str(src), "--output", str(out)]) == 0
    result = pd.read_csv(out, keep_default_na=False)
    assert result["label_id"].tolist() == trained_logits.argmax(-1).tolist()
    probs = torch.from_numpy(trained_logits).softmax(-1).max(-1).values.numpy()
    # Two computations (LoRA merged into the weights, the last layer for [CLS] only) round
    # differently: the largest difference was 5.7e-5 with MKL's default code path and 1.2e-4 with
    # MKL_CBWR=COMPATIBLE (stages/lib/reproducible.py), on this tiny random-init model.
    assert np.allclose(result["score"], probs, atol=3e-4)


def test_predict_keeps_clashing_input_columns_under_a_suffix(pipeline: Pipeline, tmp_path: Path,
                                                             capsys) -> None:
    """A labelled file (text,label) keeps its labels as label_input beside the predictions."""
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    pd.DataFrame({"text": ["Keeper saves penalty", "Oil prices fall"], "label": ["1", "2"],
                  "score": ["x", "y"]}).to_csv(src, index=False)
    assert predict.main(["--model", str(pipeline.export), "--input", str(src), "--output", str(out)]) == 0
    assert "input columns renamed in the output: {'label': 'label_input', 'score': 'score_input'}" \
        in capsys.readouterr().err
    result = pd.read_csv(out, dtype=str)
    assert list(result.columns) == ["text", "label_input", "score_input", "label_id", "label", "score"]
    assert result["label_input"].tolist() == ["1", "2"] and result["score_input"].tolist() == ["x", "y"]
    assert set(result["label"]) <= set(LABELS)


def test_predict_texts_print_one_line_each(pipeline: Pipeline, capsys) -> None:
    texts = ["Stocks rally as oil prices fall", "Keeper saves penalty in cup final"]
    assert predict.main(["--model", str(pipeline.export), *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(texts)
    for line, text in zip(lines, texts):
        label, score, printed = line.split("\t")
        assert label in LABELS and 0.25 <= float(score) <= 1.0 and printed == text


@pytest.mark.parametrize(("content", "expected"), [
    ("", "{src}: empty file (expected a header row with a `text` column)"),
    ("id,body\n1,hello\n", "{src}: no `text` column (found id, body)"),
    (None, "{src}: input file not found"),
], ids=["empty", "no-text-column", "missing"])
def test_predict_bad_input_exits_1_without_output(pipeline: Pipeline, tmp_path: Path, capsys,
                                                  content: str | None, expected: str) -> None:
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    if content is not None:
        src.write_text(content, encoding="utf-8")
    assert predict.main(["--model", str(pipeline.export), "--input", str(src), "--output", str(out)]) == 1
    assert error_message(capsys.readouterr().err) == expected.format(src=src)
    assert not out.exists() and leftovers(tmp_path) == []


def test_predict_header_only_csv_names_the_file(pipeline: Pipeline, tmp_path: Path, capsys) -> None:
    """A CSV with a header and no rows: exit 1, no output, and the message names the file.

    Regression (stages/predict.py predict_csv): pandas yields one empty chunk, the
    tokenizer got [] and raised IndexError (a traceback); the `rows == 0` check meant for this
    case was unreachable, and sat after the `atomic_file` block, which would keep an empty
    output file.
    """
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("id,text\n", encoding="utf-8")
    assert predict.main(["--model", str(pipeline.export), "--input", str(src), "--output", str(out)]) == 1
    assert not out.exists() and leftovers(tmp_path) == []
    assert error_message(capsys.readouterr().err) == f"{src}: no data rows"


@pytest.mark.parametrize(("argv", "expected"), [
    (["--input", "x.csv"], "--input and --output go together"),
    ([], "nothing to label: give --input/--output or texts"),
    (["--batch-size", "0", "hi"], "--batch-size: expected int >= 1, got 0"),
])
def test_predict_usage_errors(pipeline: Pipeline, capsys, argv: list[str], expected: str) -> None:
    assert predict.main(["--model", str(pipeline.export), *argv]) == 1
    assert error_message(capsys.readouterr().err) == expected


def test_predict_rejects_a_pickled_adapter(pipeline: Pipeline, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(pipeline.export, bundle)
    (bundle / "adapter_model.safetensors").rename(bundle / "adapter_model.bin")
    assert predict.main(["--model", str(bundle), "hello"]) == 1
    assert error_message(capsys.readouterr().err) == (
        f"{bundle}: adapter_model.bin is a pickle file; refusing to load it (safetensors only)")
