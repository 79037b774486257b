"""RFC 9457 problem details for resilient_db's errors, and their Starlette exception handlers.

:func:`problem_details` is pure (an exception in, a :class:`Problem` out, no framework), so any
web framework can answer with it; :func:`install_exception_handlers` registers it on a Starlette
(or FastAPI) application. Row keys appear only when the operator opted in
(``SELF_HEALING_LOG_ROW_KEYS``), as in the logs: a key can be personal data.
"""

from __future__ import annotations

import builtins
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from resilient_db._classify import (
    Outcome,
    breaker_open_for,
    classify,
    marked_outcome,
    partly_committed,
)
from resilient_db._config import Config
from resilient_db._errors import (
    CircuitOpenError,
    CommitOutcomeUnknownError,
    IllegalTransitionError,
    ResponseValidationError,
    StaleTransitionError,
)
from resilient_db._observability import MAX_VALUE_CHARS, truncated
from resilient_db._unit import commit_interrupted, saved_then_interrupted
from resilient_db.transitions._report import env_config

__all__ = ["PROBLEM_JSON", "PROBLEM_TYPE_BASE", "Problem", "problem_details"]

PROBLEM_JSON = "application/problem+json"
#: Default prefix of the problem ``type`` URIs (RFC 9457 allows any URI; a URN names the kind
#: without pretending a page exists). ``type_base=`` changes it, e.g. to your API docs.
PROBLEM_TYPE_BASE = "urn:resilient-db:problem:"
#: ``Retry-After`` for a transient error that ran out of retries (whole seconds).
TRANSIENT_RETRY_AFTER = 1
#: The longest ``Retry-After`` sent (whole seconds): a day. A breaker's ``retry_after`` is its
#: reset timeout at most, but a ``CircuitOpenError`` can be made with any number.
MAX_RETRY_AFTER = 86_400


@dataclass(frozen=True)
class Problem:
    """One problem details answer: HTTP ``status``, extra ``headers`` and the JSON ``body``
    (``type``, ``title``, ``status``, ``detail`` and extension members)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def response_headers(self) -> dict[str, str]:
        """Every header of the answer: ``headers`` and the ``Content-Type``,
        ``application/problem+json``. For a framework that takes the body and the headers
        apart and would otherwise say ``application/json`` (Flask: ``return answer.body,
        answer.status, answer.response_headers``)."""
        return {"Content-Type": PROBLEM_JSON, **self.headers}


def _plain(value: Any) -> Any:
    """A state as JSON can carry it (an Enum member by its value), text cut at
    :data:`~resilient_db._observability.MAX_VALUE_CHARS` (marked): a client-chosen status of a
    megabyte is not sent back whole, twice. A float that is not finite is its text ("nan",
    "inf"): JSON has no such number, and a body parsed by Python's ``json`` (Starlette's,
    FastAPI's) can carry one; kept, the answer could not be rendered."""
    value = getattr(value, "value", value)
    if value is None or isinstance(value, (int, bool)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return truncated(str(value), MAX_VALUE_CHARS)


def retry_after_seconds(seconds: Any) -> int:
    """``seconds`` as a ``Retry-After`` value: whole seconds, rounded up, at least 1 and at most
    :data:`MAX_RETRY_AFTER` (infinity gives the most; NaN, or what is not a number, gives 1).
    Never raises."""
    try:
        value = float(seconds)
    except (TypeError, ValueError, OverflowError):
        return 1
    if math.isnan(value):
        return 1
    if value >= MAX_RETRY_AFTER:
        return MAX_RETRY_AFTER
    return max(1, math.ceil(value))


_PARTLY_DETAIL = (
    "The request failed after part of its change was saved, which resubmitting it would save "
    "again. Do not resubmit blindly: check what is there first (or resubmit with the same "
    "idempotency key)."
)
_UNKNOWN_DETAIL = (
    "The connection to the database was lost while the change was being committed, and "
    "whether it was saved could not be verified. Do not resubmit blindly: check whether the "
    "change is there first (or resubmit with the same idempotency key)."
)
_INTERRUPTED_DETAIL = (
    "The request was interrupted (its time ran out) while the change was being committed, "
    "and whether it was saved could not be verified. Do not resubmit blindly: check whether "
    "the change is there first (or resubmit with the same idempotency key)."
)

_SAVED_DETAIL = (
    "The change was saved, then the request was interrupted (its time ran out) before it could "
    "answer. Do not resubmit it: that would save the change again."
)


def _group_class(name: str) -> type[BaseException] | None:
    """Python's ``ExceptionGroup`` or ``BaseExceptionGroup`` (3.11+), or the ``exceptiongroup``
    backport's (what anyio raises on 3.10); None without either."""
    found = getattr(builtins, name, None)
    if found is None:
        try:
            found = getattr(importlib.import_module("exceptiongroup"), name)
        except (ImportError, AttributeError):
            return None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


#: ``BaseExceptionGroup`` and ``ExceptionGroup`` where this Python (or its backport) has them
BASE_GROUP = _group_class("BaseExceptionGroup")
_GROUP = _group_class("ExceptionGroup")
EXCEPTION_GROUP: type[Exception] | None = (
    _GROUP if _GROUP is not None and issubclass(_GROUP, Exception) else None
)
#: a group with more errors than this is not looked into (no answer of ours)
MAX_GROUP_ERRORS = 64


def group_errors(exc: BaseException) -> list[BaseException] | None:
    """The errors of ``exc`` when it is an exception group (a ``TaskGroup``'s), nested groups
    flattened; None when it is no group, or has more than :data:`MAX_GROUP_ERRORS`."""
    if BASE_GROUP is None or not isinstance(exc, BASE_GROUP):
        return None
    found: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if isinstance(current, BASE_GROUP):
            pending[:0] = list(getattr(current, "exceptions", ()))
        else:
            found.append(current)
        if len(found) + len(pending) > MAX_GROUP_ERRORS:
            return None
    return found


def pool_exhausted(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLAlchemy's pool giving up waiting for a free connection ("QueuePool
    limit of size N overflow M reached, connection timed out"): every connection of this
    process was in use for the whole ``pool_timeout``. An overload of this process, transient,
    and no failure of the database: the classifier says not transient (never retried, never
    a failure for the breaker), and the answer is a 503 of its own."""
    return isinstance(exc, PoolTimeoutError)


def _outcome(exc: BaseException) -> Outcome:
    """The outcome of ``exc``, as the factory that ran its unit classified it (its own
    classifier, with the codes it added or removed: recorded on the error when it was raised),
    or by the default classifier for an error that never went through one."""
    outcome = marked_outcome(exc)
    return classify(exc) if outcome is None else outcome


def check_config_and_base(where: str, config: object, type_base: object) -> None:
    """``TypeError`` for a ``config`` that is no :class:`~resilient_db.Config` (or None) or a
    ``type_base`` that is no string, naming ``where`` they were given."""
    if config is not None and not isinstance(config, Config):
        raise TypeError(
            f"{where}(config=...) needs a resilient_db.Config or None, got {type(config).__name__}"
        )
    if not isinstance(type_base, str):
        raise TypeError(
            f"{where}(type_base=...) must be a string (a URI prefix of the problem types), "
            f"got {type(type_base).__name__}"
        )


def problem_details(
    exc: BaseException,
    *,
    config: Config | None = None,
    type_base: str = PROBLEM_TYPE_BASE,
) -> Problem | None:
    """The problem details answer for ``exc``, or None when it is not one of these (the first
    that fits):

    * an unknown commit outcome (:class:`~resilient_db.CommitOutcomeUnknownError`, a COMMIT
      whose answer was lost outside a unit or in an operation's own code, 08007, a unit's
      COMMIT, or drop-in code's, cut off by its interruption: the ``TimeoutError`` of
      ``asyncio.timeout`` or ``asyncio.wait_for`` around ``run`` or the code, raised from its
      cancellation): 500 of its
      own type, ``commit-outcome-unknown``: the change may have been saved, so the client must
      check before resubmitting;
    * the error of a unit or operation that committed part of its work before it failed,
      whatever its class (an open circuit, an exhausted pool, an illegal transition
      included): 500 ``partly-committed``, never a status inviting a resubmit; ``failure``
      names the problem type the error has by itself, when it has one;
    * an interruption that arrived after a unit's COMMIT succeeded (in the prune of expired
      markers that follows it, or the close of its session), or after a drop-in
      ``Session.begin()`` block's, while its session closed (the ``TimeoutError`` of
      ``asyncio.timeout`` or ``asyncio.wait_for`` raised from such a cancellation included):
      500 ``saved-then-interrupted`` with ``service``: the change is saved, so the client
      must not resubmit it;
    * :class:`~resilient_db.CircuitOpenError`: 503, ``Retry-After`` in whole seconds (1 to
      :data:`MAX_RETRY_AFTER`);
    * :class:`~resilient_db.StaleTransitionError`: 409, reload the resource and decide again;
    * :class:`~resilient_db.IllegalTransitionError`: 409 with ``from_state``, ``to_state``,
      ``via`` (and ``pk`` only with ``SELF_HEALING_LOG_ROW_KEYS``);
    * :class:`~resilient_db.ResponseValidationError`: 500 (the server produced a bad result);
    * SQLAlchemy's pool ``TimeoutError`` (every connection of the pool in use for its whole
      ``pool_timeout``: this process overloaded, or its database slow): 503, ``Retry-After``;
    * a transient database error that ran out of retries (SQLAlchemy's ``DBAPIError``, or a
      driver error it does not wrap, such as the ``OSError`` of a connect refused to asyncpg;
      the application's own ``OSError`` is not one): 503. Transient as the classifier of the
      factory that ran the unit said (``classifier=``, with the codes it added or removed),
      ``is_transient`` for an error that never went through a factory.

    An exception group (``asyncio.TaskGroup``'s, anyio's) is judged in the same order: one
    with an unknown commit outcome among its errors is answered as that, then one marked
    partly committed itself (an operation that committed part of its work before one of its
    tasks failed) or with such an error among its own, as ``partly-committed``, then one with
    an interruption after a COMMIT among its errors, as ``saved-then-interrupted``; otherwise a
    group of one such error is answered as that error, and one of several such errors, every
    one a 503, as the one with the longest ``Retry-After``; any other group is not answered
    (None).

    ``config`` decides about row keys (default: the environment's, as the process last read it:
    at its first use and at each ``rdb.reload_config()``; an environment with an invalid
    ``SELF_HEALING_*`` setting counts as none set, so that it turns no answer into a 500: the
    factories refuse such an environment where it matters). A ``config`` that is no
    :class:`~resilient_db.Config` or a ``type_base`` that is no string is refused
    (``TypeError``), whatever ``exc`` is; so is an ``exc`` that is no exception.
    """
    check_config_and_base("problem_details", config, type_base)
    if not isinstance(exc, BaseException):
        # (it failed with an AttributeError inside the application's exception handler)
        raise TypeError(f"problem_details() takes an exception, got {type(exc).__name__}")
    if BASE_GROUP is None or not isinstance(exc, BASE_GROUP):
        return _problem_of(exc, config, type_base)
    errors = group_errors(exc)
    problems = [] if errors is None else [_problem_of(e, config, type_base) for e in errors]
    # as for one error: an unknown commit outcome first, then a partly-committed change (a
    # member's, or the group's own: an operation that committed part of its work before one of
    # its tasks failed, whose tasks' errors are not marked themselves), then a change saved
    # before an interruption, then the rest
    for kind in (_UNKNOWN, PARTLY):
        for found in problems:
            if found is not None and found.body["type"] == type_base + kind:
                return found
    if _group_partly_committed(exc):
        failed = errors[0] if errors is not None and len(errors) == 1 else None
        return _partly_problem(failed, type_base)
    for found in problems:
        if found is not None and found.body["type"] == type_base + _SAVED:
            return found
    if errors is None:
        return None
    if len(problems) == 1:
        return problems[0]
    answered = [p for p in problems if p is not None and p.status == 503]
    if not answered or len(answered) < len(problems):
        return None
    return max(answered, key=lambda p: int(p.headers.get("Retry-After", "0")))


def _group_partly_committed(exc: BaseException) -> bool:
    """Whether ``exc``, an exception group, or a group nested in it, is marked partly
    committed (see :func:`~resilient_db._classify.partly_committed`); at most
    :data:`MAX_GROUP_ERRORS` groups and errors are looked at."""
    pending: list[BaseException] = [exc]
    looked = 0
    while pending and looked <= MAX_GROUP_ERRORS:
        current = pending.pop()
        looked += 1
        if BASE_GROUP is not None and isinstance(current, BASE_GROUP):
            if partly_committed(current):
                return True
            pending.extend(getattr(current, "exceptions", ()))
    return False


_UNKNOWN = "commit-outcome-unknown"
PARTLY = "partly-committed"
_SAVED = "saved-then-interrupted"


def _body(
    type_base: str, kind: str, title: str, status: int, detail: str, **ext: Any
) -> dict[str, Any]:
    return {"type": type_base + kind, "title": title, "status": status, "detail": detail, **ext}


def _why_open(exc: CircuitOpenError) -> str:
    """Why an open circuit refuses: an operator's pause (``open_breaker``: no failure; its
    reason stays on the server) or a failing dependency."""
    if exc.by_hand:
        return f"requests to the {exc.service!r} dependency are paused by an operator"
    return f"the {exc.service!r} dependency is failing"


#: what the rest of a partly-committed change failed with, by the problem type its error has by
#: itself (the sentence names no values: no row key, state or message text)
_REST: dict[str, Callable[[Any], str]] = {
    "circuit-open": lambda exc: f" The rest was not attempted: {_why_open(exc)}.",
    "stale-transition": lambda exc: (
        f" The rest was refused: the {exc.model} was moved by another request meanwhile."
    ),
    "illegal-transition": lambda exc: (
        f" The rest was refused: an illegal transition of {exc.model}.{exc.column}."
    ),
    "response-invalid": lambda exc: " Its result then failed the server's own validation.",
    "pool-exhausted": lambda exc: " The rest found every database connection of the server busy.",
    "database-unavailable": lambda exc: (
        f" The rest failed with a transient database error ({type(exc).__name__})."
    ),
}


def _failure_of(exc: BaseException, outcome: Outcome) -> tuple[str, dict[str, Any]]:
    """What the rest of a partly-committed change failed with: a sentence for the detail and
    extension members (``failure``: the problem type the error has by itself, as
    :func:`_problem_by_class` answers it; its ``service``), naming no values; nothing for an
    error of the application's own."""
    own = _problem_by_class(exc, outcome, None, "")
    if own is None:
        if _database_error(exc):
            return f" The rest failed with a database error ({type(exc).__name__}).", {}
        return "", {}
    kind = own.body["type"]
    ext = {"failure": kind}
    if "service" in own.body:
        ext["service"] = own.body["service"]
    return _REST[kind](exc), ext


#: the packages whose errors are the database's (their class names say what failed, no values)
_DATABASE_PACKAGES = ("sqlalchemy", "psycopg", "psycopg2", "asyncpg", "pg8000")


def _database_error(exc: BaseException) -> bool:
    module = str(getattr(type(exc), "__module__", None) or "")
    return module.split(".", 1)[0] in _DATABASE_PACKAGES


def _partly_problem(failed: BaseException | None, type_base: str) -> Problem:
    """The 500 ``partly-committed`` answer; ``failed``: the error the change failed with, when
    it is one (see :func:`_failure_of`)."""
    said, ext = ("", {}) if failed is None else _failure_of(failed, _outcome(failed))
    title = "Change partly saved"
    return Problem(500, _body(type_base, PARTLY, title, 500, _PARTLY_DETAIL + said, **ext))


def _problem_of(exc: BaseException, config: Config | None, type_base: str) -> Problem | None:
    """:func:`problem_details` of one error (no group): an unknown commit outcome first (it may
    have committed), then a partly-committed change whatever the error's class, then the rest."""

    def body(kind: str, title: str, status: int, detail: str, **ext: Any) -> dict[str, Any]:
        return _body(type_base, kind, title, status, detail, **ext)

    unknown_title = "Outcome of the change unknown"
    if isinstance(exc, CommitOutcomeUnknownError):
        return Problem(
            500, body(_UNKNOWN, unknown_title, 500, _UNKNOWN_DETAIL, service=exc.service)
        )
    interrupted = commit_interrupted(exc)
    if interrupted is not None:  # a COMMIT cut off (asyncio.timeout around run, drop-in code)
        return Problem(
            500, body(_UNKNOWN, unknown_title, 500, _INTERRUPTED_DETAIL, service=interrupted)
        )
    outcome = _outcome(exc)
    if outcome is Outcome.COMMIT_UNKNOWN:  # a drop-in COMMIT whose answer was lost, 08007
        return Problem(500, body(_UNKNOWN, unknown_title, 500, _UNKNOWN_DETAIL))
    if partly_committed(exc):  # whatever its class: a client resubmitting repeats that part
        return _partly_problem(exc, type_base)
    saved = saved_then_interrupted(exc)
    if saved is not None:  # a unit's (or drop-in code's) COMMIT succeeded, then the interruption
        return Problem(
            500,
            body(_SAVED, "Change saved, then interrupted", 500, _SAVED_DETAIL, service=saved),
        )
    return _problem_by_class(exc, outcome, config, type_base)


def _problem_by_class(
    exc: BaseException, outcome: Outcome, config: Config | None, type_base: str
) -> Problem | None:
    """The answer of an error by its class (``outcome``: its classification), once it is
    neither an unknown commit outcome nor partly committed (see :func:`_problem_of`)."""

    def body(kind: str, title: str, status: int, detail: str, **ext: Any) -> dict[str, Any]:
        return _body(type_base, kind, title, status, detail, **ext)

    if isinstance(exc, CircuitOpenError):
        seconds = retry_after_seconds(exc.retry_after)
        return Problem(
            503,
            body(
                "circuit-open",
                "Service temporarily unavailable",
                503,
                (
                    f"Requests to the {exc.service!r} dependency are paused by an operator; "
                    f"they are not attempted for {seconds} s. Retry after that."
                    if exc.by_hand
                    else f"The {exc.service!r} dependency is failing; requests are not "
                    f"attempted for {seconds} s. Retry after that."
                ),
                service=exc.service,
                retry_after=seconds,
            ),
            {"Retry-After": str(seconds)},
        )
    if isinstance(exc, IllegalTransitionError):
        stale = isinstance(exc, StaleTransitionError)
        src, dst = _plain(exc.from_state), _plain(exc.to_state)
        ext: dict[str, Any] = {
            "model": exc.model,
            "column": exc.column,
            "from_state": src,
            "to_state": dst,
            "via": exc.via,
        }
        if (config if config is not None else env_config()).log_row_keys:
            ext["pk"] = _plain(exc.pk)
        if stale:
            return Problem(
                409,
                body(
                    "stale-transition",
                    "The resource changed meanwhile",
                    409,
                    f"The {exc.model} was moved by another request before this change was "
                    f"saved; nothing was changed. Reload it and try again.",
                    **ext,
                ),
            )
        start = "a new row" if exc.inserted else repr(src)
        return Problem(
            409,
            body(
                "illegal-transition",
                "Illegal status transition",
                409,
                f"{exc.model}.{exc.column} may not move from {start} to {dst!r}; the change "
                "was refused.",
                **ext,
            ),
        )
    if isinstance(exc, ResponseValidationError):
        return Problem(
            500,
            body(
                "response-invalid",
                "Invalid response",
                500,
                "The server produced a result that failed its own validation.",
                service=exc.service,
            ),
        )
    if pool_exhausted(exc):
        return Problem(
            503,
            body(
                "pool-exhausted",
                "Service temporarily overloaded",
                503,
                "Every database connection of the server was busy for longer than it waits "
                "for one. Retry shortly.",
                retry_after=TRANSIENT_RETRY_AFTER,
            ),
            {"Retry-After": str(TRANSIENT_RETRY_AFTER)},
        )
    if outcome.transient:  # a DBAPIError, or a driver's own error (asyncpg's refused connect)
        open_for = breaker_open_for(exc)
        if open_for > 0:  # its failures opened the breaker: a sooner retry meets it
            seconds = retry_after_seconds(open_for)
            detail = (
                "The database failed with a transient error, and the circuit breaker opened: "
                f"requests are not attempted for {seconds} s. Retry after that."
            )
        else:
            seconds = TRANSIENT_RETRY_AFTER
            detail = "The database failed with a transient error. Retry shortly."
        return Problem(
            503,
            body(
                "database-unavailable",
                "Database temporarily unavailable",
                503,
                detail,
                retry_after=seconds,
            ),
            {"Retry-After": str(seconds)},
        )
    return None
