"""Everything the CLI prints as a table, in one place: the run summary, the plan, the export verification."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from tunelab.evaluation.result import DISPLAY_NAMES
from tunelab.progress import console as err  # noqa: F401 (the stderr console: run log, progress, errors)

if TYPE_CHECKING:  # the plan imports torch; the data verbs print without it
    from tunelab.export.record import ExportRecord
    from tunelab.planning import Plan
    from tunelab.rundir import RunSummary

SOURCES = {"config": "set in the config", "default": "tunelab's default", "auto": "auto"}


def print_summary(summary: RunSummary) -> None:
    """The contenders' primary metric with its interval, the p-value against the fine-tune, cost per request;
    then forgetting, the timings and where the run is. Fits an 80-column terminal (and logs, where rich
    assumes 80)."""
    metric = summary.metric or "metric"
    table = Table(
        title=f"{summary.test_rows} held-out test rows, the same for every model", box=box.SIMPLE_HEAD,
        caption="95% bootstrap interval; p: fine-tune vs that model (McNemar / paired bootstrap); "
                "ms/request = batched generation time / rows",
    )
    table.add_column("model", no_wrap=True)
    table.add_column(f"{metric} [95% CI]", justify="right", no_wrap=True)
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("prompt tok", justify="right", no_wrap=True)
    table.add_column("ms/req", justify="right", no_wrap=True)
    for name in ("base_zero_shot", "base_few_shot", "finetune"):
        c = summary.contenders.get(name)
        if c is None or c.value is None:
            continue
        low, high = c.ci if c.ci else (float("nan"), float("nan"))
        versus = summary.comparisons.get(name)
        table.add_row(DISPLAY_NAMES[name], f"{100 * c.value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]",
                      f"{versus.p_value:.1g}" if versus else "", f"{c.prompt_tokens:.0f}", f"{c.ms_per_request:.0f}")
    out = Console()
    if table.row_count:
        out.print(table)
    if summary.forgetting:
        out.print(f"forgetting check: general probe {100 * summary.forgetting.probe_delta:+.1f} points vs the base"
                  + (" [bold red]REGRESSION FLAGGED[/]" if summary.forgetting.flagged else " (no regression flagged)"))
    if summary.train_seconds is not None:
        out.print(f"trained on {summary.train_rows:,} rows in {summary.train_seconds:.0f} s "
                  f"({summary.tokens_per_second:.0f} tokens/s), evaluated in {summary.eval_seconds:.0f} s, "
                  f"total {summary.total_seconds:.0f} s")
    else:
        out.print(f"evaluated in {summary.eval_seconds:.0f} s")
    out.print(f"run directory: [bold]{summary.run_dir}[/]  (report: report.html)")


def print_plan(plan: Plan, config: object) -> None:
    """The plan as a table: every estimate beside how it was measured, every hyperparameter beside its source."""
    est, tok, rows = plan.estimate_seconds, plan.tokens, plan.data.splits
    table = Table(title=f"plan for {config}", caption=f"{plan.hardware}; {plan.precision}", box=box.SIMPLE_HEAD)
    table.add_column("item", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("how")
    table.add_row("rows", f"{sum(rows.values()):,}", " / ".join(f"{k} {v:,}" for k, v in rows.items()))
    table.add_row("tokens", f"{tok.total:,}", f"{tok.trained:,} trained ({tok.trained_per_example:.1f}/{plan.unit})")
    for name, hp in plan.hyperparameters.items():
        how = hp.why if hp.source == "auto" else SOURCES[hp.source]
        table.add_row(name.replace("_", " "), f"{hp.value:g}", f"{SOURCES[hp.source]}: {how}" if hp.source == "auto"
                      else how)
    table.add_row("steps", f"{plan.steps:,}", "")
    table.add_row("train", f"{est.train:.0f} s", f"{plan.probe.tokens_per_second:.0f} tokens/s, "
                  f"{plan.probe.steps} steps probed")
    table.add_row("validation", f"{est.validation:.0f} s", "one batch timed")
    table.add_row("evaluation", f"{est.evaluation:.0f} s", f"{plan.evaluation_rows} rows, a few prompts timed")
    table.add_row("setup", f"{est.setup:.0f} s", "measured")
    table.add_row("total", f"{est.total / 60:.1f} min", "")
    table.add_row("cost", f"${plan.cost.total:.3f}", f"at ${plan.cost.price_per_hour:g}/hour")
    table.add_row("peak memory", f"{plan.peak_memory_mb:,.0f} MB", "measured during the probe")
    Console().print(table)


_QUIET_FIGURES = {"prompts", "positions", "max_abs_logit", "greedy_agreement", "limit", "min_top1", "min_diff"}


def print_export(record: ExportRecord) -> None:
    """The verification table (one row per check: its figures against its limit), the files, the warnings."""
    out = Console()
    what = record.dtype or record.quant or ""
    if record.verified:
        table = Table(title=f"export {record.target} {what}: verification", box=box.SIMPLE_HEAD,
                      caption="logits compared on the same tokens (each prompt + the reference's greedy continuation)")
        table.add_column("check", no_wrap=True)
        table.add_column("", no_wrap=True)
        table.add_column("figures")
        for check in record.checks:
            figures = ", ".join(f"{k}={v}" for k, v in check.figures.items() if k not in _QUIET_FIGURES)
            for key, words in (("limit", "at most"), ("min_top1", "top-1 at least"), ("min_diff", "differs by at least")):
                if key in check.figures:
                    figures += f" ({words} {check.figures[key]})"
            table.add_row(check.name, "[green]ok[/]" if check.passed else "[bold red]FAILED[/]", figures)
        out.print(table)
        if record.tokenization is not None:
            t = record.tokenization
            out.print(f"tokenization vs llama.cpp ({t.pre_tokenizer!r}, {t.texts} texts): "
                      + ("identical" if t.agrees else f"[bold red]DIFFERS[/]: {t.first_difference}"))
    for warning in record.warnings:
        out.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    for name, entry in record.files.items():
        out.print(f"  {name}  {entry.bytes / 1e6:,.1f} MB  sha256 {entry.sha256[:16]}")
    out.print(f"exported to [bold]{record.path}[/] in {record.seconds:.0f} s (record: export.json)")
