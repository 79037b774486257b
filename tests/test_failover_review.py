"""Failover as a new user sets it up, in the ways tests/test_failover.py does not: the other
``target_session_attrs`` spellings, the standby listed first, the hosts given by ``connect_args``,
``pool_pre_ping``, a standby never promoted, a two-phase unit prepared at the crash, a COMMIT
answer lost at the crash with asynchronous replication.

Real servers (:class:`~resilient_db.testing.StandbyPair`), real faults (an immediate stop of the
primary, ``pg_promote``, a :class:`~resilient_db.testing.FaultProxy`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from processes import wait_for
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _commit
from resilient_db._commit import MULTI_HOST_CONNECT_TIMEOUT
from resilient_db.testing import FaultProxy, StandbyPair

pytestmark = pytest.mark.slow

DRIVERS = ["psycopg", "asyncpg"]
DATABASE = "app"
LEDGER_DDL = "CREATE TABLE ledger (id bigserial PRIMARY KEY, key text NOT NULL, port int NOT NULL)"
INSERT = sa.text("INSERT INTO ledger (key, port) VALUES (:key, inet_server_port()) RETURNING port")
PORT = sa.text("SELECT inet_server_port()")
#: retries in milliseconds, enough to outlast a promotion; no breaker
CONFIG = rdb.Config(
    initial_delay=0.01, max_delay=0.05, max_retries=200, deadline=15.0, circuit_breaker=False
)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(".")[:3] if n.isdigit())


def prepare(pair: StandbyPair, *, markers: bool = True) -> None:
    pair.create_database(DATABASE)
    engine = sa.create_engine(pair.primary.url(DATABASE))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(LEDGER_DDL))
        if markers:
            rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    pair.wait_replayed()


def ledger(pair: StandbyPair) -> dict[str, int]:
    rows = pair.execute("SELECT key, count(*) FROM ledger GROUP BY key", database=DATABASE)
    return {str(key): int(count) for key, count in rows}


def hosts_url(
    pair: StandbyPair, driver: str, hosts: list[tuple[str, int]], attrs: str | None
) -> sa.URL:
    url = sa.make_url(pair.url(DATABASE, driver=driver))
    query: dict[str, Any] = {"host": [f"{h}:{p}" for h, p in hosts]}
    url = url.difference_update_query(["target_session_attrs"]).update_query_dict(query)
    if attrs is not None:
        url = url.update_query_dict({"target_session_attrs": attrs})
    return url


class Units:
    """A factory of ``driver`` on ``url`` (async ones on a loop of their own), running units
    that write one ledger row (or only read) and return the server's port."""

    def __init__(
        self,
        url: sa.URL | str,
        driver: str,
        *,
        config: rdb.Config = CONFIG,
        service: str = "review",
        calls: list[str] | None = None,
        on_backoff: Callable[[float], None] | None = None,
        **engine_args: Any,
    ) -> None:
        def sleep(seconds: float) -> None:
            if on_backoff is not None:
                on_backoff(seconds)
            time.sleep(seconds)

        async def asleep(seconds: float) -> None:
            if on_backoff is not None:
                on_backoff(seconds)
            await asyncio.sleep(seconds)

        self.driver = driver
        self.calls = calls if calls is not None else []
        # (a loop of its own, run for each call: asyncio.Runner is Python 3.11's)
        self._runner: asyncio.AbstractEventLoop | None = None
        if driver == "asyncpg":
            self._runner = asyncio.new_event_loop()

            async def make() -> Any:
                return create_async_engine(url, **engine_args)

            self.engine: Any = self._runner.run_until_complete(make())
            self.factory: Any = rdb.AsyncResilientSession(
                self.engine, service=service, config=config, asleep=asleep
            )
        else:
            self.engine = sa.create_engine(url, **engine_args)
            self.factory = rdb.ResilientSession(
                self.engine, service=service, config=config, sleep=sleep
            )

    def write(self, key: str) -> int:
        if self._runner is not None:

            async def unit(session: AsyncSession) -> int:
                self.calls.append(key)
                return int((await session.execute(INSERT, {"key": key})).scalar_one())

            return int(self._runner.run_until_complete(self.factory.run(unit)))

        def sync_unit(session: Session) -> int:
            self.calls.append(key)
            return int(session.execute(INSERT, {"key": key}).scalar_one())

        return int(self.factory.run(sync_unit))

    def read(self) -> int:
        if self._runner is not None:

            async def unit(session: AsyncSession) -> int:
                return int((await session.execute(PORT)).scalar_one())

            return int(self._runner.run_until_complete(self.factory.run(unit)))
        return int(self.factory.run(lambda s: s.execute(PORT).scalar_one()))

    def close(self) -> None:
        if self._runner is not None:
            self._runner.run_until_complete(self.engine.dispose())
            self._runner.close()
        else:
            self.engine.dispose()


@contextmanager
def units(url: sa.URL | str, driver: str, **kwargs: Any) -> Iterator[Units]:
    made = Units(url, driver, **kwargs)
    try:
        yield made
    finally:
        made.close()


def fail_over(pair: StandbyPair) -> None:
    pair.crash_primary()
    pair.promote()


# -- target_session_attrs spellings, the standby listed first ------------------------------------
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("attrs", ["primary", "read-write"])
def test_units_resume_on_the_new_primary_with_the_standby_listed_first(
    pg_standby: StandbyPair, driver: str, attrs: str
) -> None:
    pair = pg_standby
    prepare(pair)
    hosts = [(pair.standby.host, pair.standby.port), (pair.primary.host, pair.primary.port)]
    with units(hosts_url(pair, driver, hosts, attrs), driver) as made:
        assert made.write("before") == pair.primary.port
        fail_over(pair)
        assert made.write("after") == pair.standby.port
    assert ledger(pair) == {"before": 1, "after": 1}
    assert made.calls.count("before") == 1


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("attrs", ["read-only", "standby", "prefer-standby", "any"])
def test_reading_spellings_land_where_libpq_says(
    pg_standby: StandbyPair, driver: str, attrs: str
) -> None:
    """The primary listed first: read-only/standby/prefer-standby land on the standby, any on
    the primary."""
    if (
        attrs == "prefer-standby"
        and driver == "psycopg"
        and _version(psycopg.__version__) < (3, 2, 6)
    ):
        pytest.skip("psycopg before 3.2.6 tries each host as 'any' under prefer-standby")
    pair = pg_standby
    prepare(pair, markers=False)
    hosts = [(pair.primary.host, pair.primary.port), (pair.standby.host, pair.standby.port)]
    with units(hosts_url(pair, driver, hosts, attrs), driver) as made:
        port = made.read()
    expected = pair.primary.port if attrs == "any" else pair.standby.port
    assert port == expected


# -- hosts given by connect_args -----------------------------------------------------------------
def connect_args_hosts(pair: StandbyPair, driver: str, first: tuple[str, int]) -> dict[str, Any]:
    hosts = [first[0], pair.standby.host]
    ports = [first[1], pair.standby.port]
    if driver == "asyncpg":
        return {"host": hosts, "port": ports, "target_session_attrs": "read-write"}
    return {
        "host": ",".join(hosts),
        "port": ",".join(str(p) for p in ports),
        "target_session_attrs": "read-write",
    }


def bare_url(pair: StandbyPair, driver: str) -> sa.URL:
    return sa.make_url(pair.url(DATABASE, driver=driver)).difference_update_query(
        ["host", "target_session_attrs"]
    )


@pytest.mark.parametrize("driver", DRIVERS)
def test_hosts_given_by_connect_args_fail_over(pg_standby: StandbyPair, driver: str) -> None:
    pair = pg_standby
    prepare(pair)
    args = connect_args_hosts(pair, driver, (pair.primary.host, pair.primary.port))
    with units(bare_url(pair, driver), driver, connect_args=args) as made:
        assert made.write("before") == pair.primary.port
        fail_over(pair)
        assert made.write("after") == pair.standby.port
    assert ledger(pair) == {"before": 1, "after": 1}


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_frozen_first_host_given_by_connect_args_is_passed_over(
    pg_standby_factory: Callable[..., StandbyPair], driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As test_failover's frozen first host, the hosts given by ``connect_args``: each host gets
    the bounded connect a multi-host URL gets (its bound shortened to 2 s here, libpq's least:
    test_failover waits out the library's own)."""
    pair = pg_standby_factory(synchronous=False)
    prepare(pair, markers=False)
    bound = 2
    monkeypatch.setattr(_commit, "MULTI_HOST_CONNECT_TIMEOUT", bound)
    config = rdb.Config(max_retries=0, deadline=60.0, circuit_breaker=False)
    with FaultProxy(pair.primary) as proxy:
        proxy.blackhole()
        pair.promote()
        args = connect_args_hosts(pair, driver, (proxy.host, proxy.port))
        made = Units(bare_url(pair, driver), driver, config=config, connect_args=args)
        done: list[int] = []
        began = time.monotonic()
        thread = threading.Thread(target=lambda: done.append(made.write("k")), daemon=True)
        thread.start()
        # (generous for a busy machine: unbounded, the first host alone took a minute or more)
        thread.join(6 * bound)
        took = time.monotonic() - began
        written = list(done)
    # (closing the proxy ends a connect still waiting on it)
    thread.join(30)
    made.close()
    assert written == [pair.standby.port], f"{driver}: no write within {took:.1f} s"


# -- pool_pre_ping ---------------------------------------------------------------------------------
@pytest.mark.parametrize("driver", DRIVERS)
def test_pool_pre_ping_with_the_factory_through_a_failover(
    pg_standby: StandbyPair, driver: str, events: list[rdb.SelfHealEvent]
) -> None:
    pair = pg_standby
    prepare(pair)
    with units(pair.url(DATABASE, driver=driver), driver, pool_pre_ping=True) as made:
        assert made.write("before") == pair.primary.port
        fail_over(pair)
        assert made.write("after") == pair.standby.port
        assert made.calls.count("after") == 1  # the pre-ping replaced the dead connection
    assert ledger(pair) == {"before": 1, "after": 1}


# -- a standby never promoted ----------------------------------------------------------------------
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("breaker", [True, False])
def test_units_give_up_by_the_deadline_when_no_standby_is_promoted(
    pg_standby: StandbyPair, driver: str, breaker: bool
) -> None:
    """The primary dies and nothing promotes the standby: a unit gives up within the deadline
    (the breaker on: as soon as it opens, and the next unit is refused without connecting)."""
    pair = pg_standby
    prepare(pair)
    deadline = 2.0
    config = rdb.Config(
        initial_delay=0.05,
        max_delay=0.2,
        max_retries=100,
        deadline=deadline,
        circuit_breaker=breaker,
        failure_threshold=3,
        reset_timeout=30.0,
    )
    with units(pair.url(DATABASE, driver=driver), driver, config=config) as made:
        assert made.write("before") == pair.primary.port
        pair.crash_primary()
        began = time.monotonic()
        # (SQLAlchemy 2.0 lets asyncpg's own error of a connect through, 2.1 wraps it)
        gave_up = (rdb.CircuitOpenError, sa.exc.DBAPIError, asyncpg.TargetServerAttributeNotMatched)
        with pytest.raises(gave_up) as raised:
            made.write("cut-off")
        took = time.monotonic() - began
        if breaker:
            assert isinstance(raised.value, rdb.CircuitOpenError), raised.value
            with pytest.raises(rdb.CircuitOpenError):
                made.write("refused")
            assert "refused" not in made.calls
        else:
            assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT, raised.value
    print(f"\n[review] {driver}, breaker {breaker}: gave up after {took:.2f} s: {raised.value!r}")
    # (the deadline starts no retry; an attempt running then ends with its connect's timeout)
    assert took < deadline + MULTI_HOST_CONNECT_TIMEOUT, took
    assert pair.standby.is_in_recovery()


# -- the old primary back as a second primary: refused (tests/test_failover_fencing.py) -----------


# -- a two-phase unit prepared when the primary dies ----------------------------------------------
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_two_phase_unit_prepared_at_the_crash_is_committed_on_the_new_primary(
    pg_standby_factory: Callable[..., StandbyPair], driver: str
) -> None:
    pair = pg_standby_factory(settings={"max_prepared_transactions": "10"})
    prepare(pair)
    with FaultProxy(pair.primary) as proxy:
        hosts = [(proxy.host, proxy.port), (pair.standby.host, pair.standby.port)]
        url = hosts_url(pair, driver, hosts, "read-write")
        with units(url, driver) as made:
            made.factory.configure(twophase=True)
            proxy.swallow_commit()  # the COMMIT PREPARED: never reaches the primary
            outcome: list[Any] = []

            def run() -> None:
                try:
                    outcome.append(made.write("2pc"))
                except Exception as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            wait_for(lambda: proxy.commits_swallowed == 1 or bool(outcome), "COMMIT PREPARED")
            assert proxy.commits_swallowed == 1, outcome
            fail_over(pair)
            assert proxy.release_swallowed() == 1
            thread.join(30)
            assert not thread.is_alive()
    assert outcome == [pair.primary.port]  # its INSERT ran there, its commit finished here
    assert made.calls == ["2pc"]
    assert pair.execute("SELECT gid FROM pg_prepared_xacts", database=DATABASE) == []
    assert ledger(pair) == {"2pc": 1}


# -- asynchronous replication: a COMMIT answer lost at the crash ----------------------------------
def stop_streaming(pair: StandbyPair) -> None:
    """The standby stops receiving WAL (its walreceiver ended): what the primary commits from
    now on is lost by a failover."""
    pair.standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
    pair.standby.execute("SELECT pg_reload_conf()")
    wait_for(
        lambda: not pair.primary.execute("SELECT 1 FROM pg_stat_replication"),
        "the standby to stop streaming",
        timeout=10,
    )


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("replicated", [True, False])
def test_a_commit_answer_lost_at_the_crash_with_async_replication(
    pg_standby_factory: Callable[..., StandbyPair], driver: str, replicated: bool
) -> None:
    """The COMMIT reached the primary, its answer was lost, the primary crashed and the standby
    was promoted. Replicated: the marker is found there, done without a replay. Not replicated
    (the standby had stopped streaming): the unit's write is gone with the old primary, the
    marker too: replayed once on the new primary (never a false "done")."""
    pair = pg_standby_factory(synchronous=False)
    prepare(pair)
    with FaultProxy(pair.primary) as proxy:
        hosts = [(proxy.host, proxy.port), (pair.standby.host, pair.standby.port)]
        url = hosts_url(pair, driver, hosts, "read-write")
        calls: list[str] = []
        failed_over: list[float] = []

        def during_backoff(seconds: float) -> None:
            if not failed_over:  # between the lost answer and the check
                if replicated:
                    pair.wait_replayed()
                fail_over(pair)
                failed_over.append(seconds)

        with units(url, driver, calls=calls, on_backoff=during_backoff) as made:
            assert made.write("warm") == pair.primary.port
            if not replicated:
                stop_streaming(pair)
            proxy.lose_commit_answer()
            proxy.refuse()  # new connections: the check can't reach the old primary
            port = made.write("k")
    assert proxy.commits_lost == 1
    rows = ledger(pair)
    print(f"\n[review] {driver} async replicated={replicated}: port {port}, calls {calls}")
    assert rows.get("k") == 1, rows
    assert port == (pair.primary.port if replicated else pair.standby.port)
    assert calls.count("k") == (1 if replicated else 2)
