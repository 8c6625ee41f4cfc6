"""Install event, install frame and launch, over real sockets against the Bitrix24 stand-in."""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import urlencode

import pytest
import requests
import time_machine
from django.http import HttpResponse
from django.utils import timezone

from install.models import InboundRequest, InboundStatus
from portals import phpform, registry
from portals.models import Portal, PortalState, TokenPair
from portals.tasks import payment_hint_task
from standin import payloads as bx
from tests.samples import docs_event

pytestmark = pytest.mark.django_db(transaction=True)


def test_install_event_from_the_docs_is_verified_and_stored(backend, b24, standin):
    tokens = b24.issue_tokens(1, admin=True)
    before = standin.stats["app_info"]

    response = backend.install_event(b24, tokens)

    assert response.status_code == 200, response.text
    assert response.json()["member_id"] == b24.member_id
    assert standin.stats["app_info"] == before + 1  # verified through app.info first
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.domain == b24.domain
    assert portal.state == PortalState.INSTALLED
    assert portal.application_token == b24.application_token
    assert portal.oauth_server == standin.oauth_url
    assert portal.app_status == "F"
    pair = TokenPair.objects.get(portal=portal)
    assert (pair.user_id, pair.is_background) == (1, True)
    assert pair.access_token == tokens["access_token"]
    assert pair.refresh_token == tokens["refresh_token"]
    row = InboundRequest.objects.get(member_id=b24.member_id)
    assert (row.event, row.status, row.http_status) == ("ONAPPINSTALL", InboundStatus.ACCEPTED, 200)


@pytest.mark.parametrize("sample", ["onappinstall-docs.json", "onappinstall-docs-2025-phparray.txt"])
def test_install_event_exactly_as_the_docs_print_it(backend, b24, sample):
    """The docs' event, field for field (only the portal and its tokens are the stand-in's)."""
    tokens = b24.issue_tokens(1, admin=True)
    event = docs_event(sample, b24, tokens)
    response = backend.post("/events/", data=phpform.encode(event))
    assert response.status_code == 200, response.text
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.application_token == b24.application_token
    assert portal.app_version == event["data"]["VERSION"]
    pair = TokenPair.objects.get(portal=portal)
    assert (pair.user_id, pair.is_background) == (1, True)
    assert (pair.access_token, pair.refresh_token) == (tokens["access_token"], tokens["refresh_token"])


def test_update_payment_and_uninstall_exactly_as_the_docs_print_them(backend, b24, standin, wanted_worker):
    backend.install_event(b24)
    b24.update_app()  # the portal's side of an update: a new application token
    tokens = b24.issue_tokens(1, admin=True)
    update = docs_event("onappupdate-docs.json", b24, tokens)
    assert backend.post("/events/", data=phpform.encode(update)).status_code == 200
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.application_token == b24.application_token
    assert portal.app_version == update["data"]["VERSION"]
    assert TokenPair.objects.get(portal=portal, is_background=True).refresh_token == tokens["refresh_token"]
    # A worker renews the handed-over background pair once, so that its refresh token is ours alone.
    assert wanted_worker() == ["done"]
    assert TokenPair.objects.get(portal=portal, is_background=True).refresh_ours

    before = _licence_reads(b24)
    payment = docs_event("onapppayment-docs.json", b24)
    assert backend.post("/events/", data=phpform.encode(payment)).status_code == 200
    assert _licence_reads(b24) == before  # checked by a worker, not by the request
    assert payment_hint_task.apply(args=(b24.member_id,)).get() == "status check queued"
    assert wanted_worker() == ["done"]
    assert _licence_reads(b24) == before + 1  # the portal's own app.info, with the stored token

    b24.uninstall()
    uninstall = docs_event("onappuninstall-docs.json", b24)  # CLEAN: 1
    answer = backend.post("/events/", data=phpform.encode(uninstall))
    assert answer.status_code == 200 and answer.json()["result"] == "pending"
    assert wanted_worker() == ["done (confirmed by Bitrix24)"]
    portal.refresh_from_db()
    assert portal.state == PortalState.UNINSTALLED
    assert not TokenPair.objects.filter(portal=portal).exists()
    assert portal.purge_at is not None  # CLEAN: 1, so the data goes after BITRIX24_PURGE_DELAY_DAYS


def test_install_event_is_idempotent_on_member_id(backend, b24):
    assert backend.install_event(b24).status_code == 200
    second = b24.issue_tokens(1, admin=True)
    assert backend.install_event(b24, second).status_code == 200
    assert Portal.objects.filter(member_id=b24.member_id).count() == 1
    pair = TokenPair.objects.get(portal__member_id=b24.member_id)
    assert pair.refresh_token == second["refresh_token"]


def test_install_frame_stores_and_renders_install_finish(backend, b24, standin):
    before = standin.stats["app_info"]
    response = backend.install_frame(b24, b24.issue_tokens(1, admin=True))
    assert response.status_code == 200, response.text
    assert standin.stats["app_info"] == before + 1
    assert "BX24.installFinish()" in response.text
    assert "//api.bitrix24.com/api/v1/" in response.text
    assert TokenPair.objects.get(portal__member_id=b24.member_id).is_background


def test_launch_hands_the_placement_view_the_portal_user_and_options(backend, b24):
    backend.install_event(b24)
    employee = b24.issue_tokens(7, admin=False)
    options = {"ID": "8061", "URI": "/crm/deal/details/8061/"}
    seen = []

    def tab(request, context):
        seen.append(context)
        return HttpResponse(
            f"{context.portal.domain} {context.placement} {context.user_id} {dict(context.options)}"
        )

    with registry.replaced(lambda: registry.placement("CRM_DEAL_DETAIL_TAB", title="Tab")(tab)):
        response = backend.launch(b24, employee, placement="CRM_DEAL_DETAIL_TAB", options=options)

    assert response.status_code == 200, response.text
    assert response.text == f"{b24.domain} CRM_DEAL_DETAIL_TAB 7 {options}"
    assert seen[0].access_token == employee["access_token"] and seen[0].lang == "en"
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.last_launch_at is not None
    assert TokenPair.objects.get(portal=portal, user_id=7).access_token == employee["access_token"]


def test_launch_by_an_employee_never_takes_the_background_pair(backend, b24):
    installer = b24.issue_tokens(1, admin=True)
    backend.install_event(b24, installer)
    backend.launch(b24, b24.issue_tokens(7, admin=False))
    # Even a forged install frame with the employee's genuine token cannot take it.
    backend.install_frame(b24, b24.issue_tokens(7, admin=False))
    background = TokenPair.objects.get(portal__member_id=b24.member_id, is_background=True)
    assert background.user_id == 1
    assert background.refresh_token == installer["refresh_token"]


def test_launch_by_an_admin_of_a_portal_without_background_pair_takes_it(backend, b24):
    response = backend.launch(b24, b24.issue_tokens(3, admin=True))
    assert response.status_code == 200, response.text
    assert TokenPair.objects.get(portal__member_id=b24.member_id).is_background


def test_launch_reads_everything_from_the_body_as_older_portals_send_it(backend, b24):
    query, body = bx.launch(b24, b24.issue_tokens(1))
    response = backend.post("/app/", data={**query, **body})
    assert response.status_code == 200, response.text


def test_renamed_portal_updates_the_domain(backend, b24):
    backend.install_event(b24)
    old = b24.domain
    b24.rename()
    response = backend.launch(b24, b24.issue_tokens(1))
    assert response.status_code == 200, response.text
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.domain == b24.domain != old


# --- forged requests ----------------------------------------------------------------------------


def _nothing_stored(member_id: str) -> bool:
    return not Portal.objects.filter(member_id=member_id).exists() and not TokenPair.objects.exists()


def test_install_event_with_tokens_bitrix24_never_issued_is_refused(backend, b24):
    forged = {"access_token": "f" * 32, "refresh_token": "e" * 32}
    response = backend.install_event(b24, forged)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert _nothing_stored(b24.member_id)
    row = InboundRequest.objects.get()
    assert row.status == InboundStatus.REJECTED and "did not accept" in row.error


def test_token_of_another_portal_with_this_member_id_is_refused(backend, b24, standin):
    other = standin.add_portal()
    their_tokens = other.issue_tokens(1, admin=True)
    query, body = bx.launch(b24, their_tokens)  # this portal's member_id and domain, their token
    for path in ("/app/", "/install/"):
        response = backend.post(path, params=query, data=body)
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "wrong_portal"
    pairs = bx.onappinstall(b24, their_tokens)
    assert backend.post("/events/", data=pairs).status_code == 403
    assert _nothing_stored(b24.member_id)


@pytest.mark.parametrize(
    "domain", ["169.254.169.254", "localhost", "evil.example.com", "10.0.0.1:80", "x.bitrix24.com.evil.io"]
)
def test_domain_that_is_not_a_portal_is_refused_before_any_outbound_call(backend, b24, standin, domain):
    before = standin.stats["app_info"]
    query, body = bx.launch(b24, b24.issue_tokens(1))
    query["DOMAIN"] = domain
    response = backend.post("/app/", params=query, data=body)
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "domain_not_allowed"
    pairs = [(k, domain if k == "auth[domain]" else v) for k, v in bx.onappinstall(b24, b24.issue_tokens(1))]
    assert backend.post("/events/", data=pairs).status_code == 403
    assert standin.stats["app_info"] == before  # nothing was sent anywhere
    assert _nothing_stored(b24.member_id)


def test_server_endpoint_outside_the_allowlist_is_never_called(backend, b24, standin):
    """A payload naming another OAuth server is verified on the configured one instead."""
    before = standin.stats["app_info"]
    pairs = [
        (k, "http://169.254.169.254/rest/" if k == "auth[server_endpoint]" else v)
        for k, v in bx.onappinstall(b24, b24.issue_tokens(1))
    ]
    assert backend.post("/events/", data=pairs).status_code == 200
    assert standin.stats["app_info"] == before + 1


def test_an_install_event_while_the_oauth_server_is_down_is_kept_and_applied_later(backend, b24, standin):
    """Bitrix24 delivers ONAPPINSTALL once: answered 503, its new tokens were lost. It is kept (encrypted),
    answered 200 "deferred", and a worker verifies and applies it once the OAuth server answers."""
    from django.db import connection

    from install.models import DeferredEvent
    from install.tasks import apply_deferred_task

    tokens = b24.issue_tokens(1, admin=True)
    standin.oauth_mode = "500"
    response = backend.install_event(b24, tokens)
    assert response.status_code == 200 and response.json()["result"] == "deferred"
    assert _nothing_stored(b24.member_id)
    kept = DeferredEvent.objects.get()
    with connection.cursor() as cursor:
        cursor.execute("SELECT payload FROM install_deferredevent")
        (raw,) = cursor.fetchone()
    assert tokens["access_token"] not in raw and tokens["refresh_token"] not in raw  # encrypted at rest
    assert len(kept.payload.encode()) <= 1024

    assert apply_deferred_task.apply().get() == 0  # still down: tried again later
    assert DeferredEvent.objects.get().done_at is None
    standin.oauth_mode = "ok"
    DeferredEvent.objects.update(next_attempt_at=timezone.now())
    assert apply_deferred_task.apply().get() == 1

    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.state == PortalState.INSTALLED and portal.application_token == b24.application_token
    assert TokenPair.objects.get(portal=portal, is_background=True).refresh_token == tokens["refresh_token"]
    done = DeferredEvent.objects.get()
    assert (done.outcome, done.payload) == ("applied", "")  # the tokens are not kept past it


def test_the_install_frame_while_the_oauth_server_is_down_answers_503_and_stores_nothing(
    backend, b24, standin
):
    standin.oauth_mode = "500"
    response = backend.install_frame(b24, b24.issue_tokens(1, admin=True))
    assert response.status_code == 503  # a person is there to try again
    assert _nothing_stored(b24.member_id)


def test_deferred_install_and_update_are_applied_in_bitrix24s_order(
    backend, b24, standin, settings, fresh_minute
):
    """Over the source's budget of refused verifications, lifecycle events are kept, not refused; a worker
    applies one portal's in `ts` order, whatever order they came in."""
    from install.models import DeferredEvent
    from install.tasks import apply_deferred_task

    settings.BITRIX24_UNVERIFIED_BUDGET = 1
    assert backend.launch(b24, {"access_token": "f" * 32, "refresh_token": "e" * 32}).status_code == 401
    install = dict(bx.onappinstall(b24, b24.issue_tokens(1, admin=True)))
    install["ts"] = "1000"
    b24.update_app()  # a new application token
    update = dict(bx.onappupdate(b24, b24.issue_tokens(1, admin=True)))
    update["ts"] = "2000"
    assert backend.post("/events/", data=list(update.items())).json()["result"] == "deferred"
    assert backend.post("/events/", data=list(install.items())).json()["result"] == "deferred"

    assert apply_deferred_task.apply().get() == 2
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.application_token == b24.application_token  # the update's, applied last
    assert list(DeferredEvent.objects.order_by("done_at").values_list("event", flat=True)) == [
        "ONAPPINSTALL",
        "ONAPPUPDATE",
    ]


def test_deferred_events_are_bounded_per_portal(backend, b24, settings, fresh_minute):
    settings.BITRIX24_UNVERIFIED_BUDGET = 0  # every verification is over budget: every install is kept
    answers = [backend.install_event(b24).status_code for _ in range(7)]
    assert answers == [200] * 5 + [429] * 2


# --- uninstall -----------------------------------------------------------------------------------


def test_uninstall_with_a_wrong_application_token_changes_nothing(backend, b24):
    backend.install_event(b24)
    pairs = [(k, "0" * 32 if k == "auth[application_token]" else v) for k, v in bx.onappuninstall(b24)]
    response = backend.post("/events/", data=pairs)
    assert response.status_code == 401
    assert response.json()["error"] == "bad_application_token"
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.state == PortalState.INSTALLED
    assert TokenPair.objects.filter(portal=portal).count() == 1


def test_uninstall_of_an_unknown_portal_is_refused(backend, b24):
    response = backend.post("/events/", data=bx.onappuninstall(b24))
    assert response.status_code == 401
    assert not Portal.objects.exists()


def test_uninstall_deletes_tokens_and_they_are_never_used_again(backend, b24, standin, wanted_worker):
    backend.install_event(b24)
    assert wanted_worker() == ["done"]  # the install's pair renewed once: its refresh token is ours
    b24.uninstall()
    response = backend.post("/events/", data=bx.onappuninstall(b24, clean=False))
    assert response.status_code == 200, response.text
    assert wanted_worker() == ["done (confirmed by Bitrix24)"]
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.state == PortalState.UNINSTALLED and portal.uninstalled_at is not None
    assert portal.application_token == ""
    assert not TokenPair.objects.filter(portal=portal).exists()
    # The inbound log is kept without CLEAN.
    assert InboundRequest.objects.filter(member_id=b24.member_id).count() == 2
    # A replayed uninstall no longer matches any application token.
    assert backend.post("/events/", data=bx.onappuninstall(b24)).status_code == 401
    refreshes = standin.stats["refresh_ok"] + standin.stats["refresh_invalid_grant"]
    from django.core.management import call_command

    call_command("renew_tokens", "--force")
    assert standin.stats["refresh_ok"] + standin.stats["refresh_invalid_grant"] == refreshes


def test_uninstall_with_clean_purges_the_portals_data_after_the_delay(backend, b24, wanted_worker, settings):
    """The tokens go at once; the data BITRIX24_PURGE_DELAY_DAYS later (a customer who uninstalled by
    mistake and reinstalls meanwhile finds it all)."""
    from django.core.management import call_command

    from portals import services

    backend.install_event(b24)
    assert wanted_worker() == ["done"]  # the install's pair renewed once: its refresh token is ours
    backend.launch(b24, b24.issue_tokens(5, admin=False))
    b24.uninstall()
    response = backend.post("/events/", data=bx.onappuninstall(b24, clean=True))
    assert response.status_code == 200, response.text
    assert wanted_worker() == ["done (confirmed by Bitrix24)"]
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.state == PortalState.UNINSTALLED
    assert not TokenPair.objects.filter(portal=portal).exists()
    assert InboundRequest.objects.filter(member_id=b24.member_id).count() == 3  # kept for now
    assert portal.purge_at is not None
    days = (portal.purge_at - portal.uninstalled_at).total_seconds() / 86400
    assert round(days, 3) == settings.BITRIX24_PURGE_DELAY_DAYS == 7

    assert services.purge_due_portals() == 0  # not yet
    with time_machine.travel(portal.purge_at + timedelta(seconds=1)):
        call_command("shell", "-c", "from portals.tasks import sweep_due_pairs; sweep_due_pairs()")
    # Only the uninstall request itself is kept, as the record of the purge.
    assert list(InboundRequest.objects.filter(member_id=b24.member_id).values_list("event", flat=True)) == [
        "ONAPPUNINSTALL"
    ]
    assert Portal.objects.get(pk=portal.pk).purge_at is None


def test_a_reinstall_within_the_delay_cancels_the_purge(backend, b24, wanted_worker):
    from portals import services

    backend.install_event(b24)
    assert wanted_worker() == ["done"]
    b24.uninstall()
    assert backend.post("/events/", data=bx.onappuninstall(b24, clean=True)).status_code == 200
    assert wanted_worker() == ["done (confirmed by Bitrix24)"]
    b24.install()  # the customer installs the app again, within the week
    assert backend.install_event(b24).status_code == 200
    portal = Portal.objects.get(member_id=b24.member_id)
    assert (portal.state, portal.purge_at) == (PortalState.INSTALLED, None)
    with time_machine.travel(timezone.now() + timedelta(days=8)):
        assert services.purge_due_portals() == 0
    assert InboundRequest.objects.filter(member_id=b24.member_id).count() == 3


def test_reinstall_after_uninstall_brings_the_portal_back(backend, b24):
    backend.install_event(b24)
    backend.post("/events/", data=bx.onappuninstall(b24))
    b24.rotate_application_token()
    assert backend.install_event(b24).status_code == 200
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.state == PortalState.INSTALLED and portal.uninstalled_at is None
    assert portal.application_token == b24.application_token


# --- update, payment, other events --------------------------------------------------------------


def test_update_event_replaces_the_application_token_and_pair(backend, b24):
    backend.install_event(b24)
    tokens = b24.issue_tokens(1, admin=True)
    response = backend.post("/events/", data=bx.onappupdate(b24, tokens))
    assert response.status_code == 200, response.text
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.application_token == b24.application_token
    assert portal.app_version == str(b24.app_version)
    assert TokenPair.objects.get(portal=portal, is_background=True).refresh_token == tokens["refresh_token"]


def test_payment_event_takes_the_status_from_app_info_not_from_the_body(backend, b24, standin, wanted_worker):
    backend.install_event(b24)
    assert wanted_worker() == ["done"]  # the install's pair renewed once
    b24.status = "P"
    pairs = [(k, "T" if k == "data[STATUS]" else v) for k, v in bx.onapppayment(b24)]
    before = _licence_reads(b24)
    response = backend.post("/events/", data=pairs)
    assert response.status_code == 200, response.text
    assert payment_hint_task.apply(args=(b24.member_id,)).get() == "status check queued"
    assert wanted_worker() == ["done"]
    assert _licence_reads(b24) == before + 1
    assert Portal.objects.get(member_id=b24.member_id).app_status == "P"


def _licence_reads(portal) -> int:
    """Calls of the portal's own app.info (the licence), as the stand-in portal counted them."""
    return sum(1 for _, method, _ in portal.calls if method == "app.info")


def test_payment_answers_and_statements_are_the_same_for_known_and_unknown_portals(
    client, b24, standin, installed_portal
):
    """Nothing in the answer or the work done tells whether a member_id is installed here: the same bytes,
    the same number of statements (the portal is looked up by a worker, later)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    stranger = standin.add_portal()
    seen = []
    for fake in (stranger, b24):
        body = bx.onapppayment(fake)  # the form's pairs, as Bitrix24 posts them
        with CaptureQueriesContext(connection) as statements:
            response = client.post(
                "/events/", urlencode(body), content_type="application/x-www-form-urlencoded"
            )
        seen.append((response.status_code, response.content, len(statements)))
    assert seen[0] == seen[1], seen
    assert payment_hint_task.apply(args=(stranger.member_id,)).get() == "not a portal of ours"
    assert payment_hint_task.apply(args=(b24.member_id,)).get() == "status check queued"


def test_payment_event_for_an_unknown_portal_looks_like_any_other(backend, b24, standin, installed_portal):
    """An anonymous caller learns nothing of which member_ids are installed: the same answer, and no
    call to Bitrix24 for either."""
    before = standin.stats["app_info"]
    stranger = standin.add_portal()
    unknown = backend.post("/events/", data=bx.onapppayment(stranger))
    known = backend.post("/events/", data=bx.onapppayment(b24))
    assert (unknown.status_code, known.status_code) == (200, 200)
    assert unknown.json().keys() == known.json().keys() and unknown.json()["result"] == known.json()["result"]
    assert standin.stats["app_info"] == before


def test_other_events_are_logged_and_acknowledged_when_their_application_token_matches(backend, b24):
    backend.install_event(b24)
    # The docs' ONCRMCONTACTADD, field for field, for this portal (its auth carries a user's tokens).
    event = phpform.encode(docs_event("oncrmcontactadd-docs.json", b24, b24.issue_tokens(1, admin=True)))
    assert ("data[FIELDS][ID]", "89") in event and ("event_handler_id", "11") in event
    response = backend.post("/events/", data=event)
    assert response.status_code == 200, response.text
    row = InboundRequest.objects.get(event="ONCRMCONTACTADD")
    assert row.status == InboundStatus.ACCEPTED and row.valid
    assert response.json()["result"] == "ignored"  # no handler: a summary is kept, not the body
    assert row.body["_keys"] == len({k.split("[")[0] for k, _ in event}) and "data" in row.body["_names"]
    forged = [(k, "1" * 32 if k == "auth[application_token]" else v) for k, v in event]
    assert backend.post("/events/", data=forged).status_code == 401


# --- framing, CSRF -------------------------------------------------------------------------------


def test_launch_page_can_be_framed_by_its_portal_only(backend, b24):
    response = backend.launch(b24, b24.issue_tokens(1))
    assert response.status_code == 200
    assert "X-Frame-Options" not in response.headers
    assert response.headers["Content-Security-Policy"] == f"frame-ancestors http://{b24.domain}"


def test_error_page_for_a_foreign_domain_cannot_be_framed(backend, b24):
    query, body = bx.launch(b24, b24.issue_tokens(1))
    query["DOMAIN"] = "evil.example.com"
    response = backend.post("/app/", params=query, data=body, headers={"Accept": "text/html"})
    assert response.status_code == 403
    assert "could not open" in response.text
    assert response.headers["Content-Security-Policy"] == "frame-ancestors 'none'"


def test_other_pages_keep_x_frame_options(backend):
    response = requests.get(backend.url + "/admin/login/", timeout=10)
    assert response.headers["X-Frame-Options"] == "DENY"


def test_inbound_log_never_holds_a_token_in_clear(backend, b24):
    tokens = b24.issue_tokens(1, admin=True)
    backend.install_event(b24, tokens)
    backend.launch(b24, tokens)
    dumped = json.dumps(list(InboundRequest.objects.values("query", "body", "headers", "error")))
    for secret in (tokens["access_token"], tokens["refresh_token"], b24.application_token):
        assert secret not in dumped
    assert "<redacted fp:" in dumped


def test_missing_app_credentials_are_a_clear_503(backend, b24, settings):
    settings.BITRIX24_CLIENT_SECRET = ""
    response = backend.install_event(b24)
    assert response.status_code == 503
    assert response.json()["error"] == "not_configured"
    # Whoever posted learns only that; which setting is wrong is on the log row, for staff.
    assert "BITRIX24_CLIENT_SECRET" not in response.json()["error_description"]
    assert "BITRIX24_CLIENT_SECRET" in InboundRequest.objects.get().error
    assert not Portal.objects.exists()


def test_an_employee_cannot_plant_an_application_token_through_a_launch(backend, b24):
    """A portal installed through a frame that carried no APPLICATION_TOKEN (older portals)."""
    query, body = bx.launch(b24, b24.issue_tokens(1, admin=True))
    body.pop("APPLICATION_TOKEN")
    assert backend.post("/install/", params=query, data=body).status_code == 200
    query, body = bx.launch(b24, b24.issue_tokens(7, admin=False))
    body["APPLICATION_TOKEN"] = "e" * 32
    assert backend.post("/app/", params=query, data=body).status_code == 200
    assert Portal.objects.get(member_id=b24.member_id).application_token == ""
    forged = [
        (k, "e" * 32 if k == "auth[application_token]" else v) for k, v in bx.onappuninstall(b24, clean=True)
    ]
    assert backend.post("/events/", data=forged).status_code == 401
    assert Portal.objects.get(member_id=b24.member_id).state == PortalState.INSTALLED


def test_an_employee_cannot_take_over_a_portal_whose_background_pair_died(backend, b24):
    installer = b24.issue_tokens(1, admin=True)
    backend.install_event(b24, installer)
    TokenPair.objects.filter(portal__member_id=b24.member_id).update(state="dead")
    query, body = bx.launch(b24, b24.issue_tokens(7, admin=False))
    body["APPLICATION_TOKEN"] = "e" * 32
    assert backend.post("/install/", params=query, data=body).status_code == 200
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.application_token == b24.application_token
    assert not TokenPair.objects.get(portal=portal, user_id=7).is_background
    # The installer coming back (a reinstall by an admin) takes the background pair again.
    backend.install_event(b24, b24.issue_tokens(1, admin=True))
    assert TokenPair.objects.get(portal=portal, is_background=True).user_id == 1


def test_a_deferred_event_over_a_kilobyte_is_refused_with_413_not_a_500(backend, b24, settings, fresh_minute):
    settings.BITRIX24_UNVERIFIED_BUDGET = 0  # every install is kept for later
    tokens = {**b24.issue_tokens(1), "access_token": "a" * 500, "refresh_token": "r" * 500}
    answer = backend.install_event(b24, tokens)
    assert answer.status_code == 413 and answer.json()["error"] == "too_large"
