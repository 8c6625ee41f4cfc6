"""Web requests hand token renewals to Celery workers (see portals.renewal.renewed).

A web worker can be killed by its server's timeout (gunicorn's, see config/gunicorn.py) at any moment;
a refresh cut there would lose the portal. So inside a request the renewal is queued for a worker and
waited for at most BITRIX24_WEB_TOKEN_WAIT_SECONDS; past that the request answers 503 with
Retry-After and the worker finishes the renewal.

Domain errors met by a request (DomainErrorAnswers) get their answer from portals.answers, not a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from . import answers, renewal, sources

logger = logging.getLogger(__name__)


class RequestSource:
    """The request's source (portals.sources), for whatever below verifies a token on its behalf."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        with sources.using(sources.source_of(request.META)):
            return self.get_response(request)


class RenewalsInWorkers:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        with renewal.renewals_in_workers(settings.BITRIX24_WEB_TOKEN_WAIT_SECONDS):
            return self.get_response(request)


class DomainErrorAnswers:
    """A domain error that reaches Django (from any view outside the install endpoints and the API, which
    answer from the same table themselves) gets its answer from portals.answers instead of a 500: a
    configuration error is 503 naming the setting to staff only, Bitrix24's refusal of a call 502, and so on."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        user = getattr(request, "user", None)
        staff = bool(user is not None and user.is_active and user.is_staff)
        answer = answers.answer_for(exception, staff=staff)
        if answer is None:
            return None  # a bug: Django's own 500
        if answer.ours:
            logger.error("%s on %s: %s", type(exception).__name__, request.path, exception)
        response = JsonResponse(answer.body(), status=answer.status)
        if answer.retry_after:
            response["Retry-After"] = str(answer.retry_after)
        return response
