"""What a unit leaves its caller (README, "Units of work", and docs/units-of-work.md).

ORM objects a unit returns: as a committed ``Session.begin()`` block leaves them, whichever
way the unit's COMMIT was proved. With the session's default ``expire_on_commit=True`` they
come back expired (and detached: reading an attribute raises ``DetachedInstanceError``), also
when the COMMIT's answer was lost and a check proved it committed, instead of holding the
values the attempt flushed (a server default or a trigger's change missing from them); with
``expire_on_commit=False`` they keep their loaded values either way. Real server, real faults
(the fault proxy loses the COMMIT's answer), sync and both async drivers.

A side effect outside the database registered, as docs/units-of-work.md says, on the attempt's
session
(``event.listen(session, "after_commit", ...)``) happens once: not for an attempt that failed
(a serialization failure the server raised), once for a COMMIT whose answer was lost and that a
check proved committed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import ASYNC_DRIVERS, Base, Item
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import DetachedInstanceError

import resilient_db as rdb
from resilient_db.testing import FaultProxy

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxied(pg_database: str, fault_proxy: FaultProxy, engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    rdb.install_commit_markers(engine)
    made = sa.create_engine(fault_proxy.url(pg_database), connect_args={"connect_timeout": 2})
    yield made
    made.dispose()


@pytest_asyncio.fixture
async def async_proxied(
    proxied: sa.Engine, pg_database: str, fault_proxy: FaultProxy, async_driver: str
) -> AsyncIterator[AsyncEngine]:
    made = create_async_engine(fault_proxy.url(pg_database, driver=async_driver))
    yield made
    await made.dispose()


def assert_left_as_committed(item: Item, *, expire_on_commit: bool) -> None:
    state = sa.inspect(item)
    assert state.detached  # the unit's session is closed
    if expire_on_commit:
        assert state.expired_attributes == {"id", "name"}
        with pytest.raises(DetachedInstanceError):
            _ = item.name
    else:
        assert not state.expired_attributes
        assert item.name.startswith("returned")


@pytest.mark.parametrize("lost", [False, True], ids=["answered", "lost-answer-proved"])
@pytest.mark.parametrize("expire_on_commit", [True, False])
def test_a_returned_object_is_left_as_a_commit_leaves_it(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, lost: bool, expire_on_commit: bool
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service, expire_on_commit=expire_on_commit)
    attempts: list[int] = []

    def unit(session: Session) -> Item:
        attempts.append(1)
        item = Item(name=f"returned-{lost}-{expire_on_commit}")
        session.add(item)
        if lost:
            fault_proxy.lose_commit_answer()
        return item

    item = Sessions.run(unit)
    assert fault_proxy.commits_lost == int(lost)
    assert attempts == [1]  # (proved committed: not replayed)
    assert_left_as_committed(item, expire_on_commit=expire_on_commit)


@pytest.mark.asyncio
@pytest.mark.parametrize("lost", [False, True], ids=["answered", "lost-answer-proved"])
@pytest.mark.parametrize("expire_on_commit", [True, False])
async def test_an_async_units_returned_object_is_left_as_a_commit_leaves_it(
    async_proxied: AsyncEngine,
    fault_proxy: FaultProxy,
    service: str,
    lost: bool,
    expire_on_commit: bool,
) -> None:
    Sessions = rdb.AsyncResilientSession(
        async_proxied, service=service, expire_on_commit=expire_on_commit
    )
    attempts: list[int] = []

    async def unit(session: AsyncSession) -> Any:
        attempts.append(1)
        item = Item(name=f"returned-{lost}-{expire_on_commit}")
        session.add(item)
        await session.flush()
        if lost:
            fault_proxy.lose_commit_answer()
        return item

    item = await Sessions.run(unit)
    assert fault_proxy.commits_lost == int(lost)
    assert attempts == [1]
    assert_left_as_committed(item, expire_on_commit=expire_on_commit)


@pytest.mark.parametrize("fault", ["conflict", "lost-answer-proved"])
def test_a_side_effect_registered_in_the_unit_happens_once(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, fault: str
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)
    attempts: list[int] = []
    sent: list[int] = []

    def unit(session: Session) -> None:
        attempts.append(1)
        attempt = len(attempts)
        session.add(Item(name=f"effect-{fault}-{attempt}"))
        event.listen(session, "after_commit", lambda _session: sent.append(attempt))
        if attempt == 1 and fault == "conflict":
            session.execute(sa.text("SELECT raise_code('40001')"))
        if attempt == 1 and fault == "lost-answer-proved":
            fault_proxy.lose_commit_answer()

    Sessions.run(unit)
    replayed = fault == "conflict"
    assert fault_proxy.commits_lost == int(not replayed)
    assert len(attempts) == 1 + replayed
    assert sent == [len(attempts)]  # once, by the attempt that committed


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["conflict", "lost-answer-proved"])
async def test_an_async_side_effect_registered_in_the_unit_happens_once(
    async_proxied: AsyncEngine, fault_proxy: FaultProxy, service: str, fault: str
) -> None:
    Sessions = rdb.AsyncResilientSession(async_proxied, service=service)
    attempts: list[int] = []
    sent: list[int] = []

    async def unit(session: AsyncSession) -> None:
        attempts.append(1)
        attempt = len(attempts)
        session.add(Item(name=f"effect-{fault}-{attempt}"))
        event.listen(session.sync_session, "after_commit", lambda _session: sent.append(attempt))
        if attempt == 1 and fault == "conflict":
            await session.execute(sa.text("SELECT raise_code('40001')"))
        if attempt == 1 and fault == "lost-answer-proved":
            await session.flush()
            fault_proxy.lose_commit_answer()

    await Sessions.run(unit)
    replayed = fault == "conflict"
    assert fault_proxy.commits_lost == int(not replayed)
    assert len(attempts) == 1 + replayed
    assert sent == [len(attempts)]
