"""The event loops the loop-sensitive tests run on: asyncio's own and uvloop's (which
``uvicorn[standard]`` installs, and uvicorn then picks by itself). uvloop is in the ``test``
extra where it exists (not on Windows); where it is not installed, its tests skip, saying so.
``RESILIENT_DB_TEST_LOOP=uvloop`` runs every other test of a run on uvloop (conftest)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None

#: ``@pytest.mark.parametrize("loop", LOOPS)``
LOOPS = (
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed here"),
    ),
)


def run_on(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """``main`` run to its end on a new event loop of kind ``loop``, as an application runs
    it: ``uvloop.run``, or ``asyncio.run`` on asyncio's own loop (whatever the policy says,
    from Python 3.11)."""
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415  (not installed everywhere)

        return uvloop.run(main)
    assert loop == "asyncio", loop
    if sys.version_info < (3, 11):
        return asyncio.run(main)
    own = getattr(asyncio, "EventLoop", asyncio.SelectorEventLoop)  # (3.13 names it)
    with asyncio.Runner(loop_factory=own) as runner:
        return runner.run(main)


def loop_kind() -> str:
    """The kind of the running loop: "uvloop" or "asyncio"."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


class Gate:
    """``asyncio.Barrier`` (Python 3.11+) for one use, on Python 3.10 too: ``wait()`` returns
    once ``parties`` tasks wait. (The cold-start zygote, a script of its own, imports it.)"""

    def __init__(self, parties: int) -> None:
        self.left = parties
        self._open = asyncio.Event()

    async def wait(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self._open.set()
        await self._open.wait()
