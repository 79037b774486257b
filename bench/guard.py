"""Cost of the status-transition guard, measured on one server in one run.

    python bench/guard.py [--json] [--quick] [--url postgresql+psycopg://...]

- flush of 1,000 changed rows through ``ResilientSession`` with the flush guard on and off
  (``SELF_HEALING_STATUS_VALIDATION``): ratio on/off; the same through ``AsyncResilientSession``
  (asyncpg, which reports no row count for an executemany: the guard locks those rows instead)
- a unit that moves one row (get it, change its status, commit), guard on and off: the
  compare-and-set rides in the UPDATE, so the ratio is Python only
- single-row UPDATE (raw SQL, autocommit off, one transaction each) on a table with the generated
  transition trigger and on an identical table without it: ratio with/without

Variants are interleaved in rounds; each ratio is the median of the per-round ratios, with a
95 % bootstrap interval (``_stats.py``). The garbage is collected before each variant's turn.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import _stats
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import EmbeddedPostgres

ROWS = 1000
RULES = rdb.TransitionRules(
    column="status",
    transitions={"pending": {"running"}, "running": {"pending", "done"}, "done": {"pending"}},
    initial={"pending"},
)
CYCLE = {"pending": "running", "running": "done", "done": "pending"}


class Base(DeclarativeBase):
    pass


class GuardedTask(Base):
    __tablename__ = "bench_guarded_tasks"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str]


class PlainTask(Base):
    __tablename__ = "bench_plain_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str]


def prepare(engine: sa.Engine) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    rows = [{"id": i, "status": "pending"} for i in range(1, ROWS + 1)]
    with engine.begin() as conn:
        conn.execute(sa.insert(GuardedTask), rows)
        conn.execute(sa.insert(PlainTask), rows)
        rdb.install_transition_trigger(conn, GuardedTask)


# The guarded and the unguarded factory each get an engine of their own: factories sharing an
# engine must agree on its engine-wide settings, status validation among them.


def flush_variants(on_engine: sa.Engine, off_engine: sa.Engine) -> dict[str, Callable[[], None]]:
    on = rdb.ResilientSession(on_engine, service="bench-guard-on", config=rdb.Config())
    off = rdb.ResilientSession(
        off_engine, service="bench-guard-off", config=rdb.Config(status_validation=False)
    )

    def move_all(session: Session) -> None:
        for task in session.scalars(sa.select(GuardedTask)):
            task.status = CYCLE[task.status]
        session.flush()

    return {"guard_on": lambda: on.run(move_all), "guard_off": lambda: off.run(move_all)}


def one_row_variants(on_engine: sa.Engine, off_engine: sa.Engine) -> dict[str, Callable[[], None]]:
    on = rdb.ResilientSession(on_engine, service="bench-guard-row-on", config=rdb.Config())
    off = rdb.ResilientSession(
        off_engine, service="bench-guard-row-off", config=rdb.Config(status_validation=False)
    )
    rng = random.Random(5)

    def move_one(session: Session) -> None:
        task = session.get(GuardedTask, rng.randint(1, ROWS))
        assert task is not None
        task.status = CYCLE[task.status]

    return {"guard_on": lambda: on.run(move_one), "guard_off": lambda: off.run(move_one)}


def async_flush_variants(
    url: str, loop: asyncio.AbstractEventLoop
) -> tuple[dict[str, Callable[[], None]], list[AsyncEngine]]:
    async_url = sa.make_url(url).set(drivername="postgresql+asyncpg")
    engines = [create_async_engine(async_url), create_async_engine(async_url)]
    on = rdb.AsyncResilientSession(engines[0], service="bench-guard-async-on", config=rdb.Config())
    off = rdb.AsyncResilientSession(
        engines[1], service="bench-guard-async-off", config=rdb.Config(status_validation=False)
    )

    async def move_all(session: AsyncSession) -> None:
        for task in await session.scalars(sa.select(GuardedTask)):
            task.status = CYCLE[task.status]
        await session.flush()

    variants: dict[str, Callable[[], None]] = {
        "guard_on": lambda: loop.run_until_complete(on.run(move_all)),
        "guard_off": lambda: loop.run_until_complete(off.run(move_all)),
    }
    return variants, engines


def update_variants(engine: sa.Engine) -> dict[str, Callable[[], None]]:
    tables = {"with_trigger": "bench_guarded_tasks", "without_trigger": "bench_plain_tasks"}
    rng = random.Random(3)

    def make(name: str) -> Callable[[], None]:
        def update_one() -> None:
            # Every row moves through the same legal cycle, so each UPDATE is a real change.
            key = rng.randint(1, ROWS)
            with engine.begin() as conn:
                current = conn.execute(
                    sa.text(f"SELECT status FROM {tables[name]} WHERE id = :id"), {"id": key}
                ).scalar_one()
                conn.execute(
                    sa.text(f"UPDATE {tables[name]} SET status = :s WHERE id = :id"),
                    {"s": CYCLE[current], "id": key},
                )

        return update_one

    return {name: make(name) for name in tables}


def measure(
    variants: dict[str, Callable[[], None]], rounds: int, per_round: int
) -> dict[str, list[float]]:
    """Per-round mean time of each variant (seconds), the variants in a shuffled order each
    round. The garbage is collected before each variant's turn: a flush of a thousand rows
    leaves a thousand objects behind, and a collection that falls inside one variant's turn and
    not the other's moved single ratios by half (it still runs inside a turn as it would in an
    application, only not one left over from the turn before)."""
    samples: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            fn = variants[name]
            gc.collect()
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - start) / per_round)
    return samples


def _on_off(samples: dict[str, list[float]], scale: float, unit: str) -> dict[str, Any]:
    stats = _stats.summary(samples, base="guard_off")
    return {
        f"guard_off_{unit}": stats["guard_off"] * scale,
        f"guard_on_{unit}": stats["guard_on"] * scale,
        "ratio": stats["guard_on_ratio"],
        "ratio_95": [stats["guard_on_ratio_low"], stats["guard_on_ratio_high"]],
    }


def _with_without(samples: dict[str, list[float]]) -> dict[str, Any]:
    stats = _stats.summary(samples, base="without_trigger")
    return {
        "without_trigger_us": stats["without_trigger"] * 1e6,
        "with_trigger_us": stats["with_trigger"] * 1e6,
        "ratio": stats["with_trigger_ratio"],
        "ratio_95": [stats["with_trigger_ratio_low"], stats["with_trigger_ratio_high"]],
    }


def run(url: str, *, quick: bool) -> dict[str, Any]:
    engine, on_engine, off_engine = (sa.create_engine(url) for _ in range(3))
    prepare(engine)
    loop = asyncio.new_event_loop()
    flush = flush_variants(on_engine, off_engine)
    async_flush, async_engines = async_flush_variants(url, loop)
    one_row = one_row_variants(on_engine, off_engine)
    update = update_variants(engine)
    for fn in (*flush.values(), *async_flush.values(), *one_row.values(), *update.values()):
        fn()
    f = measure(flush, 5 if quick else 25, 1)
    af = measure(async_flush, 5 if quick else 25, 1)
    r = measure(one_row, 3 if quick else 15, 100 if quick else 200)
    u = measure(update, 3 if quick else 15, 100 if quick else 200)
    for sync_engine in (engine, on_engine, off_engine):
        sync_engine.dispose()
    for async_engine in async_engines:
        loop.run_until_complete(async_engine.dispose())
    loop.close()
    return {
        "flush_1000_rows": _on_off(f, 1e3, "ms"),
        "flush_1000_rows_asyncpg": _on_off(af, 1e3, "ms"),
        "one_row_unit": _on_off(r, 1e6, "us"),
        "single_row_update": _with_without(u),
    }


def _ratio(row: dict[str, Any]) -> str:
    low, high = row["ratio_95"]
    return f"{row['ratio']:.3f} ({low:.2f}–{high:.2f})"


def render(result: dict[str, Any]) -> str:
    f, u = result["flush_1000_rows"], result["single_row_update"]
    af, r = result["flush_1000_rows_asyncpg"], result["one_row_unit"]
    return "\n".join(
        [
            "| case | without | with | ratio (95 % interval) |",
            "|---|---|---|---|",
            f"| flush of 1,000 changed rows, flush guard | {f['guard_off_ms']:.1f} ms "
            f"| {f['guard_on_ms']:.1f} ms | {_ratio(f)} |",
            f"| the same, asyncpg | {af['guard_off_ms']:.1f} ms "
            f"| {af['guard_on_ms']:.1f} ms | {_ratio(af)} |",
            f"| unit moving one row, flush guard | {r['guard_off_us']:.0f} µs "
            f"| {r['guard_on_us']:.0f} µs | {_ratio(r)} |",
            f"| single-row UPDATE, transition trigger | {u['without_trigger_us']:.0f} µs "
            f"| {u['with_trigger_us']:.0f} µs | {_ratio(u)} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="SQLAlchemy URL (postgresql+psycopg://...) of a server")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args(argv)
    if args.url:
        result = run(args.url, quick=args.quick)
    else:
        with EmbeddedPostgres() as server:
            server.create_database("bench")
            result = run(server.url("bench"), quick=args.quick)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
