"""The web layer while Starlette's threadpool is full: sync endpoints of the application whose
units wait on the database (a lock held by the test, on a real server) hold every thread, and
the dashboard behind ``token_auth`` still answers, page and data, before any of them is let go.
Proved by order (the units still wait when the dashboard's answer arrives), not by timing."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator

import anyio.to_thread
import pytest
import sqlalchemy as sa
from scenarios import waiting_on_lock
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db.web import dashboard, install_exception_handlers, token_auth

pytestmark = pytest.mark.usefixtures("no_backoff")

TOKEN = "a-long-enough-dashboard-token"
#: threads in the test's threadpool (anyio's default limiter, made small): all held by units
THREADS = 2
#: the advisory lock the units wait for, held by the test
LOCK_KEY = 4_242_001
#: how long the test waits for an answer before it lets the units go anyway (then the order
#: shows the dashboard waited for them); never reached when the dashboard works
BOUND_SECONDS = 30.0


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url, pool_size=THREADS + 2, max_overflow=0)
    yield eng
    eng.dispose()


@contextlib.asynccontextmanager
async def small_threadpool(app: Starlette) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
    yield


def test_the_dashboard_answers_while_sync_endpoints_fill_the_threadpool_waiting_on_the_database(
    engine: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)

    def slow(request: Request) -> JSONResponse:  # a sync endpoint: one thread of the pool
        def unit(session: Session) -> int:
            session.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            return 1

        return JSONResponse({"v": Sessions.run(unit)})

    app = Starlette(
        routes=[
            Route("/slow", slow),
            Mount("/admin/self-healing", app=dashboard(auth=token_auth(TOKEN))),
        ],
        lifespan=small_threadpool,
    )
    install_exception_handlers(app)
    order: list[str] = []
    answered = threading.Event()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    holder = engine.connect()
    holder.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
    try:
        with TestClient(app) as client:

            def call_slow() -> None:
                status = client.get("/slow").status_code
                order.append(f"slow {status}")

            def call_dashboard() -> None:
                answers = [
                    client.get("/admin/self-healing/data.json", headers=bearer).status_code,
                    client.get("/admin/self-healing/", headers=bearer).status_code,
                    client.get("/admin/self-healing/data.json").status_code,  # no token: 401
                    client.get(
                        "/admin/self-healing/data.json", headers={"Authorization": "Bearer wrong"}
                    ).status_code,
                ]
                order.append(f"dashboard {answers}")
                answered.set()

            units = [threading.Thread(target=call_slow) for _ in range(THREADS)]
            for thread in units:
                thread.start()
            for _ in range(1000):  # bounded: every thread of the pool waits on the database
                if waiting_on_lock(engine, LOCK_KEY) == THREADS:
                    break
                threading.Event().wait(0.01)
            assert waiting_on_lock(engine, LOCK_KEY) == THREADS
            board = threading.Thread(target=call_dashboard)
            board.start()
            answered.wait(BOUND_SECONDS)
            still_waiting = waiting_on_lock(engine, LOCK_KEY)
            order.append("units released")
            holder.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            holder.commit()
            for thread in [*units, board]:
                thread.join(BOUND_SECONDS)
    finally:
        holder.close()
    assert order == [
        "dashboard [200, 200, 401, 403]",
        "units released",
        *["slow 200"] * THREADS,
    ]
    assert still_waiting == THREADS  # the units were waiting on the database all along
