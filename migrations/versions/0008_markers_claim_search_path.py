"""commit markers, version 4: the claim's fixed search_path; pruning without DELETE

Revision ID: 0008_markers_claim_search_path
Revises: 0007_transition_after_triggers
Create Date: 2026-12-02

Installs the commit markers again (idempotent). ``resilient_db.claim_commit`` of version 3 ran
with the caller's search_path: a role that may create objects in a schema on it (``public`` on
many databases) could plant an operator the claim uses (``numeric * integer``) and have it run
with the caller's rights, a superuser's when an operator settled a unit by hand, or make the
claim's answer up (a committed unit replayed, or reported unknown). Version 4 pins it, as the
other two functions did. Its prune asks the login role's right to write markers instead of
``DELETE``, which no application role should hold (one that may delete a marker can make a
committed unit look uncommitted): revoke it from them after this step.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

import resilient_db as rdb

revision: str = "0008_markers_claim_search_path"
down_revision: str | None = "0007_transition_after_triggers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    rdb.install_commit_markers(op)


def downgrade() -> None:
    # Nothing: version 3 of the claim differs only in taking the caller's search_path, and
    # 0002's downgrade removes the markers.
    pass
