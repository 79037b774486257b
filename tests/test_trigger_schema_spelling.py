"""One table, its schema written two ways: a migration's ``TransitionTrigger(schema="appdata")``
and the application's model of ``tasks`` reached through ``search_path=appdata`` (or the other
way round) install the same trigger, whose function's name hashes the schema as written. The
drift check compares the table the server resolves, so an application role owning nothing
starts with no DDL sent; an install on a server drops the function of the other name; an
install that is needed and refused names the drift and who must install.

Against the real server: a role owning the table (the migration's, here the test's superuser
with ``search_path=appdata``) and an application role with table grants only."""

from __future__ import annotations

import pickle
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg import sql as pgsql
from sqlalchemy.orm import mapped_column, registry

import resilient_db as rdb
from resilient_db.testing import PostgresServer
from resilient_db.transitions import TransitionTrigger, TriggerInstallRefusedError

RULES = rdb.TransitionRules(
    column="status",
    transitions={"pending": {"in_progress"}, "in_progress": {"completed"}},
    initial={"pending"},
)
ON_PATH = {"options": "-csearch_path=appdata"}


@pytest.fixture
def reg() -> Iterator[registry]:
    made = registry()
    yield made
    made.dispose()


def owner_engine(pg_url: str) -> sa.Engine:
    """The migration's role (it owns ``appdata.tasks``, made here), with ``appdata`` on its
    path."""
    eng = sa.create_engine(pg_url, connect_args=ON_PATH)
    with eng.begin() as conn:
        conn.exec_driver_sql(
            "CREATE SCHEMA appdata; CREATE TABLE appdata.tasks (id integer PRIMARY KEY, "
            "status varchar(20) NOT NULL DEFAULT 'pending')"
        )
        conn.exec_driver_sql("INSERT INTO appdata.tasks VALUES (1, 'pending')")
    return eng


@pytest.fixture
def owner(pg_url: str) -> Iterator[sa.Engine]:
    eng = owner_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def app(pg_server: PostgresServer, pg_database: str, pg_url: str) -> Iterator[sa.Engine]:
    """An application role with USAGE on ``appdata`` and DML on its table, nothing more, which
    reaches the table through ``search_path=appdata``."""
    name = f"rdb_t_{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(18)
    role = pgsql.Identifier(name)
    pg_server.execute(
        pgsql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, pgsql.Literal(password))
    )
    url = sa.make_url(pg_url).set(username=name, password=password)
    eng = sa.create_engine(url, connect_args=ON_PATH)
    try:
        yield eng
    finally:
        eng.dispose()
        pg_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            params=(name,),
        )
        pg_server.execute(pgsql.SQL("DROP OWNED BY {}").format(role), database=pg_database)
        pg_server.execute(pgsql.SQL("DROP ROLE {}").format(role))


def _grant(owner: sa.Engine, app: sa.Engine) -> None:
    role = app.url.username
    with owner.begin() as conn:
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA appdata TO "{role}"')
        conn.exec_driver_sql(f'GRANT SELECT, INSERT, UPDATE, DELETE ON appdata.tasks TO "{role}"')


def _task(reg: registry, schema: str | None) -> Any:
    attrs: dict[str, Any] = {
        "__tablename__": "tasks",
        "__transitions__": RULES,
        "id": mapped_column(sa.Integer, primary_key=True),
        "status": mapped_column(sa.String(20)),
    }
    if schema is not None:
        attrs["__table_args__"] = {"schema": schema}
    return reg.mapped(type("Task", (), attrs))


def _trigger(schema: str | None, rules: rdb.TransitionRules = RULES) -> TransitionTrigger:
    return TransitionTrigger(
        model="Task",
        table="tasks",
        primary_key="id",
        schema=schema,
        type_=sa.String(20),
        rules=rules,
    )


def _functions(conn: sa.Connection) -> list[str]:
    """Our trigger functions of ``tasks.status``, wherever they are."""
    query = sa.text(
        "SELECT n.nspname || '.' || p.proname FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE starts_with(p.proname::text, :prefix) ORDER BY 1"
    )
    return list(conn.execute(query, {"prefix": "rdb_transition_tasks_status_"}).scalars())


def _sent(engine: sa.Engine) -> Callable[[], list[str]]:
    """The statements ``engine`` sends from now on."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # (without its SQL comments: a query's comment may name DDL it does not send)
        seen.append(re.sub(r"--[^\n]*", "", statement))

    sa.event.listen(engine, "before_cursor_execute", record)
    return lambda: list(seen)


def _guarded(conn: sa.Connection) -> None:
    """An illegal move is refused by the trigger (SQLSTATE RDB01), a legal one stored."""
    with pytest.raises(sa.exc.DBAPIError) as info:
        conn.exec_driver_sql("UPDATE tasks SET status = 'completed' WHERE id = 1")
    assert getattr(info.value.orig, "sqlstate", None) == rdb.TRANSITION_SQLSTATE
    conn.rollback()
    conn.exec_driver_sql("UPDATE tasks SET status = 'in_progress' WHERE id = 1")
    conn.rollback()


# (the migration's schema=, the model's schema)
SPELLINGS = [
    pytest.param("appdata", None, id="migration-names-the-schema"),
    pytest.param(None, "appdata", id="model-names-the-schema"),
]


@pytest.mark.parametrize(("installed", "declared"), SPELLINGS)
def test_the_application_role_starts_with_no_drift_and_no_ddl(
    owner: sa.Engine, app: sa.Engine, reg: registry, installed: str | None, declared: str | None
) -> None:
    """The migration installs the trigger of ``appdata.tasks`` writing its schema one way, the
    application's model writes it the other: the drift check said the trigger called the
    function of another name, so the startup install sent DDL and failed with "permission
    denied for schema appdata". Now: no drift, either way round, nothing sent."""
    _grant(owner, app)
    rdb.install_transition_trigger(owner, _trigger(installed))
    model = _task(reg, declared)
    with app.connect() as conn:
        assert rdb.trigger_drift(conn, model) is None
        assert rdb.trigger_drift(conn, _trigger(declared)) is None
        assert rdb.trigger_drift(conn, _trigger(installed)) is None
    sent = _sent(app)
    rdb.install_transition_trigger(app, model)
    assert not [s for s in sent() if "advisory_xact_lock" in s or "CREATE" in s], sent()
    with app.connect() as conn:
        _guarded(conn)


@pytest.mark.parametrize(("installed", "declared"), SPELLINGS)
def test_other_rules_under_the_other_spelling_are_still_drift(
    owner: sa.Engine, reg: registry, installed: str | None, declared: str | None
) -> None:
    """Taking either spelling for the table's trigger hides no real difference: other rules
    installed under the other name are drift, and an install through the Engine replaces
    them (and the function of the other name)."""
    other = rdb.TransitionRules(
        column="status", transitions={"pending": {"completed"}}, initial={"pending"}
    )
    rdb.install_transition_trigger(owner, _trigger(installed, other))
    model = _task(reg, declared)
    with owner.connect() as conn:
        drift = rdb.trigger_drift(conn, model) or ""
        assert "does not match the declared rules" in drift, drift
    rdb.install_transition_trigger(owner, model)
    with owner.connect() as conn:
        assert rdb.trigger_drift(conn, model) is None
        assert len(_functions(conn)) == 1, _functions(conn)
        _guarded(conn)


@pytest.mark.parametrize(("installed", "declared"), SPELLINGS)
def test_an_install_under_the_other_spelling_leaves_no_function_behind(
    owner: sa.Engine, reg: registry, installed: str | None, declared: str | None
) -> None:
    """Installed through a Connection (the DDL is sent), the trigger of the other spelling's
    function name replaced the triggers and left the first function in the schema; the two
    descriptions then flip-flopped in drift. Now the replaced function is dropped with its
    triggers, both descriptions see no drift, and writes stay guarded."""
    rdb.install_transition_trigger(owner, _trigger(installed))
    model = _task(reg, declared)
    with owner.begin() as conn:
        rdb.install_transition_trigger(conn, model)
    with owner.connect() as conn:
        assert len(_functions(conn)) == 1, _functions(conn)
        assert rdb.trigger_drift(conn, model) is None
        assert rdb.trigger_drift(conn, _trigger(installed)) is None
        _guarded(conn)
    with owner.begin() as conn:  # and back, by the migration's description
        rdb.install_transition_trigger(conn, _trigger(installed))
    with owner.connect() as conn:
        assert len(_functions(conn)) == 1, _functions(conn)
        assert rdb.trigger_drift(conn, model) is None
        _guarded(conn)


@pytest.mark.parametrize(("installed", "declared"), SPELLINGS)
def test_an_uninstall_under_the_other_spelling_leaves_no_function_behind(
    owner: sa.Engine, reg: registry, installed: str | None, declared: str | None
) -> None:
    rdb.install_transition_trigger(owner, _trigger(installed))
    rdb.uninstall_transition_trigger(owner, _task(reg, declared))
    with owner.connect() as conn:
        assert _functions(conn) == []
        triggers = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'appdata.tasks'::regclass"
        ).scalar()
        assert triggers == 0


def test_a_needed_install_refused_for_want_of_rights_names_the_drift(
    owner: sa.Engine, app: sa.Engine, reg: registry
) -> None:
    """Drift that is real (other rules installed), and the application role may not install:
    the error says an install was needed because of drift, what the drift is, and that the
    table's owner must install; the server's refusal (42501) is its cause."""
    _grant(owner, app)
    other = rdb.TransitionRules(
        column="status", transitions={"pending": {"completed"}}, initial={"pending"}
    )
    rdb.install_transition_trigger(owner, _trigger("appdata", other))
    model = _task(reg, None)
    with app.connect() as conn:
        drift = rdb.trigger_drift(conn, model)
    assert drift is not None
    with pytest.raises(TriggerInstallRefusedError) as info:
        rdb.install_transition_trigger(app, model)
    err = info.value
    assert isinstance(err, sa.exc.ProgrammingError)  # what it raised before, still caught
    assert isinstance(err, rdb.ResilientDBError)
    assert getattr(err.orig, "sqlstate", None) == "42501"
    assert err.model == "Task"
    assert err.drift == drift
    message = str(err)
    assert "not the one declared" in message
    assert drift in message
    assert "owner" in message
    assert "permission denied" in err.reason
    cause = err.__cause__
    assert isinstance(cause, sa.exc.DBAPIError)
    assert getattr(cause.orig, "sqlstate", None) == "42501"
    # pickled (a task queue's worker raised it): what SQLAlchemy's handlers read comes along
    # (the statement and the driver's error were dropped, the latter for an Exception)
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), str(copy), repr(copy)) == (type(err), str(err), repr(err))
    assert (copy.model, copy.drift, copy.reason) == (err.model, err.drift, err.reason)
    assert (copy.statement, copy.params, copy.code) == (err.statement, err.params, err.code)
    assert type(copy.orig) is type(err.orig)
    assert getattr(copy.orig, "sqlstate", None) == "42501"
    with owner.connect() as conn:  # nothing changed
        assert rdb.trigger_drift(conn, _trigger("appdata", other)) is None


def test_an_install_under_the_current_names_stays_current(
    owner: sa.Engine, app: sa.Engine, reg: registry
) -> None:
    """What earlier releases installed (the model as declared, the function named by the
    schema as written) is current to this one: no drift, and the startup install sends no
    DDL; the offline script still names the function by the table as declared."""
    _grant(owner, app)
    model = _task(reg, None)
    rdb.install_transition_trigger(owner, model)
    with app.connect() as conn:
        before = _functions(conn)
        assert rdb.trigger_drift(conn, model) is None
    sent = _sent(app)
    rdb.install_transition_trigger(app, model)
    assert not [s for s in sent() if "advisory_xact_lock" in s], sent()
    with app.connect() as conn:
        assert _functions(conn) == before
    script = rdb.transition_trigger_sql(model)
    assert script == rdb.transition_trigger_sql(model)  # deterministic, no server asked
    assert before[0].split(".")[1] in script
    named = rdb.transition_trigger_sql(_trigger("appdata"))
    assert before[0].split(".")[1] not in named  # the schema as written is in the name
