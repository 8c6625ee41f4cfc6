"""Calls to a portal's REST API (the full client with batching and the rate governor builds on this)."""

from __future__ import annotations

import logging
from typing import Any

import requests

from . import http
from .models import Portal

logger = logging.getLogger(__name__)


class RestError(Exception):
    def __init__(self, message: str, *, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def call(*, portal: Portal, method: str, access_token: str, params: dict[str, Any] | None = None) -> Any:
    """One REST call with a given access token; returns `result`."""
    url = f"{portal.base_url}/rest/{method}.json"
    try:
        response = http.send("POST", url, data={**(params or {}), "auth": access_token})
    except http.HostNotAllowed as exc:
        raise RestError(str(exc), code="host_not_allowed") from exc
    except requests.RequestException as exc:
        raise RestError(f"{type(exc).__name__} calling {method}", code="unavailable") from exc
    try:
        data = response.json()
    except ValueError:
        raise RestError(
            f"{method}: non-JSON answer (HTTP {response.status_code})", status=response.status_code
        ) from None
    if not isinstance(data, dict) or "error" in data or response.status_code >= 400:
        code = str(data.get("error", "")) if isinstance(data, dict) else ""
        raise RestError(
            f"{method}: {code or 'HTTP ' + str(response.status_code)}", code=code, status=response.status_code
        )
    return data.get("result")


def is_admin(*, portal: Portal, access_token: str) -> bool:
    """Whether the token's user is a portal admin, per `profile` (no scope needed). False when unsure."""
    try:
        profile = call(portal=portal, method="profile", access_token=access_token)
    except RestError as exc:
        logger.info("profile check failed on %s: %s", portal.domain, exc.code or exc)
        return False
    return isinstance(profile, dict) and profile.get("ADMIN") in (True, "Y", "true", 1, "1")
