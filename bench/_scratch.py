"""What both benchmarks need: a scratch PostgreSQL database, the stand-in, and the environment that
points the product (and the processes it starts) at them."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class OAuthProcess:
    """The stand-in's OAuth server in a child process (bench/_oauth.py), with `grants` issued."""

    client_id = "app.bench"
    client_secret = "bench-secret"  # noqa: S105 - the stand-in's

    def __init__(self, latency: float, grants: int) -> None:
        self._out = Path(tempfile.mkdtemp(prefix="b24-bench-oauth-")) / "grants.jsonl"
        self._proc = subprocess.Popen(
            [
                *(sys.executable, str(ROOT / "bench" / "_oauth.py"), "--latency", str(latency)),
                *("--grants", str(grants), "--out", str(self._out)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        self.oauth_url = self._proc.stdout.readline().strip()
        self.grants = [json.loads(line) for line in self._out.read_text().splitlines()]
        self.pid = self._proc.pid

    @property
    def stats(self) -> dict[str, int]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("stats\n")
        self._proc.stdin.flush()
        return collections.Counter(json.loads(self._proc.stdout.readline()))

    def stop(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(10)


@contextlib.contextmanager
def scratch(
    oauth_latency: float = 0.0, oauth: OAuthProcess | None = None, also_trust: tuple[str, ...] = ()
) -> Iterator[Any]:
    """Yields the started StandIn (or `oauth`, the OAuth server in its own process) with Django set up
    on a fresh database; drops it afterwards. `also_trust`: more OAuth servers the product may use."""
    from cryptography.fernet import Fernet

    from standin import StandIn

    base = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    parts = urlsplit(base)
    db_name = f"bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = ["psql", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432)]
    admin += ["-U", parts.username or "postgres", "-q", "-c"]
    subprocess.run([*admin, f"CREATE DATABASE {db_name}"], check=True)
    standin: Any = oauth
    if standin is None:
        standin = StandIn(client_id="app.bench", client_secret="bench-secret").start()
        standin.oauth_latency = oauth_latency
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(40),
        DJANGO_VAR_DIR=tempfile.mkdtemp(prefix="b24-bench-"),
        DATABASE_URL=parts._replace(path=f"/{db_name}").geturl(),
        BITRIX24_TOKEN_KEYS=Fernet.generate_key().decode(),
        BITRIX24_CLIENT_ID=standin.client_id,
        BITRIX24_CLIENT_SECRET=standin.client_secret,
        BITRIX24_OAUTH_SERVERS=",".join((standin.oauth_url, *also_trust)),
        BITRIX24_PORTAL_DOMAINS="127.0.0.1:*",
        BITRIX24_ALLOW_HTTP="1",
        CELERY_QUEUE=f"bench_{db_name}",
        DJANGO_LOG_LEVEL="WARNING",
    )
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        yield standin
    finally:
        standin.stop()
        from django.db import connections

        connections.close_all()
        subprocess.run([*admin, f"DROP DATABASE IF EXISTS {db_name}"], check=False)


def store_portal(
    standin: object, fake: object, *, refresh_age_days: float = 0, **portal_fields: object
) -> object:
    """A Portal row with the fake portal's background pair, as an install would leave it."""
    from datetime import timedelta

    from django.utils import timezone

    from portals.models import Portal, TokenPair

    tokens = fake.issue_tokens(1)  # type: ignore[attr-defined]
    portal = Portal.objects.create(
        member_id=fake.member_id,  # type: ignore[attr-defined]
        domain=fake.domain,  # type: ignore[attr-defined]
        protocol="http",
        oauth_server=standin.oauth_url,  # type: ignore[attr-defined]
        **portal_fields,
    )
    TokenPair.objects.create(
        portal=portal,
        user_id=1,
        is_background=True,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
        access_expires_at=timezone.now() + timedelta(hours=1),
        refresh_issued_at=timezone.now() - timedelta(days=refresh_age_days),
    )
    return portal


TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU of every process in a process group (the benchmarks' servers and workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return total / TICKS


def store_due_pairs(oauth_url: str, grants: list[dict[str, str]]) -> None:
    """Portals with one background pair each, from `grants` the OAuth server at `oauth_url` issued, whose
    refresh tokens are due for the sweep (25 days old)."""
    from datetime import timedelta

    from django.utils import timezone

    from portals.models import Portal, TokenPair

    now = timezone.now()
    for start in range(0, len(grants), 5000):
        chunk = grants[start : start + 5000]
        Portal.objects.bulk_create(
            [
                Portal(member_id=g["member_id"], domain=g["domain"], protocol="http", oauth_server=oauth_url)
                for g in chunk
            ],
            batch_size=1000,
        )
        ids = dict(
            Portal.objects.filter(member_id__in=[g["member_id"] for g in chunk]).values_list(
                "member_id", "pk"
            )
        )
        TokenPair.objects.bulk_create(
            [
                TokenPair(
                    portal_id=ids[g["member_id"]],
                    user_id=1,
                    is_background=True,
                    access_token=g["access_token"],
                    refresh_token=g["refresh_token"],
                    access_expires_at=now + timedelta(hours=1),
                    refresh_issued_at=now - timedelta(days=25),
                )
                for g in chunk
            ],
            batch_size=1000,
        )
