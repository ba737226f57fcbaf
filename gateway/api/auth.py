"""API keys and roles, the audit trail of mutations, and request body limits.

A key comes in `Authorization: Bearer <key>` (or `X-API-Key: <key>`). Routes declare the role
they need with `dependencies=VIEWER | TECHNICIAN | ADMIN`; a missing or unknown key is 401 with
`WWW-Authenticate`, a key whose role is too low 403. Every POST/PUT/PATCH/DELETE under /api by
an identified caller leaves an audit row, whatever its outcome.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import StoreError
from gateway.security import Principal, record_audit, verify_api_key

log = logging.getLogger(__name__)

MUTATIONS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Who acts when API keys are switched off (IOTGW_API_AUTH=false): full rights, and the audit says so.
ANONYMOUS = Principal("anonymous (API keys off)", "admin")


@dataclass(frozen=True, slots=True)
class ApiSecurity:
    """The API's security settings (from `Settings`)."""

    auth: bool = True
    open_probes: bool = True
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024
    password_file: str = ""  # the broker's, for provisioning devices through the API
    pid_file: str = ""
    reserved_names: tuple[str, ...] = ("iotgw", "iotgw-")  # no device may be called so
    max_concurrent: int = 8  # API requests at once (the event stream aside), and per key
    max_concurrent_per_key: int = 4


# Declared in the OpenAPI schema, so /docs has an "Authorize" button; checked by `require`.
BEARER = HTTPBearer(auto_error=False, description="an API key: iotgw apikeys create --role ROLE --name NAME")


def _presented_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is not None and credentials.credentials.strip():
        return credentials.credentials.strip()
    return request.headers.get("x-api-key") or None


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": 'Bearer realm="iotgw"'})


def require(role: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that lets a request through when its key's role includes `role`."""

    async def check(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> Principal:
        state = request.app.state.iotgw
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            if not state.security.auth:
                principal = ANONYMOUS
            else:
                key = _presented_key(request, credentials)
                if key is None:
                    sent = request.headers.get("authorization", "")
                    if sent and not sent.lower().startswith("bearer "):
                        msg = "the Authorization header needs the Bearer scheme: `Authorization: Bearer <key>`"
                    else:
                        msg = "an API key is required: send `Authorization: Bearer <key>` (iotgw apikeys create)"
                    raise _unauthorized(msg)
                principal = await asyncio.to_thread(verify_api_key, state.store, key)
                if principal is None:
                    raise _unauthorized("invalid or revoked API key")
            request.state.principal = principal
        if not principal.may(role):
            raise HTTPException(status_code=403, detail=f"the {principal.role} role may not do this: it needs {role}")
        return principal

    return check


VIEWER = [Depends(require("viewer"))]
TECHNICIAN = [Depends(require("technician"))]
ADMIN = [Depends(require("admin"))]


class _TooLarge(Exception):
    pass


async def _json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# No text column anywhere takes a NUL character (PostgreSQL refuses them outright).
NUL_REFUSED = "NUL characters (\\u0000, %00) are not accepted in parameters or bodies"


def _has_nul(raw: bytes) -> bool:
    lowered = raw.lower()
    return b"\x00" in raw or b"%00" in raw or b"\\u0000" in lowered


class Guard:
    """ASGI middleware: refuses bodies over the limit (413, before the route reads them) and NUL
    characters (422), and writes the audit row of every mutation after its response."""

    def __init__(self, app: ASGIApp, *, security: ApiSecurity, store: Any) -> None:  # noqa: ANN401 - Store
        self.app = app
        self.limit = security.max_body_bytes
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _has_nul(scope.get("query_string", b"")) or "\x00" in scope["path"]:
            await _json(send, 422, NUL_REFUSED)
            return
        if scope["method"] not in MUTATIONS:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._body(scope, receive)
        except _TooLarge:
            await _json(send, 413, f"request body larger than {self.limit} bytes (IOTGW_MAX_BODY_BYTES)")
            return
        if _has_nul(body):
            await _json(send, 422, NUL_REFUSED)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # the disconnect, when the client goes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, sending)
        finally:
            await self._audit(scope, status)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _audit(self, scope: Scope, status: int) -> None:
        principal = scope.get("state", {}).get("principal")
        if principal is None or not scope["path"].startswith("/api/"):
            return  # refused before anybody was identified: logged by the server, not audited
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            await asyncio.to_thread(
                record_audit, self.store, principal, (scope["method"], scope["path"], query, status)
            )
        except StoreError as exc:
            what = f"{scope['method']} {scope['path']} by {principal.name}"
            log.error("could not write the audit row of %s: %s", what, exc)  # noqa: TRY400 - one line, no traceback
