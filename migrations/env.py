"""Alembic environment for the example ``tasks`` schema.

The connection comes from, in order: ``config.attributes["connection"]`` (a SQLAlchemy
``Connection`` handed over by a program, as ``resilient-db demo`` does), ``-x url=...`` on the
alembic command line, the ``RESILIENT_DB_URL`` environment variable, ``sqlalchemy.url`` in
``alembic.ini``; an async driver's URL (``postgresql+asyncpg://...``) runs them through an
async engine. Offline mode (``alembic upgrade --sql``) writes the SQL, the transition
trigger included, as one transaction that takes the same advisory lock as an online run.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import create_async_engine

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


# Two processes migrating one database at once (a rolling deploy whose instances each run
# ``alembic upgrade head`` at start) take turns: each takes this transaction-level advisory lock
# before Alembic reads the version, so the second waits for the first to commit and then finds
# the steps done. Without it both read the same version, and the second ran the steps again and
# failed (a unique violation creating ``alembic_version``, or "Online migration expected to match
# one row"). The key is this environment's own: the installs' lock is another.
MIGRATION_LOCK = "SELECT pg_catalog.pg_advisory_xact_lock(8242821379925111669)"


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def version_check(start: str | tuple[str, ...] | None) -> str:
    """A ``DO`` block refusing to go on unless the database is at ``start``, the revision
    (or revisions, full ids: see :func:`starting_revisions`) an offline script migrates from:
    ``None`` (from base) wants no
    ``alembic_version`` table, as the script creates it. Alembic's offline scripts check no
    version (its ``UPDATE alembic_version ... WHERE version_num = ...`` matches no row
    without an error), so a copy applied again, or at another revision, ran its steps again.
    No ``%`` in it: no paramstyle rewrites it."""
    starts = [start] if isinstance(start, str) else sorted(start or ())
    wanted = (
        "CAST(ARRAY[" + ", ".join(_sql_literal(s) for s in starts) + "] AS text[])"
        if starts
        else "NULL"
    )
    described = _sql_literal(", ".join(starts) if starts else "base (no alembic_version table)")
    return f"""DO $rdb_version$
DECLARE
    found text[];
BEGIN
    IF pg_catalog.to_regclass('alembic_version') IS NOT NULL THEN
        EXECUTE 'SELECT coalesce(pg_catalog.array_agg(CAST(version_num AS text)'
            || ' ORDER BY version_num), CAST(ARRAY[] AS text[])) FROM alembic_version'
            INTO found;
    END IF;
    IF found IS DISTINCT FROM {wanted} THEN
        RAISE EXCEPTION USING
            MESSAGE = 'this migration script starts at revision ' || {described}
                || ', the database is at '
                || coalesce(nullif(pg_catalog.array_to_string(found, ', '), ''),
                    CASE WHEN found IS NULL THEN 'base (no alembic_version table)'
                    ELSE 'base (an empty alembic_version table)' END)
                || ': nothing of it was run',
            HINT = 'write a script that starts at the database''s revision (alembic upgrade'
                || ' --sql with a range, start:end), or run alembic upgrade online';
    END IF;
END
$rdb_version$"""


def starting_revisions() -> tuple[str, ...] | None:
    """The revisions an offline script migrates from (``START`` of ``upgrade START:END --sql``)
    as the database records them: full ids. Alembic resolves ``head`` and branch labels there,
    not an abbreviated id (``upgrade 0005:head --sql``, which it accepts and whose steps'
    ``UPDATE alembic_version ... WHERE version_num = ...`` name the full id): compared as typed,
    the check refused a database at exactly that revision. ``None``: from base."""
    start = context.get_starting_revision_argument()
    if start is None:
        return None
    script = ScriptDirectory.from_config(config)
    return tuple(rev.revision for rev in script.get_revisions(start) if rev is not None) or None


def run_migrations_offline() -> None:
    """Write the migration SQL instead of running it: one transaction (``BEGIN`` ... ``COMMIT``,
    PostgreSQL DDL being transactional) whose first statement takes :data:`MIGRATION_LOCK`, as
    the online path does, so two copies of the script run at once take turns (the second
    waits for the first to commit) instead of interleaving their steps. The next checks the
    database is at the revision the script starts from (:func:`version_check`): a copy
    applied again (the second of two taking turns, or one run twice) or on a database at
    another revision stops there, its transaction leaving nothing."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.execute(MIGRATION_LOCK)
        context.execute(version_check(starting_revisions()))
        context.run_migrations()


def _run_on(connection: sa.Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        connection.exec_driver_sql(MIGRATION_LOCK)
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a live connection (one transaction: PostgreSQL DDL is
    transactional, so a failed migration leaves nothing behind; one migration at a time: see
    MIGRATION_LOCK)."""
    given = config.attributes.get("connection")
    if given is not None:
        _run_on(given)
        return
    url = sa.make_url(_url())
    if url.get_dialect().is_async:  # an async driver's URL (+asyncpg): run through its engine
        asyncio.run(_run_async(url))
        return
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


async def _run_async(url: sa.URL) -> None:
    """The same on an async engine (a URL with ``+asyncpg`` or ``+psycopg_async``, which a
    sync engine can't use): the migrations run in ``run_sync``, as Alembic's async template
    does."""
    engine = create_async_engine(url, poolclass=sa.pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_on)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
