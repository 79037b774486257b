"""Fail-fast and recovery, measured on a real server (DESIGN.md, "Performance").

    python bench/recovery.py [--json]

- fail fast: with the circuit open, how long ``Session.run`` takes to raise ``CircuitOpenError``
  (mean over many calls), and that no connection was checked out meanwhile;
- recovery: the server is crashed and restarted while a unit of work is retrying; how long after
  the server accepts connections again the unit succeeds, against the backoff step in force
  (``SELF_HEALING_MAX_DELAY`` caps it). The target: within one backoff step.
- failover: a writer runs units on a multi-host URL (``target_session_attrs=read-write``) of a
  primary with a synchronous standby; the primary is crashed and the standby promoted; how long
  after the standby takes writes (and after the crash) the first write lands on it.
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
from resilient_db.testing import EmbeddedPostgres, StandbyPair

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


WRITE = sa.text("INSERT INTO failover_bench (port) VALUES (inet_server_port()) RETURNING port")


def _write(session: Session) -> int:
    return int(session.execute(WRITE).scalar_one())


def failover(*, synchronous: bool = True) -> dict[str, Any]:
    config = rdb.Config(
        initial_delay=0.05, max_delay=0.4, max_retries=100, deadline=60.0, circuit_breaker=False
    )
    with StandbyPair(synchronous=synchronous) as pair:
        pair.create_database("bench")
        pair.execute(
            "CREATE TABLE failover_bench (id bigserial PRIMARY KEY, port integer)",
            database="bench",
        )
        engine = sa.create_engine(pair.url("bench"))
        rdb.install_commit_markers(engine)
        pair.wait_replayed()
        Sessions = rdb.ResilientSession(engine, service="bench-failover", config=config)
        acks: list[tuple[float, int]] = []
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                port = Sessions.run(_write)
                acks.append((time.perf_counter(), port))

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            while len(acks) < 20:
                time.sleep(0.005)
            pair.crash_primary()
            crashed = time.perf_counter()
            pair.promote()
            promoted = time.perf_counter()
            deadline = promoted + 30.0
            while not any(p == pair.standby.port for _, p in acks):
                if time.perf_counter() > deadline:
                    raise RuntimeError("no write reached the promoted standby within 30 s")
                time.sleep(0.002)
        finally:
            stop.set()
            thread.join()
            engine.dispose()
        first = next(t for t, p in acks if p == pair.standby.port)
    return {
        "synchronous": synchronous,
        "promotion_ms": (promoted - crashed) * 1e3,
        "first_write_after_promotion_ms": (first - promoted) * 1e3,
        "first_write_after_crash_ms": (first - crashed) * 1e3,
        "backoff_cap_ms": config.max_delay * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    with EmbeddedPostgres() as server:
        server.create_database("bench")
        url = server.url("bench")
        result: dict[str, Any] = {
            "fail_fast": fail_fast(url),
            "recovery": [recovery(server, url, down) for down in (0.5, 1.0, 2.0)],
        }
    result["failover"] = [failover() for _ in range(3)]
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
    for f in result["failover"]:
        print(
            f"failover (synchronous standby): promoted {f['promotion_ms']:.0f} ms after the "
            f"crash; first write on it {f['first_write_after_promotion_ms']:.0f} ms after it "
            f"took writes, {f['first_write_after_crash_ms']:.0f} ms after the crash "
            f"(backoff cap {f['backoff_cap_ms']:.0f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
