"""Text read from Redis is shown bounded: whatever can write to the fleet's Redis (any client
with access, not only this library) may leave a huge value in a breaker's record (the reason
of an opening by hand, who made it, its state, the service name in its key) or in the
timelines (a cluster's key, the server it was seen at), or publish one on the channel.
``health()``, the dashboard's ``data.json`` and ``resilient-db breaker status`` show each such
value cut to ``MAX_VALUE_CHARS`` characters, marked with how many were left off, as log lines
do: a 1 MB value no longer makes every answer 1 MB.

Real Redis (the suite's), real values of 1 MB written into it, by the library's own scripts
where there is one (as a process of another release, or anything running them, could) and
by plain commands where there is none.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import breaker_of
from processes import wait_for
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._cli import main
from resilient_db._observability import MAX_VALUE_CHARS
from resilient_db.testing import RedisServer
from resilient_db.web import dashboard, token_auth

pytestmark = pytest.mark.slow

HUGE = 1_000_000  # characters of each value written
SERVICE = "hostile"
TOKEN = "a-long-enough-dashboard-token"


def bounded(value: Any, letter: str) -> None:
    """``value`` is ``letter`` repeated, cut to MAX_VALUE_CHARS and marked."""
    assert isinstance(value, str), value
    assert value == letter * MAX_VALUE_CHARS + f"…(+{HUGE - MAX_VALUE_CHARS} characters)", (
        value[:80],
        len(value),
    )


def test_huge_values_in_redis_are_shown_bounded(
    redis_server: RedisServer,
    engine: sa.Engine,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = redis_server.client()
    # an opening by hand whose reason is 1 MB, made before this process shares the breaker:
    # read from its record when the process joins
    _fleet.operator_force(
        client, SERVICE, state="open", seconds=600, reason="r" * HUGE, token="someone"
    )
    config = rdb.Config(redis_url=redis_server.url, retry=False)
    factory = rdb.ResilientSession(engine, service=SERVICE, config=config)
    wait_for(lambda: breaker_of(SERVICE)["shared"]["connected"], "the link")
    wait_for(lambda: breaker_of(SERVICE)["by_hand"], "the opening by hand read from Redis")
    bounded(breaker_of(SERVICE)["reason"], "r")
    with pytest.raises(rdb.CircuitOpenError) as refused:
        factory.run(lambda s: s.execute(sa.text("SELECT 1")))
    assert len(str(refused.value)) < 5 * MAX_VALUE_CHARS

    # another one, told by its message on the channel
    _fleet.operator_force(
        client, SERVICE, state="open", seconds=600, reason="m" * HUGE, token="someone"
    )
    wait_for(lambda: breaker_of(SERVICE)["reason"][0] == "m", "the message of the new opening")
    bounded(breaker_of(SERVICE)["reason"], "m")
    client.hset(_fleet._keys(SERVICE).breaker, "who", "w" * HUGE)  # (who made it: by hand)

    # a cluster's timeline whose key and server are 1 MB, by the library's script (its
    # message told at once; the hash read by the command)
    share = client.register_script(_fleet._TIMELINE)
    channel = _fleet.CHANNEL.format(db=0)
    share(keys=[_fleet.TIMELINES_KEY], args=[channel, "someone", "7" * HUGE, 2, "s" * HUGE, 64])
    wait_for(lambda: breaker_of(SERVICE)["shared"]["fleet_timelines"], "the timeline's message")
    [(system, timeline)] = breaker_of(SERVICE)["shared"]["fleet_timelines"].items()
    bounded(system, "7")
    bounded(timeline["server"], "s")

    # every health() answer and every dashboard's data stays small
    assert len(json.dumps(rdb.health())) < 20 * MAX_VALUE_CHARS
    board = TestClient(Starlette(routes=[Mount("/admin", app=dashboard(auth=token_auth(TOKEN)))]))
    data = board.get("/admin/data.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert data.status_code == 200
    assert len(data.content) < 20 * MAX_VALUE_CHARS
    assert "r" * MAX_VALUE_CHARS not in data.text  # (the old reason is gone)
    assert "m" * MAX_VALUE_CHARS + "…(+" in data.text

    # resilient-db breaker status: a record's reason, who made it, its state, and a service
    # named by a key of 1 MB; the timelines
    client.hset(_fleet._keys("n" * HUGE).breaker, mapping={"st": "x" * HUGE, "gen": 1})
    # (and a timeline of a million digits: int() refused it, the command failed; none of ours)
    client.hset(_fleet.TIMELINES_KEY, "8", "9" * HUGE + " 1 x")
    assert main(["breaker", "status", "--redis-url", redis_server.url, "--json"]) == 0
    said = capsys.readouterr().out
    assert len(said) < 20 * MAX_VALUE_CHARS
    payload = json.loads(said)
    by_name = {r["service"][0]: r for r in payload["breakers"]}
    bounded(by_name["h"]["reason"], "m")
    bounded(by_name["h"]["by"], "w")
    bounded(by_name["n"]["service"], "n")
    bounded(by_name["n"]["state"], "x")
    [entry] = payload["timelines"]
    bounded(entry["system_identifier"], "7")
    bounded(entry["server"], "s")
    assert main(["breaker", "status", "--redis-url", redis_server.url]) == 0
    assert len(capsys.readouterr().out) < 20 * MAX_VALUE_CHARS


def test_a_timeline_of_a_million_digits_keeps_no_process_from_the_fleet(
    redis_server: RedisServer, engine: sa.Engine, clean_env: pytest.MonkeyPatch
) -> None:
    """An entry of the timelines hash whose timeline has a million digits (none of the
    library's: int() refuses such a number with ValueError) is left out: a process joining
    the Redis connects, and follows the fleet's entries beside it. It was taken for a Redis
    that did not answer ("did not answer (ValueError)"), every process's link kept down."""
    client = redis_server.client()
    client.hset(_fleet.TIMELINES_KEY, "8", "9" * HUGE + " 1 x")
    share = client.register_script(_fleet._TIMELINE)
    channel = _fleet.CHANNEL.format(db=0)
    share(keys=[_fleet.TIMELINES_KEY], args=[channel, "someone", "7312", 3, "db-2:5432", 64])
    config = rdb.Config(redis_url=redis_server.url)
    factory = rdb.ResilientSession(engine, service="joining", config=config)
    wait_for(lambda: breaker_of("joining")["shared"]["connected"], "the link")
    timelines = breaker_of("joining")["shared"]["fleet_timelines"]
    assert list(timelines) == ["7312"]
    assert (timelines["7312"]["timeline"], timelines["7312"]["server"]) == (3, "db-2:5432")
    assert factory.run(lambda s: s.execute(sa.text("SELECT 1")).scalar_one()) == 1


def test_breaker_status_escapes_control_characters_of_values_from_redis(
    redis_server: RedisServer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What another client of the Redis wrote (a service's key, the reason and maker of an
    opening, a cluster's key and server) is printed by ``resilient-db breaker status`` with its
    control characters escaped, as log lines have them: a line break in a reason printed as
    it was made a line of its own (``orders: closed ...`` under an open breaker), and a
    terminal's escape sequence ran in the operator's terminal (one erasing the line)."""
    client = redis_server.client()
    _fleet.operator_force(
        client, "orders", state="open", seconds=600, reason="upgrade", token="someone"
    )
    fake = "orders: closed since 2025-05-01T10:00:00Z"
    client.hset(
        _fleet._keys("orders").breaker,
        mapping={"why": f"upgrade\n{fake}", "who": "ops\x1b[2K\r\u2028x"},
    )
    client.hset(_fleet._keys("evil\nbilling: closed").breaker, mapping={"st": "closed", "gen": 1})
    share = client.register_script(_fleet._TIMELINE)
    channel = _fleet.CHANNEL.format(db=0)
    share(keys=[_fleet.TIMELINES_KEY], args=[channel, "someone", "73\r12", 3, "db\n2", 64])
    assert main(["breaker", "status", "--redis-url", redis_server.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "evil\\nbilling",
        "orders",
        "cluster 73\\r12",
    ], lines
    assert lines[0].startswith("evil\\nbilling: closed: closed since ")
    assert lines[1].startswith(f"orders: open by hand (upgrade\\n{fake}) since ")
    assert "; by ops\\x1b[2K\\r\\u2028x; " in lines[1]
    assert ", seen at db\\n2; " in lines[2]
    assert all(c.isprintable() for line in lines for c in line)
