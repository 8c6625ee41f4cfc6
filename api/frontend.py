"""The base of the app's own frontend endpoints: views the app page's JavaScript calls with its AUTH_ID.

An app built on this backend adds endpoints in its Django app's `frontend.py`:

    # myapp/frontend.py
    from django.urls import path
    from rest_framework.response import Response
    from api.frontend import FrontendAPIView

    class DealSummary(FrontendAPIView):
        def get(self, request, deal_id):
            deal = self.client().call("crm.deal.get", {"id": deal_id})
            return Response({"title": deal["TITLE"]})

    urlpatterns = [path("myapp/deals/<int:deal_id>/", DealSummary.as_view())]

Every app in BITRIX24_APPS (and the example app) that has a `frontend` module with `urlpatterns` is
mounted under `/api/app/` (so the URL above is `/api/app/myapp/deals/8/`), ahead of the API's answer for
unknown paths. The page sends `X-Bitrix24-Auth` (its AUTH_ID, from `BX24.getAuth()`) and
`X-Bitrix24-Member-Id`; the token is verified with `app.info` through the one verification path and the
verdict cached (see api.authentication). Errors are JSON like the rest of the API.
"""

from __future__ import annotations

from types import ModuleType

from rest_framework.permissions import BasePermission

from portals import registry
from portals.client import PortalClient

from .authentication import Bitrix24FrameAuthentication, IsPortalUser, PortalUser
from .views import _FRAME_ERRORS, FrameAPIView, bitrix24_errors

__all__ = ["FRONTEND_ERRORS", "FrontendAPIView", "bitrix24_errors", "frontend_modules"]

# The answers every frontend endpoint may give besides its own, for its OpenAPI description
# (`@extend_schema(responses={200: MySerializer, **FRONTEND_ERRORS})`).
FRONTEND_ERRORS = _FRAME_ERRORS


class FrontendAPIView(FrameAPIView):
    """An endpoint for the app page: `portal_user()` is who the AUTH_ID stands for (portal and Bitrix24
    user), `client()` calls the portal as that user (with the pair their launch stored)."""

    authentication_classes = [Bitrix24FrameAuthentication]
    permission_classes: list[type[BasePermission]] = [IsPortalUser]

    def client(self) -> PortalClient:
        user: PortalUser = self.portal_user()
        return PortalClient(user.portal, user_id=user.user_id)


def frontend_modules() -> list[ModuleType]:
    """The `frontend` modules of the installed apps (BITRIX24_APPS, the example when on) that define
    `urlpatterns`, found as their `bitrix24` modules are (portals.registry.app_modules)."""
    return [module for module in registry.app_modules("frontend") if hasattr(module, "urlpatterns")]
