"""The portal REST client against the stand-in: limits, tokens, retries, renames, batches, lists."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery.signals import before_task_publish

from config.celery import app as celery_app
from portals import bindings, client
from portals.client import PortalClient
from portals.models import Portal, TokenPair, WantedAction, WantedKind
from portals.tasks import carry_out_task
from standin import payloads as bx

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


def _calls(b24, method: str) -> list[tuple[str, str, dict]]:
    return [c for c in b24.calls if c[1] == method]


def test_list_returns_every_item_in_pages_of_fifty(installed_portal, b24):
    b24.seed("crm.contact", 120)
    items = list(PortalClient(installed_portal).list("crm.contact.list", {"select": ["ID", "NAME"]}))
    assert len(items) == 120
    assert len({item["ID"] for item in items}) == 120
    assert len(_calls(b24, "crm.contact.list")) == 3


def test_list_fast_path_uses_start_minus_one(installed_portal, b24):
    b24.seed("crm.contact", 120)
    items = list(PortalClient(installed_portal).list("crm.contact.list", fast=True))
    assert [int(i["ID"]) for i in items] == sorted(int(i["ID"]) for i in items)
    assert len(items) == 120
    calls = _calls(b24, "crm.contact.list")
    assert len(calls) == 3 and all(str(c[2].get("start")) == "-1" for c in calls)


def test_batch_of_120_commands_goes_out_as_3_requests_with_errors_per_command(installed_portal, b24):
    b24.seed("crm.contact", 5)
    commands = {f"c{i}": ("crm.contact.get", {"id": 1 + i % 5}) for i in range(119)}
    commands["broken"] = ("no.such.method", {})
    result = PortalClient(installed_portal).batch(commands)
    assert result.requests == 3
    assert len(_calls(b24, "batch")) == 3
    assert len(result.results) == 119
    assert result.results["c0"]["ID"] in ("1", 1)
    assert set(result.errors) == {"broken"}
    assert result.errors["broken"].code
    with pytest.raises(client.RestError, match="1 batch command"):
        result.raise_for_errors()


def test_batch_with_halt_stops_at_the_first_error(installed_portal, b24):
    b24.seed("crm.contact", 3)
    commands = {
        "a": ("crm.contact.get", {"id": 1}),
        "bad": ("no.such.method", {}),
        "c": ("crm.contact.get", {"id": 2}),
    }
    result = PortalClient(installed_portal).batch(commands, halt=True)
    assert "bad" in result.errors
    assert "c" not in result.results


def test_typed_errors(installed_portal, b24):
    with pytest.raises(client.MethodNotFound):
        PortalClient(installed_portal).call("no.such.method")
    b24.deleted = True
    with pytest.raises(client.PortalDeleted):
        PortalClient(installed_portal).call("server.time")


def test_expired_token_mid_run_renews_once_and_carries_on(installed_portal, b24, standin):
    api = PortalClient(installed_portal)
    assert api.call("profile")["ID"]
    before = standin.stats["refresh_ok"]
    standin.advance(3601)  # Bitrix24's clock: the access token has expired, our records do not know yet
    for _ in range(3):
        assert api.call("server.time")
    assert standin.stats["refresh_ok"] == before + 1
    assert TokenPair.objects.get(portal=installed_portal).access_token == api._pair.access_token


CALLER = """
import sys, time
import django
django.setup()
from portals.client import PortalClient
from portals.models import Portal
portal = Portal.objects.get(member_id=sys.argv[1])
count, start_at = int(sys.argv[2]), float(sys.argv[3])
api = PortalClient(portal)
time.sleep(max(0.0, start_at - time.time()))
for _ in range(count):
    api.call("server.time")
print("ok")
"""


def _run_callers(child_env, standin, member_id: str, processes: int, calls: int, extra_env=None):
    env = child_env(standin)
    env.update(extra_env or {})
    start_at = time.time() + 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CALLER, member_id, str(calls), str(start_at)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], outputs, time.time() - start_at


@pytest.mark.system
def test_two_processes_meeting_expired_token_renew_once_between_them(
    installed_portal, b24, standin, child_env
):
    PortalClient(installed_portal).call("server.time")
    before = standin.stats["refresh_ok"], standin.stats["refresh_invalid_grant"]
    standin.advance(3601)
    codes, outputs, _ = _run_callers(child_env, standin, b24.member_id, processes=2, calls=2)
    assert codes == [0, 0], outputs
    assert standin.stats["refresh_ok"] == before[0] + 1
    assert standin.stats["refresh_invalid_grant"] == before[1]


@pytest.mark.system
@pytest.mark.needs_redis("without Redis the governor is per process by design (see docs/calling-bitrix24.md)")
def test_500_calls_from_4_processes_stay_within_the_portals_limit(standin, backend, child_env):
    fake = standin.add_portal(rate=25.0, burst=50)
    assert backend.install_event(fake, fake.issue_tokens(1, admin=True)).status_code == 200
    Portal.objects.filter(member_id=fake.member_id).update(rate_limit=25.0, rate_burst=50)
    calls_before = fake.bucket_stats["calls"]

    codes, outputs, wall = _run_callers(child_env, standin, fake.member_id, processes=4, calls=125)

    assert codes == [0] * 4, outputs  # no QUERY_LIMIT_EXCEEDED reached any caller
    assert fake.bucket_stats["rejected"] == 0
    assert fake.bucket_stats["max_level"] <= fake.burst
    assert fake.bucket_stats["calls"] - calls_before == 500
    # 500 calls with a bucket of 50 draining at 25/s cannot take less than (500 - 50) / 25 = 18 s.
    assert wall >= 17


@pytest.mark.system
def test_query_limit_exceeded_is_absorbed_when_the_portal_is_stricter_than_configured(installed_portal, b24):
    Portal.objects.filter(pk=installed_portal.pk).update(
        rate_limit=100.0, rate_burst=100
    )  # we believe too much
    b24.rate, b24.burst = 5.0, 5
    installed_portal.refresh_from_db()
    api = PortalClient(installed_portal)
    for _ in range(12):
        assert api.call("server.time")
    assert b24.bucket_stats["rejected"] > 0  # the portal did say no …
    # … and the client backed off and re-sent each refused call: every caller got its answer.


@pytest.mark.system
def test_a_write_that_timed_out_is_not_sent_again(installed_portal, b24, settings):
    settings.BITRIX24_HTTP_TIMEOUT = (2.0, 0.5)
    b24.write_delay = 1.5
    with pytest.raises(client.TransportError) as failure:
        PortalClient(installed_portal).call("crm.contact.add", {"fields": {"NAME": "Once"}})
    assert failure.value.maybe_sent
    assert "not re-sent" in str(failure.value)
    time.sleep(1.2)
    assert len(_calls(b24, "crm.contact.add")) == 1
    assert [c["NAME"] for c in b24.items["crm.contact"]] == ["Once"]  # it did land, once


@pytest.mark.system
def test_a_read_that_timed_out_is_retried(installed_portal, b24, settings):
    b24.seed("crm.contact", 3)
    settings.BITRIX24_HTTP_TIMEOUT = (2.0, 0.5)
    b24.rest_latency = 0.8
    with pytest.raises(client.TransportError):
        PortalClient(installed_portal).call("crm.contact.get", {"id": 1})
    assert len(_calls(b24, "crm.contact.get")) == 3  # first try and two retries


@pytest.mark.system
def test_an_idempotent_write_may_be_retried(installed_portal, b24, settings):
    b24.seed("crm.contact", 1)
    settings.BITRIX24_HTTP_TIMEOUT = (2.0, 0.5)
    b24.write_delay = 0.8
    with pytest.raises(client.TransportError):
        PortalClient(installed_portal).call(
            "crm.contact.update", {"id": 1, "fields": {"NAME": "x"}}, idempotent=True
        )
    assert len(_calls(b24, "crm.contact.update")) == 3


def test_renamed_portal_gets_the_post_resent_as_a_post(installed_portal, b24, standin):
    old = b24.domain
    app_info_before = standin.stats["app_info"]
    b24.rename()
    new_id = PortalClient(installed_portal).call("crm.contact.add", {"fields": {"NAME": "After rename"}})
    assert new_id
    installed_portal.refresh_from_db()
    assert installed_portal.domain == b24.domain != old
    assert standin.stats["app_info"] == app_info_before + 1  # the new address confirmed once
    adds = _calls(b24, "crm.contact.add")
    assert len(adds) == 1
    http_method, _, params = adds[0]
    assert http_method == "POST"
    assert params["fields"]["NAME"] == "After rename"


def test_form_bodies_with_nested_keys(installed_portal, b24):
    new_id = PortalClient(installed_portal, form=True).call("crm.contact.add", {"fields": {"NAME": "Form"}})
    assert new_id
    assert b24.items["crm.contact"][-1]["NAME"] == "Form"


def test_operation_time_limit_fails_fast_when_asked_and_figures_are_kept(installed_portal, b24):
    b24.seed("crm.contact", 3)
    api = PortalClient(installed_portal)
    api.call("crm.contact.list")
    figures = api.operating("crm.contact.list")
    assert figures is not None and "operating" in figures and figures["reset_at"]
    b24.operating_limit = 0.0  # everything from now on is over the limit
    with pytest.raises(client.OperationTimeLimit) as failure:
        api.call("crm.contact.list", fail_fast=True)
    assert failure.value.status == 429
    assert failure.value.reset_at


def test_user_pair_is_used_when_asked(installed_portal, backend, b24):
    employee = b24.issue_tokens(7, admin=False)
    backend.launch(b24, employee)
    assert str(PortalClient(installed_portal, user_id=7).call("profile")["ID"]) == "7"
    assert str(PortalClient(installed_portal).call("profile")["ID"]) == "1"


# --- event bindings ---------------------------------------------------------------------------------


def test_bind_events_is_idempotent_and_rebinds_after_an_update(installed_portal, b24, backend, settings):
    settings.BITRIX24_PUBLIC_URL = "https://app.example.com"
    settings.BITRIX24_EVENTS = ["ONCRMCONTACTADD"]
    assert bindings.bind_events(portal=installed_portal) == ["ONAPPUNINSTALL", "ONCRMCONTACTADD"]
    assert {(e["event"], e["handler"]) for e in b24.events} == {
        ("ONAPPUNINSTALL", "https://app.example.com/events/"),
        ("ONCRMCONTACTADD", "https://app.example.com/events/"),
    }
    assert bindings.bind_events(portal=installed_portal) == []
    assert len(_calls(b24, "event.bind")) == 2
    # An update drops the portal's bindings; the update event schedules binding them again.
    published = []

    def record(sender=None, body=None, **kwargs):
        published.append((sender, list(body[0])))

    before_task_publish.connect(record, weak=False)
    try:
        response = backend.post("/events/", data=bx.onappupdate(b24, b24.issue_tokens(1, admin=True)))
    finally:
        before_task_publish.disconnect(record)
        celery_app.control.purge()
    assert response.status_code == 200
    # Recorded as wanted before it is queued: the sweep queues it again if the message is lost.
    action = WantedAction.objects.get(portal=installed_portal, kind=WantedKind.BIND_EVENTS, done_at=None)
    assert ("portals.tasks.carry_out_task", [action.pk]) in published
    assert b24.events == []
    assert carry_out_task.apply(args=(action.pk,)).get() == "done (bound 2, unbound 0, kept 0)"
    assert {e["event"] for e in b24.events} == {"ONAPPUNINSTALL", "ONCRMCONTACTADD"}
    action.refresh_from_db()
    assert action.done_at is not None


def test_no_binding_without_a_public_url(installed_portal, b24, settings):
    settings.BITRIX24_PUBLIC_URL = ""
    assert bindings.bind_events(portal=installed_portal) == []
    assert _calls(b24, "event.get") == []


@pytest.mark.parametrize(
    "location",
    ["http://169.254.169.254/rest/profile.json", "http://localhost:8000/rest/x.json", "http://2130706433/"],
)
def test_a_redirect_to_a_host_that_is_not_a_portal_is_refused_and_stores_nothing(
    installed_portal, redirector, location
):
    server, handler = redirector
    handler.location = location
    before = (installed_portal.domain, installed_portal.protocol)
    Portal.objects.filter(pk=installed_portal.pk).update(domain=f"127.0.0.1:{server.server_port}")
    installed_portal.refresh_from_db()
    with pytest.raises(client.RestError) as failure:
        PortalClient(installed_portal).call("crm.contact.add", {"fields": {"NAME": "x"}})
    assert failure.value.code == "bad_redirect"
    assert handler.hits == 1
    installed_portal.refresh_from_db()
    assert (installed_portal.domain, installed_portal.protocol) == (
        f"127.0.0.1:{server.server_port}",
        before[1],
    )


def _point_at_redirector(portal: Portal, server) -> None:
    Portal.objects.filter(pk=portal.pk).update(domain=f"127.0.0.1:{server.server_port}")
    portal.refresh_from_db()


def test_a_redirect_to_another_portal_gets_no_token_and_is_not_stored(
    installed_portal, b24, standin, redirector
):
    # The target passes the allowlist (it is a portal), but app.info says the token's portal is b24.
    other = standin.add_portal()
    server, handler = redirector
    handler.location = other.url + "/rest/crm.contact.add.json"
    _point_at_redirector(installed_portal, server)
    app_info_before = standin.stats["app_info"]
    with pytest.raises(client.RestError) as failure:
        PortalClient(installed_portal).call("crm.contact.add", {"fields": {"NAME": "x"}})
    assert failure.value.code == "bad_redirect"
    assert "app.info says the portal is" in str(failure.value)
    assert standin.stats["app_info"] == app_info_before + 1
    assert other.calls == [] and b24.calls == []
    installed_portal.refresh_from_db()
    assert installed_portal.domain == f"127.0.0.1:{server.server_port}"


def test_a_redirect_to_the_portal_a_token_belongs_to_is_refused_for_another_member_id(
    installed_portal, standin, redirector
):
    # A token of another portal, used for this one: app.info names the redirect's target as the
    # token's portal, but its member_id is not this portal's.
    other = standin.add_portal()
    server, handler = redirector
    handler.location = other.url + "/rest/profile.json"
    _point_at_redirector(installed_portal, server)
    token = other.issue_tokens(1, admin=True)["access_token"]
    with pytest.raises(client.RestError) as failure:
        PortalClient(installed_portal, access_token=token).call("profile")
    assert failure.value.code == "bad_redirect"
    assert "another portal" in str(failure.value)
    assert other.calls == []
    installed_portal.refresh_from_db()
    assert installed_portal.domain == f"127.0.0.1:{server.server_port}"


def test_a_rename_met_with_an_expired_token_renews_it_and_is_confirmed_with_the_new_one(
    installed_portal, b24, standin
):
    b24.rename()
    standin.advance(3601)  # app.info, asked about the rename, is the first to see the token expired
    refreshes = standin.stats["refresh_ok"]
    assert PortalClient(installed_portal).call("server.time")
    assert standin.stats["refresh_ok"] == refreshes + 1
    installed_portal.refresh_from_db()
    assert installed_portal.domain == b24.domain


def test_the_governor_spaces_calls_at_the_portals_rate_on_an_injected_clock(fake_clock):
    """The governor's arithmetic without waiting: after the burst, one call per interval, just under the rate."""
    from portals.governor import Limit, LocalGovernor

    limit = Limit(rate=2.0, burst=10)
    governor = LocalGovernor()
    waits = [governor.acquire("b24:bucket:clock", limit) for _ in range(40)]
    assert waits[:7] == [0.0] * 7  # the burst, less the governor's margin of 3
    assert all(wait > 0 for wait in waits[7:])
    elapsed = fake_clock.monotonic() - 1_000.0
    assert sum(fake_clock.slept) == pytest.approx(sum(waits))
    assert 1.95 <= (40 - 7) / elapsed <= 2.0  # 99 % of the portal's rate once the burst is spent
