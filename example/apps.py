from django.apps import AppConfig


class ExampleConfig(AppConfig):
    """A worked example of an app built on this backend: a CRM deal tab, an event handler, an offline
    event handler and a frontend endpoint. Enabled with BITRIX24_EXAMPLE_APP (development, tests and the
    stand-in); never bound on customer portals unless that setting is on."""

    name = "example"
    verbose_name = "Example app"
