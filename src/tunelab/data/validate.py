"""`tunelab data validate FILE`: every problem of every row, with its line and field, in one pass.

    $ tunelab data validate train.jsonl
    detected: chat_jsonl, 12 rows
    errors (2):
    train.jsonl:3: messages[1].role: unknown role 'bot' (fix: use one of ['system', 'user', 'assistant', 'tool'])
    train.jsonl:7: invalid JSON at column 18: Expecting ',' delimiter (fix: write one JSON object per line ...)
    warnings (1):
    train.jsonl: only 12 examples, fewer than 100 (fix: add examples if you can ...)
    note: lengths not checked: no tokenizer (pass --model to check them under its chat template)
    summary: 2 errors, 1 warning in 12 rows
      error    invalid_json  1
      ...

How: the bytes are split into physical lines and decoded one by one (a bad byte is a
finding on its line; the rest of the file is still read); each JSON line, element of a
JSON array file, or CSV row is parsed into findings + an optional record by
tunelab/data/formats.py; then the checks on the file as a whole (how many examples) and,
given a tokenizer, each example's length under the model's chat template.

Nothing here raises on bad data: only a missing file, an unknown format name or a model
that cannot be loaded (usage errors) raise `TunelabError`. Training reads its data through
`read_checked`, which raises on the first error and counts the others.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tunelab.config import DataConfig
from tunelab.data.findings import KINDS, Finding
from tunelab.data.formats import FORMATS, Record, parse_csv_row, parse_row, vote_format
from tunelab.data.records import Conversation, PreferencePair
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MIN_EXAMPLES = 10  # fewer is an error
RECOMMENDED_EXAMPLES = 100  # fewer is a warning
_DEFAULTS = DataConfig.model_fields  # the column names and max_length default live there, once
_JSON_SPACE = " \t\r"  # JSON whitespace on a line ("\n" already split off)


@dataclass
class Report:
    path: Path
    format: str  # the format read ("unknown" when format "auto" found none)
    detected: bool  # True when chosen by format "auto"
    rows: int  # rows read: non-blank JSON lines, array elements, CSV data rows
    findings: list[Finding]  # sorted by line; findings about the whole file last
    conversations: list[Conversation] = field(default_factory=list)  # the rows without errors
    pairs: list[PreferencePair] = field(default_factory=list)  # likewise, for preference formats
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def examples(self) -> int:
        return len(self.conversations) + len(self.pairs)

    def counts(self) -> dict[str, int]:
        """Findings per kind, errors first, then by count."""
        counts = Counter(f.kind for f in self.findings)
        return dict(sorted(counts.items(), key=lambda kv: (KINDS[kv[0]].severity != "error", -kv[1], kv[0])))

    def headline(self) -> str:
        return f"{'detected' if self.detected else 'format'}: {self.format}, {_count(self.rows, 'row')}"

    def to_json(self) -> dict:
        return {
            "path": str(self.path), "format": self.format, "detected": self.detected, "rows": self.rows,
            "examples": self.examples, "ok": not self.errors,
            "findings": [f.as_dict() for f in self.findings],
            "counts": {"errors": len(self.errors), "warnings": len(self.warnings), "by_kind": self.counts()},
            "notes": self.notes,
        }


@dataclass
class _Read:
    format: str
    rows: int = 0
    findings: list[Finding] = field(default_factory=list)
    records: list[tuple[int, Record]] = field(default_factory=list)  # (line, record)


def validate_file(
    path: Path | str,
    fmt: str = "auto",
    *,
    input_column: str | None = None,
    output_column: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    min_examples: int = MIN_EXAMPLES,
    recommended_examples: int = RECOMMENDED_EXAMPLES,
) -> Report:
    """Every problem of the file at `path` read as `fmt` (CSV columns default to data.input_column/output_column)."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"data file not found: {path}", fix="check the path (data.path in a config is relative to the config file)")
    return validate_bytes(path.read_bytes(), path, fmt, input_column=input_column, output_column=output_column,
                          tokenizer=tokenizer, max_length=max_length, min_examples=min_examples,
                          recommended_examples=recommended_examples)


def validate_bytes(
    data: bytes,
    path: Path,
    fmt: str = "auto",
    *,
    input_column: str | None = None,
    output_column: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    min_examples: int = MIN_EXAMPLES,
    recommended_examples: int = RECOMMENDED_EXAMPLES,
) -> Report:
    """`validate_file` on the file's bytes; `path` names the file in findings (its suffix picks CSV vs TSV)."""
    if fmt not in FORMATS:
        raise TunelabError(f"unknown data format {fmt!r}", fix=f"use one of {', '.join(FORMATS)}")
    decode_findings, lines, bad_lines = _decode(data)
    if fmt == "csv" or (fmt == "auto" and path.suffix.lower() in (".csv", ".tsv")):
        read = _read_csv(lines, bad_lines, path, input_column or _DEFAULTS["input_column"].default,
                         output_column or _DEFAULTS["output_column"].default)
    else:
        read = _read_json(lines, bad_lines, path, fmt)
    findings = decode_findings + read.findings
    if read.rows == 0 and not findings:
        findings.append(Finding("empty_file", None, "", "no examples in the file", "add examples, one per line/row"))
    elif read.rows and read.rows < min_examples:
        findings.append(Finding(
            "too_few_examples", None, "", f"only {_count(read.rows, 'example')}, fewer than {min_examples}",
            f"add examples: at least {min_examples} are needed to fine-tune, {recommended_examples}+ to expect much"))
    elif read.rows and read.rows < recommended_examples:
        findings.append(Finding(
            "few_examples", None, "", f"only {_count(read.rows, 'example')}, fewer than {recommended_examples}",
            "add examples if you can: a few hundred good ones usually beat a few dozen"))
    notes: list[str] = []
    if tokenizer is not None and read.records:
        length_findings, note = _check_lengths(read.records, tokenizer, max_length or _DEFAULTS["max_length"].default)
        findings += length_findings
        notes.append(note)
    elif read.records:
        notes.append("lengths not checked: no tokenizer (pass --model to check them under its chat template)")
    findings.sort(key=lambda f: (f.line is None, f.line or 0))  # stable: a row's findings keep their order
    records = [r for _, r in read.records]
    return Report(
        path=path, format=read.format, detected=fmt == "auto", rows=read.rows, findings=findings,
        conversations=[r for r in records if isinstance(r, Conversation)],
        pairs=[r for r in records if isinstance(r, PreferencePair)], notes=notes,
    )


def read_checked(path: Path, fmt: str = "auto", *, input_column: str | None = None,
                 output_column: str | None = None) -> Report:
    """Read a file for training: its records, or `TunelabError` naming the first error and counting the rest."""
    report = validate_file(path, fmt, input_column=input_column, output_column=output_column,
                           min_examples=0, recommended_examples=0)  # training checks its own split sizes
    raise_for_errors(report)
    return report


def raise_for_errors(report: Report) -> None:
    errors = report.errors
    if not errors:
        return
    first, others = errors[0], len(errors) - 1
    more = f" (and {others} more error{'s' if others > 1 else ''})" if others else ""
    raise TunelabError(first.message + more, where=first.where(report.path),
                       fix=f"{first.fix}; `tunelab data validate {report.path}` lists every problem")


def print_report(report: Report, console: Console) -> None:
    """The report a person reads: one line per finding (`file:line: field: problem (fix: ...)`), then counts."""
    console.print(report.headline(), markup=False, highlight=False)
    for title, items, style in (("errors", report.errors, "red"), ("warnings", report.warnings, "yellow")):
        if items:
            console.print(f"[{style}]{title} ({len(items)}):[/]")
            for finding in items:
                console.print(finding.render(report.path), markup=False, highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if not report.findings:
        console.print(f"[green]no problems found[/] in {_count(report.rows, 'row')}")
        return
    console.print(f"summary: {_count(len(report.errors), 'error')}, {_count(len(report.warnings), 'warning')} "
                  f"in {_count(report.rows, 'row')}", highlight=False)
    for kind, count in report.counts().items():
        console.print(f"  {KINDS[kind].severity:<8} {kind:<24} {count:>6,}", markup=False, highlight=False)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- bytes -> lines


def _decode(data: bytes) -> tuple[list[Finding], list[str], set[int]]:
    """Physical lines (split on b"\\n" only: U+2028 is legal inside JSON strings), and the undecodable ones."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # UTF-32 LE starts like UTF-16 LE
        return [Finding("not_utf8", None, "", "the file is UTF-16 or UTF-32 (it starts with a byte-order mark)",
                        "re-save the file as UTF-8")], [], set()
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    findings, lines, bad = [], [], set()
    for line_no, raw in enumerate(data[offset:].split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            findings.append(Finding("not_utf8", line_no, "", f"not UTF-8 (byte {offset + exc.start}: 0x{raw[exc.start]:02x})",
                                    "re-save the file as UTF-8"))
            bad.add(line_no)
            text = raw.decode("utf-8", errors="replace")  # still check the rest of the line
        lines.append(text)
        offset += len(raw) + 1
    return findings, lines, bad


# ---------------------------------------------------------------- JSON rows


def _read_json(lines: list[str], bad_lines: set[int], path: Path, fmt: str) -> _Read:
    read = _Read(format=fmt)
    values = _array_values(lines, read.findings) if _is_array_file(lines) else _jsonl_values(lines, read.findings)
    read.rows = len(values) + len(read.findings)  # the rows that are not JSON count too: each is a row meant
    resolved: str | None = fmt
    if fmt == "auto":
        resolved = vote_format(v for _, _, v in values)
        read.format = resolved or "unknown"
        dicts = [(first, v) for first, _, v in values if isinstance(v, dict)]
        if resolved is None and dicts:
            first, row = dicts[0]
            keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
            read.findings.append(Finding(
                "unknown_format", first, "", f"cannot tell the format from the keys of the first rows ({keys})",
                "pass --format (data.format): chat_jsonl has 'messages', prompt_completion 'prompt' + 'completion', "
                "alpaca 'instruction' + 'output', sharegpt 'conversations', dpo 'preferred_output', "
                "chosen_rejected 'chosen' + 'rejected'"))
    for first, last, value in values:
        row_findings, record = parse_row(resolved, value, first, f"{path}:{first}")
        read.findings += row_findings
        if record is not None and not bad_lines.intersection(range(first, last + 1)):
            read.records.append((first, record))
    return read


def _jsonl_values(lines: list[str], findings: list[Finding]) -> list[tuple[int, int, object]]:
    """(line, line, value) per non-blank line."""
    values = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip(_JSON_SPACE):
            continue
        try:
            values.append((line_no, line_no, json.loads(line)))
        except json.JSONDecodeError as exc:
            findings.append(_invalid_json(line_no, f"invalid JSON at column {exc.colno}: {exc.msg}"))
        except (ValueError, RecursionError) as exc:  # an integer of 4,300+ digits; nesting deeper than Python's stack
            findings.append(_invalid_json(line_no, _unreadable(exc)))
    return values


def _is_array_file(lines: list[str]) -> bool:
    """A JSON array of rows (Alpaca's usual shape), possibly spread over many lines, rather than JSONL."""
    nonblank = [line for line in lines if line.strip(_JSON_SPACE)]
    if not nonblank or not nonblank[0].lstrip(_JSON_SPACE).startswith("["):
        return False
    if len(nonblank) == 1:
        return True
    try:
        json.loads(nonblank[0])
    except (ValueError, RecursionError):
        return True  # "[" opens a document spanning lines
    return False  # JSONL whose first row happens to be an array


def _array_values(lines: list[str], findings: list[Finding]) -> list[tuple[int, int, object]]:
    """(first line, last line, value) per element of a JSON array; reading stops at the first syntax error."""
    text = "\n".join(lines)
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]

    def line_of(pos: int) -> int:
        return bisect.bisect_right(starts, pos)

    def error(pos: int, what: str) -> None:
        line = line_of(pos)
        findings.append(_invalid_json(line, f"invalid JSON at column {pos - starts[line - 1] + 1}: {what}"))

    decoder = json.JSONDecoder()
    values: list[tuple[int, int, object]] = []
    pos = _skip_space(text, _skip_space(text, 0) + 1)  # past "["
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                error(exc.pos, exc.msg)
                return values
            except (ValueError, RecursionError) as exc:
                findings.append(_invalid_json(line_of(pos), _unreadable(exc)))
                return values
            values.append((line_of(pos), line_of(end - 1), value))
            pos = _skip_space(text, end)
            if text.startswith(",", pos):
                pos = _skip_space(text, pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                error(pos, "expected ',' or ']' after an array element")
                return values
    pos = _skip_space(text, pos)
    if pos < len(text):
        error(pos, "extra data after the array")
    return values


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _unreadable(exc: ValueError | RecursionError) -> str:
    """JSON that is valid but that Python will not read."""
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply to read"
    return "invalid JSON: " + (str(exc) if len(str(exc)) <= 100 else str(exc)[:97] + "...")


def _invalid_json(line: int, message: str) -> Finding:
    return Finding("invalid_json", line, "", message,
                   "write one complete JSON object per line, or a single JSON array of objects")


# ---------------------------------------------------------------- CSV rows


def _read_csv(lines: list[str], bad_lines: set[int], path: Path, input_column: str, output_column: str) -> _Read:
    read = _Read(format="csv")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # One physical line at a time, so reader.line_num counts lines the way findings do (split on "\n";
    # U+2028 is text). A quoted cell may still span lines; "\r\n" endings are handled by the reader.
    reader = csv.reader((line + "\n" for line in lines), delimiter=delimiter)
    try:
        header: list[str] = []
        while not header:  # blank lines before the header are skipped
            header = next(reader, None)  # type: ignore[assignment]
            if header is None:
                return read
        header_line = reader.line_num
        missing = [(column, key) for column, key in ((input_column, "input_column"), (output_column, "output_column"))
                   if column not in header]
        for column, key in missing:
            read.findings.append(Finding(
                "missing_column", header_line, "", f"column '{column}' not found; the header has {header}",
                f"set data.{key} (or --{key.replace('_', '-')}) to one of the header's columns"))
        if missing:
            return read
        end = header_line
        for cells in reader:
            first, end = end + 1, reader.line_num  # a quoted cell may span lines: the row starts at `first`
            if not cells:
                continue  # a blank line
            read.rows += 1
            if len(cells) != len(header):
                read.findings.append(Finding(
                    "wrong_column_count", first, "", f"{_count(len(cells), 'cell')}, but the header has {len(header)}",
                    f"give the row the header's {len(header)} columns; quote cells that contain {delimiter!r}"))
            row_findings, conv = parse_csv_row(dict(zip(header, cells)), first, f"{path}:{first}",
                                               input_column, output_column)
            read.findings += row_findings
            if conv is not None and not bad_lines.intersection(range(first, end + 1)):
                read.records.append((first, conv))
    except csv.Error as exc:
        read.findings.append(Finding("invalid_csv", reader.line_num, "", f"the CSV reader stopped here: {exc}",
                                     'check the quoting: a quote inside a quoted cell is written twice ("")'))
    return read


# ---------------------------------------------------------------- lengths under the chat template


def _check_lengths(records: list[tuple[int, Record]], tokenizer: PreTrainedTokenizerBase,
                   max_length: int) -> tuple[list[Finding], str]:
    """`too_long` per example over `max_length` tokens once rendered (a pair: its longer side), and a summary."""
    from jinja2 import TemplateError

    from tunelab.data.tokenize import render

    findings: list[Finding] = []
    texts: list[str] = []
    owners: list[int] = []  # index into `records` of each text
    for i, (line, record) in enumerate(records):
        convs = [record] if isinstance(record, Conversation) else [record.chosen_conversation, record.rejected_conversation]
        try:
            rendered = [render(tokenizer, c.as_dicts(), add_generation_prompt=False) for c in convs]
        except TemplateError as exc:  # the template's own raise_exception(), e.g. "roles must alternate"
            findings.append(Finding("template_error", line, "", f"the chat template refuses this conversation: {exc}",
                                    "reorder or merge the messages the way the model's template expects"))
            continue
        texts += rendered
        owners += [i] * len(rendered)
    lengths: dict[int, int] = {}
    if texts:
        for i, ids in zip(owners, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            lengths[i] = max(lengths.get(i, 0), len(ids))
    too_long = 0
    for i, n in sorted(lengths.items()):
        if n > max_length:
            too_long += 1
            findings.append(Finding(
                "too_long", records[i][0], "", f"{n:,} tokens once rendered with the chat template, over {max_length:,}",
                "shorten it or raise --max-length / data.max_length; training drops longer examples"))
    longest = max(lengths.values(), default=0)
    if too_long:
        note = (f"lengths: {too_long:,} of {len(lengths):,} examples are longer than {max_length:,} tokens "
                f"(longest {longest:,})")
    else:
        note = f"lengths: all {len(lengths):,} examples fit in {max_length:,} tokens (longest {longest:,})"
    return findings, note
