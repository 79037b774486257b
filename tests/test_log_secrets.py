"""No log line carries a statement's bound parameters or a row's values, DEBUG lines included.

A database error's text quotes them (SQLAlchemy's ``[parameters: ...]``, the server's ``DETAIL:
Key (email)=(...)``), and so does every error raised while it is handled (its context): a
traceback logged with ``exc_info`` would carry them into the application's logs.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa
from loops import LOOPS, run_on
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy

SECRET = "carol.secret@example.com"
CONFIG = rdb.Config(initial_delay=0.001, max_delay=0.001, circuit_breaker=False)


@pytest.fixture
def users(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE leak_users (id int PRIMARY KEY, email text UNIQUE)"))
        conn.execute(sa.text("INSERT INTO leak_users VALUES (1, :e)"), {"e": SECRET})
    engine.dispose()


INSERT = sa.text("INSERT INTO leak_users VALUES (2, :e)")


def _cut_on_duplicate(engine: sa.Engine, proxy: FaultProxy) -> None:
    """The network goes down right after the duplicate key: the rollback that follows fails."""

    @sa.event.listens_for(engine, "handle_error")
    def cut(context: Any) -> None:
        if getattr(context.original_exception, "sqlstate", None) == "23505":
            proxy.cut_all()


def _assert_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    lines = [r for r in caplog.records if r.name.startswith("resilient_db")]
    text = "\n".join(logging.Formatter("%(message)s").format(r) for r in lines)
    assert "rollback after a failed attempt failed too" in text  # the line is there ...
    assert SECRET not in text  # ... without the value ...
    assert "[parameters:" not in text
    assert "SQLSTATE 23505" in text  # ... saying what failed first


@pytest.mark.usefixtures("users")
def test_a_failed_rollback_after_a_database_error_logs_no_values(
    pg_server: Any, pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    with FaultProxy(pg_server) as proxy:
        engine = sa.create_engine(proxy.url(pg_database))
        _cut_on_duplicate(engine, proxy)
        Sessions = rdb.ResilientSession(engine, service="leaks", config=CONFIG)

        def unit(session: Session) -> None:
            session.execute(INSERT, {"e": SECRET})

        try:
            with pytest.raises(sa.exc.IntegrityError):
                Sessions.run(unit)
        finally:
            engine.dispose()
    _assert_no_secret(caplog)


@pytest.mark.usefixtures("users")
@pytest.mark.parametrize("loop", LOOPS)
def test_a_failed_rollback_after_a_database_error_logs_no_values_async(
    pg_server: Any, pg_database: str, caplog: pytest.LogCaptureFixture, loop: str
) -> None:
    """On either event loop. uvloop gives asyncpg the socket's ``ConnectionResetError`` as
    the lost connection's error, which asyncpg raises its own from: the rollback's error
    then no longer had the attempt's as its context, and the line lost the SQLSTATE 23505
    that made the attempt fail."""
    caplog.set_level(logging.DEBUG, logger="resilient_db")

    async def main() -> None:
        engine = create_async_engine(proxy.url(pg_database, driver="asyncpg"))
        _cut_on_duplicate(engine.sync_engine, proxy)
        Sessions = rdb.AsyncResilientSession(engine, service="leaks-async", config=CONFIG)

        async def unit(session: AsyncSession) -> None:
            await session.execute(INSERT, {"e": SECRET})

        try:
            with pytest.raises(sa.exc.IntegrityError):
                await Sessions.run(unit)
        finally:
            await engine.dispose()

    with FaultProxy(pg_server) as proxy:
        run_on(loop, main())
    _assert_no_secret(caplog)


@pytest.mark.usefixtures("users")
def test_failure_detail_keeps_the_frames_and_codes_of_a_chain(engine: sa.Engine) -> None:
    """Every error of the chain with its frames; a database error's text left out, another's
    kept (it is the library's or the application's own)."""
    from resilient_db._classify import failure_detail  # noqa: PLC0415

    try:
        try:
            with engine.begin() as conn:
                conn.execute(INSERT.bindparams(e=SECRET))
        except sa.exc.IntegrityError as exc:
            raise RuntimeError("the handler failed too") from exc
    except RuntimeError as exc:
        detail = failure_detail(exc)
    assert SECRET not in detail
    assert "sqlalchemy.exc.IntegrityError: (SQLSTATE 23505;" in detail
    assert "RuntimeError: the handler failed too" in detail
    assert detail.index("IntegrityError") < detail.index("RuntimeError")  # first error first
    assert "test_failure_detail_keeps_the_frames_and_codes_of_a_chain" in detail  # frames


def test_failure_detail_hides_what_a_database_error_was_raised_from(engine: sa.Engine) -> None:
    """An Enum's bind processor refuses a value (``LookupError: '<the value>' is not among the
    defined enum values``) and SQLAlchemy raises its StatementError from it: both are left
    out, and so is a ResponseValidationError's pydantic cause (``input_value=...``)."""
    from resilient_db._classify import failure_detail  # noqa: PLC0415

    pydantic = pytest.importorskip("pydantic")
    table = sa.Table(
        "leak_kinds",
        sa.MetaData(),
        sa.Column("kind", sa.Enum("a", "b", name="leak_kind", validate_strings=True)),
    )
    with engine.begin() as conn:
        table.create(conn)
    with engine.connect() as conn, pytest.raises(sa.exc.StatementError) as bound:
        conn.execute(table.insert().values(kind=SECRET))
    detail = failure_detail(bound.value)
    assert SECRET not in detail
    assert "LookupError: (no SQLSTATE; its text left out" in detail

    class Account(pydantic.BaseModel):
        email: int

    Sessions = rdb.ResilientSession(engine, service="leaks-validation", config=CONFIG)
    with pytest.raises(rdb.ResponseValidationError) as invalid:
        Sessions.run(lambda s: {"email": SECRET}, validate=Account)
    detail = failure_detail(invalid.value)
    assert SECRET not in detail
    assert "ResponseValidationError: (no SQLSTATE; its text left out" in detail


def test_failure_detail_never_raises() -> None:
    """Inside the ``except`` block that logs it: an error class without a module, or a driver
    error whose fields raise, still gives a text."""
    from resilient_db._classify import failure_detail  # noqa: PLC0415

    class Odd(Exception):
        pass

    Odd.__module__ = None  # type: ignore[assignment]

    class Broken(Exception):
        @property
        def sqlstate(self) -> str:
            raise RuntimeError("no fields")

    Broken.__module__ = "psycopg.errors"
    for error in (Odd("odd"), Broken("broken")):
        with pytest.raises(type(error)) as raised:  # (a traceback to format)
            raise error
        assert type(error).__qualname__ in failure_detail(raised.value)


#: a deferred trigger whose WARNING at COMMIT quotes the row it checks
_WARNS_AT_COMMIT = (
    "CREATE TABLE leak_balances (id int PRIMARY KEY, email text NOT NULL)",
    "CREATE FUNCTION leak_low_balance() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN RAISE WARNING 'low balance for %', NEW.email; RETURN NULL; END$$",
    "CREATE CONSTRAINT TRIGGER leak_low_balance AFTER INSERT ON leak_balances "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION leak_low_balance()",
)
INSERT_BALANCE = sa.text("INSERT INTO leak_balances VALUES (1, :e)")


@pytest.fixture
def balances(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for statement in _WARNS_AT_COMMIT:
            conn.execute(sa.text(statement))
    rdb.install_commit_markers(engine)


def _assert_warning_said_without_its_text(
    caplog: pytest.LogCaptureFixture, events: list[rdb.SelfHealEvent]
) -> None:
    verified = [e for e in events if e.name == "commit_verified"]
    assert len(verified) == 1, events
    assert "a WARNING with SQLSTATE 01000 (its text left out" in verified[0].message
    lines = [r for r in caplog.records if r.name.startswith("resilient_db")]
    text = "\n".join(logging.Formatter("%(message)s").format(r) for r in lines)
    assert "Commit outcome verified" in text
    assert SECRET not in text
    assert all(SECRET not in repr(e) for e in events)


@pytest.mark.usefixtures("balances")
def test_a_warning_at_commit_is_said_without_the_values_it_quotes(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture, events: list[rdb.SelfHealEvent]
) -> None:
    """An application's deferred trigger answers the COMMIT with a WARNING quoting the row
    (``low balance for <email>``): the unit is proven committed, and the line and event that
    say so name the warning's SQLSTATE, not its text (before: the text, the email with it)."""
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    Sessions = rdb.ResilientSession(engine, service="leaks-warning", config=CONFIG)
    assert Sessions.run(lambda s: s.execute(INSERT_BALANCE, {"e": SECRET}).rowcount) == 1
    _assert_warning_said_without_its_text(caplog, events)


@pytest.mark.asyncio
@pytest.mark.usefixtures("balances")
async def test_a_warning_at_commit_is_said_without_the_values_it_quotes_async(
    pg_async_url: str, caplog: pytest.LogCaptureFixture, events: list[rdb.SelfHealEvent]
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    engine = create_async_engine(pg_async_url)
    Sessions = rdb.AsyncResilientSession(engine, service="leaks-warning-async", config=CONFIG)

    async def unit(session: AsyncSession) -> int:
        return (await session.execute(INSERT_BALANCE, {"e": SECRET})).rowcount

    try:
        assert await Sessions.run(unit) == 1
    finally:
        await engine.dispose()
    _assert_warning_said_without_its_text(caplog, events)


def test_the_servers_synchronous_replication_warnings_are_quoted() -> None:
    """The server's own warning of a cancelled wait for a standby says what happened: kept."""
    from resilient_db._commit import commit_warning  # noqa: PLC0415

    said = commit_warning("01000", "canceling wait for synchronous replication due to user request")
    assert said == "01000: canceling wait for synchronous replication due to user request"
    assert SECRET not in commit_warning("01000", f"low balance for {SECRET}")


@pytest.mark.usefixtures("users")
def test_a_bypass_not_undone_on_a_failed_connection_logs_no_values(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A bypass is undone while the application's database error is handled, on a connection
    whose transaction that error aborted: the DEBUG line's traceback names the errors (their
    classes and SQLSTATEs), not the values they quote (before: ``exc_info``, the duplicate
    key's DETAIL and SQLAlchemy's ``[parameters: ...]`` with it)."""
    from resilient_db.transitions._bypass import _Bypass, _undo  # noqa: PLC0415

    caplog.set_level(logging.DEBUG, logger="resilient_db")
    with engine.connect() as conn:
        transaction = conn.begin()
        bypass = _Bypass(transaction, "ticket 4711", CONFIG, None)
        bypass.connections.append(conn)
        try:
            conn.execute(INSERT, {"e": SECRET})
        except sa.exc.IntegrityError:
            _undo(bypass)  # its UNDO fails: the transaction is aborted
        transaction.rollback()
    (record,) = [r for r in caplog.records if "bypass not undone" in r.getMessage()]
    text = logging.Formatter("%(message)s").format(record)
    assert SECRET not in text
    assert "[parameters:" not in text
    assert "SQLSTATE 25P02" in text  # the UNDO's failure ...
    assert "SQLSTATE 23505" in text  # ... and what it was raised while handling
