"""Creates the beat entry that resolves interrupted renewals every minute, once; staff may change or disable it
in the admin, and later deploys do not overwrite their change."""

from django.db import migrations

TASK = "portals.tasks.resolve_interrupted"
NAME = "Resolve renewals interrupted after their answer (recover, or flag lost)"


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    # Every minute: a pair whose answer was lost is recovered or flagged within its lease and a minute.
    every, _ = IntervalSchedule.objects.get_or_create(every=1, period="minutes")
    PeriodicTask.objects.get_or_create(name=NAME, defaults={"task": TASK, "interval": every, "enabled": True})


def remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("portals", "0010_lost_reported"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
