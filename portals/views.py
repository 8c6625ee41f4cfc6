from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from . import health


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness and readiness: the database and the broker answer, and the token keys work.

    Anonymous callers (load balancers) learn only ok / unavailable: which database, which broker and
    what is misconfigured is for staff (a logged-in staff session) and /api/health/.
    """
    result = health.check()
    body = {"status": "ok" if result.ok else "unavailable"}
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        body.update(database=result.database, broker=result.broker, keys=result.keys)
    response = JsonResponse(body, status=200 if result.ok else 503)
    if not result.ok:
        response["Retry-After"] = "10"
    return response
