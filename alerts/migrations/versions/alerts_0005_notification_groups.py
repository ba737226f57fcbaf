"""notification groups: a receiver's group_by groups and what each last said

Revision ID: alerts_0005
Revises: alerts_0004
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import gateway.log

revision = "alerts_0005"
down_revision = "alerts_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notification_groups",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("receiver", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("open", sa.JSON(), nullable=False),
        sa.Column("sent_at", gateway.log.UTCDateTime(), nullable=True),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", gateway.log.UTCDateTime(), nullable=True),
        sa.Column("last_error", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_notification_groups_key", "notification_groups", ["receiver", "key"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_notification_groups_key", table_name="notification_groups")
    op.drop_table("notification_groups")
