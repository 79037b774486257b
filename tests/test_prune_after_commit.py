"""The prune of expired commit markers, due every PRUNE_INTERVAL per engine after a writing
unit's COMMIT, is housekeeping: it never turns a committed unit into a failure for its caller.

An async unit returns its result once its COMMIT succeeded; its due prune runs in a task of its
own, so that a deadline of the caller's (``asyncio.timeout`` around ``run``) reached then fires
nowhere in the unit, and can't cut the prune off either (before, the prune ran in the unit's
greenlet hop, on the unit's task: the deadline raised ``TimeoutError`` from a committed unit,
which a web handler answered with a plain 500 a client may resubmit after). Against the suite's
real server, through both async drivers; the prune is held on the server by a table lock taken
as the unit's COMMIT returns, and the deadlines are brought forward on real events (the COMMIT
returned, the server shows the prune waiting), not after durations."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from loops import LOOPS
from scenarios import ASYNC_DRIVERS, add_expired_markers, expired_markers, install_markers
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import PostgresServer
from resilient_db.web import problem_details

pytestmark = [
    pytest.mark.usefixtures("no_backoff"),
    pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is Python 3.11's"),
]

EXPIRED = 50  # expired markers each test leaves for the prune


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    with pg_server.connect(pg_database) as conn:
        conn.execute("CREATE TABLE prune_notes (note text NOT NULL)")
    install_markers(pg_server, pg_database)
    return pg_database


def _notes(server: PostgresServer, database: str, note: str) -> int:
    rows = server.execute(
        "SELECT count(*) FROM prune_notes WHERE note = %s", params=[note], database=database
    )
    return int(rows[0][0])


def _prune_waits(server: PostgresServer, database: str) -> bool:
    """A backend of ``database`` runs the prune, waiting for a lock."""
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query ILIKE '%prune_commit_markers%'",
        database=database,
    )
    return bool(rows[0][0])


def _backends(server: PostgresServer, database: str, but: int) -> int:
    """The backends of ``database`` other than the asking one and ``but``."""
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND pid <> %s",
        params=[but],
        database=database,
    )
    return int(rows[0][0])


async def _note(session: AsyncSession, note: str) -> str:
    await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES (:n)"), {"n": note})
    return note


@pytest.fixture
def after_commit() -> Iterator[list[Any]]:
    """Functions called once each, as the next unit's COMMIT returns (the session's
    ``after_commit``: the COMMIT succeeded, the unit is committed)."""
    calls: list[Any] = []

    def listener(session: Session) -> None:
        while calls:
            calls.pop(0)()

    event.listen(Session, "after_commit", listener)
    yield calls
    event.remove(Session, "after_commit", listener)


async def _factory_due_to_prune(
    server: PostgresServer, database: str, driver: str, service: str
) -> tuple[Any, rdb.AsyncResilientSession[AsyncSession]]:
    """An engine and its factory, whose next writing unit prunes (as PRUNE_INTERVAL after the
    engine's first unit)."""
    engine = create_async_engine(server.url(database, driver=driver))
    Sessions = rdb.AsyncResilientSession(engine, service=service)
    assert await Sessions.run(_note, "first") == "first"
    add_expired_markers(server, database, EXPIRED)
    Sessions._hooks.commit._next_prune = 0.0  # as if PRUNE_INTERVAL had passed
    return engine, Sessions


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_a_deadline_reached_as_the_commit_returns_leaves_the_unit_committed(
    pg_server: PostgresServer,
    database: str,
    driver: str,
    service: str,
    *,
    after_commit: list[Any],
    events: list[rdb.SelfHealEvent],
) -> None:
    """The caller's deadline is reached as the unit's COMMIT returns, with a prune due: the
    unit returns its result (before: ``TimeoutError``, its line "commit_interrupted
    outcome=committed", and no answer of ``problem_details``: a plain 500), and the prune,
    in its own task, is not cut off by the deadline."""
    engine, Sessions = await _factory_due_to_prune(pg_server, database, driver, service)
    try:
        deadline = asyncio.timeout(None)
        loop = asyncio.get_running_loop()
        after_commit.append(lambda: deadline.reschedule(loop.time()))
        try:
            async with deadline:
                value = await Sessions.run(_note, "x")
        except TimeoutError as exc:
            pytest.fail(f"a committed unit raised TimeoutError; web answer: {problem_details(exc)}")
        assert value == "x"
        assert not deadline.expired()  # it fired nowhere: the unit was done
        assert _notes(pg_server, database, "x") == 1
        assert not [e for e in events if e.name == "commit_interrupted"]
        pruning = Sessions._hooks.commit.pruning
        assert pruning is not None
        await pruning
        assert expired_markers(pg_server, database) == 0
        assert Sessions._hooks.commit.pruning is None
        assert not Sessions._hooks.commit.prune_due()  # the next one an interval later
    finally:
        await engine.dispose()


async def _run_while_the_prune_waits(
    Sessions: rdb.AsyncResilientSession[AsyncSession], server: PostgresServer, database: str
) -> str:
    """Run a unit whose prune is held on the server, under a deadline that fires once the
    server shows the prune waiting, if the unit has not returned by then (it has: its prune
    runs in a task of its own)."""
    deadline = asyncio.timeout(None)
    returned = False

    async def expire_once_the_prune_waits() -> None:
        while not _prune_waits(server, database):
            await asyncio.sleep(0.005)  # (an order: the prune has reached the lock)
        if not returned:
            deadline.reschedule(asyncio.get_running_loop().time())

    watcher = asyncio.create_task(expire_once_the_prune_waits())
    try:
        async with deadline:
            value = await Sessions.run(_note, "x")
            returned = True
    except TimeoutError:
        pytest.fail("the unit waited for its prune, and its deadline cut it off there")
    finally:
        await asyncio.wait_for(watcher, 30)
    return value


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_a_unit_does_not_wait_for_its_prune_nor_can_its_deadline_cut_it_off(
    pg_server: PostgresServer,
    database: str,
    driver: str,
    service: str,
    *,
    after_commit: list[Any],
) -> None:
    """The prune waits on the server (a table lock taken as the unit's COMMIT returns): the
    unit has returned meanwhile, and a deadline set to fire once the server shows the prune
    waiting finds no unit to cut off (before: the unit waited for its prune, and the
    deadline raised ``TimeoutError`` from the committed unit). The prune, in its own task,
    finishes once the lock is released; no second prune of the engine starts meanwhile."""
    engine, Sessions = await _factory_due_to_prune(pg_server, database, driver, service)
    holder = psycopg.connect(pg_server.conninfo(database), autocommit=False)
    try:
        after_commit.append(
            lambda: holder.execute("LOCK TABLE resilient_db.commit_markers IN EXCLUSIVE MODE")
        )
        value = await _run_while_the_prune_waits(Sessions, pg_server, database)
        assert value == "x"
        assert _notes(pg_server, database, "x") == 1
        protocol = Sessions._hooks.commit
        pruning = protocol.pruning
        assert pruning is not None
        assert not pruning.done()  # waiting on the server
        # due again meanwhile (a unit writing a marker would wait for the lock too): the
        # engine's next unit would start no second prune while this one runs
        protocol._next_prune = 0.0
        from resilient_db._commit import CommitRequest  # noqa: PLC0415
        from resilient_db._unit import claim_prune  # noqa: PLC0415

        assert claim_prune(protocol, CommitRequest()) is None
        assert protocol.prune_due()
        holder.rollback()  # the lock released: the prune goes on
        await asyncio.wait_for(pruning, 30)
        assert expired_markers(pg_server, database) == 0
        assert Sessions._hooks.commit.pruning is None
    finally:
        holder.close()
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_an_engine_disposed_of_while_its_prune_runs_leaves_no_connection_open(
    pg_server: PostgresServer,
    database: str,
    driver: str,
    service: str,
    *,
    after_commit: list[Any],
) -> None:
    """``AsyncEngine.dispose()`` while the prune's task waits on the server: the prune finishes
    and closes its connection instead of checking it in to the pool disposed of (where
    nothing would close it: an unclosed connection, warned about when it is collected)."""
    engine, Sessions = await _factory_due_to_prune(pg_server, database, driver, service)
    holder = psycopg.connect(pg_server.conninfo(database), autocommit=False)
    try:
        after_commit.append(
            lambda: holder.execute("LOCK TABLE resilient_db.commit_markers IN EXCLUSIVE MODE")
        )
        assert await _run_while_the_prune_waits(Sessions, pg_server, database) == "x"
        pruning = Sessions._hooks.commit.pruning
        assert pruning is not None
        await engine.dispose()
        holder.rollback()
        await asyncio.wait_for(pruning, 30)
        assert expired_markers(pg_server, database) == 0
        # the engine's connections, the prune's too, are closed (their backends then exit)
        async with asyncio.timeout(30):
            while _backends(pg_server, database, holder.info.backend_pid):
                await asyncio.sleep(0.005)
        gc.collect()  # (an unclosed driver connection would warn here: an error in this suite)
    finally:
        holder.close()
        await engine.dispose()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_a_prune_still_running_when_the_loop_ends_is_cancelled_without_warnings(
    pg_server: PostgresServer,
    database: str,
    driver: str,
    service: str,
    *,
    tmp_path: Any,
    loop: str,
) -> None:
    """``asyncio.run`` (``uvloop.run``) ends with the prune's task waiting on the server: the
    task is cancelled and its connection closed, with no warning (no "Task was destroyed but
    it is pending", no unclosed connection or transport), in a Python of its own run with
    warnings as errors."""
    import subprocess  # noqa: PLC0415

    add_expired_markers(pg_server, database, EXPIRED)
    script = tmp_path / "loop_ends.py"
    script.write_text(
        f"""
import asyncio, gc, psycopg, sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session
from sqlalchemy.ext.asyncio import create_async_engine
import resilient_db as rdb

async def note(session, text):
    await session.execute(sa.text("INSERT INTO prune_notes (note) VALUES (:n)"), {{"n": text}})

async def main(holder):
    engine = create_async_engine({pg_server.url(database, driver=driver)!r})
    Sessions = rdb.AsyncResilientSession(engine, service={service!r})
    await Sessions.run(note, "first")
    Sessions._hooks.commit._next_prune = 0.0
    lock = lambda s: holder.execute("LOCK TABLE resilient_db.commit_markers IN EXCLUSIVE MODE")
    event.listen(Session, "after_commit", lock, once=True)
    await asyncio.wait_for(Sessions.run(note, "x"), 10)  # (it does not wait for its prune)
    with psycopg.connect({pg_server.conninfo(database)!r}, autocommit=True) as watch:
        while not watch.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query ILIKE '%prune_commit_markers%'"
        ).fetchone()[0]:
            await asyncio.sleep(0.005)
    print("pending", not Sessions._hooks.commit.pruning.done(), flush=True)

holder = psycopg.connect({pg_server.conninfo(database)!r}, autocommit=False)
{"import uvloop; uvloop.run" if loop == "uvloop" else "asyncio.run"}(main(holder))
holder.rollback()
holder.close()
gc.collect()
print("done", flush=True)
"""
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pending", "True", "done"]
    assert done.stderr == ""


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_an_engine_disposed_of_right_after_the_unit_leaves_no_connection_open(
    pg_server: PostgresServer, database: str, driver: str, service: str
) -> None:
    """The application shuts down right after a unit whose COMMIT made the prune due: the
    prune's task, started after ``dispose()`` (psycopg's close does not yield), took the pool
    that replaced the disposed one and left its connection open in it. It takes the unit's."""
    engine, Sessions = await _factory_due_to_prune(pg_server, database, driver, service)
    try:
        assert await Sessions.run(_note, "last") == "last"
        pruning = Sessions._hooks.commit.pruning
        await engine.dispose()
        if pruning is not None:
            await asyncio.wait_for(pruning, 30)
        async with asyncio.timeout(30):
            while _backends(pg_server, database, 0):
                await asyncio.sleep(0.005)
        assert engine.pool.checkedin() == 0
    finally:
        await engine.dispose()


#: longest a unit may take here before the test calls it held by its prune (a unit takes
#: milliseconds; the pool's timeout below is far longer)
HELD = 10.0


def test_a_sync_unit_does_not_wait_for_a_connection_for_its_prune(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    """The prune after a sync unit runs inline, on another connection of the engine's pool:
    with none idle (the pool's one connection held by the connection the factory is bound to;
    in full use, every one taken by units waiting) it waited the pool's whole ``pool_timeout``
    (30 s by default) after the unit had committed, keeping the unit's caller waiting, then
    failed quietly. Now it is put off to its next interval, and runs once a connection is
    idle."""
    engine = sa.create_engine(
        pg_server.url(database), pool_size=1, max_overflow=0, pool_timeout=HELD * 3
    )
    bound = engine.connect()
    Sessions = rdb.ResilientSession(bound, service=service)

    def note(session: Session, text: str) -> str:
        session.execute(sa.text("INSERT INTO prune_notes (note) VALUES (:n)"), {"n": text})
        return text

    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(Sessions.run(note, "bound"))
        except BaseException as exc:  # (handed to the test)
            outcome.append(exc)

    try:
        assert Sessions.run(note, "first") == "first"
        add_expired_markers(pg_server, database, EXPIRED)
        Sessions._hooks.commit._next_prune = 0.0  # as if PRUNE_INTERVAL had passed
        unit = threading.Thread(target=run, daemon=True)
        unit.start()
        unit.join(HELD)
        held = unit.is_alive()
    finally:
        bound.close()  # (the pool's connection back: a prune waiting for it goes on)
    unit.join(HELD * 4)
    assert not held, "the committed unit waited for a connection for its prune"
    assert outcome == ["bound"]
    assert _notes(pg_server, database, "bound") == 1
    assert expired_markers(pg_server, database) == EXPIRED  # put off, not run
    assert engine.pool.checkedout() == 0
    # its next interval, with an idle connection: pruned
    OnEngine = rdb.ResilientSession(engine, service=service)
    OnEngine._hooks.commit._next_prune = 0.0
    assert OnEngine.run(note, "later") == "later"
    assert expired_markers(pg_server, database) == 0
    engine.dispose()


@pytest.mark.asyncio
async def test_an_async_units_prune_takes_no_turn_in_a_pool_in_full_use(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    """The prune after an async unit runs in a task of its own: with no idle connection in
    the engine's pool it waited there the pool's ``pool_timeout``, taking its turn before the
    units waiting for a connection. Now it is put off to its next interval (no task)."""
    engine = create_async_engine(
        pg_server.url(database, driver="asyncpg"), pool_size=1, max_overflow=0, pool_timeout=30
    )
    bound = await engine.connect()
    Sessions = rdb.AsyncResilientSession(bound, service=service)
    protocol = Sessions._hooks.commit
    try:
        assert await Sessions.run(_note, "first") == "first"
        add_expired_markers(pg_server, database, EXPIRED)
        protocol._next_prune = 0.0  # as if PRUNE_INTERVAL had passed
        assert await Sessions.run(_note, "bound") == "bound"
        assert protocol.pruning is None  # no task waiting for the pool
        assert not protocol.prune_due()  # its interval claimed: tried again at the next
    finally:
        await bound.close()
        if protocol.pruning is not None:
            await asyncio.wait_for(protocol.pruning, 60)
    assert expired_markers(pg_server, database) == EXPIRED
    assert engine.pool.checkedout() == 0
    await engine.dispose()


def test_a_factory_bound_to_an_engines_first_connection_prunes(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    """A factory bound to a connection of an engine whose pool has made no other (its default
    ``pool_size`` of 5 not reached, nothing else checked in): a prune makes a new connection
    without waiting for one, so it runs. Before, it was put off as for a pool in full use,
    at every interval for as long as the factory was bound: expired markers piled up."""
    engine = sa.create_engine(pg_server.url(database), pool_timeout=HELD * 3)
    bound = engine.connect()
    try:
        Sessions = rdb.ResilientSession(bound, service=service)
        assert Sessions.run(_note_sync, "first") == "first"
        add_expired_markers(pg_server, database, EXPIRED)
        assert engine.pool.checkedin() == 0
        Sessions._hooks.commit._next_prune = 0.0  # as if PRUNE_INTERVAL had passed
        assert Sessions.run(_note_sync, "bound") == "bound"
        assert expired_markers(pg_server, database) == 0
        assert engine.pool.checkedout() == 1  # the bound one: the prune's went back
    finally:
        bound.close()
        engine.dispose()


@pytest.mark.asyncio
async def test_an_async_factory_bound_to_an_engines_first_connection_prunes(
    pg_server: PostgresServer, database: str, service: str
) -> None:
    """As the sync test above, for an async factory (its prune in a task of its own)."""
    engine = create_async_engine(pg_server.url(database, driver="asyncpg"), pool_timeout=30)
    bound = await engine.connect()
    Sessions = rdb.AsyncResilientSession(bound, service=service)
    protocol = Sessions._hooks.commit
    try:
        assert await Sessions.run(_note, "first") == "first"
        add_expired_markers(pg_server, database, EXPIRED)
        protocol._next_prune = 0.0  # as if PRUNE_INTERVAL had passed
        assert await Sessions.run(_note, "bound") == "bound"
        if protocol.pruning is not None:  # (its task, unless it ended already)
            await asyncio.wait_for(protocol.pruning, 60)
        assert expired_markers(pg_server, database) == 0
    finally:
        await bound.close()
        if protocol.pruning is not None:
            await asyncio.wait_for(protocol.pruning, 60)
        await engine.dispose()


def _note_sync(session: Session, text: str) -> str:
    session.execute(sa.text("INSERT INTO prune_notes (note) VALUES (:n)"), {"n": text})
    return text
