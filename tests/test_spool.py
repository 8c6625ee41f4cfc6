"""The spool: what comes to /events/ while the database is away waits in Redis or in local files, bounded
and encrypted, and is moved into the database and handled once when it returns (portals.spool,
install.deferred). The outage itself, with a real PostgreSQL stopped under a real web process, is in
tests/test_outages.py; here each part is checked on its own, against both stores."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from events.models import AppEvent
from install import deferred
from install.models import DeferredEvent
from install.tasks import apply_deferred_task
from portals import sources, spool
from portals.models import Portal, PortalState, WantedAction, WantedKind
from portals.verification import VerificationError
from standin import payloads as bx

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["disk", "redis"])
def store(request: pytest.FixtureRequest, settings: Any, tmp_path: Path) -> Iterator[str]:
    """The spool on local files (no REDIS_URL), or on the suite's Redis under keys of this test's own."""
    settings.VAR_DIR = tmp_path
    if request.param == "disk":
        settings.REDIS_URL = ""
        yield "disk"
        return
    request.applymarker(pytest.mark.needs_redis("the spool keeps deliveries in Redis when it is configured"))
    if not django_settings.REDIS_URL:
        pytest.skip("needs redis: the spool keeps deliveries in Redis when it is configured")
    settings.CELERY_TASK_DEFAULT_QUEUE = f"spool-test-{uuid.uuid4().hex[:8]}"
    yield "redis"
    client = redis.Redis.from_url(settings.REDIS_URL)
    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    for key in [*client.scan_iter(match=f"{queue}:*"), *client.scan_iter(match=f"{{{queue}:spool}}*")]:
        client.delete(key)


def _event(member_id: str, number: int) -> dict[str, Any]:
    return {"event": "ONCRMDEALADD", "data": {"FIELDS": {"ID": str(number)}}, "member_id": member_id}


def test_entries_are_kept_encrypted_in_order_and_forgotten(store: str, settings: Any) -> None:
    secret = "application-token-" + "x" * 20
    keys = [
        spool.put(
            {**_event("m1", n), "auth": {"application_token": secret}},
            member_id="m1",
            source="1.2.3.4",
            trust=spool.VERIFIED,
        )
        for n in range(3)
    ]
    assert spool.can_take() == store
    found = spool.entries()
    assert [entry.payload["data"]["FIELDS"]["ID"] for entry in found] == ["0", "1", "2"]
    assert [entry.key for entry in found] == keys
    depth = spool.depth()
    assert depth.entries == 3 and depth.bytes == sum(entry.size for entry in found) and depth.oldest
    if store == "disk":
        texts = [path.read_text() for path in spool.folder().glob("*.spool")]
    else:
        client = redis.Redis.from_url(settings.REDIS_URL)
        texts = [
            blob.decode() for blob in client.hvals(f"{{{settings.CELERY_TASK_DEFAULT_QUEUE}:spool}}:entries")
        ]
    assert len(texts) == 3 and not any(secret in text or "ONCRMDEALADD" in text for text in texts)

    for key in keys:
        spool.remove(key)
    spool.remove(keys[0])  # twice: counted once
    assert spool.entries() == [] and spool.depth() == spool.Depth(entries=0, bytes=0, oldest=None)


def test_bounds_per_portal_per_source_and_in_bytes(store: str, settings: Any) -> None:
    settings.BITRIX24_SPOOL_PER_PORTAL = 2
    settings.BITRIX24_SPOOL_PER_SOURCE = 3
    settings.BITRIX24_SPOOL_UNVERIFIED_PER_PORTAL = 1
    put = spool.put
    put(_event("m1", 1), member_id="m1", source="a", trust=spool.VERIFIED)
    put(_event("m1", 2), member_id="m1", source="a", trust=spool.VERIFIED)
    with pytest.raises(spool.SpoolFull, match="for one portal"):
        put(_event("m1", 3), member_id="m1", source="a", trust=spool.VERIFIED)
    put(_event("m2", 1), member_id="m2", source="a", trust=spool.VERIFIED)
    with pytest.raises(spool.SpoolFull, match="from one address"):
        put(_event("m3", 1), member_id="m3", source="a", trust=spool.VERIFIED)
    put(_event("m3", 1), member_id="m3", source="b", trust=spool.VERIFIED)  # another source: its own bound
    # Unverified entries are counted on their own, with tighter bounds.
    put({"event": "ONAPPINSTALL"}, member_id="m1", source="a", trust=spool.UNVERIFIED)
    with pytest.raises(spool.SpoolFull, match="for one portal"):
        put({"event": "ONAPPINSTALL"}, member_id="m1", source="c", trust=spool.UNVERIFIED)

    settings.BITRIX24_SPOOL_MAX_ENTRY_BYTES = 100
    with pytest.raises(spool.SpoolFull, match="larger than 100 bytes"):
        put({"data": "x" * 200}, member_id="m9", source="z", trust=spool.VERIFIED)
    settings.BITRIX24_SPOOL_MAX_ENTRY_BYTES = 64 * 1024
    settings.BITRIX24_SPOOL_MAX_BYTES = spool.depth().bytes + 10
    with pytest.raises(spool.SpoolFull, match="the spool is full"):
        put(_event("m9", 1), member_id="m9", source="z", trust=spool.VERIFIED)
    assert spool.depth().entries == 5  # nothing refused was kept
    settings.BITRIX24_SPOOL_MAX_BYTES = spool.depth().bytes
    assert spool.can_take() == ""  # full: /healthz is not ready while the database is away


def test_the_mirror_admits_the_portals_application_token_only(store: str, installed_portal: Portal) -> None:
    member_id, token = installed_portal.member_id, installed_portal.application_token
    assert spool.mirror_matches(member_id, token) is None  # never written: nothing can be admitted
    assert deferred.sync_mirror() is True
    assert deferred.sync_mirror() is False  # fresh: not rewritten every minute
    assert spool.mirror_matches(member_id, token) is True
    assert spool.mirror_matches(member_id, token + "x") is False
    assert spool.mirror_matches("not-a-portal", token) is False
    spool.mirror_set(member_id, "")  # uninstalled
    assert spool.mirror_matches(member_id, token) is False
    assert token not in "".join(p.read_text() for p in spool.folder().glob("*.json"))  # digests only


def test_the_mirror_follows_installs_and_uninstalls(
    store: str, installed_portal: Portal, django_capture_on_commit_callbacks: Any
) -> None:
    from portals import services

    deferred.sync_mirror(force=True)
    with django_capture_on_commit_callbacks(execute=True):
        services.uninstall_portal(portal=installed_portal, clean=False)
    assert spool.mirror_matches(installed_portal.member_id, installed_portal.application_token) is False


def _spool(params: dict[str, Any], source: str = "203.0.113.7") -> str:
    with sources.using(source):
        return deferred.spool_delivery(
            name=params["event"], auth=params["auth"], data=params.get("data", {}), ts=params.get("ts")
        )


def _save_spool(store: str) -> Any:
    if store == "disk":
        return {path.name: path.read_bytes() for path in spool.folder().glob("*.spool")}
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    prefix = f"{{{django_settings.CELERY_TASK_DEFAULT_QUEUE}:spool}}"
    return {key: client.dump(key) for key in (f"{prefix}:entries", f"{prefix}:order", f"{prefix}:counts")}


def _restore_spool(store: str, saved: Any) -> None:
    if store == "disk":
        for name, blob in saved.items():
            (spool.folder() / name).write_bytes(blob)
        return
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    for key, blob in saved.items():
        client.restore(key, 0, blob, replace=True)


def test_what_waited_is_moved_in_and_handled_once(
    store: str, installed_portal: Portal, b24: Any, handlers: Path, standin: Any
) -> None:
    """Spooled events of the app, an uninstall and an install: after the drain the app event is stored
    once, the uninstall is a claim, the install is verified with Bitrix24 and applied; a drain that died
    before forgetting an entry does not handle it twice."""
    deferred.sync_mirror(force=True)
    auth = {
        "member_id": b24.member_id,
        "domain": b24.domain,
        "application_token": b24.application_token,
        "access_token": "a" * 32,
    }
    _spool({"event": "ONCRMDEALADD", "auth": auth, "data": {"FIELDS": {"ID": "7"}}, "ts": "100"})
    _spool({"event": "ONAPPUNINSTALL", "auth": auth, "data": {"CLEAN": "0"}, "ts": "300"})
    with pytest.raises(VerificationError):
        _spool({"event": "ONCRMDEALADD", "auth": {**auth, "application_token": "forged"}, "data": {}})
    other = standin.add_portal()
    install = dict(bx.onappinstall(other, other.issue_tokens(1, admin=True)))
    auth_install = {k[5:-1]: v for k, v in install.items() if k.startswith("auth[")}
    _spool({"event": "ONAPPINSTALL", "auth": auth_install, "data": {"VERSION": "1"}, "ts": "200"})
    assert spool.depth().entries == 3 and DeferredEvent.objects.count() == 0

    # A drain killed after the database took the entries and before the spool forgot them: the spool is
    # put back as it was before the drain, and the next drain must not store anything twice.
    saved = _save_spool(store)
    assert deferred.drain_spool() == 3
    _restore_spool(store, saved)
    assert spool.depth().entries == 3
    assert apply_deferred_task.apply().get() == 3
    assert spool.depth().entries == 0

    assert AppEvent.objects.filter(portal=installed_portal, event="ONCRMDEALADD").count() == 1
    claim = WantedAction.objects.get(portal=installed_portal, kind=WantedKind.CONFIRM_UNINSTALL)
    assert claim.done_at is None
    assert Portal.objects.get(member_id=other.member_id).state == PortalState.INSTALLED
    outcomes = dict(DeferredEvent.objects.values_list("event", "outcome"))
    assert outcomes == {"ONCRMDEALADD": "applied", "ONAPPUNINSTALL": "applied", "ONAPPINSTALL": "applied"}
    assert set(DeferredEvent.objects.values_list("payload", flat=True)) == {""}  # tokens not kept past it


def _deal_added(portal: Portal) -> dict[str, str]:
    """ONCRMDEALADD as Bitrix24 posts it to the app, form fields by name."""
    return {
        "event": "ONCRMDEALADD",
        "auth[member_id]": portal.member_id,
        "auth[application_token]": portal.application_token,
        "data[FIELDS][ID]": "7",
    }


def test_after_the_database_failed_events_go_to_the_spool_without_asking_it_until_it_is_tried_again(
    store: str, installed_portal: Portal, client: Any, fake_clock: Any, django_assert_num_queries: Any
) -> None:
    """A database host that does not answer costs each request the connect timeout: after one failure the
    next events are spooled at once, and after RETRY_SECONDS the database is asked again."""
    from urllib.parse import urlencode

    from portals import outage

    deferred.sync_mirror(force=True)
    body = _deal_added(installed_portal)
    form = "application/x-www-form-urlencoded"
    outage.database_failed()  # as a failed insert or /healthz's probe records it
    with django_assert_num_queries(0):
        for _ in range(3):
            answer = client.post("/events/", urlencode(body), content_type=form)
            assert (answer.status_code, answer.json()["result"]) == (200, "spooled")
    assert spool.depth().entries == 3

    fake_clock.advance(outage.RETRY_SECONDS + 1)
    answer = client.post("/events/", urlencode(body), content_type=form)
    assert answer.status_code == 200 and answer.json()["result"] != "spooled"  # asked, and it answered
    assert not outage.skip_database()


def test_a_deadlock_on_a_database_that_answers_does_not_make_the_process_skip_it(
    store: str, installed_portal: Portal, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OperationalError also means a deadlock or a lock timeout: that delivery goes to the spool, and the
    next one asks the database as usual (the connection is alive)."""
    from urllib.parse import urlencode

    from django.db import OperationalError

    from portals import outage, statements

    deferred.sync_mirror(force=True)
    body = _deal_added(installed_portal)
    real_insert = statements.insert

    def deadlocked(row: Any) -> None:
        from django.db import connection

        connection.ensure_connection()  # the connection is up: the database answered, with an error
        raise OperationalError("deadlock detected")

    monkeypatch.setattr(statements, "insert", deadlocked)
    answer = client.post("/events/", urlencode(body), content_type="application/x-www-form-urlencoded")
    assert (answer.status_code, answer.json()["result"]) == (200, "spooled")
    assert not outage.skip_database()
    monkeypatch.setattr(statements, "insert", real_insert)
    answer = client.post("/events/", urlencode(body), content_type="application/x-www-form-urlencoded")
    assert answer.status_code == 200 and answer.json()["result"] != "spooled"
