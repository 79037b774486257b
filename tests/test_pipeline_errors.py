"""psycopg's pipeline mode and the errors raised in it (psycopg 3 runs ``executemany`` in a
pipeline; the ORM's flush uses it for the UPDATEs of several rows).

- A flush whose pipelined ``executemany`` meets a real serialization failure (the rows' other
  writer commits while the batch waits on its lock), a real deadlock, or its backend
  terminated mid-batch: the driver's error carries its SQLSTATE (or is a lost connection), the
  unit is replayed once, and the connection goes back to the pool out of pipeline mode (or is
  replaced). These pin what psycopg does today (sync and async).
- A connection psycopg left in pipeline mode (it could not leave it at the end of a pipeline
  that failed: here a ``COPY`` inside the driver's ``pipeline()`` block, psycopg's own example
  of it) refuses every later query before sending it: an ``OperationalError`` without SQLSTATE
  ("sending query failed: cannot exit pipeline mode ..."). Before, a unit's COMMIT so refused
  was taken for a COMMIT whose answer was lost (an unknown outcome) although nothing was sent,
  and the refusal raised while handling a serialization failure hid it (not transient). Now
  the refusal is classified as the error it was raised while handling, a refused COMMIT
  committed nothing, and the connection is invalidated, never pooled.

Real server, real concurrent transactions, real killed backends; loopback; backoff zeroed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from processes import wait_for
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")

ROWS = 4
CONFIG = rdb.Config(max_retries=3, circuit_breaker=False)
_PIPELINE_OFF = 0


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url, isolation_level="SERIALIZABLE")
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.insert(Account), [{"id": i, "balance": 100} for i in range(1, ROWS + 1)])
    rdb.install_commit_markers(eng)
    yield eng
    eng.dispose()


def _updates_waiting(engine: sa.Engine) -> int:
    """How many backends' UPDATEs of ``accounts`` wait for a row lock."""
    with engine.connect() as conn:
        waiting = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE accounts%'"
            )
        ).scalar_one()
    return int(waiting)


def _balances(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT balance FROM accounts ORDER BY id")).scalars())


def _driver(conn: sa.Connection) -> Any:
    """psycopg's connection under ``conn``."""
    return conn.connection.driver_connection


def _checked_out(engine: sa.Engine) -> int:
    pool: Any = engine.pool  # (a QueuePool)
    return int(pool.checkedout())


class Fault:
    """On the first attempt: another transaction holds a lock on a row of the batch; once the
    flush's UPDATE waits for it, the fault is made (from a thread), then the flush goes on."""

    def __init__(self, server: PostgresServer, engine: sa.Engine, kind: str) -> None:
        self.server, self.engine, self.kind = server, engine, kind
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def arm(self, pid: int) -> None:
        other = self.engine.connect()
        other.begin()
        other.execute(sa.text("UPDATE accounts SET balance = balance + 1 WHERE id = 2"))
        if self.kind == "deadlock":
            self._arm_deadlock(other)
            return

        def make() -> None:
            try:
                wait_for(lambda: _updates_waiting(self.engine) == 1, "the batch waiting")
                if self.kind == "conflict":
                    other.commit()  # the waiting UPDATE then fails with 40001
                else:
                    self.server.execute(f"SELECT pg_terminate_backend({int(pid)})")
            except BaseException as exc:  # reported by the test
                self.error = exc
            finally:
                other.close()

        self.thread = threading.Thread(target=make)
        self.thread.start()

    def _arm_deadlock(self, holder: sa.Connection) -> None:
        """A deadlock whose victim is the batch: it holds row 1 and waits for row 3, which
        ``closer`` holds, and ``closer`` waits for row 1. PostgreSQL checks a wait for a
        deadlock once, ``deadlock_timeout`` after it began: the batch's wait for row 3 must
        begin after ``closer``'s for row 1, or the batch's one check (the server's 100 ms)
        may find no cycle yet (a loaded machine between the two waits) and ``closer``'s
        (10 s) find it, ``closer`` the victim. So the batch first waits for row 2, which
        ``holder`` holds; once ``closer`` waits for row 1, ``holder`` rolls back and the
        batch goes on to row 3: its wait there closes the cycle, and its check 100 ms later
        finds it (only the server runs in between: the batch's statements are all sent;
        ``closer``'s check comes 10 s after its wait began, before the rollback)."""
        closer = self.engine.connect()
        closer.begin()
        closer.execute(sa.text("SET LOCAL deadlock_timeout = '10s'"))
        closer.execute(sa.text("UPDATE accounts SET balance = balance + 1 WHERE id = 3"))

        def close_the_cycle() -> None:
            try:
                closer.execute(sa.text("UPDATE accounts SET balance = balance + 1 WHERE id = 1"))
                closer.commit()
            except BaseException as exc:  # reported by the test
                self.error = exc

        def make() -> None:
            waits = threading.Thread(target=close_the_cycle)
            try:
                wait_for(lambda: _updates_waiting(self.engine) == 1, "the batch waiting (row 2)")
                waits.start()
                wait_for(lambda: _updates_waiting(self.engine) == 2, "row 1 waited for")
                holder.rollback()  # the batch goes on to row 3, and closes the cycle
            except BaseException as exc:  # reported by the test
                self.error = exc
            finally:
                holder.close()  # (rolled back, if it was not)
                if waits.is_alive():
                    waits.join(timeout=60)
                closer.close()

        self.thread = threading.Thread(target=make)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=60)
            assert not self.thread.is_alive()
            self.thread = None


#: the failure of the first attempt, and the balances the replay leaves
FAULTS = {
    "conflict": ("conflict", "40001", [90, 91, 90, 90]),
    "deadlock": ("conflict", "40P01", [91, 90, 91, 90]),
    "killed": ("disconnect", "none", [90, 90, 90, 90]),
}


def _retries(events: list[rdb.SelfHealEvent], service: str) -> list[tuple[Any, Any]]:
    return [
        (e.fields["outcome"], e.fields["sqlstate"])
        for e in events
        if e.name == "retry" and e.service == service
    ]


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_flush_batch_failing_midway_is_replayed_and_pools_a_sound_connection(
    engine: sa.Engine,
    pg_server: PostgresServer,
    service: str,
    events: list[rdb.SelfHealEvent],
    kind: str,
) -> None:
    outcome, sqlstate, balances = FAULTS[kind]
    fault = Fault(pg_server, engine, kind)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[int] = []
    batches: list[bool] = []

    @sa.event.listens_for(engine, "before_cursor_execute", named=True)
    def seen(**kw: Any) -> None:
        if kw["statement"].startswith("UPDATE accounts"):
            batches.append(kw["executemany"])

    def unit(session: Session) -> None:
        calls.append(1)
        accounts = session.scalars(sa.select(Account).order_by(Account.id)).all()
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        for account in accounts:
            account.balance -= 10
        if len(calls) == 1:
            fault.arm(pid)
        try:
            session.flush()
        finally:
            fault.join()

    Sessions.run(unit)
    assert fault.error is None, fault.error
    assert True in batches  # the flush's UPDATEs went as one executemany (a pipeline)
    assert len(calls) == 2
    assert _retries(events, service) == [(outcome, sqlstate)]
    assert _balances(engine) == balances
    with engine.connect() as conn:
        assert _driver(conn).pgconn.pipeline_status == _PIPELINE_OFF
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    assert _checked_out(engine) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["conflict", "killed"])
async def test_an_async_flush_batch_failing_midway_is_replayed(
    engine: sa.Engine,
    pg_server: PostgresServer,
    service: str,
    events: list[rdb.SelfHealEvent],
    kind: str,
) -> None:
    """The same on psycopg's ``AsyncConnection`` (SQLAlchemy's psycopg_async dialect)."""
    outcome, sqlstate, balances = FAULTS[kind]
    fault = Fault(pg_server, engine, kind)
    # (a psycopg URL: SQLAlchemy's psycopg_async dialect, psycopg's AsyncConnection)
    async_engine = create_async_engine(engine.url, isolation_level="SERIALIZABLE")
    try:
        Sessions = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)
        calls: list[int] = []

        async def unit(session: AsyncSession) -> None:
            calls.append(1)
            accounts = (await session.scalars(sa.select(Account).order_by(Account.id))).all()
            pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            for account in accounts:
                account.balance -= 10
            if len(calls) == 1:
                fault.arm(pid)
            try:
                await session.flush()
            finally:
                await asyncio.to_thread(fault.join)

        await Sessions.run(unit)
        assert fault.error is None, fault.error
        assert len(calls) == 2
        assert _retries(events, service) == [(outcome, sqlstate)]
        assert _balances(engine) == balances
        async with async_engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            assert raw.pgconn.pipeline_status == _PIPELINE_OFF
    finally:
        await async_engine.dispose()


# -- a connection psycopg left in pipeline mode --------------------------------------------------


def _leave_in_pipeline_mode(raw: psycopg.Connection[Any]) -> None:
    """Leave psycopg's connection ``raw`` in pipeline mode for real: a ``COPY`` in a
    ``pipeline()`` block, which psycopg can't leave ("cannot exit pipeline mode while in
    COPY"); it raises that, and libpq stays in pipeline mode."""
    with pytest.raises(psycopg.OperationalError), raw.pipeline():
        raw.execute("COPY (SELECT 1) TO STDOUT")
    assert raw.pgconn.pipeline_status != _PIPELINE_OFF
    assert not raw.closed
    assert not raw.broken


def test_a_refused_commit_of_a_connection_left_in_pipeline_mode_committed_nothing(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """The unit's code leaves its connection in pipeline mode (and catches psycopg's error):
    libpq refuses the unit's COMMIT before sending it. Before: taken for a COMMIT whose answer
    was lost (``Outcome.COMMIT_UNKNOWN``, counted as an unknown outcome). Now: nothing was
    sent, so nothing committed; the unit's own doing, raised at once, not replayed; the
    connection is invalidated, not pooled."""
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    calls: list[Any] = []

    def unit(session: Session) -> None:
        session.execute(sa.text("UPDATE accounts SET balance = 0 WHERE id = 1"))
        raw = _driver(session.connection())
        calls.append(raw)
        with contextlib.suppress(psycopg.OperationalError):
            _leave_in_pipeline_mode(raw)

    with pytest.raises(sa.exc.OperationalError) as raised:
        Sessions.run(unit)
    assert getattr(raised.value.orig, "sqlstate", "") is None
    assert rdb.classify(raised.value) is rdb.Outcome.NOT_TRANSIENT
    assert len(calls) == 1
    assert not [e for e in events if e.name in ("commit_unknown", "retry")]
    assert rdb.health()["services"][service]["counters"]["unknown_commits"] == 0
    assert _balances(engine) == [100] * ROWS
    assert calls[0].closed  # invalidated: never handed back to the pool in pipeline mode
    with engine.connect() as conn:
        assert _driver(conn) is not calls[0]
        assert _driver(conn).pgconn.pipeline_status == _PIPELINE_OFF
    assert _checked_out(engine) == 0


def test_a_refusal_raised_while_handling_a_conflict_is_the_conflict(engine: sa.Engine) -> None:
    """A real serialization failure of an ``executemany``, then, while it is handled, a
    ROLLBACK that libpq refuses on a connection left in pipeline mode: the refusal (no
    SQLSTATE) is classified as the failure it hides (before: not transient)."""
    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with (
        contextlib.closing(psycopg.connect(dsn)) as raw,
        psycopg.connect(dsn, autocommit=True) as other,
    ):
        raw.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        raw.execute("SELECT * FROM accounts").fetchall()
        other.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 2")
        error = _refused_while_handling_a_conflict(raw)
        assert isinstance(error, psycopg.OperationalError)
        assert error.sqlstate is None
        assert isinstance(error.__context__, psycopg.errors.SerializationFailure)
        assert rdb.classify(error) is rdb.Outcome.CONFLICT
        assert rdb.is_transient(error)


def _refused_while_handling_a_conflict(raw: psycopg.Connection[Any]) -> BaseException:
    """``raw``'s executemany (a pipeline) fails with a serialization failure; while that is
    handled, the connection is left in pipeline mode and its ROLLBACK refused: that error."""
    try:
        raw.cursor().executemany(
            "UPDATE accounts SET balance = balance - 10 WHERE id = %s",
            [(i,) for i in range(1, ROWS + 1)],
        )
    except psycopg.errors.SerializationFailure:
        raw.rollback()
        _leave_in_pipeline_mode(raw)  # (the next transaction's)
        try:
            raw.rollback()  # refused, while the serialization failure is handled
        except psycopg.Error as refused:
            return refused
    raise AssertionError("no serialization failure, or no refusal")
