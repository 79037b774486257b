"""The commit protocol of units, against a real server and real crashes. The async units run
on both of SQLAlchemy's async drivers (the ``driver`` fixture).

A COMMIT whose answer never arrived is never replayed blindly: every scenario ends with the unit
done exactly once, or raising ``CommitOutcomeUnknownError``, and the database agrees (the ledger
rows the unit wrote are counted on the server). With the commit markers installed
(``rdb.install_commit_markers``) the outcome is always known; without them (the fallback) a
restart in between may leave it unknown, never wrong.

The xid-reuse scenario runs on a dedicated server whose WAL stays in memory until a commit, so a
crash deterministically loses the unit's transaction and the server hands its xid to the next
client; the test checks that it really did.

The sync twin, ``test_commit_protocol.py``, is generated from ``test_commit_protocol_async.py``
by ``scripts/async_to_sync.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import (
    ASYNC_DRIVERS,
    async_connect_args,
    busy_backends,
    commit_another_transaction,
    flush_wal,
    ledger_rows,
    notifications,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb
from resilient_db.testing import EmbeddedPostgres, FaultProxy, PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

MARKERS = "markers"
FALLBACK = "fallback"

#: A server that keeps WAL in memory until a commit forces it out: the WAL writer writes only
#: full pages (no asynchronous commits) and wakes every 10 s; no background writer, checkpoints,
#: autovacuum or standby snapshots (``wal_level=minimal``) flush it either. An immediate stop
#: then loses everything a transaction wrote since the last commit, its xid included.
WAL_IN_MEMORY = {
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "synchronous_commit": "on",
    "wal_writer_delay": "10s",
    "wal_writer_flush_after": "0",
    "bgwriter_lru_maxpages": "0",
    "checkpoint_timeout": "1d",
    "max_wal_size": "1GB",
    "autovacuum": "off",
}

XID_SQL = sa.text("SELECT pg_current_xact_id_if_assigned()::text")


class Base(DeclarativeBase):
    pass


class Ledger(Base):
    """One row per execution of a unit's write: a unit done exactly once has exactly one row."""

    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    unit: Mapped[str]  # not unique: a second write shows up as a second row
    note: Mapped[str]


WRITE_FUNCTION = sa.text(
    "CREATE FUNCTION write_ledger(u text, n text) RETURNS bigint LANGUAGE plpgsql AS $$ "
    "DECLARE new_id bigint; "
    "BEGIN INSERT INTO ledger (unit, note) VALUES (u, n) RETURNING id INTO new_id; "
    "RETURN new_id; END $$"
)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(params=[MARKERS, FALLBACK])
def mode(request: pytest.FixtureRequest) -> str:
    """``markers``: ``rdb.install_commit_markers`` ran; ``fallback``: nothing installed."""
    return str(request.param)


def prepare(url: str, mode: str) -> None:
    """The ledger, its writing function and (in ``markers`` mode) the commit markers."""
    engine = sa.create_engine(url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(WRITE_FUNCTION)
        if mode == MARKERS:
            rdb.install_commit_markers(engine)
    finally:
        engine.dispose()


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


# -- units and their outcomes --------------------------------------------------------------------
Write = Callable[[AsyncSession, str], Awaitable[object]]


async def _orm_add(s: AsyncSession, u: str) -> None:
    s.add(Ledger(unit=u, note="orm"))


async def _select_function(s: AsyncSession, u: str) -> object:
    return await s.execute(sa.select(sa.func.write_ledger(u, "select")))


async def _scalar_function(s: AsyncSession, u: str) -> object:
    return await s.scalar(sa.select(sa.func.write_ledger(u, "scalar")))


async def _text_select_function(s: AsyncSession, u: str) -> object:
    return await s.execute(sa.text("SELECT write_ledger(:u, 'text-select')"), {"u": u})


async def _text_insert(s: AsyncSession, u: str) -> object:
    return await s.execute(
        sa.text("INSERT INTO ledger (unit, note) VALUES (:u, 'text-insert')"), {"u": u}
    )


WRITES: dict[str, Write] = {
    "orm-add": _orm_add,
    "select-function": _select_function,
    "scalar-function": _scalar_function,
    "text-select-function": _text_select_function,
    "text-insert": _text_insert,
}


class Unit:
    """A unit of work writing one ledger row named after it; counts its calls and xids."""

    def __init__(self, write: Write = _orm_add, *, record_xid: bool = False) -> None:
        self.name = f"unit-{uuid.uuid4()}"
        self.write = write
        self.record_xid = record_xid
        self.calls = 0
        self.xids: list[str | None] = []
        self.hook: Callable[[int], None] | None = None  # called with the call number

    async def __call__(self, session: AsyncSession) -> str:
        self.calls += 1
        await self.write(session, self.name)
        await session.flush()
        if self.record_xid:
            self.xids.append((await session.execute(XID_SQL)).scalar())
        if self.hook is not None:
            self.hook(self.calls)
        return self.name


@dataclass
class Outcome:
    result: object = None
    error: BaseException | None = None


async def run(
    Session: rdb.AsyncResilientSession[AsyncSession],
    unit: Callable[[AsyncSession], Awaitable[object]],
) -> Outcome:
    try:
        return Outcome(result=await Session.run(unit))
    except Exception as exc:
        return Outcome(error=exc)


def settled(outcome: Outcome, rows: int, *, known: bool) -> str:
    """Done exactly once, or ``CommitOutcomeUnknownError``; the database agrees.

    ``known``: the outcome must be known (the commit markers are installed).
    """
    if outcome.error is None:
        assert rows == 1, f"the unit returned, but the database holds {rows} rows of it"
        return "done"
    if not isinstance(outcome.error, rdb.CommitOutcomeUnknownError):
        raise AssertionError(f"the unit failed with {outcome.error!r}") from outcome.error
    assert not known, f"with commit markers the outcome must be known: {outcome.error}"
    assert rows in (0, 1), f"unknown outcome, {rows} rows"
    return "unknown"


@dataclass
class Env:
    """A database prepared for ``mode``, an engine to it through ``proxy``, a service name."""

    engine: AsyncEngine
    proxy: FaultProxy
    server: PostgresServer
    database: str
    service: str
    mode: str

    def factory(self, **cfg: Any) -> rdb.AsyncResilientSession[AsyncSession]:
        return rdb.AsyncResilientSession(
            self.engine, service=self.service, config=rdb.Config(**cfg)
        )

    def rows(self, unit: Unit) -> int:
        return ledger_rows(self.server, self.database, unit.name)

    @property
    def known(self) -> bool:
        """With markers, every outcome must be known."""
        return self.mode == MARKERS


# -- what differs: the engine, a unit running while the test injects faults -----------------------
if True:  # async only
    pytestmark = [pytestmark, pytest.mark.asyncio]

    @pytest.fixture(params=ASYNC_DRIVERS)
    def driver(request: pytest.FixtureRequest) -> str:
        return str(request.param)

    def proxied_engine(proxy: FaultProxy, database: str, driver: str) -> AsyncEngine:
        return create_async_engine(
            proxy.url(database, driver=driver), connect_args=async_connect_args(driver, 2)
        )

    async def swallowed(env: Env, unit: Unit) -> asyncio.Task[Outcome]:
        """Start ``unit`` in a task and return once its COMMIT is held by the proxy."""
        env.proxy.swallow_commit()
        task = asyncio.ensure_future(run(env.factory(), unit))
        await wait_for(lambda: env.proxy.commits_swallowed == 1 or task.done())
        assert env.proxy.commits_swallowed == 1, task.result()
        return task

    async def outcome_of(task: asyncio.Task[Outcome]) -> Outcome:
        return await asyncio.wait_for(task, timeout=30)
else:  # sync only

    @pytest.fixture
    def driver() -> str:
        return "psycopg"

    def proxied_engine(proxy: FaultProxy, database: str, driver: str) -> sa.Engine:
        return sa.create_engine(
            proxy.url(database, driver=driver), connect_args={"connect_timeout": 2}
        )

    class Background(threading.Thread):
        """``Session.run(unit)`` in a thread (while the test injects faults); ``outcome`` after."""

        def __init__(self, Session: Any, unit: Callable[[Any], object]) -> None:
            super().__init__(daemon=True)
            self.Session = Session
            self.unit = unit
            self.outcome: Outcome | None = None

        def run(self) -> None:
            self.outcome = run(self.Session, self.unit)

    def swallowed(env: Env, unit: Unit) -> Background:
        """Start ``unit`` in a thread and return once its COMMIT is held by the proxy."""
        env.proxy.swallow_commit()
        worker = Background(env.factory(), unit)
        worker.start()
        wait_for(lambda: env.proxy.commits_swallowed == 1 or not worker.is_alive())
        assert env.proxy.commits_swallowed == 1, worker.outcome
        return worker

    def outcome_of(worker: Background) -> Outcome:
        worker.join(30.0)
        assert not worker.is_alive(), "the unit did not finish"
        assert worker.outcome is not None
        return worker.outcome


@pytest_asyncio.fixture
async def env(
    *,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    pg_database: str,
    service: str,
    mode: str,
    driver: str,
) -> AsyncIterator[Env]:
    prepare(pg_server.url(pg_database), mode)
    engine = proxied_engine(fault_proxy, pg_database, driver)
    yield Env(engine, fault_proxy, pg_server, pg_database, service, mode)
    await engine.dispose()


@pytest.fixture(scope="module")
def wal_in_memory_server(pg_server: PostgresServer) -> Iterator[EmbeddedPostgres]:
    if not isinstance(pg_server, EmbeddedPostgres):
        pytest.skip("needs an embedded server it can crash")
    with EmbeddedPostgres(settings=WAL_IN_MEMORY) as server:
        yield server


# -- a lost COMMIT answer, no crash --------------------------------------------------------------
async def test_lost_commit_answer_is_done_once_and_not_replayed(env: Env) -> None:
    unit = Unit()
    env.proxy.lose_commit_answer()
    outcome = await run(env.factory(), unit)
    assert env.proxy.commits_lost == 1
    assert outcome.error is None, outcome.error  # no restart: known in both modes
    assert outcome.result == unit.name
    assert unit.calls == 1  # committed on the server: never replayed
    assert env.rows(unit) == 1


async def test_the_checks_own_lost_commit_answer_is_not_an_unknown_outcome(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """The check settling a lost COMMIT answer loses its own COMMIT's answer too: the library
    checks again; nothing is counted or said as an application's unknown outcome."""
    unit = Unit()
    env.proxy.lose_commit_answer(2)
    outcome = await run(env.factory(), unit)
    assert outcome.error is None, outcome.error
    assert env.proxy.commits_lost == 2
    assert unit.calls == 1
    assert env.rows(unit) == 1
    counters = rdb.health()["services"][env.service]["counters"]
    assert counters["unknown_commits"] == 0
    assert counters["verified_commits"] == 1
    assert "Commit outcome unknown" not in caplog.text


@pytest.mark.parametrize("path", sorted(set(WRITES) - {"orm-add"}))
async def test_writers_through_functions_and_text_are_verified_not_replayed(
    env: Env, path: str
) -> None:
    """A unit whose only write is ``SELECT write_ledger(...)`` or ``text("INSERT ...")``."""
    unit = Unit(WRITES[path])
    env.proxy.lose_commit_answer()
    outcome = await run(env.factory(), unit)
    assert env.proxy.commits_lost == 1
    assert outcome.error is None, outcome.error
    assert unit.calls == 1, "replayed blindly after a COMMIT that was applied"
    assert env.rows(unit) == 1


@pytest.mark.parametrize(
    "statement", ["NOTIFY {channel}, 'done'", "SELECT pg_notify('{channel}', 'done')"]
)
async def test_a_unit_that_only_notifies_sends_its_notification_once(
    env: Env, statement: str
) -> None:
    """A notification goes out at COMMIT, and the server assigns the transaction an xid for it
    only then: without more, such a unit's COMMIT carried no marker, and a lost answer was
    replayed, notifying twice."""
    channel = f"c_{uuid.uuid4().hex}"
    calls: list[int] = []

    async def notify(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(sa.text(statement.format(channel=channel)))
        return "notified"

    with psycopg.connect(env.server.conninfo(env.database), autocommit=True) as listener:
        listener.execute(f"LISTEN {channel}")
        env.proxy.lose_commit_answer()
        outcome = await run(env.factory(), notify)
        assert env.proxy.commits_lost == 1
        assert outcome.error is None, outcome.error  # no restart: known in both modes
        assert outcome.result == "notified"
        assert calls == [1], "replayed after a COMMIT that notified"
        received = notifications(listener)
    assert received == ["done"]


async def _orm_read(s: AsyncSession) -> object:
    return (await s.scalars(sa.select(Ledger.id).limit(1))).all()


async def _count_read(s: AsyncSession) -> object:
    return await s.scalar(sa.select(sa.func.count()).select_from(Ledger))


async def _text_read(s: AsyncSession) -> object:
    return (await s.execute(sa.text("SELECT 41 + 1"))).scalar_one()


async def _text_function_read(s: AsyncSession) -> object:
    return (await s.execute(sa.text("SELECT now()"))).scalar_one()


READS: dict[str, Callable[[AsyncSession], Awaitable[object]]] = {
    "orm-select": _orm_read,
    "count-function": _count_read,
    "text-select": _text_read,
    "text-function": _text_function_read,
}


@pytest.mark.parametrize("path", sorted(READS))
async def test_read_only_unit_with_lost_commit_answer_is_replayed_or_returns(
    env: Env, path: str
) -> None:
    calls: list[int] = []

    async def unit(session: AsyncSession) -> str:
        calls.append(1)
        await READS[path](session)
        return "read"

    env.proxy.lose_commit_answer()
    outcome = await run(env.factory(), unit)
    assert env.proxy.commits_lost == 1
    assert outcome.error is None, f"a read-only unit raised {outcome.error!r}"
    assert outcome.result == "read"
    assert len(calls) in (1, 2)


# -- COMMIT never reached the server -------------------------------------------------------------
async def test_swallowed_commit_is_replayed_once(env: Env) -> None:
    unit = Unit()
    pending = await swallowed(env, unit)
    assert env.proxy.release_swallowed() == 1
    outcome = await outcome_of(pending)
    rows = env.rows(unit)
    if settled(outcome, rows, known=env.known) == "done":
        assert unit.calls == 2  # the first attempt never committed: replayed
    else:
        assert rows == 0  # the COMMIT never reached the server


@pytest.mark.server_control
async def test_swallowed_commit_then_crash_is_replayed_once(env: Env) -> None:
    """COMMIT lost on the way; the server crashes and comes back; then the client hears."""
    unit = Unit()
    pending = await swallowed(env, unit)
    await asyncio.to_thread(env.server.crash)
    await asyncio.to_thread(env.server.start)
    assert env.proxy.release_swallowed() == 1
    outcome = await outcome_of(pending)
    rows = env.rows(unit)
    if settled(outcome, rows, known=env.known) == "done":
        assert unit.calls == 2
    else:
        assert rows == 0


async def test_late_commit_after_the_check_is_fenced_off(env: Env) -> None:
    """The client gives up on a COMMIT still travelling; it reaches the server after the check.

    The check must make sure the original can no longer commit once it looked: with markers the
    unit is replayed and the late COMMIT fails; without, the original transaction is still open
    when the check looks, so the outcome can only be unknown (never a replay).
    """
    unit = Unit()
    pending = await swallowed(env, unit)
    assert env.proxy.release_swallowed(keep_server=True) == 1  # the backend is still there
    outcome = await outcome_of(pending)
    assert env.proxy.deliver_late_commits() == 1
    await wait_for(lambda: busy_backends(env.server, env.database) == 0)
    rows = env.rows(unit)
    if settled(outcome, rows, known=env.known) == "done":
        assert unit.calls == 2
    else:
        assert unit.calls == 1


# -- a lost answer, then a crash before the check ------------------------------------------------
@pytest.mark.server_control
async def test_lost_answer_then_crash_before_the_check_is_never_replayed(env: Env) -> None:
    """The COMMIT was applied (and is durable); the server restarts before the unit can ask."""
    crashes: list[float] = []

    async def asleep(seconds: float) -> None:  # the backoff between checks: crash here, no sleep
        if not crashes:
            crashes.append(seconds)
            await asyncio.to_thread(env.server.crash)
            await asyncio.to_thread(env.server.start)
            env.proxy.restore()

    def arm(call: int) -> None:
        if call == 1:
            env.proxy.lose_commit_answer()
            env.proxy.refuse()  # the first check can't connect

    unit = Unit()
    unit.hook = arm
    with rdb.set_testing(False):
        Session = rdb.AsyncResilientSession(
            env.engine,
            service=env.service,
            config=rdb.Config(initial_delay=0.001, max_delay=0.002, circuit_breaker=False),
            asleep=asleep,
        )
        outcome = await run(Session, unit)
    assert env.proxy.commits_lost == 1
    assert crashes, "the unit never backed off between checks"
    assert unit.calls == 1, "a unit whose COMMIT was applied was replayed"
    rows = env.rows(unit)
    assert rows == 1
    settled(outcome, rows, known=env.known)


async def test_checks_that_never_reach_the_server_say_so(env: Env) -> None:
    """The COMMIT's answer is lost and the server refuses every new connection while the
    verification checks: the unknown outcome says the checks could not reach it, how many
    there were and what bounds them (it said "before the verification's time was up" when
    the retry count had ended them, pointing at the deadline)."""

    def arm(call: int) -> None:
        env.proxy.lose_commit_answer()
        env.proxy.refuse()

    unit = Unit()
    unit.hook = arm
    factory = env.factory(initial_delay=0.001, max_delay=0.002, deadline=20, circuit_breaker=False)
    try:
        outcome = await run(factory, unit)
    finally:
        env.proxy.restore()
    assert isinstance(outcome.error, rdb.CommitOutcomeUnknownError), outcome.error
    # the checks ran out by count (the deadline is far): said so, with how many there were
    assert "none of the 4 check(s) on a new connection reached the server" in str(outcome.error)
    assert "(the verification makes at most 4, one and SELF_HEALING_MAX_RETRIES more" in str(
        outcome.error
    )
    assert "; the last one: " in str(outcome.error)
    assert unit.calls == 1


# -- the xid-reuse case --------------------------------------------------------------------------
async def reused_xid_try(
    server: EmbeddedPostgres, database: str, service: str, mode: str, driver: str
) -> tuple[Env, Unit, Outcome, bool]:
    """One try of the scenario: whether the server really gave the unit's xid to the other
    client (a WAL flush the test does not control may have made it durable after all)."""
    with FaultProxy(server) as proxy:
        engine = proxied_engine(proxy, database, driver)
        try:
            env = Env(engine, proxy, server, database, service, mode)
            unit = Unit(record_xid=True)
            flush_wal(server, database)
            pending = await swallowed(env, unit)
            # the unit's WAL was never written out: its transaction is gone
            await asyncio.to_thread(server.crash)
            await asyncio.to_thread(server.start)
            reused = unit.xids == [commit_another_transaction(server, database)]
            assert proxy.release_swallowed() == 1
            outcome = await outcome_of(pending)
        finally:
            await engine.dispose()
    return env, unit, outcome, reused


@pytest.mark.server_control
async def test_reused_xid_never_reports_a_lost_write_as_done(
    wal_in_memory_server: EmbeddedPostgres, service: str, mode: str, driver: str
) -> None:
    """COMMIT in flight while the server crashes before the unit's WAL is durable; after the
    restart another client gets the same xid and commits first; then the unit hears. Every try
    must end right; up to 3 tries, until one where the server did reuse the xid."""
    server = wal_in_memory_server
    database = f"xid_{uuid.uuid4().hex[:12]}"
    server.create_database(database)
    try:
        prepare(server.url(database), mode)
        for _ in range(3):
            env, unit, outcome, reused = await reused_xid_try(
                server, database, service, mode, driver
            )
            rows = env.rows(unit)
            assert rows == 1 or outcome.error is not None, "a lost write was reported done"
            if settled(outcome, rows, known=env.known) == "done":
                assert unit.calls == 2
            else:
                assert rows == 0
                if reused:  # its xid shows committed: another transaction's, given after the crash
                    assert "shows committed, but the server restarted" in str(outcome.error)
            if reused:
                break
        else:
            pytest.fail("the server did not reuse the unit's xid in 3 tries")
    finally:
        server.drop_database(database)
