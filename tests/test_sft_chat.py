"""Instruction data: reading .jsonl/.json/.parquet, format detection, row validation, conversion."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from stages.lib.chat import (INPUT_SEPARATOR, conversations_from_rows, prompt_and_answer,
                             read_conversations)
from stages.lib.params import UserError

CHAT_ROW = {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}
ALPACA_ROWS = [{"instruction": "Name the topic.", "input": "Stocks fell.", "output": "Business"},
               {"instruction": "Say hi.", "input": "", "output": "hi"},
               {"instruction": "Say bye.", "output": "bye", "text": "ignored"}]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(UserError) as caught:
        read_conversations(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_chat_jsonl_keeps_every_turn(tmp_path: Path) -> None:
    kind, conversations = read_conversations(write_jsonl(tmp_path / "train.jsonl", [CHAT_ROW, CHAT_ROW]))
    assert kind == "chat" and len(conversations) == 2
    assert conversations[0] == CHAT_ROW["messages"]
    prompt, answer = prompt_and_answer(conversations[0])
    assert prompt == CHAT_ROW["messages"][:4] and answer == "4"


def test_instruction_json_joins_input_after_a_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ALPACA_ROWS), encoding="utf-8")
    kind, conversations = read_conversations(path)
    assert kind == "instruction"
    assert conversations[0] == [{"role": "user", "content": "Name the topic." + INPUT_SEPARATOR + "Stocks fell."},
                                {"role": "assistant", "content": "Business"}]
    assert INPUT_SEPARATOR == "\n\n"
    assert conversations[1][0]["content"] == "Say hi."  # an empty input adds nothing
    assert conversations[2] == [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "bye"}]


def test_parquet_chat_and_instruction(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([CHAT_ROW]), tmp_path / "chat.parquet")
    assert read_conversations(tmp_path / "chat.parquet") == ("chat", [CHAT_ROW["messages"]])
    rows = [{"instruction": "a", "input": None, "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    kind, conversations = read_conversations(tmp_path / "alpaca.parquet")
    assert kind == "instruction" and conversations[0][0]["content"] == "a"
    assert conversations[1][0]["content"] == "c\n\nd"


def test_rows_from_a_hub_dataset() -> None:
    kind, conversations = conversations_from_rows(ALPACA_ROWS, "tatsu-lab/alpaca train")
    assert kind == "instruction" and len(conversations) == 3
    with pytest.raises(UserError, match=r"^tatsu-lab/alpaca train row 2: `output` is empty"):
        conversations_from_rows([ALPACA_ROWS[0], {"instruction": "x", "output": " "}], "tatsu-lab/alpaca train")


def message_row(**changes: Any) -> dict[str, Any]:
    """CHAT_ROW with its third message (the first assistant turn) changed."""
    messages = [dict(m) for m in CHAT_ROW["messages"]]
    messages[2].update(changes)
    messages[2] = {k: v for k, v in messages[2].items() if v is not None}
    return {"messages": messages}


@pytest.mark.parametrize(("row", "expected"), [
    (message_row(content=None), r"line 2 messages\[2\]: no `content` \(expected a non-empty string\)"),
    (message_row(content="  "), r"line 2 messages\[2\]: `content` is empty"),
    (message_row(content=4), r"line 2 messages\[2\]: `content` is a number \(expected a string\)"),
    (message_row(role="bot"), r"line 2 messages\[2\]: role 'bot' \(expected one of system, user, assistant\)"),
    (message_row(role=None), r"line 2 messages\[2\]: no role"),
    (message_row(role="system"), r"line 2 messages\[2\]: a system message after the first"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"line 2: no assistant turn"),
    ({"messages": "hi"}, r"line 2: `messages` is a string \(expected an array"),
    ({"messages": []}, r"line 2: `messages` is empty"),
    ({"messages": ["hi"]}, r"line 2 messages\[0\]: a string \(expected a \{role, content\} object\)"),
    ({"instruction": "x", "output": "y"}, r"line 2: no `messages` field \(the file is in chat format"),
    ([1, 2], r"line 2: expected a JSON object, got an array"),
])
def test_bad_chat_rows_name_file_row_and_field(tmp_path: Path, row: Any, expected: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT_ROW, row])
    assert re.search(expected, error_of(path))


@pytest.mark.parametrize(("row", "expected"), [
    ({"instruction": "x"}, r"row 2: no `output`"),
    ({"instruction": "", "output": "y"}, r"row 2: `instruction` is empty"),
    ({"instruction": "x", "input": 3, "output": "y"}, r"row 2: `input` is a number"),
    ({"instruction": ["x"], "output": "y"}, r"row 2: `instruction` is an array"),
    ({"messages": [], "instruction": "x"}, r"row 2: both `messages` and `instruction` fields"),
    ({"messages": []}, r"row 2: no `instruction` field \(the file is in instruction format"),
    ({"prompt": "x"}, r"row 2: neither a `messages` field"),
])
def test_bad_instruction_rows(tmp_path: Path, row: Any, expected: str) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([ALPACA_ROWS[0], row]), encoding="utf-8")
    assert re.search(expected, error_of(path))


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("train.jsonl", "", "empty file"),
    ("train.jsonl", "\n  \n", "empty file"),
    ("train.json", "[]", "empty file"),
    ("train.json", "{\"a\": 1}", "expected a JSON array of objects, got an object"),
    ("train.json", "[{", "not valid JSON"),
    ("train.jsonl", "{\"messages\": [}\n", "line 1: not valid JSON"),
    ("train.jsonl", "{\"text\": \"x\"}\n", "line 1: neither a `messages` field"),
    ("train.jsonl", "{\"messages\": [], \"instruction\": \"x\"}\n", "line 1: both `messages` and `instruction`"),
    ("train.csv", "instruction,output\n", "unsupported file type"),
])
def test_bad_files(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert expected in error_of(path)


def test_missing_file_and_empty_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert "not found" in error_of(tmp_path / "nope.jsonl")
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    assert "empty file" in error_of(tmp_path / "empty.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    assert "malformed parquet" in error_of(tmp_path / "bad.parquet")
