"""broker sessions: which persistent sessions the gateway holds; devices' seq base (counter resets)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import gateway.log

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broker_sessions",
        sa.Column("client_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("broker", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("since", gateway.log.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("client_id", "broker"),
    )
    op.add_column("devices", sa.Column("seq_base", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True))
    op.add_column(
        "consumer_cursors",
        sa.Column("replay_until", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("consumer_cursors", "replay_until")
    op.drop_column("devices", "seq_base")
    op.drop_table("broker_sessions")
