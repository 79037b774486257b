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

from alembic import op

import resilient_db as rdb
from resilient_db.examples.tasks import Task

revision: str = "0007_transition_after_triggers"
down_revision: str | None = "0006_transition_bypass_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    rdb.install_transition_trigger(op, Task)


def downgrade() -> None:
    # Nothing: the triggers of version 4 enforce the same rules as those of version 3, on the
    # row as stored; 0001's downgrade removes the trigger.
    pass
