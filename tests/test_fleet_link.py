"""A Redis that answers but refuses writes (a read-only replica: what an old master becomes
after a Sentinel failover while the clients still point at it) is down for the shared state
until it takes a write again: the link does not flap between down and restored, and logs one
warning, then one "restored" when it takes writes again."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import ForgetfulForwarder, Gate, shared, subscription_checks
from processes import wait_for

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._config import mask_url
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


def test_a_redis_refusing_writes_stays_down_without_flapping_then_rejoins(
    redis_server: RedisServer, pg_url: str, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that answers but refuses writes (a replica): one warning saying what it
    answered, as health()'s problem does (not that it did not answer), no flapping while
    units fail for 3 s, one "restored" once it takes writes again."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = sa.create_engine(pg_url)
    config = rdb.Config(
        redis_url=redis_server.url, retry=False, failure_threshold=1000, reset_timeout=5.0
    )
    Factory = rdb.ResilientSession(engine, service="replica", config=config)
    wait_for(lambda: shared("replica")["connected"], "the link")
    with RedisServer() as master:
        redis_server.client().execute_command("REPLICAOF", "127.0.0.1", str(master.port))
        gate.set(down=True)
        with pytest.raises(sa.exc.OperationalError):  # its failure is written to Redis
            Factory.run(lambda s: s.execute(sa.text("SELECT rdb_gate()")))
        wait_for(lambda: not shared("replica")["connected"], "the link down")
        problem = shared("replica")["problem"]  # says why, as the warning does
        (line,) = [
            r.getMessage() for r in caplog.records if "Shared state unavailable" in r.getMessage()
        ]
        failed = 1
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # failing units: each would use the shared breaker
            with pytest.raises(sa.exc.OperationalError):
                Factory.run(lambda s: s.execute(sa.text("SELECT rdb_gate()")))
            failed += 1
            time.sleep(0.02)
        assert failed > 20
        assert shared("replica")["connected"] is False
        assert _lines(caplog, "Shared state unavailable") == 1
        assert _lines(caplog, "Shared state restored") == 0
        redis_server.client().execute_command("REPLICAOF", "NO", "ONE")
    # Redis answered (it is no outage of Redis): the warning says what it answered, as
    # health()'s problem does
    assert "did not answer" not in line
    # (naming the service that uses the link)
    assert f"Redis at {mask_url(redis_server.url)} (services: replica) answered: {problem};" in line
    assert problem.startswith("read-only replica, writes refused (ResponseError: ")
    assert "READONLY" in problem
    assert line.endswith("run on this process's own state until it takes writes again")
    wait_for(lambda: shared("replica")["connected"], "the link, taking writes again")
    assert _lines(caplog, "Shared state restored") == 1
    engine.dispose()


def test_a_subscription_dropped_without_a_reset_is_made_again(
    redis_server: RedisServer,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A NAT, a firewall or a load balancer forgetting the subscription's connection tells
    neither side: nothing arrives on it, nothing fails. After a few seconds of silence the
    link checks it with a PING, gets no answer, subscribes again and reads the shared state:
    another process's opening published meanwhile is followed within seconds (it never was,
    the link up all along), and the lines say the link went down and came back."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    monkeypatch.setattr(_fleet, "SUBSCRIPTION_CHECK_INTERVAL", 0.5)
    engine = sa.create_engine(pg_url)
    with ForgetfulForwarder(redis_server.port) as forwarder:
        config = rdb.Config(redis_url=forwarder.url(redis_server.url), reset_timeout=30.0)
        rdb.ResilientSession(engine, service="forgotten", config=config)
        wait_for(lambda: shared("forgotten")["connected"], "the link")
        forwarder.forget()  # the subscription's connection too
        # another process opens the shared breaker (its script, straight to Redis)
        redis_server.client().register_script(_fleet._FORCE)(
            keys=_fleet._breaker_keys("forgotten"),
            args=[_fleet.CHANNEL.format(db=0), "forgotten", "another-process", "open", 30.0],
        )
        wait_for(
            lambda: rdb.health()["services"]["forgotten"]["breaker"]["state"] == "open",
            "the other process's opening, followed",
            8.0,
        )
        wait_for(lambda: shared("forgotten")["connected"], "the link, subscribed again")
    assert _lines(caplog, "Shared state unavailable") == 1
    assert _lines(caplog, "Shared state restored") == 1
    engine.dispose()


def test_a_redis_stalling_for_a_moment_while_nothing_fails_keeps_the_link_up(
    redis_server: RedisServer,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stalls (a snapshot's fork, a slow command) while no unit fails, and the link
    checks its silent subscription meanwhile, answered 0.4 s after the check began: the check's
    answer is given a second, as no unit waits for it, so the link stays up and nothing is
    logged (the Redis timeout of the failure path, 0.1 s here, would have taken the link down
    at every stall).

    The stall begins as a check begins (the link's thread pauses Redis, then checks): paused
    from the test's thread, Redis could hang a check already sent, which then ran out its
    second, the link down with no check to come."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    monkeypatch.setattr(_fleet, "SUBSCRIPTION_CHECK_INTERVAL", 0.1)
    engine = sa.create_engine(pg_url)
    config = rdb.Config(redis_url=redis_server.url, redis_timeout=0.1)
    rdb.ResilientSession(engine, service="stalling", config=config)
    wait_for(lambda: shared("stalling")["connected"], "the link")
    (link,) = _fleet.links().values()
    stall = threading.Event()  # set: the next check pauses Redis first
    paused: list[float] = []  # when each stall began (its check begins right after)
    with subscription_checks(link) as checks:
        noted = link._check_subscription

        def stalled_first(pubsub: Any) -> None:
            if stall.is_set():
                stall.clear()
                redis_server.pause()
                paused.append(time.monotonic())
            noted(pubsub)

        link._check_subscription = stalled_first
        for _ in range(3):
            stalls, begun = len(paused), len(checks)
            stall.set()
            try:
                # a check of the subscription begun while Redis hangs: it waits for its answer
                wait_for(lambda: len(paused) > stalls, "the stall")  # noqa: B023
                wait_for(lambda: len(checks) > begun, "a check during the stall")  # noqa: B023
                # the stall goes on until 0.4 s after it began (a condition of the test, not a
                # backoff): counted from then, not from when this thread saw it, which a busy
                # machine may make late enough to overrun the check's second
                time.sleep(max(0.0, paused[-1] + 0.4 - time.monotonic()))
            finally:
                stall.clear()
                redis_server.resume()
            time.sleep(0.2)
            assert shared("stalling")["connected"], shared("stalling")["problem"]
    assert _lines(caplog, "Shared state unavailable") == 0
    engine.dispose()


def test_a_breaker_attached_while_the_link_reads_the_shared_state_is_read_too(
    redis_server: RedisServer, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On connecting, the link's thread reads the shared state of the breakers attached to it,
    then marks the link up. A breaker attached in between (another service's factory made
    meanwhile, or a reload switching several breakers on: each is attached in turn) found the
    link down, so read nothing itself, and was not among those the thread read: its view
    stayed closed while the fleet's breaker was open, and its units went to the database the
    fleet refuses, until a later change's message. Forced here: the thread, its read done,
    waits to be marked up until the second factory is made."""
    engine = sa.create_engine(pg_url)
    force = redis_server.client().register_script(_fleet._FORCE)
    channel = _fleet.CHANNEL.format(db=0)
    force(
        keys=_fleet._breaker_keys("attached-late"), args=[channel, "attached-late", "o", "open", 60]
    )
    read = threading.Event()  # the thread has read the state of the breakers attached then
    attached = threading.Event()
    mark_up = _fleet.FleetLink._mark_up

    def late_mark_up(link: _fleet.FleetLink) -> None:
        if threading.current_thread() is not threading.main_thread() and not read.is_set():
            read.set()
            attached.wait(10.0)
        mark_up(link)

    monkeypatch.setattr(_fleet.FleetLink, "_mark_up", late_mark_up)
    config = rdb.Config(redis_url=redis_server.url, reset_timeout=60.0)
    rdb.ResilientSession(engine, service="attached-early", config=config)
    try:
        assert read.wait(10.0), "the link's thread did not read the shared state"
        late = rdb.ResilientSession(engine, service="attached-late", config=config)
        assert not shared("attached-late")["connected"]  # the link is not up yet
    finally:
        attached.set()
    wait_for(lambda: shared("attached-late")["connected"], "the link")
    wait_for(
        lambda: rdb.health()["services"]["attached-late"]["breaker"]["state"] == "open",
        "the fleet's opening read into the late breaker's view",
        timeout=5.0,
    )
    with pytest.raises(rdb.CircuitOpenError):
        late.run(lambda session: session.execute(sa.text("SELECT 1")).scalar())


def test_a_link_restarted_while_its_thread_rejoins_is_up_only_once_its_new_thread_is(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new Redis timeout restarts the link: its thread is stopped, then a new one connects.
    The old thread, stopped while it rejoined (it reads the shared state, then marks the link
    up), marked the link up after the restart had marked it down: the link said it was up
    (health()'s ``connected``) before its new thread had subscribed. Forced here: the old
    thread's read waits until the restart has stopped it, the new thread's subscription until
    the link is looked at."""
    reading, go_on = threading.Event(), threading.Event()  # the old thread's rejoin
    subscribing, subscribe = threading.Event(), threading.Event()  # the new thread's start
    read_timelines, subscribed = _fleet.FleetLink._read_timelines, _fleet.FleetLink._subscribed
    reads: list[int] = []
    subscriptions: list[int] = []

    def held_read(link: _fleet.FleetLink) -> None:
        reads.append(1)
        if len(reads) == 1:
            reading.set()
            go_on.wait(10.0)
        read_timelines(link)

    def held_subscribed(link: _fleet.FleetLink, pubsub: Any) -> None:
        subscriptions.append(1)
        if len(subscriptions) == 2:
            subscribing.set()
            subscribe.wait(10.0)
        subscribed(link, pubsub)

    monkeypatch.setattr(_fleet.FleetLink, "_read_timelines", held_read)
    monkeypatch.setattr(_fleet.FleetLink, "_subscribed", held_subscribed)
    link = _fleet.FleetLink(rdb.Config(redis_url=redis_server.url, redis_timeout=1.0))
    try:
        assert reading.wait(10.0), "the link's thread did not rejoin"
        stopped = link._stop
        restart = threading.Thread(
            target=link.reconfigure, args=(link.config.replace(redis_timeout=2.0),)
        )
        restart.start()
        wait_for(stopped.is_set, "the restart to stop the link's thread")
        go_on.set()  # the old thread rejoins to its end, stopped
        assert subscribing.wait(10.0), "the new thread did not subscribe"
        restart.join(10.0)
        assert not restart.is_alive()
        assert not link.up  # its new thread has not subscribed yet
    finally:
        go_on.set()
        subscribe.set()
    try:
        wait_for(lambda: link.up, "the new thread to take the link up")
    finally:
        link.close()


# -- the forwarder the tests above drop connections with (tests/fleet.py) ----------------------
def test_the_forwarder_closes_a_connection_it_cannot_forward() -> None:
    """Its target refusing (its server stopped: a test's Redis, torn down while a link still
    reconnects), the connection accepted is closed at once, not left to the collector (an
    unclosed socket's ResourceWarning, an error in whichever test it lands)."""
    with socket.socket() as target:  # bound, not listening: connections to it are refused
        target.bind(("127.0.0.1", 0))
        with (
            ForgetfulForwarder(target.getsockname()[1]) as forwarder,
            socket.create_connection(("127.0.0.1", forwarder.port), timeout=10.0) as client,
        ):
            assert client.recv(1) == b""  # closed by the forwarder


def test_a_closed_forwarder_accepts_no_more_connections() -> None:
    """Closed, it stops listening at once: its listener closed alone would leave the
    ``accept()`` already waiting listening, taking the next connection (a link reconnecting
    after the forwarder was closed) to a target that may be gone."""
    with socket.create_server(("127.0.0.1", 0)) as target:
        forwarder = ForgetfulForwarder(target.getsockname()[1])
        try:
            wait_for(_forwarder_accepting, "the forwarder, waiting in accept()")
        finally:
            forwarder.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", forwarder.port), timeout=10.0).close()


def _forwarder_accepting() -> bool:
    """A thread of a forwarder waits in ``accept()`` (its frame: ``socket.accept``, called
    from the forwarder's loop)."""
    return any(
        frame.f_code.co_name == "accept"
        and frame.f_back is not None
        and frame.f_back.f_code is ForgetfulForwarder._accept.__code__
        for frame in sys._current_frames().values()
    )


@pytest.mark.parametrize(
    "noise",
    [
        b"not json",
        b'{"s": "noisy"}',  # a service, no state
        b"[1, 2]",  # JSON, not an object
        b'{"s": "noisy", "st": "open", "r": "soon", "g": 1, "o": 1}',  # no number
    ],
    ids=["text", "missing fields", "a list", "a field of another type"],
)
def test_a_message_on_the_channel_that_is_not_ours_is_ignored(
    redis_server: RedisServer, pg_url: str, caplog: pytest.LogCaptureFixture, noise: bytes
) -> None:
    """Another program publishing on the breakers' channel (a Redis shared with other
    applications): its message is ignored (a DEBUG line), the breaker stays as it was, the
    link stays up, and a genuine opening published next by another process is followed."""
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    engine = sa.create_engine(pg_url)
    channel = _fleet.CHANNEL.format(db=0)
    try:
        config = rdb.Config(redis_url=redis_server.url, reset_timeout=30.0)
        rdb.ResilientSession(engine, service="noisy", config=config)
        wait_for(lambda: shared("noisy")["connected"], "the link")
        assert redis_server.client().publish(channel, noise) >= 1
        wait_for(
            lambda: _lines(caplog, f"ignoring a message on {channel} that is not ours") == 1,
            "the message, ignored",
        )
        assert rdb.health()["services"]["noisy"]["breaker"]["state"] == "closed"
        assert shared("noisy")["connected"]
        # another process opens the shared breaker (its script, straight to Redis)
        redis_server.client().register_script(_fleet._FORCE)(
            keys=_fleet._breaker_keys("noisy"),
            args=[channel, "noisy", "another-process", "open", 30.0],
        )
        wait_for(
            lambda: rdb.health()["services"]["noisy"]["breaker"]["state"] == "open",
            "the other process's opening, followed",
        )
    finally:
        engine.dispose()
    assert _lines(caplog, "Shared state unavailable") == 0
