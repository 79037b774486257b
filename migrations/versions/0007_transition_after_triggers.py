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

import resilient_db as rdb

revision: str = "0007_transition_after_triggers"
down_revision: str | None = "0006_transition_bypass_audit"
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
    # Nothing: the triggers of version 4 enforce the same rules as those of version 3, on the
    # row as stored; 0001's downgrade removes the trigger.
    pass
