"""Workloads under real faults (tests/test_transfers.py, tests/test_guard_under_faults.py):
their configuration, the record of what each unit's ``run`` reported, and a scripted fault
injector, each fault of its script after ``pace`` more units settled, through the test server
and the fault proxy in front of it."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

#: the faults a script may name
FAULTS = ("kill-backends", "lose-answers", "cut", "swallow", "swallow-late", "crash-restart")


def workload_config() -> rdb.Config:
    """A small real backoff (the server is down for a moment during a crash-restart); the
    breaker would fail units fast during that outage: the retry loop alone rides it out."""
    return rdb.Config(
        max_retries=30,
        initial_delay=0.01,
        max_delay=0.1,
        conflict_delay=0.002,
        deadline=20.0,
        circuit_breaker=False,
    )


class Results:
    """What each unit's ``run`` reported (done, unknown, or failed with its error), by the
    unit's id, and how many times each unit's function was called (``calls``, kept by the
    test)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: set[str] = set()
        self.unknown: set[str] = set()
        self.failed: dict[str, BaseException] = {}
        self.calls: collections.Counter[str] = collections.Counter()

    def record(self, unit_id: str, error: BaseException | None) -> None:
        with self.lock:
            if error is None:
                self.done.add(unit_id)
            elif isinstance(error, rdb.CommitOutcomeUnknownError):
                self.unknown.add(unit_id)
            else:
                self.failed[unit_id] = error

    @property
    def settled(self) -> int:
        return len(self.done) + len(self.unknown) + len(self.failed)


class ScriptedFaults(threading.Thread):
    """Injects ``script``'s faults in order, each after ``pace`` more units settled
    (``settled()``), waiting at most ``step_timeout`` for them; stops by itself when the script
    ends or ``finished`` is set. A swallowed COMMIT is always released (or delivered late)
    within its own step, so no worker waits on the fault thread. ``injected`` counts the faults
    made; ``error`` is the fault thread's own error, for the test to report."""

    def __init__(
        self,
        server: PostgresServer,
        proxy: FaultProxy,
        database: str,
        *,
        script: Sequence[str],
        settled: Callable[[], int],
        finished: threading.Event,
        pace: int,
        step_timeout: float,
        name: str,
    ) -> None:
        super().__init__(name=name, daemon=True)
        unknown = sorted(set(script) - set(FAULTS))
        assert not unknown, f"no such fault: {unknown}"
        self.server, self.proxy, self.database = server, proxy, database
        self.script = tuple(script)
        self.settled, self.finished = settled, finished
        self.pace, self.step_timeout = pace, step_timeout
        self.injected: collections.Counter[str] = collections.Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for fault in self.script:
                if not self._wait_for_progress():
                    return
                getattr(self, "_" + fault.replace("-", "_"))()
                self.injected[fault] += 1
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.proxy.swallow_commit(0)
            self.proxy.release_swallowed()
            self.proxy.deliver_late_commits()

    def _wait_for_progress(self) -> bool:
        target = self.settled() + self.pace
        deadline = time.monotonic() + self.step_timeout
        while self.settled() < target and time.monotonic() < deadline:
            if self.finished.wait(0.005):
                return False
        return not self.finished.is_set()

    def _kill_backends(self) -> None:
        self.server.terminate_backends(database=self.database)

    def _lose_answers(self) -> None:
        self.proxy.lose_commit_answer(times=2)

    def _cut(self) -> None:
        self.proxy.cut_all()

    def _crash_restart(self) -> None:
        self.server.crash()
        self.server.start()

    def _swallow(self, *, late: bool = False) -> None:
        before = self.proxy.commits_swallowed
        self.proxy.swallow_commit()
        deadline = time.monotonic() + 1.0
        while self.proxy.commits_swallowed == before and time.monotonic() < deadline:
            if self.finished.wait(0.005):
                break
        self.proxy.swallow_commit(0)  # disarm before releasing: nothing stays held after this
        time.sleep(0.05)  # the client waits on its COMMIT a little
        self.proxy.release_swallowed(keep_server=late)
        if late:
            time.sleep(0.1)  # the unit settles (and replays) before its COMMIT arrives
            self.proxy.deliver_late_commits()

    def _swallow_late(self) -> None:
        self._swallow(late=True)
