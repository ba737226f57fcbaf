"""consumer cursors: when a replay was asked for (its timer is rebuilt up to then)

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


def downgrade() -> None:
    op.drop_column("consumer_cursors", "replay_at")
