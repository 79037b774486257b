"""A concurrent money-transfer workload under real faults: nothing is lost, nothing is doubled.

Accounts hold a fixed total. Each unit of work (SERIALIZABLE) moves an amount between two
accounts and writes a ledger row carrying its own transfer id; some amounts overdraw and fail on
the balance's CHECK constraint. Workers (threads, or asyncio tasks) run a fixed number of
transfers through the fault proxy while a fault thread kills backends, cuts connections, loses
COMMIT answers, swallows COMMITs (some delivered late, after the client gave up) and crashes and
restarts the server, paced by the workload's progress. Afterwards, from the database:

* the total never changed, and every balance is the initial one plus what the ledger says;
* every transfer reported done is in the ledger exactly once;
* every transfer that raised left nothing;
* a transfer that raised ``CommitOutcomeUnknownError`` is in the ledger once or not at all
  (these are counted, and reported in the test's properties).

Backoff is shrunk by configuration, never slept at full length. Loopback only; bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from faults import Results, ScriptedFaults, workload_config
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.server_control]

ACCOUNTS = 12
INITIAL = 1_000
TOTAL = ACCOUNTS * INITIAL
TRANSFERS = 360
WORKERS = 4
TASKS = 8
#: every fault step waits for this many more transfers to settle (or a timeout)
PACE = 12
STEP_TIMEOUT = 5.0
MARKERS = "markers"
FALLBACK = "fallback"

_services = itertools.count()

#: the longest the workload may go with no transfer settling before it counts as stuck: each
#: unit ends once its deadline leaves no room for another attempt, and the attempt running then
#: waits on nothing longer than a connect (2 s timeout) or a COMMIT the fault thread holds
#: (released within its step). How long the whole workload takes depends on the machine's
#: load (over 60 s in a loaded run of the suite, 10 s alone): no bound on that.
STALLED_AFTER = workload_config().deadline + STEP_TIMEOUT


async def progressing(work: asyncio.Future[Any], results: Results) -> None:
    """Await ``work`` (the workers), failing it if no transfer settled for
    :data:`STALLED_AFTER` seconds: bounded, without guessing how fast a loaded machine runs."""
    seen, since = results.settled, time.monotonic()
    while not work.done():
        await asyncio.wait([work], timeout=0.5)
        if results.settled != seen:
            seen, since = results.settled, time.monotonic()
        elif not work.done() and time.monotonic() - since > STALLED_AFTER:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise AssertionError(
                f"no transfer settled for {STALLED_AFTER:g} s ({seen} settled): stuck"
            )
    await work


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


class Entry(Base):
    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    transfer_id: Mapped[str]  # not unique: a transfer applied twice shows up twice
    src: Mapped[int]
    dst: Mapped[int]
    amount: Mapped[int]


SCHEMA = [
    "ALTER TABLE accounts ADD CONSTRAINT no_overdraft CHECK (balance >= 0)",
    "CREATE INDEX ledger_transfer_id ON ledger (transfer_id)",
    # the same transfer as one function call: a unit whose only write is SELECT transfer(...)
    """CREATE FUNCTION transfer(t text, s int, d int, a int) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE accounts SET balance = balance - a WHERE id = s;
        UPDATE accounts SET balance = balance + a WHERE id = d;
        INSERT INTO ledger (transfer_id, src, dst, amount) VALUES (t, s, d, a);
    END $$""",
]


@dataclasses.dataclass(frozen=True)
class Transfer:
    id: str
    src: int
    dst: int
    amount: int
    via_function: bool


def plan(seed: int) -> list[Transfer]:
    rng = random.Random(seed)
    transfers = []
    for n in range(TRANSFERS):
        src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
        # mostly small; now and then more than any balance is likely to hold (fails the CHECK)
        amount = rng.randint(1, 60) if rng.random() < 0.9 else rng.randint(3 * INITIAL, 4 * INITIAL)
        transfers.append(Transfer(str(uuid.uuid4()), src, dst, amount, via_function=n % 2 == 1))
    return transfers


def transfer_orm(session: Session, t: Transfer) -> str:
    src, dst = session.get(Account, t.src), session.get(Account, t.dst)
    assert src is not None
    assert dst is not None
    src.balance -= t.amount
    dst.balance += t.amount
    session.add(Entry(transfer_id=t.id, src=t.src, dst=t.dst, amount=t.amount))
    return t.id


def transfer_function(session: Session, t: Transfer) -> str:
    session.execute(
        sa.select(sa.func.transfer(t.id, t.src, t.dst, t.amount))  # a SELECT that writes
    )
    return t.id


async def transfer_orm_async(session: AsyncSession, t: Transfer) -> str:
    src, dst = await session.get(Account, t.src), await session.get(Account, t.dst)
    assert src is not None
    assert dst is not None
    src.balance -= t.amount
    dst.balance += t.amount
    session.add(Entry(transfer_id=t.id, src=t.src, dst=t.dst, amount=t.amount))
    return t.id


async def transfer_function_async(session: AsyncSession, t: Transfer) -> str:
    await session.execute(sa.select(sa.func.transfer(t.id, t.src, t.dst, t.amount)))
    return t.id


# -- outcomes ------------------------------------------------------------------------------------
# -- faults --------------------------------------------------------------------------------------
def fault_script(*, late_commits: bool) -> list[str]:
    """The transfers' faults, twice over (a COMMIT delivered late after its unit settled, when
    ``late_commits``)."""
    late: list[str] = ["swallow-late"] if late_commits else []
    return 2 * [
        "kill-backends",
        "lose-answers",
        "cut",
        "swallow",
        "lose-answers",
        "crash-restart",
        "kill-backends",
        *late,
        "lose-answers",
        "cut",
        "swallow",
        "lose-answers",
        *late,
    ]


# -- setup and checks ----------------------------------------------------------------------------
def prepare(url: str, mode: str) -> None:
    engine = sa.create_engine(url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            for statement in SCHEMA:
                conn.execute(sa.text(statement))
            conn.execute(
                sa.insert(Account), [{"id": n, "balance": INITIAL} for n in range(1, ACCOUNTS + 1)]
            )
        if mode == MARKERS:
            rdb.install_commit_markers(engine)
    finally:
        engine.dispose()


def check(
    bank: Bank,
    transfers: list[Transfer],
    results: Results,
    faults: ScriptedFaults,
    record_property: Callable[[str, object], None],
) -> None:
    server, database = bank.server, bank.database
    assert faults.error is None, faults.error
    assert not faults.is_alive()
    assert faults.injected.keys() == set(faults.script), f"not every fault ran: {faults.injected}"
    assert results.settled == len(transfers)

    balances = dict(server.execute("SELECT id, balance FROM accounts", database=database))
    assert sum(balances.values()) == TOTAL, "money was created or destroyed"
    rows = server.execute(
        "SELECT transfer_id, src, dst, amount FROM ledger ORDER BY id", database=database
    )
    counts = collections.Counter(row[0] for row in rows)
    by_id = {t.id: t for t in transfers}
    assert set(counts) <= set(by_id), "ledger rows of transfers nobody ran"
    doubled = {tid: n for tid, n in counts.items() if n > 1}
    assert not doubled, f"transfers applied more than once: {doubled}"

    expected = dict.fromkeys(range(1, ACCOUNTS + 1), INITIAL)
    for tid, src, dst, amount in rows:
        t = by_id[tid]
        assert (src, dst, amount) == (t.src, t.dst, t.amount)
        expected[src] -= amount
        expected[dst] += amount
    assert balances == expected, "balances disagree with the ledger"

    missing = [tid for tid in results.done if counts[tid] != 1]
    assert not missing, f"{len(missing)} transfers reported done are not in the ledger"
    leftovers = {tid: repr(exc) for tid, exc in results.failed.items() if counts[tid]}
    assert not leftovers, f"failed transfers left ledger rows: {leftovers}"
    unknown_applied = sum(1 for tid in results.unknown if counts[tid] == 1)

    errors = collections.Counter(type(exc).__name__ for exc in results.failed.values())
    overdrafts = sum(
        1 for exc in results.failed.values() if rdb.sqlstate_of(exc) == "23514"
    )  # the CHECK constraint: business failures, never retried
    counters = rdb.health()["services"][bank.service]["counters"]
    record_property("counters", counters)
    record_property("done", len(results.done))
    record_property("failed", dict(errors))
    record_property("unknown", len(results.unknown))
    record_property("unknown_applied", unknown_applied)
    record_property("faults", dict(faults.injected))
    print(  # visible with -s / -rA
        f"transfers: {len(results.done)} done, {len(results.failed)} failed {dict(errors)} "
        f"({overdrafts} overdrafts), {len(results.unknown)} unknown ({unknown_applied} applied); "
        f"faults {dict(faults.injected)}; answers lost {bank.proxy.commits_lost}, commits "
        f"swallowed {bank.proxy.commits_swallowed}; counters {counters}"
    )
    assert overdrafts >= 1, "the workload should include overdrafts"
    # the faults did hit units
    assert bank.proxy.commits_lost >= 1
    assert bank.proxy.commits_swallowed >= 1
    assert counters["retries_by_class"].get("disconnect", 0) >= 1, counters
    # the faults are survivable: nearly everything that did not overdraw got done
    assert len(results.done) >= (len(transfers) - overdrafts) * 0.8, (errors, results.unknown)


@pytest.fixture(params=[MARKERS, FALLBACK])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclasses.dataclass
class Bank:
    server: PostgresServer
    database: str
    proxy: FaultProxy
    service: str

    def faults(self, results: Results, finished: threading.Event, *, late: bool) -> ScriptedFaults:
        return ScriptedFaults(
            self.server,
            self.proxy,
            self.database,
            script=fault_script(late_commits=late),
            settled=lambda: results.settled,
            finished=finished,
            pace=PACE,
            step_timeout=STEP_TIMEOUT,
            name="transfer-faults",
        )


@pytest.fixture
def bank(pg_server: PostgresServer, pg_database: str, fault_proxy: FaultProxy) -> Iterator[Bank]:
    yield Bank(pg_server, pg_database, fault_proxy, f"transfers-{next(_services)}")
    fault_proxy.restore()


# -- the workloads -------------------------------------------------------------------------------
def test_concurrent_transfers_under_faults(
    bank: Bank, mode: str, record_property: Callable[[str, object], None]
) -> None:
    prepare(bank.server.url(bank.database), mode)
    engine = sa.create_engine(
        bank.proxy.url(bank.database),
        isolation_level="SERIALIZABLE",
        connect_args={"connect_timeout": 2},
        pool_size=WORKERS + 2,
    )
    Session = rdb.ResilientSession(engine, service=bank.service, config=workload_config())
    transfers = plan(seed=8)
    todo = collections.deque(transfers)
    todo_lock = threading.Lock()
    results = Results()
    finished = threading.Event()
    faults = bank.faults(results, finished, late=True)

    def worker() -> None:
        while True:
            with todo_lock:
                if not todo:
                    return
                t = todo.popleft()
            fn = transfer_function if t.via_function else transfer_orm
            try:
                Session.run(fn, t)
            except Exception as exc:
                results.record(t.id, exc)
            else:
                results.record(t.id, None)

    with rdb.set_testing(False):
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(WORKERS)]
        began = time.monotonic()
        faults.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        finished.set()
        faults.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "workers did not finish"
    record_property("seconds", round(time.monotonic() - began, 1))
    engine.dispose()
    check(bank, transfers, results, faults, record_property)


@pytest.mark.asyncio
async def test_concurrent_transfers_under_faults_async(
    bank: Bank, record_property: Callable[[str, object], None]
) -> None:
    prepare(bank.server.url(bank.database), MARKERS)
    engine = create_async_engine(
        bank.proxy.url(bank.database, driver="asyncpg"),
        isolation_level="SERIALIZABLE",
        connect_args={"timeout": 2},
        pool_size=TASKS + 2,
    )
    Session = rdb.AsyncResilientSession(engine, service=bank.service, config=workload_config())
    transfers = plan(seed=9)
    todo = collections.deque(transfers)
    results = Results()
    finished = threading.Event()
    faults = bank.faults(results, finished, late=True)

    async def worker() -> None:
        while todo:
            t = todo.popleft()
            fn: Any = transfer_function_async if t.via_function else transfer_orm_async
            try:
                await Session.run(fn, t)
            except Exception as exc:
                results.record(t.id, exc)
            else:
                results.record(t.id, None)

    try:
        with rdb.set_testing(False):
            began = time.monotonic()
            faults.start()
            await progressing(asyncio.gather(*(worker() for _ in range(TASKS))), results)
            finished.set()
            await asyncio.to_thread(faults.join, 30)
        record_property("seconds", round(time.monotonic() - began, 1))
    finally:
        finished.set()
        await engine.dispose()
    check(bank, transfers, results, faults, record_property)
