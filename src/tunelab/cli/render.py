"""Everything the CLI prints as a table, in one place: the run summary, the plan; and the stderr console."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)  # the run log, progress bars and errors; results go to stdout

CONTENDER_NAMES = {"base_zero_shot": "base, zero-shot", "base_few_shot": "base, few-shot + labels",
                   "finetune": "fine-tuned"}


def print_summary(summary: dict[str, Any], trained: bool = True) -> None:
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



def print_plan(result: dict[str, Any], config: object) -> None:
    """The plan as a table: every estimate beside how it was measured."""
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
