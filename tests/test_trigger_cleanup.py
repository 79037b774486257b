"""What the transition trigger's installs and the project's migrations leave behind, on a real
server.

A table's schema may be written two ways (a migration's ``TransitionTrigger(schema="appdata")``
and a description of ``tasks`` reached through ``search_path=appdata``): the two name the
trigger's function differently (see ``spellings``). The script form of an install (what
``transition_trigger_sql`` writes, and Alembic's offline mode) replaces the function of the
other name as an install on a server does: dropped with the triggers that called it, in the
statement that creates the new ones. And ``alembic downgrade base`` leaves nothing in the
database that ``upgrade head`` made (Alembic's own ``alembic_version`` aside)."""

from __future__ import annotations

import io
import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import registry
from test_transition_trigger_value import offline_script
from test_trigger_schema_spelling import _functions, _task, _trigger, owner_engine

import resilient_db as rdb
from resilient_db.demo import alembic_config, apply_migrations, downgrade_migrations
from resilient_db.examples.tasks import Task
from resilient_db.transitions import TransitionTrigger
from resilient_db.transitions._rules import guards_of
from resilient_db.transitions._sql import function_name, install_statements, trigger_names


@pytest.fixture
def owner(pg_url: str) -> Iterator[sa.Engine]:
    eng = owner_engine(pg_url)
    yield eng
    eng.dispose()


def _our_triggers(conn: sa.Connection) -> list[str]:
    names = conn.exec_driver_sql(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'appdata.tasks'::regclass "
        "AND starts_with(tgname::text, 'rdb_transition_') ORDER BY 1"
    ).scalars()
    return list(names)


def _guarded(conn: sa.Connection) -> None:
    """Both triggers are there, an illegal move is refused by the trigger (RDB01) and a legal
    one is stored (then rolled back)."""
    assert _our_triggers(conn) == ["rdb_transition_status_ins", "rdb_transition_status_upd"]
    with pytest.raises(sa.exc.DBAPIError) as info:
        conn.exec_driver_sql("UPDATE tasks SET status = 'completed' WHERE id = 1")
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE
    conn.rollback()
    conn.exec_driver_sql("UPDATE tasks SET status = 'in_progress' WHERE id = 1")
    conn.rollback()


def _offline_statements(
    trigger: TransitionTrigger, action: Callable[[Any, TransitionTrigger], None]
) -> list[str]:
    """What ``action(op, trigger)`` (an install or an uninstall) writes in Alembic's offline
    mode, one statement each (Alembic ends each with ``;`` and a blank line)."""
    script = offline_script(action, trigger)
    return [s for s in (part.strip() for part in script.split(";\n\n")) if s]


def _run_offline_one_at_a_time(engine: sa.Engine, trigger: TransitionTrigger) -> None:
    """The offline statements run as ``psql`` runs a file: one at a time, each committing on
    its own; after each, the table is guarded."""
    statements = _offline_statements(trigger, rdb.install_transition_trigger)
    assert len(statements) > 2
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as runner:
        for statement in statements:
            runner.exec_driver_sql(statement, execution_options={"no_parameters": True})
            with engine.connect() as conn:
                _guarded(conn)


def _run_script(engine: sa.Engine, trigger: TransitionTrigger) -> None:
    """``transition_trigger_sql(trigger)`` run as one script in one transaction (``psql -1``,
    ``op.execute``)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            rdb.transition_trigger_sql(trigger), execution_options={"no_parameters": True}
        )


# (the schema as the installed trigger wrote it, as the script writes it)
SPELLINGS = [
    pytest.param("appdata", None, id="installed-with-the-schema"),
    pytest.param(None, "appdata", id="script-with-the-schema"),
]
Run = Callable[[sa.Engine, TransitionTrigger], None]
RUNS = [
    pytest.param(_run_script, id="transition_trigger_sql"),
    pytest.param(_run_offline_one_at_a_time, id="alembic-offline-one-at-a-time"),
]


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize(("installed", "scripted"), SPELLINGS)
def test_the_script_drops_the_function_of_the_other_spelling(
    owner: sa.Engine, run: Run, installed: str | None, scripted: str | None
) -> None:
    """Installed on the server with the table's schema written one way, then replaced by the
    script of the other: the script's triggers replaced the first ones and left their function
    in the schema, called by nothing (an install on a server drops it). Now the script drops it
    too, in the statement that replaces the triggers, so the table stays guarded after every
    statement; run again, it changes nothing."""
    rdb.install_transition_trigger(owner, _trigger(installed))
    with owner.connect() as conn:
        assert _functions(conn) == [f"appdata.{function_name(installed, 'tasks', 'status')}"]
    expected = [f"appdata.{function_name(scripted, 'tasks', 'status')}"]
    for _ in range(2):  # idempotent: the second run finds nothing to drop
        run(owner, _trigger(scripted))
        with owner.connect() as conn:
            assert _functions(conn) == expected
            assert rdb.trigger_drift(conn, _trigger(scripted)) is None
            assert rdb.trigger_drift(conn, _trigger(installed)) is None
            _guarded(conn)


@pytest.mark.parametrize("run", RUNS)
def test_the_script_keeps_its_own_function_and_the_applications_triggers(
    owner: sa.Engine, run: Run
) -> None:
    """The script's cleanup drops only a function of ours that our triggers of the column
    called and no longer call: run over its own install, the function is replaced in place
    (the same object), and the application's trigger on the table and its function stay."""
    own = f"appdata.{function_name('appdata', 'tasks', 'status')}()"
    with owner.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION appdata.audit() RETURNS trigger LANGUAGE plpgsql "
            "AS $$BEGIN RETURN NULL; END$$; "
            "CREATE TRIGGER tasks_audit AFTER UPDATE ON appdata.tasks "
            "FOR EACH ROW EXECUTE FUNCTION appdata.audit()"
        )
    rdb.install_transition_trigger(owner, _trigger("appdata"))
    with owner.connect() as conn:
        before = conn.exec_driver_sql(f"SELECT '{own}'::regprocedure::oid").scalar()
    run(owner, _trigger("appdata"))
    with owner.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT '{own}'::regprocedure::oid").scalar() == before
        names = conn.exec_driver_sql(
            "SELECT tgname::text, tgfoid::regprocedure::text FROM pg_trigger "
            "WHERE tgrelid = 'appdata.tasks'::regclass ORDER BY 1"
        ).all()
        assert [tuple(row) for row in names] == [
            ("rdb_transition_status_ins", own.removeprefix("appdata.")),
            ("rdb_transition_status_upd", own.removeprefix("appdata.")),
            ("tasks_audit", "audit()"),
        ]
        assert rdb.trigger_drift(conn, _trigger("appdata")) is None


def _run_offline_removal(engine: sa.Engine, trigger: TransitionTrigger) -> None:
    """What ``uninstall_transition_trigger(op, trigger)`` writes in Alembic's offline mode, run
    one statement at a time, each committing on its own."""
    statements = _offline_statements(trigger, rdb.uninstall_transition_trigger)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as runner:
        for statement in statements:
            runner.exec_driver_sql(statement, execution_options={"no_parameters": True})


def _run_removal_script(engine: sa.Engine, trigger: TransitionTrigger) -> None:
    """``transition_trigger_drop_sql(trigger)`` run as one script in one transaction."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            rdb.transition_trigger_drop_sql(trigger), execution_options={"no_parameters": True}
        )


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(_run_removal_script, id="transition_trigger_drop_sql"),
        pytest.param(_run_offline_removal, id="alembic-offline-one-at-a-time"),
    ],
)
@pytest.mark.parametrize(("installed", "scripted"), SPELLINGS)
def test_the_removal_script_drops_the_function_of_the_other_spelling(
    owner: sa.Engine, run: Run, installed: str | None, scripted: str | None
) -> None:
    """Installed with the table's schema written one way, removed by the script of the other:
    the script dropped the triggers by their names and the function of its own name, and left
    the one the triggers called. Now it goes with them, as an uninstall on a server drops it;
    run again, the script changes nothing."""
    rdb.install_transition_trigger(owner, _trigger(installed))
    for _ in range(2):
        run(owner, _trigger(scripted))
        with owner.connect() as conn:
            assert _functions(conn) == []
            assert _our_triggers(conn) == []
            conn.exec_driver_sql("UPDATE tasks SET status = 'completed' WHERE id = 1")
            conn.rollback()


# ------------------------------------------------------------------------------------------------
# alembic downgrade base
# ------------------------------------------------------------------------------------------------

#: The database's own catalogs, each as a set of rows naming the objects (not their oids).
_CATALOG = {
    "schemas": "SELECT nspname::text, nspowner::regrole::text, coalesce(nspacl::text, '') "
    "FROM pg_catalog.pg_namespace",
    "relations": "SELECT n.nspname::text, c.relname::text, c.relkind::text "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
    "functions": "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p",
    "types": "SELECT t.oid::regtype::text FROM pg_catalog.pg_type t",
    "triggers": "SELECT tgrelid::regclass::text, tgname::text FROM pg_catalog.pg_trigger "
    "WHERE NOT tgisinternal",  # a foreign key's are named by oids
    "comments": "SELECT classoid::regclass::text, description FROM pg_catalog.pg_description",
    "default privileges": "SELECT defaclrole::regrole::text, defaclobjtype::text, "
    "coalesce(defaclacl::text, '') FROM pg_catalog.pg_default_acl",
    "extensions": "SELECT extname::text FROM pg_catalog.pg_extension",
    "database privileges": "SELECT coalesce(datacl::text, '') FROM pg_catalog.pg_database "
    "WHERE datname = current_database()",
}


def _catalog(engine: sa.Engine) -> dict[str, set[tuple[object, ...]]]:
    with engine.connect() as conn:
        return {
            what: {tuple(row) for row in conn.exec_driver_sql(query)}
            for what, query in _CATALOG.items()
        }


def _without_alembic_version(catalog: dict[str, set[tuple[object, ...]]]) -> None:
    """Alembic's own bookkeeping, which ``downgrade base`` leaves (empty) by design."""
    catalog["relations"] -= {
        ("public", "alembic_version", "r"),
        ("public", "alembic_version_pkc", "i"),
    }
    catalog["types"] -= {("alembic_version",), ("alembic_version[]",)}


def _downgrade_offline(url: str) -> None:
    """``alembic downgrade head:base --sql``, the script run on the server as ``psql`` runs a
    file (the script has its own BEGIN and COMMIT)."""
    buffer = io.StringIO()
    cfg = alembic_config()
    cfg.output_buffer = buffer
    cfg.set_main_option("sqlalchemy.url", "postgresql+psycopg://offline@localhost/offline")
    command.downgrade(cfg, "head:base", sql=True)
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(buffer.getvalue(), execution_options={"no_parameters": True})
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "downgrade",
    [
        pytest.param(downgrade_migrations, id="online"),
        pytest.param(_downgrade_offline, id="offline-sql"),
    ],
)
def test_downgrade_base_leaves_nothing_the_upgrade_made(
    pg_url: str, downgrade: Callable[[str], None]
) -> None:
    """``upgrade head`` then ``downgrade base`` on a fresh database, on the server or as the
    offline script: every catalog of the database is as it was (the empty schema
    ``resilient_db`` the commit markers were in was left behind), and ``upgrade head`` runs
    again."""
    engine = sa.create_engine(pg_url)
    try:
        before = _catalog(engine)
        apply_migrations(pg_url)
        upgraded = _catalog(engine)
        assert ("resilient_db", "commit_markers", "r") in upgraded["relations"]
        downgrade(pg_url)
        after = _catalog(engine)
        _without_alembic_version(after)
        for what in _CATALOG:
            assert after[what] == before[what], (
                what,
                sorted(after[what] - before[what], key=str),
                sorted(before[what] - after[what], key=str),
            )
        apply_migrations(pg_url)
        assert _catalog(engine) == upgraded
        with engine.connect() as conn:
            assert rdb.trigger_drift(conn, Task) is None
    finally:
        engine.dispose()


def test_downgrade_base_keeps_a_schema_resilient_db_that_holds_other_objects(
    pg_url: str,
) -> None:
    """Something of the application's put into schema ``resilient_db`` stays, and so does the
    schema, with a warning naming what is left: the downgrade drops the schema only when it is
    empty, and does not fail."""
    engine = sa.create_engine(pg_url)
    try:
        apply_migrations(pg_url)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE resilient_db.notes (id integer)")
        notices: list[tuple[str | None, str | None, str | None]] = []

        def notice(diag: Any) -> None:  # read here: the notice is gone after the call
            notices.append((diag.severity_nonlocalized, diag.message_primary, diag.message_detail))

        with engine.begin() as conn:
            conn.connection.driver_connection.add_notice_handler(notice)
            downgrade_migrations(conn)
        warnings = [
            (primary, detail) for severity, primary, detail in notices if severity == "WARNING"
        ]
        assert len(warnings) == 1, notices
        primary, detail = warnings[0]
        assert (
            primary == "schema resilient_db is kept: it holds objects other than the commit markers"
        )
        assert "table resilient_db.notes" in (detail or ""), detail
        with engine.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT to_regclass('resilient_db.notes') IS NOT NULL"
            ).scalar()
            left = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'resilient_db' AND c.relname <> 'notes'"
            ).scalar()
            assert left == 0
        apply_migrations(pg_url)
        with engine.connect() as conn:
            assert rdb.trigger_drift(conn, Task) is None
    finally:
        engine.dispose()


def test_an_install_keeps_an_unused_legacy_function_another_role_owns(
    pg_server: Any, pg_database: str, pg_url: str
) -> None:
    """A function of the trigger's oldest naming scheme (``rdb_transition_<table>_<column>``),
    stamped ours and called by no trigger, owned by a role the installing role is not a member
    of: the install leaves it (as every other cleanup block leaves another role's function)
    instead of failing with "must be owner of function"."""
    suffix = uuid.uuid4().hex[:10]
    installer, other = f"rdb_inst_{suffix}", f"rdb_other_{suffix}"
    password = secrets.token_urlsafe(18)
    reg = registry()
    model = _task(reg, None)
    guard = guards_of(model)[0]
    names = trigger_names(guard)
    admin = sa.create_engine(pg_url)
    try:
        pg_server.execute(f"CREATE ROLE \"{installer}\" LOGIN PASSWORD '{password}'")
        pg_server.execute(f'CREATE ROLE "{other}" NOLOGIN')
        with admin.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE tasks (id integer PRIMARY KEY, "
                "status varchar(20) NOT NULL DEFAULT 'pending')"
            )
            conn.exec_driver_sql("INSERT INTO tasks VALUES (1, 'pending')")
            # what an early release installed: its triggers gone since, its function left
            for stmt in install_statements(guard):
                if not stmt.startswith("DO "):
                    conn.exec_driver_sql(
                        stmt.replace(names.function_name, names.legacy_function_name)
                    )
            conn.exec_driver_sql(
                "DROP TRIGGER rdb_transition_status_ins ON tasks; "
                "DROP TRIGGER rdb_transition_status_upd ON tasks"
            )
            conn.exec_driver_sql(
                f'ALTER FUNCTION "{names.legacy_function_name}"() OWNER TO "{other}"'
            )
            conn.exec_driver_sql(f'ALTER TABLE tasks OWNER TO "{installer}"')
            conn.exec_driver_sql(f'GRANT CREATE ON SCHEMA public TO "{installer}"')
        app = sa.create_engine(sa.make_url(pg_url).set(username=installer, password=password))
        try:
            with app.begin() as conn:
                rdb.install_transition_trigger(conn, model)
                assert rdb.trigger_drift(conn, model) is None
                conn.exec_driver_sql("SET search_path = public")
                with pytest.raises(sa.exc.DBAPIError) as info, conn.begin_nested():
                    conn.exec_driver_sql("UPDATE tasks SET status = 'completed' WHERE id = 1")
                assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE
        finally:
            app.dispose()
        with admin.connect() as conn:
            left = conn.exec_driver_sql(
                "SELECT pg_get_userbyid(proowner)::text FROM pg_proc WHERE proname = %s",
                (names.legacy_function_name,),
            ).scalar()
        assert left == other  # another role's, kept
    finally:
        reg.dispose()
        pg_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            params=(installer,),
        )
        with admin.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS tasks CASCADE")
            conn.exec_driver_sql(f'DROP FUNCTION IF EXISTS "{names.legacy_function_name}"()')
        admin.dispose()
        for role in (installer, other):
            pg_server.execute(f'DROP OWNED BY "{role}"', database=pg_database)
            pg_server.execute(f'DROP ROLE "{role}"')
