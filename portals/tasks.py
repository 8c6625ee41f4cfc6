"""Celery tasks: thin, idempotent, each one service call."""

from __future__ import annotations

import logging

from celery import shared_task

from . import bindings, oauth, renewal
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


@shared_task(acks_late=True, soft_time_limit=240, time_limit=300)
def sweep_due_pairs() -> int:
    """Beat: queue a renewal for every pair whose refresh token nears the end of its life."""
    count = renewal.schedule_due_renewals()
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
