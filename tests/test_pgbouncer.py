"""Units of work behind a real PgBouncer, in transaction and session pooling, under real faults.

Each test starts its own ``pgbouncer`` (on 127.0.0.1 and a free port, its files in a directory of
its own) in front of the test's database, and stops it afterwards, failed or not. The binary is
``RESILIENT_DB_TEST_PGBOUNCER``, else ``pgbouncer`` on ``PATH``, else ``/usr/sbin/pgbouncer``
(Debian's package); without one the module is skipped, saying so: ``make test`` needs no
system package. PgBouncer runs as the embedded server's OS user when the tests run as root (it
refuses to run as root).

The commit markers are installed through a direct connection and used through PgBouncer, with
the pooler announced as the units-of-work reference says (psycopg ``prepare_threshold=None``,
asyncpg ``statement_cache_size=0``): the marker's INSERT travels inline with the COMMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from processes import wait_for
from scenarios import ASYNCPG_KEEPS_FATAL_CODES, fatal_code
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.examples import tasks
from resilient_db.testing import FaultProxy, PostgresServer, StandbyPair, free_port

#: where Debian's package puts it (``/usr/sbin`` is not on every user's PATH)
_DEBIAN_BINARY = "/usr/sbin/pgbouncer"
#: the OS user PgBouncer runs as when the tests run as root (the embedded server's)
_OS_USER = "embedded_postgres"
_START_TIMEOUT = 10.0


def pgbouncer_binary() -> str | None:
    """The ``pgbouncer`` to run, or None when there is none."""
    given = os.environ.get("RESILIENT_DB_TEST_PGBOUNCER", "").strip()
    if given:
        return given
    found = shutil.which("pgbouncer")
    if found is not None:
        return found
    return _DEBIAN_BINARY if os.access(_DEBIAN_BINARY, os.X_OK) else None


_BINARY = pgbouncer_binary()
pytestmark = [
    pytest.mark.skipif(
        _BINARY is None,
        reason="needs a pgbouncer binary (apt-get install pgbouncer, or name one in "
        "RESILIENT_DB_TEST_PGBOUNCER; .ci/run installs it where apt works)",
    ),
    pytest.mark.usefixtures("no_backoff"),
]

#: the pooler announced: nothing prepared (psycopg, sync and async; asyncpg)
PSYCOPG_ARGS: dict[str, Any] = {"prepare_threshold": None}
ASYNCPG_ARGS: dict[str, Any] = {"statement_cache_size": 0}
DRIVER_ARGS = {"psycopg": PSYCOPG_ARGS, "asyncpg": ASYNCPG_ARGS}
#: retries enough to outlast a restart (no backoff: the pooler holds a query while it waits
#: for its server), bounded by the deadline
CONFIG = rdb.Config(max_retries=200, deadline=30.0, failure_threshold=1000)


class PgBouncer:
    """A ``pgbouncer`` process in front of ``server``'s ``database``, on 127.0.0.1."""

    def __init__(self, server: PostgresServer, database: str, **settings: object) -> None:
        assert _BINARY is not None
        self.server, self.database = server, database
        #: the server its database entry points at (see :meth:`point_at`)
        self.target = server
        self.port = free_port()
        self.password = sa.make_url(server.url()).password
        self.settings = {
            "pool_mode": "transaction",
            "default_pool_size": 3,
            # a failed server login keeps clients out this long (15 s by default)
            "server_login_retry": 1,
            **settings,
        }
        self.dir = Path(tempfile.mkdtemp(prefix="resilient-db-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_files()

    def _write_files(self) -> None:
        lines = [
            "[databases]",
            f"{self.database} = host={self.target.host} port={self.target.port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.dir / 'userlist.txt'}",
            f"admin_users = {self.server.user}",
            # asyncpg and psycopg send these at connect
            "ignore_startup_parameters = extra_float_digits,options",
            *(f"{name} = {value}" for name, value in self.settings.items()),
        ]
        (self.dir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        userlist = self.dir / "userlist.txt"
        userlist.write_text(f'"{self.server.user}" "{self.password}"\n')
        userlist.chmod(0o600)
        if os.geteuid() == 0:  # it refuses to run as root: as the server's OS user
            user = pwd.getpwnam(_OS_USER)
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)

    def start(self) -> None:
        """Start it; return once it accepts connections (bounded)."""
        assert _BINARY is not None
        command = [_BINARY, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            command[1:1] = ["-u", _OS_USER]
        with open(self.dir / "stderr.log", "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"pgbouncer exited at start:\n{self.log()}") from None
                assert time.monotonic() < deadline, f"pgbouncer did not listen:\n{self.log()}"
                time.sleep(0.01)  # (polling a start, not a backoff)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL), bounded."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "stderr.log").read_text(errors="replace")[-4000:]
        return ""

    def url(self, driver: str = "psycopg") -> str:
        return self.server.url_at("127.0.0.1", self.port, self.database, driver=driver)

    def point_at(self, server: PostgresServer) -> None:
        """Point the database entry at ``server`` (``RELOAD``), and have every server
        connection made again as it is released (``RECONNECT``): the client connections stay,
        with the server settings of their login."""
        self.target = server
        self._write_files()
        self.admin("RELOAD")
        self.admin(f"RECONNECT {self.database}")

    def admin(self, command: str) -> None:
        """A command on PgBouncer's admin console (``PAUSE``, ``KILL db``, ...)."""
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname="pgbouncer",
            user=self.server.user,
            password=self.password,
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=5,
        ) as conn:
            conn.execute(command)


@pytest.fixture
def database(pg_server: PostgresServer, pg_database: str) -> str:
    """The test's database with the example's tasks (its trigger too), a ledger and the
    commit markers, set up through a direct connection."""
    engine = sa.create_engine(pg_server.url(pg_database), poolclass=sa.NullPool)
    try:
        tasks.Base.metadata.create_all(engine)
        rdb.install_transition_trigger(engine, tasks.Task)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE ledger (id uuid PRIMARY KEY)")
            # a COMMIT that waits for advisory lock 42 (a row with hold = true): a test kills
            # its backend, or lets it through, while it runs
            conn.exec_driver_sql(
                "ALTER TABLE ledger ADD COLUMN hold boolean NOT NULL DEFAULT false;"
                "CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM pg_advisory_xact_lock(42); RETURN NULL; END $$;"
                "CREATE CONSTRAINT TRIGGER hold AFTER INSERT ON ledger DEFERRABLE INITIALLY "
                "DEFERRED FOR EACH ROW WHEN (NEW.hold) EXECUTE FUNCTION hold()"
            )
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    return pg_database


@pytest.fixture
def bouncer_factory(pg_server: PostgresServer, database: str) -> Iterator[Callable[..., PgBouncer]]:
    made: list[PgBouncer] = []

    def make(**settings: object) -> PgBouncer:
        bouncer = PgBouncer(pg_server, database, **settings)
        made.append(bouncer)
        bouncer.start()
        return bouncer

    try:
        yield make
    finally:
        for bouncer in made:
            bouncer.close()


@pytest.fixture(params=["transaction", "session"])
def bouncer(request: pytest.FixtureRequest, bouncer_factory: Callable[..., PgBouncer]) -> PgBouncer:
    return bouncer_factory(pool_mode=request.param)


@pytest.fixture
def txn_bouncer(bouncer_factory: Callable[..., PgBouncer]) -> PgBouncer:
    return bouncer_factory()


def count(server: PostgresServer, database: str, sql: str) -> int:
    return int(server.execute(sql, database=database)[0][0])


def markers(server: PostgresServer, database: str) -> int:
    return count(server, database, "SELECT count(*) FROM resilient_db.commit_markers")


def ledger(server: PostgresServer, database: str) -> int:
    return count(server, database, "SELECT count(*) FROM ledger")


def write(session: Session, hold: bool = False) -> str:
    session.execute(
        sa.text("INSERT INTO ledger (id, hold) VALUES (:i, :h)"), {"i": uuid.uuid4(), "h": hold}
    )
    return "written"


def waiting_for_lock_42(server: PostgresServer, database: str) -> bool:
    return bool(
        count(
            server,
            database,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 42 "
            "AND NOT granted",
        )
    )


# ---- the units, through the pooler ------------------------------------------------------------


def test_units_through_pgbouncer_sync(
    bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str
) -> None:
    """Writes, guarded writes (the flush guard and the trigger), a nested unit and drop-in use,
    through PgBouncer: each writing unit's marker went in with its COMMIT."""
    engine = sa.create_engine(bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    try:
        before = markers(pg_server, database)

        def create(session: Session, key: str) -> int:
            task = tasks.create_task(session, title="t", idem_key=key)
            session.flush()
            return task.id

        def move(session: Session, task_id: int, to: str) -> str:
            task = session.get_one(tasks.Task, task_id)
            tasks.move_task(session, task, to, idem_key=str(uuid.uuid4()))
            return task.status

        ids = [Sessions.run(create, str(uuid.uuid4())) for _ in range(3)]
        assert [Sessions.run(move, i, "in_progress") for i in ids] == ["in_progress"] * 3
        with pytest.raises(rdb.IllegalTransitionError) as flushed:
            Sessions.run(move, ids[0], "cancelled")
        assert flushed.value.via == "flush"
        with pytest.raises(rdb.IllegalTransitionError) as by_trigger:
            Sessions.run(
                lambda s: s.execute(
                    sa.text("UPDATE tasks SET status = 'cancelled' WHERE id = :i"), {"i": ids[1]}
                )
            )
        assert by_trigger.value.via == "db"

        def outer(session: Session) -> int:
            write(session)
            return Sessions.run(lambda inner: inner.execute(sa.text("SELECT 1")).scalar_one())

        assert Sessions.run(outer) == 1
        with Sessions.begin() as session:  # drop-in, outside run()
            write(session)
        with Sessions() as session:
            assert session.execute(sa.text("SELECT count(*) FROM ledger")).scalar_one() == 2
        # run()'s writing units: 3 creations, 3 moves, the outer unit (the drop-in COMMIT
        # carries none)
        assert markers(pg_server, database) - before == 7
        assert ledger(pg_server, database) == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_units_through_pgbouncer_async(
    bouncer: PgBouncer,
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
) -> None:
    engine = create_async_engine(bouncer.url(driver), connect_args=DRIVER_ARGS[driver])
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
    try:
        before = markers(pg_server, database)

        async def create(session: AsyncSession) -> int:
            task = tasks.create_task(session, title="t", idem_key=str(uuid.uuid4()))
            await session.flush()
            return task.id

        async def move(session: AsyncSession, task_id: int, to: str) -> str:
            task = await session.get_one(tasks.Task, task_id)
            tasks.move_task(session, task, to, idem_key=str(uuid.uuid4()))
            return task.status

        task_id = await Sessions.run(create)
        assert await Sessions.run(move, task_id, "in_progress") == "in_progress"
        with pytest.raises(rdb.IllegalTransitionError):
            await Sessions.run(move, task_id, "cancelled")

        async def outer(session: AsyncSession) -> int:
            await session.run_sync(write)

            async def inner(nested: AsyncSession) -> int:
                return int((await nested.execute(sa.text("SELECT 1"))).scalar_one())

            return await Sessions.run(inner)

        assert await Sessions.run(outer) == 1
        async with Sessions.begin() as session:
            await session.run_sync(write)
        # run()'s writing units (the drop-in COMMIT carries none)
        assert markers(pg_server, database) - before == 3
        assert ledger(pg_server, database) == 2
    finally:
        await engine.dispose()


# ---- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["mid-unit", "between units"])
def test_backend_killed_behind_pgbouncer(
    bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str, where: str
) -> None:
    """The backend behind PgBouncer terminated: mid-unit the unit is replayed once (its
    error, 57P01 passed on by PgBouncer, a disconnect); between units the next one runs."""
    engine = sa.create_engine(bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    attempts: list[int] = []

    def unit(session: Session) -> str:
        attempts.append(1)
        session.execute(sa.text("SELECT 1"))
        if where == "mid-unit" and len(attempts) == 1:
            assert pg_server.terminate_backends(database=database) >= 1
        return write(session)

    try:
        Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))
        if where == "between units":
            assert pg_server.terminate_backends(database=database) >= 1
        assert Sessions.run(unit) == "written"
        if where == "mid-unit":
            assert len(attempts) == 2
        else:
            # the pooled client connection is found dead at checkout once PgBouncer has closed
            # it (session pooling closes the client whose server connection died: a moment
            # after the kill); checked out before that, its first statement fails as a
            # disconnect and the unit is replayed, once
            assert len(attempts) in (1, 2), attempts
        assert ledger(pg_server, database) == 1
    finally:
        engine.dispose()


def test_pgbouncer_kill_mid_unit_is_a_disconnect(
    txn_bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str
) -> None:
    """``KILL db`` on the admin console mid-unit: PgBouncer closes the client with 08P01
    (FATAL), a disconnect: the unit is replayed once PgBouncer resumes."""
    engine = sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []

    def unit(session: Session) -> str:
        attempts.append(1)
        session.execute(sa.text("SELECT 1"))
        if len(attempts) == 1:
            txn_bouncer.admin(f"KILL {database}")
            txn_bouncer.admin(f"RESUME {database}")
        return write(session)

    rdb.add_hook(seen.append)
    try:
        assert Sessions.run(unit) == "written"
    finally:
        rdb.remove_hook(seen.append)
        engine.dispose()
    assert len(attempts) == 2
    retries = [e.fields for e in seen if e.name == "retry"]
    assert [(f["sqlstate"], f["outcome"]) for f in retries] == [
        (fatal_code("08P01") or "none", "disconnect")
    ]
    assert ledger(pg_server, database) == 1


def test_query_wait_timeout_is_a_disconnect(
    bouncer_factory: Callable[..., PgBouncer], service: str
) -> None:
    """A paused database past ``query_wait_timeout``: PgBouncer's FATAL 08P01, a disconnect
    (replayed while retries last), raised as it is when they run out."""
    bouncer = bouncer_factory(query_wait_timeout=1)
    engine = sa.create_engine(bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=0, failure_threshold=1000)
    )
    try:
        Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))
        bouncer.admin(f"PAUSE {bouncer.database}")
        with pytest.raises(sa.exc.OperationalError) as raised:
            Sessions.run(write)
        assert rdb.sqlstate_of(raised.value) == fatal_code("08P01")
        assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
        bouncer.admin(f"RESUME {bouncer.database}")
        assert Sessions.run(write) == "written"
    finally:
        engine.dispose()


def test_max_client_conn_is_a_disconnect(
    bouncer_factory: Callable[..., PgBouncer], service: str
) -> None:
    """A connect past ``max_client_conn``: PgBouncer refuses it (FATAL 08P01 while
    connecting), a disconnect; the unit runs once a client connection is free."""
    bouncer = bouncer_factory(max_client_conn=1)
    engine = sa.create_engine(bouncer.url(), connect_args=PSYCOPG_ARGS, poolclass=sa.NullPool)
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=0, failure_threshold=1000)
    )
    holder = psycopg.connect(bouncer.url(driver=""))
    try:
        with pytest.raises(sa.exc.OperationalError) as raised:
            Sessions.run(write)
        # (libpq reports a refusal while connecting without its SQLSTATE)
        assert "max_client_conn" in str(raised.value)
        assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
        holder.close()
        assert Sessions.run(write) == "written"
    finally:
        holder.close()
        engine.dispose()


def pool_said_nothing(caplog: pytest.LogCaptureFixture, service: str) -> None:
    """No ``Replacing the pooled connections`` line, no ``pool_invalidations``."""
    events = [getattr(r, "self_heal", {}).get("event") for r in caplog.records]
    assert "pool_invalidated" not in events, [r.getMessage() for r in caplog.records]
    assert rdb.health()["services"][service]["counters"]["pool_invalidations"] == 0


def test_max_client_conn_refusal_keeps_the_pooled_connections_sync(
    bouncer_factory: Callable[..., PgBouncer], service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A new connection refused past ``max_client_conn`` while the pool's sound connections
    are in use (a disconnect: see above) replaces none of them: SQLAlchemy's path for an error
    without a connection leaves the pool as it is (no ``invalidate_pool_on_disconnect``
    there), and nothing is said of the pool. Once returned, the same client connections are
    handed out again: no reconnect each (at ``max_client_conn``, a storm of them)."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    bouncer = bouncer_factory(max_client_conn=3)
    engine = sa.create_engine(bouncer.url(), connect_args=PSYCOPG_ARGS, pool_size=2, max_overflow=1)
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=0, failure_threshold=1000)
    )
    try:
        held = [engine.connect() for _ in range(2)]
        pooled = [conn.connection.driver_connection for conn in held]
        # the third client fills PgBouncer: the unit needs a third one
        with (
            psycopg.connect(bouncer.url(driver="")),
            pytest.raises(sa.exc.OperationalError) as raised,
        ):
            Sessions.run(lambda s: s.execute(sa.text("SELECT 1")))
        assert "max_client_conn" in str(raised.value)
        assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
        for conn in held:
            conn.close()
        held = [engine.connect() for _ in range(2)]
        again = [conn.connection.driver_connection for conn in held]
        assert {id(c) for c in again} == {id(c) for c in pooled}  # (both alive: ids unique)
        assert [conn.exec_driver_sql("SELECT 1").scalar() for conn in held] == [1, 1]
        for conn in held:
            conn.close()
        pool_said_nothing(caplog, service)
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_max_client_conn_refusal_keeps_the_pooled_connections_async(
    bouncer_factory: Callable[..., PgBouncer],
    service: str,
    caplog: pytest.LogCaptureFixture,
    *,
    driver: str,
) -> None:
    """As above, on the async drivers (asyncpg reports the refusal's 08P01, which the engine's
    hooks take for a disconnect while connecting)."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    bouncer = bouncer_factory(max_client_conn=3)
    engine = create_async_engine(
        bouncer.url(driver), connect_args=DRIVER_ARGS[driver], pool_size=2, max_overflow=1
    )
    Sessions = rdb.AsyncResilientSession(
        engine, service=service, config=rdb.Config(max_retries=0, failure_threshold=1000)
    )

    async def drivers(held: list[Any]) -> list[Any]:
        return [(await conn.get_raw_connection()).driver_connection for conn in held]

    async def select_1(session: AsyncSession) -> Any:
        return (await session.execute(sa.text("SELECT 1"))).scalar()

    try:
        held = [await engine.connect() for _ in range(2)]
        pooled = await drivers(held)
        # the third client fills PgBouncer: the unit needs a third one
        # (SQLAlchemy 2.0, 2.0.59 too, lets asyncpg's error at connect through unwrapped;
        # 2.1 wraps it)
        refused = (sa.exc.DBAPIError, asyncpg.PostgresError)
        with psycopg.connect(bouncer.url(driver="")), pytest.raises(refused) as raised:
            await Sessions.run(select_1)
        assert "max_client_conn" in str(raised.value)
        assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
        for conn in held:
            await conn.close()
        held = [await engine.connect() for _ in range(2)]
        again = await drivers(held)
        assert {id(c) for c in again} == {id(c) for c in pooled}  # (both alive: ids unique)
        assert [(await conn.exec_driver_sql("SELECT 1")).scalar() for conn in held] == [1, 1]
        for conn in held:
            await conn.close()
        pool_said_nothing(caplog, service)
    finally:
        await engine.dispose()


# ---- PgBouncer's 08P01 on an open client connection: that client connection only ------------
# PgBouncer ends one client connection with FATAL 08P01 for that client's own reason: its
# server connection died under it ("server conn crashed?"), it waited past query_wait_timeout,
# an admin's KILL. The pool's other client connections are sound (in transaction pooling none
# is tied to a server connection while idle), or closed by PgBouncer, which the checkout's probe
# sees: replacing them all only reconnects them to the pooler (SQLAlchemy did, as for a server
# that went away).


async def held_clients(engine: Any, n: int) -> list[Any]:
    """The driver connections of ``n`` connections of ``engine`` (sync or async) held at once,
    each of which runs a statement; then back to the pool. (Kept by the caller, so that no
    connection made later can have the ``id()`` of one of them.)"""
    if isinstance(engine, sa.Engine):
        conns = [engine.connect() for _ in range(n)]
        for conn in conns:
            conn.exec_driver_sql("SELECT 1")
        found = [c.connection.driver_connection for c in conns]
        for conn in conns:
            conn.close()
        return found
    aconns = [await engine.connect() for _ in range(n)]
    for aconn in aconns:
        await aconn.exec_driver_sql("SELECT 1")
    found = [(await c.get_raw_connection()).driver_connection for c in aconns]
    for aconn in aconns:
        await aconn.close()
    return found


@pytest.mark.parametrize("fault", ["query_wait_timeout", "server conn crashed"])
@pytest.mark.parametrize("driver", ["psycopg-sync", "psycopg", "asyncpg"])
@pytest.mark.asyncio
async def test_pgbouncer_ending_one_client_connection_keeps_the_others(
    bouncer_factory: Callable[..., PgBouncer],
    pg_server: PostgresServer,
    database: str,
    service: str,
    *,
    driver: str,
    fault: str,
) -> None:
    """The unit's client connection ended by PgBouncer's FATAL 08P01 mid-unit: the unit is
    replayed once, on another pooled client connection, and the pool's other two are kept.
    "server conn crashed?": the unit's backend terminated while its statement ran (asyncpg
    reports PgBouncer's 08P01; psycopg the server's 57P01 that PgBouncer passed on first, a
    server that may have gone away, whose pool is replaced as on a direct connection)."""
    bouncer = bouncer_factory(query_wait_timeout=1)
    if driver == "psycopg-sync":
        engine: Any = sa.create_engine(bouncer.url(), connect_args=PSYCOPG_ARGS, pool_size=3)
        Sessions: Any = rdb.ResilientSession(engine, service=service, config=CONFIG)
    else:
        engine = create_async_engine(
            bouncer.url(driver), connect_args=DRIVER_ARGS[driver], pool_size=3
        )
        Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []
    sleeping = (
        "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
    )

    def kill_the_sleeper() -> None:
        wait_for(lambda: bool(pg_server.execute(sleeping, database=database)), "the statement")
        pg_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query = 'SELECT pg_sleep(30)'",
            database=database,
        )

    def unit(session: Session) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            if fault == "query_wait_timeout":
                bouncer.admin(f"PAUSE {database}")  # (no client in a transaction: at once)
                session.execute(sa.text("SELECT 1"))  # waits for a server, past the timeout
            else:
                killer = threading.Thread(target=kill_the_sleeper)
                killer.start()
                try:
                    session.execute(sa.text("SELECT pg_sleep(30)"))
                finally:
                    killer.join(60)
        elif fault == "query_wait_timeout":
            bouncer.admin(f"RESUME {database}")
        return len(attempts)

    async def aunit(session: AsyncSession) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            if fault == "query_wait_timeout":
                bouncer.admin(f"PAUSE {database}")  # (blocks the loop: nothing else on it)
                await session.execute(sa.text("SELECT 1"))
            else:
                killer = asyncio.create_task(asyncio.to_thread(kill_the_sleeper))
                try:
                    await session.execute(sa.text("SELECT pg_sleep(30)"))
                finally:
                    await killer
        elif fault == "query_wait_timeout":
            bouncer.admin(f"RESUME {database}")
        return len(attempts)

    rdb.add_hook(seen.append)
    try:
        before = await held_clients(engine, 3)
        if driver == "psycopg-sync":
            assert Sessions.run(unit) == 2
        else:
            assert await Sessions.run(aunit) == 2
        after = await held_clients(engine, 3)
    finally:
        rdb.remove_hook(seen.append)
        if driver == "psycopg-sync":
            engine.dispose()
        else:
            await engine.dispose()
    codes = [e.fields["sqlstate"] for e in seen if e.name == "retry"]
    assert [e.fields["outcome"] for e in seen if e.name == "retry"] == ["disconnect"]
    if codes == ["57P01"]:  # (psycopg: the server's FATAL, passed on; see above)
        assert fault == "server conn crashed"
        assert driver != "asyncpg"
        return
    if not (ASYNCPG_KEEPS_FATAL_CODES if driver == "asyncpg" else fatal_code("08P01")):
        # (psycopg before 3.2.4 and asyncpg before 0.32 report no code of PgBouncer's: a lost
        # connection, nothing more known, whose pool is replaced)
        assert codes == [fatal_code("08P01") or "none"] if driver != "asyncpg" else ["08003"]
        return
    assert codes == ["08P01"]
    kept = {id(d) for d in before} & {id(d) for d in after}
    assert len(kept) == 2  # the unit's one replaced, only


@pytest.mark.server_control
def test_postgres_restarted_behind_pgbouncer(
    txn_bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str
) -> None:
    """PostgreSQL crashes and starts again while PgBouncer stays up: the unit waiting on it
    runs once the server is back."""
    engine = sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    try:
        Sessions.run(write)
        back = pg_server.restart_after(0.5)
        try:
            assert Sessions.run(write) == "written"
        finally:
            back.join(timeout=60)
        assert ledger(pg_server, database) == 2
    finally:
        engine.dispose()


def test_pgbouncer_shut_down_and_restarted(
    txn_bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str
) -> None:
    """``SHUTDOWN`` on the admin console, then PgBouncer started again: the dead pooled
    connection is replaced and the unit runs."""
    engine = sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    try:
        Sessions.run(write)
        with pytest.raises(psycopg.OperationalError):  # it closes the console too
            txn_bouncer.admin("SHUTDOWN")
        assert txn_bouncer.proc is not None
        txn_bouncer.proc.wait(timeout=10)
        txn_bouncer.start()
        assert Sessions.run(write) == "written"
        assert ledger(pg_server, database) == 2
    finally:
        engine.dispose()


# ---- lost COMMIT answers ----------------------------------------------------------------------


@pytest.fixture
def proxy_to_bouncer(txn_bouncer: PgBouncer) -> Iterator[FaultProxy]:
    """A FaultProxy between the client and PgBouncer."""
    with FaultProxy(("127.0.0.1", txn_bouncer.port)) as proxy:
        yield proxy


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
@pytest.mark.asyncio
async def test_lost_commit_answer_behind_pgbouncer(
    proxy_to_bouncer: FaultProxy,
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
) -> None:
    """The answer to a marked COMMIT lost between the client and PgBouncer: the check, through
    PgBouncer, finds the marker: done once, not replayed."""
    url = pg_server.url_at("127.0.0.1", proxy_to_bouncer.port, database, driver=driver)
    engine = create_async_engine(url, connect_args=DRIVER_ARGS[driver])
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
    attempts: list[int] = []

    async def unit(session: AsyncSession) -> str:
        attempts.append(1)
        return await session.run_sync(write)

    try:
        await Sessions.run(unit)
        proxy_to_bouncer.lose_commit_answer()
        assert await Sessions.run(unit) == "written"
        assert proxy_to_bouncer.commits_lost == 1
        assert len(attempts) == 2  # (the first unit, then the one whose answer was lost)
        assert ledger(pg_server, database) == 2
    finally:
        await engine.dispose()


def test_commit_that_never_reached_pgbouncer_is_replayed(
    proxy_to_bouncer: FaultProxy, pg_server: PostgresServer, database: str, service: str
) -> None:
    """A COMMIT swallowed before PgBouncer, the client then reset: PgBouncer drops the server
    connection (the transaction rolls back), the check proves it and the unit runs again."""
    url = pg_server.url_at("127.0.0.1", proxy_to_bouncer.port, database)
    engine = sa.create_engine(url, connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    attempts: list[int] = []

    def unit(session: Session) -> str:
        attempts.append(1)
        return write(session)

    try:
        proxy_to_bouncer.swallow_commit()
        releaser = threading.Thread(
            target=lambda: (
                wait_for(lambda: proxy_to_bouncer.commits_swallowed == 1, "the COMMIT held"),
                proxy_to_bouncer.release_swallowed(),
            )
        )
        releaser.start()
        try:
            assert Sessions.run(unit) == "written"
        finally:
            releaser.join(timeout=60)
        assert len(attempts) == 2
        assert ledger(pg_server, database) == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("commits", [False, True], ids=["killed", "let-through"])
def test_backend_killed_or_pgbouncer_killed_during_commit(
    txn_bouncer: PgBouncer,
    pg_server: PostgresServer,
    database: str,
    service: str,
    commits: bool,
) -> None:
    """A COMMIT running on the server (held by a deferred trigger) when either its backend is
    terminated (PgBouncer's 08P01 "server conn crashed?": not committed, replayed once), or
    PgBouncer is killed and started again, and the COMMIT then let through (the check, through
    the new PgBouncer, waits for it and finds it committed: not replayed)."""
    engine = sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    attempts: list[int] = []

    def unit(session: Session) -> str:
        attempts.append(1)
        return write(session, hold=len(attempts) == 1)

    lock = psycopg.connect(pg_server.conninfo(database), autocommit=True)
    lock.execute("SELECT pg_advisory_lock(42)")
    failed: list[BaseException] = []

    def fault() -> None:
        try:
            wait_for(lambda: waiting_for_lock_42(pg_server, database), "the COMMIT waiting")
            if not commits:
                pg_server.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = "
                    "'advisory' AND objid = 42 AND NOT granted",
                    database=database,
                )
                return
            assert txn_bouncer.proc is not None
            txn_bouncer.proc.kill()
            txn_bouncer.proc.wait(timeout=10)
            txn_bouncer.start()
            wait_for(
                lambda: bool(
                    count(
                        pg_server,
                        database,
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE '%claim_commit%'",
                    )
                ),
                "the check waiting for the COMMIT",
            )
            lock.execute("SELECT pg_advisory_unlock(42)")
        except BaseException as exc:
            failed.append(exc)
            lock.execute("SELECT pg_advisory_unlock_all()")

    thread = threading.Thread(target=fault)
    thread.start()
    try:
        assert Sessions.run(unit) == "written"
    finally:
        thread.join(timeout=60)
        lock.close()
        engine.dispose()
    assert not failed, failed
    assert len(attempts) == (1 if commits else 2)
    assert ledger(pg_server, database) == 1


# ---- a server that stops taking writes under the client connections --------------------------
# PgBouncer passes on the server settings of a client connection's login only: in transaction
# pooling a later transaction may reach a server that takes no writes (a primary made read-only,
# a standby the pooler was pointed at), while the client was told at login that it takes them.
# A write refused there (25006) is a lost server, as on a direct connection: the pool's client
# connections renewed and the unit replayed, not raised as the application's own read-only
# transaction.


def refused_then_resumed(seen: list[rdb.SelfHealEvent]) -> None:
    """The unit's first attempt was refused with 25006, taken for a lost server (the pool's
    connections replaced), and replayed."""
    assert [(e.name, e.fields.get("sqlstate")) for e in seen if e.name != "attempt"][:2] == [
        ("pool_invalidated", "25006"),
        ("retry", "25006"),
    ]
    retries = [e.fields for e in seen if e.name == "retry"]
    assert [(f["sqlstate"], f["outcome"]) for f in retries] == [("25006", "disconnect")]


@contextlib.contextmanager
def read_only_server(server: PostgresServer, bouncer: PgBouncer) -> Iterator[Callable[[], None]]:
    """``server`` made read-only (``ALTER SYSTEM SET default_transaction_read_only``, reloaded:
    what fences a primary, for its open sessions too), and ``bouncer``'s server connections
    made again (``RECONNECT``, as its ``server_lifetime`` does); yields what takes it back.

    (An open server session reports the change once, after the reload: PgBouncer passes that
    on to whichever client connection is linked to it then, if any, so some units would see it
    and others not. The login of a new server connection reaches no client at all.)"""

    def back() -> None:
        server.execute("ALTER SYSTEM RESET default_transaction_read_only")
        server.execute("SELECT pg_reload_conf()")

    server.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    server.execute("SELECT pg_reload_conf()")
    bouncer.admin(f"RECONNECT {bouncer.database}")
    try:
        yield back
    finally:
        back()


def sync_drivers(engine: sa.Engine) -> set[Any]:
    """The driver connections the pool hands out for two connections at once."""
    with engine.connect() as a, engine.connect() as b:
        return {a.connection.driver_connection, b.connection.driver_connection}


async def async_drivers(engine: Any) -> set[Any]:
    async with engine.connect() as a, engine.connect() as b:
        return {
            (await a.get_raw_connection()).driver_connection,
            (await b.get_raw_connection()).driver_connection,
        }


@contextlib.contextmanager
def ran_once_pool_kept(engine: sa.Engine, attempts: list[int]) -> Iterator[None]:
    """Around a unit's run on ``engine`` (whose pool has served already): one attempt made
    (``attempts``), nothing replayed, no pool invalidated, the pool's connections kept."""
    seen: list[rdb.SelfHealEvent] = []
    before = sync_drivers(engine)
    rdb.add_hook(seen.append)
    try:
        yield
    finally:
        rdb.remove_hook(seen.append)
    assert len(attempts) == 1
    assert not [e for e in seen if e.name in ("pool_invalidated", "retry")]
    assert sync_drivers(engine) == before  # the pool kept


@contextlib.asynccontextmanager
async def async_ran_once_pool_kept(engine: Any, attempts: list[int]) -> AsyncIterator[None]:
    seen: list[rdb.SelfHealEvent] = []
    before = await async_drivers(engine)
    rdb.add_hook(seen.append)
    try:
        yield
    finally:
        rdb.remove_hook(seen.append)
    assert len(attempts) == 1
    assert not [e for e in seen if e.name in ("pool_invalidated", "retry")]
    assert await async_drivers(engine) == before


def own_read_only(session: Session, way: str) -> None:
    """The unit's own transaction made read-only (``way``), then a write in it."""
    if way == "postgresql_readonly":
        session.connection(execution_options={"postgresql_readonly": True})
    else:
        session.execute(sa.text("SET TRANSACTION READ ONLY"))
    write(session)


WAYS = ["postgresql_readonly", "set-transaction-read-only"]


@pytest.mark.parametrize("way", WAYS)
def test_own_read_only_write_behind_pgbouncer_raises_at_once_sync(
    txn_bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    """The application's own read-only transaction behind the pooler, on a server that takes
    writes: its write is the unit's bug, raised after one attempt, the pool kept."""
    engine = sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    attempts: list[int] = []

    def unit(session: Session) -> None:
        attempts.append(1)
        own_read_only(session, way)

    try:
        Sessions.run(write)
        with ran_once_pool_kept(engine, attempts), pytest.raises(sa.exc.DBAPIError) as raised:
            Sessions.run(unit)
        assert rdb.sqlstate_of(raised.value) == "25006"
        assert rdb.classify(raised.value) is rdb.Outcome.NOT_TRANSIENT
        assert Sessions.run(write) == "written"  # (the connection sound)
        assert ledger(pg_server, database) == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_own_read_only_write_behind_pgbouncer_raises_at_once_async(
    *,
    txn_bouncer: PgBouncer,
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    way: str,
) -> None:
    engine = create_async_engine(txn_bouncer.url(driver), connect_args=DRIVER_ARGS[driver])
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
    attempts: list[int] = []

    async def unit(session: AsyncSession) -> None:
        attempts.append(1)
        await session.run_sync(own_read_only, way)

    try:
        await Sessions.run(lambda s: s.run_sync(write))
        async with async_ran_once_pool_kept(engine, attempts):
            with pytest.raises(sa.exc.DBAPIError) as raised:
                await Sessions.run(unit)
        assert rdb.sqlstate_of(raised.value) == "25006"
        assert rdb.classify(raised.value) is rdb.Outcome.NOT_TRANSIENT
        assert await Sessions.run(lambda s: s.run_sync(write)) == "written"
        assert ledger(pg_server, database) == 2
    finally:
        await engine.dispose()


# A write refused inside a savepoint (``begin_nested()``): the server is asked too, its
# savepoint rolled back to for the question and the transaction failed again after it, so
# that the application may still roll back to the savepoint and go on.


def write_in_savepoint(session: Session) -> str:
    """A read in the unit's transaction, then a write in a savepoint of it."""
    session.execute(sa.text("SELECT 1"))
    with session.begin_nested():
        return write(session)


async def async_write_in_savepoint(session: AsyncSession) -> str:
    """write_in_savepoint with the async session's own begin_nested()."""
    await session.execute(sa.text("SELECT 1"))
    async with session.begin_nested():
        return await session.run_sync(write)


#: where the refused write runs: in the unit's transaction, or in a savepoint of it
WHERE = ["transaction", "savepoint"]


@pytest.mark.server_control  # (the whole server is read-only for a moment: no spares made)
@pytest.mark.parametrize("where", WHERE)
def test_primary_made_read_only_behind_pgbouncer_sync(
    txn_bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str, where: str
) -> None:
    """Client connections made while the server takes writes, then the server made read-only
    (reloaded, PgBouncer's server connections made again, no client reconnecting): the write
    it refuses is a lost server (the pool's client connections renewed), replayed, and it goes
    in once the server takes writes again.
    Before, the login's report decided: raised at once as the application's own read-only
    transaction, the pool kept (in a savepoint, until the server was asked there too)."""
    writes = write if where == "transaction" else write_in_savepoint
    engine = sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []
    try:
        Sessions.run(write)
        before = sync_drivers(engine)
        with read_only_server(pg_server, txn_bouncer) as back:

            def unit(session: Session) -> str:
                attempts.append(1)
                if len(attempts) == 2:
                    back()  # (the pooler reaches a server that takes writes again)
                return writes(session)

            rdb.add_hook(seen.append)
            try:
                assert Sessions.run(unit) == "written"
            finally:
                rdb.remove_hook(seen.append)
        assert len(attempts) == 2
        refused_then_resumed(seen)
        assert not sync_drivers(engine) & before  # the client connections renewed
        assert ledger(pg_server, database) == 2
    finally:
        engine.dispose()


@pytest.mark.server_control
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_primary_made_read_only_behind_pgbouncer_async(
    *,
    txn_bouncer: PgBouncer,
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    where: str,
) -> None:
    engine = create_async_engine(txn_bouncer.url(driver), connect_args=DRIVER_ARGS[driver])
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []
    try:
        await Sessions.run(lambda s: s.run_sync(write))
        before = await async_drivers(engine)
        with read_only_server(pg_server, txn_bouncer) as back:

            async def unit(session: AsyncSession) -> str:
                attempts.append(1)
                if len(attempts) == 2:
                    back()
                if where == "transaction":
                    return await session.run_sync(write)
                return await async_write_in_savepoint(session)

            rdb.add_hook(seen.append)
            try:
                assert await Sessions.run(unit) == "written"
            finally:
                rdb.remove_hook(seen.append)
        assert len(attempts) == 2
        refused_then_resumed(seen)
        assert not await async_drivers(engine) & before
        assert ledger(pg_server, database) == 2
    finally:
        await engine.dispose()


@pytest.mark.server_control
def test_primary_made_read_only_behind_pgbouncer_in_a_savepoint_drop_in(
    txn_bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str
) -> None:
    """Drop-in use (no replay): the write refused in a savepoint is raised as a lost server,
    transient (a web client may be told to retry), its connection and the pool's others
    replaced. Before, it was the application's own error, the pool kept."""
    engine = sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    try:
        Sessions.run(write)
        before = sync_drivers(engine)
        with (
            read_only_server(pg_server, txn_bouncer),
            Sessions() as session,
            pytest.raises(sa.exc.DBAPIError) as refused,
        ):
            write_in_savepoint(session)
        assert rdb.sqlstate_of(refused.value) == "25006"
        assert rdb.classify(refused.value) is rdb.Outcome.DISCONNECT
        assert rdb.is_transient(refused.value)
        assert refused.value.connection_invalidated
        assert not sync_drivers(engine) & before
        assert Sessions.run(write) == "written"
        assert ledger(pg_server, database) == 2
    finally:
        engine.dispose()


def own_read_only_in_savepoint(
    session: Session, way: str, outcomes: list[rdb.Outcome] | None = None
) -> str:
    """A write refused in a savepoint by the unit's own read-only transaction (``way``: the
    whole transaction begun read-only, or the savepoint made so), caught: the unit rolls back
    to the savepoint and goes on in its transaction, which the refusal left sound. Returns
    what it did then. With ``outcomes``, the refusal's classification is put there instead of
    checked (one taken for a lost server fails the attempt at the next statement)."""
    if way == "postgresql_readonly":
        session.connection(execution_options={"postgresql_readonly": True})
    session.execute(sa.text("SELECT 1"))
    with pytest.raises(sa.exc.DBAPIError) as refused, session.begin_nested():  # noqa: PT012
        if way != "postgresql_readonly":
            session.execute(sa.text("SET TRANSACTION READ ONLY"))
        write(session)
    assert rdb.sqlstate_of(refused.value) == "25006"
    if outcomes is not None:
        outcomes.append(rdb.classify(refused.value))
    else:
        assert rdb.classify(refused.value) is rdb.Outcome.NOT_TRANSIENT
        assert not refused.value.connection_invalidated
    if way == "postgresql_readonly":
        return str(session.execute(sa.text("SELECT 'read'")).scalar_one())
    return write(session)  # (the savepoint's read-only mode went with it)


@pytest.mark.parametrize("way", WAYS)
def test_own_read_only_write_in_a_savepoint_behind_pgbouncer_is_the_units_sync(
    txn_bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str, way: str
) -> None:
    """The application's own read-only write in a savepoint, on a server that takes writes:
    raised at once (the server, asked, takes writes), the unit's transaction still usable
    once rolled back to the savepoint, one attempt, the pool kept."""
    engine = sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS)
    Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)
    attempts: list[int] = []

    def unit(session: Session) -> str:
        attempts.append(1)
        return own_read_only_in_savepoint(session, way)

    try:
        Sessions.run(write)
        with ran_once_pool_kept(engine, attempts):
            done = Sessions.run(unit)
        assert done == ("read" if way == "postgresql_readonly" else "written")
        assert ledger(pg_server, database) == (1 if way == "postgresql_readonly" else 2)
    finally:
        engine.dispose()


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_own_read_only_write_in_a_savepoint_behind_pgbouncer_is_the_units_async(
    *,
    txn_bouncer: PgBouncer,
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    way: str,
) -> None:
    engine = create_async_engine(txn_bouncer.url(driver), connect_args=DRIVER_ARGS[driver])
    Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)
    attempts: list[int] = []

    async def unit(session: AsyncSession) -> str:
        attempts.append(1)
        return await session.run_sync(own_read_only_in_savepoint, way)

    try:
        await Sessions.run(lambda s: s.run_sync(write))
        async with async_ran_once_pool_kept(engine, attempts):
            done = await Sessions.run(unit)
        assert done == ("read" if way == "postgresql_readonly" else "written")
        assert ledger(pg_server, database) == (1 if way == "postgresql_readonly" else 2)
    finally:
        await engine.dispose()


@pytest.fixture
def standby_bouncer(pg_standby: StandbyPair) -> Iterator[PgBouncer]:
    """PgBouncer (transaction pooling) in front of the pair's primary, whose database has the
    ledger and the commit markers, replicated to the standby."""
    pg_standby.create_database("app")
    engine = sa.create_engine(pg_standby.primary.url("app"), poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE ledger (id uuid PRIMARY KEY, hold boolean)")
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()
    pg_standby.wait_replayed()
    bouncer = PgBouncer(pg_standby.primary, "app")
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.close()


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("driver", ["psycopg-sync", "asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_pgbouncer_pointed_at_a_hot_standby(
    standby_bouncer: PgBouncer, pg_standby: StandbyPair, service: str, driver: str, where: str
) -> None:
    """Client connections made while PgBouncer reaches the primary; PgBouncer then pointed at
    the hot standby (as when the primary is demoted under it), the client connections kept:
    the standby's refusal (25006) is a lost server, the pool's client connections renewed and
    the unit replayed; it goes in once PgBouncer reaches the primary again. Before, it was
    raised at once as the application's own read-only transaction (in a savepoint, until the
    server was asked there too)."""
    writes = write if where == "transaction" else write_in_savepoint
    primary, standby = pg_standby.primary, pg_standby.standby
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []

    def repoint() -> None:
        if len(attempts) == 1:
            standby_bouncer.point_at(standby)
        elif len(attempts) == 2:
            standby_bouncer.point_at(primary)

    if driver == "psycopg-sync":
        engine = sa.create_engine(standby_bouncer.url(), connect_args=PSYCOPG_ARGS)
        Sessions = rdb.ResilientSession(engine, service=service, config=CONFIG)

        def unit(session: Session) -> str:
            attempts.append(1)
            repoint()
            return writes(session)

        try:
            Sessions.run(write)
            before = sync_drivers(engine)
            rdb.add_hook(seen.append)
            try:
                assert Sessions.run(unit) == "written"
            finally:
                rdb.remove_hook(seen.append)
            assert not sync_drivers(engine) & before
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(
            standby_bouncer.url(driver), connect_args=DRIVER_ARGS[driver]
        )
        AsyncSessions = rdb.AsyncResilientSession(async_engine, service=service, config=CONFIG)

        async def async_unit(session: AsyncSession) -> str:
            attempts.append(1)
            repoint()
            return await session.run_sync(writes)

        try:
            await AsyncSessions.run(lambda s: s.run_sync(write))
            before = await async_drivers(async_engine)
            rdb.add_hook(seen.append)
            try:
                assert await AsyncSessions.run(async_unit) == "written"
            finally:
                rdb.remove_hook(seen.append)
            assert not await async_drivers(async_engine) & before
        finally:
            await async_engine.dispose()
    assert len(attempts) == 2
    refused_then_resumed(seen)
    assert count(primary, "app", "SELECT count(*) FROM ledger") == 2


# ---- the other way round: a login made while the server took no writes -----------------------
# A client connection keeps what its login was told: that the server takes no writes (a primary
# read-only then, writable again; a hot standby the pooler reached, promoted since). A write
# refused there on a server that, asked, takes writes may be the unit's own read-only
# transaction, or a refusal by the server the transaction ran on (a standby) while the question
# reached another (PgBouncer pointed at the primary in between, a standby promoted in between):
# the first such refusal in a unit is a lost server, replayed; a second one there is the unit's
# own, raised, the pool kept. A server that still takes no writes (in recovery) is a lost server
# as before, whatever the transaction.

#: few retries: a unit replayed is replayed until they run out
FEW_RETRIES = rdb.Config(max_retries=2, deadline=30.0, failure_threshold=1000)


def told_at_login(driver: Any, name: str) -> str | None:
    """What the server (through the pooler) reported of setting ``name`` to ``driver``."""
    if isinstance(driver, asyncpg.Connection):
        return getattr(driver.get_settings(), name, None)
    value = driver.pgconn.parameter_status(name.encode())
    return None if value is None else bytes(value).decode()


def replayed_once(seen: list[rdb.SelfHealEvent]) -> None:
    """The unit was refused with 25006 once, taken for a lost server (the pool's client
    connections replaced once) and replayed once."""
    assert [
        (e.name, e.fields.get("sqlstate")) for e in seen if e.name in ("pool_invalidated", "retry")
    ] == [("pool_invalidated", "25006"), ("retry", "25006")]
    assert [e.fields["outcome"] for e in seen if e.name == "retry"] == ["disconnect"]


def standby_refusals(service: str) -> int:
    """``health()``'s count of writes a hot standby refused, for ``service``."""
    return int(rdb.health()["services"][service]["counters"]["hot_standby_refused_writes"])


def breaker_failures(service: str) -> int:
    """The failures the service's circuit breaker counted (since its last success)."""
    return int(rdb.health()["services"][service]["breaker"]["failures"])


def own_read_only_unit(
    where: str, way: str, outcomes: list[rdb.Outcome]
) -> Callable[[Session], str]:
    """The unit's own read-only write, in its transaction (raised) or in a savepoint of it
    (caught: see own_read_only_in_savepoint; how each attempt's refusal was classified put in
    ``outcomes``)."""

    def unit(session: Session) -> str:
        if where == "savepoint":
            return own_read_only_in_savepoint(session, way, outcomes)
        own_read_only(session, way)
        return "not refused"

    return unit


@pytest.mark.server_control  # (the whole server is read-only for a moment: no spares made)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("driver", ["psycopg-sync", "asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_own_read_only_write_after_a_read_only_login_behind_pgbouncer(
    *,
    txn_bouncer: PgBouncer,
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    way: str,
    where: str,
) -> None:
    """Client connections made while the server took no writes (``default_transaction_read_only``
    on, their login told so), the server writable again: the unit's own read-only write, on a
    server that (asked) takes writes, can't be told from a refusal by a server the question no
    longer reaches. The first is taken for a lost server (the pool's client connections
    replaced, the unit replayed once, a failure for the breaker); the second, in the replay, is
    the unit's own: raised (in a savepoint: caught by the unit, which goes on), nothing more
    replaced, nothing counted. Two attempts: where the answer alone decided, one (a
    switchover's refusal raised too: see
    test_standby_refusal_with_pgbouncer_pointed_at_the_primary_before_the_question); where
    the login's report alone did, replayed. (The replay's client connection, made
    since, is told the server takes writes, and judged so; for a second refusal whose login
    was told otherwise too, see test_second_unsure_refusal_is_the_units_own_sync.)"""
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []
    outcomes: list[rdb.Outcome] = []
    unit = own_read_only_unit(where, way, outcomes)
    expected = (
        ("read" if way == "postgresql_readonly" else "written") if where == "savepoint" else None
    )
    if driver == "psycopg-sync":
        engine = sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS)
        Sessions = rdb.ResilientSession(engine, service=service, config=FEW_RETRIES)

        def counted(session: Session) -> str:
            attempts.append(1)
            return unit(session)

        try:
            with read_only_server(pg_server, txn_bouncer):
                before = sync_drivers(engine)
            # (no server connection that saw the reload left to pass its report on)
            txn_bouncer.admin(f"RECONNECT {database}")
            assert {told_at_login(d, "default_transaction_read_only") for d in before} == {"on"}
            failed_before = breaker_failures(service)
            rdb.add_hook(seen.append)
            try:
                if expected is None:
                    with pytest.raises(sa.exc.DBAPIError) as raised:
                        Sessions.run(counted)
                else:
                    assert Sessions.run(counted) == expected
            finally:
                rdb.remove_hook(seen.append)
            failed = breaker_failures(service) - failed_before
            assert not sync_drivers(engine) & before  # (replaced at the first refusal)
            assert Sessions.run(write) == "written"
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(
            txn_bouncer.url(driver), connect_args=DRIVER_ARGS[driver]
        )
        AsyncSessions = rdb.AsyncResilientSession(async_engine, service=service, config=FEW_RETRIES)

        async def async_counted(session: AsyncSession) -> str:
            attempts.append(1)
            return await session.run_sync(unit)

        try:
            with read_only_server(pg_server, txn_bouncer):
                before = await async_drivers(async_engine)
            # (no server connection that saw the reload left to pass its report on)
            txn_bouncer.admin(f"RECONNECT {database}")
            assert {told_at_login(d, "default_transaction_read_only") for d in before} == {"on"}
            failed_before = breaker_failures(service)
            rdb.add_hook(seen.append)
            try:
                if expected is None:
                    with pytest.raises(sa.exc.DBAPIError) as raised:
                        await AsyncSessions.run(async_counted)
                else:
                    assert await AsyncSessions.run(async_counted) == expected
            finally:
                rdb.remove_hook(seen.append)
            failed = breaker_failures(service) - failed_before
            assert not await async_drivers(async_engine) & before
            assert await AsyncSessions.run(lambda s: s.run_sync(write)) == "written"
        finally:
            await async_engine.dispose()
    if expected is None:
        assert rdb.sqlstate_of(raised.value) == "25006"
        assert rdb.classify(raised.value) is rdb.Outcome.NOT_TRANSIENT
    else:
        assert outcomes == [rdb.Outcome.DISCONNECT, rdb.Outcome.NOT_TRANSIENT]
    assert len(attempts) == 2
    replayed_once(seen)
    # the first refusal, a lost server's; the unit's own counts nothing (caught in a savepoint,
    # the unit succeeds: the breaker's count starts over)
    assert failed == (1 if expected is None else 0)
    assert ledger(pg_server, database) == (2 if expected == "written" else 1)


@pytest.mark.parametrize("driver", ["psycopg-sync", "asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_own_read_only_write_behind_pgbouncer_after_its_standby_is_promoted(
    standby_bouncer: PgBouncer, pg_standby: StandbyPair, service: str, driver: str
) -> None:
    """Client connections made while PgBouncer reaches the hot standby (their login told
    ``in_hot_standby`` on). The unit's own read-only write, refused by the standby, is a lost
    server (the server, asked, is in recovery): replayed until the retries run out. The
    standby then promoted (the primary crashed first), the client connections kept with their
    login's report (PgBouncer passes on no change; its server connections made again): the
    same unit's refusal can't be told from the standby's (the server, asked, takes writes):
    the first taken for a lost server, replayed once; the second is the unit's own, raised,
    counted by no breaker; a write goes in. Where the answer alone decided, raised at once;
    where the login's report alone did, replayed until the retries ran out where new logins
    were told the same, the pool's client connections replaced at each refusal."""
    standby = pg_standby.standby
    standby_bouncer.point_at(standby)
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []
    unit = own_read_only_unit("transaction", "set-transaction-read-only", [])

    def promote() -> None:
        pg_standby.crash_primary()
        pg_standby.promote()
        standby_bouncer.admin(f"RECONNECT {standby_bouncer.database}")

    if driver == "psycopg-sync":
        engine = sa.create_engine(standby_bouncer.url(), connect_args=PSYCOPG_ARGS)
        Sessions = rdb.ResilientSession(engine, service=service, config=FEW_RETRIES)

        def counted(session: Session) -> str:
            attempts.append(1)
            return unit(session)

        try:
            with pytest.raises(sa.exc.DBAPIError) as on_the_standby:
                Sessions.run(counted)
            assert len(attempts) == 3
            before = sync_drivers(engine)  # (made on the standby: the others were replaced)
            promote()
            assert {told_at_login(d, "in_hot_standby") for d in before} == {"on"}
            attempts.clear()
            failed_before = breaker_failures(service)
            standby_before = standby_refusals(service)
            rdb.add_hook(seen.append)
            try:
                with pytest.raises(sa.exc.DBAPIError) as raised:
                    Sessions.run(counted)
            finally:
                rdb.remove_hook(seen.append)
            failed = breaker_failures(service) - failed_before
            counted_as_standby = standby_refusals(service) - standby_before
            assert not sync_drivers(engine) & before
            assert Sessions.run(write) == "written"
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(
            standby_bouncer.url(driver), connect_args=DRIVER_ARGS[driver]
        )
        AsyncSessions = rdb.AsyncResilientSession(async_engine, service=service, config=FEW_RETRIES)

        async def async_counted(session: AsyncSession) -> str:
            attempts.append(1)
            return await session.run_sync(unit)

        try:
            with pytest.raises(sa.exc.DBAPIError) as on_the_standby:
                await AsyncSessions.run(async_counted)
            assert len(attempts) == 3
            before = await async_drivers(async_engine)
            promote()
            assert {told_at_login(d, "in_hot_standby") for d in before} == {"on"}
            attempts.clear()
            failed_before = breaker_failures(service)
            standby_before = standby_refusals(service)
            rdb.add_hook(seen.append)
            try:
                with pytest.raises(sa.exc.DBAPIError) as raised:
                    await AsyncSessions.run(async_counted)
            finally:
                rdb.remove_hook(seen.append)
            failed = breaker_failures(service) - failed_before
            counted_as_standby = standby_refusals(service) - standby_before
            assert not await async_drivers(async_engine) & before
            assert await AsyncSessions.run(lambda s: s.run_sync(write)) == "written"
        finally:
            await async_engine.dispose()
    assert rdb.sqlstate_of(on_the_standby.value) == "25006"
    assert rdb.classify(on_the_standby.value) is rdb.Outcome.DISCONNECT
    assert rdb.sqlstate_of(raised.value) == "25006"
    assert rdb.classify(raised.value) is rdb.Outcome.NOT_TRANSIENT
    assert len(attempts) == 2
    replayed_once(seen)
    assert failed == 1
    assert count(standby, "app", "SELECT count(*) FROM ledger") == 1
    # its line says what is known (the server asked is no standby in recovery): unsure, not a
    # hot standby's refusal, and not counted as one
    assert [e.name for e in seen if "refused_write" in e.name] == ["refused_write_unsure"]
    assert counted_as_standby == 0


# ---- the answer and the login disagree: unsure, replayed once ---------------------------------
# A login that was told the server takes no writes, and a server that, asked after the refusal,
# takes them: the refusal may be the unit's own read-only write, or a refusal by a server the
# question no longer reaches (PgBouncer pointed at the primary between the refusal and the
# question; a standby promoted meanwhile). The first such refusal in a unit is a lost server,
# replayed; a second one there is the unit's own, raised.


def _repoint_at_first_refusal(
    bouncer: PgBouncer, primary: PostgresServer, attempts: list[int]
) -> tuple[Callable[[sa.engine.ExceptionContext], None], list[int]]:
    """A ``handle_error`` listener that points ``bouncer`` at ``primary`` at the first 25006
    (the server connections made again on release), and the list of the attempt counts it
    did so at (``len(attempts)`` then)."""
    repointed: list[int] = []

    def repoint(ctx: sa.engine.ExceptionContext) -> None:
        if rdb.sqlstate_of(ctx.original_exception) == "25006" and not repointed:
            repointed.append(len(attempts))
            bouncer.point_at(primary)

    return repoint, repointed


@pytest.mark.parametrize("driver", ["psycopg-sync", "asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_standby_refusal_with_pgbouncer_pointed_at_the_primary_before_the_question(
    standby_bouncer: PgBouncer, pg_standby: StandbyPair, service: str, driver: str
) -> None:
    """Client connections made while PgBouncer reaches the hot standby (their login told
    ``in_hot_standby`` on). A unit's write is refused by the standby, and PgBouncer is pointed
    at the primary between the refusal and the question (forced: a ``handle_error`` listener
    listened before the factory's, so run before it): the server asked, the primary, takes
    writes; the login said it takes none. The unit is replayed (the pool's client connections
    replaced) and goes in on the primary, once. Where the answer alone decided, it was raised
    at once as the application's own read-only write: a unit a replay heals failed by a
    switchover."""
    primary, standby = pg_standby.primary, pg_standby.standby
    standby_bouncer.point_at(standby)
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []
    repoint, repointed = _repoint_at_first_refusal(standby_bouncer, primary, attempts)

    if driver == "psycopg-sync":
        engine = sa.create_engine(standby_bouncer.url(), connect_args=PSYCOPG_ARGS)
        # (before the factory's: SQLAlchemy calls them in the order they were listened)
        sa.event.listen(engine, "handle_error", repoint)
        Sessions = rdb.ResilientSession(engine, service=service, config=FEW_RETRIES)

        def unit(session: Session) -> str:
            attempts.append(1)
            return write(session)

        try:
            before = sync_drivers(engine)
            assert {told_at_login(d, "in_hot_standby") for d in before} == {"on"}
            rdb.add_hook(seen.append)
            try:
                assert Sessions.run(unit) == "written"
            finally:
                rdb.remove_hook(seen.append)
            assert not sync_drivers(engine) & before
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(
            standby_bouncer.url(driver), connect_args=DRIVER_ARGS[driver]
        )
        sa.event.listen(async_engine.sync_engine, "handle_error", repoint)
        AsyncSessions = rdb.AsyncResilientSession(async_engine, service=service, config=FEW_RETRIES)

        async def async_unit(session: AsyncSession) -> str:
            attempts.append(1)
            return await session.run_sync(write)

        try:
            before = await async_drivers(async_engine)
            assert {told_at_login(d, "in_hot_standby") for d in before} == {"on"}
            rdb.add_hook(seen.append)
            try:
                assert await AsyncSessions.run(async_unit) == "written"
            finally:
                rdb.remove_hook(seen.append)
            assert not await async_drivers(async_engine) & before
        finally:
            await async_engine.dispose()
    assert repointed == [1]  # (refused by the standby in the first attempt)
    assert len(attempts) == 2
    replayed_once(seen)
    assert count(primary, "app", "SELECT count(*) FROM ledger") == 1
    # The line says what is known: the login's report and the server's answer disagree (a
    # switchover, or the application's own read-only write after a promotion), not that the
    # server is a standby in recovery (the one asked said it is not); counted as no standby's
    unsure = [e for e in seen if e.name == "refused_write_unsure"]
    assert len(unsure) == 1, [e.message for e in seen]
    assert unsure[0].level == logging.WARNING
    assert "the server asked now says it takes writes" in unsure[0].message
    assert "replayed once" in unsure[0].message
    assert "the application's own read-only write" in unsure[0].message
    assert "in recovery" not in unsure[0].message
    assert unsure[0].fields["sqlstate"] == "25006"
    assert not [e for e in seen if e.name == "hot_standby_refused_write"]
    assert rdb.health()["services"][service]["counters"]["hot_standby_refused_writes"] == 0


def test_an_unsure_refusal_after_another_failure_is_still_the_units_first(
    standby_bouncer: PgBouncer, pg_standby: StandbyPair, service: str
) -> None:
    """The unit's first attempt fails otherwise (a serialization failure, replayed at once),
    its second is refused by the standby with PgBouncer pointed at the primary before the
    question: that refusal is the unit's first unsure one, a lost server, replayed (not its
    second, the application's own, raised: only an unsure refusal tells the next attempts)."""
    primary, standby = pg_standby.primary, pg_standby.standby
    standby_bouncer.point_at(standby)
    attempts: list[int] = []
    repoint, repointed = _repoint_at_first_refusal(standby_bouncer, primary, attempts)

    engine = sa.create_engine(standby_bouncer.url(), connect_args=PSYCOPG_ARGS)
    sa.event.listen(engine, "handle_error", repoint)  # (before the factory's)
    Sessions = rdb.ResilientSession(engine, service=service, config=FEW_RETRIES)

    def unit(session: Session) -> str:
        attempts.append(1)
        if len(attempts) == 1:  # (a DO block runs on a hot standby too)
            session.execute(
                sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            )
        return write(session)

    try:
        assert Sessions.run(unit) == "written"
    finally:
        engine.dispose()
    assert repointed == [2]
    assert len(attempts) == 3
    assert count(primary, "app", "SELECT count(*) FROM ledger") == 1


def set_read_only(session: Session) -> None:
    own_read_only(session, "set-transaction-read-only")


@pytest.mark.server_control  # (the whole server is read-only for a moment: no spares made)
@pytest.mark.parametrize("how", ["unit", "operation", "one attempt", "drop-in"])
def test_second_unsure_refusal_is_the_units_own_sync(
    txn_bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str, how: str
) -> None:
    """Two engines through PgBouncer, their client connections made while the server took no
    writes (their logins told so), the server writable again; the application's own read-only
    write refused on the first engine, then on the second, whose client connections the first
    refusal's pool replacement did not renew: both refusals ones the server's answer and the
    login disagree on. In a ``run()`` unit (its replay running a unit of the second engine's
    factory inside it) and in a ``with_self_healing`` operation, the first is a lost server
    (replayed), the second the unit's own: raised after two attempts, the second engine's
    pool kept, not counted by the breaker. So too a second in one attempt (the first caught).
    In drop-in use, with no unit to count refusals in, each is a lost server (transient: the
    caller decides whether to run it again), each engine's pool replaced."""
    engines = [sa.create_engine(txn_bouncer.url(), connect_args=PSYCOPG_ARGS) for _ in range(2)]
    factories = [rdb.ResilientSession(e, service=service, config=FEW_RETRIES) for e in engines]
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []

    def refused_on(i: int) -> None:
        with factories[i]() as session, session.begin():
            set_read_only(session)

    def unit(session: Session) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            set_read_only(session)
        factories[1].run(set_read_only)  # (another factory's unit: run once, replayed with it)

    def operation() -> None:
        attempts.append(1)
        if how == "one attempt":
            with pytest.raises(sa.exc.DBAPIError) as first:
                refused_on(0)
            assert rdb.classify(first.value) is rdb.Outcome.DISCONNECT
            refused_on(1)
        else:
            refused_on(len(attempts) - 1)

    def run() -> None:
        if how == "unit":
            factories[0].run(unit)
        else:
            rdb.with_self_healing(operation, service=service, config=FEW_RETRIES)

    try:
        with read_only_server(pg_server, txn_bouncer):
            before = [sync_drivers(e) for e in engines]
        # (no server connection that saw the reload left to pass its report on)
        txn_bouncer.admin(f"RECONNECT {database}")
        logins = {told_at_login(d, "default_transaction_read_only") for b in before for d in b}
        assert logins == {"on"}
        failed_before = breaker_failures(service)
        rdb.add_hook(seen.append)
        try:
            if how == "drop-in":
                for i in range(2):
                    with pytest.raises(sa.exc.DBAPIError) as raised:
                        refused_on(i)
                    assert rdb.classify(raised.value) is rdb.Outcome.DISCONNECT
            else:
                with pytest.raises(sa.exc.DBAPIError) as raised:
                    run()
                assert rdb.classify(raised.value) is rdb.Outcome.NOT_TRANSIENT
        finally:
            rdb.remove_hook(seen.append)
        failed = breaker_failures(service) - failed_before
        assert rdb.sqlstate_of(raised.value) == "25006"
        assert not sync_drivers(engines[0]) & before[0]
        if how == "drop-in":
            assert not sync_drivers(engines[1]) & before[1]
            assert [e.name for e in seen if e.name in ("pool_invalidated", "retry")] == [
                "pool_invalidated",
                "pool_invalidated",
            ]
        else:
            assert sync_drivers(engines[1]) == before[1]  # the pool kept
            if how == "one attempt":
                assert len(attempts) == 1
                assert [e.name for e in seen if e.name in ("pool_invalidated", "retry")] == [
                    "pool_invalidated"
                ]
            else:
                assert len(attempts) == 2
                replayed_once(seen)
                assert failed == 1
        assert all(f.run(write) == "written" for f in factories)
    finally:
        for engine in engines:
            engine.dispose()
    assert ledger(pg_server, database) == 2


def async_pair(
    bouncer: PgBouncer, driver: str, service: str
) -> tuple[list[AsyncEngine], list[rdb.AsyncResilientSession[Any]]]:
    """Two async engines through ``bouncer`` on ``driver``, a factory of ``service`` (few
    retries) on each; the test disposes of the engines."""
    engines = [
        create_async_engine(bouncer.url(driver), connect_args=DRIVER_ARGS[driver]) for _ in range(2)
    ]
    return engines, [
        rdb.AsyncResilientSession(e, service=service, config=FEW_RETRIES) for e in engines
    ]


async def logins_told_read_only(
    server: PostgresServer, bouncer: PgBouncer, engines: list[AsyncEngine]
) -> list[set[Any]]:
    """Two client connections in each pool of ``engines`` made while ``server`` took no writes
    (their logins told so), the server writable again: the driver connections, by engine."""
    with read_only_server(server, bouncer):
        before = [await async_drivers(e) for e in engines]
    # (no server connection that saw the reload left to pass its report on)
    bouncer.admin(f"RECONNECT {bouncer.database}")
    logins = {told_at_login(d, "default_transaction_read_only") for b in before for d in b}
    assert logins == {"on"}
    return before


@pytest.mark.server_control  # (the whole server is read-only for a moment: no spares made)
@pytest.mark.parametrize("how", ["unit", "operation"])
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_second_unsure_refusal_is_the_units_own_async(
    *,
    txn_bouncer: PgBouncer,
    pg_server: PostgresServer,
    database: str,
    service: str,
    driver: str,
    how: str,
) -> None:
    """The async twin of test_second_unsure_refusal_is_the_units_own_sync (a unit, an
    operation)."""
    engines, factories = async_pair(txn_bouncer, driver, service)
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []

    async def refused_in(session: AsyncSession) -> None:
        await session.run_sync(set_read_only)

    async def unit(session: AsyncSession) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            await refused_in(session)
        await factories[1].run(refused_in)

    async def operation() -> None:
        attempts.append(1)
        async with factories[len(attempts) - 1]() as session, session.begin():
            await refused_in(session)

    async def run() -> None:
        if how == "unit":
            await factories[0].run(unit)
        else:
            await rdb.with_self_healing(operation, service=service, config=FEW_RETRIES)

    try:
        before = await logins_told_read_only(pg_server, txn_bouncer, engines)
        failed_before = breaker_failures(service)
        rdb.add_hook(seen.append)
        try:
            with pytest.raises(sa.exc.DBAPIError) as raised:
                await run()
        finally:
            rdb.remove_hook(seen.append)
        failed = breaker_failures(service) - failed_before
        assert rdb.sqlstate_of(raised.value) == "25006"
        assert rdb.classify(raised.value) is rdb.Outcome.NOT_TRANSIENT
        assert not await async_drivers(engines[0]) & before[0]
        assert await async_drivers(engines[1]) == before[1]  # the pool kept
        for factory in factories:
            assert await factory.run(lambda s: s.run_sync(write)) == "written"
    finally:
        for engine in engines:
            await engine.dispose()
    assert len(attempts) == 2
    replayed_once(seen)
    assert failed == 1
    assert ledger(pg_server, database) == 2


@pytest.mark.server_control  # (the whole server is read-only for a moment: no spares made)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
@pytest.mark.asyncio
async def test_unsure_refusal_in_a_task_made_in_a_replay_is_its_own_first(
    txn_bouncer: PgBouncer, pg_server: PostgresServer, database: str, service: str, driver: str
) -> None:
    """A unit replayed after an unsure refusal (its next refusal would be its own) starts a
    task in its replay, which runs a unit of another factory once the first has ended: that
    unit's first unsure refusal is its own first, a lost server, replayed, not taken for the
    first unit's second and raised at once (the task inherited the replay's context)."""
    engines, factories = async_pair(txn_bouncer, driver, service)
    seen: list[rdb.SelfHealEvent] = []
    attempts: list[int] = []
    task_attempts: list[int] = []
    ended = asyncio.Event()
    started: list[asyncio.Task[str]] = []

    async def in_task(session: AsyncSession) -> str:
        task_attempts.append(1)
        if len(task_attempts) == 1:
            await session.run_sync(set_read_only)
        return await session.run_sync(write)

    async def later() -> str:
        await ended.wait()
        return await factories[1].run(in_task)

    async def unit(session: AsyncSession) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            await session.run_sync(set_read_only)
        started.append(asyncio.create_task(later()))
        return await session.run_sync(write)

    try:
        before = await logins_told_read_only(pg_server, txn_bouncer, engines)
        rdb.add_hook(seen.append)
        try:
            assert await factories[0].run(unit) == "written"
            replayed_once(seen)
            del seen[:]
            ended.set()
            assert await started[0] == "written"
        finally:
            rdb.remove_hook(seen.append)
        replayed_once(seen)
        assert not await async_drivers(engines[1]) & before[1]
    finally:
        for engine in engines:
            await engine.dispose()
    assert (len(attempts), len(started), len(task_attempts)) == (2, 1, 2)
    assert ledger(pg_server, database) == 2
