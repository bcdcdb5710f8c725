r"""Every accepted row shape, read into the one record type, and format detection.

A reader takes one row (a decoded JSON value, or a CSV row) and returns the findings
it has about it plus the record it maps to (None when the row has an error). It never
raises on bad data. Problems are named by the row's own fields (alpaca `output`, ShareGPT
`conversations[2].from`), and the chat checks (roles, empty answers, the last message
from the assistant) run on the conversation each row maps to.

    chat_jsonl         {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    prompt_completion  {"prompt": "hi", "completion": "hello"}      (or lists of messages, OpenAI's newer shape)
    alpaca             {"instruction": "hi", "input": "", "output": "hello"}
    sharegpt           {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
      each ->          Conversation(user: "hi", assistant: "hello")

    alpaca with input  {"instruction": "Translate to French", "input": "cat", "output": "chat"}
      ->               Conversation(user: "Translate to French\n\ncat", assistant: "chat")

    dpo                {"input": {"messages": [{"role": "user", "content": "2+2?"}]},
                        "preferred_output": [{"role": "assistant", "content": "4"}],
                        "non_preferred_output": [{"role": "assistant", "content": "5"}]}
    chosen_rejected    {"prompt": "2+2?", "chosen": "4", "rejected": "5"}       (or lists of messages)
      each ->          PreferencePair(prompt: (user: "2+2?",), chosen: (assistant: "4",), rejected: (assistant: "5",))

ShareGPT `from` values: human, user -> user; gpt, assistant -> assistant; system -> system;
function_call -> assistant (the model's call, kept as text); observation, tool -> tool.
An optional top-level "system" string becomes the first (system) message.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import get_args

from tunelab.config import DataFormat
from tunelab.data.findings import KINDS, Finding
from tunelab.data.records import ROLES, Conversation, Message, PreferencePair, Role

Record = Conversation | PreferencePair

FORMATS: tuple[str, ...] = get_args(DataFormat)  # "auto" first, then every concrete format
DETECT_ROWS = 20  # format "auto" votes over this many first object rows

SHAREGPT_ROLES: dict[str, Role] = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "function_call": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool",
}

# What each format's row looks like: the `not_an_object` message and the fixes quote these.
SHAPES: dict[str, str] = {
    "chat_jsonl": "'messages'",
    "prompt_completion": "'prompt' and 'completion'",
    "alpaca": "'instruction' and 'output'",
    "sharegpt": "'conversations'",
    "dpo": "'input', 'preferred_output' and 'non_preferred_output'",
    "chosen_rejected": "'prompt', 'chosen' and 'rejected'",
}
KEYS: dict[str, tuple[str, ...]] = {  # the top-level keys each format reads; others are `unknown_key`
    "chat_jsonl": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations", "system"),
    "dpo": ("input", "preferred_output", "non_preferred_output"),
    "chosen_rejected": ("prompt", "chosen", "rejected"),
}
EXAMPLES: dict[str, str] = {
    "chat_jsonl": '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}',
    "prompt_completion": '{"prompt": ..., "completion": ...}',
    "alpaca": '{"instruction": ..., "input": ..., "output": ...}',
    "sharegpt": '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}',
    "dpo": '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}',
    "chosen_rejected": '{"prompt": ..., "chosen": ..., "rejected": ...}',
}

_MISSING = object()


class RowFindings:
    """The findings of one row, in the order found."""

    def __init__(self, line: int) -> None:
        self.line = line
        self.findings: list[Finding] = []

    def add(self, kind: str, field: str, message: str, fix: str) -> None:
        self.findings.append(Finding(kind, self.line, field, message, fix))

    @property
    def has_errors(self) -> bool:
        return any(KINDS[f.kind].severity == "error" for f in self.findings)


@dataclass(frozen=True, slots=True)
class _Turn:
    message: Message
    role_field: str  # where the role came from: "messages[2].role", or "completion" for a plain string


@dataclass(frozen=True, slots=True)
class _MessageShape:
    role_key: str
    content_key: str
    roles: dict[str, Role]  # accepted spelling -> our role
    weight: bool  # whether a "weight" key is part of the shape

    @property
    def known(self) -> tuple[str, ...]:
        return (self.role_key, self.content_key) + (("weight",) if self.weight else ())


OPENAI = _MessageShape("role", "content", {r: r for r in ROLES}, weight=True)  # type: ignore[misc]
SHAREGPT = _MessageShape("from", "value", SHAREGPT_ROLES, weight=False)


# ---------------------------------------------------------------- detection


def detect_format(row: dict) -> str | None:
    """The format one object row looks like, from its keys; None when no known key is there."""
    keys = set(row)
    if "messages" in keys:
        return "chat_jsonl"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"preferred_output", "non_preferred_output"}:
        return "dpo"
    if keys & {"chosen", "rejected"}:
        return "chosen_rejected"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if "completion" in keys:
        return "prompt_completion"
    return None


def vote_format(rows: Iterable[object]) -> str | None:
    """The most common format among the first DETECT_ROWS object rows (ties: the one seen first)."""
    votes: Counter[str] = Counter()
    seen = 0
    for row in rows:
        if not isinstance(row, dict):
            continue
        if (fmt := detect_format(row)) is not None:
            votes[fmt] += 1
        seen += 1
        if seen == DETECT_ROWS:
            break
    return votes.most_common(1)[0][0] if votes else None  # most_common keeps first-seen order on ties


# ---------------------------------------------------------------- one row


def parse_row(fmt: str | None, value: object, line: int, source: str) -> tuple[list[Finding], Record | None]:
    """One decoded JSON row in format `fmt` -> (its findings, its record or None when it has errors).

    `fmt` None: the format is unknown (reported once for the file); only non-objects are reported.
    """
    row = RowFindings(line)
    if not isinstance(value, dict):
        missing = f"missing {SHAPES[fmt]}: " if fmt else ""
        row.add("not_an_object", "", f"{missing}the row is {_json_type(value)}, not an object",
                f"write one JSON object per row: {EXAMPLES[fmt or 'chat_jsonl']}")
        return row.findings, None
    if fmt is None:
        return row.findings, None
    record = _PARSERS[fmt](value, row, source)
    _unknown_keys(value, KEYS[fmt], "", row)  # last: a row's errors come before its warnings
    return row.findings, None if row.has_errors else record


def parse_csv_row(cells: dict[str, str], line: int, source: str, input_column: str,
                  output_column: str) -> tuple[list[Finding], Conversation | None]:
    """One CSV row (header -> cell) -> (findings, Conversation(user=input, assistant=output)). Cells are stripped."""
    row = RowFindings(line)
    user, answer = cells.get(input_column, "").strip(), cells.get(output_column, "").strip()
    # The field stays "" for CSV: the message names the column, and `where` is plain file:line.
    if not user:
        row.add("empty_content", "", f"empty '{input_column}' cell", "fill the cell or delete the row")
    if not answer:
        row.add("empty_assistant_content", "", f"empty '{output_column}' cell", "fill the cell or delete the row")
    if row.has_errors:
        return row.findings, None
    return row.findings, Conversation((Message("user", user), Message("assistant", answer)), source)


def _chat(obj: dict, row: RowFindings, source: str) -> Conversation | None:
    turns = _message_list(obj, "messages", "", row, OPENAI)
    if turns is None:
        return None
    _check_turns(turns, "", row)
    return Conversation(tuple(t.message for t in turns), source)


def _prompt_completion(obj: dict, row: RowFindings, source: str) -> Conversation | None:
    prompt = _text_or_messages(obj, "prompt", "user", row)
    completion = _text_or_messages(obj, "completion", "assistant", row)
    if prompt is None or completion is None:
        return None
    _check_turns(prompt + completion, "", row)
    return Conversation(tuple(t.message for t in prompt + completion), source)


def _alpaca(obj: dict, row: RowFindings, source: str) -> Conversation | None:
    instruction = _text(obj, "instruction", "user", row)
    extra = obj.get("input")  # optional; null or "" mean no input
    if extra is not None and not isinstance(extra, str):
        row.add("wrong_type", "input", f"'input' must be a string, got {_json_type(extra)}",
                "write the input as a string, or leave it empty")
        extra = None
    output = _text(obj, "output", "assistant", row)
    if instruction is None or output is None:
        return None
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return Conversation((Message("user", user), Message("assistant", output)), source)


def _sharegpt(obj: dict, row: RowFindings, source: str) -> Conversation | None:
    system = obj.get("system")  # optional (LLaMA-Factory's ShareGPT): the system prompt
    if system is not None and not isinstance(system, str):
        row.add("wrong_type", "system", f"'system' must be a string, got {_json_type(system)}",
                "write the system prompt as a string")
    turns = _message_list(obj, "conversations", "", row, SHAREGPT)
    if turns is None:
        return None
    if isinstance(system, str) and system.strip():
        turns = [_Turn(Message("system", system), "system")] + turns
    _check_turns(turns, "", row)
    return Conversation(tuple(t.message for t in turns), source)


def _dpo(obj: dict, row: RowFindings, source: str) -> PreferencePair | None:
    inp = obj.get("input", _MISSING)
    prompt = None
    if inp is _MISSING:
        row.add("missing_field", "input", "missing 'input'", 'add "input": {"messages": [...]}: the prompt')
    elif not isinstance(inp, dict):
        row.add("wrong_type", "input", f"'input' must be an object with 'messages', got {_json_type(inp)}",
                'write "input": {"messages": [...]}')
    else:
        _unknown_keys(inp, ("messages",), "input.", row)
        prompt = _message_list(inp, "messages", "input.", row, OPENAI)
    chosen = _message_list(obj, "preferred_output", "", row, OPENAI)
    rejected = _message_list(obj, "non_preferred_output", "", row, OPENAI)
    return _pair(prompt, chosen, rejected, ("preferred_output", "non_preferred_output"), row, source)


def _chosen_rejected(obj: dict, row: RowFindings, source: str) -> PreferencePair | None:
    prompt = _text_or_messages(obj, "prompt", "user", row)
    chosen = _text_or_messages(obj, "chosen", "assistant", row)
    rejected = _text_or_messages(obj, "rejected", "assistant", row)
    return _pair(prompt, chosen, rejected, ("chosen", "rejected"), row, source)


_PARSERS = {
    "chat_jsonl": _chat,
    "prompt_completion": _prompt_completion,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "dpo": _dpo,
    "chosen_rejected": _chosen_rejected,
}


# ---------------------------------------------------------------- shared pieces


def _pair(prompt: list[_Turn] | None, chosen: list[_Turn] | None, rejected: list[_Turn] | None,
          names: tuple[str, str], row: RowFindings, source: str) -> PreferencePair | None:
    if prompt is None or chosen is None or rejected is None:
        return None
    _check_turns(prompt, "", row, structure=False)  # repeated roles inside the prompt, reported once
    for answer, name in zip((chosen, rejected), names):
        _check_turns(prompt + answer, name, row, start=len(prompt), weights=False)
    pair = PreferencePair(*(tuple(t.message for t in turns) for turns in (prompt, chosen, rejected)), source)
    if pair.chosen == pair.rejected:
        row.add("identical_pair", names[1], "the chosen and rejected answers are the same",
                "make the rejected answer the worse one, or delete the row")
    return pair


def _check_turns(turns: list[_Turn], list_field: str, row: RowFindings, *, start: int = 0,
                 structure: bool = True, weights: bool = True) -> None:
    """The chat checks on a whole conversation (its messages parsed without error).

    Findings about the conversation as a whole go under `list_field`: "" (the row) for a
    conversation, "chosen" / "rejected" (or OpenAI's names) for the two sides of a pair.
    """
    msgs = [t.message for t in turns]
    assistants = [m for m in msgs if m.role == "assistant"]
    if structure and not assistants:
        row.add("no_assistant_message", list_field, "no assistant message",
                "add the answer as a message with role 'assistant'")
    elif structure and msgs[-1].role != "assistant":
        row.add("last_not_assistant", list_field,
                f"last message is from '{msgs[-1].role}', expected 'assistant'",
                "end each example with the assistant's answer")
    for i in range(max(1, start), len(msgs)):
        if msgs[i].role == msgs[i - 1].role and msgs[i].role != "tool":  # parallel tool results are fine
            row.add("repeated_role", turns[i].role_field, f"two '{msgs[i].role}' messages in a row",
                    "merge them into one message, or add the missing turn between them")
    if weights and assistants and all(m.weight == 0 for m in assistants):
        row.add("nothing_trained", list_field, "every assistant message has weight 0: the example trains nothing",
                "set weight 1 on the answer to train, or delete the row")


def _message_list(obj: dict, key: str, prefix: str, row: RowFindings, shape: _MessageShape) -> list[_Turn] | None:
    """obj[key] as a non-empty list of messages; None (with findings) when it or any message is wrong."""
    value = obj.get(key, _MISSING)
    field = f"{prefix}{key}"
    if value is _MISSING:
        row.add("missing_field", field, f"missing {key!r}", f"add {key!r}: a list of messages")
        return None
    return _messages(value, field, row, shape)


def _messages(value: object, field: str, row: RowFindings, shape: _MessageShape) -> list[_Turn] | None:
    if not isinstance(value, list):
        row.add("wrong_type", field, f"'{field}' must be a list of messages, got {_json_type(value)}",
                f'write "{field}": [{{"{shape.role_key}": ..., "{shape.content_key}": ...}}, ...]')
        return None
    if not value:
        row.add("no_messages", field, f"'{field}' is an empty list", "add the messages, or delete the row")
        return None
    turns = [_message(raw, f"{field}[{i}]", row, shape) for i, raw in enumerate(value)]
    return None if any(t is None for t in turns) else turns  # type: ignore[return-value]


def _message(raw: object, field: str, row: RowFindings, shape: _MessageShape) -> _Turn | None:
    if not isinstance(raw, dict):
        row.add("wrong_type", field, f"a message must be an object, got {_json_type(raw)}",
                f'write {{"{shape.role_key}": ..., "{shape.content_key}": ...}}')
        return None
    role_field, content_field = f"{field}.{shape.role_key}", f"{field}.{shape.content_key}"
    role, content, weight = raw.get(shape.role_key, _MISSING), raw.get(shape.content_key, _MISSING), raw.get("weight", 1)
    ok = True
    if role is _MISSING:
        row.add("missing_field", role_field, f"missing {shape.role_key!r}", f"add {shape.role_key!r}: one of {list(shape.roles)}")
        ok = False
    elif not isinstance(role, str) or role not in shape.roles:
        row.add("unknown_role", role_field, f"unknown role {_show(role)}", f"use one of {list(shape.roles)}")
        ok = False
    if content is _MISSING:
        row.add("missing_field", content_field, f"missing {shape.content_key!r}",
                f"put the message text in {shape.content_key!r}")
        ok = False
    elif not isinstance(content, str):
        row.add("wrong_type", content_field, f"{shape.content_key} must be a string, got {_json_type(content)}",
                f"put the message text in {shape.content_key!r} as a string; lists of content parts are not supported")
        ok = False
    if shape.weight and "weight" in raw and (isinstance(weight, bool) or weight not in (0, 1)):
        row.add("invalid_weight", f"{field}.weight", f"weight must be 0 or 1, got {_show(weight)}",
                "use 1 to train on the message, 0 to keep it as context only")
        ok = False
    _unknown_keys(raw, shape.known, f"{field}.", row)
    if not ok:
        return None
    message = Message(shape.roles[role], content, int(weight))
    if shape.weight and "weight" in raw and message.role != "assistant":
        row.add("weight_on_non_assistant", f"{field}.weight", f"weight on a '{message.role}' message is ignored",
                "remove it: only assistant messages are trained")
    _check_content(message, content_field, row)
    return _Turn(message, role_field)


def _text_or_messages(obj: dict, key: str, role: Role, row: RowFindings) -> list[_Turn] | None:
    """obj[key] as a plain string (one `role` message) or a list of messages (OpenAI's newer shape)."""
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        row.add("missing_field", key, f"missing {key!r}", f"add {key!r}: a string or a list of messages")
        return None
    if isinstance(value, list):
        return _messages(value, key, row, OPENAI)
    if not isinstance(value, str):
        row.add("wrong_type", key, f"{key!r} must be a string or a list of messages, got {_json_type(value)}",
                f"write {key!r} as a string")
        return None
    message = Message(role, value)
    _check_content(message, key, row)
    return [_Turn(message, key)]


def _text(obj: dict, key: str, role: Role, row: RowFindings) -> str | None:
    """A required string field that becomes one `role` message."""
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        row.add("missing_field", key, f"missing {key!r}", f"add {key!r} (a string)")
        return None
    if not isinstance(value, str):
        row.add("wrong_type", key, f"{key!r} must be a string, got {_json_type(value)}", f"write {key!r} as a string")
        return None
    _check_content(Message(role, value), key, row)
    return value


def _check_content(message: Message, field: str, row: RowFindings) -> None:
    if message.content.strip():
        return
    if message.role == "assistant":
        row.add("empty_assistant_content", field, "the assistant's answer is empty", "write the answer, or delete the row")
    elif message.role == "user":
        row.add("empty_content", field, "the user message is empty", "write the user's message, or delete the row")


def _unknown_keys(obj: dict, known: tuple[str, ...], prefix: str, row: RowFindings) -> None:
    for key in obj:
        if key not in known:
            # A key that would not print as itself (empty, spaces at its ends, line breaks) is quoted.
            name = key if key.isprintable() and key.strip() == key and key else json.dumps(key)
            row.add("unknown_key", f"{prefix}{name}", f"unknown key {_show(key)} is ignored",
                    f"remove it or fix its spelling; the keys used here are {', '.join(known)}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a JSON array"
    return "an object"


def _show(value: object, limit: int = 40) -> str:
    """A short, safe rendering of a user's value for a message."""
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 4] + "...'"
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)[:limit]
    return _json_type(value)  # a list or an object: its type says enough
