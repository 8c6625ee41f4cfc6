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
from portals.standin import payloads as bx
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
