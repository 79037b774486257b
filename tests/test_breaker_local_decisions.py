"""The local breaker's decisions, each to the state it leaves behind: the probe slots a
probe's end gives back (a success, a business error), what a closing by hand forgets (the
failover window of the last failure), what each opening says it was (the failures' cause, or
an operator's), and what the listeners of the caller's are told."""

from __future__ import annotations

import contextvars
import itertools
import time
from typing import Any

import pybreaker
import pytest
from scenarios import FakeClock

import resilient_db as rdb
from resilient_db._breaker import Breaker

_names = itertools.count()


def breaker(clock: FakeClock, **settings: Any) -> Breaker:
    config = rdb.Config(**{"failure_threshold": 1, "reset_timeout": 30.0, **settings})
    return Breaker(f"decide-{next(_names)}", config, clock=clock)


def refused(b: Breaker) -> rdb.CircuitOpenError:
    with pytest.raises(rdb.CircuitOpenError) as info:
        b.before_call()
    return info.value


def half_open(b: Breaker, clock: FakeClock) -> None:
    b.on_failure(b.before_call())
    clock.advance(b.config.reset_timeout)


@pytest.mark.parametrize("end", ["success", "neutral"])
def test_a_probe_that_ends_gives_back_its_one_slot_and_no_more(end: str) -> None:
    """Two probe slots, both taken: one probe ends (a success, one of the two that close it;
    or a business error, neither way). Its slot, one, is free again: a call goes through, and
    the next is refused (the other probe still holds its slot)."""
    clock = FakeClock()
    b = breaker(clock, half_open_probes=2)
    half_open(b, clock)
    probes = [contextvars.copy_context() for _ in range(2)]
    assert all(p.run(b.before_call) is True for p in probes)
    assert refused(b).state == "half-open"
    if end == "success":
        probes[0].run(b.on_success, True)
    else:
        probes[0].run(b.on_neutral, True)
    assert b.state == "half-open"
    assert b.before_call() is True  # the slot given back
    assert refused(b).state == "half-open"  # only that one


def test_a_probe_ending_in_a_business_error_lets_the_next_probe_through() -> None:
    clock = FakeClock()
    b = breaker(clock, half_open_probes=1)
    half_open(b, clock)
    probe = b.before_call()
    assert probe is True
    assert refused(b).state == "half-open"
    b.on_neutral(probe)  # an integrity violation, say: no verdict on the database
    assert b.state == "half-open"
    probe = b.before_call()
    assert probe is True
    b.on_success(probe)
    assert b.state == "closed"


def test_a_probe_past_its_lease_ending_in_a_business_error_gives_back_no_slot() -> None:
    """A probe given up for lost (its lease ran out, its slot went to a new probe) that ends
    at last, neither way, holds no slot to give back: the new probe's slot stays taken."""
    clock = FakeClock()
    b = breaker(clock, half_open_probes=1)
    half_open(b, clock)
    hung, fresh = contextvars.copy_context(), contextvars.copy_context()
    assert hung.run(b.before_call) is True
    clock.advance(30.0)  # the lease, max(30 s, 10 s)
    assert fresh.run(b.before_call) is True  # the slot went to a new probe
    hung.run(b.on_neutral, True)
    assert refused(b).state == "half-open"  # still the new probe's
    fresh.run(b.on_neutral, True)
    assert b.before_call() is True


def test_a_closing_by_hand_forgets_the_failover_window_of_the_last_failure() -> None:
    """An attempt that began before the last counted failure and fails within the failover
    window is that failure seen again, and not counted; once closed by hand, the failures are
    forgotten, that one's window with them: the next failure counts, whenever its attempt
    began."""
    b = breaker(FakeClock())
    began = time.monotonic() - 5.0
    b.on_failure(b.before_call(), began)
    assert b.state == "open"
    b.close(reason="failed over")
    assert b.state == "closed"
    b.on_failure(b.before_call(), began)  # (within a second of the first)
    assert b.state == "open"


def test_each_opening_says_what_made_it_the_failures_after_an_operators() -> None:
    """Opened by hand (a reason given), then by a half-open probe's failure: the rejections of
    the second opening are the failures', with their cause, not the operator's; and after a
    closing by hand, an opening by the failures again names theirs."""
    clock = FakeClock()
    b = breaker(clock)
    assert b.open(reason="upgrade") is False  # (not shared: this process's)
    first = refused(b)
    assert first.by_hand is True
    assert first.cause == "opened by hand: upgrade"
    assert b.describe()["reason"] == "upgrade"
    clock.advance(30.0)
    probe = b.before_call()
    assert probe is True
    b.on_failure(probe, cause="the server is a hot standby")
    second = refused(b)
    assert second.by_hand is False
    assert second.cause == "the server is a hot standby"
    health = b.describe()
    assert health["by_hand"] is False
    assert health["reason"] is None
    b.close(reason="done")
    b.on_failure(b.before_call())  # no cause known
    third = refused(b)
    assert third.by_hand is False
    assert third.cause is None


def test_a_recovery_after_a_closing_by_hand_is_said_as_a_recovery(
    events: list[rdb.SelfHealEvent],
) -> None:
    clock = FakeClock()
    b = breaker(clock)
    b.on_failure(b.before_call())
    b.close(reason="failed over")
    b.on_failure(b.before_call())
    clock.advance(30.0)
    probe = b.before_call()
    b.on_success(probe)
    closings = [e for e in events if e.name == "breaker_closed" and e.service == b.service]
    assert [(e.fields["by_hand"], e.fields.get("reason")) for e in closings] == [
        (True, "by hand (failed over)"),
        (False, None),
    ]


def test_a_reset_closing_an_open_breaker_is_no_operators_closing(
    events: list[rdb.SelfHealEvent],
) -> None:
    b = breaker(FakeClock())
    b.on_failure(b.before_call())
    b.reset()
    assert b.state == "closed"
    (closing,) = [e for e in events if e.name == "breaker_closed" and e.service == b.service]
    assert closing.fields["by_hand"] is False
    assert closing.fields["reason"] == (
        "reset by reset_state() (its state forgotten, not a recovery)"
    )


class Told(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, object]] = []

    def success(self, cb: Any) -> None:
        self.outcomes.append(("success", None))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.outcomes.append(("failure", exc))


def test_a_listener_of_the_callers_is_told_every_success_and_each_failure_with_its_error() -> None:
    """With a listener given, no success is a fast one (each is told); a failure is told with
    its error, and one recorded without an error (the engine's own accounting) is not told."""
    b = breaker(FakeClock(), failure_threshold=5)
    assert b.fast_success() is True  # nothing to do: no failure counted, nobody to tell
    told = Told()
    b.add_listener(told)
    assert b.fast_success() is False
    b.on_success(b.before_call())
    error = ConnectionError("gone")
    b.on_failure(b.before_call(), error=error)
    b.on_failure(b.before_call())
    assert told.outcomes == [("success", None), ("failure", error)]
    assert b.describe()["failures"] == 2
