"""The web layer's TypedDicts say what the recorder and the dashboard really serve, key by key:
``Recorder.snapshot()`` (:class:`~resilient_db.web.RecorderSnapshot`, full and after a cursor),
``Dashboard.data()`` and ``data.json`` (:class:`~resilient_db.web.DashboardData`, with
health()'s report or the problem of a check that failed). Real events come from units on a
real server: a backend killed under a unit that is replayed, a breaker opened (the unit gives
up), half-open and closed by a probe, refused status moves on every path (a stale one among
them), a result that fails its check. Every key a type declares is seen at least once, and
every value of each ``Literal``; a key served and not declared (or the other way round), or a
value of another type, fails here. health()'s own types: test_health_types.py."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from processes import wait_for
from scenarios import refuse_moves_every_way
from shapes import Walk
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db import web
from resilient_db.examples.tasks import Base

pytestmark = pytest.mark.usefixtures("no_backoff")

#: the types of the web layer's results, each public
WEB_TYPES = {
    web.RecorderSnapshot,
    web.RecordedEvent,
    web.EventFields,
    web.ServiceSeries,
    web.DashboardData,
    web.DashboardProcess,
    web.HealthProblem,
}


@pytest.fixture
def tasks(engine: sa.Engine) -> sa.Engine:
    """The example's tasks schema, on the engine with ``raise_code()``."""
    Base.metadata.create_all(engine)
    return engine


def data_json(board: web.Dashboard, after: str | None = None) -> Any:
    client = TestClient(Starlette(routes=[Mount("/admin/self-healing", app=board)]))
    params = {"after": after} if after is not None else {}
    answer = client.get("/admin/self-healing/data.json", params=params)
    assert answer.status_code == 200
    return answer.json()


def breaker_state(service: str) -> Any:
    breaker = rdb.health()["services"][service]["breaker"]
    return breaker["state"] if breaker is not None else None


def test_every_key_of_real_snapshots_and_dashboard_data_is_declared_by_their_types(
    tasks: sa.Engine, service: str
) -> None:
    recorder = web.Recorder()
    board = web.dashboard(auth=lambda request: True, recorder=recorder, events=200)

    # a backend killed under the unit's first attempt: retried (WARNING), recovered (INFO)
    Sessions = rdb.ResilientSession(tasks, service=service, config=rdb.Config(max_retries=2))
    calls: list[int] = []

    def killed_once(session: Session) -> int:
        calls.append(1)
        if len(calls) == 1:
            session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    assert Sessions.run(killed_once) == 1
    assert len(calls) == 2

    # a result failing its check: the validator named
    with pytest.raises(rdb.ResponseValidationError):
        Sessions.run(
            lambda s: s.execute(sa.text("SELECT -1")).scalar_one(), validate=lambda v: v > 0
        )

    # unavailable at every attempt: gives up (ERROR) and opens the breaker; half-open once its
    # open time is over, and closed by the probe that succeeds
    config = rdb.Config(max_retries=1, failure_threshold=2, reset_timeout=0.001)
    Opening = rdb.ResilientSession(tasks, service=f"{service}-open", config=config)
    with pytest.raises(sa.exc.OperationalError):
        Opening.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    wait_for(lambda: breaker_state(f"{service}-open") == "half-open", "half-open")
    assert Opening.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert breaker_state(f"{service}-open") == "closed"

    # illegal moves refused on every path, a stale one among them (the guard's series)
    refuse_moves_every_way(tasks, f"{service}-guard", trigger=True)

    walk = Walk()
    snapshot = recorder.snapshot()
    walk.check(snapshot, web.RecorderSnapshot, "snapshot()")
    names = {event["name"] for event in snapshot["events"]}
    assert {"retry", "recovered", "gave_up", "response_invalid", "transition_blocked"} <= names
    assert {"breaker_opened", "breaker_half_open", "breaker_closed"} <= names
    assert any(event["fields"].get("stale") for event in snapshot["events"])
    assert [change[1] for change in snapshot["series"][f"{service}-open"]["breaker_states"]] == [
        "open",
        "half-open",
        "closed",
    ]
    walk.check(board.data(rdb.health()), web.DashboardData, "data()")
    full = data_json(board)
    walk.check(full, web.DashboardData, "data.json")

    # what changed since a cursor: a delta, with the event and the series that changed
    calls.clear()
    assert Sessions.run(killed_once) == 1
    delta = recorder.snapshot(after=snapshot["cursor"])
    assert delta["delta"] is True
    since = [event["name"] for event in delta["events"] if event["service"] == service]
    assert since == ["retry", "recovered"]
    assert service in delta["series"]
    assert f"{service}-guard" not in delta["series"]  # (no event since)
    walk.check(delta, web.RecorderSnapshot, "snapshot(after=...)")
    walk.check(data_json(board, after=full["cursor"]), web.DashboardData, "data.json?after=")

    # a health() check that fails: its problem served, the events and series with it
    def failing() -> dict[str, Any]:
        raise RuntimeError("no health today")

    failed = data_json(web.dashboard(auth=lambda request: True, recorder=recorder, health=failing))
    walk.check(failed, web.DashboardData, "data.json of a failing check")
    assert "problem" in failed["health"]

    assert walk.typeddicts >= WEB_TYPES  # every type was met ...
    assert walk.unseen_keys(WEB_TYPES) == {}  # ... with every key
    assert walk.unseen_literals(WEB_TYPES) == {}  # ... and every value of its Literals
    assert {t.__name__ for t in WEB_TYPES} <= set(web.__all__)  # each is public
