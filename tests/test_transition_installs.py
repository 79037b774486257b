"""Installs of the transition trigger against the real server: what a table holds when several
classes guard it (single-table inheritance, two models of one table), and our triggers left
behind by a column no longer guarded (removed from ``__transitions__``, or renamed in the
database).

Models are mapped in registries of their own, disposed of after each test."""

from __future__ import annotations

import enum
import secrets
import shutil
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg import sql as pgsql
from scenarios import refused_by_trigger
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, mapped_column, registry

import resilient_db as rdb
from resilient_db.testing import PostgresServer

RULES = rdb.TransitionRules(
    column="status", transitions={"new": {"done"}, "done": {"new"}}, initial={"new"}
)
PHASES = rdb.TransitionRules(column="phase", transitions={"a": {"b"}}, initial={"a"})


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def reg() -> Iterator[registry]:
    made = registry()
    yield made
    made.dispose()


@pytest.fixture
def registries() -> Iterator[Callable[[], registry]]:
    """Fresh registries (a model's next release maps the same table in one of its own)."""
    made: list[registry] = []

    def make() -> registry:
        made.append(registry())
        return made[-1]

    yield make
    for item in made:
        item.dispose()


@pytest.fixture
def app_role(pg_server: PostgresServer, pg_database: str, pg_url: str) -> Iterator[Any]:
    """A login role owning nothing (an application at startup); ``grant(sql)`` runs admin SQL
    with ``{role}`` standing for it. Returns a factory of its engine."""
    name = f"rdb_t_{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(18)
    role = pgsql.Identifier(name)
    pg_server.execute(
        pgsql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, pgsql.Literal(password))
    )
    engines: list[sa.Engine] = []

    def connect(*grants: str) -> sa.Engine:
        for statement in grants:
            pg_server.execute(pgsql.SQL(statement).format(role=role), database=pg_database)
        url = sa.make_url(pg_url).set(username=name, password=password)
        engines.append(sa.create_engine(url))
        return engines[-1]

    try:
        yield connect
    finally:
        for eng in engines:
            eng.dispose()
        pg_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            params=(name,),
        )
        pg_server.execute(pgsql.SQL("DROP OWNED BY {}").format(role), database=pg_database)
        pg_server.execute(pgsql.SQL("DROP ROLE {}").format(role))


def _jobs(reg: registry, *, sub_rules: rdb.TransitionRules | None = None) -> tuple[Any, Any]:
    """Single-table inheritance: Job and SpecialJob (its rules inherited, or ``sub_rules``)."""
    job = reg.mapped(
        type(
            "Job",
            (),
            {
                "__tablename__": "jobs",
                "__mapper_args__": {"polymorphic_on": "kind", "polymorphic_identity": "job"},
                "__transitions__": RULES,
                "id": mapped_column(sa.Integer, primary_key=True),
                "kind": mapped_column(sa.String(20)),
                "status": mapped_column(sa.String(20)),
            },
        )
    )
    attrs: dict[str, Any] = {"__mapper_args__": {"polymorphic_identity": "special"}}
    if sub_rules is not None:
        attrs["__transitions__"] = sub_rules
    return job, reg.mapped(type("SpecialJob", (job,), attrs))


def _two_models(reg: registry, other_rules: rdb.TransitionRules) -> tuple[Any, Any]:
    """Two unrelated classes of one table, ``Order`` by RULES and ``OrderView`` by
    ``other_rules``."""
    table = sa.Table(
        "orders",
        reg.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(20)),
    )
    order = reg.mapped(type("Order", (), {"__table__": table, "__transitions__": RULES}))
    view = reg.mapped(type("OrderView", (), {"__table__": table, "__transitions__": other_rules}))
    return order, view


def _status_job(reg: registry, rules: rdb.TransitionRules) -> type[Any]:
    """A model ``Job`` of the table ``jobs`` (``id``, ``status``) under ``rules``."""
    job: type[Any] = reg.mapped(
        type(
            "Job",
            (),
            {
                "__tablename__": "jobs",
                "__transitions__": rules,
                "id": mapped_column(sa.Integer, primary_key=True),
                "status": mapped_column(sa.Text),
            },
        )
    )
    return job


def _ours(conn: sa.Connection, table: str) -> list[tuple[str, str]]:
    """(trigger, function) of the triggers on ``table`` whose function is stamped by us."""
    return [
        (r[0], r[1])
        for r in conn.execute(
            sa.text(
                "SELECT t.tgname::text, p.proname::text FROM pg_trigger t "
                "JOIN pg_proc p ON p.oid = t.tgfoid WHERE t.tgrelid = to_regclass(:t) "
                "AND NOT t.tgisinternal "
                "AND obj_description(p.oid, 'pg_proc') LIKE 'resilient_db transition guard %' "
                "ORDER BY 1"
            ),
            {"t": table},
        )
    ]


def _functions(conn: sa.Connection) -> list[str]:
    return list(
        conn.execute(
            sa.text(
                "SELECT proname::text FROM pg_proc WHERE proname LIKE 'rdb_transition%' ORDER BY 1"
            )
        ).scalars()
    )


def _run_script(conn: sa.Connection, script: str) -> None:
    """``script`` as psql would run it (its ``%`` are no placeholders)."""
    conn.exec_driver_sql(script, execution_options={"no_parameters": True})


# ------------------------------------------------------------------------------------------------
# several classes of one table
# ------------------------------------------------------------------------------------------------


def test_a_base_and_its_single_table_subclass_install_one_trigger(
    engine: sa.Engine, reg: registry, app_role: Any
) -> None:
    """Installing the subclass's trigger after the base's changes nothing: one function, no
    drift for either, and an application role that owns nothing installs both at startup (no
    DDL is needed, so none is sent). The trigger names the base."""
    job, special = _jobs(reg)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, job)
    with engine.connect() as conn:
        before = _ours(conn, "jobs")
    rdb.install_transition_trigger(engine, special)
    with engine.connect() as conn:
        assert _ours(conn, "jobs") == before
        assert len(_functions(conn)) == 1
        assert rdb.trigger_drift(conn, job) is None
        assert rdb.trigger_drift(conn, special) is None
        assert rdb.transition_trigger_sql(job) == rdb.transition_trigger_sql(special)
    app = app_role("GRANT SELECT, INSERT, UPDATE ON jobs TO {role}")
    for model in (job, special, job):
        rdb.install_transition_trigger(app, model)  # raised "permission denied" before
    with app.connect() as conn:
        conn.exec_driver_sql("INSERT INTO jobs VALUES (1, 'special', 'new')")
        conn.commit()
        err = refused_by_trigger(conn, "INSERT INTO jobs VALUES (2, 'special', 'done')")
        assert (err.model, err.to_state, err.inserted) == ("Job", "done", True)


def test_two_models_of_one_table_with_the_same_rules_share_the_trigger(
    engine: sa.Engine, reg: registry
) -> None:
    order, view = _two_models(reg, RULES)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, order)
    rdb.install_transition_trigger(engine, view)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, order) is None
        assert rdb.trigger_drift(conn, view) is None
        assert len(_functions(conn)) == 1
    with engine.begin() as conn:  # on a connection the DDL is sent: the other model's name
        rdb.install_transition_trigger(conn, order)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, view) is None
        assert rdb.trigger_drift(conn, order) is None


def test_two_models_of_one_column_with_other_rules_arerefused_by_trigger(
    engine: sa.Engine, reg: registry
) -> None:
    """Either trigger would replace the other's: refused, naming both models and the column,
    before anything is sent."""
    other = rdb.TransitionRules(column="status", transitions={"new": {"done"}}, initial={"new"})
    order, view = _two_models(reg, other)
    reg.metadata.create_all(engine)
    message = r"Order.status and OrderView.status guard the same column 'status' of table 'orders'"
    with pytest.raises(rdb.TransitionRulesError, match=message):
        rdb.install_transition_trigger(engine, order)
    with pytest.raises(rdb.TransitionRulesError, match=r"OrderView.status and Order.status"):
        rdb.install_transition_trigger(engine, view)
    with pytest.raises(rdb.TransitionRulesError, match="other transitions"):
        rdb.transition_trigger_sql(order)
    with engine.connect() as conn:
        assert _ours(conn, "orders") == []


def test_a_subclass_of_other_rules_is_refused_naming_both(reg: registry) -> None:
    other = rdb.TransitionRules(column="status", transitions={"new": {"done"}}, initial={"new"})
    job, special = _jobs(reg, sub_rules=other)
    for model in (job, special):
        with pytest.raises(rdb.TransitionRulesError) as info:
            rdb.transition_trigger_sql(model)
        assert "Job.status" in str(info.value)
        assert "SpecialJob" in str(info.value)


def test_a_trigger_stamped_with_a_model_by_an_earlier_release_is_drift_and_reinstalled(
    engine: sa.Engine, reg: registry
) -> None:
    job, _ = _jobs(reg)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, job)
    with engine.begin() as conn:
        function = conn.execute(
            sa.text("SELECT oid::regprocedure::text FROM pg_proc WHERE proname LIKE 'rdb_tr%'")
        ).scalar_one()
        conn.exec_driver_sql(
            f"COMMENT ON FUNCTION {function} IS "
            "'resilient_db transition guard v4 rules-sha256=0123456789abcdef'"
        )
        drift = rdb.trigger_drift(conn, job) or ""
    assert "generator v4; it is stamped with one model's name" in drift
    rdb.install_transition_trigger(engine, job)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, job) is None


# ------------------------------------------------------------------------------------------------
# triggers of columns no longer guarded
# ------------------------------------------------------------------------------------------------


def _record(
    reg: registry, *rules: rdb.TransitionRules, status: str = "status", schema: str | None = None
) -> Any:
    return reg.mapped(
        type(
            "Record",
            (),
            {
                "__tablename__": "records",
                "__table_args__": {"schema": schema},
                "__transitions__": list(rules),
                "id": mapped_column(sa.Integer, primary_key=True),
                status: mapped_column(sa.String(20)),
                "phase": mapped_column(sa.String(20)),
            },
        )
    )


USER_TRIGGER = """
CREATE FUNCTION rdb_transition_records_audit() RETURNS trigger LANGUAGE plpgsql
AS $$ BEGIN RETURN NULL; END $$;
CREATE TRIGGER rdb_transition_audit_ins AFTER INSERT ON records
FOR EACH ROW EXECUTE FUNCTION rdb_transition_records_audit();
"""


def test_a_column_removed_from_the_rules_loses_its_trigger(
    engine: sa.Engine, registries: Callable[[], registry]
) -> None:
    """The next release guards ``status`` only. The trigger of ``phase`` (a column the table
    still has) may be another code base's: its install keeps it and its drift does not name it.
    Removed on purpose by ``uninstall_transition_trigger(..., columns=("phase",))`` (or the drop
    script with ``columns=``): that trigger and its function, never the application's own
    trigger (named like ours, but not stamped) nor the model's other guard."""
    first = _record(reg := registries(), RULES, PHASES)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, first)
    with engine.begin() as conn:
        conn.exec_driver_sql(USER_TRIGGER)
    nxt = _record(registries(), RULES)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, nxt) is None
    rdb.install_transition_trigger(engine, nxt)
    with engine.connect() as conn:
        assert len(_ours(conn, "records")) == 4
        assert len([f for f in _functions(conn) if "phase" in f]) == 1
    with pytest.raises(rdb.TransitionRulesError, match="has no column 'phsae'"):
        rdb.uninstall_transition_trigger(engine, nxt, columns=("phsae",))
    with pytest.raises(rdb.TransitionRulesError, match="a collection of column names"):
        rdb.uninstall_transition_trigger(engine, nxt, columns="phase")  # type: ignore[arg-type]
    with pytest.raises(rdb.TransitionRulesError, match="columns= names no column of"):
        rdb.uninstall_transition_trigger(engine, nxt, columns=())
    with pytest.raises(rdb.TransitionRulesError, match="columns=: 1 is not a column name"):
        rdb.transition_trigger_drop_sql(nxt, columns=(1,))  # type: ignore[arg-type]
    script = rdb.transition_trigger_drop_sql(nxt, columns=("phase",))
    assert "'rdb_transition_phase_ins', 'rdb_transition_phase_upd'" in script
    assert "rdb_transition_status" not in script
    rdb.uninstall_transition_trigger(engine, nxt, columns=("phase",))
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, nxt) is None
        assert [t for t, _ in _ours(conn, "records")] == [
            "rdb_transition_status_ins",
            "rdb_transition_status_upd",
        ]
        assert len([f for f in _functions(conn) if "phase" in f]) == 0
        conn.exec_driver_sql("INSERT INTO records VALUES (1, 'new', 'z')")  # phase unguarded
        conn.exec_driver_sql("UPDATE records SET phase = 'y'")
        conn.commit()
    rdb.install_transition_trigger(engine, first)  # the earlier release again
    rdb.uninstall_transition_trigger(engine, nxt)  # its own guard only
    with engine.connect() as conn:
        assert [t for t, _ in _ours(conn, "records")] == [
            "rdb_transition_phase_ins",
            "rdb_transition_phase_upd",
        ]
    with engine.begin() as conn:  # the drop script, run as a script
        _run_script(conn, rdb.transition_trigger_drop_sql(nxt, columns=("phase", "status")))
    with engine.connect() as conn:
        assert _ours(conn, "records") == []
        assert _functions(conn) == ["rdb_transition_records_audit"]
        user = conn.exec_driver_sql(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'records'::regclass"
        ).scalars()
        assert list(user) == ["rdb_transition_audit_ins"]


@pytest.mark.parametrize("schema", [None, "tenant"])
def test_a_column_renamed_in_the_database_is_guarded_under_its_new_name(
    engine: sa.Engine, registries: Callable[[], registry], schema: str | None
) -> None:
    """ALTER TABLE ... RENAME COLUMN status TO state: the trigger function still reads
    NEW.status, so every write it checks fails until the next release (guarding ``state``)
    installs: its drift names the left-over trigger (the table has no column ``status``), its
    install drops it (the column's absence is read from the table), and the column is guarded
    under its new name."""
    table = f"{schema}.records" if schema else "records"
    if schema:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    first = _record(reg := registries(), RULES, schema=schema)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, first)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {table} RENAME COLUMN status TO state")
    with engine.connect() as conn:
        # the triggers' WHEN reads the column by its number: a row inserted in an initial state
        # passes, a change of the column reaches the function, which names the old column
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1, 'new')")
        with pytest.raises(sa.exc.ProgrammingError, match="status"):
            conn.exec_driver_sql(f"UPDATE {table} SET state = 'done'")
        conn.rollback()
    with engine.connect() as conn:
        drift = rdb.trigger_drift(conn, first) or ""
    assert "Record.status (table records): the table has no column 'status'" in drift
    renamed = rdb.TransitionRules(
        column="state", transitions={"new": {"done"}, "done": {"new"}}, initial={"new"}
    )
    nxt = _record(registries(), renamed, status="state", schema=schema)
    with engine.connect() as conn:
        drift = rdb.trigger_drift(conn, nxt) or ""
    assert "trigger rdb_transition_state_ins is missing" in drift
    assert (
        "trigger rdb_transition_status_ins, rdb_transition_status_upd of Record's table is "
        "installed for column 'status', which the table no longer has" in drift
    )
    rdb.install_transition_trigger(engine, nxt)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, nxt) is None
        assert [t for t, _ in _ours(conn, table)] == [
            "rdb_transition_state_ins",
            "rdb_transition_state_upd",
        ]
        assert [f for f in _functions(conn) if "status" in f] == []
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1, 'new')")
        conn.exec_driver_sql(f"UPDATE {table} SET state = 'done'")
        conn.commit()
        err = refused_by_trigger(conn, f"INSERT INTO {table} VALUES (2, 'done')")
        assert (err.column, err.to_state) == ("state", "done")
        err = refused_by_trigger(conn, f"UPDATE {table} SET state = 'zzz'")
        assert (err.from_state, err.to_state) == ("done", "zzz")


def test_the_triggers_of_another_class_of_the_table_are_kept(
    engine: sa.Engine, reg: registry
) -> None:
    """Two unrelated classes of one table guarding two columns: each one's install and
    uninstall leaves the other's trigger alone (it is declared, not left over)."""
    table = sa.Table(
        "orders",
        reg.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(20)),
        sa.Column("phase", sa.String(20)),
    )
    order = reg.mapped(type("Order", (), {"__table__": table, "__transitions__": RULES}))
    steps = reg.mapped(type("OrderSteps", (), {"__table__": table, "__transitions__": PHASES}))
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, order)
    rdb.install_transition_trigger(engine, steps)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, order) is None
        assert rdb.trigger_drift(conn, steps) is None
        assert len(_ours(conn, "orders")) == 4
    rdb.uninstall_transition_trigger(engine, order)
    with engine.connect() as conn:
        assert [t for t, _ in _ours(conn, "orders")] == [
            "rdb_transition_phase_ins",
            "rdb_transition_phase_upd",
        ]
        assert rdb.trigger_drift(conn, steps) is None


# ------------------------------------------------------------------------------------------------
# the INSERT trigger fires only for rows not in an initial state
# ------------------------------------------------------------------------------------------------


class Mood(enum.Enum):
    calm = "calm"
    angry = "angry"


WEIRD = "it's a \\ back\tslash"
KINDS: dict[str, tuple[Any, rdb.TransitionRules, str, str]] = {
    # column type, rules, a legal initial value and an illegal one (as SQL)
    "text": (
        sa.Text,
        rdb.TransitionRules(
            column="status", transitions={"new": {"done"}, WEIRD: {"new"}}, initial={"new", WEIRD}
        ),
        "E'it''s a \\\\ back\\tslash'",
        "'done'",
    ),
    "varchar": (sa.String(30), RULES, "'new'", "'done'"),
    "enum": (
        sa.Enum(Mood, name="mood"),
        rdb.TransitionRules(
            column="status", transitions={Mood.calm: {Mood.angry}}, initial={Mood.calm}
        ),
        "'calm'",
        "'angry'",
    ),
    "integer": (
        sa.Integer,
        rdb.TransitionRules(column="status", transitions={1: {2}, 2: {3}}, initial={1, 2}),
        "2",
        "3",
    ),
    "boolean": (
        sa.Boolean,
        rdb.TransitionRules(column="status", transitions={False: {True}}, initial={False}),
        "false",
        "true",
    ),
    "nullable": (
        sa.String(30),
        rdb.TransitionRules(
            column="status", transitions={None: {"new"}, "new": {"done"}}, initial={None}
        ),
        "NULL",
        "'new'",
    ),
}


def _calls(conn: sa.Connection, function: str) -> int:
    """Calls of ``function`` in this transaction (track_functions = 'pl')."""
    return int(
        conn.execute(
            sa.text("SELECT pg_stat_get_xact_function_calls(to_regproc(:f))"), {"f": function}
        ).scalar_one()
        or 0
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_insert_trigger_runs_only_for_rows_not_in_an_initial_state(
    engine: sa.Engine, reg: registry, kind: str
) -> None:
    """The INSERT trigger carries a WHEN: a bulk INSERT of rows in an initial state calls the
    function for none of them (no event queued), a row in another state is refused as before,
    whatever the column's type; drift reads the WHEN back as installed (also with
    standard_conforming_strings off)."""
    type_, rules, legal, illegal = KINDS[kind]
    model = reg.mapped(
        type(
            "Item",
            (),
            {
                "__tablename__": "items",
                "__transitions__": rules,
                "id": mapped_column(sa.Integer, primary_key=True),
                "status": mapped_column(type_, nullable=True),
            },
        )
    )
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, model)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, model) is None
        conn.exec_driver_sql("SET standard_conforming_strings = off")
        assert rdb.trigger_drift(conn, model) is None
        conn.exec_driver_sql("SET standard_conforming_strings = on")
        conn.rollback()
        definition = conn.exec_driver_sql(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE tgname = 'rdb_transition_status_ins'"
        ).scalar_one()
        assert " FOR EACH ROW WHEN ((NOT " in definition
        [(_, function)] = [r for r in _ours(conn, "items") if r[0].endswith("_ins")]
        conn.exec_driver_sql("SET track_functions = 'pl'")
        conn.exec_driver_sql(f"INSERT INTO items SELECT g, {legal} FROM generate_series(1, 500) g")
        assert _calls(conn, function) == 0
        conn.commit()
        err = refused_by_trigger(conn, f"INSERT INTO items VALUES (501, {legal}), (502, {illegal})")
        assert err.inserted
        assert err.pk == 502
        conn.exec_driver_sql("SET track_functions = 'pl'")
        conn.exec_driver_sql(f"INSERT INTO items VALUES (503, {legal})")
        assert _calls(conn, function) == 0
        conn.commit()
        assert conn.exec_driver_sql("SELECT count(*) FROM items").scalar_one() == 501


def test_an_insert_trigger_without_its_when_is_drift_and_reinstalled(
    engine: sa.Engine, reg: registry
) -> None:
    """The INSERT trigger of an earlier install (no WHEN: an event queued and the function
    called for every row) is drift, and the install puts the WHEN in."""
    job, _ = _jobs(reg)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, job)
    with engine.begin() as conn:
        [(_, function)] = [r for r in _ours(conn, "jobs") if r[0].endswith("_ins")]
        conn.exec_driver_sql("DROP TRIGGER rdb_transition_status_ins ON jobs")
        conn.exec_driver_sql(
            "CREATE TRIGGER rdb_transition_status_ins AFTER INSERT ON jobs FOR EACH ROW "
            f"EXECUTE FUNCTION {function}()"
        )
        drift = rdb.trigger_drift(conn, job) or ""
    assert "trigger rdb_transition_status_ins is not the one install creates" in drift
    rdb.install_transition_trigger(engine, job)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, job) is None
        conn.exec_driver_sql("SET track_functions = 'pl'")
        conn.exec_driver_sql("INSERT INTO jobs SELECT g, 'job', 'new' FROM generate_series(1, 9) g")
        assert _calls(conn, function) == 0


def test_a_model_whose_rules_were_removed_can_uninstall_what_is_left(
    engine: sa.Engine, registries: Callable[[], registry]
) -> None:
    """The next release drops ``__transitions__`` from the model altogether: the triggers of
    the last release still enforce its rules. Uninstalling through the model (or its drop
    script) asks which guards to remove (the triggers of a column that still exists may be
    another code base's); with ``columns=`` it removes ours of those columns, never the
    application's trigger."""
    first = _record(reg := registries(), RULES, PHASES)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, first)
    with engine.begin() as conn:
        conn.exec_driver_sql(USER_TRIGGER)
    bare = registries().mapped(
        type(
            "Record",
            (),
            {
                "__tablename__": "records",
                "id": mapped_column(sa.Integer, primary_key=True),
                "status": mapped_column(sa.String(20)),
                "phase": mapped_column(sa.String(20)),
            },
        )
    )
    with pytest.raises(rdb.TransitionRulesError, match="declares no __transitions__"):
        rdb.install_transition_trigger(engine, bare)
    for call in (
        lambda: rdb.transition_trigger_drop_sql(bare),
        lambda: rdb.uninstall_transition_trigger(engine, bare),
    ):
        with pytest.raises(rdb.TransitionRulesError, match=r"columns=\(\.\.\.\)"):
            call()
    script = rdb.transition_trigger_drop_sql(bare, columns=("status", "phase"))
    assert "DROP TRIGGER" in script
    with engine.begin() as conn:  # the last release's rules, still enforced
        conn.exec_driver_sql("INSERT INTO records VALUES (1, 'new', 'a')")
    with engine.begin() as conn, pytest.raises(sa.exc.DBAPIError) as refused:
        conn.exec_driver_sql("UPDATE records SET status = 'gone'")
    assert rdb.sqlstate_of(refused.value) == rdb.TRANSITION_SQLSTATE
    rdb.uninstall_transition_trigger(engine, bare, columns=("status",))
    with engine.connect() as conn:
        assert [t for t, _ in _ours(conn, "records")] == [
            "rdb_transition_phase_ins",
            "rdb_transition_phase_upd",
        ]
    rdb.uninstall_transition_trigger(engine, bare, columns=("phase", "status"))
    with engine.connect() as conn:
        assert _ours(conn, "records") == []
        assert _functions(conn) == ["rdb_transition_records_audit"]
        conn.exec_driver_sql("UPDATE records SET status = 'gone', phase = 'z'")  # unguarded
        conn.commit()
        user = conn.exec_driver_sql(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'records'::regclass"
        ).scalars()
        assert list(user) == ["rdb_transition_audit_ins"]
    rdb.uninstall_transition_trigger(engine, bare, columns=("phase",))  # nothing left to do


# ------------------------------------------------------------------------------------------------
# two code bases guarding other columns of one table
# ------------------------------------------------------------------------------------------------

PAYMENTS = rdb.TransitionRules(column="payment", transitions={"due": {"settled"}}, initial={"due"})


def _service(reg: registry, rules: rdb.TransitionRules, schema: str | None = None) -> Any:
    """A class of ``orders`` guarding the column of ``rules`` (a service of its own when
    ``reg`` is its own registry)."""
    return reg.mapped(
        type(
            f"Order_{rules.column}",
            (),
            {
                "__tablename__": "orders",
                "__table_args__": {"schema": schema},
                "__transitions__": rules,
                "id": mapped_column(sa.Integer, primary_key=True),
                rules.column: mapped_column(sa.Text),
            },
        )
    )


ORDERS = "CREATE TABLE orders (id integer PRIMARY KEY, status text, payment text)"


def _both_guarded(conn: sa.Connection) -> None:
    assert [t for t, _ in _ours(conn, "orders")] == [
        "rdb_transition_payment_ins",
        "rdb_transition_payment_upd",
        "rdb_transition_status_ins",
        "rdb_transition_status_upd",
    ]
    err = refused_by_trigger(conn, "INSERT INTO orders VALUES (1, 'new', 'settled')")
    assert (err.column, err.to_state) == ("payment", "settled")
    err = refused_by_trigger(conn, "INSERT INTO orders VALUES (1, 'done', 'due')")
    assert (err.column, err.to_state) == ("status", "done")


def test_two_registries_guarding_other_columns_of_one_table_keep_each_others_triggers(
    engine: sa.Engine, registries: Callable[[], registry], app_role: Any
) -> None:
    """Service A guards ``orders.status``, service B ``orders.payment``, each in a registry of
    its own (neither imports the other): A's install kept only what A's registry declares and
    dropped B's guard, and B's drift then asked for an install, which dropped A's. Both guards
    stay, through installs, the scripts and uninstalls of the other; drift is None for both;
    an application role owning nothing installs both at startup (no DDL sent)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(ORDERS)
    a = _service(registries(), RULES)
    b = _service(registries(), PAYMENTS)
    rdb.install_transition_trigger(engine, b)
    rdb.install_transition_trigger(engine, a)
    with engine.connect() as conn:
        _both_guarded(conn)
        assert rdb.trigger_drift(conn, a) is None
        assert rdb.trigger_drift(conn, b) is None
    with engine.begin() as conn:  # on a connection (the DDL is sent) and as scripts
        rdb.install_transition_trigger(conn, b)
        rdb.install_transition_trigger(conn, a)
        _run_script(conn, rdb.transition_trigger_sql(b))
        _run_script(conn, rdb.transition_trigger_sql(a))
    with engine.connect() as conn:
        _both_guarded(conn)
    app = app_role("GRANT SELECT, INSERT, UPDATE ON orders TO {role}")
    for model in (a, b, a):
        rdb.install_transition_trigger(app, model)  # raised "permission denied" before
    with app.connect() as conn:
        _both_guarded(conn)
    rdb.uninstall_transition_trigger(engine, a)
    with engine.connect() as conn:
        assert [t for t, _ in _ours(conn, "orders")] == [
            "rdb_transition_payment_ins",
            "rdb_transition_payment_upd",
        ]
        assert rdb.trigger_drift(conn, b) is None


def test_a_table_mapped_with_and_without_its_schema_keeps_both_guards(
    engine: sa.Engine, reg: registry
) -> None:
    """One registry, one class mapping ``orders`` and another ``public.orders``: one table in
    the database, two to SQLAlchemy (``same_table`` compares (schema, name)), so each one's
    install took the other's guard for a left-over and dropped it."""
    with engine.begin() as conn:
        conn.exec_driver_sql(ORDERS)
    a = _service(reg, RULES)
    b = _service(reg, PAYMENTS, schema="public")
    rdb.install_transition_trigger(engine, b)
    rdb.install_transition_trigger(engine, a)
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, b)
    with engine.connect() as conn:
        _both_guarded(conn)
        assert rdb.trigger_drift(conn, a) is None
        assert rdb.trigger_drift(conn, b) is None


def test_a_left_over_trigger_whose_name_was_cut_is_kept(
    engine: sa.Engine, registries: Callable[[], registry]
) -> None:
    """A column whose name is too long for the trigger's (cut to fit, with a hash): renamed,
    its trigger can't say which column it was for, so the cleanup keeps it (never guessed) and
    drift does not name it."""
    long = "status_" + "x" * 50
    rules = rdb.TransitionRules(column=long, transitions={"new": {"done"}}, initial={"new"})
    first = _record(reg := registries(), rules, status=long)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, first)
    with engine.begin() as conn:
        before = _ours(conn, "records")
        assert all(not t.endswith(("_ins", "_upd")) for t, _ in before)
        conn.exec_driver_sql(f"ALTER TABLE records RENAME COLUMN {long} TO state")
    nxt = _record(registries(), PHASES)
    rdb.install_transition_trigger(engine, nxt)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, nxt) is None
        assert set(before) <= set(_ours(conn, "records"))


# ------------------------------------------------------------------------------------------------
# the WHENs compare the column's text bytewise, whatever its collation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["text", "varchar(20)"])
def test_a_case_insensitive_collation_lets_no_undeclared_state_through(
    engine: sa.Engine, reg: registry, type_: str
) -> None:
    """A column of a nondeterministic collation (ICU, case-insensitive): the INSERT trigger's
    WHEN compared under it, took 'PENDING' for the initial 'pending' and never called the
    function, so an undeclared state was stored; the UPDATE trigger's WHEN missed a change of
    case. Both compare bytewise (COLLATE "C"). Needs a server built with ICU."""
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE COLLATION rdb_ci "
                "(provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
            )
    except sa.exc.DBAPIError as exc:
        pytest.skip(f"no nondeterministic ICU collation on this server: {exc.orig}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE jobs (id integer PRIMARY KEY, status {type_} COLLATE rdb_ci)"
        )
        assert conn.exec_driver_sql("SELECT 'PENDING' = 'pending' COLLATE rdb_ci").scalar()
    rules = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"running"}, "running": {"done"}},
        initial={"pending"},
    )
    job = _status_job(reg, rules)
    rdb.install_transition_trigger(engine, job)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, job) is None
        err = refused_by_trigger(conn, "INSERT INTO jobs VALUES (1, 'PENDING')")
        assert (err.to_state, err.inserted) == ("PENDING", True)
        conn.exec_driver_sql("INSERT INTO jobs VALUES (2, 'pending')")
        conn.commit()
        err = refused_by_trigger(conn, "UPDATE jobs SET status = 'PeNdInG' WHERE id = 2")
        assert (err.from_state, err.to_state) == ("pending", "PeNdInG")
        assert conn.exec_driver_sql("SELECT status FROM jobs").scalars().all() == ["pending"]
        for (definition,) in conn.exec_driver_sql(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'jobs'::regclass"
        ):
            assert 'COLLATE "C"' in definition


@pytest.mark.parametrize("type_", ["text", "varchar(20)", "char(8)"])
def test_a_column_of_a_collation_of_its_own_is_no_drift(
    engine: sa.Engine, reg: registry, type_: str
) -> None:
    """A column of a collation made with CREATE COLLATION (libc, so on every server; ICU's
    are the same): the WHEN's cast of a varchar to text carries the column's collation until
    COLLATE "C" overrides it, and the server records the trigger's dependency on it, which
    trigger_drift took for a WHEN bound to something not built in: drift right after the
    install, on every version. The column's own collation binds the WHEN to nothing the
    column does not already depend on."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE COLLATION rdb_bytes (provider = libc, locale = 'C')")
        conn.exec_driver_sql(
            f"CREATE TABLE jobs (id integer PRIMARY KEY, status {type_} COLLATE rdb_bytes)"
        )
    rules = rdb.TransitionRules(column="status", transitions={"new": {"done"}}, initial={"new"})
    job = _status_job(reg, rules)
    rdb.install_transition_trigger(engine, job)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, job) is None
        err = refused_by_trigger(conn, "INSERT INTO jobs VALUES (1, 'done')")
        assert (err.to_state, err.inserted) == ("done", True)
        conn.exec_driver_sql("INSERT INTO jobs VALUES (2, 'new')")
        conn.commit()
        err = refused_by_trigger(conn, "UPDATE jobs SET status = 'gone' WHERE id = 2")
        assert (err.from_state, err.to_state) == ("new", "gone")
        # a WHEN bound to another collation than the column's is still drift
        (function,) = {f for _, f in _ours(conn, "jobs")}
        conn.exec_driver_sql("CREATE COLLATION rdb_other (provider = libc, locale = 'C')")
        conn.exec_driver_sql("DROP TRIGGER rdb_transition_status_upd ON jobs")
        conn.exec_driver_sql(
            "CREATE TRIGGER rdb_transition_status_upd AFTER UPDATE ON jobs FOR EACH ROW "
            "WHEN (NOT coalesce((OLD.status COLLATE rdb_other)::pg_catalog.text "
            'COLLATE pg_catalog."C" OPERATOR(pg_catalog.=) '
            '(NEW.status COLLATE rdb_other)::pg_catalog.text COLLATE pg_catalog."C", '
            "OLD.status IS NULL AND NEW.status IS NULL)) "
            f"EXECUTE FUNCTION {function}()"
        )
        drift = rdb.trigger_drift(conn, job) or ""
        assert "rdb_transition_status_upd is not the one install creates" in drift
        conn.rollback()


def test_triggers_of_v5_without_the_bytewise_collation_are_drift_and_reinstalled(
    engine: sa.Engine, reg: registry
) -> None:
    """The WHENs as v5 first wrote them (compared under the column's collation): drift, and the
    install puts COLLATE "C" in."""
    job, _ = _jobs(reg)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, job)
    with engine.begin() as conn:
        (function,) = {f for _, f in _ours(conn, "jobs")}
        conn.exec_driver_sql("DROP TRIGGER rdb_transition_status_ins ON jobs")
        conn.exec_driver_sql("DROP TRIGGER rdb_transition_status_upd ON jobs")
        conn.exec_driver_sql(
            "CREATE TRIGGER rdb_transition_status_ins AFTER INSERT ON jobs FOR EACH ROW "
            """WHEN (NOT (coalesce(NEW."status"::text IN ('new'), false))) """
            f"EXECUTE FUNCTION {function}()"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER rdb_transition_status_upd AFTER UPDATE ON jobs FOR EACH ROW "
            """WHEN (OLD."status"::text IS DISTINCT FROM NEW."status"::text) """
            f"EXECUTE FUNCTION {function}()"
        )
        drift = rdb.trigger_drift(conn, job) or ""
    assert "trigger rdb_transition_status_ins is not the one install creates" in drift
    assert "trigger rdb_transition_status_upd is not the one install creates" in drift
    rdb.install_transition_trigger(engine, job)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, job) is None
        definitions = conn.exec_driver_sql(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'jobs'::regclass"
        ).scalars()
        assert all('COLLATE "C"' in d for d in definitions)


def test_a_stamped_function_of_another_role_does_not_stop_the_install(
    reg: registry,
    app_role: Any,
    pg_server: PostgresServer,
    pg_database: str,
    pg_url: str,
) -> None:
    """A role given TRIGGER on the table (and nothing of the owner's) attaches a trigger named
    like ours for a column the table lacks, calling a function of its own that carries our
    stamp: the owner's install drops that trigger but can't drop the function (not its
    owner), and went down with it ("must be owner of function"); now the function stays and
    the install goes through."""
    owner = app_role("GRANT CREATE ON SCHEMA public TO {role}")
    model = _record(reg, RULES)
    reg.metadata.create_all(owner)
    other = f"rdb_t_{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(18)
    role = pgsql.Identifier(other)
    pg_server.execute(
        pgsql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, pgsql.Literal(password))
    )
    try:
        pg_server.execute(
            pgsql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(role), database=pg_database
        )
        with owner.begin() as conn:
            conn.execute(sa.text(f"GRANT TRIGGER ON records TO {other}"))
        url = sa.make_url(pg_url).set(username=other, password=password)
        intruder = sa.create_engine(url)
        try:
            with intruder.begin() as conn:
                conn.exec_driver_sql(
                    "CREATE FUNCTION public.lookalike() RETURNS trigger LANGUAGE plpgsql "
                    "AS $$ BEGIN RETURN NULL; END $$"
                )
                conn.exec_driver_sql(
                    "COMMENT ON FUNCTION public.lookalike() IS "
                    "'resilient_db transition guard v5 0000'"
                )
                conn.exec_driver_sql(
                    "CREATE TRIGGER rdb_transition_gone_ins AFTER INSERT ON records "
                    "FOR EACH ROW EXECUTE FUNCTION public.lookalike()"
                )
        finally:
            intruder.dispose()
        rdb.install_transition_trigger(owner, model)
        with owner.connect() as conn:
            assert rdb.trigger_drift(conn, model) is None
            names = conn.exec_driver_sql(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'records'::regclass ORDER BY 1"
            ).scalars()
            assert list(names) == ["rdb_transition_status_ins", "rdb_transition_status_upd"]
            assert conn.exec_driver_sql(
                "SELECT to_regprocedure('public.lookalike()') IS NOT NULL"
            ).scalar()
    finally:
        pg_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            params=(other,),
        )
        pg_server.execute(pgsql.SQL("DROP OWNED BY {}").format(role), database=pg_database)
        pg_server.execute(pgsql.SQL("DROP ROLE {}").format(role))


# ------------------------------------------------------------------------------------------------
# the script run statement by statement, each committing on its own (psql's default)
# ------------------------------------------------------------------------------------------------


def _tickets(
    reg: registry,
    rules: rdb.TransitionRules = RULES,
    *,
    name: str = "Ticket",
    table: str = "tickets",
) -> Any:
    return reg.mapped(
        type(
            name,
            (),
            {
                "__tablename__": table,
                "__transitions__": rules,
                "id": mapped_column(sa.Integer, primary_key=True),
                "status": mapped_column(sa.String(20)),
            },
        )
    )


def _as_before_triggers(conn: sa.Connection) -> None:
    """What generator v3 left: BEFORE triggers calling a function of the same name, which
    returns NEW (a stand-in for its body: it refuses what the rules refuse), stamped v3."""
    function, stamp = conn.execute(
        sa.text(
            "SELECT oid::regprocedure::text, obj_description(oid, 'pg_proc') FROM pg_proc "
            "WHERE proname LIKE 'rdb_transition_tickets_status_%'"
        )
    ).one()
    conn.exec_driver_sql(
        f"CREATE OR REPLACE FUNCTION {function} RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF (TG_OP = 'INSERT' AND NEW.status IS DISTINCT FROM 'new') OR (TG_OP = 'UPDATE' "
        "AND NEW.status IS DISTINCT FROM 'new' AND NEW.status IS DISTINCT FROM 'done') THEN "
        "RAISE EXCEPTION USING ERRCODE = 'RDB01', MESSAGE = 'blocked'; END IF; "
        "RETURN NEW; END $$",
        execution_options={"no_parameters": True},
    )
    for name, event, when in (
        ("rdb_transition_status_ins", "INSERT", ""),
        ("rdb_transition_status_upd", "UPDATE", "WHEN (OLD.status IS DISTINCT FROM NEW.status)"),
    ):
        conn.exec_driver_sql(f"DROP TRIGGER {name} ON tickets")
        conn.exec_driver_sql(
            f"CREATE TRIGGER {name} BEFORE {event} ON tickets FOR EACH ROW {when} "
            f"EXECUTE FUNCTION {function}"
        )
    older = stamp.replace(" v5 ", " v3 ")
    conn.exec_driver_sql(f"COMMENT ON FUNCTION {function} IS '{older}'")


def _guarded_now(engine: sa.Engine, step: str) -> None:
    """From another connection: both triggers are on the table, an illegal move is refused
    and a legal one is stored (not skipped by a BEFORE trigger calling the new function)."""
    with engine.connect() as conn:
        names = conn.exec_driver_sql(
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'tickets'::regclass "
            "AND tgname::text LIKE 'rdb_transition_status_%%' AND tgenabled = 'O' ORDER BY 1"
        ).scalars()
        assert list(names) == ["rdb_transition_status_ins", "rdb_transition_status_upd"], step
        with pytest.raises(sa.exc.DBAPIError) as info:
            conn.exec_driver_sql("UPDATE tickets SET status = 'bogus' WHERE id = 1")
        assert getattr(info.value.orig, "sqlstate", None) == rdb.TRANSITION_SQLSTATE, step
        conn.rollback()
        with pytest.raises(sa.exc.DBAPIError) as info:
            conn.exec_driver_sql("INSERT INTO tickets (id, status) VALUES (2, 'done')")
        assert getattr(info.value.orig, "sqlstate", None) == rdb.TRANSITION_SQLSTATE, step
        conn.rollback()
        moved = conn.exec_driver_sql(
            "UPDATE tickets SET status = CASE status WHEN 'new' THEN 'done' ELSE 'new' END "
            "WHERE id = 1 RETURNING status"
        ).all()
        assert len(moved) == 1, f"a legal move was skipped after: {step}"
        conn.commit()


@pytest.mark.parametrize("installed", ["current", "v3 BEFORE triggers"])
def test_the_script_run_one_statement_at_a_time_never_leaves_the_table_unguarded(
    engine: sa.Engine, reg: registry, installed: str
) -> None:
    """psql runs a file one statement at a time, each committing on its own: between a DROP
    TRIGGER and its CREATE TRIGGER a concurrent writer's illegal move was committed, and
    after CREATE OR REPLACE FUNCTION an older release's BEFORE triggers called the new (AFTER)
    function, whose NULL skipped legal writes. Every statement of the script leaves the table
    guarded, and the result is the install's (no drift)."""
    ticket = _tickets(reg)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, ticket)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tickets (id, status) VALUES (1, 'new')")
        if installed != "current":
            _as_before_triggers(conn)
    statements = rdb.transition_trigger_sql(ticket).split(";\n\n")
    assert not {s.strip().upper() for s in statements} & {"BEGIN", "COMMIT", "ROLLBACK"}
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            _run_script(conn, statement)
            _guarded_now(engine, statement[:200])
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, ticket) is None


def test_the_script_inside_a_transaction_and_through_alembic_op_execute(
    engine: sa.Engine, reg: registry
) -> None:
    """No BEGIN or COMMIT in the script: op.execute() runs it inside the migration's
    transaction, and a rollback takes all of it back."""
    from alembic.migration import MigrationContext  # noqa: PLC0415
    from alembic.operations import Operations  # noqa: PLC0415

    ticket = _tickets(reg)
    reg.metadata.create_all(engine)
    with engine.connect() as conn:
        Operations(MigrationContext.configure(conn)).execute(rdb.transition_trigger_sql(ticket))
        assert conn.in_transaction()
        assert rdb.trigger_drift(conn, ticket) is None
        conn.rollback()
        assert "is missing" in (rdb.trigger_drift(conn, ticket) or "")
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).execute(rdb.transition_trigger_sql(ticket))
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, ticket) is None


def test_the_script_through_op_execute_with_states_that_look_like_bind_parameters(
    engine: sa.Engine, reg: registry
) -> None:
    """op.execute() takes a string for text(), which reads every bare ``:word`` as a bind
    parameter, inside quotes too: a state such as ``on :hold`` made the script fail ("A value
    is required for bind parameter 'hold'"). Such states are written so that none shows."""
    from alembic.migration import MigrationContext  # noqa: PLC0415
    from alembic.operations import Operations  # noqa: PLC0415

    rules = rdb.TransitionRules(
        column="status",
        transitions={":new": {"on :hold"}, "on :hold": {"done"}},
        initial={":new"},
    )
    ticket = _tickets(reg, rules, name="ColonTicket", table="colon_tickets")
    reg.metadata.create_all(engine)
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).execute(rdb.transition_trigger_sql(ticket))
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, ticket) is None
        conn.exec_driver_sql("INSERT INTO colon_tickets (id, status) VALUES (1, ':new')")
        with pytest.raises(sa.exc.DBAPIError) as info:
            conn.exec_driver_sql("UPDATE colon_tickets SET status = 'done' WHERE id = 1")
        assert getattr(info.value.orig, "sqlstate", None) == rdb.TRANSITION_SQLSTATE
        conn.rollback()
        conn.exec_driver_sql("UPDATE colon_tickets SET status = 'on :hold' WHERE id = 1")
        conn.exec_driver_sql("UPDATE colon_tickets SET status = 'done' WHERE id = 1")
        conn.commit()


@pytest.mark.parametrize(
    ("schema", "table", "column", "key"),
    [
        ("on :hold", "by :week", "state:now", "id"),
        ("back\\:slash", "a\\:b", "status", "id"),
        ("cols", "colon_columns", "state :now", "id :key"),
        ("back_cols", "backslash_columns", "st\\:ate", "i\\:d"),
    ],
)
def test_the_script_through_op_execute_with_names_that_look_like_bind_parameters(
    engine: sa.Engine, reg: registry, *, schema: str, table: str, column: str, key: str
) -> None:
    """text() reads ``:week`` in ``"by :week"`` as a bind parameter, quoted names too ("A value
    is required for bind parameter 'week'"), and takes the backslash out of ``"a\\:b"`` (the
    script then named another table): the schema, the table, the triggers and the function are
    written so that none shows, and the script installs the trigger of exactly these names.
    The same for the status and key columns the function's body reads (``NEW."state :now"``
    failed so, the schema and table names fixed)."""
    from alembic.migration import MigrationContext  # noqa: PLC0415
    from alembic.operations import Operations  # noqa: PLC0415

    model = reg.mapped(
        type(
            "ColonNames",
            (),
            {
                "__tablename__": table,
                "__table_args__": {"schema": schema},
                "__transitions__": rdb.TransitionRules(
                    column="state", transitions={"new": {"done"}}, initial={"new"}
                ),
                "id": mapped_column(key, sa.Integer, primary_key=True),
                "state": mapped_column(column, sa.String(20)),
            },
        )
    )
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    reg.metadata.create_all(engine)
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).execute(rdb.transition_trigger_sql(model))
    t = model.__table__
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, model) is None
        conn.execute(t.insert().values({key: 1, column: "new"}))
        with pytest.raises(sa.exc.DBAPIError) as info:
            conn.execute(t.update().values({column: "bogus"}))
        assert getattr(info.value.orig, "sqlstate", None) == rdb.TRANSITION_SQLSTATE
        conn.rollback()
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).execute(rdb.transition_trigger_drop_sql(model))
    with engine.connect() as conn:
        assert _ours(conn, f"{sa.inspect(conn).dialect.identifier_preparer.format_table(t)}") == []
        conn.execute(t.insert().values({key: 2, column: "bogus"}))  # no trigger left


@pytest.mark.parametrize(("column", "key"), [("state :now", "id :key"), ("st\\:ate", "i\\:d")])
def test_a_function_written_with_plain_column_names_by_an_earlier_release_is_no_drift(
    engine: sa.Engine, reg: registry, *, column: str, key: str
) -> None:
    """Before the ``(NEW).U&"..."`` spelling, install_transition_trigger (where
    docs/transition-guard.md sent such tables) wrote a guarded or key column named ``"state :now"``
    as ``NEW."state :now"``: the same function, PL/pgSQL reading either. Installed so, it is no
    drift (which said its
    body was changed, its stamp kept, and made the application role's startup install raise)."""
    table = f"plain_{uuid.uuid4().hex[:8]}"
    model = reg.mapped(
        type(
            "PlainColonNames",
            (),
            {
                "__tablename__": table,
                "__transitions__": rdb.TransitionRules(
                    column="state", transitions={"new": {"done"}}, initial={"new"}
                ),
                "id": mapped_column(key, sa.Integer, primary_key=True),
                "state": mapped_column(column, sa.String(20)),
            },
        )
    )
    reg.metadata.create_all(engine)
    try:
        rdb.install_transition_trigger(engine, model)
        with engine.begin() as conn:
            function, source = conn.execute(
                sa.text(
                    "SELECT p.oid::regprocedure::text, p.prosrc FROM pg_trigger t "
                    "JOIN pg_proc p ON p.oid = t.tgfoid "
                    "WHERE t.tgrelid = CAST(:rel AS regclass) LIMIT 1"
                ),
                {"rel": table},
            ).one()
            earlier = source
            for name in (column, key):
                for row in ("NEW", "OLD"):
                    quoted = 'U&"' + name.replace("\\", "\\\\").replace(":", "\\003A") + '"'
                    earlier = earlier.replace(f"({row}).{quoted}", f'{row}."{name}"')
            assert earlier != source
            assert "U&" not in earlier
            conn.exec_driver_sql(  # (%% : the driver's paramstyle)
                f"CREATE OR REPLACE FUNCTION {function} RETURNS trigger LANGUAGE plpgsql "
                f"SET search_path = pg_catalog, pg_temp AS $rdb${earlier}$rdb$".replace("%", "%%")
            )
        with engine.connect() as conn:
            assert rdb.trigger_drift(conn, model) is None
            t = model.__table__
            conn.execute(t.insert().values({key: 1, column: "new"}))
            with pytest.raises(sa.exc.DBAPIError) as info:  # the earlier body enforces too
                conn.execute(t.update().values({column: "bogus"}))
            assert getattr(info.value.orig, "sqlstate", None) == rdb.TRANSITION_SQLSTATE
            conn.rollback()
    finally:
        reg.metadata.drop_all(engine)


@pytest.mark.skipif(shutil.which("psql") is None, reason="needs psql")
def test_psql_running_the_script_lets_no_concurrent_illegal_move_through(
    engine: sa.Engine, reg: registry, pg_url: str
) -> None:
    """The script as psql runs it (autocommit, statement by statement), again and again, while
    another connection tries an illegal move the whole time: none is committed."""
    ticket = _tickets(reg)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, ticket)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tickets (id, status) VALUES (1, 'new')")
    dsn = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    script = rdb.transition_trigger_sql(ticket)
    stop = threading.Event()
    slipped: list[int] = []
    tries: list[int] = []

    def writer() -> None:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while not stop.is_set():
                tries.append(1)
                try:
                    moved = conn.exec_driver_sql(
                        "UPDATE tickets SET status = 'bogus' WHERE id = 1 RETURNING id"
                    ).all()
                except sa.exc.DBAPIError:
                    continue
                slipped.extend(row[0] for row in moved)
                conn.exec_driver_sql("SET session_replication_role = replica")
                conn.exec_driver_sql("UPDATE tickets SET status = 'new' WHERE id = 1")
                conn.exec_driver_sql("SET session_replication_role = origin")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 3
        runs = 0
        while time.monotonic() < deadline and not slipped:
            subprocess.run(
                ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn],
                input=script,
                text=True,
                check=True,
                capture_output=True,
                timeout=10,
            )
            runs += 1
    finally:
        stop.set()
        thread.join(timeout=10)
    assert runs > 0
    assert len(tries) > runs  # the writer ran meanwhile
    assert slipped == [], f"illegal moves committed while psql ran the script {runs} times"
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, ticket) is None


# ------------------------------------------------------------------------------------------------
# asyncio binds
# ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_trigger_drift_refuses_an_async_bind_pointing_to_run_sync(
    engine: sa.Engine, reg: registry, pg_async_url: str
) -> None:
    """An AsyncEngine, AsyncConnection or AsyncSession: a TypeError naming run_sync, as the
    installers give (it failed with AttributeError, leaving a coroutine never awaited); through
    run_sync the answer is the sync one."""
    ticket = _tickets(reg)
    reg.metadata.create_all(engine)
    rdb.install_transition_trigger(engine, ticket)
    async_engine = create_async_engine(pg_async_url)
    try:
        async with async_engine.connect() as conn, AsyncSession(async_engine) as session:
            for bind in (async_engine, conn, session):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # no coroutine left never awaited
                    with pytest.raises(TypeError, match=r"run_sync") as info:
                        rdb.trigger_drift(bind, ticket)  # type: ignore[arg-type]
                assert type(bind).__name__ in str(info.value)
            assert await conn.run_sync(rdb.trigger_drift, ticket) is None
    finally:
        await async_engine.dispose()
    with pytest.raises(TypeError, match=r"engine\.connect\(\)"):
        rdb.trigger_drift(engine, ticket)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# the look at the table's shape on the caller's connection
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("through", ["connection", "session"])
def test_a_failed_look_at_the_table_leaves_the_installs_own_error(
    engine: sa.Engine, reg: registry, app_role: Any, through: str
) -> None:
    """Installing through the caller's Connection (or Session) in its transaction, a role
    without USAGE on the table's schema: the look whether the table is partitioned or
    inherited from failed, was passed over, and left the transaction aborted, so the install
    raised "current transaction is aborted" (25P02) instead of the server's reason, which an
    install through an Engine raises."""
    model = reg.mapped(
        type(
            "Hidden",
            (),
            {
                "__tablename__": "hidden",
                "__table_args__": {"schema": "hidden_schema"},
                "__transitions__": RULES,
                "id": mapped_column(sa.Integer, primary_key=True),
                "status": mapped_column(sa.String(20)),
            },
        )
    )
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA hidden_schema")
    reg.metadata.create_all(engine)
    app = app_role()
    with pytest.raises(sa.exc.ProgrammingError) as by_engine:
        rdb.install_transition_trigger(app, model)
    assert rdb.sqlstate_of(by_engine.value) == "42501"

    def install() -> None:
        if through == "connection":
            with app.connect() as conn, conn.begin():
                conn.exec_driver_sql("SELECT 1")
                rdb.install_transition_trigger(conn, model)
        else:
            with Session(app) as session, session.begin():
                rdb.install_transition_trigger(session, model)

    with pytest.raises(sa.exc.DBAPIError) as info:
        install()
    assert rdb.sqlstate_of(info.value) == "42501"
    assert "permission denied for schema hidden_schema" in str(info.value)


def test_a_column_name_longer_than_63_bytes_is_no_drift(engine: sa.Engine, reg: registry) -> None:
    """36 Cyrillic letters: 63 characters or fewer for SQLAlchemy, 66 bytes, cut to 63 by
    PostgreSQL. Right after an install, drift said "the table has no column ..." (the uncut
    name was asked for), every install sent its DDL again, and an application role's startup
    install was refused."""
    name = "состояние_заказа_в_системе_учёта_цех"
    assert len(name.encode()) > 63
    Order = reg.mapped(
        type(
            "Order",
            (),
            {
                "__tablename__": "orders",
                "__transitions__": rdb.TransitionRules(
                    column="st", transitions={"new": {"paid"}}, initial={"new"}
                ),
                "id": mapped_column(sa.Integer, primary_key=True),
                "st": mapped_column(name, sa.String(20)),
            },
        )
    )
    Order.__table__.create(engine)
    rdb.install_transition_trigger(engine, Order)
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Order) is None
    sent: list[str] = []
    listener = lambda *args: sent.append(args[2])  # noqa: E731
    sa_event.listen(engine, "before_cursor_execute", listener)
    try:
        rdb.install_transition_trigger(engine, Order)  # current: looks only
    finally:
        sa_event.remove(engine, "before_cursor_execute", listener)
    assert all(statement.lstrip().upper().startswith("SELECT") for statement in sent), sent


def test_a_database_other_than_postgresql_is_refused_before_anything_is_sent(
    registries: Callable[[], registry], tmp_path: Path
) -> None:
    """SQLite: installing, uninstalling and checking the trigger each raise a ValueError naming
    the database; nothing is created there."""
    model = _record(registries(), RULES)
    lite = sa.create_engine(f"sqlite:///{tmp_path / 'lite.db'}")
    try:
        for act in (
            lambda: rdb.install_transition_trigger(lite, model),
            lambda: rdb.uninstall_transition_trigger(lite, model),
        ):
            with pytest.raises(ValueError, match="this database is sqlite") as info:
                act()
            assert "transition triggers need PostgreSQL" in str(info.value)
        with lite.connect() as conn:
            tables = conn.exec_driver_sql("SELECT name FROM sqlite_master").all()
        assert tables == []
    finally:
        lite.dispose()
