"""Who can switch the transition trigger off, and which errors are the trigger's.

The trigger lets an illegal change through only when the setting ``resilient_db.bypass_transitions``
names the current transaction *and* the role is granted ``resilient_db_bypass``; every other way
of setting it (``SET``, ``SET LOCAL 'on'``, its own transaction id, a connect option, a leftover
from an earlier checkout of a pooled connection) leaves the guard on. Only an error raised by our
trigger function becomes ``IllegalTransitionError``: ``RAISE ... USING ERRCODE = 'RDB01'`` by any
other SQL stays the database error it is.

Roles are created per test (only SELECT and UPDATE on the table) and dropped after it; everything
runs on the real server, sync (psycopg) and async (asyncpg).
"""

from __future__ import annotations

import json
import logging
import pickle
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from psycopg import sql as pgsql
from scenarios import BYPASS_BY_HAND
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db as rdb
from resilient_db._state import STATE
from resilient_db.testing import PostgresServer
from resilient_db.transitions._bypass import active_config
from resilient_db.transitions._dbmap import exception_from_db
from resilient_db.transitions._report import transition_stats
from resilient_db.transitions._rules import guards_of
from resilient_db.transitions._sql import bypass_role_statement, trigger_names

LOGGER = "resilient_db.transitions"


class Base(DeclarativeBase):
    pass


class Ticket(Base):
    __tablename__ = "bp_tickets"
    __transitions__ = rdb.TransitionRules(
        column="status", transitions={"open": {"closed"}}, initial={"open"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="open")


class Chore(Base):
    """Created and guarded by a role that may not create roles (see the missing-role test)."""

    __tablename__ = "bp_chores"
    __transitions__ = rdb.TransitionRules(
        column="status", transitions={"todo": {"done"}}, initial={"todo"}
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="todo")


def reopen(ticket_id: int) -> str:
    """An illegal move (closed -> open) that only a bypass lets through."""
    return f"UPDATE bp_tickets SET status = 'open' WHERE id = {ticket_id}"


OWN_XID = "SELECT set_config('resilient_db.bypass_transitions', pg_current_xact_id()::text, {})"
ROWS = 4


@dataclass(frozen=True)
class Role:
    name: str
    url: str
    async_url: str


@pytest.fixture
def admin(pg_server: PostgresServer, pg_url: str) -> Iterator[sa.Engine]:
    """The superuser's engine on a database with the guarded table, ROWS closed tickets."""
    rows = pg_server.execute(
        "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
    )
    if not rows or not rows[0][0]:
        pytest.skip("needs a server role that may create roles (superuser or CREATEROLE)")
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        Base.metadata.create_all(conn, tables=[Ticket.__table__])  # type: ignore[list-item]
        rdb.install_transition_trigger(conn, Ticket)
        conn.exec_driver_sql(BYPASS_BY_HAND)
        for ticket_id in range(1, ROWS + 1):
            conn.exec_driver_sql(f"INSERT INTO bp_tickets VALUES ({ticket_id}, 'closed')")
    yield engine
    engine.dispose()


@pytest.fixture
def make_role(
    pg_server: PostgresServer, pg_database: str, pg_url: str, pg_async_url: str, admin: sa.Engine
) -> Iterator[Callable[..., Role]]:
    """Make a login role with SELECT and UPDATE on the table; ``then`` runs more admin SQL with
    ``{role}`` standing for it (a GRANT). Dropped after the test."""
    created: list[str] = []

    def make(*then: str) -> Role:
        name = f"rdb_t_{uuid.uuid4().hex[:12]}"
        password = secrets.token_urlsafe(18)
        role = pgsql.Identifier(name)
        pg_server.execute(
            pgsql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, pgsql.Literal(password))
        )
        created.append(name)
        pg_server.execute(
            pgsql.SQL("GRANT SELECT, UPDATE ON bp_tickets TO {}").format(role),
            database=pg_database,
        )
        for statement in then:
            pg_server.execute(pgsql.SQL(statement).format(role=role), database=pg_database)
        return Role(
            name=name,
            url=_as(pg_url, name, password),
            async_url=_as(pg_async_url, name, password),
        )

    yield make
    for name in created:
        pg_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            params=(name,),
        )
        pg_server.execute(
            pgsql.SQL("DROP OWNED BY {}").format(pgsql.Identifier(name)), database=pg_database
        )
        pg_server.execute(pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier(name)))


def _as(url: str, user: str, password: str) -> str:
    return sa.make_url(url).set(username=user, password=password).render_as_string(False)


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    logger = logging.getLogger(LOGGER)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _status(admin: sa.Engine, ticket_id: int) -> str:
    with admin.connect() as conn:
        return str(
            conn.exec_driver_sql(f"SELECT status FROM bp_tickets WHERE id = {ticket_id}").scalar()
        )


def _blocked(conn: sa.Connection, statement: str) -> Exception:
    """Run ``statement``, which must fail; the transaction is rolled back. (Once a resilient
    factory uses the engine, the trigger's error comes as IllegalTransitionError, raised from
    the database error: ``rdb.sqlstate_of`` reads either.)"""
    with pytest.raises((sa.exc.DBAPIError, rdb.IllegalTransitionError)) as info:
        conn.exec_driver_sql(statement)
    conn.rollback()
    return info.value


# ------------------------------------------------------------------------------------------------
# setting it by hand
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "SET resilient_db.bypass_transitions = 'on'",
        "SET LOCAL resilient_db.bypass_transitions = 'on'",
        "SELECT set_config('resilient_db.bypass_transitions', 'on', false)",
    ],
)
def test_setting_it_on_by_hand_does_not_switch_the_trigger_off(
    admin: sa.Engine, make_role: Callable[..., Role], statement: str
) -> None:
    role = make_role()
    engine = sa.create_engine(role.url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(statement)
            assert conn.exec_driver_sql("SHOW resilient_db.bypass_transitions").scalar() == "on"
            err = _blocked(conn, reopen(1))
    finally:
        engine.dispose()
    assert rdb.sqlstate_of(err) == rdb.TRANSITION_SQLSTATE
    assert exception_from_db(err) is not None  # the trigger's own error
    assert _status(admin, 1) == "closed"


@pytest.mark.parametrize("local", [True, False], ids=["SET LOCAL", "SET"])
def test_its_own_transaction_id_is_refused_for_a_role_not_granted_the_bypass(
    admin: sa.Engine, make_role: Callable[..., Role], local: bool
) -> None:
    """The value that asks for a bypass, from a role that may not: a clear 42501, not RDB01."""
    role = make_role()
    engine = sa.create_engine(role.url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(OWN_XID.format("true" if local else "false"))
            err = _blocked(conn, reopen(1))
    finally:
        engine.dispose()
    assert rdb.sqlstate_of(err) == "42501"
    assert f"role {role.name} (logged in as {role.name}) may not bypass" in str(err)
    assert "GRANT resilient_db_bypass TO" in str(err)  # the hint says how
    assert exception_from_db(err) is None
    assert _status(admin, 1) == "closed"


def test_a_connect_option_does_not_switch_the_trigger_off(
    admin: sa.Engine, make_role: Callable[..., Role]
) -> None:
    role = make_role()
    options = {"options": "-c resilient_db.bypass_transitions=on"}
    engine = sa.create_engine(role.url, connect_args=options)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW resilient_db.bypass_transitions").scalar() == "on"
            err = _blocked(conn, reopen(1))
    finally:
        engine.dispose()
    assert rdb.sqlstate_of(err) == rdb.TRANSITION_SQLSTATE
    assert _status(admin, 1) == "closed"


def test_a_leftover_setting_does_not_reach_the_next_checkout(
    admin: sa.Engine, make_role: Callable[..., Role]
) -> None:
    """A session-level SET survives the pool's reset (a ROLLBACK): the next, unrelated checkout
    of that connection sees it, and is guarded all the same, blocks counted as usual."""
    role = make_role()
    engine = sa.create_engine(role.url, pool_size=1, max_overflow=0)
    factory = rdb.ResilientSession(engine, service="bypass-leak")
    try:
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            conn.exec_driver_sql("SET resilient_db.bypass_transitions = 'on'")
            conn.commit()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid
            assert conn.exec_driver_sql("SHOW resilient_db.bypass_transitions").scalar() == "on"
            assert rdb.sqlstate_of(_blocked(conn, reopen(1))) == rdb.TRANSITION_SQLSTATE

        def unit(session: Session) -> None:
            assert session.execute(sa.text("SELECT pg_backend_pid()")).scalar() == pid
            session.execute(sa.text(reopen(2)))

        blocked = transition_stats()["blocked_transitions"]
        with pytest.raises(rdb.IllegalTransitionError) as info:
            factory.run(unit)
    finally:
        engine.dispose()
    assert info.value.via == "db"
    assert transition_stats()["blocked_transitions"] == blocked + 1
    assert (_status(admin, 1), _status(admin, 2)) == ("closed", "closed")


# ------------------------------------------------------------------------------------------------
# rdb.bypass_transitions: the audited way in, for granted roles only
# ------------------------------------------------------------------------------------------------


def test_bypass_transitions_is_refused_for_a_role_not_granted_it(
    admin: sa.Engine,
    make_role: Callable[..., Role],
    log: pytest.LogCaptureFixture,
    events: list[rdb.SelfHealEvent],
) -> None:
    role = make_role()
    engine = sa.create_engine(role.url)
    factory = rdb.ResilientSession(engine, service="bypass-refused")
    bypasses = transition_stats()["bypasses"]
    try:
        with factory() as session:
            with pytest.raises(rdb.BypassRefusedError) as info:
                rdb.bypass_transitions(session, reason="ticket 9: reopen")
            ticket = session.get(Ticket, 1)
            assert ticket is not None
            ticket.status = "open"
            with pytest.raises(rdb.IllegalTransitionError) as blocked:
                session.flush()  # the session guards stayed on
            assert blocked.value.via == "flush"
            session.rollback()
            with pytest.raises(rdb.IllegalTransitionError) as db_error:
                session.execute(sa.text(reopen(1)))  # and so did the trigger
            assert db_error.value.via == "db"
        with engine.connect() as conn, pytest.raises(rdb.BypassRefusedError):
            rdb.bypass_transitions(conn, reason="ticket 9: reopen")
    finally:
        engine.dispose()
    err = info.value
    assert isinstance(err, PermissionError)
    assert (err.role, err.login_role) == (role.name, role.name)
    copy = pickle.loads(pickle.dumps(err))  # (a task queue's worker raised it)
    assert (type(copy), str(copy), repr(copy)) == (type(err), str(err), repr(err))
    assert (copy.role, copy.login_role) == (role.name, role.name)
    assert f"role {role.name} may not bypass the transition guard" in str(err)
    assert "GRANT resilient_db_bypass TO <role>" in str(err)
    assert transition_stats()["bypasses"] == bypasses
    messages = [r.getMessage() for r in log.records]
    assert not [m for m in messages if "guard bypassed" in m]
    # the session's refusal names its service, as a bypass's audit line does (the event's
    # service None: the guard's events are process-wide); the connection's has none to name
    assert [m for m in messages if m.startswith("[SELF-HEAL] transition guard bypass refused")] == [
        f"[SELF-HEAL] transition guard bypass refused: {service}role={role.name} "
        f"login_role={role.name} reason=ticket 9: reopen"
        for service in ("service=bypass-refused ", "")
    ]
    refused = [e for e in events if e.name == "transition_guard_bypass_refused"]
    assert [(e.service, e.fields["unit_service"]) for e in refused] == [
        (None, "bypass-refused"),
        (None, None),
    ]
    assert _status(admin, 1) == "closed"


@pytest.mark.parametrize("when", ["begun before", "begun after"])
def test_a_refusal_on_one_connection_of_a_session_undoes_the_bypass_on_all(
    admin: sa.Engine, make_role: Callable[..., Role], when: str
) -> None:
    """A session whose tickets go through a role not granted the bypass, the rest through the
    superuser's engine: the bypass is refused on the ticket's connection, whether it was begun
    before the bypass or after it (the statement that began it raises), and nothing of it is
    left: the superuser's connection guarded again in the same transaction, the session
    guards on."""
    role = make_role()
    engine = sa.create_engine(role.url)
    factory = rdb.ResilientSession(admin, service="bypass-undone", binds={Ticket: engine})
    try:
        with factory() as session:
            session.execute(sa.text("SELECT 1"))  # the superuser's connection begins
            if when == "begun before":
                session.get(Ticket, 1)
                with pytest.raises(rdb.BypassRefusedError):
                    rdb.bypass_transitions(session, reason="ticket 10")
            else:
                rdb.bypass_transitions(session, reason="ticket 10")  # bound on the first
                with pytest.raises(rdb.BypassRefusedError):
                    session.get(Ticket, 1)
            assert active_config(session) is not None  # the session guards act
            setting = "SELECT current_setting('resilient_db.bypass_transitions', true)"
            assert session.execute(sa.text(setting)).scalar() == ""
            with pytest.raises(rdb.IllegalTransitionError) as db_error:
                session.execute(sa.text(reopen(2)))  # through the superuser's connection
            assert db_error.value.via == "db"
    finally:
        engine.dispose()
    assert (_status(admin, 1), _status(admin, 2)) == ("closed", "closed")


def test_a_granted_role_bypasses_for_its_transaction_only(
    admin: sa.Engine, make_role: Callable[..., Role], log: pytest.LogCaptureFixture
) -> None:
    role = make_role("GRANT resilient_db_bypass TO {role}")
    engine = sa.create_engine(role.url, pool_size=1, max_overflow=0)
    factory = rdb.ResilientSession(engine, service="bypass-granted")
    bypasses = transition_stats()["bypasses"]
    try:
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            rdb.bypass_transitions(conn, reason="ticket 7: reopen")
            conn.exec_driver_sql(reopen(1))
            # the value stays in the session if set with SET: it names this transaction only
            xid = conn.exec_driver_sql("SELECT pg_current_xact_id()::text").scalar()
            conn.exec_driver_sql(f"SET resilient_db.bypass_transitions = '{xid}'")
            conn.commit()
            assert rdb.sqlstate_of(_blocked(conn, reopen(2))) == rdb.TRANSITION_SQLSTATE
        with engine.connect() as conn:  # the next checkout of the same connection
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid
            assert conn.exec_driver_sql("SHOW resilient_db.bypass_transitions").scalar() == xid
            assert rdb.sqlstate_of(_blocked(conn, reopen(2))) == rdb.TRANSITION_SQLSTATE
        with factory() as session:
            rdb.bypass_transitions(session, reason="ticket 8: reopen")
            ticket = session.get(Ticket, 3)
            assert ticket is not None
            ticket.status = "open"
            session.commit()  # flush guard and trigger both let it through
            ticket.status = "closed"
            session.commit()  # legal
            ticket.status = "open"
            with pytest.raises(rdb.IllegalTransitionError):
                session.flush()  # the bypass ended with its transaction
    finally:
        engine.dispose()
    assert [_status(admin, i) for i in range(1, 4)] == ["open", "closed", "closed"]
    assert transition_stats()["bypasses"] == bypasses + 2
    assert len([r for r in log.records if "guard bypassed" in r.getMessage()]) == 2


@dataclass(frozen=True)
class Notice:
    severity: str | None
    message: str | None
    detail: str | None


def _server_log_lines(conn: sa.Connection) -> list[Notice]:
    """Have the server send this connection its LOG messages too (``client_min_messages``), and
    collect them: what the server writes to its log, seen by the client. (A notice's fields are
    read in the handler: psycopg frees them after it.)"""
    seen: list[Notice] = []
    conn.exec_driver_sql("SET client_min_messages = log")
    driver = conn.connection.dbapi_connection
    assert isinstance(driver, psycopg.Connection)
    driver.add_notice_handler(
        lambda d: seen.append(Notice(d.severity_nonlocalized, d.message_primary, d.message_detail))
    )
    return seen


def _bypass_lines(seen: list[Notice]) -> list[Notice]:
    return [n for n in seen if "transition guard bypassed" in (n.message or "")]


def test_every_bypassed_move_is_written_to_the_server_log(
    pg_server: PostgresServer, admin: sa.Engine, make_role: Callable[..., Role]
) -> None:
    """The audit on the database side: one LOG line per move the trigger lets through, naming
    the row, the move, both roles and the reason, also for a value set by hand (no Python log
    line there), and nothing for a legal move."""
    role = make_role("GRANT resilient_db_bypass TO {role}")
    engine = sa.create_engine(role.url)
    reason = f"ticket {uuid.uuid4().hex[:8]}: reopen"
    try:
        with engine.connect() as conn:
            seen = _server_log_lines(conn)
            rdb.bypass_transitions(conn, reason=reason)
            xid = conn.exec_driver_sql("SELECT pg_current_xact_id()::text").scalar()
            conn.exec_driver_sql(reopen(1))
            conn.exec_driver_sql("UPDATE bp_tickets SET status = 'closed' WHERE id = 1")  # legal
            conn.commit()
            by_function = _bypass_lines(seen)
            # set by hand in SQL by a granted role, past bypass_transitions(): logged all the same
            conn.exec_driver_sql(OWN_XID.format("true"))
            conn.exec_driver_sql("UPDATE bp_tickets SET status = 'open' WHERE id IN (2, 3)")
            conn.commit()
            by_hand = _bypass_lines(seen)[len(by_function) :]
    finally:
        engine.dispose()
    assert [n.severity for n in by_function] == ["LOG"]
    (line,) = by_function
    assert line.message == (
        f"resilient_db: status transition guard bypassed: bp_tickets.status "
        f"{{\"id\" : 1}} 'closed' -> 'open' by role {role.name} (logged in as {role.name}), "
        f"reason: '{reason}'"
    )
    assert json.loads(line.detail or "") == {
        "resilient_db": "transition_bypassed",
        "model": "Ticket",
        "schema": "public",
        "table": "bp_tickets",
        "column": "status",
        "op": "UPDATE",
        "from": "closed",
        "to": "open",
        "pk": {"id": 1},
        "role": role.name,
        "login_role": role.name,
        "xid": xid,
        "reason": reason,
    }
    assert len(by_hand) == 2
    assert all(
        (n.message or "").endswith(
            "reason: none given (the bypass was not asked for through bypass_transitions())"
        )
        for n in by_hand
    )
    assert sorted(json.loads(n.detail or "")["pk"]["id"] for n in by_hand) == [2, 3]
    log_path = getattr(pg_server, "log_path", None)
    if isinstance(log_path, Path):  # an embedded server: its log file has the line itself
        deadline = time.monotonic() + 10
        while reason not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"no bypass line in {log_path}"
            time.sleep(0.05)
    assert [_status(admin, i) for i in (1, 2, 3)] == ["closed", "open", "open"]


def test_membership_without_the_roles_privileges_is_not_enough(
    pg_server: PostgresServer, admin: sa.Engine, make_role: Callable[..., Role]
) -> None:
    """What PostgreSQL 16+ gives the (non-superuser) creator of a role: membership WITH ADMIN
    OPTION but without INHERIT. A migration role that created resilient_db_bypass must not be
    able to bypass on that account."""
    if int(pg_server.execute("SHOW server_version_num")[0][0]) < 160000:
        pytest.skip("GRANT ... WITH INHERIT FALSE needs PostgreSQL 16")
    role = make_role("GRANT resilient_db_bypass TO {role} WITH INHERIT FALSE")
    engine = sa.create_engine(role.url)
    try:
        with engine.connect() as conn:
            with pytest.raises(rdb.BypassRefusedError):
                rdb.bypass_transitions(conn, reason="x")
            conn.rollback()
            conn.exec_driver_sql(OWN_XID.format("true"))
            assert rdb.sqlstate_of(_blocked(conn, reopen(1))) == "42501"
    finally:
        engine.dispose()
    assert _status(admin, 1) == "closed"


def test_a_security_definer_function_does_not_lend_its_owner_the_bypass(
    admin: sa.Engine, make_role: Callable[..., Role]
) -> None:
    """The role in effect inside a SECURITY DEFINER function is its owner (here a superuser);
    the role that logged in must be granted the bypass as well."""
    with admin.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION reopen_ticket(ticket integer) RETURNS void LANGUAGE sql "
            "SECURITY DEFINER SET search_path = public, pg_temp AS "
            "$$ UPDATE bp_tickets SET status = 'open' WHERE id = ticket $$"
        )
    plain = make_role()
    granted = make_role("GRANT resilient_db_bypass TO {role}")
    engine = sa.create_engine(plain.url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(OWN_XID.format("true"))
            err = _blocked(conn, "SELECT reopen_ticket(1)")
    finally:
        engine.dispose()
    assert rdb.sqlstate_of(err) == "42501"
    assert f"(logged in as {plain.name}) may not bypass" in str(err)
    assert _status(admin, 1) == "closed"
    engine = sa.create_engine(granted.url)
    try:
        with engine.connect() as conn:
            rdb.bypass_transitions(conn, reason="repair through the function")
            conn.exec_driver_sql("SELECT reopen_ticket(1)")
            conn.commit()
    finally:
        engine.dispose()
    assert _status(admin, 1) == "open"


def test_a_membership_that_confers_nothing_does_not_lend_the_bypass(
    pg_server: PostgresServer, admin: sa.Engine, make_role: Callable[..., Role]
) -> None:
    """A login granted a bypassing role WITH INHERIT FALSE, SET FALSE is a member of it (and so
    of resilient_db_bypass) but holds none of its rights: calling that role's SECURITY DEFINER
    functions does not let it bypass (setting the value itself, or having the function do it).
    The same grant WITH SET TRUE (the login could SET ROLE to it) does."""
    if int(pg_server.execute("SHOW server_version_num")[0][0]) < 160000:
        pytest.skip("GRANT ... WITH INHERIT FALSE, SET FALSE needs PostgreSQL 16")
    owner = make_role("GRANT resilient_db_bypass TO {role}")
    with admin.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION set_ticket(ticket integer, st text) RETURNS void LANGUAGE sql "
            "SECURITY DEFINER SET search_path = public, pg_temp AS "
            "$$ UPDATE bp_tickets SET status = st WHERE id = ticket $$"
        )
        conn.exec_driver_sql(
            "CREATE FUNCTION force_ticket(ticket integer, st text) RETURNS void "
            "LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$ BEGIN "
            "PERFORM set_config('resilient_db.bypass_transitions', "
            "pg_current_xact_id()::text, true); "
            "UPDATE bp_tickets SET status = st WHERE id = ticket; END $$"
        )
        for function in ("set_ticket", "force_ticket"):
            conn.exec_driver_sql(
                f'ALTER FUNCTION {function}(integer, text) OWNER TO "{owner.name}"'
            )
    powerless = make_role(f'GRANT "{owner.name}" TO {{role}} WITH INHERIT FALSE, SET FALSE')
    may_set = make_role(f'GRANT "{owner.name}" TO {{role}} WITH INHERIT FALSE, SET TRUE')
    engine = sa.create_engine(powerless.url)
    try:
        with engine.connect() as conn:
            err = _blocked(conn, "SELECT force_ticket(1, 'open')")
            assert rdb.sqlstate_of(err) == "42501"
            assert f"(logged in as {powerless.name}) may not bypass" in str(err)
            conn.exec_driver_sql(OWN_XID.format("true"))
            assert rdb.sqlstate_of(_blocked(conn, "SELECT set_ticket(1, 'open')")) == "42501"
            with pytest.raises(rdb.BypassRefusedError):
                rdb.bypass_transitions(conn, reason="x")
    finally:
        engine.dispose()
    assert _status(admin, 1) == "closed"
    engine = sa.create_engine(may_set.url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT force_ticket(1, 'open')")
            conn.commit()
    finally:
        engine.dispose()
    assert _status(admin, 1) == "open"


# ------------------------------------------------------------------------------------------------
# the role: created by the install, or missing
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def bypass_role_missing(pg_server: PostgresServer) -> Iterator[None]:
    """Roles belong to the whole cluster: resilient_db_bypass is renamed away for the test (its
    grants go with it) and put back after it, replacing one the test may have created."""
    hidden = f"rdb_t_hidden_{uuid.uuid4().hex[:12]}"
    pg_server.execute(bypass_role_statement())
    pg_server.execute(f"ALTER ROLE resilient_db_bypass RENAME TO {hidden}")
    try:
        yield
    finally:
        pg_server.execute("DROP ROLE IF EXISTS resilient_db_bypass")
        pg_server.execute(f"ALTER ROLE {hidden} RENAME TO resilient_db_bypass")


def test_without_the_role_the_guard_is_installed_and_every_bypass_refused(
    pg_server: PostgresServer,
    admin: sa.Engine,
    make_role: Callable[..., Role],
    bypass_role_missing: None,
    log: pytest.LogCaptureFixture,
) -> None:
    installer = make_role("GRANT CREATE ON SCHEMA public TO {role}")
    engine = sa.create_engine(installer.url)
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn, tables=[Chore.__table__])  # type: ignore[list-item]
            rdb.install_transition_trigger(conn, Chore)  # may not create the role: warns
            conn.exec_driver_sql("INSERT INTO bp_chores VALUES (1, 'todo'), (2, 'todo')")
            conn.exec_driver_sql("UPDATE bp_chores SET status = 'done'")
            assert rdb.trigger_drift(conn, Chore) is None
        with engine.connect() as conn:
            assert rdb.sqlstate_of(_blocked(conn, "UPDATE bp_chores SET status = 'todo'")) == (
                rdb.TRANSITION_SQLSTATE
            )
        with admin.connect() as conn:  # not even a superuser: the role is looked up
            with pytest.raises(rdb.BypassRefusedError, match="role resilient_db_bypass does not"):
                rdb.bypass_transitions(conn, reason="x")
            conn.rollback()
            conn.exec_driver_sql(BYPASS_BY_HAND)
            err = _blocked(conn, "UPDATE bp_chores SET status = 'todo'")
            assert rdb.sqlstate_of(err) == "42501"
            assert "role resilient_db_bypass does not exist" in str(err)
    finally:
        engine.dispose()
    assert pg_server.execute("SELECT to_regrole('resilient_db_bypass')") == [(None,)]
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert any("role resilient_db_bypass does not exist" in m for m in warnings), warnings
    # an administrator creates it: the install (by the superuser) does, and the bypass works
    with admin.begin() as conn:
        rdb.install_transition_trigger(conn, Chore)
        rdb.bypass_transitions(conn, reason="after the role was created")
        conn.exec_driver_sql("UPDATE bp_chores SET status = 'todo' WHERE id = 1")


def test_without_the_role_an_install_through_an_engine_warns(
    admin: sa.Engine,
    make_role: Callable[..., Role],
    bypass_role_missing: None,
    log: pytest.LogCaptureFixture,
) -> None:
    """The installing role may not create the bypass role: an install through an Engine says
    so, as one through a Connection does (the Engine's check was skipped)."""
    installer = make_role("GRANT CREATE ON SCHEMA public TO {role}")
    engine = sa.create_engine(installer.url)
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn, tables=[Chore.__table__])  # type: ignore[list-item]
        rdb.install_transition_trigger(engine, Chore)
    finally:
        engine.dispose()
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert any(
        "transition trigger of Chore installed, but role resilient_db_bypass does not exist "
        "and could not be created by this role" in m
        for m in warnings
    ), warnings
    with admin.connect() as conn:
        assert rdb.trigger_drift(conn, Chore) is None


_DDL = ("CREATE", "DROP", "ALTER", "COMMENT", "DO", "GRANT", "REVOKE")


def test_without_the_role_an_application_at_startup_sends_no_ddl(
    admin: sa.Engine,
    make_role: Callable[..., Role],
    bypass_role_missing: None,
    log: pytest.LogCaptureFixture,
) -> None:
    """The migration role installed the trigger but could not create the bypass role. An
    application role calls the install at startup: the trigger is current, so no DDL is sent
    (the missing role counted as "not installed": the DDL failed with "permission denied for
    schema public"), and the missing role is warned about."""
    installer = make_role("GRANT CREATE ON SCHEMA public TO {role}")
    app = make_role()
    migrations = sa.create_engine(installer.url)
    startup = sa.create_engine(app.url)
    sent: list[str] = []

    @sa.event.listens_for(startup, "before_cursor_execute")
    def _record(*args: Any) -> None:
        sent.append(args[2])

    try:
        with migrations.begin() as conn:
            Base.metadata.create_all(conn, tables=[Chore.__table__])  # type: ignore[list-item]
            conn.exec_driver_sql(f"GRANT SELECT, UPDATE ON bp_chores TO {app.name}")
            rdb.install_transition_trigger(conn, Chore)
        log.clear()
        with startup.connect() as conn:
            assert rdb.trigger_drift(conn, Chore) is None
        sent.clear()
        rdb.install_transition_trigger(startup, Chore)
    finally:
        migrations.dispose()
        startup.dispose()
    assert [s for s in sent if s.lstrip().upper().startswith(_DDL)] == []
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert any(
        "transition trigger of Chore installed, but role resilient_db_bypass does not exist" in m
        for m in warnings
    ), warnings
    with admin.connect() as conn:
        assert rdb.trigger_drift(conn, Chore) is None


def test_concurrent_installs_create_the_role_once(
    pg_server: PostgresServer, bypass_role_missing: None
) -> None:
    """Two installs race: the second waits on the first's uncommitted role, then finds it."""
    first = pg_server.connect()
    second = pg_server.connect()
    watcher = pg_server.connect()
    errors: list[BaseException] = []

    def install_second() -> None:
        try:
            with second.transaction():
                second.execute(bypass_role_statement())
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    try:
        with first.transaction():
            first.execute(bypass_role_statement())
            thread = threading.Thread(target=install_second, daemon=True)
            thread.start()
            _wait_until_waiting(watcher, second.info.backend_pid)
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        for conn in (first, second, watcher):
            conn.close()
    assert errors == []
    rows = pg_server.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'resilient_db_bypass'")
    assert rows == [(1,)]


def _wait_until_waiting(conn: psycopg.Connection[Any], pid: int) -> None:
    """Until backend ``pid`` waits on a lock (bounded: 30 s of polls; ``conn`` in autocommit,
    so each poll reads a fresh pg_stat_activity)."""
    query = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s"
    for _ in range(6000):
        row = conn.execute(query, (pid,)).fetchone()
        if row is not None and row[0] == "Lock":
            return
        time.sleep(0.005)
    raise AssertionError(f"backend {pid} never waited for the first install's role")


def test_drift_names_a_trigger_of_an_older_release(admin: sa.Engine) -> None:
    """Generator v1 let any role switch the bypass on: drift says so, and a reinstall fixes it."""
    (guard,) = guards_of(Ticket)
    function = trigger_names(guard).function
    with admin.begin() as conn:
        conn.exec_driver_sql(
            f"COMMENT ON FUNCTION {function}() IS "
            "'resilient_db transition guard v1 rules-sha256=0123'"
        )
        drift = rdb.trigger_drift(conn, Ticket) or ""
        assert "generated by an older release (generator v1; any role can switch" in drift
        assert "run install_transition_trigger again" in drift
        rdb.install_transition_trigger(conn, Ticket)
        assert rdb.trigger_drift(conn, Ticket) is None


# ------------------------------------------------------------------------------------------------
# whose RDB01 is it
# ------------------------------------------------------------------------------------------------


def _genuine_detail(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        err = _blocked(conn, reopen(4))
    assert isinstance(err, sa.exc.DBAPIError)
    assert isinstance(err.orig, psycopg.Error)
    detail = err.orig.diag.message_detail
    assert detail is not None
    assert json.loads(detail)["table"] == "bp_tickets"
    return detail


def _spoofs(detail: str) -> dict[str, list[str]]:
    """Ways for an ordinary role to raise RDB01 with our detail (and our diagnostic fields)."""
    raise_it = (
        "RAISE EXCEPTION USING ERRCODE = 'RDB01', MESSAGE = 'Status transition blocked', "
        f"DETAIL = {_quote(detail)}, SCHEMA = 'public', TABLE = 'bp_tickets', COLUMN = 'status'"
    )
    (guard,) = guards_of(Ticket)
    fn = trigger_names(guard).function_name
    return {
        "DO block": [f"DO $$ BEGIN {raise_it}; END $$"],
        "temporary function named like ours": [
            f"CREATE FUNCTION pg_temp.{fn}() RETURNS int LANGUAGE plpgsql "
            f"SET search_path = pg_catalog, pg_temp AS $$ BEGIN {raise_it}; END $$",
            f"SELECT pg_temp.{fn}()",
        ],
        "our function on a temporary table": [
            "CREATE TEMP TABLE bp_tickets (id int, status text)",
            f"CREATE TRIGGER t BEFORE INSERT ON pg_temp.bp_tickets "
            f"FOR EACH ROW EXECUTE FUNCTION public.{fn}()",
            "INSERT INTO pg_temp.bp_tickets VALUES (1, 'closed')",
        ],
    }


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@pytest.mark.parametrize(
    "spoof",
    ["DO block", "temporary function named like ours", "our function on a temporary table"],
)
def test_a_forged_rdb01_is_not_counted_as_a_blocked_transition(
    admin: sa.Engine, make_role: Callable[..., Role], log: pytest.LogCaptureFixture, spoof: str
) -> None:
    role = make_role()
    engine = sa.create_engine(role.url)
    factory = rdb.ResilientSession(engine, service="forged-rdb01")
    try:
        statements = _spoofs(_genuine_detail(admin))[spoof]
        blocked = transition_stats()["blocked_transitions"]
        log.clear()

        def unit(session: Session) -> None:
            for statement in statements:
                session.execute(sa.text(statement))

        with pytest.raises(sa.exc.DBAPIError) as info:
            factory.run(unit)
    finally:
        engine.dispose()
    assert not isinstance(info.value, rdb.IllegalTransitionError)
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE  # still the database error
    assert exception_from_db(info.value) is None
    assert transition_stats()["blocked_transitions"] == blocked
    assert not [r for r in log.records if "Status transition blocked" in r.getMessage()]


def test_the_genuine_error_of_the_same_role_is_recognised(
    admin: sa.Engine, make_role: Callable[..., Role]
) -> None:
    engine = sa.create_engine(make_role().url)
    factory = rdb.ResilientSession(engine, service="genuine-rdb01")
    blocked = transition_stats()["blocked_transitions"]
    try:
        with pytest.raises(rdb.IllegalTransitionError) as info:
            factory.run(lambda session: session.execute(sa.text(reopen(1))))
    finally:
        engine.dispose()
    err = info.value
    assert (err.model, err.pk, err.column, err.via) == ("Ticket", 1, "status", "db")
    assert transition_stats()["blocked_transitions"] == blocked + 1


# ------------------------------------------------------------------------------------------------
# asyncpg
# ------------------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def async_engines(
    admin: sa.Engine, make_role: Callable[..., Role]
) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """(a plain role's, a granted role's) asyncpg engines; the plain one connects with the
    setting on as a server setting (asyncpg's form of ``-c``)."""
    plain = create_async_engine(
        make_role().async_url,
        connect_args={"server_settings": {"resilient_db.bypass_transitions": "on"}},
    )
    granted = create_async_engine(
        make_role("GRANT resilient_db_bypass TO {role}").async_url, pool_size=1, max_overflow=0
    )
    yield plain, granted
    await plain.dispose()
    await granted.dispose()


@pytest.mark.asyncio
async def test_asyncpg_a_server_setting_does_not_switch_the_trigger_off(
    admin: sa.Engine, async_engines: tuple[AsyncEngine, AsyncEngine]
) -> None:
    plain, _ = async_engines
    async with plain.connect() as conn:
        shown = await conn.exec_driver_sql("SHOW resilient_db.bypass_transitions")
        assert shown.scalar() == "on"
        with pytest.raises(sa.exc.DBAPIError) as info:
            await conn.exec_driver_sql(reopen(1))
        await conn.rollback()
        with pytest.raises(rdb.BypassRefusedError):
            await rdb.bypass_transitions_async(conn, reason="async repair")
        await conn.rollback()
        await conn.exec_driver_sql(OWN_XID.format("true"))
        with pytest.raises(sa.exc.DBAPIError) as refused:
            await conn.exec_driver_sql(reopen(1))
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE
    err = exception_from_db(info.value)  # asyncpg's error is recognised as the trigger's
    assert err is not None
    assert err.pk == 1
    assert rdb.sqlstate_of(refused.value) == "42501"
    assert _status(admin, 1) == "closed"


@pytest.mark.asyncio
async def test_asyncpg_a_granted_role_bypasses_for_its_transaction_only(
    admin: sa.Engine, async_engines: tuple[AsyncEngine, AsyncEngine]
) -> None:
    _, granted = async_engines
    async with granted.connect() as conn:
        await rdb.bypass_transitions_async(conn, reason="async repair")
        await conn.exec_driver_sql(reopen(1))
        await conn.commit()
        with pytest.raises(sa.exc.DBAPIError) as info:
            await conn.exec_driver_sql(reopen(2))
        await conn.rollback()
    async with granted.connect() as conn:  # the next checkout of the one pooled connection
        with pytest.raises(sa.exc.DBAPIError) as again:
            await conn.exec_driver_sql(reopen(2))
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE
    assert rdb.sqlstate_of(again.value) == rdb.TRANSITION_SQLSTATE
    assert (_status(admin, 1), _status(admin, 2)) == ("open", "closed")


@pytest.mark.asyncio
async def test_asyncpg_a_forged_rdb01_is_not_the_triggers(
    admin: sa.Engine, async_engines: tuple[AsyncEngine, AsyncEngine]
) -> None:
    plain, _ = async_engines
    detail = _genuine_detail(admin)
    async with plain.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError) as info:
            await conn.exec_driver_sql(_spoofs(detail)["DO block"][0])
    assert rdb.sqlstate_of(info.value) == rdb.TRANSITION_SQLSTATE
    assert exception_from_db(info.value) is None


# ------------------------------------------------------------------------------------------------
# the ways in and out of a bypass no other test took
# ------------------------------------------------------------------------------------------------

SETTING = "SELECT current_setting('resilient_db.bypass_transitions', true)"


def _kill(pg_server: PostgresServer, conn: sa.Connection) -> None:
    """Terminate the backend of ``conn`` (the session does not know until it uses it)."""
    pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    pg_server.execute("SELECT pg_terminate_backend(%s)", params=(pid,))


@pytest.mark.parametrize("target", ["engine", "sessionmaker", "async session"])
def test_bypass_transitions_refuses_what_is_no_session_or_connection(
    admin: sa.Engine, pg_async_url: str, log: pytest.LogCaptureFixture, target: str
) -> None:
    """An engine, a session factory, or an asyncio session given to the sync function: a
    TypeError naming it (the async one named), nothing bypassed or counted."""
    bypasses = transition_stats()["bypasses"]
    given: Any = admin
    if target == "sessionmaker":
        given = rdb.ResilientSession(admin)
    elif target == "async session":
        given = rdb.AsyncResilientSession(create_async_engine(pg_async_url))()
    with pytest.raises(TypeError, match="takes a Session or a Connection") as info:
        rdb.bypass_transitions(given, reason="ticket 11")
    assert type(given).__name__ in str(info.value)
    assert "bypass_transitions_async" in str(info.value)
    assert transition_stats()["bypasses"] == bypasses
    assert not [r for r in log.records if "bypass" in r.getMessage()]


def test_a_session_without_a_bind_is_refused(log: pytest.LogCaptureFixture) -> None:
    """A session with no bind at all (nor binds=): SQLAlchemy's own error, nothing counted."""
    bypasses = transition_stats()["bypasses"]
    with Session() as session, pytest.raises(sa.exc.UnboundExecutionError):
        rdb.bypass_transitions(session, reason="ticket 12")
    assert transition_stats()["bypasses"] == bypasses
    assert not [r for r in log.records if "bypass" in r.getMessage()]


def test_a_savepoint_after_a_bypass_is_bypassed_too(
    admin: sa.Engine, log: pytest.LogCaptureFixture
) -> None:
    """A savepoint begun after the bypass works on the bypassed connection: its moves go
    through, with no second audit line; the bypass ends with the transaction."""
    factory = rdb.ResilientSession(admin, service="bypass-savepoint")
    with factory() as session:
        rdb.bypass_transitions(session, reason="ticket 13")
        with session.begin_nested():
            session.get_one(Ticket, 1).status = "open"
            session.flush()
            session.execute(sa.text(reopen(2)))
        session.commit()
        session.get_one(Ticket, 3).status = "open"
        with pytest.raises(rdb.IllegalTransitionError):
            session.flush()
        session.rollback()
    assert [_status(admin, i) for i in (1, 2, 3)] == ["open", "open", "closed"]
    assert len([r for r in log.records if "guard bypassed" in r.getMessage()]) == 1


def test_a_bypass_that_fails_on_a_dead_connection_is_undone_on_the_others(
    pg_server: PostgresServer, pg_url: str, admin: sa.Engine, log: pytest.LogCaptureFixture
) -> None:
    """A session with two connections, one whose backend was terminated: the bypass's
    statement fails there, the database error is raised, the bypass is undone on the other
    connection (whichever was bound first) and the session guards stay on."""
    tickets = sa.create_engine(pg_url)
    factory = rdb.ResilientSession(admin, service="bypass-dead", binds={Ticket: tickets})
    bypasses = transition_stats()["bypasses"]
    try:
        with factory() as session:
            session.execute(sa.text("SELECT 1"))  # the default connection begins
            session.get_one(Ticket, 1)  # and the tickets' one
            _kill(pg_server, session.connection(bind_arguments={"mapper": Ticket}))
            with pytest.raises(sa.exc.OperationalError):
                rdb.bypass_transitions(session, reason="ticket 14")
            assert active_config(session) is not None
            assert session.execute(sa.text(SETTING)).scalar() == ""
            with pytest.raises(rdb.IllegalTransitionError) as blocked:
                session.execute(sa.text(reopen(2)))  # through the default connection
            assert blocked.value.via == "db"
    finally:
        tickets.dispose()
    assert transition_stats()["bypasses"] == bypasses
    assert not [r for r in log.records if "guard bypassed" in r.getMessage()]
    assert _status(admin, 2) == "closed"


def test_a_refusal_undoes_the_bypass_past_a_dead_connection(
    pg_server: PostgresServer,
    pg_url: str,
    admin: sa.Engine,
    make_role: Callable[..., Role],
    log: pytest.LogCaptureFixture,
) -> None:
    """A session bypassed on its default connection, whose backend is then terminated; its
    tickets' connection begins through a role not granted the bypass: the refusal is what is
    raised (not the dead connection's error when the bypass is undone there, which is logged
    at DEBUG), and the tickets' connection is left guarded."""
    role = make_role()
    default = sa.create_engine(pg_url)
    tickets = sa.create_engine(role.url)
    factory = rdb.ResilientSession(default, service="bypass-undo-dead", binds={Ticket: tickets})
    try:
        with factory() as session:
            session.execute(sa.text("SELECT 1"))
            rdb.bypass_transitions(session, reason="ticket 15")  # bound on the default one
            _kill(pg_server, session.connection())
            with pytest.raises(rdb.BypassRefusedError):
                session.get(Ticket, 1)  # begins the tickets' connection: refused there
            assert active_config(session) is not None
            conn = session.connection(bind_arguments={"mapper": Ticket})
            assert conn.exec_driver_sql(SETTING).scalar() == ""
            with pytest.raises(rdb.IllegalTransitionError):
                conn.exec_driver_sql(reopen(1))
    finally:
        tickets.dispose()
        default.dispose()
    debug = [r.getMessage() for r in log.records if r.levelno == logging.DEBUG]
    assert any(m.startswith("bypass not undone on a failed connection") for m in debug), debug
    assert _status(admin, 1) == "closed"


def test_a_refused_second_bypass_undoes_the_first_on_every_connection(
    pg_server: PostgresServer, admin: sa.Engine, make_role: Callable[..., Role]
) -> None:
    """Bypassed on both connections of a session; the tickets' role then loses its grant and a
    second bypass in the same transaction is refused there: no connection keeps the first
    bypass, whichever the second one tried first (rounds of new connections: the order is
    theirs)."""
    role = make_role("GRANT resilient_db_bypass TO {role}")
    tickets = sa.create_engine(role.url)
    factory = rdb.ResilientSession(admin, service="bypass-again", binds={Ticket: tickets})
    kept: list[sa.Connection] = []  # (each round's connections new objects, not reused ids)
    try:
        for _ in range(6):
            with factory() as session:
                session.get_one(Ticket, 1)
                session.execute(sa.text("SELECT 1"))
                rdb.bypass_transitions(session, reason="ticket 16")
                pg_server.execute(f"REVOKE resilient_db_bypass FROM {role.name}")
                on_tickets = session.connection(bind_arguments={"mapper": Ticket})
                # (a backend sees a grant changed meanwhile once a statement opens a table)
                on_tickets.exec_driver_sql("SELECT count(*) FROM pg_catalog.pg_auth_members")
                with pytest.raises(rdb.BypassRefusedError):
                    rdb.bypass_transitions(session, reason="ticket 16, again")
                assert active_config(session) is not None
                kept += [session.connection(), on_tickets]
                assert on_tickets.exec_driver_sql(SETTING).scalar() == ""
                assert session.execute(sa.text(SETTING)).scalar() == ""
                with pytest.raises(rdb.IllegalTransitionError):
                    session.execute(sa.text(reopen(2)))  # the default (superuser's) connection
            pg_server.execute(f"GRANT resilient_db_bypass TO {role.name}")
    finally:
        tickets.dispose()
    assert _status(admin, 2) == "closed"


def test_a_connections_bypass_is_audited_under_an_invalid_environment(
    admin: sa.Engine, log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bypass outside any factory reads the environment's configuration for its audit line:
    an invalid one (a value no setting takes) must not hide the audit nor stop the repair."""
    # a process where no with_self_healing or reload_config kept a configuration (an earlier
    # test of this worker may have): the environment is read at the bypass
    monkeypatch.setattr(STATE, "env_config", None)
    monkeypatch.setenv("SELF_HEALING_BULK_UPDATE", "sometimes")
    with pytest.raises(rdb.ConfigError):
        rdb.load_config()
    with admin.begin() as conn:
        rdb.bypass_transitions(conn, reason="ticket 17: reopen")
        conn.exec_driver_sql(reopen(4))
    audits = [r.getMessage() for r in log.records if "guard bypassed" in r.getMessage()]
    assert len(audits) == 1
    assert audits[0].endswith("reason=ticket 17: reopen")
    assert _status(admin, 4) == "open"
