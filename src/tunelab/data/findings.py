"""What `tunelab data validate` reports: one `Finding` per problem, each of a stable kind.

A finding says where (line, field), what (message) and how to fix it, and prints as

    train.jsonl:3: messages[1].role: unknown role 'bot' (fix: use one of ['system', 'user', 'assistant', 'tool'])

`kind` is a stable identifier (`--json` users and tests match on it, never on the
message text); its severity is fixed here, once: in `KINDS` for what `tunelab data
validate` finds, in `LINT_KINDS` for what `tunelab data lint` finds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Kind:
    severity: Severity
    description: str


KINDS: dict[str, Kind] = {
    # The file as a whole.
    "not_utf8": Kind("error", "bytes that are not UTF-8; the message gives the byte offset in the file"),
    "empty_file": Kind("error", "no rows at all (or a CSV header without rows)"),
    "unknown_format": Kind("error", "format 'auto' found none of the known keys in the first rows"),
    "too_few_examples": Kind("error", "fewer than 10 examples: too few to fine-tune on"),
    "few_examples": Kind("warning", "fewer than 100 examples: expect a weak fine-tune"),
    # Reading a row.
    "invalid_json": Kind("error", "a line (or JSON array element) is not valid JSON; the message gives the column"),
    "invalid_csv": Kind("error", "the CSV reader cannot parse the file from this line on"),
    "missing_column": Kind("error", "CSV: a mapped input/output column is not in the header"),
    "wrong_column_count": Kind("warning", "CSV: a row has more or fewer cells than the header"),
    "not_an_object": Kind("error", "a row is a JSON array, string, number or null instead of an object"),
    "missing_field": Kind("error", "a required key is absent (messages, content, instruction, output, ...)"),
    "wrong_type": Kind("error", "a value has the wrong JSON type (messages not a list, content not a string, ...)"),
    "unknown_key": Kind("warning", "a key tunelab does not use: it is ignored"),
    # The conversation a row maps to.
    "no_messages": Kind("error", "an empty list of messages"),
    "unknown_role": Kind("error", "a role (or ShareGPT 'from') tunelab does not know"),
    "invalid_weight": Kind("error", "an assistant message's weight is not 0 or 1"),
    "weight_on_non_assistant": Kind("warning", "a weight on a non-assistant message: only assistant messages are trained"),
    "empty_content": Kind("error", "a user message (instruction, prompt, input cell) is empty"),
    "empty_assistant_content": Kind("error", "an assistant message (answer, output, completion) is empty"),
    "no_assistant_message": Kind("error", "no assistant message: nothing to train on"),
    "last_not_assistant": Kind("error", "the last message is not from the assistant"),
    "repeated_role": Kind("warning", "two consecutive messages with the same role (tool results excepted)"),
    "nothing_trained": Kind("warning", "every assistant message has weight 0: the example trains nothing"),
    "identical_pair": Kind("warning", "a preference pair whose chosen and rejected answers are the same"),
    # Under a model's chat template (only with --model).
    "template_error": Kind("error", "the model's chat template refuses to render the conversation"),
    "too_long": Kind("warning", "longer than --max-length tokens once rendered: training drops it"),
}

LINT_KINDS: dict[str, Kind] = {
    # Rows that repeat (tunelab/data/overlap.py).
    "exact_duplicate": Kind("warning", "the same conversation as an earlier row, ignoring case and spacing"),
    "near_duplicate": Kind("warning", "nearly the same text as an earlier row (Jaccard of words and word pairs >= threshold)"),
    "conflicting_answers": Kind("error", "the same prompt as an earlier row with a different answer"),
    "leakage_exact": Kind("error", "a row of the evaluation file (--against) whose prompt is also in the training file"),
    "leakage_near": Kind("error", "a row of the evaluation file (--against) whose prompt is nearly one in the training file"),
    # Personal data (tunelab/data/pii.py), reported masked.
    "pii_email": Kind("warning", "an e-mail address"),
    "pii_phone": Kind("warning", "a phone number"),
    "pii_card_number": Kind("warning", "a payment card number (13-19 digits passing the Luhn check)"),
    "pii_iban": Kind("warning", "an IBAN (mod-97 checked)"),
    "pii_ssn": Kind("warning", "a US social security number (valid area, group and serial)"),
    "pii_ip_address": Kind("warning", "a globally routable IPv4 or IPv6 address"),
    # Labels of classification-like data.
    "rare_label": Kind("warning", "a label with fewer than 5 rows"),
    "label_imbalance": Kind("warning", "the most common label has over 10 times the rows of the rarest"),
    # Under a model's chat template (only with --model); template_error above applies too.
    "template_roundtrip": Kind("error", "the trained tokens do not decode to the assistant text and the end-of-turn token"),
}
ALL_KINDS: dict[str, Kind] = KINDS | LINT_KINDS


# Every character str.splitlines() breaks on -> its escape.
_ESCAPE_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    line: int | None  # 1-based physical line where the row starts; None: the file as a whole
    field: str  # "messages[1].role", "output", or "" for the row / the file
    message: str
    fix: str

    def __post_init__(self) -> None:
        assert self.kind in ALL_KINDS, f"unregistered finding kind {self.kind!r}"

    @property
    def severity(self) -> Severity:
        return ALL_KINDS[self.kind].severity

    def where(self, path: Path | str) -> str:
        """`file:line: field`, the parts that are known."""
        where = f"{path}:{self.line}" if self.line is not None else str(path)
        return f"{where}: {self.field}" if self.field else where

    def render(self, path: Path | str) -> str:
        """One line, always: line breaks that came from the data (a template's error message) are escaped."""
        return f"{self.where(path)}: {self.message} (fix: {self.fix})".translate(_ESCAPE_LINE_BREAKS)

    def as_dict(self) -> dict[str, object]:
        return {"line": self.line, "field": self.field, "kind": self.kind, "severity": self.severity,
                "message": self.message, "fix": self.fix}
