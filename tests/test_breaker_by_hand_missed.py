"""An opening by hand (``rdb.open_breaker`` in another OS process) that this process's link
never heard of: its subscription was dropped without a reset (a NAT forgetting the flow), so
the pub/sub message saying "by hand" never arrived, its commands' connection still passing. It
learns of the opening from the answer of a failure-path script instead (a failure counted, a
half-open probe asked for, a probe's end), and must say what the fleet's record says: opened
by hand, and why, not "another process's failures". A closing by hand missed so, and learnt
from the background check or an answer, says by hand too, not "recovered". Real Redis, real
PostgreSQL, a real second process."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import ForgetfulForwarder, Gate, WorkerProcess, fleet, shared
from processes import wait_for

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

REASON = "database upgrade"
SERVICE = "fleet"  # the workers' service (tests/fleet_worker.py)
BY_HAND_ELSEWHERE = f"by hand in another process (shared through Redis) ({REASON})"


def gate_unit(session: sa.orm.Session) -> int:
    return int(session.execute(sa.text("SELECT rdb_gate()")).scalar_one())


def opened_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Circuit breaker opened" in r.getMessage()]


@pytest.fixture
def operator(redis_server: RedisServer, pg_url: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    """Another process sharing the service's breaker through Redis (directly, not through the
    forwarder): the operator's, which opens it by hand."""
    settings = {"SELF_HEALING_REDIS_URL": redis_server.url, "SELF_HEALING_RETRY": "false"}
    with fleet(1, pg_url, settings, tmp_path) as (worker,):
        assert worker.ask("wait", what="connected", timeout=20)["ok"], worker.log()
        yield worker


@pytest.fixture
def deaf(
    redis_server: RedisServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """This process's factory of the service, linked to Redis through a forwarder that has
    forgotten its subscription (nothing published reaches it; its scripts pass). The link's
    own check of its silent subscription is put off for the test's length: it would find the
    subscription dead and read the state (the reason included) on subscribing again."""
    monkeypatch.setattr(_fleet, "SUBSCRIPTION_CHECK_INTERVAL", 600.0)
    with ForgetfulForwarder(redis_server.port) as forwarder:
        config = rdb.Config(
            redis_url=forwarder.url(redis_server.url),
            retry=False,
            failure_threshold=5,
            reset_timeout=0.5,
            # the commands pass, and must be answered: with the default 0.1 s a loaded machine
            # had the link give up (TimeoutError), the view fall back to this process's state
            # and miss what the answers would have said
            redis_timeout=5.0,
        )
        factory = rdb.ResilientSession(engine, service=SERVICE, config=config)
        wait_for(lambda: shared(SERVICE)["connected"], "the link", 10)
        yield factory, forwarder


def test_an_opening_by_hand_learnt_from_a_failures_answer_says_by_hand(
    deaf: Any,
    operator: WorkerProcess,
    gate: Gate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_db")
    factory, forwarder = deaf
    forwarder.forget(subscriptions_only=True)
    assert operator.ask("open_breaker", reason=REASON, seconds=120) == {"fleet_wide": True}
    assert factory.policy.breaker.state == "closed"  # the message never came

    gate.set(down=True)  # (the maintenance: the database refuses)
    with pytest.raises(sa.exc.OperationalError):
        factory.run(gate_unit)  # its failure's script answers: open
    (line,) = opened_lines(caplog)
    assert BY_HAND_ELSEWHERE in line, line
    assert "another process's failures" not in line
    with pytest.raises(rdb.CircuitOpenError) as refused:
        factory.run(gate_unit)
    assert refused.value.by_hand is True
    assert refused.value.cause == f"opened by hand in another process: {REASON}"
    breaker = rdb.health()["services"][SERVICE]["breaker"]
    assert (breaker["by_hand"], breaker["reason"]) == (True, REASON)


def test_an_opening_by_hand_learnt_from_a_probes_admit_says_by_hand(
    deaf: Any,
    operator: WorkerProcess,
    gate: Gate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The view is past an opening of the fleet's failures (its 0.5 s over: the next unit asks
    Redis for a probe) when the operator opens the breaker by hand: the admit's answer, open,
    is the first this process hears of it."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    factory, forwarder = deaf
    breaker = factory.policy.breaker
    gate.set(down=True)
    for _ in range(5):  # the fleet's threshold: its failures open the breaker
        with pytest.raises(sa.exc.OperationalError):
            factory.run(gate_unit)
    assert breaker.state == "open"
    # the opening's own 0.5 s (a condition on the breaker, not a backoff)
    wait_for(lambda: breaker.describe()["state"] == "half-open", "the opening's end", 10)
    forwarder.forget(subscriptions_only=True)
    assert operator.ask("open_breaker", reason=REASON, seconds=120) == {"fleet_wide": True}
    caplog.clear()

    with pytest.raises(rdb.CircuitOpenError) as refused:
        factory.run(gate_unit)  # asks Redis for a probe: open
    assert refused.value.by_hand is True
    assert refused.value.cause == f"opened by hand in another process: {REASON}"
    (line,) = opened_lines(caplog)
    assert BY_HAND_ELSEWHERE in line, line


def test_an_opening_by_hand_learnt_from_a_probes_end_says_by_hand(
    deaf: Any,
    operator: WorkerProcess,
    gate: Gate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A half-open probe of this process is running (it waits on a lock in the database) when
    the operator opens the breaker by hand: the answer to its end is the first this process
    hears of the opening."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    factory, forwarder = deaf
    breaker = factory.policy.breaker
    gate.set(down=True)
    for _ in range(5):
        with pytest.raises(sa.exc.OperationalError):
            factory.run(gate_unit)
    wait_for(lambda: breaker.describe()["state"] == "half-open", "the opening's end", 10)
    forwarder.forget(subscriptions_only=True)
    gate.set(down=False, hold=True)
    import threading  # noqa: PLC0415

    outcome: list[Any] = []
    with gate.holding():
        probe = threading.Thread(target=lambda: outcome.append(factory.run(gate_unit)))
        probe.start()
        wait_for(lambda: gate.waiting_on_hold() == 1, "the probe, waiting in the database", 10)
        assert operator.ask("open_breaker", reason=REASON, seconds=120) == {"fleet_wide": True}
        caplog.clear()
    probe.join(10)
    assert outcome == [1]  # the probe itself went through
    (line,) = opened_lines(caplog)
    assert BY_HAND_ELSEWHERE in line, line
    with pytest.raises(rdb.CircuitOpenError) as refused:
        factory.run(gate_unit)
    assert refused.value.cause == f"opened by hand in another process: {REASON}"


# -- a closing by hand missed the same way ------------------------------------------------------
DONE = "upgrade done"
CLOSED_BY_HAND_ELSEWHERE = f"by hand in another process (shared through Redis) ({DONE})"


def closed_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Circuit breaker closed" in r.getMessage()]


def assert_closed_by_hand(
    caplog: pytest.LogCaptureFixture, events: list[rdb.SelfHealEvent], breaker: Any
) -> None:
    """This process's one closing line and event say the operator's closing, not a recovery,
    and nothing by hand is left in its breaker's health."""
    (line,) = closed_lines(caplog)
    assert line.endswith(f"service={SERVICE} {CLOSED_BY_HAND_ELSEWHERE}"), line
    assert "recovered" not in line
    (closed,) = [e for e in events if e.name == "breaker_closed"]
    assert closed.fields["by_hand"] is True
    assert closed.fields["reason"] == CLOSED_BY_HAND_ELSEWHERE
    assert (breaker.describe()["by_hand"], breaker.describe()["reason"]) == (False, None)


def test_a_closing_by_hand_learnt_from_the_background_check_says_by_hand(
    deaf: Any,
    operator: WorkerProcess,
    gate: Gate,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """This process follows the operator's opening (its message came), then its subscription
    is dropped: the operator's closing reaches it only through its background thread's read
    of the opening it holds (about once a second), which must say the closing was by hand."""
    factory, breaker = followed_then_deaf(deaf, operator, caplog, events, 120)

    assert operator.ask("close_breaker", reason=DONE) == {"fleet_wide": True}
    wait_for(lambda: breaker.state == "closed", "the background check reading the closing", 10)
    # the background thread says it just after the state changed (the breaker's listeners
    # run once the new state is set)
    wait_for(
        lambda: bool(closed_lines(caplog) and [e for e in events if e.name == "breaker_closed"]),
        "the closing's line and event",
        10,
    )
    assert_closed_by_hand(caplog, events, breaker)
    assert factory.run(gate_unit) == 1


def followed_then_deaf(
    deaf: Any,
    operator: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
    seconds: float,
) -> tuple[Any, Any]:
    """The operator opens the breaker by hand for ``seconds``, this process follows (its
    message came; an opening shorter than a second, until it is over in both views); then its
    subscription is dropped and what it logged and emitted so far forgotten.
    ``(factory, breaker)``."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    factory, forwarder = deaf
    breaker = factory.policy.breaker
    assert operator.ask("open_breaker", reason=REASON, seconds=seconds) == {"fleet_wide": True}
    wait_for(lambda: breaker.state == "open", "the opening's message", 10)
    # its line too (said by the link's thread once the state is set, its event just before):
    # said after the clearing below, it would be taken for the test's own
    wait_for(lambda: bool(opened_lines(caplog)), "the opening's line", 10)
    if seconds < 1:
        # the opening's own time (a condition on the breaker, not a backoff), over in both
        # views: each ends it by its own clock, from when it heard of it (the operator's, from
        # its script's answer or its message, may end it a moment after this process's; its
        # next unit refused meanwhile)
        wait_for(lambda: breaker.describe()["state"] == "half-open", "the opening's end", 10)
        wait_for(
            lambda: operator.ask("health")["services"][SERVICE]["breaker"]["state"] == "half-open",
            "the opening's end in the operator's view",
            10,
        )
    forwarder.forget(subscriptions_only=True)
    caplog.clear()
    events.clear()
    return factory, breaker


def test_a_closing_by_hand_learnt_from_a_probes_admit_says_by_hand(
    deaf: Any,
    operator: WorkerProcess,
    gate: Gate,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The operator's short opening is over in this process's view (nobody asked for a probe
    yet, so nothing reads it in the background) when the operator closes the breaker, its
    message dropped: the answer to this process's request for a probe, closed, is the first
    it hears of the closing."""
    factory, breaker = followed_then_deaf(deaf, operator, caplog, events, 0.5)

    assert operator.ask("close_breaker", reason=DONE) == {"fleet_wide": True}
    assert breaker.state == "open"  # the message never came
    assert factory.run(gate_unit) == 1  # asks Redis for a probe: closed
    assert breaker.state == "closed"
    assert_closed_by_hand(caplog, events, breaker)


def test_a_probes_closing_after_an_opening_by_hand_learnt_later_says_recovered(
    deaf: Any,
    operator: WorkerProcess,
    gate: Gate,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """The by-hand record of an opening does not outlive it: the operator's process's probe
    closes the breaker after the opening by hand, and this process, which missed that
    message, learns it from its admit's answer and says the breaker recovered."""
    factory, _ = followed_then_deaf(deaf, operator, caplog, events, 0.5)

    assert operator.ask("try") == {"outcome": "ok"}  # its probe closes the fleet's breaker
    assert operator.ask("wait", what="closed", timeout=10)["ok"], operator.log()
    # and Redis's: a probe end whose script got no answer within the Redis timeout (under
    # load) closes the operator's view alone, its link down, its slot held in Redis until the
    # link rejoins and reports it (this unit refused meanwhile: every probe slot taken)
    assert operator.ask("wait", what="connected", timeout=10)["ok"], operator.log()
    assert factory.run(gate_unit) == 1
    (line,) = closed_lines(caplog)
    assert line.endswith(f"service={SERVICE} recovered"), line
    (closed,) = [e for e in events if e.name == "breaker_closed"]
    assert closed.fields["by_hand"] is False


# -- the half-open state after an opening by hand, and a re-opening, learnt from Redis ----------
def test_a_process_joining_while_half_open_after_an_opening_by_hand_says_by_hand(
    redis_server: RedisServer,
    engine: sa.Engine,
    operator: WorkerProcess,
    gate: Gate,
) -> None:
    """The operator's short opening by hand is over and the operator's process runs the fleet's
    one half-open probe (it waits on a lock in the database) when this process joins the
    fleet: the state it reads is half-open, after an opening by hand, as the process that
    followed the opening says (health(), the refusal of a unit finding every probe slot
    taken); the probe's closing is a recovery."""
    assert operator.ask("open_breaker", reason=REASON, seconds=0.5) == {"fleet_wide": True}

    def operators() -> dict[str, Any]:
        entry: dict[str, Any] = operator.ask("health")["services"][SERVICE]["breaker"]
        return entry

    # the opening's own 0.5 s (a condition on the breaker, not a backoff)
    wait_for(lambda: operators()["state"] == "half-open", "the opening's end", 10)
    gate.set(hold=True)
    with gate.holding():
        assert operator.ask("start", n=1) == {"started": 1}  # the fleet's probe
        wait_for(lambda: gate.waiting_on_hold() == 1, "the probe, waiting in the database", 10)
        assert (operators()["by_hand"], operators()["reason"]) == (True, REASON)

        config = rdb.Config(redis_url=redis_server.url, retry=False, reset_timeout=0.5)
        factory = rdb.ResilientSession(engine, service=SERVICE, config=config)
        wait_for(lambda: shared(SERVICE)["connected"], "the link", 10)
        breaker = rdb.health()["services"][SERVICE]["breaker"]
        assert (breaker["state"], breaker["by_hand"], breaker["reason"]) == (
            "half-open",
            True,
            REASON,
        )
        with pytest.raises(rdb.CircuitOpenError) as refused:
            factory.run(gate_unit)  # every probe slot taken
        assert refused.value.state == "half-open"
        assert refused.value.by_hand is True
        assert refused.value.cause == f"opened by hand in another process: {REASON}"
        gate.set(hold=False)
    assert operator.ask("wait", what="closed", timeout=10)["ok"], operator.log()
    wait_for(lambda: rdb.health()["services"][SERVICE]["breaker"]["state"] == "closed",
             "the probe's closing", 10)  # fmt: skip
    breaker = rdb.health()["services"][SERVICE]["breaker"]
    assert (breaker["by_hand"], breaker["reason"]) == (False, None)


def test_a_reopening_by_hand_learnt_from_the_background_check_is_said(
    deaf: Any,
    operator: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    """This process follows the operator's opening by hand (its message came), then its
    subscription is dropped; the operator opens the breaker again, for longer, with the same
    reason (the maintenance runs late): the background check's read is the first this process
    hears of it, and it says the new opening as its message would have (a written-back view,
    the same opening read again, is not: it carries the fleet's count of openings unchanged)."""
    _, breaker = followed_then_deaf(deaf, operator, caplog, events, 60)

    assert operator.ask("open_breaker", reason=REASON, seconds=600) == {"fleet_wide": True}
    wait_for(
        lambda: breaker.describe().get("retry_after", 0) > 300,
        "the background check reading the re-opening",
        10,
    )
    # said just after the view took it (the breaker's listeners run once the state is set)
    wait_for(lambda: bool(opened_lines(caplog)), "the re-opening's line", 10)
    (line,) = opened_lines(caplog)
    assert BY_HAND_ELSEWHERE in line, line
    assert "rejecting calls for 59" in line, line  # (the 600 s asked for, less the trip)
    (opened,) = [e for e in events if e.name == "breaker_opened"]
    assert (opened.fields["by_hand"], opened.fields["opened_here"]) == (True, False)
    assert shared(SERVICE)["opens_followed"] == 2
    assert shared(SERVICE)["fleet_opens"] == 2
