"""Data: every accepted format read into one record type, checked, linted, split and tokenized.

    report = tunelab.data.validate("train.jsonl")      # every problem, at its line and field
    report.errors, report.warnings, report.conversations

The stages, in the order a run uses them: records (the types) -> formats (each row shape) ->
validate (a file, every problem at once) -> read (what training reads) -> quality/ (duplicates,
conflicts, leakage, PII) -> split -> tokenize -> batches / pack / pairs -> prepare (all of it, with
a report).
"""

from tunelab.data.validate import Report
from tunelab.data.validate import validate_file as validate

__all__ = ["Report", "validate"]
