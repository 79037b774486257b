"""Every channel reports what happened, with the same numbers: ``health()``, the Prometheus
collector, the OpenTelemetry hook (the SDK's in-memory reader), the hooks' events and the
dashboard's recorder. Real workloads with known fault counts on a real server, from threads
and from asyncio tasks at once: backends killed under units, a breaker opened by failures and
then rejecting calls, a retry budget spent, a lost COMMIT answer, pool timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from scenarios import otel_points
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.metrics import HealthCollector
from resilient_db.testing import FaultProxy
from resilient_db.web._recorder import Recorder

pytestmark = pytest.mark.usefixtures("no_backoff")

Otel = tuple[Any, InMemorySpanExporter, InMemoryMetricReader]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    found = Recorder()
    rdb.add_hook(found)
    yield found
    rdb.remove_hook(found)


def prometheus(service: str) -> dict[str, float]:
    """The collector's samples of ``service`` (and those without labels), by their series."""
    registry = CollectorRegistry()
    registry.register(HealthCollector())
    found: dict[str, float] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if f'service="{service}"' in series:
            label = f'service="{service}"'
            series = series.replace(f"{label},", "").replace(f",{label}", "").replace(label, "")
            found[series] = float(value)
    return found


def otel_of(reader: InMemoryMetricReader, name: str, service: str) -> dict[tuple[Any, ...], int]:
    return {
        tuple(kv for kv in key if kv[0] != "service"): value
        for key, value in otel_points(reader, name).items()
        if ("service", service) in key
    }


def assert_channels_agree(
    service: str,
    events: list[rdb.SelfHealEvent],
    reader: InMemoryMetricReader,
    recorder: Recorder,
    **expected: int,
) -> None:
    """Each counter of ``service`` is ``expected`` (those not named: 0) in health(), and the
    same in Prometheus, OpenTelemetry, the hooks' events and the dashboard's series."""
    counters = rdb.health()["services"][service]["counters"]
    named = {k: v for k, v in counters.items() if k != "retries_by_class"}
    assert named == {k: expected.get(k, 0) for k in named}, named
    seen = Counter(e.name for e in events if e.service == service)
    # health() and the events
    assert seen["retry"] == counters["retries"]
    assert seen["recovered"] == counters["recovered"]
    assert seen["gave_up"] == counters["gave_up"]
    assert seen["commit_verified"] == counters["verified_commits"]
    assert seen["commit_not_applied"] == counters["verified_not_committed"]
    assert seen["pool_timeout"] == counters["pool_timeouts"]
    opened_here = [e for e in events if e.service == service and e.name == "breaker_opened"]
    assert sum(bool(e.fields["opened_here"]) for e in opened_here) == counters["breaker_opens"]
    rejected = [e for e in events if e.service == service and e.name == "breaker_rejected"]
    assert sum(int(e.fields["rejected"]) for e in rejected) == counters["breaker_rejections"]
    # Prometheus
    samples = prometheus(service)
    for key, metric in (
        ("attempts", "resilient_db_attempts_total"),
        ("recovered", "resilient_db_recovered_total"),
        ("gave_up", "resilient_db_gave_up_total"),
        ("breaker_opens", "resilient_db_breaker_opens_total"),
        ("breaker_rejections", "resilient_db_breaker_rejections_total"),
        ("verified_commits", "resilient_db_commits_verified_total"),
        ("verified_not_committed", "resilient_db_commits_verified_not_committed_total"),
        ("unknown_commits", "resilient_db_commit_outcome_unknown_total"),
        ("pool_timeouts", "resilient_db_pool_timeouts_total"),
    ):
        assert samples[f"{metric}{{}}"] == counters[key], metric
    retries = {
        series: n for series, n in samples.items() if series.startswith("resilient_db_retries")
    }
    assert retries == {
        f'resilient_db_retries_total{{class="{c}"}}': float(n)
        for c, n in counters["retries_by_class"].items()
    }
    # OpenTelemetry
    assert otel_of(reader, "resilient_db.attempts", service) == {(): counters["attempts"]}
    assert sum(otel_of(reader, "resilient_db.retries", service).values()) == counters["retries"]
    by_outcome: dict[str, int] = {}
    for key, n in otel_of(reader, "resilient_db.commit.verifications", service).items():
        by_outcome[dict(key)["outcome"]] = n
    assert by_outcome.get("committed", 0) == counters["verified_commits"]
    assert by_outcome.get("not_committed", 0) == counters["verified_not_committed"]
    assert by_outcome.get("unknown", 0) == counters["unknown_commits"]
    openings = otel_of(reader, "resilient_db.breaker.transitions", service)
    assert openings.get((("opened_here", True), ("state", "open")), 0) == counters["breaker_opens"]
    rejections = otel_of(reader, "resilient_db.breaker.rejections", service)
    assert rejections == {(): counters["breaker_rejections"]}
    timeouts = otel_of(reader, "resilient_db.pool.timeouts", service)
    assert sum(timeouts.values()) == counters["pool_timeouts"]
    # the dashboard
    series = recorder.snapshot()["series"].get(service)
    columns = recorder.snapshot()["bucket_columns"]
    totals = dict.fromkeys(columns, 0)
    for row in series["buckets"] if series else []:
        for column, value in zip(columns, row, strict=True):
            totals[column] += value
    assert (totals["retries"], totals["recovered"], totals["gave_up"]) == (
        counters["retries"],
        counters["recovered"],
        counters["gave_up"],
    )


def killing(engine: sa.Engine, kills: int) -> Any:
    """A unit (sync) whose first ``kills`` attempts, whichever thread runs them, have their
    backend terminated under them."""
    left = [kills]
    lock = threading.Lock()

    def unit(session: Session) -> int:
        with lock:
            kill = left[0] > 0
            left[0] -= kill
        if kill:
            pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    return unit


def test_threads_killed_backends_a_breaker_and_a_budget_count_alike_everywhere(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent], otel: Otel, recorder: Recorder
) -> None:
    """6 threads run a unit each; 3 backends are killed under them: 3 retries, 3 recoveries,
    9 attempts. Then 3 failures in a row open the breaker (threshold 3), which rejects 40
    calls from 4 threads."""
    _, _, reader = otel
    Sessions = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=3, failure_threshold=3)
    )
    unit = killing(engine, 3)
    threads = [threading.Thread(target=Sessions.run, args=(unit,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_channels_agree(service, events, reader, recorder, attempts=9, retries=3, recovered=3)

    Failing = rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=2, failure_threshold=3)
    )
    with pytest.raises(sa.exc.OperationalError):  # 3 attempts, the 3rd opens it
        Failing.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))

    def rejected() -> None:
        for _ in range(10):
            with pytest.raises(rdb.CircuitOpenError):
                rdb.with_self_healing(lambda: 1, service=service)

    threads = [threading.Thread(target=rejected) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # (the rejections not yet said are said when the breaker leaves the state)
    Sessions.policy.breaker.reset()
    assert_channels_agree(
        service,
        events,
        reader,
        recorder,
        attempts=12,
        retries=5,
        recovered=3,
        gave_up=1,
        breaker_opens=1,
        breaker_rejections=40,
    )


def test_a_spent_budget_and_a_lost_commit_answer_count_alike_everywhere(
    *,
    engine: sa.Engine,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
    events: list[rdb.SelfHealEvent],
    otel: Otel,
    recorder: Recorder,
) -> None:
    """4 units meet an outage with a budget that pays for no retry: 4 give up at once. Then a
    unit's COMMIT answer is lost: verified committed, not replayed."""
    _, _, reader = otel
    Budgeted = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(retry_budget=0.1, retry_budget_floor=0, failure_threshold=100),
    )
    for _ in range(4):
        with pytest.raises(sa.exc.OperationalError):
            Budgeted.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    assert rdb.health()["services"][service]["budget"]["exhausted"] == 4
    assert prometheus(service)["resilient_db_retry_budget_exhausted_total{}"] == 4.0
    assert sum(e.name == "budget_exhausted" for e in events) == 4
    assert_channels_agree(service, events, reader, recorder, attempts=4, gave_up=4)

    proxied = sa.create_engine(fault_proxy.url(pg_database))
    rdb.install_commit_markers(proxied)
    Proxied = rdb.ResilientSession(proxied, service=service, config=rdb.Config())
    try:
        fault_proxy.lose_commit_answer()
        Proxied.run(lambda s: s.execute(sa.text("CREATE TABLE written (id int)")))
    finally:
        proxied.dispose()
    assert fault_proxy.commits_lost == 1
    assert_channels_agree(
        service, events, reader, recorder, attempts=5, gave_up=4, verified_commits=1
    )


@pytest.mark.asyncio
async def test_tasks_killed_backends_and_pool_timeouts_count_alike_everywhere(
    *,
    engine: sa.Engine,
    pg_async_url: str,
    service: str,
    events: list[rdb.SelfHealEvent],
    otel: Otel,
    recorder: Recorder,
) -> None:
    """6 tasks run a unit each; 3 backends are killed under them; then one unit holds the
    pool's one connection while 3 others time out waiting for it, and a decorated async
    operation meets 2 deadlocks before it succeeds."""
    _, _, reader = otel
    aengine = create_async_engine(pg_async_url, pool_size=1, max_overflow=5, pool_timeout=0.2)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    left = [3]

    async def unit(session: AsyncSession) -> int:
        if left[0] > 0:
            left[0] -= 1
            pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

    try:
        assert await asyncio.gather(*(Sessions.run(unit) for _ in range(6))) == [1] * 6
        assert_channels_agree(service, events, reader, recorder, attempts=9, retries=3, recovered=3)
    finally:
        await aengine.dispose()

    small = create_async_engine(pg_async_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    Small = rdb.AsyncResilientSession(small, service=service)
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold(session: AsyncSession) -> None:
        await session.execute(sa.text("SELECT 1"))
        holding.set()
        await release.wait()

    deadlocks = [2]

    @rdb.with_self_healing(service=service)
    async def operation() -> int:
        async with Small() as session:
            if deadlocks[0] > 0:
                deadlocks[0] -= 1
                await session.execute(sa.text("SELECT raise_code('40P01')"))
            return 7

    try:
        holder = asyncio.ensure_future(Small.run(hold))
        await holding.wait()
        waited = await asyncio.gather(
            *(Small.run(lambda s: s.execute(sa.text("SELECT 1"))) for _ in range(3)),
            return_exceptions=True,
        )
        assert [type(e).__name__ for e in waited] == ["TimeoutError"] * 3
        release.set()
        await holder
        assert await operation() == 7
    finally:
        with contextlib.suppress(Exception):
            release.set()
        await small.dispose()
    assert_channels_agree(
        service,
        events,
        reader,
        recorder,
        attempts=9 + 1 + 3 + 3,
        retries=3 + 2,
        recovered=3 + 1,
        pool_timeouts=3,
    )
