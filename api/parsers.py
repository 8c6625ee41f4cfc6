"""The API's JSON parser: DRF's, with deep nesting answered as a parse error (400), not a 500."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            # `[` x 100,000: Python's decoder gives up with RecursionError, which DRF does not catch.
            raise ParseError("JSON parse error - nested too deeply") from exc
