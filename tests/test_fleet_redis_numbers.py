"""Numbers read back from Redis that no process of the fleet wrote: a breaker's record (its
generation, openings, the end of its opening, its probes, the failures counted) or a retry
budget's counters holding a number of thousands of digits, a negative one, nan, inf or no
number at all (anything with write access to the Redis may leave one: another service's bug,
an operator's typo, the restore of an old dump). Units run on, the link stays up, the fleet's
next change writes the record anew, and ``resilient-db breaker status`` shows such a value as
unreadable instead of failing.

Real Redis (the suite's), real PostgreSQL, real failures (a unit's backend terminated).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import breaker_of
from processes import wait_for

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._cli import main
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

#: values of a number no process of the fleet writes
BAD = {
    "digits": "9" * 5000,
    "negative": "-7",
    "nan": "nan",
    "inf": "inf",
    "words": "not a number",
}


@pytest.fixture
def engine(pg_url: str, clean_env: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    made = sa.create_engine(pg_url)
    yield made
    made.dispose()


def kill_own_backend(session: Any) -> None:
    session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))


def status(url: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["breaker", "status", "--redis-url", url, "--json"]) == 0
    payload: dict[str, Any] = json.loads(capsys.readouterr().out)
    return payload


def downs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Shared state unavailable" in r.getMessage()]


def troubles(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The lines saying the link went down, or a part of the machinery failed."""
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    words = ("Shared state unavailable", "listener failed", "failed for service")
    return [line for line in said if any(word in line for word in words)]


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_bad_numbers_in_a_breakers_record_keep_units_and_the_link_running(
    bad: str,
    redis_server: RedisServer,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_db")
    value = BAD[bad]
    service = f"nums-{bad}"
    keys = _fleet._keys(service)
    client = redis_server.client()
    # an opening whose every number is unreadable: its end, its start, its generation, its
    # openings, its probes; and a failure count that is no count
    numbers = ("until", "at", "gen", "opens", "probes", "ok", "hos", "lastfail")
    client.hset(keys.breaker, mapping={"st": "open", **dict.fromkeys(numbers, value)})
    client.set(keys.failures, value)

    config = rdb.Config(
        redis_url=redis_server.url, retry=False, failure_threshold=1, reset_timeout=600
    )
    factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: breaker_of(service)["shared"]["connected"], "the link")
    # an opening of unreadable end is over: a probe is let through, and closes the breaker
    assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert breaker_of(service)["state"] == "closed"
    # a failure is counted fleet-wide, and opens it (threshold 1): the record written anew
    with pytest.raises(sa.exc.DBAPIError):
        factory.run(kill_own_backend)
    assert breaker_of(service)["state"] == "open"
    with pytest.raises(rdb.CircuitOpenError):
        factory.run(lambda s: s.execute(sa.text("SELECT 1")))
    shared = breaker_of(service)["shared"]
    assert shared["connected"] is True
    assert shared["fleet_opens"] == 1
    [record] = status(redis_server.url, capsys)["breakers"]
    assert record["state"] == "open"
    assert record["fleet_opens"] == 1
    assert "unreadable" not in record
    assert 590 < record["seconds_left"] <= 600
    assert int(client.hget(keys.breaker, "gen") or 0) > 0
    assert troubles(caplog) == [], troubles(caplog)


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_bad_numbers_in_a_budget_keep_retries_and_the_link_running(
    bad: str,
    redis_server: RedisServer,
    engine: sa.Engine,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_db")
    value = BAD[bad]
    service = f"budget-{bad}"
    client = redis_server.client()
    seconds, _ = client.time()
    key = _fleet._keys(service).budget
    fields = {f"d{seconds}": value, f"w{seconds}": value, "ft": value, "fts": value}
    client.hset(key, mapping={**fields, f"d{value[:50]}": "3"})
    config = rdb.Config(
        redis_url=redis_server.url,
        retry_budget=0.2,
        initial_delay=0.001,
        max_delay=0.001,
        circuit_breaker=False,
    )
    factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: rdb.health()["services"][service]["budget"], "the budget")
    link = next(iter(_fleet.links().values()))
    wait_for(lambda: link.up, "the link")
    attempts = []

    def once_killed(session: Any) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            kill_own_backend(session)
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    assert factory.run(once_killed) == 1
    assert len(attempts) == 2  # a retry, paid by the fleet's budget
    budget = rdb.health()["services"][service]["budget"]
    assert budget["scope"] == "fleet"
    fleet = budget["fleet"]
    assert all(
        math.isfinite(v) and v >= 0
        for v in json.loads(json.dumps(fleet)).values()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ), fleet
    assert link.up, link.problem
    assert troubles(caplog) == [], troubles(caplog)


def test_breaker_status_shows_bad_numbers_and_keys_as_unreadable(
    redis_server: RedisServer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``resilient-db breaker status`` lists every record: one with a number none of the
    library's names it unreadable (read as the scripts read it, as missing: an opening whose
    end is unreadable is over), one whose key holds no hash says so; it failed ("Redis ...
    did not answer: ValueError"), or raised (an end past the year 9999)."""
    client = redis_server.client()
    for bad, value in BAD.items():
        client.hset(
            _fleet._keys(f"cli-{bad}").breaker,
            mapping={"st": "open", "gen": value, "opens": value, "until": value},
        )
    client.set(_fleet._keys("cli-string").breaker, "a string where a hash is")
    # an opening until the year 200,000 or so: a number the scripts take, but further off than
    # any opening of the fleet lasts (a day by hand): read as missing too
    client.hset(_fleet._keys("cli-far").breaker, mapping={"st": "open", "gen": 5, "until": 6e12})
    far = _fleet._s(client.hget(_fleet._keys("cli-far").breaker, "until"))
    by_name = {r["service"]: r for r in status(redis_server.url, capsys)["breakers"]}
    for bad, value in BAD.items():
        record = by_name[f"cli-{bad}"]
        assert record["state"] == "half-open", record
        assert record["unreadable"] == dict.fromkeys(
            ("gen", "opens", "until"),
            value[:40] + (f"…(+{len(value) - 40} characters)" if len(value) > 40 else ""),
        )
        assert (record["since"], record["fleet_opens"], record["open_until"]) == (None,) * 3
    assert by_name["cli-string"]["state"] == "unreadable"
    assert "WRONGTYPE" in by_name["cli-string"]["unreadable"]["key"]
    assert by_name["cli-far"]["state"] == "half-open"
    assert by_name["cli-far"]["unreadable"] == {"until": far}
    assert by_name["cli-far"]["open_until"] is None
    assert main(["breaker", "status", "--redis-url", redis_server.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    said = {line.partition(":")[0]: line for line in lines}
    assert "unreadable, none of the library's: gen 'inf'" in said["cli-inf"]
    assert said["cli-string"].startswith("cli-string: unreadable; unreadable")
    assert f"unreadable, none of the library's: until {far!r}" in said["cli-far"]

    # the timelines' key holding no hash
    client.set(_fleet.TIMELINES_KEY, "a string where a hash is")
    [entry] = status(redis_server.url, capsys)["timelines"]
    assert entry["system_identifier"] is None
    assert _fleet.TIMELINES_KEY in entry["unreadable"]["key"]
    assert main(["breaker", "status", "--redis-url", redis_server.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith(f"timelines unreadable: WRONGTYPE: key {_fleet.TIMELINES_KEY}")


def test_a_timelines_key_of_another_type_keeps_the_link_down_saying_which(
    redis_server: RedisServer,
    engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A string where the fleet's timelines hash is (WRONGTYPE, read as the link joins): the
    process runs on its own breaker, and the one warning and health() name that key (Redis's
    answer does not); deleted, the link comes up."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = "timelines-typed"
    client = redis_server.client()
    client.set(_fleet.TIMELINES_KEY, "a string where a hash is")
    config = rdb.Config(redis_url=redis_server.url, retry=False)
    factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: downs(caplog), "the link's warning")
    shared = breaker_of(service)["shared"]
    assert shared["connected"] is False
    assert shared["problem"].startswith("a key of the wrong type (ResponseError: WRONGTYPE")
    assert f"key {_fleet.TIMELINES_KEY} holds" in shared["problem"]
    [down] = downs(caplog)
    assert _fleet.TIMELINES_KEY in down
    assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1

    client.delete(_fleet.TIMELINES_KEY)
    wait_for(lambda: breaker_of(service)["shared"]["connected"], "the link, the key deleted")
    assert len(downs(caplog)) == 1, downs(caplog)


def test_a_breaker_key_of_another_type_keeps_the_link_down_saying_which(
    redis_server: RedisServer,
    engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A string where a breaker's hash is (WRONGTYPE): the process runs on its own breaker,
    with one warning naming the keys and what is wrong (it said "an error reply" of a script,
    no key), health() and breaker status answer; deleted, the link comes up and the fleet's
    next change writes the record."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = "typed"
    keys = _fleet._keys(service)
    client = redis_server.client()
    client.set(keys.breaker, "a string where a hash is")
    config = rdb.Config(
        redis_url=redis_server.url, retry=False, failure_threshold=1, reset_timeout=600
    )
    factory = rdb.ResilientSession(engine, service=service, config=config)
    # (the warning is written after ``problem`` is set: waited for, not the problem)
    wait_for(lambda: downs(caplog), "the link's warning")
    shared = breaker_of(service)["shared"]
    assert shared["connected"] is False
    assert shared["problem"].startswith("a key of the wrong type (ResponseError: WRONGTYPE")
    assert keys.breaker in shared["problem"]
    down = downs(caplog)
    assert len(down) == 1, down
    assert keys.breaker in down[0]
    assert "until the key is deleted" in down[0]
    # units run on this process's own breaker
    assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    with pytest.raises(sa.exc.DBAPIError):
        factory.run(kill_own_backend)
    assert breaker_of(service)["state"] == "open"
    [record] = status(redis_server.url, capsys)["breakers"]
    assert record["state"] == "unreadable"

    client.delete(keys.breaker)
    wait_for(lambda: breaker_of(service)["shared"]["connected"], "the link, the key deleted")
    # (the opening this process made alone is shared on rejoining)
    [record] = status(redis_server.url, capsys)["breakers"]
    assert record["state"] == "open"
    assert "unreadable" not in record
    restored = [r.getMessage() for r in caplog.records if "Shared state restored" in r.getMessage()]
    assert len(restored) == 1
    assert len(downs(caplog)) == 1, downs(caplog)


@pytest.mark.parametrize(
    ("gen", "left"),
    [
        ("9" * 30, "5"),
        ("1", "inf"),
        ("1", "nan"),
        ("-3", "5"),
        ("1.5", "5"),
        ("9" * 5000, "5"),
        # longer than any opening of the fleet (a day by hand, an hour by failures)
        ("1", "1e12"),
        ("1", str(_fleet.OPENING_MAX + 60)),
    ],
)
def test_a_message_with_numbers_none_of_ours_is_ignored(
    gen: str, left: str, redis_server: RedisServer, engine: sa.Engine
) -> None:
    """A message on the channel (anything with access may publish one) of an opening whose
    generation or time left no script writes is ignored as not the library's. Taken, a
    generation of 30 digits made every later change of the breaker look older (the view kept
    that opening for good), a time left of inf, or of 10^12 s, opened the breaker for good."""
    service = f"told-{len(left)}"
    client = redis_server.client()
    config = rdb.Config(redis_url=redis_server.url, retry=False)
    factory = rdb.ResilientSession(engine, service=service, config=config)
    rdb.ResilientSession(engine, service="told-after", config=config)
    wait_for(lambda: breaker_of(service)["shared"]["connected"], "the link")
    channel = _fleet.CHANNEL.format(db=0)
    message = {"s": service, "b": "someone", "st": "open", "r": left, "g": gen, "o": 1}
    assert client.publish(channel, json.dumps(message)) == 1
    # a change of another breaker's, whose message comes after: once it is taken, so was that
    _fleet.operator_force(client, "told-after", state="open", seconds=600, reason="", token="x")
    wait_for(lambda: breaker_of("told-after")["state"] == "open", "the later message")
    assert breaker_of(service)["state"] == "closed"
    assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    # and the fleet's changes are followed: an opening by hand, closed by hand
    _fleet.operator_force(client, service, state="open", seconds=600, reason="", token="x")
    wait_for(lambda: breaker_of(service)["state"] == "open", "the opening by hand")
    _fleet.operator_force(client, service, state="closed", seconds=0, reason="", token="x")
    wait_for(lambda: breaker_of(service)["state"] == "closed", "the closing by hand")
    assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert breaker_of(service)["shared"]["connected"] is True


def test_an_opening_whose_end_is_past_any_opening_of_the_fleet_is_over(
    redis_server: RedisServer,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A breaker's record open until a time further from Redis's than any opening of the fleet
    lasts (a day by hand, at most an hour by failures): here Redis's time in milliseconds, as
    a client writing milliseconds for seconds would leave it, some 56,000 years away. It is a
    number the scripts read (below 2^53): every unit of the service was refused ("retry in
    1794858770573 s") until someone deleted the key. Read as an end that is no number: the
    opening is over, a probe is let through and closes the breaker, and ``resilient-db
    breaker status`` names the end as unreadable."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = "far-end"
    keys = _fleet._keys(service)
    client = redis_server.client()
    seconds, _ = client.time()
    client.hset(
        keys.breaker,
        mapping={
            "st": "open",
            "until": seconds * 1000,
            "at": seconds,
            "gen": seconds * 1_000_000,
            "opens": 1,
        },
    )
    [record] = status(redis_server.url, capsys)["breakers"]
    assert record["state"] == "half-open"
    assert record["unreadable"] == {"until": str(seconds * 1000)}
    config = rdb.Config(redis_url=redis_server.url, retry=False, reset_timeout=600)
    factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: breaker_of(service)["shared"]["connected"], "the link")
    assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert breaker_of(service)["state"] == "closed"
    [record] = status(redis_server.url, capsys)["breakers"]
    assert record["state"] == "closed"
    assert breaker_of(service)["shared"]["connected"] is True
    assert troubles(caplog) == [], troubles(caplog)


def test_a_timeline_entry_none_of_ours_is_raised_over(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cluster's entry in the timelines whose timeline has thousands of digits (left out
    when read) is written over by the next process sharing that cluster's timeline: the
    script took it for a timeline as high (tonumber: inf), and the fleet never learnt the
    cluster's real one (its old primary not refused by the processes that missed the
    failover)."""
    client = redis_server.client()
    client.hset(_fleet.TIMELINES_KEY, "7312", "9" * 5000 + " 1 x")
    share = client.register_script(_fleet._TIMELINE)
    channel = _fleet.CHANNEL.format(db=0)
    share(keys=[_fleet.TIMELINES_KEY], args=[channel, "someone", "7312", 3, "db-2:5432", 64])
    [entry] = status(redis_server.url, capsys)["timelines"]
    assert (entry["system_identifier"], entry["timeline"]) == ("7312", 3)
    assert entry["server"] == "db-2:5432"


@pytest.mark.parametrize("key", ["failures", "probes", "budget"])
def test_a_counts_key_of_another_type_is_dropped(
    key: str,
    redis_server: RedisServer,
    engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A key of counts only (a breaker's failures, its probe reservations, a budget's) that
    holds another type of value (WRONGTYPE) is dropped by the next script, as when it
    expires: the link stays up. Every script using it was refused, the link went down at
    each failure, and came back, a warning each time."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    service = f"dropped-{key}"
    keys = _fleet._keys(service)
    client = redis_server.client()
    wrong = getattr(keys, key)
    if key == "failures":
        client.hset(wrong, "a", "hash where a counter is")
    else:
        client.set(wrong, "a string where a hash is")
    if key == "probes":  # an opening that is over: the first unit is a probe, reserved there
        client.hset(keys.breaker, mapping={"st": "open", "until": 1, "gen": 5, "opens": 1})
    config = rdb.Config(
        redis_url=redis_server.url,
        failure_threshold=2,
        reset_timeout=600,
        retry_budget=0.2,
        initial_delay=0.001,
        max_delay=0.001,
        max_retries=1,
    )
    factory = rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: breaker_of(service)["shared"]["connected"], "the link")
    # a failed attempt (counted fleet-wide), then its retry (paid by the fleet's budget),
    # failing too: two failures open the breaker (a failed probe, at once: its retry refused)
    with pytest.raises((sa.exc.DBAPIError, rdb.CircuitOpenError)):
        factory.run(kill_own_backend)
    assert breaker_of(service)["state"] == "open"
    assert breaker_of(service)["shared"]["connected"] is True
    [record] = status(redis_server.url, capsys)["breakers"]
    assert record["state"] == "open"
    assert client.type(wrong) in (b"none", b"string" if key == "failures" else b"hash")
    assert rdb.health()["services"][service]["budget"]["scope"] == "fleet"
    assert troubles(caplog) == [], troubles(caplog)


@pytest.mark.parametrize(
    "told",
    [
        {"t": "3", "us": "9" * 4000},  # (a time int() takes, too large for a float)
        {"t": "9" * 4000, "us": "1"},
        {"t": str(2**32), "us": "1"},  # (no PostgreSQL timeline: they are 32-bit)
    ],
    ids=["time", "digits", "past-32-bits"],
)
def test_a_timeline_message_none_of_ours_is_ignored(
    told: dict[str, str],
    redis_server: RedisServer,
    engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A timeline's message on the channel with numbers no process sends is ignored: a
    time of 4000 digits raised OverflowError out of the link's thread (the link taken
    down: "did not answer (OverflowError)"); a timeline of 4000 digits, or past 32 bits,
    was taken as the cluster's, and every engine reaching that cluster refused its primary
    as an old one."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    client = redis_server.client()
    config = rdb.Config(redis_url=redis_server.url)
    factory = rdb.ResilientSession(engine, service="timed", config=config)
    wait_for(lambda: breaker_of("timed")["shared"]["connected"], "the link")
    channel = _fleet.CHANNEL.format(db=0)
    message = {"tl": "7312", "at": "db-9:5432", "b": "someone", **told}
    assert client.publish(channel, json.dumps(message)) == 1
    # a message of the library's script, after it: once it is taken, so was that
    share = client.register_script(_fleet._TIMELINE)
    share(keys=[_fleet.TIMELINES_KEY], args=[channel, "someone", "8000", 2, "db-2:5432", 64])
    wait_for(lambda: "8000" in breaker_of("timed")["shared"]["fleet_timelines"], "the later one")
    assert list(breaker_of("timed")["shared"]["fleet_timelines"]) == ["8000"]
    assert breaker_of("timed")["shared"]["connected"] is True
    assert json.dumps(rdb.health())
    assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1
    assert troubles(caplog) == [], troubles(caplog)
