from django.urls import path

from . import views

urlpatterns = [
    path("install/", views.install, name="install"),
    path("app/", views.app, name="app"),
    path("events/", views.events, name="events"),
]
