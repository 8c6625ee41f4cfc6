"""How long the inbound log keeps its rows (INBOUND_LOG_RETENTION_DAYS), enforced by a beat task.

Deleting in batches of primary keys keeps each statement (and, on SQLite, the database's write lock)
short, so inbound requests keep being logged while months of rows go.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from .models import InboundRequest

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000


def purge_expired(*, days: int | None = None, batch_size: int = BATCH_SIZE, max_batches: int = 1000) -> int:
    """Delete inbound rows older than `days` (default: the setting), `batch_size` at a time; returns
    how many went. At most `max_batches` batches a run: a huge backlog is finished by the next runs
    rather than by one task that outlives its time limit."""
    days = settings.INBOUND_LOG_RETENTION_DAYS if days is None else days
    if days <= 0:
        return 0  # 0 keeps every row (for who must keep them; docs/settings.md says so)
    cutoff = timezone.now() - timedelta(days=days)
    deleted = 0
    for _ in range(max_batches):
        batch = list(
            InboundRequest.objects.filter(created_at__lt=cutoff)
            .order_by("pk")
            .values_list("pk", flat=True)[:batch_size]
        )
        if not batch:
            break
        count, _by_model = InboundRequest.objects.filter(pk__in=batch).delete()
        deleted += count
    if deleted:
        logger.info("Deleted %d inbound request(s) older than %d days", deleted, days)
    return deleted
