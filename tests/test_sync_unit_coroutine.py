"""A sync unit that returns a coroutine (a lambda around an ``async def``, an object whose
``__call__`` is one) would have its work never run while the unit committed and reported
success: ``ResilientSession`` refuses it with a TypeError naming the mistake and the remedy,
rolls the unit back (what it did before returning is not committed), does not replay it, and
closes the coroutine so that no "never awaited" warning follows. The mirror image of the async
factory's "returned str, not an awaitable"."""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb

pytestmark = pytest.mark.usefixtures("no_backoff")

INSERT = sa.text("INSERT INTO orders (id) VALUES (:id)")


async def save_order(session: Session, order_id: int) -> None:  # an async repository function
    session.execute(INSERT, {"id": order_id})


class SaveOrder:  # a callable object whose __call__ is async
    async def __call__(self, session: Session, order_id: int) -> None:
        session.execute(INSERT, {"id": order_id})


def save_later(session: Session, order_id: int) -> Any:  # a sync function returning one
    return save_order(session, order_id)


@pytest.fixture
def orders(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id int PRIMARY KEY)"))
    return engine


def written(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT id FROM orders ORDER BY id")).scalars())


def refused(call: Callable[[], Any]) -> str:
    """The TypeError ``call`` raises; no "never awaited" warning once the coroutine is gone."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(TypeError) as info:
            call()
        message = str(info.value)
        del info
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], seen
    return message


def test_a_unit_returning_a_coroutine_is_refused_rolled_back_and_not_replayed(
    orders: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(orders, service=service)
    calls: list[int] = []

    def unit(session: Session) -> Any:
        calls.append(1)
        session.execute(INSERT, {"id": 1})  # done before the mistake: rolled back with it
        return save_order(session, 2)

    message = refused(lambda: Sessions.run(unit))
    assert "returned a coroutine (save_order(...), never awaited)" in message
    assert "AsyncResilientSession" in message
    assert "await Session.run(fn, ...)" in message
    assert calls == [1]  # a usage error: never replayed
    assert written(orders) == []


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda S: S.run(lambda s: save_order(s, 1)), id="lambda"),
        pytest.param(lambda S: S.run(SaveOrder(), 1), id="async-__call__"),
        pytest.param(lambda S: S.transactional(save_later)(1), id="transactional"),
        pytest.param(
            lambda S: S.run(lambda s: S.run(lambda inner: save_order(inner, 1))), id="nested"
        ),
        pytest.param(lambda S: S.run_in(S(), lambda s: save_order(s, 1)), id="run_in"),
    ],
)
@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
def test_every_way_in_refuses_it(
    orders: sa.Engine, service: str, call: Callable[[Any], Any], enabled: bool
) -> None:
    Sessions = rdb.ResilientSession(orders, service=service, config=rdb.Config(enabled=enabled))
    message = refused(lambda: call(Sessions))
    assert "returned a coroutine (" in message
    assert "never awaited" in message
    assert written(orders) == []
    assert Sessions.run(lambda s: s.execute(INSERT, {"id": 7}).rowcount) == 1  # the factory works
    assert written(orders) == [7]


def test_a_unit_returning_a_coroutine_under_validate_is_refused(
    orders: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(orders, service=service)
    message = refused(lambda: Sessions.run(lambda s: save_order(s, 1), validate=int))
    assert "returned a coroutine" in message
    assert written(orders) == []


# -- a generator returned: its code would run after the commit --------------------------------
def save_each(session: Session, *order_ids: int) -> Any:  # a generator function
    for order_id in order_ids:
        session.execute(INSERT, {"id": order_id})
        yield order_id


class SaveEach:  # a callable object whose __call__ is a generator function
    def __call__(self, session: Session, order_id: int) -> Any:
        session.execute(INSERT, {"id": order_id})
        yield order_id


def idle_in_transaction(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state = 'idle in transaction'"
                )
            ).scalar_one()
        )


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda S: S.run(lambda s: save_each(s, 1)), id="lambda"),
        pytest.param(lambda S: S.run(SaveEach(), 1), id="generator-__call__"),
        pytest.param(
            lambda S: S.run(lambda s: (s.execute(INSERT, {"id": i}) for i in (1, 2))),
            id="generator-expression",
        ),
        pytest.param(lambda S: S.transactional(lambda s: save_each(s, 1))(), id="transactional"),
        pytest.param(
            lambda S: S.run(lambda s: S.run(lambda inner: save_each(inner, 1))), id="nested"
        ),
        pytest.param(lambda S: S.run_in(S(), lambda s: save_each(s, 1)), id="run_in"),
    ],
)
@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
def test_a_unit_returning_a_generator_is_refused_and_rolled_back(
    orders: sa.Engine, service: str, call: Callable[[Any], Any], enabled: bool
) -> None:
    """A unit returning a generator reported success with nothing committed: the caller's
    iteration ran its INSERT on the unit's closed session, which began a transaction nobody
    committed (the write lost, the connection left idle in transaction with its locks)."""
    Sessions = rdb.ResilientSession(orders, service=service, config=rdb.Config(enabled=enabled))
    calls: list[int] = []

    def unit(session: Session) -> Any:
        calls.append(1)
        session.execute(INSERT, {"id": 9})  # done before the mistake: rolled back with it
        return save_each(session, 3)

    # (no collection to wait for: a generator left unclosed warns of nothing)
    with pytest.raises(TypeError, match=r"returned a generator \(.*return a list"):
        call(Sessions)
    with pytest.raises(TypeError, match=r"returned a generator \(save_each\)"):
        Sessions.run(unit)
    assert calls == [1]  # a usage error: never replayed
    assert written(orders) == []
    assert idle_in_transaction(orders) == 0
    assert Sessions.run(lambda s: s.execute(INSERT, {"id": 7}).rowcount) == 1  # the factory works
    assert written(orders) == [7]


# -- an async generator returned: its code would never run -------------------------------------
async def save_all(session: Session, order_id: int) -> Any:  # an async generator function
    session.execute(INSERT, {"id": order_id})
    yield order_id


class SaveAll:  # a callable object whose __call__ is an async generator function
    async def __call__(self, session: Session, order_id: int) -> Any:
        session.execute(INSERT, {"id": order_id})
        yield order_id


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda S: S.run(lambda s: save_all(s, 1)), id="lambda"),
        pytest.param(lambda S: S.run(SaveAll(), 1), id="async-generator-__call__"),
        pytest.param(lambda S: S.run_in(S(), lambda s: save_all(s, 1)), id="run_in"),
    ],
)
def test_a_unit_returning_an_async_generator_is_refused_and_rolled_back(
    orders: sa.Engine, service: str, call: Callable[[Any], Any]
) -> None:
    """A sync unit returning an async generator (a lambda or an object around an ``async def``
    with ``yield``) reported success and wrote nothing: nothing could iterate it."""
    Sessions = rdb.ResilientSession(orders, service=service)
    with pytest.raises(TypeError, match=r"returned an async generator \(.*never run"):
        call(Sessions)
    assert written(orders) == []
    assert idle_in_transaction(orders) == 0


# -- an async unit's result that would run after the commit -------------------------------------
async def a_save(session: AsyncSession, order_id: int) -> Any:
    """An async unit that forgot one ``await``: its INSERT is a coroutine, returned."""
    return session.execute(INSERT, {"id": order_id})


async def a_save_each(session: AsyncSession, order_id: int) -> Any:
    """An async unit returning an async generator whose code writes (``return rows(...)``)."""

    async def each() -> AsyncIterator[int]:
        await session.execute(INSERT, {"id": order_id})
        yield order_id

    return each()


async def a_save_lazily(session: AsyncSession, order_id: int) -> Any:
    """An async unit returning a generator expression (the INSERT's coroutines, lazily)."""
    return (session.execute(INSERT, {"id": i}) for i in (order_id,))


A_MISTAKES: dict[str, tuple[Callable[..., Awaitable[Any]], str]] = {
    "forgotten-await": (a_save, r"returned a coroutine \(AsyncSession.execute\(...\), never "),
    "async-generator": (a_save_each, r"returned an async generator \(.*each\), whose code"),
    "generator": (a_save_lazily, r"returned a generator \(.*<genexpr>\), whose code"),
}


#: each mistake through ``run``; each other way in with one of them; self-healing off on two
#: (the refusal is one check on the unit's result, shared by every way in: not all 24 pairs)
_A_MISTAKE_CASES = [
    *(("run", mistake, True) for mistake in sorted(A_MISTAKES)),
    *((how, "forgotten-await", True) for how in ("transactional", "nested", "run_in")),
    ("run", "forgotten-await", False),
    ("nested", "generator", False),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("how", "mistake", "enabled"),
    _A_MISTAKE_CASES,
    ids=[f"{h}-{m}-{'on' if e else 'off'}" for h, m, e in _A_MISTAKE_CASES],
)
async def test_an_async_unit_returning_what_would_run_after_its_commit_is_refused(
    *,
    orders: sa.Engine,
    pg_async_url: str,
    made_async_engines: list[AsyncEngine],
    service: str,
    how: str,
    mistake: str,
    enabled: bool,
) -> None:
    """An async unit's result that is a coroutine (``return session.execute(...)``, one
    ``await`` forgotten), an async generator or a generator: the unit reported success with
    that work never done (the caller's later ``await`` or iteration ran it on the unit's
    closed session, in a transaction nobody committed), where a sync unit's is refused.
    Refused now with a TypeError naming it, rolled back, not replayed, no "never awaited"
    warning left."""
    engine = create_async_engine(pg_async_url)
    made_async_engines.append(engine)
    Sessions = rdb.AsyncResilientSession(
        engine, service=service, config=rdb.Config(enabled=enabled)
    )
    unit, message = A_MISTAKES[mistake]
    calls: list[int] = []

    async def mistaken(session: AsyncSession) -> Any:
        calls.append(1)
        await session.execute(INSERT, {"id": 9})  # done before the mistake: rolled back with it
        return await unit(session, 3)

    async def nested(session: AsyncSession) -> Any:
        return await Sessions.run(mistaken)

    ways_in: dict[str, Callable[[], Awaitable[Any]]] = {
        "run": lambda: Sessions.run(mistaken),
        "transactional": Sessions.transactional(mistaken),
        "nested": lambda: Sessions.run(nested),
        "run_in": lambda: Sessions.run_in(Sessions(), mistaken),
    }
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match=message) as raised:
            await ways_in[how]()
        assert "after the unit committed" in str(raised.value)
        del raised
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], seen
    assert calls == [1]  # a usage error: never replayed
    assert written(orders) == []
    assert idle_in_transaction(orders) == 0
    assert await Sessions.run(a_count) == 0  # the factory works


async def a_count(session: AsyncSession) -> int:
    return int((await session.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one())
