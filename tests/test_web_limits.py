"""Where ``install_exception_handlers`` answers and where it can't, against real errors of a real
server: a mounted sub-application has handlers of its own (ours only when installed on it too);
an error raised in a middleware is outside them; an application's handler of a narrower class
than ours (``OperationalError``) answers before ours, and one of our own classes registered
before the call is replaced by ours. An ``ExceptionGroup`` (a ``TaskGroup``'s) is answered when
its errors are: one, or several that are each a 503."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db.web import PROBLEM_JSON, install_exception_handlers, problem_details
from resilient_db.web._problems import EXCEPTION_GROUP

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def Sessions(engine: sa.Engine, service: str) -> rdb.ResilientSession[Any]:
    # one attempt, no breaker: every request meets the server's error
    return rdb.ResilientSession(
        engine, service=service, config=rdb.Config(max_retries=0, circuit_breaker=False)
    )


def kind(answer: Any) -> str:
    """``503 database-unavailable``, or the status and body of an answer that is not ours."""
    if answer.headers.get("content-type") == PROBLEM_JSON:
        return f"{answer.status_code} {answer.json()['type'].rpartition(':')[2]}"
    return f"{answer.status_code} {answer.text[:40]}"


def failing(Sessions: rdb.ResilientSession[Any], code: str = "40001") -> Any:
    def route(request: Request) -> JSONResponse:
        Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code(:c)"), {"c": code}))
        return JSONResponse({})

    return route


def test_a_mounted_sub_application_needs_its_own_install(
    Sessions: rdb.ResilientSession[Any],
) -> None:
    route = failing(Sessions)
    for installed_on_sub in (False, True):
        sub = Starlette(routes=[Route("/x", route)])
        if installed_on_sub:
            install_exception_handlers(sub)
        app = Starlette(routes=[Mount("/sub", app=sub), Mount("/in", routes=[Route("/x", route)])])
        install_exception_handlers(app)
        client = TestClient(app, raise_server_exceptions=False)
        assert kind(client.get("/in/x")) == "503 database-unavailable"  # routes: the app's own
        assert kind(client.get("/sub/x")) == (
            "503 database-unavailable" if installed_on_sub else "500 Internal Server Error"
        )


def test_handlers_installed_after_the_first_request_are_not_used(
    Sessions: rdb.ResilientSession[Any],
) -> None:
    """Starlette builds its middleware (with a copy of the handlers) at the first request."""
    app = Starlette(routes=[Route("/x", failing(Sessions))])
    client = TestClient(app, raise_server_exceptions=False)
    assert kind(client.get("/x")) == "500 Internal Server Error"
    install_exception_handlers(app)
    assert kind(client.get("/x")) == "500 Internal Server Error"


def test_an_error_raised_in_a_middleware_is_not_answered(
    Sessions: rdb.ResilientSession[Any],
) -> None:
    class Audit(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            failing(Sessions)(request)  # a middleware's own unit (a sync one, for brevity)
            return await call_next(request)

    app = Starlette(
        routes=[Route("/ok", lambda request: JSONResponse({}))], middleware=[Middleware(Audit)]
    )
    install_exception_handlers(app)
    assert kind(TestClient(app, raise_server_exceptions=False).get("/ok")) == (
        "500 Internal Server Error"
    )


def test_an_apps_handler_of_a_narrower_class_answers_before_ours(
    Sessions: rdb.ResilientSession[Any],
) -> None:
    async def own(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"own": type(exc).__name__}, 599)

    for when in ("before", "after"):
        app = Starlette(routes=[Route("/x", failing(Sessions))])
        if when == "before":
            app.add_exception_handler(OperationalError, own)
        install_exception_handlers(app)
        if when == "after":
            app.add_exception_handler(OperationalError, own)
        answer = TestClient(app).get("/x")  # 40001: transient, an OperationalError
        assert (answer.status_code, answer.json()) == (599, {"own": "OperationalError"})


def test_ours_replaces_an_apps_handler_of_our_own_classes_registered_before(
    service: str,
) -> None:
    def open_circuit(request: Request) -> JSONResponse:
        raise rdb.CircuitOpenError(service, 3.0)

    async def own(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"own": type(exc).__name__}, 599)

    before = Starlette(routes=[Route("/x", open_circuit)])
    before.add_exception_handler(rdb.CircuitOpenError, own)
    install_exception_handlers(before)
    assert kind(TestClient(before).get("/x")) == "503 circuit-open"
    after = Starlette(routes=[Route("/x", open_circuit)])
    install_exception_handlers(after)
    after.add_exception_handler(rdb.CircuitOpenError, own)
    assert TestClient(after).get("/x").status_code == 599


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is Python 3.11's")
def test_a_task_groups_errors_are_answered_when_each_is_ours(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    # no pool: each connection is closed on the test client's event loop that opened it
    aengine = create_async_engine(pg_async_url, poolclass=sa.pool.NullPool)
    Sessions = rdb.AsyncResilientSession(
        aengine, service=service, config=rdb.Config(max_retries=0, circuit_breaker=False)
    )

    async def unit_raising(code: str) -> None:
        async def unit(session: AsyncSession) -> None:
            await session.execute(sa.text("SELECT raise_code(:c)"), {"c": code})

        await Sessions.run(unit)

    async def route(request: Request) -> JSONResponse:
        codes = request.query_params["codes"].split(",")
        if len(codes) == 1:  # a TaskGroup's ExceptionGroup of one error
            async with asyncio.TaskGroup() as group:
                group.create_task(unit_raising(codes[0]))
        # several errors: every unit runs to its end (a TaskGroup would cancel the others at
        # the first failure), and the application raises them together
        results = await asyncio.gather(*map(unit_raising, codes), return_exceptions=True)
        errors: Any = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise EXCEPTION_GROUP("units failed", errors)  # type: ignore[misc]
        return JSONResponse({})

    app = Starlette(routes=[Route("/x", route)])
    install_exception_handlers(app)
    client = TestClient(app, raise_server_exceptions=False)
    assert kind(client.get("/x?codes=40001")) == "503 database-unavailable"
    assert kind(client.get("/x?codes=57P03,40001")) == "503 database-unavailable"
    # one error that is not ours: the group is the application's (here: its 500)
    assert kind(client.get("/x?codes=40001,23505")) == "500 Internal Server Error"
    assert kind(client.get("/x?codes=23505")) == "500 Internal Server Error"


@pytest.mark.skipif(EXCEPTION_GROUP is None, reason="no ExceptionGroup here")
def test_problem_details_of_groups() -> None:
    group: Any = EXCEPTION_GROUP  # Python 3.11's, or the backport's
    circuit = rdb.CircuitOpenError("database", 7.0)
    short = rdb.CircuitOpenError("database", 2.0)
    own = ValueError("the application's")
    nested = group("outer", [group("inner", [circuit])])
    answer = problem_details(nested)
    assert answer is not None
    assert answer.headers["Retry-After"] == "7"
    several = problem_details(group("g", [short, circuit]))
    assert several is not None
    assert several.headers["Retry-After"] == "7"  # the longest wait
    assert problem_details(group("g", [circuit, own])) is None
    assert problem_details(group("g", [own])) is None
    many = group("g", [rdb.CircuitOpenError("database", 1.0) for _ in range(65)])
    assert problem_details(many) is None  # not looked into
