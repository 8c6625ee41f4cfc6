"""The example's frontend endpoint: what the deal tab's JavaScript asks (mounted at /api/app/example/…)."""

from __future__ import annotations

from django.urls import path
from rest_framework.request import Request
from rest_framework.response import Response

from api.frontend import FrontendAPIView, bitrix24_errors


class DealNotes(FrontendAPIView):
    """The deal's title and how many timeline notes it has, read as the user who opened the tab."""

    def get(self, request: Request, deal_id: int) -> Response:
        client = self.client()
        with bitrix24_errors():  # Bitrix24's refusals as the API's JSON errors (502/503)
            deal = client.call("crm.deal.get", {"id": deal_id}, fail_fast=True)
            notes = client.call(
                "crm.timeline.comment.list",
                {"filter": {"ENTITY_ID": deal_id, "ENTITY_TYPE": "deal"}},
                fail_fast=True,
            )
        return Response({"id": deal_id, "title": deal.get("TITLE", ""), "notes": len(notes or [])})


urlpatterns = [path("example/deals/<int:deal_id>/", DealNotes.as_view(), name="example-deal-notes")]
