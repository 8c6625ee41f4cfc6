"""Celery tasks of the install app: thin wrappers, the work is in install.retention and install.deferred."""

from __future__ import annotations

import time

from celery import shared_task

from . import deferred, handlers, retention

# One run of the deferred drain stops starting new work after this long: the next beat tick goes on.
DRAIN_BUDGET = 200.0


@shared_task(acks_late=True, soft_time_limit=240, time_limit=300)
def purge_inbound_log() -> int:
    """Beat: delete inbound requests older than INBOUND_LOG_RETENTION_DAYS, in batches."""
    return retention.purge_expired()


@shared_task(acks_late=True, soft_time_limit=240, time_limit=300)
def apply_deferred_task() -> int:
    """Beat, every minute (and 30 s after one is kept): move the spool into the database, refresh the
    application-token mirror, then handle deferred events until none is due or the budget is spent."""
    started = time.monotonic()
    deferred.sync_mirror()
    settled = 0
    while time.monotonic() - started < DRAIN_BUDGET:
        moved = deferred.drain_spool()
        done = deferred.apply_due(replay=handlers.replay_event)
        settled += done
        if not moved and not done:
            break
    return settled
