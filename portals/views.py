from __future__ import annotations

import logging

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from . import health

logger = logging.getLogger(__name__)


def _is_staff(request: HttpRequest) -> bool:
    # The session is in the database: when that is what failed, nobody can be recognised as staff (and
    # asking must not turn the probe's 503 into a 500).
    try:
        user = request.user
        return bool(user.is_active and user.is_staff)
    except Exception:
        return False


def healthz(request: HttpRequest) -> JsonResponse:
    """Readiness, for load balancers: the database (or, while it is away, the spool) and the broker answer,
    and the token keys work.

    Anonymous callers (load balancers) learn only ok / unavailable: which database, which broker and what
    is misconfigured is for staff (a logged-in staff session, while the database answers), /api/health/
    and the server log.
    """
    result = health.check()
    # "degraded": the database is away and the spool keeps deliveries for it; ready all the same.
    body = {"status": "ok" if result.database_ok else "degraded"} if result.ok else {"status": "unavailable"}
    if not result.ok or not result.database_ok:
        logger.warning(
            "Health check %s: database=%s broker=%s keys=%s spool=%s",
            body["status"],
            result.database,
            result.broker,
            result.keys,
            result.spool or "none",
        )
    if result.database == health.connection_vendor() and _is_staff(request):
        body.update(database=result.database, broker=result.broker, keys=result.keys)
    response = JsonResponse(body, status=200 if result.ok else 503)
    if not result.ok:
        response["Retry-After"] = "10"
    return response


@require_safe
def livez(request: HttpRequest) -> JsonResponse:
    """Liveness, for restarts: this process answers. Nothing else is asked (not the database, not the
    broker): a process manager must not restart every web process because PostgreSQL is away; /healthz
    (readiness) is what a load balancer asks."""
    return JsonResponse({"status": "ok"})


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    """`/`: what this backend is, with links to the admin, the API schema and health, the URLs to give
    Bitrix24, and (in development) how to try it with the stand-in. A person who opens the site's root
    used to get Django's 404 page."""
    standin_oauth = f"http://127.0.0.1:{settings.BITRIX24_STANDIN_OAUTH_PORT}"
    context = {
        "base": request.build_absolute_uri("/").rstrip("/"),
        "debug": settings.DEBUG,
        "standin": standin_oauth in settings.BITRIX24_OAUTH_SERVERS,
        "standin_oauth_port": settings.BITRIX24_STANDIN_OAUTH_PORT,
        "standin_portal_port": settings.BITRIX24_STANDIN_PORTAL_PORT,
    }
    return render(request, "portals/home.html", context)
