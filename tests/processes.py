"""Test processes that die without cleaning up: what the harness's watchdogs are for."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # (gone before, or while, it was read)
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def children_named(parent: int, marker: str) -> list[int]:
    """The processes whose parent is ``parent`` and whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # (ended meanwhile)
            continue
        if int(stat.rpartition(")")[2].split()[1]) == parent and marker in cmdline:
            found.append(int(entry.name))
    return found


def read_until(stream: IO[str], marker: str, what: str, more: Callable[[], str] = str) -> list[str]:
    """The lines of ``stream`` up to the first that holds ``marker``; fail naming ``what`` (and
    showing the lines, and ``more()``: say, the process's stderr) if it ends first."""
    said: list[str] = []
    for line in stream:
        said.append(line)
        if marker in line:
            return said
    raise AssertionError(f"{what} did not happen:\n" + "".join(said) + more())


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` (a condition, not a backoff) until it holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


async def wait_for_async(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """:func:`wait_for` in a task: the event loop runs while it polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@contextlib.contextmanager
def killed_at_exit(script: str) -> Iterator[IO[str]]:
    """Run ``python -c script``; yield its stdout. On leaving the block, one line to its stdin
    tells it to SIGKILL itself (the script reads a line, then kills itself): no atexit, no
    finalizer runs. Asserts it died that way."""
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            yield proc.stdout
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
