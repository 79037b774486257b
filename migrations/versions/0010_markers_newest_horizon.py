"""commit markers, version 5: ages judged against the newest marker, not a server's clock

Revision ID: 0010_markers_newest_horizon
Revises: 0009_transition_trigger_v5
Create Date: 2026-12-03

Installs the commit markers again (idempotent). Version 4's prune deleted markers older than
15 minutes by the clock of the server it ran on, and its claim judged a missing marker by the
clock of the server it ran on: after a failover between servers whose clocks disagree by more
than five minutes (or one server's clock stepped back), a claim could take a marker the prune
had deleted for one never written and fence it, and a committed unit whose COMMIT answer was
lost was run again (written twice). Version 5 judges both by the markers themselves (their ids
carry the clients' times, and the newest marker only grows): a pruned marker is always too old
to be judged. Its prune also waits for no synchronous standby (one that is down held the unit
whose COMMIT ran the prune) and does nothing on a hot standby (a read/write split's follower).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

import resilient_db as rdb

revision: str = "0010_markers_newest_horizon"
down_revision: str | None = "0009_transition_trigger_v5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    rdb.install_commit_markers(op)


def downgrade() -> None:
    # Nothing: version 4's functions judged by a server's clock (unsound across a failover),
    # and 0002's downgrade removes the markers.
    pass
