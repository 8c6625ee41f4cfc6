"""Real processes of the product for tests: a Celery worker as a process manager runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def celery_worker(
    env: dict[str, str], concurrency: int = 1, queues: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[str]]:
    """`celery worker` (prefork) in its own process group, on the broker `env` names, serving `queues`
    (kinds of config/routing.py, e.g. "custody.now"; all when empty); killed with its pool afterwards if
    the test did not stop it. Its output is printed, so a failing test shows it."""
    base = env.get("CELERY_QUEUE") or django_settings.CELERY_TASK_DEFAULT_QUEUE
    serve = ("-Q", ",".join(f"{base}.{kind}" for kind in queues)) if queues else ()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "config", "worker", "--concurrency", str(concurrency)),
            *("--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat", *serve),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        print(proc.communicate(timeout=60)[0][-4000:])


# Run as `python -c _SEED_PAIRS` with a JSON list on stdin (member_id, domain, oauth_server, access_token,
# refresh_token each): migrates the database DATABASE_URL names, then stores one portal and its background
# pair per item, the refresh token issued 25 days ago (due).
_SEED_PAIRS = """
import json, sys
import django
django.setup()
from datetime import timedelta
from django.core.management import call_command
from django.utils import timezone
from portals.models import Portal, TokenPair
call_command("migrate", verbosity=0)
for item in json.loads(sys.stdin.read()):
    portal = Portal.objects.create(
        member_id=item["member_id"], domain=item["domain"], protocol="http", oauth_server=item["oauth_server"]
    )
    TokenPair.objects.create(
        portal=portal, user_id=1, is_background=True, access_token=item["access_token"],
        refresh_token=item["refresh_token"], access_expires_at=timezone.now() + timedelta(hours=1),
        refresh_issued_at=timezone.now() - timedelta(days=25),
    )
"""


def seed_pairs(standin: Any, count: int, env: dict[str, str]) -> list[Any]:
    """`count` stand-in portals, each stored with a due background pair in the database `env` names (a
    real process: the test's own Django is on another database). Returns the stand-in's portals."""
    fakes = [standin.add_portal() for _ in range(count)]
    seed = []
    for fake in fakes:
        tokens = fake.issue_tokens(1, admin=True)
        seed.append(
            {
                "member_id": fake.member_id,
                "domain": fake.domain,
                "oauth_server": standin.oauth_url,
                "access_token": tokens["access_token"],
                "refresh_token": tokens["refresh_token"],
            }
        )
    seeded = subprocess.run(
        [sys.executable, "-c", _SEED_PAIRS],
        input=json.dumps(seed),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert seeded.returncode == 0, seeded.stderr
    return fakes
