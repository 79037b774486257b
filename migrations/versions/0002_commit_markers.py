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


# The schema the markers were in (the install creates it when missing), dropped when nothing
# else is in it: a table or function of the application's put there keeps it, and a warning
# names what is left (PostgreSQL's detail), instead of failing the downgrade.
DROP_SCHEMA_IF_EMPTY = """\
DO $rdb$
DECLARE
    v_detail text;
BEGIN
    DROP SCHEMA IF EXISTS resilient_db;
EXCEPTION
    WHEN dependent_objects_still_exist THEN
        GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
        RAISE WARNING USING
            MESSAGE = 'schema resilient_db is kept: it holds objects other than the commit markers',
            DETAIL = v_detail;
END
$rdb$"""


def downgrade() -> None:
    rdb.uninstall_commit_markers(op)
    op.execute(DROP_SCHEMA_IF_EMPTY)
