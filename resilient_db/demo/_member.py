"""One worker process of ``resilient-db demo --processes N``.

Started by :class:`~resilient_db.demo._fleet.FleetDemo` as a new interpreter (spawned, never
forked from a process that already has threads and connections), with ``SELF_HEALING_REDIS_URL``
and ``SELF_HEALING_RETRY_BUDGET`` in its environment, like any process of a fleet: it builds its
own engine and pool, its :class:`~resilient_db.ResilientSession` on the demo's service name (with
``--async``: its event loop, an async engine on asyncpg and an
:class:`~resilient_db.AsyncResilientSession`), and so joins the breaker and retry budget the
other processes share through Redis.

The parent talks to it through one JSON object a line. On stdin: the specification first
(database URL, worker numbers, seed, ...), then ``{"op": "start", "wall": t}``, ``{"op":
"stop"}`` (finish the current units) and ``{"op": "hard_stop"}`` (stop waiting); end of input
means the parent is gone. On stdout: ``ready``, ``event`` (lines for the display), ``progress``
(twice a second) and, at the end, ``result``: the ledger, counters, breaker and budget as this
process saw them, and where and when its writes were acknowledged (for the failover's gap).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import resilient_db as rdb

from . import _workload, _workload_async
from ._ledger import Ledger
from ._loop import EventLoop
from ._run import (
    _DRAIN_SECONDS,
    SERVICE,
    Demo,
    DemoOptions,
    _BreakerWatch,
    _captured_logs,
    _LogTap,
    create_workers_engine,
    demo_config,
)
from ._verify import BreakerEvent
from ._workload import AckRunner

__all__ = ["AckRunner", "fleet_config", "main", "shared_connected"]

#: seconds a new process waits for its first connection to Redis before it reports ready
_CONNECT_WAIT = 10.0
_PROGRESS_INTERVAL = 0.5


def fleet_config(environ: Mapping[str, str]) -> rdb.Config:
    """The demo's numbers (:func:`~resilient_db.demo.demo_config`), with the Redis URL and retry
    budget read from ``environ`` as any process of a fleet reads them."""
    shared = rdb.load_config(environ)
    return dataclasses.replace(
        demo_config(),
        redis_url=shared.redis_url,
        redis_timeout=shared.redis_timeout,
        retry_budget=shared.retry_budget,
        retry_budget_floor=shared.retry_budget_floor,
    )


class _Channel:
    """JSON lines to the parent (from any thread)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, **message: Any) -> None:
        line = json.dumps(message)
        with self._lock:
            try:
                self._out.write(line + "\n")
                self._out.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass  # the parent is gone; stdin's end stops this process


class _ChannelView:
    """The :class:`~resilient_db.demo._view.View` of a worker process: its events go to the
    parent, which shows them; nothing else is shown here."""

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel

    def start(self, title: str, snapshot: Any) -> None:
        """Nothing to show here."""

    def event(self, at: float | None, message: str) -> None:
        self.channel.send(event=message)

    def tick(self) -> None:
        """Nothing to show here."""

    def stop(self) -> None:
        """Nothing to show here."""

    def report(self, report: Mapping[str, Any]) -> None:
        """The parent reports."""


#: the link to Redis lost and back (``resilient_db._fleet``'s events)
LINK_EVENTS = frozenset({"shared_state_down", "shared_state_restored"})


class _MemberTap(_LogTap):
    """Also passes on what only the fleet shows (``forwarded``: a spent retry budget, Redis lost
    and back), and keeps the link's events with their wall-clock times, for the report of the
    Redis outage: when each process warned and rejoined."""

    FORWARDED = frozenset({"budget_exhausted", *LINK_EVENTS})

    def __init__(
        self, demo: Demo, *, verbose: bool, forwarded: frozenset[str] = FORWARDED, prefix: str = ""
    ) -> None:
        super().__init__(demo, verbose=verbose)
        self.forwarded = forwarded
        self.prefix = prefix
        #: (wall-clock time, event, line) of each of the link's lines
        self.link_events: list[tuple[float, str, str]] = []
        self._link_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "self_heal", None)
        name = fields.get("event") if isinstance(fields, dict) else None
        if name in LINK_EVENTS:
            with self._link_lock:
                self.link_events.append((record.created, str(name), record.getMessage()))
        if not self.verbose and name in self.forwarded:
            self.demo.event(self.prefix + record.getMessage())
        super().emit(record)

    def link(self) -> dict[str, Any]:
        """The link's events so far, and whether it is up now (as ``health()`` says)."""
        with self._link_lock:
            events = [list(e) for e in self.link_events]
        shared = _shared()
        return {
            "events": events,
            "connected": bool(shared.get("connected")),
            "opened_here": int(shared.get("opened_here", 0)),
        }


def _shared() -> dict[str, Any]:
    entry: Mapping[str, Any] = rdb.health()["services"].get(SERVICE) or {}
    return dict((entry.get("breaker") or {}).get("shared") or {})


def shared_connected() -> bool:
    """Whether this process's breaker of the demo's service follows the fleet's (its link to
    Redis is up), as ``health()`` says."""
    return bool(_shared().get("connected"))


class _QuietWatch(_BreakerWatch):
    """Records the state changes of this process's view of the shared breaker for the report,
    without a line each: the parent shows the shared breaker's changes once."""

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if self.active:
            old = getattr(old_state, "name", str(old_state))
            new = getattr(new_state, "name", str(new_state))
            self.events.append(BreakerEvent(self.demo.elapsed(), old, new))


class Member(Demo):
    """The share of the demo one process runs: its workers, its ledger, its view of the
    shared breaker. The parent runs the faults and checks the database."""

    def __init__(self, spec: Mapping[str, Any], channel: _Channel) -> None:
        options = DemoOptions(
            seconds=float(spec["seconds"]),
            workers=len(spec["workers"]),
            seed=int(spec["seed"]),
            think=float(spec["think"]),
            verbose=bool(spec["verbose"]),
            use_async=bool(spec.get("async", False)),
        )
        super().__init__(options, _ChannelView(channel))
        self.tap: _MemberTap = _MemberTap(self, verbose=options.verbose)
        self.watch = _QuietWatch(self)
        self.spec = spec
        self.channel = channel
        self.go = threading.Event()
        self.start_wall = time.time()

    def listen(self, stdin: IO[str]) -> None:
        """The parent's commands; the end of stdin (the parent is gone) stops everything."""
        for line in stdin:
            try:
                command = json.loads(line)
            except ValueError:
                continue
            op = command.get("op")
            if op == "start":
                self.start_wall = float(command.get("wall", time.time()))
                self.go.set()
            elif op == "stop":
                self.stop.set()
            elif op == "hard_stop":
                self.hard_stop.set()
        self.stop.set()
        self.hard_stop.set()
        self.go.set()

    def serve(self) -> None:
        with _captured_logs(self.tap):
            # the connection settings of the single-process demo, a pool sized for its workers
            engine = create_workers_engine(
                str(self.spec["url"]),
                use_async=self.options.use_async,
                pool_size=len(self.spec["workers"]) + 2,
                max_overflow=4,
            )
            try:
                self._serve(engine)
            finally:
                self.stop.set()
                self.hard_stop.set()
                self._dispose(engine)

    def _serve(self, engine: sa.Engine | AsyncEngine) -> None:
        spec = self.spec
        config = fleet_config(os.environ)
        runner: _workload.AckRunner | _workload_async.AckRunner
        self.engine_driver = engine.dialect.driver
        if isinstance(engine, AsyncEngine):
            self.loop = EventLoop().start()
            afactory: rdb.AsyncResilientSession[Any] = rdb.AsyncResilientSession(
                engine, service=SERVICE, config=config, breaker_listeners=(self.watch,)
            )
            runner = _workload_async.AckRunner(afactory, self.ledger, self.hard_stop)
        else:
            factory: rdb.ResilientSession[Any] = rdb.ResilientSession(
                engine, service=SERVICE, config=config, breaker_listeners=(self.watch,)
            )
            runner = _workload.AckRunner(factory, self.ledger, self.hard_stop)
        self.runner = runner
        connected = self._await_shared(_CONNECT_WAIT)
        self.channel.send(ready=os.getpid(), connected=connected)
        self.go.wait()
        if self.hard_stop.is_set():
            return
        # the workload's clock is the parent's (its start, in wall-clock time)
        self.workload_started = time.monotonic() - max(0.0, time.time() - self.start_wall)
        self.counters_before = self._counters()
        self.phase = "running"
        self.workers = [self._new_worker(n) for n in spec["workers"]]
        for worker in self.workers:
            worker.start()
        while not self.stop.wait(_PROGRESS_INTERVAL):
            self.channel.send(progress=self._snapshot())
        deadline = time.monotonic() + _DRAIN_SECONDS
        for worker in self.workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
        if any(w.is_alive() for w in self.workers):
            self.hard_stop.set()
            for worker in self.workers:
                worker.join(timeout=10)
        self.channel.send(result=self._result(runner))

    def _await_shared(self, timeout: float) -> bool:
        """Wait until the breaker follows the fleet's (the link to Redis is up)."""
        deadline = time.monotonic() + timeout
        while True:
            if shared_connected():
                return True
            if time.monotonic() > deadline or self.hard_stop.is_set():
                return False
            time.sleep(0.02)

    def _snapshot(self) -> dict[str, Any]:
        return {
            "totals": self.ledger.totals(),
            "counters": self._counters(),
            "redis": self.tap.link(),
        }

    def _result(self, runner: _workload.AckRunner | _workload_async.AckRunner) -> dict[str, Any]:
        entry: Mapping[str, Any] = rdb.health()["services"].get(SERVICE) or {}
        errors = [f"{w.name}: {w.error!r}" for w in self.workers if w.error is not None]
        errors += [f"{w.name}: busy at the drain deadline" for w in self.workers if w.is_alive()]
        if self.loop is not None and self.loop.error is not None:
            errors.append(f"{self.loop.name}: {self.loop.error!r}")
        return {
            **self._snapshot(),
            "retries_by_sqlstate": self.tap.snapshot(),
            "breaker": entry.get("breaker") or {},
            "budget": entry.get("budget") or {},
            "breaker_events": [[e.at, e.old, e.new] for e in self.watch.events],
            "ledger": ledger_to_json(self.ledger),
            "acks": runner.acks(),
            "driver": self.engine_driver,
            "errors": errors,
        }


def ledger_to_json(ledger: Ledger) -> dict[str, Any]:
    """What the parent needs of a worker process's ledger to check it against the database."""
    return {
        "done": {k: list(v) for k, v in ledger.done.items()},
        "failed": {k: list(v) for k, v in ledger.failed.items()},
        "unresolved": {k: [u.kind, list(u.potential)] for k, u in ledger.unresolved.items()},
        "ok_by_kind": dict(ledger.ok_by_kind),
        "failed_by_kind": dict(ledger.failed_by_kind),
        "failure_reasons": dict(ledger.failure_reasons),
        "blocked_by_via": dict(ledger.blocked_by_via),
        "illegal_got_through": list(ledger.illegal_got_through),
        "refused_as_duplicates": sorted(ledger.refused_as_duplicates),
        "events": dict(ledger.events),
        "failed_at": list(ledger.failed_at),
    }


def main() -> int:
    channel = _Channel(sys.stdout)
    line = sys.stdin.readline()
    if not line:
        return 2
    try:
        member = Member(json.loads(line), channel)
        threading.Thread(
            target=member.listen, args=(sys.stdin,), name="demo-commands", daemon=True
        ).start()
        member.serve()
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # reported to the parent, which shows it
        channel.send(error=f"{type(exc).__name__}: {exc}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
