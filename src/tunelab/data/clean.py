r"""`tunelab data clean FILE -o OUT [--mask-pii]`: a corrected copy as OpenAI chat JSONL, and a log of every change.

    FILE (alpaca.jsonl)                                   OUT (chat JSONL)
    1 {"instruction": "Where is my card?", "output": "card_arrival"}     -> row 1
    2 {"instruction": "Where is my card?"}                                 dropped: missing 'output'
    3 {"instruction": "where is my  card?", "output": "card_arrival"}     dropped: duplicate of line 1
    4 {"instruction": "Mail jane@example.com", "output": "ok", "x": 1}    -> row 2, "Mail j***@e***.com"
                                                                             (--mask-pii), key 'x' removed

    OUT.log.jsonl (OUT's suffix replaced by .log.jsonl), one change a line, in line order:
    {"line": 2, "action": "dropped", "kind": "missing_field", "reason": "missing 'output'"}
    {"line": 3, "action": "dropped", "kind": "exact_duplicate", "reason": "same as line 1 (ignoring case and spacing)"}
    {"line": 4, "action": "removed_field", "kind": "unknown_key", "reason": "unknown key 'x' is ignored"}
    {"line": 4, "action": "masked", "kind": "pii_email", "reason": "e-mail address in the user message: j***@e***.com"}

What it does not change: conflicting answers and near duplicates need a person's
judgement (`tunelab data lint` lists them). FILE is only read; OUT and its log are written
to temporary files and renamed into place. Preference pairs are written as OpenAI DPO JSONL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from tunelab.data.convert import chat_row, dpo_row, write_jsonl
from tunelab.data.findings import Finding
from tunelab.data.quality.overlap import exact_duplicates
from tunelab.data.quality.pii import KINDS as PII_KINDS
from tunelab.data.quality.pii import mask_pii
from tunelab.data.records import Conversation, Message, PreferencePair
from tunelab.data.validate import Report, validate_file
from tunelab.errors import TunelabError

Record = Conversation | PreferencePair
# Warnings the rewrite itself resolves: the output simply does not carry what they point at.
_REMOVED_BY_REWRITE = {"unknown_key", "weight_on_non_assistant"}


@dataclass
class CleanResult:
    report: Report  # the validation of FILE
    out: Path
    log: Path
    written: int  # rows in OUT
    changes: list[dict]  # the log's rows

    def count(self, action: str, kind: str | None = None) -> int:
        return sum(1 for c in self.changes if c["action"] == action and (kind is None or c["kind"] == kind))


def log_path(out: Path) -> Path:
    return out.with_suffix(".log.jsonl")


def clean_file(src: Path | str, out: Path | str, fmt: str = "auto", *, mask: bool = False,
               input_column: str | None = None, output_column: str | None = None) -> CleanResult:
    """Write the rows of `src` without validation errors and exact duplicates (optionally PII-masked) to `out`."""
    src, out = Path(src), Path(out)
    log = log_path(out)
    if src.exists() and (out.resolve() == src.resolve() or log.resolve() == src.resolve()):
        raise TunelabError(f"writing {out} (and {log.name}) would overwrite the input file",
                           fix="pass another -o path: the original is never modified")
    report = validate_file(src, fmt, input_column=input_column, output_column=output_column,
                           min_examples=0, recommended_examples=0)
    records: list[Record] = sorted(report.conversations + report.pairs, key=_line)
    if not records:
        first = report.errors[0].render(src) if report.errors else f"{src}: no rows"
        raise TunelabError(f"no row of {src} can be kept ({first})",
                           fix=f"`tunelab data validate {src}` lists the problems; fix the format or the rows first")
    changes: list[dict] = []
    by_line: dict[int, list[Finding]] = {}
    for finding in report.findings:
        if finding.line is not None:
            by_line.setdefault(finding.line, []).append(finding)
    kept_lines = {_line(r) for r in records}
    for line, findings in sorted(by_line.items()):
        errors = [f for f in findings if f.severity == "error"]
        if errors and line not in kept_lines:
            reason = "; ".join((f"{f.field}: " if f.field else "") + f.message for f in errors)
            changes.append(_change(line, "dropped", errors[0].kind, reason))
        elif line in kept_lines:
            changes += [_change(line, "removed_field", f.kind, f"{f.field}: {f.message}")
                        for f in findings if f.kind in _REMOVED_BY_REWRITE]
    repeats = exact_duplicates(records)
    for i, first in repeats.items():
        changes.append(_change(_line(records[i]), "dropped", "exact_duplicate",
                               f"same as line {_line(records[first])} (ignoring case and spacing)"))
    kept = [r for i, r in enumerate(records) if i not in repeats]
    if mask:
        kept = [_masked(r, changes) for r in kept]
    rows = (dpo_row(r) if isinstance(r, PreferencePair) else chat_row(r) for r in kept)
    written = write_jsonl(rows, out)
    changes.sort(key=lambda c: c["line"])  # stable: a line's changes keep their order
    write_jsonl(changes, log)
    return CleanResult(report, out, log, written, changes)


def _masked(record: Record, changes: list[dict]) -> Record:
    line = _line(record)

    def clean(messages: tuple[Message, ...], side: str) -> tuple[Message, ...]:
        out = []
        for m in messages:
            text, matches = mask_pii(m.content)
            changes.extend(_change(line, "masked", f"pii_{x.kind}", f"{PII_KINDS[x.kind]} in the {side}{m.role} message: "
                                                                   f"{x.masked}") for x in matches)
            out.append(replace(m, content=text) if matches else m)
        return tuple(out)

    if isinstance(record, Conversation):
        return replace(record, messages=clean(record.messages, ""))
    return replace(record, prompt=clean(record.prompt, ""), chosen=clean(record.chosen, "chosen "),
                   rejected=clean(record.rejected, "rejected "))


def _change(line: int, action: str, kind: str, reason: str) -> dict:
    return {"line": line, "action": action, "kind": kind, "reason": reason}


def _line(record: Record) -> int:
    return int(record.source.rsplit(":", 1)[1])


def print_clean(result: CleanResult, console: Console) -> None:
    """What was written and what changed, counted by action and kind; the log has every change."""
    kind = "preference pairs" if result.report.pairs else "conversations"
    console.print(f"{result.report.headline()}; wrote {result.written:,} {kind} to {result.out}",
                  markup=False, highlight=False, soft_wrap=True)
    counts: dict[tuple[str, str], int] = {}
    for change in result.changes:
        counts[(change["action"], change["kind"])] = counts.get((change["action"], change["kind"]), 0) + 1
    for (action, what), n in sorted(counts.items()):
        console.print(f"  {action:<14} {what:<24} {n:>6,}", markup=False, highlight=False)
    console.print(f"log: {result.log} ({len(result.changes):,} changes)", markup=False, highlight=False, soft_wrap=True)
