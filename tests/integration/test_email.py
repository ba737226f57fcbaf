"""E-mail receivers against a real SMTP server (aiosmtpd): STARTTLS and a login, implicit TLS, the
messages of an alert's life threaded together, and a server's refusals told apart (a 4xx is
retried, a refused login fails at once)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlmodel import select

from alerts.dispatch.consumer import Dispatch
from alerts.dispatch.roster import load_roster
from alerts.notify import mail
from alerts.notify.receivers import Receiver
from alerts.tables import DeliveryRow
from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from tests.support.dispatching import ROSTER, RULES, WED_10_BERLIN, Clock, one_order, trap
from tests.support.elevators import alerts_of, caught_up, door_jam_rules, state
from tests.support.gateway import running_gateway, wait_for
from tests.support.smtp import PASSWORD, USER, SmtpServer, smtp_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[SmtpServer]:
    with smtp_server(tmp_path) as server:
        yield server


def _receiver(server: SmtpServer, scheme: str = "smtp", **extra: Any) -> Receiver:
    return Receiver.model_validate({
        "name": "ops-mail", "kind": "email", "url": f"{scheme}://127.0.0.1:{server.port}",
        "from": "iotgw@example.org", "to": ["ops@example.org"], "username": USER,
        "password_env": "IOTGW_TEST_SMTP_PASSWORD", "ca_file": str(server.ca_file), **extra,
    })  # fmt: skip


def _message(receiver: Receiver) -> Any:
    facts = {"summary": "Door jammed on el-1", "status": "firing", "severity": "major", "site": "hq",
             "device": "el-1", "link": "http://staff.example/ui/?alert=1"}  # fmt: skip
    return mail.message(receiver, facts, "iotgw.alert-1", None, datetime.now(UTC))


async def test_an_alerts_life_reaches_a_mailbox_as_one_thread(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", PASSWORD)
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""
rules:
  - name: door-jam
    severity: major
    summary: "Door jammed on {{device}}"
    event:
      type: elevator.fault.raised
      data: {{code: DOOR_JAM}}
      clear: {{type: elevator.fault.cleared, data: {{code: DOOR_JAM}}}}
receivers:
  - name: ops-mail
    kind: email
    url: "smtp://127.0.0.1:{smtp.port}"
    from: "iotgw <iotgw@example.org>"
    to: ["ops@example.org", "lead@example.org"]
    username: {USER}
    password_env: IOTGW_TEST_SMTP_PASSWORD
    ca_file: "{smtp.ca_file}"
""")
    settings = settings_for(broker, consumers="alerts", rules_file=str(rules), public_url="https://staff.example")
    async with running_gateway(settings) as gw:
        async with mqtt_client(broker.url_as("tester"), "el-m1") as c:
            await c.publish("devices/el-m1/state", state(1, floor=4), qos=1)
            await c.publish("devices/el-m1/state", state(2, mode="fault", fault="DOOR_JAM", floor=4), qos=1)
            await caught_up(gw, "el-m1", 2)
            (alert,) = await alerts_of(gw)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
                r = await client.post(f"/api/alerts/{alert['id']}/ack", json={"by": "ana", "note": "on my way"})
                assert r.status_code == 200
            await c.publish("devices/el-m1/state", state(3, floor=4), qos=1)
            await caught_up(gw, "el-m1", 3)

        def deliveries() -> list[DeliveryRow]:
            with gw.store.session() as tx:
                return list(tx.exec(select(DeliveryRow)))

        async def three() -> bool:  # (each outcome is committed after the server took it)
            return len(smtp.mailbox.messages) >= 3 and [d.status for d in deliveries()] == ["delivered"] * 3

        await wait_for(three, timeout=30, what="three e-mails")
        sent_as = {d.sent_as for d in deliveries()}
    assert sent_as == {m["Message-ID"] for m in smtp.mailbox.messages}  # what the API says each went as
    firing, acked, resolved = smtp.mailbox.messages
    assert smtp.mailbox.tls == [True, True, True]  # STARTTLS before the login, every time
    assert smtp.mailbox.logins == [USER] * 3
    assert firing["Subject"] == "[major] firing: Door jammed on el-m1"
    assert acked["Subject"] == "[major] acknowledged: Door jammed on el-m1"
    assert firing["To"] == "ops@example.org, lead@example.org"
    root = f"<iotgw.alert-{alert['id']}@example.org>"
    assert firing["Message-ID"] == root
    assert firing["In-Reply-To"] is None
    for later in (acked, resolved):
        assert later["In-Reply-To"] == later["References"] == root
        assert later["Message-ID"] not in (root, firing["Message-ID"])
        assert later["Message-ID"].startswith("<iotgw-alert-")  # its notification's key, prefixed once
    assert len({m["Message-ID"] for m in smtp.mailbox.messages}) == 3
    text = firing.get_body(("plain",)).get_content()
    html = firing.get_body(("html",)).get_content()
    assert "Where: site hq, device el-m1, floor 4" in text
    assert f"https://staff.example/ui/?alert={alert['id']}" in text
    assert f'href="https://staff.example/ui/?alert={alert["id"]}"' in html
    assert "Since: " in text
    assert "By:" not in text
    ack_text = acked.get_body(("plain",)).get_content()
    assert "By: ana" in ack_text
    assert "Note: on my way" in ack_text


async def test_a_technician_is_paged_by_email(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", PASSWORD)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    mailer = (
        f'{{name: pager, kind: email, url: "smtp://127.0.0.1:{smtp.port}", from: "dispatch@example.org", '
        f'to: ["tina@example.org"], username: {USER}, password_env: IOTGW_TEST_SMTP_PASSWORD, '
        f'ca_file: "{smtp.ca_file}"}}'
    )
    roster = ROSTER.format(url="-").replace('{name: pager, kind: webhook, url: "-"}', mailer)
    clock = Clock(WED_10_BERLIN)
    d = Dispatch(load_roster(roster), clock=clock)
    settings = settings_for(
        broker, consumers="alerts", rules_file=str(rules), time_zone="Europe/Berlin",
        ack_link_key="k3y-for-the-tests-0123456789abcdef", public_url="https://staff.example",
    )  # fmt: skip
    async with running_gateway(settings, consumers=[d]) as gw:
        await trap(broker, clock)
        order = await one_order(gw, "the entrapment's work order", lambda o: o["status"] == "assigned")

        async def paged() -> bool:
            return len(smtp.mailbox.messages) >= 1

        await wait_for(paged, what="the page by e-mail")
        # Its link acknowledges the order as the technician paged.
        text = smtp.mailbox.messages[0].get_body(("plain",)).get_content()
        link = next(
            line.removeprefix("Acknowledge: ") for line in text.splitlines() if line.startswith("Acknowledge: ")
        )
        path = link.removeprefix("https://staff.example")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            assert "Acknowledge as tina" in (await client.get(path)).text
            # Passed on to Abe: tina's link no longer acknowledges it (Abe was paged with his own).
            moved = {"by": "sue", "to": "abe", "note": "tina is at the other site"}
            r = await client.post(f"/api/work-orders/{order['id']}/reassign", json=moved)
            assert r.status_code == 200, r.text
            page = await client.get(path)
            assert "It is assigned to abe now, not to tina." in page.text
            assert "<button" not in page.text
            refused = await client.post(path)
            assert refused.status_code == 409
            still = (await client.get(f"/api/work-orders/{order['id']}")).json()
            assert (still["status"], still["assignee"], still["acked_by"]) == ("assigned", "abe", None)
            back = {"by": "sue", "to": "tina", "note": "tina is here after all"}
            assert (await client.post(f"/api/work-orders/{order['id']}/reassign", json=back)).status_code == 200
            clicks = await asyncio.gather(*(client.post(path) for _ in range(4)))  # hers again, double-clicked:
            assert sorted(r.status_code for r in clicks) == [200, 409, 409, 409], [r.text for r in clicks]  # once
            acked = (await client.get(f"/api/work-orders/{order['id']}")).json()
        assert (acked["status"], acked["acked_by"]) == ("acknowledged", "tina")
    page = smtp.mailbox.messages[0]
    assert page["Subject"] == f"[P1] assigned: work order {order['id']}: el-1 stuck at floor 3 with 80 kg inside"
    assert page["To"] == "tina@example.org"
    text = page.get_body(("plain",)).get_content()
    assert f"/ui/?work_order={order['id']}" in text
    assert "Since: 2026-11-25 10:00:00 CET" in text  # the simulated 09:00 UTC, in the gateway's zone
    assert page["Message-ID"] == f"<iotgw.order-{order['id']}.tina@example.org>"  # a reminder would thread under it
    assert page["In-Reply-To"] is None


async def test_implicit_tls_and_a_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", PASSWORD)
    with smtp_server(tmp_path, implicit_tls=True) as server:
        receiver = _receiver(server, "smtps", subject="{site}: {summary}", body="{summary} ({severity})\n{link}")
        assert mail.send(receiver, _message(receiver)) == ("delivered", None, None)
        (got,) = server.mailbox.messages
    assert server.mailbox.tls == [True]
    assert got["Subject"] == "hq: Door jammed on el-1"
    text = got.get_body(("plain",)).get_content().replace("\r\n", "\n")  # (SMTP's line ends)
    assert text == "Door jammed on el-1 (major)\nhttp://staff.example/ui/?alert=1\n"


async def test_a_busy_server_is_retried_and_a_refused_login_is_final(
    smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = _receiver(smtp)
    monkeypatch.delenv("IOTGW_TEST_SMTP_PASSWORD", raising=False)
    outcome, error, _ = mail.send(receiver, _message(receiver))
    assert (outcome, error) == (
        "transient",
        "the environment variable IOTGW_TEST_SMTP_PASSWORD (password_env) is not set",
    )
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", "wrong")
    outcome, error, _ = mail.send(receiver, _message(receiver))
    assert outcome == "rejected"
    assert error is not None
    assert error.startswith("SMTP 535")
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", PASSWORD)
    smtp.mailbox.refuse_next = 1
    outcome, error, _ = mail.send(receiver, _message(receiver))
    assert outcome == "transient"
    assert error is not None
    assert "451" in error
    assert mail.send(receiver, _message(receiver))[0] == "delivered"
    assert len(smtp.mailbox.messages) == 1


async def test_a_password_smtplib_cannot_send_is_refused_not_raised(
    smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", "pässwörd")
    receiver = _receiver(smtp)
    assert mail.send(receiver, _message(receiver)) == (
        "rejected",
        "the username or password is not ASCII: smtplib cannot send it",
        None,
    )
    assert smtp.mailbox.messages == []


def test_a_message_is_dated_when_it_is_sent_and_its_links_are_links() -> None:
    receiver = Receiver.model_validate({"name": "m", "kind": "email", "url": "smtp://mail.example",
                                        "from": "iotgw@example.org", "to": ["ops@example.org"]})  # fmt: skip
    facts = {"summary": "Door <jammed>", "status": "firing", "severity": "major", "site": "hq",
             "link": "https://staff.example/ui/?alert=1", "ack_link": "https://staff.example/ack/abc.d-f_"}  # fmt: skip
    sent_at = datetime(2026, 12, 2, 14, 30, tzinfo=UTC)
    msg = mail.message(receiver, facts, "iotgw.alert-1", None, sent_at)
    assert msg["Date"] == "Wed, 02 Dec 2026 14:30:00 +0000"
    html = msg.get_body(("html",)).get_content()
    assert 'Acknowledge: <a href="https://staff.example/ack/abc.d-f_">https://staff.example/ack/abc.d-f_</a>' in html
    assert "Door &lt;jammed&gt;" in html
    text = msg.get_body(("plain",)).get_content()
    assert "Where: site hq\n" in text  # (no device or floor: left out, not "device , floor")


async def test_a_password_is_never_sent_without_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", PASSWORD)
    with smtp_server(tmp_path, plain=True) as server:
        receiver = _receiver(server)
        outcome, error, _ = mail.send(receiver, _message(receiver))
        assert (outcome, error) == ("rejected", "the server offers no STARTTLS: a password is not sent in the clear")
        anonymous = _receiver(server, username=None, password_env=None)  # no login: plain SMTP is fine
        assert mail.send(anonymous, _message(anonymous))[0] == "delivered"
    assert server.mailbox.tls == [False]
    assert server.mailbox.logins == [""]


async def test_a_server_that_is_not_there_is_transient(tmp_path: Path) -> None:
    with smtp_server(tmp_path) as server:
        receiver = _receiver(server, password_env=None, username=None)
    outcome, error, _ = mail.send(receiver, _message(receiver))  # (stopped: nothing listens there now)
    assert outcome == "transient"
    assert error is not None
    assert "Connection refused" in error


def test_a_password_file_is_read_at_each_try(tmp_path: Path) -> None:
    secret = tmp_path / "smtp-password"
    secret.write_text(PASSWORD + "\n")
    with smtp_server(tmp_path) as server:
        receiver = _receiver(server, password_env=None, password_file=str(secret))
        assert mail.send(receiver, _message(receiver))[0] == "delivered"
        secret.write_text("rotated-away")
        assert mail.send(receiver, _message(receiver))[0] == "rejected"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"url": "smtp://iotgw:hunter2@mail.example"}, "no credentials in the url"),
        ({"url": "https://mail.example"}, "smtp://host[:port]"),
        ({"to": []}, "needs to"),
        ({"from": "not an address"}, "not one e-mail address"),
        ({"to": ["@example.org"]}, "not one e-mail address"),  # (it went out as RCPT TO:<>)
        ({"to": ["a@example.org, b@example.org"]}, "a list item each"),
        ({"from": "iotgw@example.org, evil@x.example"}, "not one e-mail address"),
        ({"url": "smtp:// mail.example"}, "a URL has no spaces"),
        ({"to": ["ops@example.org\nBcc: evil@x.example"]}, "one line of printable characters"),
        ({"subject": "{colour}"}, "unknown field {colour}"),
        ({"body": "{summary"}, "literal brace"),
        ({"body": "{summary:>999999999}"}, "no format or conversion"),
        ({"subject": "{site!r}"}, "no format or conversion"),
        ({"subject": "{site.__class__}"}, "unknown field {site.__class__}"),
        ({"username": None}, "set username too"),
        ({"password_file": "/run/secrets/smtp"}, "not both"),
    ],
)
def test_a_bad_email_receiver_is_refused_with_its_reason(change: dict[str, Any], says: str) -> None:
    raw = {"name": "m", "kind": "email", "url": "smtp://mail.example:587", "from": "iotgw@example.org",
           "to": ["ops@example.org"], "username": "iotgw", "password_env": "SMTP_PASSWORD", **change}  # fmt: skip
    with pytest.raises(ValidationError) as caught:
        Receiver.model_validate(raw)
    assert says in str(caught.value)


def test_email_fields_are_for_email_receivers_only() -> None:
    with pytest.raises(ValidationError, match="to: for email receivers only"):
        Receiver.model_validate({"name": "h", "kind": "webhook", "url": "http://x.example/h", "to": ["a@b.example"]})


@pytest.mark.parametrize(
    "site", ["hq\r\nBcc: evil@evil.example", "x=?UTF-8?Q?=0A?=Reply-To: boss@evil.example", "a\x0bb\u2028c"]
)
def test_a_devices_words_cannot_add_a_header(site: str) -> None:
    receiver = Receiver.model_validate({"name": "m", "kind": "email", "url": "smtp://mail.example",
                                        "from": "iotgw@example.org", "to": ["ops@example.org"]})  # fmt: skip
    msg = mail.message(receiver, {"summary": f"Door jammed ({site})", "status": "firing", "severity": "major"},
                       "iotgw.alert-1", None, datetime.now(UTC))  # fmt: skip
    sent = message_from_bytes(msg.as_bytes(), policy=policy.default)
    assert sent["Bcc"] is None
    assert sent["Reply-To"] is None
    assert "\n" not in str(sent["Subject"])


async def test_a_message_that_cannot_be_built_fails_alone(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Whatever breaks the building of one message (here a fault made to happen for one device)
    fails that delivery with its reason, once; the receiver's lane goes on with the next."""
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", PASSWORD)
    built = mail.alert_facts

    def breaks_for_el_x(*args: Any, **kwargs: Any) -> dict[str, Any]:
        facts = built(*args, **kwargs)
        if facts["device"] == "el-x":
            raise UnicodeError("a fact no message can carry")
        return facts

    monkeypatch.setattr(mail, "alert_facts", breaks_for_el_x)
    receivers = f"""
  - {{name: ops-mail, kind: email, url: "smtp://127.0.0.1:{smtp.port}", from: "iotgw@example.org",
      to: ["ops@example.org"], username: {USER}, password_env: IOTGW_TEST_SMTP_PASSWORD, ca_file: "{smtp.ca_file}"}}
"""
    rules = door_jam_rules(tmp_path, receivers)
    settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
    async with running_gateway(settings) as gw:
        async with mqtt_client(broker.url_as("tester"), "pub") as c:
            for device in ("el-x", "el-y"):
                await c.publish(f"devices/{device}/state", state(1), qos=1)
                await c.publish(f"devices/{device}/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)

        async def settled() -> bool:  # (an outcome is committed after the server took the message)
            with gw.store.session() as tx:
                statuses = tx.exec(select(DeliveryRow.status)).all()
            return len(statuses) == 2 and "pending" not in statuses

        await wait_for(settled, what="both deliveries' outcomes")
        with gw.store.session() as tx:
            rows = tx.exec(select(DeliveryRow.status, DeliveryRow.attempts, DeliveryRow.last_error)).all()
    assert sorted(rows, key=lambda r: r[0]) == [
        ("delivered", 1, None),
        ("failed", 0, "its message cannot be built: UnicodeError: a fact no message can carry"),
    ]
    assert smtp.mailbox.messages[0]["Subject"] == "[major] firing: Door jammed on el-y"


async def test_each_recipient_gets_it_once_when_the_server_refuses_some(
    smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every recipient must take it: one refused for now (4xx) makes it a transient failure whose
    retry goes to that one alone; one refused for good (5xx) fails it, saying who, once those
    refused for now have it."""
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", PASSWORD)
    smtp.mailbox.refuse_rcpt = {"later@example.org": ["450 4.2.1 mailbox busy, try later"]}
    receiver = _receiver(smtp, to=["ops@example.org", "later@example.org"])
    outcome, error, _ = mail.send(receiver, _message(receiver))
    assert outcome == "transient"
    assert error == "recipients refused for now: later@example.org: 450 4.2.1 mailbox busy, try later"
    assert mail.send(receiver, _message(receiver)) == ("delivered", None, None)  # the retry: the same Message-ID
    assert smtp.mailbox.envelopes == [["ops@example.org"], ["later@example.org"]]  # each once
    assert [m["To"] for m in smtp.mailbox.messages] == ["ops@example.org, later@example.org"] * 2
    smtp.mailbox.envelopes.clear()
    smtp.mailbox.refuse_rcpt = {
        "later@example.org": ["450 4.2.1 mailbox busy, try later"] * 2,
        "gone@example.org": ["550 5.1.1 no such user"],
    }
    receiver = _receiver(smtp, name="ops-mail-2", to=["ops@example.org", "later@example.org", "gone@example.org"])
    for _ in range(2):
        outcome, error, _ = mail.send(receiver, _message(receiver))
        assert outcome == "transient"  # not final while later@ may still take it
        assert error == (
            "recipients refused for now: later@example.org: 450 4.2.1 mailbox busy, try later; "
            "for good: gone@example.org: 550 5.1.1 no such user"
        )
    outcome, error, _ = mail.send(receiver, _message(receiver))
    assert outcome == "rejected"
    assert error == "recipients refused: gone@example.org: 550 5.1.1 no such user; taken by the others"
    assert smtp.mailbox.envelopes == [["ops@example.org"], ["later@example.org"]]  # each that took it, once
    alone = _receiver(smtp, name="ops-mail-3", to=["gone@example.org"])
    assert mail.send(alone, _message(alone))[:2] == (
        "rejected", "recipients refused: gone@example.org: 550 5.1.1 no such user"
    )  # fmt: skip


async def test_a_retry_that_says_more_goes_to_everyone_and_an_address_once(
    smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's message keeps its Message-ID while what it says grows (an alert resolved, one
    joined): a retry that says something new goes to those that took the old words too."""
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", PASSWORD)
    smtp.mailbox.refuse_rcpt = {"later@example.org": ["450 4.2.1 mailbox busy, try later"]}
    receiver = _receiver(smtp, to=["ops@example.org", "later@example.org", "Ops <OPS@example.org>"])
    assert mail.send(receiver, _message(receiver))[0] == "transient"
    facts = {"summary": "Door jammed on el-1", "status": "resolved", "severity": "major", "site": "hq"}
    news = mail.message(receiver, facts, "iotgw.alert-1", None, datetime.now(UTC))  # the same Message-ID
    assert news["Message-ID"] == smtp.mailbox.messages[0]["Message-ID"]
    assert mail.send(receiver, news) == ("delivered", None, None)
    assert smtp.mailbox.envelopes == [["ops@example.org"], ["ops@example.org", "later@example.org"]]
    assert smtp.mailbox.messages[1]["To"] == "ops@example.org, later@example.org"  # OPS@ is ops@
