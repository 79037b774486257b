"""Synchronous replication with its standby down: a COMMIT cut short of the wait for the standby.

A primary with ``synchronous_standby_names`` answers a COMMIT once its synchronous standby has
the commit record. While the standby is down the COMMIT waits; cut short there (asyncpg's
``command_timeout`` cancels it; an operator or a watchdog terminates the waiting backend), the
server keeps the commit on the primary alone, and the standby a failover promotes never had it.
A unit whose COMMIT was cut short is settled on a new connection to the same primary, which
finds it committed: that proves nothing a failover keeps. "Done" needs the check's own WAL
confirmed by the synchronous standby (``resilient_db._commit.end_check``); while it
can't be, the outcome is unknown.

A COMMIT whose wait someone cancels (``pg_cancel_backend``) is answered with success and a
WARNING: committed on the primary alone too, so that answer is checked the same way. The check
waits at the session's ``synchronous_commit``, at least ``on`` (a unit may raise its own level),
within the time left before the deadline; a server with no standby connected is reported.

Real servers (a :class:`~resilient_db.testing.StandbyPair`), real faults: the standby stopped,
asyncpg's timeout, ``pg_terminate_backend`` or ``pg_cancel_backend`` of the backend waiting in
``SyncRep``, a crash of the primary and the standby's promotion. Each unit writes one ledger
row under a key of its own (not unique: a unit that wrote twice shows up as two rows). No
backoff is slept: the factories' sleep is a hook that sleeps nothing (and, where a test says
so, starts the standby).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import FakeClock, set_synchronous_standby_names
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db as rdb
from resilient_db import _unit
from resilient_db._commit import (
    REPLICATION_WAIT,
    REPLICATION_WAIT_CAP,
    REPLICATION_WAIT_FLOOR,
    replication_wait,
    replication_wait_within,
)
from resilient_db._retry import Policy
from resilient_db.testing import PostgresServer, StandbyPair

pytestmark = pytest.mark.slow

DATABASE = "app"
MARKERS = "markers"  # rdb.install_commit_markers ran
FALLBACK = "fallback"  # it did not: a lost COMMIT answer is checked by transaction id
#: (driver, commit verification): (a) asyncpg's command_timeout cancels the COMMIT's wait,
#: (b) psycopg's waiting backend is terminated; each with the markers (the fallback with a
#: standby is run by the cancelled-wait cases below, for both drivers: each case starts a
#: primary and a standby, so the matrix is kept to what differs)
CASES = [("asyncpg", MARKERS), ("psycopg", MARKERS)]

#: Checks every few milliseconds for at most a few seconds (each check whose COMMIT waits for
#: the standby in vain takes resilient_db._commit.REPLICATION_WAIT); the breaker stays out.
CONFIG = rdb.Config(
    initial_delay=0.01, max_delay=0.02, max_retries=50, deadline=3.0, circuit_breaker=False
)
INSERT = sa.text("INSERT INTO ledger (key) VALUES (:key)")
_services = itertools.count()


def prepare(
    pair: StandbyPair,
    mode: str,
    *,
    before_the_standby_stops: Sequence[str] = (),
    in_the_database: Sequence[str] = (),
) -> None:
    """The ledger and (for MARKERS) the commit markers, replicated; then the standby stops:
    from here on every writing COMMIT on the primary waits for it (so does any statement that
    writes: ``before_the_standby_stops`` are sent to the primary first, ``in_the_database``
    to the primary's application database)."""
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
    for statement in in_the_database:
        pair.primary.execute(statement, database=DATABASE)
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
    during: Callable[[StandbyPair], None] | None = None,
    config: rdb.Config = CONFIG,
    level: str | None = None,
    midway: bool = False,
) -> Outcome:
    """One unit writing ``key``, on the pair's multi-host URL. ``cut_short``: its COMMIT's wait
    for the standby is cut short: asyncpg's ``command_timeout=1`` cancels it; psycopg's
    backend, seen waiting in ``SyncRep``, is terminated. ``sleep``: the factory's backoff.
    ``during``: run in a thread of its own while the unit runs (any driver). ``level``: the
    unit's own ``SET LOCAL synchronous_commit``. ``driver``
    "psycopg_async": psycopg's ``AsyncConnection`` under an ``AsyncResilientSession``.
    ``midway``: the unit commits its write itself (``session.commit()``), then only reads: its
    own COMMIT is the one that waits for the standby (its final one writes nothing)."""
    outcome = Outcome()
    service = f"syncrep-{next(_services)}"
    if during is not None:
        helper = threading.Thread(target=during, args=(pair,), daemon=True)
        helper.start()
    if driver in ("asyncpg", "psycopg_async"):

        async def write(session: Any, key: str) -> None:
            outcome.calls += 1
            if level is not None:
                await session.execute(sa.text(f"SET LOCAL synchronous_commit = {level}"))
            await session.execute(INSERT, {"key": key})
            if midway:
                await session.commit()
                await session.execute(sa.text("SELECT 1"))

        async def asleep(seconds: float) -> None:
            await asyncio.to_thread(sleep, seconds)

        async def main() -> None:
            args = {"command_timeout": 1} if cut_short else {}
            url = pair.url(DATABASE, driver="asyncpg" if driver == "asyncpg" else "psycopg")
            engine = create_async_engine(url, connect_args=args)
            factory = rdb.AsyncResilientSession(
                engine, service=service, config=config, asleep=asleep
            )
            try:
                await asyncio.wait_for(factory.run(write, key), 60)
            except Exception as exc:
                outcome.error = exc
            finally:
                await engine.dispose()

        asyncio.run(main())
        if during is not None:
            helper.join(30)
        return outcome

    def write_sync(session: Any, key: str) -> None:
        outcome.calls += 1
        if level is not None:
            session.execute(sa.text(f"SET LOCAL synchronous_commit = {level}"))
        session.execute(INSERT, {"key": key})
        if midway:
            session.commit()
            session.execute(sa.text("SELECT 1"))

    engine = sa.create_engine(pair.url(DATABASE))
    factory = rdb.ResilientSession(engine, service=service, config=config, sleep=sleep)

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
    if during is not None:
        helper.join(30)
    return outcome


def terminate_the_waiting_commit(pair: StandbyPair) -> None:
    """Terminate the backend of the unit's COMMIT once it waits for the standby (once: the
    checks' own COMMITs wait there too, later)."""
    _signal_the_waiting_commit(pair, "pg_terminate_backend")


def cancel_the_waiting_commit(pair: StandbyPair) -> None:
    """Cancel (``pg_cancel_backend``, as an operator or a watchdog does) the wait of the unit's
    COMMIT for the standby, once it waits: PostgreSQL answers that COMMIT with success and a
    WARNING, the transaction committed on the primary alone. Once: the checks' own COMMITs
    wait there too, later."""
    _signal_the_waiting_commit(pair, "pg_cancel_backend")


def _signal_the_waiting_commit(pair: StandbyPair, function: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        rows = pair.primary.execute(
            f"SELECT pg_catalog.{function}(pid) FROM pg_catalog.pg_stat_activity "
            "WHERE datname = %s AND wait_event = 'SyncRep'",
            params=(DATABASE,),
        )
        if rows:
            return
        assert time.monotonic() < deadline, "no COMMIT waited for the standby"
        time.sleep(0.02)


def _terminate_once_waiting(pair: StandbyPair, pid: int, terminated: list[int]) -> None:
    """Terminate backend ``pid`` once it is seen waiting for the standby (its COMMIT's wait),
    noted in ``terminated``."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = pair.primary.execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
            "WHERE pid = %s AND wait_event = 'SyncRep'",
            params=(pid,),
        )
        if rows:
            terminated.append(pid)
            return
        time.sleep(0.02)


def create_a_warning_ledger(conn: sa.Connection) -> None:
    """A ledger table whose rows raise a WARNING when their transaction commits (a deferred
    constraint trigger): a COMMIT answered with a warning, with no replication at all."""
    conn.execute(sa.text("CREATE TABLE ledger (key text NOT NULL)"))
    conn.execute(
        sa.text(
            "CREATE FUNCTION warn() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN RAISE WARNING 'deferred check'; RETURN NULL; END$$"
        )
    )
    conn.execute(
        sa.text(
            "CREATE CONSTRAINT TRIGGER warn AFTER INSERT ON ledger "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION warn()"
        )
    )


class AtTheFirstBackoff:
    """A factory's backoff that does ``action`` at the first backoff (the standby started, a
    failover), nothing else; the backoffs asked for are in ``backoffs``."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action
        self.backoffs: list[float] = []

    def __call__(self, seconds: float) -> None:
        if not self.backoffs:
            self.action()  # (pair.start() waits until the standby streams, synchronous again)
        self.backoffs.append(seconds)


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
    start_the_standby = AtTheFirstBackoff(pair.start)
    backoffs = start_the_standby.backoffs

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
    pair = pg_standby_factory(synchronous=True, settings={"recovery_min_apply_delay": "3s"})
    # the schema's COMMITs wait for the standby's flush only (not its delayed apply: 3 s each);
    # the application's sessions, from here on, for its apply
    pair.primary.create_database(DATABASE)
    engine = sa.create_engine(pair.primary.url(DATABASE))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ledger (key text NOT NULL)"))
    rdb.install_commit_markers(engine)
    engine.dispose()
    pair.primary.execute(f"ALTER DATABASE {DATABASE} SET synchronous_commit = remote_apply")
    config = rdb.Config(initial_delay=0.01, max_delay=0.02, deadline=30.0, circuit_breaker=False)
    calls: list[int] = []
    terminated: list[int] = []
    killers: list[threading.Thread] = []

    def write(session: Any) -> None:
        calls.append(1)
        session.execute(INSERT, {"key": "slow"})
        session.flush()
        # the COMMIT's answer is lost: the connection is cut once it waits for the standby
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        killer = threading.Thread(target=_terminate_once_waiting, args=(pair, int(pid), terminated))
        killer.daemon = True
        killer.start()
        killers.append(killer)

    units_engine = sa.create_engine(pair.primary.url(DATABASE))
    Units = rdb.ResilientSession(
        units_engine, service="slow-standby", config=config, sleep=no_sleep
    )
    began = time.monotonic()
    try:
        Units.run(write)  # done: the second check's COMMIT waits 4 s, and is confirmed
    finally:
        units_engine.dispose()  # (left to the collector, its connection warned in a later test)
    assert time.monotonic() - began >= 3.0  # no proof before the standby applied the COMMIT
    assert calls == [1]
    for killer in killers:
        killer.join(30)
    assert terminated, "the unit's COMMIT was never seen waiting for the standby"
    pair.wait_replayed()
    assert ledger(pair) == {"slow": 1}


def test_a_cancelled_wait_is_no_proof_whatever_client_min_messages_says(
    pg_standby_factory: Callable[..., StandbyPair],
) -> None:
    """The standby is down, the unit's COMMIT is cut short (asyncpg's ``command_timeout``), and
    a watchdog cancels every backend waiting for the standby, the checks' too: a cancelled
    COMMIT answers success with a WARNING, which ``client_min_messages = error`` (set for the
    database) kept from the client, so the check took the plain answer for proof: "done", and
    lost by the failover. The check asks for warnings for its own transaction.

    The watchdog leaves the unit's own backends alone: their COMMIT is asyncpg's to cut (its
    wait cancelled by the watchdog first, it would be answered plainly, the warning kept from
    the client: "done", whatever the checks do), however long connecting and writing took."""
    pair = pg_standby_factory(synchronous=True)
    quiet = f"ALTER DATABASE {DATABASE} SET client_min_messages = error"
    prepare(pair, MARKERS, before_the_standby_stops=[quiet])
    stop = threading.Event()
    unit_pids: list[int] = []  # the backends the unit's attempts ran on
    unit_known = threading.Event()
    cancelled: list[int] = []  # the backends (the checks') whose wait the watchdog cancelled

    def watchdog() -> None:
        while not unit_known.wait(0.05):
            if stop.is_set():
                return
        with pair.primary.connect() as conn:  # (one connection: each look is quick)
            while not stop.wait(0.02):
                rows = conn.execute(
                    "SELECT pid, pg_catalog.pg_cancel_backend(pid) "
                    "FROM pg_catalog.pg_stat_activity "
                    "WHERE datname = %s AND wait_event = 'SyncRep' AND pid <> ALL(%s)",
                    (DATABASE, list(unit_pids)),
                ).fetchall()
                cancelled.extend(int(pid) for pid, signalled in rows if signalled)

    config = rdb.Config(
        initial_delay=0.01, max_delay=0.02, max_retries=50, deadline=6.0, circuit_breaker=False
    )

    async def main() -> BaseException | None:
        engine = create_async_engine(
            pair.primary.url(DATABASE, driver="asyncpg"), connect_args={"command_timeout": 1}
        )
        factory = rdb.AsyncResilientSession(engine, service="quiet-warnings", config=config)

        async def write(session: Any) -> None:
            pid = await session.execute(sa.text("SELECT pg_catalog.pg_backend_pid()"))
            unit_pids.append(int(pid.scalar_one()))
            unit_known.set()
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
    assert cancelled, "no check's COMMIT waited for the standby and was cancelled"


#: (driver, commit verification) for a COMMIT answered with a warning: both drivers (and
#: psycopg's async connection), with the markers and with the fallback
WARNED_CASES = [
    ("asyncpg", MARKERS),
    ("asyncpg", FALLBACK),
    ("psycopg", MARKERS),
    ("psycopg", FALLBACK),
    ("psycopg_async", MARKERS),
]


#: the same with a standby (each case starts a primary and a standby): every driver once,
#: the fallback on both drivers (each driver's way of noting the warning is run in all five
#: cases without replication, by test_another_warning_at_commit_costs_a_check_...)
STANDBY_WARNED_CASES = [
    ("asyncpg", FALLBACK),
    ("psycopg", FALLBACK),
    ("psycopg_async", MARKERS),
]


@pytest.mark.parametrize(("driver", "mode"), STANDBY_WARNED_CASES)
def test_a_commit_whose_wait_for_the_standby_was_cancelled_is_not_done_on_its_answer(
    pg_standby_factory: Callable[..., StandbyPair], driver: str, mode: str
) -> None:
    """The standby is down; the unit's own COMMIT waits for it and someone cancels that wait
    (``pg_cancel_backend``): PostgreSQL answers the COMMIT with success and the WARNING
    "canceling wait for synchronous replication ... committed locally, but might not have been
    replicated". That answer was taken for "done", and a failover lost the unit. The answer
    proves nothing: the unit is checked as a lost answer is. While the standby is down it ends
    unknown (not replayed); when the standby comes back during the checks, the check's COMMIT
    is confirmed and the unit is done, and the failover keeps it."""
    pair = pg_standby_factory(synchronous=True)
    prepare(pair, mode)
    cancelled = run_unit(
        pair, driver, "cancelled", cut_short=False, sleep=no_sleep, during=cancel_the_waiting_commit
    )
    assert isinstance(cancelled.error, rdb.CommitOutcomeUnknownError), (
        f"a COMMIT answered with a cancelled wait's warning was reported as {cancelled.error!r} "
        "(None: done), not unknown"
    )
    assert "not proven replicated" in str(cancelled.error)
    assert cancelled.calls == 1, "replayed after a COMMIT that was applied on the primary"

    start_the_standby = AtTheFirstBackoff(pair.start)
    backoffs = start_the_standby.backoffs

    proven = run_unit(
        pair,
        driver,
        "proven",
        cut_short=False,
        sleep=start_the_standby,
        during=cancel_the_waiting_commit,
    )
    fail_over(pair)  # at once: nothing else reaches the standby first
    assert proven.done, proven.error
    assert proven.calls == 1, "replayed after a COMMIT that was applied"
    assert backoffs, "done on the COMMIT's own answer, before the standby was back"
    rows = ledger(pair)
    assert rows.get("proven") == 1, rows  # reported done: on the new primary
    assert rows.get("cancelled", 0) <= 1, rows  # unknown: either, never twice


@pytest.mark.parametrize(("driver", "mode"), CASES)
def test_a_cancelled_wait_then_a_failover_before_the_proof_runs_the_unit_again(
    pg_standby_factory: Callable[..., StandbyPair], driver: str, mode: str
) -> None:
    """The unit's COMMIT was answered with the cancelled wait's warning; its first check could
    not prove it (the standby is down), and before the next the primary dies and the standby
    is promoted. The next check reaches the new primary, which never had the unit: reported
    done before (its row lost); the unit is run again there, once."""
    pair = pg_standby_factory(synchronous=True)
    prepare(pair, mode)
    fail_over_at_the_first_backoff = AtTheFirstBackoff(lambda: fail_over(pair))
    backoffs = fail_over_at_the_first_backoff.backoffs

    out = run_unit(
        pair,
        driver,
        "lost",
        cut_short=False,
        sleep=fail_over_at_the_first_backoff,
        during=cancel_the_waiting_commit,
    )
    assert backoffs, "done on the COMMIT's own answer"
    assert out.done, out.error
    assert out.calls == 2, "not run again on the new primary"
    assert ledger(pair) == {"lost": 1}


@pytest.mark.parametrize(("driver", "mode"), CASES)
def test_a_unit_that_raised_its_own_level_is_proven_at_it(
    pg_standby_factory: Callable[..., StandbyPair], driver: str, mode: str
) -> None:
    """The database's ``synchronous_commit`` is ``local`` (no standby waited for), and the
    unit raises its own to ``on`` (``SET LOCAL``: the transactions that matter replicated).
    The standby is down and the unit's COMMIT, waiting for it, is cut short. The check waited
    at its session's level, ``local``: it proved nothing, and took the unit, committed on the
    primary alone, for done. The check waits at ``on`` at least: unknown while the standby is
    down, done once it is back, and the failover keeps what was reported done."""
    pair = pg_standby_factory(synchronous=True)
    local = f"ALTER DATABASE {DATABASE} SET synchronous_commit = local"
    prepare(pair, mode, before_the_standby_stops=[local])
    raised = run_unit(pair, driver, "raised", cut_short=True, sleep=no_sleep, level="on")
    assert isinstance(raised.error, rdb.CommitOutcomeUnknownError), (
        f"a COMMIT committed on the primary alone was reported as {raised.error!r} "
        "(None: done), not unknown"
    )
    assert raised.calls == 1

    start_the_standby = AtTheFirstBackoff(pair.start)
    backoffs = start_the_standby.backoffs

    proven = run_unit(pair, driver, "proven", cut_short=True, sleep=start_the_standby, level="on")
    fail_over(pair)
    assert proven.done, proven.error
    assert backoffs, "done before the standby was back"
    rows = ledger(pair)
    assert rows.get("proven") == 1, rows
    assert rows.get("raised", 0) <= 1, rows


def test_the_last_check_does_not_overrun_the_deadline(
    pg_standby_factory: Callable[..., StandbyPair], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standby is down and the unit's COMMIT is cut short; each check waits for the
    standby twice as long as the one before (2 s, 4 s, ...). A check begun just before the
    deadline waited its whole 4 s past it: the unit ended more than 6 s after its COMMIT with a
    deadline of 2.5 s. Each check's wait is cut to the time left (the waits the checks were
    given are recorded: the arithmetic is test_a_checks_wait_is_cut_to_the_time_left's)."""
    given: list[tuple[int, float | None, float]] = []  # (proofs, left, wait) of each check

    def recorded(proofs: int, left: float | None) -> float:
        wait = replication_wait_within(proofs, left)
        given.append((proofs, left, wait))
        return wait

    monkeypatch.setattr(_unit, "replication_wait_within", recorded)
    pair = pg_standby_factory(synchronous=True)
    prepare(pair, MARKERS)
    config = CONFIG.replace(deadline=2.5)
    began = time.monotonic()
    cut = run_unit(pair, "psycopg", "cut", cut_short=True, sleep=no_sleep, config=config)
    took = time.monotonic() - began
    assert isinstance(cut.error, rdb.CommitOutcomeUnknownError), cut.error
    assert given, "no check was made"
    for _, left, wait in given:  # each check's wait ends by the deadline (or the floor past it)
        assert left is not None, given
        assert left <= config.deadline, given
        assert wait <= max(left, REPLICATION_WAIT_FLOOR), given

    # the unit's statements, its COMMIT until terminated, and those checks, with a generous
    # margin for a loaded machine (the waits given, above, are what is checked)
    assert took < config.deadline + 10, f"the unit took {took:.1f} s"


@pytest.mark.parametrize(
    ("proofs", "left", "wait"),
    [
        (0, None, REPLICATION_WAIT),  # no deadline: the growing wait
        (1, None, 2 * REPLICATION_WAIT),
        (20, None, REPLICATION_WAIT_CAP),
        (0, 5.0, REPLICATION_WAIT),  # more time left than the wait
        (1, 2.5, 2.5),  # cut to the time left
        (3, 0.5, 0.5),
        (1, 0.1, REPLICATION_WAIT_FLOOR),  # never under the floor
        (1, 0.0, REPLICATION_WAIT_FLOOR),
        (1, -3.0, REPLICATION_WAIT_FLOOR),  # (the deadline passed during the check's claim)
    ],
)
def test_a_checks_wait_is_cut_to_the_time_left(
    proofs: int, left: float | None, wait: float
) -> None:
    assert replication_wait_within(proofs, left) == wait


def test_the_checks_given_waits_end_by_the_deadline() -> None:
    """The referee's checks of a lost COMMIT (a fake clock), each COMMIT waiting in vain for a
    standby that is down for the whole wait it is given: the last one ends by the deadline
    (the floor past it at most), not a growing wait past it (2 s, then 4 s: 6 s for 2.5 s)."""
    clock = FakeClock()
    config = CONFIG.replace(deadline=2.5)
    policy = Policy(
        f"syncrep-{next(_services)}",
        config,
        clock=clock,
        rng=lambda: 0.5,
        use_circuit_breaker=False,
    )
    referee = _unit.CommitReferee(policy, None)
    began = clock()
    waits: list[float] = []
    for delay, ends in referee.timed_checks():
        clock.advance(delay)
        left = referee.left(ends)
        assert left == ends - clock()
        waits.append(replication_wait_within(len(waits), left))
        clock.advance(waits[-1])
    assert waits[0] == REPLICATION_WAIT
    assert len(waits) >= 2, waits
    assert waits[1] < replication_wait(1), waits  # cut
    assert clock() - began <= config.deadline + REPLICATION_WAIT_FLOOR, waits


def test_a_promoted_standby_still_naming_its_old_primary_is_reported(
    pg_standby_factory: Callable[..., StandbyPair], caplog: pytest.LogCaptureFixture
) -> None:
    """The primary dies and its standby is promoted, its ``synchronous_standby_names`` still
    naming the old primary (a configuration copied across): every writing COMMIT waits for a
    standby that will never connect. PostgreSQL waits for ever; the unit whose COMMIT is cut
    short ends unknown, as it must (nothing can prove it), and a WARNING says why, naming the
    setting."""
    pair = pg_standby_factory(synchronous=True)
    pair.create_database(DATABASE)
    engine = sa.create_engine(pair.primary.url(DATABASE))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ledger (key text NOT NULL)"))
    rdb.install_commit_markers(engine)
    engine.dispose()
    pair.wait_replayed()
    fail_over(pair)
    set_synchronous_standby_names(pair.standby, "old_primary")
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        cut = run_unit(pair, "asyncpg", "k", cut_short=True, sleep=no_sleep)
    assert isinstance(cut.error, rdb.CommitOutcomeUnknownError), cut.error
    assert "synchronous_standby_names" in str(cut.error)
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "synchronous_standby_names" in r.getMessage()
    ]
    assert len(warned) == 1, warned
    assert "'old_primary'" in warned[0]


def test_no_standby_connected_is_said_once_by_two_units_at_once(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two threads' units of one factory lose their COMMIT answers on a server that waits for
    a standby none is connected to, and their checks end together: the WARNING naming the
    setting is said once by the factory, not once by each. The threads are made to meet
    where a look at "said yet?" and its mark could be split: each looks once both threads
    have come in with what their checks found."""
    engine = sa.create_engine(pg_url)
    factory = rdb.ResilientSession(engine, service="no-standby-twice", config=CONFIG)
    referee = factory._referee
    came_in = [threading.Event(), threading.Event()]

    class Found:
        """What one thread's check found: no standby for ``synchronous_standby_names``."""

        def __init__(self, thread: int) -> None:
            self.thread = thread

        @property
        def unserved_standby_names(self) -> str:
            came_in[self.thread].set()
            return "standby_a"

    class Meeting(type(referee)):  # type: ignore[misc]
        """The factory's referee, whose "said yet?" is looked at once both threads came in."""

        @property
        def _standby_warned(self) -> bool:
            said = bool(self.__dict__.get("said", False))
            assert all(event.wait(10) for event in came_in)
            return said

        @_standby_warned.setter
        def _standby_warned(self, value: bool) -> None:
            self.__dict__["said"] = value

    referee.__class__ = Meeting
    errors: list[BaseException] = []

    def check_ends(thread: int) -> None:
        try:
            referee.no_standby_connected(Found(thread))
        except BaseException as exc:  # (said by the test's thread)
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        threads = [threading.Thread(target=check_ends, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "'standby_a'" in r.getMessage()
    ]
    assert len(warned) == 1, warned
    assert "Synchronous replication without a standby: service=no-standby-twice" in warned[0]
    engine.dispose()


@pytest.mark.parametrize(("driver", "mode"), WARNED_CASES)
def test_another_warning_at_commit_costs_a_check_never_a_wrong_outcome(
    pg_url: str, pg_async_url: str, caplog: pytest.LogCaptureFixture, driver: str, mode: str
) -> None:
    """No replication at all; a deferred constraint trigger raises a WARNING while the unit's
    COMMIT runs. The COMMIT's warning can't be told from a cancelled wait's (both SQLSTATE
    01000), so the unit is checked on a new connection: found committed (nothing to wait for
    here), it is done, once, and never replayed."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        create_a_warning_ledger(conn)
    if mode == MARKERS:
        rdb.install_commit_markers(engine)
    engine.dispose()
    calls: list[int] = []
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        if driver == "psycopg":
            factory = rdb.ResilientSession(
                sa.create_engine(pg_url), service="warned", config=CONFIG, sleep=no_sleep
            )

            def write(session: Any) -> None:
                calls.append(1)
                session.execute(INSERT, {"key": "k"})

            factory.run(write)
            factory.engine.dispose()
        else:
            url = pg_async_url if driver == "asyncpg" else pg_url

            async def main() -> None:
                engine = create_async_engine(url)
                factory = rdb.AsyncResilientSession(engine, service="warned", config=CONFIG)

                async def write(session: Any) -> None:
                    calls.append(1)
                    await session.execute(INSERT, {"key": "k"})

                try:
                    await factory.run(write)
                finally:
                    await engine.dispose()

            asyncio.run(main())
    assert calls == [1]
    messages = [r.getMessage() for r in caplog.records]
    verified = [m for m in messages if "Commit outcome verified" in m]
    assert len(verified) == 1, verified
    assert "a WARNING with SQLSTATE 01000 (its text left out" in verified[0], verified
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("second_commit", ["committed", "refused-40001", "warned"])
def test_a_warning_at_the_commit_of_a_unit_on_two_databases_is_settled_never_replayed(
    pg_server: PostgresServer, pg_database: str, second_commit: str
) -> None:
    """A deferred trigger's WARNING at one database's COMMIT of a unit spanning two (binds=).
    The unit's check was raised in the middle of SQLAlchemy's COMMITs, which rolled the other
    connection back (one database committed, the other not). Now every COMMIT goes out; the
    unit is committed on each, and the warned COMMIT is checked in its own database (no
    replication here: the check proves it): done, once, never replayed. When the other
    database refuses its COMMIT (40001), the warned one counts as committed: the unit is not
    replayed (it was, writing the first database's row twice). When both COMMITs are answered
    with a warning, a check proves one: the outcome is unknown (as docs/failover.md says),
    committed on each database, never replayed."""
    other = f"{pg_database}_b"
    pg_server.create_database(other)
    first = sa.create_engine(pg_server.url(pg_database))
    second = sa.create_engine(pg_server.url(other))
    try:
        with first.begin() as conn:
            create_a_warning_ledger(conn)
        with second.begin() as conn:
            if second_commit == "warned":
                create_a_warning_ledger(conn)
            else:
                conn.execute(sa.text("CREATE TABLE ledger (key text NOT NULL)"))
            if second_commit == "refused-40001":
                conn.execute(
                    sa.text(
                        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '40001'; END$$"
                    )
                )
                conn.execute(
                    sa.text(
                        "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON ledger "
                        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
                    )
                )
        for engine in (first, second):
            rdb.install_commit_markers(engine)

        class Base(DeclarativeBase):
            pass

        class First(Base):
            __tablename__ = "ledger"
            key: Mapped[str] = mapped_column(primary_key=True)

        class Second(DeclarativeBase):
            pass

        class SecondRow(Second):
            __tablename__ = "ledger"
            key: Mapped[str] = mapped_column(primary_key=True)

        factory = rdb.ResilientSession(
            first,
            service="two-databases",
            config=CONFIG,
            sleep=no_sleep,
            binds={First: first, SecondRow: second},
        )
        calls: list[int] = []

        def write(session: Any) -> None:
            calls.append(1)
            session.add(First(key="a"))
            session.flush()  # the first database's connection begins first
            session.add(SecondRow(key="b"))

        if second_commit == "committed":
            factory.run(write)  # done: the warned COMMIT proven where it went
            assert calls == [1], "replayed after a COMMIT that was applied"
            for engine in (first, second):
                with engine.connect() as conn:
                    assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar() == 1
        elif second_commit == "warned":
            with pytest.raises(rdb.CommitOutcomeUnknownError):
                factory.run(write)
            assert calls == [1], "replayed after COMMITs that were applied"
            for engine in (first, second):
                with engine.connect() as conn:
                    assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar() == 1
        else:
            with pytest.raises(sa.exc.OperationalError):
                factory.run(write)
            # SQLAlchemy commits the two in no set order: an attempt whose refused COMMIT went
            # first committed nothing and is replayed; one whose warned COMMIT went first is not
        with first.connect() as conn:  # never written twice
            assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar() <= 1
    finally:
        first.dispose()
        second.dispose()
        pg_server.drop_database(other)


OTHER_DATABASE = "app_b"


def cancel_each_waiting_commit(pair: StandbyPair, *, times: int) -> Callable[[StandbyPair], None]:
    """Cancel the waits of ``times`` COMMITs for the standby, one after the other, in either
    database (a unit on two databases: SQLAlchemy sends the second COMMIT once the first is
    answered); a backend once cancelled is not looked at again."""

    def cancel(_pair: StandbyPair) -> None:
        cancelled: list[int] = []
        deadline = time.monotonic() + 20
        while len(cancelled) < times:
            rows = pair.primary.execute(
                "SELECT pid, pg_catalog.pg_cancel_backend(pid) FROM pg_catalog.pg_stat_activity "
                "WHERE datname IN (%s, %s) AND wait_event = 'SyncRep' AND pid <> ALL(%s)",
                params=(DATABASE, OTHER_DATABASE, cancelled),
            )
            cancelled.extend(int(pid) for pid, _ in rows)
            assert time.monotonic() < deadline, f"{len(cancelled)} COMMITs waited, not {times}"
            time.sleep(0.02)

    return cancel


@pytest.mark.parametrize("other", ["read", "written"])
def test_a_cancelled_wait_at_the_commit_of_a_unit_on_two_databases(
    pg_standby_factory: Callable[..., StandbyPair], other: str
) -> None:
    """Synchronous replication, the standby down; a unit spanning two databases of the
    primary (``binds=``) writes the first and reads (``read``) or writes (``written``) the
    second; each COMMIT that waits for the standby has its wait cancelled, answered with the
    warning. One COMMIT so answered (the read one waits for nothing) is checked in its own
    database: done once the standby, started at the first backoff, confirms the check, and the
    failover keeps it. Two so answered: a check proves one, the outcome is unknown, committed
    once on each database on the primary, never replayed."""
    pair = pg_standby_factory(synchronous=True)
    pair.create_database(OTHER_DATABASE)
    other_engine = sa.create_engine(pair.primary.url(OTHER_DATABASE))
    try:
        with other_engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE ledger (key text NOT NULL)"))
        rdb.install_commit_markers(other_engine)
    finally:
        other_engine.dispose()
    prepare(pair, MARKERS)

    class First(DeclarativeBase):
        pass

    class FirstRow(First):
        __tablename__ = "ledger"
        key: Mapped[str] = mapped_column(primary_key=True)

    class Second(DeclarativeBase):
        pass

    class SecondRow(Second):
        __tablename__ = "ledger"
        key: Mapped[str] = mapped_column(primary_key=True)

    first = sa.create_engine(pair.url(DATABASE))
    second = sa.create_engine(pair.url(OTHER_DATABASE))
    start_the_standby = AtTheFirstBackoff(pair.start)
    factory = rdb.ResilientSession(
        first,
        service=f"syncrep-{next(_services)}",
        config=CONFIG,
        sleep=start_the_standby if other == "read" else no_sleep,
        binds={FirstRow: first, SecondRow: second},
    )
    calls: list[int] = []

    def write(session: Any) -> None:
        calls.append(1)
        session.add(FirstRow(key="a"))
        session.flush()
        if other == "written":
            session.add(SecondRow(key="b"))
            session.flush()
        else:
            session.execute(sa.select(SecondRow)).all()

    error: list[BaseException] = []

    def run() -> None:
        try:
            factory.run(write)
        except Exception as exc:
            error.append(exc)

    cancel = cancel_each_waiting_commit(pair, times=2 if other == "written" else 1)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        cancel(pair)
        thread.join(60)
        assert not thread.is_alive(), "the unit did not end within 60 s"
    finally:
        first.dispose()
        second.dispose()
    assert calls == [1], "replayed after a COMMIT that was applied on the primary"
    if other == "read":
        assert not error, error
        assert start_the_standby.backoffs, "done on the COMMIT's own answer"
        fail_over(pair)
        assert ledger(pair) == {"a": 1}
        return
    (raised,) = error
    assert isinstance(raised, rdb.CommitOutcomeUnknownError), raised
    assert ledger(pair) == {"a": 1}
    rows = pair.execute("SELECT key FROM ledger", database=OTHER_DATABASE)
    assert [str(key) for (key,) in rows] == ["b"]


def test_a_unit_that_waits_for_no_standby_is_not_held_by_the_markers_prune(
    pg_standby_factory: Callable[..., StandbyPair],
) -> None:
    """The standby is down; a unit opts out of waiting for it (``SET LOCAL synchronous_commit =
    local``, PostgreSQL's per-transaction choice) and its COMMIT is answered at once. The prune
    of old markers that runs after it (a transaction of its own, at the session's level) waits
    for no standby either: before, its COMMIT waited for the missing one, and the unit's
    ``run()`` with it, for as long as the standby stayed away."""
    pair = pg_standby_factory(synchronous=True)
    # markers of units 20 minutes ago, which the prune deletes (a prune that deletes nothing
    # writes nothing, and waits for nobody); replicated before the standby stops
    prepare(
        pair,
        MARKERS,
        in_the_database=[
            "INSERT INTO resilient_db.commit_markers (id) SELECT (lpad(to_hex(floor(extract("
            "epoch FROM now() - interval '20 minutes') * 1000)::bigint), 12, '0') || '7' || "
            "substr(md5(g::text), 1, 3) || '8' || substr(md5(g::text), 4, 15))::uuid "
            "FROM generate_series(1, 5) g"
        ],
    )
    engine = sa.create_engine(pair.primary.url(DATABASE))
    try:
        Sessions = rdb.ResilientSession(engine, service=f"syncrep-{next(_services)}", config=CONFIG)

        def local(session: Any, key: str) -> None:
            session.execute(sa.text("SET LOCAL synchronous_commit = local"))
            session.execute(INSERT, {"key": key})

        Sessions._hooks.commit._next_prune = 0.0  # the prune is due after the next COMMIT
        returned: list[object] = []
        unit = threading.Thread(
            target=lambda: returned.append(Sessions.run(local, "local")), daemon=True
        )
        unit.start()
        unit.join(15)  # (a prune held by the standby would hold it for ever)
        assert not unit.is_alive(), "run() is still waiting after its COMMIT was answered"
        assert returned == [None]
        assert ledger(pair) == {"local": 1}
        assert not Sessions._hooks.commit.prune_due()  # the prune ran
    finally:
        engine.dispose()


def test_a_read_write_split_onto_a_hot_standby_prunes_on_the_primary_only(
    pg_standby_factory: Callable[..., StandbyPair], caplog: pytest.LogCaptureFixture
) -> None:
    """SQLAlchemy's read/write split recipe, the follower being the hot standby: units read
    there and write on the primary. The prune due on the follower's engine (an engine the
    unit's COMMIT went to) does nothing on a standby: before, its DELETE was refused there
    (25006), the follower's pool was replaced and a "Write refused by a hot standby ... point
    the URL at the primary" warning said the application's setup was wrong."""
    pair = pg_standby_factory(synchronous=False)
    pair.create_database(DATABASE)
    primary = sa.create_engine(pair.primary.url(DATABASE))
    try:
        with primary.begin() as conn:
            conn.execute(sa.text("CREATE TABLE ledger (key text NOT NULL)"))
        rdb.install_commit_markers(primary)
    finally:
        primary.dispose()
    pair.wait_replayed()
    leader = sa.create_engine(pair.primary.url(DATABASE))
    follower = sa.create_engine(pair.standby.url(DATABASE))
    replaced: list[object] = []
    sa.event.listen(follower.pool, "invalidate", lambda *args: replaced.append(args))

    class Split(sa.orm.Session):
        def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            return leader if isinstance(clause, (sa.Insert, sa.TextClause)) else follower

    def unit(session: Any, key: str) -> None:
        session.execute(sa.select(sa.func.count()).select_from(sa.table("ledger")))
        session.execute(INSERT, {"key": key})

    try:
        Sessions = rdb.ResilientSession(
            class_=Split, service=f"syncrep-{next(_services)}", config=CONFIG
        )
        Sessions.run(unit, "first")
        hooks = rdb._state.STATE.engine_hooks
        caplog.set_level(logging.WARNING, logger="resilient_db")
        pruned_there = 0
        for n in range(20):  # until it ran there (a unit whose last COMMIT wrote prunes)
            for engine in (leader, follower):
                engine.dispose()  # new connections: SQLAlchemy's order of the COMMITs varies
            hooks[follower].commit._next_prune = 0.0  # due on the follower's engine alone
            Sessions.run(unit, f"k{n}")
            pruned_there += not hooks[follower].commit.prune_due()
            if pruned_there:
                break
        assert pruned_there
    finally:
        leader.dispose()
        follower.dispose()
    assert replaced == []
    assert not [r.getMessage() for r in caplog.records if "hot standby" in r.getMessage()]
    pair.wait_replayed()
    rows = ledger(pair)
    assert rows.pop("first") == 1
    assert set(rows.values()) == {1}  # each unit once


#: every driver's own COMMIT (psycopg's sync and async connection, asyncpg), with the markers
MIDWAY_CASES = ["psycopg", "asyncpg", "psycopg_async"]


@pytest.mark.parametrize("driver", MIDWAY_CASES)
def test_a_cancelled_wait_of_a_units_own_commit_midway_is_not_done_on_its_answer(
    pg_standby_factory: Callable[..., StandbyPair], driver: str
) -> None:
    """The unit commits its write itself (``session.commit()`` midway), then only reads. The
    standby is down; that COMMIT's wait for it is cancelled (``pg_cancel_backend``): answered
    with success and the WARNING "committed locally, but might not have been replicated".
    That answer was taken for done: the unit went on and reported done, and a failover lost
    its write. Now it is checked on a new connection as the unit's final COMMIT is: unknown
    while the standby is down (not replayed); once the standby confirms the check, the unit
    goes on and is done, and the failover keeps the write."""
    pair = pg_standby_factory(synchronous=True)
    prepare(pair, MARKERS)
    cancelled = run_unit(
        pair,
        driver,
        "cancelled",
        cut_short=False,
        sleep=no_sleep,
        during=cancel_the_waiting_commit,
        midway=True,
    )
    assert isinstance(cancelled.error, rdb.CommitOutcomeUnknownError), (
        f"a unit whose own COMMIT midway was answered with a cancelled wait's warning was "
        f"reported as {cancelled.error!r} (None: done), not unknown"
    )
    assert "not proven replicated" in str(cancelled.error)
    assert cancelled.calls == 1, "replayed after a COMMIT that was applied on the primary"

    start_the_standby = AtTheFirstBackoff(pair.start)
    proven = run_unit(
        pair,
        driver,
        "proven",
        cut_short=False,
        sleep=start_the_standby,
        during=cancel_the_waiting_commit,
        midway=True,
    )
    fail_over(pair)  # at once: nothing else reaches the standby first
    assert proven.done, proven.error
    assert proven.calls == 1, "replayed after a COMMIT that was applied"
    assert start_the_standby.backoffs, "went on on the COMMIT's own answer, before the proof"
    rows = ledger(pair)
    assert rows.get("proven") == 1, rows  # reported done: on the new primary
    assert rows.get("cancelled", 0) <= 1, rows  # unknown: either, never twice


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_cancelled_wait_of_a_units_own_commit_midway_then_a_failover_runs_it_again(
    pg_standby_factory: Callable[..., StandbyPair], driver: str
) -> None:
    """The unit's own COMMIT midway, the first thing it commits, was answered with the
    cancelled wait's warning; its first check could not prove it (the standby is down), and
    before the next the primary dies and the standby is promoted. The next check reaches the
    new primary, which never had the write (the claim's fence goes in): nothing of the unit
    is committed there, so the whole unit is run again there, once."""
    pair = pg_standby_factory(synchronous=True)
    prepare(pair, MARKERS)
    fail_over_at_the_first_backoff = AtTheFirstBackoff(lambda: fail_over(pair))
    out = run_unit(
        pair,
        driver,
        "lost",
        cut_short=False,
        sleep=fail_over_at_the_first_backoff,
        during=cancel_the_waiting_commit,
        midway=True,
    )
    assert fail_over_at_the_first_backoff.backoffs, "went on on the COMMIT's own answer"
    assert out.done, out.error
    assert out.calls == 2, "not run again on the new primary"
    assert ledger(pair) == {"lost": 1}


@pytest.mark.parametrize(("driver", "mode"), WARNED_CASES)
def test_another_warning_at_a_units_own_commit_midway_costs_a_check_never_a_wrong_outcome(
    pg_url: str,
    pg_async_url: str,
    caplog: pytest.LogCaptureFixture,
    *,
    service: str,
    driver: str,
    mode: str,
) -> None:
    """No replication; a deferred trigger's WARNING comes with the unit's own COMMIT midway
    (``session.commit()``, then a second write committed at the unit's end). With the markers
    that COMMIT carries one: the check finds it committed, the unit goes on and is done, once.
    Without them nothing a check could find was sent: the warning can't be told from a
    cancelled wait's, so the unit ends unknown (never done on it), not replayed."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        create_a_warning_ledger(conn)
        conn.execute(sa.text("CREATE TABLE after (key text NOT NULL)"))
    if mode == MARKERS:
        rdb.install_commit_markers(engine)
    engine.dispose()
    calls: list[int] = []
    after = sa.text("INSERT INTO after (key) VALUES ('second')")
    error: BaseException | None = None
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        if driver == "psycopg":
            factory = rdb.ResilientSession(
                sa.create_engine(pg_url), service=service, config=CONFIG, sleep=no_sleep
            )

            def write(session: Any) -> None:
                calls.append(1)
                session.execute(INSERT, {"key": "k"})
                session.commit()
                session.execute(after)

            try:
                factory.run(write)
            except Exception as exc:
                error = exc
            factory.engine.dispose()
        else:
            url = pg_async_url if driver == "asyncpg" else pg_url

            async def main() -> BaseException | None:
                engine = create_async_engine(url)
                factory = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)

                async def write(session: Any) -> None:
                    calls.append(1)
                    await session.execute(INSERT, {"key": "k"})
                    await session.commit()
                    await session.execute(after)

                try:
                    await factory.run(write)
                except Exception as exc:
                    return exc
                finally:
                    await engine.dispose()
                return None

            error = asyncio.run(main())
    assert calls == [1]
    messages = [r.getMessage() for r in caplog.records]
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            first = conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar()
            second = conn.execute(sa.text("SELECT count(*) FROM after")).scalar()
    finally:
        engine.dispose()
    assert first == 1
    if mode == MARKERS:
        assert error is None, error
        verified = [m for m in messages if "Commit outcome verified" in m]
        assert len(verified) == 1, verified
        assert "a WARNING with SQLSTATE 01000 (its text left out" in verified[0], verified
        assert second == 1
    else:
        assert isinstance(error, rdb.CommitOutcomeUnknownError), (
            f"a unit whose own COMMIT midway was answered with a warning no check could settle "
            f"was reported as {error!r} (None: done), not unknown"
        )
        assert "a WARNING with SQLSTATE 01000 (its text left out" in str(error)
        assert second == 0  # it did not go on
    counters = rdb.health()["services"][service]["counters"]
    assert counters["unknown_commits"] == (0 if mode == MARKERS else 1), counters


def test_a_warning_at_a_units_own_commit_midway_on_another_database_is_checked_there(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """The unit's own COMMIT midway goes to a database that is not its factory's (binds=),
    and a deferred trigger's WARNING comes with it. Its check must claim the marker where
    the COMMIT went: claimed in the factory's database, the marker would be missing there
    (fenced), and the unit, committed, run again, writing its row twice."""
    other = f"{pg_database}_b"
    pg_server.create_database(other)
    main = sa.create_engine(pg_server.url(pg_database))
    second = sa.create_engine(pg_server.url(other))
    try:
        with second.begin() as conn:
            create_a_warning_ledger(conn)
        for engine in (main, second):
            rdb.install_commit_markers(engine)

        class Second(DeclarativeBase):
            pass

        class SecondRow(Second):
            __tablename__ = "ledger"
            key: Mapped[str] = mapped_column(primary_key=True)

        factory = rdb.ResilientSession(
            main,
            service="midway-elsewhere",
            config=CONFIG,
            sleep=no_sleep,
            binds={SecondRow: second},
        )
        calls: list[int] = []

        def write(session: Any) -> None:
            calls.append(1)
            session.add(SecondRow(key="b"))
            session.commit()

        factory.run(write)
        assert calls == [1], "run again after a COMMIT that was applied"
        with second.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar() == 1
    finally:
        main.dispose()
        second.dispose()
        pg_server.drop_database(other)


# -- a two-phase unit's COMMIT PREPARED answered with a warning -----------------------------------
#: (driver) for a two-phase unit: psycopg (sync), asyncpg, psycopg's async connection
TWO_PHASE_DRIVERS = ["psycopg", "asyncpg", "psycopg_async"]


def run_two_phase_unit(
    pair: StandbyPair,
    driver: str,
    key: str,
    *,
    sleep: Callable[[float], None],
    own_answer_lost: bool,
    config: rdb.Config = CONFIG,
    multi_host: bool = False,
) -> Outcome:
    """A two-phase unit (``twophase=True``) writing ``key``, prepared while the standby
    streams. Right before its COMMIT PREPARED the standby stops (from then on a COMMIT PREPARED
    waits for it), and whichever COMMIT PREPARED then waits for the standby has its wait
    cancelled (``pg_cancel_backend``, once): the server answers it with success and a WARNING,
    committed on the primary alone. ``own_answer_lost``: the unit's own connection is
    terminated first, so the COMMIT PREPARED answered so is the factory's, finishing the unit
    on a new connection; otherwise it is the unit's own. ``sleep``: the factory's backoff.
    ``multi_host``: the unit's engine is on the pair's multi-host URL (a new connection reaches
    the promoted standby after a failover), else on the primary's."""
    outcome = Outcome()
    service = f"syncrep-2pc-{next(_services)}"
    cancelled: list[threading.Thread] = []

    def before_commit_prepared(conn: Any, xid: Any, is_prepared: bool) -> None:
        if cancelled:
            return  # (the factory's own COMMIT PREPARED, finishing the unit)
        pair.standby.stop()
        thread = threading.Thread(target=cancel_the_waiting_commit, args=(pair,), daemon=True)
        thread.start()
        cancelled.append(thread)
        if own_answer_lost:
            driver_conn = conn.connection.driver_connection
            pid = (
                driver_conn.get_server_pid()
                if hasattr(driver_conn, "get_server_pid")
                else driver_conn.info.backend_pid
            )
            pair.primary.execute(f"SELECT pg_catalog.pg_terminate_backend({int(pid)}, 5000)")

    if driver in ("asyncpg", "psycopg_async"):

        async def write(session: Any) -> None:
            outcome.calls += 1
            await session.execute(INSERT, {"key": key})

        async def asleep(seconds: float) -> None:
            await asyncio.to_thread(sleep, seconds)

        async def main() -> None:
            driver_name = "asyncpg" if driver == "asyncpg" else "psycopg"
            url = (
                pair.url(DATABASE, driver=driver_name)
                if multi_host
                else pair.primary.url(DATABASE, driver=driver_name)
            )
            engine = create_async_engine(url)
            sa.event.listen(engine.sync_engine, "commit_twophase", before_commit_prepared)
            factory = rdb.AsyncResilientSession(
                engine, service=service, config=config, asleep=asleep, twophase=True
            )
            try:
                await asyncio.wait_for(factory.run(write), 60)
            except Exception as exc:
                outcome.error = exc
            finally:
                await engine.dispose()

        asyncio.run(main())
    else:

        def write_sync(session: Any) -> None:
            outcome.calls += 1
            session.execute(INSERT, {"key": key})

        engine = sa.create_engine(pair.url(DATABASE) if multi_host else pair.primary.url(DATABASE))
        sa.event.listen(engine, "commit_twophase", before_commit_prepared)
        factory = rdb.ResilientSession(
            engine, service=service, config=config, sleep=sleep, twophase=True
        )
        try:
            factory.run(write_sync)
        except Exception as exc:
            outcome.error = exc
        finally:
            engine.dispose()
    assert cancelled, "the unit sent no COMMIT PREPARED"
    cancelled[0].join(30)
    assert not cancelled[0].is_alive()
    return outcome


def prepared_left(pair: StandbyPair) -> list[str]:
    """The prepared transactions on the current primary."""
    rows = pair.execute("SELECT gid FROM pg_catalog.pg_prepared_xacts")
    return [str(gid) for (gid,) in rows]


@pytest.mark.parametrize("driver", TWO_PHASE_DRIVERS)
def test_a_two_phase_unit_finished_with_a_cancelled_wait_is_unknown_never_done(
    pg_standby_factory: Callable[..., StandbyPair],
    driver: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A two-phase unit's COMMIT PREPARED loses its answer (its connection terminated); the
    factory commits its prepared transaction on a new connection, and that COMMIT PREPARED's
    wait for the (stopped) standby is cancelled: answered with success and a WARNING,
    committed on the primary alone. That is no proof: the factory's check on the primary
    can't get its own WAL confirmed by the standby, so the unit ends
    CommitOutcomeUnknownError ("not proven replicated", the warning named), as a one-phase
    unit's COMMIT answered so does; never done, never replayed."""
    pair = pg_standby_factory(synchronous=True, settings={"max_prepared_transactions": "4"})
    prepare(pair, FALLBACK)
    pair.standby.start()  # (prepare stops it: the unit's PREPARE must be confirmed)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        unit = run_two_phase_unit(pair, driver, "2pc", sleep=no_sleep, own_answer_lost=True)
    assert isinstance(unit.error, rdb.CommitOutcomeUnknownError), unit.error
    assert "not proven replicated" in str(unit.error)
    assert "canceling wait for synchronous replication" in str(unit.error)
    assert unit.calls == 1  # not replayed
    assert prepared_left(pair) == []  # committed on the primary: nothing left for an operator
    assert ledger(pair) == {"2pc": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert any("Commit outcome unknown" in m for m in messages), messages
    assert not any("the unit is done" in m for m in messages), messages


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_two_phase_unit_finished_with_a_cancelled_wait_is_done_once_proven(
    pg_standby_factory: Callable[..., StandbyPair], driver: str
) -> None:
    """As above, but the standby comes back while the factory proves the finished COMMIT
    PREPARED (the factory's first pause between its checks starts it): a later check's COMMIT
    is confirmed by the standby, the unit is done, once, and its row survives a failover to
    the standby."""
    pair = pg_standby_factory(synchronous=True, settings={"max_prepared_transactions": "4"})
    prepare(pair, FALLBACK)
    pair.standby.start()
    start_the_standby = AtTheFirstBackoff(pair.start)
    config = rdb.Config(
        initial_delay=0.01, max_delay=0.02, max_retries=50, deadline=15.0, circuit_breaker=False
    )
    unit = run_two_phase_unit(
        pair, driver, "2pc", sleep=start_the_standby, own_answer_lost=True, config=config
    )
    assert unit.error is None, unit.error
    assert unit.calls == 1
    assert start_the_standby.backoffs, "done before the standby was back"
    fail_over(pair)
    assert ledger(pair) == {"2pc": 1}


@pytest.mark.parametrize("driver", TWO_PHASE_DRIVERS)
def test_a_two_phase_units_own_commit_prepared_with_a_cancelled_wait_is_never_done(
    pg_standby_factory: Callable[..., StandbyPair],
    driver: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A two-phase unit's own COMMIT PREPARED (its answer not lost) waits for the stopped
    standby and that wait is cancelled: answered with success and a WARNING, committed on the
    primary alone. It was taken for done (and a failover lost it). It is settled as a
    one-phase unit's COMMIT so answered, and as the factory's own COMMIT PREPARED finishing
    a unit: the check on the primary can't get its own WAL confirmed by the standby, so the
    unit ends CommitOutcomeUnknownError ("not proven replicated", the warning named); never
    done, never replayed."""
    pair = pg_standby_factory(synchronous=True, settings={"max_prepared_transactions": "4"})
    prepare(pair, FALLBACK)
    pair.standby.start()  # (prepare stops it: the unit's PREPARE must be confirmed)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        unit = run_two_phase_unit(pair, driver, "2pc", sleep=no_sleep, own_answer_lost=False)
    assert isinstance(unit.error, rdb.CommitOutcomeUnknownError), (
        f"a COMMIT PREPARED answered with a cancelled wait's warning was reported as "
        f"{unit.error!r} (None: done), not unknown"
    )
    assert "not proven replicated" in str(unit.error)
    assert "canceling wait for synchronous replication" in str(unit.error)
    assert unit.calls == 1  # not replayed
    assert prepared_left(pair) == []  # committed on the primary: nothing left for an operator
    assert ledger(pair) == {"2pc": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert any("Commit outcome unknown" in m for m in messages), messages
    assert not any("the unit is done" in m for m in messages), messages


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_two_phase_units_own_commit_prepared_with_a_cancelled_wait_is_done_once_proven(
    pg_standby_factory: Callable[..., StandbyPair],
    driver: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As above, but the standby comes back while the factory proves the unit's COMMIT
    PREPARED (the factory's first pause between its checks starts it): a later check's
    COMMIT is confirmed by the standby, the unit is done, once (not before the standby was
    back), and its row survives a failover to the standby."""
    pair = pg_standby_factory(synchronous=True, settings={"max_prepared_transactions": "4"})
    prepare(pair, FALLBACK)
    pair.standby.start()
    start_the_standby = AtTheFirstBackoff(pair.start)
    config = rdb.Config(
        initial_delay=0.01, max_delay=0.02, max_retries=50, deadline=15.0, circuit_breaker=False
    )
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        unit = run_two_phase_unit(
            pair, driver, "2pc", sleep=start_the_standby, own_answer_lost=False, config=config
        )
    assert unit.error is None, unit.error
    assert unit.calls == 1
    assert start_the_standby.backoffs, "done on the COMMIT PREPARED's own answer"
    assert prepared_left(pair) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("proven replicated" in m and "the unit is done" in m for m in messages), messages
    fail_over(pair)
    assert ledger(pair) == {"2pc": 1}


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("own_answer_lost", [False, True])
def test_a_two_phase_unit_whose_warned_commit_prepared_a_failover_lost_is_committed_there(
    pg_standby_factory: Callable[..., StandbyPair], driver: str, own_answer_lost: bool
) -> None:
    """A two-phase unit's COMMIT PREPARED (its own, or the factory's finishing it) is answered
    with a cancelled wait's warning: committed on the primary alone. Before the proof runs
    the primary dies and the standby, which had the PREPARE but not the COMMIT PREPARED, is
    promoted: there the unit's transaction is still prepared. The proof only wrote WAL past
    it on the new primary, which nothing waits for: the unit was reported done, its row not
    committed there (still prepared, holding its locks). The factory looks for it first and,
    the unit having decided to commit, commits it there: done, once, the row on the new
    primary and nothing left prepared."""
    pair = pg_standby_factory(synchronous=True, settings={"max_prepared_transactions": "4"})
    prepare(pair, FALLBACK)
    pair.standby.start()
    fail_over_at_the_first_backoff = AtTheFirstBackoff(lambda: fail_over(pair))
    config = rdb.Config(
        initial_delay=0.01, max_delay=0.02, max_retries=50, deadline=15.0, circuit_breaker=False
    )
    unit = run_two_phase_unit(
        pair,
        driver,
        "2pc",
        sleep=fail_over_at_the_first_backoff,
        own_answer_lost=own_answer_lost,
        config=config,
        multi_host=True,
    )
    assert fail_over_at_the_first_backoff.backoffs, "done before the failover"
    assert unit.error is None, unit.error
    assert unit.calls == 1
    assert prepared_left(pair) == [], "reported done, its transaction still prepared"
    assert ledger(pair) == {"2pc": 1}


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_commit_answered_with_a_warning_tells_after_commit_listeners_once(
    pg_url: str, pg_async_url: str, driver: str
) -> None:
    """A unit's COMMIT answered with success and a WARNING (a deferred trigger's here: no
    replication needed) is checked on a new connection and found committed: done, once. Its
    ``session.commit()`` had returned (the ``after_commit`` listeners told), and the check's
    end of a lost answer's transactions told them again: an outbox or a cache invalidation
    listening there ran twice for one commit."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        create_a_warning_ledger(conn)
    rdb.install_commit_markers(engine)
    engine.dispose()
    told: list[int] = []
    if driver == "psycopg":
        factory = rdb.ResilientSession(
            sa.create_engine(pg_url), service="warned-listeners", config=CONFIG, sleep=no_sleep
        )

        def write(session: Any) -> None:
            sa.event.listen(session, "after_commit", lambda _session: told.append(1))
            session.execute(INSERT, {"key": "k"})

        try:
            factory.run(write)
        finally:
            factory.engine.dispose()
    else:

        async def main() -> None:
            engine = create_async_engine(pg_async_url)
            factory = rdb.AsyncResilientSession(engine, service="warned-listeners", config=CONFIG)

            async def write(session: Any) -> None:
                sa.event.listen(session.sync_session, "after_commit", lambda _s: told.append(1))
                await session.execute(INSERT, {"key": "k"})

            try:
                await factory.run(write)
            finally:
                await engine.dispose()

        asyncio.run(main())
    assert told == [1], f"after_commit told {len(told)} time(s) of one commit"
