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

from alembic import op

import resilient_db as rdb
from resilient_db.examples.tasks import Task

revision: str = "0006_transition_bypass_audit"
down_revision: str | None = "0005_commit_markers_prune_rights"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    rdb.install_transition_trigger(op, Task)


def downgrade() -> None:
    # Nothing: the trigger of version 2 enforces the same rules, without the log lines; 0001's
    # downgrade removes the trigger.
    pass
