"""Exactly one beat sends the scheduled tasks, whatever is started by mistake (portals.beat)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from portals import beat
from portals.models import SchedulerLease
from tests.processes import ROOT

TASK = "install.tasks.purge_inbound_log"  # cheap, and routed to the app queue, which nothing consumes here


@pytest.mark.django_db
def test_the_lease_goes_to_one_holder_and_to_another_once_it_ran_out(settings):
    settings.BITRIX24_BEAT_LEASE_SECONDS = 30
    now = timezone.now()
    assert beat.take_or_renew("a", now=now)
    assert not beat.take_or_renew("b", now=now + timedelta(seconds=10))  # a holds it
    assert beat.take_or_renew("a", now=now + timedelta(seconds=20))  # renewed until +50 s
    assert not beat.take_or_renew("b", now=now + timedelta(seconds=45))
    assert beat.take_or_renew("b", now=now + timedelta(seconds=51))  # a stopped renewing
    assert SchedulerLease.objects.get().holder == "b"


@pytest.fixture
def beats(
    child_env: Callable[[Any], dict[str, str]], standin: Any
) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    env = {**child_env(standin), "BITRIX24_BEAT_LEASE_SECONDS": "6"}
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "beat",
                "--loglevel",
                "INFO",
                "--max-interval",
                "1",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        print(proc.communicate(timeout=30)[0][-3000:])


@pytest.mark.system
@pytest.mark.needs_redis("the sent tasks are counted in the broker's queue")
def test_two_beats_send_each_task_as_often_as_one_and_the_second_takes_over(beats, transactional_db):
    PeriodicTask.objects.update(enabled=False)  # the product's own entries: not counted here
    every, _ = IntervalSchedule.objects.get_or_create(every=2, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="test: every 2 s", task=TASK, interval=every, enabled=True)
    broker = redis.Redis.from_url(os.environ["REDIS_URL"])
    queue = f"{django_settings.CELERY_TASK_DEFAULT_QUEUE}.app"
    broker.delete(queue)

    first, second = beats(), beats()
    deadline = time.monotonic() + 60
    while not SchedulerLease.objects.exists():
        assert time.monotonic() < deadline, "no beat took the lease"
        time.sleep(0.2)
    broker.delete(queue)  # count from here, both beats running
    time.sleep(60)
    sent = broker.llen(queue)
    print(f"two beats, 60 s of a 2 s period: {sent} sends")
    assert 29 <= sent <= 31  # as one beat would: 30, give or take one

    holder = SchedulerLease.objects.get().holder
    leader, follower = (first, second) if f"|{first.pid}|" in holder else (second, first)
    assert f"|{leader.pid}|" in holder
    os.killpg(leader.pid, signal.SIGKILL)
    leader.wait(30)
    killed_at, before = time.monotonic(), broker.llen(queue)
    while broker.llen(queue) == before:
        assert time.monotonic() - killed_at < 6 + 2 + 5, "the second beat did not take over"
        time.sleep(0.1)
    took = time.monotonic() - killed_at
    print(f"the second beat sent {took:.1f} s after the first was killed (lease 6 s, period 2 s)")
    assert f"|{follower.pid}|" in SchedulerLease.objects.get().holder
