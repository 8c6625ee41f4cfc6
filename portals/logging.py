"""A logging filter that replaces anything token-like in a record with its fingerprint.

Code never logs tokens on purpose; this catches what a third-party library (or a traceback
holding a URL with `refresh_token=` in it) would otherwise write in clear.
"""

from __future__ import annotations

import logging

from .masking import redact


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
