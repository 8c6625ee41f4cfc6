"""The proactive renewal sweep: which pairs are due, how they are spread, and a real worker run."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine
from celery.signals import before_task_publish
from django.db import transaction
from django.utils import timezone

from config.celery import app as celery_app
from portals import selectors, tasks
from portals.models import (
    PairState,
    RenewalLog,
    RenewalOutcome,
    RenewalTrigger,
    TokenPair,
)
from portals.tasks import sweep_due_pairs
from tests.factories import PortalFactory, TokenPairFactory

ROOT = Path(__file__).resolve().parent.parent
DAY = timedelta(days=1)


@pytest.mark.django_db
def test_due_pairs_time_travel(standin, settings):
    settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS = 28
    settings.BITRIX24_RENEW_MARGIN_DAYS = 7

    def pair(days: float, **fields):
        """A stored background pair of a stand-in portal, its refresh token issued `days` ago."""
        return TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=days, **fields)

    def selected():
        return set(selectors.due_pairs().values_list("pk", flat=True))

    with time_machine.travel(timezone.now(), tick=False) as clock:
        now = timezone.now()
        fresh = pair(1)
        almost = pair(20.9)
        due = pair(21.1)
        overdue = pair(27)
        dead = pair(25, state=PairState.DEAD)
        rejected = pair(25, state=PairState.CREDENTIALS_REJECTED)
        backing_off = pair(25, next_attempt_at=now + timedelta(minutes=30))
        retry_now = pair(25, next_attempt_at=now - timedelta(minutes=1))
        fake = standin.add_portal()
        uninstalled = TokenPairFactory.for_standin(
            fake, portal=PortalFactory.for_standin(fake, users=(), uninstalled=True), issued_days_ago=25
        )

        assert selected() == {due.pk, overdue.pk, retry_now.pk}
        # An hour later the back-off is over; two hours less than a day later, "almost" has become due.
        clock.shift(timedelta(hours=1))
        assert selected() == {due.pk, overdue.pk, retry_now.pk, backing_off.pk}
        assert almost.pk not in selected()
        clock.shift(timedelta(hours=2))
        assert almost.pk in selected()
        # Twenty days on, even the fresh pair is due; dead, rejected and uninstalled ones never are.
        clock.move_to(now + 20 * DAY)
        far = selected()
        assert fresh.pk in far
        assert not far & {dead.pk, rejected.pk, uninstalled.pk}


@pytest.mark.django_db(transaction=True)
def test_sweep_queues_each_due_pair_once_spread_over_the_window(standin, settings):
    settings.BITRIX24_RENEW_SPREAD_SECONDS = 600
    due = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(40)]
    TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=2)
    published: list[tuple[int, str]] = []

    def record(sender=None, body=None, headers=None, **kwargs):
        if sender == "portals.tasks.renew_pair_task":
            published.append((body[0][0], headers["eta"]))

    before_task_publish.connect(record, weak=False)
    try:
        with transaction.atomic():
            queued = tasks.queue_due_renewals()
            assert published == []  # nothing leaves before the transaction commits
        assert queued == 40
    finally:
        before_task_publish.disconnect(record)
        celery_app.control.purge()
    assert sorted(pk for pk, _ in published) == sorted(p.pk for p in due)
    now = timezone.now()
    delays = [
        (timezone.datetime.fromisoformat(eta) - now).total_seconds()
        for _, eta in published  # type: ignore[attr-defined]
    ]
    assert all(-5 <= d <= 600 for d in delays)
    # Spread, not bunched: 40 random delays over ten minutes cover most of the window.
    assert max(delays) - min(delays) > 300
    assert len({round(d) for d in delays}) > 30


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_sweep_over_many_portals_runs_through_a_real_worker(standin, settings, child_env):
    n = 30
    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(n)]
    old = {p.pk: p.refresh_token for p in pairs}
    standin.oauth_latency = 0.05
    ok_before, bad_before = standin.stats["refresh_ok"], standin.stats["refresh_invalid_grant"]
    env = child_env(standin)
    env["BITRIX24_RENEW_SPREAD_SECONDS"] = "3"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "--concurrency",
            "4",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        settings.BITRIX24_RENEW_SPREAD_SECONDS = 3
        sweep_due_pairs.delay()  # the worker runs the sweep, which fans out one task per pair
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            renewed = RenewalLog.objects.filter(
                outcome=RenewalOutcome.RENEWED, trigger=RenewalTrigger.BEAT, pair__in=pairs
            ).count()
            if renewed == n or worker.poll() is not None:
                break
            time.sleep(0.5)
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0]
        celery_app.control.purge()
    assert renewed == n, output[-3000:]
    assert standin.stats["refresh_ok"] - ok_before == n
    assert standin.stats["refresh_invalid_grant"] == bad_before
    for pair in TokenPair.objects.filter(pk__in=old):
        assert pair.refresh_token != old[pair.pk]
        assert pair.refresh_issued_at > timezone.now() - timedelta(minutes=5)
    assert not selectors.due_pairs().exists()
