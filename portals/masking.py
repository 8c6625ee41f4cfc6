"""What people and logs may see of a token: a fingerprint, or a masked form.

The one public helper for redaction, used by the admin, the API, the inbound log and the logging
filter; it needs no key, so nothing above `portals` has to reach into `portals.crypto`.
"""

from __future__ import annotations

import hashlib
import re

_PATTERN = re.compile(
    r"(?P<key>(?:access_token|refresh_token|application_token|client_secret|auth|AUTH_ID|REFRESH_ID|"
    r"APPLICATION_TOKEN|code)(?:\]|%5D)?[\"']?\s*[=:]\s*[\"']?)(?P<value>[A-Za-z0-9._\-]{8,})",
    # Keys in any case: `auth_id=` in a message is as secret as `AUTH_ID=` in a form.
    re.IGNORECASE,
)


def fingerprint(token: str | None) -> str:
    """A short, stable, non-reversible name for a token: enough to tell two tokens apart in logs."""
    if not token:
        return ""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def mask(token: str | None) -> str:
    """What people may see of a token: its first four characters, its length and fingerprint."""
    if not token:
        return "—"
    return f"{token[:4]}…({len(token)} chars, fp {fingerprint(token)})"


def redact(text: str) -> str:
    """`text` with every value that follows a token-like key replaced by its fingerprint."""
    return _PATTERN.sub(lambda m: f"{m.group('key')}<fp:{fingerprint(m.group('value'))}>", text)
