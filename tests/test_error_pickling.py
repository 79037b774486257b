"""The library's exceptions cross processes: Celery, RQ and ``multiprocessing`` pickle an
exception raised in a worker and raise it again in the caller. Each comes back of its type, with
its message, its ``repr`` and its attributes; one that is also SQLAlchemy's ``DBAPIError`` keeps
what SQLAlchemy's handlers read (``orig`` and its SQLSTATE, ``statement``, ``code``). Built by
real units where a unit can raise them, otherwise with their documented constructors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb
from resilient_db._commit import UnprovenCommit
from resilient_db._internals import InternalsChanged
from resilient_db.examples.tasks import Base, Task

ROOT = Path(__file__).resolve().parent.parent

#: prints, for each exception pickled on its standard input, what a handler sees of it
SHOW = """
import json, pickle, sys
shown = []
for error in pickle.loads(sys.stdin.buffer.read()):
    shown.append([type(error).__qualname__, str(error), repr(error),
                  {k: repr(v) for k, v in sorted(vars(error).items())}])
print(json.dumps(shown))
"""


def _seen(error: BaseException) -> list[Any]:
    return [
        type(error).__qualname__,
        str(error),
        repr(error),
        {k: repr(v) for k, v in sorted(vars(error).items())},
    ]


def _round_trip(error: BaseException) -> Any:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert _seen(copy) == _seen(error)
    assert copy.args == error.args
    return copy


@pytest.fixture
def tasks_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        rdb.install_transition_trigger(conn, Task)
    rdb.install_commit_markers(engine)
    yield engine
    engine.dispose()


def _add_task(factory: rdb.ResilientSession[Session], status: str = "pending") -> int:
    def add(session: Session) -> int:
        task = Task(idem_key=uuid.uuid4().hex, title="t", status="pending")
        session.add(task)
        session.flush()
        if status != "pending":
            task.status = status
        return task.id

    return factory.run(add)


def test_errors_raised_by_real_units_survive_pickling(
    tasks_engine: sa.Engine, service: str
) -> None:
    factory = rdb.ResilientSession(tasks_engine, service=service)
    errors: list[BaseException] = []

    # the guard at flush
    task_id = _add_task(factory)

    def complete(session: Session) -> None:
        task = session.get(Task, task_id)
        assert task is not None
        task.status = "completed"  # pending -> completed: not allowed

    with pytest.raises(rdb.IllegalTransitionError) as flushed:
        factory.run(complete)
    assert flushed.value.via == "flush"
    errors.append(flushed.value)

    # the trigger: an IllegalTransitionError mapped from the server's error
    def raw(session: Session) -> None:
        completed = sa.text("UPDATE tasks SET status = 'completed' WHERE id = :i")
        session.execute(completed, {"i": task_id})

    with pytest.raises(rdb.IllegalTransitionError) as triggered:
        factory.run(raw)
    assert triggered.value.via == "db"
    errors.append(triggered.value)

    # a stale row: moved by another transaction after this session loaded it
    with factory() as session:
        task = session.get(Task, task_id)
        assert task is not None
        with factory.begin() as other:
            other.execute(
                sa.text("UPDATE tasks SET status = 'in_progress' WHERE id = :i"), {"i": task_id}
            )
        task.status = "cancelled"
        with pytest.raises(rdb.StaleTransitionError) as stale:
            session.flush()
    errors.append(stale.value)

    # a unit inside a transaction the caller opened
    with factory() as session:
        session.execute(sa.text("SELECT 1"))
        with pytest.raises(rdb.TransactionStateError) as nested:
            factory.run_in(session, lambda s: None)
    errors.append(nested.value)

    # a result its check refuses (the check's own error is __cause__, which pickling drops)
    def no_owner(result: object) -> bool:
        raise ValueError("no owner")

    with pytest.raises(rdb.ResponseValidationError) as invalid:
        factory.run(lambda s: 1, validate=no_owner)
    errors.append(invalid.value)

    # an open breaker: one failure opens it, the next call is refused without a connection
    config = rdb.Config(failure_threshold=1, max_retries=0)
    breaking = rdb.ResilientSession(tasks_engine, service=f"{service}-b", config=config)
    with pytest.raises(sa.exc.OperationalError):
        breaking.run(lambda s: s.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())")))
    with pytest.raises(rdb.CircuitOpenError) as refused:
        breaking.run(lambda s: s.execute(sa.text("SELECT 1")))
    errors.append(refused.value)

    # bad settings and bad rules
    with pytest.raises(rdb.ConfigError) as bad_config:
        rdb.load_config({"SELF_HEALING_MAX_RETRIES": "many", "SELF_HEALING_ENABLED": "maybe"})
    errors.append(bad_config.value)
    with pytest.raises(rdb.TransitionRulesError) as bad_rules:
        rdb.TransitionRules(column="status", transitions={"a": {1.5}}, initial={"a"})  # type: ignore[arg-type]
    errors.append(bad_rules.value)

    copies = [_round_trip(error) for error in errors]
    assert copies[0].from_state == "pending"
    assert copies[0].to_state == "completed"
    assert isinstance(copies[2], sa.orm.exc.StaleDataError)  # caught as SQLAlchemy's too
    assert copies[4].validator == invalid.value.validator
    assert copies[4].__cause__ is None  # as with any exception: said in docs/many-processes.md
    assert copies[5].retry_after == refused.value.retry_after
    assert copies[6].problems == bad_config.value.problems
    assert sorted(copies[6].problems) == ["SELF_HEALING_ENABLED", "SELF_HEALING_MAX_RETRIES"]
    assert _in_another_process(errors) == [_seen(error) for error in errors]


def test_errors_built_with_their_constructors_survive_pickling() -> None:
    """Those a test can't raise through a unit in a few lines (a COMMIT whose answer was lost or
    came with a warning, a library release without an API resilient_db reads)."""
    errors: list[BaseException] = [
        rdb.ResilientDBError("plain"),
        rdb.CommitOutcomeUnknownError("orders", 4711, "connection lost"),
        rdb.CommitOutcomeUnknownError("orders", marker="0c3f"),
        rdb.CircuitOpenError("orders", 2.5, cause="a hot standby refused writes"),
        rdb.BypassRefusedError("refused", role="app", login_role="login"),
        rdb.IllegalTransitionError(
            model="Task",
            pk=7,
            column="status",
            from_state=None,
            to_state="done",
            via="flush",
            inserted=True,
        ),
        # (both said a constructor's TypeError, or a doubled message, when unpickled)
        InternalsChanged("sqlalchemy", "Session._flushing", "flushes would be missed"),
        UnprovenCommit("canceling wait for synchronous replication due to user request"),
    ]
    copies = [_round_trip(error) for error in errors]
    assert (copies[6].library, copies[6].name) == ("sqlalchemy", "Session._flushing")
    assert copies[7].warning == "canceling wait for synchronous replication due to user request"
    assert copies[5].inserted
    assert _in_another_process(errors) == [_seen(error) for error in errors]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="add_note() is Python 3.11+")
def test_notes_added_to_an_error_are_kept() -> None:
    error = rdb.ConfigError({"SELF_HEALING_MAX_RETRIES": "not a number"})
    error.add_note("while starting the orders worker")
    assert _round_trip(error).__notes__ == ["while starting the orders worker"]


def _in_another_process(errors: list[BaseException]) -> Any:
    """What a handler sees of ``errors`` unpickled by a fresh interpreter (a worker's caller)."""
    done = subprocess.run(
        [sys.executable, "-c", SHOW],
        input=pickle.dumps(errors),
        capture_output=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def test_a_breaker_time_carried_from_another_host_is_never_longer_than_recorded() -> None:
    """An error a unit gave up on carries how long the breaker refuses attempts, as of this
    process's monotonic clock (a web answer's ``Retry-After``). Unpickled on another host, whose
    clock may be behind, it said the clock's difference on top: hours, or days."""
    from resilient_db._classify import breaker_open_for, mark_breaker_open  # noqa: PLC0415

    error = rdb.CircuitOpenError("orders", 5.0)
    mark_breaker_open(error, 5.0)
    copy = _round_trip(error)
    seconds, when = copy.resilient_db_breaker_open_for
    copy.resilient_db_breaker_open_for = (seconds, when + 86_400.0)  # a clock a day ahead
    assert 0.0 < breaker_open_for(copy) <= 5.0
