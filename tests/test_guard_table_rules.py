"""A class with no rules of its own mapping a table that another class guards (``Plain``,
beside ``Task``). Its writes of the status were judged by no one: a flush of a changed
attribute, a status set by a ``before_update`` listener during the flush, an INSERT, an ORM
bulk UPDATE (with WHERE criteria or by primary key), so an illegal move of a row of a guarded
table went through wherever no trigger was installed. A row of a guarded table is now judged by
the table's rules whichever class writes it (a class with rules of its own by its own, as
before); classes guarding the column by different rules leave no rules of the table, and a
class without rules of its own mapping it is refused when the mappers configure. The way past
the guard stays the audited bypass. Real server, no trigger (the session guards alone)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import seeded_engine, statuses_by_id
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, registry

import resilient_db as rdb
from resilient_db import Config


class Base(DeclarativeBase):
    pass


TABLE = sa.Table(
    "tasks",
    Base.metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("note", sa.String(20), nullable=False, default=""),
    sa.Column("status", sa.String(20), nullable=False),
)

RULES = rdb.TransitionRules(
    column="status",
    transitions={"pending": {"running"}, "running": {"failed"}},
    initial={"pending"},
)


class Task(Base):
    __table__ = TABLE
    __transitions__ = RULES
    id: Mapped[int]
    note: Mapped[str]
    status: Mapped[str]


class Plain(Base):
    """The same table, no rules: a report's or an admin screen's model, say."""

    __table__ = TABLE
    id: Mapped[int]
    note: Mapped[str]
    state: Mapped[str] = TABLE.c.status  # (mapped under another name)


@event.listens_for(Plain, "before_update")
def _done_when_noted(mapper: Any, connection: Any, target: Any) -> None:
    if target.note == "done":
        target.state = "done"


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from seeded_engine(
        pg_url, Base, "INSERT INTO tasks VALUES (1, '', 'running'), (2, '', 'running')"
    )


def _set(session: Session) -> None:
    session.get_one(Plain, 1).state = "done"


def _by_listener(session: Session) -> None:
    session.get_one(Plain, 1).note = "done"  # the listener sets the status during the flush


def _by_listener_beside_a_guarded_row(session: Session) -> None:
    session.get_one(Task, 2).status = "failed"  # legal, watched by Task's rules
    session.get_one(Plain, 1).note = "done"


def _inserted(session: Session) -> None:
    session.add(Plain(id=3, note="", state="done"))


def _bulk_where(session: Session) -> None:
    session.execute(sa.update(Plain).where(Plain.id == 1).values(state="done"))


def _bulk_by_pk(session: Session) -> None:
    session.execute(sa.update(Plain), [{"id": 1, "state": "done"}])


PATHS: list[tuple[Callable[[Session], None], str]] = [
    (_set, "flush"),
    (_by_listener, "flush"),
    (_by_listener_beside_a_guarded_row, "flush"),
    (_inserted, "flush"),
    (_bulk_where, "orm-update"),
    (_bulk_by_pk, "orm-update"),
]


@pytest.mark.parametrize(("unit", "via"), PATHS, ids=[p[0].__name__.strip("_") for p in PATHS])
def test_an_illegal_move_through_a_class_without_rules_is_refused(
    engine: sa.Engine, service: str, unit: Callable[[Session], None], via: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=Config(bulk_update="raise"))
    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(unit)
    err = info.value
    assert (err.model, err.column, err.to_state, err.via) == ("Plain", "state", "done", via)
    assert err.from_state == (None if unit is _inserted else "running")
    assert statuses_by_id(engine) == {1: "running", 2: "running"}


def test_a_bulk_update_in_filter_mode_leaves_the_row_out(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Session) -> int:
        return session.execute(sa.update(Plain).values(state="done")).rowcount  # type: ignore[attr-defined, no-any-return]

    assert Sessions.run(unit) == 0
    assert statuses_by_id(engine) == {1: "running", 2: "running"}


def test_a_legal_move_through_a_class_without_rules_is_written(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service, config=Config(bulk_update="raise"))

    def unit(session: Session) -> None:
        plain = session.get_one(Plain, 1)
        assert rdb.allowed_transitions(plain) == {"failed"}
        plain.state = "failed"
        session.execute(sa.update(Plain).where(Plain.id == 2).values(state="failed"))
        session.add(Plain(id=3, note="", state="pending"))

    Sessions.run(unit)
    assert statuses_by_id(engine) == {1: "failed", 2: "failed", 3: "pending"}


def test_the_bypass_lets_a_class_without_rules_past(engine: sa.Engine, service: str) -> None:
    """The way past the guard is the audited bypass, as for the class with the rules."""
    with engine.begin() as conn:  # (as installing a trigger does)
        conn.exec_driver_sql(
            "DO $$ BEGIN CREATE ROLE resilient_db_bypass NOLOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
    Sessions = rdb.ResilientSession(engine, service=service)

    def unit(session: Session) -> None:
        rdb.bypass_transitions(session, reason="ticket 7: repair")
        session.get_one(Plain, 1).state = "done"

    Sessions.run(unit)
    assert statuses_by_id(engine) == {1: "done", 2: "running"}


def test_the_trigger_and_the_rules_are_still_the_declaring_class_s() -> None:
    """The rules a class takes from its table are not its declared rules: the trigger is
    made from the class that declares them (a trigger of ``Plain`` would name it)."""
    with pytest.raises(rdb.TransitionRulesError, match="Plain declares no __transitions__"):
        rdb.transition_trigger_sql(Plain)
    with pytest.raises(rdb.TransitionRulesError, match="Plain declares no __transitions__"):
        rdb.transition_rules(Plain)
    assert rdb.transition_rules(Task) == (RULES,)


def _map(reg: registry, name: str, table: sa.Table, **attrs: Any) -> type[Any]:
    return reg.mapped(type(name, (), {"__table__": table, **attrs}))


def _table(reg: registry) -> sa.Table:
    return sa.Table(
        "jobs",
        reg.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(20)),
    )


def test_a_class_configured_before_the_one_with_rules_takes_them() -> None:
    """The class without rules configured (and its guards looked up) before a class declaring
    rules for its table is mapped: it takes them once that one is configured."""
    reg = registry()
    try:
        table = _table(reg)
        plain = _map(reg, "PlainJob", table)
        reg.configure()
        with pytest.raises(rdb.TransitionRulesError, match="PlainJob declares no __transitions"):
            rdb.allowed_transitions(plain(id=1, status="x"))
        job = _map(reg, "Job", table, __transitions__=RULES)
        reg.configure()
        assert rdb.allowed_transitions(plain(id=1, status="x")) == {"pending"}
        assert rdb.allowed_transitions(job(id=1, status="x")) == {"pending"}
    finally:
        reg.dispose()


def test_classes_guarding_the_table_by_different_rules_leave_no_rules_of_the_table() -> None:
    reg = registry()
    try:
        table = _table(reg)
        # (kept: a registry holds its classes weakly)
        loose = _map(reg, "LooseJob", table, __transitions__=RULES)
        strict = _map(
            reg,
            "StrictJob",
            table,
            __transitions__=rdb.TransitionRules(
                column="status", transitions={"pending": {"running"}}, initial={"pending"}
            ),
        )
        plain = _map(reg, "PlainJob", table)
        with pytest.raises(rdb.TransitionRulesError) as refused:
            reg.configure()
        assert [c.__name__ for c in (loose, strict, plain)] == ["LooseJob", "StrictJob", "PlainJob"]
    finally:
        reg.dispose()
    assert str(refused.value) == (
        "PlainJob guards column 'status' of table 'jobs' by no rules of its own, and LooseJob "
        "and StrictJob guard it by different rules (other transitions): a row PlainJob writes "
        "there can't be judged by the table's rules; declare on PlainJob the rules its rows "
        "follow (an admin repair past the guard is rdb.bypass_transitions)"
    )


def test_a_subclass_setting_no_rules_is_judged_by_its_table_s() -> None:
    """Single-table inheritance: ``__transitions__ = None`` on a subclass does not take its
    rows out of the table's rules."""
    reg = registry()
    try:
        table = _table(reg)
        base = _map(reg, "Job", table, __transitions__=RULES)
        sub = reg.mapped(type("SubJob", (base,), {"__transitions__": None}))
        reg.configure()
        assert rdb.allowed_transitions(sub(id=1, status="x")) == {"pending"}
    finally:
        reg.dispose()
