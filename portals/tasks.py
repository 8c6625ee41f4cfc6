"""Celery tasks, and the functions that queue them: thin, idempotent, each one service call.

Tasks sit above the services they call: nothing below this module imports it (the renewal service
is handed `queue_on_demand_renewal` at start-up, see `portals.apps`). Work that must happen (event
bindings, staff renewals) is first recorded as a `WantedAction`; the task carries it out, and the
beat sweep queues again whatever a lost task or an outage left undone. Publishing never fails the
caller: a request that has committed its work answers as such even when the broker is away.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from celery import shared_task
from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from . import batches, bindings, clock, renewal, selectors, services, sources
from .models import (
    Portal,
    PortalState,
    RenewalTrigger,
    TokenPair,
    WantedAction,
    WantedKind,
)

logger = logging.getLogger(__name__)

# Time limits of the tasks that may renew: one renewal (every OAuth retry, then storing with every
# database retry) fits in a lease; a task that may first wait for another process's renewal gets two.
# A hard limit is a SIGKILL: it must never fall inside a refresh, so it is set past the lease.
RENEW_TIME_LIMIT = int(renewal.lease_seconds()) + 120
ACTION_TIME_LIMIT = 2 * int(renewal.lease_seconds()) + 120
# While a queued action's task may still be running, the sweep leaves the action alone this long.
PENDING_GRACE = timedelta(seconds=ACTION_TIME_LIMIT + 60)


class TransientRenewalError(Exception):
    """Raised to make Celery retry with backoff."""


def publish(task: Any, *args: Any, **options: Any) -> bool:
    """Queue a task; False (and a warning) when the broker cannot take it. Every caller has recorded
    the work in the database first, so the beat sweep carries it out later."""
    try:
        task.apply_async(args=args, **options)
    except Exception as exc:  # kombu/redis raise many kinds; none may fail the caller
        logger.warning("Cannot queue %s now (%s); the sweep will", task.name, type(exc).__name__)
        return False
    return True


# --- renewals ---------------------------------------------------------------------------------------


@shared_task(
    bind=True,
    autoretry_for=(TransientRenewalError,),
    retry_backoff=30,
    retry_backoff_max=3600,
    retry_jitter=True,
    max_retries=8,
    acks_late=True,
    soft_time_limit=RENEW_TIME_LIMIT - 30,
    time_limit=RENEW_TIME_LIMIT,
)
def renew_pair_task(  # type: ignore[no-untyped-def]
    self,
    pair_id: int,
    trigger: str = RenewalTrigger.BEAT,
    force: bool = False,
    rejected_fingerprint: str = "",
) -> str:
    """Renew one pair if it still needs it. Safe to run twice: the journal and the re-check make it so."""
    try:
        result = renewal.renew_pair(
            pair_id, trigger=trigger, force=force, rejected_fingerprint=rejected_fingerprint, wait=False
        )
    except TokenPair.DoesNotExist:
        return "gone"
    except renewal.RenewalFailed as exc:
        if exc.transient:
            raise TransientRenewalError(str(exc)) from exc
        return f"refused: {exc.code}"
    return "busy elsewhere" if result.busy else "done"


def queue_renewals(pair_ids: Iterable[int], *, trigger: str, force: bool = False) -> int:
    """Queue one renewal task per pair once the transaction commits (staff, commands: a few pairs).
    The pairs' own state is the record of this work: a due pair stays due until renewed."""
    ids = list(pair_ids)

    def send() -> None:
        for pair_id in ids:
            publish(renew_pair_task, pair_id, trigger, force)

    if ids:
        transaction.on_commit(send)
    return len(ids)


def queue_on_demand_renewal(pair_id: int, rejected_fingerprint: str = "") -> bool:
    """For a web request that needs a fresh token: a worker renews it, the request waits for it."""
    return publish(renew_pair_task, pair_id, RenewalTrigger.ON_DEMAND, False, rejected_fingerprint)


# A batch task starts a pair only within this many seconds of its start; the pairs it did not reach
# go back to the queue as a new task. Its time limit is that plus one whole renewal.
BATCH_BUDGET = 120
BATCH_TIME_LIMIT = BATCH_BUDGET + RENEW_TIME_LIMIT


@shared_task(acks_late=True, soft_time_limit=BATCH_TIME_LIMIT - 30, time_limit=BATCH_TIME_LIMIT)
def renew_pairs_task(
    pair_ids: list[int], trigger: str = RenewalTrigger.BEAT, batch_id: int | None = None
) -> str:
    """Renew a batch of pairs one by one (each under its own journal entry and lease). Stopped or out
    of time, it hands the pairs it did not start back as a new batch; a database that stays away makes it
    release them, saying why (portals.batches). A message without `batch_id` (queued by an earlier
    release, or by hand) gets its record when a worker takes it."""
    if batch_id is None:
        batch_id = batches.adopt(pair_ids, trigger=trigger, time_limit=BATCH_TIME_LIMIT)
    elif not batches.start(batch_id, time_limit=BATCH_TIME_LIMIT):
        return "released before it started"
    batch = renewal.renew_batch(
        pair_ids, trigger=trigger, budget=BATCH_BUDGET, done=lambda pair_id: batches.unmark(batch_id, pair_id)
    )
    if batch.left:
        cause = batches.DATABASE if batch.cause else ""
        batches.hand_back(batch_id, batch.left, trigger=trigger, cause=cause, publish=_publish_batch)
    else:
        batches.finish(batch_id)
    return batch.summary()


def _publish_batch(pair_ids: list[int], trigger: str, batch_id: int) -> bool:
    return publish(renew_pairs_task, pair_ids, trigger, batch_id)


def queue_due_renewals(limit: int | None = None, *, only: list[int] | None = None) -> int:
    """The sweep's hand-out: the most urgent due pairs, at most BITRIX24_RENEW_PER_SWEEP a run (how
    the load on the OAuth server is spread), in batches of BITRIX24_RENEW_BATCH pairs, queued at once.
    Each batch is recorded and holds its pairs for its lease (portals.batches); a renewal that fails sets
    its own back-off, one that succeeds clears it. `only`: of these pairs (released ones), the due."""
    now = timezone.now()
    limit = settings.BITRIX24_RENEW_PER_SWEEP if limit is None else limit
    due = selectors.due_pairs(now=now)
    if only is not None:
        due = due.filter(pk__in=only)
    ids = list(due.order_by("refresh_issued_at", "pk").values_list("pk", flat=True)[:limit])
    size = max(settings.BITRIX24_RENEW_BATCH, 1)
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    return batches.hand_out(chunks, trigger=RenewalTrigger.BEAT, publish=_publish_batch)


@shared_task(acks_late=True, soft_time_limit=RENEW_TIME_LIMIT - 30, time_limit=RENEW_TIME_LIMIT)
def resolve_attempt_task(attempt_id: int) -> str:
    """Resolve a renewal an earlier process left unfinished (see portals.renewal)."""
    result = renewal.resolve_attempt(attempt_id, trigger=RenewalTrigger.BEAT)
    return result.outcome if result is not None else "nothing to do"


def queue_resolutions() -> int:
    """Every unfinished renewal whose holder is gone or whose lease ran out."""
    ids = [a.pk for a in renewal.unfinished_attempts() if not renewal.holder_may_live(a)]
    _publish_each(resolve_attempt_task, ids)
    return len(ids)


@shared_task(acks_late=True, soft_time_limit=50, time_limit=60)
def resolve_interrupted() -> int:
    """Beat, every minute: resolve every renewal whose holder is gone or whose lease ran out, so that a pair
    whose answer was lost is recovered, or flagged lost, within its lease and a minute, not at the next
    renewal sweep (every 15 minutes); and release every renewal batch whose lease ended unfinished, handing
    its pairs out again at once."""
    released = batches.release_expired()
    if released:
        queue_due_renewals(len(released), only=released)
    return queue_resolutions()


def _publish_each(task: Any, ids: list[Any]) -> None:
    def send() -> None:
        for item in ids:
            publish(task, item)

    if ids:
        transaction.on_commit(send)


# --- wanted actions ---------------------------------------------------------------------------------


def want(kind: str, *, portal: Portal, pair: TokenPair | None = None, **fields: Any) -> WantedAction:
    """Record work that must happen (one open action per portal/pair and kind) and queue it after
    commit. The record comes first: if the task never runs, the sweep queues it again."""
    try:
        with transaction.atomic():
            action, created = WantedAction.objects.get_or_create(
                kind=kind, portal=portal, pair=pair, done_at=None, defaults=fields
            )
    except IntegrityError:  # a concurrent request recorded the same work first
        action, created = WantedAction.objects.get(kind=kind, portal=portal, pair=pair, done_at=None), False
    if not created:
        # Asked again while open (a second update dropped the bindings again): a run that started
        # before this must not close the action (see carry_out_task).
        WantedAction.objects.filter(pk=action.pk).update(generation=F("generation") + 1, **fields)
    action_id = action.pk
    transaction.on_commit(lambda: publish(carry_out_task, action_id, kwargs={"kind": kind}))
    return action


def _next_try(action: WantedAction) -> timedelta:
    return timedelta(seconds=clock.backoff(action.attempts, base=60, cap=6 * 3600))


@shared_task(acks_late=True, soft_time_limit=ACTION_TIME_LIMIT - 30, time_limit=ACTION_TIME_LIMIT)
def carry_out_task(action_id: int, kind: str = "") -> str:
    """Carry out one wanted action; a failure leaves it open with a time for the sweep to retry. `kind`
    (the action's) only routes the task: a bindings sync is app work (config/routing.py)."""
    action = WantedAction.objects.select_related("portal").filter(pk=action_id, done_at=None).first()
    if action is None:
        return "nothing to do"
    now = timezone.now()
    action.attempts += 1
    WantedAction.objects.filter(pk=action.pk).update(
        attempts=action.attempts, next_attempt_at=now + PENDING_GRACE
    )
    note = ""
    try:
        if action.kind == WantedKind.RENEW_PAIR and action.pair_id is not None:
            result = renewal.renew_pair(
                action.pair_id, trigger=action.trigger, force=action.force, wait=False
            )
            if result.busy:
                # Another process is renewing it right now; that renewal may still fail: try again soon.
                return _failed(action, "a renewal was in progress elsewhere", retry_in=timedelta(minutes=1))
        elif action.kind == WantedKind.BIND_EVENTS:
            if action.portal.state != PortalState.UNINSTALLED:
                synced = bindings.sync_bindings(portal=action.portal)
                note = synced.summary() if synced.changed else ""
            else:
                note = "the portal was uninstalled meanwhile"
        elif action.kind == WantedKind.CONFIRM_UNINSTALL:
            outcome = _confirm_uninstall(action)
            if outcome is not None:
                return outcome
            note = "confirmed by Bitrix24"
        elif action.kind == WantedKind.CHECK_STATUS:
            if services.check_app_status(portal=action.portal) is None:
                note = "not checked: no live access token (never refreshed for an unverified event)"
    except TokenPair.DoesNotExist:
        note = "the pair is gone (portal uninstalled)"
    except renewal.NoUsablePair as exc:
        note = f"not possible: {exc}"  # only a reinstall changes that, and it asks again
    except renewal.RenewalFailed as exc:
        if exc.transient:
            return _failed(action, str(exc))
        note = f"refused: {exc}"
    except Exception as exc:  # a portal or broker failure: the sweep retries it later
        error = f"{type(exc).__name__}: {exc}"
        # Once per outage, not once per retry: a portal that stays unreachable (the stand-in stopped while
        # developing, a portal down for hours) says so when it starts failing, then quietly backs off.
        log = logger.warning if action.last_error[:500] != error[:500] else logger.info
        log("Wanted %s for portal %s failed: %s", action.kind, action.portal.member_id, exc)
        return _failed(action, error)
    closed = WantedAction.objects.filter(pk=action.pk, generation=action.generation).update(
        done_at=timezone.now(), note=note[:500], last_error=""
    )
    if not closed:
        # Asked for again while this run went on: run it again for the newer request.
        WantedAction.objects.filter(pk=action.pk).update(next_attempt_at=None)
        publish(carry_out_task, action.pk, kwargs={"kind": action.kind})
        return "done, and asked again meanwhile: queued again"
    return "done" + (f" ({note})" if note else "")


# An uninstall event may outrun the removal on Bitrix24's side: while app.info still says installed,
# it is asked again after these delays, then the uninstall is refused as suspicious.
RECHECK_AFTER = (timedelta(minutes=1), timedelta(minutes=3))


def _confirm_uninstall(action: WantedAction) -> str | None:
    """None when proven and carried out; otherwise why the claim stays open, is held, or closes refused."""
    portal = action.portal
    if portal.state == PortalState.UNINSTALLED:
        return None
    verdict = services.check_uninstalled(portal=portal, claim=action)
    if verdict.check == services.UninstallCheck.CONFIRMED:
        services.uninstall_portal(portal=portal, clean=action.force)
        logger.info("Uninstall of portal %s proven by Bitrix24: %s", portal.member_id, verdict.evidence)
        return None
    if verdict.check == services.UninstallCheck.RETRY:
        return _failed(action, f"Bitrix24 could not confirm the uninstall now: {verdict.evidence}")
    if verdict.check == services.UninstallCheck.HELD:
        # Nothing users see changes, nothing is deleted: staff confirm or dismiss it in the admin, a
        # verified request of the portal or a reinstall dismisses it (services.dismiss_uninstall_claim).
        WantedAction.objects.filter(pk=action.pk, held_at__isnull=True).update(held_at=timezone.now())
        WantedAction.objects.filter(pk=action.pk).update(
            last_error=f"held, no proof: {verdict.evidence}"[:500],
            next_attempt_at=timezone.now() + timedelta(days=3650),
        )
        logger.warning("Uninstall claim for portal %s held for staff: %s", portal.member_id, verdict.evidence)
        return "held for staff"
    if action.attempts <= len(RECHECK_AFTER):
        return _failed(action, "Bitrix24 says installed", retry_in=RECHECK_AFTER[action.attempts - 1])
    logger.warning(
        "Suspicious ONAPPUNINSTALL for portal %s refused: Bitrix24 says the app is installed (the event "
        "carried the application token, which every employee who opens the app can read)",
        portal.member_id,
    )
    WantedAction.objects.filter(pk=action.pk).update(
        done_at=timezone.now(), note="refused: Bitrix24 says the app is installed (suspicious)"
    )
    Portal.objects.filter(pk=portal.pk).update(uninstall_claimed_at=None)
    return "refused: still installed"


def _failed(action: WantedAction, error: str, retry_in: timedelta | None = None) -> str:
    WantedAction.objects.filter(pk=action.pk).update(
        last_error=error[:500], next_attempt_at=timezone.now() + (retry_in or _next_try(action))
    )
    return f"failed: {error}"


def queue_open_actions() -> int:
    """The sweep re-drives open actions: never queued (broker away), lost, or due for a retry."""
    now = timezone.now()
    due = list(selectors.open_actions_due(now=now).values_list("pk", "kind"))
    WantedAction.objects.filter(pk__in=[pk for pk, _ in due]).update(next_attempt_at=now + PENDING_GRACE)

    def send() -> None:
        for pk, kind in due:
            publish(carry_out_task, pk, kwargs={"kind": kind})

    if due:
        transaction.on_commit(send)
    return len(due)


def queue_bindings(*, portal: Portal) -> bool:
    """After a trusted install or update: bind the events again (Bitrix24 drops bindings on update).
    Nothing to do without BITRIX24_PUBLIC_URL."""
    if not bindings.handler_url():
        return False
    want(WantedKind.BIND_EVENTS, portal=portal, trigger=RenewalTrigger.ON_DEMAND)
    return True


# How many portals one sweep asks to sync their bindings: after a release that changes the handlers,
# thousands of portals are synced over a few sweeps, each within its own rate limit.
BINDINGS_PER_SWEEP = 500


def queue_stale_bindings(limit: int = BINDINGS_PER_SWEEP) -> int:
    """Installed portals whose bindings are not the wanted ones (the app's handlers changed, or a sync
    failed): one BIND_EVENTS action each, up to `limit` a run."""
    if not bindings.handler_url():
        return 0
    stale = list(selectors.portals_with_stale_bindings(fingerprint=bindings.wanted_fingerprint())[:limit])
    for portal in stale:
        want(WantedKind.BIND_EVENTS, portal=portal, trigger=RenewalTrigger.BEAT)
    return len(stale)


def queue_confirmation(*, pair: TokenPair) -> None:
    """A new background pair of a portal that lost its tokens: renew it once to prove it works."""
    want(WantedKind.RENEW_PAIR, portal=pair.portal, pair=pair, force=True, trigger=RenewalTrigger.ON_DEMAND)


def queue_uninstall_confirmation(*, portal: Portal, clean: bool) -> WantedAction:
    """ONAPPUNINSTALL: recorded as a claim (one open per portal); a worker asks Bitrix24 for proof before
    anything is deleted (services.check_uninstalled)."""
    Portal.objects.filter(pk=portal.pk, uninstall_claimed_at__isnull=True).update(
        uninstall_claimed_at=timezone.now()
    )
    held = WantedAction.objects.filter(
        kind=WantedKind.CONFIRM_UNINSTALL, portal=portal, done_at__isnull=True, held_at__isnull=False
    ).first()
    if held is not None:
        return held  # waits for staff: the same claim again asks Bitrix24 nothing more
    return want(WantedKind.CONFIRM_UNINSTALL, portal=portal, force=clean, trigger=RenewalTrigger.ON_DEMAND)


# An unverified ONAPPPAYMENT asks for a status check at most this often per portal.
STATUS_CHECK_EVERY = 60


def queue_status_check(*, portal: Portal) -> bool:
    """ONAPPPAYMENT carries nothing verifiable: a worker asks app.info, at most once a minute per
    portal, however many such events arrive. True when a check was queued."""
    try:
        if not cache.add(f"b24:status-check:{portal.pk}", 1, timeout=STATUS_CHECK_EVERY):
            return False
    except Exception:  # without the shared cache, the open action itself keeps it to one at a time
        logger.warning("Shared cache unavailable: ONAPPPAYMENT debounced by its open action only")
    want(WantedKind.CHECK_STATUS, portal=portal, trigger=RenewalTrigger.ON_DEMAND)
    return True


# Anonymous ONAPPPAYMENT hints one source may have looked into a minute; more are answered alike and dropped.
HINTS_PER_SOURCE = 60


def queue_payment_hint(*, member_id: str) -> bool:
    """An anonymous ONAPPPAYMENT: a worker looks the portal up and checks its status (`payment_hint_task`).
    No database here, so the request costs the same for a member_id this backend serves and one it does
    not; at most one hint per member_id a minute and HINTS_PER_SOURCE per source. True when queued."""
    minute = int(time.time() // 60)
    try:
        if not cache.add(f"b24:payment-hint:{member_id}", 1, timeout=STATUS_CHECK_EVERY):
            return False
        key = f"b24:payment-hints:{sources.current()}:{minute}"
        if not cache.add(key, 1, timeout=120) and cache.incr(key) > HINTS_PER_SOURCE:
            return False
    except Exception:  # without the shared cache, the status check's own open action bounds the work
        logger.warning("Shared cache unavailable: ONAPPPAYMENT hints are not debounced")
    return publish(payment_hint_task, member_id)


@shared_task(acks_late=True, soft_time_limit=60, time_limit=90)
def payment_hint_task(member_id: str) -> str:
    portal = Portal.objects.filter(member_id=member_id).exclude(state=PortalState.UNINSTALLED).first()
    if portal is None:
        return "not a portal of ours"
    return "status check queued" if queue_status_check(portal=portal) else "a check is already due"


def queue_staff_renewal(*, pair: TokenPair) -> None:
    want(WantedKind.RENEW_PAIR, portal=pair.portal, pair=pair, force=True, trigger=RenewalTrigger.STAFF)


# --- the sweep --------------------------------------------------------------------------------------


@shared_task(acks_late=True, soft_time_limit=240, time_limit=300)
def sweep_due_pairs() -> int:
    """Beat: resolve interrupted renewals, re-drive open actions, hand out the due pairs in batches."""
    resolving = queue_resolutions()
    redriven = queue_open_actions()
    resyncing = queue_stale_bindings()
    count = queue_due_renewals()
    purged = services.purge_due_portals()
    if purged:
        logger.info("Purged the data of %d portal(s) uninstalled with CLEAN=1", purged)
    skewed = selectors.pairs_issued_in_the_future().count()
    if skewed:
        logger.warning("%d token pair(s) claim a refresh issue time in the future: renewed now", skewed)
    logger.info(
        "Renewal sweep queued %d renewal(s), %d resolution(s), %d open action(s), %d bindings sync(s)",
        count,
        resolving,
        redriven,
        resyncing,
    )
    return count
