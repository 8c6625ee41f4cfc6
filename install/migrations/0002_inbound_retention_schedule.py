"""Creates the beat entry for the inbound log's retention once; staff may change or disable it in the
admin (django-celery-beat's "Periodic tasks"), and later deploys do not overwrite their change."""

from django.db import migrations

TASK = "install.tasks.purge_inbound_log"
NAME = "Delete inbound requests past their retention period"


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    # Hourly: each run deletes what aged past the retention since the last one, a small batch, rather
    # than a day's worth at once.
    every, _ = IntervalSchedule.objects.get_or_create(every=1, period="hours")
    PeriodicTask.objects.get_or_create(name=NAME, defaults={"task": TASK, "interval": every, "enabled": True})


def remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("install", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
