"""One worker process of ``resilient-db demo --processes N``.

Started by :class:`~resilient_db.demo._fleet.FleetDemo` as a new interpreter (spawned, never
forked from a process that already has threads and connections), with ``SELF_HEALING_REDIS_URL``
and ``SELF_HEALING_RETRY_BUDGET`` in its environment, like any process of a fleet: it builds its
own engine and pool, its :class:`~resilient_db.ResilientSession` on the demo's service name, and
so joins the breaker and retry budget the other processes share through Redis.

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
from sqlalchemy.orm import Session

import resilient_db as rdb

from ._run import (
    _DRAIN_SECONDS,
    APPLICATION_NAME,
    SERVICE,
    Demo,
    DemoOptions,
    _BreakerWatch,
    _captured_logs,
    _LogTap,
    demo_config,
)
from ._verify import BreakerEvent
from ._workload import Change, Ledger, Runner, Unit, Worker

__all__ = ["AckRunner", "fleet_config", "main", "member_engine_options"]

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


def member_engine_options(workers: int) -> dict[str, Any]:
    """``create_engine`` options of a worker process (the same connection settings as the
    single-process demo, a pool sized for its own workers)."""
    return {
        "pool_size": workers + 2,
        "max_overflow": 4,
        "pool_timeout": 10,
        "connect_args": {
            "application_name": APPLICATION_NAME,
            "connect_timeout": 3,
            "options": "-c lock_timeout=5000 -c statement_timeout=30000",
        },
    }


def _server_port(session: Session) -> int | None:
    """The port of the server (or proxy) the session's connection went to, as libpq reports it
    for a multi-host URL (psycopg's ``ConnectionInfo.port``): no round trip."""
    driver_connection = session.connection().connection.driver_connection
    port = getattr(getattr(driver_connection, "info", None), "port", None)
    return int(port) if port is not None else None


class AckRunner(Runner):
    """A :class:`Runner` that also notes, per server port, the first and last time a write was
    acknowledged and how many were: after a failover, the first write acknowledged on the new
    primary ends the write-availability gap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, list[float]] = {}  # port -> [first, last, count]
        self._acks_lock = threading.Lock()

    def run(self, unit: Unit) -> list[Change] | None:
        where: list[int] = []

        def noted(session: Session) -> list[Change]:
            changes = unit.fn(session)
            if changes:
                port = _server_port(session)
                where[:] = [port] if port is not None else []
            return changes

        changes = super().run(dataclasses.replace(unit, fn=noted))
        if changes and where:
            now = time.time()
            with self._acks_lock:
                entry = self._acks.setdefault(where[0], [now, now, 0])
                entry[1] = now
                entry[2] += 1
        return changes

    def acks(self) -> dict[str, list[float]]:
        with self._acks_lock:
            return {str(port): list(entry) for port, entry in self._acks.items()}


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


class _MemberTap(_LogTap):
    """Also passes on what only the fleet shows: a spent retry budget, Redis lost and back."""

    FORWARDED = frozenset({"budget_exhausted", "shared_state_down", "shared_state_restored"})

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "self_heal", None)
        if not self.verbose and isinstance(fields, dict) and fields.get("event") in self.FORWARDED:
            self.demo.event(record.getMessage())
        super().emit(record)


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
        )
        super().__init__(options, _ChannelView(channel))
        self.tap = _MemberTap(self, verbose=options.verbose)
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
            engine = sa.create_engine(
                str(self.spec["url"]), **member_engine_options(len(self.spec["workers"]))
            )
            try:
                self._serve(engine)
            finally:
                self.stop.set()
                self.hard_stop.set()
                engine.dispose()

    def _serve(self, engine: sa.Engine) -> None:
        spec = self.spec
        config = fleet_config(os.environ)
        factory: rdb.ResilientSession[Any] = rdb.ResilientSession(
            engine, service=SERVICE, config=config, breaker_listeners=(self.watch,)
        )
        runner = AckRunner(factory, self.ledger, self.hard_stop)
        connected = self._await_shared(_CONNECT_WAIT)
        self.channel.send(ready=os.getpid(), connected=connected)
        self.go.wait()
        if self.hard_stop.is_set():
            return
        # the workload's clock is the parent's (its start, in wall-clock time)
        self.workload_started = time.monotonic() - max(0.0, time.time() - self.start_wall)
        self.counters_before = self._counters()
        self.phase = "running"
        self.workers = [
            Worker(n, runner, self.stop, seed=self.seed + n, think=self.options.think)
            for n in spec["workers"]
        ]
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
            entry = rdb.health()["services"].get(SERVICE) or {}
            shared = (entry.get("breaker") or {}).get("shared") or {}
            if shared.get("connected"):
                return True
            if time.monotonic() > deadline or self.hard_stop.is_set():
                return False
            time.sleep(0.02)

    def _snapshot(self) -> dict[str, Any]:
        return {"totals": self.ledger.totals(), "counters": self._counters()}

    def _result(self, runner: AckRunner) -> dict[str, Any]:
        entry = rdb.health()["services"].get(SERVICE) or {}
        errors = [f"{w.name}: {w.error!r}" for w in self.workers if w.error is not None]
        errors += [f"{w.name}: busy at the drain deadline" for w in self.workers if w.is_alive()]
        return {
            **self._snapshot(),
            "retries_by_sqlstate": self.tap.snapshot(),
            "breaker": entry.get("breaker") or {},
            "budget": entry.get("budget") or {},
            "breaker_events": [[e.at, e.old, e.new] for e in self.watch.events],
            "ledger": ledger_to_json(self.ledger),
            "acks": runner.acks(),
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
