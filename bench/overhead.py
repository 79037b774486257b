"""Overhead of resilient_db against plain SQLAlchemy, measured on one server in one run.

    python bench/overhead.py            # or: make bench
    python bench/overhead.py --json     # machine-readable
    python bench/overhead.py --url postgresql+psycopg://...   # an existing server
    python bench/overhead.py --pin      # server and benchmark on separate CPUs

Cases, each a primary-key SELECT unit of work (new session, SELECT by id, commit):
- sync, 1 thread: median latency ratio of ``ResilientSession.run`` to ``sessionmaker.begin()``
- sync, 8 threads: throughput ratio
- naive: ``pybreaker.CircuitBreaker.call`` around the plain unit, 8 threads (one lock across I/O)
- the same three with units that wait 2 ms on the server (``pg_sleep``), as a remote database
  would: here a lock held across I/O serializes the threads
- async, 1 task: latency ratio of ``AsyncResilientSession.run`` to ``async_sessionmaker.begin()``
- async, 32 tasks: throughput ratio

The variants are interleaved in short rounds so that the machine's noise hits them alike; each
ratio is the median of the per-round ratios. Ratios, not absolute numbers, are the result (the
machine these run on is shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pybreaker
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import resilient_db as rdb
from resilient_db.testing import EmbeddedPostgres

ROWS = 1000


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


def select_unit(session: Session, key: int) -> str:
    return session.execute(sa.select(Item.name).where(Item.id == key)).scalar_one()


SERVER_WAIT = 0.002  # seconds the "slow" unit spends on the server, like a remote database


def slow_select_unit(session: Session, key: int) -> str:
    stmt = sa.select(Item.name, sa.func.pg_sleep(SERVER_WAIT)).where(Item.id == key)
    return str(session.execute(stmt).one()[0])


async def aselect_unit(session: Any, key: int) -> str:
    result = await session.execute(sa.select(Item.name).where(Item.id == key))
    return str(result.scalar_one())


def _keys(n: int) -> list[int]:
    rng = random.Random(7)
    return [rng.randint(1, ROWS) for _ in range(n)]


# -- sync ---------------------------------------------------------------------------------------
def sync_variants(
    engine: sa.Engine, unit: Callable[[Session, int], str] = select_unit
) -> dict[str, Callable[[int], object]]:
    plain = sessionmaker(engine)
    resilient = rdb.ResilientSession(engine, service="bench", config=rdb.Config())
    naive_breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

    def plain_unit(key: int) -> object:
        with plain.begin() as session:
            return unit(session, key)

    def resilient_unit(key: int) -> object:
        return resilient.run(unit, key)

    def naive_unit(key: int) -> object:
        return naive_breaker.call(plain_unit, key)

    return {"plain": plain_unit, "resilient": resilient_unit, "naive": naive_unit}


def latency(
    variants: dict[str, Callable[[int], object]], names: list[str], rounds: int, per_round: int
) -> dict[str, list[float]]:
    """Per-round mean latency (seconds) of each variant, rounds interleaved."""
    samples: dict[str, list[float]] = {n: [] for n in names}
    keys = _keys(per_round)
    for _ in range(rounds):
        order = names[:]
        random.shuffle(order)
        for name in order:
            fn = variants[name]
            start = time.perf_counter()
            for key in keys:
                fn(key)
            samples[name].append((time.perf_counter() - start) / per_round)
    return samples


def throughput(
    variants: dict[str, Callable[[int], object]],
    names: list[str],
    threads: int,
    rounds: int,
    seconds: float,
) -> dict[str, list[float]]:
    """Per-round units per second with ``threads`` threads, rounds interleaved."""
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        order = names[:]
        random.shuffle(order)
        for name in order:
            fn = variants[name]
            stop = threading.Event()
            counts = [0] * threads

            def worker(
                slot: int,
                fn: Callable[[int], object] = fn,
                stop: threading.Event = stop,
                counts: list[int] = counts,
            ) -> None:
                keys = _keys(256)
                i = 0
                while not stop.is_set():
                    fn(keys[i & 255])
                    i += 1
                counts[slot] = i

            pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
            start = time.perf_counter()
            for t in pool:
                t.start()
            time.sleep(seconds)
            stop.set()
            for t in pool:
                t.join()
            samples[name].append(sum(counts) / (time.perf_counter() - start))
    return samples


# -- async --------------------------------------------------------------------------------------
def async_variants(aengine: Any) -> dict[str, Callable[[int], Awaitable[object]]]:
    plain = async_sessionmaker(aengine)
    resilient = rdb.AsyncResilientSession(aengine, service="bench-async", config=rdb.Config())

    async def plain_unit(key: int) -> object:
        async with plain.begin() as session:
            return await aselect_unit(session, key)

    async def resilient_unit(key: int) -> object:
        return await resilient.run(aselect_unit, key)

    return {"plain": plain_unit, "resilient": resilient_unit}


async def alatency(
    variants: dict[str, Callable[[int], Awaitable[object]]], rounds: int, per_round: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {n: [] for n in variants}
    keys = _keys(per_round)
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            fn = variants[name]
            start = time.perf_counter()
            for key in keys:
                await fn(key)
            samples[name].append((time.perf_counter() - start) / per_round)
    return samples


async def athroughput(
    variants: dict[str, Callable[[int], Awaitable[object]]],
    tasks: int,
    rounds: int,
    seconds: float,
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            fn = variants[name]
            deadline = time.perf_counter() + seconds
            counts = [0] * tasks

            async def worker(
                slot: int,
                fn: Callable[[int], Awaitable[object]] = fn,
                deadline: float = deadline,
                counts: list[int] = counts,
            ) -> None:
                keys = _keys(256)
                i = 0
                while time.perf_counter() < deadline:
                    await fn(keys[i & 255])
                    i += 1
                counts[slot] = i

            start = time.perf_counter()
            await asyncio.gather(*(worker(t) for t in range(tasks)))
            samples[name].append(sum(counts) / (time.perf_counter() - start))
    return samples


def summary(samples: dict[str, list[float]], base: str = "plain") -> dict[str, float]:
    """Medians of each variant, and the median of the per-round ratios to ``base``: the two runs
    of one round are adjacent in time, so the machine's drift cancels out in their ratio."""
    out = {name: statistics.median(values) for name, values in samples.items()}
    for name, values in samples.items():
        if name != base:
            ratios = [v / b for v, b in zip(values, samples[base], strict=True)]
            out[f"{name}_ratio"] = statistics.median(ratios)
    return out


# -- main ---------------------------------------------------------------------------------------
def prepare(url: str) -> None:
    engine = sa.create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Item), [{"id": i, "name": f"item-{i}"} for i in range(1, ROWS + 1)])
    engine.dispose()


def run(url: str, async_url: str, *, quick: bool) -> dict[str, Any]:
    rounds = 5 if quick else 21
    per_round = 200 if quick else 300
    seconds = 0.5 if quick else 1.0
    prepare(url)
    engine = sa.create_engine(url, pool_size=40, max_overflow=0)
    variants = sync_variants(engine)
    for fn in variants.values():  # warm up pools, statement caches, code paths
        for key in _keys(200):
            fn(key)
    lat = summary(latency(variants, ["plain", "resilient"], rounds, per_round))
    thr = summary(throughput(variants, ["plain", "resilient", "naive"], 8, rounds, seconds))
    slow = summary(
        throughput(
            sync_variants(engine, slow_select_unit),
            ["plain", "resilient", "naive"],
            8,
            max(3, rounds // 3),
            seconds,
        )
    )
    engine.dispose()

    async def async_part() -> dict[str, dict[str, float]]:
        aengine = create_async_engine(async_url, pool_size=40, max_overflow=0)
        avariants = async_variants(aengine)
        for fn in avariants.values():
            for key in _keys(200):
                await fn(key)
        alat = summary(await alatency(avariants, rounds, per_round))
        athr = summary(await athroughput(avariants, 32, rounds, seconds))
        await aengine.dispose()
        return {"latency": alat, "throughput": athr}

    asynchronous = asyncio.run(async_part())
    return {
        "sync_1_thread": {
            "plain_us": lat["plain"] * 1e6,
            "resilient_us": lat["resilient"] * 1e6,
            "latency_ratio": lat["resilient_ratio"],
        },
        "sync_8_threads": {
            "plain_ops": thr["plain"],
            "resilient_ops": thr["resilient"],
            "naive_ops": thr["naive"],
            "throughput_ratio": thr["resilient_ratio"],
            "naive_throughput_ratio": thr["naive_ratio"],
        },
        "sync_8_threads_2ms_server_wait": {
            "plain_ops": slow["plain"],
            "resilient_ops": slow["resilient"],
            "naive_ops": slow["naive"],
            "throughput_ratio": slow["resilient_ratio"],
            "naive_throughput_ratio": slow["naive_ratio"],
        },
        "async_1_task": {
            "plain_us": asynchronous["latency"]["plain"] * 1e6,
            "resilient_us": asynchronous["latency"]["resilient"] * 1e6,
            "latency_ratio": asynchronous["latency"]["resilient_ratio"],
        },
        "async_32_tasks": {
            "plain_ops": asynchronous["throughput"]["plain"],
            "resilient_ops": asynchronous["throughput"]["resilient"],
            "throughput_ratio": asynchronous["throughput"]["resilient_ratio"],
        },
    }


def render(result: dict[str, Any]) -> str:
    s1, s8 = result["sync_1_thread"], result["sync_8_threads"]
    a1, a32 = result["async_1_task"], result["async_32_tasks"]
    w = result["sync_8_threads_2ms_server_wait"]
    rows = [
        "| case | plain SQLAlchemy | resilient_db | ratio | target |",
        "|---|---|---|---|---|",
        f"| sync, 1 thread, latency | {s1['plain_us']:.0f} µs | {s1['resilient_us']:.0f} µs "
        f"| {s1['latency_ratio']:.3f} | ≤ 1.05 |",
        f"| sync, 8 threads, throughput | {s8['plain_ops']:.0f} ops/s "
        f"| {s8['resilient_ops']:.0f} ops/s | {s8['throughput_ratio']:.3f} | ≥ 0.95 |",
        f"| naive `pybreaker.call`, 8 threads | {s8['plain_ops']:.0f} ops/s "
        f"| {s8['naive_ops']:.0f} ops/s | {s8['naive_throughput_ratio']:.3f} | (for comparison) |",
        f"| sync, 8 threads, unit waits 2 ms on the server | {w['plain_ops']:.0f} ops/s "
        f"| {w['resilient_ops']:.0f} ops/s | {w['throughput_ratio']:.3f} | ≥ 0.95 |",
        f"| naive `pybreaker.call`, same units | {w['plain_ops']:.0f} ops/s "
        f"| {w['naive_ops']:.0f} ops/s | {w['naive_throughput_ratio']:.3f} | (for comparison) |",
        f"| async, 1 task, latency | {a1['plain_us']:.0f} µs | {a1['resilient_us']:.0f} µs "
        f"| {a1['latency_ratio']:.3f} | ≤ 1.05 |",
        f"| async, 32 tasks, throughput | {a32['plain_ops']:.0f} ops/s "
        f"| {a32['resilient_ops']:.0f} ops/s | {a32['throughput_ratio']:.3f} | ≥ 0.95 |",
    ]
    return "\n".join(rows)


def pin_apart(postmaster_pid_file: Path) -> None:
    """The server's processes on the last CPU, this process on the others (Linux only).

    Client and server then stop competing for the same cores, as when the database runs on its
    own host. New backends inherit the postmaster's CPU set.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least two CPUs")
    postmaster = int(postmaster_pid_file.read_text().split()[0])
    server_cpu = {cpus[-1]}
    for pid in [postmaster, *_children(postmaster)]:
        try:
            os.sched_setaffinity(pid, server_cpu)
        except ProcessLookupError:  # a short-lived child that has already exited
            continue
    os.sched_setaffinity(0, set(cpus[:-1]))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="SQLAlchemy URL (postgresql+psycopg://...) of a server")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the embedded server on one CPU and the benchmark on another, as if the "
        "database were on its own host (default: share every CPU)",
    )
    args = parser.parse_args(argv)
    if args.url:
        url = args.url
        async_url = (
            sa.make_url(url)
            .set(drivername="postgresql+asyncpg")
            .render_as_string(hide_password=False)
        )
        result = run(url, async_url, quick=args.quick)
    else:
        with EmbeddedPostgres() as server:
            server.create_database("bench")
            if args.pin:
                pin_apart(server.data_dir / "postmaster.pid")
            result = run(
                server.url("bench"), server.url("bench", driver="asyncpg"), quick=args.quick
            )
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
