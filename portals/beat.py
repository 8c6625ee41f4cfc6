"""Beat's scheduler: django-celery-beat's (the schedule in the database, editable in the admin), sending only
while this process holds the database lease (`SchedulerLease`).

Exactly one beat must send the scheduled tasks; two would send each of them twice. A second beat started by
mistake (a second compose service, a unit enabled on two machines) is harmless here: it renews nothing,
sends nothing, and checks every few seconds whether the lease ran out; once it did (its holder was killed,
its machine vanished), it takes over within the lease and one tick. The lease is a conditional UPDATE, the
same on PostgreSQL and SQLite, so it holds across machines that share the database.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django_celery_beat.schedulers import DatabaseScheduler

from . import journal
from .models import SchedulerLease

logger = logging.getLogger(__name__)

NAME = "beat"


def lease_seconds() -> float:
    return float(settings.BITRIX24_BEAT_LEASE_SECONDS)


def take_or_renew(holder: str, *, now: Any = None) -> bool:
    """True when `holder` holds the lease now (renewed, or taken from a holder whose lease ran out)."""
    now = now or timezone.now()
    until = now + timedelta(seconds=lease_seconds())
    with transaction.atomic():
        if (
            SchedulerLease.objects.filter(name=NAME)
            .filter(Q(holder=holder) | Q(until__lt=now))
            .update(holder=holder, until=until)
        ):
            return True
        try:
            with transaction.atomic():
                SchedulerLease.objects.create(name=NAME, holder=holder, until=until)
        except IntegrityError:
            return False  # somebody else holds it
    return True


class LeaderScheduler(DatabaseScheduler):
    """DatabaseScheduler that sends only while it holds the lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        holder = journal.current_holder()
        self._holder = f"{holder.host}|{holder.pid}|{holder.start}"
        self._leading = False
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            leading = take_or_renew(self._holder)
        except Exception as exc:  # the database is away: whoever held the lease may still hold it
            logger.warning("Beat: cannot reach the lease (%s); not sending", type(exc).__name__)
            leading = False
        if leading != self._leading:
            self._leading = leading
            logger.info(
                "Beat: %s", "holding the lease, sending" if leading else "another beat holds the lease"
            )
        if not leading:
            # Ask again well within the lease: a holder that died is replaced within it and one tick.
            return min(5.0, lease_seconds() / 3)
        return float(super().tick(*args, **kwargs))
