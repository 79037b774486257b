"""What the sync and async tests share: the SQLSTATE tables, the model, the SQL, and a
transaction that moves a row just before a session's UPDATE of it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import psycopg
import pybreaker
import pytest
import sqlalchemy as sa
from processes import wait_for
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db import _commit
from resilient_db.testing import FaultProxy, PostgresServer, StandbyPair
from resilient_db.transitions._dbmap import exception_from_db

#: psycopg 3.2.4+ raises the server's FATAL error for a connection the server ended (its
#: SQLSTATE: 57P01, 57P05, 08P01); before, its "consuming input failed" carries no code (a lost
#: connection all the same)
PSYCOPG_KEEPS_FATAL_CODES = tuple(
    int(n) for n in psycopg.__version__.split(".")[:3] if n.isdigit()
) >= (3, 2, 4)


#: asyncpg 0.32+ raises a connection the server (or PgBouncer) ended from its FATAL error, whose
#: SQLSTATE is the error's; before, its own 08003 (connection_does_not_exist) is all it says
ASYNCPG_KEEPS_FATAL_CODES = tuple(
    int(n) for n in asyncpg.__version__.split(".")[:2] if n.isdigit()
) >= (0, 32)


def fatal_code(code: str) -> str | None:
    """The SQLSTATE psycopg's error carries for a FATAL ``code`` the server ended a
    connection with (None before psycopg 3.2.4: see PSYCOPG_KEEPS_FATAL_CODES)."""
    return code if PSYCOPG_KEEPS_FATAL_CODES else None


#: SQLAlchemy's async PostgreSQL drivers: asyncpg, and psycopg's ``AsyncConnection`` (what
#: ``create_async_engine("postgresql+psycopg://...")`` uses). A module runs its tests on both by
#: overriding conftest's ``async_driver`` with ``@pytest.fixture(params=ASYNC_DRIVERS)``.
ASYNC_DRIVERS = ("asyncpg", "psycopg")


def async_connect_args(driver: str, timeout: float) -> dict[str, Any]:
    """``connect_args`` for a connect timeout of ``timeout`` seconds on an async driver."""
    if driver == "asyncpg":
        return {"timeout": timeout}
    return {"connect_timeout": max(1, round(timeout))}  # libpq's: whole seconds


def server_settings_args(driver: str, **settings: str) -> dict[str, Any]:
    """``connect_args`` giving the session these server settings on an async driver."""
    if driver == "asyncpg":
        return {"server_settings": dict(settings)}
    return {"options": " ".join(f"-c {name}={value}" for name, value in settings.items())}


async def quick(session: AsyncSession) -> int:
    """A unit that only reads: the engine's connections still serve."""
    return int((await session.execute(sa.text("SELECT 42"))).scalar_one())


#: Codes raised through the real driver with RAISE ... USING ERRCODE, and their class. Not
#: 25006 (read_only_sql_transaction): raised by a server that takes writes (as these are) it is
#: the application's own read-only transaction, not transient (NOT_TRANSIENT below); a server
#: that takes none (``set_read_only_database``, a real standby) is what makes it a lost server
#: (test_classify_read_only.py, test_standby_mistake.py, test_failover.py).
TRANSIENT = {
    "40001": rdb.Outcome.CONFLICT,
    "40P01": rdb.Outcome.CONFLICT,
    "55P03": rdb.Outcome.CONFLICT,
    "57P03": rdb.Outcome.UNAVAILABLE,
    "53300": rdb.Outcome.UNAVAILABLE,
    "57P01": rdb.Outcome.DISCONNECT,
    "57P02": rdb.Outcome.DISCONNECT,  # crash_shutdown
    "57P05": rdb.Outcome.DISCONNECT,  # idle_session_timeout
    "08006": rdb.Outcome.DISCONNECT,
}
#: 08P01 (protocol_violation) answered on a sound connection: the server could not read the
#: client's message (test_classify_server_codes.py meets it for real)
NOT_TRANSIENT = ["23505", "22012", "42P01", "P0001", "57014", "25006", "08P01"]


class FakeClock:
    """A clock a test moves by hand (breakers' opening times, rate-limited lines)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def set_read_only_database(server: PostgresServer, database: str, read_only: bool) -> None:
    """Make ``database`` read-only by default (``default_transaction_read_only``), or take it
    back: what a server that takes no writes looks like to a client, for real (every write
    refused with 25006), without a standby. It holds for the sessions that start afterwards
    (whose driver the server tells at connect), not for those already open."""
    action = "SET" if read_only else "RESET"
    value = " = on" if read_only else ""
    server.execute(f'ALTER DATABASE "{database}" {action} default_transaction_read_only{value}')


#: ``SELECT raise_code('40001')`` raises exactly that SQLSTATE.
RAISE_CODE_FUNCTION = sa.text(
    "CREATE FUNCTION raise_code(code text) RETURNS void LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'raised %', code USING ERRCODE = code; END $$"
)


def first_attempt_raises(
    code: str, result: object = 1
) -> tuple[Callable[[Session], Any], list[int]]:
    """A unit whose first attempt raises SQLSTATE ``code`` on the server (``raise_code``, see
    RAISE_CODE_FUNCTION) and whose later ones return ``result``, and the list counting its
    attempts (cleared, the next attempt raises again)."""
    calls: list[int] = []

    def unit(session: Session) -> Any:
        calls.append(1)
        if len(calls) == 1:
            session.execute(sa.text(f"SELECT raise_code('{code}')"))
        return result

    return unit, calls


#: a ledger of what units wrote, by unit (``note`` for tests that say more)
LEDGER_TABLE = "CREATE TABLE ledger (id bigserial PRIMARY KEY, unit text NOT NULL, note text)"
#: fails with a serialization failure (40001, retried) without writing anything
SERIALIZATION_FAILURE_FUNCTION = (
    "CREATE FUNCTION serialization_failure() RETURNS void LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END $$"
)


def create_ledger(
    server: PostgresServer, database: str, *, markers: bool, also: tuple[str, ...] = ()
) -> str:
    """``database`` with the ledger, ``serialization_failure()``, the statements ``also``
    and (``markers``) the commit markers; returns ``database``."""
    engine = sa.create_engine(server.url(database))
    try:
        with engine.begin() as conn:
            for statement in (LEDGER_TABLE, SERIALIZATION_FAILURE_FUNCTION, *also):
                conn.exec_driver_sql(statement)
        if markers:
            rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    return database


#: a backoff of milliseconds with attempts enough to outlast a promotion, and the breaker on
#: with its default threshold and reset timeout: the breaker through a failover
BREAKER_THROUGH_FAILOVER = rdb.Config(
    initial_delay=0.01,
    max_delay=0.05,
    max_retries=400,
    deadline=30.0,
    failure_threshold=5,
    reset_timeout=30.0,
)


def set_up_database(server: PostgresServer, database: str, *statements: str, markers: bool) -> str:
    """``database`` with ``statements`` run (each may hold several, as one text) and
    (``markers``) the commit markers installed; returns ``database``."""
    if statements:
        with server.connect(database) as conn:
            for statement in statements:
                conn.execute(statement)
    if markers:
        engine = sa.create_engine(server.url(database))
        try:
            rdb.install_commit_markers(engine)
        finally:
            engine.dispose()
    return database


def metadata_engine(url: str, base: type[DeclarativeBase]) -> Iterator[sa.Engine]:
    """An engine on ``url`` with ``base``'s tables created, disposed of after (the body of a
    module's ``engine`` fixture whose models have a ``Base`` of their own)."""
    engine = sa.create_engine(url)
    base.metadata.create_all(engine)
    yield engine
    engine.dispose()


async def async_metadata_engine(
    url: str, base: type[DeclarativeBase]
) -> AsyncIterator[AsyncEngine]:
    """:func:`metadata_engine` of an async ``url`` (the body of a module's ``aengine``
    fixture)."""
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
    yield engine
    await engine.dispose()


def seeded_engine(url: str, base: type[DeclarativeBase], *seed: str) -> Iterator[sa.Engine]:
    """:func:`metadata_engine` with the ``seed`` statements run once its tables are made (the
    body of a module's ``engine`` fixture whose rows start in given states)."""
    for engine in metadata_engine(url, base):
        with engine.begin() as conn:
            for statement in seed:
                conn.exec_driver_sql(statement)
        yield engine


def statuses_by_id(engine: sa.Engine, table: str = "tasks") -> dict[int, str]:
    """``table``'s status by id, as stored."""
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(f"SELECT id, status FROM {table} ORDER BY id")).all())


def tasks_engine(url: str) -> Iterator[sa.Engine]:
    """An engine on ``url`` with the example's tasks schema, its transition trigger and
    :data:`RAISE_CODE_FUNCTION` (the body of a web module's ``direct`` fixture)."""
    from resilient_db.examples import tasks  # noqa: PLC0415 - only these tests need it

    for engine in metadata_engine(url, tasks.Base):
        rdb.install_transition_trigger(engine, tasks.Task)
        with engine.begin() as conn:
            conn.execute(RAISE_CODE_FUNCTION)
        yield engine


def waiting_on_lock(engine: sa.Engine, key: int) -> int:
    """Backends waiting for the advisory lock ``key`` (a test's units held up on the server)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND objid = :key AND NOT granted"
                ),
                {"key": key},
            ).scalar_one()
        )


def waiting_on_task_update(engine: sa.Engine) -> int:
    """Backends of ``engine``'s database waiting for a lock in an UPDATE of ``tasks`` (a flush
    or bulk UPDATE held up by another transaction's row lock)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE tasks%'"
                )
            ).scalar_one()
        )


def flush_behind(
    session: Session, winner: sa.Connection, engine: sa.Engine
) -> BaseException | None:
    """Flush ``session`` in a thread while ``winner`` (a transaction that changed the same rows)
    holds their locks: once the flush's UPDATE waits for them on the server, ``winner``
    commits. Returns what the flush raised (None: it went through)."""
    outcome: list[BaseException | None] = []

    def flush() -> None:
        try:
            session.flush()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=flush)
    thread.start()
    try:
        wait_for(
            lambda: waiting_on_task_update(engine) == 1 or not thread.is_alive(),
            "the UPDATE waiting on the row lock",
        )
        assert thread.is_alive(), outcome  # the flush's UPDATE waits for the winner
    finally:
        winner.commit()
        thread.join(timeout=60)
    assert not thread.is_alive()
    return outcome[0]


def ledger_rows(server: PostgresServer, database: str, unit: str) -> int:
    """Rows of the ledger written for ``unit``, read on a connection of the test's own."""
    found = server.execute(
        "SELECT count(*) FROM ledger WHERE unit = %s", params=(unit,), database=database
    )
    return int(found[0][0])


def assert_committed_once(
    engine: sa.Engine,
    pg_server: PostgresServer,
    database: str,
    service: str,
    commits: Callable[[Session, str], object],
) -> None:
    """A unit runs ``commits`` (given its session and the key of its ledger row), which
    commits the unit's work so far, then fails with a serialization failure: retried, were it
    replayable. It is not replayed, raises the failure, and its row is written once."""
    Sessions = rdb.ResilientSession(engine, service=service)
    unit = f"unit-{uuid.uuid4()}"
    calls = []

    def work(session: Session) -> None:
        calls.append(1)
        commits(session, unit)
        session.execute(sa.text("SELECT serialization_failure()"))

    with pytest.raises(sa.exc.OperationalError) as raised:
        Sessions.run(work)
    assert rdb.sqlstate_of(raised.value) == "40001"
    assert calls == [1], "replayed after it committed part of its work"
    assert ledger_rows(pg_server, database, unit) == 1


def driver_connection(session: Session) -> Any:
    """The driver's own connection under ``session``'s (psycopg's, for statements sent past
    SQLAlchemy)."""
    return session.connection().connection.driver_connection


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)


#: Test setup's own bypass of the transition trigger (as the superuser, unlogged): the setting
#: bound to the current transaction, as ``rdb.bypass_transitions`` sets it.
BYPASS_BY_HAND = (
    "SELECT set_config('resilient_db.bypass_transitions', pg_current_xact_id()::text, true)"
)


class MoveFirst:
    """Another transaction moves a row (and commits) just before this session's UPDATE of it is
    sent: after the flush guard has checked the move, so only a compare-and-set carried by the
    UPDATE itself can notice. ``watched`` is the (sync) engine whose UPDATE is awaited,
    ``other`` the engine the move runs on (the same one for sync tests). The other transaction
    gives up after 2 s if the row is locked."""

    def __init__(self, watched: sa.Engine, other: sa.Engine, sql: str, **params: Any) -> None:
        self.engine, self.other, self.sql, self.params = watched, other, sql, params
        self.done = False
        event.listen(watched, "before_cursor_execute", self._before)

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.done or not statement.lstrip().upper().startswith("UPDATE"):
            return
        self.done = True
        with self.other.connect() as other:
            other.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            other.exec_driver_sql(BYPASS_BY_HAND)
            other.execute(sa.text(self.sql), self.params)
            other.commit()

    def __enter__(self) -> MoveFirst:
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)


def conflict_after_another_factorys_unit(
    outer_url: str, service: str, inner: Callable[[], Any]
) -> int:
    """Run a unit of a psycopg 3 factory on ``outer_url`` that runs ``inner()`` (a unit of
    another factory: it commits on its own) and then meets a serialization failure. The failure
    must be raised, not replayed: a replay would run ``inner`` and write again. Returns how many
    times the outer unit ran."""
    outer_engine = sa.create_engine(outer_url)
    Outer = rdb.ResilientSession(outer_engine, service=f"{service}-outer")
    calls: list[int] = []

    def unit(session: Any) -> None:
        calls.append(1)
        inner()
        session.execute(
            sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
        )

    try:
        with pytest.raises(sa.exc.OperationalError):
            Outer.run(unit)
    finally:
        outer_engine.dispose()
    return len(calls)


def refuse_moves_every_way(engine: sa.Engine, service: str, *, trigger: bool = False) -> None:
    """Illegal status moves refused on every path, on a real server, for the counting tests:
    a bulk UPDATE whose filter leaves 4 rows unchanged, one by primary key with 1 parameter set
    skipped, a bulk UPDATE refused in raise mode naming 4 rows, a flush (1), with ``trigger``
    the database trigger (1), and a stale flush (counted apart). Blocked: 10, or 11 with the
    trigger; filtered: 5; stale: 1."""
    from resilient_db.examples.tasks import Task  # noqa: PLC0415 - only these tests need it

    statuses = ["pending", "pending", "completed", "completed", "cancelled", "failed"]
    with engine.begin() as conn:
        p1, p2, c1, c2, _, _ = conn.execute(
            sa.insert(Task).returning(Task.id, sort_by_parameter_order=True),
            [{"idem_key": str(uuid.uuid4()), "title": "t", "status": s} for s in statuses],
        ).scalars()
    if trigger:
        rdb.install_transition_trigger(engine, Task)  # the guard in the database too
    Filtering = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    Raising = rdb.ResilientSession(engine, service=service, config=rdb.Config(bulk_update="raise"))

    def start_all(session: Session) -> int:
        result = session.execute(sa.update(Task).values(status="in_progress"))
        return int(result.rowcount)  # type: ignore[attr-defined]

    assert Filtering.run(start_all) == 2  # p1, p2; c1, c2, cancelled, failed left unchanged

    def by_key(session: Session) -> None:  # c1 may not start again; p2 may complete
        session.execute(
            sa.update(Task),
            [{"id": c1, "status": "in_progress"}, {"id": p2, "status": "completed"}],
        )

    Filtering.run(by_key)
    with engine.connect() as conn:
        now = dict(conn.execute(sa.select(Task.id, Task.status)).all())
    assert (now[p1], now[p2], now[c1]) == ("in_progress", "completed", "completed")

    def reopen_all(session: Session) -> None:  # p2, c1, c2, cancelled may not: 4 rows named
        session.execute(sa.update(Task).where(Task.status != "failed").values(status="pending"))

    with pytest.raises(rdb.IllegalTransitionError):
        Raising.run(reopen_all)

    def restart(session: Session) -> None:
        task = session.get(Task, c2)
        assert task is not None
        task.status = "in_progress"

    with pytest.raises(rdb.IllegalTransitionError):
        Filtering.run(restart)

    if trigger:

        def raw_reopen(session: Session) -> None:  # past the ORM: the trigger refuses it
            session.execute(
                sa.text("UPDATE tasks SET status = 'pending' WHERE id = :id"), {"id": c2}
            )

        with pytest.raises(rdb.IllegalTransitionError):
            Filtering.run(raw_reopen)

    def finish_moved(session: Session) -> None:
        task = session.get(Task, p1)
        assert task is not None
        with other.begin() as conn:  # another transaction moves it meanwhile
            conn.execute(sa.update(Task.__table__).where(Task.id == p1).values(status="failed"))
        task.status = "completed"  # legal from the state loaded

    other = sa.create_engine(engine.url)
    try:
        with pytest.raises(rdb.StaleTransitionError):
            Filtering.run(finish_moved)
    finally:
        other.dispose()


def on_event_loop() -> bool:
    """Whether the caller runs on an event loop (in a coroutine or a callback of one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def refused_by_trigger(conn: sa.Connection, statement: Any) -> rdb.IllegalTransitionError:
    """Run ``statement`` (SQL text as psql would send it, or a SQLAlchemy statement) on
    ``conn``, expect the transition trigger to refuse it, roll back, and give the refusal as
    the session maps it back (``IllegalTransitionError(via="db")``)."""
    run = conn.exec_driver_sql if isinstance(statement, str) else conn.execute
    with pytest.raises(sa.exc.DBAPIError) as info:
        run(statement)
    conn.rollback()
    err = exception_from_db(info.value)
    assert err is not None, f"not mapped: {info.value!r}"
    return err


def assert_breaker_untouched(service: str) -> None:
    """``service``'s breaker counted no failure and its units retried nothing."""
    health = rdb.health()["services"][service]
    assert health["breaker"]["state"] == "closed"
    assert health["breaker"]["failures"] == 0
    counters = health["counters"]
    assert (counters["retries"], counters["gave_up"], counters["breaker_opens"]) == (0, 0, 0)
    assert counters["retries_by_class"] == {}


class FailingStorage(pybreaker.CircuitMemoryStorage):
    """A ``breaker_storage`` whose state can't be read once ``down`` (an unreachable store,
    whose error's text holds a secret: what is said of it must not show it). Set ``down``
    back to False after the test: the factory given it lives on until Python's next full
    collection, and a later test's ``reload_config()`` reads it."""

    def __init__(self) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self.down = False

    @property
    def state(self) -> str:
        if self.down:
            raise ConnectionError("store unreachable: password=hunter2")
        return str(super().state)

    @state.setter
    def state(self, value: str) -> None:
        pybreaker.CircuitMemoryStorage.state.fset(self, value)  # type: ignore[attr-defined]


def held_and_released(
    proxy: FaultProxy,
    *,
    keep_server: bool = False,
    ended_first: Callable[[], object] | None = None,
) -> threading.Thread:
    """Release the COMMIT the proxy holds once it holds one more than now (bounded: about
    10 s); ``keep_server``: its server connection stays, for ``deliver_late_commits``;
    ``ended_first``: called before the release (the held transaction ended on the server, so
    that no check of the client's can find it still open)."""
    before = proxy.commits_swallowed

    def release() -> None:
        for _ in range(200):
            if proxy.commits_swallowed > before:
                try:
                    if ended_first is not None:
                        ended_first()
                finally:  # released whatever happened: the client never waits for ever
                    proxy.release_swallowed(keep_server=keep_server)
                return
            threading.Event().wait(0.05)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def otel_points(reader: Any, name: str) -> dict[tuple[tuple[str, Any], ...], int]:
    """The OpenTelemetry counter ``name``'s values by their attributes, as ``reader`` (an SDK
    metric reader) has them."""
    found: dict[tuple[tuple[str, Any], ...], int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        found[tuple(sorted(point.attributes.items()))] = int(point.value)
    return found


def assert_unknown_outcome(exc: BaseException) -> None:
    """``exc`` is an unknown commit outcome: not transient, and the web layer's 500
    ``commit-outcome-unknown`` without a ``Retry-After``."""
    from resilient_db.web import problem_details  # noqa: PLC0415 - the web extra

    assert rdb.classify(exc) is rdb.Outcome.COMMIT_UNKNOWN
    assert not rdb.is_transient(exc)
    problem = problem_details(exc)
    assert problem is not None
    assert (problem.status, problem.body["type"]) == (
        500,
        "urn:resilient-db:problem:commit-outcome-unknown",
    )
    assert "Retry-After" not in problem.headers


_SQLALCHEMY = tuple(int(n) for n in sa.__version__.split(".")[:3] if n.isdigit())

#: SQLAlchemy's pool takes back a connection whose reset on its return (its rollback, a
#: ``reset`` listener) an interruption cut off (a cancellation, ``KeyboardInterrupt``) from
#: 2.0.56 and 2.1.6 on (sqlalchemy#13699); earlier releases invalidate it and leave it checked
#: out, until the collector frees what held it (the interruption's traceback)
POOL_TAKES_BACK_A_CUT_RESET = _SQLALCHEMY >= (2, 1, 6) or (2, 0, 56) <= _SQLALCHEMY < (2, 1)

#: what SQLAlchemy's pool logs (ERROR) of a connection whose reset on its return failed
RESET_FAILED = "Exception during reset or similar"


def assert_pool_took_all_back(pool: Any, caplog: pytest.LogCaptureFixture) -> None:
    """``pool`` (an engine's) counts none of its connections checked out: each one a unit or
    a block took was handed back to it, its close run to its end. Also when an interruption
    cut off the reset of one as it was handed back (where a cancellation lands as a COMMIT
    returns, psycopg yielding to the event loop in the reset once the loop was busy 5 ms: a
    loaded machine): with SQLAlchemy before 2.0.56 and 2.1.6 (POOL_TAKES_BACK_A_CUT_RESET)
    the pool counts such a connection checked out still; the library handed it back (the
    pool's error line says so, once per connection), the count is SQLAlchemy's."""
    checked_out = pool.checkedout()
    if POOL_TAKES_BACK_A_CUT_RESET:
        assert checked_out == 0
        return
    cut = sum(RESET_FAILED in record.getMessage() for record in caplog.records)
    assert checked_out <= cut, f"{checked_out} checked out, {cut} of them cut off in a reset"


def notifications(listener: psycopg.Connection[Any], *, more: float = 0.5) -> list[str]:
    """The payloads a listening connection received: the first one waited for (bounded: a
    loaded machine may deliver it well after the notifying COMMIT), then any others arriving
    within ``more`` seconds of it (a replay's duplicate is committed before the unit returns)."""
    received = [n.payload for n in listener.notifies(timeout=30, stop_after=1)]
    assert received, "no notification within 30 s"
    return received + [n.payload for n in listener.notifies(timeout=more)]


def add_expired_markers(server: PostgresServer | StandbyPair, database: str, count: int) -> None:
    """``count`` commit markers 20 minutes old, and one of now (ages are judged against the
    newest): expired ones for a prune to delete (a pair's: on its primary)."""
    server.execute(
        "INSERT INTO resilient_db.commit_markers (id) VALUES (%s)",
        params=[uuid.UUID(_commit.marker_id())],
        database=database,
    )
    server.execute(
        "INSERT INTO resilient_db.commit_markers (id) SELECT (lpad(to_hex(floor(extract("
        "epoch FROM now() - interval '20 minutes') * 1000)::bigint), 12, '0') || '7' || "
        "substr(md5(g::text), 1, 3) || '8' || substr(md5(g::text), 4, 15))::uuid "
        "FROM generate_series(1, %s) g",
        params=[count],
        database=database,
    )


def expired_markers(server: PostgresServer | StandbyPair, database: str) -> int:
    """How many commit markers a prune would delete now (a pair's: on its primary)."""
    horizon = _commit._NEWEST_HORIZON_SQL.format(s=_commit.SCHEMA, ms=int(_commit.RETENTION * 1000))
    rows = server.execute(
        f"SELECT count(*) FROM resilient_db.commit_markers WHERE id < {horizon}",
        database=database,
    )
    return int(rows[0][0])


def install_markers(server: PostgresServer, database: str) -> None:
    """The commit markers installed in ``database`` (an engine of its own, disposed of)."""
    engine = sa.create_engine(server.url(database), poolclass=sa.NullPool)
    try:
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()


def in_no_transaction(engine: sa.Engine, pid: int) -> bool:
    """Whether backend ``pid`` has no transaction open (ended, or the backend gone). Asked on
    a connection of ``engine``'s pool, which may be ``pid``'s own once its transaction ended
    and it went back there: its transaction is then the question's (not one left open)."""
    with engine.connect() as conn:
        return not conn.scalar(
            sa.text(
                "SELECT EXISTS (SELECT FROM pg_stat_activity"
                " WHERE pid = :p AND pid <> pg_backend_pid() AND xact_start IS NOT NULL)"
            ),
            {"p": pid},
        )


# -- the commit-protocol tests' ledger (tests/test_commit_protocol.py and its async twin) ----


def busy_backends(server: PostgresServer, database: str) -> int:
    """Client backends of ``database`` inside a transaction (the harness's own are left out)."""
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = "
        "'client backend' AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
        params=(database,),
    )
    return int(rows[0][0])


def commit_another_transaction(server: PostgresServer, database: str) -> str:
    """Another client writes and commits; returns its xid."""
    with psycopg.connect(server.conninfo(database)) as other:
        other.execute("INSERT INTO ledger (unit, note) VALUES ('other', 'takes the next xid')")
        row = other.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        return str(row[0])


def flush_wal(server: PostgresServer, database: str) -> None:
    """Commit a transaction that writes a row: its COMMIT makes every WAL record before it
    durable, so nothing written earlier (a rolled-back transaction's abort record, which the WAL
    writer flushes on its own time, with the rest of its WAL page) is left to take the unit's
    WAL along in the window where it must stay in memory. A row, not only an xid: the COMMIT of
    a transaction that wrote no WAL of its own is not waited for (PostgreSQL 15 leaves its
    commit record in memory, and after the crash gives its xid again, the unit's xid going to
    no one)."""
    server.execute(
        "INSERT INTO ledger (unit, note) VALUES ('flush_wal', 'makes the WAL before it durable')",
        database=database,
    )


# -- synchronous replication switched on and off by a test ---------------------------------------

#: a COMMIT that waits for a synchronous standby and touches no table: a transactional logical
#: message writes WAL and takes an xid (a COMMIT that wrote no WAL waits for no standby)
_PROBE = "SELECT pg_catalog.pg_logical_emit_message(true, 'resilient_db_tests', 'probe')"
_CANCEL_ITS_WAIT = (
    "SELECT pg_catalog.pg_cancel_backend(pid) FROM pg_catalog.pg_stat_activity "
    "WHERE pid = %s AND wait_event = 'SyncRep'"
)


def set_synchronous_standby_names(
    server: PostgresServer, names: str | None, timeout: float = 10.0
) -> None:
    """``ALTER SYSTEM`` ``synchronous_standby_names`` to ``names`` (None: reset it), reload,
    and return once COMMITs on ``server`` follow it: named standbys that are not there, once a
    probe's COMMIT is seen waiting for them (its wait then cancelled: committed on ``server``
    alone); reset, once a probe's COMMIT ends on its own.

    ``pg_reload_conf()`` only signals the server; each process reads the file in its own time,
    and whether a COMMIT waits is the checkpointer's reading (a flag it shares), not the
    committing backend's: a new connection's ``SHOW`` can give the new names while COMMITs
    don't wait yet (seen with the checkpointer held a moment, as a loaded machine holds it)."""
    if names is None:
        server.execute("ALTER SYSTEM RESET synchronous_standby_names")
    else:
        server.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
    server.execute("SELECT pg_catalog.pg_reload_conf()")
    deadline = time.monotonic() + timeout
    if names is None:
        # a COMMIT that waits now is released when the checkpointer reads the reset
        assert not _a_probe_commit_waits(server, deadline, cancel=False), (
            "COMMITs still wait for a standby after synchronous_standby_names was reset"
        )
        return
    while not _a_probe_commit_waits(server, deadline, cancel=True):
        assert time.monotonic() < deadline, f"no COMMIT waited for standby {names!r}"
        time.sleep(0.02)


def _a_probe_commit_waits(server: PostgresServer, deadline: float, *, cancel: bool) -> bool:
    """Whether a probe's COMMIT on ``server`` waits for a synchronous standby: with
    ``cancel``, True once it is seen waiting (its wait cancelled), False if it ended first;
    without, True if it still waits at ``deadline`` (then cancelled)."""
    with server.connect() as probe:
        pid = probe.info.backend_pid
        committing = threading.Thread(target=probe.execute, args=(_PROBE,), daemon=True)
        committing.start()
        try:
            if not cancel:
                committing.join(max(0.0, deadline - time.monotonic()))
                if committing.is_alive():
                    server.execute("SELECT pg_catalog.pg_cancel_backend(%s)", params=(pid,))
                    return True
                return False
            while committing.is_alive():
                if server.execute(_CANCEL_ITS_WAIT, params=(pid,)):
                    return True
                assert time.monotonic() < deadline, "a probe's COMMIT neither waited nor ended"
                time.sleep(0.02)
            return False
        finally:
            committing.join(10)


def disposing(
    engine: sa.Engine | AsyncEngine,
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """An app's lifespan that disposes of ``engine`` at its shutdown (an async engine on the
    loop its connections were made on: the server's, in ``served``)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        else:
            engine.dispose()

    return lifespan


@contextlib.contextmanager
def served(app: Any, *, root_path: str = "") -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 from a thread, for what only a real server shows
    (a body cut after its headers, a client that leaves mid-stream, a proxy's path prefix as
    ``--root-path``); yields its base URL. Its errors are logged to ``uvicorn.error``, which
    propagates (``log_config=None``: the process's logging is left as it is). The app's
    lifespan runs: its shutdown is where an async engine made for it is disposed of, on the
    loop its connections were made on."""
    import uvicorn  # noqa: PLC0415 - the web extra

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(
        app, lifespan="on", loop="none", log_config=None, access_log=False, root_path=root_path
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
