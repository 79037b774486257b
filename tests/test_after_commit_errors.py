"""An error raised after a unit's COMMIT succeeded: by an ``after_commit`` or
``after_transaction_end`` listener (an outbox or audit write on another engine that meets a
conflict or a lost connection), or by the session class's own ``close()``. The unit is
committed: it is raised as it is, marked so that a web answer says the change is saved, and
never replayed. Before: when the error was transient, the unit ran again and wrote again (four
rows for one call), ``after_commit`` fired once per attempt, and the breaker counted the
failures of a healthy database."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import RAISE_CODE_FUNCTION
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._classify import partly_committed
from resilient_db.testing import FaultProxy

pytestmark = pytest.mark.usefixtures("no_backoff")

TABLE = sa.text("CREATE TABLE orders (id serial PRIMARY KEY, tag text NOT NULL)")


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(TABLE)
        conn.execute(RAISE_CODE_FUNCTION)
    rdb.install_commit_markers(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def audit(pg_url: str) -> Iterator[sa.Engine]:
    """The listener's own database (an audit or outbox write), another engine."""
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


def orders(engine: sa.Engine, tag: str) -> int:
    with engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM orders WHERE tag = :t")
        return int(conn.execute(query, {"t": tag}).scalar_one())


def failing_audit(audit: sa.Engine, code: str, calls: list[int]) -> Callable[..., None]:
    def listener(*_: Any) -> None:
        calls.append(1)
        with audit.connect() as conn:
            conn.execute(sa.text("SELECT raise_code(:c)"), {"c": code})

    return listener


def place_order(session: Session, tag: str) -> None:
    session.execute(sa.text("INSERT INTO orders (tag) VALUES (:t)"), {"t": tag})


@pytest.mark.parametrize("code", ["40001", "57P01"])
@pytest.mark.parametrize("event_name", ["after_commit", "after_transaction_end"])
def test_a_listener_failing_after_the_commit_is_raised_once_not_replayed(
    engine: sa.Engine, audit: sa.Engine, service: str, code: str, event_name: str
) -> None:
    Orders = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []
    event.listen(Orders, event_name, failing_audit(audit, code, calls))
    tag = str(uuid.uuid4())

    with pytest.raises(sa.exc.DBAPIError) as info:
        Orders.run(place_order, tag)
    assert getattr(info.value.orig, "sqlstate", None) == code
    assert orders(engine, tag) == 1  # written once
    assert calls == [1]  # the listener ran once, for the attempt that committed
    assert partly_committed(info.value)  # a web answer: saved, don't resubmit blindly
    counters = rdb.health()["services"][service]["counters"]
    assert (counters["attempts"], counters["retries"]) == (1, 0)
    assert rdb.health()["services"][service]["breaker"]["state"] == "closed"


def test_the_session_classs_close_failing_after_the_commit_is_not_replayed(
    engine: sa.Engine, audit: sa.Engine, service: str
) -> None:
    calls: list[int] = []
    fail = failing_audit(audit, "40P01", calls)

    class Closing(Session):
        def close(self) -> None:
            super().close()
            if self.info.pop("ordered", False):
                fail()

    def ordering(session: Session, tag: str) -> None:
        place_order(session, tag)
        session.info["ordered"] = True

    Orders = rdb.ResilientSession(engine, service=service, class_=Closing)
    tag = str(uuid.uuid4())
    with pytest.raises(sa.exc.DBAPIError) as info:
        Orders.run(ordering, tag)
    assert orders(engine, tag) == 1
    assert calls == [1]
    assert partly_committed(info.value)


def test_a_read_only_unit_whose_listener_fails_after_the_commit_is_not_replayed(
    engine: sa.Engine, audit: sa.Engine, service: str
) -> None:
    """Nothing was written, so nothing is said to be saved; the listener is not run again."""
    Orders = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []
    event.listen(Orders, "after_commit", failing_audit(audit, "40001", calls))

    with pytest.raises(sa.exc.DBAPIError) as info:
        Orders.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
    assert calls == [1]
    assert not partly_committed(info.value)  # (a web answer says nothing of a saved part)
    assert not rdb.is_transient(info.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("code", ["40001", "57P01"])
async def test_async_a_listener_failing_after_the_commit_is_raised_once_not_replayed(
    engine: sa.Engine, audit: sa.Engine, pg_async_url: str, service: str, code: str
) -> None:
    async_engine = create_async_engine(pg_async_url)
    try:

        class Audited(Session):
            pass

        Orders = rdb.AsyncResilientSession(
            async_engine, service=service, sync_session_class=Audited
        )
        calls: list[int] = []
        event.listen(Audited, "after_commit", failing_audit(audit, code, calls))
        tag = str(uuid.uuid4())

        async def unit(session: AsyncSession) -> None:
            await session.execute(sa.text("INSERT INTO orders (tag) VALUES (:t)"), {"t": tag})

        with pytest.raises(sa.exc.DBAPIError) as info:
            await Orders.run(unit)
        assert orders(engine, tag) == 1
        assert calls == [1]
        assert partly_committed(info.value)
    finally:
        await async_engine.dispose()


def test_a_listener_failing_as_a_verified_commit_ends_is_not_replayed(
    engine: sa.Engine,
    audit: sa.Engine,
    fault_proxy: FaultProxy,
    pg_database: str,
    service: str,
) -> None:
    """The COMMIT's answer was lost and the check found it committed: the unit's
    ``after_commit`` listeners fire then, once. One that fails there leaves the unit
    committed, not replayed."""
    proxied = sa.create_engine(fault_proxy.url(pg_database))
    try:
        Orders = rdb.ResilientSession(proxied, service=service)
        calls: list[int] = []
        event.listen(Orders, "after_commit", failing_audit(audit, "40001", calls))
        tag = str(uuid.uuid4())
        fault_proxy.lose_commit_answer()

        with pytest.raises(sa.exc.DBAPIError) as info:
            Orders.run(place_order, tag)
        assert fault_proxy.commits_lost == 1
        assert orders(engine, tag) == 1
        assert calls == [1]
        assert partly_committed(info.value)
    finally:
        proxied.dispose()


def test_a_two_phase_unit_whose_prepare_failed_is_not_taken_for_committed(
    engine: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLAlchemy closes a two-phase transaction whose PREPARE failed (here: the server allows
    no prepared transactions), as it closes one that committed: that is no COMMIT that
    succeeded, and the error is not marked saved."""
    Orders = rdb.ResilientSession(engine, service=service, twophase=True)
    tag = str(uuid.uuid4())
    with (
        caplog.at_level("WARNING", logger="resilient_db"),
        pytest.raises(sa.exc.DBAPIError) as info,
    ):
        Orders.run(place_order, tag)
    assert not partly_committed(info.value)
    assert orders(engine, tag) == 0
    assert not [r for r in caplog.records if "COMMIT succeeded" in r.getMessage()]


def test_an_enclosing_attempt_is_told_of_a_nested_unit_committed_before_its_error(
    engine: sa.Engine, audit: sa.Engine, service: str
) -> None:
    """A unit of another factory, run inside an operation, commits; its ``after_commit``
    listener fails. The operation's code catches that error (the audit is not essential) and
    then fails with a transient error: the operation is not replayed, since the nested unit's
    write is committed. Before, it was: the order was written twice."""
    Orders = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []
    event.listen(Orders, "after_commit", failing_audit(audit, "40001", calls))
    tag = str(uuid.uuid4())
    attempts: list[int] = []

    def operation() -> None:
        attempts.append(1)
        with contextlib.suppress(sa.exc.DBAPIError):
            Orders.run(place_order, tag)
        with audit.connect() as conn:  # then a transient failure of the operation's own
            conn.execute(sa.text("SELECT raise_code('40001')"))

    with pytest.raises(sa.exc.OperationalError):
        rdb.with_self_healing(operation, service=f"{service}-op")
    assert attempts == [1]
    assert orders(engine, tag) == 1
