from django.urls import path

from . import views

urlpatterns = [
    path("portals/", views.PortalList.as_view(), name="api-portals"),
    path("portals/<str:member_id>/", views.PortalDetail.as_view(), name="api-portal"),
]
