from django.apps import AppConfig


class EventAppConfig(AppConfig):
    """A small app built on the project, as an app author would write one, for the event tests."""

    name = "tests.eventapp"
    label = "eventapp"
