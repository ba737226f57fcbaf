"""The store: one transaction per batch, idempotent appends, shadows that survive a restart."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command as alembic_command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlmodel import SQLModel

from gateway.core.events import Event
from gateway.core.normalize import Shadow
from gateway.errors import ConfigError, StoreError
from gateway.log import (
    DeadLetter,
    EventQuery,
    Store,
    alembic_config,
    append_event,
    list_dead_letters,
    list_events,
    read_events,
    write_gate,
)

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def ev(device: str, seq: int, part: int = 0, etype: str = "sensor.reading") -> Event:
    return Event(
        id=f"{device}-{seq}-{part}", source=f"devices/{device}", type=etype, time=NOW, subject=device,
        data={"value": seq}, sequence=seq, part=part, site="hq",
    )  # fmt: skip


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()


def test_redelivered_events_are_stored_once(store: Store) -> None:
    first = store.append_batch([ev("a", 1), ev("a", 2), ev("a", 2, part=1)], [], [], now=NOW)
    again = store.append_batch([ev("a", 2), ev("a", 3)], [], [], now=NOW)
    assert (first.events_inserted, first.events_skipped) == (3, 0)
    assert (again.events_inserted, again.events_skipped) == (1, 1)
    rows = list_events(store, EventQuery(limit=100))
    assert [(r.subject, r.sequence, r.part) for r in rows] == [("a", 1, 0), ("a", 2, 0), ("a", 2, 1), ("a", 3, 0)]
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert rows[0].time == NOW  # time zones survive the round trip


def test_shadows_are_upserted_and_reloaded(store: Store, make_store: Callable[[], Store]) -> None:
    store.append_batch([], [Shadow("a", type="elevator", last_seq=1, online=True, state={"floor": 1})], [], now=NOW)
    store.append_batch([], [Shadow("a", type="elevator", last_seq=7, online=False, state={"floor": 4})], [], now=NOW)
    store.close()
    reopened = make_store()
    shadows = reopened.load_shadows()
    assert shadows["a"].last_seq == 7
    assert shadows["a"].state == {"floor": 4}
    assert shadows["a"].online is False


def test_dead_letters_keep_the_exact_bytes(store: Store) -> None:
    raw = b"\xff\x00 not json"
    store.append_batch([], [], [DeadLetter("devices/x/state", "not_utf8", "byte 0", raw, NOW)], now=NOW)
    (row,) = list_dead_letters(store)
    assert base64.b64decode(row.payload_b64) == raw
    assert (row.reason, row.size) == ("not_utf8", len(raw))


def test_event_filters_and_prefix_types(store: Store) -> None:
    store.append_batch(
        [ev("a", 1, etype="elevator.door.opened"), ev("a", 2, etype="elevator.door.closed"), ev("b", 1)],
        [],
        [],
        now=NOW,
    )
    assert len(list_events(store, EventQuery(type="elevator.*"))) == 2
    assert len(list_events(store, EventQuery(device_id="b"))) == 1
    assert list_events(store, EventQuery(after=2))[0].subject == "b"


def test_unwritable_database_raises_store_error(store: Store) -> None:
    with store.engine.connect() as conn:
        conn.exec_driver_sql("DROP TABLE events")
        conn.commit()
    with pytest.raises(StoreError):
        store.append_batch([ev("a", 1)], [], [], now=NOW)


def test_unsupported_database_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unsupported database_url"):
        Store("mysql://localhost/x")


def test_an_older_database_gains_the_new_nullable_columns_at_start(tmp_path: Path) -> None:
    import sqlite3  # noqa: PLC0415

    import alerts.engine  # noqa: F401, PLC0415 - its tables are part of the schema

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the outbox as the first release created it
        conn.execute(
            "create table notifications (id integer primary key, key varchar not null unique,"
            " alert_id integer not null, transition_id integer not null, status varchar not null,"
            " created_at datetime not null, fanned_out boolean not null)"
        )
        conn.execute("insert into notifications values (1, 'k', 1, 1, 'firing', '2026-11-01 00:00:00', 0)")
    Store(f"sqlite:///{db}").create_schema()
    with sqlite3.connect(db) as conn:
        columns = [row[1] for row in conn.execute("pragma table_info(notifications)")]
        kept = conn.execute("select key, receiver from notifications").fetchall()
    assert columns[-5:] == ["work_order_id", "entry_id", "receiver", "person", "event_position"]
    assert kept == [("k", None)]


def test_log_positions_follow_commit_order_so_a_reader_never_skips_a_late_commit(store: Store) -> None:
    """Writer A appends and keeps its transaction open; writer B's batch must wait for A's commit.

    Otherwise (PostgreSQL without the append lock) B's later id commits first, a consumer reads it
    and moves its cursor past A's earlier id, which then commits and is never read."""
    a_appended, release_a = threading.Event(), threading.Event()

    def writer_a() -> None:
        with store.session() as tx:
            append_event(tx, ce_id="a", source="test", type="test.a", subject="a", time=NOW, site=None, data={})
            tx.flush()
            a_appended.set()
            release_a.wait(10)
            tx.commit()

    a = threading.Thread(target=writer_a)
    a.start()
    assert a_appended.wait(10)
    b = threading.Thread(target=store.append_batch, args=([ev("b", 1)], [], []), kwargs={"now": NOW})
    b.start()
    b.join(0.5)
    assert b.is_alive(), "B committed while A, which appended first, was still open"
    with store.session() as tx:
        assert read_events(tx, 0, 10**9) == [], "nothing is visible before A commits"
    release_a.set()
    a.join(10)
    b.join(10)
    with store.session() as tx:
        order = [e.subject for e in read_events(tx, 0, 10**9)]
    assert order == ["a", "b"]


def heads(conn: Connection) -> set[str]:
    """The newest revision of every branch: the platform's and each installed plugin's."""
    return set(ScriptDirectory.from_config(alembic_config(conn)).get_heads())


def versions(conn: Connection) -> set[str]:
    return {r[0] for r in conn.exec_driver_sql("select version_num from alembic_version")}


def test_migrations_build_exactly_the_schema_the_code_describes(store: Store) -> None:
    with store.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        assert versions(conn) == heads(conn) == {"0004", "alerts_0006", "analytics_0001"}
    assert differences == []
    store.create_schema()  # a second start changes nothing
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_a_database_from_before_migrations_is_completed_and_marked(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'pre.db'}"
    old = Store(db)
    SQLModel.metadata.create_all(old.engine)  # how versions before migrations made the schema
    old.append_batch([ev("d", 1)], [], [], now=NOW)
    old.close()
    store = Store(db)
    store.create_schema()
    with store.engine.connect() as conn:
        assert versions(conn) == heads(conn)
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    assert store.count_events() == 1
    store.close()


@pytest.mark.parametrize(("platform", "alerts"), [("0004", "alerts_0003"), ("0003", "alerts_0002")])
def test_a_database_migrated_before_the_plugins_had_branches_is_adopted_and_upgraded(
    store: Store, platform: str, alerts: str
) -> None:
    """Before its split the platform's revisions made the plugins' tables too, and alembic_version
    held one row. Such a database (made here by downgrading the alerts branch to the state that
    platform revision left) gets the plugins' branches stamped where their tables are, and upgrades."""
    store.append_batch([ev("d", 1)], [], [], now=NOW)
    with store.engine.begin() as conn:
        alembic_command.downgrade(alembic_config(conn), alerts)
        conn.exec_driver_sql("delete from alembic_version")
        conn.execute(text("insert into alembic_version (version_num) values (:v)"), {"v": platform})
    store.create_schema()
    with store.engine.connect() as conn:
        assert versions(conn) == heads(conn)
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    assert store.count_events() == 1


def test_a_large_batch_keeps_its_order_and_skips_only_what_was_stored(store: Store) -> None:
    """Rows go in multi-row statements of up to 256: 700 events and 300 devices cross every chunk size."""
    store.append_batch([ev("d0007", s) for s in range(1, 51)], [], [], now=NOW)
    batch = [ev(f"d{i % 300:04d}", i // 300 + 1) for i in range(700)]
    shadows = [Shadow(f"d{i:04d}", type="temperature", last_seq=i, online=True, state={"v": i}) for i in range(300)]
    stored = store.append_batch(batch, shadows, [], now=NOW)
    already = {("d0007", s) for s in range(1, 51)}
    fresh = [e for e in batch if (e.subject, e.sequence) not in already]
    assert (stored.events_inserted, stored.events_skipped) == (len(fresh), len(batch) - len(fresh))
    rows = list_events(store, EventQuery(limit=1000))
    new = sorted((r for r in rows if r.id > 50), key=lambda r: r.id)
    assert [(r.subject, r.sequence) for r in new] == [(e.subject, e.sequence) for e in fresh]
    reloaded = store.load_shadows()
    assert len(reloaded) == 300
    assert reloaded["d0299"].last_seq == 299
    assert reloaded["d0000"].state == {"v": 0}


def test_sqlite_writers_in_one_process_queue_for_the_write_lock_and_get_it_at_once(tmp_path: Path) -> None:
    """The gate (SQLite's, in both passes): a write transaction holds it until its commit or
    rollback, also after a failed statement; another writer of the process waits, then goes on."""
    store = Store(f"sqlite:///{tmp_path / 'gate.db'}")
    store.create_schema()
    gate = write_gate(str(tmp_path / "gate.db"))
    with store.session(consumer=True) as tx:
        tx.connection().exec_driver_sql("INSERT INTO leases (name, epoch) VALUES ('held', 1)")
        assert gate.locked()
        other = threading.Thread(target=store.append_batch, args=([ev("b", 1)], [], []), kwargs={"now": NOW})
        other.start()
        other.join(0.3)
        assert other.is_alive(), "another writer went on while a write transaction was open"
        tx.rollback()
    other.join(10)
    assert not other.is_alive()
    assert not gate.locked()
    assert [e.subject for e in list_events(store, EventQuery(limit=10))] == ["b"]

    def insert_twice() -> None:
        with store.session(consumer=True) as tx:
            conn = tx.connection()
            conn.exec_driver_sql("INSERT INTO leases (name, epoch) VALUES ('twice', 1)")
            conn.exec_driver_sql("INSERT INTO leases (name, epoch) VALUES ('twice', 1)")  # fails

    with pytest.raises(StoreError, match="UNIQUE"):
        insert_twice()
    assert not gate.locked(), "the gate outlived the transaction"
    with store.session() as tx:
        tx.connection().exec_driver_sql("SELECT count(*) FROM events").fetchall()  # a read takes no gate
        assert not gate.locked()
    store.close()


def test_a_plugin_that_gains_migrations_adopts_the_tables_it_had_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third-party plugin first shipped without migrations (its table created at start), then with
    a branch whose first revision makes that table: the branch is stamped, not run again."""
    (tmp_path / "adopting_plugin.py").write_text(
        "from sqlmodel import Field, SQLModel\nfrom gateway.plugins import Plugin\n\n"
        "class AdoptedRow(SQLModel, table=True):\n    __tablename__ = 'adopted_rows'\n"
        "    id: int | None = Field(default=None, primary_key=True)\n\n"
        "class Adopting(Plugin):\n    name = 'adopting'\n"
    )
    info = tmp_path / "adopting_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: adopting-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[iotgw.plugins]\nadopting = adopting_plugin:Adopting\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    db = f"sqlite:///{tmp_path / 'adopt.db'}"
    first = Store(db)
    first.create_schema()  # version 1 of the plugin: no migrations, the table created at start
    first.close()
    versions_dir = tmp_path / "adopting_migrations" / "versions"
    versions_dir.mkdir(parents=True)
    (tmp_path / "adopting_migrations" / "__init__.py").write_text(
        "ADOPTED_AT = {'0004': 'adopting_0001'}\nADOPTED_IF_TABLE = 'adopted_rows'\n"
    )
    (versions_dir / "adopting_0001.py").write_text(
        "import sqlalchemy as sa\nfrom alembic import op\n\nrevision = 'adopting_0001'\ndown_revision = None\n"
        "branch_labels = ('adopting',)\ndepends_on = '0001'\n\n"
        "def upgrade():\n    op.create_table('adopted_rows', sa.Column('id', sa.Integer(), primary_key=True))\n\n"
        "def downgrade():\n    op.drop_table('adopted_rows')\n"
    )
    import adopting_plugin  # type: ignore[import-not-found]  # noqa: PLC0415

    monkeypatch.setattr(adopting_plugin.Adopting, "migrations", "adopting_migrations")  # version 2
    second = Store(db)
    second.create_schema()  # not "table adopted_rows already exists"
    with second.engine.connect() as conn:
        assert "adopting_0001" in versions(conn)
        assert versions(conn) == heads(conn)
    second.close()


def test_a_database_migrated_by_a_plugin_not_installed_here_is_refused_in_one_line(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("insert into alembic_version (version_num) values (:v)"), {"v": "doorwatch_0001"})
    with pytest.raises(StoreError, match=r"plugins that are not installed here \(revisions doorwatch_0001\)"):
        store.create_schema()
