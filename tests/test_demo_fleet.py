"""``resilient-db demo --processes N [--ha] [--redis-url URL]`` end to end, through the command's
entry function: worker processes sharing one breaker and retry budget through a real Redis, a
real primary and synchronous standby with a failover, every process's units checked against the
database; and the usage errors of the new options."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from processes import alive, read_until, wait_for

import resilient_db
import resilient_db as rdb
from resilient_db._breaker import breakers
from resilient_db._cli import main
from resilient_db.demo import SERVICE, DemoOptions, run_demo
from resilient_db.demo._fleet import FleetDemo, _Failover, _RedisFault
from resilient_db.demo._member import fleet_config
from resilient_db.demo._view import make_view
from resilient_db.testing import RedisServer

#: a view that shows nothing (the tests that build a demo without running it)
VIEW = make_view(out=io.StringIO(), err=io.StringIO(), as_json=True, plain=True)
FLEET_INVARIANTS = {"every_process_reported", "breaker_shared_by_the_fleet"}


def run_fleet_demo(
    capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, dict[str, Any], str]:
    status = main(["demo", "--seconds", "8", "--json", "--seed", "11", *args])
    captured = capsys.readouterr()
    return status, json.loads(captured.out), captured.err


def assert_fleet_report(report: dict[str, Any], progress: str, processes: int) -> None:
    failed = {k: v for k, v in report["invariants"].items() if not v["passed"]}
    assert not failed, f"{failed}\n--- progress ---\n{progress}"
    assert report["ok"] is True
    assert set(report["invariants"]) >= FLEET_INVARIANTS
    assert (report["lost_writes"], report["duplicate_writes"], report["illegal_states_in_db"]) == (
        0,
        0,
        0,
    )
    fleet = report["fleet"]
    members = fleet["members"]
    assert report["processes"] == fleet["processes"] == len(members) == processes
    assert len({m["pid"] for m in members}) == processes  # real, distinct processes
    assert sum(m["workers"] for m in members) == report["workers"]
    assert all(m["units_ok"] > 0 for m in members)
    # the ledger checked against the database holds every process's units (and p0's own)
    assert report["units_ok"] >= sum(m["units_ok"] for m in members) + 1
    # one breaker for the fleet: an opening caused by one process was followed by the others
    assert fleet["breaker_openings"] >= 1
    assert all(m["breaker_shared"] for m in members)
    assert all(m["breaker_openings_seen"] >= 1 for m in members)
    followed = sum(m["breaker_openings_seen"] for m in members)
    assert followed > sum(m["breaker_opened_here"] for m in members)
    assert sum(fleet["breaker_opened_by"].values()) == fleet["breaker_openings"]
    # the budget is the fleet's; its figures add up
    budget = fleet["budget"]
    assert budget["ratio"] == 0.2
    assert budget["first_attempts"] > 0
    assert budget["outage_retries"] <= budget["granted"]  # every outage retry was paid for
    assert report["config"]["SELF_HEALING_RETRY_BUDGET"] == "0.2"
    assert "***@" in fleet["redis"]
    assert report["config"]["SELF_HEALING_REDIS_URL"] == fleet["redis"]


@pytest.mark.slow
@pytest.mark.server_control
def test_two_processes_with_a_failover(capsys: pytest.CaptureFixture[str]) -> None:
    status, report, progress = run_fleet_demo(
        capsys, "--processes", "2", "--ha", "--metrics-port", "0"
    )
    assert_fleet_report(report, progress, processes=2)
    # served by p0, they count its units only: said, not passed off as the fleet's
    assert "Prometheus metrics of p0 only (the fault schedule's units" in progress
    assert status == 0
    assert report["faults_injected"]["failover"] == 1
    assert "server_crash" not in report["faults_injected"]
    # 8 s leave room for the failover, not for a Redis outage before it as well: said so
    assert report["faults_skipped"]["redis_outage"] == 1
    assert report["redis_outage"] == {"happened": False, "why": "the run is too short for it"}
    assert "no Redis outage: a 8 s run has room for the database's outage only" in progress
    assert report["invariants"]["failover_writes_resumed"]["passed"]
    failover = report["failover"]
    assert failover["happened"] is True
    assert failover["replication"] == "synchronous"
    assert failover["promoted_after"] > 0
    # measured, not bounded: the first write on the new primary came after the crash (and,
    # give or take the promotion's polling, after the promotion)
    assert failover["first_write_after_crash"] > 0
    assert failover["first_write_after_promotion"] == pytest.approx(
        failover["first_write_after_crash"] - failover["promoted_after"], abs=0.002
    )
    assert set(failover["first_write_by_process"]) == {"p1", "p2"}
    assert failover["writes_on_new_primary"] > 0
    assert failover["writes_on_old_primary"] > 0
    assert any(w["kind"] == "failover" for w in report["outages"])
    assert "synchronous standby" in report["server"]
    assert "standby promoted" in progress
    # the worker processes' start is a phase of its own, not the workload's: "workload 78.5 s"
    # for --seconds 60 counted the 18 s the processes took to start on a loaded machine
    timing = report["timing"]
    assert list(timing) == ["setup", "processes", "workload", "drain", "verify", "total"]
    assert timing["processes"] > 0
    assert timing["workload"] >= report["seconds"]


@pytest.mark.slow
@pytest.mark.server_control
def test_async_processes_with_a_failover(capsys: pytest.CaptureFixture[str]) -> None:
    # --async in every process: each runs its own event loop, its units on asyncpg through
    # the multi-host URL, and resumes on the promoted standby
    status, report, progress = run_fleet_demo(
        capsys, "--async", "--processes", "2", "--ha", "--workers", "4"
    )
    assert_fleet_report(report, progress, processes=2)
    assert status == 0
    assert report["driver"] == "asyncpg"  # p0's units (the schedule's)
    assert [m["driver"] for m in report["fleet"]["members"]] == ["asyncpg", "asyncpg"]
    assert report["faults_injected"]["failover"] == 1
    assert report["invariants"]["failover_writes_resumed"]["passed"]
    failover = report["failover"]
    assert failover["happened"] is True
    assert failover["first_write_after_crash"] > 0
    assert set(failover["first_write_by_process"]) == {"p1", "p2"}
    assert failover["writes_on_new_primary"] > 0


@pytest.mark.slow
@pytest.mark.server_control
def test_three_processes_on_a_given_redis_never_show_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = "fleet-demo-secret-41"
    with RedisServer(password=password) as redis:
        theirs = _their_keys(redis)
        status, report, progress = run_fleet_demo(
            capsys, "--processes", "3", "--workers", "5", "--redis-url", redis.url
        )
        calls = redis.command_counts()
        left = _keys_left(redis)
    assert left == theirs  # the demo's own keys removed, nobody else's
    assert_fleet_report(report, progress, processes=3)
    assert status == 0
    assert [m["workers"] for m in report["fleet"]["members"]] == [2, 2, 1]
    assert report["fleet"]["redis_started_by_the_demo"] is False
    assert report["faults_injected"]["server_crash"] == 1  # no standby: the server restarts
    assert "failover" not in report
    # the user's Redis is never stopped: no Redis outage, not even a skipped one
    assert "redis_outage" not in report
    assert "redis_outage" not in report["faults_skipped"]
    assert calls.get("evalsha", 0) > 0  # the processes shared their state through it
    assert password not in json.dumps(report)
    assert password not in progress


@pytest.mark.slow
@pytest.mark.server_control
@pytest.mark.parametrize("mode", ["threads", "async"])
def test_the_fleet_survives_its_redis_stopped_and_started_again(
    capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    # the Redis the demo started is stopped (its process exits) and started again on the same
    # port and password, without its keys: every process goes on with its local breaker and
    # budget, warns naming it, and rejoins it; the fleet's breaker is shared again afterwards
    extra = ["--async"] if mode == "async" else []
    status, report, progress = run_fleet_demo(capsys, "--processes", "2", "--seconds", "12", *extra)
    assert_fleet_report(report, progress, processes=2)
    assert status == 0
    assert report["faults_injected"]["redis_outage"] == 1
    assert "redis_outage" not in report["faults_skipped"]
    assert report["invariants"]["redis_outage_survived"]["passed"]
    outage = report["redis_outage"]
    assert outage["happened"] is True
    assert outage["refused_while_stopped"] is True  # the server's process was gone
    assert outage["stopped_for"] >= 1.5
    # the database's history: every worker process wrote units while Redis was down
    assert set(outage["units_done_during_by_process"]) >= {"p1", "p2"}
    assert all(outage["units_done_during_by_process"][p] > 0 for p in ("p1", "p2"))
    assert outage["units_done_during"] >= 2
    assert outage["units_failed_during"] == 0
    assert outage["failures_naming_redis"] == {}
    assert all("redis" not in reason.lower() for reason in report["failure_reasons"])
    processes = outage["processes"]
    assert set(processes) == {"p0", "p1", "p2"}
    for name, seen in processes.items():
        assert seen["warned"], name
        assert seen["warning_names_redis"], name
        assert seen["warned_after"] >= 0, name
        assert seen["rejoined"], name
        assert seen["connected_at_end"], name
        assert 0 <= seen["rejoined_after"] <= outage["rejoin_limit"], name
        # the database's outage after it opened the breaker: followed by every process
        assert seen["openings_seen_after"] >= 1, name
    assert outage["slowest_rejoin"] == max(p["rejoined_after"] for p in processes.values())
    caused = sum(p["openings_caused_after"] for p in processes.values())
    assert sum(p["openings_seen_after"] for p in processes.values()) > caused
    masked = report["fleet"]["redis"]
    for label in ("p0", "p1", "p2"):
        assert f"{label}: [SELF-HEAL] Shared state unavailable: Redis at {masked}" in progress
        assert f"{label}: [SELF-HEAL] Shared state restored: Redis at {masked}" in progress
    assert "stopping Redis (its process exits" in progress
    assert "Redis started again after" in progress
    text = io.StringIO()
    make_view(out=text, err=io.StringIO(), as_json=False, plain=True).report(report)
    assert "redis outage" in text.getvalue()
    assert "3 of 3 warned naming Redis" in text.getvalue()
    assert "redis_outage_survived" in text.getvalue()


def _outage(**changes: Any) -> dict[str, Any]:
    """A Redis outage report every process survived, with ``changes``."""
    process = {
        "warned": True,
        "warning_names_redis": True,
        "rejoined": True,
        "connected_at_end": True,
        "openings_seen_after": 1,
        "openings_caused_after": 0,
        "warned_after": 0.01,
        "rejoined_after": 0.5,
    }
    processes = {name: dict(process) for name in ("p0", "p1", "p2")}
    processes["p1"]["openings_caused_after"] = 1
    outage: dict[str, Any] = {
        "happened": True,
        "refused_while_stopped": True,
        "stopped_at": 2.0,
        "stopped_for": 1.6,
        "units_done_during": 300,
        "units_done_during_by_process": {"p1": 150, "p2": 150},
        "units_failed_during": 0,
        "failures_naming_redis": {},
        "slowest_rejoin": 0.5,
        "rejoin_limit": 5.0,
        "processes": processes,
    }
    outage.update(changes)
    return outage


def test_the_redis_outage_invariant_fails_on_a_late_rejoin_or_a_unit_failed_meanwhile() -> None:
    demo = FleetDemo(DemoOptions(seconds=12, processes=2), VIEW)
    check = demo._redis_check(_outage())
    assert check.name == "redis_outage_survived"
    assert check.passed, check.detail
    late = _outage()
    late["processes"]["p2"]["rejoined_after"] = 7.5
    check = demo._redis_check(late)
    assert not check.passed
    assert check.detail == "p2 did not rejoin within 5 s"
    never = _outage()
    del never["processes"]["p1"]["rejoined_after"]
    never["processes"]["p1"]["rejoined"] = False
    assert demo._redis_check(never).detail == "p1 did not rejoin within 5 s"
    failed = _outage(units_failed_during=2, failures_naming_redis={"FleetDown": 2})
    check = demo._redis_check(failed)
    assert not check.passed
    assert "2 unit(s) failed while it was down" in check.detail
    assert "units failed naming Redis: {'FleetDown': 2}" in check.detail
    assert not demo._redis_check(_outage(units_done_during=0)).passed
    assert not demo._redis_check(_outage(refused_while_stopped=False)).passed
    unwarned = _outage()
    unwarned["processes"]["p0"]["warning_names_redis"] = False
    assert demo._redis_check(unwarned).detail == "p0 logged no warning naming Redis"
    alone = _outage()
    for process in alone["processes"].values():
        process["openings_caused_after"] = 1  # every process opened it on its own
    assert demo._redis_check(alone).detail == (
        "no opening after it was followed by another process"
    )
    assert not demo._redis_check({"happened": False}).passed


def test_redis_is_not_started_again_once_the_demo_is_ending() -> None:
    # interrupted (Ctrl-C) while its Redis was stopped, the demo closes it while the fault
    # schedule's thread, woken by the stop, starts it again: a server started after its close
    # ran on without its directory or its watchdog
    demo = FleetDemo(DemoOptions(seconds=12, processes=2), VIEW)
    server = RedisServer()
    try:
        fault = _RedisFault(server, demo)
        fault.close()  # the demo's cleanup, first
        fault.start()  # the schedule's thread, after it
        assert not server.is_running()
        assert fault.started_wall is None
        assert not fault.rejoined()
    finally:
        server.close()


def _their_keys(redis: RedisServer) -> dict[str, str]:
    """Keys the user's Redis holds before the demo runs: one of the user's, the shared breaker
    of another service; returns every key and its type."""
    client = redis.client()
    try:
        client.set("user:key", "mine")
        client.hset("resilient_db:{orders}:breaker", "state", "open")
    finally:
        client.close()
    return _keys_left(redis)


def _keys_left(redis: RedisServer) -> dict[str, str]:
    """Every key in ``redis`` but the links' liveness key (every process's, expiring by
    itself), with its type."""
    client = redis.client()
    try:
        found = {k.decode(): client.type(k).decode() for k in client.keys("*")}
    finally:
        client.close()
    found.pop("resilient_db:alive", None)
    return found


@pytest.mark.slow
@pytest.mark.server_control
def test_a_terminated_demo_removes_its_keys_from_a_given_redis(tmp_path: Path) -> None:
    # With --redis-url the shared breaker and budget of the demo's service stayed in the user's
    # Redis (the breaker's hash for good), also after an interrupted run
    root = str(Path(resilient_db.__file__).resolve().parent.parent)  # this package, not another
    command = [sys.executable, "-m", "resilient_db", "demo", "--seconds", "8", "--plain"]
    with RedisServer() as redis:
        theirs = _their_keys(redis)
        with subprocess.Popen(
            [*command, "--processes", "2", "--workers", "2", "--redis-url-from-env"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": root, "SELF_HEALING_REDIS_URL": redis.url},
            cwd=tmp_path,  # (python -m looks in the current directory first)
            text=True,
        ) as demo:
            assert demo.stdout is not None
            assert demo.stderr is not None
            # the workload runs, through the shared breaker
            read_until(demo.stdout, "circuit breaker", "the workload's start", demo.stderr.read)
            assert "resilient_db:{tasks-demo}:breaker" in _keys_left(redis)
            demo.terminate()
            demo.stderr.read()
            assert demo.wait(timeout=60) == 143
        assert _keys_left(redis) == theirs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "0"], "--processes must be at least 1, got 0"),
        (["--processes", "-3"], "--processes must be at least 1, got -3"),
        (["--processes", "33"], "--processes must be at most 32, got 33"),
        (["--processes", "1000000"], "--processes must be at most 32"),
        (
            ["--ha", "--url", "postgresql://app:hunter2@127.0.0.1:5432/db"],
            "--ha starts its own primary and standby",
        ),
        (["--redis-url", "redis://127.0.0.1:6379/0"], "--redis-url is for runs over several"),
        (["--processes", "2", "--redis-url", "http://:hunter2@x/0"], "--redis-url is invalid"),
        (["--processes", "2", "--redis-url", "redis:///0"], "--redis-url is invalid (has no host"),
        (
            ["--processes", "4", "--workers", "3"],
            "--workers (3) must be at least --processes (4)",
        ),
        (
            ["--processes", "2", "--redis-url", "redis://x/0", "--redis-url-from-env"],
            "give --redis-url or --redis-url-from-env, not both",
        ),
    ],
)
def test_bad_fleet_options_are_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resilient-db demo: error: ")
    assert message in err
    assert "hunter2" not in err
    assert err.count("\n") == 1


def test_redis_url_from_env_must_be_set(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SELF_HEALING_REDIS_URL", raising=False)
    assert main(["demo", "--processes", "2", "--redis-url-from-env"]) == 2
    assert "SELF_HEALING_REDIS_URL is not set" in capsys.readouterr().err
    monkeypatch.setenv("SELF_HEALING_REDIS_URL", " ")
    assert main(["demo", "--processes", "2", "--redis-url-from-env"]) == 2
    assert "SELF_HEALING_REDIS_URL is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "url", "message"),
    [
        (
            ["--processes", "2"],
            "http://:hunter2@x/0",
            "SELF_HEALING_REDIS_URL (--redis-url-from-env) is invalid",
        ),
        ([], "redis://:hunter2@x/0", "SELF_HEALING_REDIS_URL (--redis-url-from-env) is for runs"),
    ],
)
def test_errors_of_a_redis_url_from_the_environment_name_the_variable(
    args: list[str],
    url: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URL came from ``SELF_HEALING_REDIS_URL``: its errors said ``--redis-url``, an
    option the user never gave."""
    monkeypatch.setenv("SELF_HEALING_REDIS_URL", url)
    assert main(["demo", *args, "--redis-url-from-env"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "hunter2" not in err


def test_an_unreachable_redis_from_the_environment_is_named_by_its_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SELF_HEALING_REDIS_URL", f"redis://:hunter2@127.0.0.1:{_free_port()}/0")
    argv = ["demo", "--processes", "2", "--seconds", "8", "--redis-url-from-env"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "cannot reach the Redis given with SELF_HEALING_REDIS_URL (--redis-url-from-env) at "
        "redis://***@127.0.0.1:" in err
    )
    assert "hunter2" not in err


def test_an_unreachable_redis_is_named_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{_free_port()}/0"
    assert main(["demo", "--processes", "2", "--seconds", "8", "--redis-url", url]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Redis given with --redis-url at redis://***@127.0.0.1:" in err
    assert "hunter2" not in err


def test_the_library_entry_refuses_bad_fleet_options_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_demo(DemoOptions(processes=0)) == 2
    assert "--processes must be at least 1" in capsys.readouterr().err
    assert run_demo(DemoOptions(ha=True, url="postgresql://u@127.0.0.1/db")) == 2
    assert "--ha starts its own primary and standby" in capsys.readouterr().err


def test_the_options_repr_shows_no_password() -> None:
    options = DemoOptions(
        url="postgresql://app:db-secret@127.0.0.1/db", redis_url="redis://:r-secret@127.0.0.1/0"
    )
    text = repr(options)
    assert "db-secret" not in text
    assert "r-secret" not in text


@pytest.mark.slow
@pytest.mark.server_control
def test_a_killed_demo_leaves_no_files_of_its_worker_processes(tmp_path: Path) -> None:
    # SIGKILL (or SIGTERM, or a second Ctrl-C during the cleanup): no cleanup of the demo's own
    # runs; the servers' watchdogs remove theirs, and the worker processes' stderr must not be
    # a named file that nobody removes
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    root = str(Path(resilient_db.__file__).resolve().parent.parent)  # this package, not another
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": root}
    command = [sys.executable, "-m", "resilient_db", "demo", "--processes", "2", "--seconds", "8"]
    with subprocess.Popen(
        [*command, "--plain"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,  # (python -m looks in the current directory first)
        text=True,
        start_new_session=True,
    ) as demo:
        assert demo.stdout is not None
        said = read_until(demo.stdout, "share the breaker", "the worker processes' start")
        pids = [int(pid) for pid in re.findall(r"p\d pid (\d+)", said[-1])]
        assert len(pids) == 2
        demo.kill()
        demo.wait()
    # the worker processes end once their parent is gone (the end of their stdin)
    wait_for(lambda: not any(alive(pid) for pid in pids), "the worker processes to end")
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("rdb-demo-")]


class _SlowToStop:
    """A pair whose primary takes a while to stop once crashed (the time ``pg_ctl`` takes)."""

    began: float | None = None

    def crash_primary(self) -> None:
        self.began = time.time()  # the crash's signal sent
        time.sleep(0.05)  # (its stop seen later)


def test_the_failover_gap_counts_from_the_moment_the_primary_is_crashed() -> None:
    # not from the moment its stop was seen: the writes fail from the crash on, and the gap
    # measured from later was that much shorter than the outage the units saw
    pair = _SlowToStop()
    failover = _Failover(cast(Any, pair))
    before = time.time()
    failover.crash_primary()
    assert failover.crashed_wall is not None
    assert pair.began is not None
    assert before <= failover.crashed_wall <= pair.began  # stamped as the crash began


class _Reported:
    """A worker process as far as its last progress goes."""

    def __init__(self, units_ok: int | None) -> None:
        self.progress: dict[str, Any] = (
            {} if units_ok is None else {"totals": {"units_ok": units_ok}}
        )


def test_the_failover_counts_as_written_once_every_worker_process_committed_a_unit() -> None:
    # the schedule's failover waits for it: before, on a loaded machine, it came before any
    # write, and the demo showed no write on the old primary
    members: list[Any] = []
    failover = _Failover(cast(Any, _SlowToStop()), members=members)
    assert not failover.written()  # none spawned yet
    members += [_Reported(None), _Reported(3)]  # p1 has not reported yet
    assert not failover.written()
    members[0] = _Reported(0)
    assert not failover.written()
    members[0] = _Reported(1)
    assert failover.written()


def test_an_earlier_run_in_the_process_is_not_counted_as_this_runs_openings(
    redis_server: RedisServer, pg_url: str
) -> None:
    # run_demo twice in one process (a script, a notebook): the service's breaker and budget
    # live as long as the process, and the second report credited p0 (this process) with the
    # openings of the shared breaker it had caused in the first run: "caused by" did not add up
    # to the fleet's openings, and breaker_shared_by_the_fleet counted them as this run's
    environ = {"SELF_HEALING_REDIS_URL": redis_server.url, "SELF_HEALING_RETRY_BUDGET": "0.2"}
    engine = sa.create_engine(pg_url)
    try:
        rdb.ResilientSession(engine, service=SERVICE, config=fleet_config(environ))

        def shared() -> dict[str, Any]:
            entry = rdb.health()["services"][SERVICE]["breaker"]
            return cast("dict[str, Any]", entry.get("shared") or {})

        wait_for(lambda: bool(shared().get("connected")), "the link to Redis")
        breakers()[SERVICE].open()  # the earlier run's opening, caused here
        wait_for(lambda: shared().get("opened_here") == 1, "the opening to be counted")

        demo = FleetDemo(DemoOptions(seconds=8, processes=2, redis_url=redis_server.url), VIEW)
        demo.counters_before = demo._counters()  # as its workload starts
        demo.fleet_opens_before = int(demo._shared_breaker().get("fleet_opens", 0))
        fleet = demo._fleet_report(demo._counters(), demo._shared_breaker())
    finally:
        engine.dispose()
    assert fleet["breaker_openings"] == 0
    assert fleet["breaker_opened_by"] == {}  # was {"p0": 1}
    assert fleet["budget"]["granted"] == fleet["budget"]["exhausted"] == 0


def test_keys_left_in_a_given_redis_are_said_on_a_terminal_too() -> None:
    # the demo could not remove its keys from the Redis given with --redis-url (it went away
    # meanwhile): the line saying so, written as the demo cleans up, after its live panel
    # stopped, reached the panel's list of events, never drawn again, so a terminal (the
    # default view) never showed it; --plain and --json did
    from rich.console import Console  # noqa: PLC0415 - the cli extra

    from resilient_db.demo._view import RichView  # noqa: PLC0415

    screen = io.StringIO()
    view = RichView(Console(file=screen, force_terminal=True, width=200))
    url = f"redis://:hunter2@127.0.0.1:{_free_port()}/0"  # nobody listens there
    demo = FleetDemo(DemoOptions(seconds=8, processes=2, redis_url=url), view)
    view.start("resilient-db demo", demo.progress)
    view.stop()  # as the demo's cleanup begins
    demo._remove_service_keys(url)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # (its colours)
    assert "could not remove the demo's keys (resilient_db:{tasks-demo}:breaker, ...)" in shown
    assert "redis://***@127.0.0.1:" in shown
    assert "hunter2" not in shown
