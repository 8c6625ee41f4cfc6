"""Renewal of token pairs against the stand-in's single-use refresh tokens."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import requests
import time_machine
from django.core.management import CommandError, call_command
from django.db import connections
from django.utils import timezone

from portals import oauth, operations, renewal, selectors
from portals.models import (
    PairState,
    Portal,
    PortalState,
    RenewalLog,
    RenewalOutcome,
    RenewalTrigger,
    TokenPair,
)
from portals.tasks import renew_pair_task
from tests.factories import TokenPairFactory

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent


def _is_live(standin, pair: TokenPair) -> bool:
    """The stored access token works and the stored refresh token is the current one."""
    answer = requests.get(f"{standin.oauth_url}/rest/app.info", params={"auth": pair.access_token}, timeout=5)
    return answer.status_code == 200


# --- the command ----------------------------------------------------------------------------------


def test_renew_tokens_for_one_portal_persists_the_rotated_pair(b24, standin, capsys):
    pair = TokenPairFactory.for_standin(b24)
    old_refresh = pair.refresh_token

    call_command("renew_tokens", "--portal", b24.member_id, "--force")

    out = capsys.readouterr().out
    assert "1 renewed, 0 skipped, 0 failed, of 1." in out
    pair.refresh_from_db()
    assert pair.refresh_token != old_refresh
    assert _is_live(standin, pair)
    # The old refresh token is dead on the OAuth server: the stored one is the only live one.
    with pytest.raises(oauth.InvalidGrant):
        oauth.refresh(standin.oauth_url, old_refresh)
    log = RenewalLog.objects.get(pair=pair, outcome=RenewalOutcome.RENEWED)
    assert log.trigger == RenewalTrigger.COMMAND
    assert log.old_fingerprint and log.new_fingerprint and log.old_fingerprint != log.new_fingerprint
    assert old_refresh not in out and pair.refresh_token not in out


def test_renew_tokens_without_force_renews_only_due_pairs(b24, standin, capsys, settings):
    due = TokenPairFactory.for_standin(
        b24,
        issued_days_ago=settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS
        - settings.BITRIX24_RENEW_MARGIN_DAYS
        + 1,
    )
    fresh = TokenPairFactory.for_standin(standin.add_portal())
    fresh_refresh = fresh.refresh_token

    call_command("renew_tokens")

    assert "1 renewed" in capsys.readouterr().out
    fresh.refresh_from_db()
    assert fresh.refresh_token == fresh_refresh
    due.refresh_from_db()
    assert due.refresh_issued_at > timezone.now() - timedelta(minutes=1)


def test_renew_tokens_reports_nothing_due(b24, capsys):
    TokenPairFactory.for_standin(b24)
    call_command("renew_tokens")
    assert "Nothing to renew" in capsys.readouterr().out


def test_renew_tokens_unknown_portal_is_a_clear_error(db):
    with pytest.raises(CommandError, match="No portal with member_id 'nope'"):
        call_command("renew_tokens", "--portal", "nope")


@pytest.mark.system
def test_renew_tokens_exits_non_zero_when_a_renewal_fails(b24, standin, child_env):
    TokenPairFactory.for_standin(b24)
    standin.oauth_mode = "500"
    result = subprocess.run(
        [sys.executable, "manage.py", "renew_tokens", "--force"],
        cwd=ROOT,
        env=child_env(standin),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 renewed, 0 skipped, 1 failed, of 1." in result.stderr
    assert "will retry later" in result.stderr
    assert "Traceback" not in result.stderr


# --- races ------------------------------------------------------------------------------------------


def _race(pair_id: int, workers: int) -> list[BaseException | None]:
    barrier = threading.Barrier(workers)
    outcomes: list[BaseException | None] = [None] * workers

    def work(index: int) -> None:
        try:
            barrier.wait()
            pair = TokenPair.objects.select_related("portal").get(pk=pair_id)
            renewal.access_token_for(pair.portal, user_id=pair.user_id)
        except BaseException as exc:
            outcomes[index] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


@pytest.mark.system
def test_many_threads_renewing_the_same_pair_renew_it_once(b24, standin):
    pair = TokenPairFactory.for_standin(b24, expired_access=True)
    standin.oauth_latency = 0.2  # widen the window in which a race would happen
    before_ok, before_bad = standin.stats["refresh_ok"], standin.stats["refresh_invalid_grant"]

    outcomes = _race(pair.pk, workers=8)

    assert outcomes == [None] * 8
    assert standin.stats["refresh_invalid_grant"] == before_bad
    assert standin.stats["refresh_ok"] == before_ok + 1
    pair.refresh_from_db()
    assert pair.state == PairState.ACTIVE
    assert _is_live(standin, pair)


@pytest.mark.system
def test_the_same_race_without_the_lock_burns_refresh_tokens(b24, standin, monkeypatch):
    """Proof that the race test above can fail: with the lock and the lease taken away, the workers send the same
    single-use refresh token several times and the stand-in answers invalid_grant. Whether the pair
    then survives depends on which write lands last (the re-read after invalid_grant saves it only
    when the winner has already committed): with the lock, the question never arises."""
    standin.oauth_latency = 0.2
    before_bad = standin.stats["refresh_invalid_grant"]
    monkeypatch.setattr(renewal.transaction, "atomic", contextlib.nullcontext)
    monkeypatch.setattr(TokenPair.objects, "select_for_update", lambda **kw: TokenPair.objects.all())
    monkeypatch.setattr(Portal.objects, "select_for_update", lambda **kw: Portal.objects.all())
    # …and the lease: every claimer takes the attempt in flight for an abandoned one.
    monkeypatch.setattr(renewal, "holder_may_live", lambda attempt, now=None: False)

    # The journal's one-attempt-in-flight constraint still stops some claimers (their insert collides):
    # in a round where it stops all but one, nothing burns. A few rounds, each on a fresh pair, show the race.
    for round_ in range(5):
        pair = TokenPairFactory.for_standin(b24 if round_ == 0 else standin.add_portal(), expired_access=True)
        _race(pair.pk, workers=8)
        if standin.stats["refresh_invalid_grant"] > before_bad:
            break

    assert standin.stats["refresh_invalid_grant"] > before_bad


RACE_SCRIPT = """
import os, sys, time
import django
django.setup()
from portals import renewal
from portals.models import TokenPair
start_at = float(sys.argv[2])
pair = TokenPair.objects.select_related("portal").get(pk=int(sys.argv[1]))
time.sleep(max(0.0, start_at - time.time()))
renewal.access_token_for(pair.portal, user_id=pair.user_id)
print("ok")
"""


@pytest.mark.system
def test_many_processes_renewing_the_same_pair_renew_it_once(b24, standin, child_env):
    pair = TokenPairFactory.for_standin(b24, expired_access=True)
    standin.oauth_latency = 0.2
    before_ok, before_bad = standin.stats["refresh_ok"], standin.stats["refresh_invalid_grant"]
    import time

    start_at = time.time() + 4  # every process is up and waiting before this moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_SCRIPT, str(pair.pk), str(start_at)],
            cwd=ROOT,
            env=child_env(standin),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, results
    assert standin.stats["refresh_invalid_grant"] == before_bad
    assert standin.stats["refresh_ok"] == before_ok + 1
    pair.refresh_from_db()
    assert _is_live(standin, pair)


# --- faults and refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["down", "500", "html"])
def test_oauth_server_trouble_leaves_the_pair_intact_and_heals(b24, standin, settings, mode):
    pair = TokenPairFactory.for_standin(b24)
    before = (pair.access_token, pair.refresh_token)
    standin.oauth_mode = mode
    requests_before = standin.stats["oauth_requests"]

    with pytest.raises(renewal.RenewalFailed) as failure:
        renewal.renew_pair(pair.pk, trigger=RenewalTrigger.STAFF, force=True)

    assert failure.value.transient
    assert standin.stats["oauth_requests"] - requests_before == settings.BITRIX24_OAUTH_ATTEMPTS  # retried
    pair.refresh_from_db()
    assert (pair.access_token, pair.refresh_token) == before
    assert pair.state == PairState.ACTIVE
    assert pair.consecutive_failures == 1 and pair.next_attempt_at is not None
    assert RenewalLog.objects.filter(pair=pair, outcome=RenewalOutcome.TRANSIENT).count() == 1

    standin.oauth_mode = "ok"
    result = renewal.renew_pair(pair.pk, trigger=RenewalTrigger.STAFF, force=True)
    assert result.renewed
    pair.refresh_from_db()
    assert pair.consecutive_failures == 0 and pair.next_attempt_at is None
    assert _is_live(standin, pair)


@pytest.mark.system
def test_a_slow_oauth_server_is_waited_for(b24, standin, settings):
    pair = TokenPairFactory.for_standin(b24)
    standin.oauth_mode = "slow"
    standin.slow_seconds = 1.5
    settings.BITRIX24_OAUTH_TIMEOUT = (1.0, 5.0)
    result = renewal.renew_pair(pair.pk, trigger=RenewalTrigger.STAFF, force=True)
    assert result.renewed
    assert _is_live(standin, result.pair)


@pytest.mark.system
def test_an_answer_lost_to_a_timeout_is_named_as_such(b24, standin, settings):
    """Past the read timeout the server still rotates the pair: the refresh token is gone with its
    answer. The next attempt is refused; the pair is marked dead with a reason staff can act on."""
    pair = TokenPairFactory.for_standin(b24)
    standin.oauth_mode = "slow"
    standin.slow_seconds = 0.6
    settings.BITRIX24_OAUTH_ATTEMPTS = 1
    settings.BITRIX24_OAUTH_TIMEOUT = (1.0, 0.3)
    with pytest.raises(renewal.RenewalFailed) as first:
        renewal.renew_pair(pair.pk, trigger=RenewalTrigger.STAFF, force=True)
    assert first.value.transient
    import time

    time.sleep(0.6)  # the server finishes the lost request meanwhile
    standin.oauth_mode = "ok"
    with pytest.raises(renewal.RenewalFailed) as second:
        renewal.renew_pair(pair.pk, trigger=RenewalTrigger.STAFF, force=True)
    assert second.value.code == "invalid_grant"
    pair.refresh_from_db()
    assert pair.state == PairState.DEAD
    assert "previous attempt timed out" in pair.last_error


def test_oauth_client_retries_until_the_server_is_back(b24, standin, settings, fake_clock):
    pair = TokenPairFactory.for_standin(b24)
    settings.BITRIX24_OAUTH_ATTEMPTS = 6
    settings.BITRIX24_OAUTH_BACKOFF = 0.2
    standin.oauth_mode = "html"
    # The server comes back while the client waits its second backoff.
    fake_clock.on_sleep = lambda _: len(fake_clock.slept) >= 2 and setattr(standin, "oauth_mode", "ok")

    result = renewal.renew_pair(pair.pk, trigger=RenewalTrigger.STAFF, force=True)

    assert result.renewed
    assert len(fake_clock.slept) == 2
    assert _is_live(standin, result.pair)


def test_invalid_grant_marks_the_portal_and_stops(b24, standin, caplog):
    pair = TokenPairFactory.for_standin(b24)
    b24.uninstall()  # every token of the portal dies on the OAuth server
    before = standin.stats["oauth_requests"]

    assert renew_pair_task.apply(args=(pair.pk, RenewalTrigger.BEAT, True)).get() == "refused: invalid_grant"

    assert standin.stats["oauth_requests"] - before == 1  # no retry of a refusal
    pair.refresh_from_db()
    assert pair.state == PairState.DEAD
    portal = Portal.objects.get(pk=pair.portal_id)
    assert portal.state == PortalState.NEEDS_REINSTALL
    assert "invalid_grant" in portal.state_reason
    # A dead pair is no longer due, and is not retried by the sweep or on demand.
    with time_machine.travel(timezone.now() + timedelta(days=365)):
        assert not selectors.due_pairs().filter(pk=pair.pk).exists()
    with pytest.raises(renewal.NoUsablePair):
        renewal.access_token_for(portal)
    assert sum("refused for good" in r.getMessage() for r in caplog.records) == 1


def test_payment_required_is_a_refusal(b24):
    pair = TokenPairFactory.for_standin(b24)
    b24.payment_required = True
    with pytest.raises(renewal.RenewalFailed) as failure:
        renewal.renew_pair(pair.pk, trigger=RenewalTrigger.STAFF, force=True)
    assert not failure.value.transient and failure.value.code == "PAYMENT_REQUIRED"
    pair.refresh_from_db()
    assert pair.state == PairState.DEAD


def test_invalid_client_keeps_the_pair_for_when_the_secret_is_fixed(b24, standin, settings):
    pair = TokenPairFactory.for_standin(b24)
    settings.BITRIX24_CLIENT_SECRET = "wrong"
    with pytest.raises(renewal.RenewalFailed):
        renewal.renew_pair(pair.pk, trigger=RenewalTrigger.STAFF, force=True)
    pair.refresh_from_db()
    assert pair.state == PairState.CREDENTIALS_REJECTED
    assert Portal.objects.get(pk=pair.portal_id).state == PortalState.INSTALLED
    settings.BITRIX24_CLIENT_SECRET = standin.client_secret
    assert renewal.renew_pair(pair.pk, trigger=RenewalTrigger.STAFF, force=True).renewed


def test_a_fresh_launch_brings_a_dead_pair_back(backend, b24):
    pair = TokenPairFactory.for_standin(b24)
    TokenPair.objects.filter(pk=pair.pk).update(state=PairState.DEAD)
    operations.mark_needs_reinstall(portal=pair.portal, reason="the customer's admin left")
    assert backend.launch(b24, b24.issue_tokens(1, admin=True)).status_code == 200
    pair.refresh_from_db()
    assert pair.state == PairState.ACTIVE and pair.is_background
    assert Portal.objects.get(pk=pair.portal_id).state == PortalState.INSTALLED


def test_on_demand_token_is_renewed_only_when_expiring(b24, standin):
    pair = TokenPairFactory.for_standin(b24)
    portal = pair.portal
    before = standin.stats["refresh_ok"]
    assert renewal.access_token_for(portal) == pair.access_token
    assert standin.stats["refresh_ok"] == before
    # An hour on, the access token has expired (for Bitrix24 too): the next ask renews it.
    with time_machine.travel(timezone.now() + timedelta(hours=1, seconds=1)):
        token = renewal.access_token_for(portal)
        assert token != pair.access_token
        assert standin.stats["refresh_ok"] == before + 1
        # Renewed on demand: no longer due for the sweep.
        assert not selectors.due_pairs().filter(pk=pair.pk).exists()


@pytest.mark.django_db
def test_renew_tokens_exits_1_for_a_portal_the_sweep_flagged_lost_since_its_previous_run(
    b24, standin, capsys
):
    """Before, the sweep flagged a portal lost (an interrupted renewal whose answer is gone) and the next
    `renew_tokens` said "Nothing to renew" and exited 0: a cron job never saw it."""
    from portals.models import PairState, TokenPair
    from tests.factories import PortalFactory

    call_command("renew_tokens")  # a previous run: nothing to report
    portal = PortalFactory.for_standin(b24)
    pair = TokenPair.objects.get(portal=portal)
    renewal._mark_lost(pair, "lost in a renewal interrupted at 2026-12-05 03:00:00 UTC")  # as the sweep does

    with pytest.raises(CommandError, match=r"1 pair\(s\) LOST, flagged since the previous run"):
        call_command("renew_tokens")
    assert f"LOST: {portal.domain}" in capsys.readouterr().err
    call_command("renew_tokens")  # reported once: the next run has nothing new
    with pytest.raises(CommandError, match=r"1 pair\(s\) LOST, not acknowledged"):
        call_command("renew_tokens", "--all-unacknowledged")  # the strict form, until staff acknowledge it

    assert operations.acknowledge_lost(portal=portal) == 1
    call_command("renew_tokens", "--all-unacknowledged")
    pair.refresh_from_db()
    assert pair.state == PairState.LOST and pair.lost_acknowledged_at is not None  # a timestamp, not a state
