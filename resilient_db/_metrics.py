"""Prometheus metrics: a custom collector that reads :func:`resilient_db.health` at scrape time,
so ``health()`` and the metrics always show the same figures.

Needs the optional ``prometheus`` extra (``pip install 'resilient-db[prometheus]'``);
``prometheus_client`` is imported only when a collector is made. Typical use::

    from prometheus_client import REGISTRY
    from resilient_db.metrics import HealthCollector
    REGISTRY.register(HealthCollector())

Metrics (label ``service`` is the ResilientSession's service name):

===================================================  =======  ======================================
``resilient_db_attempts_total``                      counter  attempts (each try of a unit, an
                                                              operation or a drop-in connect)
``resilient_db_retries_total{class}``                counter  retries by class (conflict, ...)
``resilient_db_recovered_total``                     counter  units that succeeded after retrying
``resilient_db_gave_up_total``                       counter  units that gave up (see ``gave_up``)
``resilient_db_breaker_opens_total``                 counter  times this process opened the breaker
``resilient_db_breaker_opens_followed_total``        counter  openings of a shared breaker that
                                                              other processes made, followed here
``resilient_db_breaker_rejections_total``            counter  calls rejected by an open breaker
``resilient_db_breaker_state{state}``                gauge    1 for the breaker's current state
``resilient_db_breaker_by_hand``                     gauge    1 while the opening in force (open,
                                                              or half-open after it) was made by
                                                              hand (``open_breaker()``)
``resilient_db_commit_outcome_unknown_total``        counter  COMMITs whose outcome stayed unknown
``resilient_db_commits_verified_total``              counter  lost COMMIT answers verified committed
``resilient_db_response_validation_failures_total``  counter  results that failed ``validate=``
``resilient_db_pool_timeouts_total``                 counter  attempts that found the pool full
``resilient_db_pool_invalidations_total``            counter  errors that replaced the pool's
                                                              connections (57P01, 25006, ...)
``resilient_db_dead_pooled_connections_total``       counter  pooled connections found dead at
                                                              checkout, replaced
``resilient_db_hot_standby_refused_writes_total``    counter  writes a hot standby refused (25006)
``resilient_db_stale_timeline_refusals_total``       counter  connections refused: an old primary
                                                              on an older timeline
``resilient_db_stale_timeline_refusals_fleet_total`` counter  of those: by a timeline another
                                                              process of the fleet saw
``resilient_db_transitions_blocked_total``           counter  rows whose illegal move was blocked
``resilient_db_transitions_stale_total``             counter  transitions refused: the row had moved
``resilient_db_transition_rows_filtered_total``      counter  of the blocked: rows a bulk UPDATE's
                                                              filter left unchanged
``resilient_db_transition_bypasses_total``           counter  audited bypasses of the guard
``resilient_db_healthy``                             gauge    0 while any breaker is open
``resilient_db_retry_budget_available``              gauge    retries the budget would pay for now
``resilient_db_retry_budget_exhausted_total``        counter  units that gave up: budget spent
``resilient_db_retry_budget_shared``                 gauge    1 while the budget is fleet-wide
``resilient_db_breaker_shared``                      gauge    1 while the breaker follows Redis
===================================================  =======  ======================================

Also ``resilient_db_commits_verified_not_committed_total`` (counter: lost COMMIT answers verified
as not committed; the unit may be run again).

The retry budget series exist for services with ``SELF_HEALING_RETRY_BUDGET`` set; the
``breaker_shared`` series for breakers with ``SELF_HEALING_REDIS_URL`` set, and the
``breaker_opens_followed`` series for those and for breakers kept in a ``breaker_storage=`` of
yours (openings found there that other processes sharing it made).

A breaker shared through Redis opens once for the whole fleet: the opening counts in
``breaker_opens`` of the process whose failure (or ``open()``) opened it, and in
``breaker_opens_followed`` of every other process that learnt of it. ``sum()`` of
``resilient_db_breaker_opens_total`` over the fleet counts each opening once (while Redis does
not answer, each process decides alone: its own openings count in its ``breaker_opens``).

A blocked transition is one row whose illegal status move was refused, whichever path refused
it (flush, database trigger, a bulk UPDATE that raised or whose filter skipped the row): the same
count as ``health()["transitions"]["blocked_transitions"]`` and OpenTelemetry's
``resilient_db.transitions.blocked``. Stale transitions are counted apart, never as blocked.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._observability import health as _health
from ._state import renew_after_fork

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Metric

__all__ = ["BREAKER_STATES", "HealthCollector", "MetricsServer", "register", "serve"]

BREAKER_STATES = ("closed", "open", "half-open", "off")
_INSTALL_HINT = (
    "Prometheus metrics need the prometheus_client package: pip install 'resilient-db[prometheus]'"
)

# (counter name in health(), metric name, help)
_SERVICE_COUNTERS = (
    (
        "attempts",
        "resilient_db_attempts",
        "Attempts of units, operations and drop-in connects (each try counts).",
    ),
    ("recovered", "resilient_db_recovered", "Units of work that succeeded after retrying."),
    (
        "gave_up",
        "resilient_db_gave_up",
        "Units of work that gave up: retries ran out or were refused, or a retry met an error "
        "that is not retried.",
    ),
    (
        "breaker_opens",
        "resilient_db_breaker_opens",
        "Times this process opened the circuit breaker (a shared breaker's opening counts in "
        "the process whose failure opened it only: a sum over the fleet counts it once).",
    ),
    (
        "breaker_rejections",
        "resilient_db_breaker_rejections",
        "Calls rejected by an open circuit breaker without touching the network.",
    ),
    (
        "unknown_commits",
        "resilient_db_commit_outcome_unknown",
        "COMMITs whose answer was lost and whose outcome could not be verified.",
    ),
    (
        "verified_commits",
        "resilient_db_commits_verified",
        "COMMITs whose answer was lost and that were verified as committed on the server.",
    ),
    (
        "verified_not_committed",
        "resilient_db_commits_verified_not_committed",
        "COMMITs whose answer was lost and that were verified as not committed on the server "
        "(the unit may be run again).",
    ),
    (
        "response_validation_failures",
        "resilient_db_response_validation_failures",
        "Results of units of work that failed their validate= check.",
    ),
    (
        "pool_timeouts",
        "resilient_db_pool_timeouts",
        "Attempts that waited the whole pool_timeout for a connection of the engine's pool "
        "(every one in use): not retried, no failure of the database for the breaker.",
    ),
    (
        "pool_invalidations",
        "resilient_db_pool_invalidations",
        "Errors whose SQLSTATE ended the use of the engine's connections (57P01, 25006, ...): "
        "the pool replaces every connection made before.",
    ),
    (
        "dead_pooled_connections",
        "resilient_db_dead_pooled_connections",
        "Pooled connections found dead at checkout (their backend ended: a restart, a "
        "failover, pg_terminate_backend) and replaced.",
    ),
    (
        "hot_standby_refused_writes",
        "resilient_db_hot_standby_refused_writes",
        "Writes refused by a hot standby (SQLSTATE 25006 from a server in recovery): a URL "
        "that reaches a standby, or an old primary restarted as one during a failover.",
    ),
    (
        "stale_timeline_refusals",
        "resilient_db_stale_timeline_refusals",
        "Connections refused (new ones at connect, pooled ones at checkout) because their "
        "server, a primary, is on a timeline of its cluster below one seen before: an old "
        "primary back as a primary after a failover.",
    ),
    (
        "stale_timeline_refusals_fleet",
        "resilient_db_stale_timeline_refusals_fleet",
        "Of the connections refused as an old primary's, those refused by a timeline another "
        "process of the fleet saw (shared through Redis), not this engine.",
    ),
)
_TRANSITION_COUNTERS = (
    (
        "blocked_transitions",
        "resilient_db_transitions_blocked",
        "Rows whose illegal status move was blocked (one per row, every path; bulk UPDATE "
        "filter mode included).",
    ),
    (
        "stale_transitions",
        "resilient_db_transitions_stale",
        "Status transitions refused because another transaction had moved the row.",
    ),
    (
        "bulk_rows_filtered",
        "resilient_db_transition_rows_filtered",
        "Of the blocked transitions, rows an ORM bulk UPDATE left unchanged (filter mode).",
    ),
    ("bypasses", "resilient_db_transition_bypasses", "Audited bypasses of the transition guard."),
    (
        "connections_without_triggers",
        "resilient_db_connections_without_triggers",
        "New connections whose session_replication_role is replica (set for the role or the "
        "database): no ordinary trigger fires there, the transition trigger's included.",
    ),
)


def _prometheus_core() -> Any:
    try:
        return importlib.import_module("prometheus_client.core")
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc


class HealthCollector:
    """A Prometheus collector exporting :func:`resilient_db.health` (read at every scrape).

    ``health`` is injectable (a function returning the same shape), for tests and for
    exporting another process's figures. Register it with a ``CollectorRegistry``.
    """

    def __init__(self, health: Callable[[], Mapping[str, Any]] = _health) -> None:
        if not callable(health):
            raise TypeError(
                "HealthCollector(health=...) takes a function returning the health report "
                f"(resilient_db.health, say), got {type(health).__name__}"
            )
        self._core = _prometheus_core()
        self._health = health

    def describe(self) -> list[Metric]:
        """The metric families (their names are fixed; the services in their labels are
        known at scrape time): a registry refuses a second collector of the same names."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        core = self._core
        snapshot = self._health()
        services: dict[str, Any] = snapshot.get("services", {})
        families = {
            key: core.CounterMetricFamily(name, text, labels=["service"])
            for key, name, text in _SERVICE_COUNTERS
        }
        retries = core.CounterMetricFamily(
            "resilient_db_retries",
            "Retries of units of work, by the class of the error (conflict, unavailable, "
            "disconnect).",
            labels=["service", "class"],
        )
        state = core.GaugeMetricFamily(
            "resilient_db_breaker_state",
            "Circuit breaker state per service: 1 for the current state, 0 for the others.",
            labels=["service", "state"],
        )
        by_hand = core.GaugeMetricFamily(
            "resilient_db_breaker_by_hand",
            "1 while the circuit breaker's opening in force (open, or half-open after it) was "
            "made by hand (open_breaker(), resilient-db breaker open), else 0; the reason is "
            "in health().",
            labels=["service"],
        )
        shared = core.GaugeMetricFamily(
            "resilient_db_breaker_shared",
            "1 while the circuit breaker is shared with other processes through Redis, 0 while "
            "Redis does not answer and this process decides alone.",
            labels=["service"],
        )
        available = core.GaugeMetricFamily(
            "resilient_db_retry_budget_available",
            "Retries the retry budget would pay for now (fleet-wide when shared).",
            labels=["service"],
        )
        exhausted = core.CounterMetricFamily(
            "resilient_db_retry_budget_exhausted",
            "Units of work that gave up at once because the retry budget was spent.",
            labels=["service"],
        )
        followed = core.CounterMetricFamily(
            "resilient_db_breaker_opens_followed",
            "Openings of a circuit breaker shared through Redis (or a breaker_storage= of "
            "yours) that other processes made and this process followed (not in "
            "resilient_db_breaker_opens_total).",
            labels=["service"],
        )
        budget_shared = core.GaugeMetricFamily(
            "resilient_db_retry_budget_shared",
            "1 while the retry budget is counted fleet-wide through Redis, else 0.",
            labels=["service"],
        )
        for service, entry in sorted(services.items()):
            counters: dict[str, Any] = entry.get("counters") or {}
            for key, family in families.items():
                family.add_metric([service], float(counters.get(key, 0)))
            for outcome, n in sorted((counters.get("retries_by_class") or {}).items()):
                retries.add_metric([service, outcome], float(n))
            breaker = entry.get("breaker")
            if breaker is not None:
                current = breaker.get("state")
                for name in BREAKER_STATES:
                    state.add_metric([service, name], 1.0 if current == name else 0.0)
                by_hand.add_metric([service], 1.0 if breaker.get("by_hand") else 0.0)
                if breaker.get("shared") is not None:
                    up = breaker["shared"].get("connected")
                    shared.add_metric([service], 1.0 if up else 0.0)
                    n = breaker["shared"].get("opens_followed", 0)
                    followed.add_metric([service], float(n))
                elif breaker.get("storage") is not None:  # a breaker_storage= of yours
                    n = breaker["storage"].get("opens_followed", 0)
                    followed.add_metric([service], float(n))
            budget = entry.get("budget")
            if budget is not None and "available" in budget:
                available.add_metric([service], float(budget["available"]))
                exhausted.add_metric([service], float(budget.get("exhausted", 0)))
                budget_shared.add_metric([service], 1.0 if budget.get("scope") == "fleet" else 0.0)
        yield families["attempts"]
        yield retries
        yield from (families[k] for k, _, _ in _SERVICE_COUNTERS if k != "attempts")
        yield state
        yield by_hand
        yield shared
        yield followed
        yield available
        yield exhausted
        yield budget_shared
        transitions: dict[str, Any] = snapshot.get("transitions", {})
        for key, name, text in _TRANSITION_COUNTERS:
            yield core.CounterMetricFamily(name, text, value=float(transitions.get(key, 0)))
        yield core.GaugeMetricFamily(
            "resilient_db_healthy",
            "1 when no circuit breaker is open, else 0.",
            value=1.0 if snapshot.get("healthy", True) else 0.0,
        )


#: the collector registered with each registry (a registry is scraped once per collector)
_REGISTERED: weakref.WeakKeyDictionary[Any, HealthCollector] = weakref.WeakKeyDictionary()
_REGISTER_LOCK = threading.Lock()
renew_after_fork(globals(), "_REGISTER_LOCK")


def register(registry: Any = None) -> HealthCollector:
    """Register a :class:`HealthCollector` with ``registry`` (default: prometheus_client's
    global ``REGISTRY``) and return it. Idempotent: registered again, the same collector is
    returned (and registered again if the application unregistered it); another collector of
    the same metrics is refused by the registry."""
    if registry is None:
        registry = _prometheus_core().REGISTRY  # (the hint when prometheus_client is missing)
    elif not callable(getattr(registry, "register", None)):
        raise TypeError(
            "register() takes a prometheus_client CollectorRegistry (or None for the default "
            f"REGISTRY), got {type(registry).__name__}"
        )
    with _REGISTER_LOCK:
        collector = _REGISTERED.get(registry)
        if collector is not None:
            # registered again if the application unregistered it; prometheus_client's
            # DuplicateTimeseries (a ValueError) when it is still registered
            with contextlib.suppress(ValueError):
                registry.register(collector)
            return collector
        collector = HealthCollector()
        registry.register(collector)
        _REGISTERED[registry] = collector
    return collector


@dataclass
class MetricsServer:
    """An HTTP endpoint serving the metrics; :meth:`close` stops it."""

    url: str
    registry: CollectorRegistry
    _httpd: Any
    _thread: Any

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


_MAX_PORT = 65535


def serve(port: int, *, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve the metrics at ``http://addr:port/metrics`` from a background thread, with a
    registry of their own (``port=0`` picks a free port). A port that is no whole number
    from 0 to 65535, or an ``addr`` that is no non-empty string (None would listen on every
    interface), is refused with ``TypeError``/``ValueError`` before anything listens; one it
    can't listen on (a port in use, an address not of this host) raises ``OSError`` naming
    ``addr:port``. ``url`` writes an IPv6 address in brackets (``http://[::1]:9464/metrics``)."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"serve() takes a port number (an int, 0 for a free one), got {port!r}")
    if not 0 <= port <= _MAX_PORT:
        raise ValueError(f"serve() takes a port from 0 to {_MAX_PORT} (0: a free one), got {port}")
    if not isinstance(addr, str) or not addr.strip():
        raise (ValueError if isinstance(addr, str) else TypeError)(
            "serve(addr=...) takes the address to listen on ('127.0.0.1', the default; "
            f"'0.0.0.0' for every interface), got {addr!r}"
        )
    _prometheus_core()
    client = importlib.import_module("prometheus_client")
    registry = client.CollectorRegistry()
    registry.register(HealthCollector())
    try:
        httpd, thread = client.start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:  # (the socket's own says neither the address nor the port)
        where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        raise OSError(exc.errno, f"serve() can't listen on {where}: {exc.strerror or exc}") from exc
    host, bound = httpd.server_address[:2]
    if ":" in host:  # an IPv6 address is written in brackets in a URL
        host = f"[{host}]"
    return MetricsServer(f"http://{host}:{bound}/metrics", registry, httpd, thread)
