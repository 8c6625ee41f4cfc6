from django.contrib import admin
from django.urls import include, path

from portals.admin.dashboard import dashboard
from portals.exporter import metrics_view
from portals.views import healthz, home, livez

urlpatterns = [
    path("", home, name="home"),
    path("", include("install.urls")),
    path("api/", include("api.urls")),
    path("admin/dashboard/", admin.site.admin_view(dashboard), name="admin_dashboard"),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("livez", livez, name="livez"),
    path("metrics", metrics_view, name="metrics"),
]
