"""Real browser tests: Playwright driving the machine's Chromium (Debian's package, no browser
download) against the live backend and the Bitrix24 stand-in.

1. Staff log into the admin, read the dashboard, select a portal and run an action.
2. A page on the stand-in portal's origin opens the app exactly as a portal does (a form POST into
   an iframe) and the app renders inside the frame; the same page on another origin is refused
   the frame by the browser, because the backend names only the portal as a frame ancestor.

Screenshots go to the test's temporary folder (the path is printed; `-s` shows it).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.urls import reverse
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from config.celery import app as celery_app
from install.models import InboundKind, InboundRequest, InboundStatus
from portals.models import Portal, PortalState
from standin.server import APP_FRAME_PATH, APP_FRAME_SELECTOR

CHROMIUM = "/usr/bin/chromium"
# As the machine notes say: without the background-networking flags Chromium keeps trying to reach
# Google's hosts, which this closed network refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000

pytestmark = pytest.mark.django_db(transaction=True)


def _missing() -> str:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (it is in requirements.txt)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: `apt-get install chromium` (Debian's package; .ci/run installs it)"
    return ""


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {reason}")
        pytest.skip(f"no browser on this machine: {reason}")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an asyncio loop in this thread; Django would take the test's own
    # ORM calls for calls from async code. They are not: allow them, for this test only.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _shot(page: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


# --- the admin, as staff use it ---------------------------------------------------------------------


def test_staff_log_in_read_the_dashboard_and_renew_a_portal(
    page, backend, standin, live_server, django_user_model, tmp_path
):
    from playwright.sync_api import expect

    portals = [standin.add_portal() for _ in range(3)]
    for fake in portals:
        assert backend.install_event(fake).status_code == 200
    target = Portal.objects.get(member_id=portals[0].member_id)
    every, _ = IntervalSchedule.objects.get_or_create(every=15, period=IntervalSchedule.MINUTES)
    # The migration creates it; a transactional test before this one may have flushed it.
    PeriodicTask.objects.get_or_create(
        task="portals.tasks.sweep_due_pairs", defaults={"name": "Renewal sweep", "interval": every}
    )
    django_user_model.objects.create_superuser("staff", "staff@example.invalid", "correct horse battery")

    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.fill("#id_username", "staff")
    page.fill("#id_password", "correct horse battery")
    page.click("input[type=submit]")
    expect(page.locator("#installations-dashboard-link")).to_be_visible()

    page.click("#installations-dashboard-link a")
    expect(page).to_have_url(f"{live_server.url}{reverse('admin_dashboard')}")
    chart = page.locator("#days-left-chart svg")
    expect(chart).to_be_visible()
    assert chart.locator("rect").count() >= 28  # a bar per day of a refresh token's life, and "lapsed"
    expect(page.locator("#days-left-chart")).to_contain_text("each portal that is not uninstalled (3)")
    expect(page.locator("#dash-states")).to_contain_text("Installations (3)")
    expect(page.locator("#beat-schedule")).to_contain_text("every 15 minutes")
    _shot(page, tmp_path, "dashboard")

    page.goto(f"{live_server.url}/admin/portals/portal/")
    expect(page.locator("#result_list")).to_contain_text(target.domain)
    page.check(f'input[name="_selected_action"][value="{target.pk}"]')
    page.select_option('select[name="action"]', "renew_now")
    try:
        page.click('button[name="index"]')
        expect(page.locator("ul.messagelist li.success")).to_contain_text(
            "Queued the renewal of 1 token pair(s) on 1 portal(s)"
        )
        _shot(page, tmp_path, "portal-list-after-renew")
    finally:
        celery_app.control.purge()  # no worker runs here: drop what the action queued

    # The portal page: masked tokens, and its buttons call the same operations.
    page.click(f"text={target.domain}")
    expect(page.locator("#portal-operations")).to_be_visible()
    page.click("#portal-operations button[value=verify]")
    expect(page.locator("ul.messagelist li.success")).to_contain_text(
        f"{target.domain}: verified with app.info"
    )
    _shot(page, tmp_path, "portal-page-after-verify")
    page.fill('#portal-operations input[name="reason"]', "customer asked us to")
    page.click("#portal-operations button[value=reinstall]")
    expect(page.locator("ul.messagelist li.success")).to_contain_text("Marked as needing a reinstall")
    target.refresh_from_db()
    assert (target.state, target.state_reason) == (PortalState.NEEDS_REINSTALL, "customer asked us to")


# --- the app in the portal's frame ------------------------------------------------------------------


class _OtherOrigin:
    """A page served from an origin that is not the portal's (another port on loopback)."""

    def __init__(self, html: str) -> None:
        body = html.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _launches() -> list[InboundRequest]:
    return list(InboundRequest.objects.filter(kind=InboundKind.LAUNCH).order_by("pk"))


def test_the_app_opens_in_the_portals_frame_and_nowhere_else(page, live_server, standin, tmp_path):
    from playwright.sync_api import expect

    b24 = standin.add_portal()
    handler = f"{live_server.url}/app/"
    answers: list[tuple[int, str]] = []
    page.on(
        "response",
        lambda r: answers.append((r.status, r.headers.get("content-security-policy", "")))
        if r.url.startswith(handler)
        else None,
    )

    # As the portal shows it: the portal's page posts the launch into its iframe.
    page.goto(f"{b24.url}{APP_FRAME_PATH}?handler={quote(handler, safe='')}&user_id=1")
    app = page.frame_locator(APP_FRAME_SELECTOR).locator("#app")
    expect(app).to_contain_text(f"Connected to {b24.domain}")
    expect(app).to_have_attribute("data-member-id", b24.member_id)
    assert answers == [(200, f"frame-ancestors http://{b24.domain}")]
    assert Portal.objects.filter(member_id=b24.member_id).exists()
    _shot(page, tmp_path, "app-in-portal-frame")

    # The same page, served from another origin: the backend answers, the browser refuses the frame.
    other = _OtherOrigin(b24.app_frame_page(handler, user_id=1))
    try:
        seen = len(_launches())
        answers.clear()
        page.goto(other.url)
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while time.monotonic() < deadline and not answers:
            page.wait_for_timeout(100)
        element = page.query_selector(APP_FRAME_SELECTOR)
        frame = element.content_frame() if element is not None else None
        assert frame is not None
        while time.monotonic() < deadline and not frame.url.startswith("chrome-error://"):
            page.wait_for_timeout(100)
        _shot(page, tmp_path, "app-framed-by-another-origin")
        # The backend did serve the launch (verified, 200, the portal as the only frame ancestor) …
        assert answers == [(200, f"frame-ancestors http://{b24.domain}")]
        launch = _launches()[seen:]
        assert [(row.status, row.http_status) for row in launch] == [(InboundStatus.ACCEPTED, 200)]
        # … and Chromium put its error page in the frame instead of the app.
        assert frame.url.startswith("chrome-error://"), frame.url
        assert page.frame_locator(APP_FRAME_SELECTOR).locator("#app").count() == 0
        assert "Connected to" not in frame.content()
    finally:
        other.close()
