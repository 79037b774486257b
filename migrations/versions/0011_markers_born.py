"""commit markers, version 6: a claim of a marker older than the table answers unknown

Revision ID: 0011_markers_born
Revises: 0010_markers_newest_horizon
Create Date: 2026-12-04

Installs the commit markers again (idempotent). Version 5's claim took a marker missing from
the table for one never written: when the markers were uninstalled and installed again (an
``alembic downgrade`` and ``upgrade``, ``DROP SCHEMA resilient_db CASCADE`` and an install)
while a unit's lost COMMIT answer awaited its check, the unit's marker had gone with the old
table, the claim fenced it and answered "not committed", and the committed unit ran again
(written twice). Version 6 records when the table was made (``commit_markers_born``) and
answers unknown for a marker written before that.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

import resilient_db as rdb

revision: str = "0011_markers_born"
down_revision: str | None = "0010_markers_newest_horizon"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    rdb.install_commit_markers(op)


def downgrade() -> None:
    # Nothing: version 5's claim could replay a committed unit after a reinstall, and 0002's
    # downgrade removes the markers (the table of version 6 with them).
    pass
