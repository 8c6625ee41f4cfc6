"""What leaves the process about errors and events: log records and error-tracker events, redacted.

`RedactTokensFilter` replaces anything token-like in a record with its fingerprint. Code never logs
tokens on purpose; this catches what a third-party library (or a traceback holding a URL with
`refresh_token=` in it) would otherwise write in clear.

`JsonFormatter` (DJANGO_LOG_FORMAT=json) writes one JSON object a line, redacted as a whole: it also
writes a record's extra fields, which the filter never sees (Django's request, Celery's task data).

`start_error_tracker` (SENTRY_DSN) reports errors with every string of the event redacted.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sentry_sdk
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.django import DjangoIntegration

from .masking import fingerprint, redact


class RedactTokensFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the caller's bug; let logging report it
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(_JsonFormatter):
    """python-json-logger's formatter, its whole line redacted (extra fields are not filtered)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# Keys whose string values are secrets whatever they look like: headers (X-Bitrix24-Auth, Authorization),
# form fields (AUTH_ID, auth[access_token]), the SDK's own fields.
_SECRET_KEY = re.compile(
    r"(?:^|[^a-z0-9])(?:auth|auth_id|refresh_id|authorization|token|secret|password)(?:$|[^a-z0-9])"
)


def _scrub(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, key) for v in value]
    if isinstance(value, str):
        if value and _SECRET_KEY.search(key.lower()):
            return f"<fp:{fingerprint(value)}>"
        return redact(value)
    return value


def redact_event(event: Any, hint: Any) -> Any:
    """The error tracker's `before_send`: every string in the event with its tokens replaced by
    fingerprints (messages, exception values, breadcrumbs, request URLs and headers)."""
    logentry = event.get("logentry")
    if isinstance(logentry, dict) and logentry.get("params"):
        # A log call's arguments arrive bare (a token alone, no key to know it by): the formatted
        # message, redacted, says the same.
        logentry["params"] = []
    return _scrub(event)


def start_error_tracker(dsn: str) -> None:
    """Report errors of the web, the worker and beat to the tracker at `dsn`.

    No personal data, no request bodies (Bitrix24 posts tokens in them), no local variables (tokens
    travel in them under every name); what is sent is redacted by `redact_event`. sentry-sdk reads
    SENTRY_ENVIRONMENT and SENTRY_RELEASE itself."""
    sentry_sdk.init(
        dsn=dsn,
        integrations=[DjangoIntegration(), CeleryIntegration()],
        send_default_pii=False,
        max_request_body_size="never",
        include_local_variables=False,
        before_send=redact_event,
    )
