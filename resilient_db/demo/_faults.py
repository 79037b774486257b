"""The demo's fault schedule: real faults against a real server, one after another.

Faults (``kind`` names as in the report):

``killed_backends``       ``pg_terminate_backend`` of every worker connection (SQLSTATE 57P01)
``server_crash``          immediate shutdown of the embedded server, restarted after an outage
``failover``              ``--ha``: the primary crashed, the standby promoted after an outage
``proxy_outage``          the fault proxy refuses and cuts every connection for an outage
``connections_cut``       the fault proxy resets every open connection (no SQLSTATE: a disconnect)
``lost_commit_answer``    a COMMIT reaches the server, its answer is lost (verified, not replayed)
``commit_outcome_unknown`` a lost COMMIT answer while nobody can connect to verify it
``deadlock``              two units lock the same two rows in opposite order (40P01)
``serialization_conflict`` two SERIALIZABLE units each write what the other read (40001)
``illegal_transition``    status changes the rules forbid, by flush, ORM bulk UPDATE and raw SQL
``redis_outage``          ``--processes``: the Redis the demo started is stopped (its process
                          exits, as an operator's restart does), then started again on the same
                          port and password, with no keys (no persistence)

Against an existing server (``--url``) the server is never crashed: the outage comes from the
proxy instead, and killed backends are only the demo's own connections. A Redis given with
``--redis-url`` is never stopped: it is the user's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

from ._workload import wait_until

__all__ = ["Failover", "FaultLog", "RedisControl", "Schedule", "Stage", "Window"]


#: how long a contention pair's units get to meet (their barrier gives up after 3 s)
_MEET_SECONDS = 5.0
#: seconds planned, after Redis is started again, for every process to rejoin it (each tries
#: once a second); the schedule goes on once they all have
REDIS_REJOIN_SECONDS = 2.5
#: the longest the schedule waits for that before it goes on (the report says who was late)
_REJOIN_TIMEOUT = 10.0


@dataclass(frozen=True)
class Window:
    """When an outage began and ended (seconds since the workload started)."""

    kind: str
    start: float
    end: float


@dataclass
class FaultLog:
    """Faults injected so far, by kind, and the outage windows. Thread-safe."""

    clock: Callable[[], float]
    on_event: Callable[[str], None]
    injected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    windows: list[Window] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, message: str | None, amount: int = 1) -> None:
        with self._lock:
            self.injected[kind] += amount
        if message is not None:
            self.on_event(message)

    def skip(self, kind: str, message: str) -> None:
        with self._lock:
            self.skipped[kind] += 1
        self.on_event(message)

    def window(self, kind: str, start: float, end: float) -> None:
        with self._lock:
            self.windows.append(Window(kind, start, end))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.injected)


class Failover(Protocol):
    """What the ``failover`` fault needs: a :class:`~resilient_db.testing.StandbyPair`'s crash
    and promotion, and whether the workload has written on the primary yet."""

    def crash_primary(self) -> None: ...

    def promote(self) -> float: ...

    def written(self) -> bool: ...


class RedisControl(Protocol):
    """What the ``redis_outage`` fault needs: the Redis the fleet shares, stopped and started
    again (the demo's own only), and whether every process has rejoined it since."""

    def stop(self) -> None: ...

    def start(self) -> None: ...

    def rejoined(self) -> bool: ...

    def written_meanwhile(self) -> bool:
        """Whether every worker process wrote a unit (its transaction begun) since the stop."""
        ...


class Pair(Protocol):
    """Two contending units under way (a ``ContentionPair`` of either workload)."""

    def wait_met(self, timeout: float) -> bool: ...

    def join(self) -> None: ...


class Contender(Protocol):
    """What starts the contention pairs: the workload's ``Runner`` (either workload's: the
    asyncio one starts its units as tasks of its event loop)."""

    def contend(self, kind: str, rows: tuple[int, int], key: str) -> Pair: ...


class Attempts(Protocol):
    """The illegal status moves, one at a time (the workload's ``IllegalAttempts``, or for the
    asyncio one, its attempts made on its event loop)."""

    def attempt(self) -> str: ...


@dataclass(frozen=True)
class Stage:
    """What the workload and its faults run against: the server, the fault proxy the workers
    connect through, the demo's database, the runner of its units, the illegal status moves to
    attempt and the rows of the deadlock and serialization pairs."""

    server: PostgresServer
    proxy: FaultProxy
    database: str
    runner: Contender
    illegal: Attempts
    deadlock_rows: tuple[int, int]
    serial_rows: tuple[int, int]


@dataclass(frozen=True)
class _Planned:
    kind: str
    run: Callable[[], None]
    duration: float  # the time it is expected to take, to decide whether it still fits
    #: what the fault waits for (while it still fits) to show anything: a failover before the
    #: workers' first writes shows no write on the old primary, nothing of what it is for
    ready: Callable[[], bool] | None = None


class Schedule(threading.Thread):
    """Injects the faults in order, spaced over ``seconds``, until ``stop`` is set.

    A fault starts at its planned time or after the previous one ended, whichever is later;
    a fault that would not end (with a margin for recovery) before the workload does is skipped.
    """

    def __init__(
        self,
        *,
        seconds: float,
        stage: Stage,
        application_name: str,
        log: FaultLog,
        stop: threading.Event,
        service: str,
        crash_allowed: bool,
        failover: Failover | None = None,
        redis: RedisControl | None = None,
    ) -> None:
        super().__init__(name="demo-faults", daemon=True)
        self.seconds = seconds
        self.stage = stage
        self.application_name = application_name
        self.log = log
        self.stop = stop
        self.service = service
        self.crash_allowed = crash_allowed
        self.failover = failover
        self.redis = redis
        self.outage = min(3.0, max(1.5, seconds * 0.06))
        self.gap = max(0.8, min(2.5, seconds / 16))
        self._began: float | None = None  # (monotonic) when the schedule began
        self.error: BaseException | None = None
        self._pairs = 0
        #: the contention pairs started, their units left to end on their own (joined at the end)
        self._contention: list[Pair] = []
        self._illegal_thread = threading.Thread(
            target=self._illegal_loop, name="demo-illegal", daemon=True
        )

    # -- the plan -------------------------------------------------------------------------------
    def plan(self) -> list[_Planned]:
        outage_kind = "server_crash" if self.crash_allowed else "proxy_outage"
        outage_fn = self.crash_server if self.crash_allowed else self.proxy_outage
        outage_ready: Callable[[], bool] | None = None
        if self.failover is not None:  # a primary and a standby: fail over instead (once)
            outage_kind, outage_fn = "failover", self.fail_over
            outage_ready = self.failover.written
        recover = self.outage + 1.5  # the outage, then the breaker's probe closes it
        # Redis lost before the database's outage: that outage's opening, made by one process
        # and followed by every other, shows the breaker shared again once they rejoined
        redis = (
            [_Planned("redis_outage", self.redis_outage, self.outage + REDIS_REJOIN_SECONDS)]
            if self.redis is not None and self.redis_fits()
            else []
        )
        first = [
            _Planned("killed_backends", self.kill_backends, 0.5),
            *redis,
            _Planned(outage_kind, outage_fn, recover, outage_ready),
            _Planned("serialization_conflict", self.serialization_conflict, 1.0),
            _Planned("connections_cut", self.cut_connections, 0.5),
            _Planned("lost_commit_answer", self.lose_commit_answer, 1.0),
            _Planned("deadlock", self.deadlock, 1.0),
            _Planned("commit_outcome_unknown", self.unverifiable_commit, recover + 1.0),
        ]
        again = [
            _Planned("killed_backends", self.kill_backends, 0.5),
            _Planned("serialization_conflict", self.serialization_conflict, 1.0),
            _Planned("deadlock", self.deadlock, 1.0),
            _Planned("connections_cut", self.cut_connections, 0.5),
            _Planned("lost_commit_answer", self.lose_commit_answer, 1.0),
        ]
        if not self.crash_allowed:
            # an existing server: the proxy outage once more
            again.insert(2, _Planned("proxy_outage", self.proxy_outage, recover))
        return first + again * 3

    def redis_fits(self) -> bool:
        """Whether the Redis outage fits before the database's (which opens the breaker the
        report needs): a run of less than about 11 s has room for the database's alone."""
        redis = self.outage + REDIS_REJOIN_SECONDS
        database = self.outage + 1.5
        return 2 * self.gap + redis + database + 2.0 <= self.seconds

    def run(self) -> None:
        try:
            self._illegal_thread.start()
            if self.redis is not None and not self.redis_fits():
                self.log.skip(
                    "redis_outage",
                    f"no Redis outage: a {self.seconds:g} s run has room for the database's "
                    "outage only",
                )
            started = self._began = time.monotonic()
            gap = self.gap
            planned_at = gap
            for item in self.plan():
                now = time.monotonic() - started
                at = max(planned_at, now)
                if at + item.duration + 1.0 > self.seconds:
                    if item.duration > 2.0:
                        continue  # a long fault no longer fits; a shorter one may
                    break
                if self.stop.wait(max(0.0, at - now)):
                    break
                if item.ready is not None and not self._await_ready(item, started):
                    break
                item.run()
                planned_at = at + gap
        except BaseException as exc:  # reported by the demo
            self.error = exc
        finally:
            self._illegal_thread.join()
            for pair in self._contention:
                try:
                    pair.join()
                except BaseException as exc:  # reported by the demo
                    self.error = self.error or exc

    def _await_ready(self, item: _Planned, started: float) -> bool:
        """Wait until ``item`` is ready, at most while it still fits (a loaded machine's
        workers may take seconds to their first write); False if the run was stopped."""
        if item.ready is None or item.ready():
            return True
        self.log.on_event(f"{item.kind} waits for the workers' first writes")
        latest = started + self.seconds - item.duration - 1.0
        while not item.ready():
            left = latest - time.monotonic()
            if left <= 0:
                self.log.on_event(f"no write yet; {item.kind} anyway, or it would not fit")
                return True
            if self.stop.wait(min(0.05, left)):
                return False
        return True

    def _illegal_loop(self) -> None:
        interval = min(2.0, max(0.4, self.seconds / 24))
        try:
            if self.stop.wait(min(1.0, interval)):
                return
            while True:
                self.stage.illegal.attempt()
                self.log.add("illegal_transition", None)  # the block itself is logged and shown
                if self.stop.wait(interval):
                    return
        except BaseException as exc:  # reported by the demo
            self.error = self.error or exc

    def _now(self) -> float:
        return self.log.clock()

    # -- the faults -----------------------------------------------------------------------------
    def kill_backends(self) -> None:
        try:
            killed = self.stage.server.terminate_backends(
                database=self.stage.database, application_name=self.application_name, wait=2.0
            )
        except Exception as exc:
            self.log.skip("killed_backends", f"could not kill backends: {type(exc).__name__}")
            return
        self.log.add("killed_backends", f"killed {killed} worker backends (pg_terminate_backend)")

    def crash_server(self) -> None:
        start = self._now()
        self.stage.server.crash()
        self.log.add("server_crash", f"server crashed; restarting in {self.outage:.1f} s")
        self.stop.wait(self.outage)
        self.stage.server.start()
        end = self._now()
        self.log.window("server_crash", start, end)
        self.log.on_event(f"server restarted after {end - start:.1f} s")
        self._await_breaker_closed()

    def fail_over(self) -> None:
        """Crash the primary; promote the standby after an outage (the time a failover manager
        takes to notice); the units find the new primary through the multi-host URL."""
        assert self.failover is not None
        start = self._now()
        self.failover.crash_primary()
        self.log.add(
            "failover",
            f"primary crashed (immediate stop); the standby is promoted in {self.outage:.1f} s",
        )
        self.stop.wait(self.outage)
        self.failover.promote()
        end = self._now()
        self.log.window("failover", start, end)
        self.log.on_event(f"standby promoted {end - start:.2f} s after the crash: it takes writes")
        self._await_breaker_closed()

    def redis_outage(self) -> None:
        """Stop the fleet's Redis (its process exits), start it again after an outage on the
        same port and password (without its keys), and wait until every process rejoined."""
        assert self.redis is not None
        start = self._now()
        # the latest it is started again: the database's outage still fits after it (and the
        # processes' rejoining)
        latest = (self._began or time.monotonic()) + self.seconds
        latest -= REDIS_REJOIN_SECONDS + (self.outage + 1.5) + 1.0
        # said first: the processes' warnings follow at once
        self.log.add(
            "redis_outage",
            f"stopping Redis (its process exits, as in an operator's restart); started again "
            f"in {self.outage:.1f} s, or once every process wrote meanwhile",
        )
        self.redis.stop()
        self.stop.wait(self.outage)  # (started again also when the run is cut short)
        # a loaded machine's worker process may write nothing in those seconds (its workers
        # still reconnecting after the backends killed just before): stopped until every
        # process wrote meanwhile, what the outage is there to show, while it still fits
        redis = self.redis
        while not self.stop.is_set() and time.monotonic() < latest:
            if redis.written_meanwhile() or self.stop.wait(0.1):
                break
        self.redis.start()
        self.log.on_event(
            f"Redis started again after {self._now() - start:.1f} s (same port and password, "
            "no keys)"
        )
        if not wait_until(lambda: self.stop.is_set() or redis.rejoined(), _REJOIN_TIMEOUT, 0.05):
            self.log.on_event(f"not every process rejoined Redis within {_REJOIN_TIMEOUT:g} s")

    def proxy_outage(self) -> None:
        start = self._now()
        self.stage.proxy.refuse(cut=True)
        self.log.add(
            "proxy_outage", f"network outage: proxy refuses and cuts for {self.outage:.1f} s"
        )
        self.stop.wait(self.outage)
        self.stage.proxy.restore()
        end = self._now()
        self.log.window("proxy_outage", start, end)
        self.log.on_event("network restored")
        self._await_breaker_closed()

    def cut_connections(self) -> None:
        cut = self.stage.proxy.cut_all()
        self.log.add("connections_cut", f"proxy cut {cut} open connections")

    def lose_commit_answer(self) -> None:
        before = self.stage.proxy.commits_lost
        self.stage.proxy.lose_commit_answer(1)
        if wait_until(lambda: self.stage.proxy.commits_lost > before, 3.0):
            self.log.add("lost_commit_answer", "a COMMIT answer was lost on its way back")
        else:
            self.stage.proxy.lose_commit_answer(0)
            self.log.skip("lost_commit_answer", "no COMMIT went through the proxy in time")

    def unverifiable_commit(self) -> None:
        """Lose a COMMIT answer while new connections are refused: the commit can't be
        verified, the worker gets CommitOutcomeUnknownError and checks by idempotency key."""
        before = self.stage.proxy.commits_lost
        start = self._now()
        self.stage.proxy.refuse()  # open connections keep working, new ones are refused
        self.stage.proxy.lose_commit_answer(1)
        lost = wait_until(lambda: self.stage.proxy.commits_lost > before, 3.0)
        if lost:
            self.stage.proxy.cut_all()
            self.log.add(
                "commit_outcome_unknown",
                f"a COMMIT answer was lost and the network is down for {self.outage:.1f} s",
            )
            self.stop.wait(self.outage)
        else:
            self.log.skip("commit_outcome_unknown", "no COMMIT went through the proxy in time")
        self.stage.proxy.restore()
        if lost:
            self.log.window("commit_outcome_unknown", start, self._now())
            self.log.on_event("network restored")
            self._await_breaker_closed()

    def deadlock(self) -> None:
        if self._contend("deadlock", self.stage.deadlock_rows, "d"):
            self.log.add("deadlock", "two units locked the same rows in opposite order")
        else:
            self.log.skip("deadlock", "deadlock pair did not meet (another fault interfered)")

    def serialization_conflict(self) -> None:
        if self._contend("serialization", self.stage.serial_rows, "s"):
            self.log.add(
                "serialization_conflict", "two SERIALIZABLE units wrote what the other read"
            )
        else:
            self.log.skip("serialization_conflict", "serializable pair did not meet")

    def _contend(self, kind: str, rows: tuple[int, int], prefix: str) -> bool:
        """Start a contention pair; whether its units met. The schedule goes on once they have:
        their conflict is under way, and how long its loser takes to heal is the workload's."""
        self._pairs += 1
        pair = self.stage.runner.contend(kind, rows, f"{prefix}{self._pairs}")
        self._contention.append(pair)
        return pair.wait_met(_MEET_SECONDS)

    def _await_breaker_closed(self, timeout: float = 8.0) -> None:
        """Wait until the breaker has closed again (or never opened), for a clean next fault."""

        def closed() -> bool:
            entry: Mapping[str, Any] = rdb.health()["services"].get(self.service) or {}
            breaker = entry.get("breaker") or {}
            return bool(breaker.get("state", "closed") == "closed")

        wait_until(closed, timeout, interval=0.05)
