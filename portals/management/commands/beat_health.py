"""`manage.py beat_health`: exit 0 while beat sends its tasks, 1 when it has stopped (a container's health check).

Beat keeps its schedule in the database (django-celery-beat): the event sweep is due every minute, and beat
records its sends there every three minutes (its sync). Nothing recorded for six minutes, beat is not
working, whatever its process says.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

EVENT_SWEEP = "events.tasks.sweep_events"
QUIET_FOR = timedelta(minutes=6)


class Command(BaseCommand):
    help = "Exit 0 while beat sends its tasks (the event sweep was recorded within six minutes), else 1."

    def handle(self, *args: Any, **options: Any) -> None:
        task = PeriodicTask.objects.filter(task=EVENT_SWEEP, enabled=True).first()
        if task is None:
            raise CommandError(f"no enabled beat entry for {EVENT_SWEEP}: run `migrate`")
        if task.last_run_at is None or timezone.now() - task.last_run_at > QUIET_FOR:
            raise CommandError(f"beat has not sent {EVENT_SWEEP} since {task.last_run_at or 'ever'}")
        self.stdout.write(f"beat sent {EVENT_SWEEP} at {task.last_run_at:%Y-%m-%d %H:%M:%S}")
