"""A pybreaker listener given as ``breaker_listeners=`` hears of each attempt's outcome, as
pybreaker's own ``CircuitBreaker.call`` tells it: ``success(cb)`` and ``failure(cb, exc)`` with
the database's error, beside ``state_change``. Errors that are not transient (a unique
violation, a missing table) count neither way: nothing is told."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pybreaker
import pytest
import sqlalchemy as sa
from scenarios import RAISE_CODE_FUNCTION, FakeClock
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._state import STATE

pytestmark = pytest.mark.usefixtures("no_backoff")


class Heard(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.heard: list[tuple[str, ...]] = []

    def success(self, cb: Any) -> None:
        self.heard.append(("success", cb.name))

    def failure(self, cb: Any, exc: BaseException) -> None:
        sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
        self.heard.append(("failure", type(exc).__name__, str(sqlstate)))

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.heard.append(("state", getattr(old_state, "name", ""), new_state.name))


def raising(code: str) -> Any:
    def unit(session: Session) -> None:
        session.execute(sa.text(f"SELECT raise_code('{code}')"))

    return unit


def test_a_listener_hears_each_attempts_success_and_failure(
    engine: sa.Engine, service: str
) -> None:
    heard = Heard()
    Session = rdb.ResilientSession(
        engine,
        service=service,
        breaker_listeners=[heard],
        config=rdb.Config(failure_threshold=3, max_retries=1),
    )
    assert Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    with pytest.raises(sa.exc.IntegrityError):
        Session.run(raising("23505"))  # not transient: neither way
    with pytest.raises(sa.exc.ProgrammingError):
        Session.run(raising("42P01"))
    with pytest.raises(sa.exc.OperationalError):
        Session.run(raising("57P03"))  # an attempt and its retry: two failures
    with pytest.raises(rdb.CircuitOpenError):
        Session.run(raising("57P03"))  # the third opens it
    failure = ("failure", "OperationalError", "57P03")
    # as pybreaker tells them: the failure after its state change (the opening it made)
    assert heard.heard == [
        ("success", service),
        failure,
        failure,
        ("state", "closed", "open"),
        failure,
    ]


@pytest.mark.asyncio
async def test_an_async_factorys_listener_hears_them_too(pg_async_url: str, service: str) -> None:
    engine = create_async_engine(pg_async_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(RAISE_CODE_FUNCTION)
        heard = Heard()
        Session = rdb.AsyncResilientSession(
            engine,
            service=service,
            breaker_listeners=[heard],
            config=rdb.Config(failure_threshold=5, max_retries=0),
        )

        async def ok(session: AsyncSession) -> int:
            return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

        async def unavailable(session: AsyncSession) -> None:
            await session.execute(sa.text("SELECT raise_code('57P03')"))

        async def duplicate(session: AsyncSession) -> None:
            await session.execute(sa.text("SELECT raise_code('23505')"))

        assert await Session.run(ok) == 1
        with pytest.raises(sa.exc.DBAPIError):
            await Session.run(unavailable)
        with pytest.raises(sa.exc.IntegrityError):
            await Session.run(duplicate)
        assert await Session.run(ok) == 1
        assert [h[0] for h in heard.heard] == ["success", "failure", "success"]
        assert heard.heard[1][2] == "57P03"
    finally:
        await engine.dispose()


class Raising(pybreaker.CircuitBreakerListener):
    def success(self, cb: Any) -> None:
        raise RuntimeError("a listener's bug")

    def failure(self, cb: Any, exc: BaseException) -> None:
        raise RuntimeError("a listener's bug")


def test_a_listener_that_raises_is_logged_not_raised_into_the_unit(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    Session = rdb.ResilientSession(
        engine,
        service=service,
        breaker_listeners=[Raising()],
        config=rdb.Config(failure_threshold=1, max_retries=0),
    )
    assert Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    with pytest.raises(sa.exc.OperationalError):  # its own error, counted: the breaker opened
        Session.run(raising("57P03"))
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    parts = [e.fields["part"] for e in events if e.name == "machinery_failed"]
    assert parts == [
        "circuit breaker success accounting",
        "circuit breaker failure accounting",
    ]


def test_a_call_refused_while_the_probe_runs_is_told_half_open_not_open(
    engine: sa.Engine, service: str
) -> None:
    """The probe slot taken by a unit still running: the next unit is refused with
    ``state == "half-open"`` and a message saying so, not "open after repeated failures"."""
    clock = FakeClock(1.7e9)
    Session = rdb.ResilientSession(
        engine,
        service=service,
        wall_clock=clock,
        config=rdb.Config(failure_threshold=1, max_retries=0, reset_timeout=10),
    )
    with pytest.raises(sa.exc.OperationalError):
        Session.run(raising("57P03"))
    with pytest.raises(rdb.CircuitOpenError) as opened:
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    assert opened.value.state == "open"
    assert "is open after repeated database failures" in str(opened.value)
    clock.advance(11)  # the reset timeout is over: the next unit is the probe
    inside, release = threading.Event(), threading.Event()
    results: list[object] = []

    def probe(session: Session) -> int:
        session.execute(sa.text("SELECT 1"))
        inside.set()
        release.wait(30)
        return 1

    worker = threading.Thread(target=lambda: results.append(Session.run(probe)))
    worker.start()
    try:
        assert inside.wait(30)
        with pytest.raises(rdb.CircuitOpenError) as refused:
            Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    finally:
        release.set()
        worker.join(30)
    assert refused.value.state == "half-open"
    assert "half-open, every probe slot taken" in str(refused.value)
    assert "after repeated database failures" not in str(refused.value)
    assert results == [1]
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"


def test_the_listeners_of_factories_gone_are_dropped(engine: sa.Engine, service: str) -> None:
    """A factory made per request (or per tenant), each given a listener of its own, added it
    to its service's breaker for good (the breaker lives as long as the process): the
    listeners piled up, each told of every outcome. A listener stays while a factory that gave
    it lives (another factory given the same one included), and is dropped after."""
    kept = Heard()
    keeper = rdb.ResilientSession(engine, service=service, breaker_listeners=[kept])
    for _ in range(50):
        rdb.ResilientSession(engine, service=service, breaker_listeners=[Heard()])
    shared = Heard()
    first = rdb.ResilientSession(engine, service=service, breaker_listeners=[shared])
    second = rdb.ResilientSession(engine, service=service, breaker_listeners=[shared])
    del first
    gc.collect()  # (a factory and the class it makes refer to each other)
    last = Heard()
    newest = rdb.ResilientSession(engine, service=service, breaker_listeners=[last])
    breaker = STATE.breakers[service]
    assert [x for x in breaker._cb.listeners if isinstance(x, Heard)] == [kept, shared, last]
    assert keeper.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    assert [kept.heard, shared.heard, last.heard] == [[("success", service)]] * 3
    assert second.kw is not None  # (alive until here)
    assert newest.kw is not None
