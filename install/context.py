"""What every template of the app's pages may need."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest


def bitrix24(request: HttpRequest) -> dict[str, Any]:
    # Bitrix24's JS library: Bitrix24's own in production, the stand-in's in development and tests.
    return {"bx24_js_url": settings.BITRIX24_JS_URL}
