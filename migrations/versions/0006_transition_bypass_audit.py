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

import resilient_db as rdb

revision: str = "0006_transition_bypass_audit"
down_revision: str | None = "0005_commit_markers_prune_rights"
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
    # Nothing: the trigger of version 2 enforces the same rules, without the log lines; 0001's
    # downgrade removes the trigger.
    pass
