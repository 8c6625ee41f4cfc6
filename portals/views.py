from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from . import health


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness and readiness: the database answers and the broker is reachable."""
    result = health.check()
    response = JsonResponse(
        {
            "status": "ok" if result.ok else "unavailable",
            "database": result.database,
            "broker": result.broker,
        },
        status=200 if result.ok else 503,
    )
    if not result.ok:
        response["Retry-After"] = "10"
    return response
