"""The admin fits a 1,280 × 800 screen: Chromium (as tests/test_browser.py drives it) opens the portal
list, a portal page, the inbound list and the dashboard with realistic rows (long domains, long errors,
several token pairs, renewals on many days) and measures them.

Fits means: the page does not scroll sideways (the document's scrollWidth is at most its clientWidth), no
table is cut (every table's scrollWidth is at most the clientWidth of the box that holds it, so no column
hides behind a scroll bar of its own), and no chart label sticks out of its chart. A screenshot of each
page goes to var/screenshots/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from install.models import InboundKind, InboundStatus
from portals import selectors
from portals.models import PairState, Portal, PortalState, RenewalOutcome, RenewalTrigger
from tests.factories import (
    InboundRequestFactory,
    PortalFactory,
    RenewalLogFactory,
    TokenPairFactory,
    UserFactory,
)
from tests.test_browser import TIMEOUT_MS, browser  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db(transaction=True)

WIDTH, HEIGHT = 1280, 800
SCREENSHOTS = Path(__file__).resolve().parent.parent / "var" / "screenshots"

# Errors as long as the ones the backend really writes (the columns are CharField(500)).
LONG_ERROR = (
    "invalid_grant: The refresh token has expired or was revoked (an earlier attempt got no answer: the "
    "server most likely used the token then); the portal needs a reinstall by one of its administrators"
)
VERIFY_ERROR = (
    "app.info refused the token: NOT_INSTALLED (the application is not installed on this portal, or it "
    "was installed by another client_id); claimed member_id and domain do not match what Bitrix24 says"
)

# What a page measures: the document, and each table against the box that holds it.
MEASURE = """() => {
  const doc = document.scrollingElement;
  const tables = [...document.querySelectorAll("table")].filter(t => t.offsetParent !== null).map(t => {
    const box = t.parentElement;
    return {
      id: t.id || (t.closest("[id]") || {}).id || t.className,
      scroll: t.scrollWidth,
      container: box.clientWidth,
      right: Math.round(t.getBoundingClientRect().right),
    };
  });
  // A chart's labels inside its drawing: an SVG clips what sticks out, and no scroll width shows it.
  const clipped = [...document.querySelectorAll("svg")].flatMap(svg => {
    const area = svg.getBoundingClientRect();
    return [...svg.querySelectorAll("text")].filter(text => {
      const box = text.getBoundingClientRect();
      return box.left < area.left - 0.5 || box.right > area.right + 0.5;
    }).map(text => text.textContent);
  });
  return {scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth, tables, clipped};
}"""


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:  # noqa: F811
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _installations() -> Portal:
    """Portals as a busy installation base has them; returns the one with the most to show."""
    now = timezone.now()
    names = [
        "northwind-trading-international-holdings.bitrix24.com.br",
        "acme-logistics-and-warehousing-group.bitrix24.de",
        "small.bitrix24.com",
        "kontora-rogov-i-kopyt-severo-zapad.bitrix24.ru",
        "example-manufacturing.bitrix24.eu",
    ]
    portals = []
    for index, domain in enumerate(names):
        portal = PortalFactory(
            domain=domain,
            app_status="LFDTPS"[index],
            last_launch_at=now - timedelta(hours=index * 7),
            state=PortalState.NEEDS_REINSTALL if index == 1 else PortalState.INSTALLED,
            state_reason=LONG_ERROR if index == 1 else "",
        )
        TokenPairFactory(
            portal=portal,
            issued_days_ago=[3, 27.5, 22, 12, 0.2][index],
            consecutive_failures=[0, 4, 1, 0, 0][index],
            last_error=LONG_ERROR if index in (1, 2) else "",
            state=PairState.DEAD if index == 1 else PairState.ACTIVE,
            last_renewed_at=now - timedelta(days=index + 1),
        )
        portals.append(portal)
    busy = portals[0]
    for user_id in (7, 12, 348):
        TokenPairFactory(
            portal=busy,
            user_id=user_id,
            is_background=False,
            issued_days_ago=user_id % 20,
            consecutive_failures=user_id % 3,
            last_error=LONG_ERROR if user_id == 12 else "",
            next_attempt_at=now + timedelta(minutes=user_id),
            last_renewed_at=now - timedelta(days=2),
        )
    for day in range(14):
        for outcome in (RenewalOutcome.RENEWED, RenewalOutcome.TRANSIENT, RenewalOutcome.REFUSED)[
            : 1 + day % 3
        ]:
            RenewalLogFactory(
                portal=portals[day % len(portals)],
                outcome=outcome,
                trigger=RenewalTrigger.BEAT,
                error="" if outcome == RenewalOutcome.RENEWED else LONG_ERROR,
                duration_ms=120 + day,
                old_fingerprint="a1b2c3d4e5f6a7b8",
                new_fingerprint="f6e5d4c3b2a1f0e9",
                created_at=now - timedelta(days=day, hours=1),
            )
    for index in range(12):
        portal = portals[index % len(portals)]
        InboundRequestFactory(
            kind=[InboundKind.EVENT, InboundKind.LAUNCH, InboundKind.INSTALL][index % 3],
            event="ONAPPINSTALL" if index % 3 == 0 else "",
            member_id=portal.member_id,
            domain=portal.domain,
            status=InboundStatus.REJECTED if index % 2 else InboundStatus.ACCEPTED,
            http_status=401 if index % 2 else 200,
            error=VERIFY_ERROR if index % 2 else "",
        )
    every, _ = IntervalSchedule.objects.get_or_create(every=15, period=IntervalSchedule.MINUTES)
    PeriodicTask.objects.update_or_create(
        task=selectors.SWEEP_TASK,
        defaults={
            "name": "Renew refresh tokens that near the end of their life",
            "interval": every,
            "last_run_at": now - timedelta(minutes=4),
            "total_run_count": 96,
        },
    )
    return busy


def _log_in(page: Any, live_server: Any) -> None:
    UserFactory(username="staff", password="correct horse battery", superuser=True)
    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.fill("#id_username", "staff")
    page.fill("#id_password", "correct horse battery")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/")


def _fits(page: Any, url: str, name: str, *, empty_ok: bool = False) -> dict[str, Any]:
    page.goto(url)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    figures = page.evaluate(MEASURE)
    print(
        f"{name}: document {figures['scrollWidth']}/{figures['clientWidth']} px, tables {figures['tables']}"
    )
    assert figures["scrollWidth"] <= figures["clientWidth"], (name, figures)
    cut = [table for table in figures["tables"] if table["scroll"] > table["container"]]
    assert not cut, (name, cut)
    assert not figures["clipped"], (name, figures["clipped"])
    if empty_ok and not figures["tables"]:
        # A list without rows says so (Django: "0 groups"), instead of an empty table.
        assert re.search(r"\b0 \w", page.locator("#changelist").inner_text()), name
    else:
        assert figures["tables"] or name == "dashboard-empty", name
    return figures


def test_the_admin_fits_1280_pixels(live_server, page):
    busy = _installations()
    _log_in(page, live_server)
    base = live_server.url

    portal_list = _fits(page, f"{base}{reverse('admin:portals_portal_changelist')}", "portal-list")
    # Every column of the list is there, the last ones included.
    headers = page.locator("#result_list thead th").all_inner_texts()
    assert any("LAST RENEWAL" in h.upper() for h in headers) and any("FAILS" in h.upper() for h in headers)
    assert portal_list["tables"]

    _fits(page, f"{base}{reverse('admin:portals_portal_change', args=(busy.pk,))}", "portal-page")
    # The inlines' times take one line each (Django's "Nov. 28, 2026, 7:17 a.m." took four).
    heights = page.evaluate(
        """() => [...document.querySelectorAll(
              "#token_pairs-group td.field-access_expires span, #token_pairs-group td.field-refresh_issued span,"
              + " #token_pairs-group td.field-last_renewed span, #renewals-group td.field-when span")
           ].map(span => span.getBoundingClientRect().height)"""
    )
    assert len(heights) >= 4 * 3 + 6 and max(heights) < 24, heights
    _fits(page, f"{base}{reverse('admin:install_inboundrequest_changelist')}", "inbound-list")
    error_cell = page.locator("#result_list td.field-error").first
    box = error_cell.bounding_box()
    assert box is not None and box["x"] + box["width"] <= WIDTH, box
    assert "NOT_INSTALLED" in page.locator("#result_list").inner_text()

    _fits(page, f"{base}{reverse('admin_dashboard')}", "dashboard")
    # The renewals chart names real days, not day numbers.
    today = timezone.localdate()
    labels = page.locator("#renewal-activity svg text.day").all_text_contents()
    assert labels[-1] == today.strftime("%-d %b"), labels
    assert labels[0] == (today - timedelta(days=13)).strftime("%-d %b"), labels


def test_an_empty_dashboard_says_so(live_server, page):
    # As `migrate` leaves a new installation: the sweep's entry, which beat has not sent yet.
    every, _ = IntervalSchedule.objects.get_or_create(every=15, period=IntervalSchedule.MINUTES)
    PeriodicTask.objects.update_or_create(
        task=selectors.SWEEP_TASK,
        defaults={"name": "Renew refresh tokens that near the end of their life", "interval": every},
    )
    _log_in(page, live_server)
    _fits(page, f"{live_server.url}{reverse('admin_dashboard')}", "dashboard-empty")
    assert page.locator("#site-name").inner_text() == "Bitrix24 app backend"
    # Beat counts the first interval from when the entry was saved: the row says when, not "soon".
    assert page.locator("#beat-schedule td.last-run").inner_text() == "never"
    assert re.match(r"in 1[45].minutes", page.locator("#beat-schedule td.next-run").inner_text())
    assert page.locator("#days-left-chart svg").count() == 0
    assert (
        "No portal has an active background token pair yet" in page.locator("#days-left-chart").inner_text()
    )
    assert page.locator("#renewal-activity svg").count() == 0
    assert "No renewal attempt in the last 14 days" in page.locator("#renewal-activity").inner_text()


def _every_list() -> list[tuple[str, str]]:
    """Every changelist the admin shows: the project's models and the third-party ones it registers."""
    from django.contrib import admin

    return sorted(
        (
            f"{model._meta.app_label}-{model._meta.model_name}",
            reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist"),
        )
        for model in admin.site._registry
    )


def test_every_admin_list_fits_1280_pixels(live_server, page):
    """Each list with rows as long as the backend writes them: app events, wanted actions, deferred events and
    renewal attempts beside the lists above, and the third-party lists (beat's schedule, users, tokens)."""
    from events.models import AppEvent
    from install.models import DeferredEvent
    from portals.models import RenewalAttempt, WantedAction, WantedKind

    busy = _installations()
    pair = busy.token_pairs.first()
    for number in range(5):
        AppEvent.objects.create(
            portal=busy,
            event="ONCRMDEALUPDATE",
            source="online",
            dedup_key=f"layout-{number}",
            object_id=str(1000 + number),
            ids={"ID": str(1000 + number)},
            last_error=LONG_ERROR,
            sender="203.0.113.77",
        )
        if number == 0:  # one open action per pair and kind
            for kind in (WantedKind.RENEW_PAIR, WantedKind.BIND_EVENTS, WantedKind.CONFIRM_UNINSTALL):
                WantedAction.objects.create(portal=busy, pair=pair, kind=kind, last_error=LONG_ERROR)
        RenewalAttempt.objects.create(
            pair=pair,
            portal=busy,
            trigger=RenewalTrigger.BEAT,
            old_fingerprint="a1b2c3d4e5f6a7b8",
            holder_host="worker-custody-7c9f8d6b5-x2lqz.prod.internal",
            holder_pid=4242,
            lease_expires_at=timezone.now() + timedelta(minutes=10),
            state="in_flight" if number == 0 else "interrupted",
            note=LONG_ERROR[:200],
        )
        DeferredEvent.objects.create(
            event="ONAPPINSTALL",
            member_id=busy.member_id,
            source="203.0.113.77",
            payload="{}",
            reason=VERIFY_ERROR[:200],
            expires_at=timezone.now() + timedelta(hours=1),
            outcome=LONG_ERROR[:300],
        )
    _log_in(page, live_server)
    too_wide = []
    for name, url in _every_list():
        try:
            _fits(page, f"{live_server.url}{url}", f"list-{name}", empty_ok=True)
        except AssertionError as exc:
            too_wide.append((name, str(exc)[:300]))
    assert not too_wide, too_wide
