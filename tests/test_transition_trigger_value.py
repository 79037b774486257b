"""``rdb.transitions.TransitionTrigger``: the transition trigger described without a mapped class
(what a migration installs). It installs exactly the trigger of the equivalent model (same
statements online and offline, same drift detection, interchangeable through an Engine), is
registered nowhere (the application's models alone map the trigger's error back), and refuses
bad input when built. Against the real server where a database is involved."""

from __future__ import annotations

import enum
import io
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sent import Sent
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, mapperlib

import resilient_db as rdb
from resilient_db.examples.tasks import Base, Task
from resilient_db.transitions import TransitionRules, TransitionRulesError, TransitionTrigger
from resilient_db.transitions._install import guard_of
from resilient_db.transitions._rules import guard_for_table, guards_of
from resilient_db.transitions._sql import drop_statements, install_statements, script_statements


def tasks_trigger(**changes: Any) -> TransitionTrigger:
    """The example's Task trigger, described without the class."""
    given: dict[str, Any] = {
        "model": "Task",
        "table": "tasks",
        "primary_key": "id",
        "rules": Task.__transitions__,
        "type_": sa.String(20),
    }
    given.update(changes)
    return TransitionTrigger(**given)


class Colour(str, enum.Enum):
    RED = "red"
    GREEN = "green"


class _Models(DeclarativeBase):
    pass


class Ledger(_Models):
    """A schema, a key of two columns (in an order that is not the table's) and an Enum."""

    __tablename__ = "ledger"
    __table_args__ = (sa.PrimaryKeyConstraint("entry", "book"), {"schema": "accounts"})
    __transitions__ = (
        TransitionRules(
            column="colour", transitions={Colour.RED: {Colour.GREEN}}, initial={Colour.RED}
        ),
        TransitionRules(column="open", transitions={True: {False}}, initial={True}),
    )

    book: Mapped[int] = mapped_column(sa.Integer)
    entry: Mapped[int] = mapped_column(sa.Integer)
    colour: Mapped[Colour] = mapped_column(sa.Enum(Colour))
    open: Mapped[bool] = mapped_column(sa.Boolean)


LEDGER = {
    "model": "Ledger",
    "table": "ledger",
    "schema": "accounts",
    "primary_key": ("entry", "book"),
}


@pytest.mark.parametrize(
    ("model", "trigger"),
    [
        (Task, tasks_trigger),
        (Task, lambda: tasks_trigger(type_=None)),  # a string column: the states' text
        (
            Ledger,
            lambda: TransitionTrigger(
                **LEDGER, rules=Ledger.__transitions__[0], type_=sa.Enum(Colour)
            ),
        ),
        (Ledger, lambda: TransitionTrigger(**LEDGER, rules=Ledger.__transitions__[1])),
    ],
)
def test_the_statements_are_the_models(model: type[Any], trigger: Any) -> None:
    value = trigger()
    guard = guard_of(value)
    theirs = next(g for g in guards_of(model) if g.column.name == value.column)
    assert install_statements(guard) == install_statements(theirs)
    assert script_statements(guard) == script_statements(theirs)
    assert drop_statements(guard) == drop_statements(theirs)


def test_the_scripts_are_the_models() -> None:
    """``transition_trigger_sql`` / ``transition_trigger_drop_sql`` of the value are those of a
    model of one guarded column (the Task model's), byte for byte; ``columns=`` is a model's."""
    assert rdb.transition_trigger_sql(tasks_trigger()) == rdb.transition_trigger_sql(Task)
    assert rdb.transition_trigger_drop_sql(tasks_trigger()) == rdb.transition_trigger_drop_sql(Task)
    with pytest.raises(TypeError, match="columns= names the guards to remove of a model"):
        rdb.transition_trigger_drop_sql(tasks_trigger(), columns=["status"])


def test_it_is_registered_nowhere() -> None:
    """Built, installed or not, it never becomes the guard the trigger's error is mapped back
    with, nor a mapped class a session could guard."""
    rules = TransitionRules(column="state", transitions={"a": {"b"}}, initial={"a"})
    value = TransitionTrigger(model="Only", table="only_described", primary_key="id", rules=rules)
    assert guard_of(value).model == "Only"
    assert guard_for_table("Only", None, "only_described", "state") is None
    # every class of every registry, mapped or not yet (``registry.mappers`` raises for an
    # AbstractConcreteBase of another test module's registry until mappers are configured)
    mapped = [m.class_.__name__ for r in mapperlib._all_registries() for m in r._managers]
    assert "Only" not in mapped  # its compiling mapping is disposed of


RULES = TransitionRules(column="status", transitions={"a": {"b"}}, initial={"a"})


@pytest.mark.parametrize(
    ("given", "error", "words"),
    [
        ({"primary_key": ()}, TypeError, "primary_key names no column"),
        ({"primary_key": ("id", "id")}, TypeError, "names a column twice"),
        ({"primary_key": (1,)}, TypeError, "1 is not a column name"),
        ({"primary_key": b"id"}, TypeError, "must be a column name or a sequence"),
        ({"model": ""}, TypeError, "model must be a non-empty str"),
        ({"table": None}, TypeError, "table must be a non-empty str"),
        ({"schema": ""}, TypeError, "schema must be a non-empty str or None"),
        ({"table": "t\x00"}, TransitionRulesError, "NUL character"),
        ({"rules": "a -> b"}, TypeError, "rules must be a TransitionRules"),
        ({"rules": (RULES,)}, TypeError, "one value per guarded column"),
        ({"type_": "varchar(20)"}, TypeError, "type_ must be a SQLAlchemy type"),
        ({"type_": sa.Integer}, TransitionRulesError, "state 'a' can't be stored"),
        ({"type_": sa.String(0)}, TransitionRulesError, "the column at most 0"),
        (
            {
                "rules": TransitionRules(
                    column="status", transitions={Colour.RED: {Colour.GREEN}}, initial={Colour.RED}
                )
            },
            TransitionRulesError,
            "pass type_= as the column is declared",
        ),
        (
            {
                "rules": TransitionRules(
                    column="status", transitions={"a": {"b"}, "c": {"a"}}, initial={"a"}
                )
            },
            TransitionRulesError,
            "state 'c' is neither initial nor reachable",
        ),
    ],
)
def test_bad_input_is_refused_when_built(
    given: dict[str, Any], error: type[Exception], words: str
) -> None:
    args: dict[str, Any] = {"model": "Job", "table": "jobs", "primary_key": "id", "rules": RULES}
    args.update(given)
    with pytest.raises(error) as info:
        TransitionTrigger(**args)
    assert words in str(info.value)
    if error is TransitionRulesError and "NUL" not in words:
        # named as built, not as a model's __transitions__
        assert str(info.value).startswith("TransitionTrigger(model='Job', table='jobs'")


def test_a_key_column_may_be_the_guarded_one() -> None:
    value = TransitionTrigger(model="Job", table="jobs", primary_key=("status", "id"), rules=RULES)
    assert [c.name for c in guard_of(value).pk_columns] == ["status", "id"]


def offline_script(install: Any, target: Any) -> str:
    buffer = io.StringIO()
    context = MigrationContext.configure(  # as Alembic's env.py template configures it
        dialect_name="postgresql",
        opts={"as_sql": True, "output_buffer": buffer},
        dialect_opts={"paramstyle": "named"},
    )
    install(Operations(context), target)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "action", [rdb.install_transition_trigger, rdb.uninstall_transition_trigger]
)
def test_offline_the_script_is_the_models(action: Any) -> None:
    """``alembic upgrade --sql``: the same text, byte for byte."""
    assert offline_script(action, tasks_trigger()) == offline_script(action, Task)


def ddl(sent: Sent) -> list[str]:
    return [
        s for s in sent.sql if not s.upper().startswith(("SELECT", "BEGIN", "COMMIT", "ROLLBACK"))
    ]


@pytest.mark.parametrize("first", ["model", "value"])
def test_installed_from_one_the_other_finds_it_current(engine: sa.Engine, first: str) -> None:
    """Through an Engine, the second install (from the other form) sends no DDL: the trigger
    the first put in is the one it would install."""
    Base.metadata.create_all(engine)
    value = tasks_trigger()
    model_first = first == "model"
    rdb.install_transition_trigger(engine, Task if model_first else value)
    sent = Sent(engine)
    try:
        rdb.install_transition_trigger(engine, value if model_first else Task)
    finally:
        sent.stop()
    assert sent.sql  # it looked
    assert ddl(sent) == []
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, Task) is None
        assert rdb.trigger_drift(conn, value) is None
    # and drift is drift for both: other rules installed
    other = tasks_trigger(
        rules=TransitionRules(
            column="status", transitions={"pending": {"completed"}}, initial={"pending"}
        )
    )
    rdb.install_transition_trigger(engine, other)
    with engine.connect() as conn:
        assert "installed function stamp" in (rdb.trigger_drift(conn, Task) or "")
        assert "installed function stamp" in (rdb.trigger_drift(conn, value) or "")
        assert rdb.trigger_drift(conn, other) is None


def test_the_database_refuses_an_illegal_move(engine: sa.Engine) -> None:
    """Installed from the value on a Connection: raw SQL past the rules is refused by the
    database with SQLSTATE RDB01; uninstalled, it is not."""
    Base.metadata.create_all(engine)
    value = tasks_trigger()
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, value)
        conn.exec_driver_sql("INSERT INTO tasks (idem_key, title) VALUES ('k', 't')")
        conn.exec_driver_sql("UPDATE tasks SET status = 'in_progress'")
    with pytest.raises(sa_exc.DBAPIError) as info, engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tasks SET status = 'cancelled'")
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE
    with pytest.raises(sa_exc.DBAPIError) as info, engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO tasks (idem_key, title, status) VALUES ('j', 't', 'failed')"
        )
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE

    with pytest.raises(TypeError, match="columns= names the guards to remove of a model"):
        rdb.uninstall_transition_trigger(engine, value, columns=("status",))
    rdb.uninstall_transition_trigger(engine, value)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tasks SET status = 'cancelled'")
        functions = conn.execute(
            sa.text("SELECT count(*) FROM pg_proc WHERE proname LIKE 'rdb_transition%'")
        ).scalar_one()
        triggers = conn.execute(
            sa.text("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'rdb_transition%'")
        ).scalar_one()
    assert (functions, triggers) == (0, 0)


class _AppModels(DeclarativeBase):
    pass


def test_the_applications_model_maps_the_error_back(pg_url: str, engine: sa.Engine) -> None:
    """The rules were installed from a value, the application's model has since moved on
    (in_progress -> completed is legal now): the trigger's error is the application's Task,
    read with its rules, and says the installed rules differ. A frozen model of the old rules
    compiled in this process (a migration's, loaded by an upgrade) took the lookup and lost
    that hint; a value is never looked up."""
    Base.metadata.create_all(engine)
    old = tasks_trigger(
        rules=TransitionRules(
            column="status", transitions={"pending": {"in_progress"}}, initial={"pending"}
        )
    )
    rdb.install_transition_trigger(engine, old)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tasks (idem_key, title) VALUES ('k', 't')")
        conn.exec_driver_sql("UPDATE tasks SET status = 'in_progress'")
    # the application's model, compiled: one made here, with the example's rules (the
    # example's Task compiled earlier in the process may come before the Task models of other
    # test modules, on the same table with other rules, which a lookup takes the latest of)
    app_task = type(
        "Task",
        (_AppModels,),
        {
            "__tablename__": "tasks",
            "id": sa.Column(sa.Integer, primary_key=True),
            "status": sa.Column(sa.String(20)),
            "__transitions__": Task.__transitions__,
        },
    )
    guards_of(app_task)
    resilient = sa.create_engine(pg_url)
    try:
        sessions = rdb.ResilientSession(resilient, service="described-trigger")
        with pytest.raises(rdb.IllegalTransitionError) as info, sessions.begin() as session:
            session.execute(sa.text("UPDATE tasks SET status = 'completed'"))
    finally:
        resilient.dispose()
    err = info.value
    assert (err.model, err.column, err.via) == ("Task", "status", "db")
    assert (err.from_state, err.to_state) == ("in_progress", "completed")
    assert "whose rules differ from those declared on the model" in str(err)


def test_schema_translation_is_refused_naming_the_value(engine: sa.Engine) -> None:
    value = TransitionTrigger(
        model="Job", table="jobs", schema="tenant", primary_key="id", rules=RULES
    )
    moved = engine.execution_options(schema_translate_map={"tenant": "tenant_2"})
    with pytest.raises(ValueError, match=r"schema 'tenant' of TransitionTrigger\(model='Job'"):
        rdb.install_transition_trigger(moved, value)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()
