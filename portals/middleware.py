"""Web requests hand token renewals to Celery workers (see portals.renewal.renewed).

A web worker can be killed by its server's timeout (gunicorn's, see config/gunicorn.py) at any moment;
a refresh cut there would lose the portal. So inside a request the renewal is queued for a worker and
waited for at most BITRIX24_WEB_TOKEN_WAIT_SECONDS; past that the request answers 503 with
Retry-After and the worker finishes the renewal.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from . import renewal


class RenewalsInWorkers:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        with renewal.renewals_in_workers(settings.BITRIX24_WEB_TOKEN_WAIT_SECONDS):
            return self.get_response(request)
