"""``with_self_healing``: the plan's wrapper, for any callable that is one whole operation.

Not part of the factories' sync/async twin: one function serves both, choosing
:meth:`Policy.call <resilient_db._retry.Policy.call>` or :meth:`Policy.acall
<resilient_db._retry.Policy.acall>` by the kind of function it is given. Two forms:

* ``with_self_healing(fn, ...)`` calls ``fn()`` now (the plan's wrapper);
* ``@with_self_healing(...)`` decorates a function (sync, or async such as a route handler):
  each call of it is one operation, retried and guarded by the breaker the same way.

A callable is async when it says so (:func:`is_async_callable`: a coroutine function, a
``functools.partial`` of one, an object whose ``__call__`` is one), or when what it returns turns
out to be awaitable: the plan's ``withSelfHealing(() => repo.get(1))`` is
``with_self_healing(lambda: repo.get(1))`` in Python, and nothing declares that lambda async.
Such a result is not a success of a sync operation (the operation has not run yet): it becomes
the first attempt of the async loop (:func:`_call`), and each retry calls the callable again and
awaits what it returns; the breaker is asked before that first call, as for any operation (an
open circuit raises from the call itself, which ``await with_self_healing(...)`` sees alike).
Refusing it with a ``TypeError`` would reject the plan's own shape for nothing: the attempt is
not lost, only finished later.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import time
import types
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, ParamSpec, Protocol, TypeVar, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import async_session
from sqlalchemy.orm import Session

from ._classify import debug_failure, partly_committed, sqlstate_of, success_interrupted
from ._commit import AttemptRecord
from ._config import Config, env_config
from ._internals import flask_after_request_functions
from ._observability import log_retry
from ._retry import Policy
from ._services import DEFAULT_SERVICE
from ._state import STATE
from ._unit import (
    admitted_by,
    check_service_name,
    interrupted_after_commit,
    lost_with_its_connection,
    part_of_running,
    restore_attached,
    runs_once_here,
    saved_then_interrupted,
)
from ._validation import ResponseCheck, ResponseValidator, check_response, validation_on

__all__ = ["SelfHealingDecorator", "is_async_callable", "with_self_healing"]

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


class SelfHealingDecorator(Protocol):
    """What ``with_self_healing(service=...)`` returns: a decorator keeping the signature."""

    def __call__(self, fn: F, /) -> F: ...


def is_async_callable(fn: object) -> bool:
    """Whether ``fn`` declares that calling it gives an awaitable: a coroutine function, a
    ``functools.partial`` of one, or an object whose ``__call__`` is one (as Starlette decides).
    A class is never one: calling it makes an instance, whatever its ``__call__``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or (
        callable(fn) and inspect.iscoroutinefunction(type(fn).__call__)
    )


# An operation's code may work on a session that outlives an attempt (a ``scoped_session``,
# Flask-SQLAlchemy's ``db.session``, a FastAPI dependency's): a unit's replay gets a new
# session, an operation's meets that one again, its transaction left aborted by the failure.
# Before a replay, the sessions whose transaction the failed attempt made (its record's
# ``created``) are rolled back, which is what a new session would be. A session whose transaction
# began before the operation holds the caller's work too, which the failure aborted and a
# replay of the operation can't bring back: left as it is, and the replay that meets it raises
# the original error (as the operation would have without the wrapper), not its own.
_BEGUN_BEFORE = (
    "a session it uses is in a transaction begun before the operation, which the failed "
    "attempt aborted (roll that session back first, or let the operation open its own)"
)


def _begun_sessions(record: AttemptRecord) -> list[Session]:
    """The sessions still in a transaction that the attempt of ``record`` made (not one it
    only gave a connection: see ``AttemptRecord.created_transaction``)."""
    found: list[Session] = []
    for transaction in record.created or ():
        session = transaction.session
        if session.get_transaction() is transaction and session not in found:
            found.append(session)
    return found


def _aborted_before(exc: BaseException) -> bool:
    """Whether ``exc`` is a session's transaction found aborted by an earlier failure."""
    return isinstance(exc, sa_exc.PendingRollbackError) or sqlstate_of(exc) == "25P02"


class _Attempts:
    """The attempts of one operation, each calling ``fn`` in an :class:`AttemptRecord` (a
    COMMIT its code sends that commits, or may have, makes its failure final) after rolling
    back what the one before began (see above). ``record`` and ``failure``: a first attempt
    made already (inline, by the caller), and how it failed. ``effects``: what a decorated
    route's request-scoped arguments held when the operation began, put back before a replay
    (see :class:`_RequestEffects`)."""

    __slots__ = ("effects", "failure", "fn", "policy", "record")

    def __init__(
        self,
        policy: Policy,
        fn: Callable[[], Any],
        record: AttemptRecord | None = None,
        failure: BaseException | None = None,
        effects: _RequestEffects | None = None,
    ) -> None:
        self.policy, self.fn, self.record, self.failure = policy, fn, record, failure
        self.effects = effects

    def _next(self) -> AttemptRecord:
        self.record = AttemptRecord(self.policy)
        return self.record

    def _failed(self, exc: BaseException) -> BaseException | None:
        """What to raise instead of ``exc``: the failure before it, when ``exc`` only says
        that failure left a transaction the operation did not begin aborted."""
        earlier = self.failure
        if earlier is not None and _aborted_before(exc):
            self.policy.not_replayable(earlier, _BEGUN_BEFORE)
            return earlier
        self.failure = exc
        return None

    def _restore(self) -> None:
        """Before a replay, once the sessions are rolled back: put back the changes of objects
        the failed attempt attached (see ``AttemptRecord.restore_attached``); where that can't
        be done, raise the failure instead (its replay would report success without them)."""
        record, failure = self.record, self.failure
        if (
            record is not None
            and record.attached is not None
            and failure is not None
            and not restore_attached(self.policy, record, failure)
        ):
            raise failure
        if self.effects is not None:
            self.effects.restore()

    def __call__(self) -> Any:
        if self.record is not None:
            for session in _begun_sessions(self.record):
                _quietly(session.rollback)
            self._restore()
        record = self._next()
        try:
            with record:
                return self.fn()
        except BaseException as exc:
            lost = lost_with_its_connection(record, exc)
            instead = self._failed(exc if lost is None else lost)
            if instead is None:
                if lost is not None:
                    raise lost  # noqa: B904 (its own cause kept; exc is its context)
                raise
        raise instead

    async def acall(self) -> Any:
        if self.record is not None:
            for session in _begun_sessions(self.record):
                proxy = async_session(session)
                if proxy is not None:
                    await _aquietly(proxy.rollback)
            self._restore()
        record = self._next()
        try:
            with record:
                return await self.fn()
        except BaseException as exc:
            lost = lost_with_its_connection(record, exc)
            instead = self._failed(exc if lost is None else lost)
            if instead is None:
                if lost is not None:
                    raise lost  # noqa: B904 (its own cause kept; exc is its context)
                raise
        raise instead


def _told_of_success(
    policy: Policy, record: AttemptRecord | None, interruption: BaseException, fn: Any
) -> None:
    """``interruption`` ended an operation: when it arrived as the circuit breaker was told of
    the operation's success (Redis, or a storage of yours: marked so by ``Policy.succeeded``)
    after its attempt (``record``) saved a change (a COMMIT of its code, a unit run inside it,
    a statement in autocommit), it is said and marked as an interruption after a unit's COMMIT
    is: its caller, a web handler say, would otherwise answer a plain error, and a client
    resubmit, writing the change twice. Not one from a unit inside the operation (said by that
    unit) or one that went through the operation's code after a COMMIT of its own (partly
    committed: it may have had more to do)."""
    if (
        record is not None
        and (record.committed or record.autocommitting is not None)
        and success_interrupted(interruption)
        and not partly_committed(interruption)
        and saved_then_interrupted(interruption) is None
    ):
        name = getattr(fn, "__qualname__", None) or repr(fn)
        interrupted_after_commit(
            policy.config,
            policy.service,
            interruption,
            f"the operation ({name}), as its circuit breaker was told of its success",
        )


def _quietly(rollback: Callable[[], None]) -> None:
    try:
        rollback()
    except Exception:  # a broken connection: the replay meets it, and says so
        debug_failure(log_retry, "rollback before a replay failed")


async def _aquietly(rollback: Callable[[], Awaitable[None]]) -> None:
    try:
        await rollback()
    except Exception:
        debug_failure(log_retry, "rollback before a replay failed")


def _cached_policy(
    service: str, use_retry: bool, use_circuit_breaker: bool, config: Config, explicit: bool
) -> Policy:
    """The policy of an operation with these settings, made at its first call (and made
    again after ``reset_state()``). An operation called with self-healing off runs plainly,
    but takes its policy all the same: one made off asks no breaker and has no budget, and
    lists its service in ``health()``, as a factory made off does. One made for the
    environment's configuration takes a reload that switches its breaker off or on again, or
    keeps its Redis, as a factory does (see ``_config._reload``): off, its breaker says
    ``off``; on again, it starts over; its breaker and budget have the reload's numbers."""
    defaulted = service is DEFAULT_SERVICE  # (no service= given: see _services)
    key = (service, use_retry, use_circuit_breaker, config, explicit, defaulted)
    policies = STATE.wrapper_policies
    policy: Policy | None = policies.get(key)
    if policy is None:
        made = Policy(
            str(service),
            config,
            use_retry=use_retry,
            use_circuit_breaker=use_circuit_breaker,
            explicit_config=explicit,
        )
        made.service_defaulted = defaulted
        # under the lock: a reload_config() goes through them under it (it failed half-way,
        # "dictionary changed size during iteration", when an operation added one meanwhile)
        with STATE.lock:
            if len(policies) > 256:  # configurations come and go with reload_config
                policies.clear()
            policy = policies.setdefault(key, made)  # (one made meanwhile by another thread)
    return policy


def _policy_for(
    service: str, use_retry: bool, use_circuit_breaker: bool, config: Config, explicit: bool
) -> Policy:
    # Inside a unit of work or an operation that replays its attempts (see runs_once_here) the
    # operation runs once: the enclosing one retries. Its service's breaker still admits it and
    # counts its failures (another service's breaker protects that service; the enclosing
    # attempt of the same service, already running when it failed, is not counted again).
    once = runs_once_here()
    policy = _cached_policy(service, use_retry and not once, use_circuit_breaker, config, explicit)
    if admitted_by(policy.breaker):
        # inside an operation or a unit of the same service, its breaker already let the
        # attempt through and counts its outcome: not asked again (see admitted_by); run
        # once there, its attempt is that one's, counted once (as a unit run there is)
        return policy.part_of_attempt() if once else policy.without_breaker()
    if policy.breaker is None:
        # no breaker of its own (use_circuit_breaker=False): an attempt of its service running
        # here (by its name, see part_of_running) is the one counted, and the breaker that let
        # it through, if any, still lets through what runs inside it (a unit of the service,
        # asked again, would be refused while that attempt holds the half-open probe's slot)
        enclosing = part_of_running(policy)
        if enclosing is not None:
            if once:
                return policy.part_of_attempt(admitted_through=enclosing.breaker)
            return policy.without_breaker(admitted_through=enclosing.breaker)
    return policy


@overload
def with_self_healing(
    fn: None = None,
    *,
    service: str = ...,
    use_retry: bool = ...,
    use_circuit_breaker: bool = ...,
    config: Config | None = ...,
    validate: ResponseValidator | None = ...,
) -> SelfHealingDecorator: ...
@overload
def with_self_healing(
    fn: Callable[[], Awaitable[R]],
    *,
    service: str = ...,
    use_retry: bool = ...,
    use_circuit_breaker: bool = ...,
    config: Config | None = ...,
    validate: ResponseValidator | None = ...,
) -> Awaitable[R]: ...
@overload
def with_self_healing(
    fn: Callable[[], R],
    *,
    service: str = ...,
    use_retry: bool = ...,
    use_circuit_breaker: bool = ...,
    config: Config | None = ...,
    validate: ResponseValidator | None = ...,
) -> R: ...
def with_self_healing(
    fn: Callable[[], Any] | None = None,
    *,
    service: str = DEFAULT_SERVICE,
    use_retry: bool = True,
    use_circuit_breaker: bool = True,
    config: Config | None = None,
    validate: ResponseValidator | None = None,
) -> Any:
    """Call ``fn()`` with retry and the circuit breaker of ``service``, as the plan's wrapper;
    without ``fn``, return a decorator doing the same for every call of the decorated function.

    ``fn`` (or each call of the decorated function) must be safe to call again: it is the whole
    operation, e.g. it opens its own session. For an async callable (a coroutine function, an
    object with an async ``__call__``, or any callable returning an awaitable, such as
    ``lambda: repo.get(1)``) the result is an awaitable, and each attempt awaits what ``fn``
    returned (the decorated function stays a coroutine function, so frameworks such as FastAPI
    still see an async route handler with its parameters). With self-healing off, ``fn()`` runs
    plainly. The decorator needs its parentheses: ``@with_self_healing()`` or
    ``@with_self_healing(service="orders")`` (without them, a function that takes arguments is
    refused with ``TypeError`` when decorated; one that takes none would be called there).

    ``validate`` (a Pydantic model class, a type such as ``list[Model]``, a ``TypeAdapter`` or a
    callable) checks the result once the operation succeeded; an invalid one raises
    :class:`~resilient_db.ResponseValidationError` and is not retried (an iterator result is
    refused with ``TypeError``: checking would consume it). ``config`` (default: the
    environment's, read at the process's first ``with_self_healing`` call without ``config=``
    and again by :func:`reload_config`) governs it too; a
    ``validate`` that can't check a result raises ``TypeError`` either way.

    Inside a unit of work, or inside an operation that replays its attempts, the operation
    runs once, with no retries or breaker of its own: the enclosing one retries. A generator
    function is refused (its body would run after the operation returned).
    """
    _check_arguments(service, config, use_retry=use_retry, use_circuit_breaker=use_circuit_breaker)
    check = ResponseCheck(validate) if validate is not None else None
    if fn is None:
        return _decorator(service, use_retry, use_circuit_breaker, config, check)
    if not callable(fn):
        raise TypeError(f"with_self_healing needs a callable, got {type(fn).__name__}")
    _refuse_generator(fn)
    _refuse_needing_arguments(fn)
    cfg = config if config is not None else env_config()
    if not cfg.enabled:
        _cached_policy(service, use_retry, use_circuit_breaker, cfg, config is not None)
        return fn()
    policy = _policy_for(service, use_retry, use_circuit_breaker, cfg, config is not None)
    if check is not None and not validation_on(cfg):
        check = None
    effects = _RequestEffects.of_call((), (), {})  # (in a Flask request: see _RequestEffects)
    if is_async_callable(fn):
        if check is None and not policy.accounts_with_io:
            return policy.acall(_Attempts(policy, fn, effects=effects).acall)
        return _acall_checked(policy, fn, check, cfg, effects)
    return _call(policy, fn, check, cfg, effects=effects)


async def _acall_checked(
    policy: Policy,
    fn: Callable[[], Awaitable[R]],
    check: ResponseCheck | None,
    cfg: Config,
    effects: _RequestEffects | None,
) -> R:
    """An async operation whose result is checked (``check``), or whose breaker's accounting
    of its success may do I/O (see :func:`_told_of_success`)."""
    attempts = _Attempts(policy, fn, effects=effects)
    try:
        result: R = await policy.acall(attempts.acall)
    except BaseException as exc:
        _told_of_success(policy, attempts.record, exc, fn)
        raise
    if check is None:
        return result
    checked: R = _checked(policy, check, result, cfg, attempts.record)
    return checked


def _checked(
    policy: Policy,
    check: ResponseCheck,
    result: Any,
    cfg: Config,
    record: AttemptRecord | None,
) -> Any:
    """:func:`check_response` of an operation's result, once the operation succeeded. The
    attempt that succeeded (``record``) may have committed work of its own (drop-in
    ``Session.begin()`` blocks, a unit run inside it): an invalid result is then the error of
    an operation that committed part of its work (partly committed, as a unit's invalid result
    after its own ``session.commit()`` is), not a failure that saved nothing; so is a result
    the check refuses (``TypeError``: an iterator in it)."""
    try:
        return check_response(check, result, cfg, policy.service)
    except Exception as exc:  # an invalid result, or one the check refuses (an iterator in it)
        if record is not None and record.unreplayable:
            policy.partly_committed(exc)
        raise


def _check_arguments(service: object, config: object, **flags: object) -> None:
    check_service_name(service, "with_self_healing")
    if config is not None and not isinstance(config, Config):
        raise TypeError(
            f"with_self_healing's config= takes a resilient_db.Config, got {type(config).__name__}"
        )
    for name, value in flags.items():
        # any object is truthy or falsy, and a non-empty str is truthy: use_retry="false"
        # would retry an operation its caller said is not safe to replay
        if not isinstance(value, bool):
            raise TypeError(
                f"with_self_healing's {name}= takes a bool (True or False), got "
                f"{type(value).__name__} {value!r}"
            )


def _refuse_generator(fn: object) -> None:
    """A generator function's body runs only when its result is iterated: after the operation
    has returned, outside its retries and its circuit breaker. An object whose ``__call__`` is
    one is refused too (as :func:`is_async_callable` looks there; a class never is one)."""
    call = type(fn).__call__ if not isinstance(fn, type) else None
    if any(inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f) for f in (fn, call)):
        raise TypeError(
            f"with_self_healing can't retry {getattr(fn, '__qualname__', fn)!r}: it is a "
            "generator function, whose body runs only when its result is iterated, after the "
            "operation returned; return a list instead, or decorate the code that iterates it"
        )


def _refuse_needing_arguments(fn: object) -> None:
    """The call form calls ``fn()`` now. A function that can't be called without arguments is
    most likely decorated without the parentheses (``@with_self_healing``), which would call
    it at import: say so, before anything runs. Only Python functions and bound methods are
    looked at (their code tells, at the cost of a few attribute reads); anything else is
    called, and fails as it would."""
    bound = 0
    if isinstance(fn, types.MethodType):
        fn, bound = fn.__func__, 1
    if not isinstance(fn, types.FunctionType):
        return
    code = fn.__code__
    positional = code.co_argcount - bound - len(fn.__defaults__ or ())
    keyword = code.co_kwonlyargcount - len(fn.__kwdefaults__ or {})
    if positional > 0 or keyword > 0:
        name = fn.__qualname__
        raise TypeError(
            f"with_self_healing({name}) calls {name}() now, and it needs arguments: to "
            "decorate a function, write @with_self_healing() (with its parentheses) or "
            f"@with_self_healing(service=...); to run it once, pass "
            f"with_self_healing(lambda: {name}(...))"
        )


def _call(
    policy: Policy,
    fn: Callable[[], Any],
    check: ResponseCheck | None,
    cfg: Config,
    named: Any = None,
    *,
    effects: _RequestEffects | None = None,
) -> Any:
    """One operation of a callable not declared async: :meth:`Policy.call` with its first
    attempt inline, so that a result found to be awaitable is finished by :func:`_afinish`
    as the first attempt of the async loop instead of being counted a success. ``named``: the
    function the lines name, where ``fn`` calls it (the decorator's, with its arguments);
    ``effects``: its request-scoped arguments' state, put back before a replay."""
    probe = policy.admit()
    started = time.monotonic()
    record = AttemptRecord(policy)
    try:
        with record:
            result = fn()
    except BaseException as failure:
        exc = lost_with_its_connection(record, failure) or failure
        attempts = _Attempts(policy, fn, record, exc, effects)
        try:
            result = policy.call_failed(attempts, exc, probe, started)
        except BaseException as error:
            _told_of_success(policy, attempts.record, error, fn if named is None else named)
            raise
        record = attempts.record or record
    else:
        if inspect.isawaitable(result):
            admission: _Admission | None = None
            if isinstance(result, asyncio.Future):
                # a task (or future) runs whether the operation is awaited or not: admitted
                # now; if the operation never starts (dropped, or cancelled before its first
                # step by a caller whose deadline was spent), the slot of a half-open probe is
                # given back when the task ends, or it would be held for good
                admission = _Admission(policy, probe)
                result.add_done_callback(admission.give_back_unless_taken)
            else:
                # its work runs when it is awaited, which may be never: a half-open probe's
                # slot is given back now and asked for again then
                policy.unused(probe)
            return _afinish(
                policy,
                fn,
                result,
                admission=admission,
                record=record,
                check=check,
                cfg=cfg,
                named=named,
                effects=effects,
            )
        try:
            policy.succeeded(probe)
        except BaseException as interruption:  # (in its I/O: see _told_of_success)
            _told_of_success(policy, record, interruption, fn if named is None else named)
            raise
    return result if check is None else _checked(policy, check, result, cfg, record)


class _Admission:
    """The breaker's admission of a task an operation returned (see :func:`_call`): taken by
    the operation when it starts, or given back when the task ends first."""

    __slots__ = ("policy", "probe", "taken")

    def __init__(self, policy: Policy, probe: bool) -> None:
        self.policy, self.probe, self.taken = policy, probe, False

    def take(self) -> bool:
        """The operation started: whether its admission is a half-open probe's (False when
        the slot was given back already: the task ended before)."""
        probe = self.probe and not self.taken
        self.taken = True
        return probe

    def give_back_unless_taken(self, _task: object) -> None:
        if not self.taken:
            self.taken = True
            self.policy.unused(self.probe)


async def _afinish(
    policy: Policy,
    fn: Callable[[], Awaitable[Any]],
    first: Awaitable[Any],
    *,
    admission: _Admission | None,
    record: AttemptRecord,
    check: ResponseCheck | None,
    cfg: Config,
    named: Any = None,
    effects: _RequestEffects | None = None,
) -> Any:
    """The first attempt of :func:`_call` returned ``first``: awaiting it finishes that attempt
    (in the same ``record``, so a COMMIT sent before ``fn`` returned still forbids a replay),
    admitted by the breaker now that it runs (or, a task's, when the operation was called:
    ``admission``), and a failure goes on as :meth:`Policy.acall` would: each retry calls
    ``fn`` again."""
    if admission is not None:
        probe = admission.take()
    else:
        try:
            admitted = policy.admit_on_loop()
            # (None: it asks Redis, off the event loop)
            probe = await policy.aadmit() if admitted is None else admitted
        except BaseException:
            if inspect.iscoroutine(first):
                first.close()  # never to run: not "never awaited"
            raise
    started = time.monotonic()
    try:
        with record:
            result = await first
    except BaseException as failure:
        exc = lost_with_its_connection(record, failure) or failure
        attempts = _Attempts(policy, fn, record, exc, effects)
        try:
            result = await policy.acall_failed(attempts.acall, exc, probe, started)
        except BaseException as error:
            _told_of_success(policy, attempts.record, error, fn if named is None else named)
            raise
        record = attempts.record or record
    else:
        try:
            if not policy.succeeded_on_loop(probe):
                await policy.asucceeded(probe)  # (it tells Redis: off the event loop)
        except BaseException as interruption:  # (in its I/O: see _told_of_success)
            _told_of_success(policy, record, interruption, fn if named is None else named)
            raise
    return result if check is None else _checked(policy, check, result, cfg, record)


def _read_signature(fn: Any) -> inspect.Signature | None:
    """``fn``'s signature, its annotations read where ``fn`` was written (see
    :func:`_signed`); None when an annotation can't be read yet (a name defined after the
    function) or there is no signature to read."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # (NameError: a forward reference; ValueError: no signature to read)
        return None


def _signed(wrapper: F, signature: inspect.Signature | None) -> F:
    """``wrapper`` (made with ``functools.wraps(fn)``) with ``fn``'s ``signature``, its
    annotations read where ``fn`` was written (:func:`_read_signature`). A module with ``from
    __future__ import annotations`` has strings there, which FastAPI (0.115, the lowest
    supported) evaluates in the ``__globals__`` of the function it is given: the wrapper's are
    this module's, and a route's parameter types (its Pydantic body, ``Annotated[...,
    Depends(...)]``) were not found there (``PydanticUndefinedAnnotation`` as the route was
    declared). An annotation that can't be read yet (``signature`` None) leaves the signature
    to be read as it was."""
    if signature is not None:
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper


#: Starlette's classes of the request-scoped objects FastAPI gives a route by its parameters'
#: annotations, which outlive an attempt of a decorated route: the ``BackgroundTasks`` run
#: after the response, and the ``Response`` whose headers, cookies and status code are copied
#: into the answer (a ``response: Response`` parameter). Looked up where the route's module
#: imported them (``sys.modules``), never imported here.
_REQUEST_SCOPED = (("starlette.background", "BackgroundTasks"), ("starlette.responses", "Response"))


def _request_scoped_parameters(
    signature: inspect.Signature | None,
) -> tuple[tuple[int, str], ...]:
    """The parameters of a decorated function annotated with one of :data:`_REQUEST_SCOPED`
    (``Annotated[...]`` of one included), each as its position (-1: keyword-only) and name."""
    if signature is None:
        return ()
    classes = tuple(
        cls
        for cls in (
            getattr(sys.modules.get(module), name, None) for module, name in _REQUEST_SCOPED
        )
        if isinstance(cls, type)
    )
    if not classes:
        return ()
    found: list[tuple[int, str]] = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for position, parameter in enumerate(signature.parameters.values()):
        annotation = parameter.annotation
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        if isinstance(annotation, type) and issubclass(annotation, classes):
            found.append((position if parameter.kind in positional else -1, parameter.name))
    return tuple(found)


class _RequestEffects:
    """What the request-scoped arguments of a call of a decorated route (see
    :data:`_REQUEST_SCOPED`) held when its operation began: before a replay, a failed
    attempt's background tasks (an e-mail to send after the response), headers, cookies and
    status code are taken back, so that the answer carries the successful attempt's alone (and
    what a dependency put there before the route ran). So are, in a Flask request, the
    callbacks a failed attempt gave ``flask.after_this_request`` (``after_request``: Flask's
    list of them and how many it held when the operation began)."""

    __slots__ = ("after_request", "responses", "tasks")

    def __init__(self, values: list[Any], after_request: list[Any] | None = None) -> None:
        self.after_request = None if after_request is None else (after_request, len(after_request))
        self.tasks: list[tuple[Any, list[Any]]] = []
        self.responses: list[tuple[Any, list[Any], Any]] = []
        for value in values:
            tasks = getattr(value, "tasks", None)
            if isinstance(tasks, list):  # BackgroundTasks
                self.tasks.append((value, list(tasks)))
            headers = getattr(value, "raw_headers", None)
            if isinstance(headers, list):  # Response
                self.responses.append((value, list(headers), getattr(value, "status_code", None)))

    @classmethod
    def of_call(
        cls,
        parameters: tuple[tuple[int, str], ...],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> _RequestEffects | None:
        """The state of the arguments given for ``parameters`` and of the current Flask
        request's ``after_this_request`` callbacks (None: there are none of either)."""
        after_request = flask_after_request_functions()
        values = [
            kwargs[name] if name in kwargs else args[position]
            for position, name in parameters
            if name in kwargs or 0 <= position < len(args)
        ]
        return cls(values, after_request) if values or after_request is not None else None

    def restore(self) -> None:
        if self.after_request is not None:
            functions, count = self.after_request
            del functions[count:]
        for tasks, held in self.tasks:
            tasks.tasks[:] = held
        for response, headers, status in self.responses:
            response.raw_headers[:] = headers  # (in place: its MutableHeaders share the list)
            response.status_code = status


def _decorator(
    service: str,
    use_retry: bool,
    use_circuit_breaker: bool,
    config: Config | None,
    check: ResponseCheck | None,
) -> SelfHealingDecorator:

    explicit = config is not None

    def decorate(fn: Any, /) -> Any:
        if isinstance(fn, (staticmethod, classmethod)):
            # written above @staticmethod or @classmethod: the function it holds is decorated,
            # and the class gets the same kind of method again (a plain wrapper there is bound
            # as an instance method: a static method got the instance as its first argument,
            # an async one was no longer a coroutine function, a generator was not refused)
            return type(fn)(decorate(fn.__func__))
        if not callable(fn):
            raise TypeError(f"@with_self_healing(...) decorates a callable, got {fn!r}")
        _refuse_generator(fn)
        signature = _read_signature(fn)
        scoped = _request_scoped_parameters(signature)
        if is_async_callable(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                cfg = config if config is not None else env_config()
                if not cfg.enabled:
                    _cached_policy(service, use_retry, use_circuit_breaker, cfg, explicit)
                    return await fn(*args, **kwargs)
                policy = _policy_for(service, use_retry, use_circuit_breaker, cfg, explicit)
                effects = _RequestEffects.of_call(scoped, args, kwargs)
                attempts = _Attempts(policy, lambda: fn(*args, **kwargs), effects=effects)
                try:
                    result = await policy.acall(attempts.acall)
                except BaseException as exc:  # (see _told_of_success)
                    _told_of_success(policy, attempts.record, exc, fn)
                    raise
                if check is None or not validation_on(cfg):
                    return result
                return _checked(policy, check, result, cfg, attempts.record)

            return _signed(awrapper, signature)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cfg = config if config is not None else env_config()
            if not cfg.enabled:
                _cached_policy(service, use_retry, use_circuit_breaker, cfg, explicit)
                return fn(*args, **kwargs)
            policy = _policy_for(service, use_retry, use_circuit_breaker, cfg, explicit)
            active = check if check is not None and validation_on(cfg) else None
            effects = _RequestEffects.of_call(scoped, args, kwargs)
            return _call(policy, lambda: fn(*args, **kwargs), active, cfg, fn, effects=effects)

        return _signed(wrapper, signature)

    return decorate
