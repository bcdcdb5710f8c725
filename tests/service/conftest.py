"""The service's database on both backends: every test taking `db_url` or `store` runs on SQLite and on PostgreSQL.

PostgreSQL is a private cluster started once per session (tests/postgres.py), each test on a fresh database
dropped afterwards. Without PostgreSQL binaries its half of the tests is skipped, unless
TUNELAB_REQUIRE_POSTGRES=1 (set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from postgres import PostgresServer, PostgresUnavailable, start_postgres
from tunelab.service.store import Store


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        why = str(exc)  # skip or fail outside the except: no "during handling" chain in the report
    else:
        why = None
    if why is not None:
        if os.environ.get("TUNELAB_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"TUNELAB_REQUIRE_POSTGRES=1 but PostgreSQL cannot run: {why}", pytrace=False)
        pytest.skip(f"PostgreSQL tests skipped: {why} (set TUNELAB_REQUIRE_POSTGRES=1 to fail instead)")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/service.sqlite"  # tmp_path is absolute: sqlite:////tmp/...
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = "t_" + secrets.token_hex(8)
    url = server.create_database(name)
    try:
        yield url
    finally:
        server.drop_database(name)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    opened = Store.open(db_url)
    try:
        yield opened
    finally:
        opened.engine.dispose()
