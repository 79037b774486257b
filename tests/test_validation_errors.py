"""Response validation meets the database, against a real server, sync and async (both async
drivers):

* an error raised by a statement of the unit's session while its result is checked (a lost
  connection or a serialization failure while a deferred column or a lazy relationship loads,
  the transition guard refusing an autoflush) is raised as itself and retried if transient:
  Pydantic's ``from_attributes`` turned it into a ``get_attribute_error``, and the unit failed
  with ``ResponseValidationError`` (never retried; 500 ``response-invalid``);
* the unit's changes are flushed before the check (a row it added is checked with its id; a
  flush error, the guard's refusal included, is the unit's error, as without ``validate``);
* a result holding an iterator (``{"ids": map(int, rows)}``) is refused naming where: the check
  consumed it, and the caller got it empty.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from scenarios import ASYNC_DRIVERS, waiting_on_lock
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    defer,
    mapped_column,
    relationship,
)

import resilient_db as rdb
from resilient_db.testing import FaultProxy

pytestmark = pytest.mark.usefixtures("no_backoff")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    __transitions__ = rdb.TransitionRules(
        column="status", transitions={"new": {"paid"}, "paid": {"shipped"}}, initial={"new"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(default="new")
    note: Mapped[str] = mapped_column(default="")
    #: read by a statement of its own, which fails the first time (40001: see CHECK_ONCE)
    checked: Mapped[str] = column_property(sa.func.check_once(), deferred=True)
    #: read by a statement that waits for the advisory lock LOCK_KEY (see WAIT_FOR_LOCK)
    waited: Mapped[str] = column_property(sa.func.wait_for_lock(), deferred=True)
    lines: Mapped[list[Line]] = relationship(back_populates="order")  # lazy


class Line(Base):
    __tablename__ = "lines"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("orders.id"))
    sku: Mapped[str]
    order: Mapped[Order] = relationship(back_populates="lines")


CHECK_ONCE = (
    "CREATE SEQUENCE checks",
    "CREATE FUNCTION check_once() RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
    "IF nextval('checks') = 1 THEN RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; "
    "END IF; RETURN 'checked'; END $$",
)


LOCK_KEY = 7401
WAIT_FOR_LOCK = (
    "CREATE FUNCTION wait_for_lock() RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
    f"PERFORM pg_advisory_xact_lock({LOCK_KEY}); RETURN 'free'; END $$"
)


class LineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    sku: str


class OrderNote(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    note: str


class OrderLines(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    status: str
    lines: list[LineOut]


class OrderChecked(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    checked: str


class OrderWaited(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    waited: str


class OrderPlain(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    status: str


#: what each kind of load reads: a deferred column, a lazy relationship
LOADS = {"deferred column": OrderNote, "lazy relationship": OrderLines}


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    """The test's database: order 1 (``new``, note ``n``) with line 1 (``a``)."""
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        for statement in (*CHECK_ONCE, WAIT_FOR_LOCK):
            conn.exec_driver_sql(statement)
        conn.execute(sa.insert(Order).values(id=1, status="new", note="n"))
        conn.execute(sa.insert(Line).values(order_id=1, sku="a"))  # id 1, from its sequence
    yield eng
    eng.dispose()


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def aengine(pg_async_url: str, engine: sa.Engine) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(pg_async_url)
    yield eng
    await eng.dispose()


@pytest.fixture
def proxied(fault_proxy: FaultProxy, pg_database: str, engine: sa.Engine) -> Iterator[sa.Engine]:
    eng = sa.create_engine(fault_proxy.url(pg_database))
    yield eng
    eng.dispose()


@pytest_asyncio.fixture
async def aproxied(
    fault_proxy: FaultProxy, pg_database: str, async_driver: str, engine: sa.Engine
) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(fault_proxy.url(pg_database, driver=async_driver))
    yield eng
    await eng.dispose()


def counters(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]["counters"]
    return found


def status_of(engine: sa.Engine, order_id: int) -> str:
    with engine.connect() as conn:
        q = sa.select(Order.status).where(Order.id == order_id)
        return str(conn.execute(q).scalar_one())


def skus(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(Line.sku).order_by(Line.id)).scalars())


OPTIONS: dict[str, Any] = {"config": rdb.Config(), "expire_on_commit": False}


# -- errors of the check's statements ------------------------------------------------------------
@pytest.mark.parametrize("load", list(LOADS))
def test_a_connection_lost_while_the_check_loads_is_retried(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, load: str
) -> None:
    """The connection is cut after the unit read the row, before the check loads what the row
    has not loaded yet: the disconnect is the unit's error, retried, not an invalid result."""
    Session = rdb.ResilientSession(proxied, service=service, **OPTIONS)
    attempts: list[int] = []

    def unit(session: Session) -> Order | None:
        attempts.append(1)
        order = session.get(Order, 1, options=[defer(Order.note)])
        if len(attempts) == 1:
            assert fault_proxy.cut_all() > 0
        return order

    found = Session.run(unit, validate=LOADS[load])
    LOADS[load].model_validate(found)  # loaded by the check (the session is closed now)
    assert attempts == [1, 1]
    assert counters(service)["retries"] == 1
    assert counters(service)["response_validation_failures"] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("load", list(LOADS))
async def test_a_connection_lost_while_an_async_check_loads_is_retried(
    aproxied: AsyncEngine, fault_proxy: FaultProxy, service: str, load: str
) -> None:
    """The async twin: the check loads in the session's ``run_sync``, where the lost
    connection is raised as itself too."""
    Async = rdb.AsyncResilientSession(aproxied, service=service, **OPTIONS)
    attempts: list[int] = []

    async def unit(session: AsyncSession) -> Order | None:
        attempts.append(1)
        order = await session.get(Order, 1, options=[defer(Order.note)])
        if len(attempts) == 1:
            assert fault_proxy.cut_all() > 0
        return order

    found = await Async.run(unit, validate=LOADS[load])
    LOADS[load].model_validate(found)  # loaded by the check (the session is closed now)
    assert attempts == [1, 1]
    assert counters(service)["retries"] == 1
    assert counters(service)["response_validation_failures"] == 0


def write_and_return(session: Session, attempts: list[int]) -> Order | None:
    attempts.append(1)
    session.add(Line(id=1 + len(attempts), order_id=1, sku="written"))
    return session.get(Order, 1)


def test_a_statement_error_while_checking_is_raised_though_the_result_passed(
    engine: sa.Engine, service: str
) -> None:
    """The union's first member loads a deferred column whose statement fails (40001), its
    second passes without it: the serialization failure is still the unit's error (its
    transaction is aborted: PostgreSQL would answer the COMMIT with a ROLLBACK), retried, and
    the next attempt passes with the first member and commits once."""
    Session = rdb.ResilientSession(engine, service=service, **OPTIONS)
    attempts: list[int] = []
    found = Session.run(write_and_return, attempts, validate=OrderChecked | OrderPlain)
    assert found is not None
    assert found.checked == "checked"
    assert attempts == [1, 1]
    assert skus(engine) == ["a", "written"]  # once
    assert counters(service)["retries"] == 1


@pytest.mark.asyncio
async def test_a_statement_error_while_an_async_check_runs_is_raised_though_it_passed(
    aengine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    Async = rdb.AsyncResilientSession(aengine, service=service, **OPTIONS)
    attempts: list[int] = []

    async def unit(session: AsyncSession) -> Order | None:
        return await session.run_sync(write_and_return, attempts)

    found = await Async.run(unit, validate=OrderChecked | OrderPlain)
    assert found is not None
    assert attempts == [1, 1]
    assert skus(engine) == ["a", "written"]


@pytest.mark.asyncio
async def test_a_cancellation_while_an_async_check_loads_is_raised_as_itself(
    aengine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    """The caller cancels while the check's statement waits on the server (for a lock): the
    ``CancelledError`` thrown into SQLAlchemy's greenlet went through Pydantic's attribute
    access as a ``get_attribute_error``, and the cancellation became ``ResponseValidationError``
    (counted as an invalid result)."""
    Async = rdb.AsyncResilientSession(aengine, service=service, **OPTIONS)

    async def unit(session: AsyncSession) -> Order | None:
        return await session.get(Order, 1)

    with engine.connect() as holder:
        holder.execute(sa.text(f"SELECT pg_advisory_lock({LOCK_KEY})"))
        try:
            task = asyncio.create_task(Async.run(unit, validate=OrderWaited))
            for _ in range(1000):  # bounded: until the check's statement waits for the lock
                if waiting_on_lock(engine, LOCK_KEY) == 1:
                    break
                await asyncio.sleep(0.01)
            assert waiting_on_lock(engine, LOCK_KEY) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            holder.execute(sa.text(f"SELECT pg_advisory_unlock({LOCK_KEY})"))
    assert counters(service)["response_validation_failures"] == 0


def ship(session: Session) -> Order | None:
    order = session.get(Order, 1)
    assert order is not None
    order.status = "shipped"  # new -> shipped: refused when flushed
    return order


def test_an_illegal_move_left_for_the_commit_is_the_guards_error(
    engine: sa.Engine, service: str
) -> None:
    """The unit's changes are flushed before the check: the guard refuses the move there, as
    at the COMMIT without ``validate`` (409 ``illegal-transition``), instead of refusing the
    autoflush of the check's lazy load inside Pydantic (500 ``response-invalid``)."""
    Session = rdb.ResilientSession(engine, service=service, **OPTIONS)
    with pytest.raises(rdb.IllegalTransitionError):
        Session.run(ship)  # without validate=
    with pytest.raises(rdb.IllegalTransitionError) as info:
        Session.run(ship, validate=OrderLines)
    assert (info.value.from_state, info.value.to_state) == ("new", "shipped")
    assert counters(service)["response_validation_failures"] == 0
    assert status_of(engine, 1) == "new"


@pytest.mark.asyncio
async def test_an_illegal_move_left_for_the_commit_is_the_guards_error_async(
    aengine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    Async = rdb.AsyncResilientSession(aengine, service=service, **OPTIONS)

    async def unit(session: AsyncSession) -> Order | None:
        return await session.run_sync(ship)

    with pytest.raises(rdb.IllegalTransitionError):
        await Async.run(unit, validate=OrderLines)
    assert counters(service)["response_validation_failures"] == 0
    assert status_of(engine, 1) == "new"


def ship_while_checking(order: Order) -> None:
    """A check with a side effect: the move it makes is autoflushed when ``lines`` loads,
    inside Pydantic's attribute access."""
    order.status = "shipped"
    OrderLines.model_validate(order)


def test_a_guard_refusal_at_an_autoflush_of_the_check_is_raised_as_itself(
    engine: sa.Engine, service: str
) -> None:
    Session = rdb.ResilientSession(engine, service=service, **OPTIONS)
    with pytest.raises(rdb.IllegalTransitionError):
        Session.run(lambda session: session.get(Order, 1), validate=ship_while_checking)
    assert counters(service)["response_validation_failures"] == 0
    assert status_of(engine, 1) == "new"


@pytest.mark.asyncio
async def test_a_guard_refusal_at_an_autoflush_of_an_async_check_is_raised_as_itself(
    aengine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    Async = rdb.AsyncResilientSession(aengine, service=service, **OPTIONS)

    async def unit(session: AsyncSession) -> Order | None:
        return await session.get(Order, 1)

    with pytest.raises(rdb.IllegalTransitionError):
        await Async.run(unit, validate=ship_while_checking)
    assert counters(service)["response_validation_failures"] == 0


def test_the_check_listens_on_the_units_session_only_while_it_runs(
    engine: sa.Engine, service: str
) -> None:
    """The listener that keeps the check's statement errors is the session's own, removed after
    the check (a ``do_orm_execute`` listener costs each statement an ``ORMExecuteState``);
    other sessions never hear it."""
    Session = rdb.ResilientSession(engine, service=service, **OPTIONS)
    with Session() as session, Session() as bystander:
        before = list(session.dispatch.do_orm_execute)
        heard: list[str] = []

        def listening(value: object) -> bool:
            heard.extend(type(fn).__name__ for fn in session.dispatch.do_orm_execute)
            heard.extend(f"other {type(fn).__name__}" for fn in bystander.dispatch.do_orm_execute)
            return True

        assert Session.run_in(session, lambda s: s.get(Order, 1), validate=listening) is not None
        assert "_StatementErrors" in heard
        assert "other _StatementErrors" not in heard
        assert list(session.dispatch.do_orm_execute) == before
        assert list(bystander.dispatch.do_orm_execute) == before


# -- the unit's changes are flushed before the check ----------------------------------------------
def add_line(session: Session, line_id: int, order_id: int) -> Line:
    line = Line(id=None if line_id == 0 else line_id, order_id=order_id, sku="new")
    session.add(line)
    return line  # flushed by the COMMIT without validate=


def test_a_row_the_unit_added_is_checked_with_its_id(engine: sa.Engine, service: str) -> None:
    """Checked unflushed, the new row had no id yet: a correct unit was refused and rolled
    back, though with validation off it committed and the caller got the row with its id."""
    Session = rdb.ResilientSession(engine, service=service, **OPTIONS)
    line = Session.run(add_line, 0, 1, validate=LineOut)
    assert isinstance(line.id, int)
    assert skus(engine) == ["a", "new"]
    assert counters(service)["response_validation_failures"] == 0


@pytest.mark.asyncio
async def test_a_row_an_async_unit_added_is_checked_with_its_id(
    aengine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    Async = rdb.AsyncResilientSession(aengine, service=service, **OPTIONS)

    async def unit(session: AsyncSession) -> Line:
        return add_line(session.sync_session, 0, 1)

    line = await Async.run(unit, validate=LineOut)
    assert isinstance(line.id, int)
    assert skus(engine) == ["a", "new"]


def test_a_flush_error_is_the_units_error_as_without_validate(
    engine: sa.Engine, service: str
) -> None:
    """A line of an order that doesn't exist: the foreign key refuses the flush before the
    check, as it refuses the COMMIT's flush without ``validate`` (not an invalid result)."""
    Session = rdb.ResilientSession(engine, service=service, **OPTIONS)
    with pytest.raises(IntegrityError):
        Session.run(add_line, 0, 999)
    with pytest.raises(IntegrityError):
        Session.run(add_line, 0, 999, validate=LineOut)  # (no id without a flush)
    assert counters(service)["response_validation_failures"] == 0
    assert skus(engine) == ["a"]


# -- iterators held in a result ----------------------------------------------------------------
class Page(BaseModel):
    ids: list[int]


@dataclasses.dataclass(frozen=True)
class Bag:
    ids: Any


def held_cases() -> list[tuple[Any, Any, str]]:
    """(validator, result, where the message says the iterator is) for fresh iterators."""
    return [
        (Page, {"ids": map(int, ["1", "2"])}, "at ids"),
        (list[Page], [{"ids": [1]}, {"ids": (i for i in [2])}], "at 1.ids"),
        (tuple[Page, ...], ({"ids": iter([1])},), "at 0.ids"),
        (Bag, Bag(ids=iter([1])), "at ids"),
        # a key of the data is never shown (it can be data: an address, a name)
        (dict[str, list[int]], {"alice@example.com": iter([1])}, "at <key>"),
    ]


def test_an_iterator_held_in_the_result_is_refused_naming_where(
    engine: sa.Engine, service: str
) -> None:
    """A check consumes an iterator wherever it is in the result: the caller got ``ids ==
    []`` with validation on and the ids with it off. Refused with ``TypeError`` as a result
    that is an iterator is (checking a copy would hand back another object than the unit's),
    the unit rolled back; with validation off the same object comes back untouched."""
    Session = rdb.ResilientSession(engine, service=service, **OPTIONS)
    for index, (validator, _, where) in enumerate(held_cases()):

        def unit(session: Session, index: int = index) -> Any:
            add_line(session, 10, 1)
            return held_cases()[index][1]

        with pytest.raises(TypeError, match=r"holds an iterator \(\w+\) " + where) as info:
            Session.run(unit, validate=validator)
        assert "alice" not in str(info.value)
    assert skus(engine) == ["a"]  # each unit rolled back
    assert counters(service)["response_validation_failures"] == 0  # a usage error
    with pytest.raises(TypeError, match="holds an iterator"):
        rdb.with_self_healing(lambda: {"ids": iter([1])}, service=service, validate=Page)
    off = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(response_validation=False)
    )
    result = off.run(lambda session: {"ids": map(int, ["1", "2"])}, validate=Page)
    assert list(result["ids"]) == [1, 2]


def test_a_result_without_iterators_is_walked_once(engine: sa.Engine, service: str) -> None:
    """Containers that hold themselves, strings and ORM rows: looked for iterators without
    end, nothing refused."""
    Session = rdb.ResilientSession(engine, service=service, **OPTIONS)
    loop: list[Any] = ["text", b"bytes"]
    loop.append(loop)
    assert Session.run(lambda session: loop, validate=lambda value: value is loop) is loop

    def rows(session: Session) -> dict[str, Any]:
        return {"orders": session.scalars(sa.select(Order)).all(), "names": ("a", "b")}

    assert len(Session.run(rows, validate=lambda value: True)["orders"]) == 1


@pytest.mark.asyncio
async def test_an_iterator_held_in_an_async_units_result_is_refused(
    aengine: AsyncEngine, engine: sa.Engine, service: str
) -> None:
    Async = rdb.AsyncResilientSession(aengine, service=service, **OPTIONS)

    async def unit(session: AsyncSession) -> dict[str, Any]:
        add_line(session.sync_session, 10, 1)
        return {"ids": map(int, ["1"])}

    with pytest.raises(TypeError, match=r"holds an iterator \(map\) at ids"):
        await Async.run(unit, validate=Page)
    assert skus(engine) == ["a"]
