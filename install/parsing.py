"""Reading what Bitrix24 posts: strict UTF-8, PHP-style nested form keys, typed fields.

Everything here raises BadRequest with a message a person can act on; nothing here trusts
anything (verification comes after).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest

from portals import phpform, verification

MAX_DEPTH = 8
# JSON bodies nest no deeper than this. Python's parser recurses once per level: a body of 100,000 `[`
# would end in a RecursionError (a 500), and anything deeper than a form can express is not Bitrix24's.
MAX_JSON_DEPTH = 32
_JSON_SIGN = re.compile(r'[\[\]{}"\\]')
# Text the database cannot store (PostgreSQL refuses NUL in text and JSON; neither database can encode a
# lone surrogate) and that no Bitrix24 request carries: refused at the door, never half-stored.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

MEMBER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{1,512}$")
EVENT = re.compile(r"^[A-Za-z0-9_.]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
PLACEMENT = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class BadRequest(Exception):
    """The request is malformed; `status` is a 4xx."""

    def __init__(self, message: str, *, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


Nested = dict[str, Any]


def decode_php_form(pairs: list[tuple[str, str]]) -> Nested:
    """`auth[access_token]=…&data[FIELDS][ID]=…&a[]=1` as nested dicts and lists, by the product's one PHP-form
    decoder (portals.phpform); what it cannot read unambiguously (an unbalanced bracket, a key used both as
    a value and as a container, nesting deeper than MAX_DEPTH) is a 400 that says which key."""
    try:
        return phpform.decode(pairs, max_depth=MAX_DEPTH)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} is not valid UTF-8 (byte {exc.start})") from exc


def _refuse_unstorable(value: str, what: str) -> None:
    found = _UNSTORABLE.search(value)
    if found is not None:
        kind = "a NUL character" if found.group() == "\x00" else "an unpaired surrogate"
        raise BadRequest(f"{what} contains {kind}")


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            errors="strict",
            max_num_fields=settings.DATA_UPLOAD_MAX_NUMBER_FIELDS,
        )
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} has percent-encoded bytes that are not UTF-8") from exc
    except ValueError as exc:
        raise BadRequest(f"{what} has too many fields") from exc
    for key, value in pairs:
        _refuse_unstorable(key, f"{what} key {key[:40]!r}")
        _refuse_unstorable(value, f"{what} field {key[:40]!r}")
    return pairs


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON number (NaN and Infinity are refused)")


def _finite_float(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):  # 1e999: as unstorable as Infinity
        raise BadRequest(f"JSON number {text[:40]!r} is out of range")
    return number


def _check_json_text(value: Any, what: str) -> None:
    """Every key and string of a parsed document, walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _refuse_unstorable(item, what)
        elif isinstance(item, dict):
            for key, child in item.items():
                _refuse_unstorable(key, f"{what} key")
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _refuse_deep_json(text: str, what: str) -> None:
    """Count nesting in one linear pass over brackets, quotes and backslashes (a regex for strings
    would backtrack quadratically on a body of unterminated ones)."""
    depth, in_string, escaped_at = 0, False, -1
    for sign in _JSON_SIGN.finditer(text):
        char, at = sign.group(), sign.start()
        if in_string:
            if at == escaped_at:
                continue
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
        elif char in "]}":
            depth -= 1


def loads_json(text: str, what: str) -> Any:
    """json.loads for untrusted text: a 400 (never a RecursionError) for deep nesting; NaN, Infinity,
    NUL and lone surrogates refused, since no database stores them and Bitrix24 sends none."""
    _refuse_deep_json(text, what)
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError as exc:  # the scan above should have caught it; a 400 all the same
        raise BadRequest(f"{what} is nested too deeply") from exc
    except ValueError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from exc
    _check_json_text(value, what)
    return value


def read_params(request: HttpRequest) -> tuple[Nested, Nested]:
    """(query, body) of a request, each decoded into nested dicts. Form and JSON bodies are read."""
    query = decode_php_form(
        _pairs(_decode(request.META.get("QUERY_STRING", "").encode("latin-1"), "query"), "query")
    )
    try:
        raw = request.body
    except RequestDataTooBig as exc:
        raise BadRequest("request body is too large", status=413, code="too_large") from exc
    content_type = (request.content_type or "").lower()
    if content_type == "application/json":
        body = loads_json(_decode(raw, "body") or "{}", "body")
        if not isinstance(body, dict):
            raise BadRequest("JSON body must be an object")
        return query, body
    if content_type not in ("", "application/x-www-form-urlencoded", "text/plain"):
        raise BadRequest(
            f"unsupported content type {content_type!r}; use application/x-www-form-urlencoded",
            status=415,
            code="unsupported_media_type",
        )
    return query, decode_php_form(_pairs(_decode(raw, "body"), "body"))


# --- typed fields -----------------------------------------------------------------------------


def text(
    data: Nested,
    key: str,
    *,
    required: bool = True,
    pattern: re.Pattern[str] | None = None,
    max_length: int = 1000,
    where: str = "",
) -> str:
    name = f"{where}[{key}]" if where else key
    value = data.get(key)
    if value is None or value == "":
        if required:
            raise BadRequest(f"{name} is required")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, not a {type(value).__name__}")
    if len(value) > max_length:
        raise BadRequest(f"{name} is longer than {max_length} characters")
    if _CONTROL.search(value):
        raise BadRequest(f"{name} contains control characters")
    if pattern is not None and not pattern.match(value):
        raise BadRequest(f"{name} has characters it cannot have")
    return value


def integer(data: Nested, key: str, *, default: int, low: int, high: int, where: str = "") -> int:
    name = f"{where}[{key}]" if where else key
    value = data.get(key)
    if value is None or value == "":
        return default
    try:
        number = int(str(value))
    except ValueError as exc:
        raise BadRequest(f"{name} must be a whole number") from exc
    if not low <= number <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return number


def section(data: Nested, key: str, *, required: bool = True) -> Nested:
    value = data.get(key)
    if value is None:
        if required:
            raise BadRequest(f"{key}[…] is required")
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be a nested group of fields ({key}[name]=…)")
    return value


def domain(data: Nested, key: str, *, where: str = "") -> str:
    value = text(data, key, max_length=255, where=where)
    try:
        return verification.normalize_domain(value)
    except ValueError as exc:
        raise BadRequest(f"{where + '[' + key + ']' if where else key}: {exc}") from exc


def placement_options(data: Nested) -> dict[str, Any]:
    raw = data.get("PLACEMENT_OPTIONS")
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):  # some callers post it already nested: PLACEMENT_OPTIONS[ID]=…
        return raw
    if not isinstance(raw, str) or len(raw) > 10_000:
        raise BadRequest("PLACEMENT_OPTIONS must be a JSON object in a string of at most 10000 characters")
    options = loads_json(raw, "PLACEMENT_OPTIONS")
    if not isinstance(options, dict):
        raise BadRequest("PLACEMENT_OPTIONS must be a JSON object")
    return options


@dataclass(frozen=True)
class FrameAuth:
    """The fields of an install frame or a launch."""

    domain: str
    protocol: str
    lang: str
    member_id: str
    access_token: str
    refresh_token: str
    expires_in: int
    server_endpoint: str
    application_token: str
    scope: str
    status: str
    placement: str
    placement_options: dict[str, Any]


def frame_auth(query: Nested, body: Nested) -> FrameAuth:
    """Read a launch/install frame: query string and body together (older portals put all in the body)."""
    data = {**query, **body}
    status = text(data, "status", required=False, max_length=1)
    return FrameAuth(
        domain=domain(data, "DOMAIN"),
        protocol="http" if str(data.get("PROTOCOL", "1")) == "0" else "https",
        lang=text(data, "LANG", required=False, max_length=8, pattern=re.compile(r"^[A-Za-z_-]+$")),
        member_id=text(data, "member_id", pattern=MEMBER_ID),
        access_token=text(data, "AUTH_ID", pattern=TOKEN, max_length=512),
        refresh_token=text(data, "REFRESH_ID", pattern=TOKEN, max_length=512),
        expires_in=integer(data, "AUTH_EXPIRES", default=3600, low=1, high=86400),
        server_endpoint=text(data, "SERVER_ENDPOINT", required=False, max_length=255),
        application_token=text(data, "APPLICATION_TOKEN", required=False, pattern=TOKEN, max_length=512),
        scope=text(data, "APPLICATION_SCOPE", required=False, max_length=1000),
        status=status,
        placement=text(data, "PLACEMENT", required=False, pattern=PLACEMENT) or "DEFAULT",
        placement_options=placement_options(data),
    )
