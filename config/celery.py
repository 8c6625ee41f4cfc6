"""The Celery app: Redis broker when REDIS_URL is set, kombu's filesystem broker otherwise."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("bitrix24_backend")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
