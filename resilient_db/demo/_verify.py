"""The demo's invariants, checked against the database (not against counters) at the end."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

import resilient_db as rdb
from resilient_db.examples.tasks import TASK_RULES, Task

from ._faults import Window
from ._workload import Ledger

__all__ = ["BreakerEvent", "Check", "DatabaseFindings", "examine_database", "invariants"]

MIN_FAULT_KINDS = 5


@dataclass(frozen=True)
class BreakerEvent:
    """A state change of the circuit breaker (seconds since the workload started)."""

    at: float
    old: str
    new: str


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class DatabaseFindings:
    """What the database says, compared with the ledger."""

    tasks: int
    history_rows: int
    lost_writes: int
    lost_examples: tuple[str, ...]
    duplicate_writes: int
    duplicate_examples: tuple[str, ...]
    failed_unit_writes: int
    failed_examples: tuple[str, ...]
    unaccounted_writes: int
    unaccounted_examples: tuple[str, ...]
    illegal_states: int
    illegal_examples: tuple[str, ...]
    trigger_drift: str | None
    commit_markers: int  # units' commits that carried a marker (and are still kept)
    commit_fences: int  # markers written by the claim of a lost COMMIT answer


def _legal(old: str | None, new: str) -> bool:
    if old is None:
        return new in TASK_RULES.initial
    return new in TASK_RULES.next_states(old)


def examine_database(conn: sa.Connection, ledger: Ledger) -> DatabaseFindings:
    """Compare every row with what the workload counted; replay each task's history."""
    tasks = {
        row.id: (row.idem_key, row.status)
        for row in conn.execute(sa.text("SELECT id, idem_key, status FROM tasks"))
    }
    history = conn.execute(
        sa.text(
            "SELECT id, task_id, idem_key, from_status, to_status FROM task_history ORDER BY id"
        )
    ).all()
    markers: dict[bool, int] = {
        row.fence: row.n
        for row in conn.execute(
            sa.text("SELECT fence, count(*) AS n FROM resilient_db.commit_markers GROUP BY fence")
        )
    }
    history_counts = Counter(row.idem_key for row in history)
    task_counts = Counter(key for key, _ in tasks.values())
    history_keys = {row.idem_key for row in history}
    task_keys = {key for key, _ in tasks.values()}

    # every unit counted as done: each of its rows is there
    lost: list[str] = []
    for unit, keys in ledger.done.items():
        if any(k not in history_keys for k in keys):
            lost.append(unit)
    # ... exactly once (a key twice, or a task with two first entries, is a duplicate)
    duplicates = sum(n - 1 for n in history_counts.values() if n > 1)
    duplicates += sum(n - 1 for n in task_counts.values() if n > 1)
    creations = Counter(row.task_id for row in history if row.from_status is None)
    duplicates += sum(n - 1 for n in creations.values() if n > 1)
    # The unique indexes on the keys keep a second copy out of the tables, so a unit run again
    # after its write committed shows otherwise: its key is there but the run it was counted
    # by did not write it (that run found the change made already, and did nothing or something
    # else), or the database refused the second copy (the unit failed with a unique violation).
    expected = {k for keys in ledger.done.values() for k in keys}
    replayed = sorted(
        k for k in history_keys - expected if _unit_of(k) in ledger.done
    )  # written by an earlier run of a unit counted done by a later one
    failed_keys = {k: unit for unit, keys in ledger.failed.items() for k in keys}
    written_by_failed = {failed_keys[k] for k in history_keys | task_keys if k in failed_keys}
    refused = sorted(written_by_failed & ledger.refused_as_duplicates)
    duplicates += len(replayed) + len(refused)

    # no unit counted as failed (or blocked) left a write; nothing unaccounted for
    failed_found = sorted(written_by_failed - ledger.refused_as_duplicates)
    unaccounted = sorted(history_keys - expected - set(failed_keys) - set(replayed))
    unaccounted += sorted(
        key for key in task_keys - history_keys if key not in failed_keys
    )  # a task without its first history row

    # each row holds a state it could legally reach, through its own history
    by_task: dict[int, list[Any]] = defaultdict(list)
    for row in history:
        by_task[row.task_id].append(row)
    illegal: list[str] = []
    for task_id, (_, status) in sorted(tasks.items()):
        entries = by_task.get(task_id, [])
        problem = _replay(entries, status)
        if problem:
            illegal.append(f"task {task_id}: {problem}")
    for task_id in sorted(set(by_task) - set(tasks)):
        illegal.append(f"task {task_id}: history for a task that does not exist")

    return DatabaseFindings(
        tasks=len(tasks),
        history_rows=len(history),
        lost_writes=len(lost),
        lost_examples=tuple(sorted(lost)[:5]),
        duplicate_writes=duplicates,
        duplicate_examples=tuple(sorted({*replayed, *refused})[:5]),
        failed_unit_writes=len(failed_found),
        failed_examples=tuple(failed_found[:5]),
        unaccounted_writes=len(unaccounted),
        unaccounted_examples=tuple(unaccounted[:5]),
        illegal_states=len(illegal),
        illegal_examples=tuple(illegal[:5]),
        trigger_drift=rdb.trigger_drift(conn, Task),
        commit_markers=markers.get(False, 0),
        commit_fences=markers.get(True, 0),
    )


def _unit_of(history_key: str) -> str:
    """The unit that writes ``history_key`` (a unit moving two tasks writes ``key/0``,
    ``key/1``)."""
    return history_key.partition("/")[0]


def _replay(entries: Sequence[Any], status: str) -> str | None:
    """Why the history doesn't lead legally to ``status``, or None."""
    if not entries:
        return "no history"
    state: str | None = None
    for n, entry in enumerate(entries):
        if n == 0 and entry.from_status is not None:
            return f"first history entry starts from {entry.from_status!r}"
        if entry.from_status != state:
            return (
                f"history entry {entry.idem_key} starts from {entry.from_status!r}, not {state!r}"
            )
        if not _legal(state, entry.to_status):
            return f"illegal move {state!r} -> {entry.to_status!r} ({entry.idem_key})"
        state = entry.to_status
    if state != status:
        return f"status {status!r} differs from its last history entry {state!r}"
    return None


def _breaker_check(events: Sequence[BreakerEvent], windows: Sequence[Window], final: str) -> Check:
    opens = [e for e in events if e.new == "open"]
    closes = [e for e in events if e.new == "closed"]
    during = [
        e for e in opens if any(w.start - 0.5 <= e.at <= w.end + 1.0 for w in windows)
    ]  # opened while the database was unreachable
    closed_after = bool(during) and any(c.at > during[0].at for c in closes)
    passed = bool(windows) and bool(during) and closed_after and final == "closed"
    if not windows:
        detail = "no outage was injected"
    elif not during:
        detail = f"{len(opens)} openings, none during the {len(windows)} outage(s)"
    else:
        first = during[0]
        closing = next((c for c in closes if c.at > first.at), None)
        detail = f"opened at {first.at:.1f} s during an outage" + (
            f", closed at {closing.at:.1f} s" if closing else ", never closed"
        )
        detail += f"; {len(opens)} opening(s) in all, now {final}"
    return Check("breaker_opened_and_closed", passed, detail)


def invariants(
    found: DatabaseFindings,
    ledger: Ledger,
    *,
    faults: Mapping[str, int],
    breaker_events: Sequence[BreakerEvent],
    windows: Sequence[Window],
    breaker_final: str,
) -> list[Check]:
    """The checks that decide the demo's exit status."""
    units_ok = len(ledger.done)
    blocked = sum(ledger.blocked_by_via.values())
    kinds = sorted(k for k, n in faults.items() if n)
    got_through = ledger.illegal_got_through

    def examples(items: Sequence[str]) -> str:
        return f" (e.g. {', '.join(items)})" if items else ""

    return [
        Check(
            "no_lost_writes",
            found.lost_writes == 0 and units_ok > 0,
            f"{units_ok} units counted done, {found.lost_writes} missing from the database"
            + examples(found.lost_examples),
        ),
        Check(
            "no_duplicate_writes",
            found.duplicate_writes == 0,
            f"{found.duplicate_writes} writes made twice among {found.history_rows} history rows"
            + examples(found.duplicate_examples),
        ),
        Check(
            "failed_units_left_no_writes",
            found.failed_unit_writes == 0 and found.unaccounted_writes == 0,
            f"{len(ledger.failed)} units failed or blocked, {found.failed_unit_writes} left "
            f"writes{examples(found.failed_examples)}; {found.unaccounted_writes} rows belong "
            f"to no unit{examples(found.unaccounted_examples)}",
        ),
        Check(
            "no_illegal_states",
            found.illegal_states == 0,
            f"{found.tasks} tasks replayed through their history, {found.illegal_states} "
            f"illegal{examples(found.illegal_examples)}",
        ),
        Check(
            "illegal_transitions_blocked",
            blocked > 0 and not got_through,
            f"{blocked} blocked ({_via_summary(ledger)}), {len(got_through)} got through"
            + examples(got_through[:5]),
        ),
        _breaker_check(breaker_events, windows, breaker_final),
        Check(
            "trigger_in_place",
            found.trigger_drift is None,
            found.trigger_drift or "the database enforces exactly the declared rules",
        ),
        Check(
            "commit_markers_in_use",
            found.commit_markers > 0,
            f"{found.commit_markers} unit commits carried a marker in their COMMIT message; "
            f"{found.commit_fences} lost answer{'' if found.commit_fences == 1 else 's'} "
            "proved not committed (fenced off, replayed)",
        ),
        Check(
            "fault_kinds",
            len(kinds) >= MIN_FAULT_KINDS,
            f"{len(kinds)} kinds injected (at least {MIN_FAULT_KINDS} wanted): {', '.join(kinds)}",
        ),
    ]


def _via_summary(ledger: Ledger) -> str:
    return ", ".join(f"{via}: {n}" for via, n in sorted(ledger.blocked_by_via.items())) or "none"
