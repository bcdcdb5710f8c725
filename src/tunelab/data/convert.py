"""`tunelab data convert FILE -o OUT.jsonl`: any accepted format -> OpenAI chat JSONL.

    alpaca.json  [{"instruction": "Translate to French", "input": "cat", "output": "chat"}]
    ->  OUT.jsonl  {"messages": [{"role": "user", "content": "Translate to French\\n\\ncat"},
                                 {"role": "assistant", "content": "chat"}]}

Preference pairs (dpo, chosen_rejected) are written as OpenAI DPO JSONL
({"input": {"messages"}, "preferred_output", "non_preferred_output"}). A file with any
error is not converted (`tunelab data validate FILE` lists them); the output is written
to a temporary file and renamed, so OUT is never half written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tunelab.data.records import Conversation, PreferencePair
from tunelab.data.validate import Report, read_checked


def convert_file(src: Path, out: Path, fmt: str = "auto", *, input_column: str | None = None,
                 output_column: str | None = None) -> Report:
    """Read `src` (raising `TunelabError` on its first error) and write its records to `out`."""
    report = read_checked(src, fmt, input_column=input_column, output_column=output_column)
    if report.pairs:
        write_jsonl((dpo_row(p) for p in report.pairs), out)
    else:
        write_jsonl((chat_row(c) for c in report.conversations), out)
    return report


def chat_row(conv: Conversation) -> dict:
    """A Conversation as an OpenAI chat JSONL row (weight written only where it is 0)."""
    return {"messages": [
        {"role": m.role, "content": m.content, **({"weight": 0} if m.weight == 0 and m.role == "assistant" else {})}
        for m in conv.messages
    ]}


def dpo_row(pair: PreferencePair) -> dict:
    """A PreferencePair as an OpenAI DPO JSONL row."""
    return {
        "input": {"messages": [{"role": m.role, "content": m.content} for m in pair.prompt]},
        "preferred_output": [{"role": m.role, "content": m.content} for m in pair.chosen],
        "non_preferred_output": [{"role": m.role, "content": m.content} for m in pair.rejected],
    }


def write_jsonl(rows: Iterable[dict], out: Path) -> int:
    """Write rows as JSONL to a temporary file beside `out`, then rename it into place. Returns the row count."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(_jsonl_line(row))
                count += 1
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _jsonl_line(row: dict) -> str:
    # UTF-8 text stays readable (ensure_ascii=False), but the characters str.splitlines() breaks on are
    # escaped, so readers that split lines that way still see one row per line.
    text = json.dumps(row, ensure_ascii=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085") + "\n"
