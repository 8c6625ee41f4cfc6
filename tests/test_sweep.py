"""The proactive renewal sweep: which pairs are due, how they are spread, and a real worker run."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import time_machine
from celery.signals import before_task_publish
from django.db import connection, transaction
from django.utils import timezone

from config.celery import app as celery_app
from portals import journal, renewal, selectors, stopping, tasks
from portals.models import (
    AttemptState,
    PairState,
    RenewalAttempt,
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


def _published(task_name: str) -> tuple[list[tuple[list, dict]], object]:
    """Messages published for `task_name` while connected: (args, headers) each."""
    published: list[tuple[list, dict]] = []

    def record(sender=None, body=None, headers=None, **kwargs):
        if sender == task_name:
            published.append((body[0], headers))

    return published, record


@pytest.mark.django_db(transaction=True)
def test_the_sweep_hands_out_due_pairs_in_batches_at_once_capped_per_run(standin, settings):
    settings.BITRIX24_RENEW_BATCH = 25
    settings.BITRIX24_RENEW_PER_SWEEP = 50
    due = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25 - i / 20) for i in range(60)]
    TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=2)
    published, record = _published("portals.tasks.renew_pairs_task")
    before_task_publish.connect(record, weak=False)
    try:
        with transaction.atomic():
            assert tasks.queue_due_renewals() == 50
            assert published == []  # nothing leaves before the transaction commits
        # No countdown tasks: a worker holds none of them in memory, whatever the number due.
        assert [len(args[0]) for args, _ in published] == [25, 25]
        assert all(
            headers.get("eta") is None and headers.get("countdown") is None for _, headers in published
        )
        handed = [pk for args, _ in published for pk in args[0]]
        # The most urgent (oldest refresh token) first; each pair once.
        assert handed == [p.pk for p in due[:50]]
        # Handed-out pairs are held: the next run hands out only the rest, the one after that nothing.
        published.clear()
        assert tasks.queue_due_renewals() == 10
        assert [pk for args, _ in published for pk in args[0]] == [p.pk for p in due[50:]]
        assert tasks.queue_due_renewals() == 0
        # A task that was lost: once the hold is over, its pairs are handed out again.
        with time_machine.travel(timezone.now() + tasks.RELEASE_HOLD + timedelta(minutes=1)):
            assert tasks.queue_due_renewals() == 50
    finally:
        before_task_publish.disconnect(record)
        celery_app.control.purge()


@pytest.mark.django_db(transaction=True)
def test_a_batch_renews_each_pair_on_its_own_and_skips_one_held_elsewhere(standin, settings):
    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(4)]
    busy = pairs[1]
    # Another live process (this one, as far as the journal can tell) holds an attempt on `busy`.
    holder = journal.current_holder()
    RenewalAttempt.objects.create(
        pair=busy,
        portal_id=busy.portal_id,
        trigger=RenewalTrigger.STAFF,
        old_fingerprint="x",
        holder_host=holder.host,
        holder_pid=holder.pid,
        holder_start=holder.start,
        lease_expires_at=timezone.now() + timedelta(minutes=10),
    )
    gone = TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25)
    gone_id = gone.pk
    gone.delete()
    ids = [pairs[0].pk, busy.pk, gone_id, pairs[2].pk, pairs[3].pk]
    started = time.monotonic()

    assert tasks.renew_pairs_task.apply(args=(ids,)).get() == "1 busy, 1 gone, 3 renewed"

    assert time.monotonic() - started < 10  # the busy pair was not waited for
    for pair in (pairs[0], pairs[2], pairs[3]):
        attempts = RenewalAttempt.objects.filter(pair=pair)
        assert [a.state for a in attempts] == [AttemptState.STORED]  # its own journal entry
        assert RenewalLog.objects.filter(pair=pair).count() == 1  # one log row, written once
        pair.refresh_from_db()
        assert pair.next_attempt_at is None and pair.last_renewed_at is not None
    assert RenewalLog.objects.get(pair=busy).outcome == RenewalOutcome.SKIPPED


@pytest.mark.django_db(transaction=True)
def test_a_stop_between_pairs_ends_the_batch_and_hands_the_rest_back(standin, monkeypatch):
    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(3)]
    old = {p.pk: p.refresh_token for p in pairs}
    renew_one = renewal._renew_one

    def then_stop(pair_id: int, trigger: str) -> str:
        outcome = renew_one(pair_id, trigger)
        stopping._requested.set()  # as a SIGINT noted during that refresh leaves it
        return outcome

    monkeypatch.setattr(renewal, "_renew_one", then_stop)
    published, record = _published("portals.tasks.renew_pairs_task")
    before_task_publish.connect(record, weak=False)
    try:
        assert tasks.renew_pairs_task.apply(args=([p.pk for p in pairs],)).get() == "1 renewed; 2 handed back"
    finally:
        stopping._requested.clear()
        before_task_publish.disconnect(record)
        celery_app.control.purge()
    assert [args[0] for args, _ in published] == [[pairs[1].pk, pairs[2].pk]]
    for pair in pairs:
        pair.refresh_from_db()
    assert pairs[0].refresh_token != old[pairs[0].pk]
    assert [p.refresh_token for p in pairs[1:]] == [old[p.pk] for p in pairs[1:]]
    assert not RenewalAttempt.objects.filter(pair__in=pairs[1:]).exists()  # not even journaled


@pytest.mark.django_db(transaction=True)
def test_a_batch_out_of_time_queues_the_rest(standin, monkeypatch):
    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(3)]
    monkeypatch.setattr(tasks, "BATCH_BUDGET", 0)  # the first pair is always started; then time is up
    published, record = _published("portals.tasks.renew_pairs_task")
    before_task_publish.connect(record, weak=False)
    try:
        assert tasks.renew_pairs_task.apply(args=([p.pk for p in pairs],)).get() == "1 renewed; 2 handed back"
    finally:
        before_task_publish.disconnect(record)
        celery_app.control.purge()
    assert [args[0] for args, _ in published] == [[pairs[1].pk, pairs[2].pk]]


@pytest.mark.django_db(transaction=True)
def test_a_batch_starts_no_pair_once_its_time_budget_is_spent(standin, monkeypatch, fake_clock):
    """The sweep's budget on the injected clock: each renewal here "takes" 25 s, so a 60 s budget starts
    three pairs (0, 25, 50 s) and hands the other two back untouched, without waiting a second."""
    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(5)]
    renew_one = renewal._renew_one

    def slow_renewal(pair_id: int, trigger: str) -> str:
        outcome = renew_one(pair_id, trigger)
        fake_clock.advance(25)
        return outcome

    monkeypatch.setattr(renewal, "_renew_one", slow_renewal)
    batch = renewal.renew_batch([p.pk for p in pairs], trigger=RenewalTrigger.BEAT, budget=60)
    assert batch.outcomes == {"renewed": 3}, batch.summary()
    assert batch.left == [p.pk for p in pairs[3:]]
    assert not batch.stopped


@pytest.mark.needs_postgres(
    "terminates this process's PostgreSQL backend between two pairs: SQLite has no server connection to lose"
)
@pytest.mark.django_db(transaction=True)
def test_a_connection_broken_between_pairs_fails_no_pair(standin, monkeypatch):
    """A PostgreSQL restart (here: the backend of this process's session terminated) between two pairs:
    the next pair opens a new connection and renews."""
    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(3)]
    renew_one = renewal._renew_one
    settings_dict = connection.settings_dict

    cut: list[int] = []

    def then_cut(pair_id: int, trigger: str) -> str:
        outcome = renew_one(pair_id, trigger)
        if cut:
            return outcome
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        with psycopg.connect(
            host=settings_dict["HOST"],
            port=settings_dict["PORT"] or 5432,
            user=settings_dict["USER"],
            password=settings_dict.get("PASSWORD") or None,
            dbname=settings_dict["NAME"],
            autocommit=True,
        ) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        cut.append(pid)
        return outcome

    monkeypatch.setattr(renewal, "_renew_one", then_cut)
    batch = renewal.renew_batch([p.pk for p in pairs], trigger=RenewalTrigger.BEAT, budget=60)
    assert batch.outcomes == {"renewed": 3}, batch.summary()
    assert cut


@pytest.mark.system
@pytest.mark.django_db(transaction=True)
def test_a_sweep_over_many_portals_runs_through_a_real_worker(standin, settings, child_env):
    n = 30
    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(n)]
    old = {p.pk: p.refresh_token for p in pairs}
    standin.oauth_latency = 0.05
    ok_before, bad_before = standin.stats["refresh_ok"], standin.stats["refresh_invalid_grant"]
    env = child_env(standin)
    env["BITRIX24_RENEW_BATCH"] = "7"  # 30 pairs: five tasks, the last one short
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
        sweep_due_pairs.delay()  # the worker runs the sweep, which hands out the pairs in batches
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
