"""`tunelab data lint FILE`: quality problems a valid file can still have, each at its line, PII masked.

    $ tunelab data lint train.jsonl --against test.jsonl
    lint: train.jsonl (chat_jsonl, 1,200 rows), against test.jsonl (150 rows)
    errors (2):
    conflicting_answers (1)  fix: decide the right answer and make the rows agree, or delete one of them
      train.jsonl:41: conflicting_answers: same prompt as line 7, different answer: 'card_linking' here, 'card_arrival' there: 'where is my card?'
    leakage_exact (1)  fix: remove the row from one of the two files: ...
      test.jsonl:3: leakage_exact: prompt also in train.jsonl:12 (same answer): 'how do i top up?'
    warnings (2):
    exact_duplicate (1)  fix: delete the repeat (`tunelab data clean` keeps the first)
      train.jsonl:90: exact_duplicate: same as line 12 (ignoring case and spacing): 'How do I top up? | top_up'
    pii_email (1)  fix: remove or mask it (`tunelab data clean --mask-pii` masks it)
      train.jsonl:77: pii_email: e-mail address in the user message: j***@e***.com
    labels (77): card_arrival 153, ...
    summary: 2 errors, 2 warnings in 1,200 rows
      error    conflicting_answers       1
      ...

Kinds and severities are in tunelab/data/findings.py (LINT_KINDS): leakage, conflicts and
template round-trip failures are errors (exit code 1); duplicates, PII and label balance
are warnings (exit code 0); a usage error (missing file, unknown format, threshold out of
(0, 1]) raises `TunelabError` (exit code 2). With --model, each row is also rendered with
the model's chat template: token lengths, and whether every answer and its end-of-turn
token survive tokenization. Rows with validation errors are skipped and counted (`tunelab
data validate` lists them). How each check works: overlap.py (duplicates, conflicts,
leakage), near_dup.py (MinHash), pii.py, template_check.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tunelab.data.findings import ALL_KINDS, Finding
from tunelab.data.quality import overlap
from tunelab.data.quality.near_dup import DEFAULT_THRESHOLD
from tunelab.data.quality.pii import KINDS as PII_KINDS
from tunelab.data.quality.pii import PiiMatch, find_pii, masked_excerpt
from tunelab.data.records import Conversation, PreferencePair
from tunelab.data.split import is_classification
from tunelab.data.validate import Report, validate_file
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Record = Conversation | PreferencePair
RARE_LABEL_ROWS = 5  # a label with fewer rows is a warning
IMBALANCE_RATIO = 10.0  # most common / rarest label above this is a warning

FIXES: dict[str, str] = {
    "exact_duplicate": "delete the repeat (`tunelab data clean` keeps the first)",
    "near_duplicate": "keep one of the two unless both wordings are wanted",
    "conflicting_answers": "decide the right answer and make the rows agree, or delete one of them",
    "leakage_exact": "remove the row from one of the two files: evaluating on rows seen in training overstates quality",
    "leakage_near": "remove the row from one of the two files: evaluating on rows seen in training overstates quality",
    "rare_label": f"add rows for the label (at least {RARE_LABEL_ROWS}), merge it into another, or drop it",
    "label_imbalance": "add rows for the rare labels or downsample the common ones",
    **{f"pii_{kind}": "remove or mask it (`tunelab data clean --mask-pii` masks it)" for kind in PII_KINDS},
}


@dataclass(frozen=True, slots=True)
class LintFinding:
    """A finding and the file its line is in (leakage findings are about the --against file)."""

    path: str
    finding: Finding

    @property
    def kind(self) -> str:
        return self.finding.kind

    @property
    def severity(self) -> str:
        return self.finding.severity

    def render(self) -> str:
        """`file:line: kind: message`, one line (messages carry masked, whitespace-collapsed excerpts)."""
        where = self.path if self.finding.line is None else f"{self.path}:{self.finding.line}"
        return f"{where}: {self.kind}: {self.finding.message}"

    def as_dict(self) -> dict[str, object]:
        return {"file": self.path, **self.finding.as_dict()}


@dataclass
class LintReport:
    path: Path
    format: str
    rows: int  # rows read
    linted: int  # rows without validation errors: the ones checked
    against: Path | None = None
    against_rows: int = 0
    findings: list[LintFinding] = field(default_factory=list)
    labels: dict[str, int] | None = None  # classification-like data: rows per label, most first
    lengths: dict[str, int] | None = None  # with a tokenizer: rows, min, median, p95, max tokens
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[LintFinding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[LintFinding]:
        return [f for f in self.findings if f.severity == "warning"]

    def counts(self) -> dict[str, int]:
        """Findings per kind, errors first, then by count."""
        counts = Counter(f.kind for f in self.findings)
        return dict(sorted(counts.items(), key=lambda kv: (ALL_KINDS[kv[0]].severity != "error", -kv[1], kv[0])))

    def to_json(self) -> dict:
        return {
            "path": str(self.path), "format": self.format, "rows": self.rows, "linted": self.linted,
            "against": None if self.against is None else str(self.against), "against_rows": self.against_rows,
            "ok": not self.errors, "findings": [f.as_dict() for f in self.findings],
            "counts": {"errors": len(self.errors), "warnings": len(self.warnings), "by_kind": self.counts()},
            "labels": self.labels, "lengths": self.lengths, "notes": self.notes,
        }


def lint_file(
    path: Path | str,
    fmt: str = "auto",
    *,
    against: Path | str | None = None,
    input_column: str | None = None,
    output_column: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> LintReport:
    """Read `path` (and `against`, in the same format) through the validator, then lint the valid rows."""
    report = _read(path, fmt, input_column, output_column)
    other = _read(against, fmt, input_column, output_column) if against is not None else None
    return lint_report(report, other, tokenizer=tokenizer, threshold=threshold)


def lint_report(report: Report, other: Report | None = None, *, tokenizer: PreTrainedTokenizerBase | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> LintReport:
    """Lint the records of a validation report (and the leakage of `other`'s records into them)."""
    if not 0 < threshold <= 1:
        raise TunelabError(f"similarity threshold {threshold} is not in (0, 1]", fix="pass e.g. --threshold 0.8")
    records: list[Record] = sorted(report.conversations + report.pairs, key=_line)
    lines = [_line(r) for r in records]
    out = LintReport(report.path, report.format, report.rows, len(records))
    name = str(report.path)
    add = out.findings.append
    skipped = len({f.line for f in report.errors if f.line is not None})
    if skipped:
        out.notes.append(f"{skipped:,} rows with validation errors were not linted (`tunelab data validate {name}` lists them)")

    exact = overlap.exact_duplicates(records)
    for i, first in exact.items():
        add(_finding(name, "exact_duplicate", lines[i],
                     f"same as line {lines[first]} (ignoring case and spacing): {_show(records[i])}"))
    for i, match in overlap.near_duplicates(records, threshold, exact).items():
        add(_finding(name, "near_duplicate", lines[i],
                     f"near duplicate of line {lines[match.earlier]} (similarity {match.similarity:.2f}): "
                     f"{_show(records[i])}"))
    for i, first in overlap.conflicts(records).items():
        here, there = records[i], records[first]
        assert isinstance(here, Conversation) and isinstance(there, Conversation)
        add(_finding(name, "conflicting_answers", lines[i],
                     f"same prompt as line {lines[first]}, different answer: {masked_excerpt(here.answer, 30)!r} here, "
                     f"{masked_excerpt(there.answer, 30)!r} there: {masked_excerpt(overlap.near_text(here.prompt_messages))!r}"))
    if other is not None:
        out.against, out.against_rows = other.path, other.rows
        other_skipped = len({f.line for f in other.errors if f.line is not None})
        if other_skipped:
            out.notes.append(f"{other_skipped:,} rows of {other.path} with validation errors were not checked for leakage")
        evaluation = sorted(other.conversations + other.pairs, key=_line)
        for leak in overlap.leaks(records, evaluation, threshold):
            row = evaluation[leak.index]
            shown = masked_excerpt(overlap.near_text(overlap.prompt_of(row)))
            if leak.exact:
                answer = "same answer" if leak.same_answer else "different answer"
                add(_finding(str(other.path), "leakage_exact", _line(row),
                             f"prompt also in {leak.train_source} ({answer}): {shown!r}"))
            else:
                add(_finding(str(other.path), "leakage_near", _line(row),
                             f"prompt nearly the same as {leak.train_source} (similarity {leak.similarity:.2f}): {shown!r}"))
    for i, record in enumerate(records):
        for where, match in _pii(record):
            add(_finding(name, f"pii_{match.kind}", lines[i], f"{PII_KINDS[match.kind]} in the {where}: {match.masked}"))
    out.labels = _labels(records, name, add, lines)
    if tokenizer is not None and records:
        from tunelab.data.quality.template_check import check_template

        template_findings, out.lengths = check_template(tokenizer, list(zip(lines, records)))
        out.findings += [LintFinding(name, f) for f in template_findings]
        if out.lengths:
            s = out.lengths
            out.notes.append(f"tokens per row under the chat template: min {s['min']:,}, median {s['median']:,}, "
                             f"p95 {s['p95']:,}, max {s['max']:,}")
    else:
        out.notes.append("chat template not checked: no tokenizer (pass --model to check answers survive its template)")
    # Grouped by kind (errors first), by file and line inside a kind.
    order = {kind: k for k, kind in enumerate(ALL_KINDS)}
    out.findings.sort(key=lambda f: (f.severity != "error", order[f.kind], f.path != name, f.finding.line or 0))
    return out


def print_lint(report: LintReport, console: Console) -> None:
    """One line per finding (`file:line: kind: message`) under a heading per kind with its fix, then counts."""
    def plain(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    head = f"lint: {report.path} ({report.format}, {_count(report.rows, 'row')})"
    if report.against is not None:
        head += f", against {report.against} ({_count(report.against_rows, 'row')})"
    plain(head)
    for title, items, style in (("errors", report.errors, "red"), ("warnings", report.warnings, "yellow")):
        if not items:
            continue
        console.print(f"[{style}]{title} ({len(items):,}):[/]")
        for kind in dict.fromkeys(f.kind for f in items):
            group = [f for f in items if f.kind == kind]
            plain(f"{kind} ({len(group):,})  fix: {group[0].finding.fix}")
            for finding in group:
                plain("  " + finding.render())
    if report.labels:
        shown = ", ".join(f"{label} {n:,}" for label, n in report.labels.items())
        plain(f"labels ({len(report.labels)}): {shown}")
    for note in report.notes:
        plain(f"note: {note}")
    if not report.findings:
        console.print(f"[green]no problems found[/] in {_count(report.linted, 'row')}")
        return
    plain(f"summary: {_count(len(report.errors), 'error')}, {_count(len(report.warnings), 'warning')} "
          f"in {_count(report.linted, 'row')}")
    for kind, count in report.counts().items():
        plain(f"  {ALL_KINDS[kind].severity:<8} {kind:<24} {count:>6,}")


# ---------------------------------------------------------------- pieces


def _read(path: Path | str, fmt: str, input_column: str | None, output_column: str | None) -> Report:
    # Size checks are validate's business; lint looks at whatever rows there are.
    return validate_file(path, fmt, input_column=input_column, output_column=output_column,
                         min_examples=0, recommended_examples=0)


def _line(record: Record) -> int:
    return int(record.source.rsplit(":", 1)[1])


def _finding(path: str, kind: str, line: int | None, message: str) -> LintFinding:
    return LintFinding(path, Finding(kind, line, "", message, FIXES[kind]))


def _show(record: Record) -> str:
    """The non-system contents, joined by ' | ', masked and cut: 'Where is my card? | card_arrival'."""
    return repr(masked_excerpt(" | ".join(m.content for m in overlap.messages_of(record) if m.role != "system")))


def _pii(record: Record) -> Iterator[tuple[str, PiiMatch]]:
    """(where, match) for each PII match in the record: where = 'user message', 'chosen assistant message', ..."""
    if isinstance(record, Conversation):
        parts = [("", m) for m in record.messages]
    else:
        parts = [("", m) for m in record.prompt] + [("chosen ", m) for m in record.chosen] + \
                [("rejected ", m) for m in record.rejected]
    for side, message in parts:
        for match in find_pii(message.content):
            yield f"{side}{message.role} message", match


def _labels(records: Sequence[Record], name: str, add: Callable[[LintFinding], None], lines: list[int]) -> dict[str, int] | None:
    """Rows per label for classification-like data, with rare_label and label_imbalance findings."""
    convs = [r for r in records if isinstance(r, Conversation)]
    if len(convs) != len(records) or not is_classification(convs):
        return None
    counts = Counter(c.answer for c in convs)
    first_line = {}
    for line, conv in zip(lines, convs):
        first_line.setdefault(conv.answer, line)
    for label, n in sorted(counts.items(), key=lambda kv: first_line[kv[0]]):
        if n < RARE_LABEL_ROWS:
            rows = [str(line) for line, c in zip(lines, convs) if c.answer == label]
            add(_finding(name, "rare_label", first_line[label],
                         f"label {masked_excerpt(label, 40)!r} has only {_count(n, 'row')} (lines {', '.join(rows)}), "
                         f"fewer than {RARE_LABEL_ROWS}"))
    (top, most), (low, least) = counts.most_common()[0], counts.most_common()[-1]
    if most / least > IMBALANCE_RATIO:
        add(_finding(name, "label_imbalance", None,
                     f"{masked_excerpt(top, 40)!r} has {_count(most, 'row')}, {masked_excerpt(low, 40)!r} "
                     f"{_count(least, 'row')}: {most / least:.1f} times as many, over {IMBALANCE_RATIO:g}"))
    return dict(counts.most_common())


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
