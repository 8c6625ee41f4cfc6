"""The example's frontend endpoint: what the deal tab's JavaScript asks (mounted at /api/app/example/…)."""

from __future__ import annotations

from django.urls import re_path
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from api.frontend import FRONTEND_ERRORS, FrontendAPIView, bitrix24_errors
from portals.client import RestError


class DealNotesSerializer(serializers.Serializer[dict[str, object]]):
    id = serializers.IntegerField()
    title = serializers.CharField()
    notes = serializers.IntegerField(help_text="Timeline notes on the deal.")


class DealNotes(FrontendAPIView):
    """The deal's title and how many timeline notes it has, read as the user who opened the tab."""

    @extend_schema(responses={200: DealNotesSerializer, **FRONTEND_ERRORS})
    def get(self, request: Request, deal_id: str) -> Response:
        number = int(deal_id)  # the URL lets only a deal's id through
        client = self.client()
        with bitrix24_errors():  # Bitrix24's refusals as the API's JSON errors (502/503)
            try:
                deal = client.call("crm.deal.get", {"id": number}, fail_fast=True)
            except RestError as exc:
                # No such deal, or not one this user may see: crm.deal.get says so with an empty error code
                # and "Not found" (crm-deal-get.md); crm.item.get with NOT_FOUND.
                if exc.code.upper() == "NOT_FOUND" or (
                    not exc.code and exc.description.lower().startswith("not found")
                ):
                    raise NotFound(f"No deal {number} for this user.") from exc
                raise
            notes = client.call(
                "crm.timeline.comment.list",
                {"filter": {"ENTITY_ID": number, "ENTITY_TYPE": "deal"}},
                fail_fast=True,
            )
        return Response({"id": number, "title": deal.get("TITLE", ""), "notes": len(notes or [])})


# A deal's id as Bitrix24 writes it (0 for "none": the tab's page links it then): anything else is a 404
# here, never a call to Bitrix24 with a 400-digit number.
urlpatterns = [
    re_path(
        r"^example/deals/(?P<deal_id>0|[1-9][0-9]{0,17})/$", DealNotes.as_view(), name="example-deal-notes"
    )
]
