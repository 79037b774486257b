"""How long a breaker stays open is timed by a monotonic clock: a step of the wall clock (NTP
setting it back, or forward) neither keeps an opening for the size of the step nor ends it
early. The wall clock only stamps the opening (pybreaker's ``opened_at``, the time of day), and
times an opening another breaker made in a storage they share (another process's), as pybreaker
does."""

from __future__ import annotations

import itertools
import threading
import types
from datetime import datetime, timezone

import pybreaker
import pytest
import sqlalchemy as sa
from scenarios import FakeClock
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db import _breaker
from resilient_db._breaker import Breaker

pytestmark = pytest.mark.usefixtures("no_backoff")

HOUR = 3600.0
_names = itertools.count()


class WholeSecondStorage(pybreaker.CircuitMemoryStorage):
    """A storage of the caller's that keeps ``opened_at`` in whole seconds, as pybreaker's
    ``CircuitRedisStorage`` does."""

    def __init__(self) -> None:
        super().__init__(pybreaker.STATE_CLOSED)

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_at = value.replace(microsecond=0)


def opened(
    mono: FakeClock, wall: FakeClock, storage: pybreaker.CircuitBreakerStorage | None = None
) -> Breaker:
    """A breaker timed by ``mono``, stamped by ``wall``, opened by one failure."""
    config = rdb.Config(failure_threshold=1, reset_timeout=30.0)
    b = Breaker(f"clock-{next(_names)}", config, storage=storage, clock=mono, wall_clock=wall)
    b.on_failure(b.before_call())
    assert b.state == "open"
    return b


def retry_after(b: Breaker) -> float:
    with pytest.raises(rdb.CircuitOpenError) as info:
        b.before_call()
    return info.value.retry_after


@pytest.mark.parametrize("storage", [None, WholeSecondStorage], ids=["own", "whole-seconds"])
def test_a_wall_clock_set_back_an_hour_does_not_keep_the_breaker_open_for_an_hour(
    storage: type[pybreaker.CircuitBreakerStorage] | None,
) -> None:
    mono, wall = FakeClock(5_000.0), FakeClock(1_700_000_000.25)
    b = opened(mono, wall, None if storage is None else storage())
    # the opening is stamped with the time of day (pybreaker's field, for display and logs)
    stamp = datetime.fromtimestamp(1_700_000_000.25, timezone.utc)
    if storage is not None:
        stamp = stamp.replace(microsecond=0)
    assert b._storage.opened_at == stamp

    wall.advance(-HOUR)  # NTP sets the wall clock back
    assert retry_after(b) == pytest.approx(30.0)
    assert b.describe()["retry_after"] == pytest.approx(30.0)
    mono.advance(29.5)
    assert retry_after(b) == pytest.approx(0.5)
    mono.advance(0.5)  # the reset timeout has passed, by the monotonic clock
    assert b.describe()["state"] == "half-open"
    probe = b.before_call()
    assert probe is True
    assert b.state == "half-open"
    b.on_success(probe)
    assert b.state == "closed"


@pytest.mark.parametrize("storage", [None, WholeSecondStorage], ids=["own", "whole-seconds"])
def test_a_wall_clock_set_forward_does_not_end_the_opening_early(
    storage: type[pybreaker.CircuitBreakerStorage] | None,
) -> None:
    mono, wall = FakeClock(5_000.0), FakeClock(1_700_000_000.25)
    b = opened(mono, wall, None if storage is None else storage())
    wall.advance(HOUR)
    assert retry_after(b) == pytest.approx(30.0)
    mono.advance(20.0)
    wall.advance(HOUR)
    assert retry_after(b) == pytest.approx(10.0)
    assert b.state == "open"
    mono.advance(10.0)
    assert b.before_call() is True


def test_an_opening_another_breaker_made_in_a_shared_storage_is_timed_by_its_opened_at() -> None:
    """A storage of the caller's shared by processes (``CircuitRedisStorage``): an opening this
    breaker did not make is known only by its ``opened_at``, a time of day, as pybreaker times
    it (the monotonic clocks of two processes have nothing in common)."""
    storage = WholeSecondStorage()
    wall = FakeClock(1_700_000_000.0)
    other = opened(FakeClock(5_000.0), wall, storage)  # "another process" opened it
    mono = FakeClock(9_000.0)
    b = Breaker(other.service, other.config, storage=storage, clock=mono, wall_clock=wall)
    assert retry_after(b) == pytest.approx(30.0)
    wall.advance(30.0)
    assert b.before_call() is True


def test_a_clock_given_alone_times_and_stamps_the_breaker() -> None:
    """A test's fake clock (a factory's ``wall_clock=``, ``Breaker(clock=...)``) drives the
    opening's time and its stamp, as before."""
    clock = FakeClock(1_700_000_000.0)
    b = Breaker(f"clock-{next(_names)}", rdb.Config(failure_threshold=1), clock=clock)
    b.on_failure(b.before_call())
    assert b._storage.opened_at == datetime.fromtimestamp(1_700_000_000.0, timezone.utc)
    clock.advance(b.config.reset_timeout)
    assert b.before_call() is True


# -- a factory with the clocks it has by default -------------------------------------------------
def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now: a failure


def healthy(session: Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def test_a_factorys_breaker_is_timed_monotonically_whatever_the_wall_clock_does(
    engine: sa.Engine, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No clock injected: the breaker reads this host's clocks, here stood in for (the time
    module as the breaker module sees it) so that the wall clock can be stepped."""
    mono, wall = FakeClock(5_000.0), FakeClock(1_700_000_000.0)
    monkeypatch.setattr(_breaker, "time", types.SimpleNamespace(monotonic=mono, time=wall))
    config = rdb.Config(failure_threshold=1, max_retries=0, reset_timeout=30.0)
    Factory = rdb.ResilientSession(engine, service=service, config=config)

    def state() -> dict[str, object]:
        return rdb.health()["services"][service]["breaker"]  # type: ignore[no-any-return]

    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    wall.advance(-HOUR)
    assert state()["retry_after"] == pytest.approx(30.0)
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(healthy)
    mono.advance(30.0)
    assert Factory.run(healthy) == 1  # the probe went through and closed the breaker
    assert state()["state"] == "closed"

    with pytest.raises(sa.exc.OperationalError):
        Factory.run(unavailable)
    wall.advance(2 * HOUR)  # and set forward: the opening is not over
    with pytest.raises(rdb.CircuitOpenError) as info:
        Factory.run(healthy)
    assert info.value.retry_after == pytest.approx(30.0)
    assert state()["state"] == "open"


class HeldClock(FakeClock):
    """A monotonic clock that holds the thread ``hold`` once in its next read (after taking the
    time), until :attr:`go` is set: that thread's decision then rests on what it read before."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.hold: threading.Thread | None = None
        self.reached = threading.Event()
        self.go = threading.Event()

    def __call__(self) -> float:
        now = self.now
        if threading.current_thread() is self.hold:
            self.hold = None
            self.reached.set()
            self.go.wait(10)
        return now


class HeldCaller:
    """A thread asking ``b`` for a call (``before_call``), held by ``mono`` in its read of the
    clock (see :class:`HeldClock`) until :meth:`released`."""

    def __init__(self, b: Breaker, mono: HeldClock) -> None:
        self.mono = mono
        self.answers: list[object] = []
        self.thread = threading.Thread(target=self._ask, args=(b,))
        mono.hold = self.thread
        self.thread.start()
        assert mono.reached.wait(10)

    def _ask(self, b: Breaker) -> None:
        try:
            self.answers.append(b.before_call())
        except rdb.CircuitOpenError as exc:
            self.answers.append(exc)

    def released(self) -> object:
        """Let the thread go on; its one answer (the call's admission, or the refusal)."""
        self.mono.go.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert len(self.answers) == 1
        return self.answers[0]


def _opening_over() -> tuple[HeldClock, Breaker]:
    """A breaker (one probe, 30 s openings) opened by a failure, its opening just over."""
    mono = HeldClock(5_000.0)
    config = rdb.Config(failure_threshold=1, reset_timeout=30.0, half_open_probes=1)
    b = Breaker(f"clock-{next(_names)}", config, clock=mono, wall_clock=FakeClock(1.7e9))
    b.on_failure(b.before_call())
    mono.advance(30.0)
    return mono, b


def test_a_failed_probe_reopens_for_a_whole_reset_timeout_for_a_caller_already_asking() -> None:
    """A thread that found the opening over, then lost the CPU before it switched the breaker
    half-open, while another thread's probe was let through and failed (opening it anew), let
    itself through as a second probe at once: the new opening lasted no time at all, and the
    failing database got another call (a half-open line right after the opening's)."""
    mono, b = _opening_over()
    caller = HeldCaller(b, mono)  # it read the old opening, and is held there
    probe = b.before_call()
    assert probe is True
    b.on_failure(probe)  # the probe fails: open again, for 30 s from now
    refused = caller.released()
    assert isinstance(refused, rdb.CircuitOpenError), refused
    assert refused.retry_after == pytest.approx(30.0)
    assert b.state == "open"


def test_a_caller_that_found_the_opening_over_keeps_a_short_opening_made_meanwhile() -> None:
    """A thread that found the opening over, then lost the CPU before it switched the breaker
    half-open, while an operator opened it again for half a second: that opening stands (the
    call is refused for the half second it has left, said as by hand), and only its end lets a
    probe through; the thread does not switch it half-open for being short."""
    mono, b = _opening_over()
    caller = HeldCaller(b, mono)  # it read the old opening, and is held there
    assert b.open(reason="failover", seconds=0.5) is False  # (not shared: this process's)
    refused = caller.released()
    assert isinstance(refused, rdb.CircuitOpenError), refused
    assert refused.retry_after == pytest.approx(0.5)
    assert refused.state == "open"
    assert refused.by_hand is True
    assert b.state == "open"
    mono.advance(0.4)
    assert retry_after(b) == pytest.approx(0.1)
    mono.advance(0.1)
    assert b.before_call() is True
    assert b.state == "half-open"
