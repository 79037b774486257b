"""Operations inside operations: ``with_self_healing`` and ``run_in`` inside a unit of work or a
replaying operation run once (the enclosing one retries: no loops multiplied, no retry inside an
aborted transaction), and what can't be a unit is refused where it is written."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._classify import partly_committed

pytestmark = pytest.mark.usefixtures("no_backoff")

RETRIES = 3  # every factory and operation here: 4 attempts
CONFIG = rdb.Config(max_retries=RETRIES)


@pytest_asyncio.fixture
async def aengine(engine: sa.Engine, pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    aengine = create_async_engine(pg_async_url)
    yield aengine
    await aengine.dispose()


def conflict(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('40001')"))


async def aconflict(session: AsyncSession) -> None:
    await session.execute(sa.text("SELECT raise_code('40001')"))


def attempts(service: str) -> int:
    return int(rdb.health()["services"][service]["counters"]["attempts"])


# -- with_self_healing inside a unit ------------------------------------------------------------
def test_with_self_healing_inside_a_unit_runs_once_per_attempt_of_the_unit(
    engine: sa.Engine, service: str
) -> None:
    """The call form and the decorator inside ``run``: a conflict in the inner operation is the
    unit's, replayed by the unit (4 attempts in all, not 4 x 4)."""
    Session = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls = {"unit": 0, "inner": 0}

    @rdb.with_self_healing(service=f"{service}-inner", config=CONFIG)
    def decorated(session: Session) -> None:
        calls["inner"] += 1
        conflict(session)

    def by_call(session: Session) -> None:
        calls["unit"] += 1

        def inner() -> None:
            calls["inner"] += 1
            conflict(session)

        rdb.with_self_healing(inner, service=f"{service}-inner", config=CONFIG)

    def by_decorator(session: Session) -> None:
        calls["unit"] += 1
        decorated(session)

    for unit in (by_call, by_decorator):
        calls.update(unit=0, inner=0)
        with pytest.raises(sa.exc.OperationalError) as caught:
            Session.run(unit)
        assert getattr(caught.value.orig, "sqlstate", None) == "40001"
        assert calls == {"unit": RETRIES + 1, "inner": RETRIES + 1}, unit.__name__


def test_a_decorated_helper_on_the_units_session_lets_the_unit_heal(
    engine: sa.Engine, service: str
) -> None:
    """A helper decorated with ``@with_self_healing()`` called with the unit's session: its
    conflict aborts the unit's transaction, so only a replay of the whole unit can heal it (a
    retry of the helper alone ran in the aborted transaction: 25P02, not retried)."""
    Session = rdb.ResilientSession(engine, service=service, config=CONFIG)
    left = [1]

    @rdb.with_self_healing(service=service, config=CONFIG)
    def helper(session: Session) -> int:
        if left:
            left.pop()
            conflict(session)
        return int(session.execute(sa.text("SELECT 42")).scalar_one())

    assert Session.run(helper) == 42
    # the unit's two attempts: the helper's, run once in each, are part of them
    assert attempts(service) == 2
    assert rdb.health()["services"][service]["breaker"]["failures"] == 0


def test_with_self_healing_inside_a_replaying_operation_runs_once(
    engine: sa.Engine, service: str
) -> None:
    calls = {"outer": 0, "inner": 0}

    def inner() -> None:
        calls["inner"] += 1
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT raise_code('40001')"))

    def outer() -> None:
        calls["outer"] += 1
        rdb.with_self_healing(inner, service=f"{service}-inner", config=CONFIG)

    with pytest.raises(sa.exc.OperationalError):
        rdb.with_self_healing(outer, service=service, config=CONFIG)
    assert calls == {"outer": RETRIES + 1, "inner": RETRIES + 1}
    # an operation that doesn't replay leaves the inner one its retries, as run does
    calls.update(outer=0, inner=0)
    with pytest.raises(sa.exc.OperationalError):
        rdb.with_self_healing(outer, service=service, config=CONFIG, use_retry=False)
    assert calls == {"outer": 1, "inner": RETRIES + 1}


def test_run_in_inside_a_unit_or_an_operation_runs_once(engine: sa.Engine, service: str) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=CONFIG)
    Other = rdb.ResilientSession(engine, service=f"{service}-other", config=CONFIG)
    calls = {"outer": 0, "inner": 0}

    def inner(session: Session) -> None:
        calls["inner"] += 1
        conflict(session)

    def in_same(session: Session) -> None:
        calls["outer"] += 1
        with Session() as mine:
            Session.run_in(mine, inner)

    def in_other(session: Session) -> None:
        calls["outer"] += 1
        with Other() as theirs:
            Other.run_in(theirs, inner)

    def in_operation() -> None:
        calls["outer"] += 1
        with Session() as mine:
            Session.run_in(mine, inner)

    cases: list[Any] = [
        lambda: Session.run(in_same),
        lambda: Session.run(in_other),
        lambda: rdb.with_self_healing(in_operation, service=service, config=CONFIG),
    ]
    for case in cases:
        calls.update(outer=0, inner=0)
        with pytest.raises(sa.exc.OperationalError):
            case()
        assert calls == {"outer": RETRIES + 1, "inner": RETRIES + 1}


def _failing_once(
    aengine: AsyncEngine, service: str
) -> tuple[list[int], Callable[[], Awaitable[int]]]:
    """An operation of ``service`` whose first attempt fails with a serialization failure and
    whose second returns 7; its attempts are counted in the list."""
    seen: list[int] = []

    @rdb.with_self_healing(service=service, config=CONFIG)
    async def flaky() -> int:
        seen.append(1)
        async with aengine.connect() as conn:
            if len(seen) < 2:
                await conn.execute(sa.text("SELECT raise_code('40001')"))
        return 7

    return seen, flaky


@pytest.mark.asyncio
async def test_async_operations_inside_an_async_unit_run_once(
    aengine: AsyncEngine, service: str
) -> None:
    Session = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    calls = {"unit": 0, "inner": 0}

    @rdb.with_self_healing(service=f"{service}-inner", config=CONFIG)
    async def decorated(session: AsyncSession) -> None:
        calls["inner"] += 1
        await aconflict(session)

    async def by_decorator(session: AsyncSession) -> None:
        calls["unit"] += 1
        await decorated(session)

    async def by_call(session: AsyncSession) -> None:
        calls["unit"] += 1

        async def inner() -> None:
            calls["inner"] += 1
            await aconflict(session)

        await rdb.with_self_healing(inner, service=f"{service}-inner", config=CONFIG)

    async def by_run_in(session: AsyncSession) -> None:
        calls["unit"] += 1

        async def inner(mine: AsyncSession) -> None:
            calls["inner"] += 1
            await aconflict(mine)

        async with Session() as mine:
            await Session.run_in(mine, inner)

    for unit in (by_decorator, by_call, by_run_in):
        calls.update(unit=0, inner=0)
        with pytest.raises(sa.exc.DBAPIError):
            await Session.run(unit)
        assert calls == {"unit": RETRIES + 1, "inner": RETRIES + 1}, unit.__name__

    # a task made inside a unit runs operations of its own: it is not inside the unit
    seen, flaky = _failing_once(aengine, f"{service}-task")

    async def spawns(session: AsyncSession) -> int:
        return await asyncio.create_task(flaky())

    assert await Session.run(spawns) == 7
    assert len(seen) == 2


# -- what can't be a unit or an operation -------------------------------------------------------
def test_generator_functions_are_refused(engine: sa.Engine, service: str) -> None:
    """A generator's body runs when it is iterated: after the unit committed and closed its
    session (its writes lost, a connection left checked out), or after the operation returned,
    outside its retries."""
    Session = rdb.ResilientSession(engine, service=service)

    def rows(session: Session) -> Iterator[int]:
        yield from session.execute(sa.text("SELECT 1")).scalars()

    async def arows() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="rows is a generator function"):
        Session.run(rows)
    with pytest.raises(TypeError, match="generator function"):
        Session.run(functools.partial(rows))
    with pytest.raises(TypeError, match="generator function"):
        Session.transactional(rows)
    with Session() as session, pytest.raises(TypeError, match="generator function"):
        Session.run_in(session, rows)
    for gen in (rows, arows):
        with pytest.raises(TypeError, match="generator function"):
            rdb.with_self_healing(service=service)(gen)
        with pytest.raises(TypeError, match="generator function"):
            rdb.with_self_healing(functools.partial(gen, None) if gen is rows else gen)

    class Rows:  # an object whose __call__ is a generator function
        def __call__(self) -> Iterator[int]:
            yield 1

    with pytest.raises(TypeError, match="generator function"):
        rdb.with_self_healing(Rows())
    with pytest.raises(TypeError, match="generator function"):
        rdb.with_self_healing(service=service)(Rows())
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_decorating_above_staticmethod_or_classmethod_keeps_the_kind_of_method(
    engine: sa.Engine, service: str
) -> None:
    """``@with_self_healing()`` written above ``@staticmethod`` or ``@classmethod`` decorates
    the function it holds: a static method is not given the instance as its first argument, a
    class method is not refused as no callable, an async one stays a coroutine function (as
    FastAPI looks for), and a generator is refused."""
    left = [1]

    class Repo:
        @rdb.with_self_healing(service=service, config=CONFIG)
        @staticmethod
        def static(x: int = 1) -> int:
            if left:
                left.pop()
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT raise_code('40001')"))
            return x

        @rdb.with_self_healing(service=service, config=CONFIG)
        @classmethod
        def named(cls, suffix: str = "") -> str:
            return cls.__name__ + suffix

        @rdb.with_self_healing(service=service, config=CONFIG)
        @staticmethod
        async def astatic(x: int) -> int:
            return x

    assert Repo().static() == 1  # replayed once
    assert Repo.static(2) == 2
    assert Repo().named("!") == Repo.named("!") == "Repo!"
    assert inspect.iscoroutinefunction(Repo.astatic)
    assert asyncio.run(Repo().astatic(3)) == 3
    assert list(inspect.signature(Repo().static).parameters) == ["x"]

    def rows() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        rdb.with_self_healing(service=service)(staticmethod(rows))


def test_with_self_healing_checks_its_arguments_in_both_forms(service: str) -> None:
    """A bad service name was accepted by the call form, and then broke ``health()`` and the
    Prometheus scrape for good (names sorted with None among them)."""
    for bad, error in ((None, TypeError), ("", ValueError), (123, TypeError)):
        with pytest.raises(error, match="service name"):
            rdb.with_self_healing(lambda: 1, service=bad)  # type: ignore[arg-type]
        with pytest.raises(error, match="service name"):
            rdb.with_self_healing(service=bad)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"takes a resilient_db\.Config, got str"):
        rdb.with_self_healing(lambda: 1, service=service, config="x")  # type: ignore[arg-type]
    assert rdb.with_self_healing(lambda: 1, service=service) == 1
    assert service in rdb.health()["services"]


def test_decorating_without_parentheses_is_refused_for_a_function_with_arguments(
    engine: sa.Engine, service: str
) -> None:
    """``@with_self_healing`` without its parentheses is the call form: it called the function
    at once, which failed with Python's "missing 1 required positional argument" (or, for an
    async one, made a coroutine that was never awaited) instead of saying what was wrong."""
    calls: list[str] = []

    with pytest.raises(TypeError, match=r"write @with_self_healing\(\) \(with its parentheses"):

        @rdb.with_self_healing  # type: ignore[arg-type]
        def load(task_id: int) -> int:
            calls.append("load")
            return task_id

    with pytest.raises(TypeError, match=r"with_self_healing\(.*aload\) calls .*aload\(\) now"):

        @rdb.with_self_healing  # type: ignore[arg-type]
        async def aload(*, task_id: int) -> int:
            calls.append("aload")
            return task_id

    class Repository:
        def get(self, task_id: int) -> int:
            calls.append("get")
            return task_id

        def count(self) -> int:
            calls.append("count")
            return 3

    with pytest.raises(TypeError, match="needs arguments"):
        rdb.with_self_healing(Repository().get, service=service)  # type: ignore[arg-type]
    assert calls == []
    assert rdb.health()["services"].get(service) is None  # nothing reached a breaker
    # what takes no arguments (or has defaults for them) is called as before
    assert rdb.with_self_healing(Repository().count, service=service) == 3
    assert rdb.with_self_healing(lambda task_id=5: task_id, service=service) == 5
    assert rdb.with_self_healing(functools.partial(Repository().get, 7), service=service) == 7
    assert calls == ["count", "get"]


@pytest.mark.asyncio
async def test_transactional_functions_take_no_session_in_their_signature(
    engine: sa.Engine, aengine: AsyncEngine, service: str
) -> None:
    """What ``transactional`` makes is called without the session: frameworks that read the
    signature (FastAPI's dependency injection) must not see one."""
    Session = rdb.ResilientSession(engine, service=service)
    AsyncSessionFactory = rdb.AsyncResilientSession(aengine, service=f"{service}-async")

    @Session.transactional
    def assign(session: Session, task_id: int, *, note: str = "") -> int:
        return task_id

    @Session.transactional(validate=int)
    def checked(session: Session, task_id: int) -> int:
        return task_id

    @AsyncSessionFactory.transactional
    async def aassign(session: AsyncSession, task_id: int) -> int:
        return task_id

    assert str(inspect.signature(assign)) == "(task_id: 'int', *, note: 'str' = '') -> 'int'"
    assert str(inspect.signature(checked)) == "(task_id: 'int') -> 'int'"
    assert str(inspect.signature(aassign)) == "(task_id: 'int') -> 'int'"
    assert assign.__name__ == "assign"
    assert aassign.__wrapped__.__name__ == "aassign"  # type: ignore[attr-defined]
    assert assign(5) == 5
    assert checked(6) == 6
    assert await aassign(7) == 7
    assert inspect.iscoroutinefunction(aassign)


@pytest.mark.asyncio
async def test_a_task_made_inside_an_operation_retries_on_its_own_once_it_returned(
    aengine: AsyncEngine, service: str
) -> None:
    """A task made inside an operation inherits its context (the running attempt): after the
    operation returned, the task's own operations are nested in nothing and retry."""
    seen, flaky = _failing_once(aengine, f"{service}-bg")
    returned = asyncio.Event()

    async def background() -> int:
        await returned.wait()
        return await flaky()

    tasks: list[asyncio.Task[int]] = []

    @rdb.with_self_healing(service=service, config=CONFIG)
    async def handler() -> str:
        tasks.append(asyncio.create_task(background()))
        return "handled"

    assert await handler() == "handled"
    returned.set()
    assert await tasks[0] == 7
    assert len(seen) == 2


@pytest.mark.asyncio
async def test_a_unit_in_a_task_made_inside_an_operation_retries_once_it_returned(
    aengine: AsyncEngine, service: str
) -> None:
    """The same for a unit of work run by such a task: once the operation returned, the unit
    retries on its own (it ran once, its conflict raised)."""
    Session = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> str:
        calls.append(1)
        if len(calls) == 1:
            await aconflict(session)
        return "done"

    returned = asyncio.Event()
    tasks: list[asyncio.Task[str]] = []

    async def later() -> str:
        await returned.wait()
        return await Session.run(unit)

    @rdb.with_self_healing(service=f"{service}-api", config=CONFIG)
    async def handler() -> str:
        tasks.append(asyncio.create_task(later()))
        return "accepted"

    assert await handler() == "accepted"
    returned.set()
    assert await tasks[0] == "done"
    assert len(calls) == 2


def test_an_operation_inside_a_unit_still_asks_its_services_breaker(
    engine: sa.Engine, service: str
) -> None:
    """Inside a database unit, an operation of another service (a payment API, say) whose
    circuit is open fails fast, and its failures count for its breaker."""
    Session = rdb.ResilientSession(engine, service=service, config=CONFIG)
    other = rdb.Config(failure_threshold=1, max_retries=0)
    charges: list[int] = []

    def charge() -> str:
        charges.append(1)
        with engine.connect() as conn:  # the other service is down: 57P03, a failure
            conn.execute(sa.text("SELECT raise_code('57P03')"))
        return "charged"

    with pytest.raises(sa.exc.OperationalError):
        rdb.with_self_healing(charge, service=f"{service}-payments", config=other)
    assert rdb.health()["services"][f"{service}-payments"]["breaker"]["state"] == "open"

    def unit(session: Session) -> str:
        return rdb.with_self_healing(charge, service=f"{service}-payments", config=other)

    with pytest.raises(rdb.CircuitOpenError):
        Session.run(unit)
    assert len(charges) == 1  # refused before it ran


def _down(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # the database refuses: a failure


def test_a_unit_inside_an_operation_of_another_service_asks_its_own_breaker(
    engine: sa.Engine, service: str
) -> None:
    """The other way round (a route handler decorated for an "api" service, running a unit of
    the "db" factory): the unit runs once per attempt of the operation, its failures count for
    its own breaker, and once that one is open the unit fails fast, the database untouched."""
    Session = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(failure_threshold=2, max_retries=RETRIES)
    )
    api = rdb.Config(max_retries=1)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        _down(session)

    with pytest.raises(sa.exc.OperationalError):
        rdb.with_self_healing(lambda: Session.run(unit), service=f"{service}-api", config=api)
    assert len(calls) == 2  # once per attempt of the operation: no retries of its own
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    assert attempts(service) == 2

    with pytest.raises(rdb.CircuitOpenError):
        rdb.with_self_healing(lambda: Session.run(unit), service=f"{service}-api", config=api)
    assert len(calls) == 2  # refused before it ran


def test_a_unit_inside_a_unit_of_another_service_asks_its_own_breaker(
    engine: sa.Engine, service: str
) -> None:
    Outer = rdb.ResilientSession(engine, service=f"{service}-outer", config=CONFIG)
    Inner = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(failure_threshold=1, max_retries=0)
    )
    calls: list[int] = []

    def inner(session: Session) -> None:
        calls.append(1)
        _down(session)

    # the inner unit's failure opens its breaker: the outer unit's replay meets it, open
    with pytest.raises(rdb.CircuitOpenError):
        Outer.run(lambda s: Inner.run(inner))
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    assert len(calls) == 1
    with pytest.raises(rdb.CircuitOpenError):
        Outer.run(lambda s: Inner.run(inner))
    assert len(calls) == 1  # refused before it ran


@pytest.mark.asyncio
async def test_an_async_unit_inside_an_operation_of_another_service_asks_its_own_breaker(
    aengine: AsyncEngine, service: str
) -> None:
    Session = rdb.AsyncResilientSession(
        aengine, service=service, config=rdb.Config(failure_threshold=2, max_retries=RETRIES)
    )
    api = rdb.Config(max_retries=1)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(sa.text("SELECT raise_code('57P03')"))

    async def operation() -> None:
        await Session.run(unit)

    with pytest.raises(sa.exc.DBAPIError):
        await rdb.with_self_healing(operation, service=f"{service}-api", config=api)
    assert len(calls) == 2
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    with pytest.raises(rdb.CircuitOpenError):
        await rdb.with_self_healing(operation, service=f"{service}-api", config=api)
    assert len(calls) == 2


# -- one breaker, asked once per attempt ---------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


HALF_OPEN = rdb.Config(failure_threshold=1, reset_timeout=1.0, half_open_probes=1)


def half_open(engine: Any, service: str, clock: Clock | None = None) -> Any:
    """A factory of ``service`` (async for an ``AsyncEngine``) whose breaker was opened and is
    half-open now, by ``clock``: one probe may go."""
    clock = clock or Clock()
    make = rdb.AsyncResilientSession if isinstance(engine, AsyncEngine) else rdb.ResilientSession
    Session = make(engine, service=service, config=HALF_OPEN, wall_clock=clock)
    reopen(Session, clock)
    return Session


def reopen(factory: Any, clock: Clock) -> None:
    """Open ``factory``'s breaker and let its reset timeout pass: half-open."""
    assert factory.policy.breaker is not None
    factory.policy.breaker.open()
    clock.now += HALF_OPEN.reset_timeout


def breaker_state(service: str) -> str:
    return str(rdb.health()["services"][service]["breaker"]["state"])


def test_a_half_open_breaker_closes_through_an_operation_using_a_drop_in_session(
    engine: sa.Engine, service: str
) -> None:
    """docs/web.md's pattern: ``with_self_healing(handler)`` whose handler opens a drop-in
    session of the same service. The operation was let through as the one probe, then its
    session's connect asked the same breaker again, found the probe slot taken and raised
    CircuitOpenError: the breaker stayed half-open for good, the database back."""
    Session = half_open(engine, service)
    engine.dispose()  # the session must connect

    def handler() -> int:
        with Session.begin() as session:
            return int(session.execute(sa.text("SELECT 1")).scalar_one())

    assert rdb.with_self_healing(handler, service=service, config=Session.config) == 1
    assert breaker_state(service) == "closed"


def test_a_half_open_breaker_closes_through_a_unit_calling_a_decorated_helper(
    engine: sa.Engine, service: str
) -> None:
    """A unit whose code calls a ``@with_self_healing`` helper of the same service (as the
    docs/web.md allows): the helper asked the breaker again and was refused."""
    Session = half_open(engine, service)

    @rdb.with_self_healing(service=service, config=Session.config)
    def helper(session: Session) -> int:
        return int(session.execute(sa.text("SELECT 2")).scalar_one())

    assert Session.run(helper) == 2
    assert breaker_state(service) == "closed"


@pytest.mark.asyncio
async def test_a_half_open_breaker_closes_through_an_async_operation_running_a_unit(
    aengine: AsyncEngine, service: str
) -> None:
    """An operation that does not retry (``use_retry=False``) running a unit of the same
    service: the unit asked the breaker again, refused; it runs as part of the operation's
    attempt now."""
    Session = half_open(aengine, service)

    async def unit(session: AsyncSession) -> int:
        return int((await session.execute(sa.text("SELECT 3"))).scalar_one())

    async def operation() -> int:
        return await Session.run(unit)

    assert (
        await rdb.with_self_healing(operation, service=service, config=HALF_OPEN, use_retry=False)
        == 3
    )
    assert breaker_state(service) == "closed"


def test_a_drop_in_sessions_connect_inside_an_operation_is_not_retried_again(
    engine: sa.Engine, service: str, fault_proxy: Any
) -> None:
    """The database refusing connections: each attempt of the operation ran the drop-in connect
    retry's own loop (16 connects where one loop makes 4, 15 retry lines, the deadline twice
    over). The operation retries; its session connects once per attempt."""
    proxied = sa.create_engine(fault_proxy.url(engine.url.database))
    Session = rdb.ResilientSession(
        proxied, service=service, config=rdb.Config(max_retries=RETRIES, failure_threshold=100)
    )
    connects: list[int] = []
    connect = proxied.dialect.connect

    def counted(*args: Any, **kwargs: Any) -> Any:  # every connect the driver is asked for
        connects.append(1)
        return connect(*args, **kwargs)

    proxied.dialect.connect = counted  # type: ignore[method-assign]

    def handler() -> int:
        with Session.begin() as session:
            return int(session.execute(sa.text("SELECT 1")).scalar_one())

    fault_proxy.refuse()
    try:
        with pytest.raises(sa.exc.OperationalError):
            rdb.with_self_healing(handler, service=service, config=Session.config)
    finally:
        fault_proxy.restore()
        proxied.dispose()
    assert len(connects) == RETRIES + 1
    assert attempts(service) == RETRIES + 1


def test_a_half_open_breaker_closes_through_calls_nested_two_deep(
    engine: sa.Engine, service: str
) -> None:
    """An operation calling a decorated helper of its service that opens a drop-in session,
    and a unit calling a helper that calls another: the first nested call ran without a
    breaker of its own and said none had admitted it, so the call below it asked again."""
    clock = Clock()
    Session = half_open(engine, service, clock)
    engine.dispose()  # the drop-in session must connect

    @rdb.with_self_healing(service=service, config=HALF_OPEN)
    def reads() -> int:
        with Session.begin() as session:
            return int(session.execute(sa.text("SELECT 1")).scalar_one())

    assert rdb.with_self_healing(reads, service=service, config=HALF_OPEN) == 1
    assert breaker_state(service) == "closed"

    reopen(Session, clock)

    @rdb.with_self_healing(service=service, config=HALF_OPEN)
    def inner(session: Session) -> int:
        return int(session.execute(sa.text("SELECT 2")).scalar_one())

    @rdb.with_self_healing(service=service, config=HALF_OPEN)
    def outer(session: Session) -> int:
        return inner(session)

    assert Session.run(outer) == 2
    assert breaker_state(service) == "closed"


def test_a_factory_made_before_reset_state_is_not_asked_again_inside_an_operation(
    engine: sa.Engine, service: str
) -> None:
    """After reset_state(), the factory still held the breaker the reset forgot: inside an
    operation of its service that the new breaker had let through as the half-open probe, it
    took that breaker for another and asked again, refused."""
    Session = rdb.ResilientSession(engine, service=service, config=HALF_OPEN)
    rdb.reset_state()
    later = half_open(engine, service)  # the service's new breaker, half-open
    assert later.policy.breaker is not Session.policy.breaker

    def operation() -> int:
        return int(Session.run(lambda session: session.execute(sa.text("SELECT 7")).scalar()))

    assert rdb.with_self_healing(operation, service=service, config=HALF_OPEN, use_retry=False) == 7
    assert breaker_state(service) == "closed"


@pytest.mark.asyncio
async def test_an_operation_returning_a_running_task_keeps_its_admission(
    aengine: AsyncEngine, service: str
) -> None:
    """``with_self_healing(lambda: task)``: the task runs whether it is awaited or not, so its
    admission stays the one taken at the call (given back and asked again at the await, it
    was refused there while its work went on, uncounted)."""
    half_open(aengine, service)
    done: list[str] = []
    go_on = asyncio.Event()

    async def work() -> str:
        await go_on.wait()  # running, not done, while the other operation asks
        done.append("written")
        return "ok"

    async def other() -> str:
        return "other"

    first = rdb.with_self_healing(
        lambda: asyncio.ensure_future(work()), service=service, config=HALF_OPEN
    )
    with pytest.raises(rdb.CircuitOpenError):  # the probe's slot is the task's
        await rdb.with_self_healing(other, service=service, config=HALF_OPEN)
    go_on.set()
    assert await first == "ok"
    assert done == ["written"]
    assert breaker_state(service) == "closed"


def test_a_helper_that_asks_no_breaker_passes_its_services_admission_on(
    engine: sa.Engine, service: str
) -> None:
    """An operation of the service calls a helper decorated with ``use_circuit_breaker=False``
    that runs a unit of the service: the helper's attempt said no breaker had admitted it, so
    the unit asked the half-open breaker again while the operation held its one probe slot."""
    Session = half_open(engine, service)

    @rdb.with_self_healing(service=service, config=HALF_OPEN, use_circuit_breaker=False)
    def helper() -> int:
        return int(Session.run(lambda session: session.execute(sa.text("SELECT 7")).scalar()))

    @rdb.with_self_healing(service=service, config=HALF_OPEN)
    def operation() -> int:
        return helper()

    assert operation() == 7
    assert breaker_state(service) == "closed"


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_running_task_never_awaited_through_its_operation_gives_its_slot_back(
    aengine: AsyncEngine, service: str
) -> None:
    """``with_self_healing(lambda: task)`` keeps the admission taken when it is called (the
    task runs either way); if the operation itself is never started (a caller whose deadline
    was already spent), the half-open probe's slot is given back when the task ends, or the
    breaker stayed half-open for good."""
    half_open(aengine, service)
    done: list[str] = []

    async def work() -> str:
        done.append("ran")
        return "ok"

    operation = rdb.with_self_healing(
        lambda: asyncio.ensure_future(work()), service=service, config=HALF_OPEN
    )
    with pytest.raises(asyncio.TimeoutError):  # (the builtin one since Python 3.11)
        await asyncio.wait_for(operation, 0)  # cancelled before its first step
    for _ in range(3):
        await asyncio.sleep(0)  # the task runs to its end
    assert done == ["ran"]

    async def other() -> str:
        return "other"

    assert await rdb.with_self_healing(other, service=service, config=HALF_OPEN) == "other"
    assert breaker_state(service) == "closed"


# -- savepoints inside a unit -------------------------------------------------------------------
SAVED = sa.table("saved_rows", sa.column("name", sa.Text))


@pytest.fixture
def saved_rows(engine: sa.Engine) -> Callable[[], list[str]]:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE saved_rows (name text PRIMARY KEY)"))

    def names() -> list[str]:
        with engine.connect() as conn:
            return sorted(conn.scalars(sa.select(SAVED.c.name)))

    return names


def _in_savepoint(session: Session, name: str) -> None:
    with session.begin_nested():
        session.execute(sa.insert(SAVED).values(name=name))


def _released(session: Session, name: str) -> None:
    nested = session.begin_nested()
    session.execute(sa.insert(SAVED).values(name=name))
    nested.commit()


SAVEPOINT_FORMS: dict[str, Callable[[Session, str], None]] = {
    "with begin_nested()": _in_savepoint,
    "begin_nested().commit()": _released,
}


@pytest.mark.parametrize("form", list(SAVEPOINT_FORMS))
def test_a_unit_that_released_a_savepoint_is_still_replayed(
    engine: sa.Engine, service: str, saved_rows: Callable[[], list[str]], form: str
) -> None:
    """Releasing a savepoint commits nothing (SQLAlchemy fires ``after_commit`` for it all the
    same): a conflict later in the attempt replays the unit, which writes its row once."""
    Session = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []

    def unit(session: Session) -> str:
        calls.append(1)
        SAVEPOINT_FORMS[form](session, "kept")
        if len(calls) == 1:
            conflict(session)
        return "done"

    assert Session.run(unit) == "done"
    assert calls == [1, 1]
    assert saved_rows() == ["kept"]


def test_a_unit_that_committed_after_a_savepoint_is_not_replayed(
    engine: sa.Engine, service: str, saved_rows: Callable[[], list[str]]
) -> None:
    """The other side: a savepoint released, then the unit's own ``commit()``: that committed,
    and a replay would write the row twice."""
    Session = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        _in_savepoint(session, "committed")
        session.commit()
        conflict(session)

    with pytest.raises(sa.exc.DBAPIError) as raised:
        Session.run(unit)
    assert calls == [1]
    assert partly_committed(raised.value)
    assert not rdb.is_transient(raised.value)
    assert saved_rows() == ["committed"]


def test_an_operation_whose_drop_in_session_released_a_savepoint_is_still_replayed(
    engine: sa.Engine, service: str, saved_rows: Callable[[], list[str]]
) -> None:
    Session = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []

    @rdb.with_self_healing(service=service, config=CONFIG)
    def operation() -> str:
        calls.append(1)
        with Session.begin() as session:
            _in_savepoint(session, "op")
            if len(calls) == 1:
                conflict(session)
        return "done"

    assert operation() == "done"
    assert calls == [1, 1]
    assert saved_rows() == ["op"]


@pytest.mark.asyncio
async def test_an_async_unit_that_released_a_savepoint_is_still_replayed(
    aengine: AsyncEngine, service: str, saved_rows: Callable[[], list[str]]
) -> None:
    Session = rdb.AsyncResilientSession(aengine, service=service, config=CONFIG)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> str:
        calls.append(1)
        async with session.begin_nested():
            await session.execute(sa.insert(SAVED).values(name="async"))
        if len(calls) == 1:
            await aconflict(session)
        return "done"

    assert await Session.run(unit) == "done"
    assert calls == [1, 1]
    assert saved_rows() == ["async"]


class _SlowAfterCommit(Session):
    """A session class whose ``after_commit`` listener awaits I/O (a message sent, say)."""


@sa.event.listens_for(_SlowAfterCommit, "after_commit")
def _slow_after_commit(session: Session) -> None:
    entered = session.info.get("slow")  # an asyncio.Event: set once the listener awaits
    if entered is not None and not entered.is_set():
        from sqlalchemy.util import await_only  # noqa: PLC0415 - in SQLAlchemy's greenlet

        entered.set()
        await_only(asyncio.sleep(30))  # (until a deadline interrupts it: bounded)


@pytest.mark.asyncio
@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout: 3.11+")
async def test_an_operation_whose_nested_unit_committed_then_was_interrupted_is_not_replayed(
    aengine: AsyncEngine, engine: sa.Engine, saved_rows: Callable[[], list[str]], service: str
) -> None:
    """An operation's nested unit commits, then a deadline interrupts it in its COMMIT step
    (its ``after_commit`` listener awaiting); the operation catches the ``TimeoutError``
    (answered saved-then-interrupted) and goes on, and a later conflict fails it. It was
    replayed, the nested unit with it: its row written twice. The enclosing attempt is told
    that part of its work committed: not replayed, partly committed."""
    Sessions = rdb.AsyncResilientSession(
        aengine, service=service, config=CONFIG, sync_session_class=_SlowAfterCommit
    )
    calls: list[int] = []
    entered = asyncio.Event()  # the nested unit's after_commit listener awaits

    async def save(session: AsyncSession) -> None:
        session.sync_session.info["slow"] = entered
        await session.execute(sa.insert(SAVED).values(name=f"saved-{len(calls)}"))

    async def expire_once_committed(deadline: asyncio.Timeout) -> None:
        # the deadline reached in the COMMIT step (its listener seen awaiting), however long
        # the unit took to get there: not a fixed time, which a busy machine may overrun
        await entered.wait()
        deadline.reschedule(asyncio.get_running_loop().time())

    async def operation() -> None:
        calls.append(1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None) as deadline:
                watcher = asyncio.ensure_future(expire_once_committed(deadline))
                try:
                    await Sessions.run(save)
                finally:
                    watcher.cancel()
        await Sessions.run(aconflict)

    with pytest.raises(sa.exc.DBAPIError) as raised:
        await rdb.with_self_healing(operation, service=f"{service}-op", config=CONFIG)
    assert partly_committed(raised.value)
    assert calls == [1]
    assert saved_rows() == ["saved-1"]
