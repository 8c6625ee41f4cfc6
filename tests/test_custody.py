"""Token custody: a renewal killed or stopped at any point never leaves a pair "active but burned".

Real processes (`manage.py renew_tokens`, a Celery worker's pool process) renew against the
stand-in and are killed with SIGKILL, or stopped with SIGTERM/SIGINT, at a chosen point; the next
`renew_tokens` must end in a live pair or in a portal flagged lost with the reason.
Runs on whichever database the suite runs on (CI: PostgreSQL, then SQLite).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import requests
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone
from rest_framework.authtoken.models import Token

from portals import bindings, crypto, journal, oauth, operations, renewal, selectors, tasks
from portals.models import (
    AttemptState,
    PairState,
    Portal,
    PortalState,
    RenewalAttempt,
    TokenPair,
    WantedAction,
    WantedKind,
)
from portals.tasks import carry_out_task, renew_pair_task
from tests.factories import PortalFactory, UserFactory
from tests.processes import celery_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.system]

ROOT = Path(__file__).resolve().parent.parent


def _is_live(standin, pair: TokenPair) -> bool:
    pair.refresh_from_db()
    answer = requests.get(f"{standin.oauth_url}/rest/app.info", params={"auth": pair.access_token}, timeout=5)
    return answer.status_code == 200 and pair.refresh_token in standin._refresh


def _wait(condition: Callable[[], object], timeout: float = 30, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def _in_flight(pair: TokenPair) -> RenewalAttempt | None:
    return RenewalAttempt.objects.filter(pair=pair, state=AttemptState.IN_FLIGHT).first()


def _renew_tokens_process(standin, child_env, member_id: str, **env: str) -> subprocess.Popen[str]:
    environment = {**child_env(standin), **env}
    return subprocess.Popen(
        [sys.executable, "manage.py", "renew_tokens", "--portal", member_id, "--force"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _worker(standin, child_env, **env: str):
    return celery_worker({**child_env(standin), **env})


def _start_holder(kind: str, standin, child_env, pair: TokenPair, stack: list) -> subprocess.Popen[str]:
    if kind == "command":
        return _renew_tokens_process(standin, child_env, pair.portal.member_id)
    context = _worker(standin, child_env)
    proc = context.__enter__()
    stack.append(context)
    renew_pair_task.apply_async(args=(pair.pk, "staff", True))
    return proc


@contextmanager
def _store_held(pair: TokenPair) -> Iterator[None]:
    """Hold the pair's row (PostgreSQL) or the database's write lock (SQLite) from another connection,
    so that the holder's store of the new pair waits."""
    settings = connection.settings_dict
    if connection.vendor == "postgresql":
        with psycopg.connect(
            host=settings["HOST"],
            port=settings["PORT"] or 5432,
            user=settings["USER"],
            password=settings.get("PASSWORD") or None,
            dbname=settings["NAME"],
            autocommit=False,
        ) as other:
            other.execute("SELECT id FROM portals_tokenpair WHERE id = %s FOR UPDATE", (pair.pk,))
            yield
            other.rollback()
    else:
        other = sqlite3.connect(settings["NAME"], timeout=30, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()


def _resolve(capsys) -> tuple[str, bool]:
    """Run `renew_tokens` as an operator would next: (its output, whether it exited non-zero)."""
    failed = False
    try:
        call_command("renew_tokens")
    except CommandError as exc:
        failed = True
        print(exc)
    captured = capsys.readouterr()
    return captured.out + captured.err, failed


HOLDERS = ["command", "worker"]


@pytest.mark.parametrize("holder", HOLDERS)
def test_killed_before_the_server_acts_the_resolver_renews(
    holder, installed_portal, b24, standin, child_env, capsys
):
    pair = installed_portal.token_pairs.get(user_id=1)
    standin.oauth_mode = "hang"  # the request arrives and is never acted on: as if never sent
    requests_before = standin.stats["oauth_requests"]
    stack: list = []
    try:
        _start_holder(holder, standin, child_env, pair, stack)
        attempt = _wait(lambda: _in_flight(pair), what="the journaled attempt")
        _wait(lambda: standin.stats["oauth_requests"] > requests_before, what="the refresh request")
        os.kill(attempt.holder_pid, signal.SIGKILL)
        _wait(lambda: journal.process_start(attempt.holder_pid) is None, what="the holder's death")
    finally:
        for context in stack:
            context.__exit__(None, None, None)
    standin.oauth_mode = "ok"
    standin.release.set()

    output, failed = _resolve(capsys)

    assert not failed, output
    assert "renewed" in output
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.INTERRUPTED
    assert _is_live(standin, pair)
    assert pair.state == PairState.ACTIVE


@pytest.mark.parametrize("holder", HOLDERS)
def test_killed_while_the_server_works_the_portal_is_flagged_lost(
    holder, installed_portal, b24, standin, child_env, capsys
):
    pair = installed_portal.token_pairs.get(user_id=1)
    standin.oauth_mode = "slow"  # the server acts after slow_seconds, when the holder is dead
    standin.slow_seconds = 2.0
    rotated_before = standin.stats["refresh_ok"]
    requests_before = standin.stats["oauth_requests"]
    stack: list = []
    try:
        _start_holder(holder, standin, child_env, pair, stack)
        attempt = _wait(lambda: _in_flight(pair), what="the journaled attempt")
        _wait(lambda: standin.stats["oauth_requests"] > requests_before, what="the refresh request")
        os.kill(attempt.holder_pid, signal.SIGKILL)
        _wait(lambda: standin.stats["refresh_ok"] > rotated_before, what="the server's rotation")
    finally:
        for context in stack:
            context.__exit__(None, None, None)
    standin.oauth_mode = "ok"

    output, failed = _resolve(capsys)

    assert failed, output  # renew_tokens exits non-zero when it finds a portal lost
    assert "LOST" in output
    pair.refresh_from_db()
    assert pair.state == PairState.LOST
    assert pair.last_error.startswith("lost in a renewal interrupted at ")
    portal = Portal.objects.get(pk=pair.portal_id)
    assert portal.state == PortalState.NEEDS_REINSTALL
    assert portal.state_reason == pair.last_error[:255]


def _killed_with_the_answer_unstored(
    holder: str,
    pair: TokenPair,
    standin,
    child_env,
    meanwhile: Callable[[RenewalAttempt], None] | None = None,
) -> RenewalAttempt:
    """A holder whose refresh got its answer and kept its second copy is SIGKILLed while its store is blocked
    by a row lock (`meanwhile` runs right after the kill); returns the attempt it left in flight."""
    standin.oauth_latency = 1.0
    rotated_before = standin.stats["refresh_ok"]
    stack: list = []
    try:
        _start_holder(holder, standin, child_env, pair, stack)
        attempt = _wait(lambda: _in_flight(pair), what="the journaled attempt")
        with _store_held(pair):
            _wait(lambda: standin.stats["refresh_ok"] > rotated_before, what="the server's answer")
            _wait(
                lambda: journal.find(attempt.pk, pair_id=pair.pk, old_fingerprint=attempt.old_fingerprint),
                what="the second copy",
            )
            time.sleep(0.3)  # the holder is now waiting on the held store
            os.kill(attempt.holder_pid, signal.SIGKILL)
            if meanwhile is not None:
                meanwhile(attempt)
            _wait(lambda: journal.process_start(attempt.holder_pid) is None, what="the holder's death")
    finally:
        for context in stack:
            context.__exit__(None, None, None)
    standin.oauth_latency = 0.0
    return attempt


@pytest.mark.parametrize("holder", HOLDERS)
def test_killed_after_the_answer_before_the_store_the_pair_is_recovered(
    holder, installed_portal, b24, standin, child_env, capsys
):
    pair = installed_portal.token_pairs.get(user_id=1)
    attempt = _killed_with_the_answer_unstored(holder, pair, standin, child_env)
    assert _in_flight(pair) is not None  # the store never happened
    requests_before = standin.stats["oauth_requests"]

    output, failed = _resolve(capsys)

    assert not failed, output
    assert "recovered" in output
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.RECOVERED
    assert standin.stats["oauth_requests"] == requests_before  # stored from the copy, nothing re-sent
    assert _is_live(standin, pair)
    assert (
        journal.find(attempt.pk, pair_id=pair.pk, old_fingerprint=attempt.old_fingerprint) is None
    )  # the copy is dropped once stored


@pytest.mark.needs_redis("the second copy is kept in Redis and in a file when Redis is configured")
def test_a_worker_killed_with_its_store_blocked_while_redis_loses_everything_keeps_the_pair(
    installed_portal, b24, standin, child_env, capsys, settings
):
    """The answer arrived, its copy went to Redis, the store was blocked (a row lock), then the worker and
    Redis went down together (a power cut; Redis keeps nothing on disk): the copy was only in Redis, and the
    portal was lost. Now the fsynced file holds it too, and the resolver recovers the pair from it."""
    pair = installed_portal.token_pairs.get(user_id=1)

    def redis_comes_back_empty(attempt: RenewalAttempt) -> None:
        assert journal._redis(settings.REDIS_URL).delete(journal._redis_key(attempt.pk)) == 1

    attempt = _killed_with_the_answer_unstored(
        "worker", pair, standin, child_env, meanwhile=redis_comes_back_empty
    )
    requests_before = standin.stats["oauth_requests"]

    output, failed = _resolve(capsys)

    assert not failed, output
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.RECOVERED, output
    assert standin.stats["oauth_requests"] == requests_before  # from the file's copy, nothing re-sent
    assert _is_live(standin, pair)


def test_an_unfinished_attempt_of_a_live_holder_is_left_alone(installed_portal, b24, standin, capsys):
    pair = installed_portal.token_pairs.get(user_id=1)
    holder = journal.current_holder()  # this very process: alive
    attempt = RenewalAttempt.objects.create(
        pair=pair,
        portal_id=pair.portal_id,
        trigger="command",
        old_fingerprint="x",
        holder_host=holder.host,
        holder_pid=holder.pid,
        holder_start=holder.start,
        lease_expires_at=timezone.now() + timedelta(minutes=5),
    )
    requests_before = standin.stats["oauth_requests"]

    output, _ = _resolve(capsys)

    assert "still running" in output
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.IN_FLIGHT
    assert standin.stats["oauth_requests"] == requests_before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_polite_stop_of_renew_tokens_finishes_the_refresh_in_hand(
    signum, installed_portal, b24, standin, child_env, capsys
):
    pair = installed_portal.token_pairs.get(user_id=1)
    old_refresh = pair.refresh_token
    standin.oauth_latency = 2.0
    requests_before = standin.stats["oauth_requests"]
    proc = _renew_tokens_process(standin, child_env, b24.member_id)
    _wait(lambda: _in_flight(pair), what="the journaled attempt")
    _wait(lambda: standin.stats["oauth_requests"] > requests_before, what="the refresh request")
    proc.send_signal(signum)
    output = proc.communicate(timeout=60)[0]

    assert proc.returncode != 0, output  # it says it was stopped
    assert "Stopped by a signal after the renewal in hand" in output
    pair.refresh_from_db()
    assert pair.refresh_token != old_refresh
    assert _is_live(standin, pair)
    assert _in_flight(pair) is None
    standin.oauth_latency = 0.0
    call_command("renew_tokens", "--portal", b24.member_id, "--force")  # and it renews again
    assert _is_live(standin, pair)


def test_sigterm_to_a_workers_process_group_finishes_the_refresh_in_hand(
    installed_portal, b24, standin, child_env
):
    """As a container runtime or systemd (KillMode=control-group) may stop a worker: SIGTERM to every
    process of its group."""
    pair = installed_portal.token_pairs.get(user_id=1)
    old_refresh = pair.refresh_token
    standin.oauth_latency = 2.0
    requests_before = standin.stats["oauth_requests"]
    with _worker(standin, child_env) as worker:
        renew_pair_task.apply_async(args=(pair.pk, "staff", True))
        _wait(lambda: _in_flight(pair), what="the journaled attempt")
        _wait(lambda: standin.stats["oauth_requests"] > requests_before, what="the refresh request")
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    pair.refresh_from_db()
    assert pair.refresh_token != old_refresh
    assert _is_live(standin, pair)
    assert RenewalAttempt.objects.get(pair=pair).state == AttemptState.STORED


def test_the_database_away_after_the_answer_loses_nothing(installed_portal, b24, standin, child_env):
    """The store waits out a database that cannot be written (held here for 4 s) and then stores."""
    pair = installed_portal.token_pairs.get(user_id=1)
    standin.oauth_latency = 1.0
    rotated_before = standin.stats["refresh_ok"]
    proc = _renew_tokens_process(standin, child_env, b24.member_id)
    attempt = _wait(lambda: _in_flight(pair), what="the journaled attempt")
    with _store_held(pair):
        _wait(lambda: standin.stats["refresh_ok"] > rotated_before, what="the server's answer")
        time.sleep(4)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.STORED
    assert _is_live(standin, pair)


def test_sqlite_launches_and_events_are_served_while_a_renewal_waits_on_the_oauth_server(
    backend, installed_portal, b24, standin, child_env
):
    """No database lock is held during the refresh: on SQLite one write lock for the whole database
    would otherwise hold every launch and event for as long as the OAuth server takes."""
    if connection.vendor != "sqlite":
        pytest.skip("the database-wide write lock is SQLite's; PostgreSQL locks the pair's row only")
    pair = installed_portal.token_pairs.get(user_id=1)
    standin.oauth_mode = "slow"
    standin.slow_seconds = 40.0
    requests_before = standin.stats["oauth_requests"]
    proc = _renew_tokens_process(standin, child_env, b24.member_id, BITRIX24_OAUTH_READ_TIMEOUT="60")
    _wait(lambda: _in_flight(pair), what="the journaled attempt")
    _wait(lambda: standin.stats["oauth_requests"] > requests_before, what="the refresh request")
    sent = time.monotonic()
    standin.oauth_mode = "ok"  # the refresh in flight keeps its 40 s; app.info answers at once
    timings: list[tuple[str, float, int]] = []

    def client(index: int) -> None:
        if index % 2:
            response = backend.launch(b24, b24.issue_tokens(100 + index))
            kind = "launch"
        else:
            response = backend.post("/events/", data=_event(b24))
            kind = "event"
        timings.append((kind, time.monotonic() - sent, response.status_code))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    output = proc.communicate(timeout=90)[0]
    answered = time.monotonic() - sent
    print(f"renewal answered after {answered:.1f} s; clients answered after {sorted(t[1] for t in timings)}")
    assert proc.returncode == 0, output
    assert len(timings) == 20
    assert all(status == 200 for _, _, status in timings), timings
    assert max(t[1] for t in timings) < 38.0 < answered  # every client before the OAuth answer
    assert _is_live(standin, pair)


def _event(b24) -> dict[str, str]:
    portal = Portal.objects.get(member_id=b24.member_id)
    return {
        "event": "ONCRMCONTACTADD",
        "data[FIELDS][ID]": "7",
        "auth[member_id]": b24.member_id,
        "auth[domain]": b24.domain,
        "auth[application_token]": portal.application_token,
    }


SEED_SCRIPT = """
import json, sys
import django
django.setup()
from django.core.management import call_command
from django.utils import timezone
from datetime import timedelta
from portals.models import Portal, TokenPair
call_command("migrate", verbosity=0)
data = json.loads(sys.argv[1])
portal = Portal.objects.create(
    member_id=data["member_id"], domain=data["domain"], protocol="http", oauth_server=data["oauth_server"]
)
pair = TokenPair.objects.create(
    portal=portal, user_id=1, is_background=True, access_token=data["access_token"],
    refresh_token=data["refresh_token"], access_expires_at=timezone.now() + timedelta(hours=1),
    refresh_issued_at=timezone.now(),
)
print(pair.pk)
"""


def test_private_postgres_stopped_for_20_s_when_the_answer_arrives_the_pair_is_stored_on_its_return(
    b24, standin, child_env, private_postgres
):
    """A real outage: the holder's database stops while the OAuth server works and comes back 20 s
    later; the holder keeps the answer (second copy) and keeps retrying the store until it can."""
    tokens = b24.issue_tokens(1, admin=True)
    env = {**child_env(standin), "DATABASE_URL": private_postgres.url, "DATABASE_CONN_MAX_AGE": "0"}
    seed = {
        "member_id": b24.member_id,
        "domain": b24.domain,
        "oauth_server": standin.oauth_url,
        "access_token": tokens["access_token"],
        "refresh_token": tokens["refresh_token"],
    }
    seeded = subprocess.run(
        [sys.executable, "-c", SEED_SCRIPT, json.dumps(seed)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert seeded.returncode == 0, seeded.stderr
    standin.oauth_latency = 3.0
    rotated_before = standin.stats["refresh_ok"]
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "renew_tokens", "--force"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait(lambda: standin.stats["oauth_requests"] and _private_attempts(private_postgres), what="the attempt")
    private_postgres.stop()
    stopped = time.monotonic()
    _wait(lambda: standin.stats["refresh_ok"] > rotated_before, what="the server's answer")
    time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
    private_postgres.start()
    output = proc.communicate(timeout=120)[0]

    assert proc.returncode == 0, output
    assert "1 renewed" in output
    assert "Cannot store renewed pair" in output  # it did meet the outage
    with psycopg.connect(private_postgres.url) as conn:
        state, refresh = conn.execute(
            "SELECT a.state, p.refresh_token FROM portals_renewalattempt a "
            "JOIN portals_tokenpair p ON p.id = a.pair_id"
        ).fetchone()
    assert state == AttemptState.STORED
    assert crypto.decrypt(refresh) in standin._refresh  # the stored refresh token is the live one


def _private_attempts(server) -> int:
    try:
        with psycopg.connect(server.url, connect_timeout=2) as conn:
            return conn.execute("SELECT count(*) FROM portals_renewalattempt").fetchone()[0]
    except psycopg.Error:
        return 0


# --- states tell the truth ----------------------------------------------------------------------------


def _lost_tokens(b24) -> Portal:
    portal = PortalFactory.for_standin(
        b24,
        state=PortalState.NEEDS_REINSTALL,
        state_reason="renewal refused: invalid_grant",
        reinstall_cause="tokens",
        pair__state=PairState.DEAD,
        pair__last_error="invalid_grant: token expired",
    )
    return portal


def test_an_ordinary_users_launch_does_not_clear_needs_reinstall(backend, b24):
    portal = _lost_tokens(b24)

    assert backend.launch(b24, b24.issue_tokens(7, admin=False)).status_code == 200

    portal.refresh_from_db()
    assert portal.state == PortalState.NEEDS_REINSTALL
    assert portal.state_reason == "renewal refused: invalid_grant"
    assert not TokenPair.objects.get(portal=portal, user_id=7).is_background


def test_an_admins_launch_brings_the_portal_back_once_its_new_pair_has_renewed(backend, b24, standin):
    portal = _lost_tokens(b24)

    assert backend.launch(b24, b24.issue_tokens(1, admin=True)).status_code == 200

    portal.refresh_from_db()
    assert portal.state == PortalState.NEEDS_REINSTALL  # not before the new pair has proved itself
    assert portal.state_reason.startswith("new background pair: confirming it")
    pair = TokenPair.objects.get(portal=portal, is_background=True)
    assert pair.state == PairState.ACTIVE
    action = WantedAction.objects.get(portal=portal, pair=pair, kind=WantedKind.RENEW_PAIR, done_at=None)
    rotated = standin.stats["refresh_ok"]

    assert carry_out_task.apply(args=(action.pk,)).get() == "done"  # what the worker does

    assert standin.stats["refresh_ok"] == rotated + 1
    portal.refresh_from_db()
    assert (portal.state, portal.state_reason) == (PortalState.INSTALLED, "")


def test_a_refresh_issue_time_in_the_future_is_due_flagged_and_renewed(b24, standin, capsys):
    portal = PortalFactory.for_standin(b24, pair__issued_days_ago=-3)  # a skewed clock wrote it
    pair = portal.token_pairs.get()

    assert selectors.due_pairs().filter(pk=pair.pk).exists()
    assert selectors.health_counts()["clock_skew"] == 1

    call_command("renew_tokens")

    pair.refresh_from_db()
    assert abs((pair.refresh_issued_at - timezone.now()).total_seconds()) < 60
    assert selectors.health_counts()["clock_skew"] == 0
    assert _is_live(standin, pair)


# --- web requests never call the token endpoint ---------------------------------------------------------


def test_a_web_request_hands_its_renewal_to_a_worker_and_answers_503_past_its_budget(
    backend, b24, standin, settings, monkeypatch
):
    settings.BITRIX24_WEB_TOKEN_WAIT_SECONDS = 1
    portal = PortalFactory.for_standin(b24, pair__expired_access=True)
    pair = portal.token_pairs.get()
    handed: list[tuple] = []
    monkeypatch.setattr(renewal, "_queue", lambda pair_id, fp="": handed.append((pair_id, fp)) or True)
    refreshes = standin.stats["refresh_ok"] + standin.stats["refresh_invalid_grant"]

    started = time.monotonic()
    response = _staff_call(backend.url, b24)

    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]
    assert 1 <= time.monotonic() - started < 5  # it waited its budget, no more
    assert handed == [(pair.pk, "")]
    # The web process sent no refresh of its own.
    assert standin.stats["refresh_ok"] + standin.stats["refresh_invalid_grant"] == refreshes

    assert renew_pair_task.apply(args=(pair.pk, "on_demand", False, "")).get() == "done"  # the worker
    assert _staff_call(backend.url, b24).status_code == 200


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def test_gunicorn_answers_503_while_a_45_s_renewal_completes_in_the_worker(b24, standin, child_env):
    """With the shipped gunicorn config, a request that needs a token whose OAuth answer takes 45 s gets
    503 with Retry-After after its wait budget (not gunicorn's kill), and a worker stores the renewal."""
    portal = PortalFactory.for_standin(b24, pair__expired_access=True)
    pair = portal.token_pairs.get()
    old_refresh = pair.refresh_token
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**child_env(standin), "PORT": port, "WEB_CONCURRENCY": "2", "BITRIX24_OAUTH_READ_TIMEOUT": "60"}
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "config.wsgi"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        with _worker(standin, child_env, BITRIX24_OAUTH_READ_TIMEOUT="60"):
            url = f"http://127.0.0.1:{port}"
            _wait(lambda: _answers(url + "/healthz"), what="gunicorn")
            standin.oauth_mode = "slow"
            standin.slow_seconds = 45.0
            requests_before = standin.stats["oauth_requests"]
            started = time.monotonic()
            response = _staff_call(url, b24)
            waited = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"]
            assert 10 <= waited < 25, waited  # BITRIX24_WEB_TOKEN_WAIT_SECONDS (10), not gunicorn's 30 s kill
            attempt = _wait(lambda: _in_flight(pair), what="the worker's attempt")
            assert attempt.holder_pid not in {web.pid, *_children(web.pid)}  # the worker holds it
            assert standin.stats["oauth_requests"] == requests_before + 1  # the worker's refresh only
            standin.oauth_mode = "ok"  # the refresh in flight keeps its 45 s
            _wait(
                lambda: RenewalAttempt.objects.filter(pk=attempt.pk, state=AttemptState.STORED).exists(),
                timeout=90,
                what="the stored renewal",
            )
            pair.refresh_from_db()
            assert pair.refresh_token != old_refresh
            assert _is_live(standin, pair)
            assert _staff_call(url, b24).status_code == 200
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        print(web.communicate(timeout=60)[0][-3000:])


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code in (200, 503)
    except requests.RequestException:
        return False


# --- the edges a review found -------------------------------------------------------------------------


def test_a_holder_whose_lease_ran_out_still_stores_a_pair_a_resolver_marked_lost(
    installed_portal, b24, standin
):
    """A resolver that found no second copy (another host, no Redis) tried the old token and marked the
    pair lost while the holder, alive but slow, was still waiting for its answer: the holder's grant is
    the live one and is stored all the same."""
    pair = installed_portal.token_pairs.get(user_id=1)
    standin.oauth_latency = 1.5
    outcome: list[object] = []

    def holder() -> None:
        try:
            outcome.append(renewal.renew_pair(pair.pk, trigger="command", force=True))
        finally:
            connection.close()

    thread = threading.Thread(target=holder)
    thread.start()
    attempt = _wait(lambda: _in_flight(pair), what="the journaled attempt")
    # What a resolver does when it finds the holder's lease expired and no copy: gives up on the attempt
    # and (its retry refused) marks the pair lost.
    RenewalAttempt.objects.filter(pk=attempt.pk).update(state=AttemptState.INTERRUPTED)
    TokenPair.objects.filter(pk=pair.pk).update(state=PairState.LOST, last_error="lost in a renewal …")
    thread.join(30)

    assert outcome and outcome[0].renewed
    pair.refresh_from_db()
    assert pair.state == PairState.ACTIVE
    assert _is_live(standin, pair)
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.STORED and "lease ran out" in attempt.note


def test_a_second_copy_that_cannot_be_read_or_belongs_to_another_pair_counts_as_none(
    installed_portal, b24, caplog
):
    pair = installed_portal.token_pairs.get(user_id=1)
    grant = oauth.TokenGrant(
        access_token="a" * 32,
        refresh_token="r" * 32,
        expires_at=timezone.now(),
        scope="",
        member_id=b24.member_id,
        user_id=1,
        domain=b24.domain,
        status="L",
        server_endpoint="",
    )
    assert journal.keep(990001, grant, pair_id=pair.pk, old_fingerprint="fp-old")
    assert journal.find(990001, pair_id=pair.pk, old_fingerprint="fp-old") == grant
    assert journal.find(990001, pair_id=pair.pk + 1, old_fingerprint="fp-old") is None  # another pair's
    folder = Path(django_settings.VAR_DIR) / "renewal-grants"
    folder.mkdir(parents=True, exist_ok=True)  # with Redis, the first copy went there, not to a file
    (folder / "990002.grant").write_text("gAAAAAB-not-a-token-this-key-made")  # e.g. a key since removed
    assert journal.find(990002, pair_id=pair.pk, old_fingerprint="fp-old") is None
    assert "Unreadable second copy" in caplog.text
    journal.forget(990001)
    journal.forget(990002)


def test_force_leaves_dead_and_lost_pairs_alone(b24, standin, capsys):
    portal = PortalFactory.for_standin(b24, users=(1, 2), pair__state=PairState.LOST)
    requests_before = standin.stats["oauth_requests"]

    call_command("renew_tokens", "--portal", b24.member_id, "--force")

    assert standin.stats["oauth_requests"] == requests_before  # a refused token is not sent again
    assert set(portal.token_pairs.values_list("state", flat=True)) == {PairState.LOST}


def test_a_staff_mark_survives_a_working_renewal_and_a_token_mark_does_not(b24, standin):
    staff_marked = PortalFactory.for_standin(b24, pair__expired_access=True)
    operations.mark_needs_reinstall(portal=staff_marked, reason="customer asked for a clean reinstall")
    other = standin.add_portal()
    token_marked = PortalFactory.for_standin(
        other, state=PortalState.NEEDS_REINSTALL, state_reason="renewal refused: x", reinstall_cause="tokens"
    )

    for portal in (staff_marked, token_marked):
        renewal.renew_pair(portal.token_pairs.get().pk, trigger="command", force=True)

    staff_marked.refresh_from_db()
    token_marked.refresh_from_db()
    assert (staff_marked.state, staff_marked.state_reason) == (
        PortalState.NEEDS_REINSTALL,
        "customer asked for a clean reinstall",
    )
    assert (token_marked.state, token_marked.state_reason) == (PortalState.INSTALLED, "")


def test_asked_again_while_running_the_action_is_not_closed_by_the_earlier_run(
    installed_portal, b24, settings, monkeypatch
):
    """A second update drops the bindings again while the first binding run is under way: the first
    run must not close the action, or the second request would be lost."""
    settings.BITRIX24_PUBLIC_URL = "https://app.example.com"
    sent: list[tuple] = []
    monkeypatch.setattr(carry_out_task, "apply_async", lambda args, **kw: sent.append(tuple(args)))
    action = tasks.want(WantedKind.BIND_EVENTS, portal=installed_portal)
    runs: list[int] = []
    sync = tasks.bindings.sync_bindings

    def bind_while_an_update_arrives(*, portal: Portal) -> bindings.SyncResult:
        runs.append(1)
        result = sync(portal=portal)
        if len(runs) == 1:
            tasks.want(WantedKind.BIND_EVENTS, portal=portal)  # the second update, mid-run
        return result

    monkeypatch.setattr(tasks.bindings, "sync_bindings", bind_while_an_update_arrives)

    assert carry_out_task.apply(args=(action.pk,)).get() == "done, and asked again meanwhile: queued again"
    assert WantedAction.objects.get(pk=action.pk).done_at is None
    assert sent.count((action.pk,)) >= 2  # queued again
    assert carry_out_task.apply(args=(action.pk,)).get() == "done"
    assert WantedAction.objects.get(pk=action.pk).done_at is not None
    assert len(runs) == 2


def _staff_call(url: str, b24) -> requests.Response:
    """A support call through the staff API: it needs the portal's background access token."""
    user = UserFactory(staff=True, permissions=["portals.call_portal", "portals.call_any_method"])
    token = Token.objects.create(user=user).key
    return requests.post(
        f"{url}/api/portals/{b24.member_id}/call/",
        json={"method": "server.time"},
        headers={"Authorization": f"Token {token}"},
        timeout=120,
    )


def test_a_holder_is_proven_dead_only_on_this_machine_in_this_pid_namespace():
    """Two machines may share a host name (containers with host networking take the host's) and the number
    of their root PID namespace; only the boot id tells them apart. A process id that runs nothing here
    proves nothing about a holder on another machine: its lease decides."""
    holder = journal.current_holder()
    namespace, boot_id, started = holder.start.split("|")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    gone = next(pid for pid in range(pid_max - 1, 1, -1) if journal.process_start(pid) is None)
    here = f"{namespace}|{boot_id}|{started}"
    assert journal.holder_is_dead(holder.host, gone, here)  # this machine, no such process: dead
    assert not journal.holder_is_dead(holder.host, holder.pid, here)  # this very process: alive
    assert journal.holder_is_dead(holder.host, holder.pid, f"{namespace}|{boot_id}|1")  # pid reused since
    other_machine = f"{namespace}|00000000-0000-0000-0000-000000000000|{started}"
    assert not journal.holder_is_dead(holder.host, gone, other_machine)
    assert not journal.holder_is_dead(holder.host, gone, f"pid:[1]|{boot_id}|{started}")  # another container
    assert not journal.holder_is_dead("another-host", gone, here)
