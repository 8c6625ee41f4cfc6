"""The app's own events: the registry, durable handling, retries and the admin, the flood bound.

Events are posted to /events/ over real HTTP as Bitrix24 posts them (form-encoded, PHP keys; shape of
tests/payloads/oncrmcontactadd-docs.json); handlers are the test app's (tests/eventapp/bitrix24.py) and
read the portal through the stand-in's REST API. Here the handler tasks run in this process, one
`apply()` each, as a worker runs them; tests/test_events_e2e.py runs them in real worker processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from events import services
from events.models import AppEvent, EventSource, EventState, HandlerPace
from events.tasks import handle_event_task, sweep_events
from install.models import InboundRequest
from portals import phpform, registry
from standin import FakePortal
from tests.eventapp import bitrix24 as eventapp
from tests.processes import ROOT


def event_body(portal: FakePortal, event: str, object_id: str, ts: int, **auth: str) -> list[tuple[str, str]]:
    """An event as Bitrix24 posts it (oncrmcontactadd-docs.json): identifiers and the application token."""
    return phpform.encode(
        {
            "event": event,
            "event_handler_id": "11",
            "data": {"FIELDS": {"ID": object_id}},
            "ts": str(ts),
            "auth": {
                "access_token": "not-needed-by-the-backend",
                "expires_in": "3600",
                "scope": "crm",
                "domain": portal.domain,
                "server_endpoint": portal.standin.server_endpoint,
                "status": portal.status,
                "client_endpoint": portal.client_endpoint,
                "member_id": portal.member_id,
                "application_token": portal.application_token,
                **auth,
            },
        }
    )


@pytest.fixture
def run_events() -> Callable[[], list[str]]:
    """Run every event that is due now, once each, in this process (as a worker would)."""

    def run() -> list[str]:
        ids = list(
            AppEvent.objects.filter(state=EventState.QUEUED).order_by("pk").values_list("pk", flat=True)
        )
        return [handle_event_task.apply(args=(pk,)).get() for pk in ids]

    return run


# --- the registry ------------------------------------------------------------------------------------


def test_registry_refuses_what_would_break_custody_or_run_twice() -> None:
    with registry.replaced():
        with pytest.raises(ImproperlyConfigured, match="handled by the project"):
            registry.on("ONAPPUNINSTALL")
        with pytest.raises(ImproperlyConfigured, match="not a Bitrix24 event"):
            registry.on("deal added")
        registry.on("ONCRMDEALADD")(eventapp.deal_added)
        with pytest.raises(ImproperlyConfigured, match="both online and offline"):
            registry.on("oncrmdealadd", offline=True)(eventapp.company_added)
        registry.on("ONCRMDEALADD")(eventapp.deal_added)  # the same function again (a module imported twice)
        assert [h.name for h in registry.handlers_for("ONCRMDEALADD")] == [
            "tests.eventapp.bitrix24.deal_added"
        ]
    assert registry.handlers_for("ONCRMDEALADD") == []  # the app's registry is back as it was


@pytest.mark.system
def test_handlers_register_from_the_apps_bitrix24_module(tmp_path: Path) -> None:
    """The test app is an installed app; its bitrix24.py is imported at start-up like admin.py. It
    registers only when its folder is set: in a fresh process with the variable, the handlers are there."""
    code = (
        "import django; django.setup(); from portals import registry; "
        "print(registry.events(offline=False), registry.events(offline=True))"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "B24_TEST_EVENTAPP_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "['ONCRMCOMPANYADD', 'ONCRMDEALADD'] ['ONCRMCONTACTUPDATE']"


# --- durable, queued handling ------------------------------------------------------------------------


def test_an_event_is_stored_answered_and_handled_later_once_per_delivery(
    backend: Any, installed_portal: Any, b24: FakePortal, handlers: Path, run_events: Callable[[], list[str]]
) -> None:
    b24.seed("crm.deal", 1)
    deal_id = "1"
    body = event_body(b24, "ONCRMDEALADD", str(deal_id), ts=1_724_695_689)

    first = backend.post("/events/", data=body)
    assert first.status_code == 200, first.text
    assert first.json()["result"] == "queued"
    assert eventapp.handled() == []  # answered before any handler ran
    again = backend.post("/events/", data=body)  # Bitrix24's queue server delivering the same event twice
    assert again.json()["result"] == "duplicate"

    stored = AppEvent.objects.get()
    assert (stored.event, stored.object_id, stored.source, stored.state) == (
        "ONCRMDEALADD",
        str(deal_id),
        EventSource.ONLINE,
        EventState.QUEUED,
    )
    assert stored.ids == {"FIELDS.ID": str(deal_id)}
    assert "application_token" not in str(stored.ids) and b24.application_token not in str(stored.__dict__)

    assert run_events() == ["handled"]
    assert run_events() == []
    handled = eventapp.handled()
    assert [(h["event"], h["id"]) for h in handled] == [("ONCRMDEALADD", str(deal_id))]
    assert handled[0]["title"] == "crm.deal #1"  # read through PortalClient from the portal
    stored.refresh_from_db()
    assert (stored.state, stored.attempts, stored.done_handlers) == (
        EventState.HANDLED,
        1,
        ["tests.eventapp.bitrix24.deal_added"],
    )


def test_an_event_without_a_handler_is_only_logged(
    backend: Any, installed_portal: Any, b24: FakePortal, handlers: Path
) -> None:
    answer = backend.post("/events/", data=event_body(b24, "ONCRMLEADADD", "5", ts=1_724_695_689))
    assert answer.status_code == 200
    assert answer.json()["result"] == "ignored"
    assert AppEvent.objects.count() == 0
    assert InboundRequest.objects.get().event == "ONCRMLEADADD"


def test_a_wrong_application_token_is_refused_and_stores_nothing(
    backend: Any, installed_portal: Any, b24: FakePortal, handlers: Path
) -> None:
    answer = backend.post(
        "/events/", data=event_body(b24, "ONCRMDEALADD", "1", ts=1, application_token="f" * 32)
    )
    assert answer.status_code in (401, 403)
    assert AppEvent.objects.count() == 0


def test_a_failing_handler_is_retried_then_failed_visible_in_the_admin_and_run_again(
    backend: Any,
    installed_portal: Any,
    b24: FakePortal,
    handlers: Path,
    run_events: Callable[[], list[str]],
    staff_user: Any,
    settings: Any,
) -> None:
    from django.contrib.auth.models import Permission

    settings.BITRIX24_EVENT_RETRIES = 2
    settings.BITRIX24_EVENT_RETRY_SECONDS = 0
    (handlers / "fail").write_text("")
    assert backend.post("/events/", data=event_body(b24, "ONCRMCOMPANYADD", "77", ts=100)).status_code == 200

    outcomes = run_events() + run_events() + run_events() + run_events()
    assert [o.split(":")[0] for o in outcomes] == ["queued", "queued", "failed"]  # 1 try + 2 retries
    failed = AppEvent.objects.get()
    assert failed.state == EventState.FAILED and failed.attempts == 3
    assert "the handler is broken" in failed.last_error
    assert "RuntimeError" in failed.traceback and "company_added" in failed.traceback

    staff = Client()
    staff_user.user_permissions.add(Permission.objects.get(codename="view_appevent"))
    staff.force_login(staff_user)
    listing = staff.get("/admin/events/appevent/", {"state__exact": "failed", "q": b24.member_id})
    assert listing.status_code == 200
    page = listing.content.decode()
    assert "ONCRMCOMPANYADD" in page and "the handler is broken" in page
    detail = staff.get(f"/admin/events/appevent/{failed.pk}/change/").content.decode()
    assert "Traceback" in detail and "RuntimeError" in detail

    refused = staff.post("/admin/events/appevent/", {"action": "run_again", "_selected_action": [failed.pk]})
    assert refused.status_code in (200, 302, 403)
    assert AppEvent.objects.get().state == EventState.FAILED  # viewing is not operating

    (handlers / "fail").unlink()  # the app's author fixed the handler
    staff_user.user_permissions.add(Permission.objects.get(codename="change_appevent"))
    staff = Client()
    staff.force_login(staff_user)
    answer = staff.post(
        "/admin/events/appevent/",
        {"action": "run_again", "_selected_action": [failed.pk]},
        follow=True,
    )
    assert "1 event(s) queued to run again" in answer.content.decode()
    assert run_events() == ["handled"]
    assert [h["id"] for h in eventapp.handled()] == ["77"]
    failed.refresh_from_db()
    assert failed.state == EventState.HANDLED


def test_the_sweep_runs_an_event_whose_task_never_came(
    installed_portal: Any, b24: FakePortal, handlers: Path, settings: Any
) -> None:
    """The broker lost the message (or was away): the row is the record, the sweep starts it."""
    settings.BITRIX24_WANTED_GRACE_SECONDS = 0
    services.store(
        portal=installed_portal,
        event="ONCRMCOMPANYADD",
        source=EventSource.ONLINE,
        dedup_key="ONCRMCOMPANYADD|9|1",
        ids={"FIELDS.ID": "9"},
        user_id=None,
        occurred_at=None,
    )
    assert services.due() != []
    # The sweep publishes; here the handler is run by hand from what it published.
    AppEvent.objects.update(next_attempt_at=AppEvent.objects.get().received_at)
    sweep_events.apply()
    assert handle_event_task.apply(args=(AppEvent.objects.get().pk,)).get() == "handled"


def test_a_running_event_whose_worker_died_runs_again_after_its_lease(
    installed_portal: Any, b24: FakePortal, handlers: Path
) -> None:
    accepted = services.store(
        portal=installed_portal,
        event="ONCRMCOMPANYADD",
        source=EventSource.ONLINE,
        dedup_key="k",
        ids={"FIELDS.ID": "3"},
        user_id=None,
        occurred_at=None,
    )
    assert accepted.record is not None
    assert services.claim(event_id=accepted.record.pk) is not None  # a worker took it, then died
    assert services.claim(event_id=accepted.record.pk) is None  # nobody else while its lease runs
    AppEvent.objects.update(next_attempt_at=accepted.record.received_at)  # the lease ran out
    assert services.due() == [accepted.record.pk]
    assert handle_event_task.apply(args=(accepted.record.pk,)).get() == "handled"
    assert AppEvent.objects.get().attempts == 2


# --- floods ------------------------------------------------------------------------------------------


def test_a_flood_of_admitted_events_is_bounded_in_storage_and_handler_work(
    backend: Any,
    installed_portal: Any,
    b24: FakePortal,
    handlers: Path,
    settings: Any,
    run_events: Callable[[], list[str]],
) -> None:
    """1,000 forged events with the right application token (every employee can read it): at most the
    portal's per-minute budget is stored and handled; the rest is refused with 429 and leaves a bounded
    inbound-log row."""
    settings.BITRIX24_EVENTS_PER_MINUTE = 50
    started = time.monotonic()

    def post(number: int) -> int:
        body = event_body(b24, "ONCRMCOMPANYADD", str(number), ts=number, junk="x" * 2000)
        return int(backend.post("/events/", data=body).status_code)

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(post, range(1000)))
    elapsed = time.monotonic() - started
    answers = {status: statuses.count(status) for status in sorted(set(statuses))}
    print(f"answers: {answers} in {elapsed:.1f} s")
    # The budget is per minute: a run that spans a minute boundary may admit one more minute's worth.
    windows = 1 + int(elapsed // 60) + 1
    assert set(answers) == {200, 429}
    assert 50 <= answers[200] <= 50 * windows
    accepted = answers[200]
    assert AppEvent.objects.count() == accepted
    assert len(run_events()) == accepted
    assert len(eventapp.handled()) == accepted
    refused = InboundRequest.objects.filter(http_status=429)
    assert refused.count() == 1000 - accepted
    sizes = {
        status: max(len(json.dumps(row.body)) + len(json.dumps(row.query)) for row in rows)
        for status, rows in (
            ("refused", refused),
            ("accepted", InboundRequest.objects.filter(http_status=200)),
        )
    }
    print("largest inbound rows (bytes):", sizes)
    assert sizes["refused"] < 1000  # a bounded summary
    assert sizes["accepted"] < 50_000  # the redacted request, values cut at 500 characters


def test_an_employees_flood_from_their_address_cannot_spend_bitrix24s_budget(
    backend: Any, installed_portal: Any, b24: FakePortal, handlers: Path, settings: Any
) -> None:
    """The event budget is kept per (portal, sender): before, an employee filled the portal's budget and
    Bitrix24's genuine events then got 429 and were lost."""
    settings.FORWARDED_ALLOW_IPS = ["127.0.0.1"]
    settings.BITRIX24_EVENTS_PER_MINUTE = 10
    employee, bitrix24 = {"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "198.51.100.20"}
    flood = [
        backend.post(
            "/events/", data=event_body(b24, "ONCRMCOMPANYADD", str(n), ts=n), headers=employee
        ).status_code
        for n in range(15)
    ]
    assert flood == [200] * 10 + [429] * 5
    genuine = backend.post("/events/", data=event_body(b24, "ONCRMCOMPANYADD", "99", ts=99), headers=bitrix24)
    assert genuine.status_code == 200 and genuine.json()["result"] == "queued"
    assert set(AppEvent.objects.values_list("sender", flat=True)) == {"203.0.113.9", "198.51.100.20"}


def test_a_delivery_cannot_be_claimed_ahead_of_bitrix24(
    backend: Any, installed_portal: Any, b24: FakePortal, handlers: Path
) -> None:
    """An employee posts the event Bitrix24 is about to deliver (same event, object and a guessed ts) first:
    the genuine delivery still counts, because its key holds what only it carries (its access token)."""
    ahead = event_body(b24, "ONCRMCOMPANYADD", "7", ts=5000, access_token="made-up-by-the-employee")
    genuine = event_body(b24, "ONCRMCOMPANYADD", "7", ts=5000, access_token="issued-by-bitrix24-0123")
    assert backend.post("/events/", data=ahead).json()["result"] == "queued"
    assert backend.post("/events/", data=genuine).json()["result"] == "queued"
    assert backend.post("/events/", data=genuine).json()["result"] == "duplicate"  # Bitrix24 posting it again
    assert AppEvent.objects.count() == 2


# --- no sleeping for a portal's rate limit ---------------------------------------------------------------


def test_a_handler_that_meets_the_rate_limit_goes_back_with_its_time_and_writes_once(
    backend: Any, installed_portal: Any, b24: FakePortal, run_events: Callable[[], list[str]]
) -> None:
    """The worker never sleeps for a portal's limit: a handler whose call would wait past
    BITRIX24_HANDLER_RATE_WAIT_SECONDS puts its event back with the time the slot frees, uncounted, and runs again from its
    start. Written as the docs ask (look before writing), it writes once overall."""
    from portals import governor
    from portals.models import Portal

    def deal_noted(event: Any) -> None:
        mine = f"noted by the app for event {event.record_id}"
        notes = event.client.call(
            "crm.timeline.comment.list", {"filter": {"ENTITY_ID": event.object_id, "ENTITY_TYPE": "deal"}}
        )
        if not any(note.get("COMMENT") == mine for note in notes or []):
            event.client.call(
                "crm.timeline.comment.add",
                {"fields": {"ENTITY_ID": event.object_id, "ENTITY_TYPE": "deal", "COMMENT": mine}},
            )
        event.client.call("crm.deal.get", {"id": event.object_id})

    b24.seed("crm.deal", 1)
    # The portal's bucket as staff set it: room for two calls now, the next one 10 s later.
    Portal.objects.filter(pk=installed_portal.pk).update(rate_limit=0.1, rate_burst=5)
    with registry.replaced(lambda: registry.on("ONCRMDEALADD")(deal_noted)):
        from django.utils import timezone

        assert backend.post("/events/", data=event_body(b24, "ONCRMDEALADD", "1", ts=300)).status_code == 200
        before = timezone.now()
        assert [o.split(":")[0] for o in run_events()] == ["queued"]
        event = AppEvent.objects.get()
        assert (event.state, event.attempts) == (EventState.QUEUED, 0)  # back, and not counted as a failure
        assert "waiting for the portal's rate limit" in event.last_error
        assert 5 <= (event.next_attempt_at - before).total_seconds() <= 12  # when the slot frees

        assert run_events() == ["nothing to do"]  # not before its slot: no worker takes it early
        # Nor the portal's other events: workers take other portals' work until the slot frees.
        assert backend.post("/events/", data=event_body(b24, "ONCRMDEALADD", "1", ts=301)).status_code == 200
        assert run_events() == ["nothing to do", "nothing to do"]
        assert HandlerPace.objects.get(portal=installed_portal).runnable_at == event.runnable_at
        # Later: its time has come and the bucket has drained (here: the clock moved on, staff raised the
        # portal's limit and its bucket was emptied).
        AppEvent.objects.update(runnable_at=timezone.now())
        HandlerPace.objects.update(runnable_at=timezone.now())
        Portal.objects.filter(pk=installed_portal.pk).update(rate_limit=50, rate_burst=50)
        bucket = governor.governor()
        key = governor.bucket_key(b24.member_id)
        if isinstance(bucket, governor.RedisGovernor):
            bucket.client.delete(key)
        else:
            bucket._tat.pop(key, None)
        assert run_events() == ["handled", "handled"]
    written = [c for c in b24.calls if c[1] == "crm.timeline.comment.add"]
    assert len(written) == 2  # the first event ran twice from its start and wrote once; the second once
    assert set(AppEvent.objects.values_list("state", flat=True)) == {EventState.HANDLED}


# --- fair dispatch -----------------------------------------------------------------------------------------


def test_another_portals_first_event_goes_before_a_flooding_portals_next(
    backend: Any, installed_portal: Any, b24: FakePortal, standin: Any, settings: Any
) -> None:
    """Workers take due events round robin across portals, at most BITRIX24_HANDLERS_PER_PORTAL of one
    portal at once: a portal with 30 events waiting does not delay another's first, queued after them."""
    from tests.factories import PortalFactory

    settings.BITRIX24_HANDLERS_PER_PORTAL = 2
    noisy, victim = installed_portal, PortalFactory.for_standin(other := standin.add_portal())
    with registry.replaced(lambda: registry.on("ONCRMDEALADD")(lambda event: None)):
        for n in range(30):
            posted = backend.post("/events/", data=event_body(b24, "ONCRMDEALADD", str(n), ts=1000 + n))
            assert posted.status_code == 200
        assert (
            backend.post("/events/", data=event_body(other, "ONCRMDEALADD", "1", ts=5000)).status_code == 200
        )
    assert AppEvent.objects.filter(state=EventState.QUEUED).count() == 31

    first = services.claim_next()  # both idle: the oldest due event, the noisy portal's
    assert first is not None and first.portal_id == noisy.pk
    second = services.claim_next()  # the portal with fewer running goes first: the victim's, queued last
    assert second is not None and second.portal_id == victim.pk
    third = services.claim_next()
    assert third is not None and third.portal_id == noisy.pk
    assert (
        services.claim_next() is None
    )  # the noisy portal has 2 running (its cap), the victim nothing waiting
    AppEvent.objects.filter(pk=first.pk).update(state=EventState.HANDLED)  # one of its handlers finished
    fourth = services.claim_next()
    assert fourth is not None and fourth.portal_id == noisy.pk
