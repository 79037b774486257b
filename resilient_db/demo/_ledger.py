"""What the demo's workload counted: the changes its units made, and the ledger checked against
the database at the end (``_verify``). Shared by both workloads, the threads' on psycopg
(``_workload``) and the asyncio tasks' on asyncpg (``_workload_async``, ``--async``)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Change", "Ledger", "UnitKeys"]


@dataclass(frozen=True)
class Change:
    """One status change a unit made: the history key, the task and its new status."""

    key: str
    task_id: int
    status: str


class UnitKeys(Protocol):
    """What the ledger keeps of a unit (either workload's ``Unit``): its key, kind, every
    history key it may write, and whether it is a deliberate illegal transition."""

    @property
    def key(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def potential(self) -> tuple[str, ...]: ...

    @property
    def illegal_via(self) -> str | None: ...


@dataclass
class Ledger:
    """What the workload counted, by unit key. Thread-safe (the asyncio tasks of ``--async``
    write it from their event loop's thread, the fault schedule reads it from its own)."""

    done: dict[str, tuple[str, ...]] = field(default_factory=dict)
    failed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unresolved: dict[str, UnitKeys] = field(default_factory=dict)
    ok_by_kind: Counter[str] = field(default_factory=Counter)
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    failure_reasons: Counter[str] = field(default_factory=Counter)
    blocked_by_via: Counter[str] = field(default_factory=Counter)
    illegal_got_through: list[str] = field(default_factory=list)
    #: failed units the database refused as a second copy (a unique violation: an idempotency
    #: key of theirs was there already, written by an earlier attempt that had committed)
    refused_as_duplicates: set[str] = field(default_factory=set)
    events: Counter[str] = field(default_factory=Counter)
    #: when each unit failed (``time.time()``: the worker processes' clocks are the wall's), to
    #: tell the units that failed during the fleet demo's Redis outage
    failed_at: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.events[name] += amount

    def record_done(self, unit: UnitKeys, changes: Sequence[Change]) -> None:
        with self._lock:
            self.done[unit.key] = tuple(c.key for c in changes)
            self.ok_by_kind[unit.kind] += 1
            self.unresolved.pop(unit.key, None)
            if unit.illegal_via is not None:
                self.illegal_got_through.append(unit.key)

    def record_failed(self, unit: UnitKeys, reason: str, *, duplicate: bool = False) -> None:
        with self._lock:
            self.failed[unit.key] = unit.potential
            if duplicate:
                self.refused_as_duplicates.add(unit.key)
            self.failed_by_kind[unit.kind] += 1
            self.failure_reasons[reason] += 1
            self.failed_at.append(time.time())
            self.unresolved.pop(unit.key, None)

    def record_blocked(self, unit: UnitKeys, via: str) -> None:
        with self._lock:
            self.failed[unit.key] = unit.potential  # a blocked unit must leave no write
            self.blocked_by_via[via] += 1

    def record_unresolved(self, unit: UnitKeys) -> None:
        with self._lock:
            self.unresolved[unit.key] = unit

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {
                "units_ok": sum(self.ok_by_kind.values()),
                "units_failed": sum(self.failed_by_kind.values()),
                "blocked": sum(self.blocked_by_via.values()),
                "unknown": self.events["commit_outcome_unknown"],
            }
