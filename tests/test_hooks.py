"""One event path: every self-healing action reaches the hooks (``rdb.add_hook``) and the
``[SELF-HEAL]`` log line through the same emitter; logging switches govern the lines only."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import psycopg.errors as pge
import pytest

import resilient_db as rdb
from resilient_db._retry import Policy

_names = itertools.count()


@pytest.fixture
def events() -> Iterator[list[rdb.SelfHealEvent]]:
    seen: list[rdb.SelfHealEvent] = []
    rdb.add_hook(seen.append)
    rdb.add_hook(seen.append)  # once, however often it is added
    yield seen
    rdb.remove_hook(seen.append)


def flaky(times: int) -> object:
    calls = {"n": 0}

    def attempt() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise pge.SerializationFailure("conflict")
        return "done"

    return attempt


def policy(config: rdb.Config) -> Policy:
    return Policy(f"hooks-{next(_names)}", config, sleep=lambda s: None)


def test_hooks_see_retries_and_recovery_with_their_fields(
    events: list[rdb.SelfHealEvent], caplog: pytest.LogCaptureFixture
) -> None:
    p = policy(rdb.Config(circuit_breaker=False))
    with caplog.at_level(logging.INFO, logger="resilient_db"):
        assert p.call(flaky(2)) == "done"  # type: ignore[arg-type]
    names = [e.name for e in events]
    assert names == ["retry", "retry", "recovered"]
    first = events[0]
    assert first.service == p.service
    assert first.fields["sqlstate"] == "40001"
    assert first.level in (logging.WARNING, logging.INFO)
    assert "[SELF-HEAL]" not in first.message
    # the log lines are the same events
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("resilient_db")]
    assert len(lines) == 3
    assert all(line.startswith("[SELF-HEAL] ") for line in lines)
    assert lines[0] == "[SELF-HEAL] " + first.message


def test_hooks_see_actions_with_logging_off_but_not_with_self_healing_off(
    events: list[rdb.SelfHealEvent], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="resilient_db"):
        policy(rdb.Config(circuit_breaker=False, logging=False)).call(flaky(1))  # type: ignore[arg-type]
    assert [e.name for e in events] == ["retry", "recovered"]
    assert not [r for r in caplog.records if "[SELF-HEAL]" in r.getMessage()]
    events.clear()
    policy(rdb.Config(circuit_breaker=False, log_level="error")).call(flaky(1))  # type: ignore[arg-type]
    assert [e.name for e in events] == ["retry", "recovered"]  # the level filters lines only


def test_a_failing_hook_never_breaks_the_unit(events: list[rdb.SelfHealEvent]) -> None:
    def broken(event: rdb.SelfHealEvent) -> None:
        raise RuntimeError("instrumentation bug")

    rdb.add_hook(broken)
    try:
        assert policy(rdb.Config(circuit_breaker=False)).call(flaky(1)) == "done"  # type: ignore[arg-type]
    finally:
        rdb.remove_hook(broken)
    assert [e.name for e in events] == ["retry", "recovered"]  # later hooks still called


def test_breaker_state_changes_reach_the_hooks(events: list[rdb.SelfHealEvent]) -> None:
    p = policy(rdb.Config(failure_threshold=1, max_retries=0))
    with pytest.raises(pge.AdminShutdown):
        p.call(lambda: (_ for _ in ()).throw(pge.AdminShutdown("bye")))
    assert "breaker_opened" in [e.name for e in events]


def test_add_hook_needs_a_callable() -> None:
    with pytest.raises(TypeError, match="needs a callable"):
        rdb.add_hook("print")  # type: ignore[arg-type]
    rdb.remove_hook(print)  # not added: no error


def test_transition_reports_follow_the_logging_switches_and_reach_the_hooks(
    events: list[rdb.SelfHealEvent], caplog: pytest.LogCaptureFixture
) -> None:
    """The guard reports through the same emitter: SELF_HEALING_LOGGING / LOG_LEVEL apply."""
    from resilient_db.transitions._report import report as _report  # noqa: PLC0415 - the guard's one report path

    err = rdb.IllegalTransitionError(
        model="Task", pk=1, column="status", from_state="done", to_state="new", via="flush"
    )
    with caplog.at_level(logging.DEBUG, logger="resilient_db"):
        _report(err, rdb.Config(logging=False))
        _report(err, rdb.Config(log_level="error"))  # blocked moves log at ERROR: shown
        _report(rdb.StaleTransitionError(**vars_of(err)), rdb.Config(log_level="error"))
    lines = [r.getMessage() for r in caplog.records if "[SELF-HEAL]" in r.getMessage()]
    assert len(lines) == 1  # logging off: none; stale (a WARNING) under level error: none
    assert [e.name for e in events] == ["transition_blocked"] * 3
    assert events[2].fields["stale"] is True


def vars_of(err: rdb.IllegalTransitionError) -> dict[str, object]:
    return {
        "model": err.model,
        "pk": err.pk,
        "column": err.column,
        "from_state": err.from_state,
        "to_state": err.to_state,
        "via": err.via,
    }
