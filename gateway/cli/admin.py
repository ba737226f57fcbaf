"""`iotgw devices` and `iotgw apikeys`: broker credentials, the device registry, API keys."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from gateway.cli.common import open_store
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.security import (
    PasswordFile,
    create_api_key,
    list_api_keys,
    list_registered,
    provision,
    reload_broker,
    revoke,
    revoke_api_key,
)

if TYPE_CHECKING:
    pass


def _reload_note(settings: Settings) -> str:
    if reload_broker(settings.broker_pid_file):
        return f"broker reloaded (SIGHUP to the pid in {settings.broker_pid_file})"
    return "now make the broker reload its password file: kill -HUP its pid (or set IOTGW_BROKER_PID_FILE)"


def cmd_devices(args: argparse.Namespace, settings: Settings) -> int:
    """`iotgw devices provision|revoke|list`."""
    store = open_store(settings, create=getattr(args, "create_database", False))
    passwords = PasswordFile(settings.broker_password_file)
    if args.devices_command == "list":
        for row in list_registered(store):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            print(f"{row.device_id}\t{row.type or '-'}\t{state}")  # noqa: T201
        return 0
    if args.devices_command == "revoke":
        if not revoke(store, passwords, args.device_id):
            print(f"iotgw: device {args.device_id!r} is not provisioned (never, or revoked already)", file=sys.stderr)  # noqa: T201
            return 1
        print(f"revoked {args.device_id}; {_reload_note(settings)}")  # noqa: T201
        return 0
    active = {row.device_id for row in list_registered(store) if row.revoked_at is None}
    again = [device_id for device_id in args.ids if device_id in active]
    if again and not args.rotate:
        msg = (
            f"{', '.join(again)}: provisioned already (its password stays as it is); --rotate gives it a "
            "new password, and the old one stops working"
        )
        raise GatewayError(msg)
    # A reserved id (the gateway's own names) raises: main() prints why and exits 1, nothing written.
    creds = provision(store, passwords, dict.fromkeys(args.ids, args.type), reserved=settings.reserved_names)
    if args.out is not None:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.writelines(f"{device_id}:{secret}\n" for device_id, secret in creds.items())
        print(f"provisioned {len(creds)} device(s); credentials appended to {args.out}")  # noqa: T201
    else:
        for device_id, secret in creds.items():
            print(f"provisioned {device_id}\n  username {device_id}\n  password {secret}   (shown once)")  # noqa: T201
    print(_reload_note(settings))  # noqa: T201
    return 0


def cmd_apikeys(args: argparse.Namespace, settings: Settings) -> int:
    """`iotgw apikeys create|list|revoke`."""
    store = open_store(settings, create=getattr(args, "create_database", False))
    if args.apikeys_command == "create":
        key_id, key = create_api_key(store, args.name, args.role)
        print(f"API key {key_id} for {args.name} ({args.role}); shown once, keep it safe:\n{key}")  # noqa: T201
        return 0
    if args.apikeys_command == "list":
        for row in list_api_keys(store):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            print(f"{row.id}\t{row.role}\t{row.name}\tcreated {row.created_at:%Y-%m-%d %H:%M}\t{state}")  # noqa: T201
        return 0
    if not revoke_api_key(store, args.key_id):
        print(f"iotgw: no active API key {args.key_id!r}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"revoked API key {args.key_id}")  # noqa: T201
    return 0
