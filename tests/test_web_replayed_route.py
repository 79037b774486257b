"""A FastAPI route decorated with ``@rdb.with_self_healing(...)`` is replayed whole after a
transient failure. FastAPI gives it request-scoped objects that outlive an attempt: the
``BackgroundTasks`` it runs after the response and the ``Response`` whose headers, cookies and
status code it copies into the answer. What a failed attempt put there (an e-mail to send, a
``Set-Cookie``, a status) is taken back before the replay, so that the answer carries the
successful attempt's alone: a task added once per attempt ran once per attempt after the
response (the e-mail sent twice), and every attempt's headers were sent. Against a real server:
the first attempt's backend is killed (``pg_terminate_backend``) in the middle of its unit."""

from collections.abc import Iterator
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI, Response
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.web import install_exception_handlers

pytestmark = pytest.mark.usefixtures("no_backoff")


def kill_own_backend(engine: sa.Engine, session: Session) -> None:
    """Terminate ``session``'s backend from another connection: its next statement fails."""
    pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


def replayed_route_app(
    engine: sa.Engine, service: str, *, is_async: bool
) -> tuple[FastAPI, list[int], list[str]]:
    """A route whose first attempt adds a background task, a header, a cookie and a status
    code, then fails in its unit; ``attempts`` counts the route's calls, ``sent`` the
    background tasks run after the response."""
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(max_retries=2))
    attempts: list[int] = []
    sent: list[str] = []

    def queued_by_a_dependency(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(sent.append, "dependency")  # before the route: kept

    def unit(session: Session) -> None:
        if len(attempts) == 1:
            kill_own_backend(engine, session)
        session.execute(sa.text("SELECT 1"))

    def attempt(background_tasks: BackgroundTasks, response: Response) -> dict[str, int]:
        attempts.append(1)
        number = len(attempts)
        background_tasks.add_task(sent.append, f"mail of attempt {number}")
        response.headers.append("X-Attempt", str(number))
        response.set_cookie("attempt", str(number))
        if number == 1:
            response.status_code = 202
        Sessions.run(unit)
        return {"attempt": number}

    app = FastAPI()
    install_exception_handlers(app)
    Queued = Annotated[None, Depends(queued_by_a_dependency)]
    if is_async:

        @app.post("/orders")
        @rdb.with_self_healing(service=f"{service}-api")
        async def create(
            background_tasks: BackgroundTasks, response: Response, _queued: Queued
        ) -> dict[str, int]:
            return attempt(background_tasks, response)

    else:

        @app.post("/orders")
        @rdb.with_self_healing(service=f"{service}-api")
        def create(  # (the same route, sync)
            background_tasks: BackgroundTasks, response: Response, _queued: Queued
        ) -> dict[str, int]:
            return attempt(background_tasks, response)

    return app, attempts, sent


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_replayed_route_answers_with_the_successful_attempts_tasks_and_headers_alone(
    engine: sa.Engine, service: str, is_async: bool
) -> None:
    app, attempts, sent = replayed_route_app(engine, service, is_async=is_async)
    answer = TestClient(app).post("/orders")
    assert len(attempts) == 2  # the first attempt's backend was killed: replayed
    assert answer.status_code == 200, answer.text  # the failed attempt's 202 is not kept
    assert answer.json() == {"attempt": 2}
    assert answer.headers.get_list("x-attempt") == ["2"]
    cookies: Any = answer.headers.get_list("set-cookie")
    assert [c.split(";")[0] for c in cookies] == ["attempt=2"]
    assert sent == ["dependency", "mail of attempt 2"]  # once, the successful attempt's


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_route_that_succeeds_at_once_keeps_everything_it_added(
    engine: sa.Engine, service: str, is_async: bool
) -> None:
    app, attempts, sent = replayed_route_app(engine, service, is_async=is_async)
    attempts.append(0)  # (its unit kills no backend: the first call succeeds)
    answer = TestClient(app).post("/orders")
    assert (answer.status_code, answer.json()) == (200, {"attempt": 2})
    assert answer.headers.get_list("x-attempt") == ["2"]
    assert sent == ["dependency", "mail of attempt 2"]


def test_request_scoped_arguments_given_by_position_are_put_back_too(
    engine: sa.Engine, service: str
) -> None:
    """Called directly (a helper taking the route's objects), by position or by name."""
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(max_retries=2))
    attempts: list[int] = []

    def unit(session: Session) -> None:
        if len(attempts) == 1:
            kill_own_backend(engine, session)
        session.execute(sa.text("SELECT 1"))

    @rdb.with_self_healing(service=f"{service}-api")
    def notify(tasks: BackgroundTasks, response: Response, *, note: BackgroundTasks) -> int:
        attempts.append(1)
        tasks.add_task(print, len(attempts))
        note.add_task(print, len(attempts))
        response.set_cookie("attempt", str(len(attempts)))
        Sessions.run(unit)
        return len(attempts)

    tasks, note, response = BackgroundTasks(), BackgroundTasks(), Response()
    assert notify(tasks, response, note=note) == 2
    assert [task.args for task in tasks.tasks] == [(2,)]
    assert [task.args for task in note.tasks] == [(2,)]
    assert [v for k, v in response.raw_headers if k == b"set-cookie"] == [
        b"attempt=2; Path=/; SameSite=lax"
    ]
