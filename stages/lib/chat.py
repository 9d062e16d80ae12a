"""Instruction and chat data: reading local files, detecting their format, validating every row,
and turning every row into one conversation (a list of {role, content} messages).

Two formats, detected per file from its first row and then required of every row:

chat         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
             several turns; a system message only first; at least one assistant turn.
instruction  {"instruction": "...", "input": "..." (optional), "output": "..."}: the Alpaca
             layout. It becomes [user, assistant]: the user message is the instruction, or,
             when `input` is not empty, the instruction, a blank line ("\\n\\n") and the input
             (Alpaca's own prompt puts the input after the instruction the same way); the
             assistant message is the output.

Other fields of a row (Alpaca's `text`, a chat set's `prompt_id`) are ignored; so are other keys
of a message (`name`): only role and content reach the chat template.

Local files are .jsonl (one JSON object per line; blank lines are skipped, errors name the
line), .json (one array of objects; errors name the row, from 1) or .parquet (errors name the
row). A hub dataset is loaded by the download stage; its rows go through `conversations_from_rows`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.lib.params import UserError

ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "instruction")
SUFFIXES = (".jsonl", ".json", ".parquet")
CHAT_LAYOUT = ", in chat or instruction format"  # for tables.find_table's error line
INPUT_SEPARATOR = "\n\n"  # between an Alpaca instruction and its input

Message = dict[str, str]
Conversation = list[Message]


def shorten(value: Any, limit: int = 60) -> str:
    """A value for a one-line message: repr, cut at `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def type_name(value: Any) -> str:
    """The JSON name of a value's type with its article ("an array"), for wrong-type messages."""
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "an array",
             dict: "an object", type(None): "null"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), f"a {type(value).__name__}")


def read_rows(path: Path) -> tuple[list[Any], list[str]]:
    """The rows of a local instruction file and where each one is ("line 3", "row 3")."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UserError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except (pa.ArrowException, OSError) as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"{path}: malformed parquet ({reason})") from None
            where = [f"row {i}" for i in range(1, len(rows) + 1)]
        else:
            text = path.read_text(encoding="utf-8-sig")
            if path.suffix == ".json":
                try:
                    rows = json.loads(text) if text.strip() else []
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
                if not isinstance(rows, list):
                    raise UserError(f"{path}: expected a JSON array of objects, got {type_name(rows)}")
                where = [f"row {i}" for i in range(1, len(rows) + 1)]
            else:
                rows, where = [], []
                for number, line in enumerate(text.splitlines(), start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path} line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
                    where.append(f"line {number}")
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not rows:
        raise UserError(f"{path}: empty file (expected {'one JSON object per line' if path.suffix == '.jsonl' else 'rows'} "
                        "in chat (messages) or instruction (instruction, output) format)")
    return rows, where


def detect_format(row: Any, where: str) -> str:
    """`chat` or `instruction`, from the fields of a file's first row."""
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type_name(row)}")
    if "messages" in row and "instruction" in row:
        raise UserError(f"{where}: both `messages` and `instruction` fields (expected one format: chat or instruction)")
    if "messages" in row:
        return "chat"
    if "instruction" in row:
        return "instruction"
    fields = ", ".join(map(str, row)) or "none"
    raise UserError(f"{where}: neither a `messages` field (chat format) nor an `instruction` field "
                    f"(instruction format); found fields: {fields}")


def text_field(row: Mapping[str, Any], name: str, where: str, required: bool) -> str:
    """A string field of a row: required ones must be present and not blank."""
    value = row.get(name)
    if value is None:
        if required:
            raise UserError(f"{where}: no `{name}` (expected a non-empty string)")
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: `{name}` is {type_name(value)} (expected a string)")
    if required and not value.strip():
        raise UserError(f"{where}: `{name}` is empty (expected a non-empty string)")
    return value


def chat_conversation(row: Mapping[str, Any], where: str) -> Conversation:
    """A chat row's messages, validated: roles, contents, a system message only first, an
    assistant turn."""
    messages = row["messages"]
    if not isinstance(messages, list):
        raise UserError(f"{where}: `messages` is {type_name(messages)} (expected an array of "
                        "{role, content} objects)")
    if not messages:
        raise UserError(f"{where}: `messages` is empty (expected user and assistant turns)")
    conversation: Conversation = []
    for index, message in enumerate(messages):
        at = f"{where} messages[{index}]"
        if not isinstance(message, Mapping):
            raise UserError(f"{at}: {type_name(message)} (expected a {{role, content}} object)")
        role = message.get("role")
        if role not in ROLES:
            got = "no role" if role is None else f"role {shorten(role)}"
            raise UserError(f"{at}: {got} (expected one of {', '.join(ROLES)})")
        if role == "system" and index > 0:
            raise UserError(f"{at}: a system message after the first message (expected it first or not at all)")
        conversation.append({"role": role, "content": text_field(message, "content", at, required=True)})
    if not any(m["role"] == "assistant" for m in conversation):
        raise UserError(f"{where}: no assistant turn (expected at least one message with role assistant "
                        "to train on)")
    return conversation


def instruction_conversation(row: Mapping[str, Any], where: str) -> Conversation:
    """An Alpaca row as [user, assistant]; the input follows the instruction after a blank line."""
    instruction = text_field(row, "instruction", where, required=True)
    extra = text_field(row, "input", where, required=False)
    output = text_field(row, "output", where, required=True)
    prompt = instruction + INPUT_SEPARATOR + extra if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def conversations_from_rows(rows: Sequence[Any], source: str,
                            where: Sequence[str] | None = None) -> tuple[str, list[Conversation]]:
    """Detect the format of `rows` (from the first), validate each and convert it; `source`
    names the file or dataset in errors, `where` each row's place (default "row 1", ...)."""
    if not rows:
        raise UserError(f"{source}: no rows (expected chat (messages) or instruction (instruction, output) rows)")
    where = [f"row {i}" for i in range(1, len(rows) + 1)] if where is None else where
    kind = detect_format(rows[0], f"{source} {where[0]}")
    key = "messages" if kind == "chat" else "instruction"
    convert = chat_conversation if kind == "chat" else instruction_conversation
    conversations = []
    for row, place in zip(rows, where):
        at = f"{source} {place}"
        if detect_format(row, at) != kind:  # an object with one of the two fields: checked there
            raise UserError(f"{at}: no `{key}` field (the file is in {kind} format, detected from its first row)")
        conversations.append(convert(row, at))
    return kind, conversations


def read_conversations(path: str | Path) -> tuple[str, list[Conversation]]:
    """A local instruction file's format and conversations, every row validated."""
    rows, where = read_rows(Path(path))
    return conversations_from_rows(rows, str(path), where)


def prompt_and_answer(conversation: Conversation) -> tuple[Conversation, str]:
    """The messages before the last assistant turn (what a model is asked) and that turn's text
    (the reference answer)."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last], conversation[last]["content"]


def conversation_lines(conversations: Sequence[Conversation]) -> str:
    """Conversations as chat-format JSON Lines (what the split stage writes, read_conversations reads)."""
    return "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations)
