"""Chat and push receivers (`kind: apprise`): Slack, Microsoft Teams, Google Chat, Telegram,
ntfy, Matrix, Pushover, SMS gateways and the rest, through apprise (one kept library for them
all). A notification is one message with a title and a body, to every URL of the receiver.

apprise says only whether every service took the message: a failure is transient (retried
with the usual backoff, up to the maximum age), with the words apprise logged for it."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from alerts.notify.mail import texts
from alerts.notify.receivers import Receiver


@dataclass(frozen=True, slots=True)
class Push:
    """One message for an apprise receiver."""

    title: str
    body: str
    kind: str  # apprise's notify type: info, success, warning, failure


def push(receiver: Receiver, facts: Mapping[str, Any], *, grouped: bool = False) -> Push:
    """The message of one notification (or group): the receiver's `subject` and `body` templates
    (or the defaults) filled in, and how bad it is."""
    title, body = texts(receiver, facts, grouped=grouped)
    return Push(title[:250], body, _kind(facts))


def _kind(facts: Mapping[str, Any]) -> str:
    status = str(facts.get("status") or "")
    if status in ("resolved", "handed_over"):
        return "success"
    if status not in ("firing", "flapping") and facts.get("priority") is None:
        return "info"  # acknowledged
    urgent = facts.get("severity") in ("critical", "major") or facts.get("priority") in ("P1", "P2")
    return "failure" if urgent else "warning" if facts.get("severity") != "info" else "info"


def targets(receiver: Receiver) -> list[str]:
    """The receiver's apprise URLs: `urls`, then the lines of `urls_file` (read at every try, so a
    token kept out of the rules file can be rotated). A ValueError if the file cannot be read."""
    found = list(receiver.apprise_urls or ())
    if receiver.urls_file:
        try:
            lines = Path(receiver.urls_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            msg = f"cannot read urls_file {receiver.urls_file}: {exc.strerror or exc}"
            raise ValueError(msg) from exc
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return found


def send(receiver: Receiver, message: Push) -> tuple[str, str | None, float | None]:
    """Send once to every URL: (delivered | transient, error, None)."""
    apprise = _apprise()
    try:
        urls = targets(receiver)
    except ValueError as exc:
        return "transient", str(exc), None
    if not urls:
        return "transient", "no apprise URL (urls_file is empty)", None
    hub = apprise.Apprise()
    refused = [i + 1 for i, url in enumerate(urls) if not hub.add(_with_timeouts(apprise, url, receiver.timeout_s))]
    if refused:
        return "transient", f"apprise does not take URL {', '.join(map(str, refused))} of the receiver", None
    result = hub.notify(
        body=message.body, title=message.title, notify_type=apprise.NotifyType(message.kind),
        body_format=apprise.NotifyFormat.TEXT,
    )  # fmt: skip
    if result:
        return "delivered", None, None
    words = [f"{r.name}: {e.message}" for r in result.results if not r for e in r.logs() if e.level != "DEBUG"]
    failed = [r.name for r in result.results if not r]
    error = "; ".join(words) or f"apprise could not deliver to {', '.join(failed) or 'its services'}"
    return "transient", error[:300], None


def _with_timeouts(apprise: Any, url: str, timeout_s: float) -> Any:  # noqa: ANN401 - apprise's plugin
    """The service of `url`, waiting `timeout_s` to connect and for each read (apprise's `cto`
    and `rto`, unless the URL sets them); None if apprise does not take it."""
    plugin = apprise.Apprise.instantiate(url)
    if plugin is None:
        return None
    given = parse_qs(urlsplit(url).query)
    if "cto" not in given:
        plugin.socket_connect_timeout = timeout_s
    if "rto" not in given:
        plugin.socket_read_timeout = timeout_s
    return plugin


@functools.cache
def _apprise() -> Any:  # noqa: ANN401 - the module, imported when first needed (it is large)
    import apprise  # noqa: PLC0415

    return apprise
