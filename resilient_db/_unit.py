"""What the sync and async sessions share: the session class, engine hooks and the pure
decisions about a unit of work (did it write? what does a lost COMMIT mean?).

Nothing here awaits or sleeps; ``_session`` and ``_asyncio`` are the drivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import ctypes
import difflib
import enum
import functools
import inspect
import logging
import secrets
import select
import socket
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, NoReturn, Protocol, TypeVar

import psycopg
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.pool import AssertionPool, QueuePool, SingletonThreadPool, StaticPool

from ._classify import (
    DEFAULT_CLASSIFIER,
    HOT_STANDBY_FIX,
    ONE_SESSION_ENDED_CODES,
    PROTOCOL_VIOLATION,
    READ_ONLY_SQLSTATE,
    Classifier,
    Outcome,
    answer_timed_out,
    answered_takes_writes,
    client_state_broken,
    debug_failure,
    fenced_server_of,
    hot_standby_server,
    interrupted_commit,
    log_quietly,
    mark_hot_standby,
    mark_outcome,
    mark_partly_committed,
    mark_refused_unsure,
    mark_replay_safe,
    marked_replay_safe,
    refused_by_a_writable_server,
    refused_in_pipeline,
    socket_given_up,
    sqlstate_of,
    text_mark,
    unanswered_commit,
)
from ._commit import (
    CLAIM_HORIZON,
    INSTALLED_AGAIN,
    MARKERS,
    UNMARKED,
    XID,
    XID_STATUS_ALONE_SQL,
    XID_STATUS_SQL,
    CommitProtocol,
    CommitRequest,
    CommitTicket,
    Fence,
    PastCommit,
    UnprovenCommit,
    claim,
    end_check,
    end_listeners_transaction,
    note_savepoints,
    prune,
    replication_wait_within,
    stall_cut,
    takes_writes_asked,
    time_left,
    warnings_into,
    wrote_past_commit,
)
from ._config import Config, factory_config, register_default_user, reloaded_since
from ._errands import LookFailed, NotStarted, ProcessExiting, Sweep
from ._errors import CircuitOpenError, CommitOutcomeUnknownError, IllegalTransitionError
from ._internals import (
    asyncpg_abort_socket,
    asyncpg_socket_fd,
    commit_flushes,
    commit_returned,
    committed_unclosed,
    engine_of_options,
    event_keys,
    fire_after_commit,
    forget_event_keys,
    prime_class_listeners,
    psycopg_notify_handler,
    session_binds,
    transaction_committed_unclosed,
    transaction_connections,
)
from ._internals import last_do_connect as _last_do_connect
from ._observability import (
    LineLimit,
    emit,
    log_session,
    more_since,
    stats_for,
    unfit_label,
)
from ._registry import factory_of, in_unit, register_class
from ._retry import Policy, add_note_once, past_deadline
from ._services import DEFAULT_SERVICE, say_databases_sharing
from ._state import STATE, hooks_of
from ._statements import (
    COMMITS,
    COMMITS_INSIDE,
    COMMITS_MIDWAY,
    UNIT_CONTEXT,
    SavedNote,
    committing_request,
    current_attempt,
    current_request,
    dropin_block,
    isolation_unsure,
    library_work,
    lost_commit_while_off,
    note_dialect_calls,
    own_work,
    refused_unsure_here,
    running_attempt,
    verdict_of,
    wrap_dialect_calls,
)
from .transitions._dbmap import exception_from_db
from .transitions._flush import guard_for_commit_protocol
from .transitions._guards import install_guard
from .transitions._sql import TRANSITION_SQLSTATE

T = TypeVar("T")


class ActiveUnit(NamedTuple):
    """The unit of work running in this thread or asyncio task."""

    factory: Any
    session: Any
    #: a sync unit's thread (``threading.get_ident()``; under gevent, its greenlet's), whose
    #: context holds it (see :func:`unit_here`); None: an async unit's, kept by its task
    thread: int | None = None


# Sync units: the unit running in the current thread (or greenlet, under gevent).
current_unit: contextvars.ContextVar[ActiveUnit | None] = contextvars.ContextVar(
    "resilient_db_unit", default=None
)
# Async units, by task. Not a ContextVar, which a task created inside a unit would inherit: such
# a task runs units of its own, since an AsyncSession must not be shared between tasks.
async_units: dict[Any, ActiveUnit] = {}


def unit_here(active: ActiveUnit) -> bool:
    """Whether ``active``, a unit this context holds, is running here: a thread given a copy
    of a sync unit's context (``copy_context().run``, a thread pool that carries context, a
    Python whose threads inherit it) holds the unit as it did, as does a copy kept past the
    unit's end. Work there is not the unit's (a ``Session`` is no more for two threads than
    for two tasks, and an ended unit's closed session would begin again, never committed): it
    runs units of its own, as a task created inside an async unit does. Only read where a
    unit is held: never on a unit's path outside another one."""
    if active.thread is None:  # an async unit's, by its task (see _asyncio._TaskUnit)
        return True
    return active.thread == threading.get_ident() and active.session in STATE.unit_sessions


def unit_signature(fn: Any) -> inspect.Signature | None:
    """The signature of ``fn`` without its first parameter (the session a unit is given), or
    None when ``fn``'s can't be read or takes no positional parameter first."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable without one (some built-ins)
        return None
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in _POSITIONAL:
        return None
    return signature.replace(parameters=parameters[1:])


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def runs_once_here() -> bool:
    """Whether an operation starting here must run once, with no retries of its own: inside a
    unit of work (this thread's, or this asyncio task's), whose transaction can't be retried
    from its middle, or inside an operation that replays a failed attempt whole (retry loops
    would multiply). The enclosing one retries."""
    unit = current_unit.get()
    if unit is not None and unit_here(unit):
        return True
    attempt = current_attempt.get()  # (a task made inside an operation inherits it: running?)
    if attempt is not None and attempt.running and attempt.replayed:
        return True
    if not async_units:
        return False
    try:
        return asyncio.current_task() in async_units
    except RuntimeError:  # no event loop running in this thread
        return False


def end_committed_transactions(session: Session, request: CommitRequest) -> None:
    """A unit's COMMIT whose answer was lost was proved committed: the transaction of each
    connection it began on still holds that COMMIT, failed (SQLAlchemy ends it only at a
    rollback): a bound ``Connection``'s own, which the factory's next unit could not begin
    past ("already initialized a SQLAlchemy Transaction()"). For a unit's own session, which
    is closed next, end those, and nothing else: no session rollback, whose events
    (``after_rollback``) would speak of work that is committed. Its ``after_commit``
    listeners are told, as for any commit (an outbox, a cache invalidation: the work is
    committed), once, and then its objects are expired as a commit expires them
    (``expire_on_commit``, the default): the objects the unit returns come back as from a
    COMMIT that was answered, not holding what the attempt flushed (a server default or a
    trigger's change missing). (A ``run_in`` session is left as a failed COMMIT leaves it,
    for its caller to roll back, which ends them, with the caller's objects kept.)"""
    for connection, _ in request.connections():
        transaction = connection.get_transaction()
        if transaction is not None and not transaction.is_active:
            transaction.close()  # (inactive: no I/O)
    # as SessionTransaction.commit calls them (tests/test_session.py checks they are called),
    # then expires the session's objects (tests/test_unit_results.py)
    fire_after_commit(session)
    if session.expire_on_commit:
        session.expire_all()  # (no I/O)


def joins_callers_transaction(session: Any) -> tuple[tuple[Any, bool], ...]:
    """The connections ``session`` (a sync ``Session``) is bound to that are in a transaction
    their caller began, each with whether the session joins it through a savepoint. Without
    one (``join_transaction_mode`` ``"rollback_only"``, ``"control_fully"``, or the default
    ``"conditional_savepoint"`` outside a savepoint), a failed attempt's rollback rolls the
    caller's whole transaction back (its work before the unit is gone), and a replay would
    begin and commit a transaction of its own on the connection. With one
    (``"create_savepoint"``, SQLAlchemy's recipe) the unit's work is a savepoint, and
    replayed, unless the connection was lost with the caller's transaction. A few attribute
    reads for a session bound to an engine: every unit passes here."""
    bind = session.bind
    binds = session_binds(session)
    if not binds and not isinstance(bind, Connection):
        return ()
    mode = session.join_transaction_mode
    return tuple(
        (
            candidate,
            mode == "create_savepoint"
            or (mode == "conditional_savepoint" and candidate.in_nested_transaction()),
        )
        for candidate in (getattr(given, "sync_connection", given) for given in (bind, *binds))
        if isinstance(candidate, Connection) and candidate.in_transaction()
    )


def commits_in_callers_transaction(joined: tuple[tuple[Any, bool], ...], request: Any) -> bool:
    """Whether a unit's COMMIT (``request``'s) ends nothing on the server: every connection its
    transaction began on is one it joined in its caller's transaction (``joined``, see
    :func:`joins_callers_transaction`), where its commit releases a savepoint or leaves the
    transaction to the caller. Its failure is then the connection's, never a lost COMMIT answer
    (nothing can have committed: the caller's transaction holds it all), whether the
    connection is marked or not (one checked out before the engine had a resilient factory,
    as SQLAlchemy's test recipe does, is not)."""
    connections = request.connections()
    if not connections:
        return False  # (not known: a session class that does not listen)
    ours = {connection for connection, _ in joined}
    return all(connection in ours for connection, _ in connections)


def joined_callers_transaction(joined: tuple[tuple[Any, bool], ...], record: Any) -> str | None:
    """Why a failed attempt must not be replayed: it began on one of the ``joined`` connections
    (:func:`joins_callers_transaction`; ``record``: its ``AttemptRecord``, which saw where it
    began) without a savepoint, so its rollback ends its caller's transaction; or with one on
    a connection that lost the caller's transaction (the connection was lost: a replay would
    only meet SQLAlchemy's PendingRollbackError). None: a replay is the unit's alone."""
    used = {connection for _, connection, _, _ in record.began or ()}
    for connection, savepoint in joined:
        if connection not in used:
            continue
        if not savepoint:
            return (
                "it joined the transaction its caller began on a Connection it is bound to, "
                "which its rollback ended; bind it with join_transaction_mode="
                "'create_savepoint' to have it replayed"
            )
        outer = connection.get_transaction()
        if connection.invalidated or outer is None or not outer.is_valid:
            return (
                "the Connection it is bound to lost the transaction its caller began there "
                "(the connection was lost): the caller must roll back and begin again"
            )
    return None


def check_service_name(service: object, where: str) -> None:
    """Refuse a service name that can't be one: not a str (``TypeError``), empty, blank, with a
    space at an end or not valid UTF-8 text (``ValueError``). A service name is shared by name
    (Redis keys, metrics labels, log lines): one that is not valid UTF-8 text (a lone
    surrogate, as ``os.environ`` gives for a byte that is not UTF-8) can't be sent anywhere,
    and failed only later, in the shared breaker's link."""
    if not isinstance(service, str):
        raise TypeError(f"{where} needs a service name (a non-empty str), got {service!r}")
    if not service:
        raise ValueError(f"{where} needs a service name (a non-empty str), got ''")
    # Log lines and hook events carry names escaped and cut (see _observability._escaped),
    # health() and metrics as given: a name either would change had two labels, one that
    # can't be joined to the other (a retry ratio by service, a hook's health() lookup).
    # A blank name says nothing in a log line (``service=  disconnect``); one with a space at
    # an end (a variable set with a stray space) is a service of its own, a second breaker and
    # Redis key for the same database, whose lines look like the other's.
    if not service.strip():
        raise ValueError(
            f"service name {service!r} is blank: it names the service in log lines and "
            "metrics labels; give a name such as 'orders-db'"
        )
    if service != service.strip():
        raise ValueError(
            f"service name {service!r} begins or ends with a space: it would be a service of "
            f"its own, apart from {service.strip()!r}, with log lines looking like that one's; "
            f"give {service.strip()!r}"
        )
    problem = unfit_label(service, MAX_SERVICE_NAME)
    if problem is not None:
        raise ValueError(
            f"service name {problem}: it is a field of log lines, a metrics label and a Redis "
            "key, as it is; use printable text"
        )


#: the longest service name (a metrics label, a Redis key, a field of every log line)
MAX_SERVICE_NAME: Final = 200


def admitted_by(breaker: Any) -> bool:
    """Whether ``breaker`` let the attempt running here through: a call made inside an
    operation or a unit of the same service (a drop-in session's connect in a decorated
    handler, a decorated helper or a unit called from one). Such a call is not put to the
    breaker again: half-open, it would be refused (the enclosing attempt holds the probe
    slot, and the breaker would never close), and its outcome is the enclosing attempt's,
    which the breaker counts."""
    if breaker is None:
        return False
    attempt = current_attempt.get()
    return attempt is not None and attempt.running and attempt.breaker is breaker


def part_of_running(policy: Policy) -> Any:
    """The attempt running here that a call of ``policy`` is part of, or None: one that
    ``policy``'s breaker let through (see :func:`admitted_by`); with no breaker to ask
    (switched off, ``use_circuit_breaker=False``), one of ``policy``'s service, by its name.
    Either way its outcome and its attempt are that one's, counted once (``attempts``, and
    with them the retry budget's first attempts)."""
    attempt = running_attempt()
    if attempt is None:
        return None
    breaker = policy.breaker
    if breaker is not None:
        return attempt if attempt.breaker is breaker else None
    return attempt if attempt.service == policy.service else None


def attempt_of(policy: Policy, attempt: Any) -> bool:
    """Whether ``attempt`` (an :class:`~._commit.AttemptRecord`) is an attempt made by
    ``policy``: for a factory's policy, an attempt of one of its units (a task made inside the
    unit inherits it as ``current_attempt``)."""
    return getattr(attempt, "_policy", None) is policy  # (the policy the record was made with)


class CommitVerdict(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "not committed"
    IN_PROGRESS = "in progress"
    #: committed on the server the check reached, not proven on its synchronous standbys
    UNREPLICATED = (
        "committed on the primary, not proven replicated to its synchronous standby: a "
        "failover may lose it"
    )
    UNKNOWN = "unknown"

    @property
    def final(self) -> bool:
        """Whether a check answering this ends the checking (else the next check may know)."""
        return self not in (CommitVerdict.IN_PROGRESS, CommitVerdict.UNREPLICATED)


def flush_and_commit(
    session: Session,
    request: CommitRequest,
    protocol: CommitProtocol | _UnboundProtocol,
    prune_after: Callable[[CommitProtocol | _UnboundProtocol, CommitRequest], None],
) -> None:
    """End a unit of work: flush and commit, the COMMIT marked by the commit protocol.

    Plain sync code for both drivers (the async one runs it in one ``run_sync`` greenlet hop).
    ``request`` (the caller's, so that a failed COMMIT can be settled) gathers what the COMMIT
    carried. Expired markers are pruned now and then, after a successful commit: through
    ``protocol`` (the factory's engine's), or for a factory without an engine of its own (its
    session class picks the engines, see :meth:`FactoryCore._route_engines`; its protocol
    is :data:`_UNBOUND_PROTOCOL`) through the protocol of the engine the unit's COMMIT went to.
    ``prune_after`` does it: the sync factory's :func:`prune_quietly`, inline; the async
    factory's starts a task of its own (``_asyncio._prune_in_task``), so that nothing of the
    prune runs on the unit's task: a deadline or a cancellation of the unit arriving then
    would turn the committed unit into a failure for its caller.

    Without autobegin (``autobegin=False``), a unit whose own code ended the transaction ``run``
    began for it (``session.commit()`` in ``fn``) has nothing left to commit: ``commit()`` would
    raise there, and the unit would be reported failed though its work is committed.
    """
    if commit_flushes(session):
        # a before_commit listener (or your class's own commit) sees the changes before they
        # are flushed, as under plain SQLAlchemy: the flush and the COMMIT step come in
        # commit(), after them (see _commit_after_your_listeners)
        _commit_after_your_listeners(session, request)
    else:
        session.flush()  # a failure here sent no COMMIT: the unit may simply be replayed
        request.transaction = session.get_transaction()
        if request.transaction is None and not session.autobegin:
            return  # nothing left to commit (see above)
        request.attempt = current_attempt.get()
        request.committing = True
        token = current_request.set(request)
        try:
            session.commit()
        except Exception:
            _raised_by_commit(request)
            raise
        finally:
            current_request.reset(token)
            request.ended = True  # (for a context copied meanwhile: see CommitRequest.ended)
    if request.warned:
        _answered_with_a_warning(request)
    if request.tickets and request.tickets[-1].mode == MARKERS and protocol.prune_due():
        prune_after(protocol, request)


def _raised_by_commit(request: CommitRequest) -> None:
    """The unit's ``session.commit()`` raised: after every COMMIT returned (a listener of
    yours), the unit is committed (``request.answered``, see ``_attempt``)."""
    prepared = request.two_phase
    request.answered = commit_returned(
        request.transaction,
        prepared_committed=prepared is not None
        and len(request.two_phase_commits or ()) == len(prepared),
    )


def _commit_after_your_listeners(session: Session, request: CommitRequest) -> None:
    """:func:`flush_and_commit` of a session with a ``before_commit`` listener, or whose class
    has its own ``commit``: ``commit()`` calls the listeners, then a listener of the session's
    own registered here, which runs after them (SQLAlchemy calls a session's own listeners
    after its class's, in the order they were added: this one is added last), flushes, and
    starts the COMMIT step there. Until then the unit's request is not the context's: a
    drop-in session that commits in the listeners (an audit row) is the unit's code
    committing part of its work, not the unit's own COMMIT; a failure there sent no COMMIT."""
    if session.get_transaction() is None:
        if not session.autobegin:
            session.flush()  # (changes with no transaction: refused, as flush_and_commit's)
            return  # nothing left to commit (see flush_and_commit)
        session.begin()  # the transaction commit() would begin (no I/O), to be known now
    request.transaction = session.get_transaction()
    request.attempt = current_attempt.get()
    target = getattr(session, "sync_target", session)  # (an async class's stand-in: its own)
    tokens: list[contextvars.Token[CommitRequest | None]] = []

    def committing(listened: Session) -> None:
        if tokens or listened.in_nested_transaction():
            return  # (a savepoint released in your listeners: not the unit's COMMIT step)
        listened.flush()  # a failure here sent no COMMIT: the unit may simply be replayed
        request.committing = True
        tokens.append(current_request.set(request))

    event.listen(target, "before_commit", committing)
    try:
        session.commit()
    except Exception:
        if tokens:
            _raised_by_commit(request)
        raise
    finally:
        event.remove(target, "before_commit", committing)
        if tokens:
            current_request.reset(tokens[0])
            request.ended = True  # (as in flush_and_commit)


class _UnboundProtocol:
    """The commit protocol of a factory without an engine of its own: nothing but the prune's
    question, always due, answered by the engine the unit's COMMIT went to (see
    :func:`claim_prune`). (Every writing unit asks: its question is one call, as a bound
    factory's protocol's.)"""

    @staticmethod
    def prune_due() -> bool:
        return True


_UNBOUND_PROTOCOL: Final = _UnboundProtocol()


def _answered_with_a_warning(request: CommitRequest) -> None:
    """A COMMIT that wrote was answered with success and a WARNING (see
    :class:`~._commit.UnprovenCommit`), now that every connection's COMMIT has returned: raise
    :class:`~._commit.UnprovenCommit`. A unit on one connection is settled as a lost answer
    (done once a check proves it, run again if the check finds it not committed where it
    looks, unknown otherwise); one whose transaction spans several connections is committed on
    each and can't be replayed: the one COMMIT answered with a warning is checked in its own
    database (done once proven; raised, not replayed, if not committed there), and several
    answered so are unknown, since a check proves one (see ``CommitReferee._spread``). A
    two-phase unit's COMMIT PREPAREDs answered so (``request.two_phase_warned``) are each
    proven on a new connection to its database, as the factory's own COMMIT PREPARED
    finishing a unit is (see ``CommitReferee.two_phase_pending``)."""
    if request.two_phase_warned:
        raise UnprovenCommit(request.two_phase_warned[-1][1])
    warned = [t for t in request.tickets if t.warned is not None and t.wrote and not t.done]
    if warned:
        raise UnprovenCommit(str(warned[-1].warned))


def commit_plainly(session: Session) -> None:
    """End a unit of work with self-healing off: COMMIT (and its flush) as plain SQLAlchemy does,
    nothing marked and nothing to verify (with it on, :func:`flush_and_commit` ends the unit).

    An enclosing unit of another factory, with self-healing on, is told that this one may have
    written: replaying it would run this committed unit again (without markers, a read-only
    COMMIT can't be told apart)."""
    if session.get_transaction() is None and not session.autobegin:
        session.flush()  # (changes with no transaction: refused)
        return  # as in flush_and_commit
    session.commit()  # (its flush: after the before_commit listeners, as plain SQLAlchemy's)
    enclosing = current_attempt.get()
    if enclosing is not None:
        enclosing.committed = True


def claim_prune(
    given: CommitProtocol | _UnboundProtocol, request: CommitRequest
) -> CommitProtocol | None:
    """The protocol whose prune the unit that made ``request`` runs now, its interval claimed
    (see ``CommitProtocol.pruned``): ``given``, or for a factory without an engine of its own
    that of an engine the unit's COMMIT went to whose prune is due. None when none is, or
    when a prune of that engine is still running (an async factory's, in its task)."""
    if isinstance(given, _UnboundProtocol):
        # the protocol of an engine the unit's COMMIT went to whose prune is due
        hooks = (hooks_of(c.engine) for c, _ in request.connections())
        due: list[CommitProtocol] = [
            h.commit for h in hooks if h is not None and h.commit.prune_due()
        ]
        if not due:
            return None
        given = due[-1]
    protocol: CommitProtocol = given
    if protocol.pruning is not None or not protocol.pruned():
        return None
    if not _connection_at_hand(protocol.engine.pool):
        log_quietly(
            log_session,
            logging.DEBUG,
            "pruning commit markers put off: no idle connection in the engine's pool",
        )
        return None  # (its interval claimed: tried again at the next one)
    return protocol


def _connection_at_hand(pool: Any) -> bool:
    """Whether the prune can have a connection of ``pool`` without waiting for one: a
    ``QueuePool`` (the async engines' too) with an idle connection, or a pool that never makes
    a checkout wait. The prune is housekeeping: it must not wait the pool's ``pool_timeout``
    (30 s by default) for a connection that units are waiting for (a sync unit's caller would
    wait with it, its work committed), nor take its turn from them. Right after a unit's
    COMMIT its own connection is back in the pool, so there is one, unless a unit waiting
    took it (a pool in full use) or the factory is bound to a connection of its own. A pool
    holding fewer connections than its ``pool_size`` makes a new one without waiting (a
    factory bound to the one connection an engine has made so far, its pool otherwise
    unused: before, its markers were never pruned while it was bound)."""
    return not isinstance(pool, QueuePool) or pool.checkedin() > 0 or pool.overflow() < 0


def one_connection_pool(pool: Any) -> bool:
    """Whether ``pool`` hands every checkout the same connection (``StaticPool``) or refuses
    a second one while the first is out (``AssertionPool``): the async factory's prune can't
    run in a task of its own beside the application's next unit there (the two would share
    that one connection, or the unit's checkout would fail), so it runs inline, as the sync
    factory's does (see ``_asyncio._prune_in_task``)."""
    return isinstance(pool, (StaticPool, AssertionPool))


def prune_quietly(given: CommitProtocol | _UnboundProtocol, request: CommitRequest) -> None:
    """The sync factory's prune after a unit's COMMIT: inline, in a short transaction of its
    own on another connection of the engine. (An interruption arriving meanwhile, a
    ``KeyboardInterrupt``, could as well arrive anywhere else after the COMMIT: the unit's
    line says it is committed, and the interruption is marked so, for a web answer that tells
    the client not to resubmit it: see ``CommitReferee.interrupted``.)"""
    protocol = claim_prune(given, request)
    if protocol is not None:
        prune_claimed(protocol)


def prune_claimed(protocol: CommitProtocol) -> None:
    """Run the prune ``protocol``'s caller claimed (see :func:`claim_prune`), inline."""
    try:
        with library_work(), protocol.engine.connect() as conn:  # (not the unit's DELETE)
            count = prune(conn)
    except Exception as exc:
        prune_failed(protocol, exc)
    else:
        pruned(protocol, count)


def pruned(protocol: CommitProtocol, count: int) -> None:
    """A prune deleted ``count`` expired markers."""
    protocol.prune_left(count)
    log_quietly(log_session, logging.DEBUG, "pruned %d expired commit markers", count)


def prune_failed(protocol: CommitProtocol, exc: Exception) -> None:
    """A prune failed: the unit is done; the prune is retried at the next interval."""
    debug_failure(log_session, "pruning commit markers failed")
    if sqlstate_of(exc) == "42501":
        protocol.prune_refused()


def read_committed(connection: Connection) -> None:
    """Set a check's ``connection`` to READ COMMITTED, whatever its engine's level: the claim
    must see a COMMIT that lands meanwhile. What a listener of the application's left open on
    it is ended first (see :func:`~._commit.end_listeners_transaction`: a ``checkout``
    listener's, or a ``connect`` listener's registered after the factory)."""
    end_listeners_transaction(connection.connection.dbapi_connection)
    connection.execution_options(isolation_level="READ COMMITTED")


def check_commit(
    connection: Connection, ticket: CommitTicket, left: float | None = None
) -> CommitVerdict:
    """One check of ``ticket``'s lost COMMIT answer on a new ``connection`` (READ COMMITTED),
    in a transaction of its own: the marker's claim, or the fallback's xid status.

    "Committed" is a verdict only once it is durable as the server promises: where
    synchronous replication is in effect, the check's transaction writes WAL past the unit's
    commit record and its own COMMIT must be answered plainly (at ``on`` at least) within
    the check's wait (:func:`~._commit.replication_wait_within`: growing with each check, cut
    to the ``left`` seconds before the deadline; :func:`~._commit.end_check`); else the unit
    is committed on the primary only, as far as anyone can tell: ``UNREPLICATED`` (a failover
    to a standby that never had it would lose it)."""
    with connection.begin():
        # (psycopg: a server that stops answering, a frozen one, cuts the check off as a lost
        # connection; its COMMIT has a cut of its own, see end_check)
        with stall_cut(connection):
            if ticket.mode == MARKERS:
                status = claim(connection, ticket)
                verdict = interpret_claim(status)
                if verdict is CommitVerdict.UNKNOWN:
                    ticket.unknown_why = _CLAIM_UNKNOWN.get(status or "", _CLAIM_UNKNOWN[""])
                elif verdict is CommitVerdict.ABORTED and ticket.xid is not None:
                    # no marker, but the xid was read too: a notification in a transaction that
                    # may have been read-only, where none is written (see _commit._commit_plan).
                    # The fence is in: a transaction that could write its marker never commits now
                    row = connection.execute(_xid_status(ticket), {"xid": ticket.xid}).one()
                    verdict = _xid_verdict(ticket, row[0], row[1])
            else:
                row = connection.execute(_xid_status(ticket), {"xid": ticket.xid}).one()
                verdict = _xid_verdict(ticket, row[0], row[1])
            past = None
            if verdict is CommitVerdict.COMMITTED:
                past = wrote_past_commit(connection, _whose(ticket))
        if _end_proof(connection, ticket, past, left):
            return verdict
    # the check's COMMIT proves nothing (a fence not known committed: check again)
    return CommitVerdict.UNREPLICATED if past is not None else CommitVerdict.IN_PROGRESS


class _Proven(Protocol):
    """What is proven by checks that write WAL past a commit: a lost COMMIT's ticket, a
    two-phase unit's prepared transaction being finished (:class:`Finishing`)."""

    proofs: int
    unserved_standby_names: str | None


def _end_proof(
    connection: Connection, proven: _Proven, past: PastCommit | None, left: float | None
) -> bool:
    """End the check's transaction on ``connection`` (:func:`~._commit.end_check`); where it
    wrote WAL past the commit it found (``past``: synchronous replication in effect), its
    COMMIT must be confirmed within the wait of ``proven``'s next proof (growing with each,
    cut to the ``left`` seconds before the deadline). True when ended so, or with nothing to
    prove; else ``proven`` notes whether any standby was there to confirm it."""
    proving = past is not None
    wait = replication_wait_within(proven.proofs, left)
    if proving:
        proven.proofs += 1
    if end_check(connection, proving=proving, wait=wait):
        return True
    if past is not None:
        proven.unserved_standby_names = past.standby_names if past.senders == 0 else None
    return False


def _xid_status(ticket: CommitTicket) -> Any:
    """The check of ``ticket``'s xid: without the incarnation when none was read (its role
    may not read it: "committed" can't be trusted anyway, and asking would be refused)."""
    return XID_STATUS_SQL if ticket.incarnation is not None else XID_STATUS_ALONE_SQL


#: why a claim's answer leaves the outcome unknown (by the answer; "": any other)
_CLAIM_UNKNOWN: Final = {
    "expired": (
        f"its commit marker is more than {CLAIM_HORIZON:g} s older than the newest one, past "
        "what a check may judge: it may have been pruned, so its absence proves nothing (the "
        "check came late, or a client's clock was ahead when it wrote a marker)"
    ),
    INSTALLED_AGAIN: (
        "the commit markers were uninstalled and installed again (or their table made again) "
        "after this COMMIT was sent: its marker may have gone with the old table, so its "
        "absence from the new one proves nothing"
    ),
    # (the function's own "unknown": the marker missing and dated before the table was made
    # by the server's reckoning, which this host's clock may not share; or found, then gone)
    "unknown": (
        "its commit marker was not found and could not be judged: dated before the markers' "
        "table was made (this host's clock against the server's), or deleted while the check "
        "looked"
    ),
    "": "the check's claim gave no answer",
}


def _xid_verdict(
    ticket: CommitTicket, incarnation: str | None, status: str | None
) -> CommitVerdict:
    """:func:`interpret_xid`, noting on ``ticket`` why an unknown one is unknown."""
    verdict = interpret_xid(ticket, incarnation, status)
    if verdict is CommitVerdict.UNKNOWN:
        if status != "committed":
            ticket.unknown_why = (
                f"the server could not say what became of its transaction id {ticket.xid} "
                f"(pg_xact_status: {status or 'no answer'}; an id this old is no longer kept)"
            )
        elif ticket.incarnation is None or incarnation is None:
            ticket.unknown_why = (
                f"its transaction id {ticket.xid} shows committed, but whether the server "
                "restarted since could not be read (pg_control_checkpoint() is not granted to "
                "the role), and after a crash an id can be given to another transaction"
            )
        else:
            ticket.unknown_why = (
                f"its transaction id {ticket.xid} shows committed, but the server restarted, "
                "recovered from a crash or was replaced by a standby since it was read, and "
                "may have given the id to another transaction"
                + ("" if ticket.mode == MARKERS else " (the commit markers' proof survives that)")
            )
    return verdict


def no_second_connection(engine: Engine) -> str | None:
    """Why no check on a new connection to ``engine`` can be made while the unit holds one of
    its connections (its own ``session.commit()`` midway lost its answer): the engine's pool
    would hand the check that very connection, dead, and the check's invalidation of it would
    pull it from under the unit (a ``StaticPool``, a ``SingletonThreadPool`` in the unit's
    thread). None: the pool has others to give."""
    pool = engine.pool
    if isinstance(pool, (StaticPool, SingletonThreadPool)):
        return (
            f"none could be made: the engine's {type(pool).__name__} has one connection, "
            "the unit's own"
        )
    return None


def interpret_claim(status: str | None) -> CommitVerdict:
    """Interpret ``resilient_db.claim_commit``."""
    if status == "committed":
        return CommitVerdict.COMMITTED
    if status == "fenced":
        return CommitVerdict.ABORTED
    return CommitVerdict.UNKNOWN  # "expired": the marker may have been pruned


def interpret_xid(
    ticket: CommitTicket, incarnation: str | None, status: str | None
) -> CommitVerdict:
    """Interpret the fallback's ``pg_xact_status`` of ``ticket.xid``.

    "aborted" and "future" (never assigned since a crash lost it) prove the unit did not commit.
    "committed" is the unit's own only if the server has not restarted, recovered from a crash
    or been replaced by a standby since the xid was read: otherwise the xid may have been reissued.
    """
    if status in ("aborted", "future"):
        return CommitVerdict.ABORTED
    if status == "in progress":
        return CommitVerdict.IN_PROGRESS
    if status == "committed" and incarnation is not None and incarnation == ticket.incarnation:
        return CommitVerdict.COMMITTED
    return CommitVerdict.UNKNOWN


_COMMIT_INTERRUPTED = "resilient_db_commit_interrupted"


def mark_commit_interrupted(interruption: BaseException, service: str) -> None:
    """Mark ``interruption`` (a unit's cancellation, ``KeyboardInterrupt``; or drop-in code's,
    see ``EngineHooks._commit_unanswered``) as having cut off a COMMIT that may have written,
    whose outcome is unknown (see :meth:`CommitReferee.interrupted`), with the unit's
    ``service``. It is raised as it is;
    the mark only tells a web handler meeting it, or the ``TimeoutError`` that
    ``asyncio.timeout`` or ``asyncio.wait_for`` raises from it, that the change may be saved
    (500 ``commit-outcome-unknown``, not a plain 500 that a client may resubmit after)."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(interruption, _COMMIT_INTERRUPTED, service)


def commit_interrupted(exc: BaseException) -> str | None:
    """The service of the unit (or drop-in code) whose COMMIT ``exc``, or an error it was
    raised from (the cancellation ``asyncio.timeout`` turned into ``TimeoutError``), cut off
    with its outcome unknown (see :func:`mark_commit_interrupted`); None when it is no such
    interruption."""
    return text_mark(exc, _COMMIT_INTERRUPTED)


_SAVED_THEN_INTERRUPTED = "resilient_db_saved_then_interrupted"


def mark_saved_then_interrupted(interruption: BaseException, service: str) -> None:
    """Mark ``interruption`` (a cancellation, ``KeyboardInterrupt``, ``SystemExit``, a
    ``BaseException`` timeout of gevent's) as having arrived after a COMMIT of ``service``
    succeeded: in the prune of expired markers that follows a unit's COMMIT, in the close of
    its session, or of a drop-in block's that saved a change (an async ``Session.begin()``, a
    sync session's ``with``), or in such a block's COMMIT step once the server answered it
    (see :meth:`CommitReferee.interrupted`). It is raised as it is;
    the mark only tells a web handler meeting it, or the ``TimeoutError`` that
    ``asyncio.timeout`` or ``asyncio.wait_for`` raises from it, that the change is saved (500
    ``saved-then-interrupted``, not a plain error that a client would resubmit after, writing
    it twice)."""
    with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
        setattr(interruption, _SAVED_THEN_INTERRUPTED, service)


def saved_then_interrupted(exc: BaseException) -> str | None:
    """The service of the COMMIT that succeeded before ``exc``, or an error it was raised from
    (the cancellation ``asyncio.timeout`` turned into ``TimeoutError``), interrupted the call
    (see :func:`mark_saved_then_interrupted`); None when it is no such interruption."""
    return text_mark(exc, _SAVED_THEN_INTERRUPTED)


def block_entered(session: Any) -> None:
    """A drop-in ``with`` (``async with``) block of ``session`` begins: a note of what it
    commits (``_statements.SavedNote``) becomes the block in progress. A session entered again
    inside its own block (``with session:`` in a helper) keeps the outer block's note, put back
    by :func:`block_left` when the inner block ends."""
    saved = SavedNote(dropin_block.get())
    session._rdb_block = (saved, dropin_block.set(saved), session.__dict__.get("_rdb_block"))


def block_left(session: Any) -> Any:
    """The note of ``session``'s drop-in block ending now (see :func:`block_entered`), the
    block around it in progress again; None for a block not noted (``Session.begin()``'s,
    which notes in a block of its own). Every drop-in block passes here: no context manager
    for the reset."""
    block = session.__dict__.pop("_rdb_block", None)
    if block is not None:
        if block[2] is not None:  # the inner block of a session entered again
            session._rdb_block = block[2]
        reset_block(block[1], block[0])
    return block


def reset_block(token: contextvars.Token[SavedNote | None], note: SavedNote) -> None:
    """End a drop-in block's note (``dropin_block.reset``), also for a block left in another
    thread, task or context than it was entered in (an async generator whose setup and
    teardown run in two tasks): there the context's own value stays, ``note`` (the block's)
    marked left, so that no block entered later in the context it was entered in encloses it,
    and nothing is raised after the block's COMMIT, or over its own error."""
    try:
        dropin_block.reset(token)
    except ValueError:  # (left in another thread, task or context)
        note.left = True  # (the context it was entered in still holds it: see SavedNote)


def interrupted_in_its_commit(block: Any, session: Session, kind: Any, value: Any) -> bool:
    """Whether the drop-in block ``block`` (see :func:`block_left`) of ``session`` (a sync
    session: an async session's ``sync_session``) ends with an interruption raised in a COMMIT
    step after the server answered a COMMIT that saved a change (an ``after_commit`` listener
    doing I/O, the transaction's close handing its connection back: see
    :func:`commit_step_unended`), not said yet (a unit run in the block, or a block inside it,
    may have)."""
    return (
        kind is not None
        and block[0].saved
        and not issubclass(kind, Exception)
        and commit_step_unended(session)
        and saved_then_interrupted(value) is None
    )


def commit_step_unended(session: Session) -> bool:
    """Whether the root transaction of drop-in code's ``session`` (a sync session) committed
    and its ``commit()`` has not ended: an interruption raised from it came after the server
    answered its COMMITs (:func:`~._internals.committed_unclosed`). Also once its close has
    begun: SQLAlchemy takes the transaction off its session first, then hands its connections
    back to the pool, whose reset may wait (psycopg 3.3 yields to the event loop there once
    the loop has been busy for 5 ms: a garbage collection, a loaded machine; a pool ``reset``
    listener may send a statement), and marks it closed only after. That transaction, no
    longer the session's, is the drop-in one that began last in this context
    (:data:`dropin_transaction`; alive here: the interruption's traceback holds its close).
    An interruption after that close ended (a wait of the block's own after ``commit()``
    returned) finds it closed."""
    if committed_unclosed(session):
        return True
    if session.get_transaction() is not None:
        return False  # (another one began since: the interruption is none of that COMMIT's)
    ref = dropin_transaction.get()
    closing = None if ref is None else ref()
    return (
        closing is not None
        and closing.session is session
        and transaction_committed_unclosed(closing)
    )


#: the drop-in blocks :func:`block_interrupted` names
SYNC_WITH: Final = "a with Session() or Session.begin() block"
ASYNC_WITH: Final = "an async with Session() block"


def block_interrupted(session: Session, interruption: BaseException, block: str) -> None:
    """A drop-in ``block`` of ``session`` (a sync session: an async session's
    ``sync_session``) committed a change, and ``interruption`` arrived after that COMMIT
    succeeded (as its session closed, or in the COMMIT's step once the server answered): said
    and marked as a unit's interruption after its COMMIT is (see
    ``CommitReferee.interrupted``), since its caller hears only the interruption, which a web
    handler would answer as a plain error. With self-healing off, nothing (plain SQLAlchemy)."""
    factory: Any = factory_of(session)  # (its class's, or the async factory that made it)
    if factory is not None and factory.config.enabled:
        interrupted_after_commit(
            factory.config,
            factory.service,
            interruption,
            f"a transaction of drop-in code ({block})",
        )


def interrupted_after_commit(
    config: Config, service: str, interruption: BaseException, whose: str, **fields: Any
) -> None:
    """``interruption`` arrived after ``whose`` COMMIT succeeded: marked (for a web answer) and
    said. (A unit's: see :meth:`CommitReferee.interrupted`; a drop-in block's that saved a
    change, an async ``Session.begin()`` or a sync session's ``with``, interrupted while its
    session closed or in its COMMIT's step once the server answered it: see
    ``_statements.SavedNote``.)"""
    mark_saved_then_interrupted(interruption, service)
    emit(
        config,
        log_session,
        logging.WARNING,
        "Commit interrupted: service=%s %s: interrupted (%s) after its COMMIT succeeded; it is "
        "committed: the interruption is raised as it is, and the change must not be done again",
        service,
        whose,
        type(interruption).__name__,
        service=service,
        event="commit_interrupted",
        outcome="committed",
        **fields,
    )


class CommitReferee:
    """Decides what a failed COMMIT means; the sync and async drivers do the I/O.

    A COMMIT that failed by disconnect (or 08007) may have been applied. When the unit may have
    written, the drivers settle it on a new connection at the times :meth:`checks` gives (a
    marker claim, or the fallback's xid status); :meth:`settle` turns the answer into
    "committed" (return normally), "not committed" (re-raise the original error: the unit may be
    replayed) or :class:`CommitOutcomeUnknownError`.
    """

    def __init__(self, policy: Policy, engine: Engine | None) -> None:
        self.policy = policy
        self.engine = engine  # the factory's: where a marker is looked up (None: not bound yet)
        self._standby_warned = False  # (see no_standby_connected)

    def _cut_off(self, exc: BaseException) -> bool:
        """Whether ``exc`` may have cut off a statement's answer: a disconnect, 08007, or the
        client that stopped waiting for it."""
        outcome = self.policy.classifier.classify(exc)
        return outcome in (Outcome.DISCONNECT, Outcome.COMMIT_UNKNOWN) or answer_timed_out(exc)

    def must_verify(self, exc: BaseException, request: CommitRequest) -> CommitTicket | None:
        """The ticket to settle: the COMMIT may have been applied and the unit may have written."""
        lost = (
            self._cut_off(exc)
            # answered with success and a warning (a cancelled wait for the synchronous
            # standbys): committed on the primary, not proven; settled as a lost answer
            or isinstance(exc, UnprovenCommit)
        )
        elsewhere = None  # the engine of the unit's one connection, when not the factory's
        if request.two_phase and not request.two_phase_commits:
            # a two-phase unit whose PREPARE step failed: no COMMIT PREPARED went out, so
            # nothing of it committed anywhere (the driver ended whatever a lost answer may
            # have left prepared, see two_phase_undecided): settled as any other error
            return None
        if request.committing:
            connections = request.connections()
            main = self.engine
            if len(connections) > 1 or (
                connections and (main is None or connections[0][0].engine.pool is not main.pool)
            ):
                if len(connections) > 1 or not connections[0][1]:
                    return self._spread(exc, request, connections, lost=lost)
                elsewhere = connections[0][0].engine  # marked: settled in its own database
            if _sent_nothing(request, connections):
                # the driver refused the COMMIT before sending it, as asyncpg does on a
                # connection the server had closed (terminated, or by its
                # idle_in_transaction_session_timeout) while the unit was between statements.
                # Nothing committed: the error is settled as any other (a lost connection is
                # replayed), not as an unknown outcome
                return None
        ticket = request.last
        if ticket is None or not ticket.wrote:
            return None  # COMMIT never sent, or nothing written: a replay can't write twice
        if not lost:
            return None  # the server answered with an error: it did not commit
        if elsewhere is not None:
            ticket.engine = elsewhere
        elif ticket.engine is None:
            # kept by the ticket: a configure(bind=...) while the checks back off moves the
            # factory, not the database this COMMIT went to (each check looked the factory's
            # engine up again, and the next ones went to the new one, where the unit never
            # ran: its marker or transaction id judged there)
            connections = request.connections() if request.committing else []
            ticket.engine = connections[0][0].engine if connections else self.engine
        return ticket

    def _spread(
        self,
        exc: BaseException,
        request: CommitRequest,
        connections: list[tuple[Any, bool]],
        *,
        lost: bool,
    ) -> CommitTicket | None:
        """A COMMIT failed in a unit whose transaction spans several connections (several
        engines, through ``binds``; a read/write split), or whose one connection is another
        engine's than the factory's and is not marked. SQLAlchemy commits a session's
        connections one by one, and in no set order, so part of such a unit may be committed
        for good. A lost answer, every connection marked, is settled part by part (see
        :class:`Split`): the ticket to check (in the database its COMMIT went to), or None
        when nothing is left to check; otherwise it raises
        :class:`CommitOutcomeUnknownError`. Another error: unless the failing COMMIT is
        provably the first that could commit anything (every connection marked, every earlier
        COMMIT read-only), it is raised as it is, marked partly committed. Returns None when
        the caller should go on as for one connection's COMMIT error.
        """
        warned = isinstance(exc, UnprovenCommit)
        if warned or lost:
            # (answered with a warning: committed on each, the warned one checked in its
            # database)
            split = Split.of(request, connections, warned=warned)
            if split is not None:
                return self._split(exc, request, split)
            databases = ", ".join(sorted({str(c.engine.url.database) for c, _ in connections}))
            if isinstance(exc, UnprovenCommit):
                what = f"a transaction on databases {databases}, committed on each"
                reason = (
                    f"COMMITs of its {len(connections)} connections were answered with a "
                    f"warning ({exc.warning}): not proven replicated, and not replayable"
                )
            else:
                what = f"a transaction on databases {databases}, part of which may be committed"
                reason = (
                    f"its transaction spans {len(connections)} connection(s), committed one "
                    f"by one{_left_prepared(request)}"
                )
            raise self._unknown(what, reason) from exc
        # every COMMIT that went out is a ticket when every connection is marked; one that
        # succeeded and wrote committed part of the unit
        marked = all(is_marked for _, is_marked in connections)
        if (
            not marked
            # answered (a warned one too: committed, only not proven replicated) and wrote
            or any((t.done or t.warned is not None) and t.wrote for t in request.tickets)
            # two-phase: an earlier COMMIT PREPARED committed (SQLAlchemy went on after it)
            or len(request.two_phase_commits or ()) > 1
        ):
            self.policy.partly_committed(
                exc, "on another connection of its transaction (whose COMMIT went out first)"
            )
        # else the server refused the first COMMIT that could write: nothing committed
        return None

    def _split(
        self, exc: BaseException, request: CommitRequest, split: Split
    ) -> CommitTicket | None:
        """A lost answer in a unit spanning several connections, every one marked: the ticket
        of its COMMIT to check, with the engine to check it in; or, when the COMMIT that lost
        its answer wrote nothing, what the other parts prove: every part that wrote committed
        (the unit is done: the last of their tickets, known committed, see :meth:`known`),
        none did (None: settled as any error, replayed when transient), or some did and some
        never will (None, ``exc`` marked partly committed: never replayed)."""
        request.split = split
        failing = split.failing
        if failing is not None:
            failing.engine = split.failing_engine
            return failing
        if split.committed and split.uncommitted:
            self.policy.partly_committed(exc, split.partly())
            return None
        if split.committed:
            return split.committed_tickets[-1]
        return None  # nothing that wrote was committed anywhere: as any error

    @staticmethod
    def known(request: CommitRequest, ticket: CommitTicket) -> CommitVerdict | None:
        """The verdict of a lost answer that needs no check: in a unit spanning several
        connections, one whose lost COMMIT wrote nothing while every COMMIT that wrote was
        answered (see :meth:`_split`), committed; a COMMIT that carried no marker (a connection
        the protocol can't mark: another driver, your own creator's), unknown: no check could
        find anything of it."""
        split = request.split
        if split is not None and split.failing is None:
            return CommitVerdict.COMMITTED
        if ticket.mode == UNMARKED:
            return CommitVerdict.UNKNOWN
        return None

    def checks(self) -> Iterator[float]:
        """The delay before each check: at once, then backing off, within the deadline."""
        for delay, _ends in self.timed_checks():
            yield delay

    def timed_checks(self) -> Iterator[tuple[float, float]]:
        """:meth:`checks`, each with the time (the policy's clock) its check must end by: the
        deadline (see :meth:`left`)."""
        cfg = self.policy.config
        started = self.policy.clock()
        ends = started + cfg.deadline
        yield 0.0, ends
        for attempt in range(1, cfg.max_retries + 1):
            delay = self.policy.delay(Outcome.DISCONNECT, attempt)
            if past_deadline(self.policy.clock() - started + delay, cfg.deadline):
                return
            yield delay, ends

    def left(self, ends: float) -> float:
        """Seconds left until ``ends`` (a time of :meth:`timed_checks`): a check's wait for the
        synchronous standbys is cut to it, so that the last check does not overrun the
        deadline by a whole (growing) wait."""
        return ends - self.policy.clock()

    def no_standby_connected(self, ticket: CommitTicket) -> None:
        """Say once per factory (a WARNING) that a check found synchronous replication in
        effect with no standby connected to confirm anything (``ticket``'s
        ``unserved_standby_names``): every writing COMMIT there waits until one connects, and
        a unit whose answer was lost can't be proven (it ends unknown, never done). PostgreSQL
        itself waits for ever there; nothing the client does can prove a commit no standby
        has, so this only names the setting, for the operator."""
        names = ticket.unserved_standby_names
        if names is None:
            return
        # looked at and marked at once: two units' checks ending together say it once
        with STATE.lock:
            if self._standby_warned:
                return
            self._standby_warned = True
        policy = self.policy
        emit(
            policy.config,
            log_session,
            logging.WARNING,
            "Synchronous replication without a standby: service=%s the server has "
            "synchronous_standby_names = %r but no standby connected (pg_stat_replication is "
            "empty), so every writing COMMIT waits for one, and a unit whose COMMIT answer was "
            "lost can't be proven replicated (it ends in CommitOutcomeUnknownError). If this "
            "server is a promoted standby, its synchronous_standby_names may still name the "
            "primary it replaced: set it to the standbys it has now (or to '' to stop waiting "
            "for any: ALTER SYSTEM SET synchronous_standby_names = ''; SELECT "
            "pg_reload_conf()), or start its standby",
            policy.service,
            names,
            service=policy.service,
            event="synchronous_standby_missing",
            synchronous_standby_names=names,
        )

    def keep_checking_after(self, ticket: CommitTicket, exc: BaseException) -> bool:
        """Whether to check again after ``exc`` (transient); else the outcome stays unknown,
        and ``ticket`` keeps why (a missing right names its SQLSTATE: nothing else would)."""
        code = sqlstate_of(exc)
        driver_error = exc.orig if isinstance(exc, sa_exc.StatementError) else None
        kind = type(driver_error if isinstance(driver_error, BaseException) else exc).__name__
        said = kind + (f" (SQLSTATE {code})" if code else "")
        outcome = self.policy.classifier.classify(exc)
        # the client stopped waiting for a check's statement (asyncpg's command_timeout; the
        # claim's own, past the server's bound on it): the server did not answer it, a stalled
        # server, as one whose connect timed out. Not a verdict: check again within the deadline
        if outcome.transient or answer_timed_out(exc):  # (an unknown outcome too)
            if not outcome.transient or outcome in (Outcome.DISCONNECT, Outcome.UNAVAILABLE):
                ticket.check_unreached = said  # the server did not answer the check
                ticket.checks_unreached += 1
            else:  # it did (a lock wait for a transaction still running ran out: 55P03)
                ticket.check_reached, ticket.check_unreached = True, None
            return True
        ticket.check_failed = said
        return False

    def settle(
        self,
        ticket: CommitTicket,
        verdict: CommitVerdict,
        exc: BaseException,
        request: CommitRequest,
    ) -> bool:
        """True: committed. False: not committed, re-raise ``exc`` (replayed when transient,
        unless part of a unit spanning several connections is committed for good: then marked
        partly committed). Otherwise raises."""
        policy = self.policy
        what = _whose(ticket)
        split = request.split
        if split is not None:
            if split.failing is None:  # (see known): nothing checked
                self._split_done(split)
                return True
            what = f"{what} (database {split.failing_engine.url.database})"
        if verdict is CommitVerdict.COMMITTED:
            policy.stats.add("verified_commits")
            if isinstance(exc, UnprovenCommit):
                how = (
                    "as a check on a new connection proved (its COMMIT was answered with "
                    f"{exc.warning})"
                )
            elif answer_timed_out(exc):
                how = "after the client stopped waiting for its answer"
            else:
                how = "before the connection was lost"
            emit(
                policy.config,
                log_session,
                logging.WARNING,
                "Commit outcome verified: service=%s %s committed %s; not replaying",
                policy.service,
                what,
                how,
                service=policy.service,
                event="commit_verified",
                marker=ticket.marker,
                xid=ticket.xid,
            )
            if split is not None and split.uncommitted:
                policy.partly_committed(exc, split.partly(failing_committed=True))
                return False
            return True
        if verdict is CommitVerdict.ABORTED:
            policy.stats.add("verified_not_committed")
            if isinstance(exc, UnprovenCommit):
                # answered with success, yet the check found no marker where it looked: a
                # failover to a server that never had the commit (or it held no xid: it wrote
                # nothing). Either way the unit is not committed there: run it again
                mark_replay_safe(exc)
                exc.args = (
                    f"{exc.args[0]}; a check on a new connection found the unit not committed "
                    "there (a failover to a server that never had it): it may be run again",
                )
            emit(
                policy.config,
                log_session,
                logging.WARNING,
                "Commit outcome verified: service=%s %s did not commit%s",
                policy.service,
                what,
                "" if split is not None and split.committed else "; it may be run again",
                service=policy.service,
                event="commit_not_applied",
                marker=ticket.marker,
                xid=ticket.xid,
            )
            if split is not None and split.committed:
                policy.partly_committed(exc, split.partly())
            return False
        reason = verdict.value
        if verdict is CommitVerdict.UNKNOWN and ticket.unknown_why is not None:
            reason = ticket.unknown_why
        if ticket.mode == UNMARKED:
            reason = "no check could tell whether it committed" + _left_prepared(request)
        elif ticket.check_failed is not None:
            reason = f"the check on a new connection failed: {ticket.check_failed}"
        elif ticket.check_unreached is not None and not ticket.check_reached:
            cfg = self.policy.config
            reason = (
                f"none of the {ticket.checks_unreached} check(s) on a new connection reached "
                f"the server (the verification makes at most {cfg.max_retries + 1}, one and "
                f"SELF_HEALING_MAX_RETRIES more, within SELF_HEALING_DEADLINE, {cfg.deadline:g} "
                f"s; the last one: {ticket.check_unreached})"
            )
        elif ticket.unserved_standby_names is not None:
            reason += (
                " (no standby is connected to the server, whose synchronous_standby_names is "
                f"{ticket.unserved_standby_names!r})"
            )
        if ticket.check_reached and ticket.check_unreached is not None:
            reason += f"; a later check could not reach the server ({ticket.check_unreached})"
        if ticket.warned is not None:
            reason += f"; its COMMIT was answered with {ticket.warned}"
        self.no_standby_connected(ticket)
        raise self._unknown(what, reason, marker=ticket.marker, xid=ticket.xid) from exc

    def done_before_last_commit(self, exc: BaseException, request: CommitRequest) -> bool:
        """Whether the unit is done although its final COMMIT failed with ``exc``: the unit's
        own code committed its work before (``session.commit()`` midway, answered, or a
        statement in autocommit: the attempt can't be replayed), the final COMMIT lost its
        answer (or never went out: the connection was lost), and the transaction it ended
        wrote nothing (every COMMIT of it read-only: held no xid; a connection whose COMMIT
        SQLAlchemy never sent after the failed one, one that may not have written) in an
        isolation level known not to be SERIALIZABLE (see :func:`isolation_of`). Committed or
        rolled back, that transaction changed nothing, and its reads stand either way (a
        read-only transaction can fail at COMMIT only under SERIALIZABLE, whose reads are
        then unproven): every write of the unit is committed.
        Said (as a verified lost answer) and counted; False otherwise, and nothing said."""
        attempt = request.attempt
        if (
            attempt is None
            or not attempt.unreplayable
            or attempt.prepared  # (left prepared by its code: not committed yet)
            or not request.committing
            or request.two_phase
            or request.two_phase_commits
            or not self._cut_off(exc)  # (an error answer: as any)
        ):
            return False
        drivers = request.drivers()
        tickets = request.tickets
        # none of the COMMITs that went out ended a transaction that wrote; the connections
        # whose COMMIT never went out (SQLAlchemy stops at a failing one) rolled back, which
        # loses nothing only where their transaction may not have written either (a ticket
        # that names no driver is a read-only one: its flag says so too)
        if not drivers or len(tickets) > len(drivers):
            return False
        if any(not t.sent or t.wrote for t in tickets):
            return False
        if len(tickets) < len(drivers):
            ticketed = {id(t.driver) for t in tickets if t.driver is not None}
            if any(
                getattr(driver, "_rdb_may_write", True)
                for _, driver in drivers
                if id(driver) not in ticketed
            ):
                return False
        levels = {isolation_of(connection, driver) for connection, driver in drivers}
        if None in levels or "SERIALIZABLE" in levels:
            return False
        policy = self.policy
        policy.stats.add("verified_commits")
        emit(
            policy.config,
            log_session,
            logging.WARNING,
            "Commit outcome verified: service=%s the unit is done: its COMMIT whose answer was "
            "lost ended a transaction that wrote nothing (isolation level %s: its reads stand "
            "either way), and what it wrote before was committed by its own code (a COMMIT "
            "that was answered); not replaying",
            policy.service,
            ", ".join(sorted(str(level) for level in levels)),
            service=policy.service,
            event="commit_verified",
            marker=None,
            xid=None,
        )
        return True

    def _split_done(self, split: Split) -> None:
        """The lost answer of a unit spanning several connections was a COMMIT that wrote
        nothing, and every COMMIT that wrote was answered: the unit is done (nothing checked)."""
        policy = self.policy
        policy.stats.add("verified_commits")
        last = split.committed_tickets[-1]
        emit(
            policy.config,
            log_session,
            logging.WARNING,
            "Commit outcome verified: service=%s a transaction on databases %s committed: "
            "every COMMIT of it that wrote was answered (%s), the one whose answer was lost "
            "wrote nothing; not replaying",
            policy.service,
            split.databases,
            split.committed,
            service=policy.service,
            event="commit_verified",
            marker=last.marker,
            xid=last.xid,
        )

    def interrupted(
        self, request: CommitRequest, interruption: BaseException, *, verifying: bool = False
    ) -> None:
        """The unit was interrupted (its task cancelled, ``asyncio.timeout`` or ``wait_for``
        around it, ``KeyboardInterrupt``) while its COMMIT was in flight, or while a lost
        answer was being settled (``verifying``). The interruption goes on as it is, at once:
        the COMMIT is neither verified nor replayed. Its caller hears only the interruption,
        so a line names the transaction (its marker stays :data:`~._commit.RETENTION`, for
        ``resilient_db.claim_commit``), as every self-healing action is logged. Nothing when
        no COMMIT that wrote went out.

        Interrupted after its COMMIT succeeded (in the prune of expired markers that follows it,
        in an ``after_commit`` listener, in the close of its session), the unit is committed:
        said so, and the interruption marked for a web answer (see
        :func:`mark_saved_then_interrupted`): a client told only "error" would resubmit it."""
        ticket = request.last if request.committing else None
        if ticket is None or not ticket.wrote or _sent_nothing(request, request.connections()):
            return
        policy = self.policy
        if ticket.done:  # answered: committed (the interruption came after it: see above)
            interrupted_after_commit(
                policy.config,
                policy.service,
                interruption,
                f"the unit ({_whose(ticket)})",
                marker=ticket.marker,
                xid=ticket.xid,
            )
            return
        how = (
            "while its lost COMMIT answer was being verified"
            if verifying
            else "with its COMMIT in flight"
        ) + "; outcome unknown, not verified, not replayed"
        policy.stats.add("unknown_commits")  # as a unit's unknown outcome is
        how += _left_prepared(request)
        mark_commit_interrupted(interruption, policy.service)  # (for a web answer)
        emit(
            policy.config,
            log_session,
            logging.ERROR,
            "Commit interrupted: service=%s %s: the unit was interrupted (%s) %s",
            policy.service,
            _whose(ticket),
            type(interruption).__name__,
            how,
            service=policy.service,
            event="commit_interrupted",
            outcome="unknown",
            marker=ticket.marker,
            xid=ticket.xid,
        )

    @staticmethod
    def two_phase_decided(request: CommitRequest) -> bool:
        """Whether ``request`` is a two-phase unit whose COMMIT PREPAREDs began: every database
        prepared, the unit decided to commit (its prepared transactions are never rolled back
        from here on)."""
        return bool(request.two_phase and request.two_phase_commits)

    def two_phase_pending(self, request: CommitRequest, exc: BaseException) -> list[Finishing]:
        """The prepared transactions a two-phase COMMIT cut off by ``exc`` may have left
        behind, when the unit had decided to commit (its first COMMIT PREPARED went out, so
        every database prepared): all but those whose COMMIT PREPARED the server answered.
        Empty otherwise.

        A prepared transaction outlives its connection and holds its locks until someone ends
        it; the unit's decision was to commit, so the driver commits each one still prepared
        (:func:`commit_if_prepared`), as a two-phase coordinator recovers. Only when the
        failed COMMIT PREPARED's outcome is unknown (a disconnect, 08007): one the server
        refused committed nothing there, and SQLAlchemy's rollback ends the others, as
        before.

        A COMMIT PREPARED of the unit's own answered with success *and a WARNING*
        (``request.two_phase_warned``: its wait for the synchronous standby cancelled) is
        committed on the primary alone: it is pending too, its ``warned`` set, so that the
        driver proves it as it proves one of its own answered so. When every COMMIT PREPARED
        was answered (``exc`` the :class:`~._commit.UnprovenCommit` raised after them), those
        are the pending ones."""
        if not request.two_phase or not request.two_phase_commits:
            return []
        warned = request.two_phase_warned or []
        if isinstance(exc, UnprovenCommit):
            return [
                Finishing(engine, xid, warned=warning)
                for engine, xid in request.two_phase
                for answered, warning in warned
                if answered == xid
            ]
        outcome = self.policy.classifier.classify(exc)
        if outcome not in (Outcome.DISCONNECT, Outcome.COMMIT_UNKNOWN):
            return []
        answered = request.two_phase_commits[:-1]  # SQLAlchemy goes on only after an answer
        pending = []
        for engine, xid in request.two_phase:
            warning = next((w for answered_xid, w in warned if answered_xid == xid), None)
            if warning is not None or xid not in answered:
                pending.append(Finishing(engine, xid, warned=warning))
        return pending

    @staticmethod
    def prepare_failure(exc: Exception, request: CommitRequest) -> Exception:
        """The error of a two-phase unit's failed PREPARE step: ``exc``, or psycopg's refused
        PREPARE, which its rollback hid (see :func:`_refused_prepare`). A server with prepared
        transactions disabled refuses it with 55000 (the server's only 55000 at PREPARE): the
        error gets a note saying what to set (asyncpg's message carries no hint of the
        server's)."""
        failure = _refused_prepare(exc, request) or exc
        if (
            request.two_phase
            and not request.two_phase_commits
            and sqlstate_of(failure) == PREPARED_TRANSACTIONS_DISABLED
        ):
            add_note_once(failure, _PREPARE_DISABLED_NOTE)
        return failure

    def two_phase_undecided(
        self, request: CommitRequest, exc: BaseException
    ) -> list[tuple[Engine, Any]]:
        """The prepared transactions a two-phase unit's failed PREPARE step may have left
        behind before it decided to commit (no COMMIT PREPARED went out): every one it began to
        prepare, when ``exc`` may have cut off an answer (a disconnect, 08007, the client
        giving up: a PREPARE the server carried out, or SQLAlchemy's ROLLBACK PREPARED of
        another, whose answer never came). Empty otherwise: every PREPARE was answered, and
        SQLAlchemy's rollback inside the commit ended those that had succeeded.

        Nothing of the unit is committed anywhere, and nothing will be: its decision is to
        abort. But a prepared transaction outlives its connection, holding its locks (a replay
        would wait on them) and its writes (an operator's COMMIT PREPARED would save them next
        to the replay's), so the driver rolls back each one still prepared
        (:func:`rollback_if_prepared`), as a two-phase coordinator that decided to abort."""
        if not request.two_phase or request.two_phase_commits:
            return []
        if not (self._cut_off(exc) or request.prepare_refused):
            return []
        return list(request.two_phase)

    def two_phase_interrupted(
        self, request: CommitRequest, interruption: BaseException
    ) -> list[tuple[Engine, Any]]:
        """A two-phase unit interrupted (cancelled, a deadline, ``KeyboardInterrupt``) in its
        PREPARE step, before it decided to commit: a PREPARE the server carries out after the
        client stopped waiting leaves a prepared transaction holding its locks, and no new
        connection is made while the interruption is delivered. So each PREPARE it began and
        did not see ended is looked for afterwards, in the background, and rolled back (see
        ``_errands``; :meth:`two_phase_swept` says the result): returned, and said now, once
        (a WARNING naming them, for an operator should the process stop first). Empty when
        there is nothing to look for, or it was handed over already."""
        if not request.two_phase or request.two_phase_commits or request.two_phase_handed:
            return []
        request.two_phase_handed = True
        ended = request.two_phase_ended or ()
        pending = [(engine, xid) for engine, xid in request.two_phase if xid not in ended]
        if pending:
            policy = self.policy
            emit(
                policy.config,
                log_session,
                logging.WARNING,
                "Ending a two-phase unit's prepared transactions: service=%s its PREPARE step "
                "was interrupted (%s) before any COMMIT PREPARED, so nothing of it committed; "
                "looking for what it may leave prepared, to roll it back, in the background: "
                "%s (should the process stop first: ROLLBACK PREPARED those still in "
                "pg_prepared_xacts; never COMMIT PREPARED them)",
                policy.service,
                type(interruption).__name__,
                ", ".join(str(xid) for _, xid in pending),
                service=policy.service,
                event="two_phase_ending",
            )
        return pending

    def two_phase_swept(
        self, sweep: Sweep, interruption: BaseException, request: CommitRequest
    ) -> None:
        """The background look (see :meth:`two_phase_interrupted`) is over: said as the
        unit's own look is (:meth:`two_phase_abandoned`), and when it found nothing left
        prepared, said so too (the WARNING before announced it)."""
        if sweep.ended or sweep.left:
            self.two_phase_abandoned(sweep.pending, sweep.ended, sweep.left, interruption, request)
            return
        policy = self.policy
        emit(
            policy.config,
            log_session,
            logging.INFO,
            "Two-phase unit ended: service=%s its PREPARE step, interrupted (%s), left nothing "
            "prepared: %s",
            policy.service,
            type(interruption).__name__,
            ", ".join(str(xid) for _, xid in sweep.pending),
            service=policy.service,
            event="two_phase_nothing_prepared",
        )

    def two_phase_abandoned(
        self,
        pending: list[tuple[Engine, Any]],
        ended: list[Any],
        left: list[tuple[Any, BaseException | None]],
        exc: BaseException,
        request: CommitRequest,
    ) -> None:
        """After the driver looked for the ``pending`` prepared transactions of a two-phase
        unit that never decided to commit (``exc``: why, its failure or an interruption):
        ``ended`` were rolled back there; ``left`` (each with the last error met looking for
        it: None while its PREPARE was still running) could not be ended. Said when either is
        not empty; with any ``left`` the unit is not replayed (a replay could wait on their
        locks, and one committed by hand would save its writes twice): the operator's line
        names them and why."""
        policy = self.policy
        how = "failed" if isinstance(exc, Exception) else "was interrupted"
        if ended:
            emit(
                policy.config,
                log_session,
                logging.WARNING,
                "Ended a two-phase unit's prepared transactions: service=%s its PREPARE step "
                "%s (%s) before any COMMIT PREPARED, so nothing of it committed; rolled back "
                "what the %s left prepared: %s",
                policy.service,
                how,
                type(exc).__name__,
                "failure" if isinstance(exc, Exception) else "interruption",
                ", ".join(str(x) for x in ended),
                service=policy.service,
                event="two_phase_abandoned",
            )
        if left:
            names = ", ".join(str(x) for x, _ in left)
            emit(
                policy.config,
                log_session,
                logging.ERROR,
                "Two-phase unit not ended: service=%s its PREPARE step %s (%s) before any "
                "COMMIT PREPARED, so nothing of it committed, but these may be left prepared: "
                "%s (%s). ROLLBACK PREPARED those still in pg_prepared_xacts; never COMMIT "
                "PREPARED them",
                policy.service,
                how,
                type(exc).__name__,
                names,
                "; ".join(f"{x}: {_why_left(error)}" for x, error in left),
                service=policy.service,
                event="two_phase_left_prepared",
            )
            policy.not_replayable(exc, f"its prepared transactions {names} may be left prepared")

    def two_phase_finished(
        self,
        request: CommitRequest,
        pending: list[Finishing],
        finished: list[Finishing],
        exc: BaseException,
    ) -> bool:
        """After the driver committed ``finished`` of the ``pending`` prepared transactions:
        True when all were (the unit is done). Logged when it committed any; none means the
        failure is settled as any other. One whose COMMIT PREPARED was answered with a warning
        and never proven (see :func:`commit_if_prepared`) is committed on the primary alone:
        :class:`CommitOutcomeUnknownError` is raised, as for a one-phase unit's COMMIT so
        answered (never replayed: it is committed there)."""
        policy = self.policy
        unproven = [f for f in pending if f.warned is not None and f not in finished]
        done = len(finished) == len(pending)
        if isinstance(exc, UnprovenCommit):
            # every COMMIT PREPARED of the unit was answered, those pending with a warning: the
            # factory committed nothing, it proved them (as a one-phase unit's COMMIT so
            # answered is proven: the same line)
            if done:
                emit(
                    policy.config,
                    log_session,
                    logging.WARNING,
                    "Commit outcome verified: service=%s the unit is done: its two-phase "
                    "transaction(s) %s committed, proven replicated by a check on a new "
                    "connection (its COMMIT PREPARED was answered with %s)%s; not replaying",
                    policy.service,
                    ", ".join(str(f) for f in pending),
                    exc.warning,
                    _committed_again(pending),
                    service=policy.service,
                    event="commit_verified",
                )
        elif finished:
            emit(
                policy.config,
                log_session,
                logging.WARNING,
                "Finished a two-phase commit: service=%s the COMMIT PREPARED of %s failed (%s); "
                "committed the unit's prepared transactions still pending: %s; %s",
                policy.service,
                request.two_phase_commits[-1] if request.two_phase_commits else None,
                type(exc).__name__,
                ", ".join(str(f) for f in finished),
                _finished_how(done, unproven),
                service=policy.service,
                event="two_phase_finished",
                done=done,
            )
        if done:
            policy.stats.add("verified_commits")
            return True
        if unproven:
            raise self._two_phase_unproven(request, pending, finished, unproven) from exc
        return False

    def _two_phase_unproven(
        self,
        request: CommitRequest,
        pending: list[Finishing],
        finished: list[Finishing],
        unproven: list[Finishing],
    ) -> CommitOutcomeUnknownError:
        """The error of a two-phase unit whose prepared transactions include ``unproven`` ones:
        committed on the primary by a COMMIT PREPARED answered with a warning, never proven
        replicated within the deadline."""
        names = ", ".join(str(f) for f in unproven)
        reason = (
            f"{CommitVerdict.UNREPLICATED.value}; its COMMIT PREPARED was answered with "
            f"{unproven[-1].warned}"
        )
        unserved = [f.unserved_standby_names for f in unproven if f.unserved_standby_names]
        if unserved:
            reason += (
                " (no standby is connected to the server, whose synchronous_standby_names is "
                f"{unserved[-1]!r})"
            )
        left = [str(f) for f in pending if f not in finished and f.warned is None]
        if left:
            reason += (
                "; its prepared transactions not known committed are kept prepared, never "
                "rolled back (it had decided to commit): COMMIT PREPARED those still in "
                f"pg_prepared_xacts: {', '.join(left)}"
            )
        return self._unknown(f"a two-phase unit's prepared transaction(s) {names}", reason)

    def _unknown(
        self, what: str, reason: str, *, marker: str | None = None, xid: str | None = None
    ) -> CommitOutcomeUnknownError:
        """Count and log an outcome that can't be known (``what``: whose); the error to raise."""
        policy = self.policy
        policy.stats.add("unknown_commits")
        emit(
            policy.config,
            log_session,
            logging.ERROR,
            "Commit outcome unknown: service=%s %s (%s); not replaying",
            policy.service,
            what,
            reason,
            service=policy.service,
            event="commit_unknown",
            marker=marker,
            xid=xid,
        )
        return CommitOutcomeUnknownError(
            policy.service, int(xid) if xid is not None else None, reason, marker=marker
        )


def isolation_of(connection: Connection, driver: Any) -> str | None:
    """The isolation level of the transaction ``connection`` (SQLAlchemy's) ran, as known
    without asking the server, in capitals; None when not sure. psycopg's connection says what
    its BEGIN asked for (``isolation_level``, SQLAlchemy's setting or your code's on the
    driver's connection); otherwise it is SQLAlchemy's: the ``isolation_level`` execution
    option of the connection (or of its engine), else the dialect's default, read when the
    engine first connected (the engine's ``isolation_level``, or the server's default for the
    role and database). A statement that may have set a level on the connection (see
    ``_statements.SETS_ISOLATION``: ``SET TRANSACTION ISOLATION LEVEL``, ``SET SESSION
    CHARACTERISTICS``, ``SET default_transaction_isolation``, ...) leaves it unsure for as
    long as the connection lives."""
    if driver is None or driver in isolation_unsure:
        return None
    if isinstance(driver, (psycopg.Connection, psycopg.AsyncConnection)):
        own = driver.isolation_level
        if own is not None:
            return own.name.replace("_", " ")
    level = connection.get_execution_options().get("isolation_level")
    if level is None:
        level = connection.default_isolation_level
    return None if level is None else str(level).upper()


@dataclass(frozen=True)
class Split:
    """A unit whose transaction spans several connections (``binds``, a read/write split), every
    one marked, lost a COMMIT's answer: what each part of it is known to have done.

    SQLAlchemy commits the connections one by one and stops at the first COMMIT that fails, so
    when the lost answer came: the COMMITs before it were answered (their tickets are done; the
    ones that wrote are committed for good), and the connections after it never sent theirs
    (rolled back: what they may have written is lost). A connection whose COMMIT never went out
    still holds its "may have written" flag (``_rdb_may_write``, cleared only by a COMMIT's plan
    or the next checkout); one whose COMMIT went out wrote only if its ticket says so (a
    read-only one shares a ticket that names no connection, and its flag was cleared). What the
    failing COMMIT did is checked in its own database, as for one connection. (A read on a
    follower and a write on the leader: the follower's part wrote nothing, so the
    leader's check settles the unit, whichever COMMIT went out first.)"""

    #: the COMMIT whose answer was lost, when it wrote (None: it wrote nothing)
    failing: CommitTicket | None
    failing_engine: Any  # the engine its COMMIT went to
    committed_tickets: list[CommitTicket]  # answered COMMITs that wrote, in order
    committed: str  # the databases of those ("": none)
    #: the databases where a part that may have written never committed ("": none)
    uncommitted: str
    databases: str  # the unit's databases, for the lines

    @classmethod
    def of(
        cls, request: CommitRequest, connections: list[tuple[Any, bool]], *, warned: bool = False
    ) -> Split | None:
        """The parts of ``request``'s unit, or None when they can't be told apart (a connection
        not marked, a two-phase unit, a COMMIT answered with a warning besides the one lost,
        several answered with one, a ticket whose connection is not found): its outcome is
        unknown. ``warned``: every COMMIT was answered, one that wrote with a warning
        (:class:`~._commit.UnprovenCommit`): that one is the part to check."""
        if (
            not connections
            or not all(marked for _, marked in connections)
            or request.two_phase
            or request.two_phase_commits
            or (request.warned and not warned)
        ):
            return None
        drivers = request.drivers()
        engine_of = {id(driver): conn.engine for conn, driver in drivers}
        tickets = request.tickets
        if warned:
            unproven = [t for t in tickets if t.warned is not None and t.wrote and not t.done]
            if len(unproven) != 1:
                return None  # (a check proves one COMMIT)
            failing: CommitTicket | None = unproven[0]
        else:
            failing = tickets[-1] if tickets and not tickets[-1].done else None
        if any(not t.done for t in tickets if t is not failing):
            return None  # (every COMMIT but the failing one was answered)
        committed_tickets = [t for t in tickets if t.done and t.wrote]
        engines = []
        for ticket in committed_tickets:
            engine = engine_of.get(id(ticket.driver))
            if engine is None:
                return None
            engines.append(engine)
        # (a connection whose COMMIT went out has a ticket: its flag proves nothing any more,
        # the fallback's query for the transaction id having set it again)
        ticketed = {id(t.driver) for t in tickets if t.driver is not None}
        uncommitted = [
            conn.engine
            for conn, driver in drivers
            if id(driver) not in ticketed and getattr(driver, "_rdb_may_write", True)
        ]
        failing_engine = None
        if failing is not None:
            failing_engine = engine_of.get(id(failing.driver))
            if failing.mode is None or failing_engine is None:
                return None
            if not failing.sent:  # its COMMIT never went out: a part that never committed
                uncommitted.append(failing_engine)
                failing = None
            elif not failing.wrote:  # it held no xid: it wrote nothing
                failing = None

        def named(found: list[Any]) -> str:
            return ", ".join(sorted({str(e.url.database) for e in found}))

        return cls(
            failing=failing,
            failing_engine=failing_engine,
            committed_tickets=committed_tickets,
            committed=named(engines),
            uncommitted=named(uncommitted),
            databases=named([conn.engine for conn, _ in connections]),
        )

    def partly(self, *, failing_committed: bool = False) -> str:
        """How the unit is partly committed, for ``Policy.partly_committed``'s line
        (``failing_committed``: the check found the lost answer's COMMIT committed)."""
        committed = [self.committed] if self.committed else []
        if failing_committed:
            committed.append(str(self.failing_engine.url.database))
        why = []
        if self.failing is not None and not failing_committed:
            why.append(f"the one on {self.failing_engine.url.database} did not commit")
        if self.uncommitted:
            why.append(f"that of {self.uncommitted} never went out")
        return (
            f"on database(s) {', '.join(committed)} (whose COMMIT was answered or verified "
            f"committed; {'; '.join(why)})"
        )


def _finished_how(done: bool, unproven: list[Finishing]) -> str:
    """The end of a ``Finished a two-phase commit`` line: how the unit stands."""
    if done:
        return "the unit is done"
    if unproven:
        names = ", ".join(str(f) for f in unproven)
        return f"committed on the primary, not proven replicated: {names}"
    return "the failed one was no longer pending, so its failure is settled as before"


def _committed_again(pending: list[Finishing]) -> str:
    """What a ``Commit outcome verified`` line of a two-phase unit adds for those of its
    transactions a failover had left prepared, which the factory committed again; "" when
    none."""
    again = [str(f) for f in pending if f.committed_again]
    if not again:
        return ""
    return (
        f", or found still prepared where a failover had lost its COMMIT PREPARED and "
        f"committed there: {', '.join(again)}"
    )


def _left_prepared(request: CommitRequest) -> str:
    """What a two-phase unit that had decided to commit leaves for an operator: its prepared
    transactions not known committed, kept prepared (see ``_keep_prepared``); "" otherwise."""
    if not (request.two_phase and request.two_phase_commits):
        return ""
    answered = set(map(str, request.two_phase_commits[:-1]))
    left = [str(xid) for _, xid in request.two_phase if str(xid) not in answered]
    return (
        f"; its prepared transactions not known committed are kept prepared, never rolled back "
        f"(it had decided to commit): COMMIT PREPARED those still in pg_prepared_xacts: "
        f"{', '.join(left)}"
    )


def _sent_nothing(request: CommitRequest, connections: list[tuple[Any, bool]]) -> bool:
    """Whether the committing unit provably sent no COMMIT: its transaction's connections are
    all marked (every COMMIT that could commit there gets a ticket: see ``_commit_plan``) and
    none has a ticket, nor did a two-phase COMMIT PREPARED go out."""
    return (
        not request.tickets
        and bool(connections)
        and all(marked for _, marked in connections)
        and not request.two_phase_commits
    )


def _whose(ticket: CommitTicket) -> str:
    """The transaction of ``ticket``, as the log lines name it."""
    if ticket.marker:
        return f"marker {ticket.marker}"
    if ticket.xid is not None:
        return f"transaction {ticket.xid}"
    # UNMARKED: a two-phase COMMIT PREPARED, or a connection the protocol can't mark
    return "a COMMIT that carried no marker"


#: the SQLSTATE a server refuses PREPARE TRANSACTION with when ``max_prepared_transactions``
#: is 0, PostgreSQL's default (object_not_in_prerequisite_state)
PREPARED_TRANSACTIONS_DISABLED = "55000"

_PREPARE_DISABLED_NOTE = (
    "resilient_db: the server has prepared transactions disabled, which a factory with "
    "twophase=True needs on every database its units write to: set max_prepared_transactions "
    "above 0 there (at least the number of two-phase units that may be in flight at once; it "
    "takes a server restart), or make the factory without twophase=True"
)


def _refused_prepare(exc: BaseException, request: CommitRequest) -> sa_exc.DBAPIError | None:
    """The error a server refused a two-phase unit's PREPARE with (a 40001 a deferred
    constraint or SERIALIZABLE raises there, say; 55000 where prepared transactions are
    disabled, which psycopg raises as a ``NotSupportedError`` of its own: its SQLSTATE is
    found behind it, see ``_classify._server_error_replaced``), when psycopg's rollback
    replaced it with 42704 "prepared transaction ... does not exist": psycopg takes its
    transaction for prepared once ``tpc_prepare()`` has begun, so SQLAlchemy's rollback of the
    failed PREPARE step sends ROLLBACK PREPARED for a transaction the server had rolled back,
    and the unit heard that error, with the PREPARE's as its context (plain SQLAlchemy alike).
    The PREPARE's is the unit's: a conflict is replayed as at COMMIT. As SQLAlchemy's rollback
    stopped at that error, the unit's other prepared transactions may be left: the factory
    looks for them (see ``CommitReferee.two_phase_undecided``). None for any other error."""
    context = exc.__context__
    orig: BaseException | None = getattr(exc, "orig", None)
    if orig is not None and context is orig:
        context = orig.__context__  # (the driver's error, wrapped: its own context)
    if (
        request.two_phase
        and not request.two_phase_commits
        and isinstance(exc, sa_exc.DBAPIError)
        and sqlstate_of(exc) == "42704"
        and isinstance(context, sa_exc.DBAPIError)
        and sqlstate_of(context) is not None
    ):
        request.prepare_refused = True
        return context
    return None


def _prepare_twophase(connection: Connection, xid: Any) -> None:
    """A two-phase session prepares ``xid`` on ``connection``: noted on the committing unit."""
    request = committing_request()
    if request is not None:
        if request.two_phase is None:
            request.two_phase = []
        request.two_phase.append((connection.engine, xid))


def own_xids(dialect: Any) -> None:
    """Have ``dialect`` name a two-phase transaction with 128 bits from the operating system
    (:func:`_create_xid`), not from the process-wide ``random`` SQLAlchemy's own
    ``create_xid`` draws them from: an application or a test runner may seed that, and
    prefork workers may share its state (uWSGI's, unless told to call ``PyOS_AfterFork``), so
    that two units get the same xids; and the factory rolls back by name what a unit's PREPARE
    step may have left prepared (``two_phase_undecided``, and in the background after an
    interruption: ``_errands``), which must never be another unit's. A dialect with a
    ``create_xid`` of its own keeps it."""
    if type(dialect).create_xid is DefaultDialect.create_xid and "create_xid" not in vars(dialect):
        dialect.create_xid = _create_xid


def _create_xid() -> str:
    """A two-phase transaction's name, as SQLAlchemy's (``_sa_`` and 32 hex digits)."""
    return f"_sa_{secrets.token_hex(16)}"


def _commit_twophase(
    method: Callable[..., Any],
    connection: Connection,
    xid: Any,
    is_prepared: bool = True,
    recover: bool = False,
) -> Any:
    """Around the dialect's ``do_commit_twophase`` (``method``): SQLAlchemy sends ``xid``'s
    COMMIT PREPARED. For a committing unit's own (not a recovery's: :func:`commit_if_prepared`
    finishes a unit's, outside its commit, and hears its warnings itself), noted on the unit
    before it goes out, and the server's warnings heard while it runs (psycopg's notices,
    asyncpg's log messages: a handler added for this COMMIT PREPARED alone, so that units of
    one phase pay nothing): one answered with success *and a WARNING* (its wait for the
    synchronous standby cancelled: committed on the primary alone) is noted on the unit, which
    raises :class:`~._commit.UnprovenCommit` once its COMMIT returned
    (:func:`_answered_with_a_warning`): it is done only once proven, as the factory's own
    COMMIT PREPARED finishing a unit is (see ``CommitReferee.two_phase_pending``)."""
    request = committing_request()
    if request is None or not is_prepared or recover:
        return method(connection, xid, is_prepared=is_prepared, recover=recover)
    if request.two_phase_commits is None:
        request.two_phase_commits = []
    request.two_phase_commits.append(xid)
    warnings: list[str] = []
    with warnings_into(connection.connection.driver_connection, warnings):
        result = method(connection, xid, is_prepared=is_prepared, recover=recover)
    if warnings:
        if request.two_phase_warned is None:
            request.two_phase_warned = []
        request.two_phase_warned.append((xid, warnings[-1]))
        request.warned = True
    return result


#: seconds between two looks for a two-phase unit's prepared transaction whose PREPARE the
#: server is still carrying out (see rollback_if_prepared): a PREPARE's length (deferred
#: triggers, constraint checks) is no retry's, so it is waited for until the deadline
PREPARE_POLL: Final = 0.05


def rollback_if_prepared(connection: Connection, xid: Any) -> bool | None:
    """End ``xid`` on ``connection`` (a new one, outside any transaction): True when it was
    prepared there and is now rolled back (ROLLBACK PREPARED), False when it is not prepared,
    None while a backend of the database is still running its PREPARE (an answer the client
    gave up on: it may yet prepare it; to be looked for again). Running PREPAREs are looked
    for first, so that one ending between the two looks is found prepared. SQLAlchemy's own
    recovery API. Cut off on a frozen server as :func:`commit_if_prepared` is (a ROLLBACK
    PREPARED cut off is looked for again: it ended, or is still prepared)."""
    with stall_cut(connection):
        preparing = connection.execute(_PREPARING_SQL, {"xid": str(xid)}).scalar()
        if xid in connection.recover_twophase():
            connection.rollback_prepared(xid, recover=True)
            return True
    return None if preparing else False


#: whether another backend of the database is running a statement naming the prepared
#: transaction (its PREPARE TRANSACTION: SQLAlchemy's, whatever a listener of yours added to
#: its text, a comment say): visible for the sessions of one's own role
_PREPARING_SQL = text(
    "SELECT EXISTS (SELECT FROM pg_catalog.pg_stat_activity WHERE state = 'active' "
    "AND pid <> pg_catalog.pg_backend_pid() AND datname = pg_catalog.current_database() "
    "AND pg_catalog.strpos(query, CAST(:xid AS text)) > 0)"
)


def _why_left(error: BaseException | None) -> str:
    """Why a prepared transaction of a two-phase unit could not be ended, for the line."""
    if error is None:
        return "its PREPARE was still running at the last look"
    code = sqlstate_of(error)
    if code is not None and not _lost_connection(error):
        return f"the server refused to end it: {type(error).__name__} (SQLSTATE {code})"
    if isinstance(error, ProcessExiting):
        return "the process exited first"
    if isinstance(error, NotStarted):
        return f"no background look could be started ({error})"
    if isinstance(error, LookFailed):
        return f"the background look failed ({error})"
    if not isinstance(error, Exception):
        return f"interrupted ({type(error).__name__})"
    return f"its database could not be reached in time ({type(error).__name__})"


def _lost_connection(error: BaseException) -> bool:
    return DEFAULT_CLASSIFIER.classify(error) is Outcome.DISCONNECT


@dataclass
class Finishing:
    """A prepared transaction of a two-phase unit that had decided to commit, which the driver
    commits on a new connection (:func:`commit_if_prepared`), and what its COMMIT PREPARED's
    answer proved."""

    engine: Engine  # (its database's)
    xid: Any
    #: its COMMIT PREPARED was answered with success *and* this WARNING (a wait for the
    #: synchronous standby cancelled by someone else: committed on the primary alone, see
    #: ``UnprovenCommit``): committed there, finished only once a check proves it replicated
    warned: str | None = None
    proofs: int = 0  # the checks that wrote WAL past it (their waits grow, see check_commit)
    #: ``synchronous_standby_names`` of a server a check found with no standby connected
    unserved_standby_names: str | None = None
    #: answered with a warning, then found still prepared (a failover lost its COMMIT
    #: PREPARED) and committed again by :func:`commit_if_prepared`
    committed_again: bool = False

    def __str__(self) -> str:
        return str(self.xid)


def commit_if_prepared(connection: Connection, finishing: Finishing) -> bool | None:
    """COMMIT PREPARED ``finishing``'s xid on ``connection`` (a new one, outside any
    transaction) if it is still prepared there; whether it was (True only when the server
    answered its COMMIT PREPARED: the unit's transaction committed by this). SQLAlchemy's own
    recovery API.

    Looked for first every time, even once answered with a warning (``finishing.warned``):
    still prepared there (a failover to a standby that had its PREPARE, not its COMMIT
    PREPARED), it is committed there, as a pending one is.

    Answered with success and a WARNING (a cancelled wait for the synchronous standby:
    committed on the primary alone, see ``UnprovenCommit``), it is finished only once proven
    as a one-phase unit's COMMIT so answered is (:func:`_prove_finished`): None until then
    (``finishing.warned`` set: the next look proves it, on a new connection, within the
    deadline; never proven, the unit's outcome is unknown, see
    ``CommitReferee.two_phase_finished``).

    Its statements are cut off on a server that answers nothing (a frozen one) after
    :data:`~._commit.STALLED_AFTER`, cut to what is left of the deadline (see
    :func:`~._commit.stall_cut`): the socket is shut down, with no cancel request first, since
    a cancel reaching a COMMIT PREPARED that waits for a synchronous standby has it answered
    with success (committed on the primary only, not replicated). asyncpg raises its
    ``TimeoutError`` instead, whose cancel comes too late to be answered. A cut is an error,
    never an answer: the xid is looked for again within the deadline (found committed
    meanwhile, it is not counted finished here), and a unit none of whose looks is answered
    ends with its outcome unknown."""
    warnings: list[str] = []
    with stall_cut(connection):
        prepared = finishing.xid in connection.recover_twophase()
        if prepared:
            with warnings_into(connection.connection.driver_connection, warnings):
                connection.commit_prepared(finishing.xid, recover=True)
    if prepared:
        if finishing.warned is not None:
            # answered with a warning before, yet still prepared where this look went: a
            # failover to a standby that had its PREPARE, not its COMMIT PREPARED (the proof
            # alone would have taken it for done there): committed here now
            finishing.committed_again = True
        if not warnings:
            return True
        finishing.warned = warnings[-1]
    elif finishing.warned is None:
        return False
    connection.rollback()  # (the recovery's transaction SQLAlchemy began: the proof's next)
    return _prove_finished(connection, finishing)


def _prove_finished(connection: Connection, finishing: Finishing) -> bool | None:
    """Prove ``finishing``'s COMMIT PREPARED, answered with a warning, as :func:`check_commit`
    proves a COMMIT found committed: where synchronous replication is in effect, a transaction
    writes WAL past it and its own COMMIT must be answered plainly within the check's wait
    (cut to what is left of the deadline). True when proven (or nothing to prove: no
    synchronous replication in effect, the warning another's), None otherwise."""
    with connection.begin():
        with stall_cut(connection):
            past = wrote_past_commit(connection, f"two-phase transaction {finishing.xid}")
        if _end_proof(connection, finishing, past, time_left()):
            return True
    return None


# -- drop-in use: a connect that fails before anything was sent is retried ----------------------
# The drop-in session about to connect in this context: (its factory, a weak reference to its
# root transaction). Set when such a session begins a transaction (no connection yet); cleared by
# the engine's pool ``checkout`` listener (EngineHooks.checkout), which runs whenever a session
# gets its connection, new or pooled. The engine's ``do_connect`` listener (EngineHooks.do_connect)
# retries the connect under that factory's policy, but only while that transaction is still the
# session's current one, and so still waiting for its connection: a transaction that ended without
# connecting leaves nothing that a later connect elsewhere would pick up. (``after_begin`` comes
# after the connect; an ``after_transaction_end`` listener would cost every unit a call.) asyncio:
# SQLAlchemy's greenlets run in their task's context, so the value crosses from the ``begin`` to
# the statement that connects.
connecting_for: contextvars.ContextVar[tuple[Any, weakref.ref[Any]] | None] = (
    contextvars.ContextVar("resilient_db_connecting_for", default=None)
)
#: the root transaction (weakly: the reference in ``connecting_for``'s entry, kept past the
#: connect; nothing of the session or its factory is held) of the drop-in session whose
#: transaction began last in this context: a COMMIT of that transaction whose answer is lost is
#: counted and said under its factory's service, not the engine's latest factory's (see
#: :meth:`EngineHooks._commit_speaker`)
dropin_transaction: contextvars.ContextVar[weakref.ref[Any] | None] = contextvars.ContextVar(
    "resilient_db_dropin_transaction", default=None
)
UNIT_CONTEXT.extend((current_unit, connecting_for, dropin_transaction))


def _on_transaction_create(session: Session, transaction: Any) -> None:
    if transaction.parent is not None:
        return  # a nested transaction: the root one has the connection
    active = current_unit.get()
    if active is not None and active.session is session:
        return  # a sync unit's session (the registry's answer below, without its lookups)
    factory = factory_of(session)
    if not isinstance(factory, FactoryCore) or in_unit(session) or not factory.config.enabled:
        if connecting_for.get() is not None:
            connecting_for.set(None)
        return
    # a drop-in session of a factory: made in an operation's attempt, a replay may roll it
    # back (_wrapper; a unit's session is its own, and was returned from above)
    attempt = current_attempt.get()
    if attempt is not None and attempt.running:
        attempt.created_transaction(transaction)
    policy = factory.policy
    policy.refresh()
    breaker = policy.breaker
    if breaker is not None and not breaker.fast_closed() and not admitted_by(breaker):
        # open: refused before it takes a connection, a pooled one too (a new one is put to
        # the breaker by the connect retry, see FactoryCore._connect_policy_call); half-open
        # lets it through, as no probe: its outcome is not reported to the breaker. (An entry
        # of an earlier transaction left in connecting_for is not this one's: never used.)
        try:
            breaker.refuse_if_open()
        except CircuitOpenError:
            # the refused transaction is ended (it holds no connection): the session's next
            # statement begins another, which is asked again
            transaction.close()
            raise
    ref = weakref.ref(transaction)
    connecting_for.set((factory, ref))
    dropin_transaction.set(ref)


def connecting_factory(hooks: EngineHooks) -> Any:
    """The factory of the drop-in session connecting in this context, if one is, for a
    connection of the engine of ``hooks``: one of the factory's engines, or the session's own
    bind. A connection of another engine made meanwhile is not the session's (one of a unit
    of another factory run inside the drop-in block, or of that engine's Core use there; a
    task or a thread the block started, which inherited the entry, also once the session has
    connected: only this context's entry is cleared then), which the other factory's breaker
    refused when its circuit was open, and counted."""
    entry = connecting_for.get()
    if entry is None:
        return None
    factory, ref = entry
    transaction = ref()
    # still its session's transaction (a closed one no longer is): then it is the one connecting
    # (a connected one would have cleared the entry at checkout)
    if transaction is None or transaction.session.get_transaction() is not transaction:
        connecting_for.set(None)
        return None
    if factory in hooks.factories:
        return factory
    bound = engine_behind(transaction.session.bind)  # (one bound to it for this session only)
    return factory if bound is not None and hooks_of(bound) is hooks else None


def _on_after_begin(session: Session, transaction: Any, connection: Any) -> None:
    """A session began ``transaction`` on ``connection``: the attempt running here records the
    connections of its root transactions, for a COMMIT that fails (``CommitReferee._spread``).
    One call per connection a transaction begins on (a savepoint begins on its root's)."""
    if transaction.nested:
        return
    engine = connection.engine
    # (an engine the factory hooked is a key itself: one lookup; a copy made by
    # ``execution_options()`` is looked up through its engine)
    if STATE.engine_hooks.get(engine) is None and hooks_of(engine) is None:
        _hook_engine_met(session, connection)
    attempt = current_attempt.get()
    if attempt is not None:
        attempt.began_on(transaction, connection)


def _hook_engine_met(session: Session, connection: Connection) -> None:
    """A session of a resilient factory began its transaction on ``connection``, of an engine
    without the factory's hooks: one the factory was never given, which the session picked by
    itself (``bind_mapper()``, ``bind_table()``, a ``get_bind`` set on the factory's own
    class). Its COMMIT went out unmarked, so every lost answer there was
    raised as CommitOutcomeUnknownError, even one that never reached the server; its errors
    were not classified by its hooks nor its dead pooled connections replaced at checkout.
    The engine gets the factory's hooks now, as an engine of one session's ``binds`` does
    (``register=False``: see :func:`hooks_for`), and the connection is prepared for the commit
    protocol before the transaction sends anything (the driver's transaction begins with the
    first statement; a connection inside its caller's transaction is left unmarked, its
    outcome unknown). Here, not at ``get_bind``: SQLAlchemy has no event before the session
    connects, and this one costs a dictionary lookup per transaction begun; the connection
    taken before the hooks is prepared as one made before a factory is (the engine's later
    checkouts are the factory's). A session of no resilient factory is left alone."""
    factory = factory_of(session)
    if not isinstance(factory, FactoryCore):
        return
    hooks = hooks_for(connection.engine, factory, register=False)
    if not hooks.config.enabled or connection.invalidated:
        return
    dbapi_connection = connection.connection.dbapi_connection
    in_transaction = getattr(
        getattr(dbapi_connection, "driver_connection", None), "is_in_transaction", None
    )
    if in_transaction is not None and in_transaction():
        return  # (asyncpg) its caller's transaction: left unmarked (psycopg's prepare looks)
    hooks.commit.prepare(dbapi_connection)


def _on_after_commit(session: Session) -> None:
    """A session's root transaction committed. Inside an attempt, unless it is the unit's own
    final COMMIT (``current_request`` is set then), the attempt's code committed part of its
    work: not replayable. The driver's COMMIT notes that (``_commit._own_commit``), but a
    session joined to its caller's transaction through a savepoint sends none: its
    ``commit()`` releases the savepoint into the caller's transaction, which a replay would
    add the same work to again.

    SQLAlchemy fires this event for a ``begin_nested()`` savepoint released too (the session's
    transaction is still the nested one then): that commits nothing, and the unit stays
    replayable. So does a COMMIT the driver sent on connections the commit protocol marks,
    which told the attempt itself whether it saved anything (a transaction that only read
    leaves the attempt replayable: see :func:`_driver_told`)."""
    if committing_request() is not None or session.in_nested_transaction():
        return
    attempt = current_attempt.get()
    if attempt is not None and attempt.running and not _driver_told(session, attempt):
        attempt.committed = True


def _driver_told(session: Session, attempt: Any) -> bool:
    """Whether the root transaction ``session`` just committed sent its COMMIT through the
    marked connections of the commit protocol on every connection it had (``_own_commit`` then
    marked the attempt committed if that COMMIT may have saved anything). Not for a session
    bound to a ``Connection`` (it may have joined its caller's transaction: its commit sends
    no COMMIT, or releases a savepoint into that transaction), a two-phase session, or a
    transaction that began before the attempt (its connections were not recorded)."""
    if session.twophase or isinstance(session.bind, Connection):
        return False
    if any(isinstance(bind, Connection) for bind in session_binds(session)):
        return False
    transaction = session.get_transaction()
    seen = False
    for began, _connection, marked, _driver in attempt.began or ():
        if began is transaction:
            if not marked:
                return False
            seen = True
    return seen


_CONNECT_EVENTS = (
    ("after_transaction_create", _on_transaction_create),
    ("after_begin", _on_after_begin),
    ("after_commit", _on_after_commit),
)


#: the class attribute of a ``class_`` given that holds its listening base (see
#: :func:`listening_base`)
_BASE_ATTR: Final = "_rdb_listening_base"
#: the listening bases of classes that take no attribute (kept for good)
_listening_bases: dict[type[Any], type[Any]] = {}


def listening_base(given: type[Any]) -> type[Any]:
    """A subclass of ``given`` (the ``class_`` a sync factory was given, ``Session`` by
    default) shared by every sync factory given it, listening for the drop-in connect retry
    (:func:`install_connect_retry`); each factory's own class subclasses it, and hears the
    events through it.

    The listeners were registered on each factory's own class, and SQLAlchemy's event registry
    keeps an entry per class that listened for good (keyed by its ``id()``, not freed with the
    class): a process making a factory per request, tenant or test grew without bound, which
    ``sessionmaker`` does not. Registered here once per class given, plain sessions of
    ``Session`` (or of your class) don't hear them. A base's entries leave the registry with
    it (:func:`_internals.forget_event_keys`, when the collector frees it): a class made per
    tenant or per test and given to its factories leaves none behind either.

    The base is kept on the class given (an attribute of its own, not inherited), so it lives
    as long as that class does: a class made per tenant (one whose ``get_bind`` holds the
    tenant's engine) is freed with its factories, its engine and pooled connections with it,
    as under ``sessionmaker`` (kept in a module-level table, every such class and engine was
    kept for good)."""
    with STATE.lock:
        base = given.__dict__.get(_BASE_ATTR) or _listening_bases.get(given)
        if base is not None:
            return base
        base = _noting_subclass(given)
        try:
            setattr(given, _BASE_ATTR, base)
        except (AttributeError, TypeError):  # a class that takes no attribute
            _listening_bases[given] = base
        listeners = _own_listeners()
        if install_connect_retry(base, listeners):
            # (the finalizer holds the registry's keys, not the base)
            weakref.finalize(base, forget_event_keys, event_keys(base, listeners))
    return base


def _noting_subclass(cls: type[Any]) -> type[Any]:
    """A subclass of the session class ``cls`` by its name (``__name__``, ``__qualname__``,
    ``__module__``, ``__doc__``), whose ``bulk_save_objects`` notes the new objects it keys in
    an attempt (see :func:`_bulk_save_objects_of`): a sync factory's listening base, an async
    factory's sync session class."""
    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    sub = type(cls.__name__, (cls,), namespace)
    setattr(sub, "bulk_save_objects", _bulk_save_objects_of(sub))  # noqa: B010 (a method)
    return sub


def _bulk_save_objects_of(base: type[Any]) -> Callable[..., Any]:
    """The ``bulk_save_objects`` of a factory's sessions, set on their listening ``base`` (see
    :func:`listening_base`): your class's, and, inside an attempt of a unit or operation
    asking for ``return_defaults``, the new objects it keys noted for a replay (see
    ``AttemptRecord.bulk_keyed``). SQLAlchemy has no event there."""

    def bulk_save_objects(session: Any, objects: Iterable[Any], *args: Any, **kwargs: Any) -> Any:
        bulk = super(base, session).bulk_save_objects
        attempt = current_attempt.get()
        if (
            attempt is None
            or not attempt.running
            or not (args[0] if args else kwargs.get("return_defaults", False))
        ):
            return bulk(objects, *args, **kwargs)
        objects = list(objects)  # (an iterator: read once, here and by SQLAlchemy)
        new = [state for state in map(instance_state, objects) if state.key is None]
        try:
            return bulk(objects, *args, **kwargs)
        finally:  # (keyed in part when a later group failed)
            attempt.bulk_keyed([state for state in new if state.key is not None])

    return bulk_save_objects


def _own_listeners() -> tuple[tuple[str, Callable[..., Any]], ...]:
    """Copies of the connect retry's listeners for one listening base (the same code, called
    as directly): the registry files a listener under its function too, and a function
    registered on several classes is filed under the latest one only."""
    return tuple(
        (
            name,
            functools.update_wrapper(
                types.FunctionType(
                    fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
                ),
                fn,
            ),
        )
        for name, fn in _CONNECT_EVENTS
    )


def sync_class_of(given: Any) -> Any:
    """(async) The session class behind a ``sync_session_class`` given: a sync
    ``sessionmaker``'s ``class_`` (SQLAlchemy's recipe for events on an async factory's
    sessions: ``async_sessionmaker(sync_session_class=sync_maker)``, listeners on
    ``sync_maker``; AsyncSession calls it as it calls a class), else ``given`` itself."""
    return given.class_ if isinstance(given, sessionmaker) else given


def install_connect_retry(
    session_class: type[Session],
    listeners: tuple[tuple[str, Callable[..., Any]], ...] = _CONNECT_EVENTS,
) -> bool:
    """Listen for the drop-in connect retry on the session class a factory makes sessions of
    (sync: the class ``sessionmaker`` made for it; async: ``sync_session_class``), so plain
    sessions elsewhere in the application don't pay for it. A class whose base listens already
    is left alone (listeners reach subclasses). The listeners act only for a resilient
    factory's sessions (found in the registry, not in ``session.info``).

    The classes that listen are recorded weakly in :data:`~._state.STATE`, not asked of
    ``event.contains``: SQLAlchemy's event registry keys a class by its ``id()`` and keeps the
    entry after the class is gone (a factory's class goes with the factory), so a new class
    given the same address would be taken for one that listens, and its sessions would go
    without the connect retry. True when ``session_class`` listens now (it did not)."""
    with STATE.lock:
        listening = STATE.connect_retry_classes
        if any(base in listening for base in session_class.__mro__):
            return False
        # subclasses that listen already (a sync factory's class, made before an async factory
        # made Session listen) keep their listeners and hear these too: each event comes twice
        # to their sessions, which the listeners take as once (``began_on`` records a
        # connection once), so they are left in place
        for name, listener in listeners:
            event.listen(session_class, name, listener)
        listening.add(session_class)
        return True


# The transition guard: registered once, on SQLAlchemy's Session class (it also serves plain
# sessions guarded by hand); it acts for a resilient factory's sessions through the registry.
install_guard(Session)


def _on_attached(session: Session, instance: Any) -> None:
    """``detached_to_persistent``: a detached object attached to ``session``. Inside an attempt
    of a unit or operation, changes it carries from before are kept for a replay (see
    ``AttemptRecord.attached_with_changes``). Registered once on SQLAlchemy's Session, as the
    guard is (an operation's sessions may be any): attaching a detached object is rare on a
    unit's path, and costs this call only then."""
    attempt = current_attempt.get()
    if attempt is not None and attempt.running:
        state = instance_state(instance)
        if state.committed_state:
            attempt.attached_with_changes(state)


event.listen(Session, "detached_to_persistent", _on_attached)


def lost_with_its_connection(record: Any, exc: BaseException) -> BaseException | None:
    """The error that ended an attempt's transaction, when the attempt failed with ``exc``
    only because its code caught that error and went on, where a replay heals it (nothing was
    committed); None otherwise. The attempt fails with that error instead, and is replayed as
    for it.

    * A disconnect (a statement that may fail, in a ``begin_nested()`` block, as the README
      advises, meeting a connection the server ended): the transaction went with the
      connection, and SQLAlchemy raises ``PendingRollbackError`` at the unit's next statement
      or its COMMIT, an error no replay would heal.
    * A transient error the server answered (a serialization failure, a deadlock, a lock
      timeout), caught outside a savepoint: PostgreSQL refuses every later statement of the
      failed transaction (25P02), its COMMIT too (see
      ``_statements.failed_transaction_commit``), and SQLAlchemy raises
      ``PendingRollbackError`` after a flush that met it."""
    disconnected = record.disconnected
    if (
        isinstance(disconnected, Exception)  # (an interruption is never put in an error's place)
        and exc is not disconnected
        and isinstance(exc, sa_exc.PendingRollbackError)
    ):
        return disconnected
    caught: BaseException | None = record.last_error
    if caught is None or caught is exc or not aborted_before(exc):
        return None
    if not record.classifier.classify(caught).replayable:
        return None  # (a business error: its code's to handle, as the 25P02 says)
    return caught


def aborted_before(exc: BaseException) -> bool:
    """Whether ``exc`` is a transaction found aborted by an earlier failure."""
    return isinstance(exc, sa_exc.PendingRollbackError) or sqlstate_of(exc) == FAILED_SQLSTATE


#: in_failed_sql_transaction: what a failed transaction's statements and COMMIT meet
FAILED_SQLSTATE: Final = "25P02"


def conflict_left_behind(record: Any) -> None:
    """Before a unit's COMMIT (called when ``record.conflicted``: its statements met a
    serialization failure or a deadlock, SQLSTATE class 40, which its code caught and went on
    from, in a savepoint, a ``begin_nested()`` block, or not): raise that error, so that the
    unit is rolled back and replayed whole, as PostgreSQL asks of such a failure (in the SQL
    standard, class 40 rolls the whole transaction back; PostgreSQL rolls back only the
    savepoint, and lets the transaction commit without the work the failure undid, whose
    snapshot, under REPEATABLE READ or SERIALIZABLE, would meet the same failure again). Not
    when the transaction it was met in ended since (the unit's code rolled it back: what
    follows is a new transaction), nor where the unit is not replayed (retry switched off):
    it commits then, as plain SQLAlchemy does."""
    conflict, transaction = record.conflicted
    if transaction.is_active and record.replayed:
        raise conflict


def blocked_on_its_driver(
    exc: BaseException, config: Config, service: str
) -> IllegalTransitionError | None:
    """The transition trigger's refusal of a statement the unit sent on the driver's own
    connection (``session.connection().connection``, its ``driver_connection``: a psycopg
    ``executemany``, an asyncpg ``execute``), which reaches the unit as the driver's error
    (SQLSTATE ``RDB01``), past SQLAlchemy's ``handle_error`` that maps the same refusal of a
    statement sent through SQLAlchemy: the unit raises it as that mapping would
    (:class:`IllegalTransitionError`, ``via="db"``, said and counted as blocked), so that every
    block of a unit is one error whatever sent the statement. None for any other error, one
    SQLAlchemy raised (its ``handle_error`` saw it), and with the guards switched off. Read on
    a failed attempt only."""
    if (
        not config.guard_on
        or isinstance(exc, (IllegalTransitionError, sa_exc.StatementError))
        or sqlstate_of(exc) != TRANSITION_SQLSTATE
    ):
        return None
    return exception_from_db(exc, log=True, config=config, service=service)


def drop_kept_connections(session: Session, record: Any) -> None:
    """Before a failed attempt's rollback: invalidate each of its connections whose session
    holds what that rollback keeps (a session-level advisory lock, a statement ``PREPARE``d in
    SQL: see ``_statements.KEEPS_SESSION``), so that they close rather than go back to the pool
    with it, where a replay would meet it (waiting for ever on the lock an idle pooled
    connection holds, or taking it twice on the same one and releasing it once; ``PREPARE``
    refused with 42P05). The replay gets a new connection, as after a lost one. (``session``:
    the unit's, as ``run_sync`` passes it.)"""
    kept = record.kept
    for _transaction, connection, _marked, driver in record.began or ():
        if any(d is driver for d in kept) and not connection.closed:
            try:
                connection.invalidate()
            except Exception:
                debug_failure(log_session, "dropping a failed attempt's connection failed")


def restore_attached(policy: Any, record: Any, exc: BaseException) -> bool:
    """After a failed attempt's rollback: put back the changes of objects attached in it (see
    ``AttemptRecord.restore_attached``), or, where that can't be done, keep ``exc`` from
    being replayed (its replay would report success without them): False then."""
    why = record.restore_attached()
    if why is None:
        return True
    policy.not_replayable(exc, why)
    return False


def refuse_keywords_kept(
    factory: Any, session_kwargs: Mapping[str, Any], mine: Mapping[str, Any]
) -> None:
    """A keyword given to the factory (``mine``: its own arguments, as given) is the
    factory's own, where a sessionmaker passes every keyword to its session class: a class in
    ``session_kwargs`` (``class_``; async: the sync session class given, else ``class_``'s own)
    whose ``__init__`` declares a parameter of that name would never get it. ``TypeError``
    naming each such keyword, raised before anything of the factory is set up (a breaker,
    hooks)."""
    classes = session_classes(session_kwargs)
    if not classes:
        return
    defaults = inspect.signature(_factory_class(type(factory))).parameters
    given = [
        name
        for name, value in mine.items()
        if name not in defaults
        or not (
            value is defaults[name].default
            or (isinstance(value, (str, tuple)) and value == defaults[name].default)
        )
    ]
    clashes: list[str] = []
    for cls in classes:
        names = [n for n in given if declares(cls, n)]
        if not names:
            continue
        one = len(names) == 1
        keywords = ", ".join(f"{n}=..." for n in names)
        clashes.append(
            f"{cls.__qualname__}.__init__ takes {', '.join(f'{n}=' for n in names)}, "
            f"which {type(factory).__name__} keeps for itself: given to the factory, "
            f"{'it never reaches' if one else 'they never reach'} {cls.__qualname__}. "
            f"Give {'it' if one else 'them'} to the sessions instead: "
            f"Factory({keywords}) for one session, Factory.configure({keywords}) for "
            f"every session the factory makes (run()'s included); or rename "
            f"{'that parameter' if one else 'those parameters'} of {cls.__qualname__}."
        )
    if clashes:
        raise TypeError(" ".join(clashes))


def session_classes(kw: Mapping[str, Any]) -> list[type]:
    """The session classes of a factory's keywords ``kw``: ``class_`` and (async) the sync
    session class given, else ``class_``'s own."""
    sync_class = sync_class_of(
        kw.get("sync_session_class") or getattr(kw.get("class_"), "sync_session_class", None)
    )
    return [c for c in dict.fromkeys((kw.get("class_"), sync_class)) if isinstance(c, type)]


_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def declares(cls: type, name: str) -> bool:
    """Whether ``cls.__init__`` declares a parameter ``name`` that a keyword reaches."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: nothing declared
        return False
    return name in params and params[name].kind in _BY_KEYWORD


def _factory_class(factory_class: type) -> type:
    """The resilient factory class ``factory_class`` is (or derives from)."""
    return next(k for k in factory_class.__mro__ if FactoryCore in k.__bases__)


def refuse_unknown_session_keywords(
    factory_class: type, new_kw: Mapping[str, Any], *, factory: Any = None
) -> None:
    """Every keyword a factory passes on to its sessions (all but ``class_``: sessionmaker
    gives them to the session class; async, AsyncSession gives those it does not declare to
    the sync session class) is one the session class takes: a misspelt one (``servce=``)
    would be kept, and every ``Session()`` and unit would fail with a ``TypeError`` far from
    the mistake. ``TypeError`` naming each, with the names meant where one is near, raised
    before anything of the factory is set up (``factory``: the factory being configured)."""
    names = [n for n in new_kw if n != "class_"]
    if not names:
        return
    is_async = issubclass(factory_class, async_sessionmaker)
    kw = new_kw if factory is None else {"class_": factory.class_, **factory.kw, **new_kw}
    cls = kw.get("class_", AsyncSession if is_async else Session)
    then = (
        sync_class_of(
            kw.get("sync_session_class") or getattr(cls, "sync_session_class", None) or Session
        )
        if is_async
        else None
    )
    unknown = [n for n in names if not _takes_keyword(cls, n, then)]
    if not unknown:
        return
    made = _factory_class(factory_class).__name__
    # the names meant: the sessions' (and, when the factory is made, the factory's own)
    known = (
        []
        if factory is not None
        else [*inspect.signature(_factory_class(factory_class)).parameters]
    )
    for klass in (cls, then):
        if klass is not None:
            with contextlib.suppress(TypeError, ValueError):
                known += inspect.signature(klass).parameters
    known = [n for n in dict.fromkeys(known) if not n.startswith("_") and n != "kw"]
    problems = []
    for name in unknown:
        near = difflib.get_close_matches(name, known, n=1)
        problems.append(f"{name}=" + (f" (did you mean {near[0]}=?)" if near else ""))
    one = len(unknown) == 1
    classes = cls.__qualname__ + (f", nor {then.__qualname__} behind it" if then else "")
    where = f"{made}.configure()" if factory is not None else made
    whose = "" if factory is not None else "is no keyword of the factory's and "
    if not one:
        whose = whose.replace("is no keyword", "are no keywords")
    raise TypeError(
        f"{where} got {', '.join(problems)}, which {whose}{'is' if one else 'are'} taken by "
        f"no session class of it ({classes}): kept, {'it' if one else 'they'} would make every "
        "Session() and unit fail"
    )


def _takes_keyword(cls: Any, name: str, then: Any) -> bool:
    """Whether ``cls(**{name: ...})`` is taken: a parameter of that name, or ``**kw`` (passed
    on to ``then``, when given, which must take it). A signature that can't be read takes
    anything."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return True
    if name in params and params[name].kind in _BY_KEYWORD:
        return True
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return False
    return then is None or _takes_keyword(then, name, None)


def refuse_own_keywords_in_configure(factory: Any, new_kw: Mapping[str, Any]) -> None:
    """``configure()`` passes its keywords to every session the factory makes, as
    sessionmaker's does: a keyword that is the factory's own (``config=``, ``service=``, the
    clocks...) would reach the session class, where ``__init__`` takes no such parameter, and
    every ``Session()`` and unit would fail far from the mistake. ``TypeError`` naming it,
    unless the session class declares that parameter (then it is meant for the sessions, as
    the constructor's refusal of such keywords advises)."""
    params = inspect.signature(_factory_class(type(factory))).parameters
    own = {n for n, p in params.items() if n != "bind" and p.kind is not p.VAR_KEYWORD}
    own.update(("sleep", "asleep"))
    names = [n for n in new_kw if n in own]
    if not names:
        return
    classes = session_classes({"class_": factory.class_, **factory.kw, **new_kw})
    names = [n for n in names if not any(declares(cls, n) for cls in classes)]
    if not names:
        return
    made = type(factory).__name__
    one = len(names) == 1
    given = ", ".join(f"{n}=" for n in names)
    # (async: the sync session class, which AsyncSession passes the keywords on to)
    session_class = classes[-1].__qualname__ if classes else "the session class"
    reload = (
        "; to change the configuration of a running factory, set the SELF_HEALING_* variables "
        "and call resilient_db.reload_config() (it applies to the factories made without "
        "config=)"
        if "config" in names
        else ""
    )
    raise TypeError(
        f"{made}.configure() got {given}, {'which is' if one else 'which are'} the factory's "
        f"own, not the sessions': configure() passes its keywords to every session the "
        f"factory makes, and {session_class} takes no {given} (every Session() and unit would "
        f"fail). Give {'it' if one else 'them'} when the factory is made: "
        f"{made}(engine, {', '.join(f'{n}=...' for n in names)}){reload}"
    )


def engine_behind(target: Any) -> Engine | None:
    """The sync ``Engine`` behind ``target`` (an engine, an async engine, a connection of
    either); None for anything else."""
    engine = getattr(target, "sync_engine", target)
    if isinstance(engine, Connection):
        engine = engine.engine
    return engine if isinstance(engine, Engine) else None


# -- what both factories share ------------------------------------------------------------------
class FactoryCore:
    """Configuration, policy and engine hooks of a resilient session factory.

    :class:`ResilientSession` (a ``sessionmaker``) and :class:`AsyncResilientSession` (an
    ``async_sessionmaker``) differ only in their base and in how they await.
    """

    engine: Any
    policy: Policy
    config: Config
    service: str
    #: (async) whether a unit started in another asyncio task than the enclosing unit of this
    #: factory was said (:meth:`_unit_in_other_task`: one log line per factory)
    _told_other_task = False
    #: made without ``service=`` (see :func:`say_databases_sharing`)
    _service_defaulted = False

    def _unit_in_other_task(self, fn: Any) -> None:
        """An async unit of this factory was started inside a unit of this factory, but in
        another asyncio task (``asyncio.wait_for`` runs its awaitable in a task of its own
        before Python 3.12; ``create_task``, ``gather``, a ``TaskGroup`` or ``shield`` do on
        every version): the unit running in that other task is not this task's, and an
        ``AsyncSession`` can't be shared between tasks, so it runs in a transaction of its
        own, committed by itself. Said once per factory (the hooks see each one)."""
        told, self._told_other_task = self._told_other_task, True
        emit(
            self.config,
            log_session,
            logging.WARNING,
            "Unit in another task: service=%s unit %s started inside a unit of the same "
            "factory, but in another asyncio task, so it runs in a transaction of its own, "
            "committed by itself (it does not see the enclosing unit's uncommitted work, waits "
            "for the rows that unit locked, which no server sees as a deadlock, and stays "
            "committed if that unit fails or is replayed). Await it directly, or under "
            "asyncio.timeout() (Python 3.11+), to join the enclosing unit; asyncio.wait_for "
            "runs it in another task before Python 3.12 (said once per factory)",
            self.service,
            getattr(fn, "__qualname__", None) or repr(fn),
            log=not told,
            service=self.service,
            event="unit_in_other_task",
        )

    def _init_core(
        self,
        sync_engine: Engine | None,
        service: str,
        config: Config | None,
        classifier: Classifier | None,
        *,
        session_kwargs: Mapping[str, Any] | None = None,
        **policy_kwargs: Any,
    ) -> None:
        """Set up everything but the sessionmaker itself (``session_kwargs``: the keywords
        that go to it, whose session classes are checked before anything is set up)."""
        check_service_name(service, type(self).__name__)
        #: made without ``service=`` (see ``_services``): a plain ``str`` kept, not the marker
        self._service_defaulted = service is DEFAULT_SERVICE
        service = str(service)
        if config is not None and not isinstance(config, Config):
            raise TypeError(
                f"config must be a resilient_db.Config (Config(max_retries=3), say), got "
                f"{type(config).__name__}"
            )
        if classifier is not None and not isinstance(classifier, Classifier):
            raise TypeError(
                f"classifier must be a resilient_db.Classifier, got {type(classifier).__name__}"
            )
        session_kwargs = session_kwargs or {}
        refuse_session_classes(type(self), session_kwargs)
        refuse_unknown_session_keywords(type(self), session_kwargs)
        refuse_bad_timing(policy_kwargs)
        refuse_bad_breaker_parts(policy_kwargs)
        refuse_keywords_kept(
            self,
            session_kwargs,
            {"service": service, "config": config, "classifier": classifier, **policy_kwargs},
        )
        explicit = config is not None
        #: reloads applied before the configuration was read (see register_default_user)
        self._config_read_at = STATE.reloads
        config = config if config is not None else factory_config()
        classifier = classifier or Classifier()
        # every engine the factory would hook, checked before it registers on any (or makes
        # its breaker): a refused factory leaves no trace a later one would meet
        binds = (session_kwargs.get("binds") or {}).values()
        if not isinstance(self, async_sessionmaker):
            for bound in binds:
                refuse_async_driver(engine_behind(bound), "ResilientSession(binds=...)")
        self.service = service
        self._explicit_config = explicit
        self.config = config
        self.classifier = classifier
        engines = factory_engines(sync_engine, binds)
        _, settings = self._on_engines(
            engine_settings(config, classifier), lambda mine: refuse_disagreeing(engines, mine)
        )
        self.policy = Policy(
            service,
            self.config,
            classifier=self.classifier,
            explicit_config=self._explicit_config,
            **policy_kwargs,
        )
        self._referee = CommitReferee(self.policy, sync_engine)
        #: (async) for each sync session class given, what the factory's sessions get instead
        #: (a subclass of it, or a sessionmaker of that), the subclass and its ``get_bind``
        #: when it was set up (see _routed)
        self._routes: dict[Any, tuple[Any, Any, Any]] = {}
        #: (sync) the ``get_bind`` of the factory's class as its engines were last set up
        #: (see _route_later)
        self._get_bind: Any = None
        if sync_engine is None:
            self._hooks = _unbound_hooks()
        else:
            self._hooks, _ = self._on_engines(
                settings, lambda mine: hooks_for(sync_engine, self, settings=mine)
            )

    def _on_engines(
        self, settings: tuple[Any, ...], join: Callable[[tuple[Any, ...]], T]
    ) -> tuple[T, tuple[Any, ...]]:
        """``join(settings)`` (the factory's :func:`engine_settings`): checking or taking its
        engines' hooks, refused (``ValueError``) where another factory holds them with other
        settings; and the settings it joined with. A factory of the environment's
        configuration refused after a reload applied another one since it read its own (made
        while the reload ran: the factories already on the engine have what the reload
        switched, the kill switch or the guard, and this one what it read before) takes the
        reload's configuration, as its registration would (see register_default_user), and
        joins with that: it was refused, though made as the others were."""
        while True:
            try:
                return join(settings), settings
            except ValueError:
                if self._explicit_config or not reloaded_since(self._config_read_at):
                    raise
            self._config_read_at = STATE.reloads
            self.config = factory_config()
            policy: Policy | None = getattr(self, "policy", None)  # (made between the two)
            if policy is not None:
                policy.apply_config(self.config)
            settings = engine_settings(self.config, self.classifier)

    def _connect_policy_call(self, connect: Callable[[], T]) -> T:
        """The drop-in connect retry (sync code; in async, inside SQLAlchemy's greenlet). Inside
        a unit or a replaying operation (see :func:`runs_once_here`) it connects once: the
        enclosing one retries (the loops would multiply, and the deadline with them). The
        breaker is not asked again inside an attempt it let through (see :func:`admitted_by`)."""
        policy = self.policy
        policy.refresh()
        enclosing = part_of_running(policy)
        if runs_once_here():
            return connect() if enclosing is not None else policy.call_once(connect)
        if enclosing is not None:  # an operation of this service that does not retry: the
            # connect does, its first try part of the operation's attempt (counted once)
            policy = policy.retries_in_attempt(enclosing.breaker)
        return policy.call(connect)

    def _register(self) -> None:
        cls: Any = getattr(self, "class_", None)
        kw: dict[str, Any] = getattr(self, "kw", {})
        if not (isinstance(cls, type) and issubclass(cls, Session)):
            # an async factory: on Session, whatever sync_session_class it (or one session, or
            # configure()) is given, which it uses as it is and which may be made per factory
            # or per tenant: SQLAlchemy's event registry keeps an entry for every class that
            # listened, for good (a sync factory's listening base is released instead)
            cls = Session
        install_connect_retry(cls)
        # the engines of ``binds=`` are the factory's too: their connections get the same
        # hooks (their COMMITs marked, dead ones discarded at checkout, disconnects handled)
        main = self._referee.engine
        for engine in factory_engines(main, (kw.get("binds") or {}).values()):
            if engine is not main:
                hooks_for(engine, self)
        if not self._explicit_config:
            register_default_user(self, read_at=self._config_read_at)
        self._prepare_bound_connection()
        say_databases_sharing(self)

    def _prepare_bound_connection(self) -> None:
        """A ``Connection`` the factory is bound to may have been checked out before its engine
        had the factory's hooks (``conn = engine.connect(); ResilientSession(conn)``): it never
        passed their checkout, so its COMMITs would carry no marker and a lost answer, even a
        read's, could never be settled. It is prepared now, as the checkout does (idempotent),
        when it is idle (not inside a transaction of its own). An ``AsyncConnection``'s can't be
        prepared outside SQLAlchemy's greenlet: it is not looked at here."""
        bind = getattr(self, "kw", {}).get("bind")
        hooks = self._hooks
        if (
            isinstance(bind, Connection)
            and isinstance(hooks, EngineHooks)
            and hooks.config.enabled
            and not bind.closed
            and not bind.invalidated
            and not bind.in_transaction()
        ):
            hooks.commit.prepare(bind.connection.dbapi_connection)

    def configure(self, **new_kw: Any) -> None:
        """As ``sessionmaker.configure``. A new ``bind`` becomes the factory's engine (its
        sessions', where their commits are verified; for a ``Connection`` whose transaction the
        sessions join, SQLAlchemy's recipe for tests, its engine) and gets the factory's engine
        hooks first, as do the engines of a new ``binds``: a factory made without a bind, or
        configured onto another engine, has commit verification, disconnect handling and the
        dead-connection check there. Engine hooks that can't be had (another factory on that
        engine with other engine-wide settings: ``ValueError``) leave the factory as it was.
        The factory's own keywords (``config=``, ``service=``...) are given when it is made:
        ``TypeError`` here (unless your session class takes them)."""
        refuse_own_keywords_in_configure(self, new_kw)
        refuse_session_classes(type(self), new_kw)
        refuse_unknown_session_keywords(type(self), new_kw, factory=self)
        bind = new_kw.get("bind")
        binds = list((new_kw.get("binds") or {}).values())
        engine = None if bind is None else self._engine_to_bind(bind)
        if engine is None and binds and isinstance(self._hooks, _UnboundHooks):
            engine = self._engine_to_bind(binds[0])  # as made with binds= alone
        sync = None if engine is None else getattr(engine, "sync_engine", engine)
        with STATE.lock:
            # every engine checked before the factory registers on any
            mine = engine_settings(self.config, self.classifier)
            refuse_disagreeing(factory_engines(sync, binds), mine)
            hooks = None if sync is None else hooks_for(sync, self)
            self._hook_engines(binds)
        super().configure(**new_kw)  # type: ignore[misc]
        if hooks is not None and hooks is not self._hooks:
            old = self._hooks
            old.factories.discard(self)
            remaining = list(old.factories)
            if remaining and isinstance(old, EngineHooks) and old.service == self.service:
                # the engine's lines are said under a factory still on it (see _speaker)
                old.config, old.service = remaining[-1].config, remaining[-1].service
            self.engine = engine
            self._referee.engine = sync
            self._hooks = hooks
        if bind is not None:
            self._prepare_bound_connection()
        if hooks is not None or binds:
            say_databases_sharing(self)

    def _hook_engines(self, targets: Iterable[Any], *, register: bool = True) -> None:
        """Give the engines of ``targets`` (engines, async engines, connections; anything else
        is left alone) this factory's engine hooks (see :meth:`configure`); ``register=False``
        for the binds of one session (see :func:`hooks_for`)."""
        for target in targets:
            engine = engine_behind(target)
            if engine is not None:
                hooks_for(engine, self, register=register)

    def _route_engines(self, holder: type[Session]) -> None:
        """Give ``holder`` (a class of this factory's own, made of the session class you gave)
        a ``get_bind`` for its sessions when your class picks engines itself (see
        :func:`_picks_engines`); nothing when it doesn't (its engines are the factory's
        ``bind`` and ``binds``, hooked already).

        It returns what your class's ``get_bind`` picks, looked up on your class at each call
        as ``sessionmaker``'s class does (a ``get_bind`` replaced after the factory was made,
        patched in a test, routes), and gives each engine picked the factory's engine hooks
        the first time (as the engines of ``binds=`` get them when the factory is made):
        before the session connects there, so the engine's connections are made under its
        hooks, its COMMITs marked and a lost answer settled in its database. An engine whose
        hooks another factory holds with other engine-wide settings is refused with the
        ``ValueError`` of :func:`hooks_for`, at the statement that picked it. Wrapping the
        class's method is the only point where a routed engine is known before its connection
        is made: SQLAlchemy has no event there."""
        if not _picks_engines(holder):
            return
        factory = weakref.ref(self)
        hooked: weakref.WeakSet[Any] = weakref.WeakSet()

        def get_bind(session: Session, *args: Any, **kw: Any) -> Any:
            bind = super(holder, session).get_bind(*args, **kw)  # type: ignore[misc]
            engine = engine_behind(bind)
            if engine is not None and engine not in hooked:
                made_by = factory()
                if made_by is not None:
                    hooks_for(engine, made_by)
                    say_databases_sharing(made_by)  # (once per engine, as the hooks)
                hooked.add(engine)
            return bind

        setattr(holder, "get_bind", get_bind)  # noqa: B010 (a method, set on our class)

    def _route_later(self) -> None:
        """(sync) The factory's class picks its engines now, though it did not when the factory
        was made (or when this was last looked at): a ``get_bind`` added to your class since,
        by the application or a test (``mock.patch.object``, ``monkeypatch.setattr``). Its
        engines get the factory's hooks as those of a ``get_bind`` present when the factory
        was made do (see :meth:`_route_engines`), before the session connects there. Called
        by the factory for a new session when the class's ``get_bind`` is not the one it saw
        last (an identity check, on the same line as the one for the session's own
        keywords). A ``get_bind`` set on the factory's class itself (``Session.class_``), not
        on yours, is left as it is: it routes, its engines hooked when a transaction first
        begins there (see :func:`_hook_engine_met`)."""
        holder = self.class_  # type: ignore[attr-defined]
        if "get_bind" not in vars(holder):
            self._route_engines(holder)
        self._get_bind = holder.get_bind

    def _routed(self, local_kw: dict[str, Any]) -> dict[str, Any]:
        """(async) The keywords of a new session: its sync session class (the one given to the
        factory, to ``configure()`` or for this session, or your ``class_``'s) replaced by a
        subclass of it made for this factory (see :meth:`_own_sync_class`), as a sync
        factory's sessions are of a subclass of your ``class_``. Looked at for every new
        session (an identity check), so that a class given a ``get_bind`` after the factory
        was made (by the application or a test: ``mock.patch.object``,
        ``monkeypatch.setattr``) has its engines hooked as one that had it from the start."""
        kw: dict[str, Any] = getattr(self, "kw", {})  # (the async_sessionmaker's)
        given: Any = (
            (local_kw and local_kw.get("sync_session_class"))
            or kw.get("sync_session_class")
            or getattr(getattr(self, "class_", None), "sync_session_class", None)
        )
        # (every async session passes here: a class seen before, whose get_bind is the one it
        # had then, leaves at once)
        entry = self._routes.get(given)
        if entry is not None and entry[1].get_bind is entry[2]:
            return {**local_kw, "sync_session_class": entry[0]}
        return self._own_sync_class(given, entry, local_kw)

    def _own_sync_class(
        self, given: Any, entry: tuple[Any, Any, Any] | None, local_kw: dict[str, Any]
    ) -> dict[str, Any]:
        """(async) :meth:`_routed` for a sync session class ``given`` not seen before
        (``entry`` None), or whose ``get_bind`` changed since. Its sessions are of a subclass
        of it made for this factory (same ``__name__``, ``__qualname__`` and ``__module__``;
        your class, and maybe other factories' too, is left as it is):

        - its ``bulk_save_objects`` notes the new objects it keys in an attempt of a unit or
          operation (see ``_bulk_save_objects_of``), as a sync factory's sessions' does: they
          never join the session, and a replay took them for saved rows (UPDATEs matching
          nothing: asyncpg, which reports no row counts for a batch, let them pass as done);
        - where your class picks engines (see :meth:`_route_engines`), its ``get_bind`` is the
          routing one. On the class, not on the session: a session copied from it
          (SQLAlchemy's ``using_bind`` recipe copies ``vars(session)`` into a new session of
          your class) must route as its own class does, not as the session it was copied
          from.

        A sync ``sessionmaker`` given is replaced by a copy of it that makes sessions of the
        subclass of its class, its keywords shared (its ``configure()`` reaches them), its
        listeners heard."""
        if entry is None:
            # (a class given for one session is checked here, as the factory's are when given)
            refuse_session_classes(type(self), {"sync_session_class": given})
            cls = sync_class_of(given)
            own: Any = _noting_subclass(cls)
            register_class(own, self)  # (its sessions name this factory)
            prime_class_listeners(own)  # (before its first session: see there)
            made = own
            if given is not cls:
                made = copy.copy(given)
                made.class_ = own
        else:
            made, own, _ = entry
        if "get_bind" not in vars(own):
            self._route_engines(own)
        self._routes[given] = (made, own, own.get_bind)
        return {**local_kw, "sync_session_class": made}

    def _engine_to_bind(self, bind: Any) -> Any:
        """The engine of ``bind`` given to :meth:`configure` (see :func:`engine_of`)."""
        return engine_of(bind, type(self), f"{type(self).__name__}.configure(bind=...)")

    def _apply_config(self, config: Config) -> None:
        self.config = config
        self.policy.apply_config(config)
        hooks = self._hooks
        if isinstance(hooks, _UnboundHooks):
            return  # no engine yet: its hooks get this configuration when it is bound
        mine = engine_settings(config, self.classifier)
        for other in list(hooks.factories):
            # a factory of the environment's configuration gets this one too in the same
            # reload (maybe after this one): judged by what it is about to have
            theirs = engine_settings(
                other.config if other._explicit_config else config, other.classifier
            )
            if other is not self and theirs != mine:
                # reload_config gave this factory settings another one on its engine does not
                # share (an explicit config=): the engine-wide hooks follow the reload. Said
                # under the other factory's configuration when this one's says nothing (the
                # reload switched self-healing or logging off): that factory is the one that
                # loses what it was configured for (its COMMITs unmarked, say)
                speaker = config if config.enabled and config.logging_on else other.config
                emit(
                    speaker,
                    log_session,
                    logging.WARNING,
                    "Factories on one engine disagree after a reload: service=%s and "
                    "service=%s (%s); engine-wide handling (commit verification, disconnect "
                    "handling, the trigger's errors) follows service=%s, also for service=%s",
                    self.service,
                    other.service,
                    _settings_diff(theirs, mine),
                    self.service,
                    other.service,
                    service=other.service,
                    event="engine_settings_conflict",
                )
                break
        hooks.config = config
        hooks.settings = mine
        hooks.commit.warn_unsupported()  # if this reload switched self-healing on

    def __repr__(self) -> str:
        # sessionmaker's own (its class, its bind, your arguments, as they are now), with the
        # service first: ResilientSession(service='orders', class_='Session', bind=Engine(...))
        name, _, arguments = super().__repr__().partition("(")
        return f"{name}(service={self.service!r}, {arguments}"


#: ``Session.get_bind`` as imported (see ``_picks_engines``)
_PLAIN_GET_BIND: Final[Any] = Session.get_bind


def engine_of(bind: Any, factory: type, where: str) -> Any:
    """The engine a factory of class ``factory`` takes from ``bind`` (``where``: what takes
    it, for the error): an ``Engine`` (an ``AsyncEngine`` for an async factory), or the engine
    of a connection whose transaction its sessions join (SQLAlchemy's recipe for tests); else
    ``TypeError``."""
    if issubclass(factory, async_sessionmaker):
        if isinstance(bind, AsyncConnection):
            return _usable_url(bind.engine, where)
        if isinstance(bind, AsyncEngine):
            return _usable_url(bind, where)
        wanted, instead = "an AsyncEngine", "for a sync Engine use ResilientSession"
    else:
        if isinstance(bind, Connection):
            refuse_async_driver(bind.engine, where)
            return _usable_url(bind.engine, where)
        if isinstance(bind, Engine):
            refuse_async_driver(bind, where)
            return _usable_url(bind, where)
        wanted, instead = "an Engine", "for an AsyncEngine use AsyncResilientSession"
    replacement = _in_place_of(bind)
    if replacement:
        raise TypeError(f"{where} takes {wanted}, got {type(bind).__name__}: {replacement}")
    raise TypeError(
        f"{where} takes {wanted}, got {type(bind).__name__} (a connection whose transaction "
        f"its sessions join works too, or no bind until configure(bind=...); {instead})"
    )


def _usable_url(engine: Any, where: str) -> Any:
    """``engine``, unless its URL's host holds an ``@``: SQLAlchemy (and libpq) end a password
    at its first ``@`` and take the rest for the host, so every connect would fail to resolve
    a host named by the end of the password (in the driver's error, the engine's repr). Said
    here, naming neither."""
    if "@" in (engine.url.host or ""):
        raise ValueError(
            f"{where}: the engine's URL has an @ in its host: its password holds an unencoded "
            "@, where the URL's parser ends it (the rest would be taken for the host); "
            "percent-encode it (%40), or give the password with sa.URL.create(...)"
        )
    return engine


def _in_place_of(bind: Any) -> str:
    """For an application's own ``sessionmaker`` (or ``async_sessionmaker``) given as the bind,
    as if the factory wrapped it: how to make the resilient factory in its place instead, with
    its engine, keywords and session class (a newcomer's first try, whose plain "takes an
    Engine" said nothing of the fix); "" for anything else."""
    if isinstance(bind, FactoryCore) or not isinstance(bind, (sessionmaker, async_sessionmaker)):
        return ""
    default: type
    if isinstance(bind, async_sessionmaker):
        name, kind, engine = "AsyncResilientSession", "an async_sessionmaker", "AsyncEngine"
        default, cls = AsyncSession, bind.class_
    else:
        name, kind, engine, default = "ResilientSession", "a sessionmaker", "Engine", Session
        # sessionmaker makes a subclass of the class it is given
        cls = bind.class_.__bases__[0]
    kw = dict(bind.kw)
    words = [f"<its {engine}>"] if kw.pop("bind", None) is not None else []
    for key, value in kw.items():
        if key in ("autoflush", "expire_on_commit") and value is True:
            continue  # sessionmaker keeps its defaults among the keywords: the factory's too
        simple = value is None or isinstance(value, (bool, int, float, str))
        words.append(f"{key}={value!r}" if simple else f"{key}=...")
    if cls is not default:
        words.append(f"class_={cls.__name__}")
    return (
        f"{name} is {kind} itself: make it in place of yours, with its engine and keywords, "
        f"rdb.{name}({', '.join(words)}), and use it wherever yours was used (give it "
        "service=, the name of its circuit breaker)"
    )


def refuse_async_driver(engine: Engine | None, where: str) -> None:
    """A sync factory given the sync ``Engine`` behind an ``AsyncEngine`` (its
    ``sync_engine``): its driver is async, and every statement would fail with
    ``MissingGreenlet``."""
    if engine is not None and engine.dialect.is_async:
        raise TypeError(
            f"{where} takes a sync Engine, got one whose driver ({engine.dialect.driver}) is "
            "async: the sync_engine of an AsyncEngine (or a Connection of it, as run_sync "
            "gives), whose statements run only inside SQLAlchemy's greenlet there. Use "
            "AsyncResilientSession with the AsyncEngine itself (its units' sessions run "
            "sync code through run_sync), or make a sync engine (create_engine with a sync "
            "driver, such as postgresql+psycopg)"
        )


def _class_name(value: Any) -> str:
    """A class by its name, a function by its module's and name (``time.sleep``), anything
    else by its type's: ``a str``."""
    name = getattr(value, "__qualname__", None)
    if isinstance(name, str):
        module = getattr(value, "__module__", None)
        if isinstance(value, type) or module in (None, "builtins", "__main__"):
            return name
        return f"{module}.{name}"
    if value is None:
        return "None"
    kind = type(value).__name__
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def refuse_session_classes(factory_class: type, kw: Mapping[str, Any]) -> None:
    """``class_`` (and, async, ``sync_session_class``) of a factory's keywords ``kw`` are
    session classes of the factory's kind: ``TypeError`` naming the mix-up otherwise, raised
    before anything of the factory is set up (SQLAlchemy would fail later, deep inside, or
    at the first unit)."""
    is_async = issubclass(factory_class, async_sessionmaker)
    cls = kw.get("class_", AsyncSession if is_async else Session)
    sync_class = sync_class_of(kw.get("sync_session_class", Session))
    if not is_async:
        if not (isinstance(cls, type) and issubclass(cls, Session)):
            instead = (
                ", an async session class: for async code use AsyncResilientSession with an "
                "AsyncEngine"
                if isinstance(cls, type) and issubclass(cls, AsyncSession)
                else ""
            )
            raise TypeError(
                "ResilientSession(class_=...) takes a Session subclass (sqlalchemy.orm.Session "
                f"or yours), got {_class_name(cls)}{instead}"
            )
        return
    if not (isinstance(cls, type) and issubclass(cls, AsyncSession)):
        instead = (
            ", a sync session class: give it as sync_session_class= (the class of each "
            "AsyncSession's sync_session), or use ResilientSession with a sync Engine"
            if isinstance(cls, type) and issubclass(cls, Session)
            else ""
        )
        raise TypeError(
            "AsyncResilientSession(class_=...) takes an AsyncSession subclass, got "
            f"{_class_name(cls)}{instead}"
        )
    if isinstance(kw.get("sync_session_class"), FactoryCore):
        raise TypeError(
            "AsyncResilientSession(sync_session_class=...) takes a sync Session subclass or a "
            "plain sessionmaker, got a ResilientSession: its sessions would be that factory's, "
            "not this one's (give its class_, or a sessionmaker of it, for its listeners)"
        )
    if not (isinstance(sync_class, type) and issubclass(sync_class, Session)):
        instead = (
            ", the async session class: give it as class_="
            if isinstance(sync_class, type) and issubclass(sync_class, AsyncSession)
            else ""
        )
        raise TypeError(
            "AsyncResilientSession(sync_session_class=...) takes a sync Session subclass "
            "or a sessionmaker of one (the class of each AsyncSession's sync_session), got "
            f"{_class_name(sync_class)}"
            f"{instead}"
        )


#: what the injectable timing keywords take
_TIMING = {
    "sleep": "a function of seconds (time.sleep, say)",
    "asleep": "an async function of seconds (asyncio.sleep, say)",
    "clock": "a function returning monotonic seconds (time.monotonic, say)",
    "wall_clock": "a function returning seconds (time.time, say), or None",
}


def is_async_callable(fn: Any) -> bool:
    """An async function, a ``functools.partial`` of one, or an object whose ``__call__`` is
    one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    return inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))  # noqa: B004


def refuse_bad_timing(kw: Mapping[str, Any]) -> None:
    """The sleep and clocks a factory is given (``sleep``/``asleep``, ``clock``,
    ``wall_clock``) are checked where they are given: used only at the first transient error
    (a backoff, a deadline), a mistake would replace that error with a ``TypeError`` there."""
    for name, what in _TIMING.items():
        if name not in kw or (name == "wall_clock" and kw[name] is None):
            continue
        value = kw[name]
        if not callable(value):
            raise TypeError(f"{name}= takes {what}, got {_class_name(value)}")
    if "asleep" in kw and not is_async_callable(kw["asleep"]):
        raise TypeError(
            f"asleep= takes {_TIMING['asleep']}: the backoff awaits what it returns, and "
            f"{_class_name(kw['asleep'])} is no async function (async def, or a "
            "functools.partial of one)"
        )
    if "sleep" in kw and is_async_callable(kw["sleep"]):
        raise TypeError(
            f"sleep= takes {_TIMING['sleep']}, called in sync code: "
            f"{_class_name(kw['sleep'])} is an async function, whose coroutine would never be "
            "awaited (no backoff at all); for async code use AsyncResilientSession(asleep=...)"
        )


#: what pybreaker calls on each listener, and on a state storage (read from its class: a
#: storage's ``state`` may be a property asking Redis)
_LISTENER_METHODS = ("before_call", "failure", "success", "state_change")
_STORAGE_MEMBERS = (
    "state",
    "counter",
    "success_counter",
    "opened_at",
    "increment_counter",
    "reset_counter",
    "increment_success_counter",
    "reset_success_counter",
)


def refuse_bad_breaker_parts(kw: dict[str, Any]) -> None:
    """``breaker_storage=`` and ``breaker_listeners=`` are checked where they are given, before
    the service is known to health() or its breaker is made: pybreaker would fail on them
    later (at the breaker's making, or at its first state change) with an error naming
    neither. ``breaker_listeners`` is kept as a tuple (a generator given is read once)."""
    storage = kw.get("breaker_storage")
    if storage is not None:
        # (read from its class, or its instance's own attributes, never through a property)
        own = getattr(storage, "__dict__", {})
        missing = [n for n in _STORAGE_MEMBERS if not (hasattr(type(storage), n) or n in own)]
        if missing or isinstance(storage, type):
            raise TypeError(
                "breaker_storage= takes a pybreaker state storage (pybreaker."
                "CircuitRedisStorage(...), say, or None for one in memory), got "
                f"{_class_name(storage)}"
                + (
                    ": a class; give an instance of it"
                    if isinstance(storage, type)
                    else ""
                    if len(missing) == len(_STORAGE_MEMBERS)
                    else f", which has no {', '.join(missing)}"
                )
            )
    listeners = kw.get("breaker_listeners", ())
    if isinstance(listeners, (str, bytes, Mapping)) or not isinstance(listeners, Iterable):
        raise TypeError(
            "breaker_listeners= takes a sequence of pybreaker listeners ((listener,), say), "
            f"got {_class_name(listeners)}"
        )
    listeners = tuple(listeners)
    for listener in listeners:
        missing = [n for n in _LISTENER_METHODS if not callable(getattr(listener, n, None))]
        if missing or isinstance(listener, type):
            raise TypeError(
                "breaker_listeners= takes pybreaker listeners (instances of a "
                "pybreaker.CircuitBreakerListener subclass), got "
                f"{_class_name(listener)}"
                + (
                    ": a class; give an instance of it"
                    if isinstance(listener, type)
                    else f", which has no {', '.join(missing)}()"
                )
            )
    if "breaker_listeners" in kw:
        kw["breaker_listeners"] = listeners


class _UnboundHooks:
    """The engine hooks of a factory made without a bind (``ResilientSession()``, bound at
    start-up with ``configure(bind=engine)``, or whose session class picks its engines), until
    it has one: no commit protocol of its own (:data:`_UNBOUND_PROTOCOL`). Its units' COMMITs
    are marked by the hooks of the
    engines their sessions reach (:meth:`FactoryCore._route_engines`); with no engine at all
    a statement is refused by SQLAlchemy itself, as for sessionmaker."""

    commit = _UNBOUND_PROTOCOL

    def __init__(self) -> None:
        self.factories: weakref.WeakSet[FactoryCore] = weakref.WeakSet()


def _unbound_hooks() -> EngineHooks:
    """:class:`_UnboundHooks` where the factory keeps its engine's hooks (nothing but
    :meth:`FactoryCore.configure` and ``_apply_config``, which look for it, touches more than
    ``commit`` and ``factories`` of them; a unit takes its ``commit``, :data:`_UNBOUND_PROTOCOL`,
    as "no engine of the factory's own", see :func:`flush_and_commit`)."""
    return _UnboundHooks()  # type: ignore[return-value]


# -- engine hooks ------------------------------------------------------------------------------
def _sent_in_autocommit(connection: Any) -> bool:
    """Whether the driver's connection under a ``Connection`` whose statement failed is in
    autocommit (the DBAPI's ``autocommit``: psycopg's, SQLAlchemy's asyncpg adapter's)."""
    if connection is None:
        return False
    try:
        return bool(getattr(connection.connection.dbapi_connection, "autocommit", False))
    except Exception:  # (a connection already closed or invalidated)
        return False


def _whose_plain_commit() -> str:
    """Whose unmarked COMMIT it is, for a line about its unknown outcome: drop-in code's, or
    that of a unit begun with self-healing off (see ``commit_plainly``)."""
    unit = current_unit.get()
    if unit is not None and not unit_here(unit):
        unit = None  # (a copy of an ended unit's context, another thread's: see unit_here)
    if unit is None and async_units:  # an async unit's, by its task
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop running in this thread
            task = None
        unit = async_units.get(task)
    return (
        "a COMMIT sent outside a unit (drop-in use)"
        if unit is None
        else "a COMMIT of a unit begun with self-healing off (SELF_HEALING_ENABLED=false, "
        "switched on by a reload before its COMMIT: the COMMIT was not marked, so its "
        "outcome can't be verified, and the unit is not replayed)"
    )


def refused_unsure_again(exc: BaseException) -> bool:
    """For a 25006 (``exc``) on a client connection whose login was told the server takes no
    writes, where the server asked now says it takes them (see
    ``_classify.refused_by_a_writable_server``): whether it is the application's own read-only
    write (True) or a lost server (False). It may be either: the unit's own read-only
    transaction, or a refusal by the server that transaction ran on (a hot standby) while the
    question reached another (behind a transaction-mode PgBouncer pointed at the primary in
    between; a standby promoted between the refusal and the question), which a replay heals.
    So the first such refusal in a unit (a ``run()`` unit, a ``with_self_healing`` operation:
    its attempts) is a lost server, replayed as when nothing was asked; a second one there (a
    replay refused again, by a server that by then answers it takes writes) the unit's own,
    raised at once. Outside a unit (drop-in use) a lost server: its caller decides whether to
    run it again.

    State only on this path: the attempt's record is marked (a second one in it), and
    ``exc``, which the retry loop sees as the attempt fails, to tell the unit's next attempts
    (:data:`~._statements.refused_unsure_before`, see ``Policy._call_retrying``; a task or a
    thread started in those replays runs units of its own)."""
    attempt = running_attempt()  # (not an ended one: a task's made in it)
    if attempt is None:
        return False
    if attempt.refused_unsure or refused_unsure_here():  # (this unit's replays: see there)
        return True
    attempt.refused_unsure = True
    mark_refused_unsure(exc)
    return False


class EngineHooks:
    """Installed once per engine: disconnect classification in ``handle_error``, mapping of the
    transition trigger's SQLSTATE, a cheap dead-connection check at pool checkout, and the
    commit protocol's events."""

    def __init__(
        self, engine: Engine, config: Config, classifier: Classifier, service: str = "database"
    ) -> None:
        self.config = config
        self.classifier = classifier
        #: what the hooks act on (:func:`engine_settings`), agreed by the engine's factories:
        #: kept here so that a new factory is checked against it, not against every factory
        self.settings = engine_settings(config, classifier)
        # (the factory's already: the commit protocol below may speak at once)
        self.service = service
        # (hooks_for holds STATE.lock)
        # the guard listens through the protocol's statement listener (every engine has one:
        # registered now, none is added while statements run)
        guard = guard_for_commit_protocol(engine)
        self.commit = CommitProtocol(engine, self, guard)
        self.factories: weakref.WeakSet[FactoryCore] = weakref.WeakSet()
        self._standby_lines = LineLimit()  # writes refused by a hot standby, per server
        self._pool_lines = LineLimit()  # pools replaced, per SQLSTATE

    def after_fork_in_child(self) -> None:
        """New locks in a forked child: the commit protocol's and the lines' (see
        ``_state._renew_lock_in_child``)."""
        self.commit.after_fork_in_child()
        self._standby_lines.after_fork_in_child()
        self._pool_lines.after_fork_in_child()

    def new_pool_in_child(self, engine: Engine) -> None:
        """In a forked child (see ``_state._renew_lock_in_child``): a new pool for ``engine``,
        these hooks' engine.

        The parent's pooled connections are the parent's: a child that used them would share
        one server session with its parent and its siblings (gunicorn's ``--preload``, Celery's
        prefork pool, ``multiprocessing`` with fork, where the parent used the engine before
        forking), and their answers would cross: rows of another process's query, a unit
        reported done having read another's answer. SQLAlchemy leaves the parent's pool in the
        child (its rule: call ``engine.dispose(close=False)`` there); resilient_db does it for
        every engine its factories hook, as soon as the child exists. The old pool is dropped
        without closing its connections (``close=False``): the drivers leave the session of
        the process that made a connection open when the child frees its object (psycopg 3 and
        psycopg2 alike: tests/test_fork_pool.py). An error of an ``engine_disposed`` listener
        of the user's (SQLAlchemy calls them once the new pool is in place) is logged, not
        raised: the fork must not fail, nor leave the next engines with the parent's pool."""
        try:
            engine.dispose(close=False)
        except Exception as exc:  # (a user's listener: the new pool is in place already)
            emit(
                self.config,
                log_session,
                logging.WARNING,
                "A forked child gave database %s a new pool, and an engine_disposed listener "
                "raised %s: ignored (the fork goes on)",
                engine.url.database,
                type(exc).__name__,
                service=self.service,
                event="fork_listener_failed",
                error=type(exc).__name__,
            )

    def rollback_twophase(
        self,
        method: Callable[..., Any],
        connection: Connection,
        xid: Any,
        is_prepared: bool = True,
        recover: bool = False,
    ) -> Any:
        """Around the dialect's ``do_rollback_twophase`` (``method``): a connection whose
        rollback of its own two-phase transaction the server refused is invalidated before the
        error goes on, so that the pool does not reset it at checkin. psycopg takes its
        transaction for prepared once ``tpc_prepare()`` has begun, and keeps it so when its
        ROLLBACK PREPARED fails (42704 after a refused PREPARE, which the server had rolled
        back: ``max_prepared_transactions`` 0 refuses every one): every later ``rollback()`` of
        it raises ProgrammingError, so the pool's reset failed, logged at ERROR with a
        traceback ("Exception during reset or similar"), and the pool discarded it then. The
        error is raised as it was (a unit's says the refusal: see :func:`_refused_prepare`).
        Left to SQLAlchemy: a lost connection (no SQLSTATE, or a code this engine takes for a
        disconnect: its ``handle_error`` may replace the whole pool, which it does only for a
        connection not invalidated yet), and a recovery's rollback (``recover``: of an xid
        ended from outside its transaction, which leaves the connection as it was)."""
        try:
            return method(connection, xid, is_prepared=is_prepared, recover=recover)
        except Exception as exc:
            code = sqlstate_of(exc)
            if (
                not recover
                and code is not None
                and not self.classifier.is_disconnect_code(code)
                and not connection.invalidated
            ):
                connection.invalidate()
            raise

    def handle_error(self, ctx: Any) -> BaseException | None:
        if not self.config.enabled:
            lost_commit_while_off(ctx, self.classifier)  # (an unknown outcome: no 503)
            return None
        original = ctx.original_exception
        # (not an attempt that has ended, held by a task or thread made in it: drop-in code's,
        # its lost COMMIT answer said and counted now, under its own factory's service)
        attempt = running_attempt()
        if attempt is not None and attempt.autocommitting is not None:
            attempt.failed(ctx.execution_context, original)
        if marked_replay_safe(original):
            return None  # the commit protocol's own statement failed: the connection is sound
        code = sqlstate_of(original)  # psycopg 3, asyncpg, psycopg2 and pg8000 alike
        if code == READ_ONLY_SQLSTATE and refused_by_a_writable_server(
            ctx.connection,
            original,
            # what the login's report says may be stale (a transaction-mode pooler's client
            # connection keeps it): the server asked, unless the statement was the library's
            # own (a commit check's, a prune's, which handle their errors themselves)
            ask=takes_writes_asked if committing_request() is None and not own_work.get() else None,
            unsure=refused_unsure_again,
        ):
            code = None  # a read-only transaction of the application's on a primary: its bug
        if fenced_server_of(original) is not None:
            # a new connection refused as an old primary's at connect (see
            # CommitProtocol._fence): it is closed already, and the pooled ones stay (made to a
            # server on the newest timeline)
            ctx.is_disconnect = True
            ctx.invalidate_pool_on_disconnect = False
        elif code in ONE_SESSION_ENDED_CODES:
            # the server ended this one session for its own timeout (its transaction's, or its
            # idling outside one: 57P05): the connection is gone (the drivers say so), the
            # pool's others are sound (SQLAlchemy would replace them all, as for a server that
            # went away; others that sat idle as long are ended too, each replaced at its
            # checkout, whose probe sees it closed)
            ctx.is_disconnect = True
            ctx.invalidate_pool_on_disconnect = False
        elif (
            code == PROTOCOL_VIOLATION
            and ctx.connection is not None
            and self.classifier.is_disconnect_code(code)
            and not self.classifier.answered_violation(code, original)
        ):
            # a FATAL 08P01 ends this one client connection, for its own reason: PgBouncer's
            # (its server connection died under it, "server conn crashed?"; query_wait_timeout;
            # an admin's KILL) or PostgreSQL's (a message of this connection's out of step). No
            # server went away for the pool's others: those PgBouncer ended are closed, which
            # their checkout's probe sees, and the rest are sound (in transaction pooling no
            # idle client connection holds a server connection); SQLAlchemy would replace
            # them all, only to log each in to the pooler again
            ctx.is_disconnect = True
            ctx.invalidate_pool_on_disconnect = False
        elif (
            code is not None
            and self.classifier.is_disconnect_code(code)
            and not ctx.is_disconnect
            and not self.classifier.answered_violation(code, original)
        ):
            # e.g. 57P01 after pg_terminate_backend, 25006 on a demoted primary: the connection
            # (and the pool's other connections, made before this moment) must not be reused.
            ctx.is_disconnect = True
            if ctx.connection is None and not ctx.is_pre_ping:
                # while connecting (a FATAL of class 08 at login: PgBouncer's 08P01, a login
                # refused; a check at connect ended): no connection was made, and SQLAlchemy
                # replaces nothing on that path, so nothing is said of the pool (its
                # connections are judged at their checkout: a dead one is replaced there)
                ctx.invalidate_pool_on_disconnect = False
            else:
                ctx.invalidate_pool_on_disconnect = True
                self._pool_invalidated(code)
        elif not ctx.is_disconnect and (
            client_state_broken(original)
            or (code is None and (socket_given_up(original) or refused_in_pipeline(original)))
        ):
            # this one connection is lost although its driver does not say so yet: asyncpg's
            # protocol state is broken (a session the server ended, whose close asyncpg has not
            # read yet), or psycopg gave up on its socket mid-statement before libpq saw it
            # lost, or psycopg left it in pipeline mode (libpq refuses every later query). It
            # must not go back to the pool (its reset would fail); the pool's other
            # connections are judged by their own errors.
            ctx.is_disconnect = True
            ctx.invalidate_pool_on_disconnect = False
        if code == READ_ONLY_SQLSTATE:
            self._refused_read_only(ctx, original)
        if (
            ctx.is_disconnect
            and attempt is not None
            and attempt.disconnected is None
            and isinstance(original, Exception)  # (a cancellation SQLAlchemy takes for one: no)
        ):
            # (what a unit that catches it and goes on fails with next: see
            # lost_with_its_connection)
            attempt.disconnected = ctx.sqlalchemy_exception or original
        statement = ctx.statement
        verdict = verdict_of(statement) if isinstance(statement, str) else 0
        # (a unit's own COMMIT is settled by the protocol)
        if verdict & COMMITS and committing_request() is None:
            # a COMMIT sent as a statement (text("COMMIT"), exec_driver_sql) whose answer was
            # lost may have committed, as session.commit()'s may: an unknown outcome, never a
            # transient error (a web client told to retry would write twice)
            unanswered_commit(original, self.classifier, wrote=True)
        if verdict & COMMITS_MIDWAY or (
            verdict & COMMITS_INSIDE and _sent_in_autocommit(ctx.connection)
        ):
            # a text that goes on after its COMMIT, or a CALL or a DO block in autocommit, may
            # have committed part of its work before its error (the marked drivers' statement
            # paths say so too; this is for the others)
            mark_partly_committed(original)
        # how this engine's classifier (the one its factories agreed on) sees the error, for
        # what answers it later (problem details): drop-in use never reaches the retry engine,
        # which marks a unit's error again as it raises it
        outcome = self.classifier.classify(ctx.sqlalchemy_exception or original)
        mark_outcome(original, outcome)
        if ctx.sqlalchemy_exception is not None:
            mark_outcome(ctx.sqlalchemy_exception, outcome)
        if attempt is not None and code != FAILED_SQLSTATE and isinstance(original, Exception):
            # what the attempt fails with if its code catches this and goes on (see
            # lost_with_its_connection, conflict_left_behind)
            caught = ctx.sqlalchemy_exception or original
            attempt.last_error = caught
            if outcome is Outcome.CONFLICT and code is not None and code.startswith("40"):
                connection = ctx.connection
                root = None if connection is None else connection.get_transaction()
                if root is not None:
                    attempt.conflicted = (caught, root)
        if (
            outcome is Outcome.COMMIT_UNKNOWN
            and committing_request() is None
            and not own_work.get()
        ):
            self._commit_unanswered(attempt, ctx.connection, original)
        elif interrupted_commit(original) and committing_request() is None and not own_work.get():
            self._commit_unanswered(attempt, ctx.connection, original, interrupted=True)
        if self.config.guard_on:
            database_error = ctx.sqlalchemy_exception or original
            config, service = self._speaker()
            mapped = exception_from_db(database_error, log=True, config=config, service=service)
            if mapped is not None:
                return mapped  # SQLAlchemy raises it from the driver's error
        return None

    def _commit_unanswered(
        self,
        attempt: Any,
        connection: Any,
        original: BaseException,
        *,
        interrupted: bool = False,
    ) -> None:
        """A COMMIT that is not a unit's final one (drop-in use, or an operation's own code)
        may have written and lost its answer (``original``, the driver's error; or the server
        said 08007), or an interruption (``interrupted``: ``original`` is a cancelled task's,
        a deadline's, ``KeyboardInterrupt``) cut it off before its answer came: its outcome
        is unknown, counted as a unit's unknown outcome is (an interruption marked for a web
        answer, as a unit's COMMIT so interrupted: see :meth:`CommitReferee.interrupted`, and
        it goes on as it is). Said once: inside an attempt, by the attempt (see
        ``AttemptRecord.commit_unanswered``: its error's ``Not replaying`` line, or a line
        when it ends, its code having caught the error); here for drop-in use, and for a
        unit's that carried no marker: a unit runs without an attempt only when it began with
        self-healing off (it commits plainly, nothing marked, see ``commit_plainly``), a reload
        having switched it on before its COMMIT. Counted and said under the service of the
        factory whose session sent it, where that is known (see :meth:`_commit_speaker`)."""
        config, service = self._commit_speaker(attempt, connection)
        stats_for(service).add("unknown_commits")
        if interrupted:
            mark_commit_interrupted(original, service)
        if attempt is not None:
            attempt.commit_unanswered(original)  # (said once, by the attempt)
            return
        if not interrupted:
            emit(
                config,
                log_session,
                logging.ERROR,
                "Commit outcome unknown: service=%s %s lost its answer, or the server could "
                "not tell (08007): it may have committed; the error is raised as it is: check "
                "before doing the work again",
                service,
                _whose_plain_commit(),
                service=service,
                event="commit_unknown",
            )
            return
        emit(
            config,
            log_session,
            logging.ERROR,
            "Commit interrupted: service=%s %s: the code was interrupted (%s) with its COMMIT "
            "in flight; outcome unknown, not verified: check before doing the work again",
            service,
            _whose_plain_commit(),
            type(original).__name__,
            service=service,
            event="commit_interrupted",
            outcome="unknown",
        )

    def _speaker(self) -> tuple[Config, str]:
        """The configuration and service an engine-wide line is said under: the running unit's
        factory's (its logging settings, its name), else the engine's latest factory's."""
        attempt = running_attempt()  # (not an ended one: a task's made in it)
        return (self.config, self.service) if attempt is None else attempt.speaker

    def _checkout_speaker(self) -> tuple[Config, str]:
        """:meth:`_speaker` at a checkout: outside a unit, the factory of the drop-in session
        connecting in this context (see ``connecting_for``), where one is, not the engine's
        latest factory (a factory per service on one engine, or one on its
        ``execution_options()`` copy: the dead pooled connection one session was handed was
        counted in the other's ``dead_pooled_connections``)."""
        if running_attempt() is None:  # (see _speaker)
            factory = connecting_factory(self)
            if factory is not None:
                return factory.config, factory.service
        return self._speaker()

    def _commit_speaker(self, attempt: Any, connection: Any) -> tuple[Config, str]:
        """:meth:`_speaker` for a COMMIT on ``connection`` (a ``Connection``) whose answer was
        lost: outside a unit, the factory of the drop-in session whose transaction began last
        in this context, when that transaction is the one on ``connection`` (its COMMIT is
        this one), not the engine's latest factory (a factory per service on one engine: the
        lost COMMIT of one was counted in the other's ``unknown_commits``)."""
        if attempt is None:
            ref = dropin_transaction.get()
            transaction = None if ref is None else ref()
            if (
                transaction is not None
                and connection is not None
                and connection in transaction_connections(transaction)
            ):
                factory = factory_of(transaction.session)
                if isinstance(factory, FactoryCore):
                    return factory.config, factory.service
        return self._speaker()

    def _pool_invalidated(self, code: str) -> None:
        """The pool's connections are replaced for an error SQLAlchemy does not take for a lost
        connection (its own disconnects invalidate the pool by themselves): said, one line per
        engine every few seconds (a failover fails many units at once; the hooks see each)."""
        config, service = self._speaker()
        stats_for(service).add("pool_invalidations")
        log, unlogged = self._pool_lines.take(code)
        emit(
            config,
            log_session,
            logging.INFO,
            "Replacing the pooled connections: service=%s database %s answered SQLSTATE %s, "
            "which ends its connections' use (a failover, a shutdown): connections made before "
            "now are closed at their next checkout%s",
            service,
            self.commit.engine.url.database,
            code,
            more_since(unlogged),
            log=log,
            service=service,
            event="pool_invalidated",
            sqlstate=code,
            suppressed=unlogged,
        )

    def _refused_read_only(self, ctx: Any, original: BaseException) -> None:
        """A write was refused as read-only (25006), taken for a lost server: if the login's
        report says the server is a hot standby (what the driver was told at connect), mark the
        error with its address, for the retry engine's give-up and the breaker's opening to
        name it, and warn (one line per server every few seconds; the hooks see each).
        Classified as before: a lost connection (an old primary restarted as a standby during
        a failover heals once connections reach the new primary), but a URL that points at a
        standby never heals, and nothing else would say why every write fails.

        Unless the server, asked now, said it takes writes (``answered_takes_writes``: the
        refusal taken for a lost server only as the first such in its unit): then whether a
        standby refused it is not known (a switchover behind a pooler, or the application's
        own read-only write after a promotion), so its line says so, and nothing is marked or
        counted as a standby's."""
        conn = ctx.connection
        if conn is None or conn.closed or conn.invalidated:
            return
        try:
            driver = conn.connection.driver_connection
        except Exception:
            return
        server = hot_standby_server(driver)
        if server is None:
            return  # a transaction made read-only on a primary (or a server before 14)
        config, service = self._speaker()
        if answered_takes_writes(original):
            log, unlogged = self._standby_lines.take((server, "unsure"))
            emit(
                config,
                log_session,
                logging.WARNING,
                "Write refused as read-only (SQLSTATE 25006), unsure by whom: service=%s "
                "database %s at %s was a hot standby at login, and the server asked now says "
                "it takes writes (a switchover behind a pooler, or a promotion since): the "
                "refusal is taken for a lost server and replayed once in a unit (a second one "
                "there is raised as the application's own read-only write)%s",
                service,
                self.commit.engine.url.database,
                server,
                more_since(unlogged),
                log=log,
                service=service,
                event="refused_write_unsure",
                server=server,
                sqlstate=READ_ONLY_SQLSTATE,
                suppressed=unlogged,
            )
            return
        mark_hot_standby(original, server)  # found through SQLAlchemy's error too (its .orig)
        log, unlogged = self._standby_lines.take(server)
        stats_for(service).add("hot_standby_refused_writes")  # each one (the line is limited)
        emit(
            config,
            log_session,
            logging.WARNING,
            "Write refused by a hot standby: service=%s database %s at %s is a read-only "
            "standby in recovery (SQLSTATE 25006); its units are retried as after a failover "
            "and the circuit breaker may open. A URL that reaches a standby by mistake never "
            "heals: %s%s",
            service,
            self.commit.engine.url.database,
            server,
            HOT_STANDBY_FIX,
            more_since(unlogged),
            log=log,
            service=service,
            event="hot_standby_refused_write",
            server=server,
            sqlstate=READ_ONLY_SQLSTATE,
            suppressed=unlogged,
        )

    def do_connect(self, dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        """Drop-in use: connect under the session's factory policy (retried: nothing was sent).

        Returning a connection ends SQLAlchemy's ``do_connect`` chain, so this only acts while it
        is the chain's last listener: one of yours registered later (say, one that sets a fresh
        password token in ``cparams``) is never skipped; the connect then is not retried.
        """
        if not self.config.enabled:
            return None  # (a connection made now is checked at its first checkout once on)
        record.info[_FRESH_KEY] = True  # (see checkout)
        factory = connecting_factory(self)
        if factory is None:
            return None
        if not _last_do_connect(dialect, self.do_connect):
            return None
        return factory._connect_policy_call(lambda: dialect.connect(*cargs, **cparams))

    def checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        # every unit passes here: a pooled connection seen and prepared before is answered by
        # its probe (kept in the pool record with its prepared driver connection), the rest by
        # _checkout_first below
        probe = record.info.get(_PROBE_KEY)
        if probe is not None and probe[0] is dbapi_connection and self.config.enabled:
            driver = probe[2]
            if driver is not None:
                if probe[1]():
                    self._dead_at_checkout(dbapi_connection)
                if probe[3].token is not self.commit.fence_token:  # (a timeline rose since)
                    self._judge_timeline(dbapi_connection, probe[3])
                # a transaction rolled back before it was returned
                driver._rdb_may_write = driver._rdb_writes = False
                # the connecting session has its connection (see _checkout_first)
                if connecting_for.get() is not None:
                    connecting_for.set(None)
                return
        self._checkout_first(dbapi_connection, record, probe)

    def _checkout_first(self, dbapi_connection: Any, record: Any, probe: Any) -> None:
        """A checkout of a connection not seen (or not prepared) before, or while off."""
        if not self.config.enabled:
            if connecting_for.get() is not None:
                connecting_for.set(None)  # the connecting session has its connection
            # one made before this engine had a resilient factory passed no connect of ours:
            # remembered like one made while off, so that a switch on marks it in use
            self.commit.checked_out_while_off(dbapi_connection)
            return
        info = record.info
        if probe is None or probe[0] is not dbapi_connection:
            # first seen here: made before this engine had a resilient factory (prepared
            # below), or while self-healing was off, and checked; or just made (our do_connect
            # saw it), and not checked, as SQLAlchemy's pre-ping checks no fresh one: a pool
            # retries a checkout once, so a dead pooled connection followed by a new one the
            # server ended at once raised "This connection is closed", not a disconnect; such
            # a connection fails its first statement as one instead
            probe = (dbapi_connection, dead_probe(dbapi_connection, info), None, None)
            info[_PROBE_KEY] = probe
            dead = not info.pop(_FRESH_KEY, False) and probe[1]()
        else:
            dead = probe[1]()
        if dead:
            self._dead_at_checkout(dbapi_connection)
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if getattr(driver, "_rdb_mode", None) is not None:
            # a transaction rolled back before it was returned
            driver._rdb_may_write = driver._rdb_writes = False
        else:
            # made before this engine had a resilient factory: prepare it now (psycopg), or
            # have the pool replace it with one made through our do_connect (asyncpg, once)
            if self.commit.needs_replacing(dbapi_connection, record):
                replace_at_checkout(dbapi_connection, "connection made before the commit protocol")
            self.commit.prepare(dbapi_connection, record)
        if getattr(driver, "_rdb_mode", None) is not None:  # prepared (stays so): fast from now
            fence = self.commit.fence_of(driver)
            info[_PROBE_KEY] = (dbapi_connection, probe[1], driver, fence)
            if fence.token is not self.commit.fence_token:
                self._judge_timeline(dbapi_connection, fence)
        # the connecting session has its connection, a live one: not before, since a pooled
        # connection found dead above is replaced by a connect that is still the session's (it
        # retries as the session's first connect does: a restart leaves the pool full of dead
        # connections while the server still refuses)
        if connecting_for.get() is not None:
            connecting_for.set(None)

    def _judge_timeline(self, dbapi_connection: Any, fence: Fence) -> None:
        """A pooled connection judged by its timeline under an older fence token (see
        ``CommitProtocol.judge_pooled``): kept, or refused as a new one to its server would be
        (an old primary's, made before the engine saw the promoted standby: the same ERROR
        line and counter) and replaced by the pool, whose new connection is checked at
        connect."""
        try:
            refused = self.commit.judge_pooled(fence, dbapi_connection)
        except Exception:  # (its server asked its cluster, the connection lost meanwhile)
            debug_failure(log_session, "a pooled connection was lost while judged by timeline")
            replace_at_checkout(dbapi_connection, "connection lost while judged by timeline")
        if refused is not None:
            replace_at_checkout(dbapi_connection, refused)

    def _dead_at_checkout(self, dbapi_connection: Any) -> NoReturn:
        """A pooled connection found dead (its backend ended: a restart, a failover,
        ``pg_terminate_backend``): counted and said here, where one is found, so that a live
        checkout pays nothing for it; the pool replaces it. One line per engine every few
        seconds (a failover or a restart leaves every pooled connection dead: one line each
        would be a storm; the counter and the hooks see each)."""
        config, service = self._checkout_speaker()
        stats_for(service).add("dead_pooled_connections")
        log, unlogged = self._pool_lines.take(_DEAD_LINES)
        emit(
            config,
            log_session,
            logging.INFO,
            "Discarded a dead pooled connection at checkout: service=%s%s",
            service,
            more_since(unlogged),
            log=log,
            service=service,
            event="dead_pooled_connection",
            suppressed=unlogged,
        )
        replace_at_checkout(dbapi_connection, "pooled connection was closed by the server")


#: the key of the dead pooled connections' lines in an engine's ``_pool_lines`` (the others
#: are SQLSTATEs)
_DEAD_LINES: Final = "dead pooled connection"


def _picks_engines(session_class: type[Session]) -> bool:
    """Whether sessions of ``session_class`` pick their engines themselves: it overrides
    ``Session.get_bind`` (SQLAlchemy's read/write split and vertical partitioning recipes,
    ``ShardedSession(shards=...)``)."""
    return session_class.get_bind is not _PLAIN_GET_BIND


def engine_settings(config: Config, classifier: Classifier) -> tuple[Any, ...]:
    """What the engine-wide hooks act on: factories sharing an engine must agree on it. (Not
    the logging settings: the engine's own lines follow the latest factory's, which need not
    agree with the others'.)"""
    return (
        config.enabled,
        config.guard_on,
        tuple(sorted((code, outcome.value) for code, outcome in classifier.codes.items())),
    )


def hooks_for(
    engine: Engine,
    factory: FactoryCore,
    *,
    register: bool = True,
    settings: tuple[Any, ...] | None = None,
) -> EngineHooks:
    """Install (once) and return the hooks of ``engine``, for ``factory``.

    ``register=False`` (an engine one session of ``factory`` is bound to): hooks installed
    with ``factory``'s settings where the engine has none, and the engine's own left as they
    are; the factory is not one of the engine's (it neither holds other factories to its
    settings nor is held to theirs, and it speaks for the engine only until one is).

    The hooks are one per engine (disconnect handling, the trigger's error, the checkout check,
    the commit protocol), so every factory on an engine must agree on what they act on
    (:func:`engine_settings`): a factory that does not is refused with a ValueError naming the
    difference, rather than one factory's settings silently overriding another's. The hooks
    keep the settings agreed on (a new factory is compared with them, not with each factory on
    the engine); once every factory on the engine is gone, a new one may bring others.
    ``settings``: the factory's :func:`engine_settings`, where the caller has them already.
    """
    config, classifier, service = factory.config, factory.classifier, factory.service
    mine = engine_settings(config, classifier) if settings is None else settings
    # an ``execution_options()`` copy of an engine shares its pool and dialect, where these
    # hooks listen (and its dispatch joins the engine's): hooks of its own would be a second
    # set heard on every connection of both (each lost COMMIT counted and said twice), and
    # would outlive the copy (a dropped copy's hooks, still listening, raised ReferenceError
    # at the engine's next error). The engine's hooks are the copy's.
    engine = engine_of_options(engine)
    with STATE.lock:
        hooks: EngineHooks | None = STATE.engine_hooks.get(engine)
        if hooks is None:
            hooks = EngineHooks(engine, config, classifier, service)
            event.listen(engine, "handle_error", hooks.handle_error)
            event.listen(engine, "checkout", hooks.checkout)
            event.listen(engine, "close", _drop_probe)
            # each unit's PREPAREs and COMMIT PREPAREDs, where the dialect sends them
            note_dialect_calls(engine.dialect, "do_prepare_twophase", _prepare_twophase)
            wrap_dialect_calls(engine.dialect, "do_commit_twophase", _commit_twophase)
            wrap_dialect_calls(engine.dialect, "do_rollback_twophase", hooks.rollback_twophase)
            own_xids(engine.dialect)
            # the savepoints' names, for a 25006 met in one (see takes_writes_asked)
            note_savepoints(engine.dialect)
            if getattr(engine.dialect, "is_async", False):
                cancellation_after_terminate(engine.dialect)
            event.listen(engine, "do_connect", hooks.do_connect)
            STATE.engine_hooks[engine] = hooks
            if not register:
                hooks.settings, hooks.service = mine, service
                return hooks
        elif not register:
            return hooks
        _refuse_other_settings(hooks, mine)
        hooks.factories.add(factory)
        switched_on = config.enabled and not hooks.config.enabled
        hooks.config = config
        hooks.classifier = classifier
        hooks.settings = mine
        hooks.service = service
        if switched_on:  # the engine's factories were off and are gone: see switched_on
            hooks.commit.switched_on()
        return hooks


#: the pooled connection the pool is replacing at checkout in this context (see
#: :func:`cancellation_after_terminate`), set as the checkout listener raises
replaced_at_checkout: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "resilient_db_replaced_at_checkout", default=None
)


def replace_at_checkout(dbapi_connection: Any, why: str) -> NoReturn:
    """Have the pool replace ``dbapi_connection``, being checked out (``DisconnectionError``
    from the checkout listener), noted for :func:`cancellation_after_terminate`."""
    replaced_at_checkout.set(dbapi_connection)
    raise sa_exc.DisconnectionError(why)


def cancellation_after_terminate(dialect: Any) -> None:
    """Have a cancellation that lands while ``dialect`` terminates a pooled connection the
    factory's checkout listener found dead, or made before the factory (see
    ``EngineHooks.checkout``), delivered at the task's next ``await`` instead (the engine's
    own dialect, wrapped once).

    SQLAlchemy's async adapters close a connection being invalidated gracefully, awaiting the
    server (asyncpg: up to 2 s), and on a cancellation there close it at once and raise the
    ``CancelledError``. The pool's checkout invalidates such a connection outside the part of
    it that gives the slot back on failure, so a unit cancelled there (a client gone, a
    deadline) kept the pool's slot for good: once every slot was gone, each unit waited out
    ``pool_timeout``. Here the connection is closed all the same, and the task cancelled again
    at once: the cancellation comes at the checkout's next ``await``, the replacement's
    connect, where the pool gives the slot back; the task's count of cancellations is left as
    it was (``asyncio.timeout`` still turns it into ``TimeoutError``). Only there: a connection
    invalidated under a statement's error is terminated as SQLAlchemy does (its cancellation
    replaces the error, as the application expects). Written by hand: no SQLAlchemy option or
    event covers this; ``do_terminate`` is the dialect's public method.
    """
    if dialect.__dict__.get("_rdb_terminate_wrapped"):
        return
    terminate = dialect.do_terminate
    if getattr(dialect, "driver", None) == "asyncpg":
        terminate = _closed_within_bound(terminate)

    def do_terminate(dbapi_connection: Any) -> None:
        if replaced_at_checkout.get() is not dbapi_connection:
            terminate(dbapi_connection)
            return
        replaced_at_checkout.set(None)
        try:
            terminate(dbapi_connection)
        except asyncio.CancelledError as cancelled:
            task = asyncio.current_task()
            if task is None:  # (not in a task: nothing to deliver it to later)
                raise
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()  # (counted again by the cancel below)
            task.cancel(*cancelled.args[:1])

    dialect.do_terminate = do_terminate
    dialect._rdb_terminate_wrapped = True


#: how long terminating an asyncpg connection waits for the server, as SQLAlchemy's adapter does
_TERMINATE_SECONDS: Final = 2.0


def _closed_within_bound(terminate: Callable[[Any], None]) -> Callable[[Any], None]:
    """``terminate`` (an asyncpg dialect's ``do_terminate``) made to end within its bound.

    SQLAlchemy's asyncpg adapter terminates a connection being invalidated by closing it
    gracefully with ``close(timeout=2)``, and at once should that time out. asyncpg 0.30 and
    0.31 wait, before that timeout starts, for the cancel request of a statement it cut off
    (``command_timeout``) or whose task was cancelled to be delivered, and then for that
    statement's own answer, without bound: a stalled server (a paused VM: TCP accepted,
    nothing answered) delivers neither, a connection black-holed (new ones get through) or
    lost (asyncpg 0.30 does not end that wait when the socket is) never brings the answer.
    The invalidation, and the unit or the lost COMMIT's check under it, then waited for as
    long as that lasted, deadline or not: for good, for a unit cancelled with its COMMIT in
    flight on a connection that never answers. Here the graceful close, those waits
    included, is given the bound as a whole (as asyncpg 0.32's own ``close(timeout=)`` does);
    past it, or failing, the connection is closed at once, its socket with it (cut short,
    asyncpg 0.30 left it open: :func:`asyncpg_abort_socket`), and a cancellation goes on.
    SQLAlchemy's terminate then finds the connection closed. A cancel answered in time has
    done its work (the statement cancelled on the server) before the connection closes, as
    without this."""

    def bounded(dbapi_connection: Any) -> None:
        driver: Any = getattr(dbapi_connection, "driver_connection", None)
        if driver is not None and not driver.is_closed():
            # (MissingGreenlet: the garbage collector's cleanup, SQLAlchemy terminates at once)
            with contextlib.suppress(sa_exc.MissingGreenlet):
                dbapi_connection.run_async(_close_gracefully_within_bound)
        terminate(dbapi_connection)

    return bounded


async def _close_gracefully_within_bound(driver: Any) -> None:
    """asyncpg connection ``driver`` closed gracefully within ``_TERMINATE_SECONDS``, else (the
    bound reached, the close failed or was interrupted) at once; an interruption is raised
    again. A close that fails is a connection already gone: closed at once, as SQLAlchemy does
    with the errors it expects there (2.1), not raised."""
    try:
        await asyncio.wait_for(driver.close(timeout=_TERMINATE_SECONDS), _TERMINATE_SECONDS)
    except Exception:
        asyncpg_abort_socket(driver)
    except BaseException:
        asyncpg_abort_socket(driver)
        raise


def _refuse_other_settings(hooks: EngineHooks, mine: tuple[Any, ...]) -> None:
    if hooks.settings != mine and hooks.factories:
        raise ValueError(
            f"another resilient factory (service {hooks.service!r}) already uses this "
            f"engine with different engine-wide settings: "
            f"{_settings_diff(hooks.settings, mine)}. Factories sharing an engine must "
            "agree on enabled, status_validation and the classifier's codes; use one "
            "factory, the same settings, or another engine. (A factory without config= "
            "follows the SELF_HEALING_* variables, one with config= does not: to have it "
            "follow them as well, give it config=rdb.load_config().replace(...).)"
        )


def refuse_disagreeing(engines: Iterable[Engine], mine: tuple[Any, ...]) -> None:
    """The ``ValueError`` of :func:`hooks_for` for the first of ``engines`` whose hooks
    another factory holds with other engine-wide settings than ``mine``
    (:func:`engine_settings`); nothing registered. A factory checks every engine it would hook
    before it registers on any: refused, it leaves no engine holding it."""
    with STATE.lock:
        for engine in engines:
            hooks = hooks_of(engine)
            if hooks is not None:
                _refuse_other_settings(hooks, mine)


def factory_engines(main: Engine | None, binds: Iterable[Any]) -> list[Engine]:
    """The engines a factory hooks: its own (``main``) and those of ``binds=`` (engines, async
    engines, connections; anything else is left alone), but one that shares ``main``'s pool
    (an ``execution_options()`` copy of it: its connections have ``main``'s hooks)."""
    engines = [] if main is None else [main]
    for bound in binds:
        engine = engine_behind(bound)
        if engine is not None and (main is None or engine.pool is not main.pool):
            engines.append(engine)
    return engines


_SETTING_NAMES = ("enabled", "status validation", "classifier codes")


def _settings_diff(theirs: tuple[Any, ...], mine: tuple[Any, ...]) -> str:
    return "; ".join(
        f"{name}: {a!r} there, {b!r} here" if name != "classifier codes" else f"{name} differ"
        for name, a, b in zip(_SETTING_NAMES, theirs, mine, strict=True)
        if a != b
    )


def connection_looks_dead(dbapi_connection: Any, cache: dict[str, Any] | None = None) -> bool:
    """True when an idle pooled connection has been closed by the server.

    Written by hand because SQLAlchemy's ``pool_pre_ping`` costs a network round trip on every
    checkout. An idle PostgreSQL connection has nothing to read; after ``pg_terminate_backend``
    or a server shutdown the server has sent an error and/or closed the socket, so it polls
    readable (so does one that received notifications for a LISTEN while it sat in the pool:
    told apart, see :func:`_psycopg_notified`). A zero-timeout poll costs about a microsecond.
    asyncpg notices a closed socket by itself (``is_closed()``), but only once the event loop
    has read from it: a checkout that runs before that (e.g. in the same loop iteration as the
    kill) polls the socket as well.
    """
    inner = getattr(dbapi_connection, "driver_connection", None)  # (SQLAlchemy's adapter)
    is_closed = getattr(inner, "is_closed", None)
    if callable(is_closed):  # asyncpg through SQLAlchemy's adapter
        if is_closed():
            return True
        # The socket's descriptor, looked up once per connection (``get_extra_info`` is slow).
        cached = cache.get(_FD_KEY) if cache is not None else None
        if cached is not None and cached[0] is inner:
            fd = cached[1]
        else:
            fd = asyncpg_socket_fd(inner)
            if fd is None or fd < 0:
                return fd is not None  # no socket: nothing to poll; a broken one: dead
            if cache is not None:
                cache[_FD_KEY] = (inner, fd)
        return _readable(fd, cache) and not _asyncpg_notified(fd)
    # psycopg 3: its connection, or its async one through SQLAlchemy's adapter
    pgconn = getattr(dbapi_connection if inner is None else inner, "pgconn", None)
    if pgconn is None:  # not psycopg 3: no cheap check; SQLAlchemy's handling applies
        return False
    if pgconn.status != _PG_OK:  # psycopg's ``closed`` and ``broken`` both come from this
        return True
    try:
        fd = pgconn.socket
    except Exception:
        return True
    if not _readable(fd, cache):
        return False
    return not (_psycopg_notified(pgconn) and not _readable(fd, cache))


def dead_probe(dbapi_connection: Any, cache: dict[str, Any]) -> Callable[[], bool]:
    """:func:`connection_looks_dead` for one connection, made once per connection and kept in
    its pool record (``cache``): every checkout calls it. The socket's ``pollfd`` is bound into
    the probe, with psycopg's connection status or asyncpg's ``is_closed`` (a connection keeps
    its socket for life; a broken one reports it there first)."""
    inner = getattr(dbapi_connection, "driver_connection", None)  # (SQLAlchemy's adapter)
    poll = _poll
    is_closed = getattr(inner, "is_closed", None)
    if callable(is_closed) and poll is not None:  # asyncpg through SQLAlchemy's adapter
        asyncpg_fd = asyncpg_socket_fd(inner)
        if asyncpg_fd is not None:
            if asyncpg_fd < 0:
                return lambda: True
            asyncpg_pointer = ctypes.pointer(_PollFd(asyncpg_fd, _POLL_EVENTS, 0))

            def asyncpg_probe() -> bool:
                if is_closed():
                    return True
                return bool(
                    poll(asyncpg_pointer, _ONE_FD, _NO_WAIT) > 0
                    and not _asyncpg_notified(asyncpg_fd)
                )

            return asyncpg_probe
    pgconn = getattr(dbapi_connection if inner is None else inner, "pgconn", None)
    if pgconn is None or poll is None:  # no socket found (or no libc poll): the general check
        return functools.partial(connection_looks_dead, dbapi_connection, cache)
    try:
        fd = pgconn.socket
    except Exception:
        return lambda: True
    pointer = ctypes.pointer(_PollFd(fd, _POLL_EVENTS, 0))

    def probe() -> bool:
        if pgconn.status != _PG_OK:
            return True
        return bool(
            poll(pointer, _ONE_FD, _NO_WAIT) > 0
            and not (_psycopg_notified(pgconn) and poll(pointer, _ONE_FD, _NO_WAIT) == 0)
        )

    return probe


# An idle connection's socket that polls readable: the server left (its goodbye, an error,
# EOF), or it sent notifications for a LISTEN of the connection (``NOTIFY`` while it sat in the
# pool), which plain SQLAlchemy hands to the application at its next use. Those are told apart
# on this path only (the quiet socket of the common case costs the one poll above).
def _psycopg_notified(pgconn: Any) -> bool:
    """Read what came into libpq (``PQconsumeInput``: it does not block) and hand its
    notifications on as psycopg does after a statement (its connection's ``notify_handler``:
    to the ``notifies()`` backlog or your notify handlers). True when the connection is sound
    and notifications came; anything else (the server's goodbye, EOF, a notice alone) leaves the
    connection judged dead, as before."""
    try:
        pgconn.consume_input()
    except Exception:  # EOF, a broken socket
        return False
    if pgconn.status != _PG_OK:
        return False
    notified = False
    while (notify := pgconn.notifies()) is not None:
        notified = True
        handler = psycopg_notify_handler(pgconn)
        if handler is not None:
            handler(notify)
    return notified


#: the type byte of a NotificationResponse (PostgreSQL's protocol)
_NOTIFICATION: Final = ord("A")
#: bytes looked at on asyncpg's socket (notifications beyond them are taken on trust)
_PEEKED: Final = 8192


def _asyncpg_notified(fd: int) -> bool:
    """Whether what waits on asyncpg's socket is notifications only (asyncpg reads them, and
    calls your listeners, when the event loop next runs). Peeked at, not read: asyncpg reads
    its socket itself. Every message in view must be one (a terminated session's FATAL behind
    a notification means dead). A TLS connection's bytes tell nothing here: judged dead, as
    before."""
    sock = socket.socket(fileno=fd)
    try:
        data = sock.recv(_PEEKED, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return False
    finally:
        sock.detach()  # the descriptor stays asyncpg's
    at = 0
    while at < len(data):
        if data[at] != _NOTIFICATION:
            return False
        if at + 5 > len(data):
            break  # its length not in view yet
        at += 1 + int.from_bytes(data[at + 1 : at + 5], "big")
    return at > 0


# A pool record's probe: (driver's connection, its dead_probe, the prepared driver connection
# or None: not prepared yet)
_PROBE_KEY = "resilient_db.dead_probe"


def _drop_probe(dbapi_connection: Any, record: Any) -> None:
    """The pool's ``close`` event (a record's connection closed: invalidated, recycled,
    disposed, an overflow one returned): its probe, which holds the driver's connection, goes
    with it. SQLAlchemy clears the record's ``info`` only as the record connects again, at its
    next checkout: until then the closed connection (its statement cache, its transaction)
    stayed alive. The socket's cached descriptor (:func:`connection_looks_dead`) holds it
    too. Nothing on the checkout and checkin of a live connection."""
    info = record.info
    info.pop(_PROBE_KEY, None)
    info.pop(_FD_KEY, None)


def set_up_again(connection: Connection) -> None:
    """``connection`` (checked out now) was set up for the commit protocol while the markers
    were missing, and the markers were just installed through it: its next checkout sets it up
    again (looks for them, prepares the marker statement), instead of verifying by transaction
    id for as long as it lives. Until then it commits as before. Nothing for a connection of an
    engine without a resilient factory, or one set up with the markers."""
    if hooks_of(connection.engine) is None:
        return
    pooled = connection.connection
    driver: Any = pooled.driver_connection
    if getattr(driver, "_rdb_mode", None) != XID:
        return
    driver._rdb_mode = None
    probe = pooled.info.get(_PROBE_KEY)
    if probe is not None:
        pooled.info[_PROBE_KEY] = (probe[0], probe[1], None, None)  # (no fast path: checkout)


_FRESH_KEY = "resilient_db.connecting"  # our do_connect ran for the record's connection
_FD_KEY = "resilient_db.socket_fd"
_POLL_KEY = "resilient_db.poller"
_PG_OK = int(psycopg.pq.ConnStatus.OK)
# POLLIN | POLLPRI (the select module has no poll constants where there is no poll: Windows)
_POLL_EVENTS = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 2)


class _PollFd(ctypes.Structure):
    """``struct pollfd`` of poll(2)."""

    _fields_ = (("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short))


def _gil_holding_poll() -> Any:
    """libc's ``poll`` called with the GIL held, or None where there is none.

    Written by hand because every Python-level poll (``select.poll``, ``select.select``,
    ``selectors``) releases the GIL around the system call, and a released GIL is a thread
    switch when other threads wait for it: with eight busy threads, one such release per
    checkout cost about a tenth of the throughput (measured with bench/overhead.py's 8-thread
    read unit). A zero-timeout poll never blocks, so it may hold the GIL; ctypes' ``PyDLL`` calls
    without releasing it.
    """
    try:
        fn = ctypes.PyDLL(None).poll
    except (OSError, AttributeError, TypeError):  # no libc poll (Windows)
        return None
    # No argtypes: ctypes' argument conversion would double the call's cost. The arguments
    # are passed as ready-made C values (a pointer, an unsigned long, an int).
    fn.restype = ctypes.c_int
    return fn


_poll = _gil_holding_poll()
_ONE_FD = ctypes.c_ulong(1)
_NO_WAIT = ctypes.c_int(0)


def _readable(fd: int, cache: dict[str, Any] | None = None) -> bool:
    """An idle connection's socket has something to read (an error, EOF): the server left.

    A zero-timeout poll that keeps the GIL (see :func:`_gil_holding_poll`); its ``pollfd`` is
    kept in ``cache`` (the pool record's ``info``) for the descriptor it watches.
    """
    cached = cache.get(_POLL_KEY) if cache is not None else None
    if cached is not None and cached[0] == fd:
        pointer = cached[2]
    else:
        if _poll is None:
            return bool(select.select([fd], [], [], 0)[0])
        pollfd = _PollFd(fd, _POLL_EVENTS, 0)
        pointer = ctypes.pointer(pollfd)
        if cache is not None:
            cache[_POLL_KEY] = (fd, pollfd, pointer)
    return bool(_poll(pointer, _ONE_FD, _NO_WAIT) > 0)
