"""Keep every inbound request before trusting it, and answer it the same way every time.

The row is written first, outside any transaction; the handler runs its own transactions; the
outcome (or the failure) is written on the row afterwards, so a rollback never hides a request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone

from portals.errors import NoUsablePair, RenewalPending
from portals.masking import fingerprint, redact
from portals.services import TooManyUnverified, UpstreamUnavailable, VerificationError

from .models import InboundKind, InboundRequest, InboundStatus
from .parsing import BadRequest

logger = logging.getLogger(__name__)

SECRET_KEYS = {
    "access_token",
    "refresh_token",
    "application_token",
    "auth_id",
    "refresh_id",
    "client_secret",
    "code",
    "auth",
}
KEPT_HEADERS = ("User-Agent", "Content-Type", "Content-Length", "X-Forwarded-For", "Origin", "Referer")
MAX_VALUE = 500


def printable(text: str) -> str:
    """PostgreSQL refuses NUL in text and JSON: keep it visible instead of losing the row."""
    return text.replace("\x00", "\\x00")


def redact_params(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {printable(str(k)[:100]): redact_params(v, str(k)) for k, v in list(value.items())[:200]}
    if isinstance(value, list):
        return [redact_params(v, key) for v in value[:200]]
    if key.lower() in SECRET_KEYS and isinstance(value, (str, int)) and value != "":
        return f"<redacted fp:{fingerprint(str(value))}>"
    if isinstance(value, str):
        if len(value) > MAX_VALUE:
            value = value[:MAX_VALUE] + f"…(+{len(value) - MAX_VALUE} chars)"
        return printable(value)
    return value


def _raw_preview(request: HttpRequest) -> dict[str, str]:
    """What to keep of a body that could not be parsed: redacted text, cut short."""
    try:
        raw = request.body[:2000]
    except Exception:  # RequestDataTooBig and friends: the body is not readable at all
        return {"_unreadable": "body too large or unreadable"}
    return {"_raw": printable(redact(raw.decode("utf-8", errors="replace")))}


def wants_html(request: HttpRequest) -> bool:
    return "text/html" in request.META.get("HTTP_ACCEPT", "")


def error_response(
    request: HttpRequest, *, status: int, code: str, message: str, html: bool, frame_origin: str = ""
) -> HttpResponse:
    if html:
        response = render(
            request, "install/error.html", {"status": status, "code": code, "message": message}, status=status
        )
        set_frame_policy(response, frame_origin)
        return response
    return JsonResponse({"error": code, "error_description": message}, status=status)


def set_frame_policy(response: HttpResponse, origin: str) -> None:
    """Frameable by the portal's own origin only; by nobody when the portal is not known."""
    response.xframe_options_exempt = True  # type: ignore[attr-defined]
    response["Content-Security-Policy"] = f"frame-ancestors {origin or chr(39) + 'none' + chr(39)}"


Handler = Callable[[HttpRequest, InboundRequest], HttpResponse]


def receive(request: HttpRequest, *, kind: str, handler: Handler) -> HttpResponse:
    """Log, run the handler, record the outcome; map known failures to 4xx answers."""
    html = kind != InboundKind.EVENT and wants_html(request)
    if request.method != "POST":
        response = error_response(
            request, status=405, code="method_not_allowed", message="use POST", html=html
        )
        response["Allow"] = "POST"
        return response
    try:
        row = InboundRequest.objects.create(
            kind=kind,
            remote_addr=request.META.get("REMOTE_ADDR") or None,
            headers={h: printable(request.headers[h][:300]) for h in KEPT_HEADERS if h in request.headers},
        )
    except DatabaseError:
        # Nothing can be trusted or stored without the log row: ask the sender to come back.
        logger.exception("Cannot record an inbound %s request", kind)
        response = error_response(
            request, status=503, code="busy", message="the backend cannot store requests right now", html=html
        )
        response["Retry-After"] = "10"
        return response
    frame_origin = ""
    try:
        response = handler(request, row)
        status, error = InboundStatus.ACCEPTED, ""
    except BadRequest as exc:
        if not row.body and not row.query:
            row.body = _raw_preview(request)
        status, error = InboundStatus.REJECTED, str(exc)
        response = error_response(request, status=exc.status, code=exc.code, message=str(exc), html=html)
    except VerificationError as exc:
        status, error = InboundStatus.REJECTED, str(exc)
        frame_origin = getattr(row, "_frame_origin", "")
        response = error_response(
            request, status=exc.status, code=exc.code, message=str(exc), html=html, frame_origin=frame_origin
        )
    except NoUsablePair as exc:
        status, error = InboundStatus.REJECTED, str(exc)
        response = error_response(request, status=409, code="no_usable_tokens", message=str(exc), html=html)
    except ImproperlyConfigured as exc:
        # The backend itself is not set up (no BITRIX24_CLIENT_ID/SECRET): say so, do not pretend a 500.
        logger.error("Inbound %s #%s cannot be verified: %s", kind, row.pk, exc)
        status, error = InboundStatus.FAILED, str(exc)
        response = error_response(request, status=503, code="not_configured", message=str(exc), html=html)
    except TooManyUnverified as exc:
        status, error = InboundStatus.REJECTED, str(exc)
        response = error_response(request, status=429, code="too_many_requests", message=str(exc), html=html)
        response["Retry-After"] = str(exc.retry_after)
    except (UpstreamUnavailable, RenewalPending) as exc:
        status, error = InboundStatus.FAILED, str(exc)
        response = error_response(
            request, status=503, code="bitrix24_unavailable", message=str(exc), html=html
        )
        response["Retry-After"] = "30"
    except Exception as exc:
        logger.exception("Unexpected failure handling inbound %s #%s", kind, row.pk)
        status, error = InboundStatus.FAILED, f"{type(exc).__name__}: {redact(str(exc))}"
        response = error_response(
            request,
            status=500,
            code="internal_error",
            message="internal error; it has been logged",
            html=html,
        )
    row.status = status
    row.error = printable(error)[:500]
    row.http_status = response.status_code
    row.finished_at = timezone.now()
    try:
        row.save()
    except Exception:
        # The answer is decided; losing the outcome on the log row must not turn it into a 500.
        logger.exception("Could not record the outcome of inbound %s #%s", kind, row.pk)
    return response


def describe(row: InboundRequest, *, query: dict[str, Any], body: dict[str, Any], **fields: str) -> None:
    """Store the parsed request (redacted) on its row before it is acted upon."""
    row.query = redact_params(query)
    row.body = redact_params(body)
    if len(json.dumps(row.body)) > 50_000:
        row.body = {"_truncated": "body too large to keep", "keys": sorted(map(str, body))[:100]}
    for name, value in fields.items():
        field = InboundRequest._meta.get_field(name)
        limit = getattr(field, "max_length", None) or 255
        setattr(row, name, printable(str(value))[:limit])
    row.save()
