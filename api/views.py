"""Staff API (session auth, staff only). The full API with token health and actions builds on this."""

from __future__ import annotations

from rest_framework import generics

from portals.models import Portal

from .serializers import PortalSerializer


class PortalList(generics.ListAPIView):
    queryset = Portal.objects.all()
    serializer_class = PortalSerializer

    def get_queryset(self):  # type: ignore[no-untyped-def]
        queryset = super().get_queryset()
        state = self.request.query_params.get("state")
        return queryset.filter(state=state) if state else queryset


class PortalDetail(generics.RetrieveAPIView):
    queryset = Portal.objects.all()
    serializer_class = PortalSerializer
    lookup_field = "member_id"
