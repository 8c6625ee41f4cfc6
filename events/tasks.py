"""Tasks that run the app's event handlers and pull offline queues, and the functions that queue them.

Every piece of work here is a row first (an `AppEvent`, an `OfflineQueue.wanted_at`); a task is only
the fast path. The beat sweep (`sweep_events`, every minute) queues whatever is due and has no task:
a retry whose time came, an event whose message was lost, a worker that died mid-handler.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from portals import registry
from portals.models import Portal, PortalState
from portals.tasks import publish

from . import offline, services
from .models import OfflineQueue

logger = logging.getLogger(__name__)

# A retry this soon is queued with a countdown as well; later ones are left to the sweep alone (a
# countdown message is held by the worker until it is due, and thousands would cost memory).
COUNTDOWN_MAX = timedelta(minutes=5)
# ONOFFLINEEVENT may come often; one pull task per portal in this window is enough (the pull takes
# everything the queue holds at the time).
PULL_DEBOUNCE = timedelta(seconds=10)
# How many portals one sweep asks to pull (periodic pulls of portals with offline handlers).
PULLS_PER_SWEEP = 500


def _publish_events(ids: list[int]) -> None:
    for event_id in ids:
        publish(handle_event_task, event_id)


def accept_event(*, portal: Portal, event: str, data: Any, ts: Any, auth: Mapping[str, Any]) -> str:
    """An admitted event posted to /events/: stored, its handlers queued after commit. Returns the
    outcome ("queued", "duplicate", "ignored"); raises services.TooManyEvents over the portal's budget."""
    accepted = services.accept_online(portal=portal, event=event, data=data, ts=ts, auth=auth)
    if accepted.outcome == "queued" and accepted.record is not None:
        event_id = accepted.record.pk
        transaction.on_commit(lambda: _publish_events([event_id]))
    return accepted.outcome


@shared_task(
    acks_late=True,
    soft_time_limit=settings.BITRIX24_EVENT_HANDLER_SECONDS,
    time_limit=settings.BITRIX24_EVENT_HANDLER_SECONDS + 30,
)
def handle_event_task(event_id: int) -> str:
    """Run the due event that is fairest to take (services.claim_next), often the one this task was queued
    for (`event_id` is only that hint): another portal's first event goes before a flooding portal's next.
    A portal at its limit of running handlers gets its next task from the one that finishes."""
    taken = services.handle_next()
    if taken is None:
        return "nothing to do"
    ran, outcome = taken
    if outcome.retry_in is not None and outcome.retry_in <= COUNTDOWN_MAX:
        publish(handle_event_task, ran.pk, countdown=outcome.retry_in.total_seconds())
    if services.has_runnable(portal_id=ran.portal_id):
        # Its portal has more waiting: keep one task going for it (tasks a capped portal's events were
        # queued with may have found it at its limit and ended).
        publish(handle_event_task, ran.pk)
    return outcome.state + (f": {outcome.error}" if outcome.error else "")


def run_again(event_ids: list[int]) -> int:
    """Staff's "run again": failed or dropped events start over; returns how many."""
    ids = services.run_again(event_ids=event_ids)
    transaction.on_commit(lambda: _publish_events(ids))
    return len(ids)


# --- offline queues ----------------------------------------------------------------------------------


def queue_pull(*, portal: Portal) -> bool:
    """ONOFFLINEEVENT (or staff): the portal's offline queue has records. Recorded first; a task pulls
    them (at most one queued per PULL_DEBOUNCE). True when a task was queued."""
    now = timezone.now()
    queue, _ = OfflineQueue.objects.get_or_create(portal=portal)
    OfflineQueue.objects.filter(pk=queue.pk, wanted_at__isnull=True).update(wanted_at=now)
    fresh = OfflineQueue.objects.filter(pk=queue.pk).filter(
        Q(queued_at__isnull=True) | Q(queued_at__lt=now - PULL_DEBOUNCE)
    )
    if not fresh.update(queued_at=now):
        return False
    portal_id = portal.pk
    transaction.on_commit(lambda: publish(pull_offline_task, portal_id))
    return True


@shared_task(acks_late=True, soft_time_limit=240, time_limit=270)
def pull_offline_task(portal_id: int) -> str:
    portal = Portal.objects.filter(pk=portal_id).exclude(state=PortalState.UNINSTALLED).first()
    if portal is None:
        return "nothing to do"
    result = offline.pull(portal=portal, on_stored=_publish_events)
    if result.busy:
        return "busy: another pull of this portal is running"
    return (
        f"stored {result.stored} (recovered {result.recovered}), duplicates {result.duplicates}, "
        f"ignored {result.ignored}, errors {result.errors}" + (", more to pull" if result.more else "")
    )


def queue_due_pulls(now: Any = None, limit: int = PULLS_PER_SWEEP) -> int:
    """Portals whose queue was notified and not pulled since, or (when any handler is offline) not
    pulled for BITRIX24_OFFLINE_PULL_SECONDS: a notification may have been lost while we were down."""
    now = now or timezone.now()
    # A pull whose lease is held is queued all the same: the task gives up at once while its holder
    # lives, and takes over when the holder is proven dead (events.offline).
    wanted = Q(offline_queue__wanted_at__isnull=False)
    if registry.events(offline=True):
        stale = now - timedelta(seconds=settings.BITRIX24_OFFLINE_PULL_SECONDS)
        wanted |= Q(offline_queue__isnull=True) | Q(offline_queue__pulled_at__isnull=True)
        wanted |= Q(offline_queue__pulled_at__lt=stale)
    debounced = Q(offline_queue__queued_at__isnull=True) | Q(offline_queue__queued_at__lt=now - PULL_DEBOUNCE)
    ids = list(
        Portal.objects.filter(state=PortalState.INSTALLED)
        .filter(wanted, debounced)
        .order_by("pk")
        .values_list("pk", flat=True)[:limit]
    )
    for portal_id in ids:
        queue, _ = OfflineQueue.objects.get_or_create(portal_id=portal_id)
        OfflineQueue.objects.filter(pk=queue.pk).update(queued_at=now)
        publish(pull_offline_task, portal_id)
    return len(ids)


# --- the sweep ---------------------------------------------------------------------------------------


@shared_task(acks_late=True, soft_time_limit=50, time_limit=60)
def sweep_events() -> str:
    """Beat, every minute: queue due events and due pulls; delete events past their retention."""
    due = services.due()
    _publish_events(due)
    pulls = queue_due_pulls()
    purged = services.purge_expired(max_batches=10)
    if due or pulls or purged:
        logger.info(
            "Event sweep queued %d event(s), %d pull(s); deleted %d old event(s)", len(due), pulls, purged
        )
    return f"{len(due)} event(s), {pulls} pull(s), {purged} deleted"
