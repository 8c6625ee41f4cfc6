"""`/metrics`: the counters of every process of this machine and gauges read from the database, for
Prometheus, to a scraper that presents BITRIX24_METRICS_TOKEN as a bearer token.

Counters (`portals.metrics`) are added up from the files each process writes (prometheus_client's
multiprocess mode), so the worker's renewals show in the web's scrape. Gauges about portals (by state,
and those flagged lost, failing, …) are read from the database at each scrape: the database is the truth
whichever process changed it, and nothing has to keep a gauge up to date.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable, Iterator

from django.conf import settings
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from . import metrics, selectors, spool

logger = logging.getLogger(__name__)


class DatabaseCollector(Collector):
    """Gauges read from the database when scraped."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "bitrix24_metrics_database_up", "1 when the database answered this scrape's queries, else 0."
        )
        try:
            states = selectors.state_counts()
            flags = selectors.health_counts()
        except DatabaseError as exc:
            # The counters are still worth a scrape; the gauges are left out rather than reported as zero.
            logger.warning("Metrics: database unavailable (%s); portal gauges left out", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        by_state = GaugeMetricFamily(
            "bitrix24_portals",
            "Portals by state (installed, pending, needs_reinstall, uninstalled).",
            labels=["state"],
        )
        for state, count in sorted(states.items()):
            by_state.add_metric([state], count)
        yield by_state
        flagged = GaugeMetricFamily(
            "bitrix24_portals_flagged",
            "Portals the dashboard flags: lost (a pair lost in an interrupted renewal), failing, "
            "no_usable_pair, lapsing (refresh token lapses within 2 days), due_soon, clock_skew.",
            labels=["flag"],
        )
        for flag, count in sorted(flags.items()):
            flagged.add_metric([flag], count)
        yield flagged
        try:
            lag = selectors.custody_lag()
            claims = selectors.uninstall_claims()
        except DatabaseError as exc:
            logger.warning("Metrics: custody gauges left out (%s)", type(exc).__name__)
            return
        behind = GaugeMetricFamily(
            "bitrix24_custody_lag_seconds",
            "How far custody is behind: since the oldest due pair became due (oldest_due_pair), since the "
            "oldest renewal still in flight started (oldest_unresolved_attempt); 0 when nothing waits.",
            labels=["what"],
        )
        for what, seconds in sorted(lag.items()):
            behind.add_metric([what], seconds)
        yield behind
        unsettled = GaugeMetricFamily(
            "bitrix24_uninstall_claims",
            "ONAPPUNINSTALL claims not settled: open (Bitrix24 being asked), held (no proof: waiting for staff).",
            labels=["state"],
        )
        for state, count in sorted(claims.items()):
            unsettled.add_metric([state], count)
        yield unsettled


class SpoolCollector(Collector):
    """What waits in the spool for the database (portals.spool): read from Redis and the local folder,
    so it is reported while the database is away, when it matters."""

    def collect(self) -> Iterator[Metric]:
        try:
            depth = spool.depth()
        except Exception as exc:  # a scrape must not fail for it
            logger.warning("Metrics: spool depth unknown (%s)", type(exc).__name__)
            return
        waiting = GaugeMetricFamily(
            "bitrix24_spool_entries",
            "Deliveries kept in the spool while the database was away, not moved in yet.",
        )
        waiting.add_metric([], depth.entries)
        yield waiting
        size = GaugeMetricFamily("bitrix24_spool_bytes", "Bytes the spool holds (encrypted entries).")
        size.add_metric([], depth.bytes)
        yield size
        age = GaugeMetricFamily(
            "bitrix24_spool_oldest_seconds", "Age of the oldest delivery waiting in the spool; 0 when none."
        )
        age.add_metric([], max(0.0, time.time() - depth.oldest) if depth.oldest else 0.0)
        yield age


class _ThisProcess(Collector):
    """The in-process registry's metrics, for a process that keeps its counts to itself."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def registry() -> CollectorRegistry:
    """What one scrape reports: every process's counters (or this one's) and the database's gauges."""
    scraped = CollectorRegistry(auto_describe=False)
    if metrics.multiprocess():
        MultiProcessCollector(scraped)
    else:
        scraped.register(_ThisProcess())
    scraped.register(DatabaseCollector())
    scraped.register(SpoolCollector())
    return scraped


def _authorized(request: HttpRequest, token: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # Compared in constant time, as bytes (a non-ASCII header must not raise).
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus (or OpenMetrics, as the scraper asks) text; 404 while BITRIX24_METRICS_TOKEN is unset,
    401 without the right bearer token."""
    token = settings.BITRIX24_METRICS_TOKEN
    if not token:
        raise Http404("metrics are off: BITRIX24_METRICS_TOKEN is not set")
    if not _authorized(request, token):
        response = HttpResponse("a bearer token is required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = HttpResponse(encoder(registry()), content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
