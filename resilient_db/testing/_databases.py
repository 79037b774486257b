"""Fresh databases for the ``pg_database`` fixture, made one ahead.

A ``CREATE DATABASE`` copies its template, a tenth to a third of a second on a small machine:
with a database per test that was most of a quick test's time. :class:`DatabaseSpares` makes
the next test's database in a thread of its own while a test runs, so a test takes one made
while the previous one ran. Only for servers the harness owns; paused while a test stops,
crashes or restarts the server (``server_control``); a failed step is left to the next test,
never retried in a loop. Used databases are dropped at once, in the test's teardown: a ``DROP
DATABASE`` forces a checkpoint, which must not land in the middle of another test (the commit
verification's fallback takes a checkpoint since the COMMIT for a possible crash recovery).
(No library does this: it is one thread and one statement.)
"""

from __future__ import annotations

import re
import threading
import uuid

from ._server import PostgresServer

__all__ = ["DatabaseSpares", "database_name"]

_WAIT = 60.0  # seconds: longest a test waits for a database being made, or for a pause


def database_name(label: str) -> str:
    """A new database name made of ``label`` (a test's name) and a random part."""
    slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")[:40]
    return f"t_{slug}_{uuid.uuid4().hex[:10]}"


class DatabaseSpares:
    """One spare database made ahead, in a background thread."""

    def __init__(self, server: PostgresServer, *, label: str = "spare") -> None:
        self._server = server
        self._label = label  # of the spares' names
        self._cond = threading.Condition()
        self._spare: str | None = None
        self._making = False  # the thread is creating the spare
        self._paused = 0
        self._stalled = False  # the last spare could not be made: wait for the next take
        self.error: Exception | None = None  # why, for whoever debugs the harness
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="resilient_db-test-databases", daemon=True
        )
        self._thread.start()

    def take(self, label: str) -> str:
        """A fresh database: the spare (waiting for it when it is being made), or a new one."""
        with self._cond:
            if self._making:
                self._cond.wait_for(lambda: not self._making, _WAIT)
            spare, self._spare = self._spare, None
            self._stalled = False
            self._cond.notify_all()
        if spare is not None:
            return spare
        name = database_name(label)
        self._server.ensure_running()
        self._server.create_database(name)
        return name

    def give_back(self, name: str) -> None:
        """A test is done with ``name``: dropped now (see the module's doc)."""
        self._server.drop_database(name)

    def pause(self) -> None:
        """No database made until :meth:`resume` (one being made is waited for)."""
        with self._cond:
            self._paused += 1
            self._cond.wait_for(lambda: not self._making, _WAIT)

    def resume(self) -> None:
        with self._cond:
            self._paused = max(0, self._paused - 1)
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        """Whether no database is made now (between :meth:`pause` and :meth:`resume`)."""
        with self._cond:
            return self._paused > 0

    def close(self) -> None:
        """Stop the thread; a spare not taken stays (it goes with the server)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(_WAIT)

    # -- the thread ---------------------------------------------------------------------------
    def _wanted(self) -> bool:
        return not (self._paused or self._stalled or self._spare is not None)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._wanted())
                if self._closed:
                    return
                name = database_name(self._label)
                self._making = True
            try:
                self._server.create_database(name)
                error = None
            except Exception as exc:  # the next test makes its own; error kept for debugging
                error = exc
            with self._cond:
                self._making = False
                if error is None:
                    self._spare = name
                self._stalled, self.error = error is not None, error
                self._cond.notify_all()
