"""transition trigger: bypass only for roles granted resilient_db_bypass, per transaction

Revision ID: 0003_transition_bypass_role
Revises: 0002_commit_markers
Create Date: 2026-11-30

Installs the trigger of tasks.status again: a database migrated by an earlier release has a
trigger that honours the bypass setting for any role that sets it. The install creates the role
``resilient_db_bypass`` (NOLOGIN, no members) when it is missing and the migrating role may
create roles; otherwise it warns, and every bypass is refused until an administrator creates it.
Grant it to the roles that may bypass: ``GRANT resilient_db_bypass TO admin_role``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import DeclarativeBase, mapped_column

import resilient_db as rdb

revision: str = "0003_transition_bypass_role"
down_revision: str | None = "0002_commit_markers"
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
    # Nothing: the earlier trigger let any role switch the guard off, and the role belongs to
    # the whole cluster (other databases may use it). 0001's downgrade removes the trigger.
    pass
