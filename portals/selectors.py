"""Read-only queries for staff screens (admin list, dashboard, staff API): querysets and small
summaries, as data (querysets, numbers, dates, dataclasses); how they read is up to each screen.

Everything a list row shows is annotated onto the portal query with subqueries, so a page of
portals costs the same number of queries whether there are ten portals or ten thousand.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, TypeAlias

from django.conf import settings
from django.db.models import Count, Exists, Min, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import TruncDate
from django.utils import timezone
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    SolarSchedule,
)

from .models import (
    AttemptState,
    PairState,
    Portal,
    PortalState,
    RenewalAttempt,
    RenewalLog,
    RenewalOutcome,
    TokenPair,
    WantedAction,
    WantedKind,
    renewal_due_before,
)

SWEEP_TASK = "portals.tasks.sweep_due_pairs"


# A refresh issue time further ahead than this is a clock gone wrong, not network jitter.
CLOCK_SKEW_TOLERANCE = timedelta(minutes=5)


def due_pairs(*, now: datetime | None = None) -> QuerySet[TokenPair]:
    """Pairs the beat sweep renews: active, refresh token past `LIFETIME - MARGIN` days (or issued
    "in the future", which no lifetime arithmetic can be trusted with), not backing off."""
    now = now or timezone.now()
    return (
        TokenPair.objects.filter(state=PairState.ACTIVE)
        .filter(
            Q(refresh_issued_at__lte=renewal_due_before(now))
            | Q(refresh_issued_at__gt=now + CLOCK_SKEW_TOLERANCE)
        )
        .exclude(portal__state=PortalState.UNINSTALLED)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
    )


def custody_lag(*, now: datetime | None = None) -> dict[str, float]:
    """How far custody is behind, in seconds (0 when it is not): since the oldest due pair became due, and
    since the oldest renewal still in flight started (a holder that died leaves one until it is resolved)."""
    now = now or timezone.now()
    oldest_issued = (
        due_pairs(now=now)
        .filter(refresh_issued_at__lte=now)
        .aggregate(oldest=Min("refresh_issued_at"))["oldest"]
    )
    oldest_attempt = RenewalAttempt.objects.filter(state=AttemptState.IN_FLIGHT).aggregate(
        oldest=Min("started_at")
    )["oldest"]
    due_since = (renewal_due_before(now) - oldest_issued).total_seconds() if oldest_issued else 0.0
    in_flight = (now - oldest_attempt).total_seconds() if oldest_attempt else 0.0
    return {"oldest_due_pair": max(0.0, due_since), "oldest_unresolved_attempt": max(0.0, in_flight)}


def uninstall_claims() -> dict[str, int]:
    """Uninstall claims not settled: open (Bitrix24 being asked) and held (waiting for staff)."""
    claims = WantedAction.objects.filter(kind=WantedKind.CONFIRM_UNINSTALL, done_at__isnull=True)
    held = claims.filter(held_at__isnull=False).count()
    return {"open": claims.count() - held, "held": held}


def pairs_issued_in_the_future(*, now: datetime | None = None) -> QuerySet[TokenPair]:
    """Pairs whose refresh issue time lies ahead of the clock (a skewed clock wrote it)."""
    now = now or timezone.now()
    return TokenPair.objects.filter(refresh_issued_at__gt=now + CLOCK_SKEW_TOLERANCE)


def open_actions_due(*, now: datetime | None = None) -> QuerySet[WantedAction]:
    """Wanted actions not done whose task is not expected any more: never queued, lost, or due a retry.
    A just-recorded action is left BITRIX24_WANTED_GRACE_SECONDS for the task queued with it."""
    now = now or timezone.now()
    fresh = now - timedelta(seconds=settings.BITRIX24_WANTED_GRACE_SECONDS)
    return WantedAction.objects.filter(done_at__isnull=True).filter(
        Q(next_attempt_at__lte=now) | Q(next_attempt_at__isnull=True, requested_at__lte=fresh)
    )


def portals_with_stale_bindings(*, fingerprint: str) -> QuerySet[Portal]:
    """Installed portals whose bindings were not synced to `fingerprint` and are not being synced."""
    syncing = WantedAction.objects.filter(kind=WantedKind.BIND_EVENTS, done_at__isnull=True)
    return (
        Portal.objects.filter(state=PortalState.INSTALLED)
        .exclude(bindings_fingerprint=fingerprint)
        .exclude(pk__in=syncing.values("portal_id"))
        .order_by("pk")
    )


def lost_pairs() -> QuerySet[TokenPair]:
    """Pairs lost in an interrupted renewal (their portal needs a reinstall)."""
    return TokenPair.objects.filter(state=PairState.LOST)


def _background_pair(field: str) -> Subquery:
    return Subquery(TokenPair.objects.filter(portal=OuterRef("pk"), is_background=True).values(field)[:1])


def _last_renewal(field: str) -> Subquery:
    return Subquery(
        RenewalLog.objects.filter(portal=OuterRef("pk")).order_by("-created_at", "-pk").values(field)[:1]
    )


def with_token_health(queryset: QuerySet[Portal] | None = None) -> QuerySet[Portal]:
    """Portals with their background pair's health and their last renewal attempt, one query.

    Annotations: ``bg_access_expires_at``, ``bg_refresh_issued_at``, ``bg_state``,
    ``bg_failures`` (the background pair's consecutive failures), ``bg_last_error``,
    ``last_renewal_outcome``, ``last_renewal_at``, ``pair_count``. A portal without a background
    pair has them all empty.
    """
    queryset = Portal.objects.all() if queryset is None else queryset
    return queryset.annotate(
        bg_access_expires_at=_background_pair("access_expires_at"),
        bg_refresh_issued_at=_background_pair("refresh_issued_at"),
        bg_state=_background_pair("state"),
        bg_failures=_background_pair("consecutive_failures"),
        bg_last_error=_background_pair("last_error"),
        last_renewal_outcome=_last_renewal("outcome"),
        last_renewal_at=_last_renewal("created_at"),
        pair_count=Subquery(
            TokenPair.objects.filter(portal=OuterRef("pk"))
            .order_by()
            .values("portal")
            .annotate(n=Count("pk"))
            .values("n")[:1]
        ),
    )


def refresh_lapses_at(refresh_issued_at: datetime | None) -> datetime | None:
    if refresh_issued_at is None:
        return None
    return refresh_issued_at + timedelta(days=settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS)


def days_left(refresh_issued_at: datetime | None, *, now: datetime | None = None) -> float | None:
    """Days before a refresh token issued then lapses (negative: it has lapsed)."""
    lapses = refresh_lapses_at(refresh_issued_at)
    if lapses is None:
        return None
    return (lapses - (now or timezone.now())).total_seconds() / 86400


def _issued_before_days_left(days: float, now: datetime) -> datetime:
    """refresh_issued_at below which a refresh token has fewer than `days` left."""
    return now - timedelta(days=settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS - days)


# --- filters used by the portal list -------------------------------------------------------------


_BROKEN_PAIR_STATES = (PairState.DEAD, PairState.CREDENTIALS_REJECTED, PairState.LOST)


def _background_exists(*conditions: Q, **lookups: Any) -> Exists:
    return Exists(TokenPair.objects.filter(*conditions, portal=OuterRef("pk"), is_background=True, **lookups))


def due_soon(queryset: QuerySet[Portal], *, now: datetime | None = None) -> QuerySet[Portal]:
    """Installed portals whose active background pair is inside the renewal window
    (fewer than BITRIX24_RENEW_MARGIN_DAYS left): the sweep renews them, unless it is failing."""
    now = now or timezone.now()
    limit = _issued_before_days_left(settings.BITRIX24_RENEW_MARGIN_DAYS, now)
    return queryset.exclude(state=PortalState.UNINSTALLED).filter(
        _background_exists(state=PairState.ACTIVE, refresh_issued_at__lte=limit)
    )


def lapsing(queryset: QuerySet[Portal], *, now: datetime | None = None, days: float = 2) -> QuerySet[Portal]:
    """Portals whose background refresh token lapses within `days` (or has lapsed)."""
    now = now or timezone.now()
    return queryset.exclude(state=PortalState.UNINSTALLED).filter(
        _background_exists(refresh_issued_at__lte=_issued_before_days_left(days, now))
    )


def failing(queryset: QuerySet[Portal]) -> QuerySet[Portal]:
    """Portals whose background pair's last renewal failed, or that the OAuth server refused for good."""
    return queryset.exclude(state=PortalState.UNINSTALLED).filter(
        _background_exists(Q(consecutive_failures__gt=0) | Q(state__in=_BROKEN_PAIR_STATES))
    )


def without_usable_pair(queryset: QuerySet[Portal]) -> QuerySet[Portal]:
    """Installed (or needs-reinstall) portals that have no active background pair to work with."""
    return queryset.exclude(state=PortalState.UNINSTALLED).exclude(_background_exists(state=PairState.ACTIVE))


def lost(queryset: QuerySet[Portal]) -> QuerySet[Portal]:
    """Portals with a pair lost in an interrupted renewal (the background one: they need a reinstall)."""
    return queryset.filter(Exists(TokenPair.objects.filter(portal=OuterRef("pk"), state=PairState.LOST)))


def clock_skewed(queryset: QuerySet[Portal], *, now: datetime | None = None) -> QuerySet[Portal]:
    """Portals with a pair whose refresh issue time lies in the future (renewed by the next sweep)."""
    ahead = pairs_issued_in_the_future(now=now).filter(portal=OuterRef("pk"))
    return queryset.filter(Exists(ahead))


# --- dashboard ----------------------------------------------------------------------------------


def state_counts() -> dict[str, int]:
    """Portals per state, every state present (zero when none)."""
    counts = {state: 0 for state in PortalState.values}
    for row in Portal.objects.order_by().values("state").annotate(n=Count("pk")):
        counts[row["state"]] = row["n"]
    return counts


def licence_counts() -> dict[str, int]:
    """Installed portals per licence status (the portal's app.info: app_status), "" for not read yet, and
    "payment_expired" for those whose paid period has run out."""
    installed = Portal.objects.filter(state=PortalState.INSTALLED).order_by()
    counts = {row["app_status"]: row["n"] for row in installed.values("app_status").annotate(n=Count("pk"))}
    counts["payment_expired"] = installed.filter(payment_expired=True).count()
    return counts


def health_counts(*, now: datetime | None = None) -> dict[str, int]:
    now = now or timezone.now()
    base = Portal.objects.all()
    return {
        "due_soon": due_soon(base, now=now).count(),
        "lapsing": lapsing(base, now=now).count(),
        "failing": failing(base).count(),
        "no_usable_pair": without_usable_pair(base).count(),
        "lost": lost(base).count(),
        "clock_skew": clock_skewed(base, now=now).count(),
    }


@dataclass(frozen=True)
class Bucket:
    """One bar of the days-left chart: refresh tokens with `low` ≤ days left < `high`."""

    low: float  # -inf: the lapsed ones
    high: float  # inf: beyond the lifetime
    count: int


def days_left_histogram(*, now: datetime | None = None, bars: int = 28) -> list[Bucket]:
    """Active background pairs of installed portals by days left on their refresh token, in one query.

    Bars are whole days wide (wider when the lifetime is longer than `bars` days); the first bar
    counts the lapsed ones, the last everything beyond the lifetime (clock skew, a longer real life).
    """
    now = now or timezone.now()
    lifetime = settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS
    width = max(1, math.ceil(lifetime / bars))
    edges = list(range(0, lifetime + width, width))
    ranges: list[tuple[float, float]] = [(-math.inf, 0.0)]
    ranges += [(float(low), float(high)) for low, high in itertools.pairwise(edges)]
    ranges.append((float(edges[-1]), math.inf))
    aggregates: dict[str, Count] = {}
    for index, (low, high) in enumerate(ranges):
        q = Q()
        # days left ≥ low  ⇔  issued ≥ now - (lifetime - low); days left < high  ⇔  issued < now - (lifetime - high)
        if low != -math.inf:
            q &= Q(refresh_issued_at__gte=_issued_before_days_left(low, now))
        if high != math.inf:
            q &= Q(refresh_issued_at__lt=_issued_before_days_left(high, now))
        aggregates[f"b{index}"] = Count("pk", filter=q)
    counts = (
        TokenPair.objects.filter(is_background=True, state=PairState.ACTIVE)
        .exclude(portal__state=PortalState.UNINSTALLED)
        .aggregate(**aggregates)
    )
    buckets = [Bucket(low, high, counts[f"b{i}"]) for i, (low, high) in enumerate(ranges)]
    if buckets[-1].count == 0:
        buckets.pop()  # nothing beyond the lifetime: don't draw an empty "28+" bar
    return buckets


@dataclass(frozen=True)
class DayActivity:
    day: date
    renewed: int
    skipped: int
    transient: int
    refused: int

    @property
    def failed(self) -> int:
        return self.transient + self.refused

    @property
    def total(self) -> int:
        return self.renewed + self.skipped + self.transient + self.refused


def renewal_activity(*, days: int = 14, now: datetime | None = None) -> list[DayActivity]:
    """Renewal attempts per day and outcome over the last `days` days (UTC), oldest first, one query."""
    now = now or timezone.now()
    today = timezone.localdate(now)
    first = today - timedelta(days=days - 1)
    since = timezone.make_aware(datetime.combine(first, datetime.min.time()))
    table: dict[date, dict[str, int]] = {first + timedelta(days=i): {} for i in range(days)}
    rows = (
        RenewalLog.objects.filter(created_at__gte=since)
        .annotate(day=TruncDate("created_at"))
        .order_by()
        .values("day", "outcome")
        .annotate(n=Count("pk"))
    )
    for row in rows:
        if row["day"] in table:
            table[row["day"]][row["outcome"]] = row["n"]
    return [
        DayActivity(
            day=day,
            renewed=outcomes.get(RenewalOutcome.RENEWED, 0),
            skipped=outcomes.get(RenewalOutcome.SKIPPED, 0),
            transient=outcomes.get(RenewalOutcome.TRANSIENT, 0),
            refused=outcomes.get(RenewalOutcome.REFUSED, 0),
        )
        for day, outcomes in table.items()
    ]


class SweepState(enum.StrEnum):
    """What is known of a sweep entry's next run."""

    SCHEDULED = "scheduled"  # next_run_at says when (unknown if the entry has no schedule)
    DISABLED = "disabled"  # refresh tokens are only renewed on demand
    NOT_RUN_YET = "not_run_yet"  # beat has not sent it yet; next_run_at says when it first will
    NOT_COMPUTABLE = "not_computable"  # the schedule gives no next time (a solar one without a location …)
    OVERDUE = "overdue"  # the next run is past by more than beat's flush interval: is beat running?


BeatSchedule: TypeAlias = IntervalSchedule | CrontabSchedule | SolarSchedule | ClockedSchedule


@dataclass(frozen=True)
class SweepSchedule:
    """A beat entry of the renewal sweep."""

    name: str
    enabled: bool
    schedule: BeatSchedule | None  # beat's schedule row; None: the entry has none
    last_run_at: datetime | None
    next_run_at: datetime | None  # None: disabled, or not computable
    state: SweepState
    runs: int = 0  # how many times beat has sent it (PeriodicTask.total_run_count)


def sweep_schedules(*, now: datetime | None = None) -> list[SweepSchedule]:
    """Every django-celery-beat entry that runs the renewal sweep, and when it runs next.

    Read from where beat's DatabaseScheduler records its runs: `PeriodicTask.last_run_at` and
    `total_run_count`, written when it sends the task. An entry it has never sent counts its first
    interval from when the entry was last saved (`date_changed`): a sweep created by `migrate` first
    runs one interval after the migration, not when beat starts. "Next" is last run + interval, or
    the crontab's next time after it.
    """
    now = now or timezone.now()
    result = []
    tasks = PeriodicTask.objects.filter(task=SWEEP_TASK).select_related(
        "interval", "crontab", "solar", "clocked"
    )
    for task in tasks.order_by("name"):
        scheduler = task.scheduler
        next_run: datetime | None = None
        state = SweepState.SCHEDULED if task.last_run_at else SweepState.NOT_RUN_YET
        # DatabaseScheduler's own starting point (django_celery_beat.schedulers.ModelEntry).
        since = task.last_run_at or task.date_changed or now
        if not task.enabled:
            state = SweepState.DISABLED
        elif task.last_run_at is None and task.start_time is not None:
            next_run = max(task.start_time, since)
        elif task.interval is not None:
            next_run = since + timedelta(**{task.interval.period: task.interval.every})
        elif scheduler is not None:
            try:
                next_run = now + scheduler.schedule.remaining_estimate(since)
            except Exception:  # an exotic schedule: say so, don't fail the page
                state = SweepState.NOT_COMPUTABLE
        if next_run is not None and next_run < now - timedelta(minutes=5):
            state = SweepState.OVERDUE
        result.append(
            SweepSchedule(
                name=task.name,
                enabled=task.enabled,
                schedule=scheduler,
                last_run_at=task.last_run_at,
                next_run_at=next_run,
                state=state,
                runs=task.total_run_count,
            )
        )
    return result
