"""`tunelab <verb>`: each verb maps to one function; nothing else lives here.

    tunelab demo [--json]                 Banking77 -> LoRA fine-tune of SmolLM2 -> compare with the base
    tunelab train CONFIG.yaml [--set k=v]  train + evaluate with a config of your own
    tunelab plan CONFIG.yaml              tokens, steps, time, cost and memory, before training
    tunelab eval RUN_DIR [--data FILE]    fine-tune vs base zero-shot vs few-shot; eval.json + report.html
    tunelab chat RUN_DIR "message"        answer one message with a fine-tune
    tunelab models register|list|show|diff|promote|rollback|delete|log   the model registry
    tunelab data validate|lint|clean|split|convert FILE   check and prepare data before training
    tunelab data validate FILE [--json]   every problem of a data file, one line each (exit 1 on errors)
    tunelab data convert FILE -o OUT      any accepted data format -> OpenAI chat JSONL

A mistake a user can make (missing file, bad column, unknown model) prints one
line saying where, what and how to fix it, and exits with code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, get_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tunelab.config import DataConfig, DataFormat  # noqa: E402
from tunelab.errors import Interrupted, TunelabError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune an open model on your task, and prove it.")
err = Console(stderr=True)
data_app = typer.Typer(no_args_is_help=True, help="Check, lint, clean, convert and split data files.")
app.add_typer(data_app, name="data")
from tunelab.cli_models import models_app  # noqa: E402

app.add_typer(models_app, name="models")

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "banking77" / "demo.yaml"


def _parse_sets(sets: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TunelabError(f"--set {item!r} is not KEY=VALUE", fix="write e.g. --set lora.rank=32")
        import yaml

        out[key] = yaml.safe_load(value)  # "32" -> 32, "1e-3" -> "1e-3" handled by pydantic, "null" -> None
    return out


CONTENDER_NAMES = {"base_zero_shot": "base, zero-shot", "base_few_shot": "base, few-shot + labels",
                   "finetune": "fine-tuned"}


def _print_summary(summary: dict[str, Any], trained: bool = True) -> None:
    # Compact enough for an 80-column terminal (and for logs, where rich assumes 80).
    metric = summary.get("metric") or "metric"
    table = Table(
        title=f"{summary['test_rows']} held-out test rows, the same for every model", box=box.SIMPLE_HEAD,
        caption="95% bootstrap interval; p: fine-tune vs that model (McNemar / paired bootstrap); "
                "ms/request = batched generation time / rows",
    )
    table.add_column("model", no_wrap=True)
    table.add_column(f"{metric} [95% CI]", justify="right", no_wrap=True)
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("prompt tok", justify="right", no_wrap=True)
    table.add_column("ms/req", justify="right", no_wrap=True)
    for name in ("base_zero_shot", "base_few_shot", "finetune"):
        c = summary.get(name)
        if not c or c.get("value") is None:
            continue
        ci = c.get("ci") or [float("nan")] * 2
        versus = summary.get(f"vs_{name}")
        table.add_row(
            CONTENDER_NAMES[name], f"{100 * c['value']:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]",
            f"{versus['p_value']:.1g}" if versus else "", f"{c['prompt_tokens']:.0f}", f"{c['ms_per_request']:.0f}",
        )
    out = Console()
    if table.row_count:
        out.print(table)
    forgetting = summary.get("forgetting")
    if forgetting:
        out.print(f"forgetting check: general probe {100 * forgetting['probe_delta']:+.1f} points vs the base"
                  + (" [bold red]REGRESSION FLAGGED[/]" if forgetting["flagged"] else " (no regression flagged)"))
    if trained:
        out.print(
            f"trained on {summary['train_rows']:,} rows in {summary['train_seconds']:.0f} s "
            f"({summary['tokens_per_second']:.0f} tokens/s), evaluated in {summary['eval_seconds']:.0f} s, "
            f"total {summary['total_seconds']:.0f} s"
        )
    else:
        out.print(f"evaluated in {summary['eval_seconds']:.0f} s")
    out.print(f"run directory: [bold]{summary['run_dir']}[/]  (report: report.html)")


def _run(config: Path | None, sets: list[str] | None, as_json: bool, resume: Path | None = None) -> None:
    from tunelab.config import load_config
    from tunelab.pipeline import run_pipeline
    from tunelab.train.checkpoint import read_run_config_for_resume

    cfg = read_run_config_for_resume(resume) if resume else load_config(config, _parse_sets(sets))
    summary = run_pipeline(cfg, err, resume=resume)
    if not summary:  # a torchrun process other than rank 0: it trained its share, rank 0 reports
        return
    if as_json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)


@app.command()
def demo(
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. train.epochs=2")] = None,
) -> None:
    """Fine-tune SmolLM2-135M-Instruct on Banking77 and compare it with the base model on the same test rows."""
    if not DEMO_CONFIG.is_file():
        raise TunelabError(f"demo config not found at {DEMO_CONFIG}", fix="run from a checkout of the tunelab repository")
    _run(DEMO_CONFIG, sets, as_json)


@app.command("train")
def train_cmd(
    config: Annotated[Path | None, typer.Argument(help="YAML run config (see examples/banking77/demo.yaml).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. lora.rank=32")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only estimate tokens, time, cost and memory.")] = False,
    resume: Annotated[Path | None, typer.Option(help="Continue this run directory from its newest checkpoint.")] = None,
    nproc: Annotated[int, typer.Option(help="Train with N processes (torch.distributed via torchrun).")] = 1,
) -> None:
    """Train (LoRA, DoRA, full, DPO), evaluate against the base model, and write a run directory."""
    if (config is None) == (resume is None):
        raise TunelabError("give either a CONFIG file or --resume RUN_DIR", fix="tunelab train CONFIG.yaml, or "
                           "tunelab train --resume runs/NAME-...")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_with_torchrun(nproc)
        return
    if dry_run:
        plan(config, as_json=as_json, sets=sets)
    else:
        _run(config, sets, as_json, resume)


def _relaunch_with_torchrun(nproc: int) -> None:
    """`tunelab train --nproc N ...` == `torchrun --nproc-per-node N -m tunelab train ...` (standalone rendezvous)."""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tunelab", *args]
    code = subprocess.call(command)
    if code:
        sys.exit(code)


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. lora.rank=32")] = None,
    price_per_hour: Annotated[float, typer.Option(help="Machine price in USD per hour, for the cost estimate.")] = 0.10,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write the plan as JSON here.")] = None,
) -> None:
    """Estimate a run before spending compute: tokens, steps, time (from a measured probe), cost, memory."""
    from tunelab.config import load_config
    from tunelab.plan import make_plan
    from tunelab.train.checkpoint import write_json_atomic

    result = make_plan(load_config(config, _parse_sets(sets)), err, price_per_hour=price_per_hour)
    if output:
        write_json_atomic(output, result)
    if as_json:
        print(json.dumps(result))
        return
    est, tok = result["estimate_seconds"], result["tokens"]
    table = Table(title=f"plan for {config}", box=box.SIMPLE_HEAD)
    table.add_column("item", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("how")
    table.add_row("rows", f"{sum(result['rows'].values()):,}", " / ".join(f"{k} {v:,}" for k, v in result["rows"].items()))
    unit = "pair" if result["objective"] == "dpo" else "example"  # DPO's counts are per pair: both rows
    table.add_row("tokens", f"{tok['total']:,}", f"{tok['trained']:,} trained ({tok['trained_per_example']:.1f}/{unit})")
    for name, hp in result["hyperparameters"].items():
        table.add_row(name.replace("_", " "), f"{hp['value']:g}", hp["why"])
    table.add_row("steps", f"{result['steps']:,}", "")
    probe = result["probe"]
    table.add_row("train", f"{est['train']:.0f} s", f"{probe['tokens_per_second']:.0f} tokens/s, {probe['steps']} steps probed")
    table.add_row("validation", f"{est['validation']:.0f} s", "one pass timed")
    table.add_row("evaluation", f"{est['evaluation']:.0f} s", f"{result['evaluation_rows']} rows, one batch timed")
    table.add_row("setup", f"{est['setup']:.0f} s", "measured")
    table.add_row("total", f"{est['total'] / 60:.1f} min", "")
    table.add_row("cost", f"${result['cost']['total']:.3f}", f"at ${result['cost']['price_per_hour']:g}/hour")
    table.add_row("peak memory", f"{result['peak_memory_mb']:,.0f} MB", "measured during the probe")
    Console().print(table)


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `tunelab train` or `tunelab demo`.")],
    data: Annotated[Path | None, typer.Option(help="Evaluate on this data file instead of the run's test split.")] = None,
    data_format: Annotated[str | None, typer.Option("--format", help="Format of --data (default: detected).")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override an eval key, e.g. eval.few_shot=5")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Fine-tune vs base zero-shot vs base few-shot on the same rows; writes eval.json, report.html, report.md."""
    from tunelab.pipeline import evaluate_saved_run

    overrides = {}
    for key, value in _parse_sets(sets).items():
        if not key.startswith("eval."):
            raise TunelabError(f"--set {key}: tunelab eval only takes eval.* keys", fix="e.g. --set eval.max_rows=200")
        overrides[key.removeprefix("eval.")] = value
    summary = evaluate_saved_run(run_dir, data, data_format, overrides, err)
    if as_json:
        print(json.dumps(summary))
        return
    summary.setdefault("train_rows", 0)
    _print_summary(summary, trained=False)


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `tunelab train` or `tunelab demo`.")],
    message: Annotated[str, typer.Argument(help="The user message.")],
    max_new_tokens: Annotated[int, typer.Option(help="Generation limit.")] = 128,
) -> None:
    """Answer one message with the fine-tuned model (the run's own system prompt and chat template)."""
    from tunelab.data.records import Message
    from tunelab.data.tokenize import render_prompt
    from tunelab.evaluate.generate import generate
    from tunelab.train.checkpoint import load_run
    from tunelab.train.loop import choose_precision

    precision = choose_precision("auto")
    model, tokenizer, cfg = load_run(run_dir, dtype=precision.weights_dtype)
    messages = [Message("user", message)]
    if cfg.data.system_prompt:
        messages.insert(0, Message("system", cfg.data.system_prompt))
    prompt = render_prompt(tokenizer, messages)
    run = generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1, precision=precision)
    print(run.generations[0].text)


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
    from tunelab.data.validate import load_tokenizer, print_report, validate_file

    report = validate_file(file, fmt, input_column=input_column, output_column=output_column,
                           tokenizer=load_tokenizer(model) if model else None, max_length=max_length)
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
    threshold: Threshold = 0.8,
    input_column: InputColumn = None,
    output_column: OutputColumn = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as one JSON object.")] = False,
) -> None:
    """Quality: duplicates, near duplicates, conflicting answers, leakage, PII (masked), labels; exit 1 on errors."""
    from tunelab.data.lint import lint_file, print_lint
    from tunelab.data.validate import load_tokenizer

    report = lint_file(file, fmt, against=against, input_column=input_column, output_column=output_column,
                       tokenizer=load_tokenizer(model) if model else None, threshold=threshold)
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
    fractions: Annotated[str, typer.Option(help="Train,validation,test fractions summing to 1.")] = "0.8,0.1,0.1",
    fmt: FormatOption = "auto",
    threshold: Threshold = 0.8,
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


# Verbs that load a model and run it: these run on tcmalloc when the system has it (see tunelab.allocator).
MODEL_VERBS = frozenset({"demo", "train", "plan", "eval", "chat"})


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in MODEL_VERBS:
        from tunelab.allocator import relaunch_with_tcmalloc

        relaunch_with_tcmalloc()  # replaces this process when it relaunches; otherwise returns

    import logging
    import warnings

    # transformers deprecation notices raised from inside PEFT: nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        app()
    except Interrupted as exc:  # a clean stop on SIGINT/SIGTERM, with a checkpoint to resume from
        err.print(f"[yellow]stopped:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(130)
    except TunelabError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
