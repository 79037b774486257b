"""The demo's invariants (``resilient_db.demo._verify``) against a real database: a unit run again
after its write had committed is a doubled write. The unique indexes on the idempotency keys keep
the second copy out of the tables, so the check must see it otherwise: the run the unit was
counted by did not write its key (it found the change made and did nothing), or the database
refused the second copy (a unique violation). Also: the workload's choices under --seed, and the
report's naming of the seed."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db.demo import DemoOptions, apply_migrations, demo_config
from resilient_db.demo._run import Demo
from resilient_db.demo._verify import Check, DatabaseFindings, examine_database, invariants
from resilient_db.demo._view import plain_report
from resilient_db.demo._workload import Change, Ledger, Runner, Unit, advance_unit, create_unit
from resilient_db.examples.tasks import TERMINAL_STATUSES, Task, move_task


@pytest.fixture
def factory(pg_url: str) -> Iterator[rdb.ResilientSession[Session]]:
    apply_migrations(pg_url)
    engine = sa.create_engine(pg_url)
    yield rdb.ResilientSession(engine, service="demo-verify", config=demo_config())
    engine.dispose()


def checked(
    factory: rdb.ResilientSession[Any], ledger: Ledger
) -> tuple[DatabaseFindings, dict[str, Check]]:
    with factory.kw["bind"].connect() as conn:
        found = examine_database(conn, ledger)
    checks = invariants(
        found, ledger, faults={}, breaker_events=(), windows=(), breaker_final="closed"
    )
    return found, {c.name: c for c in checks}


def cancel_unit(key: str, task_id: int) -> Unit:
    """Cancel a task unless it is finished already (as the workload's units do: a unit finding
    its change made does nothing)."""

    def fn(session: Session) -> list[Change]:
        task = session.get(Task, task_id, with_for_update=True)
        if task is None or task.status in TERMINAL_STATUSES:
            return []
        move_task(session, task, "cancelled", idem_key=key)
        session.flush()
        return [Change(key, task_id, "cancelled")]

    return Unit(key, "advance", fn, (key,))


def test_a_unit_that_ran_again_and_found_its_change_made_is_a_duplicate(
    factory: rdb.ResilientSession[Any],
) -> None:
    ledger = Ledger()
    runner = Runner(factory, ledger, threading.Event())
    created = runner.run(create_unit("w0-1", "w0"))
    assert created
    unit = cancel_unit("w0-2", created[0].task_id)
    # its first run committed, and nobody saw it (the answer lost, taken for not committed)
    assert Runner(factory, Ledger(), threading.Event()).run(unit)
    assert runner.run(unit) == []  # the run that counts: the task is cancelled already
    found, checks = checked(factory, ledger)
    assert found.duplicate_writes == 1
    assert not checks["no_duplicate_writes"].passed
    assert "w0-2" in checks["no_duplicate_writes"].detail
    assert checks["no_lost_writes"].passed
    assert found.unaccounted_writes == 0  # the row is the unit's: a duplicate, said once


def test_a_unit_whose_second_copy_the_database_refused_is_a_duplicate(
    factory: rdb.ResilientSession[Any],
) -> None:
    ledger = Ledger()
    runner = Runner(factory, ledger, threading.Event())
    unit = create_unit("w0-1", "w0")
    assert Runner(factory, Ledger(), threading.Event()).run(unit)  # committed, unseen
    assert runner.run(unit) is None  # the second copy: a unique violation on its key
    assert ledger.failure_reasons == {"IntegrityError (SQLSTATE 23505)": 1}
    found, checks = checked(factory, ledger)
    assert found.duplicate_writes == 1
    assert not checks["no_duplicate_writes"].passed
    assert "w0-1" in checks["no_duplicate_writes"].detail
    assert found.failed_unit_writes == 0  # said once, as what it is


def test_units_that_ran_once_pass(factory: rdb.ResilientSession[Any]) -> None:
    ledger = Ledger()
    runner = Runner(factory, ledger, threading.Event())
    created = runner.run(create_unit("w0-1", "w0"))
    assert created
    assert runner.run(cancel_unit("w0-2", created[0].task_id))
    assert runner.run(cancel_unit("w0-3", created[0].task_id)) == []  # finished: nothing to do
    found, checks = checked(factory, ledger)
    assert (found.duplicate_writes, found.failed_unit_writes, found.unaccounted_writes) == (0, 0, 0)
    for name in ("no_lost_writes", "no_duplicate_writes", "failed_units_left_no_writes"):
        assert checks[name].passed, checks[name].detail


def test_an_advance_unit_run_again_makes_the_same_choice(
    factory: rdb.ResilientSession[Any],
) -> None:
    # a fault has a unit run again; with --seed, the run must still make the choices it made
    # (drawn per attempt from the worker's generator, a retry changed every later choice too)
    runner = Runner(factory, Ledger(), threading.Event())
    created = runner.run(create_unit("w0-1", "w0"))
    assert created
    task_id = created[0].task_id
    assert runner.run(
        Unit("w0-2", "claim", lambda s: _start(s, task_id, "w0-2"), ("w0-2",))
    )  # in_progress: three ways on
    engine = factory.kw["bind"]
    for seed in range(20):
        rng = random.Random(seed)
        unit = advance_unit(f"w0-x{seed}", task_id, rng)
        choices = []
        for _attempt in range(3):
            with Session(engine) as session:
                choices.append(unit.fn(session))
                session.rollback()
        assert choices[0] == choices[1] == choices[2]
        after = random.Random(seed)
        after.random()
        assert rng.random() == after.random()  # the worker's generator moved on by one draw


def _start(session: Session, task_id: int, key: str) -> list[Change]:
    task = session.get(Task, task_id)
    assert task is not None
    move_task(session, task, "in_progress", idem_key=key)
    return [Change(key, task_id, "in_progress")]


def _report(**changes: Any) -> dict[str, Any]:
    """A demo's report (as ``--json`` gives it) of a quiet run, with ``changes``."""
    report: dict[str, Any] = {
        "ok": True,
        "server": "embedded PostgreSQL at 127.0.0.1:5432",
        "workers": 8,
        "seconds": 45.0,
        "units_ok": 1,
        "units_failed": 0,
        "retries": 0,
        "retries_by_class": {},
        "faults_injected": {},
        "breaker_opens": 0,
        "breaker_closes": 0,
        "illegal_transitions_blocked": 0,
        "commit_outcome_unknown": 0,
        "lost_writes": 0,
        "duplicate_writes": 0,
        "illegal_states_in_db": 0,
        "invariants": {},
    }
    return {**report, **changes}


def test_the_text_report_shows_the_seed_to_run_the_same_workload_again() -> None:
    # without it, a run seen going wrong on a terminal could not be run again (only --json said it)
    report = _report(seed=734120995)
    text = plain_report(report)
    assert "8 workers, 45 s, seed 734120995 (--seed 734120995)" in text
    assert "rdb_demo_" not in text  # nothing kept: not named
    assert "1 worker, 45 s," in plain_report({**report, "workers": 1})  # (not "1 workers")


def test_the_text_report_says_how_the_unknown_commit_outcomes_were_settled() -> None:
    # a failover run said "commit outcome unknown 3" beside "units done / failed 1594 / 0":
    # each such unit is looked up by its key afterwards (the JSON's
    # commit_outcome_unknown_resolved), which the text did not say, so three units looked in
    # doubt though each was found committed
    report = _report(
        units_ok=1594,
        units_failed=1,
        commit_outcome_unknown=3,
        commit_outcome_unknown_resolved={"committed": 2, "rolled_back": 1},
    )
    lines = [" ".join(line.split()) for line in plain_report(report).splitlines()]
    assert (
        "commit outcome unknown 3 (each looked up by its key afterwards: 2 committed, "
        "1 not committed)"
    ) in lines
    none = {**report, "commit_outcome_unknown": 0}
    none["commit_outcome_unknown_resolved"] = {"committed": 0, "rolled_back": 0}
    lines = [" ".join(line.split()) for line in plain_report(none).splitlines()]
    assert "commit outcome unknown 0" in lines


def test_the_text_report_names_the_database_it_kept() -> None:
    report = _report(
        server="existing PostgreSQL at 127.0.0.1:5432",
        database="rdb_demo_0123456789",
        database_kept=True,
    )
    lines = [" ".join(line.split()) for line in plain_report(report).splitlines()]
    assert "database rdb_demo_0123456789 (kept: --keep-database)" in lines


def test_the_text_report_of_one_worker_process_says_process() -> None:
    # `--ha` alone runs one worker process: its report said "1 worker processes (p1...)"
    fleet: dict[str, Any] = {
        "processes": 1,
        "redis": "redis://***@127.0.0.1:6379/0",
        "breaker_opened_by": {"p1": 1},
        "breaker_openings": 1,
        "members": [],
        "budget": {
            "outage_retries": 0,
            "first_attempts": 1,
            "ratio": 0.2,
            "floor_per_second": 10,
            "granted": 0,
            "exhausted": 0,
            "conflict_retries": 0,
        },
    }
    report = _report(fleet=fleet)
    lines = [" ".join(line.split()) for line in plain_report(report).splitlines()]
    assert (
        "processes 1 worker process (p1) and p0, the fault schedule's, sharing "
        "redis://***@127.0.0.1:6379/0"
    ) in lines
    report["fleet"] = {**fleet, "processes": 4}
    lines = [" ".join(line.split()) for line in plain_report(report).splitlines()]
    assert (
        "processes 4 worker processes (p1...) and p0, the fault schedule's, sharing "
        "redis://***@127.0.0.1:6379/0"
    ) in lines


def test_outcomes_settled_at_the_end_are_counted_as_resolved(
    factory: rdb.ResilientSession[Any],
) -> None:
    # units whose lookup the drain deadline cut short are looked up at the end: the report's
    # "commit_outcome_unknown_resolved" must count them, or it does not add up to the unknowns
    committed = create_unit("w0-1", "w0")
    assert Runner(factory, Ledger(), threading.Event()).run(committed)
    never = create_unit("w0-2", "w0")
    demo = Demo(DemoOptions(seconds=8), cast(Any, None))
    for unit in (committed, never):
        demo.ledger.count("commit_outcome_unknown")
        demo.ledger.record_unresolved(unit)
    with factory.kw["bind"].connect() as conn:
        demo._settle_unknown(conn)
    events = demo.ledger.events
    assert (events["unknown_outcome_was_committed"], events["unknown_outcome_was_rolled_back"]) == (
        1,
        1,
    )
    assert set(demo.ledger.done) == {"w0-1"}
    assert set(demo.ledger.failed) == {"w0-2"}


@pytest.mark.parametrize(("fences", "said"), [(1, "1 lost answer proved"), (3, "3 lost answers")])
def test_the_markers_check_counts_lost_answers_in_words(fences: int, said: str) -> None:
    # its line said "1 lost answers proved not committed"
    found = DatabaseFindings(
        tasks=1,
        history_rows=1,
        lost_writes=0,
        lost_examples=(),
        duplicate_writes=0,
        duplicate_examples=(),
        failed_unit_writes=0,
        failed_examples=(),
        unaccounted_writes=0,
        unaccounted_examples=(),
        illegal_states=0,
        illegal_examples=(),
        trigger_drift=None,
        commit_markers=5,
        commit_fences=fences,
    )
    checks = invariants(
        found, Ledger(), faults={}, breaker_events=(), windows=(), breaker_final="closed"
    )
    (markers,) = [c for c in checks if c.name == "commit_markers_in_use"]
    assert said in markers.detail
