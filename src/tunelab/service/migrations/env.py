"""Alembic's environment: migrate the engine migrate.py hands over (no alembic.ini, no URL in a file)."""

from alembic import context

from tunelab.service.store import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying them
    with context.begin_transaction():
        context.run_migrations()
