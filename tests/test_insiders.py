"""Insiders and floods: what an employee (who can read the launch's application token and their own
AUTH_ID) or an anonymous caller (who knows a member_id) can do, and what it costs us.

Every test here failed before uninstalls were confirmed with Bitrix24, verification had one path and
one cache, and unverified requests got budgets.
"""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone
from time_machine import travel

from portals import operations
from portals.models import PairState, Portal, PortalState, TokenPair, WantedAction, WantedKind
from standin import payloads as bx
from tests.factories import PortalFactory

pytestmark = pytest.mark.django_db(transaction=True)


def _launch_application_token(backend, b24) -> str:
    """What any employee who opens the app can read: the launch's APPLICATION_TOKEN."""
    query, body = bx.launch(b24, b24.issue_tokens(7, admin=False))
    assert backend.post("/app/", params=query, data=body).status_code == 200
    return body.get("APPLICATION_TOKEN") or b24.application_token


def _forged_uninstall(b24, application_token: str, clean: bool = True) -> list[tuple[str, str]]:
    pairs = dict(bx.onappuninstall(b24, clean=clean))
    pairs["auth[application_token]"] = application_token
    return list(pairs.items())


# --- uninstall is confirmed with Bitrix24 ------------------------------------------------------------


def test_an_employees_uninstall_is_refused_while_bitrix24_says_installed(
    backend, b24, installed_portal, wanted_worker, caplog
):
    token = _launch_application_token(backend, b24)
    response = backend.post("/events/", data=_forged_uninstall(b24, token))
    assert response.status_code == 200 and response.json()["result"] == "pending"

    # Checked at once, then re-checked twice a few minutes apart (an event may outrun the removal).
    assert wanted_worker() == ["failed: Bitrix24 says installed"]
    with travel(timezone.now() + timezone.timedelta(minutes=2)):
        assert wanted_worker() == ["failed: Bitrix24 says installed"]
    with travel(timezone.now() + timezone.timedelta(minutes=6)):
        assert wanted_worker() == ["refused: still installed"]

    portal = Portal.objects.get(pk=installed_portal.pk)
    assert portal.state == PortalState.INSTALLED
    assert TokenPair.objects.filter(portal=portal, state=PairState.ACTIVE).exists()
    assert "Suspicious ONAPPUNINSTALL" in caplog.text
    assert backend.post("/events/", data=bx.onapppayment(b24)).status_code == 200  # events still admitted


def test_a_genuine_uninstall_is_confirmed_also_with_an_expired_access_token(
    backend, b24, standin, wanted_worker
):
    portal = PortalFactory.for_standin(b24, pair__expired_access=True)
    b24.uninstall()  # Bitrix24's side: the app is gone, every token of the portal with it
    assert backend.post("/events/", data=bx.onappuninstall(b24, clean=True)).status_code == 200

    assert wanted_worker() == ["done (confirmed by Bitrix24)"]

    portal.refresh_from_db()
    assert portal.state == PortalState.UNINSTALLED
    assert not TokenPair.objects.filter(portal=portal).exists()


def test_an_uninstall_while_the_oauth_server_is_down_stays_pending_then_is_confirmed(
    backend, b24, installed_portal, standin, wanted_worker
):
    b24.uninstall()
    assert backend.post("/events/", data=bx.onappuninstall(b24)).status_code == 200
    standin.oauth_mode = "500"
    (outcome,) = wanted_worker()
    assert outcome.startswith(
        "failed: Bitrix24 could not confirm the uninstall now: app.info could not be asked"
    )
    portal = Portal.objects.get(pk=installed_portal.pk)
    assert portal.state == PortalState.INSTALLED  # nothing deleted on a guess
    assert WantedAction.objects.get(kind=WantedKind.CONFIRM_UNINSTALL).done_at is None

    standin.oauth_mode = "ok"
    with travel(timezone.now() + timezone.timedelta(minutes=2)):
        assert wanted_worker() == ["done (confirmed by Bitrix24)"]
    portal.refresh_from_db()
    assert portal.state == PortalState.UNINSTALLED


def test_without_a_live_pair_only_staff_confirm_an_uninstall(backend, b24, wanted_worker):
    portal = PortalFactory.for_standin(b24, pair__state=PairState.DEAD)
    assert backend.post("/events/", data=bx.onappuninstall(b24)).status_code == 200
    assert wanted_worker() == ["held for staff"]
    assert Portal.objects.get(pk=portal.pk).state == PortalState.INSTALLED
    claim = WantedAction.objects.get(kind=WantedKind.CONFIRM_UNINSTALL)
    assert claim.held_at is not None and "no working background pair" in claim.last_error

    operations.confirm_uninstall(portal=portal, clean=False)

    assert Portal.objects.get(pk=portal.pk).state == PortalState.UNINSTALLED
    assert not WantedAction.objects.filter(done_at=None).exists()


# --- no destruction without proof ----------------------------------------------------------------------


def _refreshes(standin) -> int:
    return standin.stats["refresh_ok"] + standin.stats["refresh_invalid_grant"]


def test_an_employees_junk_pair_cannot_prove_an_uninstall_when_the_background_pair_is_dead(
    backend, b24, standin, wanted_worker
):
    """The red-team's finding: the installing admin left (background pair dead); an employee's first launch
    stores a junk REFRESH_ID that expires at once, then they forge ONAPPUNINSTALL with CLEAN=1 and the
    launch's application token. Their pair is never asked, nothing is deleted: the claim waits for staff."""
    portal = PortalFactory.for_standin(b24, pair__state=PairState.DEAD)
    tokens = {**b24.issue_tokens(7, admin=False), "refresh_token": "0" * 32, "expires_in": 1}
    query, body = bx.launch(b24, tokens)
    assert backend.post("/app/", params=query, data=body).status_code == 200
    before = _refreshes(standin)

    assert backend.post("/events/", data=_forged_uninstall(b24, b24.application_token)).status_code == 200
    assert wanted_worker() == ["held for staff"]

    assert _refreshes(standin) == before  # the employee's pair was not refreshed to "prove" anything
    portal.refresh_from_db()
    assert portal.state == PortalState.INSTALLED and portal.uninstall_claimed_at is not None
    assert TokenPair.objects.filter(portal=portal, user_id=7, state=PairState.ACTIVE).exists()
    assert portal.purge_at is None


def test_a_refused_access_token_a_frame_handed_over_proves_nothing(
    backend, b24, standin, installed_portal, wanted_worker
):
    """The admin's launch stored their frame's access token on the background pair; the frame then refreshed
    it away, so app.info refuses it (invalid_token). That is no proof: the claim refreshes the pair, which is
    ours, once, and Bitrix24 says the app is installed."""
    admin = b24.issue_tokens(1, admin=True)
    assert backend.launch(b24, admin).status_code == 200
    pair = TokenPair.objects.get(portal=installed_portal, is_background=True)
    assert (pair.access_token, pair.access_ours, pair.refresh_ours) == (admin["access_token"], False, True)
    b24.forget_access_token(admin["access_token"])
    before = _refreshes(standin)

    assert backend.post("/events/", data=_forged_uninstall(b24, b24.application_token)).status_code == 200
    assert wanted_worker() == ["failed: Bitrix24 says installed"]

    assert _refreshes(standin) == before + 1  # one refresh for the claim
    assert Portal.objects.get(pk=installed_portal.pk).state == PortalState.INSTALLED
    assert TokenPair.objects.get(pk=pair.pk).access_ours  # the renewal's token now


def test_a_refused_refresh_token_nobody_renewed_proves_nothing(backend, b24, standin, wanted_worker):
    """A background pair whose refresh token was handed over and never renewed by us (an install whose
    proving renewal has not run yet) is refused: the claim is held, and it refreshes once at most however
    often the event comes again."""
    portal = PortalFactory.for_standin(b24, pair__handed=True, pair__expired_access=True)
    pair = TokenPair.objects.get(portal=portal)
    standin._kill_portal_tokens(b24.member_id)  # nothing the backend did: someone else killed them
    before = _refreshes(standin)

    assert backend.post("/events/", data=_forged_uninstall(b24, b24.application_token)).status_code == 200
    assert wanted_worker() == ["held for staff"]
    claim = WantedAction.objects.get(kind=WantedKind.CONFIRM_UNINSTALL)
    assert "handed over, never renewed by us" in claim.last_error
    for _ in range(3):  # the same claim again: held, no more calls
        assert backend.post("/events/", data=_forged_uninstall(b24, b24.application_token)).status_code == 200
    from portals.tasks import queue_open_actions

    assert queue_open_actions() == 0  # the sweep leaves a held claim to staff
    assert wanted_worker() == ["held for staff"]  # and run by hand anyway, it asks nothing more
    assert _refreshes(standin) == before + 1
    # Not uninstalled, nothing deleted: the portal shows what the sweep would have found, a refused pair.
    assert Portal.objects.get(pk=portal.pk).state == PortalState.NEEDS_REINSTALL
    assert TokenPair.objects.filter(pk=pair.pk).exists()
    assert WantedAction.objects.filter(kind=WantedKind.CONFIRM_UNINSTALL).count() == 1  # one claim per portal


def test_a_held_claim_is_dismissed_by_a_verified_launch(backend, b24, wanted_worker):
    portal = PortalFactory.for_standin(b24, pair__state=PairState.DEAD)
    assert backend.post("/events/", data=bx.onappuninstall(b24, clean=True)).status_code == 200
    assert wanted_worker() == ["held for staff"]

    assert backend.launch(b24, b24.issue_tokens(7, admin=False)).status_code == 200  # the app is in use

    claim = WantedAction.objects.get(kind=WantedKind.CONFIRM_UNINSTALL)
    assert claim.done_at is not None and claim.note == "dismissed: a verified launch of the portal"
    portal.refresh_from_db()
    assert portal.uninstall_claimed_at is None and portal.state == PortalState.INSTALLED


def test_staff_dismiss_a_held_claim(backend, b24, wanted_worker):
    portal = PortalFactory.for_standin(b24, pair__state=PairState.DEAD)
    assert backend.post("/events/", data=bx.onappuninstall(b24)).status_code == 200
    assert wanted_worker() == ["held for staff"]
    operations.dismiss_uninstall(portal=portal)
    assert WantedAction.objects.get(kind=WantedKind.CONFIRM_UNINSTALL).note == "dismissed: by staff"
    assert Portal.objects.get(pk=portal.pk).state == PortalState.INSTALLED
    with pytest.raises(operations.OperationRefused, match="no uninstall claim is open"):
        operations.dismiss_uninstall(portal=portal)


def test_a_genuine_uninstall_of_a_pair_we_renewed_is_proven_at_once(backend, b24, standin, wanted_worker):
    """Bitrix24 refusing the refresh token of our own renewal, with no renewal of it unresolved, is proof."""
    portal = PortalFactory.for_standin(
        b24, pair__expired_access=True
    )  # renewed by us (the factory's default)
    b24.uninstall()
    assert backend.post("/events/", data=bx.onappuninstall(b24, clean=True)).status_code == 200
    assert wanted_worker() == ["done (confirmed by Bitrix24)"]
    portal.refresh_from_db()
    assert portal.state == PortalState.UNINSTALLED and portal.purge_at is not None


@pytest.mark.system
def test_a_launch_racing_an_uninstall_leaves_no_token(backend, b24, installed_portal, standin, wanted_worker):
    """The launch's app.info answer ("installed") is on its way when the uninstall lands and is
    confirmed: the launch must not store tokens or bring the portal back."""
    standin.oauth_mode = "late"  # app.info acts at once; its answer takes 1.5 s to come back
    standin.slow_seconds = 1.5
    employee = b24.issue_tokens(9, admin=False)
    answers: list[int] = []

    def launch() -> None:
        try:
            answers.append(backend.launch(b24, employee).status_code)
        finally:
            connection.close()

    thread = threading.Thread(target=launch)
    thread.start()
    time.sleep(0.5)  # the launch's app.info has been answered "installed" and is on its way
    standin.oauth_mode = "ok"
    b24.uninstall()
    assert backend.post("/events/", data=bx.onappuninstall(b24)).status_code == 200
    assert wanted_worker() == ["done (confirmed by Bitrix24)"]
    thread.join(30)

    assert answers == [409]
    portal = Portal.objects.get(pk=installed_portal.pk)
    assert portal.state == PortalState.UNINSTALLED
    assert not TokenPair.objects.filter(portal=portal).exists()


# --- unverified requests cost little -----------------------------------------------------------------


def test_thirty_anonymous_payment_events_cost_no_refresh_and_at_most_one_app_info(
    backend, b24, standin, wanted_worker
):
    PortalFactory.for_standin(b24, pair__expired_access=True)  # an anonymous event must not renew it
    before = (standin.stats["app_info"], standin.stats["refresh_ok"] + standin.stats["refresh_invalid_grant"])

    answers = {backend.post("/events/", data=bx.onapppayment(b24)).status_code for _ in range(30)}
    from portals.tasks import payment_hint_task

    payment_hint_task.apply(args=(b24.member_id,))  # the one hint the 30 left
    wanted_worker()

    assert answers == {200}
    assert WantedAction.objects.filter(kind=WantedKind.CHECK_STATUS).count() == 1  # debounced
    app_info_calls = standin.stats["app_info"] - before[0]
    refreshes = standin.stats["refresh_ok"] + standin.stats["refresh_invalid_grant"] - before[1]
    assert (refreshes, app_info_calls <= 1) == (0, True)


def test_forged_launches_beyond_the_budget_get_429_without_asking(
    backend, b24, installed_portal, standin, settings, fresh_minute
):
    settings.BITRIX24_UNVERIFIED_BUDGET = 5
    before = standin.stats["app_info"]
    statuses = []
    for n in range(12):
        forged = {"access_token": f"{n:02d}" + "f" * 30, "refresh_token": "e" * 32}
        response = backend.launch(b24, forged)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) > 0
    assert statuses[:5] == [401] * 5
    assert set(statuses[5:]) == {429}
    assert standin.stats["app_info"] - before == 5  # the budget, and not one call more


def _launch_from(backend, b24, tokens, address: str):
    """A launch as the proxy in front of the backend passes it on: the client's address in X-Forwarded-For."""
    query, body = bx.launch(b24, tokens)
    return backend.post("/app/", params=query, data=body, headers={"X-Forwarded-For": address})


def test_junk_naming_a_portal_never_locks_out_its_genuine_users(
    backend, b24, installed_portal, standin, settings, fresh_minute
):
    """The red-team's lockout: anyone who knows a member_id sent junk AUTH_IDs for it until every genuine
    launch answered 429. Refusals now count against the sender's source, not the portal."""
    settings.FORWARDED_ALLOW_IPS = ["127.0.0.1"]  # the proxy in front of the backend
    settings.BITRIX24_UNVERIFIED_BUDGET = 5
    attacker, user = "203.0.113.9", "198.51.100.7"
    statuses = [
        _launch_from(
            backend, b24, {"access_token": f"{n:02d}" + "f" * 30, "refresh_token": "e" * 32}, attacker
        ).status_code
        for n in range(10)
    ]
    assert statuses == [401] * 5 + [429] * 5  # the attacker's own budget

    assert _launch_from(backend, b24, b24.issue_tokens(7, admin=False), user).status_code == 200
    # A spoofed X-Forwarded-For left of the proxy's entry changes nothing: the right-most non-proxy counts.
    spoofed = f"{user}, {attacker}"
    assert (
        _launch_from(backend, b24, {"access_token": "9" * 32, "refresh_token": "e" * 32}, spoofed).status_code
        == 429
    )


def test_strangers_together_cannot_spend_what_known_sources_need(
    backend, b24, installed_portal, settings, fresh_minute
):
    """Many sources, each within its budget, spend the total; half of it is kept for sources verified in the
    last day (Bitrix24's servers, returning users)."""
    settings.FORWARDED_ALLOW_IPS = ["127.0.0.1"]
    settings.BITRIX24_UNVERIFIED_TOTAL = 10
    known = "198.51.100.7"
    assert _launch_from(backend, b24, b24.issue_tokens(7, admin=False), known).status_code == 200
    statuses = [
        _launch_from(
            backend,
            b24,
            {"access_token": f"{n:02d}" + "f" * 30, "refresh_token": "e" * 32},
            f"2001:db8:{n}::1",
        ).status_code
        for n in range(8)
    ]
    assert statuses == [401] * 5 + [429] * 3  # strangers: half the total
    forged = {"access_token": "7" * 32, "refresh_token": "e" * 32}
    assert _launch_from(backend, b24, forged, known).status_code == 401  # asked: the known source's share
    last = _launch_from(backend, b24, b24.issue_tokens(8, admin=False), known)
    assert last.status_code == 200, last.text


def test_the_same_forged_token_is_asked_about_once(backend, b24, installed_portal, standin):
    forged = {"access_token": "f" * 32, "refresh_token": "e" * 32}
    before = standin.stats["app_info"]
    assert [backend.launch(b24, forged).status_code for _ in range(5)] == [401] * 5
    assert standin.stats["app_info"] - before == 1  # the refusal is remembered


# --- first sight --------------------------------------------------------------------------------------


def test_an_employees_first_install_leaves_the_portal_pending_until_an_admins(backend, b24, standin):
    employee = b24.issue_tokens(7, admin=False)
    planted = dict(bx.onappinstall(b24, employee))
    planted["auth[application_token]"] = "planted" + "0" * 25
    assert backend.post("/events/", data=list(planted.items())).status_code == 200

    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.state == PortalState.PENDING
    assert portal.application_token == ""  # the planted token admits nothing
    assert not TokenPair.objects.filter(portal=portal, is_background=True).exists()
    forged = _forged_uninstall(b24, "planted" + "0" * 25)
    assert backend.post("/events/", data=forged).status_code == 401

    # The admin's install arrives: trusted, installed, the genuine application token.
    assert backend.install_event(b24).status_code == 200
    portal.refresh_from_db()
    assert portal.state == PortalState.INSTALLED
    assert portal.application_token == b24.application_token
    assert TokenPair.objects.get(portal=portal, is_background=True).user_id == 1


def test_staff_approve_a_pending_portal(backend, b24):
    employee = b24.issue_tokens(7, admin=False)
    assert backend.post("/events/", data=bx.onappinstall(b24, employee)).status_code == 200
    portal = Portal.objects.get(member_id=b24.member_id)
    assert portal.state == PortalState.PENDING

    operations.approve_pending(portal=portal)

    portal.refresh_from_db()
    assert portal.state == PortalState.INSTALLED
    assert portal.application_token == b24.application_token
    assert TokenPair.objects.get(portal=portal, is_background=True).user_id == 7
    with pytest.raises(operations.OperationRefused):
        operations.approve_pending(portal=portal)


# --- a refresh token is replaced only by one that works -----------------------------------------------


def test_a_launch_with_a_junk_refresh_id_keeps_the_users_working_pair(
    backend, b24, installed_portal, standin
):
    pair = installed_portal.token_pairs.get(user_id=1)
    good_refresh = pair.refresh_token
    fresh = b24.issue_tokens(1, admin=True)
    junk = {**fresh, "refresh_token": "j" * 32}

    assert backend.launch(b24, junk).status_code == 200

    pair.refresh_from_db()
    assert pair.access_token == fresh["access_token"]  # what app.info proved is taken
    assert pair.refresh_token == good_refresh  # what it did not prove is not


def test_staff_see_the_journal_and_open_work_and_approve_in_the_admin(admin_client, backend, b24):
    employee = b24.issue_tokens(7, admin=False)
    assert backend.post("/events/", data=bx.onappinstall(b24, employee)).status_code == 200
    portal = Portal.objects.get(member_id=b24.member_id)
    assert backend.post("/events/", data=bx.onapppayment(b24)).status_code == 200

    for url in ("/admin/portals/wantedaction/", "/admin/portals/renewalattempt/"):
        page = admin_client.get(url)
        assert page.status_code == 200
        assert employee["access_token"] not in page.content.decode()
    assert "Check the app" in admin_client.get("/admin/portals/wantedaction/").content.decode()

    response = admin_client.post(
        reverse("admin:portals_portal_operate", args=(portal.pk, "approve")), follow=True
    )
    assert "approved, now installed" in response.content.decode()
    portal.refresh_from_db()
    assert portal.state == PortalState.INSTALLED


def test_a_revoked_auth_id_stops_working_within_a_minute(backend, b24, installed_portal):
    """The verdict cache kept a token ten minutes: a revoked AUTH_ID kept working that long."""
    from tests.test_api import _frame

    token = b24.issue_tokens(7, admin=False)["access_token"]
    frame = _frame(backend, b24, token)
    assert frame.get("/api/app/me/").status_code == 200
    b24.forget_access_token(token)  # revoked in Bitrix24
    assert frame.get("/api/app/me/").status_code == 200  # the verdict is still kept
    with travel(timezone.now() + timezone.timedelta(seconds=61)):
        assert frame.get("/api/app/me/").status_code == 401
