"""What the circuit breaker says: calls it rejects have their ``[SELF-HEAL]`` line and hook event
(rate-limited: an open breaker may reject thousands of calls a second), a unit whose retry it
refuses gives up visibly, and a breaker switched off and on again by reloads starts over."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from fleet import shared
from processes import wait_for
from prometheus_client import CollectorRegistry
from scenarios import FakeClock
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._breaker import Breaker
from resilient_db._fleet import FleetLink, links
from resilient_db.metrics import register
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.usefixtures("no_backoff")


def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now: a failure


def healthy(session: Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def counters(service: str) -> dict[str, int]:
    return rdb.health()["services"][service]["counters"]  # type: ignore[no-any-return]


# -- rejected calls ----------------------------------------------------------------------------
def test_a_wait_under_a_twentieth_of_a_second_is_not_said_as_zero(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A call rejected 0.03 s before the opening ends was told "retry in 0.0 s" (by its
    ``CircuitOpenError`` and the rejection line): a wait is said rounded up to a tenth."""
    clock = FakeClock()
    Factory = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(failure_threshold=1, max_retries=0, reset_timeout=30.0),
        wall_clock=clock,
    )
    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    clock.advance(29.97)
    with pytest.raises(rdb.CircuitOpenError) as rejected:
        Factory.run(healthy)
    assert rejected.value.retry_after == pytest.approx(0.03)
    assert str(rejected.value).endswith("retry in 0.1 s")
    (line,) = lines(caplog, "Circuit breaker rejected")
    assert line.endswith("failing calls fast, retry in 0.1 s")
    assert "in 0.0 s" not in caplog.text


def test_rejected_calls_have_a_line_and_an_event_the_first_after_each_opening_then_one_a_period(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    clock = FakeClock()
    Factory = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(failure_threshold=2, max_retries=0, reset_timeout=30.0),
        wall_clock=clock,
    )
    caplog.set_level(logging.INFO, logger="resilient_db")
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(unavailable)
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"

    def reject(n: int) -> None:
        for _ in range(n):
            with pytest.raises(rdb.CircuitOpenError):
                Factory.run(healthy)

    def rejected_events() -> list[rdb.SelfHealEvent]:
        return [e for e in events if e.name == "breaker_rejected"]

    reject(1000)
    assert counters(service)["breaker_rejections"] == 1000
    # the first rejection after the opening has its line; the next 999 wait for the period
    (first,) = lines(caplog, "Circuit breaker rejected")
    assert first.startswith("[SELF-HEAL] Circuit breaker rejected 1 call(s) since the last line")
    assert f"service={service} open" in first
    assert "retry in 30.0 s" in first
    # hooks get one event per line, not per rejection: its fields say how many it stands for
    (event,) = rejected_events()
    assert event.service == service
    assert event.level == logging.WARNING
    assert (event.fields["rejected"], event.fields["state"]) == (1, "open")
    assert event.fields["retry_after"] == pytest.approx(30.0)

    clock.advance(11)  # past the 10 s period, still open
    reject(1)
    assert lines(caplog, "Circuit breaker rejected")[1].startswith(
        "[SELF-HEAL] Circuit breaker rejected 1000 call(s) since the last line"
    )
    assert [e.fields["rejected"] for e in rejected_events()] == [1, 1000]
    assert rejected_events()[1].fields["retry_after"] == pytest.approx(19.0)

    # half-open, the probe fails: opened again, its first rejection has its line at once
    clock.advance(20)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)  # the probe
    reject(5)
    assert [e.fields["rejected"] for e in rejected_events()] == [1, 1000, 1]
    assert counters(service)["breaker_rejections"] == 1006
    assert len(lines(caplog, "Circuit breaker rejected")) == 3

    # leaving the open state, the 4 rejections not yet said are: summed, the events count all
    clock.advance(31)
    assert Factory.run(healthy) == 1  # half-open: the probe closes it
    assert [e.fields["rejected"] for e in rejected_events()] == [1, 1000, 1, 4]
    assert sum(e.fields["rejected"] for e in rejected_events()) == 1006
    (left,) = lines(caplog, "more call(s)")
    assert left.startswith(
        f"[SELF-HEAL] Circuit breaker rejected 4 more call(s) before leaving the open state: "
        f"service={service}"
    )
    assert rejected_events()[-1].fields["state"] == "open"


def test_rejection_events_reach_the_hooks_whatever_the_logging_switch(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    Factory = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(failure_threshold=1, max_retries=0, logging=False),
    )
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    for _ in range(3):
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(healthy)
    assert [e.fields["rejected"] for e in events if e.name == "breaker_rejected"] == [1]


# -- the logging switches applied by a reload --------------------------------------------------
def calls_through(user: str, engine: sa.Engine, service: str) -> Callable[[bool], int]:
    """A call of the service, failing (the server cannot take connections now) or healthy,
    through a factory of the environment's configuration or a ``with_self_healing`` operation
    without ``config=``; made (and called once) now."""
    if user == "factory":
        Factory = rdb.ResilientSession(engine, service=service)
        return lambda fail: Factory.run(unavailable if fail else healthy)

    def operation(fail: bool) -> int:
        with engine.connect() as conn:
            sql = "SELECT raise_code('57P03')" if fail else "SELECT 1"
            return int(conn.execute(sa.text(sql)).scalar_one())

    def call(fail: bool) -> int:
        return rdb.with_self_healing(lambda: operation(fail), service=service)

    assert call(False) == 1  # (the operation's policy and breaker are made at its first call)
    return call


def breaker_state(service: str) -> str:
    return str(rdb.health()["services"][service]["breaker"]["state"])


def outage(call: Callable[[bool], int], service: str, *, opened: bool = False) -> None:
    """Two failures open the breaker (unless ``opened`` already), a call is rejected, the short
    reset timeout ends and a healthy probe closes it."""
    if not opened:
        for _ in range(2):
            with pytest.raises(sa.exc.OperationalError):
                call(True)
    with pytest.raises(rdb.CircuitOpenError):
        call(False)
    wait_for(lambda: breaker_state(service) == "half-open", "the end of the reset timeout")
    assert call(False) == 1
    assert breaker_state(service) == "closed"


def breaker_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage().partition(": service=")[0]
        for r in caplog.records
        if r.getMessage().startswith("[SELF-HEAL] Circuit breaker")
    ]


@pytest.mark.parametrize("user", ["factory", "with_self_healing"])
def test_a_reload_of_the_logging_switches_reaches_the_breakers_lines(
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    user: str,
) -> None:
    """A reload changing only ``SELF_HEALING_LOGGING`` or ``SELF_HEALING_LOG_LEVEL`` did not
    reach the breaker (its settings were unchanged, so it kept the configuration it was made
    with): switched on, its opening and closing went unsaid; switched off, they were said."""
    for name, value in {
        "SELF_HEALING_FAILURE_THRESHOLD": "2",
        "SELF_HEALING_RETRY": "false",
        "SELF_HEALING_RESET_TIMEOUT": "100",
        "SELF_HEALING_LOGGING": "false",
    }.items():
        clean_env.setenv(name, value)
    rdb.reload_config()
    call = calls_through(user, engine, service)
    caplog.set_level(logging.DEBUG, logger="resilient_db")

    clean_env.delenv("SELF_HEALING_LOGGING")  # an operator turning the logs on
    rdb.reload_config()
    outage(call, service)
    assert breaker_lines(caplog) == [
        "[SELF-HEAL] Circuit breaker opened",
        "[SELF-HEAL] Circuit breaker rejected 1 call(s) since the last line",
        "[SELF-HEAL] Circuit breaker half-open",
        "[SELF-HEAL] Circuit breaker closed",
    ]

    for name, value in (("SELF_HEALING_LOG_LEVEL", "error"), ("SELF_HEALING_LOGGING", "false")):
        clean_env.setenv(name, value)
        rdb.reload_config()
        caplog.clear()
        outage(call, service)
        assert breaker_lines(caplog) == [], name
        clean_env.delenv(name)


def test_a_reload_of_the_logging_switches_keeps_the_breakers_state(
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Logging switched on during an outage: the breaker stays open (no start over, its
    opening counted once), and from then on says what it does."""
    for name, value in {
        "SELF_HEALING_FAILURE_THRESHOLD": "3",
        "SELF_HEALING_RETRY": "false",
        "SELF_HEALING_RESET_TIMEOUT": "100",
        "SELF_HEALING_LOGGING": "false",
    }.items():
        clean_env.setenv(name, value)
    call = calls_through("factory", engine, service)
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    with pytest.raises(sa.exc.OperationalError):
        call(True)
    clean_env.setenv("SELF_HEALING_LOG_LEVEL", "warn")
    rdb.reload_config()
    assert rdb.health()["services"][service]["breaker"]["failures"] == 1  # counted on
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            call(True)
    assert breaker_state(service) == "open"
    assert breaker_lines(caplog) == []

    clean_env.delenv("SELF_HEALING_LOGGING")
    clean_env.delenv("SELF_HEALING_LOG_LEVEL")
    rdb.reload_config()
    assert breaker_state(service) == "open"
    assert counters(service)["breaker_opens"] == 1
    outage(call, service, opened=True)
    assert breaker_lines(caplog) == [
        "[SELF-HEAL] Circuit breaker rejected 1 call(s) since the last line",
        "[SELF-HEAL] Circuit breaker half-open",
        "[SELF-HEAL] Circuit breaker closed",
    ]


# -- a retry the breaker refuses ---------------------------------------------------------------
def test_a_unit_whose_retry_the_breaker_refuses_gives_up_visibly(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """While the unit backs off, other units' failures open the breaker: its next retry is
    refused. It ends with CircuitOpenError as before, now counted and logged as given up, its
    last failure the error's cause."""
    config = rdb.Config(failure_threshold=3, max_retries=5, reset_timeout=30.0)
    others = rdb.ResilientSession(engine, service=service, config=config.replace(max_retries=0))

    def other_units_fail(seconds: float) -> None:
        def run() -> None:
            for _ in range(2):  # with the unit's own first failure: 3, the threshold
                with pytest.raises(sa.exc.OperationalError):
                    others.run(unavailable)

        thread = threading.Thread(target=run)  # other requests, meanwhile
        thread.start()
        thread.join()
        gave_up_before.append(counters(service)["gave_up"])

    gave_up_before: list[int] = []

    Factory = rdb.ResilientSession(engine, service=service, config=config, sleep=other_units_fail)
    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(rdb.CircuitOpenError) as info:
        Factory.run(unavailable)
    assert isinstance(info.value.__cause__, sa.exc.OperationalError)
    assert "57P03" in str(info.value.__cause__)
    (line,) = lines(caplog, "refused retry")  # the other units gave up too, their own way
    assert line.startswith(
        f"[SELF-HEAL] Gave up: service={service} unavailable (SQLSTATE 57P03) after 0 retries"
    )
    assert "the circuit breaker opened while it retried and refused retry 1" in line
    assert line.endswith("raising CircuitOpenError")
    c = counters(service)
    assert c["gave_up"] == gave_up_before[0] + 1
    assert c["breaker_rejections"] == 1
    (gave_up,) = [e for e in events if e.name == "gave_up" and "circuit_opened" in e.fields]
    assert gave_up.fields["circuit_opened"] is True
    assert (gave_up.fields["retries"], gave_up.fields["sqlstate"]) == (0, "57P03")


# -- switched off and on again -----------------------------------------------------------------
def switched(env: pytest.MonkeyPatch, on: bool) -> None:
    env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "true" if on else "false")
    rdb.reload_config()


def test_a_breaker_open_when_switched_off_starts_closed_when_switched_on_again(
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "1")
    clean_env.setenv("SELF_HEALING_RETRY", "false")
    Factory = rdb.ResilientSession(engine, service=service)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"

    switched(clean_env, on=False)
    assert Factory.run(healthy) == 1  # calls run without it, unrecorded
    # switched off, it rejects nothing: health() and Prometheus must not call the service down
    health = rdb.health()
    assert health["services"][service]["breaker"]["state"] == "off"
    assert health["healthy"] is True
    registry = CollectorRegistry()
    register(registry)
    assert (
        registry.get_sample_value(
            "resilient_db_breaker_state", {"service": service, "state": "off"}
        )
        == 1
    )
    assert registry.get_sample_value("resilient_db_healthy") == 1
    caplog.set_level(logging.INFO, logger="resilient_db")
    switched(clean_env, on=True)
    # healthy calls are not rejected for the rest of the old reset timeout
    assert Factory.run(healthy) == 1
    breaker = rdb.health()["services"][service]["breaker"]
    assert (breaker["state"], breaker["failures"]) == ("closed", 0)
    assert counters(service)["breaker_rejections"] == 0
    (line,) = lines(caplog, "Circuit breaker closed")
    assert line == (
        f"[SELF-HEAL] Circuit breaker closed: service={service} switched on again (it was open "
        "when switched off; that state is not kept while off)"
    )
    assert [e.fields.get("reason") for e in events if e.name == "breaker_closed"] == [
        "switched on again (it was open when switched off; that state is not kept while off)"
    ]


def test_rejections_not_yet_said_are_said_when_a_reload_switches_the_breaker_off(
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """Switched off, an open breaker leaves its state (``off`` in health(); on again, it
    starts over): the calls it rejected after its rate-limited line went unsaid (no line, no
    event) until it was switched on again, and for good if it never was."""
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "1")
    clean_env.setenv("SELF_HEALING_RETRY", "false")
    clean_env.setenv("SELF_HEALING_RESET_TIMEOUT", "60000")
    Factory = rdb.ResilientSession(engine, service=service)
    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    for _ in range(4):
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(healthy)
    assert len(lines(caplog, "Circuit breaker rejected")) == 1  # the first; 3 wait for the period

    switched(clean_env, on=False)
    assert breaker_state(service) == "off"
    (left,) = lines(caplog, "more call(s)")
    assert left == (
        "[SELF-HEAL] Circuit breaker rejected 3 more call(s) before leaving the open state: "
        f"service={service}"
    )
    rejected = [e.fields for e in events if e.name == "breaker_rejected"]
    assert [(fields["rejected"], fields["state"]) for fields in rejected] == [
        (1, "open"),
        (3, "open"),
    ]
    assert counters(service)["breaker_rejections"] == 4

    switched(clean_env, on=True)  # said once: not again when it starts over
    assert len(lines(caplog, "more call(s)")) == 1
    assert len([e for e in events if e.name == "breaker_rejected"]) == 2


def test_reset_state_closing_an_open_breaker_says_it_was_reset_not_recovered(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """``reset_state()`` logged ``Circuit breaker closed: ... recovered`` (and sent the dashboard
    a closing) for a breaker whose state it had only forgotten."""
    Factory = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(failure_threshold=1, retry=False)
    )
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    caplog.set_level(logging.INFO, logger="resilient_db")
    rdb.reset_state()
    reason = "reset by reset_state() (its state forgotten, not a recovery)"
    assert lines(caplog, "Circuit breaker closed") == [
        f"[SELF-HEAL] Circuit breaker closed: service={service} {reason}"
    ]
    assert [e.fields.get("reason") for e in events if e.name == "breaker_closed"] == [reason]
    assert Factory.run(healthy) == 1
    assert not lines(caplog, "recovered")


def test_failures_counted_before_the_breaker_was_switched_off_are_forgotten(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "3")
    clean_env.setenv("SELF_HEALING_RETRY", "false")
    Factory = rdb.ResilientSession(engine, service=service)
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(unavailable)
    switched(clean_env, on=False)
    switched(clean_env, on=True)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)  # the first of a fresh count: not the third
    breaker = rdb.health()["services"][service]["breaker"]
    assert (breaker["state"], breaker["failures"]) == ("closed", 1)


def test_a_breaker_another_factory_kept_on_keeps_its_state(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    """The environment switched it off for one factory, but a factory with a config= of its
    own kept it on, and its state up to date: switched on again, it is as that one left it."""
    clean_env.setenv("SELF_HEALING_FAILURE_THRESHOLD", "1")
    clean_env.setenv("SELF_HEALING_RETRY", "false")
    Factory = rdb.ResilientSession(engine, service=service)
    keeper = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(failure_threshold=1, max_retries=0)
    )
    switched(clean_env, on=False)
    with pytest.raises(sa.exc.OperationalError):
        keeper.run(unavailable)
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"  # on for the keeper
    switched(clean_env, on=True)
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(healthy)
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"


def _opened_shared(
    engine: sa.Engine, service: str, redis_server: RedisServer, clean_env: pytest.MonkeyPatch
) -> rdb.ResilientSession:
    """A factory whose breaker is shared through ``redis_server`` (the environment's settings:
    one failure opens it for a minute, no retry), opened by one failed unit."""
    for name, value in {
        "SELF_HEALING_REDIS_URL": redis_server.url,
        "SELF_HEALING_FAILURE_THRESHOLD": "1",
        "SELF_HEALING_RETRY": "false",
        "SELF_HEALING_RESET_TIMEOUT": "60000",
    }.items():
        clean_env.setenv(name, value)
    Factory = rdb.ResilientSession(engine, service=service)
    wait_for(lambda: shared(service)["connected"], "the link")
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)  # opens the shared breaker
    return Factory


@pytest.mark.slow
def test_a_shared_breaker_switched_on_again_takes_the_fleets_state_and_says_so(
    engine: sa.Engine,
    service: str,
    redis_server: RedisServer,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only the local view starts over: the opening in Redis is the fleet's (other processes
    keep it up to date), left as it is and read back, with a line saying why calls are
    rejected right after the breaker was switched on."""
    Factory = _opened_shared(engine, service, redis_server, clean_env)
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"

    switched(clean_env, on=False)
    assert links() == {}  # it left Redis while off
    caplog.set_level(logging.INFO, logger="resilient_db")
    try:
        switched(clean_env, on=True)
        wait_for(lambda: shared(service)["connected"], "the link, switched on again")
        wait_for(
            lambda: rdb.health()["services"][service]["breaker"]["state"] == "open",
            "the fleet's opening read back",
        )
        with pytest.raises(rdb.CircuitOpenError):
            Factory.run(healthy)
        (link,) = links().values()
        assert link.breaker_read(service)[0] == "open"  # the fleet's state, untouched
    finally:
        clean_env.delenv("SELF_HEALING_REDIS_URL")
        rdb.reload_config()
    # Redis answered at once: the resumed state is named; or later: the closed fresh start,
    # then the fleet's opening read back
    assert any(
        "resumes open, as the processes sharing it through Redis left it" in line
        or (
            "opened: service=" in line
            and "after being switched on again (the state shared through Redis, read back)" in line
        )
        for line in lines(caplog, "switched on again")
    ), caplog.text


@pytest.mark.parametrize("fleet", ["open", "flushed"])
def test_a_shared_breaker_switched_on_again_keeps_the_state_its_link_read_first(
    fleet: str,
    engine: sa.Engine,
    service: str,
    *,
    redis_server: RedisServer,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The link made by switching a shared breaker on again reads the fleet's state as soon as
    it connects, and may do so before the switching on starts the view over while the link is
    not up yet: that read is the fleet's current state, kept (thrown away, the view stayed
    closed for good, the fleet's opening in Redis never read back while no unit ran, and
    units went to the database the fleet refuses). Forced here: the link's thread, its read
    taken, waits to be marked up until the breaker is switched on, which waits for that read.
    Redis flushed while it was off: the opening it held then is not shared (stale: the whole
    fleet would refuse calls for it), the fleet's closed state is read back, said so."""
    Factory = _opened_shared(engine, service, redis_server, clean_env)
    switched(clean_env, on=False)
    assert links() == {}  # it left Redis while off
    if fleet == "flushed":
        redis_server.flushall()

    fleet_state = {"open": "open", "flushed": "closed"}
    read = threading.Event()  # the new link's thread has read this breaker's shared state
    switched_on = threading.Event()
    mark_up = FleetLink._mark_up
    resync = FleetLink._resync
    url = redis_server.url
    fleet_rejoin = Breaker.fleet_rejoin
    switch_on = Breaker.switch_on

    def noted_rejoin(breaker: Breaker, link: FleetLink, *, background: bool = True) -> str:
        alone = fleet_rejoin(breaker, link, background=background)
        if breaker.service == service and threading.current_thread() is not threading.main_thread():
            read.set()
        return alone

    def resync_once_attached(link: FleetLink, done: dict[int, str] | None = None) -> dict[int, str]:
        # the link's first read waits for this breaker to be attached: the link may be made by
        # another test's factory, still alive and switched on again first, and be up before
        # this one is attached (then read at its attach, in the reload's thread: the
        # interleaving of this test never happens)
        if threading.current_thread() is not threading.main_thread() and link.url == url:
            wait_for(lambda: service in link.breakers, "the breaker attached", timeout=10.0)
        return resync(link, done)

    def late_mark_up(link: FleetLink) -> None:
        if threading.current_thread() is not threading.main_thread() and read.is_set():
            switched_on.wait(10.0)
        mark_up(link)

    def switch_on_after_the_read(breaker: Breaker, user: object) -> None:
        if breaker.service != service:  # (another test's factory, still alive)
            switch_on(breaker, user)
            return
        read.wait(10.0)
        try:
            switch_on(breaker, user)
        finally:
            switched_on.set()

    clean_env.setattr(FleetLink, "_resync", resync_once_attached)
    clean_env.setattr(FleetLink, "_mark_up", late_mark_up)
    clean_env.setattr(Breaker, "fleet_rejoin", noted_rejoin)
    clean_env.setattr(Breaker, "switch_on", switch_on_after_the_read)
    caplog.set_level(logging.INFO, logger="resilient_db")
    try:
        switched(clean_env, on=True)
        assert read.is_set(), "the link's thread did not read the shared state within 10 s"
        # read before the switching on ended: the view holds the fleet's state already
        assert rdb.health()["services"][service]["breaker"]["state"] == fleet_state[fleet]
        if fleet == "open":
            with pytest.raises(rdb.CircuitOpenError):
                Factory.run(healthy)
        else:
            assert Factory.run(healthy) == 1
        wait_for(lambda: shared(service)["connected"], "the link, switched on again")
        assert rdb.health()["services"][service]["breaker"]["state"] == fleet_state[fleet]
        (link,) = links().values()
        assert link.breaker_read(service)[0] == fleet_state[fleet]  # the fleet's, untouched
    finally:
        switched_on.set()
        clean_env.delenv("SELF_HEALING_REDIS_URL")
        rdb.reload_config()
    if fleet == "open":
        resumed = lines(caplog, "resumes open, as the processes sharing it through Redis left it")
        assert len(resumed) == 1, caplog.text
        assert not lines(caplog, "Circuit breaker closed"), caplog.text
    else:
        (closed,) = lines(caplog, "Circuit breaker closed")
        assert "switched on again (it was open when switched off" in closed, caplog.text
        assert not lines(caplog, "resumes"), caplog.text
