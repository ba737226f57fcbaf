"""consumer cursors: when a replay was asked for (its timer is rebuilt up to then); deliveries: lanes, age; notifications: their event

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gateway.store

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("consumer_cursors", sa.Column("replay_at", gateway.store.UTCDateTime(), nullable=True))
    op.add_column("notification_deliveries", sa.Column("created_at", gateway.store.UTCDateTime(), nullable=True))
    op.add_column(
        "notifications",
        sa.Column("event_position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
    )
    op.create_index(
        "ix_notification_deliveries_lane", "notification_deliveries", ["status", "receiver", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_notification_deliveries_lane", table_name="notification_deliveries")
    op.drop_column("notifications", "event_position")
    op.drop_column("notification_deliveries", "created_at")
    op.drop_column("consumer_cursors", "replay_at")
