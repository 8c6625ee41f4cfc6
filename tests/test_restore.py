"""After a database restore: the backup holds refresh tokens that were used since (single-use), and
`recover_after_restore` puts back each pair's latest renewal answer from the copies kept outside the
database (portals.journal), naming the pairs it cannot vouch for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
from django.core.management import call_command
from django.core.management.base import CommandError

from portals import journal, renewal
from portals.models import RenewalTrigger, TokenPair
from tests.faults import postgres_bindir
from tests.processes import seed_pairs

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db
def test_a_restored_row_gets_its_latest_tokens_back_from_the_kept_copy(
    installed_portal, standin, settings, tmp_path, own_redis_namespace
):
    settings.VAR_DIR = tmp_path
    pair = installed_portal.token_pairs.get(user_id=1)
    backup = (
        TokenPair.objects.filter(pk=pair.pk)
        .values("refresh_token", "access_token", "refresh_issued_at")
        .get()
    )
    renewal.renew_pair(pair.pk, trigger=RenewalTrigger.COMMAND, force=True)
    renewal.renew_pair(
        pair.pk, trigger=RenewalTrigger.COMMAND, force=True
    )  # the latest copy replaces the first
    pair.refresh_from_db()
    live = pair.refresh_token
    assert live in standin._refresh and backup["refresh_token"] not in standin._refresh
    assert [p.name for p in (tmp_path / "renewal-grants" / "stored").iterdir()] == [f"{pair.pk}.grant"]
    assert live not in (tmp_path / "renewal-grants" / "stored" / f"{pair.pk}.grant").read_text()  # encrypted

    TokenPair.objects.filter(pk=pair.pk).update(**backup)  # the restore: the row as the backup had it
    call_command("recover_after_restore")
    pair.refresh_from_db()
    assert pair.refresh_token == live
    call_command("recover_after_restore")  # again: nothing more to do, nothing broken
    pair.refresh_from_db()
    assert pair.refresh_token == live
    assert renewal.renew_pair(
        pair.pk, trigger=RenewalTrigger.COMMAND, force=True
    ).renewed  # Bitrix24 takes it


@pytest.mark.django_db
def test_an_unreadable_copy_names_its_pair_and_exits_1(
    installed_portal, settings, tmp_path, capsys, own_redis_namespace
):
    settings.VAR_DIR = tmp_path
    settings.REDIS_URL = ""
    pair = installed_portal.token_pairs.get(user_id=1)
    renewal.renew_pair(pair.pk, trigger=RenewalTrigger.COMMAND, force=True)
    (tmp_path / "renewal-grants" / "stored" / f"{pair.pk}.grant").write_text("gAAAAAB-damaged")
    with pytest.raises(CommandError, match="1 pair"):
        call_command("recover_after_restore")
    out = capsys.readouterr().out
    assert f"pair {pair.pk}, portal {installed_portal.member_id}" in out and "cannot be read" in out


def test_a_copy_is_kept_no_longer_than_configured(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    settings.REDIS_URL = ""
    settings.BITRIX24_RENEWAL_COPY_DAYS = 0
    folder = tmp_path / "renewal-grants"
    folder.mkdir()
    (folder / "5.grant").write_text("x")
    journal.forget(5, pair_id=9)
    assert not (folder / "5.grant").exists() and not (folder / "stored").exists()  # 0: none kept


def _pg(tool: str) -> str:
    bindir = postgres_bindir()
    assert bindir is not None
    return str(bindir / tool)


@pytest.mark.system
def test_the_restore_drill_back_up_renew_restore_recover_every_pair_renews_or_is_named(
    standin, child_env, private_postgres, tmp_path
):
    """pg_dump, a renewal of every pair (their refresh tokens in the dump are now used), one pair's kept copy
    damaged, pg_restore: without the command every pair would be refused at its next renewal. With it, each
    pair renews, but the one whose copy cannot be read, which the command names beforehand."""
    env = {
        **child_env(standin),
        "DATABASE_URL": private_postgres.url,
        "DJANGO_VAR_DIR": str(tmp_path / "var"),
        "CELERY_QUEUE": f"restore-{tmp_path.name}"[:60],
    }
    fakes = seed_pairs(standin, 5, env)

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    dump = tmp_path / "backup.dump"
    taken = subprocess.run(
        [_pg("pg_dump"), "-Fc", "-f", str(dump), private_postgres.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert taken.returncode == 0, taken.stderr
    renewed = manage("renew_tokens", "--force")
    assert renewed.returncode == 0 and "5 renewed" in renewed.stdout, renewed.stdout + renewed.stderr
    with psycopg.connect(private_postgres.url) as conn:
        ids = {
            row[0]: row[1]
            for row in conn.execute(
                "SELECT p.id, o.member_id FROM portals_tokenpair p JOIN portals_portal o ON o.id = p.portal_id"
            )
        }
    damaged = min(ids)
    (tmp_path / "var" / "renewal-grants" / "stored" / f"{damaged}.grant").write_text("gAAAAAB-damaged")
    if env.get("REDIS_URL"):
        client = redis.Redis.from_url(env["REDIS_URL"])
        client.set(f"{env['CELERY_QUEUE']}:renewal-stored:{damaged}", "gAAAAAB-damaged")

    restored = subprocess.run(
        [_pg("pg_restore"), "--clean", "--if-exists", "-d", private_postgres.url, str(dump)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restored.returncode == 0, restored.stderr
    recovered = manage("recover_after_restore")
    print(recovered.stdout, recovered.stderr)
    assert recovered.returncode == 1
    assert "4 pair(s) restored" in recovered.stdout
    assert (
        f"pair {damaged}, portal {ids[damaged]}" in recovered.stdout and "cannot be read" in recovered.stdout
    )

    after = manage("renew_tokens", "--force")
    print(after.stdout, after.stderr)
    assert after.returncode == 1 and "4 renewed, 0 skipped, 1 failed, of 5" in after.stderr
    with psycopg.connect(private_postgres.url) as conn:
        refused = [row[0] for row in conn.execute("SELECT id FROM portals_tokenpair WHERE state <> 'active'")]
    assert refused == [damaged]  # the only pair that fails is the one the command named
    live = {fake.member_id for fake in fakes}
    assert set(ids.values()) == live
