"""The retry budget: retries may add a ratio of recent first attempts, plus a small floor.

The idea is Finagle's ``RetryBudget`` (every request deposits, every retry withdraws; deposits
expire after a time-to-live; a minimum number of retries per second stays allowed) and gRPC's
retry throttling (retries stop while failures outweigh successes): under an outage, when every
first attempt fails, retries add at most ``ratio`` x the first attempts instead of
``max_retries`` x, so the load on a weak database is bounded by what its callers send anyway.

Here:

* deposits are the service's first attempts in the last :data:`WINDOW` seconds. They are read
  from the counters the process keeps anyway (``attempts - retries`` of the service), so the
  success path does nothing more for the budget;
* a retry of an outage (unavailable, disconnect) is allowed while ``ratio x deposits`` exceeds
  the retries already spent in the window by at least one;
* the floor is a token bucket refilled at ``floor`` retries per second holding at most one
  second's worth, so a quiet service can still retry a little. Finagle reserves
  ``minRetriesPerSec x ttl`` up front (100 retries by default); a bucket of one second's worth
  keeps the burst at the start of an outage small;
* conflicts (40001, 40P01, 55P03) are not charged: they prove the server is up and answering,
  are bounded per unit by ``max_retries`` and back off in tens of milliseconds.

:class:`LocalBudget` is the pure arithmetic (injectable clock, no I/O). :class:`RetryBudget` is
the budget of one service: with ``SELF_HEALING_REDIS_URL`` the same arithmetic runs atomically in
Redis for the whole fleet (see :mod:`resilient_db._fleet`), and the local one is the fallback.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ._config import Config, ConfigUsers
from ._observability import (
    BudgetHealth,
    FleetBudgetHealth,
    LineLimit,
    emit,
    log_retry,
    more_since,
    stats_for,
)
from ._state import STATE, check_service_room

__all__ = [
    "WINDOW",
    "LocalBudget",
    "RetryBudget",
    "Withdrawal",
    "budget_for",
    "budgets",
    "recent",
    "spread",
    "whole_retries",
]

#: seconds a first attempt counts as "recent" (Finagle's default ttl)
WINDOW = 10
#: at most one "Retry budget exhausted" line per service in this many seconds
EXHAUSTED_LOG_PERIOD = 10.0


def spread(delta: int, start: float, end: float) -> dict[int, float]:
    """``delta`` first attempts made evenly between ``start`` and ``end``, by second: each
    second gets its share of the span (a second the span covers in part, a part), so they add
    up to ``delta``; those of seconds past the window are left out."""
    second = math.floor(end)
    span = end - start
    if span <= 1.0:
        return {second: float(delta)}
    rate = delta / span
    lo = max(start, float(second - WINDOW + 1))
    shares = {s: rate * (min(end, s + 1) - max(lo, s)) for s in range(math.floor(lo), second)}
    # the last second takes what is left when nothing was left out: the total is exact
    shares[second] = delta - sum(shares.values()) if lo == start else rate * (end - second)
    return {s: share for s, share in shares.items() if share > 0}


def recent(deposits: dict[int, float], now: float) -> list[tuple[int, float]]:
    """``deposits`` (by second) still within the window at ``now``, as (age in whole seconds,
    amount): the fleet places each in its own second of Redis time (hosts' clocks differ)."""
    second = math.floor(now)
    return [(second - s, amount) for s, amount in deposits.items() if second - s < WINDOW]


class LocalBudget:
    """The budget arithmetic over per-second buckets (callers hold a lock).

    ``observe(first_attempts, now)`` feeds the running count of first attempts; a count seen
    after a long gap is spread evenly over the gap, so first attempts made long ago (a quiet
    process that never needed the budget) don't count as recent.
    """

    def __init__(self, ratio: float, floor: int, now: float, first_attempts: int = 0) -> None:
        self.ratio = ratio
        self.floor = floor
        self._deposits: dict[int, float] = {}
        self._spent: dict[int, int] = {}
        # retries the floor paid for, by second: counted for ``health()`` only (the ratio's
        # arithmetic takes what the ratio paid)
        self._floor_spent: dict[int, int] = {}
        self._seen = first_attempts
        self._seen_at = now
        self._tokens = float(floor)  # the floor's bucket starts with one second's worth
        self._tokens_at = now

    def observe(
        self,
        first_attempts: int,
        now: float,
        *,
        reset: bool = False,
        into: dict[int, float] | None = None,
    ) -> int:
        """Take the running count of first attempts; returns how many are new (``into``: the
        deposits made, by second, are added there too).

        The count (attempts - retries) dips by one while a retry has been counted and its
        attempt has not ended yet, and comes back when it has: a dip is not a reset, so the
        count is measured from its highest value (a dip followed by its return would otherwise
        count the retry as a new first attempt). ``reset``: the counters started again.
        """
        if reset:
            self._seen, self._seen_at = first_attempts, now
            return 0
        delta = first_attempts - self._seen
        if delta == 0:
            self._seen_at = now  # nothing new since the last look: a later count starts here
        if delta <= 0:
            return 0  # nothing new, or retries still in flight
        self._seen = first_attempts
        span = now - self._seen_at
        self._seen_at = now
        for s, amount in spread(delta, now - span, now).items():
            self._deposits[s] = self._deposits.get(s, 0.0) + amount
            if into is not None:
                into[s] = into.get(s, 0.0) + amount
        return delta

    def totals(self, now: float) -> tuple[float, int]:
        """First attempts and ratio-paid retries within the window (old buckets dropped)."""
        self.prune(now)
        return sum(self._deposits.values()), sum(self._spent.values())

    def prune(self, now: float) -> None:
        """Drop the buckets of seconds that have left the window."""
        oldest = math.floor(now) - WINDOW
        for buckets in (self._deposits, self._spent, self._floor_spent):
            for s in [s for s in buckets if s <= oldest]:
                del buckets[s]

    def retries(self, now: float) -> int:
        """Retries spent within the window, whatever paid for them (the ratio or the floor)."""
        _, spent = self.totals(now)
        return spent + sum(self._floor_spent.values())

    def floor_tokens(self, now: float) -> float:
        elapsed = max(0.0, now - self._tokens_at)
        self._tokens = min(float(self.floor), self._tokens + elapsed * self.floor)
        self._tokens_at = now
        return self._tokens

    def try_withdraw(self, now: float) -> str | None:
        """Spend one retry: ``"ratio"`` or ``"floor"`` (what paid for it), or None (spent)."""
        deposits, spent = self.totals(now)
        if self.ratio * deposits - spent >= 1.0:
            _count(self._spent, now)
            return "ratio"
        if self.floor_tokens(now) >= 1.0:
            self._tokens -= 1.0
            _count(self._floor_spent, now)
            return "floor"
        return None

    def refund(self, paid_by: str, at: float, now: float) -> None:
        """Give back one retry spent at ``at`` (``paid_by``: what paid for it) whose attempt
        never ran: a ratio-paid one leaves its second (nothing when that second has left the
        window), a floor-paid one goes back into the bucket (never above one second's worth)."""
        if paid_by == "ratio":
            _uncount(self._spent, at)
        elif paid_by == "floor":
            _uncount(self._floor_spent, at)
            self._tokens = min(float(self.floor), self.floor_tokens(now) + 1.0)

    def record(self, paid_by: str, now: float) -> None:
        """Account a retry granted elsewhere (the fleet), so a fallback starts warm."""
        if paid_by == "ratio":
            _count(self._spent, now)
        elif paid_by == "floor":
            _count(self._floor_spent, now)
            self._tokens = max(0.0, self.floor_tokens(now) - 1.0)

    def available(self, now: float) -> float:
        """The retries :meth:`try_withdraw` would pay for now."""
        deposits, spent = self.totals(now)
        return whole_retries(self.ratio * deposits - spent, self.floor_tokens(now))


def whole_retries(ratio_left: float, floor_tokens: float) -> float:
    """The retries a budget pays for with ``ratio_left`` (the ratio of its first attempts less
    what the ratio paid) and ``floor_tokens``: each pays whole retries only (a retry needs one
    whole left of either), so 0.5 and 0.9 pay for none, where their sum read as 1.4 retries
    available while every failing unit gave up, the budget spent."""
    return float(math.floor(max(0.0, ratio_left)) + math.floor(max(0.0, floor_tokens)))


def _count(buckets: dict[int, int], at: float) -> None:
    second = math.floor(at)
    buckets[second] = buckets.get(second, 0) + 1


def _uncount(buckets: dict[int, int], at: float) -> None:
    """Take back one counted at ``at`` (nothing when its second has left the window)."""
    second = math.floor(at)
    left = buckets.get(second, 0)
    if left > 1:
        buckets[second] = left - 1
    elif left == 1:
        del buckets[second]


class Withdrawal(NamedTuple):
    """A retry a budget paid for (:meth:`RetryBudget.withdraw`), kept until its attempt
    starts: given back (:meth:`RetryBudget.refund`) if it never does."""

    #: what paid for it: ``"ratio"`` or ``"floor"``
    paid_by: str
    #: when, by the budget's clock
    at: float
    #: the fleet link whose Redis paid for it, or None (this process alone)
    fleet: Any


class RetryBudget:
    """The retry budget of one service (one per service name, like its breaker)."""

    def __init__(
        self, service: str, config: Config, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.service = service
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        ratio = config.retry_budget or 0.0
        self._counters = stats_for(service)
        first_attempts = self._counters.attempts - self._counters.retries
        self._local = LocalBudget(ratio, config.retry_budget_floor, clock(), first_attempts)
        #: first attempts not yet added to the fleet's count, by second of this budget's clock:
        #: only those still within the window are sent (those of a long Redis outage, or of a
        #: long time before the budget was shared, are not recent any more)
        self._pending: dict[int, float] = {}
        #: retries the ratio paid for in this process alone while its budget is meant to be
        #: shared (Redis did not answer), by second: their first attempts go to the fleet's
        #: count when Redis answers again, and so do they, else the fleet would pay the ratio
        #: of those first attempts a second time
        self._alone: dict[int, int] = {}
        self.granted = 0
        self.exhausted = 0
        self._lines = LineLimit(EXHAUSTED_LOG_PERIOD, clock)  # the "exhausted" line's rate
        self._last_line: float | None = None  # when the last "exhausted" line was logged
        self._fleet: Any = None  # the FleetLink while shared through Redis
        #: the fleet's figures as Redis last reported them, when (this budget's clock), and
        #: Redis's time when it ran the script whose answer they are
        self._fleet_view: tuple[float, FleetBudgetHealth | None, float] = (
            -math.inf,
            None,
            -math.inf,
        )
        # the live users whose config= of the code decides the settings (see follow)
        self._users = ConfigUsers()
        self._attach(config)

    # -- configuration -----------------------------------------------------------------------
    def follow(self, config: Config, *, user: object, explicit: bool) -> None:
        """``user`` of this budget (a factory's or ``with_self_healing``'s policy; at its
        creation, at a reload) asks for the budget settings of ``config``, a ``config=`` of
        the code when ``explicit`` (else the environment's). A service has one retry budget,
        as it has one breaker (see ``Breaker.follow``, the same rule): while a user that gave
        a ``config=`` lives, the environment's settings don't replace its settings (nor take
        the budget off the Redis it shares, the breaker staying there), and another
        ``config=`` that differs is warned about (the later one is followed)."""
        follow, conflicting = self._users.asks(
            config, self.config, user=user, explicit=explicit, same=_same_budget_settings
        )
        if not follow:
            return
        if conflicting:
            emit(
                config,
                log_retry,
                logging.WARNING,
                "Retry budget settings differ for service=%s: %s asked for before, %s now; "
                "a service has one retry budget, which follows the later. Give both the same "
                "settings, or each its own service name",
                self.service,
                _settings_text(self.config),
                _settings_text(config),
                service=self.service,
                event="budget_settings_conflict",
            )
        self.apply_config(config)

    def held_by(self, user: object) -> None:
        """``user`` is about to ask for this budget with a ``config=`` of the code."""
        self._users.hold(user)

    def asked_in_code(self) -> bool:
        """Whether a live user asked for this budget with a ``config=`` of the code (see
        :func:`forget_unused`; asked under ``STATE.lock``)."""
        return self._users.any_explicit()

    def apply_config(self, config: Config) -> None:
        with self._lock:
            self.config = config
            self._local.ratio = config.retry_budget or 0.0
            self._local.floor = config.retry_budget_floor
        self._attach(config)

    def _attach(self, config: Config) -> None:
        """Count with the fleet of ``config.redis_url``, leaving the link of another Redis this
        budget counted with (closed when nothing else is attached to it)."""
        from ._fleet import attach, detach  # noqa: PLC0415 - the fleet imports this module

        link = attach(config, budget=self) if config.redis_url else None
        old, self._fleet = self._fleet, link
        if old is not None and old is not link:
            detach(old, budget=self)

    def after_fork_in_child(self) -> None:
        """In a forked child: new locks (a thread of the parent may have held them), and none
        of the parent's first attempts. Those the parent had not yet added to the fleet's
        count (pending), and those made since its last look at its counters (the child
        inherits the counters), are the parent's: it sends them itself, and the child sending
        its copy would count them twice fleet-wide. The child counts from here, as a process
        started now: the recent first attempts (and retries) of its own figures are the
        parent's too, and kept, every child forked could spend their ratio once more on its
        own, the parent still spending it."""
        self._lock = threading.Lock()
        self._lines = LineLimit(EXHAUSTED_LOG_PERIOD, self._clock)
        self._last_line = None
        self._pending = {}
        self._alone = {}
        snap = self._counters
        local = self._local
        self._local = LocalBudget(
            local.ratio, local.floor, self._clock(), snap.attempts - snap.retries
        )

    # -- the first attempts ------------------------------------------------------------------
    def _observe(self, now: float) -> int:
        """New first attempts since the last look (callers hold the lock), also added to those
        pending for the fleet. Every attempt is counted, retries too, and every retry is counted
        before its attempt: the difference is the units started (their first attempts)."""
        snap = stats_for(self.service)
        reset = snap is not self._counters  # reset_state() made new counters
        self._counters = snap
        pending = self._pending
        new = self._local.observe(snap.attempts - snap.retries, now, reset=reset, into=pending)
        oldest = math.floor(now) - WINDOW
        for s in [s for s in pending if s <= oldest]:
            del pending[s]
        for s in [s for s in self._alone if s <= oldest]:
            del self._alone[s]
        # the local buckets too: while the fleet pays for retries nothing else reads (and so
        # prunes) them, and the background thread's flush adds one a second of traffic
        self._local.prune(now)
        return new

    def observe(self) -> None:
        """Look at the first attempts now (while Redis is down: each lands in its own second,
        and those older than the window are not sent when it is back)."""
        with self._lock:
            self._observe(self._clock())

    def take_pending(self) -> list[tuple[int, int]]:
        """First attempts seen since the last call and still within the window, as (age in
        seconds, count) (for the fleet's count); observes first. Counts are whole numbers (the
        fleet's hash holds integers, which every release's script adds to): a fraction left
        over, less than one first attempt, waits for the next call."""
        with self._lock:
            now = self._clock()
            self._observe(now)
            pending: list[tuple[int, int]] = []
            carry = 0.0
            for age, amount in sorted(recent(self._pending, now), reverse=True):  # oldest first
                carry += amount
                whole = math.floor(carry + 1e-9)
                carry = max(0.0, carry - whole)
                if whole > 0:
                    pending.append((age, whole))
            self._pending = {math.floor(now): carry} if carry > 1e-9 else {}
            return pending

    def take_alone(self) -> list[tuple[int, int]]:
        """Retries the ratio paid for in this process alone (Redis did not answer) since the
        last call and still within the window, as (age in seconds, count), for the fleet's
        count of retries spent."""
        with self._lock:
            now = self._clock()
            second = math.floor(now)
            alone = [(second - s, n) for s, n in sorted(self._alone.items()) if second - s < WINDOW]
            self._alone = {}
            return alone

    def give_back_alone(self, alone: list[tuple[int, int]]) -> None:
        """The fleet did not take ``alone`` (see :meth:`give_back`): keep them."""
        with self._lock:
            second = math.floor(self._clock())
            for age, n in alone:
                self._alone[second - age] = self._alone.get(second - age, 0) + n

    @property
    def alone_pending(self) -> bool:
        """Whether retries paid for alone wait to be added to the fleet's count."""
        return bool(self._alone)

    def give_back(self, pending: list[tuple[int, int]]) -> None:
        """The fleet did not take ``pending`` (its script surely did not run: the link was
        down, the connection refused): keep them, in their seconds. One that may have run
        (a timeout) does not give them back: sent again, they would count twice."""
        with self._lock:
            second = math.floor(self._clock())
            for age, amount in pending:
                self._pending[second - age] = self._pending.get(second - age, 0.0) + float(amount)

    def now(self) -> float:
        """This budget's clock."""
        return self._clock()

    def fleet_figures(self, figures: FleetBudgetHealth, *, sent: float, ran: float) -> None:
        """The fleet's totals as Redis reported them (for ``health()``): ``ran`` is Redis's
        time when the script ran, ``sent`` this budget's clock when it was sent. Two threads'
        scripts sent together: the answer taken last may be the one Redis ran first (its
        thread preempted), and the figures shown were then those of a script older than
        Redis's count, until the next script (after an outage: for up to the window). Kept
        unless Redis ran it before those shown; one sent after those shown were taken ran
        after them, whatever Redis's clock says (set back meanwhile)."""
        with self._lock:
            taken, _, shown_ran = self._fleet_view
            if sent < taken and ran < shown_ran:
                return
            self._fleet_view = (self._clock(), figures, ran)

    # -- spending ----------------------------------------------------------------------------
    def withdraw(self) -> Withdrawal | None:
        """One retry of an outage: what paid for it (fleet-wide when shared), or None when the
        budget is spent. Given back by :meth:`refund` if its attempt never runs."""
        link = self._fleet
        if link is not None and not link.up:
            # a link still making its first attempt (a process just started): the fleet's
            # word, not a full floor of this process's own (at most the Redis timeout)
            link.wait_first_attempt()
        if link is not None and link.up:
            pending = self.take_pending()
            paid_by = link.budget_withdraw(self, pending)
            if paid_by is not None:  # the fleet answered: its word counts
                with self._lock:
                    if paid_by:
                        now = self._clock()
                        self._local.record(paid_by, now)
                        self.granted += 1
                        return Withdrawal(paid_by, now, link)
                    return None
            # Redis did not answer: this process decides alone (the link gave ``pending`` back
            # unless Redis may have counted them all the same)
        with self._lock:
            now = self._clock()
            self._observe(now)
            paid_by = self._local.try_withdraw(now)
            if paid_by is not None:
                self.granted += 1
                if paid_by == "ratio" and link is not None:
                    _count(self._alone, now)  # (for the fleet, when Redis answers again)
                return Withdrawal(paid_by, now, None)
            return None

    def refund(self, withdrawal: Withdrawal) -> None:
        """The retry ``withdrawal`` paid for never ran (the breaker refused its attempt, or
        the unit was interrupted while it backed off): the budget gets it back, in this
        process and, when the fleet paid for it, in Redis (atomically, by a script). Redis not
        answering: this process's own figures only, as a withdrawal falls back."""
        with self._lock:
            now = self._clock()
            self._local.refund(withdrawal.paid_by, withdrawal.at, now)
            self.granted = max(0, self.granted - 1)
            if withdrawal.fleet is None and withdrawal.paid_by == "ratio":
                _uncount(self._alone, withdrawal.at)  # (if not sent to the fleet yet)
        link = withdrawal.fleet
        if link is not None and link is self._fleet and link.up:
            link.budget_refund(self, withdrawal.paid_by, max(0.0, now - withdrawal.at))

    def spent(self) -> None:
        """A unit gave up because the budget is spent: count it, tell the hooks, and log it
        (the line rate-limited: under an outage every failing unit ends here)."""
        with self._lock:
            self.exhausted += 1
        log, since = self._lines.take()
        # when the last line was: the units it folds may be an earlier outage's (the hooks and
        # counters have each one; the lines are one per period)
        now = self._clock()
        last, ago = self._last_line, ""
        if log:
            self._last_line = now
            if since and last is not None:
                ago = f", the last line {max(0.0, now - last):.0f} s ago"
        cfg = self.config
        scope = "fleet-wide through Redis" if self.shared else "in this process"
        emit(
            cfg,
            log_retry,
            logging.WARNING,
            "Retry budget exhausted: service=%s retries may add %g of recent first attempts "
            "(%s) plus %d/s; failing units give up with their original error instead of "
            "retrying%s",
            self.service,
            cfg.retry_budget or 0.0,
            scope,
            cfg.retry_budget_floor,
            more_since(since, ago),
            log=log,
            service=self.service,
            event="budget_exhausted",
            ratio=cfg.retry_budget,
            floor=cfg.retry_budget_floor,
            shared=self.shared,
            suppressed=since,
        )

    @property
    def shared(self) -> bool:
        link = self._fleet
        return link is not None and link.up

    @property
    def asks_redis(self) -> bool:
        """Whether a withdrawal may talk to Redis, or wait for it, now (see
        ``Breaker.asks_redis``)."""
        link = self._fleet
        return link is not None and bool(link.up or link.connecting)

    def describe(self) -> BudgetHealth:
        """The ``budget`` entry of ``health()``."""
        with self._lock:
            now = self._clock()
            self._observe(now)
            deposits, _ = self._local.totals(now)
            info: BudgetHealth = {
                # (a budget is made, and kept, only while its configuration sets a ratio)
                "ratio": self.config.retry_budget or 0.0,
                "floor_per_second": self.config.retry_budget_floor,
                "window_seconds": WINDOW,
                "scope": "fleet" if self.shared else "process",
                "first_attempts": round(deposits),
                "retries": self._local.retries(now),
                "available": round(self._local.available(now), 1),
                "granted": self.granted,
                "exhausted": self.exhausted,
            }
        link = self._fleet
        if link is not None:  # configured to be shared: through which Redis, and why not now
            info["redis"] = link.masked_url
            info["problem"] = link.problem
        # the fleet's figures while they are recent (Redis answers only on the failure path and
        # when there are new first attempts): past the window, what they counted has expired
        # and the local figures say more
        taken, fleet, _ = self._fleet_view
        if self.shared and fleet is not None and now - taken < WINDOW:
            info["fleet"] = fleet.copy()
            info["available"] = fleet["available"]
        return info

    def __repr__(self) -> str:
        return f"<RetryBudget service={self.service!r} ratio={self.config.retry_budget}>"


def budget_settings(config: Config) -> tuple[Any, ...]:
    """What a retry budget takes from a configuration."""
    return (config.retry_budget, config.retry_budget_floor, config.redis_url, config.redis_timeout)


def _same_budget_settings(a: Config, b: Config) -> bool:
    return budget_settings(a) == budget_settings(b)


def _settings_text(config: Config) -> str:
    shared = "shared" if config.redis_url else "local"
    return f"(ratio={config.retry_budget:g}, floor={config.retry_budget_floor}/s, {shared})"


def budget_for(
    service: str, config: Config, *, user: object, explicit: bool = True
) -> RetryBudget | None:
    """The retry budget of ``service`` (None when ``config`` sets none), made on first use;
    later calls may update its numbers (see :meth:`RetryBudget.follow`: ``user`` asks,
    ``explicit`` when ``config`` is a ``config=`` of the code, not the environment's)."""
    if config.retry_budget is None or not config.retry_on:
        return None
    with STATE.lock:
        budget: RetryBudget | None = STATE.budgets.get(service)
        if budget is None:
            check_service_room(service, STATE.budgets)
            budget = STATE.budgets[service] = RetryBudget(service, config)
        if explicit:
            budget.held_by(user)  # (before a reload's forget_unused can look: see there)
    budget.follow(config, user=user, explicit=explicit)
    return budget


def forget_unused(policies: Iterable[Any], config: Config) -> None:
    """After a reload to ``config``, which sets no budget: each budget that none of the live
    users' ``policies`` has any more is forgotten, so that ``health()`` and the metrics show
    none, as for a service made without one (not its last figures, frozen: ``available`` 0
    would read as a spent budget). A budget set again starts over, as a breaker switched on
    again does. With a budget in ``config``, the budgets of services whose factories are gone
    are kept (a factory of the service made later takes its own again).

    A budget a live user asked for with a ``config=`` of the code is kept too, in
    ``policies`` or not: such a user's settings don't follow reloads, so it keeps its budget,
    and one made while the reload ran (a factory with ``config=`` made in another thread,
    between the snapshot of ``policies`` and here) must stay the service's. Before, it was
    forgotten: gone from ``health()`` while that factory's units drew on it, and the
    service's next factory made a second budget."""
    if config.retry_budget is not None and config.retry_on:
        return
    used = {id(policy.budget) for policy in policies if policy.budget is not None}
    with STATE.lock:
        for service, budget in list(STATE.budgets.items()):
            if id(budget) not in used and not budget.asked_in_code():
                del STATE.budgets[service]


def budgets() -> dict[str, RetryBudget]:
    """Every retry budget by service name."""
    with STATE.lock:
        return dict(STATE.budgets)
