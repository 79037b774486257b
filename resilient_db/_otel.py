"""OpenTelemetry for resilient_db: one hook on the public hook API (:func:`resilient_db.add_hook`),
as stamina offers its Prometheus and structlog instrumentation.

Every self-healing action becomes a span event ``resilient_db.<event>`` on the current span (the
request or job it happened in, when one is recording) with the action's structured fields as
attributes, and counts on OTel counters. Only ``opentelemetry-api`` is needed (the ``otel``
extra); the application's SDK decides where spans and metrics go.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from ._classify import Outcome
from ._observability import SelfHealEvent, add_hook, health, remove_hook
from ._state import renew_after_fork

__all__ = ["OpenTelemetryHook", "install_opentelemetry", "uninstall_opentelemetry"]

_ATTRIBUTE_TYPES = (str, bool, int, float)
_BREAKER_STATES = {
    "breaker_opened": "open",
    "breaker_half_open": "half_open",
    "breaker_closed": "closed",
}
#: the ``outcome`` of a ``partly_committed`` event whose own COMMIT lost its answer
_OWN_COMMIT_UNKNOWN = Outcome.COMMIT_UNKNOWN.value
_COMMIT_OUTCOMES = {
    "commit_verified": "committed",
    "commit_not_applied": "not_committed",
    "commit_unknown": "unknown",
}


def _opentelemetry() -> tuple[Any, Any]:
    try:
        from opentelemetry import metrics, trace  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError(
            "OpenTelemetry support needs the OpenTelemetry API: pip install 'resilient-db[otel]'"
        ) from exc
    return metrics, trace


class OpenTelemetryHook:
    """The hook :func:`install_opentelemetry` installs. Instruments (all counters; the
    attempts' and the rejections' are observed, read from :func:`resilient_db.health` as the
    meter collects):

    ``resilient_db.attempts`` (``service``: each try of a unit, an operation or a drop-in
    connect, read from ``attempts`` of :func:`resilient_db.health` as the meter collects, as
    Prometheus's ``resilient_db_attempts_total``: with ``resilient_db.retries``, a retry ratio;
    counted on every unit's path, so read, not sent as events),
    ``resilient_db.events`` (every action; ``event``, ``service``),
    ``resilient_db.retries`` (``service``, ``outcome``, ``sqlstate``),
    ``resilient_db.breaker.transitions`` (``service``, ``state``; ``opened_here`` for
    ``open``: false for a shared breaker's opening another process made, followed here),
    ``resilient_db.breaker.rejections`` (``service``: calls the open breaker rejected, read
    from ``breaker_rejections`` of :func:`resilient_db.health` as the meter collects),
    ``resilient_db.breaker.state`` (a gauge, ``service``, ``state``: 1 for the breaker's
    current state, 0 for the others, read from :func:`resilient_db.health` as the meter
    collects, as Prometheus's ``resilient_db_breaker_state``; ``state`` is ``closed``,
    ``open``, ``half_open`` or ``off``), ``resilient_db.breaker.by_hand`` (a gauge,
    ``service``: 1 while the opening in force was made by hand, as Prometheus's
    ``resilient_db_breaker_by_hand``),
    ``resilient_db.commit.verifications`` (``service``, ``outcome``: committed, not_committed,
    unknown), ``resilient_db.transitions.blocked`` (``model``, ``via``),
    ``resilient_db.transitions.stale`` (``model``, ``via``),
    ``resilient_db.response_validation.failures`` (``service``, ``validator``),
    ``resilient_db.pool.timeouts`` (``service``: attempts that waited the whole
    ``pool_timeout`` for a connection of the engine's pool),
    ``resilient_db.pool.invalidations`` (``service``, ``sqlstate``: errors that ended the use
    of the pool's connections, each replaced at its next checkout),
    ``resilient_db.pool.dead_connections`` (``service``: pooled connections found dead at
    checkout, their backend ended, and replaced),
    ``resilient_db.hot_standby.refused_writes`` (``service``: writes a hot standby refused
    with 25006).

    They count what :func:`resilient_db.health` and the Prometheus metrics count:
    ``resilient_db.transitions.blocked`` adds one per row whose illegal move was refused (a
    bulk UPDATE's event adds its ``blocked_rows``; filter mode's rows included), as
    ``health()["transitions"]["blocked_transitions"]`` and
    ``resilient_db_transitions_blocked_total`` do; moves refused because the row had moved
    meanwhile count on ``resilient_db.transitions.stale`` only (``stale_transitions``,
    ``resilient_db_transitions_stale_total``); ``resilient_db.response_validation.failures``
    is each service's ``response_validation_failures``; ``resilient_db.pool.timeouts`` its
    ``pool_timeouts`` (``resilient_db_pool_timeouts_total``), ``resilient_db.pool.invalidations``
    its ``pool_invalidations`` (``resilient_db_pool_invalidations_total``),
    ``resilient_db.pool.dead_connections`` its ``dead_pooled_connections``
    (``resilient_db_dead_pooled_connections_total``), ``resilient_db.hot_standby.refused_writes``
    its ``hot_standby_refused_writes`` (``resilient_db_hot_standby_refused_writes_total``),
    ``resilient_db.stale_timeline.refusals`` its ``stale_timeline_refusals``
    (``resilient_db_stale_timeline_refusals_total``; attribute ``fleet`` true for those
    refused by a timeline another process of the fleet saw: ``stale_timeline_refusals_fleet``).
    """

    def __init__(self, meter_provider: Any = None) -> None:
        _check_meter_provider(meter_provider)
        metrics, trace = _opentelemetry()
        from . import __version__  # noqa: PLC0415 - the package imports this module lazily

        self._trace = trace
        meter = (
            meter_provider.get_meter("resilient_db", __version__)
            if meter_provider is not None
            else metrics.get_meter("resilient_db", __version__)
        )
        self.meter_provider = meter_provider
        self.active = True
        instruments = _instruments_of(meter, metrics)
        # the meter's observable instruments now read for this hook (see _Instruments)
        instruments.hook = self
        self._instruments = instruments

    def __call__(self, event: SelfHealEvent) -> None:
        fields = event.fields
        counters = self._instruments
        service = event.service or ""
        span = self._trace.get_current_span()
        if span.is_recording():
            span.add_event(f"resilient_db.{event.name}", _attributes(event, fields))
        counters.events.add(1, {"event": event.name, "service": service})
        name = event.name
        if name == "retry":
            counters.retries.add(
                1,
                {
                    "service": service,
                    "outcome": str(fields.get("outcome", "")),
                    "sqlstate": str(fields.get("sqlstate", "none")),
                },
            )
        elif name in _BREAKER_STATES:
            attributes: dict[str, Any] = {"service": service, "state": _BREAKER_STATES[name]}
            if name == "breaker_opened":
                # a breaker shared through Redis is entered open by every process of the
                # fleet: opened_here tells the one whose failure (or open()) made the opening
                # from those that followed it, as breaker_opens and breaker_opens_followed do
                # in health() and Prometheus (summed over the fleet, the openings with
                # opened_here true count each opening once)
                attributes["opened_here"] = bool(fields.get("opened_here", True))
            counters.breaker.add(1, attributes)
        elif name in _COMMIT_OUTCOMES:
            counters.commits.add(1, {"service": service, "outcome": _COMMIT_OUTCOMES[name]})
        elif name == "two_phase_finished" and fields.get("done"):
            # the factory finished the unit's prepared transactions: the unit is done, counted
            # as a verified commit, as health()'s verified_commits counts it
            counters.commits.add(1, {"service": service, "outcome": "committed"})
        elif name == "commit_interrupted" and fields.get("outcome") == "unknown":
            # (health()'s unknown_commits counts it too; one interrupted after its COMMIT
            # succeeded is not a verification)
            counters.commits.add(1, {"service": service, "outcome": "unknown"})
        elif name == "partly_committed" and fields.get("outcome") == _OWN_COMMIT_UNKNOWN:
            # a COMMIT of the unit's or operation's own code (a drop-in block inside
            # with_self_healing, a unit's own session.commit()) lost its answer: not replayed,
            # and counted in health()'s unknown_commits by the engine's hooks, which say no
            # line of their own for it (this event is its one)
            counters.commits.add(1, {"service": service, "outcome": "unknown"})
        elif name == "transition_blocked":
            counter = counters.stale if fields.get("stale") else counters.blocked
            counter.add(
                int(fields.get("blocked_rows", 1) or 1),
                {"model": str(fields.get("model", "")), "via": str(fields.get("via", ""))},
            )
        elif name == "pool_timeout":
            counters.pool_timeouts.add(1, {"service": service})
        elif name == "pool_invalidated":
            counters.pool_invalidations.add(
                1, {"service": service, "sqlstate": str(fields.get("sqlstate", "none"))}
            )
        elif name == "dead_pooled_connection":
            counters.dead_connections.add(1, {"service": service})
        elif name == "hot_standby_refused_write":
            counters.standby_refusals.add(1, {"service": service})
        elif name == "stale_timeline_refused":
            counters.timeline_refusals.add(
                1, {"service": service, "fleet": bool(fields.get("fleet", False))}
            )
        elif name == "response_invalid":
            counters.invalid.add(
                1, {"service": service, "validator": str(fields.get("validator", ""))}
            )


#: the states of ``resilient_db.breaker.state`` (health()'s, snake_case as OTel's values go)
_STATES = ("closed", "open", "half_open", "off")


class _Instruments:
    """A meter's instruments, made once per meter and shared by every hook made on it.

    A meter keeps the instruments made on it, and OpenTelemetry's SDK answers a second
    ``create_*`` of a name with the instrument made first (and a warning): the observable
    ones keep the callbacks they were made with. Made per hook, a hook installed again on the
    same provider (``uninstall_opentelemetry()`` then ``install_opentelemetry()``, or a switch
    from provider A to B and back) got instruments whose callbacks were the first hook's, which
    observe nothing once that hook is uninstalled: ``resilient_db.attempts`` and the breaker's
    state and rejections went silent. Here the callbacks read for the meter's latest hook
    (:attr:`hook`), nothing while it is uninstalled."""

    def __init__(self, meter: Any, metrics: Any) -> None:
        self.hook: OpenTelemetryHook | None = None
        self._observation = metrics.Observation
        self.events = meter.create_counter(
            "resilient_db.events", unit="{event}", description="Self-healing actions, by event"
        )
        self.retries = meter.create_counter(
            "resilient_db.retries",
            unit="{retry}",
            description="Retries of units of work, by error class and SQLSTATE",
        )
        self.breaker = meter.create_counter(
            "resilient_db.breaker.transitions",
            unit="{transition}",
            description="Circuit breaker state changes, by the state entered",
        )
        self.commits = meter.create_counter(
            "resilient_db.commit.verifications",
            unit="{commit}",
            description="COMMITs whose answer was lost, by the verified outcome",
        )
        self.blocked = meter.create_counter(
            "resilient_db.transitions.blocked",
            unit="{transition}",
            description="Rows whose illegal status move was blocked, by the path that blocked it",
        )
        self.stale = meter.create_counter(
            "resilient_db.transitions.stale",
            unit="{transition}",
            description="Status moves refused because another transaction had moved the row",
        )
        # read from health() when the meter collects, as the Prometheus collector does: the
        # rejections' event goes with their rate-limited line, not with each call, so counting
        # events would lag behind the calls by up to a line's period
        # every unit's path counts its attempts: read as the meter collects, not sent as
        # events (there are none: a unit that succeeds at once says nothing)
        meter.create_observable_counter(
            "resilient_db.attempts",
            callbacks=[self._observe_attempts],
            unit="{attempt}",
            description="Attempts of units, operations and drop-in connects (each try counts)",
        )
        meter.create_observable_counter(
            "resilient_db.breaker.rejections",
            callbacks=[self._observe_rejections],
            unit="{call}",
            description="Calls rejected by an open circuit breaker",
        )
        # the state now, not its changes: what an alert on an open breaker needs (from the
        # transitions counter it can't be told once its points are aggregated)
        meter.create_observable_gauge(
            "resilient_db.breaker.state",
            callbacks=[self._observe_breaker_states],
            unit="1",
            description="1 for the circuit breaker's current state, 0 for the others",
        )
        # whether that state is an operator's opening (its reason is in health(), never an
        # attribute: one series per service)
        meter.create_observable_gauge(
            "resilient_db.breaker.by_hand",
            callbacks=[self._observe_breaker_by_hand],
            unit="1",
            description=(
                "1 while the circuit breaker's opening in force (open, or half-open after it) "
                "was made by hand (open_breaker()), else 0"
            ),
        )
        self.invalid = meter.create_counter(
            "resilient_db.response_validation.failures",
            unit="{result}",
            description="Results that failed their validate= check",
        )
        self.pool_timeouts = meter.create_counter(
            "resilient_db.pool.timeouts",
            unit="{attempt}",
            description="Attempts that waited the whole pool_timeout for a pooled connection",
        )
        self.pool_invalidations = meter.create_counter(
            "resilient_db.pool.invalidations",
            unit="{error}",
            description="Errors that ended the use of the pool's connections, by SQLSTATE",
        )
        self.dead_connections = meter.create_counter(
            "resilient_db.pool.dead_connections",
            unit="{connection}",
            description="Pooled connections found dead at checkout and replaced",
        )
        self.standby_refusals = meter.create_counter(
            "resilient_db.hot_standby.refused_writes",
            unit="{write}",
            description="Writes refused by a hot standby (SQLSTATE 25006)",
        )
        self.timeline_refusals = meter.create_counter(
            "resilient_db.stale_timeline.refusals",
            unit="{connection}",
            description="Connections refused: a primary on an older timeline of its cluster",
        )

    def _reading(self) -> bool:
        """Whether the meter's hook is installed (nothing is observed otherwise)."""
        hook = self.hook
        return hook is not None and hook.active

    def _observe_rejections(self, _options: Any) -> Iterator[Any]:
        """Each service's ``breaker_rejections``."""
        return self._observe_counter("breaker_rejections")

    def _observe_attempts(self, _options: Any) -> Iterator[Any]:
        """Each service's ``attempts``."""
        return self._observe_counter("attempts")

    def _observe_counter(self, counter: Literal["attempts", "breaker_rejections"]) -> Iterator[Any]:
        if not self._reading():
            return
        for name, service in health()["services"].items():
            yield self._observation(service["counters"][counter], {"service": name})

    def _observe_breaker_states(self, _options: Any) -> Iterator[Any]:
        """Each breaker's state: 1 for the current one, 0 for the others."""
        if not self._reading():
            return
        for name, service in health()["services"].items():
            breaker = service["breaker"]
            if breaker is None:
                continue
            current = str(breaker.get("state", "")).replace("-", "_")
            for state in _STATES:
                yield self._observation(
                    1 if current == state else 0, {"service": name, "state": state}
                )

    def _observe_breaker_by_hand(self, _options: Any) -> Iterator[Any]:
        """Each breaker's ``by_hand``: 1 while its opening in force was an operator's."""
        if not self._reading():
            return
        for name, service in health()["services"].items():
            breaker = service["breaker"]
            if breaker is not None:
                yield self._observation(1 if breaker.get("by_hand") else 0, {"service": name})


#: each meter's instruments (a meter provider keeps its meters: weakly held here all the same)
_meters: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_meters_lock = threading.Lock()
renew_after_fork(globals(), "_meters_lock")


def _instruments_of(meter: Any, metrics: Any) -> _Instruments:
    """``meter``'s instruments, made at its first hook."""
    with _meters_lock:
        try:
            instruments = _meters.get(meter)
        except TypeError:  # a meter that can't be weakly referenced: made for each hook
            return _Instruments(meter, metrics)
        if instruments is None:
            instruments = _Instruments(meter, metrics)
            _meters[meter] = instruments
        return instruments


def _check_meter_provider(meter_provider: object) -> None:
    """A meter provider is an object with ``get_meter()`` (an instance: the class's
    ``get_meter`` would take the meter's name for ``self``)."""
    if meter_provider is None:
        return
    if isinstance(meter_provider, type):
        raise TypeError(
            f"meter_provider= takes a meter provider instance, got the class "
            f"{meter_provider.__qualname__}: pass {meter_provider.__qualname__}(...), or "
            "leave it out for the global one"
        )
    if not callable(getattr(meter_provider, "get_meter", None)):
        raise TypeError(
            "meter_provider= takes an OpenTelemetry meter provider (an object with "
            f"get_meter()), got {type(meter_provider).__name__}"
        )


def _attributes(event: SelfHealEvent, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The span event's attributes: the action's fields that OTel can carry (no None, no
    objects), under ``resilient_db.``, and the log line without its prefix."""
    attributes: dict[str, Any] = {"resilient_db.message": event.message}
    for key, value in fields.items():
        if key == "event" or value is None:
            continue
        plain = value if isinstance(value, _ATTRIBUTE_TYPES) else str(value)
        attributes[f"resilient_db.{key}"] = plain
    return attributes


_installed: OpenTelemetryHook | None = None
_lock = threading.Lock()
renew_after_fork(globals(), "_lock")


def install_opentelemetry(*, meter_provider: Any = None) -> OpenTelemetryHook:
    """Record every self-healing action as a span event on the current span and on OTel
    counters (see :class:`OpenTelemetryHook`). Idempotent: calling it again returns the hook
    already installed, unless another ``meter_provider`` is given (then that one replaces it).
    ``meter_provider`` defaults to the global one (``opentelemetry.metrics``); spans always go
    to the current span of the context the action happens in. One that is not a meter provider
    instance is refused with ``TypeError``. The new hook is built before the old one is
    removed: a provider that fails leaves the hook installed before as it was."""
    global _installed
    with _lock:
        old = _installed
        if old is not None and (meter_provider is None or old.meter_provider is meter_provider):
            add_hook(old)  # idempotent
            return old
        hook = OpenTelemetryHook(meter_provider)
        add_hook(hook)
        if old is not None:
            remove_hook(old)
            old.active = False
        _installed = hook
        return hook


def uninstall_opentelemetry() -> None:
    """Remove the hook :func:`install_opentelemetry` installed (no error if there is none)."""
    global _installed
    with _lock:
        if _installed is not None:
            remove_hook(_installed)
            _installed.active = False
            _installed = None
