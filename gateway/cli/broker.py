"""Run a local Mosquitto with the project's own `mosquitto.conf` (used by `iotgw demo` and the tests)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

from gateway.errors import BrokerError
from gateway.security import PasswordFile, broker_owner, mosquitto_tool

# The broker set-up ships in the package (the repository's top-level files link to these):
# an installed iotgw runs its demo with the very same files.
PROJECT_CONF = Path(str(files("gateway") / "mosquitto.conf"))
PROJECT_ACL = Path(str(files("gateway") / "mosquitto.acl"))


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a `BrokerError` telling how to install it."""
    return mosquitto_tool("mosquitto")


# A guard beside a demo's broker, in a session of its own: it waits for its stdin to close (the
# demo ended, however: SIGKILL too), then stops the broker and removes its folder. The broker
# itself cannot watch its parent: the parent-death signal is cleared when it drops to its user.
GUARD = """
import os, shutil, signal, sys, time
folder = sys.argv[1]
conf = os.path.join(folder, "mosquitto.conf").encode()
told = sys.stdin.buffer.read()  # until the demo's process is gone, or says it stopped the broker
def kill(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass
def brokers():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if conf in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found
# By its config file, not a pid handed over: the demo may die between starting the broker and
# saying its pid (a child forked then still becomes the broker: look a little while).
deadline = time.monotonic() + 2
while told != b"stopped":
    for pid in brokers():
        kill(pid, signal.SIGTERM)
    if time.monotonic() > deadline and not brokers():
        break
    time.sleep(0.1)
    if time.monotonic() > deadline + 10:
        for pid in brokers():
            kill(pid, signal.SIGKILL)
        break
shutil.rmtree(folder, ignore_errors=True)
"""


@contextlib.contextmanager
def _no_ctrl_c_in_child() -> Iterator[None]:
    """A child started with `start_new_session` is in this process's group from its fork until its
    `setsid`: a Ctrl-C then would reach it too. Blocked in this thread around the fork, SIGINT is
    blocked in the child, which never gets one of its own (it is stopped with SIGTERM); one this
    process gets meanwhile is taken as soon as the fork is done."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass(frozen=True, slots=True)
class TlsListener:
    """A TLS listener: its port, the server's certificate files (PEM), and whose accounts it
    takes: the devices' (client id = user name) or, with `gateway`, the gateway's."""

    port: int
    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False
    gateway: bool = False

    def render(self, host: str, data_dir: Path) -> str:
        """Its lines in mosquitto.conf (with per_listener_settings true, accounts and ACL of its own)."""
        accounts = PASSWORD_FILES["iotgw-services.passwd" if self.gateway else "iotgw.passwd"]
        return (
            f"\nlistener {self.port} {host}\ncafile {self.cafile}\ncertfile {self.certfile}\nkeyfile {self.keyfile}\n"
            f"require_certificate {str(self.require_certificate).lower()}\n"
            f"use_username_as_clientid {str(not self.gateway).lower()}\n"
            f"allow_anonymous false\npassword_file {data_dir / accounts}\nacl_file {data_dir / 'acl'}\n"
        )


DEVICE_LISTENER = 1883  # the ports mosquitto.conf's two listeners have, as shipped
GATEWAY_LISTENER = 1884
# The files each listener's `password_file` names in mosquitto.conf, and their names in a data dir.
PASSWORD_FILES = {"iotgw.passwd": "passwd", "iotgw-services.passwd": "services.passwd"}


def render_config(  # noqa: PLR0913 - each is a separate knob of a test or demo broker
    source: str,
    *,
    port: int,
    gateway_port: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    tls: Sequence[TlsListener] = (),
) -> str:
    """The project's config with the devices' listener on `port` and the gateway's on
    `gateway_port`, and the persistence location, password, ACL and pid files moved into
    `data_dir`; with `tls`, TLS listeners added."""
    ports = {str(DEVICE_LISTENER): port, str(GATEWAY_LISTENER): gateway_port}
    found: list[str] = []

    def listener(m: re.Match[str]) -> str:
        found.append(m.group(1))
        return f"listener {ports.get(m.group(1), m.group(1))} {host}"

    out = re.sub(r"(?m)^listener\s+(\d+).*$", listener, source)
    if sorted(found) != sorted(ports):
        msg = f"mosquitto.conf must have the listeners {DEVICE_LISTENER} (devices) and {GATEWAY_LISTENER} (gateway)"
        raise BrokerError(msg)
    out = re.sub(r"(?m)^persistence_location\s+.*$", f"persistence_location {data_dir}/", out)
    for shipped, name in PASSWORD_FILES.items():
        out = re.sub(rf"(?m)^password_file\s+\S*/{re.escape(shipped)}$", f"password_file {data_dir / name}", out)
    for key, name in (("acl_file", "acl"), ("pid_file", "mosquitto.pid")):
        out = re.sub(rf"(?m)^{key}\s+.*$", f"{key} {data_dir / name}", out)
    return out + "".join(listener.render(host, data_dir) for listener in tls)


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
    """One Mosquitto process running the project's config (and ACL) in `data_dir`: the devices'
    listener on `port`, the gateway's on `gateway_port` (a free one by default).

    `users` (name -> password) are the gateway's listener's accounts, written at start;
    `passwords` is the devices' password file (what provisioning writes); `extra_acl` is appended
    to the project's ACL (the tests add a publisher allowed on every device topic)."""

    def __init__(  # noqa: PLR0913 - each is a separate knob of a test or demo broker
        self,
        data_dir: Path,
        port: int,
        *,
        gateway_port: int | None = None,
        conf: Path = PROJECT_CONF,
        acl: Path = PROJECT_ACL,
        extra_acl: str = "",
        users: Mapping[str, str] | None = None,
        tls: Sequence[TlsListener] = (),
        dies_with_parent: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.dies_with_parent = dies_with_parent  # stopped, its folder removed, when this process ends
        self.guard: subprocess.Popen[bytes] | None = None
        self.port = port
        self.gateway_port = gateway_port or free_port()
        self.conf = conf
        self.acl = acl
        self.extra_acl = extra_acl
        self.users = dict(users or {})
        self.tls = tls
        self.passwords = PasswordFile(data_dir / PASSWORD_FILES["iotgw.passwd"])
        self.services = PasswordFile(data_dir / PASSWORD_FILES["iotgw-services.passwd"])
        self.devices: dict[str, str] = {}  # device accounts added with `add_devices`
        self.proc: subprocess.Popen[bytes] | None = None

    def url_as(self, user: str) -> str:
        """mqtt:// URL of this broker with the credentials of `user`: one of `users`, on the
        gateway's listener, or a device added with `add_devices`, on the devices' listener."""
        if user in self.users:
            secret, port = self.users[user], self.gateway_port
        else:
            secret, port = self.devices[user], self.port
        return f"mqtt://{quote(user, safe='')}:{quote(secret, safe='')}@127.0.0.1:{port}"

    def add_devices(self, credentials: Mapping[str, str]) -> None:
        """Add device accounts (or new passwords) by hand; a running broker reloads its password file."""
        self.devices.update(credentials)
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
        """mqtt:// URL of the gateway's listener."""
        return f"mqtt://127.0.0.1:{self.gateway_port}"

    @property
    def device_url(self) -> str:
        """mqtt:// URL of the devices' listener."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it accepts connections."""
        if self.dies_with_parent:  # first: from here on, however this process ends, the guard cleans up
            with _no_ctrl_c_in_child():
                self.guard = subprocess.Popen(  # noqa: S603 - our own interpreter and code
                    [sys.executable, "-c", GUARD, str(self.data_dir)], stdin=subprocess.PIPE, start_new_session=True
                )
        binary = find_mosquitto()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _hand_to_broker_user(self.data_dir)
        acl_path = self.data_dir / "acl"
        acl_path.write_text(self.acl.read_text() + ("\n" + self.extra_acl if self.extra_acl else ""))
        _hand_to_broker_user(acl_path)
        for passwords in (self.passwords, self.services):
            if not passwords.path.exists():
                passwords.path.touch(mode=0o600)
                _hand_to_broker_user(passwords.path)
        self.services.set(self.users)
        conf_path = self.data_dir / "mosquitto.conf"
        conf_path.write_text(
            render_config(
                self.conf.read_text(),
                port=self.port,
                gateway_port=self.gateway_port,
                data_dir=self.data_dir,
                tls=self.tls,
            )
            # "Reloading config." is logged at this level: `reload()` waits for it.
            + "\nlog_type information\n"
        )
        # A session of its own: Ctrl-C in the terminal reaches the demo (which stops the
        # gateway, then this broker), not the broker first (the gateway then spent its
        # shutdown reconnecting to it, with warnings).
        with (self.data_dir / "mosquitto.log").open("ab") as log, _no_ctrl_c_in_child():
            self.proc = subprocess.Popen(  # noqa: S603
                [binary, "-c", str(conf_path)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not (port_open("127.0.0.1", self.port) and port_open("127.0.0.1", self.gateway_port)):
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.guard is not None:  # its work is done: told so, it removes the folder and ends
            if self.guard.stdin is not None:
                with contextlib.suppress(OSError):
                    self.guard.stdin.write(b"stopped")
                self.guard.stdin.close()
            self.guard.wait(timeout)
            self.guard = None
