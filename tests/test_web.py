"""resilient_db.web's exception handlers through Starlette's test client, against real failures on
a real server: an open breaker (refused connections through the fault proxy), illegal transitions
by each path (flush, ORM bulk UPDATE, the trigger), a stale transition (the row moved by another
transaction), lost COMMIT answers that can't be verified, and an invalid response. Every answer is
RFC 9457 problem details (``application/problem+json``)."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from scenarios import MoveFirst, driver_connection, on_event_loop, tasks_engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db.examples.tasks import Task, create_task, move_task
from resilient_db.testing import FaultProxy, free_port
from resilient_db.web import PROBLEM_JSON, install_exception_handlers, problem_details
from resilient_db.web._handlers import HANDLED

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def direct(pg_url: str) -> Iterator[sa.Engine]:
    """The test database with the tasks schema and its trigger, reached directly."""
    yield from tasks_engine(pg_url)


@pytest.fixture
def proxied(direct: sa.Engine, fault_proxy: FaultProxy, pg_database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(
        fault_proxy.url(pg_database), connect_args={"connect_timeout": 2}, pool_pre_ping=False
    )
    yield engine
    engine.dispose()


class TaskOut(BaseModel):
    id: int
    title: str
    status: str


def new_task(engine: sa.Engine) -> int:
    with Session(engine) as session, session.begin():
        task = create_task(session, title="t", idem_key=str(uuid.uuid4()))
        session.flush()
        return task.id


def status_of(engine: sa.Engine, task_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.select(Task.status).where(Task.id == task_id)).scalar_one())


def make_app(Sessions: rdb.ResilientSession[Any], *, config: rdb.Config | None = None) -> Starlette:
    """A small tasks API: each route is one unit of work."""

    def move(session: Session, task_id: int, to: str, how: str) -> dict[str, Any]:
        task = session.get(Task, task_id)
        if task is None:
            return {"missing": task_id}
        if how == "flush":
            move_task(session, task, to, idem_key=str(uuid.uuid4()))
            session.flush()
        elif how == "orm-update":
            session.execute(sa.update(Task).where(Task.id == task_id).values(status=to))
        else:
            session.execute(
                sa.text("UPDATE tasks SET status = :to WHERE id = :id"), {"to": to, "id": task_id}
            )
        return {"id": task_id, "title": task.title, "status": to}

    def move_route(request: Request) -> JSONResponse:
        params = request.path_params
        how = request.query_params.get("via", "flush")
        body = Sessions.run(move, int(params["task_id"]), params["to"], how)
        return JSONResponse(body)

    def list_route(request: Request) -> JSONResponse:
        rows = Sessions.run(lambda s: [t.id for t in s.scalars(sa.select(Task))])
        return JSONResponse(rows)

    def invalid_route(request: Request) -> JSONResponse:
        body = Sessions.run(lambda s: {"id": "not a number"}, validate=TaskOut)
        return JSONResponse(body)

    def broken_route(request: Request) -> JSONResponse:
        Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('22012')")))
        return JSONResponse({})

    app = Starlette(
        routes=[
            Route("/tasks/{task_id:int}/{to}", move_route, methods=["POST"]),
            Route("/tasks", list_route),
            Route("/invalid", invalid_route),
            Route("/broken", broken_route),
        ]
    )
    install_exception_handlers(app, config=config)
    return app


def problem(response: Any, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:resilient-db:problem:{kind}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


# -- an open breaker -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        rdb.Config(max_retries=1, failure_threshold=2, reset_timeout=30),
        # the unit's only attempt opens it (retry off: said as max_retries=0, or retry=False)
        rdb.Config(max_retries=0, failure_threshold=1, reset_timeout=30),
        rdb.Config(retry=False, failure_threshold=1, reset_timeout=30),
    ],
    ids=["retries-ran-out", "no-retries", "retry-off"],
)
def test_refused_connections_give_503_then_the_open_breaker_503_with_retry_after(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, config: rdb.Config
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service, config=config)
    client = TestClient(make_app(Sessions))
    assert client.get("/tasks").json() == []
    fault_proxy.refuse(cut=True)  # the pooled connection is cut, new ones are refused
    # two failed attempts: retries ran out, and the breaker opened on the second: the answer
    # says how long it refuses (Retry-After: 1 had the client meet the open circuit)
    first = client.get("/tasks")
    body = problem(first, 503, "database-unavailable")
    assert 29 <= body["retry_after"] <= 30
    assert first.headers["retry-after"] == str(body["retry_after"])
    assert "circuit breaker opened" in body["detail"]
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    accepted = fault_proxy.connections_accepted
    second = client.get("/tasks")
    body = problem(second, 503, "circuit-open")
    assert body["service"] == service
    assert second.headers["retry-after"] == str(body["retry_after"])
    assert 29 <= body["retry_after"] <= 30  # whole seconds, rounded up
    assert fault_proxy.connections_accepted == accepted  # rejected without touching the network
    fault_proxy.restore()


@pytest.mark.parametrize(
    "where", ["drop-in connect", "unit inside an operation", "drop-in inside an operation"]
)
def test_the_requests_own_failures_opening_the_breaker_give_its_retry_after_from_anywhere(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, where: str
) -> None:
    """The failures that opened the breaker were a drop-in session's connect (the driver's
    error, marked, wrapped by SQLAlchemy), or a unit's or a drop-in session's inside an
    operation of another service (which runs them once, its own breaker and retries around
    them): the answer said Retry-After 1, and the client met the open circuit."""
    # inside an operation a unit or drop-in session runs once per attempt of the operation,
    # whose third attempt's failure opens the breaker; a drop-in connect retries on its own
    nested = where != "drop-in connect"
    Sessions = rdb.ResilientSession(
        proxied,
        service=service,
        config=rdb.Config(max_retries=1, failure_threshold=3 if nested else 2),
    )

    def dropin() -> int:
        with Sessions() as session:
            return int(session.execute(sa.text("SELECT 1")).scalar_one())

    def unit() -> int:
        return Sessions.run(lambda s: int(s.execute(sa.text("SELECT 1")).scalar_one()))

    api = rdb.Config(max_retries=2, failure_threshold=50)
    calls = {
        "drop-in connect": dropin,
        "unit inside an operation": lambda: rdb.with_self_healing(
            unit, service=f"{service}-api", config=api
        ),
        "drop-in inside an operation": lambda: rdb.with_self_healing(
            dropin, service=f"{service}-api", config=api
        ),
    }
    fault_proxy.refuse(cut=True)
    with pytest.raises(sa.exc.OperationalError) as info:
        calls[where]()
    fault_proxy.restore()
    assert rdb.health()["services"][service]["breaker"]["state"] == "open"
    answer = problem_details(info.value)
    assert answer is not None
    assert answer.body["type"].endswith("database-unavailable")
    assert 29 <= int(answer.headers["Retry-After"]) <= 30
    assert "circuit breaker opened" in answer.body["detail"]


# -- illegal transitions, by each path -------------------------------------------------------------
@pytest.mark.parametrize(
    ("how", "via"), [("flush", "flush"), ("orm-update", "orm-update"), ("raw-sql", "db")]
)
def test_illegal_transition_gives_409_by_each_path(
    direct: sa.Engine, service: str, how: str, via: str
) -> None:
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config(bulk_update="raise"))
    client = TestClient(make_app(Sessions))
    task_id = new_task(direct)
    answer = client.post(f"/tasks/{task_id}/completed", params={"via": how})
    body = problem(answer, 409, "illegal-transition")
    assert body["via"] == via
    assert body["from_state"] == "pending"
    assert body["to_state"] == "completed"
    assert body["model"] == "Task"
    assert body["column"] == "status"
    assert "pk" not in body  # row keys only when the operator opted in
    assert str(task_id) not in body["detail"]
    assert status_of(direct, task_id) == "pending"
    # a legal move through the same route works
    assert client.post(f"/tasks/{task_id}/in_progress", params={"via": how}).status_code == 200
    assert status_of(direct, task_id) == "in_progress"


def test_an_invalid_environment_setting_turns_no_answer_into_a_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An application that gives its factories ``config=`` in code runs with a stray
    ``SELF_HEALING_*`` variable in its environment; its error answers must not fail on it (an
    open circuit answered 500 instead of 503 with Retry-After). Row keys: none, as by default."""
    monkeypatch.setenv("SELF_HEALING_RETRIES", "5")  # a typo of SELF_HEALING_MAX_RETRIES
    with pytest.raises(rdb.ConfigError):
        rdb.load_config()
    opened = problem_details(rdb.CircuitOpenError("db", 3.0))
    assert opened is not None
    assert (opened.status, opened.headers) == (503, {"Retry-After": "3"})
    assert problem_details(OSError("disk full")) is None  # the application's own
    illegal = problem_details(
        rdb.IllegalTransitionError(
            model="Task", pk=7, column="status", from_state="a", to_state="b", via="flush"
        )
    )
    assert illegal is not None
    assert illegal.status == 409
    assert "pk" not in illegal.body
    app = Starlette()
    install_exception_handlers(app)
    handler = app.exception_handlers[rdb.CircuitOpenError]
    answer = asyncio.run(handler(Request({"type": "http"}), rdb.CircuitOpenError("db", 3.0)))
    assert answer.status_code == 503


def test_row_keys_appear_only_when_opted_in(direct: sa.Engine, service: str) -> None:
    config = rdb.Config(log_row_keys=True)
    Sessions = rdb.ResilientSession(direct, service=service, config=config)
    client = TestClient(make_app(Sessions, config=config))
    task_id = new_task(direct)
    body = problem(client.post(f"/tasks/{task_id}/completed"), 409, "illegal-transition")
    assert body["pk"] == task_id


def test_row_keys_follow_the_environment_as_last_read_not_at_each_error(
    direct: sa.Engine, service: str, clean_env: pytest.MonkeyPatch
) -> None:
    """Without ``config=``, the handlers follow ``SELF_HEALING_LOG_ROW_KEYS`` as the process
    read it (at first use, then at each ``reload_config()``), as the factories and the logs do:
    setting it in a running process shows no key until the next reload."""
    rdb.reload_config()  # the environment without SELF_HEALING_* variables, read now
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config())
    client = TestClient(make_app(Sessions))
    task_id = new_task(direct)
    try:
        clean_env.setenv("SELF_HEALING_LOG_ROW_KEYS", "true")
        body = problem(client.post(f"/tasks/{task_id}/completed"), 409, "illegal-transition")
        assert "pk" not in body
        rdb.reload_config()
        body = problem(client.post(f"/tasks/{task_id}/completed"), 409, "illegal-transition")
        assert body["pk"] == task_id
    finally:
        clean_env.delenv("SELF_HEALING_LOG_ROW_KEYS")
        rdb.reload_config()


def test_stale_transition_gives_409_telling_to_reload(
    direct: sa.Engine, service: str, pg_url: str
) -> None:
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config())
    client = TestClient(make_app(Sessions))
    task_id = new_task(direct)
    # another transaction cancels the task between this unit's read and its UPDATE, through an
    # engine of its own: one of the unit's factory would count its COMMIT, sent in the unit's
    # thread while the unit runs, as the unit's own (partly committed, a 500)
    other = sa.create_engine(pg_url)
    with MoveFirst(
        direct, other, "UPDATE tasks SET status = 'cancelled' WHERE id = :id", id=task_id
    ) as mover:
        answer = client.post(f"/tasks/{task_id}/in_progress")
    other.dispose()
    assert mover.done
    body = problem(answer, 409, "stale-transition")
    assert "Reload" in body["detail"]
    assert body["from_state"] == "pending"
    assert body["to_state"] == "in_progress"
    assert status_of(direct, task_id) == "cancelled"


# -- lost COMMIT answers ---------------------------------------------------------------------------
def test_unverifiable_lost_commit_answer_gives_500_of_its_own_type(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, direct: sa.Engine
) -> None:
    """The COMMIT's answer is lost and nobody can connect again to ask what became of it."""
    Sessions = rdb.ResilientSession(
        proxied, service=service, config=rdb.Config(circuit_breaker=False, max_retries=1)
    )

    def create(session: Session) -> dict[str, Any]:
        create_task(session, title="maybe", idem_key="lost-answer")
        session.flush()
        fault_proxy.lose_commit_answer()
        fault_proxy.refuse()
        return {}

    app = make_app(Sessions)
    app.add_route("/create", lambda request: JSONResponse(Sessions.run(create)), methods=["POST"])
    answer = TestClient(app).post("/create")
    body = problem(answer, 500, "commit-outcome-unknown")
    assert "Do not resubmit blindly" in body["detail"]
    assert body["service"] == service
    fault_proxy.restore()
    with direct.connect() as conn:  # the server did commit it, once
        count = conn.execute(sa.text("SELECT count(*) FROM tasks WHERE idem_key = 'lost-answer'"))
        assert count.scalar_one() == 1


def test_swallowed_commit_then_cut_gives_500_of_its_own_type(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str, direct: sa.Engine
) -> None:
    """The COMMIT never reaches the server; the connection is cut while the client waits for it
    and the server stays unreachable: the outcome can't be known (it was in fact not applied)."""
    Sessions = rdb.ResilientSession(
        proxied, service=service, config=rdb.Config(circuit_breaker=False, max_retries=1)
    )

    def create(session: Session) -> dict[str, Any]:
        create_task(session, title="swallowed", idem_key="swallowed")
        session.flush()
        fault_proxy.swallow_commit()
        return {}

    def cut_when_held() -> None:
        deadline = time.monotonic() + 20
        while fault_proxy.commits_swallowed < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        fault_proxy.refuse(cut=True)

    app = make_app(Sessions)
    app.add_route("/create", lambda request: JSONResponse(Sessions.run(create)), methods=["POST"])
    cutter = threading.Thread(target=cut_when_held, daemon=True)
    cutter.start()
    answer = TestClient(app).post("/create")
    cutter.join(30)
    assert fault_proxy.commits_swallowed == 1
    problem(answer, 500, "commit-outcome-unknown")
    fault_proxy.restore()
    with direct.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM tasks WHERE idem_key = 'swallowed'"))
        assert count.scalar_one() == 0


# -- what is not ours ----------------------------------------------------------------------------
def test_invalid_response_gives_500_and_other_database_errors_stay_the_apps(
    direct: sa.Engine, service: str
) -> None:
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config())
    client = TestClient(make_app(Sessions), raise_server_exceptions=False)
    body = problem(client.get("/invalid"), 500, "response-invalid")
    assert "not a number" not in str(body)
    broken = client.get("/broken")  # division by zero: not transient, the app's own 500
    assert broken.status_code == 500
    assert broken.headers["content-type"] != PROBLEM_JSON
    strict = TestClient(make_app(Sessions))
    with pytest.raises(sa.exc.DataError):
        strict.get("/broken")


# -- the application's own handlers ----------------------------------------------------------------
def own_answer(status: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The application's handler, as a sync function and as a coroutine function: the error's
    class, and whether it ran on the event loop (Starlette runs a sync one in its threadpool)."""

    def sync(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"own": type(exc).__name__, "loop": on_event_loop()}, status)

    async def coro(request: Request, exc: Exception) -> JSONResponse:
        return sync(request, exc)

    return sync, coro


def raising_app(Sessions: rdb.ResilientSession[Any]) -> Starlette:
    """``/raise/{code}``: a unit of work failing with that SQLSTATE from the server."""

    def route(request: Request) -> JSONResponse:
        code = request.path_params["code"]
        Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code(:c)"), {"c": code}))
        return JSONResponse({})

    return Starlette(routes=[Route("/raise/{code}", route)])


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_other_database_errors_reach_the_apps_own_handler(
    direct: sa.Engine, service: str, kind: str, when: str
) -> None:
    """The handlers are registered for ``DBAPIError``, which Starlette prefers to the app's
    less specific ``SQLAlchemyError`` handler: what they don't answer is handed on to it,
    whether it was registered before ``install_exception_handlers`` or after."""
    Sessions = rdb.ResilientSession(
        direct, service=service, config=rdb.Config(max_retries=1, circuit_breaker=False)
    )
    app = raising_app(Sessions)
    sync, coro = own_answer(400)
    own = sync if kind == "sync" else coro
    if when == "before":
        app.add_exception_handler(SQLAlchemyError, own)
    install_exception_handlers(app)
    if when == "after":
        app.add_exception_handler(SQLAlchemyError, own)
    client = TestClient(app)
    answer = client.get("/raise/23505")  # unique violation: not transient
    assert answer.status_code == 400
    assert answer.json() == {"own": "IntegrityError", "loop": kind == "async"}
    problem(client.get("/raise/57P03"), 503, "database-unavailable")  # transient: ours


def test_the_apps_handler_of_a_class_we_register_still_answers_what_is_not_ours(
    direct: sa.Engine, service: str
) -> None:
    """A handler the app had for ``DBAPIError`` itself is replaced by ours in the app's table,
    and still answers the errors ours does not (installing twice keeps it); what nobody
    handles still reaches the app's catch-all ``Exception`` handler."""
    Sessions = rdb.ResilientSession(
        direct, service=service, config=rdb.Config(max_retries=1, circuit_breaker=False)
    )
    app = raising_app(Sessions)
    app.add_exception_handler(DBAPIError, own_answer(400)[1])
    install_exception_handlers(app)
    install_exception_handlers(app)
    client = TestClient(app)
    assert client.get("/raise/22012").json() == {"own": "DataError", "loop": True}
    problem(client.get("/raise/40001"), 503, "database-unavailable")

    catch_all = raising_app(Sessions)
    catch_all.add_exception_handler(Exception, own_answer(500)[0])
    install_exception_handlers(catch_all)
    answer = TestClient(catch_all, raise_server_exceptions=False).get("/raise/22012")
    assert answer.status_code == 500
    assert answer.json() == {"own": "DataError", "loop": False}


def test_a_refused_asyncpg_connect_gives_503_and_the_apps_own_oserrors_stay_its(
    service: str, tmp_path: Path
) -> None:
    """asyncpg's refused connect reaches the application as a plain ``ConnectionRefusedError``
    (SQLAlchemy does not wrap it): transient, so a 503 problem. The same error raised by the
    application's own code is not the database's: its own ``OSError`` handler answers it, or
    Starlette's plain 500 when it has none."""
    port = free_port()  # nothing listens there
    aengine = create_async_engine(
        f"postgresql+asyncpg://nobody:secret@127.0.0.1:{port}/db", poolclass=sa.pool.NullPool
    )
    Sessions = rdb.AsyncResilientSession(
        aengine, service=service, config=rdb.Config(max_retries=1, circuit_breaker=False)
    )

    async def query(request: Request) -> JSONResponse:
        async def unit(session: AsyncSession) -> int:
            return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

        return JSONResponse(await Sessions.run(unit))

    def own_connect(request: Request) -> JSONResponse:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return JSONResponse({})

    def own_file(request: Request) -> JSONResponse:
        return JSONResponse((tmp_path / "missing.json").read_text())

    def make(with_handler: bool) -> TestClient:
        app = Starlette(
            routes=[Route("/query", query), Route("/own", own_connect), Route("/file", own_file)]
        )
        if with_handler:
            app.add_exception_handler(OSError, own_answer(502)[1])
        install_exception_handlers(app)
        return TestClient(app, raise_server_exceptions=False)

    client = make(with_handler=True)
    answer = client.get("/query")
    body = problem(answer, 503, "database-unavailable")
    assert answer.headers["retry-after"] == "1"
    assert body["retry_after"] == 1
    assert rdb.health()["services"][service]["counters"]["retries"] == 1  # retried, then ours
    assert client.get("/own").json() == {"own": "ConnectionRefusedError", "loop": True}
    assert client.get("/file").json() == {"own": "FileNotFoundError", "loop": True}
    plain = make(with_handler=False)
    problem(plain.get("/query"), 503, "database-unavailable")
    for path in ("/own", "/file"):
        answer = plain.get(path)
        assert answer.status_code == 500
        assert answer.headers["content-type"] != PROBLEM_JSON


def test_problem_details_for_any_framework() -> None:
    p = problem_details(rdb.CircuitOpenError("db", 0.2), type_base="https://api.example/problems/")
    assert p is not None
    assert p.status == 503
    assert p.headers == {"Retry-After": "1"}
    assert p.body["type"] == "https://api.example/problems/circuit-open"
    assert problem_details(ValueError("x")) is None
    err = rdb.StaleTransitionError(
        model="Task",
        pk="alice@example.org",
        column="status",
        from_state="a",
        to_state="b",
        via="flush",
    )
    stale = problem_details(err)
    assert stale is not None
    assert stale.status == 409
    assert "alice" not in str(stale.body)
    fields: dict[str, Any] = {
        "model": "Task",
        "pk": 1,
        "column": "status",
        "from_state": None,
        "to_state": "b",
        "via": "flush",
    }
    from_null = problem_details(rdb.IllegalTransitionError(**fields))
    inserted = problem_details(rdb.IllegalTransitionError(**fields, inserted=True))
    assert from_null is not None
    assert inserted is not None
    assert "may not move from None to 'b'" in from_null.body["detail"]
    assert "may not move from a new row to 'b'" in inserted.body["detail"]
    with pytest.raises(TypeError, match="Starlette or FastAPI"):
        install_exception_handlers(object())  # type: ignore[arg-type]


def test_fastapi_app_and_decorated_async_handler(
    direct: sa.Engine, service: str, pg_async_url: str
) -> None:
    from fastapi import FastAPI  # noqa: PLC0415

    # no pool: each connection is closed on the test client's event loop that opened it
    aengine = create_async_engine(pg_async_url, poolclass=sa.pool.NullPool)
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=rdb.Config())
    app = FastAPI()
    install_exception_handlers(app)
    calls: list[int] = []

    @app.post("/tasks/{task_id}/{to}")
    @rdb.with_self_healing(service=service, config=rdb.Config())
    async def move(task_id: int, to: str) -> dict[str, Any]:
        calls.append(1)

        async def unit(session: AsyncSession) -> dict[str, Any]:
            task = await session.get(Task, task_id)
            assert task is not None
            task.status = to
            await session.flush()
            return {"id": task.id, "status": to}

        return await Sessions.run(unit)

    task_id = new_task(direct)
    with TestClient(app) as client:
        body = problem(client.post(f"/tasks/{task_id}/completed"), 409, "illegal-transition")
        assert body["via"] == "flush"
        assert calls == [1]  # never retried
        assert client.post(f"/tasks/{task_id}/in_progress").json() == {
            "id": task_id,
            "status": "in_progress",
        }
    assert status_of(direct, task_id) == "in_progress"


class _Body(BaseModel):
    name: str


def _dependency() -> str:
    return "given"


def test_a_decorated_route_with_string_annotations_keeps_its_parameter_types(
    service: str,
) -> None:
    """This module has ``from __future__ import annotations``: a decorated route's annotations
    are strings, which FastAPI (0.115.2, the lowest supported; later ones unwrap) evaluates in the
    ``__globals__`` of the function it is given, the wrapper's (``resilient_db._wrapper``),
    where ``_Body`` is not: the route could not be declared. The wrapper's signature carries
    them evaluated where the route was written."""
    from fastapi import Depends, FastAPI  # noqa: PLC0415

    @rdb.with_self_healing(service=service)
    async def handler(
        item_id: int, body: _Body, given: str = Depends(_dependency)
    ) -> dict[str, Any]:
        return {"id": item_id, "name": body.name, "given": given}

    @rdb.with_self_healing(service=service)
    def sync_handler(item_id: int, body: _Body) -> dict[str, Any]:
        return {"id": item_id, "name": body.name}

    for decorated in (handler, sync_handler):
        parameters = inspect.signature(decorated).parameters
        assert parameters["body"].annotation is _Body
        assert parameters["item_id"].annotation is int
    app = FastAPI()
    app.post("/a/{item_id}")(handler)
    app.post("/s/{item_id}")(sync_handler)
    with TestClient(app) as client:
        assert client.post("/a/3", json={"name": "n"}).json() == {
            "id": 3,
            "name": "n",
            "given": "given",
        }
        assert client.post("/s/4", json={"name": "m"}).json() == {"id": 4, "name": "m"}


# -- the factory's own classifier ------------------------------------------------------------------
@pytest.fixture
def engines(direct: sa.Engine, pg_url: str) -> Iterator[Callable[[], sa.Engine]]:
    """More engines on the test database (factories sharing one must agree on their codes)."""
    made: list[sa.Engine] = []

    def make() -> sa.Engine:
        made.append(sa.create_engine(pg_url))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


def test_the_answer_follows_the_classifier_of_the_factory_that_ran_the_unit(
    engines: Callable[[], sa.Engine], service: str
) -> None:
    """A factory that removed a code (55P03, lock not available) raised its error at once,
    never retried: that is no 503 "retrying did not help", it is the application's error. A
    factory that added a code (XX000 as unavailable) retried it until giving up: a 503, not the
    application's error. An error that never went through a factory is classified by default."""
    config = rdb.Config(max_retries=1, circuit_breaker=False)
    Busy = rdb.ResilientSession(
        engines(),
        service=f"{service}-busy",
        config=config,
        classifier=rdb.Classifier().without_codes(["55P03"]),
    )
    Custom = rdb.ResilientSession(
        engines(),
        service=f"{service}-custom",
        config=config,
        classifier=rdb.Classifier().with_codes({"XX000": "unavailable"}),
    )

    plain_engine = engines()

    def plain(request: Request) -> JSONResponse:  # no factory: the default classifier
        with plain_engine.connect() as conn:
            conn.execute(sa.text("SELECT raise_code(:c)"), {"c": request.path_params["code"]})
        return JSONResponse({})

    app = raising_app(Busy)
    app.add_route("/custom/{code}", raising_app(Custom).routes[0].endpoint)
    app.add_route("/plain/{code}", plain)
    app.add_exception_handler(SQLAlchemyError, own_answer(400)[1])
    install_exception_handlers(app)
    client = TestClient(app)

    answer = client.get("/raise/55P03")
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"own": "OperationalError", "loop": True}
    counters = rdb.health()["services"][f"{service}-busy"]["counters"]
    assert (counters["attempts"], counters["retries"]) == (1, 0)  # never retried

    answer = client.get("/custom/XX000")
    body = problem(answer, 503, "database-unavailable")
    assert answer.headers["retry-after"] == "1"
    assert body["retry_after"] == 1
    counters = rdb.health()["services"][f"{service}-custom"]["counters"]
    assert (counters["retries"], counters["gave_up"]) == (1, 1)

    problem(client.get("/plain/55P03"), 503, "database-unavailable")
    assert client.get("/plain/XX000").json() == {"own": "InternalError", "loop": True}


def test_a_drop_in_sessions_error_follows_its_engines_classifier(
    engines: Callable[[], sa.Engine], service: str
) -> None:
    """Drop-in use (``with Session() as s``, no unit): the error never reaches the retry engine,
    but the engine's hooks saw it, with the classifier its factories agreed on. A code that
    classifier removed (55P03) is the application's error, not a 503; one it added (XX000 as
    unavailable) is a 503 "database-unavailable"."""
    Busy = rdb.ResilientSession(
        engines(),
        service=f"{service}-busy",
        classifier=rdb.Classifier().without_codes(["55P03"]).with_codes({"XX000": "unavailable"}),
    )

    def route(request: Request) -> JSONResponse:
        with Busy() as session:
            session.execute(sa.text("SELECT raise_code(:c)"), {"c": request.path_params["code"]})
        return JSONResponse({})

    app = Starlette(routes=[Route("/raise/{code}", route)])
    app.add_exception_handler(SQLAlchemyError, own_answer(400)[1])
    install_exception_handlers(app)
    client = TestClient(app)
    answer = client.get("/raise/55P03")
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"own": "OperationalError", "loop": True}
    problem(client.get("/raise/XX000"), 503, "database-unavailable")


class _Orig(Exception):
    """A driver error with a SQLSTATE (a serialization failure)."""

    sqlstate = "40001"


class _Frozen(sa.exc.OperationalError):
    """A database error that refuses attributes resilient_db would set on it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("resilient_db"):
            raise AttributeError(name)
        super().__setattr__(name, value)


class _FrozenValueError(ValueError):
    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(name)


def test_errors_that_refuse_attributes_are_raised_as_they_are(service: str) -> None:
    """An error on which the outcome can't be recorded is raised unchanged (given up after its
    retries, or at once) and answered as the default classifier says."""
    config = rdb.Config(max_retries=1, circuit_breaker=False)
    frozen = _Frozen("SELECT 1", None, _Orig("could not serialize"))
    calls: list[int] = []

    def conflict() -> None:
        calls.append(1)
        raise frozen

    with pytest.raises(_Frozen) as raised:
        rdb.with_self_healing(conflict, service=service, config=config)
    assert raised.value is frozen
    assert calls == [1, 1]  # retried once, then given up
    answered = problem_details(frozen)
    assert answered is not None
    assert answered.status == 503

    def bug() -> None:
        raise _FrozenValueError("a bug")

    with pytest.raises(_FrozenValueError):
        rdb.with_self_healing(bug, service=service, config=config)


# -- WebSocket routes ----------------------------------------------------------------------------
def test_websocket_routes_are_closed_with_a_code_not_answered_with_http(
    direct: sa.Engine, service: str
) -> None:
    """A problem met on a WebSocket route closes the connection: 1013 (try again later) for a
    503, 1011 otherwise, with the problem's title as the reason; before ``accept()`` as after.
    A connection the route closed itself is left as it is."""
    from starlette.routing import WebSocketRoute  # noqa: PLC0415
    from starlette.websockets import WebSocket, WebSocketDisconnect  # noqa: PLC0415

    Sessions = rdb.ResilientSession(
        direct, service=service, config=rdb.Config(max_retries=1, circuit_breaker=False)
    )
    task_id = new_task(direct)

    async def unavailable_after_accept(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        Sessions.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))

    async def illegal_before_accept(websocket: WebSocket) -> None:
        def move(session: Session) -> None:
            task = session.get(Task, task_id)
            assert task is not None
            move_task(session, task, "completed", idem_key=str(uuid.uuid4()))
            session.flush()

        Sessions.run(move)

    async def open_circuit_before_accept(websocket: WebSocket) -> None:
        raise rdb.CircuitOpenError(service, 12.0)

    async def closed_then_raised(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close(code=1000)
        raise rdb.CircuitOpenError(service, 12.0)

    app = Starlette(
        routes=[
            WebSocketRoute("/unavailable", unavailable_after_accept),
            WebSocketRoute("/illegal", illegal_before_accept),
            WebSocketRoute("/open", open_circuit_before_accept),
            WebSocketRoute("/closed", closed_then_raised),
        ]
    )
    install_exception_handlers(app)
    client = TestClient(app)

    with client.websocket_connect("/unavailable") as ws:
        assert ws.receive_text() == "hello"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert (closed.value.code, closed.value.reason) == (1013, "Database temporarily unavailable")
    assert rdb.health()["services"][service]["counters"]["gave_up"] == 1

    for path, code, reason in (
        ("/open", 1013, "Service temporarily unavailable"),
        ("/illegal", 1011, "Illegal status transition"),
    ):
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(path):
            pass
        assert (refused.value.code, refused.value.reason) == (code, reason)
    assert status_of(direct, task_id) == "pending"

    with client.websocket_connect("/closed") as ws, pytest.raises(WebSocketDisconnect) as ended:
        ws.receive_text()
    assert ended.value.code == 1000


def test_a_client_chosen_megabyte_state_is_not_sent_back_whole() -> None:
    """A refused move to a status of a megabyte (the client's own) is answered with the state
    cut at 1,000 characters, marked, in the members and the detail alike."""
    huge = "X" * 1_000_000
    answer = problem_details(
        rdb.IllegalTransitionError(
            model="Task", pk=1, column="status", from_state=huge, to_state=huge, via="flush"
        )
    )
    assert answer is not None
    assert answer.body["to_state"] == "X" * 1000 + "…(+999000 characters)"
    assert answer.body["from_state"] == answer.body["to_state"]
    assert len(json.dumps(answer.body)) < 5_000


# -- Retry-After ---------------------------------------------------------------------------------
def test_retry_after_is_whole_seconds_from_one_second_to_a_day() -> None:
    """Whatever ``retry_after`` a ``CircuitOpenError`` carries (infinite, huge, not a number),
    the answer is a sane whole number of seconds, never an exception."""
    for seconds, expected in (
        (0.0, 1),
        (0.2, 1),
        (29.01, 30),
        (86_399.5, 86_400),
        (1e12, 86_400),
        (float("inf"), 86_400),
        (float("nan"), 1),
    ):
        answer = problem_details(rdb.CircuitOpenError("db", seconds))
        assert answer is not None, seconds
        assert answer.headers == {"Retry-After": str(expected)}, seconds
        assert answer.body["retry_after"] == expected
        assert f"for {expected} s." in answer.body["detail"]

    def open_forever(request: Request) -> JSONResponse:
        raise rdb.CircuitOpenError("db", float("inf"))

    app = Starlette(routes=[Route("/", open_forever)])
    install_exception_handlers(app)
    answer = TestClient(app).get("/")
    problem(answer, 503, "circuit-open")
    assert answer.headers["retry-after"] == "86400"


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"type_base": None}, "type_base"),
        ({"type_base": 42}, "type_base"),
        ({"config": {"log_row_keys": False}}, "config"),
    ],
)
def test_install_exception_handlers_refuses_arguments_that_would_answer_500(
    arguments: dict[str, Any], named: str
) -> None:
    """Accepted, these turned every problem answer into a plain 500: refused at once, naming
    the argument, with nothing installed."""
    app = Starlette()
    with pytest.raises(TypeError, match=named):
        install_exception_handlers(app, **arguments)
    assert not any(cls in app.exception_handlers for cls in HANDLED)


def test_a_state_json_calls_nan_or_infinity_is_answered_409_not_500(
    direct: sa.Engine, service: str
) -> None:
    """A JSON body may say ``NaN`` or ``Infinity`` (Python's ``json``, which Starlette and
    FastAPI parse bodies with, reads them as floats): a move to such a status is refused by the
    guard, and answered 409 with the state as text. Kept as a float, it made the answer
    unrenderable (``JSONResponse`` refuses NaN): a plain 500 raised from the handler."""
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config())
    task_id = new_task(direct)

    async def move_route(request: Request) -> JSONResponse:
        wanted = (await request.json())["status"]

        def move(session: Session) -> None:
            task = session.get_one(Task, task_id)
            move_task(session, task, wanted, idem_key=str(uuid.uuid4()))
            session.flush()

        Sessions.run(move)
        return JSONResponse({})

    app = Starlette(routes=[Route("/move", move_route, methods=["POST"])])
    install_exception_handlers(app)
    client = TestClient(app, raise_server_exceptions=False)
    for sent, said in ((b"NaN", "nan"), (b"Infinity", "inf"), (b"-Infinity", "-inf")):
        answer = client.post(
            "/move",
            content=b'{"status": ' + sent + b"}",
            headers={"content-type": "application/json"},
        )
        body = problem(answer, 409, "illegal-transition")
        assert body["to_state"] == said
        assert body["from_state"] == "pending"
    assert status_of(direct, task_id) == "pending"


def test_a_transient_error_of_a_statement_sent_on_psycopgs_own_connection_gives_503(
    direct: sa.Engine, service: str
) -> None:
    """A statement a unit sends on psycopg's own connection (COPY, a ``psycopg.sql``
    composition) fails with psycopg's error, which SQLAlchemy never wraps: a serialization
    failure (40001) that ran out of retries is answered 503 like the same error sent through
    SQLAlchemy, not left to the application's 500 (asyncpg's own classes were answered; psycopg's
    had no handler). psycopg's errors the handlers don't answer stay the application's."""
    config = rdb.Config(max_retries=1, circuit_breaker=False)
    Sessions = rdb.ResilientSession(direct, service=service, config=config)

    def raw(code: str) -> Callable[[Request], JSONResponse]:
        def unit(session: Session) -> None:
            with driver_connection(session).cursor() as cursor:
                cursor.execute("SELECT raise_code(%s)", (code,))

        def route(request: Request) -> JSONResponse:
            Sessions.run(unit)
            return JSONResponse({})

        return route

    app = Starlette(routes=[Route("/conflict", raw("40001")), Route("/division", raw("22012"))])
    install_exception_handlers(app)
    client = TestClient(app, raise_server_exceptions=False)
    body = problem(client.get("/conflict"), 503, "database-unavailable")
    assert body["retry_after"] == 1
    refused = client.get("/division")  # not transient: the application's, as before
    assert refused.status_code == 500
    assert refused.headers["content-type"] != PROBLEM_JSON
