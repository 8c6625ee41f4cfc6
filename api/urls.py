from django.urls import include, path, re_path

from . import views
from .frontend import frontend_modules

urlpatterns = [
    path("portals/", views.PortalList.as_view(), name="api-portals"),
    path("portals/<str:member_id>/", views.PortalDetail.as_view(), name="api-portal"),
    path("portals/<str:member_id>/renew/", views.PortalRenew.as_view(), name="api-portal-renew"),
    path("portals/<str:member_id>/call/", views.PortalCall.as_view(), name="api-portal-call"),
    path("health/", views.Health.as_view(), name="api-health"),
    path("app/me/", views.Me.as_view(), name="api-app-me"),
    path("app/profile/", views.Profile.as_view(), name="api-app-profile"),
    # The app's own frontend endpoints (api.frontend), ahead of the answer for unknown paths below.
    *(path("app/", include(module)) for module in frontend_modules()),
    path("schema/", views.Schema.as_view(), name="api-schema"),
    # Log in / out links of the browsable API (staff sign in with their admin account).
    path("auth/", include("rest_framework.urls")),
    re_path(r"^.*$", views.UnknownPath.as_view()),
]
