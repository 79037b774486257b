"""The trigger's scripts given to ``op.execute`` in a migration run by an async engine.

A temporary Alembic project with the repository's ``env.py`` (its async recipe: an async
driver's URL runs the migrations through ``create_async_engine`` and ``run_sync``) and two
revisions: 0001 creates ``tickets`` and installs its trigger with
``install_transition_trigger(op, ...)``, its downgrade runs
``op.execute(transition_trigger_drop_sql(...))``; 0002 runs
``op.execute(transition_trigger_sql(...))``. asyncpg prepares every statement it sends, and a
prepared statement holds one command: the scripts of several statements fail there, with an
error naming the call that sends them one at a time (they failed with asyncpg's "cannot insert
multiple commands into a prepared statement"); psycopg's async driver runs them. Alembic runs
for real, in this process, on a fresh database.
"""

from __future__ import annotations

import asyncio
import pickle
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db as rdb
from resilient_db.demo import migrations_dir
from resilient_db.examples.tasks import Base, Task
from resilient_db.testing import PostgresServer

TICKETS = """
TICKETS = rdb.transitions.TransitionTrigger(
    model="Ticket",
    table="tickets",
    primary_key="id",
    rules=rdb.TransitionRules(
        column="status", transitions={"new": {"open"}, "open": {"closed"}}, initial={"new"}
    ),
)
"""

REVISION_1 = f'''
"""tickets, with the transition trigger installed through op

Revision ID: 0001_tickets
Revises:
"""
import sqlalchemy as sa
from alembic import op

import resilient_db as rdb

revision = "0001_tickets"
down_revision = None
branch_labels = None
depends_on = None
{TICKETS}

def upgrade() -> None:
    op.create_table(
        "tickets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("status", sa.String(20), nullable=False),
    )
    rdb.install_transition_trigger(op, TICKETS)


def downgrade() -> None:
    op.execute(rdb.transition_trigger_drop_sql(TICKETS))
    op.drop_table("tickets")
'''

REVISION_2 = f'''
"""the transition trigger of tickets again, by its script

Revision ID: 0002_tickets_script
Revises: 0001_tickets
"""
from alembic import op

import resilient_db as rdb

revision = "0002_tickets_script"
down_revision = "0001_tickets"
branch_labels = None
depends_on = None
{TICKETS}

def upgrade() -> None:
    op.execute(rdb.transition_trigger_sql(TICKETS))


def downgrade() -> None:
    pass
'''

MADE_BY = "TransitionTrigger(model='Ticket', table='tickets', column='status')"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The Alembic project: the repository's env.py and alembic.ini, the two revisions."""
    root = tmp_path / "migrations"
    (root / "versions").mkdir(parents=True)
    shutil.copy(migrations_dir() / "env.py", root / "env.py")
    shutil.copy(migrations_dir() / "alembic.ini", root / "alembic.ini")
    (root / "versions" / "0001_tickets.py").write_text(textwrap.dedent(REVISION_1).lstrip())
    (root / "versions" / "0002_tickets_script.py").write_text(textwrap.dedent(REVISION_2).lstrip())
    return root


def migrate(url: str, project: Path, action: str, revision: str) -> None:
    """``alembic upgrade|downgrade <revision>`` of ``project`` on ``url``, as the command line
    runs it (env.py makes the engine: an async one for an async driver's URL)."""
    cfg = Config(str(project / "alembic.ini"))
    cfg.set_main_option("script_location", str(project))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    step = command.upgrade if action == "upgrade" else command.downgrade
    step(cfg, revision)


def state(engine: sa.Engine) -> tuple[str | None, bool, str | None]:
    """The version, whether the table exists, and the trigger's drift (None: installed)."""
    with engine.connect() as conn:
        version = MigrationContext.configure(conn).get_current_revision()
        table = sa.inspect(conn).has_table("tickets")
        drift = None
        if table:
            trigger = rdb.transitions.TransitionTrigger(
                model="Ticket",
                table="tickets",
                primary_key="id",
                rules=rdb.TransitionRules(
                    column="status",
                    transitions={"new": {"open"}, "open": {"closed"}},
                    initial={"new"},
                ),
            )
            drift = rdb.trigger_drift(conn, trigger)
    return version, table, drift


def test_asyncpg_refuses_the_scripts_naming_the_calls_to_make(
    pg_server: PostgresServer, pg_database: str, project: Path
) -> None:
    url = pg_server.url(pg_database, driver="asyncpg")
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        with pytest.raises(sa.exc.ProgrammingError) as info:
            migrate(url, project, "upgrade", "head")
        err = info.value
        assert isinstance(err, rdb.ScriptOnPreparedStatementError)
        # public, as the other errors: at the top level and in resilient_db.transitions
        assert "ScriptOnPreparedStatementError" in rdb.__all__
        assert "ScriptOnPreparedStatementError" in rdb.transitions.__all__
        assert rdb.transitions.ScriptOnPreparedStatementError is type(err)
        assert isinstance(err, rdb.ResilientDBError)
        assert str(err) == (
            f"the script of transition_trigger_sql({MADE_BY}) holds several statements, and "
            "asyncpg sends each statement as a prepared statement, which holds one command "
            "(cannot insert multiple commands into a prepared statement): in a migration call "
            f"rdb.install_transition_trigger(op, {MADE_BY}) instead of op.execute(script) (it "
            "sends the statements one at a time, online and offline alike); elsewhere run the "
            "script with psql or through psycopg"
        )
        # the server's error stays what it was: 42601, the driver's error its cause
        assert rdb.sqlstate_of(err) == "42601"
        assert err.orig is not None
        assert isinstance(err.__cause__, type(err.orig))
        assert err.statement == rdb.transition_trigger_sql(
            rdb.transitions.TransitionTrigger(
                model="Ticket",
                table="tickets",
                primary_key="id",
                rules=rdb.TransitionRules(
                    column="status",
                    transitions={"new": {"open"}, "open": {"closed"}},
                    initial={"new"},
                ),
            )
        )
        again = pickle.loads(pickle.dumps(err))
        assert (type(again), str(again)) == (type(err), str(err))
        # and what SQLAlchemy's handlers read of it: the statement and the driver's error
        assert (again.statement, again.reason) == (err.statement, err.reason)
        assert type(again.orig) is type(err.orig)
        assert rdb.sqlstate_of(again) == "42601"
        # one transaction: nothing of the upgrade is left
        assert state(engine) == (None, False, None)

        # the install through op sends one statement at a time: it runs on asyncpg
        migrate(url, project, "upgrade", "0001_tickets")
        assert state(engine) == ("0001_tickets", True, None)
        with pytest.raises(rdb.ScriptOnPreparedStatementError) as dropped:
            migrate(url, project, "downgrade", "base")
        assert f"the script of transition_trigger_drop_sql({MADE_BY}) holds" in str(dropped.value)
        assert f"call rdb.uninstall_transition_trigger(op, {MADE_BY}) instead" in str(dropped.value)
        assert state(engine) == ("0001_tickets", True, None)
    finally:
        engine.dispose()


def test_psycopgs_async_driver_runs_the_scripts(
    pg_server: PostgresServer, pg_database: str, project: Path
) -> None:
    url = pg_server.url(pg_database).replace("+psycopg", "+psycopg_async", 1)
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        migrate(url, project, "upgrade", "head")
        assert state(engine) == ("0002_tickets_script", True, None)
        migrate(url, project, "downgrade", "base")
        assert state(engine) == (None, False, None)
    finally:
        engine.dispose()


def test_another_statement_refused_by_asyncpg_keeps_its_error(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """Only a script handed out by this process is told in other words: asyncpg's refusal of
    another statement of several commands, and another syntax error, are raised as they were."""
    rdb.transition_trigger_sql(
        rdb.transitions.TransitionTrigger(
            model="Ticket",
            table="tickets",
            primary_key="id",
            rules=rdb.TransitionRules(column="status", transitions={"a": {"b"}}, initial={"a"}),
        )
    )  # the listener is in place

    async def refused() -> list[BaseException]:
        aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
        found: list[BaseException] = []
        try:
            for statement in ("SELECT 1; SELECT 2", "SELEC 1"):
                try:
                    async with aengine.connect() as conn:
                        await conn.exec_driver_sql(statement)
                except sa.exc.DBAPIError as exc:
                    found.append(exc)
        finally:
            await aengine.dispose()
        return found

    errors = asyncio.run(refused())
    assert [type(e) for e in errors] == [sa.exc.ProgrammingError, sa.exc.ProgrammingError]
    assert "cannot insert multiple commands into a prepared statement" in str(errors[0])
    assert [rdb.sqlstate_of(e) for e in errors] == ["42601", "42601"]


def test_the_calls_taking_op_run_on_asyncpg(pg_server: PostgresServer, pg_database: str) -> None:
    """What the error sends asyncpg's users to, and the one script of one statement, through an
    ``op`` of a migration context on an asyncpg connection (``run_sync``): each runs."""
    engine = sa.create_engine(pg_server.url(pg_database))
    Base.metadata.create_all(engine)

    def through_op(conn: sa.Connection, call: Callable[[Operations], None]) -> None:
        context = MigrationContext.configure(conn)
        with context.begin_transaction():
            call(Operations(context))

    async def migrate_async(call: Callable[[Operations], None]) -> None:
        aengine = create_async_engine(pg_server.url(pg_database, driver="asyncpg"))
        try:
            async with aengine.connect() as conn:
                await conn.run_sync(through_op, call)
                await conn.commit()
        finally:
            await aengine.dispose()

    def drift() -> str | None:
        with engine.connect() as conn:
            return rdb.trigger_drift(conn, Task)

    try:
        asyncio.run(migrate_async(lambda op: rdb.install_transition_trigger(op, Task)))
        asyncio.run(migrate_async(rdb.install_commit_markers))
        assert drift() is None
        with engine.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT to_regclass('resilient_db.commit_markers') IS NOT NULL"
            ).scalar()
        asyncio.run(
            migrate_async(
                lambda op: op.execute(rdb.transition_trigger_drop_sql(Task, columns=("status",)))
            )
        )
        assert "is missing" in (drift() or "")
        asyncio.run(migrate_async(lambda op: rdb.install_transition_trigger(op, Task)))
        assert drift() is None
        asyncio.run(migrate_async(lambda op: rdb.uninstall_transition_trigger(op, Task)))
        asyncio.run(migrate_async(rdb.uninstall_commit_markers))
        assert "is missing" in (drift() or "")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT to_regnamespace('resilient_db') IS NULL").scalar()
    finally:
        engine.dispose()
