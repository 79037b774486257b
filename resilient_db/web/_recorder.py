"""What the dashboard remembers: recent ``[SELF-HEAL]`` events and short time series, fed by the
public hook API (:func:`resilient_db.add_hook`), bounded in size whatever the traffic.

Blocked transitions are counted as :func:`resilient_db.health` counts ``blocked_transitions``
(and Prometheus and OpenTelemetry do): one per row whose illegal status move was refused, so a
``transition_blocked`` event adds its ``blocked_rows`` (1 without); a stale move (the event's
``stale`` field: another transaction had moved the row) is counted apart, as
``stale_transitions`` is, never as blocked."""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict

from resilient_db._observability import SelfHealEvent, add_hook, remove_hook, truncated
from resilient_db._state import STATE, renew_after_fork

__all__ = [
    "EventFields",
    "RecordedEvent",
    "Recorder",
    "RecorderSnapshot",
    "ServiceSeries",
    "recorder",
]

#: Services tracked at most (the library allows a bounded number of service names too). Beyond
#: it, a service with no series yet takes the place of the least recently active one when that
#: had no event for a whole window (its plots would be empty), else it is left out; the services
#: left out (or put out) are listed, at most :data:`MAX_LEFT_OUT` names, in ``left_out``.
MAX_SERVICES = 64
MAX_LEFT_OUT = 256
#: Breaker state changes kept per service.
MAX_STATE_CHANGES = 256
#: Counted fields of events kept per service (SQLSTATEs, classes, paths).
MAX_LABELS = 64
#: An event's message is kept to this many characters, each text field it shows to
#: :data:`MAX_FIELD_CHARS` (longer ones cut and marked, "…(+N characters)"): the events kept
#: are bounded in size, not only in number, whatever a client sent (a status of a megabyte).
MAX_MESSAGE_CHARS = 1000
MAX_FIELD_CHARS = 200
#: Counted labels (a SQLSTATE, a path) are cut to this many characters.
MAX_LABEL_CHARS = 64
#: The most a Recorder takes: events kept (about 100 MB at their largest), and seconds of
#: per-second rows (a day: up to 64 services' rows of it are hundreds of MB already).
MAX_RECORDED_EVENTS = 100_000
MAX_WINDOW = 86_400
#: Events whose fields are shown in the event list (what they name, not who).
_SHOWN_FIELDS = (
    "outcome",
    "sqlstate",
    "via",
    "from_state",
    "to_state",
    "model",
    "validator",
    "blocked_rows",
    "stale",
    "error",
)
#: A breaker's state as its series records it (health()'s ``"off"`` and ``"unknown"`` are no
#: events).
BreakerState = Literal["open", "half-open", "closed"]
_BREAKER_STATES: dict[str, BreakerState] = {
    "breaker_opened": "open",
    "breaker_half_open": "half-open",
    "breaker_closed": "closed",
}
#: The transition guard's events (``transition_blocked``, ``transition_guard_bypassed``, ...),
#: which have no service, are kept under this name: the series of the page's transitions card.
NO_SERVICE = "(transitions)"
_GUARD_EVENTS_PREFIX = "transition_"
#: The web layer's own events, without a service (a pool exhausted: which factory's pool is
#: not known where the error is answered): listed under this name, counted in no series.
WEB_SERVICE = "(web)"
_WEB_EVENTS = frozenset({"pool_exhausted"})
#: The library's other events without a service (``install_commit_markers``'s, a shared state
#: lost before any service used it): listed under this name, counted in no series. Kept under
#: the guard's name, they read as the guard's and changed its series, which only the guard's
#: events belong in (its card is health()'s ``transitions``).
LIBRARY_SERVICE = "(library)"
#: The name of a column of a per-second bucket.
BucketColumn = Literal["second", "retries", "gave_up", "recovered", "blocked", "stale"]
#: The columns of a per-second bucket (``snapshot()["bucket_columns"]``).
BUCKET_COLUMNS: tuple[BucketColumn, ...] = (
    "second",
    "retries",
    "gave_up",
    "recovered",
    "blocked",
    "stale",
)
_RETRIES, _GAVE_UP, _RECOVERED, _BLOCKED, _STALE = range(1, len(BUCKET_COLUMNS))
#: A row keeps, after its columns, the number of the last event that changed it (not served):
#: what changed since a cursor is found without looking at the rest.
_CHANGED = len(BUCKET_COLUMNS)


# -- the shape of snapshot() -------------------------------------------------------------------
# TypedDicts, as health()'s are (see resilient_db._observability): snapshot() stays plain dicts
# and lists, which a type checker now reads key by key. tests/test_web_types.py holds them to
# real snapshots and data.json answers, key by key.


class EventFields(TypedDict, total=False):
    """The fields an event of the list shows (what they name, not who), each only when the
    event has it: a number as it is, anything else as its text, cut (see :func:`_field`).
    Which event has which is the events table of docs/observability.md."""

    outcome: str
    sqlstate: str
    via: str
    #: a row's status, as it was and as it was to be: a number, or the text of anything else
    from_state: str | int | float | bool
    to_state: str | int | float | bool
    model: str
    validator: str
    blocked_rows: int
    stale: bool
    error: str


class RecordedEvent(TypedDict):
    """One event of ``snapshot()["events"]``."""

    time: float  # the recorder's clock (seconds since the epoch by default)
    name: str  # the event's name (``retry``, ``breaker_opened``, ...)
    #: its service; ``"(transitions)"`` for the guard's, ``"(web)"`` and ``"(library)"`` for
    #: the others without one
    service: str
    #: the levels the library's events have (an event made by hand and given to the recorder
    #: has its level's name, lower-cased)
    level: Literal["info", "warning", "error"]
    message: str  # its line without the ``[SELF-HEAL]`` prefix, cut
    fields: EventFields


class ServiceSeries(TypedDict):
    """One service of ``snapshot()["series"]``: its per-second rows (the columns are
    ``bucket_columns``: the second, then counts), breaker state changes (``[time, state]``),
    and counted labels."""

    buckets: list[list[int]]
    breaker_states: list[list[float | BreakerState]]
    retries_by_sqlstate: dict[str, int]
    blocked_by_via: dict[str, int]
    stale_by_via: dict[str, int]
    events_by_name: dict[str, int]


class RecorderSnapshot(TypedDict):
    """What :meth:`Recorder.snapshot` returns (and ``data.json`` serves with more)."""

    now: float
    since: float  # when the recorder was made
    window: int
    bucket_columns: list[BucketColumn]
    events: list[RecordedEvent]
    series: dict[str, ServiceSeries]
    max_services: int
    left_out: list[str]
    cursor: str
    delta: bool


class _Series:
    """One service's recent history: per-second buckets and breaker state changes."""

    def __init__(self, window: int) -> None:
        # [second, retries, gave_up, ..., number of the event that last changed it]
        self.buckets: deque[list[int]] = deque(maxlen=window)
        self.last = 0.0  # when its last event came (the clock's time)
        self.changed = 0  # the number of its last event
        # (time, state, number of the event)
        self.states: deque[tuple[float, BreakerState, int]] = deque(maxlen=MAX_STATE_CHANGES)
        self.retries_by_sqlstate: Counter[str] = Counter()
        self.blocked_by_via: Counter[str] = Counter()
        self.stale_by_via: Counter[str] = Counter()
        self.events_by_name: Counter[str] = Counter()

    def bucket(self, second: int) -> list[int]:
        """The row of ``second``: one per second, in order. A second before the last row's
        (the clock stepped back: wall time, or a caller's clock) finds its row, or gets one
        in its place; one older than every row of a full window is counted nowhere."""
        buckets = self.buckets
        if buckets:
            last = buckets[-1]
            if last[0] == second:
                return last
            if last[0] > second:
                return self._earlier(second)
        row = [second] + [0] * len(BUCKET_COLUMNS)
        buckets.append(row)
        return row

    def _earlier(self, second: int) -> list[int]:
        buckets = self.buckets
        index = 0
        for i in range(len(buckets) - 1, -1, -1):
            found = buckets[i][0]
            if found == second:
                return buckets[i]
            if found < second:
                index = i + 1
                break
        row = [second] + [0] * len(BUCKET_COLUMNS)
        if len(buckets) == buckets.maxlen:
            if index == 0:
                return row
            buckets.popleft()
            index -= 1
        buckets.insert(index, row)
        return row

    def served(self, since: int, states_from: float, after: int | None) -> ServiceSeries:
        """What ``data.json`` serves of it: the rows of the seconds after ``since``, the breaker
        state changes from ``states_from`` on (and the last one before it: the state the plot
        starts with; the page draws no older ones), its counted labels. ``after`` (an event's
        number): only the rows changed and the state changes made since that event, looked for
        from the newest back (a row other than the last is never changed without
        :meth:`Recorder.snapshot` answering in full)."""
        changes: list[list[float | BreakerState]]
        if after is None:
            rows = [row[:_CHANGED] for row in self.buckets if row[0] > since]
            states = list(self.states)
            first = 0
            for i in range(len(states) - 1, -1, -1):
                if states[i][0] <= states_from:
                    first = i
                    break
            changes = [[t, state] for t, state, _ in states[first:]]
        else:
            rows = []
            for row in reversed(self.buckets):
                if row[_CHANGED] <= after or row[0] <= since:
                    break
                rows.append(row[:_CHANGED])
            rows.reverse()
            changes = []
            for t, state, number in reversed(self.states):
                if number <= after:
                    break
                changes.append([t, state])
            changes.reverse()
        return {
            "buckets": rows,
            "breaker_states": changes,
            "retries_by_sqlstate": dict(self.retries_by_sqlstate),
            "blocked_by_via": dict(self.blocked_by_via),
            "stale_by_via": dict(self.stale_by_via),
            "events_by_name": dict(self.events_by_name),
        }


def _count(counter: Counter[str], label: str, amount: int = 1) -> None:
    label = truncated(label, MAX_LABEL_CHARS)
    if label in counter or len(counter) < MAX_LABELS:
        counter[label] += amount


def _field(value: Any) -> Any:
    """A field of an event as ``data.json`` serves it: a number as it is, anything else as its
    text, cut. A float that is not finite too ("nan", "inf"): a status a client sent as ``NaN``
    in a JSON body (Python's ``json`` reads it) would otherwise make every ``data.json``
    unrenderable while the event is kept, as JSON has no such number."""
    if isinstance(value, (int, bool)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return truncated(str(value), MAX_FIELD_CHARS)


def _rows(fields: Mapping[str, Any]) -> int:
    """The rows a ``transition_blocked`` event stands for: its ``blocked_rows`` (a bulk UPDATE's
    event names several), 1 without; read as the OpenTelemetry hook reads it."""
    try:
        return int(fields.get("blocked_rows", 1) or 1)
    except (TypeError, ValueError):
        return 1


class Recorder:
    """A hook (``recorder(event)``) keeping the last ``max_events`` events and ``window``
    seconds of per-second counts and breaker states per service. Thread-safe: hooks run in
    the threads of the units; the lock is held for a few dict and deque operations. Bounded in
    size too: each event's message and text fields are cut (:data:`MAX_MESSAGE_CHARS`,
    :data:`MAX_FIELD_CHARS`)."""

    def __init__(
        self,
        *,
        max_events: int = 200,
        window: int = 600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("max_events", max_events), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Recorder({name}=...) takes a whole number, got {value!r}")
        if max_events < 1 or window < 10:
            raise ValueError("Recorder needs max_events >= 1 and window >= 10 seconds")
        # (past what a deque takes, an OverflowError naming nothing, here or, for the window,
        # in the hook at a service's first event; well before, memory no dashboard needs)
        for name, value, most in (
            ("max_events", max_events, MAX_RECORDED_EVENTS),
            ("window", window, MAX_WINDOW),
        ):
            if value > most:
                shown = repr(value) if len(repr(value)) <= 30 else f"{len(str(value))} digits"
                raise ValueError(f"Recorder({name}=...) must be at most {most:,}, got {shown}")
        if not callable(clock):
            raise TypeError(
                "Recorder(clock=...) takes a function returning seconds (time.time, say), got "
                f"{type(clock).__name__}"
            )
        self.max_events = max_events
        self.window = window
        self.clock = clock
        self.started = clock()
        self._events: deque[tuple[int, RecordedEvent]] = deque(maxlen=max_events)
        self._series: dict[str, _Series] = {}
        self._left_out: dict[str, None] = {}  # (ordered: the first left out first)
        self._lock = threading.Lock()
        # every event recorded has a number, one more than the last; a cursor ("epoch.number")
        # asks for what changed after that event. The epoch is new at each clear() (and in each
        # recorder, each process): a cursor of another one is answered in full.
        self._number = 0
        self._epoch = secrets.token_hex(4)
        # the number of the last event after which changes can't be sent as additions only (a
        # series dropped, a row other than the last one changed): an older cursor gets it all
        self._reshaped = 0
        _RECORDERS.add(self)

    def __call__(self, event: SelfHealEvent) -> None:
        service = event.service
        listed_only = False
        if not service:
            if event.name.startswith(_GUARD_EVENTS_PREFIX):
                service = NO_SERVICE
            else:
                listed_only = True
                service = WEB_SERVICE if event.name in _WEB_EVENTS else LIBRARY_SERVICE
        fields = event.fields
        shown = {k: fields[k] for k in _SHOWN_FIELDS if fields.get(k) is not None}
        # (the level and the fields, as the emitter and _field make them, are what the type
        # says; told so without cast(), a call per event)
        entry: RecordedEvent = {
            "time": 0.0,
            "name": event.name,
            "service": service,
            "level": logging.getLevelName(event.level).lower(),  # type: ignore[typeddict-item]
            "message": truncated(str(event.message), MAX_MESSAGE_CHARS),
            "fields": {k: _field(v) for k, v in shown.items()},  # type: ignore[typeddict-item]
        }
        with self._lock:
            # the time is read under the lock: events from several threads are recorded in
            # the order of their times (read before it, a later second's bucket could be
            # appended first, and this second's count split over a second row)
            now = entry["time"] = self.clock()
            number = self._number = self._number + 1
            self._events.append((number, entry))
            if listed_only:
                return
            series = self._series.get(service)
            if series is None:
                series = self._new_series(service, now, number)
                if series is None:
                    return
            series.last = now
            series.changed = number
            _count(series.events_by_name, event.name)
            row = series.bucket(int(now))
            row[_CHANGED] = number
            if row is not series.buckets[-1]:  # an earlier second (the clock stepped back)
                self._reshaped = number
            if event.name == "retry":
                row[_RETRIES] += 1
                _count(series.retries_by_sqlstate, str(fields.get("sqlstate", "none")))
            elif event.name == "gave_up":
                row[_GAVE_UP] += 1
            elif event.name == "recovered":
                row[_RECOVERED] += 1
            elif event.name == "transition_blocked":
                rows = _rows(fields)
                via = str(fields.get("via", "?"))
                if fields.get("stale"):
                    row[_STALE] += rows
                    _count(series.stale_by_via, via, rows)
                else:
                    row[_BLOCKED] += rows
                    _count(series.blocked_by_via, via, rows)
            state = _BREAKER_STATES.get(event.name)
            if state is not None:
                series.states.append((now, state, number))

    def _new_series(self, service: str, now: float, number: int) -> _Series | None:
        """A series for ``service``, once :data:`MAX_SERVICES` are tracked only in the place
        of the least recently active one that had no event for a whole window (None: it is
        left out). The guard's series is always kept: its counts are health()'s transitions."""
        tracked = self._series
        if len(tracked) >= MAX_SERVICES and service != NO_SERVICE:
            idle = min(
                (s for s in tracked.items() if s[0] != NO_SERVICE),
                key=lambda item: item[1].last,
                default=None,
            )
            if idle is None or idle[1].last > now - self.window:
                self._leave_out(service)
                return None
            del tracked[idle[0]]
            self._leave_out(idle[0])
            self._reshaped = number
        self._left_out.pop(service, None)
        series = tracked[service] = _Series(self.window)
        return series

    def _leave_out(self, service: str) -> None:
        left_out = self._left_out
        if service not in left_out and len(left_out) < MAX_LEFT_OUT:
            left_out[service] = None

    def snapshot(self, *, events: int | None = None, after: str | None = None) -> RecorderSnapshot:
        """Recent events (oldest first) and the time series, as JSON-able data (typed as
        :class:`RecorderSnapshot`, a plain dict at run time); ``left_out``:
        the services without a series (beyond :data:`MAX_SERVICES`), ``max_services`` that
        bound. A series' breaker state changes are those of the window and the last one before
        it (the state its plot starts with).

        ``cursor`` names this snapshot; ``after=`` a cursor: what changed since it only
        (``delta`` True): the events recorded since, the series that changed, each with its
        rows changed since (the last one before it again, when an event came in its second) and
        its new breaker state changes (its counted labels whole), ``left_out`` whole. Added to
        what the cursor's snapshot held (rows by their second), and rows and state changes
        older than the window dropped, it is what a full snapshot holds. A cursor of another
        recorder (or one cleared since), or one from before a series was dropped or an
        event was counted in an earlier second than the last (the clock stepped back), gets
        the full snapshot (``delta`` False)."""
        if events is not None and (
            isinstance(events, bool) or not isinstance(events, int) or events < 0
        ):
            raise (ValueError if isinstance(events, int) else TypeError)(
                f"Recorder.snapshot(events=...) takes a whole number >= 0 or None, got {events!r}"
            )
        if after is not None and not isinstance(after, str):
            raise TypeError(
                "Recorder.snapshot(after=...) takes a cursor (the str of an earlier snapshot's "
                f"'cursor') or None, got {type(after).__name__}"
            )
        now = self.clock()
        since = int(now) - self.window
        states_from = now - self.window
        with self._lock:
            base = self._base(after)
            if base is None:
                recent = [entry for _, entry in self._events]
            else:
                recent = []
                for number, entry in reversed(self._events):
                    if number <= base:
                        break
                    recent.append(entry)
                recent.reverse()
            series = {
                name: s.served(since, states_from, base)
                for name, s in self._series.items()
                if base is None or s.changed > base
            }
            left_out = sorted(self._left_out)
            cursor = f"{self._epoch}.{self._number}"
        if events is not None:
            recent = recent[-events:] if events > 0 else []
        return {
            "now": now,
            "since": self.started,
            "window": self.window,
            "bucket_columns": list(BUCKET_COLUMNS),
            "events": recent,
            "series": series,
            "max_services": MAX_SERVICES,
            "left_out": left_out,
            "cursor": cursor,
            "delta": base is not None,
        }

    def _base(self, after: str | None) -> int | None:
        """The event number of cursor ``after`` when changes since it can be sent as additions
        (the lock held), else None (a full snapshot)."""
        if not after:
            return None
        epoch, _, number = after.partition(".")
        # (a number no recorder reaches: int() of thousands of digits is refused, a 500)
        if epoch != self._epoch or not (number.isascii() and number.isdigit()) or len(number) > 20:
            return None
        base = int(number)
        return base if self._reshaped <= base <= self._number else None

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
            self._series.clear()
            self._left_out.clear()
            self._epoch = secrets.token_hex(4)

    def after_fork_in_child(self) -> None:
        """In a forked child (gunicorn's preload: a dashboard made at import): its events are
        its own from here on, counted from the parent's count, so a cursor of the parent's (or
        of a sibling worker's behind the same URL) must not be taken for one of its own: a new
        epoch. Its lock, held by another thread of the parent when it forked (recording an
        event, taking a snapshot), would stay held for good here, and the child's first
        self-healing event wait forever in this hook: renewed then."""
        if self._lock.acquire(blocking=False):
            self._lock.release()
        else:
            self._lock = threading.Lock()
        self._epoch = secrets.token_hex(4)


#: every recorder, renewed in a forked child (see :meth:`Recorder.after_fork_in_child`)
_RECORDERS: weakref.WeakSet[Recorder] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for rec in list(_RECORDERS):
        rec.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_shared: Recorder | None = None
_shared_lock = threading.Lock()
renew_after_fork(globals(), "_shared_lock")
#: held while a recorder's hook is looked up and made (see :func:`install`)
_install_lock = threading.Lock()
renew_after_fork(globals(), "_install_lock")


class _Installed:
    """The hook a recorder is installed as: it calls the recorder while the recorder lives
    (held weakly), and takes itself out of the hooks when the recorder is gone. A dashboard
    given a recorder of its own in an application factory (an app per test, or per tenant)
    left every dropped app's recorder installed, and alive, for good. Equal to its recorder,
    so that ``remove_hook(recorder)`` removes it and ``add_hook(recorder)`` does not add the
    recorder a second time."""

    __slots__ = ("__weakref__", "_recorder")

    def __init__(self, rec: Recorder) -> None:
        self._recorder = weakref.ref(rec, self._gone)

    def _gone(self, _: object) -> None:
        remove_hook(self)

    def __call__(self, event: SelfHealEvent) -> None:
        rec = self._recorder()
        if rec is None:
            remove_hook(self)
        else:
            rec(event)

    def __eq__(self, other: object) -> bool:
        return other is self or (other is not None and other is self._recorder())

    def __hash__(self) -> int:
        return id(self)


def install(rec: Recorder) -> Recorder:
    """Make ``rec`` record: a hook on every self-healing action (held weakly: see
    :class:`_Installed`), cleared by ``reset_state()`` as ``health()`` is zeroed. Idempotent
    (``add_hook`` adds a hook once; the reset's set is a set): installing the same recorder
    again registers nothing twice."""
    STATE.clear_on_reset.add(rec)
    # (under a lock: two threads installing one new recorder at once, two dashboards made
    # with it, each made a hook of its own, and both were added: every event recorded twice)
    with _install_lock:
        hook = rec.__dict__.get("_installed")
        if hook is None:
            hook = rec.__dict__["_installed"] = _Installed(rec)
    add_hook(hook)  # again after anything that removed it
    return rec


def recorder() -> Recorder:
    """The process's recorder, installed as a hook on first use (idempotent)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Recorder()
        return install(_shared)
