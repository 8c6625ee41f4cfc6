"""Celery tasks of the install app: thin wrappers, the work is in install.retention."""

from __future__ import annotations

from celery import shared_task

from . import deferred, handlers, retention


@shared_task(acks_late=True, soft_time_limit=240, time_limit=300)
def purge_inbound_log() -> int:
    """Beat: delete inbound requests older than INBOUND_LOG_RETENTION_DAYS, in batches."""
    return retention.purge_expired()


@shared_task(acks_late=True, soft_time_limit=240, time_limit=300)
def apply_deferred_task() -> int:
    """Beat, every minute (and 30 s after one is kept): verify and apply deferred install and update events."""
    return deferred.apply_due(replay=handlers.replay_lifecycle)
