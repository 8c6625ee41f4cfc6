"""The Celery app: Redis broker when REDIS_URL is set, kombu's filesystem broker otherwise."""

import os

from celery import Celery
from celery.signals import task_prerun

from portals import stopping

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("bitrix24_backend")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
def _note_stops(**kwargs: object) -> None:
    """Pool processes ignore SIGINT (billiard): a stop that arrives before a refresh starts is noted so
    that it is not started, and no retry follows (portals.stopping)."""
    stopping.note_stops()
