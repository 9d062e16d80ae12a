"""User mistakes: exit status 1, one `error:` line naming the file/key, value and what was
expected, and no output left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import ROOT, Pipeline, error_message, leftovers, run_stage
from stages.lib.adapter import load_adapter
from stages.lib.batches import PackedTokens, StreamedTokens
from stages.lib.params import UserError

LABEL_CHOICES = "World, Sports, Business, Sci/Tech or an id 0-3"


def assert_nothing_written(*outs: Path) -> None:
    for out in outs:
        assert not out.exists(), f"{out} was written"
        assert leftovers(out.parent) == [], f"temporaries left in {out.parent}"


# --- split: bad tables ----------------------------------------------------------------------

@pytest.fixture
def raw_dir(tmp_path: Path, tiny_data_dir: Path) -> Path:
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        shutil.copyfile(tiny_data_dir / name, raw / name)
    return raw


def run_split(tmp_path: Path, raw: Path, write_params, overrides=None) -> int:
    params = write_params(tmp_path / "params.yaml", overrides)
    return run_stage("split", ["--params", str(params), "--raw", str(raw),
                               "--out", str(tmp_path / "data" / "split")])


def edit_csv(path: Path, edit) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(df)
    df.to_csv(path, index=False)


def _cell(column: str, row: int, value: str):
    """Set a cell; `row` is 1-based over data rows, as the stage reports it."""
    return lambda df: df.__setitem__(column, df[column].where(df.index != row - 1, value))


SPLIT_ERRORS = [
    ("missing-column", "train.csv", lambda df: df.rename(columns={"label": "topic"}, inplace=True),
     "{path}: missing column(s) label (found text, topic)"),
    ("empty-text", "train.csv", _cell("text", 5, ""),
     "{path} row 5: empty text in column 'text'"),
    ("blank-text", "test.csv", _cell("text", 3, "   "),
     "{path} row 3: empty text in column 'text'"),
    ("unknown-label", "train.csv", _cell("label", 7, "Sprots"),
     "{path} row 7: unknown label 'Sprots' (expected one of " + LABEL_CHOICES + ")"),
    ("label-id-out-of-range", "test.csv", _cell("label", 2, "4"),
     "{path} row 2: unknown label '4' (expected one of " + LABEL_CHOICES + ")"),
]


@pytest.mark.parametrize(("table", "edit", "expected"), [c[1:] for c in SPLIT_ERRORS],
                         ids=[c[0] for c in SPLIT_ERRORS])
def test_split_rejects_bad_table(tmp_path: Path, raw_dir: Path, write_params, capsys,
                                 table: str, edit, expected: str) -> None:
    edit_csv(raw_dir / table, edit)
    assert run_split(tmp_path, raw_dir, write_params) == 1
    assert error_message(capsys.readouterr().err) == expected.format(path=raw_dir / table)
    assert_nothing_written(tmp_path / "data" / "split")


def test_split_accepts_label_names_and_ids(tmp_path: Path, raw_dir: Path, write_params) -> None:
    edit_csv(raw_dir / "train.csv", lambda df: df.__setitem__(
        "label", [["World", "Sports", "Business", "Sci/Tech"][int(v)] if i % 2 else v
                  for i, v in enumerate(df["label"])]))
    assert run_split(tmp_path, raw_dir, write_params) == 0
    split = pd.concat(pd.read_csv(tmp_path / "data" / "split" / f"{n}.csv") for n in ("train", "validation"))
    assert sorted(split["label"].value_counts().tolist()) == [15, 15, 15, 15]


def test_split_rejects_too_small_validation_share(tmp_path: Path, raw_dir: Path, write_params,
                                                  capsys) -> None:
    assert run_split(tmp_path, raw_dir, write_params, {"split.val_fraction": 0.05}) == 1
    assert error_message(capsys.readouterr().err) == (
        "split.val_fraction: 0.05 of 60 rows cannot hold every one of 4 labels in both splits "
        "(label counts: {0: 15, 1: 15, 2: 15, 3: 15})")
    assert_nothing_written(tmp_path / "data" / "split")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_split_rejects_null_text(tmp_path: Path, raw_dir: Path, write_params, capsys,
                                 suffix: str) -> None:
    """A null text must be an error, as an empty CSV cell is.

    Regression (stages/lib/data.py read_table, as committed): JSON Lines and Parquet nulls
    survived `.astype(str)` as missing values (pandas 3), passed the `str.strip() == ""` check
    and were written to data/split as empty cells: a silently empty training example.
    """
    df = pd.read_csv(raw_dir / "train.csv", dtype=str, keep_default_na=False)
    (raw_dir / "train.csv").unlink()
    df = pd.DataFrame({"text": [None if i == 3 else t for i, t in enumerate(df["text"])],
                       "label": df["label"].astype(int)})
    path = raw_dir / f"train{suffix}"
    if suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    assert run_split(tmp_path, raw_dir, write_params) == 1, "a null text was accepted"
    assert error_message(capsys.readouterr().err) == f"{path} row 4: empty text in column 'text'"
    assert_nothing_written(tmp_path / "data" / "split")


def test_split_rejects_two_train_files(tmp_path: Path, raw_dir: Path, write_params, capsys) -> None:
    shutil.copyfile(raw_dir / "train.csv", raw_dir / "train.jsonl")
    assert run_split(tmp_path, raw_dir, write_params) == 1
    assert error_message(capsys.readouterr().err) == (
        f"{raw_dir}: more than one train file (expected exactly one of train.csv, train.jsonl, "
        "train.parquet)")


# --- missing inputs -------------------------------------------------------------------------

MISSING_INPUT = {
    "split": ("raw", "raw dataset"),
    "tokenize": ("split", "split dataset"),
    "train": ("base", "base model"),
    "evaluate": ("tokenized", "tokenized dataset"),
    "export": ("adapter", "trained adapter"),
}


@pytest.mark.parametrize("stage", list(MISSING_INPUT))
def test_stage_without_its_input_exits_1(stage: str, tmp_path: Path, write_params, capsys) -> None:
    run = Pipeline(tmp_path)
    write_params(run.params)
    attr, what = MISSING_INPUT[stage]
    assert run_stage(stage, run.argv(stage)) == 1
    assert error_message(capsys.readouterr().err) == (
        f"{getattr(run, attr)}: {what} not found (expected a directory; run `dvc repro`)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# --- download: model sources ----------------------------------------------------------------

def test_download_uncached_hub_model_offline(tmp_path: Path, write_params) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE and HF_HOME at import time: run in a subprocess."""
    repo_id = "qlora-pipeline-tests/not-a-cached-model"
    run = Pipeline(tmp_path / "work")
    run.root.mkdir()
    write_params(run.params, {"model.name_or_path": repo_id})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": str(ROOT)}
    (tmp_path / "hf-home").mkdir()
    proc = subprocess.run([sys.executable, "-m", "stages.download", *run.argv("download")],
                          cwd=run.root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert error_message(proc.stderr) == (
        f"model.name_or_path: {repo_id!r} is not in the local Hugging Face cache and the hub "
        "cannot be reached. Download it where the hub is reachable, or set "
        "model.name_or_path to a local directory with config.json, *.safetensors and "
        "tokenizer files (dvc exp run -S model.name_or_path=/path/to/model)")
    assert "Traceback" not in proc.stderr
    assert_nothing_written(run.raw, run.base)


@pytest.mark.parametrize(("files", "expected"), [
    (("config.json", "pytorch_model.bin"),
     "model.name_or_path: {model}: only pickle weights (pytorch_model.bin); refusing to load "
     "them. Convert the model to safetensors first"),
    (("config.json",), "model.name_or_path: {model}: no *.safetensors weights in {model}"),
    (("model.safetensors",),
     "model.name_or_path: {model} has no config.json (expected a model directory with "
     "config.json, *.safetensors and tokenizer files)"),
], ids=["pickle-only", "no-weights", "no-config"])
def test_download_refuses_unsafe_or_incomplete_model_dir(tmp_path: Path, write_params, capsys,
                                                         tiny_model_dir: Path, files, expected) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in files:
        src = tiny_model_dir / ("model.safetensors" if name.endswith(".bin") else name)
        shutil.copyfile(src, model / name)  # the .bin is never unpickled: any bytes do
    run = Pipeline(tmp_path / "work")
    run.root.mkdir()
    write_params(run.params, {"model.name_or_path": str(model)})
    assert run_stage("download", run.argv("download")) == 1
    assert error_message(capsys.readouterr().err) == expected.format(model=model)
    assert_nothing_written(run.raw, run.base)


def test_download_rejects_a_file_as_data_source(tmp_path: Path, write_params, capsys,
                                                tiny_data_dir: Path) -> None:
    run = Pipeline(tmp_path / "work")
    run.root.mkdir()
    source = tiny_data_dir / "train.csv"
    write_params(run.params, {"data.source": str(source)})
    assert run_stage("download", run.argv("download")) == 1
    assert error_message(capsys.readouterr().err) == (
        f"data.source: {source} is a file; expected a directory holding train and test files "
        "(.csv, .jsonl or .parquet)")
    assert_nothing_written(run.raw, run.base)


# --- train / adapters -----------------------------------------------------------------------

def test_train_rejects_unknown_target_module(pipeline: Pipeline, tmp_path: Path, write_params,
                                             capsys) -> None:
    run = Pipeline(tmp_path)
    write_params(run.params, {"lora.target_modules": ["query", "qkv_proj"]})
    argv = run.argv("train")
    argv[argv.index("--data") + 1], argv[argv.index("--base") + 1] = str(pipeline.tokenized), str(pipeline.base)
    assert run_stage("train", argv) == 1
    message = error_message(capsys.readouterr().err)
    assert message.startswith("lora.target_modules: qkv_proj not in this model (its linear layers: ")
    assert "query" in message and "\n" not in message
    assert_nothing_written(run.adapter, run.metrics / "train")


def damage(path: Path, how: str) -> None:
    """Truncate a file, or flip one byte in its tensor data (which still parses: a wrong model)."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2:]
    else:
        data[-5] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped-byte"])
def test_damaged_adapter_is_refused(pipeline: Pipeline, tmp_path: Path, how: str) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(pipeline.adapter, adapter)
    damage(adapter / "adapter_model.safetensors", how)
    with pytest.raises(UserError) as info:
        load_adapter(adapter, base_dir=pipeline.base)
    assert str(info.value) == (
        f"{adapter}/adapter_model.safetensors: corrupt or modified (sha256 differs from "
        f"{adapter}/pipeline.json); rerun the stage that wrote it (dvc repro --force <stage>)")


@pytest.mark.parametrize("keep", [0.5, 8 / 1e9], ids=["half", "header-only"])
def test_truncated_adapter_is_a_user_error(pipeline: Pipeline, tmp_path: Path, keep: float) -> None:
    """Weights that do not parse fail cleanly even when their recorded hash was updated to match."""
    from stages.lib.io import sha256_file

    adapter = tmp_path / "adapter"
    shutil.copytree(pipeline.adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:max(8, int(len(data) * keep))])
    meta = json.loads((adapter / "pipeline.json").read_text())
    meta["sha256"]["adapter_model.safetensors"] = sha256_file(weights)
    (adapter / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as info:
        load_adapter(adapter, base_dir=pipeline.base)
    assert str(info.value).startswith(
        f"{adapter}: adapter_model.safetensors is corrupt or does not match the base model (")
    assert "\n" not in str(info.value)


def test_damaged_base_model_is_refused(pipeline: Pipeline, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(pipeline.base, base)
    damage(base / "model.safetensors", "flipped-byte")
    with pytest.raises(UserError, match=r"^.*/base/model\.safetensors: corrupt or modified \(sha256 "
                                        r"differs from .*/base/SOURCE\.json\)"):
        load_adapter(pipeline.adapter, base_dir=base)


def test_evaluate_with_corrupt_adapter_exits_1(pipeline: Pipeline, tmp_path: Path, write_params,
                                               capsys) -> None:
    run = Pipeline(tmp_path)
    write_params(run.params)
    shutil.copytree(pipeline.adapter, run.adapter)
    damage(run.adapter / "adapter_model.safetensors", "truncated")
    argv = ["--params", str(run.params), "--data", str(pipeline.tokenized), "--base", str(pipeline.base),
            "--adapter", str(run.adapter), "--metrics-out", str(run.metrics / "evaluate")]
    assert run_stage("evaluate", argv) == 1
    assert error_message(capsys.readouterr().err).startswith(
        f"{run.adapter}/adapter_model.safetensors: corrupt or modified (sha256 differs")
    assert_nothing_written(run.metrics / "evaluate")


def test_adapter_dir_without_weights(pipeline: Pipeline, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(pipeline.adapter, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"adapter: no adapter_model\.safetensors$"):
        load_adapter(adapter, base_dir=pipeline.base)


# --- running out of memory ----------------------------------------------------------------

OUT_OF_MEMORY = {
    "gpu": (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 3.00 GiB", "GPU"),
    "host": (RuntimeError, "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 3221225472 bytes.", "host"),
}


def fail_batches(monkeypatch: pytest.MonkeyPatch, error: type, text: str) -> None:
    """Every batch fails to allocate, as a batch too large for the device would."""
    def batch(self, *args):
        raise error(text)
    monkeypatch.setattr(PackedTokens, "batch", batch)  # training batches
    monkeypatch.setattr(PackedTokens, "rows", batch)  # validation batches
    monkeypatch.setattr(StreamedTokens, "rows", batch)  # evaluate, predict and serve batches


@pytest.mark.parametrize("kind", OUT_OF_MEMORY)
def test_train_out_of_memory_names_the_param(pipeline: Pipeline, tmp_path: Path, write_params,
                                             monkeypatch, capsys, kind: str) -> None:
    error, text, where = OUT_OF_MEMORY[kind]
    run = Pipeline(tmp_path)
    write_params(run.params)
    fail_batches(monkeypatch, error, text)
    argv = run.argv("train")
    argv[argv.index("--data") + 1], argv[argv.index("--base") + 1] = str(pipeline.tokenized), str(pipeline.base)
    monkeypatch.chdir(run.root)
    assert run_stage("train", argv) == 1
    assert error_message(capsys.readouterr().err) == (
        f"out of {where} memory at train.batch_size 8: lower train.batch_size (dvc exp run -S "
        "train.batch_size=N), or set train.gradient_checkpointing: true")
    assert_nothing_written(run.adapter, run.metrics / "train")


def test_evaluate_out_of_memory_names_the_param(pipeline: Pipeline, tmp_path: Path, write_params,
                                                monkeypatch, capsys) -> None:
    run = Pipeline(tmp_path)
    write_params(run.params)
    fail_batches(monkeypatch, *OUT_OF_MEMORY["gpu"][:2])
    argv = ["--params", str(run.params), "--data", str(pipeline.tokenized), "--base", str(pipeline.base),
            "--adapter", str(pipeline.adapter), "--metrics-out", str(run.metrics / "evaluate")]
    monkeypatch.chdir(run.root)
    assert run_stage("evaluate", argv) == 1
    assert error_message(capsys.readouterr().err) == (
        "out of GPU memory at evaluate.batch_size 16: lower evaluate.batch_size")
    assert_nothing_written(run.metrics / "evaluate")


def test_other_runtime_errors_keep_their_traceback(pipeline: Pipeline, tmp_path: Path,
                                                   write_params, monkeypatch) -> None:
    """Only memory errors become a message; any other RuntimeError is a bug and must show."""
    run = Pipeline(tmp_path)
    write_params(run.params)
    fail_batches(monkeypatch, RuntimeError, "mat1 and mat2 shapes cannot be multiplied")
    argv = ["--params", str(run.params), "--data", str(pipeline.tokenized), "--base", str(pipeline.base),
            "--adapter", str(pipeline.adapter), "--metrics-out", str(run.metrics / "evaluate")]
    monkeypatch.chdir(run.root)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_stage("evaluate", argv)
    assert_nothing_written(run.metrics / "evaluate")


# --- predict outputs, checked before the model loads -----------------------------------------

@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.cli import predict

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(predict, "load_adapter", refuse)


@pytest.mark.parametrize("case", ["directory", "same-as-input", "same-via-other-spelling", "parent-is-a-file"])
def test_predict_refuses_bad_output_before_loading(pipeline: Pipeline, tmp_path: Path, capsys,
                                                   no_model_load, case: str) -> None:
    from stages.cli import predict

    src = tmp_path / "in.csv"
    src.write_text("text\nhello\n")
    original = src.read_bytes()
    out, expected = {
        "directory": (tmp_path, f"--output {tmp_path}: is a directory (expected a CSV file to write)"),
        "same-as-input": (src, f"--output {src}: the same file as --input (refusing to overwrite the input)"),
        "same-via-other-spelling": (tmp_path / "." / "in.csv",
                                    f"--output {tmp_path / '.' / 'in.csv'}: the same file as --input "
                                    "(refusing to overwrite the input)"),
        "parent-is-a-file": (src / "out.csv", f"--output {src / 'out.csv'}: {src} is not a directory"),
    }[case]
    assert predict.main(["--model", str(pipeline.export), "--input", str(src), "--output", str(out)]) == 1
    assert error_message(capsys.readouterr().err) == expected
    assert src.read_bytes() == original


# --- params files a stage is given directly ---------------------------------------------------

@pytest.mark.parametrize(("key", "value", "expected"), [
    ("split.seed", -1, "split.seed: expected int >= 0, got -1"),
    ("train.seed", 2**32, "train.seed: expected int <= 4294967295, got 4294967296"),
    ("generate.seed", -7, "generate.seed: expected int >= 0, got -7"),
    ("lora.alpha", float("inf"), "lora.alpha: expected a finite float, got inf"),
    ("train.lr", float("nan"), "train.lr: expected a finite float, got nan"),
    ("train.max_grad_norm", float("inf"), "train.max_grad_norm: expected a finite float, got inf"),
    ("split.val_fraction", float("-inf"), "split.val_fraction: expected a finite float, got -inf"),
])
def test_params_reject_out_of_range_seeds_and_non_finite_floats(tmp_path: Path, raw_dir: Path, write_params,
                                                                 capsys, key: str, value, expected: str) -> None:
    assert run_split(tmp_path, raw_dir, write_params, {key: value}) == 1
    assert error_message(capsys.readouterr().err) == f"{tmp_path / 'params.yaml'}: {expected}"
    assert_nothing_written(tmp_path / "data" / "split")


def test_every_float_key_rejects_non_finite(tmp_path: Path) -> None:
    import typing

    from stages.lib.params import SCHEMA, _check_value

    floats = [(section, f) for section, cls in SCHEMA.items() for f in __import__("dataclasses").fields(cls)
              if typing.get_type_hints(cls)[f.name] is float]
    assert floats
    for section, f in floats:
        for bad in (float("inf"), float("-inf"), float("nan")):
            assert _check_value(f"{section}.{f.name}", bad, float, f.metadata) is not None, (section, f.name, bad)


@pytest.mark.parametrize(("content", "expected"), [
    (b"split:\n  seed: 4\xff2\n", "not UTF-8 text (byte 16: invalid start byte)"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply to be a params file"),
])
def test_unreadable_params_file_is_one_line(tmp_path: Path, raw_dir: Path, capsys, content: bytes,
                                            expected: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_bytes(content)
    assert run_stage("split", ["--params", str(params), "--raw", str(raw_dir),
                               "--out", str(tmp_path / "data" / "split")]) == 1
    assert error_message(capsys.readouterr().err) == f"{params}: {expected}"
