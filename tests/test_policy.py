"""The decision engine without a server: backoff, stop, breaker states, cancellation.

Errors are the driver's own exception classes (psycopg.errors.*), which carry their SQLSTATE;
everything that needs a real server is in test_session.py.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable

import psycopg.errors as pge
import pytest
from scenarios import FakeClock

import resilient_db as rdb
from resilient_db import _retry
from resilient_db._breaker import Breaker
from resilient_db._classify import Outcome, mark_refused_unsure, mark_replay_safe
from resilient_db._commit import UnprovenCommit
from resilient_db._retry import Policy
from resilient_db._state import STATE
from resilient_db._statements import refused_unsure_before

_names = itertools.count()


class Sleeps:
    """Records requested sleeps and moves a fake clock instead of sleeping."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.calls: list[float] = []
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.clock is not None:
            self.clock.advance(seconds)


def make_policy(config: rdb.Config, **kw: object) -> Policy:
    return Policy(f"policy-{next(_names)}", config, **kw)  # type: ignore[arg-type]


def failing(times: int, exc: Callable[[], BaseException]) -> Callable[[], str]:
    calls = {"n": 0}

    def attempt() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc()
        return f"ok after {calls['n']}"

    attempt.calls = calls  # type: ignore[attr-defined]
    return attempt


def test_conflicts_retry_fast_outages_back_off_exponentially_with_full_jitter() -> None:
    cfg = rdb.Config(initial_delay=1.0, max_delay=30.0, conflict_delay=0.02)
    p = make_policy(cfg, rng=lambda: 0.999999)
    conflict = [p.delay(Outcome.CONFLICT, n) for n in range(1, 7)]
    outage = [p.delay(Outcome.DISCONNECT, n) for n in range(1, 8)]
    assert conflict[0] == pytest.approx(0.02, rel=1e-3)
    assert max(conflict) == pytest.approx(0.16, rel=1e-3)  # capped in the tens of ms
    assert outage[:5] == pytest.approx([1, 2, 4, 8, 16], rel=1e-3)
    assert outage[5:] == pytest.approx([30, 30], rel=1e-3)  # capped at max_delay
    low = make_policy(cfg, rng=lambda: 0.0)
    assert low.delay(Outcome.UNAVAILABLE, 3) == 0.0  # full jitter: anywhere in [0, ceiling)


def test_set_testing_zeroes_backoff_and_restores() -> None:
    p = make_policy(rdb.Config(), rng=lambda: 0.5)
    with rdb.set_testing():
        assert p.delay(Outcome.DISCONNECT, 4) == 0.0
    assert p.delay(Outcome.DISCONNECT, 1) == 0.5


def test_transient_error_is_retried_and_result_returned() -> None:
    sleeps = Sleeps()
    p = make_policy(rdb.Config(circuit_breaker=False), sleep=sleeps)
    attempt = failing(2, pge.SerializationFailure)
    assert p.call(attempt) == "ok after 3"
    assert len(sleeps.calls) == 2
    assert p.stats.snapshot()["retries_by_class"] == {"conflict": 2}
    assert p.stats.recovered == 1


def test_exhausted_retries_reraise_the_original_error() -> None:
    sleeps = Sleeps()
    p = make_policy(rdb.Config(max_retries=3, circuit_breaker=False), sleep=sleeps)
    errors: list[BaseException] = []

    def attempt() -> None:
        errors.append(pge.AdminShutdown())
        raise errors[-1]

    with pytest.raises(pge.AdminShutdown) as info:
        p.call(attempt)
    assert len(errors) == 4  # the first attempt and MAX_RETRIES retries
    assert info.value is errors[-1]
    assert p.stats.gave_up == 1


def test_not_transient_is_raised_at_once() -> None:
    sleeps = Sleeps()
    p = make_policy(rdb.Config(), sleep=sleeps)
    attempt = failing(5, pge.UniqueViolation)
    with pytest.raises(pge.UniqueViolation):
        p.call(attempt)
    assert attempt.calls["n"] == 1  # type: ignore[attr-defined]
    assert sleeps.calls == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_base_exceptions_are_never_retried_or_counted(exc: type[BaseException]) -> None:
    cfg = rdb.Config(failure_threshold=1)
    p = make_policy(cfg)
    attempt = failing(5, exc)
    with pytest.raises(exc):
        p.call(attempt)
    assert attempt.calls["n"] == 1  # type: ignore[attr-defined]
    assert p.breaker is not None
    assert p.breaker.state == "closed"


def test_overall_deadline_stops_retrying_before_sleeping_past_it() -> None:
    clock = FakeClock()
    sleeps = Sleeps(clock)
    cfg = rdb.Config(max_retries=50, initial_delay=1.0, max_delay=4.0, deadline=10.0)
    p = make_policy(cfg, sleep=sleeps, clock=clock, rng=lambda: 0.999999, use_circuit_breaker=False)
    with pytest.raises(pge.CannotConnectNow):
        p.call(failing(100, pge.CannotConnectNow))
    assert sum(sleeps.calls) <= 10.0
    assert len(sleeps.calls) == 3  # 1 + 2 + 4 = 7 s slept; another 4 s would pass the deadline


def test_a_unit_stopped_by_the_deadline_says_so(
    caplog: pytest.LogCaptureFixture, events: list[rdb.SelfHealEvent]
) -> None:
    """Its ``Gave up`` line said "after 3 retries" of 50 and nothing of the deadline."""
    clock = FakeClock()
    cfg = rdb.Config(max_retries=50, initial_delay=1.0, max_delay=4.0, deadline=10.0)
    p = make_policy(
        cfg, sleep=Sleeps(clock), clock=clock, rng=lambda: 0.999999, use_circuit_breaker=False
    )
    with caplog.at_level("ERROR", logger="resilient_db"), pytest.raises(pge.CannotConnectNow):
        p.call(failing(100, pge.CannotConnectNow))
    [line] = [r.getMessage() for r in caplog.records]
    assert line == (
        f"[SELF-HEAL] Gave up: service={p.service} unavailable (SQLSTATE 57P03) after 3 retries"
        " (the next would end past the deadline of 10 s); raising CannotConnectNow"
    )
    [gave_up] = [e for e in events if e.name == "gave_up"]
    assert gave_up.fields["limit"] == "deadline"
    with pytest.raises(pge.CannotConnectNow):
        make_policy(rdb.Config(max_retries=2), use_circuit_breaker=False).call(
            failing(100, pge.CannotConnectNow)
        )
    assert events[-1].name == "gave_up"
    assert events[-1].fields["limit"] == "max_retries"
    assert "past the deadline" not in events[-1].message


def test_no_retries_is_retry_off(
    caplog: pytest.LogCaptureFixture, events: list[rdb.SelfHealEvent]
) -> None:
    """``max_retries=0`` logged an ERROR ``Gave up ... after 0 retries`` and counted a give-up
    for every failing unit, where ``retry=False`` (the same units) says and counts nothing."""
    results = []
    for cfg in (rdb.Config(max_retries=0), rdb.Config(retry=False)):
        p = make_policy(cfg, use_circuit_breaker=False)
        attempt = failing(100, pge.CannotConnectNow)
        with caplog.at_level("INFO", logger="resilient_db"), pytest.raises(pge.CannotConnectNow):
            p.call(attempt)
        counters = rdb.health()["services"][p.service]["counters"]
        results.append((attempt.calls["n"], counters["gave_up"], cfg.retry_on))  # type: ignore[attr-defined]
    assert results == [(1, 0, False)] * 2
    assert not caplog.records
    assert not events


def test_retry_switch_off_raises_transient_errors_at_once() -> None:
    p = make_policy(rdb.Config(retry=False))
    attempt = failing(1, pge.DeadlockDetected)
    with pytest.raises(pge.DeadlockDetected):
        p.call(attempt)
    assert attempt.calls["n"] == 1  # type: ignore[attr-defined]


def test_open_breaker_ends_the_retry_loop_at_once(events: list[rdb.SelfHealEvent]) -> None:
    clock = FakeClock()
    sleeps = Sleeps()
    cfg = rdb.Config(failure_threshold=2, max_retries=10, reset_timeout=30.0)
    p = make_policy(cfg, sleep=sleeps, wall_clock=clock)
    attempt = failing(100, pge.AdminShutdown)
    with pytest.raises(rdb.CircuitOpenError) as info:
        p.call(attempt)
    assert attempt.calls["n"] == 2  # type: ignore[attr-defined]
    assert info.value.retry_after == pytest.approx(30.0)
    assert "retry in 30.0 s" in str(info.value)
    # the second failure opened it: no retry is slept for, logged or counted after it, and
    # the unit is counted as given up, its last failure the error's cause
    assert len(sleeps.calls) == 1
    assert (p.stats.attempts, p.stats.retries, p.stats.gave_up) == (2, 1, 1)
    assert isinstance(info.value.__cause__, pge.AdminShutdown)
    assert [e.name for e in events if e.name in ("retry", "gave_up")] == ["retry", "gave_up"]


class _OpenedMeanwhile:
    """A backoff sleep during whose ``nth`` call other units of ``p``'s service fail until
    its breaker opens."""

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.slept: list[float] = []
        self.policy: Policy | None = None
        self.gave_up_before = 0  # the other units' give-ups counted in the service's stats

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        p = self.policy
        if len(self.slept) != self.nth or p is None or p.breaker is None:
            return
        other = Policy(p.service, p.config.replace(max_retries=0))
        while p.breaker.state == "closed":
            with pytest.raises(pge.AdminShutdown):
                other.call(failing(1, pge.AdminShutdown))
        self.gave_up_before = p.stats.gave_up

    async def asleep(self, seconds: float) -> None:
        self(seconds)


def _assert_gave_up_as_the_circuit_opened(
    p: Policy,
    meanwhile: _OpenedMeanwhile,
    info: pytest.ExceptionInfo[rdb.CircuitOpenError],
    seen: list[rdb.SelfHealEvent],
) -> None:
    assert len(meanwhile.slept) == 2
    assert isinstance(info.value.__cause__, pge.AdminShutdown)  # the unit's last failure
    assert info.value.retry_after == pytest.approx(30.0)
    assert p.stats.gave_up == meanwhile.gave_up_before + 1
    mine = [e for e in seen if e.name == "gave_up" and e.fields.get("circuit_opened")]
    assert [(e.fields["retries"], e.fields["outcome"]) for e in mine] == [(1, "disconnect")]
    assert "the circuit breaker opened while it retried and refused retry 2" in mine[0].message


def test_a_retry_refused_by_a_breaker_opened_meanwhile_gives_up_with_the_last_error(
    events: list[rdb.SelfHealEvent],
) -> None:
    """Other units' failures open the breaker while the unit backs off: its next retry is
    refused. Counted and reported as given up, the last failure the CircuitOpenError's cause,
    as when the unit's own failure opens it."""
    cfg = rdb.Config(failure_threshold=3, max_retries=10, reset_timeout=30.0)
    meanwhile = _OpenedMeanwhile(nth=2)
    p = meanwhile.policy = make_policy(cfg, sleep=meanwhile, wall_clock=FakeClock())
    attempt = failing(100, pge.AdminShutdown)
    with pytest.raises(rdb.CircuitOpenError) as info:
        p.call(attempt)
    assert attempt.calls["n"] == 2  # type: ignore[attr-defined]
    _assert_gave_up_as_the_circuit_opened(p, meanwhile, info, events)


@pytest.mark.asyncio
async def test_an_async_retry_refused_by_a_breaker_opened_meanwhile_gives_up_the_same(
    events: list[rdb.SelfHealEvent],
) -> None:
    cfg = rdb.Config(failure_threshold=3, max_retries=10, reset_timeout=30.0)
    meanwhile = _OpenedMeanwhile(nth=2)
    p = meanwhile.policy = make_policy(cfg, asleep=meanwhile.asleep, wall_clock=FakeClock())
    calls = {"n": 0}

    async def attempt() -> str:
        calls["n"] += 1
        raise pge.AdminShutdown()

    with pytest.raises(rdb.CircuitOpenError) as info:
        await p.acall(attempt)
    assert calls["n"] == 2
    _assert_gave_up_as_the_circuit_opened(p, meanwhile, info, events)


# -- the breaker ---------------------------------------------------------------------------------
def new_breaker(clock: FakeClock, **cfg: object) -> Breaker:
    config = rdb.Config(**cfg)  # type: ignore[arg-type]
    return Breaker(f"breaker-{next(_names)}", config, clock=clock)


def test_breaker_opens_rejects_half_opens_with_bounded_probes_and_closes() -> None:
    clock = FakeClock()
    b = new_breaker(clock, failure_threshold=3, reset_timeout=10.0, half_open_probes=2)
    for _ in range(3):
        probe = b.before_call()
        b.on_failure(probe)
    assert b.state == "open"
    with pytest.raises(rdb.CircuitOpenError) as info:
        b.before_call()
    assert info.value.retry_after == pytest.approx(10.0)
    clock.advance(4)
    with pytest.raises(rdb.CircuitOpenError) as info:
        b.before_call()
    assert info.value.retry_after == pytest.approx(6.0)

    clock.advance(6)
    first, second = b.before_call(), b.before_call()
    assert (first, second) == (True, True)
    assert b.state == "half-open"
    with pytest.raises(rdb.CircuitOpenError):  # only two probes at a time
        b.before_call()
    b.on_success(first)
    assert b.state == "half-open"
    b.on_success(second)
    assert b.state == "closed"
    assert b.before_call() is False


def test_failed_probe_reopens_for_a_full_timeout() -> None:
    clock = FakeClock()
    b = new_breaker(clock, failure_threshold=1, reset_timeout=5.0)
    b.on_failure(b.before_call())
    clock.advance(5)
    probe = b.before_call()
    assert probe is True
    clock.advance(1)
    b.on_failure(probe)
    assert b.state == "open"
    with pytest.raises(rdb.CircuitOpenError) as info:
        b.before_call()
    assert info.value.retry_after == pytest.approx(5.0)


def test_success_resets_consecutive_failures_and_neutral_counts_nothing() -> None:
    clock = FakeClock()
    b = new_breaker(clock, failure_threshold=3)
    for _ in range(2):
        b.on_failure(b.before_call())
    b.on_success(b.before_call())
    for _ in range(2):
        b.on_failure(b.before_call())
    for _ in range(10):
        b.on_neutral(b.before_call())
    assert b.state == "closed"


def test_breaker_holds_no_lock_across_the_protected_call() -> None:
    """Eight attempts must be inside the protected section at the same time; pybreaker's own
    ``call`` would run them one at a time and this barrier would time out."""
    p = make_policy(rdb.Config())
    barrier = threading.Barrier(8, timeout=10)
    results: list[int] = []

    def attempt() -> int:
        return barrier.wait()

    threads = [threading.Thread(target=lambda: results.append(p.call(attempt))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(results) == list(range(8))


def test_units_in_flight_when_the_database_fails_count_as_one_failure() -> None:
    """Eight units cut off together (a failover, a restart) are one failure for the breaker:
    each began before the first of them failed. Units that begin afterwards and fail count
    again, so a database that stays down still opens the circuit."""
    p = make_policy(rdb.Config(failure_threshold=3, max_retries=0))
    assert p.breaker is not None
    inside = threading.Barrier(8, timeout=10)

    def cut_off() -> None:
        inside.wait()  # all eight are running before any fails
        raise pge.AdminShutdown("terminating connection due to administrator command")

    def run() -> None:
        with pytest.raises(pge.AdminShutdown):
            p.call(cut_off)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    info = p.breaker.describe()
    assert (info["state"], info["failures"]) == ("closed", 1)
    for _ in range(2):  # one after another: each began after the last failure
        with pytest.raises(pge.AdminShutdown):
            p.call(failing(1, lambda: pge.AdminShutdown("down")))
    assert p.breaker.state == "open"


class _Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str | None, str]] = []

    def before_call(self, *a: object, **k: object) -> None:
        pass

    def failure(self, *a: object) -> None:
        pass

    def success(self, *a: object) -> None:
        pass

    def state_change(self, cb: object, old: object, new: object) -> None:
        self.changes.append((getattr(old, "name", None), new.name))  # type: ignore[attr-defined]


def test_pybreaker_listeners_see_every_state_change() -> None:
    clock = FakeClock()
    rec = _Recorder()
    b = Breaker(
        f"listen-{next(_names)}",
        rdb.Config(failure_threshold=1, reset_timeout=1.0),
        clock=clock,
        listeners=[rec],
    )
    b.on_failure(b.before_call())
    clock.advance(1)
    b.on_success(b.before_call())
    assert rec.changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_broken_breaker_storage_falls_back_to_running_the_call(
    caplog: pytest.LogCaptureFixture, events: list[rdb.SelfHealEvent]
) -> None:
    """The calls run without the breaker; one line for them all (a broken storage fails every
    call: a line each was a log storm), naming the error's class, never its text (the
    storage's own, which may quote its secrets), at DEBUG neither; the hooks see each."""

    SECRET = "password=" + "hunter2"  # (not a literal: a traceback shows the raising line)

    class BrokenStorage:
        """A shared store that works when the breaker is made, then becomes unreachable."""

        name = "broken"
        broken = False
        counter = 0
        success_counter = 0
        opened_at = None
        _state = "closed"

        @property
        def state(self) -> str:
            if self.broken:
                raise ConnectionError(f"shared breaker store unreachable, {SECRET}")
            return self._state

        @state.setter
        def state(self, value: str) -> None:
            self._state = value

    storage = BrokenStorage()
    p = make_policy(rdb.Config(), breaker_storage=storage)
    storage.broken = True
    with caplog.at_level("DEBUG", logger="resilient_db"):
        for _ in range(5):
            assert p.call(lambda: 42) == 42
        # a new period: the next line says how many the last one left unlogged
        _retry._MACHINERY_LINES.restart((p.service, STATE.generation))
        assert p.call(lambda: 42) == 42
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"[SELF-HEAL] circuit breaker admission failed for service={p.service} (ConnectionError);"
        f" running the call without it{more}"
        for more in ("", " (4 more since the last line)")
    ]
    assert "hunter2" not in caplog.text
    assert "ConnectionError: (no SQLSTATE; its text left out: not ours to show)" in caplog.text
    failed = [e for e in events if e.name == "machinery_failed"]
    assert [(e.fields["part"], e.fields["error"]) for e in failed] == [
        ("circuit breaker admission", "ConnectionError")
    ] * 6
    # what the lines say, as the other rate-limited events say it: 0 for one left unlogged
    assert [e.fields["suppressed"] for e in failed] == [0, 0, 0, 0, 0, 4]


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: open("/nonexistent/resilient_db/config.yaml"), FileNotFoundError),  # noqa: SIM115
        (lambda: (_ for _ in ()).throw(PermissionError("own file")), PermissionError),
        (lambda: (_ for _ in ()).throw(TimeoutError("own HTTP call")), TimeoutError),
        (
            lambda: (_ for _ in ()).throw(ConnectionRefusedError("own service")),
            ConnectionRefusedError,
        ),
    ],
)
def test_the_applications_own_os_errors_are_not_database_faults(
    make: Callable[[], object], kind: type[OSError]
) -> None:
    """An OSError raised by the application's code (not the driver's) is re-raised at once:
    neither retried nor counted by the breaker."""
    p = make_policy(rdb.Config(failure_threshold=1), sleep=Sleeps())
    calls = {"n": 0}

    def unit() -> object:
        calls["n"] += 1
        return make()

    with pytest.raises(kind):
        p.call(unit)
    assert calls["n"] == 1
    assert p.breaker is not None
    assert p.breaker.state == "closed"
    assert p.stats.retries == 0
    with pytest.raises(kind) as info:
        unit()
    assert not rdb.is_transient(info.value)


def test_an_unproven_commit_found_not_committed_is_ours_and_run_again() -> None:
    """A COMMIT answered with a warning (a cancelled wait for the synchronous standby) is an
    error of resilient_db's own (``except rdb.ResilientDBError`` catches it where it is raised
    to the caller: retrying off, or out of retries); found not committed by the check, it is
    marked so, and a marked one is run again, although errors of ours never are."""
    warned = UnprovenCommit("canceling wait for synchronous replication due to user request")
    assert isinstance(warned, rdb.ResilientDBError)
    assert rdb.classify(warned) is Outcome.NOT_TRANSIENT
    mark_replay_safe(warned)
    assert rdb.classify(warned) is Outcome.CONFLICT
    assert rdb.classify(rdb.CircuitOpenError("db", 1.0)) is Outcome.NOT_TRANSIENT
    # one of ours caused by a marked error (the breaker opened while such a unit backed off)
    # is not run again: only the marked error itself is
    marked = pge.InvalidSqlStatementName("the marker statement is gone")
    mark_replay_safe(marked)
    opened = rdb.CircuitOpenError("db", 1.0)
    opened.__cause__ = marked
    assert rdb.classify(marked) is Outcome.CONFLICT
    assert rdb.classify(opened) is Outcome.NOT_TRANSIENT
    assert not rdb.is_transient(opened)


def _unsure_refusal() -> BaseException:
    """A lost server's error (57P01) marked as a 25006 the server's answer and the login's
    report disagreed on (see ``_unit.refused_unsure_again``): the unit's next attempts are
    told so (``refused_unsure_before``)."""
    exc = pge.AdminShutdown()
    mark_refused_unsure(exc)
    return exc


@pytest.mark.parametrize("form", ["sync", "async"])
def test_an_unsure_refusal_is_forgotten_when_the_retry_loop_fails_as_it_is_set_up(
    monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """``refused_unsure_before`` is set for a unit's replays after an attempt met a refusal
    taken for a lost server where the server's answer and the login disagreed, and reset as its
    retries end: on every way out, also an error of the retry loop's own set-up (an
    interruption landing there: a signal's ``KeyboardInterrupt``). It was set before the loop
    was under its ``finally``: left set in the thread's (or task's) context, it made every
    later unit there take its first such refusal for its own write (raised, not replayed)."""

    def interrupted(*args: object, **kwargs: object) -> dict[str, object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(Policy, "_retrying_kwargs", interrupted)
    p = make_policy(rdb.Config(circuit_breaker=False), sleep=Sleeps())

    def attempt() -> str:
        raise _unsure_refusal()

    async def aattempt() -> str:
        raise _unsure_refusal()

    async def arun() -> object:
        with pytest.raises(KeyboardInterrupt):
            await p.acall(aattempt)
        return refused_unsure_before.get()

    if form == "sync":
        with pytest.raises(KeyboardInterrupt):
            p.call(attempt)
        assert refused_unsure_before.get() is None
    else:
        assert asyncio.run(arun()) is None
