"""Creates the beat entry that applies deferred lifecycle events once; staff may change or disable it in the
admin, and later deploys do not overwrite their change."""

from django.db import migrations

TASK = "install.tasks.apply_deferred_task"
NAME = "Verify and apply deferred install and update events"


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    # Every minute: an access token lives an hour, a deferred event must be verified within it.
    every, _ = IntervalSchedule.objects.get_or_create(every=1, period="minutes")
    PeriodicTask.objects.get_or_create(name=NAME, defaults={"task": TASK, "interval": every, "enabled": True})


def remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("install", "0005_deferred_events"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
