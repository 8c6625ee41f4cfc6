"""The REST API. Thin views: validate input, call one selector or service, serialize.

Staff endpoints (the defaults in settings.REST_FRAMEWORK: session or token, IsAdminUser) and the
app's frontend endpoints under /api/app/ (Bitrix24FrameAuthentication, IsPortalUser).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DatabaseError
from django.db.models import QuerySet
from django.urls import Resolver404, resolve
from drf_spectacular.renderers import (
    OpenApiJsonRenderer,
    OpenApiJsonRenderer2,
    OpenApiYamlRenderer,
    OpenApiYamlRenderer2,
)
from drf_spectacular.utils import OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularAPIView
from rest_framework import exceptions, generics, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portals import answers, health, operations
from portals import selectors as portal_selectors
from portals.client import PortalClient
from portals.models import Portal

from . import selectors
from .authentication import Bitrix24FrameAuthentication, IsPortalUser, PortalUser
from .exceptions import Answered, Conflict
from .permissions import staff_with
from .serializers import (
    CallResultSerializer,
    CallSerializer,
    ErrorSerializer,
    HealthSerializer,
    MeSerializer,
    PortalDetailSerializer,
    PortalHealthSerializer,
    PortalListQuerySerializer,
    ProfileSerializer,
    RenewQueuedSerializer,
)

logger = logging.getLogger(__name__)

_STAFF_ERRORS = {
    401: OpenApiResponse(ErrorSerializer, description="Not authenticated."),
    403: OpenApiResponse(
        ErrorSerializer, description="Not a staff user, or one without the permission the endpoint needs."
    ),
}
_PORTAL_ERRORS = {**_STAFF_ERRORS, 404: OpenApiResponse(ErrorSerializer, description="No such portal.")}
_FRAME_ERRORS = {
    401: OpenApiResponse(ErrorSerializer, description="Missing, malformed, forged or expired AUTH_ID."),
    403: OpenApiResponse(ErrorSerializer, description="The AUTH_ID belongs to another portal."),
    503: OpenApiResponse(ErrorSerializer, description="Bitrix24 cannot be asked to verify the token now."),
}


@contextmanager
def bitrix24_errors() -> Iterator[None]:
    """Domain errors raised inside (Bitrix24 refusing a call, no usable tokens …) become DRF's APIException
    with the answer portals.answers gives them, for code that handles APIException itself. Without it the
    API's exception handler gives the same answer from the same table."""
    try:
        yield
    except Exception as exc:
        answer = answers.answer_for(exc)
        if answer is None:
            raise
        raise Answered(answer) from exc


# --- staff ----------------------------------------------------------------------------------------


class PortalPagination(PageNumberPagination):
    page_size = 100


class PortalList(generics.ListAPIView):
    """Portals with their token health: the background pair's expiry, days left, failures, state and
    the last renewal attempt."""

    serializer_class = PortalHealthSerializer
    pagination_class = PortalPagination
    permission_classes = [staff_with("portals.view_portal")]

    def get_queryset(self) -> QuerySet[Portal]:
        query = PortalListQuerySerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        return selectors.portal_list(
            state=query.validated_data.get("state", ""),
            due=query.validated_data["due"],
            failing=query.validated_data["failing"],
        )

    @extend_schema(
        parameters=[PortalListQuerySerializer],
        responses={200: PortalHealthSerializer(many=True), **_STAFF_ERRORS, 400: ErrorSerializer},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class PortalDetail(generics.RetrieveAPIView):
    """One portal: its token pairs (masked) and its last 20 renewal attempts."""

    serializer_class = PortalDetailSerializer
    lookup_field = "member_id"
    permission_classes = [staff_with("portals.view_portal")]

    def get_queryset(self) -> QuerySet[Portal]:
        return selectors.portal_detail()

    @extend_schema(responses={200: PortalDetailSerializer, **_PORTAL_ERRORS})
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class PortalRenew(generics.GenericAPIView):
    """Queue a forced renewal of every token pair of the portal (the workers renew them under lock)."""

    queryset = Portal.objects.all()
    lookup_field = "member_id"
    serializer_class = RenewQueuedSerializer
    permission_classes = [staff_with("portals.renew_portal")]

    @extend_schema(
        request=None,
        responses={
            202: RenewQueuedSerializer,
            **_PORTAL_ERRORS,
            409: OpenApiResponse(
                ErrorSerializer, description="No pair can be renewed (none, or all dead: reinstall needed)."
            ),
        },
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        portal = self.get_object()
        try:
            queued = operations.queue_renewal(portal=portal)
        except operations.OperationRefused as exc:
            raise Conflict(str(exc), code="nothing_to_renew") from exc
        logger.info("Staff %s queued renewal of portal %s via the API", request.user, portal.member_id)
        return Response({"queued": queued}, status=status.HTTP_202_ACCEPTED)


class PortalCall(generics.GenericAPIView):
    """Call a Bitrix24 REST method on the portal with its background pair (for support): read methods
    (`*.get`, `*.list`, `*.fields`, `profile`, `app.info`; in a batch, every command) with `call_portal`,
    any method with `call_any_method` as well. Every call is audited (the admin's *staff calls*)."""

    queryset = Portal.objects.all()
    lookup_field = "member_id"
    serializer_class = CallSerializer
    permission_classes = [staff_with("portals.call_portal")]

    @extend_schema(
        request=CallSerializer,
        responses={
            200: CallResultSerializer,
            400: ErrorSerializer,
            **_PORTAL_ERRORS,
            409: OpenApiResponse(ErrorSerializer, description="The portal has no usable token pair."),
            502: OpenApiResponse(ErrorSerializer, description="Bitrix24 refused or failed the call."),
            503: OpenApiResponse(ErrorSerializer, description="Bitrix24's OAuth server is unreachable."),
        },
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        portal = self.get_object()
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        method = serializer.validated_data["method"]
        try:
            with bitrix24_errors():
                result = operations.call_for_staff(
                    portal=portal,
                    user=request.user,
                    method=method,
                    params=serializer.validated_data["params"],
                    may_call_any=request.user.has_perm("portals.call_any_method"),
                )
        except operations.CallNotAllowed as exc:
            raise exceptions.PermissionDenied(str(exc), code="method_not_allowed") from exc
        return Response({"method": method, "result": result})


class Health(APIView):
    """The database and the broker (as /healthz), portals per state and token-pair counts."""

    permission_classes = [staff_with("portals.view_portal")]

    @extend_schema(responses={200: HealthSerializer, 503: HealthSerializer, **_STAFF_ERRORS})
    def get(self, request: Request) -> Response:
        probe = health.check()  # the same checks as /healthz
        ok = probe.ok
        data: dict[str, Any] = {
            "status": "ok" if ok else "unavailable",
            "database": probe.database,
            "broker": probe.broker,
            "keys": probe.keys,
            "portals": {},
            "pairs": {"total": 0, "failing": 0, "due": 0},
            "background": {},
        }
        try:
            data["portals"] = portal_selectors.state_counts()
            data["pairs"] = selectors.pair_counts()
            data["background"] = portal_selectors.health_counts()
        except DatabaseError:
            ok = False  # the probe passed a moment ago; report what is known
            data["status"] = "unavailable"
        if ok:
            return Response(data)
        return Response(data, status=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "10"})


# --- the app's frontend (the page in the portal's iframe) ---------------------------------------


class FrameAPIView(APIView):
    authentication_classes = [Bitrix24FrameAuthentication]
    permission_classes = [IsPortalUser]

    def portal_user(self) -> PortalUser:
        assert isinstance(self.request.auth, PortalUser)
        return self.request.auth


class Me(FrameAPIView):
    """The portal and the Bitrix24 user the page's AUTH_ID stands for."""

    @extend_schema(responses={200: MeSerializer, **_FRAME_ERRORS})
    def get(self, request: Request) -> Response:
        user = self.portal_user()
        return Response(
            {
                "member_id": user.portal.member_id,
                "domain": user.portal.domain,
                "user_id": user.user_id,
                "app_status": user.portal.app_status,
            }
        )


class Profile(FrameAPIView):
    """Bitrix24's `profile` for the current user, called with that user's own stored token pair."""

    @extend_schema(
        responses={
            200: ProfileSerializer,
            **_FRAME_ERRORS,
            409: OpenApiResponse(ErrorSerializer, description="No stored token pair for this user."),
            502: OpenApiResponse(ErrorSerializer, description="Bitrix24 refused the call."),
        }
    )
    def get(self, request: Request) -> Response:
        user = self.portal_user()
        with bitrix24_errors():
            profile = PortalClient(user.portal, user_id=user.user_id).call("profile", fail_fast=True)
        return Response({"profile": profile})


# --- the OpenAPI schema ----------------------------------------------------------------------------


class Schema(SpectacularAPIView):
    """The OpenAPI 3 schema: JSON unless YAML is asked for (`?format=yaml`); errors in JSON like the
    rest of the API. Staff only (SPECTACULAR_SETTINGS["SERVE_PERMISSIONS"])."""

    renderer_classes = [OpenApiJsonRenderer, OpenApiJsonRenderer2, OpenApiYamlRenderer, OpenApiYamlRenderer2]

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(response, Response) and response.exception:
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)


# --- anything else under /api/ ------------------------------------------------------------------


@extend_schema(exclude=True)
class UnknownPath(APIView):
    """Unknown paths under /api/ answer JSON like the rest of the API (not Django's HTML page)."""

    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        message = f"Nothing at {request.path}."
        if not request.path.endswith("/"):
            try:
                match = resolve(request.path + "/")
            except Resolver404:
                match = None
            if match is not None and getattr(match.func, "view_class", None) is not UnknownPath:
                message += f" Did you mean {request.path}/ ?"
        raise exceptions.NotFound(message)
