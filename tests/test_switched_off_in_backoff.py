"""A switch turned off by ``reload_config()`` while a unit backs off before its retry: the
retry is not made (the kill switch stops a replay already decided), and what is counted is
what the hooks are told. The retry used to run anyway, counted in ``health()`` (so Prometheus)
as a retry and a recovery that the hooks (OpenTelemetry, the dashboard) never saw."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import resilient_db as rdb


@pytest.mark.parametrize(
    ("switch", "said"),
    [
        # self-healing off: nothing is counted or said, as the hooks are told nothing
        ("SELF_HEALING_ENABLED", []),
        # retry alone off: the unit gave up, counted and told, naming why
        ("SELF_HEALING_RETRY", ["gave_up"]),
    ],
)
def test_a_retry_switched_off_during_its_backoff_is_not_made(
    *,
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    events: list[rdb.SelfHealEvent],
    switch: str,
    said: list[str],
) -> None:
    attempts: list[int] = []

    def unavailable(session: Session) -> None:
        attempts.append(1)
        session.execute(sa.text("SELECT raise_code('57P03')"))  # cannot connect now

    def backoff(seconds: float) -> None:  # the backoff: an operator switches off meanwhile
        clean_env.setenv(switch, "false")
        rdb.reload_config()

    Factory = rdb.ResilientSession(engine, service=service, sleep=backoff)
    with pytest.raises(sa.exc.OperationalError) as raised:
        Factory.run(unavailable)
    assert rdb.classify(raised.value) is rdb.Outcome.UNAVAILABLE  # the original error
    assert len(attempts) == 1
    counters = rdb.health()["services"][service]["counters"]
    told = [e.name for e in events if e.service == service and e.name != "commit_markers_missing"]
    assert told == said
    assert (counters["retries"], counters["recovered"]) == (0, 0)
    assert counters["gave_up"] == told.count("gave_up")
    if said:
        [gave_up] = [e for e in events if e.name == "gave_up"]
        assert (gave_up.fields["retries"], gave_up.fields["limit"]) == (0, "retry_off")
        assert "(retry was switched off meanwhile)" in gave_up.message
