"""The SQL an engine hands its driver, as sent: for asserting what a guard did (and did not) do.

SQLAlchemy's ``before_cursor_execute`` sees a statement before the dialect's ``do_execute``
listeners, and the flush guard's listener sends the flush's UPDATE with its compare-and-set
added; so this records at the dialect's ``do_execute`` methods, which both call. It replaces
them on the engine's dialect instance (test code only) and puts them back on ``stop()``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

_METHODS = ("do_execute", "do_executemany", "do_execute_no_params")


class Sent:
    """Statements sent through ``engine`` (sync, or an AsyncEngine's sync engine)."""

    def __init__(self, engine: Any) -> None:
        sync = engine.sync_engine if hasattr(engine, "sync_engine") else engine
        assert isinstance(sync, sa.Engine)
        self.dialect = sync.dialect
        #: (statement with whitespace collapsed, whether sent as executemany)
        self.sent: list[tuple[str, bool]] = []
        for name in _METHODS:
            original = getattr(self.dialect, name)
            setattr(self.dialect, name, self._recording(original, many=name == "do_executemany"))

    def _recording(self, original: Any, *, many: bool) -> Any:
        def record(cursor: Any, statement: str, *args: Any) -> Any:
            self.sent.append((" ".join(statement.split()), many))
            return original(cursor, statement, *args)

        return record

    @property
    def sql(self) -> list[str]:
        return [statement for statement, _ in self.sent]

    def matching(self, prefix: str) -> list[str]:
        return [s for s in self.sql if s.upper().startswith(prefix)]

    def stop(self) -> None:
        for name in _METHODS:
            self.dialect.__dict__.pop(name, None)
