"""Every API error as `{"error": code, "error_description": message}`, the shape the install endpoints
answer with; invalid input also carries `"fields"` (field name → messages). A domain error (no usable
tokens, Bitrix24 refusing a call, a configuration error …) is answered from portals.answers, the table the
launch and the middleware read too."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import set_rollback

from portals import answers

logger = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    """The request is valid but the portal's state does not allow it (for example: no usable tokens)."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "The portal's current state does not allow this."
    default_code = "conflict"


class Answered(exceptions.APIException):
    """A domain error as DRF's APIException, with the answer portals.answers gives it."""

    def __init__(self, answer: answers.Answer) -> None:
        super().__init__(answer.message, code=answer.code)
        self.status_code = answer.status
        self.wait = answer.retry_after


def _first_message(detail: Any) -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            message = _first_message(value)
            if message:
                return message if key == "non_field_errors" else f"{key}: {message}"
        return ""
    if isinstance(detail, list):
        for item in detail:
            message = _first_message(item)
            if message:
                return message
        return ""
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args) if exc.args else exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args) if exc.args else exceptions.PermissionDenied()

    if not isinstance(exc, exceptions.APIException):
        # A domain error: its answer from the one table. Which setting is wrong (a configuration error) only
        # to staff; the Django request's user is the one DRF authenticated, asking DRF again could re-raise.
        request = context.get("request")
        user = getattr(getattr(request, "_request", request), "user", None)
        staff = bool(user is not None and user.is_active and user.is_staff)
        answer = answers.answer_for(exc, staff=staff)
        if answer is not None:
            if answer.ours:
                logger.error("%s in the API: %s", type(exc).__name__, exc)
            set_rollback()
            retry = {"Retry-After": str(answer.retry_after)} if answer.retry_after else {}
            return Response(answer.body(), status=answer.status, headers=retry)

    if not isinstance(exc, exceptions.APIException):
        # A bug: logged with its traceback, answered as JSON like every other error.
        view = context.get("view")
        logger.exception("Unhandled error in %s", type(view).__name__ if view else "the API", exc_info=exc)
        set_rollback()
        return Response(
            {"error": "server_error", "error_description": "Internal error; it has been logged."},
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )

    headers: dict[str, str] = {}
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        headers["WWW-Authenticate"] = auth_header
    wait = getattr(exc, "wait", None)
    if wait:
        headers["Retry-After"] = f"{int(wait)}"

    data: dict[str, Any]
    if isinstance(exc, exceptions.ValidationError):
        detail = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        data = {
            "error": "invalid",
            "error_description": _first_message(detail) or "The request is not valid.",
            "fields": detail,
        }
    else:
        codes = exc.get_codes()
        data = {
            "error": codes if isinstance(codes, str) else exc.default_code,
            "error_description": _first_message(exc.detail),
        }
    set_rollback()
    return Response(data, status=exc.status_code, headers=headers)
