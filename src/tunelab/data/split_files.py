r"""`tunelab data split FILE -o OUTDIR`: train / validation / test files, a report, and a leakage check.

    OUTDIR/train.jsonl  validation.jsonl  test.jsonl    OpenAI chat JSONL, in split.py's hash order
    OUTDIR/split_report.json
      {"source": "intents.csv", "rows": 1000, "fractions": [0.8, 0.1, 0.1],
       "sizes": {"train": 797, "validation": 104, "test": 99}, "stratified": true,
       "labels": {"card_arrival": {"train": 120, "validation": 16, "test": 17}, ...},
       "leakage": {"validation": [...], "test": [{"row": "intents.csv:812", "train_row": "intents.csv:33",
                                                "exact": false, "similarity": 0.86, "same_answer": false}]}}

Which split a row lands in is tunelab/data/split.py's hash of the row, nothing else: the
same file always splits the same way, and appending rows never moves old ones. Identical
rows share a hash, so they can never end up on both sides; the leakage check
(overlap.split_leakage) reports what can: prompts repeated with another answer or with
other case or spacing (exact), and near duplicates.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tunelab.config import DEFAULT_SPLIT
from tunelab.data.convert import chat_row, write_jsonl
from tunelab.data.quality.near_dup import DEFAULT_THRESHOLD
from tunelab.data.quality.overlap import Leak, split_leakage
from tunelab.data.split import SPLIT_NAMES, Split, split_conversations
from tunelab.data.validate import read_checked
from tunelab.errors import TunelabError

REPORT_NAME = "split_report.json"


@dataclass
class SplitResult:
    split: Split
    leakage: dict[str, list[Leak]]  # "validation" / "test" -> rows whose prompt is (nearly) in train
    report: dict  # what split_report.json holds
    outdir: Path


def parse_fractions(text: str) -> tuple[float, float, float]:
    """ "0.8,0.1,0.1" -> (0.8, 0.1, 0.1): three numbers >= 0 that sum to 1."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    return _checked_fractions(values, text)


def _checked_fractions(values: tuple[float, ...], shown: str) -> tuple[float, float, float]:
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise TunelabError(f"--fractions {shown!r} is not three numbers >= 0 that sum to 1",
                           fix="write train,validation,test fractions, e.g. --fractions 0.8,0.1,0.1")
    return values  # type: ignore[return-value]


def split_file(src: Path | str, outdir: Path | str, fractions: tuple[float, float, float] = DEFAULT_SPLIT,
               fmt: str = "auto", *, input_column: str | None = None, output_column: str | None = None,
               threshold: float = DEFAULT_THRESHOLD) -> SplitResult:
    """Split `src` (raising `TunelabError` on its first validation error) into OUTDIR's three files and report."""
    src, outdir = Path(src), Path(outdir)
    _checked_fractions(tuple(fractions), ",".join(str(f) for f in fractions))  # callers may pass any tuple
    read = read_checked(src, fmt, input_column=input_column, output_column=output_column)
    if read.pairs:
        raise TunelabError(f"{src} holds preference pairs ({read.format}); split writes conversations",
                           fix="split chat, prompt/completion, Alpaca, ShareGPT or CSV data")
    split = split_conversations(read.conversations, fractions)
    parts = {name: getattr(split, name) for name in SPLIT_NAMES}
    for name, rows in parts.items():
        write_jsonl((chat_row(c) for c in rows), outdir / f"{name}.jsonl")
    leakage = split_leakage(split.train, split.validation, split.test, threshold)
    report = {
        "source": str(src), "format": read.format, "rows": len(read.conversations), "fractions": list(fractions),
        "sizes": split.sizes(), "stratified": split.stratified,
        "labels": _labels(parts) if split.stratified else None,
        "similarity_threshold": threshold,
        "leakage": {name: [_leak_json(leak) for leak in leaks] for name, leaks in leakage.items()},
    }
    _write_json(report, outdir / REPORT_NAME)
    return SplitResult(split, leakage, report, outdir)


def _labels(parts: dict[str, list]) -> dict[str, dict[str, int]]:
    """label -> rows per split, labels by total rows (most first)."""
    counts = {name: Counter(c.answer for c in rows) for name, rows in parts.items()}
    total = Counter(c.answer for rows in parts.values() for c in rows)
    return {label: {name: counts[name][label] for name in SPLIT_NAMES} for label, _ in total.most_common()}


def _leak_json(leak: Leak) -> dict:
    return {"row": leak.source, "train_row": leak.train_source, "exact": leak.exact,
            "similarity": round(leak.similarity, 3), "same_answer": leak.same_answer}


def _write_json(obj: dict, path: Path) -> None:
    """JSON to a temporary file beside `path`, then renamed into place (never half written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def print_split(result: SplitResult, console: Console) -> None:
    """Sizes, labels (classification-like data) and one line per leaking row: `file:line (split): kind: ...`."""
    def plain(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    report = result.report
    sizes = ", ".join(f"{name} {n:,}" for name, n in report["sizes"].items())
    plain(f"split {report['source']} ({report['rows']:,} rows): {sizes} -> {result.outdir}")
    if report["labels"]:
        fewest = {name: min(c[name] for c in report["labels"].values()) for name in SPLIT_NAMES}
        plain(f"stratified by label: {len(report['labels'])} labels; fewest rows of a label per split: "
              + ", ".join(f"{name} {n}" for name, n in fewest.items()))
    for name, leaks in result.leakage.items():
        for leak in leaks:
            kind = "leakage_exact" if leak.exact else "leakage_near"
            how = (f"same prompt ({'same' if leak.same_answer else 'different'} answer)" if leak.exact
                   else f"similarity {leak.similarity:.2f}")
            plain(f"{leak.source} ({name}): {kind}: prompt also in train at {leak.train_source}, {how}")
    total = sum(len(leaks) for leaks in result.leakage.values())
    plain(f"leakage: {total:,} validation/test rows whose prompt is (nearly) in train"
          + ("" if total else " (none)") + f"; report: {result.outdir / REPORT_NAME}")
