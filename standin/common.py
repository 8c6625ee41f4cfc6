"""What the stand-in's parts share: answers, limits, paths, small readers of parameters, and the records of
grants and calls."""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .base import RestError as _RestError
from .base import iso as _iso
from .events import (
    DEFAULT_MIN_TIMEOUT,
)

JSON = dict[str, Any]
Answer = tuple[int, JSON]

PAGE_SIZE = 50  # settings/how-to-call-rest-api/list-methods-pecularities.md: list methods return 50 a page
MAX_BATCH = 50  # settings/how-to-call-rest-api/batch.md: at most 50 commands
OPERATING_WINDOW = 600.0  # limits.md: operating time is summed per method over 10 minutes
CODE_TTL = 30.0  # settings/oauth/index.md: the authorization code lives 30 seconds
# crm.timeline.comment: notes an app writes on a CRM item's timeline (api-reference/crm/timeline/comments/).
DEFAULT_ENTITIES = ("crm.contact", "crm.company", "crm.deal", "crm.lead", "crm.timeline.comment")
# Scopes this stand-in enforces for entity methods (crm.contact.list needs "crm"). Anything else is open.
KNOWN_SCOPES = frozenset({"crm", "user", "im", "task", "tasks", "entity", "disk", "lists", "catalog", "sale"})
_LICENSE_TYPES = {"ent": "ent250", "pro": "pro100", "std": "std", "basic": "basic", "nfr": "nfr"}

_HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

# The error bodies below are the ones settings/how-to-call-rest-api/ and settings/oauth/error-codes.md list.
INVALID_TOKEN: Answer = (
    401,
    {"error": "invalid_token", "error_description": "The access token provided is invalid."},
)
EXPIRED_TOKEN: Answer = (
    401,
    {"error": "expired_token", "error_description": "The access token provided has expired."},
)
NO_AUTH_FOUND: Answer = (401, {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"})
INVALID_GRANT: Answer = (400, {"error": "invalid_grant", "error_description": "Invalid grant"})
INVALID_CLIENT: Answer = (401, {"error": "invalid_client", "error_description": "Invalid client"})

APP_FRAME_PATH = "/app-frame/"
# The app's iframe on a portal page: found by this id; its name is `DOMAIN|PROTOCOL|APP_SID`, what the
# official JS SDK reads (docs/bitrix24-protocol.md §8).
APP_FRAME_ID = "app-frame"
APP_FRAME_SELECTOR = f"iframe#{APP_FRAME_ID}"
# The JS library, at the path of Bitrix24's own (//api.bitrix24.com/api/v1/, sdk/bx24-js-sdk/index.md).
BX24_JS_PATH = "/api/v1/"
# Where the portal page posts what the library in its frame asked for (see FakePortal.frame_report).
FRAME_REPORT_PATH = "/standin/frame"
MAX_FRAMES = 1000  # frame pages a portal remembers
_STATIC = Path(__file__).with_name("static")
# The hand-firing page needs no script and posts only to itself.
_CONSOLE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}


def _time_block(
    start: float,
    finish: float,
    processing: float,
    *,
    operating: float | None = None,
    operating_reset_at: float | None = None,
) -> JSON:
    """The ``time`` member every successful REST answer carries (shape of list-next-total-docs.json)."""
    block: JSON = {
        "start": round(start, 6),
        "finish": round(finish, 6),
        "duration": finish - start,
        "processing": processing,
        "date_start": _iso(start),
        "date_finish": _iso(finish),
    }
    if operating_reset_at is not None:
        block["operating_reset_at"] = int(operating_reset_at)
    if operating is not None:
        block["operating"] = round(operating, 6)
    return block


def _php_array(values: dict[str, Any]) -> Any:
    """How PHP's json_encode renders an array: ``[]`` when empty, a list for keys 0..n-1, else an object."""
    if not values:
        return []
    if list(values) == [str(i) for i in range(len(values))]:
        return list(values.values())
    return values


def _require_loopback_url(url: str) -> None:
    """An http(s) URL on a loopback host (127.0.0.0/8, ::1, localhost), or ValueError."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("handler must be an http:// or https:// URL")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"handler host {host!r} is not a loopback address: the stand-in only opens local apps"
            )


def _origin(url: str) -> str:
    """The origin a browser gives ``url`` (``scheme://host[:port]``, the default port left out)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")


@functools.cache
def _static(name: str) -> str:
    """A file of ``static/`` (the JS library and the portal page's script), read once."""
    return (_STATIC / name).read_text(encoding="utf-8")


def _frame_options(params: Mapping[str, str]) -> JSON | None:
    """PLACEMENT_OPTIONS for the frame page: ``options`` (a JSON object), else ``id`` as ``{"ID": id}``."""
    raw = params.get("options", "").strip()
    if raw:
        try:
            options = json.loads(raw)
        except ValueError:
            raise ValueError('options must be a JSON object, e.g. {"ID":"8"}') from None
        if not isinstance(options, dict):
            raise ValueError('options must be a JSON object, e.g. {"ID":"8"}')
        return options
    item = params.get("id", "").strip()
    return {"ID": item} if item else None


def _split_scope(scope: str) -> set[str]:
    # settings/oauth: scope comes comma-separated in tokens and space-separated in some events.
    return {part for part in re.split(r"[,\s]+", scope) if part}


def _text(value: Any) -> str:
    """A scalar parameter as text ("" when absent); arrays count as absent."""
    if value is None or isinstance(value, dict | list):
        return ""
    return str(value).strip()


def _flag(value: Any, *, default: bool) -> bool:
    """A 0/1 parameter (``clear``, ``error``); "N" and "false" count as 0, as PHP code tends to read them."""
    text = _text(value).lower()
    if not text:
        return default
    return text not in ("0", "n", "false", "no")


def _positive(value: Any, default: int) -> int:
    """event-offline-get.md: ``limit`` is "an integer greater than 0"."""
    text = _text(value)
    if not text:
        return default
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise _RestError(400, "ERROR_ARGUMENT", "Value must be positive integer")
    return number


def _array(value: Any, message: str) -> list[Any]:
    """An array parameter: a JSON list, or a PHP form array (``id[]=1``, ``id[0]=1``); absent is empty."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, list):
        return value
    raise _RestError(400, "ERROR_ARGUMENT", message)


def _same_binding(one: JSON, other: JSON) -> bool:
    """What event.bind refuses as "already binded": the same event to the same handler as the same user
    online; offline, the same event for the same source key."""
    if one["event"] != other["event"] or one["offline"] != other["offline"]:
        return False
    if one["offline"]:
        return bool(one["auth_connector"] == other["auth_connector"])
    return bool(one["handler"] == other["handler"] and one["auth_type"] == other["auth_type"])


def _min_timeout(binding: JSON) -> float:
    """``options[minTimeout]`` of an ONOFFLINEEVENT binding, in seconds (on-offline-event.md: default 1)."""
    options = binding.get("options") or {}
    try:
        return max(float(options.get("minTimeout", DEFAULT_MIN_TIMEOUT)), 0.0)
    except (TypeError, ValueError):
        return DEFAULT_MIN_TIMEOUT


@dataclass
class _Grant:
    """One access + refresh pair, as the OAuth server remembers it."""

    member_id: str
    user_id: int
    admin: bool
    access_token: str
    refresh_token: str
    issued_at: float
    access_expires: float
    # None while usable; "rotated" once its refresh token was spent; "uninstalled" when the app was removed.
    dead: str | None = None


@dataclass
class _Code:
    member_id: str
    user_id: int
    admin: bool
    created: float


@dataclass
class _Hit:
    """One request to a portal (a whole batch is one): who made it, the source key it passed, and whether it
    wrote to the offline queue — ONOFFLINEEVENT is raised once per hit at most (on-offline-event.md,
    minTimeout 0: "one notification per request to Bitrix24")."""

    user_id: int
    admin: bool
    auth_connector: str = ""
    offline_written: bool = False
