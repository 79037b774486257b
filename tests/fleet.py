"""A fleet of worker processes (``fleet_worker.py``) on one service, and the database gate
their units pass through: tests switch the database "down" (every unit fails with SQLSTATE
57P03, as a server refusing connections says), make units wait on an advisory lock the test
holds, and count every unit that reached the server (a sequence: it survives rollbacks)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import resilient_db as rdb

WORKER = Path(__file__).with_name("fleet_worker.py")
HOLD_LOCK = 4242

GATE_DDL = (
    "CREATE TABLE rdb_gate_state"
    " (id int PRIMARY KEY, down boolean NOT NULL, hold boolean NOT NULL)",
    "INSERT INTO rdb_gate_state VALUES (1, false, false)",
    "CREATE SEQUENCE rdb_gate_calls",
    f"""
    CREATE FUNCTION rdb_gate() RETURNS int LANGUAGE plpgsql AS $$
    DECLARE
        gate rdb_gate_state;
    BEGIN
        PERFORM nextval('rdb_gate_calls');
        SELECT * INTO gate FROM rdb_gate_state WHERE id = 1;
        IF gate.hold THEN
            PERFORM pg_advisory_xact_lock_shared({HOLD_LOCK});
        END IF;
        IF gate.down THEN
            RAISE EXCEPTION 'the database is down for this test' USING ERRCODE = '57P03';
        END IF;
        RETURN 1;
    END $$
    """,
)


class Gate:
    """The gate of one database (``url``: SQLAlchemy URL straight to the server)."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        with self.engine.connect() as conn:
            for statement in GATE_DDL:
                conn.execute(sa.text(statement))

    def set(self, *, down: bool | None = None, hold: bool | None = None) -> None:
        with self.engine.connect() as conn:
            if down is not None:
                conn.execute(sa.text("UPDATE rdb_gate_state SET down = :d"), {"d": down})
            if hold is not None:
                conn.execute(sa.text("UPDATE rdb_gate_state SET hold = :h"), {"h": hold})

    def calls(self) -> int:
        """Units that reached the server so far."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM rdb_gate_calls"
                    )
                ).scalar_one()
            )

    def waiting_on_hold(self) -> int:
        """Backends waiting for the hold lock right now."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND objid = :k AND NOT granted"
                    ),
                    {"k": HOLD_LOCK},
                ).scalar_one()
            )

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Hold the lock that units wait on while ``hold`` is set."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": HOLD_LOCK})
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": HOLD_LOCK})

    def close(self) -> None:
        self.engine.dispose()


class WorkerProcess:
    """One worker; :meth:`ask` sends a command and returns its answer. Started here, it is
    ready once :meth:`wait_ready` returns (a fleet starts its workers at once, then waits for
    each: a worker's start is mostly its interpreter's imports)."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.pid = 0
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=dict(env),
            text=True,
            bufsize=1,
        )

    def wait_ready(self) -> None:
        """Wait for the worker's ``ready`` line (it has its breaker: see fleet_worker.main)."""
        ready = self._read()
        assert "ready" in ready, ready
        self.pid = int(ready["ready"])

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited; its log:\n{self.log()}")
        answer = json.loads(line)
        if isinstance(answer, dict) and "exception" in answer:
            raise RuntimeError(f"worker failed: {answer['exception']}\n{self.log()}")
        return answer

    def ask(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, n: int) -> dict[str, Any]:
        """Run ``n`` units one after the other: ``{"ok": k, "open": k, "errors": {...}}``."""
        answer = self.ask("run", n=n)
        answer.pop("at")
        return answer  # type: ignore[no-any-return]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def self_heal_lines(self, text: str) -> list[str]:
        return [line for line in self.log().splitlines() if "[SELF-HEAL]" in line and text in line]

    def said(self, text: str, timeout: float = 5.0) -> list[str]:
        """:meth:`self_heal_lines` once at least one is there (bounded: ``timeout``): the link
        is marked up or down before its line is written, from another thread of the worker."""
        deadline = time.monotonic() + timeout
        while not (lines := self.self_heal_lines(text)) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the worker's log, not a backoff
        return lines

    def close(self) -> None:
        proc = self.proc
        try:
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait(timeout=10)
        finally:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self._log.close()


@contextmanager
def fleet(
    n: int, db_url: str, settings: Mapping[str, str], tmp_path: Path, *, service: str = "fleet"
) -> Iterator[list[WorkerProcess]]:
    """``n`` worker processes on ``service`` with ``settings`` (``SELF_HEALING_*``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELF_HEALING_")}
    env.update(settings)
    env["RDB_WORKER_DB_URL"] = db_url
    env["RDB_WORKER_SERVICE"] = service
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    )
    workers: list[WorkerProcess] = []
    try:
        for i in range(n):
            workers.append(WorkerProcess(env, tmp_path / f"worker{i}.log"))
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.close()


def opener_settings(redis_url: str) -> dict[str, str]:
    """A worker's environment for opening the fleet's breaker with its first failure, for long
    (600 s): no retries, a threshold of one."""
    return {
        "SELF_HEALING_REDIS_URL": redis_url,
        "SELF_HEALING_RETRY": "false",
        "SELF_HEALING_FAILURE_THRESHOLD": "1",
        "SELF_HEALING_RESET_TIMEOUT": "600000",
    }


def open_the_fleets_breaker(opener: WorkerProcess) -> None:
    """``opener`` (a worker of :func:`opener_settings`, the database down behind its gate)
    joins the fleet and opens its breaker with one failed unit."""
    assert opener.ask("wait", what="connected", timeout=20)["ok"], opener.log()
    assert opener.run(1)["errors"] == {"57P03": 1}  # its failure opens the fleet's breaker
    assert opener.ask("wait", what="open", timeout=10)["ok"], opener.log()


def breaker_of(service: str) -> dict[str, Any]:
    """``health()``'s entry of ``service``'s breaker."""
    entry: dict[str, Any] = rdb.health()["services"][service]["breaker"]
    return entry


def shared(service: str) -> dict[str, Any]:
    """``health()``'s entry of ``service``'s breaker shared through Redis."""
    entry: dict[str, Any] = breaker_of(service)["shared"]
    return entry


class Forked:
    """A child forked from the test process (as gunicorn forks its workers) running ``child``;
    :meth:`result` waits for it, bounded."""

    def __init__(self, child: Callable[[], bool]) -> None:
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
            pid = os.fork()
        if pid == 0:  # the child: report through the pipe and leave, no cleanup of the parent's
            code = 1
            try:
                os.close(read_end)
                code = 0 if child() else 1
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    os.write(write_end, bytes([code]))
                finally:
                    os._exit(code)
        os.close(write_end)
        self.pid: int | None = pid
        self._read = read_end

    def result(self, timeout: float) -> bool | None:
        """True when ``child`` returned True, False when it returned False or raised, None when
        it did not end within ``timeout`` seconds (it is killed)."""
        ready, _, _ = select.select([self._read], [], [], timeout)
        answer = os.read(self._read, 1) if ready else b""
        self.close()
        return None if not answer else answer == b"\x00"

    def close(self) -> None:
        """Kill the child if it still runs, and reap it."""
        pid, self.pid = self.pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if self._read >= 0:
            os.close(self._read)
            self._read = -1


@contextmanager
def held_by_another_thread(lock: Any) -> Iterator[None]:
    """``lock`` held by another thread while inside (as a thread of a process that forks may
    hold it); released, and the thread joined, on leaving."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert held.wait(10), "the lock was not taken"
        yield
    finally:
        release.set()
        holder.join(10)


class ScriptsSent:
    """The Lua scripts a fleet link sends from the failure path (any thread but the link's own
    background thread: its flushes and rejoins are left out), each recorded as it is sent,
    before Redis answers: with Redis paused (SIGSTOP), a script recorded is a call in flight.
    Test code only: it wraps the link's registered scripts while inside (a context manager)."""

    def __init__(self, link: Any) -> None:
        self.link = link
        #: (script name, its args), in the order sent
        self.sent: list[tuple[str, list[Any]]] = []

    def __enter__(self) -> ScriptsSent:
        scripts = self.link._scripts
        self._scripts, self._originals = scripts, dict(scripts)
        for name, script in self._originals.items():
            scripts[name] = self._recording(name, script)
        return self

    def _recording(self, name: str, script: Any) -> Any:
        def send(*, keys: list[str], args: list[Any]) -> Any:
            if threading.current_thread() is not self.link._thread:
                self.sent.append((name, list(args)))
            return script(keys=keys, args=args)

        return send

    def count(self, name: str) -> int:
        """How many ``name`` scripts were sent so far."""
        return sum(1 for sent, _ in self.sent if sent == name)

    def __exit__(self, *exc: object) -> None:
        self._scripts.update(self._originals)  # (a link restarted meanwhile has new ones)


@contextmanager
def subscription_checks(link: Any) -> Iterator[list[float]]:
    """The checks of its silent subscription a fleet link's background thread makes while
    inside: when each began (``time.monotonic()``), noted as it begins, before Redis answers
    (with Redis paused, a check noted is one waiting for its answer). Test code only: it wraps
    the link's method while inside."""
    began: list[float] = []
    check = link._check_subscription

    def noted(pubsub: Any) -> None:
        began.append(time.monotonic())
        check(pubsub)

    link._check_subscription = noted
    try:
        yield began
    finally:
        del link._check_subscription  # (the class's again)


@contextmanager
def forked(child: Callable[[], bool]) -> Iterator[Forked]:
    """Fork a child running ``child``; it is killed and reaped on leaving, failed or not."""
    proc = Forked(child)
    try:
        yield proc
    finally:
        proc.close()


class ForgetfulForwarder:
    """A TCP forwarder to ``port`` on 127.0.0.1 that can forget the connections open now
    (:meth:`forget`) as a NAT, a firewall or a load balancer forgets a flow: what either side
    sends on them is dropped, and neither side is told (no reset, no close). Connections made
    afterwards pass. ``url(redis_url)``: that URL through this forwarder. Closed on leaving.
    ``forget(subscriptions_only=True)`` forgets only the connections that sent a SUBSCRIBE (a
    link's subscription), its commands' connections left passing."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        #: the forgotten-flags of the connections whose client sent a SUBSCRIBE
        self._subscribed: list[threading.Event] = []
        self._closed = False
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def url(self, redis_url: str) -> str:
        return redis_url.replace(f":{self._target}/", f":{self.port}/")

    def forget(self, *, subscriptions_only: bool = False) -> None:
        with self._lock:
            for _, _, forgotten in self._pairs:
                if not subscriptions_only or any(f is forgotten for f in self._subscribed):
                    forgotten.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed (see close)
                return
            try:
                server = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:  # the target is gone (its server stopped): the client is told so
                client.close()
                continue
            forgotten = threading.Event()
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._pairs.append((client, server, forgotten))
            for a, b, up in ((client, server, True), (server, client, False)):
                args = (a, b, forgotten, up)
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, forgotten: threading.Event, up: bool
    ) -> None:
        source.settimeout(None)
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                if up and b"SUBSCRIBE" in data.upper():
                    with self._lock:
                        self._subscribed.append(forgotten)
                if not forgotten.is_set():
                    sink.sendall(data)
            except OSError:
                break
        if not forgotten.is_set():
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop accepting, then close every connection. The listener is shut down before it
        is closed: closing it alone leaves an ``accept()`` already waiting in the kernel
        listening, which takes the next connection (a link reconnecting) after the
        forwarder is closed, maybe once the target is gone."""
        with self._lock:
            self._closed = True
            pairs, self._pairs = self._pairs, []
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() waiting
        self._listener.close()
        self._accepting.join(10.0)
        for client, server, _ in pairs:
            client.close()
            server.close()

    def __enter__(self) -> ForgetfulForwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
