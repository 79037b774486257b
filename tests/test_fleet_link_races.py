"""Orderings between a fleet link's background thread and the threads of its process, forced:
the thread is held at a chosen point (a threading.Event in a wrapper of one of its methods)
while the test's thread does what a unit, an operator or a reload would do meanwhile, against
a real Redis (killed and started again) and a real PostgreSQL (its gate: see ``fleet.Gate``).
What is checked is what users see: the lines, the refusals, the state Redis keeps."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pybreaker
import pytest
import redis
import sqlalchemy as sa
from fleet import Forked, Gate, shared
from processes import wait_for

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._breaker import Breaker
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

REASON = "database upgrade"


def _lines(caplog: pytest.LogCaptureFixture, text: str, service: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if text in r.getMessage() and f"service={service} " in r.getMessage()
    ]


def _gate_unit(session: sa.orm.Session) -> int:
    return int(session.execute(sa.text("SELECT rdb_gate()")).scalar_one())


def _down_then_back(redis_server: RedisServer, service: str) -> None:
    """Redis killed, and the link seen down."""
    wait_for(lambda: shared(service)["connected"], "the link", 20)
    redis_server.kill()
    wait_for(lambda: not shared(service)["connected"], "the link down", 10)


def test_an_opening_made_alone_while_the_link_reads_the_shared_state_is_kept_and_shared(
    redis_server: RedisServer,
    pg_url: str,
    gate: Gate,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis comes back: the link's thread looks for an opening its breaker made alone (none),
    then reads the shared state. A unit failing in between, the link not up yet, opens the
    breaker alone (this process's own state); the read, closed, then replaced it: the breaker
    said "opened", then at once "closed" as if the database had recovered, the opening was
    never shared, and the next units went to the database that had just failed. Forced here:
    the thread's read waits until the unit has failed."""
    from resilient_db._fleet import operator_records  # noqa: PLC0415

    caplog.set_level(logging.INFO, logger="resilient_db")
    service = "opened-while-read"
    engine = sa.create_engine(pg_url)
    config = rdb.Config(
        redis_url=redis_server.url, retry=False, failure_threshold=1, reset_timeout=600
    )
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    _down_then_back(redis_server, service)

    reading, go_on = threading.Event(), threading.Event()
    read = _fleet.FleetLink.breaker_read

    def held_read(link: _fleet.FleetLink, name: str, **kwargs: Any) -> Any:
        if threading.current_thread() is link._thread and not reading.is_set():
            reading.set()
            go_on.wait(10.0)
        return read(link, name, **kwargs)

    monkeypatch.setattr(_fleet.FleetLink, "breaker_read", held_read)
    redis_server.start()
    try:
        assert reading.wait(10.0), "the link's thread did not read the shared state"
        assert not shared(service)["connected"]
        gate.set(down=True)
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(_gate_unit)
        assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    finally:
        go_on.set()
    wait_for(lambda: shared(service)["connected"], "the link back", 20)

    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    calls = gate.calls()
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(_gate_unit)
    assert gate.calls() == calls  # refused without reaching the database
    (record,) = operator_records(redis_server.client(), service)
    assert record["state"] == "open"  # shared with the fleet
    assert len(_lines(caplog, "Circuit breaker opened", service)) == 1
    assert _lines(caplog, "Circuit breaker closed", service) == []
    assert rdb.health()["services"][service]["breaker"]["shared"]["opened_here"] == 1
    engine.dispose()


def test_an_opening_by_hand_shared_on_rejoining_whose_answer_was_lost_is_said_once(
    redis_server: RedisServer,
    engine: sa.Engine,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An opening by hand made while Redis was down is shared when the link rejoins. The
    script sharing it ran, but its answer was lost (a Redis just started, slow past the Redis
    timeout): the link went down again, and its next rejoin shared it again, finding the
    shared breaker open, by hand, its own opening. That was taken as another process's
    opening: the operator's process said "opened" a second time ("by hand in another
    process"), counted it as followed, and not in ``opened_here``. Forced here: the first
    sharing's answer is dropped after the script ran in Redis."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    config = rdb.Config(redis_url=redis_server.url, retry=False, reset_timeout=600)
    Session = rdb.ResilientSession(engine, service=service, config=config)
    _down_then_back(redis_server, service)
    assert rdb.open_breaker(service, reason=REASON, seconds=120) is False

    share = _fleet.FleetLink.breaker_share_opening
    lost: list[Any] = []

    def answer_lost(link: _fleet.FleetLink, *args: Any, **kwargs: Any) -> Any:
        answer = share(link, *args, **kwargs)  # (run by Redis)
        if not lost:
            lost.append(answer)
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return answer

    monkeypatch.setattr(_fleet.FleetLink, "breaker_share_opening", answer_lost)
    redis_server.start()  # same port, no state
    wait_for(lambda: shared(service)["connected"], "the link back", 20)
    (first,) = lost
    assert first[0] == "open"  # the first sharing opened it, its answer dropped

    (own,) = _lines(caplog, "Circuit breaker opened", service)
    assert f"by hand ({REASON}), in this process only (Redis does not answer)" in own
    health = rdb.health()["services"][service]
    breaker = health["breaker"]
    assert (breaker["state"], breaker["by_hand"], breaker["reason"]) == ("open", True, REASON)
    assert breaker["shared"]["opened_here"] == 1
    assert breaker["shared"]["opens_followed"] == 0
    assert health["counters"]["breaker_opens"] == 1
    with pytest.raises(rdb.CircuitOpenError) as refused:
        Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar())
    assert refused.value.cause == f"opened by hand: {REASON}"


def test_a_breaker_attached_while_the_link_is_up_keeps_an_opening_heard_during_its_read(
    redis_server: RedisServer, pg_url: str, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A factory made while the link is up reads its breaker's shared state itself, in its
    own thread. Another process opening the breaker meanwhile: the link's thread takes the
    opening's message, and then the read, answered before the opening, replaced it, whatever
    the view held by then. The view said closed while the fleet's breaker was open, for as
    long as it stayed open (no message was to come), and the process's units went to the
    database the fleet refused. Forced here: the read returns once the opening is taken."""
    engine = sa.create_engine(pg_url)
    config = rdb.Config(redis_url=redis_server.url, retry=False, reset_timeout=60)
    rdb.ResilientSession(engine, service="attached-first", config=config)
    wait_for(lambda: shared("attached-first")["connected"], "the link", 20)

    service = "attached-during-opening"
    force = redis_server.client().register_script(_fleet._FORCE)
    read = _fleet.FleetLink.breaker_read
    held: list[str] = []

    def opened_during_read(link: _fleet.FleetLink, name: str, **kwargs: Any) -> Any:
        answer = read(link, name, **kwargs)
        if name == service and threading.current_thread() is threading.main_thread():
            held.append(answer[0])
            force(  # another process opens it, after the read was answered
                keys=_fleet._breaker_keys(service),
                args=[_fleet.CHANNEL.format(db=0), service, "another-process", "open", 60],
            )
            breaker = link.breakers[service]
            wait_for(lambda: breaker._fleet_state == "open", "the opening's message taken", 10)
        return answer

    monkeypatch.setattr(_fleet.FleetLink, "breaker_read", opened_during_read)
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    assert held == ["closed"]  # its read, answered before the opening

    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    calls = gate.calls()
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(_gate_unit)
    assert gate.calls() == calls  # refused without reaching the database
    engine.dispose()


def test_an_opening_made_alone_before_a_fork_counts_as_the_parents_only(
    redis_server: RedisServer,
    engine: sa.Engine,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process forks (gunicorn's workers) while its breaker holds an opening made alone,
    Redis down: parent and child each share it when Redis answers again, a copy of one
    opening. The parent sharing first, the child finds it the parent's (followed, not
    counted in its ``opened_here``): summed over the fleet, ``opened_here`` counts the
    opening once, as ``fleet_opens`` does. Forced here: the child's sharing waits until Redis
    holds the parent's."""
    config = rdb.Config(redis_url=redis_server.url, retry=False, reset_timeout=600)
    rdb.ResilientSession(engine, service=service, config=config)
    _down_then_back(redis_server, service)
    assert rdb.open_breaker(service, reason=REASON, seconds=120) is False

    parent = os.getpid()
    key = _fleet._keys(service).breaker
    share = _fleet.FleetLink.breaker_share_opening

    def parent_first(link: _fleet.FleetLink, *args: Any, **kwargs: Any) -> Any:
        if os.getpid() != parent:
            client = redis_server.client()
            wait_for(lambda: client.hget(key, "st") == b"open", "the parent's sharing", 10)
        return share(link, *args, **kwargs)

    monkeypatch.setattr(_fleet.FleetLink, "breaker_share_opening", parent_first)

    def child() -> bool:
        wait_for(lambda: shared(service)["connected"], "the child's link", 20)
        entry = shared(service)
        return bool(entry["opened_here"] == 0 and entry["opens_followed"] == 1)

    forked = Forked(child)
    try:
        redis_server.start()
        wait_for(lambda: shared(service)["connected"], "the link back", 20)
        assert shared(service)["opened_here"] == 1
        assert forked.result(30) is True
    finally:
        forked.close()


def test_a_factory_made_while_a_listener_of_its_breaker_asks_for_health_does_not_hang(
    redis_server: RedisServer, engine: sa.Engine
) -> None:
    """A factory made while the link is up reads its breaker's shared state in its own thread,
    as the breaker is registered (here the second factory of its service, the first one's
    configuration without Redis). Another process's change of that breaker, taken meanwhile
    by the link's thread, tells the breaker's listeners, under the breaker's lock; a listener
    asking for ``rdb.health()`` (or adding a hook) waits for the registry's lock. The factory
    held that lock through its read, and then waited for the breaker's: both threads, and every
    later factory, health() and reload of the process, hung for good. Forced here: the read
    returns once the listener has been called."""
    config = rdb.Config(redis_url=redis_server.url, retry=False, reset_timeout=60)
    rdb.ResilientSession(engine, service="registered-first", config=config)
    wait_for(lambda: shared("registered-first")["connected"], "the link", 20)

    service = "listened-to"
    told = threading.Event()

    class AsksForHealth(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            told.set()
            rdb.health()

    force = redis_server.client().register_script(_fleet._FORCE)
    read = _fleet.FleetLink.breaker_read

    def changed_during_read(link: _fleet.FleetLink, name: str, **kwargs: Any) -> Any:
        answer = read(link, name, **kwargs)
        if name == service and threading.current_thread() is not link._thread:
            force(  # another process opens it, after the read was answered
                keys=_fleet._breaker_keys(service),
                args=[_fleet.CHANNEL.format(db=0), service, "another-process", "open", 60],
            )
            told.wait(10.0)
        return answer

    # its breaker made by a factory of its own first, not sharing it (a reload then gives
    # it the Redis URL, or another factory does, as here)
    alone = rdb.Config(retry=False, reset_timeout=60)
    rdb.ResilientSession(
        engine, service=service, config=alone, breaker_listeners=(AsksForHealth(),)
    )
    made: list[Any] = []

    def make() -> None:
        made.append(rdb.ResilientSession(engine, service=service, config=config))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fleet.FleetLink, "breaker_read", changed_during_read)
        maker = threading.Thread(target=make, daemon=True)
        maker.start()
        maker.join(15.0)
    assert not maker.is_alive(), "the factory's thread hangs"
    assert told.is_set()
    assert made
    wait_for(
        lambda: rdb.health()["services"][service]["breaker"]["state"] == "open",
        "the other process's opening followed",
        10,
    )


def test_a_factory_given_listeners_while_the_link_tells_a_listener_does_not_hang(
    redis_server: RedisServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link's thread takes another process's change of a breaker and tells its listeners
    (under pybreaker's lock, as pybreaker does); one of them asks for ``rdb.health()``, which
    waits for the registry's lock. A factory of that service made meanwhile with listeners of
    its own registered them under the registry's lock, waiting for pybreaker's: both threads,
    and every later factory, health() and reload of the process, hung for good. Forced here:
    the listener asks for health() once the factory is registering its listener."""
    service = "listeners-given"
    config = rdb.Config(redis_url=redis_server.url, retry=False, reset_timeout=60)
    told, registering = threading.Event(), threading.Event()

    class AsksForHealth(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            told.set()
            registering.wait(10.0)
            rdb.health()

    rdb.ResilientSession(
        engine, service=service, config=config, breaker_listeners=(AsksForHealth(),)
    )
    wait_for(lambda: shared(service)["connected"], "the link", 20)

    add_listener = Breaker.add_listener

    def noted_add(breaker: Breaker, listener: Any, user: object = None) -> None:
        if told.is_set():
            registering.set()
        add_listener(breaker, listener, user)

    monkeypatch.setattr(Breaker, "add_listener", noted_add)
    redis_server.client().register_script(_fleet._FORCE)(  # another process opens it
        keys=_fleet._breaker_keys(service),
        args=[_fleet.CHANNEL.format(db=0), service, "another-process", "open", 60],
    )
    assert told.wait(10.0), "the listener was not told"

    def make() -> None:
        rdb.ResilientSession(
            engine,
            service=service,
            config=config,
            breaker_listeners=(pybreaker.CircuitBreakerListener(),),
        )

    maker = threading.Thread(target=make, daemon=True)
    maker.start()
    maker.join(15.0)
    assert not maker.is_alive(), "the factory's thread hangs"
    assert registering.is_set()
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
