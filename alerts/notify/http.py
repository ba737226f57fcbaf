"""One delivery request: one deadline for all of it, no redirects, one TLS context, and what the
answer means (delivered, transient, rejected, unreachable)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
from typing import TypeAlias

import httpx

log = logging.getLogger("alerts.notify.notifier")


TRANSIENT_4XX = frozenset({408, 425, 429})


Request: TypeAlias = tuple[bytes, dict[str, str]]  # body and headers


OUTCOME_RANK = {"delivered": 0, "transient": 1, "rejected": 2, "unreachable": 3}


def post(url: str, content: bytes, headers: dict[str, str], timeout_s: float) -> tuple[str, str | None, float | None]:
    """POST once, all of it (connecting, sending, the whole answer) within `timeout_s`:
    (outcome, error, Retry-After seconds); outcome delivered, transient (to retry), rejected (a
    4xx other than 408, 425, 429, or a redirect: final) or unreachable (a URL no request can use)."""
    try:
        r = asyncio.run(_post(url, content, headers, timeout_s))
    except TimeoutError:
        return "transient", f"no complete answer within {timeout_s:g} s", None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError, ValueError) as exc:
        return "unreachable", f"{type(exc).__name__}: {exc}"[:300], None
    except httpx.HTTPError as exc:
        return "transient", f"{type(exc).__name__}: {exc}"[:300], None
    if r.is_success:
        return "delivered", None, None
    if r.is_redirect:  # not followed (the body would not go on as it was): the URL to set is that one
        where = r.headers.get("Location", "?")[:200]
        return "rejected", f"HTTP {r.status_code} to {where}: set that as the receiver's url", None
    answer = " ".join(r.text.split())[:200]
    error = f"HTTP {r.status_code}" + (f": {answer}" if answer else "")
    permanent = 400 <= r.status_code < 500 and r.status_code not in TRANSIENT_4XX
    return ("rejected" if permanent else "transient"), error, _retry_after(r)


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every request (loading the CA bundle costs some 45 ms a client)."""
    return httpx.create_ssl_context()


async def _post(url: str, content: bytes, headers: dict[str, str], timeout_s: float) -> httpx.Response:
    # httpx's timeouts are per read: a receiver trickling its answer a byte at a time would hold
    # the lane for ever. The whole exchange has one deadline here, the answer's body included.
    client = httpx.AsyncClient(follow_redirects=False, timeout=timeout_s, verify=_tls())
    async with client, asyncio.timeout(timeout_s):
        r = await client.post(url, content=content, headers=headers)
        await r.aread()
        return r


def readable(content: bytes) -> str:
    """One short line for a person reading the log, from a CloudEvent's JSON."""
    try:
        ev = json.loads(content)
        data = ev.get("data") or {}
        what = data.get("summary") or data.get("note") or ""
        who = f" -> {data['assignee']}" if data.get("assignee") else ""
        severity = data.get("severity") or data.get("priority") or ""
        return f"{ev.get('type')} [{severity}] {ev.get('subject')}{who}: {what}"[:300]
    except (ValueError, AttributeError, TypeError):
        return content[:300].decode(errors="replace")


def _retry_after(r: httpx.Response) -> float | None:
    """A `Retry-After` in seconds (the HTTP-date form is rare from receivers: then None)."""
    value = r.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None
