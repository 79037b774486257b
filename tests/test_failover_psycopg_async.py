"""Failover with psycopg's async driver (``AsyncResilientSession`` on ``postgresql+psycopg``):
the scenarios test_failover.py runs with psycopg (sync) and asyncpg."""

from __future__ import annotations

import pytest
from processes import wait_for
from test_failover import (
    DATABASE,
    Workload,
    check_exactly_once,
    fail_over,
    ledger,
    prepare,
)

from resilient_db.testing import FaultProxy, StandbyPair


def test_async_psycopg_writes_resume_after_failover_and_nothing_acknowledged_is_lost(
    pg_standby: StandbyPair,
) -> None:
    pair = pg_standby
    prepare(pair)
    workload = Workload(pair.url(DATABASE), "psycopg-async").start()
    try:
        wait_for(lambda: workload.acked(pair.primary.port) >= 40, "writes on the primary")
        fail_over(pair)
        wait_for(lambda: workload.acked(pair.standby.port) >= 40, "writes on the new primary")
    finally:
        workload.finish()
    check_exactly_once(pair, workload, lossless=True)
    assert workload.failures == {}, workload.failures


@pytest.mark.slow
def test_async_psycopg_commit_lost_on_the_way_then_failover_is_replayed_once(
    pg_standby: StandbyPair,
) -> None:
    pair = pg_standby
    prepare(pair)
    with FaultProxy(pair.primary) as proxy:
        url = pair.url(DATABASE, primary_at=(proxy.host, proxy.port))
        proxy.swallow_commit()
        workload = Workload(url, "psycopg-async", writers=1, limit=1).start()
        try:
            wait_for(lambda: proxy.commits_swallowed == 1 or bool(workload.failures), "COMMIT")
            assert proxy.commits_swallowed == 1, workload.failures
            fail_over(pair)
            assert proxy.release_swallowed() == 1
        finally:
            workload.finish()
    assert workload.failures == {}, workload.failures
    [ack] = workload.acks
    assert ack.port == pair.standby.port
    assert workload.calls[ack.key] == 2
    assert ledger(pair) == {ack.key: 1}


@pytest.mark.slow
def test_async_psycopg_commit_answer_lost_then_failover_is_verified_not_replayed(
    pg_standby: StandbyPair,
) -> None:
    pair = pg_standby
    prepare(pair)
    with FaultProxy(pair.primary) as proxy:
        url = pair.url(DATABASE, primary_at=(proxy.host, proxy.port))
        failovers: list[float] = []

        def arm(key: str, call: int) -> None:
            if call == 1:
                proxy.lose_commit_answer()
                proxy.refuse()

        def during_backoff(seconds: float) -> None:
            if not failovers:
                fail_over(pair)
                failovers.append(seconds)

        workload = Workload(
            url, "psycopg-async", writers=1, limit=1, on_call=arm, on_backoff=during_backoff
        ).start()
        workload.finish(stop=False)
    assert proxy.commits_lost == 1
    assert failovers
    assert workload.failures == {}, workload.failures
    [ack] = workload.acks
    assert ack.port == pair.primary.port
    assert workload.calls[ack.key] == 1
    assert ledger(pair) == {ack.key: 1}
