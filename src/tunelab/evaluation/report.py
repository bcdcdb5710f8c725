"""The report a person reads: `report.html` (self-contained, plots inline) and `report.md`.

    from tunelab.evaluation.report import write_report
    html_path, md_path = write_report(Path("runs/banking77-20261122-101500"))
    write_report(run_dir, evaluation=run_dir / "evals/other-1a2b3c4d5e6f")   # another evaluation's folder

Reads only what the run directory holds, each file parsed into its type: eval.json (`EvalResult`,
docs/eval-format.md), metrics.jsonl, data.json (`RunData`) and config.json (`RunConfig`). Any of
them may be missing or unreadable (a run still training has no eval.json): its sections are
replaced by a note saying what is missing, never an error.

The HTML needs nothing from the network: one inline <style>, PNG plots as base64 data
URIs, every string taken from the data passed through html.escape (predictions are
model output and may hold anything, `<script>` included). Both files are written to a
temporary name and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from tunelab.errors import first_problem
from tunelab.evaluation.compare import ALPHA
from tunelab.evaluation.result import DISPLAY_NAMES, Comparison, Confusion, EvalResult, Forgetting
from tunelab.io import write_text_atomic

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.rundir import RunData

FULL_CONFUSION_MAX = 80  # labels; above this the heatmap shows only the most confused ones
TOP_CONFUSED = 40
EXAMPLE_CHARS = 600  # longer example texts are cut: the report stays readable and small
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}.note{color:#8a5a00;font-style:italic}.flag{color:#b00020;font-weight:bold}
.ex td{white-space:pre-wrap;font-family:monospace;font-size:12px;max-width:300px}pre{background:#f6f6f6;
padding:1em;overflow:auto}img{max-width:100%}.verdict{font-size:1.1em}"""


@dataclass
class Run:
    """What a run directory holds; None where a file is missing or unreadable (said in `notes`)."""

    path: Path
    eval: EvalResult | None
    metrics: list[dict]
    data: RunData | None
    config: RunConfig | None
    notes: list[str] = field(default_factory=list)


def read_run(run_dir: Path, evaluation: Path | None = None) -> Run:
    """The run's files, typed; `evaluation`: the folder of the eval.json to report (default: the run's own)."""
    from tunelab.config import RunConfig
    from tunelab.rundir import RunData

    notes: list[str] = []

    def load(path: Path, model: type[BaseModel]) -> Any:
        if not path.is_file():
            notes.append(f"{path.name} is missing")
            return None
        try:
            return model.model_validate_json(path.read_text(encoding="utf-8"))
        except (ValidationError, UnicodeDecodeError) as exc:
            notes.append(f"{path.name} could not be read ({first_problem(exc)})")
            return None

    metrics = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:  # a crash can leave a partial last line
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                metrics.append(record)
    else:
        notes.append("metrics.jsonl is missing")
    return Run(run_dir, load((evaluation or run_dir) / "eval.json", EvalResult), metrics,
               load(run_dir / "data.json", RunData), load(run_dir / "config.json", RunConfig), notes)


def write_report(run_dir: Path, evaluation: Path | None = None) -> tuple[Path, Path]:
    """Write report.html and report.md beside the evaluation (the run's own by default); returns their paths."""
    run_dir = Path(run_dir)
    folder = Path(evaluation) if evaluation is not None else run_dir
    run = read_run(run_dir, folder)
    return (write_text_atomic(folder / "report.html", render_html(run)),
            write_text_atomic(folder / "report.md", render_markdown(run)))


# ---------------------------------------------------------------- facts shared by HTML, Markdown and the CLI

def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"
    return str(x)


def fmt_p(p: float | None) -> str:
    """0.034 -> '0.034'; 1.2e-90 -> '1.2e-90' (below 0.001 three decimals would all read 0.000)."""
    if p is None:
        return "—"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def fmt_ci(ci: Any) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def name(key: str) -> str:
    return DISPLAY_NAMES.get(key, key)


REUSED = "computed by an earlier evaluation on this machine with the same base, prompts and settings"


def summary_rows(ev: EvalResult) -> tuple[list[str], list[list[str]]]:
    """Contender x (primary metric with CI, other metrics, prompt tokens, ms/request)."""
    primary = ev.metric or ""
    others = list(dict.fromkeys(k for c in ev.contenders.values() for k in c.metrics if k != primary))
    header = ["contender", f"{primary} (95% CI)", *others, "prompt tokens", "ms/request"]
    rows = []
    for key, c in ev.contenders.items():
        shown = f"{name(key)} (read back: {REUSED})" if c.reused else name(key)
        rows.append([shown, f"{fmt(c.metrics.get(primary))} {fmt_ci(c.ci.get(primary))}".strip(),
                     *(fmt(c.metrics.get(k)) for k in others), fmt(c.prompt_tokens_mean, 1), fmt(c.ms_per_request, 1)])
    return header, rows


def comparison_rows(ev: EvalResult) -> tuple[list[str], list[list[str]]]:
    header = ["fine-tune vs", "metric", "fine-tune", "baseline", "delta", "delta 95% CI", "test", "p-value",
              "significant", "wins", "losses"]
    rows = [[name(k), c.metric, fmt(c.finetune), fmt(c.baseline), f"{c.delta:+.3f}", fmt_ci(c.delta_ci), c.test,
             fmt_p(c.p_value), fmt(c.significant), fmt(c.wins), fmt(c.losses)] for k, c in ev.comparisons.items()]
    return header, rows


def verdict(ev: EvalResult | None) -> list[str]:
    """One sentence per baseline, and one for forgetting."""
    if ev is None:
        return ["No evaluation yet (eval.json is missing): only training is shown."]
    out = [_verdict(key, c) for key, c in ev.comparisons.items()] or ["eval.json has no comparisons against a baseline."]
    if ev.forgetting:
        fg = ev.forgetting
        out.append(f"Forgetting check ({'FLAGGED' if fg.flagged else 'not flagged'}): {fg.why}"
                   + (f" The base's half was read back: {REUSED}." if fg.base_reused else ""))
    else:
        out.append("The forgetting check did not run.")
    return out


def _verdict(key: str, c: Comparison) -> str:
    stats = (f"{fmt(c.finetune)} vs {fmt(c.baseline)}, delta {c.delta:+.3f}, 95% CI {fmt_ci(c.delta_ci)}, "
             f"{c.test} p = {fmt_p(c.p_value)}")
    if c.significant:
        return f"The fine-tune significantly beats {name(key)} on {c.metric} ({stats})."
    if c.p_value < ALPHA and c.delta < 0:
        return f"The fine-tune is significantly worse than {name(key)} on {c.metric} ({stats})."
    return f"The fine-tune does not significantly beat {name(key)} on {c.metric} ({stats})."


def header_facts(run: Run) -> list[tuple[str, str]]:
    cfg, data = run.config, run.data
    base = data.base_model.spec if data else cfg.model.name if cfg else "—"
    method = "—"
    if cfg:
        lora = cfg.lora
        method = (f"{'DoRA' if lora.use_dora else 'LoRA'} (rank {lora.rank}, alpha {lora.alpha:g})"
                  if cfg.tuning == "lora" else "full fine-tuning") + f", {cfg.objective.upper()}"
    started = run.path / "config.json" if (run.path / "config.json").is_file() else run.path
    return [("run", run.path.name), ("base model", base), ("method", method),
            ("data", f"{data.path} (sha256 {data.sha256[:12]})" if data else "—"),
            ("started", time.strftime("%Y-%m-%d %H:%M", time.localtime(started.stat().st_mtime)))]


# ---------------------------------------------------------------- plots

def _figure(width: float, height: float, dpi: int = 100) -> Any:
    # The object API, not pyplot: no global figure registry to leak into, no GUI backend chosen, so
    # nothing to set before importing; savefig renders with Agg. Imported here: the CLI's table needs none of it.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="tight")


def _img(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="{html.escape(alt)}">'


def plot_losses(metrics: list[dict]) -> str | None:
    train = [(m["step"], m["loss"]) for m in metrics if "step" in m and isinstance(m.get("loss"), (int, float))]
    val = [(m["step"], m["val_loss"]) for m in metrics if "step" in m and isinstance(m.get("val_loss"), (int, float))]
    if not train and not val:
        return None
    fig = _figure(8, 3.5)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set(xlabel="optimizer step", ylabel="loss per trained token")
    ax.legend()
    return _img(fig, "training and validation loss")


def plot_metric_bars(ev: EvalResult) -> str | None:
    primary = ev.metric or ""
    bars = [(name(k), c.metrics[primary], c.ci.get(primary))
            for k, c in ev.contenders.items() if c.metrics.get(primary) is not None]
    if not bars:
        return None
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    values = [v for _, v, _ in bars]
    # Error bars from the 95% interval, which need not be symmetric (Wilson, bootstrap).
    err = [[max(0.0, v - ci[0]) if ci else 0.0 for _, v, ci in bars],
           [max(0.0, ci[1] - v) if ci else 0.0 for _, v, ci in bars]]
    ax.bar([n for n, _, _ in bars], values, yerr=err, capsize=6, color=["#2a7ab9", "#999", "#bbb"][: len(bars)])
    ax.set(ylabel=f"{primary} (95% CI)")
    return _img(fig, f"{primary} by contender")


def plot_confusion(confusion: Confusion) -> tuple[str | None, str]:
    """Heatmap of the fine-tune's confusion matrix (rows: reference, columns: prediction) and a caption."""
    from matplotlib.colors import PowerNorm

    labels, matrix = confusion.labels, confusion.matrix
    if not labels or len(matrix) != len(labels):
        return None, "The confusion matrix is empty."
    n, caption = len(labels), f"{len(labels)} labels."
    keep = list(range(n))
    if n > FULL_CONFUSION_MAX:  # unreadable in full: keep the labels most involved in mistakes
        off = [sum(matrix[i]) + sum(row[i] for row in matrix) - 2 * matrix[i][i] for i in range(n)]
        keep = sorted(sorted(range(n), key=lambda i: -off[i])[:TOP_CONFUSED])
        caption = f"The {TOP_CONFUSED} labels most involved in confusions, of {n}."
    sub = [[matrix[i][j] for j in keep] for i in keep]
    k = len(keep)
    size = min(14.0, max(5.0, 0.15 * k + 2.5))
    fig = _figure(size * 1.1, size, dpi=100 if k <= 30 else 150)  # many labels: more pixels for small fonts
    ax = fig.add_subplot()
    # Square-root colour scale: the diagonal's large counts would otherwise wash out the few confusions.
    im = ax.imshow(sub, cmap="Blues", norm=PowerNorm(0.5, vmin=0))
    font = max(4.0, min(9.0, 500 / k))  # 80 labels -> 6.25 pt at 150 dpi
    ax.set_xticks(range(k), [labels[i] for i in keep], rotation=90, fontsize=font)
    ax.set_yticks(range(k), [labels[i] for i in keep], fontsize=font)
    ax.set(xlabel="prediction", ylabel="reference")
    if k <= 15:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(sub[i][j]), ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.6)
    return _img(fig, "confusion matrix"), caption


def plot_histograms(series: dict[str, list[float]], xlabel: str, alt: str) -> str | None:
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import numpy as np

    fig = _figure(7, 3.2)
    ax = fig.add_subplot()
    everything = [x for v in series.values() for x in v]
    low, high = min(everything), max(everything)
    # The same bins for every series, so overlaid bars compare; one bin per integer when that is few enough.
    bins = (np.arange(low - 0.5, high + 1.5) if high - low <= 60 and all(float(x).is_integer() for x in everything)
            else np.histogram_bin_edges(everything, bins=40))
    for label, values in series.items():
        ax.hist(values, bins=bins, alpha=0.55, label=label)
    ax.set(xlabel=xlabel, ylabel="count")
    ax.legend()
    return _img(fig, alt)


# ---------------------------------------------------------------- HTML

def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _cut(text: Any) -> str:
    text = str(text)
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + f"… [{len(text) - EXAMPLE_CHARS} more chars]"


def render_html(run: Run) -> str:
    ev = run.eval
    out = [f"<h1>tunelab report: {_e(run.path.name)}</h1>", _table(["", ""], [[k, v] for k, v in header_facts(run)])]
    out += [f"<p class=note>{_e(n)}</p>" for n in run.notes]
    out += ["<h2>Verdict</h2>", *(f'<p class="verdict">{_e(s)}</p>' for s in verdict(ev))]

    out.append("<h2>Summary</h2>")
    if ev:
        out.append(f"<p>{_e(ev.task or '?')} task, {_e(ev.test_rows)} test rows ({_e(ev.data or '')}); "
                   f"primary metric {_e(ev.metric or '?')}: {_e(ev.metric_why or '')}</p>")
        out.append(_table(*summary_rows(ev)))
        out.append("<h2>Comparisons</h2>")
        header, rows = comparison_rows(ev)
        out.append(_table(header, rows) if rows else _note("eval.json has no comparisons."))
    else:
        out += [_note("No eval.json: no evaluation to summarise."), "<h2>Comparisons</h2>", _note("No eval.json.")]

    out += ["<h2>Plots</h2>", "<h3>Training and validation loss</h3>"]
    out.append(plot_losses(run.metrics) or _note("No losses logged in metrics.jsonl."))
    if ev:
        out += ["<h3>Primary metric by contender</h3>", plot_metric_bars(ev) or _note("No contender has the metric.")]
        finetune = ev.contenders.get("finetune")
        if finetune and finetune.confusion:
            img, caption = plot_confusion(finetune.confusion)
            out += ["<h3>Confusion matrix (fine-tune)</h3>", img or "", _note(caption)]
        elif ev.task == "classification":
            out += ["<h3>Confusion matrix (fine-tune)</h3>", _note("eval.json holds no confusion matrix.")]
    out.append("<h3>Lengths</h3>")
    img = None
    if run.data:
        lengths = run.data.lengths
        img = plot_histograms({"tokens": lengths.tokens, "trained tokens": lengths.trained_tokens},
                              "tokens per training example", "training example lengths")
    out.append(img or _note("No per-example lengths (data.json is missing or the run has no training rows)."))
    if ev:
        preds = {name(k): [float(len(p)) for p in c.predictions] for k, c in ev.contenders.items()}
        out.append(plot_histograms(preds, "prediction length (characters)", "prediction lengths")
                   or _note("No predictions in eval.json."))

    out.append("<h2>Wins and losses</h2>")
    comps = ev.comparisons if ev else {}
    for key, c in comps.items():
        out.append(f"<h3>vs {_e(name(key))}: {_e(fmt(c.wins))} wins, {_e(fmt(c.losses))} losses</h3>")
        for examples, label in ((c.win_examples, "Rows the fine-tune got right and the baseline wrong"),
                                (c.loss_examples, "Rows the baseline got right and the fine-tune wrong")):
            rows = [[_cut(x.source), _cut(x.prompt), _cut(x.reference), _cut(x.finetune), _cut(x.baseline)]
                    for x in examples]
            out.append(f"<h4>{label}</h4>")
            out.append(_table(["source", "prompt", "reference", "fine-tune", "baseline"], rows, "ex") if rows
                       else _note("None."))
    if not comps:
        out.append(_note("No comparisons, so no examples."))

    out += ["<h2>Forgetting</h2>", _forgetting_html(ev.forgetting if ev else None)]
    out += ["<h2>Config</h2>", f"<pre>{_e(run.config.model_dump_json(indent=2))}</pre>" if run.config
            else _note("config.json is missing or unreadable.")]
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>tunelab report: {_e(run.path.name)}'
            f"</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _forgetting_html(fg: Forgetting | None) -> str:
    if not fg:
        return _note("The forgetting check did not run (eval.forgetting_probe is false, or no eval.json).")
    header, rows = forgetting_rows(fg)
    parts = [f'<p class="{"flag" if fg.flagged else "verdict"}">{_e(fg.why)}</p>', _table(header, rows)]
    if fg.categories:
        parts.append(_table(["category", "items", "base", "fine-tune", "delta"],
                            [[k, fmt(v.items), fmt(v.base), fmt(v.finetune), f"{v.delta:+.3f}"]
                             for k, v in fg.categories.items()]))
    lost = [i.id for i in fg.items if i.base_ok and not i.finetune_ok]
    if lost:
        parts.append(f"<p>Probe items the base answered and the fine-tune no longer does: {_e(', '.join(lost))}</p>")
    return "\n".join(parts)


def forgetting_rows(fg: Forgetting) -> tuple[list[str], list[list[str]]]:
    p, g = fg.probe, fg.general_text_loss
    return ["measure", "base", "fine-tune", "delta"], [
        [f"probe score ({fg.probe_items} items)", fmt(p.base), fmt(p.finetune), f"{p.delta:+.3f}"],
        ["general text loss per token", fmt(g.base), fmt(g.finetune), f"{g.delta:+.3f}"],
    ]


# ---------------------------------------------------------------- Markdown

def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(x: str) -> str:  # '|' would split the cell
        return _md(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def _md(text: Any) -> str:
    """Markdown viewers render raw HTML: '&' and '<' are escaped so data cannot open a tag."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;")


def render_markdown(run: Run) -> str:
    ev = run.eval
    out = [f"# tunelab report: {run.path.name}", "", *(f"- **{k}**: {v}" for k, v in header_facts(run)), ""]
    out += [f"> {_md(n)}" for n in run.notes]
    out += ["", "## Verdict", "", *(f"- {_md(s)}" for s in verdict(ev)), ""]
    if ev:
        out += ["## Summary", "", _md_table(*summary_rows(ev)), ""]
        header, rows = comparison_rows(ev)
        out += ["## Comparisons", "", _md_table(header, rows) if rows else "_No comparisons._", ""]
    fg = ev.forgetting if ev else None
    out += ["## Forgetting", ""]
    if fg:
        out += [_md(fg.why), "", _md_table(*forgetting_rows(fg)), ""]
    else:
        out += ["_The forgetting check did not run._", ""]
    out.append("Plots, examples and the config are in report.html.")
    return "\n".join(out) + "\n"
