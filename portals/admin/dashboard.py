"""The staff dashboard (/admin/dashboard/): installations by state, refresh-token days left as a
chart, renewals and failures per day, and when beat runs the renewal sweep next.

Server-rendered, inline SVG, no script: the page works from a bare admin with no static build.
A fixed number of queries whatever the number of portals (each figure is one aggregate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format

from portals import selectors
from portals.models import AppStatus, PortalState, RenewalOutcome

from .filters import HEALTH
from .palette import PALETTE, days_left_colour, outcome_colour

CHART_HEIGHT = 160  # px of the tallest bar
CHART_TOP = 32  # px above it, for the counts and the "renewal window" label
BAR_WIDTH = 22
BAR_GAP = 6
ACTIVITY_DAYS = 14
# The activity chart's columns are wider than the days-left bars: each is labelled with its date
# ("28 Nov"), which a 28 px column could not hold.
DAY_WIDTH = 30
DAY_GAP = 14

# The activity chart's stacked series, bottom up: the DayActivity field, the renewal outcome it
# counts (which gives its colour), what a bar's tooltip calls it and what the legend calls it.
ACTIVITY_SERIES = (
    ("renewed", RenewalOutcome.RENEWED, "renewed", "renewed"),
    ("skipped", RenewalOutcome.SKIPPED, "not needed", "not needed"),
    ("transient", RenewalOutcome.TRANSIENT, "failed, retried", "failed, retried"),
    ("refused", RenewalOutcome.REFUSED, "refused", "refused for good"),
)
ACTIVITY_LEGEND = [(outcome_colour(outcome), legend) for _, outcome, _, legend in ACTIVITY_SERIES]


# What the dashboard says of a sweep entry's next run, after the time (or instead of it).
SWEEP_NOTES = {
    selectors.SweepState.SCHEDULED: "",
    selectors.SweepState.DISABLED: "disabled: refresh tokens are only renewed on demand",
    selectors.SweepState.NOT_RUN_YET: (
        "beat has not run it yet: it counts the first interval from when the entry was saved"
    ),
    selectors.SweepState.NOT_COMPUTABLE: "next run not computable for this schedule",
    selectors.SweepState.OVERDUE: "overdue: is celery beat running?",
}


def bucket_label(bucket: selectors.Bucket) -> str:
    """Under a bar of the days-left chart: "lapsed", one day ("3") or a span of days ("3-5")."""
    if bucket.low == -math.inf:
        return "lapsed"
    if bucket.high - bucket.low == 1:
        return f"{bucket.low:g}"
    return f"{bucket.low:g}-{bucket.high:g}"


@dataclass(frozen=True)
class SweepLine:
    """A beat entry of the renewal sweep, as the dashboard's table reads it."""

    name: str
    enabled: bool
    schedule: str
    last_run_at: datetime | None
    next_run_at: datetime | None
    note: str
    runs: int

    @classmethod
    def of(cls, entry: selectors.SweepSchedule) -> SweepLine:
        return cls(
            name=entry.name,
            enabled=entry.enabled,
            schedule=str(entry.schedule) if entry.schedule is not None else "no schedule",
            last_run_at=entry.last_run_at,
            next_run_at=entry.next_run_at,
            note=SWEEP_NOTES[entry.state],
            runs=entry.runs,
        )


@dataclass(frozen=True)
class Bar:
    x: int
    y: int
    width: int
    height: int
    label: str
    count: int
    colour: str
    title: str


def days_left_chart(buckets: list[selectors.Bucket]) -> dict[str, Any]:
    """Geometry of the days-left bar chart (drawn as SVG by the template)."""
    top = max((bucket.count for bucket in buckets), default=0) or 1
    bars = []
    for index, bucket in enumerate(buckets):
        height = round(CHART_HEIGHT * bucket.count / top)
        if bucket.count and height < 2:
            height = 2  # one portal is still visible
        x = index * (BAR_WIDTH + BAR_GAP)
        label = bucket_label(bucket)
        days = "lapsed" if label == "lapsed" else f"{label} days left"
        bars.append(
            Bar(
                x=x,
                y=CHART_TOP + CHART_HEIGHT - height,
                width=BAR_WIDTH,
                height=height,
                label=label,
                count=bucket.count,
                colour=days_left_colour(bucket.high),
                title=f"{bucket.count} portal(s): {days}",
            )
        )
    margin_index = next(
        (i for i, b in enumerate(buckets) if b.low >= settings.BITRIX24_RENEW_MARGIN_DAYS), len(buckets)
    )
    return {
        "bars": bars,
        "width": max(len(bars) * (BAR_WIDTH + BAR_GAP), 1),
        "height": CHART_TOP + CHART_HEIGHT + 40,
        "baseline": CHART_TOP + CHART_HEIGHT,
        "margin_x": margin_index * (BAR_WIDTH + BAR_GAP) - BAR_GAP // 2,
        "total": sum(bucket.count for bucket in buckets),
    }


def activity_chart(days: list[selectors.DayActivity]) -> dict[str, Any]:
    """Stacked bars of renewals per day: renewed, skipped, failed and retried, refused."""
    top = max((day.total for day in days), default=0) or 1
    columns = []
    scale = 120 / top
    for index, day in enumerate(days):
        x = index * (DAY_WIDTH + DAY_GAP)
        y = 20 + 120
        segments = []
        for field, outcome, name, _ in ACTIVITY_SERIES:
            count = getattr(day, field)
            colour = outcome_colour(outcome)
            if not count:
                continue
            height = max(2, round(count * scale))
            y -= height
            segments.append({"y": y, "height": height, "colour": colour, "title": f"{count} {name}"})
        columns.append(
            {
                "x": x,
                "centre": x + DAY_WIDTH // 2,
                "top": y,
                "day": day,
                "segments": segments,
                "label": date_format(day.day, "j M"),
            }
        )
    return {
        "columns": columns,
        "bar_width": DAY_WIDTH,
        "width": max(len(days) * (DAY_WIDTH + DAY_GAP), 1),
        "height": 20 + 120 + 36,
        "baseline": 20 + 120,
    }


def dashboard(request: HttpRequest) -> TemplateResponse:
    if not request.user.has_perm("portals.view_portal"):
        raise PermissionDenied
    now = timezone.now()
    portals_url = reverse("admin:portals_portal_changelist")
    counts = selectors.state_counts()
    states = [
        {
            "label": PortalState(state).label,
            "count": count,
            "url": f"{portals_url}?{urlencode({'state__exact': state})}",
            "state": state,
        }
        for state, count in counts.items()
    ]
    by_licence = selectors.licence_counts()
    expired = by_licence.pop("payment_expired")
    licences = [
        {
            "label": AppStatus(status).label if status else "Not read yet",
            "count": count,
            "url": f"{portals_url}?{urlencode({'state__exact': PortalState.INSTALLED, 'app_status__exact': status})}",
            "status": status,
        }
        for status, count in sorted(by_licence.items(), key=lambda item: (-item[1], item[0]))
    ]
    licences.append(
        {
            "label": "Payment expired",
            "count": expired,
            "url": f"{portals_url}?{urlencode({'state__exact': PortalState.INSTALLED, 'payment_expired__exact': 1})}",
            "status": "payment_expired",
        }
    )
    health_counts = selectors.health_counts(now=now)
    health_cards = [
        {
            "label": health.card_label,
            "count": health_counts[health.key],
            "url": f"{portals_url}?{urlencode({'health': health.value})}",
            "key": health.key,
        }
        for health in HEALTH
    ]
    activity = selectors.renewal_activity(days=ACTIVITY_DAYS, now=now)
    context = {
        **admin.site.each_context(request),
        "title": "Installations dashboard",
        "palette": PALETTE,
        "now": now,
        "total_portals": sum(counts.values()),
        "states": states,
        "licences": licences,
        "health": health_cards,
        "chart": days_left_chart(selectors.days_left_histogram(now=now)),
        "lifetime_days": settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS,
        "margin_days": settings.BITRIX24_RENEW_MARGIN_DAYS,
        "activity": activity,
        "activity_chart": activity_chart(activity),
        "activity_legend": ACTIVITY_LEGEND,
        "activity_days": ACTIVITY_DAYS,
        "renewed_total": sum(day.renewed for day in activity),
        "failed_total": sum(day.failed for day in activity),
        "activity_total": sum(day.total for day in activity),
        "schedules": [SweepLine.of(entry) for entry in selectors.sweep_schedules(now=now)],
        "portals_url": portals_url,
        "renewals_url": reverse("admin:portals_renewallog_changelist"),
        "periodic_tasks_url": reverse("admin:django_celery_beat_periodictask_changelist"),
    }
    return TemplateResponse(request, "admin/portals/dashboard.html", context)
