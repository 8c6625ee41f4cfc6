"""Keep every inbound request before trusting it, and answer it the same way every time.

The row is written first, outside any transaction, as soon as the request is parsed and before
anything in it is verified or acted upon (`record_request`); the handler runs its own transactions; the
outcome (or the failure) is written on the row afterwards, so a rollback never hides a request. Two
writes a request: the description, then the outcome (a request that cannot even be parsed: one).
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone, translation

from portals import answers, metrics, outage, sources, statements
from portals.masking import fingerprint, redact
from portals.verification import TooManyUnverified, VerificationError

from .models import InboundKind, InboundRequest, InboundStatus
from .parsing import BadRequest
from .placements import language

logger = logging.getLogger(__name__)

# Errors that say the request did not prove it came from Bitrix24.
VERIFICATION_REFUSALS = (VerificationError, TooManyUnverified)

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
# A request that did not prove itself (refused, unverified, an anonymous ONAPPPAYMENT, one kept for later
# verification) or that nothing handles (an event without a handler) leaves a bounded summary, a few hundred
# bytes whatever it sent: anyone can post 250 KB of junk, and the log must not grow with it (storage follows
# trust). Only a verified request that was carried out keeps its whole redacted body.
SUMMARY_KEYS = 10  # entries kept per level
SUMMARY_DEPTH = 2
SUMMARY_KEY = 40  # characters of a key name
SUMMARY_VALUE = 40  # characters of a value
SUMMARY_BYTES = 300  # JSON size of the kept body (and of the kept query)
HEADER_BYTES = 100  # of each kept header
# Only a name shaped like a Bitrix24 event is kept: the column is indexed and staff filter on it.
EVENT_NAME = re.compile(r"^ON[A-Z0-9_]{2,60}$")
INVALID_EVENT = "(invalid)"


def printable(text: str) -> str:
    """PostgreSQL refuses NUL in text and JSON, and no database encodes a lone surrogate: keep them
    visible instead of losing the row."""
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


def _cut(text: str, limit: int) -> str:
    text = printable(text)
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit})"


def _fit(text: str, budget: int) -> str:
    """`text` cut so that its stored form (JSON, non-ASCII escaped: up to 6 bytes a character) stays
    within `budget` bytes."""
    text = printable(text)
    keep = min(len(text), budget)
    while keep and len(json.dumps(text[:keep])) > budget:
        keep //= 2
    return text if keep == len(text) else text[:keep] + f"…(+{len(text) - keep})"


def _bounded(value: Any, depth: int) -> Any:
    if isinstance(value, dict):
        if depth >= SUMMARY_DEPTH:
            return f"{{…{len(value)} keys}}"
        kept: dict[str, Any] = {}
        for key, child in list(value.items())[:SUMMARY_KEYS]:
            kept[_cut(str(key), SUMMARY_KEY)] = _bounded(child, depth + 1)
        if len(value) > SUMMARY_KEYS:
            kept["_keys"] = len(value)
        return kept
    if isinstance(value, list):
        if depth >= SUMMARY_DEPTH:
            return f"[…{len(value)} items]"
        items = [_bounded(child, depth + 1) for child in value[:SUMMARY_KEYS]]
        if len(value) > SUMMARY_KEYS:
            items.append(f"…(+{len(value) - SUMMARY_KEYS} items)")
        return items
    if isinstance(value, str):
        return _cut(value, SUMMARY_VALUE)
    if isinstance(value, (bool, type(None))):
        return value
    return _cut(str(value), SUMMARY_VALUE)  # numbers too: a 4,000-digit integer is just text here


def summarize(value: Any, *, size: int | None, count: int | None = None) -> dict[str, Any]:
    """A bounded copy of an (already redacted) parsed body or query: at most SUMMARY_KEYS entries a
    level, SUMMARY_DEPTH levels, short keys and values, SUMMARY_BYTES in all; with the number of
    top-level keys and the size it came in."""
    if count is None:
        count = len(value) if isinstance(value, dict) else 0
    if not count and not size:
        return {}
    summary: dict[str, Any] = {"_keys": count, "_bytes": size}
    kept = _bounded(value, 0) if isinstance(value, dict) else {}
    kept.pop("_keys", None)
    if len(json.dumps({**summary, **kept})) > SUMMARY_BYTES:
        # Still too big (long keys at every level): the first key names only, then nothing.
        kept = {"_names": [_cut(str(k), SUMMARY_KEY) for k in list(value)[:SUMMARY_KEYS]]}
        if len(json.dumps(kept)) > SUMMARY_BYTES:
            kept = {}
    return {**summary, **kept}


def _raw_preview(request: HttpRequest) -> dict[str, Any]:
    """What to keep of a body that could not be parsed: redacted text, cut short."""
    try:
        raw = request.body
    except Exception:  # RequestDataTooBig and friends: the body is not readable at all
        return {"_unreadable": "body too large or unreadable"}
    if not raw:
        return {}
    text = redact(raw[:SUMMARY_BYTES].decode("utf-8", errors="replace"))
    return {"_bytes": len(raw), "_raw": _fit(text, SUMMARY_BYTES // 2)}


def _sizes(request: HttpRequest) -> tuple[int, int | None]:
    """Sizes of the query string and the body, for the summary of a request that is not accepted."""
    try:
        body: int | None = len(request.body)
    except Exception:  # a body too large to read has no size worth keeping
        body = None
    return len(request.META.get("QUERY_STRING", "")), body


def event_name(claimed: str) -> str:
    """The claimed event name when it looks like one; junk becomes one fixed marker."""
    if not claimed:
        return ""
    return claimed if EVENT_NAME.match(claimed) else INVALID_EVENT


def wants_html(request: HttpRequest) -> bool:
    return "text/html" in request.META.get("HTTP_ACCEPT", "")


def error_response(
    request: HttpRequest, *, status: int, code: str, message: str, html: bool, frame_origin: str = ""
) -> HttpResponse:
    if html:
        # In the portal user's language when the frame said it (LANG in the query string).
        with translation.override(language(request.GET.get("LANG", ""))):
            response = render(
                request,
                "install/error.html",
                {"status": status, "code": code, "message": message},
                status=status,
            )
        set_frame_policy(response, frame_origin)
        return response
    return JsonResponse({"error": code, "error_description": message}, status=status)


def set_frame_policy(response: HttpResponse, origin: str) -> None:
    """Frameable by the portal's own origin only; by nobody when the portal is not known."""
    response.xframe_options_exempt = True  # type: ignore[attr-defined]
    response["Content-Security-Policy"] = f"frame-ancestors {origin or chr(39) + 'none' + chr(39)}"


@dataclass
class Inbound:
    """One request on its way through `receive`: its log row and what the handler learns about it, passed
    along instead of kept on the model."""

    row: InboundRequest
    sizes: tuple[int | None, int | None] = (None, None)  # of the query string and the body, as received
    # The whole redacted request, kept on the row only once it is processed (`record_request` sets it).
    full: tuple[dict[str, Any], dict[str, Any]] | None = None
    # The portal's origin, once the frame claims a portal this backend serves: who may frame an error page.
    frame_origin: str = ""
    body_replaced: bool = False
    # True once the request proved to come from Bitrix24 (`verified()`), False when it was refused as not,
    # None when nothing proved it either way (an anonymous ONAPPPAYMENT, an event kept for later).
    valid: bool | None = None
    # Worth its whole body once verified and carried out: not an event nothing handles (`summary_only()`).
    whole: bool = True
    # The database was away: the request went to the spool (install.deferred) and no row can be written.
    spooled: bool = False

    def verified(self) -> None:
        self.valid = True

    def summary_only(self) -> None:
        self.whole = False


Handler = Callable[[HttpRequest, Inbound], HttpResponse]

# At most this much of a failure's traceback is kept on the row.
TRACEBACK_BYTES = 8000


def _outcome(*, processed: bool, ours: bool) -> str:
    """The row's one-word status, from its facts: processed is accepted, a failure of ours (or Bitrix24's)
    is failed, the caller's is rejected."""
    if processed:
        return InboundStatus.ACCEPTED
    return InboundStatus.FAILED if ours else InboundStatus.REJECTED


def _traceback() -> str:
    return redact(traceback.format_exc())[-TRACEBACK_BYTES:]


class LogUnavailable(Exception):
    """The inbound row cannot be written: nothing in the request may be trusted or stored."""


def _busy(request: HttpRequest, kind: str, html: bool) -> HttpResponse:
    # Nothing can be trusted or stored without the log row: ask the sender to come back.
    logger.exception("Cannot record an inbound %s request", kind)
    response = error_response(
        request, status=503, code="busy", message="the backend cannot store requests right now", html=html
    )
    response["Retry-After"] = "10"
    metrics.inbound(kind, InboundStatus.FAILED)
    return response


def receive(request: HttpRequest, *, kind: str, handler: Handler) -> HttpResponse:
    """Log, run the handler, record the outcome; map known failures to 4xx answers."""
    html = kind != InboundKind.EVENT and wants_html(request)
    if request.method != "POST":
        if wants_html(request):
            # A person who opened one of these URLs in a browser (the events URL too): say what it is for
            # and that Bitrix24 calls it with POST. Programs keep the JSON answer; both are 405.
            response = render(
                request, "install/post_only.html", {"kind": kind, "path": request.path}, status=405
            )
            set_frame_policy(response, "")
        else:
            response = error_response(
                request, status=405, code="method_not_allowed", message="use POST", html=False
            )
        response["Allow"] = "POST"
        return response
    # Written by record_request() once the request is parsed, before the handler trusts anything in it.
    row = InboundRequest(
        kind=kind,
        remote_addr=request.META.get("REMOTE_ADDR") or None,
        source=sources.current()[:64],  # set by portals.middleware.RequestSource
        headers={h: _fit(request.headers[h], HEADER_BYTES) for h in KEPT_HEADERS if h in request.headers},
    )
    inbound = Inbound(row=row, sizes=_sizes(request))
    ours, error, trace = False, "", ""
    try:
        response = handler(request, inbound)
        row.processed = True
    except LogUnavailable:
        return _busy(request, kind, html)
    except BadRequest as exc:
        if not row.body and not row.query:
            row.body = _raw_preview(request)
            inbound.body_replaced = True
        error = str(exc)
        response = error_response(request, status=exc.status, code=exc.code, message=str(exc), html=html)
    except Exception as exc:
        # A domain error gets its answer from the one table (portals.answers), as in the API. Which setting
        # is wrong (ImproperlyConfigured) is for staff, in the log row and the server log, not for the caller.
        answer = answers.answer_for(exc)
        error = str(exc)
        if isinstance(exc, VERIFICATION_REFUSALS):
            inbound.valid = False
        if answer is not None:
            ours = answer.ours
            if ours:
                logger.error("Inbound %s #%s not handled: %s", kind, row.pk, redact(str(exc)))
                trace = _traceback()
            response = error_response(
                request,
                status=answer.status,
                code=answer.code,
                message=answer.message,
                html=html,
                # A refused frame may still be shown by the portal that framed it.
                frame_origin=inbound.frame_origin,
            )
            if answer.retry_after:
                response["Retry-After"] = str(answer.retry_after)
        else:
            logger.exception("Unexpected failure handling inbound %s #%s", kind, row.pk)
            ours, error, trace = True, f"{type(exc).__name__}: {redact(str(exc))}", _traceback()
            response = error_response(
                request,
                status=500,
                code="internal_error",
                message="internal error; it has been logged",
                html=html,
            )
    if inbound.spooled:
        # Nothing to write the outcome to: the spool entry is the record until the database is back.
        metrics.inbound(kind, "spooled" if response.status_code == 200 else InboundStatus.FAILED)
        return response
    status = _outcome(processed=row.processed, ours=ours)
    row.status = status
    row.valid = inbound.valid
    row.traceback = trace
    row.error = printable(error)[:500]
    row.http_status = response.status_code
    row.finished_at = timezone.now()
    changed = ["status", "valid", "processed", "traceback", "error", "http_status", "finished_at"]
    if row.processed and inbound.valid and inbound.whole and inbound.full is not None:
        # Verified and carried out: the whole redacted request is worth keeping (bounded by record_request()).
        row.query, row.body = inbound.full
        changed += ["query", "body"]
    elif inbound.body_replaced:
        changed.append("body")
    try:
        if row.pk is None:
            # Refused before it could be recorded (unparseable): the row is written once, now.
            row.save(force_insert=True)
            changed = []
        # Only what changed: rewriting an unchanged body would leave a dead copy behind on PostgreSQL.
        if changed and not statements.update(row, changed):
            # The row went while the request ran (an uninstall with CLEAN deletes the portal's log, this
            # row included): write it again, so the uninstall itself stays on record.
            row.save(force_insert=True)
    except Exception:
        # The answer is decided; losing the outcome on the log row must not turn it into a 500.
        logger.exception("Could not record the outcome of inbound %s #%s", kind, row.pk)
    metrics.inbound(kind, status)
    return response


def _kept(redacted: dict[str, Any]) -> dict[str, Any]:
    """What an accepted request keeps: all of it, redacted, unless that is over 50 KB."""
    if len(json.dumps(redacted)) > 50_000:
        names = [_cut(str(k), 100) for k in sorted(redacted)[:100]]
        return {"_truncated": "body too large to keep", "_keys": len(redacted), "keys": names}
    return redacted


def record_request(inbound: Inbound, *, query: dict[str, Any], body: dict[str, Any], **fields: str) -> None:
    """Write the parsed request (redacted) to its log row before it is acted upon: the row's first write.

    Until the request is accepted the row holds only a bounded summary; the whole redacted request
    (at most about 50 KB) is written when it is processed (receive()). Writing the summary first means a
    refused request never leaves a large row, nor a large dead row version on PostgreSQL.
    """
    row = inbound.row
    query_size, body_size = inbound.sizes
    redacted_query, redacted_body = redact_params(query), redact_params(body)
    inbound.full = (_kept(redacted_query), _kept(redacted_body))
    # redact_params keeps 200 keys a level: the count is the request's own.
    row.query = summarize(redacted_query, size=query_size, count=len(query))
    row.body = summarize(redacted_body, size=body_size, count=len(body))
    for name, value in fields.items():
        text_value = str(value)
        if name == "event":
            text_value = event_name(text_value)
        field = InboundRequest._meta.get_field(name)
        limit = getattr(field, "max_length", None) or 255
        setattr(row, name, printable(text_value)[:limit])
    if row.pk is not None:
        row.save()
        return
    if outage.skip_database():
        # It failed moments ago: asking again would cost this request the connect timeout (portals.outage).
        raise LogUnavailable("the database failed moments ago")
    try:
        statements.insert(row)  # the request's first write
    except (OperationalError, InterfaceError) as exc:
        outage.failed_if_lost()
        raise LogUnavailable from exc
    except DatabaseError as exc:
        raise LogUnavailable from exc
    outage.database_answered()
