"""A shared breaker's generation (``gen``: Redis's time in microseconds at each change, every
change's greater than the last's) planted far ahead of Redis's time: written into the breaker's
record, or carried by a message on the channel, by anything with write access to the Redis.
Below 2^53 (2^53 - 2, ten years from now) it was a number the scripts read; once a process's
view had taken it, every later change of the fleet (its generation Redis's microseconds now,
or the planted one + 1, past 2^53 after two changes and then read as missing, starting over
from now) looked older than the view, and that process ignored the fleet's openings and
closings until it restarted: one write denied the shared breaker. A generation further ahead
of Redis's time than any opening of the fleet lasts (a day) is read as missing, as other
numbers none of the library's are; a message's, further ahead of the process's clock, is
ignored. Every process follows the fleet's changes after either.

Real Redis (the suite's), real PostgreSQL, real worker processes (``fleet_worker.py``) and
their links; the planted values written with a plain Redis client.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import Gate, WorkerProcess, breaker_of, fleet
from processes import wait_for_async
from sqlalchemy.ext.asyncio import AsyncEngine

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._cli import main
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

TEN_YEARS = 10 * 365 * 86_400

#: generations planted ahead of Redis's time: just below 2^53 (the scripts' bound), and Redis's
#: time ten years from now
AHEAD = ["2^53-2", "ten-years"]


def planted(client: Any, which: str) -> int:
    """The generation ``which`` (see :data:`AHEAD`), in microseconds of Redis's time."""
    if which == "2^53-2":
        return 2**53 - 2
    seconds, _ = client.time()
    return (int(seconds) + TEN_YEARS) * 1_000_000


def redis_now_us(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


def settings(redis: RedisServer, reset: float) -> dict[str, str]:
    """Workers whose first failure opens the fleet's breaker for ``reset`` seconds, one
    successful probe closing it."""
    return {
        "SELF_HEALING_REDIS_URL": redis.url,
        "SELF_HEALING_RETRY": "false",
        "SELF_HEALING_FAILURE_THRESHOLD": "1",
        "SELF_HEALING_RESET_TIMEOUT": str(round(reset * 1000)),
        "SELF_HEALING_HALF_OPEN_PROBES": "1",
    }


def all_in(workers: list[WorkerProcess], state: str, what: str) -> None:
    """Every worker's breaker reaches ``state`` (bounded), failing with ``what`` and its log."""
    for i, w in enumerate(workers):
        assert w.ask("wait", what=state, timeout=10)["ok"], f"worker {i}, {what}:\n{w.log()}"


@pytest.mark.parametrize("which", AHEAD)
def test_a_generation_far_ahead_in_the_record_leaves_every_process_following_the_fleet(
    which: str, redis_server: RedisServer, pg_url: str, gate: Gate, tmp_path: Path
) -> None:
    """Planted in the breaker's record, the generation was taken by the next change (its own
    one more), and so by every process: 2^53 - 2 made the next but one change's generation
    2^53, read as missing, so the probe's closing after it restarted from Redis's time and
    was ignored by the process that had not made it; ten years ahead, every change followed
    until Redis lost the record (flushed, restarted), after which every opening was ignored.
    Read as missing, every change has Redis's time for generation: an opening by failures,
    the closing by a probe, an opening and a closing by hand, an opening after a flush are
    followed by both processes."""
    reset = 0.3
    client = redis_server.client()
    keys = _fleet._keys("fleet")
    with fleet(2, pg_url, settings(redis_server, reset), tmp_path) as workers:
        a, b = workers
        all_in(workers, "connected", "the link")
        client.hset(keys.breaker, "gen", planted(client, which))

        gate.set(down=True)
        assert a.run(1)["errors"] == {"57P03": 1}  # opens the fleet's breaker
        all_in(workers, "open", "the opening by a's failure")
        time.sleep(reset)  # the breaker's own open period (not a backoff)
        gate.set(down=False)
        assert b.run(1) == {"ok": 1, "open": 0, "errors": {}}  # b's probe closes it
        all_in(workers, "closed", "the closing by b's probe")

        assert b.ask("open_breaker", reason="upgrade", seconds=600)["fleet_wide"] is True
        all_in(workers, "open", "the opening by hand")
        assert a.ask("close_breaker", reason="done")["fleet_wide"] is True
        all_in(workers, "closed", "the closing by hand")

        client.flushdb()  # Redis loses the record (the planted value with it)
        gate.set(down=True)
        assert b.run(1)["errors"] == {"57P03": 1}
        all_in(workers, "open", "the opening after the flush")
        assert a.run(1) == {"ok": 0, "open": 1, "errors": {}}
        gen = int(client.hget(keys.breaker, "gen") or 0)
        assert 0 < gen <= redis_now_us(client), gen


@pytest.mark.parametrize("which", AHEAD)
def test_a_message_of_a_generation_far_ahead_is_ignored(
    which: str, redis_server: RedisServer, pg_url: str, gate: Gate, tmp_path: Path
) -> None:
    """A bare PUBLISH on the breaker's channel of an opening whose generation is far ahead of
    the process's clock (within 2^53): taken, the process held the breaker open against the
    fleet's closing (and closed against its later openings). Ignored, as a message none of
    the library's: both processes follow the fleet's changes after it."""
    client = redis_server.client()
    channel = _fleet.CHANNEL.format(db=0)
    with fleet(2, pg_url, settings(redis_server, 600), tmp_path) as workers:
        a, b = workers
        all_in(workers, "connected", "the link")
        message = {
            "s": "fleet",
            "b": "someone",
            "st": "open",
            "r": "600",
            "g": str(planted(client, which)),
            "o": 1,
        }
        assert client.publish(channel, json.dumps(message)) == 2
        assert a.ask("open_breaker", reason="upgrade", seconds=600)["fleet_wide"] is True
        all_in(workers, "open", "the opening by hand")
        assert b.ask("close_breaker", reason="done")["fleet_wide"] is True
        all_in(workers, "closed", "the closing by hand")
        assert [w.run(1) for w in workers] == [{"ok": 1, "open": 0, "errors": {}}] * 2
        gate.set(down=True)
        assert b.run(1)["errors"] == {"57P03": 1}
        all_in(workers, "open", "the opening by b's failure")


@pytest.mark.asyncio
@pytest.mark.usefixtures("engine")  # (installs raise_code in the test's database)
@pytest.mark.parametrize("which", AHEAD)
async def test_an_async_units_failure_path_follows_the_fleet_past_a_generation_far_ahead(
    which: str,
    aengine: AsyncEngine,
    redis_server: RedisServer,
    clean_env: pytest.MonkeyPatch,
    service: str,
) -> None:
    """An async unit's failure, counted by the script in a worker thread, opens the shared
    breaker of a record holding a generation far ahead: the process's view took the answer's
    generation (2^53 - 1, or ten years ahead + 1), and a closing by hand made after (by the
    command: 2^53, a message none of the library's, or Redis's time once the record was lost)
    was ignored, every unit refused."""
    client = redis_server.client()
    client.hset(_fleet._keys(service).breaker, "gen", planted(client, which))
    config = rdb.Config(
        redis_url=redis_server.url, retry=False, failure_threshold=1, reset_timeout=600
    )
    factory = rdb.AsyncResilientSession(aengine, service=service, config=config)
    await wait_for_async(lambda: breaker_of(service)["shared"]["connected"], "the link")
    with pytest.raises(sa.exc.DBAPIError):
        await factory.run(lambda s: s.execute(sa.text("SELECT raise_code('57P03')")))
    assert breaker_of(service)["state"] == "open"
    if which == "ten-years":
        client.delete(_fleet._keys(service).breaker)  # (Redis lost the record)
    _fleet.operator_force(client, service, state="closed", seconds=0, reason="", token="x")
    await wait_for_async(lambda: breaker_of(service)["state"] == "closed", "the closing by hand")
    assert await factory.run(lambda s: s.execute(sa.text("SELECT 1"))) is not None


def test_breaker_status_shows_a_generation_far_ahead_as_unreadable(
    redis_server: RedisServer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``resilient-db breaker status`` reads a generation as the scripts do: one further ahead
    of Redis's time than any opening lasts is unreadable (no ``since`` ten years away), one a
    minute ahead (a clock stepped back since) is not."""
    client = redis_server.client()
    far = planted(client, "ten-years")
    near = redis_now_us(client) + 60_000_000
    client.hset(_fleet._keys("far").breaker, mapping={"st": "closed", "gen": far})
    client.hset(_fleet._keys("near").breaker, mapping={"st": "closed", "gen": near})
    assert main(["breaker", "status", "--redis-url", redis_server.url, "--json"]) == 0
    by_name = {r["service"]: r for r in json.loads(capsys.readouterr().out)["breakers"]}
    assert by_name["far"]["unreadable"] == {"gen": str(far)}
    assert by_name["far"]["since"] is None
    assert by_name["far"]["recorded"] is True
    assert "unreadable" not in by_name["near"]
    assert by_name["near"]["since"] == near / 1_000_000
    assert main(["breaker", "status", "--redis-url", redis_server.url]) == 0
    said = {line.partition(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"unreadable, none of the library's: gen '{far}'" in said["far"]


def test_a_view_far_ahead_is_written_back_with_a_generation_of_redis_time(
    redis_server: RedisServer,
) -> None:
    """A view carried by a script (to write back into a Redis that lost the breaker's state,
    see ``restore_view``) whose generation is far ahead of Redis's time (a process whose clock
    is days ahead took a message of one) is written back with Redis's time: it was written
    back one more than the view's, a generation every script then read as missing."""
    client = redis_server.client()
    keys = _fleet._breaker_keys("restored")
    force = client.register_script(_fleet._FORCE)
    view = ("open", 60.0, 3, planted(client, "ten-years"), None)
    channel = _fleet.CHANNEL.format(db=0)
    answer = force(
        keys=keys, args=[channel, "restored", "x", "", 0, *_fleet._view_args(view), "", ""]
    )
    assert _fleet._s(answer[0]) == "open"
    gen = int(answer[2])
    assert 0 < gen <= redis_now_us(client), gen
    assert int(client.hget(keys[0], "gen") or 0) == gen
    assert int(client.hget(keys[0], "opens") or 0) == 3
