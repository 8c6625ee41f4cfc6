"""A logging filter that replaces anything token-like in a record with its fingerprint.

Code never logs tokens on purpose; this catches what a third-party library (or a traceback
holding a URL with `refresh_token=` in it) would otherwise write in clear.
"""

from __future__ import annotations

import logging
import re

from .crypto import fingerprint

_PATTERN = re.compile(
    r"(?P<key>(?:access_token|refresh_token|application_token|client_secret|auth|AUTH_ID|REFRESH_ID|"
    r"APPLICATION_TOKEN|code)(?:\]|%5D)?[\"']?\s*[=:]\s*[\"']?)(?P<value>[A-Za-z0-9._\-]{8,})"
)


def redact(text: str) -> str:
    return _PATTERN.sub(lambda m: f"{m.group('key')}<fp:{fingerprint(m.group('value'))}>", text)


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
