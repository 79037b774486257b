"""The retry budget shared through a real Redis counts only recent first attempts: those made
while Redis was down, or before the budget was shared, are not recent once they are older than
the window (the window is shortened here so the tests run in seconds)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for

import resilient_db as rdb
from resilient_db import _budget, _fleet
from resilient_db._budget import RetryBudget
from resilient_db._observability import stats_for
from resilient_db.testing import RedisServer

WINDOW = 2  # seconds a first attempt counts as recent, in these tests
#: fails as a server refusing connections does (57P03): retried, and charged to the budget
UNAVAILABLE = sa.text(
    "DO $$ BEGIN RAISE EXCEPTION 'unavailable for this test' USING ERRCODE = '57P03'; END $$"
)


@pytest.fixture
def short_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_budget, "WINDOW", WINDOW)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    e = sa.create_engine(pg_url)
    yield e
    e.dispose()


def _budget_entry(service: str) -> dict[str, Any]:
    entry: dict[str, Any] = rdb.health()["services"][service]["budget"]
    return entry


def _fleet_deposits(redis: RedisServer, service: str) -> float:
    fields = redis.client().hgetall(f"resilient_db:{{{service}}}:budget")
    return sum(float(v) for k, v in fields.items() if k.startswith(b"d"))


@pytest.mark.slow
@pytest.mark.usefixtures("short_window")
def test_first_attempts_made_while_redis_was_down_do_not_inflate_the_fleet_budget(
    redis_server: RedisServer, engine: sa.Engine
) -> None:
    config = rdb.Config(
        redis_url=redis_server.url,
        retry_budget=0.1,
        retry_budget_floor=0,
        circuit_breaker=False,
    )
    Session = rdb.ResilientSession(engine, service="inflate", config=config)
    budget = _budget.budgets()["inflate"]
    wait_for(lambda: _budget_entry("inflate")["scope"] == "fleet", "the budget to be shared")
    redis_server.kill()
    wait_for(lambda: _budget_entry("inflate")["scope"] == "process", "the link to be down")
    for _ in range(200):  # ordinary traffic during the outage
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    time.sleep(WINDOW + 2)  # those units are no longer recent (a condition, not a backoff)
    redis_server.start()
    wait_for(lambda: _budget_entry("inflate")["scope"] == "fleet", "the budget to be shared again")
    link = budget._fleet
    assert link is not None
    link._flush_budgets()  # what the background thread sends on rejoining, done here at once
    assert budget.withdraw() is None  # the fleet counts no recent first attempt
    assert _fleet_deposits(redis_server, "inflate") < 5
    assert _budget_entry("inflate")["fleet"]["first_attempts"] < 5


@pytest.mark.usefixtures("short_window")
def test_first_attempts_older_than_the_window_are_not_sent_to_the_fleet() -> None:
    """A budget that ran on its own for long (then ``reload_config`` shares it): only its
    first attempts of the window go to the fleet, each in its own second."""
    now = [1000.0]
    stats = stats_for("pending")
    budget = RetryBudget("pending", rdb.Config(retry_budget=0.1), clock=lambda: now[0])
    for _ in range(100):
        stats.add_attempt()
    now[0] = 1000.5
    budget.describe()  # an observation: the 100 first attempts of second 1000
    now[0] = 1000.0 + WINDOW + 1
    budget.describe()  # another: nothing new
    now[0] += 0.5
    for _ in range(7):
        stats.add_attempt()
    assert budget.take_pending() == [(0, 7.0)]
    assert budget.take_pending() == []


@pytest.mark.usefixtures("short_window")
def test_first_attempts_go_to_the_fleet_as_whole_numbers() -> None:
    """The fleet's hash holds integers (every release's script adds to it): a share of a
    first attempt left over waits for the next flush instead of being sent as a fraction."""
    now = [1000.0]
    stats = stats_for("whole")
    budget = RetryBudget("whole", rdb.Config(retry_budget=0.1), clock=lambda: now[0])
    for _ in range(7):
        stats.add_attempt()
    now[0] = 1003.3  # 7 over 3.3 s: 2.12 in second 1002, 0.64 in 1003, the rest too old
    assert budget.take_pending() == [(1, 2)]
    for _ in range(3):
        stats.add_attempt()
    now[0] = 1003.8
    assert budget.take_pending() == [(0, 3)]  # 3.64: the 0.64 still waits


@pytest.mark.usefixtures("short_window")
def test_the_local_figures_keep_only_the_window_while_the_fleet_takes_the_first_attempts() -> None:
    """While Redis pays for every retry, the only look at the first attempts is the background
    thread's flush, once a second: the budget's own figures (its fallback) keep the seconds of
    the window, not one more bucket per second of traffic for the life of the process."""
    now = [1000.0]
    stats = stats_for("flushed")
    budget = RetryBudget("flushed", rdb.Config(retry_budget=0.2), clock=lambda: now[0])
    for _ in range(600):  # ten minutes of traffic, flushed once a second
        for _ in range(5):
            stats.add_attempt()
        now[0] += 1.0
        budget.take_pending()
        budget._local.record("ratio", now[0])  # a retry the fleet paid for
    local = budget._local
    for buckets in (local._deposits, local._spent):
        assert 0 < len(buckets) <= WINDOW + 1


@pytest.mark.slow
def test_first_attempts_whose_deposit_redis_ran_late_are_not_sent_again(
    redis_server: RedisServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis hangs while a retry asks the fleet's budget, carrying the first attempts not
    counted yet: the script times out, but Redis runs it when it resumes. Those first attempts
    are not sent again (the fleet would count them twice, and its budget grow by the ratio of
    attempts never made): the fleet counts no more first attempts than were made."""
    monkeypatch.setattr(_fleet, "FLUSH_INTERVAL", 60.0)  # only this test's flush, below
    config = rdb.Config(
        redis_url=redis_server.url,
        retry_budget=0.5,
        retry_budget_floor=0,
        circuit_breaker=False,
        max_retries=1,
        redis_timeout=0.05,
    )
    Session = rdb.ResilientSession(engine, service="late", config=config)
    budget = _budget.budgets()["late"]
    wait_for(lambda: _budget_entry("late")["scope"] == "fleet", "the budget to be shared")
    link = budget._fleet
    assert link is not None
    client = redis_server.client()
    for source in _fleet._SCRIPTS.values():  # loaded, as in a process running a while
        client.script_load(source)
    for _ in range(40):
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    redis_server.pause()
    try:  # its retry asks the fleet's budget, with the 40 first attempts: the script times out
        with rdb.set_testing(), pytest.raises(sa.exc.OperationalError):
            Session.run(lambda s: s.execute(UNAVAILABLE))
        assert _budget_entry("late")["scope"] == "process"
    finally:
        redis_server.resume()
    wait_for(lambda: _budget_entry("late")["scope"] == "fleet", "the budget, shared again", 5)
    link._flush_budgets()  # what the background thread sends about once a second
    counters = rdb.health()["services"]["late"]["counters"]
    made = counters["attempts"] - counters["retries"]
    assert made >= 41
    assert 0 < _fleet_deposits(redis_server, "late") <= made


@pytest.mark.slow
@pytest.mark.usefixtures("no_backoff")
def test_retries_paid_alone_while_redis_was_down_are_charged_to_the_fleet_on_rejoining(
    redis_server: RedisServer, engine: sa.Engine
) -> None:
    """While Redis is down a process pays retries from its own budget, against its own first
    attempts. Those first attempts join the fleet's count when Redis answers again, and so must
    the retries they paid for: else the fleet pays the ratio of them a second time (measured
    before: 3 processes through a Redis outage in a database outage made 1.8 x the ratio's
    retries). Here 10 units fail while Redis is down: 0.5 x 10 first attempts pay for 5
    retries; back on the fleet, nothing is left of the ratio."""
    config = rdb.Config(
        redis_url=redis_server.url,
        retry_budget=0.5,
        retry_budget_floor=0,
        circuit_breaker=False,
        max_retries=10,
    )
    Session = rdb.ResilientSession(engine, service="alone", config=config)
    budget = _budget.budgets()["alone"]
    wait_for(lambda: _budget_entry("alone")["scope"] == "fleet", "the budget to be shared")
    redis_server.kill()
    wait_for(lambda: _budget_entry("alone")["scope"] == "process", "the link to be down")
    for _ in range(10):
        with pytest.raises(sa.exc.OperationalError):
            Session.run(lambda s: s.execute(UNAVAILABLE))
    counters = rdb.health()["services"]["alone"]["counters"]
    assert counters["attempts"] - counters["retries"] == 10
    assert counters["retries"] == 5  # paid by this process's own budget
    redis_server.start()
    wait_for(lambda: _budget_entry("alone")["scope"] == "fleet", "the budget to be shared again")
    link = budget._fleet
    assert link is not None
    link._flush_budgets()  # what the background thread sends on rejoining, done here at once
    # (the background thread may have taken them first, its script's answer still to come)
    wait_for(
        lambda: (
            (fleet := _budget_entry("alone").get("fleet")) is not None
            and (fleet["first_attempts"], fleet["retries"]) == (10, 5)
        ),
        "the fleet to count the 10 first attempts and the 5 retries paid alone",
    )
    assert budget.withdraw() is None  # 0.5 x 10 first attempts, 5 retries spent: nothing left


def test_first_attempts_of_a_budget_script_redis_refused_are_sent_once_it_takes_writes(
    redis_server: RedisServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis becomes a read-only replica (an old master after a Sentinel failover) just before
    a retry asks the fleet's budget, carrying the first attempts not counted yet: Redis refuses
    the script (READONLY), so it surely did not run, and the process decides alone. Those
    first attempts are kept, and the fleet counts them once Redis takes writes again: none is
    lost (nor counted twice)."""
    monkeypatch.setattr(_fleet, "FLUSH_INTERVAL", 60.0)  # only this test's flush, below
    config = rdb.Config(
        redis_url=redis_server.url,
        retry_budget=0.5,
        retry_budget_floor=0,
        circuit_breaker=False,
        max_retries=1,
    )
    Session = rdb.ResilientSession(engine, service="readonly", config=config)
    budget = _budget.budgets()["readonly"]
    wait_for(lambda: _budget_entry("readonly")["scope"] == "fleet", "the budget to be shared")
    link = budget._fleet
    assert link is not None
    for _ in range(30):
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    with RedisServer() as master:  # (read-only at once; it never syncs: no password)
        redis_server.client().execute_command("REPLICAOF", "127.0.0.1", str(master.port))
        with rdb.set_testing(), pytest.raises(sa.exc.OperationalError):
            Session.run(lambda s: s.execute(UNAVAILABLE))  # its retry: refused, decided alone
        assert _budget_entry("readonly")["scope"] == "process"
        redis_server.client().execute_command("REPLICAOF", "NO", "ONE")
    wait_for(lambda: _budget_entry("readonly")["scope"] == "fleet", "the budget, shared again", 5)
    link._flush_budgets()  # what the background thread sends about once a second
    counters = rdb.health()["services"]["readonly"]["counters"]
    made = counters["attempts"] - counters["retries"]
    assert made == 31
    wait_for(
        lambda: _fleet_deposits(redis_server, "readonly") == made,
        "the fleet to count every first attempt once",
    )


@pytest.mark.usefixtures("no_backoff")
@pytest.mark.parametrize("kind", ["d", "w"])
def test_counts_of_seconds_past_redis_time_are_dropped(
    kind: str, redis_server: RedisServer, engine: sa.Engine
) -> None:
    """A Redis whose clock was set back (NTP stepping it, a VM restored, a Sentinel failover
    to a replica whose clock lags) holds counts of seconds past its time now: kept, they stayed
    within the window until its clock reached them again (set back an hour: an hour), first
    attempts ("d") paying for retries, or retries spent ("w") refusing them, all that time.
    They go, as counts Redis lost: the budget starts over. Here 1,000 of the one or the other
    in the second an hour from now, as such a Redis holds them."""
    service = f"clockback-{kind}"
    config = rdb.Config(
        redis_url=redis_server.url,
        redis_timeout=5.0,  # (a slow answer on a loaded machine: decided alone, not this test)
        retry_budget=0.2,
        retry_budget_floor=0,
        circuit_breaker=False,
        max_retries=2,
    )
    Session = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: _budget_entry(service)["scope"] == "fleet", "the budget to be shared")
    client = redis_server.client()
    key = f"resilient_db:{{{service}}}:budget"
    now = int(client.time()[0])
    client.hset(key, f"{kind}{now + 3600}", 1000)
    if kind == "w":  # recent first attempts that pay for the unit's retries
        client.hset(key, f"d{now}", 100)
    with pytest.raises(sa.exc.OperationalError):
        Session.run(lambda s: s.execute(UNAVAILABLE))
    counters = rdb.health()["services"][service]["counters"]
    assert counters["attempts"] - counters["retries"] == 1
    # "d": its one first attempt pays for none (0.2 x 1); "w": 0.2 x 101 pay for both
    assert counters["retries"] == (0 if kind == "d" else 2)
    assert _budget_entry(service)["scope"] == "fleet"  # (decided by the fleet)
    seconds = [int(f[1:]) for f in client.hkeys(key) if f[:1] in (b"d", b"w")]
    assert seconds
    assert max(seconds) <= int(client.time()[0])


def test_health_shows_the_fleets_latest_answer_not_a_concurrent_earlier_one(
    redis_server: RedisServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads spend a retry of the fleet's budget at once: Redis runs one script, then the
    other, but the first one's answer is taken last (its thread was preempted). ``health()``
    (and the Prometheus gauge read from it) showed that earlier answer, one retry fewer spent
    than Redis counts, until the next script's answer: after an outage, for up to the window.
    The figures of the script Redis ran last are kept."""
    monkeypatch.setattr(_fleet, "FLUSH_INTERVAL", 60.0)  # only this test's scripts
    config = rdb.Config(
        redis_url=redis_server.url,
        redis_timeout=5.0,
        retry_budget=1.0,
        retry_budget_floor=0,
        circuit_breaker=False,
    )
    Session = rdb.ResilientSession(engine, service="latest", config=config)
    budget = _budget.budgets()["latest"]
    wait_for(lambda: _budget_entry("latest")["scope"] == "fleet", "the budget to be shared")
    for _ in range(10):
        Session.run(lambda s: s.execute(sa.text("SELECT 1")))
    answered, later_taken = threading.Event(), threading.Event()
    taken = RetryBudget.fleet_figures
    earlier = threading.Thread(target=budget.withdraw)

    def held_back(self: RetryBudget, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is earlier:
            answered.set()  # Redis ran this thread's script first
            assert later_taken.wait(10)
        taken(self, *args, **kwargs)

    monkeypatch.setattr(RetryBudget, "fleet_figures", held_back)
    earlier.start()
    assert answered.wait(10)
    assert budget.withdraw() is not None  # Redis's second script: 2 retries spent of 10
    later_taken.set()
    earlier.join(10)
    assert not earlier.is_alive()
    fleet = _budget_entry("latest")["fleet"]
    assert (fleet["first_attempts"], fleet["retries"]) == (10, 2)
    assert fleet["available"] == 8
