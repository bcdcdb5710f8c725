"""The readers training uses: a data file (or records in memory) -> checked records, or one clear error.

    rows = read_conversations(cfg.data)                  # supervised fine-tuning: Conversations
    pairs = read_preference_pairs(cfg.data)              # DPO: PreferencePairs
    rows = read_conversations(cfg.data, records=[{"messages": [...]}, ...])   # in memory, any accepted shape

Every row goes through the validator (`validate.py`), so training and `tunelab data validate` agree on
what is an error. The first error raises `TunelabError` with its place (`file:line: field`; in-memory
records are numbered from 1: `records:3`) and the count of the others; warnings are logged and do not
stop training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.data.records import Conversation, Message, PreferencePair
from tunelab.data.validate import Report, raise_for_errors, read_checked, validate_bytes
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

IN_MEMORY = Path("records")  # how findings name records passed in memory: records:3 is the third
Records = Sequence[Conversation | PreferencePair | dict]


def read_conversations(cfg: DataConfig, records: Records | None = None) -> list[Conversation]:
    """The conversations of `cfg.path` (in `cfg.format`), or of `records`, with `cfg.system_prompt` applied."""
    report = _read_checked(cfg, records)
    if report.pairs:
        raise TunelabError(
            f"the data holds preference pairs ({report.format}), but supervised fine-tuning needs conversations",
            fix="set objective: dpo to train on preference pairs, or use chat, prompt/completion, Alpaca, ShareGPT "
                "or CSV data", where=_name(cfg, records))
    return with_system_prompt(report.conversations, cfg.system_prompt)


def read_preference_pairs(cfg: DataConfig, records: Records | None = None) -> list[PreferencePair]:
    """The preference pairs of `cfg.path` (format dpo or chosen_rejected, or auto), or of `records`."""
    report = _read_checked(cfg, records)
    if report.conversations:
        raise TunelabError(
            f"the data holds conversations ({report.format}), but preference tuning needs preference pairs",
            fix="use OpenAI DPO rows (input / preferred_output / non_preferred_output) or prompt / chosen / rejected, "
                "or set objective: sft", where=_name(cfg, records))
    if not cfg.system_prompt:
        return report.pairs
    system = (Message("system", cfg.system_prompt),)
    return [p if p.prompt[0].role == "system" else replace(p, prompt=system + p.prompt) for p in report.pairs]


def with_system_prompt(convs: list[Conversation], system_prompt: str | None) -> list[Conversation]:
    """Put `system_prompt` before every conversation that does not start with a system message of its own."""
    if not system_prompt:
        return convs
    system = (Message("system", system_prompt),)
    return [c if c.messages[0].role == "system" else replace(c, messages=system + c.messages) for c in convs]


def records_bytes(records: Records) -> bytes:
    """Records in memory as the JSONL the validator reads (typed records in OpenAI's shapes), one per line."""
    lines = []
    for record in records:
        if isinstance(record, Conversation):
            record = {"messages": [_message_dict(m) for m in record.messages]}
        elif isinstance(record, PreferencePair):
            record = {"input": {"messages": [_message_dict(m) for m in record.prompt]},
                      "preferred_output": [_message_dict(m) for m in record.chosen],
                      "non_preferred_output": [_message_dict(m) for m in record.rejected]}
        lines.append(json.dumps(record, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _message_dict(m: Message) -> dict[str, object]:
    out: dict[str, object] = {"role": m.role, "content": m.content}
    if m.role == "assistant" and m.weight != 1:
        out["weight"] = m.weight
    return out


def _name(cfg: DataConfig, records: Records | None) -> str:
    return str(IN_MEMORY if records is not None else cfg.path)


def _read_checked(cfg: DataConfig, records: Records | None) -> Report:
    if records is not None:
        fmt = "auto" if cfg.format == "csv" else cfg.format  # records in memory are JSON-shaped, never CSV rows
        report = validate_bytes(records_bytes(records), IN_MEMORY, fmt, input_column=cfg.input_column,
                                output_column=cfg.output_column, min_examples=0, recommended_examples=0)
        raise_for_errors(report)
    elif cfg.path is None:
        raise TunelabError("no data: the config sets no data.path", fix="set data.path to a data file "
                           "(relative to the config), or pass records=[...] to tunelab.train")
    else:
        report = read_checked(cfg.path, cfg.format, input_column=cfg.input_column, output_column=cfg.output_column)
    if report.detected:
        log.info("data: detected %s, %s rows", report.format, f"{report.rows:,}")
    if report.warnings:
        log.info("data: %d warnings; `tunelab data validate %s` lists them", len(report.warnings), _name(cfg, records))
    return report
