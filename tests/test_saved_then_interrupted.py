"""An interruption that arrives after a unit's COMMIT succeeded, before the call returns: the
change is saved, so the interruption goes on unchanged in type, marked ``saved_then_interrupted``
(and so is the ``TimeoutError`` that ``asyncio.timeout`` raises from a marked cancellation), a
``[SELF-HEAL] Commit interrupted: ... after its COMMIT succeeded; it is committed`` line says it
(event ``commit_interrupted``, outcome ``committed``), and a web handler answers 500
``saved-then-interrupted``: "do not resubmit", not a plain error that a client resubmits after,
writing the change twice (before, the interruption was raised unmarked: a plain 500).

Where: a sync unit's inline prune of expired commit markers (its DELETE held on the server by a
table lock, a real signal sent once the server shows it waiting), the close of a unit's session
(your session class's own close, doing I/O of its own, sync and async), an async factory's
drop-in ``Session.begin()`` and ``async with Session()`` blocks, cancelled while their session
closes, and drop-in blocks (sync ``with``, async ``Session.begin()`` and ``async with
Session()``) interrupted in their COMMIT's step once the server answered it (an
``after_commit`` listener doing I/O). Against the suite's real
server; the interruptions are real (signals, ``task.cancel()``, ``asyncio.timeout``), timed on
real events (the server shows the statement waiting, the COMMIT returned), not on durations."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg.waiting
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from scenarios import (
    ASYNC_DRIVERS,
    add_expired_markers,
    assert_pool_took_all_back,
    install_markers,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.testclient import TestClient
from test_commit_interrupted import wait_until, wait_until_sync
from test_prune_after_commit import EXPIRED, _notes, _prune_waits

import resilient_db as rdb
from resilient_db._internals import sa_await
from resilient_db._unit import commit_interrupted, saved_then_interrupted
from resilient_db.testing import PostgresServer
from resilient_db.web import PROBLEM_JSON, install_exception_handlers, problem_details

pytestmark = [
    pytest.mark.usefixtures("no_backoff"),
    pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is Python 3.11's"),
]

SAVED = "urn:resilient-db:problem:saved-then-interrupted"


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    with pg_server.connect(pg_database) as conn:
        conn.execute("CREATE TABLE prune_notes (note text NOT NULL)")
    install_markers(pg_server, pg_database)
    return pg_database


def _note(session: Session, note: str) -> str:
    session.execute(sa.text("INSERT INTO prune_notes (note) VALUES (:n)"), {"n": note})
    return note


async def _anote(session: AsyncSession, note: str) -> str:
    await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES (:n)"), {"n": note})
    return note


async def _aread(session: AsyncSession, note: str) -> str:
    await session.execute(sa.text("SELECT count(*) FROM prune_notes"))
    return note


def _sleeping(server: PostgresServer, database: str) -> bool:
    """A backend of ``database`` is in a session class's close's ``pg_sleep``."""
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event = 'PgSleep' AND query ILIKE '%closing%'",
        database=database,
    )
    return bool(rows[0][0])


def _sleep_ended(server: PostgresServer, database: str) -> None:
    """Before the test ends: a session class's close's ``pg_sleep`` still running on the server
    (an interruption other than Ctrl-C does not cancel the statement it cuts short) is
    cancelled there and waited out, instead of waited out whole."""
    server.execute(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event = 'PgSleep' AND query ILIKE '%closing%' AND pid <> pg_backend_pid()",
        database=database,
    )
    wait_until_sync(lambda: not _sleeping(server, database), timeout=30)


def assert_saved_then_interrupted(
    raised: BaseException,
    service: str,
    events: list[rdb.SelfHealEvent],
    whose: str,
    *,
    or_whose: str | None = None,
) -> None:
    """What is said of an interruption after a COMMIT that succeeded, and answered (by
    ``whose``, or ``or_whose`` where the interruption may land in either of two layers)."""
    assert saved_then_interrupted(raised) == service
    assert commit_interrupted(raised) is None  # not an unknown outcome: it is committed
    [line] = [e for e in events if e.name == "commit_interrupted"]
    assert line.fields["outcome"] == "committed"
    assert whose in line.message or (or_whose is not None and or_whose in line.message), (
        line.message
    )
    assert "after its COMMIT succeeded; it is committed" in line.message
    assert line.fields["service"] == service
    assert rdb.health()["services"][service]["counters"]["unknown_commits"] == 0
    answer = problem_details(raised)
    assert answer is not None
    assert answer.status == 500
    assert answer.body["type"] == SAVED
    assert answer.body["service"] == service
    assert "Do not resubmit" in answer.body["detail"]
    assert not answer.headers  # no Retry-After: nothing to retry


# -- sync: real signals -------------------------------------------------------------------------
class GeventStyleTimeout(BaseException):
    """A timeout raised into the code as a ``BaseException`` (as gevent's ``Timeout``)."""


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(1)


def _time_out(signum: int, frame: Any) -> None:
    raise GeventStyleTimeout


#: each interruption: (what it raises, its signal, the handler that raises it, or None)
INTERRUPTIONS: dict[str, tuple[type[BaseException], int, Callable[[int, Any], None] | None]] = {
    "KeyboardInterrupt": (KeyboardInterrupt, signal.SIGINT, None),
    "SystemExit": (SystemExit, signal.SIGUSR1, _exit),
    "GeventStyleTimeout": (GeventStyleTimeout, signal.SIGUSR2, _time_out),
}


@pytest.fixture(params=list(INTERRUPTIONS))
def interruption(request: pytest.FixtureRequest) -> Iterator[tuple[type[BaseException], int]]:
    """An interruption of the main thread, raised by a real signal: its type and signal."""
    kind, signum, handler = INTERRUPTIONS[request.param]
    before = signal.signal(signum, handler) if handler is not None else None
    yield kind, signum
    if handler is not None:
        signal.signal(signum, before)


def signal_once(condition: Callable[[], bool], signum: int) -> threading.Thread:
    """Send ``signum`` to the main thread (where the test runs) once ``condition()`` holds."""
    main = threading.main_thread().ident
    assert threading.current_thread().ident == main

    def send() -> None:
        wait_until_sync(condition, timeout=30)
        signal.pthread_kill(main, signum)  # type: ignore[arg-type]

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def test_a_sync_unit_interrupted_in_its_prune_is_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    interruption: tuple[type[BaseException], int],
    events: list[rdb.SelfHealEvent],
) -> None:
    """The prune due after the unit's COMMIT waits on the server (a table lock taken as the
    COMMIT returns) when the signal arrives: the interruption goes on, marked as after a
    COMMIT that succeeded (it was raised unmarked: no answer of ``problem_details``)."""
    kind, signum = interruption
    engine = sa.create_engine(pg_server.url(database))
    holder = psycopg.connect(pg_server.conninfo(database), autocommit=False)
    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        assert Sessions.run(_note, "first") == "first"
        add_expired_markers(pg_server, database, EXPIRED)
        Sessions._hooks.commit._next_prune = 0.0  # as if PRUNE_INTERVAL had passed
        events.clear()

        def lock(session: Session) -> None:
            holder.execute("LOCK TABLE resilient_db.commit_markers IN EXCLUSIVE MODE")

        event.listen(Session, "after_commit", lock, once=True)
        sender = signal_once(lambda: _prune_waits(pg_server, database), signum)
        with pytest.raises(kind) as raised:
            Sessions.run(_note, "x")
        sender.join(10)
        holder.rollback()
        assert type(raised.value) is kind  # unchanged
        assert _notes(pg_server, database, "x") == 1  # saved
        assert_saved_then_interrupted(raised.value, service, events, "the unit (marker ")
        assert Sessions.run(_note, "y") == "y"  # and the factory goes on
    finally:
        holder.close()
        engine.dispose()


def test_a_sync_units_session_class_interrupted_in_its_close_is_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    interruption: tuple[type[BaseException], int],
    events: list[rdb.SelfHealEvent],
) -> None:
    """The unit's session class closes with work of its own (a statement on the server), which
    the signal interrupts, the unit committed: marked (it was raised unmarked). A unit that
    wrote nothing is not said to have saved a change."""
    kind, signum = interruption
    engine = sa.create_engine(pg_server.url(database))

    class ClosingSession(Session):
        def close(self) -> None:
            super().close()
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_sleep(3) AS closing"))

    try:
        Sessions = rdb.ResilientSession(engine, service=service, class_=ClosingSession)
        sender = signal_once(lambda: _sleeping(pg_server, database), signum)
        with pytest.raises(kind) as raised:
            Sessions.run(_note, "x")
        sender.join(10)
        assert type(raised.value) is kind
        assert _notes(pg_server, database, "x") == 1
        assert_saved_then_interrupted(raised.value, service, events, "the unit (marker ")
        _sleep_ended(pg_server, database)
    finally:
        engine.dispose()


def _closing_sync_class(engine: sa.Engine) -> type[Session]:
    class ClosingSession(Session):
        def close(self) -> None:
            super().close()
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_sleep(3) AS closing"))

    return ClosingSession


def _execute(session: Session, statement: str) -> None:
    session.execute(sa.text(statement))


def _dropin_block(Sessions: rdb.ResilientSession[Session], form: str, statement: str) -> None:
    """Drop-in code: ``statement`` in a ``Session.begin()`` block, in a ``with Session()``
    block that commits it, or in a unit run in the block's session."""
    if form == "Session.begin()":
        with Sessions.begin() as session:
            session.execute(sa.text(statement))
    elif form == "with Session(): commit()":
        with Sessions() as session:
            session.execute(sa.text(statement))
            session.commit()
    else:
        with Sessions() as session:
            Sessions.run_in(session, _execute, statement)


DROPIN_FORMS = ["Session.begin()", "with Session(): commit()", "with Session(): run_in()"]


@pytest.mark.parametrize("form", DROPIN_FORMS)
def test_a_sync_dropin_block_interrupted_in_its_close_is_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    interruption: tuple[type[BaseException], int],
    events: list[rdb.SelfHealEvent],
    *,
    form: str,
) -> None:
    """Drop-in code on a sync factory: its block committed a write, and the signal arrives as
    the session closes at the block's end (your class's own close, a statement on the server):
    marked and said as a unit's is (it was raised unmarked, unsaid: a plain error, inviting a
    resubmit that writes the change again)."""
    kind, signum = interruption
    engine = sa.create_engine(pg_server.url(database))
    try:
        Sessions = rdb.ResilientSession(engine, service=service, class_=_closing_sync_class(engine))
        sender = signal_once(lambda: _sleeping(pg_server, database), signum)
        with pytest.raises(kind) as raised:
            _dropin_block(Sessions, form, "INSERT INTO prune_notes (note) VALUES ('x')")
        sender.join(10)
        assert type(raised.value) is kind
        assert _notes(pg_server, database, "x") == 1
        whose = "a transaction of drop-in code (a with Session() or Session.begin() block)"
        assert_saved_then_interrupted(raised.value, service, events, whose)
        _sleep_ended(pg_server, database)
    finally:
        engine.dispose()


@pytest.mark.parametrize("form", DROPIN_FORMS)
@pytest.mark.parametrize("block", ["read-only", "interrupted before its COMMIT"])
def test_a_sync_dropin_block_that_saved_nothing_is_not_said_to_have_saved(
    pg_server: PostgresServer,
    database: str,
    service: str,
    events: list[rdb.SelfHealEvent],
    *,
    form: str,
    block: str,
) -> None:
    """A block that only read, interrupted as its session closes, or one that writes,
    interrupted in its statement (before its COMMIT): the interruption goes on unmarked and
    unsaid (nothing was saved: resubmitting is safe)."""
    engine = sa.create_engine(pg_server.url(database))
    try:
        if block == "read-only":  # interrupted in its session class's close
            Sessions = rdb.ResilientSession(
                engine, service=service, class_=_closing_sync_class(engine)
            )
            statement = "SELECT count(*) FROM prune_notes"
        else:  # interrupted in its statement (a close that sleeps would only wait after it)
            Sessions = rdb.ResilientSession(engine, service=service)
            statement = "INSERT INTO prune_notes (note) SELECT 'x' FROM pg_sleep(3) AS closing"
        sender = signal_once(lambda: _sleeping(pg_server, database), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt) as raised:
            _dropin_block(Sessions, form, statement)
        sender.join(10)
        assert _notes(pg_server, database, "x") == 0
        assert saved_then_interrupted(raised.value) is None
        assert problem_details(raised.value) is None
        assert not [e for e in events if e.name == "commit_interrupted"]
        _sleep_ended(pg_server, database)
    finally:
        engine.dispose()


def _failed_dropin_block(Sessions: rdb.ResilientSession[Session], form: str) -> None:
    """Drop-in code outside any unit whose block writes, catches a database error and goes
    on, then commits: the server answers the failed transaction's COMMIT with ROLLBACK."""

    def write_and_fail(session: Session) -> None:
        session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
        with contextlib.suppress(sa.exc.DBAPIError):
            session.execute(sa.text("SELECT 1/0"))

    if form == "Session.begin()":
        with Sessions.begin() as session:
            write_and_fail(session)
    else:
        with Sessions() as session:
            write_and_fail(session)
            session.commit()


@pytest.mark.parametrize("form", DROPIN_FORMS[:2])
def test_a_sync_dropin_block_whose_commit_rolled_back_is_not_said_to_have_saved(
    pg_server: PostgresServer,
    database: str,
    service: str,
    events: list[rdb.SelfHealEvent],
    form: str,
) -> None:
    """A drop-in block (outside any unit) whose COMMIT ended a failed transaction, answered
    ROLLBACK (psycopg raises nothing, as plain psycopg), interrupted as its session closes:
    nothing was saved, so the interruption goes on unmarked and unsaid (it was answered
    ``saved-then-interrupted``: "do not resubmit" a change that was lost)."""
    engine = sa.create_engine(pg_server.url(database))
    try:
        Sessions = rdb.ResilientSession(engine, service=service, class_=_closing_sync_class(engine))
        sender = signal_once(lambda: _sleeping(pg_server, database), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt) as raised:
            _failed_dropin_block(Sessions, form)
        sender.join(10)
        assert _notes(pg_server, database, "x") == 0
        assert saved_then_interrupted(raised.value) is None
        assert problem_details(raised.value) is None
        assert not [e for e in events if e.name == "commit_interrupted"]
        _sleep_ended(pg_server, database)
    finally:
        engine.dispose()


def _sleep_on_server(engine: sa.Engine) -> None:
    """I/O of the application's ``after_commit`` listener: a statement on the server."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_sleep(3) AS closing"))


def _sleep_in_reset_once(engine: sa.Engine, armed: list[int]) -> None:
    """A pool ``reset`` listener of the application's doing I/O (a statement on the server)
    as the next connection is handed back to the pool once ``armed`` holds something: the
    transaction's close at the end of a COMMIT's step, where psycopg's own reset may wait
    too."""

    @event.listens_for(engine, "reset")
    def sleep(dbapi_connection: Any, record: Any, state: Any) -> None:
        if armed:
            armed.clear()
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT pg_sleep(3) AS closing")
            finally:
                cursor.close()


@pytest.mark.parametrize("waits", ["an after_commit listener", "the pool's reset"])
@pytest.mark.parametrize("form", DROPIN_FORMS[:2])
def test_a_sync_dropin_block_interrupted_after_its_commit_answered_is_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    interruption: tuple[type[BaseException], int],
    events: list[rdb.SelfHealEvent],
    *,
    after_commit: list[Callable[[], None]],
    form: str,
    waits: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Drop-in code on a sync factory: the server answered the block's COMMIT of a write, and
    the signal arrives inside the COMMIT step, where the application's code does I/O (a
    statement on the server): in an ``after_commit`` listener, or at the very end of the step,
    as the transaction's close hands its connection back to the pool (a ``reset`` listener).
    Marked and said, as in the close. Before, it was raised unmarked, unsaid: a plain error,
    inviting a resubmit that writes again (at the very end: SQLAlchemy takes the transaction
    off its session before the reset, and marks it closed only after, so the session had no
    transaction any more and its block's end did not see the COMMIT's)."""
    kind, signum = interruption
    engine = sa.create_engine(pg_server.url(database))
    armed: list[int] = []
    if waits == "the pool's reset":
        _sleep_in_reset_once(engine, armed)
        after_commit.append(lambda: armed.append(1))
    else:
        after_commit.append(lambda: _sleep_on_server(engine))
    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        sender = signal_once(lambda: _sleeping(pg_server, database), signum)
        with pytest.raises(kind) as raised:
            _dropin_block(Sessions, form, "INSERT INTO prune_notes (note) VALUES ('x')")
        sender.join(10)
        assert not after_commit  # the COMMIT returned
        assert not armed  # (the reset, where it waits there, was reached)
        assert type(raised.value) is kind
        assert _notes(pg_server, database, "x") == 1
        whose = "a transaction of drop-in code (a with Session() or Session.begin() block)"
        assert_saved_then_interrupted(raised.value, service, events, whose)
        assert_pool_took_all_back(engine.pool, caplog)
        _sleep_ended(pg_server, database)
    finally:
        engine.dispose()


def test_a_sync_dropin_block_around_a_unit_interrupted_after_its_commit_says_it_once(
    pg_server: PostgresServer,
    database: str,
    service: str,
    events: list[rdb.SelfHealEvent],
    after_commit: list[Callable[[], None]],
) -> None:
    """A ``with Session()`` block that saved a change, then ran a unit in its session
    (``run_in``) interrupted in an ``after_commit`` listener as the unit's COMMIT returned: the
    unit says it, and the block, whose session's transaction is the unit's, committed, does not
    say it a second time (two lines for one interruption)."""
    engine = sa.create_engine(pg_server.url(database))
    try:
        Sessions = rdb.ResilientSession(engine, service=service)

        def work() -> None:
            with Sessions() as session:
                session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('y')"))
                session.commit()
                after_commit.append(lambda: _sleep_on_server(engine))
                Sessions.run_in(session, _note, "x")

        sender = signal_once(lambda: _sleeping(pg_server, database), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt) as raised:
            work()
        sender.join(10)
        assert _notes(pg_server, database, "x") == 1
        assert_saved_then_interrupted(raised.value, service, events, "the unit (marker ")
        _sleep_ended(pg_server, database)
    finally:
        engine.dispose()


@pytest.mark.parametrize("block", ["read-only", "interrupted in a statement after its COMMIT"])
def test_a_sync_dropin_block_interrupted_not_after_a_saving_commit_is_not_said_to_have_saved(
    pg_server: PostgresServer,
    database: str,
    service: str,
    events: list[rdb.SelfHealEvent],
    after_commit: list[Callable[[], None]],
    *,
    block: str,
) -> None:
    """A block that only read, interrupted in an ``after_commit`` listener as its COMMIT
    returned, saved nothing; one that committed a write and then was interrupted in a statement
    of its next transaction was not interrupted after a COMMIT: neither is marked or said."""
    engine = sa.create_engine(pg_server.url(database))
    try:
        Sessions = rdb.ResilientSession(engine, service=service)

        def work() -> None:
            with Sessions() as session:
                if block == "read-only":
                    after_commit.append(lambda: _sleep_on_server(engine))
                    session.execute(sa.text("SELECT count(*) FROM prune_notes"))
                    session.commit()
                else:
                    session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
                    session.commit()
                    session.execute(sa.text("SELECT pg_sleep(3) AS closing"))

        sender = signal_once(lambda: _sleeping(pg_server, database), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt) as raised:
            work()
        sender.join(10)
        assert saved_then_interrupted(raised.value) is None
        assert problem_details(raised.value) is None
        assert not [e for e in events if e.name == "commit_interrupted"]
        _sleep_ended(pg_server, database)
    finally:
        engine.dispose()


def test_sync_dropin_blocks_leave_nothing_behind(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    """What a ``with`` block notes is its own, gone at its end: also for a factory whose class
    is another factory's (the note of each block was left behind there, each new one held by
    the next: a chain as long as the blocks run), and a class whose ``__exit__`` answers that
    the error is handled keeps its answer."""
    from resilient_db._statements import dropin_block  # noqa: PLC0415

    engine = sa.create_engine(pg_server.url(database))

    class Swallowing(Session):
        def __exit__(self, kind: Any, value: Any, traceback: Any) -> bool:  # type: ignore[override]
            super().__exit__(kind, value, traceback)
            return kind is LookupError

    try:
        first = rdb.ResilientSession(engine, service=service)
        second = rdb.ResilientSession(engine, service=f"{service}-b", class_=first.class_)
        for factory in (first, second, first, second):
            with factory.begin() as session:
                session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
                assert dropin_block.get() is not None
            assert dropin_block.get() is None
        with rdb.ResilientSession(engine, service=service, class_=Swallowing)() as session:
            raise LookupError
        assert dropin_block.get() is None
        assert _notes(pg_server, database, "x") == 4
    finally:
        engine.dispose()


def test_a_sync_dropin_block_whose_session_is_entered_again_is_still_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    events: list[rdb.SelfHealEvent],
    after_commit: list[Callable[[], None]],
) -> None:
    """A ``with Session()`` block whose session a helper enters again (``with session:``, a
    block inside the block): the inner block's end gives the outer block its note back, so
    the outer block's COMMIT of a write, interrupted once the server answered it (a signal
    in an ``after_commit`` listener doing I/O), is marked and said, and nothing is left
    behind. (The inner block took the outer one's note with it: the interruption was raised
    unmarked, a plain error inviting a resubmit, and the outer note stayed the thread's
    drop-in block after the block.)"""
    from resilient_db._statements import dropin_block  # noqa: PLC0415

    engine = sa.create_engine(pg_server.url(database))
    try:
        Sessions = rdb.ResilientSession(engine, service=service)

        def helper(session: Session) -> int:
            with session:  # entered again: its end closes the session, as SQLAlchemy's does
                return len(session.execute(sa.text("SELECT 1")).all())

        def work() -> None:
            with Sessions() as session:
                assert helper(session) == 1
                session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
                after_commit.append(lambda: _sleep_on_server(engine))
                session.commit()

        sender = signal_once(lambda: _sleeping(pg_server, database), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt) as raised:
            work()
        sender.join(10)
        assert not after_commit  # the COMMIT returned
        assert _notes(pg_server, database, "x") == 1
        whose = "a transaction of drop-in code (a with Session() or Session.begin() block)"
        assert_saved_then_interrupted(raised.value, service, events, whose)
        assert dropin_block.get() is None
        _sleep_ended(pg_server, database)
    finally:
        engine.dispose()


# -- async: real cancellations ------------------------------------------------------------------
def _closing_class(engine: Any) -> type[AsyncSession]:
    class ClosingSession(AsyncSession):
        async def close(self) -> None:
            await super().close()
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT pg_sleep(0.5) AS closing"))

    return ClosingSession


async def _interrupted_once(
    how: str, condition: Callable[[], bool], work: Callable[[], Any]
) -> BaseException:
    """Run ``work()``, interrupted once ``condition()`` holds: its task cancelled, or the
    deadline of an ``asyncio.timeout`` around it brought forward. What it raised."""
    if how == "cancel":
        task = asyncio.ensure_future(work())
        await wait_until(lambda: condition() or task.done(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        return cancelled.value
    loop = asyncio.get_running_loop()
    watchers: list[asyncio.Future[None]] = []

    async def expire(deadline: Any) -> None:
        await wait_until(condition, timeout=30)
        deadline.reschedule(loop.time())

    async def within_deadline() -> None:
        async with asyncio.timeout(None) as deadline:
            watchers.append(asyncio.ensure_future(expire(deadline)))
            await work()

    try:
        with pytest.raises(TimeoutError) as timed_out:
            await within_deadline()
    finally:
        for watcher in watchers:
            watcher.cancel()
    assert isinstance(timed_out.value.__cause__, asyncio.CancelledError)
    return timed_out.value


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("how", ["cancel", "asyncio.timeout"])
async def test_an_async_units_session_class_cancelled_in_its_close_is_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    how: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The unit committed, and its session class's own close (awaited to its end) is running
    a statement on the server when the unit's task is cancelled, or its deadline reached: the
    ``CancelledError`` (or the ``TimeoutError`` made from it) is marked (it was raised unmarked:
    a plain 500)."""
    engine = create_async_engine(pg_server.url(database, driver=driver))
    try:
        Sessions = rdb.AsyncResilientSession(engine, service=service, class_=_closing_class(engine))
        raised = await _interrupted_once(
            how, lambda: _sleeping(pg_server, database), lambda: Sessions.run(_anote, "x")
        )
        assert _notes(pg_server, database, "x") == 1
        assert_saved_then_interrupted(raised, service, events, "the unit (marker ")
        assert engine.pool.checkedout() == 0  # the close ran to its end
    finally:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("unit", ["read-only", "self-healing off"])
async def test_an_async_unit_that_wrote_nothing_or_ran_plainly_is_not_said_to_have_saved(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    unit: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    """A read-only unit cancelled in its session class's close: the cancellation goes on as
    it is, unmarked and unsaid (there is no change to resubmit); so does a writing unit's with
    self-healing off (plain SQLAlchemy)."""
    engine = create_async_engine(pg_server.url(database, driver=driver))
    try:
        Sessions = rdb.AsyncResilientSession(
            engine,
            service=service,
            class_=_closing_class(engine),
            config=rdb.Config(enabled=unit == "read-only"),
        )
        fn = _aread if unit == "read-only" else _anote
        raised = await _interrupted_once(
            "cancel", lambda: _sleeping(pg_server, database), lambda: Sessions.run(fn, "x")
        )
        assert saved_then_interrupted(raised) is None
        assert problem_details(raised) is None
        assert not [e for e in events if e.name == "commit_interrupted"]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_a_web_request_whose_deadline_came_after_the_commit_is_told_not_to_resubmit(
    pg_server: PostgresServer, database: str, service: str, driver: str
) -> None:
    """End to end: the route's deadline is reached while its unit's session closes, after the
    COMMIT: 500 ``saved-then-interrupted``, where the handlers passed the ``TimeoutError`` on
    as the application's own (a plain 500)."""
    raised: list[BaseException] = []

    async def add_raising() -> None:
        engine = create_async_engine(
            pg_server.url(database, driver=driver), poolclass=sa.pool.NullPool
        )
        Sessions = rdb.AsyncResilientSession(engine, service=service, class_=_closing_class(engine))
        loop = asyncio.get_running_loop()

        async def expire(deadline: Any) -> None:
            await wait_until(lambda: _sleeping(pg_server, database), timeout=30)
            deadline.reschedule(loop.time())

        watcher = None
        try:
            async with asyncio.timeout(None) as deadline:  # the request's deadline
                watcher = asyncio.ensure_future(expire(deadline))
                await Sessions.run(_anote, "x")
        finally:
            if watcher is not None:
                watcher.cancel()
            await engine.dispose()

    async def route() -> str:
        try:
            await add_raising()
        except BaseException as exc:
            raised.append(exc)
            raise
        return ""

    app = FastAPI()
    install_exception_handlers(app)
    app.add_api_route("/notes", route, methods=["POST"])
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/notes")
    # (popped: the list, held by the route and the app, would keep the unit's frames and its
    # factory alive for the process, to follow later tests' configuration reloads)
    error = raised.pop()
    assert not raised
    assert isinstance(error, TimeoutError)  # what the route saw is unchanged
    assert _notes(pg_server, database, "x") == 1
    assert answer.status_code == 500, answer.text
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert "retry-after" not in answer.headers
    body = answer.json()
    assert body["type"] == SAVED
    assert body["service"] == service
    assert "Do not resubmit" in body["detail"]


# -- async drop-in: Session.begin() ------------------------------------------------------------
@pytest.fixture
def after_commit() -> Iterator[list[Callable[[], None]]]:
    """Functions called once each, as the next COMMIT returns (the session's ``after_commit``:
    the COMMIT succeeded)."""
    calls: list[Callable[[], None]] = []

    def listener(session: Session) -> None:
        while calls:
            calls.pop(0)()

    event.listen(Session, "after_commit", listener)
    yield calls
    event.remove(Session, "after_commit", listener)


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("how", ["cancel", "asyncio.timeout"])
@pytest.mark.parametrize("where", ["drop-in code", "an operation"])
async def test_a_begin_block_cancelled_as_its_session_closes_is_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    how: str,
    where: str,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``async with Sessions.begin()``: its COMMIT succeeded, and the task is cancelled (or its
    deadline reached) as the COMMIT returns, so that the cancellation lands in the session's
    close (SQLAlchemy's, run to its end in a task of its own): marked and said (it was raised
    unmarked, unsaid: a plain 500). Inside a ``with_self_healing`` operation, the operation
    committed part of its work before its interruption, and that answer (500
    ``partly-committed``: check before resubmitting) comes first: the operation may have had
    more to do."""
    engine = create_async_engine(pg_server.url(database, driver=driver))
    Sessions = rdb.AsyncResilientSession(engine, service=service)

    async def block() -> None:
        async with Sessions.begin() as session:
            await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))

    work = block if where == "drop-in code" else rdb.with_self_healing(service=service)(block)
    try:
        if how == "cancel":
            task = asyncio.ensure_future(work())
            after_commit.append(task.cancel)
            with pytest.raises(asyncio.CancelledError) as cancelled:
                await task
            raised: BaseException = cancelled.value
        else:
            loop = asyncio.get_running_loop()
            deadline = asyncio.timeout(None)
            after_commit.append(lambda: deadline.reschedule(loop.time()))
            with pytest.raises(TimeoutError) as timed_out:
                async with deadline:
                    await work()
            raised = timed_out.value
            assert isinstance(raised.__cause__, asyncio.CancelledError)
        assert not after_commit  # the COMMIT returned
        assert _notes(pg_server, database, "x") == 1
        assert_pool_took_all_back(engine.pool, caplog)
        whose = "a transaction of drop-in code (Session.begin())"
        if where == "drop-in code":
            assert_saved_then_interrupted(raised, service, events, whose)
        else:
            assert saved_then_interrupted(raised) == service
            answer = problem_details(raised)
            assert answer is not None
            assert answer.body["type"] == "urn:resilient-db:problem:partly-committed"
    finally:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("unit", ["writes", "reads"])
async def test_a_begin_block_around_a_unit_is_saved_then_interrupted_when_the_unit_wrote(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    unit: str,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``async with Sessions.begin()`` around a unit (``run``) whose COMMIT succeeded, the task
    cancelled as it returned: the cancellation lands in the block's session's close, and the
    change the unit saved is said, as the block's own would be. A unit that only read saved
    nothing."""
    engine = create_async_engine(pg_server.url(database, driver=driver))
    Sessions = rdb.AsyncResilientSession(engine, service=service)

    async def block() -> None:
        async with Sessions.begin():
            await Sessions.run(_anote if unit == "writes" else _aread, "x")

    try:
        task = asyncio.ensure_future(block())
        after_commit.append(task.cancel)
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        assert not after_commit  # the COMMIT returned
        assert_pool_took_all_back(engine.pool, caplog)
        if unit == "writes":
            assert _notes(pg_server, database, "x") == 1
            # the cancellation lands in the block's close, or, when the unit's own end still
            # waits after its COMMIT (its connection's reset, where psycopg yields to the event
            # loop once it has been busy a few milliseconds: a loaded machine, a garbage
            # collection), there, said by the unit; committed and said once either way
            whose = "a transaction of drop-in code (Session.begin())"
            unit_said = "the unit (marker "
            assert_saved_then_interrupted(
                cancelled.value, service, events, whose, or_whose=unit_said
            )
        else:
            assert saved_then_interrupted(cancelled.value) is None
            assert problem_details(cancelled.value) is None
            assert not [e for e in events if e.name == "commit_interrupted"]
    finally:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("where", ["drop-in code", "an operation"])
async def test_a_begin_block_that_only_read_is_not_said_to_have_saved(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    where: str,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``async with Sessions.begin()`` around a read only, cancelled as its COMMIT returns (in
    its session's close): the cancellation goes on unmarked and unsaid, as a unit's that wrote
    nothing does: nothing was saved, so resubmitting is safe (it was marked saved, "do not
    resubmit")."""
    engine = create_async_engine(pg_server.url(database, driver=driver))
    Sessions = rdb.AsyncResilientSession(engine, service=service)

    async def block() -> None:
        async with Sessions.begin() as session:
            await session.execute(sa.text("SELECT count(*) FROM prune_notes"))

    work = block if where == "drop-in code" else rdb.with_self_healing(service=service)(block)
    try:
        task = asyncio.ensure_future(work())
        after_commit.append(task.cancel)
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        assert not after_commit  # the COMMIT returned
        assert_pool_took_all_back(engine.pool, caplog)
        assert saved_then_interrupted(cancelled.value) is None
        assert not [e for e in events if e.name == "commit_interrupted"]
        if where == "drop-in code":
            assert problem_details(cancelled.value) is None
    finally:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("how", ["cancel", "asyncio.timeout"])
@pytest.mark.parametrize("block", ["writes", "reads"])
async def test_a_begin_block_cancelled_after_its_commit_answered_is_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    how: str,
    block: str,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
) -> None:
    """``async with Sessions.begin()``: the server answered its COMMIT, and the task is
    cancelled (or its deadline reached) inside the COMMIT step, in an ``after_commit``
    listener of the application's awaiting I/O (a statement on the server, through
    SQLAlchemy's greenlet bridge): marked and said as in the close (it was raised unmarked,
    unsaid). A block that only read saved nothing: not said."""
    url = pg_server.url(database, driver=driver)
    engine, other = create_async_engine(url), create_async_engine(url)
    Sessions = rdb.AsyncResilientSession(engine, service=service)

    async def sleep_on_server() -> None:
        async with other.connect() as conn:
            await conn.execute(sa.text("SELECT pg_sleep(3) AS closing"))

    async def work() -> None:
        async with Sessions.begin() as session:
            if block == "writes":
                await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
            else:
                await session.execute(sa.text("SELECT count(*) FROM prune_notes"))

    after_commit.append(lambda: sa_await(sleep_on_server()))
    try:
        raised = await _interrupted_once(how, lambda: _sleeping(pg_server, database), work)
        assert not after_commit  # the COMMIT returned
        assert engine.pool.checkedout() == 0
        if block == "writes":
            assert _notes(pg_server, database, "x") == 1
            whose = "a transaction of drop-in code (Session.begin())"
            assert_saved_then_interrupted(raised, service, events, whose)
        else:
            assert saved_then_interrupted(raised) is None
            assert not [e for e in events if e.name == "commit_interrupted"]
        await wait_until(lambda: not _sleeping(pg_server, database), timeout=30)
    finally:
        await engine.dispose()
        await other.dispose()


# -- async drop-in: async with Session() as s: ... await s.commit() ----------------------------
ASYNC_WHOSE = "a transaction of drop-in code (an async with Session() block)"

#: drop-in forms of an async factory's ``async with Session() as session:`` block
ASYNC_FORMS = ["commit()", "session.begin()", "run()", "run_in()"]


async def _aexecute(session: AsyncSession, statement: str) -> None:
    await session.execute(sa.text(statement))


async def _async_block(
    Sessions: rdb.AsyncResilientSession[AsyncSession], form: str, statement: str
) -> None:
    """Drop-in code: ``statement`` in an ``async with Session()`` block that commits it
    (``await session.commit()``, or the block of ``session.begin()`` inside it), or in a unit
    run inside the block (``run()``, in a session of its own; ``run_in()``, in the block's)."""
    async with Sessions() as session:
        if form == "run()":
            await Sessions.run(_aexecute, statement)
        elif form == "run_in()":
            await Sessions.run_in(session, _aexecute, statement)
        else:
            await _commit_in(session, form, statement)


async def _commit_in(session: AsyncSession, form: str, statement: str) -> None:
    """``statement`` committed in ``session``: ``await session.commit()``, or at the end of
    the block of ``session.begin()``."""
    if form == "commit()":
        await session.execute(sa.text(statement))
        await session.commit()
    else:
        async with session.begin():
            await session.execute(sa.text(statement))


async def _cancelled_as_a_commit_returns(
    how: str, after_commit: list[Callable[[], None]], work: Callable[[], Any]
) -> BaseException:
    """Run ``work()``, its task cancelled (or the deadline of an ``asyncio.timeout`` around it
    reached) as the next COMMIT returns: the cancellation lands at its next wait, the close of
    the block's session (SQLAlchemy's, run to its end in a task of its own). What it raised."""
    if how == "cancel":
        task = asyncio.ensure_future(work())
        after_commit.append(task.cancel)
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        return cancelled.value
    loop = asyncio.get_running_loop()
    deadline = asyncio.timeout(None)
    after_commit.append(lambda: deadline.reschedule(loop.time()))
    with pytest.raises(TimeoutError) as timed_out:
        async with deadline:
            await work()
    assert isinstance(timed_out.value.__cause__, asyncio.CancelledError)
    return timed_out.value


def assert_not_said(raised: BaseException, events: list[rdb.SelfHealEvent]) -> None:
    """An interruption that came after no saved change: unmarked, unsaid."""
    assert saved_then_interrupted(raised) is None
    assert problem_details(raised) is None
    assert not [e for e in events if e.name == "commit_interrupted"]


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("form", ASYNC_FORMS[:2])
async def test_an_async_with_block_whose_commit_rolled_back_is_not_said_to_have_saved(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    form: str,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ``async with Sessions() as session:`` block (outside any unit) writes, catches a
    database error and goes on, then commits: the server answers the failed transaction's
    COMMIT with ROLLBACK (no error, as plain SQLAlchemy), and the task is cancelled as it
    returns. Nothing was saved: unmarked and unsaid (it was answered
    ``saved-then-interrupted``: "do not resubmit" a change that was lost)."""
    engine = create_async_engine(pg_server.url(database, driver=driver))
    Sessions = rdb.AsyncResilientSession(engine, service=service)

    async def write_and_fail(session: AsyncSession) -> None:
        await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
        with contextlib.suppress(sa.exc.DBAPIError):
            await session.execute(sa.text("SELECT 1/0"))

    async def work() -> None:
        async with Sessions() as session:
            if form == "commit()":
                await write_and_fail(session)
                await session.commit()
            else:
                async with session.begin():
                    await write_and_fail(session)

    try:
        raised = await _cancelled_as_a_commit_returns("cancel", after_commit, work)
        assert not after_commit  # the COMMIT returned
        assert_pool_took_all_back(engine.pool, caplog)
        assert _notes(pg_server, database, "x") == 0
        assert_not_said(raised, events)
    finally:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("how", ["cancel", "asyncio.timeout"])
@pytest.mark.parametrize("form", ASYNC_FORMS)
@pytest.mark.parametrize("block", ["writes", "reads", "self-healing off"])
async def test_an_async_with_block_cancelled_as_its_session_closes_is_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    how: str,
    form: str,
    block: str,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An async factory's ``async with Sessions() as session:`` block committed a write (its
    own COMMIT, or a unit's run inside it), and the task is cancelled (or its deadline reached)
    as the COMMIT returns, so that the cancellation lands in SQLAlchemy's close at the block's
    end: marked and said, once (it was raised unmarked, unsaid: a plain 500, inviting a
    resubmit that writes again). A block that only read saved nothing, and with self-healing
    off the block is plain SQLAlchemy's: neither is marked or said."""
    engine = create_async_engine(pg_server.url(database, driver=driver))
    Sessions = rdb.AsyncResilientSession(
        engine, service=service, config=rdb.Config(enabled=block != "self-healing off")
    )
    if block == "reads":
        statement = "SELECT count(*) FROM prune_notes"
    else:
        statement = "INSERT INTO prune_notes (note) VALUES ('x')"
    try:
        raised = await _cancelled_as_a_commit_returns(
            how, after_commit, lambda: _async_block(Sessions, form, statement)
        )
        assert not after_commit  # the COMMIT returned
        assert_pool_took_all_back(engine.pool, caplog)  # the close ran to its end
        assert _notes(pg_server, database, "x") == (0 if block == "reads" else 1)
        if block == "writes":
            # a unit run in the block (run()): the cancellation lands in the block's close, or,
            # when the unit's own end still waits after its COMMIT (a loaded machine: its
            # connection's reset), there, said by the unit; committed and said once either way
            unit = "the unit (marker " if form == "run()" else None
            assert_saved_then_interrupted(raised, service, events, ASYNC_WHOSE, or_whose=unit)
        else:
            assert_not_said(raised, events)
    finally:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("form", ASYNC_FORMS[:2])
@pytest.mark.parametrize(
    ("block", "how"),
    [
        ("writes", "cancel"),
        ("writes", "asyncio.timeout"),
        ("reads", "cancel"),
        ("self-healing off", "cancel"),
        ("interrupted before its COMMIT", "cancel"),
        ("interrupted in a statement after its COMMIT", "asyncio.timeout"),
    ],
)
async def test_an_async_with_block_cancelled_after_its_commit_answered_is_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    form: str,
    block: str,
    how: str,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
) -> None:
    """An async factory's ``async with Sessions() as session:`` block: the server answered its
    COMMIT of a write (``await session.commit()``, or ``session.begin()``'s block's end), and
    the task is cancelled (or its deadline reached) inside the COMMIT step, in an
    ``after_commit`` listener of the application's awaiting I/O (a statement on the server):
    marked and said, as in the close (it was raised unmarked, unsaid). Not a block that only
    read, nor one with self-healing off, nor one interrupted in its statement before its
    COMMIT, or in a statement after it (the COMMIT was not where it was interrupted)."""
    url = pg_server.url(database, driver=driver)
    engine, other = create_async_engine(url), create_async_engine(url)
    Sessions = rdb.AsyncResilientSession(
        engine, service=service, config=rdb.Config(enabled=block != "self-healing off")
    )
    insert = "INSERT INTO prune_notes (note) VALUES ('x')"
    statement = {
        "reads": "SELECT count(*) FROM prune_notes",
        "interrupted before its COMMIT": (
            "INSERT INTO prune_notes (note) SELECT 'x' FROM pg_sleep(3) AS closing"
        ),
    }.get(block, insert)

    async def sleep_on_server() -> None:
        async with other.connect() as conn:
            await conn.execute(sa.text("SELECT pg_sleep(3) AS closing"))

    async def work() -> None:
        if block != "interrupted in a statement after its COMMIT":
            await _async_block(Sessions, form, statement)
            return
        async with Sessions() as session:
            await _commit_in(session, form, insert)
            await session.execute(sa.text("SELECT pg_sleep(3) AS closing"))

    if not block.startswith("interrupted"):
        after_commit.append(lambda: sa_await(sleep_on_server()))
    try:
        raised = await _interrupted_once(how, lambda: _sleeping(pg_server, database), work)
        assert not after_commit  # the COMMIT returned
        assert engine.pool.checkedout() == 0
        saved = block not in ("reads", "interrupted before its COMMIT")
        assert _notes(pg_server, database, "x") == (1 if saved else 0)
        if block == "writes":
            assert_saved_then_interrupted(raised, service, events, ASYNC_WHOSE)
        else:
            assert_not_said(raised, events)
        await wait_until(lambda: not _sleeping(pg_server, database), timeout=30)
    finally:
        await engine.dispose()
        await other.dispose()


#: how long psycopg lets the event loop be busy before it yields to it in a wait that needs no
#: I/O (psycopg 3.3's ``MAX_BUSY_TIME``; earlier releases never yield there)
PSYCOPG_BUSY = getattr(psycopg.waiting, "MAX_BUSY_TIME", 0.005)


@pytest.mark.asyncio
@pytest.mark.parametrize("form", ASYNC_FORMS[:2])
@pytest.mark.parametrize("how", ["cancel", "asyncio.timeout"])
@pytest.mark.parametrize(
    ("driver", "waits"),
    [
        ("psycopg", "psycopg's reset"),
        ("psycopg", "a reset listener"),
        ("asyncpg", "a reset listener"),
    ],
)
async def test_an_async_with_block_cancelled_as_its_commit_returns_its_connection_is_saved(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    waits: str,
    how: str,
    form: str,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An async factory's ``async with Sessions() as session:`` block: the server answered its
    COMMIT of a write, and the cancellation (or the deadline) lands at the very end of the
    COMMIT's step, as the transaction's close hands its connection back to the pool: in the
    pool's reset, where psycopg (3.3) yields to the event loop once the loop has been busy
    for ``MAX_BUSY_TIME`` (5 ms: a garbage collection, a loaded machine; here an
    ``after_commit`` listener that holds the loop that long), or in a ``reset`` listener of
    the application's doing I/O. SQLAlchemy takes the transaction off its session before
    that, and marks it closed only after: marked and said, as earlier in the COMMIT's step (it
    was raised unmarked, unsaid: the session had no transaction any more, and the block's end
    did not see its COMMIT's)."""
    engine = create_async_engine(pg_server.url(database, driver=driver))
    Sessions = rdb.AsyncResilientSession(engine, service=service)
    reached: list[int] = []
    if waits == "psycopg's reset":
        # (the loop held, not waited on: psycopg's yield is due whatever the machine's speed)
        after_commit.append(lambda: time.sleep(2 * PSYCOPG_BUSY))
    else:

        @event.listens_for(engine.sync_engine, "reset")
        def query(dbapi_connection: Any, record: Any, state: Any) -> None:
            if not reached:
                reached.append(1)
                cursor = dbapi_connection.cursor()
                try:
                    cursor.execute("SELECT 1")
                finally:
                    cursor.close()

    try:
        raised = await _cancelled_as_a_commit_returns(
            how,
            after_commit,
            lambda: _async_block(Sessions, form, "INSERT INTO prune_notes (note) VALUES ('x')"),
        )
        assert not after_commit  # the COMMIT returned
        assert reached or waits == "psycopg's reset"
        assert_pool_took_all_back(engine.pool, caplog)
        assert _notes(pg_server, database, "x") == 1
        assert_saved_then_interrupted(raised, service, events, ASYNC_WHOSE)
    finally:
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_an_async_with_block_whose_session_is_entered_again_is_still_saved_then_interrupted(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
) -> None:
    """The async twin of the sync test above: an ``async with Sessions()`` block whose session
    a helper enters again (``async with session:``): the inner block's end gives the outer
    block its note back, so the outer block's COMMIT of a write, cancelled once the server
    answered it (in an ``after_commit`` listener awaiting I/O), is marked and said, and no
    drop-in block is left set."""
    from resilient_db._statements import dropin_block  # noqa: PLC0415

    url = pg_server.url(database, driver=driver)
    engine, other = create_async_engine(url), create_async_engine(url)
    Sessions = rdb.AsyncResilientSession(engine, service=service)

    async def helper(session: AsyncSession) -> int:
        async with session:  # entered again: its end closes the session, as SQLAlchemy's does
            return len((await session.execute(sa.text("SELECT 1"))).all())

    async def sleep_on_server() -> None:
        async with other.connect() as conn:
            await conn.execute(sa.text("SELECT pg_sleep(3) AS closing"))

    async def work() -> None:
        async with Sessions() as session:
            assert await helper(session) == 1
            await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
            after_commit.append(lambda: sa_await(sleep_on_server()))
            await session.commit()
        assert dropin_block.get() is None

    try:
        raised = await _interrupted_once("cancel", lambda: _sleeping(pg_server, database), work)
        assert not after_commit  # the COMMIT returned
        assert _notes(pg_server, database, "x") == 1
        assert_saved_then_interrupted(raised, service, events, ASYNC_WHOSE)
        assert dropin_block.get() is None
        await wait_until(lambda: not _sleeping(pg_server, database), timeout=30)
    finally:
        await engine.dispose()
        await other.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_an_async_with_session_block_around_a_unit_interrupted_after_its_commit_says_it_once(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
) -> None:
    """An ``async with Sessions()`` block that saved a change, then ran a unit in its session
    (``run_in``) cancelled in an ``after_commit`` listener as the unit's COMMIT returned: the
    unit says it, and the block, whose session's transaction is the unit's, committed, does not
    say it a second time (two lines for one interruption)."""
    url = pg_server.url(database, driver=driver)
    engine, other = create_async_engine(url), create_async_engine(url)
    Sessions = rdb.AsyncResilientSession(engine, service=service)

    async def sleep_on_server() -> None:
        async with other.connect() as conn:
            await conn.execute(sa.text("SELECT pg_sleep(3) AS closing"))

    async def work() -> None:
        async with Sessions() as session:
            await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('y')"))
            await session.commit()
            after_commit.append(lambda: sa_await(sleep_on_server()))
            await Sessions.run_in(session, _anote, "x")

    try:
        raised = await _interrupted_once("cancel", lambda: _sleeping(pg_server, database), work)
        assert not after_commit
        assert _notes(pg_server, database, "x") == 1
        assert_saved_then_interrupted(raised, service, events, "the unit (marker ")
        await wait_until(lambda: not _sleeping(pg_server, database), timeout=30)
    finally:
        await engine.dispose()
        await other.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_an_async_session_class_of_yours_keeps_its_own_async_with(
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    *,
    after_commit: list[Callable[[], None]],
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Your ``AsyncSession`` subclass overriding ``__aenter__`` and ``__aexit__`` (calling
    SQLAlchemy's through ``super()``): the factory's class is a subclass of it, its sessions
    are instances of yours, your methods run once each per block, and the block that saved a
    change, cancelled as its session closes, is marked and said."""
    calls: list[str] = []

    class Tracked(AsyncSession):
        async def __aenter__(self) -> Tracked:
            calls.append("enter")
            return await super().__aenter__()

        async def __aexit__(self, kind: Any, value: Any, traceback: Any) -> None:
            calls.append(f"exit {kind and kind.__name__}")
            await super().__aexit__(kind, value, traceback)

    engine = create_async_engine(pg_server.url(database, driver=driver))
    Sessions = rdb.AsyncResilientSession(engine, service=service, class_=Tracked)
    try:
        assert Sessions.class_ is not Tracked
        assert issubclass(Sessions.class_, Tracked)

        async def work() -> None:
            async with Sessions() as session:
                assert isinstance(session, Tracked)
                await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
                await session.commit()

        raised = await _cancelled_as_a_commit_returns("cancel", after_commit, work)
        assert calls == ["enter", "exit None"]
        assert _notes(pg_server, database, "x") == 1
        assert_saved_then_interrupted(raised, service, events, ASYNC_WHOSE)
        assert_pool_took_all_back(engine.pool, caplog)
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_async_dropin_blocks_leave_nothing_behind(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    """What an ``async with`` block notes is its own, gone at its end: also for a factory whose
    class is another factory's, and with a ``Session.begin()`` block (which closes the session
    through its ``__aexit__`` without entering it); a class whose ``__aexit__`` answers that the
    error is handled keeps its answer; and the class a factory makes goes with it, once units
    and blocks ran (a unit's end is kept per session class)."""
    from resilient_db._statements import dropin_block  # noqa: PLC0415

    engine = create_async_engine(pg_server.url(database))

    class Swallowing(AsyncSession):
        async def __aexit__(self, kind: Any, value: Any, traceback: Any) -> bool:  # type: ignore[override]
            await super().__aexit__(kind, value, traceback)
            return kind is LookupError

    try:
        first = rdb.AsyncResilientSession(engine, service=service)
        second = rdb.AsyncResilientSession(engine, service=f"{service}-b", class_=first.class_)
        for factory in (first, second, first, second):
            async with factory() as session:
                await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
                assert dropin_block.get() is not None
                await session.commit()
            assert dropin_block.get() is None
            async with factory.begin() as session:
                await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES ('x')"))
            assert dropin_block.get() is None
        async with rdb.AsyncResilientSession(engine, service=service, class_=Swallowing)():
            raise LookupError
        assert dropin_block.get() is None
        assert _notes(pg_server, database, "x") == 8

        Sessions = rdb.AsyncResilientSession(engine, service=service)
        await Sessions.run(_anote, "y")
        async with Sessions() as session:
            await session.execute(sa.text("SELECT 1"))
        made, factory_ref = weakref.ref(Sessions.class_), weakref.ref(Sessions)
        del Sessions, session, first, second, factory
        await asyncio.sleep(0)  # (the unit's prune runs in a task of its own)
        gc.collect()
        assert factory_ref() is None
        # (the factory and the class of its sync sessions hold each other, as a sync
        # factory and its class do: the collector frees the factory, whose finalizer lets its
        # class go, freed by the next collection)
        gc.collect()
        assert made() is None
    finally:
        await engine.dispose()


def test_a_group_is_answered_saved_then_interrupted_after_the_answers_that_come_first() -> None:
    """In an exception group, an interruption after a COMMIT is answered after an unknown
    outcome and a partly-committed change (a change of which part may be missing), before the
    rest."""
    from resilient_db._classify import mark_partly_committed  # noqa: PLC0415
    from resilient_db._unit import mark_saved_then_interrupted  # noqa: PLC0415
    from resilient_db.web._problems import BASE_GROUP  # noqa: PLC0415

    assert BASE_GROUP is not None  # (Python 3.11's, as this module's deadlines)
    saved = GeventStyleTimeout()
    mark_saved_then_interrupted(saved, "orders")
    answer = problem_details(BASE_GROUP("tasks", [saved, ValueError("own")]))
    assert answer is not None
    assert answer.body["type"] == SAVED
    assert answer.body["service"] == "orders"
    partly = ValueError("rest")
    mark_partly_committed(partly)
    answer = problem_details(BASE_GROUP("tasks", [saved, partly]))
    assert answer is not None
    assert answer.body["type"] == "urn:resilient-db:problem:partly-committed"
