"""Custody apart from the app's work: every task's queue is named in one table (config/routing.py), renewals
a web request waits for go first, and the queue split loses nothing an older release left behind."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from config import routing
from config.celery import app as celery_app
from portals import journal, oauth

OURS = ("portals.", "events.", "install.")


def _queue(name: str, *args, **kwargs) -> str:
    return routing.route_task(name, args, kwargs, {})["queue"]


def test_every_task_of_the_product_is_in_the_table():
    from events import tasks as event_tasks
    from install import tasks as install_tasks
    from portals import tasks as portal_tasks

    assert all((event_tasks, install_tasks, portal_tasks))  # imported: their tasks are registered
    ours = {name for name in celery_app.tasks if name.startswith(OURS)}
    assert ours, "no task found: the test would pass on nothing"
    assert ours == set(routing.ROUTES), "a task without a line in config/routing.py, or a line without a task"


def test_custody_and_the_apps_work_go_to_their_own_queues():
    base = settings.CELERY_TASK_DEFAULT_QUEUE
    assert _queue("portals.tasks.renew_pair_task", 7, "on_demand", False) == f"{base}.custody.now"
    assert _queue("portals.tasks.renew_pair_task", 7, "staff", True) == f"{base}.custody"
    assert _queue("portals.tasks.renew_pairs_task", [1, 2]) == f"{base}.custody"
    assert _queue("portals.tasks.carry_out_task", 3, kind="confirm_uninstall") == f"{base}.custody"
    assert _queue("portals.tasks.carry_out_task", 3) == f"{base}.custody"  # a message of an older release
    assert _queue("portals.tasks.carry_out_task", 3, kind="bind_events") == f"{base}.app"
    assert _queue("events.tasks.handle_event_task", 9) == f"{base}.app"
    assert _queue("myapp.tasks.report") == f"{base}.app"  # an app author's own task


def test_a_published_task_lands_in_one_queue_only():
    """Queues bound by one routing key would each get a copy of every task (and run it twice)."""
    keys = [queue.routing_key for queue in celery_app.conf.task_queues]
    names = [queue.name for queue in celery_app.conf.task_queues]
    assert keys == names and len(set(keys)) == len(keys)
    base = settings.CELERY_TASK_DEFAULT_QUEUE
    # A worker given no -Q serves custody first, then the app, then the bare queue older releases used.
    assert names == [f"{base}.custody.now", f"{base}.custody", f"{base}.app", base]


@pytest.mark.needs_redis("the queue order is the Redis transport's; the filesystem broker polls in turn")
def test_a_worker_takes_custody_first_whatever_order_kombu_holds_its_queues_in():
    """kombu keeps a worker's queues in a set: its own "priority" order is the set's, and "sorted" puts
    `custody` before `custody.now`. The transport is given the product's order instead."""
    from kombu.transport.redis import Channel
    from kombu.utils.scheduling import cycle_by_name

    strategy = settings.CELERY_BROKER_TRANSPORT_OPTIONS["queue_order_strategy"]
    assert "queue_order_strategy" in Channel.from_transport_options  # the option kombu reads
    base = settings.CELERY_TASK_DEFAULT_QUEUE
    served = [f"{base}.app", base, f"{base}.custody", f"{base}.custody.now"]
    for arrangement in (served, served[::-1], sorted(served), set(served)):
        order = cycle_by_name(strategy)()
        order.update(arrangement)
        assert order.consume(4) == [f"{base}.custody.now", f"{base}.custody", base, f"{base}.app"]
        order.rotate(f"{base}.custody.now")  # a task taken from it does not move it back
        assert order.consume(1) == [f"{base}.custody.now"]


@pytest.mark.needs_redis("the second copies are kept in Redis when it is configured")
def test_a_second_copy_kept_before_the_queue_split_is_still_found():
    """The copy's key carries the deployment's name (CELERY_QUEUE), as it did before queues were split:
    a renewal whose answer was kept by the previous release is recovered by this one."""
    grant = oauth.TokenGrant(
        access_token="access-0123456789",
        refresh_token="refresh-0123456789",
        expires_at=timezone.now() + timedelta(hours=1),
        scope="crm",
        member_id="m" * 32,
        user_id=1,
        domain="portal.example",
        status="P",
        server_endpoint="https://oauth.bitrix.info/rest/",
    )
    attempt_id = int.from_bytes(os.urandom(4), "big")
    # Written as the release before the split wrote it: its key, its queue name.
    key = f"{os.environ.get('CELERY_QUEUE', 'bitrix24')}:renewal-grant:{attempt_id}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.set(key, journal._encode(grant, 5, "fp-old"), ex=600)
    try:
        found = journal.find(attempt_id, pair_id=5, old_fingerprint="fp-old")
    finally:
        client.delete(key)
    assert found is not None and found.refresh_token == "refresh-0123456789"


@pytest.mark.django_db
def test_a_custody_task_that_needs_a_fresh_token_renews_it_itself(standin, monkeypatch):
    """A custody task never waits on its own queue: with one custody worker of concurrency 1 that would wait
    forever. An uninstall confirmation (a forged ONAPPUNINSTALL: the app is still installed) whose portal's
    access token has expired renews it in the task to ask app.info, not by queueing a renewal (only web
    requests hand renewals to workers: portals.middleware)."""
    import time_machine

    from portals import renewal
    from portals.models import PortalState, TokenPair, WantedKind
    from portals.tasks import carry_out_task, want
    from tests.factories import PortalFactory

    queued: list[int] = []
    monkeypatch.setattr(renewal, "_queue", lambda pair_id, rejected="": queued.append(pair_id) or True)
    portal = PortalFactory.for_standin(standin.add_portal())
    issued = TokenPair.objects.get(portal=portal).refresh_token
    action = want(WantedKind.CONFIRM_UNINSTALL, portal=portal)
    with time_machine.travel(timezone.now() + timedelta(hours=1, minutes=1)):  # the access token expired
        carry_out_task.apply(args=(action.pk,), kwargs={"kind": action.kind}).get()
    action.refresh_from_db()
    assert "Bitrix24 says installed" in action.last_error  # it asked, with a fresh token
    assert TokenPair.objects.get(portal=portal).refresh_token != issued  # renewed, here
    assert queued == []  # not handed to a worker
    portal.refresh_from_db()
    assert portal.state == PortalState.INSTALLED  # and Bitrix24 said the app is still there


@pytest.mark.django_db
def test_interrupted_renewals_are_resolved_every_minute_not_at_the_sweep():
    """The time from a lost answer to the portal being flagged is the lease and a minute, not the sweep's 15."""
    from django_celery_beat.models import PeriodicTask

    entry = PeriodicTask.objects.select_related("interval").get(task="portals.tasks.resolve_interrupted")
    assert entry.enabled and (entry.interval.every, entry.interval.period) == (1, "minutes")
    assert _queue("portals.tasks.resolve_interrupted") == f"{settings.CELERY_TASK_DEFAULT_QUEUE}.custody"
