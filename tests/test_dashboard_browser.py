"""The dashboard in a real headless browser (Debian's chromium driven by playwright).

The page loads without a token, refuses a wrong one, draws every chart with data once the
right token is typed, and follows a blue-green switch made through the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator

import pytest

from tests.helpers import (
    INFER,
    TOKEN,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    running_gateway,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = "/tmp/modelgate-dashboard.png"
CHART_COUNT = 9  # throughput, p50, p99, errors, non-null, missing, ttft, traffic, shadow
DEADLINE_MS = 20_000
NONZERO = re.compile(r"[1-9]")

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is not installed (apt-get install chromium; the test command does)",
)


@contextlib.asynccontextmanager
async def steady_traffic(gw: RunningGateway, every: float = 0.02) -> AsyncIterator[None]:
    """A trickle of requests from many users for as long as the block runs."""

    async def send() -> None:
        i = 0
        while True:
            await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]),
                                 headers={"x-user-id": f"user-{i % 500}"})
            i += 1
            await asyncio.sleep(every)  # pacing, not waiting for a condition

    task = asyncio.create_task(send())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_dashboard_in_browser(blue: ModelServer, green: ModelServer) -> None:
    from playwright.async_api import async_playwright, expect

    # Locator assertions poll inside the page without eval(), which the page's CSP forbids.
    expect.set_options(timeout=DEADLINE_MS)

    rules = [{"name": "u1", "header": "x-user-id", "prefix": "user-1", "backend": "green"}]
    async with running_gateway(classifier_config(blue.url, green.url, rules=rules)) as gw:
        r = await gw.admin.put("/admin/routes/classifier/canary",
                               json={"backend": "green", "weight": 30, "reason": "try v2"})
        assert r.status_code == 200, r.text
        async with steady_traffic(gw), async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                problems: list[str] = []
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                page.on("console", lambda msg: problems.append(f"console: {msg.text}")
                        if msg.type == "error" else None)

                await page.goto(gw.admin_url + "/dashboard")
                token_input = page.get_by_test_id("token-input")
                await token_input.wait_for(state="visible", timeout=DEADLINE_MS)

                # a wrong token goes back to the login field with a message
                await token_input.fill("not-the-token")
                await page.get_by_test_id("login-button").click()
                await expect(page.get_by_test_id("login-message")).to_contain_text("401")
                # that attempt was a 401 on the data endpoint, logged by chromium
                problems = [m for m in problems if "401" not in m]

                await token_input.fill(TOKEN)
                await page.get_by_test_id("login-button").click()
                await expect(page.locator(".uplot canvas")).to_have_count(CHART_COUNT)
                # a request rate with a non-zero digit in it
                await expect(page.get_by_test_id("rps-classifier")).to_have_text(NONZERO)
                await expect(page.get_by_test_id("live-classifier")).to_have_text("blue")
                await expect(page.get_by_test_id("canary-classifier")).to_have_text("green 30%")
                # the match rule's hits (users user-1...) under the route
                await expect(page.get_by_test_id("rule-hits-classifier-u1")).to_have_text(
                    NONZERO)
                r = await gw.admin.post("/admin/routes/classifier/switch",
                                        json={"to": "green", "reason": "v2 looks good"})
                assert r.status_code == 200, r.text
                await expect(page.get_by_test_id("live-classifier")).to_have_text("green")
                await expect(page.get_by_test_id("canary-classifier")).to_have_text("off")
                await expect(page.get_by_test_id("events")).to_contain_text("v2 looks good")
                r = await gw.admin.put("/admin/routes/classifier/rules", json={"rules": []})
                assert r.status_code == 200, r.text
                await expect(page.get_by_test_id("events")).to_contain_text("rules: u1 → –")
                await expect(page.get_by_test_id("rules-classifier")).to_have_count(0)
                await expect(page.get_by_test_id("status")).to_have_class(re.compile(r"\bok\b"))
                await page.screenshot(path=SCREENSHOT, full_page=True)
                assert problems == []
            finally:
                await browser.close()
