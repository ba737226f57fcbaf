"""replay ids: status; deliveries: lanes, age; notifications: event, person; work orders: who was paged

Revision ID: alerts_0003
Revises: alerts_0002
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import gateway.log

revision = "alerts_0003"
down_revision = "alerts_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("alert_replay_ids", sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.add_column("alert_replay_ids", sa.Column("resolved_at", gateway.log.UTCDateTime(), nullable=True))
    op.add_column("alert_replay_ids", sa.Column("taken", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("notification_deliveries", sa.Column("created_at", gateway.log.UTCDateTime(), nullable=True))
    op.add_column(
        "notifications",
        sa.Column("event_position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
    )
    op.add_column("notifications", sa.Column("person", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.add_column("work_orders", sa.Column("paged", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.add_column("work_orders", sa.Column("paged_contact", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.create_index(
        "ix_notification_deliveries_lane", "notification_deliveries", ["status", "receiver", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_notification_deliveries_lane", table_name="notification_deliveries")
    op.drop_column("work_orders", "paged_contact")
    op.drop_column("work_orders", "paged")
    op.drop_column("notifications", "person")
    op.drop_column("notifications", "event_position")
    op.drop_column("notification_deliveries", "created_at")
    op.drop_column("alert_replay_ids", "taken")
    op.drop_column("alert_replay_ids", "resolved_at")
    op.drop_column("alert_replay_ids", "status")
