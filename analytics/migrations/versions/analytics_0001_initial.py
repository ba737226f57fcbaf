"""the analytics plugin's tables as of iotgw 0.1: running figures per device, sensor minutes

Revision ID: analytics_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import gateway.log

revision = "analytics_0001"
down_revision = None
branch_labels = ("analytics",)
depends_on = "0001"


def upgrade() -> None:
    op.create_table(
        "analytics_devices",
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("type", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("site", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("trips", sa.Integer(), nullable=False),
        sa.Column("floors", sa.Integer(), nullable=False),
        sa.Column("door_cycles", sa.Integer(), nullable=False),
        sa.Column("faults", sa.Integer(), nullable=False),
        sa.Column("faults_by_code", sa.JSON(), nullable=False),
        sa.Column("faults_cleared", sa.Integer(), nullable=False),
        sa.Column("fault_seconds", sa.Float(), nullable=False),
        sa.Column("entrapments", sa.Integer(), nullable=False),
        sa.Column("mode", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("mode_since", gateway.log.UTCDateTime(), nullable=True),
        sa.Column("mode_seconds", sa.JSON(), nullable=False),
        sa.Column("first_time", gateway.log.UTCDateTime(), nullable=True),
        sa.Column("last_time", gateway.log.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("device_id"),
    )
    with op.batch_alter_table("analytics_devices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_analytics_devices_site"), ["site"], unique=False)

    op.create_table(
        "analytics_sensor_minutes",
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("minute", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("vmin", sa.Float(), nullable=False),
        sa.Column("vmax", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "minute"),
    )


def downgrade() -> None:
    op.drop_table("analytics_sensor_minutes")
    with op.batch_alter_table("analytics_devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_analytics_devices_site"))

    op.drop_table("analytics_devices")
