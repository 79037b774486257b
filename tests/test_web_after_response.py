"""An error raised after the response started (a ``BackgroundTask`` whose unit fails) can't be
answered any more. Starlette (``starlette._exception_handler``) looks the error's class up among
the registered handlers before it looks at whether the response started, and when it finds one
raises ``RuntimeError("Caught handled exception, but response already started.")`` from the
error instead of calling it. Registering for ``DBAPIError`` and ``OSError`` therefore turns the
application's own database errors raised after the response (an ``IntegrityError`` in a
background task) into that ``RuntimeError`` too, which they were not without the handlers: the
original error is its ``__cause__``, with its own traceback, printed first in the server's log.
These tests pin that down, against a real server, for docs/web.md's note."""

from __future__ import annotations

import traceback
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import RAISE_CODE_FUNCTION
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db.web import install_exception_handlers

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(RAISE_CODE_FUNCTION)
        conn.execute(sa.text("CREATE TABLE once (k int PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO once VALUES (1)"))
    yield eng
    eng.dispose()


def app_with_background_unit(
    engine: sa.Engine, service: str, statement: str, *, install: bool
) -> Starlette:
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(max_retries=1))

    def background_unit() -> None:
        Sessions.run(lambda s: s.execute(sa.text(statement)))

    def queue(request: Request) -> JSONResponse:
        return JSONResponse({"queued": True}, background=BackgroundTask(background_unit))

    app = Starlette(routes=[Route("/queue", queue, methods=["POST"])])
    if install:
        install_exception_handlers(app)
    return app


@pytest.mark.parametrize(
    ("statement", "error"),
    [
        ("INSERT INTO once VALUES (1)", IntegrityError),  # the application's own error
        ("SELECT raise_code('40001')", OperationalError),  # transient, retries run out
    ],
)
def test_a_failing_background_unit_is_raised_as_starlettes_runtime_error_caused_by_it(
    engine: sa.Engine, service: str, statement: str, error: type[Exception]
) -> None:
    for install in (False, True):
        app = app_with_background_unit(engine, service, statement, install=install)
        with TestClient(app, raise_server_exceptions=False) as client:
            answer = client.post("/queue")
        assert (answer.status_code, answer.json()) == (200, {"queued": True})  # sent before
        with TestClient(app) as client, pytest.raises(Exception) as raised:  # noqa: PT011
            client.post("/queue")
        if not install:
            assert isinstance(raised.value, error)  # raised as itself
            continue
        # with the handlers: Starlette found one for its class, and the response had started
        assert type(raised.value) is RuntimeError
        assert str(raised.value) == "Caught handled exception, but response already started."
        cause = raised.value.__cause__
        assert isinstance(cause, error)
        # the original keeps its own traceback (the unit's frames), printed before the wrapper
        printed = "".join(traceback.format_exception(raised.value))
        assert printed.index(type(cause).__name__) < printed.index("RuntimeError: Caught")
        assert "background_unit" in "".join(traceback.format_tb(cause.__traceback__))
