"""Fail-fast and recovery, measured on a real server (DESIGN.md, "Performance").

    python bench/recovery.py [--json]

- fail fast: with the circuit open, how long ``Session.run`` takes to raise ``CircuitOpenError``
  (mean over many calls), and that no connection was checked out meanwhile;
- recovery: the server is crashed and restarted while a unit of work is retrying; how long after
  the server accepts connections again the unit succeeds, against the backoff step in force
  (``SELF_HEALING_MAX_DELAY`` caps it). The target: within one backoff step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import EmbeddedPostgres

CALLS = 20_000


def unit(session: Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


def fail_fast(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    checkouts = [0]
    event.listen(engine, "checkout", lambda *a: checkouts.__setitem__(0, checkouts[0] + 1))
    Sessions = rdb.ResilientSession(engine, service="bench-fail-fast", config=rdb.Config())
    Sessions.run(unit)
    assert Sessions.policy.breaker is not None
    Sessions.policy.breaker.open()
    before = checkouts[0]
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(CALLS // 5):
            with contextlib.suppress(rdb.CircuitOpenError):
                Sessions.run(unit)
        samples.append((time.perf_counter() - start) / (CALLS // 5))
    Sessions.policy.breaker.close()
    engine.dispose()
    return {
        "rejection_us": statistics.median(samples) * 1e6,
        "connections_checked_out_while_open": checkouts[0] - before,
    }


def _wait_ready(server: EmbeddedPostgres, stop: threading.Event, out: list[float]) -> None:
    """Note the moment the restarted server first accepts a connection (polls every 2 ms)."""
    while not stop.is_set():
        try:
            with psycopg.connect(server.conninfo(), connect_timeout=1):
                out.append(time.perf_counter())
                return
        except psycopg.OperationalError:
            time.sleep(0.002)


def recovery(server: EmbeddedPostgres, url: str, down_for: float) -> dict[str, Any]:
    config = rdb.Config(
        initial_delay=0.05, max_delay=0.4, max_retries=100, deadline=60.0, circuit_breaker=False
    )
    engine = sa.create_engine(url)
    Sessions = rdb.ResilientSession(engine, service="bench-recovery", config=config)
    Sessions.run(unit)
    server.crash()
    ready: list[float] = []
    stop = threading.Event()
    restarter = server.restart_after(down_for, crash=False)
    watcher = threading.Thread(target=_wait_ready, args=(server, stop, ready))
    watcher.start()
    Sessions.run(unit)  # retries until the server is back
    done = time.perf_counter()
    stop.set()
    watcher.join()
    restarter.join()
    engine.dispose()
    gap = done - ready[0] if ready else float("nan")
    return {
        "down_for_s": down_for,
        "first_unit_after_ready_ms": gap * 1e3,
        "backoff_cap_ms": config.max_delay * 1e3,
        "within_one_backoff_step": gap <= config.max_delay,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    with EmbeddedPostgres() as server:
        server.create_database("bench")
        url = server.url("bench")
        result = {
            "fail_fast": fail_fast(url),
            "recovery": [recovery(server, url, down) for down in (0.5, 1.0, 2.0)],
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ff = result["fail_fast"]
    print(
        f"open breaker: a unit is rejected in {ff['rejection_us']:.1f} µs; "
        f"{ff['connections_checked_out_while_open']} connections checked out meanwhile"
    )
    for r in result["recovery"]:
        verdict = "within one backoff step" if r["within_one_backoff_step"] else "SLOWER"
        print(
            f"server down {r['down_for_s']:.1f} s: first unit "
            f"{r['first_unit_after_ready_ms']:.0f} ms after the server was ready "
            f"(backoff cap {r['backoff_cap_ms']:.0f} ms): {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
