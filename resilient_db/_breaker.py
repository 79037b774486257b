"""One circuit breaker per service, on pybreaker's state storage and listener API.

pybreaker's ``CircuitBreaker.call`` holds the breaker's lock for the whole protected call, so
every call through one breaker runs one at a time. Here the protected call runs with no lock at
all: :meth:`Breaker.before_call` decides (a single storage read while closed), the caller runs the
attempt, and :meth:`Breaker.on_success` / :meth:`Breaker.on_failure` record the result. A short
lock guards only the state changes themselves, never database I/O. pybreaker stores the state
(in memory or shared, e.g. Redis) and notifies its listeners of every change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import pybreaker as _pb

from ._config import Config
from ._errors import CircuitOpenError
from ._observability import emit, log_breaker, stats_for
from ._state import STATE, check_service_room

__all__ = ["Breaker", "breaker_for", "breakers"]

CLOSED, OPEN, HALF_OPEN = _pb.STATE_CLOSED, _pb.STATE_OPEN, _pb.STATE_HALF_OPEN
_UTC = timezone.utc


class _LogListener(_pb.CircuitBreakerListener):
    """Logs every state change with the ``[SELF-HEAL]`` prefix and counts openings."""

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        b = self._breaker
        new = new_state.name
        if new == OPEN:
            stats_for(b.service).add("breaker_opens")
            if getattr(old_state, "name", None) == HALF_OPEN:
                why = "a half-open probe failed"
            elif cb.fail_counter:
                why = f"{cb.fail_counter} consecutive failures"
            else:
                why = "an explicit open()"
            emit(
                b.config,
                log_breaker,
                logging.WARNING,
                "Circuit breaker opened: service=%s after %s; rejecting calls for %.1f s",
                b.service,
                why,
                b.config.reset_timeout,
                service=b.service,
                event="breaker_opened",
            )
        elif new == HALF_OPEN:
            emit(
                b.config,
                log_breaker,
                logging.INFO,
                "Circuit breaker half-open: service=%s letting %d probe(s) through",
                b.service,
                b.config.half_open_probes,
                service=b.service,
                event="breaker_half_open",
            )
        elif new == CLOSED and old_state is not None:
            emit(
                b.config,
                log_breaker,
                logging.INFO,
                "Circuit breaker closed: service=%s recovered",
                b.service,
                service=b.service,
                event="breaker_closed",
            )


class Breaker:
    """The circuit breaker of one service.

    ``storage`` is any pybreaker ``CircuitBreakerStorage`` (``CircuitRedisStorage`` shares the
    state between processes); ``listeners`` are pybreaker listeners. ``clock`` gives wall-clock
    seconds (shared storages compare opening times across processes).
    """

    def __init__(
        self,
        service: str,
        config: Config,
        *,
        storage: Any = None,
        listeners: Iterable[Any] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._probes = 0
        self._cb = _pb.CircuitBreaker(
            fail_max=config.failure_threshold,
            reset_timeout=config.reset_timeout,
            success_threshold=config.half_open_probes,
            state_storage=storage,
            name=service,
        )
        self._storage = self._cb._state_storage
        self.storage_given = storage
        self._cb.add_listener(_LogListener(self))
        for listener in listeners:
            self._cb.add_listener(listener)

    # -- configuration ---------------------------------------------------------------------
    def apply_config(self, config: Config) -> None:
        self.config = config
        self._cb.fail_max = config.failure_threshold
        self._cb.reset_timeout = config.reset_timeout
        self._cb.success_threshold = config.half_open_probes

    def add_listener(self, listener: Any) -> None:
        """Register a pybreaker ``CircuitBreakerListener`` (once: again is a no-op)."""
        if listener not in self._cb.listeners:
            self._cb.add_listener(listener)

    # -- the protocol around one attempt ------------------------------------------------
    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` as the storage says."""
        state: str = self._storage.state
        return state

    def before_call(self) -> bool:
        """Admit one attempt or raise :class:`CircuitOpenError` without touching the network.

        Returns True when the attempt is a half-open probe (pass it back to the ``on_*`` calls).
        """
        state = self._storage.state
        if state == CLOSED:
            return False
        if state == OPEN:
            remaining = self._remaining_open()
            if remaining > 0:
                stats_for(self.service).add("breaker_rejections")
                raise CircuitOpenError(self.service, remaining)
            with self._lock:
                if self._storage.state == OPEN:
                    self._probes = 0
                    self._set_state(HALF_OPEN)
        with self._lock:
            if self._storage.state == CLOSED:
                return False
            if self._storage.state == OPEN or self._probes >= self.config.half_open_probes:
                stats_for(self.service).add("breaker_rejections")
                raise CircuitOpenError(self.service, self._retry_after_probe())
            self._probes += 1
            return True

    def on_success(self, probe: bool) -> None:
        """The attempt succeeded."""
        if not probe:
            # Closed: consecutive failures start again from zero. Read before writing so the
            # common case (no failures) writes nothing.
            if self._storage.counter:
                self._storage.reset_counter()
            return
        with self._lock:
            self._probes = max(0, self._probes - 1)
            if self._storage.state != HALF_OPEN:
                return
            self._storage.increment_success_counter()
            if self._storage.success_counter >= self.config.half_open_probes:
                self._set_state(CLOSED)

    def on_failure(self, probe: bool) -> None:
        """The attempt failed with a transient (infrastructure) error."""
        with self._lock:
            if probe:
                self._probes = max(0, self._probes - 1)
            state = self._storage.state
            if state == HALF_OPEN:
                self._open()
                return
            if state == OPEN:
                return
            self._storage.increment_counter()
            if self._storage.counter >= self.config.failure_threshold:
                self._open()

    def on_neutral(self, probe: bool) -> None:
        """The attempt ended with a business error: neither success nor failure."""
        if probe:
            with self._lock:
                self._probes = max(0, self._probes - 1)

    # -- manual control --------------------------------------------------------------------
    def open(self) -> None:
        with self._lock:
            self._open()

    def close(self) -> None:
        with self._lock:
            self._probes = 0
            self._set_state(CLOSED)

    def reset(self) -> None:
        """Closed, with no failures counted (a test suite starting over)."""
        with self._lock:
            self._probes = 0
            if self._storage.state != CLOSED:
                self._set_state(CLOSED)
            self._storage.reset_counter()
            self._storage.reset_success_counter()

    def describe(self) -> dict[str, Any]:
        state = self.state
        info: dict[str, Any] = {
            "state": state,
            "failures": self._storage.counter,
            "failure_threshold": self.config.failure_threshold,
            "reset_timeout": self.config.reset_timeout,
        }
        if state == OPEN:
            info["retry_after"] = round(self._remaining_open(), 3)
        return info

    # -- internals (callers hold self._lock) ------------------------------------------------
    def _open(self) -> None:
        self._probes = 0
        self._storage.opened_at = datetime.fromtimestamp(self._clock(), _UTC)
        self._set_state(OPEN)

    def _set_state(self, state: str) -> None:
        self._storage.state = state
        # pybreaker's setter builds its state object and notifies the listeners; it resets the
        # failure counter on closing and the success counter on opening / half-opening.
        self._cb.state = state

    def _remaining_open(self) -> float:
        opened_at = self._storage.opened_at
        if opened_at is None:
            return 0.0
        elapsed = self._clock() - opened_at.timestamp()
        return float(self.config.reset_timeout - elapsed)

    def _retry_after_probe(self) -> float:
        # Half-open with every probe slot taken: the answer comes within one attempt.
        return min(self.config.reset_timeout, 1.0)

    def __repr__(self) -> str:
        return f"<Breaker service={self.service!r} state={self.state}>"


def breaker_for(
    service: str,
    config: Config,
    *,
    storage: Any = None,
    listeners: Iterable[Any] = (),
    clock: Callable[[], float] | None = None,
) -> Breaker:
    """The breaker of ``service``, created on first use; later calls update its numbers.

    A service has one breaker and so one state storage: asking for it with another storage
    than the one it was made with is refused (ValueError), never silently ignored.
    """
    with STATE.lock:
        breaker: Breaker | None = STATE.breakers.get(service)
        if breaker is not None and storage is not None and storage is not breaker.storage_given:
            raise ValueError(
                f"service {service!r} already has a circuit breaker with "
                f"{_describe(breaker.storage_given)}; this factory asks for "
                f"{_describe(storage)}. A service has one breaker: pass the same storage "
                "object, or give this factory another service name"
            )
        if breaker is None:
            check_service_room(service, STATE.breakers)
            breaker = Breaker(
                service, config, storage=storage, listeners=listeners, clock=clock or time.time
            )
            STATE.breakers[service] = breaker
        else:
            if breaker.config != config:
                breaker.apply_config(config)
            for listener in listeners:
                breaker.add_listener(listener)
            if clock is not None:
                breaker._clock = clock
        return breaker


def _describe(storage: Any) -> str:
    if storage is None:
        return "pybreaker's in-memory storage"
    return f"storage {type(storage).__name__} at {id(storage):#x}"


def breakers() -> dict[str, Breaker]:
    """Every breaker by service name."""
    with STATE.lock:
        return dict(STATE.breakers)


def reset_breakers() -> None:
    """Forget every breaker (tests and demos; :func:`~resilient_db.reset_state` does more)."""
    with STATE.lock:
        STATE.breakers.clear()
