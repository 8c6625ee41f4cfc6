"""How long a stopping process may take, and how long a web request may wait for a token.

The process manager (bin/run → config/supervisord.conf), gunicorn (config/gunicorn.py) and the
settings must agree on these figures, and the first two read them before Django is set up: so this
module reads the environment itself and imports nothing of Django.
"""

from __future__ import annotations

import math
import os

CONNECT_TIMEOUT_DEFAULT = 5.0
OAUTH_READ_TIMEOUT_DEFAULT = 60.0
WEB_TOKEN_WAIT_DEFAULT = 10
# After the OAuth server answers: writing the second copy and storing the pair (milliseconds when the
# database is there; when it is not, the second copy already holds the pair and a kill loses nothing),
# the task's acknowledgement and the process's own exit.
STORE_AND_EXIT_MARGIN_SECONDS = 25
# A web request that waited for a renewal still has its own work to do.
WEB_REQUEST_MARGIN_SECONDS = 20


def _number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number") from exc


def stop_grace_seconds() -> int:
    """The longest a refresh can take once a stop was asked for: no new OAuth attempt starts after a
    stop (portals.http), so at most the one in flight, its connect and read timeouts, then storing.
    Process managers must wait this long before they kill: a kill in between loses the portal."""
    attempt = _number("BITRIX24_CONNECT_TIMEOUT", CONNECT_TIMEOUT_DEFAULT) + _number(
        "BITRIX24_OAUTH_READ_TIMEOUT", OAUTH_READ_TIMEOUT_DEFAULT
    )
    return math.ceil(attempt) + STORE_AND_EXIT_MARGIN_SECONDS


def web_token_wait_seconds() -> int:
    """BITRIX24_WEB_TOKEN_WAIT_SECONDS: the longest a web request waits for a token renewal."""
    raw = os.environ.get("BITRIX24_WEB_TOKEN_WAIT_SECONDS", "").strip()
    if not raw:
        return WEB_TOKEN_WAIT_DEFAULT
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"BITRIX24_WEB_TOKEN_WAIT_SECONDS={raw!r} is not a whole number") from exc


def web_request_timeout_seconds() -> int:
    """A web worker silent for longer than this is stuck, not waiting for a renewal."""
    return web_token_wait_seconds() + WEB_REQUEST_MARGIN_SECONDS


if __name__ == "__main__":  # bin/run: `python -m config.timeouts` prints the stop grace
    print(stop_grace_seconds())
