"""`tunelab serve`: the base model and fine-tunes behind an OpenAI-compatible API (tunelab/serve/ does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import TunelabError


def serve_cmd(
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="A registry reference (NAME, NAME@3, NAME@production) or a run directory to serve; "
        "repeat for more. Default: every model in the registry.")] = None,
    base: Annotated[str | None, typer.Option(help="The base model (default: smollm2-135m-instruct).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1: this machine only).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000).")] = None,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", help="A bearer key clients may send (project 'default'); repeat for more. Keys made with "
        "`tunelab keys create` work too. With none at all, none is checked.")] = None,
    db: Annotated[str | None, typer.Option(help="The fine-tuning service's database: postgresql://user@host/db "
                                                "(several API hosts) or sqlite:////path (default: SQLite under "
                                                "--storage).")] = None,
    storage: Annotated[Path | None, typer.Option(help="Uploads and job runs (default: $TUNELAB_HOME/service).")
                       ] = None,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="Any other ServeConfig key, e.g. max_batch_rows=16, queue_size=128, max_lora_rank=32.")] = None,
) -> None:
    """Serve the base model and its fine-tunes on one OpenAI-compatible endpoint: the request's `model` picks one."""
    from pydantic import ValidationError

    from tunelab.cli.run import parse_sets
    from tunelab.config import ServeConfig
    from tunelab.errors import first_problem

    given = {"models": model, "base": base, "host": host, "port": port, "api_keys": api_key, "db": db,
             "storage": storage}
    raw = {**parse_sets(sets), **{k: v for k, v in given.items() if v is not None}}
    try:
        cfg = ServeConfig.model_validate(raw)
    except ValidationError as exc:
        raise TunelabError(f"serve options: {first_problem(exc)}",
                           fix="see `tunelab serve --help`; --set takes ServeConfig keys (tunelab/config.py)") from None
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise TunelabError(f"tunelab serve needs the `serve` extra ({exc.name} is not installed)",
                           fix="pip install 'tunelab[serve]'  (or `make setup`)") from None
    from tunelab.serve.server import serve

    serve(cfg)
