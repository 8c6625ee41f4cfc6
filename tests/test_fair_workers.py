"""No tenant degrades another, with real worker processes: a portal flooding its handlers does not delay
another portal's first event, and a renewal a web request waits for is done while the app's queue and the
custody queue are both full (config/routing.py, events.services.claim_next)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from django.utils import timezone
from rest_framework.authtoken.models import Token

from config.celery import app as celery_app
from events.models import AppEvent, EventSource, EventState
from events.tasks import handle_event_task
from portals.models import Portal, RenewalLog, RenewalOutcome, RenewalTrigger, TokenPair
from portals.tasks import queue_renewals
from standin import StandIn
from tests.eventapp import bitrix24 as eventapp
from tests.factories import PortalFactory, UserFactory
from tests.processes import celery_worker
from tests.test_events import event_body

pytestmark = pytest.mark.system


@pytest.fixture
def workers(
    standin: StandIn, child_env: Callable[[StandIn], dict[str, str]], handlers: Path
) -> Iterator[Callable[..., Any]]:
    """Start Celery workers serving the given kinds of queue, with the test app's handlers."""
    celery_app.control.purge()  # messages earlier tests queued and no worker took
    with ExitStack() as stack:

        def start(*kinds: str, concurrency: int = 1) -> Any:
            env = {**child_env(standin), "B24_TEST_EVENTAPP_DIR": str(handlers)}
            return stack.enter_context(celery_worker(env, concurrency=concurrency, queues=kinds))

        yield start
    celery_app.control.purge()


def _flood(portal: Portal, count: int) -> None:
    """`count` events of the portal stored and their tasks queued, as /events/ leaves them."""
    now = timezone.now()
    AppEvent.objects.bulk_create(
        AppEvent(
            portal=portal,
            event="ONCRMDEALADD",
            source=EventSource.ONLINE,
            dedup_key=f"flood|{n}",
            object_id="1",
            ids={"FIELDS.ID": "1"},
            received_at=now,
            next_attempt_at=now + timezone.timedelta(minutes=10),
        )
        for n in range(count)
    )
    for pk in AppEvent.objects.filter(portal=portal).values_list("pk", flat=True):
        handle_event_task.apply_async(args=(pk,))


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_portals_first_event_is_handled_within_seconds_beside_a_flooding_portal(
    backend: Any, standin: StandIn, workers: Any, handlers: Path
) -> None:
    """300 events of one portal wait, each handler a REST call against a portal limited to 2 calls a second
    (10 minutes of work for that portal); another portal's event, posted after them, is handled at once.
    Before fair dispatch it waited behind all of them (49 s for 150 on PostgreSQL and Redis)."""
    noisy_fake, victim_fake = standin.add_portal(), standin.add_portal()
    for fake in (noisy_fake, victim_fake):
        fake.seed("crm.deal", 1)
    noisy = PortalFactory.for_standin(noisy_fake, rate_limit=2, rate_burst=5)
    PortalFactory.for_standin(victim_fake)
    workers("app", concurrency=2)
    _flood(noisy, 300)
    _wait(lambda: eventapp.handled(), 60, "the worker to start on the flood")

    posted = backend.post("/events/", data=event_body(victim_fake, "ONCRMDEALADD", "1", ts=int(time.time())))
    assert posted.status_code == 200
    waited = _wait(
        lambda: any(h["pid"] and h["id"] == "1" and h.get("title") for h in eventapp.handled())
        and AppEvent.objects.filter(
            portal__member_id=victim_fake.member_id, state=EventState.HANDLED
        ).exists(),
        20,
        "the other portal's event",
    )
    still = AppEvent.objects.filter(portal=noisy, state__in=(EventState.QUEUED, EventState.RUNNING)).count()
    print(
        f"the other portal's event handled {waited:.2f} s after it was posted; {still} flood events waiting"
    )
    assert still > 200  # the flood was still there: the event did not simply come after it
    # The flooding portal keeps to its limit: no call of its handlers was refused by Bitrix24.
    assert not [call for call in noisy_fake.calls if call[-1] == "QUERY_LIMIT_EXCEEDED"]


def test_a_renewal_a_request_waits_for_is_done_while_both_queues_are_full(
    backend: Any,
    standin: StandIn,
    installed_portal: Portal,
    workers: Any,
    handlers: Path,
) -> None:
    """One custody worker and one app worker, each of concurrency 1 (a custody task that waited on its own
    queue would deadlock here): the app's queue holds a minute of slow handlers, the custody queue 60 staff
    renewals of 0.2 s each. A staff call needing the portal's expired access token renewed answers 200,
    ahead of the 60 (the renewal goes to `custody.now`, which the worker takes first)."""
    (handlers / "sleep").write_text("1")
    noisy_fake = standin.add_portal()
    noisy_fake.seed("crm.deal", 1)
    noisy = PortalFactory.for_standin(noisy_fake)
    others = [PortalFactory.for_standin(standin.add_portal()) for _ in range(60)]
    standin.oauth_latency = 0.2
    workers("custody.now", "custody", concurrency=1)
    workers("app", concurrency=1)
    _flood(noisy, 60)
    queue_renewals(
        TokenPair.objects.filter(portal__in=others).values_list("pk", flat=True),
        trigger=RenewalTrigger.STAFF,
        force=True,
    )
    _wait(lambda: RenewalLog.objects.filter(trigger=RenewalTrigger.STAFF).exists(), 60, "the first renewal")

    TokenPair.objects.filter(portal=installed_portal).update(access_expires_at=timezone.now())
    token = Token.objects.create(user=UserFactory(staff=True, superuser=True)).key
    started = time.monotonic()
    answer = requests.post(
        f"{backend.url}/api/portals/{installed_portal.member_id}/call/",
        json={"method": "profile"},
        headers={"Authorization": f"Token {token}"},
        timeout=60,
    )
    took = time.monotonic() - started
    staff_done = RenewalLog.objects.filter(
        trigger=RenewalTrigger.STAFF, outcome=RenewalOutcome.RENEWED
    ).count()
    handled = AppEvent.objects.filter(portal=noisy, state=EventState.HANDLED).count()
    print(
        f"answered {answer.status_code} in {took:.2f} s; {staff_done} of 60 staff renewals and {handled} of 60 handlers done"
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["result"]["ID"]
    assert staff_done < 50 and handled < 50  # both queues were still full when it was answered
    assert RenewalLog.objects.filter(
        pair__portal=installed_portal, trigger=RenewalTrigger.ON_DEMAND, outcome=RenewalOutcome.RENEWED
    ).exists()
