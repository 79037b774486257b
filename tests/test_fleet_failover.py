"""One failover seen by several OS processes sharing a breaker through a real Redis: a unit in
flight in each of them, all cut off at once (every backend terminated), is one failure for the
fleet as it is for the threads of one process, so the shared breaker stays closed and every
unit recovers on its retry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fleet import Gate, fleet

from resilient_db.testing import PostgresServer, RedisServer

pytestmark = pytest.mark.slow

APP = "rdb_fleet_failover"


def test_one_failover_cutting_off_a_unit_in_each_process_keeps_the_shared_breaker_closed(
    redis_server: RedisServer, pg_server: PostgresServer, pg_url: str, gate: Gate, tmp_path: Path
) -> None:
    n = threshold = 3
    settings = {
        "SELF_HEALING_REDIS_URL": redis_server.url,
        "SELF_HEALING_FAILURE_THRESHOLD": str(threshold),
        "SELF_HEALING_RESET_TIMEOUT": "60000",
        "SELF_HEALING_MAX_RETRIES": "3",
        "SELF_HEALING_INITIAL_DELAY": "10",
        "SELF_HEALING_MAX_DELAY": "20",
    }
    sep = "&" if "?" in pg_url else "?"
    workers_url = f"{pg_url}{sep}application_name={APP}"
    gate.set(hold=True)
    with fleet(n, workers_url, settings, tmp_path) as workers:
        for w in workers:
            assert w.ask("wait", what="connected", timeout=20)["ok"], w.log()
        with gate.holding():
            for w in workers:
                assert w.ask("start", n=1) == {"started": 1}
            for _ in range(2000):
                if gate.waiting_on_hold() == n:
                    break
                time.sleep(0.005)
            assert gate.waiting_on_hold() == n
            gate.set(hold=False)  # the retries pass straight through
            # the failover: every unit's backend cut off at once (the gate's lock holder spared)
            assert pg_server.terminate_backends(application_name=APP) == n
        for _ in range(2000):
            progress = [w.ask("progress") for w in workers]
            if all(p["done"] == 1 for p in progress):
                break
            time.sleep(0.005)
        assert [p["ok"] for p in progress] == [1] * n, progress  # every unit recovered
        for w in workers:
            breaker = w.ask("health")["services"]["fleet"]["breaker"]
            assert breaker["state"] == "closed", w.log()
            assert breaker["shared"]["fleet_opens"] == 0
            assert not w.self_heal_lines("Circuit breaker opened")
