"""The backoff a unit sleeps between its attempts, against what docs/units-of-work.md promises, with
real failures (exact SQLSTATEs raised by the server, a backend killed under the unit) and an
injected ``sleep``/``asleep``, ``clock`` and ``rng``: nothing is slept for real.

- conflicts and outages each back off on their own sequence: a unit's first outage backoff
  is from ``SELF_HEALING_INITIAL_DELAY`` whatever conflicts it met before (and its first
  conflict backoff from ``SELF_HEALING_CONFLICT_DELAY`` after outages);
- ``SELF_HEALING_MAX_DELAY`` caps every backoff, a conflict's too;
- a retry whose backoff ends exactly at ``SELF_HEALING_DEADLINE`` is made, one that would end
  past it is not;
- the sync and async factories sleep the same sequence for the same jitter, and the
  ``Retry attempt`` lines and ``retry`` events say the delay that was slept.

The factories take no ``rng=``: the jitter of a factory's policy is set on it (``with_rng``).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import FakeClock
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._retry import Policy
from resilient_db._unit import CommitReferee

#: a step of a unit's script: a SQLSTATE the server raises, KILL (the unit's backend is
#: terminated under it: 57P01 on its own connection), or None (the attempt succeeds)
KILL = "kill"
KILL_SQL = "SELECT pg_terminate_backend(pg_backend_pid())"


def with_rng(factory: Any, rng: Callable[[], float]) -> Any:
    """``factory`` with its backoff's jitter drawn from ``rng`` (a float in [0, 1))."""
    factory.policy.rng = rng
    return factory


def scripted(steps: list[str | None]) -> tuple[Callable[[Session], int], list[int]]:
    """A unit whose n-th attempt does ``steps[n]`` (the last step repeats)."""
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        step = steps[min(len(calls), len(steps)) - 1]
        if step == KILL:
            session.execute(sa.text(KILL_SQL))
        elif step is not None:
            session.execute(sa.text(f"SELECT raise_code('{step}')"))
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    return unit, calls


def ascripted(steps: list[str | None]) -> Callable[[AsyncSession], Any]:
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        step = steps[min(len(calls), len(steps)) - 1]
        if step == KILL:
            await session.execute(sa.text(KILL_SQL))
        elif step is not None:
            await session.execute(sa.text(f"SELECT raise_code('{step}')"))
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    return unit


def retry_lines(caplog: pytest.LogCaptureFixture, service: str) -> list[float]:
    """The delays the ``Retry attempt`` lines of ``service`` announced."""
    found = []
    for record in caplog.records:
        message = record.getMessage()
        if "Retry attempt" in message and f"service={service} " in message:
            match = re.search(r"next attempt in ([0-9.]+) s", message)
            assert match is not None, message
            found.append(float(match.group(1)))
    return found


def retry_events(events: list[rdb.SelfHealEvent], service: str) -> list[float]:
    return [e.fields["delay"] for e in events if e.name == "retry" and e.service == service]


# conflicts (40001, 40P01), an outage refused by the server (57P03) and a backend killed
# under the unit (57P01): each sequence from its own first delay
MIXED = rdb.Config(
    initial_delay=1.0,
    max_delay=30.0,
    conflict_delay=0.02,
    max_retries=8,
    deadline=3600.0,
    circuit_breaker=False,
)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # two conflicts, then outages: the first outage backoff is INITIAL_DELAY's (it was
        # 4x it: the outage sequence went on from the conflicts' count)
        (["40001", "40P01", "57P03", KILL, None], [0.01, 0.02, 0.5, 1.0]),
        # outages, then conflicts: the first conflict backoff is CONFLICT_DELAY's
        ([KILL, "57P03", "40001", "40001", None], [0.5, 1.0, 0.01, 0.02]),
        # interleaved: each sequence goes on where it was
        (["40001", KILL, "40001", "57P03", "40P01", None], [0.01, 0.5, 0.02, 1.0, 0.04]),
    ],
)
def test_conflicts_and_outages_each_back_off_on_their_own_sequence(
    *,
    engine: sa.Engine,
    service: str,
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
    steps: list[str | None],
    expected: list[float],
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_db")
    slept: list[float] = []
    Factory = with_rng(
        rdb.ResilientSession(engine, service=service, config=MIXED, sleep=slept.append),
        lambda: 0.5,
    )
    unit, calls = scripted(steps)
    assert Factory.run(unit) == 1
    assert len(calls) == len(steps)
    assert slept == pytest.approx(expected, rel=1e-9)
    # what was said is what was slept
    assert retry_events(events, service) == slept
    assert retry_lines(caplog, service) == pytest.approx(slept, abs=5e-4)


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")  # (installs raise_code in the test's database)
async def test_sync_and_async_units_sleep_the_same_sequence_for_the_same_rng(
    engine: sa.Engine, pg_async_url: str, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    steps: list[str | None] = ["40001", "57P03", KILL, "40P01", "57P03", None]
    slept: list[float] = []
    Factory = with_rng(
        rdb.ResilientSession(engine, service=service, config=MIXED, sleep=slept.append),
        random.Random(7).random,
    )
    unit, _ = scripted(steps)
    assert Factory.run(unit) == 1

    aslept: list[float] = []

    async def asleep(seconds: float) -> None:
        aslept.append(seconds)

    async_engine = create_async_engine(pg_async_url)
    try:
        AsyncFactory = with_rng(
            rdb.AsyncResilientSession(
                async_engine, service=f"{service}-async", config=MIXED, asleep=asleep
            ),
            random.Random(7).random,
        )
        assert await AsyncFactory.run(ascripted(steps)) == 1
    finally:
        await async_engine.dispose()
    assert len(slept) == 5
    assert aslept == slept
    # the first backoff of each kind below its own first delay, whatever came before
    conflicts = [slept[0], slept[3]]
    outages = [slept[1], slept[2], slept[4]]
    assert conflicts[0] < 0.02
    assert conflicts[1] < 0.04
    assert outages[0] < 1.0
    assert outages[1] < 2.0
    assert outages[2] < 4.0
    assert retry_events(events, f"{service}-async") == aslept


def test_max_delay_caps_a_conflicts_backoff_too(engine: sa.Engine, service: str) -> None:
    """``SELF_HEALING_MAX_DELAY`` is the backoff cap: conflicts doubled up to 8x
    ``SELF_HEALING_CONFLICT_DELAY`` past it (160 ms slept with a cap of 50 ms)."""
    slept: list[float] = []
    config = rdb.Config(
        initial_delay=0.01, max_delay=0.05, conflict_delay=0.02, max_retries=5, deadline=60.0
    )
    Factory = with_rng(
        rdb.ResilientSession(engine, service=service, config=config, sleep=slept.append),
        lambda: 0.5,
    )
    unit, _ = scripted(["40001"] * 5 + [None])
    assert Factory.run(unit) == 1
    assert slept == pytest.approx([0.01, 0.02, 0.025, 0.025, 0.025], rel=1e-9)


@pytest.mark.parametrize("start", [0.0, 1_000_000.0])
@pytest.mark.parametrize(
    ("deadline", "retries"),
    [
        (0.3, 2),  # 0.1 + 0.2 ends exactly at the deadline: made
        (0.299, 1),  # 1 ms short: the second retry would end past it
        (0.7, 3),  # 0.1 + 0.2 + 0.4
    ],
)
def test_a_retry_whose_backoff_ends_exactly_at_the_deadline_is_made(
    *,
    engine: sa.Engine,
    service: str,
    events: list[rdb.SelfHealEvent],
    deadline: float,
    retries: int,
    start: float,
) -> None:
    """No retry starts whose backoff would end past the deadline (counted from the first
    failure); one ending at it does (0.1 + 0.2 s of backoff, as floats a hair over 0.3, was
    taken for past a deadline of 0.3 s)."""
    clock = FakeClock(start)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    config = rdb.Config(
        initial_delay=0.2, max_delay=30.0, max_retries=10, deadline=deadline, circuit_breaker=False
    )
    Factory = with_rng(
        rdb.ResilientSession(engine, service=service, config=config, sleep=sleep, clock=clock),
        lambda: 0.5,
    )
    unit, calls = scripted(["57P03"])
    with pytest.raises(sa.exc.OperationalError) as info:
        Factory.run(unit)
    assert getattr(info.value.orig, "sqlstate", None) == "57P03"
    assert slept == pytest.approx([0.1, 0.2, 0.4][:retries], rel=1e-12)
    assert len(calls) == retries + 1
    (gave_up,) = [e for e in events if e.name == "gave_up" and e.service == service]
    assert (gave_up.fields["limit"], gave_up.fields["retries"]) == ("deadline", retries)


@pytest.mark.parametrize("start", [0.0, 1_000_000.0])
def test_a_lost_commits_check_due_exactly_at_the_deadline_is_made(start: float) -> None:
    """The checks of a COMMIT whose answer was lost back off within the same deadline: the one
    due exactly at it is made (0.1 + 0.2 s of backoff was taken for past 0.3 s)."""
    clock = FakeClock(start)
    config = rdb.Config(initial_delay=0.2, max_delay=30.0, max_retries=10, deadline=0.3)
    policy = Policy(
        f"backoff-checks-{start:g}",
        config,
        clock=clock,
        rng=lambda: 0.5,
        use_circuit_breaker=False,
    )
    delays = []
    for delay in CommitReferee(policy, None).checks():
        delays.append(delay)
        clock.advance(delay)
    assert delays == pytest.approx([0.0, 0.1, 0.2], rel=1e-12)


def test_a_retry_whose_backoff_outlasts_the_opening_its_failure_made_is_made(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """The unit's own failure opens the breaker for 0.5 s and its backoff is 1.8 s: the retry
    is made once the backoff is slept, the breaker half-open by then (its probe closes it).
    With a backoff shorter than the opening, the unit ends at once (``test_policy.py``)."""
    clock = FakeClock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    config = rdb.Config(
        failure_threshold=1, reset_timeout=0.5, initial_delay=2.0, max_delay=4.0, max_retries=3
    )
    Factory = with_rng(
        rdb.ResilientSession(
            engine, service=service, config=config, sleep=sleep, clock=clock, wall_clock=clock
        ),
        lambda: 0.9,
    )
    unit, calls = scripted(["57P03", None])
    assert Factory.run(unit) == 1
    assert len(calls) == 2
    assert slept == pytest.approx([1.8])
    names = [e.name for e in events if e.service == service]
    assert names.index("breaker_opened") < names.index("retry") < names.index("breaker_closed")
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"
