"""silences: a recurring schedule (maintenance windows)

Revision ID: alerts_0004
Revises: alerts_0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "alerts_0004"
down_revision = "alerts_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("silences", sa.Column("schedule", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("silences", "schedule")
