"""A process forked (gunicorn with a preloaded app) while the Redis background thread applies
another process's change of a shared breaker, inside a listener: the child gets new locks,
pybreaker's too, and its units do not hang on a lock held by a thread it does not have."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
import warnings
from typing import Any

import pybreaker
import pytest
import sqlalchemy as sa
from fleet import Gate, forked
from processes import wait_for

import resilient_db as rdb
from resilient_db._budget import budgets
from resilient_db._fleet import FleetLink
from resilient_db._internals import pybreaker_lock, renew_pybreaker_lock
from resilient_db.testing import RedisServer


def test_pybreaker_state_setter_holds_the_lock_that_a_fork_renews() -> None:
    """resilient_db reaches for pybreaker's private lock in one place (``pybreaker_lock``):
    this fails when pybreaker renames it or stops holding it while it notifies listeners."""
    cb = pybreaker.CircuitBreaker()
    lock = pybreaker_lock(cb)
    assert isinstance(lock, type(threading.RLock()))
    inside = threading.Event()
    seen: list[bool] = []

    class Probe(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            # the listener runs under the lock: another thread cannot take it now
            got = []
            t = threading.Thread(target=lambda: got.append(lock.acquire(blocking=False)))
            t.start()
            t.join(5)
            seen.append(got == [False])
            inside.set()

    cb.add_listener(Probe())
    cb.open()
    assert inside.is_set()
    assert seen == [True]
    renew_pybreaker_lock(cb)
    assert pybreaker_lock(cb) is not lock
    assert isinstance(pybreaker_lock(cb), type(threading.RLock()))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_a_listener_runs_in_the_background_thread_does_not_hang(
    redis_server: RedisServer, pg_url: str, gate: Gate
) -> None:
    reset = 0.3
    parent = os.getpid()
    inside = threading.Event()
    release = threading.Event()
    where: list[str] = []

    class Blocking(pybreaker.CircuitBreakerListener):
        """A listener that takes its time (posts to a chat hook, say): in the parent only."""

        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            if os.getpid() == parent and new_state.name == "open" and not inside.is_set():
                where.append(threading.current_thread().name)
                inside.set()
                release.wait(20)

    engine = sa.create_engine(pg_url)
    config = rdb.Config(
        redis_url=redis_server.url, retry=False, failure_threshold=2, reset_timeout=reset
    )
    Session = rdb.ResilientSession(
        engine, service="forklock", config=config, breaker_listeners=[Blocking()]
    )
    wait_for(
        lambda: rdb.health()["services"]["forklock"]["breaker"]["shared"]["connected"],
        "the link",
    )
    # another process of the fleet opens the shared breaker: its message reaches this
    # process's background thread, which applies it and runs the listener (its commands wait
    # up to 5 s for Redis's answers: the default 0.1 s timed out on a loaded machine, and this
    # is the test's tool, not the link under test)
    other = FleetLink(config.replace(redis_timeout=5.0))
    try:
        other.breaker_force("forklock", "open", reset, background=True)
        wait_for(inside.is_set, "the background thread inside the listener", timeout=10)
    finally:
        other.close()
    assert where[0].startswith("resilient_db-redis")
    gate.set(down=True)
    read_end, write_end = os.pipe()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
            pid = os.fork()
        if pid == 0:  # the child: a gunicorn worker
            code = 1
            try:
                engine.dispose(close=False)
                time.sleep(2 * reset)  # past the breaker's open period (not a backoff)
                done = threading.Event()
                ended: list[BaseException] = []

                def unit() -> None:
                    # a probe: the breaker half-opens, then opens again (state changes)
                    try:
                        Session.run(lambda s: s.execute(sa.text("SELECT rdb_gate()")))
                    except Exception as exc:  # reported through the exit code
                        ended.append(exc)
                    done.set()

                threading.Thread(target=unit, daemon=True).start()
                if done.wait(20) and ended and isinstance(ended[0], sa.exc.DBAPIError):
                    code = 0
            finally:
                os.write(write_end, bytes([code]))
                os._exit(code)
        os.close(write_end)
        write_end = -1
        ready, _, _ = select.select([read_end], [], [], 40)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        answer = os.read(read_end, 1) if ready else b""
        os.waitpid(pid, 0)
        assert answer == b"\x00", "the child's failing unit hung"
    finally:
        release.set()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        engine.dispose()


def _fleet_deposits(redis: RedisServer, service: str) -> float:
    """The first attempts the fleet's budget of ``service`` counts, read from Redis."""
    fields = redis.client().hgetall(f"resilient_db:{{{service}}}:budget")
    return sum(float(v) for k, v in fields.items() if k.startswith(b"d"))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_sends_the_fleet_its_own_first_attempts_not_the_parents(
    redis_server: RedisServer, pg_url: str
) -> None:
    """The parent's first attempts not yet added to the fleet's budget when it forks are the
    parent's to send: the child sends only those it makes itself."""
    engine = sa.create_engine(pg_url)
    # a generous Redis timeout: a script that times out is not sent again (it may have run), so
    # on a loaded machine the freshly restarted Redis's first, slow answer would lose a deposit
    config = rdb.Config(
        redis_url=redis_server.url,
        redis_timeout=5.0,
        retry_budget=0.5,
        retry_budget_floor=0,
        circuit_breaker=False,
    )
    Session = rdb.ResilientSession(engine, service="forkbudget", config=config)
    budget = budgets()["forkbudget"]
    wait_for(lambda: budget.shared, "the budget shared")
    redis_server.kill()  # the parent's first attempts wait for Redis, in the parent
    wait_for(lambda: not budget.shared, "the link down")
    for _ in range(5):
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))

    def child() -> bool:
        engine.dispose(close=False)  # the parent's connections are the parent's
        link = budget._fleet
        deadline = time.monotonic() + 15
        # the child's own first attempts once Redis is back: made earlier, a slow restart of
        # Redis (a loaded machine) could age them out of the window before they are sent
        while not link.up and time.monotonic() < deadline:
            time.sleep(0.005)
        if not link.up:
            return False
        for _ in range(2):
            Session.run(lambda s: s.execute(sa.text("SELECT 1")))
        ran = budget._clock()
        link._flush_budgets()  # what this process has for the fleet, now
        # sent by this call or by the link's thread: wait for Redis's answer
        while budget._fleet_view[0] < ran and time.monotonic() < deadline:
            time.sleep(0.005)
        return bool(budget._fleet_view[0] >= ran)

    try:
        with forked(child) as proc:
            rdb.reset_state()  # the parent forgets its first attempts: never sent
            redis_server.start()
            assert proc.result(timeout=20) is True, "the child did not reach the fleet"
        assert _fleet_deposits(redis_server, "forkbudget") == 2
    finally:
        engine.dispose()
