"""``AsyncResilientSession``: a drop-in ``async_sessionmaker`` whose units of work heal themselves.

The decisions are made by shared objects that do no I/O: :class:`~resilient_db._retry.Policy`
(retry, backoff, breaker), :class:`~resilient_db._unit.CommitReferee` (what a lost COMMIT
means) and the engine hooks of :mod:`resilient_db._unit`. This module does the I/O around them.

``_asyncio`` is the one source of both factories: ``_session`` is generated from it by
``scripts/async_to_sync.py`` (see its docstring for what changes and how the few blocks that
really differ are marked). Edit ``_asyncio``, then run the script.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import sys
import threading
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from sqlalchemy.engine import (
    ChunkedIteratorResult,
    Connection,
    CursorResult,
    Engine,
    MappingResult,
    ScalarResult,
)
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncMappingResult,
    AsyncResult,
    AsyncScalarResult,
    AsyncSession,
    AsyncSessionTransaction,
    async_sessionmaker,
)

from ._classify import Classifier, commit_answer_settled, debug_failure, success_interrupted
from ._commit import (
    AttemptRecord,
    CommitProtocol,
    CommitRequest,
    CommitTicket,
    UnprovenCommit,
    prune,
    within_deadline,
)
from ._config import Config
from ._errands import Errand, LookFailed, NotStarted, Sweep, start_thread
from ._errors import TransactionStateError
from ._internals import (
    PLAIN_COMMITS,
    prime_class_listeners,
    server_side_result,
    with_own_session_class,
)
from ._observability import log_session
from ._registry import factory_of, register_class
from ._retry import Policy
from ._services import DEFAULT_SERVICE
from ._state import STATE
from ._statements import SavedNote, current_attempt, dropin_block, library_work, note_saved
from ._unit import (
    ASYNC_WITH,
    PREPARE_POLL,
    SYNC_WITH,
    ActiveUnit,
    CommitVerdict,
    FactoryCore,
    async_units,
    attempt_of,
    block_entered,
    block_interrupted,
    block_left,
    blocked_on_its_driver,
    check_commit,
    claim_prune,
    commit_if_prepared,
    commit_plainly,
    commit_step_unended,
    commits_in_callers_transaction,
    conflict_left_behind,
    current_unit,
    drop_kept_connections,
    end_committed_transactions,
    engine_of,
    flush_and_commit,
    interrupted_after_commit,
    interrupted_in_its_commit,
    joined_callers_transaction,
    joins_callers_transaction,
    listening_base,
    lost_with_its_connection,
    no_second_connection,
    one_connection_pool,
    part_of_running,
    prune_claimed,
    prune_failed,
    prune_quietly,
    pruned,
    read_committed,
    reset_block,
    restore_attached,
    rollback_if_prepared,
    runs_once_here,
    saved_then_interrupted,
    unit_here,
    unit_signature,
)
from ._validation import (
    ResponseCheck,
    ResponseValidator,
    check_response,
    response_check,
    validation_on,
)

__all__ = ["AsyncResilientSession"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound=AsyncSession)


class AsyncResilientSession(FactoryCore, async_sessionmaker[S]):
    """A drop-in ``async_sessionmaker`` whose units of work survive transient faults.

    It *is* SQLAlchemy's ``async_sessionmaker``, subclassed: ``Session()``,
    ``Session.begin()``, ``Session.class_``, ``configure`` and ``kw`` work as with it, and your
    session class is used, through a subclass of it made for the factory (``Session.class_``,
    as SQLAlchemy's ``sessionmaker`` makes one). ``await Session.run(fn, ...)`` (and the
    ``@Session.transactional`` decorator) run ``await fn(session, ...)`` as one unit of work:
    replayed whole with a fresh session on a transient error, committed at the end. Nested
    units join the outer unit and run once.

    Configuration comes from the ``SELF_HEALING_*`` environment when the factory is made (and
    on :func:`~resilient_db.reload_config`) unless ``config=`` is given. ``asleep`` (the backoff
    sleep), ``clock`` (monotonic seconds, for the deadline) and ``wall_clock`` (the breaker's
    clock: how long an opening lasts and its ``opened_at`` stamp; by default a monotonic timer
    and the time of day) are injectable for tests. Other keyword arguments go to
    ``async_sessionmaker``.
    """

    @overload
    def __init__(
        self: AsyncResilientSession[S],
        bind: AsyncEngine | AsyncConnection | None = ...,
        service: str = ...,
        *,
        class_: type[S],
        config: Config | None = ...,
        classifier: Classifier | None = ...,
        breaker_storage: Any = ...,
        breaker_listeners: Iterable[Any] = ...,
        asleep: Callable[[float], Awaitable[None]] = ...,
        clock: Callable[[], float] = ...,
        wall_clock: Callable[[], float] | None = ...,
        **async_sessionmaker_kwargs: Any,
    ) -> None: ...
    @overload
    def __init__(
        self: AsyncResilientSession[AsyncSession],
        bind: AsyncEngine | AsyncConnection | None = ...,
        service: str = ...,
        *,
        config: Config | None = ...,
        classifier: Classifier | None = ...,
        breaker_storage: Any = ...,
        breaker_listeners: Iterable[Any] = ...,
        asleep: Callable[[float], Awaitable[None]] = ...,
        clock: Callable[[], float] = ...,
        wall_clock: Callable[[], float] | None = ...,
        **async_sessionmaker_kwargs: Any,
    ) -> None: ...
    def __init__(
        self,
        bind: AsyncEngine | AsyncConnection | None = None,
        service: str = DEFAULT_SERVICE,
        *,
        config: Config | None = None,
        classifier: Classifier | None = None,
        breaker_storage: Any = None,
        breaker_listeners: Iterable[Any] = (),
        asleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] | None = None,
        **async_sessionmaker_kwargs: Any,
    ) -> None:
        engine = _engine_of(bind, async_sessionmaker_kwargs)
        self.engine = engine
        self._asleep = asleep
        self._init_core(
            None if engine is None else engine.sync_engine,
            service,
            config,
            classifier,
            breaker_storage=breaker_storage,
            breaker_listeners=breaker_listeners,
            asleep=asleep,
            clock=clock,
            wall_clock=wall_clock,
            session_kwargs=async_sessionmaker_kwargs,
        )
        kwargs = async_sessionmaker_kwargs
        if True:  # async only
            # a class of this factory's own, as a sync factory's (async_sessionmaker uses the
            # class given as it is): its drop-in ``async with`` blocks note what they commit,
            # below. (The sync session of each AsyncSession names its factory in the registry.)
            kwargs = with_own_session_class({"class_": AsyncSession, **kwargs})
        else:  # sync only
            # a class of this factory's own, whatever sessionmaker does with it (see there),
            # listening through a base shared by the factories given the same class (see there)
            kwargs = with_own_session_class(kwargs, listening_base)
        async_sessionmaker.__init__(self, bind, **kwargs)
        if True:  # async only
            # One policy, two drivers: ``acall`` awaits ``asleep`` between units' attempts;
            # ``call`` runs the drop-in connect retry inside SQLAlchemy's greenlet. (Not a
            # method of the factory: a unit's attempt, kept by a driver's timer made in it,
            # holds the policy, which would keep the factory and its engine alive.)
            self.policy.sleep = _greenlet_sleep(asleep)
            self.policy.offload = _greenlet_offload
            # how its units' own COMMITs midway are settled (weakly: see above)
            self.policy.own_commits = (
                True,
                weakref.WeakMethod(self._settle_own_commit),
                weakref.WeakMethod(self._own_commit_unproven),
            )
            _note_async_blocks(self.class_)
            # (how a unit of each session class ends is kept, see _Ends: that of this
            # factory's class goes with the factory, not kept for good)
            weakref.finalize(self, _ends.forget, self.class_)
        else:  # sync only
            # the class is this factory's own (made above): its sessions name us
            register_class(self.class_, self)
            # how its units' own COMMITs midway are settled (weakly, as the async one's)
            self.policy.own_commits = (
                False,
                weakref.WeakMethod(self._settle_own_commit),
                weakref.WeakMethod(self._own_commit_unproven),
            )
            # and its drop-in ``with`` blocks note what they commit (see there)
            _note_with_blocks(self.class_)
            # and its listeners are filed before any unit's session is made (see there)
            prime_class_listeners(self.class_)
            # and, where your class picks the engines, hook each one it picks (see there;
            # and _route_later, where it is given a get_bind later)
            self._route_later()
        self._register()

    def __call__(self, **local_kw: Any) -> S:
        """A new session, as the sessionmaker gives. An engine given as ``bind`` or in
        ``binds`` for this one session gets the factory's engine hooks first where it has none
        (disconnect handling, the dead-connection check, commit marking there too); one with
        another factory's keeps those, and the factory is not made one of its factories.

        (Its sync session is of a class the factory makes of yours, which names the factory:
        async, of your ``sync_session_class``, see ``_routed``; sync, of your ``class_``, as
        ``sessionmaker`` makes one.)
        """
        session: S
        if True:  # async only
            if local_kw:
                binds = (local_kw.get("bind"), *(local_kw.get("binds") or {}).values())
                self._hook_engines(binds, register=False)
            local_kw = self._routed(local_kw)  # the factory's sync session class (see there)
            session = async_sessionmaker.__call__(self, **local_kw)
        else:  # sync only
            # (or where your class was given a get_bind since the factory looked: see
            # _route_later; one line with the other check)
            if local_kw or self.class_.get_bind is not self._get_bind:
                binds = (local_kw.get("bind"), *(local_kw.get("binds") or {}).values())
                self._hook_engines(binds, register=False)
                self._route_later()
            session = super().__call__(**local_kw)  # (sessionmaker's)
        return session

    if True:  # async only

        def begin(self) -> _Begun[S]:  # type: ignore[override]
            """A new session in a transaction, committed on exit (rolled back on an error) and
            closed, as ``async_sessionmaker.begin()`` gives: ``async with Session.begin() as
            session:`` is ``async with Session() as session, session.begin():``.

            The COMMIT runs in the caller's task, as ``await session.commit()`` and
            ``session.begin()`` run it: a cancellation or a deadline (``asyncio.timeout``)
            arriving while it is in flight cuts it off, and is marked an unknown outcome (a
            web handler answers 500 ``commit-outcome-unknown``), said and counted.
            SQLAlchemy's runs it in a task of its own, shielded from the caller's
            cancellation: that was raised unmarked (a plain error, inviting a resubmit), after
            the whole COMMIT, past the deadline. The session is closed to completion, as
            SQLAlchemy closes it; a cancellation arriving then, after the COMMIT succeeded (or
            in the COMMIT's step once the server answered it: an ``after_commit`` listener
            awaiting I/O), is marked saved (a web handler answers 500
            ``saved-then-interrupted``: do not resubmit) and said, when the block may have
            written (one that only read saved nothing). With self-healing off, SQLAlchemy's
            own."""
            if not self.config.enabled:
                return async_sessionmaker.begin(self)  # type: ignore[return-value]
            return _Begun(self())

    # -- units of work -----------------------------------------------------------------------
    @overload
    async def run(
        self,
        fn: Callable[Concatenate[S, P], Awaitable[R]],
        /,
        *args: Any,
        validate: ResponseValidator,
        **kwargs: Any,
    ) -> R: ...
    @overload
    async def run(
        self, fn: Callable[Concatenate[S, P], Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R: ...
    async def run(
        self,
        fn: Callable[..., Awaitable[R]],
        /,
        *args: Any,
        validate: Any = None,
        **kwargs: Any,
    ) -> R:
        """Run ``await fn(session, *args, **kwargs)`` as one unit of work and commit.

        On a transient error anywhere in the unit (COMMIT included) the session is rolled back
        and ``fn`` runs again with a fresh one, after a backoff. Inside another unit of this
        factory, ``fn`` joins the outer unit's session and runs once (the outer unit retries;
        async: in the outer unit's task, as when awaited directly or under ``asyncio.timeout``.
        Started in another task, as ``asyncio.wait_for`` does before Python 3.12, it runs in a
        transaction of its own, committed by itself, with a ``[SELF-HEAL]`` warning);
        inside another factory's unit, or an operation of ``with_self_healing`` that retries, it
        runs once in a session of its own (the outer operation replays it: no retry loops
        multiplied). Cancellation is never retried. With self-healing off
        (``SELF_HEALING_ENABLED=false``) the unit runs once, nothing retried or verified, and
        may do all the same things: open its own transaction, commit and carry on, run nested
        units. Without autobegin (``autobegin=False``), run begins each attempt's transaction
        itself.

        ``validate`` (keyword-only, run's own: never passed to ``fn``) checks ``fn``'s result
        before COMMIT with a Pydantic model, a type (``list[Model]``, ``int``, a TypedDict...),
        a ``TypeAdapter`` or a callable; an invalid result rolls the unit back and raises
        :class:`~resilient_db.ResponseValidationError` (not retried). The result itself is
        returned unchanged (an iterator is refused with ``TypeError``: checking would consume
        it). Skipped with ``SELF_HEALING_RESPONSE_VALIDATION=false``; a ``validate`` that can't
        check a result raises ``TypeError`` either way.
        """
        if type(fn) is not types.FunctionType or fn.__code__.co_flags & _NOT_A_UNIT:
            _require_unit(fn, "run")  # (a plain function passes: answered inline)
        if validate is not None:
            check = response_check(validate)  # refused where it is written, on or off
            if validation_on(self.config):
                fn = _validated(fn, check, self)
        active = _units.get()
        if active is not None and unit_here(active):  # (see there: copied contexts)
            if active.factory is self:
                return await _call_unit(fn, active.session, args, kwargs)
            return await self._once(fn, args, kwargs)  # another database: see _once
        if not self.config.enabled:
            return await self._attempt(fn, args, kwargs)  # once: no retry, no breaker
        policy = self.policy
        enclosing = current_attempt.get()
        if enclosing is not None and enclosing.running:  # (a task's, after it: not nested)
            if True:  # async only
                # a unit of this factory runs in the task that made this one (wait_for's
                # before Python 3.12, create_task's, gather's): not joined (see _TaskUnit)
                if attempt_of(self.policy, enclosing):
                    self._unit_in_other_task(fn)
            if enclosing.replayed:  # with_self_healing retries it all: see _once
                return await self._once(fn, args, kwargs)
            policy.refresh()  # (a breaker replaced by reset_state() is not the one to ask)
            if part_of_running(policy) is not None:
                # an operation of this service that does not retry: the unit retries, its
                # attempts part of the one the breaker let through (not asked again; with no
                # breaker, of the same service: see part_of_running)
                policy = policy.without_breaker(enclosing.breaker)
        # Policy.acall with its first attempt inline: one frame (async: one coroutine) fewer
        # on every unit's path
        if True:  # async only
            # a shared breaker that is not closed asks Redis: off the event loop
            admitted = policy.admit_on_loop()
            probe = await policy.aadmit() if admitted is None else admitted
        else:  # sync only
            probe = policy.admit()
        if policy.accounts_with_io:  # (a breaker shared through Redis, say: see there)
            return await self._run_accounted(fn, args, kwargs, policy, probe)
        started = time.monotonic()
        try:
            result = await self._attempt(fn, args, kwargs)
        except BaseException as exc:
            return await policy.acall_failed(
                lambda: self._attempt(fn, args, kwargs), exc, probe, started
            )
        if True:  # async only
            # a probe's end, or the first success after failures counted fleet-wide, tells
            # Redis: off the event loop
            if not policy.succeeded_on_loop(probe):
                await policy.asucceeded(probe)
        else:  # sync only
            policy.succeeded(probe)
        return result

    @overload
    async def run_in(
        self,
        session: S,
        fn: Callable[Concatenate[S, P], Awaitable[R]],
        /,
        *args: Any,
        validate: ResponseValidator,
        **kwargs: Any,
    ) -> R: ...
    @overload
    async def run_in(
        self,
        session: S,
        fn: Callable[Concatenate[S, P], Awaitable[R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R: ...
    async def run_in(
        self,
        session: S,
        fn: Callable[..., Awaitable[R]],
        /,
        *args: Any,
        validate: Any = None,
        **kwargs: Any,
    ) -> R:
        """Like :meth:`run`, with a session the caller made from this factory. It must not be
        in a transaction: a unit can only be replayed from the start of its transaction."""
        _require_unit(fn, "run_in")
        if validate is not None:
            check = response_check(validate)  # refused where it is written, on or off
            if validation_on(self.config):
                fn = _validated(fn, check, self)
        if not isinstance(session, AsyncSession):
            raise TypeError(
                f"run_in() needs a session made by this factory, got {type(session).__name__}"
            )
        if factory_of(session.sync_session) is not self:
            raise TypeError(
                "run_in() runs only in a session made by this factory; this one was not made by "
                "this AsyncResilientSession (Session()) but by another factory, a plain "
                "async_sessionmaker or AsyncSession()"
            )
        if session.in_transaction():
            raise TransactionStateError(
                "run_in() can't retry inside a transaction you opened on this session: the work "
                "done before it can't be replayed. Commit or roll back first, or run "
                f"{_name(fn)}(session, ...) directly and let an outer unit retry"
            )
        if not self.config.enabled:
            return await self._attempt(fn, args, kwargs, session=session)
        if runs_once_here():  # nested (see run)
            return await self._once(fn, args, kwargs, session=session)
        policy = self.policy
        policy.refresh()
        enclosing = part_of_running(policy)
        if enclosing is not None:  # (see run)
            policy = policy.without_breaker(enclosing.breaker)
        if policy.accounts_with_io:  # (a breaker shared through Redis, say: see _accounted)
            return await self._accounted(
                fn,
                policy,
                lambda: policy.acall(lambda: self._attempt(fn, args, kwargs, session=session)),
            )
        return await policy.acall(lambda: self._attempt(fn, args, kwargs, session=session))

    @overload
    def transactional(
        self,
        fn: Callable[Concatenate[S, P], Awaitable[R]],
        /,
        *,
        validate: ResponseValidator | None = None,
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def transactional(
        self, fn: None = None, /, *, validate: ResponseValidator | None = None
    ) -> Callable[
        [Callable[Concatenate[S, P], Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]
    ]: ...
    def transactional(self, fn: Any = None, /, *, validate: Any = None) -> Any:
        """Decorator: ``await f(*args)`` runs ``await fn(session, *args)`` as a unit of work.

        ``@Session.transactional(validate=...)`` (or ``Session.transactional(fn,
        validate=...)``) checks each result as :meth:`run` does."""
        if validate is not None:
            response_check(validate)  # a bad validator is reported where it is written
        if fn is None:
            if validate is None:
                return self.transactional
            return functools.partial(self._transactional, validate=validate)
        return self._transactional(fn, validate=validate)

    def _transactional(self, fn: Any, *, validate: Any = None) -> Any:
        _require_unit_function(fn, "transactional")
        _refuse_method(fn)
        if validate is None:

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                return await self.run(fn, *args, **kwargs)

            return _called_without_session(wrapper, fn)

        @functools.wraps(fn)
        async def validated(*args: Any, **kwargs: Any) -> Any:
            return await self.run(fn, *args, validate=validate, **kwargs)

        return _called_without_session(validated, fn)

    async def _run_accounted(
        self,
        fn: Callable[..., Awaitable[R]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        policy: Policy,
        probe: bool,
    ) -> R:
        """``run``'s attempts where the breaker's accounting of a success may do I/O (shared
        through Redis, or kept in a storage of yours): an interruption (the unit's task
        cancelled, a deadline, ``KeyboardInterrupt``) arriving there came after the unit's
        COMMIT succeeded. Where that COMMIT, or one before it in the unit, may have written, it
        is said and marked as any interruption after a unit's COMMIT is (see
        :func:`interrupted_after_commit`): its caller hears only the interruption, which a web
        handler would answer as a plain error, and a client resubmit, writing it twice."""

        async def attempts() -> R:
            started = time.monotonic()
            try:
                result = await self._attempt(fn, args, kwargs)
            except BaseException as exc:
                return await policy.acall_failed(
                    lambda: self._attempt(fn, args, kwargs), exc, probe, started
                )
            if True:  # async only
                if not policy.succeeded_on_loop(probe):
                    await policy.asucceeded(probe)
            else:  # sync only
                policy.succeeded(probe)
            return result

        return await self._accounted(fn, policy, attempts)

    async def _accounted(
        self, fn: Callable[..., Awaitable[R]], policy: Policy, call: Callable[[], Awaitable[R]]
    ) -> R:
        """``call()``, the attempts of a unit run once inside another's (see :meth:`_once`) or
        of :meth:`run_in`, where the breaker's accounting of a success may do I/O: an
        interruption there is said and marked as in :meth:`_run_accounted`."""
        saved = SavedNote(dropin_block.get())  # (what the unit saves notes here: see there)
        token = dropin_block.set(saved)
        try:
            return await call()
        except BaseException as interruption:
            _told_of_success(policy, saved, interruption, fn)
            raise
        finally:
            reset_block(token, saved)

    async def _once(
        self,
        fn: Callable[..., Awaitable[R]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        session: AsyncSession | None = None,
    ) -> R:
        """A unit inside a unit of another factory or an operation that replays: it runs once
        (the enclosing one replays it: retry loops never multiply), but its own service's
        breaker still admits it and counts its outcome, as for an operation inside a unit (a
        unit of a database whose circuit is open fails fast inside an operation of another
        service). Inside an attempt that this breaker let through (the same service) it is not
        asked again (see ``admitted_by``), nor, with no breaker, inside an attempt of the
        same service (see ``part_of_running``)."""
        if not self.config.enabled:
            return await self._attempt(fn, args, kwargs, session=session)
        policy = self.policy
        policy.refresh()  # (a breaker replaced by reset_state() is not the one to ask)
        if part_of_running(policy) is not None:
            return await self._attempt(fn, args, kwargs, session=session)
        if policy.accounts_with_io:  # (a breaker shared through Redis, say: see _accounted)
            return await self._accounted(
                fn,
                policy,
                lambda: policy.acall_once(lambda: self._attempt(fn, args, kwargs, session=session)),
            )
        return await policy.acall_once(lambda: self._attempt(fn, args, kwargs, session=session))

    async def _attempt(
        self,
        fn: Callable[..., Awaitable[R]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        session: AsyncSession | None = None,
    ) -> R:
        own = session is None
        # the attempt's configuration, read once: a reload_config() meanwhile reaches the next
        # attempt, never half of this one (its guards judge its flushes and bulk UPDATEs alike)
        config = self.config
        s: AsyncSession = self() if session is None else session
        # marked as running a unit under it: see _registry.in_unit, unit_config
        _unit_sessions[s.sync_session] = config
        if True:  # async only
            token = _units.set(ActiveUnit(self, s))  # the outer unit, if any, is another factory's
        else:  # sync only
            # and its thread, for a copy of this context taken to another one (see unit_here)
            token = _units.set(ActiveUnit(self, s, threading.get_ident()))
        failed = False
        try:
            joined = joins_callers_transaction(s.sync_session)
            if not s.sync_session.autobegin:  # the transaction autobegin would begin (no I/O)
                await s.begin()
            if not config.enabled:
                # self-healing off: the unit as plain SQLAlchemy code runs it (fn, then flush and
                # COMMIT; ROLLBACK on an error), nothing marked, verified or retried. It is the
                # running unit all the same: what a unit may do (begin and commit in fn, nest
                # units) does not depend on the kill switch
                request: CommitRequest | None = None  # (nothing is said of it: see the close)
                try:
                    returned = await _call_unit(fn, s, args, kwargs)
                    if True:  # async only
                        _ends.follow(type(s))  # (methods patched in since: see _Ends)
                    await _ends[type(s)](s, commit_plainly)
                    return returned
                except BaseException:
                    failed = True
                    await _rollback_quietly(s)
                    raise
            request = CommitRequest()
            # what the attempt commits for good is seen (see AttemptRecord)
            with AttemptRecord(self.policy) as record:
                try:
                    result = fn(s, *args, **kwargs)  # (autobegin: the session begins on first use)
                    if True:  # async only
                        # checked inline, not through _call_unit: this is every unit's path
                        if type(result) is not types.CoroutineType:
                            _require_awaitable(fn, result)
                        value: R = await result
                        if type(value) in _REFUSED_VALUES:  # (work that would run later)
                            await _refuse_value(fn, value)
                        # a flush, commit, close or run_sync patched onto the class since its
                        # end was decided is the one called (see _Ends): checked in one line
                        if _seen.get(c := type(s)) != (c.flush, c.commit, c.close, c.run_sync):
                            _ends.follow(c)
                    else:  # sync only
                        # checked inline, not through _call_unit: this is every unit's path
                        if type(result) in _REFUSED_RESULTS:
                            _refuse_result(fn, result)
                        value = result
                    if record.conflicted is not None:  # (caught by its code: see there)
                        conflict_left_behind(record)
                    try:
                        # flush and COMMIT (async: in one greenlet hop; with your session
                        # class's own flush and commit where it overrides them)
                        await _ends[type(s)](
                            s, flush_and_commit, request, self._hooks.commit, _prune_after
                        )
                    except Exception as exc:
                        if request.answered:  # raised after its COMMIT succeeded: committed
                            self._failed_after_commit(exc, request, record)
                            raise
                        if joined and commits_in_callers_transaction(joined, request):
                            raise  # no COMMIT was its to send: not a lost COMMIT answer
                        if lost_with_its_connection(record, exc) is not None:
                            raise  # none was sent: the transaction went with the connection
                        await self._commit_failed(exc, request, s)
                        # (a run_in caller's session is the caller's to roll back; one whose
                        # COMMIT was answered with a warning, proven here, ended its commit()
                        # and told its after_commit listeners then: not told twice)
                        if own and not (request.warned and isinstance(exc, UnprovenCommit)):
                            try:  # (its after_commit listeners fire now: committed)
                                await s.run_sync(end_committed_transactions, request)
                            except Exception as after:
                                self._failed_after_commit(after, request, record)
                                raise
                    except BaseException as interruption:  # cancelled or interrupted: not verified
                        self._referee.interrupted(request, interruption)
                        if record.enclosing is not None and request.committing:
                            # its COMMIT went out (and may have been applied, or was): work
                            # committed for an enclosing attempt, which must not replay it
                            record.unit_committed(request)
                        if self._referee.two_phase_decided(request):
                            await _keep_prepared(s)
                        else:  # (in its PREPARE step: what it may leave prepared is ended)
                            self._end_later(request, interruption)
                        raise
                    if record.enclosing is not None:  # (only then looked at)
                        record.unit_committed(request)
                    if dropin_block.get() is not None and request.may_have_written():
                        note_saved()  # (for a drop-in block around the unit: see SavedNote)
                    return value
                except BaseException as exc:
                    failed = True
                    # (a disconnect the unit's code caught: the attempt failed with it)
                    lost = lost_with_its_connection(record, exc)
                    error = exc if lost is None else lost
                    if joined:
                        why = joined_callers_transaction(joined, record)
                        if why is not None:
                            self.policy.not_replayable(error, why)
                    if not request.answered:  # (committed: nothing to roll back)
                        if record.kept is not None and not joined:
                            # (what the rollback keeps must not reach a replay: see there)
                            await s.run_sync(drop_kept_connections, record)
                        await _rollback_quietly(s)
                    if record.attached is not None:  # (changes a replay must make again)
                        restore_attached(self.policy, record, error)
                    if lost is not None:
                        raise lost  # noqa: B904 (its own cause kept; exc is its context)
                    blocked = blocked_on_its_driver(exc, config, self.service)
                    if blocked is not None:  # (sent on the driver's own connection)
                        raise blocked from exc
                    raise
        finally:
            _units.reset(token)
            _unit_sessions.pop(s.sync_session, None)  # (no longer)
            if own:
                try:
                    if True:  # async only
                        if (
                            failed
                            or s.sync_session.in_transaction()
                            or _ends[type(s)] is _own_methods
                        ):
                            # run to completion, as SQLAlchemy's async session is on exit: a
                            # cancellation arriving now must not leave it half closed and its
                            # connection out of the pool, nor return before the close is done.
                            # (A session class's own close is awaited so, as after a failure.)
                            await _to_completion(_close(s, quiet=failed))
                        else:
                            # committed: the session holds no connection, so closing it does
                            # no I/O and needs neither a greenlet nor a task of its own
                            s.sync_session.close()
                    else:  # sync only
                        _close(s, quiet=failed)
                except Exception as after:
                    # raised by your session class's own close after the unit's COMMIT
                    # succeeded: the unit is committed (not where it ran with self-healing off)
                    if not failed and request is not None:
                        self._failed_after_commit(after, request, record)
                    raise
                except BaseException as interruption:
                    # interrupted while the session closed (your class's own close, a
                    # deadline): after the COMMIT, if the unit succeeded, which is then said
                    # and marked, as an interruption in the prune is (not where the unit ran
                    # with self-healing off: its request is None)
                    if not failed and request is not None:
                        self._referee.interrupted(request, interruption)
                    raise

    def _failed_after_commit(
        self, exc: BaseException, request: CommitRequest, record: AttemptRecord
    ) -> None:
        """``exc`` came after the unit's COMMIT succeeded (see ``Policy.failed_after_commit``);
        an enclosing attempt is told the unit committed, as after a unit that succeeded: code
        that catches ``exc`` and fails later must not replay it."""
        request.answered = True
        if record.enclosing is not None:
            record.unit_committed(request)
        self.policy.failed_after_commit(exc, request.may_have_written())

    async def _commit_failed(
        self, exc: Exception, request: CommitRequest, session: AsyncSession
    ) -> None:
        """COMMIT failed: return if it was verified committed (or changed nothing: see
        ``CommitReferee.done_before_last_commit``), else raise."""
        exc = self._referee.prepare_failure(exc, request)
        if await self._finish_two_phase(request, exc, session):
            return  # a two-phase unit whose prepared transactions were all committed here
        await self._end_two_phase(request, exc)
        if self._referee.done_before_last_commit(exc, request):
            return  # a transaction that wrote nothing, after the unit's own COMMIT midway
        ticket = self._referee.must_verify(exc, request)
        if ticket is None:
            raise exc
        verdict = self._referee.known(request, ticket)
        if verdict is None:
            try:
                verdict = await self._verify_commit(ticket)
            except BaseException as interruption:  # (its errors are verdicts)
                self._referee.interrupted(request, interruption, verifying=True)
                raise
        if not self._referee.settle(ticket, verdict, exc, request):
            raise exc

    async def _finish_two_phase(
        self, request: CommitRequest, exc: Exception, session: AsyncSession
    ) -> bool:
        """Commit the prepared transactions a failed two-phase COMMIT left pending (see
        ``CommitReferee.two_phase_pending``), each on a new connection to its database, with
        the referee's backoff; True when the unit is now committed everywhere. A COMMIT
        PREPARED answered with a warning (a cancelled wait for the synchronous standby) counts
        once proven replicated; never proven, the unit ends ``CommitOutcomeUnknownError`` (see
        ``CommitReferee.two_phase_finished``).

        The session's connections are then invalidated, not rolled back: SQLAlchemy's
        rollback would send ROLLBACK PREPARED for transactions committed here (and a driver
        connection left in a two-phase state can't be reused anyway)."""
        pending = self._referee.two_phase_pending(request, exc)
        if not pending:
            return False
        try:
            # (the recovery's statements are neither the unit's nor its commit's)
            with library_work():
                finished = [
                    finishing
                    for finishing in pending
                    if (
                        await self._on_new_connections(
                            finishing.engine, commit_if_prepared, finishing
                        )
                    )[0]
                ]
        except BaseException as interruption:  # cancelled or interrupted while finishing
            self._referee.interrupted(request, interruption, verifying=True)
            await _keep_prepared(session)
            raise
        # finished or not: those still pending stay prepared (the unit had decided to commit)
        await _keep_prepared(session)
        return self._referee.two_phase_finished(request, pending, finished, exc)

    async def _end_two_phase(self, request: CommitRequest, exc: Exception) -> None:
        """Roll back what a two-phase unit's failed PREPARE step may have left prepared (see
        ``CommitReferee.two_phase_undecided``), each on a new connection to its database, with
        the referee's backoff; the unit is not replayed while any may be left, and what may be
        left is named. Interrupted meanwhile, the rest is looked for in the background (see
        :meth:`_end_later`)."""
        pending = self._referee.two_phase_undecided(request, exc)
        if not pending:
            return
        sweep = Sweep(pending)
        interrupted: BaseException | None = None
        try:
            await self._roll_back_prepared(sweep)
        except BaseException as stopped:
            if not isinstance(stopped, Exception):  # (cancelled or interrupted)
                interrupted = stopped
            raise
        finally:
            request.two_phase_ended = sweep.ended
            # interrupted, what it could not end yet is the background's to end and to name
            left = sweep.left if interrupted is None else []
            self._referee.two_phase_abandoned(pending, sweep.ended, left, exc, request)
            if interrupted is not None:
                self._end_later(request, interrupted)

    async def _roll_back_prepared(self, sweep: Sweep) -> None:
        """Roll back each of ``sweep``'s prepared transactions still prepared, on a new
        connection to its database (:func:`rollback_if_prepared`, see
        :meth:`_on_new_connections`), noting on ``sweep`` how far it got."""
        # (the recovery's statements are neither the unit's nor its commit's)
        with library_work():
            for engine, xid in sweep.pending:
                found, last = await self._on_new_connections(engine, rollback_if_prepared, xid)
                sweep.note(xid, found, last)

    def _end_later(self, request: CommitRequest, interruption: BaseException) -> None:
        """A two-phase unit interrupted in its PREPARE step: what it may leave prepared (see
        ``CommitReferee.two_phase_interrupted``) is looked for and rolled back once the
        interruption has gone on, in a task (async: on the running loop; ``asyncio.run``
        cancels it at its end, which is said) or a daemon thread (sync) of its own, in a
        context of its own (none of the unit's attempt)."""
        pending = self._referee.two_phase_interrupted(request, interruption)
        if not pending:
            return
        swept = self._referee.two_phase_swept
        errand = Errand(pending, lambda sweep: swept(sweep, interruption, request))
        try:
            if True:  # async only
                run = self._run_errand(errand)
                try:
                    task = contextvars.Context().run(asyncio.get_running_loop().create_task, run)
                except BaseException:
                    run.close()  # (never started: not left to warn it was never awaited)
                    raise
                _ERRAND_TASKS.add(task)  # (a task is kept only weakly by its loop)
                task.add_done_callback(functools.partial(_errand_ended, errand))
            else:  # sync only
                start_thread(errand, self._run_errand)
        except Exception as failed:  # (no thread to be had, a loop closing): said, not raised
            errand.done(NotStarted(f"{type(failed).__name__}: {failed}"))

    async def _run_errand(self, errand: Errand) -> None:
        try:
            await self._roll_back_prepared(errand)
        except Exception as failed:  # (its own, not a connection's): said in its line, not raised
            # (raised: a thread's traceback, or a task's error nobody reads)
            errand.stopped = LookFailed(f"{type(failed).__name__}: {failed}")
            debug_failure(log_session, "a background look for prepared transactions failed")
        except BaseException as stopped:  # (its task cancelled: said as what stopped it)
            errand.stopped = stopped
            raise
        finally:
            errand.done()

    async def _on_new_connections(
        self, engine: Engine, step: Callable[[Connection, Any], bool | None], xid: Any
    ) -> tuple[bool | None, BaseException | None]:
        """``step(connection, xid)`` (:func:`commit_if_prepared` or
        :func:`rollback_if_prepared`) on a new connection to ``engine``'s database, with the
        referee's backoff: its answer, and the last error met; None when that could not be
        known (the server unreachable or refusing through every check, or the PREPARE still
        running at the deadline: a step that answers None, a PREPARE the server is still
        carrying out, is taken again every PREPARE_POLL seconds, however many checks that
        takes)."""
        last: BaseException | None = None
        referee = self._referee
        for delay, ends in referee.timed_checks():
            if delay:
                await self._asleep(delay)
            while True:
                # (cut to what is left of the deadline on a frozen server: within_deadline)
                with within_deadline(functools.partial(referee.left, ends)):
                    try:
                        async with _bound_engine(engine).connect() as conn:
                            done = await conn.run_sync(step, xid)
                    except Exception as failed:  # the server restarts, or the old backend holds it
                        last = failed
                        debug_failure(log_session, "ending %s failed", xid)
                        break  # (the next check, after its backoff)
                if done is not None:
                    return done, None
                last = None  # still being prepared: taken again soon
                left = referee.left(ends)
                if left <= 0:
                    return None, None
                await self._asleep(min(PREPARE_POLL, left))
        return None, last

    async def _settle_own_commit(
        self,
        attempt: AttemptRecord,
        ticket: CommitTicket,
        committed_before: bool,
        lost: Exception | None = None,
    ) -> None:
        """A COMMIT the unit's own code sent midway (``session.commit()`` in the unit) was
        answered with success *and a WARNING* (``ticket.warned``: a cancelled wait for the
        synchronous standby, committed on the primary only). Called by the marked connection
        before that COMMIT returns to the unit's code: settled as the unit's final COMMIT so
        answered is (see ``UnprovenCommit``), by the marker's claim on a new connection. Proven
        (committed, and confirmed by the synchronous standby where replication is in effect),
        it returns and the unit goes on. Found not committed where the check looks (a failover
        to a server that never had it): ``UnprovenCommit`` is raised, and the attempt is
        replayed when nothing else of it committed before (``committed_before``), partly
        committed otherwise. Else ``CommitOutcomeUnknownError`` (never replayed). A ticket
        without a marker (``UNMARKED``: no markers installed) can't be proven: unknown.

        ``lost``: that COMMIT's answer was lost instead (the driver's error, marked an unknown
        outcome), and the caller raises it on. Found committed, it is a lost connection of an
        attempt that committed part of its work (partly committed, never replayed); found not
        committed, a lost connection (the attempt replayed when nothing else of it
        committed); otherwise it stays an unknown outcome, as the engine's hooks say it."""
        exc: Exception = UnprovenCommit(str(ticket.warned)) if lost is None else lost
        request = CommitRequest()
        request.tickets.append(ticket)
        request.committing = True
        referee = self._referee
        verdict = referee.known(request, ticket)
        unusable = None
        if verdict is None:
            unusable = no_second_connection(ticket.engine or self.engine.sync_engine)
        if unusable is not None:  # (the unit holds the pool's one connection)
            ticket.check_failed = unusable
            verdict = CommitVerdict.UNKNOWN
        elif verdict is None:
            try:
                verdict = await self._verify_commit(ticket)
            except BaseException as interruption:  # (its errors are verdicts)
                referee.interrupted(request, interruption, verifying=True)
                raise
        if lost is not None:
            if verdict not in (CommitVerdict.COMMITTED, CommitVerdict.ABORTED):
                return  # unknown: said and counted as such (see EngineHooks.handle_error)
            referee.settle(ticket, verdict, exc, request)  # (said: committed or not)
            commit_answer_settled(lost)
            if verdict is CommitVerdict.COMMITTED:
                attempt.committed = True
            elif not committed_before:
                attempt.committed = False
            return
        if referee.settle(ticket, verdict, exc, request):
            return
        if not committed_before:  # nothing of the attempt is committed where it runs now
            attempt.committed = False
        raise exc

    def _own_commit_unproven(self, ticket: CommitTicket) -> None:
        """A COMMIT the unit's own code sent midway on a connection of the other kind (a sync
        session's in an async unit, or the reverse) was answered with a WARNING: this
        factory's checks can't run from that connection, so it can't be proven. Unknown, as a
        ticket without a marker is: ``CommitOutcomeUnknownError``, counted and said (never
        replayed)."""
        request = CommitRequest()
        request.tickets.append(ticket)
        request.committing = True
        ticket.unknown_why = (
            "no check runs from a connection of another kind than the unit's (a sync session's "
            "COMMIT in an async unit, or the reverse)"
        )
        exc = UnprovenCommit(str(ticket.warned))
        self._referee.settle(ticket, CommitVerdict.UNKNOWN, exc, request)  # (raises)

    async def _verify_commit(self, ticket: CommitTicket) -> CommitVerdict:
        """Settle a lost COMMIT answer on a new connection, reconnecting with backoff."""
        with library_work():  # the check's own COMMIT is neither the unit's nor the application's
            return await self._settle_on_new_connection(ticket)

    async def _settle_on_new_connection(self, ticket: CommitTicket) -> CommitVerdict:
        last = CommitVerdict.UNKNOWN
        referee = self._referee
        for delay, ends in referee.timed_checks():
            if delay:
                await self._asleep(delay)
            # its connect and its statements cut to what is left of the deadline (a frozen
            # server: see within_deadline)
            with within_deadline(functools.partial(referee.left, ends)):
                try:
                    async with _settling_engine(self.engine, ticket).connect() as conn:
                        try:
                            # READ COMMITTED whatever the engine's level: the claim must see it
                            if True:  # async only
                                await conn.run_sync(read_committed)
                            else:  # sync only
                                read_committed(conn)
                            verdict = await conn.run_sync(check_commit, ticket, referee.left(ends))
                        except Exception:
                            # not back to the pool: a driver error SQLAlchemy did not wrap (the
                            # isolation level set on a connection lost under the check) leaves
                            # it to the pool's reset, whose failure SQLAlchemy logs with a
                            # traceback
                            await _invalidate_quietly(conn)
                            raise
                except Exception as exc:
                    if self._referee.keep_checking_after(ticket, exc):
                        continue
                    return CommitVerdict.UNKNOWN
            ticket.check_reached, ticket.check_unreached = True, None
            if verdict.final:
                return verdict
            if verdict is CommitVerdict.UNREPLICATED or last is CommitVerdict.UNKNOWN:
                last = verdict  # the reason, should no later check know more
        return last


if True:  # async only
    #: the background tasks of :meth:`AsyncResilientSession._end_later` running (the loop
    #: keeps a task only weakly)
    _ERRAND_TASKS: set[asyncio.Task[None]] = set()

    def _errand_ended(errand: Errand, task: asyncio.Task[None]) -> None:
        """An errand's task is done: said, if its coroutine did not (a task cancelled before
        it ran, by ``asyncio.run``'s end say)."""
        _ERRAND_TASKS.discard(task)
        errand.done(asyncio.CancelledError() if task.cancelled() else None)


async def _keep_prepared(session: AsyncSession) -> None:
    """Invalidate the connections of a two-phase unit whose COMMIT PREPAREDs had begun (it had
    decided to commit), rather than let SQLAlchemy's rollback end its prepared transactions
    with ROLLBACK PREPARED: the ones still pending stay prepared, to be committed (the unit's
    lines name them), never rolled back while another database committed. Run to completion
    (an interruption may be what brought the unit here)."""
    try:
        if True:  # async only
            await _to_completion(session.invalidate())
        else:  # sync only
            session.invalidate()
    except Exception:
        debug_failure(log_session, "invalidating a two-phase unit's connections failed")


async def _invalidate_quietly(conn: AsyncConnection) -> None:
    try:
        await conn.invalidate()
    except Exception:
        debug_failure(log_session, "invalidating a check's connection failed")


async def _rollback_quietly(session: AsyncSession) -> None:
    """Roll back after a failed attempt (called where its error is being handled); a dead
    connection must not hide the real error, in the line either: it names the attempt's error
    whatever the rollback's was raised from."""
    attempt = sys.exc_info()[1]
    try:
        await session.rollback()
    except Exception:
        debug_failure(log_session, "rollback after a failed attempt failed too", after=attempt)


async def _close(session: AsyncSession, *, quiet: bool) -> None:
    """Close a unit's session. After a failed attempt (``quiet``) the attempt's error is the one
    to raise, so a failure to close is only logged."""
    if not quiet:
        await session.close()
        return
    try:
        await session.close()
    except Exception:
        debug_failure(log_session, "closing the session after a failed attempt failed too")


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _told_of_success(
    policy: Policy, saved: SavedNote, interruption: BaseException, fn: Any
) -> None:
    """``interruption`` ended a unit's attempts (see :meth:`AsyncResilientSession._accounted`):
    when it arrived as the circuit breaker was told of the unit's success (marked so by
    ``Policy.succeeded``) after a COMMIT of the unit saved a change (``saved``), it is said
    and marked as any interruption after a unit's COMMIT (unless a unit inside it did)."""
    if (
        saved.saved
        and success_interrupted(interruption)
        and saved_then_interrupted(interruption) is None
    ):
        interrupted_after_commit(
            policy.config,
            policy.service,
            interruption,
            f"the unit ({_name(fn)}), as its circuit breaker was told of its success",
        )


def _validated(
    fn: Callable[..., Awaitable[R]], check: ResponseCheck, factory: FactoryCore
) -> Callable[..., Awaitable[R]]:
    """``fn`` whose result is checked inside the unit, before its COMMIT: an invalid result
    rolls the unit back (and ``ResponseValidationError`` is not transient: never retried).

    The unit's changes are flushed first, with the session class's own ``flush``, as the
    COMMIT would flush them: a row the unit added is checked with its id (and the check's
    reads find the unit's writes); a flush error is the unit's error, as without ``validate``
    (the transition guard's refusal included). The flush sends no COMMIT: the unit may be
    replayed after it as after any statement of its own.

    An async unit's check runs in ``session.run_sync``, SQLAlchemy's greenlet where a sync
    session's I/O may happen: a relationship of an ORM row that is not loaded yet is loaded
    there (as the sync twin loads it), not refused with ``MissingGreenlet``. An error raised
    by a statement of the session meanwhile (a lost connection while such a relationship
    loads) is raised as itself, not taken for an invalid result (see
    :func:`~._validation.check_response`)."""

    async def unit(session: Any, *args: Any, **kwargs: Any) -> R:
        value = await _call_unit(fn, session, args, kwargs)
        await session.flush()
        checked: R = await session.run_sync(_check_in_unit, check, value, factory)
        return checked

    unit.__qualname__ = _name(fn)
    return unit


def _check_in_unit(session: Any, check: ResponseCheck, value: Any, factory: FactoryCore) -> Any:
    """:func:`check_response` of a unit's result, in the unit's (sync) session, whose
    statements' errors are raised as themselves."""
    return check_response(check, value, factory.config, factory.service, session)


def _refuse_method(fn: Any) -> None:
    """``transactional`` passes the session as the first argument: on a method (a function
    whose first parameter is ``self`` or ``cls``, decorated in its class) the session would
    arrive as ``self`` and the instance as the session."""
    code = getattr(fn, "__code__", None)
    if type(fn) is not types.FunctionType or code is None or not code.co_argcount:
        return
    first = code.co_varnames[0]
    if first in ("self", "cls"):
        raise TypeError(
            f"{_name(fn)} takes {first!r} first, but transactional passes the session as the "
            f"first argument (it would arrive as {first!r}): decorate a function whose first "
            "parameter is the session, or call Session.run(fn, ...) from the method"
        )


# -- what really differs: engines, unit functions, the unit running here ---------------------------
def _called_without_session(wrapper: Any, fn: Any) -> Any:
    """``transactional``'s function, whose signature (for ``inspect.signature``: FastAPI,
    documentation tools) is ``fn``'s without the session that the unit is given."""
    signature = unit_signature(fn)
    if signature is not None:
        wrapper.__signature__ = signature
    return wrapper


if True:  # async only
    from ._internals import sa_await as _await
    from ._retry import in_worker

    async def _to_completion(coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` (a clean-up) in a task of its own and wait for it to finish even when
        this task is cancelled meanwhile; that cancellation is raised once it has finished.
        (``asyncio.shield`` alone would return at once and leave the clean-up running in the
        background, where it could hand a connection to a pool the caller then disposes of.)
        SQLAlchemy does the same for its async session's exit, in a private helper."""
        task = asyncio.create_task(coro)
        cancelled: BaseException | None = None
        while True:
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as err:
                if task.done():
                    raise
                cancelled = err
            else:
                break
        if cancelled is not None:
            raise cancelled

    class _Begun(Generic[S]):
        """What an async factory's ``Session.begin()`` gives: a session in a transaction whose
        COMMIT (or ROLLBACK) runs in the caller's task, as ``session.begin()``'s, then the session
        closed, as its own ``async with`` closes it (see ``AsyncResilientSession.begin``)."""

        __slots__ = ("_token", "saved", "session", "transaction")

        transaction: AsyncSessionTransaction
        saved: SavedNote  # whether a COMMIT that may have written succeeded in the block
        _token: contextvars.Token[SavedNote | None]

        def __init__(self, session: S) -> None:
            self.session = session

        # SQLAlchemy's names for the two (its context manager's attributes)
        @property
        def async_session(self) -> S:
            return self.session

        @property
        def trans(self) -> AsyncSessionTransaction:
            return self.transaction

        async def __aenter__(self) -> S:
            self.transaction = self.session.begin()
            await self.transaction.__aenter__()
            self.saved = SavedNote(dropin_block.get())
            self._token = dropin_block.set(self.saved)
            return self.session

        async def __aexit__(self, kind: Any, value: Any, traceback: Any) -> None:
            saved_before = self.saved.saved
            try:
                await self.transaction.__aexit__(kind, value, traceback)
            except BaseException as failed:
                if (
                    kind is None
                    and self.saved.saved
                    and not isinstance(failed, Exception)
                    and (
                        commit_step_unended(self.session.sync_session)
                        # the block's COMMIT, its first that saved, answered: interrupted as
                        # the transaction closed (asyncpg's close of a connection the pool
                        # does not keep, awaited), when the state says closed already
                        or not saved_before
                    )
                ):
                    # cancelled in the COMMIT step after the server answered the COMMIT (an
                    # after_commit listener of yours awaiting I/O): the change is saved
                    block_interrupted(self.session.sync_session, failed, "Session.begin()")
                if not isinstance(failed, Exception):
                    # interrupted (a cancellation, a deadline): closed, as SQLAlchemy's own
                    # block runs its end to completion, close included
                    await self.session.__aexit__(kind, value, traceback)
                # an error of the transaction's end (its COMMIT refused, a listener's error)
                # leaves the session open, its objects in it, as async_sessionmaker.begin()
                # leaves it
                raise
            finally:
                reset_block(self._token, self.saved)
            try:
                await self.session.__aexit__(kind, value, traceback)
            except Exception:
                raise
            except BaseException as interruption:
                # the block's COMMIT succeeded: a change is saved if it may have written (a
                # block that only read saved nothing: resubmitting it is safe)
                if kind is None and self.saved.saved:
                    block_interrupted(self.session.sync_session, interruption, "Session.begin()")
                raise

    def _note_async_blocks(cls: Any) -> None:
        """Give an async factory's session class ``cls`` an ``async with`` that notes what its
        block commits, as a sync factory's ``with`` (see ``_note_with_blocks`` in the sync
        twin): drop-in code's ``async with Session() as session: ... await
        session.commit()``. A cancellation (or a deadline: ``asyncio.timeout``) arriving in
        SQLAlchemy's close at the block's end (run to its end in a task of its own, then the
        cancellation raised), at the end of a block that ended normally after a COMMIT in it
        that may have written succeeded, or inside such a COMMIT's step once the server
        answered it (an ``after_commit`` listener awaiting I/O), is said and marked as a unit's
        interruption after its COMMIT is (see ``CommitReferee.interrupted``): its caller hears
        only the cancellation, which a web handler would answer as a plain error, inviting a
        resubmit that saves the change again. After a block that committed no write, nothing
        is said: nothing was saved. (``Session.begin()`` does the same in its own block,
        ``_Begun``, which calls the session's ``__aexit__`` without its ``__aenter__``: not
        noted twice.) Nothing of it runs in a unit, which enters no ``async with``. Your
        class's ``__aenter__`` and ``__aexit__`` are looked up as the block runs, as for a
        session of your class itself (ones patched in after the factory was made are called)."""
        if getattr(cls.__aexit__, "_rdb_noting", False):
            return  # a subclass of another factory's class: its ``async with`` notes already

        async def __aenter__(session: Any) -> Any:
            entered = await super(cls, session).__aenter__()
            block_entered(session)
            return entered

        async def __aexit__(session: Any, kind: Any, value: Any, traceback: Any) -> Any:
            # (every drop-in block passes here: no context manager for the reset, no tuple made)
            block = block_left(session)
            if block is not None and interrupted_in_its_commit(
                block, session.sync_session, kind, value
            ):
                # cancelled in the block's COMMIT step after the server answered the COMMIT
                # (an after_commit listener of yours awaiting I/O): the change is saved.
                # (Looked at before the close below, which ends the transaction.)
                block_interrupted(session.sync_session, value, ASYNC_WITH)
            try:
                # (your class's answer)
                return await super(cls, session).__aexit__(kind, value, traceback)
            except Exception:
                raise
            except BaseException as interruption:
                if kind is None and block is not None and block[0].saved:
                    block_interrupted(session.sync_session, interruption, ASYNC_WITH)
                raise

        setattr(__aexit__, "_rdb_noting", True)  # noqa: B010 (see above)
        setattr(cls, "__aenter__", __aenter__)  # noqa: B010 (methods, set on the factory's class)
        setattr(cls, "__aexit__", __aexit__)  # noqa: B010

    def _settling_engine(engine: AsyncEngine, ticket: CommitTicket) -> AsyncEngine:
        """Where a lost COMMIT is settled: the factory's engine, or the one whose database the
        COMMIT went to (``ticket.engine``, a sync engine: wrapped as SQLAlchemy does)."""
        return engine if ticket.engine is None else _bound_engine(ticket.engine)

    def _bound_engine(engine: Engine) -> AsyncEngine:
        """One of the unit's engines, as SQLAlchemy's events name it (the sync engine behind
        an ``AsyncEngine``), wrapped as SQLAlchemy does."""
        return AsyncEngine(engine)

    def _refuse_the_other_sleep(kwargs: dict[str, Any]) -> None:
        if "sleep" in kwargs:
            raise TypeError(
                "AsyncResilientSession takes asleep= (an async function of seconds), not sleep="
            )

    _SYNC_HINT = (
        "for sync code use ResilientSession with a sync Engine, or await session.run_sync(fn) "
        "inside an async unit"
    )

    #: why an async generator function is no unit (said after its name)
    _ASYNC_GENERATOR = (
        "is an async generator function (async def with yield), whose body would run only when "
        "it is iterated, after the unit committed and closed its session: units of an "
        "AsyncResilientSession are async functions that return their result (a list, say)"
    )

    # code flags of functions that are no async unit: none (what one returns is checked)
    _NOT_A_UNIT = 0

    def _require_unit(fn: Any, where: str) -> None:
        """A unit of ``run``/``run_in``: any callable (what it returns is checked)."""
        if type(fn) is types.FunctionType:  # every unit passes here: the common case first
            return
        if inspect.iscoroutine(fn):
            fn.close()  # never awaited: close it so it leaves no "never awaited" warning behind
            raise TypeError(
                f"AsyncResilientSession.{where} needs the async function itself, got a coroutine "
                "object: pass fn and its arguments, as in Session.run(fn, *args), not "
                "Session.run(fn(...))"
            )
        if not callable(fn):
            raise TypeError(
                f"AsyncResilientSession.{where} needs an async function, got {type(fn).__name__}"
            )

    def _require_unit_function(fn: Any, where: str) -> None:
        """What ``transactional`` decorates: an async function."""
        _require_unit(fn, where)
        if inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(
            getattr(type(fn), "__call__", None)  # noqa: B004
        ):
            raise TypeError(f"{_name(fn)} {_ASYNC_GENERATOR}")
        if not _is_async_callable(fn):
            raise TypeError(
                f"AsyncResilientSession.{where} needs an async function (async def), and "
                f"{_name(fn)} is not one; {_SYNC_HINT}"
            )

    def _is_async_callable(fn: Any) -> bool:
        if inspect.iscoroutinefunction(fn):
            return True
        # An instance whose class defines ``async def __call__``.
        return inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))  # noqa: B004

    async def _call_unit(
        fn: Callable[..., Awaitable[R]],
        session: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        """``await fn(session, ...)``; a function that returns no awaitable is a usage error."""
        result = fn(session, *args, **kwargs)
        if type(result) is not types.CoroutineType:  # the common case skips inspect's ABC checks
            _require_awaitable(fn, result)
        value = await result
        if type(value) in _REFUSED_VALUES:
            await _refuse_value(fn, value)
        return value

    #: what ``session.stream()`` / ``stream_scalars()`` give (and ``.scalars()``, ``.mappings()``
    #: of them): rows read from a server-side cursor, which ends with the unit's transaction
    _STREAMED_RESULTS = frozenset({AsyncResult, AsyncScalarResult, AsyncMappingResult})

    #: what an async unit may not give as its result (see _refuse_value)
    _REFUSED_VALUES = frozenset(
        {
            types.CoroutineType,
            types.GeneratorType,
            types.AsyncGeneratorType,
            *_STREAMED_RESULTS,
        }
    )

    async def _refuse_value(fn: Any, value: Any) -> None:
        """An async unit's result is a coroutine (``return session.execute(...)``: one
        ``await`` forgotten), a generator or an async generator: nothing of it has run yet. Its
        work would run only when the caller awaits or iterates it, after the unit committed
        and closed its session (a statement there begins a transaction nobody commits, holding
        its connection and locks), or never, while the unit reported success: refused, as a
        sync unit's is (see the sync ``_refuse_result``). Closed, so it leaves no "never
        awaited" warning behind; the ``TypeError`` rolls the unit back (not retried). So is a
        streamed result (``session.stream()``): its server-side cursor ends with the unit's
        transaction, so reading it after the unit fails (asyncpg: ``NoActiveSQLTransactionError``
        raised as it is; psycopg: ``InvalidCursorName``), far from the unit that caused it."""
        name = _name(fn)
        if type(value) in _STREAMED_RESULTS:
            with contextlib.suppress(Exception):  # (its cursor, before the rollback)
                await value.close()
            raise TypeError(
                f"{name} returned {type(value).__name__}, whose rows come from a server-side "
                "cursor (session.stream(), stream_scalars()) that the unit's COMMIT closes: "
                "reading it afterwards fails. Return its rows instead (await result.all(), "
                "[row async for row in result])"
            )
        if type(value) is types.CoroutineType:
            value.close()
            raise TypeError(
                f"{name} returned a coroutine ({value.__qualname__}(...), never awaited), "
                "whose work would run only if the caller awaited it, after the unit committed "
                "and closed its session: await it in the unit (return await "
                "session.execute(...), not return session.execute(...))"
            )
        kind = "a generator" if type(value) is types.GeneratorType else "an async generator"
        if type(value) is types.GeneratorType:
            value.close()  # (an async generator not started has nothing to close)
        raise TypeError(
            f"{name} returned {kind} ({value.__qualname__}), whose code would run only when "
            "it is iterated, after the unit committed and closed its session: return a list "
            "(list(...), .all()) instead"
        )

    def _require_awaitable(fn: Any, result: object) -> None:
        if type(result) is types.AsyncGeneratorType:
            raise TypeError(f"{_name(fn)} returned an async generator: it {_ASYNC_GENERATOR}")
        if not inspect.isawaitable(result):
            raise TypeError(
                f"{_name(fn)} returned {type(result).__name__}, not an awaitable: units of an "
                f"AsyncResilientSession are async functions (async def); {_SYNC_HINT}"
            )

    def _greenlet_offload(fn: Callable[..., Any], *args: Any, finish: bool = False) -> Any:
        """``fn(*args)`` in a worker thread, awaited through SQLAlchemy's ``await_`` bridge: the
        drop-in connect retry's breaker and budget scripts, while shared (``Policy.offload``),
        do not hold the event loop while Redis is slow (:func:`in_worker`: a probe noted in the
        unit's context, which the greenlet shares)."""
        return _await(in_worker(fn, *args, finish=finish))

    def _greenlet_sleep(asleep: Callable[[float], Awaitable[None]]) -> Callable[[float], None]:
        """Back off without blocking the event loop, with ``asleep``.

        SQLAlchemy runs an ``AsyncSession``'s ORM work in a greenlet on the loop; the drop-in
        connect retry happens there (in ``Session._connection_for_bind``), so it sleeps with
        SQLAlchemy's ``await_`` bridge and the loop keeps running meanwhile.
        """

        def sleep(seconds: float) -> None:
            _await(asleep(seconds))

        return sleep

    # -- a session class's own flush, commit and close ------------------------------------------
    class _OwnMethods:
        """A unit's sync session as the end of the unit (``flush_and_commit``,
        ``commit_plainly``) sees it, whose ``flush`` and ``commit`` are the async session's own,
        awaited through SQLAlchemy's bridge out of its greenlet, as if the unit's code awaited
        them; everything else is the sync session's."""

        __slots__ = ("_session", "_sync")

        def __init__(self, sync: Any, session: AsyncSession) -> None:
            self._sync = sync
            self._session = session

        def flush(self) -> None:
            _await(self._session.flush())

        def commit(self) -> None:
            _await(self._session.commit())

        @property
        def sync_target(self) -> Any:
            """The sync session, for event listeners (see ``_unit.flush_and_commit``)."""
            return self._sync

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sync, name)

    async def _own_methods(session: AsyncSession, end: Callable[..., None], *args: Any) -> None:
        """End a unit whose session class overrides ``flush``, ``commit`` or ``close`` (to
        publish events, free a resource...): ``end`` as for any class, in one greenlet hop,
        with the class's own ``flush`` and ``commit`` awaited (the unit's session is then
        closed with its own ``close``, awaited too: see ``_attempt``), as the sync twin calls
        its session class's. The commit protocol, the checks and the counters are the same."""
        await session.run_sync(_end_with, session, end, *args)

    class _OwnFlush(_OwnMethods):
        """:class:`_OwnMethods` of a class that overrides ``flush`` (or ``close``) and not
        ``commit``: its commit is SQLAlchemy's, so the unit flushes first, through the class's
        own ``flush`` (see ``_internals.commit_flushes``)."""

        __slots__ = ()

        def commit(self) -> None:
            self._sync.commit()

    PLAIN_COMMITS.add(_OwnFlush.commit)

    def _end_with(sync: Any, session: AsyncSession, end: Callable[..., None], *args: Any) -> None:
        own = type(session).commit is not _PLAIN_COMMIT
        end((_OwnMethods if own else _OwnFlush)(sync, session), *args)

    #: ``AsyncSession``'s own methods, as imported: a class whose ``flush``, ``commit`` or
    #: ``close`` is another (its own, or one patched in, on it or on ``AsyncSession`` itself)
    #: ends its units through them (see ``_Ends``)
    _PLAIN_METHODS = (AsyncSession.flush, AsyncSession.commit, AsyncSession.close)
    _PLAIN_COMMIT = AsyncSession.commit

    class _Ends(dict[type[AsyncSession], Callable[..., Awaitable[None]]]):
        """How a unit of each ``AsyncSession`` class ends: ``_ends[type(s)](s, end, *args)``
        runs ``end(sync_session, *args)`` with ``s.run_sync``, in one greenlet hop (the class's
        ``run_sync``, as ``s.run_sync`` calls it), or, for a class whose ``flush``, ``commit``
        or ``close`` is not ``AsyncSession``'s, with :func:`_own_methods`.
        (``scripts/async_to_sync.py`` makes the call ``end(s, *args)`` in the sync twin, whose
        session class's methods are looked up as they are called.)

        Decided per class, with the four methods it was decided on (``seen``): a unit
        compares them with the class's at its end, by identity (a tuple of four attributes,
        one line), and :meth:`follow` decides again when one differs, so that a method
        patched onto the class later (``mock.patch.object``, ``monkeypatch.setattr``, an
        assignment to the class) is called by the units after it, as the sync twin and
        ``async_sessionmaker``'s own sessions call it."""

        def __init__(self) -> None:
            super().__init__()
            #: class -> its (flush, commit, close, run_sync) when its end was decided
            self.seen: dict[type[AsyncSession], tuple[Any, ...]] = {}

        def follow(self, cls: type[AsyncSession]) -> None:
            """Decide ``cls``'s end (again) if its methods are not those it was decided on."""
            methods = (cls.flush, cls.commit, cls.close, cls.run_sync)
            if self.seen.get(cls) == methods:
                return
            overrides = methods[:3] != _PLAIN_METHODS
            self[cls] = _own_methods if overrides else methods[3]
            self.seen[cls] = methods

        def forget(self, cls: type[AsyncSession]) -> None:
            """``cls`` is a factory's own class and the factory is gone (see ``__init__``)."""
            self.pop(cls, None)
            self.seen.pop(cls, None)

        def __missing__(self, cls: type[AsyncSession]) -> Callable[..., Awaitable[None]]:
            self.follow(cls)
            return self[cls]

    _ends = _Ends()
    _seen = _ends.seen  # (read on every unit's path: one attribute fewer)

    class _TaskUnit:
        """The unit of work running in the current asyncio task, with ``ContextVar``'s
        ``get``/``set``/``reset``.

        Not a ContextVar, which a task created inside a unit would inherit: such a task runs
        units of its own, since an AsyncSession must not be shared between tasks.
        """

        def get(self) -> ActiveUnit | None:
            return async_units.get(asyncio.current_task())

        def set(self, unit: ActiveUnit) -> tuple[Any, ActiveUnit | None]:
            task = asyncio.current_task()
            outer = async_units.get(task)
            async_units[task] = unit
            return task, outer

        def reset(self, token: tuple[Any, ActiveUnit | None]) -> None:
            task, outer = token
            if outer is None:
                del async_units[task]
            else:
                async_units[task] = outer

    _units = _TaskUnit()

    def _prune_in_task(given: CommitProtocol | Any, request: CommitRequest) -> None:
        """Prune expired markers after a unit's COMMIT (see ``flush_and_commit``), in a task of
        its own: nothing of it runs on the unit's task, so a deadline (``asyncio.timeout``
        around ``run``) or a cancellation of the unit arriving then can't turn the committed
        unit into a failure for its caller, nor cut the prune off. One per engine at a time
        (see ``claim_prune``), kept until it is done (``asyncio.run`` and ``asyncio.Runner``
        cancel it if the loop ends first). Its context is a new one: it is no unit's work.
        (Called in the unit's greenlet hop, on the event loop's thread.) On an engine whose
        pool has one connection (``StaticPool``, ``AssertionPool``) it runs inline, in that
        hop, as the sync factory's does: in a task it would use that connection while the
        application's next unit or session does (asyncpg's "another operation is in progress",
        a connection invalidated under them) or make its checkout fail (``AssertionPool``)."""
        protocol = claim_prune(given, request)
        if protocol is None:
            return
        if one_connection_pool(protocol.engine.pool):
            prune_claimed(protocol)
            return
        loop = asyncio.get_running_loop()
        # the pool as the unit left it: an engine disposed of before the task's first step
        # (the application's shutdown right after a unit) has another one by then
        pool = protocol.engine.pool
        task = contextvars.Context().run(loop.create_task, _prune(protocol, pool))
        protocol.pruning = task
        _prunes.add(task)  # (the loop keeps its tasks only weakly)
        task.add_done_callback(functools.partial(_pruned_by, protocol))

    def _pruned_by(protocol: CommitProtocol, task: asyncio.Task[None]) -> None:
        _prunes.discard(task)
        if protocol.pruning is task:
            protocol.pruning = None

    #: the prunes' tasks still running
    _prunes: set[asyncio.Task[None]] = set()

    async def _prune(protocol: CommitProtocol, pool: Any) -> None:
        """The prune's task: a short transaction on a connection of the engine, its errors
        handled as the sync factory's (see ``prune_quietly``). Nothing is done, or its
        connection is closed rather than checked in, when the engine was disposed of since the
        unit (``pool``: its pool then; ``AsyncEngine.dispose()`` does not wait for the task):
        nothing would ever close a connection of the pool that replaced it."""
        engine = protocol.engine
        if engine.pool is not pool:
            return  # disposed of before this task's first step: the application is done
        try:
            with library_work():
                async with _bound_engine(engine).connect() as conn:
                    try:
                        count = await conn.run_sync(prune)
                    finally:
                        if engine.pool is not pool:
                            await conn.invalidate()
        except Exception as exc:
            prune_failed(protocol, exc)
        else:
            pruned(protocol, count)

    _prune_after = _prune_in_task
else:  # sync only

    def _settling_engine(engine: Engine, ticket: CommitTicket) -> Engine:
        """Where a lost COMMIT is settled: the factory's engine, or the one whose database the
        COMMIT went to (``ticket.engine``)."""
        return engine if ticket.engine is None else _bound_engine(ticket.engine)

    def _bound_engine(engine: Engine) -> Engine:
        """One of the unit's engines, as SQLAlchemy's events name it."""
        return engine

    def _refuse_the_other_sleep(kwargs: dict[str, Any]) -> None:
        if "asleep" in kwargs:
            raise TypeError("ResilientSession takes sleep= (a function of seconds), not asleep=")

    # code flags of functions that are no sync unit: coroutine and generator functions
    _NOT_A_UNIT = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR

    def _note_with_blocks(cls: Any) -> None:
        """Give a factory's session class ``cls`` a ``with`` that notes what its block commits:
        drop-in code's ``with Session() as session:``, and ``with Session.begin() as session:``,
        which enters one. An interruption (``KeyboardInterrupt``, ``SystemExit``, a
        ``BaseException`` timeout of gevent's) arriving as the session closes, at the end of a
        block that ended normally after a COMMIT in it that may have written succeeded, or
        inside such a COMMIT's step once the server answered it (an ``after_commit`` listener
        doing I/O), is said and marked as a unit's interruption after its COMMIT is (see
        ``CommitReferee.interrupted``): its caller hears only the interruption, which a web
        handler would answer as a plain error, inviting a resubmit that saves the change again.
        After a block that committed no write, nothing is said: nothing was saved. (An async
        factory's ``Session.begin()`` does the same in its own block, ``_Begun``, and its
        session class's ``async with``: ``_note_async_blocks``.) Your class's ``__enter__`` and
        ``__exit__`` are looked up as the block runs, as for a session of the class
        ``sessionmaker`` makes (ones patched in after the factory was made are called)."""
        if getattr(cls.__exit__, "_rdb_noting", False):
            return  # a subclass of another factory's class: its ``with`` notes already

        def __enter__(session: Any) -> Any:
            entered = super(cls, session).__enter__()
            block_entered(session)
            return entered

        def __exit__(session: Any, kind: Any, value: Any, traceback: Any) -> Any:
            # (every drop-in block passes here: no context manager for the reset, no tuple made)
            block = block_left(session)
            if block is not None and interrupted_in_its_commit(block, session, kind, value):
                # interrupted in the block's COMMIT step after the server answered the COMMIT
                # (an after_commit listener of yours doing I/O): the change is saved. (Looked
                # at before the close below, which ends the transaction.)
                block_interrupted(session, value, SYNC_WITH)
            try:
                # (your class's answer, if any)
                return super(cls, session).__exit__(kind, value, traceback)
            except Exception:
                raise
            except BaseException as interruption:
                if kind is None and block is not None and block[0].saved:
                    block_interrupted(session, interruption, SYNC_WITH)
                raise

        setattr(__exit__, "_rdb_noting", True)  # noqa: B010 (see above)
        setattr(cls, "__enter__", __enter__)  # noqa: B010 (methods, set on the factory's class)
        setattr(cls, "__exit__", __exit__)  # noqa: B010

    def _require_unit(fn: Any, where: str) -> None:
        """A unit of ``run``/``run_in``/``transactional``: not a coroutine or generator
        function."""
        if type(fn) is types.FunctionType and not fn.__code__.co_flags & _NOT_A_UNIT:
            return  # a plain function (every unit passes here), answered from its code flags
        if inspect.iscoroutinefunction(fn):  # the rest: partials, methods, marked callables
            raise TypeError(
                f"{_name(fn)} is a coroutine function; use AsyncResilientSession.{where} for it"
            )
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"{_name(fn)} is a generator function: its body would run only when its result "
                "is iterated, after the unit committed and closed its session; return a list"
            )
        if not callable(fn):
            raise TypeError(
                f"ResilientSession.{where} needs a function taking the session first, got "
                f"{type(fn).__name__}"
            )

    _require_unit_function = _require_unit

    def _call_unit(
        fn: Callable[..., R], session: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> R:
        """``fn(session, ...)``; a function that returns a coroutine or a generator is a
        usage error."""
        result = fn(session, *args, **kwargs)
        if type(result) in _REFUSED_RESULTS:
            _refuse_result(fn, result)
        return result

    #: what a sync unit's ``session.execute()`` and the rest give: looked at by _refuse_result,
    #: refused when their rows come from a server-side cursor (``stream_results``, ``yield_per``)
    _RESULTS = frozenset({CursorResult, ChunkedIteratorResult, ScalarResult, MappingResult})

    #: what a sync unit may not return (see _refuse_result)
    _REFUSED_RESULTS = frozenset(
        {types.CoroutineType, types.GeneratorType, types.AsyncGeneratorType, *_RESULTS}
    )

    def _refuse_result(fn: Any, result: Any) -> None:
        """A sync unit returned a coroutine (a lambda or a class around an ``async def``) or a
        generator (a lambda or a class around a generator function, a generator expression):
        nothing of it has run yet. A coroutine would never be awaited, so its work would never
        run; a generator's code would run when the caller iterates it, after the unit
        committed and closed its session (a statement there begins a transaction nobody
        commits, holding its connection and locks), while the unit reported success. Closed,
        so it leaves no "never awaited" warning behind; the ``TypeError`` rolls the unit back
        (not retried). An async generator: nothing could ever iterate it in the unit. A
        ``Result`` is returned as it is, unless it streams from a server-side cursor
        (``stream_results``, ``yield_per``), which the unit's COMMIT closes: reading it after
        the unit would fail (``InvalidCursorName``), far from the unit; closed and refused."""
        if type(result) in _RESULTS:
            if not server_side_result(result):
                return  # (buffered: its rows are the driver's, readable after the unit)
            with contextlib.suppress(Exception):  # (its cursor, before the rollback)
                result.close()
            raise TypeError(
                f"{_name(fn)} returned {type(result).__name__}, whose rows come from a "
                "server-side cursor (stream_results, yield_per) that the unit's COMMIT "
                "closes: reading it afterwards fails. Return its rows instead (.all(), "
                "list(...))"
            )
        if type(result) is types.AsyncGeneratorType:  # (not started: nothing to close)
            raise TypeError(
                f"{_name(fn)} returned an async generator ({result.__qualname__}), whose code "
                "would never run in the unit: units of a ResilientSession are sync functions. "
                "For async code use AsyncResilientSession with an AsyncEngine; in sync code, "
                "return a list"
            )
        result.close()
        if type(result) is types.GeneratorType:
            raise TypeError(
                f"{_name(fn)} returned a generator ({result.__qualname__}), whose code would run "
                "only when it is iterated, after the unit committed and closed its session: "
                "return a list (list(...), .all()) instead"
            )
        raise TypeError(
            f"{_name(fn)} returned a coroutine ({result.__qualname__}(...), never awaited): "
            "units of a ResilientSession are sync functions, and nothing awaits what they "
            "return, so its work would never run. For async code use AsyncResilientSession "
            "with an AsyncEngine (await Session.run(fn, ...)); in sync code, call sync "
            "functions in the unit"
        )

    # The unit of work running in this thread (or greenlet, under gevent).
    _units = current_unit

    # (inline: see prune_quietly)
    _prune_after = prune_quietly


# The sessions running a unit (see _registry.in_unit): every unit adds its session, inline.
_unit_sessions = STATE.unit_sessions


def _engine_of(bind: Any, kwargs: dict[str, Any]) -> AsyncEngine | None:
    """The factory's engine: ``bind``'s, else the first engine of ``binds=``, else None (bound
    later with ``configure(bind=...)``)."""
    _refuse_the_other_sleep(kwargs)
    if bind is None:
        bind = next(iter((kwargs.get("binds") or {}).values()), None)
        if bind is None:
            return None
    engine: AsyncEngine = engine_of(bind, AsyncResilientSession, "AsyncResilientSession")
    return engine
