"""The shipped instruction set: rebuilt byte for byte, valid, disjoint, fits max_length."""

from __future__ import annotations

import importlib.util
import json
import random

from sft_helpers import ROOT, stand_in_tokenizer

from stages.lib.chat import read_conversations
from stages.lib.chat_template import encode_conversations

DATA = ROOT / "data" / "instructions"
AG_NEWS_TOPICS = {"World", "Sports", "Business", "Sci/Tech"}


def load_builder():
    spec = importlib.util.spec_from_file_location("build_instructions", DATA / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_files_are_what_build_py_makes() -> None:
    build = load_builder()
    rng = random.Random(build.SEED)
    for split, per_source in (("train", build.TRAIN_PER_SOURCE), ("test", build.TEST_PER_SOURCE)):
        rows = build.build(split, per_source, rng)
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        assert (DATA / f"{split}.jsonl").read_text(encoding="utf-8") == text


def test_rows_are_valid_balanced_and_disjoint() -> None:
    with open(ROOT / "data" / "banking77" / "categories.json", encoding="utf-8") as f:
        intents = set(json.load(f))
    inputs = {}
    for split, size in (("train", 2000), ("test", 200)):
        rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert len(rows) == size
        banking = [r["output"] for r in rows if r["source"] == "banking77"]
        news = [r["output"] for r in rows if r["source"] == "ag_news"]
        assert len(banking) == len(news) == size // 2
        assert set(banking) == intents and set(news) == AG_NEWS_TOPICS
        assert {news.count(t) for t in AG_NEWS_TOPICS} == {size // 8}
        inputs[split] = {r["input"] for r in rows}
        kind, conversations = read_conversations(DATA / f"{split}.jsonl")
        assert kind == "instruction" and len(conversations) == size
    assert not inputs["train"] & inputs["test"]


def test_every_row_fits_the_recipe_max_length() -> None:
    """conf/task/sft.yaml's tokenize.max_length holds every row whole with the stand-in tokenizer."""
    import yaml

    max_length = yaml.safe_load((ROOT / "conf" / "task" / "sft.yaml").read_text(encoding="utf-8"))["tokenize"]["max_length"]
    tokenizer = stand_in_tokenizer()
    for split in ("train", "test"):
        _, conversations = read_conversations(DATA / f"{split}.jsonl")
        assert encode_conversations(tokenizer, conversations, max_length, split).truncated == 0
