from django.apps import AppConfig


class InstallConfig(AppConfig):
    name = "install"
    verbose_name = "Install, launch and events"

    def ready(self) -> None:
        from . import receivers  # noqa: F401  (connects the purge receiver)
