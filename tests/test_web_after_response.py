"""An error raised after the response started (a ``BackgroundTask`` whose unit fails) can't be
answered any more. Starlette (``starlette._exception_handler``) looks the error's class up among
the registered handlers before it looks at whether the response started, and when it finds one
raises ``RuntimeError("Caught handled exception, but response already started.")`` from the
error instead of calling it. Registering for ``DBAPIError`` and ``OSError`` therefore turns the
application's own database errors raised after the response (an ``IntegrityError`` in a
background task) into that ``RuntimeError`` too, which they were not without the handlers: the
original error is its ``__cause__``, with its own traceback, printed first in the server's log.
These tests pin that down, against a real server, for docs/web.md's note; and what still works
after the response: a background unit's failures open its breaker for the requests that follow,
and a FastAPI ``get_db`` whose COMMIT fails is answered where its teardown runs before the
response (``scope="function"``, or any FastAPI before 0.118)."""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Iterator

import fastapi
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI
from scenarios import RAISE_CODE_FUNCTION
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db.testing import FaultProxy
from resilient_db.web import PROBLEM_JSON, install_exception_handlers

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


def test_a_breaker_opened_by_background_units_makes_later_requests_fail_fast(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A FastAPI route's ``BackgroundTasks`` unit fails after the client was told 200: not
    answered, but the unit's give-up is logged and counted as any unit's, and the failures it
    shares a breaker with count: once they opened it, the next request's unit of that service
    is refused at once, answered 503 ``circuit-open`` with the breaker's ``Retry-After``."""
    Sessions = rdb.ResilientSession(
        engine,
        service=service,
        config=rdb.Config(max_retries=1, failure_threshold=2, reset_timeout=30),
    )
    app = FastAPI()
    install_exception_handlers(app)

    def background_unit() -> None:  # the server is refusing work (a failure of the database)
        Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))

    @app.post("/queue")
    def queue(tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(background_unit)
        return {"queued": True}

    @app.get("/count")
    def count() -> dict[str, int]:
        return {"rows": Sessions.run(lambda s: s.scalar(sa.text("SELECT count(*) FROM once")))}

    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        answer = client.post("/queue")  # told 200; then both attempts of its unit fail
    assert (answer.status_code, answer.json()) == (200, {"queued": True})
    said = [r.getMessage() for r in caplog.records if "57P03" in r.getMessage()]
    assert said[-1].startswith(f"[SELF-HEAL] Gave up: service={service} unavailable")
    stats = rdb.health()["services"][service]
    assert (stats["counters"]["gave_up"], stats["breaker"]["state"]) == (1, "open")
    answer = client.get("/count")  # refused without touching the database
    assert answer.status_code == 503
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.json()["type"] == "urn:resilient-db:problem:circuit-open"
    assert 29 <= int(answer.headers["retry-after"]) <= 30
    assert rdb.health()["services"][service]["counters"]["breaker_rejections"] == 1


#: FastAPI 0.118 moved the teardown of a dependency with ``yield`` after the response (0.106 to
#: 0.117 ran it before); ``Depends(..., scope="function")`` (releases that take it) runs it
#: before the response again
TEARDOWN_AFTER_RESPONSE = tuple(int(n) for n in fastapi.__version__.split(".")[:2]) >= (0, 118)
DEPENDS_TAKES_SCOPE = "scope" in inspect.signature(Depends).parameters


@pytest.fixture
def proxied(fault_proxy: FaultProxy, pg_database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(fault_proxy.url(pg_database))
    yield engine
    engine.dispose()


@pytest.mark.parametrize(
    "case",
    [(scope, fault) for scope in (None, "function") for fault in ("answer-lost", "backend-killed")],
    ids=lambda case: "-".join(str(part) for part in case),
)
def test_a_get_db_dependency_whose_commit_fails_is_answered_where_its_teardown_runs_first(
    engine: sa.Engine,
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    case: tuple[str | None, str],
) -> None:
    """The common ``get_db`` (a drop-in session that commits after ``yield``) and a COMMIT that
    fails: its answer lost (the row saved), or its backend killed while the route's transaction
    was open (nothing saved). Where the teardown runs before the response, the client is told
    500 ``commit-outcome-unknown`` (a drop-in COMMIT that got no answer: it may have written),
    never a success; where it runs after, the client was already told 200 (docs/web.md). The
    row is written once at most, and the session's connection goes back to the pool."""
    scope, fault = case
    if scope is not None and not DEPENDS_TAKES_SCOPE:
        pytest.skip(f"FastAPI {fastapi.__version__}'s Depends takes no scope=")
    Sessions = rdb.ResilientSession(proxied, service=service)

    def get_db() -> Iterator[Session]:
        with Sessions() as session:
            yield session
            session.commit()

    db = Depends(get_db) if scope is None else Depends(get_db, scope=scope)  # type: ignore[call-arg,unused-ignore]
    app = FastAPI()
    install_exception_handlers(app)

    @app.post("/rows/{k}")
    def add(k: int, session: Session = db) -> dict[str, int]:
        session.execute(sa.text("INSERT INTO once VALUES (:k)"), {"k": k})
        if fault == "backend-killed":
            pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        else:
            fault_proxy.lose_commit_answer()  # the COMMIT is done, its answer never comes
        return {"k": k}

    answer = TestClient(app, raise_server_exceptions=False).post("/rows/2")
    if scope is None and TEARDOWN_AFTER_RESPONSE:
        assert (answer.status_code, answer.json()) == (200, {"k": 2})  # said before the COMMIT
    else:
        assert answer.status_code == 500, answer.text
        assert answer.headers["content-type"] == PROBLEM_JSON
        assert answer.json()["type"] == "urn:resilient-db:problem:commit-outcome-unknown"
    with engine.connect() as conn:
        saved = conn.execute(sa.text("SELECT count(*) FROM once WHERE k = 2")).scalar_one()
    assert saved == (1 if fault == "answer-lost" else 0)
    assert proxied.pool.checkedout() == 0
