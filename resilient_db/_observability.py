"""Logging with the plan's ``[SELF-HEAL]`` prefix, and the counters behind ``health()``.

Messages are event-style with structured ``extra=`` fields; they never carry a password, a DSN
or a bound parameter: only service names, SQLSTATEs, outcome classes, counts and delays.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, TypedDict, TypeVar, final

from ._classify import debug_failure, log_quietly, sqlstate_of
from ._config import Config
from ._errors import utf8_problem
from ._state import STATE, check_service_room

__all__ = [
    "PREFIX",
    "BreakerHealth",
    "BudgetHealth",
    "FleetBudgetHealth",
    "FleetTimelineHealth",
    "HealthReport",
    "LineLimit",
    "SelfHealEvent",
    "SelfHealHook",
    "ServiceCounters",
    "ServiceHealth",
    "ServiceStats",
    "SharedBreakerHealth",
    "StorageBreakerHealth",
    "TransitionCounters",
    "UnavailableHealth",
    "add_hook",
    "emit",
    "emit_line",
    "health",
    "remove_hook",
    "sqlstate_label",
    "stats_for",
]

PREFIX = "[SELF-HEAL] "
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# A library leaves output to the application's logging configuration (no "last resort" printing
# to stderr when there is none): configure the "resilient_db" logger to see [SELF-HEAL] lines.
logging.getLogger("resilient_db").addHandler(logging.NullHandler())

log_retry = logging.getLogger("resilient_db.retry")
log_breaker = logging.getLogger("resilient_db.breaker")
log_session = logging.getLogger("resilient_db.session")
log_transitions = logging.getLogger("resilient_db.transitions")


@dataclass(frozen=True)
class SelfHealEvent:
    """One self-healing action, as every hook sees it.

    ``name`` is stable: every name, with its line, level and fields, is in the table of
    self-healing events in docs/observability.md (the reference of the README's section
    "Observability"; the one list kept complete: a test holds it to the names the code
    emits). ``fields`` are the same structured values the log record carries
    (``extra["self_heal"]``), ``event`` (the name) and ``service`` (None when said under no
    service) among them, never a password, a DSN or a bound parameter; ``message`` is the log
    line without its ``[SELF-HEAL]`` prefix.
    """

    name: str
    service: str | None
    level: int
    message: str
    fields: Mapping[str, Any]


SelfHealHook = Callable[[SelfHealEvent], None]


def add_hook(hook: SelfHealHook) -> None:
    """Call ``hook(event)`` for every self-healing action (once, however often it is added).

    Hooks see every action while self-healing is enabled, whatever the logging switches say
    (those govern the ``[SELF-HEAL]`` log lines only). A hook that raises is logged at DEBUG and
    skipped: instrumentation never breaks a unit of work.

    Hooks are called synchronously, in the thread of the action, with one positional argument.
    Refused with ``TypeError``: an ``async def`` hook (also a ``functools.partial`` of one, or an
    object whose ``__call__`` is one), whose coroutine nobody would await, so it would see no
    event; an async generator function likewise; and a hook that can't be called with the event
    alone (it takes no argument, or needs more), which would fail at every event. A callable
    whose signature can't be read is taken as it is.
    """
    if not callable(hook):
        raise TypeError(f"add_hook() needs a callable, got {type(hook).__name__}")
    _refuse_unfit_hook(hook)
    with STATE.lock:
        if hook not in STATE.hooks:
            STATE.hooks = (*STATE.hooks, hook)


def _is_async(hook: object) -> bool:
    """Whether calling ``hook`` gives a coroutine or an async generator instead of running it."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    call = type(hook).__call__  # an object's own: async if it is declared so
    return any(
        inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) for fn in (hook, call)
    )


def _refuse_unfit_hook(hook: object) -> None:
    name = getattr(hook, "__qualname__", None) or repr(hook)
    if _is_async(hook):
        raise TypeError(
            f"add_hook() can't use {name}: it is async, and hooks are called synchronously "
            "(what calling it returns would never be awaited, so it would see no event); pass "
            "a plain function, which may hand the event to your event loop (e.g. with "
            "loop.call_soon_threadsafe)"
        )
    try:
        signature = inspect.signature(hook)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # some builtins and extension types: taken as they are
        return
    try:
        signature.bind(None)
    except TypeError as exc:
        raise TypeError(
            f"add_hook() can't use {name}{signature}: hooks are called as hook(event), with "
            f"the event as their one argument, and it can't be called that way ({exc})"
        ) from None


def remove_hook(hook: SelfHealHook) -> None:
    """Stop calling ``hook`` (no error if it was not added)."""
    with STATE.lock:
        STATE.hooks = tuple(h for h in STATE.hooks if h != hook)


def emit(
    config: Config,
    logger: logging.Logger,
    level: int,
    msg: str,
    *args: Any,
    log: bool = True,
    **extra: Any,
) -> None:
    """The one path of every self-healing action: to the hooks, and to the ``[SELF-HEAL]`` log
    line if logging is on and ``level`` reaches the configured level.

    ``extra["event"]`` names the action; the other ``extra`` values are its fields, among them
    ``service`` (None when not given: every event has it). ``log``
    False: to the hooks only (an action whose line is rate-limited still reaches them all).
    """
    _emit(config, logger, level, msg, args=args, extra=extra, log=log, hooks=True)


def emit_line(
    config: Config, logger: logging.Logger, level: int, msg: str, *args: Any, **extra: Any
) -> None:
    """The ``[SELF-HEAL]`` line of an action, not its hook event: for an action whose line
    comes before the action itself (a retry's, before its backoff), whose event
    :func:`emit` sends with ``log=False`` when it happens (the breaker admitted the retry)."""
    _emit(config, logger, level, msg, args=args, extra=extra, log=True, hooks=False)


def _emit(
    config: Config,
    logger: logging.Logger,
    level: int,
    msg: str,
    *,
    args: tuple[Any, ...],
    extra: dict[str, Any],
    log: bool,
    hooks: bool,
) -> None:
    to_hooks = STATE.hooks if config.enabled and hooks else ()
    to_log = (
        log
        and config.logging_on
        and level >= _LEVELS[config.log_level]
        and logger.isEnabledFor(level)
    )
    if not to_hooks and not to_log:
        return
    # Values may come from outside the program (a database error's text, a row's state, a
    # reason): control characters are escaped, so no value can start a fake log line, and long
    # text is cut, so no value can make a line (or an event kept by a hook) megabytes long.
    args = tuple(_escaped(a) for a in args)
    extra = {k: _escaped(v) for k, v in extra.items()}
    # every event has its ``service`` field, None for one said under no service (the guard's,
    # ``install_commit_markers()``'s own, ...), as its ``.service`` is: a hook or a log filter
    # reads ``fields["service"]`` of any event
    extra.setdefault("service", None)
    if to_hooks:
        event = SelfHealEvent(
            name=str(extra.get("event", "self_heal")),
            service=extra.get("service"),
            level=level,
            message=msg % args if args else msg,
            fields=MappingProxyType(extra),
        )
        for hook in to_hooks:
            try:
                hook(event)
            except Exception:
                debug_failure(
                    logging.getLogger("resilient_db"), "self-healing hook %r failed", hook
                )
    if to_log:
        # the application's handlers and filters run in there: one that raises loses the
        # line, never the unit. The record gets a copy of the fields: a filter that changes
        # its record's changes neither the event's (read-only to the hooks, which may keep it)
        log_quietly(
            logger,
            level,
            PREFIX + msg,
            *args,
            extra={"self_heal": dict(extra) if to_hooks else extra},
        )


#: seconds between two log lines of one repeated warning (:class:`LineLimit`); the hooks see
#: every occurrence
WARNING_LINE_PERIOD = 10.0


def retries_text(count: int) -> str:
    """``"1 retry"``, ``"2 retries"``: how many retries a line says a unit took."""
    return "1 retry" if count == 1 else f"{count} retries"


def more_since(unlogged: int, extra: str = "") -> str:
    """The end of a rate-limited line (see :class:`LineLimit`): `` (N more since the last
    line)``, ``extra`` added inside the brackets; nothing when none was left unlogged (the
    first line of a kind, or one that folds none)."""
    if unlogged == 0:
        return ""
    return f" ({unlogged} more since the last line{extra})"


class LineLimit:
    """Rate-limits the log lines of a warning that an outage repeats (one per failing unit
    would be a log storm): at most one line per ``period`` seconds per key, each saying how
    many were left unlogged since the last. Pass ``log=`` of :meth:`take` to :func:`emit`, so
    that the hooks still see every occurrence. Only failure paths use it."""

    def __init__(
        self, period: float = WARNING_LINE_PERIOD, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[Any, float] = {}
        self._unlogged: Counter[Any] = Counter()

    def take(self, key: Any = None) -> tuple[bool, int]:
        """(log this occurrence's line, occurrences left unlogged since the last line)."""
        with self._lock:
            now = self._clock()
            last = self._last.get(key)
            if last is not None and 0 <= now - last < self.period:  # a clock set back: a line
                self._unlogged[key] += 1
                return False, 0
            if len(self._last) >= _MAX_LIMITED_KEYS and key not in self._last:
                self._last.clear()  # keys come from outside (server addresses): bounded
                self._unlogged.clear()
            self._last[key] = now
            return True, self._unlogged.pop(key, 0)

    def drain(self, key: Any = None) -> int:
        """The occurrences of ``key`` left unlogged since its last line, taken (an episode
        ended: its rest is said now, not in the next episode's first line); the next one is
        logged whenever it comes."""
        with self._lock:
            self._last.pop(key, None)
            return self._unlogged.pop(key, 0)

    def after_fork_in_child(self) -> None:
        """A new lock in a forked child (a thread of the parent may have held it)."""
        self._lock = threading.Lock()

    def restart(self, key: Any = None) -> None:
        """The next occurrence of ``key`` is logged whenever it comes (a new episode began: a
        circuit breaker opened again); the count of those left unlogged is kept for its line."""
        with self._lock:
            self._last.pop(key, None)


_MAX_LIMITED_KEYS = 256


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
}


#: The longest text value an action's log line and fields carry, in characters: longer ones
#: (a client-chosen status of a megabyte, a database error's text) are cut, and marked.
MAX_VALUE_CHARS = 1000
#: the code points log lines escape (a service name may not have one: see _unit)
CONTROL_CODES: Final = frozenset(_CONTROL)


def unfit_label(text: str, limit: int) -> str | None:
    """What keeps ``text`` (a service name, an operator's reason) from going as it is into
    log lines, metrics labels and Redis, which carry it by value: ``"'x' is not valid UTF-8
    text (...)"``, ``"... has a control character (...)"``, ``"... is N characters long; at
    most LIMIT are allowed"`` (the text quoted, cut when long); None when nothing does. A lone
    surrogate (what ``os.environ`` gives for a byte that is not UTF-8) can't be sent anywhere;
    log lines escape a control character and cut a long value, health() and metrics keep them:
    two spellings of one name."""
    encoding = utf8_problem(text)
    if encoding is not None:
        return f"{text!r} is not valid UTF-8 text ({encoding})"
    control = next((c for c in text if ord(c) in CONTROL_CODES), None)
    if control is not None:
        return f"{text!r} has a control character ({control!r})"
    if len(text) > limit:
        return f"{text[:40]!r}... is {len(text)} characters long; at most {limit} are allowed"
    return None


def truncated(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked with how many were left off (``"…(+N
    characters)"``); as it is when it fits."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} characters)"


def _escaped(value: Any) -> Any:
    """``value`` cut to :data:`MAX_VALUE_CHARS` (marked) and with control characters (line
    breaks included) escaped, if it is text."""
    if isinstance(value, str):
        return controls_escaped(truncated(value, MAX_VALUE_CHARS))
    return value


def controls_escaped(text: str) -> str:
    """``text`` with its control characters (line breaks, a terminal's escape) written as
    ``\\n``, ``\\x1b``, ... as log lines have them: for a line put together from values from
    outside (another client's in Redis), which could otherwise start a line of its own."""
    return text.translate(_CONTROL)


def sqlstate_label(exc: BaseException | None) -> str:
    """The SQLSTATE of ``exc`` for a log line, or ``"none"`` (a driver-level disconnect)."""
    if exc is None:
        return "none"
    return sqlstate_of(exc) or "none"


@dataclass
class ServiceStats:
    """Counters of one service. Stable names; read with :meth:`snapshot`."""

    service: str
    attempts: int = 0
    retries: int = 0
    recovered: int = 0
    gave_up: int = 0
    breaker_opens: int = 0
    breaker_rejections: int = 0
    unknown_commits: int = 0
    verified_commits: int = 0
    verified_not_committed: int = 0
    response_validation_failures: int = 0
    pool_timeouts: int = 0
    pool_invalidations: int = 0
    dead_pooled_connections: int = 0
    hot_standby_refused_writes: int = 0
    stale_timeline_refusals: int = 0
    stale_timeline_refusals_fleet: int = 0
    retries_by_class: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: int = 1) -> None:
        # A short lock for an integer add: never held across I/O.
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def after_fork_in_child(self) -> None:
        """In a forked child: the counters' lock, taken by another thread of the parent when
        it forked, would stay taken for good here (its next add would wait forever): renewed
        then. (Never held by the forking thread across the fork: it guards one addition.)"""
        if self._lock.acquire(blocking=False):
            self._lock.release()
        else:
            self._lock = threading.Lock()

    def add_attempt(self) -> None:
        """One attempt (every unit's path: no name lookups)."""
        with self._lock:
            self.attempts += 1

    def add_retry(self, outcome: str) -> None:
        with self._lock:
            self.retries += 1
            self.retries_by_class[outcome] += 1

    def snapshot(self) -> ServiceCounters:
        with self._lock:
            return {
                "attempts": self.attempts,
                "retries": self.retries,
                "recovered": self.recovered,
                "gave_up": self.gave_up,
                "breaker_opens": self.breaker_opens,
                "breaker_rejections": self.breaker_rejections,
                "unknown_commits": self.unknown_commits,
                "verified_commits": self.verified_commits,
                "verified_not_committed": self.verified_not_committed,
                "response_validation_failures": self.response_validation_failures,
                "pool_timeouts": self.pool_timeouts,
                "pool_invalidations": self.pool_invalidations,
                "dead_pooled_connections": self.dead_pooled_connections,
                "hot_standby_refused_writes": self.hot_standby_refused_writes,
                "stale_timeline_refusals": self.stale_timeline_refusals,
                "stale_timeline_refusals_fleet": self.stale_timeline_refusals_fleet,
                "retries_by_class": dict(self.retries_by_class),
            }

    def reset(self) -> None:
        with self._lock:
            for name in (
                "attempts",
                "retries",
                "recovered",
                "gave_up",
                "breaker_opens",
                "breaker_rejections",
                "unknown_commits",
                "verified_commits",
                "verified_not_committed",
                "response_validation_failures",
                "pool_timeouts",
                "pool_invalidations",
                "dead_pooled_connections",
                "hot_standby_refused_writes",
                "stale_timeline_refusals",
                "stale_timeline_refusals_fleet",
            ):
                setattr(self, name, 0)
            self.retries_by_class.clear()


# -- the shape of health() -------------------------------------------------------------------
# TypedDicts: health() stays a function returning a plain dict (a TypedDict is one at run time),
# which a type checker now reads key by key. A key present only sometimes is in a ``total=False``
# subclass (``NotRequired`` is typing's from Python 3.11 only). tests/test_health_types.py holds
# them to what a real health() returns, key by key.


class ServiceCounters(TypedDict):
    """health()'s ``counters`` of a service (see :func:`health` for each)."""

    attempts: int
    retries: int
    recovered: int
    gave_up: int
    breaker_opens: int
    breaker_rejections: int
    unknown_commits: int
    verified_commits: int
    verified_not_committed: int
    response_validation_failures: int
    pool_timeouts: int
    pool_invalidations: int
    dead_pooled_connections: int
    hot_standby_refused_writes: int
    stale_timeline_refusals: int
    stale_timeline_refusals_fleet: int
    #: retries by the class of their error (``"conflict"``, ``"unavailable"``,
    #: ``"disconnect"``, ...): only the classes retried so far
    retries_by_class: dict[str, int]


class FleetTimelineHealth(TypedDict):
    """One cluster's timeline the fleet saw (``shared["fleet_timelines"][system_identifier]``)."""

    timeline: int
    server: str
    #: Redis's time it was recorded (seconds since the epoch); None when the message it came
    #: by did not say (one of an earlier release's process)
    since: float | None


class SharedBreakerHealth(TypedDict):
    """A breaker shared through Redis: its ``shared`` entry."""

    redis: str  # the URL, its password masked
    connected: bool
    problem: str | None
    fleet_opens: int
    opened_here: int
    opens_followed: int
    fleet_timelines: dict[str, FleetTimelineHealth]


class StorageBreakerHealth(TypedDict):
    """A breaker kept in a ``breaker_storage=`` of yours: its ``storage`` entry."""

    kind: str  # the storage's class name (``CircuitRedisStorage``)
    #: openings found in the storage that other processes sharing it made, followed here (not
    #: in ``counters.breaker_opens``), as a breaker shared through Redis counts them
    opens_followed: int


class _BreakerHealthKeys(TypedDict):
    state: Literal["closed", "open", "half-open", "off"]
    failures: int
    failure_threshold: int
    reset_timeout: float
    by_hand: bool
    reason: str | None


class BreakerHealth(_BreakerHealthKeys, total=False):
    """health()'s ``breaker`` of a service; ``retry_after`` only while ``open``, ``shared``
    only for a breaker shared through Redis, ``storage`` only for one kept in a
    ``breaker_storage=`` of yours."""

    retry_after: float
    shared: SharedBreakerHealth
    storage: StorageBreakerHealth


@final
class UnavailableHealth(TypedDict):
    """A ``breaker`` (or ``budget``) whose state could not be read (a ``breaker_storage=``
    that fails to answer): ``error`` is the exception's class name, never its text."""

    state: Literal["unknown"]
    error: str


class FleetBudgetHealth(TypedDict):
    """A shared retry budget's fleet-wide figures, as Redis last reported them."""

    first_attempts: int
    retries: int
    floor_tokens: float
    available: float


class _BudgetHealthKeys(TypedDict):
    ratio: float
    floor_per_second: int
    window_seconds: int
    scope: Literal["process", "fleet"]
    first_attempts: int
    retries: int
    available: float
    granted: int
    exhausted: int


@final
class BudgetHealth(_BudgetHealthKeys, total=False):
    """health()'s ``budget`` of a service; ``redis`` and ``problem`` only when configured to be
    shared, ``fleet`` only while the fleet's figures are recent."""

    redis: str
    problem: str | None
    fleet: FleetBudgetHealth


class ServiceHealth(TypedDict):
    """One service of health()'s ``services``."""

    breaker: BreakerHealth | UnavailableHealth | None
    budget: BudgetHealth | UnavailableHealth | None
    counters: ServiceCounters


class TransitionCounters(TypedDict):
    """health()'s ``transitions`` (process-wide)."""

    blocked_transitions: int
    stale_transitions: int
    bulk_rows_filtered: int
    bypasses: int
    connections_without_triggers: int


class HealthReport(TypedDict):
    """What :func:`health` returns."""

    healthy: bool
    services: dict[str, ServiceHealth]
    transitions: TransitionCounters


def stats_for(service: str) -> ServiceStats:
    """The counters of ``service`` (created on first use)."""
    found: ServiceStats | None = STATE.stats.get(service)
    if found is not None:
        return found
    with STATE.lock:
        check_service_room(service, STATE.stats)
        made: ServiceStats = STATE.stats.setdefault(service, ServiceStats(service))
        return made


def health() -> HealthReport:
    """Breaker state and counters of every service seen so far, and the transition guard's.

    ``{"healthy": bool, "services": {name: {"breaker": {...} | None, "budget": {...} | None,
    "counters": {...}}}, "transitions": {"blocked_transitions": n, ...}}``, typed as
    :class:`HealthReport` (a plain dict at run time; its parts are the other ``...Health``
    and ``...Counters`` types of this module, exported by the package); ``healthy`` is False
    while any breaker is open. ``breaker`` is ``{"state": "off", ...}`` while every live user of
    the service has it switched off by its configuration (from the start, or by a reload), None
    for a service whose users all opted out (``use_circuit_breaker=False``). A breaker shared
    through Redis has a ``shared`` entry:
    ``redis`` (the URL with its password masked), ``connected`` (whether it answers),
    ``problem`` (why it does not, in a few words without the password: the redis client's
    objection to the URL, or the error of the last command or connection attempt; None while it
    answers or before its first attempt has ended), ``fleet_opens``, ``opened_here`` and
    ``opens_followed`` (openings fleet-wide; openings of the shared breaker this process
    caused, so that their sum over the fleet is ``fleet_opens``; and openings other processes
    made, followed here: ``counters.breaker_opens`` counts only those made here, including
    those made alone while Redis did not answer, so that a sum over the fleet counts each
    opening once); a breaker kept in a ``breaker_storage=`` of yours has a ``storage`` entry:
    ``kind`` (the storage's class name) and ``opens_followed`` (openings found in the storage
    that other processes sharing it made, as above); ``budget`` is the retry budget
    (``SELF_HEALING_RETRY_BUDGET``), None without one; configured to be shared, it has
    ``redis`` and ``problem`` too (its ``scope`` is "process" while that Redis can't be used).
    Nothing here talks to Redis: shared figures are the last ones this process heard.

    A service's ``counters``: ``attempts``, ``retries`` (and ``retries_by_class``),
    ``recovered``, ``gave_up``, ``breaker_opens``, ``breaker_rejections``, ``unknown_commits``,
    ``verified_commits`` (lost COMMIT answers verified as committed), ``verified_not_committed``
    (lost COMMIT answers verified as not committed: the unit may be run again),
    ``response_validation_failures`` (results that failed their
    ``validate=`` check: each raised ``ResponseValidationError`` counts once), and
    ``pool_timeouts`` (attempts that found every connection of the engine's pool in use for its
    whole ``pool_timeout``: SQLAlchemy's pool ``TimeoutError``, never retried, no failure of the
    database for the breaker), ``pool_invalidations`` (errors whose SQLSTATE ended the use of the
    engine's connections, which SQLAlchemy does not take for a lost connection: 57P01 after a
    shutdown or ``pg_terminate_backend``, 25006 from a demoted primary; the pool replaces every
    connection made before: the ``Replacing the pooled connections`` line),
    ``dead_pooled_connections`` (pooled connections found dead at checkout, their backend ended
    by a restart, a failover or ``pg_terminate_backend``, and replaced: the ``Discarded a dead
    pooled connection`` line), ``hot_standby_refused_writes`` (writes a hot standby refused with
    25006: the ``Write refused by a hot standby`` warning, counted for each refusal, its line
    rate-limited; not one the server, asked, says it takes writes for: the ``unsure by whom``
    line), ``stale_timeline_refusals`` (connections refused, new ones at connect and
    pooled ones at checkout, because their server, a primary, is on a timeline of its cluster
    below one seen before: an old primary back as a primary after a failover; the ``Refused a
    connection to an old primary`` error, counted for each, its line rate-limited), and of
    those ``stale_timeline_refusals_fleet``, refused by a timeline another process of the fleet
    saw (shared through ``SELF_HEALING_REDIS_URL``), not this engine.

    ``transitions`` (process-wide): ``blocked_transitions`` counts rows whose illegal status move
    was refused, one per row whatever the path (flush, database trigger, a bulk UPDATE that
    raised, or one whose filter left the row unchanged); ``stale_transitions`` moves refused
    because another transaction had moved the row (not among the blocked);
    ``bulk_rows_filtered`` the blocked rows a bulk UPDATE's filter left unchanged;
    ``bypasses`` audited bypasses of the guard; ``connections_without_triggers`` new
    connections whose ``session_replication_role`` was ``replica`` (no trigger fires there,
    the guard's included: the ``triggers_off`` warning). The Prometheus collector and the
    OpenTelemetry hook count the same things (``resilient_db_transitions_blocked_total`` and
    ``resilient_db.transitions.blocked``, ``..._response_validation_failures_total`` and
    ``resilient_db.response_validation.failures``).
    """
    # Local imports: these modules import this one.
    from ._breaker import breakers  # noqa: PLC0415
    from ._budget import budgets  # noqa: PLC0415
    from ._registry import live_policies  # noqa: PLC0415
    from .transitions._report import transition_stats  # noqa: PLC0415

    with STATE.lock:
        names = set(STATE.stats)
    all_breakers = breakers()
    all_budgets = budgets()
    names.update(all_breakers, all_budgets)
    # services whose users all had the breaker switched off by their configuration from the
    # start (no breaker was ever made): "off", as a reload switching it off shows
    made_off: dict[str, Config] = {}
    for policy in live_policies():
        if policy.use_circuit_breaker and not policy.config.breaker_on:
            made_off.setdefault(policy.service, policy.config)
    services: dict[str, ServiceHealth] = {}
    for name in sorted(names):
        breaker = all_breakers.get(name)
        budget = all_budgets.get(name)
        off = made_off.get(name)
        services[name] = {
            "breaker": _describe(breaker.describe)
            if breaker is not None
            else (None if off is None else switched_off_view(off)),
            "budget": _describe(budget.describe) if budget is not None else None,
            "counters": stats_for(name).snapshot(),
        }
    healthy = all(
        entry["breaker"] is None or entry["breaker"]["state"] != "open"
        for entry in services.values()
    )
    return {"healthy": healthy, "services": services, "transitions": transition_stats()}


def switched_off_view(config: Config) -> BreakerHealth:
    """health()'s view of a breaker switched off by the configuration (``off``: it rejects
    nothing and counts nothing), with the settings it would run with."""
    return {
        "state": "off",
        "failures": 0,
        "failure_threshold": config.failure_threshold,
        "reset_timeout": config.reset_timeout,
        "by_hand": False,
        "reason": None,
    }


_Described = TypeVar("_Described", BreakerHealth, BudgetHealth)


def _describe(describe: Callable[[], _Described]) -> _Described | UnavailableHealth:
    try:
        return describe()
    except Exception as exc:  # a shared breaker store can be unreachable: report, don't fail
        return {"state": "unknown", "error": type(exc).__name__}


def reset_stats() -> None:
    """Zero every counter (for tests and demos; :func:`~resilient_db.reset_state` does more)."""
    with STATE.lock:
        for stats in STATE.stats.values():
            stats.reset()
