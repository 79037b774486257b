"""The timeline fence shared by a fleet (``SELF_HEALING_REDIS_URL``): a process that saw a
cluster's new timeline (a promoted standby) tells the others through Redis, so a process that
never saw it (started after the old primary came back, or whose connections all stayed on the
old primary) refuses the old primary back as a primary too.

Real servers (a :class:`~resilient_db.testing.StandbyPair`: a crash, ``pg_promote``, the old
primary restarted without being demoted), a real Redis, real worker processes
(``fleet_worker.py``). Nothing is added to a unit's path: the fleet's timelines come by a
pub/sub message and a read when a link (re)joins; Redis down leaves each engine's own fence."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from fleet import Gate, fleet
from test_failover_fencing import (
    CONFIG,
    as_plain_role,
    keys_on,
    prepare_as_plain_role,
    refused_lines,
)
from test_failover_review import DATABASE, Units, fail_over, ledger, units

import resilient_db as rdb
from resilient_db._fleet import MAX_TIMELINES, TIMELINES_KEY, follow_timelines
from resilient_db._state import STATE
from resilient_db.testing import EmbeddedPostgres, RedisServer, StandbyPair

pytestmark = pytest.mark.slow

#: a worker's settings: no retries, so a refused unit shows its SQLSTATE; a breaker that never
#: opens here (a refusal counts as a failure)
WORKER = {"SELF_HEALING_RETRY": "false", "SELF_HEALING_FAILURE_THRESHOLD": "1000"}


def system_identifier(server: EmbeddedPostgres) -> str:
    return str(server.execute("SELECT system_identifier FROM pg_control_system()")[0][0])


def fleet_timelines(url: str) -> dict[str, str]:
    """The fleet's timelines hash in Redis, as stored."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return dict(client.hgetall(TIMELINES_KEY))
    finally:
        client.close()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # polling a condition, not a backoff


@pytest.fixture
def split_pair(pg_standby_factory: Callable[..., StandbyPair]) -> StandbyPair:
    """An asynchronous pair, its ledger owned by a plain role, and the workers' gate."""
    pair = pg_standby_factory(synchronous=False)
    prepare_as_plain_role(pair.primary)
    Gate(pair.primary.url(DATABASE)).close()
    pair.wait_replayed()
    return pair


def test_processes_that_never_saw_the_promotion_refuse_the_old_primary(
    split_pair: StandbyPair,
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """This process's engine sees the promoted standby's timeline 2 and shares it. A worker
    whose connections only ever reached the old primary (its URL names it alone), started
    before the failover, and one started after the old primary came back as a primary, both
    refuse it (08004, the ERROR saying the fleet saw the timeline), though neither ever
    reached the new primary. A worker on another cluster, on timeline 1, is not refused: the
    fleet's timelines are per cluster."""
    pair = split_pair
    caplog.set_level(logging.INFO, logger="resilient_db")
    settings = {"SELF_HEALING_REDIS_URL": redis_server.url, **WORKER}
    old_primary = pair.primary.url(DATABASE)  # the old primary alone
    config = CONFIG.replace(circuit_breaker=True, failure_threshold=1000)
    config = config.replace(redis_url=redis_server.url)
    url = pair.url(DATABASE)
    for name in ("early", "late", "other"):
        (tmp_path / name).mkdir()
    with (
        EmbeddedPostgres() as other,
        fleet(1, old_primary, settings, tmp_path / "early", service="fence-early") as (early,),
    ):
        Gate(other.url()).close()
        assert early.ask("wait", what="connected", timeout=20)["ok"], early.log()
        assert early.run(1) == {"ok": 1, "open": 0, "errors": {}}  # timeline 1, there
        with units(url, "psycopg", config=config, service="fence-seer") as made:
            assert made.write("a") == pair.primary.port
            pair.wait_replayed()
            fail_over(pair)
            assert made.write("b") == pair.standby.port  # timeline 2 seen here, and shared
            system = system_identifier(pair.standby)
            wait_for(lambda: system in fleet_timelines(redis_server.url), "the shared timeline")
            assert fleet_timelines(redis_server.url)[system].startswith("2 ")
            pair.primary.start()  # not demoted: a second primary, on timeline 1
            early.ask("wait_timeline", timeline=2, timeout=10)  # (its message)
            assert early.run(2) == {"ok": 0, "open": 0, "errors": {"08004": 2}}
            late_settings = {**settings}
            with (
                fleet(1, old_primary, late_settings, tmp_path / "late", service="fence-late") as (
                    late,
                ),
                fleet(1, other.url(), settings, tmp_path / "other", service="fence-other") as (
                    elsewhere,
                ),
            ):
                assert late.ask("wait", what="connected", timeout=20)["ok"], late.log()
                late.ask("wait_timeline", timeline=2, timeout=10)  # (read on joining)
                assert late.run(1) == {"ok": 0, "open": 0, "errors": {"08004": 1}}
                counters = late.ask("health")["services"]["fence-late"]["counters"]
                assert counters["stale_timeline_refusals"] == 1
                assert counters["stale_timeline_refusals_fleet"] == 1
                (line,) = late.self_heal_lines("Refused a connection to an old primary")
                assert f"127.0.0.1:{pair.primary.port} takes writes on timeline 1" in line
                assert (
                    f"timeline 2 of that cluster was seen at 127.0.0.1:{pair.standby.port} "
                    "by another process of the fleet (shared through Redis)"
                ) in line, line
                # another cluster, on timeline 1: the fleet's timeline 2 is not its own
                assert elsewhere.ask("wait", what="connected", timeout=20)["ok"]
                elsewhere.ask("wait_timeline", timeline=2, timeout=10)
                assert elsewhere.run(2) == {"ok": 2, "open": 0, "errors": {}}
                counters = elsewhere.ask("health")["services"]["fence-other"]["counters"]
                assert counters["stale_timeline_refusals"] == 0
            assert early.self_heal_lines("by another process of the fleet")
            # this process saw timeline 2 itself: its own fence, not the fleet's
            counters = rdb.health()["services"]["fence-seer"]["counters"]
            assert counters["stale_timeline_refusals_fleet"] == 0
        # one cluster's timeline, by its system identifier; timeline 1 (the early worker's,
        # the other cluster's) is never shared: it fences nothing
        stored = fleet_timelines(redis_server.url)
        assert list(stored) == [system]
        assert stored[system].startswith("2 ")
    assert ledger(pair) == {"a": 1, "b": 1}
    assert refused_lines(caplog) == []  # (this process never reached the old primary again)


def test_redis_down_leaves_the_engines_own_fence(
    split_pair: StandbyPair, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down from the start: every connect goes on without it (nothing raised, no
    wait for it), and the engine's own fence still refuses the old primary once it saw the
    new timeline; nothing of it is counted as the fleet's."""
    pair = split_pair
    caplog.set_level(logging.INFO, logger="resilient_db")
    redis_server.stop()
    config = CONFIG.replace(circuit_breaker=True, failure_threshold=1000)
    config = config.replace(redis_url=redis_server.url)
    service = "fence-redis-down"
    with units(pair.url(DATABASE), "psycopg", config=config, service=service) as made:
        assert made.write("a") == pair.primary.port
        pair.wait_replayed()
        fail_over(pair)
        assert made.write("b") == pair.standby.port
        pair.primary.start()
        pair.standby.terminate_backends()  # the next connections are new ones
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the driver's, wrapped
            made.write("c")
        assert rdb.sqlstate_of(raised.value) == "08004", raised.value
        entry = rdb.health()["services"][service]
        assert entry["breaker"]["shared"]["connected"] is False
        assert entry["counters"]["stale_timeline_refusals"] == 1 + CONFIG.max_retries
        assert entry["counters"]["stale_timeline_refusals_fleet"] == 0
    (line,) = refused_lines(caplog)
    assert "by another process of the fleet" not in line.getMessage()
    assert line.self_heal["fleet"] is False  # type: ignore[attr-defined]
    assert ledger(pair) == {"a": 1, "b": 1}


def test_the_fleets_timelines_are_bounded(redis_server: RedisServer, pg_url: str) -> None:
    """Past MAX_TIMELINES clusters the one raised longest ago is forgotten, in Redis and in
    the link's copy; a timeline is only ever raised, never lowered."""
    config = rdb.Config(redis_url=redis_server.url)
    engine = sa.create_engine(pg_url)
    rdb.ResilientSession(engine, service="fence-bounded", config=config)  # (its link)
    link = STATE.fleet_links[redis_server.url]
    try:
        wait_for(lambda: link.up, "the link")
        first = 7000000000000000000
        for n in range(MAX_TIMELINES + 6):
            link.share_timeline(f"{first + n}", 3, f"127.0.0.1:{n}")
            if n % 16 == 15:  # (sent in a few batches: each within the link's own bound)
                wait_for(lambda: not link._timelines_out, "the shares sent")
        link.share_timeline(f"{first + 69}", 2, "127.0.0.1:1")  # (lower: never sent)
        wait_for(lambda: not link._timelines_out, "the shares sent")
        stored = fleet_timelines(redis_server.url)
        assert len(stored) == MAX_TIMELINES
        assert f"{first}" not in stored  # the first ones raised, forgotten
        assert f"{first + 5}" not in stored
        assert stored[f"{first + 6}"].startswith("3 ")
        assert stored[f"{first + 69}"].startswith("3 ")  # (not lowered)
        assert len(link.timelines) == MAX_TIMELINES
        assert all(seen[0] == 3 for seen in link.timelines.values())
    finally:
        engine.dispose()


def test_the_engines_are_told_of_a_timeline_before_the_link_shows_it(
    redis_server: RedisServer, pg_url: str
) -> None:
    """Once a link shows a fleet's timeline (``health()``, :func:`fleet_timeline`, what a test
    or an operator waits on), every engine's fence of the process has been told of it: a
    connection below it is refused from then on (the other order left a moment where the link
    showed timeline 2 and an engine still took the old primary's pooled connection)."""

    class Spy:
        """A fence that notes what the link showed when it was told."""

        def __init__(self) -> None:
            self.told: list[tuple[str, int, Any]] = []

        def fleet_timeline(self, system: str, timeline: int, server: str) -> None:
            self.told.append((system, timeline, link.timelines.get(system)))

    config = rdb.Config(redis_url=redis_server.url)
    engine = sa.create_engine(pg_url)
    rdb.ResilientSession(engine, service="fence-order", config=config)  # (its link)
    link = STATE.fleet_links[redis_server.url]
    spy = Spy()
    follow_timelines(spy)
    try:
        wait_for(lambda: link.up, "the link")
        system = "7100000000000000001"
        link.share_timeline(system, 4, "127.0.0.1:1")
        wait_for(lambda: system in link.timelines, "the shared timeline")
        assert spy.told == [(system, 4, None)]
    finally:
        engine.dispose()


def test_a_pooled_connection_to_the_old_primary_is_refused_once_the_fleet_saw_more(
    split_pair: StandbyPair, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An engine whose only pooled connection went to the old primary, back as a primary
    (its URL names it alone: it never reaches the new one), keeps it until the fleet's
    timeline 2 of that cluster arrives (here from another engine of this process, through
    Redis); the connection is then refused at its next checkout, in memory, and the new one
    at connect: nothing more is written on the old primary."""
    pair = split_pair
    caplog.set_level(logging.INFO, logger="resilient_db")
    config = CONFIG.replace(circuit_breaker=True, failure_threshold=1000)
    config = config.replace(redis_url=redis_server.url)
    pair.wait_replayed()
    fail_over(pair)
    pair.primary.start()  # not demoted: a second primary, on timeline 1
    old_only = as_plain_role(pair.primary.url(DATABASE))
    new_only = as_plain_role(pair.standby.url(DATABASE))
    pooled = {"pool_size": 1, "max_overflow": 0}
    with (
        units(old_only, "psycopg", config=config, service="fence-stale", **pooled) as stale,
        units(new_only, "psycopg", config=config, service="fence-new") as seer,
    ):
        assert stale.write("x") == pair.primary.port  # timeline 1: all it has seen
        link = STATE.fleet_links[redis_server.url]
        wait_for(lambda: link.up, "the link")
        assert seer.write("y") == pair.standby.port  # timeline 2, shared through Redis
        system = system_identifier(pair.standby)
        wait_for(lambda: link.timelines.get(system, (0, ""))[0] == 2, "the fleet's timeline 2")
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the driver's, wrapped
            stale.write("z")
        assert rdb.sqlstate_of(raised.value) == "08004", raised.value
        counters = rdb.health()["services"]["fence-stale"]["counters"]
        # the pooled connection at checkout, then each new one at connect
        assert counters["stale_timeline_refusals"] == 2 + CONFIG.max_retries
        assert counters["stale_timeline_refusals"] == counters["stale_timeline_refusals_fleet"]
    assert keys_on(pair.primary) == {"x": 1}
    (line,) = refused_lines(caplog)
    assert line.self_heal["fleet"] is True  # type: ignore[attr-defined]
    # how to take a rightful primary back, said where the operator looks
    assert f"delete field {system} of resilient_db:timelines in Redis" in line.getMessage()


def _stale_refused(stale: Units, service: str) -> dict[str, int]:
    """The next unit of ``stale`` (whose URL names the old primary alone) is refused with
    08004; its service's counters."""
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the driver's, wrapped
        stale.write("z")
    assert rdb.sqlstate_of(raised.value) == "08004", raised.value
    counters: dict[str, int] = rdb.health()["services"][service]["counters"]
    return counters


def _split_in_env(
    pair: StandbyPair, redis_url: str, clean_env: pytest.MonkeyPatch, **more: str
) -> rdb.Config:
    """``pair`` failed over and its old primary back as a primary (timeline 1); the
    environment's settings short (plus ``more``) and applied. Returns the configuration of a
    factory that sees the new primary (sharing through ``redis_url``)."""
    pair.wait_replayed()
    fail_over(pair)
    pair.primary.start()  # not demoted: a second primary, on timeline 1
    for name, value in {
        "SELF_HEALING_INITIAL_DELAY": "10",
        "SELF_HEALING_MAX_DELAY": "50",
        "SELF_HEALING_MAX_RETRIES": "3",
        "SELF_HEALING_DEADLINE": "5000",
        "SELF_HEALING_FAILURE_THRESHOLD": "1000",
        **more,
    }.items():
        clean_env.setenv(name, value)
    rdb.reload_config()
    config = CONFIG.replace(circuit_breaker=True, failure_threshold=1000)
    return config.replace(redis_url=redis_url)


def _seen_elsewhere_then_refused(
    pair: StandbyPair, stale: Units, link: Any, config: rdb.Config, service: str
) -> None:
    """``stale``'s next unit still goes to the old primary (nothing known of timeline 2 yet);
    another engine, of ``config``, sees the new primary, and its timeline 2 reaches ``link``
    through Redis; then ``stale``'s units are refused, by the fleet's timeline."""
    assert stale.write("y") == pair.primary.port
    new_only = as_plain_role(pair.standby.url(DATABASE))
    with units(new_only, "psycopg", config=config, service=f"{service}-seer") as seer:
        assert seer.write("y2") == pair.standby.port  # timeline 2, shared through Redis
    system = system_identifier(pair.standby)
    wait_for(lambda: link.timelines.get(system, (0, ""))[0] == 2, "the fleet's timeline 2")
    counters = _stale_refused(stale, service)
    assert counters["stale_timeline_refusals_fleet"] == counters["stale_timeline_refusals"]
    assert counters["stale_timeline_refusals"] > 0


def test_an_engine_follows_the_fleet_through_a_link_made_after_its_first_connect(
    split_pair: StandbyPair, redis_server: RedisServer, clean_env: pytest.MonkeyPatch
) -> None:
    """An engine whose factory takes its configuration from the environment connected (to
    the old primary, back as a primary) before a reload gave it SELF_HEALING_REDIS_URL: the
    link made by the reload, which the engine never judged a connection through, tells it
    of the fleet's timeline 2 all the same: its pooled connection is refused at checkout,
    and the new ones at connect."""
    pair = split_pair
    config = _split_in_env(pair, redis_server.url, clean_env)
    pooled = {"pool_size": 1, "max_overflow": 0}
    old_only = as_plain_role(pair.primary.url(DATABASE))
    service = "fence-reloaded"
    with units(old_only, "psycopg", config=None, service=service, **pooled) as stale:  # type: ignore[arg-type]
        assert stale.write("x") == pair.primary.port  # timeline 1: all it has seen
        clean_env.setenv("SELF_HEALING_REDIS_URL", redis_server.url)
        rdb.reload_config()  # its breaker shares through Redis now: a link
        link = STATE.fleet_links[redis_server.url]
        wait_for(lambda: link.up, "the link")
        _seen_elsewhere_then_refused(pair, stale, link, config, service)
    assert keys_on(pair.primary) == {"x": 1, "y": 1}


def test_an_engine_follows_the_fleet_through_the_link_made_after_another_was_closed(
    split_pair: StandbyPair, redis_server: RedisServer, clean_env: pytest.MonkeyPatch
) -> None:
    """An engine that judged its first connection (to the old primary, back as a primary)
    through one link, closed since (the reloads switched its breaker off, then on again: a
    new link to the same Redis, which the engine never judged a connection through), is told
    of the fleet's timeline 2 by the new link: its pooled connection is refused at checkout."""
    pair = split_pair
    config = _split_in_env(
        pair, redis_server.url, clean_env, SELF_HEALING_REDIS_URL=redis_server.url
    )
    pooled = {"pool_size": 1, "max_overflow": 0}
    old_only = as_plain_role(pair.primary.url(DATABASE))
    service = "fence-relinked"
    with units(old_only, "psycopg", config=None, service=service, **pooled) as stale:  # type: ignore[arg-type]
        first = STATE.fleet_links[redis_server.url]
        wait_for(lambda: first.up, "the link")
        assert stale.write("x") == pair.primary.port  # timeline 1: all it has seen
        clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
        rdb.reload_config()  # nothing shares through Redis: the link is closed
        assert first.closed
        clean_env.delenv("SELF_HEALING_CIRCUIT_BREAKER")
        rdb.reload_config()  # shared again: a new link
        link = STATE.fleet_links[redis_server.url]
        assert link is not first
        wait_for(lambda: link.up, "the new link")
        _seen_elsewhere_then_refused(pair, stale, link, config, service)
    assert keys_on(pair.primary) == {"x": 1, "y": 1}


def test_the_fleets_timelines_are_written_back_into_a_redis_that_lost_them(
    redis_server: RedisServer, pg_url: str
) -> None:
    """Redis restarted empty: a link that knows the fleet's timelines writes them back when it
    connects again (a process started afterwards reads them there, and refuses an old primary
    as the running ones do); a healthy fleet's link, knowing none, writes nothing."""
    config = rdb.Config(redis_url=redis_server.url, redis_timeout=1.0)
    engine = sa.create_engine(pg_url)
    rdb.ResilientSession(engine, service="fence-written-back", config=config)  # (its link)
    link = STATE.fleet_links[redis_server.url]
    system = "7100000000000000001"
    try:
        wait_for(lambda: link.up, "the link")
        shared = rdb.health()["services"]["fence-written-back"]["breaker"]["shared"]
        assert shared["fleet_timelines"] == {}  # (a fleet that never failed over)
        link.share_timeline(system, 3, "127.0.0.1:1")
        # (Redis's answer taken by the link's thread: what it knows, for operators)
        wait_for(lambda: system in link.timelines, "the shared timeline")
        since = int(fleet_timelines(redis_server.url)[system].split(" ")[1]) / 1_000_000
        shared = rdb.health()["services"]["fence-written-back"]["breaker"]["shared"]
        expected = {"timeline": 3, "server": "127.0.0.1:1", "since": since}
        assert shared["fleet_timelines"] == {system: expected}
        redis_server.restart()  # same port, no keys
        wait_for(lambda: system in fleet_timelines(redis_server.url), "the timeline written back")
        stored = fleet_timelines(redis_server.url)
        assert stored.get(system, "").startswith("3 "), stored
        assert stored[system].endswith(" 127.0.0.1:1")
    finally:
        engine.dispose()
