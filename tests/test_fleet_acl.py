"""A Redis whose ACL refuses part of what the shared breaker needs (a channel, a command), and a
link that blips while this process opens its breaker on its own: the process keeps its own
opening, for its whole reset timeout, and says what Redis refused, never the password."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import pytest
import sqlalchemy as sa
from fleet import Gate, shared, subscription_checks
from processes import wait_for

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._fleet import links
from resilient_db.testing import RedisServer

pytestmark = pytest.mark.slow

PASSWORD = "acl-pw-Zq81"
CHANNEL = "resilient_db:breakers:0"


def _user(redis: RedisServer, *rules: str) -> str:
    """The URL of a Redis user ``app`` with ``rules`` (ACL SETUSER)."""
    redis.client().execute_command("ACL", "SETUSER", "app", "on", f">{PASSWORD}", *rules)
    return f"redis://app:{PASSWORD}@{redis.host}:{redis.port}/0"


def _factory(engine: sa.Engine, redis_url: str, service: str) -> Any:
    """A factory sharing its breaker through ``redis_url``: no retry, opening after 3 failures
    for 30 s (longer than any test here: an opening seen closed was closed by something)."""
    config = rdb.Config(redis_url=redis_url, retry=False, failure_threshold=3, reset_timeout=30.0)
    return rdb.ResilientSession(engine, service=service, config=config)


def _unit(s: Any) -> None:
    s.execute(sa.text("SELECT rdb_gate()"))


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize(
    ("rules", "refused"),
    [
        # Redis 7's default for a new user (acl-pubsub-default resetchannels): keys, no channel
        (
            ("resetchannels", "~resilient_db:*", "+@all"),
            f"no permission (ACL): SUBSCRIBE on channel {CHANNEL}",
        ),
        (("~*", "&*", "+@all", "-publish"), f"no permission (ACL): PUBLISH on channel {CHANNEL}"),
        (("~*", "&*", "+@all", "-hset"), "no permission (ACL): HSET on key resilient_db:alive"),
    ],
    ids=["no-channel", "no-publish", "no-hset"],
)
def test_a_redis_refusing_a_right_the_breaker_needs_stays_down_and_the_opening_is_kept(
    redis_server: RedisServer,
    engine: sa.Engine,
    gate: Gate,
    caplog: pytest.LogCaptureFixture,
    *,
    rules: tuple[str, ...],
    refused: str,
) -> None:
    """The link is never up (no "restored", the local breaker's opening not closed by a
    shared state read as "closed, never changed"): failing units open this process's breaker
    after the threshold and it stays open through the link's later attempts; one warning
    names what was refused."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    Factory = _factory(engine, _user(redis_server, *rules), "acl")
    wait_for(
        lambda: shared("acl")["connected"] or shared("acl")["problem"] is not None,
        "the link's first attempt",
        5,
    )
    (link,) = links().values()
    gate.set(down=True)
    for _ in range(3):
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(_unit)
    assert rdb.health()["services"]["acl"]["breaker"]["state"] == "open"
    # the link tries again once a second: two attempts more (at least) see the same refusal
    commands = link.commands

    def state() -> str:
        return str(rdb.health()["services"]["acl"]["breaker"]["state"])

    wait_for(lambda: link.commands >= commands + 3 or state() != "open", "two more attempts", 6)
    assert state() == "open"
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(_unit)
    assert gate.calls() == 3
    assert rdb.health()["services"]["acl"]["breaker"]["state"] == "open"
    assert shared("acl")["connected"] is False
    assert shared("acl")["problem"].startswith(refused)
    assert _lines(caplog, "Shared state restored") == []
    assert _lines(caplog, "Circuit breaker closed") == []
    (line,) = _lines(caplog, "Shared state unavailable")
    assert f"answered: {refused} (" in line, line
    assert line.endswith("run on this process's own state until its ACL allows them"), line
    everything = [r.getMessage() for r in caplog.records] + [json.dumps(rdb.health())]
    assert not [text for text in everything if PASSWORD in text]


def test_a_command_refused_inside_a_script_is_a_permission_problem(
    redis_server: RedisServer, engine: sa.Engine, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """The ACL takes a right away while the link is up: the failure path's script is refused
    in Redis 6.2's words ("The user executing the script can't run this command"), with no
    NOPERM code; that is no permission (ACL), not "an error reply"."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    Factory = _factory(engine, _user(redis_server, "~*", "&*", "+@all"), "acl-script")
    wait_for(lambda: shared("acl-script")["connected"], "the link", 5)
    redis_server.client().execute_command("ACL", "SETUSER", "app", "-incr")
    gate.set(down=True)
    with pytest.raises(sa.exc.OperationalError):
        Factory.run(_unit)
    (line,) = _lines(caplog, "Shared state unavailable")
    assert "answered: no permission (ACL) (ResponseError: " in line, line
    assert "an error reply" not in line
    # the link's next attempt names the command (its alive check runs each one)
    wait_for(
        lambda: (shared("acl-script")["problem"] or "").startswith(
            "no permission (ACL): INCR on key resilient_db:alive"
        ),
        "the alive check's refusal",
        5,
    )


def test_redis_7_wording_names_the_command() -> None:
    """Redis 7 names the command a script may not run (no such server here to ask)."""
    from resilient_db._fleet import _acl_refusal  # noqa: PLC0415 - private, this test only

    said = "user_script:1: NOPERM User app has no permissions to run the 'hset' command script"
    assert _acl_refusal(said) == "no permission (ACL): HSET"
    assert _acl_refusal("this user has no permissions to access one of the keys") == (
        "no permission (ACL)"
    )


def test_an_opening_made_while_the_link_blipped_is_shared_on_rejoining(
    redis_server: RedisServer, engine: sa.Engine, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """The subscription is cut (a proxy's idle timeout, a network blip) and Redis keeps its
    data; the database fails meanwhile and this process's own breaker opens. Rejoining, the
    process does not throw its opening away (Redis's breaker never changed: gen 0, which is
    no restart nor flush), it shares it: Redis is open, the next unit is rejected, and no
    "restarted or flushed" closing is logged."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    Factory = _factory(engine, redis_server.url, "blip")
    wait_for(lambda: shared("blip")["connected"], "the link", 5)
    Factory.run(_unit)
    client = redis_server.client()
    client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    wait_for(lambda: not shared("blip")["connected"], "the link down", 5)
    gate.set(down=True)
    for _ in range(3):
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(_unit)
    assert rdb.health()["services"]["blip"]["breaker"]["state"] == "open"
    wait_for(lambda: shared("blip")["connected"], "the link back", 5)
    assert client.hget("resilient_db:{blip}:breaker", "st") == b"open"
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(_unit)
    assert gate.calls() == 4  # the success, then the three failures
    health = rdb.health()["services"]["blip"]
    assert health["breaker"]["state"] == "open"
    assert health["breaker"]["shared"]["opened_here"] == 1
    assert health["counters"]["breaker_opens"] == 1  # one opening, counted once
    assert _lines(caplog, "Circuit breaker closed") == []
    assert len(_lines(caplog, "Shared state restored")) == 1


def test_a_redis_restarted_empty_gets_the_fleets_opening_back_from_this_process(
    redis_server: RedisServer, engine: sa.Engine, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """The fleet's opening (gen > 0 seen), then Redis restarted with no state while this
    process opened nothing on its own. It closed, following the empty Redis, and sent the next
    unit to the database that had just failed; now, rejoining, it writes the opening back with
    its own end (not a new reset timeout), rejects without the database, and says so once (no
    new opening counted or logged, no "restarted or flushed" closing)."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    Factory = _factory(engine, redis_server.url, "restart")
    wait_for(lambda: shared("restart")["connected"], "the link", 5)
    gate.set(down=True)
    for _ in range(3):
        with pytest.raises(sa.exc.OperationalError):
            Factory.run(_unit)
    client = redis_server.client()
    key = "resilient_db:{restart}:breaker"
    assert client.hget(key, "st") == b"open"
    until = float(client.hget(key, "until"))
    redis_server.kill()
    wait_for(lambda: not shared("restart")["connected"], "the link down", 5)
    redis_server.start()  # same port, no state
    wait_for(lambda: shared("restart")["connected"], "the link back", 5)
    client = redis_server.client()
    assert client.hget(key, "st") == b"open"
    assert abs(float(client.hget(key, "until")) - until) < 0.5
    assert client.hget(key, "opens") == b"1"
    with pytest.raises(rdb.CircuitOpenError):
        Factory.run(_unit)
    assert gate.calls() == 3
    health = rdb.health()["services"]["restart"]
    assert health["breaker"]["state"] == "open"
    assert health["breaker"]["shared"]["fleet_opens"] == 1
    assert health["breaker"]["shared"]["opened_here"] == 1
    assert health["counters"]["breaker_opens"] == 1
    assert _lines(caplog, "Circuit breaker closed") == []
    assert len(_lines(caplog, "Circuit breaker opened")) == 1
    (restored,) = wait_for_lines(caplog, "Circuit breaker state restored")
    assert "open, rejecting calls for" in restored, restored


def wait_for_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The lines holding ``text`` once there is one (the background thread writes it on
    taking its own message)."""
    wait_for(lambda: _lines(caplog, text), text, 5)
    return _lines(caplog, text)


def test_a_refused_login_names_the_user_and_never_the_password(
    redis_server: RedisServer, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis's own words about a wrong password keep their text: a one-letter user name the
    masked URL shows is not replaced in them ("invalid ***sername-password pair" before)."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    redis_server.client().execute_command("ACL", "SETUSER", "u", "on", f">{PASSWORD}", "+@all")
    url = f"redis://u:wrong-{PASSWORD}@{redis_server.host}:{redis_server.port}/0"
    _factory(engine, url, "login")
    wait_for(lambda: shared("login")["problem"] is not None, "the link's first attempt", 5)
    problem = shared("login")["problem"]
    # (the link's thread sets the problem, then logs its warning)
    wait_for(lambda: _lines(caplog, "Shared state unavailable"), "the warning", 5)
    (line,) = _lines(caplog, "Shared state unavailable")
    for said in (problem, line):
        assert "login refused" in said
        assert "username-password pair" in said
        assert "***sername" not in said
        assert PASSWORD not in said
    assert f"redis://u:***@{redis_server.host}:{redis_server.port}/0" in line


#: the rights docs/many-processes.md lists for resilient_db's ACL user, and nothing more
DOCUMENTED_RIGHTS = (
    "resetchannels",
    "~resilient_db:*",
    "&resilient_db:breakers:*",
    *(
        f"+{command}"
        for command in [
            "evalsha",
            "eval",
            "script",
            "subscribe",
            "publish",
            "time",
            "get",
            "set",
            "incr",
            "del",
            "pexpire",
            "hset",
            "hget",
            "hmget",
            "hgetall",
            "hexists",
            "hincrby",
            "hdel",
        ]
    ),
)


def test_the_documented_acl_keeps_the_link_up_past_its_subscription_checks(
    redis_server: RedisServer,
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The link checks a silent subscription with a command docs/many-processes.md's ACL allows (a
    SUBSCRIBE again, not a PING it does not list): a user with exactly those rights stays
    connected through several checks, with no warning."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    monkeypatch.setattr(_fleet, "SUBSCRIPTION_CHECK_INTERVAL", 0.3)
    _factory(engine, _user(redis_server, *DOCUMENTED_RIGHTS), "documented-acl")
    wait_for(lambda: shared("documented-acl")["connected"], "the link", 5)
    (link,) = links().values()
    commands = link.commands
    with subscription_checks(link) as checks:
        deadline = time.monotonic() + 10
        while len(checks) < 4:  # three checks answered (each begins after the last one's end)
            assert shared("documented-acl")["connected"], shared("documented-acl")["problem"]
            assert time.monotonic() < deadline, f"{len(checks)} checks of the subscription"
            time.sleep(0.05)
    assert shared("documented-acl")["connected"], shared("documented-acl")["problem"]
    assert link.commands == commands  # (the checks are not counted as commands)
    assert _lines(caplog, "Shared state unavailable") == []


def test_a_database_number_redis_does_not_have_says_the_url_must_change(
    redis_server: RedisServer, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """``redis://.../99`` on a Redis of 16 databases: the warning said the process runs alone
    "until it takes writes again", which never comes; only the URL can fix it."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    url = f"redis://:{redis_server.password}@{redis_server.host}:{redis_server.port}/99"
    _factory(engine, url, "db99")
    wait_for(lambda: shared("db99")["problem"] is not None, "the link's first attempt", 5)
    assert "no such database number" in shared("db99")["problem"]
    # (the link's thread sets the problem, then logs its warning)
    wait_for(lambda: _lines(caplog, "Shared state unavailable"), "the warning", 5)
    (line,) = _lines(caplog, "Shared state unavailable")
    assert line.endswith("until SELF_HEALING_REDIS_URL names a database it has")


def test_every_command_the_scripts_run_is_checked_at_joining_and_documented() -> None:
    """An ACL user set up from docs/many-processes.md may run every command the scripts run,
    and the alive check a link runs on (re)joining tries each of them: a right missing is
    found there, naming the command, rather than on the first failure or failover that
    needs it (a timeline shared after a promotion took the link down, its breakers sharing
    nothing, for an HLEN the documented ACL did not list)."""
    from pathlib import Path  # noqa: PLC0415

    called = {
        name.upper()
        for source in _fleet._SCRIPTS.values()
        for name in re.findall(r"redis\.p?call\('(\w+)'", source)
    }
    called.discard("EXPIRE")  # (none: PEXPIRE is)
    alive = set(re.findall(r"\{'(\w+)'", _fleet._ALIVE))
    doc = (Path(__file__).resolve().parent.parent / "docs" / "many-processes.md").read_text()
    (listed,) = re.findall(r"and the commands\s+(.+?), and SELECT", doc, flags=re.S)
    documented = set(re.findall(r"\b[A-Z]{3,}\b", listed))
    assert called, "no command found in the scripts"
    assert called <= alive, f"not tried by the alive check: {sorted(called - alive)}"
    assert called <= documented, f"not in the documented ACL: {sorted(called - documented)}"
