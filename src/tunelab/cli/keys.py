"""`tunelab keys create|list|revoke`: the fine-tuning service's projects and bearer keys (tunelab/service/keys.py).

    tunelab keys create --project support          # prints the key once; the store keeps its sha256
    tunelab keys list                              # id, project, prefix, created, revoked
    tunelab keys revoke key_...                    # or by the prefix `list` shows; its next request is a 401

The keys live in the service's database: --db, as `tunelab serve --db` (default: SQLite under --storage,
default $TUNELAB_HOME/service).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

keys_app = typer.Typer(no_args_is_help=True, help="Bearer keys of the fine-tuning API, one project each.")

DbOption = Annotated[str | None, typer.Option("--db", help="Database URL, as `tunelab serve --db` (default: SQLite "
                                                           "under the storage folder).")]
StorageOption = Annotated[Path | None, typer.Option("--storage", help="The service's folder (default: "
                                                                       "$TUNELAB_HOME/service).")]


def _store(db: str | None, storage: Path | None):  # noqa: ANN202
    from tunelab.service.files import Storage
    from tunelab.service.store import Store

    return Store.open(db or Storage.at(storage).default_db)


@keys_app.command("create")
def create(
    project: Annotated[str, typer.Option("--project", help="The project the key acts for (created if new).")],
    name: Annotated[str | None, typer.Option("--name", help="A note to tell keys apart.")] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute allowed (429 beyond).")] = None,
    max_jobs: Annotated[int | None, typer.Option("--max-jobs", min=1, help="Unfinished jobs at once (429 beyond).")
                        ] = None,
    db: DbOption = None,
    storage: StorageOption = None,
) -> None:
    """Create a key; it is printed once (stdout) and stored only as its hash."""
    from tunelab.service.keys import create_key

    secret, record = create_key(_store(db, storage), project, name, rpm, max_jobs)
    Console(stderr=True).print(f"key {record.id} for project {project}: keep it now, it is not shown again",
                               highlight=False)
    print(secret)


@keys_app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    db: DbOption = None,
    storage: StorageOption = None,
) -> None:
    """Every key: id, project, the first characters, when created and revoked (never the key itself)."""
    from tunelab.service.keys import list_keys

    rows = [{"id": k.id, "project": project, "prefix": k.prefix, "name": k.name, "created_at": k.created_at,
             "revoked_at": k.revoked_at, "requests_per_minute": k.requests_per_minute,
             "max_active_jobs": k.max_active_jobs} for k, project in list_keys(_store(db, storage))]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "project", "prefix", "name", "created", "revoked", "rpm", "jobs")
    for r in rows:
        table.add_row(r["id"], r["project"], r["prefix"] + "...", r["name"] or "", _when(r["created_at"]),
                      _when(r["revoked_at"]), str(r["requests_per_minute"] or ""), str(r["max_active_jobs"] or ""))
    Console().print(table)


@keys_app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="The key's id (key_...) or its prefix, from `tunelab keys list`.")],
    db: DbOption = None,
    storage: StorageOption = None,
) -> None:
    """Revoke a key: requests with it are refused (401) from now on."""
    from tunelab.service.keys import revoke_key

    record = revoke_key(_store(db, storage), key)
    print(f"revoked {record.id} ({record.prefix}...)")


def _when(seconds: int | None) -> str:
    return "" if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
