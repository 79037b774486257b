"""The decision engine: classification, breaker accounting, backoff and stop, on tenacity.

:class:`Policy` decides (no I/O): whether an outcome is retried, how long to wait, when to stop.
:meth:`Policy.call` and :meth:`Policy.acall` are the sync and async drivers: each runs the first
attempt directly (the fast path costs one breaker read and a counter) and hands a failed unit to
tenacity's ``Retrying`` / ``AsyncRetrying`` configured with the same decision callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import logging
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import tenacity as _t
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ._breaker import Breaker, _probe_here, breaker_for, storage_refused
from ._budget import RetryBudget, Withdrawal, budget_for
from ._classify import (
    DEFAULT_CLASSIFIER,
    Classifier,
    Outcome,
    connect_timed_out,
    debug_failure,
    hosts_failed_of,
    hot_standby_hint,
    hot_standby_of,
    interrupted_commit,
    mark_breaker_open,
    mark_not_replayed,
    mark_outcome,
    mark_partly_committed,
    mark_success_interrupted,
    never_replayed,
    refused_unsure,
    say_unknown_once,
)
from ._config import Config
from ._errors import CircuitOpenError
from ._observability import (
    LineLimit,
    emit,
    emit_line,
    log_retry,
    more_since,
    retries_text,
    sqlstate_label,
    stats_for,
)
from ._state import STATE, renew_after_fork
from ._statements import refused_unsure_before, running_here

__all__ = ["Policy", "set_testing"]

T = TypeVar("T")

_RETRYABLE = frozenset({Outcome.CONFLICT, Outcome.UNAVAILABLE, Outcome.DISCONNECT})
# Conflicts prove the server is up and answering: they are not breaker failures.
_BREAKER_FAILURES = frozenset({Outcome.UNAVAILABLE, Outcome.DISCONNECT, Outcome.COMMIT_UNKNOWN})
# Conflict backoff is capped low: the competing transaction is usually done within tens of ms.
_CONFLICT_CAP_FACTOR = 8
#: how far past the deadline a backoff may end and still be taken for ending at it: the sum of
#: the backoffs, and the clock's readings, are floats (0.1 + 0.2 > 0.3)
_DEADLINE_SLACK = 1e-9


def past_deadline(elapsed: float, deadline: float) -> bool:
    """Whether a wait that ends ``elapsed`` seconds after the first failure ends past
    ``deadline``: one that ends at it, up to float rounding, does not."""
    return elapsed > deadline + _DEADLINE_SLACK


_testing = threading.Event()


@contextlib.contextmanager
def _restore_testing(previous: bool) -> Iterator[None]:
    try:
        yield
    finally:
        set_testing(previous)


def set_testing(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Zero every backoff delay (for test suites). Returns a context manager that restores the
    previous setting, so ``with set_testing(): ...`` works as well as a plain call. ``on`` is a
    bool: anything else (``"no"`` is truthy) is refused with ``TypeError``."""
    if not isinstance(on, bool):
        raise TypeError(
            f"set_testing() takes a bool (True or False), got {type(on).__name__} {on!r}"
        )
    previous = _testing.is_set()
    if on:
        _testing.set()
    else:
        _testing.clear()
    return _restore_testing(previous)


# when an attempt began, for the breaker's one-failure-per-outage-wave rule (real time, whatever
# clock a Policy is given for its deadline: it orders attempts against failures)
_monotonic = time.monotonic


def _failure_cause(exc: BaseException) -> str | None:
    """What a transient failure was, where it says more than its class (for the give-up's and
    the breaker's messages): a write refused by a hot standby; a connect to a multi-host URL
    that could use none of its hosts (each named, with how it failed). Failure path only."""
    server = hot_standby_of(exc)
    return hosts_failed_of(exc) if server is None else hot_standby_hint(server)


def add_note_once(exc: BaseException, note: str) -> None:
    """Add ``note`` to the traceback of ``exc`` (re-raised as it is: its type and message stay
    the driver's), once; Python 3.11+ (``add_note``), nothing before."""
    add_note = getattr(exc, "add_note", None)
    if callable(add_note) and note not in (getattr(exc, "__notes__", None) or ()):
        with contextlib.suppress(Exception):
            add_note(note)


#: the lines of a machinery failure (``Policy._machinery_failed``), per service: one at most
#: every 10 s
_MACHINERY_LINES = LineLimit()
renew_after_fork(globals(), "_MACHINERY_LINES", LineLimit)
#: the lines of a pool timeout (``Policy._pool_timed_out``), per service: one at most every
#: 10 s (an overloaded process times out on its pool for every unit waiting, many a second)
_POOL_LINES = LineLimit()
#: set on a pool timeout once a policy counted it (see Policy._pool_timed_out)
_POOL_TIMEOUT_COUNTED = "resilient_db_pool_timeout_counted"
renew_after_fork(globals(), "_POOL_LINES", LineLimit)
_RETRY_LINE = "Retry attempt %d/%d: service=%s %s (SQLSTATE %s); next attempt in %.3f s"


class _Retry(NamedTuple):
    """A retry decided (its backoff about to be slept), not yet started."""

    outcome: Outcome
    sqlstate: str
    attempt: int
    delay: float


#: what a retry budget paid for the retry decided last, until its attempt starts
_Paid = list[tuple[RetryBudget, Withdrawal]]


async def in_worker(fn: Callable[..., T], *args: Any, finish: bool = False) -> T:
    """``fn(*args)`` in a worker thread, in a copy of this context (as :func:`asyncio.to_thread`),
    for what an async unit asks a shared breaker or budget (Redis, off the event loop).

    The half-open probe ``fn`` let through, or ended, is noted in this context as it would be
    inline: a probe's end finds its own reservation in the context it was let through in (see
    ``Breaker._take_probe``); noted only in the thread's copy, the end took the oldest held, and
    a probe ending while an older one ran reported under the older's reservation (its own slot
    stayed taken). Shielded: the caller cancelled meanwhile, ``fn`` still runs (a queued call
    cancelled would never run: a probe's end, a failure, lost), and a probe it lets through
    for the caller, who will never run it, is given back. ``finish``: the cancel is raised
    once ``fn`` has ended (at most the Redis timeout), for what the caller then undoes (a
    retry the budget paid for in the thread, given back by the caller)."""
    context = contextvars.copy_context()
    before = context.get(_probe_here)
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(None, functools.partial(context.run, fn, *args))
    try:
        result = await asyncio.shield(work)
    except asyncio.CancelledError:
        if finish:
            await asyncio.wait([work])
        else:
            work.add_done_callback(functools.partial(_abandoned, context, before))
        raise
    note = context.get(_probe_here)
    if note is not before:
        _probe_here.set(note)
    return result


def _abandoned(context: contextvars.Context, before: Any, work: asyncio.Future[Any]) -> None:
    """:func:`in_worker`'s caller was cancelled before ``work`` ended: a probe it let through
    (noted in ``context``, the thread's) is given back, in a worker thread too."""
    if work.cancelled() or work.exception() is not None:
        return
    note = context.get(_probe_here)
    if note is None or note is before:
        return
    breaker = note[0]

    def give_back() -> None:
        context.run(_give_back, breaker)

    try:
        asyncio.get_running_loop().run_in_executor(None, give_back)
    except RuntimeError:  # (the loop closing: no thread to be had)
        give_back()


def _give_back(breaker: Breaker) -> None:
    try:
        breaker.on_neutral(True)
    except Exception:  # graceful fallback, as Policy.unused
        debug_failure(log_retry, "giving back an abandoned probe's slot failed")


class Policy:
    """Retry and breaker decisions for one service under one configuration.

    ``sleep``/``asleep`` and ``clock`` (monotonic seconds, for the deadline) are injectable, as is
    ``wall_clock`` (the breaker's clock: how long an opening lasts and its ``opened_at``
    stamp; by default a monotonic timer and the time of day); ``rng`` returns a float in
    [0, 1) for the jitter.
    """

    #: how a factory settles its units' own COMMITs midway (``session.commit()`` inside the
    #: unit): ``(is_async, weakref.WeakMethod)`` of its ``_settle_own_commit``, set once by the
    #: factory; None for an operation's policy (``with_self_healing``), whose code's COMMITs
    #: go out plain (see ``_commit._own_plan``)
    own_commits: Any = None
    #: whether its attempts say their own lines of a COMMIT of their code whose outcome is
    #: unknown (False: part of an enclosing attempt, which says them)
    says_its_lines = True
    #: an operation's policy (``with_self_healing``) left to the default service name: the
    #: databases its work begins transactions on are looked at (see ``_services``)
    service_defaulted = False

    def __init__(
        self,
        service: str,
        config: Config,
        *,
        classifier: Classifier | None = None,
        breaker_storage: Any = None,
        breaker_listeners: tuple[Any, ...] = (),
        sleep: Callable[[float], None] = time.sleep,
        asleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] | None = None,
        rng: Callable[[], float] = random.random,
        use_retry: bool = True,
        use_circuit_breaker: bool = True,
        explicit_config: bool = True,
    ) -> None:
        self.service = service
        # config is a config= of the code (else the environment's): see Breaker.follow
        self.explicit_config = explicit_config
        self.classifier = classifier or DEFAULT_CLASSIFIER
        self.sleep = sleep
        self.asleep = asleep
        self.clock = clock
        self.rng = rng
        self.use_retry = use_retry
        self.use_circuit_breaker = use_circuit_breaker
        self._generation = STATE.generation
        self.stats = stats_for(service)
        self._breaker_storage = breaker_storage
        self._breaker_listeners = breaker_listeners
        self._wall_clock = wall_clock
        self.config = config
        self.breaker: Breaker | None = None
        self._own_breaker: Breaker | None = None  # kept while the breaker is switched off
        self.budget: RetryBudget | None = None
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        self.config = config
        self.retry_on = self.use_retry and config.retry_on
        self.budget = (
            budget_for(self.service, config, user=self, explicit=self.explicit_config)
            if self.retry_on
            else None
        )
        own = self._own_breaker
        self.accounts_with_io = False
        if not (self.use_circuit_breaker and config.breaker_on):
            # switched off; its breaker is kept for when it is back on (where it starts over
            # unless another user kept it on: see Breaker.switch_on)
            self.breaker = None
            if own is not None:
                own.switch_off(self)
            return
        if own is None:
            own = self._own_breaker = breaker_for(
                self.service,
                config,
                storage=self._breaker_storage,
                listeners=self._breaker_listeners,
                clock=self._wall_clock,
                user=self,
                explicit=self.explicit_config,
            )
        else:
            # a reload: the same breaker, new numbers (looking it up again could meet another
            # factory's breaker, made after reset_state() forgot this one)
            own.follow(config, user=self, explicit=self.explicit_config)
        # after follow(): a shared breaker is attached to the Redis it now asks for
        try:
            own.switch_on(self)
        except Exception:
            # a breaker_storage= of the user's that can't be read (a store down): switched on
            # all the same (its calls meet the storage as any call does), and a reload goes on
            # to the other factories rather than raise half-way
            self._machinery_failed(
                "circuit breaker switching on", "switched on without reading its state"
            )
        self.breaker = own
        self.accounts_with_io = own.accounts_with_io

    def breaker_refused(self, config: Config) -> str | None:
        """Why :meth:`apply_config` of ``config`` would be refused the service's breaker (made,
        while this policy had its breaker off, with another storage than this one's), or None:
        asked by a reload before it applies anything."""
        if self._own_breaker is not None or not (self.use_circuit_breaker and config.breaker_on):
            return None
        return storage_refused(self.service, self._breaker_storage)

    # -- decisions (no I/O) ------------------------------------------------------------------
    def retryable(self, outcome: Outcome) -> bool:
        return self.retry_on and outcome in _RETRYABLE

    def delay(self, outcome: Outcome, retry_number: int) -> float:
        """Full-jitter exponential backoff for the ``retry_number``-th retry (1-based) of
        ``outcome``'s kind: conflicts and outages count their own (see :meth:`_waiter`).
        ``SELF_HEALING_MAX_DELAY`` caps both."""
        if _testing.is_set():
            return 0.0
        cfg = self.config
        if outcome is Outcome.CONFLICT:
            base = cfg.conflict_delay
            cap = min(cfg.conflict_delay * _CONFLICT_CAP_FACTOR, cfg.max_delay)
        else:
            base, cap = cfg.initial_delay, cfg.max_delay
        ceiling = min(cap, base * (2.0 ** (retry_number - 1)))
        return ceiling * self.rng()

    def admit(self) -> bool:
        """Ask the breaker for one attempt. Returns True for a half-open probe. A closed
        breaker answers on its fast path: every unit passes here."""
        if self._generation != STATE.generation:  # (refresh(), inline: every unit passes)
            self._after_reset()
        breaker = self.breaker
        if breaker is None or breaker.fast_closed():
            return False
        try:
            return breaker.before_call()
        except CircuitOpenError:
            raise
        except Exception:  # graceful fallback: a broken breaker store must not stop the call
            self._machinery_failed("circuit breaker admission")
            return False

    #: How the sync driver (:meth:`call`, :meth:`call_once`) runs what may talk to Redis while
    #: the breaker or the budget is shared: ``offload(fn, *args, finish=...)`` returns
    #: ``fn(*args)`` (``finish``: see :func:`in_worker`). None: inline. An async factory's
    #: policy runs its drop-in connect retry in SQLAlchemy's greenlet, on the event loop's
    #: thread: it sets one that runs ``fn`` in a worker thread and awaits it through the
    #: greenlet, as the async driver does (see :meth:`_shares`).
    offload: Callable[..., Any] | None = None

    #: whether the breaker's accounting of an attempt's success may do I/O, which an
    #: interruption may cut off after the unit's COMMIT succeeded (see Breaker.accounts_with_io)
    accounts_with_io: bool = False

    #: the breaker that let through the attempt this policy's attempts are part of (a
    #: policy of :meth:`without_breaker`): what an attempt nested in them is admitted by
    admitted_through: Breaker | None = None

    def without_breaker(self, admitted_through: Breaker | None = None) -> Policy:
        """This policy asking no breaker: for attempts that are part of one its breaker (or
        ``admitted_through``) let through (see ``_unit.admitted_by``), whose outcome that
        one's counts. Their attempts still say which breaker admitted them
        (:attr:`admitted_through`), so that a call nested deeper is not asked again either."""
        clone = copy.copy(self)
        clone.admitted_through = admitted_through or self.breaker or self.admitted_through
        clone.breaker = None
        clone.accounts_with_io = False
        return clone

    def part_of_attempt(self, admitted_through: Breaker | None = None) -> Policy:
        """:meth:`without_breaker` for an operation that runs once inside an attempt of its
        own service that the breaker let through (a decorated helper called in a unit): that
        attempt is the one counted (``attempts``, its outcome), as a unit or a drop-in connect
        run there is; this one is not counted again. A pool timeout it meets is counted here,
        once (see :meth:`_pool_timed_out`), whether the enclosing attempt sees it or not."""
        clone = object.__new__(_PartOfAttempt)
        clone.__dict__.update(self.without_breaker(admitted_through).__dict__)
        return clone

    def _failed_in_enclosing(self, exc: BaseException) -> Outcome:
        """A try that is part of an enclosing attempt failed with ``exc``: the enclosing one
        counts it, for the breaker too; only a pool timeout is counted here (once)."""
        if isinstance(exc, PoolTimeoutError):
            self._pool_timed_out(exc)
        return self.classifier.classify(exc)

    def retries_in_attempt(self, admitted_through: Breaker | None) -> Policy:
        """:meth:`without_breaker` for a drop-in connect inside an attempt of its own service
        whose operation does not replay it (``use_retry=False``, retry switched off): the
        connect retries on its own, its first try part of that attempt (counted there, once:
        each try of it counted its own attempt too), each retry an attempt of its own."""
        clone = object.__new__(_RetriesInAttempt)
        clone.__dict__.update(self.without_breaker(admitted_through).__dict__)
        return clone

    def refresh(self) -> None:
        """Take the service's breaker, counters and budget again if ``reset_state()`` ran
        since this policy last did (see :meth:`_after_reset`)."""
        if self._generation != STATE.generation:
            self._after_reset()

    def unused(self, probe: bool) -> None:
        """An admission whose attempt will not run under it: a half-open probe's slot is
        given back (neither a success nor a failure)."""
        breaker = self.breaker
        if probe and breaker is not None:
            try:
                breaker.on_neutral(probe)
            except Exception:
                self._machinery_failed("circuit breaker accounting")

    def _after_reset(self) -> None:
        """``reset_state()`` forgot this policy's breaker, counters and budget (a test suite
        starting over): take the service's new ones, as a factory made now would, so that
        ``health()`` shows what this factory does. A breaker that a factory made since has
        given the service with another state storage can't be this one's (a service has one
        breaker, one storage): this policy then keeps its own, reset and unlisted."""
        self._generation = STATE.generation
        self.stats = stats_for(self.service)
        own, self._own_breaker = self._own_breaker, None
        try:
            self.apply_config(self.config)
        except ValueError:
            self._own_breaker = own
            self.apply_config(self.config)

    def succeeded(self, probe: bool) -> None:
        self.stats.add_attempt()
        breaker = self.breaker
        if breaker is not None and (probe or not breaker.fast_success()):
            try:
                breaker.on_success(probe)
            except Exception:
                self._machinery_failed("circuit breaker success accounting")
            except BaseException as interruption:  # (in its I/O: Redis, a storage of yours)
                mark_success_interrupted(interruption)
                raise

    def failed(self, exc: BaseException, probe: bool, started: float | None = None) -> Outcome:
        """Classify ``exc`` and record it with the breaker; returns its outcome. ``started`` is
        when the attempt began (``time.monotonic()``; see :meth:`Breaker.on_failure`)."""
        self.stats.add_attempt()
        outcome = self.classifier.classify(exc)
        if isinstance(exc, PoolTimeoutError):
            self._pool_timed_out(exc)
        breaker = self.breaker
        if breaker is not None:
            try:
                if outcome in _BREAKER_FAILURES:
                    # a connect that timed out always counts: the connects of units started
                    # together to a hung database fail together, one connect timeout later,
                    # each the database's answer, not one event seen again. A connect refused
                    # or rejected at once is the failover window's, as a failure in flight:
                    # units that began while a primary crashed and its standby was promoted
                    # reconnect in those few milliseconds and are refused (see
                    # Breaker.on_failure)
                    if connect_timed_out(exc):
                        started = None
                    breaker.on_failure(probe, started, _failure_cause(exc), error=exc)
                else:
                    breaker.on_neutral(probe)
            except Exception:
                self._machinery_failed("circuit breaker failure accounting")
        return outcome

    def partly_committed(self, exc: BaseException, how: str = "") -> None:
        """An attempt failed after its own code committed (or may have): it is not replayed,
        since a replay would write the committed part again; ``exc`` is raised as it is.
        ``how``: how it committed, when not by its own code."""
        mark_partly_committed(exc)
        if not how and (
            interrupted_commit(exc) or self.classifier.classify(exc) is Outcome.COMMIT_UNKNOWN
        ):
            # its own COMMIT is what failed (cut off in flight, or its answer lost): not
            # "committed", unknown (counted, and an interruption marked, by the engine's hooks),
            # as a unit's final COMMIT so interrupted is (see CommitReferee.interrupted)
            self._own_commit_unknown(exc, caught=False)
            return
        emit(
            self.config,
            log_retry,
            logging.WARNING,
            "Not replaying: service=%s the unit committed part of its work %s before it "
            "failed (%s); raising the error",
            self.service,
            how or "itself (a COMMIT of its own, or statements in autocommit)",
            type(exc).__name__,
            service=self.service,
            event="partly_committed",
        )

    def unknown_commit_caught(self, exc: BaseException) -> None:
        """A COMMIT of the attempt's own code (a drop-in block's, a ``session.commit()``) lost
        its answer (``exc``, the driver's error; or an interruption cut it off), and the code
        caught the error and went on: the attempt has ended (it returned, or failed with
        another error), and the outcome is unknown all the same. Counted by the engine's
        hooks when the answer was lost; said here, once, as :meth:`partly_committed` says one
        whose error leaves the attempt."""
        self._own_commit_unknown(exc, caught=True)

    def _own_commit_unknown(self, exc: BaseException, *, caught: bool) -> None:
        """Say that a COMMIT of the attempt's own code has an unknown outcome: ``exc``, the
        interruption that cut it off in flight or the driver's error of its lost answer, as
        the error the attempt fails with (not replayed), or ``caught`` by its code, which went
        on. An ERROR, as every unknown outcome's line is (alerts on errors must see it); said
        once (an operation of another service around this one fails with it too)."""
        if not say_unknown_once(exc):
            return
        if interrupted_commit(exc):
            emit(
                self.config,
                log_retry,
                logging.ERROR,
                "Commit interrupted: service=%s a COMMIT sent by the unit's own code: the code "
                "was interrupted (%s) with its COMMIT in flight and caught it; outcome unknown, "
                "not verified: check before doing the work again"
                if caught
                else "Commit interrupted: service=%s a COMMIT sent by the unit's own code: the "
                "unit was interrupted (%s) with its COMMIT in flight; outcome unknown, not "
                "verified, not replayed; raising the interruption",
                self.service,
                type(exc).__name__,
                service=self.service,
                event="commit_interrupted",
                outcome="unknown",
            )
        elif caught:
            emit(
                self.config,
                log_retry,
                logging.ERROR,
                "Commit outcome unknown: service=%s a COMMIT sent by the unit's own code lost "
                "its answer (%s), and the code caught the error and went on: it may have "
                "committed; not verified: check before doing the work again",
                self.service,
                type(exc).__name__,
                service=self.service,
                event="commit_unknown",
            )
        else:
            emit(
                self.config,
                log_retry,
                logging.ERROR,
                "Not replaying: service=%s a COMMIT sent by the unit's own code lost its answer "
                "(%s): it may have committed, the outcome is unknown; raising the error",
                self.service,
                type(exc).__name__,
                service=self.service,
                event="partly_committed",
                outcome=Outcome.COMMIT_UNKNOWN.value,
            )

    def failed_after_commit(self, exc: BaseException, wrote: bool) -> None:
        """A unit's COMMIT succeeded, and ``exc`` came after it: from an ``after_commit`` or
        ``after_transaction_end`` listener, or the session class's own ``close()``. The unit is
        done: never replayed (it would write again, and its listeners run again), ``exc`` raised
        as it is. When the unit may have written, marked and said as a partly committed one
        (a web answer: the change is saved, don't resubmit blindly)."""
        if not wrote:
            self.not_replayable(
                exc,
                "the unit's COMMIT succeeded (it wrote nothing), and the error came after it "
                "(from an after_commit or after_transaction_end listener, or the session's "
                "close): a replay would run them again",
            )
            return
        mark_partly_committed(exc)
        emit(
            self.config,
            log_retry,
            logging.WARNING,
            "Not replaying: service=%s the unit's COMMIT succeeded, then %s was raised after it "
            "(by an after_commit or after_transaction_end listener, or the session's close): "
            "the unit is committed; raising the error",
            self.service,
            type(exc).__name__,
            service=self.service,
            event="partly_committed",
            outcome="committed",
        )

    def not_replayable(self, exc: BaseException, why: str) -> None:
        """An attempt that saved nothing failed, and its replay can't be what a first attempt
        would have been (``why``): ``exc`` is raised as it is, marked not to be replayed, not
        partly committed (a web answer must not say part of the change was saved: an attempt
        that saved part of it is marked so by :meth:`partly_committed`). Said only for an
        error that would have been replayed."""
        if never_replayed(exc) or not self.retry_on or not self._retry_predicate(exc):
            return
        mark_not_replayed(exc)  # (the mark that keeps the policy from replaying it)
        emit(
            self.config,
            log_retry,
            logging.WARNING,
            "Not replaying: service=%s %s (%s); raising the error",
            self.service,
            why,
            type(exc).__name__,
            service=self.service,
            event="not_replayable",
        )

    def _pool_timed_out(self, exc: BaseException) -> None:
        """An attempt waited the whole ``pool_timeout`` for a connection of the engine's pool
        (SQLAlchemy's pool ``TimeoutError``): this process overloaded, not the database failing,
        so never retried nor a breaker failure. Counted (``pool_timeouts``) and said: a WARNING
        line rate-limited per service (under load every waiting unit times out, many a second),
        and a ``pool_timeout`` event for every occurrence. Once per error: an attempt that
        failed with the error of one nested in it (a unit or an operation run inside a unit)
        waited for no pool of its own."""
        if getattr(exc, _POOL_TIMEOUT_COUNTED, False):
            return
        with contextlib.suppress(AttributeError, TypeError):  # a type that takes no attributes
            setattr(exc, _POOL_TIMEOUT_COUNTED, True)
        self.stats.add("pool_timeouts")
        log, since = _POOL_LINES.take((self.service, STATE.generation))
        emit(
            self.config,
            log_retry,
            logging.WARNING,
            "Connection pool timed out: service=%s every connection of the engine's pool was "
            "in use for the whole pool_timeout (%s: more concurrent units than pool_size + "
            "max_overflow, or a slow database); not retried, raising it%s",
            self.service,
            type(exc).__name__,
            more_since(since),
            log=log,
            service=self.service,
            event="pool_timeout",
            error=type(exc).__name__,
            suppressed=since,
        )

    def _machinery_failed(self, what: str, then: str = "running the call without it") -> None:
        """A part of the machinery (``what``: the breaker's state storage, the retry budget)
        raised: the call runs without it (or ``then`` says what is done instead). Its line is
        rate-limited per service (a broken storage fails at every unit, in two places of each)
        and names the error's class, never its text (a storage of the user's may quote its own
        secrets; DEBUG has the frames)."""
        exc = sys.exc_info()[1]
        kind = "an error" if exc is None else type(exc).__qualname__
        log, since = _MACHINERY_LINES.take((self.service, STATE.generation))
        emit(
            self.config,
            log_retry,
            logging.WARNING,
            "%s failed for service=%s (%s); %s%s",
            what,
            self.service,
            kind,
            then,
            more_since(since),
            log=log,
            service=self.service,
            event="machinery_failed",
            part=what,
            error=kind,
            suppressed=since,
        )
        if log:
            debug_failure(log_retry, "machinery failure detail", texts=False)

    # -- tenacity plumbing -------------------------------------------------------------------
    def _retry_predicate(self, exc: BaseException) -> bool:
        return not never_replayed(exc) and self.retryable(self.classifier.classify(exc))

    def _waiter(self) -> Callable[[_t.RetryCallState], float]:
        """The backoff of one unit's retries: conflicts and outages each on their own
        sequence, numbered by the retries of their kind (a unit's first outage backoff is
        from ``SELF_HEALING_INITIAL_DELAY`` whatever conflicts came before it, not from the
        unit's attempt count; its first conflict backoff from ``SELF_HEALING_CONFLICT_DELAY``
        after outages)."""
        counts = [0, 0]  # retries decided so far: outages, conflicts

        def wait(rs: _t.RetryCallState) -> float:
            exc = rs.outcome.exception() if rs.outcome is not None else None
            outcome = self.classifier.classify(exc) if exc is not None else Outcome.DISCONNECT
            kind = int(outcome is Outcome.CONFLICT)
            counts[kind] += 1
            return self.delay(outcome, counts[kind])

        return wait

    def _stopper(
        self, started: float, spent: list[RetryBudget], refused: list[float], paid: _Paid
    ) -> Callable[[_t.RetryCallState], bool]:
        """Stop after ``max_retries``, at the deadline, when the breaker would refuse the retry
        when it is due (the failure just counted opened it: ``refused`` gets how long it stays
        open, and nothing is slept), or when the retry budget can't pay for the retry (then
        ``spent`` names the budget: the unit gives up at once). What the budget paid goes to
        ``paid`` until the retry's attempt starts (see :meth:`_unspent`).

        Each is read when a retry is decided, as the retry's line and delay are: a
        :func:`~resilient_db.reload_config` while the unit backs off applies to its next
        decision (a breaker switched off no longer stops it; a new retry limit is the one its
        lines count to), never half of one."""

        def stop(rs: _t.RetryCallState) -> bool:
            config = self.config
            if rs.attempt_number > config.max_retries:
                return True
            if past_deadline(self.clock() - started + rs.upcoming_sleep, config.deadline):
                return True
            breaker, budget = self.breaker, self.budget
            if breaker is not None:
                remaining = breaker.open_for()
                if remaining > rs.upcoming_sleep:
                    refused.append(remaining)
                    return True
            if budget is not None and not self._budget_pays(budget, rs, paid):
                spent.append(budget)
                return True
            return False

        return stop

    def _budget_pays(self, budget: RetryBudget, rs: _t.RetryCallState, paid: _Paid) -> bool:
        """Outage retries are paid from the budget (what paid goes to ``paid``); conflicts are
        not (the server answered)."""
        exc = rs.outcome.exception() if rs.outcome is not None else None
        if exc is not None and self.classifier.classify(exc) is Outcome.CONFLICT:
            return True
        try:
            withdrawal = budget.withdraw()
        except Exception:  # graceful fallback: a broken budget must not stop the retry
            self._machinery_failed("retry budget")
            return True
        if withdrawal is None:
            return False
        paid.append((budget, withdrawal))
        return True

    def _unspent(self, paid: _Paid) -> None:
        """The retry the budget paid for never ran: the breaker refused its attempt (it opened
        while the unit backed off), or the unit was interrupted during the backoff
        (``KeyboardInterrupt``, a cancelled task). The budget gets it back, as a refused retry
        is no retry anywhere else (see :meth:`_before_sleep`)."""
        while paid:
            budget, withdrawal = paid.pop()
            try:
                budget.refund(withdrawal)
            except Exception:  # graceful fallback: the unit's own error is what it raises
                self._machinery_failed("retry budget refund")

    async def _ashared(self, fn: Callable[..., T], *args: Any, finish: bool = False) -> T:
        """``fn(*args)`` for an async unit, where it may talk to Redis: in a worker thread
        while the breaker or the budget is shared (:func:`in_worker`, see :meth:`_shares`),
        else inline. The async twin of :meth:`_offloaded`."""
        if self._shares():
            return await in_worker(fn, *args, finish=finish)
        return fn(*args)

    def _before_sleep(self, rs: _t.RetryCallState, announced: list[_Retry]) -> None:
        """A retry is decided, its backoff about to be slept: its ``Retry attempt`` line now
        (an operator sees the failure when it happens, not a backoff later). The retry is
        counted, and its ``retry`` event reaches the hooks, when its attempt starts (see
        :meth:`_retry_started`): the breaker may refuse it after the backoff, and a refused
        retry is no retry (no attempt ran), in ``health()``, Prometheus, OpenTelemetry and the
        retry budget's first attempts (``attempts - retries``) alike; the retry budget gets
        back what it paid for it (see :meth:`_unspent`)."""
        exc = rs.outcome.exception() if rs.outcome is not None else None
        outcome = self.classifier.classify(exc) if exc is not None else Outcome.DISCONNECT
        retry = _Retry(outcome, sqlstate_label(exc), rs.attempt_number, rs.upcoming_sleep)
        announced.append(retry)
        self._retry_action(retry, line=True)

    def _retry_started(self, announced: list[_Retry], paid: _Paid) -> None:
        """The breaker admitted the retry announced last: its attempt starts now. Counted
        before the attempt ends (the budget's ``attempts - retries`` dips while it runs, never
        rises above the units started), and its event reaches the hooks. What the budget paid
        for it stays spent."""
        paid.clear()
        if not announced:
            return
        retry = announced.pop()
        self.stats.add_retry(retry.outcome.value)
        self._retry_action(retry, line=False)

    def _retry_action(self, retry: _Retry, *, line: bool) -> None:
        """A retry's log line (``line``) or its hook event (not ``line``): the same message
        and fields."""
        args = (
            retry.attempt,
            self.config.max_retries,
            self.service,
            retry.outcome.value,
            retry.sqlstate,
            retry.delay,
        )
        fields: dict[str, Any] = {
            "service": self.service,
            "event": "retry",
            "attempt": retry.attempt,
            "max_retries": self.config.max_retries,
            "outcome": retry.outcome.value,
            "sqlstate": retry.sqlstate,
            "delay": retry.delay,
        }
        if line:
            emit_line(self.config, log_retry, logging.WARNING, _RETRY_LINE, *args, **fields)
        else:
            emit(self.config, log_retry, logging.WARNING, _RETRY_LINE, *args, log=False, **fields)

    def _retrying_kwargs(
        self,
        spent: list[RetryBudget],
        refused: list[float],
        announced: list[_Retry],
        paid: _Paid,
        *,
        for_async: bool = False,
    ) -> dict[str, Any]:
        def before_sleep(rs: _t.RetryCallState) -> None:
            self._before_sleep(rs, announced)

        stop: Any = self._stopper(self.clock(), spent, refused, paid)
        if for_async:
            stop = self._off_the_loop(stop)
        elif self.offload is not None:
            decide = stop

            def stop(rs: _t.RetryCallState) -> bool:  # (its budget's script: see offload)
                return self._offloaded(decide, rs, finish=True)  # type: ignore[no-any-return]

        return {
            "retry": _t.retry_if_exception(self._retry_predicate),
            "wait": self._waiter(),
            "stop": stop,
            "before_sleep": before_sleep,
            "reraise": True,
        }

    # Async units and the shared state: the breaker's and the budget's failure paths send their
    # Redis commands synchronously (redis-py's client, one per process, also serves threads),
    # each bounded by SELF_HEALING_REDIS_TIMEOUT. On an event loop, a Redis that answers, but
    # slowly, would hold every task for each failure's commands (measured: 5 ms a reply took a
    # loop running 8 tasks from 1,051 units in 2 s to 283). So an async attempt's failure, the
    # retry decision and the admission of a retry run in a worker thread while the breaker or
    # the budget is shared (and only then: a process without Redis pays no thread hop), the
    # unit awaiting them in order. The success path sends nothing to Redis, and stays inline.
    def _shares(self) -> bool:
        """Whether the failure path may talk to Redis now: the breaker or the budget is
        shared through a link that is up, or one whose first attempt to reach Redis has not
        ended (a process just started: the failure path waits for that attempt, at most the
        Redis timeout; on the event loop, every task would wait with it)."""
        breaker, budget = self.breaker, self.budget
        return (breaker is not None and breaker.asks_redis) or (
            budget is not None and budget.asks_redis
        )

    def _off_the_loop(
        self, stop: Callable[[_t.RetryCallState], bool]
    ) -> Callable[[_t.RetryCallState], Awaitable[bool]]:
        """``stop`` for the async retry loop: in a worker thread while shared (see above)."""

        async def astop(rs: _t.RetryCallState) -> bool:
            # (cancelled meanwhile: what the budget paid goes to ``paid`` first, for the caller
            # to give back)
            return await self._ashared(stop, rs, finish=True)

        return astop

    async def afailed(
        self, exc: BaseException, probe: bool, started: float | None = None
    ) -> Outcome:
        """:meth:`failed` for an async attempt (see above)."""
        return await self._ashared(self.failed, exc, probe, started)

    def admit_on_loop(self) -> bool | None:
        """:meth:`admit` for an async unit's first attempt, asked on the event loop: False
        while the breaker is closed (every unit's answer, sending nothing to Redis), else
        None, having done nothing, for :meth:`aadmit` (a shared breaker open or half-open asks
        Redis for a probe, off the loop; a refusal lets the loop's other tasks run first)."""
        if self._generation == STATE.generation:  # (else refresh() first: off the loop too)
            breaker = self.breaker
            if breaker is None or breaker.fast_closed():
                return False
        return None

    def succeeded_on_loop(self, probe: bool) -> bool:
        """:meth:`succeeded` for an async unit's first attempt, on the event loop: True when
        done there (it sent nothing to Redis), else False, having done nothing, for
        :meth:`asucceeded` off the loop (a probe's end, or the first success after failures
        this process saw, counted fleet-wide)."""
        breaker = self.breaker
        if breaker is None or (not probe and breaker.fast_success()):
            self.stats.add_attempt()  # (succeeded()'s fast path, inline: every unit's)
            return True
        if breaker.shared:
            return False
        self.succeeded(probe)
        return True

    async def aadmit(self) -> bool:
        """:meth:`admit` of an async attempt the breaker may refuse (see above). A refusal
        yields to the event loop before it is raised: it sends nothing to the database, so a
        task that runs units in a loop, going on after each refusal, would otherwise never
        let another task run (the one holding the half-open probe, say: the breaker would
        never close)."""
        try:
            if self._admits_off_the_loop():
                return await in_worker(self.admit)
            return self.admit()
        except CircuitOpenError:
            await asyncio.sleep(0)
            raise

    async def asucceeded(self, probe: bool) -> None:
        """:meth:`succeeded` of an async retry's attempt: the first success after failures
        resets the shared run of failures (see above). An interruption meanwhile (the unit's
        task cancelled) is marked: it came after the attempt's work was done."""
        try:
            await self._ashared(self.succeeded, probe)
        except BaseException as interruption:
            if not isinstance(interruption, Exception):
                mark_success_interrupted(interruption)
            raise

    def _gave_up(
        self, exc: BaseException, retries: int, spent: list[RetryBudget], refused: list[float]
    ) -> None:
        """Count and report a unit that ran out of retries (called while ``exc`` is handled:
        the caller re-raises it), raising :class:`CircuitOpenError` (caused by ``exc``) instead
        when the breaker its failures opened ended the loop."""
        outcome = self.classifier.classify(exc)
        mark_outcome(exc, outcome)  # re-raised as it is: say how this factory classified it
        cause = _failure_cause(exc) if outcome in _RETRYABLE else None
        # (that one said so already; with self-healing switched off meanwhile, nothing is
        # counted or said, as the hooks are told nothing)
        if outcome is Outcome.NOT_TRANSIENT:
            self._gave_up_on_error(exc, retries)
        elif outcome in _RETRYABLE and not never_replayed(exc) and self.config.enabled:
            self.stats.add("gave_up")
            limit, why = self._limit(retries, spent, refused)
            if spent:
                # the retry budget's own line, rate-limited: under an outage every failing
                # unit ends here, and one line per unit would be a log storm (the hooks still
                # see every give-up)
                spent[0].spent()
            emit(
                self.config,
                log_retry,
                logging.ERROR,
                "Gave up: service=%s %s (SQLSTATE %s) after %s%s%s; %s",
                self.service,
                outcome.value,
                sqlstate_label(exc),
                retries_text(retries),
                why,
                "" if cause is None else f" ({cause})",
                "the circuit breaker opened, raising CircuitOpenError"
                if refused
                else f"raising {type(exc).__name__}",
                # (a unit that retried before the budget ran out has its own line: its retries
                # were said; one that never retried is counted in the budget's line)
                log=not spent or retries > 0,
                service=self.service,
                event="gave_up",
                retries=retries,
                outcome=outcome.value,
                sqlstate=sqlstate_label(exc),
                limit=limit,
                # the class raised, as the line names it
                error=CircuitOpenError.__name__ if refused else type(exc).__name__,
                **({} if cause is None else {"cause": cause}),
            )
        if refused:
            raise CircuitOpenError(self.service, refused[0], cause=cause) from exc
        if cause is not None:
            add_note_once(exc, f"resilient_db: {cause}")
        self._mark_if_opened(exc, outcome)

    def _gave_up_on_error(self, exc: BaseException, retries: int) -> None:
        """A unit that retried, then failed with an error that is not retried (a bug, a
        business error, a constraint its replay met): counted and said as a give-up, else an
        operator saw its retries and then nothing. Not for a cancellation or an interruption
        (not an ``Exception``), nor for a unit that committed part of its work (its
        ``Not replaying`` line said why), nor with self-healing switched off meanwhile."""
        if (
            retries == 0
            or not isinstance(exc, Exception)
            or never_replayed(exc)
            or not self.config.enabled
        ):
            return
        self.stats.add("gave_up")
        emit(
            self.config,
            log_retry,
            logging.ERROR,
            "Gave up: service=%s after %s: the last attempt failed with %s (SQLSTATE "
            "%s), which is not retried; raising it",
            self.service,
            retries_text(retries),
            type(exc).__name__,
            sqlstate_label(exc),
            service=self.service,
            event="gave_up",
            retries=retries,
            outcome=Outcome.NOT_TRANSIENT.value,
            sqlstate=sqlstate_label(exc),
            limit="not_retried",
            error=type(exc).__name__,
        )

    def _mark_if_opened(self, exc: BaseException, outcome: Outcome) -> None:
        """The unit's last allowed attempt failed with ``exc``, raised as it is: when the
        breaker is open now (that failure opened it, with no retry left, or retry off), the
        web layer's Retry-After says how long it refuses, not "retry shortly"."""
        breaker = self.breaker
        if breaker is not None and outcome in _RETRYABLE:
            open_for = breaker.open_for()
            if open_for > 0:
                mark_breaker_open(exc, open_for)

    def _limit(
        self, retries: int, spent: list[RetryBudget], refused: list[float]
    ) -> tuple[str, str]:
        """What ended the retries of a unit that gave up on a transient error (the ``limit``
        field of its ``gave_up`` event, and the words its line adds): the breaker its failure
        opened, the retry budget, retry switched off by a reload during the backoff, the retry
        count, or else the deadline (the stopper's one other reason: the next backoff would
        have ended past it)."""
        if refused:
            return "breaker", ""
        if spent:
            return "budget", " (the retry budget is spent)"
        if not self.retry_on:
            return "retry_off", " (retry was switched off meanwhile)"
        if retries >= self.config.max_retries:
            return "max_retries", ""
        return "deadline", f" (the next would end past the deadline of {self.config.deadline:g} s)"

    def _refused_retry(self, exc: BaseException, last: BaseException, retries: int) -> None:
        """The breaker refused the unit's next retry (``exc``, a :class:`CircuitOpenError`): it
        opened while the unit backed off, other units' failures opening it. Counted and
        reported as a give-up like any other, raising ``exc`` caused by the unit's last
        failure (``last``), as :meth:`_gave_up` does when the unit's own failure opened it.
        The refused retry was announced (its line) but never counted: no attempt of it ran
        (see :meth:`_before_sleep`), and the retry budget got back what it paid for it. With
        self-healing switched off meanwhile (a reload while the breaker refused it), nothing
        is counted or said, as in :meth:`_gave_up`."""
        outcome = self.classifier.classify(last)
        mark_outcome(last, outcome)
        if not self.config.enabled:
            raise exc from last
        cause = _failure_cause(last)
        ran = retries - 1  # the last retry was refused, not run
        self.stats.add("gave_up")
        emit(
            self.config,
            log_retry,
            logging.ERROR,
            "Gave up: service=%s %s (SQLSTATE %s) after %s%s; the circuit breaker "
            "opened while it retried and refused retry %d, raising CircuitOpenError",
            self.service,
            outcome.value,
            sqlstate_label(last),
            retries_text(ran),
            "" if cause is None else f" ({cause})",
            retries,
            service=self.service,
            event="gave_up",
            retries=ran,
            outcome=outcome.value,
            sqlstate=sqlstate_label(last),
            limit="breaker",
            error=type(exc).__name__,
            circuit_opened=True,
            log=True,
            **({} if cause is None else {"cause": cause}),
        )
        raise exc from last

    def _recovered(self, retries: int, last: BaseException) -> None:
        """The unit succeeded after ``retries`` retries, ``last`` the failure before its last
        attempt: its line says how many it took and what the last failure was (its class and
        SQLSTATE, never its text), as its ``Retry attempt`` lines did."""
        if not self.config.enabled:  # switched off meanwhile: the hooks are told nothing
            return
        self.stats.add("recovered")
        outcome = self.classifier.classify(last)
        emit(
            self.config,
            log_retry,
            logging.INFO,
            "Recovered: service=%s succeeded at attempt %d, after %s (the last failure: "
            "%s, SQLSTATE %s)",
            self.service,
            retries + 1,
            retries_text(retries),
            outcome.value,
            sqlstate_label(last),
            service=self.service,
            event="recovered",
            retries=retries,
            outcome=outcome.value,
            sqlstate=sqlstate_label(last),
        )

    # -- sync driver -------------------------------------------------------------------------
    def call(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` (one whole unit of work) under the breaker, retrying transient
        failures. The original exception is re-raised when retries run out."""
        probe = self.admit() if self.offload is None else self._admit_offloaded()
        started = _monotonic()
        try:
            result = attempt()
        except BaseException as exc:
            return self.call_failed(attempt, exc, probe, started)
        if self.offload is None:
            self.succeeded(probe)
        else:
            self._succeeded_offloaded(probe)
        return result

    def call_once(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` once under the breaker (admitted, its outcome counted), no retry:
        a call inside an operation that retries."""
        probe = self.admit() if self.offload is None else self._admit_offloaded()
        started = _monotonic()
        try:
            result = attempt()
        except BaseException as exc:
            outcome = self._failed_offloaded(exc, probe, started)
            mark_outcome(exc, outcome)
            # (the operation around it answers with it: a Retry-After of this breaker's)
            self._mark_if_opened(exc, outcome)
            raise
        if self.offload is None:
            self.succeeded(probe)
        else:
            self._succeeded_offloaded(probe)
        return result

    # What the sync driver asks that may talk to Redis, through :attr:`offload` when there is
    # one (the inline answers of admit_on_loop / succeeded_on_loop first: no thread hop while
    # the breaker is closed, as for an async unit)
    def _admit_offloaded(self) -> bool:
        """:meth:`admit`, through :attr:`offload` when it may ask Redis (see
        :meth:`_admits_off_the_loop`)."""
        offload = self.offload
        if offload is not None and self.admit_on_loop() is None and self._admits_off_the_loop():
            return offload(self.admit)  # type: ignore[no-any-return]
        return self.admit()

    def _admits_off_the_loop(self) -> bool:
        """Whether :meth:`admit`, for a breaker not closed, may ask Redis, so is to be asked
        from a worker thread: the breaker is shared (after ``reset_state()``, anything shared:
        :meth:`admit` may take a shared breaker). The shared breaker's view here refusing
        (see :meth:`Breaker.refuse_from_view`) raises :class:`CircuitOpenError` at once, and
        a breaker not shared (of the application's storage, the retry budget alone shared)
        decides inline: neither sends anything, nor waits for one of the loop's threads."""
        if self._generation != STATE.generation:
            return self._shares()
        breaker = self.breaker
        if breaker is None or not breaker.shared:
            return False
        breaker.refuse_from_view()
        return True

    def _succeeded_offloaded(self, probe: bool) -> None:
        if not self.succeeded_on_loop(probe):
            self._offloaded(self.succeeded, probe)

    def _failed_offloaded(
        self, exc: BaseException, probe: bool, started: float | None = None
    ) -> Outcome:
        return self._offloaded(self.failed, exc, probe, started)  # type: ignore[no-any-return]

    def _offloaded(self, fn: Callable[..., Any], *args: Any, finish: bool = False) -> Any:
        """``fn(*args)``, through :attr:`offload` while shared (see :meth:`_shares`;
        ``finish``: see :func:`in_worker`)."""
        offload = self.offload
        if offload is not None and self._shares():
            return offload(fn, *args, finish=finish)
        return fn(*args)

    def call_failed(
        self,
        attempt: Callable[[], T],
        exc: BaseException,
        probe: bool,
        started: float | None = None,
    ) -> T:
        """The first attempt of :meth:`call` failed with ``exc``: record it, then retry or
        re-raise it. Drivers that run the first attempt inline call this directly."""
        outcome = self._failed_offloaded(exc, probe, started)
        if not self.retryable(outcome) or never_replayed(exc):
            mark_outcome(exc, outcome)  # raised as it is: say how this factory classified it
            self._mark_if_opened(exc, outcome)
            raise exc
        return self._call_retrying(attempt, exc)

    def _call_retrying(self, attempt: Callable[[], T], first: BaseException) -> T:
        pending = [first]
        # the unit's last failure; True appended when the breaker refused a retry (it opened
        # while the unit backed off: other units' failures)
        last = [first]
        rejected: list[bool] = []
        announced: list[_Retry] = []  # the retry decided, its attempt not started yet
        paid: _Paid = []  # what the budget paid for that retry (see _unspent)
        stopped: list[bool] = []  # True: retry was switched off before the retry's attempt
        # set once an attempt met a 25006 taken for a lost server where the server's answer
        # and the login's report disagreed: the unit's next attempts are told (see
        # _told_refused_unsure); set inside the try below, whose finally resets it
        told: list[contextvars.Token[Any]] = []

        def one() -> T:
            if pending:  # the attempt that already failed on the fast path
                raise pending.pop()
            if not self.retry_on:  # switched off during the backoff (reload_config)
                stopped.append(True)
                raise last[0]
            try:
                probe = self._admit_offloaded()
            except CircuitOpenError:
                rejected.append(True)
                raise
            self._retry_started(announced, paid)
            started = _monotonic()
            try:
                result = attempt()
            except BaseException as exc:
                last[0] = exc
                if not told:
                    _told_refused_unsure(exc, told)
                self._failed_offloaded(exc, probe, started)
                raise
            self._succeeded_offloaded(probe)
            return result

        spent: list[RetryBudget] = []
        refused: list[float] = []
        retrying = _t.Retrying(
            sleep=self.sleep, **self._retrying_kwargs(spent, refused, announced, paid)
        )
        try:
            _told_refused_unsure(first, told)
            result = retrying(one)
        except BaseException as exc:
            if paid:  # a retry paid for whose attempt never ran
                self._offloaded(self._unspent, paid)
            retries = retrying.statistics.get("attempt_number", 1) - 1 - len(stopped)
            if rejected:
                self._refused_retry(exc, last[0], retries)
            self._gave_up(exc, retries, spent, refused)
            raise
        finally:
            if told:
                refused_unsure_before.reset(told[0])
        retries = retrying.statistics.get("attempt_number", 1) - 1 - len(stopped)
        self._recovered(retries, last[0])
        return result

    # -- async driver ------------------------------------------------------------------------
    async def acall(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """The async twin of :meth:`call`: same decisions, awaited attempts and sleeps."""
        probe = self.admit_on_loop()
        if probe is None:
            probe = await self.aadmit()
        started = _monotonic()
        try:
            result = await attempt()
        except BaseException as exc:
            return await self.acall_failed(attempt, exc, probe, started)
        if not self.succeeded_on_loop(probe):
            await self.asucceeded(probe)
        return result

    async def acall_once(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """The async twin of :meth:`call_once`."""
        probe = self.admit_on_loop()
        if probe is None:
            probe = await self.aadmit()
        started = _monotonic()
        try:
            result = await attempt()
        except BaseException as exc:
            outcome = await self.afailed(exc, probe, started)
            mark_outcome(exc, outcome)
            self._mark_if_opened(exc, outcome)  # (as in call_once)
            raise
        if not self.succeeded_on_loop(probe):
            await self.asucceeded(probe)
        return result

    async def acall_failed(
        self,
        attempt: Callable[[], Awaitable[T]],
        exc: BaseException,
        probe: bool,
        started: float | None = None,
    ) -> T:
        """The first attempt of :meth:`acall` failed with ``exc``: record it, then retry or
        re-raise it. Async drivers that run the first attempt inline call this directly."""
        outcome = await self.afailed(exc, probe, started)
        if not self.retryable(outcome) or never_replayed(exc):
            mark_outcome(exc, outcome)  # raised as it is: say how this factory classified it
            self._mark_if_opened(exc, outcome)
            raise exc
        return await self._acall_retrying(attempt, exc)

    async def _acall_retrying(self, attempt: Callable[[], Awaitable[T]], first: BaseException) -> T:
        pending = [first]
        last = [first]  # as in _call_retrying
        rejected: list[bool] = []
        announced: list[_Retry] = []  # the retry decided, its attempt not started yet
        paid: _Paid = []  # what the budget paid for that retry (see _unspent)
        stopped: list[bool] = []  # True: retry was switched off before the retry's attempt
        told: list[contextvars.Token[Any]] = []  # as in _call_retrying

        async def one() -> T:
            if pending:
                raise pending.pop()
            if not self.retry_on:  # switched off during the backoff (reload_config)
                stopped.append(True)
                raise last[0]
            try:
                probe = await self.aadmit()
            except CircuitOpenError:
                rejected.append(True)
                raise
            self._retry_started(announced, paid)
            started = _monotonic()
            try:
                result = await attempt()
            except BaseException as exc:
                last[0] = exc
                if not told:
                    _told_refused_unsure(exc, told)
                await self.afailed(exc, probe, started)
                raise
            if not self.succeeded_on_loop(probe):
                await self.asucceeded(probe)
            return result

        spent: list[RetryBudget] = []
        refused: list[float] = []
        retrying = _t.AsyncRetrying(
            sleep=self.asleep,
            **self._retrying_kwargs(spent, refused, announced, paid, for_async=True),
        )
        try:
            _told_refused_unsure(first, told)
            result: T = await retrying(one)
        except BaseException as exc:
            if paid:  # a retry paid for whose attempt never ran
                await self._ashared(self._unspent, paid)
            retries = retrying.statistics.get("attempt_number", 1) - 1 - len(stopped)
            if rejected:
                self._refused_retry(exc, last[0], retries)
            self._gave_up(exc, retries, spent, refused)
            raise
        finally:
            if told:
                refused_unsure_before.reset(told[0])
        retries = retrying.statistics.get("attempt_number", 1) - 1 - len(stopped)
        self._recovered(retries, last[0])
        return result


def _told_refused_unsure(exc: BaseException, told: list[contextvars.Token[Any]]) -> None:
    """A unit's (or an operation's) attempt failed with ``exc``: where it met a 25006 taken
    for a lost server while the server's answer and the login's report disagreed on it
    (marked so: see ``_unit.refused_unsure_again``), its next attempts run with
    :data:`~._statements.refused_unsure_before` set (its token kept in ``told``, reset once
    the retries end), so that a second such refusal in the unit is its own read-only write,
    raised, not replayed until the retries run out. Only on the failure path: a unit that
    succeeds, or fails otherwise, sets nothing."""
    if refused_unsure(exc):
        told.append(refused_unsure_before.set(running_here()))  # (see there: its tasks)


class _RetriesInAttempt(Policy):
    """A policy of :meth:`Policy.retries_in_attempt` (one per call): its first try is part of
    the enclosing attempt, which counts it; its retries count as attempts, as any retry's."""

    first_tried = False

    def succeeded(self, probe: bool) -> None:
        if self.first_tried:
            super().succeeded(probe)
        self.first_tried = True

    def succeeded_on_loop(self, probe: bool) -> bool:
        if self.first_tried:
            return super().succeeded_on_loop(probe)
        self.first_tried = True
        return True

    def failed(self, exc: BaseException, probe: bool, started: float | None = None) -> Outcome:
        if self.first_tried:
            return super().failed(exc, probe, started)
        self.first_tried = True
        return self._failed_in_enclosing(exc)


class _PartOfAttempt(Policy):
    """A policy of :meth:`Policy.part_of_attempt`: its attempts are part of one that the
    enclosing unit or operation of the same service counts (its ``attempts``, its outcome for
    the breaker), so they count nothing of their own but a pool timeout (counted once), and
    an error that is not to be replayed is said by that attempt, whose error it is too."""

    def succeeded(self, probe: bool) -> None:
        pass

    def succeeded_on_loop(self, probe: bool) -> bool:
        return True

    def failed(self, exc: BaseException, probe: bool, started: float | None = None) -> Outcome:
        return self._failed_in_enclosing(exc)

    #: its attempts' lines are the enclosing attempt's (see AttemptRecord.commit_unanswered)
    says_its_lines = False

    def partly_committed(self, exc: BaseException, how: str = "") -> None:
        # marked (never replayed); its line is the enclosing attempt's, which fails with it or
        # with what its code raised instead (one that caught it and went on did not fail)
        mark_partly_committed(exc)
