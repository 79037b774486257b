"""What an interrupted unit leaves to be done after the interruption has gone on.

A two-phase unit interrupted in its PREPARE step (its task cancelled, ``asyncio.timeout``,
``KeyboardInterrupt``) may leave a prepared transaction on a server: a PREPARE the server
carried out after the client stopped waiting, which holds its locks and its writes until
someone ends it. The interruption must go on at once (no new connection is made while it is
delivered), so the factory looks for such transactions and rolls them back afterwards, in a
thread (sync) or a task (async) of its own: an :class:`Errand`. Errands still running when the
process exits are waited for a moment (:data:`EXIT_GRACE`), then named in an ERROR line, for
an operator to end what they may have left.

Written by hand, a few lines: ``concurrent.futures``' executors join their threads at exit
without a bound (an errand may wait up to the factory's deadline, a minute by default, for a
PREPARE the server is still carrying out), and ``asyncio.run`` cancels the tasks still running
at its end, which an errand says itself.
"""

from __future__ import annotations

import atexit
import contextvars
import logging  # noqa: F401 (its exit handler first: see below)
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

#: seconds the process waits at exit for the errands still running in threads, all together,
#: before naming what they have not done (a PREPARE still running on the server may take
#: longer: what is left is named for the operator, not waited for)
EXIT_GRACE: Final = 2.0


class ProcessExiting(BaseException):
    """The reason a prepared transaction an errand was to end is named as left: the process
    exited (or the errand's event loop closed) first."""


class NotStarted(Exception):
    """The reason a prepared transaction an errand was to end is named as left: no errand could
    be started (no thread to be had, the event loop closing)."""


class LookFailed(Exception):
    """The reason a prepared transaction an errand was to end is named as left: the errand
    itself failed (an error of its own, not of a connection)."""


@dataclass(eq=False)  # (an errand is kept in a set)
class Sweep:
    """How far a look for a two-phase unit's prepared transactions has got: of ``pending``
    ((engine, xid) each, looked for in order), the first ``looked``; ``ended`` were rolled
    back, ``left`` could not be ended (each with the last error met: None while its PREPARE
    was still running)."""

    pending: list[tuple[Any, Any]]
    ended: list[Any] = field(default_factory=list)
    left: list[tuple[Any, BaseException | None]] = field(default_factory=list)
    looked: int = 0

    def note(self, xid: Any, found: bool | None, last: BaseException | None) -> None:
        """The look for ``xid``, the next of ``pending``, is over: ``found`` True, rolled back;
        False, not prepared; None, not ended (``last``: the last error met). Noted before it
        is counted as looked for, so that no transaction is ever in none of ``ended``,
        ``left`` and the ones not looked for yet."""
        if found is None:
            self.left.append((xid, last))
        elif found:
            self.ended.append(xid)
        self.looked += 1

    def unlooked(self, reason: BaseException) -> list[tuple[Any, BaseException | None]]:
        """The ``left`` entries of the transactions not looked for, for ``reason``."""
        return [(xid, reason) for _, xid in self.pending[self.looked :]]


class Errand(Sweep):
    """A :class:`Sweep` run after an interruption, in the background; ``say(sweep)`` reports
    its result, once, whichever comes first: the errand's end, or the process's
    (:func:`_at_exit`)."""

    def __init__(self, pending: list[tuple[Any, Any]], say: Callable[[Sweep], None]) -> None:
        super().__init__(pending)
        self._say = say
        self._lock = threading.Lock()
        self._said = False
        #: the thread running it (sync); None for a task, which says its own end
        self.thread: threading.Thread | None = None
        #: what stopped it before it looked for everything (a cancellation of its task)
        self.stopped: BaseException | None = None
        _RUNNING.add(self)

    def note(self, xid: Any, found: bool | None, last: BaseException | None) -> None:
        """As :meth:`Sweep.note`, under the lock :meth:`done` reads the result with: the
        exit handler may say it while the errand's thread looks."""
        with self._lock:
            super().note(xid, found, last)

    def done(self, reason: BaseException | None = None) -> None:
        """Say the result; the transactions not looked for yet are named as left for
        ``reason`` (or what stopped the errand, or the process's exit)."""
        with self._lock:
            if self._said:
                return
            self._said = True
            result = Sweep(self.pending, list(self.ended), list(self.left), self.looked)
        _RUNNING.discard(self)
        result.left += result.unlooked(reason or self.stopped or ProcessExiting())
        self._say(result)


#: the errands not done yet (a set: an errand removes itself when done)
_RUNNING: set[Errand] = set()


def start_thread(errand: Errand, target: Callable[[Errand], None]) -> None:
    """Run ``target(errand)`` in a daemon thread of its own: the process does not wait for
    it past :data:`EXIT_GRACE`."""
    # (a context of its own: none of the interrupted unit's, on any Python, free-threaded
    # builds included, whose threads may start with their creator's)
    errand.thread = threading.Thread(
        target=contextvars.Context().run,
        args=(target, errand),
        name="resilient_db: ending prepared transactions",
        daemon=True,
    )
    errand.thread.start()


def _at_exit() -> None:
    """Wait up to :data:`EXIT_GRACE` for the errands running in threads, then say each errand
    not done (a task's that its loop never finished too)."""
    ends = time.monotonic() + EXIT_GRACE
    for errand in list(_RUNNING):
        if errand.thread is not None:
            errand.thread.join(max(0.0, ends - time.monotonic()))
    for errand in list(_RUNNING):
        errand.done(ProcessExiting())


# (registered after logging's own exit handler, so it runs before logging shuts down)
atexit.register(_at_exit)
# a forked child has none of its parent's threads, and its parent's errands are the parent's
# to say (a worker forked by gunicorn would name them again at its own exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_RUNNING.clear)
