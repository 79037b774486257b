"""A unit that succeeded after retrying says so in one ``Recovered`` line naming its service, the
attempt that succeeded, how many retries it took and the class and SQLSTATE of the failure
before it (never the error's text): an operator reading it alone knows what healed. Before, it
said only ``succeeded after retrying``. Real faults on a real server: a backend terminated with
``pg_terminate_backend``, SQLSTATEs raised by the server."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from scenarios import fatal_code
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy

pytestmark = pytest.mark.usefixtures("no_backoff")

SECRET = "s3cret-row-value"

#: the SQLSTATE a line names for a backend terminated under the unit (psycopg before 3.2.4
#: keeps no code of it: "none")
TERMINATED = fatal_code("57P01") or "none"


def recovered_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("[SELF-HEAL] Recovered")]


def test_the_recovered_line_names_the_attempt_and_the_failure_it_healed(
    engine: sa.Engine,
    service: str,
    caplog: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
    otel: tuple[Any, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    """A conflict, then the unit's backend terminated: the third attempt succeeds."""
    tracer, spans, _ = otel
    Sessions = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.execute(sa.text("SELECT :v"), {"v": SECRET})
        if len(calls) == 1:
            session.execute(sa.text("SELECT raise_code('40001')"))
        if len(calls) == 2:
            pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            session.execute(sa.text("SELECT 1"))
        return len(calls)

    caplog.set_level(logging.INFO, logger="resilient_db")
    with tracer.start_as_current_span("request"):
        assert Sessions.run(unit) == 3
    (line,) = recovered_lines(caplog)
    assert line.levelno == logging.INFO
    assert line.getMessage() == (
        f"[SELF-HEAL] Recovered: service={service} succeeded at attempt 3, after 2 retries (the "
        f"last failure: disconnect, SQLSTATE {TERMINATED})"
    )
    assert SECRET not in line.getMessage()
    (event,) = [e for e in events if e.name == "recovered"]
    assert (event.fields["retries"], event.fields["outcome"], event.fields["sqlstate"]) == (
        2,
        "disconnect",
        TERMINATED,
    )
    assert dict(line.self_heal) == dict(event.fields)  # type: ignore[attr-defined]
    (span,) = spans.get_finished_spans()
    (recovered,) = [e for e in span.events if e.name == "resilient_db.recovered"]
    assert recovered.attributes is not None
    assert recovered.attributes["resilient_db.retries"] == 2
    assert recovered.attributes["resilient_db.sqlstate"] == TERMINATED
    counters = rdb.health()["services"][service]["counters"]
    assert (counters["attempts"], counters["retries"], counters["recovered"]) == (3, 2, 1)


@pytest.mark.asyncio
async def test_an_async_units_recovered_line_says_the_same(
    engine: sa.Engine, pg_async_url: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        if len(calls) == 1:
            await session.execute(sa.text("SELECT raise_code('40P01')"))
        return len(calls)

    caplog.set_level(logging.INFO, logger="resilient_db")
    try:
        assert await Sessions.run(unit) == 2
    finally:
        await aengine.dispose()
    (line,) = recovered_lines(caplog)
    assert line.getMessage() == (
        f"[SELF-HEAL] Recovered: service={service} succeeded at attempt 2, after 1 retry (the "
        "last failure: conflict, SQLSTATE 40P01)"
    )


class _RaisingHandler(logging.Handler):
    """An application's handler whose ``emit`` raises (one that does not call handleError)."""

    def emit(self, record: logging.LogRecord) -> None:
        raise RuntimeError("the application's log handler failed")


def _raising_filter(record: logging.LogRecord) -> bool:
    raise RuntimeError("the application's log filter failed")


@pytest.fixture(params=["handler", "filter"])
def broken_logging(request: pytest.FixtureRequest) -> Iterator[None]:
    """The application's logging raises at every line of resilient_db: a handler whose
    ``emit`` raises, or a handler's filter that raises (logging calls either outside its own
    error handling)."""
    logger = logging.getLogger("resilient_db")
    handler: logging.Handler
    if request.param == "handler":
        handler = _RaisingHandler()
    else:
        handler = logging.StreamHandler(io.StringIO())
        handler.addFilter(_raising_filter)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.mark.usefixtures("broken_logging")
def test_logging_that_raises_never_breaks_a_unit(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """A conflict, then the unit's backend terminated: the unit recovers as it would with
    logging that works, its lines lost, its events and counters as ever."""
    Sessions = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        if len(calls) == 1:
            session.execute(sa.text("SELECT raise_code('40001')"))
        if len(calls) == 2:
            pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            session.execute(sa.text("SELECT 1"))
        return len(calls)

    assert Sessions.run(unit) == 3
    assert [e.name for e in events if e.name != "commit_markers_missing"] == [
        "retry",
        "retry",
        "recovered",
    ]
    counters = rdb.health()["services"][service]["counters"]
    assert (counters["retries"], counters["recovered"], counters["gave_up"]) == (2, 1, 0)


@pytest.mark.usefixtures("broken_logging")
def test_logging_that_raises_never_turns_a_verified_commit_into_an_error(
    engine: sa.Engine, fault_proxy: FaultProxy, pg_database: str, service: str
) -> None:
    """The COMMIT's answer is lost and the check finds it committed: the unit returns (an
    error raised by its ``Commit outcome verified`` line would have the caller run a committed
    write again)."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS logged_notes (tag text NOT NULL)"))
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    try:
        Sessions = rdb.ResilientSession(proxied, service=service)
        fault_proxy.lose_commit_answer()
        Sessions.run(
            lambda s: s.execute(sa.text("INSERT INTO logged_notes VALUES (:t)"), {"t": service})
        )
    finally:
        proxied.dispose()
    assert fault_proxy.commits_lost == 1
    with engine.connect() as conn:
        written = conn.execute(
            sa.text("SELECT count(*) FROM logged_notes WHERE tag = :t"), {"t": service}
        ).scalar_one()
    assert written == 1
    assert rdb.health()["services"][service]["counters"]["verified_commits"] == 1


@pytest.mark.asyncio
@pytest.mark.usefixtures("broken_logging")
async def test_logging_that_raises_never_breaks_an_async_unit(
    engine: sa.Engine, pg_async_url: str, service: str
) -> None:
    aengine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(aengine, service=service)
    calls: list[int] = []

    async def unit(session: AsyncSession) -> int:
        calls.append(1)
        if len(calls) == 1:
            await session.execute(sa.text("SELECT raise_code('40P01')"))
        return len(calls)

    try:
        assert await Sessions.run(unit) == 2
    finally:
        await aengine.dispose()
    assert rdb.health()["services"][service]["counters"]["recovered"] == 1


def test_a_logging_filter_that_changes_its_record_leaves_the_events_kept_by_hooks(
    engine: sa.Engine, service: str, events: list[rdb.SelfHealEvent]
) -> None:
    """An application's filter that edits ``record.self_heal`` (dropping a field it does not
    want in its logs) edited the event a hook had kept too: the record's fields were the
    event's own dict, which hooks are given read-only."""

    def dropping(record: logging.LogRecord) -> bool:
        fields = getattr(record, "self_heal", None)
        if isinstance(fields, dict):
            fields.pop("sqlstate", None)
        return True

    logger = logging.getLogger("resilient_db")
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(dropping)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        Sessions = rdb.ResilientSession(engine, service=service)
        calls: list[int] = []

        def unit(session: Session) -> None:
            calls.append(1)
            if len(calls) == 1:
                session.execute(sa.text("SELECT raise_code('40001')"))

        Sessions.run(unit)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    recovered = [e for e in events if e.name == "recovered"]
    assert [e.fields.get("sqlstate") for e in recovered] == ["40001"]
