"""A real SMTP server for the e-mail receiver tests (aiosmtpd): STARTTLS or implicit TLS on a
throwaway certificate, a login, and the messages it accepted, as parsed e-mails."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from gateway.cli.broker import free_port

USER, PASSWORD = "iotgw", "s3cret-smtp"


@dataclass
class Mailbox:
    """What the server took: the messages, with the login and whether TLS carried each."""

    messages: list[EmailMessage] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    tls: list[bool] = field(default_factory=list)
    refuse_next: int = 0  # answer this many DATA commands with a 451 first (a server busy for now)
    refuse_rcpt: dict[str, list[str]] = field(default_factory=dict)  # an address's answers to RCPT, then 250
    envelopes: list[list[str]] = field(default_factory=list)  # each message's recipients (RCPT TO)

    async def handle_RCPT(self, _server: Any, _session: Any, envelope: Any, address: str, _options: Any) -> str:
        answers = self.refuse_rcpt.get(address)
        if answers:
            return answers[0] if len(answers) == 1 and answers[0].startswith("5") else answers.pop(0)  # (5xx: always)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return "451 4.3.0 try again later"
        msg = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append(msg)
        self.envelopes.append(list(envelope.rcpt_tos))
        self.logins.append(str(session.auth_data or ""))
        self.tls.append(server.transport.get_extra_info("ssl_object") is not None)
        return "250 OK"


def _authenticate(_server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == USER.encode() and data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False, auth_data=USER if ok else None)  # (handled: aiosmtpd answers 535)


@dataclass
class SmtpServer:
    port: int
    mailbox: Mailbox
    ca_file: Path


@contextmanager
def smtp_server(tmp: Path, *, implicit_tls: bool = False, plain: bool = False) -> Iterator[SmtpServer]:
    """An SMTP server on 127.0.0.1: STARTTLS required before the login (or, `implicit_tls`, TLS
    from the first byte; `plain`: no TLS at all, and a login taken in the clear), login iotgw /
    s3cret-smtp; its CA's certificate in `ca_file`."""
    ca = trustme.CA()
    ca_file = tmp / "smtp-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    mailbox = Mailbox()
    port = free_port()
    # (aiosmtpd offers AUTH under implicit TLS only without auth_require_tls: it looks for STARTTLS.)
    tls: dict[str, Any] = (
        {"ssl_context": server_ctx, "server_hostname": "127.0.0.1", "auth_require_tls": False}
        if implicit_tls
        else {"auth_require_tls": False}
        if plain
        else {"tls_context": server_ctx, "require_starttls": True, "auth_require_tls": True}
    )
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, authenticator=_authenticate, **tls)
    controller.start()
    try:
        yield SmtpServer(port, mailbox, ca_file)
    finally:
        controller.stop()
