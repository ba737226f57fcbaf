"""Run a local Mosquitto with the project's own `mosquitto.conf` (used by `iotgw demo` and the tests)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from gateway.errors import BrokerError

PROJECT_CONF = Path(__file__).resolve().parent.parent / "mosquitto.conf"


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a `BrokerError` telling how to install it."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    msg = "mosquitto is not installed: run `apt-get install -y mosquitto` (or `make setup`)"
    raise BrokerError(msg)


def render_config(source: str, *, port: int, data_dir: Path, host: str = "127.0.0.1") -> str:
    """The project's config with the listener port and persistence location replaced."""
    out, n = re.subn(r"(?m)^listener\s+\d+.*$", f"listener {port} {host}", source)
    if n != 1:
        msg = "mosquitto.conf must have exactly one `listener PORT HOST` line"
        raise BrokerError(msg)
    out = re.sub(r"(?m)^persistence_location\s+.*$", f"persistence_location {data_dir}/", out)
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
    # its persistence file here.
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    os.chown(path, user.pw_uid, user.pw_gid)


class Mosquitto:
    """One Mosquitto process running the project's config in `data_dir`, on `port`."""

    def __init__(self, data_dir: Path, port: int, *, conf: Path = PROJECT_CONF) -> None:
        self.data_dir = data_dir
        self.port = port
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """mqtt:// URL of this broker."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it accepts connections."""
        binary = find_mosquitto()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _hand_to_broker_user(self.data_dir)
        conf_path = self.data_dir / "mosquitto.conf"
        conf_path.write_text(render_config(self.conf.read_text(), port=self.port, data_dir=self.data_dir))
        with (self.data_dir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(conf_path)], stdout=log, stderr=log)  # noqa: S603
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
