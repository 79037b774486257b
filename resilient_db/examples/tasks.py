"""The example ``tasks`` schema: a status column guarded by transition rules, with history.

::

    pending ──> in_progress ──> completed
       │  ^          │
       │  └──────────┤ (released)
       │             v
       │          failed ──> pending (retried)
       v
    cancelled

Every change of ``Task.status`` is written together with a :class:`TaskHistory` row in the same
unit of work (:func:`create_task`, :func:`move_task`), keyed by the unit's idempotency key
(``idem_key``, unique). That makes each unit checkable afterwards: it is in the database exactly
once or not at all, and each task's history replays as a legal path to its current status.

The Alembic environment in ``migrations/`` creates these tables and installs the transition
trigger (:func:`resilient_db.install_transition_trigger`); ``resilient-db demo`` runs a
workload on them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import resilient_db as rdb

__all__ = [
    "INITIAL_STATUS",
    "STATUSES",
    "TASK_RULES",
    "TERMINAL_STATUSES",
    "Base",
    "Task",
    "TaskHistory",
    "create_task",
    "move_task",
]

#: The transition rules of :attr:`Task.status`.
TASK_RULES: Final = rdb.TransitionRules(
    column="status",
    transitions={
        "pending": {"in_progress", "cancelled"},
        "in_progress": {"completed", "failed", "pending"},
        "failed": {"pending"},
    },
    initial={"pending"},
)
INITIAL_STATUS: Final = "pending"
STATUSES: Final = tuple(sorted(TASK_RULES.declared_states, key=str))
TERMINAL_STATUSES: Final = frozenset(s for s in STATUSES if not TASK_RULES.next_states(s))

_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of the example schema (its own metadata, with a naming convention so
    Alembic migrations name constraints predictably)."""

    metadata = sa.MetaData(naming_convention=_NAMING)


class Task(Base):
    """A unit of work to be done; ``status`` follows :data:`TASK_RULES`."""

    __tablename__ = "tasks"
    __transitions__ = TASK_RULES
    __table_args__ = (sa.Index("ix_tasks_owner_status", "owner", "status"),)

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    #: idempotency key of the unit of work that created the task
    idem_key: Mapped[str] = mapped_column(sa.String(80), unique=True)
    title: Mapped[str] = mapped_column(sa.String(200))
    status: Mapped[str] = mapped_column(
        sa.String(20), default=INITIAL_STATUS, server_default=INITIAL_STATUS
    )
    owner: Mapped[str | None] = mapped_column(sa.String(40))
    created_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now(), onupdate=sa.func.now()
    )

    def __repr__(self) -> str:
        return f"<Task id={self.id} status={self.status!r}>"


class TaskHistory(Base):
    """One status change of a task, written in the same unit of work as the change."""

    __tablename__ = "task_history"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    task_id: Mapped[int] = mapped_column(
        sa.BigInteger, sa.ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    #: idempotency key of the unit of work that made the change
    idem_key: Mapped[str] = mapped_column(sa.String(80), unique=True)
    #: None for the row that created the task
    from_status: Mapped[str | None] = mapped_column(sa.String(20))
    to_status: Mapped[str] = mapped_column(sa.String(20))
    changed_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )

    task: Mapped[Task] = relationship(lazy="raise")

    def __repr__(self) -> str:
        return f"<TaskHistory task={self.task_id} {self.from_status!r} -> {self.to_status!r}>"


def create_task(session: Session, *, title: str, idem_key: str, owner: str | None = None) -> Task:
    """Add a new ``pending`` task and its first history row (keyed ``idem_key``)."""
    task = Task(idem_key=idem_key, title=title, status=INITIAL_STATUS, owner=owner)
    session.add(task)
    session.add(TaskHistory(task=task, idem_key=idem_key, from_status=None, to_status=task.status))
    return task


def move_task(session: Session, task: Task, to_status: str, *, idem_key: str) -> TaskHistory:
    """Move ``task`` to ``to_status`` and record the change under ``idem_key``.

    The transition guard checks the move when the session flushes (an illegal move raises
    :class:`resilient_db.IllegalTransitionError`); the history row is written in the same
    transaction, so both happen or neither does.
    """
    entry = TaskHistory(task=task, idem_key=idem_key, from_status=task.status, to_status=to_status)
    task.status = to_status
    session.add(entry)
    return entry
