"""Everything resilient_db keeps per process, in one place, and the one reset of it.

The parts are owned by their modules (the breaker module makes breakers, observability counts,
the factories register themselves), but they live here so that what a process holds can be read
in one file, registration is idempotent by construction (dictionaries keyed by what they
describe, weak where the key is the user's object), and a test suite can start over with
:func:`reset_state`.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ._internals import engine_of_options

__all__ = [
    "MAX_SERVICES",
    "STATE",
    "State",
    "check_service_room",
    "hooks_of",
    "reset_state",
]

#: Service names are configuration, not data: past this many distinct names in one process a new
#: one is refused (each has a breaker, counters and metric series that are never evicted).
MAX_SERVICES = 1000


class State:
    """The process-wide state. One instance, :data:`STATE`."""

    def __init__(self) -> None:
        # One re-entrant lock for the registries: held for dictionary updates only, never
        # across I/O (breakers and counters have short locks of their own for their numbers).
        self.lock = threading.RLock()
        #: the circuit breaker of each service name
        self.breakers: dict[str, Any] = {}
        #: the counters of each service name
        self.stats: dict[str, Any] = {}
        #: how many times reset_state() ran: a live policy that sees it move looks its
        #: service's breaker, counters and budget up again (see ``Policy.admit``)
        self.generation = 0
        #: factories that follow the environment's configuration (``reload_config``)
        self.default_config_users: weakref.WeakSet[Any] = weakref.WeakSet()
        #: the hooks installed on each engine (one set per engine, shared by its factories and
        #: by its ``execution_options()`` copies: keyed by the engine, see :func:`hooks_of`)
        self.engine_hooks: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        #: which factory made a session: by the class a factory makes (sync: its sessions';
        #: async: their sync sessions'), a weak reference to the factory, which holds the class
        self.factory_by_class: weakref.WeakKeyDictionary[type[Any], weakref.ref[Any]] = (
            weakref.WeakKeyDictionary()
        )
        #: session classes carrying the drop-in connect retry's listeners (``_unit``)
        self.connect_retry_classes: weakref.WeakSet[type[Any]] = weakref.WeakSet()
        #: sessions running a unit of work right now, each with the configuration its attempt
        #: runs under (a plain dict: a unit always takes its session out when it ends, and a
        #: dict's item assignment and pop cost no Python frame)
        self.unit_sessions: dict[Any, Any] = {}
        #: the self-healing hooks (a tuple: read without the lock on every action)
        self.hooks: tuple[Callable[[Any], None], ...] = ()
        #: the transition guard's counters (stable names, for ``health()`` and metrics)
        self.transition_stats: dict[str, int] = dict.fromkeys(
            (
                "blocked_transitions",
                "stale_transitions",
                "bulk_rows_filtered",
                "bypasses",
                "connections_without_triggers",
            ),
            0,
        )
        #: session classes carrying the transition guard's flush listeners ...
        self.guarded_session_classes: weakref.WeakSet[type[Any]] = weakref.WeakSet()
        #: ... and whether they need its bulk-UPDATE listener too (a model with rules exists)
        self.bulk_guard_needed = False
        #: engines carrying the flush guard's compare-and-set listeners
        self.guard_engines: weakref.WeakSet[Any] = weakref.WeakSet()
        #: guarded flushes in progress: what each expects of the rows it updates, by the
        #: Connection of its UPDATEs ...
        self.flush_checks: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        #: ... and those connections, by session (both end with the flush, never reset)
        self.flushing: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
        #: the transaction a session's audited bypass of the transition guard belongs to
        self.bypasses: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        #: the environment's configuration, read once and replaced by ``reload_config``
        self.env_config: Any = None
        #: whether the last ``reload_config`` read a mapping it was given, not ``os.environ``
        self.env_given = False
        #: how many ``reload_config`` calls applied a configuration: a factory made while one
        #: ran compares it with the count when it read its own (see ``register_default_user``)
        self.reloads = 0
        #: ``with_self_healing``'s policies, by (service, use_retry, use_circuit_breaker, config,
        #: explicit config, service left to the default)
        self.wrapper_policies: dict[tuple[Any, ...], Any] = {}
        #: the retry budget of each service name (``SELF_HEALING_RETRY_BUDGET``)
        self.budgets: dict[str, Any] = {}
        #: the links to Redis sharing breakers and budgets, by URL (each has a daemon thread)
        self.fleet_links: dict[str, Any] = {}
        #: the pairs of databases said to share the default service name (see ``_services``;
        #: once per process, kept by ``reset_state``)
        self.databases_said: set[frozenset[Any]] = set()
        #: the engines the work of ``with_self_healing`` operations left to the default
        #: service name began transactions on (see ``_services``)
        self.operation_engines: weakref.WeakSet[Any] = weakref.WeakSet()
        #: what else keeps figures of this process and forgets them in :func:`reset_state`
        #: (the dashboard's recorder, of the optional web extra, which this module can't import)
        self.clear_on_reset: weakref.WeakSet[Any] = weakref.WeakSet()


STATE = State()


def hooks_of(engine: Any) -> Any:
    """The hooks installed on ``engine`` (``_unit.EngineHooks``), or None: for an
    ``execution_options()`` copy of an engine, the engine's, which act on the pool and dialect
    the copy shares (see ``_unit.hooks_for``)."""
    return STATE.engine_hooks.get(engine_of_options(engine))


#: modules' own locks, renewed in a forked child: (the module's globals, the name, a factory)
_MODULE_LOCKS: list[tuple[dict[str, Any], str, Callable[[], Any]]] = []


def renew_after_fork(
    namespace: dict[str, Any], name: str, factory: Callable[[], Any] = threading.Lock
) -> None:
    """Have ``namespace[name]`` (a module's lock, taken only in ``with`` blocks, which release
    the lock they took) replaced by ``factory()`` in a forked child: held by another thread of
    the parent when it forked, it would stay held for good there."""
    _MODULE_LOCKS.append((namespace, name, factory))


def _renew_lock_in_child() -> None:
    """In a forked child (gunicorn forks its workers after import): a lock held by another
    thread of the parent when it forked stays held for good here (that thread does not exist),
    and the child's first factory, ``health()`` or ``reload_config()`` would wait forever. Such
    a lock is replaced; one free, or held by the thread that forked (it goes on here and
    releases it itself), is kept."""
    lock = STATE.lock
    if lock.acquire(blocking=False):  # free, or this thread's (re-entrant)
        lock.release()
    else:
        STATE.lock = threading.RLock()
    for stats in list(STATE.stats.values()):  # each service's counters have a short lock too
        stats.after_fork_in_child()
    engines = list(STATE.engine_hooks.items())
    for _, hooks in engines:  # each engine's (commit protocol, lines)
        hooks.after_fork_in_child()
    for namespace, name, factory in _MODULE_LOCKS:
        namespace[name] = factory()
    # then each engine's pool (see EngineHooks.new_pool_in_child), every lock renewed first
    for engine, hooks in engines:
        hooks.new_pool_in_child(engine)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock_in_child)


def check_service_room(service: str, known: Any) -> None:
    """Raise ValueError when ``service`` would be one distinct name too many (caller holds
    ``STATE.lock``; ``known`` is the registry the name would be added to)."""
    if service not in known and len(known) >= MAX_SERVICES:
        raise ValueError(
            f"service {service!r} would be distinct service name number {MAX_SERVICES + 1} in "
            f"this process; at most {MAX_SERVICES} are allowed. Service names are "
            "configuration (one per database or dependency), not data: don't make one per "
            "tenant, user or request"
        )


def reset_state() -> None:
    """Start over, for test suites (as between tests): every circuit breaker is closed with no
    failures counted and forgotten (a factory made afterwards gets a new one, with the storage
    it asks for), every counter and the transition guard's counts are zero, the wrapper's
    cached policies are dropped, retry budgets are forgotten and the links to Redis closed (their
    background threads stop; a factory made afterwards opens a new one), and the dashboard's
    recent events and time series are cleared. State shared through
    Redis is left as it is: other processes share it; so is a ``breaker_storage=`` that they
    may share (any but pybreaker's in-process ``CircuitMemoryStorage``). Factories, their
    engines' hooks (the transition guard's listeners included), flushes in progress and the
    configuration stay as they are: they belong to objects that are still alive. A live
    factory takes its service's new breaker, counters and budget at its next unit of work, as
    a factory made then would (``health()`` shows what it does after the reset, not what it
    did before).
    """
    from ._classify import debug_failure  # noqa: PLC0415 - _classify's imports reach this module

    with STATE.lock:
        STATE.generation += 1
        breakers = list(STATE.breakers.values())
        STATE.breakers.clear()
        STATE.budgets.clear()
        links = list(STATE.fleet_links.values())
        STATE.fleet_links.clear()
        for stats in STATE.stats.values():
            stats.reset()  # zero: a live factory keeps counting on its own object
        STATE.stats.clear()  # and forgotten, as the breakers: service names start over
        for name in STATE.transition_stats:
            STATE.transition_stats[name] = 0
        STATE.wrapper_policies.clear()
        keepers = list(STATE.clear_on_reset)
    for link in links:
        try:
            link.close()
        except Exception:
            debug_failure(logging.getLogger("resilient_db.fleet"), "could not close %r", link)
    for breaker in breakers:
        try:
            breaker.reset()
        except Exception:  # a shared store that is unreachable: forgotten all the same
            debug_failure(
                logging.getLogger("resilient_db.breaker"),
                "could not reset the breaker of %s",
                breaker.service,
            )
    for keeper in keepers:  # last: the dashboard keeps no event of the reset itself
        keeper.clear()
