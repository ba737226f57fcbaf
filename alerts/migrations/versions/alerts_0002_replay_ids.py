"""alert ids kept across a replay

Revision ID: alerts_0002
Revises: alerts_0001
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import gateway.log

revision = "alerts_0002"
down_revision = "alerts_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_replay_ids",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rule", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("fired_at", gateway.log.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_alert_replay_ids_key", "alert_replay_ids", ["rule", "device_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_alert_replay_ids_key", table_name="alert_replay_ids")
    op.drop_table("alert_replay_ids")
