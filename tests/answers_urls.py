"""URLs for tests/test_answers.py: a plain Django view and an API view that raise whatever domain error the
test names (`?error=<key of ERRORS>`), beside the project's own URLs."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import path
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.views import APIView

from api.frontend import FrontendAPIView
from config.urls import urlpatterns as project_urlpatterns

# Filled by the test: key → a function that raises the error.
ERRORS: dict[str, Any] = {}


def plain_view(request: HttpRequest) -> HttpResponse:
    ERRORS[request.GET["error"]]()
    return HttpResponse("not reached")


class ApiView(APIView):
    """As an app's frontend endpoint or a staff endpoint meets an error: in a DRF view."""

    authentication_classes = [SessionAuthentication]  # as the staff API reads a logged-in user
    permission_classes = [AllowAny]

    def get(self, request: Request) -> HttpResponse:
        ERRORS[request.query_params["error"]]()
        return HttpResponse("not reached")


class FrontendView(FrontendAPIView):
    """An app's frontend endpoint (api.frontend), its AUTH_ID check left out: the error, not the token, is
    under test."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def get(self, request: Request) -> HttpResponse:
        ERRORS[request.query_params["error"]]()
        return HttpResponse("not reached")


urlpatterns = [
    path("test-answers/plain/", plain_view),
    path("test-answers/api/", ApiView.as_view()),
    path("test-answers/frontend/", FrontendView.as_view()),
    *project_urlpatterns,
]
