"""Guarded status moves from a concurrent workload under real faults: no illegal move ever
reaches the table, nothing is lost, nothing is doubled.

Jobs move through a state machine with two terminal-looking states that lead on (so the
workload never runs dry). Each unit of work (SERIALIZABLE, commit markers installed) moves
jobs by one of the three paths a status changes by, legally or not: the ORM flush (a row loaded
and its status set: the flush guard), an ORM bulk ``update(Job)`` (the bulk-UPDATE guard's
filter) and raw SQL (the database trigger alone); each writes a row of its own into ``moves``.
A trigger of the test's own writes every change of ``jobs.status`` to ``job_audit`` with the
unit that made it. Workers (threads, or asyncio tasks on either async driver) run a fixed
plan through the fault proxy while a fault thread kills backends, cuts connections, loses and
swallows COMMITs (one delivered late) and crashes and restarts the server, paced by the
workload's progress. Afterwards, from the database:

* every audited move is legal, each job's history is one chain ending at its status;
* a unit reported done wrote its ``moves`` row once (a flush move: one audited change);
* a unit that raised left nothing; one that raised ``CommitOutcomeUnknownError`` left its
  ``moves`` row once or not at all, and audited changes only with it;
* health() counted one attempt per call of the unit's function, one recovery per unit done
  after a retry.

test_transfers.py runs the same faults on money transfers (no guard). Loopback; bounded; no
sleep for backoff (a small real backoff rides out the restart).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from faults import Results, ScriptedFaults, workload_config
from scenarios import ASYNC_DRIVERS, async_connect_args
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.server_control]

JOBS = 10
UNITS = 240
WORKERS = 4
TASKS = 6
#: every fault step waits for this many more units to settle (or a timeout)
PACE = 12
STEP_TIMEOUT = 5.0

RULES = {
    "pending": {"in_progress", "cancelled"},
    "in_progress": {"completed", "failed"},
    "failed": {"pending"},
    "completed": {"archived"},
    "cancelled": {"archived"},
    "archived": {"pending"},
}
STATES = sorted(RULES)

_services = itertools.count()


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    __transitions__ = rdb.TransitionRules(column="status", transitions=RULES, initial={"pending"})
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    status: Mapped[str]


class Move(Base):
    __tablename__ = "moves"
    id: Mapped[int] = mapped_column(primary_key=True)
    unit: Mapped[str]  # not unique: a unit applied twice shows up twice
    job_id: Mapped[int]
    target: Mapped[str]


AUDIT = [
    "CREATE TABLE job_audit (id bigserial PRIMARY KEY, job_id int, old text, new text, unit text)",
    """CREATE FUNCTION job_audit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_audit (job_id, old, new, unit) VALUES (NEW.id,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END, NEW.status,
            current_setting('test.unit', true));
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER job_audit AFTER INSERT OR UPDATE OF status ON jobs FOR EACH ROW "
    "EXECUTE FUNCTION job_audit()",
]
#: the unit's key, for the audit trigger (bound to the transaction)
MARK = sa.text("SELECT set_config('test.unit', :u, true)")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One planned move: ``path`` "flush" (``legal``: a legal target of the loaded state, or
    an illegal one), "bulk" (``jobs`` to ``target``) or "raw" (``jobs[0]`` to ``target``)."""

    id: str
    path: str
    jobs: tuple[int, ...]
    target: str
    legal: bool
    seed: int


def plan(seed: int) -> list[Unit]:
    rng = random.Random(seed)
    units = []
    for _ in range(UNITS):
        r = rng.random()
        path = "flush" if r < 0.6 else "bulk" if r < 0.8 else "raw"
        count = rng.randint(2, 4) if path == "bulk" else 1
        jobs = tuple(rng.sample(range(1, JOBS + 1), count))
        units.append(
            Unit(
                str(uuid.uuid4()),
                path,
                jobs,
                rng.choice(STATES),
                rng.random() < 0.75,
                rng.randrange(1 << 30),
            )
        )
    return units


def flush_target(unit: Unit, current: str) -> str:
    rng = random.Random(unit.seed)
    if unit.legal:
        return rng.choice(sorted(RULES[current]))
    return rng.choice([s for s in STATES if s != current and s not in RULES[current]])


def bulk_update(unit: Unit) -> Any:
    return sa.update(Job).where(Job.id.in_(unit.jobs)).values(status=unit.target)


RAW_UPDATE = sa.text("UPDATE jobs SET status = :t WHERE id = :j")


def move(session: Session, unit: Unit) -> None:
    session.execute(MARK, {"u": unit.id})
    if unit.path == "flush":
        job = session.get(Job, unit.jobs[0])
        assert job is not None
        job.status = target = flush_target(unit, job.status)
        session.add(Move(unit=unit.id, job_id=job.id, target=target))
        return
    if unit.path == "bulk":
        session.execute(bulk_update(unit))
    else:
        session.execute(RAW_UPDATE, {"t": unit.target, "j": unit.jobs[0]})
    session.add(Move(unit=unit.id, job_id=unit.jobs[0], target=unit.target))


async def move_async(session: AsyncSession, unit: Unit) -> None:
    await session.execute(MARK, {"u": unit.id})
    if unit.path == "flush":
        job = await session.get(Job, unit.jobs[0])
        assert job is not None
        job.status = target = flush_target(unit, job.status)
        session.add(Move(unit=unit.id, job_id=job.id, target=target))
        return
    if unit.path == "bulk":
        await session.execute(bulk_update(unit))
    else:
        await session.execute(RAW_UPDATE, {"t": unit.target, "j": unit.jobs[0]})
    session.add(Move(unit=unit.id, job_id=unit.jobs[0], target=unit.target))


# -- outcomes ------------------------------------------------------------------------------------
#: the faults, in order
FAULT_SCRIPT = (
    "kill-backends",
    "lose-answers",
    "cut",
    "swallow",
    "crash-restart",
    "lose-answers",
    "swallow-late",
    "kill-backends",
    "lose-answers",
    "cut",
    "swallow",
    "lose-answers",
)


def faults_for(board: Board, results: Results, finished: threading.Event) -> ScriptedFaults:
    return ScriptedFaults(
        board.server,
        board.proxy,
        board.database,
        script=FAULT_SCRIPT,
        settled=lambda: results.settled,
        finished=finished,
        pace=PACE,
        step_timeout=STEP_TIMEOUT,
        name="guard-faults",
    )


# -- setup and checks ----------------------------------------------------------------------------
def prepare(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            for statement in AUDIT:
                conn.exec_driver_sql(statement)
        rdb.install_transition_trigger(engine, Job)
        with engine.begin() as conn:
            conn.execute(
                sa.insert(Job), [{"id": n, "status": "pending"} for n in range(1, JOBS + 1)]
            )
        rdb.install_commit_markers(engine)
    finally:
        engine.dispose()


@dataclasses.dataclass
class Board:
    server: PostgresServer
    database: str
    proxy: FaultProxy
    service: str


@pytest.fixture
def board(pg_server: PostgresServer, pg_database: str, fault_proxy: FaultProxy) -> Iterator[Board]:
    prepare(pg_server.url(pg_database))
    yield Board(pg_server, pg_database, fault_proxy, f"guard-faults-{next(_services)}")
    fault_proxy.restore()


def check(
    board: Board,
    units: list[Unit],
    results: Results,
    faults: ScriptedFaults,
    record_property: Callable[[str, object], None],
) -> None:
    server, database = board.server, board.database
    assert faults.error is None, faults.error
    assert not faults.is_alive()
    assert faults.injected.keys() == set(FAULT_SCRIPT), f"not every fault ran: {faults.injected}"
    assert results.settled == len(units)

    audit = server.execute(
        "SELECT job_id, old, new, unit FROM job_audit ORDER BY id", database=database
    )
    last: dict[int, str] = {}
    for job, old, new, _unit in audit:
        if old is None:
            assert new == "pending", f"job {job} inserted as {new}"
        else:
            assert last[job] == old, f"job {job}'s history breaks: {last[job]}, then {old}->{new}"
            # (a move to the state the row holds changes nothing)
            assert new == old or new in RULES[old], f"illegal move reached the table: {old}->{new}"
        last[job] = new
    statuses = dict(server.execute("SELECT id, status FROM jobs", database=database))
    assert statuses == last, "statuses disagree with their history"

    moves = collections.Counter(
        row[0] for row in server.execute("SELECT unit FROM moves", database=database)
    )
    audited = collections.Counter(row[3] for row in audit if row[1] not in (None, row[2]))
    by_id = {u.id: u for u in units}
    assert set(moves) <= set(by_id), "moves of units nobody ran"
    doubled = {uid: n for uid, n in moves.items() if n > 1}
    assert not doubled, f"units applied more than once: {doubled}"
    missing = [uid for uid in results.done if moves[uid] != 1]
    assert not missing, f"{len(missing)} units reported done left no move"
    flush_done = [uid for uid in results.done if by_id[uid].path == "flush"]
    assert all(audited[uid] == 1 for uid in flush_done), "a flush move not audited once"
    leftovers = {uid: repr(exc) for uid, exc in results.failed.items() if moves[uid]}
    assert not leftovers, f"units that raised left moves: {leftovers}"
    orphans = [uid for uid in audited if uid not in moves]
    assert not orphans, f"audited changes of units that left no move: {orphans}"

    illegal = [e for e in results.failed.values() if isinstance(e, rdb.IllegalTransitionError)]
    vias = collections.Counter(e.via for e in illegal)
    others = {
        uid: repr(exc)
        for uid, exc in results.failed.items()
        if not isinstance(exc, rdb.IllegalTransitionError)
    }
    counters = rdb.health()["services"][board.service]["counters"]
    record_property("counters", counters)
    record_property("done", len(results.done))
    record_property("blocked", dict(vias))
    record_property("unknown", len(results.unknown))
    record_property("faults", dict(faults.injected))
    print(  # visible with -s / -rA
        f"moves: {len(results.done)} done, {len(illegal)} blocked {dict(vias)}, other failures "
        f"{others}, {len(results.unknown)} unknown; faults {dict(faults.injected)}; answers "
        f"lost {board.proxy.commits_lost}, commits swallowed {board.proxy.commits_swallowed}; "
        f"counters {counters}"
    )
    # the guard refused by the flush and by the trigger; the bulk filter left rows unchanged
    assert vias["flush"] >= 1
    assert vias["db"] >= 1
    assert rdb.health()["transitions"]["bulk_rows_filtered"] >= 1
    # the faults hit units, and were survived: only illegal moves failed (the retries suffice)
    assert board.proxy.commits_lost >= 1
    assert board.proxy.commits_swallowed >= 1
    assert counters["retries_by_class"].get("disconnect", 0) >= 1, counters
    assert not others, others
    # health() agrees with what the units saw
    assert counters["attempts"] == sum(results.calls.values())
    assert counters["recovered"] == sum(1 for uid in results.done if results.calls[uid] > 1)
    assert counters["unknown_commits"] == len(results.unknown)


def test_guarded_moves_under_faults(
    board: Board, record_property: Callable[[str, object], None]
) -> None:
    engine = sa.create_engine(
        board.proxy.url(board.database),
        isolation_level="SERIALIZABLE",
        connect_args={"connect_timeout": 2},
        pool_size=WORKERS + 2,
    )
    Sessions = rdb.ResilientSession(engine, service=board.service, config=workload_config())
    units = plan(seed=21)
    todo = collections.deque(units)
    todo_lock = threading.Lock()
    results = Results()
    finished = threading.Event()
    faults = faults_for(board, results, finished)

    def counted(session: Session, unit: Unit) -> None:
        with results.lock:
            results.calls[unit.id] += 1
        move(session, unit)

    def worker() -> None:
        while True:
            with todo_lock:
                if not todo:
                    return
                unit = todo.popleft()
            try:
                Sessions.run(counted, unit)
            except Exception as exc:
                results.record(unit.id, exc)
            else:
                results.record(unit.id, None)

    with rdb.set_testing(False):
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(WORKERS)]
        faults.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        finished.set()
        faults.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "workers did not finish"
    engine.dispose()
    check(board, units, results, faults, record_property)


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_guarded_moves_under_faults_async(
    board: Board, driver: str, record_property: Callable[[str, object], None]
) -> None:
    engine = create_async_engine(
        board.proxy.url(board.database, driver=driver),
        isolation_level="SERIALIZABLE",
        connect_args=async_connect_args(driver, 2),
        pool_size=TASKS + 2,
    )
    Sessions = rdb.AsyncResilientSession(engine, service=board.service, config=workload_config())
    units = plan(seed=22)
    todo = collections.deque(units)
    results = Results()
    finished = threading.Event()
    faults = faults_for(board, results, finished)

    async def counted(session: AsyncSession, unit: Unit) -> None:
        results.calls[unit.id] += 1
        await move_async(session, unit)

    async def worker() -> None:
        while todo:
            unit = todo.popleft()
            try:
                await Sessions.run(counted, unit)
            except Exception as exc:
                results.record(unit.id, exc)
            else:
                results.record(unit.id, None)

    try:
        with rdb.set_testing(False):
            faults.start()
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(TASKS))), 60)
            finished.set()
            await asyncio.to_thread(faults.join, 30)
    finally:
        finished.set()
        await engine.dispose()
    check(board, units, results, faults, record_property)
