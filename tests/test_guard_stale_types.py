"""A flush moving several rows, one of which another transaction moved meanwhile, raises
:class:`StaleTransitionError` naming that row and what it holds, for every supported status type
and on every driver.

On asyncpg (no row count for an executemany) the flush's UPDATE makes the server raise for the
row that moved, its error carrying the column's text; that text was handed to the column type's
result processor as if the driver had read it: a ``Numeric(4, 2)`` column raised asyncpg's
``TypeError: %d format: a real number is required, not NoneType`` (its processor wants the
column's type code), and a ``TypeDecorator`` storing an integer code raised the decorator's own
``KeyError: '2'`` (its ``process_result_value`` got the text ``'2'``, not the integer). The text
is the column's key, as the guards spell states (``col::text``; a ``NUMERIC`` without a scale
without its trailing zeros): it now names the declared state, or a value of the stored type for
a value no rule declares. psycopg (sync and async) reads the row back on that path; its answer
is the same. That read (and the one of a status not loaded, on every driver) went through the
column type's result processing, which raised for a value the type can't load (an ``Enum``
label or a ``TypeDecorator``'s code a newer version of the application writes: ``LookupError``,
``KeyError`` from the flush): it reads the column's text now, as the raising form does.

Real server, real concurrent transactions: the row is moved by another connection between the
load and the flush."""

from __future__ import annotations

import decimal
import enum
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, defer, mapped_column
from sqlalchemy.types import TypeDecorator

import resilient_db as rdb
from resilient_db.testing import PostgresServer
from resilient_db.transitions._rules import plain

D = decimal.Decimal


class Number(TypeDecorator[str]):
    """States stored as integer codes."""

    impl = sa.Integer
    cache_ok = True
    NUMBERS: ClassVar[dict[str, int]] = {"pending": 1, "running": 2, "done": 3}
    NAMES: ClassVar[dict[int, str]] = {v: k for k, v in NUMBERS.items()}

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.NUMBERS[value]

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.NAMES[value]


class Code(TypeDecorator[str]):
    """States stored as one-letter codes."""

    impl = sa.String(1)
    cache_ok = True
    CODES: ClassVar[dict[str, str]] = {"pending": "P", "running": "R", "done": "D"}
    NAMES: ClassVar[dict[str, str]] = {v: k for k, v in CODES.items()}

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.CODES[value]

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.NAMES[value]


class Light(enum.Enum):
    red = "R"
    green = "G"
    amber = "A"


class Stage(str, enum.Enum):
    draft = "draft"
    review = "review"
    live = "live"


class Case(NamedTuple):
    """A status type: its column, three states (the rows start in the first, the flush moves
    them to the second) and the SQL literals another transaction writes them with."""

    column: Any
    states: tuple[Any, Any, Any]
    sql: tuple[str, str, str]


CASES: dict[str, Case] = {
    "string": Case(
        sa.String(20), ("pending", "running", "done"), ("'pending'", "'running'", "'done'")
    ),
    "str_enum": Case(
        sa.String(20), (Stage.draft, Stage.review, Stage.live), ("'draft'", "'review'", "'live'")
    ),
    "enum": Case(
        sa.Enum(Light, name="light"),
        (Light.red, Light.green, Light.amber),
        ("'red'", "'green'", "'amber'"),
    ),
    # stored as the member's name in a VARCHAR (no PostgreSQL enum type)
    "enum_not_native": Case(
        sa.Enum(Light, native_enum=False, length=10),
        (Light.red, Light.green, Light.amber),
        ("'red'", "'green'", "'amber'"),
    ),
    "str_enum_not_native": Case(
        sa.Enum(Stage, native_enum=False, length=10),
        (Stage.draft, Stage.review, Stage.live),
        ("'draft'", "'review'", "'live'"),
    ),
    # the third: NULL, no state (a Boolean column has two)
    "boolean": Case(sa.Boolean(), (False, True, None), ("false", "true", "NULL")),
    "integer": Case(sa.Integer(), (0, 1, 2), ("0", "1", "2")),
    "numeric_4_2": Case(sa.Numeric(4, 2), (1, 2, 3), ("1", "2.0", "3")),
    # PostgreSQL keeps the decimals each value was written with: 3.000 is the state 3
    "numeric": Case(sa.Numeric(), (1, 2, 3), ("1", "2.00", "3.000")),
    "char": Case(sa.CHAR(6), ("new", "run", "done"), ("'new'", "'run'", "'done'")),
    "integer_codes": Case(Number(), ("pending", "running", "done"), ("1", "2", "3")),
    "text_codes": Case(Code(), ("pending", "running", "done"), ("'P'", "'R'", "'D'")),
}


class Base(DeclarativeBase):
    pass


def _model(name: str, case: Case) -> type[Any]:
    first, second, third = case.states
    transitions = {first: {second}} if third is None else {first: {second}, second: {third}}
    return type(
        f"Row_{name}",
        (Base,),
        {
            "__tablename__": f"rows_{name}",
            "__transitions__": rdb.TransitionRules(
                column="status", transitions=transitions, initial={first}
            ),
            "id": mapped_column(sa.Integer, primary_key=True),
            "status": mapped_column(case.column, nullable=True),
            "__annotations__": {"id": Mapped[int], "status": Mapped[Any]},
        },
    )


MODELS = {name: _model(name, case) for name, case in CASES.items()}
DRIVERS = ("psycopg-sync", "psycopg", "asyncpg")


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(pg_server: PostgresServer, pg_database: str, driver: str) -> str:
    """The URL of the flush's engine (the driver's)."""
    return pg_server.url(pg_database, driver=driver.removesuffix("-sync"))


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def _reset(engine: sa.Engine, name: str) -> None:
    model = MODELS[name]
    model.__table__.create(engine, checkfirst=True)
    start = CASES[name].sql[0]
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM rows_{name}")
        conn.exec_driver_sql(
            f"INSERT INTO rows_{name} VALUES (1, {start}), (2, {start}), (3, {start})"
        )


def _move_row_2(engine: sa.Engine, name: str, literal: str) -> None:
    with engine.begin() as conn:  # another transaction, committed before the flush
        conn.exec_driver_sql(f"UPDATE rows_{name} SET status = {literal} WHERE id = 2")


def _stored(engine: sa.Engine, name: str) -> list[str | None]:
    with engine.connect() as conn:
        query = f"SELECT status::text FROM rows_{name} ORDER BY id"
        return list(conn.exec_driver_sql(query).scalars())


async def _stale_flush(
    engine: sa.Engine, url: str, *, driver: str, service: str, name: str, moved_to: str
) -> BaseException | None:
    """Load rows 1-3, have another transaction move row 2, move all three in one flush: what
    the flush raised."""
    model = MODELS[name]
    target = CASES[name].states[1]
    if driver == "psycopg-sync":
        sessions = rdb.ResilientSession(engine, service=service)
        with sessions() as session:
            rows = [session.get_one(model, n) for n in (1, 2, 3)]
            _move_row_2(engine, name, moved_to)
            for row in rows:
                row.status = target
            try:
                session.flush()
            except Exception as exc:
                return exc
        return None
    aengine = create_async_engine(url)
    try:
        async_sessions = rdb.AsyncResilientSession(aengine, service=service)
        async with async_sessions() as asession:
            rows = [await asession.get_one(model, n) for n in (1, 2, 3)]
            _move_row_2(engine, name, moved_to)
            for row in rows:
                row.status = target
            try:
                await asession.flush()
            except Exception as exc:
                return exc
        return None
    finally:
        await aengine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(CASES))
async def test_a_many_row_flush_names_the_row_another_transaction_moved(
    engine: sa.Engine, url: str, driver: str, service: str, name: str
) -> None:
    case = CASES[name]
    # moved to the state the flush writes, and (but on a Boolean column) to another state
    for moved_to in (1, 2):
        _reset(engine, name)
        before = _stored(engine, name)
        err = await _stale_flush(
            engine, url, driver=driver, service=service, name=name, moved_to=case.sql[moved_to]
        )
        assert isinstance(err, rdb.StaleTransitionError), repr(err)
        assert (err.pk, err.column, err.from_state, err.to_state) == (
            2,
            "status",
            case.states[0],
            case.states[1],
        )
        assert f"{plain(case.states[moved_to])!r}" in (err.reason or ""), err.reason
        after = _stored(engine, name)
        assert after[0] == after[2] == before[0]  # nothing this flush wrote stayed


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "moved",
    [
        ("integer", "9", "9"),
        ("numeric_4_2", "9.5", "Decimal('9.50')"),
        ("string", "'lost'", "'lost'"),
        # a value the column's type can't load (a label or a code a newer version of the
        # application writes): read as the column's text, not through the type
        ("enum_not_native", "'blue'", "'blue'"),
        ("enum", "'blue'", "'blue'"),
        ("text_codes", "'X'", "'X'"),
        ("integer_codes", "9", "9"),
    ],
)
async def test_a_value_no_rule_declares_is_named_as_the_column_holds_it(
    engine: sa.Engine, url: str, driver: str, service: str, moved: tuple[str, str, str]
) -> None:
    name, literal, shown = moved
    _reset(engine, name)
    if name == "enum":  # a label a migration added for a newer version of the application
        with engine.connect() as conn:
            conn.exec_driver_sql("ALTER TYPE light ADD VALUE IF NOT EXISTS 'blue'")
            conn.commit()
    err = await _stale_flush(
        engine, url, driver=driver, service=service, name=name, moved_to=literal
    )
    assert isinstance(err, rdb.StaleTransitionError), repr(err)
    assert err.pk == 2
    assert f"the row now holds {shown};" in (err.reason or ""), err.reason


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "moved",
    [("enum_not_native", "'blue'", "'blue'"), ("text_codes", "'X'", "'X'")],
)
async def test_a_status_not_loaded_holding_a_value_the_type_cant_load_is_refused(
    engine: sa.Engine, url: str, driver: str, service: str, moved: tuple[str, str, str]
) -> None:
    """A status set on a row loaded without it is read first, to judge the move from what the
    row holds: a value the column's type can't load (there: LookupError, KeyError from the
    flush) is read as the column's text, and the move from it refused as illegal."""
    name, literal, shown = moved
    _reset(engine, name)
    _move_row_2(engine, name, literal)
    model = MODELS[name]
    target = CASES[name].states[1]
    query = sa.select(model).options(defer(model.status)).where(model.id == 2)
    err: BaseException | None = None
    if driver == "psycopg-sync":
        with rdb.ResilientSession(engine, service=service)() as session:
            session.scalars(query).one().status = target
            try:
                session.flush()
            except Exception as exc:
                err = exc
    else:
        aengine = create_async_engine(url)
        try:
            async with rdb.AsyncResilientSession(aengine, service=service)() as asession:
                (await asession.scalars(query)).one().status = target
                try:
                    await asession.flush()
                except Exception as exc:
                    err = exc
        finally:
            await aengine.dispose()
    assert isinstance(err, rdb.IllegalTransitionError), repr(err)
    assert not isinstance(err, rdb.StaleTransitionError)
    assert err.pk == 2
    assert f"{shown} -> " in str(err), str(err)
    assert _stored(engine, name)[1] == literal.strip("'")


@pytest.mark.parametrize(
    "moved",
    [("enum_not_native", "'blue'"), ("enum", "'blue'"), ("text_codes", "'X'")],
)
def test_a_bulk_update_by_key_of_a_row_holding_a_value_the_type_cant_load(
    engine: sa.Engine, service: str, moved: tuple[str, str]
) -> None:
    """The ORM bulk UPDATE by primary key reads the rows' states first, as the flush does: a
    row holding a value the column's type can't load (there: LookupError, KeyError from the
    statement) is left out as an illegal move from it (filter mode), the others written."""
    name, literal = moved
    _reset(engine, name)
    if name == "enum":
        with engine.connect() as conn:
            conn.exec_driver_sql("ALTER TYPE light ADD VALUE IF NOT EXISTS 'blue'")
            conn.commit()
    _move_row_2(engine, name, literal)
    model = MODELS[name]
    target = CASES[name].states[1]
    before = _stored(engine, name)
    rdb.ResilientSession(engine, service=service).run(
        lambda session: session.execute(
            sa.update(model), [{"id": key, "status": target} for key in (1, 2, 3)]
        )
    )
    after = _stored(engine, name)
    assert after[1] == before[1] == literal.strip("'")
    assert after[0] == after[2] != before[0]


@pytest.mark.asyncio
async def test_async_a_bulk_update_by_key_of_a_row_holding_a_value_the_type_cant_load(
    engine: sa.Engine, url: str, driver: str, service: str
) -> None:
    """The async twin (psycopg and asyncpg), in raise mode: the row is named."""
    if driver == "psycopg-sync":
        pytest.skip("the sync session is the test above")
    name = "enum_not_native"
    _reset(engine, name)
    _move_row_2(engine, name, "'blue'")
    model = MODELS[name]
    aengine = create_async_engine(url)
    try:
        Sessions = rdb.AsyncResilientSession(
            aengine, service=service, config=rdb.Config(bulk_update="raise")
        )
        async with Sessions() as session:
            with pytest.raises(rdb.IllegalTransitionError) as refused:
                await session.execute(
                    sa.update(model), [{"id": key, "status": Light.green} for key in (1, 2, 3)]
                )
    finally:
        await aengine.dispose()
    assert refused.value.pk == 2
    assert "'blue' -> " in str(refused.value), str(refused.value)
    assert _stored(engine, name) == ["red", "blue", "red"]


@pytest.mark.parametrize("mode", ["raise", "filter"])
@pytest.mark.parametrize("how", ["value", "expression"])
def test_a_bulk_update_with_criteria_meeting_a_value_the_type_cant_load(
    engine: sa.Engine, service: str, mode: str, how: str
) -> None:
    """The same for an ORM bulk UPDATE with criteria: a row it meets holding a value the
    column's type can't load is refused as an illegal move from it (raise mode:
    IllegalTransitionError naming it; filter mode: left out), the others written."""
    name = "enum_not_native"
    _reset(engine, name)
    _move_row_2(engine, name, "'blue'")
    model = MODELS[name]
    target: Any = CASES[name].states[1]
    if how == "expression":  # computed by the server for each row
        target = sa.case((model.id > 0, sa.literal("green")), else_=sa.literal("green"))
    statement = sa.update(model).where(model.id.in_([1, 2, 3])).values(status=target)
    config = rdb.Config(bulk_update=mode)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    if mode == "raise":
        with pytest.raises(rdb.IllegalTransitionError) as refused:
            Sessions.run(lambda session: session.execute(statement))
        assert refused.value.pk == 2
        assert "'blue' -> " in str(refused.value), str(refused.value)
        assert _stored(engine, name) == ["red", "blue", "red"]
    else:
        Sessions.run(lambda session: session.execute(statement))
        assert _stored(engine, name) == ["green", "blue", "green"]
