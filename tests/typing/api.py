"""Checked by mypy (strict) in `make types`, never run: the public API keeps its types.

A decorated unit keeps its signature without the session; results keep their types.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb

engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1/app")
Sessions = rdb.ResilientSession(engine, service="typing", config=rdb.Config(max_retries=2))


@Sessions.transactional
def rename(session: Session, item_id: int, *, name: str) -> str:
    return name


renamed: str = rename(1, name="x")
count: int = Sessions.run(lambda s: int(s.execute(sa.text("SELECT 1")).scalar_one()))
config: rdb.Config = rdb.load_config({"SELF_HEALING_RETRY": "off"})
transient: bool = rdb.is_transient(ValueError())
outcome: rdb.Outcome = rdb.classify(ValueError())
wrapped: int = rdb.with_self_healing(lambda: 1, service="typing", use_retry=False)

aengine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1/app")
AsyncSessions = rdb.AsyncResilientSession(aengine, service="typing-async")


@AsyncSessions.transactional
async def arename(session: AsyncSession, item_id: int) -> str:
    return str(item_id)


async def use() -> str:
    first: str = await arename(1)
    second: int = await AsyncSessions.run(_one)
    return first + str(second)


async def _one(session: AsyncSession) -> int:
    return 1


try:
    rename(1, name="y")
except rdb.CircuitOpenError as err:
    retry_after: float = err.retry_after
except rdb.IllegalTransitionError as err:
    via: str = err.via
