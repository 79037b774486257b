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

import resilient_db as rdb

revision: str = "0003_transition_bypass_role"
down_revision: str | None = "0002_commit_markers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The trigger of tasks.status as at this revision: the row key, the column and the rules this
# step installs, written here, not imported from the application (resilient_db.examples.tasks):
# a migration installs the rules it was written with, whatever the model holds when it runs (a
# fresh database replays every step; a later change of the rules or a renamed column comes with
# a migration of its own). A description, not a model: the application's process never maps
# the trigger's error back with it.
TASK_STATUS = rdb.transitions.TransitionTrigger(
    model="Task",  # the application's class, which the trigger's error names
    table="tasks",
    primary_key="id",
    type_=sa.String(20),
    rules=rdb.TransitionRules(
        column="status",
        transitions={
            "pending": {"in_progress", "cancelled"},
            "in_progress": {"completed", "failed", "pending"},
            "failed": {"pending"},
        },
        initial={"pending"},
    ),
)


def upgrade() -> None:
    rdb.install_transition_trigger(op, TASK_STATUS)


def downgrade() -> None:
    # Nothing: the earlier trigger let any role switch the guard off, and the role belongs to
    # the whole cluster (other databases may use it). 0001's downgrade removes the trigger.
    pass
