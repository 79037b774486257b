"""Cost of resilient_db per row in large units of work, against plain SQLAlchemy.

    python bench/large_units.py                 # every case, counted and timed
    python bench/large_units.py --quick         # a tenth of the rows, one timed round (< 1 min)
    python bench/large_units.py --cases add_all,flush_updates
    python bench/large_units.py --breakdown flush_updates   # where resilient_db's lines go
    python bench/large_units.py --json
    python bench/large_units.py --url postgresql+psycopg://...   # an existing server

``bench/overhead.py`` measures units of one row each; a batch job's unit inserts, changes or
reads thousands. Here each case is one such unit, run by plain SQLAlchemy
(``sessionmaker.begin()`` / ``async_sessionmaker.begin()``) and by resilient_db
(``ResilientSession.run`` / ``AsyncResilientSession.run``; the ``yield_per`` read also as
the drop-in ``Session.begin()``), on the same server in the same process, each on an engine of
its own. The plain variant of a guarded case works on the same table mapped without
``__transitions__`` (in a registry of its own), so it pays nothing of the guard.

Cases (``ROWS`` = 10,000 rows, ``READ_ROWS`` = 100,000; ``--quick``: a tenth of each):
- ``add_all``: ``session.add_all`` of new objects whose key the server makes (an IDENTITY
  column), flushed as batched ``INSERT ... RETURNING`` (insertmanyvalues);
  ``add_all_keyed``: the same with the keys given (an executemany without RETURNING);
  ``add_all_guarded``: new objects of a model with ``__transitions__`` (the guard judges each
  new row's initial state);
- ``orm_bulk_insert`` (and ``_guarded``): ``session.execute(insert(M), [dicts])``;
  ``core_insert``: ``session.execute(insert(table).values(...), [dicts])``, an executemany;
- ``flush_updates``: load ``ROWS`` guarded objects, move each one's status, flush (``ROWS``
  UPDATEs judged by the flush guard); ``bulk_update_<mode>``: one
  ``update(M).where(M.status == old).values(status=new)`` touching ``ROWS`` guarded rows, for
  each ``synchronize_session`` (``False``, ``"evaluate"``, ``"fetch"``, ``"auto"``), with the
  ``ROWS`` objects loaded in the session first (what ``evaluate`` and ``fetch`` synchronize);
- ``select_entities`` (``session.execute(select(M)).all()``), ``select_scalars``
  (``session.scalars(select(M)).all()``), ``select_core`` (rows of the table), each of
  ``READ_ROWS`` rows; ``select_yield_per``: the same entities read through
  ``yield_per(1000)`` (a server-side cursor), and ``select_yield_per_dropin`` the same in
  ``with Session.begin() as session`` on the resilient factory;
- ``get``: ``ROWS`` ``session.get`` calls in one unit (each a SELECT by primary key);
- ``async_*``: the inserts and the reads through asyncpg (``yield_per`` as
  ``stream_scalars``).

Counted: the Python lines each unit runs (``sys.settrace``, ``overhead.LineCounter`` without
its opcode events: deterministic, whatever the machine's noise), and from them resilient_db's
lines per row, (resilient - plain) / rows: the unit's fixed cost (a few hundred lines) is a few
hundredths of a line per row here. Timed: the median wall time of each variant over
interleaved rounds (the garbage collected before each turn), and their ratio. Tables are
emptied (inserts) or put back (updates) outside what is counted and timed.

``--breakdown CASE`` counts the lines of one case per (file, function), plain and resilient,
and prints where they differ most: where a per-row cost lives.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from overhead import CYCLE, RULES, LineCounter  # (the overhead bench's status cycle)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import resilient_db as rdb
from resilient_db.testing import EmbeddedPostgres

ROWS = 10_000
READ_ROWS = 100_000


class Base(DeclarativeBase):
    pass


class Row(Base):
    """Unguarded rows, inserted (their key from an IDENTITY column, or given)."""

    __tablename__ = "large_rows"
    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    name: Mapped[str]
    status: Mapped[str]


class NewTask(Base):
    """Guarded rows, inserted."""

    __tablename__ = "large_new_tasks"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    name: Mapped[str]
    status: Mapped[str]


class Task(Base):
    """Guarded rows, ``ROWS`` of them, updated."""

    __tablename__ = "large_tasks"
    __transitions__ = RULES
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str]


class Reading(Base):
    """``READ_ROWS`` unguarded rows, read."""

    __tablename__ = "large_readings"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    status: Mapped[str]


class PlainBase(DeclarativeBase):
    pass


class PlainNewTask(PlainBase):
    """``large_new_tasks`` without ``__transitions__``, for the plain variant."""

    __table__ = NewTask.__table__
    id: Mapped[int]
    name: Mapped[str]
    status: Mapped[str]


class PlainTask(PlainBase):
    """``large_tasks`` without ``__transitions__``, for the plain variant."""

    __table__ = Task.__table__
    id: Mapped[int]
    status: Mapped[str]


@dataclass
class Models:
    """The classes a variant's units use: the guarded ones, or the same tables without rules."""

    new_task: type[Any]
    task: type[Any]


GUARDED = Models(new_task=NewTask, task=Task)
UNGUARDED = Models(new_task=PlainNewTask, task=PlainTask)


@dataclass
class Size:
    rows: int
    read_rows: int


class State:
    """The status every row of ``large_tasks`` has (they all move together)."""

    status = "queued"


# -- sync units -------------------------------------------------------------------------------
SyncUnit = Callable[[Session, Models, Size], object]


def add_all(session: Session, m: Models, size: Size) -> object:
    session.add_all([Row(name=f"row-{i}", status="queued") for i in range(size.rows)])
    return None


def add_all_keyed(session: Session, m: Models, size: Size) -> object:
    session.add_all([Row(id=i, name=f"row-{i}", status="queued") for i in range(1, size.rows + 1)])
    return None


def add_all_guarded(session: Session, m: Models, size: Size) -> object:
    session.add_all([m.new_task(name=f"task-{i}", status="queued") for i in range(size.rows)])
    return None


def _dicts(size: Size) -> list[dict[str, Any]]:
    return [{"name": f"row-{i}", "status": "queued"} for i in range(size.rows)]


def orm_bulk_insert(session: Session, m: Models, size: Size) -> object:
    session.execute(sa.insert(Row), _dicts(size))
    return None


def orm_bulk_insert_guarded(session: Session, m: Models, size: Size) -> object:
    session.execute(sa.insert(m.new_task), _dicts(size))
    return None


ROW_TABLE = Base.metadata.tables[Row.__tablename__]  # (a Table: Core's insert, typed)
CORE_INSERT = sa.insert(ROW_TABLE).values(name=sa.bindparam("n"), status=sa.bindparam("s"))


def core_insert(session: Session, m: Models, size: Size) -> object:
    session.execute(CORE_INSERT, [{"n": f"row-{i}", "s": "queued"} for i in range(size.rows)])
    return None


def flush_updates(session: Session, m: Models, size: Size) -> object:
    for task in session.scalars(sa.select(m.task)):
        task.status = CYCLE[task.status]
    session.flush()
    State.status = CYCLE[State.status]
    return None


def _bulk_update(mode: Any) -> SyncUnit:
    def bulk_update(session: Session, m: Models, size: Size) -> object:
        loaded = session.scalars(sa.select(m.task)).all()  # (kept: the session holds them weakly)
        old = State.status
        stmt = (
            sa.update(m.task)
            .where(m.task.status == old)
            .values(status=CYCLE[old])
            .execution_options(synchronize_session=mode)
        )
        result = session.execute(stmt)
        assert result.rowcount == size.rows, result.rowcount  # type: ignore[attr-defined]
        State.status = CYCLE[old]
        assert mode is False or loaded[0].status == CYCLE[old]
        return None

    bulk_update.__name__ = f"bulk_update_{mode}"
    return bulk_update


def select_entities(session: Session, m: Models, size: Size) -> object:
    return len(session.execute(sa.select(Reading)).all())


def select_scalars(session: Session, m: Models, size: Size) -> object:
    return len(session.scalars(sa.select(Reading)).all())


def select_core(session: Session, m: Models, size: Size) -> object:
    return len(session.execute(sa.select(Reading.__table__)).all())


def select_yield_per(session: Session, m: Models, size: Size) -> object:
    n = 0
    for _ in session.scalars(sa.select(Reading).execution_options(yield_per=1000)):
        n += 1
    return n


def get(session: Session, m: Models, size: Size) -> object:
    for key in range(1, size.rows + 1):
        session.get(Reading, key)
    return None


# -- async units ------------------------------------------------------------------------------
AsyncUnit = Callable[[AsyncSession, Models, Size], Awaitable[object]]


async def aadd_all(session: AsyncSession, m: Models, size: Size) -> object:
    session.add_all([Row(name=f"row-{i}", status="queued") for i in range(size.rows)])
    await session.flush()
    return None


async def aadd_all_guarded(session: AsyncSession, m: Models, size: Size) -> object:
    session.add_all([m.new_task(name=f"task-{i}", status="queued") for i in range(size.rows)])
    await session.flush()
    return None


async def aorm_bulk_insert(session: AsyncSession, m: Models, size: Size) -> object:
    await session.execute(sa.insert(Row), _dicts(size))
    return None


async def acore_insert(session: AsyncSession, m: Models, size: Size) -> object:
    await session.execute(CORE_INSERT, [{"n": f"row-{i}", "s": "queued"} for i in range(size.rows)])
    return None


async def aselect_entities(session: AsyncSession, m: Models, size: Size) -> object:
    return len((await session.execute(sa.select(Reading))).all())


async def aselect_scalars(session: AsyncSession, m: Models, size: Size) -> object:
    return len((await session.scalars(sa.select(Reading))).all())


async def aselect_core(session: AsyncSession, m: Models, size: Size) -> object:
    return len((await session.execute(sa.select(Reading.__table__))).all())


async def aselect_yield_per(session: AsyncSession, m: Models, size: Size) -> object:
    n = 0
    stmt = sa.select(Reading).execution_options(yield_per=1000)
    async for _ in await session.stream_scalars(stmt):
        n += 1
    return n


SYNC_MODES = (False, "evaluate", "fetch", "auto")


@dataclass
class Case:
    name: str
    unit: Any  # SyncUnit | AsyncUnit
    #: rows per unit ("rows" or "read_rows")
    per: str
    #: what is put back before each unit, outside what is counted and timed
    reset: str | None = None
    is_async: bool = False
    #: the resilient variant as the drop-in ``Session.begin()`` instead of ``run``
    dropin: bool = False


CASES = [
    Case("add_all", add_all, "rows", "large_rows"),
    Case("add_all_keyed", add_all_keyed, "rows", "large_rows"),
    Case("add_all_guarded", add_all_guarded, "rows", "large_new_tasks"),
    Case("orm_bulk_insert", orm_bulk_insert, "rows", "large_rows"),
    Case("orm_bulk_insert_guarded", orm_bulk_insert_guarded, "rows", "large_new_tasks"),
    Case("core_insert", core_insert, "rows", "large_rows"),
    Case("flush_updates", flush_updates, "rows"),
    *(Case(f"bulk_update_{mode}", _bulk_update(mode), "rows") for mode in SYNC_MODES),
    Case("select_entities", select_entities, "read_rows"),
    Case("select_scalars", select_scalars, "read_rows"),
    Case("select_core", select_core, "read_rows"),
    Case("select_yield_per", select_yield_per, "read_rows"),
    Case("select_yield_per_dropin", select_yield_per, "read_rows", dropin=True),
    Case("get", get, "rows"),
    Case("async_add_all", aadd_all, "rows", "large_rows", is_async=True),
    Case("async_add_all_guarded", aadd_all_guarded, "rows", "large_new_tasks", is_async=True),
    Case("async_orm_bulk_insert", aorm_bulk_insert, "rows", "large_rows", is_async=True),
    Case("async_core_insert", acore_insert, "rows", "large_rows", is_async=True),
    Case("async_select_entities", aselect_entities, "read_rows", is_async=True),
    Case("async_select_scalars", aselect_scalars, "read_rows", is_async=True),
    Case("async_select_core", aselect_core, "read_rows", is_async=True),
    Case("async_select_yield_per", aselect_yield_per, "read_rows", is_async=True),
]
CASE_NAMES = [c.name for c in CASES]


def prepare(engine: sa.Engine, size: Size) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Task), [{"id": i, "status": "queued"} for i in range(1, size.rows + 1)]
        )
        conn.execute(
            sa.insert(Reading),
            [
                {"id": i, "name": f"reading-{i}", "status": "queued"}
                for i in range(1, size.read_rows + 1)
            ],
        )
        conn.execute(sa.text("ANALYZE"))
    State.status = "queued"
    rdb.install_commit_markers(engine)


class Bench:
    """Both variants of every case, on engines of their own."""

    def __init__(self, url: str, size: Size) -> None:
        self.size = size
        self.admin = sa.create_engine(url)
        prepare(self.admin, size)
        self.plain = sessionmaker(sa.create_engine(url))
        self.resilient = rdb.ResilientSession(sa.create_engine(url), service="bench-large")
        async_url = sa.make_url(url).set(drivername="postgresql+asyncpg")
        self.loop = asyncio.new_event_loop()
        self.aplain = async_sessionmaker(create_async_engine(async_url))
        self.aresilient = rdb.AsyncResilientSession(
            create_async_engine(async_url), service="bench-large-async"
        )

    def reset(self, case: Case) -> None:
        if case.reset:
            with self.admin.begin() as conn:
                conn.execute(sa.text(f"TRUNCATE {case.reset} RESTART IDENTITY"))

    def variants(self, case: Case) -> dict[str, Callable[[], object]]:
        size, unit = self.size, case.unit
        if case.is_async:
            aplain, aresilient, loop = self.aplain, self.aresilient, self.loop

            async def aplain_unit() -> object:
                async with aplain.begin() as session:
                    return await unit(session, UNGUARDED, size)

            return {
                "plain": lambda: loop.run_until_complete(aplain_unit()),
                "resilient": lambda: loop.run_until_complete(aresilient.run(unit, GUARDED, size)),
            }
        plain, resilient = self.plain, self.resilient

        def plain_unit() -> object:
            with plain.begin() as session:
                return unit(session, UNGUARDED, size)

        def dropin_unit() -> object:
            with resilient.begin() as session:
                return unit(session, GUARDED, size)

        return {
            "plain": plain_unit,
            "resilient": dropin_unit if case.dropin else lambda: resilient.run(unit, GUARDED, size),
        }

    def close(self) -> None:
        for factory in (self.plain, self.resilient):
            factory.kw["bind"].dispose()
        for afactory in (self.aplain, self.aresilient):
            self.loop.run_until_complete(afactory.kw["bind"].dispose())
        self.loop.close()
        self.admin.dispose()


class Lines(LineCounter):
    """``overhead.LineCounter`` counting lines only (opcode events would make a unit of a
    hundred thousand rows take minutes)."""

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is LineCounter.__exit__.__code__:
            return None
        return self._event

    def __enter__(self) -> Lines:
        self.lines = self.instructions = 0
        self._found = sys.gettrace()  # (put back on leaving, as LineCounter does)
        sys.settrace(self._call)
        return self


class WithoutDriverLines(Lines):
    """``Lines`` without the lines of psycopg's own Python (its frames are not traced): how many
    of them a pipelined ``executemany`` runs depends on when the server's answers arrive (its
    loop polls for results as they come: measured, a flush of 300 changed rows ran 3,934 or
    4,240 lines of psycopg's ``_pipeline_base.py`` from one unit to the next on a busy
    machine), which is the machine's timing, not a row's work; the same driver calls are made
    with resilient_db and without, so a row's cost is counted apart from them."""

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        if _DRIVER_PATH in frame.f_code.co_filename:
            return None
        return super()._call(frame, event, arg)


#: the part of a psycopg module's path that :class:`WithoutDriverLines` leaves uncounted
_DRIVER_PATH = f"{os.sep}psycopg{os.sep}"


class Breakdown(Lines):
    """Lines per (file, function)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_function: collections.Counter[tuple[str, str]] = collections.Counter()

    def _event(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            code = frame.f_code
            name = getattr(code, "co_qualname", code.co_name)
            self.by_function[(os.path.basename(code.co_filename), name)] += 1
            self.lines += 1
        return self._event


def count(
    bench: Bench, case: Case, counter: type[Lines] = Lines, *, rounds: int = 1
) -> dict[str, Lines]:
    """A counted unit per variant, after a warm-up unit each: the fewest lines of ``rounds``
    counted units. The collector is off while a unit is counted: where its passes fall (and
    the finalizers and weak-reference callbacks they run, counted as lines) depends on what
    other threads allocated meanwhile. A unit that also prunes old commit markers (due every
    10 s per engine, so on a slow machine in the middle of a count) counts more: the fewest of
    two leaves it out."""
    out: dict[str, Lines] = {}
    for name, fn in bench.variants(case).items():
        bench.reset(case)
        fn()
        for _ in range(rounds):
            bench.reset(case)
            gc.collect()
            gc.disable()
            try:
                with counter() as lines:
                    fn()
            finally:
                gc.enable()
            if name not in out or lines.lines < out[name].lines:
                out[name] = lines
    return out


def per_row_lines(url: str, names: list[str], small: Size, large: Size) -> dict[str, float]:
    """resilient_db's lines per row in each case of ``names``, without its fixed cost per unit:
    (resilient - plain) counted at two sizes, its growth over the rows between them (psycopg's
    own lines left out: see :class:`WithoutDriverLines`)."""
    extra: dict[str, list[float]] = collections.defaultdict(list)
    cases = [c for c in CASES if c.name in names]
    for size in (small, large):
        bench = Bench(url, size)
        try:
            for case in cases:
                lines = count(bench, case, WithoutDriverLines, rounds=2)
                extra[case.name].append(lines["resilient"].lines - lines["plain"].lines)
        finally:
            bench.close()
    return {
        case.name: (extra[case.name][1] - extra[case.name][0])
        / (getattr(large, case.per) - getattr(small, case.per))
        for case in cases
    }


def timed(bench: Bench, case: Case, rounds: int) -> dict[str, float]:
    """Median wall time (s) of each variant over ``rounds`` interleaved rounds."""
    samples: dict[str, list[float]] = collections.defaultdict(list)
    variants = bench.variants(case)
    for i in range(rounds):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            bench.reset(case)
            gc.collect()
            start = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def run(url: str, *, quick: bool, cases: list[str], rounds: int | None = None) -> dict[str, Any]:
    size = Size(ROWS // 10, READ_ROWS // 10) if quick else Size(ROWS, READ_ROWS)
    rounds = rounds if rounds is not None else (1 if quick else 5)
    bench = Bench(url, size)
    out: dict[str, Any] = {"rows": size.rows, "read_rows": size.read_rows, "cases": {}}
    try:
        for case in CASES:
            if case.name not in cases:
                continue
            rows = getattr(size, case.per)
            lines = count(bench, case)
            row: dict[str, Any] = {
                "rows": rows,
                "plain_lines": lines["plain"].lines,
                "resilient_lines": lines["resilient"].lines,
                "lines_per_row": (lines["resilient"].lines - lines["plain"].lines) / rows,
            }
            if rounds:
                times = timed(bench, case, rounds)
                row["plain_ms"] = times["plain"] * 1e3
                row["resilient_ms"] = times["resilient"] * 1e3
                row["ratio"] = times["resilient"] / times["plain"]
            out["cases"][case.name] = row
            print(f"# {case.name}: {row}", file=sys.stderr, flush=True)
    finally:
        bench.close()
    return out


def breakdown(url: str, case_name: str, *, quick: bool, top: int = 40) -> str:
    size = Size(ROWS // 10, READ_ROWS // 10) if quick else Size(ROWS, READ_ROWS)
    case = next(c for c in CASES if c.name == case_name)
    bench = Bench(url, size)
    try:
        counted = count(bench, case, Breakdown)
    finally:
        bench.close()
    plain = counted["plain"].by_function  # type: ignore[attr-defined]
    resilient = counted["resilient"].by_function  # type: ignore[attr-defined]
    rows = getattr(size, case.per)
    lines = [
        f"{case_name}: plain {sum(plain.values()):,} lines, resilient {sum(resilient.values()):,}"
        f" ({(sum(resilient.values()) - sum(plain.values())) / rows:+.2f} per row of {rows:,})",
        "  diff  plain  resilient  file:function",
    ]
    diffs = sorted(
        ((resilient[k] - plain[k], k) for k in set(plain) | set(resilient)),
        key=lambda d: -abs(d[0]),
    )
    for diff, (file, function) in diffs[:top]:
        if diff:
            lines.append(
                f"{diff:+7d} {plain[(file, function)]:7d} {resilient[(file, function)]:7d}"
                f"  {file}:{function}"
            )
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    out = [
        f"rows per unit: {result['rows']:,} (reads: {result['read_rows']:,})",
        "",
        "| case | plain lines | resilient_db lines | per row | plain | resilient_db | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["cases"].items():
        timed_part = (
            f"{row['plain_ms']:.0f} ms | {row['resilient_ms']:.0f} ms | {row['ratio']:.3f}"
            if "ratio" in row
            else "| |"
        )
        out.append(
            f"| {name} | {row['plain_lines']:,} | {row['resilient_lines']:,} "
            f"| {row['lines_per_row']:+.2f} | {timed_part} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="SQLAlchemy URL (postgresql+psycopg://...) of a server")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows, one round")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (0: count only)")
    parser.add_argument("--cases", help="comma-separated cases (default: all)")
    parser.add_argument("--breakdown", metavar="CASE", help="lines per function of one case")
    args = parser.parse_args(argv)
    cases = args.cases.split(",") if args.cases else CASE_NAMES
    unknown = sorted(set(cases) - set(CASE_NAMES))
    if unknown or (args.breakdown and args.breakdown not in CASE_NAMES):
        parser.error(
            f"unknown case {unknown or args.breakdown}; the cases: {', '.join(CASE_NAMES)}"
        )

    def go(url: str) -> str:
        if args.breakdown:
            return breakdown(url, args.breakdown, quick=args.quick)
        result = run(url, quick=args.quick, cases=cases, rounds=args.rounds)
        return json.dumps(result, indent=2) if args.json else render(result)

    if args.url:
        print(go(args.url))
    else:
        with EmbeddedPostgres() as server:
            server.create_database("bench")
            print(go(server.url("bench")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
