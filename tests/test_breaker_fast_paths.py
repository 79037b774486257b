"""The breaker's answers without its machinery, against the decisions they stand for: the
fast path of a closed breaker (``fast_closed``), the drop-in refusal read from the local state
(``open_for``, ``refuse_if_open``), each to the edge of the state it answers for."""

from __future__ import annotations

import itertools

import pybreaker
import pytest
from scenarios import FakeClock

import resilient_db as rdb
from resilient_db._breaker import Breaker

CONFIG = rdb.Config(failure_threshold=1, reset_timeout=30.0, half_open_probes=1)
_names = itertools.count()


def breaker(
    clock: FakeClock, storage: pybreaker.CircuitBreakerStorage | None = None, name: str = ""
) -> Breaker:
    return Breaker(name or f"fast-{next(_names)}", CONFIG, storage=storage, clock=clock)


def test_fast_closed_says_true_only_for_a_breaker_closed_as_it_knows_it() -> None:
    clock = FakeClock()
    b = breaker(clock)
    assert b.fast_closed() is True
    b.on_failure(b.before_call())
    assert b.state == "open"
    assert b.fast_closed() is False
    clock.advance(30.0)
    assert b.fast_closed() is False  # (the next call is a probe: before_call decides)
    probe = b.before_call()
    assert probe is True
    assert b.fast_closed() is False  # half-open
    b.on_success(probe)
    assert b.state == "closed"
    assert b.fast_closed() is True


def test_fast_closed_leaves_a_change_made_in_a_shared_storage_to_before_call(
    events: list[rdb.SelfHealEvent],
) -> None:
    """A storage shared with another process (here, another breaker on the same storage):
    closed in the storage while this breaker was last open is not closed as it knows it,
    until before_call notices the change (and says it)."""
    clock = FakeClock()
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    b = breaker(clock, storage)
    other = breaker(clock, storage, name=b.service)
    other.on_failure(other.before_call())  # the other opens it
    assert b.fast_closed() is False  # open in the storage
    with pytest.raises(rdb.CircuitOpenError):
        b.before_call()  # noticed: open
    other.close()  # the other closes it by hand
    assert storage.state == "closed"
    assert b.fast_closed() is False  # closed in the storage, not yet as b knows it
    assert b.before_call() is False
    assert b.fast_closed() is True
    closed = [e for e in events if e.name == "breaker_closed" and e.service == b.service]
    assert len(closed) == 2  # the other's, and b's noticing it


def test_refuse_if_open_refuses_to_the_opening_s_last_moment_then_lets_the_probe_ask() -> None:
    clock = FakeClock()
    b = breaker(clock)
    assert b.open_for() == 0.0  # closed
    b.refuse_if_open()
    b.on_failure(b.before_call())
    clock.advance(29.5)
    assert b.open_for() == pytest.approx(0.5)
    with pytest.raises(rdb.CircuitOpenError) as refused:
        b.refuse_if_open()
    assert refused.value.retry_after == pytest.approx(0.5)
    assert refused.value.state == "open"
    clock.advance(0.5)
    assert b.open_for() == 0.0
    b.refuse_if_open()  # over: not refused (the attempt asks before_call, a probe)
    assert b.state == "open"  # (refuse_if_open moves nothing)
    assert b.before_call() is True
    assert b.open_for() == 0.0  # half-open, its one probe slot taken: before_call refuses
    b.refuse_if_open()


class FailingStorage(pybreaker.CircuitMemoryStorage):
    """A store of the application's that fails (its server down), once ``failing``."""

    def __init__(self) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self.failing = False

    @property
    def state(self) -> str:
        if self.failing:
            raise ConnectionError("the store does not answer")
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state


def test_a_storage_that_fails_is_no_fast_path_and_no_refusal_of_its_own() -> None:
    """The fast paths answer False (before_call decides, and handles the failure), and the
    drop-in refusal read from the local state refuses nothing: a store that fails neither
    admits a call unasked nor refuses one for a time it does not know."""
    storage = FailingStorage()
    b = breaker(FakeClock(), storage)
    assert b.fast_closed() is True
    storage.failing = True
    assert b.fast_closed() is False
    assert b.open_for() == 0.0
    b.refuse_if_open()


def test_open_for_notices_an_opening_made_in_a_shared_storage(
    events: list[rdb.SelfHealEvent],
) -> None:
    """Asked how long a call would be refused (every drop-in block asks), this breaker finds
    the storage it shares open, made by another: said and told once, as followed (not
    opened here), with the time the other's opening has left."""
    clock = FakeClock()
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    b = breaker(clock, storage)
    other = breaker(clock, storage, name=b.service)
    other.on_failure(other.before_call())
    clock.advance(10.0)
    events.clear()
    assert b.open_for() == pytest.approx(20.0)
    (opened,) = [e for e in events if e.name == "breaker_opened"]
    assert opened.service == b.service
    assert opened.fields["opened_here"] is False
    assert opened.fields["open_for"] == pytest.approx(20.0)
    assert b.open_for() == pytest.approx(20.0)
    assert len([e for e in events if e.name == "breaker_opened"]) == 1  # said once
    assert b.describe()["storage"] == {"kind": "CircuitMemoryStorage", "opens_followed": 1}
