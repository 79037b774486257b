"""Transient-error classification by SQLSTATE, plus driver-level disconnects.

Never by exception class name or message text: the SQLSTATE the server sent is the contract,
read with what the driver knows of its connection. Where the driver saw no SQLSTATE at all (the
socket broke, the connect was refused), the error is a disconnect when SQLAlchemy invalidated
the connection, an ``OSError`` is in the chain, the driver says its connection is lost or could
not be made, or psycopg gave up on its socket with a statement in flight (never for an error of
a connection that is still sound). 25006 is a lost server only where the server does not take
writes. One more: an error that the commit protocol marked replay-safe
(:func:`mark_replay_safe`) is a conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import psycopg
import sqlalchemy.exc as sa_exc
from psycopg.errors import ConnectionTimeout

from ._errors import ResilientDBError
from ._internals import (
    ASYNCPG_CLOSED_CHECKS,
    ASYNCPG_CONNECT_FUNCTION,
    ASYNCPG_CONNECT_MODULES,
    ASYNCPG_RESOURCE_CHECK,
    ASYNCPG_SIMPLE_QUERY,
    SQLALCHEMY_ASYNCPG_MODULE,
    asyncpg_address,
    asyncpg_statement_connection,
)

__all__ = ["Classifier", "Outcome", "classify", "is_transient", "sqlstate_of"]


class Outcome(str, enum.Enum):
    """What kind of failure an exception is, and so how (and whether) to retry it."""

    CONFLICT = "conflict"  # serialization failure, deadlock, lock not available: retry fast
    UNAVAILABLE = "unavailable"  # server starting up / too many connections: back off
    DISCONNECT = "disconnect"  # connection lost or unusable: back off, new connection
    COMMIT_UNKNOWN = "commit-unknown"  # COMMIT sent, answer lost: never replay blindly
    NOT_TRANSIENT = "not-transient"  # a bug or a business error: raise at once

    @property
    def transient(self) -> bool:
        """A fault of the database or the network, not of the code (an unknown commit outcome
        included). Whether replaying the unit may succeed is :attr:`replayable`."""
        return self is not Outcome.NOT_TRANSIENT

    @property
    def replayable(self) -> bool:
        """Whether replaying the whole unit may succeed: not for an unknown commit outcome (a
        replay may write it twice: check first)."""
        return self in _REPLAYABLE


_REPLAYABLE: frozenset[Outcome] = frozenset(
    {Outcome.CONFLICT, Outcome.UNAVAILABLE, Outcome.DISCONNECT}
)

_DEFAULT_CODES: Mapping[str, Outcome] = {
    "40001": Outcome.CONFLICT,  # serialization_failure
    "40P01": Outcome.CONFLICT,  # deadlock_detected
    "55P03": Outcome.CONFLICT,  # lock_not_available
    "57P03": Outcome.UNAVAILABLE,  # cannot_connect_now (starting up, shutting down)
    "53300": Outcome.UNAVAILABLE,  # too_many_connections
    "57P01": Outcome.DISCONNECT,  # admin_shutdown (pg_terminate_backend, smart shutdown)
    "57P02": Outcome.DISCONNECT,  # crash_shutdown
    # idle_session_timeout (PostgreSQL 14+): the server ended a session that sat idle outside
    # a transaction (a pooled connection unused too long); the next unit on it sent nothing
    "57P05": Outcome.DISCONNECT,
    # read_only_sql_transaction from a server that takes no writes (a standby, a demoted
    # primary, transactions read-only by default): see refused_by_a_writable_server
    "25006": Outcome.DISCONNECT,
    "08007": Outcome.COMMIT_UNKNOWN,  # transaction_resolution_unknown
    # The server ended a session whose transaction sat idle, or ran, too long (its
    # idle_in_transaction_session_timeout; PostgreSQL 17's transaction_timeout): the unit's own
    # doing, as a statement_timeout (57014) is, not the database failing; raised at once and
    # never counted by the breaker (one slow unit would open it for everyone). The connection
    # is gone all the same (the driver says so). asyncpg 0.32+ raises the lost connection of
    # the statement that was waiting from it (see sqlstate_of); when no statement waited (and
    # before 0.32), asyncpg reports no code, and there it is a lost connection.
    "25P03": Outcome.NOT_TRANSIENT,  # idle_in_transaction_session_timeout
    "25P04": Outcome.NOT_TRANSIENT,  # transaction_timeout
}
# Any other code of class 08 (connection exception) is a disconnect, but for 08P01 on an
# established connection that is not lost (see Classifier.answered_violation).
_DISCONNECT_CLASS = "08"
#: protocol_violation: PostgreSQL's ERROR for a message of the client's it could not read (a
#: NUL byte in a statement's text), the connection sound; also every refusal of PgBouncer's
#: (FATAL, the connection closed), at connect or later
PROTOCOL_VIOLATION: Final = "08P01"
_MAX_CHAIN = 8


#: asyncpg's code for its ConnectionDoesNotExistError (connection_does_not_exist), its own
_ASYNCPG_CLOSED: Final = "08003"
#: the server ended the session for a timeout of its transaction: while the transaction sat
#: idle (idle_in_transaction_session_timeout) or ran (PostgreSQL 17's transaction_timeout)
SESSION_TIMEOUT_CODES: Final = frozenset({"25P03", "25P04"})
#: the server ended this one session for its own timeout (its transaction's, above, or its
#: idling outside one: idle_session_timeout, 57P05), not because it went away: the pool's other
#: connections are sound
ONE_SESSION_ENDED_CODES: Final = SESSION_TIMEOUT_CODES | {"57P05"}


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE carried by ``exc`` or the driver error it wraps, if any: ``sqlstate``
    (psycopg 3, asyncpg), ``pgcode`` (psycopg2) or the ``C`` field of pg8000's error fields.

    One code of asyncpg's own gives way to the server's: when the server ended the session
    while a statement waited, asyncpg raises its ``ConnectionDoesNotExistError`` (08003,
    connection_does_not_exist, which no server sends) from the server's FATAL error: that
    error's code is the error's, as psycopg reports it. So a backend ended by
    ``pg_terminate_backend`` or a shutdown is 57P01 (a line said 08003, a connection that was
    never there), one whose transaction ran past its timeout (:data:`SESSION_TIMEOUT_CODES`:
    a statement, or a COMMIT, running past ``transaction_timeout``; one sent just as
    ``idle_in_transaction_session_timeout`` ended the session; asyncpg 0.32+) is 25P04 or
    25P03. A connection asyncpg found closed with no error of the server's (one that ended
    while idle, a broken socket) keeps 08003, or has no code. ``TypeError`` for an ``exc``
    that is no exception, as :func:`classify` says."""
    if not isinstance(exc, BaseException):
        raise TypeError(f"sqlstate_of() takes an exception, got {type(exc).__name__}")
    found = None
    for err in error_chain(exc):
        code = getattr(err, "sqlstate", None)
        if code is None:
            code = getattr(err, "pgcode", None)
            if code is None and err.args and isinstance(err.args[0], dict):
                code = err.args[0].get("C")
        if not (isinstance(code, str) and len(code) == 5):
            continue
        if found is None:
            if code != _ASYNCPG_CLOSED:
                return code
            found = code
        elif code != _ASYNCPG_CLOSED and _of_driver(err, "asyncpg"):
            return code  # the server's error that asyncpg's lost connection was raised from
    return found


_REPLAY_SAFE = "resilient_db_replay_safe"


def mark_replay_safe(exc: BaseException) -> None:
    """Mark a driver error of resilient_db's own statement that proves the unit's COMMIT did not
    run, and that a new attempt won't meet (the commit protocol's prepared marker statement
    missing at COMMIT): it is classified as a conflict, retried at once, whatever its SQLSTATE."""
    setattr(exc, _REPLAY_SAFE, True)


_PARTLY_COMMITTED = "resilient_db_partly_committed"


def mark_partly_committed(exc: BaseException) -> None:
    """Mark the error of an attempt whose own code committed part of its work: replaying it
    would write that part again, so it is never retried, whatever its class."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _PARTLY_COMMITTED, True)


def partly_committed(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is the error of an attempt that
    committed part of its work (see :func:`mark_partly_committed`)."""
    return any(getattr(err, _PARTLY_COMMITTED, False) for err in error_chain(exc))


_UNKNOWN_SAID = "resilient_db_unknown_outcome_said"


def say_unknown_once(exc: BaseException) -> bool:
    """Whether the unknown outcome of the COMMIT whose error is ``exc`` (or one ``exc`` was
    raised from) is yet to be said: True the first time, marking it (each error of the chain:
    the driver's error the engine's hooks met, SQLAlchemy's around it), so that the attempt
    that says it is the only one (an operation of another service around the one that lost
    the answer fails with the same error; code that caught it has it said when its attempt
    ends). Counted once by the engine's hooks; said once, so counted once by the hooks'
    OpenTelemetry and the dashboard."""
    chain = list(error_chain(exc))
    if any(getattr(err, _UNKNOWN_SAID, False) for err in chain):
        return False
    for err in chain:
        with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
            setattr(err, _UNKNOWN_SAID, True)
    return True


_NOT_REPLAYED = "resilient_db_not_replayed"


def mark_not_replayed(exc: BaseException) -> None:
    """Mark the error of an attempt that must not run again though it saved nothing (a
    read-only unit whose ``after_commit`` listener failed: a replay would run the listener
    again): never retried, and not said to be partly committed."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _NOT_REPLAYED, True)


def never_replayed(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is marked partly committed or not to
    be replayed: the retry loop raises it as it is."""
    return any(
        getattr(err, _PARTLY_COMMITTED, False) or getattr(err, _NOT_REPLAYED, False)
        for err in error_chain(exc)
    )


_COMMIT_UNANSWERED = "resilient_db_commit_unanswered"


def mark_commit_unanswered(exc: BaseException) -> None:
    """Mark the driver's error of a COMMIT that is not a unit's final one (drop-in use, or an
    operation's own code) that may have written and whose answer never came (the connection
    was lost): it is classified as
    :attr:`Outcome.COMMIT_UNKNOWN`, whatever its SQLSTATE: the transaction may have committed,
    so whoever retries it must check first (a web client told "503, retry shortly" would write
    twice). Not once that answer was settled (:func:`commit_answer_settled`): a unit's own
    ``text("COMMIT")`` midway, settled by its marker below SQLAlchemy, reaches the engine's
    ``handle_error`` after that."""
    if getattr(exc, _COMMIT_UNANSWERED, None) is False:
        return  # (settled: its outcome is known)
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _COMMIT_UNANSWERED, True)


def commit_left_unanswered(exc: BaseException) -> bool:
    """Whether :func:`mark_commit_unanswered` marked ``exc``."""
    return bool(getattr(exc, _COMMIT_UNANSWERED, False))


def commit_answer_settled(exc: BaseException) -> None:
    """The lost answer of the COMMIT ``exc`` (marked by :func:`mark_commit_unanswered`) was
    settled: a check found what became of it, so its outcome is known, and ``exc`` is
    classified as what it is (a lost connection): for good (False, not True, is kept: see
    :func:`mark_commit_unanswered`)."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _COMMIT_UNANSWERED, False)


def interrupted_commit(exc: BaseException) -> bool:
    """Whether ``exc`` is an interruption (a cancellation, ``KeyboardInterrupt``,
    ``SystemExit``: no ``Exception``) that :func:`mark_commit_unanswered` marked: it cut off a
    COMMIT that is not a unit's final one, which may have written, before its answer came."""
    return not isinstance(exc, Exception) and bool(getattr(exc, _COMMIT_UNANSWERED, False))


_SUCCESS_INTERRUPTED = "resilient_db_success_interrupted"


def mark_success_interrupted(exc: BaseException) -> None:
    """Mark an interruption (a cancellation, ``KeyboardInterrupt``, ``SystemExit``) that
    arrived while the circuit breaker was told of an attempt's success (Redis, or a storage of
    yours): the attempt's work, its COMMIT included, was done."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _SUCCESS_INTERRUPTED, True)


def success_interrupted(exc: BaseException) -> bool:
    """Whether :func:`mark_success_interrupted` marked ``exc``."""
    return not isinstance(exc, Exception) and bool(getattr(exc, _SUCCESS_INTERRUPTED, False))


_BREAKER_OPEN_FOR = "resilient_db_breaker_open_for"


def mark_breaker_open(exc: BaseException, seconds: float) -> None:
    """Record on ``exc``, the error a unit gave up on, that the circuit breaker its failures
    opened refuses attempts for ``seconds`` more (a web answer's ``Retry-After``: a client
    told to retry sooner would only meet the open circuit)."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _BREAKER_OPEN_FOR, (seconds, time.monotonic()))


def breaker_open_for(exc: BaseException) -> float:
    """Seconds the breaker recorded by :func:`mark_breaker_open` still refuses attempts for,
    as of now (0: none recorded, or it has run out), on ``exc`` or an error of its chain (the
    driver's error a drop-in connect's policy marked, which SQLAlchemy then wrapped)."""
    longest = 0.0
    for error in error_chain(exc):
        try:
            seconds, when = getattr(error, _BREAKER_OPEN_FOR)
            # (an error unpickled from another host carries that host's clock: never more
            # than was recorded)
            left = float(seconds) - max(0.0, time.monotonic() - float(when))
        except Exception:  # not recorded, or a type whose attribute lookup misbehaves
            continue
        longest = max(longest, left)
    return longest


_OUTCOME = "resilient_db_outcome"


def mark_outcome(exc: BaseException, outcome: Outcome) -> None:
    """Record on ``exc`` the outcome the retry engine gave it, with the classifier of the
    factory (or wrapper) that ran the unit, as it raises ``exc`` to the caller: what a web
    handler answers then follows the classifier that decided, not the default one."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _OUTCOME, outcome)


def marked_outcome(exc: BaseException) -> Outcome | None:
    """The outcome :func:`mark_outcome` recorded on ``exc``, or None (it never reached the
    retry engine: classify it with the default classifier)."""
    try:
        found = getattr(exc, _OUTCOME, None)
    except Exception:  # a type whose attribute lookup misbehaves: as if unmarked
        return None
    return found if isinstance(found, Outcome) else None


#: read_only_sql_transaction: a write refused in a read-only transaction, which every
#: transaction on a hot standby is
READ_ONLY_SQLSTATE = "25006"
_HOT_STANDBY = "resilient_db_hot_standby"


def _reported(driver: Any, name: str) -> str | None:
    """The value of server parameter ``name`` as the server last reported it to ``driver`` (a
    psycopg 3 connection, sync or async, an asyncpg one, a psycopg2 or a pg8000 one: PostgreSQL
    reports some settings at connect and again when they change, and the driver keeps them),
    or None: not reported (``in_hot_standby`` before PostgreSQL 14), another driver, a
    connection that broke."""
    try:
        pgconn = getattr(driver, "pgconn", None)
        if pgconn is not None:  # psycopg 3
            value = pgconn.parameter_status(name.encode())
            return None if value is None else bytes(value).decode()
        get_settings = getattr(driver, "get_settings", None)
        if callable(get_settings):  # asyncpg
            reported = getattr(get_settings(), name, None)
            return reported if isinstance(reported, str) else None
        get_status = getattr(driver, "get_parameter_status", None)
        if callable(get_status):  # psycopg2
            reported = get_status(name)
            return reported if isinstance(reported, str) else None
        statuses = getattr(driver, "parameter_statuses", None)
        if isinstance(statuses, Mapping):  # pg8000
            reported = statuses.get(name)
            return reported if isinstance(reported, str) else None
    except Exception:  # a connection that broke meanwhile: nothing to say
        return None
    return None


def hot_standby_server(driver: Any) -> str | None:
    """The address (``host:port``) of the server behind ``driver`` (a psycopg 3 connection,
    sync or async, an asyncpg, psycopg2 or pg8000 one) when that server says it is a hot
    standby; None when it
    says it is not, or says nothing (before PostgreSQL 14), or the driver is another.

    PostgreSQL 14+ reports ``in_hot_standby`` to the client at connect and again when it
    changes (a promotion): the driver keeps it (:func:`_reported`), so this asks the server
    nothing. For the failure path: 25006 from such a server means the URL reached a standby
    (by mistake, or an old primary restarted as one during a failover), not a transaction the
    application made read-only."""
    if _reported(driver, "in_hot_standby") != "on":
        return None
    return server_address(driver)


def server_address(driver: Any) -> str | None:
    """The address (``host:port``) of the server behind ``driver`` (a psycopg 3 connection,
    sync or async, an asyncpg, psycopg2 or pg8000 one; a multi-host URL's: the host that
    answered), ``"an unknown address"`` where the driver does not say, None for a connection
    that broke meanwhile. Asks the server nothing."""
    try:
        if getattr(driver, "pgconn", None) is not None:  # psycopg 3
            info = driver.info
            return host_address(info.host, info.port)
        if callable(getattr(driver, "get_parameter_status", None)):  # psycopg2
            info = driver.info
            return host_address(info.host, info.port)
        if isinstance(getattr(driver, "parameter_statuses", None), Mapping):
            return "an unknown address"  # pg8000: no public accessor for it
        # asyncpg: the address it connected to (a multi-host URL: the one that answered); it
        # has no public accessor for it
        addr = asyncpg_address(driver)
    except Exception:  # a connection that broke meanwhile: nothing to say
        return None
    if isinstance(addr, tuple) and len(addr) >= 2:
        return host_address(str(addr[0]), addr[1])
    return str(addr) if isinstance(addr, str) else "an unknown address"


#: Where ``default_transaction_read_only`` comes from (``pg_settings.source``) when it is the
#: login's own: ``ALTER ROLE ... SET`` (``user``), ``ALTER ROLE ... IN DATABASE ... SET``
#: (``database user``), the URL's ``options=-c ...`` or asyncpg's ``server_settings``
#: (``client``). Those hold on every server the application may reach, the primary after a
#: failover too: a write refused there is the application's, not a server that takes no writes.
#: (The server's configuration and ``ALTER DATABASE`` are how a primary is fenced, as for a
#: cut-over: a server that takes no writes.)
LOGIN_READ_ONLY_SOURCES: Final = frozenset({"user", "database user", "client"})
#: the driver connections read-only by default by their login's own settings (beside them:
#: asyncpg's classes have ``__slots__``)
_login_read_only: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def read_only_reported(driver: Any) -> bool:
    """Whether the server reported ``default_transaction_read_only`` on to ``driver``."""
    return _reported(driver, "default_transaction_read_only") == "on"


def note_read_only_source(driver: Any, source: object) -> None:
    """Record on ``driver`` whether its transactions are read-only by default by its login's
    own settings (``source``: ``pg_settings.source`` of ``default_transaction_read_only``, asked
    at connect where the server reported it on; see :func:`server_takes_writes`)."""
    with contextlib.suppress(TypeError):  # a type that takes no weak references
        if source in LOGIN_READ_ONLY_SOURCES:
            _login_read_only[driver] = True
        else:
            _login_read_only.pop(driver, None)


def server_takes_writes(driver: Any) -> bool:
    """Whether the server behind ``driver`` said it takes writes: ``in_hot_standby`` and
    ``default_transaction_read_only`` both reported off (:func:`_reported`: PostgreSQL 14+
    reports both; this asks the server nothing), or the latter on by the login's own settings
    (the role's, the URL's: :data:`LOGIN_READ_ONLY_SOURCES`, noted at connect by
    :func:`note_read_only_source`). False when either is on otherwise, when the server reports
    nothing (before PostgreSQL 14), or the driver is another."""
    if _reported(driver, "in_hot_standby") != "off":
        return False
    read_only = _reported(driver, "default_transaction_read_only")
    return read_only == "off" or (read_only == "on" and _login_read_only_driver(driver))


def _login_read_only_driver(driver: Any) -> bool:
    try:
        return _login_read_only.get(driver, False)
    except TypeError:  # a type that takes no weak references: never noted
        return False


def read_only_by_default(driver: Any) -> bool:
    """Whether the server behind ``driver`` said its transactions are read-only by default
    (``default_transaction_read_only`` reported on) and it is no hot standby (which refuses
    ``SET TRANSACTION READ WRITE``): one the library's own writes (a prune) must begin READ
    WRITE on. Asks the server nothing."""
    return (
        _reported(driver, "default_transaction_read_only") == "on"
        and _reported(driver, "in_hot_standby") != "on"
    )


_WRITABLE = "resilient_db_refused_by_writable_server"


def takes_writes_now(in_recovery: object, read_only: object, source: object) -> bool:
    """Whether a server that answered ``pg_is_in_recovery()``, ``default_transaction_read_only``
    and its ``pg_settings.source`` (asked now, on the failure path: see
    :func:`refused_by_a_writable_server`) takes writes, as :func:`server_takes_writes` judges
    the reported settings: not in recovery, and transactions not read-only by default, or
    read-only by the login's own settings (:data:`LOGIN_READ_ONLY_SOURCES`)."""
    if in_recovery is not False:
        return False
    return read_only == "off" or (read_only == "on" and source in LOGIN_READ_ONLY_SOURCES)


def refused_by_a_writable_server(
    connection: Any,
    exc: BaseException,
    ask: Callable[[Any], bool | None] | None = None,
    unsure: Callable[[BaseException], bool] | None = None,
) -> bool:
    """For a 25006 (read_only_sql_transaction) raised on ``connection`` (SQLAlchemy's, as its
    ``handle_error`` has it): True, and ``exc`` marked for the classifier, when the server says
    it takes writes (asked now, or, where it could not be, as reported at login:
    :func:`server_takes_writes`). Then the transaction was read-only by the
    application's own doing (``SET TRANSACTION READ ONLY``, ``postgresql_readonly``, a function
    that sets it) and the write in it is the unit's bug: not transient, the connection and the
    pool sound, nothing for the breaker. Otherwise (a hot standby, an old primary restarted as
    one during a failover, a server whose transactions are read-only by default; not asked, a
    server before PostgreSQL 14, which reports nothing) 25006 is a server that takes no
    writes: a lost server, as the classifier's table says.

    What the server reported may be stale either way: behind a transaction-mode pooler
    (PgBouncer) a client connection keeps the settings of its login, whatever server a later
    transaction reaches (a primary made read-only, or demoted, since; a hot standby promoted
    since, a primary writable again). So ``ask(connection)``, when given, asks the server what
    is true now, which decides: True, it takes writes (``exc`` marked so: the application's
    own read-only transaction, raised at once; but see below where the login said the server
    takes no writes); False, it takes none (``exc`` marked so, the classifier does not fall
    back on the report: a lost server even where the login said it takes writes). None, it
    could not be asked (a driver the library does not mark, a connection lost meanwhile): the
    login's report stands, as without the question.

    The answer is of the server the question reached: behind a transaction-mode pooler, after
    the rollback, the one a replay's transaction would reach, not always the one that refused
    (PgBouncer pointed from a standby at the primary in between, a standby promoted in
    between). So where the login said the server takes no writes and the answer says it takes
    them, the refusal may be either, and ``unsure(exc)``, when given, decides (see
    ``_unit.refused_unsure_again``: the first such refusal in a unit a lost server, replayed;
    a second there the application's own); without it the answer does."""
    if connection is None or connection.closed or connection.invalidated:
        return False
    try:
        driver = connection.connection.driver_connection
    except Exception:
        return False
    answer = None if ask is None else ask(connection)
    told = server_takes_writes(driver)
    if answer is None:
        writable = told
    elif answer and not told and unsure is not None:
        writable = unsure(exc)
        if not writable:  # (what the line about it says: see answered_takes_writes)
            with contextlib.suppress(AttributeError, TypeError):
                setattr(exc, _ANSWERED_WRITABLE, True)
    else:
        writable = answer
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _WRITABLE, writable)
    return writable


_UNSURE = "resilient_db_refused_unsure"
_ANSWERED_WRITABLE = "resilient_db_refused_answered_writable"


def answered_takes_writes(exc: BaseException) -> bool:
    """Whether ``exc`` (a 25006 error, as SQLAlchemy's ``handle_error`` has it) was taken for a
    lost server although the server asked said it takes writes, the login having said it takes
    none (see :func:`refused_by_a_writable_server`, its ``unsure``): what its warning says, in
    place of the login's report (a hot standby in recovery), which the answer contradicts."""
    try:
        return getattr(exc, _ANSWERED_WRITABLE, False) is True
    except Exception:  # a type whose attribute lookup misbehaves: as if unmarked
        return False


def mark_refused_unsure(exc: BaseException) -> None:
    """Record on ``exc`` (a 25006 error) that the server's answer and the login's report
    disagreed on it, and that it was taken for a lost server (see
    :func:`refused_by_a_writable_server`): what the retry loop tells the unit's next attempts
    (see :func:`refused_unsure`)."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _UNSURE, True)


def refused_unsure(exc: BaseException) -> bool:
    """Whether ``exc``, or an error of its chain, was marked by :func:`mark_refused_unsure`."""
    for err in error_chain(exc):
        try:
            if getattr(err, _UNSURE, False) is True:
                return True
        except Exception:  # a type whose attribute lookup misbehaves: as if unmarked
            continue
    return False


def _read_only_by_the_application(exc: BaseException) -> bool:
    """Whether ``exc`` (a 25006) came from a server that takes writes: marked so (or not) by
    :func:`refused_by_a_writable_server`, or, for an error SQLAlchemy's ``handle_error`` did
    not see, raised by a driver connection whose server says so."""
    chain = list(error_chain(exc))
    for err in chain:
        try:
            found = getattr(err, _WRITABLE, None)
        except Exception:  # a type whose attribute lookup misbehaves: as if unmarked
            continue
        if isinstance(found, bool):  # (False: the server, asked, takes no writes)
            return found
    for err in chain:
        driver = _driver_connection_of(err)
        if driver is not None:
            return server_takes_writes(driver)
    return False


def host_address(host: str, port: Any) -> str:
    """``host:port`` (an IPv6 address in brackets), as messages name a server."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def mark_hot_standby(exc: BaseException, server: str) -> None:
    """Record on ``exc`` (a 25006 error) that the hot standby at ``server`` refused the write."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _HOT_STANDBY, server)


def hot_standby_of(exc: BaseException | None) -> str | None:
    """The address :func:`mark_hot_standby` recorded on ``exc`` or an error it wraps, or None."""
    return None if exc is None else text_mark(exc, _HOT_STANDBY)


def text_mark(exc: BaseException, name: str) -> str | None:
    """The text recorded as attribute ``name`` on ``exc`` or on an error of its chain (see
    :func:`error_chain`), the first found; None when none carries one."""
    for err in error_chain(exc):
        try:
            found = getattr(err, name, None)
        except Exception:  # a type whose attribute lookup misbehaves: as if unmarked
            continue
        if isinstance(found, str):
            return found
    return None


#: what an operator does about a unit refused by a hot standby
HOT_STANDBY_FIX = (
    "point the URL at the primary, or list the servers on a multi-host URL with "
    "target_session_attrs=read-write"
)


def hot_standby_hint(server: str) -> str:
    """The words every message about a write refused by the hot standby at ``server`` uses."""
    return (
        f"the server at {server} is a read-only hot standby (in recovery, SQLSTATE 25006): "
        f"{HOT_STANDBY_FIX}"
    )


_FENCED = "resilient_db_fenced"


def mark_fenced(exc: BaseException, server: str) -> None:
    """Record on ``exc`` (the error of SQLSTATE 08004 a refused connection raises) that the
    connection to ``server`` was refused as an old primary's (a timeline of its cluster below
    one seen before: see ``CommitProtocol._fence``)."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _FENCED, server)


def fenced_server_of(exc: BaseException | None) -> str | None:
    """The server :func:`mark_fenced` recorded on ``exc`` or an error it wraps, or None."""
    return None if exc is None else text_mark(exc, _FENCED)


_HOSTS_FAILED = "resilient_db_hosts_failed"

#: the most characters of one host's error that :func:`mark_hosts_failed` keeps
_HOST_ERROR_CHARS = 160


def mark_hosts_failed(exc: BaseException, failures: Sequence[tuple[str, BaseException]]) -> None:
    """Record on ``exc`` (the last host's error, raised as it is: its type and message stay
    the driver's, and decide its classification) that the connect to a multi-host URL tried
    every host in ``failures`` (``(address, error)``, in the order tried) and none could be
    used, each error said in a few words; added to its traceback too (Python 3.11+). The
    driver's message names the last host only, as if no other had been tried."""
    tried = "; ".join(f"{address}: {_in_short(err)}" for address, err in failures)
    text = f"no host of the multi-host URL could be used, {len(failures)} tried: {tried}"
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(exc, _HOSTS_FAILED, text)
    add_note = getattr(exc, "add_note", None)
    if callable(add_note):
        with contextlib.suppress(Exception):
            add_note(f"resilient_db: {text}")


def hosts_failed_of(exc: BaseException | None) -> str | None:
    """What :func:`mark_hosts_failed` recorded on ``exc`` or an error it wraps, or None."""
    return None if exc is None else text_mark(exc, _HOSTS_FAILED)


def _in_short(err: BaseException) -> str:
    """``ClassName: first line of its message`` (cut), or the class name alone."""
    try:
        lines = str(err).strip().splitlines()
    except Exception:  # a message that can't be made: its class says enough
        lines = []
    if not lines:
        return type(err).__name__
    first = lines[0]
    if len(first) > _HOST_ERROR_CHARS:
        first = first[:_HOST_ERROR_CHARS] + "…"
    return f"{type(err).__name__}: {first}"


def marked_replay_safe(exc: BaseException) -> bool:
    """Whether :func:`mark_replay_safe` marked ``exc`` (the driver's error itself)."""
    return bool(getattr(exc, _REPLAY_SAFE, False))


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the DBAPI error SQLAlchemy wrapped, and their causes (bounded); the server's
    error psycopg replaced with its own (see :func:`_server_error_replaced`) counts as one."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < _MAX_CHAIN:
        yield current
        seen += 1
        orig = current.orig if isinstance(current, sa_exc.StatementError) else None
        if isinstance(orig, BaseException):
            current = orig
        elif current.__cause__ is None and _reraised_cancellation(current):
            # Python 3.10: awaiting a cancelled task (asyncio.wait_for's too) raises a new
            # CancelledError, the task's own (the one marked) as its context; 3.11+ raise it
            current = current.__context__
        elif current.__cause__ is None and _server_error_replaced(current):
            current = current.__context__
        else:
            current = current.__cause__


def _server_error_replaced(exc: BaseException) -> bool:
    """Whether ``exc`` is psycopg's own error raised in place of the server's, its context:
    ``tpc_prepare()`` raises the server's refusal of PREPARE TRANSACTION (55000 "prepared
    transactions are disabled", where ``max_prepared_transactions`` is 0) as a
    ``NotSupportedError`` without a SQLSTATE, ``from None``. The server's error says what it
    is: answered (the connection is sound, nothing was prepared), and no transient one."""
    context = exc.__context__
    return (
        isinstance(exc, psycopg.NotSupportedError)
        and exc.sqlstate is None
        and exc.__suppress_context__
        and isinstance(context, psycopg.Error)
        and context.sqlstate is not None
    )


def _reraised_cancellation(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError) and isinstance(
        exc.__context__, asyncio.CancelledError
    )


#: the drivers (psycopg covers psycopg2) and SQLAlchemy's parts that talk to them: an OSError
#: one of them raised is a lost connection (not SQLAlchemy's SQL and ORM modules: a builtin
#: column default, called through a lambda of ``sqlalchemy.sql.schema``, is the application's)
_DRIVER_MODULES = (
    "asyncpg",
    "psycopg",
    "pg8000",
    "sqlalchemy.connectors",
    "sqlalchemy.dialects",
    "sqlalchemy.engine",
    "sqlalchemy.pool",
    "sqlalchemy.util",
)


#: modules whose frames stand between a driver and the socket error it let out (the event loop
#: asyncpg runs on: the standard library's, or uvloop's)
_IO_MODULES: Final = ("uvloop",)


def _frames(err: BaseException) -> list[tuple[str, str]]:
    """(module name, function name) of each frame of ``err``'s traceback, outermost first."""
    found = []
    tb = err.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        found.append((module if isinstance(module, str) else "", tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    return found


def _raised_by(err: BaseException, modules: tuple[str, ...]) -> bool:
    """Whether ``err`` was raised by code of ``modules`` (name prefixes): the innermost frame of
    its traceback that is not the standard library's (or the event loop's) belongs to one. Not
    whether it merely passed through one: the application's own code that SQLAlchemy calls (a
    validator, a column type, an event listener) has SQLAlchemy's frames around it."""
    for module, _function in reversed(_frames(err)):
        if module.partition(".")[0] in sys.stdlib_module_names or module.startswith(_IO_MODULES):
            continue
        return module.startswith(modules)
    return False


def _passed_through(err: BaseException, modules: tuple[str, ...]) -> bool:
    """Whether ``err``'s traceback passes through code of ``modules`` (name prefixes)."""
    return any(module.startswith(modules) for module, _function in _frames(err))


# the driver's connect and the pool's: a TimeoutError there is a connect timing out
_CONNECTING_MODULES = (*ASYNCPG_CONNECT_MODULES, "sqlalchemy.pool")


def _connecting(err: BaseException) -> bool:
    """Whether ``err`` was raised while connecting: in the pool's connect or the driver's (a
    raw ``asyncpg.connect(timeout=...)`` raises its timeout in ``asyncpg.connection.connect``
    itself, outside ``connect_utils``)."""
    return any(
        module.startswith(_CONNECTING_MODULES) or (module, function) == ASYNCPG_CONNECT_FUNCTION
        for module, function in _frames(err)
    )


#: a connect that waited out its timeout: asyncpg's (``asyncio.TimeoutError``, the builtin
#: ``TimeoutError`` since Python 3.11, raised in its connect or the pool's), or a socket's
#: connect that the kernel gave up on (``ETIMEDOUT``, an ``OSError`` of that class)
_TIMEOUTS: Final = (TimeoutError, asyncio.TimeoutError)


def connect_timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error of its chain) is a connect that timed out: asyncpg's
    timeout (``timeout``, per host on a multi-host URL) raised while connecting, or psycopg's
    ``ConnectionTimeout`` (``connect_timeout``). A host that accepts TCP and never answers
    fails so, one timeout after the connect began; a connect refused, or rejected by the
    server (a standby not promoted yet for ``target_session_attrs=read-write``, a server
    shutting down or starting up), fails at once and is not one. Told by the error's class
    (psycopg's public ``psycopg.errors.ConnectionTimeout``), never by its text. (A multi-host
    connect raises its last host's error: a timeout on an earlier host, then a quick refusal by
    the last, is not one.)"""
    for err in error_chain(exc):
        if isinstance(err, _TIMEOUTS):
            if _connecting(err):
                return True
            continue
        if isinstance(err, ConnectionTimeout):
            return True
    return False


def answer_timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is the client giving up waiting for an answer (asyncpg's
    ``command_timeout``: a ``TimeoutError`` outside connecting). Not transient as such (a slow
    statement is the application's), but raised by a COMMIT it leaves the outcome open: the
    COMMIT may be applied after the client stopped waiting (one waiting for a synchronous
    standby stays committed locally when cancelled), as a lost answer's may."""
    return any(isinstance(err, _TIMEOUTS) and not _connecting(err) for err in error_chain(exc))


def client_state_broken(exc: BaseException) -> bool:
    """Whether ``exc`` is asyncpg's ``InternalClientError``: the driver's protocol state machine
    is out of step with the server, and the connection can't be used again. It is what a
    session the server ended (a terminated backend, a restart, an idle timeout) looks like when
    asyncpg has read the server's FATAL message but not yet the socket's close: the message
    came while no statement waited, asyncpg set its protocol to wait for a ReadyForQuery that
    never comes, and the next operation fails with "cannot switch to state N; another
    operation (2) is in progress" instead of "connection is closed". SQLAlchemy wraps it and
    sees a disconnect when asyncpg has closed the connection, which it does when an operation
    can't begin but not for every such error. So the class decides."""
    for err in error_chain(exc):
        kind = type(err)
        if kind.__name__ == "InternalClientError" and kind.__module__.startswith("asyncpg"):
            return True
    return False


def never_sent(exc: BaseException) -> bool:
    """Whether ``exc`` is asyncpg's ``InternalClientError`` raised as a simple query began (its
    own BEGIN, COMMIT or ROLLBACK: ``Connection.execute`` without arguments), before the
    message was written: asyncpg checks its connection and switches its protocol's state
    first, and refused, so nothing of that query reached the server. A COMMIT so refused
    committed nothing; its connection is lost (asyncpg aborts it), a disconnect before the
    COMMIT like any other (see :func:`client_state_broken`): replayed, not an unknown outcome.
    It is what a session the server ended looks like when asyncpg has read the server's FATAL
    message but not yet the socket's close ("cannot switch to state 15; another operation (2)
    is in progress").

    Told by the error's class and where it was raised (asyncpg's method that writes the
    message, :data:`~._internals.ASYNCPG_SIMPLE_QUERY`), never by its text: the class alone
    is not enough (asyncpg also raises it for an answer it could not read, after the message
    went out), and its message, though the client's own, is worded for people and changes
    between releases without notice. Should asyncpg move that method, nothing matches and such
    a COMMIT stays an unknown outcome, as before (the canary in ``tests/test_internals.py``
    says so first)."""
    if refused_in_pipeline(exc):
        return True  # libpq refused it before sending: see refused_in_pipeline
    module, function = ASYNCPG_SIMPLE_QUERY
    for err in error_chain(exc):
        kind = type(err)
        if kind.__name__ != "InternalClientError" or not kind.__module__.startswith("asyncpg"):
            continue
        # (Cython names a method's traceback entry by its qualified name: the module's, the
        # class's, then the method's)
        if any(
            frame_module == module and frame.rpartition(".")[2] == function
            for frame_module, frame in _frames(err)
        ):
            return True
    return False


def _driver_disconnect(exc: BaseException) -> bool:
    """True when the failure is a broken or refused connection that carries no SQLSTATE."""
    wrapped = False  # SQLAlchemy wrapped the driver's error, and judged its connection
    for err in error_chain(exc):
        if isinstance(err, sa_exc.DBAPIError):
            if err.connection_invalidated:
                return True
            wrapped = True
            continue
        if isinstance(err, (OSError, *_TIMEOUTS)):  # asyncio's timeout is no OSError on 3.10
            # a socket error of the driver (asyncpg lets a refused or broken connect through
            # as OSError); the application's own OSErrors (a missing file, its own sockets),
            # raised in its own code even where SQLAlchemy called it (a validator, a column
            # type), are not the database's and are never retried or counted. A TimeoutError
            # is one only while connecting: raised by a statement, it is asyncpg's
            # ``command_timeout`` (the query ran too long; asyncpg cancels it and the
            # connection stays usable), which is psycopg's ``statement_timeout`` (57014, not
            # transient) on the client side.
            connecting = _connecting(err)
            if isinstance(err, _TIMEOUTS) and not connecting:
                continue
            # raised while the pool connects, by whatever opens the socket (the driver, or a
            # ``creator=`` of a cloud connector that opens it itself), or by a driver later
            if connecting or _raised_by(err, _DRIVER_MODULES):
                return True
            continue
        # psycopg: OperationalError with no SQLSTATE (see _psycopg_disconnect); asyncpg:
        # ConnectionDoesNotExistError when the connection closed under an operation,
        # TargetServerAttributeNotMatched when every host answered but none takes the session
        # (a failover in progress: the standby not promoted yet).
        # Identified by their driver's classes and state, never by message text.
        # asyncpg's plain InterfaceError also reports programming errors (wrong argument
        # count, a connection used by two tasks at once): a closed connection behind it is
        # recognised by SQLAlchemy where it wraps it (``connection_invalidated`` above), else
        # by where asyncpg raised it (see _asyncpg_closed).
        module = type(err).__module__
        name = type(err).__name__
        if not wrapped and _asyncpg_closed(err, module, name):
            return True
        if module.startswith("psycopg") and name in ("OperationalError", "ConnectionTimeout"):
            # (ConnectionTimeout: a connect timing out; not its siblings
            # PipelineAborted and CancellationTimeout, which are no lost connection)
            if getattr(err, "sqlstate", None) is not None:
                return False
            return _psycopg_disconnect(err, name, wrapped=wrapped)
        if module.startswith("asyncpg") and name in (
            "ConnectionDoesNotExistError",
            "ConnectionFailureError",
            "TargetServerAttributeNotMatched",
        ):
            return True
    return False


def _asyncpg_closed(err: BaseException, module: str, name: str) -> bool:
    """Whether ``err`` is asyncpg's ``InterfaceError`` raised because its connection was closed
    when an operation began: raised by ``Connection._check_open``, which every public method
    of the connection that talks to the server calls first, or by ``add_log_listener``, which
    makes the same check itself (:data:`~._internals.ASYNCPG_CLOSED_CHECKS`); both raise it
    only when ``is_closed()`` (the others that raise it, and its protocol's state check, which
    also refuses a second operation at once, report an application's mistakes too). It
    reaches the caller unwrapped where SQLAlchemy calls asyncpg outside a statement: its
    ``on_connect`` (the JSON codecs: a connection the server ended, or whose socket was cut,
    between asyncpg's connect and the set-up), and the commit protocol's own set-up.

    Decided by where it was raised, not by the connection's state now: a ``connect`` listener
    that raises has SQLAlchemy close the connection, so an application's mistake there (a
    statement with the wrong number of arguments) finds it closed afterwards, and is no lost
    connection. Nor by its message (the classifier never reads one)."""
    if name != "InterfaceError" or not module.startswith("asyncpg"):
        return False
    frames = _frames(err)
    if _stream_fetch_closed(frames):
        return True
    if not any(frame_module.startswith(_CONNECTING_MODULES) for frame_module, _ in frames):
        # only while the pool connects or checks a connection out (SQLAlchemy's on_connect,
        # the commit protocol's set-up): elsewhere a closed connection is SQLAlchemy's to tell
        # (it wraps what it sends), or the application's own mistake (a raw connection kept
        # past its use, closed since)
        return False
    for frame_module, function in reversed(frames):
        if frame_module.startswith("asyncpg"):
            return frame_module == "asyncpg.connection" and function in ASYNCPG_CLOSED_CHECKS
    return False


def _stream_fetch_closed(frames: list[tuple[str, str]]) -> bool:
    """An asyncpg ``InterfaceError`` of a server-side cursor's fetch made by SQLAlchemy's
    adapter (``stream()``, ``yield_per``) on a closed connection: the backend ended (a restart,
    a failover, ``pg_terminate_backend``) between two fetches. The adapter lets it out
    unwrapped, unlike a statement's. Raised by asyncpg's check of a cursor's connection
    (:data:`~._internals.ASYNCPG_RESOURCE_CHECK`), which raises it for a connection closed or
    released to asyncpg's own pool; SQLAlchemy's connections are never in asyncpg's pool, so
    under its adapter it means closed."""
    innermost = next((frame for frame in reversed(frames) if frame[0].startswith("asyncpg")), None)
    return innermost == ASYNCPG_RESOURCE_CHECK and any(
        frame_module == SQLALCHEMY_ASYNCPG_MODULE for frame_module, _ in frames
    )


_CONNECTION_OK = 0  # libpq's CONNECTION_OK (psycopg.pq.ConnStatus.OK)


def _psycopg_disconnect(err: BaseException, name: str, *, wrapped: bool) -> bool:
    """Whether a psycopg error without SQLSTATE is a lost or refused connection.

    psycopg raises these for a connect that failed (refused, timed out, no host taking the
    session asked for by ``target_session_attrs``, and every refusal the server sent while
    connecting: libpq keeps no SQLSTATE of those), for a socket that broke under a statement,
    and also for errors of a sound connection (libpq refusing a statement of more than 65,535
    parameters before sending it). So:

    - raised while connecting: a disconnect (the server may be down, starting, or out of
      connection slots), except when the server asked for a password and none was given (the
      URL asking for no particular kind of session, ``target_session_attrs``): retrying can't
      help. A refusal after the password was sent is ambiguous with psycopg, which keeps no
      SQLSTATE of it: a wrong password, an unknown database (28P01, 3D000: no use retrying)
      look the same as 53300 sent after authentication (the last connection slots reserved
      for superusers, a role's or database's connection limit), the usual "too many
      connections" of an application, which heals; it stays a disconnect. (asyncpg's errors
      carry the SQLSTATE and are told apart.)
    - on an established connection: a disconnect only when the connection is lost. SQLAlchemy
      judged that by the connection's state (``connection_invalidated``, checked before this),
      but for a statement of a pool listener (then judged here, by the connection's state);
      an error of the driver's connection used directly is judged by the state of the
      connection it came from, or, where that is not found, taken as lost (as before).
    - either way, a statement whose socket psycopg gave up on before libpq saw the loss
      (:func:`_psycopg_gave_up`): SQLAlchemy, which asks libpq, found the connection sound.
    """
    if name == "ConnectionTimeout":
        return True
    pgconn = getattr(err, "pgconn", None)  # set by psycopg on the errors of a connect
    if pgconn is not None or _raised_connecting(err):
        return pgconn is None or not (
            _refused_after_authentication(pgconn) or _option_refused(pgconn)
        )
    if wrapped and not _passed_through(err, _CONNECTING_MODULES):
        # (while the pool connects or checks out, a listener's statement - the commit
        # markers' set-up - may meet a lost connection that SQLAlchemy wrapped without taking
        # it for one: judged by the connection's state, as below)
        return _psycopg_gave_up(err)
    broken = _psycopg_connection_lost(err)
    return True if broken is None else broken or _psycopg_gave_up(err)


_TRANSACTION_ACTIVE: Final = 1  # libpq's PQTRANS_ACTIVE (psycopg.pq.TransactionStatus.ACTIVE)
_PIPELINE_OFF: Final = 0  # libpq's PQ_PIPELINE_OFF (psycopg.pq.PipelineStatus.OFF)
_GAVE_UP = "resilient_db_socket_given_up"


def _psycopg_gave_up(err: BaseException) -> bool:
    """Whether psycopg raised ``err`` (an ``OperationalError`` without SQLSTATE) because it gave
    up on its connection's socket in the middle of a statement, before libpq saw the connection
    lost: then libpq still says the connection is sound, and so do psycopg's ``closed`` and
    ``broken`` (which ask libpq) and SQLAlchemy (which asks those), but it is lost all the same.

    psycopg's wait on the socket gives up ("connection socket closed") when the kernel flags an
    error on it and nothing to read: a reset that the poll sees before the socket's end (a
    server that ended the session, a connection cut on the way), or a descriptor that is no
    longer a socket; libpq never reads the reset. Told by what psycopg leaves, never by its
    message: an ``OSError`` it was raised from (the descriptor's own error, where the wait had
    one), or the connection left with the statement in flight - libpq's transaction status
    ``ACTIVE`` while the connection is otherwise sound, outside pipeline mode. No error of the
    statement itself leaves a connection so (the server's errors carry a SQLSTATE and end the
    statement; libpq refuses a statement it can't send before sending it), and nothing more can
    be sent on it ("another command is already in progress").

    Recorded on ``err`` the first time it is judged (for a factory's engine: in its
    ``handle_error``, the connection as psycopg left it): a later judgement (the retry
    engine's, a web handler's) may find that connection closed by the pool, or in use again."""
    return _judged_once(
        err, _GAVE_UP, lambda: isinstance(err.__cause__, OSError) or _left_mid_statement(err)
    )


def _judged_once(err: BaseException, name: str, judge: Callable[[], bool]) -> bool:
    """``judge()`` of ``err``, recorded on it as attribute ``name`` the first time (a later
    judgement, once the connection it looked at is closed or in use again, finds the answer
    recorded); judged afresh where the error takes no attribute, or misbehaves reading one."""
    try:
        found = getattr(err, name, None)
    except Exception:  # a type whose attribute lookup misbehaves: judged afresh
        found = None
    if isinstance(found, bool):
        return found
    answer = judge()
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(err, name, answer)
    return answer


def socket_given_up(exc: BaseException) -> bool:
    """Whether ``exc`` (SQLAlchemy's error, or the driver's) is psycopg's giving up on its
    connection's socket in the middle of a statement (:func:`_psycopg_gave_up`): a lost
    connection that SQLAlchemy, asking libpq, takes for a sound one. For ``handle_error``: that
    connection must not go back to the pool, whose reset of it would fail ("another command is
    already in progress")."""
    for err in error_chain(exc):
        kind = type(err)
        if kind.__module__.startswith("psycopg") and kind.__name__ == "OperationalError":
            return getattr(err, "sqlstate", None) is None and _psycopg_gave_up(err)
    return False


def _left_mid_statement(err: BaseException) -> bool:
    """Whether the psycopg connection whose method (or whose cursor's) raised ``err`` is sound
    to libpq but has a statement in flight, outside pipeline mode (see :func:`_psycopg_gave_up`)."""
    pgconn = getattr(_driver_connection_of(err), "pgconn", None)
    try:
        return bool(
            pgconn is not None
            and pgconn.status == _CONNECTION_OK
            and pgconn.transaction_status == _TRANSACTION_ACTIVE
            and pgconn.pipeline_status == _PIPELINE_OFF
        )
    except Exception:  # a connection that tells nothing: judged by the rest
        return False


_PIPELINE_REFUSED = "resilient_db_refused_in_pipeline"


def refused_in_pipeline(exc: BaseException) -> bool:
    """Whether ``exc`` (SQLAlchemy's error, or the driver's) is libpq refusing to send a query
    on a psycopg connection that psycopg left in pipeline mode: psycopg's ``OperationalError``
    without SQLSTATE raised by ``PGconn.send_query`` (libpq's ``PQsendQuery``, which psycopg
    uses outside its pipelines only: ``ROLLBACK``, ``COMMIT``, the marked COMMIT) while libpq
    says the connection is sound and in pipeline mode. psycopg leaves a connection so when it
    could not leave pipeline mode at the end of a pipeline (an ``executemany``, a
    ``pipeline()`` block) that failed: it logs "error ignored exiting" and raises the
    pipeline's own error; libpq refuses every later message ("sending query failed: cannot exit
    pipeline mode while busy ... PQsendQuery not allowed in pipeline mode"). Nothing of the
    refused query was sent (a COMMIT so refused committed nothing), and the connection can't
    be used again. Told by where it was raised and libpq's state, never by its text.

    Recorded on the driver's error the first time it is judged (in the engine's
    ``handle_error``, the connection as psycopg left it): later judgements find that
    connection invalidated."""
    found = next(
        (
            err
            for err in error_chain(exc)
            if type(err).__module__.startswith("psycopg")
            and type(err).__name__ == "OperationalError"
        ),
        None,
    )
    if found is None or getattr(found, "sqlstate", None) is not None:
        return False
    return _judged_once(
        found, _PIPELINE_REFUSED, lambda: _sent_by_libpq(found) and _left_in_pipeline(found)
    )


def _sent_by_libpq(err: BaseException) -> bool:
    """Whether ``err`` was raised by psycopg's ``PGconn.send_query`` (its C or Python libpq
    wrapper: Cython names the frame by its qualified name)."""
    return any(
        module.startswith("psycopg") and function.rpartition(".")[2] == "send_query"
        for module, function in _frames(err)
    )


def _left_in_pipeline(err: BaseException) -> bool:
    """Whether the psycopg connection whose method raised ``err`` is sound to libpq and in
    pipeline mode (on or aborted)."""
    pgconn = getattr(_driver_connection_of(err), "pgconn", None)
    try:
        return bool(
            pgconn is not None
            and pgconn.status == _CONNECTION_OK
            and pgconn.pipeline_status != _PIPELINE_OFF
        )
    except Exception:  # a connection that tells nothing: judged by the rest
        return False


def _left_pipeline_by(exc: BaseException) -> BaseException | None:
    """For an error libpq refused to send on a connection left in pipeline mode
    (:func:`refused_in_pipeline`): the error it was raised while handling (its
    ``__context__``, the first that is not such a refusal itself), which is what left the
    connection so (a serialization failure, a lost connection, an application's mistake
    inside the pipeline); None when there is none."""
    current = exc.__context__
    for _ in range(_MAX_CHAIN):
        if current is None:
            return None
        if not refused_in_pipeline(current):
            return current
        current = current.__context__
    return None


def _raised_connecting(err: BaseException) -> bool:
    """Whether ``err`` came out of psycopg's ``connect`` (its host list, DNS, the attempts)."""
    return any(
        function == "connect" and module.startswith("psycopg") for module, function in _frames(err)
    )


#: the values libpq takes for its connect options that pick among the hosts (exact spellings:
#: it compares them as given), by option
_LIBPQ_CHOICES: Final = {
    b"target_session_attrs": (
        b"any",
        b"read-write",
        b"read-only",
        b"primary",
        b"standby",
        b"prefer-standby",
    ),
    b"load_balance_hosts": (b"disable", b"random"),
}


def _option_refused(pgconn: Any) -> bool:
    """Whether the connect whose libpq connection is ``pgconn`` was refused by libpq itself
    for a value it does not take (``target_session_attrs=read_write``): before any host is
    tried, on every connect, so retrying can't help (and a breaker opened on it would say the
    database failed)."""
    try:
        said = bytes(pgconn.error_message or b"")
        for option in pgconn.info:
            choices = _LIBPQ_CHOICES.get(option.keyword)
            # libpq's own words name the option too ('invalid target_session_attrs value:
            # "read_write"'): a value a newer libpq takes, outside the list above, is not
            # refused for a connect that failed otherwise
            if choices is not None and option.val and option.val not in choices:
                return b"invalid " + option.keyword in said
    except Exception:  # a libpq connection that tells nothing: as before, a disconnect
        return False
    return False


def _refused_after_authentication(pgconn: Any) -> bool:
    """Whether the connect whose libpq connection (psycopg's finished copy) is ``pgconn`` was
    refused by a server that asked for a password none was given for (libpq's
    ``PQconnectionNeedsPassword``), the URL asking for any kind of session: a configuration
    that can't succeed, not a moment of unavailability. Anything else stays a disconnect (see
    :func:`_psycopg_disconnect`), as does a URL with ``target_session_attrs``."""
    try:
        if not pgconn.needs_password:
            return False
        for option in pgconn.info:
            if option.keyword == b"target_session_attrs":
                return option.val in (None, b"", b"any")
    except Exception:  # a libpq connection that tells nothing: as before, a disconnect
        return False
    return True


def _of_driver(obj: Any, driver: str) -> bool:
    """Whether ``obj`` is of a class of ``driver`` (or a subclass of one, as the commit
    protocol's marked connections and cursors are)."""
    return any(kind.__module__.startswith(driver) for kind in type(obj).__mro__)


def _driver_connection_of(err: BaseException) -> Any:
    """The driver's connection (psycopg 3's, sync or async, or asyncpg's) whose method, or whose
    cursor's, raised ``err``: found in its traceback, where SQLAlchemy's ``handle_error`` did
    not see the error (the driver's connection used directly, an engine without a resilient
    factory). None when not found."""
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None:
            if _of_driver(owner, "psycopg"):
                conn = owner if hasattr(owner, "pgconn") else getattr(owner, "connection", None)
                if getattr(conn, "pgconn", None) is not None:
                    return conn
            elif _of_driver(owner, "asyncpg"):
                # its connection, or a prepared statement's or cursor's (asyncpg keeps no public
                # reference to it: read in one place, _internals.asyncpg_statement_connection)
                try:
                    conn = (
                        owner
                        if hasattr(owner, "get_settings")
                        else asyncpg_statement_connection(owner)
                    )
                except AttributeError:  # an object of asyncpg's with no connection
                    conn = None
                if callable(getattr(conn, "get_settings", None)):
                    return conn
        tb = tb.tb_next
    return None


def _ends_session(err: BaseException) -> bool:
    """Whether ``err`` is a server error of severity FATAL or PANIC (the server ends the
    session with it), whatever the driver has noticed of the connection yet."""
    diag = getattr(err, "diag", None)  # psycopg
    severity = getattr(diag, "severity_nonlocalized", None) if diag is not None else None
    if severity is None:
        severity = getattr(err, "severity_en", None) or getattr(err, "severity", None)  # asyncpg
    return isinstance(severity, str) and severity.upper() in ("FATAL", "PANIC")


def _connection_lost(err: BaseException) -> bool:
    """Whether ``err`` is SQLAlchemy's error for a connection it invalidated, or a driver's
    error whose connection (psycopg's, or asyncpg's, found in its traceback) is lost."""
    if isinstance(err, sa_exc.DBAPIError):
        return bool(err.connection_invalidated)
    lost = _psycopg_connection_lost(err)
    if lost is not None:
        return lost
    try:
        return bool(_driver_connection_of(err).is_closed())  # asyncpg
    except Exception:  # none found, or one that tells nothing: as if sound
        return False


def _psycopg_connection_lost(err: BaseException) -> bool | None:
    """The state of the psycopg connection whose method (or whose cursor's) raised ``err``:
    True when libpq lost it (or it was closed), False when it is sound, None when not found."""
    status = getattr(getattr(_driver_connection_of(err), "pgconn", None), "status", None)
    return status != _CONNECTION_OK if isinstance(status, int) else None


class Classifier:
    """Maps exceptions to an :class:`Outcome`. Immutable: ``with_codes``/``without_codes``
    return a new classifier, so a factory's behaviour never changes under it."""

    __slots__ = ("_codes",)

    def __init__(self, codes: Mapping[str, Outcome | str] | None = None) -> None:
        table = dict(_DEFAULT_CODES if codes is None else {})
        for code, outcome in _code_items("Classifier()", codes or {}):
            table[_check_code(code)] = _check_outcome(code, outcome)
        self._codes: Mapping[str, Outcome] = MappingProxyType(table)

    @property
    def codes(self) -> Mapping[str, Outcome]:
        """The explicit SQLSTATE table (class 08 codes not listed are disconnects too, but 08P01
        answered on a sound connection: see :meth:`answered_violation`)."""
        return self._codes

    def with_codes(self, codes: Mapping[str, Outcome | str]) -> Classifier:
        """A classifier that also treats ``codes`` (SQLSTATE -> outcome) as given."""
        table: dict[str, Outcome | str] = dict(self._codes)
        table.update(
            {_check_code(c): _check_outcome(c, o) for c, o in _code_items("with_codes()", codes)}
        )
        return Classifier._from_table(table)

    def without_codes(self, codes: str | Iterable[str]) -> Classifier:
        """A classifier for which ``codes`` are not transient any more: SQLSTATEs, or one
        SQLSTATE as a string (``without_codes("55P03")`` is ``without_codes(["55P03"])``)."""
        if isinstance(codes, str):
            codes = (codes,)
        elif not isinstance(codes, Iterable):
            raise TypeError(
                "without_codes() takes SQLSTATEs (an iterable of strings such as "
                f"['40001'], or one as a string), got {type(codes).__name__}"
            )
        table: dict[str, Outcome | str] = dict(self._codes)
        for code in codes:
            table[_check_code(code)] = Outcome.NOT_TRANSIENT
        return Classifier._from_table(table)

    @classmethod
    def _from_table(cls, table: Mapping[str, Outcome | str]) -> Classifier:
        new = cls.__new__(cls)
        new._codes = MappingProxyType({c: Outcome(o) for c, o in table.items()})
        return new

    def classify(self, exc: BaseException) -> Outcome:
        """The outcome class of ``exc``."""
        if not isinstance(exc, Exception):
            return Outcome.NOT_TRANSIENT  # cancellation, KeyboardInterrupt, SystemExit
        if isinstance(exc, ResilientDBError):
            # our own errors never retry, but for one marked so itself (a COMMIT answered with
            # a warning, proved not to have run); not for one caused by a marked error (a
            # CircuitOpenError raised from a unit's last failure)
            return Outcome.CONFLICT if marked_replay_safe(exc) else Outcome.NOT_TRANSIENT
        for err in error_chain(exc):
            if marked_replay_safe(err):
                return Outcome.CONFLICT
            if getattr(err, _COMMIT_UNANSWERED, False):
                return Outcome.COMMIT_UNKNOWN
        if refused_in_pipeline(exc):
            # a connection psycopg left in pipeline mode refused this query (nothing sent): the
            # failure is the one that left it so, which this error was raised while handling
            cause = _left_pipeline_by(exc)
            return Outcome.NOT_TRANSIENT if cause is None else self.classify(cause)
        code = sqlstate_of(exc)
        if code is not None:
            if code == READ_ONLY_SQLSTATE and _read_only_by_the_application(exc):
                return Outcome.NOT_TRANSIENT  # a write in its own read-only transaction
            outcome = self._codes.get(code)
            if outcome is not None:
                return outcome
            if code.startswith(_DISCONNECT_CLASS) and not self.answered_violation(code, exc):
                return Outcome.DISCONNECT
        if _driver_disconnect(exc) or client_state_broken(exc):
            return Outcome.DISCONNECT
        return Outcome.NOT_TRANSIENT

    def is_transient(self, exc: BaseException) -> bool:
        """See :func:`is_transient`."""
        return self.classify(exc).replayable and not never_replayed(exc)

    def is_disconnect_code(self, code: str | None) -> bool:
        """True for SQLSTATEs after which the connection must not be reused. 08P01 included
        (an error that may not be the server's answer to what was sent: a COMMIT so failed
        may have committed), although :meth:`classify` takes one answered on a sound
        connection for no disconnect (:meth:`answered_violation`)."""
        if code is None:
            return False
        outcome = self._codes.get(code)
        if outcome is not None:
            return outcome in (Outcome.DISCONNECT, Outcome.COMMIT_UNKNOWN)
        return code.startswith(_DISCONNECT_CLASS)

    def answered_violation(self, code: str | None, exc: BaseException) -> bool:
        """Whether ``exc``, of SQLSTATE ``code``, is 08P01 (protocol_violation) that the
        server answered on an established connection that is still sound, the table saying
        nothing of it: the server could not read a message of the client's (a NUL byte in a
        statement's text), and the same statement meets the same error again. Not transient,
        and no reason to replace the pool. 08P01 raised while connecting, or whose connection
        is lost (a FATAL one: PgBouncer's refusals, a message out of step) stays a
        disconnect."""
        if code != PROTOCOL_VIOLATION or code in self._codes:
            return False
        return not any(
            _connecting(err) or _ends_session(err) or _connection_lost(err)
            for err in error_chain(exc)
        )

    def __repr__(self) -> str:
        return f"Classifier({dict(self._codes)!r})"


def _code_items(where: str, codes: object) -> Iterable[tuple[Any, Any]]:
    if not isinstance(codes, Mapping):
        raise TypeError(
            f"{where} takes a mapping of SQLSTATE to outcome, such as "
            f"{{'40001': Outcome.CONFLICT}}, got {type(codes).__name__}"
        )
    return codes.items()


def _check_outcome(code: object, outcome: Any) -> Outcome:
    try:
        return Outcome(outcome)
    except ValueError:
        valid = ", ".join(f"Outcome.{o.name} ({o.value!r})" for o in Outcome)
        raise ValueError(
            f"{outcome!r} (for SQLSTATE {code!r}) is not an outcome; use one of {valid}"
        ) from None


def _check_code(code: Any) -> str:
    if not (isinstance(code, str) and len(code) == 5 and code.isalnum() and code.upper() == code):
        raise ValueError(f"{code!r} is not a SQLSTATE (five upper-case letters or digits)")
    return code


DEFAULT_CLASSIFIER = Classifier()


def classify(exc: BaseException, *, classifier: Classifier | None = None) -> Outcome:
    """The :class:`Outcome` of ``exc`` under ``classifier`` (default: the built-in table)."""
    return _classifier_for("classify", exc, classifier).classify(exc)


def _classifier_for(name: str, exc: object, classifier: object) -> Classifier:
    """``classifier``, or the built-in one for None; ``TypeError`` naming the argument for an
    ``exc`` that is no exception or a ``classifier`` that is no :class:`Classifier` (a mapping
    of codes was taken for the built-in table when empty, else failed with an
    ``AttributeError``)."""
    if not isinstance(exc, BaseException):
        raise TypeError(f"{name}() takes an exception, got {type(exc).__name__}")
    if classifier is None:
        return DEFAULT_CLASSIFIER
    if not isinstance(classifier, Classifier):
        raise TypeError(
            f"{name}(classifier=...) takes a resilient_db.Classifier (Classifier(codes), "
            f"say) or None, got {type(classifier).__name__}"
        )
    return classifier


def answered(exc: BaseException, classifier: Classifier) -> bool:
    """The server answered with an error after which the connection is sound (the factory's
    classifier's disconnect codes are not such an answer): a statement so answered, a COMMIT
    included, did not commit."""
    code = sqlstate_of(exc)
    return code is not None and not classifier.is_disconnect_code(code)


def unanswered_commit(exc: BaseException, classifier: Classifier, wrote: bool) -> bool:
    """A COMMIT that a unit's final one is not (drop-in use, or an operation's own code)
    failed with ``exc``: whether the server left it unanswered (it may have committed). One
    that ``wrote`` (may have) is marked an unknown outcome (see
    :func:`~._classify.mark_commit_unanswered`): raised as it is, it must not read as transient
    (a web client told to retry would write twice). Not one the driver never sent
    (:func:`never_sent`): that committed nothing."""
    if answered(exc, classifier) or never_sent(exc):
        return False
    if wrote:
        mark_commit_unanswered(exc)
    return True


def is_transient(exc: BaseException, *, classifier: Classifier | None = None) -> bool:
    """True when replaying the whole unit of work may succeed: conflicts, an unavailable server,
    lost connections. Not for an unknown commit outcome (a COMMIT that may have written whose
    answer was lost, 08007, :class:`~resilient_db.CommitOutcomeUnknownError`): a replay may
    write it twice; check whether it committed first (``classify`` says
    ``Outcome.COMMIT_UNKNOWN``). Nor for the error of a unit that committed part of its work
    before it failed (its own ``session.commit()``, a statement in autocommit, one database
    of several): ``classify`` says what the error is, and a replay would write that part
    again."""
    return _classifier_for("is_transient", exc, classifier).is_transient(exc)


#: packages whose exception texts may quote a statement, its bound parameters or a row's values
#: (SQLAlchemy's "[parameters: ...]", a driver's "DETAIL: Key (email)=(...)"; SQLAlchemy's
#: PendingRollbackError repeats the original error's text; pydantic's "input_value=...")
_TALKATIVE: Final = ("sqlalchemy", "psycopg", "psycopg2", "asyncpg", "pg8000", "pydantic")


def _quotes_values(err: BaseException) -> bool:
    """Whether ``err``'s text may quote values: a database driver's, SQLAlchemy's or pydantic's
    error, or resilient_db's own (an illegal transition names its row's key, which the
    ``[SELF-HEAL]`` lines show only with ``SELF_HEALING_LOG_ROW_KEYS``)."""
    module = str(getattr(type(err), "__module__", None) or "")
    return isinstance(err, ResilientDBError) or module.split(".", 1)[0].startswith(_TALKATIVE)


def _code_of(err: BaseException) -> str:
    try:
        code = sqlstate_of(err)
    except Exception:  # a driver error whose fields can't be read
        code = None
    return f"SQLSTATE {code}" if code else "no SQLSTATE"


def failure_detail(
    exc: BaseException, *, texts: bool = True, after: BaseException | None = None
) -> str:
    """A traceback of ``exc`` and the errors chained to it (cause or context), for a DEBUG line:
    every frame, but no text that may quote values. Tracebacks formatted by ``logging``'s
    ``exc_info`` would carry bound parameters and row values into the logs: the error being
    handled is often a database error's context, and the errors a database error was raised
    from quote what it was given (an Enum's bind processor: ``LookupError: 'the value' is not
    among ...``). So a database driver's, SQLAlchemy's, pydantic's or resilient_db's own error
    shows its class and SQLSTATE only, and so does every error it was raised from or while.
    ``texts`` False: no error's text at all (an error of code that is not ours to know, such
    as a breaker state storage given to a factory, which may quote its own secrets).
    ``after``: the error ``exc`` came after (a failed attempt, whose rollback failed), shown
    first when ``exc``'s chain does not hold it: a driver's error raised from the loop's own
    error for the lost connection (uvloop's ``ConnectionResetError``) hides the context it was
    raised in."""
    try:
        chain: list[BaseException] = []
        current: BaseException | None = exc
        while current is not None and len(chain) < _MAX_CHAIN:
            if any(current is seen for seen in chain):
                break
            chain.append(current)
            cause = current.__cause__
            if cause is None and not current.__suppress_context__:
                cause = current.__context__
            current = cause
        if after is not None and not any(after is seen for seen in chain):
            chain.append(after)
        # newest first: hidden from the first that quotes values on (what it was raised from)
        quoting = next(
            (i for i, err in enumerate(chain) if not texts or _quotes_values(err)), len(chain)
        )
        parts: list[str] = []
        for i in reversed(range(len(chain))):  # the first error first, as Python prints them
            err, hide = chain[i], i >= quoting
            if parts:
                parts.append("which led to:\n")
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(err.__traceback__))
            kind = type(err)
            name = f"{getattr(kind, '__module__', None)}.{kind.__qualname__}"
            if hide:
                why = "it may quote values" if texts else "not ours to show"
                parts.append(f"{name}: ({_code_of(err)}; its text left out: {why})\n")
            else:
                parts.append("".join(traceback.format_exception_only(kind, err)))
        return "".join(parts).rstrip("\n")
    except Exception:  # never raised into the except block that logs it
        return f"{type(exc).__qualname__} (its traceback could not be formatted)"


def log_quietly(
    logger: logging.Logger, level: int, message: str, *args: object, **kwargs: Any
) -> None:
    """``logger.log(level, message, *args, **kwargs)`` that never raises. The application's
    logging runs inside it: a handler whose ``emit`` raises (logging catches errors only in its
    own handlers' ``emit``), a filter that raises, a record factory that fails. Such a failure
    loses the line, never the unit of work the line is about (raised there, it would have
    turned a retry into a give-up, and a COMMIT verified as done into an error its caller
    would take for a failure and run again)."""
    with contextlib.suppress(Exception):  # (nowhere left to say so)
        logger.log(level, message, *args, **kwargs)


def debug_failure(
    logger: logging.Logger,
    message: str,
    *args: object,
    texts: bool = True,
    after: BaseException | None = None,
) -> None:
    """``logger.debug(message, *args)`` followed by :func:`failure_detail` of the error being
    handled: what ``exc_info=True`` would add, without the values a database error quotes
    (``texts`` False: without any error's text; ``after``: the error it came after, shown
    first when its chain does not hold it). Never raises (:func:`log_quietly`)."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    exc = sys.exc_info()[1]
    if exc is None:
        log_quietly(logger, logging.DEBUG, message, *args)
    else:
        detail = failure_detail(exc, texts=texts, after=after)
        log_quietly(logger, logging.DEBUG, f"{message}\n%s", *args, detail)
