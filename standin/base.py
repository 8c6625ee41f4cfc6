"""What the stand-in's modules share: the REST error a method raises and the timestamps portals print.

Its own module so that ``server.py`` (the portals) and ``events.py`` (the offline queue, the courier) can
both use them without importing each other. Standard library only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

__all__ = ["RestError", "iso"]


def iso(ts: float) -> str:
    """A portal's timestamp: ISO 8601 with seconds and offset (``2024-07-18T12:32:31+00:00``)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class RestError(Exception):
    """A method's refusal: the HTTP status and the ``error`` / ``error_description`` body portals answer."""

    def __init__(self, status: int, code: str, description: str = "", *, argument: str = "") -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.description = description
        # placement-bind.md: ERROR_ARGUMENT names the missing parameter in an ``argument`` member.
        self.argument = argument

    def answer(self) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"error": self.code, "error_description": self.description}
        if self.argument:
            body["argument"] = self.argument
        return self.status, body
