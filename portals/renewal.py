"""Token renewal: the one function that rotates a pair, and the one that hands out access tokens.

Bitrix24 refresh tokens are single-use: a refresh kills the old refresh token and the old access
token. Two workers refreshing the same pair at once lose the portal, and so does a process that
dies between the OAuth server's answer and storing it. So a refresh goes in three steps, and no
database transaction is open during the HTTP call:

1. **Claim** (a short transaction under the pair's row lock): re-read the pair, resolve an attempt
   an earlier process left unfinished, and journal a new attempt (`RenewalAttempt`: the old token's
   fingerprint, who holds it, a lease longer than the longest refresh). One attempt per pair may be
   in flight: the others wait for it (on demand) or leave it be (sweep, staff, command).
2. **Send** the refresh. Stop signals wait for it (`portals.stopping`); no new retries start once a
   stop was asked for.
3. **Keep, then store**: the new pair goes to the second copy (`portals.journal`) the moment it
   arrives, then into the database in a short transaction, retried for BITRIX24_STORE_RETRY_SECONDS
   while the database cannot be reached.

An attempt left in flight is resolved by whoever meets it next, once its holder is proven dead
(same host, process gone) or its lease has expired: a second copy is stored ("recovered"); else the
old refresh token is tried once: it works (the request never reached the server, or the server did
nothing), or it is refused, and the pair is marked lost with the time of the interruption.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from . import clock, journal, lifecycle, metrics, oauth, pairs, stopping
from .errors import NoUsablePair, RenewalFailed, RenewalPending
from .masking import fingerprint
from .models import (
    AttemptState,
    PairState,
    Portal,
    PortalState,
    ReinstallCause,
    RenewalAttempt,
    RenewalLog,
    RenewalOutcome,
    RenewalTrigger,
    TokenPair,
    renewal_due_before,
)

logger = logging.getLogger(__name__)

WAIT_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Renewal:
    pair: TokenPair
    renewed: bool  # False: it was not needed once the lock was held (someone else renewed it)
    busy: bool = False  # not renewed because another live process is renewing it right now


@dataclass(frozen=True)
class _Claim:
    attempt_id: int
    server: str
    old_refresh: str
    interrupted_at: datetime | None  # set when this attempt retries one that was interrupted


class _Busy:
    """Another live process holds an attempt on the pair."""


def lease_seconds() -> float:
    """Longer than any attempt can take: every OAuth retry, then storing with every DB retry."""
    return oauth.worst_case_seconds() + settings.BITRIX24_STORE_RETRY_SECONDS + 60


def holder_may_live(attempt: RenewalAttempt, now: datetime | None = None) -> bool:
    if attempt.lease_expires_at <= (now or timezone.now()):
        return False
    return not journal.holder_is_dead(attempt.holder_host, attempt.holder_pid, attempt.holder_start)


def _is_needed(pair: TokenPair, trigger: str, force: bool, now: datetime, rejected: str = "") -> bool:
    if force:
        # A dead or lost pair's token is known to be refused: sending it again only muddles its state.
        return pair.state in (PairState.ACTIVE, PairState.CREDENTIALS_REJECTED)
    if rejected:
        # A portal answered expired_token for this access token (given by its fingerprint: it travels
        # through the broker): renew unless it was already replaced.
        return pair.state == PairState.ACTIVE and fingerprint(pair.access_token) == rejected
    if pair.state != PairState.ACTIVE:
        return False
    if trigger == RenewalTrigger.ON_DEMAND:
        return pair.access_expires_at <= now + timedelta(seconds=settings.BITRIX24_ACCESS_TOKEN_MIN_SECONDS)
    # An issue time ahead of the clock cannot be aged: renew, and the new one is stamped right.
    return pair.refresh_issued_at <= renewal_due_before(now) or pair.refresh_issued_at > now + timedelta(
        minutes=5
    )


def _log(
    pair: TokenPair,
    trigger: str,
    outcome: str,
    started: float,
    *,
    error: str = "",
    old: str | None = None,
    new: str = "",
) -> None:
    """One renewal-log row; `old` is the refresh token sent (the pair's current one by default)."""
    RenewalLog.objects.create(
        pair=pair,
        portal_id=pair.portal_id,
        user_id=pair.user_id,
        trigger=trigger,
        outcome=outcome,
        error=error[:500],
        duration_ms=int((time.monotonic() - started) * 1000),
        old_fingerprint=fingerprint(pair.refresh_token if old is None else old),
        new_fingerprint=fingerprint(new) if new else "",
    )
    transaction.on_commit(lambda: metrics.renewal(trigger, outcome))  # a rolled-back row never happened


# The state_reason of a portal whose new background pair is being confirmed by a renewal.


def _locked(pair_id: int, trigger: str) -> TokenPair:
    """The pair under its row lock, with its portal. The sweep reads only the columns it needs; the
    other triggers hand the pair back to a caller, which gets it whole.

    The portal's row is locked first: every writer takes the portal, then its pair (a launch updates the
    portal, then the user's pair). A renewal that took the pair first and then marked the portal (proven
    again, or needing a reinstall) deadlocked with a launch of the same portal."""
    list(
        Portal.objects.select_for_update(no_key=True, of=("self",))
        .filter(token_pairs__pk=pair_id)
        .values_list("pk", flat=True)
    )
    if trigger == RenewalTrigger.BEAT:
        return pairs.locked_for_sweep(pair_id)
    return TokenPair.objects.select_for_update(of=("self",)).select_related("portal").get(pk=pair_id)


def _apply_grant(pair: TokenPair, grant: oauth.TokenGrant, now: datetime) -> None:
    pairs.store_grant(
        pair,
        access_token=grant.access_token,
        refresh_token=grant.refresh_token,
        expires_at=grant.expires_at,
        scope=grant.scope,
        now=now,
    )
    # Read under the pair's lock; whoever marks a portal for its tokens holds that same lock.
    portal = pair.portal
    if (
        pair.is_background
        and portal.state == PortalState.NEEDS_REINSTALL
        and portal.reinstall_cause in (ReinstallCause.TOKENS, ReinstallCause.CONFIRMING)
    ):
        # The background pair has now renewed: it proves the portal's tokens work again. A mark staff
        # set is theirs to take back.
        lifecycle.background_proven(pair.portal_id)


def _mark_refused(pair: TokenPair, exc: oauth.OAuthError) -> None:
    was_active = pair.state == PairState.ACTIVE
    reason = str(exc)
    if isinstance(exc, oauth.InvalidGrant) and pair.consecutive_failures and "Timeout" in pair.last_error:
        reason += " (the previous attempt timed out: the server most likely used the token then)"
    pair.state = PairState.CREDENTIALS_REJECTED if isinstance(exc, oauth.InvalidClient) else PairState.DEAD
    pair.last_error = reason[:500]
    pair.consecutive_failures += 1
    pair.next_attempt_at = None
    pair.save(update_fields=["state", "last_error", "consecutive_failures", "next_attempt_at", "updated_at"])
    if pair.is_background and pair.state == PairState.DEAD:
        # Also a portal whose new pair was being confirmed: that pair has just failed its proof.
        lifecycle.background_refused(pair.portal_id, code=exc.code)
    if was_active:  # once per transition, not on every retry
        logger.warning(
            "Token pair %s (portal %s, user %s) refused for good: %s",
            pair.pk,
            pair.portal.member_id,
            pair.user_id,
            exc.code,
        )


def _mark_lost(pair: TokenPair, reason: str) -> None:
    pair.state = PairState.LOST
    pair.last_error = reason[:500]
    pair.consecutive_failures += 1
    pair.next_attempt_at = None
    pair.lost_at = timezone.now()  # renew_tokens reports pairs lost since its previous run
    pair.lost_acknowledged_at = None
    pair.save(
        update_fields=[
            "state",
            "last_error",
            "consecutive_failures",
            "next_attempt_at",
            "lost_at",
            "lost_acknowledged_at",
            "updated_at",
        ]
    )
    if pair.is_background:
        # A mark staff set stays theirs (its reason too); the pair's own state says it was lost.
        lifecycle.background_lost(pair.portal_id, reason=reason)
    logger.error(
        "Token pair %s (portal %s, user %s) %s", pair.pk, pair.portal.member_id, pair.user_id, reason
    )


def _mark_transient(pair: TokenPair, exc: oauth.OAuthError, now: datetime) -> None:
    pair.consecutive_failures += 1
    pair.last_error = str(exc)[:500]
    # 1, 2, 4 … minutes, at most six hours: the beat sweep will not pick it up before then.
    pair.next_attempt_at = now + timedelta(
        seconds=clock.backoff(pair.consecutive_failures, base=60, cap=6 * 3600)
    )
    pair.save(update_fields=["consecutive_failures", "last_error", "next_attempt_at", "updated_at"])


def _finish(attempt_id: int, state: str, note: str = "") -> None:
    RenewalAttempt.objects.filter(pk=attempt_id).update(
        state=state, finished_at=timezone.now(), note=note[:500]
    )


def _claim(
    pair_id: int, trigger: str, force: bool, rejected: str, started: float
) -> Renewal | _Claim | _Busy:
    """Step 1, in one short transaction: decide, resolve what an earlier process left, journal."""
    recovered: int | None = None
    with transaction.atomic():
        pair = _locked(pair_id, trigger)
        now = timezone.now()
        interrupted_at: datetime | None = None
        unfinished = RenewalAttempt.objects.filter(pair=pair, state=AttemptState.IN_FLIGHT).first()
        if unfinished is not None:
            if holder_may_live(unfinished, now):
                return _Busy()
            if fingerprint(pair.refresh_token) != unfinished.old_fingerprint:
                # A launch or a reinstall stored a newer pair since: the interrupted refresh is moot.
                _finish(unfinished.pk, AttemptState.INTERRUPTED, "holder gone; a newer pair was stored since")
            elif (
                grant := journal.find(
                    unfinished.pk, pair_id=pair.pk, old_fingerprint=unfinished.old_fingerprint
                )
            ) is not None:
                old = pair.refresh_token
                _apply_grant(pair, grant, now)
                _finish(unfinished.pk, AttemptState.RECOVERED, "the new pair was stored from the second copy")
                _log(
                    pair,
                    trigger,
                    RenewalOutcome.RENEWED,
                    started,
                    old=old,
                    new=grant.refresh_token,
                    error=f"recovered: the renewal interrupted at {unfinished.started_at:%Y-%m-%d %H:%M:%S} "
                    "UTC had got its answer",
                )
                logger.warning(
                    "Recovered token pair %s (portal %s) from the second copy of an interrupted renewal",
                    pair.pk,
                    pair.portal.member_id,
                )
                recovered = unfinished.pk
            else:
                # Its answer never got here (or never came): the old token is tried once, whatever
                # `force` says; a refusal then means the interrupted request used it.
                interrupted_at = unfinished.started_at
                _finish(
                    unfinished.pk,
                    AttemptState.INTERRUPTED,
                    "holder gone without an answer stored; the old refresh token is tried again",
                )
        if (
            recovered is None
            and interrupted_at is None
            and not _is_needed(pair, trigger, force, now, rejected)
        ):
            # Another worker renewed it while this one waited for the lock (or it is not due).
            _log(pair, trigger, RenewalOutcome.SKIPPED, started)
            return Renewal(pair, renewed=False)
        if recovered is None:
            holder = journal.current_holder()
            attempt = RenewalAttempt.objects.create(
                pair=pair,
                portal_id=pair.portal_id,
                trigger=trigger,
                old_fingerprint=fingerprint(pair.refresh_token),
                holder_host=holder.host,
                holder_pid=holder.pid,
                holder_start=holder.start,
                lease_expires_at=now + timedelta(seconds=lease_seconds()),
            )
            return _Claim(attempt.pk, pair.portal.oauth_server, pair.refresh_token, interrupted_at)
    assert recovered is not None
    journal.forget(recovered, pair_id=pair_id)
    return Renewal(pair, renewed=True)


def _refused(claim: _Claim, pair_id: int, exc: oauth.OAuthRefused, trigger: str, started: float) -> Renewal:
    """The OAuth server refused the token: record why, unless a newer pair was stored meanwhile."""
    failure = RenewalFailed(str(exc), transient=False, code=exc.code)
    with transaction.atomic():
        pair = _locked(pair_id, trigger)
        if pair.refresh_token != claim.old_refresh:
            # Someone stored a newer pair meanwhile (a launch, a reinstall): that one is live.
            _finish(claim.attempt_id, AttemptState.FAILED, f"stale token refused: {exc.code}")
            _log(pair, trigger, RenewalOutcome.SKIPPED, started, error=f"stale token refused: {exc.code}")
            return Renewal(pair, renewed=False)
        if claim.interrupted_at is not None and isinstance(exc, oauth.InvalidGrant):
            reason = f"lost in a renewal interrupted at {claim.interrupted_at:%Y-%m-%d %H:%M:%S} UTC"
            _mark_lost(pair, reason)
            _finish(claim.attempt_id, AttemptState.FAILED, reason)
            _log(pair, trigger, RenewalOutcome.REFUSED, started, error=f"{reason}: {exc}")
            failure = RenewalFailed(reason, transient=False, code=exc.code, lost=True)
        else:
            _mark_refused(pair, exc)
            _finish(claim.attempt_id, AttemptState.FAILED, str(exc))
            _log(pair, trigger, RenewalOutcome.REFUSED, started, error=str(exc))
    raise failure  # after the commit: what was recorded stays


def _failed(claim: _Claim, pair_id: int, exc: oauth.OAuthError, trigger: str, started: float) -> None:
    with transaction.atomic():
        pair = _locked(pair_id, trigger)
        _mark_transient(pair, exc, timezone.now())
        _finish(claim.attempt_id, AttemptState.FAILED, str(exc))
        _log(pair, trigger, RenewalOutcome.TRANSIENT, started, error=str(exc))
    raise RenewalFailed(str(exc), transient=True, code=exc.code)


def _store(
    claim: _Claim, pair_id: int, grant: oauth.TokenGrant, trigger: str, started: float, *, kept: bool
) -> TokenPair:
    """Step 3: the new pair into the database, retried while the database cannot be reached: for
    BITRIX24_STORE_RETRY_SECONDS when the second copy holds it, for as long as it takes otherwise."""
    deadline = time.monotonic() + (settings.BITRIX24_STORE_RETRY_SECONDS if kept else math.inf)
    delay = 0.5
    while True:
        try:
            with transaction.atomic():
                pair = _locked(pair_id, trigger)
                now = timezone.now()
                # Under the pair's lock nobody else changes the attempt: a resolver takes the same lock.
                finished = RenewalAttempt.objects.filter(
                    pk=claim.attempt_id, state=AttemptState.IN_FLIGHT
                ).update(state=AttemptState.STORED, finished_at=now, note="")
                if not finished:
                    # Our lease ran out and a resolver took the attempt over. If it stored our second
                    # copy or a newer pair came, the pair moved on; if it found no copy and marked the
                    # pair lost, this grant is the live one: store it all the same.
                    if pair.refresh_token != claim.old_refresh and pair.state != PairState.LOST:
                        return pair
                    was = RenewalAttempt.objects.values_list("state", flat=True).get(pk=claim.attempt_id)
                    _finish(
                        claim.attempt_id,
                        AttemptState.STORED,
                        f"stored after the lease ran out (the attempt was {was})",
                    )
                    logger.warning("Renewal of pair %s stored after its lease ran out", pair_id)
                _apply_grant(pair, grant, now)
                _log(
                    pair,
                    trigger,
                    RenewalOutcome.RENEWED,
                    started,
                    old=claim.old_refresh,
                    new=grant.refresh_token,
                )
                return pair
        except (OperationalError, InterfaceError) as exc:
            left = deadline - time.monotonic()
            if left <= 0:  # only when the second copy holds the pair
                raise RenewalFailed(
                    "the database could not store the new pair; it is kept in the second copy and will "
                    "be recovered",
                    transient=True,
                    code="store_failed",
                ) from exc
            logger.log(
                logging.WARNING if kept else logging.CRITICAL,
                "Cannot store renewed pair %s (%s); retrying%s",
                pair_id,
                type(exc).__name__,
                f" for {left:.0f} s more" if kept else " until it is stored: no second copy holds it",
            )
            try:
                connection.close()
            except Exception:  # a connection that broke may fail to close; a new one is opened next time
                logger.debug("closing a broken database connection failed", exc_info=True)
            time.sleep(min(delay, max(left, 0.0)))
            delay = min(delay * 2, 15)


def renew_pair(
    pair_id: int,
    *,
    trigger: str,
    force: bool = False,
    rejected_access_token: str = "",
    rejected_fingerprint: str = "",
    wait: bool | None = None,
) -> Renewal:
    """Rotate one pair if it still needs it (see the module's docstring for how).

    `rejected_access_token` (or its `rejected_fingerprint`): the token a portal just answered
    `expired_token` for; the pair is renewed only if it still holds that token (two callers meeting
    it renew once between them).

    `wait`: when another live process is renewing the pair, wait for it (and use its result) or
    return at once with `busy`. By default a caller that needs the token now (on demand, a rejected
    token) waits; tasks never do (their time limits are sized for one renewal).

    Raises TokenPair.DoesNotExist when the pair is gone (portal uninstalled) and RenewalFailed
    when the OAuth server did not hand out a new pair; the pair's state says why.
    """
    oauth.credentials()  # missing credentials fail here, before anything is journaled
    started = time.monotonic()
    rejected = rejected_fingerprint or fingerprint(rejected_access_token)
    if wait is None:
        wait = trigger == RenewalTrigger.ON_DEMAND or bool(rejected)
    deadline = started + lease_seconds()
    while True:
        claim = _claim(pair_id, trigger, force, rejected, started)
        if not isinstance(claim, _Busy):
            break
        if not wait:
            pair = TokenPair.objects.select_related("portal").get(pk=pair_id)
            _log(pair, trigger, RenewalOutcome.SKIPPED, started, error="a renewal is in progress elsewhere")
            return Renewal(pair, renewed=False, busy=True)
        if time.monotonic() > deadline:
            raise RenewalFailed("another process is renewing this pair", transient=True, code="in_progress")
        time.sleep(WAIT_POLL_SECONDS)
    if isinstance(claim, Renewal):
        return claim
    if stopping.stop_requested():
        # Asked to stop before the request left: start nothing (the pair is as it was).
        _failed(claim, pair_id, oauth.OAuthUnavailable("not sent: the process is stopping"), trigger, started)
    with stopping.refresh_in_flight():
        try:
            grant = oauth.refresh(claim.server, claim.old_refresh)
        except oauth.OAuthRefused as exc:
            return _refused(claim, pair_id, exc, trigger, started)
        except oauth.OAuthError as exc:
            _failed(claim, pair_id, exc, trigger, started)
            raise  # unreachable: _failed raises
        kept = journal.keep(
            claim.attempt_id, grant, pair_id=pair_id, old_fingerprint=fingerprint(claim.old_refresh)
        )
        pair = _store(claim, pair_id, grant, trigger, started, kept=kept)
        journal.forget(claim.attempt_id, pair_id=pair_id)
    return Renewal(pair, renewed=True)


@dataclass
class Batch:
    """What `renew_batch` did: outcomes counted, and the pairs it did not start."""

    outcomes: Counter[str] = field(default_factory=Counter)
    left: list[int] = field(default_factory=list)
    stopped: bool = False  # `left` is not empty because the process was asked to stop
    cause: str = ""  # DATABASE_UNAVAILABLE when the database stayed unreachable

    def summary(self) -> str:
        done = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.outcomes.items())) or "nothing"
        if not self.left:
            return done
        return done + (
            f"; {len(self.left)} released (database unavailable)"
            if self.cause
            else f"; {len(self.left)} handed back"
        )


def _drop_connection() -> None:
    try:
        connection.close()
    except Exception:  # a connection that broke may fail to close; a new one is opened next time
        logger.debug("closing a broken database connection failed", exc_info=True)


# A pair the database refused (a restart, a failover) is tried again within its batch after these waits,
# on a new connection each time, before the batch gives up and releases the rest (portals.batches).
DATABASE_RETRY_WAITS = (1.0, 2.0, 4.0, 8.0, 16.0)
DATABASE_UNAVAILABLE = "database"


def _renew_one(pair_id: int, trigger: str) -> str:
    for attempt in range(len(DATABASE_RETRY_WAITS) + 1):
        try:
            result = renew_pair(pair_id, trigger=trigger, wait=False)
        except TokenPair.DoesNotExist:
            return "gone"
        except RenewalFailed as exc:
            return "failed" if exc.transient else "refused"
        except (OperationalError, InterfaceError) as exc:
            # A connection that broke (a database restart): a new one, and this pair again after a wait.
            # Nothing was sent: the claim's transaction had not committed, or the pair stays journaled in
            # flight under this live process and its lease resolves it.
            _drop_connection()
            if attempt == len(DATABASE_RETRY_WAITS) or stopping.stop_requested():
                logger.warning("Renewal of pair %s: the database is unreachable (%s)", pair_id, exc)
                return DATABASE_UNAVAILABLE
            wait = DATABASE_RETRY_WAITS[attempt]
            logger.info("Renewal of pair %s: the database refused (%s); again in %.0f s", pair_id, exc, wait)
            clock.sleep(wait)
            continue
        if result.busy:
            return "busy"
        return "renewed" if result.renewed else "skipped"
    raise AssertionError("unreachable")


def renew_batch(
    pair_ids: Sequence[int],
    *,
    trigger: str,
    budget: float,
    done: Callable[[int], None] | None = None,
) -> Batch:
    """Renew pairs one after the other, each exactly as `renew_pair` does (its own journal entry, its
    own lease, short transactions, no transaction open during its refresh). A pair that another live
    process is renewing is skipped, not waited for. `done(pair_id)` is called after each pair is settled
    (renewed, failed with its own back-off, refused).

    Between pairs, and only there: a stop signal ends the batch (the pair in hand is finished first,
    see `portals.stopping`), and so does `budget` seconds spent, so that a pair is started only while
    its whole renewal still fits in the caller's time limit. A database that stays unreachable through
    DATABASE_RETRY_WAITS ends it too (`cause`). The pairs not started or not settled are in `left`."""
    batch = Batch()
    ends = clock.monotonic() + budget
    for index, pair_id in enumerate(pair_ids):
        if stopping.stop_requested() or (index and clock.monotonic() >= ends):
            batch.left = list(pair_ids[index:])
            batch.stopped = stopping.stop_requested()
            break
        outcome = _renew_one(pair_id, trigger)
        if outcome == DATABASE_UNAVAILABLE:
            batch.left = list(pair_ids[index:])
            batch.cause = DATABASE_UNAVAILABLE
            break
        batch.outcomes[outcome] += 1
        if done is not None:
            try:
                done(pair_id)
            except (OperationalError, InterfaceError):
                _drop_connection()  # the mark stays; the batch's release gives the pair back, harmlessly
    return batch


def restore_from_copy(copy: journal.KeptCopy) -> str:
    """After a database restore: put a pair's latest renewal answer back when the database holds an older
    pair (whose refresh token was used since the backup: it would be refused). Returns "restored",
    "current" (the database has this pair), "newer" (a launch or reinstall stored a newer one since the
    copy) or "gone" (no such pair in the restored database)."""
    assert copy.grant is not None and copy.kept_at is not None
    started = time.monotonic()
    kept_at = datetime.fromtimestamp(copy.kept_at, tz=UTC)
    with transaction.atomic():
        pair = TokenPair.objects.select_for_update().select_related("portal").filter(pk=copy.pair_id).first()
        if pair is None:
            return "gone"
        if pair.refresh_token == copy.grant.refresh_token:
            return "current"
        if fingerprint(pair.refresh_token) != copy.old_fingerprint and pair.refresh_issued_at >= kept_at:
            # Neither the token the copy replaced nor one older than it: stored since (a launch, a reinstall).
            return "newer"
        old = pair.refresh_token
        _apply_grant(pair, copy.grant, kept_at)  # its refresh token's life counts from when it was issued
        _log(
            pair,
            RenewalTrigger.COMMAND,
            RenewalOutcome.RENEWED,
            started,
            old=old,
            new=copy.grant.refresh_token,
            error=f"restored from the copy kept at {kept_at:%Y-%m-%d %H:%M:%S} UTC, after a database restore",
        )
    logger.warning(
        "Token pair %s (portal %s) restored from its kept renewal copy", pair.pk, pair.portal.member_id
    )
    return "restored"


def unfinished_attempts(portal: Portal | None = None) -> QuerySet[RenewalAttempt]:
    attempts = RenewalAttempt.objects.filter(state=AttemptState.IN_FLIGHT).select_related("portal")
    return attempts.filter(portal=portal) if portal is not None else attempts


@dataclass(frozen=True)
class Resolution:
    attempt: RenewalAttempt
    outcome: str  # "in_progress", "recovered", "renewed", "lost", "failed", "gone", "resolved"
    detail: str = ""


def resolve_attempt(attempt_id: int, *, trigger: str) -> Resolution | None:
    """Resolve one attempt left in flight, if its holder is proven dead or its lease has expired."""
    attempt = RenewalAttempt.objects.select_related("portal").filter(pk=attempt_id).first()
    if attempt is None or attempt.state != AttemptState.IN_FLIGHT:
        return None
    if holder_may_live(attempt):
        return Resolution(
            attempt,
            "in_progress",
            f"held by process {attempt.holder_pid} on {attempt.holder_host} until "
            f"{attempt.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC",
        )
    had_copy = (
        journal.find(attempt.pk, pair_id=attempt.pair_id, old_fingerprint=attempt.old_fingerprint) is not None
    )
    try:
        renew_pair(attempt.pair_id, trigger=trigger, wait=False)
    except TokenPair.DoesNotExist:
        return Resolution(attempt, "gone")
    except RenewalFailed as exc:
        return Resolution(attempt, "lost" if exc.lost else "failed", str(exc))
    attempt.refresh_from_db()
    if attempt.state == AttemptState.RECOVERED or had_copy:
        return Resolution(attempt, "recovered")
    return Resolution(attempt, "renewed" if attempt.state == AttemptState.INTERRUPTED else "resolved")


def pair_for(portal: Portal, user_id: int | None = None) -> TokenPair:
    """The active pair to act with: the portal's background pair, or a given user's."""
    pairs = TokenPair.objects.filter(portal=portal, state=PairState.ACTIVE)
    pair = (
        pairs.filter(user_id=user_id).first()
        if user_id is not None
        else pairs.filter(is_background=True).first()
    )
    if pair is None:
        who = f"user {user_id}" if user_id is not None else "the background user"
        raise NoUsablePair(f"portal {portal.member_id} has no active token pair for {who}")
    return pair


# --- renewals asked for by a web request ------------------------------------------------------------
# A web worker may be killed by its server's timeout at any moment, so a web request never calls the
# token endpoint itself: it queues the renewal for a Celery worker and waits for it, at most a budget.

_web_wait: ContextVar[float | None] = ContextVar("renewal_web_wait", default=None)
_queue: Callable[[int, str], bool] | None = None


def set_queue(queue: Callable[[int, str], bool]) -> None:
    """How a web request gets a renewal done elsewhere: `queue(pair_id, rejected_fingerprint)` -> queued?
    Set at start-up (portals.apps) to the task module's function, which this module may not import."""
    global _queue
    _queue = queue


@contextmanager
def renewals_in_workers(wait_seconds: float) -> Iterator[None]:
    """Within this block (a web request), renewals are queued for a worker and waited for."""
    token = _web_wait.set(wait_seconds)
    try:
        yield
    finally:
        _web_wait.reset(token)


def renewed(pair: TokenPair, *, rejected_access_token: str = "") -> TokenPair:
    """The pair with a fresh access token: renewed here or, inside a web request, by a worker while the
    request waits (RenewalPending past the budget)."""
    wait = _web_wait.get()
    if wait is None:
        return renew_pair(
            pair.pk, trigger=RenewalTrigger.ON_DEMAND, rejected_access_token=rejected_access_token
        ).pair
    rejected = fingerprint(rejected_access_token)
    running = RenewalAttempt.objects.filter(pair_id=pair.pk, state=AttemptState.IN_FLIGHT).first()
    already = running is not None and holder_may_live(running)
    if not already and (_queue is None or not _queue(pair.pk, rejected)):
        raise RenewalPending("the token needs renewing and the renewal cannot be queued right now")
    if connection.vendor == "sqlite" and connection.in_atomic_block:
        # This transaction holds SQLite's write lock: the worker could not store the pair meanwhile.
        raise RenewalPending("the token is being renewed")
    deadline = time.monotonic() + wait
    while True:
        current = TokenPair.objects.select_related("portal").get(pk=pair.pk)
        if current.state != PairState.ACTIVE:
            raise RenewalFailed(
                current.last_error or f"the pair is {current.state}", transient=False, code=current.state
            )
        if not _is_needed(current, RenewalTrigger.ON_DEMAND, False, timezone.now(), rejected):
            return current
        if time.monotonic() >= deadline:
            raise RenewalPending(f"the token is being renewed; not done within {wait:.0f} s")
        time.sleep(WAIT_POLL_SECONDS)


def valid_pair(portal: Portal, user_id: int | None = None) -> TokenPair:
    """The pair to act with, its access token renewed first if it has expired or is about to."""
    pair = pair_for(portal, user_id)
    if _is_needed(pair, RenewalTrigger.ON_DEMAND, False, timezone.now()):
        pair = renewed(pair)
    return pair


def access_token_for(portal: Portal, user_id: int | None = None) -> str:
    """A valid access token for the portal (its background pair's, or a given user's)."""
    return valid_pair(portal, user_id).access_token
