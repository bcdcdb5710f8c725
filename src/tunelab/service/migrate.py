"""The service's schema under Alembic: `upgrade(engine)` brings any database to the newest revision.

The revisions live in service/migrations/versions/ (shipped with the package). A new column is a new
revision file, written with `alembic revision` against a database at head; never an edit of an old one.
Alembic keeps its own `alembic_version` table, so opening an up-to-date database changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine  # env.py migrates through this engine rather than a URL in an ini file
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)
