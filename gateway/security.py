"""Security: device credentials in Mosquitto's password file, the device registry, API keys and the audit trail.

The broker authenticates devices (`mosquitto.conf`: `allow_anonymous false`, `password_file`,
`acl_file`); this module writes the password file with Mosquitto's own `mosquitto_passwd` (the
hash format stays Mosquitto's business) and signals the broker to reload it. API keys are
random, shown once, and stored as SHA-256 hashes (they are 192-bit random secrets, so a slow
password hash buys nothing); presented keys are compared in constant time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Column, String
from sqlmodel import Field, SQLModel, col, select

from gateway.core.clock import utcnow
from gateway.core.protocol import DEVICE_ID_RE
from gateway.errors import BrokerError, ConfigError, ReservedNameError
from gateway.log import Store, UTCDateTime, upsert

ROLES = ("viewer", "technician", "admin")  # each role may do what the ones before it may
KEY_PREFIX = "iotgw_"
_KEY_RE = re.compile(r"^iotgw_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")


def _dt_field(*, nullable: bool = True, index: bool = False) -> datetime | None:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))  # type: ignore[no-any-return]


class RegisteredDeviceRow(SQLModel, table=True):
    """A provisioned device (revoked ones keep their row, with `revoked_at`)."""

    __tablename__ = "registered_devices"

    device_id: str = Field(sa_column=Column(String(64), primary_key=True))
    type: str | None = None
    created_at: datetime | None = _dt_field(nullable=False)
    revoked_at: datetime | None = _dt_field()


class ApiKeyRow(SQLModel, table=True):
    """An API key: its public id, who it belongs to, its role and the hash of its secret."""

    __tablename__ = "api_keys"

    id: str = Field(sa_column=Column(String(12), primary_key=True))
    name: str
    role: str
    secret_hash: str
    created_at: datetime | None = _dt_field(nullable=False)
    revoked_at: datetime | None = _dt_field()


class AuditRow(SQLModel, table=True):
    """One API mutation: who (the key's name and role), what (method, path, query, outcome), when."""

    __tablename__ = "audit"
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    at: datetime | None = _dt_field(nullable=False, index=True)
    who: str
    role: str
    method: str
    path: str
    query: str = ""
    status: int


def new_secret() -> str:
    """A random secret (32 URL-safe characters, 192 bits)."""
    return secrets.token_urlsafe(24)


def check_username(name: str) -> str:
    """A broker user name must be a device id: no `+`, `#` or `/` (they would widen ACL patterns)."""
    if not DEVICE_ID_RE.match(name):
        msg = f"invalid id {name[:80]!r}: use 1-64 letters, digits, '_' or '-' (no '+', '#' or '/')"
        raise ConfigError(msg)
    return name


def check_not_reserved(device_id: str, reserved: Iterable[str]) -> str:
    """Refuse a device id that is one of the gateway's names (`Settings.reserved_names`): on the
    devices' listener a device's client id is its user name, so a device named like the gateway's
    client id would take the gateway's broker session over; `NAME-` prefixes reserve a family."""
    for name in reserved:
        if device_id == name or (name.endswith("-") and device_id.startswith(name)):
            msg = (
                f"device id {device_id!r} is reserved for the gateway's own broker account and client ids "
                f"({', '.join(sorted(reserved))}): choose another id"
            )
            raise ReservedNameError(msg)
    return device_id


def reserved_in_use(store: Store, passwords: PasswordFile | None, reserved: Iterable[str]) -> list[str]:
    """Provisioned devices (in the registry, or in the devices' password file when readable) whose
    ids are reserved: made before the gateway's client id or user name was configured so."""
    names = set(registered(store))
    if passwords is not None:
        with contextlib.suppress(OSError):
            names |= set(passwords.users())
    reserved = tuple(reserved)
    clashes = []
    for name in sorted(names):
        try:
            check_not_reserved(name, reserved)
        except ReservedNameError:
            clashes.append(name)
    return clashes


# -- Mosquitto's password file -------------------------------------------------------------------


def mosquitto_tool(name: str) -> str:
    """Path of a program of Debian's `mosquitto` package (mosquitto, mosquitto_passwd), or a
    `BrokerError` telling how to install it."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    msg = f"{name} is not installed: run `apt-get install -y mosquitto` (or `make setup`)"
    raise BrokerError(msg)


def broker_owner() -> tuple[int, int] | None:
    """uid and gid of the `mosquitto` user when we run as root (the broker drops to it), else None."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return user.pw_uid, user.pw_gid


class PasswordFile:
    """Mosquitto's password file: `user:hash` lines, edited under a lock, replaced atomically."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with (self.path.parent / f".{self.path.name}.lock").open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield
        except PermissionError as exc:
            msg = f"cannot write the broker password file {self.path}: {exc.strerror} (run as its owner or root)"
            raise BrokerError(msg) from exc

    def _lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines() if line.strip() and not line.startswith("#")]

    def users(self) -> list[str]:
        """The user names in the file."""
        return [line.split(":", 1)[0] for line in self._lines()]

    def set(self, credentials: Mapping[str, str]) -> None:
        """Add users or change their passwords (hashed by `mosquitto_passwd -U`, one run for all)."""
        for user in credentials:
            check_username(user)
        if not credentials:
            return
        with self._locked():
            fd, plain = tempfile.mkstemp(dir=self.path.parent, prefix=".passwd-")
            try:
                with os.fdopen(fd, "w") as f:  # 0600: the plaintext never becomes readable to others
                    f.writelines(f"{user}:{secret}\n" for user, secret in credentials.items())
                done = subprocess.run(  # noqa: S603 - fixed binary, our own temp file
                    [mosquitto_tool("mosquitto_passwd"), "-U", plain], capture_output=True, text=True, check=False
                )
                if done.returncode != 0:
                    msg = f"mosquitto_passwd failed: {(done.stderr or done.stdout).strip()}"
                    raise BrokerError(msg)
                hashed = Path(plain).read_text().splitlines()
            finally:
                Path(plain).unlink(missing_ok=True)
            kept = [line for line in self._lines() if line.split(":", 1)[0] not in credentials]
            self._write([*kept, *hashed])

    def delete(self, user: str) -> bool:
        """Remove a user; False when it was not there."""
        with self._locked():
            lines = self._lines()
            kept = [line for line in lines if line.split(":", 1)[0] != user]
            if len(kept) == len(lines):
                return False
            self._write(kept)
            return True

    def _write(self, lines: list[str]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".passwd-")
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{line}\n" for line in lines)
        owner = broker_owner()
        if owner is not None:
            os.chown(tmp, *owner)  # the broker reads it again on reload, as its own user
        os.replace(tmp, self.path)


def reload_broker(pid_file: str) -> bool:
    """Signal Mosquitto (SIGHUP) to reload its password and ACL files; False when no pid file is set."""
    if not pid_file:
        return False
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        msg = f"cannot signal the broker through its pid file {pid_file}: {exc}"
        raise BrokerError(msg) from exc
    return True


# -- the device registry ---------------------------------------------------------------------------


def provision(
    store: Store, passwords: PasswordFile, devices: Mapping[str, str | None], *, reserved: Iterable[str] = ()
) -> dict[str, str]:
    """Create credentials for `devices` (id -> type or None) and register them; returns id -> secret.

    A device provisioned again gets a new secret (the old one stops working) and is registered again.
    Ids in `reserved` (the gateway's names) are refused with `ReservedNameError`, before anything is written.
    """
    reserved = tuple(reserved)
    for device_id in devices:
        check_username(device_id)
        check_not_reserved(device_id, reserved)
    creds = {device_id: new_secret() for device_id in devices}
    passwords.set(creds)
    now = utcnow()
    rows = [{"device_id": d, "type": t, "created_at": now, "revoked_at": None} for d, t in devices.items()]
    with store.session() as tx:
        upsert(tx, RegisteredDeviceRow, rows, ["device_id"])
        tx.commit()
    return creds


def revoke(store: Store, passwords: PasswordFile, device_id: str) -> bool:
    """Remove a device's credentials and mark it revoked; False when it had none and was not registered
    (never provisioned, or revoked already)."""
    removed = passwords.delete(device_id)
    with store.session() as tx:
        row = tx.get(RegisteredDeviceRow, device_id)
        if row is not None and row.revoked_at is None:
            row.revoked_at = utcnow()
            tx.add(row)
            tx.commit()
            return True
    return removed


def registered(store: Store, among: Iterable[str] | None = None) -> set[str]:
    """Ids of the registered, unrevoked devices (only those in `among` when given)."""
    stmt = select(RegisteredDeviceRow.device_id).where(col(RegisteredDeviceRow.revoked_at).is_(None))
    if among is not None:
        stmt = stmt.where(col(RegisteredDeviceRow.device_id).in_(list(among)))
    with store.session() as tx:
        return set(tx.exec(stmt))


def list_registered(store: Store) -> list[RegisteredDeviceRow]:
    """Every provisioned device, revoked ones included."""
    with store.session() as tx:
        return list(tx.exec(select(RegisteredDeviceRow).order_by(col(RegisteredDeviceRow.device_id))))


# -- API keys ------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Principal:
    """Who made a request: the key's name and role."""

    name: str
    role: str
    key_id: str = ""

    def may(self, role: str) -> bool:
        """Whether this principal's role includes `role`."""
        return ROLES.index(self.role) >= ROLES.index(role)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_role(role: str) -> str:
    """`role` if it is one of ROLES, else a ConfigError naming them."""
    if role not in ROLES:
        msg = f"unknown role {role!r}: use one of {', '.join(ROLES)}"
        raise ConfigError(msg)
    return role


def create_api_key(store: Store, name: str, role: str) -> tuple[str, str]:
    """A new key for `name` with `role`: returns (key id, the key itself; shown once, only its hash is kept)."""
    check_role(role)
    if not name.strip() or len(name) > 100:
        msg = "an API key needs a name (who or what uses it), at most 100 characters"
        raise ConfigError(msg)
    key_id, secret = secrets.token_hex(6), new_secret()
    with store.session() as tx:
        tx.add(ApiKeyRow(id=key_id, name=name.strip(), role=role, secret_hash=_hash(secret), created_at=utcnow()))
        tx.commit()
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}"


def verify_api_key(store: Store, presented: str) -> Principal | None:
    """The principal of a valid, unrevoked key; None otherwise."""
    m = _KEY_RE.match(presented)
    if m is None:
        return None
    key_id, secret = m.groups()
    with store.session() as tx:
        row = tx.get(ApiKeyRow, key_id)
    # Compared even when there is no such key, so a wrong id and a wrong secret take as long.
    expected = row.secret_hash if row is not None else _hash("")
    if not hmac.compare_digest(_hash(secret), expected) or row is None or row.revoked_at is not None:
        return None
    return Principal(row.name, row.role, row.id)


def key_in_force(store: Store, key_id: str) -> bool:
    """Whether the key with id `key_id` exists and is not revoked (for requests that last)."""
    with store.session() as tx:
        row = tx.get(ApiKeyRow, key_id)
    return row is not None and row.revoked_at is None


def list_api_keys(store: Store) -> list[ApiKeyRow]:
    """Every key (hashes included: callers show only id, name, role and dates)."""
    with store.session() as tx:
        return list(tx.exec(select(ApiKeyRow).order_by(col(ApiKeyRow.created_at))))


def revoke_api_key(store: Store, key_id: str) -> bool:
    """Revoke a key by id; False when there is no such active key."""
    with store.session() as tx:
        row = tx.get(ApiKeyRow, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = utcnow()
        tx.add(row)
        tx.commit()
    return True


def has_api_keys(store: Store) -> bool:
    """Whether any unrevoked key exists."""
    with store.session() as tx:
        return tx.exec(select(ApiKeyRow.id).where(col(ApiKeyRow.revoked_at).is_(None)).limit(1)).first() is not None


def record_audit(store: Store, who: Principal, what: tuple[str, str, str, int]) -> None:
    """Write one audit row: who, and what (method, path, query string, response status)."""
    method, path, query, status = what
    row = AuditRow(at=utcnow(), who=who.name, role=who.role, method=method, path=path, query=query[:500], status=status)
    with store.session() as tx:
        tx.add(row)
        tx.commit()


def list_audit(store: Store, *, who: str | None = None, before: int | None = None, limit: int = 100) -> list[AuditRow]:
    """Audit rows, newest first (`before`: only rows with a smaller id, for paging)."""
    stmt = select(AuditRow).order_by(col(AuditRow.id).desc()).limit(limit)
    if who:
        stmt = stmt.where(col(AuditRow.who) == who)
    if before is not None:
        stmt = stmt.where(col(AuditRow.id) < before)
    with store.session() as tx:
        return list(tx.exec(stmt))
