"""Synchronous replication with its standby down: a COMMIT cut short of the wait for the standby.

A primary with ``synchronous_standby_names`` answers a COMMIT once its synchronous standby has
the commit record. While the standby is down the COMMIT waits; cut short there (asyncpg's
``command_timeout`` cancels it; an operator or a watchdog terminates the waiting backend), the
server keeps the commit on the primary alone, and the standby a failover promotes never had it.
A unit whose COMMIT was cut short is settled on a new connection to the same primary, which
finds it committed: that proves nothing a failover keeps. "Done" needs the check's own WAL
confirmed by the synchronous standby (``resilient_db._commit.end_check``); while it
can't be, the outcome is unknown.

Real servers (a :class:`~resilient_db.testing.StandbyPair`), real faults: the standby stopped,
asyncpg's timeout, ``pg_terminate_backend`` of the backend waiting in ``SyncRep``, a crash of
the primary and the standby's promotion. Each unit writes one ledger row under a key of its own
(not unique: a unit that wrote twice shows up as two rows). No backoff is slept: the factories'
sleep is a hook that sleeps nothing (and, where a test says so, starts the standby).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db as rdb
from resilient_db.testing import StandbyPair

pytestmark = pytest.mark.slow

DATABASE = "app"
MARKERS = "markers"  # rdb.install_commit_markers ran
FALLBACK = "fallback"  # it did not: a lost COMMIT answer is checked by transaction id
#: (driver, commit verification): (a) asyncpg's command_timeout cancels the COMMIT's wait,
#: (b) psycopg's waiting backend is terminated; the fallback with psycopg
CASES = [("asyncpg", MARKERS), ("psycopg", MARKERS), ("psycopg", FALLBACK)]

#: Checks every few milliseconds for at most a few seconds (each check whose COMMIT waits for
#: the standby in vain takes resilient_db._commit.REPLICATION_WAIT); the breaker stays out.
CONFIG = rdb.Config(
    initial_delay=0.01, max_delay=0.02, max_retries=50, deadline=3.0, circuit_breaker=False
)
INSERT = sa.text("INSERT INTO ledger (key) VALUES (:key)")
_services = itertools.count()


def prepare(pair: StandbyPair, mode: str, *, before_the_standby_stops: Sequence[str] = ()) -> None:
    """The ledger and (for MARKERS) the commit markers, replicated; then the standby stops:
    from here on every writing COMMIT on the primary waits for it (so does any statement that
    writes: ``before_the_standby_stops`` are sent to the primary first)."""
    pair.create_database(DATABASE)
    engine = sa.create_engine(pair.primary.url(DATABASE))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE ledger (key text NOT NULL)"))
        if mode == MARKERS:
            rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    for statement in before_the_standby_stops:
        pair.primary.execute(statement)
    pair.wait_replayed()
    pair.standby.stop()


def ledger(pair: StandbyPair) -> dict[str, int]:
    """Rows per key on the current primary."""
    rows = pair.execute("SELECT key, count(*) FROM ledger GROUP BY key", database=DATABASE)
    return {str(key): int(count) for key, count in rows}


def fail_over(pair: StandbyPair) -> None:
    """Crash the primary now, then promote the standby (started first if it is down: it can't
    get anything from the crashed primary any more)."""
    pair.crash_primary()
    if not pair.standby.is_running():
        pair.standby.start()
    pair.promote()


class Outcome:
    """How one unit ended: ``error`` None when it returned (done); ``calls`` of its function."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.calls = 0

    @property
    def done(self) -> bool:
        return self.error is None


def run_unit(
    pair: StandbyPair,
    driver: str,
    key: str,
    *,
    cut_short: bool,
    sleep: Callable[[float], None],
) -> Outcome:
    """One unit writing ``key``, on the pair's multi-host URL. ``cut_short``: its COMMIT's wait
    for the standby is cut short: asyncpg's ``command_timeout=1`` cancels it; psycopg's
    backend, seen waiting in ``SyncRep``, is terminated. ``sleep``: the factory's backoff."""
    outcome = Outcome()
    service = f"syncrep-{next(_services)}"
    if driver == "asyncpg":

        async def write(session: Any, key: str) -> None:
            outcome.calls += 1
            await session.execute(INSERT, {"key": key})

        async def asleep(seconds: float) -> None:
            await asyncio.to_thread(sleep, seconds)

        async def main() -> None:
            args = {"command_timeout": 1} if cut_short else {}
            engine = create_async_engine(pair.url(DATABASE, driver="asyncpg"), connect_args=args)
            factory = rdb.AsyncResilientSession(
                engine, service=service, config=CONFIG, asleep=asleep
            )
            try:
                await asyncio.wait_for(factory.run(write, key), 60)
            except Exception as exc:
                outcome.error = exc
            finally:
                await engine.dispose()

        asyncio.run(main())
        return outcome

    def write_sync(session: Any, key: str) -> None:
        outcome.calls += 1
        session.execute(INSERT, {"key": key})

    engine = sa.create_engine(pair.url(DATABASE))
    factory = rdb.ResilientSession(engine, service=service, config=CONFIG, sleep=sleep)

    def run() -> None:
        try:
            factory.run(write_sync, key)
        except Exception as exc:
            outcome.error = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        if cut_short:
            terminate_the_waiting_commit(pair)
        thread.join(60)
        assert not thread.is_alive(), "the unit did not end within 60 s"
    finally:
        engine.dispose()
    return outcome


def terminate_the_waiting_commit(pair: StandbyPair) -> None:
    """Terminate the backend of the unit's COMMIT once it waits for the standby (once: the
    checks' own COMMITs wait there too, later)."""
    deadline = time.monotonic() + 20
    while True:
        rows = pair.primary.execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
            "WHERE datname = %s AND wait_event = 'SyncRep'",
            params=(DATABASE,),
        )
        if rows:
            return
        assert time.monotonic() < deadline, "no COMMIT waited for the standby"
        time.sleep(0.02)


def no_sleep(_seconds: float) -> None:
    """The factories' backoff: nothing is slept."""


@pytest.mark.parametrize(("driver", "mode"), CASES)
def test_a_commit_cut_short_of_the_synchronous_standby_is_unknown_never_done(
    pg_standby_factory: Callable[..., StandbyPair], driver: str, mode: str
) -> None:
    """The standby is down, the unit's COMMIT is cut short: committed on the primary alone.
    Its check finds it committed there, but its own COMMIT is never confirmed by the standby:
    CommitOutcomeUnknownError, not replayed. With the standby back the same kind of unit is
    done; after a crash of the primary and the standby's promotion, every unit reported done
    has its row on the new primary."""
    pair = pg_standby_factory(synchronous=True)
    prepare(pair, mode)
    cut = run_unit(pair, driver, "cut", cut_short=True, sleep=no_sleep)
    assert isinstance(cut.error, rdb.CommitOutcomeUnknownError), (
        f"a COMMIT committed on the primary alone was reported as {cut.error!r} "
        "(None: done), not unknown"
    )
    assert "not proven replicated" in str(cut.error)
    assert cut.calls == 1, "replayed after a COMMIT that was applied on the primary"

    pair.start()  # the standby is back (and synchronous again)
    back = run_unit(pair, driver, "back", cut_short=False, sleep=no_sleep)
    assert back.done, back.error
    assert back.calls == 1

    fail_over(pair)
    rows = ledger(pair)
    assert rows.get("back") == 1, rows  # reported done: on the new primary
    assert rows.get("cut", 0) <= 1, rows  # unknown: either, never twice


@pytest.mark.parametrize(("driver", "mode"), CASES)
def test_a_commit_cut_short_is_done_once_the_standby_confirms_the_check(
    pg_standby_factory: Callable[..., StandbyPair], driver: str, mode: str
) -> None:
    """The standby is down, the unit's COMMIT is cut short. The first check finds the unit
    committed on the primary, and its own COMMIT waits for the standby in vain (not proven);
    in the backoff after it the standby comes back, and the next check's COMMIT is confirmed
    by it: the unit is done, not replayed. The primary crashes the moment the unit returns:
    the row is on the promoted standby."""
    pair = pg_standby_factory(synchronous=True)
    prepare(pair, mode)
    backoffs: list[float] = []

    def start_the_standby(seconds: float) -> None:
        if not backoffs:
            pair.start()  # waits until it streams, synchronous again
        backoffs.append(seconds)

    unit = run_unit(pair, driver, "k", cut_short=True, sleep=start_the_standby)
    fail_over(pair)  # at once: nothing else reaches the standby first
    assert unit.done, unit.error
    assert unit.calls == 1, "replayed after a COMMIT that was applied"
    assert ledger(pair) == {"k": 1}, "reported done, lost by the failover"
    assert backoffs, "done before the standby was back"


def test_a_standby_slower_than_the_first_check_still_proves_the_unit(
    pg_standby_factory: Callable[..., StandbyPair],
) -> None:
    """A healthy synchronous standby that confirms a COMMIT only after 3 s (``remote_apply``
    with an apply delay: replay lag, a slow link): every check was cut off after the same 2 s
    and the unit ended unknown. Each check of a unit waits twice as long as the one before."""
    pair = pg_standby_factory(
        synchronous=True,
        settings={"synchronous_commit": "remote_apply", "recovery_min_apply_delay": "3s"},
    )
    pair.create_database(DATABASE)
    engine = sa.create_engine(pair.primary.url(DATABASE))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ledger (key text NOT NULL)"))
    rdb.install_commit_markers(engine)
    engine.dispose()
    config = rdb.Config(initial_delay=0.01, max_delay=0.02, deadline=30.0, circuit_breaker=False)
    calls: list[int] = []

    def write(session: Any) -> None:
        calls.append(1)
        session.execute(INSERT, {"key": "slow"})
        session.flush()
        # the COMMIT's answer is lost: the connection is cut while it waits for the standby
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        kill = f"SELECT pg_catalog.pg_terminate_backend({int(pid)})"
        killer = threading.Timer(1.0, pair.primary.execute, (kill,))
        killer.daemon = True
        killer.start()

    Units = rdb.ResilientSession(
        sa.create_engine(pair.primary.url(DATABASE)),
        service="slow-standby",
        config=config,
        sleep=no_sleep,
    )
    Units.run(write)  # done: the second check's COMMIT waits 4 s, and is confirmed
    assert calls == [1]
    pair.wait_replayed()
    assert ledger(pair) == {"slow": 1}


def test_a_cancelled_wait_is_no_proof_whatever_client_min_messages_says(
    pg_standby_factory: Callable[..., StandbyPair],
) -> None:
    """The standby is down, the unit's COMMIT is cut short (asyncpg's ``command_timeout``), and
    a watchdog cancels every backend waiting for the standby, the checks' too: a cancelled
    COMMIT answers success with a WARNING, which ``client_min_messages = error`` (set for the
    database) kept from the client, so the check took the plain answer for proof: "done", and
    lost by the failover. The check asks for warnings for its own transaction."""
    pair = pg_standby_factory(synchronous=True)
    quiet = f"ALTER DATABASE {DATABASE} SET client_min_messages = error"
    prepare(pair, MARKERS, before_the_standby_stops=[quiet])
    stop = threading.Event()

    def watchdog() -> None:
        if stop.wait(1.5):  # after asyncpg cut the unit's own COMMIT (1 s)
            return
        while not stop.wait(0.1):
            pair.primary.execute(
                "SELECT pg_catalog.pg_cancel_backend(pid) FROM pg_catalog.pg_stat_activity "
                "WHERE datname = %s AND wait_event = 'SyncRep'",
                params=(DATABASE,),
            )

    config = rdb.Config(
        initial_delay=0.01, max_delay=0.02, max_retries=50, deadline=6.0, circuit_breaker=False
    )

    async def main() -> BaseException | None:
        engine = create_async_engine(
            pair.primary.url(DATABASE, driver="asyncpg"), connect_args={"command_timeout": 1}
        )
        factory = rdb.AsyncResilientSession(engine, service="quiet-warnings", config=config)

        async def write(session: Any) -> None:
            await session.execute(INSERT, {"key": "quiet"})

        try:
            await asyncio.wait_for(factory.run(write), 60)
        except Exception as exc:
            return exc
        finally:
            await engine.dispose()
        return None

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        error = asyncio.run(main())
    finally:
        stop.set()
        thread.join(10)
    assert isinstance(error, rdb.CommitOutcomeUnknownError), error
