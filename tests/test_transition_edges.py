"""The session guards at the edges of how SQLAlchemy names a write: aliased UPDATE targets,
states given through ``values()`` or replaced by execution parameters, ``Column.key``,
primary keys in another Python type than the database returns, CHAR columns, states written
during the flush by the application's listeners or the ORM's own synchronization.

No trigger is installed here: what is tested is that the session guards see the move."""

from __future__ import annotations

import dataclasses
import enum
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import BYPASS_BY_HAND, metadata_engine
from sent import Sent
from sqlalchemy import event
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    column_property,
    composite,
    mapped_column,
    registry,
    relationship,
    sessionmaker,
)

import resilient_db as rdb
from resilient_db._config import Config
from resilient_db._errors import IllegalTransitionError
from resilient_db.transitions import (
    TransitionRules,
    TransitionRulesError,
    install_transition_trigger,
)
from resilient_db.transitions._bypass import GUARD_INFO_KEY
from resilient_db.transitions._guards import install_guard
from resilient_db.transitions._rules import guards_of
from resilient_db.transitions._sql import trigger_names

RULES: dict[str, Any] = {
    "column": "status",
    "transitions": {
        "pending": {"in_progress", "cancelled"},
        "in_progress": {"completed", "failed", "pending"},
        "failed": {"pending"},
    },
    "initial": {"pending"},
}


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "edge_tasks"
    __transitions__ = TransitionRules(**RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


class Job(Base):
    __tablename__ = "edge_jobs"
    __transitions__ = TransitionRules(**RULES)
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


keyed_table = sa.Table(
    "edge_keyed",
    Base.metadata,
    sa.Column("id", sa.Integer, primary_key=True, key="ident"),
    sa.Column("status_db", sa.String(40), key="st", nullable=False, default="pending"),
)


class Keyed(Base):
    """Attribute ``state``, ``Column.key`` ``st``, column name ``status_db``."""

    __table__ = keyed_table
    __transitions__ = TransitionRules(**{**RULES, "column": "state"})
    tid = column_property(keyed_table.c.ident)
    state = column_property(keyed_table.c.st)


class Padded(Base):
    __tablename__ = "edge_padded"
    __transitions__ = TransitionRules(**RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.CHAR(12), default="pending")


class StatusRow(Base):
    __tablename__ = "edge_statuses"
    name: Mapped[str] = mapped_column(primary_key=True)
    tasks: Mapped[list[Linked]] = relationship()  # one-to-many, no backref


class Linked(Base):
    """The status is a foreign key to a table of statuses."""

    __tablename__ = "edge_linked"
    __transitions__ = TransitionRules(**RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.ForeignKey("edge_statuses.name"), default="pending")


class Log(Base):
    __tablename__ = "edge_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int]


@dataclasses.dataclass
class Phase:
    status: str
    note: str


class Phased(Base):
    """The status inside a composite attribute."""

    __tablename__ = "edge_phased"
    __transitions__ = TransitionRules(**RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    phase: Mapped[Phase] = composite(
        mapped_column("status", sa.String(40), default="pending"),
        mapped_column("note", sa.String(40), default=""),
    )


class Finished(Base):
    """A model whose own ``before_insert`` listener (declared with it, as applications do)
    sets the status of a row inserted with all its work done."""

    __tablename__ = "edge_finished"
    __transitions__ = TransitionRules(**RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    progress: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")


@event.listens_for(Finished, "before_insert")
def _finish_on_insert(mapper: Any, connection: Any, target: Finished) -> None:
    if (target.progress or 0) >= 100:
        target.status = "completed"


class Work(Base):
    """Single-table inheritance: ``Strict`` declares rules of its own for the shared column."""

    __tablename__ = "edge_work"
    __transitions__ = TransitionRules(**RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(default="work")
    note: Mapped[str] = mapped_column(default="")
    status: Mapped[str] = mapped_column(sa.String(40), default="pending")
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "work"}  # noqa: RUF012


class Strict(Work):
    __transitions__ = TransitionRules(
        column="status",
        transitions={"pending": {"in_progress"}, "in_progress": {"failed"}},
        initial={"pending"},
    )
    __mapper_args__ = {"polymorphic_identity": "strict"}  # noqa: RUF012


@event.listens_for(Work, "before_update", propagate=True)
def _complete_when_done(mapper: Any, connection: Any, target: Work) -> None:
    if target.note == "done":
        target.status = "completed"  # legal from in_progress for a Work, not for a Strict


class _S(Session):
    pass


install_guard(_S)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    yield from metadata_engine(pg_url, Base)


def _factory(engine: sa.Engine, **config: Any) -> sessionmaker[_S]:
    return sessionmaker(engine, class_=_S, info={GUARD_INFO_KEY: Config(**config)})


def _set_rows(engine: sa.Engine, table: str, rows: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(BYPASS_BY_HAND)
        conn.exec_driver_sql(f"DELETE FROM {table}")
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES {rows}")


def _rows(engine: sa.Engine, table: str) -> dict[Any, str]:
    with engine.connect() as conn:
        return {r[0]: r[-1] for r in conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY 1")}


NO_SYNC = {"synchronize_session": False}


# ------------------------------------------------------------------------------------------------
# bulk UPDATE: what it targets and what it writes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["filter", "raise"])
def test_bulk_update_of_an_alias_is_judged_on_the_alias(engine: sa.Engine, mode: str) -> None:
    """``update(aliased(Task))``: the legal condition names the alias the UPDATE targets (not
    the table, which would join every row of it), and ``values({A.status: ...})`` is seen."""
    sessions = _factory(engine, bulk_update=mode)
    a = aliased(Task)
    illegal = [
        sa.update(a).where(a.id == 1).values(status="pending"),
        sa.update(a).where(a.id == 1).values({a.status: "pending"}),
    ]
    for stmt in illegal:
        _set_rows(engine, "edge_tasks", "(1, '', 'completed'), (2, '', 'pending')")
        with sessions() as s:
            if mode == "raise":
                with pytest.raises(IllegalTransitionError) as info:
                    s.execute(stmt, execution_options=NO_SYNC)
                assert (info.value.pk, info.value.from_state) == (1, "completed")
            else:
                assert s.execute(stmt, execution_options=NO_SYNC).rowcount == 0  # type: ignore[attr-defined]
            s.commit()
        assert _rows(engine, "edge_tasks") == {1: "completed", 2: "pending"}
    with sessions() as s:  # legal: row 2 moves, row 1 (untargeted) is not named
        stmt = sa.update(a).where(a.id == 2).values(status="in_progress")
        assert s.execute(stmt, execution_options=NO_SYNC).rowcount == 1  # type: ignore[attr-defined]
        s.commit()
    assert _rows(engine, "edge_tasks") == {1: "completed", 2: "in_progress"}


@pytest.mark.parametrize("mode", ["filter", "raise"])
def test_bulk_update_by_primary_key_judges_the_state_set_by_values(
    engine: sa.Engine, mode: str
) -> None:
    """A list of parameter sets by primary key whose state comes from the statement's
    ``values()`` (a literal, or a ``bindparam`` each set fills) is judged per row."""
    sessions = _factory(engine, bulk_update=mode)
    cases: list[tuple[Any, list[dict[str, Any]]]] = [
        (sa.update(Task).values(status=sa.bindparam("s")), [{"id": 1, "s": "pending"}]),
        (sa.update(Task).values(status="pending"), [{"id": 1}]),
        (sa.update(Task).values(status="pending"), [{"id": 1, "note": "x"}]),
    ]
    for stmt, sets in cases:
        _set_rows(engine, "edge_tasks", "(1, '', 'completed'), (2, '', 'pending')")
        with sessions() as s:
            if mode == "raise":
                with pytest.raises(IllegalTransitionError) as info:
                    s.execute(stmt, sets)
                assert (info.value.pk, info.value.from_state) == (1, "completed")
            else:
                s.execute(stmt, sets)
            s.commit()
        assert _rows(engine, "edge_tasks") == {1: "completed", 2: "pending"}, stmt
    with sessions() as s:  # legal, by values(): written
        s.execute(sa.update(Task).values(status="in_progress"), [{"id": 2}])
        s.commit()
    assert _rows(engine, "edge_tasks")[2] == "in_progress"


def test_bulk_update_by_primary_key_to_a_sql_expression_is_refused(engine: sa.Engine) -> None:
    _set_rows(engine, "edge_tasks", "(1, '', 'completed')")
    with _factory(engine)() as s, pytest.raises(TransitionRulesError, match="SQL expression"):
        s.execute(sa.update(Task).values(status=sa.func.lower("PENDING")), [{"id": 1}])
    assert _rows(engine, "edge_tasks") == {1: "completed"}


@pytest.mark.parametrize("sync", ["auto", False, "fetch"])
def test_an_execution_parameter_replacing_a_values_literal_is_judged(
    engine: sa.Engine, sync: Any
) -> None:
    """``values(status="completed")`` executed with ``{"status": "cancelled"}`` writes
    ``cancelled`` (SQLAlchemy names the literal's parameter after the column): that is the
    move judged."""
    _set_rows(engine, "edge_tasks", "(1, '', 'in_progress')")
    stmt = sa.update(Task).where(Task.id == 1).values(status="completed")
    with _factory(engine)() as s:  # in_progress -> cancelled: illegal
        s.execute(stmt, {"status": "cancelled"}, execution_options={"synchronize_session": sync})
        s.commit()
    assert _rows(engine, "edge_tasks") == {1: "in_progress"}
    with _factory(engine, bulk_update="raise")() as s:
        options = {"synchronize_session": sync}
        with pytest.raises(IllegalTransitionError) as info:
            s.execute(stmt, {"status": "cancelled"}, execution_options=options)
        assert info.value.to_state == "cancelled"
    # the other way round: the literal is illegal, the parameter that replaces it legal
    _set_rows(engine, "edge_tasks", "(1, '', 'pending')")
    with _factory(engine, bulk_update="raise")() as s:
        bad = sa.update(Task).where(Task.id == 1).values(status="completed")
        s.execute(bad, {"status": "cancelled"}, execution_options={"synchronize_session": sync})
        s.commit()
    assert _rows(engine, "edge_tasks") == {1: "cancelled"}


def test_an_execution_parameter_replacing_a_literal_in_each_parameter_set(
    engine: sa.Engine,
) -> None:
    _set_rows(engine, "edge_tasks", "(1, '', 'in_progress'), (2, '', 'pending')")
    stmt = sa.update(Task).where(Task.id == sa.bindparam("i")).values(status="completed")
    with _factory(engine)() as s:
        s.execute(
            stmt,
            [{"i": 1, "status": "cancelled"}, {"i": 2, "status": "cancelled"}],
            execution_options={"dml_strategy": "orm"},
        )
        s.commit()
    assert _rows(engine, "edge_tasks") == {1: "in_progress", 2: "cancelled"}


@pytest.mark.parametrize("strategy", ["orm", "core_only"])
def test_parameter_sets_moving_one_row_in_turn_are_judged_in_turn(
    engine: sa.Engine, strategy: str, events: list[rdb.SelfHealEvent]
) -> None:
    """An UPDATE with criteria run over several parameter sets, two of which move the same
    row: the second is judged from the state the first leaves the row in, as the UPDATE's
    condition judges it. pending -> in_progress -> completed is legal (raise mode refused it,
    filter mode logged a row as left out); pending -> cancelled -> in_progress is not (raise
    mode let it through unsaid)."""
    stmt = (
        sa.update(Task)
        .where(Task.id == sa.bindparam("i"))
        .values(status=sa.bindparam("s"))
        .execution_options(dml_strategy=strategy, synchronize_session=False)
    )
    legal = [{"i": 2, "s": "in_progress"}, {"i": 2, "s": "completed"}]
    illegal = [{"i": 2, "s": "cancelled"}, {"i": 2, "s": "in_progress"}]
    for mode in ("filter", "raise"):
        _set_rows(engine, "edge_tasks", "(1, '', 'completed'), (2, '', 'pending')")
        with _factory(engine, bulk_update=mode)() as s:
            s.execute(stmt, legal)
            s.commit()
        assert _rows(engine, "edge_tasks") == {1: "completed", 2: "completed"}, mode
    assert not [e for e in events if e.name == "transition_blocked"]
    _set_rows(engine, "edge_tasks", "(1, '', 'completed'), (2, '', 'pending')")
    with _factory(engine, bulk_update="raise")() as s:
        with pytest.raises(IllegalTransitionError) as info:
            s.execute(stmt, illegal)
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (
            2,
            "cancelled",
            "in_progress",
        )
    assert _rows(engine, "edge_tasks") == {1: "completed", 2: "pending"}
    events.clear()
    with _factory(engine)() as s:  # filter: the first set moves the row, the second is left out
        s.execute(stmt, illegal)
        s.commit()
    assert _rows(engine, "edge_tasks") == {1: "completed", 2: "cancelled"}
    assert [e.fields.get("blocked_rows") for e in events if e.name == "transition_blocked"] == [1]


def test_a_column_key_other_than_its_name_and_attribute(engine: sa.Engine) -> None:
    """``Column("status_db", key="st")`` mapped as ``state``: ``values(st=...)`` and an
    execution parameter ``st`` set the column, and are judged."""
    cases: list[tuple[Any, Any]] = [
        (sa.update(Keyed).where(Keyed.tid == 1).values(st="pending"), None),
        (sa.update(Keyed).where(Keyed.tid == 1).values(state="pending"), None),
        (sa.update(Keyed).where(Keyed.tid == 1).values({keyed_table.c.st: "pending"}), None),
        (sa.update(Keyed).where(Keyed.tid == 1), {"st": "pending"}),
        (sa.update(Keyed).where(Keyed.tid == 1).values(state="in_progress"), {"st": "pending"}),
    ]
    for stmt, params in cases:
        _set_rows(engine, "edge_keyed", "(1, 'completed'), (2, 'pending')")
        with _factory(engine)() as s:
            s.execute(stmt, params, execution_options=NO_SYNC)
            s.commit()
        assert _rows(engine, "edge_keyed") == {1: "completed", 2: "pending"}, (stmt, params)
    with _factory(engine)() as s:  # legal through the column key
        stmt = sa.update(Keyed).where(Keyed.tid == 2).values(st="in_progress")
        s.execute(stmt, execution_options=NO_SYNC)
        s.commit()
    assert _rows(engine, "edge_keyed") == {1: "completed", 2: "in_progress"}


@pytest.mark.parametrize("mode", ["filter", "raise"])
def test_a_values_key_naming_the_column_by_its_key_alone(engine: sa.Engine, mode: str) -> None:
    """SQLAlchemy matches a ``values()`` key to the UPDATE's columns by its key, whatever
    table the key comes from: ``column("st")``, ``literal_column("st")``, a lightweight
    ``table()``'s column or another model's attribute keyed ``st`` all set ``Keyed.state``,
    and are judged."""
    sessions = _factory(engine, bulk_update=mode)
    keys: list[Any] = [
        sa.column("st"),
        sa.literal_column("st"),
        sa.table("edge_keyed", sa.column("st")).c.st,
        sa.Table("other", sa.MetaData(), sa.Column("st", sa.String)).c.st,
    ]
    for key in keys:
        _set_rows(engine, "edge_keyed", "(1, 'completed'), (2, 'pending')")
        stmt = sa.update(Keyed).where(Keyed.tid == 1).values({key: "pending"})
        with sessions() as s:
            if mode == "raise":
                with pytest.raises(IllegalTransitionError) as info:
                    s.execute(stmt, execution_options=NO_SYNC)
                assert (info.value.pk, info.value.from_state) == (1, "completed")
            else:
                s.execute(stmt, execution_options=NO_SYNC)
            s.commit()
        assert _rows(engine, "edge_keyed") == {1: "completed", 2: "pending"}, key
    with sessions() as s:  # legal through a column of its key
        stmt = sa.update(Keyed).where(Keyed.tid == 2).values({sa.column("st"): "in_progress"})
        s.execute(stmt, execution_options=NO_SYNC)
        s.commit()
    assert _rows(engine, "edge_keyed") == {1: "completed", 2: "in_progress"}
    # another mapped column of a key of its own is not the guarded one
    stmt = sa.update(Task).where(Task.id == 1).values({sa.column("note"): "x"})
    _set_rows(engine, "edge_tasks", "(1, '', 'completed')")
    with sessions() as s:
        s.execute(stmt, execution_options=NO_SYNC)
        s.commit()
    assert _rows(engine, "edge_tasks") == {1: "completed"}


def test_another_models_attribute_as_a_values_key_is_judged(engine: sa.Engine) -> None:
    """``update(Task).values({Job.status: ...})``: SQLAlchemy sets ``Task.status`` (its key),
    so the move is judged as Task's."""
    _set_rows(engine, "edge_tasks", "(1, '', 'completed'), (2, '', 'pending')")
    with _factory(engine)() as s:
        s.execute(
            sa.update(Task).where(Task.id == 1).values({Job.status: "pending"}),
            execution_options=NO_SYNC,
        )
        s.execute(
            sa.update(Task).where(Task.id == 2).values({Job.status: "in_progress"}),
            execution_options=NO_SYNC,
        )
        s.commit()
    assert _rows(engine, "edge_tasks") == {1: "completed", 2: "in_progress"}


@pytest.mark.parametrize("mode", ["filter", "raise"])
def test_bulk_update_by_primary_key_of_a_status_inside_a_composite(
    engine: sa.Engine, mode: str
) -> None:
    """``[{"id": 1, "phase": Phase("pending", ...)}]``: SQLAlchemy writes the composite's
    status column, so the move is judged."""
    sessions = _factory(engine, bulk_update=mode)
    _set_rows(engine, "edge_phased", "(1, 'completed', ''), (2, 'pending', '')")
    with sessions() as s:
        sets = [{"id": 1, "phase": Phase("pending", "reopened")}]
        if mode == "raise":
            with pytest.raises(IllegalTransitionError) as info:
                s.execute(sa.update(Phased), sets)
            assert (info.value.pk, info.value.from_state, info.value.to_state) == (
                1,
                "completed",
                "pending",
            )
        else:
            s.execute(sa.update(Phased), sets)
        s.commit()
    assert _rows(engine, "edge_phased") == {1: "", 2: ""}
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT status FROM edge_phased WHERE id = 1").scalar() == (
            "completed"
        )
    with sessions() as s:  # legal: written
        s.execute(sa.update(Phased), [{"id": 2, "phase": Phase("in_progress", "started")}])
        s.commit()
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, status, note FROM edge_phased ORDER BY id").all()
    assert [tuple(r) for r in rows] == [(1, "completed", ""), (2, "in_progress", "started")]


# ------------------------------------------------------------------------------------------------
# primary keys given in another Python type
# ------------------------------------------------------------------------------------------------

U = uuid.UUID("3f2a7c1e-0000-4000-8000-000000000001")


@pytest.mark.parametrize("mode", ["filter", "raise"])
def test_bulk_update_by_primary_key_given_as_a_string(engine: sa.Engine, mode: str) -> None:
    """``[{"id": "1", ...}]`` for an integer key, ``str(uuid)`` for a UUID key: the row is
    found as the UPDATE finds it, and its move judged."""
    sessions = _factory(engine, bulk_update=mode)
    _set_rows(engine, "edge_tasks", "(1, '', 'completed'), (2, '', 'pending')")
    _set_rows(engine, "edge_jobs", f"('{U}', 'completed')")
    for model, key in ((Task, "1"), (Job, str(U))):
        with sessions() as s:
            if mode == "raise":
                with pytest.raises(IllegalTransitionError) as info:
                    s.execute(sa.update(model), [{"id": key, "status": "pending"}])
                assert info.value.from_state == "completed"
            else:
                s.execute(sa.update(model), [{"id": key, "status": "pending"}])
            s.commit()
    assert _rows(engine, "edge_tasks") == {1: "completed", 2: "pending"}
    assert _rows(engine, "edge_jobs") == {U: "completed"}
    with sessions() as s:  # legal, the key as a string
        s.execute(sa.update(Task), [{"id": "2", "status": "in_progress"}])
        s.commit()
    assert _rows(engine, "edge_tasks")[2] == "in_progress"


def test_flush_of_a_row_keyed_by_a_uuid_given_as_a_string(engine: sa.Engine) -> None:
    """An object whose identity key holds the UUID as a string (as given by the application),
    its status expired: the state the guard reads is matched to it by the database."""
    sessions = _factory(engine)
    with sessions() as s:
        job = Job(id=str(U))
        s.add(job)
        s.commit()
        job.status = "in_progress"  # legal; the status was expired by the commit
        s.commit()
        job.status = "pending"  # legal again
        s.commit()
        s.expire(job, ["status"])
        job.status = "completed"  # pending -> completed: illegal
        with pytest.raises(IllegalTransitionError) as info:
            s.commit()
        assert (info.value.from_state, info.value.to_state) == ("pending", "completed")
    assert _rows(engine, "edge_jobs") == {U: "pending"}


# ------------------------------------------------------------------------------------------------
# column types: CHAR(n), plain enum members, server defaults
# ------------------------------------------------------------------------------------------------


def test_a_char_column_is_judged_without_its_padding(engine: sa.Engine) -> None:
    """character(n) gives its values back padded with spaces: the states are compared as the
    database's text (without them), on the flush and on a bulk UPDATE by primary key."""
    raising = _factory(engine, bulk_update="raise")
    with raising() as s:
        s.add_all([Padded(id=1), Padded(id=2)])
        s.commit()
    with raising() as s:
        task = s.get(Padded, 1)
        assert task is not None
        assert task.status == "pending     "
        task.status = "in_progress"
        s.commit()
        s.execute(sa.update(Padded), [{"id": 2, "status": "in_progress"}])
        s.commit()
    with raising() as s:
        task = s.get(Padded, 1)
        assert task is not None
        task.status = "cancelled"  # in_progress -> cancelled: illegal
        with pytest.raises(IllegalTransitionError) as info:
            s.commit()
        assert info.value.to_state == "cancelled"
    assert _rows(engine, "edge_padded") == {1: "in_progress ", 2: "in_progress "}


def _compile(name: str, rules: TransitionRules, column: Any) -> None:
    reg = registry()
    try:
        ns = {
            "__tablename__": name,
            "id": mapped_column(sa.Integer, primary_key=True),
            "status": column,
            "__transitions__": rules,
        }
        guards_of(reg.mapped(type(name.title(), (), ns)))
    finally:
        reg.dispose()


class Plain(enum.Enum):
    PENDING = "pending"
    DONE = "done"


class Mixed(str, enum.Enum):
    PENDING = "pending"
    DONE = "done"


def test_type_mistakes_are_refused_when_the_rules_compile() -> None:
    """Rules no row could follow: members of a plain enum.Enum on a column that is not an
    Enum (the driver writes their names), a CHAR state with trailing spaces (read back
    without them), a server_default outside the initial states."""
    by_member = TransitionRules(
        column="status", transitions={Plain.PENDING: {Plain.DONE}}, initial={Plain.PENDING}
    )
    with pytest.raises(TransitionRulesError, match=r"enum.Enum Plain.*its name \('DONE'\)"):
        _compile("e1", by_member, mapped_column(sa.String(20)))
    _compile("e2", by_member, mapped_column(sa.Enum(Plain, name="plain_e2")))  # by name: fine
    by_mixin = TransitionRules(
        column="status", transitions={Mixed.PENDING: {Mixed.DONE}}, initial={Mixed.PENDING}
    )
    _compile("e3", by_mixin, mapped_column(sa.String(20)))  # a str: written as its value
    padded = TransitionRules(column="status", transitions={"a ": {"b"}}, initial={"a "})
    with pytest.raises(TransitionRulesError, match="ends in a space"):
        _compile("e4", padded, mapped_column(sa.CHAR(4)))
    plain = TransitionRules(column="status", transitions={"new": {"done"}}, initial={"new"})
    with pytest.raises(TransitionRulesError, match="server_default 'done' is not an initial"):
        _compile("e5", plain, mapped_column(sa.String(10), server_default="done"))
    _compile("e6", plain, mapped_column(sa.String(10), server_default="new"))
    _compile("e7", plain, mapped_column(sa.String(10), default="new", server_default="done"))


class Same(enum.Enum):
    """A plain enum.Enum whose names are its values: written by name, the value arrives."""

    pending = "pending"
    in_progress = "in_progress"
    cancelled = "cancelled"


def test_a_plain_enum_whose_names_are_its_values_is_accepted(engine: sa.Engine) -> None:
    same = TransitionRules(
        column="status",
        transitions={Same.pending: {Same.in_progress, Same.cancelled}},
        initial={Same.pending},
    )
    _compile("e8", same, mapped_column(sa.String(20)))
    by_number = TransitionRules(
        column="status",
        transitions={enum.Enum("N", {"ONE": 1}).ONE: {2}},  # type: ignore[attr-defined]
        initial={2},
    )
    with pytest.raises(TransitionRulesError, match=r"its name \('ONE'\)"):
        _compile("e9", by_number, mapped_column(sa.Integer))
    _set_rows(engine, "edge_tasks", "(1, '', 'pending')")
    with _factory(engine)() as s:
        task = s.get(Task, 1)
        assert task is not None
        task.status = Same.in_progress  # type: ignore[assignment]
        s.commit()
    with _factory(engine)() as s:
        task = s.get(Task, 1)
        assert task is not None
        task.status = Same.cancelled  # type: ignore[assignment]  # in_progress -> cancelled
        with pytest.raises(IllegalTransitionError):
            s.commit()
    assert _rows(engine, "edge_tasks") == {1: "in_progress"}


def test_a_server_default_is_compared_as_postgresql_stores_it() -> None:
    """``'00'`` and ``'+1'`` are 0 and 1 in an integer column, ``'f'`` and ``'no'`` false in a
    boolean one; a literal whose value can't be told here is left to the database."""
    zero = TransitionRules(column="status", transitions={0: {1}}, initial={0})
    _compile("d1", zero, mapped_column(sa.Integer, server_default="00"))
    _compile("d2", zero, mapped_column(sa.Integer, server_default=" -0 "))
    one = TransitionRules(column="status", transitions={1: {2}}, initial={1})
    _compile("d3", one, mapped_column(sa.SmallInteger, server_default="+1"))
    with pytest.raises(TransitionRulesError, match="server_default '2' is not an initial"):
        _compile("d4", one, mapped_column(sa.Integer, server_default="2"))
    true = TransitionRules(column="status", transitions={True: {False}}, initial={True})
    for spelled in ("f", "no", "OFF", "0", " false "):
        with pytest.raises(TransitionRulesError, match="is not an initial state"):
            _compile("d5", true, mapped_column(sa.Boolean, server_default=spelled))
    for spelled in ("t", "Yes", "on", "1", "tru"):
        _compile("d6", true, mapped_column(sa.Boolean, server_default=spelled))
    _compile("d7", true, mapped_column(sa.Boolean, server_default="o"))  # (not judged here)


def test_a_plain_enum_member_written_to_a_string_column_is_refused(engine: sa.Engine) -> None:
    """The driver would write the member's name (``'IN_PROGRESS'``), no state of the rules,
    though its value (``'in_progress'``) is a legal move."""

    class St(enum.Enum):
        IN_PROGRESS = "in_progress"

    _set_rows(engine, "edge_tasks", "(1, '', 'pending')")
    with _factory(engine)() as s:
        task = s.get(Task, 1)
        assert task is not None
        task.status = St.IN_PROGRESS  # type: ignore[assignment]
        with pytest.raises(IllegalTransitionError, match="by its name"):
            s.commit()
    assert _rows(engine, "edge_tasks") == {1: "pending"}


# ------------------------------------------------------------------------------------------------
# a status written during the flush, of a row the guard saw unchanged
# ------------------------------------------------------------------------------------------------


def test_a_status_set_by_a_later_before_flush_listener_is_judged(engine: sa.Engine) -> None:
    """An application's ``before_flush`` listener, added after the guard's, that sets the
    status of a task no one changed in the unit: the move is judged from the state the row
    holds (an illegal one is never sent), a legal one written."""

    def reopen(session: Session, context: Any, instances: Any) -> None:
        for obj in list(session.new):
            if isinstance(obj, Log):
                task = session.get(Task, obj.task_id)
                assert task is not None
                task.status = "pending"

    _set_rows(engine, "edge_tasks", "(1, '', 'completed'), (2, '', 'in_progress')")
    event.listen(_S, "before_flush", reopen)
    try:
        with _factory(engine)() as s:  # completed -> pending: illegal
            s.add(Log(id=1, task_id=1))
            statements = Sent(engine)
            with pytest.raises(IllegalTransitionError) as info:
                s.commit()
            assert (info.value.pk, info.value.from_state, info.value.to_state) == (
                1,
                "completed",
                "pending",
            )
            assert not statements.matching("UPDATE")
        with _factory(engine)() as s:  # in_progress -> pending: legal
            s.add(Log(id=2, task_id=2))
            s.commit()
    finally:
        event.remove(_S, "before_flush", reopen)
    assert _rows(engine, "edge_tasks") == {1: "completed", 2: "pending"}


def test_a_new_rows_status_set_by_a_before_insert_listener_is_judged(engine: sa.Engine) -> None:
    """The model's ``before_insert`` listener sets a state no new row starts in: refused
    before the INSERT is sent, as a status set at ``session.add`` is; a row it leaves in an
    initial state is inserted. Sessions the guard does not follow insert as they did."""
    with _factory(engine)() as s:
        s.add(Finished(id=1, progress=100))
        statements = Sent(engine)
        with pytest.raises(IllegalTransitionError) as info:
            s.commit()
        statements.stop()
        err = info.value
        assert (err.model, err.pk, err.inserted, err.from_state, err.to_state, err.via) == (
            "Finished",
            1,
            True,
            None,
            "completed",
            "flush",
        )
        assert not statements.matching("INSERT")
    with _factory(engine)() as s:
        s.add(Finished(id=2, progress=10))
        s.commit()
    with sessionmaker(engine)() as s:  # a plain session: the guard does not act
        s.add(Finished(id=3, progress=100))
        s.commit()
    assert _rows(engine, "edge_finished") == {2: "pending", 3: "completed"}


def test_a_status_foreign_key_moved_through_a_collection_is_judged(engine: sa.Engine) -> None:
    """The status is a foreign key; appending the task to another status's one-to-many
    collection makes the ORM write it during the flush (the task itself looked unchanged)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO edge_statuses VALUES "
            "('pending'), ('in_progress'), ('completed'), ('cancelled'), ('failed')"
        )
        conn.exec_driver_sql("INSERT INTO edge_linked VALUES (1, 'completed'), (2, 'pending')")
    with _factory(engine)() as s:
        done, pending = s.get(Linked, 1), s.get(StatusRow, "pending")
        assert done is not None
        assert pending is not None
        pending.tasks.append(done)  # completed -> pending: illegal
        with pytest.raises(IllegalTransitionError) as info:
            s.commit()
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (
            1,
            "completed",
            "pending",
        )
    with _factory(engine)() as s:
        fresh = s.get(Linked, 2)
        running = s.get(StatusRow, "in_progress")
        assert fresh is not None
        assert running is not None
        running.tasks.append(fresh)  # pending -> in_progress: legal
        s.commit()
    assert _rows(engine, "edge_linked") == {1: "completed", 2: "in_progress"}


def test_a_new_rows_status_foreign_key_set_through_a_collection_is_judged(
    engine: sa.Engine,
) -> None:
    """A new task appended to a status's one-to-many collection: the ORM writes its status
    during the flush, so it must be an initial state then."""
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO edge_statuses VALUES ('pending'), ('completed')")
    with _factory(engine)() as s:
        done = s.get(StatusRow, "completed")
        assert done is not None
        done.tasks.append(Linked(id=1))
        with pytest.raises(IllegalTransitionError) as info:
            s.commit()
        assert (info.value.pk, info.value.inserted, info.value.to_state) == (1, True, "completed")
    with _factory(engine)() as s:
        pending = s.get(StatusRow, "pending")
        assert pending is not None
        pending.tasks.append(Linked(id=2))
        s.commit()
    assert _rows(engine, "edge_linked") == {2: "pending"}


def test_a_status_set_during_the_flush_is_judged_by_the_rows_own_subclass_rules(
    engine: sa.Engine,
) -> None:
    """A status a ``before_update`` listener sets during the flush is judged by the rules of
    the row's own class, whichever class of the hierarchy the flush met first (a
    single-table subclass declaring stricter rules can have no trigger: the flush guard is
    all there is). Before, every row of the table was judged by the first class's rules: a
    Strict row changed by the application (to a state its rules allow) and moved on by the
    listener went through to a state they forbid when a Work row was updated in the same
    flush."""
    _set_rows(
        engine, "edge_work", "(1, 'work', '', 'in_progress'), (2, 'strict', '', 'in_progress')"
    )
    with _factory(engine)() as s:
        work, strict = s.get_one(Work, 1), s.get_one(Work, 2)
        assert isinstance(strict, Strict)
        work.note = "x"  # a Work row updated, its status left alone
        strict.status = "failed"  # legal for a Strict; the listener then writes "completed"
        strict.note = "done"
        statements = Sent(engine)
        with pytest.raises(IllegalTransitionError) as info:
            s.commit()
        err = info.value
        assert (err.model, err.pk, err.from_state, err.to_state) == (
            "Strict",
            2,
            "in_progress",
            "completed",
        )
        assert "allowed from here: 'failed'" in err.reason
        assert not [q for q in statements.matching("UPDATE") if "status" in q]
    assert _rows(engine, "edge_work") == {1: "in_progress", 2: "in_progress"}


def test_a_status_set_during_the_flush_of_rows_no_one_changed_is_judged_per_class(
    engine: sa.Engine,
) -> None:
    """The same for rows whose status only the listener sets (read under lock first): the
    Work row may complete, the Strict row may not, and the error names that row."""
    _set_rows(
        engine, "edge_work", "(1, 'work', '', 'in_progress'), (2, 'strict', '', 'in_progress')"
    )
    with _factory(engine)() as s:
        rows = [s.get_one(Work, 1), s.get_one(Work, 2)]
        for row in rows:
            row.note = "done"
        with pytest.raises(IllegalTransitionError) as info:
            s.commit()
        assert (info.value.model, info.value.pk, info.value.to_state) == ("Strict", 2, "completed")
    assert _rows(engine, "edge_work") == {1: "in_progress", 2: "in_progress"}
    with _factory(engine)() as s:
        rows = [s.get_one(Work, 1), s.get_one(Work, 2)]
        rows[0].note = "done"  # completes (legal for a Work)
        rows[1].note = "x"
        s.commit()
    assert _rows(engine, "edge_work") == {1: "completed", 2: "in_progress"}


# ------------------------------------------------------------------------------------------------
# partitioned tables: the trigger's limit is said at install
# ------------------------------------------------------------------------------------------------


def test_installing_on_a_table_others_inherit_from_warns_of_their_rows(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A table's row triggers fire for its own rows only: an UPDATE of the guarded table that
    reaches the rows of a table inheriting from it (INHERITS) moved them past the rules with
    nothing said. Installing says so, naming those tables (not the partitions of a
    partitioned table, which get the trigger)."""
    reg = registry()
    try:
        model = reg.mapped(
            type(
                "Inherited",
                (),
                {
                    "__tablename__": "edge_inherited",
                    "__transitions__": TransitionRules(**RULES),
                    "id": mapped_column(sa.Integer, primary_key=True),
                    "status": mapped_column(sa.String(20)),
                },
            )
        )
        model.__table__.create(engine)
        caplog.set_level(logging.WARNING, logger="resilient_db.transitions")
        install_transition_trigger(engine, model)
        assert not [r for r in caplog.records if "INHERITS" in r.getMessage()]
        with engine.begin() as conn:
            for child in ("edge_inherited_2024", "edge_inherited_2023"):
                conn.exec_driver_sql(f"CREATE TABLE {child} () INHERITS (edge_inherited)")
        for target in (engine, None):
            caplog.clear()
            if target is None:
                with engine.begin() as conn:
                    install_transition_trigger(conn, model)
            else:
                install_transition_trigger(target, model)
            [record] = [r for r in caplog.records if "INHERITS" in r.getMessage()]
            message = record.getMessage()
            assert "table 'edge_inherited': edge_inherited_2023, edge_inherited_2024 inherit" in (
                message
            )
            assert "does not judge the rows of those tables" in message
    finally:
        reg.dispose()


def test_drift_names_a_trigger_disabled_on_one_partition(engine: sa.Engine) -> None:
    """PostgreSQL clones the triggers of a partitioned table onto each partition (a
    sub-partition too), and each clone can be disabled on its own: an illegal move of a row in
    that partition is then committed. Drift looked at the partitioned table only, and said
    nothing; it names the partition, and installing again enables the clone."""
    reg = registry()
    try:
        model = reg.mapped(
            type(
                "PartClone",
                (),
                {
                    "__tablename__": "edge_part_clone",
                    "__table_args__": {"postgresql_partition_by": "LIST (region)"},
                    "__transitions__": TransitionRules(**RULES),
                    "id": mapped_column(sa.Integer, primary_key=True),
                    "region": mapped_column(sa.String(10), primary_key=True),
                    "status": mapped_column(sa.String(20)),
                },
            )
        )
        model.__table__.create(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE edge_part_clone_eu PARTITION OF edge_part_clone "
                "FOR VALUES IN ('eu') PARTITION BY LIST (id)"
            )
            conn.exec_driver_sql(
                "CREATE TABLE edge_part_clone_eu1 PARTITION OF edge_part_clone_eu FOR VALUES IN (1)"
            )
            conn.exec_driver_sql(
                "CREATE TABLE edge_part_clone_us PARTITION OF edge_part_clone FOR VALUES IN ('us')"
            )
        install_transition_trigger(engine, model)
        names = trigger_names(guards_of(model)[0])
        with engine.begin() as conn:
            assert rdb.trigger_drift(conn, model) is None
            conn.exec_driver_sql(
                f"ALTER TABLE edge_part_clone_eu1 DISABLE TRIGGER {names.update_trigger}"
            )
            conn.exec_driver_sql(
                f"ALTER TABLE edge_part_clone_us ENABLE REPLICA TRIGGER {names.insert_trigger}"
            )
            drift = rdb.trigger_drift(conn, model)
        assert drift is not None
        assert (
            f"on partition edge_part_clone_eu1, trigger {names.update_trigger} is disabled" in drift
        )
        assert (
            f"on partition edge_part_clone_us, trigger {names.insert_trigger} fires only in "
            "sessions replaying replication" in drift
        )
        assert "edge_part_clone_eu," not in drift
        with engine.begin() as conn:  # the table's own trigger too: said once, for the table
            conn.exec_driver_sql(
                f"ALTER TABLE edge_part_clone DISABLE TRIGGER {names.update_trigger}"
            )
            drift = rdb.trigger_drift(conn, model)
        assert drift is not None
        assert f"trigger {names.update_trigger} is disabled" in drift
        assert "edge_part_clone_eu1" not in drift
        install_transition_trigger(engine, model)
        with engine.begin() as conn:
            assert rdb.trigger_drift(conn, model) is None
    finally:
        reg.dispose()


def test_installing_on_a_partitioned_table_warns_of_moves_across_partitions(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """An UPDATE moving a row to another partition is a DELETE and an INSERT: no UPDATE
    trigger fires. Installing says so, for a table the model declares partitioned and for one
    partitioned in the database only."""
    reg = registry()
    try:
        rules = TransitionRules(**RULES)
        declared = reg.mapped(
            type(
                "PartDeclared",
                (),
                {
                    "__tablename__": "edge_part_declared",
                    "__table_args__": {"postgresql_partition_by": "LIST (region)"},
                    "__transitions__": rules,
                    "id": mapped_column(sa.Integer, primary_key=True),
                    "region": mapped_column(sa.String(10), primary_key=True),
                    "status": mapped_column(sa.String(20)),
                },
            )
        )
        undeclared = reg.mapped(
            type(
                "PartInDb",
                (),
                {
                    "__tablename__": "edge_part_db",
                    "__transitions__": rules,
                    "id": mapped_column(sa.Integer, primary_key=True),
                    "region": mapped_column(sa.String(10), primary_key=True),
                    "status": mapped_column(sa.String(20)),
                },
            )
        )
        declared.__table__.create(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE edge_part_db (id int, region varchar(10), status varchar(20), "
                "PRIMARY KEY (id, region)) PARTITION BY LIST (region)"
            )
        caplog.set_level(logging.WARNING, logger="resilient_db.transitions")
        for model, table in ((declared, "edge_part_declared"), (undeclared, "edge_part_db")):
            caplog.clear()
            install_transition_trigger(engine, model)
            [record] = [r for r in caplog.records if "partitioned table" in r.getMessage()]
            assert f"partitioned table {table!r}:" in record.getMessage()
            assert "another partition" in record.getMessage()
        caplog.clear()
        install_transition_trigger(engine, Task)  # not partitioned: nothing said
        assert not [r for r in caplog.records if "partitioned" in r.getMessage()]
    finally:
        reg.dispose()
