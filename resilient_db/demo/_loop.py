"""The event loop of ``resilient-db demo --async``: one per process, as an asyncio application
has (``asyncio.run`` in a thread of its own), and what the workload written once for it
(``_workload_async``) uses where the threads' twin (``_workload``) uses :mod:`threading`.

The demo itself stays threaded (its display, the fault schedule, the worker processes' pipes):
it hands coroutines to the loop (:meth:`EventLoop.call`) and sees each of the workload's tasks
as it sees a thread (:class:`LoopTask`: ``start``, ``join``, ``is_alive``, ``name``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Barrier", "EventLoop", "LoopTask", "flag_wait"]

T = TypeVar("T")

#: how often a task waiting on a :class:`threading.Event` looks at it (set by another thread)
_POLL = 0.02

_current: EventLoop | None = None


class EventLoop:
    """An event loop running in a thread of its own until :meth:`close`: ``asyncio.run`` of a
    main coroutine that waits to be told to end, so the end is the one an application gets (the
    tasks left cancelled and awaited, async generators and the default executor shut down).
    The process's loop of the workload from :meth:`start` on (see :class:`LoopTask`)."""

    def __init__(self, name: str = "demo-event-loop") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._end: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        #: what ``asyncio.run`` raised, if anything (reported by the demo)
        self.error: BaseException | None = None

    def start(self) -> EventLoop:
        global _current
        self._thread.start()
        self._ready.wait()
        if self._loop is None:
            raise RuntimeError(f"the demo's event loop did not start: {self.error!r}")
        _current = self
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by the demo
            self.error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._end = asyncio.Event()
        self._ready.set()
        await self._end.wait()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` as a task of the loop; its future (for any thread to wait on)."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("the demo's event loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (from another thread)."""
        return self.submit(coro).result()

    def close(self, timeout: float = 15.0) -> None:
        """End the loop as ``asyncio.run`` ends it: the tasks still running (units abandoned
        at the drain deadline) cancelled and awaited. Waits at most ``timeout`` seconds."""
        global _current
        if _current is self:
            _current = None
        loop, end = self._loop, self._end
        if loop is not None and end is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # (closed meanwhile)
                loop.call_soon_threadsafe(end.set)
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


def running_loop() -> EventLoop:
    """The process's workload loop (see :meth:`EventLoop.start`)."""
    if _current is None:
        raise RuntimeError("no demo event loop is running (EventLoop().start() first)")
    return _current


class LoopTask:
    """A coroutine run as a task of the process's workload loop, seen as a
    :class:`threading.Thread` is (what the demo does with its workers): ``start()`` (on the loop
    running then), ``join(timeout)`` and ``is_alive()`` from any thread, ``name``. Subclasses
    override ``async def run()``, or give ``target`` (an ``async def``) and ``args``.
    ``daemon`` is taken for the same signature: a task never outlives its loop."""

    def __init__(
        self,
        group: None = None,
        target: Callable[..., Awaitable[None]] | None = None,
        name: str | None = None,
        args: tuple[Any, ...] = (),
        *,
        daemon: bool | None = None,
    ) -> None:
        self.name = name or f"demo-task-{id(self):x}"
        self.daemon = daemon
        self._target = target
        self._args = args
        self._future: concurrent.futures.Future[None] | None = None

    async def run(self) -> None:
        if self._target is not None:
            await self._target(*self._args)

    def start(self) -> None:
        if self._future is not None:
            raise RuntimeError("tasks can only be started once")
        self._future = running_loop().submit(self.run())

    def join(self, timeout: float | None = None) -> None:
        if self._future is None:
            raise RuntimeError("cannot join task before it is started")  # (as Thread.join)
        concurrent.futures.wait([self._future], timeout)

    def is_alive(self) -> bool:
        return self._future is not None and not self._future.done()


class Barrier:
    """:class:`threading.Barrier` for the tasks of one event loop, for one meeting: ``await
    wait()`` returns once ``parties`` tasks wait (the last runs ``action`` first). One that
    waited ``timeout`` seconds in vain breaks it: it and every later waiter get
    :class:`threading.BrokenBarrierError`, as with the threads' barrier."""

    def __init__(
        self, parties: int, action: Callable[[], object] | None = None, timeout: float | None = None
    ) -> None:
        self.parties = parties
        self._action = action
        self._timeout = timeout
        self._count = 0
        self._broken = False
        self._opened: asyncio.Event | None = None  # made on the loop, at the first wait

    @property
    def broken(self) -> bool:
        """Read from other threads too (the fault schedule's)."""
        return self._broken

    async def wait(self) -> int:
        if self._opened is None:
            self._opened = asyncio.Event()
        opened = self._opened
        if self._broken:
            raise threading.BrokenBarrierError
        index = self._count
        self._count += 1
        if self._count == self.parties:
            if self._action is not None:
                self._action()
            opened.set()
            return index
        try:
            await asyncio.wait_for(opened.wait(), self._timeout)
        except asyncio.TimeoutError:
            self._break()
            raise threading.BrokenBarrierError from None
        except BaseException:  # cancelled: the partner must not wait for nobody
            self._break()
            raise
        if self._broken:
            raise threading.BrokenBarrierError
        return index

    def _break(self) -> None:
        self._broken = True
        if self._opened is not None:
            self._opened.set()


async def flag_wait(flag: threading.Event, seconds: float) -> bool:
    """``flag.wait(seconds)`` for a task: True as soon as ``flag`` is set (by any thread), False
    once ``seconds`` passed without it. The other tasks run meanwhile."""
    if seconds <= 0:  # (still a step for the other tasks, as a thread's wait is preempted)
        await asyncio.sleep(0)
        return flag.is_set()
    deadline = time.monotonic() + seconds
    while not flag.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(_POLL, left))
    return True
