"""resilient_db.testing.RedisServer as other local users and a user without the client see it."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from resilient_db.testing import RedisServer, ServerStartError


def _raw(port: int, *command: str) -> bytes:
    """One command over a raw connection, with no password: what any local user can send."""
    parts = [f"*{len(command)}\r\n".encode()]
    for arg in command:
        parts.append(f"${len(arg.encode())}\r\n{arg}\r\n".encode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"".join(parts))
        return sock.recv(4096)


def test_a_redis_server_requires_a_password_and_has_no_file_writing_commands() -> None:
    """Run as root (a container), a RedisServer without a password let any local user make it
    write files wherever root may (CONFIG SET dir / dbfilename, SAVE) or load code (MODULE
    LOAD). It gets a password of its own, carried by its URL, and those commands are off."""
    with RedisServer() as server:
        assert server.password
        assert f":{server.password}@" in server.url
        assert _raw(server.port, "PING").startswith(b"-NOAUTH")
        assert _raw(server.port, "SET", "k", "v").startswith(b"-NOAUTH")
        with server.client() as client:  # the password holder: the commands are gone
            assert client.ping()
            for command in (
                ("CONFIG", "SET", "dir", "/"),
                ("MODULE", "LIST"),
                ("DEBUG", "SLEEP", "0"),
            ):
                with pytest.raises(Exception, match="unknown command"):
                    client.execute_command(*command)


def test_a_redis_server_without_a_password_when_asked() -> None:
    with RedisServer(password="") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert _raw(server.port, "PING") == b"+PONG\r\n"
    with pytest.raises(TypeError, match="password must be a str"):
        RedisServer(password=123)  # type: ignore[arg-type]


def test_without_the_redis_client_a_redis_server_says_so_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server started, the check that it answers failed on the missing client (every
    error was taken for "not yet"), and ten seconds later: "did not answer in time"."""
    monkeypatch.setitem(sys.modules, "redis", None)  # what a missing package gives import
    server = RedisServer()
    with pytest.raises(ImportError, match=r"pip install 'resilient-db\[redis\]'"):
        server.start()
    assert server._proc is None  # said before any server was started (and waited for)
    assert not server.is_running()
    server.close()


@pytest.mark.parametrize(
    "password", ["--starts-like-an-option", 'a "quoted\\ one', "ünï tab\there"]
)
def test_any_password_starts_the_server_and_never_shows_on_its_command_line(password: str) -> None:
    """The password went on redis-server's command line: one starting with "--" (one generated
    password in 4096) read as an option and the server would not start, and any local user
    could read it in /proc/PID/cmdline. It goes in a file only the tests' user reads."""
    with RedisServer(password=password) as server:
        with server.client() as client:
            assert client.ping()
        assert server._proc is not None
        cmdline = Path(f"/proc/{server._proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        assert _raw(server.port, "PING").startswith(b"-NOAUTH")


def test_a_port_held_by_a_listener_that_never_answers_is_refused_quickly() -> None:
    """Something accepting on the port but never answering (a silent listener) made start()
    wait out redis-py's retries of each PING (about 26 s) and then say "did not answer in
    time"; the server it had started had exited at once, its port taken."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        server = RedisServer(port=port)
        began = time.monotonic()
        try:
            with pytest.raises(ServerStartError, match=rf"port {port} on 127\.0\.0\.1 is taken"):
                server.start()
        finally:
            server.close()
        assert time.monotonic() - began < 5


def test_the_port_of_a_paused_redis_is_refused_quickly_and_its_calls_fail_in_seconds() -> None:
    """A paused Redis (SIGSTOP) holds its port and answers nothing: a second server on that
    port is refused as "taken" within the start's deadline, and flushall(), command_counts()
    and a client()'s calls fail after about 2 s (no retries), not half a minute later."""
    import redis  # noqa: PLC0415 - the test extra has it

    with RedisServer() as paused:
        paused.pause()
        try:
            other = RedisServer(port=paused.port)
            began = time.monotonic()
            try:
                with pytest.raises(ServerStartError, match=rf"port {paused.port} .* is taken"):
                    other.start()
            finally:
                other.close()
            assert time.monotonic() - began < 5
            with paused.client() as client:
                calls = (paused.flushall, paused.command_counts, client.ping)
                for call in calls:
                    began = time.monotonic()
                    with pytest.raises(redis.TimeoutError):
                        call()
                    assert time.monotonic() - began < 4, call
        finally:
            paused.resume()
        paused.flushall()  # resumed, it answers again


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_redis_server_stops_and_starts_again_on_its_port_and_in_its_directory() -> None:
    """Tests of "Redis gone, then back" had only kill() and start(); stop() shuts it down
    (SIGTERM: it closes its port and exits, saying so in its log), and start() brings it back
    where it was, as restart() does in one call."""
    with RedisServer() as server:
        port, log_path = server.port, server.log_path
        assert log_path is not None
        server.client().set("k", "v")
        assert server._proc is not None
        first = server._proc.pid
        server.stop()
        assert not server.is_running()
        assert _refused(port)
        assert "ready to exit" in log_path.read_text()  # a shutdown, not a kill
        server.stop()  # idempotent
        server.kill()
        server.start()
        assert (server.port, server.log_path) == (port, log_path)
        assert log_path.exists()
        with server.client() as client:
            assert client.ping()
            assert client.get("k") is None  # no persistence: a fresh Redis
        pids = {first, server._proc.pid}
        for kill in (False, True):
            server.restart(kill=kill)
            assert server.port == port
            pids.add(server._proc.pid)
            with server.client() as client:
                assert client.ping()
        assert len(pids) == 4  # a new process each time
        # restart() stopped it (a shutdown), restart(kill=True) killed it (none)
        assert log_path.read_text().count("ready to exit") == 2


def test_stopping_a_paused_redis_server_returns_at_once() -> None:
    """A paused server (SIGSTOP) acts on SIGTERM only once resumed: stop() resumes it."""
    with RedisServer() as server:
        server.pause()
        began = time.monotonic()
        server.stop()
        assert time.monotonic() - began < 5
        assert not server.is_running()
        assert _refused(server.port)
        server.start()
        assert server.client().ping()


def test_a_closed_redis_server_cant_be_started_again_and_says_so() -> None:
    """close() removes the server's directory: start() after it made a new one, silently, and
    restart() likewise; both now say the server is closed. stop() and kill() stay no-ops, as
    on a server never started."""
    never = RedisServer()
    never.stop()
    never.kill()
    assert not never.is_running()
    server = RedisServer()
    server.start()
    server.close()
    assert "closed" in repr(server)
    for call in (server.start, server.restart, lambda: server.restart(kill=True)):
        with pytest.raises(ServerStartError, match=r"closed .*make a new RedisServer"):
            call()
        assert not server.is_running()
        assert server.log_path is None  # no directory made
    server.stop()
    server.kill()
    server.close()
    assert _refused(server.port)


def test_a_redis_server_that_exits_at_start_is_named_with_its_exit_code(tmp_path: Path) -> None:
    """A program that exits at once, saying nothing (not a redis-server, a binary that can't
    run here), left "redis-server exited at start: (no log)": the error names the program
    and its exit code, and nothing is left running."""
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    server = RedisServer(executable=fake)
    with pytest.raises(ServerStartError, match=rf"redis-server {fake} exited with code 3 at start"):
        server.start()
    assert not server.is_running()
    server.close()
    assert server.log_path is None


@pytest.mark.parametrize("password", ["p@ss:w/rd#1", "a%20b", "ab#cd", "q?x=1&y [z]"])
def test_the_url_of_a_redis_server_carries_any_password_percent_encoded(password: str) -> None:
    """The password went into :attr:`RedisServer.url` as it was: one holding ``@ : / # %``
    made a URL ``Redis.from_url()`` misread (a wrong password, host or port)."""
    import redis  # noqa: PLC0415 - the extra this test needs; the others above don't

    with RedisServer(password=password) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            assert client.ping()
        finally:
            client.close()
