"""Self-healing off (``SELF_HEALING_ENABLED=false``, the kill switch: the factories behave as
plain ``sessionmaker``s) and a COMMIT whose answer was lost: the server committed, the client saw
a disconnect.

Such an error is an unknown outcome, as with self-healing on: ``is_transient`` False and the web
layer's 500 ``commit-outcome-unknown``, never a 503 with ``Retry-After`` (a client obeying it
wrote the change twice). Nothing else of self-healing runs: no check of the outcome, no retry,
no line, no counter, and only on the error path (``handle_error``). A disconnect that is no
COMMIT's, or a refused connect, stays transient; an engine that no resilient factory uses is
not watched (its lost COMMIT is judged by the error's class, a disconnect). Real server, real
faults (the fault proxy loses the COMMIT's answer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from scenarios import assert_unknown_outcome
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db.testing import FaultProxy
from resilient_db.web import PROBLEM_JSON, install_exception_handlers, problem_details

pytestmark = pytest.mark.usefixtures("no_backoff")

OFF = rdb.Config(enabled=False)
NOTES = sa.table("off_notes", sa.column("who", sa.Text))


@pytest.fixture
def proxied(engine: sa.Engine, pg_database: str, fault_proxy: FaultProxy) -> Iterator[sa.Engine]:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE off_notes (who text NOT NULL)"))
    through_proxy = sa.create_engine(fault_proxy.url(pg_database))
    yield through_proxy
    through_proxy.dispose()


def written(engine: sa.Engine, who: str) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).where(NOTES.c.who == who)) or 0)


def _run(Sessions: Any, who: str) -> None:
    Sessions.run(lambda session: session.execute(sa.insert(NOTES).values(who=who)))


def _begin(Sessions: Any, who: str) -> None:
    with Sessions.begin() as session:
        session.execute(sa.insert(NOTES).values(who=who))


def _session_commit(Sessions: Any, who: str) -> None:
    with Sessions() as session:
        session.execute(sa.insert(NOTES).values(who=who))
        session.commit()


def _commit_statement(Sessions: Any, who: str) -> None:
    with Sessions() as session:
        session.execute(sa.insert(NOTES).values(who=who))
        session.execute(sa.text("COMMIT"))


def _engine_begin(Sessions: Any, who: str) -> None:
    with Sessions.kw["bind"].begin() as conn:  # Core, on the factory's engine
        conn.execute(sa.insert(NOTES).values(who=who))


COMMITTING: dict[str, Callable[[Any, str], None]] = {
    "run": _run,
    "begin": _begin,
    "session.commit": _session_commit,
    "text('COMMIT')": _commit_statement,
    "engine.begin": _engine_begin,
}


def test_sqlalchemys_commit_method_is_where_the_library_looks_for_it() -> None:
    """With self-healing off, a lost COMMIT answer is told from a ROLLBACK's by the frame of
    ``Connection._commit_impl`` (SQLAlchemy's, not public API) at the head of the driver error's
    traceback, in one place (``_statements.sqlalchemy_commit_failed``). This fails loudly if
    SQLAlchemy renames or moves it (the lost answer would go back to being a 503)."""
    from sqlalchemy.engine import Connection  # noqa: PLC0415

    from resilient_db import _internals  # noqa: PLC0415

    assert _internals.SQLALCHEMY_COMMIT_CODE is not None, "Connection._commit_impl is gone"
    assert _internals.SQLALCHEMY_COMMIT_CODE is Connection._commit_impl.__code__
    assert "do_commit" in Connection._commit_impl.__code__.co_names


@pytest.mark.parametrize("how", list(COMMITTING))
def test_a_lost_commit_answer_with_self_healing_off_is_an_unknown_outcome(
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service, config=OFF)
    _run(Sessions, "warm")  # a pooled connection: the next COMMIT is the change's
    fault_proxy.lose_commit_answer()
    with pytest.raises(sa.exc.DBAPIError) as raised:
        COMMITTING[how](Sessions, how)
    assert fault_proxy.commits_lost == 1
    assert written(proxied, how) == 1  # it committed: unknown, never "retry"
    assert_unknown_outcome(raised.value)
    assert events == []  # off: nothing said, nothing counted
    # the same factory, once the answer comes: as plain SQLAlchemy
    COMMITTING[how](Sessions, f"{how} again")
    assert written(proxied, f"{how} again") == 1


def test_other_failures_with_self_healing_off_stay_transient(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str
) -> None:
    """A statement's lost connection (no COMMIT sent) and a refused connect are judged by
    their class, as before: nothing was committed, a client may resubmit."""
    Sessions = rdb.ResilientSession(proxied, service=service, config=OFF)
    _run(Sessions, "warm")
    with Sessions() as session:
        session.execute(sa.select(1))
        fault_proxy.cut_all()
        with pytest.raises(sa.exc.DBAPIError) as cut:
            session.execute(sa.insert(NOTES).values(who="cut"))
    assert rdb.classify(cut.value) is rdb.Outcome.DISCONNECT
    assert rdb.is_transient(cut.value)
    fault_proxy.refuse()
    with pytest.raises(sa.exc.DBAPIError) as refused:
        _run(Sessions, "refused")
    fault_proxy.restore()
    assert rdb.is_transient(refused.value)
    for exc in (cut.value, refused.value):
        problem = problem_details(exc)
        assert problem is not None
        assert (problem.status, problem.headers) == (503, {"Retry-After": "1"})
    assert written(proxied, "cut") + written(proxied, "refused") == 0


def test_the_web_answer_with_self_healing_off(
    proxied: sa.Engine, fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    """Through the handlers: 500 ``commit-outcome-unknown`` for the factory's lost COMMIT
    answer (it was a 503 with ``Retry-After: 1``, and the client's resubmit wrote it twice).
    A plain ``sessionmaker`` on an engine no resilient factory uses is not watched: its lost
    COMMIT answer is a disconnect by its class, a 503, as the README says."""
    Sessions = rdb.ResilientSession(proxied, service=service, config=OFF)
    plain_engine = sa.create_engine(fault_proxy.url(pg_database))
    Plain = sessionmaker(plain_engine)

    def ours(request: Request) -> JSONResponse:
        _run(Sessions, "ours")
        return JSONResponse({})

    def plain(request: Request) -> JSONResponse:
        with Plain.begin() as session:
            session.execute(sa.insert(NOTES).values(who="plain"))
        return JSONResponse({})

    app = Starlette()
    app.add_route("/ours", ours, methods=["POST"])
    app.add_route("/plain", plain, methods=["POST"])
    install_exception_handlers(app)
    client = TestClient(app, raise_server_exceptions=False)
    try:
        _run(Sessions, "warm")
        with Plain.begin() as session:
            session.execute(sa.select(1))
        fault_proxy.lose_commit_answer()
        answer = client.post("/ours")
        assert answer.status_code == 500, answer.text
        assert answer.headers["content-type"] == PROBLEM_JSON
        assert answer.json()["type"] == "urn:resilient-db:problem:commit-outcome-unknown"
        assert "retry-after" not in answer.headers
        assert written(proxied, "ours") == 1
        fault_proxy.lose_commit_answer()
        unwatched = client.post("/plain")
        assert (unwatched.status_code, unwatched.headers["retry-after"]) == (503, "1")
        assert written(proxied, "plain") == 1
    finally:
        plain_engine.dispose()


# -- async -------------------------------------------------------------------------------------
@pytest.fixture(params=["asyncpg", "psycopg_async"])
def async_driver(request: pytest.FixtureRequest) -> str:
    """asyncpg sends its COMMIT through the extended protocol (prepared), psycopg as a simple
    query: the fault proxy loses either's answer."""
    return str(request.param)


@pytest_asyncio.fixture
async def async_proxied(
    proxied: sa.Engine, pg_database: str, fault_proxy: FaultProxy, async_driver: str
) -> AsyncIterator[AsyncEngine]:
    through_proxy = create_async_engine(fault_proxy.url(pg_database, driver=async_driver))
    yield through_proxy
    await through_proxy.dispose()


async def _async_run(Sessions: Any, who: str) -> None:
    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.insert(NOTES).values(who=who))

    await Sessions.run(unit)


async def _async_begin(Sessions: Any, who: str) -> None:
    async with Sessions.begin() as session:
        await session.execute(sa.insert(NOTES).values(who=who))


async def _async_commit_statement(Sessions: Any, who: str) -> None:
    async with Sessions() as session:
        await session.execute(sa.insert(NOTES).values(who=who))
        await session.execute(sa.text("COMMIT"))


ASYNC_COMMITTING: dict[str, Callable[[Any, str], Awaitable[None]]] = {
    "run": _async_run,
    "begin": _async_begin,
    "text('COMMIT')": _async_commit_statement,
}


@pytest.mark.asyncio
@pytest.mark.parametrize("how", list(ASYNC_COMMITTING))
async def test_an_async_lost_commit_answer_with_self_healing_off_is_an_unknown_outcome(
    async_proxied: AsyncEngine,
    *,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    how: str,
    events: list[rdb.SelfHealEvent],
) -> None:
    Sessions = rdb.AsyncResilientSession(async_proxied, service=service, config=OFF)
    await _async_run(Sessions, "warm")
    fault_proxy.lose_commit_answer()
    with pytest.raises(sa.exc.DBAPIError) as raised:
        await ASYNC_COMMITTING[how](Sessions, how)
    assert fault_proxy.commits_lost == 1
    assert written(proxied, how) == 1
    assert_unknown_outcome(raised.value)
    assert events == []
