"""``reload_config()`` called in a loop by one thread while 8 threads run sync units and 32
tasks run async units against the real server: each reload flips one of retry, the breaker,
the guard, logging, the kill switch, the retry numbers, the breaker's numbers, the retry
budget and a Redis URL (a Redis of the test's own); one reload in ten is given a bad value,
which must be refused naming it, with the configuration in force left as it was.

Every unit writes its own ledger row (a unique column), and some meet a transient error at
their first attempt (retried or not, as the configuration of that moment says), a bulk UPDATE
and a flush making illegal moves (the guard, on or off), or the trigger. Then: no unit raised
an error of resilient_db's own making, no attempt was half guarded (its bulk UPDATE filtered
and its flush let through, or the other way round), each unit that returned wrote its row once
and each that raised wrote nothing, nothing hung (bounded joins), and ``health()`` (read during
the run too) is sane. It found the half-guarded attempts (see test_reload_mid_unit.py)."""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import RAISE_CODE_FUNCTION
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

RULES: dict[str, Any] = {
    "column": "status",
    "transitions": {"pending": {"running"}, "running": {"done"}},
    "initial": {"pending"},
}


class Base(DeclarativeBase):
    pass


class Task(Base):  # the client's guards only
    __tablename__ = "load_tasks"
    __transitions__ = rdb.TransitionRules(**RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20))


class Guarded(Base):  # the trigger installed too
    __tablename__ = "load_guarded"
    __transitions__ = rdb.TransitionRules(**RULES)
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20))


class Ledger(Base):
    __tablename__ = "load_ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    unit: Mapped[str] = mapped_column(sa.String(40), unique=True)


THREADS, THREAD_UNITS = 8, 30
TASKS, TASK_UNITS = 32, 8
UNITS = THREADS * THREAD_UNITS + TASKS * TASK_UNITS
KINDS = ("conflict", "guard", "trigger", "plain", "unavailable")
FIRST_ERROR = {"conflict": "40001", "unavailable": "57P03"}
REDIS = "<the test's Redis>"
SWITCHES: list[tuple[str, list[str | None]]] = [
    ("SELF_HEALING_RETRY", ["true", "false"]),
    ("SELF_HEALING_CIRCUIT_BREAKER", ["true", "false"]),
    ("SELF_HEALING_STATUS_VALIDATION", ["true", "false"]),
    ("SELF_HEALING_LOGGING", ["true", "false"]),
    ("SELF_HEALING_ENABLED", ["true", "false"]),
    ("SELF_HEALING_MAX_RETRIES", ["0", "1", "5"]),
    ("SELF_HEALING_RESET_TIMEOUT", ["1", "50", "30000"]),
    ("SELF_HEALING_FAILURE_THRESHOLD", ["1", "2", "1000"]),
    ("SELF_HEALING_HALF_OPEN_PROBES", ["1", "3"]),
    ("SELF_HEALING_RETRY_BUDGET", [None, "0", "0.5", "10"]),
    ("SELF_HEALING_REDIS_URL", [None, REDIS]),
]
BAD = [
    ("SELF_HEALING_FAILURE_THRESHOLD", "-1"),
    ("SELF_HEALING_MAX_RETRIES", "abc"),
    ("SELF_HEALING_RETRIES", "3"),  # no such variable
]
#: the errors the units may raise: the database's (a transient one not retried, the trigger's
#: refusal with the guard off), the guard's, the breaker's
EXPECTED = (sa.exc.DBAPIError, rdb.IllegalTransitionError, rdb.CircuitOpenError)
BASE = {"SELF_HEALING_INITIAL_DELAY": "1", "SELF_HEALING_MAX_DELAY": "2"}


class Run:
    """What the units did, by unit name."""

    def __init__(self) -> None:
        self.attempts: collections.Counter[str] = collections.Counter()
        self.bulk_rows: dict[str, int] = {}  # a guard unit's last attempt's bulk UPDATE
        self.outcomes: dict[str, str] = {}
        self.problems: list[str] = []

    def ended(self, unit: str, exc: BaseException | None) -> None:
        if exc is None:
            self.outcomes[unit] = "ok"
            return
        self.outcomes[unit] = type(exc).__name__
        if not isinstance(exc, EXPECTED):
            self.problems.append(f"{unit}: {''.join(traceback.format_exception(exc))}")


def sync_unit(run: Run) -> Callable[..., None]:
    def unit(session: Session, name: str, n: int) -> None:
        run.attempts[name] += 1
        session.add(Ledger(unit=name))
        kind = KINDS[n % len(KINDS)]
        if kind in FIRST_ERROR and run.attempts[name] == 1:
            session.execute(sa.text(f"SELECT raise_code('{FIRST_ERROR[kind]}')"))
        if kind == "guard":  # pending -> done: illegal, by bulk UPDATE and by flush
            moved = session.execute(sa.update(Task).where(Task.id == 2 * n).values(status="done"))
            run.bulk_rows[name] = moved.rowcount
            task = session.get(Task, 2 * n + 1)
            assert task is not None
            task.status = "done"
        if kind == "trigger":
            guarded = session.get(Guarded, n)
            assert guarded is not None
            guarded.status = "done"
        session.flush()

    return unit


def async_unit(run: Run) -> Callable[..., Any]:
    async def unit(session: AsyncSession, name: str, n: int) -> None:
        run.attempts[name] += 1
        session.add(Ledger(unit=name))
        kind = KINDS[n % len(KINDS)]
        if kind in FIRST_ERROR and run.attempts[name] == 1:
            await session.execute(sa.text(f"SELECT raise_code('{FIRST_ERROR[kind]}')"))
        if kind == "guard":
            moved = await session.execute(
                sa.update(Task).where(Task.id == 2 * n).values(status="done")
            )
            run.bulk_rows[name] = moved.rowcount  # type: ignore[attr-defined]
            task = await session.get(Task, 2 * n + 1)
            assert task is not None
            task.status = "done"
        if kind == "trigger":
            guarded = await session.get(Guarded, n)
            assert guarded is not None
            guarded.status = "done"
        await session.flush()

    return unit


def reloads(run: Run, redis_url: str, done: threading.Event, factory: Any) -> None:
    """Reload until the units are done (at most 20,000 times), reading ``health()`` now and
    then; every tenth reload is given a bad value, and leaves ``factory`` as it was."""
    rng = random.Random(7)
    env: dict[str, str] = dict(BASE)
    for n in range(20_000):
        if done.is_set():
            return
        if n % 10 == 9:
            name, value = rng.choice(BAD)
            before = factory.config
            with pytest.raises(rdb.ConfigError) as refused:
                rdb.reload_config({**env, name: value})
            assert list(refused.value.problems) == [name], refused.value
            assert name in str(refused.value)
            assert factory.config is before  # nothing applied
            continue
        name, values = rng.choice(SWITCHES)
        choice = rng.choice(values)
        if choice is None:
            env.pop(name, None)
        else:
            env[name] = redis_url if choice == REDIS else choice
        try:
            rdb.reload_config(env)
        except rdb.ConfigError:  # a contradiction (a deadline with retries off, say)
            env.pop(name)
        if n % 7 == 0:
            check_health(run)


def check_health(run: Run) -> None:
    for service, health in rdb.health()["services"].items():
        counters = health["counters"]
        if sum(counters["retries_by_class"].values()) != counters["retries"]:
            run.problems.append(f"{service}: {counters}")
        if counters["recovered"] > counters["retries"]:
            run.problems.append(f"{service}: {counters}")
        breaker = health["breaker"]
        if breaker is not None and breaker["state"] not in ("closed", "open", "half-open", "off"):
            run.problems.append(f"{service}: {breaker}")


def test_units_under_reloads(
    pg_url: str,
    pg_async_url: str,
    redis_server: RedisServer,
    clean_env: pytest.MonkeyPatch,
) -> None:
    engine = sa.create_engine(pg_url, pool_size=THREADS + 2)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(RAISE_CODE_FUNCTION)
        conn.execute(sa.insert(Task), [{"id": n, "status": "pending"} for n in range(2 * UNITS)])
        conn.execute(sa.insert(Guarded), [{"id": n, "status": "pending"} for n in range(UNITS)])
    rdb.install_commit_markers(engine)
    rdb.install_transition_trigger(engine, Guarded)
    rdb.reload_config(BASE)
    run = Run()
    Factory = rdb.ResilientSession(engine, service="load")
    async_engine = create_async_engine(pg_async_url, pool_size=TASKS + 2)
    AsyncFactory = rdb.AsyncResilientSession(async_engine, service="load-async")

    def thread_units(t: int) -> None:
        unit = sync_unit(run)
        for n in range(t * THREAD_UNITS, (t + 1) * THREAD_UNITS):
            try:
                Factory.run(unit, f"s{n}", n)
            except Exception as exc:
                run.ended(f"s{n}", exc)
            else:
                run.ended(f"s{n}", None)

    async def task_units(t: int) -> None:
        unit = async_unit(run)
        first = THREADS * THREAD_UNITS + t * TASK_UNITS
        for n in range(first, first + TASK_UNITS):
            try:
                await AsyncFactory.run(unit, f"a{n}", n)
            except Exception as exc:
                run.ended(f"a{n}", exc)
            else:
                run.ended(f"a{n}", None)

    async def all_tasks() -> None:
        try:
            await asyncio.gather(*(task_units(t) for t in range(TASKS)))
        finally:
            await async_engine.dispose()

    done = threading.Event()
    failed: list[BaseException] = []

    def reloader() -> None:
        try:
            reloads(run, redis_server.url, done, Factory)
        except BaseException as exc:  # (reported below)
            failed.append(exc)

    with rdb.set_testing():
        workers = [threading.Thread(target=thread_units, args=(t,)) for t in range(THREADS)]
        workers.append(threading.Thread(target=asyncio.run, args=(all_tasks(),)))
        reloading = threading.Thread(target=reloader)
        reloading.start()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        done.set()
        reloading.join(60)
        assert not any(t.is_alive() for t in [*workers, reloading]), "hung"
        rdb.reload_config(BASE)
    assert not failed, failed
    check_health(run)
    assert len(run.outcomes) == UNITS
    with engine.connect() as conn:
        rows = collections.Counter(conn.scalars(sa.select(Ledger.unit)))
    engine.dispose()
    for name, outcome in run.outcomes.items():
        if rows[name] != (outcome == "ok"):
            run.problems.append(f"{name}: {outcome}, {rows[name]} rows, {run.attempts[name]}")
        if name in run.bulk_rows and outcome in ("ok", "IllegalTransitionError"):
            filtered = run.bulk_rows[name] == 0
            if filtered != (outcome == "IllegalTransitionError"):
                run.problems.append(f"{name}: half guarded ({run.bulk_rows[name]}, {outcome})")
    assert not run.problems, "\n".join(run.problems[:10])
    assert "ok" in run.outcomes.values()
