"""Where notifications go (the `receivers` of the rules and roster files), and the field types those
files share: durations, severities and strict models."""

from __future__ import annotations

import re
import string
from email.utils import getaddresses
from enum import StrEnum
from typing import Annotated, Literal

import httpx
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> float:
    """Seconds from `90`, `90s`, `5m`, `1.5h`, `2d` or `250ms`."""
    if isinstance(value, bool):
        msg = "a duration is a number of seconds or a string like 90s, 5m, 1h"
        raise ValueError(msg)  # noqa: TRY004 - pydantic says a ValueError with its field and line
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        msg = f"{value!r} is not a duration (use seconds or 90s, 5m, 1h, 2d)"
        raise ValueError(msg)
    if seconds < 0:
        msg = "a duration cannot be negative"
        raise ValueError(msg)
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Severity(StrEnum):
    """How bad it is, most severe first."""

    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"
    INFO = "info"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


Place = tuple[int | str, ...]  # where in a file: its keys and list indexes from the top (rules.2.name)


class Problems(ValueError):  # a ValueError: pydantic reports it with the rest
    """What a whole-file check found, each at its place in the file, so that each is reported at
    its own line (alerts/loading.py), all at once."""

    def __init__(self, problems: list[tuple[Place, str]]) -> None:
        super().__init__("; ".join(msg for _, msg in problems))
        self.problems = problems


# What an e-mail or apprise receiver's subject or body template may name ({field}); one without a
# value reads "". {where} is site, device and floor, those that have a value.
TEMPLATE_FIELDS = (
    "summary", "status", "severity", "priority", "rule", "device", "type", "site", "floor", "since",
    "by", "note", "link", "ack_link", "order", "assignee", "step", "ack_deadline", "count", "alerts", "where",
)  # fmt: skip


def check_template(template: str) -> str:
    """`template` if it names only TEMPLATE_FIELDS; else a ValueError naming the unknown field."""
    try:
        parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        msg = f"template {template!r}: {exc} (a literal brace is written {{{{ or }}}})"
        raise ValueError(msg) from exc
    for field, spec, conversion in parts:
        if spec or conversion:
            given = f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            msg = f"{given}: a field is named alone, with no format or conversion: {{{field}}}"
            raise ValueError(msg)
        if field not in TEMPLATE_FIELDS:
            known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            msg = f"unknown field {{{field}}} (known: {known})"
            raise ValueError(msg)
    return template


Template = Annotated[str, Field(min_length=1, max_length=4000), AfterValidator(check_template)]


# What a receiver's alerts may be grouped by (group_by).
GroupLabel = Literal["site", "rule", "severity", "device", "type"]


def _apprise_url(url: str) -> str:
    """`url` if apprise knows the service it names (the error leaves the URL out: it may hold a token)."""
    import apprise  # noqa: PLC0415 - large, and only for files with apprise receivers

    plugin = apprise.Apprise.instantiate(url)
    if plugin is None:
        msg = f"not a URL apprise takes (scheme {url.partition('://')[0][:20]!r}): see apprise's list of services"
        raise ValueError(msg)
    if getattr(plugin, "topics", None) == []:  # ntfy: it would send to nobody, for ever
        msg = "an ntfy URL names its topic: ntfy://host/topic, ntfys://host/topic or ntfy://topic (on ntfy.sh)"
        raise ValueError(msg)
    return url


_EMAIL_ONLY = ("from_", "to", "username", "password_env", "password_file", "ca_file")
_APPRISE_ONLY = ("apprise_urls", "urls_file")
_MESSAGES_ONLY = ("subject", "body")  # email and apprise: messages people read


class Receiver(StrictModel):
    """Where notifications go: a generic webhook (CloudEvents), Alertmanager (its API, kept in
    sync), a consumer of Alertmanager's webhook format, PagerDuty Events v2, e-mail (SMTP), or
    `log` (the gateway's own log, for trying things out: no URL)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["webhook", "alertmanager", "alertmanager-webhook", "pagerduty", "email", "apprise", "log"] = "webhook"
    # alertmanager: the base URL of Alertmanager, or a list of them (an HA pair: each is sent to)
    url: str | list[str] | None = None
    severities: list[Severity] | None = None  # only these (default: all)
    routing_key: str | None = None  # PagerDuty integration key
    timeout_s: Duration = 5.0
    # webhook: the CloudEvents HTTP binding's mode (structured: the event as JSON; binary: ce-* headers)
    mode: Literal["structured", "binary"] = "structured"
    # alertmanager: every open alert is sent again this often (and endsAt is 4 times this ahead)
    resend_interval: Duration = Field(default=60.0, ge=1, le=3600)
    # email: url smtp://host[:port] (STARTTLS when offered) or smtps://host[:port] (implicit TLS);
    # the login's password from the environment or a file, never from the rules file.
    from_: str | None = Field(default=None, alias="from")
    to: list[str] | None = None
    username: str | None = None
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    password_file: str | None = None
    ca_file: str | None = None  # the CA that signed the server's certificate (default: the system's)
    # apprise: its URLs (Slack, Teams, ntfy, Telegram...), and/or a file of them, one a line (for tokens)
    apprise_urls: list[Annotated[str, AfterValidator(_apprise_url)]] | None = Field(default=None, alias="urls")
    urls_file: str | None = None
    # email and apprise: the message's subject (title) and body, templates of TEMPLATE_FIELDS
    subject: Template | None = None
    body: Template | None = None
    # Grouping, as Alertmanager's (alerts/notify/groups.py): one message for the alerts that share
    # these labels' values, sent `group_wait` after the first, then at most every `group_interval`
    # with what changed, and again every `repeat_interval` while any is open. Pages never are.
    group_by: list[GroupLabel] | None = None
    group_wait: Duration | None = Field(default=None, le=86400)
    group_interval: Duration | None = Field(default=None, ge=1, le=86400)
    repeat_interval: Duration | None = Field(default=None, ge=60, le=30 * 86400)

    @model_validator(mode="after")
    def _consistent(self) -> Receiver:
        _check_grouping(self)
        for kinds, fields in (
            (("email",), _EMAIL_ONLY),
            (("apprise",), _APPRISE_ONLY),
            (("email", "apprise"), _MESSAGES_ONLY),
        ):
            given = [_NAMES.get(f, f) for f in fields if getattr(self, f) is not None]
            if given and self.kind not in kinds:
                msg = f"{', '.join(given)}: for {' and '.join(kinds)} receivers only"
                raise ValueError(msg)
        if self.kind in ("email", "apprise"):
            if self.mode == "binary" or self.routing_key is not None:
                msg = f"mode and routing_key are not for {self.kind} receivers"
                raise ValueError(msg)
            if self.kind == "email":
                _check_email(self)
            elif self.url is not None or not (self.apprise_urls or self.urls_file):
                msg = "an apprise receiver has urls: [apprise URLs] and/or urls_file (no url)"
                raise ValueError(msg)
            return self
        if self.kind == "pagerduty" and not PD_ROUTING_KEY.fullmatch(self.routing_key or ""):
            msg = "a pagerduty receiver needs routing_key, its integration key of 32 characters"
            raise ValueError(msg)
        if self.mode == "binary" and self.kind != "webhook":
            msg = "mode: binary is for webhook receivers (CloudEvents' binary content mode)"
            raise ValueError(msg)
        if (self.kind == "log") != (self.url is None):
            msg = "a log receiver has no url; every other kind needs one (http:// or https://)"
            raise ValueError(msg)
        if isinstance(self.url, list) and (self.kind != "alertmanager" or not self.url):
            msg = "a list of urls is for an alertmanager receiver (an HA pair); other kinds have one url"
            raise ValueError(msg)
        for url in self.urls:
            _check_url(url)
        return self

    @property
    def urls(self) -> list[str]:
        """The URLs as given (none for `log`)."""
        return [] if self.url is None else [self.url] if isinstance(self.url, str) else list(self.url)

    @property
    def targets(self) -> list[str]:
        """Where a request goes: Alertmanager's alerts API under each base URL; else the URL."""
        if self.kind == "alertmanager":
            return [u.rstrip("/") + "/api/v2/alerts" for u in self.urls]
        return self.urls

    @property
    def grouped(self) -> bool:
        """Whether this receiver's alert notifications are sent in groups."""
        return self.group_by is not None

    @property
    def wait_s(self) -> float:
        return 30.0 if self.group_wait is None else self.group_wait

    @property
    def interval_s(self) -> float:
        return 300.0 if self.group_interval is None else self.group_interval

    @property
    def repeat_s(self) -> float:
        return 4 * 3600.0 if self.repeat_interval is None else self.repeat_interval


_ADDRESS = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+")  # local@domain, one of each
PD_ROUTING_KEY = re.compile(r"[A-Za-z0-9]{32}")  # (fullmatch: no newline after it either)

_NAMES = {"from_": "from", "apprise_urls": "urls"}  # fields by the names the files use


GROUPED_KINDS = ("email", "apprise", "alertmanager-webhook", "log")  # what sends a message of many alerts


def _check_grouping(r: Receiver) -> None:
    timings = [f for f in ("group_wait", "group_interval", "repeat_interval") if getattr(r, f) is not None]
    if r.group_by is None:
        if timings:
            msg = f"{', '.join(timings)}: for a receiver with group_by"
            raise ValueError(msg)
        return
    if r.kind not in GROUPED_KINDS:
        msg = f"group_by is for {', '.join(GROUPED_KINDS)} receivers: a {r.kind} receiver takes one alert a request"
        raise ValueError(msg)
    if len(set(r.group_by)) != len(r.group_by):
        msg = f"group_by {r.group_by}: a label is named twice"
        raise ValueError(msg)
    if r.repeat_s < r.interval_s:
        msg = f"repeat_interval ({r.repeat_s:g} s) is shorter than group_interval ({r.interval_s:g} s)"
        raise ValueError(msg)


def _check_email(r: Receiver) -> None:
    if not isinstance(r.url, str) or not r.url.lower().startswith(("smtp://", "smtps://")):
        msg = "an email receiver needs url smtp://host[:port] (STARTTLS when offered) or smtps://host[:port]"
        raise ValueError(msg)
    try:
        parsed = httpx.URL(r.url)
        host, port = parsed.host, parsed.port
    except httpx.InvalidURL as exc:
        msg = f"url {r.url!r} is not a URL: {exc}"
        raise ValueError(msg) from exc
    if any(c.isspace() for c in r.url):
        msg = f"url {r.url!r}: a URL has no spaces"
        raise ValueError(msg)
    if parsed.userinfo:
        msg = "no credentials in the url: username, and password_env or password_file (no password in the rules file)"
        raise ValueError(msg)
    if not host or parsed.path not in ("", "/") or parsed.query:
        msg = f"url {r.url!r}: smtp://host[:port] or smtps://host[:port], nothing more"
        raise ValueError(msg)
    if port is not None and not 0 < port < 65536:
        msg = f"url {r.url!r}: port {port} is not a TCP port"
        raise ValueError(msg)
    _check_addresses(r)
    if (r.password_env or r.password_file) and not r.username:
        msg = "password_env or password_file is for a login: set username too"
        raise ValueError(msg)
    if r.password_env and r.password_file:
        msg = "password_env or password_file, not both"
        raise ValueError(msg)


def _check_addresses(r: Receiver) -> None:
    for who in [r.from_, *(r.to or [])]:
        if who is not None and not who.isprintable():
            msg = f"{who!r}: an e-mail address is one line of printable characters"
            raise ValueError(msg)
        if who is None:
            msg = "an email receiver needs from and to"
            raise ValueError(msg)
        found = getaddresses([who])
        if len(found) != 1 or not _ADDRESS.fullmatch(found[0][1]):
            msg = f"{who!r} is not one e-mail address (name@domain, or Name <name@domain>; a list item each)"
            raise ValueError(msg)
    if not r.to:
        msg = "an email receiver needs to: [addresses]"
        raise ValueError(msg)


def _check_url(url: str) -> None:
    if not url.lower().startswith(("http://", "https://")):
        msg = f"url {url!r}: http:// or https:// only"
        raise ValueError(msg)
    try:
        parsed = httpx.URL(url)
        host, port = parsed.host, parsed.port
        host.encode("idna")  # an empty or too long label: no name a resolver would take
    except (httpx.InvalidURL, UnicodeError) as exc:
        msg = f"url {url!r} is not a URL: {exc}"
        raise ValueError(msg) from exc
    if not host or any(c.isspace() for c in url):
        msg = f"url {url!r} names no host one could reach"
        raise ValueError(msg)
    if port is not None and not 0 < port < 65536:
        msg = f"url {url!r}: port {port} is not a TCP port"
        raise ValueError(msg)
