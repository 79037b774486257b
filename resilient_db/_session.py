"""``ResilientSession``: a drop-in ``sessionmaker`` whose units of work heal themselves."""

from __future__ import annotations

import functools
import inspect
import time
import types
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from ._classify import Classifier
from ._commit import CLAIM_SQL, MARKERS, XID_STATUS_SQL, CommitRequest, CommitTicket
from ._config import Config
from ._errors import TransactionStateError
from ._observability import log_session
from ._registry import enter_unit, factory_of, leave_unit, register_class
from ._unit import (
    ActiveUnit,
    CommitVerdict,
    FactoryCore,
    current_unit,
    flush_and_commit,
    interpret_claim,
    interpret_xid,
)

__all__ = ["ResilientSession"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound=Session)


class ResilientSession(FactoryCore, sessionmaker[S]):
    """A ``sessionmaker`` for ``engine`` whose units of work survive transient faults.

    It *is* a ``sessionmaker``: ``Session()``, ``Session.begin()``, ``Session.class_``,
    ``configure``, ``kw``, events on the factory and ``scoped_session(Session)`` work as with
    one, and sessions are instances of your ``class_`` (through the subclass per factory that
    ``sessionmaker`` makes). ``Session.run(fn, ...)`` (and the ``@Session.transactional``
    decorator) run ``fn(session, ...)`` as one unit of work: replayed whole with a fresh session
    on a transient error, committed at the end.

    Configuration comes from the ``SELF_HEALING_*`` environment when the factory is made (and on
    :func:`reload_config`) unless ``config=`` is given.
    """

    @overload
    def __init__(
        self: ResilientSession[Session],
        bind: Engine,
        service: str = ...,
        *,
        config: Config | None = ...,
        classifier: Classifier | None = ...,
        breaker_storage: Any = ...,
        breaker_listeners: tuple[Any, ...] = ...,
        sleep: Callable[[float], None] = ...,
        clock: Callable[[], float] = ...,
        wall_clock: Callable[[], float] | None = ...,
        **sessionmaker_kwargs: Any,
    ) -> None: ...
    @overload
    def __init__(
        self: ResilientSession[S],
        bind: Engine,
        service: str = ...,
        *,
        class_: type[S],
        config: Config | None = ...,
        classifier: Classifier | None = ...,
        breaker_storage: Any = ...,
        breaker_listeners: tuple[Any, ...] = ...,
        sleep: Callable[[float], None] = ...,
        clock: Callable[[], float] = ...,
        wall_clock: Callable[[], float] | None = ...,
        **sessionmaker_kwargs: Any,
    ) -> None: ...
    def __init__(
        self,
        bind: Engine,
        service: str = "database",
        *,
        config: Config | None = None,
        classifier: Classifier | None = None,
        breaker_storage: Any = None,
        breaker_listeners: tuple[Any, ...] = (),
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] | None = None,
        **sessionmaker_kwargs: Any,
    ) -> None:
        if not isinstance(bind, Engine):
            raise TypeError(
                f"ResilientSession needs a SQLAlchemy Engine, got {type(bind).__name__}; "
                "for an AsyncEngine use AsyncResilientSession"
            )
        self.engine = bind
        self._sleep = sleep
        self._init_core(
            bind,
            service,
            config,
            classifier,
            breaker_storage=breaker_storage,
            breaker_listeners=breaker_listeners,
            sleep=sleep,
            clock=clock,
            wall_clock=wall_clock,
        )
        sessionmaker.__init__(self, bind, **sessionmaker_kwargs)
        register_class(self.class_, self)
        self._register()

    # -- units of work -----------------------------------------------------------------------
    def run(self, fn: Callable[Concatenate[S, P], R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(session, *args, **kwargs)`` as one unit of work and commit.

        On a transient error anywhere in the unit (COMMIT included) the session is rolled back
        and ``fn`` runs again with a fresh one, after a backoff. Inside another unit of this
        factory, ``fn`` joins the outer unit's session and runs once (the outer unit retries).
        """
        if _is_coroutine_function(fn):
            raise TypeError(
                f"{_name(fn)} is a coroutine function; use AsyncResilientSession.run for it"
            )
        active = current_unit.get()
        if active is not None:
            if active.factory is self:
                return fn(active.session, *args, **kwargs)
            return self._attempt(fn, args, kwargs)  # another database: once, no own retries
        if not self.config.enabled:
            with self.begin() as session:
                return fn(session, *args, **kwargs)
        return self.policy.call(lambda: self._attempt(fn, args, kwargs))

    def run_in(
        self, session: S, fn: Callable[Concatenate[S, P], R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Like :meth:`run`, with a session the caller made. It must not be in a transaction:
        a unit can only be replayed from the start of its transaction."""
        if factory_of(session) is not self:
            raise TypeError(
                "run_in() needs a session made by this factory (Session()), not by another "
                "factory or a plain sessionmaker: the unit runs under this factory's policy"
            )
        if session.in_transaction():
            raise TransactionStateError(
                "run() can't retry inside a transaction you opened on this session: the work "
                "done before it can't be replayed. Commit or roll back first, or call "
                f"{_name(fn)}(session, ...) directly and let an outer unit retry"
            )
        if not self.config.enabled:
            with session.begin():
                return fn(session, *args, **kwargs)
        return self.policy.call(lambda: self._attempt(fn, args, kwargs, session=session))

    @overload
    def transactional(self, fn: Callable[Concatenate[S, P], R], /) -> Callable[P, R]: ...
    @overload
    def transactional(
        self, fn: None = None, /
    ) -> Callable[[Callable[Concatenate[S, P], R]], Callable[P, R]]: ...
    def transactional(self, fn: Any = None, /) -> Any:
        """Decorator: calling ``fn(*args)`` runs ``fn(session, *args)`` as a unit of work."""
        if fn is None:
            return self.transactional
        if _is_coroutine_function(fn):
            raise TypeError(f"{_name(fn)} is a coroutine function; use AsyncResilientSession")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self.run(fn, *args, **kwargs)

        return wrapper

    def _attempt(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        session: Session | None = None,
    ) -> R:
        own = session is None
        s: Session = self() if session is None else session
        enter_unit(s)
        token = current_unit.set(ActiveUnit(self, s))
        failed = False
        try:
            try:
                result = fn(s, *args, **kwargs)  # the session begins on first use
                self._commit(s)
                return result
            except BaseException:
                failed = True
                _rollback_quietly(s)
                raise
        finally:
            current_unit.reset(token)
            leave_unit(s)
            if own:
                _close(s, quiet=failed)

    def _commit(self, s: Session) -> None:
        box: list[CommitRequest] = []
        try:
            flush_and_commit(s, box, self._hooks.commit)
        except Exception as exc:
            ticket = self._referee.must_verify(exc, box)
            if ticket is None:
                raise
            if not self._referee.settle(ticket, self._verify_commit(ticket), exc):
                raise

    def _verify_commit(self, ticket: CommitTicket) -> CommitVerdict:
        """Settle a lost COMMIT answer on a new connection, reconnecting with backoff."""
        for delay in self._referee.checks():
            if delay:
                self._sleep(delay)
            try:
                # READ COMMITTED whatever the engine's level: the claim must see the marker
                with (
                    self.engine.connect().execution_options(
                        isolation_level="READ COMMITTED"
                    ) as conn,
                    conn.begin(),
                ):
                    if ticket.mode == MARKERS:
                        verdict = interpret_claim(
                            conn.execute(CLAIM_SQL, {"marker": ticket.marker}).scalar()
                        )
                    else:
                        row = conn.execute(XID_STATUS_SQL, {"xid": ticket.xid}).one()
                        verdict = interpret_xid(ticket, row[0], row[1])
            except Exception as exc:
                if self._referee.keep_checking_after(exc):
                    continue
                return CommitVerdict.UNKNOWN
            if verdict is not CommitVerdict.IN_PROGRESS:
                return verdict
        return CommitVerdict.UNKNOWN


def _rollback_quietly(session: Session) -> None:
    """Roll back after a failed attempt; a dead connection must not hide the real error."""
    try:
        session.rollback()
    except Exception:
        log_session.debug("rollback after a failed attempt failed too", exc_info=True)


def _close(session: Session, *, quiet: bool) -> None:
    """Close a unit's session. After a failed attempt (``quiet``) the attempt's error is the one
    to raise, so a failure to close is only logged (as the async twin does)."""
    if not quiet:
        session.close()
        return
    try:
        session.close()
    except Exception:
        log_session.debug("closing the session after a failed attempt failed too", exc_info=True)


def _is_coroutine_function(fn: Any) -> bool:
    # A plain function answers from its code flags (every unit passes here); the rest (partials,
    # methods, marked callables) through inspect.
    code = getattr(fn, "__code__", None)
    if code is not None and type(fn) is types.FunctionType:
        return bool(code.co_flags & inspect.CO_COROUTINE)
    return inspect.iscoroutinefunction(fn)


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", repr(fn))
