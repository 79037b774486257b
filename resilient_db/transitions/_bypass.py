"""Whether the session guards act for a session, and the audited bypass that switches them off.

The guards act for a session of a resilient factory (its factory's :class:`Config`), or one whose
``info[GUARD_INFO_KEY]`` is a :class:`Config` (a plain sessionmaker guarded by hand), while that
configuration has ``guard_on`` and no bypass is active in the session's transaction.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from resilient_db._classify import debug_failure
from resilient_db._config import Config
from resilient_db._errors import BypassRefusedError
from resilient_db._internals import session_binds, transaction_connections
from resilient_db._observability import emit, unfit_label
from resilient_db._registry import config_of, service_of
from resilient_db._state import STATE

from ._install import in_autocommit
from ._report import count, env_config, logger, service_words, unit_service
from ._sql import BYPASS_REASON_SETTING, BYPASS_ROLE, BYPASS_SETTING, BYPASS_STATEMENT

__all__ = ["GUARD_INFO_KEY", "active_config", "bypass_transitions", "bypass_transitions_async"]

_BYPASS = sa.text(BYPASS_STATEMENT)
#: ends a bypass bound on a connection, for the rest of its transaction
_UNDO = sa.text(
    f"SELECT pg_catalog.set_config('{BYPASS_SETTING}', '', true), "
    f"pg_catalog.set_config('{BYPASS_REASON_SETTING}', '', true)"
)

#: ``session.info`` key holding the :class:`Config` that switches the session guards on.
GUARD_INFO_KEY = "resilient_db.config"


def active_config(session: Session) -> Config | None:
    """The configuration under which the session guards act for ``session``, or None."""
    # A session running a unit: the configuration its attempt runs under (a reload_config()
    # meanwhile reaches the next attempt: the flush and the bulk guards of one attempt judge
    # alike). Another session of a resilient factory: its factory's configuration
    # (session.info plays no part). Otherwise a session whose info carries a Config under
    # GUARD_INFO_KEY (a plain sessionmaker guarded by hand, as the guard's own tests do).
    config = STATE.unit_sessions.get(session) or config_of(session)
    if config is None:
        config = session.info.get(GUARD_INFO_KEY)
    if not isinstance(config, Config) or not config.guard_on:
        return None
    if _bypassed(session):
        return None
    return config


class _Bypass:
    """A session's bypass: its root transaction (weakly: the transaction holds the session,
    the key of ``STATE.bypasses``), why, and the connections it was bound on so far."""

    __slots__ = ("config", "connections", "reason", "service", "transaction")

    def __init__(self, transaction: Any, reason: str, config: Config, service: str | None) -> None:
        self.transaction = weakref.ref(transaction)
        self.reason = reason
        self.config = config
        self.service = service  # of the session's factory, for the lines
        self.connections: list[Connection] = []


def _bypassed(session: Session) -> bool:
    bypasses = STATE.bypasses  # by session, weakly: nothing in session.info
    if not bypasses:
        return False
    marker = bypasses.get(session)
    if marker is None:
        return _on_bypassed_connection(session, bypasses)
    if marker.transaction() is session.get_transaction():
        return True
    bypasses.pop(session, None)
    return False


def _on_bypassed_connection(session: Session, bypasses: Any) -> bool:
    """Whether ``session`` is bound to one Connection alone (``Session(bind=connection)``, no
    ``binds=``) whose current transaction was bypassed with ``bypass_transitions(connection)``:
    the session works in that transaction, whose moves the trigger lets through and whose
    bypass was audited, so its guards are off too until the transaction ends."""
    conn = session.bind
    if not isinstance(conn, Connection):
        return False
    marker = bypasses.get(conn)
    if marker is None:
        return False
    current = conn.get_transaction()
    if current is not None and marker.transaction() is current:
        return not tuple(session_binds(session))  # (a session's other binds are not bypassed)
    bypasses.pop(conn, None)  # (it ended with its transaction)
    return False


def _check_reason_type(reason: object, where: str) -> None:
    """Refuse a ``reason`` that is no ``str`` (a ticket number given as an int, ``None``): the
    caller's mistake of type, told apart from a blank reason (``ValueError``)."""
    if not isinstance(reason, str):
        raise TypeError(
            f"{where}() takes reason= as a str (logged for the audit), got {type(reason).__name__}"
        )


def bypass_transitions(target: Session | Connection, *, reason: str) -> None:
    """Switch the transition guards off for the rest of the current transaction, audited.

    The database role must be allowed to bypass: granted ``resilient_db_bypass``
    (:data:`~resilient_db.transitions.BYPASS_ROLE`), both the role in effect and the one that
    logged in (a superuser always is). Then one statement binds the bypass to the current
    transaction (``set_config('resilient_db.bypass_transitions', pg_current_xact_id()::text,
    true)``, which the trigger checks together with the role), and for a session the flush and
    bulk-UPDATE guards are off until the transaction ends. ``reason`` is required and logged.
    On rollback or commit everything is back to normal; a later transaction on the same
    connection is guarded again, whatever the setting says. (A bypass set inside a SAVEPOINT
    that is rolled back ends with the savepoint on the database side; the session guards stay
    off until the transaction ends.)

    For a session, the bypass is bound on every connection its transaction has (with
    ``binds=`` or a ``get_bind()`` routing, one per engine), and on each one it begins later
    until the transaction ends (as it begins: a refusal there raises from the statement that
    began it). A session that has begun none begins its default one, or, without a default
    bind, one on each of its ``binds``. A refusal or error on any of them undoes the bypass on
    all (the setting emptied, the session guards back on). One audit line per connection. A
    connection to a hot standby (a read replica), where nothing is written, is left alone.
    For a ``Connection``, the bypass is bound on it alone; a session bound to that connection
    alone (``Session(bind=connection)``, no ``binds=``) works in its transaction, so its
    session guards are off too until the transaction ends. Any other session's stay on.

    Raises :class:`~resilient_db.BypassRefusedError` when the role may not bypass (nothing is
    bypassed or counted; the refusal is logged), ``TypeError`` for a ``reason`` that is no
    ``str``, ``ValueError`` for a blank reason or for one with
    a NUL or another control character, or one that is no UTF-8 text, in AUTOCOMMIT mode, or
    for a ``Connection`` to a hot standby.
    """
    _check_reason_type(reason, "bypass_transitions")
    if not reason.strip():
        raise ValueError("bypass_transitions() needs a reason=, which is logged for the audit")
    if "\x00" in reason:
        # PostgreSQL text can't hold it: psycopg refused the bypass's statement with a
        # DataError, asyncpg's failed on the server (the caller's transaction aborted)
        raise ValueError(
            f"bypass_transitions(): reason={reason[:80]!r} holds a NUL character, which "
            "PostgreSQL text can't hold (the reason goes into the server's log)"
        )
    # (as open_breaker's reason: a lone surrogate can't be sent, the driver's UnicodeEncodeError
    # said nothing of it; a line end in each of the trigger's server log lines would begin a
    # line that looks like the server's own. No bound on its length: an audit's own text.)
    unfit = unfit_label(reason, len(reason))
    if unfit is not None:
        raise ValueError(
            f"bypass_transitions(): reason {unfit}: it goes into the audit line and the "
            "server's log as it is; use printable text on one line"
        )
    if isinstance(target, Session):
        _bypass_session(target, reason)
        return
    if not isinstance(target, Connection):
        raise TypeError(
            "bypass_transitions() takes a Session or a Connection (for asyncio use "
            f"bypass_transitions_async), got {type(target).__name__}"
        )
    _refuse_autocommit(target)
    row = target.execute(_BYPASS, {"reason": reason}).one()
    if row.standby:
        raise ValueError(
            "bypass_transitions() was given a connection to a hot standby, where nothing is "
            "written (nothing was bypassed or logged)"
        )
    config = env_config()
    if row.bound is None:
        _refuse(
            config,
            row.role_exists,
            row.acting_role,
            row.login_role,
            reason,
            service_name=None,
        )
    count("bypasses")
    transaction = target.get_transaction()
    assert transaction is not None  # (the statement began one: AUTOCOMMIT was refused)
    # a session bound to it alone works in it: see _bypassed
    STATE.bypasses[target] = _Bypass(transaction, reason, config, None)
    _audit(config, row, reason, None)


def _bypass_session(session: Session, reason: str) -> None:
    config = config_of(session)
    config = config if config is not None else env_config()
    conns = _connections_to_bind(session)
    for conn in conns:  # none is touched when one is in AUTOCOMMIT
        _refuse_autocommit(conn)
    transaction = session.get_transaction()
    assert transaction is not None  # (it began on conns)
    service = service_of(session)
    bypass = _Bypass(transaction, reason, config, service)
    previous = STATE.bypasses.get(session)
    if previous is not None and previous.transaction() is transaction:
        # bypassed again: a refusal now ends the earlier bypass too (no half of it is left),
        # on each connection it was bound on, whichever of them this one reaches first
        bypass.connections = list(previous.connections)
    try:
        rows = [row for conn in conns if (row := _bind(bypass, conn)) is not None]
    except BaseException:
        STATE.bypasses.pop(session, None)  # (an earlier bypass of it was undone too)
        raise
    if not event.contains(session, "after_begin", _bind_began):
        event.listen(session, "after_begin", _bind_began)
    STATE.bypasses[session] = bypass
    count("bypasses")
    for row in rows:
        _audit(config, row, reason, service)


def _connections_to_bind(session: Session) -> list[Connection]:
    """The connections a bypass of ``session`` binds now: those its transaction has, else the
    one it begins by default, else one on each of its binds (none resolves without a default
    bind)."""
    transaction = session.get_transaction()
    if transaction is not None:
        began = transaction_connections(transaction)
        if began:
            return list(began)
    try:
        return [session.connection()]
    except sa.exc.UnboundExecutionError:
        binds = list(dict.fromkeys(session_binds(session)))
        if not binds:
            raise
    return list(dict.fromkeys(session.connection(bind_arguments={"bind": bind}) for bind in binds))


def _refuse_autocommit(conn: Connection) -> None:
    if in_autocommit(conn):
        raise ValueError(
            "bypass_transitions() needs a transaction; this connection is in AUTOCOMMIT mode, "
            "where SET LOCAL would have no effect (nothing was bypassed or logged)"
        )


def _bind(bypass: _Bypass, conn: Connection) -> Any:
    """Bind ``bypass`` on ``conn``: its row (who asked, the xid), or None for a hot standby
    (nothing is written there: nothing to bind). A refusal, or any error, undoes it on every
    connection it was bound on before, and raises."""
    try:
        row = conn.execute(_BYPASS, {"reason": bypass.reason}).one()
    except BaseException:
        _undo(bypass)
        raise
    if row.standby:
        return None
    if conn not in bypass.connections:  # (bound again by a second bypass)
        bypass.connections.append(conn)
    if row.bound is None:
        _undo(bypass)
        _refuse(
            bypass.config,
            row.role_exists,
            row.acting_role,
            row.login_role,
            bypass.reason,
            service_name=bypass.service,
        )
    return row


def _undo(bypass: _Bypass) -> None:
    """Empty the bypass setting on each connection ``bypass`` was bound on (the trigger then
    guards them again in this transaction)."""
    bound, bypass.connections = bypass.connections, []
    for conn in bound:
        if conn.closed or not conn.in_transaction():
            continue
        try:
            conn.execute(_UNDO)
        except Exception:  # (its transaction failed: nothing of it commits)
            # (its traceback without the texts that may quote values: the error being handled
            # is often the refused bypass's, whose parameters SQLAlchemy quotes, or the
            # application's own database error)
            debug_failure(logger, "bypass not undone on a failed connection")


def _bind_began(session: Session, transaction: Any, connection: Connection) -> None:
    """``after_begin`` of a session that was bypassed: a connection its bypassed transaction
    begins gets the bypass too (a refusal ends the bypass on all, and raises)."""
    if transaction.nested:
        return  # a savepoint begins on its root's connection, bound already
    bypass = STATE.bypasses.get(session)
    if bypass is None or bypass.transaction() is not transaction:
        return
    try:
        _refuse_autocommit(connection)
        row = _bind(bypass, connection)
    except BaseException:
        STATE.bypasses.pop(session, None)
        _undo(bypass)
        raise
    if row is not None:
        _audit(bypass.config, row, bypass.reason, bypass.service)


def _audit(config: Config, row: Any, reason: str, service_name: str | None) -> None:
    # The audit line of a move past the guard: said whether or not self-healing is on (the
    # bypass works either way: the trigger honours it), unless logging is switched off. Who
    # asked (the roles the trigger checked, as its server log lines and a refusal say them),
    # and why.
    audit = config if config.enabled else dataclasses.replace(config, enabled=True)
    who = (
        row.acting_role
        if row.acting_role == row.login_role
        else f"{row.acting_role} (logged in as {row.login_role})"
    )
    # (the unit's or operation's service, else the session's factory's, as a block names it)
    service = unit_service(service_name)
    emit(
        audit,
        logger,
        logging.WARNING,
        "transition guard bypassed for the current transaction (xid %s) by role %s: %sreason=%s",
        row.xid,
        who,
        service_words(service),
        reason,
        unit_service=service,
        event="transition_guard_bypassed",
        xid=row.xid,
        role=row.acting_role,
        login_role=row.login_role,
        reason=reason,
    )


def _refuse(
    config: Config,
    role_exists: bool,
    role: str,
    login_role: str,
    reason: str,
    *,
    service_name: str | None,
) -> None:
    if not role_exists:
        why = (
            f"role {BYPASS_ROLE} does not exist; a role with CREATEROLE creates it with "
            f"CREATE ROLE {BYPASS_ROLE} NOLOGIN (installing the transition trigger does, when "
            f"it may), then grants it with GRANT {BYPASS_ROLE} TO <role>"
        )
    else:
        who = role if role == login_role else f"{role} (logged in as {login_role})"
        why = (
            f"role {who} may not bypass the transition guard; an administrator grants it with "
            f"GRANT {BYPASS_ROLE} TO <role> (the role in effect needs its privileges, and so "
            f"does the login role, or the right to SET ROLE to it)"
        )
    # (named as the audit line of a bypass names it)
    service = unit_service(service_name)
    emit(
        config,
        logger,
        logging.WARNING,
        "transition guard bypass refused: %srole=%s login_role=%s reason=%s",
        service_words(service),
        role,
        login_role,
        reason,
        unit_service=service,
        event="transition_guard_bypass_refused",
        role=role,
        login_role=login_role,
        reason=reason,
    )
    raise BypassRefusedError(
        f"bypass_transitions() refused: {why}; nothing was bypassed",
        role=role,
        login_role=login_role,
    )


async def bypass_transitions_async(target: AsyncSession | AsyncConnection, *, reason: str) -> None:
    """:func:`bypass_transitions` for an ``AsyncSession`` or ``AsyncConnection`` (anything else
    is refused with ``TypeError``)."""
    _check_reason_type(reason, "bypass_transitions_async")  # (before run_sync connects)
    if not isinstance(target, (AsyncSession, AsyncConnection)):
        raise TypeError(
            "bypass_transitions_async() takes an AsyncSession or an AsyncConnection (for a "
            f"Session or a Connection use bypass_transitions), got {type(target).__name__}"
        )

    def run(sync_target: Any) -> None:
        bypass_transitions(sync_target, reason=reason)

    await target.run_sync(run)
