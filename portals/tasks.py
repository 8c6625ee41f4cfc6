"""Celery tasks, and the functions that queue them: thin, idempotent, each one service call.

Tasks sit above the services they call: nothing below this module imports it. Whoever wants work
done in the background (the beat sweep, staff operations, the install views) calls one of the
`queue_*` functions here, which publish once the surrounding transaction commits.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from celery import shared_task
from django.conf import settings
from django.db import transaction

from . import bindings, oauth, renewal, selectors
from .models import Portal, PortalState, RenewalTrigger, TokenPair

logger = logging.getLogger(__name__)


class TransientRenewalError(Exception):
    """Raised to make Celery retry with backoff."""


@shared_task(
    bind=True,
    autoretry_for=(TransientRenewalError,),
    retry_backoff=30,
    retry_backoff_max=3600,
    retry_jitter=True,
    max_retries=8,
    acks_late=True,
    # Never interrupt a refresh in flight: a rollback after the server rotated the pair loses it.
    soft_time_limit=int(oauth.worst_case_seconds()) + 60,
    time_limit=int(oauth.worst_case_seconds()) + 90,
)
def renew_pair_task(self, pair_id: int, trigger: str = RenewalTrigger.BEAT, force: bool = False) -> str:  # type: ignore[no-untyped-def]
    """Renew one pair if it still needs it. Safe to run twice: the lock and the re-check make it so."""
    try:
        renewal.renew_pair(pair_id, trigger=trigger, force=force)
    except TokenPair.DoesNotExist:
        return "gone"
    except renewal.RenewalFailed as exc:
        if exc.transient:
            raise TransientRenewalError(str(exc)) from exc
        return f"refused: {exc.code}"
    return "done"


def queue_renewals(pair_ids: Iterable[int], *, trigger: str, force: bool = False, spread: float = 0) -> int:
    """Queue one renewal task per pair once the transaction commits, each delayed by a random
    0–`spread` seconds so that thousands of portals do not reach the OAuth server in one second.
    Returns how many were queued."""
    ids = list(pair_ids)
    spread = max(spread, 0)

    def send() -> None:
        for pair_id in ids:
            renew_pair_task.apply_async(
                args=(pair_id, trigger, force), countdown=random.uniform(0, spread) if spread else 0
            )

    if ids:
        transaction.on_commit(send)
    return len(ids)


def queue_due_renewals() -> int:
    """The sweep's fan-out: every due pair, spread over BITRIX24_RENEW_SPREAD_SECONDS."""
    return queue_renewals(
        selectors.due_pairs().values_list("pk", flat=True),
        trigger=RenewalTrigger.BEAT,
        spread=settings.BITRIX24_RENEW_SPREAD_SECONDS,
    )


@shared_task(acks_late=True, soft_time_limit=240, time_limit=300)
def sweep_due_pairs() -> int:
    """Beat: queue a renewal for every pair whose refresh token nears the end of its life."""
    count = queue_due_renewals()
    logger.info("Renewal sweep queued %d pair(s)", count)
    return count


@shared_task(
    autoretry_for=(Exception,),
    dont_autoretry_for=(Portal.DoesNotExist,),
    retry_backoff=30,
    retry_backoff_max=1800,
    retry_jitter=True,
    max_retries=6,
    acks_late=True,
    soft_time_limit=90,
    time_limit=120,
)
def bind_events_task(portal_id: int) -> list[str]:
    """After install or update: bind ONAPPUNINSTALL and BITRIX24_EVENTS (idempotent)."""
    portal = Portal.objects.get(pk=portal_id, state=PortalState.INSTALLED)
    return bindings.bind_events(portal=portal)


def queue_bindings(*, portal: Portal) -> bool:
    """After a trusted install or update: bind the events again once the transaction commits
    (Bitrix24 drops bindings on update). Nothing to do without BITRIX24_PUBLIC_URL."""
    if not bindings.handler_url():
        return False
    portal_id = portal.pk
    transaction.on_commit(lambda: bind_events_task.delay(portal_id))
    return True
