"""A psycopg connection whose socket is lost while a statement waits for its answer, before
libpq has read the loss: psycopg's wait gives up on the socket and raises an ``OperationalError``
with no SQLSTATE, while libpq, psycopg's ``closed``/``broken`` and so SQLAlchemy still call the
connection sound (it is left with the statement in flight: nothing more can be sent on it).

That is what a reset racing psycopg's poll gives (a backend terminated mid-unit whose session
ends before its message is read): the poll sees the socket's error and nothing to read. Here the
loss is made deterministic, on the client's real TCP connection (through a ``FaultProxy``, so it
is TCP whatever the server's address), while the unit's backend waits on an advisory lock the
test holds:

* ``abort``: the client's kernel aborts the connection (``connect(AF_UNSPEC)``: a reset to the
  peer, what was received dropped, ``ECONNRESET`` pending, the socket not yet shut down: the
  state a poll racing an incoming reset sees). Sync psycopg 3.3+ gives up in its wait
  ("connection socket closed"); async psycopg hands the socket to libpq, which reads the reset
  (a lost connection it already reported as one: kept as the twin);
* ``close``: the socket is closed under the driver (its descriptor made ``/dev/null``'s, so no
  other socket takes its number): the connection ends; psycopg's async wait fails with the
  ``OSError`` of the descriptor ("connection socket closed"), libpq's read fails, the
  connection still sound to libpq.

The unit is replayed once on a new connection and its write is there exactly once. A COMMIT in
flight when its socket is lost this way is not replayed blindly: it is settled by the commit
protocol (here it committed: the unit returns, run once, one row).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = [
    pytest.mark.usefixtures("no_backoff"),
    pytest.mark.skipif(sys.platform != "linux", reason="aborts a TCP socket the Linux way"),
]

LOCK = 5151
FAULTS = ("abort", "close")
#: psycopg's wait gives up on a socket the kernel flags an error on, with nothing to read (3.3+;
#: 3.2 hands every wake-up to libpq, which then reads the loss itself)
WAIT_GIVES_UP = tuple(int(part) for part in psycopg.__version__.split(".")[:2]) >= (3, 3)

SCHEMA = f"""
CREATE TABLE writes (id serial PRIMARY KEY, unit text NOT NULL);
CREATE TABLE held_commits (id serial PRIMARY KEY, unit text NOT NULL);
CREATE FUNCTION wait_for_the_test() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({LOCK});
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER wait_for_the_test AFTER INSERT ON held_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_for_the_test();
"""
WAIT_FOR_THE_TEST = sa.text(f"SELECT pg_advisory_xact_lock({LOCK})")
_libc = ctypes.CDLL(None, use_errno=True)


def abort(fd: int) -> None:
    """The client's kernel aborts the TCP connection of ``fd`` (``connect`` to ``AF_UNSPEC``)."""
    unspecified = struct.pack("=H14x", socket.AF_UNSPEC)  # a struct sockaddr
    if _libc.connect(fd, unspecified, len(unspecified)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"aborting socket {fd}: {os.strerror(errno)}")


def close(fd: int) -> None:
    """Close the socket of ``fd`` under its driver, the number left taken by ``/dev/null``."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


FAULT: dict[str, Callable[[int], None]] = {"abort": abort, "close": close}


@dataclass
class Fault:
    """Loses the socket of the first connection published to it (``publish``) once its backend
    waits on the test's lock, then lets the lock go (the lost backend ends; a replay goes on)."""

    server: PostgresServer
    database: str
    kind: str
    published: list[tuple[int, int]] = field(default_factory=list)  # (socket, backend pid)
    done: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None

    def publish(self, driver_connection: Any) -> None:
        if not self.published:
            self.published.append((driver_connection.fileno(), driver_connection.info.backend_pid))

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        with self.server.connect(self.database) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
            thread = threading.Thread(target=self._strike, args=(holder,), daemon=True)
            thread.start()
            try:
                yield
            finally:
                thread.join(30.0)
        assert not thread.is_alive(), "the fault never struck"
        if self.failure is not None:
            raise self.failure

    def _strike(self, holder: psycopg.Connection[Any]) -> None:
        try:
            deadline = time.monotonic() + 20.0
            while not (self.published and self._waiting(holder)):
                assert time.monotonic() < deadline, "the unit never waited on the test's lock"
                time.sleep(0.005)
            FAULT[self.kind](self.published[0][0])
        except BaseException as exc:  # reported by armed()
            self.failure = exc
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
            self.done.set()

    def _waiting(self, holder: psycopg.Connection[Any]) -> bool:
        row = holder.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
            (self.published[0][1],),
        ).fetchone()
        return row is not None and row[0] == "Lock"


@dataclass
class Seen:
    """What the engine's ``handle_error`` saw: the driver's error and its connection's state."""

    errors: list[tuple[type[BaseException], str | None, bool]] = field(default_factory=list)

    def listen(self, engine: sa.Engine) -> None:
        def seen(ctx: sa.engine.ExceptionContext) -> None:
            try:
                driver = ctx.connection.connection.driver_connection  # type: ignore[union-attr]
            except Exception:  # no connection, or one SQLAlchemy already let go
                driver = None
            self.errors.append(
                (
                    type(ctx.original_exception),
                    getattr(ctx.original_exception, "sqlstate", None),
                    bool(driver is not None and driver.closed),
                )
            )

        sa.event.listen(engine, "handle_error", seen)

    def check(self, fault: str, *, asynchronous: bool) -> None:
        """The fault reached the unit as a psycopg ``OperationalError`` with no SQLSTATE; where
        psycopg gives up before libpq (see the module's text), on a connection still open."""
        assert self.errors, "no error reached the engine"
        kind, sqlstate, closed = self.errors[0]
        assert (kind, sqlstate) == (psycopg.OperationalError, None), self.errors
        if fault == "close" or (WAIT_GIVES_UP and not asynchronous):
            assert not closed, "libpq saw the loss: not the case this module is about"


def rows(server: PostgresServer, database: str, table: str, unit: str) -> int:
    found = server.execute(
        f"SELECT count(*) FROM {table} WHERE unit = %s", params=(unit,), database=database
    )
    return int(found[0][0])


def no_failed_reset(caplog: pytest.LogCaptureFixture) -> None:
    """The lost connection was not handed back to the pool (whose reset of it fails with
    "another command is already in progress", an ERROR with a traceback in the log)."""
    assert "Exception during reset" not in caplog.text


def counters(service: str) -> dict[str, Any]:
    found: dict[str, Any] = rdb.health()["services"][service]["counters"]
    return found


@pytest.fixture(params=FAULTS)
def fault(request: pytest.FixtureRequest, pg_server: PostgresServer, pg_database: str) -> Fault:
    pg_server.execute(SCHEMA, database=pg_database)
    engine = sa.create_engine(pg_server.url(pg_database))
    try:
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    return Fault(pg_server, pg_database, str(request.param))


@pytest.fixture
def engine(fault_proxy: FaultProxy, fault: Fault) -> Iterator[sa.Engine]:
    engine = sa.create_engine(fault_proxy.url(fault.database), connect_args={"connect_timeout": 2})
    yield engine
    engine.dispose()


@pytest_asyncio.fixture
async def async_engine(fault_proxy: FaultProxy, fault: Fault) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(
        fault_proxy.url(fault.database, driver="psycopg"), connect_args={"connect_timeout": 2}
    )
    yield engine
    await engine.dispose()


# -- a statement waiting for its answer -----------------------------------------------------------
def test_a_statement_whose_socket_is_lost_is_replayed_once(
    fault: Fault, engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    seen.listen(engine)
    units = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.execute(sa.text("INSERT INTO writes (unit) VALUES ('statement')"))
        fault.publish(session.connection().connection.driver_connection)
        return len(session.execute(WAIT_FOR_THE_TEST).all())

    with fault.armed():
        assert units.run(unit) == 1
    seen.check(fault.kind, asynchronous=False)
    assert len(calls) == 2
    assert rows(fault.server, fault.database, "writes", "statement") == 1
    assert counters(service)["retries_by_class"] == {"disconnect": 1}
    no_failed_reset(caplog)


@pytest.mark.asyncio
async def test_an_async_statement_whose_socket_is_lost_is_replayed_once(
    fault: Fault, async_engine: AsyncEngine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    seen.listen(async_engine.sync_engine)
    units = rdb.AsyncResilientSession(async_engine, service=service)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        await session.execute(sa.text("INSERT INTO writes (unit) VALUES ('statement')"))
        raw = await (await session.connection()).get_raw_connection()
        fault.publish(raw.driver_connection)
        return len((await session.execute(WAIT_FOR_THE_TEST)).all())

    with fault.armed():
        assert await units.run(unit) == 1
    seen.check(fault.kind, asynchronous=True)
    assert len(calls) == 2
    assert rows(fault.server, fault.database, "writes", "statement") == 1
    assert counters(service)["retries_by_class"] == {"disconnect": 1}
    no_failed_reset(caplog)


# -- a COMMIT waiting for its answer --------------------------------------------------------------
def test_a_commit_whose_socket_is_lost_is_settled_not_replayed(
    fault: Fault, engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    seen.listen(engine)
    units = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []

    def unit(session: Session) -> str:
        calls.append(1)
        session.execute(sa.text("INSERT INTO held_commits (unit) VALUES ('commit')"))
        fault.publish(session.connection().connection.driver_connection)
        return "done"

    with fault.armed():
        assert units.run(unit) == "done"
    seen.check(fault.kind, asynchronous=False)
    assert len(calls) == 1  # committed on the server: settled, never replayed
    assert rows(fault.server, fault.database, "held_commits", "commit") == 1
    assert counters(service)["unknown_commits"] == 0
    no_failed_reset(caplog)


@pytest.mark.asyncio
async def test_an_async_commit_whose_socket_is_lost_is_settled_not_replayed(
    fault: Fault, async_engine: AsyncEngine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    seen.listen(async_engine.sync_engine)
    units = rdb.AsyncResilientSession(async_engine, service=service)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> str:
        calls.append(1)
        await session.execute(sa.text("INSERT INTO held_commits (unit) VALUES ('commit')"))
        raw = await (await session.connection()).get_raw_connection()
        fault.publish(raw.driver_connection)
        return "done"

    with fault.armed():
        assert await units.run(unit) == "done"
    seen.check(fault.kind, asynchronous=True)
    assert len(calls) == 1
    assert rows(fault.server, fault.database, "held_commits", "commit") == 1
    assert counters(service)["unknown_commits"] == 0
    no_failed_reset(caplog)
