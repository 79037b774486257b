"""The commit protocol of sync units (psycopg), against a real server and real crashes.

A COMMIT whose answer never arrived is never replayed blindly: every scenario ends with the unit
done exactly once, or raising ``CommitOutcomeUnknownError``, and the database agrees (the ledger
rows the unit wrote are counted on the server). With the commit markers installed
(``rdb.install_commit_markers``) the outcome is always known; without them (the fallback) a
restart in between may leave it unknown, never wrong.

The xid-reuse scenario runs on a dedicated server whose WAL stays in memory until a commit, so a
crash deterministically loses the unit's transaction and the server hands its xid to the next
client; the test checks that it really did.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import EmbeddedPostgres, FaultProxy, PostgresServer

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

_services = itertools.count()


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
@pytest.fixture(autouse=True)
def _no_backoff() -> Iterator[None]:
    with rdb.set_testing():
        yield


@pytest.fixture
def service() -> str:
    return f"commit-{next(_services)}"


@pytest.fixture(params=[MARKERS, FALLBACK])
def mode(request: pytest.FixtureRequest) -> str:
    """``markers``: ``rdb.install_commit_markers`` ran; ``fallback``: nothing installed."""
    if request.param == MARKERS and not hasattr(rdb, "install_commit_markers"):
        pytest.skip("rdb.install_commit_markers does not exist yet")
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


@dataclass
class Env:
    """A database prepared for ``mode``, an engine to it through ``proxy``, a service name."""

    engine: sa.Engine
    proxy: FaultProxy
    server: PostgresServer
    database: str
    service: str
    mode: str

    def factory(self, **cfg: Any) -> rdb.ResilientSession[Session]:
        return factory(self.engine, self.service, **cfg)

    def rows(self, unit: Unit) -> int:
        return ledger_rows(self.server, self.database, unit.name)

    @property
    def known(self) -> bool:
        """With markers, every outcome must be known."""
        return self.mode == MARKERS


@pytest.fixture
def env(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_database: str, service: str, mode: str
) -> Iterator[Env]:
    prepare(pg_server.url(pg_database), mode)
    engine = sa.create_engine(fault_proxy.url(pg_database), connect_args={"connect_timeout": 2})
    yield Env(engine, fault_proxy, pg_server, pg_database, service, mode)
    engine.dispose()


@pytest.fixture(scope="module")
def wal_in_memory_server(pg_server: PostgresServer) -> Iterator[EmbeddedPostgres]:
    if not isinstance(pg_server, EmbeddedPostgres):
        pytest.skip("needs an embedded server it can crash")
    with EmbeddedPostgres(settings=WAL_IN_MEMORY) as server:
        yield server


def factory(engine: sa.Engine, service: str, **cfg: Any) -> rdb.ResilientSession[Session]:
    return rdb.ResilientSession(engine, service=service, config=rdb.Config(**cfg))


def ledger_rows(server: PostgresServer, database: str, unit: str) -> int:
    rows = server.execute(
        "SELECT count(*) FROM ledger WHERE unit = %s", params=(unit,), database=database
    )
    return int(rows[0][0])


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def busy_backends(server: PostgresServer, database: str) -> int:
    """Client backends of ``database`` inside a transaction (the harness's own are left out)."""
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = "
        "'client backend' AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
        params=(database,),
    )
    return int(rows[0][0])


# -- units and their outcomes --------------------------------------------------------------------
Write = Callable[[Session, str], object]

WRITES: dict[str, Write] = {
    "orm-add": lambda s, u: s.add(Ledger(unit=u, note="orm")),
    "select-function": lambda s, u: s.execute(sa.select(sa.func.write_ledger(u, "select"))),
    "scalar-function": lambda s, u: s.scalar(sa.select(sa.func.write_ledger(u, "scalar"))),
    "text-select-function": lambda s, u: s.execute(
        sa.text("SELECT write_ledger(:u, 'text-select')"), {"u": u}
    ),
    "text-insert": lambda s, u: s.execute(
        sa.text("INSERT INTO ledger (unit, note) VALUES (:u, 'text-insert')"), {"u": u}
    ),
}


class Unit:
    """A unit of work writing one ledger row named after it; counts its calls and xids."""

    def __init__(self, write: Write = WRITES["orm-add"], *, record_xid: bool = False) -> None:
        self.name = f"unit-{uuid.uuid4()}"
        self.write = write
        self.record_xid = record_xid
        self.calls = 0
        self.xids: list[str | None] = []
        self.hook: Callable[[int], None] | None = None  # called with the call number

    def __call__(self, session: Session) -> str:
        self.calls += 1
        self.write(session, self.name)
        session.flush()
        if self.record_xid:
            self.xids.append(session.execute(XID_SQL).scalar())
        if self.hook is not None:
            self.hook(self.calls)
        return self.name


@dataclass
class Outcome:
    result: object = None
    error: BaseException | None = None


def run(Session: rdb.ResilientSession[Session], unit: Callable[[Session], object]) -> Outcome:
    try:
        return Outcome(result=Session.run(unit))
    except BaseException as exc:
        return Outcome(error=exc)


class Background(threading.Thread):
    """``Session.run(unit)`` in a thread (while the test injects faults); ``outcome`` after."""

    def __init__(
        self, Session: rdb.ResilientSession[Session], unit: Callable[[Session], object]
    ) -> None:
        super().__init__(daemon=True)
        self.Session = Session
        self.unit = unit
        self.outcome: Outcome | None = None

    def run(self) -> None:
        self.outcome = run(self.Session, self.unit)

    def result(self, timeout: float = 30.0) -> Outcome:
        self.join(timeout)
        assert not self.is_alive(), "the unit did not finish"
        assert self.outcome is not None
        return self.outcome


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


# -- a lost COMMIT answer, no crash --------------------------------------------------------------
def test_lost_commit_answer_is_done_once_and_not_replayed(env: Env) -> None:
    Session = env.factory()
    unit = Unit()
    env.proxy.lose_commit_answer()
    outcome = run(Session, unit)
    assert env.proxy.commits_lost == 1
    assert outcome.error is None, outcome.error  # no restart: known in both modes
    assert outcome.result == unit.name
    assert unit.calls == 1  # committed on the server: never replayed
    assert env.rows(unit) == 1


@pytest.mark.parametrize("path", sorted(set(WRITES) - {"orm-add"}))
def test_writers_through_functions_and_text_are_verified_not_replayed(env: Env, path: str) -> None:
    """A unit whose only write is ``SELECT write_ledger(...)`` or ``text("INSERT ...")``."""
    Session = env.factory()
    unit = Unit(WRITES[path])
    env.proxy.lose_commit_answer()
    outcome = run(Session, unit)
    assert env.proxy.commits_lost == 1
    assert outcome.error is None, outcome.error
    assert unit.calls == 1, "replayed blindly after a COMMIT that was applied"
    assert env.rows(unit) == 1


READS: dict[str, Callable[[Session], object]] = {
    "orm-select": lambda s: s.scalars(sa.select(Ledger.id).limit(1)).all(),
    "count-function": lambda s: s.scalar(sa.select(sa.func.count()).select_from(Ledger)),
    "text-select": lambda s: s.execute(sa.text("SELECT 41 + 1")).scalar_one(),
    "text-function": lambda s: s.execute(sa.text("SELECT now()")).scalar_one(),
}


@pytest.mark.parametrize("path", sorted(READS))
def test_read_only_unit_with_lost_commit_answer_is_replayed_or_returns(env: Env, path: str) -> None:
    Session = env.factory()
    calls: list[int] = []

    def unit(session: Session) -> str:
        calls.append(1)
        READS[path](session)
        return "read"

    env.proxy.lose_commit_answer()
    outcome = run(Session, unit)
    assert env.proxy.commits_lost == 1
    assert outcome.error is None, f"a read-only unit raised {outcome.error!r}"
    assert outcome.result == "read"
    assert len(calls) in (1, 2)


# -- COMMIT never reached the server -------------------------------------------------------------
def swallowed(env: Env, unit: Unit) -> Background:
    """Start ``unit`` in a thread and return once its COMMIT is held by the proxy."""
    env.proxy.swallow_commit()
    worker = Background(env.factory(), unit)
    worker.start()
    wait_for(lambda: env.proxy.commits_swallowed == 1 or not worker.is_alive())
    assert env.proxy.commits_swallowed == 1, worker.outcome
    return worker


def test_swallowed_commit_is_replayed_once(env: Env) -> None:
    unit = Unit()
    worker = swallowed(env, unit)
    assert env.proxy.release_swallowed() == 1
    outcome = worker.result()
    rows = env.rows(unit)
    if settled(outcome, rows, known=env.known) == "done":
        assert unit.calls == 2  # the first attempt never committed: replayed
    else:
        assert rows == 0  # the COMMIT never reached the server


@pytest.mark.server_control
def test_swallowed_commit_then_crash_is_replayed_once(env: Env) -> None:
    """COMMIT lost on the way; the server crashes and comes back; then the client hears."""
    unit = Unit()
    worker = swallowed(env, unit)
    env.server.crash()
    env.server.start()
    assert env.proxy.release_swallowed() == 1
    outcome = worker.result()
    rows = env.rows(unit)
    if settled(outcome, rows, known=env.known) == "done":
        assert unit.calls == 2
    else:
        assert rows == 0


def test_late_commit_after_the_check_is_fenced_off(env: Env) -> None:
    """The client gives up on a COMMIT still travelling; it reaches the server after the check.

    The check must make sure the original can no longer commit once it looked: with markers the
    unit is replayed and the late COMMIT fails; without, the original transaction is still open
    when the check looks, so the outcome can only be unknown (never a replay).
    """
    unit = Unit()
    worker = swallowed(env, unit)
    assert env.proxy.release_swallowed(keep_server=True) == 1  # the backend is still there
    outcome = worker.result()
    assert env.proxy.deliver_late_commits() == 1
    wait_for(lambda: busy_backends(env.server, env.database) == 0)
    rows = env.rows(unit)
    if settled(outcome, rows, known=env.known) == "done":
        assert unit.calls == 2
    else:
        assert unit.calls == 1


# -- a lost answer, then a crash before the check ------------------------------------------------
@pytest.mark.server_control
def test_lost_answer_then_crash_before_the_check_is_never_replayed(env: Env) -> None:
    """The COMMIT was applied (and is durable); the server restarts before the unit can ask."""
    crashes: list[float] = []

    def sleep(seconds: float) -> None:  # the backoff between checks: crash here, don't sleep
        if not crashes:
            crashes.append(seconds)
            env.server.crash()
            env.server.start()
            env.proxy.restore()

    def arm(call: int) -> None:
        if call == 1:
            env.proxy.lose_commit_answer()
            env.proxy.refuse()  # the first check can't connect

    unit = Unit()
    unit.hook = arm
    with rdb.set_testing(False):
        Session = rdb.ResilientSession(
            env.engine,
            service=env.service,
            config=rdb.Config(initial_delay=0.001, max_delay=0.002, circuit_breaker=False),
            sleep=sleep,
        )
        outcome = run(Session, unit)
    assert env.proxy.commits_lost == 1
    assert crashes, "the unit never backed off between checks"
    assert unit.calls == 1, "a unit whose COMMIT was applied was replayed"
    rows = env.rows(unit)
    assert rows == 1
    settled(outcome, rows, known=env.known)


# -- the xid-reuse case --------------------------------------------------------------------------
@pytest.mark.server_control
def test_reused_xid_never_reports_a_lost_write_as_done(
    wal_in_memory_server: EmbeddedPostgres, service: str, mode: str
) -> None:
    """COMMIT in flight while the server crashes before the unit's WAL is durable; after the
    restart another client gets the same xid and commits first; then the unit hears."""
    server = wal_in_memory_server
    database = f"xid_{uuid.uuid4().hex[:12]}"
    server.create_database(database)
    try:
        prepare(server.url(database), mode)
        with FaultProxy(server) as proxy:
            engine = sa.create_engine(proxy.url(database), connect_args={"connect_timeout": 2})
            try:
                env = Env(engine, proxy, server, database, service, mode)
                unit = Unit(record_xid=True)
                worker = swallowed(env, unit)
                server.crash()  # the unit's WAL was never written out: its transaction is gone
                server.start()
                other_xid = commit_another_transaction(server, database)
                assert unit.xids == [other_xid], "the server did not reuse the unit's xid"
                assert proxy.release_swallowed() == 1
                outcome = worker.result()
            finally:
                engine.dispose()
        rows = env.rows(unit)
        assert rows == 1 or outcome.error is not None, "a lost write was reported done"
        if settled(outcome, rows, known=env.known) == "done":
            assert unit.calls == 2
        else:
            assert rows == 0
    finally:
        server.drop_database(database)


def commit_another_transaction(server: PostgresServer, database: str) -> str:
    """Another client writes and commits; returns its xid."""
    with psycopg.connect(server.conninfo(database)) as other:
        other.execute("INSERT INTO ledger (unit, note) VALUES ('other', 'takes the next xid')")
        row = other.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        return str(row[0])
