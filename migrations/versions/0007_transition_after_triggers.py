"""transition trigger: AFTER row triggers, which check the row as stored

Revision ID: 0007_transition_after_triggers
Revises: 0006_transition_bypass_audit
Create Date: 2026-12-02

Installs the trigger of tasks.status again (generator version 4). The triggers of earlier
releases ran BEFORE INSERT / BEFORE UPDATE: PostgreSQL fires the BEFORE row triggers of an event
in name order, so another BEFORE trigger of the table that sets the status and sorts after
``rdb_transition_...`` moved the row to a state the guard never saw. Version 4's triggers run
AFTER INSERT / AFTER UPDATE (the update one still only when the status changed) and check the row
as it was stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import DeclarativeBase, mapped_column

import resilient_db as rdb

revision: str = "0007_transition_after_triggers"
down_revision: str | None = "0006_transition_bypass_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


class Base(DeclarativeBase):
    """This migration's own models: a registry of their own, never the application's."""


class Task(Base):
    """``tasks`` as at this revision, as far as the trigger reads it: the row key, and the status
    column with the rules this step installs. Declared here, not imported from the application
    (``resilient_db.examples.tasks``): a migration installs the rules it was written with,
    whatever the model holds when it runs (a fresh database replays every step; a later change
    of the rules or a renamed column comes with a migration of its own)."""

    __tablename__ = "tasks"
    __transitions__ = rdb.TransitionRules(
        column="status",
        transitions={
            "pending": {"in_progress", "cancelled"},
            "in_progress": {"completed", "failed", "pending"},
            "failed": {"pending"},
        },
        initial={"pending"},
    )

    # No Mapped[...] annotations: Alembic loads a migration as a module outside sys.modules,
    # where SQLAlchemy can't resolve the string annotations of `from __future__ import
    # annotations`.
    id = mapped_column(sa.BigInteger, primary_key=True)
    status = mapped_column(sa.String(20), nullable=False, server_default="pending")


def upgrade() -> None:
    rdb.install_transition_trigger(op, Task)


def downgrade() -> None:
    # Nothing: the triggers of version 4 enforce the same rules as those of version 3, on the
    # row as stored; 0001's downgrade removes the trigger.
    pass
