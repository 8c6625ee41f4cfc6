"""Web requests hand token renewals to Celery workers (see portals.renewal.renewed).

A web worker can be killed by its server's timeout (gunicorn's, see config/gunicorn.py) at any moment;
a refresh cut there would lose the portal. So inside a request the renewal is queued for a worker and
waited for at most BITRIX24_WEB_TOKEN_WAIT_SECONDS; past that the request answers 503 with
Retry-After and the worker finishes the renewal.

Configuration errors met by a request (NotConfiguredAnswers) answer 503, naming the setting to staff only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse

from . import renewal

logger = logging.getLogger(__name__)


class RenewalsInWorkers:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        with renewal.renewals_in_workers(settings.BITRIX24_WEB_TOKEN_WAIT_SECONDS):
            return self.get_response(request)


class NotConfiguredAnswers:
    """A request that meets a configuration error (token keys that do not work, missing credentials)
    answers 503, not 500. Staff are told which setting is wrong; anyone else only that the backend is
    not configured (a configuration is nobody else's business)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, ImproperlyConfigured):
            return None
        logger.error("Configuration error on %s: %s", request.path, exception)
        return not_configured_response(request, exception)


def not_configured_response(request: HttpRequest, exception: Exception) -> JsonResponse:
    user = getattr(request, "user", None)
    staff = user is not None and user.is_active and user.is_staff
    response = JsonResponse(
        {
            "error": "not_configured",
            "error_description": str(exception) if staff else "the backend is not configured",
        },
        status=503,
    )
    response["Retry-After"] = "60"
    return response
