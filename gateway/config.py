"""Settings: the one place that reads the environment (prefix IOTGW_); CLI flags map onto the same fields."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.core.protocol import SUBSCRIPTION
from gateway.errors import ConfigError

# The broker refuses anything above its own limit (mosquitto.conf: message_size_limit 262144),
# so a gateway limit above that could never be reached.
BROKER_MESSAGE_LIMIT = 256 * 1024

Port = Annotated[int, Field(ge=1, le=65535)]


class GatewaySettings(BaseSettings):
    """The gateway's own configuration; every field is also `IOTGW_<FIELD>` in the environment.
    `Settings` adds the fields of the plugins' settings models."""

    model_config = SettingsConfigDict(env_prefix="IOTGW_", extra="forbid", frozen=True)

    mqtt_url: str = Field(
        default="mqtt://localhost:1884",
        description=(
            "the broker's listener for the gateway (mosquitto.conf: 1884; devices use 1883); mqtts:// "
            "for TLS; credentials in the URL (mqtt://user:password@host) win over "
            "mqtt_username/mqtt_password"
        ),
    )
    mqtt_username: str = Field(
        default="iotgw", description="the gateway's broker account (mosquitto.acl lets `iotgw` read devices/#)"
    )
    mqtt_password: SecretStr = Field(
        default=SecretStr(""), description="the gateway's broker password (logs and banners never show it)"
    )
    mqtt_ca_file: str = Field(
        default="", description="TLS: the CA that signed the broker's certificate (empty: the system's CAs)"
    )
    mqtt_cert_file: str = Field(default="", description="TLS: a client certificate, when the broker requires one")
    mqtt_key_file: str = Field(default="", description="TLS: the client certificate's key")
    mqtt_client_id: str = Field(
        default="iotgw",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description=(
            "fixed: it names the gateway's persistent session at the broker; no device may be provisioned with it"
        ),
    )
    mqtt_receive_maximum: int = Field(
        default=2000,
        ge=10,
        le=65535,
        description=(
            "in-flight window: with ack-after-commit the broker sends at most this many unacknowledged "
            "messages, so it bounds the batch size and the throughput"
        ),
    )
    mqtt_session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="how long the broker keeps the gateway's session (and queues its messages) while it is away",
    )
    mqtt_reconnect_max_s: float = Field(default=30.0, gt=0, description="cap of the exponential reconnect backoff")
    database_url: str = Field(
        default="sqlite:///iotgw.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user:password@host:5432/db",
    )
    ingest: bool = Field(
        default=True,
        description=(
            "false: do not subscribe; run the consumers, the notifier and the API over the log that "
            "another gateway process on the same database fills"
        ),
    )
    consumer_process: bool = Field(
        default=True,
        description=(
            "run the consumers in a process of their own beside ingestion, at a lower CPU priority; "
            "false: one process does everything"
        ),
    )
    consumer_nice: int = Field(
        default=10, ge=0, le=19, description="how much lower the consumers' process runs in CPU priority (nice, 0-19)"
    )
    # --- Scaling out (docs/scaling.md) ---
    instance: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_-]{0,40}$",
        description=(
            "this instance's name in a cluster of gateways on one PostgreSQL database (empty: on its "
            "own); it connects as <mqtt_client_id>-<instance> and shares the subscription"
        ),
    )
    lease_s: float = Field(
        default=10.0,
        ge=1,
        le=600,
        description=(
            "how long a consumer's, the notifier's or the sequencer's lease lasts unrenewed: when an "
            "instance dies, another takes its jobs over within this time"
        ),
    )
    reorder_window_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description=(
            "cluster: how long the sequencer holds a message whose predecessor (seq - 1) has not "
            "arrived, before it records the gap"
        ),
    )
    public_url: str = Field(
        default="",
        pattern=r"^(https?://[^\s/]+(/[^\s]*)?)?$",
        description=(
            "the gateway's address as people reach it (behind a proxy, say): links in notifications "
            "point to its staff page; empty: the address it listens on"
        ),
    )
    time_zone: str = Field(
        default="UTC",
        description="the IANA time zone (e.g. Europe/Berlin) the staff page shows local times in",
    )
    http_host: str = Field(default="127.0.0.1", description="the API's listening address")
    http_port: Port = Field(default=8000, description="the API's port")
    max_message_bytes: int = Field(
        default=16 * 1024,
        ge=256,
        le=BROKER_MESSAGE_LIMIT,
        description="payload limit of a device message (at most the broker's 256 KiB); larger ones are dead letters",
    )
    batch_max: int = Field(default=1000, ge=1, le=10000, description="most messages per commit")
    stuck_after_s: float = Field(
        default=60.0, gt=0, description="an elevator moving without reaching a floor this long: elevator.stuck"
    )
    max_clock_skew_s: float = Field(
        default=86400.0,
        gt=0,
        description=(
            "device time further than this from the gateway's clock (either way) is not trusted: the "
            "events carry the receive time (iotgw_device_clock_skew_total)"
        ),
    )
    seq_reset_below: int = Field(
        default=1000,
        ge=1,
        description=(
            "a seq this far below a device's last one is a counter reset (device.seq.reset); within it,"
            " an older seq is a late or repeated message"
        ),
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="the event loop of the gateway's and the consumers' processes: uvloop (libuv), or asyncio's own",
    )
    log_level: str = Field(
        default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="DEBUG, INFO, WARNING or ERROR"
    )
    consumers: str = Field(
        default="*",
        pattern=r"^\s*(\*|[A-Za-z0-9_.-]+(\s*,\s*[A-Za-z0-9_.-]+)*)?\s*$",
        description="consumers to run, by entry point name, comma-separated; * runs every registered one, empty none",
    )
    consumer_poll_s: float = Field(default=1.0, gt=0, le=60, description="fallback poll when no commit woke a consumer")
    consumer_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description=(
            "a consumer's batch or tick not done by then counts as failed and its thread is abandoned "
            "(0: each consumer's own, 30 s for the built-in ones)"
        ),
    )
    consumer_stall_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "events waiting and a consumer's cursor still this long: its state is stalled, with why "
            "(iotgw_consumer_stalled)"
        ),
    )
    consumer_process_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "the consumers' process not heard from (it reports every second) this long is killed and started again"
        ),
    )

    # --- Security ---
    require_registered_devices: bool = Field(
        default=False,
        description="only provisioned devices (iotgw devices provision); others are dead letters unknown_device",
    )
    device_rate: float = Field(
        default=0.0,
        ge=0,
        description=(
            "messages per second each device may send (token bucket of device_burst); 0: no limit; the "
            "excess is dead-lettered as rate_limited"
        ),
    )
    device_burst: int = Field(default=200, ge=1, description="the token bucket's size for device_rate")
    api_auth: bool = Field(
        default=True, description="API keys required on every /api route (roles viewer < technician < admin)"
    )
    api_open_probes: bool = Field(default=True, description="/health, /ready and /metrics readable without a key")
    cors_origins: str = Field(
        default="", description="browser origins allowed to call the API, comma-separated; empty: no CORS"
    )
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, le=16 * 1024 * 1024, description="larger request bodies get a 413"
    )
    api_max_concurrent: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="/api requests answered at once (the event stream aside); more get a 429 with Retry-After",
    )
    api_max_concurrent_per_key: int = Field(
        default=4, ge=1, le=1000, description="/api requests answered at once for one API key"
    )
    api_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="iotgw run: how much lower the API's worker threads run in CPU priority than ingestion",
    )
    broker_password_file: str = Field(
        default="/etc/mosquitto/iotgw.passwd",
        description="the devices' password file of the broker, written by iotgw devices and POST /api/devices",
    )
    broker_pid_file: str = Field(
        default="",
        description=(
            "the broker's pid file (mosquitto.conf pid_file): SIGHUP after provisioning so it reloads; empty: no reload"
        ),
    )

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parts.hostname:
            msg = f"mqtt_url must look like mqtt://host:port or mqtts://host:port, got {value!r}"
            raise ValueError(msg)
        try:
            port = parts.port
        except ValueError as exc:
            msg = f"mqtt_url has an invalid port: {value!r}"
            raise ValueError(msg) from exc
        if port is not None and not 1 <= port <= 65535:  # pragma: no cover - urlsplit rejects these
            msg = f"mqtt_url port out of range: {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("time_zone")
    @classmethod
    def _check_time_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            msg = f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin or UTC)"
            raise ValueError(msg) from exc
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if "://" not in value:
            msg = f"database_url must be an SQLAlchemy URL such as sqlite:///iotgw.db, got {value!r}"
            raise ValueError(msg)
        return value

    @property
    def idle_in_transaction_s(self) -> float:
        """On PostgreSQL, a transaction waiting this long between its statements (its process
        stopped) is ended by the server: past any built-in handler's timeout, plus a lease."""
        return max(self.consumer_timeout_s, 30.0) + self.lease_s

    @property
    def clustered(self) -> bool:
        """Whether this gateway is one instance of a cluster (`instance` is set)."""
        return bool(self.instance)

    @property
    def instance_name(self) -> str:
        """The name leases are held under (`default` for a gateway on its own)."""
        return self.instance or "default"

    @property
    def client_id(self) -> str:
        """The MQTT client id: fixed per instance, so a restarted instance gets its session back."""
        return f"{self.mqtt_client_id}-{self.instance}" if self.instance else self.mqtt_client_id

    @property
    def subscription(self) -> str:
        """What the gateway subscribes to: a shared subscription when it is one of several instances."""
        return f"$share/{self.mqtt_client_id}/{SUBSCRIPTION}" if self.instance else SUBSCRIPTION

    @property
    def reserved_names(self) -> tuple[str, ...]:
        """Names no device may have: the gateway's broker account, its client id and, with a
        trailing `-`, the prefix of its instances' client ids (`Settings.client_id`)."""
        login = self.mqtt_login
        names = {"iotgw", "iotgw-", self.mqtt_client_id, f"{self.mqtt_client_id}-"}
        if login is not None:
            names.add(login[0])
        return tuple(sorted(names))

    @property
    def consumer_names(self) -> list[str]:
        """`consumers` as a list of names."""
        return [n.strip() for n in self.consumers.split(",") if n.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        """`cors_origins` as a list."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def mqtt_login(self) -> tuple[str, str | None] | None:
        """(user, password) for the broker: the URL's own (mqtt://user:pw@host), else the settings'."""
        parts = urlsplit(self.mqtt_url)
        if parts.username:
            password = unquote(parts.password) if parts.password else self.mqtt_password.get_secret_value()
            return unquote(parts.username), password or None
        if self.mqtt_username:
            return self.mqtt_username, self.mqtt_password.get_secret_value() or None
        return None

    @property
    def database_url_safe(self) -> str:
        """`database_url` with its password shown as `***`, for logs and hints."""
        parts = urlsplit(self.database_url)
        if parts.password is None:
            return self.database_url
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()

    @property
    def mqtt_url_safe(self) -> str:
        """`mqtt_url` without credentials, for logs and banners."""
        parts = urlsplit(self.mqtt_url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"

    @property
    def mqtt_tls(self) -> bool:
        """Whether `mqtt_url` asks for TLS."""
        return urlsplit(self.mqtt_url).scheme in ("mqtts", "ssl")

    @property
    def mqtt_host(self) -> str:
        """Host part of `mqtt_url`."""
        return urlsplit(self.mqtt_url).hostname or "localhost"

    @property
    def mqtt_port(self) -> int:
        """Port part of `mqtt_url` (1883, or 8883 for TLS, when absent)."""
        return urlsplit(self.mqtt_url).port or (8883 if self.mqtt_tls else 1883)


# Plugins' settings models (pydantic models whose fields, each with a description, join the
# gateway's: `IOTGW_<FIELD>` in the environment). Their modules import nothing of the gateway:
# they are loaded here, when this module is.
SETTINGS_GROUP = "iotgw.settings"


def plugin_settings() -> dict[str, type[BaseModel]]:
    """The settings models registered under `iotgw.settings`, by entry point name."""
    found: dict[str, type[BaseModel]] = {}
    taken = dict.fromkeys(GatewaySettings.model_fields, "the gateway")
    for ep in entry_points(group=SETTINGS_GROUP):
        try:
            model = ep.load()
        except Exception as exc:
            msg = f"settings {ep.name!r} ({ep.value}) could not be loaded: {exc}"
            raise ConfigError(msg) from exc
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            msg = f"settings {ep.name!r} ({ep.value}) is not a pydantic model"
            raise ConfigError(msg)
        for name in model.model_fields:
            if name in taken:
                msg = f"setting {name!r} of {ep.name!r} is taken by {taken[name]}"
                raise ConfigError(msg)
            taken[name] = ep.name
        found[ep.name] = model
    return found


def _compose() -> type[GatewaySettings]:
    models = tuple(plugin_settings().values())
    if not models:
        return GatewaySettings
    return type("Settings", (GatewaySettings, *models), {"__module__": __name__, "__doc__": GatewaySettings.__doc__})


if TYPE_CHECKING:
    Settings = GatewaySettings
else:
    Settings = _compose()
