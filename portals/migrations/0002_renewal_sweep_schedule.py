"""Creates the beat entry for the renewal sweep once; staff may change or disable it in the admin
(django-celery-beat's "Periodic tasks"), and later deploys do not overwrite their change."""

from django.db import migrations

TASK = "portals.tasks.sweep_due_pairs"
NAME = "Renew refresh tokens that near the end of their life"


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    # Every 15 minutes: the sweep only selects pairs that are due, so a short interval costs one
    # query and spreads the work, while renewals themselves stay rare (see docs/tokens.md).
    every, _ = IntervalSchedule.objects.get_or_create(every=15, period="minutes")
    PeriodicTask.objects.get_or_create(name=NAME, defaults={"task": TASK, "interval": every, "enabled": True})


def remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("portals", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
