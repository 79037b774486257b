"""The shared breaker is timed by Redis's clock (processes on hosts whose clocks differ agree).
That clock may step back itself (NTP correcting the Redis host, a VM resumed from a snapshot):
the times a breaker's hash holds are then ahead of it. A step of an hour left every failure of
the fleet "the same event seen again" for that hour (the shared breaker never opened against a
dead database), an opening rejected every call for its reset timeout plus the step, and a
half-open probe's lease ran that much longer.

The hash is written here as such a step leaves it (its times an hour ahead of Redis's clock),
then the scripts are run as any process's link sends them."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from fleet import shared
from processes import wait_for

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._fleet import links
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

STEP = 3600.0  # how far Redis's clock stepped back, in seconds


def _link(redis_server: RedisServer, engine: sa.Engine, service: str) -> Any:
    """A factory's link to ``redis_server`` (up), for ``service``'s scripts."""
    config = rdb.Config(redis_url=redis_server.url, retry=False)
    rdb.ResilientSession(engine, service=service, config=config)
    wait_for(lambda: shared(service)["connected"], "the link")
    (link,) = links().values()
    return link


def _step_back(redis_server: RedisServer, service: str, *fields: str) -> None:
    """Redis's clock steps back by STEP: ``fields`` of the breaker's hash (times) are ahead."""
    client = redis_server.client()
    key = _fleet._keys(service).breaker
    for field in fields:
        if client.hexists(key, field):
            client.hincrbyfloat(key, field, STEP)


def test_failures_count_after_redis_s_clock_stepped_back(
    redis_server: RedisServer, engine: sa.Engine, service: str
) -> None:
    link = _link(redis_server, engine, service)
    assert link.breaker_failure(service, 3, 30.0, 0.0)[3] == 1
    _step_back(redis_server, service, "lastfail", "run")
    # attempts that began after the last counted failure: each counts
    assert link.breaker_failure(service, 3, 30.0, 0.0)[3] == 2
    assert link.breaker_failure(service, 3, 30.0, 0.0)[0] == "open"


def test_an_opening_lasts_at_most_its_reset_timeout_after_redis_s_clock_stepped_back(
    redis_server: RedisServer, engine: sa.Engine, service: str
) -> None:
    link = _link(redis_server, engine, service)
    assert link.breaker_force(service, "open", 30.0)[0] == "open"
    _step_back(redis_server, service, "until", "at")
    decision, remaining, *_ = link.breaker_admit(service, 1, 30.0, "r1")
    assert decision == "open"
    assert remaining <= 30.0
    state, remaining, *_ = link.breaker_read(service)
    assert state == "open"
    assert remaining <= 30.0


def test_a_probe_lease_lasts_at_most_its_length_after_redis_s_clock_stepped_back(
    redis_server: RedisServer, engine: sa.Engine, service: str
) -> None:
    link = _link(redis_server, engine, service)
    link.breaker_force(service, "open", 0.001)
    # (the opening's millisecond run out by Redis's clock: an admit within it is refused)
    wait_for(lambda: link.breaker_read(service)[1] <= 0, "the opening to run out")
    assert link.breaker_admit(service, 1, 0.001, "r1")[0] == "probe"  # (its process dies)
    _step_back(redis_server, service, "hos")
    assert link.breaker_admit(service, 1, 0.001, "r2")[0] == "full"
    # the lease (10 s) counted from the step at most: the slot is given again then, not in
    # an hour (Redis's clock moved on by the lease, as the hash says it)
    client = redis_server.client()
    client.hincrbyfloat(_fleet._keys(service).breaker, "hos", -_fleet.PROBE_LEASE_MIN - 1)
    assert link.breaker_admit(service, 1, 0.001, "r3")[0] == "probe"
