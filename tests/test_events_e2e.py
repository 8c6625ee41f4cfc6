"""The app's events end to end, over real sockets, with real Celery worker processes.

The stand-in portal fires events as Bitrix24 does: a REST write (`crm.deal.add`, `crm.contact.update`)
posts the online event to the bound handler from its own queue thread, or keeps an offline record. The
handlers are the test app's (tests/eventapp/bitrix24.py); they report to a folder this test reads.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.core.management import call_command
from django.utils.translation import gettext_lazy

from config.celery import app as celery_app
from events.models import AppEvent, EventState, OfflineQueue
from events.tasks import sweep_events
from example import bitrix24 as example
from portals import bindings, registry
from standin import FakePortal, StandIn
from tests.eventapp import bitrix24 as eventapp
from tests.factories import PortalFactory
from tests.processes import celery_worker

pytestmark = pytest.mark.system


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _beat_until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        sweep_events.apply_async()
        time.sleep(2)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rest(portal: FakePortal, method: str, params: dict[str, Any], user_id: int = 1) -> Any:
    """A call a user's browser or script makes to the portal (not the backend)."""
    token = portal.issue_tokens(user_id)["access_token"]
    answer = requests.post(portal.client_endpoint + method, json={**params, "auth": token}, timeout=10)
    answer.raise_for_status()
    return answer.json()["result"]


@pytest.fixture
def start_worker(
    standin: StandIn, child_env: Callable[[StandIn], dict[str, str]], handlers: Path, settings: Any
) -> Iterator[Callable[..., Any]]:
    """Start real Celery workers with the test app's handlers; each is killed at the end of the test."""
    celery_app.control.purge()  # messages earlier tests queued and no worker took
    stack: list[Any] = []

    def start(concurrency: int = 2) -> Any:
        env = {
            **child_env(standin),
            "B24_TEST_EVENTAPP_DIR": str(handlers),
            "BITRIX24_PUBLIC_URL": settings.BITRIX24_PUBLIC_URL,
            "BITRIX24_WANTED_GRACE_SECONDS": "0",
        }
        context = celery_worker(env, concurrency=concurrency)
        process = context.__enter__()
        stack.append(context)
        return process

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def test_an_event_is_answered_before_its_slow_handler_runs_in_a_worker(
    backend: Any,
    installed_portal: Any,
    b24: FakePortal,
    standin: StandIn,
    handlers: Path,
    start_worker: Any,
    settings: Any,
) -> None:
    settings.BITRIX24_PUBLIC_URL = backend.url.replace("localhost", "127.0.0.1")
    bindings.sync_bindings(portal=installed_portal)
    assert {"event": "ONCRMDEALADD", "handler": settings.BITRIX24_PUBLIC_URL + "/events/"}.items() <= next(
        binding for binding in b24.events if binding["event"] == "ONCRMDEALADD"
    ).items()
    (handlers / "sleep").write_text("5")
    start_worker(concurrency=1)

    added_at = time.time()
    deal_id = rest(b24, "crm.deal.add", {"fields": {"TITLE": "Forty chairs"}})
    assert standin.wait_deliveries(timeout=15)
    answered_at = time.time()
    delivery = next(d for d in b24.deliveries if d["event"] == "ONCRMDEALADD")
    assert delivery["status"] == 200 and delivery["error"] is None
    assert eventapp.handled() == []  # /events/ answered while the handler had not finished

    done = _wait(eventapp.handled, 60, "the deal handler")
    handled = done[0]
    print(
        f"crm.deal.add → event answered after {answered_at - added_at:.2f} s; handler ran "
        f"{handled['started'] - added_at:.2f} → {handled['finished'] - added_at:.2f} s (sleeping 5 s)"
    )
    assert answered_at < handled["finished"]
    assert handled["finished"] - handled["started"] >= 5
    assert (handled["id"], handled["title"]) == (str(deal_id), "Forty chairs")  # read through PortalClient
    assert handled["pid"] != os.getpid()  # in the worker, not in the web request
    _wait(
        lambda: AppEvent.objects.filter(state=EventState.HANDLED).count() == 1, 10, "the row to say handled"
    )


def _offline_setup(installed_portal: Any, b24: FakePortal, settings: Any) -> list[str]:
    """Bindings synced with the backend's web down (nothing listens on its port), then 30 contacts
    changed, some twice: the portal keeps one record per contact and its ONOFFLINEEVENT notice fails."""
    settings.BITRIX24_PUBLIC_URL = f"http://127.0.0.1:{_free_port()}"
    result = bindings.sync_bindings(portal=installed_portal)
    assert {str(b) for b in result.bound} >= {"ONCRMCONTACTUPDATE (offline)"}
    b24.seed("crm.contact", 30)
    ids = [str(number) for number in range(1, 31)]
    for contact in ids + ids[:5]:
        rest(b24, "crm.contact.update", {"id": contact, "fields": {"NAME": f"Changed {contact}"}})
    assert sorted(int(r["EVENT_DATA"]["FIELDS"]["ID"]) for r in b24.offline_queue()) == list(range(1, 31))
    return ids


def _handled_once(ids: list[str]) -> None:
    handled = eventapp.handled()
    assert sorted(h["id"] for h in handled) == sorted(ids), "every change handled exactly once"
    assert all(h["offline"] for h in handled)


def test_changes_made_while_the_backend_was_down_are_handled_once_when_it_starts(
    backend: Any,
    installed_portal: Any,
    b24: FakePortal,
    standin: StandIn,
    handlers: Path,
    start_worker: Any,
    settings: Any,
) -> None:
    ids = _offline_setup(installed_portal, b24, settings)
    standin.wait_deliveries(timeout=10)
    assert all(
        d["status"] is None for d in b24.deliveries if d["event"] == "ONOFFLINEEVENT"
    )  # nobody listened

    start_worker()
    sweep_events.apply_async()  # the first beat after the start: the portal was never pulled
    _wait(lambda: len(eventapp.handled()) >= 30, 60, "30 contact handlers")
    time.sleep(1)  # anything handled twice would show now
    _handled_once(ids)
    assert b24.offline_queue() == []  # cleared from the portal's queue
    queue = OfflineQueue.objects.get(portal=installed_portal)
    assert (queue.process_id, queue.fetching_since, queue.pulled) == ("", None, 30)


@pytest.mark.parametrize(
    "moment",
    [
        # The portal reserved the batch and the answer is on its way: the process id was never stored.
        "before the batch was stored",
        # The batch is stored and its clear sent: the portal may or may not have cleared it.
        "while the batch was cleared",
    ],
)
def test_a_pull_killed_mid_batch_loses_nothing_and_handles_nothing_twice(
    backend: Any,
    installed_portal: Any,
    b24: FakePortal,
    standin: StandIn,
    handlers: Path,
    start_worker: Any,
    settings: Any,
    moment: str,
) -> None:
    ids = _offline_setup(installed_portal, b24, settings)
    if moment == "before the batch was stored":
        b24.answer_delays["event.offline.get"] = 20
        slow = "event.offline.get"
    else:
        b24.method_delays["event.offline.clear"] = 20
        slow = "event.offline.clear"
    first = start_worker(concurrency=1)
    sweep_events.apply_async()
    _wait(lambda: any(call[1] == slow for call in b24.calls), 30, f"the pull to call {slow}")
    _wait(lambda: all(r["PROCESS_ID"] for r in b24.offline_queue()), 10, "the batch to be reserved")
    stored = AppEvent.objects.count()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    print(
        f"killed {moment}: {stored} event(s) stored, {len(eventapp.handled())} handled, 30 records reserved"
    )
    assert stored == (0 if moment == "before the batch was stored" else 30)

    b24.answer_delays.clear()
    b24.method_delays.clear()
    start_worker()
    # Beat, as often as the test can afford: the dead pull's lease is freed, its batch recovered (a pull
    # queued less than PULL_DEBOUNCE ago is not queued again, so the first beats may pass it by).
    _beat_until(lambda: b24.offline_queue() == [], 60, "the reserved batch to be cleared")
    _wait(lambda: len(eventapp.handled()) >= 30, 60, "30 contact handlers")
    _wait(
        lambda: OfflineQueue.objects.filter(portal=installed_portal, lease_until=None).exists(),
        30,
        "the pull's end",
    )
    time.sleep(1)  # anything handled twice would show now
    _handled_once(ids)
    assert AppEvent.objects.count() == 30
    queue = OfflineQueue.objects.get(portal=installed_portal)
    assert (queue.process_id, queue.fetching_since, queue.pulled) == ("", None, 30)


# --- bindings sync ----------------------------------------------------------------------------------


def _bound(fake: FakePortal) -> set[tuple[str, int, str]]:
    return {(b["event"], b["offline"], b["handler"]) for b in fake.events}


def _placed(fake: FakePortal) -> set[tuple[str, str, str]]:
    return {
        (p["placement"], p["handler"], p["lang_all"].get("ru", {}).get("TITLE", "")) for p in fake.placements
    }


def test_sync_binds_200_portals_within_their_rate_limits_and_unbinds_what_is_no_longer_wanted(
    transactional_db: None, standin: StandIn, handlers: Path, settings: Any
) -> None:
    settings.BITRIX24_PUBLIC_URL = "http://127.0.0.1:9"
    fakes = [standin.add_portal(rate=2, burst=4) for _ in range(200)]
    for fake in fakes:
        PortalFactory.for_standin(fake, rate_limit=2, rate_burst=4)
    handler = "http://127.0.0.1:9/events/"
    wanted = {
        ("ONAPPUNINSTALL", 0, handler),
        ("ONCRMCOMPANYADD", 0, handler),
        ("ONCRMDEALADD", 0, handler),
        ("ONOFFLINEEVENT", 0, handler),
        ("ONCRMCONTACTUPDATE", 1, ""),
    }
    # The example's deal tab, its title bound in every language the app speaks (LANG_ALL).
    tab = {("CRM_DEAL_DETAIL_TAB", "http://127.0.0.1:9/app/", "Заметки по сделке")}

    def with_tab() -> None:
        eventapp.register()
        registry.placement("CRM_DEAL_DETAIL_TAB", title=gettext_lazy("Deal notes"))(example.deal_tab)

    with registry.replaced(with_tab):
        started = time.monotonic()
        output = _sync()
    print(output.splitlines()[-1], f"({time.monotonic() - started:.1f} s)")
    assert sum(line.startswith("[") for line in output.splitlines()) == 200  # progress, one line per portal
    assert all(_bound(fake) == wanted for fake in fakes)  # event.get
    assert all(_placed(fake) == tab for fake in fakes)  # placement.get
    assert sum(fake.bucket_stats["rejected"] for fake in fakes) == 0  # no QUERY_LIMIT_EXCEEDED
    assert "0 failed" in output

    # A release drops the company handler and the tab: a dry run says so and changes nothing; the sync
    # unbinds them.
    def fewer() -> None:
        registry.on("ONCRMDEALADD")(eventapp.deal_added)
        registry.on("ONCRMCONTACTUPDATE", offline=True)(eventapp.contact_updated)

    with registry.replaced(fewer):
        dry = _sync("--dry-run")
        assert "200 changed" in dry and "400 would be unbound" in dry
        assert all(("ONCRMCOMPANYADD", 0, handler) in _bound(fake) and _placed(fake) == tab for fake in fakes)
        _sync()
        assert all(_bound(fake) == wanted - {("ONCRMCOMPANYADD", 0, handler)} for fake in fakes)
        assert all(_placed(fake) == set() for fake in fakes)
        assert sum(fake.bucket_stats["rejected"] for fake in fakes) == 0


def _sync(*args: str) -> str:
    from io import StringIO

    out = StringIO()
    call_command("bitrix24_sync", "--workers", "16", *args, stdout=out)
    return out.getvalue()
