"""tasks and task_history tables, with the transition trigger on tasks.status

Revision ID: 0001_tasks
Revises:
Create Date: 2025-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import resilient_db as rdb

revision: str = "0001_tasks"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The trigger of tasks.status as at this revision: the row key, the column and the rules this
# step installs, written here, not imported from the application (resilient_db.examples.tasks):
# a migration installs the rules it was written with, whatever the model holds when it runs (a
# fresh database replays every step; a later change of the rules or a renamed column comes with
# a migration of its own). A description, not a model: the application's process never maps
# the trigger's error back with it.
TASK_STATUS = rdb.transitions.TransitionTrigger(
    model="Task",  # the application's class, which the trigger's error names
    table="tasks",
    primary_key="id",
    type_=sa.String(20),
    rules=rdb.TransitionRules(
        column="status",
        transitions={
            "pending": {"in_progress", "cancelled"},
            "in_progress": {"completed", "failed", "pending"},
            "failed": {"pending"},
        },
        initial={"pending"},
    ),
)


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("idem_key", sa.String(80), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), server_default="pending", nullable=False),
        sa.Column("owner", sa.String(40), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("idem_key", name=op.f("uq_tasks_idem_key")),
    )
    op.create_index("ix_tasks_owner_status", "tasks", ["owner", "status"])
    op.create_table(
        "task_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("idem_key", sa.String(80), nullable=False),
        sa.Column("from_status", sa.String(20), nullable=True),
        sa.Column("to_status", sa.String(20), nullable=False),
        sa.Column(
            "changed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
            name=op.f("fk_task_history_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_history")),
        sa.UniqueConstraint("idem_key", name=op.f("uq_task_history_idem_key")),
    )
    op.create_index(op.f("ix_task_history_task_id"), "task_history", ["task_id"])
    # The database enforces the same rules as the session guards, for every other writer.
    rdb.install_transition_trigger(op, TASK_STATUS)


def downgrade() -> None:
    # The triggers and their function; the role resilient_db_bypass the install creates when
    # missing stays: it belongs to the whole cluster (other databases' triggers look it up, and
    # its grants are an administrator's), not to this database.
    rdb.uninstall_transition_trigger(op, TASK_STATUS)
    op.drop_index(op.f("ix_task_history_task_id"), table_name="task_history")
    op.drop_table("task_history")
    op.drop_index("ix_tasks_owner_status", table_name="tasks")
    op.drop_table("tasks")
