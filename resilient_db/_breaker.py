"""One circuit breaker per service, on pybreaker's state storage and listener API.

pybreaker's ``CircuitBreaker.call`` holds the breaker's lock for the whole protected call, so
every call through one breaker runs one at a time. Here the protected call runs with no lock at
all: :meth:`Breaker.before_call` decides (a single storage read while closed), the caller runs the
attempt, and :meth:`Breaker.on_success` / :meth:`Breaker.on_failure` record the result. A short
lock guards only the state changes themselves, never database I/O. pybreaker stores the state
(in memory or shared, e.g. Redis) and notifies its listeners of every change.

With ``SELF_HEALING_REDIS_URL`` (and no storage of the caller's own) the state is shared by every
process through :mod:`resilient_db._fleet`: failures, openings and probe reservations are
decided by Redis scripts on the failure path, and a local view, kept in step by their answers and
by pub/sub, answers :meth:`Breaker.before_call` on the success path without any I/O. The local
pybreaker storage mirrors that view (its listeners log and count every change) and is what the
breaker falls back to while Redis does not answer.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Literal

import pybreaker as _pb

from ._classify import debug_failure
from ._config import Config, ConfigUsers
from ._errors import CircuitOpenError, wait_text
from ._fleet import (
    FAILOVER_WINDOW,
    PROBE_LEASE_MIN,
    VIEW_FRESH,
    FleetDown,
    View,
    attach,
    detach,
)
from ._internals import renew_pybreaker_lock
from ._observability import (
    BreakerHealth,
    LineLimit,
    emit,
    log_breaker,
    stats_for,
    switched_off_view,
)
from ._state import STATE, check_service_room

__all__ = ["Breaker", "breaker_for", "breakers"]

CLOSED, OPEN, HALF_OPEN = _pb.STATE_CLOSED, _pb.STATE_OPEN, _pb.STATE_HALF_OPEN
#: pybreaker's states as health() names them (its own names: the types say which they are)
_REPORTED_STATES: dict[str, Literal["closed", "open", "half-open"]] = {
    CLOSED: "closed",
    OPEN: "open",
    HALF_OPEN: "half-open",
}
_UTC = timezone.utc
#: the probe the attempt running in this context (thread, asyncio task) was let through as:
#: (its breaker, its reservation in Redis or None); see Breaker._take_probe
_probe_here: contextvars.ContextVar[tuple[Any, str | None, int] | None] = contextvars.ContextVar(
    "resilient_db_probe_here", default=None
)
#: the most probe ends and lost admits a breaker keeps for Redis while it does not answer
#: (see Breaker.report_probes). Every one may hold a probe slot of the fleet (Redis runs the
#: admits it got, in order, when it resumes: the oldest are the likeliest to have taken the
#: slots), so none is dropped in practice: admits are lost only while the link is up, one per
#: unit in flight when Redis stopped answering, and all are reported at the next rejoin. The
#: bound only keeps the list finite
_UNREPORTED_MAX = 10_000


class _CachedStateStorage(_pb.CircuitBreakerStorage):
    """The storage as pybreaker's own breaker sees it: the breaker's, every read and write
    passed on, except the counters' resets that pybreaker's state setter makes as it builds
    its state object (:meth:`Breaker._set_state` makes those of the breaker's own changes).

    pybreaker's breaker here only caches the state and tells the listeners of each change,
    the breaker's own and those noticed in a storage shared with other processes (see
    :meth:`Breaker.noticed`). A change noticed is no new start: the process that made it reset
    the counters then, and the failures (or the probes' successes) other processes counted in
    the storage since are the fleet's, which a reset at each process noticing would throw
    away (with processes failing in turn, one failure each, an opening delayed fleet-wide)."""

    def __init__(self, storage: Any) -> None:
        super().__init__(getattr(storage, "name", "storage"))
        self._storage = storage

    @property
    def state(self) -> str:
        state: str = self._storage.state
        return state

    @state.setter
    def state(self, state: str) -> None:
        self._storage.state = state

    def increment_counter(self) -> None:
        self._storage.increment_counter()

    def reset_counter(self) -> None:
        pass  # (see the class's docstring)

    def increment_success_counter(self) -> None:
        self._storage.increment_success_counter()

    def reset_success_counter(self) -> None:
        pass

    @property
    def counter(self) -> int:
        counter: int = self._storage.counter
        return counter

    @property
    def success_counter(self) -> int:
        counter: int = self._storage.success_counter
        return counter

    @property
    def opened_at(self) -> datetime | None:
        opened_at: datetime | None = self._storage.opened_at
        return opened_at

    @opened_at.setter
    def opened_at(self, opened_at: datetime) -> None:
        self._storage.opened_at = opened_at


class _LogListener(_pb.CircuitBreakerListener):
    """Logs every state change with the ``[SELF-HEAL]`` prefix and counts openings.

    An opening counts in ``breaker_opens`` in the process that made it: its own breaker's, or
    a shared breaker's that its failure (or its ``open()``) opened. A shared breaker's opening
    that another process made is logged here too (this process rejects calls from then on),
    but counted apart, as an opening followed (``opens_followed``): summed over the fleet,
    ``breaker_opens`` counts each opening once. So is one found in a storage of the caller's
    that other processes share (see :meth:`Breaker.noticed`)."""

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        b = self._breaker
        new = new_state.name
        # a change this breaker made (_set_state, in this thread), or one made elsewhere in a
        # storage it shares (another process's, through a ``breaker_storage=`` of the
        # caller's) that it noticed: at its admission or a health() read (see
        # Breaker.noticed), or pybreaker's own ``CircuitBreaker.state`` read by anyone
        own = b.setting == threading.get_ident()
        if not own:
            if (new == b.known and not b.reopening) or b.setting is not None:
                # said already (pybreaker's cached state lags: a listener raised), or this
                # breaker's own change under way in another thread (it tells it)
                return
            b.took_elsewhere(new)
        b.known = new
        # the calls the state ending now rejected since its last line are said now (summed,
        # the events' ``rejected`` are every rejection); the next state's first has its line
        left = b.rejection_lines.drain()
        old = getattr(old_state, "name", None)
        if left and old in (OPEN, HALF_OPEN):
            b.report_rejections_left(left, old)
        if new == OPEN:
            followed, b.open_followed = b.open_followed, False
            followed = followed or not own
            if followed:
                b.opens_followed += 1
            else:
                stats_for(b.service).add("breaker_opens")
            reason, b.open_reason = b.open_reason, None
            if b.by_hand:
                # an operator's opening (open_breaker): it says so, and the reason given
                why = reason or "by hand"
            else:
                if reason is not None:
                    why = reason
                elif not own:
                    # (its failure count, if any, is another process's: not said as ours)
                    why = "an opening found in its storage (made by another process sharing it)"
                elif getattr(old_state, "name", None) == HALF_OPEN:
                    why = "a half-open probe failed"
                else:
                    why = f"{cb.fail_counter} consecutive failures"
                if b.open_cause is not None:
                    why = f"{why} (the last: {b.open_cause})"
                why = f"after {why}"
            # a shared opening says the time it has left (one made a while ago, by another
            # process, followed now: by pub/sub, or read back on connecting); one made now,
            # here or by Redis for this process's failure, the whole reset timeout
            time_left, b.open_left = b.open_left, None
            hand_fields: dict[str, Any] = (
                {"reason": b.hand_reason} if b.by_hand and b.hand_reason else {}
            )
            open_for = b.config.reset_timeout if time_left is None else time_left
            emit(
                b.config,
                log_breaker,
                logging.WARNING,
                "Circuit breaker opened: service=%s %s; rejecting calls for %s",
                b.service,
                why,
                wait_text(open_for),
                service=b.service,
                event="breaker_opened",
                opened_here=not followed,
                open_for=round(open_for, 3),
                by_hand=b.by_hand,
                **hand_fields,
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
            reason, b.close_reason = b.close_reason, None
            if reason is None and not own:
                reason = "found closed in its storage (closed by another process sharing it)"
            by_hand, b.closing_by_hand = b.closing_by_hand, False
            b.by_hand = False
            emit(
                b.config,
                log_breaker,
                logging.INFO,
                "Circuit breaker closed: service=%s %s",
                b.service,
                reason or "recovered",
                service=b.service,
                event="breaker_closed",
                log=True,
                by_hand=by_hand,
                **({} if reason is None else {"reason": reason}),
            )


class Breaker:
    """The circuit breaker of one service.

    ``storage`` is any pybreaker ``CircuitBreakerStorage`` (``CircuitRedisStorage`` shares the
    state between processes); ``listeners`` are pybreaker listeners.

    ``clock`` is the breaker's timer (monotonic seconds): how long an opening has lasted, the
    pace of its log lines. A step of the wall clock (NTP) neither stretches nor shortens an
    opening. ``wall_clock`` gives the time of day written as the storage's ``opened_at``
    (pybreaker's field: a storage shared between processes compares it across them, so an
    opening this breaker did not make is timed by it, as pybreaker does). A ``clock`` given
    alone (a test's fake clock) is both.
    """

    def __init__(
        self,
        service: str,
        config: Config,
        *,
        storage: Any = None,
        listeners: Iterable[Any] = (),
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.service = service
        self.config = config
        self._timer: Callable[[], float] = time.monotonic
        self._wall: Callable[[], float] = time.time
        self.set_clocks(clock, wall_clock)
        #: the opening this breaker stamped last: the storage's ``opened_at`` as read back
        #: after writing it, and the timer's time it stands for (see _remaining_open)
        self._opened: tuple[datetime | None, float] | None = None
        self._lock = threading.Lock()
        self._probes = 0
        #: the local half-open state's probe lease (the shared breaker's is Redis's): when
        #: (timer) the probes now holding the slots began to hold them (the first of them was
        #: let through with every slot free, or the breaker went half-open), and their era. Probes
        #: still running when the lease ran out hold no slot any more and their ends count
        #: nowhere (see _renew_lease)
        self._lease_from = 0.0
        self._probe_era = 0
        # monotonic time of the last failure counted: an attempt that was already running then
        # failed in the same outage (see on_failure)
        self._last_failure = -math.inf
        # the storage pybreaker would make itself when given none, made here: its breaker
        # keeps it only in a private attribute
        self._storage = (
            storage if storage is not None else _pb.CircuitMemoryStorage(_pb.STATE_CLOSED)
        )
        self._cb = _pb.CircuitBreaker(
            fail_max=config.failure_threshold,
            reset_timeout=config.reset_timeout,
            success_threshold=config.half_open_probes,
            state_storage=_CachedStateStorage(self._storage),
            name=service,
        )
        self.storage_given = storage
        self.open_reason: str | None = None  # why the next opening happens, when not local
        self.close_reason: str | None = None  # why the next closing happens, when not recovery
        #: the next closing is an operator's (close_breaker: here, or in another process)
        self.closing_by_hand = False
        #: the opening in force (and the half-open state after it) was an operator's
        #: (open_breaker, here or in another process), not the failures': its rejections say
        #: so (``open_cause`` holds what they say), as its line and event do
        self.by_hand = False
        #: the operator's reason for that opening, if one was given
        self.hand_reason: str | None = None
        #: the next opening is another process's, followed through Redis (see _LogListener)
        self.open_followed = False
        #: the seconds the next opening has left, when it is the shared breaker's (its line
        #: says so; None: a local opening, for the whole reset timeout)
        self.open_left: float | None = None
        #: openings of the shared breaker made by other processes that this one followed
        self.opens_followed = 0
        #: what the failures that opened the breaker were, when known (a hot standby refusing
        #: writes): named by the opening's log line and by every CircuitOpenError meanwhile
        self.open_cause: str | None = None
        self._last_cause: str | None = None  # the last counted failure's
        #: the lines of rejected calls: the first after each opening, then one per period
        #: (the clock is the breaker's, read when asked: breaker_for may give another)
        self.rejection_lines = LineLimit(clock=self._now)
        #: the live users (policies) that have this breaker switched on, and those that
        #: switched it off (see switch_on)
        self._users_on: weakref.WeakSet[Any] = weakref.WeakSet()
        self._users_off: weakref.WeakSet[Any] = weakref.WeakSet()
        #: the local view of a shared breaker started over (switch_on) while Redis did not
        #: answer: the state first read back is the fleet's, not a change
        self._view_restarted = False
        #: states of the shared breaker taken into the view (see fleet_update), counted
        self._view_takes = 0
        #: that count when the breaker was attached to a link by being switched on again (its
        #: users all had it off), until switch_on has looked (None: not attached that way)
        self._takes_at_attach: int | None = None
        #: the state this breaker was last in, as its listener was told (a storage of the
        #: caller's shared with other processes may hold another since: see :meth:`noticed`).
        #: It starts closed, as a breaker shared through Redis does: one that finds the storage
        #: open says so when it notices, as that one says an opening read on connecting
        self.known = CLOSED
        #: the thread changing this breaker's state now (see :meth:`_set_state`), if any
        self.setting: int | None = None
        #: the storage's ``opened_at`` of the opening this breaker is in (as read back after
        #: stamping its own, or read as it noticed one made elsewhere): another one read while
        #: the storage says open is a new opening made elsewhere (see :meth:`_open_left`)
        self._open_seen: datetime | None = None
        #: an opening made elsewhere after the one this breaker is in is being told (open to
        #: open: see _notice_locked)
        self.reopening = False
        if self._cb.current_state != CLOSED:
            # pybreaker's breaker took the storage's state as its own, telling nobody: it
            # starts closed, so that the state found is told as a change when noticed (telling
            # no listener now: none is added yet)
            self._cb.state = CLOSED
        self._cb.add_listener(_LogListener(self))
        #: the listeners of the caller's (``breaker_listeners=``), told of each attempt's
        #: outcome too (see :meth:`_tell`); empty: nothing to tell, the fast paths stay fast
        self._told: tuple[Any, ...] = ()
        #: each of them with the users that gave it (a weak set; None: kept for good)
        self._given: list[tuple[Any, weakref.WeakSet[Any] | None]] = []
        #: held while those two are changed (see add_listener)
        self._listeners_lock = threading.Lock()
        for listener in listeners:
            self.add_listener(listener)
        # the shared breaker (SELF_HEALING_REDIS_URL): the link and this process's view of it
        self._fleet: Any = None
        self._fleet_state = CLOSED
        self._fleet_gen = -1  # the view's version (Redis microseconds; 0: no shared state yet)
        self._fleet_until = 0.0  # open: monotonic time the opening ends
        self._fleet_wait = 0.0  # half-open, every probe taken: monotonic time to ask again
        self._fleet_failures = 0  # failures this process counted in the fleet's current run
        #: that run (Redis's name for it, see _fleet._FAILURE): a success resets the fleet's
        #: count only while it is still that run
        self._fleet_run = ""
        self._fleet_opens = 0  # openings of the shared breaker, fleet-wide
        #: when (monotonic) Redis last confirmed the view: a script's answer or a message
        #: naming its generation, or a newer one (see lost_view)
        self._view_seen = -math.inf
        #: openings of the shared breaker (in Redis) this process made: its failure or probe
        #: that Redis answered by opening, its open() through Redis, its own opening shared on
        #: rejoining. Summed over the fleet: ``_fleet_opens``. An opening made alone while
        #: Redis did not answer counts only in ``breaker_opens`` (until it is shared)
        self._opened_here = 0
        #: the local breaker opened by this process's own decision (Redis did not answer), not
        #: as a mirror of the fleet's state: shared on rejoining (see fleet_rejoin)
        self._opened_locally = False
        #: when (timer) this process made that opening (None: another's, followed; or closed)
        self._opened_alone_at: float | None = None
        #: names the last opening this process made alone (drawn anew for each): Redis keeps
        #: it with the opening when it is shared, so a sharing sent again (the answer of the
        #: first lost) finds it its own; and a read of the shared state begun before it does
        #: not replace it (see fleet_rejoin)
        self.alone_id = ""
        #: the reservations of the probes this process let through and that have not ended yet,
        #: oldest first (None: a probe of its own state, Redis reserved nothing for it); each
        #: probe's end takes one (see _take_probe)
        self._held: list[str | None] = []
        #: reservations whose end Redis may not have heard (it did not answer): (reservation,
        #: success), reported when it answers again, before the shared state is read back
        #: (Redis applies each once: one it ran late is not counted again)
        self._unreported: list[tuple[str, bool]] = []
        # the live users whose config= of the code decides the settings (see follow)
        self._users = ConfigUsers()
        self._attach(config)

    # -- configuration ---------------------------------------------------------------------
    def set_clocks(
        self, clock: Callable[[], float] | None, wall_clock: Callable[[], float] | None = None
    ) -> None:
        """Time this breaker by ``clock`` (monotonic seconds; None: ``time.monotonic``) and
        stamp its openings by ``wall_clock`` (None: ``time.time``, or ``clock`` when given)."""
        self._timer = clock or time.monotonic
        self._wall = wall_clock or clock or time.time

    def follow(self, config: Config, *, user: object, explicit: bool) -> None:
        """``user`` of this breaker (a factory's or ``with_self_healing``'s policy; at its
        creation, at a reload) asks for the breaker settings of ``config``, a ``config=`` of
        the code when ``explicit`` (else the environment's). A service has one breaker: while
        a user that gave a ``config=`` lives, the environment's settings don't replace its
        settings, and another ``config=`` that differs is warned about (the later one is
        followed).

        The breaker's lines are said under the configuration it follows: one that changes
        only the logging switches (``SELF_HEALING_LOGGING``, ``SELF_HEALING_LOG_LEVEL``) is
        taken too, its state (an opening, a run of failures) kept."""
        follow, conflicting = self._users.asks(
            config, self.config, user=user, explicit=explicit, same=_same_breaker_settings
        )
        if not follow:
            return
        if conflicting:
            emit(
                config,
                log_breaker,
                logging.WARNING,
                "Circuit breaker settings differ for service=%s: %s asked for before, %s now; "
                "a service has one breaker, which follows the later. Give both the same "
                "settings, or each its own service name",
                self.service,
                _settings_text(self.config),
                _settings_text(config),
                service=self.service,
                event="breaker_settings_conflict",
            )
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        self.config = config
        self._cb.fail_max = config.failure_threshold
        self._cb.reset_timeout = config.reset_timeout
        self._cb.success_threshold = config.half_open_probes
        self._attach(config)

    def switch_off(self, user: object) -> None:
        """``user`` switched this breaker off (``SELF_HEALING_CIRCUIT_BREAKER=false`` applied
        by a reload): its calls run without it, and are not recorded.

        Switched off by its last user that had it on, it leaves the state it was in (``off``
        in ``health()``; switched on again, it starts over): the calls that state rejected
        since its last rejection line are said now, as when it leaves the state by itself."""
        self._users_on.discard(user)
        self._users_off.add(user)
        if len(self._users_on) == 0:
            self._say_rejections_left()

    def _say_rejections_left(self) -> None:
        """The line and event of the calls rejected since the last rejection line, if any.
        Said under this breaker's configuration, the one they were rejected under (a reload
        switching self-healing off too must not make their event vanish: the events'
        ``rejected`` add up to the ``breaker_rejections`` counter)."""
        left = self.rejection_lines.drain()
        if not left:
            return
        try:
            state = self.state
        except Exception:  # a storage of the application's that fails: it was open
            state = OPEN
        self.report_rejections_left(left, HALF_OPEN if state == HALF_OPEN else OPEN)

    def switch_on(self, user: object) -> None:
        """``user`` has this breaker switched on (made, or reloaded).

        Switched on when no other live user has it on and a user had it switched off, it
        starts over: calls ran meanwhile without it, unrecorded, so what it held (an opening,
        a run of failures) is stale, and an opening would reject healthy calls for the rest
        of its reset timeout. The local view starts closed with no failures counted; a shared
        breaker's state in Redis is left alone (other processes keep it up to date), as is a
        ``breaker_storage=`` of the caller's that they may share (see
        :attr:`storage_in_process`: its state is followed from the next admission), and read
        back into the view (when Redis does not answer, its background thread reads it on
        reconnecting); a state other than closed is logged. Kept on by another user
        meanwhile, its state is current and stays."""
        others_on = any(u is not user for u in self._users_on)
        stale = not others_on and len(self._users_off) > 0
        self._users_off.discard(user)
        self._users_on.add(user)
        with self._lock:
            takes_at_attach, self._takes_at_attach = self._takes_at_attach, None
            if not stale:
                return
            fleet = self._fleet
            # the link this breaker was attached to by being switched on (following the
            # configuration, before this) may have taken the shared state into the view
            # already, its thread not having marked it up yet: that is the fleet's state now,
            # kept (started over, it was lost: nothing reads it again while the link stays up)
            taken = (
                fleet is not None
                and takes_at_attach is not None
                and self._view_takes != takes_at_attach
            )
            if not taken:
                self._fleet_gen = -1
                self._fleet_state = CLOSED
                self._fleet_until = self._fleet_wait = 0.0
            self._fleet_failures = 0
            self._probes = 0
            self._last_failure = -math.inf
            if not self.storage_in_process:
                # a storage of the caller's that other processes may share: its state and
                # counts are theirs too, kept up to date while this one was off (not stale),
                # left as they are, as the state shared through Redis is (written closed, it
                # would close every process's breaker); followed from its next admission
                return
            self._storage.reset_counter()
        if taken:
            self._resumed_shared()
            return
        self.close_reason = _switched_on_again(self._storage.state)
        try:
            if fleet is not None and fleet.up:
                with contextlib.suppress(FleetDown):
                    # the fleet's state replaces the view, whatever it was (unless the link's
                    # thread took a change's message meanwhile: see fleet_update)
                    takes = self._view_takes
                    self.fleet_sync(fleet.breaker_read(self.service), takes=takes)
                    self._resumed_shared()
                    return
            with self._lock:
                read = self._fleet_gen != -1
                if not read:
                    self._view_restarted = fleet is not None
                    if self._storage.state != CLOSED:
                        self._set_state(CLOSED)
                    self._storage.reset_counter()
                    self._storage.reset_success_counter()
            if read:  # Redis answered meanwhile: its background thread read the state
                self._resumed_shared()
        finally:
            self.close_reason = None

    def _resumed_shared(self) -> None:
        """Switched on again with the shared state read back: say so when it is not closed."""
        state = self.state
        if state == CLOSED:
            return
        emit(
            self.config,
            log_breaker,
            logging.WARNING,
            "Circuit breaker switched on again: service=%s resumes %s, as the processes "
            "sharing it through Redis left it; retry in %s",
            self.service,
            state,
            wait_text(self.open_for()),
            service=self.service,
            event="breaker_resumed",
            state=state,
        )

    def _attach(self, config: Config) -> None:
        """Follow the shared breaker of ``config.redis_url`` (unless the caller gave a storage of
        its own: that one is the breaker's state, as asked), leaving the link of another Redis
        this breaker followed (closed when nothing else is attached to it)."""
        shared = bool(config.redis_url) and self.storage_given is None
        old = self._fleet
        moved = shared and (old is None or old.url != config.redis_url)
        if moved:
            # shared from now on (a reload setting SELF_HEALING_REDIS_URL), or through another
            # Redis (whose processes know nothing of this one's opening): an opening this
            # process holds is kept and shared, as one made while Redis was down is (read back
            # as closed, it would be thrown away and the next unit sent to the database that
            # just failed); but not one it held when its users all switched it off (being
            # switched on again now: stale, see switch_on). Marked, and the view's generation
            # started over, before attaching: a new link's thread may connect and read the
            # shared state back before attach() returns, and that read is kept
            with self._lock:
                off = self.switched_off
                if off:
                    self._opened_locally = False
                elif self._storage.state == OPEN and self._remaining_open() > 0:
                    self._opened_locally = True
                    self.alone_id = secrets.token_hex(8)
                self._fleet_gen = -1
                self._takes_at_attach = self._view_takes if off else None
        link = attach(config, breaker=self) if shared else None
        self._fleet = link
        if old is link:
            return
        if not moved:
            self._fleet_gen = -1
        if old is not None:
            self._leave(old)
            detach(old, breaker=self)
        if link is None:
            return
        pending: list[tuple[Any, Breaker]] | None = getattr(_READ_LATER, "pending", None)
        if pending is not None:  # (breaker_for holds the registry's lock: read once it is free)
            pending.append((link, self))
            return
        link.sync_breaker(self)

    def _leave(self, fleet: Any) -> None:
        """This breaker no longer follows ``fleet``'s Redis (a reload took the URL away or
        moved it): the probe slots its running probes hold there are given back now, and the
        probe ends Redis missed are reported, instead of holding slots by nobody until their
        lease runs out (every other process's call refused meanwhile, whatever the database
        does). The running probes go on as this process's own. Best effort: a Redis that
        does not answer leaves them to the lease, as for a process that died."""
        with self._lock:
            running = [reservation for reservation in self._held if reservation is not None]
            self._held = []  # (their ends are this process's own from now on: see _take_probe)
        if not fleet.up:
            return
        try:
            self.report_probes(fleet)
            for reservation in running:
                fleet.breaker_probe_done(
                    self.service,
                    self.config.half_open_probes,
                    success=False,  # neither way: the slot is released, nothing counted
                    reservation=reservation,
                    reset_timeout=self.config.reset_timeout,
                )
        except Exception:  # FleetDown, or a store error: the lease gives the slots back
            debug_failure(log_breaker, "giving back probe slots on leaving Redis failed")

    def after_fork_in_child(self) -> None:
        """In a forked child: new locks, this breaker's and pybreaker's. A thread of the parent
        (the Redis background thread applying another process's change, or a unit) may have
        held them while the parent forked, e.g. inside a listener; that thread does not exist
        here, and a lock it held would stay held for good."""
        self._lock = threading.Lock()
        self._listeners_lock = threading.Lock()
        renew_pybreaker_lock(self._cb)
        # the parent's probes and reports are the parent's: it ends and reports them
        self._held = []
        self._unreported = []
        if self._opened_locally:
            # an opening the parent made alone is the parent's: this copy, shared too, finds
            # the parent's sharing another process's (not one more opening of its own)
            self.alone_id = secrets.token_hex(8)

    def add_listener(self, listener: Any, user: object = None) -> None:
        """Register a pybreaker ``CircuitBreakerListener`` (once: again is a no-op), for good,
        or while a ``user`` that gave it lives (a factory's policy). The listeners whose users
        are all gone are dropped first: a factory made per request or per tenant, each given a
        listener of its own, added one to its service's breaker for good (kept for the
        process's life, told of every outcome).

        Never called under ``STATE.lock`` (see :func:`breaker_for`): pybreaker's lock, taken
        here, is held while it tells the listeners of a change (the Redis link's thread
        taking another process's), and a listener or hook asking for ``health()`` then waits
        for ``STATE.lock``."""
        with self._listeners_lock:
            self._drop_unheld()
            for n, (given, users) in enumerate(self._given):
                if given == listener:
                    if user is None:
                        self._given[n] = (given, None)
                    elif users is not None:
                        users.add(user)
                    return
            users = None
            if user is not None:
                users = weakref.WeakSet()
                users.add(user)
            self._given.append((listener, users))
            self._cb.add_listener(listener)
            self._told = tuple(given for given, _ in self._given)

    def _drop_unheld(self) -> None:
        """Forget the listeners that no live user gave (see :meth:`add_listener`; callers
        hold ``self._listeners_lock``)."""
        gone = [given for given, users in self._given if users is not None and not users]
        if not gone:
            return
        self._given = [(given, users) for given, users in self._given if users is None or users]
        self._told = tuple(given for given, _ in self._given)
        for given in gone:
            self._cb.remove_listener(given)

    @property
    def storage_in_process(self) -> bool:
        """Whether the storage can only be this process's: pybreaker's in-memory one, made
        here or given (``breaker_storage=``). Any other storage given (pybreaker's
        ``CircuitRedisStorage``, a storage of the caller's own) may be shared by processes."""
        return self.storage_given is None or isinstance(
            self.storage_given, _pb.CircuitMemoryStorage
        )

    @property
    def switched_off(self) -> bool:
        """Every live user has it switched off by its configuration (see :meth:`switch_off`)."""
        return not self._users_on and len(self._users_off) > 0

    # -- a storage shared with other processes ---------------------------------------------
    def noticed(self, state: str) -> str:
        """``state``, just read from the storage: when this breaker was in another, a change
        made elsewhere (another process sharing a ``breaker_storage=`` of the caller's opened
        it, or its probes took it half-open or closed) is taken now, said and told to the
        listeners once, as pybreaker's own ``CircuitBreaker.state`` tells them of a change it
        notices. Returns the state the breaker is in now. Nothing is read again while the state
        is the one known: the closed fast path stays one storage read."""
        if state == self.known:
            return state
        with self._lock:
            return self._notice_locked()

    def _notice_locked(self) -> str:
        """:meth:`noticed`, the storage read again under the lock (callers hold it): another
        thread may have noticed the change first, or this breaker's own change be under way
        (its storage written, its listeners not told yet)."""
        state: str = self._storage.state
        if state != self.known and state in _REPORTED_STATES:
            if state == CLOSED and self._storage.counter >= self.config.failure_threshold:
                # a count that reached the threshold while the storage says closed is the one
                # that opened it, left by a closing that did not reset it (its state written
                # by hand): started over. Any other count is the failures processes counted
                # since the closing (one that counted up to the threshold opened it), kept
                self._storage.reset_counter()
            # pybreaker's setter tells every listener (the old state: its cached one, which is
            # this breaker's last); the counters are left as they are (see _CachedStateStorage)
            self._cb.state = state
        elif state == OPEN == self.known and self._reopened(self._storage.opened_at):
            # closed and opened again elsewhere since this breaker last read the storage: a
            # new opening, told as open to open (as a shared breaker's opening made again is)
            self.reopening = True
            try:
                self._cb.state = state
            finally:
                self.reopening = False
        return state

    def took_elsewhere(self, state: str) -> None:
        """The listener was told of ``state``, a change made elsewhere (see :meth:`noticed`):
        this breaker's own notes follow it, as :meth:`_set_state` keeps them for its own."""
        self._entering(state)
        self._probes = 0
        if state == OPEN:
            # whoever made it and why is unknown here: not this process's failures, not an
            # operator's as far as it knows; the time it has left is its opened_at's
            self.open_cause = None
            self._forget_hand()
            self._open_seen = self._storage.opened_at
            self.open_left = max(0.0, self._remaining_open())

    # -- the protocol around one attempt ------------------------------------------------
    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` as the storage says."""
        state: str = self._storage.state
        return state

    def fast_closed(self) -> bool:
        """True when :meth:`before_call` would admit an attempt as closed, doing nothing else
        (the common case, answered without its machinery). False: call :meth:`before_call`,
        which also handles a storage that fails (a store of yours may)."""
        try:
            fleet = self._fleet
            if fleet is not None and fleet.up:
                return bool(self._fleet_state == CLOSED)
            # (a change made elsewhere, closed in the storage after another state here, is
            # noticed by before_call)
            return bool(self._storage.state == CLOSED and self.known == CLOSED)
        except Exception:
            return False

    @property
    def shared(self) -> bool:
        """Whether its failure path talks to Redis now (shared through a link that is up)."""
        link = self._fleet
        return link is not None and bool(link.up)

    @property
    def accounts_with_io(self) -> bool:
        """Whether its accounting of an attempt's outcome may do I/O: shared through Redis (a
        link, up or not yet), or kept in a storage of yours (pybreaker's Redis storage, say)."""
        return self._fleet is not None or self.storage_given is not None

    @property
    def asks_redis(self) -> bool:
        """Whether its failure path may talk to Redis, or wait for it, now: shared through a
        link that is up, or whose first attempt to reach Redis has not ended (see
        ``FleetLink.wait_first_attempt``). An async unit runs that path off the event loop."""
        link = self._fleet
        return link is not None and bool(link.up or link.connecting)

    def open_for(self) -> float:
        """Seconds an attempt would still be refused for as the breaker stands now (0: it
        would be admitted, or the fleet asked): read from the local view, nothing sent."""
        try:
            fleet = self._fleet
            if fleet is not None and fleet.up:
                if self._fleet_state == OPEN:
                    return max(0.0, self._fleet_until - time.monotonic())
                return 0.0
            state = self._storage.state
            if state != self.known:  # (inline: every drop-in block asks, the state unchanged)
                state = self.noticed(state)
            if state == OPEN:
                return max(0.0, self._open_left())
        except Exception:  # a store of yours that fails: the attempt asks before_call
            return 0.0
        return 0.0

    def refuse_if_open(self) -> None:
        """Raise :class:`CircuitOpenError` (counted and reported as any rejection) while the
        breaker is open, read from the local view (nothing sent); closed or half-open: return.
        For drop-in use, which is no probe (its outcome is never reported to the breaker)."""
        remaining = self.open_for()
        if remaining > 0:
            raise self._reject(remaining, OPEN)

    def fast_success(self) -> bool:
        """True when :meth:`on_success` of a non-probe attempt has nothing to do (no failure
        counted since the last success). False: call :meth:`on_success` (as above)."""
        try:
            return not self._fleet_failures and not self._storage.counter and not self._told
        except Exception:
            return False

    def before_call(self) -> bool:
        """Admit one attempt or raise :class:`CircuitOpenError` without touching the network.

        Returns True when the attempt is a half-open probe (pass it back to the ``on_*`` calls).
        """
        fleet = self._fleet
        lost = None  # an admit whose answer was lost: its reservation
        if fleet is not None and fleet.up:
            if self._fleet_state == CLOSED:
                return False
            try:
                return self._fleet_admit(fleet)
            except FleetDown as down:
                lost = down.reservation
        if fleet is None:
            return self._local_admit(None)
        # Redis did not answer: this process decides on its own state. An admit that may have
        # run in Redis all the same is this attempt's: a probe reports its end under that
        # reservation, any other decision releases it (when Redis answers again)
        try:
            probe = self._local_admit(lost)
        except BaseException:
            if lost is not None:
                self._remember_probe(lost, False)
            raise
        if not probe and lost is not None:
            self._remember_probe(lost, False)
        return probe

    def _local_admit(self, reservation: str | None) -> bool:
        """:meth:`before_call` on the local state (``reservation``: that of an admit whose
        answer was lost, held by the probe this lets through, if any)."""
        state = self.noticed(self._storage.state)
        if state == CLOSED:
            return False
        if state == OPEN:
            remaining = self._open_left()
            if remaining > 0:
                raise self._reject(remaining, OPEN)
            with self._lock:
                if self._storage.state == OPEN:
                    # read again under the lock: a probe that failed since the read above
                    # opened it anew, and that opening has its whole reset timeout to run
                    remaining = self._remaining_open()
                    if remaining <= 0:
                        self._probes = 0
                        self._set_state(HALF_OPEN)
            if remaining > 0:
                raise self._reject(remaining, OPEN)
        overdue, admitted = 0.0, False
        with self._lock:
            state = self._storage.state
            if state == CLOSED:
                return False
            if state == HALF_OPEN:
                if self._probes >= self.config.half_open_probes:
                    overdue = self._renew_lease()
                if self._probes < self.config.half_open_probes:
                    if not self._probes:  # (the lease runs from the first slot taken)
                        self._lease_from = self._timer()
                    self._probes += 1
                    self._hold(reservation)  # (under the lock, as every caller)
                    admitted = True
        if overdue:
            self._report_overdue(overdue)
        if admitted:
            return True
        # rejected (outside the lock: its line may reach the hooks)
        raise self._reject(self._retry_after_probe(), state)

    def probe_lease(self) -> float:
        """Seconds a half-open probe holds its slot at most: ``max(reset timeout, 10 s)``, as
        the shared breaker's lease in Redis."""
        return max(self.config.reset_timeout, PROBE_LEASE_MIN)

    def _renew_lease(self) -> float:
        """Half-open with every probe slot taken (callers hold ``self._lock``): when the
        probes holding them began longer than :meth:`probe_lease` ago, they are given up for
        lost (a connect hung on a blackholed address, a statement waiting for a lock): their
        slots go to new probes and their ends count nowhere, as a shared breaker's probes past
        their lease. Without it, one hung probe would refuse every call of the service until
        the operating system ended its connection (minutes, for a silent network). Returns
        how long they have run (0: within the lease, nothing changed)."""
        held_for = self._timer() - self._lease_from
        if held_for < self.probe_lease():
            return 0.0
        self._probe_era += 1
        self._probes = 0
        self._lease_from = self._timer()
        return held_for

    def _report_overdue(self, held_for: float) -> None:
        emit(
            self.config,
            log_breaker,
            logging.WARNING,
            "Circuit breaker probe overdue: service=%s its half-open probe(s) still running "
            "after %s; letting new probe(s) through (theirs will count nowhere)",
            self.service,
            wait_text(held_for),
            service=self.service,
            event="breaker_probe_overdue",
            running_for=round(held_for, 3),
        )

    def on_success(self, probe: bool) -> None:
        """The attempt succeeded (the listeners of the caller's are told: ``success(cb)``)."""
        self._on_success(probe)
        if self._told:
            self._tell("success")

    def _tell(self, what: str, *args: Any) -> None:
        """Call ``what`` (``success`` or ``failure``) on each listener of the caller's, as
        pybreaker's ``CircuitBreaker.call`` does after recording an outcome (the attempts do
        not run through it: see the module's docstring)."""
        for listener in self._told:
            getattr(listener, what)(self._cb, *args)

    def _on_success(self, probe: bool) -> None:
        if not probe:
            # Closed: consecutive failures start again from zero. Read before writing so the
            # common case (no failures) writes nothing.
            if self._fleet_failures:
                self._fleet_reset_failures()
            if self._storage.counter:
                self._storage.reset_counter()
            return
        reservation, current = self._take_probe()
        if self._fleet_probe_done(reservation, success=True) or not current:
            return
        with self._lock:
            self._probes = max(0, self._probes - 1)
            if self._storage.state != HALF_OPEN:
                return
            self._storage.increment_success_counter()
            if self._storage.success_counter >= self.config.half_open_probes:
                self._set_state(CLOSED)

    def on_failure(
        self,
        probe: bool,
        started: float | None = None,
        cause: str | None = None,
        *,
        error: BaseException | None = None,
    ) -> None:
        """The attempt failed with a transient (infrastructure) error ``error`` (the listeners
        of the caller's are told: ``failure(cb, error)``; ``cause``: what it was, when the
        failure says more than its class, e.g. a hot standby refusing writes).

        ``started`` is when the attempt began (``time.monotonic()``). An attempt that began
        before the last counted failure and fails within :data:`FAILOVER_WINDOW` (1 s) after it
        was already in flight when the database failed: its failure is the same event seen
        again, so it is not counted. Eight units cut off by one failover fail within
        milliseconds of each other and are one failure, not eight (which would open a
        threshold-5 circuit for the whole reset timeout after a 0.1 s failover). A failure
        arriving later counts, whenever its attempt began, and is the new last one: a database
        that hangs (connects waiting for their timeout) fails attempts one timeout after each
        began, and counting one per timeout would keep sending units to it for threshold x
        timeout; counted once per window, it opens after about threshold windows. Units that
        start afterwards and fail count too, so a database that stays down opens the circuit.
        An attempt whose connect timed out comes with no ``started`` (the retry engine's
        ``failed``): its failure always counts, so that units started together against a hung
        database, whose connects all time out together, open the circuit at their first
        timeout. A connect refused or rejected at once (a crashed primary, a standby not yet
        promoted) comes with its attempt's start, as a failure in flight: the units that began
        while a failover was under way are not counted again for it.
        A half-open probe's failure always counts (a shared breaker's: while its probe slot
        holds, see :meth:`_fleet_failure`). A shared breaker applies the same rule fleet-wide: the
        attempt's age goes to Redis, which compares its start and its end with the last failure
        any process counted, by Redis's clock.
        """
        self._on_failure(probe, started, cause)
        if self._told and error is not None:
            self._tell("failure", error)

    def _on_failure(self, probe: bool, started: float | None, cause: str | None) -> None:
        reservation, current = self._take_probe() if probe else (None, True)
        age = -1.0  # a probe, or an attempt of unknown start: always counted
        if not probe and started is not None:
            now = time.monotonic()
            last = self._last_failure
            if started < last and now - last < FAILOVER_WINDOW:
                return
            self._last_failure = now
            age = max(0.0, now - started)
        self._last_cause = cause
        fleet = self._fleet
        if fleet is not None and not fleet.up:
            # a link still making its first attempt (a process just started): counted by the
            # fleet, whose breaker may be open, not by a fresh closed one (at most the Redis
            # timeout)
            fleet.wait_first_attempt()
        if fleet is not None and fleet.up:
            with contextlib.suppress(FleetDown):
                self._fleet_failure(fleet, age, reservation)
                return
        if reservation is not None:
            # Redis may not have heard it: its probe slot is released when Redis answers again
            # (when Redis did hear it, its breaker opened, and the release does nothing)
            self._remember_probe(reservation, False)
        if not current:
            return  # a probe past the local lease: its end counts nowhere (see _renew_lease)
        with self._lock:
            if probe:
                self._probes = max(0, self._probes - 1)
            state = self._storage.state
            if state != self.known:  # (a change made elsewhere: said before this failure's)
                state = self._notice_locked()
            if state == HALF_OPEN:
                self._open(cause)
                return
            if state == OPEN:
                return
            self._storage.increment_counter()
            if self._storage.counter >= self.config.failure_threshold:
                self._open(cause)

    def on_neutral(self, probe: bool) -> None:
        """The attempt ended with a business error: neither success nor failure."""
        if not probe:
            return
        reservation, current = self._take_probe()
        if not self._fleet_probe_done(reservation, success=False) and current:
            with self._lock:
                self._probes = max(0, self._probes - 1)

    def _hold(self, reservation: str | None) -> None:
        """A probe was let through (under ``reservation`` in Redis, if any); callers hold
        ``self._lock``. Its attempt's context (thread, task) notes which (see
        :meth:`_take_probe`)."""
        self._held.append(reservation)
        del self._held[: -max(16, 4 * self.config.half_open_probes)]  # bounded
        _probe_here.set((self, reservation, self._probe_era))

    def _take_probe(self) -> tuple[str | None, bool]:
        """A probe ended: the reservation it held, and whether it still holds a slot of the
        local state (False: let through before the local lease last ran out, or before the
        breaker last went half-open; see :meth:`_renew_lease`). The admission travels as a
        bool through the retry engine, so the probe's own is found in its context, where it
        was let through (an attempt ends in the thread or task it began in); an end elsewhere
        (a returned task's admission given back by its callback) takes the oldest held.
        Pairing each end with the oldest was wrong when an older probe was still running: a
        newer one's success was reported under the older's reservation (gone with a state
        change or the lease), so it counted nowhere and its own slot stayed taken (every call
        refused meanwhile)."""
        here = _probe_here.get()
        with self._lock:
            if here is not None and here[0] is self:
                _probe_here.set(None)
                with contextlib.suppress(ValueError):
                    self._held.remove(here[1])
                return here[1], here[2] == self._probe_era
            return (self._held.pop(0) if self._held else None), True

    def _fleet_probe_done(self, reservation: str | None, *, success: bool) -> bool:
        """A half-open probe holding ``reservation`` ended (``success``, or neither way): tell
        the fleet. False when the local state decides: the breaker is not shared, or Redis did
        not answer (the outcome is reported when it answers again, see
        :meth:`report_probes`), or the probe was let through by this process's own state
        while Redis was down (it holds no slot in Redis)."""
        fleet = self._fleet
        if fleet is None:
            return False
        if reservation is None:
            if not fleet.up:
                return False
            with self._lock:  # the view follows the fleet's state, which this probe is not in
                self._probes = max(0, self._probes - 1)
            return True
        if fleet.up:
            try:
                answer = fleet.breaker_probe_done(
                    self.service,
                    self.config.half_open_probes,
                    success=success,
                    reservation=reservation,
                    reset_timeout=self.config.reset_timeout,
                    view=self.lost_view(),
                )
            except FleetDown:
                pass
            except BaseException:
                # interrupted (KeyboardInterrupt, a gevent timeout), perhaps before the
                # command reached Redis (a new connection waiting for its handshake): reported
                # by the link's thread, as for a Redis failure, not left holding the probe's
                # slot until its lease runs out (a report Redis already ran does nothing)
                self._report_later(fleet, reservation, success)
                raise
            else:
                state, remaining, gen, opens, hand = answer
                # (an opening by hand that this answer is the first to tell of says so)
                self.fleet_update(state, remaining, gen, opens, answer=True, hand=hand, read=True)
                return True
        self._remember_probe(reservation, success)
        return False

    def _report_later(self, fleet: Any, reservation: str, success: bool) -> None:
        """The end (``success``, or neither way) of the probe of ``reservation``, or the
        release of an admit under it, which an interruption cut off while ``fleet`` is up:
        reported by the link's background thread at once (see :meth:`report_probes`)."""
        self._remember_probe(reservation, success)
        fleet.report_soon()

    def _remember_probe(self, reservation: str, success: bool) -> None:
        with self._lock:
            self._unreported.append((reservation, success))
            del self._unreported[:-_UNREPORTED_MAX]  # bounded

    def report_probes(self, fleet: Any) -> None:
        """Redis answers again: report the probes whose end it may have missed (a probe that
        succeeded while it blipped closes the fleet's breaker, instead of holding a probe slot
        until its lease runs out), and release the admits whose answer was lost. Each counts
        once (Redis may have run the report, or the admit, late, when it resumed: a
        reservation's end is applied once), and only in the half-open state it came in. Called by
        the link's background thread before it reads the shared state back; raises what the
        store raises (the rest stays for the next time)."""
        with self._lock:
            pending, self._unreported = self._unreported, []
        for i, (reservation, success) in enumerate(pending):
            try:
                fleet.breaker_probe_done(
                    self.service,
                    self.config.half_open_probes,
                    success=success,
                    reservation=reservation,
                    reset_timeout=self.config.reset_timeout,
                    background=True,
                    view=self.lost_view(),
                )
            except BaseException:
                with self._lock:
                    self._unreported[:0] = pending[i:]
                raise

    # -- manual control --------------------------------------------------------------------
    def open(self, *, reason: str | None = None, seconds: float | None = None) -> bool:
        """Open the circuit now, by hand, for ``seconds`` (None: the reset timeout), then
        half-open as usual; ``reason``: the operator's, said by the line and every rejection
        (see :func:`~resilient_db.open_breaker`, which checks them). For every process when it
        is shared: True; False when only this process's (not shared, or Redis did not answer:
        the line says so)."""
        seconds = self.config.reset_timeout if seconds is None else seconds
        if self._fleet_force(OPEN, reason, seconds):
            return True
        alone = "" if self._fleet is None else ", in this process only (Redis does not answer)"
        with self._lock:
            self.open_reason = f"{_hand_phrase(reason, elsewhere=False)}{alone}"
            self.open_left = seconds
            self._open(None, by_hand=True, reason=reason, seconds=seconds)
        return False

    def close(self, *, reason: str | None = None) -> bool:
        """Close the circuit now, by hand, its failures forgotten (for every process when it
        is shared: True; False when only this process's, as for :meth:`open`)."""
        if self._fleet_force(CLOSED, reason, 0.0):
            return True
        alone = "" if self._fleet is None else ", in this process only (Redis does not answer)"
        with self._lock:
            self._probes = 0
            self._last_failure = -math.inf
            self._close_saying(f"{_hand_phrase(reason, elsewhere=False)}{alone}", by_hand=True)
            self._storage.reset_counter()
            self._storage.reset_success_counter()
        return False

    def _take_hand(self, reason: str | None, *, elsewhere: bool) -> None:
        """The opening about to be taken is an operator's (caller holds ``self._lock``)."""
        self.by_hand = True
        self.hand_reason = reason or None
        self.open_cause = _hand_cause(reason, elsewhere=elsewhere)

    def reset(self) -> None:
        """Closed, with no failures counted (a test suite starting over). A shared breaker's
        state in Redis is left alone (other processes share it): this process's view of it
        is read again at the next failure. So is a ``breaker_storage=`` of the caller's that
        other processes may share (see :attr:`storage_in_process`): written closed, it would
        close the breaker of every process sharing it, the database perhaps still down, and
        they would say it closed; a breaker made afterwards on it follows its state."""
        with self._lock:
            self._fleet_gen = -1
            self._fleet_state = CLOSED
            self._fleet_failures = 0
            self._probes = 0
            if not self.storage_in_process:
                return
            if self._storage.state != CLOSED:
                # its line says so: the state was forgotten, nothing recovered
                self._close_saying("reset by reset_state() (its state forgotten, not a recovery)")
            self._storage.reset_counter()
            self._storage.reset_success_counter()

    def describe(self) -> BreakerHealth:
        """health()'s view. ``state`` is ``"off"`` while every live user has the breaker
        switched off (``SELF_HEALING_CIRCUIT_BREAKER=false`` or ``SELF_HEALING_ENABLED=false``
        applied by a reload): it rejects nothing then, whatever it held.

        ``state`` is what the next call meets: an opening whose reset timeout has passed is
        ``"half-open"`` (the next call is let through as a probe), though the breaker moves
        there only when a call comes (pybreaker's way, and a shared breaker's: the next call
        asks Redis for a probe). Without calls, an opening stored as open would otherwise be
        reported open for good, with a ``retry_after`` going ever more negative, and a
        readiness probe built on ``healthy`` would keep the instance out of traffic, so no call
        would ever come. ``retry_after`` (seconds, > 0) is there only while open. ``failures``
        are those counted toward the next opening: 0 while open, half-open or off.

        ``by_hand``: the opening in force (open, or half-open after it) was an operator's
        (``open_breaker()`` or ``resilient-db breaker open``, here or, shared, in another
        process), with ``reason`` the reason given (None: none given, or not by hand); False
        and None while closed."""
        if self.switched_off:
            return switched_off_view(self.config)
        stored = self.noticed(self.state)
        state = _REPORTED_STATES.get(stored)
        if state is None:  # a breaker_storage= of yours with a state pybreaker has not
            raise ValueError(f"breaker state {stored!r} is none of pybreaker's")
        fleet = self._fleet
        by_hand = self.by_hand and state != CLOSED
        info: BreakerHealth = {
            "state": state,
            # the failures counted toward the next opening: shared, the fleet's (as Redis last
            # answered this process); else this one's. 0 while open or half-open (pybreaker
            # keeps the count that opened it; Redis starts a new run)
            "failures": 0
            if state != CLOSED
            else self._fleet_failures
            if fleet is not None and fleet.up
            else self._storage.counter,
            "failure_threshold": self.config.failure_threshold,
            "reset_timeout": self.config.reset_timeout,
            "by_hand": by_hand,
            "reason": self.hand_reason if by_hand else None,
        }
        if state == OPEN:
            remaining = self.open_for()
            if remaining > 0:  # (rounded up: a call now is rejected, and told to wait > 0)
                info["retry_after"] = math.ceil(remaining * 1000) / 1000
            else:  # the open time is over: the next call is a probe
                info["state"] = "half-open"
        if fleet is not None:
            info["shared"] = {
                "redis": fleet.masked_url,
                "connected": fleet.up,
                "problem": fleet.problem,
                "fleet_opens": self._fleet_opens,
                "opened_here": self._opened_here,
                "opens_followed": self.opens_followed,
                "fleet_timelines": fleet.known_timelines(),
            }
        elif self.storage_given is not None:
            info["storage"] = {
                "kind": type(self.storage_given).__name__,
                "opens_followed": self.opens_followed,
            }
        return info

    # -- the shared breaker ----------------------------------------------------------------
    def _reject(self, retry_after: float, state: str) -> CircuitOpenError:
        """Count a call rejected in ``state`` and report it (see :meth:`_report_rejection`);
        the error to raise."""
        retry_after = max(0.0, retry_after)
        stats_for(self.service).add("breaker_rejections")
        self._report_rejection(retry_after, state)
        return self._open_error(retry_after, state)

    def _report_rejection(self, retry_after: float, state: str) -> None:
        """The ``[SELF-HEAL]`` line of rejected calls: one for the first call rejected after
        each opening, then at most one per ``WARNING_LINE_PERIOD`` (10 s) saying how many were
        rejected since the last line (an open breaker may reject thousands of calls a second).

        The hook event goes with the line, not with each rejection: an open breaker is there to
        fail calls cheaply, and every hook called for each one (an OpenTelemetry span event and
        counter, an application's own hook doing I/O) would make failing fast expensive just
        when the service is under stress. The event's ``rejected`` says how many calls it
        stands for; the ``breaker_rejections`` counter (``health()``, Prometheus) counts each."""
        log, unlogged = self.rejection_lines.take()
        if not log:
            return
        cause = self.open_cause
        emit(
            self.config,
            log_breaker,
            logging.WARNING,
            "Circuit breaker rejected %d call(s) since the last line: service=%s %s%s; "
            "failing calls fast, retry in %s",
            unlogged + 1,
            self.service,
            "open" if state == OPEN else "half-open with every probe slot taken",
            "" if cause is None else f" ({cause})",
            wait_text(retry_after),
            service=self.service,
            event="breaker_rejected",
            rejected=unlogged + 1,
            state=state,
            retry_after=round(retry_after, 3),
            log=True,
            **({} if cause is None else {"cause": cause}),
        )

    def report_rejections_left(self, rejected: int, state: str) -> None:
        """The line and event of the ``rejected`` calls that ``state``, now ending, rejected
        since its last rejection line (see :meth:`_report_rejection`)."""
        emit(
            self.config,
            log_breaker,
            logging.WARNING,
            "Circuit breaker rejected %d more call(s) before leaving the %s state: service=%s",
            rejected,
            state,
            self.service,
            service=self.service,
            event="breaker_rejected",
            rejected=rejected,
            state=state,
            log=True,
        )

    def _open_error(self, retry_after: float, state: str = OPEN) -> CircuitOpenError:
        """The error of a rejected call: it names what opened the breaker, when known, and
        says half-open when every probe slot was taken."""
        return CircuitOpenError(
            self.service, retry_after, cause=self.open_cause, state=state, by_hand=self.by_hand
        )

    def _fleet_admit(self, fleet: Any) -> bool:
        """Not closed: reject from the local view while it says so, else ask Redis for a
        probe (the open time has passed, or every probe slot was taken a while ago)."""
        self._view_refuses()
        now = time.monotonic()
        reservation = secrets.token_hex(8)  # drawn before sending: names this attempt's probe
        try:
            decision, remaining, gen, opens, ours, hand = fleet.breaker_admit(
                self.service,
                self.config.half_open_probes,
                self.config.reset_timeout,
                reservation,
                view=self.lost_view(),
            )
        except FleetDown as down:
            if down.sent:  # Redis may run it when it resumes: released on rejoining
                down.reservation = reservation
            raise
        except BaseException:
            # interrupted (KeyboardInterrupt, a gevent timeout) once the admit may have gone
            # out: Redis may run it, a slot taken for an attempt that never runs; released by
            # the link's thread (an admit arriving after its release takes no slot)
            self._report_later(fleet, reservation, False)
            raise
        if decision == "probe":
            # (the half-open state after an opening by hand whose message this process missed:
            # said so, as the processes that followed the opening say it)
            self.fleet_update(HALF_OPEN, 0.0, gen, opens, answer=True, hand=hand, read=True)
            with self._lock:
                self._hold(reservation)
            return True
        if decision == CLOSED:
            # (a closing by hand whose message this process missed: said so, and why)
            self.fleet_update(CLOSED, 0.0, gen, opens, answer=True, hand=hand, read=True)
            return False
        if decision == OPEN:
            # (an opening by hand whose message this process missed: said so, and why)
            self.fleet_update(
                OPEN, remaining, gen, opens, answer=True, mine=ours, hand=hand, read=True
            )
            raise self._reject(remaining, OPEN)
        # half-open with every probe slot taken: the answer comes within one attempt; the
        # pub/sub message of the closing or re-opening ends the wait sooner
        self.fleet_update(HALF_OPEN, 0.0, gen, opens, answer=True, hand=hand, read=True)
        wait = self._retry_after_probe()
        self._fleet_wait = now + wait
        raise self._reject(wait, HALF_OPEN)

    def _view_refuses(self) -> None:
        """Raise :class:`CircuitOpenError` (counted and reported) while the fleet's state as
        this process sees it refuses an attempt (open, or half-open with every probe slot taken
        a moment ago), as :meth:`_fleet_admit` does before it asks Redis anything."""
        now = time.monotonic()
        if self._fleet_state == OPEN and now < self._fleet_until:
            raise self._reject(self._fleet_until - now, OPEN)
        if self._fleet_state == HALF_OPEN and now < self._fleet_wait:
            raise self._reject(self._fleet_wait - now, HALF_OPEN)

    def refuse_from_view(self) -> None:
        """:meth:`before_call`'s refusal that sends nothing, alone: raise
        :class:`CircuitOpenError` while a shared breaker's view refuses an attempt, else return
        (closed, or Redis to be asked, or not shared). For an async unit, refused on the event
        loop, without waiting for a worker thread to refuse it there."""
        fleet = self._fleet
        if fleet is not None and fleet.up and self._fleet_state != CLOSED:
            self._view_refuses()

    def _fleet_failure(self, fleet: Any, age: float, reservation: str | None = None) -> None:
        """Count the failure fleet-wide (Redis skips an attempt that began before the fleet's
        last counted failure and failed within the failover window after it, as
        :meth:`on_failure` does within this process). A half-open probe's failure carries its
        ``reservation``: it opens the shared breaker only while the reservation holds a probe
        slot (a probe still running past its lease counts nowhere when it ends, as a success
        would not count)."""
        sent = self._fleet_gen  # (the view's, when the script was sent)
        state, remaining, gen, failures, opens, by_me, run, ours, hand = fleet.breaker_failure(
            self.service,
            self.config.failure_threshold,
            self.config.reset_timeout,
            age,
            reservation=reservation,
            view=self.lost_view(),
            opens=self._fleet_opens,
        )
        self._fleet_failures = failures
        self._fleet_run = run
        if by_me:
            self._opened_here += 1
        # an opening this process made (this call, or another thread's just before) is its
        # own, not one it followed, whichever answer the view takes first; one made by hand,
        # whose message this process missed, says so (``hand``: the operator's reason)
        self.fleet_update(
            state,
            remaining,
            gen,
            opens,
            answer=True,
            mine=by_me or ours,
            sent_gen=sent,
            hand=hand,
            read=True,
        )
        if state == CLOSED:
            self._mirror_failures(failures)

    def _mirror_failures(self, failures: int) -> None:
        """The fleet counts ``failures`` in its current run (closed): the local breaker, what
        this process falls back to when Redis stops answering, counts as many, so that the
        fallback starts from what the fleet knew, not from zero."""
        with self._lock:
            storage = self._storage
            if storage.state != CLOSED or storage.counter == failures:
                return
            storage.reset_counter()
            for _ in range(min(failures, self.config.failure_threshold)):
                storage.increment_counter()

    def _fleet_reset_failures(self) -> None:
        """A success after failures this process saw counted: the fleet forgets them, if they
        are still the run it saw (once: the next successes send nothing)."""
        self._fleet_failures = 0
        run, self._fleet_run = self._fleet_run, ""
        fleet = self._fleet
        if fleet is not None and fleet.up and run:
            with contextlib.suppress(FleetDown):
                fleet.breaker_reset_failures(self.service, run)

    def _fleet_force(self, state: str, reason: str | None, seconds: float) -> bool:
        """Open (for ``seconds``) or close the shared breaker by hand, ``reason`` the
        operator's; False when it is not shared or Redis did not answer."""
        fleet = self._fleet
        if fleet is None or not fleet.up:
            return False
        # the change's pub/sub message (this process's own) may reach the view before the
        # answer does: it says it was made by hand too, with the reason (see _fleet._FORCE),
        # not "failures across the fleet". Nothing is noted here for it: a note of the
        # breaker's would be read by any change taken meanwhile (another thread's failure
        # opening it)
        try:
            st, rem, gen, opens, _ = fleet.breaker_force(
                self.service, state, seconds, opens=self._fleet_opens, hand=reason or ""
            )
        except FleetDown:
            return False
        if state == OPEN:
            self._opened_here += 1
        # this process's change, as its own pub/sub message says (``mine``)
        self.fleet_update(st, rem, gen, opens, answer=True, mine=True, hand=reason or "")
        return True

    def lost_view(self, *, since: float | None = None, proven: bool = False) -> View | None:
        """The fleet's opening as this process's view holds it, for Redis to write back if it
        lost the breaker's state (restarted empty, flushed; see ``restore_view`` in
        ``_fleet``'s scripts), sent with every breaker script of the failure path and the read
        on rejoining: open with the time it has left (its own end, not a new reset timeout),
        or half-open once that time is up, and made by hand (with the operator's reason) when
        it was, so that it comes back as the operator's, not as the failures'. Without it every
        process would follow the empty Redis, closed, and send its units to a database that is
        down still until the fleet counted the failure threshold again. None: the view is
        closed or holds no shared state, or the local breaker moved past it (closed by this
        process's probes or its ``close()`` while Redis did not answer), or holds an opening
        of its own (shared as such, see :meth:`fleet_rejoin`).

        None too when Redis has not confirmed the view within :data:`~._fleet.VIEW_FRESH`
        before ``since`` (the moment the link went down, on rejoining; None: now), unless
        ``proven`` (the link's subscription answered since Redis was found empty, see
        ``FleetLink._check_views``): the fleet may have moved past it meanwhile (closed it,
        or opened it anew) with this process hearing nothing of it (a subscription dropped
        without a reset), and a stale opening written back would reject every process's calls
        until its end.

        Read without the breaker's lock: the script goes out as it would without it (a
        failure's answer may be waiting for that lock), and a view changing meanwhile is
        written back only into a Redis that has no state at all."""
        gen, state = self._fleet_gen, self._fleet_state
        if gen <= 0 or state == CLOSED or self._opened_locally:
            return None
        if self._storage.state == CLOSED:
            return None
        now = time.monotonic()
        if not proven and self._view_seen < (now if since is None else since) - VIEW_FRESH:
            return None
        left = self._fleet_until - now if state == OPEN else 0.0
        # an opening by hand is written back as one, with its reason
        hand = (self.hand_reason or "") if self.by_hand else None
        if left > 0:
            return (OPEN, left, self._fleet_opens, gen, hand)
        return (HALF_OPEN, 0.0, self._fleet_opens, gen, hand)

    def holds_opening(self) -> bool:
        """Whether the view holds the fleet's opening with time left (the link's background
        thread checks that Redis still holds it, see ``FleetLink._check_views``); not once
        the opening is over, nor while it is this process's own."""
        view = self.lost_view(proven=True)
        return view is not None and view[0] == OPEN

    def doubt_view(self) -> None:
        """Redis was found without the breaker's state: the view is written back by no script
        until it is confirmed again (see :meth:`lost_view`)."""
        self._view_seen = -math.inf

    def confirm_view(self) -> None:
        """The link's subscription answered: every change published before was taken, so the
        view is the fleet's state as of now (see ``FleetLink._check_views``)."""
        self._view_seen = time.monotonic()

    def say_restored(self, state: str, remaining: float) -> None:
        """This process wrote the fleet's opening back into a Redis that had lost it (its own
        message, see ``FleetLink._on_message``): one line, no opening counted or logged (the
        opening was counted, and logged, when it was made)."""
        if state == OPEN:
            what = f"open, rejecting calls for {remaining:.1f} s more (its own end)"
        else:
            what = f"half-open, letting {self.config.half_open_probes} probe(s) through"
        emit(
            self.config,
            log_breaker,
            logging.WARNING,
            "Circuit breaker state restored: service=%s Redis had lost the shared state "
            "(restarted or flushed); this process wrote back the fleet's opening: %s",
            self.service,
            what,
            service=self.service,
            event="breaker_restored",
            state=state,
            open_for=round(max(0.0, remaining), 3),
        )

    def fleet_sync(
        self,
        answer: tuple[str, float, int, int, str | None],
        *,
        alone: str | None = None,
        takes: int | None = None,
    ) -> None:
        """The shared state as read on (re)connecting: it replaces the view whatever it was
        (an opening made by hand, followed now, says so); ``alone``: unless this process
        made an opening alone since (see :meth:`fleet_rejoin`); ``takes``: unless the view
        took a change since (see :meth:`fleet_update`)."""
        state, remaining, gen, opens, hand = answer
        self.fleet_update(
            state,
            remaining,
            gen,
            opens,
            answer=True,
            force=True,
            hand=hand,
            read=True,
            alone=alone,
            takes=takes,
        )

    def fleet_rejoin(self, fleet: Any, *, background: bool = True) -> str:
        """Redis answers again (the link's background thread; raises what the store raises),
        or this breaker was just attached to a link that is up (not ``background``: raises
        :class:`FleetDown`): read the shared state into the view, after sharing the opening
        this process made on its own meanwhile (or before it shared the breaker: a reload
        setting ``SELF_HEALING_REDIS_URL``), if it still holds one. Its failures opened it
        while Redis did not hear them; read back as closed (the fleet's breaker never opened,
        or Redis lost its state) it would be thrown away, and the next unit sent to the
        database that just failed. Redis takes it unless the shared breaker is open, or
        changed after it (the fleet's probes closed it since): then the fleet's state is
        followed. Without one, an opening of the fleet's that the view holds is written back
        if Redis lost the state meanwhile (see :meth:`lost_view`).

        Returns the name of the last opening made alone it saw (:attr:`alone_id`). The link
        is not up yet while its thread rejoins: a unit's failure (or an ``open()``) meanwhile
        opens the breaker alone, and the answer, read or sent before, does not replace that
        opening (it would close the breaker, said as the fleet's state, and the opening would
        never be shared); the link's thread calls this again once up (see
        ``FleetLink._rejoin``), sharing it."""
        with self._lock:
            alone = self.alone_id
            # read in a caller's thread (the link up), the answer races the link's thread
            # taking the messages of changes made meanwhile: it is not taken over a newer one
            takes = None if background else self._view_takes
            opening = None
            if self._opened_locally and self._storage.state == OPEN:
                remaining = self._remaining_open()
                if remaining > 0:
                    # its age: since this process opened it (an opening by hand lasts its
                    # seconds, not the reset timeout: its age is not the time it has used of one)
                    made = self._opened_alone_at
                    age = (
                        self._timer() - made
                        if made is not None
                        else self.config.reset_timeout - remaining
                    )
                    opening = (remaining, age)
            # an opening by hand is shared as one, with its reason
            hand = (self.hand_reason or "") if self.by_hand else None
        if opening is None:
            # (Redis lost the state while the view holds the fleet's opening, confirmed
            # shortly before the link went down: written back)
            view = self.lost_view(since=fleet.down_since)
            answer = fleet.breaker_read(self.service, background=background, view=view)
            self.fleet_sync(answer, alone=alone, takes=takes)
            return alone
        state, remaining, gen, opens, by_me, hand = fleet.breaker_share_opening(
            self.service,
            round(opening[0], 3),
            round(max(0.0, opening[1]), 3),
            background=background,
            opens=self._fleet_opens,
            hand=hand,
            alone=alone,
        )
        if by_me:
            self._opened_here += 1
        # (shared, its own opening, by hand or not, read back: the same opening, not said again)
        self.fleet_update(
            state,
            remaining,
            gen,
            opens,
            answer=True,
            force=True,
            mine=by_me,
            hand=hand,
            read=True,
            alone=alone,
            takes=takes,
        )
        return alone

    def fleet_update(
        self,
        state: str,
        remaining: float,
        gen: int,
        opens: int,
        *,
        answer: bool = False,
        force: bool = False,
        mine: bool = False,
        reason: str | None = None,
        sent_gen: int | None = None,
        hand: str | None = None,
        read: bool = False,
        alone: str | None = None,
        takes: int | None = None,
    ) -> None:
        """Take a state of the shared breaker into the view (and the local storage, whose
        listeners log the change). Messages older than the view are ignored; a script's
        ``answer`` with ``gen`` 0 (no shared state: Redis was flushed or restarted) is taken.
        ``mine``: this process made the change, by a failure or by ``open()``/``close()``
        (its answer and its message race); an opening it did not make is counted as followed,
        not in ``breaker_opens`` (see :class:`_LogListener`). ``sent_gen``: the view's ``gen``
        when the script answering was sent; a ``gen`` 0 answer to a script sent before the view
        moved on (another thread's answer or a message came in between) was read before that
        change, and says nothing of Redis losing its state: ignored. ``hand``: the change was
        made by hand (``open_breaker``, ``close_breaker``; the operator's reason, ``""`` for
        none), by this process when ``mine``: said so by the lines and rejections; a change
        by hand is said even when the view was in that state already (an opening by hand
        made again, a closing by hand of a closed breaker), unless it is a ``read`` of the
        state (the opening a read finds by hand is said so when it is new to the view).
        ``alone``: the name of the last opening made alone when the script answering was sent
        (see :meth:`fleet_rejoin`); the answer is not taken when one was made since.
        ``takes``: the view's count of changes taken when the script answering was sent; the
        answer of a ``force`` read sent by a caller's thread while the link is up is not taken
        when the view took a change since (the link's thread took its message: the read may
        have been answered before that change, and would replace it; every later change comes
        by its message)."""
        if state not in (CLOSED, OPEN, HALF_OPEN):
            return
        with self._lock:
            if alone is not None and alone != self.alone_id:
                return
            if takes is not None and takes != self._view_takes:
                return
            if answer and gen == 0 and not force and sent_gen not in (None, self._fleet_gen):
                return
            if not (force or gen > self._fleet_gen or (answer and gen == 0)):
                if gen == self._fleet_gen and gen > 0:
                    self._view_seen = time.monotonic()  # Redis confirms the view
                if gen == self._fleet_gen and state == OPEN and remaining > 0:
                    # a fresher figure of the same opening, whose end in Redis is fixed: each
                    # figure arrives after it was taken (a pub/sub message can be late by
                    # whatever the subscriber thread waited), so the earliest end is the truest
                    self._fleet_until = min(self._fleet_until, time.monotonic() + remaining)
                return
            seen = gen == self._fleet_gen and gen != 0  # the view had this state already
            # the view had a shared state, and Redis has none now: restarted, or flushed
            lost = gen == 0 and self._fleet_gen > 0
            # an opening the fleet made since the view's last (each one counts in ``opens``;
            # one written back into a Redis that lost it keeps the count it had: the same), but
            # for the one this process made alone, shared now (its own, said when made)
            opened_since = opens > self._fleet_opens and not (mine and self._opened_locally)
            self._fleet_gen = gen
            self._view_takes += 1
            self._view_seen = time.monotonic()
            self._opened_locally = False  # the view and the local breaker follow the fleet
            restarted, self._view_restarted = self._view_restarted, False
            self._fleet_opens = max(self._fleet_opens, opens) if not force else opens
            if state == OPEN:
                # (the end first: admission reads the state, then the end, without the lock;
                # a view read as OPEN always has its own opening's end)
                self._fleet_until = time.monotonic() + max(0.0, remaining)
            self._fleet_state = state
            if state != HALF_OPEN:
                self._fleet_wait = 0.0
            if state != CLOSED:
                self._fleet_failures = 0
            changed_by_hand = hand is not None and not read
            # a closing by hand: its message, or a read or an answer that is the first to tell
            # of it (its message missed: a subscription dropped without a reset), said so
            closing_by_hand = (
                state == CLOSED
                and hand is not None
                and (changed_by_hand or self._storage.state != CLOSED)
            )
            if closing_by_hand:
                self._fleet_failures = 0
                self._fleet_run = ""
                self._last_failure = -math.inf
                if self.close_reason is None:
                    self.close_reason = _hand_phrase(hand, elsewhere=not mine)
                    self.closing_by_hand = True
            if state == HALF_OPEN and hand is not None:
                # the half-open state after an opening by hand (learnt from a read, an answer,
                # or the half-open message) is the operator's, as after one the view followed
                if not self.by_hand or (hand or None) != self.hand_reason:
                    self._take_hand(hand, elsewhere=not mine)
            elif state == HALF_OPEN and read and self.by_hand:
                self._forget_hand()  # (Redis says the opening before it was the failures')
            if self._storage.state == state and state != OPEN and not changed_by_hand:
                return
            if seen and state == OPEN and remaining <= 0 and self._storage.state != OPEN:
                # read back after a Redis blip: an opening this view followed already, over
                # since (nobody asked Redis for a probe yet), which the local breaker got past
                # meanwhile. Not an opening to follow again (logged, counted as another
                # process's): the next call asks Redis for a probe
                return
            if state == OPEN and remaining <= 0 and not mine and self._storage.state == CLOSED:
                # another process's opening, over before this view met it (nobody asked Redis
                # for a probe since: the fleet idle, or restarted, this process started after
                # it): nothing is rejected here, the next call asks Redis for the fleet's
                # probe. The local breaker takes it half-open, as it would have got past it:
                # not said opened ("rejecting calls for 0.0 s" on every new worker) nor
                # counted as an opening followed
                if hand is not None:
                    self._take_hand(hand, elsewhere=True)
                self._probes = 0
                self._set_state(HALF_OPEN)
                return
            # mirror into the local breaker: what it falls back to, and its listeners log
            self._probes = 0
            if state == CLOSED and self.close_reason is None and self._takes_at_attach is not None:
                # read back by the link that being switched on again attached, before
                # switch_on: the local state it closes is the one held when switched off
                self.close_reason = _switched_on_again(self._storage.state)
            if state == CLOSED and gen == 0 and self.close_reason is None:
                # no shared state: not the database's recovery (it may well be down still)
                self.close_reason = (
                    "no state shared through Redis any more (Redis restarted or flushed, or "
                    "another Redis): starting closed"
                    if lost
                    else "following the state shared through Redis: closed (no process has "
                    "opened it)"
                )
            if state == OPEN:
                self._stamp_opening(self.config.reset_timeout - max(0.0, remaining))
                # a new state (not ``seen``) read while the local breaker is still open (its
                # time over, no call came since, or its message missed): taken silently when it
                # is the same opening (written back into a Redis that lost it: the fleet's count
                # of openings unchanged, and the same maker), else said as its message would
                # have said it: a new opening (a re-opening by hand with the same reason, say),
                # or one whose maker, an operator or the failures, or operator's reason differs
                # (a by-hand opening whose message was missed, learnt from an answer or a read)
                new_maker = not seen and (
                    opened_since
                    or (hand is not None) != self.by_hand
                    or (hand is not None and (hand or None) != self.hand_reason)
                )
                if self._storage.state == OPEN and not changed_by_hand and not new_maker:
                    return  # the same opening, a fresher remaining time
                if hand is not None and state == OPEN:
                    self._take_hand(hand, elsewhere=not mine)
                    reason = _hand_phrase(hand, elsewhere=not mine)
                else:
                    self._forget_hand()
                    # what this process's failures were
                    self.open_cause = self._last_cause if mine and reason is None else None
                if reason is None and restarted and not mine:
                    # switched on again: the fleet's opening, whoever made it, read back
                    reason = "being switched on again (the state shared through Redis, read back)"
                if reason is None:
                    reason = (
                        (
                            "a half-open probe failed"
                            if self._storage.state == HALF_OPEN
                            else f"{self.config.failure_threshold} consecutive failures across "
                            "the fleet (shared through Redis)"
                        )
                        if mine
                        else "another process's failures (shared through Redis)"
                    )
                self.open_reason = reason
                self.open_followed = not mine
                self.open_left = max(0.0, remaining)
            try:
                self._set_state(state)
            finally:
                if closing_by_hand:
                    self.close_reason = None
                    self.closing_by_hand = False

    # -- internals (callers hold self._lock) ------------------------------------------------
    def _open(
        self,
        cause: str | None,
        *,
        by_hand: bool = False,
        reason: str | None = None,
        seconds: float | None = None,
    ) -> None:
        """Open on this process's own decision (not shared, or Redis did not answer): for its
        failures (``cause``, what they were), or ``by_hand`` (``reason``: the operator's) for
        ``seconds`` (None: the reset timeout)."""
        self._probes = 0
        if by_hand:
            self._take_hand(reason, elsewhere=False)
        else:
            self.open_cause = cause
            self._forget_hand()
        self._stamp_opening(0.0 if seconds is None else self.config.reset_timeout - seconds)
        self._set_state(OPEN)
        self._opened_locally = self._fleet is not None
        self._opened_alone_at = self._timer()
        self.alone_id = secrets.token_hex(8)

    def _close_saying(self, reason: str, *, by_hand: bool = False) -> None:
        """Close, the line saying ``reason`` (not a recovery), ``by_hand`` an operator's."""
        self.close_reason = reason
        self.closing_by_hand = by_hand
        try:
            self._set_state(CLOSED)
        finally:
            self.close_reason = None
            self.closing_by_hand = False

    def _forget_hand(self) -> None:
        """The opening about to be taken is the failures', not an operator's."""
        self.by_hand = False
        self.hand_reason = None

    def _set_state(self, state: str) -> None:
        self._entering(state)
        self._storage.state = state
        # a new start, as pybreaker's own changes make it: the failures counted toward the
        # next opening on closing, the probes' successes on opening and half-opening
        if state == CLOSED:
            self._storage.reset_counter()
        else:
            self._storage.reset_success_counter()
        # pybreaker's setter builds its state object and notifies the listeners. The
        # listener tells this breaker's change from one noticed in its storage by the thread
        self.setting = threading.get_ident()
        try:
            self._cb.state = state
        finally:
            self.setting = None

    def _entering(self, state: str) -> None:
        """This breaker's own notes as it enters ``state``, by its own change or one made
        elsewhere: not opened here alone; half-open, a new lease for new probes (those of an
        earlier half-open state still running hold no slot of this one)."""
        self._opened_locally = False
        self._opened_alone_at = None
        if state == HALF_OPEN:
            self._lease_from = self._timer()
            self._probe_era += 1

    def _stamp_opening(self, elapsed: float) -> None:
        """The breaker opened ``elapsed`` seconds ago: the storage's ``opened_at`` says when
        (the time of day, pybreaker's field), and the timer's time is kept beside the value
        read back (a storage may round it: pybreaker's Redis storage keeps whole seconds, and
        keeps the later of two)."""
        self._storage.opened_at = datetime.fromtimestamp(self._wall() - elapsed, _UTC)
        self._opened = (self._storage.opened_at, self._timer() - elapsed)
        self._open_seen = self._opened[0]

    def _open_left(self) -> float:
        """:meth:`_remaining_open`, the storage read open as this breaker knows it: an opening
        made after the one it is in (another process sharing a storage of the caller's closed
        it and opened it again between two reads here: the state read is the one known, but
        its ``opened_at`` is another) is noticed first, said and told as a change is (see
        :meth:`noticed`). The ``opened_at`` read is the one the time left needs: nothing more
        is read while the opening is the one known."""
        opened_at = self._storage.opened_at
        if self._reopened(opened_at):
            with self._lock:
                if self._notice_locked() != OPEN:
                    return 0.0  # (half-open or closed since: the caller reads it again)
            opened_at = self._storage.opened_at
        return self._left_of(opened_at)

    def _reopened(self, opened_at: datetime | None) -> bool:
        """Whether ``opened_at``, read from a storage of the caller's while this breaker is
        open, is another opening's than the one it is in. (None, a storage that could not read
        it, is no new opening.)"""
        seen = self._open_seen
        return (
            self.storage_given is not None
            and self.known == OPEN
            and opened_at is not None
            and seen is not None
            and opened_at != seen
        )

    def _remaining_open(self) -> float:
        """Seconds the opening in the storage has left (see :meth:`_left_of`)."""
        return self._left_of(self._storage.opened_at)

    def _left_of(self, opened_at: datetime | None) -> float:
        """Seconds the opening stamped ``opened_at`` has left. Timed by the monotonic timer
        when this breaker stamped it; an opening stamped by another breaker sharing the storage
        (another process's, through a storage of the caller's) is timed by its ``opened_at``."""
        if opened_at is None:
            return 0.0
        mine = self._opened
        if mine is not None and mine[0] == opened_at:
            elapsed = self._timer() - mine[1]
        else:
            elapsed = self._wall() - opened_at.timestamp()
        return float(self.config.reset_timeout - elapsed)

    def _now(self) -> float:
        return self._timer()

    def _retry_after_probe(self) -> float:
        # Half-open with every probe slot taken: the answer comes within one attempt.
        return min(self.config.reset_timeout, 1.0)

    def __repr__(self) -> str:
        return f"<Breaker service={self.service!r} state={self.state}>"


def _hand_phrase(reason: str | None, *, elsewhere: bool) -> str:
    """How a line says a change was made by hand: ``by hand (database upgrade)``."""
    where = " in another process (shared through Redis)" if elsewhere else ""
    return f"by hand{where}" + (f" ({reason})" if reason else "")


def _hand_cause(reason: str | None, *, elsewhere: bool) -> str:
    """What a call rejected by an opening made by hand is told (``CircuitOpenError.cause``):
    ``opened by hand: database upgrade``."""
    where = " in another process" if elsewhere else ""
    return f"opened by hand{where}" + (f": {reason}" if reason else "")


def breaker_settings(config: Config) -> tuple[Any, ...]:
    """What a breaker takes from a configuration."""
    return (
        config.failure_threshold,
        config.reset_timeout,
        config.half_open_probes,
        config.redis_url,
        config.redis_timeout,
    )


def _same_breaker_settings(a: Config, b: Config) -> bool:
    return breaker_settings(a) == breaker_settings(b)


def _settings_text(config: Config) -> str:
    shared = "shared" if config.redis_url else "local"
    return (
        f"(failure_threshold={config.failure_threshold}, reset_timeout={config.reset_timeout:g} s,"
        f" half_open_probes={config.half_open_probes}, {shared})"
    )


def _switched_on_again(was: str) -> str:
    """Why a breaker switched on again closes (see :meth:`Breaker.switch_on`)."""
    return f"switched on again (it was {was} when switched off; that state is not kept while off)"


def breaker_for(
    service: str,
    config: Config,
    *,
    storage: Any = None,
    listeners: Iterable[Any] = (),
    clock: Callable[[], float] | None = None,
    user: object,
    explicit: bool = True,
) -> Breaker:
    """The breaker of ``service``, created on first use; later calls may update its numbers
    (see :meth:`Breaker.follow`: ``user`` asks, ``explicit`` when ``config`` is a ``config=``
    of the code, not the environment's).

    A service has one breaker and so one state storage: asking for it with another storage
    than the one it was made with is refused (ValueError), never silently ignored.

    A breaker attached here to a Redis link that is up reads its shared state once the
    registry's lock is released, not under it: the link's thread, taking a change of that
    breaker meanwhile, tells its listeners under the breaker's lock, and a listener (or a
    hook) asking for ``health()`` waits for the registry's lock; the read, taking the state
    into the breaker under its lock, waited for the link's thread: both hung for good.
    """
    outer: list[tuple[Any, Breaker]] | None = getattr(_READ_LATER, "pending", None)
    pending: list[tuple[Any, Breaker]] = [] if outer is None else outer
    _READ_LATER.pending = pending
    listeners = tuple(listeners)
    try:
        while True:
            with STATE.lock:
                refused = storage_refused(service, storage)
                if refused is not None:
                    raise ValueError(refused)
                found: Breaker | None = STATE.breakers.get(service)
                if found is None:
                    check_service_room(service, STATE.breakers)
                    found = Breaker(service, config, storage=storage, clock=clock)
                    STATE.breakers[service] = found
                elif clock is not None:
                    found.set_clocks(clock)
                breaker = found
            # (for as long as a user giving it lives; outside the registry's lock, as the
            # listeners are told of a change under pybreaker's lock: see add_listener), before
            # the configuration is followed, so that they hear what following it changes
            for listener in listeners:
                breaker.add_listener(listener, user)
            with STATE.lock:
                current: Breaker | None = STATE.breakers.get(service)
                if current is not breaker:
                    continue  # forgotten meanwhile (reset_state): the service's new one
                breaker.follow(config, user=user, explicit=explicit)
            return breaker
    finally:
        if outer is None:  # (a call made inside another leaves the reads to the outer one)
            _READ_LATER.pending = None
            for link, attached in pending:
                link.sync_breaker(attached)


#: the breakers attached to a link while :func:`breaker_for` holds the registry's lock, whose
#: shared state it reads once that lock is released (``pending``: None outside)
_READ_LATER = threading.local()


def storage_refused(service: str, storage: Any) -> str | None:
    """Why the breaker of ``service`` can't be had with ``storage`` (None: it can): a service
    has one breaker, made with the storage its first user gave."""
    with STATE.lock:
        breaker: Breaker | None = STATE.breakers.get(service)
    if breaker is None or storage is None or storage is breaker.storage_given:
        return None
    return (
        f"service {service!r} already has a circuit breaker with "
        f"{_describe(breaker.storage_given)}; this factory asks for "
        f"{_describe(storage)}. A service has one breaker: pass the same storage "
        "object, or give this factory another service name"
    )


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
