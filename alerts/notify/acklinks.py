"""Acknowledge links: every notification of a firing alert or a page carries a link that
acknowledges it as the person (or receiver) it was sent to, signed (HMAC-SHA256 with
IOTGW_ACK_LINK_KEY) and expiring (IOTGW_ACK_LINK_VALID_S). The token is the link's last part:
what it acknowledges, as whom, until when, and the signature of that."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime

KINDS = ("alert", "order", "group")  # group: every alert of a receiver's group that fires


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid link allows: acknowledging one alert or work order as `person`, until `expires`."""

    kind: str  # alert | order | group
    id: int
    person: str
    expires: datetime


class LinkError(ValueError):
    """A link that is not (or no longer) valid; `expired` tells the two apart."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: str, payload: str) -> str:
    return _b64(hmac.new(key.encode(), payload.encode("ascii"), hashlib.sha256).digest())


def token(key: str, grant: Grant) -> str:
    """The signed token of `grant`."""
    payload = _b64(json.dumps([grant.kind, grant.id, grant.person, int(grant.expires.timestamp())]).encode())
    return f"{payload}.{_mac(key, payload)}"


def verify(key: str, text: str, now: datetime) -> Grant:
    """The grant `text` carries, if `key` signed it and it has not expired; else a LinkError."""
    payload, _, mac = text.partition(".")
    if (
        not key
        or not payload.isascii()
        or not payload
        or not hmac.compare_digest(mac.encode(), _mac(key, payload).encode())
    ):
        msg = "this link is not valid: it was changed, or it is not from this gateway"
        raise LinkError(msg)
    kind, ident, person, expires = json.loads(_unb64(payload))
    grant = Grant(str(kind), int(ident), str(person), datetime.fromtimestamp(int(expires), UTC))
    if grant.kind not in KINDS:
        raise LinkError("this link is not valid: it acknowledges nothing this gateway knows")
    if now >= grant.expires:
        msg = f"this link expired at {grant.expires:%Y-%m-%d %H:%M} UTC"
        raise LinkError(msg, expired=True)
    return grant
