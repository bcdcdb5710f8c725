"""`tunelab models ...`: the registry from the command line (tunelab/registry.py does the work).

    tunelab models register RUN_DIR --name NAME [--note TEXT]   prints NAME@1, NAME@2, ...
    tunelab models list [NAME] [--json]                         name, version, aliases, metric, created
    tunelab models show NAME[@VERSION|@ALIAS] [--json]          everything recorded, and the promotion gate
    tunelab models diff A B [--json]                            config, data, base model, template, metrics
    tunelab models promote NAME@V [--alias production] [--reason TEXT] [--force]
    tunelab models rollback NAME [--alias production] [--reason TEXT]
    tunelab models delete NAME@V [--force] [--reason TEXT]
    tunelab models log NAME [--json]                            every change: UTC time, actor, action, reason

Every command takes --registry DIR (default $TUNELAB_REGISTRY, else $TUNELAB_HOME/registry).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunelab.registry.store import DEFAULT_ALIAS, Registry, Version, gate

models_app = typer.Typer(no_args_is_help=True, help="Register finished runs as NAME@VERSION; promote and roll back.")

RegistryOption = Annotated[Path | None, typer.Option(
    "--registry", help="Registry folder (default: $TUNELAB_REGISTRY, else $TUNELAB_HOME/registry).")]
AliasOption = Annotated[str, typer.Option("--alias", help="The alias to move, e.g. production or staging.")]
ReasonOption = Annotated[str | None, typer.Option("--reason", help="Why; recorded in the event log.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


def _out() -> Console:
    return Console(soft_wrap=True)


def _metric(v: Version) -> str:
    """'accuracy 0.862 [0.829, 0.889]' for the fine-tune, '-' without an evaluation."""
    ev = v.record.get("eval") or {}
    finetune = (ev.get("contenders") or {}).get("finetune") or {}
    if finetune.get("value") is None:
        return "-"
    ci = finetune.get("ci")
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2 else ""
    return f"{ev.get('metric')} {finetune['value']:.3f}{interval}"


def _text(value: Any) -> str:
    """A table cell: strings as they are, floats to 6 significant digits (0.6000000000000001 -> 0.6), None '-'."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_text(x) for x in value) + "]"
    return "-" if value is None else json.dumps(value)


def _cells(*values: Any) -> list[Text]:
    """Plain Text, never markup: '[0.8, 0.9]' or a reason in brackets must not be read as a rich style tag."""
    return [Text(_text(v)) for v in values]


ABSENT = "(absent)"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'config': {'lora': {'rank': 8}}} -> {'config.lora.rank': 8}; lists and empty dicts stay whole values."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def diff_records(a: Version, b: Version) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every recorded fact that differs; ABSENT where one lacks it."""
    sections = ("base_model", "tokenizer", "data", "config", "eval")
    fa = flatten({k: a.record.get(k) for k in sections})
    fb = flatten({k: b.record.get(k) for k in sections})
    return [(k, fa.get(k, ABSENT), fb.get(k, ABSENT)) for k in sorted(fa.keys() | fb.keys())
            if fa.get(k, ABSENT) != fb.get(k, ABSENT)]


@models_app.command("register")
def register(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (it has manifest.json).")],
    name: Annotated[str, typer.Option("--name", help="Model name: lowercase letters, digits, '.', '_', '-'.")],
    note: Annotated[str | None, typer.Option("--note", help="A note kept with the version.")] = None,
    registry: RegistryOption = None,
) -> None:
    """Verify a finished run against its manifest and copy it into the registry as NAME@(next version)."""
    print(Registry(registry).register(run_dir, name, note).ref)


@models_app.command("list")
def list_(
    name: Annotated[str | None, typer.Argument(help="Only this model's versions.")] = None,
    as_json: JsonOption = False,
    registry: RegistryOption = None,
) -> None:
    """Every registered version: name, version, aliases, primary metric of the fine-tune, creation time."""
    versions = Registry(registry).versions(name)
    if as_json:
        print(json.dumps([{"name": v.name, "version": v.version, "aliases": list(v.aliases),
                           "eval": v.record.get("eval"), "created": v.record.get("created")} for v in versions]))
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("name", "version", "aliases", "metric (fine-tune, 95% CI)", "created (UTC)"):
        table.add_column(column, no_wrap=column != "aliases")
    for v in versions:
        table.add_row(*_cells(v.name, str(v.version), ", ".join(v.aliases), _metric(v), v.record.get("created", "")))
    _out().print(table if versions else "no models registered yet: tunelab models register RUN_DIR --name NAME")


@models_app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="NAME (latest), NAME@VERSION or NAME@ALIAS.")],
    as_json: JsonOption = False,
    registry: RegistryOption = None,
) -> None:
    """Everything recorded for a version: source run, base model, tokenizer/template, data, config, eval, gate."""
    v = Registry(registry).resolve(ref)
    verdict = gate(v.evaluation())
    shown = {"ref": v.ref, "path": str(v.path), "aliases": list(v.aliases),
             "gate": {"ok": verdict.ok, "reasons": verdict.reasons}, **v.record}
    if as_json:
        print(json.dumps(shown))
        return
    table = Table(title=v.ref, box=box.SIMPLE_HEAD, show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # hashes whole, folded, never cut to "…"
    for key, value in flatten({k: val for k, val in shown.items() if k != "files"}).items():
        table.add_row(*_cells(key, value))
    table.add_row("files", f"{len(v.record.get('files', {}))} files, sha256 verified against the run's manifest")
    _out().print(table)


@models_app.command("diff")
def diff(
    a: Annotated[str, typer.Argument(help="NAME@VERSION (or NAME, NAME@ALIAS).")],
    b: Annotated[str, typer.Argument(help="NAME@VERSION (or NAME, NAME@ALIAS).")],
    as_json: JsonOption = False,
    registry: RegistryOption = None,
) -> None:
    """What differs between two versions: config (dotted keys), data hash, base model, template hash, metrics."""
    reg = Registry(registry)
    va, vb = reg.resolve(a), reg.resolve(b)
    rows = diff_records(va, vb)
    if as_json:
        print(json.dumps({"a": va.ref, "b": vb.ref, "differences": [{"key": k, "a": x, "b": y} for k, x, y in rows]}))
        return
    if not rows:
        _out().print(f"{va.ref} and {vb.ref} record the same config, data, base model, template and metrics")
        return
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("key", no_wrap=True)
    table.add_column(va.ref, overflow="fold")
    table.add_column(vb.ref, overflow="fold")
    for key, x, y in rows:
        table.add_row(*_cells(key, x, y))
    _out().print(table)


@models_app.command("promote")
def promote(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION to point the alias at.")],
    alias: AliasOption = DEFAULT_ALIAS,
    reason: ReasonOption = None,
    force: Annotated[bool, typer.Option("--force", help="Override a failed gate (needs --reason).")] = False,
    registry: RegistryOption = None,
) -> None:
    """Point NAME@ALIAS at a version, if its eval.json shows it significantly beats the base model."""
    v, previous, verdict = Registry(registry).promote(ref, alias, reason, force)
    was = "unset" if previous is None else f"{v.name}@{previous}"
    if previous == v.version:
        _out().print(f"{v.name}@{alias} already points at {v.ref}: nothing changed", markup=False)
        return
    if not verdict.ok:
        Console(stderr=True).print("gate overridden (recorded in the event log): " + "; ".join(verdict.reasons),
                                   markup=False, soft_wrap=True)
    _out().print(f"{v.name}@{alias} -> {v.ref} (was {was})", markup=False)


@models_app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="The model name.")],
    alias: AliasOption = DEFAULT_ALIAS,
    reason: ReasonOption = None,
    registry: RegistryOption = None,
) -> None:
    """Move NAME@ALIAS back to the version it pointed at before its latest promote (again: further back)."""
    old, new = Registry(registry).rollback(name, alias, reason)
    _out().print(f"{name}@{alias} -> {name}@{new} (was {name}@{old})", markup=False)


@models_app.command("delete")
def delete(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (a number: a bare NAME is refused).")],
    force: Annotated[bool, typer.Option("--force", help="Delete even if an alias points at it (removes it).")] = False,
    reason: ReasonOption = None,
    registry: RegistryOption = None,
) -> None:
    """Delete one version's files and index entry; refused while an alias points at it, unless --force."""
    v = Registry(registry).delete(ref, force, reason)
    removed = f"; removed alias {', '.join(v.aliases)}" if v.aliases else ""
    _out().print(f"deleted {v.ref}{removed}", markup=False)


@models_app.command("log")
def log(
    name: Annotated[str, typer.Argument(help="The model name.")],
    as_json: JsonOption = False,
    registry: RegistryOption = None,
) -> None:
    """Every change to a model's versions and aliases, oldest first: UTC time, actor, action, reason."""
    events = Registry(registry).events(name)
    if as_json:
        print(json.dumps([e.__dict__ for e in events]))
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("time (UTC)", "actor", "action", "version", "alias", "reason", "detail"):
        table.add_column(column, no_wrap=column in ("time (UTC)", "action"))
    for e in events:
        detail = ", ".join(f"{k}={_text(v)}" for k, v in e.detail.items() if v not in (None, [], False))
        table.add_row(*_cells(e.time, e.actor, e.action, "" if e.version is None else f"{e.name}@{e.version}",
                              e.alias or "", e.reason or "", detail))
    _out().print(table)
