"""commit markers: definite, round-trip-free verification of a COMMIT whose answer was lost

Revision ID: 0002_commit_markers
Revises: 0001_tasks
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

import resilient_db as rdb

revision: str = "0002_commit_markers"
down_revision: str | None = "0001_tasks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    rdb.install_commit_markers(op)


def downgrade() -> None:
    # (the markers, then their schema resilient_db when nothing else is in it: see
    # uninstall_commit_markers)
    rdb.uninstall_commit_markers(op)
