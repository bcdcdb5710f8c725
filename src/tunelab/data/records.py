"""The one record type (a Conversation of Messages; a PreferencePair for preference data)
and the readers training uses.

Every accepted format (chat JSONL, prompt/completion, Alpaca, ShareGPT, CSV with a
column mapping, preference pairs; see tunelab/data/formats.py) is read at the edge
into these records; nothing downstream knows where a row came from except `source`
("file:line"), kept for error messages.

    CSV   text,category                    ->  Conversation(
          "Where is my card?",card_arrival        system: <system_prompt, if any>
                                                 user: "Where is my card?"
                                                 assistant: "card_arrival")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tunelab.config import DataConfig
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.data.read import Report

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

log = logging.getLogger(__name__)


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



@dataclass(frozen=True, slots=True)
class PreferencePair:
    """A prompt and two answers to it, the chosen one preferred over the rejected one (DPO data).

        prompt:   (user: "Capital of France?",)
        chosen:   (assistant: "Paris.",)
        rejected: (assistant: "Lyon, I think.",)
    """

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]  # ends with an assistant message (usually it is just that one)
    rejected: tuple[Message, ...]  # likewise
    source: str  # "file:line", for error messages

    @property
    def chosen_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.chosen, self.source)

    @property
    def rejected_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.rejected, self.source)


def read_conversations(cfg: DataConfig) -> list[Conversation]:
    """Read `cfg.path` in `cfg.format` for supervised fine-tuning.

    Raises `TunelabError` naming the first error (file:line: field) and how many more
    there are; `tunelab data validate FILE` lists every one. Warnings do not stop training.
    """
    report = _read_checked(cfg)
    if report.pairs:
        raise TunelabError(
            f"the file holds preference pairs ({report.format}), but supervised fine-tuning needs conversations",
            fix="use chat, prompt/completion, Alpaca, ShareGPT or CSV data (preference tuning is not available yet)",
            where=str(cfg.path),
        )
    return with_system_prompt(report.conversations, cfg.system_prompt)


def read_preference_pairs(cfg: DataConfig) -> list[PreferencePair]:
    """Read `cfg.path` as preference pairs (format dpo or chosen_rejected, or auto); errors as `read_conversations`."""
    report = _read_checked(cfg)
    if report.conversations:
        raise TunelabError(
            f"the file holds conversations ({report.format}), but preference tuning needs preference pairs",
            fix="use OpenAI DPO rows (input / preferred_output / non_preferred_output) or prompt / chosen / rejected",
            where=str(cfg.path),
        )
    if not cfg.system_prompt:
        return report.pairs
    system = (Message("system", cfg.system_prompt),)
    return [p if p.prompt[0].role == "system" else replace(p, prompt=system + p.prompt) for p in report.pairs]


def read_csv(path: Path, input_column: str, output_column: str, system_prompt: str | None) -> list[Conversation]:
    """CSV/TSV with a header; one row -> (system?, user=input, assistant=output)."""
    cfg = DataConfig(path=path, format="csv", input_column=input_column, output_column=output_column,
                     system_prompt=system_prompt)
    return read_conversations(cfg)


def read_chat_jsonl(path: Path, system_prompt: str | None = None) -> list[Conversation]:
    """OpenAI chat JSONL: one {"messages": [{"role", "content", "weight"?}, ...]} per line."""
    return read_conversations(DataConfig(path=path, format="chat_jsonl", system_prompt=system_prompt))


def with_system_prompt(convs: list[Conversation], system_prompt: str | None) -> list[Conversation]:
    """Put `system_prompt` before every conversation that does not start with a system message of its own."""
    if not system_prompt:
        return convs
    system = (Message("system", system_prompt),)
    return [c if c.messages[0].role == "system" else replace(c, messages=system + c.messages) for c in convs]


def _read_checked(cfg: DataConfig) -> Report:
    # Imported here, not at the top: validate.py builds the record types defined above.
    from tunelab.data.read import read_checked

    report = read_checked(Path(cfg.path), cfg.format, input_column=cfg.input_column, output_column=cfg.output_column)
    if report.detected:
        log.info("data: detected %s, %s rows", report.format, f"{report.rows:,}")
    if report.warnings:
        log.info("data: %d warnings; `tunelab data validate %s` lists them", len(report.warnings), cfg.path)
    return report
