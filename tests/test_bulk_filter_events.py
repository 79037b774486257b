"""A bulk UPDATE's filter mode (the guard leaves a blocked row unchanged instead of raising)
reports its block with the fields every other ``transition_blocked`` event carries: the
service of the unit it happened in (``unit_service``, None outside any) and ``stale``. Every
block's line names that service (``service=NAME``), as every other ``[SELF-HEAL]`` line does."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.examples.tasks import Base, Task


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg_url)
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.text("ALTER TABLE tasks DISABLE TRIGGER USER"))
        conn.execute(sa.text("DELETE FROM tasks"))
        conn.execute(
            sa.insert(Task),
            [
                {"id": 1, "title": "done", "status": "completed", "idem_key": "filter-1"},
                {"id": 2, "title": "done", "status": "completed", "idem_key": "filter-2"},
            ],
        )
        conn.execute(sa.text("ALTER TABLE tasks ENABLE TRIGGER USER"))
    yield eng
    eng.dispose()


def _blocked(events: list[rdb.SelfHealEvent]) -> list[rdb.SelfHealEvent]:
    return [e for e in events if e.name == "transition_blocked"]


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Status transition blocked" in r.getMessage()]


def test_filter_mode_blocks_name_the_units_service_as_the_flushs_do(
    engine: sa.Engine,
    service: str,
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_db")
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config())

    def by_criteria(session: Session) -> int:
        stmt = sa.update(Task).where(Task.id == 1).values(status="pending")
        return int(
            session.execute(stmt, execution_options={"synchronize_session": False}).rowcount  # type: ignore[attr-defined]
        )

    def by_primary_key(session: Session) -> None:
        session.execute(sa.update(Task), [{"id": 2, "status": "pending"}])

    def by_flush(session: Session) -> None:
        task = session.get(Task, 1)
        assert task is not None
        task.status = "pending"
        session.flush()

    assert Sessions.run(by_criteria) == 0  # filter mode: left unchanged, nothing raised
    Sessions.run(by_primary_key)
    with pytest.raises(rdb.IllegalTransitionError):
        Sessions.run(by_flush)
    criteria, by_pk, flush = _blocked(events)
    assert [e.fields["via"] for e in (criteria, by_pk, flush)] == ["orm-update"] * 2 + ["flush"]
    for event in (criteria, by_pk, flush):
        assert (event.fields["unit_service"], event.fields["stale"]) == (service, False)
    assert set(by_pk.fields) == set(flush.fields)
    assert set(criteria.fields) == set(flush.fields) - {"from_state"}
    criteria_line, by_pk_line, flush_line = _lines(caplog)
    assert criteria_line.startswith(
        f"[SELF-HEAL] Status transition blocked for 1 row(s): service={service} bulk UPDATE of "
    )
    assert by_pk_line.startswith(f"[SELF-HEAL] Status transition blocked: service={service} Task.")
    assert flush_line.startswith(f"[SELF-HEAL] Status transition blocked: service={service} Task.")
    with engine.connect() as conn:
        assert conn.execute(sa.select(Task.status).order_by(Task.id)).scalars().all() == [
            "completed",
            "completed",
        ]


def test_filter_mode_block_outside_a_unit_names_the_sessions_service(
    engine: sa.Engine,
    service: str,
    events: list[rdb.SelfHealEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_db")
    Sessions = rdb.ResilientSession(engine, service=service, config=rdb.Config())
    with Sessions() as session:
        session.execute(
            sa.update(Task).where(Task.id == 1).values(status="pending"),
            execution_options={"synchronize_session": False},
        )
        session.execute(sa.update(Task), [{"id": 2, "status": "pending"}])
        session.commit()
    blocked = _blocked(events)
    # (it named none: a process with several services could not tell which one it was)
    assert [(e.fields["unit_service"], e.fields["stale"]) for e in blocked] == [
        (service, False)
    ] * 2
    assert [e.service for e in blocked] == [None, None]  # (the guard's series: process-wide)
    lines = _lines(caplog)
    assert len(lines) == 2
    assert all(f"service={service} " in line for line in lines)
