"""A launch handed to the app's placement view: what the view gets, and the page for an unknown placement.

Bitrix24 opens every placement by POSTing a launch to the handler it was bound with (`/app/`), with
`PLACEMENT` (e.g. CRM_DEAL_DETAIL_TAB) and `PLACEMENT_OPTIONS` (e.g. `{"ID": "8"}`). The launch is
verified as every launch (app.info on its AUTH_ID), the user's tokens stored, and then the view the app
registered for that placement (portals.registry.placement) renders the frame, in the portal's language.
`PLACEMENT_OPTIONS` says which object the user looks at; it is not proof of anything: the view reads the
object through `context.client`, which acts as that user, so Bitrix24's own access rights apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import translation

from portals import registry
from portals.client import PortalClient
from portals.models import Portal

# The languages the project's pages and the example are translated to; another LANG falls back to English.
LANGUAGES = ("en", "ru", "de")


@dataclass(frozen=True)
class PlacementContext:
    """What a placement view gets, besides the request."""

    portal: Portal
    user_id: int
    placement: str
    options: Mapping[str, Any]  # PLACEMENT_OPTIONS, parsed (identifiers: not to be trusted as data)
    lang: str  # the portal user's language (LANG), one of LANGUAGES
    access_token: str  # the launch's AUTH_ID: for the page's JavaScript (BX24 gives it the same)
    client: PortalClient  # calls Bitrix24 as this user, with the pair the launch stored


def language(lang: str) -> str:
    code = (lang or "").lower()[:2]
    return code if code in LANGUAGES else "en"


def show(request: HttpRequest, context: PlacementContext) -> HttpResponse:
    """The registered view of the context's placement, or a page saying this app has none."""
    entry = registry.placement_for(context.placement)
    with translation.override(context.lang):
        if entry is None:
            return render(
                request,
                "install/unknown_placement.html",
                {"placement": context.placement, "portal": context.portal, "lang": context.lang},
                status=404,
            )
        response: HttpResponse = entry.view(request, context)
    response.headers.setdefault("Content-Language", context.lang)
    return response
