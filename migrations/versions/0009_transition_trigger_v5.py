"""transition trigger v5: one trigger per table and column, INSERT trigger only for rows to check

Revision ID: 0009_transition_trigger_v5
Revises: 0008_markers_claim_search_path
Create Date: 2026-12-02

Installs the trigger of tasks.status again (generator version 5). The stamp of earlier releases
named the model, so the classes of one table (single-table inheritance, two models of one
table) guarding a column by the same rules replaced each other's trigger at every install, and
each saw the other's as drift. Version 5's stamp identifies the table, the column and the rules.
The INSERT trigger fires only WHEN the new row is not in an initial state: an AFTER row trigger
queues an event (kept in memory to the statement's end) for every row it fires for, and a bulk
INSERT of rows starting in an initial state now queues none. The install also drops our triggers
left on the table for a column it no longer has (renamed or dropped: their function reads a
column that is gone), with their functions; ours of a column that exists are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import resilient_db as rdb

revision: str = "0009_transition_trigger_v5"
down_revision: str | None = "0008_markers_claim_search_path"
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
    # Nothing: the trigger of version 5 enforces the same rules as that of version 4; 0001's
    # downgrade removes the trigger.
    pass
