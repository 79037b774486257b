"""The demo's workload: units of work on the example ``tasks`` schema, run by workers through
:class:`~resilient_db.AsyncResilientSession` units of work, and the ledger of what the workload
believes happened (:class:`Ledger`, checked against the database at the end by ``_verify``).

``_workload_async`` is the one source of both workloads: ``resilient-db demo --async`` runs its
workers as tasks of an event loop, and ``_workload`` (the workers as threads) is generated from
it by ``scripts/async_to_sync.py``; the few places that differ are marked. Edit
``_workload_async``, then run the script.

Every unit has an idempotency key. A unit that writes records each change as a ``task_history``
row keyed by the unit's key (a unit that moves two tasks writes ``key/0`` and ``key/1``), so
after the run every unit is either in the database exactly once or not at all.

How a worker runs a unit (:meth:`Runner.run`):

* ``CircuitOpenError``: wait ``retry_after`` and run the unit again with the same key;
* ``CommitOutcomeUnknownError``: ask the database whether the unit's rows exist (by key); if
  they do the unit is done, if not it is run again with the same key;
* a transient error after the retries ran out: back off and run it again with the same key;
* ``IllegalTransitionError``: the unit was blocked (expected for the deliberate illegal ones);
* anything else: the unit failed (and must have left no write).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession

import resilient_db as rdb
from resilient_db.examples.tasks import (
    TERMINAL_STATUSES,
    Task,
    TaskHistory,
    create_task,
    move_task,
)

from ._ledger import Change, Ledger

if True:  # async only
    from resilient_db._internals import asyncpg_address

    # the tasks of the process's event loop, seen as threads are (see _loop)
    from ._loop import Barrier, flag_wait
    from ._loop import LoopTask as Thread
else:  # sync only
    from threading import Barrier, Thread

    def flag_wait(flag: threading.Event, seconds: float) -> bool:
        return flag.wait(max(0.0, seconds))


__all__ = [
    "AckRunner",
    "Change",
    "ContentionPair",
    "IllegalAttempts",
    "Ledger",
    "Runner",
    "Unit",
    "Worker",
    "setup_hot_rows",
    "wait_until",
]

#: ``owner`` of the rows the deadlock and serialization pairs fight over.
HOT_DEADLOCK = "hot-deadlock"
HOT_SERIAL = "hot-serial"
SABOTEUR = "saboteur"
#: in-progress tasks a worker may hold at once (checked at SERIALIZABLE: a write-skew guard)
WIP_LIMIT = 3
_BARRIER_TIMEOUT = 3.0


UnitFn = Callable[[AsyncSession], Awaitable[list[Change]]]


@dataclass(frozen=True)
class Unit:
    """A unit of work: ``await fn(session)`` returns the changes it made (possibly none).

    ``potential`` lists every history key the unit may write: after an unknown COMMIT outcome
    they are looked up, and for a unit that failed none of them may exist.
    """

    key: str
    kind: str
    fn: UnitFn
    potential: tuple[str, ...]
    illegal_via: str | None = None  # set for the deliberate illegal transitions


class Runner:
    """Runs units through an :class:`~resilient_db.AsyncResilientSession`, handling what it
    raises.

    ``hard_stop`` ends waiting (the drain deadline passed); until then a unit is tried again
    after an open circuit or exhausted retries, always with the same key.
    """

    def __init__(
        self, factory: rdb.AsyncResilientSession[Any], ledger: Ledger, hard_stop: threading.Event
    ) -> None:
        self.factory = factory
        self.ledger = ledger
        self.hard_stop = hard_stop

    async def run(self, unit: Unit) -> list[Change] | None:
        """Run ``unit`` to an end; the changes it made, or None if it failed or was blocked."""
        gave_up = 0
        while True:
            try:
                changes = await self.factory.run(unit.fn)
            except rdb.CircuitOpenError as exc:
                self.ledger.count("circuit_open_waits")
                if await self._wait(exc.retry_after + random.uniform(0.0, 0.1)):
                    continue
                self.ledger.record_failed(unit, "circuit open at the drain deadline")
                return None
            except rdb.CommitOutcomeUnknownError:
                self.ledger.count("commit_outcome_unknown")
                found = await self.lookup(unit)
                if found is None:
                    self.ledger.record_unresolved(unit)
                    return None
                if found:
                    self.ledger.count("unknown_outcome_was_committed")
                    self.ledger.record_done(unit, found)
                    return found
                self.ledger.count("unknown_outcome_was_rolled_back")
                continue  # not committed: run it again, same key
            except rdb.IllegalTransitionError as exc:
                if unit.illegal_via is None:
                    self.ledger.record_failed(unit, f"illegal transition ({exc.via})")
                else:
                    self.ledger.record_blocked(unit, exc.via)
                return None
            except Exception as exc:
                if rdb.is_transient(exc):
                    gave_up += 1
                    self.ledger.count("units_resumed_after_giving_up")
                    if await self._wait(min(1.0, 0.1 * gave_up) + random.uniform(0.0, 0.1)):
                        continue
                elif not isinstance(exc, (sa_exc.SQLAlchemyError, rdb.ResilientDBError)):
                    raise  # a bug in the demo itself, not a database outcome: reported as such
                # the only unique keys a unit writes are its idempotency keys (tasks and
                # task_history): a unique violation is the unit writing a second time
                duplicate = rdb.sqlstate_of(exc) == "23505"
                self.ledger.record_failed(unit, _reason(exc), duplicate=duplicate)
                return None
            self.ledger.record_done(unit, changes)
            return changes

    async def lookup(self, unit: Unit) -> list[Change] | None:
        """The unit's rows in the database (found by key), ``[]`` if none; None if the database
        could not be asked before the drain deadline."""

        async def find(session: AsyncSession) -> list[Change]:
            result = await session.execute(
                sa.select(TaskHistory.idem_key, TaskHistory.task_id, TaskHistory.to_status)
                .where(TaskHistory.idem_key.in_(unit.potential))
                .order_by(TaskHistory.id)
            )
            rows = result.all()
            return [Change(r.idem_key, r.task_id, r.to_status) for r in rows]

        while True:
            try:
                return await self.factory.run(find)
            except rdb.CircuitOpenError as exc:
                if not await self._wait(exc.retry_after + random.uniform(0.0, 0.1)):
                    return None
            except Exception as exc:
                if not rdb.is_transient(exc) or not await self._wait(0.2):
                    return None

    async def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the drain deadline passes first (then False)."""
        if self.hard_stop.is_set():
            return False
        return not await flag_wait(self.hard_stop, seconds)

    def contend(self, kind: str, rows: tuple[int, int], key: str) -> ContentionPair:
        """Start a :class:`ContentionPair` of ``kind`` on ``rows`` (called by the fault
        schedule, from its own thread)."""
        return ContentionPair(self, kind, rows, key).start()


class AckRunner(Runner):
    """A :class:`Runner` that also notes, per server port, the first and last time a write was
    acknowledged and how many were: after a failover, the first write acknowledged on the new
    primary ends the write-availability gap (``--ha``'s worker processes run their units
    through it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, list[float]] = {}  # port -> [first, last, count]
        self._acks_lock = threading.Lock()

    async def run(self, unit: Unit) -> list[Change] | None:
        where: list[int] = []

        async def noted(session: AsyncSession) -> list[Change]:
            changes = await unit.fn(session)
            if changes:
                port = await _server_port(session)
                where[:] = [port] if port is not None else []
            return changes

        changes = await super().run(dataclasses.replace(unit, fn=noted))
        if changes and where:
            now = time.time()
            with self._acks_lock:
                entry = self._acks.setdefault(where[0], [now, now, 0])
                entry[1] = now
                entry[2] += 1
        return changes

    def acks(self) -> dict[str, list[float]]:
        with self._acks_lock:
            return {str(port): list(entry) for port, entry in self._acks.items()}


async def _server_port(session: AsyncSession) -> int | None:
    """The port of the server (or proxy) the session's connection went to, as the driver
    reports it for a multi-host URL (the host that answered): no round trip."""
    connection = await session.connection()
    if True:  # async only
        # asyncpg has no public accessor for it (see asyncpg_address)
        raw = await connection.get_raw_connection()
        address = asyncpg_address(raw.driver_connection)
        port = address[1] if isinstance(address, tuple) else None
    else:  # sync only
        # psycopg's ConnectionInfo.port
        driver_connection = connection.connection.driver_connection
        port = getattr(getattr(driver_connection, "info", None), "port", None)
    return int(port) if port is not None else None


def _reason(exc: BaseException) -> str:
    code = rdb.sqlstate_of(exc)
    return f"{type(exc).__name__} (SQLSTATE {code})" if code else type(exc).__name__


# -- the units ----------------------------------------------------------------------------------
def create_unit(key: str, owner: str) -> Unit:
    async def fn(session: AsyncSession) -> list[Change]:
        task = create_task(session.sync_session, title=f"task {key}", idem_key=key, owner=owner)
        await session.flush()
        return [Change(key, task.id, task.status)]

    return Unit(key, "create", fn, (key,))


# Forward progress is likelier than going back, so tasks finish and new ones are made.
_WEIGHTS = {"in_progress": 5, "completed": 4, "failed": 1, "pending": 2, "cancelled": 1}


def advance_unit(key: str, task_id: int, rng: random.Random) -> Unit:
    # drawn once for the unit, not at each attempt: the worker's generator moves on by as much
    # however often a fault has the unit run again, so a --seed gives the same choices
    seed = rng.random()

    async def fn(session: AsyncSession) -> list[Change]:
        task = await session.get(Task, task_id, with_for_update=True)
        if task is None or task.status in TERMINAL_STATUSES:
            return []
        options = sorted(rdb.allowed_transitions(task))
        weights = [_WEIGHTS.get(s, 1) for s in options]
        target = random.Random(seed).choices(options, weights=weights)[0]
        move_task(session.sync_session, task, target, idem_key=key)
        await session.flush()
        return [Change(key, task_id, target)]

    return Unit(key, "advance", fn, (key,))


def claim_unit(key: str, task_id: int, owner: str) -> Unit:
    """Start a pending task if the owner has fewer than WIP_LIMIT in progress: a read-then-write
    rule that only SERIALIZABLE keeps true under concurrency (conflicts retry as 40001)."""

    async def fn(session: AsyncSession) -> list[Change]:
        await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        busy = await session.scalar(
            sa.select(sa.func.count())
            .select_from(Task)
            .where(Task.owner == owner, Task.status == "in_progress")
        )
        task = await session.get(Task, task_id)
        if task is None or task.status != "pending" or (busy or 0) >= WIP_LIMIT:
            return []
        move_task(session.sync_session, task, "in_progress", idem_key=key)
        await session.flush()
        return [Change(key, task_id, "in_progress")]

    return Unit(key, "claim", fn, (key,))


def _toggle(status: str) -> str:
    return "in_progress" if status == "pending" else "pending"


def deadlock_unit(key: str, order: tuple[int, int], barrier: Barrier) -> Unit:
    """Lock and move two shared tasks in the given order; on the first attempt wait for the
    partner (who locks them in the opposite order) between the two: a real deadlock."""
    attempts = [0]

    async def fn(session: AsyncSession) -> list[Change]:
        attempts[0] += 1
        changes: list[Change] = []
        for n, task_id in enumerate(order):
            task = await session.get(Task, task_id, with_for_update=True, populate_existing=True)
            if task is None:
                return changes
            hkey = f"{key}/{n}"
            target = _toggle(task.status)
            move_task(session.sync_session, task, target, idem_key=hkey)
            await session.flush()
            changes.append(Change(hkey, task_id, target))
            if n == 0 and attempts[0] == 1:
                await _meet(barrier)
        return changes

    return Unit(key, "deadlock-pair", fn, (f"{key}/0", f"{key}/1"))


def serial_unit(key: str, mine: int, barrier: Barrier) -> Unit:
    """At SERIALIZABLE: read the shared rows, wait for the partner who read them too, then each
    moves its own row. Each wrote what the other read: one of them gets 40001."""
    attempts = [0]

    async def fn(session: AsyncSession) -> list[Change]:
        attempts[0] += 1
        await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        await session.scalar(
            sa.select(sa.func.count())
            .select_from(Task)
            .where(Task.owner == HOT_SERIAL, Task.status == "in_progress")
        )
        if attempts[0] == 1:
            await _meet(barrier)
        task = await session.get(Task, mine)
        if task is None:
            return []
        target = _toggle(task.status)
        move_task(session.sync_session, task, target, idem_key=key)
        await session.flush()
        return [Change(key, mine, target)]

    return Unit(key, "serializable-pair", fn, (key,))


async def _meet(barrier: Barrier) -> None:
    # a broken barrier: the partner failed before getting here (another fault); no conflict
    with contextlib.suppress(threading.BrokenBarrierError):
        await barrier.wait()


class ContentionPair:
    """Two contending units, side by side. ``kind`` is ``"deadlock"`` (same two rows, opposite
    lock order) or ``"serialization"`` (SERIALIZABLE write skew). Started, waited for and
    joined from the fault schedule's thread."""

    def __init__(self, runner: Runner, kind: str, rows: tuple[int, int], key: str) -> None:
        self.met = threading.Event()
        self.barrier = Barrier(2, action=self.met.set, timeout=_BARRIER_TIMEOUT)
        if kind == "deadlock":
            units = [
                deadlock_unit(f"{key}a", (rows[0], rows[1]), self.barrier),
                deadlock_unit(f"{key}b", (rows[1], rows[0]), self.barrier),
            ]
        else:
            units = [
                serial_unit(f"{key}a", rows[0], self.barrier),
                serial_unit(f"{key}b", rows[1], self.barrier),
            ]
        self.errors: list[BaseException] = []

        async def go(n: int) -> None:
            try:
                await runner.run(units[n])
            except BaseException as exc:  # re-raised by join()
                self.errors.append(exc)

        self.threads = [
            Thread(target=go, args=(n,), name=f"demo-{kind}-{n}", daemon=True) for n in (0, 1)
        ]

    def start(self) -> ContentionPair:
        for t in self.threads:
            t.start()
        return self

    def wait_met(self, timeout: float) -> bool:
        """Whether both units met at the barrier (their conflict is under way), waiting no longer
        than that: not until the units end. The loser's retries can take the rest of a run
        where many workers contend (a SERIALIZABLE retry conflicts with their SERIALIZABLE
        claims again and again), and a fault schedule waiting for them injected nothing else."""
        wait_until(
            lambda: (
                self.met.is_set()
                or self.barrier.broken
                or not any(t.is_alive() for t in self.threads)
            ),
            timeout,
        )
        return self.met.is_set()

    def join(self) -> None:
        """Wait for both units to end; re-raise what one raised (a bug in the demo)."""
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]


# -- workers ------------------------------------------------------------------------------------
class Worker(Thread):
    """Creates tasks and moves them through their states until ``stop`` is set."""

    ACTIVE_TASKS = 4

    def __init__(
        self, n: int, runner: Runner, stop: threading.Event, *, seed: int, think: float
    ) -> None:
        super().__init__(name=f"demo-worker-{n}", daemon=True)
        self.owner = f"w{n}"
        self.runner = runner
        self.stop = stop
        self.rng = random.Random(seed)
        self.think = think
        self.active: dict[int, str] = {}
        self.error: BaseException | None = None

    async def run(self) -> None:
        seq = 0
        try:
            while not self.stop.is_set():
                seq += 1
                changes = await self.runner.run(self._next_unit(f"{self.owner}-{seq}"))
                for change in changes or ():
                    if change.status in TERMINAL_STATUSES:
                        self.active.pop(change.task_id, None)
                    else:
                        self.active[change.task_id] = change.status
                if self.think:
                    await flag_wait(self.stop, self.rng.uniform(0.5, 1.5) * self.think)
        except BaseException as exc:  # reported by the demo; a worker must not die silently
            self.error = exc
            if True:  # async only
                if isinstance(exc, asyncio.CancelledError):
                    raise  # the loop ends (the demo's end): the task ends as cancelled

    def _next_unit(self, key: str) -> Unit:
        rng = self.rng
        if len(self.active) < self.ACTIVE_TASKS or rng.random() < 0.1:
            return create_unit(key, self.owner)
        task_id = rng.choice(sorted(self.active))
        if self.active[task_id] == "pending" and rng.random() < 0.5:
            return claim_unit(key, task_id, self.owner)
        return advance_unit(key, task_id, rng)


# -- deliberate illegal transitions -------------------------------------------------------------
class IllegalAttempts:
    """Tries illegal status changes by every path; each must be blocked.

    ``flush``: an ORM object moved pending -> completed; ``orm-update``: an ORM bulk UPDATE of a
    cancelled task back to pending; ``db``: raw SQL the session guards never see (an UPDATE
    pending -> completed and an INSERT of a completed task), stopped by the trigger.
    Every attempt writes a history row as a legal change would, so one that got through would
    show in the database.
    """

    KINDS = ("flush", "orm-update", "db-update", "db-insert")

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.pending_id: int | None = None
        self.cancelled_id: int | None = None
        self.seq = 0

    async def prepare(self) -> None:
        """Create the saboteur's own tasks: one pending, one cancelled (legal moves)."""
        pending = await self.runner.run(create_unit("x-pending", SABOTEUR))
        cancelled = await self.runner.run(create_unit("x-cancelled", SABOTEUR))
        if not pending or not cancelled:
            raise RuntimeError("could not create the tasks for the illegal-transition attempts")
        self.pending_id = pending[0].task_id
        task_id = cancelled[0].task_id

        async def cancel(session: AsyncSession) -> list[Change]:
            task = await session.get(Task, task_id)
            assert task is not None
            move_task(session.sync_session, task, "cancelled", idem_key="x-cancel")
            return [Change("x-cancel", task_id, "cancelled")]

        if not await self.runner.run(Unit("x-cancel", "advance", cancel, ("x-cancel",))):
            raise RuntimeError("could not cancel the task for the illegal-transition attempts")
        self.cancelled_id = task_id

    async def attempt(self) -> str:
        """Make the next illegal attempt; returns its kind."""
        kind = self.KINDS[self.seq % len(self.KINDS)]
        self.seq += 1
        key = f"x-{self.seq}"
        await self.runner.run(self._unit(kind, key))
        return kind

    def _unit(self, kind: str, key: str) -> Unit:
        pending_id, cancelled_id = self.pending_id, self.cancelled_id
        assert pending_id is not None, "call prepare() first"
        assert cancelled_id is not None, "call prepare() first"

        def history(session: AsyncSession, task_id: int, old: str | None, new: str) -> None:
            session.add(TaskHistory(task_id=task_id, idem_key=key, from_status=old, to_status=new))

        async def by_flush(session: AsyncSession) -> list[Change]:
            task = await session.get(Task, pending_id)
            assert task is not None
            move_task(session.sync_session, task, "completed", idem_key=key)
            await session.flush()
            return [Change(key, pending_id, "completed")]

        async def by_bulk_update(session: AsyncSession) -> list[Change]:
            await session.execute(
                sa.update(Task).where(Task.id == cancelled_id).values(status="pending")
            )
            history(session, cancelled_id, "cancelled", "pending")
            await session.flush()
            return [Change(key, cancelled_id, "pending")]

        async def by_raw_update(session: AsyncSession) -> list[Change]:
            await session.execute(
                sa.text("UPDATE tasks SET status = 'completed' WHERE id = :id"), {"id": pending_id}
            )
            history(session, pending_id, "pending", "completed")
            await session.flush()
            return [Change(key, pending_id, "completed")]

        async def by_raw_insert(session: AsyncSession) -> list[Change]:
            result = await session.execute(
                sa.text(
                    "INSERT INTO tasks (idem_key, title, status, owner) "
                    "VALUES (:key, 'born finished', 'completed', :owner) RETURNING id"
                ),
                {"key": key, "owner": SABOTEUR},
            )
            new_id = result.scalar_one()
            history(session, new_id, None, "completed")
            await session.flush()
            return [Change(key, new_id, "completed")]

        fns: dict[str, tuple[UnitFn, str]] = {
            "flush": (by_flush, "flush"),
            "orm-update": (by_bulk_update, "orm-update"),
            "db-update": (by_raw_update, "db"),
            "db-insert": (by_raw_insert, "db"),
        }
        fn, via = fns[kind]
        return Unit(key, "illegal", fn, (key,), illegal_via=via)


async def setup_hot_rows(runner: Runner) -> tuple[tuple[int, int], tuple[int, int]]:
    """Create the two pairs of shared tasks the contention faults fight over."""
    ids: list[int] = []
    for n, owner in enumerate((HOT_DEADLOCK, HOT_DEADLOCK, HOT_SERIAL, HOT_SERIAL)):
        changes = await runner.run(create_unit(f"hot-{n}", owner))
        if not changes:
            raise RuntimeError("could not create the shared tasks for the contention faults")
        ids.append(changes[0].task_id)
    return (ids[0], ids[1]), (ids[2], ids[3])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (from a thread: the
    fault schedule's)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
