"""A factory given what it can't use refuses it where the mistake is made, with an error that
names it and the remedy, and a refused call leaves the factory (and the engines, the health
report) as they were: nothing a later, correct factory would meet."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb

pytestmark = pytest.mark.usefixtures("no_backoff")


def one(session: Session) -> int:
    return int(session.execute(sa.text("SELECT 1")).scalar_one())


async def aone(session: AsyncSession) -> int:
    return int((await session.execute(sa.text("SELECT 1"))).scalar_one())


@pytest_asyncio.fixture
async def async_engine(pg_async_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_async_url)
    yield engine
    await engine.dispose()


# -- configure() given the factory's own keywords ----------------------------------------------
def test_configure_refuses_the_factorys_own_keywords_and_leaves_the_factory_working(
    engine: sa.Engine, service: str
) -> None:
    Factory = rdb.ResilientSession(engine, service=service)
    kw = dict(Factory.kw)
    with pytest.raises(TypeError) as info:
        Factory.configure(config=rdb.Config(max_retries=10), service="orders-v2")
    assert str(info.value) == (
        "ResilientSession.configure() got config=, service=, which are the factory's own, not "
        "the sessions': configure() passes its keywords to every session the factory makes, "
        "and Session takes no config=, service= (every Session() and unit would fail). Give "
        "them when the factory is made: ResilientSession(engine, config=..., service=...); to "
        "change the configuration of a running factory, set the SELF_HEALING_* variables and "
        "call resilient_db.reload_config() (it applies to the factories made without config=)"
    )
    assert Factory.kw == kw
    assert Factory.run(one) == 1
    with Factory() as session:
        assert one(session) == 1


@pytest.mark.parametrize("name", ["classifier", "clock", "wall_clock", "sleep", "asleep"])
def test_configure_refuses_each_own_keyword(engine: sa.Engine, service: str, name: str) -> None:
    Factory = rdb.ResilientSession(engine, service=service)
    with pytest.raises(TypeError, match=rf"configure\(\) got {name}=, which is the factory's own"):
        Factory.configure(**{name: None})
    assert Factory.run(one) == 1


@pytest.mark.asyncio
async def test_async_configure_refuses_the_factorys_own_keywords(
    async_engine: AsyncEngine, service: str
) -> None:
    Factory = rdb.AsyncResilientSession(async_engine, service=service)
    with pytest.raises(TypeError) as info:
        Factory.configure(asleep=None, expire_on_commit=False)
    assert str(info.value).startswith(
        "AsyncResilientSession.configure() got asleep=, which is the factory's own, not the "
        "sessions': configure() passes its keywords to every session the factory makes, and "
        "AsyncSession or Session takes no asleep= "
    )
    assert Factory.kw["expire_on_commit"] is True  # nothing of the refused call was kept
    assert await Factory.run(aone) == 1
