from django.apps import AppConfig


class PortalsConfig(AppConfig):
    name = "portals"
    verbose_name = "Portals and tokens"

    def ready(self) -> None:
        # The renewal service sits below the task module and may not import it; web requests still
        # need to hand renewals to a worker, so the task module's queueing function is passed down.
        # Importing the checks module registers the token-key system check.
        from . import (  # noqa: PLC0415  (AppConfig.ready: apps are loaded only now)
            checks,  # noqa: F401
            registry,
            renewal,
            tasks,
        )

        renewal.set_queue(tasks.queue_on_demand_renewal)
        # The app's own handlers (each installed app's bitrix24.py), in every process: the web needs them
        # to know which events to keep, the worker to run them, the sweep to know what to bind.
        registry.autodiscover()
