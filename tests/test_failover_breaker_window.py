"""A fast failover is one failure for the circuit breaker, reconnects included: the units that
began while the primary crashed reconnect while the standby is being promoted, and their
connects are refused (the crashed primary) or rejected (the standby, not yet taking writes for
``target_session_attrs=read-write``) within milliseconds. Those failures are the failover
window's, as the in-flight ones are: each such attempt began before the failure the breaker
counted for the crash, and failed within 1 s after it. (They used to count one each, as a
connect that timed out does: five writers reconnecting during a promotion of a few tens of
milliseconds opened a threshold-5 breaker for its 30 s reset timeout.)

Real servers (:class:`~resilient_db.testing.StandbyPair`, synchronous replication), real
writers (psycopg threads, asyncpg tasks). The race is made deterministic: the units are held
at their start until the crash was counted, their backoffs until the standby is promoted.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for
from scenarios import BREAKER_THROUGH_FAILOVER
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import StandbyPair

DATABASE = "app"
#: writers whose unit starts before the crash and connects after it was counted (one more
#: than the threshold would need alone: with the crash's own failure, twice the threshold)
LATE = 5
INSERT = sa.text("INSERT INTO ledger (key, port) VALUES (:key, inet_server_port()) RETURNING port")
WAIT = 30.0

_services = itertools.count()


class Failover:
    """One writer in flight (a connection held, a statement run) and :data:`LATE` writers
    whose unit has begun without a connection yet, all held until :meth:`run` lets them go:
    the primary crashes, the writer in flight fails (the failure counted), the late writers
    connect (refused), and the standby is promoted once every one of them has failed."""

    def __init__(self, pair: StandbyPair, driver: str) -> None:
        self.pair = pair
        self.driver = driver
        self.service = f"failover-window-{next(_services)}"
        self.hold = threading.Event()
        self.holding = threading.Semaphore(0)  # a writer is held in its unit
        self.crashed = threading.Event()
        self.release_late = threading.Event()
        self.hold_backoffs = threading.Event()
        self.failed = threading.Semaphore(0)  # an attempt failed: its backoff, or its unit's end
        self.promoted = threading.Event()
        self.stop = threading.Event()
        self.ports: list[int] = []
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()

    # -- what the writers do -----------------------------------------------------------------
    def _before(self, writer: int) -> Callable[[], None] | None:
        """Where a held unit waits: the writer in flight after its first statement, the late
        ones before any."""
        if not self.hold.is_set():
            return None
        self.holding.release()
        if writer == 0:
            return lambda: _wait(self.crashed, "the crash")
        _wait(self.release_late, "the late units' release")
        return None

    def _backoff(self) -> None:
        if self.hold_backoffs.is_set():
            self.failed.release()
            _wait(self.promoted, "the promotion")

    def _record(self, port: int | None, error: BaseException | None) -> None:
        with self._lock:
            if error is None:
                assert port is not None
                self.ports.append(port)
            else:
                self.failures.append(error)
        if error is not None:
            self.failed.release()

    def acked(self, port: int) -> int:
        with self._lock:
            return self.ports.count(port)

    def _sync_writer(self, factory: rdb.ResilientSession[Session], writer: int) -> None:
        def unit(session: Session, key: str) -> int:
            after_first = self._before(writer)
            if after_first is not None:
                session.execute(sa.text("SELECT 1"))
                after_first()
            return int(session.execute(INSERT, {"key": key}).scalar_one())

        for n in itertools.count():
            if self.stop.is_set():
                return
            try:
                port = factory.run(unit, f"w{writer}-{n}")
            except Exception as exc:
                self._record(None, exc)
                return  # (a breaker that opened: not a storm of rejected calls)
            else:
                self._record(port, None)

    async def _async_writer(
        self, factory: rdb.AsyncResilientSession[AsyncSession], writer: int
    ) -> None:
        async def unit(session: AsyncSession, key: str) -> int:
            after_first = await asyncio.to_thread(self._before, writer)
            if after_first is not None:
                await session.execute(sa.text("SELECT 1"))
                await asyncio.to_thread(after_first)
            return int((await session.execute(INSERT, {"key": key})).scalar_one())

        for n in itertools.count():
            if self.stop.is_set():
                return
            try:
                port = await factory.run(unit, f"w{writer}-{n}")
            except Exception as exc:
                self._record(None, exc)
                return  # (a breaker that opened: not a storm of rejected calls)
            else:
                self._record(port, None)

    async def _async_main(self) -> None:
        async def asleep(seconds: float) -> None:
            await asyncio.to_thread(self._backoff)
            await asyncio.sleep(seconds)

        engine = create_async_engine(
            self.pair.url(DATABASE, driver="asyncpg"), connect_args={"timeout": 2}
        )
        try:
            factory = rdb.AsyncResilientSession(
                engine, service=self.service, config=BREAKER_THROUGH_FAILOVER, asleep=asleep
            )
            await asyncio.gather(*(self._async_writer(factory, w) for w in range(1 + LATE)))
        finally:
            await engine.dispose()

    def _threads(self) -> tuple[list[threading.Thread], Callable[[], None]]:
        if self.driver == "asyncpg":
            return [threading.Thread(target=asyncio.run, args=(self._async_main(),))], _nothing
        engine = sa.create_engine(
            self.pair.url(DATABASE, driver="psycopg"), connect_args={"connect_timeout": 2}
        )

        def sleep(seconds: float) -> None:
            self._backoff()
            threading.Event().wait(seconds)

        factory = rdb.ResilientSession(
            engine, service=self.service, config=BREAKER_THROUGH_FAILOVER, sleep=sleep
        )
        threads = [
            threading.Thread(target=self._sync_writer, args=(factory, w)) for w in range(1 + LATE)
        ]
        return threads, engine.dispose

    # -- the failover --------------------------------------------------------------------------
    def run(self) -> None:
        pair = self.pair
        threads, dispose = self._threads()
        for thread in threads:
            thread.daemon = True
            thread.start()
        try:
            wait_for(lambda: self.acked(pair.primary.port) >= 20, "writes on the primary")
            self.hold.set()
            for _ in range(1 + LATE):  # every writer held in a unit
                assert self.holding.acquire(timeout=WAIT), "a writer never reached its unit"
            self.hold.clear()
            self.hold_backoffs.set()
            pair.crash_primary()
            self.crashed.set()
            # the writer in flight failed, its failure counted: it backs off
            assert self.failed.acquire(timeout=WAIT), "the unit in flight did not fail"
            breaker = rdb.health()["services"][self.service]["breaker"]
            assert breaker["state"] == "closed", breaker
            self.release_late.set()
            for _ in range(LATE):  # every late writer's connect failed (refused)
                assert self.failed.acquire(timeout=WAIT), "a late unit did not fail"
            # one failure counted for the failover, the reconnects' not again: still closed
            breaker = rdb.health()["services"][self.service]["breaker"]
            assert breaker["state"] == "closed", (breaker, self.failures)
            pair.promote()
            self.hold_backoffs.clear()
            self.promoted.set()
            wait_for(lambda: self.acked(pair.standby.port) >= 20, "writes on the new primary")
        finally:
            self.crashed.set()
            self.release_late.set()
            self.hold_backoffs.clear()
            self.promoted.set()
            self.stop.set()
            for thread in threads:
                thread.join(WAIT)
            dispose()
        assert not any(thread.is_alive() for thread in threads), "a writer did not finish"


def _wait(event: threading.Event, what: str) -> None:
    assert event.wait(WAIT), f"waited in vain for {what}"


def _nothing() -> None:
    pass


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_reconnects_refused_during_a_fast_failover_do_not_open_the_breaker(
    pg_standby: StandbyPair, driver: str
) -> None:
    pair = pg_standby
    pair.create_database(DATABASE)
    pair.execute(
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, key text NOT NULL, port integer NOT NULL)",
        database=DATABASE,
    )
    pair.wait_replayed()
    failover = Failover(pair, driver)
    failover.run()
    assert failover.failures == [], failover.failures
    service: Any = rdb.health()["services"][failover.service]
    assert service["counters"]["breaker_opens"] == 0, service
    assert service["counters"]["breaker_rejections"] == 0, service
    assert service["breaker"]["state"] == "closed", service
