"""Redis away: every endpoint degrades (no 500; a 503 always says when to come back), and the work asked
for during the outage (event bindings, staff renewals, a message Redis lost) is done after it.

The backend runs as a real process on a private Redis, which the test kills and restarts; the suite's
own Redis (CI) is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from rest_framework.authtoken.models import Token

from portals.models import Portal, TokenPair, WantedAction, WantedKind
from standin import payloads as bx
from tests.factories import PortalFactory, UserFactory
from tests.processes import celery_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.system]

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_URL = "https://app.example.com"


def _call(http: requests.Session, method: str, url: str, **kwargs) -> requests.Response:
    return http.request(method, url, timeout=60, allow_redirects=False, **kwargs)


def test_redis_killed_and_restarted(standin, child_env, private_redis, backend_process):
    a = standin.add_portal()
    portal = PortalFactory.for_standin(a, users=(1, 7))
    staff = UserFactory(staff=True, superuser=True)  # every permission of the staff API
    token = Token.objects.create(user=staff).key
    env = child_env(standin)
    shared = {
        key: env[key]
        for key in (
            "BITRIX24_OAUTH_SERVERS",
            "BITRIX24_PORTAL_DOMAINS",
            "BITRIX24_ALLOW_HTTP",
            "BITRIX24_CLIENT_ID",
            "BITRIX24_CLIENT_SECRET",
            "BITRIX24_TOKEN_KEYS",
        )
        if key in env
    }
    shared["BITRIX24_TOKEN_KEYS"] = os.environ["BITRIX24_TOKEN_KEYS"]  # the test writes tokens too
    web = backend_process(
        env["DATABASE_URL"], private_redis.url, migrate=False, BITRIX24_PUBLIC_URL=PUBLIC_URL, **shared
    )
    http = requests.Session()
    http.trust_env = False
    staff_headers = {"Authorization": f"Token {token}"}
    assert _call(http, "GET", web.url + "/healthz").status_code == 200

    # Asked for before the outage, while no worker runs: the message sits in Redis, which loses it.
    before = _call(http, "POST", f"{web.url}/api/portals/{a.member_id}/renew/", headers=staff_headers)
    assert before.status_code == 202, before.text
    private_redis.kill()

    b, c = standin.add_portal(), standin.add_portal()
    employee = a.issue_tokens(7, admin=False)
    query, body = bx.launch(b, b.issue_tokens(1, admin=True))
    launch_query, launch_body = bx.launch(a, employee)
    event = {
        "event": "ONCRMCONTACTADD",
        "data[FIELDS][ID]": "7",
        "auth[member_id]": a.member_id,
        "auth[domain]": a.domain,
        "auth[application_token]": a.application_token,
    }
    frontend = {"X-Bitrix24-Auth": employee["access_token"], "X-Bitrix24-Member-Id": a.member_id}
    requests_during = [
        ("GET", "/healthz", {}),
        ("POST", "/install/", {"params": query, "data": body}),
        ("POST", "/events/", {"data": bx.onappinstall(c, c.issue_tokens(1, admin=True))}),
        ("POST", "/app/", {"params": launch_query, "data": launch_body}),
        ("POST", "/events/", {"data": event}),  # before the update, which brings a new application token
        ("POST", "/events/", {"data": bx.onappupdate(a, a.issue_tokens(1, admin=True))}),
        ("POST", "/events/", {"data": bx.onapppayment(a)}),
        ("GET", "/api/portals/", {"headers": staff_headers}),
        ("GET", f"/api/portals/{a.member_id}/", {"headers": staff_headers}),
        ("POST", f"/api/portals/{a.member_id}/renew/", {"headers": staff_headers}),
        (
            "POST",
            f"/api/portals/{a.member_id}/call/",
            {"headers": staff_headers, "json": {"method": "server.time"}},
        ),
        ("GET", "/api/health/", {"headers": staff_headers}),
        ("GET", "/api/app/me/", {"headers": frontend}),
        ("GET", "/admin/login/", {}),
    ]
    answers = []
    for method, path, kwargs in requests_during:
        started = time.monotonic()
        response = _call(http, method, web.url + path, **kwargs)
        answers.append((method, path, response.status_code, round(time.monotonic() - started, 2)))
        assert response.status_code < 500 or (
            response.status_code == 503 and response.headers.get("Retry-After")
        ), (path, response.status_code, response.text[:500])
    print("during the outage:", answers)
    assert dict(((m, p), s) for m, p, s, _ in answers)[("GET", "/healthz")] == 503
    assert all(s in (200, 202) for m, p, s, _ in answers if p not in ("/healthz", "/api/health/")), answers

    open_actions = WantedAction.objects.filter(done_at=None)
    assert {(w.kind, w.portal.member_id) for w in open_actions} >= {
        (WantedKind.BIND_EVENTS, b.member_id),
        (WantedKind.BIND_EVENTS, c.member_id),
        (WantedKind.RENEW_PAIR, a.member_id),
    }

    # Redis back (empty: what it held is gone), a worker, and the next beat sweep.
    private_redis.start()
    assert _call(http, "GET", web.url + "/healthz").status_code == 200
    worker_env = {
        **env,
        "REDIS_URL": private_redis.url,
        "CELERY_QUEUE": web.env["CELERY_QUEUE"],
        "BITRIX24_PUBLIC_URL": PUBLIC_URL,
        "BITRIX24_WANTED_GRACE_SECONDS": "0",
        "BITRIX24_TOKEN_KEYS": os.environ["BITRIX24_TOKEN_KEYS"],
    }
    with celery_worker(worker_env, concurrency=2):
        sweep = subprocess.run(
            [
                sys.executable,
                "manage.py",
                "shell",
                "-c",
                "from portals.tasks import sweep_due_pairs; sweep_due_pairs.delay()",
            ],
            cwd=ROOT,
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sweep.returncode == 0, sweep.stderr
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and WantedAction.objects.filter(done_at=None).exists():
            time.sleep(0.5)
    pending = list(
        WantedAction.objects.filter(done_at=None).values("kind", "portal__member_id", "last_error")
    )
    assert pending == []  # the worker's output is printed above when this fails
    for fake in (a, b, c):
        assert {(e["event"], e["handler"]) for e in fake.events} >= {
            ("ONAPPUNINSTALL", f"{PUBLIC_URL}/events/")
        }
    renewed = TokenPair.objects.get(portal=portal, user_id=7)
    assert renewed.refresh_token in standin._refresh
    assert Portal.objects.filter(member_id__in=[b.member_id, c.member_id]).count() == 2


# --- PostgreSQL away: deliveries wait in the spool ------------------------------------------------

_SEED = """
from portals.models import Portal
from install import deferred
Portal.objects.create(member_id={member_id!r}, domain="spool.bitrix24.com", application_token={token!r},
                      state="installed")
deferred.sync_mirror(force=True)  # what the beat tick does every few minutes
"""

_DRAIN = """
from events import services
from install.tasks import apply_deferred_task
print("settled", apply_deferred_task())
while services.handle_next() is not None:
    pass
"""


def _rows(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())


def test_events_and_an_uninstall_posted_while_postgresql_is_stopped_are_handled_once_each_after_it_returns(
    private_postgres, private_redis, backend_process, tmp_path
):
    """Bitrix24 delivers an event once: with PostgreSQL stopped, /events/ used to answer 503 and keep
    nothing, ONAPPUNINSTALL included. Now what the application-token mirror admits waits in the spool
    (Redis), answered 200, and is handled once when the database is back; a forged token is still refused;
    /healthz stays ready ("degraded") while the spool can take deliveries."""
    handled_dir = tmp_path / "handled"
    handled_dir.mkdir()
    web = backend_process(
        private_postgres.url,
        private_redis.url,
        BITRIX24_APPS="tests.eventapp",
        B24_TEST_EVENTAPP_DIR=str(handled_dir),
    )
    member_id, token = "f" * 32, "spool-application-token-0123456789"
    web.manage("shell", "-c", _SEED.format(member_id=member_id, token=token))
    http = requests.Session()
    http.trust_env = False

    def post(event: str, number: int, application_token: str = token) -> requests.Response:
        return _call(
            http,
            "POST",
            web.url + "/events/",
            data={
                "event": event,
                "data[FIELDS][ID]": str(number),
                "ts": str(1_700_000_000 + number),
                "auth[member_id]": member_id,
                "auth[domain]": "spool.bitrix24.com",
                "auth[application_token]": application_token,
            },
        )

    assert post("ONCRMCOMPANYADD", 1).json()["result"] == "queued"  # the database answers: as always

    private_postgres.stop()
    answers = [post("ONCRMCOMPANYADD", n) for n in (2, 3, 4)]
    uninstall = post("ONAPPUNINSTALL", 5)
    forged = post("ONCRMCOMPANYADD", 6, application_token="forged-token-0123456789")
    health = _call(http, "GET", web.url + "/healthz")
    print("while PostgreSQL is stopped:", [(a.status_code, a.json()) for a in [*answers, uninstall, forged]])
    assert [(a.status_code, a.json()["result"]) for a in answers] == [(200, "spooled")] * 3
    assert (uninstall.status_code, uninstall.json()["result"]) == (200, "spooled")
    assert forged.status_code == 401, forged.text
    assert (health.status_code, health.json()) == (200, {"status": "degraded"})
    launch = _call(http, "POST", web.url + "/app/", data={"AUTH_ID": "x" * 32, "member_id": member_id})
    assert launch.status_code == 503 and launch.headers["Retry-After"]  # a person can try again

    private_postgres.start()
    drained = web.manage("shell", "-c", _DRAIN)
    assert "settled 4" in drained.stdout, drained.stdout + drained.stderr
    again = web.manage("shell", "-c", _DRAIN)  # a second drain finds nothing more to do
    assert "settled 0" in again.stdout, again.stdout + again.stderr

    handled = sorted(int(line["id"]) for line in _eventapp_handled(handled_dir))
    assert handled == [1, 2, 3, 4]  # each once; the forged one never
    claims = _rows(
        private_postgres.url,
        "SELECT count(*) FROM portals_wantedaction w JOIN portals_portal p ON p.id = w.portal_id "
        f"WHERE w.kind = 'confirm_uninstall' AND p.member_id = '{member_id}'",
    )
    assert claims == [(1,)]
    outcomes = _rows(private_postgres.url, "SELECT event, outcome FROM install_deferredevent ORDER BY ts")
    assert outcomes == [("ONCRMCOMPANYADD", "applied")] * 3 + [("ONAPPUNINSTALL", "applied")]
    assert _call(http, "GET", web.url + "/healthz").json() == {"status": "ok"}


def _eventapp_handled(folder: Path) -> list[dict]:
    import json

    path = folder / "handled.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
