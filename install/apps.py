from django.apps import AppConfig


class InstallConfig(AppConfig):
    name = "install"
    verbose_name = "Install, launch and events"

    def ready(self) -> None:
        # AppConfig.ready is Django's documented place to connect signal receivers.
        from . import receivers  # noqa: F401, PLC0415
