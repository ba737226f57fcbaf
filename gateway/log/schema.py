"""The schema at start: the platform's Alembic revisions and every plugin's branch, a database from
before migrations completed, and the lock that makes gateways starting together take turns."""

from __future__ import annotations

import fcntl
import importlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    Connection,
    Engine,
    inspect,
)
from sqlmodel import SQLModel

from gateway.errors import StoreError

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
SCHEMA_LOCK = 0x696F74677722


def migrate_schema(conn: Connection) -> None:
    """Bring the schema to the newest revisions: the platform's (gateway/migrations) and every
    installed plugin's branch. A database made before migrations existed (tables, no
    alembic_version) is completed the old way (missing tables created, nullable columns added:
    which is all the revisions so far do) and marked as the newest revisions."""
    branches = _plugin_migrations()
    config = alembic_config(conn, branches)
    tables = set(inspect(conn).get_table_names())
    if tables & set(SQLModel.metadata.tables) and "alembic_version" not in tables:
        SQLModel.metadata.create_all(conn)
        _add_missing_columns(conn)
        alembic_command.stamp(config, "heads")
    elif "alembic_version" in tables:
        _refuse_unknown_revisions(conn, branches)
        _adopt_plugin_tables(conn, config, branches, tables)
    alembic_command.upgrade(config, "heads")


def _refuse_unknown_revisions(conn: Connection, branches: dict[str, Any]) -> None:
    """A database migrated by a plugin that is not installed here: say so in one line (Alembic
    alone says it cannot locate a revision, with a traceback, for every command)."""
    versions = {row[0] for row in conn.exec_driver_sql("SELECT version_num FROM alembic_version")}
    known = _revisions(MIGRATIONS / "versions").union(*(_revisions(files(name) / "versions") for name in branches))
    unknown = sorted(versions - known)
    if unknown:
        msg = (
            f"this database was migrated by plugins that are not installed here (revisions {', '.join(unknown)}): "
            "install them, or use another database"
        )
        raise StoreError(msg)


def alembic_config(conn: Connection, branches: dict[str, Any] | None = None) -> AlembicConfig:
    """Alembic's configuration on `conn`: the platform's revisions and every plugin branch's."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    branches = _plugin_migrations() if branches is None else branches
    locations = [str(MIGRATIONS / "versions"), *(str(files(pkg) / "versions") for pkg in branches)]
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", os.pathsep.join(locations))
    config.attributes["connection"] = conn
    return config


def _plugin_migrations() -> dict[str, Any]:
    """The installed plugins' migration packages (imported), by package name."""
    from gateway.plugins import plugin_classes  # noqa: PLC0415 - plugins load when the schema is made

    names = [cls.migrations for cls in plugin_classes().values() if cls.migrations]
    return {name: importlib.import_module(name) for name in names}


def _adopt_plugin_tables(conn: Connection, config: AlembicConfig, branches: dict[str, Any], tables: set[str]) -> None:
    """A database with a plugin's tables but no row of its branch (the tables came with the
    platform's revisions, or were created before the plugin had migrations): stamp that branch at
    the revision its tables are at (`ADOPTED_AT`, by the platform's revision), so its later
    revisions run and its first ones do not run again."""
    versions = {row[0] for row in conn.exec_driver_sql("SELECT version_num FROM alembic_version")}
    platform = versions & _revisions(MIGRATIONS / "versions")
    if len(platform) != 1:
        return
    (at,) = platform
    for name, module in branches.items():
        if versions & _revisions(files(name) / "versions"):
            continue  # the branch has its row: Alembic knows where it is
        adopted = getattr(module, "ADOPTED_AT", {}).get(at)
        if adopted and getattr(module, "ADOPTED_IF_TABLE", None) in tables:
            alembic_command.stamp(config, adopted)


def _revisions(folder: Any) -> set[str]:  # noqa: ANN401 - a Path or an importlib Traversable
    """The revision ids of the migration files in `folder`."""
    found = set()
    for item in folder.iterdir():
        if item.name.endswith(".py") and (m := re.search(r'^revision = "([^"]+)"', item.read_text(), re.M)):
            found.add(m.group(1))
    return found


def _add_missing_columns(conn: Connection) -> None:
    """Add the nullable columns later pre-migration versions brought to tables an older one created."""
    existing = inspect(conn)
    for table in SQLModel.metadata.sorted_tables:
        if not existing.has_table(table.name):
            continue
        have = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable:
                msg = f"table {table.name} lacks column {column.name}: this database needs a migration"
                raise StoreError(msg)
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")


@contextmanager
def sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """On an SQLite file, an exclusive flock on `<file>.schema-lock` while the schema is migrated:
    gateways starting together take turns. (Not on the database file itself: closing any
    descriptor of it would drop SQLite's own POSIX locks held by this process.)"""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    with Path(f"{path}.schema-lock").open("ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
