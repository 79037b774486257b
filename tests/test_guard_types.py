"""Status columns whose type converts the value, and state values the column converts: the
flush guard, the bulk-UPDATE guard and the trigger judge what the column stores, and agree.

- A ``TypeDecorator`` storing the states as codes (``'pending'`` as ``'P'``): the trigger
  compared the stored codes with the Python spellings and refused every write (the first
  insert in the initial state too), while the session guards let them through; its errors named
  the codes; a ``String(5)`` code column and an ``Integer`` one were refused at mapping (the
  length and integer checks read the Python spelling). The trigger now compares the codes the
  type stores for the declared states, and its errors name the declared states.
- A ``TypeDecorator`` whose stored value can't be told in Python (a SQL-side conversion, a
  conversion that fails for a declared state) is refused at mapping, naming the model, the
  column and why.
- An integer state given as ``1.0`` or ``Decimal(1)``: PostgreSQL stores 1, which the trigger
  takes; the flush guard refused the move and the bulk guard left the row out. All three take it
  now; a value that is no integer is refused at flush saying so.
- Messages: a ``CHAR(n)`` state without its padding; the state the row was in as declared (a
  ``str`` enum's member, as the new state is); the trigger's refusal lists the moves allowed.

Real server."""

from __future__ import annotations

import decimal
import enum
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from scenarios import refused_by_trigger
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, registry
from sqlalchemy.types import TypeDecorator

import resilient_db as rdb
from resilient_db.transitions import TransitionTrigger
from resilient_db.transitions._rules import guards_of


class Code(TypeDecorator[str]):
    """``pending``/``running``/``done`` stored as ``P``/``R``/``D`` (a column of 5 characters:
    the Python spellings would not fit)."""

    impl = sa.String(5)
    cache_ok = True
    CODES: ClassVar[dict[str, str]] = {"pending": "P", "running": "R", "done": "D"}
    NAMES: ClassVar[dict[str, str]] = {v: k for k, v in CODES.items()}

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.CODES.get(value, value)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.NAMES.get(value, value)


class Number(TypeDecorator[str]):
    """The same states stored as small integers."""

    impl = sa.Integer
    cache_ok = True
    NUMBERS: ClassVar[dict[str, int]] = {"pending": 0, "running": 1, "done": 2}
    NAMES: ClassVar[dict[int, str]] = {v: k for k, v in NUMBERS.items()}

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.NUMBERS[value]

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.NAMES[value]


RULES: dict[str, Any] = {
    "transitions": {"pending": {"running"}, "running": {"done"}},
    "initial": {"pending"},
}


class Base(DeclarativeBase):
    pass


class Coded(Base):
    __tablename__ = "coded"
    __transitions__ = rdb.TransitionRules(column="status", **RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(Code(), default="pending")


class Numbered(Base):
    __tablename__ = "numbered"
    __transitions__ = rdb.TransitionRules(column="status", **RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(Number(), default="pending")


class Phased(Base):
    __tablename__ = "phased"
    __transitions__ = rdb.TransitionRules(column="phase", transitions={0: {1}, 1: {2}}, initial={0})
    id: Mapped[int] = mapped_column(primary_key=True)
    phase: Mapped[int] = mapped_column(default=0)


class Padded(Base):
    __tablename__ = "padded"
    __transitions__ = rdb.TransitionRules(
        column="status", transitions={"new": {"run"}, "run": {"done"}}, initial={"new"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.CHAR(6), default="new")


class Stage(str, enum.Enum):
    draft = "draft"
    live = "live"


class Page(Base):
    __tablename__ = "pages"
    __transitions__ = rdb.TransitionRules(
        column="stage", transitions={Stage.draft: {Stage.live}}, initial={Stage.draft}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    stage: Mapped[str] = mapped_column(sa.String(10), default=Stage.draft)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        for model in (Coded, Numbered, Phased, Padded, Page):
            rdb.install_transition_trigger(conn, model)
    yield eng
    eng.dispose()


def stored(engine: sa.Engine, table: str, column: str = "status") -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT id, {column} FROM {table} ORDER BY id")
        return [tuple(r) for r in rows]


# --- TypeDecorator columns -------------------------------------------------------------------


@pytest.mark.parametrize(("model", "codes"), [(Coded, ["P", "R"]), (Numbered, [0, 1])])
def test_a_converting_column_takes_every_legal_write_on_every_path(
    engine: sa.Engine, service: str, model: Any, codes: list[Any]
) -> None:
    """Insert in the initial state, ORM move, bulk UPDATE: all legal, all written (the trigger
    refused each with ``'P' -> 'R' (blocked at db)``)."""
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add_all([model(id=1, status="pending"), model(id=2)]))

    def move(session: Session) -> None:
        session.get_one(model, 1).status = "running"

    Sessions.run(move)
    moved = Sessions.run(
        lambda s: s.execute(sa.update(model).where(model.id == 2).values(status="running")).rowcount
    )
    assert moved == 1
    assert stored(engine, model.__tablename__) == [(1, codes[1]), (2, codes[1])]
    with engine.connect() as conn:
        assert rdb.trigger_drift(conn, model) is None


@pytest.mark.parametrize("model", [Coded, Numbered])
def test_a_converting_column_refuses_illegal_moves_naming_the_declared_states(
    engine: sa.Engine, service: str, model: Any
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add(model(id=1, status="pending")))

    def skip(session: Session) -> None:
        session.get_one(model, 1).status = "done"

    with pytest.raises(rdb.IllegalTransitionError) as at_flush:
        Sessions.run(skip)
    assert (at_flush.value.from_state, at_flush.value.to_state) == ("pending", "done")
    assert at_flush.value.via == "flush"
    table = model.__table__
    with pytest.raises(rdb.IllegalTransitionError) as by_trigger:
        Sessions.run(
            lambda s: s.execute(table.update().where(table.c.id == 1).values(status="done"))
        )
    err = by_trigger.value
    assert (err.from_state, err.to_state, err.via) == ("pending", "done", "db")
    assert "allowed from here: 'running'" in err.reason
    assert "'P'" not in str(err)
    assert "'D'" not in str(err)
    with pytest.raises(rdb.IllegalTransitionError) as inserted:
        Sessions.run(lambda s: s.execute(sa.insert(table).values(id=9, status="running")))
    assert (inserted.value.to_state, inserted.value.inserted) == ("running", True)
    assert stored(engine, model.__tablename__) == [(1, "P" if model is Coded else 0)]


def test_a_trigger_comparing_the_python_spellings_is_drift(engine: sa.Engine) -> None:
    """What an earlier release installed for ``Coded`` (its literals the Python spellings,
    which no stored code ever equals) is told apart from the trigger of its rules (it was
    reported as no drift), and an install replaces it."""
    earlier = TransitionTrigger(
        model="Coded",
        table="coded",
        primary_key="id",
        rules=Coded.__transitions__,
        type_=sa.String(20),
    )
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, earlier)
        assert rdb.trigger_drift(conn, Coded) is not None
        rdb.install_transition_trigger(conn, Coded)
        assert rdb.trigger_drift(conn, Coded) is None


def test_a_converting_column_is_judged_by_the_codes_it_stores() -> None:
    (guard,) = guards_of(Coded)
    assert guard.key("pending") == "P"
    assert guard.state("P") == "pending"
    assert "IN ('P')" in rdb.transition_trigger_sql(Coded)
    assert "'pending'" not in rdb.transition_trigger_sql(Coded)
    (numbered,) = guards_of(Numbered)
    assert numbered.key("done") == "2"


class PerDialect(TypeDecorator[str]):
    """Stores the states as codes in a column of PostgreSQL's own type (its impl is another
    database's)."""

    impl = sa.Integer
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> Any:
        return dialect.type_descriptor(
            sa.String(1) if dialect.name == "postgresql" else sa.Integer()
        )

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else value[0].upper()


def test_the_stored_values_are_those_of_postgresqls_column_type() -> None:
    reg = registry()
    try:
        attrs = {
            "__tablename__": "per_dialect",
            "__transitions__": rdb.TransitionRules(column="status", **RULES),
            "id": mapped_column(sa.Integer, primary_key=True),
            "status": mapped_column(PerDialect()),
        }
        (guard,) = guards_of(reg.mapped(type("Coded1", (), attrs)))
        assert (guard.key("pending"), guard.key("running")) == ("P", "R")
    finally:
        reg.dispose()


class Upper(TypeDecorator[str]):
    """Converts in SQL (``upper(:param)``): what it stores can't be told in Python."""

    impl = sa.String(20)
    cache_ok = True

    def bind_expression(self, bindvalue: Any) -> Any:
        return sa.func.upper(bindvalue)


class Strict(TypeDecorator[str]):
    """Knows only some of the declared states."""

    impl = sa.String(20)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return {"pending": "p"}[value]


class Folding(TypeDecorator[str]):
    """Stores two declared states as one value."""

    impl = sa.String(20)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else value.lower()


@pytest.mark.parametrize(
    ("type_", "message"),
    [
        (Upper(), r"Odd\.__transitions__ \(column 'status'\).*converts values in SQL"),
        (Strict(), r"Odd\.__transitions__ \(column 'status'\): state 'PENDING'.*KeyError"),
        (Folding(), r"Odd\.__transitions__ \(column 'status'\): states 'PENDING' and 'pending'"),
    ],
)
def test_a_type_whose_stored_values_cant_be_told_is_refused_at_mapping(
    type_: Any, message: str
) -> None:
    reg = registry()
    try:
        attrs = {
            "__tablename__": "odd",
            "__transitions__": rdb.TransitionRules(
                column="status",
                transitions={"pending": {"running"}, "PENDING": {"running"}},
                initial={"pending", "PENDING"},
            ),
            "id": mapped_column(sa.Integer, primary_key=True),
            "status": mapped_column(type_),
        }
        with pytest.raises(rdb.TransitionRulesError, match=message):
            guards_of(reg.mapped(type("Odd", (), attrs)))
    finally:
        reg.dispose()


# --- integer states given as other numbers ---------------------------------------------------


@pytest.mark.parametrize("value", [1.0, decimal.Decimal(1), decimal.Decimal("1.000")])
def test_an_integral_number_is_the_integer_state_on_every_path(
    engine: sa.Engine, service: str, value: Any
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add_all([Phased(id=1), Phased(id=2), Phased(id=3)]))

    def move(session: Session) -> None:
        session.get_one(Phased, 1).phase = value

    Sessions.run(move)
    bulk = Sessions.run(
        lambda s: s.execute(sa.update(Phased).where(Phased.id == 2).values(phase=value)).rowcount
    )
    core = Sessions.run(
        lambda s: (
            s.execute(
                Phased.__table__.update().where(Phased.__table__.c.id == 3).values(phase=value)
            ).rowcount
        )
    )
    assert (bulk, core) == (1, 1)
    assert stored(engine, "phased", "phase") == [(1, 1), (2, 1), (3, 1)]


def test_a_number_that_is_no_integer_is_refused_saying_so(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add(Phased(id=1)))

    def move(session: Session) -> None:
        session.get_one(Phased, 1).phase = 1.5  # type: ignore[assignment]

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(move)
    assert (info.value.from_state, info.value.to_state) == (0, 1.5)
    assert "1.5 is no integer" in info.value.reason
    assert stored(engine, "phased", "phase") == [(1, 0)]


#: a model, its column, the state row 1 may move to, one row 2 may not move to (None: none
#: given) and what each row then stores
EXPRESSION_CASES = [
    (Coded, "status", "running", "done", ["R", "P"]),
    (Numbered, "status", "running", "done", [1, 0]),
    (Phased, "phase", 1, 2, [1, 0]),
    (Padded, "status", "run", "done", ["run   ", "new   "]),
    (Page, "stage", Stage.live, None, ["live", "draft"]),
]


@pytest.mark.parametrize("case", EXPRESSION_CASES, ids=lambda c: c[0].__name__)
def test_a_sql_expression_state_is_written_as_the_column_stores_it(
    engine: sa.Engine, service: str, case: tuple[Any, ...]
) -> None:
    """A bulk UPDATE's new state given as a SQL expression is written as the declared state it
    equals (compared and bound as the column stores it), once per row: row 1 makes a legal
    move, row 2's is left out (the trigger, installed, would refuse either otherwise)."""
    model, column, then, illegal, written = case
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add_all([model(id=1), model(id=2)]))
    attr = getattr(model, column)
    other = attr if illegal is None else sa.literal(illegal, attr.type)
    new = sa.case((model.id == 1, sa.literal(then, attr.type)), else_=other)
    Sessions.run(lambda s: s.execute(sa.update(model).values({column: new})))
    assert stored(engine, model.__tablename__, column) == [(1, written[0]), (2, written[1])]


# --- messages ------------------------------------------------------------------------------


def test_a_char_column_is_reported_without_its_padding(engine: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add(Padded(id=1)))

    with Sessions() as session:
        row = session.get_one(Padded, 1)
        with engine.begin() as other:
            other.exec_driver_sql("UPDATE padded SET status = 'run' WHERE id = 1")
        row.status = "run"
        with pytest.raises(rdb.StaleTransitionError) as info:
            session.flush()
    err = info.value
    assert (err.from_state, err.to_state) == ("new", "run")
    assert "the row now holds 'run'" in str(err)
    assert "   '" not in str(err)


def test_the_state_a_row_was_in_is_reported_as_declared(engine: sa.Engine, service: str) -> None:
    """A ``str`` enum's states in a string column: the new state came back as the member, the
    state the row was in as the plain string read."""
    Sessions = rdb.ResilientSession(engine, service=service)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO pages VALUES (1, 'draft')")
        conn.exec_driver_sql("UPDATE pages SET stage = 'live' WHERE id = 1")

    def back(session: Session) -> None:
        session.get_one(Page, 1).stage = Stage.draft

    with pytest.raises(rdb.IllegalTransitionError) as info:
        Sessions.run(back)
    assert info.value.from_state is Stage.live
    assert info.value.to_state is Stage.draft


def test_the_triggers_refusal_lists_the_moves_allowed(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("INSERT INTO padded VALUES (1, 'new')")
        conn.commit()
        err = refused_by_trigger(conn, "UPDATE padded SET status = 'done' WHERE id = 1")
    assert (err.from_state, err.to_state, err.via) == ("new", "done", "db")
    assert "allowed from here: 'run'" in err.reason


def test_a_bulk_update_by_key_reports_a_char_state_without_its_padding(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    Sessions.run(lambda s: s.add(Padded(id=1)))
    Sessions.run(lambda s: s.execute(sa.update(Padded), [{"id": 1, "status": "done"}]))
    [blocked] = [e for e in events if e.name == "transition_blocked"]
    assert (blocked.fields["from_state"], blocked.fields["to_state"]) == ("new", "done")
    assert "'new'" in blocked.message
    assert stored(engine, "padded") == [(1, "new   ")]
