"""The statements resilient_db runs as the installing role (the transition trigger's install and
uninstall, their ``DO`` blocks, the WHENs bound into the triggers, the commit markers' install
and uninstall, the bypass) run nothing planted in a schema that the installer's search_path
lists before ``pg_catalog``.

``pg_catalog`` is searched first only when the path leaves it out; listed explicitly
(``SET search_path = app, evil, pg_catalog``), the schemas before it win, for an operator or
function of exactly the same argument types too. A role that may create objects in such a schema
plants ``=``, ``<>``, ``LIKE`` ... of built-in types there: an unqualified operator in one of our
statements then runs its code as the installer (a database owner, a superuser). Every operator
on built-in types in those statements is written ``OPERATOR(pg_catalog.op)``, every function
``pg_catalog.f()``, and the trigger function pins its search_path. Against the real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import resilient_db as rdb
from resilient_db.examples.tasks import Base, Task

#: (operator, left, right, result type) planted in schema ``evil``: what the statements use
#: on built-in types, comparisons of the catalogs' types, the arithmetic and concatenation of
#: their expressions
PLANTED = [
    *(
        (op, t, t, "boolean")
        for op in ("=", "<>")
        for t in ("text", "name", "oid", "integer", "smallint", "boolean", '"char"', "uuid")
    ),
    *((op, t, t, "boolean") for op in ("<", ">", ">=", "<=") for t in ("integer", "smallint")),
    ("<", "uuid", "uuid", "boolean"),
    ("~~", "text", "text", "boolean"),  # LIKE
    ("~~", "name", "text", "boolean"),
    ("-", "integer", "integer", "integer"),
    ("+", "integer", "integer", "integer"),
    ("*", "numeric", "numeric", "numeric"),
    ("*", "numeric", "integer", "numeric"),
    ("||", "text", "text", "text"),
]
#: functions planted in ``evil`` with the built-in's argument types (a call that names no
#: schema would take them)
PLANTED_FUNCTIONS = [
    ("format", "text, text, text", "text"),
    ("format", "text, text, text, text, text, text, text, text", "text"),
    ("quote_ident", "text", "text"),
    ("quote_literal", "text", "text"),
    ("lower", "text", "text"),
    ("substr", "text, integer, integer", "text"),
    ("lpad", "text, integer, text", "text"),
    ("to_hex", "bigint", "text"),
    ("to_regclass", "text", "regclass"),
    ("to_regrole", "text", "regrole"),
    ("current_setting", "text, boolean", "text"),
    ("pg_current_xact_id", "", "xid8"),
    ("pg_partition_root", "regclass", "regclass"),
]

#: types planted in ``evil`` (domains over the built-in of the name)
PLANTED_TYPES = ["text", "oid", "name", "regprocedure", "uuid", "json"]


def _plant(conn: sa.Connection) -> None:
    conn.execute(sa.text("CREATE SCHEMA evil"))
    conn.execute(sa.text("CREATE TABLE evil.ran (what text, who text)"))
    conn.execute(sa.text("GRANT USAGE ON SCHEMA evil TO PUBLIC"))
    conn.execute(sa.text("GRANT INSERT ON evil.ran TO PUBLIC"))
    for n, (op, left, right, result) in enumerate(PLANTED):
        what = f"{left} {op} {right}"
        conn.execute(
            sa.text(
                f"CREATE FUNCTION evil.op_{n}(a {left}, b {right}) RETURNS {result} "
                "LANGUAGE plpgsql AS $$ BEGIN "
                f"INSERT INTO evil.ran VALUES ('{what}', current_user); "
                f"RETURN a OPERATOR(pg_catalog.{op}) b; END $$"
            )
        )
        conn.execute(
            sa.text(
                f"CREATE OPERATOR evil.{op} (LEFTARG = {left}, RIGHTARG = {right}, "
                f"FUNCTION = evil.op_{n})"
            )
        )
    # types: a cast to ``text`` or a variable of type ``oid`` takes the first type of that name
    # on the path, and a domain's CHECK runs at every value cast to it
    conn.execute(
        sa.text(
            "CREATE FUNCTION evil.seen(what text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO evil.ran VALUES (what, current_user); RETURN true; END $$"
        )
    )
    for name in PLANTED_TYPES:
        conn.execute(
            sa.text(
                f"CREATE DOMAIN evil.{name} AS pg_catalog.{name} CHECK (evil.seen('type {name}'))"
            )
        )
    for name, args, result in PLANTED_FUNCTIONS:
        conn.execute(
            sa.text(
                f"CREATE FUNCTION evil.{name}({args}) RETURNS {result} "
                "LANGUAGE plpgsql AS $$ BEGIN "
                f"INSERT INTO evil.ran VALUES ('{name}({args})', current_user); "
                "RETURN NULL; END $$"
            )
        )


#: the writer's own condition, its operator named (the tests watch what the trigger runs)
KEY = "idem_key::pg_catalog.text OPERATOR(pg_catalog.=)"

#: the installer's path: the tables' schema first (objects are created there), the planted
#: schema before pg_catalog
EVIL_PATH = "SET search_path = public, evil, pg_catalog"


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        _plant(conn)
    yield eng
    eng.dispose()


@pytest.fixture
def evil_engine(pg_url: str) -> Iterator[sa.Engine]:
    """An engine whose every connection has the planted schema before pg_catalog."""
    eng = sa.create_engine(pg_url)

    @sa.event.listens_for(eng, "connect")
    def _path(dbapi_connection: object, _record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute(EVIL_PATH)
        cursor.close()
        dbapi_connection.commit()  # type: ignore[attr-defined]

    yield eng
    eng.dispose()


def _ran(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(set(conn.execute(sa.text("SELECT what FROM evil.ran")).scalars()))


def _forget(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM evil.ran"))


def test_the_planted_operators_run_where_a_statement_leaves_them_unqualified(
    engine: sa.Engine, evil_engine: sa.Engine
) -> None:
    """The fixture itself: an unqualified comparison of built-in types run on that path takes
    the planted operator (so the tests below would see one that ran)."""
    with evil_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 'a'::text = 'a'::text")).scalar() is True
        conn.commit()
    assert _ran(engine) == ["text = text", "type text"]


def test_install_and_uninstall_of_the_trigger_run_nothing_planted(
    engine: sa.Engine, evil_engine: sa.Engine
) -> None:
    """Install (through a Connection: every statement is sent, the cleanup blocks included),
    install again, uninstall: their ``DO`` blocks compared ``oid = oid``, ``name = text``,
    ``text LIKE text``, ``integer > integer`` ... unqualified."""
    with evil_engine.begin() as conn:
        rdb.install_transition_trigger(conn, Task)
    with evil_engine.begin() as conn:
        rdb.install_transition_trigger(conn, Task)
    with evil_engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
    with evil_engine.begin() as conn:
        rdb.uninstall_transition_trigger(conn, Task)
    assert _ran(engine) == [], _ran(engine)
    with engine.connect() as conn:
        left = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_trigger"
                " WHERE tgrelid = 'tasks'::regclass AND NOT tgisinternal"
            )
        )
        assert left.scalar() == 0


def test_an_install_through_an_engine_runs_nothing_planted(
    engine: sa.Engine, evil_engine: sa.Engine
) -> None:
    """Through an Engine: the drift check first, the install, then a startup's (current: only
    the drift check and the role's look)."""
    rdb.install_transition_trigger(evil_engine, Task)
    rdb.install_transition_trigger(evil_engine, Task)
    with evil_engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
    assert _ran(engine) == [], _ran(engine)


def test_the_script_runs_nothing_planted(engine: sa.Engine, evil_engine: sa.Engine) -> None:
    """The offline scripts (``transition_trigger_sql``, the drop script), run as psql would."""
    with evil_engine.begin() as conn:
        conn.exec_driver_sql(
            rdb.transition_trigger_sql(Task), execution_options={"no_parameters": True}
        )
    with evil_engine.begin() as conn:
        conn.exec_driver_sql(
            rdb.transitions.transition_trigger_drop_sql(Task),
            execution_options={"no_parameters": True},
        )
    assert _ran(engine) == [], _ran(engine)


def test_a_trigger_installed_on_that_path_binds_nothing_planted(
    engine: sa.Engine, evil_engine: sa.Engine
) -> None:
    """The WHENs of the triggers are bound when they are created, with the installer's path:
    ``IS DISTINCT FROM`` and ``IN`` took the planted ``text = text``, which then ran at every
    INSERT and UPDATE of the table, as whichever role wrote (and could keep the trigger from
    ever firing)."""
    with evil_engine.begin() as conn:
        rdb.install_transition_trigger(conn, Task)
    _forget(engine)
    with engine.begin() as conn:  # a writer with a clean path
        conn.execute(
            sa.text(
                "INSERT INTO tasks (idem_key, title, status) VALUES "
                "('a', 'a', 'pending'), ('b', 'b', 'pending')"
            )
        )
        conn.execute(sa.text("UPDATE tasks SET status = 'in_progress' WHERE idem_key = 'a'"))
    with engine.begin() as conn, pytest.raises(sa.exc.DBAPIError) as refused:
        conn.execute(sa.text("UPDATE tasks SET status = 'completed' WHERE idem_key = 'b'"))
    assert rdb.sqlstate_of(refused.value) == "RDB01"
    with engine.begin() as conn, pytest.raises(sa.exc.DBAPIError) as refused:
        conn.execute(
            sa.text("INSERT INTO tasks (idem_key, title, status) VALUES ('c', 'c', 'completed')")
        )
    assert rdb.sqlstate_of(refused.value) == "RDB01"
    assert _ran(engine) == [], _ran(engine)


def test_the_trigger_runs_nothing_planted_on_the_writer_path(
    engine: sa.Engine, evil_engine: sa.Engine
) -> None:
    """Installed on a clean path, written by a role whose path has the planted schema first:
    the function (its search_path pinned) and the WHENs (bound at install) run nothing of it,
    refusing a move, letting one through, or logging a bypass. (The writer's own statements
    name their operator: the test watches what the trigger runs.)"""
    rdb.install_transition_trigger(engine, Task)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO tasks (idem_key, title, status) VALUES "
                "('a', 'a', 'pending'), ('b', 'b', 'pending')"
            )
        )
    _forget(engine)
    with evil_engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE tasks SET status = 'in_progress' WHERE {KEY} 'a'"))
    with evil_engine.begin() as conn, pytest.raises(sa.exc.DBAPIError) as refused:
        conn.execute(sa.text(f"UPDATE tasks SET status = 'completed' WHERE {KEY} 'b'"))
    assert rdb.sqlstate_of(refused.value) == "RDB01"
    with evil_engine.begin() as conn:
        conn.execute(sa.text(f"GRANT {rdb.transitions.BYPASS_ROLE} TO current_user"))
    with evil_engine.begin() as conn:
        rdb.bypass_transitions(conn, reason="repair")
        conn.execute(sa.text(f"UPDATE tasks SET status = 'completed' WHERE {KEY} 'b'"))
    assert _ran(engine) == [], _ran(engine)


def test_the_commit_markers_install_and_uninstall_run_nothing_planted(
    engine: sa.Engine, evil_engine: sa.Engine
) -> None:
    """The markers' install writes the table's birth (``extract(...) * 1000``, ``substr``,
    ``||``, ``lpad``, ``to_hex``); the uninstall's last block names the schema's owner."""
    with evil_engine.begin() as conn:
        rdb.install_commit_markers(conn)
    with evil_engine.begin() as conn:
        rdb.uninstall_commit_markers(conn)
    assert _ran(engine) == [], _ran(engine)


def test_the_bypass_statement_runs_nothing_planted(
    engine: sa.Engine, evil_engine: sa.Engine
) -> None:
    """``bypass_transitions`` run by a login that may SET ROLE to the bypass role but does not
    inherit it (PostgreSQL 16+): its check compared the server's version (``integer >=
    integer``) and cast to ``text`` and ``oid`` on the caller's path."""
    rdb.install_transition_trigger(engine, Task)
    role = rdb.transitions.BYPASS_ROLE
    with engine.begin() as conn:
        if conn.execute(sa.text("SHOW server_version_num")).scalar_one() < "160000":
            pytest.skip("GRANT ... WITH INHERIT FALSE, SET TRUE needs PostgreSQL 16")
        conn.execute(sa.text("CREATE ROLE rdb_repairer NOLOGIN"))
        conn.execute(sa.text(f"GRANT {role} TO rdb_repairer WITH INHERIT FALSE, SET TRUE"))
    _forget(engine)
    with evil_engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL SESSION AUTHORIZATION rdb_repairer"))
        conn.execute(sa.text(f"SET LOCAL ROLE {role}"))
        rdb.bypass_transitions(conn, reason="repair")
        bound = conn.execute(
            sa.text(f"SELECT pg_catalog.current_setting('{rdb.transitions.BYPASS_SETTING}')")
        )
        assert bound.scalar_one() != ""  # the check reached the version's comparison, and let it
    assert _ran(engine) == [], _ran(engine)


#: Task's WHENs as releases before this one wrote them (IN, IS DISTINCT FROM)
EARLIER_WHENS = {
    "INSERT": """NOT (coalesce(NEW."status"::text COLLATE pg_catalog."C" IN ('pending'), false))""",
    "UPDATE": (
        'OLD."status"::text COLLATE pg_catalog."C" IS DISTINCT FROM '
        'NEW."status"::text COLLATE pg_catalog."C"'
    ),
}


def _earlier_release_triggers(engine: sa.Engine, path_of: sa.Engine) -> None:
    """Task's triggers (installed) made again with :data:`EARLIER_WHENS`, on the search_path of
    ``path_of``'s connections."""
    with engine.connect() as conn:
        function = conn.execute(
            sa.text(
                "SELECT tgfoid::regproc::text FROM pg_catalog.pg_trigger"
                " WHERE tgname = 'rdb_transition_status_upd'"
            )
        ).scalar_one()
    with path_of.begin() as conn:
        for event, when in EARLIER_WHENS.items():
            trigger = f"rdb_transition_status_{event[:3].lower()}"
            conn.exec_driver_sql(f"DROP TRIGGER {trigger} ON tasks")
            conn.exec_driver_sql(
                f"CREATE TRIGGER {trigger} AFTER {event} ON tasks "
                f"FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION {function}()"
            )


def test_a_trigger_of_an_earlier_release_bound_to_the_built_ins_is_current(
    engine: sa.Engine,
) -> None:
    """An earlier release's WHENs, installed on a path that found the built-in equality, are
    as good as this one's: no drift, so a startup's install sends nothing after an upgrade."""
    rdb.install_transition_trigger(engine, Task)
    _earlier_release_triggers(engine, engine)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None


def test_a_trigger_bound_to_a_planted_operator_is_drift(
    engine: sa.Engine, evil_engine: sa.Engine
) -> None:
    """The same WHENs installed on a path with the planted schema before pg_catalog are bound
    to its ``text = text`` and its ``text`` (printed back the same, whatever the session's
    path): drift names what they are bound to, and an install replaces them."""
    rdb.install_transition_trigger(engine, Task)
    _earlier_release_triggers(engine, evil_engine)
    for eng in (engine, evil_engine):
        with eng.connect() as conn:
            drift = rdb.trigger_drift(conn, Task)
        assert drift is not None
        assert "rdb_transition_status_ins is not the one install creates" in drift
        assert "rdb_transition_status_upd is not the one install creates" in drift
        assert (
            "its WHEN bound to type evil.text, operator evil.=(pg_catalog.text,pg_catalog.text)"
            in drift
        )
    rdb.install_transition_trigger(engine, Task)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
