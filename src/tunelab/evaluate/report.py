"""The report a person reads: `report.html` (self-contained, plots inline) and `report.md`.

    from tunelab.evaluate.report import write_report
    html_path, md_path = write_report(Path("runs/banking77-20261122-101500"))

Reads only what the run directory holds: eval.json (docs/eval-format.md), metrics.jsonl,
data.json and config.json. Any of them may be missing (a run still training has no
eval.json): its sections are replaced by a note saying what is missing, never an error.

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
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

NAMES = {"finetune": "fine-tune", "base_zero_shot": "base zero-shot", "base_few_shot": "base few-shot",
         "base_prompted": "base prompted"}
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
    eval: dict | None
    metrics: list[dict]
    data: dict | None
    config: dict | None
    notes: list[str] = field(default_factory=list)


def read_run(run_dir: Path) -> Run:
    notes: list[str] = []

    def load(name: str) -> dict | None:
        path = run_dir / name
        if not path.is_file():
            notes.append(f"{name} is missing")
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            notes.append(f"{name} could not be read ({exc})")
            return None
        return obj if isinstance(obj, dict) else None

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
    return Run(run_dir, load("eval.json"), metrics, load("data.json"), load("config.json"), notes)


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write report.html and report.md into `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    return (_write_atomic(run_dir / "report.html", render_html(run)),
            _write_atomic(run_dir / "report.md", render_markdown(run)))


def _write_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- facts shared by HTML, Markdown and the CLI

def contenders(ev: dict) -> dict[str, dict]:
    """eval.json's contenders; older files (fine-tune vs base_prompted at top level) are read too."""
    if isinstance(ev.get("contenders"), dict):
        return ev["contenders"]
    old = {k: v for k, v in ev.items() if isinstance(v, dict) and "accuracy" in v}
    return {k: {"metrics": {"accuracy": v["accuracy"]}, "ci": {"accuracy": v.get("accuracy_ci")},
                "prompt_tokens_mean": v.get("prompt_tokens_mean"), "ms_per_request": v.get("ms_per_request"),
                "predictions": [e.get("prediction", "") for e in v.get("examples", [])]} for k, v in old.items()}


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
    return NAMES.get(key, key)


def summary_rows(ev: dict) -> tuple[list[str], list[list[str]]]:
    """Contender x (primary metric with CI, other metrics, prompt tokens, ms/request)."""
    primary, cs = ev.get("metric", "accuracy"), contenders(ev)
    others = list(dict.fromkeys(k for c in cs.values() for k in c.get("metrics", {}) if k != primary))
    header = ["contender", f"{primary} (95% CI)", *others, "prompt tokens", "ms/request"]
    rows = []
    for key, c in cs.items():
        m, ci = c.get("metrics", {}), c.get("ci", {})
        rows.append([name(key), f"{fmt(m.get(primary))} {fmt_ci(ci.get(primary))}".strip(),
                     *(fmt(m.get(k)) for k in others), fmt(c.get("prompt_tokens_mean"), 1), fmt(c.get("ms_per_request"), 1)])
    return header, rows


def comparison_rows(ev: dict) -> tuple[list[str], list[list[str]]]:
    header = ["fine-tune vs", "metric", "fine-tune", "baseline", "delta", "delta 95% CI", "test", "p-value",
              "significant", "wins", "losses"]
    rows = [[name(k), c.get("metric", ev.get("metric", "")), fmt(c.get("finetune")), fmt(c.get("baseline")),
             f"{c['delta']:+.3f}" if isinstance(c.get("delta"), (int, float)) else "—", fmt_ci(c.get("delta_ci")),
             c.get("test", "—"), fmt_p(c.get("p_value")), fmt(c.get("significant")), fmt(c.get("wins")),
             fmt(c.get("losses"))] for k, c in (ev.get("comparisons") or {}).items()]
    return header, rows


def verdict(ev: dict | None) -> list[str]:
    """One sentence per baseline, and one for forgetting."""
    if ev is None:
        return ["No evaluation yet (eval.json is missing): only training is shown."]
    out = []
    for key, c in (ev.get("comparisons") or {}).items():
        delta, metric = c.get("delta") or 0.0, c.get("metric", ev.get("metric", "the metric"))
        ci = f", 95% CI {fmt_ci(c['delta_ci'])}" if c.get("delta_ci") else ""
        stats = (f"{fmt(c.get('finetune'))} vs {fmt(c.get('baseline'))}, delta {delta:+.3f}{ci}, "
                 f"{c.get('test', 'test')} p = {fmt_p(c.get('p_value'))}")
        if c.get("significant") and delta > 0:
            out.append(f"The fine-tune significantly beats {name(key)} on {metric} ({stats}).")
        elif c.get("significant") and delta < 0:
            out.append(f"The fine-tune is significantly worse than {name(key)} on {metric} ({stats}).")
        else:
            out.append(f"The fine-tune does not significantly beat {name(key)} on {metric} ({stats}).")
    if not out:
        out.append("eval.json has no comparisons against a baseline.")
    fg = ev.get("forgetting")
    if fg:
        out.append(f"Forgetting check ({'FLAGGED' if fg.get('flagged') else 'not flagged'}): {fg.get('why', '')}")
    else:
        out.append("The forgetting check did not run.")
    return out


def summary_table(eval_json: dict) -> Table:
    """The summary as a rich table, for the CLI to print."""
    header, rows = summary_rows(eval_json)
    table = Table(title=f"{eval_json.get('task', 'evaluation')}: {eval_json.get('test_rows', '?')} test rows")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def header_facts(run: Run) -> list[tuple[str, str]]:
    cfg, data = run.config or {}, run.data or {}
    base = (data.get("base_model") or {}).get("spec") or cfg.get("model") or "—"
    lora = cfg.get("lora") or {}
    tuning = cfg.get("tuning")
    method = ("LoRA" + (f" (rank {lora.get('rank')}, alpha {lora.get('alpha')})" if lora else "") if tuning == "lora"
              else "full fine-tuning" if tuning == "full" else "—")
    method += f", {cfg['objective'].upper()}" if cfg.get("objective") else ""
    started = run.path / "config.json" if (run.path / "config.json").is_file() else run.path
    return [("run", run.path.name), ("base model", str(base)), ("method", method),
            ("data", f"{data.get('path', '—')} (sha256 {str(data.get('sha256', '—'))[:12]})"),
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


def plot_metric_bars(ev: dict) -> str | None:
    primary, cs = ev.get("metric", "accuracy"), contenders(ev)
    bars = [(name(k), c["metrics"][primary], (c.get("ci") or {}).get(primary))
            for k, c in cs.items() if isinstance(c.get("metrics", {}).get(primary), (int, float))]
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


def plot_confusion(confusion: dict) -> tuple[str | None, str]:
    """Heatmap of the fine-tune's confusion matrix (rows: reference, columns: prediction) and a caption."""
    from matplotlib.colors import PowerNorm

    labels, matrix = confusion.get("labels") or [], confusion.get("matrix") or []
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
        out.append(f"<p>{_e(ev.get('task', '?'))} task, {_e(ev.get('test_rows', '?'))} test rows ({_e(ev.get('data', ''))}); "
                   f"primary metric {_e(ev.get('metric', '?'))}: {_e(ev.get('metric_why', ''))}</p>")
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
        confusion = contenders(ev).get("finetune", {}).get("confusion")
        if confusion:
            img, caption = plot_confusion(confusion)
            out += ["<h3>Confusion matrix (fine-tune)</h3>", img or "", _note(caption)]
        elif ev.get("task") == "classification":
            out += ["<h3>Confusion matrix (fine-tune)</h3>", _note("eval.json holds no confusion matrix.")]
    out.append("<h3>Lengths</h3>")
    lengths = (run.data or {}).get("lengths") or {}
    img = plot_histograms({"tokens": lengths.get("tokens") or [], "trained tokens": lengths.get("trained_tokens") or []},
                          "tokens per training example", "training example lengths")
    summary = (run.data or {}).get("tokens_per_example")
    out.append(img or _note("data.json has no per-example lengths" + (f"; tokens per example: {summary}" if summary else "") + "."))
    if ev:
        preds = {name(k): [float(len(str(p))) for p in c.get("predictions") or []] for k, c in contenders(ev).items()}
        out.append(plot_histograms(preds, "prediction length (characters)", "prediction lengths")
                   or _note("No predictions in eval.json."))

    out.append("<h2>Wins and losses</h2>")
    comps = (ev or {}).get("comparisons") or {}
    for key, c in comps.items():
        out.append(f"<h3>vs {_e(name(key))}: {_e(fmt(c.get('wins')))} wins, {_e(fmt(c.get('losses')))} losses</h3>")
        for kind in ("win_examples", "loss_examples"):
            rows = [[_cut(x.get(f, "")) for f in ("source", "prompt", "reference", "finetune", "baseline")]
                    for x in c.get(kind) or []]
            label = "Rows the fine-tune got right and the baseline wrong" if kind == "win_examples" else \
                "Rows the baseline got right and the fine-tune wrong"
            out.append(f"<h4>{label}</h4>")
            out.append(_table(["source", "prompt", "reference", "fine-tune", "baseline"], rows, "ex") if rows
                       else _note("None."))
    if not comps:
        out.append(_note("No comparisons, so no examples."))

    out += ["<h2>Forgetting</h2>", _forgetting_html((ev or {}).get("forgetting"))]
    out += ["<h2>Config</h2>", f"<pre>{_e(json.dumps(run.config, indent=2))}</pre>" if run.config
            else _note("config.json is missing.")]
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>tunelab report: {_e(run.path.name)}'
            f"</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _forgetting_html(fg: dict | None) -> str:
    if not fg:
        return _note("The forgetting check did not run (eval.forgetting_probe is false, or no eval.json).")
    header, rows = forgetting_rows(fg)
    parts = [f'<p class="{"flag" if fg.get("flagged") else "verdict"}">{_e(fg.get("why", ""))}</p>', _table(header, rows)]
    cats = fg.get("categories") or {}
    if cats:
        parts.append(_table(["category", "items", "base", "fine-tune", "delta"],
                            [[k, fmt(v.get("items")), fmt(v.get("base")), fmt(v.get("finetune")),
                              f"{v.get('delta', 0):+.3f}"] for k, v in cats.items()]))
    lost = [i["id"] for i in fg.get("items") or [] if i.get("base_ok") and not i.get("finetune_ok")]
    if lost:
        parts.append(f"<p>Probe items the base answered and the fine-tune no longer does: {_e(', '.join(lost))}</p>")
    return "\n".join(parts)


def forgetting_rows(fg: dict) -> tuple[list[str], list[list[str]]]:
    p, g = fg.get("probe") or {}, fg.get("general_text_loss") or {}
    return ["measure", "base", "fine-tune", "delta"], [
        [f"probe score ({fg.get('probe_items', '?')} items)", fmt(p.get("base")), fmt(p.get("finetune")),
         f"{p.get('delta', 0):+.3f}"],
        ["general text loss per token", fmt(g.get("base")), fmt(g.get("finetune")), f"{g.get('delta', 0):+.3f}"],
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
    fg = (ev or {}).get("forgetting")
    out += ["## Forgetting", ""]
    if fg:
        out += [_md(fg.get("why", "")), "", _md_table(*forgetting_rows(fg)), ""]
    else:
        out += ["_The forgetting check did not run._", ""]
    out.append("Plots, examples and the config are in report.html.")
    return "\n".join(out) + "\n"
