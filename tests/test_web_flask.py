"""docs/sqlmodel-flask.md's Flask recipe for resilient_db's errors (``problem_details(exc)`` in an
``errorhandler``, ``return answer.body, answer.status, answer.response_headers``) answers
``application/problem+json`` with ``Retry-After`` where there is one, not the
``application/json`` Flask gives a dict body: through Flask's test client, against real failures
(an illegal transition refused by the server's trigger, a database refusing connections through
the fault proxy until the circuit opens)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import tasks_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.examples.tasks import Task, create_task, move_task
from resilient_db.testing import FaultProxy
from resilient_db.web import PROBLEM_JSON, problem_details

flask = pytest.importorskip("flask")
HTTPException = pytest.importorskip("werkzeug.exceptions").HTTPException

pytestmark = pytest.mark.usefixtures("no_backoff")


def readme_recipe(exc: Exception) -> Any:
    """docs/sqlmodel-flask.md's recipe: ``app.register_error_handler(Exception, ...)``."""
    if isinstance(exc, HTTPException):
        return exc  # Flask's own answers (404, 405, abort()), as without this handler
    answer = problem_details(exc)
    if answer is None:
        raise exc  # Flask logs it and answers its 500, as without this handler
    return answer.body, answer.status, answer.response_headers


@pytest.fixture
def direct(pg_url: str) -> Iterator[sa.Engine]:
    yield from tasks_engine(pg_url)


def test_the_readmes_flask_recipe_answers_problem_json(
    direct: sa.Engine, fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    engine = sa.create_engine(fault_proxy.url(pg_database), connect_args={"connect_timeout": 2})
    config = rdb.Config(max_retries=0, failure_threshold=1, reset_timeout=30)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    with Session(direct) as session, session.begin():
        task = create_task(session, title="t", idem_key=str(uuid.uuid4()))
        session.flush()
        task_id = task.id
    app = flask.Flask(__name__)
    app.register_error_handler(Exception, readme_recipe)

    @app.post("/tasks/<int:tid>/<to>")
    def move(tid: int, to: str) -> Any:
        def unit(session: Session) -> dict[str, str]:
            move_task(session, session.get_one(Task, tid), to, idem_key=str(uuid.uuid4()))
            session.flush()
            return {"status": to}

        return Sessions.run(unit)

    client = app.test_client()
    try:
        refused = client.post(f"/tasks/{task_id}/completed")  # pending -> completed: illegal
        assert refused.status_code == 409
        assert refused.headers["Content-Type"] == PROBLEM_JSON
        assert refused.json is not None
        assert refused.json["type"] == "urn:resilient-db:problem:illegal-transition"
        assert "Retry-After" not in refused.headers

        fault_proxy.refuse(cut=True)
        failed = client.post(f"/tasks/{task_id}/in_progress")  # gives up, opens the circuit
        rejected = client.post(f"/tasks/{task_id}/in_progress")  # not attempted
        for answer, kind in ((failed, "database-unavailable"), (rejected, "circuit-open")):
            assert answer.status_code == 503
            assert answer.headers["Content-Type"] == PROBLEM_JSON
            assert answer.json is not None
            assert answer.json["type"] == f"urn:resilient-db:problem:{kind}"
            assert 1 <= int(answer.headers["Retry-After"]) <= 30
    finally:
        fault_proxy.restore()
        engine.dispose()


def test_response_headers_are_the_headers_and_the_content_type() -> None:
    opened = problem_details(rdb.CircuitOpenError("db", 2.5))
    assert opened is not None
    assert opened.headers == {"Retry-After": "3"}  # the extra headers, as before
    assert opened.response_headers == {"Content-Type": PROBLEM_JSON, "Retry-After": "3"}
    invalid = problem_details(rdb.ResponseValidationError("db", "Out", "bad"))
    assert invalid is not None
    assert invalid.response_headers == {"Content-Type": PROBLEM_JSON}


def test_the_recipe_leaves_flasks_own_answers_and_the_applications_errors_as_they_were(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler of ``Exception`` is also Flask's handler of its ``HTTPException``s (a 404, a
    405, ``abort(403)``) and of the ``InternalServerError`` it makes of an error no handler
    answered: re-raised from there, each became a 500, and the application's own error left
    Flask altogether (to the WSGI server's 500)."""
    app = flask.Flask(__name__)  # not TESTING: errors are answered as in production
    app.register_error_handler(Exception, readme_recipe)

    @app.get("/forbidden")
    def forbidden() -> Any:
        flask.abort(403)

    @app.get("/bug")
    def bug() -> Any:
        raise KeyError("the application's own")

    client = app.test_client()
    assert client.get("/missing").status_code == 404
    refused = client.post("/forbidden")
    assert refused.status_code == 405
    assert sorted(refused.headers["Allow"].split(", ")) == ["GET", "HEAD", "OPTIONS"]
    assert client.get("/forbidden").status_code == 403
    with caplog.at_level("ERROR", logger=app.logger.name):
        failed = client.get("/bug")  # answered by Flask, not raised out of it
    assert failed.status_code == 500
    assert failed.headers["Content-Type"].startswith("text/html")  # Flask's own 500
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [KeyError]  # logged once


def test_an_opening_by_hand_is_answered_as_paused_not_as_a_failing_database(
    direct: sa.Engine, service: str
) -> None:
    """A maintenance window opened by an operator (``rdb.open_breaker``) is no failure: the
    503 a Flask view answers during it, and the partly-committed answer of an operation it cut
    short, say the dependency was paused by an operator, not that it "is failing" (the error
    itself never says "after repeated database failures" for an opening by hand)."""
    Sessions = rdb.ResilientSession(direct, service=service, config=rdb.Config(reset_timeout=30))
    app = flask.Flask(__name__)
    app.register_error_handler(Exception, readme_recipe)

    def add(session: Session) -> None:
        create_task(session, title="t", idem_key=str(uuid.uuid4()))

    @app.post("/one")
    def one() -> Any:
        Sessions.run(add)
        return {"ok": True}

    @app.post("/two")
    @rdb.with_self_healing(service=f"{service}-view")  # a view of units, as docs/web.md shows
    def two() -> Any:
        Sessions.run(add)  # committed
        rdb.open_breaker(service, reason="database upgrade", seconds=30)
        Sessions.run(add)  # refused: the rest of the change is not attempted
        return {"ok": True}

    client = app.test_client()
    try:
        assert client.post("/one").status_code == 200  # closed: the unit runs
        rdb.open_breaker(service, reason="database upgrade", seconds=30)
        paused = client.post("/one")
        assert paused.status_code == 503
        assert paused.json is not None
        assert paused.json["type"] == "urn:resilient-db:problem:circuit-open"
        assert "failing" not in paused.json["detail"]
        assert paused.json["detail"] == (
            f"Requests to the {service!r} dependency are paused by an operator; they are not "
            "attempted for 30 s. Retry after that."
        )
        assert "database upgrade" not in paused.json["detail"]  # the reason stays server-side

        rdb.close_breaker(service, reason="upgrade done")
        partly = client.post("/two")
        assert partly.status_code == 500
        assert partly.json is not None
        assert partly.json["type"] == "urn:resilient-db:problem:partly-committed"
        assert partly.json["failure"] == "circuit-open"
        assert "failing" not in partly.json["detail"]
        assert partly.json["detail"].endswith(
            f" The rest was not attempted: requests to the {service!r} dependency are paused "
            "by an operator."
        )
    finally:
        rdb.close_breaker(service, reason="test done")
