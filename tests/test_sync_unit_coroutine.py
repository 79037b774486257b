"""A sync unit that returns a coroutine (a lambda around an ``async def``, an object whose
``__call__`` is one) would have its work never run while the unit committed and reported
success: ``ResilientSession`` refuses it with a TypeError naming the mistake and the remedy,
rolls the unit back (what it did before returning is not committed), does not replay it, and
closes the coroutine so that no "never awaited" warning follows. The mirror image of the async
factory's "returned str, not an awaitable"."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
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
