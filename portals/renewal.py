"""Token renewal: the one function that rotates a pair, and the one that hands out access tokens.

Bitrix24 refresh tokens are single-use: a refresh kills the old refresh token and the old access
token. Two workers refreshing the same pair at once lose the portal, so a pair is only ever
rotated under its row lock (`SELECT … FOR UPDATE` on PostgreSQL; on SQLite every transaction is
IMMEDIATE, which takes the database's write lock), and whoever gets the lock second re-reads the
pair and finds it already renewed.

The window in which a crash loses a pair is between the OAuth server's answer and the commit that
follows it: one UPDATE of the pair and one INSERT into the renewal log, a few milliseconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import oauth
from .errors import NoUsablePair, RenewalFailed
from .masking import fingerprint
from .models import (
    PairState,
    Portal,
    PortalState,
    RenewalLog,
    RenewalOutcome,
    RenewalTrigger,
    TokenPair,
    renewal_due_before,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Renewal:
    pair: TokenPair
    renewed: bool  # False: it was not needed once the lock was held (someone else renewed it)


def _is_needed(pair: TokenPair, trigger: str, force: bool, now: datetime, rejected: str = "") -> bool:
    if force:
        return True
    if rejected:
        # A portal answered expired_token for this access token: renew unless it was already replaced.
        return pair.state == PairState.ACTIVE and pair.access_token == rejected
    if pair.state != PairState.ACTIVE:
        return False
    if trigger == RenewalTrigger.ON_DEMAND:
        return pair.access_expires_at <= now + timedelta(seconds=settings.BITRIX24_ACCESS_TOKEN_MIN_SECONDS)
    return pair.refresh_issued_at <= renewal_due_before(now)


def _log(pair: TokenPair, trigger: str, outcome: str, started: float, *, error: str = "") -> None:
    RenewalLog.objects.create(
        pair=pair,
        portal_id=pair.portal_id,
        user_id=pair.user_id,
        trigger=trigger,
        outcome=outcome,
        error=error[:500],
        duration_ms=int((time.monotonic() - started) * 1000),
        old_fingerprint=fingerprint(pair.refresh_token),
    )


def _apply_grant(pair: TokenPair, grant: oauth.TokenGrant, now: datetime) -> None:
    pair.access_token = grant.access_token
    pair.refresh_token = grant.refresh_token
    pair.access_expires_at = grant.expires_at
    pair.refresh_issued_at = now
    if grant.scope:
        pair.scope = grant.scope
    pair.state = PairState.ACTIVE
    pair.last_renewed_at = now
    pair.last_error = ""
    pair.consecutive_failures = 0
    pair.next_attempt_at = None
    pair.save()


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
        Portal.objects.filter(pk=pair.portal_id, state=PortalState.INSTALLED).update(
            state=PortalState.NEEDS_REINSTALL, state_reason=f"renewal refused: {exc.code}"[:255]
        )
    if was_active:  # once per transition, not on every retry
        logger.warning(
            "Token pair %s (portal %s, user %s) refused for good: %s",
            pair.pk,
            pair.portal.member_id,
            pair.user_id,
            exc.code,
        )


def _mark_transient(pair: TokenPair, exc: oauth.OAuthError, now: datetime) -> None:
    pair.consecutive_failures += 1
    pair.last_error = str(exc)[:500]
    # 1, 2, 4 … minutes, at most six hours: the beat sweep will not pick it up before then.
    pair.next_attempt_at = now + timedelta(minutes=min(2 ** (pair.consecutive_failures - 1), 360))
    pair.save(update_fields=["consecutive_failures", "last_error", "next_attempt_at", "updated_at"])


def renew_pair(
    pair_id: int, *, trigger: str, force: bool = False, rejected_access_token: str = ""
) -> Renewal:
    """Rotate one pair under its row lock, if it still needs it once the lock is held.

    `rejected_access_token`: the token a portal just answered `expired_token` for; the pair is
    renewed only if it still holds that token (two callers meeting it renew once between them).

    Raises TokenPair.DoesNotExist when the pair is gone (portal uninstalled) and RenewalFailed
    when the OAuth server did not hand out a new pair; the pair's state says why.
    """
    started = time.monotonic()
    failure: RenewalFailed | None = None
    with transaction.atomic():
        pair = TokenPair.objects.select_for_update(of=("self",)).select_related("portal").get(pk=pair_id)
        now = timezone.now()
        if not _is_needed(pair, trigger, force, now, rejected_access_token):
            # Another worker renewed it while this one waited for the lock (or it is not due).
            _log(pair, trigger, RenewalOutcome.SKIPPED, started)
            return Renewal(pair, renewed=False)
        old_refresh = pair.refresh_token
        try:
            grant = oauth.refresh(pair.portal.oauth_server, old_refresh)
        except oauth.OAuthRefused as exc:
            current = TokenPair.objects.filter(pk=pair.pk).first()
            if current is not None and current.refresh_token != old_refresh:
                # Someone stored a newer pair meanwhile (a launch, a reinstall): that one is live.
                _log(
                    current,
                    trigger,
                    RenewalOutcome.SKIPPED,
                    started,
                    error=f"stale token refused: {exc.code}",
                )
                return Renewal(current, renewed=False)
            _mark_refused(pair, exc)
            _log(pair, trigger, RenewalOutcome.REFUSED, started, error=str(exc))
            failure = RenewalFailed(str(exc), transient=False, code=exc.code)
        except oauth.OAuthError as exc:
            _mark_transient(pair, exc, now)
            _log(pair, trigger, RenewalOutcome.TRANSIENT, started, error=str(exc))
            failure = RenewalFailed(str(exc), transient=True, code=exc.code)
        else:
            old_fp = fingerprint(old_refresh)
            _apply_grant(pair, grant, timezone.now())
            log = RenewalLog(
                pair=pair,
                portal_id=pair.portal_id,
                user_id=pair.user_id,
                trigger=trigger,
                outcome=RenewalOutcome.RENEWED,
                duration_ms=int((time.monotonic() - started) * 1000),
                old_fingerprint=old_fp,
                new_fingerprint=fingerprint(grant.refresh_token),
            )
            log.save()
    if failure is not None:
        raise failure
    return Renewal(pair, renewed=True)


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


def valid_pair(portal: Portal, user_id: int | None = None) -> TokenPair:
    """The pair to act with, its access token renewed first if it has expired or is about to."""
    pair = pair_for(portal, user_id)
    if _is_needed(pair, RenewalTrigger.ON_DEMAND, False, timezone.now()):
        pair = renew_pair(pair.pk, trigger=RenewalTrigger.ON_DEMAND).pair
    return pair


def access_token_for(portal: Portal, user_id: int | None = None) -> str:
    """A valid access token for the portal (its background pair's, or a given user's)."""
    return valid_pair(portal, user_id).access_token
