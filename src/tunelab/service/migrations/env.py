"""Alembic's environment: migrate the engine migrate.py hands over (no alembic.ini, no URL in a file).

Two API hosts starting at once on a fresh PostgreSQL would both run CREATE TABLE and one would fail
(a duplicate type in pg_type): an advisory lock lets one migrate while the other waits, then finds the
database at head. SQLite needs none: its transactions begin IMMEDIATE (store.py), one writer at a time.
"""

from alembic import context
from sqlalchemy import text

from tunelab.service.store import Base

MIGRATION_LOCK = 7461726  # any constant shared by every tunelab host: pg_advisory_xact_lock's key

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying them
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        context.run_migrations()
