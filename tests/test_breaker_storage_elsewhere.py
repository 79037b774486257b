"""A ``breaker_storage=`` of the application's shared by processes (pybreaker's
``CircuitRedisStorage``): a change another process made there (its failures opening the
breaker, its half-open state, its probe closing it) is followed here and, once this process
notices it (at its next admission, or a ``health()`` read), said and told once: the
``Circuit breaker opened`` line and event (``opened_here`` false: not in this process's
``breaker_opens``, as an opening followed through Redis), the half-open and closed ones, and the
factory's ``breaker_listeners``, as pybreaker's own ``CircuitBreaker.state`` tells its listeners
of a change made elsewhere. Before, this process refused calls from the storage's state in
silence: no line, no event, no listener told."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pybreaker
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from scenarios import FakeClock, otel_points
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.metrics import HealthCollector
from resilient_db.testing import FaultProxy, RedisServer

pytestmark = pytest.mark.usefixtures("no_backoff")

ROOT = Path(__file__).resolve().parent.parent

#: one failure opens it, for long (the other process's opening is still running when noticed)
CONFIG = rdb.Config(failure_threshold=1, max_retries=0, reset_timeout=600.0)


@pytest.fixture
def redis_storage(redis_server: RedisServer) -> Iterator[Callable[[str], Any]]:
    """``make(namespace)``: a pybreaker ``CircuitRedisStorage`` on the test's Redis (each on a
    client of its own, as another process's would be). The breakers are forgotten while Redis
    still answers (reset_state reads their storage), then the clients closed."""
    clients: list[Any] = []

    def make(namespace: str) -> pybreaker.CircuitRedisStorage:
        clients.append(redis_server.client())
        return pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, clients[-1], namespace=namespace
        )

    yield make
    rdb.reset_state()
    for client in clients:
        client.close()


class Heard(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.changes.append((getattr(old_state, "name", ""), new_state.name))


def sharing(
    bind: sa.Engine,
    service: str,
    storage: Any,
    *,
    heard: Heard | None = None,
    wall_clock: Any = None,
) -> rdb.ResilientSession:
    """A factory of ``service`` whose breaker is kept in ``storage`` (shared), told to
    ``heard`` when given."""
    extra: dict[str, Any] = {"breaker_listeners": [heard]} if heard is not None else {}
    if wall_clock is not None:
        extra["wall_clock"] = wall_clock
    return rdb.ResilientSession(
        bind, service=service, breaker_storage=storage, config=CONFIG, **extra
    )


def select_one(session: Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def lines(caplog: pytest.LogCaptureFixture, service: str, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if text in r.getMessage() and f"service={service} " in r.getMessage()
    ]


def breaker_events(events: list[rdb.SelfHealEvent], service: str) -> list[tuple[str, Any]]:
    return [
        (e.name, e.fields.get("opened_here"))
        for e in events
        if e.service == service and e.name.startswith("breaker_") and e.name != "breaker_rejected"
    ]


#: another process doing ``steps`` (comma-separated, in order) with its factory of ``service``
#: on the same storage (``threshold``: its failure threshold; ``probes``: its half-open probes):
#: ``fail`` (a unit the database refuses), ``ok`` (a unit that succeeds) or ``close``
#: (``close_breaker``). It prints the storage's state and failure count as it exits
OTHER_STEPS = textwrap.dedent(
    """
    import sys

    import pybreaker
    import redis
    import sqlalchemy as sa

    import resilient_db as rdb

    db_url, redis_url, namespace, service, threshold, probes, steps = sys.argv[1:]
    storage = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, redis.Redis.from_url(redis_url), namespace=namespace
    )
    config = rdb.Config(
        failure_threshold=int(threshold),
        half_open_probes=int(probes),
        max_retries=0,
        reset_timeout=600.0,
    )
    Factory = rdb.ResilientSession(
        sa.create_engine(db_url), service=service, breaker_storage=storage, config=config
    )
    for step in steps.split(","):
        if step == "fail":
            try:
                Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
            except sa.exc.OperationalError:
                pass
            else:
                raise SystemExit("the unit did not fail")
        elif step == "ok":
            Factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
        elif step == "close":
            rdb.close_breaker(service)
    print(storage.state, storage.counter)
    """
)


@pytest.fixture
def other_process(
    engine: sa.Engine, redis_server: RedisServer, fault_proxy: FaultProxy
) -> Callable[..., str]:
    """``run(namespace, service, steps, threshold=1, probes=1)``: run ``steps`` in another
    process (see
    OTHER_STEPS) on the database through ``fault_proxy``; what it printed (the storage's state
    and failure count)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELF_HEALING_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    db_url = fault_proxy.url(engine.url.database)

    def run(namespace: str, service: str, steps: str, threshold: int = 1, probes: int = 1) -> str:
        args = [db_url, redis_server.url, namespace, service, str(threshold), str(probes), steps]
        other = subprocess.run(
            [sys.executable, "-c", OTHER_STEPS, *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 0, other.stderr
        return other.stdout.strip()

    return run


def test_an_opening_another_process_made_in_the_shared_storage_is_said_and_told_once(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    other_process: Callable[..., str],
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
    otel: Any,
) -> None:
    caplog.set_level(logging.INFO)
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    heard = Heard()
    Factory = sharing(engine, service, redis_storage(namespace), heard=heard)
    assert Factory.run(select_one) == 1
    fault_proxy.refuse()  # the database refuses the other process's connections
    # its failure opened the shared breaker (its count stays, as pybreaker keeps it)
    assert other_process(namespace, service, "fail") == "open 1"
    for _ in range(3):
        with pytest.raises(rdb.CircuitOpenError) as refused:
            Factory.run(select_one)
        assert refused.value.retry_after > 500  # its opening's time left, by its opened_at
    opened = lines(caplog, service, "Circuit breaker opened")
    assert len(opened) == 1, opened
    assert "an opening found in its storage" in opened[0]
    assert breaker_events(events, service) == [("breaker_opened", False)]
    assert heard.changes == [("closed", "open")]
    report = rdb.health()["services"][service]
    assert report["breaker"] is not None
    assert report["breaker"]["state"] == "open"
    # the other process counted it (its breaker_opens): followed here, not counted again,
    # but in opens_followed, as a breaker shared through Redis shows it
    assert report["counters"]["breaker_opens"] == 0
    breaker: Any = report["breaker"]
    assert breaker["storage"] == {"kind": "CircuitRedisStorage", "opens_followed": 1}
    assert "shared" not in breaker  # (the link to SELF_HEALING_REDIS_URL's)
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    followed = f'resilient_db_breaker_opens_followed_total{{service="{service}"}} 1.0'
    assert followed in generate_latest(registry).decode().splitlines()
    transitions = otel_points(otel[2], "resilient_db.breaker.transitions")
    assert transitions == {(("opened_here", False), ("service", service), ("state", "open")): 1}, (
        transitions
    )


def test_half_open_and_closed_made_elsewhere_are_said_once_when_noticed(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Two factories of two services in one process stand for two processes sharing the
    storage (two storage objects on the same Redis keys): ``other``'s failure opens it, its
    time runs out (its own clock), its probe goes through and closes it; this one notices the
    opening at its next admission, the half-open state at a ``health()`` read (made while the
    probe runs), the closing at its next admission."""
    caplog.set_level(logging.INFO)
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    here, there = service, f"{service}-other"
    heard = Heard()
    Factory = sharing(engine, here, redis_storage(namespace), heard=heard)
    other_clock = FakeClock(time.time())
    proxied = sa.create_engine(fault_proxy.url(engine.url.database))
    try:
        Other = sharing(proxied, there, redis_storage(namespace), wall_clock=other_clock)
        assert Factory.run(select_one) == 1
        fault_proxy.refuse()
        with pytest.raises(sa.exc.OperationalError):
            Other.run(select_one)  # opens the shared breaker
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(select_one)
        fault_proxy.restore()
        other_clock.advance(CONFIG.reset_timeout)
        seen: list[Any] = []

        def probe(session: Session) -> int:
            # the other's probe runs: the storage says half-open, this process reads it
            seen.append(rdb.health()["services"][here]["breaker"])
            return select_one(session)

        assert Other.run(probe) == 1  # the probe closed it
        assert seen[0]["state"] == "half-open"
        assert Factory.run(select_one) == 1
        assert Factory.run(select_one) == 1
    finally:
        proxied.dispose()
    for text in ("opened", "half-open", "closed"):
        said = lines(caplog, here, f"Circuit breaker {text}")
        assert len(said) == 1, (text, said)
    assert "found closed in its storage" in lines(caplog, here, "Circuit breaker closed")[0]
    assert breaker_events(events, here) == [
        ("breaker_opened", False),
        ("breaker_half_open", None),
        ("breaker_closed", None),
    ]
    assert heard.changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]
    counters = rdb.health()["services"]
    assert counters[here]["counters"]["breaker_opens"] == 0
    assert counters[there]["counters"]["breaker_opens"] == 1


def test_an_opening_found_by_threads_at_once_is_said_and_told_once(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Units of many threads admitted at once after another process's opening: the first to
    notice it says it; the others, having read the storage too, find it taken (read again under
    the breaker's lock), and neither say nor tell it again."""
    caplog.set_level(logging.INFO)
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    heard = Heard()
    Factory = sharing(engine, service, redis_storage(namespace), heard=heard)
    proxied = sa.create_engine(fault_proxy.url(engine.url.database))
    try:
        Other = sharing(proxied, f"{service}-other", redis_storage(namespace))
        assert Factory.run(select_one) == 1
        fault_proxy.refuse()
        with pytest.raises(sa.exc.OperationalError):
            Other.run(select_one)  # opens the shared breaker
    finally:
        proxied.dispose()
    threads = 8
    start = threading.Barrier(threads)
    refused: list[bool] = []

    def unit() -> None:
        start.wait(10)
        try:
            Factory.run(select_one)
        except rdb.CircuitOpenError:
            refused.append(True)

    workers = [threading.Thread(target=unit) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    assert refused == [True] * threads
    assert len(lines(caplog, service, "Circuit breaker opened")) == 1
    assert breaker_events(events, service) == [("breaker_opened", False)]
    assert heard.changes == [("closed", "open")]


def test_a_process_started_while_the_shared_storage_is_open_says_so_when_it_notices(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Its breaker starts closed, as one shared through Redis does: the opening it finds in
    the storage at its first admission is said and told (``closed`` to ``open``), as that one
    says an opening it reads on connecting, not taken in silence."""
    caplog.set_level(logging.INFO)
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    proxied = sa.create_engine(fault_proxy.url(engine.url.database))
    try:
        Other = sharing(proxied, f"{service}-other", redis_storage(namespace))
        fault_proxy.refuse()
        with pytest.raises(sa.exc.OperationalError):
            Other.run(select_one)  # opens the shared breaker
    finally:
        proxied.dispose()
    heard = Heard()
    Factory = sharing(
        engine, service, redis_storage(namespace), heard=heard
    )  # made now: "started" while it is open
    for _ in range(2):
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(select_one)
    opened = lines(caplog, service, "Circuit breaker opened")
    assert len(opened) == 1, opened
    assert "an opening found in its storage" in opened[0]
    assert breaker_events(events, service) == [("breaker_opened", False)]
    assert heard.changes == [("closed", "open")]


def proxied_sharing(
    fault_proxy: FaultProxy,
    engine: sa.Engine,
    service: str,
    storage: Any,
    *,
    threshold: int,
    heard: Heard | None = None,
) -> tuple[rdb.ResilientSession, sa.Engine]:
    """A factory as :func:`sharing` makes (``threshold`` its failure threshold) on the database
    through ``fault_proxy``, and its engine (the caller disposes of it)."""
    proxied = sa.create_engine(fault_proxy.url(engine.url.database))
    extra: dict[str, Any] = {"breaker_listeners": [heard]} if heard is not None else {}
    config = rdb.Config(failure_threshold=threshold, max_retries=0, reset_timeout=600.0)
    factory = rdb.ResilientSession(
        proxied, service=service, breaker_storage=storage, config=config, **extra
    )
    return factory, proxied


def test_processes_failing_in_turn_open_it_at_the_threshold_after_a_closing_elsewhere(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    other_process: Callable[..., str],
    fault_proxy: FaultProxy,
) -> None:
    """The failures every process counts in the storage add up to one run: a process that
    notices a closing made elsewhere does not start the count over (pybreaker's state setter,
    which tells the listeners, resets the storage's counters), which would lose the failures
    another process counted since the closing and delay the opening fleet-wide by one
    failure per process noticing it."""
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    Factory, proxied = proxied_sharing(
        fault_proxy, engine, service, redis_storage(namespace), threshold=3
    )
    try:
        rdb.open_breaker(service)  # open here: the other process's closing is a change
        fault_proxy.refuse()
        # it closes the breaker, and its unit fails: the first failure
        assert other_process(namespace, service, "close,fail", threshold=3) == "closed 1"
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(select_one)  # the closing noticed here; the second failure
        assert (
            other_process(namespace, service, "fail", threshold=3) == "open 3"
        )  # the third opens it
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(select_one)
    finally:
        proxied.dispose()


def test_probes_succeeding_in_turn_close_it_at_the_count_after_a_half_open_elsewhere(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    other_process: Callable[..., str],
    fault_proxy: FaultProxy,
) -> None:
    """So with the probes' successes: another process takes the breaker half-open and its probe
    succeeds, the first of two; this process notices the half-open state and its probe is the
    second, which closes it (a reset as it noticed would have made it the first again)."""
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    storage = redis_storage(namespace)
    config = rdb.Config(failure_threshold=1, half_open_probes=2, max_retries=0, reset_timeout=600.0)
    Factory = rdb.ResilientSession(engine, service=service, breaker_storage=storage, config=config)
    # open here, stamped a whole reset timeout ago (pybreaker's Redis storage keeps whole
    # seconds): its time over for the other process, which times it by that opened_at
    rdb.open_breaker(service, seconds=0.001)
    assert other_process(namespace, service, "ok", probes=2) == "half-open 0"
    assert storage.success_counter == 1
    assert Factory.run(select_one) == 1  # the half-open state noticed; the second probe
    assert storage.state == "closed"


def test_a_count_left_over_by_a_closing_that_kept_it_starts_over_when_noticed(
    *,
    engine: sa.Engine,
    service: str,
    redis_server: RedisServer,
    redis_storage: Callable[[str], Any],
    other_process: Callable[..., str],
    fault_proxy: FaultProxy,
) -> None:
    """A closing written into the storage without its count reset (an operator setting the
    state key by hand) leaves the count that opened the breaker: a process that notices the
    closing and finds the count at the threshold (its failures all counted before the closing:
    any process counting up to it since opened the breaker) starts it over, as pybreaker's
    setter does, instead of opening again at the next failure."""
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    storage = redis_storage(namespace)
    Factory, proxied = proxied_sharing(fault_proxy, engine, service, storage, threshold=3)
    try:
        fault_proxy.refuse()
        assert other_process(namespace, service, "fail,fail,fail", threshold=3) == "open 3"
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(select_one)
        with contextlib.closing(redis_server.client()) as client:
            client.set(f"{namespace}:pybreaker:state", pybreaker.STATE_CLOSED)  # by hand
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(select_one)  # the closing noticed: one failure counted, not four
        assert (storage.state, storage.counter) == ("closed", 1)
    finally:
        proxied.dispose()


def test_an_opening_closed_and_made_again_elsewhere_between_two_reads_is_said_again(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    other_process: Callable[..., str],
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The storage open here, another process closes it and opens it again before this one
    reads it: the state read is the one known, but its ``opened_at`` is the new opening's. It
    is said, told and counted as an opening followed, and its time left is the new one's."""
    caplog.set_level(logging.INFO)
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    heard = Heard()
    Factory, proxied = proxied_sharing(
        fault_proxy, engine, service, redis_storage(namespace), threshold=1, heard=heard
    )
    try:
        # opened here by hand, stamped 100 s ago (pybreaker's Redis storage keeps whole
        # seconds: the other process's opening, stamped now, is a later one)
        rdb.open_breaker(service, seconds=500)
        fault_proxy.refuse()
        assert other_process(namespace, service, "close,fail") == "open 1"  # closed, opened again
        for _ in range(2):
            with pytest.raises(rdb.CircuitOpenError) as refused:
                Factory.run(select_one)
            assert refused.value.retry_after > 550  # the new opening's time left
    finally:
        proxied.dispose()
    opened = lines(caplog, service, "Circuit breaker opened")
    assert len(opened) == 2, opened
    assert "an opening found in its storage" in opened[1]
    assert breaker_events(events, service) == [("breaker_opened", True), ("breaker_opened", False)]
    assert heard.changes == [("closed", "open"), ("open", "open")]
    breaker: Any = rdb.health()["services"][service]["breaker"]
    assert breaker["storage"]["opens_followed"] == 1
    assert rdb.health()["services"][service]["counters"]["breaker_opens"] == 1


def test_reset_state_leaves_a_shared_storage_as_the_other_processes_left_it(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    other_process: Callable[..., str],
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``reset_state()`` starts this process over: a storage that may be shared (any but
    pybreaker's in-process ``CircuitMemoryStorage``) keeps its state, as the state shared
    through Redis does (writing it closed would close the breaker of every process sharing it,
    the database still down); a breaker made afterwards says the opening when it notices it.
    An in-process storage is closed with its breaker, as before."""
    caplog.set_level(logging.INFO)
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    storage = redis_storage(namespace)
    Factory = sharing(engine, service, storage)
    memory = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    local = f"{service}-local"
    Local = rdb.ResilientSession(engine, service=local, breaker_storage=memory, config=CONFIG)
    rdb.open_breaker(local)
    fault_proxy.refuse()
    assert other_process(namespace, service, "fail") == "open 1"
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(select_one)
    rdb.reset_state()
    assert storage.state == "open"
    assert memory.state == "closed"
    assert Local.run(select_one) == 1
    caplog.clear()
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(select_one)  # its new breaker: the opening found, said
    assert len(lines(caplog, service, "Circuit breaker opened")) == 1


def test_close_breaker_closes_a_shared_storage_for_every_process_sharing_it(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    other_process: Callable[..., str],
    fault_proxy: FaultProxy,
) -> None:
    """``close_breaker()`` is an operator's "it is back": made in the storage, it closes the
    breaker of every process sharing it, as a closing through Redis does (it returns False:
    nothing is shared through Redis, and whether a storage of yours is shared is not known)."""
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    storage = redis_storage(namespace)
    Factory = sharing(engine, service, storage)
    fault_proxy.refuse()
    assert other_process(namespace, service, "fail") == "open 1"
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(select_one)
    assert rdb.close_breaker(service) is False
    assert (storage.state, storage.counter) == ("closed", 0)
    assert Factory.run(select_one) == 1


def test_switched_on_again_it_follows_a_shared_storage_as_the_other_processes_left_it(
    *,
    engine: sa.Engine,
    service: str,
    redis_storage: Callable[[str], Any],
    other_process: Callable[..., str],
    fault_proxy: FaultProxy,
    clean_env: pytest.MonkeyPatch,
) -> None:
    """A reload switching the breaker off and on again starts a breaker of its own over (what it
    held is stale); the state of a storage that other processes may share is theirs, kept up
    to date meanwhile: left as it is, not written closed for them all, and followed here."""
    clean_env.setenv("SELF_HEALING_MAX_RETRIES", "0")
    rdb.reload_config()
    namespace = f"elsewhere-{uuid.uuid4().hex}"
    storage = redis_storage(namespace)
    # (no config=: a reload's settings are its own)
    Factory = rdb.ResilientSession(engine, service=service, breaker_storage=storage)
    assert Factory.run(select_one) == 1
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
    rdb.reload_config()
    fault_proxy.refuse()
    assert other_process(namespace, service, "fail") == "open 1"  # opened meanwhile
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "true")
    rdb.reload_config()
    assert storage.state == "open"
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(select_one)
