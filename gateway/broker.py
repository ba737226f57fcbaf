"""Run a local Mosquitto with the project's own `mosquitto.conf` (used by `iotgw demo` and the tests)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from gateway.errors import BrokerError
from gateway.security import PasswordFile, broker_owner, mosquitto_tool

PROJECT_CONF = Path(__file__).resolve().parent.parent / "mosquitto.conf"
PROJECT_ACL = Path(__file__).resolve().parent.parent / "mosquitto.acl"


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a `BrokerError` telling how to install it."""
    return mosquitto_tool("mosquitto")


@dataclass(frozen=True, slots=True)
class TlsListener:
    """A second, TLS listener: its port and the server's certificate files (PEM)."""

    port: int
    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


def render_config(
    source: str, *, port: int, data_dir: Path, host: str = "127.0.0.1", tls: TlsListener | None = None
) -> str:
    """The project's config with the listener port, and the persistence location, password, ACL and
    pid files moved into `data_dir`; with `tls`, a TLS listener added."""
    out, n = re.subn(r"(?m)^listener\s+\d+.*$", f"listener {port} {host}", source)
    if n != 1:
        msg = "mosquitto.conf must have exactly one `listener PORT HOST` line"
        raise BrokerError(msg)
    out = re.sub(r"(?m)^persistence_location\s+.*$", f"persistence_location {data_dir}/", out)
    for key, name in (("password_file", "passwd"), ("acl_file", "acl"), ("pid_file", "mosquitto.pid")):
        out = re.sub(rf"(?m)^{key}\s+.*$", f"{key} {data_dir / name}", out)
    if tls is not None:
        out += (
            f"\nlistener {tls.port} {host}\ncafile {tls.cafile}\ncertfile {tls.certfile}\nkeyfile {tls.keyfile}\n"
            f"require_certificate {str(tls.require_certificate).lower()}\n"
        )
    return out


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hand_to_broker_user(path: Path) -> None:
    # Started as root, mosquitto drops to the `mosquitto` user, which must be able to write
    # its persistence file here and read its password and ACL files again on reload.
    owner = broker_owner()
    if owner is not None:
        os.chown(path, *owner)


class Mosquitto:
    """One Mosquitto process running the project's config (and ACL) in `data_dir`, on `port`.

    `users` (name -> password) go into its password file at start; `extra_acl` is appended to
    the project's ACL (the tests add a publisher allowed on every device topic)."""

    def __init__(  # noqa: PLR0913 - each is a separate knob of a test or demo broker
        self,
        data_dir: Path,
        port: int,
        *,
        conf: Path = PROJECT_CONF,
        acl: Path = PROJECT_ACL,
        extra_acl: str = "",
        users: Mapping[str, str] | None = None,
        tls: TlsListener | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.conf = conf
        self.acl = acl
        self.extra_acl = extra_acl
        self.users = dict(users or {})
        self.tls = tls
        self.passwords = PasswordFile(data_dir / "passwd")
        self.proc: subprocess.Popen[bytes] | None = None

    def url_as(self, user: str) -> str:
        """mqtt:// URL of this broker with the credentials of `user` (one of `users`)."""
        return f"mqtt://{quote(user, safe='')}:{quote(self.users[user], safe='')}@127.0.0.1:{self.port}"

    def add_users(self, credentials: Mapping[str, str]) -> None:
        """Add users (or new passwords); a running broker reloads its password file."""
        self.users.update(credentials)
        self.passwords.set(credentials)
        self.reload()

    def reload(self) -> None:
        """SIGHUP: the broker reads its password and ACL files again (returns once it has)."""
        if self.proc is not None and self.proc.poll() is None:
            log = self.data_dir / "mosquitto.log"
            before = log.read_text(errors="replace").count("Reloading config") if log.exists() else 0
            self.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while log.read_text(errors="replace").count("Reloading config") == before:
                if time.monotonic() > deadline:
                    msg = f"mosquitto on port {self.port} did not reload its config within 5 s"
                    raise BrokerError(msg)
                time.sleep(0.02)

    @property
    def url(self) -> str:
        """mqtt:// URL of this broker."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it accepts connections."""
        binary = find_mosquitto()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _hand_to_broker_user(self.data_dir)
        acl_path = self.data_dir / "acl"
        acl_path.write_text(self.acl.read_text() + ("\n" + self.extra_acl if self.extra_acl else ""))
        _hand_to_broker_user(acl_path)
        if not self.passwords.path.exists():
            self.passwords.path.touch(mode=0o600)
            _hand_to_broker_user(self.passwords.path)
        self.passwords.set(self.users)
        conf_path = self.data_dir / "mosquitto.conf"
        conf_path.write_text(
            render_config(self.conf.read_text(), port=self.port, data_dir=self.data_dir, tls=self.tls)
            # "Reloading config." is logged at this level: `reload()` waits for it.
            + "\nlog_type information\n"
        )
        with (self.data_dir / "mosquitto.log").open("ab") as log:
            # A session of its own: Ctrl-C in the terminal reaches the demo (which stops the
            # gateway, then this broker), not the broker first (the gateway then spent its
            # shutdown reconnecting to it, with warnings).
            self.proc = subprocess.Popen(  # noqa: S603
                [binary, "-c", str(conf_path)], stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                tail = (self.data_dir / "mosquitto.log").read_text(errors="replace")[-2000:]
                msg = f"mosquitto exited with code {self.proc.returncode}:\n{tail}"
                raise BrokerError(msg)
            if time.monotonic() > deadline:
                self.stop()
                msg = f"mosquitto did not listen on port {self.port} within {timeout}s"
                raise BrokerError(msg)
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker gracefully (it writes its persistence file on the way out)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
