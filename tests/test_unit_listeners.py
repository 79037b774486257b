"""What the application's own session listeners see of a unit that is replayed: each attempt
is a new session doing the work again, so they fire once per attempt; ``after_commit`` fires
once, for the attempt that committed, also when its answer was lost and a check proved it
committed (as docs/units-of-work.md says). Real server, real faults (a serialization failure
raised by the server, a COMMIT answer lost by the fault proxy)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scenarios import Base, Item
from sqlalchemy import event
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.testing import FaultProxy

pytestmark = pytest.mark.usefixtures("no_backoff")


@pytest.fixture
def proxied(pg_database: str, fault_proxy: FaultProxy, engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)  # (conftest's engine has raise_code)
    rdb.install_commit_markers(engine)
    made = sa.create_engine(fault_proxy.url(pg_database), connect_args={"connect_timeout": 2})
    yield made
    made.dispose()


def counted(Sessions: Any) -> Counter[str]:
    seen: Counter[str] = Counter()
    for name in ("before_flush", "after_flush", "after_begin", "after_rollback", "after_commit"):
        event.listen(Sessions, name, lambda *args, name=name: seen.update([name]))
    return seen


def test_listeners_fire_per_attempt_and_after_commit_once(proxied: sa.Engine, service: str) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)
    seen = counted(Sessions)
    attempts: list[int] = []

    def unit(session: Session) -> None:
        attempts.append(1)
        session.add(Item(name=f"i-{len(attempts)}"))
        session.flush()
        if len(attempts) == 1:
            session.execute(sa.text("SELECT raise_code('40001')"))

    Sessions.run(unit)
    assert len(attempts) == 2
    assert seen["before_flush"] == seen["after_flush"] == 2  # the unit's flush, per attempt
    assert seen["after_begin"] == 2  # each attempt's session began on a connection
    assert seen["after_rollback"] == 1
    assert seen["after_commit"] == 1


def test_after_commit_fires_once_for_a_lost_answer_proved_committed(
    proxied: sa.Engine, fault_proxy: FaultProxy, service: str
) -> None:
    Sessions = rdb.ResilientSession(proxied, service=service)
    seen = counted(Sessions)
    attempts: list[int] = []

    def unit(session: Session) -> None:
        attempts.append(1)
        session.add(Item(name="once"))

    fault_proxy.lose_commit_answer()
    Sessions.run(unit)
    assert fault_proxy.commits_lost == 1
    assert attempts == [1]  # proved committed, not replayed
    assert seen["after_commit"] == 1  # the work is committed: told once
    assert seen["after_rollback"] == 0
