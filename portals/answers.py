"""One table from domain errors to answers: HTTP status, error code, message and Retry-After.

The domain errors carry no HTTP (portals.errors, the verification errors of portals.services,
portals.client.RestError). Whoever answers a request reads this table: the install frame, the launch and
the events (install.inbound), the REST API and the app's frontend endpoints (api.exceptions), and any
other view (portals.middleware.DomainErrorAnswers). So one error gets one answer wherever it is met:
`NoUsablePair` is `409 no_usable_pair` on a launch, in the staff API and on a frontend endpoint alike.

An error that is not in the table is a bug: the callers answer 500 and log it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from django.core.exceptions import ImproperlyConfigured

from . import errors
from .client import RestError
from .verification import Refusal, TooManyUnverified, UpstreamUnavailable, VerificationError


@dataclass(frozen=True)
class Answer:
    status: int
    code: str
    message: str
    retry_after: int | None = None
    # The backend's or Bitrix24's failure rather than the caller's: the inbound log records it as failed.
    ours: bool = False

    def body(self) -> dict[str, str]:
        """The JSON every surface answers with."""
        return {"error": self.code, "error_description": self.message}


REFUSAL_STATUS = {Refusal.NOT_ACCEPTED: 401, Refusal.NOT_HERE: 403, Refusal.STALE: 409}
NOT_CONFIGURED = "the backend is not configured"
# Seconds to wait before asking again.
RETRY_UPSTREAM = 15
RETRY_NOT_CONFIGURED = 60


def _verification(exc: VerificationError, staff: bool) -> Answer:
    return Answer(REFUSAL_STATUS[exc.refusal], exc.code, str(exc))


def _upstream(exc: UpstreamUnavailable, staff: bool) -> Answer:
    return Answer(503, "bitrix24_unavailable", str(exc), RETRY_UPSTREAM, ours=True)


def _too_many(exc: TooManyUnverified | errors.TooManyEvents, staff: bool) -> Answer:
    return Answer(429, "too_many_requests", str(exc), int(exc.retry_after))


def _portal_busy(exc: errors.PortalBusy, staff: bool) -> Answer:
    return Answer(503, "portal_busy", str(exc), max(1, math.ceil(exc.wait)), ours=True)


def _no_usable_pair(exc: errors.NoUsablePair, staff: bool) -> Answer:
    return Answer(409, "no_usable_pair", str(exc))


def _renewal_pending(exc: errors.RenewalPending, staff: bool) -> Answer:
    return Answer(503, "renewal_pending", str(exc), exc.retry_after, ours=True)


def _renewal_failed(exc: errors.RenewalFailed, staff: bool) -> Answer:
    if exc.transient:
        return Answer(
            503, "bitrix24_unavailable", f"Renewing the token failed for now: {exc}", RETRY_UPSTREAM, True
        )
    return Answer(409, "renewal_refused", f"The portal's token was refused: {exc}")


def _rest_error(exc: RestError, staff: bool) -> Answer:
    return Answer(502, exc.code or "bitrix24_error", str(exc) or "Bitrix24 refused the call.", ours=True)


def _not_configured(exc: ImproperlyConfigured, staff: bool) -> Answer:
    # Which setting is wrong is staff's business, not whoever posted.
    return Answer(
        503, "not_configured", str(exc) if staff else NOT_CONFIGURED, RETRY_NOT_CONFIGURED, ours=True
    )


Rule = Callable[[BaseException, bool], Answer]
TABLE: dict[type[BaseException], Rule] = {
    VerificationError: _verification,  # type: ignore[dict-item]
    UpstreamUnavailable: _upstream,  # type: ignore[dict-item]
    TooManyUnverified: _too_many,  # type: ignore[dict-item]
    errors.TooManyEvents: _too_many,  # type: ignore[dict-item]
    errors.NoUsablePair: _no_usable_pair,  # type: ignore[dict-item]
    errors.PortalBusy: _portal_busy,  # type: ignore[dict-item]
    errors.RenewalPending: _renewal_pending,  # type: ignore[dict-item]
    errors.RenewalFailed: _renewal_failed,  # type: ignore[dict-item]
    RestError: _rest_error,  # type: ignore[dict-item]
    ImproperlyConfigured: _not_configured,  # type: ignore[dict-item]
}


def answer_for(exc: BaseException, *, staff: bool = False) -> Answer | None:
    """The answer to give for `exc` (its closest class in the table), or None when it is not a domain error."""
    for cls in type(exc).__mro__:
        rule = TABLE.get(cls)
        if rule is not None:
            return rule(exc, staff)
    return None
