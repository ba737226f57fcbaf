"""The staff page in a real headless Chromium (Debian's, driven by Playwright): live, and it acts."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from alerts.dispatch.consumer import Dispatch
from alerts.dispatch.roster import load_roster
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.security import create_api_key
from gateway.service import Gateway
from tests.support.dispatching import ROSTER, RULES, WED_10_BERLIN, Clock, message, publish
from tests.support.gateway import running_gateway, wait_for

pytestmark = pytest.mark.anyio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
JAM = {"mode": "fault", "fault": "DOOR_JAM", "door": "opening", "load_kg": 0}


@pytest.fixture
def ui_settings(tmp_path: Path, settings_for: Callable[..., Settings]) -> Callable[[Mosquitto], Settings]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return lambda broker: settings_for(broker, consumers="alerts", rules_file=str(rules), api_auth=True)


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


async def test_a_simulated_fault_appears_live_and_the_ack_button_acknowledges_it(
    broker: Mosquitto, ui_settings: Callable[[Mosquitto], Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    # Dispatch's clock at a time Tina is on shift (whatever the time of day the test runs at).
    dispatch = Dispatch(load_roster(ROSTER.format(url="http://127.0.0.1:9/")), clock=Clock(WED_10_BERLIN))
    settings = ui_settings(broker)
    async with running_gateway(settings, serve_http=True, consumers=[dispatch]) as gw:
        page = await staff_page(browser, gw, phone=True)
        await page.fill("#who", "tina")
        await page.locator("#who").dispatch_event("change")
        await expect(page.locator("#alerts-empty")).to_be_visible()

        await publish(broker, "el-7", message(1, now), message(2, now, **JAM))
        card = page.locator("#alerts li[data-alert]")
        await expect(card).to_have_count(1)  # pushed: the page was not reloaded
        await expect(card).to_contain_text("Door jammed on el-7")
        await expect(card).to_have_attribute("data-status", "firing")
        order = page.locator("#orders li[data-order]")
        await expect(order).to_contain_text("assigned to tina")

        await card.locator("button[data-action=ack]").click()
        await expect(card).to_have_attribute("data-status", "acknowledged")
        alert_id = await card.get_attribute("data-alert")
        headers = {"Authorization": f"Bearer {new_key(gw, 'viewer')}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", headers=headers) as api:
            alert = (await api.get(f"/api/alerts/{alert_id}")).json()
            assert (alert["status"], alert["acked_by"]) == ("acknowledged", "tina")

            await order.locator("button[data-action=ack]").click()
            await expect(order).to_have_attribute("data-status", "acknowledged")
            (wo,) = (await api.get("/api/work-orders")).json()["items"]
            assert (wo["status"], wo["acked_by"]) == ("acknowledged", "tina")

        # Usable on a phone: nothing wider than the screen.
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

        await card.locator("button.device").click()
        events = page.locator("#device-events li")
        await expect(events.first).to_be_visible()
        await expect(page.locator("#device-events")).to_contain_text("alert.acknowledged")
        await expect(page.locator("#device-events")).to_contain_text("elevator.fault.raised")


async def test_the_page_says_who_must_be_named_before_acting(
    broker: Mosquitto, ui_settings: Callable[[Mosquitto], Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    dispatch = Dispatch(load_roster(ROSTER.format(url="http://127.0.0.1:9/")), clock=Clock(now))
    async with running_gateway(ui_settings(broker), serve_http=True, consumers=[dispatch]) as gw:
        page = await staff_page(browser, gw)
        await page.evaluate("localStorage.clear()")
        await publish(broker, "el-8", message(1, now), message(2, now, **JAM))
        card = page.locator("#alerts li[data-alert]")
        await card.locator("button[data-action=ack]").click()
        await expect(page.locator("#error")).to_contain_text("Enter your name first")

        async def still_firing() -> bool:
            return (await page.get_attribute("#alerts li[data-alert]", "data-status")) == "firing"

        await wait_for(still_firing, what="the alert to stay firing")


async def test_the_page_asks_for_a_valid_key_and_a_viewer_may_watch_but_not_act(
    broker: Mosquitto, ui_settings: Callable[[Mosquitto], Settings], browser: Browser
) -> None:
    now = datetime.now(UTC)
    async with running_gateway(ui_settings(broker), serve_http=True) as gw:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{gw.settings.http_port}/ui/")
        await page.fill("#key", "iotgw_000000000000_not-a-real-key-at-all")
        await page.locator("#login button").click()
        await expect(page.locator("#login-message")).to_contain_text("not accepted")
        await expect(page.locator("#live")).not_to_have_text("live")

        page = await staff_page(browser, gw, role="viewer")
        await page.fill("#who", "vera")
        await page.locator("#who").dispatch_event("change")
        await publish(broker, "el-9", message(1, now), message(2, now, **JAM))
        card = page.locator("#alerts li[data-alert]")
        await expect(card).to_contain_text("Door jammed on el-9")  # a viewer watches live
        await card.locator("button[data-action=ack]").click()
        await expect(page.locator("#error")).to_contain_text("the viewer role may not do this")
        await expect(card).to_have_attribute("data-status", "firing")


async def test_the_api_docs_render_with_no_other_host_reachable(
    broker: Mosquitto, ui_settings: Callable[[Mosquitto], Settings], browser: Browser
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
