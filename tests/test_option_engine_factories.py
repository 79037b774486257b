"""A factory on an engine and another on its ``execution_options()`` copy (SQLAlchemy's
``OptionEngine``: an autocommit factory beside the service's own, a common pattern), or a
factory on the copy alone. The copy shares its engine's pool and dialect, where the engine
hooks listen (pool and dialect events: ``handle_error``, ``checkout``, ``connect``,
``do_connect``, ``do_execute``), so the hooks installed for the copy were a second set heard
on every connection of both: a lost COMMIT answer of a drop-in session was counted and said
twice. And a copy's hooks, once the copy and its factory were gone, still listened on the
engine's pool and dialect and raised ``ReferenceError`` at the engine's next error instead of
the error. The copy now has its engine's hooks (one set per pool and dialect).

Under each fault below, with both factories, everything is done and counted once, under the
service of the factory that met it (a drop-in session's dead pooled connection was counted
under the engine's latest factory's): a connect refused (retries not multiplied, the breaker fed
once per attempt), a dead pooled connection at checkout, a lost COMMIT answer settled by its
marker, 57P01 replacing the pool, and the flush guard's compare-and-set sent once through the
copy. Real server, real faults (a proxy that refuses connects and loses COMMIT answers,
``pg_terminate_backend``, a server-raised SQLSTATE)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import RAISE_CODE_FUNCTION, first_attempt_raises, metadata_engine
from sent import Sent
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db._unit import EngineHooks
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={"pending": {"in_progress"}, "in_progress": {"completed", "pending"}},
        initial={"pending"},
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


class Ledger(Base):
    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(sa.String(20))


@pytest.fixture
def proxied(fault_proxy: FaultProxy, pg_database: str) -> Iterator[sa.Engine]:
    """An engine through the fault proxy, with the tables, ``raise_code`` and the markers."""
    for engine in metadata_engine(fault_proxy.url(pg_database), Base):
        with engine.begin() as conn:
            conn.execute(RAISE_CODE_FUNCTION)
            conn.exec_driver_sql("INSERT INTO tasks VALUES (1, 'in_progress')")
        rdb.install_commit_markers(engine)
        yield engine
        fault_proxy.restore()


def counters(service: str) -> dict[str, Any]:
    found = rdb.health()["services"].get(service)
    return {} if found is None else dict(found["counters"])


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def notes(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT note FROM ledger ORDER BY id")).scalars())


def two_factories(engine: sa.Engine, service: str, **options: Any) -> tuple[Any, Any]:
    """A factory on ``engine`` (service ``-main``) and one on its copy with ``options``
    (``-copy``; AUTOCOMMIT unless told), the copy's made last."""
    options = options or {"isolation_level": "AUTOCOMMIT"}
    config = rdb.Config(max_retries=2, failure_threshold=50)
    main = rdb.ResilientSession(engine, service=f"{service}-main", config=config)
    copy = rdb.ResilientSession(
        engine.execution_options(**options), service=f"{service}-copy", config=config
    )
    return main, copy


def test_a_dropin_lost_commit_answer_beside_a_factory_on_the_copy_is_counted_once(
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The drop-in session's COMMIT loses its answer: one unknown outcome, one ERROR line,
    under its own factory's service (the copy's hooks heard it too: two of each)."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    main, _copy = two_factories(proxied, service)

    def dropin() -> None:
        with main.begin() as session:
            session.add(Ledger(note="dropin"))
            session.flush()
            fault_proxy.lose_commit_answer()

    with pytest.raises(sa.exc.OperationalError):
        dropin()
    assert counters(f"{service}-main")["unknown_commits"] == 1
    assert counters(f"{service}-copy")["unknown_commits"] == 0
    assert len(lines(caplog, "Commit outcome unknown")) == 1
    assert notes(proxied) == ["dropin"]  # (the server committed it)


def engine_hooks_heard(engine: sa.Engine) -> list[Any]:
    """The ``handle_error`` listeners of resilient_db's engine hooks on ``engine``'s dialect
    (not the class-wide ones: the trigger's error mapping, once a trigger was installed in the
    process, listens on every engine)."""
    heard = engine.dialect.dispatch.handle_error
    return [h for h in heard if isinstance(getattr(h, "__self__", None), EngineHooks)]


def test_the_engine_outlives_a_factory_on_its_copy(engine: sa.Engine, service: str) -> None:
    """A factory on the copy alone, dropped with the copy: the engine's next error is raised
    as the database's error, classified by the hooks (it raised ``ReferenceError``: the
    copy's hooks still listened on the engine's dialect, their engine gone)."""
    Sessions = rdb.ResilientSession(
        engine.execution_options(isolation_level="REPEATABLE READ"), service=service
    )
    assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    del Sessions
    gc.collect()
    with pytest.raises(sa.exc.OperationalError) as raised, engine.connect() as conn:
        conn.execute(sa.text("SELECT raise_code('57P01')"))
    assert raised.value.connection_invalidated  # (the hooks' classification: a lost one)
    # a factory made on the engine later shares those hooks (one set on the dialect)
    Sessions = rdb.ResilientSession(engine, service=service)
    assert len(engine_hooks_heard(engine)) == 1
    assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1


def test_a_lost_commit_answer_of_a_unit_on_the_copy_is_settled_once(
    proxied: sa.Engine,
    fault_proxy: FaultProxy,
    service: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A unit of the copy's factory loses its COMMIT answer: its marker says it committed,
    once, under its service; the row is written once, and no unknown outcome anywhere."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    _main, copy = two_factories(proxied, service, isolation_level="REPEATABLE READ")

    def write(session: Session) -> None:
        session.add(Ledger(note="unit"))
        session.flush()
        fault_proxy.lose_commit_answer()

    copy.run(write)
    assert fault_proxy.commits_lost == 1
    assert notes(proxied) == ["unit"]
    mine, other = counters(f"{service}-copy"), counters(f"{service}-main")
    assert (mine["verified_commits"], mine["unknown_commits"]) == (1, 0)
    assert (other["verified_commits"], other["unknown_commits"]) == (0, 0)
    assert len(lines(caplog, "Commit outcome verified")) == 1


def test_a_dead_pooled_connection_is_replaced_and_counted_once(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    """Every pooled connection killed: the next unit of each factory replaces the dead one it
    is handed, counted once under its own service, and is not retried for it. (Straight to
    the server, as the next test: through the proxy the ended backend's goodbye reaches the
    client a relay later, and a checkout before that finds the connection alive.)"""
    main, copy = two_factories(engine, service, isolation_level="REPEATABLE READ")
    for factory in (main, copy):
        assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
        assert pg_server.terminate_backends(database=pg_database) >= 1
        assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    for name in ("main", "copy"):
        found = counters(f"{service}-{name}")
        assert (found["dead_pooled_connections"], found["retries"]) == (1, 0), name


def test_a_refused_connect_is_retried_and_counted_once_per_attempt(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str
) -> None:
    """The server refuses connects: a unit of the copy's factory, and a drop-in session of
    it, each make their three attempts (not nine: the connect retry does not nest in the
    other factory's), each attempt one breaker failure, under the copy's service only."""
    main, copy = two_factories(proxied, service, isolation_level="REPEATABLE READ")
    proxied.dispose()
    fault_proxy.refuse()
    accepted = fault_proxy.connections_accepted
    with pytest.raises(sa.exc.OperationalError):
        copy.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one())
    with pytest.raises(sa.exc.OperationalError), copy() as session:
        session.execute(sa.text("SELECT 1"))
    assert fault_proxy.connections_accepted == accepted
    found = counters(f"{service}-copy")
    assert (found["attempts"], found["retries"], found["gave_up"]) == (6, 4, 2)
    assert rdb.health()["services"][f"{service}-copy"]["breaker"]["failures"] == 6
    assert counters(f"{service}-main")["attempts"] == 0
    assert rdb.health()["services"][f"{service}-main"]["breaker"]["failures"] == 0
    del main


def test_a_replaced_pool_is_counted_once(
    proxied: sa.Engine, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """57P01 on a unit of the copy's factory: the pool replaced once, one line, one retry."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    _main, copy = two_factories(proxied, service, isolation_level="REPEATABLE READ")
    ended_once, calls = first_attempt_raises("57P01")
    assert copy.run(ended_once) == 1
    assert len(calls) == 2
    found = counters(f"{service}-copy")
    assert (found["pool_invalidations"], found["retries"]) == (1, 1)
    assert counters(f"{service}-main")["pool_invalidations"] == 0
    assert len(lines(caplog, "Replacing the pooled connections")) == 1


def test_the_compare_and_set_goes_once_through_the_autocommit_copy(
    proxied: sa.Engine, service: str
) -> None:
    """A status moved through the autocommit factory on the copy: one UPDATE, carrying the
    compare-and-set (each factory's statement listener is on the one dialect)."""
    _main, copy = two_factories(proxied, service)

    def move(session: Session) -> None:
        task = session.get(Task, 1)
        assert task is not None
        task.status = "completed"

    recorder = Sent(proxied)
    try:
        with copy() as session:
            move(session)
            session.commit()
    finally:
        recorder.stop()
    [update] = recorder.matching("UPDATE")
    assert "AND tasks.status = " in update
    with proxied.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM tasks")).scalar_one() == "completed"


def test_a_dead_pooled_connection_met_by_a_dropin_session_counts_under_its_factory(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    """A drop-in session of each factory is handed a dead pooled connection: each counted
    under its own factory's service, not under the one whose service the engine's lines are
    said under (the factory made last on the pool: the copy's; before, the copy's hooks
    listened second and the engine's factory counted them all)."""
    main, copy = two_factories(engine, service, isolation_level="REPEATABLE READ")
    for factory in (main, copy):
        with factory() as session:
            assert session.execute(sa.text("SELECT 1")).scalar_one() == 1
        assert pg_server.terminate_backends(database=pg_database) >= 1
        with factory() as session:
            assert session.execute(sa.text("SELECT 1")).scalar_one() == 1
    assert counters(f"{service}-main")["dead_pooled_connections"] == 1
    assert counters(f"{service}-copy")["dead_pooled_connections"] == 1


def test_a_factory_on_the_copy_must_agree_with_the_engines(engine: sa.Engine, service: str) -> None:
    """The copy's hooks are its engine's: a factory on it with other engine-wide settings is
    refused as one on the engine is (both sets of hooks listened on the one pool and dialect,
    each acting on its own settings)."""
    # (held: only a live factory's settings bind another one on the engine)
    factory = rdb.ResilientSession(engine, service=service)
    copy = engine.execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(ValueError, match="status validation"):
        rdb.ResilientSession(copy, service=service, config=rdb.Config(status_validation=False))
    assert len(engine_hooks_heard(engine)) == 1
    assert factory.kw is not None
