"""Alembic environment: migrations run inside `Store.create_schema`, on the connection it passes."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

# The core tables; consumers from other packages may add their own (created, not migrated).
import alerts.dispatch
import alerts.engine
import gateway.analytics
import gateway.security
import gateway.store

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters a table by copying it, which Alembic's batch mode does.
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
