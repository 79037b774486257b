"""The exception hierarchy: one root, attributes for everything a handler needs."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.orm.exc import StaleDataError

__all__ = [
    "BypassRefusedError",
    "CircuitOpenError",
    "CommitOutcomeUnknownError",
    "ConfigError",
    "IllegalTransitionError",
    "ResilientDBError",
    "ResponseValidationError",
    "StaleTransitionError",
    "TransactionStateError",
]


class ResilientDBError(Exception):
    """Root of every error raised by resilient_db itself.

    Every one pickles (a task queue or a process pool sends it to another process) with its
    message and attributes as they were: it is rebuilt from its ``args`` and ``__dict__``, its
    ``__init__`` not run again, so a subclass whose constructor takes other arguments than its
    message comes back whole. As with any Python exception, ``__cause__``, ``__context__`` and
    the traceback stay behind.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuilt, (type(self), self.args), self.__dict__)


def _rebuilt(cls: type[ResilientDBError], args: tuple[Any, ...]) -> ResilientDBError:
    """Unpickles a :class:`ResilientDBError` (its state, the attributes, set by pickle after)."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class ConfigError(ResilientDBError, ValueError):
    """One or more ``SELF_HEALING_*`` settings are invalid.

    ``problems`` maps each bad variable name to a sentence about it; the message lists them all.
    """

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = dict(problems)
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(self.problems.items()))
        count = len(self.problems)
        noun = "setting" if count == 1 else "settings"
        super().__init__(f"{count} invalid self-healing {noun}:\n{lines}")


def finite(value: float) -> bool:
    """Whether the number ``value`` is finite: any int is (``math.isfinite`` raises
    ``OverflowError``, naming nothing, on one past a float's range: ``10**400``)."""
    return isinstance(value, int) or math.isfinite(value)


def utf8_problem(text: str) -> str | None:
    """Why ``text`` can't be sent as UTF-8 (``"surrogates not allowed at 3"``), or None. A lone
    surrogate is what ``os.environ`` gives for a byte of a value that is no UTF-8: the driver,
    the codec or the Redis client would fail on it later, saying nothing of where it came from."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{exc.reason} at {exc.start}"
    return None


def shown_number(value: object) -> str:
    """``value`` as an error quotes it: a whole number of hundreds of digits by its length."""
    text = repr(value)
    return text if len(text) <= 30 else f"{len(str(value))} digits"


def wait_text(seconds: float) -> str:
    """A wait for a message, in tenths of a second rounded up: a wait under 0.05 s is not
    "0.0 s", which reads as "retry now" (0 is said only for no wait at all)."""
    if not math.isfinite(seconds):  # (a CircuitOpenError of the caller's may carry one)
        return f"{seconds:.1f} s"
    if not math.isfinite(seconds * 10):  # (so may a wait past any clock's: 1e308)
        return f"{seconds:.3g} s"
    tenths = max(0, math.ceil(seconds * 10 - 1e-6))  # (float noise over a tenth: not more)
    return f"{tenths / 10:.1f} s"


class CircuitOpenError(ResilientDBError):
    """The circuit breaker of ``service`` is open: the call was rejected without touching the
    network. ``retry_after`` is the number of seconds until the breaker lets a probe through;
    ``cause``, when known, what the failures that opened it were (a hot standby refusing
    writes, say), also in the message. ``state`` is ``"open"``, or ``"half-open"`` when every
    probe slot was taken (probes are testing the database: the answer comes within one
    attempt). ``by_hand``: an operator opened it (:func:`~resilient_db.open_breaker`), no
    failure: ``cause`` says so, with the operator's reason when one was given."""

    def __init__(
        self,
        service: str,
        retry_after: float,
        *,
        cause: str | None = None,
        state: str = "open",
        by_hand: bool = False,
    ) -> None:
        self.service = service
        # (an application may raise one of its own: a wait that is no number is said here, not
        # by a comparison failing, and one past a float's range is infinite)
        if isinstance(retry_after, (str, bytes, bool)):
            raise TypeError(
                "CircuitOpenError(retry_after=...) takes a number of seconds, got "
                f"{type(retry_after).__name__}"
            )
        try:
            seconds = float(retry_after)
        except OverflowError:
            seconds = math.inf
        except (TypeError, ValueError):
            raise TypeError(
                "CircuitOpenError(retry_after=...) takes a number of seconds, got "
                f"{type(retry_after).__name__}"
            ) from None
        self.retry_after = max(0.0, seconds)
        self.cause = cause
        self.state = state
        self.by_hand = by_hand
        # opened by hand: what the operator said (``cause``); else what the failures were
        how = (cause or "opened by hand") if by_hand else None
        if state == "half-open":
            what = "is half-open, every probe slot taken (probes are testing the database" + (
                f"; it was {how})" if how else ")"
            )
        else:
            what = f"is open: {how}" if how else "is open after repeated database failures"
        message = f"circuit {service!r} {what}; retry in {wait_text(self.retry_after)}"
        if cause is not None and not by_hand:
            message = f"{message}; the failures: {cause}"
        super().__init__(message)


class CommitOutcomeUnknownError(ResilientDBError):
    """The connection broke while COMMIT was in flight and the outcome could not be verified.

    The transaction may or may not have been committed; it was not replayed, because replaying a
    committed unit would write twice. ``marker`` is the id of the unit's commit marker (see
    :func:`~resilient_db.install_commit_markers`); without markers, ``xid`` is the server
    transaction id that was recorded.
    """

    def __init__(
        self,
        service: str,
        xid: int | None = None,
        detail: str = "",
        *,
        marker: str | None = None,
    ) -> None:
        self.service = service
        self.xid = xid
        self.marker = marker
        self.detail = detail
        if marker is not None:
            what = f"the transaction with commit marker {marker}"
        elif xid is not None:
            what = f"transaction {xid}"
        else:
            what = "the transaction"
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"service {service!r}: the outcome of {what} could not be verified{extra} (the "
            "answer to its COMMIT never came: the connection was lost, or the client stopped "
            "waiting; or it came with a warning, as a cancelled wait for the synchronous standby "
            "answers); it was not replayed. Check the data (or use an idempotency key) before "
            "running the unit again"
        )


class TransactionStateError(ResilientDBError, RuntimeError):
    """A unit of work was started where it cannot be retried safely (for example inside a
    transaction that the caller opened on the same session)."""


class IllegalTransitionError(ResilientDBError):
    """A status change that the model's transition rules do not allow.

    ``via`` says which layer blocked it: ``"flush"`` (the session's flush guard),
    ``"orm-update"`` (an ORM-enabled bulk UPDATE) or ``"db"`` (the database trigger).
    ``inserted``: the row was being inserted (``from_state`` is then None); an UPDATE of a
    nullable status from NULL has ``from_state`` None too, and ``inserted`` False.
    """

    def __init__(
        self,
        *,
        model: str,
        pk: Any,
        column: str,
        from_state: Any,
        to_state: Any,
        via: str,
        reason: str = "",
        inserted: bool = False,
    ) -> None:
        self.model = model
        self.pk = pk
        self.column = column
        self.from_state = from_state
        self.to_state = to_state
        self.via = via
        self.reason = reason
        self.inserted = inserted
        super().__init__(self._message())

    def _message(self) -> str:
        src = "(new row)" if self.inserted else repr(_plain(self.from_state))
        why = f": {self.reason}" if self.reason else ""
        return (
            f"illegal status transition of {self.model}(pk={self.pk!r}).{self.column}: "
            f"{src} -> {_plain(self.to_state)!r} (blocked at {self.via}){why}"
        )


class StaleTransitionError(IllegalTransitionError, StaleDataError):
    """The row was no longer in the state this session loaded: another transaction moved it.
    Reload the row and decide again.

    Also a ``sqlalchemy.orm.exc.StaleDataError``: the flush's UPDATE matched no row because it
    carries the loaded state in its WHERE clause, the same check SQLAlchemy makes for a
    ``version_id_col``; code that handles stale rows that way handles this one too.
    """

    def _message(self) -> str:
        # the move may well have been legal: it lost a race
        why = f": {self.reason}" if self.reason else ""
        return (
            f"status transition conflict on {self.model}(pk={self.pk!r}).{self.column}: "
            f"{_plain(self.from_state)!r} -> {_plain(self.to_state)!r} "
            f"(refused at {self.via}){why}"
        )


class ResponseValidationError(ResilientDBError):
    """The result of a unit of work (or of a ``with_self_healing`` call) failed its ``validate=``
    check: a Pydantic model or type adapter, or a callable.

    ``service`` is the service, ``validator`` names the check (``TaskOut``, ``has_owner``),
    ``reason`` says what was wrong: field locations and error kinds, never the values (the
    result may hold personal data). A unit of work is rolled back (the check runs before its
    COMMIT) and is not retried. The validator's own exception, if any, is ``__cause__``.
    """

    def __init__(self, service: str, validator: str, reason: str) -> None:
        self.service = service
        self.validator = validator
        self.reason = reason
        super().__init__(
            f"service {service!r}: the result failed validation by {validator}: {reason}"
        )


class BypassRefusedError(ResilientDBError, PermissionError):
    """:func:`~resilient_db.bypass_transitions` was refused: the database role may not bypass
    the transition guard (it needs to be granted ``resilient_db_bypass``), or that role does not
    exist. Nothing was bypassed, counted or logged as a bypass; the transaction goes on guarded.
    ``role`` is the role in effect, ``login_role`` the one that logged in."""

    def __init__(self, message: str, *, role: str = "", login_role: str = "") -> None:
        self.role = role
        self.login_role = login_role
        super().__init__(message)


def _plain(state: Any) -> Any:
    return getattr(state, "value", state)
