"""commit markers, version 2: read-only transactions left alone, switched roles served

Revision ID: 0004_commit_markers_read_only
Revises: 0003_transition_bypass_role
Create Date: 2026-11-30

Installs the commit markers again (idempotent). A database migrated by an earlier release has a
``resilient_db.mark_commit`` that tries its INSERT in a read-only transaction holding an xid (one
that wrote only temporary tables), where the server refuses it, and that runs with the rights of
the role in effect, so a unit that switched roles (``SET LOCAL ROLE``) failed at COMMIT. The new
one runs as its owner and checks the login role's right to write markers itself; ``PUBLIC`` gets
``USAGE`` on the schema and ``EXECUTE`` on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

import resilient_db as rdb

revision: str = "0004_commit_markers_read_only"
down_revision: str | None = "0003_transition_bypass_role"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    rdb.install_commit_markers(op)


def downgrade() -> None:
    # Nothing: version 1 of the function differs only in failing those units, and 0002's
    # downgrade removes the markers (and the schema grant).
    pass
