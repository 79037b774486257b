"""The shared breaker's rules under review r28, against a real PostgreSQL and a real Redis:
a hung database's failures add up (one per failover window, not one per connect timeout); a
half-open probe failing past its lease counts nowhere; ``reload_config()`` switching Redis on
keeps an opening this process made; a success resets only the run of failures it saw; a new
Redis outage after a logged "restored" warns at once."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import Gate, fleet, shared
from processes import wait_for
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._breaker import Breaker
from resilient_db._config import mask_url
from resilient_db._fleet import links
from resilient_db.testing import FaultProxy, RedisServer, free_port

pytestmark = pytest.mark.slow

DOWN = "DO $$ BEGIN RAISE EXCEPTION 'the database is down' USING ERRCODE = '57P03'; END $$"


def _fleet_key(redis: RedisServer, service: str, key: str, field: str | None = None) -> Any:
    client = redis.client()
    name = f"resilient_db:{{{service}}}:{key}"
    value = client.get(name) if field is None else client.hget(name, field)
    return None if value is None else value.decode()


def _fleet_state(redis: RedisServer, service: str) -> str:
    return str(_fleet_key(redis, service, "breaker", "st") or "closed")


def _breaker(factory: rdb.ResilientSession[Session]) -> Breaker:
    breaker = factory.policy.breaker
    assert breaker is not None
    return breaker


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    e = sa.create_engine(pg_url)
    yield e
    e.dispose()


# -- F1: a hung database ---------------------------------------------------------------------
CONNECT_TIMEOUT = 2  # seconds (libpq's least)
#: the units' starts, one every SPACING seconds: their connects time out as far apart
UNITS, SPACING = 12, 0.3


@pytest.mark.parametrize("shared_breaker", [False, True], ids=["local", "redis"])
def test_a_hung_database_opens_the_breaker_after_about_threshold_windows_not_timeouts(
    fault_proxy: FaultProxy,
    pg_database: str,
    redis_server: RedisServer,
    service: str,
    shared_breaker: bool,
) -> None:
    """A blackholed database: every connect hangs until its timeout, so units started one
    after another fail one connect timeout after each began, spread as their starts were.
    Each began before the first of them failed; the old rule (an attempt that began before
    the last counted failure is not counted) counted one failure per connect timeout: 12
    units over 3.3 s, threshold 3, counted 2 and left the breaker closed (a threshold of 5 and
    the default 5 s timeout: 25 s of units sent to a dead database). An attempt that never got
    a connection was not in flight when another failed: each of these counts, and the
    threshold-th opens the breaker while the batch is still failing; the units that begin
    after it are rejected at once."""
    threshold = 3
    config = rdb.Config(
        retry=False,
        failure_threshold=threshold,
        reset_timeout=60.0,
        redis_url=redis_server.url if shared_breaker else None,
    )
    engine = sa.create_engine(
        fault_proxy.url(pg_database),
        poolclass=NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT},
    )
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    if shared_breaker:
        wait_for(lambda: shared(service)["connected"], "the link")
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1

    order: list[str] = []  # unit ends and the opening, in the order they happened
    lock = threading.Lock()

    def opened(event: rdb.SelfHealEvent) -> None:
        if event.name == "breaker_opened" and event.service == service:
            with lock:
                order.append("opened")

    def unit() -> None:
        try:
            Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
            outcome = "ok"
        except rdb.CircuitOpenError:
            outcome = "rejected"
        except sa.exc.OperationalError:
            outcome = "failed"
        with lock:
            order.append(outcome)

    rdb.add_hook(opened)
    fault_proxy.blackhole()
    threads = [threading.Thread(target=unit) for _ in range(UNITS)]
    try:
        for thread in threads:
            thread.start()
            time.sleep(SPACING)  # the next unit's start (a schedule, not a backoff)
        for thread in threads:
            thread.join(timeout=4 * CONNECT_TIMEOUT + UNITS * SPACING)
        assert not any(t.is_alive() for t in threads)
    finally:
        rdb.remove_hook(opened)
    # each failed connect counted: the threshold-th failure opened the breaker (its hook runs
    # before that unit's end is noted), while the batch was still failing
    opened_at = order.index("opened")
    assert order[:opened_at] == ["failed"] * (threshold - 1), order
    assert order.count("opened") == 1, order
    assert set(order) <= {"failed", "opened", "rejected"}, order
    assert order.count("failed") + order.count("rejected") == UNITS, order
    assert "failed" in order[opened_at + 1 :], order  # the batch still failing meanwhile
    breaker = _breaker(Factory)
    assert breaker.state == "open"
    if shared_breaker:
        assert _fleet_state(redis_server, service) == "open"
    with pytest.raises(rdb.CircuitOpenError):  # the next unit does not wait for a timeout
        Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
    fault_proxy.restore()
    engine.dispose()


def test_a_hung_database_opens_the_fleets_breaker_across_processes(
    redis_server: RedisServer,
    fault_proxy: FaultProxy,
    pg_database: str,
    gate: Gate,
    tmp_path: Path,
) -> None:
    """The same, the units taking turns in two worker processes sharing the breaker: their
    failures reach Redis one connect timeout after each began, and Redis counts them once
    a failover window (it counted one per connect timeout: the fleet's breaker stayed closed
    for threshold x timeout)."""
    settings = {
        "SELF_HEALING_REDIS_URL": redis_server.url,
        "SELF_HEALING_RETRY": "false",
        "SELF_HEALING_FAILURE_THRESHOLD": "3",
        "SELF_HEALING_RESET_TIMEOUT": "60000",
    }
    url = f"{fault_proxy.url(pg_database)}?connect_timeout={CONNECT_TIMEOUT}"
    with fleet(2, url, settings, tmp_path) as workers:
        for w in workers:
            assert w.ask("wait", what="connected", timeout=20)["ok"], w.log()
            assert w.run(1) == {"ok": 1, "open": 0, "errors": {}}
        fault_proxy.blackhole()
        for i in range(UNITS):
            assert workers[i % 2].ask("start", n=1) == {"started": 1}
            time.sleep(SPACING)  # the next unit's start (a schedule, not a backoff)
        for w in workers:
            assert w.ask("wait", what="open", timeout=4 * CONNECT_TIMEOUT)["ok"], w.log()
        healths = [w.ask("health")["services"]["fleet"]["breaker"] for w in workers]
        assert [h["shared"]["fleet_opens"] for h in healths] == [1, 1]
        assert sum(h["shared"]["opened_here"] for h in healths) == 1
        assert _fleet_state(redis_server, "fleet") == "open"
        fault_proxy.restore()


def test_the_fleet_merges_a_failure_only_within_the_window_after_the_counted_one(
    redis_server: RedisServer, engine: sa.Engine, service: str
) -> None:
    """The script's rule on its own (another process's failures are script calls with their
    attempt's age): an attempt older than the last counted failure is merged when it fails
    within the window after it, and counted when it fails later (a slow failure)."""
    # the library's window (FAILOVER_WINDOW, 1 s), not a shorter one: the calls merged within it
    # follow each other at once, and a busy machine's stall does not outlast 1 s
    config = rdb.Config(redis_url=redis_server.url, retry=False, failure_threshold=10)
    rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: shared(service)["connected"], "the link")
    (link,) = links().values()

    def failure(age: float) -> int:
        return link.breaker_failure(service, 10, 30.0, age)[3]

    assert failure(0.0) == 1
    assert failure(5.0) == 1  # began 5 s ago, failed at once after the counted one: merged
    time.sleep(_fleet.FAILOVER_WINDOW + 0.1)  # past the window (a window, not a backoff)
    assert failure(5.0) == 2  # began before the last counted failure, failed later: counted
    assert failure(5.0) == 2  # and is the new last one: merged within its window
    assert failure(0.0) == 3  # began after it: a failure of its own, counted


# -- F2: a probe failing after its lease ran out -------------------------------------------
RESET = 0.3


def test_a_probe_failing_after_its_lease_ran_out_counts_nowhere(
    redis_server: RedisServer, engine: sa.Engine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe A is let through and hangs; its lease runs out and probe B is let through (the
    slots are given again). A fails then: it holds no slot any more, so it counts nowhere (the
    docs/many-processes.md's "a probe still running past the lease counts nowhere when it ends"; it
    re-opened the breaker for the whole fleet), and B's success closes the breaker."""
    monkeypatch.setattr(_fleet, "PROBE_LEASE_MIN", 0.5)
    config = rdb.Config(
        redis_url=redis_server.url, retry=False, reset_timeout=RESET, half_open_probes=1
    )
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: shared(service)["connected"], "the link")
    breaker = _breaker(Factory)
    breaker.open()
    time.sleep(RESET)  # the open period (not a backoff)
    a_in, a_go, b_in, b_go = (threading.Event() for _ in range(4))
    outcomes: dict[str, str] = {}

    def probe(name: str, inside: threading.Event, go: threading.Event, sql: str) -> None:
        def work(s: Session) -> Any:
            inside.set()
            assert go.wait(10)
            return s.execute(sa.text(sql)).all()

        try:
            Factory.run(work)
            outcomes[name] = "ok"
        except Exception as exc:
            outcomes[name] = type(exc).__name__

    a = threading.Thread(target=probe, args=("a", a_in, a_go, DOWN))
    b = threading.Thread(target=probe, args=("b", b_in, b_go, "SELECT 1"))
    try:
        a.start()
        assert a_in.wait(10)
        assert _fleet_state(redis_server, service) == "half-open"
        time.sleep(0.6)  # A's lease runs out (0.5 s; a lease, not a backoff)
        b.start()
        assert b_in.wait(10)  # B was let through: the slots were given again
        a_go.set()
        a.join(10)
        assert outcomes["a"] == "OperationalError"
        assert _fleet_state(redis_server, service) == "half-open"  # A counted nowhere
        b_go.set()
        b.join(10)
        assert outcomes["b"] == "ok"
    finally:
        a_go.set()
        b_go.set()
        a.join(10)
        b.join(10)
    assert _fleet_state(redis_server, service) == "closed"
    assert _fleet_key(redis_server, service, "breaker", "opens") == "1"  # the open() only
    assert breaker.state == "closed"


def test_a_probe_failing_while_it_holds_its_slot_still_opens_the_breaker(
    redis_server: RedisServer, engine: sa.Engine, service: str
) -> None:
    config = rdb.Config(
        redis_url=redis_server.url, retry=False, reset_timeout=RESET, half_open_probes=1
    )
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: shared(service)["connected"], "the link")
    _breaker(Factory).open()
    time.sleep(RESET)  # the open period (not a backoff)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(lambda s: s.execute(sa.text(DOWN)).all())
    assert _fleet_state(redis_server, service) == "open"
    assert _fleet_key(redis_server, service, "breaker", "opens") == "2"


# -- F3: reload_config() switching Redis on --------------------------------------------------
@pytest.mark.parametrize("link_up", [False, True], ids=["new-link", "link-already-up"])
def test_switching_redis_on_by_a_reload_keeps_and_shares_an_opening_made_here(
    redis_server: RedisServer,
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    link_up: bool,
) -> None:
    """The database failed and opened this process's own breaker; a reload sets
    SELF_HEALING_REDIS_URL. The shared breaker (never opened) was read back as closed, the
    local opening thrown away, and the next unit sent to the dead database. The opening is
    kept and shared, as one made while Redis was down is (``link-already-up``: another
    service of this process had the link to that Redis up already)."""
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "1")
    clean_env.setenv("SELF_HEALING_RESET_TIMEOUT", "60000")
    clean_env.setenv("SELF_HEALING_RETRY", "false")
    Factory = rdb.ResilientSession(engine, service=service)
    if link_up:
        other = f"{service}-other"
        rdb.ResilientSession(engine, service=other, config=rdb.Config(redis_url=redis_server.url))
        wait_for(lambda: shared(other)["connected"], "the other service's link")
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(lambda s: s.execute(sa.text(DOWN)).all())
    breaker = _breaker(Factory)
    assert breaker.state == "open"

    clean_env.setenv("SELF_HEALING_REDIS_URL", redis_server.url)
    rdb.reload_config()
    wait_for(lambda: shared(service)["connected"], "the link")
    wait_for(lambda: _fleet_state(redis_server, service) == "open", "the opening shared")
    assert breaker.state == "open"
    assert shared(service)["opened_here"] == 1
    with pytest.raises(rdb.CircuitOpenError) as rejected:
        Factory.run(lambda s: s.execute(sa.text(DOWN)).all())
    assert 0 < rejected.value.retry_after <= 60


def test_moving_to_another_redis_by_a_reload_keeps_and_shares_an_opening_made_here(
    redis_server: RedisServer, engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    """The database failed and opened the breaker shared through one Redis; a reload moves
    SELF_HEALING_REDIS_URL to another Redis, where no process ever opened it. Read back as
    closed there, the opening was thrown away and the next unit sent to the dead database:
    it is kept and shared through the new Redis, as when a reload switches Redis on."""
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "1")
    clean_env.setenv("SELF_HEALING_RESET_TIMEOUT", "60000")
    clean_env.setenv("SELF_HEALING_RETRY", "false")
    clean_env.setenv("SELF_HEALING_REDIS_URL", redis_server.url)
    rdb.reload_config()
    Factory = rdb.ResilientSession(engine, service=service)
    wait_for(lambda: shared(service)["connected"], "the link")
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(lambda s: s.execute(sa.text(DOWN)).all())
    breaker = _breaker(Factory)
    assert breaker.state == "open"
    with RedisServer() as other:
        clean_env.setenv("SELF_HEALING_REDIS_URL", other.url)
        rdb.reload_config()
        wait_for(lambda: shared(service)["redis"] == mask_url(other.url), "the move")
        wait_for(lambda: shared(service)["connected"], "the new link")
        wait_for(lambda: _fleet_state(other, service) == "open", "the opening shared", 5)
        assert breaker.state == "open"
        with pytest.raises(rdb.CircuitOpenError) as rejected:
            Factory.run(lambda s: s.execute(sa.text(DOWN)).all())
        assert 0 < rejected.value.retry_after <= 60


# -- F4: a success resets only the run of failures it saw ------------------------------------
def test_a_success_after_a_failure_that_expired_leaves_the_fleets_new_run_alone(
    redis_server: RedisServer, engine: sa.Engine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process's one failure expires from the fleet's memory; other processes' failures
    (their script calls) start a new run; this process's next success deleted that run's
    count, so the fleet did not open at the threshold. It resets only the run it saw."""
    monkeypatch.setattr(_fleet, "FAILURE_MEMORY_MIN", 0.3)
    threshold = 3
    config = rdb.Config(
        redis_url=redis_server.url, retry=False, failure_threshold=threshold, reset_timeout=0.1
    )
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: shared(service)["connected"], "the link")
    (link,) = links().values()
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(lambda s: s.execute(sa.text(DOWN)).all())
    assert _fleet_key(redis_server, service, "failures") == "1"
    # the failure memory (0.3 s) runs out (polling Redis, not a backoff)
    wait_for(lambda: _fleet_key(redis_server, service, "failures") is None, "the memory", 5)
    for n in (1, 2):  # another process's failures: a new run
        assert link.breaker_failure(service, threshold, 0.1, 0.0)[3] == n
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert _fleet_key(redis_server, service, "failures") == "2"  # not this process's run
    assert link.breaker_failure(service, threshold, 0.1, 0.0)[0] == "open"


def test_a_success_resets_the_run_of_failures_it_saw(
    redis_server: RedisServer, engine: sa.Engine, service: str
) -> None:
    config = rdb.Config(redis_url=redis_server.url, retry=False, failure_threshold=3)
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: shared(service)["connected"], "the link")
    (link,) = links().values()
    assert link.breaker_failure(service, 3, 30.0, 0.0)[3] == 1  # another process's
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(lambda s: s.execute(sa.text(DOWN)).all())
    assert _fleet_key(redis_server, service, "failures") == "2"
    commands = link.commands
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert _fleet_key(redis_server, service, "failures") is None
    assert link.commands == commands + 1  # the reset
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert link.commands == commands + 1  # the next success sends nothing


# -- F5: a new Redis outage after a logged "restored" ----------------------------------------
def test_a_new_redis_outage_after_a_logged_restore_warns_at_once(
    redis_server: RedisServer, engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Down, restored, down again within the minute: the second outage's warning was held
    back by the first one's once-a-minute limit (up to 60 s with "restored" the last line
    while Redis did not answer). The limit keeps repeats within one down period."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    config = rdb.Config(redis_url=redis_server.url)
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: shared(service)["connected"], "the link")
    (link,) = links().values()

    def lines() -> list[str]:
        return [
            r.getMessage().split(":")[0] for r in caplog.records if "Shared state" in r.getMessage()
        ]

    down, back = "[SELF-HEAL] Shared state unavailable", "[SELF-HEAL] Shared state restored"
    redis_server.kill()
    wait_for(lambda: lines() == [down], "the first warning", 10)
    redis_server.start()
    wait_for(lambda: lines() == [down, back], "the restored line", 10)
    redis_server.kill()
    wait_for(lambda: lines() == [down, back, down], "the second outage's warning", 10)
    # its reconnect attempts (one a second) fail again: no line more within this period
    failed_at = link._down_at
    wait_for(lambda: link._down_at > failed_at, "a failed reconnect", 10)
    failed_at = link._down_at
    wait_for(lambda: link._down_at > failed_at, "another failed reconnect", 10)
    assert lines() == [down, back, down]
    del Factory


def test_threads_of_one_process_opening_a_new_shared_breaker_say_it_once_as_their_own(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Six threads of one process fail at once against a dead database, on a service with no
    state in Redis yet. An answer computed before the opening (closed, gen 0) but taken after
    it was read as "Redis restarted or flushed": a bogus close, then a second opening "after
    another process's failures" (16 of 25 first openings); and an opening one thread made
    was taken as another process's when another thread's answer came first (counted in
    opens_followed, not breaker_opens). Once per opening now, as this process's own."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    dead = f"postgresql+psycopg://postgres:x@127.0.0.1:{free_port('127.0.0.1')}/postgres"
    engine = sa.create_engine(dead)
    config = rdb.Config(
        redis_url=redis_server.url, failure_threshold=3, reset_timeout=30, max_retries=0
    )
    services = [f"first-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    try:
        for service in services:
            Sessions = rdb.ResilientSession(engine, service=service, config=config)
            wait_for(lambda s=service: shared(s)["connected"], "the link", 5)
            start = threading.Barrier(6)

            def worker(factory: Any = Sessions, start: threading.Barrier = start) -> None:
                start.wait()
                for _ in range(4):
                    with contextlib.suppress(Exception):
                        factory.run(lambda s: s.execute(sa.text("SELECT 1")))

            threads = [threading.Thread(target=worker) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        engine.dispose()
    text = caplog.text
    assert "no state shared through Redis any more" not in text
    assert "after another process's failures" not in text
    for service in services:
        health = rdb.health()["services"][service]
        assert health["breaker"]["shared"]["opens_followed"] == 0
        assert health["counters"]["breaker_opens"] == health["breaker"]["shared"]["fleet_opens"]
