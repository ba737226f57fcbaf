"""The staff page in a real headless Chromium (Debian's, driven by Playwright): live, and it acts."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, Page, async_playwright, expect
from sqlmodel import select

from alerts.dispatch.consumer import Dispatch
from alerts.dispatch.roster import load_roster
from alerts.tables import AlertRow
from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.security import create_api_key
from gateway.service import Gateway
from tests.support.dispatching import ROSTER, RULES, STUCK, WED_10_BERLIN, Clock, message, publish
from tests.support.gateway import running_gateway, wait_for

pytestmark = pytest.mark.anyio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
JAM = {"mode": "fault", "fault": "DOOR_JAM", "door": "opening", "load_kg": 0}


@pytest.fixture
def ui_settings(tmp_path: Path, settings_for: Callable[..., Settings]) -> Callable[..., Settings]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES + OVERSPEED)
    return lambda broker, **kw: settings_for(
        broker, **{"consumers": "alerts", "rules_file": str(rules), "api_auth": True, **kw}
    )


# A warning: dispatch opens no work order for it, so it stays an alert of its own on the page.
OVERSPEED = """
  - name: overspeed
    severity: warning
    summary: "{device} ran over speed"
    select: {type: [elevator]}
    event: {type: elevator.fault.raised, data: {code: OVERSPEED}, clear: {type: elevator.fault.cleared}}
  - name: hot
    severity: minor
    summary: "{device} reads {value} C"
    select: {type: [temperature]}
    threshold: {above: 30, clear_below: 28}
"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        await b.close()


async def staff_page(browser: Browser, gw: Gateway, *, phone: bool = False, role: str = "technician") -> Page:
    """The page opened and signed in with a new key of `role` (the page asks for one first)."""
    size = {"width": 390, "height": 844} if phone else {"width": 1280, "height": 900}
    page = await browser.new_page(viewport=size)
    await page.goto(f"http://127.0.0.1:{gw.settings.http_port}/ui/")
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#key", new_key(gw, role))
    await page.locator("#login button").click()
    await expect(page.locator("#live")).to_have_text("live")
    return page


def new_key(gw: Gateway, role: str) -> str:
    return create_api_key(gw.store, f"ui-{role}", role)[1]


async def test_a_simulated_fault_appears_live_and_the_technician_chosen_from_the_roster_acknowledges_it(  # noqa: PLR0915
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    # Dispatch's clock at a time Tina is on shift (whatever the time of day the test runs at).
    dispatch = on_shift_dispatch(WED_10_BERLIN)
    settings = ui_settings(broker)
    async with running_gateway(settings, serve_http=True, consumers=[dispatch]) as gw:
        page = await staff_page(browser, gw, phone=True)
        # Who acts is picked from the roster, not typed: names, roles and who is on shift.
        options = await page.locator("#who option").all_inner_texts()
        assert options == ["choose yourself…", "Abe (technician, off shift)", "Tina (technician)",
                           "Sue (supervisor)", "Max (manager)"]  # fmt: skip
        await page.select_option("#who", "tina")
        await expect(page.locator("#alerts-empty")).to_be_visible()

        await publish(broker, "el-7", message(1, now), message(2, now, **JAM))
        # One card per fault episode: the alert is inside its work order, not a card of its own.
        order = page.locator("#orders li[data-order]")
        await expect(order).to_have_count(1)  # pushed: the page was not reloaded
        inside = order.locator("li[data-alert]")
        await expect(inside).to_contain_text("Door jammed on el-7")
        await expect(inside).to_have_attribute("data-status", "firing")
        await expect(order).to_contain_text("assigned to Tina")
        await expect(page.locator("#alerts li[data-alert]")).to_have_count(0)
        await expect(page.locator("#alerts-empty")).to_be_visible()

        # Acknowledging the order acknowledges its alert, as the person chosen.
        await order.locator("button[data-action=ack]").click()
        await expect(order.locator("[data-note]")).to_contain_text("Acknowledged")  # said where the finger is
        await expect(order).to_have_attribute("data-status", "acknowledged")
        await expect(order).to_contain_text("acknowledged by Tina")
        await expect(inside).to_have_attribute("data-status", "acknowledged")
        alert_id = await inside.get_attribute("data-alert")
        headers = {"Authorization": f"Bearer {new_key(gw, 'viewer')}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", headers=headers) as api:
            alert = (await api.get(f"/api/alerts/{alert_id}")).json()
            assert (alert["status"], alert["acked_by"]) == ("acknowledged", "tina")
            (wo,) = (await api.get("/api/work-orders")).json()["items"]
            assert (wo["status"], wo["acked_by"]) == ("acknowledged", "tina")

        # The order's history: who did what and when, in sentences.
        await order.locator("button[data-detail]").click()
        timeline = page.locator("#detail-timeline")
        await expect(timeline.locator("li[data-kind=created]")).to_be_visible()
        await expect(timeline.locator("li[data-kind=assigned]")).to_contain_text("assigned to Tina (level 1)")
        await expect(timeline.locator("li[data-kind=acknowledged]")).to_contain_text("acknowledged by Tina")
        await expect(page.locator("#detail-alerts")).to_contain_text("door-jam")
        await expect(page.locator("#detail-pages")).to_contain_text("pager")
        # ... and what its device said, in sentences.
        await expect(page.locator("#detail-device")).to_contain_text("fault DOOR_JAM at floor 3 with 0 kg inside")
        await page.locator("#order-detail button.close").click()

        # An alert dispatch opens no order for (a warning) stays on its own list, with its own button.
        await publish(broker, "el-5", message(1, now), message(2, now, mode="fault", fault="OVERSPEED"))
        alone = page.locator("#alerts li[data-alert]")
        await expect(alone).to_have_count(1)
        await expect(alone).to_contain_text("el-5 ran over speed")
        await alone.locator("button[data-action=ack]").click()
        await expect(alone.locator("[data-note]")).to_contain_text("Acknowledged as Tina")
        await expect(alone).to_have_attribute("data-status", "acknowledged")
        await expect(alone).to_contain_text("acknowledged by Tina")

        # Usable on a phone: nothing wider than the screen.
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

        # The device view: its state now, its events as sentences (its own and those about it).
        await order.locator("button.device").click()
        events = page.locator("#device-events li")
        await expect(events.first).to_be_visible()
        await expect(page.locator("#device-state dd[data-field=door]")).to_have_text("opening")
        await expect(page.locator("#device-state dd[data-field=mode]")).to_have_text("fault")
        await expect(page.locator("#device-state dd[data-field=online]")).to_have_text("yes")
        await expect(page.locator("#device-events")).to_contain_text("alert door-jam acknowledged by Tina")
        await expect(page.locator("#device-events")).to_contain_text("fault DOOR_JAM at floor 3")
        await expect(page.locator("#device-events")).to_contain_text(f"work order #{wo['id']} acknowledged by Tina")
        assert await page.evaluate(
            "[...document.querySelectorAll('#device-events li')].every(li => li.scrollWidth <= li.clientWidth + 1)"
        ), "an event's data wraps inside the dialog"


def on_shift_dispatch(at: datetime) -> Dispatch:
    """The dispatch consumer on the scenario's roster (pages to nowhere), its clock standing at `at`."""
    return Dispatch(load_roster(ROSTER.format(url="http://127.0.0.1:9/")), clock=Clock(at))


def posts(page: Page) -> list[str]:
    """The POST requests the page sends from now on (a list that grows)."""
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" else None)
    return sent


async def test_nobody_chosen_means_disabled_actions_with_the_reason_and_no_request(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    dispatch = on_shift_dispatch(now)
    async with running_gateway(ui_settings(broker), serve_http=True, consumers=[dispatch]) as gw:
        page = await staff_page(browser, gw)
        await page.evaluate("localStorage.clear()")
        sent = posts(page)
        await publish(broker, "el-8", message(1, now), message(2, now, **JAM))
        card = page.locator("#orders li[data-order]")
        await expect(card.locator("button[data-action=ack]")).to_be_disabled()
        await expect(card.locator(".why")).to_contain_text("Choose yourself at the top first")
        await card.locator("button[data-action=ack]").click(force=True)  # a tap on it anyway
        await page.select_option("#who", "tina")
        await expect(card.locator("button[data-action=ack]")).to_be_enabled()
        assert sent == [], "nothing was sent while nobody was chosen"
        assert (await card.get_attribute("data-status")) == "assigned"


async def test_the_page_asks_for_a_valid_key_and_a_viewer_watches_with_actions_disabled(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    async with running_gateway(ui_settings(broker), serve_http=True) as gw:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{gw.settings.http_port}/ui/")
        # Before signing in, nothing of the board: no lists, no "live", no "sign out".
        for hidden in ("#board", "#session", "#live", "#signout", "#orders-h", "#alerts-empty"):
            await expect(page.locator(hidden)).to_be_hidden()
        await page.fill("#key", "iotgw_000000000000_not-a-real-key-at-all")
        await page.locator("#login button").click()
        await expect(page.locator("#login-message")).to_contain_text("not accepted")
        await expect(page.locator("#board")).to_be_hidden()

        page = await staff_page(browser, gw, role="viewer")
        await expect(page.locator("#role")).to_have_text("viewer's key")
        sent = posts(page)
        await publish(broker, "el-9", message(1, now), message(2, now, **JAM))
        card = page.locator("#alerts li[data-alert]")
        await expect(card).to_contain_text("Door jammed on el-9")  # a viewer watches live
        for action in ("ack", "resolve"):
            await expect(card.locator(f"button[data-action={action}]")).to_be_disabled()
        await expect(card.locator(".why")).to_contain_text("viewer's key: it may watch, not act")
        await card.locator("button[data-action=ack]").click(force=True)
        assert sent == []
        await expect(card).to_have_attribute("data-status", "firing")

        # Signing out clears the board: nothing of it stays on screen.
        await page.locator("#signout").click()
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#board")).to_be_hidden()
        assert await page.locator("#alerts li").count() == 0


async def test_with_the_gateway_away_the_page_says_offline_disables_actions_and_recovers_by_itself(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    settings = ui_settings(broker)
    key = ""

    async with running_gateway(settings, serve_http=True, consumers=[on_shift_dispatch(WED_10_BERLIN)]) as gw:
        key = new_key(gw, "technician")
        page = await browser.new_page(viewport={"width": 390, "height": 844})
        await page.goto(f"http://127.0.0.1:{settings.http_port}/ui/")
        await page.fill("#key", key)
        await page.locator("#login button").click()
        await expect(page.locator("#live")).to_have_text("live")
        await page.select_option("#who", "tina")
        await publish(broker, "el-6", message(1, now), message(2, now, **JAM))
        card = page.locator("#orders li[data-order]")
        await expect(card.locator("button[data-action=ack]")).to_be_enabled()
    # The gateway is stopped: the page says so at once, and nothing can be tapped in vain.
    await expect(page.locator("#offline")).to_be_visible()
    await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # far down the board: still said
    await expect(page.locator("#offline")).to_be_in_viewport()
    on_top = (
        "(() => { const r = document.getElementById('offline').getBoundingClientRect();"
        " return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2)?.id; })()"
    )
    assert await page.evaluate(on_top) == "offline", "nothing covers the notice"
    await accessible(page, "offline-phone")  # what it last knew stays readable
    await expect(page.locator("#live")).not_to_have_text("live")
    await expect(card.locator("button[data-action=ack]")).to_be_disabled()
    await expect(card.locator(".why")).to_contain_text("Offline")
    # Back (the same database and port): the page reconnects by itself, the key still works.
    async with running_gateway(settings, serve_http=True, consumers=[on_shift_dispatch(WED_10_BERLIN)]):
        await expect(page.locator("#live")).to_have_text("live", timeout=20000)
        await expect(page.locator("#offline")).to_be_hidden()
        await expect(card.locator("button[data-action=ack]")).to_be_enabled()


async def test_a_refused_action_is_said_next_to_its_button_within_the_screen(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    dispatch = on_shift_dispatch(WED_10_BERLIN)
    async with running_gateway(ui_settings(broker), serve_http=True, consumers=[dispatch]) as gw:
        # Many cards, so that the one acted on is far down a phone's screen.
        for i in range(6):
            await publish(broker, f"el-{i}", message(1, now), message(2, now, **JAM))
        page = await staff_page(browser, gw, phone=True)
        await page.select_option("#who", "tina")
        orders = page.locator("#orders li[data-order]")
        await expect(orders).to_have_count(6)
        last = orders.last
        # An administrator takes Abe off the roster meanwhile; this page still offers him.
        without_abe = [
            {"id": "tina", "name": "Tina", "contact": "pager", "sites": ["hq"], "skills": ["elevator"],
             "shifts": [{"start": "08:00", "end": "18:00"}]},
            {"id": "sue", "name": "Sue", "role": "supervisor", "contact": "pager",
             "shifts": [{"start": "00:00", "end": "24:00"}]},
            {"id": "max", "name": "Max", "role": "manager", "contact": "pager",
             "shifts": [{"start": "00:00", "end": "24:00"}]},
        ]  # fmt: skip
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gw.settings.http_port}",
            headers={"Authorization": f"Bearer {new_key(gw, 'admin')}"},
        ) as api:
            edited = await api.put("/api/technicians", params={"by": "ada"}, json=without_abe)
            assert edited.status_code == 200, edited.text
        pick = last.locator("select[aria-label='reassign to']")
        await pick.scroll_into_view_if_needed()
        await pick.select_option("abe")
        await expect(page.locator("#confirm-text")).to_contain_text("Reassign")
        await expect(page.locator("#confirm-text")).to_contain_text("Abe is off shift now")  # it asks first
        await page.locator("#confirm button[value=ok]").click()
        note = last.locator("[data-note]")
        await expect(note).to_contain_text("Not done:")
        await expect(note).to_contain_text("abe")
        await expect(note).to_be_in_viewport()


async def test_a_trapped_passenger_comes_first_and_the_tab_title_says_so(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    dispatch = on_shift_dispatch(WED_10_BERLIN)
    async with running_gateway(ui_settings(broker), serve_http=True, consumers=[dispatch]) as gw:
        page = await staff_page(browser, gw, phone=True)
        await page.select_option("#who", "tina")
        await publish(broker, "el-1", message(1, now), message(2, now, **JAM))
        await expect(page.locator("#orders li[data-order]")).to_have_count(1)
        await expect(page).to_have_title("iotgw · staff")
        await publish(broker, "el-2", message(1, now), message(2, now, **STUCK))
        first = page.locator("#orders li[data-order]").first
        await expect(first).to_have_class(re.compile(r"\bentrapment\b"))
        await expect(first).to_contain_text("Passenger trapped")
        await expect(first).to_contain_text("el-2")
        # The live passenger facts, from the elevator's state: load, floor, door, since when.
        facts = first.locator("[data-facts]")
        await expect(facts).to_contain_text("80 kg inside · floor 3 · door closed · fault began")
        await expect(page).to_have_title(re.compile(r"^\(1\) P1"))
        # Loud by default: a tone for it (the sign-in click let the page start sound).
        trapped_id = int(await first.get_attribute("data-order") or 0)
        alarms = await page.evaluate("window.iotgwAlarms")
        assert [(a["order"], a["sound"]) for a in alarms] == [(trapped_id, True)], alarms

        # Silent mode: the next trapped passenger is recorded and counted in the title, without a tone.
        await page.locator("#sound").click()
        await expect(page.locator("#sound")).to_have_text("silent")
        await publish(broker, "el-3", message(1, now), message(2, now, **STUCK))
        await expect(page).to_have_title(re.compile(r"^\(2\) P1"))
        alarms = await page.evaluate("window.iotgwAlarms")
        assert [a["sound"] for a in alarms] == [True, False], alarms
        assert alarms[0]["order"] != alarms[1]["order"]
        # Acknowledged, a trapped passenger no longer counts in the title.
        await page.locator("#orders li.entrapment button[data-action=ack]").first.click()
        await expect(page).to_have_title(re.compile(r"^\(1\) P1"))
        # The elevator runs again: its card no longer reads as a trapped passenger's facts.
        await publish(broker, "el-2", message(3, now))
        again = page.locator(f"#orders li[data-order='{trapped_id}'] [data-facts]")
        await expect(again).to_contain_text("The elevator runs again (normal)")
        await expect(again).not_to_contain_text("fault began")


async def test_the_api_docs_render_with_no_other_host_reachable(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    async with running_gateway(ui_settings(broker), serve_http=True) as gw:
        base = f"http://127.0.0.1:{gw.settings.http_port}"
        page = await browser.new_page()
        elsewhere: list[str] = []

        async def only_the_gateway(route: Any) -> None:
            if route.request.url.startswith(base):
                await route.continue_()
            else:
                elsewhere.append(route.request.url)
                await route.abort()

        await page.route("**/*", only_the_gateway)
        await page.goto(f"{base}/docs")
        await expect(page.locator(".swagger-ui .info .title")).to_contain_text("iotgw")
        await expect(page.locator(".opblock-summary-path").first).to_be_visible()
        await page.goto(f"{base}/redoc")  # ReDoc's bundle would fetch its logo from its CDN: the same page
        await expect(page.locator(".swagger-ui .info .title")).to_contain_text("iotgw")
        assert elsewhere == [], f"the docs asked other hosts for {elsewhere}"


SCREENS = Path(tempfile.gettempdir()) / "iotgw-staff-screens"  # every view at both sizes, for a reviewer


async def accessible(page: Page, view: str) -> None:
    """No serious or critical axe-core violation in `view` as it is now; a screenshot of it is kept."""
    SCREENS.mkdir(exist_ok=True)
    dialog = await page.evaluate("Boolean(document.querySelector('dialog[open]'))")
    await page.screenshot(path=str(SCREENS / f"{view}.png"), full_page=not dialog)  # a dialog: what the screen shows
    found = (await Axe().run(page)).response["violations"]
    bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in found
           if v["impact"] in ("serious", "critical")]  # fmt: skip
    assert bad == [], f"{view}: {bad}"


@pytest.mark.parametrize("phone", [True, False], ids=["phone", "desktop"])
async def test_every_view_has_no_serious_accessibility_violation_and_is_captured(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser, phone: bool
) -> None:
    now = datetime.now(UTC)
    size = "phone" if phone else "desktop"
    dispatch = on_shift_dispatch(WED_10_BERLIN)
    async with running_gateway(ui_settings(broker), serve_http=True, consumers=[dispatch]) as gw:
        for scheme in ("light", "dark"):
            page = await browser.new_page(viewport={"width": 390, "height": 844} if phone else
                                          {"width": 1440, "height": 900}, color_scheme=scheme)  # fmt: skip
            await page.goto(f"http://127.0.0.1:{gw.settings.http_port}/ui/")
            await expect(page.locator("#login")).to_be_visible()
            await accessible(page, f"sign-in-{size}-{scheme}")
            await page.fill("#key", new_key(gw, "technician"))
            await page.locator("#login button").click()
            await expect(page.locator("#live")).to_have_text("live")
            await page.select_option("#who", "tina")
            if scheme == "light":
                await publish(broker, "el-1", message(1, now), message(2, now, **JAM))
                await publish(broker, "el-2", message(1, now), message(2, now, **STUCK))
                await publish(broker, "el-3", message(1, now), message(2, now, mode="fault", fault="OVERSPEED"))
            await expect(page.locator("#orders li.entrapment")).to_have_count(1)
            await expect(page.locator("#orders li[data-alert]")).to_have_count(2)  # inside their orders
            await expect(page.locator("#alerts li[data-alert]")).to_have_count(1)  # no order for a warning
            await accessible(page, f"board-{size}-{scheme}")
            await page.locator("#orders li.entrapment button.device").click()
            await expect(page.locator("#device-events li").first).to_be_visible()
            await accessible(page, f"device-{size}-{scheme}")
            await page.locator("#device button.close").click()
            await page.locator("#orders li.entrapment button[data-detail]").click()
            await expect(page.locator("#detail-timeline li").first).to_be_visible()
            await accessible(page, f"order-{size}-{scheme}")
            await page.locator("#order-detail button.close").click()
            await page.locator("#orders li.entrapment button[data-action=resolve]").click()
            await expect(page.locator("#resolve")).to_be_visible()
            await accessible(page, f"resolve-{size}-{scheme}")
            await page.locator("#resolve button[value=cancel]").click()
            await page.locator("#orders li.entrapment select[aria-label='reassign to']").select_option("sue")
            await expect(page.locator("#confirm")).to_be_visible()
            await accessible(page, f"confirm-{size}-{scheme}")
            await page.locator("#confirm button[value=cancel]").click()
            await page.locator("#alerts li[data-alert] button[data-action=resolve]").click()
            await expect(page.locator("#resolve-alert")).to_be_visible()
            await accessible(page, f"resolve-alert-{size}-{scheme}")
            await page.locator("#resolve-alert button[value=cancel]").click()
            await page.locator("#history-form button").click()
            await expect(page.locator("#history-note")).to_have_text("No resolved work order matches.")
            await accessible(page, f"history-{size}-{scheme}")
            if phone:  # the phone turned: landscape, nothing wider than the screen
                await page.set_viewport_size({"width": 844, "height": 390})
                await accessible(page, f"board-landscape-{scheme}")
                assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            await page.close()
    print(f"\nscreenshots: {SCREENS}")  # noqa: T201 - where a reviewer finds them


async def _resolved(gw: Gateway, device: str) -> None:
    """Wait until `device`'s alert has ended."""

    async def ended() -> bool:
        with gw.store.session() as tx:
            found = tx.exec(select(AlertRow).where(AlertRow.device_id == device, AlertRow.status == "resolved"))
            return found.first() is not None

    await wait_for(ended, what=f"{device}'s alert, resolved")


async def test_resolved_work_orders_are_found_by_device_and_assignee(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    dispatch = on_shift_dispatch(WED_10_BERLIN)
    # A gateway whose day is not the browser's (UTC) now: the day filter is the gateway's calendar.
    zone = "Etc/GMT-14" if now.hour >= 12 else "Etc/GMT+12"  # POSIX signs: 14 h ahead of UTC, or 12 h behind
    async with running_gateway(ui_settings(broker, time_zone=zone), serve_http=True, consumers=[dispatch]) as gw:
        for device in ("el-31", "el-32"):
            await publish(broker, device, message(1, now), message(2, now, **JAM))
        page = await staff_page(browser, gw, phone=True)
        await page.select_option("#who", "tina")
        orders = page.locator("#orders li[data-order]")
        await expect(orders).to_have_count(2)
        for i in range(2):
            card = orders.first
            await card.locator("button[data-action=resolve]").click()
            await page.fill("#resolve-form textarea[name=problem]", f"jammed door {i}")
            await page.fill("#resolve-form textarea[name=action]", "cleaned the sill")
            await page.locator("#resolve button[value=ok]").click()
            await expect(orders).to_have_count(1 - i)
        form = page.locator("#history-form")
        await form.locator("input[name=device_id]").fill("el-32")
        await form.locator("button").click()
        found = page.locator("#history li[data-resolved]")
        await expect(found).to_have_count(1)
        await expect(found).to_contain_text("el-32")
        await expect(found).to_contain_text("by Tina")
        await expect(found).to_contain_text("done: cleaned the sill")
        await form.locator("input[name=device_id]").fill("")
        await form.locator("select[name=assignee]").select_option("tina")
        await form.locator("button").click()
        await expect(found).to_have_count(2)
        await form.locator("select[name=assignee]").select_option("sue")
        await form.locator("button").click()
        await expect(page.locator("#history-note")).to_have_text("No resolved work order matches.")

        # Resolved alerts too, and a time filter: el-31's door works again, so its alert ends.
        await publish(broker, "el-31", message(3, now))
        await _resolved(gw, "el-31")  # (the search is one request: search once it has ended)
        await form.locator("select[name=kind]").select_option("alerts")
        await expect(form.locator("select[name=assignee]")).to_be_disabled()  # work orders' alone
        await form.locator("input[name=device_id]").fill("el-31")
        today = datetime.now(ZoneInfo(zone)).date()  # the gateway's day, not the browser's
        assert today != datetime.now(UTC).date()
        await form.locator("input[name=from]").fill(today.isoformat())
        await form.locator("input[name=until]").fill(today.isoformat())  # that day included
        await form.locator("button").click()
        ended = page.locator("#history li[data-resolved-alert]")
        await expect(ended).to_have_count(1)
        await expect(ended).to_contain_text("door-jam")
        await expect(ended).to_contain_text("acknowledged by Tina")
        await form.locator("input[name=from]").fill("")
        await form.locator("input[name=until]").fill((today - timedelta(days=1)).isoformat())  # none opened by then
        await form.locator("button").click()
        await expect(page.locator("#history-note")).to_have_text("No resolved alert matches.")


def reading(seq: int, at: datetime, value: float) -> bytes:
    return json.dumps({"type": "temperature", "seq": seq, "ts": int(at.timestamp() * 1000), "site": "hq",
                       "data": {"value": value, "unit": "C"}}).encode()  # fmt: skip


async def test_a_sensors_device_view_shows_its_state_and_charts_its_last_hour(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    values = [20.5 + i for i in range(12)]  # one a minute for 12 minutes, the last ones too hot
    async with running_gateway(ui_settings(broker, consumers="alerts,analytics"), serve_http=True) as gw:
        silent = (5, 6)  # two minutes with no reading
        readings = [reading(i + 1, now - timedelta(minutes=11 - i), v) for i, v in enumerate(values) if i not in silent]
        async with mqtt_client(broker.url_as("tester"), "t-1") as c:
            for r in readings:
                await c.publish("devices/t-1/telemetry", r, qos=1)
        page = await staff_page(browser, gw)
        card = page.locator("#alerts li[data-alert]")
        await expect(card).to_contain_text("t-1 reads")
        await card.locator("button.device").click()
        await expect(page.locator("#device-state dd[data-field=type]")).to_have_text("temperature")
        await expect(page.locator("#device-state dd[data-field=reading]")).to_have_text("31.5 C")
        await expect(page.locator("#device-events")).to_contain_text("read 31.5 C")
        # The chart: one point a minute, from the analytics API's buckets, drawn without any library.
        figure = page.locator("#device-chart figure.chart")
        await expect(figure).to_have_attribute("data-points", "10")
        # The silent minutes are a gap, not a line drawn over them: two runs, of 5 and 5 minutes.
        await expect(figure).to_have_attribute("data-runs", "2")
        runs = [(await line.get_attribute("points") or "").split() for line in await figure.locator("polyline").all()]
        assert [len(r) for r in runs] == [5, 5], runs
        xs = [float(p.split(",")[0]) for r in runs for p in r]
        heights = [float(p.split(",")[1]) for r in runs for p in r]
        assert heights == sorted(heights, reverse=True), "rising readings draw a rising line (y grows downwards)"
        assert xs == sorted(xs)
        assert xs[0] > 320 / 2, "12 minutes of readings take the end of the hour, not all of it"
        label = re.compile(r"from 20.5 to 31.5 C.*1 gap with no reading")
        await expect(figure.locator("svg")).to_have_attribute("aria-label", label)
        await accessible(page, "device-sensor-desktop")


async def test_the_overview_by_building_narrows_the_board_and_times_read_in_the_gateways_zone(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    dispatch = on_shift_dispatch(WED_10_BERLIN)
    settings = ui_settings(broker, time_zone="Asia/Tokyo")
    async with running_gateway(settings, serve_http=True, consumers=[dispatch]) as gw:
        annex = [json.dumps({**json.loads(m), "site": "annex"}).encode()
                 for m in (message(1, now), message(2, now, mode="fault", fault="OVERSPEED"))]  # fmt: skip
        await publish(broker, "el-41", *annex)
        await publish(broker, "el-42", message(1, now), message(2, now, **STUCK))
        page = await staff_page(browser, gw, phone=True)
        sites = page.locator("#sites button[data-site]")
        await expect(sites).to_have_count(3)
        # The building with a trapped passenger first, then the others by name.
        assert await sites.all_inner_texts() == ["All buildings", "hq\n1 trapped · 1 order · 0 alerts",
                                                 "annex\n0 orders · 1 alert"]  # fmt: skip
        await page.locator("#sites button[data-site=annex]").click()
        await expect(page.locator("#sites button[data-site=annex]")).to_have_attribute("aria-pressed", "true")
        await expect(page.locator("#orders li[data-order]")).to_have_count(0)
        await expect(page.locator("#alerts li[data-alert]")).to_contain_text("el-41")
        await expect(page).to_have_title(re.compile(r"^\(1\) P1"))  # the title still counts every building
        await page.locator("#sites button[data-site='*']").click()
        await expect(page.locator("#orders li[data-order]")).to_have_count(1)
        # Local times in the gateway's zone (the browser's is UTC): on hover, and on a tap.
        opened = page.locator("#orders li[data-order] time").first
        assert "GMT+9" in (await opened.get_attribute("title") or "")
        await opened.click()
        await expect(opened).to_contain_text("GMT+9")
        await publish(broker, "el-43", message(1, now), message(2, now, **JAM))  # a new snapshot: a re-render
        await expect(page.locator("#orders li[data-order]")).to_have_count(2)
        await expect(opened).to_contain_text("GMT+9")  # the tap stays
        await opened.click()
        await expect(opened).to_contain_text("ago")


async def test_a_trapped_passenger_is_notified_when_the_browser_allows_notifications(
    broker: Mosquitto, ui_settings: Callable[..., Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    async with running_gateway(
        ui_settings(broker), serve_http=True, consumers=[on_shift_dispatch(WED_10_BERLIN)]
    ) as gw:
        context = await browser.new_context(permissions=["notifications"])
        page = await context.new_page()
        # What the page shows, as the browser's Notification sees it.
        await page.add_init_script("""
            window.shown = [];
            const Real = window.Notification;
            window.Notification = class extends Real {
              constructor(title, options) { super(title, options); window.shown.push({ title, ...options }); }
            };
        """)
        await page.goto(f"http://127.0.0.1:{gw.settings.http_port}/ui/")
        await page.fill("#key", new_key(gw, "technician"))
        await page.locator("#login button").click()
        await expect(page.locator("#live")).to_have_text("live")
        assert await page.evaluate("Notification.permission") == "granted"
        await publish(broker, "el-2", message(1, now), message(2, now, **STUCK))
        await expect(page.locator("#orders li.entrapment")).to_have_count(1)
        shown = await page.evaluate("window.shown")
        assert [(n["title"], n["body"]) for n in shown] == [
            ("Passenger trapped", "el-2 stuck at floor 3 with 80 kg inside")
        ]
        alarms = await page.evaluate("window.iotgwAlarms")
        assert [a["notified"] for a in alarms] == [True]
        await context.close()
