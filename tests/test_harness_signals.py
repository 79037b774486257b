"""The pytest plugin when the test process is told to stop: SIGTERM and SIGINT mid-test.

Each test runs a real pytest in a subprocess, with the plugin, against a real server: the outer
session's ``pg_server`` is the inner session's external server (``RESILIENT_DB_TEST_URL``), or
the inner session starts its own embedded servers. The inner test writes what it started to a
file, then waits; the outer test signals it and checks what is left. Every wait is bounded; the
inner process is killed, and its databases dropped, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import alive, wait_for

from resilient_db.testing import PostgresServer, _pytest_plugin

#: runs pytest with SIGTERM and SIGINT as a shell gives them (the outer process may have set
#: SIGINT to be ignored, which a child inherits; Python then installs no KeyboardInterrupt)
RUNNER = """
import signal, sys
import pytest
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))
"""

#: the inner test: records its database and servers, says it is ready, then waits to be stopped
WAITING_TEST = """
import json, os, threading
from pathlib import Path

def _pid(server):
    return int((server.data_dir / "postmaster.pid").read_text().split()[0])

def test_waits_for_a_signal(request, {fixtures}):
    record = {{"database": pg_database, "pids": {{}}, "dirs": {{}}}}
    if "redis_server" in request.fixturenames:
        redis_server = request.getfixturevalue("redis_server")
        record["pids"]["redis"] = int(redis_server.client().info("server")["process_id"])
        record["dirs"]["redis"] = str(redis_server.log_path.parent)
    if "pg_standby" in request.fixturenames:
        pairs = request.getfixturevalue("pg_standby")
        for role, server in zip(("primary", "standby"), pairs.servers):
            record["pids"][role] = _pid(server)
            record["dirs"][role] = str(server.data_dir)
    if hasattr(pg_server, "data_dir"):
        record["pids"]["pg_server"] = _pid(pg_server)
        record["dirs"]["pg_server"] = str(pg_server.data_dir)
    # a connection inside a transaction: dropping the database must end it first
    with pg_server.connect(pg_database) as conn:
        conn.autocommit = False
        conn.execute("CREATE TABLE held (id int)")
        ready = Path(os.environ["RECORD_FILE"])
        ready.with_suffix(".tmp").write_text(json.dumps(record))
        ready.with_suffix(".tmp").replace(ready)  # seen whole or not at all
        threading.Event().wait(60)
"""

#: a SIGTERM handler of the user's, installed before the plugin's: it writes down which of the
#: recorded servers still run when it is called, then ends the process by SIGTERM
USER_HANDLER_CONFTEST = """
import json, os, signal
from pathlib import Path

def _alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"

def _on_sigterm(signum, frame):
    record = json.loads(Path(os.environ["RECORD_FILE"]).read_text())
    seen = {
        "running": sorted(name for name, pid in record["pids"].items() if _alive(pid)),
        "files": sorted(name for name, path in record["dirs"].items() if Path(path).exists()),
    }
    Path(os.environ["HANDLER_FILE"]).write_text(json.dumps(seen))
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)

def pytest_configure(config):
    signal.signal(signal.SIGTERM, _on_sigterm)
"""


class InnerSession:
    """A pytest subprocess running one waiting test (see :data:`WAITING_TEST`)."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.record_file = directory / "record.json"
        self.output = directory / "output.txt"
        env = {**env, "RECORD_FILE": str(self.record_file)}
        with self.output.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", RUNNER, "-q", "-p", "no:cacheprovider", "-p", "no:asyncio"],
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> dict[str, Any]:
        """What the inner test started, once it waits."""
        wait_for(
            lambda: self.record_file.exists() or self.proc.poll() is not None,
            "the inner test to start",
            timeout=120,
        )
        assert self.record_file.exists(), f"the inner pytest ended:\n{self.output.read_text()}"
        record: dict[str, Any] = json.loads(self.record_file.read_text())
        return record

    def signal_and_wait(self, signum: int) -> int:
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the inner pytest did not end:\n{self.output.read_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def inner(tmp_path: Path, pg_server: PostgresServer) -> Iterator[Any]:
    """Starts :class:`InnerSession` objects (``inner(fixtures, env, conftest=...)``); kills
    them at the end and drops the databases they recorded on ``pg_server``."""
    sessions: list[InnerSession] = []

    def start(fixtures: str, *, external: bool, conftest: str | None = None) -> InnerSession:
        directory = tmp_path / f"inner{len(sessions)}"
        directory.mkdir()
        (directory / "pytest.ini").write_text("[pytest]\n")
        (directory / "test_inner.py").write_text(WAITING_TEST.format(fixtures=fixtures))
        if conftest is not None:
            (directory / "conftest.py").write_text(textwrap.dedent(conftest))
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("RESILIENT_DB_TEST_", "PYTEST_"))
        }
        env["HANDLER_FILE"] = str(directory / "handler.json")
        if external:
            env["RESILIENT_DB_TEST_URL"] = pg_server.url(driver="")
        session = InnerSession(directory, env)
        sessions.append(session)
        return session

    try:
        yield start
    finally:
        for session in sessions:
            session.kill()  # its embedded servers and Redis: their watchdogs stop them
            if session.record_file.exists():
                name = json.loads(session.record_file.read_text())["database"]
                with contextlib.suppress(Exception):
                    pg_server.drop_database(name)  # on an embedded inner server: not there


@pytest.mark.slow  # a pytest subprocess importing the package: seconds
def test_sigterm_drops_the_database_made_on_an_external_server(
    inner: Any, pg_server: PostgresServer
) -> None:
    session = inner("pg_server, pg_database", external=True)
    database = session.wait_ready()["database"]
    assert pg_server.database_exists(database)

    assert session.signal_and_wait(signal.SIGTERM) == -signal.SIGTERM

    assert not pg_server.database_exists(database), session.output.read_text()


@pytest.mark.slow  # a pytest subprocess importing the package: seconds
def test_sigterm_stops_every_server_before_the_users_own_handler(inner: Any) -> None:
    """The inner session starts an embedded server, a Redis server and a standby pair; the
    user's SIGTERM handler, called after the plugin's teardown, finds none of them running
    and none of their files left, then ends the process as SIGTERM would."""
    session = inner(
        "pg_server, pg_database, redis_server, pg_standby",
        external=False,
        conftest=USER_HANDLER_CONFTEST,
    )
    record = session.wait_ready()
    assert set(record["pids"]) == {"pg_server", "redis", "primary", "standby"}
    assert all(alive(pid) for pid in record["pids"].values())

    assert session.signal_and_wait(signal.SIGTERM) == -signal.SIGTERM

    handler_file = session.directory / "handler.json"
    output = session.output.read_text()
    assert handler_file.exists(), f"the user's handler was not called:\n{output}"
    assert json.loads(handler_file.read_text()) == {"running": [], "files": []}


@pytest.mark.slow  # a pytest subprocess importing the package: seconds
def test_sigint_tears_down_through_pytest(inner: Any, pg_server: PostgresServer) -> None:
    """Ctrl-C: pytest raises KeyboardInterrupt and runs the fixtures' teardown."""
    session = inner("pg_server, pg_database, redis_server", external=True)
    record = session.wait_ready()

    assert session.signal_and_wait(signal.SIGINT) == pytest.ExitCode.INTERRUPTED

    assert not pg_server.database_exists(record["database"])
    assert not alive(record["pids"]["redis"])
    assert not Path(record["dirs"]["redis"]).exists()


# --------------------------------------------------------------------------------------------------
# installing the handler (in this process: the handler in place is put back by every test)


def _user_handler(signum: int, frame: object) -> None:
    raise AssertionError("not called by these tests")


@contextlib.contextmanager
def _sigterm_handler(handler: Any) -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_handler_goes_in_at_the_first_start_and_the_previous_one_comes_back() -> None:
    started = _pytest_plugin._Started()
    with _sigterm_handler(_user_handler):
        assert signal.getsignal(signal.SIGTERM) is _user_handler  # nothing started yet
        started.add_database("t_never_created")
        assert signal.getsignal(signal.SIGTERM) == started._on_sigterm
        started.uninstall()
        assert signal.getsignal(signal.SIGTERM) is _user_handler


def test_a_handler_installed_after_the_plugins_stays() -> None:
    started = _pytest_plugin._Started()
    with _sigterm_handler(signal.SIG_DFL):
        started.add_database("t_never_created")
        signal.signal(signal.SIGTERM, _user_handler)
        started.uninstall()
        assert signal.getsignal(signal.SIGTERM) is _user_handler


def test_an_ignored_sigterm_stays_ignored() -> None:
    started = _pytest_plugin._Started()
    with _sigterm_handler(signal.SIG_IGN):
        started.add_database("t_never_created")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        started.uninstall()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_no_handler_from_a_thread_other_than_the_main_one() -> None:
    started = _pytest_plugin._Started()
    errors: list[BaseException] = []

    def register() -> None:
        try:
            started.add_database("t_never_created")
        except BaseException as exc:  # checked below
            errors.append(exc)

    with _sigterm_handler(_user_handler):
        thread = threading.Thread(target=register)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert errors == []
        assert signal.getsignal(signal.SIGTERM) is _user_handler
        started.uninstall()
        assert signal.getsignal(signal.SIGTERM) is _user_handler
