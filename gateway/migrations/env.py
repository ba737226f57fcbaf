"""Alembic environment: migrations run inside `Store.create_schema`, on the connection it passes."""

from __future__ import annotations

import logging

from alembic import context
from sqlmodel import SQLModel

import gateway.log

# The platform's tables, and the plugins' and consumers' (their modules define them): the
# migrations compare against all of them.
import gateway.security
from gateway.plugins import plugin_classes
from gateway.runtime import available_consumers

plugin_classes()
for name, load in available_consumers().items():
    try:
        load()
    except Exception as exc:
        logging.getLogger(__name__).warning("consumer %s could not be loaded: %s", name, exc)

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters a table by copying it, which Alembic's batch mode does.
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
