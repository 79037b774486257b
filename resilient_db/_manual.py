"""Opening and closing a service's circuit breaker by hand (an operator's maintenance window, a
fix deployed): :func:`open_breaker` and :func:`close_breaker`.

They act on the breaker of this process (a service's one breaker, made by its first factory or
``with_self_healing`` call), and through it on the breaker shared through Redis when
``SELF_HEALING_REDIS_URL`` shares it: the change is one script run by Redis (see ``_FORCE`` in
:mod:`resilient_db._fleet`), published to every process, which says it was made by hand.
"""

from __future__ import annotations

from typing import Final

from ._breaker import Breaker, breakers
from ._errors import finite, shown_number
from ._observability import unfit_label

__all__ = ["MAX_OPEN_SECONDS", "MAX_REASON", "check_change", "close_breaker", "open_breaker"]

#: the longest opening by hand (one day): a longer maintenance opens it again; a typo in the
#: unit (milliseconds given as seconds) does not keep a service refused for weeks
MAX_OPEN_SECONDS: Final = 86_400.0
#: the longest reason (it goes into log lines, errors, and Redis), as for service names
MAX_REASON: Final = 200
#: how many known service names an error about an unknown one lists
_NAMES_LISTED = 20


def open_breaker(service: str, *, reason: str | None = None, seconds: float | None = None) -> bool:
    """Open ``service``'s circuit breaker now, by hand: every unit of work and drop-in
    transaction of the service is refused with :class:`~resilient_db.CircuitOpenError`
    (``by_hand`` True, ``cause`` ``"opened by hand: <reason>"``) for ``seconds`` (None: the
    service's reset timeout; at most :data:`MAX_OPEN_SECONDS`), then the breaker is half-open
    and lets its probes through as usual. ``reason`` (an operator's short text, "database
    upgrade") is said by the ``Circuit breaker opened`` line, its event and every rejection.

    Shared through Redis (``SELF_HEALING_REDIS_URL``), it opens for every process sharing the
    breaker, and returns True; False when it applied to this process only: the breaker is not
    shared, or Redis did not answer (its line says so). The Redis call is bounded by
    ``SELF_HEALING_REDIS_TIMEOUT``.

    Raises ``ValueError`` for a service that has no breaker in this process (naming the ones
    that do), one whose breaker is switched off (``SELF_HEALING_CIRCUIT_BREAKER=false``) or
    that every user opted out of (``use_circuit_breaker=False``), and a bad ``reason`` or
    ``seconds``; ``TypeError`` for one of the wrong type."""
    breaker = _breaker_of(service, "open_breaker()")
    reason = _checked_reason(reason, "open_breaker()")
    seconds = _checked_seconds(seconds)
    return breaker.open(reason=reason, seconds=seconds)


def close_breaker(service: str, *, reason: str | None = None) -> bool:
    """Close ``service``'s circuit breaker now, by hand, its counted failures forgotten: units
    are let through at once, without waiting out an opening or for probes. Its ``Circuit
    breaker closed`` line says it was closed by hand (with ``reason``), not that the database
    recovered. Shared through Redis: for every process (True), as :func:`open_breaker`; the
    same errors (``seconds`` aside)."""
    breaker = _breaker_of(service, "close_breaker()")
    reason = _checked_reason(reason, "close_breaker()")
    return breaker.close(reason=reason)


def check_change(
    service: object, reason: object, seconds: object, where: str
) -> tuple[str | None, str | None, float | None]:
    """The checks of :func:`open_breaker` and :func:`close_breaker` on their arguments, for
    the ``resilient-db breaker`` command (which has no breaker of its own to look up):
    ``(service, reason, seconds)``, or the same ``TypeError``/``ValueError``, ``where``
    naming the caller. ``service`` None (``status`` of every service) is not checked."""
    from ._unit import check_service_name  # noqa: PLC0415 - it imports the breaker's module

    if service is not None:
        check_service_name(service, where)
        assert isinstance(service, str)
    # (the command requires --reason: an empty one is not told it may be left out)
    checked = _checked_reason(reason, where, optional=False)
    return service, checked, _checked_seconds(seconds, where)


def _breaker_of(service: str, where: str) -> Breaker:
    """The breaker of ``service`` that a change by hand acts on, or a clear error."""
    # Local imports: these modules import the breaker's.
    from ._registry import live_policies  # noqa: PLC0415
    from ._unit import check_service_name  # noqa: PLC0415

    check_service_name(service, where)
    breaker = breakers().get(service)
    policies = [p for p in live_policies() if p.service == service]
    if breaker is not None and not breaker.switched_off:
        return breaker
    if breaker is not None or any(p.use_circuit_breaker for p in policies):
        raise ValueError(
            f"{where}: the circuit breaker of service {service!r} is switched off "
            "(SELF_HEALING_CIRCUIT_BREAKER=false or SELF_HEALING_ENABLED=false, or a config= "
            "saying so): its calls run without it, so there is nothing to open or close"
        )
    if policies:
        raise ValueError(
            f"{where}: service {service!r} has no circuit breaker: every factory and "
            "with_self_healing() of it was made with use_circuit_breaker=False"
        )
    known = sorted(breakers())
    listed = ", ".join(repr(name) for name in known[:_NAMES_LISTED])
    if len(known) > _NAMES_LISTED:
        listed += f" and {len(known) - _NAMES_LISTED} more"
    raise ValueError(
        f"{where}: no circuit breaker for service {service!r} in this process (a service "
        "has one once a factory or with_self_healing() of it is made); "
        + (f"the services with one: {listed}" if known else "no service has one yet")
    )


def _checked_reason(reason: object, where: str, *, optional: bool = True) -> str | None:
    """``reason`` if it can be one (it goes into log lines, errors and Redis, as a service
    name does), else a ``TypeError``/``ValueError`` naming it (``optional``: the caller may
    leave it out, which an empty one's error suggests)."""
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise TypeError(f"{where}: reason must be a str or None, got {type(reason).__name__}")
    if not reason.strip():
        raise ValueError(
            f"{where}: reason is {'empty' if not reason else 'blank'}: give a short text "
            "such as 'database upgrade'" + (", or leave it out" if optional else "")
        )
    problem = unfit_label(reason, MAX_REASON)
    if problem is not None:
        raise ValueError(
            f"{where}: reason {problem}: it is logged and sent to Redis as it is; use "
            "printable text on one line"
        )
    return reason


def _checked_seconds(seconds: object, where: str = "open_breaker()") -> float | None:
    """``seconds`` as a float if it can be an opening's length, else an error naming it."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(
            f"{where}: seconds must be a number of seconds (int or float) or None, "
            f"got {type(seconds).__name__}"
        )
    # (compared as given: float() of an int past a float's range raises OverflowError)
    if not finite(seconds) or seconds <= 0 or seconds > MAX_OPEN_SECONDS:
        raise ValueError(
            f"{where}: seconds must be a finite number above 0 and at most "
            f"{MAX_OPEN_SECONDS:g} (one day), got {shown_number(seconds)}"
        )
    return float(seconds)
