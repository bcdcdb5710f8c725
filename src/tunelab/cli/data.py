"""`tunelab data validate|lint|clean|split|convert FILE`: check and prepare data before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, get_args

import typer
from rich.console import Console

from tunelab.cli.render import err
from tunelab.config import DEFAULT_SPLIT, DataConfig, DataFormat
from tunelab.data.quality.near_dup import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

data_app = typer.Typer(no_args_is_help=True, help="Check, lint, clean, convert and split data files.")

FormatOption = Annotated[str, typer.Option("--format", help=f"One of {', '.join(get_args(DataFormat))}.")]
InputColumn = Annotated[str | None, typer.Option(
    help=f"CSV: column holding the user message (default: {DataConfig.model_fields['input_column'].default}).")]
OutputColumn = Annotated[str | None, typer.Option(
    help=f"CSV: column holding the answer (default: {DataConfig.model_fields['output_column'].default}).")]


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="The data file.")],
    fmt: FormatOption = "auto",
    model: Annotated[str | None, typer.Option(help="Check lengths under this model's chat template (tokenizer only).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Longest example in tokens (default: data.max_length).")] = None,
    input_column: InputColumn = None,
    output_column: OutputColumn = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as one JSON object.")] = False,
) -> None:
    """Report every problem of a data file, one line each; exit code 1 if any is an error."""
    from tunelab.data.validate import print_report, validate_file

    report = validate_file(file, fmt, input_column=input_column, output_column=output_column,
                           tokenizer=_tokenizer(model), max_length=max_length)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        print_report(report, Console(soft_wrap=True))
    if report.errors:
        raise typer.Exit(1)


@data_app.command("convert")
def data_convert(
    file: Annotated[Path, typer.Argument(help="The data file.")],
    out: Annotated[Path, typer.Option("-o", "--output", help="Where to write the OpenAI chat JSONL.")],
    fmt: FormatOption = "auto",
    input_column: InputColumn = None,
    output_column: OutputColumn = None,
) -> None:
    """Convert a data file to OpenAI chat JSONL (preference pairs: OpenAI DPO JSONL)."""
    from tunelab.data.convert import convert_file

    report = convert_file(file, out, fmt, input_column=input_column, output_column=output_column)
    kind = "preference pairs" if report.pairs else "conversations"
    Console().print(f"{report.headline()}; wrote {report.examples:,} {kind} to {out}", markup=False, highlight=False)
    if report.warnings:
        err.print(f"{len(report.warnings)} warnings: `tunelab data validate {file}` lists them", markup=False)


Threshold = Annotated[float, typer.Option(help="Near-duplicate similarity: Jaccard of the rows' words and word pairs, in (0, 1].")]


@data_app.command("lint")
def data_lint(
    file: Annotated[Path, typer.Argument(help="The data file (e.g. the training set).")],
    against: Annotated[Path | None, typer.Option(help="Report rows of this file (e.g. the test set) found in FILE.")] = None,
    fmt: FormatOption = "auto",
    model: Annotated[str | None, typer.Option(help="Check answers survive this model's chat template; token lengths.")] = None,
    threshold: Threshold = DEFAULT_THRESHOLD,
    input_column: InputColumn = None,
    output_column: OutputColumn = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as one JSON object.")] = False,
) -> None:
    """Quality: duplicates, near duplicates, conflicting answers, leakage, PII (masked), labels; exit 1 on errors."""
    from tunelab.data.quality.lint import lint_file, print_lint

    report = lint_file(file, fmt, against=against, input_column=input_column, output_column=output_column,
                       tokenizer=_tokenizer(model), threshold=threshold)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        print_lint(report, Console(soft_wrap=True))
    if report.errors:
        raise typer.Exit(1)


@data_app.command("clean")
def data_clean(
    file: Annotated[Path, typer.Argument(help="The data file; it is never modified.")],
    out: Annotated[Path, typer.Option("-o", "--output", help="Where to write the cleaned OpenAI chat JSONL.")],
    mask_pii: Annotated[bool, typer.Option("--mask-pii", help="Mask e-mails, phones, cards, IBANs, SSNs, IPs.")] = False,
    fmt: FormatOption = "auto",
    input_column: InputColumn = None,
    output_column: OutputColumn = None,
) -> None:
    """Write a copy without invalid rows and exact duplicates (PII masked on request), and a log of every change."""
    from tunelab.data.clean import clean_file, print_clean

    result = clean_file(file, out, fmt, mask=mask_pii, input_column=input_column, output_column=output_column)
    print_clean(result, Console(soft_wrap=True))


@data_app.command("split")
def data_split(
    file: Annotated[Path, typer.Argument(help="The data file.")],
    outdir: Annotated[Path, typer.Option("-o", "--output", help="Folder for train/validation/test.jsonl and the report.")],
    fractions: Annotated[str, typer.Option(help="Train,validation,test fractions summing to 1.")] = ",".join(
        f"{f:g}" for f in DEFAULT_SPLIT),
    fmt: FormatOption = "auto",
    threshold: Threshold = DEFAULT_THRESHOLD,
    input_column: InputColumn = None,
    output_column: OutputColumn = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the split report as one JSON object.")] = False,
) -> None:
    """Split deterministically by row hash (stratified by label), write the files, and check leakage between them."""
    from tunelab.data.split_files import parse_fractions, print_split, split_file

    result = split_file(file, outdir, parse_fractions(fractions), fmt, input_column=input_column,
                        output_column=output_column, threshold=threshold)
    if as_json:
        print(json.dumps(result.report))
    else:
        print_split(result, Console(soft_wrap=True))


def _tokenizer(model: str | None) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer when `--model` is given. Imported only then: loading it brings in transformers and
    torch (seconds), which the data verbs otherwise never need."""
    if model is None:
        return None
    from tunelab.model.load import load_tokenizer

    return load_tokenizer(model)
