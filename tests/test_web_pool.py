"""SQLAlchemy's pool giving up waiting for a connection (``TimeoutError``, "QueuePool limit of
size 1 overflow 0 reached") under a slow database: a real pool of one connection, held by a unit
that waits on the database (a lock the test holds). The waiting request is answered 503 with
``Retry-After`` (this process overloaded, transient), reported by a rate-limited ``[SELF-HEAL]``
WARNING and a hook event, and counts as no failure of the database for the breaker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from scenarios import waiting_on_lock
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db.web import PROBLEM_JSON, install_exception_handlers
from resilient_db.web._handlers import POOL_LINES

pytestmark = pytest.mark.usefixtures("no_backoff")

#: the advisory lock the unit holding the pool's only connection waits for
LOCK_KEY = 4_242_002
BOUND_SECONDS = 30.0


@pytest.fixture
def direct(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def one_connection(pg_url: str) -> Iterator[sa.Engine]:
    """A pool of one connection that waits a fifth of a second for it."""
    eng = sa.create_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    yield eng
    eng.dispose()


def test_an_exhausted_pool_is_a_503_with_retry_after_logged_and_no_failure_for_the_breaker(
    direct: sa.Engine,
    one_connection: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a breaker that a single failure of the database would open
    Sessions = rdb.ResilientSession(
        one_connection, service=service, config=rdb.Config(failure_threshold=1)
    )

    def slow(request: Request) -> JSONResponse:
        def unit(session: Session) -> int:
            session.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            return 1

        return JSONResponse({"v": Sessions.run(unit)})

    def quick(request: Request) -> JSONResponse:
        return JSONResponse({"v": Sessions.run(lambda s: s.scalar(sa.text("SELECT 1")))})

    app = Starlette(routes=[Route("/slow", slow), Route("/quick", quick)])
    install_exception_handlers(app)
    events: list[rdb.SelfHealEvent] = []
    rdb.add_hook(events.append)
    POOL_LINES.restart()  # another test's line within the last 10 s must not hide this one's
    caplog.set_level(logging.WARNING, logger="resilient_db.web")
    order: list[str] = []
    holder = direct.connect()
    holder.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
    try:
        with TestClient(app, raise_server_exceptions=False) as client:

            def call_slow() -> None:
                order.append(f"slow {client.get('/slow').status_code}")

            waiting = threading.Thread(target=call_slow)
            waiting.start()
            for _ in range(1000):  # bounded: the pool's only connection waits on the database
                if waiting_on_lock(direct, LOCK_KEY) == 1:
                    break
                threading.Event().wait(0.01)
            assert waiting_on_lock(direct, LOCK_KEY) == 1
            answers = [client.get("/quick") for _ in range(2)]
            order.append("quick answered")
            # still waiting: the pool was exhausted all along
            assert waiting_on_lock(direct, LOCK_KEY) == 1
            holder.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            holder.commit()
            waiting.join(BOUND_SECONDS)
            assert client.get("/quick").json() == {"v": 1}  # the connection is back
    finally:
        holder.close()
        rdb.remove_hook(events.append)
    assert order == ["quick answered", "slow 200"]
    for answer in answers:
        assert answer.status_code == 503
        assert answer.headers["content-type"] == PROBLEM_JSON
        assert answer.headers["retry-after"] == "1"
        body = answer.json()
        assert body["type"] == "urn:resilient-db:problem:pool-exhausted"
        assert body["retry_after"] == 1
        assert "QueuePool" not in answer.text  # nothing of the server's configuration
    # one line for both (rate-limited), one event each
    lines = [r for r in caplog.records if r.name == "resilient_db.web"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert lines[0].getMessage().startswith("[SELF-HEAL] Connection pool exhausted: 1 request")
    assert lines[0].self_heal["event"] == "pool_exhausted"  # type: ignore[attr-defined]
    exhausted = [e for e in events if e.name == "pool_exhausted"]
    assert len(exhausted) == 2
    assert exhausted[0].fields["error"] == "TimeoutError"
    # (the line's count of those unlogged since the last: none before the first, and the
    # second's own line is left out)
    assert [e.fields["suppressed"] for e in exhausted] == [0, 0]
    # not a failure of the database: the breaker (threshold 1) stays closed, nothing given up
    state = rdb.health()["services"][service]
    assert state["breaker"]["state"] == "closed"
    assert state["breaker"]["failures"] == 0
    assert state["counters"]["gave_up"] == 0
    assert state["counters"]["retries"] == 0
    assert state["counters"]["pool_timeouts"] == 2  # each unit that found the pool full


def test_the_dashboard_lists_a_pool_exhausted_event_under_the_web_counted_in_no_series() -> None:
    """Which factory's pool it was is not known where the error is answered: the event is
    listed under ``(web)``, and no service's (nor the transition guard's) series counts it."""
    from resilient_db.web import Recorder  # noqa: PLC0415
    from resilient_db.web._handlers import report_pool_exhausted  # noqa: PLC0415

    own = Recorder()
    rdb.add_hook(own)
    try:
        report_pool_exhausted(rdb.Config(), sa.exc.TimeoutError("QueuePool limit reached"))
    finally:
        rdb.remove_hook(own)
    snapshot = own.snapshot()
    assert [(e["name"], e["service"], e["fields"]) for e in snapshot["events"]] == [
        ("pool_exhausted", "(web)", {"error": "TimeoutError"})
    ]
    assert snapshot["series"] == {}
