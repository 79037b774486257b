"""The retry budget (``SELF_HEALING_RETRY_BUDGET``): its arithmetic with an injected clock, units
that give up at once with their original error when it is spent, conflicts left out of it, a
full outage with many concurrent units in one process and in a fleet of processes sharing it
through a real Redis; Redis paused or flushed under the shared breaker and budget."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import Gate, fleet, forked
from processes import wait_for
from scenarios import held_and_released
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._budget import WINDOW, LocalBudget, RetryBudget, budgets, spread
from resilient_db._observability import FleetBudgetHealth
from resilient_db.metrics import HealthCollector
from resilient_db.testing import FaultProxy, PostgresServer, RedisServer, free_port

pytestmark = pytest.mark.usefixtures("no_backoff")


# -- the arithmetic ------------------------------------------------------------------------------
def test_ratio_of_recent_first_attempts_plus_a_floor() -> None:
    budget = LocalBudget(ratio=0.2, floor=2, now=100.0)
    budget.observe(50, 100.0)  # 50 first attempts in the last second
    paid = [budget.try_withdraw(100.0) for _ in range(14)]
    assert paid.count("ratio") == 10  # 0.2 x 50
    assert paid.count("floor") == 2  # one second's worth of the floor, no large reserve
    assert paid[-2:] == [None, None]
    # the floor refills at 2/s; the ratio part needs new first attempts
    assert budget.try_withdraw(100.5) == "floor"
    assert budget.try_withdraw(100.5) is None
    budget.observe(55, 100.6)
    assert budget.try_withdraw(100.6) == "ratio"


def test_first_attempts_expire_after_the_window() -> None:
    budget = LocalBudget(ratio=0.5, floor=0, now=0.0)
    budget.observe(10, 0.5)
    assert budget.try_withdraw(0.5) == "ratio"
    assert budget.try_withdraw(WINDOW + 1.0) is None  # deposits of second 0 are gone


def test_a_long_quiet_spell_does_not_count_as_recent() -> None:
    # 10,000 units over an hour, seen only now: spread over the hour, ~28 fall in the window
    budget = LocalBudget(ratio=0.2, floor=0, now=0.0)
    budget.observe(10_000, 3600.0)
    paid = [budget.try_withdraw(3600.0) for _ in range(20)]
    assert 4 <= paid.count("ratio") <= 6  # 0.2 x 10,000 x 10/3600 = 5.6
    assert paid[-1] is None


@pytest.mark.parametrize("start", [1000.0, 1000.3, 12345.678])
@pytest.mark.parametrize("span", [1.01, 1.5, 2.2, 3.3, 7.77, 9.0])
def test_first_attempts_seen_after_a_gap_are_counted_once(start: float, span: float) -> None:
    """A count seen after a gap of more than a second is spread over the seconds of the gap,
    each its share: the shares add up to the count (not up to twice it)."""
    budget = LocalBudget(ratio=0.1, floor=0, now=start)
    budget.observe(100, now=start + span)
    assert budget.totals(start + span)[0] == pytest.approx(100)


def test_a_spread_over_more_than_the_window_leaves_out_the_seconds_past_it() -> None:
    shares = spread(20, 100.0, 120.0)  # one a second, the last ten in the window
    assert sorted(shares) == list(range(111, 120))  # (second 120's share: none of it yet)
    assert sum(shares.values()) == pytest.approx(9.0)
    shares = spread(20, 100.0, 120.5)  # 20/20.5 a second: 111..119 whole, half of 120
    assert sorted(shares) == list(range(111, 121))


def test_a_count_seen_just_over_a_second_later_is_counted_once() -> None:
    budget = LocalBudget(ratio=0.1, floor=0, now=1000.0)
    budget.observe(100, now=1001.01)
    assert budget.totals(1001.01)[0] == 100
    paid = [budget.try_withdraw(1001.01) for _ in range(11)]
    assert paid.count("ratio") == 10  # 0.1 x 100, not 0.1 x 198
    assert paid[-1] is None


def test_counters_started_again_start_over() -> None:
    budget = LocalBudget(ratio=1.0, floor=0, now=0.0, first_attempts=100)
    assert budget.observe(3, 0.1, reset=True) == 0  # reset_state made new counters
    assert budget.observe(5, 0.2) == 2


def test_a_retry_in_flight_is_not_a_new_first_attempt() -> None:
    """attempts - retries dips by one while a counted retry's attempt is still running, and
    comes back when it ends: that is no new unit."""
    budget = LocalBudget(ratio=1.0, floor=0, now=0.0, first_attempts=10)
    assert budget.observe(9, 0.1) == 0  # a retry counted, its attempt running
    assert budget.observe(10, 0.2) == 0  # its attempt ended
    assert budget.observe(12, 0.3) == 2  # two new units
    assert budget.totals(0.3)[0] == 2


# -- units of work -------------------------------------------------------------------------------
@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION raise_code(code text) RETURNS void LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'raised %', code USING ERRCODE = code; END $$"
            )
        )
    yield eng
    eng.dispose()


def budget_config(**changes: Any) -> rdb.Config:
    base: dict[str, Any] = {
        "max_retries": 5,
        "retry_budget": 0.0,
        "retry_budget_floor": 0,
        "circuit_breaker": False,
    }
    base.update(changes)
    return rdb.Config(**base)


def budget_session(
    engine: sa.Engine, redis: RedisServer | None, service: str, **changes: Any
) -> tuple[rdb.ResilientSession, RetryBudget]:
    """A factory of ``service`` with a retry budget of 0.5 (``changes`` besides), shared
    through ``redis`` when given (its link up before it returns), and its budget."""
    shared = {"redis_url": redis.url, "redis_timeout": 5.0} if redis is not None else {}
    config = budget_config(retry_budget=0.5, **shared, **changes)
    Session = rdb.ResilientSession(engine, service=service, config=config)
    budget = budgets()[service]
    if redis is not None:
        wait_for(lambda: budget.shared, "the budget shared")
    return Session, budget


def counted_by_the_fleet(budget: RetryBudget, first_attempts: int) -> None:
    """Send ``budget``'s first attempts to Redis now (what the link's thread does about once a
    second) and wait until the fleet's figures count ``first_attempts``."""
    link = budget._fleet
    assert link is not None
    link._flush_budgets()
    wait_for(
        lambda: (budget.describe().get("fleet") or {}).get("first_attempts") == first_attempts,
        f"the fleet to count the {first_attempts} first attempts",
    )


def unavailable(session: Session) -> None:
    session.execute(sa.text("SELECT raise_code('57P03')"))


def test_spent_budget_gives_up_at_once_with_the_original_error(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    Session = rdb.ResilientSession(engine, service="budget", config=budget_config())
    caplog.set_level(logging.INFO, logger="resilient_db")
    seen: list[rdb.SelfHealEvent] = []
    rdb.add_hook(seen.append)
    try:
        for _ in range(3):
            with pytest.raises(sa.exc.OperationalError) as info:
                Session.run(unavailable)
            assert info.value.orig.sqlstate == "57P03"  # type: ignore[union-attr]
    finally:
        rdb.remove_hook(seen.append)
    # the line is rate-limited, not the action: hooks (OpenTelemetry) see every give-up
    names = [e.name for e in seen if e.name in ("gave_up", "budget_exhausted")]
    assert names == ["budget_exhausted", "gave_up"] * 3
    entry = rdb.health()["services"]["budget"]
    assert entry["counters"]["retries"] == 0
    assert entry["counters"]["gave_up"] == 3
    assert entry["budget"]["exhausted"] == 3
    assert entry["budget"]["scope"] == "process"
    lines = [r.getMessage() for r in caplog.records if "Retry budget exhausted" in r.getMessage()]
    assert len(lines) == 1  # rate-limited: one line for the three units
    assert lines[0].startswith("[SELF-HEAL] Retry budget exhausted: service=budget")
    assert not [r for r in caplog.records if "Gave up" in r.getMessage()]


def test_a_unit_that_retried_before_the_budget_ran_out_says_it_gave_up(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Its "Retry attempt" line was logged: its "Gave up" line is too (the budget's line is
    rate-limited and folds only the units that never retried). A ratio of 1.0: the unit's one
    first attempt pays for one retry, then the budget is spent."""
    Session = rdb.ResilientSession(
        engine, service="budget-retried", config=budget_config(retry_budget=1.0)
    )
    caplog.set_level(logging.INFO, logger="resilient_db")
    with pytest.raises(sa.exc.OperationalError):
        Session.run(unavailable)
    said = [r.getMessage() for r in caplog.records]
    assert sum("Retry attempt 1/5" in line for line in said) == 1
    (gave_up,) = [line for line in said if "Gave up" in line]
    assert "after 1 retry (" in gave_up
    assert sum("Retry budget exhausted" in line for line in said) == 1


@contextlib.contextmanager
def lines_of_the_library() -> Iterator[list[str]]:
    """The messages resilient_db's loggers write inside the block, from INFO up."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("resilient_db")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_the_budgets_line_says_when_the_last_one_was() -> None:
    """The units one line folds may be an earlier outage's: the line says how long ago the
    last line was."""
    now = [100.0]
    budget = RetryBudget("ago", rdb.Config(retry_budget=0.1), clock=lambda: now[0])
    with lines_of_the_library() as lines:
        for at in (100.0, 101.0, 102.0, 130.0):
            now[0] = at
            budget.spent()
    assert len(lines) == 2
    assert lines[0].endswith("instead of retrying")  # the first folds none: nothing said of it
    assert lines[1].endswith("(2 more since the last line, the last line 30 s ago)")


def test_conflicts_are_not_charged_to_the_budget(engine: sa.Engine) -> None:
    Session = rdb.ResilientSession(engine, service="conflicts", config=budget_config())
    tries = []

    def conflict_once(session: Session) -> int:
        tries.append(1)
        if len(tries) == 1:
            session.execute(sa.text("SELECT raise_code('40001')"))
        return len(tries)

    assert Session.run(conflict_once) == 2
    assert rdb.health()["services"]["conflicts"]["budget"]["exhausted"] == 0


def test_budget_pays_for_retries_while_it_lasts(engine: sa.Engine) -> None:
    # floor 2/s and no ratio: the first unit gets two retries, then the budget is spent
    Session = rdb.ResilientSession(
        engine, service="floor", config=budget_config(retry_budget_floor=2)
    )
    with pytest.raises(sa.exc.OperationalError):
        Session.run(unavailable)
    entry = rdb.health()["services"]["floor"]
    assert entry["counters"]["retries"] == 2
    assert entry["budget"]["granted"] == 2
    assert entry["budget"]["exhausted"] == 1
    assert entry["budget"]["retries"] == 2  # recent retries, the floor's included


def test_recent_retries_count_what_the_floor_paid_and_not_what_was_given_back() -> None:
    budget = LocalBudget(ratio=0.5, floor=2, now=100.0)
    budget.observe(2, 100.0)
    paid = [budget.try_withdraw(100.0) for _ in range(3)]
    assert paid == ["ratio", "floor", "floor"]
    assert budget.retries(100.0) == 3
    budget.refund("floor", 100.0, 100.2)  # its attempt never ran
    assert budget.retries(100.2) == 2
    budget.record("floor", 100.4)  # one the fleet granted this process
    assert budget.retries(100.4) == 3
    assert budget.retries(100.0 + WINDOW + 1) == 0  # past the window


@pytest.mark.parametrize("floor", [1, 2])
def test_a_floor_retry_the_fleet_granted_leaves_this_process_bucket_one_less(floor: int) -> None:
    """A fallback to this process's own budget (Redis gone) starts warm: each floor-paid retry
    the fleet granted here is out of the local bucket too, which never goes below empty."""
    budget = LocalBudget(ratio=0.0, floor=floor, now=100.0)
    budget.record("floor", 100.0)
    assert budget.floor_tokens(100.0) == floor - 1
    budget.record("floor", 100.0)
    assert budget.floor_tokens(100.0) == max(0, floor - 2)
    assert budget.try_withdraw(100.0) is None


def test_available_adds_the_whole_retries_of_the_ratio_and_of_the_floor() -> None:
    budget = LocalBudget(ratio=0.5, floor=2, now=100.0)
    budget.observe(5, 100.0)  # 2.5 retries of the ratio: 2 whole ones, and 2 of the floor
    assert budget.available(100.0) == 4.0
    paid = [budget.try_withdraw(100.0) for _ in range(5)]
    assert paid == ["ratio", "ratio", "floor", "floor", None]


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_the_budgets_line_comes_once_in_ten_seconds_and_names_the_ratio(ratio: float) -> None:
    now = [100.0]
    config = rdb.Config(retry_budget=ratio, retry_budget_floor=3)
    budget = RetryBudget("period", config, clock=lambda: now[0])
    with lines_of_the_library() as lines:
        for at in (100.0, 109.9, 110.0):
            now[0] = at
            budget.spent()
    assert len(lines) == 2  # at 100 and at 110: the one of 109.9 folded into the second
    assert (
        f"Retry budget exhausted: service=period retries may add {ratio:g} of recent first "
        "attempts (in this process) plus 3/s;"
    ) in lines[0]
    assert lines[1].endswith("(1 more since the last line, the last line 10 s ago)")
    assert budget.describe()["exhausted"] == 3


def test_a_retry_given_back_is_no_longer_granted_and_the_others_stay() -> None:
    budget = RetryBudget(
        "granted", rdb.Config(retry_budget=0.0, retry_budget_floor=3), clock=lambda: 100.0
    )
    first, second = budget.withdraw(), budget.withdraw()
    assert first is not None
    assert second is not None
    budget.refund(first)
    assert budget.describe()["granted"] == 1
    assert budget.withdraw() is not None
    assert budget.withdraw() is not None  # the one given back: the floor held three
    assert budget.withdraw() is None


@pytest.mark.parametrize("shared", [False, True])
def test_available_is_the_whole_retries_the_budget_would_pay_for(
    shared: bool, engine: sa.Engine, redis_server: RedisServer
) -> None:
    """A ratio of 0.5 over 3 first attempts pays for one retry, not 1.5: ``available`` (and
    the Prometheus gauge read from it, "retries the budget would pay for now") said 1.5, then
    0.5 while every failing unit gave up at once, the budget spent."""
    pytest.importorskip("prometheus_client")
    Session, budget = budget_session(engine, redis_server if shared else None, "whole")
    for _ in range(3):
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    if shared:
        counted_by_the_fleet(budget, 3)
    assert rdb.health()["services"]["whole"]["budget"]["available"] == 1
    assert budget.withdraw() is not None
    entry = rdb.health()["services"]["whole"]["budget"]
    assert entry["available"] == 0
    assert entry["scope"] == ("fleet" if shared else "process")
    gauge = {
        s.labels.get("service"): s.value
        for family in HealthCollector().collect()
        for s in family.samples
        if s.name == "resilient_db_retry_budget_available"
    }
    assert gauge["whole"] == 0.0
    assert budget.withdraw() is None  # (what it said: nothing left)


def test_metrics_show_the_budget(engine: sa.Engine) -> None:
    pytest.importorskip("prometheus_client")
    Session = rdb.ResilientSession(engine, service="metered", config=budget_config())
    with pytest.raises(sa.exc.OperationalError):
        Session.run(unavailable)
    samples = {
        (s.name, s.labels.get("service")): s.value
        for family in HealthCollector().collect()
        for s in family.samples
    }
    assert samples[("resilient_db_retry_budget_exhausted_total", "metered")] == 1.0
    assert samples[("resilient_db_retry_budget_shared", "metered")] == 0.0
    assert ("resilient_db_retry_budget_available", "metered") in samples


def test_async_units_give_up_at_once_too(pg_async_url: str, engine: sa.Engine) -> None:
    async def main() -> None:
        aengine = create_async_engine(pg_async_url)
        Session = rdb.AsyncResilientSession(aengine, service="abudget", config=budget_config())

        async def unit(session: Any) -> None:
            await session.execute(sa.text("SELECT raise_code('57P03')"))

        try:
            for _ in range(2):
                with pytest.raises(sa.exc.DBAPIError) as info:
                    await Session.run(unit)
                assert info.value.orig.sqlstate == "57P03"  # type: ignore[union-attr]
        finally:
            await aengine.dispose()

    asyncio.run(main())
    entry = rdb.health()["services"]["abudget"]
    assert entry["counters"]["retries"] == 0
    assert entry["budget"]["exhausted"] == 2


# -- every retry charged once, every unit one first attempt ---------------------------------------
def _killed_once(tries: list[int]) -> Any:
    """A unit whose first try loses its connection (its backend terminated): one retry."""

    def unit(session: Session) -> int:
        tries.append(1)
        if len(tries) == 1:
            session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    return unit


def _run_path(
    path: str, urls: tuple[str, str], proxy: FaultProxy, database: str, config: rdb.Config
) -> int:
    """Run one unit (or a drop-in session's connect) of ``path`` whose first try fails once,
    retried; returns the first attempts the service made. ``urls``: the database's, sync and
    async."""
    url, async_url = urls
    service = "charged"
    if path in ("unit", "nested", "operation"):
        engine = sa.create_engine(url)
        Session = rdb.ResilientSession(engine, service=service, config=config)
        tries: list[int] = []
        if path == "unit":
            Session.run(_killed_once(tries))
        elif path == "nested":  # run once inside the outer unit, which replays
            Session.run(lambda _: Session.run(_killed_once(tries)))
        else:

            def operation() -> int:
                with Session.begin() as session:
                    return int(_killed_once(tries)(session))

            rdb.with_self_healing(operation, service=service, config=config)
        engine.dispose()
        return 1
    if path == "async unit":

        async def main() -> None:
            aengine = create_async_engine(async_url)
            ASession = rdb.AsyncResilientSession(aengine, service=service, config=config)
            tries: list[int] = []

            async def unit(session: Any) -> None:
                tries.append(1)
                if len(tries) == 1:
                    await session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))

            try:
                await ASession.run(unit)
            finally:
                await aengine.dispose()

        asyncio.run(main())
        return 1
    engine = sa.create_engine(proxy.url(database))
    Session = rdb.ResilientSession(engine, service=service, config=config)
    try:
        if path == "drop-in connect":  # refused once, then the proxy lets it through
            proxy.refuse()

            def let_through(event: rdb.SelfHealEvent) -> None:
                if event.name == "retry":  # (its attempt about to start)
                    proxy.restore()

            rdb.add_hook(let_through)
            try:
                with Session() as session:
                    session.execute(sa.text("SELECT 1"))
            finally:
                rdb.remove_hook(let_through)
            return 1
        # a COMMIT that never reaches the server, its connection reset: verified not
        # committed, and the unit replayed
        rdb.install_commit_markers(engine)
        Session.run(lambda s: s.execute(sa.text("CREATE TABLE IF NOT EXISTS once (n int)")))
        proxy.swallow_commit()
        released = held_and_released(proxy)
        Session.run(lambda s: s.execute(sa.text("INSERT INTO once VALUES (1)")))
        released.join(15)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM once")).scalar_one() == 1
        return 2  # (the table's unit, the insert's)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("path", "shared"),
    [
        ("unit", False),
        ("unit", True),
        ("async unit", False),
        ("async unit", True),
        ("operation", False),
        ("nested", False),
        ("drop-in connect", False),
        ("lost commit", False),
    ],
)
def test_every_retry_is_charged_once_and_every_unit_is_one_first_attempt(
    *,
    path: str,
    shared: bool,
    pg_server: PostgresServer,
    pg_database: str,
    pg_async_url: str,
    redis_server: RedisServer,
) -> None:
    """Whatever retries it (a unit, sync or async, an operation, a unit run once inside
    another, a drop-in session's connect, a unit replayed once its lost COMMIT is verified
    not committed), a retry that ran is paid once by the budget, in this process and in the
    fleet's count, and the unit is one first attempt, not one per try."""
    config = budget_config(
        retry_budget=1.0,
        **({"redis_url": redis_server.url, "redis_timeout": 5.0} if shared else {}),
    )
    early = sa.create_engine(pg_server.url(pg_database))
    if shared:  # on the fleet's budget before the unit (not deciding alone meanwhile)
        rdb.ResilientSession(early, service="charged", config=config)
        wait_for(lambda: budgets()["charged"].shared, "the budget shared")
    with FaultProxy(pg_server) as proxy:
        urls = (pg_server.url(pg_database), pg_async_url)
        made = _run_path(path, urls, proxy, pg_database, config)
    early.dispose()
    entry = rdb.health()["services"]["charged"]
    counters, budget = entry["counters"], entry["budget"]
    assert budget is not None
    assert "available" in budget
    assert counters["attempts"] - counters["retries"] == made
    assert counters["retries"] == counters["retries_by_class"]["disconnect"] == 1
    assert (budget["granted"], budget["retries"], budget["first_attempts"]) == (1, 1, made)
    assert budget["scope"] == ("fleet" if shared else "process")
    if shared:
        fields = redis_server.client().hgetall("resilient_db:{charged}:budget")
        assert sum(int(v) for k, v in fields.items() if k.startswith(b"w")) == 1


@pytest.mark.parametrize("shared", [False, True])
def test_threads_spending_the_last_retries_at_once_never_overspend(
    shared: bool, engine: sa.Engine, redis_server: RedisServer
) -> None:
    """24 threads ask a budget holding 0.5 x 10 first attempts and a floor of 2 for a retry at
    the same moment: 5 paid by the ratio, 2 (3 if the floor refilled meanwhile) by the floor,
    the rest refused, in this process (one lock) and through Redis (one script)."""
    Session, budget = budget_session(
        engine, redis_server if shared else None, "lasttokens", retry_budget_floor=2
    )
    for _ in range(10):
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    if shared:  # the first attempts in Redis first: else the scripts of the threads that ran
        # before the one carrying them found none to pay the ratio with
        counted_by_the_fleet(budget, 10)
    threads = 24
    together = threading.Barrier(threads)
    paid: list[str | None] = []

    def spend() -> None:
        together.wait(10)
        withdrawal = budget.withdraw()
        paid.append(None if withdrawal is None else withdrawal.paid_by)

    spenders = [threading.Thread(target=spend) for _ in range(threads)]
    for spender in spenders:
        spender.start()
    for spender in spenders:
        spender.join(30)
    assert len(paid) == threads
    assert paid.count("ratio") == 5
    assert paid.count("floor") in (2, 3)
    assert budget.shared is shared  # (decided where it was meant to be)


@pytest.mark.slow
def test_full_outage_in_one_process_stays_within_the_budget(engine: sa.Engine) -> None:
    ratio, floor, units, threads = 0.2, 2, 20, 8
    config = budget_config(retry_budget=ratio, retry_budget_floor=floor)
    Session = rdb.ResilientSession(engine, service="outage", config=config)

    def work() -> None:
        for _ in range(units):
            with pytest.raises(sa.exc.OperationalError):
                Session.run(unavailable)

    started = time.monotonic()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    elapsed = time.monotonic() - started
    counters = rdb.health()["services"]["outage"]["counters"]
    first = counters["attempts"] - counters["retries"]
    assert first == units * threads
    # without a budget: 5 retries per unit, 800; with it: 0.2 x 160 plus the floor
    assert 0 < counters["retries"] <= ratio * first + floor * (1 + elapsed)
    assert counters["gave_up"] == units * threads


@pytest.mark.slow
def test_full_outage_across_processes_stays_within_the_fleet_budget(
    redis_server: RedisServer, pg_url: str, tmp_path: Path
) -> None:
    gate = Gate(pg_url)
    ratio, floor, units = 0.2, 2, 30
    settings = {
        "SELF_HEALING_REDIS_URL": redis_server.url,
        # a slow answer on this loaded machine must not send a process to its local budget
        # (the graceful fallback, tested below), which would add its own floor
        "SELF_HEALING_REDIS_TIMEOUT": "2000",
        "SELF_HEALING_CIRCUIT_BREAKER": "false",  # the budget alone limits the retries
        "SELF_HEALING_MAX_RETRIES": "5",
        "SELF_HEALING_INITIAL_DELAY": "1",
        "SELF_HEALING_RETRY_BUDGET": str(ratio),
        "SELF_HEALING_RETRY_BUDGET_FLOOR": str(floor),
    }
    try:
        with fleet(3, pg_url, settings, tmp_path) as workers:
            for _ in range(500):  # every process on the fleet's budget before the outage: one
                # still connecting to Redis would decide alone, with a floor of its own
                scopes = [w.ask("health")["services"]["fleet"]["budget"] for w in workers]
                if all(b is not None and b["scope"] == "fleet" for b in scopes):
                    break
                time.sleep(0.01)
            assert all(b is not None and b["scope"] == "fleet" for b in scopes), scopes
            gate.set(down=True)
            started = time.monotonic()
            for w in workers:
                assert w.ask("start", n=units) == {"started": units}
            for _ in range(6000):
                progress = [w.ask("progress") for w in workers]
                if sum(p["done"] for p in progress) == 3 * units:
                    break
                time.sleep(0.01)
            elapsed = time.monotonic() - started
            assert all(p["errors"] == {"57P03": units} for p in progress), progress
            healths = [w.ask("health")["services"]["fleet"] for w in workers]
            logs = [w.self_heal_lines("Retry budget exhausted") for w in workers]
        first = sum(h["counters"]["attempts"] - h["counters"]["retries"] for h in healths)
        retries = sum(h["counters"]["retries"] for h in healths)
        assert first == 3 * units
        # one budget for the fleet: 0.2 x 90 first attempts plus one floor, not three
        budgets = json.dumps([h["budget"] for h in healths])
        assert 0 < retries <= ratio * first + floor * (1 + elapsed), (retries, elapsed, budgets)
        assert gate.calls() == first + retries
        assert all(h["budget"]["scope"] == "fleet" for h in healths)
        assert sum(h["budget"]["exhausted"] for h in healths) > 0
        for lines in logs:  # at most one line per process per 10 s
            assert len(lines) <= 1 + elapsed / 10
    finally:
        gate.close()


# -- Redis slow or flushed -----------------------------------------------------------------------
def shared_config(redis: RedisServer, **changes: Any) -> rdb.Config:
    base: dict[str, Any] = {
        "redis_url": redis.url,
        "retry": False,
        "failure_threshold": 2,
        "reset_timeout": 60.0,
    }
    base.update(changes)
    return rdb.Config(**base)


def test_first_attempts_go_to_the_fleet_in_whole_numbers_the_fractions_carried_over(
    engine: sa.Engine,
) -> None:
    """The fleet's count holds whole first attempts: those seen spread over seconds go in
    whole numbers, the fractions added up from the oldest second and what is left (less than
    one first attempt) carried to the next call, not lost."""
    now = [100.5]
    budget = RetryBudget("wholes", rdb.Config(retry_budget=1.0), clock=lambda: now[0])
    Session = rdb.ResilientSession(
        engine, service="wholes", config=budget_config(retry_budget=None)
    )

    def units(n: int, at: float) -> None:
        for _ in range(n):
            Session.run(lambda s: s.execute(sa.text("SELECT 1")))
        now[0] = at

    units(2, 102.5)  # 0.5 in second 100, 1 in 101, 0.5 in 102
    assert budget.take_pending() == [(1, 1), (0, 1)]
    units(1, 118.5)  # 1/16 a second: only 19/32 of it in the window
    assert budget.take_pending() == []
    units(1, 120.5)  # 1/4 in second 118, 1/2 in 119, 1/4 in 120: with the 19/32, one whole
    assert budget.take_pending() == [(1, 1)]


def test_a_budget_that_moves_to_another_redis_leaves_the_first_ones_link(
    engine: sa.Engine,
) -> None:
    """A later factory's config= of the service names another Redis: the budget follows it and
    leaves the first link, closed with nothing else attached (else that link's thread would
    go on taking the budget's first attempts for the Redis no factory asks for)."""
    urls = [f"redis://127.0.0.1:{free_port()}/0" for _ in range(2)]
    rdb.ResilientSession(
        engine, service="moved", config=budget_config(retry_budget=1.0, redis_url=urls[0])
    )
    budget = budgets()["moved"]
    first = budget._fleet
    assert first is not None
    rdb.ResilientSession(
        engine, service="moved", config=budget_config(retry_budget=1.0, redis_url=urls[1])
    )
    assert budget._fleet is not None
    assert budget._fleet.url == urls[1]
    assert budget.describe()["redis"] == urls[1]
    assert "moved" not in first.budgets
    assert first.closed


def test_ratio_retries_paid_alone_wait_for_the_fleet_unless_given_back(engine: sa.Engine) -> None:
    """A budget meant to be shared whose Redis does not answer decides alone: the retries its
    ratio paid for wait, by second, to be added to the fleet's count when Redis answers again
    (else the fleet would pay the ratio of their first attempts a second time); one given back
    before that is not sent, and those the floor paid are not the ratio's."""
    now = [100.0]
    config = rdb.Config(
        retry_budget=1.0,
        retry_budget_floor=1,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        redis_timeout=0.5,
    )
    budget = RetryBudget("alone", config, clock=lambda: now[0])
    Session = rdb.ResilientSession(engine, service="alone", config=budget_config(retry_budget=None))
    for _ in range(2):  # two first attempts: the ratio pays for two retries
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    now[0] = 100.2
    paid = [budget.withdraw() for _ in range(3)]
    assert [(w.paid_by, w.fleet) for w in paid if w is not None] == [
        ("ratio", None),
        ("ratio", None),
        ("floor", None),
    ]
    budget.refund(paid[2])  # the floor's: the fleet counts no ratio-paid retry less
    assert budget.alone_pending
    assert budget.take_alone() == [(0, 2)]
    assert not budget.alone_pending
    for withdrawal in paid[:2]:  # sent already: nothing left here to take back
        budget.refund(withdrawal)
    now[0] = 101.0
    single = budget.withdraw()
    assert single is not None
    assert single.paid_by == "ratio"
    assert budget.alone_pending
    budget.refund(single)  # never sent: not sent now
    assert not budget.alone_pending
    assert budget.take_alone() == []
    now[0] = 102.5
    assert budget.withdraw() is not None
    now[0] = 104.7
    assert budget.take_alone() == [(2, 1)]


def test_health_shows_the_fleets_figures_of_the_script_redis_ran_last(
    redis_server: RedisServer,
) -> None:
    """Two threads' scripts sent together: the answer taken last may be of the script Redis
    ran first. health() keeps the figures of the one Redis ran last, and those of a script
    sent after the shown ones were taken whatever Redis's clock says (set back meanwhile)."""
    now = [100.0]
    config = rdb.Config(retry_budget=1.0, redis_url=redis_server.url, redis_timeout=5.0)
    budget = RetryBudget("figures", config, clock=lambda: now[0])
    wait_for(lambda: budget.shared, "the budget shared")

    def figures(first_attempts: int) -> FleetBudgetHealth:
        return {
            "first_attempts": first_attempts,
            "retries": 0,
            "floor_tokens": 0.0,
            "available": float(first_attempts),
        }

    def shown() -> int:
        return budget.describe()["fleet"]["first_attempts"]

    budget.fleet_figures(figures(1), sent=99.0, ran=50.0)
    assert shown() == 1
    budget.fleet_figures(figures(2), sent=99.5, ran=49.0)  # sent before, and ran before
    assert shown() == 1
    budget.fleet_figures(figures(3), sent=99.8, ran=51.0)  # sent before, but ran after
    assert shown() == 3
    now[0] = 101.0
    budget.fleet_figures(figures(4), sent=100.5, ran=40.0)  # sent after they were taken
    assert shown() == 4


def wait_connected(service: str, connected: bool = True) -> None:
    for _ in range(2000):
        breaker = rdb.health()["services"][service]["breaker"]
        if breaker["shared"]["connected"] is connected:
            return
        time.sleep(0.005)
    raise AssertionError(f"breaker of {service} never became connected={connected}")


@pytest.mark.slow
def test_paused_redis_never_holds_a_unit_past_the_timeout_then_rejoins(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_db")
    with RedisServer(password="pw-not-logged") as redis:
        Session = rdb.ResilientSession(engine, service="paused", config=shared_config(redis))
        wait_connected("paused")
        redis.pause()  # Redis hangs: connections open, nothing answered
        try:
            # the failure path asks Redis, which times out: the unit still gets its own error
            with pytest.raises(sa.exc.OperationalError) as info:
                Session.run(unavailable)
            assert info.value.orig.sqlstate == "57P03"  # type: ignore[union-attr]
            wait_connected("paused", False)
            # local breaker from here: the second failure opens it in this process
            with pytest.raises(sa.exc.OperationalError):
                Session.run(unavailable)
            with pytest.raises(rdb.CircuitOpenError):
                Session.run(unavailable)
        finally:
            redis.resume()
        wait_connected("paused")
        # back: the opening this process made on its own while Redis hung is not thrown away
        # (the database it failed on may be down still): Redis, whose breaker never opened,
        # takes it, and the fleet follows it
        with pytest.raises(rdb.CircuitOpenError):
            Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
        assert rdb.health()["services"]["paused"]["breaker"]["shared"]["opened_here"] == 1
        # (read before Redis stops: that is a new outage, whose warning comes at once)
        messages = [r.getMessage() for r in caplog.records]
    down = [m for m in messages if "Shared state unavailable" in m]
    assert len(down) == 1
    assert "redis://***@127.0.0.1" in down[0]
    assert any("Shared state restored" in m for m in messages)
    assert not any("pw-not-logged" in m for m in messages)


def test_a_late_message_of_an_opening_does_not_keep_the_circuit_open_longer(
    engine: sa.Engine, redis_server: RedisServer
) -> None:
    """The pub/sub message of an opening carries the time left when it was sent; delivered
    late (a busy machine), it must not push the local view's end of the open period past the
    shared one."""
    reset = 0.3
    Session = rdb.ResilientSession(
        engine, service="late", config=shared_config(redis_server, reset_timeout=reset)
    )
    wait_connected("late")
    breaker = Session.policy.breaker
    assert breaker is not None
    breaker.open()
    opened = time.monotonic()
    time.sleep(reset / 2)
    # that opening's message, as the subscriber thread would hand it over late
    breaker.fleet_update("open", reset, breaker._fleet_gen, breaker._fleet_opens)
    time.sleep(max(0.0, opened + reset + 0.02 - time.monotonic()))
    assert Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert breaker.state == "closed"


def test_flushed_redis_gets_the_opening_back_and_starts_an_empty_budget(
    engine: sa.Engine, redis_server: RedisServer
) -> None:
    """Flushed while the breaker is open: the opening ends when it would have (the view
    rejects until then) and the next unit is a half-open probe (this process writes the
    half-open state back into the empty Redis), whose success closes it. The fleet's budget
    starts over: no first attempts in its window, its floor full (one second's worth)."""
    reset = 0.3
    config = shared_config(
        redis_server,
        retry=True,
        max_retries=2,
        retry_budget=0.0,
        retry_budget_floor=1,
        reset_timeout=reset,
        failure_threshold=3,  # the budget, not the breaker, ends the last unit's retries
    )
    Session = rdb.ResilientSession(engine, service="flushed", config=config)
    wait_connected("flushed")
    breaker = Session.policy.breaker
    assert breaker is not None
    breaker.open()
    with pytest.raises(rdb.CircuitOpenError):
        Session.run(unavailable)
    redis_server.flushall()
    # the view says open until its time is up (the breaker's open period, not a backoff);
    # then its unit asks Redis for a probe: the half-open state is written back, the probe
    # given, and its success closes the breaker
    time.sleep(reset)
    assert Session.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert breaker.state == "closed"
    assert redis_server.client().hget("resilient_db:{flushed}:breaker", "st") == b"closed"
    # the budget starts again from nothing but its floor: one retry, then spent
    with pytest.raises(sa.exc.OperationalError):
        Session.run(unavailable)
    entry = rdb.health()["services"]["flushed"]
    assert entry["counters"]["retries"] == 1
    assert entry["budget"]["scope"] == "fleet"
    assert entry["budget"]["exhausted"] == 1


def test_a_reload_that_removes_the_budget_takes_it_out_of_health_and_the_metrics(
    engine: sa.Engine, clean_env: pytest.MonkeyPatch
) -> None:
    """A reload unsetting SELF_HEALING_RETRY_BUDGET left the budget in health() and Prometheus,
    its figures frozen (available 0: a spent budget, for an alert, where none is in use any
    more). Set again, the service has a budget again, from zero."""
    pytest.importorskip("prometheus_client")
    clean_env.setenv("SELF_HEALING_RETRY_BUDGET", "0")
    clean_env.setenv("SELF_HEALING_RETRY_BUDGET_FLOOR", "0")
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
    rdb.reload_config()
    Session = rdb.ResilientSession(engine, service="unbudgeted")
    with pytest.raises(sa.exc.OperationalError):
        Session.run(unavailable)
    assert rdb.health()["services"]["unbudgeted"]["budget"]["exhausted"] == 1

    clean_env.delenv("SELF_HEALING_RETRY_BUDGET")
    rdb.reload_config()
    assert rdb.health()["services"]["unbudgeted"]["budget"] is None
    names = {
        (s.name, s.labels.get("service"))
        for family in HealthCollector().collect()
        for s in family.samples
    }
    assert ("resilient_db_retry_budget_available", "unbudgeted") not in names

    clean_env.setenv("SELF_HEALING_RETRY_BUDGET", "0.5")
    rdb.reload_config()
    assert rdb.health()["services"]["unbudgeted"]["budget"]["exhausted"] == 0
    assert Session.policy.budget is not None


def test_a_reload_changing_the_ratio_pays_the_new_ratio_of_the_recent_first_attempts(
    engine: sa.Engine, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("SELF_HEALING_RETRY_BUDGET", "1")
    clean_env.setenv("SELF_HEALING_RETRY_BUDGET_FLOOR", "0")
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
    rdb.reload_config()
    Session = rdb.ResilientSession(engine, service="reratioed")
    for _ in range(4):
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))

    def figures() -> tuple[object, ...]:
        entry = rdb.health()["services"]["reratioed"]["budget"]
        return (
            entry["ratio"],
            entry["floor_per_second"],
            entry["window_seconds"],
            entry["available"],
        )

    assert figures() == (1.0, 0, WINDOW, 4)
    clean_env.setenv("SELF_HEALING_RETRY_BUDGET", "0.5")
    rdb.reload_config()
    assert figures() == (0.5, 0, WINDOW, 2)
    clean_env.setenv("SELF_HEALING_RETRY_BUDGET", "0")
    rdb.reload_config()
    assert figures() == (0.0, 0, WINDOW, 0)
    with pytest.raises(sa.exc.OperationalError):
        Session.run(unavailable)
    assert Session.policy.budget is not None
    assert Session.policy.budget.describe()["exhausted"] == 1


def test_a_budget_made_after_units_retried_counts_only_the_first_attempts_made_since(
    engine: sa.Engine,
) -> None:
    """The budget of a service whose units already ran (one switched on by a reload) counts
    the first attempts made from then on: its units' earlier retries are not first attempts
    still to come."""
    Session = rdb.ResilientSession(
        engine, service="later", config=budget_config(retry_budget=None, max_retries=2)
    )
    with pytest.raises(sa.exc.OperationalError):
        Session.run(unavailable)  # one first attempt and two retries, before any budget
    budget = RetryBudget("later", rdb.Config(retry_budget=1.0), clock=lambda: 100.0)
    for _ in range(2):
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    assert budget.describe()["first_attempts"] == 2


def test_a_reload_that_keeps_a_budget_keeps_those_of_services_whose_factories_are_gone(
    engine: sa.Engine, clean_env: pytest.MonkeyPatch
) -> None:
    """Only a reload that sets no budget forgets the unused ones: with a budget set, that of a
    service whose factories are gone is kept, its recent figures with it, for the service's
    next factory."""
    clean_env.setenv("SELF_HEALING_RETRY_BUDGET", "0.5")
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
    rdb.reload_config()

    def one_unit() -> None:
        Session = rdb.ResilientSession(engine, service="factoryless")
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))

    one_unit()
    gc.collect()
    budget = budgets()["factoryless"]
    rdb.reload_config()
    assert budgets().get("factoryless") is budget
    assert budget.describe()["first_attempts"] == 1


def test_a_budget_asked_for_in_code_while_a_reload_removes_the_environments_stays(
    engine: sa.Engine, clean_env: pytest.MonkeyPatch
) -> None:
    """Reloads that leave the environment without a budget forget the budgets no live user
    has any more; a factory given a ``config=`` with a budget, made in another thread while
    they ran (its budget made, its factory not yet registered when a reload looked at the
    users), lost its budget from ``health()`` while its units drew on it, and the service's
    next factory made a second one. Every factory made so keeps the service's one budget."""
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
    rdb.reload_config()
    config = rdb.Config(retry_budget=0.3, circuit_breaker=False)
    made: list[Any] = []
    stop = threading.Event()

    def reload_in_a_loop() -> None:
        for _ in range(2_000):  # bounded: ends by itself
            if stop.is_set():
                return
            rdb.reload_config()

    reloader = threading.Thread(target=reload_in_a_loop, daemon=True)
    reloader.start()
    try:
        for n in range(300):
            made.append(rdb.ResilientSession(engine, service=f"inreload-{n}", config=config))
    finally:
        stop.set()
        reloader.join(60)
    assert not reloader.is_alive()
    rdb.reload_config()
    services = rdb.health()["services"]
    lost = [f.policy.service for f in made if services[f.policy.service]["budget"] is None]
    assert lost == []
    twin = rdb.ResilientSession(engine, service=made[0].policy.service, config=config)
    assert twin.policy.budget is made[0].policy.budget  # the service's one budget


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_spend_the_ratio_of_its_parents_first_attempts(
    engine: sa.Engine,
) -> None:
    """A child forked from a process that made units (a preloaded app, a worker forking on its
    own) is a new process: its budget counts its own first attempts from the fork on, not its
    parent's, which the parent's budget pays the ratio of. Kept, every child forked could
    spend the ratio of the parent's recent first attempts once more, on its own."""
    config = budget_config(retry_budget=0.5)
    Session = rdb.ResilientSession(engine, service="forkedlocal", config=config)
    for _ in range(20):
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    # the parent's budget: 0.5 x 20 first attempts
    assert rdb.health()["services"]["forkedlocal"]["budget"]["first_attempts"] == 20

    def child() -> bool:
        engine.dispose(close=False)  # the parent's connections are the parent's
        before = rdb.health()["services"]["forkedlocal"]
        with contextlib.suppress(sa.exc.OperationalError):
            Session.run(unavailable)  # its one first attempt pays for no retry (0.5 x 1)
        after = rdb.health()["services"]["forkedlocal"]
        return bool(
            after["counters"]["retries"] == before["counters"]["retries"]
            and after["budget"]["exhausted"] == before["budget"]["exhausted"] + 1
            and after["budget"]["first_attempts"] == 1
        )

    with forked(child) as proc:
        assert proc.result(timeout=60) is True, "the child spent its parent's budget"
    # the parent's own is as it was
    assert rdb.health()["services"]["forkedlocal"]["budget"]["first_attempts"] == 20
