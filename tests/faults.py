"""A scripted fault injector for workloads under real faults (tests/test_transfers.py,
tests/test_guard_under_faults.py): each fault of its script comes after ``pace`` more units of
the workload settled, through the test server and the fault proxy in front of it."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence

from resilient_db.testing import FaultProxy, PostgresServer

#: the faults a script may name
FAULTS = ("kill-backends", "lose-answers", "cut", "swallow", "swallow-late", "crash-restart")


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
