"""What operators count: the product's Prometheus counters, and one function per thing counted.

Every process of one machine (web, worker and its pool processes, beat) counts into its own file in
the folder named by PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode); `/metrics`
(`portals.exporter`) adds them up at scrape time, with gauges it reads from the database. The settings
set that folder (`var/metrics/` by default) before prometheus_client is first imported, which is when
the library reads it. A process without the variable keeps its counts to itself (an in-process registry).

This module sits at the bottom of the import layers, next to `portals.crypto`: renewal, the governor
and the services count here, so it imports nothing of the project. Counting never fails the work it
counts: a folder that went away costs a warning in the log, not a renewal.

Counters keep their label values small and fixed (renewal triggers and outcomes, refusal kinds and
codes, inbound kinds and statuses, event outcomes): a label taken from a request would let anyone add
series at will.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from typing import ParamSpec

from prometheus_client import Counter, values

logger = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

RENEWALS = Counter(
    "bitrix24_renewals",
    "Token renewals by what asked for them (beat, on_demand, staff, command) and how they ended "
    "(renewed, skipped, transient, refused), as the renewal log records them.",
    ["trigger", "outcome"],
)
VERIFICATION_REFUSALS = Counter(
    "bitrix24_verification_refusals",
    "Tokens, domains and application tokens that verification refused, by kind of refusal "
    "(not_accepted, not_here, stale) and exact code.",
    ["refusal", "code"],
)
INBOUND_REQUESTS = Counter(
    "bitrix24_inbound_requests",
    "Requests posted to /install/, /app/ and /events/ by kind (install, launch, event) and outcome "
    "(accepted, rejected, failed), as the inbound log records them.",
    ["kind", "status"],
)
# The outcomes an event handler reports; anything else is counted as "other".
EVENT_OUTCOMES = frozenset({"handled", "retry", "failed", "duplicate", "dropped"})
EVENTS_HANDLED = Counter(
    "bitrix24_events_handled",
    "Bitrix24 events by name and how their handling ended (handled, retry, failed, duplicate, dropped, other).",
    ["event", "outcome"],
)
_EVENT_NAME = re.compile(r"^ON[A-Z0-9_]{2,60}$")
BATCHES_RELEASED = Counter(
    "bitrix24_renewal_batches_released",
    "Renewal batches that gave pairs back to the sweep unrenewed, by cause (not_started, interrupted, "
    "database, not_queued; portals.batches).",
    ["cause"],
)


@functools.cache
def _governor_counters() -> tuple[Counter, Counter]:
    # Made on first use: in multiprocess mode a metric without labels opens its process's file when it
    # is made, and every process that never waits (commands, beat) would leave an empty one behind.
    return (
        Counter(
            "bitrix24_governor_waits",
            "REST calls that waited for their portal's rate limit (the shared leaky bucket) before sending.",
        ),
        Counter(
            "bitrix24_governor_wait_seconds",
            "Seconds REST calls waited for their portal's rate limit, in all.",
        ),
    )


P = ParamSpec("P")


def _never_fails(count: Callable[P, None]) -> Callable[P, None]:
    @functools.wraps(count)
    def counting(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            count(*args, **kwargs)
        except Exception:
            logger.warning("Could not count %s", count.__name__, exc_info=True)

    return counting


def multiprocess() -> bool:
    """Whether this process counts into the shared folder (else into its own, in-process registry)."""
    # prometheus_client picks its value class once, when first imported: that decides, not the variable now.
    return bool(os.environ.get(MULTIPROC_DIR_ENV)) and values.ValueClass is not values.MutexValue


@_never_fails
def renewal(trigger: str, outcome: str) -> None:
    """A renewal-log row was written (and committed): `outcome` is a RenewalOutcome."""
    RENEWALS.labels(trigger=str(trigger), outcome=str(outcome)).inc()


@_never_fails
def refusal(kind: str, code: str) -> None:
    """Verification refused something: `kind` is a verification.Refusal, `code` the exact reason."""
    VERIFICATION_REFUSALS.labels(refusal=str(kind), code=str(code)).inc()


@_never_fails
def inbound(kind: str, status: str) -> None:
    """An inbound request ended: `kind` is an InboundKind, `status` an InboundStatus."""
    INBOUND_REQUESTS.labels(kind=str(kind), status=str(status)).inc()


@_never_fails
def batch_released(cause: str) -> None:
    """A renewal batch gave pairs back to the sweep unrenewed (portals.batches: `cause` is one of its causes)."""
    BATCHES_RELEASED.labels(cause=cause).inc()


@_never_fails
def governor_waited(seconds: float) -> None:
    """A REST call waited `seconds` for its portal's rate limit."""
    waits, waited = _governor_counters()
    waits.inc()
    waited.inc(seconds)


@_never_fails
def event_handled(event: str, outcome: str) -> None:
    """A Bitrix24 event was handled: `event` its name (ONCRMDEALADD …), `outcome` one of
    EVENT_OUTCOMES ("handled", "retry", "failed", "duplicate"); any other outcome counts as "other".

    Call it once per delivery, after the event's verification: a name that does not look like an
    event counts as "(invalid)", but every well-formed name becomes a series of its own.
    """
    name = str(event).upper()
    EVENTS_HANDLED.labels(
        event=name if _EVENT_NAME.match(name) else "(invalid)",
        outcome=outcome if outcome in EVENT_OUTCOMES else "other",
    ).inc()
