"""Unit tests of stages/lib helpers the stage tests cannot pin down on their own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import LABELS
from stages.lib.batches import PackedTokens, StreamedTokens, length_grouped_batches
from stages.lib.io import atomic_dir, atomic_file
from stages.lib.params import UserError
from stages.lib.tables import parse_labels

# --- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [True, False])
def test_length_grouped_batches_cover_every_example_once(group: bool) -> None:
    lengths = [(i * 7) % 23 + 1 for i in range(100)]
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0), group)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert [len(b) for b in batches].count(8) == 12 and sum(map(len, batches)) == 100
    again = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0), group)
    other = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(1), group)
    assert batches == again and batches != other


def packed(lengths: list[int], multiple_of: int = 1, min_width: int = 0) -> PackedTokens:
    """Token ids 1..n per example (0 pads), on the CPU."""
    return PackedTokens([list(range(1, n + 1)) for n in lengths], 0, torch.device("cpu"),
                        min_width, multiple_of)


def test_inference_batches_run_longest_first() -> None:
    order, batches = packed([3, 1, 2, 5]).inference_batches(2, min_rows=10)
    assert order.tolist() == [3, 0, 2, 1] and batches == [(0, 2), (2, 4)]


def test_inference_batches_group_widths_and_stay_bounded() -> None:
    """Every example once, no batch over batch_size; a group of one width and at least min_rows
    examples has batches of its own, cut equally; smaller groups share padded batches."""
    lengths = [5] * 7 + [4] + [3] * 3 + [2] * 5
    order, batches = packed(lengths).inference_batches(4, min_rows=5)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    assert order.tolist()[:7] == list(range(7))  # stable: equal lengths keep their input order
    assert batches == [(0, 4), (4, 7), (7, 11), (11, 14), (14, 16)]
    # on a GPU (widths rounded up to a multiple of 8) they are all one group of width 8
    order, batches = packed(lengths, multiple_of=8).inference_batches(4, min_rows=5)
    assert batches == [(0, 4), (4, 8), (8, 12), (12, 16)]


@pytest.mark.parametrize("store", [PackedTokens, StreamedTokens])
def test_rows_mask_only_padded_batches(store) -> None:
    """A batch whose rows fill its width runs without a mask; otherwise the mask hides the
    padding; the ids are those of the examples in the order given. Packed on the device once
    or on the host per batch, the batches are the same."""
    def tokens_of(lengths, multiple_of=1):
        return store([list(range(1, n + 1)) for n in lengths], 0, torch.device("cpu"), 0, multiple_of)

    tokens = tokens_of([2, 3, 3, 1])
    order, _ = tokens.inference_batches(8, min_rows=1)
    ordered = tokens.reordered(order)
    assert order.tolist() == [1, 2, 0, 3] and ordered.lengths == [3, 3, 2, 1]
    full = ordered.rows(0, 2)
    assert list(full) == ["input_ids"] and full["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3]]
    padded = ordered.rows(1, 4)
    assert padded["input_ids"].tolist() == [[1, 2, 3], [1, 2, 0], [1, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert padded["input_ids"].dtype == padded["attention_mask"].dtype == torch.int64
    wide = tokens_of([3, 3], multiple_of=8).rows(0, 2)  # rounded up to 8: padded, so masked
    assert wide["input_ids"].shape == (2, 8) and wide["attention_mask"].sum().item() == 6


def test_read_dataset_dict_equals_datasets_load_from_disk(tmp_path: Path) -> None:
    """The stages read the tokenize stage's DatasetDict with pyarrow alone: the same columns and
    values as `datasets.load_from_disk`, over several Arrow files per split and every column kind
    the stages write (id lists, class ids, nested sft targets with None, strings)."""
    import datasets

    from stages.lib.tokenized import read_dataset_dict

    rows = 50
    parts = {
        "train": datasets.Dataset.from_dict({"input_ids": [list(range(i % 7 + 1)) for i in range(rows)],
                                             "label": [i % 4 for i in range(rows)]}),
        "test": datasets.Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(rows)],
                                            "labels": [[-100, i] for i in range(rows)],
                                            "position_ids": [[0, 1] for _ in range(rows)],
                                            "conversation": [f'[{{"role": "user", "content": "{i}"}}]'
                                                             for i in range(rows)]}),
    }
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "dataset"), num_shards={"train": 3, "test": 2})
    assert len(list((tmp_path / "dataset" / "train").glob("*.arrow"))) == 3
    expected = datasets.load_from_disk(str(tmp_path / "dataset"))
    found = read_dataset_dict(tmp_path / "dataset")
    assert list(found) == list(expected)
    for split, part in expected.items():
        assert found[split] == {name: part[name] for name in part.column_names}


def test_read_dataset_dict_names_a_damaged_file(tmp_path: Path) -> None:
    import datasets

    from stages.lib.tokenized import read_dataset_dict

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1, 2]]})}).save_to_disk(
        str(tmp_path / "dataset"))
    arrow = next((tmp_path / "dataset" / "train").glob("*.arrow"))
    arrow.write_bytes(b"not arrow")
    with pytest.raises(UserError, match=f"{arrow.name}: expected an Arrow stream file"):
        read_dataset_dict(tmp_path / "dataset")
    (tmp_path / "dataset" / "train" / "state.json").write_text("[]")
    with pytest.raises(UserError, match="state.json: expected _data_files"):
        read_dataset_dict(tmp_path / "dataset")
    (tmp_path / "dataset" / "dataset_dict.json").unlink()
    with pytest.raises(UserError, match="dataset_dict.json: not found"):
        read_dataset_dict(tmp_path / "dataset")


def test_parse_labels_accepts_names_and_ids() -> None:
    assert parse_labels(["Sports", " 3 ", "World", "0"], LABELS, Path("t.csv")) == [1, 3, 0, 0]


@pytest.mark.parametrize("value", ["Sprots", "4", "-1", "1.0", "",
                                   pytest.param("²", id="superscript-2")])
def test_parse_labels_rejects_other_values_as_user_errors(value: str) -> None:
    """Every bad label is a UserError naming file, row and value.

    BUG (stages/lib/data.py parse_labels, now in tables.py): "²" passes `str.isdigit()` but `int("²")` raises
    ValueError, so a stray superscript digit crashes split with a traceback.
    """
    with pytest.raises(UserError) as info:
        parse_labels(["World", value], LABELS, Path("t.csv"))
    assert str(info.value).startswith(f"t.csv row 2: unknown label {value.strip()!r} (expected one of ")


# --- io -------------------------------------------------------------------------------------


def test_atomic_dir_replaces_on_success_and_keeps_old_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "c.txt").write_text("3")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write("partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(target) as f:
        f.write("done")
    assert target.read_text() == "done" and list(tmp_path.iterdir()) == [target]


# --- model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_validation_leaves_4bit_weights_as_they_were(tiny_model_dir: Path, double_quant: bool) -> None:
    """train validates mid-training: eval mode, an inference pass, back to train mode. Every
    4-bit layer must then compute exactly as before, or training goes on with, and saves an
    adapter for, a different base than the one on disk.

    Regression: on AVX512-bf16 CPUs bitsandbytes repacks 4-bit weights for inference and
    rounds their absmax scales to bf16, and its inverse keeps the rounded scales (re-quantized
    under double quant); stages.lib.quantized.keep_cpu_layout turns the repacking off.
    On CPUs without AVX512-bf16 nothing is repacked and this test passes trivially.
    """
    from bitsandbytes.nn import Linear4bit

    from stages.lib.params import Quant
    from stages.lib.quantized import load_base

    quant = Quant(type="nf4", double_quant=double_quant, compute_dtype="fp32", cache_dequantized=False)
    model = load_base(tiny_model_dir, LABELS, quant, ["classifier"], torch.device("cpu"), torch.float32)
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    torch.manual_seed(0)
    x = torch.randn(4, layer.in_features)
    layer.train()
    before = layer(x.clone().requires_grad_(True)).detach()
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    after = layer(x.clone().requires_grad_(True)).detach()
    change = (after - before).abs().max().item()
    assert change == 0.0, f"layer output moved by up to {change:.3g} (of {before.abs().max().item():.3g})"


def test_adapter_config_is_written_byte_stably(tmp_path: Path) -> None:
    """PEFT saves target_modules from a set: its order follows the hash seed, so two runs of the
    same params would give adapters with different DVC hashes unless the list is sorted."""
    from stages.lib.adapter_meta import write_adapter_config

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"target_modules": ["value", "query"], "base_model_name_or_path": "models/base"}))
    write_adapter_config(tmp_path, base_model_name_or_path="org/base")
    first = (tmp_path / "adapter_config.json").read_bytes()
    assert json.loads(first) == {"target_modules": ["query", "value"], "base_model_name_or_path": "org/base"}
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "models/base", "target_modules": ["query", "value"]}))
    write_adapter_config(tmp_path, base_model_name_or_path="org/base")
    assert (tmp_path / "adapter_config.json").read_bytes() == first


def tiny_bert_classifier(**config: Any):
    """A random-init 2-layer BertForSequenceClassification with large weights (so that small
    changes of function show in the logits), 3 texts of 11 ids and a padding mask."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(**{"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "intermediate_size": 128, "num_labels": 4,
                           "initializer_range": 0.5, **config})
    ids = torch.randint(0, 100, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    return BertForSequenceClassification(config).eval(), ids, mask


def test_gelu_epilogue_fusion_keeps_outputs() -> None:
    """Merged inference on a GPU replaces BERT's FFN Linear + GELU with one matmul whose epilogue
    applies GELU. On the CPU the fused op is exact erf GELU, so outputs must not move (weights
    large enough that tanh GELU would move them by ~1e-3); GELU-tanh and GPT-2's Conv1D MLP are
    left alone."""
    from transformers import GPT2Config, GPT2Model

    from stages.lib.fast_bert import LinearGELU, fuse_gelu_epilogue

    model, ids, mask = tiny_bert_classifier()
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
        assert fuse_gelu_epilogue(model) == 2
        after = model(input_ids=ids, attention_mask=mask).logits
    assert all(isinstance(layer.intermediate.dense, LinearGELU) for layer in model.bert.encoder.layer)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    tanh_bert, _, _ = tiny_bert_classifier(hidden_act="gelu_new")
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    assert fuse_gelu_epilogue(tanh_bert) == 0 and fuse_gelu_epilogue(gpt2) == 0


def test_first_token_last_layer_keeps_classifier_logits() -> None:
    """Merged inference computes BertForSequenceClassification's last layer for [CLS] only:
    the logits must not move beyond float rounding, with padded and unpadded batches, a layer
    compiled by compile_regions stays compiled, and other models and attention kernels are
    left alone."""
    from accelerate.utils import compile_regions
    from transformers import BertForMaskedLM

    from stages.lib.fast_bert import FirstTokenLayer, first_token_last_layer

    model, ids, mask = tiny_bert_classifier()
    with torch.inference_mode():
        before = [model(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids).logits]
        compiled = compile_regions(model)
        assert first_token_last_layer(model) and first_token_last_layer(compiled)
        after = [model(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids).logits]
        assert model.bert(input_ids=ids, attention_mask=mask).last_hidden_state.shape == (3, 1, 64)
        last = compiled.bert.encoder.layer[-1]
        assert isinstance(last, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(last._orig_mod, FirstTokenLayer)
        with torch._dynamo.config.patch(disable=True):  # the same modules, without compiling
            after.append(compiled(input_ids=ids, attention_mask=mask).logits)
    for got, want in zip(after, before + before[:1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (before[0] - before[1]).abs().max() > 1e-2  # the padding mask matters to these logits
    assert not first_token_last_layer(BertForMaskedLM(model.config))  # reads every position
    flex, _, _ = tiny_bert_classifier()
    flex.config._attn_implementation = "flex_attention"  # its mask is not a 4-D tensor
    assert not first_token_last_layer(flex)


def test_sha256_files_hashes_in_order_and_verify_names_the_changed_file(tmp_path: Path) -> None:
    """Base files are hashed several at a time (lib.io.sha256_files); each digest must still be
    that file's, in the order given, and one flipped byte among many files is found and named."""
    import hashlib

    from stages.lib.io import sha256_files, verify_sha256

    paths = []
    for i in range(9):
        paths.append(tmp_path / f"model-{i:05d}.safetensors")
        paths[-1].write_bytes(bytes([i]) * (300_000 + 7 * i))
    digests = sha256_files(paths)
    assert digests == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    record = {p.name: d for p, d in zip(paths, digests)}
    verify_sha256(tmp_path, record, tmp_path / "SOURCE.json")
    data = bytearray(paths[6].read_bytes())
    data[1234] ^= 1
    paths[6].write_bytes(bytes(data))
    with pytest.raises(UserError, match="model-00006.safetensors: corrupt or modified"):
        verify_sha256(tmp_path, record, tmp_path / "SOURCE.json")
