"""E-mail receivers (`kind: email`): one message per notification, with a plain-text and an HTML
part, threaded per alert (and per work order and person) by `Message-ID`, `In-Reply-To` and
`References`; sent by SMTP, with STARTTLS when the server offers it (`smtp://`) or implicit TLS
(`smtps://`), and a login whose password comes from the environment or a file."""

from __future__ import annotations

import hashlib
import html
import os
import re
import smtplib
import ssl
import string
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from alerts.dispatch.orders import WorkOrderEntryRow, WorkOrderRow
from alerts.notify.bodies import Links
from alerts.notify.receivers import TEMPLATE_FIELDS, Receiver
from alerts.tables import AlertDeviceRow, AlertRow, AlertTransitionRow, NotificationRow

DEFAULT_SUBJECT = "[{severity}{priority}] {status}: {summary}"

# What, where, how urgent, since when, and the staff page: what a person on a phone needs first.
DEFAULT_BODY = """{summary}

{status} · {severity}{priority}
Where: {where}
Since: {since}
By: {by}
Note: {note}

{link}
Acknowledge: {ack_link}
"""

# A group's message (alerts/notify/groups.py): how many, of what, where, then the list.
DEFAULT_GROUP_SUBJECT = "[{severity}] {summary}"

DEFAULT_GROUP_BODY = """{summary}

Where: {where}
Since: {since}

{alerts}

{link}
Acknowledge all that fire: {ack_link}
"""


def texts(receiver: Receiver, facts: Mapping[str, Any], *, grouped: bool = False) -> tuple[str, str]:
    """The subject (one line) and body of a message: the receiver's templates, or the defaults
    (a group's, for a group), filled in; a template whose fields are all empty here (`{note}`
    on a firing alert) gives the default's text: no message goes out blank."""
    subject, body = (DEFAULT_GROUP_SUBJECT, DEFAULT_GROUP_BODY) if grouped else (DEFAULT_SUBJECT, DEFAULT_BODY)
    title = one_line(render(receiver.subject or subject, facts)) or one_line(render(subject, facts))
    text = render(receiver.body or body, facts)
    return title, text if text.strip() else render(body, facts)


def local_time(at: datetime | None, links: Links) -> str | None:
    if at is None:
        return None
    local = at.astimezone(ZoneInfo(links.time_zone))
    return local.strftime("%Y-%m-%d %H:%M:%S ") + (local.tzname() or links.time_zone)


ACKABLE = ("firing", "flapping")  # an alert's notifications that carry an acknowledge link


def alert_facts(  # noqa: PLR0913, PLR0917
    n: NotificationRow,
    alert: AlertRow,
    tr: AlertTransitionRow,
    device: AlertDeviceRow | None,
    links: Links,
    person: str,
) -> dict[str, Any]:
    """What an alert's message can say (TEMPLATE_FIELDS); its acknowledge link acts as `person`
    (the receiver's name: whoever reads that mailbox or channel)."""
    state = device.state if device is not None else {}
    return {
        "summary": alert.summary, "status": n.status, "severity": alert.severity, "rule": alert.rule,
        "device": alert.device_id, "type": device.type if device is not None else None, "site": alert.site,
        "floor": state.get("floor"), "since": local_time(alert.fired_at, links),
        "by": None if tr.by == "engine" else tr.by, "note": tr.note, "link": links.alert(alert.id),
        "ack_link": links.ack("alert", alert.id, person, datetime.now(UTC)) if n.status in ACKABLE else None,
    }  # fmt: skip


ASSIGNED = "assigned"  # a page's order that an acknowledge link can still acknowledge


def page_facts(n: NotificationRow, order: WorkOrderRow, entry: WorkOrderEntryRow, links: Links) -> dict[str, Any]:
    """What a work order's page by e-mail can say (TEMPLATE_FIELDS)."""
    return {
        "summary": f"work order {order.id}: {order.summary}", "status": n.status, "priority": order.priority,
        "device": order.device_id, "type": order.device_type, "site": order.site,
        "since": local_time(order.created_at, links), "by": None if entry.by == "dispatch" else entry.by,
        "note": entry.note, "link": links.order(order.id), "order": order.id, "assignee": order.assignee,
        "step": entry.kind, "ack_deadline": local_time(order.ack_deadline, links),
        "ack_link": links.ack("order", order.id, n.person, datetime.now(UTC)) if entry.status == ASSIGNED else None,
    }  # fmt: skip


def render(template: str, facts: Mapping[str, Any]) -> str:
    """`template` with the facts filled in; lines whose fields are all empty are left out."""
    # A device's words are one line each: no line break or control character of theirs can
    # forge a line (a fake "Acknowledge:" link, say). {alerts} is ours, a line per alert.
    values = {f: "" if facts.get(f) is None else flat(str(facts[f]), keep_lines=f == "alerts") for f in TEMPLATE_FIELDS}
    values["where"] = ", ".join(f"{f} {values[f]}" for f in ("site", "device", "floor") if values[f])
    out: list[str] = []
    for line in template.split("\n"):
        fields = [f for _, f, _, _ in string.Formatter().parse(line) if f]
        if fields and all(not values[f] for f in fields):
            continue  # "Note: " without a note says nothing
        out.append(line.format_map(values))
    return "\n".join(out).strip() + "\n"


def message(  # noqa: PLR0913
    receiver: Receiver,
    facts: Mapping[str, Any],
    own: str,
    parent: str | None,
    at: datetime,
    *,
    grouped: bool = False,
) -> EmailMessage:
    """The e-mail for one notification, dated `at` (when it is sent): Message-ID `own`, and
    `parent` (the first message of its alert, or of its work order and person; None: this is that
    one) as In-Reply-To and References."""
    domain = parseaddr(receiver.from_ or "")[1].rpartition("@")[2] or "iotgw"
    subject, text = texts(receiver, facts, grouped=grouped)
    msg = EmailMessage()
    msg["Subject"] = subject[:200]
    msg["From"] = receiver.from_ or ""
    msg["To"] = ", ".join(recipients(receiver))
    msg["Date"] = format_datetime(at)
    msg["Message-ID"] = f"<{own}@{domain}>"
    if parent is not None:
        msg["In-Reply-To"] = msg["References"] = f"<{parent}@{domain}>"
    msg["Auto-Submitted"] = "auto-generated"  # (RFC 3834: no vacation replies)
    msg.set_content(text)
    ours = {str(facts[f]) for f in ("link", "ack_link") if facts.get(f)}
    msg.add_alternative(_html(text, str(facts.get("link") or ""), ours), subtype="html")
    return msg


def flat(text: str, *, keep_lines: bool = False) -> str:
    """`text` with every control character (and line break, unless `keep_lines`) a space."""
    lines = text.split("\n") if keep_lines else [text]
    return "\n".join("".join(c if c.isprintable() else " " for c in line) for line in lines)


def one_line(text: str) -> str:
    """`text` as a header value: every line break and control character a space, and no "=?"
    (an encoded word that Python's email package would decode into a line break: CVE-2024-6923)."""
    joined = " ".join(flat(line) for line in text.splitlines())
    return joined.replace("=?", "= ?").strip()


_URL = re.compile(r"https?://[^\s<>\"']+")


def _linked(line: str, ours: set[str]) -> str:
    """`line` as HTML, the gateway's own links in it (`ours`) as links; any other address stays
    text (a device's words could name one)."""
    out, at = [], 0
    for m in _URL.finditer(line):
        if m.group() not in ours:
            continue
        url = html.escape(m.group(), quote=True)
        out += [html.escape(line[at : m.start()]), f'<a href="{url}">{url}</a>']
        at = m.end()
    return "".join([*out, html.escape(line[at:])])


def _html(text: str, link: str, ours: set[str]) -> str:
    lines = text.strip().split("\n")
    head, rest = html.escape(lines[0]), [_linked(x, ours) for x in lines[1:] if x != link]
    button = f'<p><a href="{html.escape(link, quote=True)}">Open in iotgw</a></p>' if link else ""
    return (
        '<!doctype html><html><body style="font-family:sans-serif;font-size:16px;line-height:1.4">'
        f"<p><strong>{head}</strong></p><p>{'<br>'.join(rest).strip()}</p>{button}</body></html>"
    )


def password(receiver: Receiver) -> str | None:
    """The login's password, read now from the variable or file the receiver names (so a rotated
    file is read at the next try); None: the receiver has no login. A ValueError if it is missing."""
    if receiver.password_env:
        value = os.environ.get(receiver.password_env)
        if value is None:
            msg = f"the environment variable {receiver.password_env} (password_env) is not set"
            raise ValueError(msg)
        return value
    if receiver.password_file:
        try:
            return Path(receiver.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            msg = f"cannot read password_file {receiver.password_file}: {exc.strerror or exc}"
            raise ValueError(msg) from exc
    return None


@dataclass(slots=True)
class _Progress:
    """A message's recipients that took it, and those refused for good (with the server's words)."""

    took: set[str] = field(default_factory=set)
    gone: dict[str, str] = field(default_factory=dict)


# The progress of messages some of whose recipients were refused for now (4xx), by receiver and
# Message-ID: their retries go to those alone. In memory: after a restart a retry goes to every
# recipient again, under the same Message-ID (mail clients show one).
_PROGRESS: OrderedDict[tuple[str, str, str], _Progress] = OrderedDict()
_PROGRESS_MAX = 10_000
_progress_lock = threading.Lock()


def send(receiver: Receiver, msg: EmailMessage) -> tuple[str, str | None, float | None]:
    """Send once: (outcome, error, None), outcome as for HTTP (`alerts.notify.http.post`):
    delivered; transient (a 4xx reply, a server down or slow: retried); rejected (a 5xx reply, a
    refused login or recipient: final). Every recipient must take it: while some are refused for
    now it is transient, and its retry goes to those alone; then one refused for good makes it
    rejected, naming who."""
    # A group's message keeps its Message-ID while what it says changes: what it says is in the key.
    plain = msg.get_body(("plain",))
    said = hashlib.sha256(f"{msg['Subject']}\n{plain.get_content() if plain else ''}".encode()).hexdigest()
    key = (receiver.name, str(msg["Message-ID"]), said)
    with _progress_lock:
        known = _PROGRESS.get(key)
        progress = _Progress(set(known.took), dict(known.gone)) if known else _Progress()
    wanted = [a for a in recipients(receiver) if a not in progress.took and a not in progress.gone]
    if wanted:
        outcome, error, refused = _send_to(receiver, msg, wanted)
        if refused is None and outcome != "delivered":  # the whole session failed
            if outcome != "transient":
                _forget(key)
            return outcome, error, None
        refused = refused or {}
        progress.took |= {a for a in wanted if a not in refused}
        progress.gone |= {a: f"{a}: {code} {_text(reply)}" for a, (code, reply) in refused.items() if code >= 500}
        later = [f"{a}: {code} {_text(reply)}" for a, (code, reply) in refused.items() if code < 500]
        if later:
            with _progress_lock:
                _PROGRESS[key] = progress
                _PROGRESS.move_to_end(key)
                while len(_PROGRESS) > _PROGRESS_MAX:
                    _PROGRESS.popitem(last=False)
            gone = f"; for good: {'; '.join(progress.gone.values())}" if progress.gone else ""
            return "transient", f"recipients refused for now: {'; '.join(later)}{gone}"[:300], None
    _forget(key)
    if progress.gone:
        others = "; taken by the others" if progress.took else ""
        return "rejected", f"recipients refused: {'; '.join(progress.gone.values())}{others}"[:300], None
    return "delivered", None, None


def recipients(receiver: Receiver) -> list[str]:
    """The receiver's `to`, each address once (`ops@x`, `Ops <ops@x>` and `OPS@x` are one)."""
    seen: dict[str, str] = {}
    for who in receiver.to or ():
        seen.setdefault(parseaddr(who)[1].lower() or who, who)
    return list(seen.values())


def _forget(key: tuple[str, str, str]) -> None:
    with _progress_lock:
        _PROGRESS.pop(key, None)


def _send_to(  # noqa: PLR0911 - one per outcome
    receiver: Receiver, msg: EmailMessage, to: list[str]
) -> tuple[str, str | None, Mapping[str, Any] | None]:
    """One SMTP session sending `msg` to `to`: (outcome, error, the recipients the server
    refused, if it refused any: then `send` judges the outcome)."""
    url = urlsplit(receiver.url if isinstance(receiver.url, str) else "")
    implicit = url.scheme == "smtps"
    try:
        secret = password(receiver)
    except ValueError as exc:
        return "transient", str(exc), None  # fixed by the operator, then retried
    context = ssl.create_default_context(cafile=receiver.ca_file or None)
    host, port = url.hostname or "", url.port or (465 if implicit else 25)
    try:
        smtp: smtplib.SMTP = (
            smtplib.SMTP_SSL(host, port, timeout=receiver.timeout_s, context=context)
            if implicit
            else smtplib.SMTP(host, port, timeout=receiver.timeout_s)
        )
        with smtp:
            smtp.ehlo()
            if not implicit and smtp.has_extn("starttls"):
                smtp.starttls(context=context)
                smtp.ehlo()
            if receiver.username:
                if not isinstance(smtp.sock, ssl.SSLSocket):
                    return "rejected", "the server offers no STARTTLS: a password is not sent in the clear", None
                _login(smtp, receiver.username, secret or "")
            refused = smtp.send_message(msg, to_addrs=to)
    except smtplib.SMTPRecipientsRefused as exc:  # every one of them (`send` says what that makes it)
        return "transient", None, exc.recipients
    except smtplib.SMTPResponseException as exc:
        outcome = "transient" if 400 <= exc.smtp_code < 500 else "rejected"
        return outcome, f"SMTP {exc.smtp_code}: {_text(exc.smtp_error)}"[:300], None
    except smtplib.SMTPNotSupportedError as exc:  # no AUTH offered, say: it would not be, next time either
        return "rejected", f"{exc}"[:300], None
    except UnicodeError:  # smtplib sends a login as ASCII only
        return "rejected", "the username or password is not ASCII: smtplib cannot send it", None
    except (TimeoutError, smtplib.SMTPException, ssl.SSLError, OSError) as exc:
        return "transient", f"{type(exc).__name__}: {exc}"[:300], None
    return "delivered", None, refused or None  # (refused: some of them, the others took it)


def _login(smtp: smtplib.SMTP, username: str, secret: str) -> None:
    """One mechanism, PLAIN where offered (smtplib's `login` tries the next one after a refusal,
    and a server may wait for ever in the middle of LOGIN's exchange)."""
    offered = (smtp.esmtp_features.get("auth") or "").upper().split()
    smtp.user, smtp.password = username, secret
    if "PLAIN" in offered:
        smtp.auth("PLAIN", smtp.auth_plain)
    elif "LOGIN" in offered:
        smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
    else:
        smtp.login(username, secret)  # CRAM-MD5 only, or no AUTH: smtplib says which


def _text(reply: bytes | str) -> str:
    return " ".join((reply.decode(errors="replace") if isinstance(reply, bytes) else reply).split())
