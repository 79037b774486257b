"""resilient_db.web's answer to a change that was partly saved before it failed, against real
failures on a real server: whatever the class of the error that ended it (an open circuit, an
exhausted pool, an illegal or stale transition, a transient error in one task of an
``asyncio.TaskGroup``), a client is told 500 ``partly-committed``, never a 503 with
``Retry-After`` nor a 409 saying nothing was changed: a resubmit would save the saved part
again."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from scenarios import MoveFirst, tasks_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db._classify import mark_partly_committed, partly_committed
from resilient_db.examples.tasks import Task, create_task, move_task
from resilient_db.testing import FaultProxy
from resilient_db.web import PROBLEM_JSON, install_exception_handlers, problem_details
from resilient_db.web._problems import EXCEPTION_GROUP

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def direct(pg_url: str) -> Iterator[sa.Engine]:
    """The test database with the tasks schema and its trigger, reached directly."""
    yield from tasks_engine(pg_url)


def new_task(engine: sa.Engine, idem_key: str | None = None) -> int:
    with Session(engine) as session, session.begin():
        task = create_task(session, title="t", idem_key=idem_key or str(uuid.uuid4()))
        session.flush()
        return task.id


def saved(engine: sa.Engine, idem_key: str) -> int:
    with engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM tasks WHERE idem_key = :k")
        return int(conn.execute(query, {"k": idem_key}).scalar_one())


def partly(response: Any, failure: str | None) -> dict[str, Any]:
    """``response`` is the 500 ``partly-committed`` answer, with no ``Retry-After``, saying what
    the rest failed with (``failure``: that error's own problem type)."""
    assert response.status_code == 500, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert "retry-after" not in response.headers
    body: dict[str, Any] = response.json()
    assert body["type"] == "urn:resilient-db:problem:partly-committed"
    assert "Do not resubmit blindly" in body["detail"]
    assert "retry_after" not in body
    assert body.get("failure") == failure
    return body


def app_of(route: Callable[[Request], Any]) -> TestClient:
    app = Starlette()
    app.add_route("/change", route, methods=["POST"])
    install_exception_handlers(app)
    return TestClient(app, raise_server_exceptions=False)


# -- one error, of a class answered otherwise by itself ----------------------------------------
def test_a_circuit_open_after_a_committed_part_is_partly_committed_not_503(
    direct: sa.Engine, fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    """An operation commits its first part through one factory, then the second factory's
    circuit is open (opened by refused connections): a 503 with the circuit's Retry-After had
    the client save the first part again."""
    billing_engine = sa.create_engine(
        fault_proxy.url(pg_database), connect_args={"connect_timeout": 2}
    )
    config = rdb.Config(max_retries=1, failure_threshold=1, reset_timeout=30)
    Orders = rdb.ResilientSession(direct, service=service, config=config)
    Billing = rdb.ResilientSession(billing_engine, service=f"{service}-billing", config=config)
    key = str(uuid.uuid4())

    @rdb.with_self_healing(service=f"{service}-api", config=config)
    def change(request: Request) -> JSONResponse:
        with Orders.begin() as session:  # the first part: committed
            create_task(session, title="order", idem_key=key)
        Billing.run(lambda s: s.execute(sa.text("SELECT 1")))
        return JSONResponse({})

    fault_proxy.refuse()
    with pytest.raises(rdb.CircuitOpenError):  # the billing circuit opens
        Billing.run(lambda s: s.execute(sa.text("SELECT 1")))
    try:
        body = partly(app_of(change).post("/change"), "circuit-open")
        assert body["service"] == f"{service}-billing"
        assert saved(direct, key) == 1
    finally:
        fault_proxy.restore()
        billing_engine.dispose()


def test_an_exhausted_pool_after_a_committed_part_is_partly_committed_not_503(
    pg_url: str, direct: sa.Engine, service: str
) -> None:
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    key = str(uuid.uuid4())
    raised: list[BaseException] = []

    @rdb.with_self_healing(service=service, config=rdb.Config())
    def change(request: Request) -> JSONResponse:
        with Sessions.begin() as session:  # the first part: committed
            create_task(session, title="order", idem_key=key)
        with engine.connect() as held:  # another request holds the pool's only connection
            held.exec_driver_sql("SELECT 1")
            try:
                with Sessions.begin() as session:
                    create_task(session, title="bill", idem_key=str(uuid.uuid4()))
            except sa.exc.TimeoutError as exc:
                raised.append(exc)
                raise
        return JSONResponse({})

    try:
        partly(app_of(change).post("/change"), "pool-exhausted")
        assert len(raised) == 1
        assert partly_committed(raised[0])
        assert saved(direct, key) == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("stale", [False, True], ids=["illegal", "stale"])
def test_a_refused_transition_after_the_units_own_commit_is_partly_committed_not_409(
    direct: sa.Engine, service: str, stale: bool, pg_url: str
) -> None:
    """A 409 says "the change was refused" / "nothing was changed": here the unit had committed
    a new task itself before its move of another one was refused."""
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config())
    key = str(uuid.uuid4())
    other = new_task(direct)

    def unit(session: Session) -> None:
        create_task(session, title="first", idem_key=key)
        session.commit()  # the unit commits its first part itself
        task = session.get_one(Task, other)
        move_task(session, task, "in_progress" if stale else "completed", idem_key="m")
        session.flush()

    def change(request: Request) -> JSONResponse:
        Sessions.run(unit)
        return JSONResponse({})

    # the mover's engine has no factory: its COMMIT is not the unit's
    mover_engine = sa.create_engine(pg_url)
    sql = "UPDATE tasks SET status = 'cancelled' WHERE id = :id"
    with MoveFirst(direct, mover_engine, sql, id=other) as mover:
        if not stale:
            mover.done = True  # nobody moves it: pending -> completed is refused by itself
        answer = app_of(change).post("/change")
    mover_engine.dispose()
    assert mover.done
    body = partly(answer, "stale-transition" if stale else "illegal-transition")
    assert "from_state" not in body  # no states, no row keys: the detail names the model only
    assert "Task" in body["detail"]
    assert saved(direct, key) == 1


def test_an_invalid_result_after_the_units_own_commit_is_partly_committed(
    direct: sa.Engine, service: str
) -> None:
    """The unit committed a new task itself, then its result failed validation: not the plain
    ``response-invalid`` answer, which does not say that part of the change was saved."""
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config())
    key = str(uuid.uuid4())

    class Out(BaseModel):
        id: int

    def unit(session: Session) -> dict[str, Any]:
        create_task(session, title="first", idem_key=key)
        session.commit()  # the unit commits its first part itself
        return {"id": "not a number"}

    def change(request: Request) -> JSONResponse:
        return JSONResponse(Sessions.run(unit, validate=Out))

    body = partly(app_of(change).post("/change"), "response-invalid")
    assert "not a number" not in str(body)
    assert saved(direct, key) == 1


class _Out(BaseModel):
    id: int


@pytest.mark.parametrize(
    "form", ["call-form-unit", "decorated-async-drop-in", "decorated-sync-replayed"]
)
def test_an_invalid_result_of_an_operation_that_committed_is_partly_committed(
    direct: sa.Engine, service: str, form: str
) -> None:
    """``with_self_healing(..., validate=...)`` whose operation committed (a unit run inside
    it, drop-in ``Session.begin()`` work of its own; after a replay of a real serialization
    failure too), then returned an invalid result: the change is saved, so the answer is
    ``partly-committed`` (as for a unit's invalid result after its own commit), not the plain
    ``response-invalid`` that does not say so."""
    from fastapi import FastAPI  # noqa: PLC0415

    config = rdb.Config()
    Sessions = rdb.ResilientSession(direct, service=service, config=config)
    key = str(uuid.uuid4())
    attempts: list[int] = []
    app = FastAPI()
    install_exception_handlers(app)

    def create(session: Session) -> dict[str, Any]:
        create_task(session, title="t", idem_key=key)
        session.flush()
        return {"id": "not a number"}

    if form == "call-form-unit":

        @app.post("/change")
        def call_form() -> Any:
            return rdb.with_self_healing(
                lambda: Sessions.run(create), service=service, config=config, validate=_Out
            )

    elif form == "decorated-async-drop-in":

        @app.post("/change")
        @rdb.with_self_healing(service=service, config=config, validate=_Out)
        async def decorated() -> Any:
            with Sessions.begin() as session:  # drop-in work of the operation's own
                create_task(session, title="t", idem_key=key)
            return {"id": "not a number"}

    else:

        @app.post("/change")
        @rdb.with_self_healing(service=service, config=config, validate=_Out)
        def replayed() -> Any:
            attempts.append(1)
            with Sessions.begin() as session:
                if len(attempts) == 1:  # a real serialization failure: nothing committed
                    session.execute(sa.text("SELECT raise_code('40001')"))
                create_task(session, title="t", idem_key=key)
            return {"id": "not a number"}

    with TestClient(app, raise_server_exceptions=False) as client:
        body = partly(client.post("/change"), "response-invalid")
    assert "not a number" not in str(body)
    assert saved(direct, key) == 1
    if form == "decorated-sync-replayed":
        assert len(attempts) == 2


def test_a_result_the_check_refuses_after_an_operation_committed_is_partly_committed(
    direct: sa.Engine, service: str
) -> None:
    """``with_self_healing(..., validate=...)`` whose operation committed, then returned a
    result holding an iterator (refused by the check with ``TypeError``): the change is saved,
    so the error is partly committed (``problem_details`` answers ``partly-committed``), not a
    generic error that a client resubmits after."""
    config = rdb.Config()
    Sessions = rdb.ResilientSession(direct, service=service, config=config)
    key = str(uuid.uuid4())

    def create(session: Session) -> dict[str, Any]:
        create_task(session, title="t", idem_key=key)
        return {"ids": map(int, ["1", "2"])}

    with pytest.raises(TypeError, match="holds an iterator") as info:
        rdb.with_self_healing(
            lambda: Sessions.run(create), service=service, config=config, validate=_Ids
        )
    assert partly_committed(info.value)
    answer = problem_details(info.value)
    assert answer is not None
    assert answer.status == 500
    assert answer.body["type"] == "urn:resilient-db:problem:partly-committed"
    assert saved(direct, key) == 1


class _Ids(BaseModel):
    ids: list[int]


@pytest.mark.parametrize("form", ["call-form", "decorated-async"])
def test_an_invalid_result_of_an_operation_that_committed_nothing_stays_response_invalid(
    direct: sa.Engine, service: str, form: str
) -> None:
    """An operation that only read (a unit that wrote nothing, nothing committed of its own)
    and returned an invalid result: nothing was saved, the plain ``response-invalid``."""
    from fastapi import FastAPI  # noqa: PLC0415

    config = rdb.Config()
    Sessions = rdb.ResilientSession(direct, service=service, config=config)
    app = FastAPI()
    install_exception_handlers(app)

    def read(session: Session) -> dict[str, Any]:
        session.execute(sa.select(sa.func.count()).select_from(Task))
        return {"id": "not a number"}

    if form == "call-form":

        @app.post("/change")
        def call_form() -> Any:
            return rdb.with_self_healing(
                lambda: Sessions.run(read), service=service, config=config, validate=_Out
            )

    else:

        @app.post("/change")
        @rdb.with_self_healing(service=service, config=config, validate=_Out)
        async def decorated() -> Any:
            with Sessions() as session:
                return read(session)

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/change")
    assert answer.status_code == 500
    assert answer.json()["type"] == "urn:resilient-db:problem:response-invalid"


# -- exception groups (an asyncio.TaskGroup in an async route) ---------------------------------
@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is Python 3.11's")
def test_a_task_group_whose_operation_committed_a_part_is_partly_committed_not_503(
    direct: sa.Engine, pg_async_url: str, service: str
) -> None:
    """Task A's unit commits, then task B's unit runs out of retries on a real serialization
    failure: the operation marks the group it raises (it committed A), while B's own error is
    not marked (B's unit committed nothing). Judging only the members answered 503."""
    from fastapi import FastAPI  # noqa: PLC0415

    # no pool: each connection is closed on the test client's event loop that opened it
    aengine = create_async_engine(pg_async_url, poolclass=sa.pool.NullPool)
    config = rdb.Config(max_retries=1, circuit_breaker=False)
    Sessions = rdb.AsyncResilientSession(aengine, service=service, config=config)
    key = str(uuid.uuid4())
    raised: list[BaseException] = []
    app = FastAPI()
    install_exception_handlers(app)

    @rdb.with_self_healing(service=service, config=config)
    async def operation() -> dict[str, Any]:
        a_done = asyncio.Event()

        async def a(session: AsyncSession) -> None:
            create_task(session, title="a", idem_key=key)  # type: ignore[arg-type]

        async def b(session: AsyncSession) -> None:
            await session.execute(sa.text("SELECT raise_code('40001')"))

        async def first() -> None:
            await Sessions.run(a)
            a_done.set()

        async def then() -> None:
            await a_done.wait()  # B fails after A committed
            await Sessions.run(b)

        async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined,unused-ignore]
            group.create_task(first())
            group.create_task(then())
        return {}

    @app.post("/change")
    async def change() -> dict[str, Any]:
        try:
            return await operation()
        except BaseException as exc:
            raised.append(exc)
            raise

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/change")
    (group,) = raised
    assert EXCEPTION_GROUP is not None
    assert isinstance(group, EXCEPTION_GROUP)
    assert partly_committed(group)
    members = group.exceptions  # type: ignore[attr-defined]
    assert [partly_committed(e) for e in members] == [False]
    assert rdb.is_transient(members[0])
    partly(answer, "database-unavailable")
    assert saved(direct, key) == 1


@pytest.mark.skipif(EXCEPTION_GROUP is None, reason="no ExceptionGroup here")
def test_a_group_is_judged_as_one_error_is_unknown_outcome_then_partly_committed_first() -> None:
    """Beside 503s, a member with an unknown commit outcome makes the group's answer that
    (it was not answered at all), and a partly-committed member or a partly-committed group,
    nested or not, makes it ``partly-committed`` (a 503 of another member, or nothing)."""
    group: Any = EXCEPTION_GROUP  # Python 3.11's, or the backport's
    opened = rdb.CircuitOpenError("db", 3.0)
    unknown = rdb.CommitOutcomeUnknownError("db")

    def marked(exc: BaseException) -> BaseException:
        mark_partly_committed(exc)
        return exc

    def answer(exc: BaseException) -> tuple[int, str, str | None] | None:
        found = problem_details(exc)
        if found is None:
            return None
        kind = found.body["type"].rpartition(":")[2]
        return found.status, kind, found.headers.get("Retry-After")

    assert answer(group("g", [opened, unknown])) == (500, "commit-outcome-unknown", None)
    assert answer(group("g", [opened, marked(rdb.CircuitOpenError("db", 3.0))])) == (
        500,
        "partly-committed",
        None,
    )
    assert answer(group("g", [marked(ValueError("app")), opened])) == (
        500,
        "partly-committed",
        None,
    )
    assert answer(marked(group("g", [opened]))) == (500, "partly-committed", None)
    nested = group("outer", [group("inner", [opened]), opened])
    mark_partly_committed(nested.exceptions[0])
    assert answer(nested) == (500, "partly-committed", None)
    # unknown before partly committed, in a group as in one error
    assert answer(marked(group("g", [opened, unknown]))) == (
        500,
        "commit-outcome-unknown",
        None,
    )
    # a marked group of an error of the application's own: answered, saying no more
    app_own = problem_details(marked(group("g", [ValueError("secret")])))
    assert app_own is not None
    assert app_own.status == 500
    assert "failure" not in app_own.body
    assert "secret" not in str(app_own.body)
    # too many errors to look into: a marked group is still no 503
    many = marked(group("g", [rdb.CircuitOpenError("db", 1.0) for _ in range(100)]))
    assert answer(many) == (500, "partly-committed", None)
    # unmarked, as before
    assert answer(group("g", [opened, rdb.CircuitOpenError("db", 9.0)])) == (
        503,
        "circuit-open",
        "9",
    )
    assert answer(group("g", [opened, ValueError("app")])) is None


# -- the error of the application's own, answered: logged, as the server would have -------------
def test_a_database_error_of_the_apps_own_after_a_committed_part_is_logged_with_its_traceback(
    direct: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug (a column that does not exist, 42703) after the unit's own COMMIT is answered
    ``partly-committed``: the answer hides it from the application's handlers and from the
    server, which would have logged its traceback. The handler logs it (an ERROR line of
    ``resilient_db.web``: its frames and SQLSTATE, no text of the database's, which may quote
    values); the unit's own line names only its class."""
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config())
    key = str(uuid.uuid4())
    value = f"private-{uuid.uuid4()}"  # a value the query is given: never logged
    query = sa.text("SELECT " + "no_such_" + "column FROM tasks WHERE title = :title")

    def unit(session: Session) -> None:
        create_task(session, title="first", idem_key=key)
        session.commit()
        session.execute(query, {"title": value})

    def where_it_failed(request: Request) -> JSONResponse:
        return JSONResponse(Sessions.run(unit))

    with caplog.at_level(logging.ERROR, logger="resilient_db.web"):
        partly(app_of(where_it_failed).post("/change"), None)
    assert saved(direct, key) == 1
    (line,) = [r for r in caplog.records if r.name == "resilient_db.web"]
    assert line.levelno == logging.ERROR
    text = line.getMessage()
    assert "Answered 500 partly-committed" in text
    assert "in where_it_failed" in text  # the frames of the bug
    assert "in unit" in text
    assert "ProgrammingError: (SQLSTATE 42703" in text
    assert value not in text
    assert "no_such_column" not in text


@pytest.mark.skipif(EXCEPTION_GROUP is None, reason="no ExceptionGroup here")
def test_a_groups_error_of_the_apps_own_after_a_committed_part_is_logged_not_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A group marked partly committed whose member is the application's own (a ``KeyError``
    in one task) is answered ``partly-committed``, with nothing in the logs but the class
    ``ExceptionGroup`` before: the member's traceback is logged now, as it is when the group is
    answered for another member's unknown commit outcome. An error of ours (an open circuit
    after a committed part) is said by the library's own lines, and not again."""
    group: Any = EXCEPTION_GROUP

    def bug() -> None:
        {}["missing"]

    def raise_group(request: Request) -> JSONResponse:
        try:
            bug()
        except KeyError as exc:
            failed = group("unhandled errors in a TaskGroup", [exc])
        mark_partly_committed(failed)
        raise failed

    def raise_ours(request: Request) -> JSONResponse:
        opened = rdb.CircuitOpenError("db", 3.0)
        mark_partly_committed(opened)
        raise opened

    def raise_beside_unknown(request: Request) -> JSONResponse:
        try:
            bug()
        except KeyError as exc:
            raise group("g", [rdb.CommitOutcomeUnknownError("db"), exc]) from None

    def web_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "resilient_db.web"]

    with caplog.at_level(logging.DEBUG, logger="resilient_db.web"):
        partly(app_of(raise_group).post("/change"), None)
        (line,) = web_lines()
        caplog.clear()
        partly(app_of(raise_ours).post("/change"), "circuit-open")
        assert web_lines() == []
        # answered for the unknown outcome of one task, the bug of another is logged too
        answer = app_of(raise_beside_unknown).post("/change")
        assert answer.status_code == 500
        assert answer.json()["type"] == "urn:resilient-db:problem:commit-outcome-unknown"
        (beside,) = web_lines()
    assert beside.levelno == logging.ERROR
    said = beside.getMessage()
    assert "Answered 500 commit-outcome-unknown" in said
    assert "Error 2 of the group:" in said
    assert "KeyError: 'missing'" in said
    assert "Error 1 of the group" not in said  # ours, said by the library's own lines
    text = line.getMessage()
    assert line.levelno == logging.ERROR
    assert "failed with ExceptionGroup" in text
    assert "Error 1 of the group:" in text
    assert "in bug" in text
    assert "KeyError: 'missing'" in text


def test_an_error_of_any_class_after_an_operation_committed_is_partly_committed(
    direct: sa.Engine, service: str
) -> None:
    """A ``with_self_healing`` route whose unit committed, then failing with an error of the
    application's own class (a ``KeyError``): answered 500 ``partly-committed`` without
    ``failure``, as docs/web.md says "whatever its class". Before: only the classes the
    handlers are registered for were, and a ``KeyError`` got Starlette's plain 500, which says
    nothing of the saved part. The same error with nothing committed stays a plain 500; the
    application's own ``Exception`` handler, registered before, still answers that one."""
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config())
    keys: list[str] = []

    @rdb.with_self_healing(service=f"{service}-api")
    def committed_then_failed(request: Request) -> JSONResponse:
        keys.append(str(uuid.uuid4()))
        Sessions.run(lambda s: create_task(s, title="first", idem_key=keys[-1]))
        raise KeyError("a bug of the route's own")

    def failed(request: Request) -> JSONResponse:
        raise KeyError("a bug of the route's own")

    app = Starlette()
    app.add_route("/change", committed_then_failed, methods=["POST"])
    app.add_route("/plain", failed, methods=["POST"])
    install_exception_handlers(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        partly(client.post("/change"), None)
        plain = client.post("/plain")
    assert saved(direct, keys[-1]) == 1
    assert (plain.status_code, plain.text) == (500, "Internal Server Error")

    def own(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"own": type(exc).__name__}, status_code=500)

    mine = Starlette()
    mine.add_route("/change", committed_then_failed, methods=["POST"])
    mine.add_route("/plain", failed, methods=["POST"])
    mine.add_exception_handler(Exception, own)
    install_exception_handlers(mine)
    install_exception_handlers(mine)  # again: the application's handler is kept
    with TestClient(mine, raise_server_exceptions=False) as client:
        partly(client.post("/change"), None)
        assert client.post("/plain").json() == {"own": "KeyError"}
    assert [saved(direct, key) for key in keys] == [1, 1]

    # handlers of both Exception and 500, registered before: Starlette's last resort is the
    # one registered last, and it was left in place of ours (the partly-committed change got
    # the application's plain 500); the one Starlette would use still answers the rest
    def own_500(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"own_500": type(exc).__name__}, status_code=500)

    for first, then, answers in ((Exception, 500, "own_500"), (500, Exception, "own")):
        both = Starlette()
        both.add_route("/change", committed_then_failed, methods=["POST"])
        both.add_route("/plain", failed, methods=["POST"])
        both.add_exception_handler(first, own if first is Exception else own_500)
        both.add_exception_handler(then, own if then is Exception else own_500)
        install_exception_handlers(both)
        install_exception_handlers(both)  # again
        with TestClient(both, raise_server_exceptions=False) as client:
            partly(client.post("/change"), None)
            assert client.post("/plain").json() == {answers: "KeyError"}
    assert [saved(direct, key) for key in keys] == [1, 1, 1, 1]


@pytest.mark.skipif(EXCEPTION_GROUP is None, reason="no ExceptionGroup here")
def test_logging_that_raises_never_changes_the_answer() -> None:
    """The application's handler on ``resilient_db.web`` raises (its ``emit`` does not call
    ``handleError``): the request is still answered ``partly-committed``, its line lost (the
    handler's error came out of ours: Starlette's plain 500, which says nothing of the part
    that was saved)."""
    group: Any = EXCEPTION_GROUP

    class Raising(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("the application's log handler failed")

    def raise_group(request: Request) -> JSONResponse:
        failed = group("unhandled errors in a TaskGroup", [KeyError("missing")])
        mark_partly_committed(failed)
        raise failed

    logger = logging.getLogger("resilient_db.web")
    handler = Raising()
    logger.addHandler(handler)
    try:
        partly(app_of(raise_group).post("/change"), None)
    finally:
        logger.removeHandler(handler)


@pytest.mark.skipif(EXCEPTION_GROUP is None, reason="no ExceptionGroup here")
def test_a_group_too_large_to_look_into_after_a_committed_part_is_logged_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A group marked partly committed with more errors than are looked into (65 tasks'
    ``KeyError``): answered ``partly-committed`` all the same, its ERROR line saying its errors
    were not looked into rather than listing (or dropping) them."""
    group: Any = EXCEPTION_GROUP

    def raise_group(request: Request) -> JSONResponse:
        failed = group("unhandled errors in a TaskGroup", [KeyError(n) for n in range(65)])
        mark_partly_committed(failed)
        raise failed

    with caplog.at_level(logging.DEBUG, logger="resilient_db.web"):
        partly(app_of(raise_group).post("/change"), None)
    (line,) = [r for r in caplog.records if r.name == "resilient_db.web"]
    assert line.levelno == logging.ERROR
    said = line.getMessage()
    assert "failed with ExceptionGroup" in said
    assert "(the group's errors not looked into: more than 64)" in said
    assert "Error 1 of the group" not in said
