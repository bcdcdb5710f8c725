"""The one record type (a Conversation of Messages) and the readers that produce it.

Every accepted format is read at the edge into `Conversation`s; nothing downstream
knows where a row came from except `source` ("file:line"), kept for error messages.

    CSV   text,category                    ->  Conversation(
          "Where is my card?",card_arrival        system: <system_prompt, if any>
                                                 user: "Where is my card?"
                                                 assistant: "card_arrival")
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunelab.config import DataConfig
from tunelab.errors import TunelabError

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    weight: int = 1  # assistant messages only: 1 = trained, 0 = context only (OpenAI's `weight`)


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str  # "file:line", for error messages

    @property
    def answer(self) -> str:
        """The last assistant message: the label for classification-like data."""
        return next(m.content for m in reversed(self.messages) if m.role == "assistant")

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """Everything before the last assistant message: what a model sees at inference."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return self.messages[:last]

    def as_dicts(self) -> list[dict[str, str]]:
        """Messages in the shape chat templates expect."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


def read_conversations(cfg: DataConfig) -> list[Conversation]:
    """Read `cfg.path` in `cfg.format`; raise `TunelabError` naming file:line and field on bad input."""
    path = Path(cfg.path)
    if not path.is_file():
        raise TunelabError(f"data file not found: {path}", fix="check data.path (relative to the config file)")
    if cfg.format == "csv":
        rows = read_csv(path, cfg.input_column, cfg.output_column, cfg.system_prompt)
    else:
        rows = read_chat_jsonl(path, cfg.system_prompt)
    if not rows:
        raise TunelabError("no examples in the file", fix="add examples, one per line/row", where=str(path))
    return rows


def read_csv(path: Path, input_column: str, output_column: str, system_prompt: str | None) -> list[Conversation]:
    """CSV/TSV with a header; one row -> (system?, user=input, assistant=output)."""
    text = _read_utf8(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # newline="": the csv module handles line ends itself (quoted cells may hold newlines; U+2028 is text).
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    for column, key in ((input_column, "input_column"), (output_column, "output_column")):
        if column not in header:
            raise TunelabError(
                f"column '{column}' not found; the header has {header}",
                fix=f"set data.{key} to one of the header's columns",
                where=f"{path}:1",
            )
    out: list[Conversation] = []
    for row in reader:
        user, answer = (row.get(input_column) or "").strip(), (row.get(output_column) or "").strip()
        where = f"{path}:{reader.line_num}"  # the row's last physical line (quoted cells may span lines)
        if not user:
            raise TunelabError(f"empty '{input_column}'", fix="fill the cell or delete the row", where=where)
        if not answer:
            raise TunelabError(f"empty '{output_column}'", fix="fill the cell or delete the row", where=where)
        messages = [Message("user", user), Message("assistant", answer)]
        if system_prompt:
            messages.insert(0, Message("system", system_prompt))
        out.append(Conversation(tuple(messages), where))
    return out


def read_chat_jsonl(path: Path, system_prompt: str | None = None) -> list[Conversation]:
    """OpenAI chat JSONL: one {"messages": [{"role", "content", "weight"?}, ...]} per line.

    This is the strict reader training needs; `tunelab data validate` (a later
    stage) reports every problem of a file at once.
    """
    out: list[Conversation] = []
    # split("\n"), not splitlines(): U+2028 and friends are legal inside JSON strings.
    for line_no, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TunelabError(f"invalid JSON at column {exc.colno}: {exc.msg}", fix="write one JSON object per line", where=where) from None
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list) or not messages:
            raise TunelabError("missing 'messages' list", fix='write {"messages": [{"role": ..., "content": ...}]}', where=where)
        parsed = [_parse_message(m, f"{where}: messages[{i}]") for i, m in enumerate(messages)]
        if not any(m.role == "assistant" for m in parsed):
            raise TunelabError("no assistant message", fix="add the answer as a message with role 'assistant'", where=where)
        if parsed[-1].role != "assistant":
            raise TunelabError(
                f"last message is from '{parsed[-1].role}', expected 'assistant'",
                fix="end each example with the assistant's answer",
                where=where,
            )
        if system_prompt and parsed[0].role != "system":
            parsed.insert(0, Message("system", system_prompt))
        out.append(Conversation(tuple(parsed), where))
    return out


def _parse_message(raw: object, where: str) -> Message:
    if not isinstance(raw, dict):
        raise TunelabError("a message must be an object", fix='write {"role": ..., "content": ...}', where=where)
    role, content, weight = raw.get("role"), raw.get("content"), raw.get("weight", 1)
    if role not in ROLES:
        raise TunelabError(f"unknown role {role!r}", fix=f"use one of {list(ROLES)}", where=f"{where}.role")
    if not isinstance(content, str):
        raise TunelabError("content must be a string", fix="put the message text in 'content'", where=f"{where}.content")
    if weight not in (0, 1):
        raise TunelabError(f"weight must be 0 or 1, got {weight!r}", fix="use 0 (not trained) or 1", where=f"{where}.weight")
    return Message(role, content, int(weight))


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TunelabError(
            f"not UTF-8 (byte {exc.start})", fix="re-save the file as UTF-8", where=str(path)
        ) from None
