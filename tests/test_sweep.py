"""The proactive renewal sweep: which pairs are due, how they are spread, and a real worker run."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from celery.signals import before_task_publish
from django.db import transaction
from django.utils import timezone

from config.celery import app as celery_app
from portals import selectors, tasks
from portals.models import (
    PairState,
    Portal,
    PortalState,
    RenewalLog,
    RenewalOutcome,
    RenewalTrigger,
    TokenPair,
)
from portals.tasks import sweep_due_pairs

ROOT = Path(__file__).resolve().parent.parent
DAY = timedelta(days=1)


def _pair(standin, *, issued_days_ago: float, now=None, **fields) -> TokenPair:
    """A portal with one stored pair whose refresh token was issued `issued_days_ago` before `now`."""
    fake = standin.add_portal()
    tokens = fake.issue_tokens(1, admin=True)
    now = now or timezone.now()
    portal = Portal.objects.create(
        member_id=fake.member_id,
        domain=fake.domain,
        protocol="http",
        oauth_server=standin.oauth_url,
        state=fields.pop("portal_state", PortalState.INSTALLED),
    )
    return TokenPair.objects.create(
        portal=portal,
        user_id=1,
        is_background=True,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
        access_expires_at=now + timedelta(hours=1),
        refresh_issued_at=now - issued_days_ago * DAY,
        **fields,
    )


@pytest.mark.django_db
def test_due_pairs_time_travel(standin, settings):
    settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS = 28
    settings.BITRIX24_RENEW_MARGIN_DAYS = 7
    now = timezone.now()
    fresh = _pair(standin, issued_days_ago=1, now=now)
    almost = _pair(standin, issued_days_ago=20.9, now=now)
    due = _pair(standin, issued_days_ago=21.1, now=now)
    overdue = _pair(standin, issued_days_ago=27, now=now)
    dead = _pair(standin, issued_days_ago=25, now=now, state=PairState.DEAD)
    rejected = _pair(standin, issued_days_ago=25, now=now, state=PairState.CREDENTIALS_REJECTED)
    backing_off = _pair(standin, issued_days_ago=25, now=now, next_attempt_at=now + timedelta(minutes=30))
    retry_now = _pair(standin, issued_days_ago=25, now=now, next_attempt_at=now - timedelta(minutes=1))
    uninstalled = _pair(standin, issued_days_ago=25, now=now, portal_state=PortalState.UNINSTALLED)

    def selected(at):
        return set(selectors.due_pairs(at).values_list("pk", flat=True))

    assert selected(now) == {due.pk, overdue.pk, retry_now.pk}
    # An hour later the back-off is over; two hours less than a day later, "almost" has become due.
    assert selected(now + timedelta(hours=1)) == {due.pk, overdue.pk, retry_now.pk, backing_off.pk}
    assert almost.pk in selected(now + timedelta(hours=3))
    # Twenty days on, even the fresh pair is due; dead, rejected and uninstalled ones never are.
    far = selected(now + 20 * DAY)
    assert fresh.pk in far
    assert not far & {dead.pk, rejected.pk, uninstalled.pk}


@pytest.mark.django_db(transaction=True)
def test_sweep_queues_each_due_pair_once_spread_over_the_window(standin, settings):
    settings.BITRIX24_RENEW_SPREAD_SECONDS = 600
    due = [_pair(standin, issued_days_ago=25) for _ in range(40)]
    _pair(standin, issued_days_ago=2)
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
    pairs = [_pair(standin, issued_days_ago=25) for _ in range(n)]
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
