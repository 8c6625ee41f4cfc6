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
from portals import batches, journal, renewal, selectors, stopping, tasks
from portals.models import (
    AttemptState,
    PairState,
    RenewalAttempt,
    RenewalBatch,
    RenewalLog,
    RenewalOutcome,
    RenewalTrigger,
    TokenPair,
)
from portals.tasks import sweep_due_pairs
from tests.factories import PortalFactory, TokenPairFactory
from tests.processes import seed_pairs

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
        # Tasks that were lost (Redis lost their messages): once their batches' lease is over, the beat tick
        # releases them, saying why, and hands their pairs out again at once.
        published.clear()
        lease = timedelta(seconds=settings.BITRIX24_RENEW_BATCH_LEASE_SECONDS)
        with time_machine.travel(timezone.now() + lease + timedelta(minutes=1)):
            tasks.resolve_interrupted()
        assert sorted(pk for args, _ in published for pk in args[0]) == sorted(p.pk for p in due)
        released = RenewalBatch.objects.exclude(released=0)
        assert sorted(released.values_list("released", flat=True)) == [10, 25, 25]
        assert {b.cause for b in released} == {batches.CAUSES[batches.NOT_STARTED]}
        assert RenewalBatch.objects.filter(finished_at__isnull=True).count() == 3  # the new ones
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
def test_a_connection_broken_between_pairs_fails_no_pair(standin, monkeypatch, fake_clock):
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


# --- handed-out work has a record (portals.batches) ------------------------------------------------


def _hand_out(pairs: list[TokenPair]) -> int:
    handed: list[int] = []
    batches.hand_out(
        [[p.pk for p in pairs]], trigger=RenewalTrigger.BEAT, publish=lambda i, t, b: not handed.append(b)
    )
    return handed[0]


@pytest.mark.django_db(transaction=True)
def test_a_batch_released_before_a_worker_took_it_renews_nothing_when_its_message_comes_late(
    standin, settings
):
    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(2)]
    old = {p.pk: p.refresh_token for p in pairs}
    batch_id = _hand_out(pairs)
    held = TokenPair.objects.filter(batch_id=batch_id)
    lease = RenewalBatch.objects.get(pk=batch_id).lease_expires_at
    assert held.count() == 2 and set(held.values_list("next_attempt_at", flat=True)) == {lease}
    assert not selectors.due_pairs().exists()  # held: the next sweep leaves them to their batch

    with time_machine.travel(lease + timedelta(seconds=1)):
        assert sorted(batches.release_expired()) == sorted(p.pk for p in pairs)
    assert selectors.due_pairs().count() == 2  # due again at once, not an hour later
    # The lost message turns up after all (a worker that was down, Redis restored from a snapshot).
    assert tasks.renew_pairs_task.apply(args=([p.pk for p in pairs], "beat", batch_id)).get() == (
        "released before it started"
    )
    assert {p.pk: p.refresh_token for p in TokenPair.objects.filter(pk__in=old)} == old


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_batch_leaves_the_rest_held_only_until_the_lease(standin):
    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(3)]
    batch_id = _hand_out(pairs)
    assert batches.start(batch_id, time_limit=300)
    # The worker renews the first pair, then is killed (SIGKILL: nothing more runs in it).
    renewal.renew_batch(
        [pairs[0].pk], trigger=RenewalTrigger.BEAT, budget=60, done=lambda pk: batches.unmark(batch_id, pk)
    )
    lease = RenewalBatch.objects.get(pk=batch_id).lease_expires_at
    assert set(TokenPair.objects.filter(batch_id=batch_id).values_list("pk", flat=True)) == {
        pairs[1].pk,
        pairs[2].pk,
    }
    with time_machine.travel(lease - timedelta(seconds=1)):
        assert batches.release_expired() == []  # the worker may still live: its lease holds
    with time_machine.travel(lease + timedelta(seconds=1)):
        assert sorted(batches.release_expired()) == [pairs[1].pk, pairs[2].pk]
    batch = RenewalBatch.objects.get(pk=batch_id)
    assert (batch.released, batch.cause) == (2, batches.CAUSES[batches.INTERRUPTED])
    assert not TokenPair.objects.filter(batch__isnull=False).exists()
    pairs[0].refresh_from_db()
    assert pairs[0].pk not in set(selectors.due_pairs().values_list("pk", flat=True))  # renewed, not released


@pytest.mark.django_db(transaction=True)
def test_a_database_that_stays_away_ends_the_batch_and_releases_the_rest_saying_why(
    standin, monkeypatch, caplog, fake_clock
):
    """The second pair's database stays unreachable through every retry (here: what `_renew_one` reports
    after them); the batch stops there, and its pairs not renewed are due again, with the cause logged."""
    from prometheus_client import REGISTRY

    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(4)]
    renew_one = renewal._renew_one
    monkeypatch.setattr(
        renewal,
        "_renew_one",
        lambda pk, trigger: renewal.DATABASE_UNAVAILABLE if pk == pairs[1].pk else renew_one(pk, trigger),
    )
    before = REGISTRY.get_sample_value("bitrix24_renewal_batches_released_total", {"cause": "database"}) or 0
    batch_id = _hand_out(pairs)
    summary = tasks.renew_pairs_task.apply(args=([p.pk for p in pairs], "beat", batch_id)).get()
    assert summary == "1 renewed; 3 released (database unavailable)"
    batch = RenewalBatch.objects.get(pk=batch_id)
    assert (batch.released, batch.cause) == (3, batches.CAUSES[batches.DATABASE])
    assert batch.finished_at is not None
    assert sorted(selectors.due_pairs().values_list("pk", flat=True)) == [p.pk for p in pairs[1:]]
    assert (
        f"Renewal batch {batch_id} released 3 pair(s) unrenewed: the database was unavailable" in caplog.text
    )
    after = REGISTRY.get_sample_value("bitrix24_renewal_batches_released_total", {"cause": "database"})
    assert after == before + 1


@pytest.mark.django_db(transaction=True)
def test_the_database_refusing_a_pair_is_retried_with_backoff_inside_the_batch(
    standin, monkeypatch, fake_clock
):
    from django.db.utils import OperationalError

    pairs = [TokenPairFactory.for_standin(standin.add_portal(), issued_days_ago=25) for _ in range(2)]
    real = renewal.renew_pair
    refusals = [3]

    def restarting(pair_id, **kwargs):
        if pair_id == pairs[1].pk and refusals[0]:
            refusals[0] -= 1
            raise OperationalError("the database system is starting up")
        return real(pair_id, **kwargs)

    monkeypatch.setattr(renewal, "renew_pair", restarting)
    batch = renewal.renew_batch([p.pk for p in pairs], trigger=RenewalTrigger.BEAT, budget=60)
    assert batch.outcomes == {"renewed": 2} and not batch.left
    assert fake_clock.slept == [1.0, 2.0, 4.0]


_ONE_BATCH = """
import django
django.setup()
from portals import batches, selectors, tasks
ids = sorted(selectors.due_pairs().values_list("pk", flat=True))
handed = []
batches.hand_out([ids], trigger="beat", publish=lambda i, t, b: not handed.append(b))
print("batch", handed[0], len(ids), flush=True)
print("summary:", tasks.renew_pairs_task(ids, "beat", handed[0]), flush=True)
"""


@pytest.mark.system
@pytest.mark.parametrize("down_for", [3.0, 45.0], ids=["restart", "down-45s"])
def test_a_postgresql_restart_mid_batch_leaves_no_pair_held_and_every_release_logged(
    standin, child_env, private_postgres, down_for
):
    """PostgreSQL stopped while a worker renews a batch of 60 pairs, and started again `down_for` seconds
    later. Before, the pair in hand was tried once more at once and the batch dropped every remaining pair in
    milliseconds, silently, held for an hour. Now every pair is renewed, or released with its cause logged
    and due again; none is left marked with the batch or held past its lease."""
    env = {**child_env(standin), "DATABASE_URL": private_postgres.url, "DATABASE_CONN_MAX_AGE": "0"}
    seed_pairs(standin, 60, env)
    standin.oauth_latency = 0.05
    ok_before = standin.stats["refresh_ok"]
    worker = subprocess.Popen(
        [sys.executable, "-c", _ONE_BATCH],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while standin.stats["refresh_ok"] - ok_before < 15:
        assert time.monotonic() < deadline and worker.poll() is None, "the batch did not get going"
        time.sleep(0.01)
    private_postgres.stop()
    stopped = time.monotonic()
    time.sleep(down_for)
    private_postgres.start()
    output = worker.communicate(timeout=300)[0]
    took = time.monotonic() - stopped
    print(f"PostgreSQL down {down_for:.0f} s; the batch ended {took:.1f} s after the stop:\n{output[-3000:]}")
    assert worker.returncode == 0, output

    with psycopg.connect(private_postgres.url) as conn:
        marked = conn.execute("SELECT count(*) FROM portals_tokenpair WHERE batch_id IS NOT NULL").fetchone()[
            0
        ]
        batch = conn.execute(
            "SELECT released, cause, finished_at IS NOT NULL, lease_expires_at FROM portals_renewalbatch"
        ).fetchall()
        held = conn.execute(
            "SELECT count(*) FROM portals_tokenpair p, portals_renewalbatch b "
            "WHERE p.next_attempt_at > b.lease_expires_at"
        ).fetchone()[0]
        renewed = conn.execute(
            "SELECT count(*) FROM portals_tokenpair WHERE last_renewed_at IS NOT NULL"
        ).fetchone()[0]
        due_again = conn.execute(
            "SELECT count(*) FROM portals_tokenpair WHERE last_renewed_at IS NULL AND next_attempt_at IS NULL"
        ).fetchone()[0]
    assert marked == 0  # nothing left marked with the batch
    assert held == 0  # nor held past its lease (a pair failed by the OAuth server keeps its own back-off)
    ((released, cause, finished, _),) = batch
    assert finished
    assert renewed + released == 60 and due_again == released, (renewed, released, due_again)
    if released:
        assert cause == batches.CAUSES[batches.DATABASE]
        assert f"released {released} pair(s) unrenewed: the database was unavailable" in output
    else:
        assert f"summary: {renewed} renewed" in output
    assert standin.stats["refresh_ok"] - ok_before == renewed  # no refresh was sent for a released pair
