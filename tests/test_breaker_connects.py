"""Connects that fail together all count for the circuit breaker: an attempt that never got a
connection was not cut off in flight by the failure another attempt was counted for (the
"one failover is one failure" rule merges only those), so units started together against a
hung database (a blackholed address: every connect waits for ``connect_timeout``) open the
breaker at their first timeout, not one wave per timeout. Real server behind a FaultProxy, real
threads, real connect timeouts."""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa

import resilient_db as rdb
from resilient_db.testing import FaultProxy

THREADS = 4


def _one(session: Any) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def test_connects_to_a_hung_database_that_fail_together_each_count(
    fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    engine = sa.create_engine(
        fault_proxy.url(pg_database),
        pool_size=THREADS,
        connect_args={"connect_timeout": 2},  # (libpq's least)
    )
    config = rdb.Config(max_retries=0, failure_threshold=3, reset_timeout=30)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    try:
        fault_proxy.blackhole()
        start = threading.Barrier(THREADS)
        failed: list[BaseException] = []

        def worker() -> None:
            start.wait()
            try:
                Sessions.run(_one)
            except Exception as exc:
                failed.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(failed) == THREADS  # each waited its connect timeout, none was rejected
        assert not any(isinstance(exc, rdb.CircuitOpenError) for exc in failed)
        breaker = rdb.health()["services"][service]["breaker"]
        # four failures, each counted: the threshold of three opened it (one wave counted once
        # left it closed with one failure)
        assert breaker["state"] == "open", breaker
    finally:
        fault_proxy.restore()
        engine.dispose()
