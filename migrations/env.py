"""Alembic environment for the example ``tasks`` schema.

The connection comes from, in order: ``config.attributes["connection"]`` (a SQLAlchemy
``Connection`` handed over by a program, as ``resilient-db demo`` does), ``-x url=...`` on the
alembic command line, the ``RESILIENT_DB_URL`` environment variable, ``sqlalchemy.url`` in
``alembic.ini``. Offline mode (``alembic upgrade --sql``) writes the SQL, the transition
trigger included.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

from resilient_db.examples.tasks import Base

config = context.config
target_metadata = Base.metadata

# Configure logging from alembic.ini only when run by the alembic command line: a program that
# runs the migrations keeps its own logging (``configure_logger=False`` in the attributes).
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("RESILIENT_DB_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError(
            "no database URL: pass -x url=postgresql+psycopg://..., set RESILIENT_DB_URL, "
            "or set sqlalchemy.url in alembic.ini"
        )
    return url


def run_migrations_offline() -> None:
    """Write the migration SQL instead of running it."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: sa.Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a live connection (one transaction: PostgreSQL DDL is
    transactional, so a failed migration leaves nothing behind)."""
    given = config.attributes.get("connection")
    if given is not None:
        _run_on(given)
        return
    engine = sa.create_engine(_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
