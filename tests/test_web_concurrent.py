"""Concurrent requests while the breaker opens, through a real server (uvicorn): requests in
flight when the database goes away (their connections cut, new ones refused) and requests that
arrive while their failures open the breaker. Every answer is a 503 problem (``database-
unavailable`` or ``circuit-open``) with a ``Retry-After`` header matching its body, none a bare
500, whichever kind of route meets it: an async unit on asyncpg or psycopg, a sync drop-in
session in Starlette's threadpool."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from processes import wait_for_async
from scenarios import busy_backends, disposing, served
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer
from resilient_db.web import PROBLEM_JSON, install_exception_handlers

pytestmark = pytest.mark.usefixtures("no_backoff")

#: waits for the advisory lock the test holds: a request in flight stays in flight until the cut
SLOW = sa.text("SELECT 1 FROM pg_advisory_xact_lock_shared(42)")
CONFIG = rdb.Config(max_retries=1, failure_threshold=3, reset_timeout=30)


def app_for(kind: str, url: str, service: str) -> FastAPI:
    engine: sa.Engine | AsyncEngine = (
        sa.create_engine(url, pool_size=20)
        if kind == "sync-dropin"
        else create_async_engine(url, pool_size=20)
    )
    app = FastAPI(lifespan=disposing(engine))
    install_exception_handlers(app)
    if isinstance(engine, sa.Engine):
        Sessions: Any = rdb.ResilientSession(engine, service=service, config=CONFIG)

        @app.get("/x")
        def dropin() -> dict[str, int]:
            with Sessions() as session:
                return {"v": session.execute(SLOW).scalar_one()}

    else:
        Sessions = rdb.AsyncResilientSession(engine, service=service, config=CONFIG)

        async def slow(session: AsyncSession) -> int:
            return int((await session.execute(SLOW)).scalar_one())

        @app.get("/x")
        async def unit() -> dict[str, int]:
            return {"v": await Sessions.run(slow)}

    return app


@pytest.mark.parametrize(
    "route", ["async-unit/asyncpg", "async-unit/psycopg_async", "sync-dropin/psycopg"]
)
def test_every_answer_while_the_breaker_opens_is_a_503_with_retry_after(
    fault_proxy: FaultProxy, pg_server: PostgresServer, pg_database: str, service: str, route: str
) -> None:
    kind, _, driver = route.partition("/")
    app = app_for(kind, fault_proxy.url(pg_database, driver=driver), service)
    seen: collections.Counter[str] = collections.Counter()

    async def requests(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one() -> None:
                answer = await client.get("/x")
                assert answer.status_code == 503, answer.text
                assert answer.headers["content-type"] == PROBLEM_JSON
                body = answer.json()
                assert answer.headers["retry-after"] == str(body["retry_after"])
                seen[body["type"].rpartition(":")[2]] += 1

            in_flight = [asyncio.create_task(one()) for _ in range(8)]
            await wait_for_async(
                lambda: busy_backends(pg_server, pg_database) >= 4, "requests in flight"
            )
            fault_proxy.refuse(cut=True)  # the database goes away under them
            arriving = [asyncio.create_task(one()) for _ in range(8)]
            await asyncio.gather(*in_flight, *arriving)
            await one()  # the breaker is open now: refused at once
        fault_proxy.restore()

    with served(app) as url, psycopg.connect(pg_server.conninfo(pg_database)) as holder:
        holder.execute("SELECT pg_advisory_lock(42)")  # held until the cut, and after
        asyncio.run(requests(url))
    assert sum(seen.values()) == 17
    assert set(seen) <= {"database-unavailable", "circuit-open"}
    assert seen["circuit-open"] >= 1
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
