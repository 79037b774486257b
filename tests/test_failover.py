"""Failover to a promoted standby, against real servers: the primary crashed, the standby promoted.

Writers run units of work (``rdb.ResilientSession`` with psycopg, ``rdb.AsyncResilientSession``
with asyncpg) on a multi-host URL (``host=primary&host=standby&target_session_attrs=read-write``)
of a :class:`~resilient_db.testing.StandbyPair`. Every unit writes one ledger row under a key of
its own; the key is not unique in the table, so a unit that wrote twice shows up as two rows. The
checks are exact: every acknowledged key has one row on the new primary (synchronous
replication), no key has two, and a unit that failed without ``CommitOutcomeUnknownError`` left
no row.

Retry delays are shrunk by configuration (milliseconds), not zeroed: the units have to outlast
a real promotion. Timings are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import sqlalchemy as sa
from processes import alive, killed_at_exit, wait_for
from scenarios import BREAKER_THROUGH_FAILOVER
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _statements
from resilient_db._commit import MULTI_HOST_CONNECT_TIMEOUT
from resilient_db.testing import (
    EmbeddedPostgres,
    FaultProxy,
    PostgresServer,
    ServerStartError,
    StandbyPair,
    StandbyServer,
)

pytest_plugins = ["pytester"]

DRIVERS = ["psycopg", "asyncpg"]
DATABASE = "app"
MARKERS = "markers"  # rdb.install_commit_markers ran
FALLBACK = "fallback"  # it did not: a lost COMMIT answer is checked by transaction id
#: (driver, commit verification): the markers with each driver (psycopg's async one too: an
#: ``AsyncResilientSession`` on ``postgresql+psycopg``); the fallback's decisions are the same
#: code for all, so one driver is enough for it
CASES = [
    ("psycopg", MARKERS),
    ("asyncpg", MARKERS),
    ("psycopg-async", MARKERS),
    ("psycopg", FALLBACK),
]

#: Backoff in milliseconds, enough attempts to outlast a promotion; the breaker stays out of it
#: (retries every 10-50 ms while no host takes writes are failures it counts; the breaker through
#: a failover is test_units_cut_off_by_a_failover_do_not_open_the_breaker's).
FAILOVER_CONFIG = rdb.Config(
    initial_delay=0.01,
    max_delay=0.05,
    max_retries=400,
    deadline=30.0,
    circuit_breaker=False,
)

LEDGER_DDL = sa.text(
    # key is not unique: a unit that wrote twice shows up as two rows
    "CREATE TABLE ledger (id bigserial PRIMARY KEY, key text NOT NULL, port integer NOT NULL)"
)
INSERT = sa.text("INSERT INTO ledger (key, port) VALUES (:key, inet_server_port()) RETURNING port")

_services = itertools.count()


def prepare(pair: StandbyPair, *, markers: bool = True) -> None:
    """The ledger and (by default) the commit markers, replicated to the standby."""
    pair.create_database(DATABASE)
    engine = sa.create_engine(pair.primary.url(DATABASE))
    try:
        with engine.begin() as conn:
            conn.execute(LEDGER_DDL)
        if markers:
            rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    pair.wait_replayed()


def ledger(pair: StandbyPair) -> dict[str, int]:
    """Rows per key on the current primary."""
    rows = pair.execute("SELECT key, count(*) FROM ledger GROUP BY key", database=DATABASE)
    return {str(key): int(count) for key, count in rows}


# -- writers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ack:
    key: str
    port: int  # the server that took the write
    at: float  # monotonic time the unit returned


#: the drivers a :class:`Workload` runs on an event loop (its URL says which: psycopg-async's
#: is a ``postgresql+psycopg`` URL, which an async engine runs on psycopg's async driver)
ASYNC_WORKLOADS: Final = ("asyncpg", "psycopg-async")


class Workload:
    """``writers`` writers, each running one unit per key until :meth:`finish` (or ``limit``
    units each). psycopg: one thread per writer; asyncpg and psycopg-async (psycopg's async
    driver): one task per writer, on an event loop in a thread of its own, so the test thread
    can crash and promote meanwhile.

    ``on_call(key, call)`` runs inside the unit after its INSERT; ``on_backoff(seconds)`` before
    every backoff sleep of the factory (the sleep itself is real and short).
    """

    def __init__(
        self,
        url: str,
        driver: str,
        *,
        writers: int = 2,
        limit: int | None = None,
        config: rdb.Config = FAILOVER_CONFIG,
        on_call: Callable[[str, int], None] | None = None,
        on_backoff: Callable[[float], None] | None = None,
    ) -> None:
        self.url = url
        self.driver = driver
        self.writers = writers
        self.limit = limit
        self.config = config
        self.service = f"failover-{next(_services)}"
        self.on_call = on_call
        self.on_backoff = on_backoff
        self.acks: list[Ack] = []
        self.failures: dict[str, BaseException] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- what every writer does ---------------------------------------------------------------
    def _keys(self, writer: int) -> Iterator[str]:
        for n in itertools.count():
            if self.stop.is_set() or (self.limit is not None and n >= self.limit):
                return
            yield f"w{writer}-{n}"

    def _called(self, key: str) -> int:
        with self._lock:
            self.calls[key] += 1
            return self.calls[key]

    def _record(self, key: str, port: int | None, error: BaseException | None) -> None:
        with self._lock:
            if error is None:
                assert port is not None
                self.acks.append(Ack(key, port, time.monotonic()))
            else:
                self.failures[key] = error

    def _sleep(self, seconds: float) -> None:
        if self.on_backoff is not None:
            self.on_backoff(seconds)
        time.sleep(seconds)

    # -- psycopg ----------------------------------------------------------------------------------
    def _sync_writer(self, factory: rdb.ResilientSession[Session], writer: int) -> None:
        def unit(session: Session, key: str) -> int:
            call = self._called(key)
            port = int(session.execute(INSERT, {"key": key}).scalar_one())
            if self.on_call is not None:
                self.on_call(key, call)
            return port

        for key in self._keys(writer):
            try:
                port = factory.run(unit, key)
            except Exception as exc:
                self._record(key, None, exc)
            else:
                self._record(key, port, None)

    # -- asyncpg ----------------------------------------------------------------------------------
    async def _async_writer(
        self, factory: rdb.AsyncResilientSession[AsyncSession], writer: int
    ) -> None:
        async def unit(session: AsyncSession, key: str) -> int:
            call = self._called(key)
            port = int((await session.execute(INSERT, {"key": key})).scalar_one())
            if self.on_call is not None:
                self.on_call(key, call)
            return port

        for key in self._keys(writer):
            try:
                port = await factory.run(unit, key)
            except Exception as exc:
                self._record(key, None, exc)
            else:
                self._record(key, port, None)

    async def _async_main(self) -> None:
        async def asleep(seconds: float) -> None:
            if self.on_backoff is not None:
                self.on_backoff(seconds)  # blocking is fine: the loop is this workload's own
            await asyncio.sleep(seconds)

        timeout = {"timeout": 2} if self.driver == "asyncpg" else {"connect_timeout": 2}
        engine = create_async_engine(self.url, connect_args=timeout)
        try:
            factory = rdb.AsyncResilientSession(
                engine, service=self.service, config=self.config, asleep=asleep
            )
            await asyncio.gather(*(self._async_writer(factory, w) for w in range(self.writers)))
        finally:
            await engine.dispose()

    # -- control ----------------------------------------------------------------------------------
    def start(self) -> Workload:
        if self.driver in ASYNC_WORKLOADS:
            self._threads = [threading.Thread(target=asyncio.run, args=(self._async_main(),))]
        else:
            engine = sa.create_engine(self.url, connect_args={"connect_timeout": 2})
            factory = rdb.ResilientSession(
                engine, service=self.service, config=self.config, sleep=self._sleep
            )
            self._engine = engine
            self._threads = [
                threading.Thread(target=self._sync_writer, args=(factory, w))
                for w in range(self.writers)
            ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        return self

    def finish(self, timeout: float = 60.0, *, stop: bool = True) -> None:
        """Stop after the units running now (or, ``stop=False``, after ``limit`` units) and
        wait for the writers."""
        if stop:
            self.stop.set()
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a writer did not finish"
        if self.driver not in ASYNC_WORKLOADS:
            self._engine.dispose()

    def acked(self, port: int | None = None) -> int:
        with self._lock:
            return sum(1 for a in self.acks if port is None or a.port == port)

    def first_ack_on(self, port: int) -> Ack | None:
        with self._lock:
            return next((a for a in self.acks if a.port == port), None)


@dataclass
class Tally:
    acked: int
    lost: int  # acknowledged, missing on the new primary
    unknown: int  # CommitOutcomeUnknownError
    failed: int  # other errors


def check_exactly_once(pair: StandbyPair, workload: Workload, *, lossless: bool) -> Tally:
    """No key written twice; every failed unit (outcome known) left nothing; with ``lossless``
    every acknowledged key is on the new primary."""
    rows = ledger(pair)
    twice = {key: n for key, n in rows.items() if n > 1}
    assert not twice, f"units written more than once: {twice}"
    acked = {a.key for a in workload.acks}
    unknown = {
        key
        for key, exc in workload.failures.items()
        if isinstance(exc, rdb.CommitOutcomeUnknownError)
    }
    failed = set(workload.failures) - unknown
    wrote_anyway = failed & rows.keys()
    assert not wrote_anyway, f"units that failed (outcome known) wrote: {sorted(wrote_anyway)}"
    phantom = rows.keys() - acked - unknown
    assert not phantom, f"rows of units that never ran: {sorted(phantom)}"
    lost = acked - rows.keys()
    if lossless:
        assert not lost, f"{len(lost)} acknowledged writes are missing: {sorted(lost)[:10]}"
    return Tally(len(acked), len(lost), len(unknown), len(failed))


def fail_over(pair: StandbyPair) -> tuple[float, float]:
    """Crash the primary and promote the standby; (monotonic time of the crash, of promotion)."""
    pair.crash_primary()
    crashed = time.monotonic()
    pair.promote()
    return crashed, time.monotonic()


def workload_url(pair: StandbyPair, driver: str, **options: Any) -> str:
    """``pair``'s multi-host URL for a :class:`Workload` of ``driver`` (psycopg's async driver
    takes psycopg's URL)."""
    return pair.url(DATABASE, driver="psycopg" if driver == "psycopg-async" else driver, **options)


def writes_through_a_failover(pair: StandbyPair, driver: str) -> tuple[Workload, float, float]:
    """Two writers write on the primary, which crashes mid-stream; the standby is promoted and
    they write on it. Returns the finished workload and the times of the crash and promotion."""
    workload = Workload(workload_url(pair, driver), driver).start()
    try:
        wait_for(lambda: workload.acked(pair.primary.port) >= 40, "writes on the primary")
        crashed, promoted = fail_over(pair)
        wait_for(lambda: workload.acked(pair.standby.port) >= 40, "writes on the new primary")
    finally:
        workload.finish()
    return workload, crashed, promoted


def report(
    label: str, workload: Workload, pair: StandbyPair, crashed: float, promoted: float
) -> None:
    first = workload.first_ack_on(pair.standby.port)
    assert first is not None
    print(
        f"\n[failover] {label}: the standby took writes {(promoted - crashed) * 1000:.0f} ms "
        f"after the crash; first write on it {(first.at - promoted) * 1000:.0f} ms later, "
        f"{(first.at - crashed) * 1000:.0f} ms after the crash"
    )


# -- the harness -----------------------------------------------------------------------------------
def test_pair_streams_synchronously_and_promotes(pg_standby: StandbyPair) -> None:
    pair = pg_standby
    assert pair.synchronous
    state = pair.primary.execute(
        "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s",
        params=(pair.standby.name,),
    )
    assert state == [("streaming", "sync")]
    prepare(pair)
    url = pair.url(DATABASE)
    assert url.startswith("postgresql+psycopg://postgres:")
    assert url.endswith(
        f"@/{DATABASE}?host=127.0.0.1:{pair.primary.port}&host=127.0.0.1:{pair.standby.port}"
        "&target_session_attrs=read-write"
    )
    parsed = sa.make_url(pair.url(DATABASE, driver="asyncpg"))
    assert parsed.drivername == "postgresql+asyncpg"
    assert parsed.query["host"] == (
        f"127.0.0.1:{pair.primary.port}",
        f"127.0.0.1:{pair.standby.port}",
    )
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            assert conn.execute(INSERT, {"key": "before"}).scalar_one() == pair.primary.port
        # synchronous: the commit was answered after the standby flushed it; replayed soon after
        pair.wait_replayed()
        assert pair.standby.execute("SELECT key FROM ledger", database=DATABASE) == [("before",)]
        assert pair.standby.is_in_recovery()
        engine.dispose()
        fail_over(pair)
        assert pair.promoted
        assert pair.current_primary is pair.standby
        assert not pair.standby.is_in_recovery()
        with engine.begin() as conn:
            assert conn.execute(INSERT, {"key": "after"}).scalar_one() == pair.standby.port
        assert ledger(pair) == {"before": 1, "after": 1}
    finally:
        engine.dispose()


def test_start_after_a_failover_leaves_the_old_primary_down(pg_standby: StandbyPair) -> None:
    """start() is idempotent, but never brings back the old primary: it would take writes too,
    and url() lists it first."""
    pair = pg_standby
    prepare(pair, markers=False)
    fail_over(pair)
    pair.start()
    assert not pair.primary.is_running()
    assert pair.standby.is_running()
    pair.standby.stop()  # the new primary stopped: start() brings it back, as a primary
    pair.start()
    assert not pair.primary.is_running()
    assert not pair.standby.is_in_recovery()
    engine = sa.create_engine(pair.url(DATABASE))
    try:
        with engine.begin() as conn:
            assert conn.execute(INSERT, {"key": "after"}).scalar_one() == pair.standby.port
    finally:
        engine.dispose()


def test_pair_close_stops_both_servers_and_deletes_their_files(
    pg_standby_factory: Callable[..., StandbyPair],
) -> None:
    pair = pg_standby_factory(synchronous=False)
    state = pair.primary.execute("SELECT sync_state FROM pg_stat_replication")
    assert state == [("async",)]
    dirs = [Path(server.data_dir) for server in pair.servers]
    assert all(d.is_dir() for d in dirs)
    pair.close()
    assert not any(server.is_running() for server in pair.servers)
    assert not any(d.exists() for d in dirs)
    with pytest.raises(ServerStartError, match="closed"):
        pair.start()


def test_a_pair_removes_the_directories_it_made_for_its_base_dir() -> None:
    """The directories made for a base_dir that did not exist were left behind by close()."""
    # not pytest's tmp_path: as root, the servers' OS user can't reach it
    scratch = Path(tempfile.mkdtemp(prefix="rdb-failover-test-"))
    try:
        scratch.chmod(0o755)
        base = scratch / "made" / "here"
        with StandbyPair(base_dir=base) as pair:
            assert all(server.data_dir.parent.parent == base for server in pair.servers)
        assert list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_pair_never_started_or_closed_says_so(
    pg_standby_factory: Callable[..., StandbyPair],
) -> None:
    """crash_primary() on a pair never started, closed, or whose primary was crashed already
    did nothing and recorded a crash time; promote() on a closed pair said "start() the pair
    first", which then failed; the pair's admin SQL said "the server has no port yet". Each
    names the problem now."""
    never = StandbyPair()
    calls: dict[str, Callable[[], object]] = {
        "crash the primary": never.crash_primary,
        "promote the standby": never.promote,
        "execute": lambda: never.execute("SELECT 1"),
        "create a database": lambda: never.create_database("made"),
        "wait for the standby": never.wait_replayed,
    }
    for action, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"can't {action}: .*not running: call start"):
            call()
    assert never.crashed_at is None
    never.close()
    pair = pg_standby_factory(synchronous=False)
    pair.crash_primary()
    crashed_at = pair.crashed_at
    with pytest.raises(RuntimeError, match=r"primary of .* is not running"):
        pair.crash_primary()
    assert pair.crashed_at == crashed_at
    pair.close()
    calls = {
        "crash the primary": pair.crash_primary,
        "promote the standby": pair.promote,
        "execute": lambda: pair.execute("SELECT 1"),
        "create a database": lambda: pair.create_database("made"),
        "wait for the standby": pair.wait_replayed,
    }
    for action, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"can't {action}: .* is closed"):
            call()
    assert pair.crashed_at == crashed_at
    assert not pair.promoted


def test_a_promote_that_times_out_still_counts_as_a_promotion(
    pg_standby_factory: Callable[..., StandbyPair],
) -> None:
    """promote() whose timeout passed while the standby was still promoting raised, but the
    pair said promoted=False while the standby went on promoting: a second promote() failed
    with "recovery is not in progress", and start() restarted the old primary (two primaries,
    url() listing the old one first). wait_replayed() after a crash or a promotion failed with
    psycopg's connection refused by the dead primary. A bad timeout was taken as it came."""
    pair = pg_standby_factory(synchronous=False)
    for bad, error in ((-1, ValueError), (0, ValueError), (math.nan, ValueError), ("5", TypeError)):
        with pytest.raises(error, match="timeout must be"):
            pair.promote(timeout=bad)
        with pytest.raises(error, match="timeout must be"):
            pair.wait_replayed(timeout=bad)
    assert pair.standby.is_in_recovery()
    pair.crash_primary()
    with pytest.raises(RuntimeError, match=r"can't wait for the standby: the primary .* not run"):
        pair.wait_replayed()
    # the standby's startup process, stopped, can't leave recovery: the wait times out for sure
    # (a fast promotion could otherwise finish before the first look, whatever the timeout)
    with pair.standby.connect() as conn:
        row = conn.execute(
            "SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type = 'startup'"
        ).fetchone()
    assert row is not None
    startup = int(row[0])
    os.kill(startup, signal.SIGSTOP)
    try:
        with pytest.raises(ServerStartError, match="the pair counts as promoted"):
            pair.promote(timeout=0.3)
        assert pair.standby.is_in_recovery()
    finally:
        os.kill(startup, signal.SIGCONT)
    assert pair.promoted
    assert pair.current_primary is pair.standby
    wait_for(lambda: not pair.standby.is_in_recovery(), "the standby to finish promoting", 30)
    with pytest.raises(RuntimeError, match="promoted already"):
        pair.promote()
    pair.start()
    assert not pair.primary.is_running()
    with pytest.raises(RuntimeError, match=r"can't wait for the standby: .* was promoted"):
        pair.wait_replayed()


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


def test_a_failing_test_still_leaves_nothing_behind(pytester: pytest.Pytester) -> None:
    """The fixture's finalizer runs when the test using the pair fails."""
    record = pytester.path / "servers.txt"
    pytester.makepyfile(
        f"""
        def test_fails(pg_standby):
            with open({str(record)!r}, "w") as out:
                for server in pg_standby.servers:
                    pid = (server.data_dir / "postmaster.pid").read_text().split()[0]
                    out.write(f"{{server.data_dir}} {{pid}}\\n")
            raise AssertionError("the test fails")
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(failed=1)
    servers = [line.split() for line in record.read_text().splitlines()]
    assert len(servers) == 2
    for data_dir, pid in servers:
        assert not Path(data_dir).exists()
        assert not alive(int(pid))


_KILLED_SCRIPT = """
import os, signal, sys
from resilient_db.testing import StandbyPair
pair = StandbyPair()
pair.start()
for server in pair.servers:
    print(server.data_dir, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_test_process_leaves_nothing_behind() -> None:
    """SIGKILL gives no atexit: the servers' watchdogs stop them and delete their files."""
    with killed_at_exit(_KILLED_SCRIPT) as out:
        dirs = [Path(out.readline().strip()) for _ in range(2)]
        assert all(d.name == "data" and d.is_dir() for d in dirs), dirs
        pids = [_postmaster_pid(d) for d in dirs]
        assert all(alive(pid) for pid in pids)
    wait_for(lambda: not any(alive(pid) for pid in pids), "the servers to stop")
    wait_for(lambda: not any(d.parent.exists() for d in dirs), "their files to be deleted")


_KILLED_WHILE_STOPPED_SCRIPT = """
import os, signal, sys
from resilient_db.testing import EmbeddedPostgres
server = EmbeddedPostgres()
server.start()
server.crash()
print(server.data_dir, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_while_its_server_is_stopped_leaves_no_files() -> None:
    """Killed between a crash() and the restart (a CI timeout in a failover test, the demo's
    crash window): the watchdog was told pid 0 for "no server", and "kill -0 0" / "kill 0"
    reach its own process group, so it killed itself before deleting the cluster's files."""
    with killed_at_exit(_KILLED_WHILE_STOPPED_SCRIPT) as out:
        data = Path(out.readline().strip())
        assert data.name == "data"
        assert data.is_dir()
    wait_for(lambda: not data.parent.exists(), "the stopped server's files to be deleted")


def test_bad_arguments_are_refused_with_the_reason() -> None:
    # in any case (PostgreSQL's setting names are case-insensitive): a capitalised one got
    # through, and the promoted standby waited for a standby of its own at every COMMIT
    # and with dashes, which PostgreSQL reads as underscores: "synchronous-standby-names"
    # got through to both servers' command lines
    for name in (
        "synchronous_standby_names",
        "Synchronous_Standby_Names",
        "synchronous-standby-names",
    ):
        with pytest.raises(ValueError, match="sets synchronous_standby_names itself"):
            StandbyPair(settings={name: "*"})
    primary = EmbeddedPostgres()
    for name, why in (
        ("SYNCHRONOUS_STANDBY_NAMES", "once promoted"),
        ("Primary_Conninfo", "streams from the primary"),
        ("primary-conninfo", "streams from the primary"),
        ("primary_slot_name", "the slot it was made with"),
        ("Port", "pass port= instead"),
    ):
        with pytest.raises(ValueError, match=rf"settings must not set {name}: .*{why}"):
            StandbyServer(primary, settings={name: "x"})
    primary.close()
    pair = StandbyPair()
    try:
        with pytest.raises(ValueError, match="target_session_attrs must be one of"):
            pair.url(DATABASE, target_session_attrs="read-mostly")
        with pytest.raises(RuntimeError, match="not running"):
            pair.promote()
    finally:
        pair.close()


# -- what the drivers say during and after a failover ---------------------------------------------
def _sync_error(url: str, statement: str | None) -> BaseException:
    engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.begin() as conn:
            if statement is not None:
                conn.execute(sa.text(statement))
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("no error")


async def _async_error(url: str, statement: str | None) -> BaseException:
    engine = create_async_engine(url, connect_args={"timeout": 2})
    try:
        async with engine.begin() as conn:
            if statement is not None:
                await conn.execute(sa.text(statement))
    except Exception as exc:
        return exc
    finally:
        await engine.dispose()
    raise AssertionError("no error")


def driver_error(url: str, driver: str, statement: str | None = None) -> BaseException:
    """The error the real driver raises connecting to ``url`` (and running ``statement``)."""
    if driver == "asyncpg":
        return asyncio.run(_async_error(url, statement))
    return _sync_error(url, statement)


@pytest.mark.parametrize("driver", DRIVERS)
def test_what_the_drivers_raise_around_a_failover_is_a_transient_disconnect(
    pg_standby: StandbyPair, driver: str
) -> None:
    pair = pg_standby
    prepare(pair)
    # a connection that lands on a standby and writes: 25006 read_only_sql_transaction
    on_standby = pair.standby.url(DATABASE, driver=driver)
    exc = driver_error(on_standby, driver, "INSERT INTO ledger (key, port) VALUES ('x', 0)")
    assert rdb.sqlstate_of(exc) == "25006"
    assert rdb.classify(exc) is rdb.Outcome.DISCONNECT
    # every host answers, none takes writes (the standby not promoted yet): psycopg reports an
    # OperationalError without SQLSTATE, asyncpg TargetServerAttributeNotMatched
    only_standby = pair.url(DATABASE, driver=driver).replace(
        f"host=127.0.0.1:{pair.primary.port}&", ""
    )
    exc = driver_error(only_standby, driver)
    assert rdb.sqlstate_of(exc) is None
    assert rdb.classify(exc) is rdb.Outcome.DISCONNECT, repr(exc)
    # the primary crashed, the standby not promoted yet: refused, then read-only
    pair.crash_primary()
    exc = driver_error(pair.url(DATABASE, driver=driver), driver)
    assert rdb.classify(exc) is rdb.Outcome.DISCONNECT, repr(exc)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_write_on_a_standby_invalidates_the_pool(pg_standby: StandbyPair, driver: str) -> None:
    """25006 on one connection: the pool's other connections (made before it) are replaced too,
    since they may point at the same demoted server."""
    pair = pg_standby
    prepare(pair)
    url = pair.standby.url(DATABASE, driver=driver)
    pid_sql = sa.text("SELECT pg_backend_pid()")
    write = sa.text("INSERT INTO ledger (key, port) VALUES ('x', 0)")
    config = rdb.Config(retry=False, circuit_breaker=False)

    if driver == "asyncpg":

        async def scenario() -> tuple[set[int], set[int], BaseException]:
            engine = create_async_engine(url)
            rdb.AsyncResilientSession(engine, service="failover-pool", config=config)
            try:
                async with engine.connect() as a, engine.connect() as b:
                    before = {(await c.execute(pid_sql)).scalar_one() for c in (a, b)}
                try:
                    async with engine.begin() as conn:
                        await conn.execute(write)
                except Exception as exc:
                    error: BaseException = exc
                async with engine.connect() as a, engine.connect() as b:
                    after = {(await c.execute(pid_sql)).scalar_one() for c in (a, b)}
                return before, after, error
            finally:
                await engine.dispose()

        before, after, error = asyncio.run(scenario())
    else:
        engine = sa.create_engine(url)
        rdb.ResilientSession(engine, service="failover-pool", config=config)
        try:
            with engine.connect() as a, engine.connect() as b:
                before = {c.execute(pid_sql).scalar_one() for c in (a, b)}
            try:
                with engine.begin() as conn:
                    conn.execute(write)
            except Exception as exc:
                error = exc
            with engine.connect() as a, engine.connect() as b:
                after = {c.execute(pid_sql).scalar_one() for c in (a, b)}
        finally:
            engine.dispose()
    assert rdb.sqlstate_of(error) == "25006"
    assert len(before) == 2
    assert not before & after, "pooled connections made before the 25006 were reused"


def test_units_on_a_hot_standby_commit_plainly(pg_standby: StandbyPair) -> None:
    """A read replica: a hot standby takes no writes, so a unit there has nothing to verify and
    commits plainly, even one whose statements the client can't prove read-only (a function
    call in a CTE). The prepared marker's INSERT would be refused there (25006), failing every
    such unit. Both drivers; the server tells them it is a standby (``in_hot_standby``)."""
    pair = pg_standby
    prepare(pair)
    pair.execute(
        "CREATE FUNCTION ledger_size() RETURNS bigint LANGUAGE sql STABLE "
        "AS 'SELECT count(*) FROM ledger'",
        database=DATABASE,
    )
    pair.wait_replayed()
    read = sa.text("WITH n AS (SELECT ledger_size() AS n) SELECT n FROM n")
    config = rdb.Config(retry=False, circuit_breaker=False)

    engine = sa.create_engine(pair.standby.url(DATABASE))
    Sessions = rdb.ResilientSession(engine, service="standby-reads", config=config)
    try:
        assert Sessions.run(lambda s: s.execute(read).scalar_one()) == 0
    finally:
        engine.dispose()

    async def async_reads() -> int:
        async_engine = create_async_engine(pair.standby.url(DATABASE, driver="asyncpg"))
        AsyncSessions = rdb.AsyncResilientSession(
            async_engine, service="standby-reads-async", config=config
        )
        try:

            async def unit(session: AsyncSession) -> int:
                return int((await session.execute(read)).scalar_one())

            return await AsyncSessions.run(unit)
        finally:
            await async_engine.dispose()

    assert asyncio.run(async_reads()) == 0
    assert pair.execute("SELECT count(*) FROM resilient_db.commit_markers", database=DATABASE) == [
        (0,)
    ]


def test_reads_taken_for_notifications_commit_on_a_hot_standby_without_markers(
    pg_standby: StandbyPair,
) -> None:
    """Without the markers, a transaction that notifies asks for its transaction id before
    COMMIT (``pg_current_xact_id()``), which a hot standby refuses. A read there that merely
    looks like one (a text holding ``; notify ...``), or reads a column named ``notify``, is
    committed plainly, as a unit there always is. Both drivers."""
    pair = pg_standby
    prepare(pair, markers=False)
    pair.execute("CREATE TABLE prefs (id int PRIMARY KEY, notify bool)", database=DATABASE)
    pair.execute("INSERT INTO prefs VALUES (1, true)", database=DATABASE)
    pair.wait_replayed()
    reads = [
        sa.text("SELECT notify FROM prefs WHERE id = 1"),
        sa.text("SELECT 'a; notify me' IS NOT NULL"),
    ]
    assert _statements.verdict_of(str(reads[1])) == _statements.NOTIFIES
    config = rdb.Config(retry=False, circuit_breaker=False)

    engine = sa.create_engine(pair.standby.url(DATABASE))
    Sessions = rdb.ResilientSession(engine, service="standby-notify", config=config)
    try:
        for read in reads:
            assert Sessions.run(lambda s, read=read: s.execute(read).scalar_one()) is True
    finally:
        engine.dispose()

    async def async_reads() -> list[bool]:
        async_engine = create_async_engine(pair.standby.url(DATABASE, driver="asyncpg"))
        AsyncSessions = rdb.AsyncResilientSession(
            async_engine, service="standby-notify-async", config=config
        )
        try:
            found = []
            for read in reads:

                async def unit(session: AsyncSession, read: Any = read) -> bool:
                    return bool((await session.execute(read)).scalar_one())

                found.append(await AsyncSessions.run(unit))
            return found
        finally:
            await async_engine.dispose()

    assert asyncio.run(async_reads()) == [True, True]


# -- writers through a failover --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("driver", "mode"), CASES)
def test_writes_resume_after_failover_and_nothing_acknowledged_is_lost(
    pg_standby: StandbyPair, driver: str, mode: str
) -> None:
    """Synchronous replication: two writers; the primary crashes mid-stream, the standby is
    promoted; every acknowledged write is on the new primary, none twice. With the markers no
    unit fails; without them a unit whose COMMIT answer the crash took may end unknown (its
    transaction id proves nothing on another server), never wrong."""
    pair = pg_standby
    prepare(pair, markers=mode == MARKERS)
    workload, crashed, promoted = writes_through_a_failover(pair, driver)
    tally = check_exactly_once(pair, workload, lossless=True)
    if mode == MARKERS:
        assert workload.failures == {}, workload.failures
    else:
        assert tally.failed == 0, workload.failures
    report(f"{driver}, {mode}, synchronous", workload, pair, crashed, promoted)
    print(
        f"[failover] {driver}, {mode}, synchronous: {tally.acked} writes acknowledged, "
        f"{workload.acked(pair.primary.port)} before the crash, none lost, none twice; "
        f"{sum(n - 1 for n in workload.calls.values())} replayed attempts, "
        f"{tally.unknown} unknown"
    )


@pytest.mark.slow
@pytest.mark.parametrize("driver", DRIVERS)
def test_asynchronous_replication_may_lose_acknowledged_writes_but_never_doubles_one(
    pg_standby_factory: Callable[..., StandbyPair], driver: str
) -> None:
    """Asynchronous replication: the primary answers before the standby has the commit, so
    writes acknowledged in that window are gone after the failover. What still holds: no unit
    is written twice (a lost COMMIT answer is settled on the new primary by its marker), and a
    unit that failed with a known outcome wrote nothing."""
    pair = pg_standby_factory(synchronous=False)
    prepare(pair)
    workload, crashed, promoted = writes_through_a_failover(pair, driver)
    tally = check_exactly_once(pair, workload, lossless=False)
    report(f"{driver}, asynchronous", workload, pair, crashed, promoted)
    print(
        f"[failover] {driver}, asynchronous: {tally.acked} writes acknowledged, "
        f"{tally.lost} of them lost in the failover, none twice; {tally.unknown} unknown, "
        f"{tally.failed} failed"
    )


# -- one unit whose COMMIT answer is lost across the failover -------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("driver", "mode"), CASES)
def test_commit_lost_on_the_way_then_failover_is_replayed_once_on_the_new_primary(
    pg_standby: StandbyPair, driver: str, mode: str
) -> None:
    """The COMMIT never reached the primary (held by the proxy); the primary crashes and the
    standby is promoted; then the client hears nothing back. The claim on the new primary finds
    no marker and fences it: the unit is replayed there, once. (The fallback replays too when
    the new primary shows the transaction id as never committed, else ends unknown.)"""
    pair = pg_standby
    prepare(pair, markers=mode == MARKERS)
    with FaultProxy(pair.primary) as proxy:
        url = workload_url(pair, driver, primary_at=(proxy.host, proxy.port))
        proxy.swallow_commit()
        workload = Workload(url, driver, writers=1, limit=1).start()
        try:
            wait_for(lambda: proxy.commits_swallowed == 1 or bool(workload.failures), "COMMIT")
            assert proxy.commits_swallowed == 1, workload.failures
            fail_over(pair)
            assert proxy.release_swallowed() == 1
        finally:
            workload.finish()
    if mode == FALLBACK and workload.failures:
        [(key, error)] = workload.failures.items()
        assert isinstance(error, rdb.CommitOutcomeUnknownError), error
        assert workload.calls[key] == 1
        assert ledger(pair) == {}
        return
    assert workload.failures == {}, workload.failures
    [ack] = workload.acks
    assert ack.port == pair.standby.port
    assert workload.calls[ack.key] == 2, "the unit was not replayed after a COMMIT that never ran"
    assert ledger(pair) == {ack.key: 1}


@pytest.mark.slow
@pytest.mark.parametrize(("driver", "mode"), CASES)
def test_commit_answer_lost_then_failover_is_verified_on_the_new_primary_not_replayed(
    pg_standby: StandbyPair, driver: str, mode: str
) -> None:
    """The COMMIT reached the primary and (synchronous) the standby; its answer is lost. The
    first check finds no server taking writes; during the backoff the primary crashes and the
    standby is promoted; the next check finds the unit's marker on the new primary: done, not
    replayed. The fallback sees its transaction id committed, but on another server, where
    that id may belong to another transaction: unknown, never "done" on that evidence."""
    pair = pg_standby
    prepare(pair, markers=mode == MARKERS)
    with FaultProxy(pair.primary) as proxy:
        url = workload_url(pair, driver, primary_at=(proxy.host, proxy.port))
        failovers: list[float] = []

        def arm(key: str, call: int) -> None:
            if call == 1:
                proxy.lose_commit_answer()
                proxy.refuse()  # the first check can't reach the primary

        def during_backoff(seconds: float) -> None:
            if not failovers:
                fail_over(pair)
                failovers.append(seconds)

        workload = Workload(
            url, driver, writers=1, limit=1, on_call=arm, on_backoff=during_backoff
        ).start()
        workload.finish(stop=False)
    assert proxy.commits_lost == 1
    assert failovers, "the unit never backed off between checks"
    assert pair.promoted
    if mode == FALLBACK:
        [(key, error)] = workload.failures.items()
        assert isinstance(error, rdb.CommitOutcomeUnknownError), error
        assert workload.calls[key] == 1, "replayed blindly after a COMMIT that was applied"
        assert ledger(pair) == {key: 1}
        return
    assert workload.failures == {}, workload.failures
    [ack] = workload.acks
    assert ack.port == pair.primary.port  # the write that committed, on the old primary
    assert workload.calls[ack.key] == 1, "a unit whose COMMIT was applied was replayed"
    assert ledger(pair) == {ack.key: 1}


@pytest.mark.slow
def test_units_cut_off_by_a_failover_do_not_open_the_breaker(pg_standby: StandbyPair) -> None:
    """Eight writers, the breaker on with its default threshold (5) and a 30 s reset timeout.
    All eight are inside a unit when the primary crashes (held there until it has), so all
    eight fail; their backoffs are held until the standby is promoted. Those eight failures are
    one for the breaker (each attempt began before the first of them was counted): writes
    resume on the new primary at once, instead of failing fast with CircuitOpenError for the
    reset timeout."""
    pair = pg_standby
    prepare(pair)
    inside, backing_off = threading.Semaphore(0), threading.Semaphore(0)
    crashed_event, promoted_event = threading.Event(), threading.Event()
    hold_calls, hold_backoffs = threading.Event(), threading.Event()

    def in_unit(key: str, call: int) -> None:
        if hold_calls.is_set():
            inside.release()
            assert crashed_event.wait(30), "the primary was never crashed"

    def backoff(seconds: float) -> None:
        if hold_backoffs.is_set():
            backing_off.release()
            assert promoted_event.wait(30), "the standby was never promoted"

    url = pair.url(DATABASE, driver="psycopg")
    workload = Workload(url, "psycopg", writers=8, config=BREAKER_THROUGH_FAILOVER, on_call=in_unit)
    workload.on_backoff = backoff
    workload.start()
    try:
        wait_for(lambda: workload.acked(pair.primary.port) >= 40, "writes on the primary")
        hold_calls.set()
        for _ in range(8):  # every writer is inside a unit, its INSERT sent, COMMIT not yet
            assert inside.acquire(timeout=30), "a writer never reached its unit"
        hold_backoffs.set()
        pair.crash_primary()
        crashed = time.monotonic()
        hold_calls.clear()
        crashed_event.set()
        for _ in range(8):  # every writer's COMMIT failed and waits to check or retry
            assert backing_off.acquire(timeout=30), "a writer did not fail over to its backoff"
        pair.promote()
        promoted = time.monotonic()
        hold_backoffs.clear()
        promoted_event.set()
        wait_for(lambda: workload.acked(pair.standby.port) >= 40, "writes on the new primary")
    finally:
        crashed_event.set()
        promoted_event.set()
        workload.finish()
    check_exactly_once(pair, workload, lossless=True)
    assert workload.failures == {}, workload.failures
    service = rdb.health()["services"][workload.service]
    assert service["counters"]["breaker_opens"] == 0, service
    assert service["counters"]["breaker_rejections"] == 0, service
    report("psycopg, 8 writers, breaker on", workload, pair, crashed, promoted)


# -- a first host that accepts TCP and never answers -----------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_frozen_first_host_is_passed_over_after_the_per_host_connect_timeout(
    pg_standby_factory: Callable[..., StandbyPair], driver: str
) -> None:
    """The multi-host URL lists first a host that accepts TCP and never answers (a blackholed
    proxy in front of the old primary), then the promoted standby. Each host gets its own
    bounded connect (MULTI_HOST_CONNECT_TIMEOUT where the URL sets none), so the unit writes on
    the standby after about that long. (Before: psycopg waited its default 130 s per host, and
    asyncpg spent its whole connect timeout, 60 s by default, on the first host and never tried
    the second.) psycopg: a connect_timeout the URL gives is kept."""
    pair = pg_standby_factory(synchronous=False)
    prepare(pair, markers=False)
    bound = MULTI_HOST_CONNECT_TIMEOUT
    with FaultProxy(pair.primary) as proxy:
        proxy.blackhole()
        pair.promote()
        url = pair.url(DATABASE, driver=driver, primary_at=(proxy.host, proxy.port))
        config = rdb.Config(max_retries=0, deadline=60.0, circuit_breaker=False)
        began = time.monotonic()
        if driver == "asyncpg":

            async def write(session: AsyncSession) -> tuple[int, None]:
                port = (await session.execute(INSERT, {"key": "k"})).scalar_one()
                return port, None

            async def main() -> tuple[int, str | None]:
                engine = create_async_engine(url)
                factory = rdb.AsyncResilientSession(engine, service="frozen", config=config)
                try:
                    return await asyncio.wait_for(factory.run(write), 4 * bound)
                finally:
                    await engine.dispose()

            port, timeout = asyncio.run(main())
        else:

            def write_sync(session: Session) -> tuple[int, str | None]:
                port = session.execute(INSERT, {"key": "k"}).scalar_one()
                driver_connection = session.connection().connection.driver_connection
                return port, driver_connection.info.get_parameters().get("connect_timeout")

            engine = sa.create_engine(url)
            factory = rdb.ResilientSession(engine, service="frozen", config=config)
            done: list[tuple[int, str | None]] = []
            thread = threading.Thread(target=lambda: done.append(factory.run(write_sync)))
            thread.start()
            thread.join(4 * bound)  # (closing the proxy ends a connect still waiting on it)
            engine.dispose()
            assert done, f"no write within {4 * bound} s"
            [(port, timeout)] = done
        took = time.monotonic() - began
    note = f"{driver}: wrote on the standby {took:.1f} s after the unit began"
    print(f"\n[failover] a frozen first host: {note}")
    assert port == pair.standby.port
    assert bound * 0.8 <= took < 3 * bound, note
    if driver == "psycopg":
        assert timeout == str(bound)
        engine = sa.create_engine(url + "&connect_timeout=7")
        try:
            with engine.connect() as conn:
                parameters = conn.connection.driver_connection.info.get_parameters()
            assert parameters.get("connect_timeout") == "7"
        finally:
            engine.dispose()


def test_a_multi_host_url_naming_a_service_keeps_its_connect_timeout(
    pg_server: PostgresServer,
    pg_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """psycopg: the default per-host connect_timeout given to a multi-host URL overrode the one
    a connection service file sets (a value in the connect string wins over the file's)."""
    services = tmp_path / "pg_service.conf"
    services.write_text("[orders]\nconnect_timeout=7\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    here = f"{pg_server.host}:{pg_server.port}"
    url = sa.make_url(pg_server.url(pg_database)).update_query_dict(
        {"host": [here, here], "service": "orders"}
    )
    engine = sa.create_engine(url)
    try:
        with rdb.ResilientSession(engine, service="service-file")() as session:
            driver: Any = session.connection().connection.driver_connection
            assert driver.info.get_parameters().get("connect_timeout") == "7"
    finally:
        engine.dispose()


def test_prefer_standby_without_a_standby_connects_to_each_host_once(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """asyncpg, ``prefer-standby`` over hosts that are all primaries: one pass finds no
    standby and keeps the first server reached. Before, a second pass connected to the first
    host again (twice its connect timeout where it never answers)."""
    with FaultProxy(pg_server) as first, FaultProxy(pg_server) as second:
        url = sa.make_url(pg_server.url(pg_database, driver="asyncpg")).update_query_dict(
            {
                "host": [f"{first.host}:{first.port}", f"{second.host}:{second.port}"],
                "target_session_attrs": "prefer-standby",
            }
        )

        async def port_of() -> int:
            engine = create_async_engine(url)
            factory = rdb.AsyncResilientSession(engine, service="prefer-standby-once")
            try:
                async with factory() as session:
                    query = sa.text("SELECT inet_client_port()")
                    return int((await session.execute(query)).scalar_one())
            finally:
                await engine.dispose()

        asyncio.run(port_of())
        assert (first.connections_accepted, second.connections_accepted) == (1, 1)
        # The proxy sees a client's close on its own thread, a moment after dispose() returns.
        wait_for(
            lambda: (first.active_connections, second.active_connections) == (0, 0),
            "both hosts' connections closed",
            timeout=10,
        )


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_multi_host_url_connects_host_by_host_honouring_target_session_attrs(
    pg_standby: StandbyPair, driver: str
) -> None:
    """The bounded per-host connect still picks the host target_session_attrs asks for: with
    the standby listed first, read-write lands on the primary, prefer-standby on the
    standby, any on the first host."""
    pair = pg_standby
    prepare(pair, markers=False)
    standby = f"{pair.standby.host}:{pair.standby.port}"
    primary = f"{pair.primary.host}:{pair.primary.port}"
    landed: dict[str, int] = {}
    for attrs in ("read-write", "prefer-standby", "any"):
        url = sa.make_url(pair.url(DATABASE, driver=driver)).update_query_dict(
            {"host": [standby, primary], "target_session_attrs": attrs}
        )
        factory_args: dict[str, Any] = {"service": f"hosts-{driver}-{attrs}"}
        if driver == "asyncpg":

            async def port_of(url: sa.URL = url, args: dict[str, Any] = factory_args) -> int:
                engine = create_async_engine(url)
                factory = rdb.AsyncResilientSession(engine, **args)
                try:
                    async with factory() as session:
                        query = sa.text("SELECT inet_server_port()")
                        return int((await session.execute(query)).scalar_one())
                finally:
                    await engine.dispose()

            landed[attrs] = asyncio.run(port_of())
        else:
            engine = sa.create_engine(url)
            try:
                with rdb.ResilientSession(engine, **factory_args)() as session:
                    port = session.execute(sa.text("SELECT inet_server_port()")).scalar_one()
                    landed[attrs] = int(port)
            finally:
                engine.dispose()
    assert landed == {
        "read-write": pair.primary.port,
        "prefer-standby": pair.standby.port,
        "any": pair.standby.port,
    }
