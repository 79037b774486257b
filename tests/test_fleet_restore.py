"""A Redis that lost the shared state (FLUSHALL, or restarted without persistence) while the
fleet's breaker is open or half-open: the processes that followed the opening write it back
(the first one wins, the others follow), so the fleet keeps rejecting until the opening's own
end, without reaching the database, then lets the configured number of probes through, as if
Redis had never lost anything. A process whose view is closed writes nothing back."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import (
    ForgetfulForwarder,
    Gate,
    fleet,
    open_the_fleets_breaker,
    opener_settings,
    shared,
    subscription_checks,
)
from processes import wait_for

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

#: the text of the line of the process that wrote the opening back
RESTORED = "Circuit breaker state restored"


def _breaker_hash(redis: RedisServer, service: str) -> dict[str, str]:
    raw = redis.client().hgetall(f"resilient_db:{{{service}}}:breaker")
    return {k.decode(): v.decode() for k, v in raw.items()}


def _opening_until(redis: RedisServer, service: str) -> float:
    """The end of the opening Redis holds for ``service``, once it holds one: an opening whose
    failure's script timed out (a loaded machine) was made locally and is shared when the link
    is back, a moment later."""
    wait_for(lambda: "until" in _breaker_hash(redis, service), "the opening in Redis", 20)
    return float(_breaker_hash(redis, service)["until"])


def _redis_now(redis: RedisServer) -> float:
    seconds, micros = redis.client().time()
    return float(seconds) + micros / 1_000_000


def _wait_past(redis: RedisServer, until: float) -> None:
    """Until Redis's clock is past ``until`` (the opening's end: the breaker's own open period,
    a condition on Redis's clock, not a backoff)."""
    wait_for(lambda: _redis_now(redis) > until + 0.01, "the end of the opening", 60)


def _total(answers: list[dict[str, Any]], key: str) -> int:
    return sum(int(a[key]) for a in answers)


def _settings(redis: RedisServer, reset: float) -> dict[str, str]:
    """Workers that open the fleet's breaker at their first failure (no retries: counts are
    exact), for ``reset`` seconds, then let two probes through."""
    return {
        "SELF_HEALING_REDIS_URL": redis.url,
        "SELF_HEALING_RETRY": "false",
        "SELF_HEALING_FAILURE_THRESHOLD": "1",
        "SELF_HEALING_RESET_TIMEOUT": str(round(reset * 1000)),
        "SELF_HEALING_HALF_OPEN_PROBES": "2",
    }


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_the_fleet_keeps_its_opening_when_redis_loses_it(
    redis_server: RedisServer, pg_url: str, gate: Gate, tmp_path: Path, loss: str
) -> None:
    """Three processes follow one opening; Redis then loses it. Flushed while the links stay
    up, the first background thread to check the opening its view holds writes it back;
    restarted empty, every link goes down and rejoins, and the first to rejoin writes it back.
    Either way with its own end (not a new reset timeout): every process rejects, without the
    database, until then, and half-open lets two probes through fleet-wide, not a closed
    breaker letting everything through. Written back, the opening is no new one: counted once
    (by the process that made it), logged once per process; one process says it wrote it
    back."""
    reset = 8.0  # long enough for a restart and every rejoin on a loaded machine
    service = "fleet"
    with fleet(3, pg_url, _settings(redis_server, reset), tmp_path, service=service) as workers:
        for w in workers:
            assert w.ask("wait", what="connected", timeout=20)["ok"], w.log()
        opener = workers[0]
        gate.set(down=True)
        assert opener.run(1)["errors"] == {"57P03": 1}
        for w in workers:
            assert w.ask("wait", what="open", timeout=10)["ok"], w.log()
        before = _breaker_hash(redis_server, service)
        assert before["st"] == "open"
        until = float(before["until"])

        if loss == "flushall":
            redis_server.flushall()
        else:
            redis_server.restart()
            for w in workers:
                assert w.ask("wait", what="connected", timeout=20)["ok"], w.log()
        wait_for(lambda: _breaker_hash(redis_server, service), "the opening written back")
        after = _breaker_hash(redis_server, service)
        assert after["st"] == "open"
        # its own end, not a new reset timeout from the rejoin (Redis's clock runs on: the
        # same host)
        assert abs(float(after["until"]) - until) < 0.5, (after, until)
        assert after["opens"] == "1"  # the same opening: not counted again

        calls = gate.calls()
        assert _redis_now(redis_server) < until, "the opening ended before the test looked"
        for w in workers:
            assert w.run(3) == {"ok": 0, "open": 3, "errors": {}}, w.log()
        assert gate.calls() == calls  # no unit reached the database

        # the opening's end: half-open, two probes for the whole fleet (they wait on the
        # test's lock, so none ends before every unit was admitted or refused)
        gate.set(down=False, hold=True)
        with gate.holding():
            _wait_past(redis_server, until)
            for w in workers:
                assert w.ask("start", n=4) == {"started": 4}
            for _ in range(2000):
                progress = [w.ask("progress") for w in workers]
                if _total(progress, "done") == 10 and gate.waiting_on_hold() == 2:
                    break
                time.sleep(0.005)  # polling the workers, not a backoff
            assert _total(progress, "open") == 10, progress
            assert gate.waiting_on_hold() == 2
        gate.set(hold=False)
        for _ in range(2000):
            progress = [w.ask("progress") for w in workers]
            if _total(progress, "done") == 12:
                break
            time.sleep(0.005)
        assert _total(progress, "ok") == 2, progress  # exactly the two probes ran
        for w in workers:
            assert w.ask("wait", what="closed", timeout=10)["ok"], w.log()

        healths = [w.ask("health")["services"][service] for w in workers]
        assert [h["counters"]["breaker_opens"] for h in healths] == [1, 0, 0]
        assert [h["breaker"]["shared"]["opens_followed"] for h in healths] == [0, 1, 1]
        assert all(h["breaker"]["shared"]["fleet_opens"] == 1 for h in healths)
        for w in workers:
            assert len(w.self_heal_lines("Circuit breaker opened")) == 1, w.log()
            assert w.self_heal_lines("no state shared through Redis") == [], w.log()
        restorers = [w for w in workers if w.self_heal_lines(RESTORED)]
        assert len(restorers) == 1, [w.log() for w in workers]
        (line,) = restorers[0].self_heal_lines(RESTORED)
        assert "open, rejecting calls" in line, line


def test_a_process_started_after_a_flush_follows_the_opening_without_the_database(
    redis_server: RedisServer, pg_url: str, gate: Gate, tmp_path: Path
) -> None:
    """Process A opened the fleet's breaker (for long); Redis is flushed with the links up,
    and nobody runs a unit. Process B, started after the flush, reads the empty Redis: its
    breaker is closed. A's background thread notices that Redis lost the opening its view
    holds and writes it back (its own end, the same opening): B follows it, as another
    process's written back, and rejects without the database. Nothing waited for the
    opening's end, nor for a unit of A's failure path."""
    service = "afterflush"
    settings = opener_settings(redis_server.url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with contextlib.ExitStack() as stack:
        (opener,) = stack.enter_context(fleet(1, pg_url, settings, tmp_path / "a", service=service))
        gate.set(down=True)
        open_the_fleets_breaker(opener)
        until = _opening_until(redis_server, service)
        assert opener.self_heal_lines(RESTORED) == []  # (Redis holds it: nothing written back)

        # A is stopped (SIGSTOP) from before the flush until B has read the empty Redis: B's
        # view is closed, however quick A's background thread is
        os.kill(opener.pid, signal.SIGSTOP)
        try:
            redis_server.flushall()
            (late,) = stack.enter_context(
                fleet(1, pg_url, settings, tmp_path / "b", service=service)
            )
            assert late.ask("wait", what="connected", timeout=20)["ok"], late.log()
            assert late.ask("health")["services"][service]["breaker"]["state"] == "closed"
            assert _breaker_hash(redis_server, service) == {}
        finally:
            os.kill(opener.pid, signal.SIGCONT)

        calls = gate.calls()
        assert late.ask("wait", what="open", timeout=20)["ok"], (late.log(), opener.log())
        assert late.run(3) == {"ok": 0, "open": 3, "errors": {}}, late.log()
        assert opener.run(2) == {"ok": 0, "open": 2, "errors": {}}, opener.log()
        assert gate.calls() == calls  # no unit reached the database

        state = _breaker_hash(redis_server, service)
        assert state["st"] == "open", state
        assert abs(float(state["until"]) - until) < 0.5, (state, until)  # its own end
        assert state["opens"] == "1"  # the same opening: not counted again
        (line,) = opener.said(RESTORED)
        assert "open, rejecting calls" in line, line
        (opened,) = late.self_heal_lines("Circuit breaker opened")
        assert "written back by another process" in opened, opened
        assert late.self_heal_lines(RESTORED) == []
        health = late.ask("health")["services"][service]
        assert health["counters"]["breaker_opens"] == 0
        assert health["breaker"]["shared"]["opens_followed"] == 1
        health = opener.ask("health")["services"][service]
        assert health["counters"]["breaker_opens"] == 1
        assert len(opener.self_heal_lines("Circuit breaker opened")) == 1, opener.log()


def test_a_process_whose_views_are_closed_checks_nothing_in_the_background(
    redis_server: RedisServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background check of an opening held (see the test above) costs a script a second
    only while a view holds one: with the breaker closed, a link whose subscription is checked
    several times (each check a second at least after the link's last work) sends nothing;
    opened, it reads the breaker's state back (Redis holds it: nothing is written)."""
    monkeypatch.setattr(_fleet, "SUBSCRIPTION_CHECK_INTERVAL", 0.3)
    monkeypatch.setattr(_fleet, "VIEW_CHECK_INTERVAL", 0.3)
    service = "quietcheck"
    Factory = _factory(redis_server, engine, service, reset_timeout=600.0)
    breaker = Factory.policy.breaker
    assert breaker is not None
    link = breaker._fleet
    commands = link.commands
    with subscription_checks(link) as checks:
        wait_for(lambda: len(checks) >= 4, "four checks of the subscription", 10)
    assert link.commands == commands
    breaker.open()
    commands = link.commands
    wait_for(lambda: link.commands >= commands + 2, "two checks of the opening", 10)
    assert _breaker_hash(redis_server, service)["st"] == "open"
    assert "gen" in _breaker_hash(redis_server, service)
    breaker.close()
    assert _breaker_hash(redis_server, service)["st"] == "closed"


def test_a_stale_view_behind_a_dead_subscription_is_not_written_back(
    redis_server: RedisServer, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """This process follows the fleet's opening (600 s); its subscription is then dropped
    without a reset (a NAT forgetting the flow: nothing arrives, nothing fails), its commands'
    connection still passing. Another process closes the fleet's breaker (its message never
    arrives here) and Redis is flushed at once. The view, open, is stale: written back, it
    would re-open the fleet's breaker for everyone until that opening's end. The background
    thread finds Redis empty, confirms its subscription before writing anything back, finds
    it dead, and rejoins: nothing is written back, and this process ends closed, as the
    fleet is."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = "staleview"
    with ForgetfulForwarder(redis_server.port) as forwarder:
        # (Redis's answers awaited up to 5 s: with the default 0.1 s a loaded machine's link
        # gave up on one, and its "restored" line was taken for the one this test waits for)
        config = rdb.Config(
            redis_url=forwarder.url(redis_server.url),
            retry=False,
            reset_timeout=600.0,
            redis_timeout=5.0,
        )
        Factory = rdb.ResilientSession(engine, service=service, config=config)
        wait_for(lambda: shared(service)["connected"], "the link", 10)
        breaker = Factory.policy.breaker
        assert breaker is not None
        breaker.open()
        assert _breaker_hash(redis_server, service)["st"] == "open"
        restored = _lines(caplog, "Shared state restored")
        forwarder.forget(subscriptions_only=True)
        # another process's close() (its script, straight to Redis), then the flush
        redis_server.client().register_script(_fleet._FORCE)(
            keys=_fleet._breaker_keys(service),
            args=[_fleet.CHANNEL.format(db=0), service, "another-process", "closed", 600.0],
        )
        redis_server.flushall()
        # the dead subscription is found (at the latest its own check, ~6 s) and made again
        wait_for(
            lambda: _lines(caplog, "Shared state restored") == restored + 1,
            "the link, subscribed again",
            20,
        )
        assert _breaker_hash(redis_server, service).get("st") != "open"
        assert _lines(caplog, RESTORED) == 0
        assert breaker.state == "closed"
        assert shared(service)["connected"]


def test_an_opening_that_ended_is_not_checked_in_the_background(
    redis_server: RedisServer, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle service's opening ends, and no unit comes to ask for a probe: its view stays
    half-open. The background check of the opening (a script per check while it runs) stops
    at its end: a link whose subscription is checked several times afterwards sends nothing
    (no Redis traffic for good while nothing is open)."""
    monkeypatch.setattr(_fleet, "SUBSCRIPTION_CHECK_INTERVAL", 0.3)
    monkeypatch.setattr(_fleet, "VIEW_CHECK_INTERVAL", 0.1)
    service = "endedcheck"
    Factory = _factory(redis_server, engine, service, reset_timeout=1.0)
    breaker = Factory.policy.breaker
    assert breaker is not None
    link = breaker._fleet
    breaker.open()
    until = _opening_until(redis_server, service)
    commands = link.commands
    wait_for(lambda: link.commands >= commands + 2, "two checks of the opening", 10)
    _wait_past(redis_server, until)
    with subscription_checks(link) as checks:
        wait_for(lambda: len(checks) >= 1, "a check of the subscription after the end", 10)
        commands = link.commands
        wait_for(lambda: len(checks) >= 4, "three more checks of the subscription", 10)
    assert link.commands == commands
    assert breaker.describe()["state"] == "half-open"
    assert _breaker_hash(redis_server, service)["st"] == "open"  # (nobody asked for a probe)


def test_an_opening_made_alone_and_shared_into_an_empty_redis_counts_on(
    redis_server: RedisServer, engine: sa.Engine, gate: Gate
) -> None:
    """The fleet's breaker opened twice; Redis then stops, and this process's failure opens
    its breaker on its own. Redis comes back empty (no persistence) and the process shares its
    opening there: the fleet's count of openings goes on from the two it had seen (3), not
    from 1 as though the fleet had never opened, and equals the openings this process made."""
    service = "countson"
    Factory = _factory(redis_server, engine, service, reset_timeout=600.0, failure_threshold=1)
    breaker = Factory.policy.breaker
    assert breaker is not None
    for _ in range(2):
        breaker.open()
        breaker.close()
    assert shared(service)["fleet_opens"] == 2
    redis_server.stop()
    try:
        wait_for(lambda: not shared(service)["connected"], "the link down", 10)
        gate.set(down=True)
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(_unit)
        assert breaker.state == "open"  # (its own opening: Redis did not answer)
    finally:
        redis_server.start()
    wait_for(lambda: shared(service)["connected"], "the link back", 10)
    state = _breaker_hash(redis_server, service)
    assert state["st"] == "open"
    assert state["opens"] == "3"
    assert shared(service)["fleet_opens"] == 3
    assert shared(service)["opened_here"] == 3


def _unit(s: Any) -> None:
    s.execute(sa.text("SELECT rdb_gate()"))


def _factory(redis: RedisServer, engine: sa.Engine, service: str, **settings: Any) -> Any:
    config = rdb.Config(redis_url=redis.url, retry=False, **settings)
    Factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: shared(service)["connected"], "the link", 10)
    return Factory


def test_probes_held_when_redis_is_flushed_end_and_new_ones_stay_bounded(
    redis_server: RedisServer, engine: sa.Engine, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """Half-open with both probe slots taken, Redis is flushed: the reservations are gone. The
    next unit asking for a probe writes the half-open state back with every slot free: two
    more probes at most (not a closed breaker letting every unit through), the others are
    refused. The probes that were running end as usual (Redis finds their reservations
    nowhere: they count nowhere), nobody waits for good, and the new probes close it."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = "heldprobes"
    Factory = _factory(redis_server, engine, service, reset_timeout=0.3, half_open_probes=2)
    breaker = Factory.policy.breaker
    assert breaker is not None
    breaker.open()
    until = _opening_until(redis_server, service)
    outcomes: list[str] = []
    lock = threading.Lock()

    def unit() -> None:
        try:
            Factory.run(_unit)
            outcome = "ok"
        except rdb.CircuitOpenError:
            outcome = "open"
        with lock:
            outcomes.append(outcome)

    threads: list[threading.Thread] = []

    def start(n: int) -> None:
        for _ in range(n):
            thread = threading.Thread(target=unit, daemon=True)
            thread.start()
            threads.append(thread)

    gate.set(hold=True)
    with gate.holding():
        _wait_past(redis_server, until)
        start(2)  # the two probes, held
        wait_for(lambda: gate.waiting_on_hold() == 2, "the two probes")
        assert _breaker_hash(redis_server, service)["st"] == "half-open"
        redis_server.flushall()
        start(6)
        # two new probes, beside the two held at the flush; the four others refused
        wait_for(lambda: len(outcomes) == 4 and gate.waiting_on_hold() == 4, "the new probes", 10)
        assert outcomes == ["open"] * 4
        assert gate.waiting_on_hold() == 4
        assert _breaker_hash(redis_server, service)["st"] == "half-open"
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert sorted(outcomes) == ["ok"] * 4 + ["open"] * 4
    assert breaker.state == "closed"
    assert _breaker_hash(redis_server, service)["st"] == "closed"
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if RESTORED in m]) == 1
    assert not [m for m in lines if "no state shared through Redis" in m]


def test_a_process_whose_view_is_closed_writes_nothing_back(
    redis_server: RedisServer, engine: sa.Engine, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """The fleet's breaker opened and closed again (this process's view: closed, a shared state
    seen), then Redis is flushed: a failure counted in the empty Redis and a rejoin (its
    subscription cut) write no breaker state back, and nothing is said."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = "closedview"
    Factory = _factory(redis_server, engine, service, reset_timeout=30.0, failure_threshold=5)
    breaker = Factory.policy.breaker
    assert breaker is not None
    breaker.open()
    breaker.close()
    assert _breaker_hash(redis_server, service)["st"] == "closed"
    redis_server.flushall()
    gate.set(down=True)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(_unit)  # counted by the empty Redis: one failure, closed
    redis_server.client().execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    wait_for(lambda: not shared(service)["connected"], "the link down", 10)
    wait_for(lambda: shared(service)["connected"], "the link back", 10)
    state = _breaker_hash(redis_server, service)
    assert "st" not in state, state
    assert "gen" not in state, state
    assert breaker.state == "closed"
    assert not [r for r in caplog.records if RESTORED in r.getMessage()]


def test_a_closed_breaker_follows_an_opening_another_process_wrote_back(
    redis_server: RedisServer, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process (its read on rejoining, as that process sends it) writes the fleet's
    opening back into an empty Redis: 20 s left, the third opening it had seen. This process,
    its breaker closed (started after the loss, say), follows it as another process's, saying
    why; the count of openings is the one written back, not one more."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = "follower"
    Factory = _factory(redis_server, engine, service, reset_timeout=30.0)
    breaker = Factory.policy.breaker
    assert breaker is not None
    force = redis_server.client().register_script(_fleet._FORCE)
    view = ["open", 20, 3, 1_700_000_000_000_000]  # state, seconds left, openings, gen
    args = [breaker._fleet.channel, service, "other-1", "", 0, *view]
    assert force(keys=_fleet._breaker_keys(service), args=args)[0] == b"open"
    # (the link's thread sets the state, then its listeners log: wait for the line too)
    wait_for(
        lambda: (
            breaker.state == "open"
            and any("Circuit breaker opened" in r.getMessage() for r in caplog.records)
        ),
        "the opening followed and logged",
    )
    (opened,) = [
        r.getMessage() for r in caplog.records if "Circuit breaker opened" in r.getMessage()
    ]
    assert "Redis lost the shared state (restarted or flushed)" in opened, opened
    assert "written back by another process" in opened, opened
    assert not [r for r in caplog.records if RESTORED in r.getMessage()]  # (not this one's)
    health = rdb.health()["services"][service]
    assert health["counters"]["breaker_opens"] == 0
    assert health["breaker"]["shared"]["opens_followed"] == 1
    assert health["breaker"]["shared"]["fleet_opens"] == 3
    assert 0 < health["breaker"]["retry_after"] <= 20
    state = _breaker_hash(redis_server, service)
    assert state["opens"] == "3"
    assert int(state["gen"]) > view[3]
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(_unit)


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if text in r.getMessage())


def test_an_opening_by_hand_written_back_is_still_by_hand(
    redis_server: RedisServer, pg_url: str, gate: Gate, tmp_path: Path, capsys: Any
) -> None:
    """Process A opens the fleet's breaker by hand, with a reason; B follows it. Redis is
    flushed while both are stopped (SIGSTOP) and C, started then, reads the empty Redis (its
    breaker closed). Written back by A's or B's background check, the opening is still the
    operator's: Redis records it by hand with the reason (``resilient-db breaker status``
    says so), A and B say nothing new, C's line says it was opened by hand in another
    process, and every process's refusals and ``health()`` say by hand and why, not
    failures."""
    from resilient_db._cli import main  # noqa: PLC0415

    reason = "database upgrade"
    service = "handback"
    settings = opener_settings(redis_server.url)
    (tmp_path / "ab").mkdir()
    (tmp_path / "c").mkdir()
    with contextlib.ExitStack() as stack:
        a, b = stack.enter_context(fleet(2, pg_url, settings, tmp_path / "ab", service=service))
        for w in (a, b):
            assert w.ask("wait", what="connected", timeout=20)["ok"], w.log()
        assert a.ask("open_breaker", reason=reason, seconds=300) == {"fleet_wide": True}
        assert b.ask("wait", what="open", timeout=10)["ok"], b.log()
        before = _breaker_hash(redis_server, service)
        assert (before["hand"], before["why"]) == ("1", reason)

        for w in (a, b):
            os.kill(w.pid, signal.SIGSTOP)
        try:
            redis_server.flushall()
            (c,) = stack.enter_context(fleet(1, pg_url, settings, tmp_path / "c", service=service))
            assert c.ask("wait", what="connected", timeout=20)["ok"], c.log()
            assert c.ask("health")["services"][service]["breaker"]["state"] == "closed"
        finally:
            for w in (a, b):
                os.kill(w.pid, signal.SIGCONT)

        assert c.ask("wait", what="open", timeout=20)["ok"], (c.log(), a.log(), b.log())
        after = _breaker_hash(redis_server, service)
        assert after["st"] == "open", after
        assert abs(float(after["until"]) - float(before["until"])) < 0.5, (after, before)
        assert (after["hand"], after["why"]) == ("1", reason), after

        calls = gate.calls()
        causes = {
            a: f"opened by hand: {reason}",
            b: f"opened by hand in another process: {reason}",
            c: f"opened by hand in another process: {reason}",
        }
        for w, cause in causes.items():
            refused = w.ask("try")
            assert refused["outcome"] == "open", (refused, w.log())
            assert (refused["by_hand"], refused["cause"]) == (True, cause), (refused, w.log())
            health = w.ask("health")["services"][service]["breaker"]
            assert (health["by_hand"], health["reason"]) == (True, reason), w.log()
        assert gate.calls() == calls  # nothing reached the database
        for w in (a, b):
            assert len(w.self_heal_lines("Circuit breaker opened")) == 1, w.log()
        (opened,) = c.self_heal_lines("Circuit breaker opened")
        assert f"by hand in another process (shared through Redis) ({reason})" in opened, opened
        assert "failures" not in opened, opened

        assert main(["breaker", "status", service, "--redis-url", redis_server.url]) == 0
        out = capsys.readouterr().out
        assert f"{service}: open by hand ({reason}) since" in out, out
