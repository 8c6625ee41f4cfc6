"""The example app's registrations: what a Bitrix24 app built on this backend writes (docs/build-your-app.md, "Build your
app"). Every piece reads Bitrix24 through `PortalClient`; nothing trusts an event's or a launch's data
beyond identifiers.
"""

from __future__ import annotations

import re

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from events.services import EventContext
from install.parsing import BadRequest
from install.placements import PlacementContext
from portals.registry import on, placement

# A deal's id as Bitrix24 writes it in PLACEMENT_OPTIONS: ASCII digits, no sign, no leading zero.
DEAL_ID = re.compile(r"[1-9][0-9]{0,17}")


def deal_tab(request: HttpRequest, context: PlacementContext) -> HttpResponse:
    """A tab on the deal card: the deal's title, read with the launching user's own token. Anything but a
    deal's id in PLACEMENT_OPTIONS[ID] is a bad request (400, said in the frame), not a crash."""
    raw = context.options.get("ID", "")
    deal_id = str(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else "?"
    if deal_id and not DEAL_ID.fullmatch(deal_id):
        raise BadRequest("PLACEMENT_OPTIONS[ID] is not a deal's id")
    deal = context.client.call("crm.deal.get", {"id": deal_id}) if deal_id else None
    return render(
        request,
        "example/deal_tab.html",
        {"context": context, "deal": deal, "deal_id": deal_id, "lang": context.lang},
    )


def deal_added(event: EventContext) -> None:
    """A new deal gets a note on its timeline (written with the portal's background pair)."""
    deal = event.client.call("crm.deal.get", {"id": event.object_id})
    event.client.call(
        "crm.timeline.comment.add",
        {
            "fields": {
                "ENTITY_ID": event.object_id,
                "ENTITY_TYPE": "deal",
                "COMMENT": _("The example app saw this deal arrive: %(title)s") % {"title": deal["TITLE"]},
            }
        },
    )


def contact_changed(event: EventContext) -> None:
    """Every contact change, even one made while the backend was down, gets a timeline note. The note is
    written with the connector (BITRIX24_AUTH_CONNECTOR), so it is not queued back to us as a change."""
    contact = event.client.call("crm.contact.get", {"id": event.object_id})
    name = " ".join(part for part in (contact.get("NAME"), contact.get("LAST_NAME")) if part)
    event.client.call(
        "crm.timeline.comment.add",
        {
            "fields": {
                "ENTITY_ID": event.object_id,
                "ENTITY_TYPE": "contact",
                "COMMENT": _("The example app saw this contact change: %(name)s") % {"name": name},
            }
        },
    )


def register() -> None:
    """What an app writes as decorators (`@placement(...)`, `@on(...)`), spelled as calls so that tests
    can register the example into a registry of their own (`portals.registry.replaced(register)`)."""
    placement(
        "CRM_DEAL_DETAIL_TAB",
        title=gettext_lazy("Deal notes"),
        description=gettext_lazy("What the example app knows about this deal"),
    )(deal_tab)
    on("ONCRMDEALADD")(deal_added)
    on("ONCRMCONTACTUPDATE", offline=True)(contact_changed)


if settings.BITRIX24_EXAMPLE_APP:
    register()
