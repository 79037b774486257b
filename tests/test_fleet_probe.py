"""A half-open probe of a shared breaker whose end Redis missed (it hung for a moment): the
outcome is reported when Redis answers again, before the process reads the shared state back,
so a probe that succeeded closes the breaker for the fleet instead of holding its probe slot
until the lease runs out."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import shared
from processes import wait_for
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._breaker import Breaker
from resilient_db._unit import saved_then_interrupted
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    e = sa.create_engine(pg_url)
    yield e
    e.dispose()


def _fleet_state(redis: RedisServer, service: str) -> str:
    state: bytes | None = redis.client().hget(f"resilient_db:{{{service}}}:breaker", "st")
    return (state or b"closed").decode()


#: the shared breakers' open period here (real time: what a half-open state waits for)
RESET = 0.3


def opened(
    redis: RedisServer, engine: sa.Engine, service: str, *, scripts: bool = False, **settings: Any
) -> tuple[rdb.ResilientSession[Session], Breaker]:
    """A factory of ``service`` sharing its breaker through ``redis`` (no retries, ``settings``
    besides), its breaker opened fleet-wide and the open period waited out: its next unit is a
    half-open probe. ``scripts``: loaded into Redis first (see :func:`_load_scripts`)."""
    config = rdb.Config(redis_url=redis.url, retry=False, reset_timeout=RESET, **settings)
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: shared(service)["connected"], "the link")
    if scripts:
        _load_scripts(redis)
    breaker = Factory.policy.breaker
    assert breaker is not None
    breaker.open()
    assert _fleet_state(redis, service) == "open"
    time.sleep(RESET)  # the breaker's open period (not a backoff)
    return Factory, breaker


def test_a_probe_that_succeeded_while_redis_blipped_closes_the_fleet_breaker_on_rejoin(
    redis_server: RedisServer, engine: sa.Engine
) -> None:
    Factory, breaker = opened(redis_server, engine, "blip", half_open_probes=1, failure_threshold=5)

    def probe(s: Session) -> int:
        value = int(s.execute(sa.text("SELECT 1")).scalar_one())
        redis_server.pause()  # Redis hangs just as the probe ends: its end goes unheard
        return value

    try:
        assert Factory.run(probe) == 1
        assert shared("blip")["connected"] is False
    finally:
        redis_server.resume()
    wait_for(lambda: shared("blip")["connected"], "the link, again")
    # the probe's success was reported before the shared state was read back: closed for all
    assert _fleet_state(redis_server, "blip") == "closed"
    assert breaker.state == "closed"
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1


def _load_scripts(redis: RedisServer) -> None:
    """Load every script into Redis, as a process running a while has: a script sent for the
    first time while Redis hangs would be refused late (NOSCRIPT), not run late."""
    client = redis.client()
    for source in _fleet._SCRIPTS.values():
        client.script_load(source)


@pytest.mark.parametrize("probe_ok", [True, False], ids=["probe-succeeds", "probe-fails"])
def test_an_admit_redis_ran_after_its_answer_was_lost_holds_no_probe_slot(
    redis_server: RedisServer, engine: sa.Engine, probe_ok: bool
) -> None:
    """Redis hangs while a process asks it for a half-open probe: the answer is lost (the
    process probes on its own state), but Redis runs the admit when it resumes. The slot it
    took is this process's attempt's: its outcome is reported on rejoining (a success closes
    the fleet's breaker, a failure gives the slot back), so no unit is refused afterwards by
    a probe slot that nobody holds."""
    Factory, _breaker = opened(
        redis_server,
        engine,
        "ghost",
        scripts=True,
        half_open_probes=1,
        failure_threshold=5,
        redis_timeout=0.05,
    )
    redis_server.pause()
    try:
        # the admit times out: the attempt runs as this process's own probe
        if probe_ok:
            assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
        else:
            with pytest.raises(sa.exc.DBAPIError):
                Factory.run(lambda s: s.execute(sa.text("SELECT 1/0")))
        assert shared("ghost")["connected"] is False
    finally:
        redis_server.resume()
    wait_for(lambda: shared("ghost")["connected"], "the link, again")
    held = redis_server.client().hget("resilient_db:{ghost}:breaker", "probes")
    assert int(held or 0) == 0  # the late admit's slot is not held by nobody
    assert _fleet_state(redis_server, "ghost") == ("closed" if probe_ok else "half-open")
    # the database is healthy: the next unit runs (as the fleet's probe, when half-open)
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert _fleet_state(redis_server, "ghost") == "closed"


def test_a_probe_end_redis_ran_late_is_not_counted_again_on_rejoin(
    redis_server: RedisServer, engine: sa.Engine
) -> None:
    """Redis hangs as a probe ends (two probes needed to close): the report times out, and
    Redis runs it when it resumes; the process reports it again on rejoining, as it would
    one Redis never got. One probe counts once: the fleet's breaker stays half-open, one
    success counted, until a second probe succeeds."""
    Factory, _breaker = opened(
        redis_server,
        engine,
        "twice",
        scripts=True,
        half_open_probes=2,
        failure_threshold=5,
        redis_timeout=0.05,
    )

    def probe(s: Session) -> int:
        value = int(s.execute(sa.text("SELECT 1")).scalar_one())
        redis_server.pause()  # Redis hangs just as the probe ends: its report times out
        return value

    try:
        assert Factory.run(probe) == 1
        assert shared("twice")["connected"] is False
    finally:
        redis_server.resume()
    wait_for(lambda: shared("twice")["connected"], "the link, again")
    fields = redis_server.client().hmget("resilient_db:{twice}:breaker", "st", "ok", "probes")
    assert fields == [b"half-open", b"1", b"0"]  # one success, counted once; no slot held
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert _fleet_state(redis_server, "twice") == "closed"


def test_an_opening_read_back_after_a_blip_is_not_followed_again(
    redis_server: RedisServer, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """One process opens the shared breaker; Redis hangs while the opening runs out, and the
    process's own probe closes its breaker. Read back on rejoining, Redis's state is the same
    opening, over (nobody asked it for a probe): it was followed again, logged "opened ...
    after another process's failures" and counted in ``opens_followed`` in a fleet of one. The
    next call asks Redis for a probe, as it would have."""
    Factory, _breaker = opened(redis_server, engine, "alone", failure_threshold=1)
    redis_server.pause()
    try:
        with caplog.at_level("WARNING", logger="resilient_db"):
            assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
        assert shared("alone")["connected"] is False
    finally:
        redis_server.resume()
    wait_for(lambda: shared("alone")["connected"], "the link, again")
    assert shared("alone")["opens_followed"] == 0
    assert "after another process's failures" not in caplog.text
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 2")).scalar_one()) == 2
    assert _fleet_state(redis_server, "alone") == "closed"
    assert shared("alone")["opens_followed"] == 0


def test_a_probe_ending_while_an_older_one_runs_reports_its_own_reservation(
    redis_server: RedisServer, engine: sa.Engine
) -> None:
    """Probe A (a thread) is let through and keeps running; the breaker opens again and
    half-opens, and probe B is let through and succeeds. Each probe's end took the oldest
    reservation held: B's success was reported under A's, gone with the state change, so it
    counted nowhere and B's slot stayed taken: the shared breaker stayed half-open, every call
    refused, until A ended (or the lease ran out, 10 s). B's end reports B's own now."""
    Factory, breaker = opened(redis_server, engine, "overlap", half_open_probes=1)
    admitted, release = threading.Event(), threading.Event()

    def slow(s: Session) -> int:
        admitted.set()
        assert release.wait(10)
        return int(s.execute(sa.text("SELECT 1")).scalar_one())

    probe_a = threading.Thread(target=Factory.run, args=(slow,))
    probe_a.start()
    try:
        assert admitted.wait(10)
        assert _fleet_state(redis_server, "overlap") == "half-open"
        breaker.open()  # another opening meanwhile: the reservations of the last are gone
        time.sleep(RESET)  # (the open period)
        assert Factory.run(lambda s: s.execute(sa.text("SELECT 2")).scalar_one()) == 2  # B
        assert _fleet_state(redis_server, "overlap") == "closed"
        assert Factory.run(lambda s: s.execute(sa.text("SELECT 3")).scalar_one()) == 3
    finally:
        release.set()
        probe_a.join(10)
    assert not probe_a.is_alive()


def test_a_probe_ending_while_redis_hangs_is_reported_whatever_follows(
    redis_server: RedisServer, engine: sa.Engine
) -> None:
    """Redis hangs while the fleet's half-open probe runs here: the link goes down (a unit's
    admit timed out), the probe succeeds, and other threads' admits, sent while the link was
    still up, time out after it. Every end and lost admit is reported on rejoining; keeping
    only the last four of them dropped the probe's success, whose slot was then held by
    nobody until the lease ran out (every call of the fleet refused meanwhile, the database
    healthy)."""
    timeout = 1.0
    Factory, _breaker = opened(
        redis_server,
        engine,
        "crowd",
        scripts=True,
        half_open_probes=1,
        failure_threshold=50,
        redis_timeout=timeout,
    )
    release = threading.Event()
    outcomes: list[str] = []

    def probe(s: Session) -> int:
        release.wait(10)
        return int(s.execute(sa.text("SELECT 1")).scalar_one())

    def unit() -> None:
        try:
            Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
            outcomes.append("ran")
        except rdb.CircuitOpenError:
            outcomes.append("refused")

    prober = threading.Thread(target=lambda: outcomes.append(str(Factory.run(probe))))
    prober.start()
    held = lambda: redis_server.client().hget("resilient_db:{crowd}:breaker", "probes")  # noqa: E731
    wait_for(lambda: held() == b"1", "the fleet's probe, here")
    redis_server.pause()
    try:
        # (the waits below order the events around the Redis timeout: not backoffs)
        first = threading.Thread(target=unit)  # its admit times out first: the link goes down
        first.start()
        time.sleep(timeout / 2)
        crowd = [threading.Thread(target=unit) for _ in range(6)]  # admits sent, link up
        for thread in crowd:
            thread.start()
        wait_for(lambda: shared("crowd")["connected"] is False, "the link down", 5)
        release.set()  # the probe succeeds while the link is down: its end is not sent
        prober.join(10)
        for thread in (first, *crowd):
            thread.join(10)  # their admits time out after the probe's end
        assert len(outcomes) == 8
    finally:
        redis_server.resume()
    wait_for(lambda: shared("crowd")["connected"], "the link, again")
    assert _fleet_state(redis_server, "crowd") == "closed"  # the probe's success heard
    assert int(held() or 0) == 0


def test_a_probe_running_when_a_reload_stops_sharing_gives_its_slot_back(
    redis_server: RedisServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload takes SELF_HEALING_REDIS_URL away while this process's unit is the fleet's
    half-open probe: the breaker goes on alone, and the probe's slot in Redis is given back
    then, not held by nobody until its lease runs out (the other processes, refused
    meanwhile, could not probe the database)."""
    for name in list(os.environ):
        if name.startswith("SELF_HEALING_"):
            monkeypatch.delenv(name)
    settings = {
        "SELF_HEALING_REDIS_URL": redis_server.url,
        "SELF_HEALING_RETRY": "false",
        "SELF_HEALING_RESET_TIMEOUT": str(int(RESET * 1000)),
        "SELF_HEALING_HALF_OPEN_PROBES": "1",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    rdb.reload_config()
    inside, release = threading.Event(), threading.Event()
    try:
        Factory = rdb.ResilientSession(engine, service="leaving")
        wait_for(lambda: shared("leaving")["connected"], "the link")
        breaker = Factory.policy.breaker
        assert breaker is not None
        breaker.open()
        time.sleep(RESET)  # the breaker's open period (not a backoff)

        def probe(s: Session) -> int:
            inside.set()
            release.wait(10)
            return int(s.execute(sa.text("SELECT 1")).scalar_one())

        prober = threading.Thread(target=lambda: Factory.run(probe))
        prober.start()
        held = lambda: redis_server.client().hget("resilient_db:{leaving}:breaker", "probes")  # noqa: E731
        assert inside.wait(10)
        assert held() == b"1"
        monkeypatch.delenv("SELF_HEALING_REDIS_URL")
        rdb.reload_config()  # this process leaves the shared breaker, its probe still running
        assert int(held() or 0) == 0  # given back at once: another process may probe
        release.set()
        prober.join(10)
        assert not prober.is_alive()
        assert breaker.state == "closed"  # the probe's success closes this process's breaker
        assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    finally:
        release.set()
        monkeypatch.undo()
        rdb.reload_config()


def _main_thread_waits_for_redis() -> bool:
    """Whether the main thread is inside redis-py (waiting for Redis's answer)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        if f"{os.sep}redis{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("how", ["unit", "operation", "decorated", "nested", "run_in"])
def test_a_probe_interrupted_as_its_end_is_reported_is_saved_then_interrupted_and_ends(
    redis_server: RedisServer, engine: sa.Engine, events: list[rdb.SelfHealEvent], how: str
) -> None:
    """The half-open probe wrote and committed; Redis hangs as its end is reported, and a real
    SIGINT arrives meanwhile. The ``KeyboardInterrupt`` was raised unmarked and unsaid (a web
    handler answered a plain error for a saved change: a client resubmitting wrote it twice),
    and the probe's end was lost with it: its slot in Redis was held by nobody, every unit of
    the fleet refused until the probe lease ran out (10 s). The interruption is marked
    saved-then-interrupted and said; the end is reported once Redis answers.

    So too for a probe that is a ``with_self_healing`` operation writing through a drop-in
    block (``operation``), a unit run inside a unit of another factory (``nested``), or by
    ``run_in`` in a session of the caller's: their
    interruption was raised marked only internally, unsaid (the nested unit's enclosing unit
    said it failed after committing part of its work, not that the change was saved)."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS probe_notes (note text)"))
    Factory, _breaker = opened(
        redis_server, engine, "cut", scripts=True, half_open_probes=1, redis_timeout=8
    )

    ended = threading.Event()

    def probe(s: Session) -> int:
        s.execute(sa.text("INSERT INTO probe_notes VALUES ('cut')"))
        redis_server.pause()  # Redis hangs just as the probe ends
        ended.set()
        return 1

    def operation() -> int:
        with Factory.begin() as s:
            return probe(s)

    def in_session() -> int:
        with Factory() as session:
            return Factory.run_in(session, probe)

    @rdb.with_self_healing(service="cut", config=Factory.config)
    def decorated() -> int:
        return operation()

    # (a breaker of its own, local: the interruption's failure waits for no Redis)
    Outer = rdb.ResilientSession(engine, service="cut-outer", config=rdb.Config(retry=False))
    called = {
        "operation": lambda: rdb.with_self_healing(operation, service="cut", config=Factory.config),
        "decorated": decorated,
        "nested": lambda: Outer.run(lambda _s: Factory.run(probe)),
        "run_in": in_session,
        "unit": lambda: Factory.run(probe),
    }[how]
    main = threading.main_thread().ident

    def interrupt() -> None:
        ended.wait(8)  # (not the probe's admission, which asks Redis too)
        wait_for(_main_thread_waits_for_redis, "the probe's end waiting for Redis", timeout=8)
        signal.pthread_kill(main or 0, signal.SIGINT)

    sender = threading.Thread(target=interrupt, daemon=True)
    try:
        sender.start()
        with pytest.raises(KeyboardInterrupt) as interrupted:
            called()
    finally:
        redis_server.resume()
        sender.join(5)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM probe_notes")).scalar() == 1
    assert saved_then_interrupted(interrupted.value) == "cut"
    [line] = [e for e in events if e.name == "commit_interrupted"]
    assert line.fields["outcome"] == "committed"
    assert "after its COMMIT succeeded; it is committed" in line.message
    assert (
        "the operation (" if how in ("operation", "decorated") else "the unit ("
    ) in line.message
    if how == "decorated":  # the decorated function named, not the call the decorator makes
        assert ".decorated), as its circuit breaker" in line.message
    # the probe's end reaches Redis (not its lease running out: 10 s)
    wait_for(lambda: _fleet_state(redis_server, "cut") == "closed", "the probe's end", timeout=5)
    held = redis_server.client().hget("resilient_db:{cut}:breaker", "probes")
    assert int(held or 0) == 0
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1


def _main_thread_in_redis(*functions: str) -> bool:
    """Whether the main thread is inside redis-py, in one of ``functions`` (any, if none), and
    not in its ``_connect``: a KeyboardInterrupt there, between the socket made and connected,
    leaves the socket unclosed (redis-py closes it for an OSError only), and its
    ResourceWarning fails the test whenever the collector meets it. The handshake after it
    waits on the paused Redis: that is where the interruption is meant to land."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    found = False
    while frame is not None:
        code = frame.f_code
        if f"{os.sep}redis{os.sep}" in code.co_filename:
            if code.co_name == "_connect":
                return False
            found = found or not functions or code.co_name in functions
        frame = frame.f_back
    return found


@pytest.mark.parametrize("where", ["end", "admit"])
def test_a_probe_interrupted_before_redis_heard_of_it_holds_no_slot(
    redis_server: RedisServer, engine: sa.Engine, where: str
) -> None:
    """A real SIGINT reaches the half-open probe while its end waits for a new connection to
    Redis (its link's connections were cut, and Redis hangs: the command was never sent), or
    while its admission waits for Redis's answer (Redis runs the admit when it resumes: a slot
    taken for an attempt that never ran). The slot was held by nobody until the probe lease
    ran out (10 s), every unit of the fleet refused meanwhile, the database healthy. The
    interruption is raised; the end, or the admit's release, is reported when Redis answers,
    as for a Redis failure."""
    service = f"unsent-{where}"
    Factory, _breaker = opened(
        redis_server, engine, service, scripts=True, half_open_probes=1, redis_timeout=8
    )
    ready = threading.Event()

    def probe(s: Session) -> int:
        value = int(s.execute(sa.text("SELECT 1")).scalar_one())
        # the link's command connections cut (not its subscription): its next command
        # connects anew, and waits for Redis's answer to the handshake
        redis_server.client().client_kill_filter(_type="normal", skipme=True)
        redis_server.pause()
        ready.set()
        return value

    main = threading.main_thread().ident
    waiting = ("connect", "on_connect") if where == "end" else ()

    def interrupt() -> None:
        ready.wait(8)
        wait_for(lambda: _main_thread_in_redis(*waiting), "the main thread in Redis", timeout=8)
        signal.pthread_kill(main or 0, signal.SIGINT)

    if where == "admit":
        redis_server.pause()
        ready.set()
    sender = threading.Thread(target=interrupt, daemon=True)
    try:
        sender.start()
        with pytest.raises(KeyboardInterrupt):
            Factory.run(probe)
    finally:
        redis_server.resume()
        sender.join(5)
    held = lambda: int(  # noqa: E731
        redis_server.client().hget(f"resilient_db:{{{service}}}:breaker", "probes") or 0
    )
    # (the lease is 10 s: a slot given back sooner was released, not forgotten)
    wait_for(lambda: held() == 0, "the probe's slot given back", timeout=5)
    expected = "closed" if where == "end" else "half-open"  # (a success; an attempt not run)
    assert _fleet_state(redis_server, service) == expected
    assert shared(service)["connected"]
    assert Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert _fleet_state(redis_server, service) == "closed"
