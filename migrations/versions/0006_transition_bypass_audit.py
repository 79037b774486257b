"""transition trigger: every bypassed move written to the server log

Revision ID: 0006_transition_bypass_audit
Revises: 0005_commit_markers_prune_rights
Create Date: 2026-12-01

Installs the trigger of tasks.status again (generator version 3). The trigger of earlier
releases let a move through for a granted role's bypass without a trace on the database side:
the audit line was the application's, and a granted role that set the bypass value by hand in
SQL left none. Version 3 writes one ``LOG`` line per bypassed move to the server log (the row,
the move, the role in effect, the login role, the transaction and the reason given to
``bypass_transitions``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import DeclarativeBase, mapped_column

import resilient_db as rdb

revision: str = "0006_transition_bypass_audit"
down_revision: str | None = "0005_commit_markers_prune_rights"
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
    # Nothing: the trigger of version 2 enforces the same rules, without the log lines; 0001's
    # downgrade removes the trigger.
    pass
