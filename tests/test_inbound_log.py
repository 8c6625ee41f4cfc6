"""The inbound log is bounded: junk leaves a few KB a request, old rows go in batches, junk event
names never reach the admin's filter, and staff may delete rows."""

from __future__ import annotations

import json
import random
import string
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from install import retention
from install.inbound import INVALID_EVENT
from install.models import InboundRequest, InboundStatus
from tests.factories import InboundRequestFactory

pytestmark = pytest.mark.django_db

FORM = "application/x-www-form-urlencoded"
BODY_SIZE = 250 * 1024


def _noise(rng: random.Random, size: int) -> str:
    # Random text: PostgreSQL compresses what it stores, and repeated characters would hide the growth.
    return "".join(rng.choices(string.ascii_letters + string.digits, k=size))


def _junk(i: int) -> tuple[bytes, str]:
    """About 250 KB of junk, in the shapes that used to be kept in full."""
    rng = random.Random(i)
    shape = i % 4
    if shape == 0:  # long keys and values: the old "truncated" summary kept every key name whole
        pairs = [f"k{n}{_noise(rng, 1500)}={_noise(rng, 1000)}" for n in range(100)]
        return "&".join(pairs).encode()[:BODY_SIZE], FORM
    if shape == 1:  # a JSON event from no known portal, many keys of 600 characters
        data = {f"field_{n}_{_noise(rng, 40)}": _noise(rng, 600) for n in range(380)}
        body = {
            "event": "ONCRMDEALADD",
            "auth": {"member_id": f"m{i}", "application_token": "t"},
            "data": data,
        }
        return json.dumps(body).encode(), "application/json"
    if shape == 2:  # an event "name" of 250 KB
        return ("event=" + _noise(rng, BODY_SIZE - 20)).encode(), FORM
    return rng.randbytes(BODY_SIZE), FORM  # not UTF-8 at all


def _log_bytes() -> int:
    table = InboundRequest._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_total_relation_size(%s)", [table])
            return int(cursor.fetchone()[0])
        # SQLite: the stored size of every row, column by column (the file grows by about as much).
        columns = " + ".join(
            f"COALESCE(LENGTH(CAST({connection.ops.quote_name(f.column)} AS BLOB)), 0)"
            for f in InboundRequest._meta.concrete_fields
        )
        cursor.execute(f"SELECT COALESCE(SUM({columns}), 0) FROM {table}")
        return int(cursor.fetchone()[0])


def test_junk_bodies_grow_the_log_by_a_few_kb_each(client):
    before = _log_bytes()
    for i in range(100):
        body, content_type = _junk(i)
        assert len(body) > 200 * 1024
        response = client.generic("POST", "/events/", body, content_type=content_type)
        assert 400 <= response.status_code < 500, (i, response.status_code, response.content[:200])
    grown = _log_bytes() - before
    print(f"inbound log grew by {grown / 1024:.0f} KB for 100 junk bodies of 250 KB ({connection.vendor})")
    assert InboundRequest.objects.count() == 100
    assert grown < 3 * 1024 * 1024
    for row in InboundRequest.objects.all():
        assert len(json.dumps([row.body, row.query])) < 8000
    # What was kept still says what came: the summary counts the keys and bytes.
    kept = InboundRequest.objects.filter(error__contains="event is required").first()
    assert kept is not None
    assert kept.body["_keys"] == 100 and kept.body["_bytes"] > 200 * 1024, kept.body


def test_an_accepted_request_keeps_its_whole_redacted_body(client, installed_portal):
    body = {
        "event": "ONCRMDEALADD",
        "auth[member_id]": installed_portal.member_id,
        "auth[application_token]": installed_portal.application_token,
        **{f"data[FIELDS][F{n}]": "v" * 150 for n in range(40)},
    }
    from portals import registry

    with registry.replaced(lambda: registry.on("ONCRMDEALADD")(lambda event: None)):
        response = client.post("/events/", urlencode(body), content_type=FORM)
    assert response.status_code == 200, response.content
    row = InboundRequest.objects.get(status=InboundStatus.ACCEPTED)
    assert len(row.body["data"]["FIELDS"]) == 40
    assert row.body["data"]["FIELDS"]["F39"] == "v" * 150
    assert "<redacted fp:" in row.body["auth"]["application_token"]


def test_an_event_nothing_handles_leaves_a_summary_of_a_few_hundred_bytes(client, installed_portal):
    """Storage follows trust: an event without a handler was stored whole (37 KB each, 200 in 4 s)."""
    body = {
        "event": "ONCRMDEALADD",
        "auth[member_id]": installed_portal.member_id,
        "auth[application_token]": installed_portal.application_token,
        **{f"data[FIELDS][F{n}]": "v" * 900 for n in range(40)},
    }
    response = client.post("/events/", urlencode(body), content_type=FORM)
    assert response.status_code == 200 and response.json()["result"] == "ignored"
    row = InboundRequest.objects.get()
    assert row.valid is True and row.status == InboundStatus.ACCEPTED
    assert len(json.dumps(row.body)) <= 400 and len(json.dumps(row.query)) <= 400
    assert row.body["_bytes"] > 36_000  # what came, in figures only


def test_an_anonymous_payment_event_leaves_a_summary_only(client, installed_portal):
    """ONAPPPAYMENT carries no token: whoever sent it proved nothing (it kept ≈ 49 KB a row before)."""
    body = {
        "event": "ONAPPPAYMENT",
        "auth[member_id]": installed_portal.member_id,
        **{f"data[F{n}]": "p" * 1200 for n in range(40)},
    }
    response = client.post("/events/", urlencode(body), content_type=FORM)
    assert response.status_code == 200
    row = InboundRequest.objects.get()
    assert row.valid is None
    assert len(json.dumps(row.body)) <= 400


@pytest.mark.parametrize(
    ("claimed", "stored"),
    [
        ("ONCRMDEALADD", "ONCRMDEALADD"),
        ("onappinstall", "ONAPPINSTALL"),
        ("<script>alert(1)</script>", INVALID_EVENT),
        ("X" * 60, INVALID_EVENT),
        ("ON", INVALID_EVENT),
        ("", ""),
    ],
)
def test_only_event_shaped_names_are_kept(client, claimed, stored):
    client.post("/events/", urlencode({"event": claimed, "auth[member_id]": "m1"}), content_type=FORM)
    assert InboundRequest.objects.get().event == stored


def test_junk_event_names_do_not_reach_the_admin_filter(client, admin_client):
    for n in range(40):
        client.post("/events/", urlencode({"event": f"junk-{n}-{'q' * 30}"}), content_type=FORM)
    client.post("/events/", urlencode({"event": "ONCRMDEALADD"}), content_type=FORM)
    page = admin_client.get("/admin/install/inboundrequest/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "junk-" not in html
    assert "?event=ONAPPINSTALL" in html  # the fixed choices
    invalid = admin_client.get("/admin/install/inboundrequest/", {"event": INVALID_EVENT})
    assert "40 inbound requests" in invalid.content.decode()
    other = admin_client.get("/admin/install/inboundrequest/", {"event": "_other"})
    assert "1 inbound request" in other.content.decode()


def test_staff_may_delete_rows_but_change_nothing(admin_client):
    rows = InboundRequestFactory.create_batch(3)
    response = admin_client.post(
        "/admin/install/inboundrequest/",
        {"action": "delete_selected", "_selected_action": [rows[0].pk, rows[1].pk], "post": "yes"},
    )
    assert response.status_code == 302
    assert list(InboundRequest.objects.values_list("pk", flat=True)) == [rows[2].pk]
    assert (
        admin_client.post(f"/admin/install/inboundrequest/{rows[2].pk}/delete/", {"post": "yes"}).status_code
        == 302
    )
    assert not InboundRequest.objects.exists()
    row = InboundRequestFactory()
    assert (
        admin_client.post(f"/admin/install/inboundrequest/{row.pk}/change/", {"error": "x"}).status_code
        == 403
    )
    assert admin_client.get("/admin/install/inboundrequest/add/").status_code == 403


def test_staff_without_the_delete_permission_cannot_delete(client, staff_user):
    from django.contrib.auth.models import Permission

    staff_user.user_permissions.add(Permission.objects.get(codename="view_inboundrequest"))
    client.force_login(staff_user)
    row = InboundRequestFactory()
    assert client.post(f"/admin/install/inboundrequest/{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert InboundRequest.objects.filter(pk=row.pk).exists()


def test_retention_deletes_old_rows_in_batches(settings):
    settings.INBOUND_LOG_RETENTION_DAYS = 30
    old = InboundRequestFactory.create_batch(25)
    recent = InboundRequestFactory.create_batch(5)
    InboundRequest.objects.filter(pk__in=[r.pk for r in old]).update(
        created_at=timezone.now() - timedelta(days=31)
    )
    InboundRequest.objects.filter(pk__in=[r.pk for r in recent]).update(
        created_at=timezone.now() - timedelta(days=29)
    )
    with CaptureQueriesContext(connection) as queries:
        assert retention.purge_expired(batch_size=10) == 25
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3  # 10 + 10 + 5
    assert set(InboundRequest.objects.values_list("pk", flat=True)) == {r.pk for r in recent}


def test_retention_task_uses_the_setting_and_is_scheduled(settings):
    from django_celery_beat.models import PeriodicTask

    from install.tasks import purge_inbound_log

    row = InboundRequestFactory()
    InboundRequest.objects.filter(pk=row.pk).update(created_at=timezone.now() - timedelta(days=8))
    settings.INBOUND_LOG_RETENTION_DAYS = 10
    assert purge_inbound_log.apply().get() == 0
    settings.INBOUND_LOG_RETENTION_DAYS = 7
    assert purge_inbound_log.apply().get() == 1
    task = PeriodicTask.objects.get(task="install.tasks.purge_inbound_log")
    assert task.enabled and task.interval is not None


def test_retention_zero_keeps_everything(settings):
    row = InboundRequestFactory()
    InboundRequest.objects.filter(pk=row.pk).update(created_at=timezone.now() - timedelta(days=3000))
    settings.INBOUND_LOG_RETENTION_DAYS = 0
    assert retention.purge_expired() == 0
    assert InboundRequest.objects.exists()


# --- two facts: valid (it came from Bitrix24) and processed (it was carried out), and a failure's traceback


@pytest.mark.django_db(transaction=True)
def test_the_log_keeps_whether_a_request_proved_itself_and_whether_it_was_carried_out(backend, b24):
    from portals import registry
    from portals.errors import NoUsablePair

    tokens = b24.issue_tokens(1, admin=True)
    assert backend.launch(b24, tokens).status_code == 200
    forged = {**b24.issue_tokens(1, admin=True), "access_token": "forged-token-0123456789"}
    assert backend.launch(b24, forged).status_code == 401

    def broken(request, context):
        raise NoUsablePair("no active token pair")  # met after the token was verified

    def bug(request, context):
        raise ZeroDivisionError("auth_id=secret-auth-0123456789 in a message")

    with registry.replaced():
        registry.placement("DEFAULT", title="Home")(broken)
        assert backend.launch(b24, b24.issue_tokens(1, admin=True)).status_code == 409
    with registry.replaced():
        registry.placement("DEFAULT", title="Home")(bug)
        assert backend.launch(b24, b24.issue_tokens(1, admin=True)).status_code == 500
    rows = list(
        InboundRequest.objects.order_by("pk").values_list("status", "valid", "processed", "traceback")
    )
    assert [row[:3] for row in rows] == [
        (InboundStatus.ACCEPTED, True, True),
        (InboundStatus.REJECTED, False, False),
        (InboundStatus.REJECTED, True, False),
        (InboundStatus.FAILED, True, False),
    ]
    assert [bool(row[3]) for row in rows] == [False, False, False, True]  # the traceback of our own failure
    trace = rows[3][3]
    assert "ZeroDivisionError" in trace and "secret-auth-0123456789" not in trace


def test_staff_see_which_sources_sent_what_did_not_prove_itself(
    client, admin_client, installed_portal, settings
):
    settings.FORWARDED_ALLOW_IPS = ["127.0.0.1"]
    for n in range(3):
        forged = {
            "event": "ONCRMDEALADD",
            "auth[member_id]": installed_portal.member_id,
            "auth[application_token]": f"{n}" * 32,
        }
        response = client.post(
            "/events/", urlencode(forged), content_type=FORM, HTTP_X_FORWARDED_FOR="203.0.113.9"
        )
        assert response.status_code == 401
    assert set(InboundRequest.objects.values_list("source", flat=True)) == {"203.0.113.9"}
    page = admin_client.get("/admin/install/inboundrequest/")
    assert page.status_code == 200
    assert [(row["source"], row["requests"], row["refused"]) for row in page.context["unproven_sources"]] == [
        ("203.0.113.9", 3, 3)
    ]
    assert "203.0.113.9" in page.content.decode()
