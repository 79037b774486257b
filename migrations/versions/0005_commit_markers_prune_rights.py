"""commit markers, version 3: pruning needs no UPDATE right of the application role

Revision ID: 0005_commit_markers_prune_rights
Revises: 0004_commit_markers_read_only
Create Date: 2026-12-01

Installs the commit markers again (idempotent). ``resilient_db.prune_commit_markers`` of version
2 ran with the caller's rights, and its ``FOR UPDATE SKIP LOCKED`` needs ``UPDATE`` on the table:
an application role with the documented grants (``SELECT``, ``INSERT``, ``DELETE``) could never
prune, and the table grew for as long as the application ran. Version 3 runs as its owner and
checks the login role's ``DELETE`` right itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

import resilient_db as rdb

revision: str = "0005_commit_markers_prune_rights"
down_revision: str | None = "0004_commit_markers_read_only"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    rdb.install_commit_markers(op)


def downgrade() -> None:
    # Nothing: version 2 of the function differs only in failing those prunes, and 0002's
    # downgrade removes the markers.
    pass
