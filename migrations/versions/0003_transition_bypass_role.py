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

from alembic import op

import resilient_db as rdb
from resilient_db.examples.tasks import Task

revision: str = "0003_transition_bypass_role"
down_revision: str | None = "0002_commit_markers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    rdb.install_transition_trigger(op, Task)


def downgrade() -> None:
    # Nothing: the earlier trigger let any role switch the guard off, and the role belongs to
    # the whole cluster (other databases may use it). 0001's downgrade removes the trigger.
    pass
