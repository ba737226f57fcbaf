"""Settings: the one place that reads the environment (prefix IOTGW_); CLI flags map onto the same fields."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.protocol import SUBSCRIPTION

# The broker refuses anything above its own limit (mosquitto.conf: message_size_limit 262144),
# so a gateway limit above that could never be reached.
BROKER_MESSAGE_LIMIT = 256 * 1024

Port = Annotated[int, Field(ge=1, le=65535)]


class Settings(BaseSettings):
    """Gateway configuration; every field is also `IOTGW_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="IOTGW_", extra="forbid", frozen=True)

    # The broker's listener for the gateway (mosquitto.conf: 1884; devices have 1883); mqtts://
    # for TLS.
    mqtt_url: str = "mqtt://localhost:1884"
    # The gateway's broker account (mosquitto.acl lets user `iotgw` read devices/#); credentials
    # in mqtt_url (mqtt://user:password@host) win over these. Logs never show them.
    mqtt_username: str = "iotgw"
    mqtt_password: SecretStr = SecretStr("")
    # TLS (mqtts://): the CA that signed the broker's certificate (empty: the system's CAs), and
    # a client certificate and key when the broker requires one.
    mqtt_ca_file: str = ""
    mqtt_cert_file: str = ""
    mqtt_key_file: str = ""
    mqtt_client_id: str = Field(default="iotgw", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # In-flight window: with ack-after-commit the broker sends at most this many unacknowledged
    # messages, so it bounds both the batch size and the throughput (see README, design notes).
    mqtt_receive_maximum: int = Field(default=2000, ge=10, le=65535)
    mqtt_session_expiry_s: int = Field(default=7 * 24 * 3600, ge=60)
    mqtt_reconnect_max_s: float = Field(default=30.0, gt=0)
    database_url: str = "sqlite:///iotgw.db"
    # False: this process does not subscribe; it runs the consumers, the notifier and the API over
    # the log that another gateway process on the same database fills (README, "Consumers").
    ingest: bool = True
    # The consumers (alerts, dispatch, analytics...) run in a child process of their own, at a
    # lower CPU priority (`consumer_nice`): their work never takes the interpreter lock or the CPU
    # from ingestion, and they catch up with what ingestion stored (README, "Consumers beside
    # ingest"). False: one process does everything.
    consumer_process: bool = True
    consumer_nice: int = Field(default=10, ge=0, le=19)
    # --- Scaling out (README "Scaling out") ---
    # This instance's name in a cluster of gateways on one PostgreSQL database: set, the gateway
    # connects as `<mqtt_client_id>-<instance>` and shares `$share/<mqtt_client_id>/devices/+/+`
    # with the other instances; its consumers run wherever their lease is held.
    instance: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,40}$")
    # How long a consumer's (or the notifier's, or the sequencer's) lease lasts unrenewed: when
    # an instance dies, another takes its jobs over within this time.
    lease_s: float = Field(default=10.0, ge=1, le=600)
    # Cluster only: how long the sequencer holds a message whose predecessor (seq - 1) has not
    # arrived yet, before it gives up waiting and records the gap.
    reorder_window_s: float = Field(default=60.0, ge=0, le=3600)
    # A notification that keeps failing for now (5xx, timeouts, no connection) is retried for this
    # long, then given up as expired (iotgw_notifications_failed_total{reason="expired"}).
    notify_max_age_s: float = Field(default=86400.0, gt=0)
    # The gateway's address as people reach it (behind a proxy, say): links in notifications
    # (Alertmanager's generatorURL, PagerDuty's links) point to its staff page. Empty: the
    # address it listens on.
    public_url: str = Field(default="", pattern=r"^(https?://[^\s/]+(/[^\s]*)?)?$")
    http_host: str = "127.0.0.1"
    http_port: Port = 8000
    max_message_bytes: int = Field(default=16 * 1024, ge=256, le=BROKER_MESSAGE_LIMIT)
    batch_max: int = Field(default=1000, ge=1, le=10000)
    stuck_after_s: float = Field(default=60.0, gt=0)
    # Device time further than this from the gateway's clock (either way) is not trusted: the
    # message's events carry the receive time instead, counted in iotgw_device_clock_skew_total.
    max_clock_skew_s: float = Field(default=86400.0, gt=0)
    # A seq more than this far below a device's last one is a counter reset (the device restarted
    # its count, or one huge seq came before): taken as new, after a `device.seq.reset` event.
    # Within it, an older seq is a late or repeated message (stored once, no state change).
    seq_reset_below: int = Field(default=1000, ge=1)
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    # Consumers to run, by entry point name, comma-separated; "*" runs every registered one.
    consumers: str = Field(default="*", pattern=r"^\s*(\*|[A-Za-z0-9_.-]+(\s*,\s*[A-Za-z0-9_.-]+)*)?\s*$")
    consumer_poll_s: float = Field(default=1.0, gt=0, le=60)
    # A consumer's batch or tick not done within this many seconds counts as failed and its thread
    # is abandoned (0: each consumer's own, 30 s for the built-in ones).
    consumer_timeout_s: float = Field(default=0.0, ge=0)
    # Events waiting and a consumer's cursor still for this long: its state is "stalled", with why
    # (/api/consumers, iotgw_consumer_stalled, Prometheus rule IotgwConsumerStalled).
    consumer_stall_s: float = Field(default=60.0, gt=0)
    # The consumers' process not heard from (it reports every second) for this long is killed and
    # started again: a frozen process must not stop the consumers for good.
    consumer_process_timeout_s: float = Field(default=30.0, gt=0)
    # Alert rules; empty: the rules shipped in alerts/rules.yaml.
    rules_file: str = ""
    # The maintenance roster for dispatch (empty: the shipped alerts/roster.yaml).
    roster_file: str = ""
    # Whether a device in maintenance mode raises alerts (by default it does not).
    alerts_in_maintenance: bool = False
    # Per-elevator analytics series exist only while the fleet has at most this many elevators.
    analytics_device_series_max: int = Field(default=100, ge=0)

    # --- Security ---
    # Only provisioned devices (`iotgw devices provision`): others are dead letters `unknown_device`.
    require_registered_devices: bool = False
    # Messages per second each device may send (token bucket of `device_burst`); 0: no limit.
    # The excess is dead-lettered (`rate_limited`) so one flooding device cannot starve the others.
    device_rate: float = Field(default=0.0, ge=0)
    device_burst: int = Field(default=200, ge=1)
    # API keys: every /api route needs one (roles viewer < technician < admin).
    api_auth: bool = True
    # /health, /ready and /metrics readable without a key.
    api_open_probes: bool = True
    # Origins allowed to call the API from a browser, comma-separated; empty: no CORS at all.
    cors_origins: str = ""
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # API requests answered at once (the event stream aside), overall and per API key; more get a
    # 429 with Retry-After at once: a reader with a key cannot take ingestion's CPU.
    api_max_concurrent: int = Field(default=8, ge=1, le=1000)
    api_max_concurrent_per_key: int = Field(default=4, ge=1, le=1000)
    # `iotgw run`: the API's worker threads run this much lower in CPU priority (nice) than
    # ingestion's, so that under load the cores go to ingestion first.
    api_nice: int = Field(default=10, ge=0, le=19)
    # Where `iotgw devices provision/revoke` write the broker's password file, and the broker's
    # pid file (mosquitto.conf `pid_file`) to signal it to reload; empty: no reload.
    broker_password_file: str = "/etc/mosquitto/iotgw.passwd"  # noqa: S105 - a path
    broker_pid_file: str = ""

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

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if "://" not in value:
            msg = f"database_url must be an SQLAlchemy URL such as sqlite:///iotgw.db, got {value!r}"
            raise ValueError(msg)
        return value

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
