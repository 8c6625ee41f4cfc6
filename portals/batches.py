"""Handed-out renewal work with a record: batches of pairs, each with a short lease (`RenewalBatch`).

The sweep hands due pairs to worker tasks in batches. Before this record, the broker's message was the only
trace of a handed-out batch, and each pair was held for an hour: a message lost with Redis, or a batch cut
short by a database restart, left its pairs untouched for that hour with nothing said. Now:

- `hand_out` marks each pair with its batch and holds it until the batch's lease ends
  (BITRIX24_RENEW_BATCH_LEASE_SECONDS while queued);
- `start` (the worker) extends the lease to the task's time limit, or finds the batch released already and
  does nothing (a message delivered again, or one that waited past its lease);
- each pair renewed or failed is unmarked (`portals.renewal.renew_batch`);
- `hand_back` queues what a stopped task did not start as a new batch, or releases it with its cause;
- `release_expired` (the beat tick, every minute) releases every batch whose lease ended unfinished, logs
  why, and hands its pairs out again at once.

A pair is therefore never held past its batch's lease plus a minute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from . import clock, metrics, stopping
from .models import RenewalBatch, TokenPair

logger = logging.getLogger(__name__)

Publish = Callable[[list[int], str, int], bool]

# Why a batch's pairs went back to the sweep (the label of bitrix24_renewal_batches_released_total).
NOT_STARTED = (
    "not_started"  # the lease ended before a worker took it: its message was lost, or the queue is long
)
INTERRUPTED = "interrupted"  # the lease ended while a worker had it: the worker was killed
DATABASE = "database"  # the worker could not reach the database, even after retrying
NOT_QUEUED = "not_queued"  # the rest of a stopped batch could not be queued again

CAUSES = {
    NOT_STARTED: "its lease ended before a worker took it (its message was lost, or the queue is that long)",
    INTERRUPTED: "its lease ended while a worker had it (the worker was killed or hung)",
    DATABASE: "the database was unavailable to its worker, even after retrying",
    NOT_QUEUED: "the rest of the stopped batch could not be queued again (broker unavailable)",
}


def queued_lease() -> timedelta:
    return timedelta(seconds=settings.BITRIX24_RENEW_BATCH_LEASE_SECONDS)


def hand_out(chunks: Sequence[Sequence[int]], *, trigger: str, publish: Publish) -> int:
    """Record a batch for each chunk of pair ids, mark and hold its pairs, and publish its task after the
    commit. Returns how many pairs were handed out."""
    now = timezone.now()
    lease = now + queued_lease()
    handed: list[tuple[list[int], int]] = []
    with transaction.atomic():
        for chunk in chunks:
            ids = list(chunk)
            if not ids:
                continue
            batch = RenewalBatch.objects.create(
                trigger=trigger, size=len(ids), lease_expires_at=lease, created_at=now
            )
            TokenPair.objects.filter(pk__in=ids).update(batch=batch, next_attempt_at=lease)
            handed.append((ids, batch.pk))

        def send() -> None:
            for ids, batch_id in handed:
                if not publish(ids, trigger, batch_id):
                    # The broker refused it: given back to the sweep now rather than held for the lease.
                    release(batch_id, NOT_QUEUED)

        transaction.on_commit(send)
    return sum(len(ids) for ids, _ in handed)


def start(batch_id: int, *, time_limit: float) -> bool:
    """A worker takes the batch: its lease becomes the task's time limit. False when the batch was released
    (or finished) already: its pairs are another batch's now, and nothing is renewed."""
    now = timezone.now()
    lease = now + timedelta(seconds=time_limit)
    with transaction.atomic():
        taken = RenewalBatch.objects.filter(pk=batch_id, finished_at__isnull=True).update(
            started_at=now, lease_expires_at=lease
        )
        if taken:
            TokenPair.objects.filter(batch_id=batch_id).update(next_attempt_at=lease)
    if not taken:
        logger.info("Renewal batch %s was released before a worker took it: nothing to do", batch_id)
    return bool(taken)


def adopt(pair_ids: Sequence[int], *, trigger: str, time_limit: float) -> int:
    """A batch task queued without a record (by an earlier release, or by hand): recorded as taken now."""
    now = timezone.now()
    lease = now + timedelta(seconds=time_limit)
    with transaction.atomic():
        batch = RenewalBatch.objects.create(
            trigger=trigger, size=len(pair_ids), created_at=now, started_at=now, lease_expires_at=lease
        )
        TokenPair.objects.filter(pk__in=list(pair_ids)).update(batch=batch, next_attempt_at=lease)
    return batch.pk


def unmark(batch_id: int, pair_id: int) -> None:
    """The pair is renewed (or failed with its own back-off): no longer the batch's to release."""
    TokenPair.objects.filter(pk=pair_id, batch_id=batch_id).update(batch=None)


def finish(batch_id: int) -> None:
    """Every pair of the batch was settled: a mark a lost connection left behind is taken off too."""
    with transaction.atomic():
        TokenPair.objects.filter(batch_id=batch_id).update(batch=None)
        RenewalBatch.objects.filter(pk=batch_id, finished_at__isnull=True).update(finished_at=timezone.now())


def _release(batch: RenewalBatch, cause: str, *, now: datetime) -> list[int]:
    """Give the batch's unrenewed pairs back to the sweep (due again now) and say why."""
    marked = TokenPair.objects.filter(batch=batch)
    if batch.started_at is not None:
        # Renewed by the batch, but its mark was not taken off (the database went away right after): not
        # released, only unmarked.
        marked.filter(last_renewed_at__gte=batch.started_at).update(batch=None)
    ids = list(marked.values_list("pk", flat=True))
    if not ids:  # every pair was settled; only the end was not recorded
        RenewalBatch.objects.filter(pk=batch.pk).update(finished_at=now)
        return []
    TokenPair.objects.filter(pk__in=ids, batch=batch).update(batch=None, next_attempt_at=None)
    RenewalBatch.objects.filter(pk=batch.pk).update(
        finished_at=now, released=len(ids), cause=CAUSES[cause][:300]
    )
    logger.warning("Renewal batch %s released %d pair(s) unrenewed: %s", batch.pk, len(ids), CAUSES[cause])
    metrics.batch_released(cause)
    return ids


# Waits between tries to record a release while the database is away, before leaving it to the tick.
RELEASE_RETRY_WAITS = (5.0, 10.0, 20.0, 30.0)


def release(batch_id: int, cause: str, *, waits: Sequence[float] = ()) -> None:
    """Release one batch now (its unrenewed pairs are due again), trying again after each of `waits` while
    the database refuses. Never raises: if it cannot, the pairs stay held until the lease ends, and the
    tick releases them then."""
    for attempt in range(len(waits) + 1):
        try:
            with transaction.atomic():
                batch = (
                    RenewalBatch.objects.select_for_update()
                    .filter(pk=batch_id, finished_at__isnull=True)
                    .first()
                )
                if batch is not None:
                    _release(batch, cause, now=timezone.now())
            return
        except DatabaseError as exc:
            connection.close_if_unusable_or_obsolete()
            if attempt == len(waits) or stopping.stop_requested():
                logger.error(
                    "Renewal batch %s: its pairs not renewed stay held until its lease ends (the beat tick "
                    "then releases them): the database is unavailable (%s)",
                    batch_id,
                    exc,
                )
                return
            clock.sleep(waits[attempt])


def hand_back(batch_id: int, left: Sequence[int], *, trigger: str, cause: str, publish: Publish) -> None:
    """What a stopped task did not start: queued again as a new batch (a polite stop, its time budget
    spent), or released with its cause (`DATABASE`). Never raises."""
    if cause != DATABASE:
        try:
            with transaction.atomic():
                TokenPair.objects.filter(pk__in=left, batch_id=batch_id).update(batch=None)
                finish(batch_id)
                hand_out([left], trigger=trigger, publish=publish)
            return
        except DatabaseError:
            logger.warning(
                "Renewal batch %s: the rest could not be handed out again", batch_id, exc_info=True
            )
    # The database is away (or refused the hand-out): the rest is released once it lets us say so.
    release(batch_id, cause or DATABASE, waits=RELEASE_RETRY_WAITS)


def release_expired(*, now: datetime | None = None) -> list[int]:
    """Beat: release every batch whose lease ended unfinished; returns the pairs released (due again)."""
    now = now or timezone.now()
    released: list[int] = []
    with transaction.atomic():
        expired = (
            RenewalBatch.objects.select_for_update(skip_locked=True)
            .filter(finished_at__isnull=True, lease_expires_at__lte=now)
            .order_by("lease_expires_at")[:500]
        )
        for batch in expired:
            released += _release(batch, INTERRUPTED if batch.started_at else NOT_STARTED, now=now)
    return released
