"""Engines on psycopg2 (``postgresql+psycopg2://``), still the most common PostgreSQL driver
under SQLAlchemy, and on pg8000 (pure Python). psycopg2 reports a SQLSTATE as ``pgcode``, pg8000
in the ``C`` field of its error's fields, neither as ``sqlstate``: read as such, their
serialization failures, deadlocks and terminated backends are replayed as on psycopg 3. They get
no commit protocol (the factory says so once): a lost COMMIT answer ends unknown, never replayed.
Real server, real drivers, real faults."""

from __future__ import annotations

import gc
import io
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import RAISE_CODE_FUNCTION, Base, Item, conflict_after_another_factorys_unit
from sqlalchemy.orm import Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db.testing import FaultProxy, PostgresServer

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture(autouse=True)
def _pg8000_dead_sockets_collected() -> Iterator[None]:
    """pg8000's ``close()`` of a connection whose server end is gone (a killed backend, a proxy
    cut: SQLAlchemy invalidates it) fails to flush its goodbye and leaves it in the socket
    file's buffer; that file's finalizer then fails with ``BrokenPipeError`` wherever the
    cyclic collector happens to run, and pytest fails whichever test that is (seen on Python
    3.13, in a test that kills nothing). Collected here, before and after each test, with that
    one finalizer's error ignored (the driver's, not ours; anything else still reaches pytest)."""
    collect_ignoring_dead_socket_files()
    yield
    collect_ignoring_dead_socket_files()


def collect_ignoring_dead_socket_files() -> None:
    hook = sys.unraisablehook

    def ignore(args: Any) -> None:
        if not (isinstance(args.object, io.BufferedRWPair) and isinstance(args.exc_value, OSError)):
            hook(args)

    sys.unraisablehook = ignore
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


DRIVERS = ["psycopg2", "pg8000"]


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def driver_url(
    driver: str, server: PostgresServer, database: str, proxy: FaultProxy | None = None
) -> str:
    url = (proxy or server).url(database, driver="")
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


def prepared_engine(url: str, **kwargs: Any) -> sa.Engine:
    """An engine on ``url``, its database given the items and ``raise_code()``."""
    eng = sa.create_engine(url, **kwargs)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(RAISE_CODE_FUNCTION)
    return eng


@pytest.fixture
def engine(pg_server: PostgresServer, pg_database: str, driver: str) -> Iterator[sa.Engine]:
    eng = prepared_engine(driver_url(driver, pg_server, pg_database))
    yield eng
    eng.dispose()


def names(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.scalars(sa.select(Item.name)))


def test_errors_are_classified_by_their_sqlstate(engine: sa.Engine, driver: str) -> None:
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as info:
        conn.execute(sa.text("SELECT raise_code('40P01')"))
    assert type(info.value.orig).__module__.startswith(driver)
    assert rdb.sqlstate_of(info.value) == "40P01"
    assert rdb.classify(info.value) is rdb.Outcome.CONFLICT


def test_a_unit_is_replayed_after_conflicts_and_a_killed_backend(
    engine: sa.Engine, pg_server: PostgresServer, service: str
) -> None:
    Sessions = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.add(Item(name=f"p2-{len(calls)}"))
        session.flush()
        if len(calls) == 1:
            session.execute(sa.text("SELECT raise_code('40001')"))
        if len(calls) == 2:
            pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            pg_server.execute(f"SELECT pg_terminate_backend({int(pid)})")
            session.execute(sa.text("SELECT 1"))  # 57P01 (or the connection gone)
        return len(calls)

    assert Sessions.run(unit) == 3
    assert names(engine) == ["p2-3"]
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries_by_class"] == {"conflict": 1, "disconnect": 1}


def test_a_unit_that_ran_a_committed_unit_on_this_driver_is_not_replayed(
    engine: sa.Engine, pg_server: PostgresServer, pg_database: str, service: str
) -> None:
    """A unit of a factory on this driver inside a unit of a psycopg 3 factory commits on its
    own. Its COMMIT carries no ticket (no commit protocol here), yet it may have written: a
    replay of the enclosing unit would write it again."""
    Inner = rdb.ResilientSession(engine, service=service)

    def inner(session: Session) -> None:
        session.add(Item(name="inner"))

    runs = conflict_after_another_factorys_unit(
        pg_server.url(pg_database), service, lambda: Inner.run(inner)
    )
    assert runs == 1
    assert names(engine) == ["inner"]


def test_a_unit_that_committed_its_own_work_is_not_replayed(
    engine: sa.Engine, service: str
) -> None:
    """The unit's code commits, then meets a conflict: its committed part must not be written
    again. (These drivers' COMMITs are not marked; the dialect's ``do_commit`` shows it, not an
    engine event: one would cost every statement the engine's event dispatch.)"""
    Sessions = rdb.ResilientSession(engine, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.add(Item(name=f"own-{len(calls)}"))
        session.commit()
        session.execute(sa.text("SELECT raise_code('40001')"))

    with pytest.raises(sa.exc.DBAPIError) as raised:
        Sessions.run(unit)
    assert rdb.sqlstate_of(raised.value) == "40001"
    assert calls == [1]
    assert names(engine) == ["own-1"]
    assert engine._has_events is False  # SQLAlchemy's flag: no connection event on the engine


@pytest.mark.usefixtures("trusted_calls")
def test_a_write_through_a_function_under_a_built_ins_name_stops_replays_in_autocommit(
    pg_server: PostgresServer, pg_database: str, driver: str, service: str
) -> None:
    """On these drivers a statement that may write in autocommit stops the unit's replays.
    ``lower(varchar)`` of the database's own, which writes, reaches a call of ``lower``: the
    check a new connection makes (as psycopg 3's and asyncpg's marked connections make it)
    distrusts the name, and the unit is not replayed after its write committed."""
    url = driver_url(driver, pg_server, pg_database)
    eng = prepared_engine(url, isolation_level="AUTOCOMMIT")
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE ledger (v int)")
        conn.exec_driver_sql(
            "CREATE FUNCTION public.lower(a varchar) RETURNS text LANGUAGE sql "
            "AS 'INSERT INTO ledger VALUES (1) RETURNING a'"
        )
    calls: list[int] = []
    try:
        Sessions = rdb.ResilientSession(eng, service=service)

        def unit(session: Session) -> None:
            calls.append(1)
            session.execute(sa.text("SELECT lower(CAST('A' AS varchar))"))
            session.execute(sa.text("SELECT raise_code('40001')"))

        with pytest.raises(sa.exc.DBAPIError) as raised:
            Sessions.run(unit)
        assert rdb.sqlstate_of(raised.value) == "40001"
        with eng.connect() as conn:
            written = conn.exec_driver_sql("SELECT count(*) FROM ledger").scalar()
    finally:
        eng.dispose()
    assert calls == [1]
    assert written == 1


class _GuardBase(sa.orm.DeclarativeBase):
    pass


class Ticket(_GuardBase):
    __tablename__ = "tickets"
    __transitions__ = rdb.TransitionRules(
        column="status", transitions={"open": {"closed"}, "closed": {"gone"}}, initial={"open"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(default="open")


def test_a_many_row_flush_names_the_row_another_transaction_moved(
    engine: sa.Engine, driver: str, service: str
) -> None:
    """The flush guard's compare-and-set on these drivers (both count an executemany's rows):
    the row another transaction moved is named with the state it holds, nothing is written."""
    _GuardBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Ticket), [{"id": i, "status": "open"} for i in (1, 2, 3)])
    Sessions = rdb.ResilientSession(engine, service=service)
    with Sessions() as session:
        tickets = [session.get(Ticket, i) for i in (1, 2, 3)]
        with engine.begin() as conn:  # another transaction moves the second on
            conn.execute(sa.update(Ticket).where(Ticket.id == 2).values(status="gone"))
        for ticket in tickets:
            assert ticket is not None
            ticket.status = "closed"
        with pytest.raises(rdb.StaleTransitionError) as info:
            session.flush()
        assert (info.value.pk, info.value.from_state, info.value.to_state) == (2, "open", "closed")
        assert "now holds 'gone'" in info.value.reason
    with engine.connect() as conn:
        assert conn.scalars(sa.select(Ticket.status).order_by(Ticket.id)).all() == [
            "open",
            "gone",
            "open",
        ]


@pytest.fixture
def autocommit(pg_server: PostgresServer, pg_database: str, driver: str) -> Iterator[sa.Engine]:
    eng = prepared_engine(driver_url(driver, pg_server, pg_database), isolation_level="AUTOCOMMIT")
    yield eng
    eng.dispose()


def test_a_write_in_autocommit_is_never_replayed(autocommit: sa.Engine, service: str) -> None:
    """An INSERT in autocommit committed on its own: a retried error after it must not replay
    the unit."""
    Sessions = rdb.ResilientSession(autocommit, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        session.execute(sa.insert(Item).values(name=f"auto-{len(calls)}"))
        session.execute(sa.text("SELECT raise_code('40001')"))

    with pytest.raises(sa.exc.DBAPIError):
        Sessions.run(unit)
    assert calls == [1]
    assert names(autocommit) == ["auto-1"]


def test_an_autocommit_statement_refused_by_the_server_is_replayed(
    autocommit: sa.Engine, service: str
) -> None:
    """The server's error answer proves the statement committed nothing: replayed."""
    Sessions = rdb.ResilientSession(autocommit, service=service)
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        if len(calls) == 1:
            session.execute(sa.text("SELECT raise_code('40001')"))
        session.execute(sa.insert(Item).values(name=f"auto-{len(calls)}"))

    Sessions.run(unit)
    assert calls == [1, 1]
    assert names(autocommit) == ["auto-2"]


def test_a_real_deadlock_between_two_units_ends_with_both_done(
    engine: sa.Engine, service: str
) -> None:
    """Two threads lock two rows in opposite orders; the server breaks the deadlock with 40P01
    in one of them, which is replayed."""
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config(max_retries=8))
    with Sessions.begin() as session:
        session.add_all([Item(id=1, name="a"), Item(id=2, name="b")])
    both_locked = threading.Barrier(2, timeout=10)
    calls: list[str] = []
    errors: list[BaseException] = []

    def unit(session: Session, first: int, second: int) -> None:
        calls.append(f"{first}")
        session.execute(sa.text("SELECT 1 FROM items WHERE id = :i FOR UPDATE"), {"i": first})
        if len(calls) <= 2:
            both_locked.wait()
        session.execute(sa.text("UPDATE items SET name = name || '+' WHERE id = :i"), {"i": second})

    def worker(first: int, second: int) -> None:
        try:
            Sessions.run(unit, first, second)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=order) for order in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    # the victim is replayed (once, as a rule: its replay, at once, may take the row the other
    # unit waits for before that one wakes, and deadlock with it again; see test_session's
    # twin): the test is about resolving, not about how many rounds
    replays = len(calls) - 2
    assert 1 <= replays <= 16, calls
    assert names(engine) == ["a+", "b+"]
    counters = rdb.health()["services"][service]["counters"]
    assert counters["retries_by_class"] == {"conflict": replays}


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_lost_commit_answer_is_unknown_never_replayed(
    *,
    pg_server: PostgresServer,
    pg_database: str,
    engine: sa.Engine,
    driver: str,
    service: str,
    caplog: Any,
) -> None:
    """No marker, so no proof either way: the unit is never replayed. psycopg2 sends its COMMIT
    as a simple query, pg8000 through the extended protocol."""
    with FaultProxy(pg_server) as proxy:
        proxied = sa.create_engine(driver_url(driver, pg_server, pg_database, proxy))
        try:
            with caplog.at_level("WARNING", logger="resilient_db"):
                Sessions = rdb.ResilientSession(proxied, service=service)
            assert any("can't carry a marker" in r.getMessage() for r in caplog.records)
            calls: list[int] = []

            def unit(session: Session) -> None:
                calls.append(1)
                session.add(Item(name=f"lost-{len(calls)}"))

            proxy.lose_commit_answer()
            with pytest.raises(rdb.CommitOutcomeUnknownError):
                Sessions.run(unit)
            assert proxy.commits_lost == 1
            assert calls == [1]
        finally:
            proxied.dispose()
    assert names(engine) == ["lost-1"]


def test_no_unverifiable_commit_warning_while_self_healing_is_off(
    engine: sa.Engine, service: str, clean_env: pytest.MonkeyPatch, caplog: Any
) -> None:
    """SELF_HEALING_ENABLED=false is plain SQLAlchemy: no warning about what self-healing can't
    do on this driver, until a reload switches it on (then once)."""

    def warnings() -> int:
        return sum("can't carry a marker" in r.getMessage() for r in caplog.records)

    clean_env.setenv("SELF_HEALING_ENABLED", "false")
    with caplog.at_level("WARNING", logger="resilient_db"):
        Sessions = rdb.ResilientSession(engine, service=service)
        assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
        assert warnings() == 0
        clean_env.setenv("SELF_HEALING_ENABLED", "true")
        rdb.reload_config()
        assert warnings() == 1
        rdb.reload_config()
        assert Sessions.run(lambda s: s.execute(sa.text("SELECT 1")).scalar()) == 1
    assert warnings() == 1


def test_the_unverifiable_commit_warning_names_the_factorys_service(
    engine: sa.Engine, service: str, caplog: Any, events: list[rdb.SelfHealEvent]
) -> None:
    """Said as the engine's first factory is made: it was said under "database", the engine's
    placeholder before any factory's service was known."""
    with caplog.at_level("WARNING", logger="resilient_db"):
        rdb.ResilientSession(engine, service=service)
    [line] = [r.getMessage() for r in caplog.records if "can't carry a marker" in r.getMessage()]
    [event] = [e for e in events if e.name == "commit_verification_unavailable"]
    assert event.service == service
    assert line.startswith("[SELF-HEAL] Engine ")


def test_a_transient_error_on_the_drivers_own_connection_is_answered_503(
    engine: sa.Engine, driver: str, service: str
) -> None:
    """A statement a unit sends on the driver's own connection fails with the driver's error,
    which SQLAlchemy never wraps: a serialization failure (40001, read from psycopg2's
    ``pgcode`` or pg8000's fields) is replayed, and once out of retries answered 503 by the web
    handlers, as psycopg's and asyncpg's are (it was the application's plain 500). One that is
    not transient stays the application's."""
    from starlette.applications import Starlette  # noqa: PLC0415 - the web extra
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import JSONResponse  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415
    from starlette.testclient import TestClient  # noqa: PLC0415

    from resilient_db.web import PROBLEM_JSON, install_exception_handlers  # noqa: PLC0415

    config = rdb.Config(max_retries=1, circuit_breaker=False)
    Sessions = rdb.ResilientSession(engine, service=service, config=config)
    calls: list[str] = []

    def raw(code: str) -> Any:
        def unit(session: Session) -> None:
            calls.append(code)
            cursor = session.connection().connection.driver_connection.cursor()
            cursor.execute(f"SELECT raise_code('{code}')")

        def route(request: Request) -> JSONResponse:
            Sessions.run(unit)
            return JSONResponse({})

        return route

    app = Starlette(routes=[Route("/conflict", raw("40001")), Route("/division", raw("22012"))])
    install_exception_handlers(app)
    client = TestClient(app, raise_server_exceptions=False)
    answer = client.get("/conflict")
    assert answer.status_code == 503
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["type"].endswith("database-unavailable")
    assert calls == ["40001", "40001"]
    refused = client.get("/division")  # not transient: the application's, as before
    assert refused.status_code == 500
    assert refused.headers["content-type"] != PROBLEM_JSON


def test_the_handlers_skip_a_driver_that_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg2 and pg8000 are not resilient_db's dependencies: without them the handlers are
    installed all the same, for the other classes."""
    from starlette.applications import Starlette  # noqa: PLC0415 - the web extra

    from resilient_db.web import install_exception_handlers  # noqa: PLC0415
    from resilient_db.web._handlers import HANDLED  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "psycopg2", None)  # what importing a missing module meets
    monkeypatch.setitem(sys.modules, "pg8000.exceptions", None)
    app = Starlette()
    install_exception_handlers(app)
    assert set(app.exception_handlers) == {*HANDLED, Exception}  # (Exception: see the handlers)
